"""The decode step's projections: y = x W^T for a few rows (a decode batch, 1 to 64 tokens), streaming the weight once.

A decode step reads every weight once and multiplies it by a handful of rows: memory-bound, and cuBLAS reached 78 to
89% of the copy bandwidth on the 13B projections (bench/RESULTS.md, "Tuned on the second lease": the output projection
78%, the down projection 84% through split-K plus a separate reduce kernel): with ~400 small kernels and the gaps
between them, what keeps batch 64 at 72% of the roofline. This kernel:

- streams W [N, K] (F.linear's layout, this rank's shard under TP) in [BLOCK_N, BLOCK_K] tiles, evicted first from
  the L2, against x [M, K] padded to tl.dot's 16 rows, accumulating in fp32;
- splits K over SPLIT_K programs when the column blocks alone would leave the GPU short of programs (the output and
  down projections: 80 blocks of 64 columns), and sums the splits inside the same launch: each program stores its
  partial tile, the last of a column block to arrive (an atomic counter per block) adds all of them in split order
  (deterministic: the same bits whichever arrives last), applies the epilogue and resets the counter for the next
  launch or CUDA graph replay. No second kernel;
- absorbs the small kernels around it in its epilogues and prologue: `swiglu` (the fused gate_up weight [2I, K],
  [gate | up] rows as engine.parallel's ColumnParallelLinear holds them: writes silu(gate) * up [M, I], kernels/
  swiglu.py's rounding), qkv_rope_linear (the QKV projection, a head a column block: writes the rotated q and puts the
  rotated k and the v into the paged KV cache, kernels/rotary.py's arithmetic), `residual` (the output and down
  projections: write the residual stream after their add and its rows' sums of squares per column block, RowSquares)
  and `norm` (the QKV and gate_up projections: normalise the stream as they read it, from those sums, or from their
  own reading of the rows where there are few: kernels/rmsnorm.py's rounding). A decode layer is then five launches:
  QKV + norm + rotary + cache write, paged attention, output + add, gate_up + norm + SwiGLU, down + add
  (engine/model.py's DecoderLayer._decode_step).

The engine takes it when decode_config's `linear` switch is 1 (default 0: not yet timed on a GPU;
bench/bench_decode_linear.py times each projection against cuBLAS, bench/run_gpu_suite.sh's group `linear` the
rollouts) for at most MAX_ROWS rows without autograd (`linear`, `swiglu_linear`, wants_decode_linear).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import reference
from kernels.attention_tiles import _dot_args
from kernels.decode_config import linear_enabled, pdl_args
from kernels.dispatch import INTERPRET, loop_bound, pdl_prologue, sm_count, use_triton
from kernels.rotary import _rotate_store, check_slots, reduce_angle, rope_tables

MAX_ROWS = 64  # a decode batch; more rows are a prefill's GEMM (cuBLAS's)

# Unmeasured starting points (bench_decode_linear.py --sweep tunes them on a GPU): 64 columns a block, 128-wide K steps
# (64 from 32 rows: x's tile then takes as much shared memory as W's, and 64-wide steps keep 2 to 3 programs an SM,
# so that every program of a 13B projection is resident at once: no tail wave), 4 warps, 4 stages, K split while
# fewer than 2 programs per SM, none under 1024.
_BLOCK_N = 64
_BLOCK_K = 128
_BLOCK_K_MANY_ROWS = 64
_NUM_WARPS = 4
_NUM_STAGES = 4
_PROGRAMS_PER_SM = 2
_MIN_SPLIT_K = 1024
_CONFIG_KEYS = ("block_n", "block_k", "num_warps", "num_stages", "split_k")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _epilogue(
    Y, acc, acc_u, offs_m, offs_n, m_ok, n_ok, stride_ym, RES, H_OUT, SS, stride_rm, stride_hm, stride_ss, pid_n,
    SWIGLU: tl.constexpr, RESID: tl.constexpr,
):  # fmt: skip
    """The plain projection's store, or with SWIGLU silu(gate) * up. RESID: the projection is a residual branch (the
    output or down projection): H_OUT = RES + y (torch's add of the rounded y) instead of y, and SS[pid_n] the rows'
    sums of squares over these columns, which the next projection's norm adds up (no norm kernel, no add)."""
    out_ty = Y.dtype.element_ty
    mask = m_ok[:, None] & n_ok[None, :]
    if RESID:
        r = tl.load(RES + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (r + acc.to(out_ty).to(tl.float32)).to(out_ty)
        tl.store(H_OUT + offs_m[:, None] * stride_hm + offs_n[None, :], h, mask=mask)
        hf = tl.where(mask, h.to(tl.float32), 0.0)
        tl.store(SS + pid_n * stride_ss + offs_m, tl.sum(hf * hf, axis=1), mask=m_ok)
    else:
        if SWIGLU:  # kernels/swiglu.py's rounding: gate and up as the projection would store them, silu rounded
            g = acc.to(out_ty).to(tl.float32)
            u = acc_u.to(out_ty).to(tl.float32)
            y = (g * tl.sigmoid(g)).to(out_ty).to(tl.float32) * u
        else:
            y = acc
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(out_ty), mask=mask)


@triton.jit
def _finish(
    acc, acc_u, pid_n, offs_m, offs_n, m_ok, n_ok, Y, stride_ym, KC, VC, POS, SLOT, INV_FREQ, n_slots, stride_kcb,
    stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch, RES, H_OUT, SS, stride_rm, stride_hm, stride_ss,
    SWIGLU: tl.constexpr, ROPE: tl.constexpr, RESID: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    if ROPE:
        _rope_epilogue(acc, pid_n, offs_m, m_ok, Y, stride_ym, KC, VC, POS, SLOT, INV_FREQ, n_slots, stride_kcb,
                       stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch, HQ, HKV, CACHE_BLOCK, BLOCK_M,
                       BLOCK_N)  # fmt: skip
    else:
        _epilogue(Y, acc, acc_u, offs_m, offs_n, m_ok, n_ok, stride_ym, RES, H_OUT, SS, stride_rm, stride_hm,
                  stride_ss, pid_n, SWIGLU, RESID)  # fmt: skip


@triton.jit
def _stream_rows(X, DELTA, offs_m, m_ok, cols, bound, stride_xm, stride_dm, HAS_DELTA: tl.constexpr):
    """The residual stream's rows at `cols` (< bound) in fp32: X, or X + DELTA rounded to X's dtype (the add as torch
    stores it: kernels/rmsnorm.py's add_rms_norm)."""
    mask = m_ok[:, None] & (cols < bound)[None, :]
    h = tl.load(X + offs_m[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(DELTA + offs_m[:, None] * stride_dm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (h + d).to(X.dtype.element_ty).to(tl.float32)
    return h


@triton.jit
def _load_w(ptrs, n_ok, k_ok, EVEN: tl.constexpr):
    if EVEN:
        w = tl.load(ptrs, eviction_policy="evict_first")
    else:
        w = tl.load(ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
    return w


@triton.jit
def _rope_epilogue(
    acc, head, offs_m, m_ok, Y, stride_ym, KC, VC, POS, SLOT, INV_FREQ, n_slots, stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch, HQ: tl.constexpr, HKV: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One head of the QKV projection (acc [BLOCK_M, HEAD_DIM]): as the projection would store it, then rotated into
    Y (a q head) or into the KV cache at each row's slot (a k head rotated, a v head as it is): kernels/rotary.py's
    arithmetic (rotate_pair's fmas, _rotate_store's fp8 saturation), so the cache holds the very bits the rotary
    kernel would write from the same projection."""
    HALF: tl.constexpr = HEAD_DIM // 2
    y = acc.to(Y.dtype.element_ty).to(tl.float32)
    x1, x2 = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, HALF)), (0, 2, 1)))  # the two halves of the head
    offs_i = tl.arange(0, HALF)
    pos = tl.load(POS + offs_m, mask=m_ok, other=0).to(tl.float32)
    a = reduce_angle(pos[:, None] * tl.load(INV_FREQ + offs_i)[None, :])
    c = tl.cos(a)
    s = tl.sin(a)
    if head < HQ:
        q_ptrs = Y + offs_m[:, None] * stride_ym + head * HEAD_DIM + offs_i[None, :]
        _rotate_store(x1, x2, c, s, q_ptrs, m_ok[:, None], HALF, True)
    else:
        slot = tl.load(SLOT + offs_m, mask=m_ok, other=-1).to(tl.int64)  # (-1, or past the cache: not written)
        ok = (m_ok & (slot >= 0) & (slot < n_slots))[:, None]
        blk = slot // CACHE_BLOCK
        off = slot % CACHE_BLOCK
        if head < HQ + HKV:
            kc = KC + (blk * stride_kcb + off * stride_kct)[:, None] + (head - HQ) * stride_kch + offs_i[None, :]
            _rotate_store(x1, x2, c, s, kc, ok, HALF, True)
        else:
            vc = VC + (blk * stride_vcb + off * stride_vct)[:, None] + (head - HQ - HKV) * stride_vch + offs_i[None, :]
            _rotate_store(x1, x2, c, s, vc, ok, HALF, False)


@triton.jit
def _prefetch_lines(ptrs):
    """prefetch.global.L2 of each address's 128-byte line: a hint (nothing returned, nothing faults)."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _prefetch_w(W, pid_n, k_start, N, K, stride_wn, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr, COLS: tl.constexpr):
    """Ask L2 for the first COLS columns of this program's W rows (its gate and up rows with SWIGLU), a line at a time
    (addresses clamped into W). Before a PDL wait: the weights, which no kernel before this one writes, start
    streaming while that kernel finishes."""
    LINE: tl.constexpr = 1024 // W.dtype.element_ty.primitive_bitwidth  # elements a line
    rows = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)
    cols = tl.minimum(k_start + tl.arange(0, COLS // LINE) * LINE, K - 1)
    ptrs = W + rows[:, None] * stride_wn + cols[None, :]
    _prefetch_lines(ptrs)
    if SWIGLU:  # the up rows follow the gate rows
        _prefetch_lines(ptrs + N.to(tl.int64) * stride_wn)


@triton.jit
def _decode_linear_kernel(
    X, W, Y, WS, CNT, M, N, K, stride_xm, stride_wn, stride_ym, k_per_split,
    KC, VC, POS, SLOT, INV_FREQ, n_slots, stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    DELTA, GAMMA, H_OUT, stride_dm, stride_hm, eps, RES, SS, stride_rm, stride_ss, n_ss,
    SWIGLU: tl.constexpr, ROPE: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    NORM: tl.constexpr, HAS_DELTA: tl.constexpr, RESID: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Grid (column blocks, SPLIT_K). N: output columns (I with SWIGLU: W has 2N rows). EVEN: N % BLOCK_N == 0 and
    K % BLOCK_K == 0 (no masks on W). WS [SPLIT_K, column blocks, 1 + SWIGLU, BLOCK_M, BLOCK_N] fp32 and CNT
    [column blocks] int32 (zero between launches): the split-K partials and their arrival counters.
    ROPE: W is the QKV projection [(HQ + 2 HKV) * BLOCK_N, K], a column block is one head (_rope_epilogue): Y gets
    the rotated q [M, HQ * BLOCK_N], KC / VC (paged caches, CACHE_BLOCK tokens a block) the rotated k and the v.
    NORM 1: X is the residual stream and the rows multiplied are rms_norm(X (+ DELTA)) * GAMMA (kernels/rmsnorm.py's
    rounding), each program first summing its rows' squares over all of K; with HAS_DELTA the column-block-0
    programs also store X + DELTA (the stream after the add) into H_OUT, each over its own K range. NORM 2: the same
    norm of X, its rows' sums of squares the n_ss partials SS[i] [M] (stride_ss apart) that a RESID launch left, added
    in order. RESID: see _epilogue (RES [M, N] the stream before the add, H_OUT after, SS [column blocks, M]).
    PDL: launched with programmatic dependent launch (dispatch.pdl_prologue), the first W tiles asked of L2 before
    its wait (_prefetch_w)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if PDL:
        _prefetch_w(W, pid_n, pid_k * k_per_split, N, K, stride_wn, SWIGLU, BLOCK_N, 4 * BLOCK_K)
    pdl_prologue(PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    x_ptrs = X + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + (k_start + offs_k)[None, :]
    up = N.to(tl.int64) * stride_wn  # the up rows follow the gate rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    rstd = tl.zeros((BLOCK_M,), tl.float32)
    if NORM == 1:  # the rows' statistics first: all of K, whichever split this program multiplies
        ss = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, loop_bound(K), BLOCK_K):
            h = _stream_rows(X, DELTA, offs_m, m_ok, k0 + offs_k, K, stride_xm, stride_dm, HAS_DELTA)
            ss += tl.sum(h * h, axis=1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    elif NORM == 2:  # from the partial sums the previous projection's epilogue left, in column-block order
        ss = tl.zeros((BLOCK_M,), tl.float32)
        for i in range(0, loop_bound(n_ss)):
            ss += tl.load(SS + i * stride_ss + offs_m, mask=m_ok, other=0.0)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    for k in range(loop_bound(k_start), loop_bound(k_stop), BLOCK_K):
        k_ok = k + offs_k < k_stop
        if NORM > 0:
            h = _stream_rows(X, DELTA, offs_m, m_ok, k + offs_k, k_stop, stride_xm, stride_dm, HAS_DELTA)
            if HAS_DELTA:
                if pid_n == 0:
                    h_ptrs = H_OUT + offs_m[:, None] * stride_hm + (k + offs_k)[None, :]
                    tl.store(h_ptrs, h.to(H_OUT.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])
            g = tl.load(GAMMA + k + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            n = (h * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
            x = (n * g[None, :]).to(X.dtype.element_ty).to(DOT_DTYPE)
        else:
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_last")
            x = x.to(DOT_DTYPE)
        w = _load_w(w_ptrs, n_ok, k_ok, EVEN)
        acc = tl.dot(x, tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PREC)
        if SWIGLU:
            w_u = _load_w(w_ptrs + up, n_ok, k_ok, EVEN)
            acc_u = tl.dot(x, tl.trans(w_u.to(DOT_DTYPE)), acc_u, input_precision=PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SPLIT_K == 1:
        _finish(acc, acc_u, pid_n, offs_m, offs_n, m_ok, n_ok, Y, stride_ym, KC, VC, POS, SLOT, INV_FREQ, n_slots,
                stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch, RES, H_OUT, SS, stride_rm,
                stride_hm, stride_ss, SWIGLU, ROPE, RESID, HQ, HKV, CACHE_BLOCK, BLOCK_M, BLOCK_N)  # fmt: skip
    else:
        TILE: tl.constexpr = BLOCK_M * BLOCK_N * (1 + SWIGLU)
        n_blocks = tl.num_programs(0)
        offs_t = offs_m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        mine = WS + (pid_k * n_blocks + pid_n).to(tl.int64) * TILE + offs_t
        tl.store(mine, acc)
        if SWIGLU:
            tl.store(mine + BLOCK_M * BLOCK_N, acc_u)
        tl.debug_barrier()  # every thread's partial stored before the release below publishes them
        arrived = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last split of this column block: sum all of them, in split order
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for s in tl.static_range(SPLIT_K):
                part = WS + (s * n_blocks + pid_n).to(tl.int64) * TILE + offs_t
                acc += tl.load(part, cache_modifier=".cg")
                if SWIGLU:
                    acc_u += tl.load(part + BLOCK_M * BLOCK_N, cache_modifier=".cg")
            tl.atomic_xchg(CNT + pid_n, 0)  # zero again for the next launch (or replay)
            _finish(acc, acc_u, pid_n, offs_m, offs_n, m_ok, n_ok, Y, stride_ym, KC, VC, POS, SLOT, INV_FREQ, n_slots,
                    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch, RES, H_OUT, SS, stride_rm,
                    stride_hm, stride_ss, SWIGLU, ROPE, RESID, HQ, HKV, CACHE_BLOCK, BLOCK_M, BLOCK_N)  # fmt: skip


# Split-K scratch per device: the partials (fp32) and the arrival counters (zero between launches). Grown, never
# shrunk; a launch on one stream at a time (the engine's): the counters are back to zero when a launch ends. A grown
# buffer's predecessor is kept (_RETIRED): a CUDA graph captured before the growth still writes to it on replay.
_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[torch.Tensor] = []


def _scratch(device: torch.device, ws_elems: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    ws, cnt = _SCRATCH.get(device, (None, None))
    if ws is None or ws.numel() < ws_elems:
        _RETIRED.extend([ws] if ws is not None else [])
        ws = torch.empty(max(ws_elems, 1 << 20), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < counters:
        _RETIRED.extend([cnt] if cnt is not None else [])
        cnt = torch.zeros(max(counters, 4096), dtype=torch.int32, device=device)
    _SCRATCH[device] = ws, cnt
    return ws, cnt


def linear_config(m: int, n_out: int, k: int, swiglu: bool, num_sms: int, config: dict | None = None) -> dict:
    """The launch for m rows, n_out output columns and depth k: the tiles above, K split while the column blocks
    alone give fewer than _PROGRAMS_PER_SM programs an SM and each split keeps at least _MIN_SPLIT_K of the depth.
    `config` overrides any of block_n, block_k, num_warps, num_stages, split_k (a sweep's variant)."""
    bad = sorted(set(config or {}) - set(_CONFIG_KEYS))
    if bad:
        raise ValueError(f"unknown decode_linear launch parameter(s) {bad}: expected some of {list(_CONFIG_KEYS)}")
    block_m = max(16, triton.next_power_of_2(m))
    cfg = {"block_n": _BLOCK_N, "block_k": _BLOCK_K if block_m < 32 else _BLOCK_K_MANY_ROWS, "num_stages": _NUM_STAGES}
    cfg.update({key: v for key, v in (config or {}).items() if key != "split_k"})
    # twice the warps for an accumulator of 64 x 128 (qkv_rope_linear's heads at 64 rows): at 4 warps its epilogue
    # spilled (255 registers; 123 at 8 warps: tests/kernels/test_sm90_compile.py)
    big = block_m * cfg["block_n"] >= 64 * 128
    cfg.setdefault("num_warps", 2 * _NUM_WARPS if big else _NUM_WARPS)
    for key, v in cfg.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1 or (key != "num_stages" and v & (v - 1)):
            raise ValueError(f"decode_linear launch parameter {key} must be a positive power of two, got {v!r}")
    if cfg["block_n"] < 16 or cfg["block_k"] < 16:
        raise ValueError(f"decode_linear's block_n and block_k must be at least 16 (tl.dot's minimum): {cfg}")
    if INTERPRET:  # (the interpreter: a few large programs)
        cfg["block_k"] = min(cfg["block_k"], max(16, triton.next_power_of_2(k)))
    n_blocks = triton.cdiv(n_out, cfg["block_n"])
    split = (config or {}).get("split_k")
    if split is None:
        split = 1
        while n_blocks * split * 2 <= _PROGRAMS_PER_SM * num_sms and k // (split * 2) >= _MIN_SPLIT_K:
            split *= 2
    elif not isinstance(split, int) or isinstance(split, bool) or split < 1:
        raise ValueError(f"decode_linear launch parameter split_k must be a positive int, got {split!r}")
    # every split a whole number of K steps, and none empty
    k_per_split = max(1, triton.cdiv(triton.cdiv(k, split), cfg["block_k"])) * cfg["block_k"]
    cfg["split_k"] = max(1, triton.cdiv(k, k_per_split))
    cfg["k_per_split"] = k_per_split
    return cfg


def _check(x: torch.Tensor, weight: torch.Tensor, swiglu: bool) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        shapes = f"{tuple(x.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"decode_linear needs x [M, K] and weight [N, K], got {shapes}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"decode_linear: x has {x.shape[1]} features, the weight {weight.shape[1]}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"decode_linear takes at most {MAX_ROWS} rows (a decode batch), got {x.shape[0]}")
    if x.dtype != weight.dtype or x.dtype not in _DTYPES:
        raise ValueError(f"decode_linear needs x and weight of one float dtype, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"decode_linear: x is on {x.device}, the weight on {weight.device}")
    if swiglu and weight.shape[0] % 2:
        raise ValueError(f"swiglu needs the fused [gate | up] weight (an even number of rows), got {weight.shape[0]}")
    if weight.stride(1) != 1:
        raise ValueError("decode_linear needs the weight's rows contiguous (F.linear's [N, K] layout)")


class RowSquares(NamedTuple):
    """A residual stream's rows' sums of squares in parts [column blocks, M] fp32, as decode_linear's `residual`
    epilogue leaves them beside the stream it wrote: the next projection's `norm` adds them up (in order) instead of
    reading the rows whole, so a decoder layer's adds and norms need no kernel of their own."""

    parts: torch.Tensor


def decode_linear(
    x: torch.Tensor, weight: torch.Tensor, *, swiglu: bool = False, norm: tuple | None = None,
    residual: torch.Tensor | None = None, config: dict | None = None,
):  # fmt: skip
    """x [M, K] (M <= MAX_ROWS) @ weight [N, K]^T -> [M, N]; with `swiglu` weight is [gate | up] ([2I, K]) and the
    result silu(x gate^T) * (x up^T) [M, I]. No autograd (a decode step's). config: see linear_config.

    norm (delta, gamma [K], eps): x is the residual stream and the rows multiplied are rms_norm(x + delta) * gamma
    (a decoder layer's add and norm in the prologue: kernels/rmsnorm.py's add_rms_norm, rounded alike); returns (y,
    the stream after the add). delta None: no add (x returned as the stream); a Tensor: each program first reads its
    rows whole for their statistics (cheap for a few rows only: decode_config's norm_rows), the first column block
    storing the stream; RowSquares: x is already the stream a `residual` launch wrote, and its row sums are the
    statistics (no add; x returned).
    residual [M, N]: the product is a residual branch (the output or down projection): returns (residual + y, its
    RowSquares) instead of y (torch's add of the rounded y). Not with swiglu or norm.
    Where Triton does not run (a CPU without the interpreter, or inside kernels.dispatch.reference_ops):
    kernels/reference.py's ops."""
    _check(x, weight, swiglu)
    if x.stride(1) != 1:
        x = x.contiguous()
    stream = _check_norm(x, norm)
    m, k = x.shape
    n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if residual is not None:
        _check_residual(residual, m, n_out, x, swiglu or stream is not None)
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    h = torch.empty_like(x) if stream is not None and isinstance(stream[0], torch.Tensor) else x
    if not use_triton(x):  # kernels/reference.py's ops (a CPU without the interpreter)
        linear_config(m, n_out, k, swiglu, 0, config)  # (the same errors as a launch)
        xin = x if stream is None else _reference_norm(x, stream, h)
        y = F.linear(xin, weight)
        if residual is not None:
            after = residual + y
            return after, RowSquares(after.float().pow(2).sum(-1)[None])
        return _result(reference.swiglu(y) if swiglu else y, h, stream)
    if residual is not None:
        after = torch.empty_like(residual)
        if m and n_out:
            sums = _launch(x, weight, y, n_out, residual=(residual, after), config=config)
        else:
            sums = torch.zeros(1, m, dtype=torch.float32, device=x.device)
        return after, RowSquares(sums)
    if m and n_out:
        _launch(x, weight, y, n_out, swiglu=swiglu, norm=None if stream is None else (*stream, h), config=config)
    return _result(y, h, stream)


def _check_residual(residual: torch.Tensor, m: int, n_out: int, x: torch.Tensor, other: bool) -> None:
    if other:
        raise ValueError("decode_linear's residual epilogue does not combine with swiglu or norm")
    if residual.shape != (m, n_out) or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual must be [M={m}, N={n_out}] {x.dtype} on {x.device}, got {tuple(residual.shape)} "
                         f"{residual.dtype} on {residual.device}")  # fmt: skip
    if residual.stride(-1) != 1:
        raise ValueError("residual must be contiguous in its last dimension")


def _check_norm(x: torch.Tensor, norm: tuple | None) -> tuple | None:
    """(delta (None, a Tensor or RowSquares), gamma, eps) of a `norm` argument, checked against the stream x [M, K]."""
    if norm is None:
        return None
    delta, gamma, eps = norm
    if isinstance(delta, RowSquares):
        parts = delta.parts
        if parts.dim() != 2 or parts.shape[1] != x.shape[0] or parts.dtype != torch.float32 or parts.device != x.device:
            raise ValueError(f"norm's RowSquares must be [blocks, M={x.shape[0]}] float32 on {x.device}, got "
                             f"{tuple(parts.shape)} {parts.dtype} on {parts.device}")  # fmt: skip
        delta = RowSquares(parts.contiguous())
    elif delta is not None:
        if delta.shape != x.shape or delta.dtype != x.dtype or delta.device != x.device:
            raise ValueError(f"norm's delta must match the stream x {tuple(x.shape)} {x.dtype}, got "
                             f"{tuple(delta.shape)} {delta.dtype} on {delta.device}")  # fmt: skip
        delta = delta if delta.stride(-1) == 1 else delta.contiguous()
    if gamma.shape != (x.shape[1],) or not gamma.is_floating_point() or gamma.device != x.device:
        raise ValueError(f"norm's gamma must be [K={x.shape[1]}] floats on {x.device}, got {tuple(gamma.shape)} "
                         f"{gamma.dtype} on {gamma.device}")  # fmt: skip
    if x.shape[1] == 0:
        raise ValueError("norm needs rows with at least one feature")
    return delta, gamma.contiguous(), float(eps)


def _reference_norm(x: torch.Tensor, stream: tuple, h: torch.Tensor) -> torch.Tensor:
    """The normalised rows by kernels/reference.py (its own statistics); h receives the stream after an add."""
    delta, gamma, eps = stream
    if not isinstance(delta, torch.Tensor):  # None or RowSquares: x is the stream
        return reference.rms_norm(x, gamma, eps)
    normed, after = reference.add_rms_norm(x, delta, gamma, eps)
    h.copy_(after)
    return normed


def _result(y: torch.Tensor, h: torch.Tensor, stream: tuple | None):
    return y if stream is None else (y, h)


def _launch(
    x, weight, y, n_out: int, *, swiglu: bool = False, rope: tuple | None = None, norm: tuple | None = None,
    residual: tuple | None = None, config=None,
) -> torch.Tensor | None:  # fmt: skip
    """One launch of the kernel (inputs checked). rope: (positions, inv_freq, k_cache, v_cache, slot_mapping, hq, hkv)
    of qkv_rope_linear; y then receives the rotated q. norm: (delta (None, a Tensor or RowSquares), gamma, eps, h_out):
    x is the residual stream, normalised in the prologue; h_out receives x + a Tensor delta. residual: (res, h_out) of
    the residual epilogue; returns the rows' sums of squares [column blocks, M] then."""
    m, k = x.shape
    cfg = linear_config(m, n_out, k, swiglu, sm_count(x.device) if x.is_cuda else 0, config)
    block_m = max(16, triton.next_power_of_2(m))
    n_blocks = triton.cdiv(n_out, cfg["block_n"])
    split = cfg["split_k"]
    if split > 1:
        ws, cnt = _scratch(x.device, split * n_blocks * (1 + swiglu) * block_m * cfg["block_n"], n_blocks)
    else:
        ws = cnt = y  # (unused)
    if rope is not None:
        pos, inv_freq, kc, vc, slots, hq, hkv = rope
        cache = (kc, vc, pos, slots, inv_freq, kc.shape[0] * kc.shape[1], *kc.stride()[:3], *vc.stride()[:3])
        heads = dict(HQ=hq, HKV=hkv, CACHE_BLOCK=kc.shape[1])
    else:  # (unused)
        cache, heads = (y, y, y, y, y, 0, 0, 0, 0, 0, 0, 0), dict(HQ=0, HKV=0, CACHE_BLOCK=1)
    norm_mode, has_delta = 0, False
    res, h_out, sums, n_sums, delta, gamma, eps = y, y, y, 0, x, y, 0.0  # (placeholders where unused)
    if norm is not None:
        d, gamma, eps, h_out = norm
        if isinstance(d, RowSquares):
            norm_mode, sums, n_sums = 2, d.parts, d.parts.shape[0]
        else:
            norm_mode, has_delta, delta = 1, d is not None, x if d is None else d
    if residual is not None:
        res, h_out = residual
        sums = torch.empty(n_blocks, m, dtype=torch.float32, device=x.device)
    args = (delta, gamma, h_out, delta.stride(0), h_out.stride(0), float(eps), res, sums, res.stride(0),
            sums.stride(0) if sums.dim() == 2 else 0, n_sums)  # fmt: skip
    even = n_out % cfg["block_n"] == 0 and k % cfg["block_k"] == 0
    _decode_linear_kernel[(n_blocks, split)](
        x, weight, y, ws, cnt, m, n_out, k, x.stride(0), weight.stride(0), y.stride(0), cfg["k_per_split"], *cache,
        *args, SWIGLU=swiglu, ROPE=rope is not None, **heads, NORM=norm_mode, HAS_DELTA=has_delta,
        RESID=residual is not None, SPLIT_K=split, EVEN=even, BLOCK_M=block_m, BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_dot_args(x.dtype),
        **pdl_args(x.device),  # (decode_config's pdl: programmatic dependent launch, sm_90+)
    )  # fmt: skip
    return sums if residual is not None else None


def qkv_rope_linear(
    x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, *, num_heads: int, rope_theta: float | reference.Rope = 10000.0,
    norm: tuple | None = None, config: dict | None = None,
):  # fmt: skip
    """A decode step's QKV projection with the rotary embedding and the KV-cache write in its epilogue (no rotary
    kernel, no q/k/v round trip): x [M, K] (M <= MAX_ROWS), weight [(Hq + 2 Hkv) * D, K] ([q | k | v] rows, this
    rank's shard), positions [M] int, caches [num_blocks, block_size, Hkv, D], slot_mapping [M] int (-1: not written).
    Returns q rotated [M, Hq, D]; the rotated k and the v are written at their slots (kernels/rotary.py's arithmetic:
    the bits launch_rotary writes from the same projection). D must be a power of two of at least 16; each program's
    column block is one head. norm: as decode_linear's (then returns (q, the stream after the add)). config: as
    decode_linear's (block_n is the head dim)."""
    from kernels.paged_attention import _check_caches

    _check(x, weight, False)
    _check_caches(k_cache, v_cache)
    _, _, hkv, d = k_cache.shape
    m = x.shape[0]
    if d < 16 or d & (d - 1):
        raise ValueError(f"qkv_rope_linear needs a power-of-two head dim of at least 16, got {d}")
    if weight.shape[0] != (num_heads + 2 * hkv) * d:
        raise ValueError(
            f"qkv_rope_linear: a QKV weight for {num_heads} query and {hkv} key/value heads of {d} has "
            f"{(num_heads + 2 * hkv) * d} rows, got {weight.shape[0]}"
        )
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (m,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be [M={m}] int32 or int64, got {tuple(t.shape)} {t.dtype}")
    if config and config.get("block_n", d) != d:
        raise ValueError(f"qkv_rope_linear's column block is one head: block_n must be {d}, got {config['block_n']}")
    if x.stride(1) != 1:
        x = x.contiguous()
    stream = _check_norm(x, norm)
    h = torch.empty_like(x) if stream is not None and isinstance(stream[0], torch.Tensor) else x
    if not use_triton(x):
        xin = x if stream is None else _reference_norm(x, stream, h)
        q, k, v = F.linear(xin, weight).split([num_heads * d, hkv * d, hkv * d], -1)
        q = reference.rope_write_kv(q.reshape(m, num_heads, d), k.reshape(m, hkv, d), v.reshape(m, hkv, d),
                                    positions, k_cache, v_cache, slot_mapping, rope_theta)  # fmt: skip
        return _result(q, h, stream)
    q = torch.empty((m, num_heads * d), dtype=x.dtype, device=x.device)
    check_slots(slot_mapping, k_cache)
    if m:
        inv_freq = rope_tables(d, rope_theta, x.device)[0]
        rope = (positions.contiguous(), inv_freq, k_cache, v_cache, slot_mapping.contiguous(), num_heads, hkv)
        _launch(x, weight, q, weight.shape[0], rope=rope, norm=None if stream is None else (*stream, h),
                config={**(config or {}), "block_n": d})  # fmt: skip
    return _result(q.view(m, num_heads, d), h, stream)


def wants_decode_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` runs decode_linear: decode_config's `linear` switch on, a Triton device, at most MAX_ROWS rows
    of the weight's dtype, and nothing for autograd to record."""
    if not linear_enabled() or not use_triton(x) or x.dtype != weight.dtype or weight.stride(-1) != 1:
        return False
    if x.dtype not in _DTYPES or x.device != weight.device:
        return False
    if x.numel() > MAX_ROWS * x.shape[-1] or x.shape[-1] != weight.shape[1]:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight), through decode_linear where wants_decode_linear says so (a decode step's projections)."""
    if not wants_decode_linear(x, weight):
        return F.linear(x, weight)
    return decode_linear(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])


def swiglu_linear(x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up of x's fused gate_up projection in one launch (decode_linear's swiglu), or None where `linear`
    would not take the kernel (the caller then runs the projection and kernels/swiglu.py)."""
    if not wants_decode_linear(x, gate_up_weight):
        return None
    y = decode_linear(x.reshape(-1, x.shape[-1]), gate_up_weight, swiglu=True)
    return y.reshape(*x.shape[:-1], y.shape[-1])
