"""kernels.rope_attention against kernels/reference.py in float64 (Triton interpreter on CPU)."""

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch

from kernels import dispatch, reference
from kernels.rope_attention import _rope_attention_fwd, rope_attention
from kernels.rope_attention_bwd import _rope_attention_bwd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# lengths 1 and 17 (odd), 64 (ends exactly on a block edge: interpreter blocks are 32/16), 129 (one past)
LENGTHS = [1, 17, 64, 129]
TOLS = {
    torch.float32: dict(atol=5e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),  # grads ~3 in size: bf16 rounding alone is ~1e-2
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}


def _pack(lengths, start=37):
    """cu_seqlens int32 [S+1] and positions [N] int64 (each sequence counts up from `start`)."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    positions = torch.cat([torch.arange(start, start + n) for n in lengths]) if sum(lengths) else torch.zeros(0)
    return cu, positions.long()


def _inputs(n, hq, hkv, d, dtype):
    q = torch.randn(n, hq, d).to(dtype)
    k = torch.randn(n, hkv, d).to(dtype)
    v = torch.randn(n, hkv, d).to(dtype)
    return q, k, v


def _reference(q, k, v, positions, cu, theta, do=None):
    """float64 output, lse [Hq, N] (natural log of the scaled scores) and, given do, grads of q, k, v."""
    q64, k64, v64 = (x.detach().double().requires_grad_(do is not None) for x in (q, k, v))
    out = reference.rope_attention(q64, k64, v64, positions, cu, rope_theta=theta)
    # logsumexp rows, from the rotated inputs, for the saved statistic
    qr = reference.apply_rotary(q64.detach(), positions, theta)
    kr = reference.apply_rotary(k64.detach(), positions, theta)
    group = q.shape[1] // k.shape[1]
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float64)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e == s:
            continue
        scores = torch.einsum("mhd,nhd->hmn", qr[s:e], kr[s:e].repeat_interleave(group, 1)) / math.sqrt(q.shape[2])
        causal = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        lse[:, s:e] = scores.masked_fill(~causal, float("-inf")).logsumexp(-1)
    grads = None
    if do is not None:
        out.backward(do.double())
        grads = (q64.grad, k64.grad, v64.grad)
    return out.detach(), lse, grads


def _close(actual, expected, dtype, name):
    torch.testing.assert_close(actual.double(), expected, **TOLS[dtype], msg=lambda m: f"{name}: {m}")


# variants by an explicit config's key: "prepass" (rope_attention.Q_PREPASS: q rotated by the pre-pass, loaded as it
# is) and "atomic tma" / "atomic ptr" (rope_attention_bwd.DQ_ATOMIC: no dq kernel, dq's shares added by the dk/dv
# kernel into an fp32 sum, by bulk reduce through a tensor descriptor or by atomics of the rows that exist, then
# scaled and rotated back by a finishing pass whose tiles span sequences), "warp spec" (rope_attention.WARP_SPEC and
# rope_attention_bwd.WARP_SPEC: each of the three kernels' one masked loop, the outer tiles by tensor descriptor,
# programs past the last block store nothing, dk and dq rotated back by the finishing pass, dq's lse and delta from
# the delta kernel's copy laid out by query block)
@pytest.mark.parametrize(
    "dtype,hq,hkv,d,theta,variant",
    [
        (torch.float32, 4, 2, 64, 10000.0, ""),
        (torch.float32, 2, 2, 128, 500000.0, ""),
        (torch.bfloat16, 4, 2, 128, 10000.0, ""),
        (torch.bfloat16, 2, 2, 64, 500000.0, ""),
        (torch.float16, 4, 1, 64, 10000.0, ""),
        (torch.float32, 4, 2, 64, reference.Rope(10000.0, "llama3", 8.0, 1.0, 4.0, 64), ""),  # Llama 3.1's scaling
        (torch.bfloat16, 4, 2, 128, 10000.0, "prepass"),
        (torch.float16, 4, 1, 64, 10000.0, "prepass"),
        (torch.float32, 2, 2, 16, 10000.0, "prepass"),  # (padded head-dim halves)
        (torch.bfloat16, 4, 2, 128, 10000.0, "atomic tma"),
        (torch.float32, 4, 1, 64, 10000.0, "atomic ptr"),
        (torch.float16, 2, 2, 16, 10000.0, "atomic ptr"),  # (padded halves: two adds a tile)
        (torch.float32, 2, 2, 32, 10000.0, "atomic tma"),
        (torch.bfloat16, 4, 2, 128, 10000.0, "warp spec"),
        (torch.float16, 4, 1, 64, 500000.0, "warp spec"),
        (torch.float32, 2, 2, 32, 10000.0, "warp spec"),
        (torch.float16, 4, 1, 64, 500000.0, "warp spec bounded"),
        (torch.bfloat16, 4, 2, 128, 10000.0, "gluon"),
        (torch.float16, 4, 1, 64, 500000.0, "gluon"),
        (torch.bfloat16, 2, 2, 128, 10000.0, "gluon 64x3"),
        (torch.bfloat16, 4, 2, 128, 10000.0, "gluon pingpong"),
        (torch.float16, 4, 1, 64, 500000.0, "gluon pingpong"),
        (torch.bfloat16, 2, 2, 128, 10000.0, "gluon pingpong 64x3"),
        (torch.bfloat16, 4, 2, 128, 10000.0, "gluon dkdv"),
        (torch.float16, 4, 1, 64, 500000.0, "gluon dkdv"),
        (torch.bfloat16, 2, 2, 128, 10000.0, "gluon dkdv 64x2"),
        (torch.bfloat16, 4, 2, 128, 10000.0, "gluon dkdv producer"),
        (torch.float16, 4, 1, 64, 500000.0, "gluon dkdv producer"),
        (torch.bfloat16, 4, 2, 128, 10000.0, "gluon dq"),
        (torch.float16, 4, 1, 64, 500000.0, "gluon dq"),
        (torch.bfloat16, 2, 2, 128, 10000.0, "gluon dq 128x2"),
    ],
)
def test_forward_backward_poisoned(dtype, hq, hkv, d, theta, variant):
    """Launchers write every element (outputs poisoned with NaN first) and match float64 in fwd and bwd."""
    lengths = LENGTHS
    if variant.startswith("gluon"):  # (rope_attention.GLUON_FWD: 128-row blocks, sequences past its key tiles' ring)
        if not torch.empty(0).is_cuda:
            pytest.skip("Triton's interpreter does not run Gluon: compiled for sm_90a in test_sm90_compile.py")
        lengths = [*LENGTHS, 128, 300, 1000]
    cu, positions = _pack(lengths)
    n = int(cu[-1])
    q, k, v = _inputs(n, hq, hkv, d, dtype)
    do = torch.randn(n, hq, d).to(dtype)
    scale = 1.0 / math.sqrt(d)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((hq, n), float("nan"))
    cfg = {"prepass": dict(Q_PREPASS=True), "warp spec": dict(WARP_SPEC=True)}.get(variant)
    if variant == "warp spec bounded":  # (the outer kernels' inner tiles by per-sequence descriptors: zeros past end)
        cfg = dict(WARP_SPEC=True, BOUNDED=True)
    cfg = cfg and dict(BLOCK_M=32, BLOCK_N=16, **cfg)
    if variant.startswith("gluon"):  # (the default tile: 128 keys in 2 stages; then 64 keys in 3)
        cfg = dict(GLUON=True, **(dict(BLOCK_N=64, num_stages=3) if variant.endswith("64x3") else {}))
        if "pingpong" in variant:  # (the producer warp and two consumer warpgroups in turn: attention_gluon.PINGPONG)
            cfg.update(PINGPONG=True, num_warps=4)
    dkdv = dict(BLOCK_N=32, BLOCK_M=16, TMA=variant == "atomic tma", DQ_ATOMIC=True) if "atomic" in variant else None
    dqc = None
    if variant.startswith(("gluon dkdv", "gluon dq")):  # (rope_attention_bwd.GLUON_DKDV / GLUON_DQ: the other
        # kernels Triton's, at explicit launches: no autotuning under the GPU suite's short cap for the Gluon tests)
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
        dqc = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        dkdv = dict(BLOCK_N=64, BLOCK_M=32, num_warps=4, num_stages=2)
    if variant.startswith("gluon dq"):
        dqc = dict(GLUON=True, **(dict(BLOCK_N=128, num_stages=2) if variant.endswith("128x2") else {}))
    if variant.startswith("gluon dkdv"):
        dkdv = dict(GLUON=True, **(dict(BLOCK_M=64, num_stages=2) if variant.endswith("64x2") else {}))
        if variant.endswith("producer"):  # (a producer warp, two consumer warpgroups: attention_gluon_bwd.BWD_PRODUCER)
            dkdv.update(PRODUCER=True, num_warps=4)
    if variant.startswith("warp spec"):
        dkdv, dqc = dict(BLOCK_N=32, BLOCK_M=16, WARP_SPEC=True), dict(BLOCK_M=32, BLOCK_N=16, WARP_SPEC=True)
        if variant == "warp spec bounded":
            dkdv["BOUNDED"] = dqc["BOUNDED"] = True
    if variant.startswith("warp spec") and q.is_cuda:  # (compiled: two consumer warpgroups of 64 rows, 12 warps)
        if dtype == torch.float32:
            pytest.skip("fp32 has no warpgroup MMA: the warp-specialised kernels are refused on a GPU")
        cfg.update(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2)
        dkdv.update(BLOCK_N=128, BLOCK_M=32, num_warps=4, num_stages=2)
        dqc.update(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2)
    _, _, q_rot, k_rot = _rope_attention_fwd(
        q, k, v, positions, cu, theta, scale, out=out, lse=lse, save_rotated=True, config=cfg
    )
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
    _rope_attention_bwd(
        do, q_rot, k_rot, v, out, lse, positions, cu, theta, scale, dq, dk, dv, dkdv_config=dkdv, dq_config=dqc
    )

    ref_out, ref_lse, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, positions, cu, theta, do)
    _close(out, ref_out, dtype, "out")
    # lse comes from the scores of q, k rotated then rounded to the input dtype (as the GPU multiplies them)
    _close(lse * math.log(2.0), ref_lse, dtype, "lse")
    # the rotated q and k saved for the backward: every token, every head
    _close(q_rot, reference.apply_rotary(q.double(), positions, theta), dtype, "q_rot")
    _close(k_rot, reference.apply_rotary(k.double(), positions, theta), dtype, "k_rot")
    _close(dq, ref_dq, dtype, "dq")
    _close(dk, ref_dk, dtype, "dk")
    _close(dv, ref_dv, dtype, "dv")
    if variant in ("prepass", "warp spec", "warp spec bounded", "gluon", "gluon pingpong"):  # (pre-pass: temporary)
        assert _rope_attention_fwd(q, k, v, positions, cu, theta, scale, config=cfg)[2] is None


@pytest.mark.parametrize(
    "fwd,dkdv,dq",
    [
        (dict(BLOCK_M=16, BLOCK_N=16), dict(BLOCK_N=64, BLOCK_M=16), dict(BLOCK_M=64, BLOCK_N=32)),
        (dict(BLOCK_M=64, BLOCK_N=32), dict(BLOCK_N=16, BLOCK_M=16), dict(BLOCK_M=16, BLOCK_N=16)),
    ],
)
def test_explicit_launch_configs(fwd, dkdv, dq):
    """Sequence blocks other than the default (what a benchmark sweep launches), each kernel its own: the
    dk/dv grid then differs from the dq grid. Lengths end inside, at and one past the blocks."""
    cu, positions = _pack([1, 17, 64, 65, 100])
    n = int(cu[-1])
    q, k, v = _inputs(n, 4, 2, 32, torch.float32)
    do = torch.randn(n, 4, 32)
    scale = 1.0 / math.sqrt(32)
    out, lse, q_rot, k_rot = _rope_attention_fwd(q, k, v, positions, cu, 10000.0, scale, save_rotated=True, config=fwd)
    dq_, dk_, dv_ = _rope_attention_bwd(
        do, q_rot, k_rot, v, out, lse, positions, cu, 10000.0, scale, dkdv_config=dkdv, dq_config=dq
    )
    ref_out, _, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, positions, cu, 10000.0, do)
    for name, a, b in (("out", out, ref_out), ("dq", dq_, ref_dq), ("dk", dk_, ref_dk), ("dv", dv_, ref_dv)):
        _close(a, b, torch.float32, name)
    with pytest.raises(ValueError, match="must divide"):
        _rope_attention_fwd(q, k, v, positions, cu, 10000.0, scale, config=dict(BLOCK_M=32, BLOCK_N=64))


# each kernel's sequence block by attention_tiles.SEQ_BLOCKS (interpreter: inner tiles of 16; on a GPU the autotuned
# inner tiles that divide it, bf16 so that the warp-specialised kernels compile)
_SEQ_BLOCK_SETS = [(dict(fwd=64, dkdv=16, dq=64), False), (dict(fwd=16, dkdv=64, dq=32), True)]
if os.environ.get("TULU_TEST_DEVICE", "cpu") != "cpu":
    _SEQ_BLOCK_SETS = [(dict(fwd=64, dkdv=64, dq=64), False), (dict(fwd=64, dkdv=32, dq=128), True)]


@pytest.mark.parametrize("blocks,ws", _SEQ_BLOCK_SETS)
def test_sequence_blocks_by_setting(blocks, ws):
    """attention_tiles.SEQ_BLOCKS sets each kernel's own sequence block where a launch gives none (what a sweep's
    winner at 64 rows would become): the public API launches those blocks (the warp-specialised kernels' q, k and v
    tiles by descriptor at that block too) and matches float64; a value the kernels cannot take is refused by name."""
    from kernels import attention_tiles
    from kernels import rope_attention as ra
    from kernels import rope_attention_bwd as ra_bwd

    dtype = torch.bfloat16 if ws and torch.empty(0).is_cuda else torch.float32
    cu, positions = _pack([1, 17, 64, 65, 130])
    n = int(cu[-1])
    q, k, v = (x.requires_grad_() for x in _inputs(n, 4, 2, 32 if dtype == torch.float32 else 64, dtype))
    do = torch.randn_like(q)
    launched = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_tiles, "SEQ_BLOCKS", blocks)
        mp.setattr(ra, "WARP_SPEC", ws)
        mp.setattr(ra_bwd, "WARP_SPEC", ws)
        launch = attention_tiles._launch
        counted = lambda *a, **kw: launched.append((a[0].__name__, kw["block"], kw["WARP_SPEC"])) or launch(*a, **kw)
        mp.setattr(ra, "_launch", counted)
        mp.setattr(ra_bwd, "_launch", counted)
        out = rope_attention(q, k, v, positions, cu)
        out.backward(do)
        names = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
        assert launched == [(name, blocks[key], ws) for name, key in zip(names, ("fwd", "dkdv", "dq"))]
        for bad in (48, 8, 256, 512, 64.0):  # (256: past the rotary table's 128 rows, which gave garbage)
            mp.setitem(attention_tiles.SEQ_BLOCKS, "dq", bad)
            with pytest.raises(ValueError, match=r"SEQ_BLOCKS\['dq'\] must be a power of two"):
                rope_attention(q, k, v, positions, cu).backward(do)
    ref_out, _, ref_grads = _reference(q, k, v, positions, cu, 10000.0, do)
    _close(out.detach(), ref_out, dtype, "out")
    for name, g, ref in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_grads):
        _close(g, ref, dtype, name)


def test_autotune_keeps_the_inner_tiles_that_fit_the_sequence_block():
    """A sequence block set by SEQ_BLOCKS keys the autotuner apart (a 128-row block's pick is not reused at 64) and
    prunes the inner tiles that do not divide it; none left is an error that says so."""
    import triton.language as tl

    from kernels import attention_tiles as at
    from kernels.rope_attention import _FWD_WS_SHAPES, _fwd_tuned
    from kernels.rope_attention_bwd import _dkdv_tuned, _dq_tuned

    def kept(inner, shapes, **kwargs):
        return [(c.kwargs[inner], c.num_stages) for c in at._prune(at._configs(inner, shapes), {}, **kwargs)]

    bf16 = dict(DOT_DTYPE=tl.bfloat16)
    assert kept("BLOCK_N", at._FWD_SHAPES, BLOCK_M=128, **bf16) == [(b, s) for b, _, s in at._FWD_SHAPES]
    assert kept("BLOCK_N", at._FWD_SHAPES, BLOCK_M=64, **bf16) == [(64, 2), (64, 3), (64, 4), (32, 3)]
    assert kept("BLOCK_N", _FWD_WS_SHAPES, BLOCK_M=64, **bf16) == [(64, 2), (64, 3)] * 2 + [(64, 4)]  # (BOUNDED too)
    assert kept("BLOCK_M", at._BWD_SHAPES, BLOCK_N=32, DOT_DTYPE=tl.float32) == [(16, 2), (16, 3)]
    assert kept("BLOCK_M", at._BWD_SHAPES, BLOCK_N=16, **bf16) == [(16, 2), (16, 3)]
    with pytest.raises(ValueError, match="divides the sequence block"):
        at._prune(at._configs("BLOCK_N", _FWD_WS_SHAPES), {}, BLOCK_M=32, **bf16)
    for tuned, seq in ((_fwd_tuned, "BLOCK_M"), (_dkdv_tuned, "BLOCK_N"), (_dq_tuned, "BLOCK_M")):
        assert seq in tuned.keys


@pytest.mark.parametrize(
    "tma,atomic,ws",
    [(True, False, False), (False, False, False), (True, True, False), (False, True, False), (True, False, True),
     (True, False, "bounded"), (True, False, "gluon"), (True, False, "gluon pingpong"), (True, False, "gluon dkdv"),
     (True, False, "gluon dkdv producer"), (True, False, "gluon dq")],
)  # fmt: skip
def test_a_neighbour_sequence_that_is_not_finite_stays_out(tma, atomic, ws):
    """The tiles that run past a sequence's end hold the next sequence's rows (a tensor descriptor copies whole
    tiles) or masked zeros (pointer loads): either way they must not reach the sequence's results. With every
    input and output gradient of the middle sequence inf or NaN, the two around it match float64, forward and
    backward, by tensor-descriptor (TMA) tiles and by pointer loads, dq by its own kernel and by the dk/dv kernel's
    atomic adds (whose whole-tile bulk reduces reach the neighbour's rows), and the three kernels warp-specialised
    (their outer tiles by bulk copy too: the last tile's rows past the end are the neighbour's), the forward's keys
    and values (dq's too, and dk/dv's queries and output grads) also by per-sequence descriptors ("bounded": the
    copies' rows past the end are zeros), and the Gluon forward ("gluon", bf16 on a GPU: its 128-key tiles hold the
    neighbours' rows, the values zeroed in shared memory; "gluon pingpong": by both consumer warpgroups) and the
    Gluon dk/dv kernel ("gluon dkdv": its last query tile's q and dO rows past the end zeroed in shared memory; by
    both consumer warpgroups in its warp-specialised form) and the Gluon dq ("gluon dq": its last key tile's rows past
    the end zeroed in shared memory, P and dS masked by `where`).
    Lengths end inside the tiles of every kernel (the dk/dv kernel's last, partial query tile included)."""
    gluon = ws in ("gluon", "gluon pingpong", "gluon dkdv", "gluon dkdv producer", "gluon dq")
    if gluon and not torch.empty(0).is_cuda:
        pytest.skip("Triton's interpreter does not run Gluon: compiled for sm_90a in test_sm90_compile.py")
    if ws and not gluon and torch.empty(0).is_cuda:
        pytest.skip("fp32 has no warpgroup MMA: the warp-specialised kernels are refused on a GPU")
    dtype, d = (torch.bfloat16, 64) if gluon else (torch.float32, 32)
    lengths = [45, 23, 37]
    cu, positions = _pack(lengths)
    n = int(cu[-1])
    q, k, v = _inputs(n, 4, 2, d, dtype)
    do = torch.randn(n, 4, d).to(dtype)
    bad = slice(45, 68)
    for x, fill in ((q, math.inf), (k, math.nan), (v, -math.inf), (do, math.nan)):
        x[bad] = fill
    spec = ws in (True, "bounded")  # (the Triton kernels warp-specialised; the Gluon variants leave the others plain)
    fwd = dict(BLOCK_M=32, BLOCK_N=16, TMA=tma, **({"WARP_SPEC": True} if spec else {}))
    dkdv, dq_cfg = dict(BLOCK_N=32, BLOCK_M=16, TMA=tma, DQ_ATOMIC=atomic), dict(BLOCK_M=32, BLOCK_N=16, TMA=tma)
    if ws == "gluon dq":
        dq_cfg = dict(GLUON=True)
    elif isinstance(ws, str) and ws.startswith("gluon dkdv"):
        dkdv = dict(GLUON=True, **(dict(PRODUCER=True, num_warps=4) if ws.endswith("producer") else {}))
    elif gluon:
        fwd = dict(GLUON=True, **(dict(PINGPONG=True, num_warps=4) if ws == "gluon pingpong" else {}))
    elif spec:
        dkdv["WARP_SPEC"] = dq_cfg["WARP_SPEC"] = True
    if ws == "bounded":
        fwd["BOUNDED"] = dkdv["BOUNDED"] = dq_cfg["BOUNDED"] = True
    dq_cfg = None if atomic else dq_cfg
    scale = 1.0 / math.sqrt(d)
    out, lse, q_rot, k_rot = _rope_attention_fwd(q, k, v, positions, cu, 1e4, scale, save_rotated=True, config=fwd)
    dq, dk, dv = _rope_attention_bwd(
        do, q_rot, k_rot, v, out, lse, positions, cu, 1e4, scale, dkdv_config=dkdv, dq_config=dq_cfg
    )
    for s, e in ((0, 45), (68, 105)):
        seq = slice(s, e)
        cu1 = torch.tensor([0, e - s], dtype=torch.int32)
        ref_out, _, (ref_dq, ref_dk, ref_dv) = _reference(q[seq], k[seq], v[seq], positions[seq], cu1, 1e4, do[seq])
        for name, a, b in (("out", out, ref_out), ("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
            _close(a[seq], b, dtype, f"{name} of the sequence at {s}")


def test_dq_atomic_switch_and_refusal():
    """rope_attention_bwd.DQ_ATOMIC makes the autograd path (no explicit config) compute dq by the dk/dv kernel's
    adds (the dq kernel never runs); an explicit dq_config beside DQ_ATOMIC is refused, naming it."""
    from kernels import rope_attention_bwd

    cu, positions = _pack([23, 40])
    n = int(cu[-1])
    q, k, v = (x.requires_grad_() for x in _inputs(n, 4, 2, 32, torch.float32))
    do = torch.randn(n, 4, 32)

    def refuse(*args, **kwargs):
        raise AssertionError("the dq kernel ran")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rope_attention_bwd, "DQ_ATOMIC", True)
        mp.setattr(rope_attention_bwd, "_bwd_dq_kernel", refuse)  # (what the interpreter launches)
        mp.setattr(rope_attention_bwd, "_dq_tuned", refuse)  # (and a GPU)
        rope_attention(q, k, v, positions, cu).backward(do)
    _, _, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, positions, cu, 1e4, do)
    for name, g, ref in (("dq", q.grad, ref_dq), ("dk", k.grad, ref_dk), ("dv", v.grad, ref_dv)):
        _close(g, ref, torch.float32, name)
    out, lse, q_rot, k_rot = _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.25, save_rotated=True)
    with pytest.raises(ValueError, match=r"dq_config .* given, but with DQ_ATOMIC"):
        _rope_attention_bwd(
            do, q_rot, k_rot, v, out, lse, positions, cu, 1e4, 0.25,
            dkdv_config=dict(BLOCK_N=32, BLOCK_M=16, DQ_ATOMIC=True), dq_config=dict(BLOCK_M=32, BLOCK_N=16),
        )  # fmt: skip


@pytest.mark.parametrize("switch", ["Q_PREPASS", "WARP_SPEC"])
def test_the_prepass_switch_on_the_public_api_with_qkv_views(switch):
    """rope_attention.Q_PREPASS (and WARP_SPEC, which implies it, with rope_attention_bwd.WARP_SPEC) drives the
    autograd path: q, k, v views of one fused projection (q's token stride is not Hq * D: the pre-pass reads it
    strided and writes q_rot packed; v's rows are strided), grads through all three. The warp-specialised forward,
    dk/dv and dq kernels are the ones that run (the launches counted)."""
    from kernels import attention_tiles
    from kernels import rope_attention as ra
    from kernels import rope_attention_bwd as ra_bwd

    cu, positions = _pack([5, 40, 33], start=3)
    n = int(cu[-1])
    qkv = torch.randn(n, 4 + 2 + 2, 32, requires_grad=True)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    do = torch.randn(n, 4, 32)
    launches = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ra, "Q_PREPASS" if switch == "Q_PREPASS" else "WARP_SPEC", True)
        mp.setattr(ra_bwd, "WARP_SPEC", switch == "WARP_SPEC")
        launch = attention_tiles._launch
        counted = lambda *a, **kw: launches.append((a[0].__name__, kw.get("WARP_SPEC"))) or launch(*a, **kw)
        mp.setattr(ra, "_launch", counted)
        mp.setattr(ra_bwd, "_launch", counted)
        out = rope_attention(q, k, v, positions, cu, rope_theta=500.0)
        out.backward(do)
    ws = switch == "WARP_SPEC" and attention_tiles._warp_spec_refused(qkv.dtype, True, None) is None
    assert launches == [("_fwd_kernel", ws), ("_bwd_dkdv_kernel", ws), ("_bwd_dq_kernel", ws)]
    ref_out, _, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, positions, cu, 500.0, do)
    _close(out.detach(), ref_out, torch.float32, "out")
    for name, g, ref in (
        ("dq", qkv.grad[:, :4], ref_dq),
        ("dk", qkv.grad[:, 4:6], ref_dk),
        ("dv", qkv.grad[:, 6:], ref_dv),
    ):
        _close(g, ref, torch.float32, name)


def test_the_dkdv_autotuner_zeroes_the_dq_sum_before_each_try():
    """On a GPU the autotuner launches the dk/dv kernel once per config and try before the chosen one; with
    DQ_ATOMIC each launch adds into the fp32 dq sum, so its hook zeroes that sum (a tensor or the tensor under a
    descriptor) before each, and leaves the placeholder alone without DQ_ATOMIC. (Triton's own reset_to_zero would
    call zero_() on the descriptor.)"""
    from kernels.attention_tiles import rows_descriptor
    from kernels.rope_attention_bwd import _dkdv_tuned, _zero_dq_sum

    assert _dkdv_tuned.pre_hook is _zero_dq_sum
    for wrap in (lambda t: t, rows_descriptor):
        dqa = torch.ones(8, 2, 32)
        _zero_dq_sum({"DQA": wrap(dqa), "DQ_ATOMIC": True}, reset_only=True)
        assert not dqa.any()
        dqa.fill_(1.0)
        _zero_dq_sum({"DQA": wrap(dqa), "DQ_ATOMIC": False})
        assert dqa.eq(1.0).all()


def test_tma_where_it_can_pointer_loads_elsewhere():
    """attention_tiles.use_tma: tensor descriptors only for heads side by side in 16-byte aligned rows, head-dim
    halves at least 16 wide, and the module switch on; a launch falls back to pointer loads otherwise and gets
    the same numbers."""
    from kernels import attention_tiles

    x = torch.randn(10, 2, 64)
    assert attention_tiles.use_tma(64, x, x)
    assert not attention_tiles.use_tma(16, torch.randn(10, 2, 16))  # halves of 8: padded pairs
    assert not attention_tiles.use_tma(64, x, torch.randn(10, 64, 2).transpose(1, 2))  # heads not side by side
    assert not attention_tiles.use_tma(64, x, torch.randn(10 * 2 * 64 + 1)[1:].view(10, 2, 64))  # misaligned base
    assert not attention_tiles.use_tma(64, torch.randn(10, 2, 65)[..., :64])  # row stride 130 * 4 bytes: not 16k
    cu, positions = _pack([20, 9])
    q, k, v = _inputs(29, 2, 2, 64, torch.float32)
    outs = []
    with pytest.MonkeyPatch.context() as mp:
        for on in (True, False):
            mp.setattr(attention_tiles, "TMA_LOADS", on)
            outs.append(_rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
    q16, k16, v16 = _inputs(29, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=r"config TMA=True, but head dim 16 is under 32"):
        _rope_attention_fwd(q16, k16, v16, positions, cu, 1e4, 0.25, config=dict(BLOCK_M=32, BLOCK_N=16, TMA=True))


def test_gluon_forward_where_it_can_refused_by_name_elsewhere():
    """rope_attention.GLUON_FWD runs the Gluon forward (kernels/attention_gluon.py) where it can (an sm_90 GPU, bf16
    or fp16, head dims 64 and 128) and the Triton forward elsewhere, with the Triton forward's numbers; an explicit
    GLUON=True it cannot honour, or with a launch it does not take, is refused with the reason."""
    from kernels import attention_gluon, attention_tiles
    from kernels import rope_attention as ra

    cu, positions = _pack([20, 9, 140])
    dtype = torch.bfloat16 if torch.empty(0).is_cuda else torch.float32
    q, k, v = _inputs(169, 4, 2, 64, dtype)
    gluon = attention_gluon.refused(dtype, 64, q.device, k, v) is None
    ran = []
    with pytest.MonkeyPatch.context() as mp:
        forward = attention_gluon.forward
        mp.setattr(attention_gluon, "forward", lambda *a: ran.append("gluon") or forward(*a))
        plain = _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125)
        mp.setattr(ra, "GLUON_FWD", True)
        out, lse, _, _ = _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125)
        q16, k16, v16 = _inputs(169, 2, 2, 32, dtype)  # (head dim 32: the Triton forward, wherever)
        _rope_attention_fwd(q16, k16, v16, positions, cu, 1e4, 0.125)
    assert ran == (["gluon"] if gluon else [])
    torch.testing.assert_close(out, plain[0], **(TOLS[dtype] if gluon else dict(atol=0, rtol=0)))
    torch.testing.assert_close(lse, plain[1], **(TOLS[dtype] if gluon else dict(atol=0, rtol=0)))
    # where it can run (as a GPU would say; the kernel itself stood in for): the switch takes the launches without an
    # explicit config (an explicit one is a Triton launch unless it says GLUON=True), with q by the pre-pass and the
    # config's tile; the Triton forward launches nothing then
    with pytest.MonkeyPatch.context() as mp:
        calls, triton_launches = [], []
        mp.setattr(attention_gluon, "refused", lambda *a: None)
        mp.setattr(attention_gluon, "forward", lambda *a: calls.append(a))
        launch = ra._launch
        mp.setattr(ra, "_launch", lambda *a, **kw: triton_launches.append(kw["block"]) or launch(*a, **kw))
        mp.setattr(ra, "GLUON_FWD", True)
        _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125)
        _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125, config=dict(BLOCK_M=32, BLOCK_N=16))
        # (tiles by pointer loads asked for, by attention_tiles.TMA_LOADS or a config: the switch leaves them to
        # Triton, an explicit GLUON=True beside them is refused)
        mp.setattr(attention_tiles, "TMA_LOADS", False)
        _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125)
        mp.setattr(attention_tiles, "TMA_LOADS", True)
        with pytest.raises(ValueError, match=r"config GLUON=True, but its tiles are not read by TMA here"):
            _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125, config=dict(GLUON=True, TMA=False))
        mp.setattr(ra, "GLUON_FWD", False)
        _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125, config=dict(GLUON=True, BLOCK_N=64, num_stages=3))
        pingpong = dict(GLUON=True, PINGPONG=True, num_warps=4, BLOCK_N=64, num_stages=2)  # (a sweep's row)
        _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125, config=pingpong)
    default = attention_tiles.seq_block("fwd", None, "BLOCK_M")
    assert triton_launches == [32, default] and len(calls) == 3, (triton_launches, len(calls))
    q_rot = reference.apply_rotary(q.double(), positions, 1e4)
    for args, tile in zip(calls, ((None, None, None), (64, 3, None), (64, 2, True))):
        torch.testing.assert_close(args[0].double(), q_rot, **TOLS[dtype])  # (q by the pre-pass)
        assert args[5] is not None and args[6] == 0.125 and args[7:] == tile
    if not gluon:
        with pytest.raises(ValueError, match=r"config GLUON=True, but Triton's interpreter does not run Gluon kernels"):
            _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125, config=dict(GLUON=True))
    with pytest.MonkeyPatch.context() as mp:  # (what a GPU's launch would hear)
        mp.setattr(attention_gluon, "INTERPRET", False)
        mp.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        cuda = torch.device("cuda")
        assert attention_gluon.refused(torch.float32, 64, cuda) == "it takes bf16 or fp16 inputs, not torch.float32"
        assert attention_gluon.refused(torch.bfloat16, 32, cuda) == "it takes head dims (64, 128), not 32"
        assert attention_gluon.refused(torch.bfloat16, 128, cuda) is None
        mp.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
        assert attention_gluon.refused(torch.bfloat16, 128, cuda) == "warpgroup MMA needs an sm_90 GPU, not sm_100"
    for cfg, why in (
        (dict(BLOCK_M=64), "takes BLOCK_M=128"),
        (dict(num_warps=4), "without PINGPONG takes num_warps=8"),
        (dict(PINGPONG=True, num_warps=8), "with PINGPONG=True takes num_warps=4"),
        (dict(WARP_SPEC=True), "with WARP_SPEC or BOUNDED"),
        (dict(Q_PREPASS=False), "loads q rotated by the pre-pass"),
        (dict(TMA_X=1), r"takes BLOCK_N, num_stages and PINGPONG, not \['TMA_X'\]"),
    ):
        with pytest.raises(ValueError, match=why):
            ra._gluon_config(cfg)
    plain = dict(BLOCK_N=64, num_stages=None, PINGPONG=None)
    assert ra._gluon_config(dict(BLOCK_M=128, BLOCK_N=64, num_warps=8)) == plain
    assert ra._gluon_config(dict(PINGPONG=True, num_warps=4)) == dict(BLOCK_N=None, num_stages=None, PINGPONG=True)
    if gluon:
        with pytest.raises(ValueError, match="64- or 128-key tiles in 2 to 4 stages"):
            _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125, config=dict(GLUON=True, BLOCK_N=32))


# the Gluon backward kernels' switches (rope_attention_bwd.GLUON_DKDV, GLUON_DQ): per kind, the config it reads, the
# explicit configs with the tile `attention_gluon.<kind>` is handed, beside DQ_ATOMIC's refusal, the other refusals
_GLUON_BWD = {
    "dkdv": dict(
        switch="GLUON_DKDV", config="dkdv_config", triton=dict(BLOCK_N=32, BLOCK_M=16),
        tiles=[(None, (None, None, None)), (dict(BLOCK_M=64, num_stages=3), (64, 3, None)),
               (dict(PRODUCER=True, num_warps=4, BLOCK_M=32), (32, None, True))],  # (the last: a sweep's row)
        atomic=r"dkdv_config GLUON=True, but dq is by atomic adds",
        refusals=[(dict(WARP_SPEC=True), "with WARP_SPEC or BOUNDED"),
                  (dict(BLOCK_N=64), "without PRODUCER takes BLOCK_N=128"),
                  (dict(num_warps=4), "without PRODUCER takes num_warps=8"),
                  (dict(PRODUCER=True, num_warps=8), "with PRODUCER takes num_warps=4"),
                  (dict(maxnreg=128), r"takes BLOCK_M, num_stages and PRODUCER, not \['maxnreg'\]")],
    ),
    "dq": dict(
        switch="GLUON_DQ", config="dq_config", triton=dict(BLOCK_M=32, BLOCK_N=16),
        tiles=[(None, (None, None)), (dict(BLOCK_N=32, num_stages=3), (32, 3))],
        atomic=r"with DQ_ATOMIC the dk/dv kernel computes dq",
        refusals=[(dict(WARP_SPEC=True), "with WARP_SPEC or BOUNDED"), (dict(BLOCK_M=64), "takes BLOCK_M=128"),
                  (dict(num_warps=4), "takes num_warps=8"),
                  (dict(maxnreg=128), r"takes BLOCK_N and num_stages, not \['maxnreg'\]")],
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(_GLUON_BWD))
def test_gluon_backward_dispatch_and_its_finishing_pass(kind):
    """rope_attention_bwd.GLUON_DKDV / GLUON_DQ hand dk and dv / dq to the Gluon kernel (kernels/attention_gluon_bwd.py
    `dkdv` / `dq`) where it can run, with the config's tile; its dk or dq (w.r.t. the rotated k or q, not yet scaled)
    goes through the finishing pass: with the kernel stood in for by float64 autograd writing what it is specified
    to, dq, dk and dv match the reference. Where it cannot run, the Triton kernels do (the same bits); an explicit
    GLUON=True it cannot honour (DQ_ATOMIC beside it among them) is refused with the reason."""
    from kernels import attention_gluon, attention_gluon_bwd
    from kernels import rope_attention_bwd as rab

    case = _GLUON_BWD[kind]
    cu, positions = _pack([20, 9, 70])
    n, theta = int(cu[-1]), 1e4
    dtype = torch.bfloat16 if torch.empty(0).is_cuda else torch.float32
    q, k, v = _inputs(n, 4, 2, 64, dtype)
    do = torch.randn(n, 4, 64).to(dtype)
    scale = 0.125
    out, lse, q_rot, k_rot = _rope_attention_fwd(q, k, v, positions, cu, theta, scale, save_rotated=True)
    ref_dq, ref_dk, ref_dv = _reference(q, k, v, positions, cu, theta, do)[2]
    calls = []

    def stand_in(q_rot, k_rot, v, do, lse, delta, *rest):
        # causal attention over the rotated q and k (positions 0: no further rotation), in float64; dkdv's rest:
        # dv, dk_rot, cu, softmax_scale, tile; dq's: dq_rot, cu, softmax_scale, tile
        if kind == "dkdv":
            outs, cu, softmax_scale, tile = rest[:2], rest[2], rest[3], rest[4:]
        else:
            outs, cu, softmax_scale, tile = rest[:1], rest[1], rest[2], rest[3:]
        calls.append(tuple(tile))
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q_rot, k_rot, v))
        o = reference.rope_attention(q64, k64, v64, torch.zeros(n, dtype=torch.long), cu, softmax_scale=softmax_scale)
        gq, gk, gv = torch.autograd.grad(o, (q64, k64, v64), do.double())
        if kind == "dkdv":
            outs[0].copy_(gv), outs[1].copy_(gk / softmax_scale)
        else:
            outs[0].copy_(gq / softmax_scale)

    def grads(**kw):
        return _rope_attention_bwd(do, q_rot, k_rot, v, out, lse, positions, cu, theta, scale, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_gluon, "refused", lambda *a: None)
        mp.setattr(attention_gluon_bwd, kind, stand_in)
        mp.setattr(rab, case["switch"], True)
        for cfg, tile in case["tiles"]:
            dq, dk, dv = grads(**({case["config"]: dict(GLUON=True, **cfg)} if cfg else {}))
            assert calls.pop() == tile and not calls, tile
            for name, a, b in (("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
                _close(a, b, dtype, name)
        grads(**{case["config"]: case["triton"]})  # (an explicit Triton config: the Triton kernel)
        mp.setattr(rab, "DQ_ATOMIC", True)  # (dq by dk/dv's atomic adds: the Triton dk/dv, no dq kernel)
        grads()
        with pytest.raises(ValueError, match=case["atomic"]):
            grads(**{case["config"]: dict(GLUON=True)})
        assert not calls
        mp.setattr(rab, "DQ_ATOMIC", False)
        for cfg, why in case["refusals"]:
            with pytest.raises(ValueError, match=why):
                grads(**{case["config"]: dict(GLUON=True, **cfg)})
    if attention_gluon.refused(dtype, 64, q.device, q, do, k, v):  # (here: the interpreter)
        with pytest.raises(ValueError, match=rf"{case['config']} GLUON=True, but Triton's interpreter does not run"):
            grads(**{case["config"]: dict(GLUON=True)})
        with pytest.MonkeyPatch.context() as mp:  # (the switch where it cannot run: the Triton kernels, same numbers)
            mp.setattr(rab, case["switch"], True)
            switched = grads()
        for a, b in zip(switched, grads()):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_warp_spec_where_it_can_refused_by_name_elsewhere():
    """rope_attention.WARP_SPEC runs the warp-specialised forward where it can (tiles by TMA, bf16/fp16 on a GPU) and
    the plain one elsewhere, with the same numbers as the plain one with q by the pre-pass (one masked loop or two
    loops: the same arithmetic); an explicit WARP_SPEC=True it cannot honour is refused with the reason."""
    from kernels import attention_tiles
    from kernels import rope_attention as ra

    cu, positions = _pack([20, 9, 40])
    dtype = torch.bfloat16 if torch.empty(0).is_cuda else torch.float32  # (a GPU refuses fp32)
    q, k, v = _inputs(69, 4, 2, 64, dtype)
    launched, outs = [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ra, "WARP_SPEC", True)
        mp.setattr(ra, "Q_PREPASS", True)
        launch = ra._launch
        mp.setattr(ra, "_launch", lambda *a, **kw: launched.append(kw["WARP_SPEC"]) or launch(*a, **kw))
        for tma in (True, False):
            mp.setattr(attention_tiles, "TMA_LOADS", tma)
            outs.append(_rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125)[0])
        q16, k16, v16 = _inputs(69, 2, 2, 16, torch.float32)  # (head-dim halves of 8: no TMA)
        _rope_attention_fwd(q16, k16, v16, positions, cu, 1e4, 0.25)
    assert launched == [True, False, False]
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else TOLS[dtype]
    torch.testing.assert_close(outs[0], outs[1], **tol)
    cfg = dict(BLOCK_M=32, BLOCK_N=16, WARP_SPEC=True)
    with pytest.raises(ValueError, match=r"config WARP_SPEC=True, but its tiles are not all read by TMA"):
        _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125, config=dict(cfg, TMA=False))
    with pytest.raises(ValueError, match=r"config WARP_SPEC=True, but it loads q rotated by the pre-pass"):
        _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125, config=dict(cfg, Q_PREPASS=False))
    with pytest.raises(ValueError, match=r"config BOUNDED=True: per-sequence descriptors of the warp-specialised"):
        _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125, config=dict(cfg, WARP_SPEC=False, BOUNDED=True))
    # the dk/dv kernel's: not beside dq's atomic adds, not without TMA
    out, lse, q_rot, k_rot = _rope_attention_fwd(q, k, v, positions, cu, 1e4, 0.125, save_rotated=True)
    bwd = lambda **kw: _rope_attention_bwd(  # noqa: E731
        torch.randn_like(q), q_rot, k_rot, v, out, lse, positions, cu, 1e4, 0.125,
        dkdv_config=dict(BLOCK_N=32, BLOCK_M=16, WARP_SPEC=True, **kw),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"dkdv_config BOUNDED=True: per-sequence descriptors of the warp-special"):
        _rope_attention_bwd(
            torch.randn_like(q), q_rot, k_rot, v, out, lse, positions, cu, 1e4, 0.125,
            dkdv_config=dict(BLOCK_N=32, BLOCK_M=16, BOUNDED=True),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"dkdv_config WARP_SPEC=True, but dq is by atomic adds"):
        bwd(DQ_ATOMIC=True)
    with pytest.raises(ValueError, match=r"dkdv_config WARP_SPEC=True, but its tiles are not all read by TMA"):
        bwd(TMA=False)
    with pytest.raises(ValueError, match=r"dq_config BOUNDED=True: per-sequence descriptors of the warp-specialised"):
        _rope_attention_bwd(
            torch.randn_like(q), q_rot, k_rot, v, out, lse, positions, cu, 1e4, 0.125,
            dq_config=dict(BLOCK_M=32, BLOCK_N=16, WARP_SPEC=False, BOUNDED=True),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"dq_config WARP_SPEC=True, but its tiles are not all read by TMA"):
        _rope_attention_bwd(
            torch.randn_like(q), q_rot, k_rot, v, out, lse, positions, cu, 1e4, 0.125,
            dq_config=dict(BLOCK_M=32, BLOCK_N=16, WARP_SPEC=True, TMA=False),
        )  # fmt: skip
    assert attention_tiles._warp_spec_refused(torch.float32, True, None) is None  # (the interpreter emulates fp32 dots)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_tiles, "INTERPRET", False)
        assert attention_tiles._warp_spec_refused(torch.float32, True, None) == "fp32 inputs have no warpgroup MMA"
        assert attention_tiles._warp_spec_refused(torch.bfloat16, True, None) is None


def test_device_descriptor_scratch_sets_an_allocator_only_where_none_is():
    """The BOUNDED kernels make tensor descriptors in the kernel, whose global scratch Triton takes from its
    allocator (none by default: the launch would fail): the launcher sets one from torch's where none is set, and
    leaves one the caller set."""
    import triton
    from triton.runtime import _allocation

    from kernels.attention_tiles import _torch_scratch, device_descriptor_scratch

    token = _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
    try:
        device_descriptor_scratch()
        assert _allocation._allocator.get() is _torch_scratch
        assert _torch_scratch(384, 128, None).shape == (384,)
        mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)  # noqa: E731
        triton.set_allocator(mine)
        device_descriptor_scratch()
        assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.reset(token)


def test_autograd_public_api_strided_views():
    """rope_attention is differentiable through torch.autograd; q, k, v are views of one fused qkv
    projection (token stride != Hq*D) and positions is a strided view."""
    cu, positions = _pack([5, 40, 33], start=0)
    n = int(cu[-1])
    qkv = torch.randn(n, 4 + 2 + 2, 32, requires_grad=True)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    strided_positions = torch.stack([positions, -positions], 1)[:, 0]
    do = torch.randn(n, 4, 32)
    out = rope_attention(q, k, v, strided_positions, cu, rope_theta=1000.0)
    out.backward(do)
    ref_out, _, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, positions, cu, 1000.0, do)
    _close(out.detach(), ref_out, torch.float32, "out")
    _close(qkv.grad[:, :4], ref_dq, torch.float32, "dq")
    _close(qkv.grad[:, 4:6], ref_dk, torch.float32, "dk")
    _close(qkv.grad[:, 6:], ref_dv, torch.float32, "dv")


@pytest.mark.parametrize("bounded", [False, True])
def test_arbitrary_positions_and_empty_sequence(bounded):
    """Non-consecutive positions (left padding, random) take the per-element cos/sin path; empty sequences, the last
    one too (the warp-specialised kernels' programs past the last block then see it: with BOUNDED, per-sequence
    descriptors over no rows)."""
    if bounded and torch.empty(0).is_cuda:
        pytest.skip("fp32 has no warpgroup MMA: the warp-specialised kernels are refused on a GPU")
    fwd = dkdv = dqc = None  # (the defaults)
    if bounded:
        ws = dict(WARP_SPEC=True, BOUNDED=True)
        fwd, dqc, dkdv = dict(BLOCK_M=32, BLOCK_N=16, **ws), dict(BLOCK_M=32, BLOCK_N=16, **ws), dict(BLOCK_N=32, **ws)
        dkdv["BLOCK_M"] = 16
    lengths = [20, 0, 35, 0]
    cu, _ = _pack(lengths)
    n = int(cu[-1])
    left_padded = torch.tensor([1] * 6 + list(range(14)))  # HF: pads at position 1, then 0, 1, 2, ...
    positions = torch.cat([left_padded, torch.randint(0, 5000, (35,))]).to(torch.int32)
    q, k, v = _inputs(n, 2, 1, 64, torch.float32)
    do = torch.randn(n, 2, 64)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, n), float("nan"))
    _, _, q_rot, k_rot = _rope_attention_fwd(
        q, k, v, positions, cu, 10000.0, 0.125, out=out, lse=lse, save_rotated=True, config=fwd
    )
    dq, dk, dv = _rope_attention_bwd(
        do, q_rot, k_rot, v, out, lse, positions, cu, 10000.0, 0.125, dkdv_config=dkdv, dq_config=dqc
    )
    ref_out, _, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, positions, cu, 10000.0, do)
    # positions up to 5000: fp32 angles carry ~2e-4 rad of rounding, as in HF's own fp32 rotary
    tol = dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(dq.double(), ref_dq, **tol)
    torch.testing.assert_close(dk.double(), ref_dk, **tol)
    torch.testing.assert_close(dv.double(), ref_dv, **tol)


def test_positions_one_off_consecutive_within_a_tile():
    """Positions that are consecutive except for a step of 2 (one position skipped) or of 0 (one repeated) inside a
    query tile: one element off by 1 is enough to leave the angle-addition table (exact only for p0 + j) for the
    per-element cos/sin, in the forward's q rotation and in the backward's rotation of dq and dk."""
    lengths = [40, 27]
    cu, _ = _pack(lengths)
    n = int(cu[-1])
    skipped = torch.cat([torch.arange(0, 10), torch.arange(11, 41)])  # 10 is missing
    repeated = torch.cat([torch.arange(5, 20), torch.arange(19, 31)])  # 19 twice
    positions = torch.cat([skipped, repeated])
    q, k, v = _inputs(n, 2, 1, 64, torch.float32)
    do = torch.randn(n, 2, 64)
    out, lse, q_rot, k_rot = _rope_attention_fwd(q, k, v, positions, cu, 10000.0, 0.125, save_rotated=True)
    dq, dk, dv = _rope_attention_bwd(do, q_rot, k_rot, v, out, lse, positions, cu, 10000.0, 0.125)
    ref_out, _, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, positions, cu, 10000.0, do)
    for name, a, b in (("out", out, ref_out), ("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        _close(a, b, torch.float32, name)


@pytest.mark.parametrize("d", [16, 32])
def test_small_head_dims(d):
    """D = 16 pads each half to tl.dot's minimum of 16; D = 32 has halves of exactly 16."""
    cu, positions = _pack([9, 33])
    n = int(cu[-1])
    q, k, v = _inputs(n, 2, 2, d, torch.float32)
    do = torch.randn(n, 2, d)
    scale = 1.0 / math.sqrt(d)
    out, lse, q_rot, k_rot = _rope_attention_fwd(q, k, v, positions, cu, 10000.0, scale, save_rotated=True)
    dq, dk, dv = _rope_attention_bwd(do, q_rot, k_rot, v, out, lse, positions, cu, 10000.0, scale)
    ref_out, _, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, positions, cu, 10000.0, do)
    for name, a, b in (("out", out, ref_out), ("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        _close(a, b, torch.float32, name)


def test_many_short_sequences():
    """20 sequences (a longer binary search over the block index), several ending mid-block."""
    lengths = torch.randint(1, 13, (20,)).tolist()
    cu, positions = _pack(lengths, start=3)
    n = int(cu[-1])
    q, k, v = _inputs(n, 2, 1, 32, torch.float32)
    do = torch.randn(n, 2, 32)
    scale = 1.0 / math.sqrt(32)
    out, lse, q_rot, k_rot = _rope_attention_fwd(q, k, v, positions, cu, 10000.0, scale, save_rotated=True)
    dq, dk, dv = _rope_attention_bwd(do, q_rot, k_rot, v, out, lse, positions, cu, 10000.0, scale)
    ref_out, _, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, positions, cu, 10000.0, do)
    for name, a, b in (("out", out, ref_out), ("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        _close(a, b, torch.float32, name)


def _cache_case(dtype):
    cu, positions = _pack([3, 17, 40], start=5)
    n = int(cu[-1])
    hkv, d, num_blocks, block_size = 2, 64, 8, 16
    q, k, v = _inputs(n, 4, hkv, d, dtype)
    slots = torch.randperm(num_blocks * block_size)[:n]
    slots[::7] = -1  # these tokens are not written
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    k_rot = reference.apply_rotary(k.double(), positions, 10000.0).to(dtype)
    expected_k.view(-1, hkv, d)[slots[keep]] = k_rot[keep]
    expected_v.view(-1, hkv, d)[slots[keep]] = v[keep]
    return (q, k, v, positions, cu), (k_cache, v_cache), slots, (expected_k, expected_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["triton", "reference", "triton, q by the pre-pass", "triton, warp-specialised"])
def test_cache_write(dtype, path):
    """kv_cache/slot_mapping: rotated k and v land in their slots, slot -1 and unused slots stay untouched (also with
    q rotated in the same launch: Q_PREPASS, and the warp-specialised forward after it: WARP_SPEC)."""
    from kernels import rope_attention as ra

    args, cache, slots, (expected_k, expected_v) = _cache_case(dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ra, "Q_PREPASS", path.endswith("pre-pass"))
        mp.setattr(ra, "WARP_SPEC", path.endswith("warp-specialised"))
        with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
            out = rope_attention(*args, kv_cache=cache, slot_mapping=slots)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(cache[0], expected_k, equal_nan=True, **tol)
    torch.testing.assert_close(cache[1], expected_v, equal_nan=True, atol=0, rtol=0)
    ref_out, _, _ = _reference(*args, 10000.0)
    _close(out, ref_out, dtype, "out")


def test_reference_path_matches_float64():
    """The CPU path without the interpreter (engine CPU demo) runs the reference and returns q's dtype."""
    cu, positions = _pack([4, 9])
    q, k, v = _inputs(13, 2, 1, 16, torch.bfloat16)
    assert dispatch.use_triton(q)  # tests run under the interpreter
    with dispatch.reference_ops():
        assert not dispatch.use_triton(q)
        out = rope_attention(q, k, v, positions, cu)
    assert out.dtype == torch.bfloat16
    _close(out, _reference(q, k, v, positions, cu, 10000.0)[0], torch.bfloat16, "out")


def test_reference_ops_nest_and_end_with_their_block():
    q = torch.zeros(1)
    outside = dispatch.use_triton(q)
    assert outside  # (the interpreter on CPU, or a GPU: the kernels' path)
    with dispatch.reference_ops():
        with dispatch.reference_ops():
            assert not dispatch.use_triton(q)
        assert not dispatch.use_triton(q)  # (the outer block still holds)
    assert dispatch.use_triton(q) == outside  # (the rule of before the blocks again)


def test_the_interpreter_is_detected_as_triton_detects_it():
    """TRITON_INTERPRET=true (or on, yes) runs Triton's interpreter as =1 does: dispatch must know (loop_bound)."""
    code = (
        "import importlib, os, triton\n"
        "from kernels import dispatch\n"
        "for v in ('1', 'true', 'ON', 'yes', '0', 'false', ''):\n"
        "    os.environ['TRITON_INTERPRET'] = v\n"
        "    importlib.reload(dispatch)\n"
        "    assert dispatch.INTERPRET == bool(triton.knobs.runtime.interpret), v\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_bad_inputs():
    cu, positions = _pack([3, 5])
    q, k, v = _inputs(8, 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="not a multiple of key/value heads"):
        rope_attention(q, k[:, :1].repeat(1, 3, 1), v[:, :1].repeat(1, 3, 1), positions, cu)
    with pytest.raises(ValueError, match="head dim 96 not supported"):
        rope_attention(*_inputs(8, 4, 2, 96, torch.float32), positions, cu)
    with pytest.raises(ValueError, match="must be even"):
        rope_attention(*_inputs(8, 4, 2, 65, torch.float32), positions, cu)
    with pytest.raises(ValueError, match="end at N=8"):  # (checked where cu_seqlens is on the host: no sync)
        rope_attention(q, k, v, positions, torch.tensor([0, 3, 7], dtype=torch.int32, device="cpu"))
    with pytest.raises(ValueError, match="share one dtype"):
        rope_attention(q, k.half(), v, positions, cu)
    with pytest.raises(ValueError, match="positions must be integer"):
        rope_attention(q, k, v, positions.float(), cu)
    with pytest.raises(ValueError, match="k and v must be"):
        rope_attention(q, k, v[:7], positions, cu)
    with pytest.raises(ValueError, match="given together"):
        rope_attention(q, k, v, positions, cu, kv_cache=(torch.zeros(2, 4, 2, 64), torch.zeros(2, 4, 2, 64)))
    with pytest.raises(ValueError, match="k_cache and v_cache must be"):
        bad = torch.zeros(2, 4, 3, 64)
        rope_attention(q, k, v, positions, cu, kv_cache=(bad, bad), slot_mapping=torch.zeros(8, dtype=torch.long))


def test_fp32_autotune_keeps_the_two_smallest_tiles():
    """fp32 operands: autotune compiles only the two smallest inner tiles (a 128-wide forward tile needs 256 KB of
    shared memory at D=128, more than a Hopper block has); bf16 keeps every config."""
    import triton.language as tl

    from kernels.attention_tiles import _BWD_SHAPES, _FWD_SHAPES, _configs, _prune_fp32

    def kept(shapes, dtype):
        return [
            (*c.kwargs.values(), c.num_warps, c.num_stages)
            for c in _prune_fp32(_configs("B", shapes), {}, DOT_DTYPE=dtype)
        ]

    assert kept(_FWD_SHAPES, tl.float32) == [(32, 8, 3), (64, 8, 2)]
    assert kept(_BWD_SHAPES, tl.float32) == [(16, 8, 2), (16, 8, 3)]
    assert len(kept(_FWD_SHAPES, tl.bfloat16)) == len(_FWD_SHAPES)


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in this torch")
def test_fp8_cache_prefill_reads_back_and_passes_gradients_through():
    """With a float8 cache the prefill attends to the K/V the cache holds (what decode reads), on both paths, and the
    gradients pass through the rounding alike (a slot -1 token: its exact K/V)."""
    n, hq, hkv, d = 12, 4, 2, 64
    cu, positions = _pack([5, 7])
    q, k, v = _inputs(n, hq, hkv, d, torch.float32)
    do = torch.randn(n, hq, d)
    slots = torch.arange(n)
    slots[3] = -1
    results = []
    for ref in (False, True):
        kc = torch.zeros(4, 4, hkv, d, dtype=torch.float8_e4m3fn)
        vc = torch.zeros_like(kc)
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        with dispatch.reference_ops() if ref else contextlib.nullcontext():
            out = rope_attention(qg, kg, vg, positions, cu, kv_cache=(kc, vc), slot_mapping=slots)
        out.backward(do)
        results.append((out.detach(), qg.grad, kg.grad, vg.grad))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert results[1][2][:3].abs().sum() > 0  # cached tokens' dk is not cut off by the read-back
    exact = reference.rope_attention(q, k, v, positions, cu)
    assert not torch.allclose(results[1][0], exact, atol=1e-3)  # (it does attend to float8-rounded K/V)


def test_block_index_is_built_once_per_cu_seqlens():
    """Every layer of a forward (and its backward) passes the same cu_seqlens: its block index is built once
    (dispatch.derived); an in-place change to it, or another tensor, gets its own, built from its values."""
    from kernels import attention_tiles

    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    first = attention_tiles._block_index(cu, 9, 4)
    assert attention_tiles._block_index(cu, 9, 4) is first
    assert first[0].tolist() == [0, 2, 3] and first[1:] == (3 + 2, 4)
    other = cu.clone()
    other[2] = 20
    assert attention_tiles._block_index(other, 20, 4)[0].tolist() == [0, 2, 6]
    cu[2] = 20  # (in place: the same tensor, other values)
    again = attention_tiles._block_index(cu, 20, 4)
    assert again is not first and again[0].tolist() == [0, 2, 6]
    assert attention_tiles._block_index(cu, 20, 8)[0].tolist() == [0, 1, 3]  # another block size
    fresh = torch.tensor([0, 3, 9], dtype=torch.int32)  # another tensor, as unchanged as cu was: not cu's index
    assert attention_tiles._block_index(fresh, 9, 4)[0].tolist() == [0, 1, 3]
    cu[1] = 9  # in place, the same total: not the index of the values it held
    assert attention_tiles._block_index(cu, 20, 4)[0].tolist() == [0, 3, 6]


def test_grads_of_k_and_v_alone_and_a_strided_output_grad():
    """Only k and v require grad (q frozen): the forward still saves what the backward needs. The output's grad
    arrives as a transposed view (token stride != Hq*D), read through its own strides."""
    cu, positions = _pack([7, 19], start=3)
    n = int(cu[-1])
    q, k, v = _inputs(n, 4, 2, 32, torch.float32)
    k.requires_grad_(True)
    v.requires_grad_(True)
    g = torch.randn(4, n, 32)  # [Hq, N, D]: do = g.transpose(0, 1)
    out = rope_attention(q, k, v, positions, cu)
    dk, dv = torch.autograd.grad((out.transpose(0, 1) * g).sum(), (k, v))
    ref_out, _, (_, ref_dk, ref_dv) = _reference(q, k, v, positions, cu, 10000.0, g.transpose(0, 1))
    _close(out.detach(), ref_out, torch.float32, "out")
    _close(dk, ref_dk, torch.float32, "dk")
    _close(dv, ref_dv, torch.float32, "dv")


def test_more_bad_inputs():
    cu, positions = _pack([3, 5])
    q, k, v = _inputs(8, 4, 2, 64, torch.float32)
    if not q.is_cuda:  # (checked where the lengths are on the host: on a GPU reading them back would sync)
        with pytest.raises(ValueError, match="non-decreasing"):
            rope_attention(q, k, v, positions, torch.tensor([0, 5, 3, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="positions must be integer"):
        rope_attention(q, k, v, positions.bool(), cu)
    cache = (torch.zeros(2, 4, 2, 64), torch.zeros(2, 4, 2, 64))
    with pytest.raises(ValueError, match="slot_mapping must be"):
        rope_attention(q, k, v, positions, cu, kv_cache=cache, slot_mapping=torch.zeros(8))
    strided = torch.zeros(2, 4, 2, 128)[..., ::2]
    with pytest.raises(ValueError, match="contiguous last dim"):
        rope_attention(q, k, v, positions, cu, kv_cache=(cache[0], strided), slot_mapping=torch.zeros(8).long())
    with pytest.raises(ValueError, match="lse fp32"):
        _rope_attention_fwd(q, k, v, positions, cu, 10000.0, 0.125, lse=torch.empty(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be"):
        _rope_attention_fwd(q, k, v, positions, cu, 10000.0, 0.125, out=torch.empty(8, 4, 128)[..., ::2])
    lse = torch.zeros(4, 8)
    for bad in (dict(dq=torch.empty(9, 4, 64)), dict(dk=torch.empty(8, 2, 128)[..., ::2])):  # (larger: in bounds)
        with pytest.raises(ValueError, match="gradient buffers"):
            _rope_attention_bwd(q, q, k, v, q, lse, positions, cu, 10000.0, 0.125, **bad)


@pytest.mark.parametrize("scale", [0.0, -0.125, math.inf, math.nan])
def test_a_softmax_scale_the_kernel_cannot_take_is_refused(scale):
    """The kernel scales the causally masked (-inf) scores: 0 * -inf is NaN and a negative scale makes them +inf,
    so such a scale came back as an all-NaN output; it is refused by name (on the reference path too)."""
    cu, positions = _pack([3, 5])
    q, k, v = _inputs(8, 4, 2, 16, torch.float32)
    for ctx in (contextlib.nullcontext(), dispatch.reference_ops()):
        with ctx, pytest.raises(ValueError, match="softmax_scale"):
            rope_attention(q, k, v, positions, cu, softmax_scale=scale)


def test_q_and_output_grad_without_unit_last_stride():
    """q [N, Hq, D] as a transposed view (last stride Hq) and an output grad likewise: copied for the kernels."""
    cu, positions = _pack([9, 14], start=0)
    n = int(cu[-1])
    qt = torch.randn(n, 32, 4, requires_grad=True)
    q = qt.transpose(1, 2)
    k, v = torch.randn(n, 2, 32, requires_grad=True), torch.randn(n, 2, 32, requires_grad=True)
    g = torch.randn(n, 32, 4)
    out = rope_attention(q, k, v, positions, cu)
    dqt, dk, dv = torch.autograd.grad((out.transpose(1, 2) * g).sum(), (qt, k, v))
    ref_out, _, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, positions, cu, 10000.0, g.transpose(1, 2))
    _close(out.detach(), ref_out, torch.float32, "out")
    _close(dqt.transpose(1, 2), ref_dq, torch.float32, "dq")
    _close(dk, ref_dk, torch.float32, "dk")
    _close(dv, ref_dv, torch.float32, "dv")
