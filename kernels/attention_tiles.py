"""Tile helpers and host launch code shared by the rope attention forward (kernels/rope_attention.py) and
backward (kernels/rope_attention_bwd.py); the design is described in kernels/rope_attention.py.

@triton.jit helpers: the sequence lookup (binary search in the prefix sum of per-sequence block counts),
masked tile loads and stores, head-dim dot operands (the whole tile, or two halves padded to tl.dot's
minimum width) and the rotation of a tile (by angle addition when its positions are consecutive). Host
side: the block index, the dot dtype and precision, the autotune configs of the three attention kernels,
and their launcher.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.dispatch import INTERPRET, derived
from kernels.rotary import TAB_ROWS, reduce_angle

_LOG2E = 1.4426950408889634
# Sequence-block size shared by the forward (query blocks), dk/dv (key blocks) and dq (query blocks)
# kernels, and the inner tile sizes used under the interpreter (small, so that the tests run the
# off-diagonal loop and several diagonal sub-tiles on short sequences).
_BLOCK = 32 if INTERPRET else 128
# Each kernel's own sequence block where a launch gives none (its grid: a forward or dq program's query rows, a dk/dv
# program's key rows): None is _BLOCK. A sweep's winner at another block (bench_rope_attention.py --sweep, the first
# number of each variant) becomes the default here, for training and prefill alike; a power of two from 16 to 256.
SEQ_BLOCKS = {"fwd": None, "dkdv": None, "dq": None}
_INNER_INTERPRET = 16
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
def _open_tile(
    CU_BLK, CU_SEQ, INV_FREQ, pid, num_seqs, n_tokens,
    N_STEPS: tl.constexpr, FROM_END: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """What every attention kernel opens with, for program pid's tile of BLOCK rows (see _locate_tile): the first
    token of its sequence, the sequence's length, the tile's first offset in it, its offsets [BLOCK], which of
    them exist, their packed rows, the half and whole head-dim column ranges, the rotary inverse frequencies."""
    tok0, seq_len, blk = _locate_tile(CU_BLK, CU_SEQ, pid, num_seqs, n_tokens, N_STEPS, FROM_END)
    start = blk * BLOCK
    offs, ok, rows = _tile_rows(tok0, start, seq_len, BLOCK)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    inv_freq = tl.load(INV_FREQ + offs_h)
    return tok0, seq_len, start, offs, ok, rows, offs_h, offs_d, inv_freq


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
    """A computed tile as a dot operand: rounded to the inputs' dtype (`like` points to one, or is a tensor
    descriptor of one), which is what the GPU multiplies, then to DOT_DTYPE (fp32 under the interpreter, so it
    rounds exactly like the GPU)."""
    if like.dtype.is_ptr():
        y = x.to(like.dtype.element_ty)
    else:
        y = x.to(like.dtype)
    return y.to(DOT_DTYPE)


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
def _bases(A, B, head, stride_ah, stride_bh, TMA: tl.constexpr):
    """Where a kernel's two tensors of inner tiles start for this head: the tensor descriptors themselves (TMA: the
    head is a column offset at each load) or the head's pointers."""
    if TMA:
        a, b = A, B
    else:
        a, b = A + head * stride_ah, B + head * stride_bh
    return a, b


@triton.jit
def _load_pair(
    a_base, b_base, tok0, start, col, rows, ok, stride_a, stride_b, offs_h, offs_d, MASK_ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, DOT_DTYPE: tl.constexpr, TMA: tl.constexpr, ZERO_A: tl.constexpr = True,
):  # fmt: skip
    """An inner loop's two [R, HEAD_DIM] tiles of the same rows (k and v, or q and dO): a as a head-dim operand pair
    (_load_hd), b whole. TMA (never with padded halves): a_base and b_base are tensor descriptors over [N, H * D],
    the tiles at row tok0 + start and column col, each one bulk copy into shared memory; a copy takes whole tiles,
    so with MASK_ROWS the rows past the sequence (the next sequence's, or zeros past N) are set to 0, as the pointer
    loads' masks read them: a neighbour's inf or NaN cannot reach this sequence's results. ZERO_A False: a's are left
    (the forward's keys: the causal mask replaces their scores), which keeps a's copy straight off shared memory."""
    if TMA:
        a1 = a_base.load([tok0 + start, col]).to(DOT_DTYPE)
        b = b_base.load([tok0 + start, col]).to(DOT_DTYPE)
        if MASK_ROWS:
            if ZERO_A:
                a1 = tl.where(ok[:, None], a1, 0.0)
            b = tl.where(ok[:, None], b, 0.0)
        a2 = a1
    else:
        a1, a2 = _load_hd(a_base, rows, ok, stride_a, offs_h, offs_d, MASK_ROWS, HEAD_DIM, HALF, DOT_DTYPE)
        b = _load_tile(b_base, rows, ok, stride_b, offs_d, HEAD_DIM, MASK_ROWS, False).to(DOT_DTYPE)
    return a1, a2, b


@triton.jit
def _sequence_descriptor(
    X, tok0, seq_len, head, stride_n, stride_h, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, heads=1,
):  # fmt: skip
    """A tensor descriptor over one sequence's rows of X [N, H, D] ([seq_len, heads * D] from head `head`, [ROWS, D]
    blocks; heads side by side): a tile read at its row r holds rows r.. of the sequence, zeros past its end. (A
    program past the last block may see an empty sequence: its descriptor gets one row, which it never reads.)"""
    base = X + tok0.to(tl.int64) * stride_n + head * stride_h
    return tl.make_tensor_descriptor(
        base, shape=[tl.maximum(seq_len, 1), heads * HEAD_DIM], strides=[stride_n, 1], block_shape=[ROWS, HEAD_DIM]
    )


@triton.jit
def _kv_bases(
    K, V, KP, VP, head, tok0, seq_len, stride_kn, stride_kh, stride_vn, stride_vh, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, TMA: tl.constexpr, BOUNDED: tl.constexpr,
):  # fmt: skip
    """Where a loop over key tiles reads k and v for this head (_bases), and the row and column its tiles' coordinates
    start from: BOUNDED, descriptors over this sequence's rows of KP and VP alone (_sequence_descriptor: rows from 0,
    zeros past its end), else K and V as given (rows from tok0, this head's column)."""
    k_base, v_base = _bases(K, V, head, stride_kh, stride_vh, TMA)
    row0, col = tok0, head * HEAD_DIM
    if BOUNDED:
        k_base = _sequence_descriptor(KP, tok0, seq_len, head, stride_kn, stride_kh, ROWS, HEAD_DIM)
        v_base = _sequence_descriptor(VP, tok0, seq_len, head, stride_vn, stride_vh, ROWS, HEAD_DIM)
        row0, col = 0, 0
    return k_base, v_base, row0, col


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
    tl.static_assert(R <= TAB_ROWS, "a tile longer than the rotary table (seq_block refuses it)")
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


# Autotuned GPU variants (the sequence block, hence the grid, is fixed; only the inner tile and the
# launch shape are tuned). Under the interpreter the plain kernels run with small fixed tiles.
def _configs(inner_name: str, shapes: tuple[tuple, ...], fixed: tuple[str, ...] = ()) -> list[triton.Config]:
    """shapes: (inner tile, warps, stages) or (inner tile, warps, stages, {other constexprs}). fixed: the descriptor
    arguments whose block is the sequence block, set by the caller (_set_blocks)."""
    hook = functools.partial(_descriptor_hook, inner_name, fixed)  # (the tensor descriptors' block follows the tile)
    return [
        triton.Config({inner_name: b, **(more[0] if more else {})}, num_warps=w, num_stages=s, pre_hook=hook)
        for b, w, s, *more in shapes
    ]


def _descriptor_hook(inner_name: str, fixed: tuple[str, ...], nargs: dict) -> None:
    _set_blocks(nargs, nargs[inner_name], nargs["HEAD_DIM"], fixed)


def _set_blocks(named: dict, rows: int, head_dim: int, fixed: tuple[str, ...] = ()) -> None:
    """Give every tensor descriptor among a launch's arguments (name -> value) the block its kernel loads: [inner
    tile, HEAD_DIM]; those named in `fixed` keep theirs (a sequence block's tile: the warp-specialised kernels' q,
    k and v, do, and the dq kernel's 1-D lse and delta)."""
    for name, a in named.items():
        if isinstance(a, TensorDescriptor) and name not in fixed:
            a.block_shape = [rows, head_dim]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune's early prune: the inner tiles that divide the launch's sequence block (SEQ_BLOCKS may set a 64-row
    block, which a 128-wide inner tile does not fit), then _prune_fp32's."""
    fits = [c for c in configs if all(kwargs.get(_OTHER_BLOCK[k], v) % v == 0 for k, v in _inner(c))]
    if not fits:
        raise ValueError(f"no autotuned inner tile of {[c.kwargs for c in configs]} divides the sequence block")
    return _prune_fp32(fits, named_args, **kwargs)


_OTHER_BLOCK = {"BLOCK_M": "BLOCK_N", "BLOCK_N": "BLOCK_M"}  # (an inner tile's name -> its sequence block's)


def _inner(config: triton.Config) -> list[tuple[str, int]]:
    """A config's inner tile, (name, size)."""
    return [(k, v) for k, v in config.kwargs.items() if k in _OTHER_BLOCK]


def _prune_fp32(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune's early prune: with fp32 operands (tests and fp32 runs, not the engine's bf16 path) only the two
    smallest inner tiles (the fewest stages first). The others spill registers or overflow shared memory in fp32 (a
    128-wide forward tile needs 256 KB at D=128, a 64-wide one in 4 stages 295 KB) and each takes tens of seconds to
    compile before it is thrown away."""
    if kwargs.get("DOT_DTYPE") != tl.float32:
        return configs
    tiles = lambda c: sorted(v for v in c.kwargs.values() if not isinstance(v, bool))  # noqa: E731 (not switches)
    return sorted(configs, key=lambda c: (tiles(c), c.num_stages))[:2]


_PRUNE = {"early_config_prune": _prune}


# (inner tile, warps, stages). Offline sm_90 builds at D=128 bf16 (bench_rope_attention.py --ptxas, with the
# 16-divisible pointers and strides a real launch specialises) guided the choice: every fwd config at 8 warps
# pipelines K/V with cp.async and does not spill (213 registers at BLOCK_N 32/64, 255 at 128; 4 warps spill);
# dq at 8 warps spills nothing up to BLOCK_N=64; dk/dv spills nothing at BLOCK_M 16/32 (112 B at BLOCK_M=64,
# ~3 KB at 4 warps). Measured timings on a GPU are still owed (bench_rope_attention.py --sweep).
# tune_bucket (an argument the kernels do not read): tokens in coarse buckets, so a config tuned on a small prefill
# (a few hundred programs, launch-bound) is not reused for a training micro-batch or a long prefill, nor the reverse;
# TMA: tiles by tensor descriptor and by pointer loads tune apart; DQ_ATOMIC (dk/dv's only): with dq's adds or without;
# ROTATE_Q (the forward's only): q rotated in its prologue or by the pre-pass; the sequence block (BLOCK_M of the
# forward and dq, BLOCK_N of dk/dv: SEQ_BLOCKS may change it between launches; the inner tile is not in the key)
_KEY = ["HEAD_DIM", "GROUP", "tune_bucket", "TMA", "DQ_ATOMIC", "ROTATE_Q", "BLOCK_M", "BLOCK_N"]
_FWD_SHAPES = ((64, 8, 2), (64, 8, 3), (64, 8, 4), (128, 8, 2), (128, 8, 3), (32, 8, 3))
_BWD_SHAPES = ((16, 8, 2), (16, 8, 3), (32, 8, 2), (32, 8, 3), (64, 8, 2), (32, 4, 2))

# --------------------------------------------------------------------------------- host launchers --


def _block_index(cu_seqlens: torch.Tensor, n_tokens: int, block: int) -> tuple[torch.Tensor, int, int]:
    """Prefix sum [S+1] int32 of per-sequence block counts (on the device, no sync), the grid size bound
    cdiv(N, block) + S, and the binary-search steps: ceil(log2(S + 1)) rounded up to a multiple of 4, so
    that a varying number of sequences (prefill batches) compiles at most a handful of variants. Built once per
    cu_seqlens (dispatch.derived): every layer of a forward and its backward share one."""
    build = lambda: _build_block_index(cu_seqlens, n_tokens, block)  # noqa: E731
    return derived(cu_seqlens, ("block_index", n_tokens, block), build)


def _build_block_index(cu_seqlens: torch.Tensor, n_tokens: int, block: int) -> tuple[torch.Tensor, int, int]:
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


def tune_bucket(n_tokens: int) -> int:
    """Autotuning bucket of a launch over n_tokens packed tokens: < 2k, < 8k, < 32k, more."""
    return min(3, max(0, (n_tokens.bit_length() - 10) // 2))


def seq_block(kernel: str, config: dict | None, name: str) -> int:
    """The sequence block of a launch of `kernel` ("fwd", "dkdv" or "dq"): an explicit config's entry `name`, else
    SEQ_BLOCKS', else _BLOCK; checked here: a power of two from 16 to TAB_ROWS (the rows of the rotary table that
    _rotate reads a tile's rotation from: a longer block read past it, garbage from the 129th row on)."""
    block, what = (config[name], f"{name} of {config}") if config else (SEQ_BLOCKS[kernel], f"SEQ_BLOCKS[{kernel!r}]")
    if block is None:
        return _BLOCK
    if not isinstance(block, int) or block < 16 or block > TAB_ROWS or block & (block - 1):
        raise ValueError(f"attention_tiles.{what} must be a power of two from 16 to {TAB_ROWS}; got {block!r}")
    return block


def _launch(
    kernel, tuned, heads: int, make_args, cu: torch.Tensor, n: int, seq_block_name: str, inner: str,
    config: dict | None, fixed: tuple[str, ...] = (), *, block: int, **meta,
) -> None:  # fmt: skip
    """Launch one of the three attention kernels with an explicit config (sweeps, tests), the interpreter's small
    inner tile, or the autotuned variants. The grid covers the blocks of the kernel's own sequence block (`block`,
    from seq_block, passed as `seq_block_name`); make_args(cu_blk) builds its arguments around that size's block
    index (_block_index: built once per cu_seqlens and size, whichever kernel, layer or pass asks). fixed: descriptor
    arguments whose block the caller set to the sequence block (_set_blocks leaves them)."""
    if config and config[seq_block_name] % config[inner]:  # the diagonal loops step by the inner tile
        raise ValueError(f"{inner}={config[inner]} must divide {seq_block_name}={config[seq_block_name]}: {config}")
    cu_blk, grid0, n_steps = _block_index(cu, n, block)
    args, grid = make_args(cu_blk), (grid0, heads)
    meta["tune_bucket"] = tune_bucket(n)
    if config or INTERPRET:  # (the autotuned launches set the descriptors' blocks in each config's pre-hook)
        _set_blocks(
            dict(zip(kernel.arg_names, args)), config[inner] if config else _INNER_INTERPRET, meta["HEAD_DIM"], fixed
        )
    if config:
        kernel[grid](*args, N_STEPS=n_steps, **config, **meta)
    elif INTERPRET:
        kernel[grid](*args, N_STEPS=n_steps, **{seq_block_name: block, inner: _INNER_INTERPRET}, **meta)
    else:
        tuned[grid](*args, N_STEPS=n_steps, **{seq_block_name: block}, **meta)


# The inner loops' key/value (or query/gradient) tiles through Hopper's tensor memory accelerator: a tensor
# descriptor over the [N, H * D] rows, one bulk copy a tile into shared memory, no per-element addresses in
# registers. False: pointer loads (cp.async) everywhere (what sm_80 runs, and what benches compare against).
TMA_LOADS = True


def use_tma(head_dim: int, *tensors: torch.Tensor) -> bool:
    """Whether a launch reads these [N, H, D] tensors' tiles by TMA: TMA_LOADS on and _tma_refused has no reason."""
    return TMA_LOADS and _tma_refused(head_dim, *tensors) is None


def _tma_refused(head_dim: int, *tensors: torch.Tensor) -> str | None:
    """Why these [N, H, D] tensors cannot be read by TMA, or None: it needs an sm_90+ GPU (or the interpreter, which
    emulates the copies), head-dim halves at least tl.dot's 16 wide (smaller ones are padded pairs), and each
    tensor's heads side by side in 16-byte aligned rows (a qkv projection's slices are)."""
    if head_dim // 2 < 16:
        return f"head dim {head_dim} is under 32 (its halves are padded pairs)"
    dev = tensors[0].device
    if not INTERPRET and (dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] < 9):
        return f"{dev} has no tensor memory accelerator (sm_90+)"
    for x in tensors:
        if x.stride(2) != 1 or x.stride(1) != head_dim:
            return f"a tensor's heads are not side by side (strides {tuple(x.stride())})"
        if x.data_ptr() % 16 or x.stride(0) * x.element_size() % 16:
            return f"a tensor's rows are not 16-byte aligned (strides {tuple(x.stride())})"
    return None


def _pop_tma(config: dict | None, head_dim: int, *tensors: torch.Tensor) -> tuple[dict | None, bool]:
    """An explicit launch config without its TMA key, and whether the launch reads these tensors' tiles by tensor
    descriptor: the key's value if given (True refused with the reason where TMA cannot read them), else use_tma."""
    config, want = _pop_switch(config, "TMA", None)
    if want is None:
        return config, use_tma(head_dim, *tensors)
    if want and (why := _tma_refused(head_dim, *tensors)) is not None:
        raise ValueError(f"config TMA=True, but {why}")
    return config, want


def _refuse_bounded(config: dict | None, ws: bool, name: str) -> None:
    """An explicit BOUNDED=True in the launch config `name` of a kernel that will not run warp-specialised is refused
    by name: the per-sequence descriptors belong to the warp-specialised loop."""
    if config and config.get("BOUNDED") and not ws:
        raise ValueError(f"{name} BOUNDED=True: per-sequence descriptors of the warp-specialised loop, not running")


def _warp_spec_refused(dtype: torch.dtype, tma: bool, conflict: str | None = None) -> str | None:
    """Why a kernel cannot run warp-specialised (Triton's Hopper pass: rope_attention.WARP_SPEC,
    rope_attention_bwd.WARP_SPEC) here, or None: its tiles must all come by TMA, no conflicting switch, and bf16/fp16
    inputs on a GPU (fp32 dots have no warpgroup MMA; the interpreter emulates them)."""
    if not tma:
        return "its tiles are not all read by TMA (attention_tiles.use_tma)"
    if conflict:
        return conflict
    if dtype == torch.float32 and not INTERPRET:
        return "fp32 inputs have no warpgroup MMA"
    return None


def _no_tma(tma: bool) -> str | None:
    """Why a launch that must read its tiles by TMA cannot here (the Gluon kernels: no pointer-load form), or None."""
    return None if tma else "its tiles are not read by TMA here (TMA=False, or attention_tiles.TMA_LOADS off)"


def _pop_switch(config: dict | None, key: str, default: bool | None) -> tuple[dict | None, bool | None]:
    """An explicit launch config without the switch `key` (a copy; the caller's is left alone), and the switch's
    value: the config's if given, else `default` (the module's setting)."""
    if config and key in config:
        config = dict(config)
        return config, bool(config.pop(key))
    return config, default


def device_descriptor_scratch() -> None:
    """Kernels that make tensor descriptors in the kernel (tl.make_tensor_descriptor: 128 bytes of global memory a
    descriptor) need Triton's allocator for that scratch: where none is set (Triton's default refuses), one that
    takes it from torch's caching allocator on the current device. An allocator the caller set is left."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """(torch's caching allocator hands out 512-byte aligned blocks on a GPU, past the 128 Triton asks of it.)"""
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def rows_descriptor(x: torch.Tensor, rows: int = 16) -> TensorDescriptor:
    """A tensor descriptor over the rows of x [N, H, D] as [N, H * D] (a head's tile: column h * D), with [rows, D]
    blocks: an inner tile's are set per launch (_set_blocks), a sequence block's given here (`fixed` then)."""
    n, h, d = x.shape
    return TensorDescriptor(x, shape=[n, h * d], strides=[x.stride(0), 1], block_shape=[rows, d])


def flat_descriptor(x: torch.Tensor, block: int) -> TensorDescriptor:
    """A 1-D tensor descriptor over contiguous x's elements with [block] blocks."""
    return TensorDescriptor(x.view(-1), shape=[x.numel()], strides=[1], block_shape=[block])


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
