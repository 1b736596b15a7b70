"""Causal flash attention over packed variable-length sequences with rotary embedding applied inside.

q [N, Hq, D], k/v [N, Hkv, D]: N tokens of S sequences packed back to back (cu_seqlens int [S+1]),
positions [N] any integers. RoPE (Llama / HF "rotate half") is applied once per token, never per tile
pair: a memory-bound pre-pass (kernels/rotary.py) rotates k into a [N, Hkv, D] buffer (in prefill the same
launch writes the rotated k and v into the paged KV cache), and the attention kernel rotates each query
tile in registers as it loads it (once per program). So the inner loops are plain flash-attention loops
that read keys as they are: no cos/sin, no register round trip of K between its load and the tensor
cores, and with GQA each key is rotated once rather than once per query head of its group.
Rotating K inside the inner loop instead (an earlier version) repeats the rotation T/BLOCK_M times per key
and per query head, and spilled registers at D = 128 (bench_rope_attention.py --ptxas); the pre-pass costs
one read and one write of K, and training keeps the rotated k for the backward anyway.

FlashAttention-2 forward (online softmax, exp2 with log2(e) folded into the scale, causal mask only on
diagonal blocks) and backward (delta preprocess, a dk/dv kernel looping over query blocks and over the
query heads of the GQA group, a dq kernel looping over key blocks; no atomics unless
rope_attention_bwd.DQ_ATOMIC, which drops the dq kernel for atomic adds of dq from the dk/dv kernel).
When gradients are needed the forward also stores the rotated q and autograd saves the rotated q and k
instead of q and k: same memory, and the backward's inner loops rotate nothing; only the finished dq and dk
tiles are rotated back (by -angle).

Q_PREPASS (opt-in, untimed): the pre-pass also rotates q (into the q_rot buffer training saves anyway) and the
forward loads its query tile as it is: no rotation in the forward, whose register peak (the prologue's rotation)
drops, so more programs fit on an SM at 64-row tiles; for one more pass over q's bytes.

WARP_SPEC (opt-in, untimed; implies Q_PREPASS, needs the tiles by TMA and bf16/fp16 on a GPU): the forward's key
loop warp-specialised by Triton's Hopper pass (tl.range(warp_specialize=True)): a producer warpgroup issues the
q, K and V bulk copies, two consumer warpgroups of 64 query rows each run the products and the softmax, registers
moved from the producer to the consumers (FlashAttention-3's layout; plain Triton 3.6 waits on every score product
at once, so only a second warpgroup's work can overlap one's exponentials). The pass wants one loop, no early exit
and q straight from a bulk copy: so every key tile is masked (a compare and a select a score) and programs past
the last block run an empty loop and store nothing. rope_attention_bwd.WARP_SPEC does the same to the dk/dv kernel.

GLUON_FWD (opt-in, untimed; implies Q_PREPASS; an sm_90 GPU, bf16/fp16, head dims 64 and 128): the forward in
Gluon (kernels/attention_gluon.py), FlashAttention-3's intra-warpgroup order: each key tile's score product and the
last tile's P @ V product issued together, the softmax computed while P @ V runs, which plain Triton 3.6 does not
schedule in any source order (it waits for each score product at once); with attention_gluon.PINGPONG (or PINGPONG=True
in a config) FA3's ping-pong form of it: a producer warp and two consumer warpgroups that issue their products in
turn. Its backward is this module's.

cos/sin of a query tile: within one tile the positions are normally consecutive (p0, p0+1, ...). Then
cos/sin((p0 + j) * f) come from cos/sin(p0 * f) (one row of transcendentals per tile) and a small
host-built table of cos/sin(j * f) by the angle-addition formulas, which keeps the special-function
units free for the softmax exponentials. Any other tile (left padding, arbitrary positions) computes
cos/sin per element.

Sequence lookup: the grid covers cdiv(N, BLOCK) + S query (or key) blocks, an upper bound on the
blocks of all sequences that needs no host sync; each program finds its (sequence, block) by binary
search in a device-built prefix sum of per-sequence block counts and exits if it is past the end.

GPU notes: the first call per (head dim, GQA group, dtype) autotunes, so warm up before CUDA-graph capture
(the cos/sin tables are also built and cached on that first call). fp32 inputs use exact fp32 dots
("ieee"): correct but far slower than bf16/fp16, which use tensor cores with fp32 accumulation.

Files: this module holds the public entry point, the autograd Function, the input checks and the forward
(kernel and launcher); kernels/rope_attention_bwd.py the backward; kernels/attention_tiles.py the jit tile
helpers and the host launch code both use.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import attention_gluon, dispatch, reference
from kernels.attention_tiles import (
    _FWD_SHAPES,
    _KEY,
    _LOG2E,
    _PRUNE,
    _TL_DTYPES,
    _configs,
    _dot_args,
    _dot_nt,
    _kv_bases,
    _last_dim_contiguous,
    _launch,
    _load_hd,
    _load_pair,
    _load_tile,
    _no_tma,
    _open_tile,
    _operand,
    _pop_switch,
    _pop_tma,
    _refuse_bounded,
    _rotate,
    _store_tile,
    _tile_rows,
    _warp_spec_refused,
    device_descriptor_scratch,
    rows_descriptor,
    seq_block,
)
from kernels.dispatch import loop_bound, use_triton
from kernels.rope_attention_bwd import _rope_attention_bwd
from kernels.rotary import TAB_ROWS, launch_rotary, rope_tables

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

# ------------------------------------------------------------------------------------- forward --


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q1r, q2r, offs_m, start_n, seq_len, tok0, k_base, v_base, stride_kn, stride_vn, offs_h, offs_d,
    qk_scale, kv_col, like, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, BOUNDED: tl.constexpr = False,
):  # fmt: skip
    """One key tile (keys already rotated) of the online softmax. MASKED: a diagonal tile (causal mask, keys may
    run past the end). q1r, q2r: the rotated query tile as a head-dim pair (_load_hd). TMA: k_base and v_base are
    tensor descriptors over [N, Hkv * D] (the tile at row tok0 + start_n, column kv_col), else pointers. BOUNDED:
    they are descriptors over this sequence's head alone (tok0 and kv_col 0), whose copies hold zeros past its end
    (the masked tiles' v rows are not zeroed here). like: a pointer of the inputs' dtype (what p is rounded to)."""
    PAD: tl.constexpr = HALF != HEAD_DIM // 2
    offs_n, n_ok, rows_n = _tile_rows(tok0, start_n, seq_len, BLOCK_N)
    k1r, k2r, v = _load_pair(
        k_base,
        v_base,
        tok0,
        start_n,
        kv_col,
        rows_n,
        n_ok,
        stride_kn,
        stride_vn,
        offs_h,
        offs_d,
        MASKED and not BOUNDED,
        HEAD_DIM,
        HALF,
        DOT_DTYPE,
        TMA,
        False,
    )  # fmt: skip  (a neighbour's keys: their scores are masked below)
    qk = _dot_nt(q1r, q2r, k1r, k2r, PAD, PREC)
    if MASKED:
        qk = tl.where(offs_n[None, :] <= offs_m[:, None], qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_ij[:, None])  # one FMA per score
    alpha = tl.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(_operand(p, like, DOT_DTYPE), v, acc, input_precision=PREC)
    return acc, l_i, m_ij


@triton.jit(do_not_specialize=["tune_bucket"])  # (read by the autotuner only: one binary for all)
def _fwd_kernel(
    Q, K, V, O, LSE, POS, CU_SEQ, CU_BLK, INV_FREQ, TAB, QR, KP, VP,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh, stride_qrn,
    n_tokens, num_seqs, qk_scale,
    N_STEPS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TAB_ROWS: tl.constexpr, SAVE_ROT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PREC: tl.constexpr, TMA: tl.constexpr, ROTATE_Q: tl.constexpr, tune_bucket, WARP_SPEC: tl.constexpr = False,
    BOUNDED: tl.constexpr = False,
):  # fmt: skip
    """Grid (query blocks of all sequences (upper bound), Hq). O [N, Hq, D]; LSE [Hq, N] fp32 (base 2).

    K holds the keys already rotated (kernels/rotary.py, once per token); q is rotated here, once per tile.
    SAVE_ROT: also store the rotated q in QR [N, Hq, D] (head stride D) for the backward. TMA: K and V are tensor
    descriptors over their [N, Hkv * D] rows with [BLOCK_N, HEAD_DIM] blocks (the strides then unused). ROTATE_Q
    False: Q is already rotated (Q_PREPASS: the rotary pre-pass did it with k), loaded as it is; no SAVE_ROT.

    WARP_SPEC (with TMA, q already rotated, and Q a tensor descriptor over [N, Hq * D] with [BLOCK_M, D] blocks):
    Triton's Hopper warp specialisation of the key loop: a producer warpgroup issues the K/V bulk copies and two
    consumer warpgroups (BLOCK_M / 2 rows each) run the products and the softmax, so one's exponentials overlap the
    other's tensor-core work (FlashAttention-3's layout). The pass takes one loop, no exit branch, and a q tile
    that comes straight from a bulk copy: so one loop with the causal mask on every tile, and a program past the
    last block runs an empty loop and stores nothing.

    BOUNDED (with WARP_SPEC; autotuned): K and V tiles by tensor descriptors this program makes over its own
    sequence's rows of KP and VP (the pointers under K and V): the bulk copies fill the rows past the sequence's end
    with zeros, so a neighbour's values never enter and no tile goes through registers to be zeroed (the plain loads
    zero v's rows past the end, which under WARP_SPEC is every tile: 224 KiB of shared memory instead of 180 at
    128-key tiles), for the descriptors' set-up in each program."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if not WARP_SPEC:
        if pid >= tl.load(CU_BLK + num_seqs):
            return
    kvh = h // GROUP
    tok0, seq_len, start_m, offs_m, m_ok, rows_m, offs_h, offs_d, inv_freq = _open_tile(
        CU_BLK, CU_SEQ, INV_FREQ, pid, num_seqs, n_tokens, N_STEPS, True, BLOCK_M, HEAD_DIM, HALF
    )
    HALF_D: tl.constexpr = HEAD_DIM // 2
    PAD: tl.constexpr = HALF != HALF_D
    hi = tl.minimum(start_m + BLOCK_M, seq_len)  # (the keys this tile's queries see: [0, hi))

    if WARP_SPEC:
        valid = pid < tl.load(CU_BLK + num_seqs)
        m_ok = m_ok & valid
        hi = tl.where(valid, hi, 0)
        q1r = Q.load([tl.where(valid, tok0 + start_m, 0), h * HEAD_DIM]).to(DOT_DTYPE)
        q2r = q1r
    elif ROTATE_Q:  # (the prologue's register peak: 215 at 64-row tiles and 4 warps, against 120 without it)
        q_base = Q + h * stride_qh
        q1 = _load_tile(q_base, rows_m, m_ok, stride_qn, offs_h, HALF_D, True, PAD).to(tl.float32)
        q2 = _load_tile(q_base + HALF_D, rows_m, m_ok, stride_qn, offs_h, HALF_D, True, PAD).to(tl.float32)
        q1r, q2r = _rotate(q1, q2, POS, tok0, start_m, seq_len, inv_freq, TAB, offs_h, BLOCK_M, HALF, TAB_ROWS, 1.0)
        if SAVE_ROT:
            qr_base = QR + h * HEAD_DIM
            _store_tile(qr_base, q1r, rows_m, m_ok, stride_qrn, offs_h, HALF_D, PAD)
            _store_tile(qr_base + HALF_D, q2r, rows_m, m_ok, stride_qrn, offs_h, HALF_D, PAD)
        q1r = _operand(q1r, Q, DOT_DTYPE)
        q2r = _operand(q2r, Q, DOT_DTYPE)
        if not PAD:  # the halves side by side as one [BLOCK_M, HEAD_DIM] operand (the pair _load_hd gives)
            q1r = tl.reshape(tl.permute(tl.join(q1r, q2r), (0, 2, 1)), (BLOCK_M, HEAD_DIM))
            q2r = q1r
    else:
        q1r, q2r = _load_hd(Q + h * stride_qh, rows_m, m_ok, stride_qn, offs_h, offs_d, True, HEAD_DIM, HALF, DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base, v_base, kv_tok0, kv_col = _kv_bases(
        K, V, KP, VP, kvh, tok0, seq_len, stride_kn, stride_kh, stride_vn, stride_vh, BLOCK_N, HEAD_DIM, TMA, BOUNDED
    )  # (BOUNDED: this sequence's keys and values alone, tiles at its rows from 0)
    if WARP_SPEC:  # every key tile [0, hi) in one warp-specialised loop, all masked
        for start_n in tl.range(0, loop_bound(hi), BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q1r, q2r, offs_m, start_n, seq_len, kv_tok0, k_base, v_base, stride_kn, stride_vn,
                offs_h, offs_d, qk_scale, kv_col, Q, True, HEAD_DIM, HALF, BLOCK_N, DOT_DTYPE, PREC, TMA, BOUNDED,
            )  # fmt: skip
    else:
        # off-diagonal key tiles [0, start_m): all visible, no mask
        for start_n in range(0, loop_bound(start_m), BLOCK_N):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q1r, q2r, offs_m, start_n, seq_len, tok0, k_base, v_base, stride_kn, stride_vn,
                offs_h, offs_d, qk_scale, kvh * HEAD_DIM, Q, False, HEAD_DIM, HALF, BLOCK_N, DOT_DTYPE, PREC, TMA,
            )  # fmt: skip
        # diagonal key tiles [start_m, hi): causal mask
        for start_n in range(loop_bound(start_m), loop_bound(hi), BLOCK_N):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q1r, q2r, offs_m, start_n, seq_len, tok0, k_base, v_base, stride_kn, stride_vn,
                offs_h, offs_d, qk_scale, kvh * HEAD_DIM, Q, True, HEAD_DIM, HALF, BLOCK_N, DOT_DTYPE, PREC, TMA,
            )  # fmt: skip

    acc = acc / l_i[:, None]
    _store_tile(O + h * stride_oh, acc, rows_m, m_ok, stride_on, offs_d, HEAD_DIM, False)
    # base-2 logsumexp of the scaled scores: p = exp2(s * qk_scale - lse) in the backward
    tl.store(LSE + h * n_tokens + tok0 + offs_m, m_i + tl.log2(l_i), mask=m_ok)


# q rotated by the rotary pre-pass in the launch that rotates k (q_rot [N, Hq, D] written there, read by the forward)
# instead of in the forward's prologue: the forward's register peak drops (at 64-row tiles and 4 warps from 215 to
# 120, four programs an SM instead of two), for one more pass over q's bytes (a read in training, which stores q_rot
# anyway; a write and a read in prefill), and prefill's queries get the decode path's rotation bits. Off until a
# GPU has timed it (bench_rope_attention.py --sweep); it pays only with the forward's 64-row blocks.
Q_PREPASS = False

# Triton's Hopper warp specialisation of the forward's key loop (WARP_SPEC in _fwd_kernel): a producer warpgroup
# for the K/V bulk copies, two consumer warpgroups of 64 query rows, registers moved to the consumers (setmaxnreg);
# FlashAttention-3's layout, compiled from the same kernel. It needs the tiles by TMA and q rotated by the pre-pass
# (so it implies Q_PREPASS), and bf16/fp16 inputs on the GPU. Off until a GPU has timed and checked it
# (bench_rope_attention.py: the row "ours, warp-specialised", and the sweep).
WARP_SPEC = False

# The forward in Gluon (kernels/attention_gluon.py: FlashAttention-3's intra-warpgroup order, the softmax of one key
# tile while the tensor cores run the last tile's P @ V, which plain Triton 3.6 does not schedule; in 8 warps, or
# with attention_gluon.PINGPONG in FA3's ping-pong form, a producer warp and two consumer warpgroups taking turns), on
# an sm_90 GPU with bf16/fp16 and head dims 64 and 128; q rotated by the pre-pass. Off until a GPU has checked and
# timed it (bench_rope_attention.py: the rows "ours, Gluon forward" and "ours, Gluon forward, ping-pong").
GLUON_FWD = False


def _gluon_config(config: dict | None) -> dict:
    """An explicit launch config for the Gluon forward -> {BLOCK_N, num_stages, PINGPONG} (None: its defaults): its
    query block is 128 rows, in 8 warps (two warpgroups) or, PINGPONG=True, in the ping-pong kernel's two consumer
    warpgroups and producer warp (num_warps=4: the default partition); it has no other switch."""
    config = dict(config or {})
    if config.pop("WARP_SPEC", False) or config.pop("BOUNDED", False):
        raise ValueError("config GLUON=True with WARP_SPEC or BOUNDED: the Gluon forward is a forward of its own")
    if config.pop("BLOCK_M", attention_gluon.BLOCK_M) != attention_gluon.BLOCK_M:
        raise ValueError(f"config GLUON=True takes BLOCK_M={attention_gluon.BLOCK_M} (two warpgroups of 64 rows)")
    pingpong = config.pop("PINGPONG", None)
    warps = attention_gluon.PINGPONG_WARPS if pingpong else attention_gluon.NUM_WARPS
    if config.pop("num_warps", warps) != warps:
        kind = "with PINGPONG=True" if pingpong else "without PINGPONG"
        raise ValueError(f"config GLUON=True {kind} takes num_warps={warps}")
    if not config.pop("Q_PREPASS", True):
        raise ValueError("config GLUON=True with Q_PREPASS=False: the Gluon forward loads q rotated by the pre-pass")
    out = {"BLOCK_N": config.pop("BLOCK_N", None), "num_stages": config.pop("num_stages", None), "PINGPONG": pingpong}
    if config:
        raise ValueError(f"config GLUON=True takes BLOCK_N, num_stages and PINGPONG, not {sorted(config)}")
    return out


# the autotuned GPU variants (attention_tiles._configs, _FWD_SHAPES); the warp-specialised one at 4 warps a
# partition (12 in all), with 128-key tiles in 2 stages (224 KiB of shared memory at D = 128) or 64-key in 2 or 3,
# each also BOUNDED (per-sequence descriptors: 180 KiB at 128-key tiles; 64-key tiles in 4 stages fit then)
_fwd_tuned = dispatch.autotune(_configs("BLOCK_N", _FWD_SHAPES), key=_KEY, prune_configs_by=_PRUNE)(_fwd_kernel)
_FWD_WS_SHAPES = ((128, 4, 2), (64, 4, 2), (64, 4, 3))
_FWD_WS_SHAPES += tuple((*shape, {"BOUNDED": True}) for shape in _FWD_WS_SHAPES + ((64, 4, 4),))
_fwd_ws_tuned = dispatch.autotune(_configs("BLOCK_N", _FWD_WS_SHAPES, ("Q",)), key=_KEY, prune_configs_by=_PRUNE)(
    _fwd_kernel
)


# --------------------------------------------------------------------------------- host launchers --


def _check_inputs(q, k, v, positions, cu_seqlens, kv_cache, slot_mapping) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [N, H, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    n, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != d:
        raise ValueError(f"k and v must be [N={n}, Hkv, D={d}]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"query heads {hq} are not a multiple of key/value heads {k.shape[1]}")
    if q.dtype not in _TL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if d % 2:
        raise ValueError(f"head dim {d} must be even for rotary")
    if positions.shape != (n,) or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"positions must be integer [N={n}]; got {positions.dtype} {tuple(positions.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be int32 [S+1] with S >= 1; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device.type == "cpu":  # free to check here; on a GPU this would need a host sync
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n:
            raise ValueError(f"cu_seqlens must start at 0 and end at N={n}; got {cu_seqlens[0]}..{cu_seqlens[-1]}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
    if (kv_cache is None) != (slot_mapping is None):
        raise ValueError("kv_cache and slot_mapping must be given together")
    if kv_cache is not None:
        if len(kv_cache) != 2:
            raise ValueError("kv_cache must be a pair (k_cache, v_cache)")
        kc, vc = kv_cache
        if kc.dim() != 4 or kc.shape != vc.shape or tuple(kc.shape[2:]) != (k.shape[1], d):
            raise ValueError(
                f"k_cache and v_cache must be [num_blocks, block_size, Hkv={k.shape[1]}, D={d}]; "
                f"got {tuple(kc.shape)} and {tuple(vc.shape)}"
            )
        if slot_mapping.shape != (n,) or slot_mapping.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"slot_mapping must be int64 [N={n}]; got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
            )


def _rope_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    rope_theta: float | reference.Rope,
    softmax_scale: float,
    kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    slot_mapping: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    save_rotated: bool = False,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the rotary pre-pass and the forward. Returns out [N, Hq, D] (q's dtype), lse [Hq, N] fp32 (base-2,
    scaled scores), the rotated q [N, Hq, D] with save_rotated (else None) and the rotated k [N, Hkv, D]: what
    the backward needs. config: an explicit launch {BLOCK_M (query block), BLOCK_N, num_warps, num_stages, and
    TMA: whether K and V tiles come by tensor descriptor (default: attention_tiles.use_tma), Q_PREPASS (default: the
    module's), WARP_SPEC (default: the module's, where attention_tiles._warp_spec_refused has no reason), maxnreg}
    instead of the autotuned one (benchmark sweeps, tests)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} not supported by the kernel (supported: {SUPPORTED_HEAD_DIMS})")
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.empty(hq, n, dtype=torch.float32, device=q.device) if lse is None else lse
    if out.shape != q.shape or out.stride(-1) != 1 or lse.shape != (hq, n) or lse.dtype != torch.float32:
        raise ValueError("out must be [N, Hq, D] with a contiguous last dim and lse fp32 [Hq, N]")
    # the keys rotated once per token (kernels/rotary.py): the attention kernel reads them as they are; the
    # backward reuses them; in prefill the same launch writes them (and v) into the paged KV cache
    k_rot = torch.empty(n, hkv, d, dtype=q.dtype, device=q.device)
    config, tma = _pop_tma(config, d, k_rot, v)
    config, gluon = _pop_switch(config, "GLUON", None)
    if gluon is None:  # (the switch takes the launches without an explicit config: one is a Triton launch)
        gluon = GLUON_FWD and tma and not config and attention_gluon.refused(q.dtype, d, q.device, k_rot, v) is None
    elif gluon and (no_gluon := attention_gluon.refused(q.dtype, d, q.device, k_rot, v) or _no_tma(tma)):
        raise ValueError(f"config GLUON=True, but {no_gluon}")
    if gluon:  # (the Gluon forward: q rotated by the pre-pass, one 128-row block, 8 warps)
        config = _gluon_config(config)
    config, ws = _pop_switch(config, "WARP_SPEC", False if gluon else None)
    config, prepass = _pop_switch(config, "Q_PREPASS", None)
    no_prepass = "it loads q rotated by the pre-pass (Q_PREPASS=False given)" if prepass is False else None
    why = _warp_spec_refused(q.dtype, tma, no_prepass)
    if ws and why:
        raise ValueError(f"config WARP_SPEC=True, but {why}")
    ws = (WARP_SPEC and why is None) if ws is None else ws
    _refuse_bounded(config, ws, "config")
    prepass = ws or gluon or (Q_PREPASS if prepass is None else prepass)
    q_rot = torch.empty(n, hq, d, dtype=q.dtype, device=q.device) if save_rotated or prepass else None
    if n == 0:
        return out, lse, q_rot if save_rotated else None, k_rot
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    positions = positions.to(q.device).contiguous()  # the kernels index it as a flat array
    inv_freq, tab = rope_tables(d, rope_theta, q.device)
    cache = {}
    if kv_cache is not None:
        kc, vc = kv_cache
        if kc.stride(-1) != 1 or vc.stride(-1) != 1:
            raise ValueError("k_cache and v_cache must have a contiguous last dim")
        cache = dict(k_cache=kc, v_cache=vc, slot_mapping=slot_mapping.to(q.device))
    queries = dict(q=q, q_out=q_rot) if prepass else {}  # (Q_PREPASS: q rotated in the same launch as k)
    launch_rotary(k, v, positions, rope_theta=rope_theta, k_out=k_rot, **queries, **cache)
    if cache and cache["k_cache"].dtype != q.dtype:  # a float8 cache: attend to what the decode steps will read
        k_rot, v = reference.read_back_kv(k_rot, v, cache["k_cache"], cache["v_cache"], cache["slot_mapping"])
    if gluon:
        attention_gluon.forward(q_rot, k_rot, v, out, lse, cu, softmax_scale, *config.values())
        return out, lse, q_rot if save_rotated else None, k_rot
    kd, vd = (rows_descriptor(k_rot), rows_descriptor(v)) if tma else (k_rot, v)
    q_in = q_src = q_rot if prepass else q
    block = seq_block("fwd", config, "BLOCK_M")
    if ws:  # q's tile by bulk copy too: a [sequence block, D] block, which the launch leaves as it is
        q_in = rows_descriptor(q_rot, block)
        device_descriptor_scratch()  # (BOUNDED variants make descriptors in global memory Triton asks for)
    make_args = lambda cu_blk: (
        q_in, kd, vd, out, lse, positions, cu, cu_blk, inv_freq, tab, q_rot if save_rotated else out, k_rot, v,
        q_src.stride(0), q_src.stride(1), k_rot.stride(0), k_rot.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), hq * d, n, cu.numel() - 1, softmax_scale * _LOG2E,
    )  # fmt: skip
    meta = dict(GROUP=hq // hkv, HEAD_DIM=d, HALF=max(d // 2, 16), TAB_ROWS=TAB_ROWS, TMA=tma)
    meta.update(SAVE_ROT=save_rotated and not prepass, ROTATE_Q=not prepass, WARP_SPEC=ws)
    tuned = _fwd_ws_tuned if ws else _fwd_tuned
    meta.update(_dot_args(q.dtype))
    _launch(_fwd_kernel, tuned, hq, make_args, cu, n, "BLOCK_M", "BLOCK_N", config, ("Q",), block=block, **meta)
    return out, lse, q_rot if save_rotated else None, k_rot


# ------------------------------------------------------------------------------------- autograd --


class _RopeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, cu_seqlens, rope_theta, softmax_scale, kv_cache, slot_mapping):
        # the rotated q and k are saved instead of q and k: same memory, and the backward rotates nothing
        # in its inner loops (only dq and dk are rotated back, once per tile)
        save = any(ctx.needs_input_grad[:3])
        out, lse, q_rot, k_rot = _rope_attention_fwd(
            q, k, v, positions, cu_seqlens, rope_theta, softmax_scale, kv_cache, slot_mapping, save_rotated=save
        )
        if save:
            if kv_cache is not None and kv_cache[0].dtype != q.dtype:  # (the V the forward attended to: read back)
                v = reference.read_back_kv(k_rot, v, *kv_cache, slot_mapping.to(q.device))[1]
            ctx.save_for_backward(q_rot, k_rot, v, out, lse, positions, cu_seqlens)
        ctx.rope_theta = rope_theta
        ctx.softmax_scale = softmax_scale
        return out

    @staticmethod
    def backward(ctx, do):
        q_rot, k_rot, v, out, lse, positions, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _rope_attention_bwd(
            do, q_rot, k_rot, v, out, lse, positions, cu_seqlens, ctx.rope_theta, ctx.softmax_scale
        )
        return dq, dk, dv, None, None, None, None, None, None


# --------------------------------------------------------------------------------------- public --


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    rope_theta: float | reference.Rope = 10000.0,
    softmax_scale: float | None = None,
    kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence, with rotary applied to q and k inside the kernel.

    q [N, Hq, D], k/v [N, Hkv, D] (Hq a multiple of Hkv; fp16/bf16/fp32, one dtype); positions [N] int;
    cu_seqlens int32 [S+1] (0, ..., N). Returns [N, Hq, D] in q's dtype; differentiable w.r.t. q, k, v.
    Head dims 16, 32, 64, 128 on the kernel path. softmax_scale defaults to 1/sqrt(D).
    kv_cache=(k_cache, v_cache), each [num_blocks, block_size, Hkv, D], with slot_mapping [N] int64
    (block * block_size + offset, -1 = skip): also write the rotated k and the v of each token there.
    cu_seqlens is validated on the host only when it lives on the CPU (no GPU sync); on the GPU the
    kernels clamp the last sequence to N.
    """
    _check_inputs(q, k, v, positions, cu_seqlens, kv_cache, slot_mapping)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not 0 < scale < math.inf:  # (the kernel scales the masked -inf scores: 0 * -inf is NaN, -1 * -inf is +inf)
        raise ValueError(f"softmax_scale must be > 0 and finite, got {softmax_scale}")
    if use_triton(q):
        if kv_cache is not None:
            kv_cache = tuple(kv_cache)
        return _RopeAttention.apply(q, k, v, positions, cu_seqlens, rope_theta, scale, kv_cache, slot_mapping)
    if kv_cache is None:
        return reference.rope_attention(q, k, v, positions, cu_seqlens, rope_theta=rope_theta, softmax_scale=scale)
    # the cache gets the fp32 rotation rounded once to its own dtype (as the kernel writes it, float8 included)
    q_rot = reference.rope_write_kv(q, k, v, positions, *kv_cache, slot_mapping, rope_theta)
    k_rot = reference.apply_rotary(k, positions, rope_theta)
    if kv_cache[0].dtype != q.dtype:  # a float8 cache: attend to what the decode steps will read
        k_rot, v = reference.read_back_kv(k_rot, v, *kv_cache, slot_mapping)
    return reference.varlen_causal_attention(q_rot, k_rot, v, cu_seqlens, scale)
