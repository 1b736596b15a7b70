"""The rope attention's forward in Gluon (Triton's lower-level language; its backward, dk/dv and dq, is
kernels/attention_gluon_bwd.py), FlashAttention-3's overlaps.

Plain Triton 3.6 issues a tile's score product and waits for it at once (wgmma.wait_group 0 right after it), so a
warpgroup's exponentials never overlap its own tensor-core work; written in the other order in Triton's language (the
next tile's scores issued before this tile's softmax) it still waits at once (sm_90a PTX, bench/RESULTS.md). Gluon
exposes the asynchronous warpgroup MMA and its wait: each iteration issues S_{j+1} = q k_{j+1}^T and O += P_j V_j
together, waits for the first alone (wait_group 1), computes the softmax of S_{j+1} while P_j V_j runs, then waits
for that (wait_group 0) and rescales O. K and V come by bulk copy (TMA) into a ring of STAGES tiles each, with their
own barriers, a key stage refilled as soon as both warpgroups' score products have read it and a value stage once
their P V products have.

What it computes is the plain forward's (kernels/rope_attention.py, `_fwd_kernel` with q rotated by the pre-pass):
out [N, Hq, D] and the base-2 logsumexp [Hq, N] of the scaled scores, causal within each packed sequence, GQA. A
program is a 128-row query block (two warpgroups of 64 rows, 8 warps) of one head; the grid and the sequence lookup
are attention_tiles'. Rows of a neighbouring sequence that a tile's bulk copy brings in are masked (keys: the causal
mask covers them) or zeroed (values of the last tile, in shared memory, so that a neighbour's inf or NaN never meets
a zero probability).

Its ping-pong form (_fwd_fa3_ws_kernel, PINGPONG: FlashAttention-3's other half) specialises the warps: a producer
warp issues the bulk copies (q's block, then each key tile's K and V as the stages free up: `empty` barriers both
consumers arrive at), and the two warpgroups become consumer partitions of 64 query rows each, no longer in step (the
8-warp kernel's CTA barriers around every bulk copy keep them so), which issue their products in turn (`turn`
barriers: one warpgroup's score and P V products, then the other's), so that one's softmax runs while the other's
products do, on top of the overlap within each. 12 warps under a 168-register cap at launch; setmaxnreg gives each
consumer 240 and the producer's warpgroup 24.

The backward's kernels live in kernels/attention_gluon_bwd.py: dk/dv (`dkdv`, rope_attention_bwd.GLUON_DKDV) in the same
spirit: a 128-key block in 8 warps, each query tile's score and dP products issued together, P computed while dP runs
and dS while dV does or (BWD_PRODUCER) with a producer warp and two consumer warpgroups of 64 keys at their own pace; dk
goes through rope_attention_bwd's finishing pass. And dq (`dq`, rope_attention_bwd.GLUON_DQ): a 128-row query block in 8
warps over its key tiles, the score and dP products issued together, P computed while dP runs; dq through the same
finishing pass. With all three switches on, the whole attention (forward and backward) is Gluon's.

Limits: an sm_90 GPU (warpgroup MMA is sm_90a's), bf16/fp16, head dims 64 and 128, tiles by TMA; Triton's interpreter
does not run Gluon, so on CPU the kernel is compiled for sm_90a and inspected (tests/kernels/test_sm90_compile.py:
the softmax between the two waits, no spills) and its numbers are checked on a GPU (tests/kernels/
test_rope_attention.py). Opt-in: rope_attention.GLUON_FWD (with PINGPONG for the ping-pong form), or GLUON=True (and
PINGPONG=True) in an explicit launch config.
"""

from __future__ import annotations

import torch
import triton

from kernels.attention_tiles import _block_index, _locate_tile, _tma_refused
from kernels.dispatch import INTERPRET

try:  # (Triton 3.6's experimental Gluon; another Triton may lack or move it: the kernel is then refused by name)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    _NO_GLUON = None
except ImportError as err:  # pragma: no cover (Triton 3.6 has it)
    _NO_GLUON = f"this Triton ({triton.__version__}) has no Gluon: {err}"

BLOCK_M = 128  # two warpgroups of 64 query rows
NUM_WARPS = 8
HEAD_DIMS = (64, 128)
# (key tile, stages): 128-key tiles in 2 stages take 160 KiB of shared memory at D = 128 and 213 registers without
# spilling (sm_90a, ptxas); 64-key tiles 96 KiB in 2 stages. SHAPES: what the bench times.
DEFAULT_TILE = (128, 2)
SHAPES = (DEFAULT_TILE, (64, 2), (64, 3), (128, 3))

# The ping-pong form (_fwd_fa3_ws_kernel: FlashAttention-3's other half): a producer warp issues the bulk copies and
# the two warpgroups become consumer partitions that issue their tensor-core work in turn, so that one's softmax runs
# while the other's products do, where the 8-warp kernel keeps both in step (a CTA barrier around every bulk copy).
# Launched with num_warps=4 (the default partition: consumer 0) and 12 warps in all under a cap of 168 registers a
# thread at launch, which setmaxnreg redistributes: 240 to each consumer, 24 to the producer's warpgroup.
PINGPONG = False  # (the module's choice where a launch does not say: off until a GPU has checked and timed it)
PINGPONG_WARPS = 4
PINGPONG_MAXNREG = 168
CONSUMER_REGS = 240
PINGPONG_TILE = (128, 2)  # (its shapes: SHAPES, 128-key tiles in 3 stages at 229,776 B of shared memory)


def _desc_type(dtype: str, rows: int, head_dim: int) -> str:
    """An offline build's type for a [rows, head_dim] block's descriptor with the shared layout `_rows` gives it."""
    layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype])
    return f"tensordesc<{dtype}[{rows}, {head_dim}],{layout!r}>"


def _rows(x: torch.Tensor, block: int) -> GluonDescriptor:
    """A descriptor over x [N, H, D]'s rows as [N, H * D] (its heads side by side) with [block, D] blocks in the
    128-byte swizzled shared layout the warpgroup MMA reads."""
    n, h, d = x.shape
    layout = gl.NVMMASharedLayout.get_default_for([block, d], gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16)
    return GluonDescriptor(x, shape=[n, h * d], strides=[x.stride(0), 1], block_shape=[block, d], layout=layout)


def build_types(dtype: str, head_dim: int, block_n: int) -> dict[str, str]:
    """The kernel's non-constexpr argument types for an offline sm_90a build (bench.common.ptxas_info), dtype "bf16"
    or "fp16": the descriptors' blocks with the shared layouts `forward` gives them."""
    desc = lambda rows: _desc_type(dtype, rows, head_dim)  # noqa: E731
    types = dict(q_desc=desc(BLOCK_M), k_desc=desc(block_n), v_desc=desc(block_n), O=f"*{dtype}", LSE="*fp32")
    types.update(CU_SEQ="*i32", CU_BLK="*i32", stride_on="i32", stride_oh="i32", n_tokens="i32", num_seqs="i32")
    return {**types, "qk_scale": "fp32"}


def refused(dtype: torch.dtype, head_dim: int, device: torch.device, *tensors: torch.Tensor) -> str | None:
    """Why the Gluon forward cannot run on these inputs here, or None."""
    if _NO_GLUON:
        return _NO_GLUON
    if INTERPRET or device.type != "cuda":
        return "Triton's interpreter does not run Gluon kernels (an sm_90 GPU is needed)"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return f"warpgroup MMA needs an sm_90 GPU, not sm_{''.join(map(str, torch.cuda.get_device_capability(device)))}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it takes bf16 or fp16 inputs, not {dtype}"
    if head_dim not in HEAD_DIMS:
        return f"it takes head dims {HEAD_DIMS}, not {head_dim}"
    return _tma_refused(head_dim, *tensors) if tensors else None


def forward(
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu: torch.Tensor,
    softmax_scale: float,
    block_n: int | None = None,
    stages: int | None = None,
    pingpong: bool | None = None,
) -> None:
    """out [N, Hq, D] and lse [Hq, N] (base 2) of causal attention within the sequences of cu (int32 [S+1]) over the
    rotated q [N, Hq, D] and k [N, Hkv, D] (contiguous) and v [N, Hkv, D] (rows of heads side by side). pingpong:
    the warp-specialised kernel (None: PINGPONG); block_n, stages: its key tiles (None: the kernel's default)."""
    n, hq, d = q_rot.shape
    hkv = k_rot.shape[1]
    pingpong = PINGPONG if pingpong is None else pingpong
    tile = PINGPONG_TILE if pingpong else DEFAULT_TILE
    block_n, stages = block_n or tile[0], stages or tile[1]
    if block_n not in (64, 128) or not 2 <= stages <= 4:
        raise ValueError(f"the Gluon forward takes 64- or 128-key tiles in 2 to 4 stages; got {block_n}, {stages}")
    cu_blk, grid0, n_steps = _block_index(cu, n, BLOCK_M)
    kernel, launch = _fwd_fa3_kernel, dict(num_warps=NUM_WARPS)
    if pingpong:
        kernel = _fwd_fa3_ws_kernel
        launch = dict(CONSUMER_REGS=CONSUMER_REGS, num_warps=PINGPONG_WARPS, maxnreg=PINGPONG_MAXNREG)
    kernel[(grid0, hq)](
        _rows(q_rot, BLOCK_M), _rows(k_rot, block_n), _rows(v, block_n), out, lse, cu, cu_blk, out.stride(0),
        out.stride(1), n, cu.numel() - 1, softmax_scale * 1.4426950408889634,
        N_STEPS=n_steps, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=block_n, STAGES=stages, **launch,
    )  # fmt: skip


if _NO_GLUON is None:

    @gluon.jit
    def _refill(desc, bar, smem, tile, tok0, col, ok, BLOCK_N: gl.constexpr):
        """Bulk-copy key or value tile `tile` of the sequence into smem (where ok), completing on bar."""
        mbarrier.expect(bar, desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(desc, [tok0 + tile * BLOCK_N, col], bar, smem, pred=ok)

    @gluon.jit
    def _zero_rows_past(smem, keep, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, CHUNK: gl.constexpr):
        """Zero the rows >= keep of a [BLOCK_N, HEAD_DIM] shared tile, CHUNK rows at a time through registers."""
        WARPS: gl.constexpr = gl.num_warps()
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [WARPS, 1], [1, 0])
        for c in gl.static_range(BLOCK_N // CHUNK):
            part = smem.slice(c * CHUNK, CHUNK)
            x = part.load(layout)
            rows = c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
            part.store(gl.where((rows < keep)[:, None], x, gl.zeros_like(x)))

    @gluon.constexpr_function
    def _mma_layouts(warps, n_scores, head_dim):
        """The warpgroup MMA layouts of the attention kernels' products, warps stacked along the rows: a [rows,
        n_scores] product's (the scores, or dP), a [rows, head_dim] accumulator's (O, dK, dV), and the register
        operand's (P or dS, 16-bit) of a product into the latter."""
        scores = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, n_scores, 16])
        acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, head_dim, 16])
        return scores, acc, gl.DotOperandLayout(operand_index=0, parent=acc, k_width=2)

    @gluon.jit
    def _query_block(CU_BLK, CU_SEQ, pid, num_seqs, n_tokens, N_STEPS: gl.constexpr, BLOCK_M: gl.constexpr,
                     BLOCK_N: gl.constexpr):  # fmt: skip
        """Program pid's query block (attention_tiles' lookup, the longest blocks first): the first token of its
        sequence, the sequence's length, the block's first row, the keys its queries see ([0, hi)) and their tiles."""
        tok0, seq_len, blk = _locate_tile(CU_BLK, CU_SEQ, pid, num_seqs, n_tokens, N_STEPS, True)
        start_m = blk * BLOCK_M
        hi = gl.minimum(start_m + BLOCK_M, seq_len)
        return tok0, seq_len, start_m, hi, gl.cdiv(hi, BLOCK_N)

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, offs_m, first_key, masked, qk_scale, dtype: gl.constexpr, p_layout: gl.constexpr,
                      FIRST: gl.constexpr):  # fmt: skip
        """The online softmax of one key tile's scores s [rows, keys] (fp32; keys from first_key, the causal mask
        where `masked`) for the query rows offs_m: (P, in 16 bits as the P V product's register operand (half the
        registers of fp32's), the running max and sum (base 2, scaled), O's rescale factor). FIRST: the block's
        first tile (m_i and l_i unread; no rescale factor)."""
        if masked:
            offs_n = first_key + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
            s = gl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        if FIRST:
            m_ij = gl.max(s, 1) * qk_scale
        else:
            m_ij = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_ij[:, None])
        if FIRST:
            alpha = m_ij
            l_i = gl.sum(p, 1)
        else:
            alpha = gl.exp2(m_i - m_ij)
            l_i = l_i * alpha + gl.sum(p, 1)
        return gl.convert_layout(p.to(dtype), p_layout), m_ij, l_i, alpha

    @gluon.jit
    def _store_out(acc, m_i, l_i, offs_m, row0, O, LSE, h, tok0, seq_len, n_tokens, stride_on, stride_oh):
        """The forward's epilogue for the query rows row0 + [0, rows) (offs_m, as the scores' rows): O = acc / l_i in
        the inputs' dtype, the base-2 lse; rows past the sequence stored nowhere."""
        orow: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
        acc = acc / gl.convert_layout(l_i, orow)[:, None]
        rows = row0 + gl.arange(0, acc.shape[0], layout=orow)
        cols = gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, acc.type.layout))
        ptrs = O + h * stride_oh + (tok0 + rows).to(gl.int64)[:, None] * stride_on + cols[None, :]
        gl.store(ptrs, acc.to(O.dtype.element_ty), mask=(rows < seq_len)[:, None])
        gl.store(LSE + h * n_tokens + tok0 + offs_m, m_i + gl.log2(l_i), mask=offs_m < seq_len)

    @gluon.jit
    def _fwd_fa3_kernel(
        q_desc, k_desc, v_desc, O, LSE, CU_SEQ, CU_BLK, stride_on, stride_oh, n_tokens, num_seqs, qk_scale,
        N_STEPS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        """Grid (query blocks of all sequences (upper bound), Hq); descriptors over [N, H * D] rows: q's with
        [BLOCK_M, D] blocks, k's and v's [BLOCK_N, D]. O [N, Hq, D]; LSE [Hq, N] fp32, base 2."""
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
        o_layout: gl.constexpr = layouts[1]
        p_layout: gl.constexpr = layouts[2]
        orow: gl.constexpr = gl.SliceLayout(1, o_layout)

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bar.index(i), count=1)
            mbarrier.init(v_bar.index(i), count=1)

        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [tok0 + start_m, h * HEAD_DIM], q_bar, q_smem)
        for i in gl.static_range(STAGES):
            _refill(k_desc, k_bar.index(i), k_smem.index(i), i, tok0, col, i < n_tiles, BLOCK_N)
            _refill(v_desc, v_bar.index(i), v_smem.index(i), i, tok0, col, i < n_tiles, BLOCK_N)

        offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        # key tile 0: its scores and their softmax before the loop; its key stage then takes tile STAGES
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bar.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s])
        gl.thread_barrier()
        _refill(k_desc, k_bar.index(0), k_smem.index(0), STAGES, tok0, col, STAGES < n_tiles, BLOCK_N)
        p, m_i, l_i, _ = _softmax_tile(s, 0.0, 0.0, offs_m, 0, True, qk_scale, dtype, p_layout, True)
        for j in range(0, n_tiles - 1):
            # S_{j+1} = q k_{j+1}^T and O += P_j V_j issued together; the softmax of S_{j+1} runs while P_j V_j does
            kst = (j + 1) % STAGES
            vst = j % STAGES
            mbarrier.wait(k_bar.index(kst), ((j + 1) // STAGES) & 1)
            mbarrier.wait(v_bar.index(vst), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_smem.index(kst).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            acc_tok = warpgroup_mma(p, v_smem.index(vst), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=[s_tok])
            gl.thread_barrier()  # (every warpgroup's S_{j+1} has read its key stage: it takes tile j + 1 + STAGES)
            nxt = j + 1 + STAGES
            _refill(k_desc, k_bar.index(kst), k_smem.index(kst), nxt, tok0, col, nxt < n_tiles, BLOCK_N)
            diagonal = (j + 2) * BLOCK_N > start_m  # (a tile that reaches the diagonal: masked)
            p, m_i, l_i, alpha = _softmax_tile(
                s, m_i, l_i, offs_m, (j + 1) * BLOCK_N, diagonal, qk_scale, dtype, p_layout, False
            )
            acc = warpgroup_mma_wait(0, deps=[acc_tok])
            gl.thread_barrier()  # (every warpgroup's P_j V_j has read its value stage: it takes tile j + STAGES)
            _refill(v_desc, v_bar.index(vst), v_smem.index(vst), j + STAGES, tok0, col, j + STAGES < n_tiles, BLOCK_N)
            acc = acc * gl.convert_layout(alpha, orow)[:, None]
        last = n_tiles - 1
        vst = last % STAGES
        mbarrier.wait(v_bar.index(vst), (last // STAGES) & 1)
        if hi - last * BLOCK_N < BLOCK_N:  # the tile runs past the sequence: a neighbour's values (inf, NaN) out
            _zero_rows_past(v_smem.index(vst), hi - last * BLOCK_N, BLOCK_N, HEAD_DIM, 32)
            fence_async_shared()
            gl.thread_barrier()
        acc_tok = warpgroup_mma(p, v_smem.index(vst), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc_tok])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bar.index(i))
            mbarrier.invalidate(v_bar.index(i))
        mbarrier.invalidate(q_bar)

        _store_out(acc, m_i, l_i, offs_m, start_m, O, LSE, h, tok0, seq_len, n_tokens, stride_on, stride_oh)


if _NO_GLUON is None:

    @gluon.jit
    def _ws_loader(q_desc, k_desc, v_desc, smem, bars, tok0, h, col, start_m, n_tiles):
        """The producer warp: q's block, then each key tile's K and V into the rings' next stages as the two consumer
        warpgroups free them (a stage's `empty` barrier completes when both have read it)."""
        q_smem, k_smem, v_smem = smem
        q_bar, k_ready, v_ready, k_empty, v_empty, turn = bars
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        HEAD_DIM: gl.constexpr = k_smem.shape[2]
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [tok0 + start_m, h * HEAD_DIM], q_bar, q_smem)
        for t in range(n_tiles):
            st = t % STAGES
            free = ((t // STAGES) & 1) ^ 1  # (a fresh barrier's "previous phase" counts as complete)
            mbarrier.wait(k_empty.index(st), free)
            _refill(k_desc, k_ready.index(st), k_smem.index(st), t, tok0, col, True, BLOCK_N)
            mbarrier.wait(v_empty.index(st), free)
            _refill(v_desc, v_ready.index(st), v_smem.index(st), t, tok0, col, True, BLOCK_N)

    @gluon.jit
    def _ws_consumer(smem, bars, O, LSE, tok0, h, seq_len, start_m, hi, n_tiles, n_tokens, stride_on, stride_oh,
                     qk_scale, C: gl.constexpr):  # fmt: skip
        """Consumer warpgroup C (0 or 1): query rows start_m + C * ROWS + [0, ROWS), FlashAttention-3's
        intra-warpgroup order (as _fwd_fa3_kernel), its tensor-core work issued in turn with the other consumer's
        (ping-pong: `turn` barriers), each stage released to the producer by an arrive once its products read it."""
        q_smem, k_smem, v_smem = smem
        q_bar, k_ready, v_ready, k_empty, v_empty, turn = bars
        dtype: gl.constexpr = q_smem.dtype
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        HEAD_DIM: gl.constexpr = k_smem.shape[2]
        ROWS: gl.constexpr = q_smem.shape[0] // 2
        layouts: gl.constexpr = _mma_layouts(gl.num_warps(), BLOCK_N, HEAD_DIM)
        s_layout: gl.constexpr = layouts[0]
        o_layout: gl.constexpr = layouts[1]
        p_layout: gl.constexpr = layouts[2]
        orow: gl.constexpr = gl.SliceLayout(1, o_layout)
        q_c = q_smem.slice(C * ROWS, ROWS)
        mine = turn.index(C)
        other = turn.index(1 - C)
        row0 = start_m + C * ROWS
        offs_m = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)

        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_ready.index(0), 0)
        mbarrier.wait(mine, 0)
        s = warpgroup_mma(q_c, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.arrive(other, count=1)
        s = warpgroup_mma_wait(0, deps=[s])
        mbarrier.arrive(k_empty.index(0), count=1)
        p, m_i, l_i, _ = _softmax_tile(s, 0.0, 0.0, offs_m, 0, True, qk_scale, dtype, p_layout, True)
        for j in range(0, n_tiles - 1):
            kst = (j + 1) % STAGES
            vst = j % STAGES
            mbarrier.wait(k_ready.index(kst), ((j + 1) // STAGES) & 1)
            mbarrier.wait(v_ready.index(vst), (j // STAGES) & 1)
            mbarrier.wait(mine, (j + 1) & 1)
            s_tok = warpgroup_mma(q_c, k_smem.index(kst).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            acc_tok = warpgroup_mma(p, v_smem.index(vst), acc, is_async=True)
            mbarrier.arrive(other, count=1)
            s = warpgroup_mma_wait(1, deps=[s_tok])
            mbarrier.arrive(k_empty.index(kst), count=1)
            diagonal = (j + 2) * BLOCK_N > row0  # (a tile that reaches this warpgroup's diagonal: masked)
            p, m_i, l_i, alpha = _softmax_tile(
                s, m_i, l_i, offs_m, (j + 1) * BLOCK_N, diagonal, qk_scale, dtype, p_layout, False
            )
            acc = warpgroup_mma_wait(0, deps=[acc_tok])
            mbarrier.arrive(v_empty.index(vst), count=1)
            acc = acc * gl.convert_layout(alpha, orow)[:, None]
        last = n_tiles - 1
        vst = last % STAGES
        mbarrier.wait(v_ready.index(vst), (last // STAGES) & 1)
        if hi - last * BLOCK_N < BLOCK_N:  # (both consumers zero the same rows: the same bytes, whoever is first)
            _zero_rows_past(v_smem.index(vst), hi - last * BLOCK_N, BLOCK_N, HEAD_DIM, 16)
            fence_async_shared()
            gl.thread_barrier()  # (this partition's warps: all four's zeros stored before their product reads them)
        mbarrier.wait(mine, n_tiles & 1)
        acc_tok = warpgroup_mma(p, v_smem.index(vst), acc, is_async=True)
        mbarrier.arrive(other, count=1)
        acc = warpgroup_mma_wait(0, deps=[acc_tok])

        _store_out(acc, m_i, l_i, offs_m, row0, O, LSE, h, tok0, seq_len, n_tokens, stride_on, stride_oh)

    @gluon.jit
    def _ws_consumer0(smem, bars, O, LSE, tok0, h, seq_len, start_m, hi, n_tiles, n_tokens, stride_on, stride_oh, qk):
        _ws_consumer(smem, bars, O, LSE, tok0, h, seq_len, start_m, hi, n_tiles, n_tokens, stride_on, stride_oh, qk, 0)

    @gluon.jit
    def _ws_consumer1(smem, bars, O, LSE, tok0, h, seq_len, start_m, hi, n_tiles, n_tokens, stride_on, stride_oh, qk):
        _ws_consumer(smem, bars, O, LSE, tok0, h, seq_len, start_m, hi, n_tiles, n_tokens, stride_on, stride_oh, qk, 1)

    @gluon.jit
    def _fwd_fa3_ws_kernel(
        q_desc, k_desc, v_desc, O, LSE, CU_SEQ, CU_BLK, stride_on, stride_oh, n_tokens, num_seqs, qk_scale,
        N_STEPS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    ):  # fmt: skip
        """_fwd_fa3_kernel's arguments and outputs, warp-specialised: a producer warp (the bulk copies) and two consumer
        warpgroups of BLOCK_M // 2 query rows each (the default partition, launched with num_warps=4, and a worker),
        which issue their tensor-core work in turn (FlashAttention-3's ping-pong) so that one's softmax runs while
        the other's products do."""
        pid = gl.program_id(0)
        h = gl.program_id(1)
        if pid >= gl.load(CU_BLK + num_seqs):
            return
        col = (h // GROUP) * HEAD_DIM
        tok0, seq_len, start_m, hi, n_tiles = _query_block(
            CU_BLK, CU_SEQ, pid, num_seqs, n_tokens, N_STEPS, BLOCK_M, BLOCK_N
        )
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        mbarrier.arrive(turn.index(0), count=1)  # (consumer 0 issues first)
        smem = (q_smem, k_smem, v_smem)
        bars = (q_bar, k_ready, v_ready, k_empty, v_empty, turn)
        consumer = (smem, bars, O, LSE, tok0, h, seq_len, start_m, hi, n_tiles, n_tokens, stride_on, stride_oh)
        consumer += (qk_scale,)
        gl.warp_specialize(
            [
                (_ws_consumer0, consumer),
                (_ws_consumer1, consumer),
                (_ws_loader, (q_desc, k_desc, v_desc, smem, bars, tok0, h, col, start_m, n_tiles)),
            ],
            [4, 1],
            [CONSUMER_REGS, 24],
        )
