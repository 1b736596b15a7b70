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
query heads of the GQA group, a dq kernel looping over key blocks; no atomics). When gradients are needed
the forward also stores the rotated q and autograd saves the rotated q and k instead of q and k: same
memory, and the backward's inner loops rotate nothing; only the finished dq and dk tiles are rotated back
(by -angle).

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
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.dispatch import INTERPRET, loop_bound, use_triton
from kernels.rotary import TAB_ROWS, launch_rotary, reduce_angle, rope_tables

_LOG2E = 1.4426950408889634
# Sequence-block size shared by the forward (query blocks), dk/dv (key blocks) and dq (query blocks)
# kernels, and the inner tile sizes used under the interpreter (small, so that the tests run the
# off-diagonal loop and several diagonal sub-tiles on short sequences).
_BLOCK = 32 if INTERPRET else 128
_INNER_INTERPRET = 16
_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# ---------------------------------------------------------------------------------- jit helpers --


@triton.jit
def _find_seq(CU_BLK, pid, num_seqs, N_STEPS: tl.constexpr):
    """Largest s in [0, num_seqs) with CU_BLK[s] <= pid (binary search; empty sequences are skipped)."""
    lo = num_seqs * 0
    hi = num_seqs
    for _ in tl.static_range(N_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(CU_BLK + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _locate_tile(CU_BLK, CU_SEQ, pid, num_seqs, n_tokens, N_STEPS: tl.constexpr, FROM_END: tl.constexpr):
    """Program pid's tile: (first token of its sequence, the sequence's length, the tile's block index).

    FROM_END counts blocks from the sequence's last one, so the grid runs the longest causal query
    tiles first (shorter tail at the end); otherwise from its first (key tiles that see most queries)."""
    seq = _find_seq(CU_BLK, pid, num_seqs, N_STEPS)
    if FROM_END:
        blk = tl.load(CU_BLK + seq + 1) - 1 - pid
    else:
        blk = pid - tl.load(CU_BLK + seq)
    tok0 = tl.load(CU_SEQ + seq)
    seq_len = tl.minimum(tl.load(CU_SEQ + seq + 1), n_tokens) - tok0
    return tok0, seq_len, blk


@triton.jit
def _tile_rows(tok0, start, seq_len, BLOCK: tl.constexpr):
    """Offsets in the sequence [BLOCK], which of them exist, and their packed rows (int64)."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < seq_len, (tok0 + offs).to(tl.int64)


@triton.jit
def _load_tile(base, rows, row_ok, stride_n, cols, ncols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """x[rows, cols] of a [N, ., D] tensor (last dim contiguous); masked elements read as 0."""
    ptrs = base + rows[:, None] * stride_n + cols[None, :]
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & (cols < ncols)[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=(cols < ncols)[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(base, x, rows, row_ok, stride_n, cols, ncols, MASK_COLS: tl.constexpr):
    ptrs = base + rows[:, None] * stride_n + cols[None, :]
    if MASK_COLS:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=row_ok[:, None] & (cols < ncols)[None, :])
    else:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _operand(x, like, DOT_DTYPE: tl.constexpr):
    """A computed tile as a dot operand: rounded to the inputs' dtype (`like` points to one), which is what
    the GPU multiplies, then to DOT_DTYPE (fp32 under the interpreter, so it rounds exactly like the GPU)."""
    return x.to(like.dtype.element_ty).to(DOT_DTYPE)


@triton.jit
def _load_hd(base, rows, row_ok, stride_n, offs_h, offs_d, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
             HALF: tl.constexpr, DOT_DTYPE: tl.constexpr):  # fmt: skip
    """A [R, HEAD_DIM] tile as head-dim dot operands (x1, x2): the whole tile (x2 = x1) when each half is at least
    tl.dot's minimum width, else its two halves padded to HALF columns. _dot_nt / _dot_acc consume the pair."""
    HALF_D: tl.constexpr = HEAD_DIM // 2
    if HALF != HALF_D:
        x1 = _load_tile(base, rows, row_ok, stride_n, offs_h, HALF_D, MASK_ROWS, True).to(DOT_DTYPE)
        x2 = _load_tile(base + HALF_D, rows, row_ok, stride_n, offs_h, HALF_D, MASK_ROWS, True).to(DOT_DTYPE)
    else:
        x1 = _load_tile(base, rows, row_ok, stride_n, offs_d, HEAD_DIM, MASK_ROWS, False).to(DOT_DTYPE)
        x2 = x1
    return x1, x2


@triton.jit
def _dot_nt(a1, a2, b1, b2, PAD: tl.constexpr, PREC: tl.constexpr):
    """a @ b^T over the head dim, for operand pairs of _load_hd: one dot, or one per padded half."""
    r = tl.dot(a1, tl.trans(b1), input_precision=PREC)
    if PAD:
        r = tl.dot(a2, tl.trans(b2), r, input_precision=PREC)
    return r


@triton.jit
def _dot_acc(p, b1, b2, acc1, acc2, PAD: tl.constexpr, PREC: tl.constexpr):
    """acc += p @ b for a head-dim operand pair b (accumulators from _zeros_hd)."""
    acc1 = tl.dot(p, b1, acc1, input_precision=PREC)
    if PAD:
        acc2 = tl.dot(p, b2, acc2, input_precision=PREC)
    return acc1, acc2


@triton.jit
def _zeros_hd(R: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    """fp32 accumulators for a head-dim pair: [R, HEAD_DIM] (and a placeholder), or two [R, HALF] halves."""
    if HALF != HEAD_DIM // 2:
        a1 = tl.zeros([R, HALF], tl.float32)
        a2 = tl.zeros([R, HALF], tl.float32)
    else:
        a1 = tl.zeros([R, HEAD_DIM], tl.float32)
        a2 = 0.0
    return a1, a2


@triton.jit
def _halves(x1, x2, R: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    """A head-dim pair as its two halves [R, HALF] (what the rotation works on)."""
    if HALF != HEAD_DIM // 2:
        h1 = x1
        h2 = x2
    else:
        h1, h2 = tl.split(tl.permute(tl.reshape(x1, (R, 2, HALF)), (0, 2, 1)))
    return h1, h2


@triton.jit
def _rotate(
    x1, x2, POS, tok0, start, n_valid, inv_freq, TAB, offs_h, R: tl.constexpr, HALF: tl.constexpr,
    TAB_ROWS: tl.constexpr, SIGN: tl.constexpr,
):  # fmt: skip
    """Rotate halves x1, x2 [R, HALF] fp32 of rows at positions[tok0 + start + j]: x*cos + rotate_half(x)*sin.

    SIGN = -1 rotates by minus the angle: the transpose of the rotation, which maps a gradient w.r.t. the
    rotated vector back to the input.

    Consecutive positions: rotate by p0 * f (a [HALF] row of cos/sin), then by j * f from the table, which
    keeps fewer [R, HALF] fp32 temporaries alive than forming cos/sin of the sum first.
    """
    j = tl.arange(0, R)
    valid = start + j < n_valid
    pos = tl.load(POS + tok0 + start + j, mask=valid, other=0)
    p0 = tl.load(POS + tok0 + start)
    gap = tl.where(valid, pos - p0 - j, 0)
    if tl.max(tl.abs(gap), axis=0) == 0:
        a0 = reduce_angle(p0.to(tl.float32) * inv_freq)
        c0 = tl.cos(a0)[None, :]
        s0 = SIGN * tl.sin(a0)[None, :]
        u1 = x1 * c0 - x2 * s0
        u2 = x2 * c0 + x1 * s0
        tc = tl.load(TAB + j[:, None] * HALF + offs_h[None, :])
        ts = SIGN * tl.load(TAB + TAB_ROWS * HALF + j[:, None] * HALF + offs_h[None, :])
        y1 = u1 * tc - u2 * ts
        y2 = u2 * tc + u1 * ts
    else:
        a = reduce_angle(pos.to(tl.float32)[:, None] * inv_freq[None, :])
        c = tl.cos(a)
        s = SIGN * tl.sin(a)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
    return y1, y2


# ------------------------------------------------------------------------------------- forward --


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q1r, q2r, offs_m, start_n, seq_len, tok0, k_base, v_base, stride_kn, stride_vn, offs_h, offs_d,
    qk_scale, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One key tile (keys already rotated) of the online softmax. MASKED: a diagonal tile (causal mask, keys may
    run past the end). q1r, q2r: the rotated query tile as a head-dim pair (_load_hd)."""
    PAD: tl.constexpr = HALF != HEAD_DIM // 2
    offs_n, n_ok, rows_n = _tile_rows(tok0, start_n, seq_len, BLOCK_N)
    k1r, k2r = _load_hd(k_base, rows_n, n_ok, stride_kn, offs_h, offs_d, MASKED, HEAD_DIM, HALF, DOT_DTYPE)
    qk = _dot_nt(q1r, q2r, k1r, k2r, PAD, PREC)
    v = _load_tile(v_base, rows_n, n_ok, stride_vn, offs_d, HEAD_DIM, MASKED, False).to(DOT_DTYPE)
    if MASKED:
        qk = tl.where(offs_n[None, :] <= offs_m[:, None], qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_ij[:, None])  # one FMA per score
    alpha = tl.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(_operand(p, v_base, DOT_DTYPE), v, acc, input_precision=PREC)
    return acc, l_i, m_ij


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, POS, CU_SEQ, CU_BLK, INV_FREQ, TAB, QR,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh, stride_qrn,
    n_tokens, num_seqs, qk_scale,
    N_STEPS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TAB_ROWS: tl.constexpr, SAVE_ROT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Grid (query blocks of all sequences (upper bound), Hq). O [N, Hq, D]; LSE [Hq, N] fp32 (base 2).

    K holds the keys already rotated (kernels/rotary.py, once per token); q is rotated here, once per tile.
    SAVE_ROT: also store the rotated q in QR [N, Hq, D] (head stride D) for the backward."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if pid >= tl.load(CU_BLK + num_seqs):
        return
    tok0, seq_len, blk = _locate_tile(CU_BLK, CU_SEQ, pid, num_seqs, n_tokens, N_STEPS, True)
    start_m = blk * BLOCK_M
    kvh = h // GROUP
    HALF_D: tl.constexpr = HEAD_DIM // 2
    PAD: tl.constexpr = HALF != HALF_D

    offs_m, m_ok, rows_m = _tile_rows(tok0, start_m, seq_len, BLOCK_M)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    inv_freq = tl.load(INV_FREQ + offs_h)

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

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    # off-diagonal key tiles [0, start_m): all visible, no mask
    for start_n in range(0, loop_bound(start_m), BLOCK_N):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q1r, q2r, offs_m, start_n, seq_len, tok0, k_base, v_base, stride_kn, stride_vn,
            offs_h, offs_d, qk_scale, False, HEAD_DIM, HALF, BLOCK_N, DOT_DTYPE, PREC,
        )  # fmt: skip
    # diagonal key tiles [start_m, min(start_m + BLOCK_M, seq_len)): causal mask
    for start_n in range(loop_bound(start_m), loop_bound(tl.minimum(start_m + BLOCK_M, seq_len)), BLOCK_N):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q1r, q2r, offs_m, start_n, seq_len, tok0, k_base, v_base, stride_kn, stride_vn,
            offs_h, offs_d, qk_scale, True, HEAD_DIM, HALF, BLOCK_N, DOT_DTYPE, PREC,
        )  # fmt: skip

    acc = acc / l_i[:, None]
    _store_tile(O + h * stride_oh, acc, rows_m, m_ok, stride_on, offs_d, HEAD_DIM, False)
    # base-2 logsumexp of the scaled scores: p = exp2(s * qk_scale - lse) in the backward
    tl.store(LSE + h * n_tokens + tok0 + offs_m, m_i + tl.log2(l_i), mask=m_ok)


# ------------------------------------------------------------------------------------ backward --


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, stride_on, stride_oh, stride_don, stride_doh, n_tokens, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr
):
    """DELTA[h, n] = sum_d dO * O (fp32), the softmax-backward row term. Grid (cdiv(N, BLOCK_T), Hq)."""
    h = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    t_ok = offs_t < n_tokens
    rows = offs_t.to(tl.int64)
    o = _load_tile(O + h * stride_oh, rows, t_ok, stride_on, offs_d, HEAD_DIM, True, False).to(tl.float32)
    do = _load_tile(DO + h * stride_doh, rows, t_ok, stride_don, offs_d, HEAD_DIM, True, False).to(tl.float32)
    tl.store(DELTA + h * n_tokens + offs_t, tl.sum(o * do, 1), mask=t_ok)


@triton.jit
def _bwd_dkdv_step(
    dk1, dk2, dv, k1r, k2r, v, offs_n, start_m, seq_len, tok0, q_base, do_base, lse_base, delta_base, stride_qn,
    stride_don, offs_h, offs_d, qk_scale, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One query tile against this program's key tile (transposed scores [BLOCK_N, BLOCK_M]). k1r, k2r and
    the accumulators dk1, dk2 are head-dim pairs (_load_hd, _zeros_hd)."""
    PAD: tl.constexpr = HALF != HEAD_DIM // 2
    offs_m, m_ok, rows_m = _tile_rows(tok0, start_m, seq_len, BLOCK_M)
    q1r, q2r = _load_hd(q_base, rows_m, m_ok, stride_qn, offs_h, offs_d, True, HEAD_DIM, HALF, DOT_DTYPE)
    do = _load_tile(do_base, rows_m, m_ok, stride_don, offs_d, HEAD_DIM, True, False).to(DOT_DTYPE)
    # rows past the sequence end get lse = +inf, hence p = 0: they contribute nothing
    lse = tl.load(lse_base + tok0 + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_base + tok0 + offs_m, mask=m_ok, other=0.0)
    qk_t = _dot_nt(k1r, k2r, q1r, q2r, PAD, PREC)
    p_t = tl.exp2(qk_t * qk_scale - lse[None, :])
    if MASKED:
        p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
    dv = tl.dot(_operand(p_t, q_base, DOT_DTYPE), do, dv, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = _operand(p_t * (dp_t - delta[None, :]), q_base, DOT_DTYPE)
    dk1, dk2 = _dot_acc(ds_t, q1r, q2r, dk1, dk2, PAD, PREC)
    return dk1, dk2, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, POS, CU_SEQ, CU_BLK, INV_FREQ, TAB,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dkn, stride_dkh, stride_dvn, stride_dvh,
    n_tokens, num_seqs, qk_scale, sm_scale,
    N_STEPS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, TAB_ROWS: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Grid (key blocks of all sequences (upper bound), Hkv). dk, dv of one key tile, summed over the group.

    Q, K are the rotated q and k the forward saved; dk is rotated back (by -angle) at the end."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    if pid >= tl.load(CU_BLK + num_seqs):
        return
    tok0, seq_len, blk = _locate_tile(CU_BLK, CU_SEQ, pid, num_seqs, n_tokens, N_STEPS, False)
    start_n = blk * BLOCK_N
    HALF_D: tl.constexpr = HEAD_DIM // 2
    PAD: tl.constexpr = HALF != HALF_D

    offs_n, n_ok, rows_n = _tile_rows(tok0, start_n, seq_len, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    inv_freq = tl.load(INV_FREQ + offs_h)
    k1r, k2r = _load_hd(K + kvh * stride_kh, rows_n, n_ok, stride_kn, offs_h, offs_d, True, HEAD_DIM, HALF, DOT_DTYPE)
    v = _load_tile(V + kvh * stride_vh, rows_n, n_ok, stride_vn, offs_d, HEAD_DIM, True, False).to(DOT_DTYPE)

    dk1, dk2 = _zeros_hd(BLOCK_N, HEAD_DIM, HALF)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    diag_end = tl.minimum(start_n + BLOCK_N, seq_len)
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = Q + h * stride_qh
        do_base = DO + h * stride_doh
        lse_base = LSE + h * n_tokens
        delta_base = DELTA + h * n_tokens
        # diagonal query tiles [start_n, start_n + BLOCK_N): causal mask
        for start_m in range(loop_bound(start_n), loop_bound(diag_end), BLOCK_M):
            dk1, dk2, dv = _bwd_dkdv_step(
                dk1, dk2, dv, k1r, k2r, v, offs_n, start_m, seq_len, tok0, q_base, do_base, lse_base,
                delta_base, stride_qn, stride_don, offs_h, offs_d, qk_scale,
                True, HEAD_DIM, HALF, BLOCK_M, DOT_DTYPE, PREC,
            )  # fmt: skip
        # later query tiles see the whole key tile: no mask
        for start_m in range(loop_bound(start_n + BLOCK_N), loop_bound(seq_len), BLOCK_M):
            dk1, dk2, dv = _bwd_dkdv_step(
                dk1, dk2, dv, k1r, k2r, v, offs_n, start_m, seq_len, tok0, q_base, do_base, lse_base,
                delta_base, stride_qn, stride_don, offs_h, offs_d, qk_scale,
                False, HEAD_DIM, HALF, BLOCK_M, DOT_DTYPE, PREC,
            )  # fmt: skip

    # dv first: its registers are free before the rotation's temporaries are needed
    _store_tile(DV + kvh * stride_dvh, dv, rows_n, n_ok, stride_dvn, offs_d, HEAD_DIM, False)
    # gradient w.r.t. the rotated k, then the inverse rotation (by -angle) gives the gradient w.r.t. k
    dk1, dk2 = _halves(dk1, dk2, BLOCK_N, HEAD_DIM, HALF)
    dk1 = dk1 * sm_scale
    dk2 = dk2 * sm_scale
    dk_base = DK + kvh * stride_dkh
    dk1, dk2 = _rotate(dk1, dk2, POS, tok0, start_n, seq_len, inv_freq, TAB, offs_h, BLOCK_N, HALF, TAB_ROWS, -1.0)
    _store_tile(dk_base, dk1, rows_n, n_ok, stride_dkn, offs_h, HALF_D, PAD)
    _store_tile(dk_base + HALF_D, dk2, rows_n, n_ok, stride_dkn, offs_h, HALF_D, PAD)


@triton.jit
def _bwd_dq_step(
    dq1, dq2, q1r, q2r, do, lse, delta, offs_m, start_n, seq_len, tok0, k_base, v_base, stride_kn, stride_vn,
    offs_h, offs_d, qk_scale, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One key tile against this program's query tile. q1r, q2r and the accumulators dq1, dq2 are head-dim
    pairs (_load_hd, _zeros_hd)."""
    PAD: tl.constexpr = HALF != HEAD_DIM // 2
    offs_n, n_ok, rows_n = _tile_rows(tok0, start_n, seq_len, BLOCK_N)
    k1r, k2r = _load_hd(k_base, rows_n, n_ok, stride_kn, offs_h, offs_d, MASKED, HEAD_DIM, HALF, DOT_DTYPE)
    v = _load_tile(v_base, rows_n, n_ok, stride_vn, offs_d, HEAD_DIM, MASKED, False).to(DOT_DTYPE)
    qk = _dot_nt(q1r, q2r, k1r, k2r, PAD, PREC)
    p = tl.exp2(qk * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = _operand(p * (dp - delta[:, None]), k_base, DOT_DTYPE)
    dq1, dq2 = _dot_acc(ds, k1r, k2r, dq1, dq2, PAD, PREC)
    return dq1, dq2


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, POS, CU_SEQ, CU_BLK, INV_FREQ, TAB,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dqn, stride_dqh,
    n_tokens, num_seqs, qk_scale, sm_scale,
    N_STEPS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TAB_ROWS: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Grid (query blocks of all sequences (upper bound), Hq). dq of one query tile.

    Q, K are the rotated q and k the forward saved; dq is rotated back (by -angle) at the end."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if pid >= tl.load(CU_BLK + num_seqs):
        return
    tok0, seq_len, blk = _locate_tile(CU_BLK, CU_SEQ, pid, num_seqs, n_tokens, N_STEPS, True)
    start_m = blk * BLOCK_M
    kvh = h // GROUP
    HALF_D: tl.constexpr = HEAD_DIM // 2
    PAD: tl.constexpr = HALF != HALF_D

    offs_m, m_ok, rows_m = _tile_rows(tok0, start_m, seq_len, BLOCK_M)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    inv_freq = tl.load(INV_FREQ + offs_h)
    q1r, q2r = _load_hd(Q + h * stride_qh, rows_m, m_ok, stride_qn, offs_h, offs_d, True, HEAD_DIM, HALF, DOT_DTYPE)
    do = _load_tile(DO + h * stride_doh, rows_m, m_ok, stride_don, offs_d, HEAD_DIM, True, False).to(DOT_DTYPE)
    lse = tl.load(LSE + h * n_tokens + tok0 + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + h * n_tokens + tok0 + offs_m, mask=m_ok, other=0.0)

    dq1, dq2 = _zeros_hd(BLOCK_M, HEAD_DIM, HALF)
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    for start_n in range(0, loop_bound(start_m), BLOCK_N):
        dq1, dq2 = _bwd_dq_step(
            dq1, dq2, q1r, q2r, do, lse, delta, offs_m, start_n, seq_len, tok0, k_base, v_base,
            stride_kn, stride_vn, offs_h, offs_d, qk_scale,
            False, HEAD_DIM, HALF, BLOCK_N, DOT_DTYPE, PREC,
        )  # fmt: skip
    for start_n in range(loop_bound(start_m), loop_bound(tl.minimum(start_m + BLOCK_M, seq_len)), BLOCK_N):
        dq1, dq2 = _bwd_dq_step(
            dq1, dq2, q1r, q2r, do, lse, delta, offs_m, start_n, seq_len, tok0, k_base, v_base,
            stride_kn, stride_vn, offs_h, offs_d, qk_scale,
            True, HEAD_DIM, HALF, BLOCK_N, DOT_DTYPE, PREC,
        )  # fmt: skip

    dq1, dq2 = _halves(dq1, dq2, BLOCK_M, HEAD_DIM, HALF)
    dq1 = dq1 * sm_scale
    dq2 = dq2 * sm_scale
    dq_base = DQ + h * stride_dqh
    dq1, dq2 = _rotate(dq1, dq2, POS, tok0, start_m, seq_len, inv_freq, TAB, offs_h, BLOCK_M, HALF, TAB_ROWS, -1.0)
    _store_tile(dq_base, dq1, rows_m, m_ok, stride_dqn, offs_h, HALF_D, PAD)
    _store_tile(dq_base + HALF_D, dq2, rows_m, m_ok, stride_dqn, offs_h, HALF_D, PAD)


# Autotuned GPU variants (the sequence block, hence the grid, is fixed; only the inner tile and the
# launch shape are tuned). Under the interpreter the plain kernels run with small fixed tiles.
def _configs(inner_name: str, shapes: tuple[tuple[int, int, int], ...]) -> list[triton.Config]:
    return [triton.Config({inner_name: b}, num_warps=w, num_stages=s) for b, w, s in shapes]


# (inner tile, warps, stages). Offline sm_90 builds at D=128 bf16 (bench_rope_attention.py --ptxas, with the
# 16-divisible pointers and strides a real launch specialises) guided the choice: every fwd config at 8 warps
# pipelines K/V with cp.async and does not spill (213 registers at BLOCK_N 32/64, 255 at 128; 4 warps spill);
# dq at 8 warps spills nothing up to BLOCK_N=64; dk/dv spills nothing at BLOCK_M 16/32 (112 B at BLOCK_M=64,
# ~3 KB at 4 warps). Measured timings on a GPU are still owed (bench_rope_attention.py --sweep).
_KEY = ["HEAD_DIM", "GROUP"]
_FWD_SHAPES = ((64, 8, 2), (64, 8, 3), (64, 8, 4), (128, 8, 2), (128, 8, 3), (32, 8, 3))
_BWD_SHAPES = ((16, 8, 2), (16, 8, 3), (32, 8, 2), (32, 8, 3), (64, 8, 2), (32, 4, 2))
_fwd_tuned = triton.autotune(_configs("BLOCK_N", _FWD_SHAPES), key=_KEY)(_fwd_kernel)
_dkdv_tuned = triton.autotune(_configs("BLOCK_M", _BWD_SHAPES), key=_KEY)(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_configs("BLOCK_N", _BWD_SHAPES), key=_KEY)(_bwd_dq_kernel)

# --------------------------------------------------------------------------------- host launchers --


def _block_index(cu_seqlens: torch.Tensor, n_tokens: int, block: int) -> tuple[torch.Tensor, int, int]:
    """Prefix sum [S+1] int32 of per-sequence block counts (on the device, no sync), the grid size bound
    cdiv(N, block) + S, and the binary-search steps: ceil(log2(S + 1)) rounded up to a multiple of 4, so
    that a varying number of sequences (prefill batches) compiles at most a handful of variants."""
    num_seqs = cu_seqlens.numel() - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp_(min=0)
    cu_blk = torch.zeros(num_seqs + 1, dtype=torch.int32, device=cu_seqlens.device)
    cu_blk[1:] = torch.cumsum(torch.div(lens + (block - 1), block, rounding_mode="floor"), 0)
    n_steps = -(-max(num_seqs, 1).bit_length() // 4) * 4
    return cu_blk, triton.cdiv(n_tokens, block) + num_seqs, n_steps


def _dot_args(dtype: torch.dtype) -> dict:
    """Dot operand dtype and precision: fp32 "ieee" under the interpreter (no bf16 arithmetic) and for fp32."""
    if INTERPRET or dtype == torch.float32:
        return {"DOT_DTYPE": tl.float32, "PREC": "ieee"}
    return {"DOT_DTYPE": _TL_DTYPES[dtype], "PREC": "tf32"}


def _launch(
    kernel, tuned, heads: int, make_args, cu: torch.Tensor, n: int, seq_block: str, inner: str,
    config: dict | None, blocks: dict | None = None, **meta,
) -> None:  # fmt: skip
    """Launch one of the three attention kernels with an explicit config (sweeps, tests), the interpreter's small
    inner tile, or the autotuned variants. The grid covers the blocks of the kernel's own sequence-block size
    (`seq_block`); make_args(cu_blk) builds its arguments around that size's block index, kept in `blocks`
    (block size -> index) so that the kernels of one call that share a size build it once."""
    if config and config[seq_block] % config[inner]:  # the diagonal loops step by the inner tile
        raise ValueError(f"{inner}={config[inner]} must divide {seq_block}={config[seq_block]}: {config}")
    block = config[seq_block] if config else _BLOCK
    blocks = {} if blocks is None else blocks
    if block not in blocks:
        blocks[block] = _block_index(cu, n, block)
    cu_blk, grid0, n_steps = blocks[block]
    args, grid = make_args(cu_blk), (grid0, heads)
    if config:
        kernel[grid](*args, N_STEPS=n_steps, **config, **meta)
    elif INTERPRET:
        kernel[grid](*args, N_STEPS=n_steps, **{seq_block: block, inner: _INNER_INTERPRET}, **meta)
    else:
        tuned[grid](*args, N_STEPS=n_steps, **{seq_block: block}, **meta)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


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
    rope_theta: float,
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
    the backward needs. config: an explicit launch {BLOCK_M (query block), BLOCK_N, num_warps, num_stages}
    instead of the autotuned one (benchmark sweeps, tests)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    if d not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} not supported by the kernel (supported: {_SUPPORTED_HEAD_DIMS})")
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.empty(hq, n, dtype=torch.float32, device=q.device) if lse is None else lse
    if out.shape != q.shape or out.stride(-1) != 1 or lse.shape != (hq, n) or lse.dtype != torch.float32:
        raise ValueError("out must be [N, Hq, D] with a contiguous last dim and lse fp32 [Hq, N]")
    # the keys rotated once per token (kernels/rotary.py): the attention kernel reads them as they are; the
    # backward reuses them; in prefill the same launch writes them (and v) into the paged KV cache
    k_rot = torch.empty(n, hkv, d, dtype=q.dtype, device=q.device)
    q_rot = torch.empty(n, hq, d, dtype=q.dtype, device=q.device) if save_rotated else None
    if n == 0:
        return out, lse, q_rot, k_rot
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    positions = positions.to(q.device).contiguous()  # the kernels index it as a flat array
    inv_freq, tab = rope_tables(d, rope_theta, q.device)
    cache = {}
    if kv_cache is not None:
        kc, vc = kv_cache
        if kc.stride(-1) != 1 or vc.stride(-1) != 1:
            raise ValueError("k_cache and v_cache must have a contiguous last dim")
        cache = dict(k_cache=kc, v_cache=vc, slot_mapping=slot_mapping.to(q.device))
    launch_rotary(k, v, positions, rope_theta=rope_theta, k_out=k_rot, **cache)
    make_args = lambda cu_blk: (
        q, k_rot, v, out, lse, positions, cu, cu_blk, inv_freq, tab, q_rot if save_rotated else out,
        q.stride(0), q.stride(1), k_rot.stride(0), k_rot.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), hq * d, n, cu.numel() - 1, softmax_scale * _LOG2E,
    )  # fmt: skip
    meta = dict(GROUP=hq // hkv, HEAD_DIM=d, HALF=max(d // 2, 16), TAB_ROWS=TAB_ROWS, SAVE_ROT=save_rotated)
    _launch(_fwd_kernel, _fwd_tuned, hq, make_args, cu, n, "BLOCK_M", "BLOCK_N", config, **meta, **_dot_args(q.dtype))
    return out, lse, q_rot, k_rot


def _rope_attention_bwd(
    do: torch.Tensor,
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    rope_theta: float,
    softmax_scale: float,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    dkdv_config: dict | None = None,
    dq_config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch delta, dk/dv and dq kernels. do [N, Hq, D] -> dq [N, Hq, D], dk, dv [N, Hkv, D] (inputs' dtype).

    q_rot, k_rot: the rotated q and k saved by the forward (save_rotated=True); dq and dk come back unrotated.
    dkdv_config {BLOCK_N (key block), BLOCK_M, num_warps, num_stages} and dq_config {BLOCK_M (query block),
    BLOCK_N, num_warps, num_stages}: explicit launches instead of the autotuned ones (sweeps, tests).
    """
    q, k = q_rot, k_rot
    n, hq, d = q.shape
    hkv = k.shape[1]
    do = _last_dim_contiguous(do)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if dq is None else dq
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if dk is None else dk
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if dv is None else dv
    for g, x in ((dq, q), (dk, k), (dv, v)):
        if g.shape != x.shape or g.stride(-1) != 1:
            raise ValueError("gradient buffers must match their input's shape with a contiguous last dim")
    if n == 0:
        return dq, dk, dv
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    positions = positions.to(q.device).contiguous()  # the kernels index it as a flat array
    inv_freq, tab = rope_tables(d, rope_theta, q.device)
    delta = torch.empty(hq, n, dtype=torch.float32, device=q.device)
    block_t = 16 if INTERPRET else 64
    _bwd_delta_kernel[(triton.cdiv(n, block_t), hq)](
        out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), n, HEAD_DIM=d, BLOCK_T=block_t
    )
    common = dict(GROUP=hq // hkv, HEAD_DIM=d, HALF=max(d // 2, 16), TAB_ROWS=TAB_ROWS, **_dot_args(q.dtype))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    scalars = (n, cu.numel() - 1, softmax_scale * _LOG2E, softmax_scale)
    # each kernel's grid covers the blocks of its own sequence-block size (the key block of dk/dv, the query
    # block of dq), so the two can be tuned apart
    dkdv_args = lambda cu_blk: (q, k, v, do, lse, delta, dk, dv, positions, cu, cu_blk, inv_freq, tab, *strides,
                                dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *scalars)  # fmt: skip
    dq_args = lambda cu_blk: (q, k, v, do, lse, delta, dq, positions, cu, cu_blk, inv_freq, tab, *strides,
                              dq.stride(0), dq.stride(1), *scalars)  # fmt: skip
    blocks: dict = {}
    _launch(_bwd_dkdv_kernel, _dkdv_tuned, hkv, dkdv_args, cu, n, "BLOCK_N", "BLOCK_M", dkdv_config, blocks, **common)
    _launch(_bwd_dq_kernel, _dq_tuned, hq, dq_args, cu, n, "BLOCK_M", "BLOCK_N", dq_config, blocks, **common)
    return dq, dk, dv


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
    rope_theta: float = 10000.0,
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
    if use_triton(q):
        if kv_cache is not None:
            kv_cache = tuple(kv_cache)
        return _RopeAttention.apply(q, k, v, positions, cu_seqlens, rope_theta, scale, kv_cache, slot_mapping)
    if kv_cache is None:
        return reference.rope_attention(q, k, v, positions, cu_seqlens, rope_theta=rope_theta, softmax_scale=scale)
    k_rot = reference.apply_rotary(k, positions, rope_theta)
    reference.write_kv_cache(k_rot, v, kv_cache[0], kv_cache[1], slot_mapping)
    q_rot = reference.apply_rotary(q, positions, rope_theta)
    return reference.varlen_causal_attention(q_rot, k_rot, v, cu_seqlens, scale)
