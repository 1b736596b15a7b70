"""kernels/paged_attention.py in Triton's interpreter against float64 attention over contiguous K/V.

Each test draws per-sequence contiguous K/V first, scatters them into randomly chosen (non-contiguous)
blocks of a NaN-poisoned cache, and computes the expected output from the contiguous tensors, so the
gather through the block table is checked independently of kernels/reference.py (which is checked too).
"""

import math

import pytest
import torch

from kernels import dispatch, reference, rotary
from kernels import paged_attention as pa
from kernels.paged_attention import choose_num_splits, paged_decode_attention, rope_write_kv, write_kv_cache

TOLS = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-2, 1e-2)}


def _paged_setup(
    ctx_lens, hq, hkv, d, block_size, dtype, *, spare_blocks=5, width_extra=1, pool_layers=1, cache_dtype=None
):
    """Random q and per-sequence K/V scattered into a NaN-poisoned cache through random block tables (the
    cache in `cache_dtype`, default q's; ks/vs hold the values the cache holds, in float64)."""
    cache_dtype = cache_dtype or dtype
    b = len(ctx_lens)
    need = [-(-n // block_size) for n in ctx_lens]
    width = max(need + [1]) + width_extra
    num_blocks = sum(need) + spare_blocks
    # The cache is a per-layer view of an engine-style pool [layers, 2, blocks, block_size, Hkv, D].
    pool = torch.full((pool_layers, 2, num_blocks, block_size, hkv, d), float("nan"), dtype=cache_dtype)
    k_cache, v_cache = pool[-1, 0], pool[-1, 1]
    perm = torch.randperm(num_blocks)
    tables = torch.full((b, width), 10**6, dtype=torch.int32)  # unused columns point far away
    ks, vs, used = [], [], 0
    for i, n in enumerate(ctx_lens):
        blocks = perm[used : used + need[i]]
        used += need[i]
        tables[i, : need[i]] = blocks.to(torch.int32)
        k = torch.randn(n, hkv, d, dtype=torch.float64)
        v = torch.randn(n, hkv, d, dtype=torch.float64)
        t = torch.arange(n)
        k_cache[blocks[t // block_size], t % block_size] = k.to(cache_dtype)
        v_cache[blocks[t // block_size], t % block_size] = v.to(cache_dtype)
        ks.append(k.to(cache_dtype).double())
        vs.append(v.to(cache_dtype).double())
    tables[tables == 10**6] = num_blocks - 1  # keep in range; never read past the context anyway
    q = torch.randn(b, hq, d, dtype=torch.float64).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(ctx_lens, dtype=torch.int32), ks, vs


def _expected(q, ks, vs, scale=None):
    """Plain float64 attention of each query over its contiguous context."""
    b, hq, d = q.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for i, (k, v) in enumerate(zip(ks, vs)):
        if k.shape[0] == 0:
            continue
        group = hq // k.shape[1]
        kk = k.repeat_interleave(group, dim=1)  # [L, Hq, D]
        vv = v.repeat_interleave(group, dim=1)
        s = torch.einsum("hd,lhd->hl", q[i].double(), kk) * scale
        out[i] = torch.einsum("hl,lhd->hd", torch.softmax(s, dim=-1), vv)
    return out


CASES = [
    # (hq, hkv, d, block_size, dtype, num_splits)
    (4, 4, 64, 16, torch.float32, None),  # MHA, group 1: multiply-reduce path
    (8, 2, 64, 32, torch.float32, 3),  # GQA 4
    (8, 1, 128, 16, torch.float32, 4),  # GQA 8, D 128
    (4, 4, 128, 32, torch.bfloat16, 3),
    (8, 1, 64, 16, torch.bfloat16, None),
    (8, 2, 128, 16, torch.float16, 2),
    (2, 2, 64, 8, torch.float16, 1),
    (4, 2, 80, 16, torch.float32, 2),  # head dim not a power of two: masked D
]


@pytest.mark.parametrize("hq,hkv,d,block_size,dtype,num_splits", CASES)
def test_paged_decode_matches_float64(hq, hkv, d, block_size, dtype, num_splits):
    # Length 1, exactly one block, 17, and one long enough for several 64-token tiles and splits.
    ctx_lens = [1, block_size, 17, 5 * 64 + 3]
    q, kc, vc, bt, cl, ks, vs = _paged_setup(ctx_lens, hq, hkv, d, block_size, dtype, pool_layers=2)
    out = torch.full_like(q, float("nan"))
    got = paged_decode_attention(q, kc, vc, bt, cl, out=out, num_splits=num_splits)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    want = _expected(q, ks, vs)
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    # The oracle, in float64, agrees with the independent computation.
    ref = reference.paged_decode_attention(q.double(), kc.double(), vc.double(), bt, cl)
    torch.testing.assert_close(ref, want, atol=1e-10, rtol=1e-10)


def test_paged_decode_reads_strided_tables_and_lengths():
    """A block table or context lengths passed as strided views (a column slice, a transposed table) read as their
    values, not their storage (the kernel reads a table row with unit stride: it gave garbage)."""
    q, kc, vc, bt, cl, ks, vs = _paged_setup([5, 33, 17], 4, 2, 64, 8, torch.float32)
    wide = torch.zeros(bt.shape[0], 2 * bt.shape[1], dtype=torch.int32)
    wide[:, ::2] = bt
    lens = torch.zeros(2 * len(cl), dtype=torch.int32)
    lens[::2] = cl
    col_major = bt.t().contiguous().t()
    want = _expected(q, ks, vs)
    for tables, lengths in ((wide[:, ::2], cl), (col_major, lens[::2])):
        got = paged_decode_attention(q, kc, vc, tables, lengths, num_splits=2)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


FP8 = torch.float8_e4m3fn
# float8 conversions need compute capability 8.9 on a GPU (TULU_TEST_DEVICE=cuda); the interpreter has them
needs_fp8 = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9), reason="no float8 on this GPU"
)


@needs_fp8
@pytest.mark.parametrize(
    "hq,hkv,dtype,num_splits",
    [(4, 4, torch.bfloat16, 1), (8, 2, torch.bfloat16, 3), (4, 1, torch.float32, 2), (6, 3, torch.float16, 1)],
)
def test_paged_decode_fp8_cache(hq, hkv, dtype, num_splits):
    """A float8 e4m3 cache (MHA, GQA and MQA paths, with and without splits): against float64 attention over the
    values the cache holds, on the kernel and the reference path."""
    q, kc, vc, bt, cl, ks, vs = _paged_setup([1, 37, 100], hq, hkv, 64, 16, dtype, cache_dtype=FP8)
    want = _expected(q, ks, vs)
    got = paged_decode_attention(q, kc, vc, bt, cl, num_splits=num_splits)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=TOLS[dtype][0], rtol=TOLS[dtype][1])
    with dispatch.reference_ops():
        ref = paged_decode_attention(q, kc, vc, bt, cl)
    torch.testing.assert_close(ref.double(), want, atol=TOLS[dtype][0], rtol=TOLS[dtype][1])
    with pytest.raises(ValueError, match="cache dtype"):
        paged_decode_attention(q, kc.to(torch.float16 if dtype != torch.float16 else torch.float32), vc, bt, cl)


def test_paged_decode_splits_and_scale():
    """Many splits, some empty for short sequences (max_context_len hint), and a custom softmax scale."""
    ctx_lens = [700, 3, 129]
    q, kc, vc, bt, cl, ks, vs = _paged_setup(ctx_lens, 4, 2, 64, 16, torch.float32)
    for splits in (2, 11):
        got = paged_decode_attention(q, kc, vc, bt, cl, softmax_scale=0.3, num_splits=splits, max_context_len=700)
        torch.testing.assert_close(got.double(), _expected(q, ks, vs, 0.3), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "hq,hkv,config",
    [
        (2, 2, {"dot_min_group": 2}),  # MHA through multiply-reduce (the default pads it to 16 rows for tl.dot)
        (8, 1, {"dot_min_group": 99, "block_n": 32}),  # group 8 through multiply-reduce
        (16, 1, {"block_n": 16, "num_warps": 2}),  # group exactly 16
    ],
)
def test_paged_decode_config_variants(hq, hkv, config):
    """Every launch variant a GPU sweep may pick stays correct."""
    q, kc, vc, bt, cl, ks, vs = _paged_setup([1, 33, 70], hq, hkv, 64, 16, torch.float32)
    got = paged_decode_attention(q, kc, vc, bt, cl, num_splits=2, config=config)
    torch.testing.assert_close(got.double(), _expected(q, ks, vs), atol=2e-5, rtol=2e-5)


def test_paged_decode_default_splits_long_context():
    """The default split count (from block_tables width) on a context that splits on a 4-SM stand-in."""
    ctx_lens = [600]
    q, kc, vc, bt, cl, ks, vs = _paged_setup(ctx_lens, 2, 2, 64, 32, torch.float32, width_extra=3)
    assert choose_num_splits(1, 2, bt.shape[1] * 32, 64, 4) > 1  # 4: the CPU stand-in SM count
    got = paged_decode_attention(q, kc, vc, bt, cl)
    torch.testing.assert_close(got.double(), _expected(q, ks, vs), atol=2e-5, rtol=2e-5)


def test_paged_decode_empty_context_gives_zeros():
    """A context of 0 gives zeros, without splits and with 3 real ones: the other sequence's 300 tokens in 20-block
    rows (320 tokens) split 3 ways take 128-token splits, so every split of the empty row is empty and the merge
    sees no finite max. (A 40-token context made the 3 requested splits collapse into one.)"""
    ctx_lens = [0, 300]
    q, kc, vc, bt, cl, ks, vs = _paged_setup(ctx_lens, 4, 1, 64, 16, torch.float32)
    assert bt.shape[1] * 16 == 320
    for splits in (1, 3):
        got = paged_decode_attention(q, kc, vc, bt, cl, num_splits=splits, out=torch.full_like(q, float("nan")))
        assert torch.equal(got[0], torch.zeros_like(got[0]))
        torch.testing.assert_close(got.double(), _expected(q, ks, vs), atol=2e-5, rtol=2e-5)


def test_paged_decode_scores_far_below_zero_in_every_split():
    """Every score of a row far below 0 (about -290 in log2 units: a common offset, which softmax ignores): still the
    softmax-weighted mean of V. The merge pads 3 splits to 4 lanes; a padding lane must weigh nothing (m = -inf), not
    set the max at 0, against which every real split's weight underflows to 0. The offset sits in one coordinate, so
    the fp32 scores are exact up to the final scaling (hence the 1e-4 tolerance)."""
    q, kc, vc, bt, cl, ks, vs = _paged_setup([300, 150], 4, 2, 64, 16, torch.float32)
    kc[..., 0] += 200.0  # (the NaN poison stays NaN)
    ks = [k.float().add(torch.nn.functional.one_hot(torch.tensor(0), 64) * 200.0).double() for k in ks]
    q = torch.zeros_like(q)
    q[..., 0] = -1.0
    want = _expected(q, ks, vs, 1.0)
    for splits in (1, 3):
        got = paged_decode_attention(q, kc, vc, bt, cl, softmax_scale=1.0, num_splits=splits)
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_a_context_that_fills_its_table_with_the_default_max_context_len():
    """max_context_len defaults to the table's capacity: a context using every slot of its row (32 tokens in two
    16-token blocks) is read whole, with and without splits (past max_context_len the interpreter refuses it and a
    GPU reads nothing)."""
    q, kc, vc, bt, cl, ks, vs = _paged_setup([32, 20], 4, 2, 64, 16, torch.float32, width_extra=0)
    assert bt.shape[1] * 16 == 32
    for splits in (1, 2):
        got = paged_decode_attention(q, kc, vc, bt, cl, num_splits=splits)
        torch.testing.assert_close(got.double(), _expected(q, ks, vs), atol=2e-5, rtol=2e-5)


def test_a_context_longer_than_its_table_is_clamped_on_the_gpu_path(monkeypatch):
    """On CUDA no host check sees a context longer than its block table row addresses (it would take a sync): the
    kernel clamps it to the row's tokens and reads nothing past the row (here the next row's blocks, which the
    unclamped kernel attended to). The interpreter's own check is turned off to run the CUDA path's arithmetic."""

    monkeypatch.setattr(pa, "INTERPRET", False)
    q, kc, vc, bt, cl, ks, vs = _paged_setup([32, 20], 4, 2, 64, 16, torch.float32, width_extra=0)
    cl[0] = 40  # its row holds two blocks of 16
    for splits in (1, 2):
        got = pa.paged_decode_attention(q, kc, vc, bt, cl, num_splits=splits, max_context_len=32)
        torch.testing.assert_close(got.double(), _expected(q, ks, vs), atol=2e-5, rtol=2e-5)


def test_paged_decode_reference_path_on_cpu():
    """Without the interpreter (the CPU demo path) the op runs kernels/reference.py."""
    q, kc, vc, bt, cl, ks, vs = _paged_setup([5, 33], 4, 2, 64, 16, torch.float32)
    with dispatch.reference_ops():
        got = paged_decode_attention(q, kc, vc, bt, cl)
    torch.testing.assert_close(got.double(), _expected(q, ks, vs), atol=2e-5, rtol=2e-5)


@pytest.mark.cpu_only  # (the reference checks lengths held on the host only: on a GPU it would take a sync)
def test_paged_decode_reference_path_checks_max_context_len():
    """The docstring's promise: the CPU reference path checks the lengths against max_context_len as the interpreter
    does (it attended to the whole context, where a GPU reads only max_context_len tokens), and a bound that holds
    gives the same output."""
    q, kc, vc, bt, cl, ks, vs = _paged_setup([17, 5], 4, 2, 64, 16, torch.float32)
    with dispatch.reference_ops():
        with pytest.raises(ValueError, match="context length 17 exceeds max_context_len 16"):
            paged_decode_attention(q, kc, vc, bt, cl, max_context_len=16)
        got = paged_decode_attention(q, kc, vc, bt, cl, max_context_len=17)
    torch.testing.assert_close(got.double(), _expected(q, ks, vs), atol=2e-5, rtol=2e-5)


def test_paged_decode_errors():
    q, kc, vc, bt, cl, _, _ = _paged_setup([20, 5], 4, 2, 64, 16, torch.float32, width_extra=0)
    with pytest.raises(ValueError, match="at least one head, got 0 query"):
        paged_decode_attention(q[:, :0], kc, vc, bt, cl)
    with pytest.raises(ValueError, match="max_context_len"):
        paged_decode_attention(q, kc, vc, bt, cl, max_context_len=33)
    if not q.is_cuda:  # (checked in the interpreter: on a GPU reading the lengths back would sync each decode step)
        with pytest.raises(ValueError, match="block_tables"):
            paged_decode_attention(q, kc, vc, bt[:, :1], cl)  # 20 tokens need 2 blocks of 16
        with pytest.raises(ValueError, match="exceeds max_context_len 16"):
            paged_decode_attention(q, kc, vc, bt, cl, max_context_len=16)
        with pytest.raises(ValueError, match="context length 20 exceeds max_context_len 16"):  # (the oracle too)
            reference.paged_decode_attention(q, kc, vc, bt, cl, max_context_len=16)
        for bad in (kc.shape[0], -1):  # (a block id past the cache: the kernel would read another tensor's memory)
            wild = bt.clone()
            wild[1, 0] = bad  # (row 1's context, 5 tokens, reads its first block only: its unread second may be any)
            with pytest.raises(ValueError, match=f"block_tables row 1 reads block {bad} of a cache of {kc.shape[0]} "):
                paged_decode_attention(q, kc, vc, wild, cl)
        unread = bt.clone()
        unread[1, 1] = kc.shape[0] + 5  # (past row 1's context: never read, so allowed)
        torch.testing.assert_close(
            paged_decode_attention(q, kc, vc, unread, cl), paged_decode_attention(q, kc, vc, bt, cl)
        )
    with pytest.raises(ValueError, match="one device"):
        paged_decode_attention(q, kc, vc, bt.to("meta"), cl)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q.to(torch.bfloat16), kc, vc, bt, cl)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        paged_decode_attention(q[:, :3], kc, vc, bt, cl)
    with pytest.raises(ValueError, match="head dim"):
        paged_decode_attention(q[..., :32], kc, vc, bt, cl)
    with pytest.raises(ValueError, match="v_cache shape"):
        paged_decode_attention(q, kc, vc[:-1], bt, cl)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(q, kc, vc, bt, cl[:1])
    with pytest.raises(ValueError, match="block_tables must be"):
        paged_decode_attention(q, kc, vc, bt[:1], cl)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(q, kc[:, :12], vc[:, :12], bt, cl)
    with pytest.raises(ValueError, match="out must be"):
        paged_decode_attention(q, kc, vc, bt, cl, out=torch.empty(2, 4, 32))


# ----------------------------------------------------------------------------------- cache writes


def _write_setup(n, hq, hkv, d, block_size, dtype, num_blocks=6):
    kc = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    vc = kc.clone()
    q = torch.randn(n, hq, d, dtype=torch.float64).to(dtype)
    k = torch.randn(n, hkv, d, dtype=torch.float64).to(dtype)
    v = torch.randn(n, hkv, d, dtype=torch.float64).to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:n].to(torch.int64)
    slots[1] = -1
    return q, k, v, kc, vc, slots


@pytest.mark.parametrize(
    "hq,hkv,d,block_size,dtype,max_pos,tol",
    [
        (4, 4, 64, 16, torch.float32, 64, 1e-5),
        # fp32 angles pos * inv_freq carry ~pos * 1e-7 rad of rounding (as in HF), hence the looser bound.
        (8, 2, 128, 32, torch.float32, 4096, 5e-4),
        (8, 1, 64, 16, torch.bfloat16, 4096, 1e-2),
        (6, 3, 128, 16, torch.float16, 4096, 1e-2),
        (4, 2, 80, 16, torch.float32, 64, 1e-5),  # half dim 40: masked
    ],
)
def test_rope_write_kv(hq, hkv, d, block_size, dtype, max_pos, tol):
    n = 9
    q, k, v, kc, vc, slots = _write_setup(n, hq, hkv, d, block_size, dtype)
    positions = torch.randint(0, max_pos, (n,), dtype=torch.int32)
    q_out = torch.full_like(q, float("nan"))
    got = rope_write_kv(q, k, v, positions, kc, vc, slots, rope_theta=10000.0, q_out=q_out)
    assert got.data_ptr() == q_out.data_ptr()
    pos64 = positions.to(torch.int64)
    torch.testing.assert_close(got.double(), reference.apply_rotary(q.double(), pos64), atol=tol, rtol=tol)
    keep = slots >= 0
    flat_k, flat_v = kc.view(-1, hkv, d), vc.view(-1, hkv, d)
    want_k = reference.apply_rotary(k.double(), pos64)
    torch.testing.assert_close(flat_k[slots[keep]].double(), want_k[keep], atol=tol, rtol=tol)
    assert torch.equal(flat_v[slots[keep]], v[keep])  # v is copied bit for bit
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots[keep]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()  # slot -1 and the rest unwritten
    # The oracle writes the same cache.
    kc2, vc2 = torch.full_like(kc, float("nan")).double(), torch.full_like(vc, float("nan")).double()
    q2 = reference.rope_write_kv(q.double(), k.double(), v.double(), pos64, kc2, vc2, slots)
    torch.testing.assert_close(q2, reference.apply_rotary(q.double(), pos64))
    torch.testing.assert_close(kc.double(), kc2, atol=tol, rtol=tol, equal_nan=True)


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_write_kv_fp8_cache_saturates(dtype):
    """Rotated k and v into a float8 e4m3 cache: one rounding from the fp32 rotation, saturating at +-448 (as
    torch and the GPU convert; Triton's interpreter would wrap); the reference writes the same cache."""
    n, hq, hkv, d = 40, 4, 2, 64
    q, k, v, kc, vc, slots = _write_setup(n, hq, hkv, d, 16, dtype, num_blocks=4)
    kc, vc = kc.to(FP8), vc.to(FP8)  # NaN-poisoned, in fp8
    k, v = (k.double() * 300).to(dtype), (v.double() * 300).to(dtype)  # a good share beyond 448
    positions = torch.randint(0, 4096, (n,))
    rope_write_kv(q, k, v, positions, kc, vc, slots)
    keep = slots >= 0
    flat_k, flat_v = kc.view(-1, hkv, d)[slots[keep]], vc.view(-1, hkv, d)[slots[keep]]
    want_v = reference.to_cache_dtype(v[keep], FP8)
    assert torch.equal(flat_v.view(torch.uint8), want_v.view(torch.uint8))  # v: one saturating cast
    want_k = reference.to_cache_dtype(reference.apply_rotary(k.double(), positions)[keep].to(torch.float32), FP8)
    assert not flat_k.float().isnan().any() and flat_k.float().abs().max() == 448.0
    # fp32 angles differ from float64 by ~1e-4 rad at these positions: at most one fp8 step apart, rarely
    torch.testing.assert_close(flat_k.float(), want_k.float(), atol=0.0, rtol=0.125)
    assert (flat_k.view(torch.uint8) == want_k.view(torch.uint8)).float().mean() > 0.98
    kc2, vc2 = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    with dispatch.reference_ops():
        rope_write_kv(q, k, v, positions, kc2, vc2, slots)
    assert torch.equal(vc2.view(torch.uint8), vc.view(torch.uint8))
    assert (kc2.view(torch.uint8) == kc.view(torch.uint8)).float().mean() > 0.98


@needs_fp8
@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_prefill_writes_the_fp8_cache_decode_writes(path):
    """rope_attention's cache write (prefill) and rope_write_kv (decode) put the same fp8 bytes in the cache."""
    from kernels.rope_attention import rope_attention

    n, hq, hkv, d = 24, 4, 2, 64
    q, k, v, kc, vc, slots = _write_setup(n, hq, hkv, d, 16, torch.bfloat16, num_blocks=4)
    kc, vc = kc.to(FP8), vc.to(FP8)
    positions = torch.randint(0, 2000, (n,))
    cu = torch.tensor([0, 5, n], dtype=torch.int32)
    caches = [(torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))) for _ in range(2)]
    if path == "reference":
        with dispatch.reference_ops():
            rope_attention(q, k, v, positions, cu, kv_cache=caches[0], slot_mapping=slots)
            rope_write_kv(q, k, v, positions, *caches[1], slots)
    else:
        rope_attention(q, k, v, positions, cu, kv_cache=caches[0], slot_mapping=slots)
        rope_write_kv(q, k, v, positions, *caches[1], slots)
    for a, b in zip(*caches):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_rope_write_kv_theta_and_reference_path():
    q, k, v, kc, vc, slots = _write_setup(5, 4, 2, 64, 16, torch.float32)
    positions = torch.arange(5, dtype=torch.int64) * 7
    got = rope_write_kv(q, k, v, positions, kc, vc, slots, rope_theta=500000.0)
    torch.testing.assert_close(got, reference.apply_rotary(q, positions, 500000.0), atol=1e-5, rtol=1e-5)
    kc2, vc2 = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    with dispatch.reference_ops():
        got2 = rope_write_kv(q, k, v, positions, kc2, vc2, slots, rope_theta=500000.0)
    torch.testing.assert_close(got2, got, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc2, kc, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(vc2.nan_to_num(7.0), vc.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache(dtype):
    _, k, v, kc, vc, slots = _write_setup(11, 2, 2, 64, 8, dtype, num_blocks=4)
    slots = slots.to(torch.int32)
    kc2, vc2 = kc.clone(), vc.clone()
    write_kv_cache(k, v, kc, vc, slots)
    with dispatch.reference_ops():
        write_kv_cache(k, v, kc2, vc2, slots)
    keep = slots >= 0
    assert torch.equal(kc.view(-1, 2, 64)[slots[keep].long()], k[keep])
    assert torch.equal(vc.view(-1, 2, 64)[slots[keep].long()], v[keep])
    assert torch.equal(kc.isnan(), kc2.isnan()) and torch.equal(kc.nan_to_num(0), kc2.nan_to_num(0))
    assert kc.isnan().sum() == kc.numel() - int(keep.sum()) * 2 * 64


def test_caches_of_different_layouts():
    """A v cache laid out otherwise than the k cache (a [block_size, num_blocks, ...] buffer seen transposed, and a
    k cache whose heads lie 2 D apart): the write and the decode kernels each follow every cache's own strides."""
    nb, bs, h, d, n = 4, 8, 2, 64, 11
    k, v = torch.randn(n, h, d), torch.randn(n, h, d)
    kc = torch.full((nb, bs, h, 2 * d), float("nan"))[..., :d]
    vc = torch.full((bs, nb, h, d), float("nan")).transpose(0, 1)
    slots = torch.randperm(nb * bs)[:n]
    write_kv_cache(k, v, kc, vc, slots.to(torch.int32))
    assert torch.equal(kc[slots // bs, slots % bs], k) and torch.equal(vc[slots // bs, slots % bs], v)
    # one sequence of those 11 tokens, its table the blocks they went to in order: the slots as its positions
    blocks = torch.randperm(nb).to(torch.int32)
    write_kv_cache(k, v, kc, vc, (blocks.long()[torch.arange(n) // bs] * bs + torch.arange(n) % bs).to(torch.int32))
    q = torch.randn(1, 4, d)
    got = paged_decode_attention(q, kc, vc, blocks[None, :2].contiguous(), torch.tensor([n], dtype=torch.int32))
    torch.testing.assert_close(got.double(), _expected(q, [k.double()], [v.double()]), atol=2e-5, rtol=2e-5)


def test_decode_step_end_to_end():
    """rope_write_kv for the new token, then paged attention: equals rotary + attention on contiguous tensors."""
    ctx_lens = [9, 16]
    q_, kc, vc, bt, cl, ks, vs = _paged_setup([n - 1 for n in ctx_lens], 8, 2, 64, 16, torch.float32)
    # the unused second column: two blocks no sequence holds, poisoned (the random tables may have put a
    # sequence's own block anywhere in the pool, so not simply the last two)
    held = set(bt[:, 0].tolist())
    spare = [blk for blk in range(kc.shape[0]) if blk not in held][:2]
    bt[:, 1] = torch.tensor(spare, dtype=torch.int32)
    kc[spare] = float("nan")
    q = torch.randn(2, 8, 64)
    k, v = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    pos = torch.tensor(ctx_lens) - 1
    slots = torch.stack([bt[i, pos[i] // 16].long() * 16 + pos[i] % 16 for i in range(2)])
    q_rot = rope_write_kv(q, k, v, pos, kc, vc, slots)
    got = paged_decode_attention(q_rot, kc, vc, bt, torch.tensor(ctx_lens, dtype=torch.int32))
    k_rot = reference.apply_rotary(k.double(), pos)
    ks = [torch.cat([ks[i], k_rot[i : i + 1]]) for i in range(2)]
    vs = [torch.cat([vs[i], v[i : i + 1].double()]) for i in range(2)]
    want = _expected(reference.apply_rotary(q.double(), pos), ks, vs)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_write_errors():
    q, k, v, kc, vc, slots = _write_setup(4, 4, 2, 64, 16, torch.float32)
    pos = torch.arange(4)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(k, v, kc, vc, slots[:3])
    with pytest.raises(ValueError, match="slot_mapping dtype"):
        write_kv_cache(k, v, kc, vc, slots.float())
    with pytest.raises(ValueError, match="k must be"):
        write_kv_cache(k[:, :1], v, kc, vc, slots)
    with pytest.raises(ValueError, match="v has"):
        write_kv_cache(k, v[:3], kc, vc, slots)
    with pytest.raises(ValueError, match="v_cache dtype"):
        write_kv_cache(k, v, kc, vc.double(), slots)
    with pytest.raises(ValueError, match="one device"):
        write_kv_cache(k, v, kc, vc, slots.to("meta"))
    with pytest.raises(ValueError, match="positions"):
        rope_write_kv(q, k, v, pos.float(), kc, vc, slots)
    with pytest.raises(ValueError, match="q must be"):
        rope_write_kv(q[:, :3], k, v, pos, kc, vc, slots)
    beyond = slots.clone()
    beyond[0] = kc.shape[0] * kc.shape[1]  # one past the last slot: it wrote into the next layer's cache
    if not kc.is_cuda:  # (checked on the host where that is free, as for the context lengths above)
        with pytest.raises(IndexError, match="outside the KV cache's|out of bounds"):
            write_kv_cache(k, v, kc, vc, beyond)
        with pytest.raises(IndexError, match="outside the KV cache's|out of bounds"):
            rope_write_kv(q, k, v, pos, kc, vc, beyond)
    # what a check would cost a sync for is skipped in the kernel: nothing past the cache is written (one pool holds
    # every layer's cache: a slot past one layer's is the next layer's first) and the slots in range still are
    for write in (
        lambda kc_, vc_: write_kv_cache(k, v, kc_, vc_, beyond),
        lambda kc_, vc_: rope_write_kv(q, k, v, pos, kc_, vc_, beyond),
    ):
        pool = torch.zeros(2, 2, *kc.shape, dtype=kc.dtype, device=kc.device)  # [layers, k/v, blocks, ...]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rotary, "INTERPRET", False)  # (the kernel as on a GPU, without the interpreter's host check)
            write(pool[0, 0], pool[0, 1])
        assert torch.all(pool[1] == 0), "a slot past the cache wrote into the next layer's"
        written = (pool[0].flatten(1, 2) != 0).any(-1).any(-1)  # [k/v, slots]
        want = torch.zeros_like(written)
        want[:, beyond[beyond >= 0][1:]] = True  # (the tokens in range; -1 skips)
        assert torch.equal(written, want)


def test_strided_views_of_a_fused_qkv():
    """q, k, v as column slices of one [N, (Hq + 2 Hkv) * D] projection; q rotated in place (q_out=q)."""
    n, hq, hkv, d = 3, 4, 2, 64
    qkv = torch.randn(n, (hq + 2 * hkv) * d)
    q = qkv[:, : hq * d].view(n, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    kc = torch.full((4, 16, hkv, d), float("nan"))
    vc = torch.full_like(kc, float("nan"))
    pos = torch.tensor([5, 0, 30])
    slots = torch.tensor([3, 17, 40])
    got = rope_write_kv(q, k, v, pos, kc, vc, slots, q_out=q)
    assert got.data_ptr() == q.data_ptr()
    torch.testing.assert_close(q, reference.apply_rotary(q0, pos), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc.view(-1, hkv, d)[slots], reference.apply_rotary(k0, pos), atol=1e-5, rtol=1e-5)
    assert torch.equal(vc.view(-1, hkv, d)[slots], v0) and torch.equal(k, k0)
    # Decode attention on the strided q view: all three tokens as one-token contexts of their own block.
    tables = (slots // 16).to(torch.int32)[:, None]
    lens = (slots % 16 + 1).to(torch.int32)
    kc.view(-1, hkv, d)[:] = kc.view(-1, hkv, d).nan_to_num(0.0)  # earlier slots of each block: zeros
    vc.view(-1, hkv, d)[:] = vc.view(-1, hkv, d).nan_to_num(0.0)
    got = paged_decode_attention(q, kc, vc, tables, lens)
    want = reference.paged_decode_attention(q.double(), kc.double(), vc.double(), tables, lens)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_cache_layout_and_dtype_errors():
    """Caches of two valid dtypes, or with a strided head dim, are refused by decode and by the writes."""
    q, kc, vc, bt, cl, _, _ = _paged_setup([20, 5], 4, 2, 64, 16, torch.float32, width_extra=0)
    with pytest.raises(ValueError, match="k_cache dtype torch.float32 != v_cache dtype torch.bfloat16"):
        paged_decode_attention(q, kc, vc.bfloat16(), bt, cl)
    strided = torch.zeros(*vc.shape[:-1], 2 * vc.shape[-1])[..., ::2]
    with pytest.raises(ValueError, match="v_cache must be contiguous in its last"):
        paged_decode_attention(q, kc, strided, bt, cl)
    _, k, v, kc, vc, slots = _write_setup(4, 4, 2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="v_cache dtype"):
        write_kv_cache(k, v, kc, vc.bfloat16(), slots)
    with pytest.raises(ValueError, match="k_cache must be contiguous in its last"):
        write_kv_cache(k, v, torch.zeros(*kc.shape[:-1], 2 * kc.shape[-1])[..., ::2], vc, slots)


def test_paged_decode_empty_batch_and_a_context_one_past_max_context_len():
    q, kc, vc, bt, cl, _, _ = _paged_setup([17, 5], 4, 2, 64, 16, torch.float32, width_extra=0)
    out = paged_decode_attention(q[:0], kc, vc, bt[:0], cl[:0])
    assert out.shape == (0, 4, 64)
    if not q.is_cuda:  # (the interpreter's host check)
        with pytest.raises(ValueError, match="context length 17 exceeds max_context_len 16"):
            paged_decode_attention(q, kc, vc, bt, cl, max_context_len=16)


def test_out_buffers_and_odd_head_dims_are_refused():
    q, kc, vc, bt, cl, _, _ = _paged_setup([20, 5], 4, 2, 64, 16, torch.float32, width_extra=0)
    for out in (torch.empty(q.shape, dtype=torch.bfloat16), torch.empty(2, 4, 128)[..., ::2]):
        with pytest.raises(ValueError, match="out must be"):
            paged_decode_attention(q, kc, vc, bt, cl, out=out)
    q, k, v, kc, vc, slots = _write_setup(4, 4, 2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="q_out must be"):
        rope_write_kv(q, k, v, torch.arange(4), kc, vc, slots, q_out=torch.empty(q.shape, dtype=torch.bfloat16))
    q, k, v, kc, vc, slots = _write_setup(4, 4, 2, 63, 16, torch.float32)
    with pytest.raises(ValueError, match="head dim 63 must be even"):
        rope_write_kv(q, k, v, torch.arange(4), kc, vc, slots)


def test_k_and_v_of_different_layouts_and_strided_positions():
    """v a strided view while k is contiguous (each read through its own strides); positions and q_out strided
    views: the same rotated q and cache contents as the reference path."""
    q, k, v, kc, vc, slots = _write_setup(9, 4, 2, 64, 8, torch.float32, num_blocks=4)
    v_strided = torch.stack([v, -v], 2).flatten(1, 2)[:, ::2]  # [N, Hkv, D], head stride 2*D
    assert v_strided.stride() != k.stride() and torch.equal(v_strided, v)
    pos = torch.randint(0, 300, (9,))
    pos_strided = torch.stack([pos, -pos], 1)[:, 0]
    kc2, vc2 = kc.clone(), vc.clone()
    q_out = torch.full((9, 4, 128), float("nan"))[..., :64]  # (a strided q_out, written through its strides)
    q_rot = rope_write_kv(q, k, v_strided, pos_strided, kc, vc, slots, q_out=q_out)
    assert q_rot is q_out
    with dispatch.reference_ops():
        want = rope_write_kv(q, k, v, pos, kc2, vc2, slots)
    torch.testing.assert_close(q_rot, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc, kc2, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(vc, vc2, atol=0, rtol=0, equal_nan=True)


def test_set_decode_config_reaches_every_launch_until_reset(monkeypatch):
    """set_decode_config's overrides go into every later launch (a per-call config still wins) until called with
    none; bad names and values are refused with the parameter named."""

    q, kc, vc, bt, cl, ks, vs = _paged_setup([40, 9], 4, 2, 64, 16, torch.float32)
    tiles, real = [], pa.choose_num_splits
    monkeypatch.setattr(
        pa, "choose_num_splits", lambda b, h, n, block_n, *a: tiles.append(block_n) or real(b, h, n, block_n, *a)
    )
    default = pa.decode_config(2, 64, 4)["block_n"]
    try:
        assert pa.set_decode_config(block_n=16, num_stages=1) == {"block_n": 16, "num_stages": 1}
        got = paged_decode_attention(q, kc, vc, bt, cl)
        paged_decode_attention(q, kc, vc, bt, cl, config={"block_n": 32})
    finally:
        assert pa.set_decode_config() == {}
    paged_decode_attention(q, kc, vc, bt, cl)
    assert tiles == [16, 32, default] and default != 16
    torch.testing.assert_close(got.double(), _expected(q, ks, vs), atol=2e-5, rtol=2e-5)
    for bad, match in (({"block_m": 64}, "unknown decode launch parameter"), ({"block_n": 48}, "power of two"),
                       ({"num_warps": 0}, "positive int"), ({"num_stages": 2.0}, "positive int")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            pa.set_decode_config(**bad)
    assert pa._overrides == {}


# ------------------------------------------------------------------- the fused decode step (rotary, write, attention)


def _decode_step_setup(ctx_lens, hq, hkv, d, block_size, dtype, cache_dtype=None):
    """A decode step: each sequence has ctx - 1 tokens cached (random blocks of a NaN-poisoned pool) and a new token
    (unrotated q, k, v) at position ctx - 1, whose slot lies in its table (a fresh block where it starts one).
    A context of 0 is a CUDA graph's padding row: slot -1. Returns q, k, v, positions, slots, caches, tables,
    lengths and the cached tokens' k, v in float64 as the cache holds them."""
    cache_dtype = cache_dtype or dtype
    cached = [max(n - 1, 0) for n in ctx_lens]
    q_, kc, vc, bt, _, ks, vs = _paged_setup(cached, hq, hkv, d, block_size, dtype, spare_blocks=len(ctx_lens) + 2,
                                             width_extra=1, cache_dtype=cache_dtype)  # fmt: skip
    held = {int(blk) for i, n in enumerate(cached) for blk in bt[i, : -(-n // block_size)]}
    spare = [blk for blk in range(kc.shape[0]) if blk not in held]
    slots = torch.full((len(ctx_lens),), -1, dtype=torch.int64)
    for i, n in enumerate(ctx_lens):
        if n == 0:
            continue
        pos = n - 1
        if pos % block_size == 0:  # the new token opens a block
            bt[i, pos // block_size] = spare.pop()
        slots[i] = int(bt[i, pos // block_size]) * block_size + pos % block_size
    b = len(ctx_lens)
    q = torch.randn(b, hq, d, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, d, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, d, dtype=torch.float64).to(dtype)
    positions = (torch.tensor(ctx_lens) - 1).clamp(min=0)
    return q, k, v, positions, slots, kc, vc, bt, torch.tensor(ctx_lens, dtype=torch.int32), ks, vs


def _expected_step(q, k, v, positions, ctx_lens, ks, vs, cache_dtype):
    """Float64 rotary of q and the new k (k and v as the cache will hold them), appended to each context (none to a
    padding row's), then attention."""
    q_rot = reference.apply_rotary(q.double(), positions)
    k_rot = reference.to_cache_dtype(reference.apply_rotary(k.double(), positions).float(), cache_dtype).double()
    v_new = reference.to_cache_dtype(v.float(), cache_dtype).double()
    ks = [torch.cat([kk, k_rot[i : i + 1]]) if ctx_lens[i] else kk for i, kk in enumerate(ks)]
    vs = [torch.cat([vv, v_new[i : i + 1]]) if ctx_lens[i] else vv for i, vv in enumerate(vs)]
    return _expected(q_rot, ks, vs)


FUSED = {"fuse_rope": 1}  # (decode_config's default, 0, runs rope_write_kv's kernel and then the decode kernel)
STEP_CASES = [
    # (hq, hkv, d, block_size, dtype, cache dtype, num_splits)
    (4, 4, 64, 16, torch.float32, None, None),  # MHA
    (8, 2, 64, 32, torch.float32, None, 3),  # GQA 4, the new token in the last of 3 splits
    (8, 1, 128, 16, torch.bfloat16, None, None),  # GQA 8, D 128
    (4, 4, 128, 32, torch.bfloat16, None, 4),
    (8, 2, 128, 16, torch.float16, None, 2),
    (4, 2, 80, 16, torch.float32, None, 2),  # head dim not a power of two: masked D, half dim 40
    (8, 2, 64, 16, torch.bfloat16, torch.float8_e4m3fn, 2),  # an fp8 cache: the new token as fp8 holds it
]


@pytest.mark.parametrize("hq,hkv,d,block_size,dtype,cache_dtype,num_splits", STEP_CASES)
def test_rope_decode_attention_is_rotary_write_then_attention(hq, hkv, d, block_size, dtype, cache_dtype, num_splits):
    """The fused step against float64 (rotary, then attention over the context with the new token appended), and
    against the two kernels it replaces (rope_write_kv, then paged_decode_attention): the same output and the very
    same cache bytes (a key written by either kernel is the same key), the padding row's slot -1 unwritten."""
    if cache_dtype == FP8 and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8")
    # contexts: the new token alone, a full block, one opening a block, 17, several tiles, a padding row
    ctx_lens = [1, block_size, block_size + 1, 17, 5 * 64 + 3, 0]
    q, k, v, pos, slots, kc, vc, bt, cl, ks, vs = _decode_step_setup(ctx_lens, hq, hkv, d, block_size, dtype,
                                                                     cache_dtype)  # fmt: skip
    kc2, vc2 = kc.clone(), vc.clone()
    out = torch.full_like(q, float("nan"))
    got = pa.rope_decode_attention(q, k, v, pos, kc, vc, slots, bt, cl, out=out, num_splits=num_splits, config=FUSED)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    want = _expected_step(q, k, v, pos, ctx_lens, ks, vs, cache_dtype or dtype)
    atol, rtol = TOLS[dtype] if cache_dtype is None else (3e-2, 3e-2)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))  # the padding row: zeros
    # the two kernels it fuses
    q_two = rope_write_kv(q, k, v, pos, kc2, vc2, slots)
    two = paged_decode_attention(q_two, kc2, vc2, bt, cl, num_splits=num_splits)
    torch.testing.assert_close(got, two, atol=atol, rtol=rtol)
    for fused, twice in ((kc, kc2), (vc, vc2)):  # the same fmas (rotary.rotate_pair): the same bits on a GPU too
        assert torch.equal(fused.view(torch.uint8), twice.view(torch.uint8))


def test_rope_decode_attention_at_large_positions_and_scaled_rope():
    """Angles reduced as rotary.py reduces them (positions far from the context length, as the kernel allows), a
    Llama-3 scaled rope's frequencies, and the decode config's fuse_rope 0 (the two kernels) giving the same."""
    rope = reference.Rope(500000.0, "llama3", 8.0, 1.0, 4.0, 8192)
    q, k, v, _, slots, kc, vc, bt, cl, ks, vs = _decode_step_setup([5, 40], 4, 2, 64, 16, torch.float32)
    pos = torch.tensor([70000, 123456])
    kc2, vc2 = kc.clone(), vc.clone()
    got = pa.rope_decode_attention(q, k, v, pos, kc, vc, slots, bt, cl, rope_theta=rope, config=FUSED)
    q_rot = reference.apply_rotary(q.double(), pos, rope)
    k_rot = reference.apply_rotary(k.double(), pos, rope)
    ks = [torch.cat([kk, k_rot[i : i + 1]]) for i, kk in enumerate(ks)]
    vs = [torch.cat([vv, v[i : i + 1].double()]) for i, vv in enumerate(vs)]
    # fp32 angles at positions ~1e5 carry ~1e-2 rad of rounding (HF's own fp32 formula does too)
    torch.testing.assert_close(got.double(), _expected(q_rot, ks, vs), atol=3e-2, rtol=3e-2)
    two = pa.rope_decode_attention(q, k, v, pos, kc2, vc2, slots, bt, cl, rope_theta=rope, config={"fuse_rope": 0})
    torch.testing.assert_close(got, two, atol=2e-5, rtol=2e-5)
    assert torch.equal(kc.view(torch.int32), kc2.view(torch.int32))  # bit for bit (NaN poison included)


def test_rope_decode_attention_reference_path_and_errors():
    """On CPU without the interpreter (reference ops) the same step; bad inputs are refused with their names."""
    q, k, v, pos, slots, kc, vc, bt, cl, ks, vs = _decode_step_setup([3, 20, 0], 8, 2, 64, 16, torch.float32)
    kc2, vc2 = kc.clone(), vc.clone()
    got = pa.rope_decode_attention(q, k, v, pos, kc, vc, slots, bt, cl, config=FUSED)
    with dispatch.reference_ops():
        ref = pa.rope_decode_attention(q, k, v, pos, kc2, vc2, slots, bt, cl)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kc, kc2, atol=1e-6, rtol=1e-6, equal_nan=True)
    args = (q, k, v, pos, kc, vc, slots, bt, cl)
    for i, bad, match in ((3, pos[:2], "positions must be"), (1, k[:, :1], "k must be"), (6, slots[:2], "slot_mapping"),
                          (8, cl[:2], "context_lens"), (0, q[:, :3], "not a multiple"),
                          (5, vc[:, :, :1], "shape")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            pa.rope_decode_attention(*args[:i], bad, *args[i + 1 :])
    if dispatch.INTERPRET:  # (a host sync: checked in the interpreter and the reference, not on a GPU)
        with pytest.raises(IndexError, match="outside the KV cache"):
            pa.rope_decode_attention(*args[:6], torch.tensor([0, 1, kc.shape[0] * 16]), *args[7:])
    with pytest.raises(ValueError, match="fuse_rope must be 0 or 1"):
        pa.set_decode_config(fuse_rope=2)


def test_rope_decode_attention_runs_the_two_kernels_unless_fuse_rope(monkeypatch):
    """decode_config's fuse_rope 0 (the default: measured faster in the rollouts) launches the rotary/write kernel
    and then the plain decode kernel; fuse_rope 1 (per call or set_decode_config) one fused launch; same result."""
    launches = []
    real_rotary, real_decode = pa.launch_rotary, pa._decode_launch
    monkeypatch.setattr(pa, "launch_rotary", lambda *a, **k: launches.append("rotary") or real_rotary(*a, **k))
    monkeypatch.setattr(
        pa, "_decode_launch", lambda *a, **k: launches.append(("decode", k.get("new_kv") is not None)) or real_decode(
            *a, **k)
    )  # fmt: skip
    assert pa.decode_config(1, 64, 4)["fuse_rope"] == 0
    q, k, v, pos, slots, kc, vc, bt, cl, ks, vs = _decode_step_setup([7, 30], 4, 4, 64, 16, torch.float32)
    outs = [pa.rope_decode_attention(q, k, v, pos, kc.clone(), vc.clone(), slots, bt, cl)]
    outs.append(pa.rope_decode_attention(q, k, v, pos, kc.clone(), vc.clone(), slots, bt, cl, config=FUSED))
    try:
        pa.set_decode_config(fuse_rope=1)
        outs.append(pa.rope_decode_attention(q, k, v, pos, kc.clone(), vc.clone(), slots, bt, cl))
    finally:
        pa.set_decode_config()
    assert launches == ["rotary", ("decode", False), ("decode", True), ("decode", True)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-5, rtol=2e-5)


def test_min_split_tokens_sets_the_split_count_and_not_the_result(monkeypatch):
    """The decode config's min_split_tokens reaches choose_num_splits (per call and through set_decode_config): the
    same attention over 1 split or several, and the default 256 when not given."""
    q, kc, vc, bt, cl, ks, vs = _paged_setup([300, 41], 4, 2, 64, 16, torch.float32)
    seen, real = [], pa.choose_num_splits
    monkeypatch.setattr(pa, "choose_num_splits", lambda *a: seen.append(a[5]) or real(*a))
    outs = [paged_decode_attention(q, kc, vc, bt, cl, config={"min_split_tokens": t}) for t in (64, 4096)]
    try:
        pa.set_decode_config(min_split_tokens=128)
        outs.append(paged_decode_attention(q, kc, vc, bt, cl))
    finally:
        pa.set_decode_config()
    outs.append(paged_decode_attention(q, kc, vc, bt, cl))
    assert seen == [64, 4096, 128, 256]
    assert real(2, 2, bt.shape[1] * 16, 64, 4, 64) > 1 == real(2, 2, bt.shape[1] * 16, 64, 4, 4096)
    for o in outs:
        torch.testing.assert_close(o.double(), _expected(q, ks, vs), atol=2e-5, rtol=2e-5)
