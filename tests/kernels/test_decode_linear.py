"""kernels/decode_linear.py: the decode step's projections (split-K in one launch, SwiGLU fused) against float64, the
two-kernel path (projection, then kernels/swiglu.py) bit for bit, and the engine's dispatch."""

import pytest
import torch
import torch.nn.functional as F

from kernels import decode_linear as dl
from kernels.decode_config import check_decode_config, set_decode_config
from kernels.swiglu import swiglu

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def _inputs(m, n, k, dtype, swiglu_=False):
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(2 * n if swiglu_ else n, k) / k**0.5).to(dtype)
    return x, w


def _oracle(x, w, dtype, swiglu_=False):
    """float64 products rounded to the output dtype once (and, with swiglu, HF's rounding of gate, up and silu)."""
    y = x.double() @ w.double().T
    if not swiglu_:
        return y
    g, u = (t.to(dtype).double() for t in y.chunk(2, -1))
    return F.silu(g).to(dtype).double() * u


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "m,n,k,split,swiglu_",
    [
        (1, 80, 72, None, False),  # batch 1, K under one step
        (7, 100, 130, 1, False),  # neither N nor K a multiple of the tiles
        (64, 64, 256, 2, False),  # a full decode batch, even tiles, split K
        (5, 48, 300, 3, False),  # three splits, the last one short
        (3, 40, 200, None, True),  # SwiGLU, ragged
        (64, 64, 256, 4, True),  # SwiGLU split four ways
        (2, 16, 33, 8, False),  # more splits asked than K steps: fewer made, none empty
    ],
)
def test_decode_linear_matches_float64(dtype, m, n, k, split, swiglu_):
    x, w = _inputs(m, n, k, dtype, swiglu_)
    x[:, 5 % k] = 0.0
    y = dl.decode_linear(x, w, swiglu=swiglu_, config=None if split is None else {"split_k": split})
    assert y.shape == (m, n) and y.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), _oracle(x, w, dtype, swiglu_), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_epilogue_equals_projection_then_swiglu_kernel(dtype):
    """The fused epilogue rounds exactly as the projection's output followed by kernels/swiglu.py: the same bits (gate
    and up projected apart, so that each column meets the same tiles as in the fused launch)."""
    x, w = _inputs(9, 72, 160, dtype, swiglu_=True)
    for split in (1, 3):
        cfg = {"split_k": split}
        fused = dl.decode_linear(x, w, swiglu=True, config=cfg)
        two = swiglu(torch.cat([dl.decode_linear(x, w[:72], config=cfg), dl.decode_linear(x, w[72:], config=cfg)], 1))
        assert torch.equal(fused, two), (split, (fused.double() - two.double()).abs().max())


def test_split_k_sums_in_one_launch_and_leaves_the_counters_at_zero():
    """The split partials summed by the last program: the same result every launch (bits), within fp32 rounding of
    the unsplit one, and every arrival counter back at zero (a CUDA graph replays the launch as captured)."""
    x, w = _inputs(4, 96, 512, torch.float32)
    whole = dl.decode_linear(x, w, config={"split_k": 1})
    first = dl.decode_linear(x, w, config={"split_k": 4})
    again = dl.decode_linear(x, w, config={"split_k": 4})
    assert torch.equal(first, again)
    torch.testing.assert_close(first, whole, atol=1e-5, rtol=1e-5)
    _, counters = dl._SCRATCH[x.device]
    assert int(counters.abs().sum()) == 0
    # a launch wanting more scratch grows it, keeping the old buffers (a captured CUDA graph still uses them)
    ws, _ = dl._SCRATCH[x.device]
    xb, wb = _inputs(64, 64 * 20, 256, torch.float32)
    dl.decode_linear(xb, wb, config={"split_k": 16, "block_n": 64, "block_k": 16})  # 16 x 20 x 64 x 64 partials > 2^20
    assert dl._SCRATCH[x.device][0].numel() > ws.numel() and any(t is ws for t in dl._RETIRED)
    # another shape right after, on the same scratch: nothing left over from the last launch
    x2, w2 = _inputs(2, 40, 700, torch.float32)
    torch.testing.assert_close(dl.decode_linear(x2, w2, config={"split_k": 3}).double(), _oracle(x2, w2, None),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_linear_config_splits_only_short_grids():
    """K is split while the column blocks alone leave the GPU under two programs an SM, no split under 1024 deep;
    splits are whole K steps and never empty."""
    h200 = 132
    assert dl.linear_config(64, 15360, 5120, False, h200)["split_k"] == 1  # QKV: 240 blocks
    assert dl.linear_config(64, 5120, 5120, False, h200)["split_k"] == 2  # output projection: 80 blocks
    assert dl.linear_config(64, 5120, 13824, False, h200)["split_k"] == 2  # down projection
    assert dl.linear_config(1, 640, 5120, False, h200)["split_k"] == 4  # a TP shard's 10 blocks, depth 1280 each
    assert dl.linear_config(1, 64, 512, False, h200)["split_k"] == 1  # too shallow to split
    # 64-wide K steps from 32 rows (two or three programs an SM), 128 below; asked for, as asked
    assert dl.linear_config(64, 5120, 5120, False, h200)["block_k"] == 64
    assert dl.linear_config(8, 5120, 5120, False, h200)["block_k"] == 128
    assert dl.linear_config(64, 5120, 5120, False, h200, {"block_k": 256})["block_k"] == 256
    # 8 warps for a 64 x 128 accumulator (the QKV heads' epilogue spilled at 4), 4 otherwise unless asked
    assert dl.linear_config(64, 15360, 5120, False, h200, {"block_n": 128})["num_warps"] == 8
    assert dl.linear_config(1, 15360, 5120, False, h200, {"block_n": 128})["num_warps"] == 4
    assert dl.linear_config(64, 15360, 5120, False, h200, {"block_n": 128, "num_warps": 4})["num_warps"] == 4
    cfg = dl.linear_config(1, 64, 1000, False, h200, {"split_k": 3, "block_k": 128})
    assert cfg["k_per_split"] % 128 == 0 and cfg["split_k"] * cfg["k_per_split"] >= 1000
    assert (cfg["split_k"] - 1) * cfg["k_per_split"] < 1000


def test_bad_inputs_name_the_problem():
    x, w = _inputs(3, 32, 64, torch.float32)
    with pytest.raises(ValueError, match="at most 64 rows"):
        dl.decode_linear(torch.randn(65, 64), w)
    with pytest.raises(ValueError, match="x has 63 features, the weight 64"):
        dl.decode_linear(torch.randn(3, 63), w)
    with pytest.raises(ValueError, match="one float dtype"):
        dl.decode_linear(x.to(torch.bfloat16), w)
    with pytest.raises(ValueError, match="even number of rows"):
        dl.decode_linear(x, torch.randn(33, 64), swiglu=True)
    with pytest.raises(ValueError, match="rows contiguous"):
        dl.decode_linear(x, torch.randn(64, 32).T)
    with pytest.raises(ValueError, match="unknown decode_linear launch parameter"):
        dl.decode_linear(x, w, config={"block_m": 16})
    with pytest.raises(ValueError, match="block_n must be a positive power of two"):
        dl.decode_linear(x, w, config={"block_n": 48})
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        dl.decode_linear(x, w, config={"split_k": 0})
    with pytest.raises(ValueError, match="linear must be 0 or 1"):
        check_decode_config({"linear": 2})
    with pytest.raises(ValueError, match="norm_rows must be an int from 0 to 64"):
        check_decode_config({"norm_rows": 65})
    check_decode_config({"norm_rows": 0})  # (never: allowed)


def test_linear_dispatch_follows_the_switch(monkeypatch):
    """linear / swiglu_linear: F.linear (and None) unless decode_config's `linear` is 1; then the kernel for a decode
    batch without autograd, never for more rows, a different dtype, or anything autograd records."""
    calls = []
    real = dl.decode_linear
    monkeypatch.setattr(dl, "decode_linear", lambda *a, **kw: calls.append(kw.get("swiglu", False)) or real(*a, **kw))
    x, w = torch.randn(2, 3, 64), torch.randn(32, 64)
    assert torch.equal(dl.linear(x, w), F.linear(x, w)) and dl.swiglu_linear(x, w) is None and not calls
    try:
        set_decode_config(linear=1)
        torch.testing.assert_close(dl.linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)  # [2, 3, 64]: 6 rows
        act = dl.swiglu_linear(x, w)
        torch.testing.assert_close(act, swiglu(F.linear(x, w)), atol=1e-5, rtol=1e-5)
        assert calls == [False, True] and act.shape == (2, 3, 16)
        dl.linear(torch.randn(65, 64), w)  # a prefill's rows
        dl.linear(x.double(), w.double())  # a dtype the kernel does not take
        dl.linear(x, w.requires_grad_())  # a training forward
        assert len(calls) == 2
        with torch.no_grad():
            dl.linear(x, w)  # the same weight under no_grad: a decode step
        assert len(calls) == 3
    finally:
        set_decode_config()


def _qkv_case(m, hq, hkv, d, dtype, cache_dtype, k=96, blocks=6, block_size=4):
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn((hq + 2 * hkv) * d, k) / k**0.5).to(dtype)
    kc = torch.full((blocks, block_size, hkv, d), float("nan")).to(cache_dtype)
    vc = torch.full_like(kc, float("nan"))
    slots = torch.randperm(blocks * block_size)[:m]
    slots[m // 2] = -1  # a padding row: nothing written
    positions = torch.randint(0, 5000, (m,))
    return x, w, kc, vc, slots, positions


@pytest.mark.parametrize(
    "m,hq,hkv,d,dtype,cache_dtype,split",
    [
        (5, 4, 4, 16, torch.float32, torch.float32, 1),  # MHA, the tiny model's head dim
        (7, 8, 2, 64, torch.bfloat16, torch.bfloat16, 2),  # GQA, split K
        (3, 2, 1, 128, torch.float16, torch.float16, 3),  # MQA, Llama's head dim, three splits
        (6, 4, 2, 32, torch.bfloat16, torch.float8_e4m3fn, 1),  # an fp8 cache: rotated, then saturated to e4m3
    ],
)
def test_qkv_rope_linear_writes_what_projection_then_rotary_writes(m, hq, hkv, d, dtype, cache_dtype, split):
    """The QKV projection with the rotary and cache write in its epilogue: q and the cache bytes are the very bits of
    the projection (the same tiles: a head a column block) followed by kernels.paged_attention.rope_write_kv, padding
    rows write nothing; and within rounding of float64."""
    from kernels import reference
    from kernels.paged_attention import rope_write_kv

    x, w, kc, vc, slots, positions = _qkv_case(m, hq, hkv, d, dtype, cache_dtype)
    cfg = {"split_k": split}
    kc2, vc2 = kc.clone(), vc.clone()
    q = dl.qkv_rope_linear(x, w, positions, kc, vc, slots, num_heads=hq, config=cfg)
    assert q.shape == (m, hq, d) and q.dtype == dtype
    qkv = dl.decode_linear(x, w, config={**cfg, "block_n": d})
    qq, kk, vv = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q2 = rope_write_kv(qq.reshape(m, hq, d), kk.reshape(m, hkv, d), vv.reshape(m, hkv, d), positions, kc2, vc2, slots)
    assert torch.equal(q, q2)
    for a, b in ((kc, kc2), (vc, vc2)):  # (NaN where nothing was written: compare the bytes)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    written = kc.float().isnan().logical_not().any(-1).any(-1).flatten().nonzero().flatten()
    assert sorted(written.tolist()) == sorted(s for s in slots.tolist() if s >= 0)
    # float64: the projection, the rotation, the cache (one rounding to its dtype away)
    q64, k64, v64 = (x.double() @ w.double().T).split([hq * d, hkv * d, hkv * d], -1)
    kc64, vc64 = torch.zeros(kc.shape, dtype=torch.float64), torch.zeros(vc.shape, dtype=torch.float64)
    q_ref = reference.rope_write_kv(q64.reshape(m, hq, d), k64.reshape(m, hkv, d), v64.reshape(m, hkv, d), positions,
                                    kc64, vc64, slots)  # fmt: skip
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q.double(), q_ref, **tol)
    ok = slots[slots >= 0]
    tol = dict(atol=0.1, rtol=0.07) if cache_dtype == torch.float8_e4m3fn else tol
    for cache, ref in ((kc, kc64), (vc, vc64)):
        torch.testing.assert_close(cache.flatten(0, 1)[ok].double(), ref.flatten(0, 1)[ok], **tol)


def test_qkv_rope_linear_refuses_what_it_cannot_do():
    x, w, kc, vc, slots, positions = _qkv_case(3, 4, 2, 16, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="4 query and 2 key/value heads of 16 has 128 rows, got 112"):
        dl.qkv_rope_linear(x, w[:112], positions, kc, vc, slots, num_heads=4)
    with pytest.raises(ValueError, match="positions must be \\[M=3\\]"):
        dl.qkv_rope_linear(x, w, positions[:2], kc, vc, slots, num_heads=4)
    with pytest.raises(ValueError, match="slot_mapping must be \\[M=3\\] int32 or int64"):
        dl.qkv_rope_linear(x, w, positions, kc, vc, slots.float(), num_heads=4)
    with pytest.raises(ValueError, match="block_n must be 16"):
        dl.qkv_rope_linear(x, w, positions, kc, vc, slots, num_heads=4, config={"block_n": 32})
    with pytest.raises(ValueError, match="power-of-two head dim"):
        kc24 = torch.zeros(6, 4, 2, 24)
        dl.qkv_rope_linear(x, torch.randn(8 * 24, 96), positions, kc24, kc24.clone(), slots, num_heads=4)
    with pytest.raises(IndexError, match="outside the KV cache's 24 slots"):
        dl.qkv_rope_linear(x, w, positions, kc, vc, torch.tensor([0, 1, 24]), num_heads=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("swiglu_,split,with_delta", [(False, 1, True), (True, 3, True), (False, 2, False)])
def test_norm_prologue_equals_add_rms_norm_then_the_projection(dtype, swiglu_, split, with_delta):
    """norm=(delta, gamma, eps): the decoder layer's add and RMSNorm in the projection's prologue. The stream after the
    add is stored whole (every K split writes its range) and bit for bit torch's add; the product within rounding of
    kernels/rmsnorm.py's add_rms_norm followed by the plain projection (its row sums may round one ulp apart)."""
    from kernels.rmsnorm import add_rms_norm, rms_norm

    m, n, k = 5, 40, 300
    x, w = _inputs(m, n, k, dtype, swiglu_)
    delta = torch.randn(m, k).to(dtype) if with_delta else None
    gamma = (1 + 0.3 * torch.randn(k)).to(dtype)
    cfg = {"split_k": split}
    y, h = dl.decode_linear(x, w, swiglu=swiglu_, norm=(delta, gamma, 1e-5), config=cfg)
    normed, h_ref = add_rms_norm(x, delta, gamma, 1e-5) if with_delta else (rms_norm(x, gamma, 1e-5), x)
    assert torch.equal(h, h_ref) and (h is x) == (not with_delta)
    two = dl.decode_linear(normed, w, swiglu=swiglu_, config=cfg)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, two, atol=2 * atol, rtol=2 * rtol)
    # and against float64: the norm, the product (and HF's SwiGLU rounding) computed from the rounded stream
    h64 = h_ref.double()
    n64 = (h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-5)) * gamma.double()
    torch.testing.assert_close(y.double(), _oracle(n64, w, dtype, swiglu_), atol=4 * atol, rtol=4 * rtol)


def test_qkv_rope_linear_with_the_norm_prologue():
    """The input norm, the QKV projection, the rotary and the cache write in one launch: the same as add_rms_norm
    then qkv_rope_linear within rounding; the stream after the add stored."""
    from kernels.rmsnorm import add_rms_norm

    x, w, kc, vc, slots, positions = _qkv_case(6, 4, 2, 32, torch.float32, torch.float32)
    delta, gamma = torch.randn_like(x), 1 + 0.3 * torch.randn(x.shape[1])
    kc2, vc2 = kc.clone(), vc.clone()
    q, h = dl.qkv_rope_linear(x, w, positions, kc, vc, slots, num_heads=4, norm=(delta, gamma, 1e-6),
                              config={"split_k": 2})  # fmt: skip
    normed, h_ref = add_rms_norm(x, delta, gamma, 1e-6)
    q2 = dl.qkv_rope_linear(normed, w, positions, kc2, vc2, slots, num_heads=4)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(q, q2, atol=1e-5, rtol=1e-5)
    ok = slots[slots >= 0]
    for a, b in ((kc, kc2), (vc, vc2)):
        torch.testing.assert_close(a.flatten(0, 1)[ok], b.flatten(0, 1)[ok], atol=1e-5, rtol=1e-5)


def test_norm_refuses_what_does_not_match_the_stream():
    x, w = _inputs(3, 32, 64, torch.float32)
    with pytest.raises(ValueError, match="delta must match the stream x \\(3, 64\\)"):
        dl.decode_linear(x, w, norm=(torch.randn(3, 63), torch.ones(64), 1e-5))
    with pytest.raises(ValueError, match="gamma must be \\[K=64\\] floats"):
        dl.decode_linear(x, w, norm=(None, torch.ones(32), 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [1, 3])
def test_residual_epilogue_and_its_row_squares_feed_the_next_norm(dtype, split):
    """residual=r: the stream after the add (torch's add of the rounded product: the very bits) and the rows' sums of
    squares in column-block parts; the next projection's norm=(RowSquares, gamma, eps) normalises that stream from
    them: within rounding of kernels/rmsnorm.py's rms_norm followed by the plain projection (reference path too)."""
    from kernels.dispatch import reference_ops
    from kernels.rmsnorm import rms_norm

    m, k, hidden = 6, 200, 72
    x, w = _inputs(m, hidden, k, dtype)
    r = torch.randn(m, hidden).to(dtype)
    cfg = {"split_k": split, "block_n": 16}
    after, sq = dl.decode_linear(x, w, residual=r, config=cfg)
    assert torch.equal(after, r + dl.decode_linear(x, w, config=cfg))
    assert sq.parts.shape == (5, m) and sq.parts.dtype == torch.float32  # 72 columns in blocks of 16
    torch.testing.assert_close(sq.parts.sum(0), after.float().pow(2).sum(-1), rtol=1e-5, atol=1e-5)
    gamma = (1 + 0.3 * torch.randn(hidden)).to(dtype)
    w2 = (torch.randn(2 * 40, hidden) / hidden**0.5).to(dtype)
    y, h = dl.decode_linear(after, w2, swiglu=True, norm=(sq, gamma, 1e-5), config={"split_k": split})
    assert h is after
    two = dl.decode_linear(rms_norm(after, gamma, 1e-5), w2, swiglu=True, config={"split_k": split})
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, two, atol=2 * atol, rtol=2 * rtol)
    with reference_ops():  # (the reference path: the same stream; its own one-part row sums)
        ref_after, ref_sq = dl.decode_linear(x, w, residual=r)
        ref_y, _ = dl.decode_linear(ref_after, w2, swiglu=True, norm=(ref_sq, gamma, 1e-5))
    torch.testing.assert_close(ref_after, after, atol=atol, rtol=rtol)
    assert ref_sq.parts.shape == (1, m)
    torch.testing.assert_close(ref_y, y, atol=2 * atol, rtol=2 * rtol)


def test_residual_and_row_squares_refuse_what_does_not_fit():
    x, w = _inputs(3, 32, 64, torch.float32)
    with pytest.raises(ValueError, match="does not combine with swiglu or norm"):
        dl.decode_linear(x, w, swiglu=True, residual=torch.randn(3, 16))
    with pytest.raises(ValueError, match="residual must be \\[M=3, N=32\\]"):
        dl.decode_linear(x, w, residual=torch.randn(3, 31))
    with pytest.raises(ValueError, match="RowSquares must be \\[blocks, M=3\\] float32"):
        dl.decode_linear(x, w, norm=(dl.RowSquares(torch.zeros(2, 4)), torch.ones(64), 1e-5))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs an sm_90+ GPU"
)
def test_pdl_chain_replayed_in_a_cuda_graph_gives_the_same_bits():
    """Three dependent projections (each reads the one before; split K, so the arrival counters are shared between
    launches) captured in a CUDA graph with programmatic dependent launch and without: every replay gives the same
    bits, which are the eager launches' (a kernel that ran ahead of its input, or of the previous launch's counter
    reset, would not)."""
    torch.manual_seed(1)
    x = torch.randn(64, 4096, dtype=torch.bfloat16)
    ws = [torch.randn(n, 4096, dtype=torch.bfloat16) / 64 for n in (4096, 4096, 256)]

    def chain():
        h = x
        for w in ws:
            h = dl.decode_linear(h, w)
        return h

    outs = {}
    for pdl in (0, 1):
        set_decode_config(pdl=pdl)
        try:
            want = chain()  # (compiles; eager)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = chain()
            for _ in range(3):
                got.zero_()
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(got, want), f"pdl {pdl}"
            outs[pdl] = got.clone()
        finally:
            set_decode_config()
    assert torch.equal(outs[0], outs[1])
