"""The rope attention's backward in Gluon (kernels/attention_gluon.py has the forward and what both share): dk/dv and dq
with FlashAttention-3's overlap within a warpgroup (each tile's score and dP products issued together, P computed while
dP runs), dk and dq w.r.t. the rotated k and q into fp32 buffers that rope_attention_bwd's finishing pass scales and
rotates back. Opt-in: rope_attention_bwd.GLUON_DKDV (with BWD_PRODUCER for dk/dv's warp-specialised form) and GLUON_DQ.
Limits and checks as the forward's (attention_gluon.refused; tests/kernels/test_sm90_compile.py on CPU, tests/kernels/
test_rope_attention.py on a GPU).
"""

from __future__ import annotations

import torch

from kernels.attention_gluon import (
    _NO_GLUON,
    CONSUMER_REGS,
    PINGPONG_MAXNREG,
    PINGPONG_WARPS,
    _desc_type,
    _mma_layouts,
    _query_block,
    _rows,
    _zero_rows_past,
)
from kernels.attention_tiles import _block_index, _locate_tile

if _NO_GLUON is None:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

# ---------------------------------------------------------------------------------------------------------------------
# dk and dv in Gluon (rope_attention_bwd.GLUON_DKDV): a program is a 128-key block of one kv head (two warpgroups of 64
# keys, 8 warps), its K and V tiles by one bulk copy each; the loop runs over the (group head, 64-query tile) pairs
# from the diagonal to the sequence's end, q and dO tiles by bulk copy into rings of STAGES stages. Each iteration
# issues S^T = K q^T and dP^T = V dO^T together, waits for the first (wait_group 1), computes P^T while dP^T runs,
# issues dV += P^T dO, waits for dP^T (wait_group 1: dV stays in flight), computes dS^T = P^T (dP^T - delta) while dV
# runs, issues dK += dS^T q and waits for both (the stage is then refilled with the pair STAGES ahead).
# dk (w.r.t. the rotated k, not yet scaled) goes to an fp32 buffer that rope_attention_bwd's finishing pass scales and
# rotates back (as for the warp-specialised Triton kernel); dv to its output. The last query tile's rows past the
# sequence (a neighbour's, by the bulk copy) are zeroed in shared memory: the products sum over the queries, and a
# neighbour's inf or NaN times a zero probability would be NaN.
BWD_BLOCK_N = 128  # keys a program (two warpgroups of 64)
BWD_WARPS = 8
# (query tile, stages) by head dim: at D = 128, 64-query tiles take 255 registers and spill in the loop (sm_90a,
# ptxas), 32-query ones 226 without spilling; at D = 64, 64-query tiles 231. BWD_SHAPES: what the bench sweeps.
BWD_TILES = {128: (32, 3), 64: (64, 2)}
BWD_SHAPES = ((32, 3), (32, 2), (64, 2), (64, 3))
# Its warp-specialised form (_bwd_dkdv_ws_kernel, BWD_PRODUCER): a producer warp for the bulk copies and the two
# warpgroups as consumer partitions of 64 keys each, no longer in step (the 8-warp kernel's CTA barriers around every
# refill keep them so), so that one's exponentials and dS run while the other's products do, and each one's exposed
# wait for its dK product is the other's time to compute. 12 warps under the forward's ping-pong caps (168 at launch,
# 240 a consumer, 24 the producer's warpgroup); (query tile, stages): 32-query tiles at D = 128 (64-query ones would
# hold S, dP and P in fp32 at once beside dK and dV: 284 bytes of spill in the consumers).
BWD_PRODUCER = False  # (the module's choice where a launch does not say: off until a GPU has checked and timed it)
BWD_PRODUCER_TILES = {128: (32, 3), 64: (64, 2)}


def bwd_build_types(dtype: str, head_dim: int, block_m: int) -> dict[str, str]:
    """_bwd_dkdv_kernel's non-constexpr argument types for an offline sm_90a build (bench.common.ptxas_info)."""
    desc = lambda rows: _desc_type(dtype, rows, head_dim)  # noqa: E731
    types = dict(q_desc=desc(block_m), do_desc=desc(block_m), k_desc=desc(BWD_BLOCK_N), v_desc=desc(BWD_BLOCK_N))
    types.update(LSE="*fp32", DELTA="*fp32", DV=f"*{dtype}", DKA="*fp32", CU_SEQ="*i32", CU_BLK="*i32")
    types.update(stride_dvn="i32", stride_dvh="i32", stride_dkn="i32", stride_dkh="i32")
    return {**types, "n_tokens": "i32", "num_seqs": "i32", "qk_scale": "fp32"}


def dkdv(
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    dv: torch.Tensor,
    dk_rot: torch.Tensor,
    cu: torch.Tensor,
    softmax_scale: float,
    block_m: int | None = None,
    stages: int | None = None,
    producer: bool | None = None,
) -> None:
    """dv [N, Hkv, D] and dk_rot [N, Hkv, D] fp32 (the gradient w.r.t. the rotated k, not yet multiplied by the
    softmax scale) of causal attention within the sequences of cu over the rotated q [N, Hq, D] and k, v [N, Hkv, D]
    (each with its heads' rows side by side), the output gradient do [N, Hq, D], the forward's base-2 lse [Hq, N] and
    delta [Hq, N] (rowsum(out * do)). producer: the warp-specialised kernel (None: BWD_PRODUCER); block_m, stages:
    its query tiles (None: the kernel's default for the head dim)."""
    n, hq, d = q_rot.shape
    hkv = k_rot.shape[1]
    producer = BWD_PRODUCER if producer is None else producer
    tile = (BWD_PRODUCER_TILES if producer else BWD_TILES)[d]
    block_m, stages = block_m or tile[0], stages or tile[1]
    if block_m not in (32, 64) or not 2 <= stages <= 4:
        raise ValueError(f"the Gluon dk/dv takes 32- or 64-query tiles in 2 to 4 stages; got {block_m}, {stages}")
    cu_blk, grid0, n_steps = _block_index(cu, n, BWD_BLOCK_N)
    kernel, launch = _bwd_dkdv_kernel, dict(num_warps=BWD_WARPS)
    if producer:
        kernel = _bwd_dkdv_ws_kernel
        launch = dict(CONSUMER_REGS=CONSUMER_REGS, num_warps=PINGPONG_WARPS, maxnreg=PINGPONG_MAXNREG)
    kernel[(grid0, hkv)](
        _rows(q_rot, block_m), _rows(do, block_m), _rows(k_rot, BWD_BLOCK_N), _rows(v, BWD_BLOCK_N), lse, delta, dv,
        dk_rot, cu, cu_blk, dv.stride(0), dv.stride(1), dk_rot.stride(0), dk_rot.stride(1), n, cu.numel() - 1,
        softmax_scale * 1.4426950408889634,
        N_STEPS=n_steps, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_N=BWD_BLOCK_N, BLOCK_M=block_m, STAGES=stages, **launch,
    )  # fmt: skip


if _NO_GLUON is None:

    @gluon.jit
    def _block_buffers(a_desc, b_desc, ring_a_desc, ring_b_desc, STAGES: gl.constexpr):
        """The backward kernels' shared memory: two tiles the program loads once (its own block's: k and v for dk/dv,
        q and dO for dq; one barrier) and two rings of STAGES tiles for the loop (one barrier a stage for both),
        the barriers initialised with one arrival (the bulk copies' bytes complete them)."""
        dtype: gl.constexpr = a_desc.dtype
        a = gl.allocate_shared_memory(dtype, a_desc.block_type.shape, a_desc.layout)
        b = gl.allocate_shared_memory(dtype, b_desc.block_type.shape, b_desc.layout)
        ring_a = gl.allocate_shared_memory(dtype, [STAGES] + ring_a_desc.block_type.shape, ring_a_desc.layout)
        ring_b = gl.allocate_shared_memory(dtype, [STAGES] + ring_b_desc.block_type.shape, ring_b_desc.layout)
        bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        return a, b, ring_a, ring_b, bar, bars

    @gluon.jit
    def _bwd_query_tile(it, n_q, h0, start_n, BLOCK_M: gl.constexpr):
        """Pair `it` of the program's loop over its group's query heads (the first: h0) and their query tiles from
        start_n: (query head, the tile's first offset in the sequence)."""
        g = it // n_q
        return h0 + g, start_n + (it - g * n_q) * BLOCK_M

    @gluon.jit
    def _bwd_refill(q_desc, do_desc, bar, q_smem, do_smem, it, total, n_q, h0, start_n, tok0):
        """Bulk-copy pair `it`'s q and dO tiles into a stage (where it < total), completing on bar."""
        BLOCK_M: gl.constexpr = q_smem.shape[0]
        HEAD_DIM: gl.constexpr = q_smem.shape[1]
        h, start_m = _bwd_query_tile(it, n_q, h0, start_n, BLOCK_M)
        ok = it < total
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(q_desc, [tok0 + start_m, h * HEAD_DIM], bar, q_smem, pred=ok)
        tma.async_copy_global_to_shared(do_desc, [tok0 + start_m, h * HEAD_DIM], bar, do_smem, pred=ok)

    @gluon.jit
    def _bwd_dkdv_kernel(
        q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DV, DKA, CU_SEQ, CU_BLK, stride_dvn, stride_dvh, stride_dkn,
        stride_dkh, n_tokens, num_seqs, qk_scale,
        N_STEPS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
        BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        """Grid (key blocks of all sequences (upper bound), Hkv); descriptors over [N, H * D] rows: q's and dO's with
        [BLOCK_M, D] blocks, k's and v's [BLOCK_N, D]. DV [N, Hkv, D]; DKA [N, Hkv, D] fp32; LSE, DELTA [Hq, N]."""
        pid = gl.program_id(0)
        kvh = gl.program_id(1)
        if pid >= gl.load(CU_BLK + num_seqs):
            return
        tok0, seq_len, blk = _locate_tile(CU_BLK, CU_SEQ, pid, num_seqs, n_tokens, N_STEPS, False)
        start_n = blk * BLOCK_N
        n_q = gl.cdiv(seq_len - start_n, BLOCK_M)  # (the query tiles from the diagonal to the end)
        total = GROUP * n_q
        h0 = kvh * GROUP  # (the group's first query head)
        layouts: gl.constexpr = _mma_layouts(gl.num_warps(), BLOCK_M, HEAD_DIM)
        st_layout: gl.constexpr = layouts[0]
        acc_layout: gl.constexpr = layouts[1]
        op_layout: gl.constexpr = layouts[2]
        krow: gl.constexpr = gl.SliceLayout(1, st_layout)

        k_smem, v_smem, q_smem, do_smem, kv_bar, bars = _block_buffers(k_desc, v_desc, q_desc, do_desc, STAGES)
        col = kvh * HEAD_DIM
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [tok0 + start_n, col], kv_bar, k_smem)
        tma.async_copy_global_to_shared(v_desc, [tok0 + start_n, col], kv_bar, v_smem)
        for i in gl.static_range(STAGES):
            _bwd_refill(q_desc, do_desc, bars.index(i), q_smem.index(i), do_smem.index(i), i, total, n_q, h0,
                        start_n, tok0)  # fmt: skip

        offs_n = start_n + gl.arange(0, BLOCK_N, layout=krow)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
        mbarrier.wait(kv_bar, 0)
        # (no product in flight from one iteration to the next: with dK's carried into the next iteration (as a
        # warpgroup MMA accumulator, or as the wait's tensor with the stage refilled after the next scores, with or
        # without zeros materialised for them), ptxas serialises every warpgroup MMA of the kernel: its advisory C7515)
        for it in range(0, total):
            st = it % STAGES
            h, start_m = _bwd_query_tile(it, n_q, h0, start_n, BLOCK_M)
            mbarrier.wait(bars.index(st), (it // STAGES) & 1)
            dv, dk = _bwd_pair(k_smem, v_smem, q_smem.index(st), do_smem.index(st), dv, dk, offs_n, start_n + BLOCK_N,
                               start_m, seq_len, LSE + h * n_tokens + tok0, DELTA + h * n_tokens + tok0, qk_scale,
                               op_layout)  # fmt: skip
            gl.thread_barrier()  # (every warpgroup's products have read the stage: it takes pair it + STAGES)
            _bwd_refill(q_desc, do_desc, bars.index(st), q_smem.index(st), do_smem.index(st), it + STAGES, total,
                        n_q, h0, start_n, tok0)  # fmt: skip
        mbarrier.invalidate(kv_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        dv_out, dk_out = DV + kvh * stride_dvh, DKA + kvh * stride_dkh
        _store_dkdv(dv, dk, start_n, dv_out, dk_out, tok0, seq_len, stride_dvn, stride_dkn)

    @gluon.jit
    def _bwd_pair(k_smem, v_smem, q_smem, do_smem, dv, dk, offs_n, diag_end, start_m, seq_len, LSE, DELTA, qk_scale,
                  op_layout: gl.constexpr):  # fmt: skip
        """One (query tile, key rows) pair of the dk/dv loop, its q and dO tiles in shared memory (their bulk copies
        waited for): S^T and dP^T issued together, P^T while dP^T runs (wait_group 1), dV's product issued, dS^T
        while it runs, dK's issued, then both waited for (a product carried into the next pair makes ptxas
        serialise them all: its advisory C7515). offs_n: the key rows' offsets (those of the k_smem / v_smem rows);
        LSE, DELTA: the query head's rows at the sequence's first token; diag_end: the first query offset past the
        diagonal of this program's keys. -> dv, dk."""
        BLOCK_M: gl.constexpr = q_smem.shape[0]
        HEAD_DIM: gl.constexpr = q_smem.shape[1]
        dtype: gl.constexpr = q_smem.dtype
        st_layout: gl.constexpr = offs_n.type.layout.parent  # (the scores' layout: offs_n is its rows' slice)
        offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st_layout))
        m_ok = offs_m < seq_len
        # (rows past the end: lse = +inf, hence p = 0, as the Triton kernel; their q and dO rows are zeroed below)
        lse = gl.load(LSE + offs_m, mask=m_ok, other=float("inf"))
        delta = gl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        if start_m + BLOCK_M > seq_len:  # the sequence's last tile: a neighbour's rows out of the products' sums
            _zero_rows_past(q_smem, seq_len - start_m, BLOCK_M, HEAD_DIM, BLOCK_M)
            _zero_rows_past(do_smem, seq_len - start_m, BLOCK_M, HEAD_DIM, BLOCK_M)
            fence_async_shared()
            gl.thread_barrier()
        KEYS: gl.constexpr = k_smem.shape[0]
        zero_st = gl.zeros([KEYS, BLOCK_M], gl.float32, st_layout)
        s_tok = warpgroup_mma(k_smem, q_smem.permute((1, 0)), zero_st, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(v_smem, do_smem.permute((1, 0)), zero_st, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])  # (S^T ready, dP^T in flight)
        p = gl.exp2(s * qk_scale - lse[None, :])
        if start_m < diag_end:  # a tile that reaches the diagonal
            p = gl.where(offs_m[None, :] >= offs_n[:, None], p, 0.0)
        dv_tok = warpgroup_mma(gl.convert_layout(p.to(dtype), op_layout), do_smem, dv, is_async=True)
        dp = warpgroup_mma_wait(1, deps=[dp_tok])  # (dP^T ready; dV in flight)
        ds = gl.convert_layout((p * (dp - delta[None, :])).to(dtype), op_layout)
        dk_tok = warpgroup_mma(ds, q_smem, dk, is_async=True)
        return warpgroup_mma_wait(0, deps=[dv_tok, dk_tok])

    @gluon.jit
    def _store_dkdv(dv, dk, start_n, DV, DKA, tok0, seq_len, stride_dvn, stride_dkn):
        """dv (the inputs' dtype) and dk (fp32, for the finishing pass) of the key rows start_n + [0, rows), those
        of the sequence alone; DV, DKA: the kv head's column."""
        acc_layout: gl.constexpr = dv.type.layout
        rows = start_n + gl.arange(0, dv.shape[0], layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, dv.shape[1], layout=gl.SliceLayout(0, acc_layout))
        keep = (rows < seq_len)[:, None]
        flat = (tok0 + rows).to(gl.int64)[:, None]
        gl.store(DV + flat * stride_dvn + cols[None, :], dv.to(DV.dtype.element_ty), mask=keep)
        gl.store(DKA + flat * stride_dkn + cols[None, :], dk, mask=keep)


if _NO_GLUON is None:

    @gluon.jit
    def _bwd_ws_loader(q_desc, do_desc, k_desc, v_desc, smem, bars, tok0, h0, kv_col, start_n, n_q, total):
        """The producer warp: the key block's K and V, then each (query head, query tile) pair's q and dO tiles into
        the rings' next stages as the two consumer warpgroups free them (`empty`: both have read the stage)."""
        k_smem, v_smem, q_smem, do_smem = smem
        kv_bar, ready, empty = bars
        STAGES: gl.constexpr = q_smem.shape[0]
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [tok0 + start_n, kv_col], kv_bar, k_smem)
        tma.async_copy_global_to_shared(v_desc, [tok0 + start_n, kv_col], kv_bar, v_smem)
        for it in range(total):
            st = it % STAGES
            mbarrier.wait(empty.index(st), ((it // STAGES) & 1) ^ 1)  # (a fresh barrier's last phase counts as done)
            _bwd_refill(q_desc, do_desc, ready.index(st), q_smem.index(st), do_smem.index(st), it, total, n_q, h0,
                        start_n, tok0)  # fmt: skip

    @gluon.jit
    def _bwd_ws_consumer(smem, bars, LSE, DELTA, DV, DKA, tok0, seq_len, h0, start_n, n_q, total, n_tokens,
                         stride_dvn, stride_dkn, qk_scale, C: gl.constexpr):  # fmt: skip
        """Consumer warpgroup C (0 or 1): dk and dv of the key rows start_n + C * 64 + [0, 64), each pair as the
        8-warp kernel's (_bwd_pair), the stage released to the producer by an arrive once its products are done.
        DV, DKA: the kv head's column."""
        k_smem, v_smem, q_smem, do_smem = smem
        kv_bar, ready, empty = bars
        STAGES: gl.constexpr = q_smem.shape[0]
        BLOCK_M: gl.constexpr = q_smem.shape[1]
        HEAD_DIM: gl.constexpr = q_smem.shape[2]
        KEYS: gl.constexpr = k_smem.shape[0] // 2
        layouts: gl.constexpr = _mma_layouts(gl.num_warps(), BLOCK_M, HEAD_DIM)
        st_layout: gl.constexpr = layouts[0]
        acc_layout: gl.constexpr = layouts[1]
        op_layout: gl.constexpr = layouts[2]
        row0 = start_n + C * KEYS
        offs_n = row0 + gl.arange(0, KEYS, layout=gl.SliceLayout(1, st_layout))
        k_c = k_smem.slice(C * KEYS, KEYS)
        v_c = v_smem.slice(C * KEYS, KEYS)
        dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, acc_layout)
        dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, acc_layout)
        mbarrier.wait(kv_bar, 0)
        for it in range(0, total):
            st = it % STAGES
            h, start_m = _bwd_query_tile(it, n_q, h0, start_n, BLOCK_M)
            mbarrier.wait(ready.index(st), (it // STAGES) & 1)
            # (the last tile's rows past the end are zeroed by both consumers: the same bytes, whoever is first)
            dv, dk = _bwd_pair(k_c, v_c, q_smem.index(st), do_smem.index(st), dv, dk, offs_n, start_n + 2 * KEYS,
                               start_m, seq_len, LSE + h * n_tokens + tok0, DELTA + h * n_tokens + tok0, qk_scale,
                               op_layout)  # fmt: skip
            mbarrier.arrive(empty.index(st), count=1)
        _store_dkdv(dv, dk, row0, DV, DKA, tok0, seq_len, stride_dvn, stride_dkn)

    @gluon.jit
    def _bwd_ws_consumer0(smem, bars, LSE, DELTA, DV, DKA, tok0, seq_len, h0, start_n, n_q, total, n_tokens, s_dv,
                          s_dk, qk):  # fmt: skip
        _bwd_ws_consumer(smem, bars, LSE, DELTA, DV, DKA, tok0, seq_len, h0, start_n, n_q, total, n_tokens, s_dv,
                         s_dk, qk, 0)  # fmt: skip

    @gluon.jit
    def _bwd_ws_consumer1(smem, bars, LSE, DELTA, DV, DKA, tok0, seq_len, h0, start_n, n_q, total, n_tokens, s_dv,
                          s_dk, qk):  # fmt: skip
        _bwd_ws_consumer(smem, bars, LSE, DELTA, DV, DKA, tok0, seq_len, h0, start_n, n_q, total, n_tokens, s_dv,
                         s_dk, qk, 1)  # fmt: skip

    @gluon.jit
    def _bwd_dkdv_ws_kernel(
        q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DV, DKA, CU_SEQ, CU_BLK, stride_dvn, stride_dvh, stride_dkn,
        stride_dkh, n_tokens, num_seqs, qk_scale,
        N_STEPS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
        BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    ):  # fmt: skip
        """_bwd_dkdv_kernel's arguments and outputs, warp-specialised: a producer warp (the bulk copies) and two
        consumer warpgroups of BLOCK_N // 2 keys each (the default partition, launched with num_warps=4, and a
        worker), each at its own pace."""
        pid = gl.program_id(0)
        kvh = gl.program_id(1)
        if pid >= gl.load(CU_BLK + num_seqs):
            return
        tok0, seq_len, blk = _locate_tile(CU_BLK, CU_SEQ, pid, num_seqs, n_tokens, N_STEPS, False)
        start_n = blk * BLOCK_N
        n_q = gl.cdiv(seq_len - start_n, BLOCK_M)  # (the query tiles from the diagonal to the end)
        total = GROUP * n_q
        h0 = kvh * GROUP
        k_smem, v_smem, q_smem, do_smem, kv_bar, ready = _block_buffers(k_desc, v_desc, q_desc, do_desc, STAGES)
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(empty.index(i), count=2)  # (both consumers release a stage)
        smem = (k_smem, v_smem, q_smem, do_smem)
        bars = (kv_bar, ready, empty)
        dv_out, dk_out = DV + kvh * stride_dvh, DKA + kvh * stride_dkh
        consumer = (smem, bars, LSE, DELTA, dv_out, dk_out, tok0, seq_len, h0, start_n, n_q, total, n_tokens)
        consumer += (stride_dvn, stride_dkn, qk_scale)
        loader = (q_desc, do_desc, k_desc, v_desc, smem, bars, tok0, h0, kvh * HEAD_DIM, start_n, n_q, total)
        gl.warp_specialize(
            [(_bwd_ws_consumer0, consumer), (_bwd_ws_consumer1, consumer), (_bwd_ws_loader, loader)],
            [4, 1],
            [CONSUMER_REGS, 24],
        )


# ---------------------------------------------------------------------------------------------------------------------
# dq in Gluon (rope_attention_bwd.GLUON_DQ): a program is a 128-row query block of one head (two warpgroups of 64 rows,
# 8 warps), its q and dO tiles by one bulk copy each and its rows' lse and delta loaded once; the loop runs over the key
# tiles up to the diagonal, K and V by bulk copy into rings of STAGES stages (one barrier a stage for both). Each
# iteration issues S = q K^T and dP = dO V^T together, waits for S alone (wait_group 1), computes P while dP runs,
# then dS = P (dP - delta) and dQ += dS K, waited for before the next iteration (a product carried over makes ptxas
# serialise them all, as in the dk/dv kernel). dq (w.r.t. the rotated q, not yet scaled) goes to an fp32 buffer that
# rope_attention_bwd's finishing pass scales and rotates back. On the diagonal tiles P and dS are masked by `where`
# (a neighbour's key or value rows past the sequence may be inf or NaN) and the last tile's key rows past the sequence
# are zeroed in shared memory (dQ's product sums over the keys).
DQ_BLOCK_M = 128
DQ_WARPS = 8
# (key tile, stages) by head dim; DQ_SHAPES: what the bench sweeps
DQ_TILES = {128: (64, 2), 64: (64, 3)}
DQ_SHAPES = ((64, 2), (64, 3), (32, 3), (128, 2))


def dq_build_types(dtype: str, head_dim: int, block_n: int) -> dict[str, str]:
    """_bwd_dq_kernel's non-constexpr argument types for an offline sm_90a build (bench.common.ptxas_info)."""
    desc = lambda rows: _desc_type(dtype, rows, head_dim)  # noqa: E731
    types = dict(q_desc=desc(DQ_BLOCK_M), do_desc=desc(DQ_BLOCK_M), k_desc=desc(block_n), v_desc=desc(block_n))
    types.update(LSE="*fp32", DELTA="*fp32", DQA="*fp32", CU_SEQ="*i32", CU_BLK="*i32", stride_dqn="i32")
    return {**types, "stride_dqh": "i32", "n_tokens": "i32", "num_seqs": "i32", "qk_scale": "fp32"}


def dq(
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    dq_rot: torch.Tensor,
    cu: torch.Tensor,
    softmax_scale: float,
    block_n: int | None = None,
    stages: int | None = None,
) -> None:
    """dq_rot [N, Hq, D] fp32 (the gradient w.r.t. the rotated q, not yet multiplied by the softmax scale) of causal
    attention within the sequences of cu over the rotated q [N, Hq, D] and k, v [N, Hkv, D] (each with its heads' rows
    side by side), the output gradient do [N, Hq, D], the forward's base-2 lse [Hq, N] and delta [Hq, N]."""
    n, hq, d = q_rot.shape
    hkv = k_rot.shape[1]
    block_n, stages = block_n or DQ_TILES[d][0], stages or DQ_TILES[d][1]
    if block_n not in (32, 64, 128) or not 2 <= stages <= 4:
        raise ValueError(f"the Gluon dq takes 32-, 64- or 128-key tiles in 2 to 4 stages; got {block_n}, {stages}")
    cu_blk, grid0, n_steps = _block_index(cu, n, DQ_BLOCK_M)
    _bwd_dq_kernel[(grid0, hq)](
        _rows(q_rot, DQ_BLOCK_M), _rows(do, DQ_BLOCK_M), _rows(k_rot, block_n), _rows(v, block_n), lse, delta, dq_rot,
        cu, cu_blk, dq_rot.stride(0), dq_rot.stride(1), n, cu.numel() - 1, softmax_scale * 1.4426950408889634,
        N_STEPS=n_steps, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=DQ_BLOCK_M, BLOCK_N=block_n, STAGES=stages,
        num_warps=DQ_WARPS,
    )  # fmt: skip


if _NO_GLUON is None:

    @gluon.jit
    def _bwd_dq_kernel(
        q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DQA, CU_SEQ, CU_BLK, stride_dqn, stride_dqh, n_tokens, num_seqs,
        qk_scale,
        N_STEPS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        """Grid (query blocks of all sequences (upper bound), Hq); descriptors over [N, H * D] rows: q's and dO's with
        [BLOCK_M, D] blocks, k's and v's [BLOCK_N, D]. DQA [N, Hq, D] fp32; LSE, DELTA [Hq, N] fp32."""
        pid = gl.program_id(0)
        h = gl.program_id(1)
        if pid >= gl.load(CU_BLK + num_seqs):
            return
        col = (h // GROUP) * HEAD_DIM
        tok0, seq_len, start_m, hi, n_tiles = _query_block(
            CU_BLK, CU_SEQ, pid, num_seqs, n_tokens, N_STEPS, BLOCK_M, BLOCK_N
        )
        dtype: gl.constexpr = q_desc.dtype
        layouts: gl.constexpr = _mma_layouts(gl.num_warps(), BLOCK_N, HEAD_DIM)
        s_layout: gl.constexpr = layouts[0]
        acc_layout: gl.constexpr = layouts[1]
        op_layout: gl.constexpr = layouts[2]
        srow: gl.constexpr = gl.SliceLayout(1, s_layout)
        scol: gl.constexpr = gl.SliceLayout(0, s_layout)

        q_smem, do_smem, k_smem, v_smem, q_bar, bars = _block_buffers(q_desc, do_desc, k_desc, v_desc, STAGES)
        mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [tok0 + start_m, h * HEAD_DIM], q_bar, q_smem)
        tma.async_copy_global_to_shared(do_desc, [tok0 + start_m, h * HEAD_DIM], q_bar, do_smem)
        for i in gl.static_range(STAGES):
            _dq_refill(k_desc, v_desc, bars.index(i), k_smem.index(i), v_smem.index(i), i, n_tiles, tok0, col)

        offs_m = start_m + gl.arange(0, BLOCK_M, layout=srow)
        m_ok = offs_m < seq_len
        # (rows past the end: lse = +inf, hence p = 0 (their dq is stored nowhere anyway))
        lse = gl.load(LSE + h * n_tokens + tok0 + offs_m, mask=m_ok, other=float("inf"))
        delta = gl.load(DELTA + h * n_tokens + tok0 + offs_m, mask=m_ok, other=0.0)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, acc_layout)
        mbarrier.wait(q_bar, 0)
        for j in range(0, n_tiles):
            st = j % STAGES
            mbarrier.wait(bars.index(st), (j // STAGES) & 1)
            if (j + 1) * BLOCK_N > hi:  # the last tile runs past the sequence: a neighbour's keys out of dQ's sum
                _zero_rows_past(k_smem.index(st), hi - j * BLOCK_N, BLOCK_N, HEAD_DIM, 32)
                fence_async_shared()
                gl.thread_barrier()
            s_tok = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            dp_tok = warpgroup_mma(do_smem, v_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(1, deps=[s_tok])  # (S ready, dP in flight)
            p = gl.exp2(s * qk_scale - lse[:, None])
            diagonal = (j + 1) * BLOCK_N > start_m
            offs_n = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=scol)
            if diagonal:  # (keys past the queries: P 0 by `where`, whatever the scores)
                p = gl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
            dp = warpgroup_mma_wait(0, deps=[dp_tok])
            ds = p * (dp - delta[:, None])
            if diagonal:  # (and dS 0 there too: a neighbour's value rows may make dP inf or NaN)
                ds = gl.where(offs_n[None, :] <= offs_m[:, None], ds, 0.0)
            dq_tok = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_layout), k_smem.index(st), dq, is_async=True)
            dq = warpgroup_mma_wait(0, deps=[dq_tok])
            gl.thread_barrier()  # (every warpgroup's products have read the stage: it takes tile j + STAGES)
            _dq_refill(k_desc, v_desc, bars.index(st), k_smem.index(st), v_smem.index(st), j + STAGES, n_tiles, tok0,
                       col)  # fmt: skip
        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        ptrs = DQA + h * stride_dqh + (tok0 + rows).to(gl.int64)[:, None] * stride_dqn + cols[None, :]
        gl.store(ptrs, dq, mask=(rows < seq_len)[:, None])

    @gluon.jit
    def _dq_refill(k_desc, v_desc, bar, k_smem, v_smem, tile, n_tiles, tok0, col):
        """Bulk-copy key tile `tile`'s K and V into a stage (where tile < n_tiles), completing on bar."""
        BLOCK_N: gl.constexpr = k_smem.shape[0]
        ok = tile < n_tiles
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(k_desc, [tok0 + tile * BLOCK_N, col], bar, k_smem, pred=ok)
        tma.async_copy_global_to_shared(v_desc, [tok0 + tile * BLOCK_N, col], bar, v_smem, pred=ok)
