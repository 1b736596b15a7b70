"""Backward of kernels/rope_attention.py (FlashAttention-2): the delta preprocess, a dk/dv kernel looping over
query blocks and over the query heads of the GQA group, a dq kernel looping over key blocks, and their host launcher
_rope_attention_bwd. No atomics by default; DQ_ATOMIC: no dq kernel, the dk/dv kernel adds each query tile's dq
share into an fp32 sum (by Hopper's bulk reduce where TMA reads the tiles) and a last pass scales and rotates it.
WARP_SPEC (opt-in): the dk/dv kernel's query loop and the dq kernel's key loop warp-specialised by Triton's Hopper
pass, as the forward's (rope_attention.WARP_SPEC); dk and dq then go through the same last pass, and the dq kernel
reads its lse and delta rows from a copy the delta kernel lays out by query block (bench/RESULTS.md says why).
GLUON_DKDV and GLUON_DQ (opt-in): the dk/dv and dq kernels in Gluon (kernels/attention_gluon_bwd.py: each tile's score
and dP products issued together, P computed while dP runs), dk and dq through the same last pass.

The inputs are the rotated q and k the forward saved, so the inner loops rotate nothing; only the finished
dq and dk tiles are rotated back (by -angle). Tile helpers and launch code: kernels/attention_tiles.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import attention_gluon, attention_gluon_bwd, dispatch, reference
from kernels.attention_tiles import (
    _BWD_SHAPES,
    _KEY,
    _LOG2E,
    _PRUNE,
    _bases,
    _block_index,
    _configs,
    _dot_acc,
    _dot_args,
    _dot_nt,
    _halves,
    _kv_bases,
    _last_dim_contiguous,
    _launch,
    _load_hd,
    _load_pair,
    _load_tile,
    _locate_tile,
    _no_tma,
    _open_tile,
    _operand,
    _pop_switch,
    _pop_tma,
    _refuse_bounded,
    _rotate,
    _sequence_descriptor,
    _store_tile,
    _tile_rows,
    _tma_refused,
    _warp_spec_refused,
    _zeros_hd,
    device_descriptor_scratch,
    flat_descriptor,
    rows_descriptor,
    seq_block,
)
from kernels.dispatch import INTERPRET, loop_bound
from kernels.rotary import TAB_ROWS, rope_tables

# ------------------------------------------------------------------------------------ backward --


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, LSE, BLK, CU_SEQ, CU_BLK, stride_on, stride_oh, stride_don, stride_doh, n_tokens, num_seqs,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, N_STEPS: tl.constexpr, BLOCKED: tl.constexpr,
):  # fmt: skip
    """DELTA[h, n] = sum_d dO * O (fp32), the softmax-backward row term. Grid (cdiv(N, BLOCK_T), Hq).

    BLOCKED (for the warp-specialised dq kernel): grid (query blocks of all sequences (upper bound), Hq), a program
    per block of BLOCK_T rows as the dq kernel's (_locate_tile from the end); it also writes the block's lse and
    delta to BLK [2, Hq, blocks * BLOCK_T] at [., h, pid * BLOCK_T + j] (+inf and 0 past the sequence's end), where
    the dq kernel loads them by bulk copy at a 16-byte aligned offset."""
    h = tl.program_id(1)
    if BLOCKED:
        pid = tl.program_id(0)
        if pid >= tl.load(CU_BLK + num_seqs):
            return
        tok0, seq_len, blk = _locate_tile(CU_BLK, CU_SEQ, pid, num_seqs, n_tokens, N_STEPS, True)
        _, t_ok, rows = _tile_rows(tok0, blk * BLOCK_T, seq_len, BLOCK_T)
    else:
        rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_ok = rows < n_tokens
    offs_d = tl.arange(0, HEAD_DIM)
    o = _load_tile(O + h * stride_oh, rows, t_ok, stride_on, offs_d, HEAD_DIM, True, False).to(tl.float32)
    do = _load_tile(DO + h * stride_doh, rows, t_ok, stride_don, offs_d, HEAD_DIM, True, False).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + h * n_tokens + rows, delta, mask=t_ok)
    if BLOCKED:
        span = tl.num_programs(0) * BLOCK_T
        j = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        tl.store(BLK + h * span + j, tl.load(LSE + h * n_tokens + rows, mask=t_ok, other=float("inf")))
        tl.store(BLK + (tl.num_programs(1) + h) * span + j, tl.where(t_ok, delta, 0.0))


@triton.jit
def _bwd_dkdv_step(
    dk1, dk2, dv, k1r, k2r, v, offs_n, start_m, seq_len, tok0, q_base, do_base, lse_base, delta_base, stride_qn,
    stride_don, offs_h, offs_d, qk_scale, col, like, dqa_base, stride_dqan, MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
    TMA: tl.constexpr, DQ_ATOMIC: tl.constexpr, BOUNDED: tl.constexpr = False,
):  # fmt: skip
    """One query tile against this program's key tile (transposed scores [BLOCK_N, BLOCK_M]). k1r, k2r and
    the accumulators dk1, dk2 are head-dim pairs (_load_hd, _zeros_hd). MASKED: a diagonal tile (causal mask) or
    the sequence's last, partial one. TMA: q_base and do_base are tensor descriptors over [N, Hq * D] (this head's
    tile at column col), else pointers; BOUNDED: descriptors over this sequence's rows alone (its tiles at rows from
    0), whose copies hold zeros past its end (not zeroed here); like: a pointer of the inputs' dtype. DQ_ATOMIC:
    also add this key tile's share of the query tile's dq into the fp32 accumulator at dqa_base (_add_dq)."""
    PAD: tl.constexpr = HALF != HEAD_DIM // 2
    offs_m, m_ok, rows_m = _tile_rows(tok0, start_m, seq_len, BLOCK_M)
    row0 = tok0
    if BOUNDED:
        row0 = 0
    q1r, q2r, do = _load_pair(
        q_base, do_base, row0, start_m, col, rows_m, m_ok, stride_qn, stride_don, offs_h, offs_d,
        MASKED and not BOUNDED, HEAD_DIM, HALF, DOT_DTYPE, TMA,
    )  # fmt: skip
    # rows past the sequence end get lse = +inf, hence p = 0: they contribute nothing
    lse = tl.load(lse_base + tok0 + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_base + tok0 + offs_m, mask=m_ok, other=0.0)
    qk_t = _dot_nt(k1r, k2r, q1r, q2r, PAD, PREC)
    p_t = tl.exp2(qk_t * qk_scale - lse[None, :])
    if MASKED:
        p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
    dv = tl.dot(_operand(p_t, like, DOT_DTYPE), do, dv, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = _operand(p_t * (dp_t - delta[None, :]), like, DOT_DTYPE)
    dk1, dk2 = _dot_acc(ds_t, q1r, q2r, dk1, dk2, PAD, PREC)
    if DQ_ATOMIC:
        _add_dq(
            dqa_base, ds_t, k1r, k2r, tok0, start_m, col, rows_m, m_ok, stride_dqan, offs_h, offs_d,
            MASKED, BLOCK_M, HEAD_DIM, HALF, PREC, TMA,
        )  # fmt: skip
    return dk1, dk2, dv


@triton.jit
def _add_dq(
    dqa_base, ds_t, k1r, k2r, tok0, start_m, col, rows_m, m_ok, stride_n, offs_h, offs_d, MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """dq of one query tile (w.r.t. the rotated q, not yet scaled) += ds @ k, where ds_t [BLOCK_N, BLOCK_M] holds
    the tile's score gradients against this program's keys, transposed (k1r, k2r: a head-dim pair). TMA: one bulk
    reduce of the tile into the descriptor (Hopper's cp.reduce.async.bulk: the adds happen in L2, no per-element
    atomics from registers); in a MASKED tile its rows past the sequence's end reach the next sequence's rows, so
    they are set to 0 first (p = 0 there is not enough: this sequence's own keys or values may be inf or NaN, and
    0 * NaN is NaN) and the neighbour's rows are added +-0. Else relaxed atomic adds of the rows that exist. The
    sum's order varies from run to run."""
    PAD: tl.constexpr = HALF != HEAD_DIM // 2
    if PAD:
        z1, z2 = _zeros_hd(BLOCK_M, HEAD_DIM, HALF)
        d1, d2 = _dot_acc(tl.trans(ds_t), k1r, k2r, z1, z2, PAD, PREC)
    else:  # as (k^T ds_t)^T: the product's M is the head dim (Hopper's wgmma takes 64 rows; a query tile has fewer)
        d1 = tl.trans(tl.dot(tl.trans(k1r), ds_t, input_precision=PREC))
        d2 = d1
    if TMA:
        if MASKED:
            d1 = tl.where(m_ok[:, None], d1, 0.0)
        dqa_base.atomic_add([tok0 + start_m, col], d1)
    elif PAD:
        HALF_D: tl.constexpr = HEAD_DIM // 2
        ptrs = dqa_base + rows_m[:, None] * stride_n + offs_h[None, :]
        mask = m_ok[:, None] & (offs_h < HALF_D)[None, :]
        tl.atomic_add(ptrs, d1, mask=mask, sem="relaxed")
        tl.atomic_add(ptrs + HALF_D, d2, mask=mask, sem="relaxed")
    else:
        tl.atomic_add(dqa_base + rows_m[:, None] * stride_n + offs_d[None, :], d1, mask=m_ok[:, None], sem="relaxed")


@triton.jit(do_not_specialize=["tune_bucket"])  # (read by the autotuner only: one binary for all)
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQA, POS, CU_SEQ, CU_BLK, INV_FREQ, TAB, QP, DOP,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dkn, stride_dkh, stride_dvn, stride_dvh, stride_dqan, stride_dqah,
    n_tokens, num_seqs, qk_scale, sm_scale,
    N_STEPS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, TAB_ROWS: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, tune_bucket, WARP_SPEC: tl.constexpr = False, BOUNDED: tl.constexpr = False,
):  # fmt: skip
    """Grid (key blocks of all sequences (upper bound), Hkv). dk, dv of one key tile, summed over the group.

    Q, K are the rotated q and k the forward saved; dk is rotated back (by -angle) at the end. TMA: Q and DO (and
    DQA) are tensor descriptors over their [N, Hq * D] rows with [BLOCK_M, HEAD_DIM] blocks. DQ_ATOMIC: each query
    tile's dq share is added into DQA [N, Hq, D] fp32 (zeros before; _bwd_dq_finish_kernel scales and rotates it
    into dq), which spares the dq kernel's recomputing of the scores and dp: 5 tile products a pair instead of 7.

    WARP_SPEC (with TMA, without DQ_ATOMIC; K and V then tensor descriptors too, [BLOCK_N, HEAD_DIM] blocks): Triton's
    Hopper warp specialisation of the query loop, as the forward's (rope_attention.py): the (group head, query tile)
    pairs in one loop, every tile masked, no early exit; a producer warpgroup for the q and dO copies, two consumer
    warpgroups of BLOCK_N / 2 keys. (dq's adds in that loop stop the pass: each consumer would hold half of a share.)
    dk (w.r.t. the rotated k, unscaled) goes to DQA [N, Hkv, D] fp32 then, which _bwd_dq_finish_kernel scales and
    rotates back: the rotation's split into halves after the loop stops the pass too. BOUNDED (with WARP_SPEC;
    autotuned): q and dO by descriptors this program makes over its own sequence's rows of QP and DOP (the pointers
    under Q and DO; the group's heads side by side), as the forward's BOUNDED: zeros past the end from the copies,
    where the plain loads zero both tiles' rows through registers."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    if not WARP_SPEC:
        if pid >= tl.load(CU_BLK + num_seqs):
            return
    tok0, seq_len, start_n, offs_n, n_ok, rows_n, offs_h, offs_d, inv_freq = _open_tile(
        CU_BLK, CU_SEQ, INV_FREQ, pid, num_seqs, n_tokens, N_STEPS, False, BLOCK_N, HEAD_DIM, HALF
    )
    if WARP_SPEC:  # (no exit: a program past the last block is past its sequence's end, so its n_ok is all false and
        # it loops over no query tile; `valid` spelt out all the same: ptxas then builds the loops without spills, 0
        # bytes against 104 at 32-query tiles, D = 128 bf16)
        valid = pid < tl.load(CU_BLK + num_seqs)
        n_ok = n_ok & valid
        k1r = K.load([tl.where(valid, tok0 + start_n, 0), kvh * HEAD_DIM]).to(DOT_DTYPE)
        k2r = k1r
        v = V.load([tl.where(valid, tok0 + start_n, 0), kvh * HEAD_DIM]).to(DOT_DTYPE)
    else:
        k1r, k2r = _load_hd(
            K + kvh * stride_kh, rows_n, n_ok, stride_kn, offs_h, offs_d, True, HEAD_DIM, HALF, DOT_DTYPE
        )
        v = _load_tile(V + kvh * stride_vh, rows_n, n_ok, stride_vn, offs_d, HEAD_DIM, True, False).to(DOT_DTYPE)

    dk1, dk2 = _zeros_hd(BLOCK_N, HEAD_DIM, HALF)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if WARP_SPEC:  # the (head of the group, query tile) pairs in one loop, every tile masked
        n_q = tl.where(valid, tl.cdiv(seq_len - start_n, BLOCK_M), 0)
        q_base, do_base, col0 = Q, DO, 0
        if BOUNDED:  # this sequence's rows of the group's heads alone (column g * D for head g of the group)
            first = kvh * GROUP
            q_base = _sequence_descriptor(QP, tok0, seq_len, first, stride_qn, stride_qh, BLOCK_M, HEAD_DIM, GROUP)
            do_base = _sequence_descriptor(DOP, tok0, seq_len, first, stride_don, stride_doh, BLOCK_M, HEAD_DIM, GROUP)
            col0 = first * HEAD_DIM
        for it in tl.range(0, loop_bound(GROUP * n_q), 1, warp_specialize=True):
            g = it // n_q
            h = kvh * GROUP + g
            dk1, dk2, dv = _bwd_dkdv_step(
                dk1, dk2, dv, k1r, k2r, v, offs_n, start_n + (it - g * n_q) * BLOCK_M, seq_len, tok0, q_base, do_base,
                LSE + h * n_tokens, DELTA + h * n_tokens, stride_qn, stride_don, offs_h, offs_d, qk_scale,
                h * HEAD_DIM - col0, K, DQA, stride_dqan, True, HEAD_DIM, HALF, BLOCK_M, DOT_DTYPE, PREC, TMA, False,
                BOUNDED,
            )  # fmt: skip
    else:
        diag_end = tl.minimum(start_n + BLOCK_N, seq_len)
        full_end = start_n + BLOCK_N + (seq_len - start_n - BLOCK_N) // BLOCK_M * BLOCK_M
        for g in range(GROUP):
            h = kvh * GROUP + g
            q_base, do_base = _bases(Q, DO, h, stride_qh, stride_doh, TMA)
            dqa_base = DQA if TMA else DQA + h * stride_dqah
            lse_base = LSE + h * n_tokens
            delta_base = DELTA + h * n_tokens
            # query tiles: the diagonal ones [start_n, start_n + BLOCK_N) (causal mask), the later whole ones (no
            # mask), and the sequence's last tile if partial (rows past the end masked)
            for part in tl.static_range(3):
                if part == 0:
                    lo, end = start_n, diag_end
                elif part == 1:
                    lo, end = start_n + BLOCK_N, full_end
                else:
                    lo, end = tl.maximum(full_end, start_n + BLOCK_N), seq_len
                for start_m in range(loop_bound(lo), loop_bound(end), BLOCK_M):
                    dk1, dk2, dv = _bwd_dkdv_step(
                        dk1, dk2, dv, k1r, k2r, v, offs_n, start_m, seq_len, tok0, q_base, do_base, lse_base,
                        delta_base, stride_qn, stride_don, offs_h, offs_d, qk_scale, h * HEAD_DIM, K, dqa_base,
                        stride_dqan, part != 1, HEAD_DIM, HALF, BLOCK_M, DOT_DTYPE, PREC, TMA, DQ_ATOMIC,
                    )  # fmt: skip

    # dv first: its registers are free before the rotation's temporaries are needed
    _store_tile(DV + kvh * stride_dvh, dv, rows_n, n_ok, stride_dvn, offs_d, HEAD_DIM, False)
    # gradient w.r.t. the rotated k, then the inverse rotation (by -angle) gives the gradient w.r.t. k
    if WARP_SPEC:  # (the rotation's halves stop the pass's partitioning: as it is into DQA, the finishing pass's)
        _store_tile(DQA + kvh * stride_dqah, dk1, rows_n, n_ok, stride_dqan, offs_d, HEAD_DIM, False)
    else:
        _unrotate_store(
            DK + kvh * stride_dkh, dk1, dk2, sm_scale, POS, tok0, start_n, seq_len, inv_freq, TAB, rows_n, n_ok,
            stride_dkn, offs_h, BLOCK_N, HEAD_DIM, HALF, TAB_ROWS,
        )  # fmt: skip


@triton.jit
def _bwd_dq_step(
    dq1, dq2, q1r, q2r, do, lse, delta, offs_m, start_n, seq_len, tok0, k_base, v_base, stride_kn, stride_vn,
    offs_h, offs_d, qk_scale, kv_col, like, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
    BOUNDED: tl.constexpr = False,
):  # fmt: skip
    """One key tile against this program's query tile. q1r, q2r and the accumulators dq1, dq2 are head-dim
    pairs (_load_hd, _zeros_hd). TMA: k_base and v_base are tensor descriptors over [N, Hkv * D] (the tile at
    column kv_col), else pointers; BOUNDED: descriptors over this sequence's head alone (tok0 and kv_col 0), whose
    copies hold zeros past its end (not zeroed here); like: a pointer of the inputs' dtype."""
    PAD: tl.constexpr = HALF != HEAD_DIM // 2
    offs_n, n_ok, rows_n = _tile_rows(tok0, start_n, seq_len, BLOCK_N)
    k1r, k2r, v = _load_pair(
        k_base, v_base, tok0, start_n, kv_col, rows_n, n_ok, stride_kn, stride_vn, offs_h, offs_d,
        MASKED and not BOUNDED, HEAD_DIM, HALF, DOT_DTYPE, TMA,
    )  # fmt: skip
    qk = _dot_nt(q1r, q2r, k1r, k2r, PAD, PREC)
    p = tl.exp2(qk * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = _operand(p * (dp - delta[:, None]), like, DOT_DTYPE)
    dq1, dq2 = _dot_acc(ds, k1r, k2r, dq1, dq2, PAD, PREC)
    return dq1, dq2


@triton.jit(do_not_specialize=["tune_bucket"])  # (read by the autotuner only: one binary for all)
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, POS, CU_SEQ, CU_BLK, INV_FREQ, TAB, KP, VP,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dqn, stride_dqh,
    n_tokens, num_seqs, qk_scale, sm_scale,
    N_STEPS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TAB_ROWS: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
    tune_bucket, WARP_SPEC: tl.constexpr = False, BOUNDED: tl.constexpr = False,
):  # fmt: skip
    """Grid (query blocks of all sequences (upper bound), Hq). dq of one query tile.

    Q, K are the rotated q and k the forward saved; dq is rotated back (by -angle) at the end. TMA: K and V are
    tensor descriptors over their [N, Hkv * D] rows with [BLOCK_N, HEAD_DIM] blocks.

    WARP_SPEC (with TMA): Triton's Hopper warp specialisation of the key loop, as the forward's: one loop, every tile
    masked, no exit. Q and DO are tensor descriptors too ([BLOCK_M, HEAD_DIM] blocks), LSE and DELTA 1-D ones over
    the blocked copies _bwd_delta_kernel wrote (BLOCKED: this program's rows at h * blocks * BLOCK_M + pid * BLOCK_M;
    the pass takes no pointer-loaded operand before its loop, and Triton's tensor descriptors want a 16-byte aligned
    offset); dq (w.r.t. the rotated q, unscaled) goes to DQ [N, Hq, D] fp32, which _bwd_dq_finish_kernel scales and
    rotates back (the rotation's halves stop the pass). BOUNDED (with WARP_SPEC; autotuned): k and v by descriptors
    this program makes over its own sequence's rows of KP and VP (the pointers under K and V), as the forward's
    BOUNDED: zeros past the end from the copies, where the plain loads zero both tiles' rows through registers."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if not WARP_SPEC:
        if pid >= tl.load(CU_BLK + num_seqs):
            return
    kvh = h // GROUP
    tok0, seq_len, start_m, offs_m, m_ok, rows_m, offs_h, offs_d, inv_freq = _open_tile(
        CU_BLK, CU_SEQ, INV_FREQ, pid, num_seqs, n_tokens, N_STEPS, True, BLOCK_M, HEAD_DIM, HALF
    )
    hi = tl.minimum(start_m + BLOCK_M, seq_len)  # (the keys this tile's queries see: [0, hi))
    if WARP_SPEC:  # (a tile's rows past the sequence's end hold the next one's q and dO: not stored)
        valid = pid < tl.load(CU_BLK + num_seqs)
        m_ok = m_ok & valid
        hi = tl.where(valid, hi, 0)
        row = tl.where(valid, tok0 + start_m, 0)
        q1r = Q.load([row, h * HEAD_DIM]).to(DOT_DTYPE)
        q2r = q1r
        do = DO.load([row, h * HEAD_DIM]).to(DOT_DTYPE)
        at = (h * tl.num_programs(0) + pid) * BLOCK_M
        lse = LSE.load([at])
        delta = DELTA.load([at])
    else:
        q1r, q2r = _load_hd(Q + h * stride_qh, rows_m, m_ok, stride_qn, offs_h, offs_d, True, HEAD_DIM, HALF, DOT_DTYPE)
        do = _load_tile(DO + h * stride_doh, rows_m, m_ok, stride_don, offs_d, HEAD_DIM, True, False).to(DOT_DTYPE)
        lse = tl.load(LSE + h * n_tokens + tok0 + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + h * n_tokens + tok0 + offs_m, mask=m_ok, other=0.0)

    dq1, dq2 = _zeros_hd(BLOCK_M, HEAD_DIM, HALF)
    k_base, v_base, kv_tok0, kv_col = _kv_bases(
        K, V, KP, VP, kvh, tok0, seq_len, stride_kn, stride_kh, stride_vn, stride_vh, BLOCK_N, HEAD_DIM, TMA, BOUNDED
    )  # (BOUNDED: this sequence's keys and values alone, tiles at its rows from 0)
    if WARP_SPEC:  # every key tile [0, hi) in one warp-specialised loop, all masked
        for start_n in tl.range(0, loop_bound(hi), BLOCK_N, warp_specialize=True):
            dq1, dq2 = _bwd_dq_step(
                dq1, dq2, q1r, q2r, do, lse, delta, offs_m, start_n, seq_len, kv_tok0, k_base, v_base,
                stride_kn, stride_vn, offs_h, offs_d, qk_scale, kv_col, K,
                True, HEAD_DIM, HALF, BLOCK_N, DOT_DTYPE, PREC, TMA, BOUNDED,
            )  # fmt: skip
        _store_tile(DQ + h * stride_dqh, dq1, rows_m, m_ok, stride_dqn, offs_d, HEAD_DIM, False)
    else:
        for start_n in range(0, loop_bound(start_m), BLOCK_N):
            dq1, dq2 = _bwd_dq_step(
                dq1, dq2, q1r, q2r, do, lse, delta, offs_m, start_n, seq_len, tok0, k_base, v_base,
                stride_kn, stride_vn, offs_h, offs_d, qk_scale, kvh * HEAD_DIM, Q,
                False, HEAD_DIM, HALF, BLOCK_N, DOT_DTYPE, PREC, TMA,
            )  # fmt: skip
        for start_n in range(loop_bound(start_m), loop_bound(hi), BLOCK_N):
            dq1, dq2 = _bwd_dq_step(
                dq1, dq2, q1r, q2r, do, lse, delta, offs_m, start_n, seq_len, tok0, k_base, v_base,
                stride_kn, stride_vn, offs_h, offs_d, qk_scale, kvh * HEAD_DIM, Q,
                True, HEAD_DIM, HALF, BLOCK_N, DOT_DTYPE, PREC, TMA,
            )  # fmt: skip
        _unrotate_store(
            DQ + h * stride_dqh, dq1, dq2, sm_scale, POS, tok0, start_m, seq_len, inv_freq, TAB, rows_m, m_ok,
            stride_dqn, offs_h, BLOCK_M, HEAD_DIM, HALF, TAB_ROWS,
        )  # fmt: skip


@triton.jit
def _unrotate_store(
    base, x1, x2, sm_scale, POS, tok0, start, n_valid, inv_freq, TAB, rows, ok, stride_n, offs_h, R: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, TAB_ROWS: tl.constexpr,
):  # fmt: skip
    """Store a finished gradient tile w.r.t. the rotated q or k (a head-dim pair x1, x2 in fp32, as _zeros_hd's
    accumulators or _load_hd's operands; softmax scale not yet applied) as the gradient w.r.t. q or k: scaled,
    rotated back (by -angle), at base[rows]."""
    HALF_D: tl.constexpr = HEAD_DIM // 2
    PAD: tl.constexpr = HALF != HALF_D
    x1, x2 = _halves(x1, x2, R, HEAD_DIM, HALF)
    x1, x2 = _rotate(
        x1 * sm_scale, x2 * sm_scale, POS, tok0, start, n_valid, inv_freq, TAB, offs_h, R, HALF, TAB_ROWS, -1.0
    )
    _store_tile(base, x1, rows, ok, stride_n, offs_h, HALF_D, PAD)
    _store_tile(base + HALF_D, x2, rows, ok, stride_n, offs_h, HALF_D, PAD)


@triton.jit
def _bwd_dq_finish_kernel(
    DQA, DQ, POS, INV_FREQ, TAB, stride_dqan, stride_dqah, stride_dqn, stride_dqh, n_tokens, sm_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, TAB_ROWS: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_T), heads). dq from the fp32 sums the dk/dv kernel's atomic adds left in DQA (DQ_ATOMIC),
    or dk from the fp32 tiles the warp-specialised dk/dv kernel left there (WARP_SPEC): a tile of BLOCK_T tokens (of
    any sequences: the positions say the angles) scaled and rotated back."""
    h = tl.program_id(1)
    start = tl.program_id(0) * BLOCK_T
    offs_t, t_ok, rows = _tile_rows(0, start, n_tokens, BLOCK_T)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    x1, x2 = _load_hd(DQA + h * stride_dqah, rows, t_ok, stride_dqan, offs_h, offs_d, True, HEAD_DIM, HALF, tl.float32)
    inv_freq = tl.load(INV_FREQ + offs_h)
    _unrotate_store(
        DQ + h * stride_dqh, x1, x2, sm_scale, POS, 0, start, n_tokens, inv_freq, TAB, rows, t_ok, stride_dqn,
        offs_h, BLOCK_T, HEAD_DIM, HALF, TAB_ROWS,
    )  # fmt: skip


# dq by atomic adds from the dk/dv kernel (into an fp32 sum of [N, Hq, D], then a scaling and rotating pass) instead
# of by the dq kernel, which recomputes the scores and dp of every (query, key) tile pair: 5 tile products a pair
# instead of 7 in the backward, for fp32 adds in L2 (on sm_90+ one bulk reduce a tile by tensor descriptor) and a
# sum whose order, hence last bits, varies from run to run. Off until a GPU has timed it (bench_rope_attention.py).
DQ_ATOMIC = False

# The backward's kernels warp-specialised by Triton's Hopper pass (as rope_attention.WARP_SPEC does the forward): the
# dk/dv kernel's (group head, query tile) pairs in one masked loop, k and v by bulk copy too; the dq kernel's key
# tiles in one masked loop, q, do and the delta kernel's blocked lse and delta by bulk copy; each with a producer
# warpgroup for the copies and two consumer warpgroups of 64 rows; dk and dq (w.r.t. the rotated k and q) into fp32
# buffers that the finishing pass scales and rotates back. The dk/dv kernel not with DQ_ATOMIC (dq's adds stop the
# pass). Off until a GPU has timed and checked it.
WARP_SPEC = False

# The dk/dv kernel in Gluon (kernels/attention_gluon_bwd.py, `dkdv`: each query tile's score and dP products issued
# together, P computed while dP runs, dS while dV does; in 8 warps or, attention_gluon_bwd.BWD_PRODUCER, with a producer
# warp and two consumer warpgroups at their own pace), on an sm_90 GPU with bf16/fp16, head dims 64 and 128 and tiles
# by TMA; dk w.r.t. the rotated k through the finishing pass (as WARP_SPEC's), dq by the dq kernel. Not with
# DQ_ATOMIC. Off until a GPU has checked and timed it (bench_rope_attention.py: the rows "ours, Gluon dk/dv").
GLUON_DKDV = False

# The dq kernel in Gluon (kernels/attention_gluon_bwd.py, `dq`: each key tile's score and dP products issued together, P
# computed while dP runs; 128-row query blocks in 8 warps), on an sm_90 GPU with bf16/fp16, head dims 64 and 128 and
# tiles by TMA; dq w.r.t. the rotated q through the finishing pass. Not with DQ_ATOMIC (dq is then the dk/dv kernel's).
# Off until a GPU has checked and timed it (bench_rope_attention.py: the row "ours, Gluon dq").
GLUON_DQ = False


def _gluon_dkdv_config(config: dict | None) -> tuple[int | None, int | None, bool | None]:
    """An explicit dkdv_config for the Gluon dk/dv kernel -> (query tile, stages, PRODUCER): its key block is 128
    keys, in 8 warps or, PRODUCER=True, in the warp-specialised kernel's producer warp and two consumer warpgroups
    (num_warps=4: the default partition); None: the kernel's defaults (attention_gluon_bwd.BWD_TILES, BWD_PRODUCER)."""
    config = dict(config or {})
    if config.pop("WARP_SPEC", False) or config.pop("BOUNDED", False):
        raise ValueError("dkdv_config GLUON=True with WARP_SPEC or BOUNDED: the Gluon dk/dv is a kernel of its own")
    producer = config.pop("PRODUCER", None)
    warps = attention_gluon.PINGPONG_WARPS if producer else attention_gluon_bwd.BWD_WARPS
    for key, value in (("BLOCK_N", attention_gluon_bwd.BWD_BLOCK_N), ("num_warps", warps)):
        if config.pop(key, value) != value:
            raise ValueError(f"dkdv_config GLUON=True {'with' if producer else 'without'} PRODUCER takes {key}={value}")
    tile = (config.pop("BLOCK_M", None), config.pop("num_stages", None), producer)
    if config:
        raise ValueError(f"dkdv_config GLUON=True takes BLOCK_M, num_stages and PRODUCER, not {sorted(config)}")
    return tile


def _gluon_dq_config(config: dict | None) -> tuple[int | None, int | None]:
    """An explicit dq_config for the Gluon dq kernel -> (key tile, stages): its query block is 128 rows in 8 warps;
    None: its defaults for the head dim (attention_gluon_bwd.DQ_TILES)."""
    config = dict(config or {})
    if config.pop("WARP_SPEC", False) or config.pop("BOUNDED", False):
        raise ValueError("dq_config GLUON=True with WARP_SPEC or BOUNDED: the Gluon dq is a kernel of its own")
    for key, value in (("BLOCK_M", attention_gluon_bwd.DQ_BLOCK_M), ("num_warps", attention_gluon_bwd.DQ_WARPS)):
        if config.pop(key, value) != value:
            raise ValueError(f"dq_config GLUON=True takes {key}={value}")
    tile = (config.pop("BLOCK_N", None), config.pop("num_stages", None))
    if config:
        raise ValueError(f"dq_config GLUON=True takes BLOCK_N and num_stages, not {sorted(config)}")
    return tile


# the autotuned GPU variants (attention_tiles._configs, _BWD_SHAPES)
def _zero_dq_sum(nargs: dict, reset_only: bool = False) -> None:
    """The dk/dv autotuner's hook before each timed launch and once after its timings: with DQ_ATOMIC the launch
    adds into DQA (a tensor, or a tensor descriptor over one), so every try starts from zeros and so does the chosen
    config's launch after them (Triton's reset_to_zero, which cannot zero a descriptor). Without: nothing."""
    if nargs.get("DQ_ATOMIC"):
        dqa = nargs["DQA"]
        getattr(dqa, "base", dqa).zero_()


_dkdv_tuned = dispatch.autotune(
    _configs("BLOCK_M", _BWD_SHAPES), key=_KEY, prune_configs_by=_PRUNE, pre_hook=_zero_dq_sum
)(_bwd_dkdv_kernel)
_dq_tuned = dispatch.autotune(_configs("BLOCK_N", _BWD_SHAPES), key=_KEY, prune_configs_by=_PRUNE)(_bwd_dq_kernel)
# the warp-specialised dk/dv (WARP_SPEC): 4 warps a partition (12 in all), K and V by bulk copy at the key block;
# (query tile, warps, stages) that ptxas builds without spills at D = 128 bf16 (64-query tiles spill 420 B)
_BWD_WS_SHAPES = ((32, 4, 2), (16, 4, 2), (16, 4, 3))
_BWD_WS_SHAPES += tuple((*shape, {"BOUNDED": True}) for shape in _BWD_WS_SHAPES)  # (q and dO by per-sequence ones)
_dkdv_ws_tuned = dispatch.autotune(_configs("BLOCK_M", _BWD_WS_SHAPES, ("K", "V")), key=_KEY, prune_configs_by=_PRUNE)(
    _bwd_dkdv_kernel
)
# and the warp-specialised dq (WARP_SPEC): (key tile, warps, stages) that ptxas builds without spills within 227 KiB
# of shared memory at D = 128 bf16 (64-key tiles in 3 stages take 247 KiB, 128-key ones 329)
_DQ_WS_SHAPES = ((64, 4, 2), (32, 4, 2), (32, 4, 3))
_DQ_WS_SHAPES += tuple((*shape, {"BOUNDED": True}) for shape in _DQ_WS_SHAPES)  # (k and v by per-sequence descriptors)
_dq_ws_tuned = dispatch.autotune(
    _configs("BLOCK_N", _DQ_WS_SHAPES, ("Q", "DO", "LSE", "DELTA")), key=_KEY, prune_configs_by=_PRUNE
)(_bwd_dq_kernel)

# --------------------------------------------------------------------------------- host launchers --


def _rope_attention_bwd(
    do: torch.Tensor,
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    rope_theta: float | reference.Rope,
    softmax_scale: float,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    dkdv_config: dict | None = None,
    dq_config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch delta, dk/dv and dq kernels (or, DQ_ATOMIC, dk/dv with dq's atomic adds and dq's finishing pass).
    do [N, Hq, D] -> dq [N, Hq, D], dk, dv [N, Hkv, D] (inputs' dtype).

    q_rot, k_rot: the rotated q and k saved by the forward (save_rotated=True); dq and dk come back unrotated.
    dkdv_config {BLOCK_N (key block), BLOCK_M, num_warps, num_stages} and dq_config {BLOCK_M (query block),
    BLOCK_N, num_warps, num_stages}, each with an optional TMA (bool), dkdv_config with an optional DQ_ATOMIC
    (bool; then no dq_config): explicit launches instead of the autotuned ones (sweeps, tests).
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
    common = dict(GROUP=hq // hkv, HEAD_DIM=d, HALF=max(d // 2, 16), TAB_ROWS=TAB_ROWS, **_dot_args(q.dtype))
    # the inner loops' tiles by tensor descriptor where they can (attention_tiles.use_tma): dk/dv reads q and do,
    # dq reads k and v; an explicit config's TMA key says instead
    dkdv_config, dkdv_tma = _pop_tma(dkdv_config, d, q, do)
    dq_config, dq_tma = _pop_tma(dq_config, d, k, v)
    # dq by the dk/dv kernel's atomic adds into an fp32 sum (DQ_ATOMIC, or the explicit config's key), or by its
    # own kernel
    dkdv_config, atomic = _pop_switch(dkdv_config, "DQ_ATOMIC", DQ_ATOMIC)
    if atomic and dq_config:
        raise ValueError(f"dq_config {dq_config} given, but with DQ_ATOMIC the dk/dv kernel computes dq")
    # the dk/dv kernel in Gluon (GLUON_DKDV, which takes the launches without an explicit config, or the config's key)
    dkdv_config, gluon = _pop_switch(dkdv_config, "GLUON", None)
    # (why the Gluon kernels cannot run here with their tiles by TMA or not, or None: one refusal for both)
    refused = lambda tma: attention_gluon.refused(q.dtype, d, q.device, q, do, k, v) or _no_tma(tma)  # noqa: E731
    if gluon is None:
        gluon = GLUON_DKDV and not dkdv_config and not atomic and refused(dkdv_tma) is None
    elif gluon and (why := (atomic and "dq is by atomic adds (DQ_ATOMIC)") or refused(dkdv_tma)):
        raise ValueError(f"dkdv_config GLUON=True, but {why}")
    gluon_tile = _gluon_dkdv_config(dkdv_config) if gluon else None
    dkdv_config = {} if gluon else dkdv_config
    # the dk/dv kernel warp-specialised (WARP_SPEC, or the explicit config's key): k and v by bulk copy too, and dk
    # by the finishing pass
    dkdv_config, ws = _pop_switch(dkdv_config, "WARP_SPEC", False if gluon else None)
    why = _warp_spec_refused(q.dtype, dkdv_tma and _tma_refused(d, k, v) is None, atomic and "dq is by atomic adds")
    if ws and why:
        raise ValueError(f"dkdv_config WARP_SPEC=True, but {why}")
    ws = (WARP_SPEC and why is None) if ws is None else ws
    _refuse_bounded(dkdv_config, ws, "dkdv_config")
    # the dq kernel in Gluon (GLUON_DQ, which takes the launches without an explicit config, or dq_config's key)
    dq_config, gluon_dq = _pop_switch(dq_config, "GLUON", None)
    if gluon_dq is None:
        gluon_dq = GLUON_DQ and not dq_config and not atomic and refused(dq_tma) is None
    elif gluon_dq and (why := refused(dq_tma)):
        raise ValueError(f"dq_config GLUON=True, but {why}")
    gluon_dq_tile = _gluon_dq_config(dq_config) if gluon_dq else None
    dq_config = {} if gluon_dq else dq_config
    # the dq kernel warp-specialised (WARP_SPEC, or dq_config's key): q and do by bulk copy too, lse and delta from
    # blocked copies the delta kernel writes, and dq by the finishing pass
    dq_config, dq_ws = _pop_switch(dq_config, "WARP_SPEC", False if gluon_dq else None)
    why = _warp_spec_refused(q.dtype, dq_tma and _tma_refused(d, q, do) is None)
    if dq_ws and why:
        raise ValueError(f"dq_config WARP_SPEC=True, but {why}")
    dq_ws = not atomic and ((WARP_SPEC and why is None) if dq_ws is None else dq_ws)
    _refuse_bounded(dq_config, dq_ws, "dq_config")
    if ws or dq_ws:
        device_descriptor_scratch()  # (BOUNDED variants make descriptors in global memory Triton asks for)

    delta = torch.empty(hq, n, dtype=torch.float32, device=q.device)
    od_strides = (out.stride(0), out.stride(1), do.stride(0), do.stride(1))
    dq_block, dkdv_block = seq_block("dq", dq_config, "BLOCK_M"), seq_block("dkdv", dkdv_config, "BLOCK_N")
    if dq_ws:
        block = dq_block  # (the dq kernel's query block, its grid)
        cu_blk, grid0, n_steps = _block_index(cu, n, block)
        by_block = torch.empty(2, hq, grid0 * block, dtype=torch.float32, device=q.device)  # (lse, delta)
        _bwd_delta_kernel[(grid0, hq)](
            out, do, delta, lse, by_block, cu, cu_blk, *od_strides, n, cu.numel() - 1,
            HEAD_DIM=d, BLOCK_T=block, N_STEPS=n_steps, BLOCKED=True,
        )  # fmt: skip
        dq_q, dq_do = rows_descriptor(q, block), rows_descriptor(do, block)
        dq_lse, dq_delta = flat_descriptor(by_block[0], block), flat_descriptor(by_block[1], block)
        dq_out = torch.empty(n, hq, d, dtype=torch.float32, device=q.device)  # (w.r.t. the rotated q: finished after)
    else:
        block_t = 16 if INTERPRET else 64
        _bwd_delta_kernel[(triton.cdiv(n, block_t), hq)](  # (LSE, BLK, CU_SEQ, CU_BLK unread)
            out, do, delta, lse, delta, cu, cu, *od_strides, n, 0, HEAD_DIM=d, BLOCK_T=block_t, N_STEPS=0,
            BLOCKED=False,
        )  # fmt: skip
        dq_q, dq_do, dq_lse, dq_delta, dq_out = q, do, lse, delta, dq
        if gluon_dq:  # (w.r.t. the rotated q, not yet scaled: finished after)
            dq_out = torch.empty(n, hq, d, dtype=torch.float32, device=q.device)
    # fp32 sums scaled and rotated back after: dq's (DQ_ATOMIC) or dk's w.r.t. the rotated k (WARP_SPEC)
    dqa = dv  # (a placeholder)
    if atomic:
        dqa = torch.zeros(n, hq, d, dtype=torch.float32, device=q.device)
    elif ws or gluon:
        dqa = torch.empty(n, hkv, d, dtype=torch.float32, device=q.device)
    dqad = rows_descriptor(dqa) if atomic and dkdv_tma else dqa
    qd, dod = (rows_descriptor(q), rows_descriptor(do)) if dkdv_tma else (q, do)
    kd, vd = (rows_descriptor(k), rows_descriptor(v)) if dq_tma else (k, v)
    k_in, v_in = k, v
    if ws:  # (a [key block, D] tile each, which the launch leaves as it is)
        k_in, v_in = rows_descriptor(k, dkdv_block), rows_descriptor(v, dkdv_block)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    scalars = (n, cu.numel() - 1, softmax_scale * _LOG2E, softmax_scale)
    # each kernel's grid covers the blocks of its own sequence-block size (the key block of dk/dv, the query
    # block of dq), so the two can be tuned apart
    dkdv_args = lambda cu_blk: (qd, k_in, v_in, dod, lse, delta, dk, dv, dqad, positions, cu, cu_blk, inv_freq, tab,
                                q, do, *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                                dqa.stride(0), dqa.stride(1), *scalars)  # fmt: skip
    dq_args = lambda cu_blk: (dq_q, kd, vd, dq_do, dq_lse, dq_delta, dq_out, positions, cu, cu_blk, inv_freq, tab, k, v,
                              *strides, dq_out.stride(0), dq_out.stride(1), *scalars)  # fmt: skip
    if gluon:  # (dk w.r.t. the rotated k into dqa, finished below)
        attention_gluon_bwd.dkdv(q, k, v, do, lse, delta, dv, dqa, cu, softmax_scale, *gluon_tile)
    else:
        _launch(
            _bwd_dkdv_kernel, _dkdv_ws_tuned if ws else _dkdv_tuned, hkv, dkdv_args, cu, n, "BLOCK_N", "BLOCK_M",
            dkdv_config, ("K", "V"), block=dkdv_block, **common, TMA=dkdv_tma, DQ_ATOMIC=atomic, WARP_SPEC=ws,
        )  # fmt: skip

    def finish(sums, grad):  # (32-token tiles in 8 warps: ptxas gives 64-token ones 128 registers and a spill)
        fin_t = 16 if INTERPRET else 32
        _bwd_dq_finish_kernel[(triton.cdiv(n, fin_t), grad.shape[1])](
            sums, grad, positions, inv_freq, tab, sums.stride(0), sums.stride(1), grad.stride(0), grad.stride(1), n,
            softmax_scale, HEAD_DIM=d, HALF=common["HALF"], BLOCK_T=fin_t, TAB_ROWS=TAB_ROWS, num_warps=8,
        )  # fmt: skip

    if ws or gluon:
        finish(dqa, dk)
    if atomic:
        finish(dqa, dq)
    elif gluon_dq:
        attention_gluon_bwd.dq(q, k, v, do, lse, delta, dq_out, cu, softmax_scale, *gluon_dq_tile)
        finish(dq_out, dq)
    else:
        _launch(
            _bwd_dq_kernel, _dq_ws_tuned if dq_ws else _dq_tuned, hq, dq_args, cu, n, "BLOCK_M", "BLOCK_N", dq_config,
            ("Q", "DO", "LSE", "DELTA"), block=dq_block, **common, TMA=dq_tma, WARP_SPEC=dq_ws,
        )  # fmt: skip
        if dq_ws:
            finish(dq_out, dq)
    return dq, dk, dv
