"""kernels/rotary.py (the once-per-token rotary and cache write) against float64 references, in the interpreter."""

import math

import pytest
import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.paged_attention import rope_write_kv
from kernels.rope_attention import rope_attention
from kernels.rotary import launch_rotary, reduce_angle, rope_tables


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


LLAMA31 = reference.Rope(500000.0, "llama3", 8.0, 1.0, 4.0, 8192)  # Llama 3.1's config.json


@pytest.mark.parametrize(
    "n,hq,hkv,d,dtype,max_pos,tol,rope",
    [
        (37, 6, 3, 80, torch.float32, 64, 1e-5, 10000.0),  # half dim 40 (masked lanes), 3 heads: a partial head block
        (70, 12, 12, 64, torch.float32, 100_000, 2e-5, 10000.0),  # > 64 tokens: several token blocks; large positions
        (5, 16, 2, 128, torch.bfloat16, 4096, 1e-2, 10000.0),
        (9, 0, 4, 32, torch.float16, 4096, 1e-2, 10000.0),  # no q (the prefill / training pre-pass)
        (33, 8, 2, 128, torch.float32, 100_000, 2e-5, LLAMA31),  # scaled frequencies (Llama 3.1)
        (6, 4, 4, 64, torch.float32, 4096, 1e-5, reference.Rope(10000.0, "linear", 4.0)),
    ],
)
def test_every_output_against_float64(n, hq, hkv, d, dtype, max_pos, tol, rope):
    """q -> q_out, k -> k_out and k, v -> cache slots, in one launch; poisoned outputs, slot -1 untouched."""
    q = torch.randn(n, hq, d).to(dtype) if hq else None
    k, v = torch.randn(n, hkv, d).to(dtype), torch.randn(n, hkv, d).to(dtype)
    positions = torch.randint(0, max_pos, (n,))
    num_blocks, block_size = -(-n // 8) + 2, 8
    slots = torch.randperm(num_blocks * block_size)[:n]
    slots[::5] = -1
    q_out = _nan(n, hq, d, dtype=dtype) if hq else None
    k_out = _nan(n, hkv, d, dtype=dtype)
    kc, vc = _nan(num_blocks, block_size, hkv, d, dtype=dtype), _nan(num_blocks, block_size, hkv, d, dtype=dtype)
    launch_rotary(k, v, positions, rope_theta=rope, q=q, q_out=q_out, k_out=k_out, k_cache=kc, v_cache=vc,
                  slot_mapping=slots)  # fmt: skip

    # The angles are HF's: fl32(pos * inv_freq), one fp32 rounding (0.004 rad at position 1e5, in HF too); what is
    # checked is everything after it (range reduction, cos/sin, the rotation): against fp32 angles, float64 rest.
    def want(x):
        angles = positions.float()[:, None] * reference.rotary_inv_freq(d, rope)[None, :]
        cos, sin = angles.double().cos()[:, None], angles.double().sin()[:, None]
        x1, x2 = x.double().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    torch.testing.assert_close(k_out.double(), want(k), atol=tol, rtol=tol)
    if hq:
        torch.testing.assert_close(q_out.double(), want(q), atol=tol, rtol=tol)
    keep = slots >= 0
    flat_k, flat_v = kc.view(-1, hkv, d), vc.view(-1, hkv, d)
    assert torch.equal(flat_k[slots[keep]], k_out[keep])  # the cache holds exactly the k_out values
    assert torch.equal(flat_v[slots[keep]], v[keep])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots[keep]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


def test_fewer_tokens_per_program_where_the_grid_would_leave_sms_idle(monkeypatch):
    """A decode step of 8 sequences at the 13B shape on a 132-SM GPU: 1 token a program (80 programs) instead of 8
    (10); at 64 sequences the 80 programs of 8 tokens stay (measured faster than 320 of 2); a prefill's grid is as
    before; and the kernel stays exact at the smaller tiles (the launches below on a stand-in 128-SM GPU)."""
    from kernels import rotary

    grid, tiles = rotary.launch_shape(8, 40, 40, 128, 132)
    assert tiles["BLOCK_T"] == 1 and grid == (8, 10)
    assert rotary.launch_shape(8, 40, 40, 128)[1]["BLOCK_T"] == 8  # (no SM count: the old tiles)
    assert rotary.launch_shape(64, 40, 40, 128, 132) == rotary.launch_shape(64, 40, 40, 128)
    assert rotary.launch_shape(8192, 40, 40, 128, 132) == rotary.launch_shape(8192, 40, 40, 128)
    real, seen = rotary.launch_shape, []

    def wide(n, hq, hkv, d, num_sms=None):
        seen.append(real(n, hq, hkv, d, 128)[1]["BLOCK_T"])
        return real(n, hq, hkv, d, 128)

    monkeypatch.setattr(rotary, "launch_shape", wide)
    test_every_output_against_float64(37, 6, 3, 80, torch.float32, 64, 1e-5, 10000.0)
    test_every_output_against_float64(70, 12, 12, 64, torch.float32, 100_000, 2e-5, 10000.0)
    assert seen == [1, 4], seen


def test_no_rotation_copies_bits():
    k, v = torch.randn(11, 3, 64).bfloat16(), torch.randn(11, 3, 64).bfloat16()
    k_out = _nan(11, 3, 64, dtype=torch.bfloat16)
    launch_rotary(k, v, torch.arange(11), rotate=False, k_out=k_out)
    assert torch.equal(k_out, k)


def test_prefill_and_decode_cache_the_same_keys():
    """A token's rotated key is bit-identical whether prefill (rope_attention with kv_cache) or a decode step
    (rope_write_kv) wrote it: the two paths share one kernel, so decode never attends to a differently rounded
    copy of a prefilled key."""
    n, hq, hkv, d = 21, 4, 2, 64
    q, k, v = torch.randn(n, hq, d).bfloat16(), torch.randn(n, hkv, d).bfloat16(), torch.randn(n, hkv, d).bfloat16()
    positions = torch.arange(n) + 1000
    cu = torch.tensor([0, n], dtype=torch.int32)
    slots = torch.arange(n)
    caches = [(_nan(4, 8, hkv, d, dtype=torch.bfloat16), _nan(4, 8, hkv, d, dtype=torch.bfloat16)) for _ in range(2)]
    rope_attention(q, k, v, positions, cu, kv_cache=caches[0], slot_mapping=slots)
    rope_write_kv(q, k, v, positions, *caches[1], slots)
    assert torch.equal(caches[0][0].view(-1, hkv, d)[:n], caches[1][0].view(-1, hkv, d)[:n])
    assert torch.equal(caches[0][1].view(-1, hkv, d)[:n], v)


@triton.jit
def _reduce_angles(A, OUT, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(OUT + offs, reduce_angle(tl.load(A + offs, mask=offs < N)), mask=offs < N)


def test_angles_are_reduced_into_one_turn():
    """reduce_angle gives a mod 2 pi in [-pi, pi] up to the positions a model reaches (~4e5 radians at j = 0):
    the interpreter's sin and cos are exact at any angle, a GPU's fast ones are not, so the rotary's accuracy at
    large positions rests on this reduction, checked here on its own."""
    a = torch.tensor([0.0, 0.5, -3.0, 3.2, 7.0, 1000.0, 65537.0, 131072.5, 4.0e5, -3.0e5, 12345.678, 2.5e5])
    out = torch.full_like(a, float("nan"))
    _reduce_angles[(1,)](a, out, a.numel(), BLOCK=16)
    want = torch.remainder(a.double() + math.pi, 2 * math.pi) - math.pi  # (of the float32 angles, in float64)
    assert out.abs().max().item() <= math.pi + 1e-5
    torch.testing.assert_close(out.double(), want, atol=5e-5, rtol=0)


def test_tables():
    inv, tab = rope_tables(16, 10000.0, torch.get_default_device())
    assert inv.shape == (16,) and torch.equal(inv[:8], reference.rotary_inv_freq(16, 10000.0)) and not inv[8:].any()
    j = torch.arange(tab.shape[1], dtype=torch.float64)[:, None]
    torch.testing.assert_close(tab[0].double(), (j * inv.double()).cos(), atol=1e-7, rtol=0)
    torch.testing.assert_close(tab[1].double(), (j * inv.double()).sin(), atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        # original length 256 at head dim 16: frequencies kept, blended and divided
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },  # Llama 3.2's
    ],
    ids=["default", "linear", "llama3_all_branches", "llama3.2"],
)
@pytest.mark.parametrize("d", [16, 128])
def test_inv_freq_is_transformers(params, d):
    """The fp32 frequencies every kernel rotates with are bit for bit those transformers computes from the same
    config.json, for each supported rope type."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=params)
    rotary = LlamaRotaryEmbedding(cfg)  # (what transformers' Llama rotates with, every kind)
    want = rotary.inv_freq.cpu()
    assert rotary.attention_scaling == 1.0
    rope = reference.Rope.from_hf(cfg.to_dict())
    assert torch.equal(reference.rotary_inv_freq(d, rope).cpu(), want)
    assert torch.equal(rope_tables(d, rope, torch.get_default_device())[0][: d // 2].cpu(), want)
    if params.get("original_max_position_embeddings") == 256 and d == 16:  # the three branches all taken
        base = reference.rotary_inv_freq(d, params["rope_theta"]).cpu()
        ratio = (want / base).tolist()
        assert ratio[0] == 1.0 and ratio[-1] == 1 / 8 and any(1 / 8 < r < 1 for r in ratio)


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic' is not supported"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'llama3' is missing low_freq_factor, high_freq"),
        ({"rope_scaling": {"rope_type": "linear"}}, "'linear' is missing factor"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "needs a positive factor"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4}},
            "0 < low_freq_factor < high_freq_factor",
        ),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor 0.5"),
        ({"rope_theta": -1.0}, "rope_theta must be positive"),
        ({"rope_theta": None}, "rope_theta must be a positive number, got None"),  # (a TypeError traceback)
        ({"rope_theta": float("inf")}, "rope_theta must be positive"),
    ],
)
def test_bad_rope_parameters(cfg, message):
    with pytest.raises(ValueError, match=message):
        reference.Rope.from_hf(cfg, max_position_embeddings=4096)


def test_rope_scaling_beside_rope_parameters_is_read_as_transformers_reads_it():
    """A config.json with both spellings (transformers 5's default rope_parameters, and a rope_scaling a user added to
    stretch the context): rope_scaling alone, its theta else the top-level one, as LlamaConfig makes them; an
    unsupported type there is refused, not passed over for the parameters beside it."""
    from transformers import LlamaConfig

    default = {"rope_type": "default", "rope_theta": 500000.0}
    for extra in ({}, {"rope_theta": 20000.0}):
        cfg = {"rope_parameters": default, "rope_scaling": {"rope_type": "linear", "factor": 4.0}, **extra}
        hf = LlamaConfig(**cfg).rope_parameters
        want = reference.Rope(hf["rope_theta"], "linear", hf["factor"])
        assert reference.Rope.from_hf(cfg, max_position_embeddings=4096) == want, (cfg, hf)
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        reference.Rope.from_hf({"rope_parameters": default, "rope_scaling": {"type": "dynamic", "factor": 2.0}})


def test_rope_spellings_are_one_key():
    """A float theta and the default Rope of it are one table; fields a kind does not use are dropped."""
    assert reference.Rope.of(10000.0) == reference.Rope(10000.0) == reference.Rope(10000, factor=3.0)
    assert reference.Rope(1e4, "linear", 2.0, low_freq_factor=9.0) == reference.Rope(1e4, "linear", 2.0)
    d = torch.get_default_device()
    assert rope_tables(16, 10000.0, d)[0] is rope_tables(16, reference.Rope(10000.0), d)[0]


def test_decode_layout_strided_positions_and_inputs_left_as_they_are():
    """The decode call (q -> q_out, k and v into the cache, no k_out): positions and slots as strided views (made
    contiguous for the kernel), and q, k, v left bit for bit as they were (without k_out the kernel's k output
    pointer is k itself, so a k write it did not ask for would rotate the caller's keys in place)."""
    n, hq, hkv, d = 13, 4, 2, 64
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    positions = torch.randint(0, 4096, (2 * n,))[::2]
    assert positions.stride(0) == 2
    slots = torch.randperm(3 * 8).repeat_interleave(3)[: 3 * n : 3]
    assert slots.stride(0) == 3 and slots.unique().numel() == n
    q_out = _nan(n, hq, d, dtype=torch.float32)
    kc, vc = _nan(3, 8, hkv, d, dtype=torch.float32), _nan(3, 8, hkv, d, dtype=torch.float32)
    launch_rotary(k, v, positions, q=q, q_out=q_out, k_cache=kc, v_cache=vc, slot_mapping=slots)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)

    def want(x):
        angles = positions.float()[:, None] * reference.rotary_inv_freq(d, 10000.0)[None, :]
        cos, sin = angles.double().cos()[:, None], angles.double().sin()[:, None]
        x1, x2 = x.double().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    torch.testing.assert_close(q_out.double(), want(q0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc.view(-1, hkv, d)[slots].double(), want(k0), atol=1e-5, rtol=1e-5)
    assert torch.equal(vc.view(-1, hkv, d)[slots], v0)
