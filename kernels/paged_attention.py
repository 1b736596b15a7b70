"""Decode attention over a paged KV cache, and the KV-cache writes that feed it.

Cache layout (shared with the prefill path): the engine's pool is one tensor
[layers, 2, num_blocks, block_size, Hkv, D]; per layer k_cache = pool[l, 0] and v_cache = pool[l, 1],
each [num_blocks, block_size, Hkv, D]. A token lives at slot = block_id * block_size + offset;
slot_mapping [N] int64 uses -1 for "do not write". Keys are stored already rotated.

- `paged_decode_attention`: flash-decoding. Grid (B, Hkv, num_splits): one program owns every query
  head of one kv head (GQA group) so each K/V tile is loaded once for the group, over one slice of
  the context; with several splits the partial (max, sum, acc) go to an fp32 workspace and a second
  kernel merges them. Inference only (no autograd).
- `rope_decode_attention`: a decode step's whole attention (what the engine calls): rope_write_kv's kernel then the
  decode kernel, or with decode_config's fuse_rope 1 one launch: the decode kernel also rotates q and the new k,
  attends to the new token from registers and writes its k and v into their slots (faster at long contexts, slower
  in the 13B rollouts on an H200: decode_config has the figures).
- `rope_write_kv`: the decode-step companion: rotary on q and k (cos/sin from integer positions,
  in fp32, in-kernel) and the write of rotated k and v into their slots, in one launch of
  kernels/rotary.py's kernel (the one prefill uses too, so both store the same rotated keys).
- `write_kv_cache`: the plain write (the same kernel, no rotation).
The decode kernel's launch parameters (tiles, warps, the fused step, context splits): kernels/decode_config.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.decode_config import (  # noqa: F401  (set_decode_config, check_decode_config: this module's API too)
    _overrides,
    check_decode_config,
    choose_num_splits,
    decode_config,
    pdl_args,
    set_decode_config,
)
from kernels.dispatch import INTERPRET, loop_bound, pdl_prologue, sm_count, use_triton
from kernels.rotary import check_slots, launch_rotary, reduce_angle, rope_tables

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A cache may also hold float8 e4m3 (half the bytes of bf16 to write and, every decode step, to read): the write
# converts with saturation at +-448 (no scale), the decode kernel converts each K/V tile back to q's dtype.
_CACHE_DTYPES = (*_FLOAT_DTYPES, torch.float8_e4m3fn)
# ============================================================================== jit kernels ==


# fmt: off
@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, n0, end, bt_row, k_head, v_head, stride_kb, stride_kt, stride_vb, stride_vt, scale_log2e,
    offs_d, d_mask, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_PAD: tl.constexpr, USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Online-softmax update of m, l [GROUP_PAD] and acc [GROUP_PAD, BLOCK_D] with tokens [n0, n0 + BLOCK_N).
    K/V tiles are converted to q's dtype (fp32 when UPCAST) right after the load: an fp8 cache is read at one
    byte per element."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < end
    # Per-token gather through the block table: a tile may span several physical blocks.
    blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    tok = offs_n % BLOCK_SIZE
    if EVEN_D:
        # A mask constant along D lets the compiler keep 16-byte vector loads.
        kv_mask = n_mask[:, None]
    else:
        kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_head + blk[:, None] * stride_kb + tok[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_head + blk[:, None] * stride_vb + tok[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    else:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    if USE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    elif GROUP_PAD == 1:
        # MHA: a dot padded to 16 rows would mostly multiply zeros. Multiply-reduce in 2D ([1, D] against
        # [BLOCK_N, D]) so K keeps its load layout; only [BLOCK_N] vectors change layout.
        s = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)[None, :]
    else:
        s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    s = tl.where(n_mask[None, :], s * scale_log2e, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_DOT:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    elif GROUP_PAD == 1:
        pv = tl.sum(tl.sum(p, axis=0)[:, None] * v.to(tl.float32), axis=0)[None, :]
    else:
        pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc
# fmt: on


# fmt: off
@triton.jit
def _rotate_half(x, x_pair, cos, sin, lo):
    """Rotary (HF rotate half) in fp32 of x whose element i pairs with x_pair's (lo: i in the first half): one fma an
    element, kernels/rotary.py's rotate_pair's to the bit (its fma(x1, c, -(x2 * s)) in the first half, fma(x2, c,
    x1 * s) in the second; a negation is exact), so either kernel writes the same key."""
    x = x.to(tl.float32)
    t = x_pair.to(tl.float32) * sin
    return tl.fma(x, cos, tl.where(lo, -t, t))


@triton.jit
def _to_cache(x, dtype: tl.constexpr):
    """x in a cache's dtype: float8 e4m3 saturates at +-448 (as kernels/rotary.py's write does)."""
    if dtype == tl.float8e4nv:
        x = tl.clamp(x.to(tl.float32), -448.0, 448.0)
    return x.to(dtype)
# fmt: on


# fmt: off
@triton.jit
def _paged_decode_kernel(
    Q, K, V, BT, CL, O, WS_M, WS_L, WS_ACC, KN, VN, POS, SLOT, INV_FREQ, scale_log2e, tokens_per_split, max_tokens,
    n_slots, stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_btb,
    stride_ob, stride_oh, stride_knb, stride_knh, stride_vnb, stride_vnh, num_q_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, NEW_KV: tl.constexpr, PDL: tl.constexpr,
):
    """One (sequence, kv head, context split): online softmax over tokens [start, end) for GROUP query heads.
    PDL: launched with programmatic dependent launch (dispatch.pdl_prologue).

    NEW_KV (rope_decode_attention): Q holds the unrotated query and the context's last token is the new one, whose
    unrotated k and v are KN, VN: q and k are rotated here (rotary.py's angles and formula), the program whose split
    holds the last position attends to the new token from registers (as the cache holds it: rounded to the cache's
    dtype) and writes it at SLOT (-1, or a slot past the cache's n_slots: no write); the cache is read up to it."""
    pdl_prologue(PDL)
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    ctx = tl.load(CL + pid_b)
    start = pid_s * tokens_per_split
    # Clamp to what the block table can address: a too-long context must not read past the table.
    end = tl.minimum(tl.minimum(start + tokens_per_split, ctx), max_tokens)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = pid_h * GROUP + offs_g
    q_row = Q + pid_b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_row + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if NEW_KV:
        # rotate half: element i pairs with i +- D/2; both use frequency i mod D/2
        lo = offs_d < HEAD_DIM // 2
        partner = tl.where(lo, offs_d + HEAD_DIM // 2, offs_d - HEAD_DIM // 2)
        inv_freq = tl.load(INV_FREQ + tl.where(lo, offs_d, partner), mask=d_mask, other=0.0)
        angle = reduce_angle(tl.load(POS + pid_b).to(tl.float32) * inv_freq)
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        q_pair = tl.load(q_row + partner[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        # rounded to q's dtype as rope_write_kv's rotated q is
        q = _rotate_half(q, q_pair, cos[None, :], sin[None, :], lo[None, :]).to(Q.dtype.element_ty)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    if NEW_KV:
        # The new token first (the softmax does not care about the order), so the rotation's cos/sin are dead before
        # the loop: kept to its end they cost a program per SM (96 -> 121 registers at Llama-2-13B batch 8, 4,096
        # tokens; the kernel 16% slower on an H200). Branch-free: a program whose split does not hold the new token
        # keeps the empty state and writes nothing.
        last = ctx - 1
        end = tl.minimum(end, last)  # the loop stops before the new token's slot (written here)
        has_new = (last >= start) & (last < start + tokens_per_split) & (last < max_tokens)
        kn_row = KN + pid_b.to(tl.int64) * stride_knb + pid_h * stride_knh
        k_rot = _rotate_half(
            tl.load(kn_row + offs_d, mask=d_mask, other=0.0), tl.load(kn_row + partner, mask=d_mask, other=0.0),
            cos, sin, lo,
        )  # fmt: skip
        v_new = tl.load(VN + pid_b.to(tl.int64) * stride_vnb + pid_h * stride_vnh + offs_d, mask=d_mask, other=0.0)
        k_new = _to_cache(k_rot, K.dtype.element_ty)
        v_new = _to_cache(v_new, V.dtype.element_ty)
        slot = tl.load(SLOT + pid_b).to(tl.int64)  # caches can exceed 2^31 elements
        w_mask = d_mask & has_new & (slot >= 0) & (slot < n_slots)
        blk = slot // BLOCK_SIZE
        tok = slot % BLOCK_SIZE
        tl.store(K + blk * stride_kb + tok * stride_kt + pid_h * stride_kh + offs_d, k_new, mask=w_mask)
        tl.store(V + blk * stride_vb + tok * stride_vt + pid_h * stride_vh + offs_d, v_new, mask=w_mask)
        # the softmax state after the new token alone, from what the cache now holds (other splits: empty)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale_log2e
        m_i = tl.where(has_new, s_new, m_i)
        l_i = tl.where(has_new, 1.0, l_i)
        acc = tl.where(has_new, acc + v_new.to(tl.float32)[None, :], acc)
    bt_row = BT + pid_b.to(tl.int64) * stride_btb
    k_head = K + pid_h.to(tl.int64) * stride_kh
    v_head = V + pid_h.to(tl.int64) * stride_vh
    for n0 in range(loop_bound(start), loop_bound(end), BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, n0, end, bt_row, k_head, v_head, stride_kb, stride_kt, stride_vb, stride_vt,
            scale_log2e, offs_d, d_mask, BLOCK_SIZE, BLOCK_N, GROUP_PAD, USE_DOT, UPCAST, DOT_PRECISION,
            HEAD_DIM == BLOCK_D,
        )
    out_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        # An empty context (padding rows of a CUDA-graph batch) gives zeros, not NaN.
        denom = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc / denom[:, None]
        o_ptrs = O + pid_b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=out_mask)
    else:
        # Workspace [B, Hq, NUM_SPLITS] for m and l, [B, Hq, NUM_SPLITS, HEAD_DIM] for acc (contiguous).
        row = (pid_b.to(tl.int64) * num_q_heads + heads) * NUM_SPLITS + pid_s
        tl.store(WS_M + row, m_i, mask=g_mask)
        tl.store(WS_L + row, l_i, mask=g_mask)
        tl.store(WS_ACC + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
# fmt: on


# fmt: off
@triton.jit
def _paged_decode_reduce_kernel(
    WS_M, WS_L, WS_ACC, O, stride_ob, stride_oh, num_q_heads, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr,
):
    """Merge the NUM_SPLITS partial softmaxes of one (sequence, query head). PDL: as the decode kernel's."""
    pdl_prologue(PDL)
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    row = (pid_b.to(tl.int64) * num_q_heads + pid_h) * NUM_SPLITS + offs_s
    m = tl.load(WS_M + row, mask=s_mask, other=float("-inf"))
    l = tl.load(WS_L + row, mask=s_mask, other=0.0)
    acc = tl.load(WS_ACC + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    # Empty splits carry m = -inf; if every split is empty keep exp2 finite and return zeros.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    l_tot = tl.sum(w * l, axis=0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.where(l_tot > 0.0, l_tot, 1.0)
    tl.store(O + pid_b.to(tl.int64) * stride_ob + pid_h * stride_oh + offs_d, o.to(O.dtype.element_ty), mask=d_mask)
# fmt: on


# =========================================================================== host launchers ==


def _check_cache(name: str, cache: torch.Tensor) -> None:
    if cache.dim() != 4:
        raise ValueError(f"{name} must be [num_blocks, block_size, Hkv, D], got shape {tuple(cache.shape)}")
    if cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"{name} dtype {cache.dtype} is not one of fp32/fp16/bf16/float8_e4m3fn")
    if cache.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last (head) dimension")
    bs = cache.shape[1]
    if bs <= 0 or bs & (bs - 1):
        raise ValueError(f"{name} block_size {bs} must be a power of two")


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _check_cache("k_cache", k_cache)
    _check_cache("v_cache", v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache shape {tuple(k_cache.shape)} != v_cache shape {tuple(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache dtype {k_cache.dtype} != v_cache dtype {v_cache.dtype}")


def _decode_launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    max_context_len: int,
    num_splits: int | None,
    config: dict | None = None,
    new_kv: tuple | None = None,
) -> None:
    """new_kv: (k, v, positions, slot_mapping, rope) of rope_decode_attention (q then unrotated), else None."""
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    # the kernel reads a table row and the lengths with unit stride (a no-op for the engine's row slices)
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
    group = hq // hkv
    block_d = triton.next_power_of_2(d)
    cfg = {**decode_config(group, block_d, k_cache.element_size()), **_overrides, **(config or {})}
    pdl = pdl_args(q.device, cfg["pdl"])  # (programmatic dependent launch, sm_90+)
    use_dot = group >= cfg["dot_min_group"]
    # tl.dot needs M >= 16: pad the query-head group (padding rows read q = 0 and are not stored).
    group_pad = max(16, triton.next_power_of_2(group)) if use_dot else triton.next_power_of_2(group)
    block_n = cfg["block_n"]
    if num_splits is None:
        num_splits = choose_num_splits(b, hkv, max_context_len, block_n, sm_count(q.device), cfg["min_split_tokens"])
    num_splits = max(1, int(num_splits))
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_context_len, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(max_context_len, tokens_per_split))
    if num_splits > 1:
        ws_m = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
        ws_l = torch.empty_like(ws_m)
        ws_acc = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
    else:
        ws_m = ws_l = ws_acc = out  # unused
    upcast = INTERPRET or q.dtype == torch.float32
    if new_kv is not None:
        k, v, positions, slot_mapping, rope = new_kv
        inv_freq = rope_tables(d, rope, q.device)[0]
        positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    else:  # (unused)
        k = v = q
        positions = slot_mapping = inv_freq = context_lens
    # fmt: off
    _paged_decode_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, ws_m, ws_l, ws_acc, k, v, positions, slot_mapping,
        inv_freq, scale * math.log2(math.e), tokens_per_split, block_tables.shape[1] * block_size,
        k_cache.shape[0] * block_size, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), hq,
        HEAD_DIM=d, BLOCK_D=block_d, GROUP=group, GROUP_PAD=group_pad, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, USE_DOT=use_dot, UPCAST=upcast, DOT_PRECISION="ieee" if upcast else "tf32",
        NEW_KV=new_kv is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl,
    )
    # fmt: on
    if num_splits > 1:
        _paged_decode_reduce_kernel[(b, hq)](
            ws_m,
            ws_l,
            ws_acc,
            out,
            out.stride(0),
            out.stride(1),
            hq,
            HEAD_DIM=d,
            BLOCK_D=block_d,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
            **pdl,
        )


def _check_write_inputs(k, v, k_cache, v_cache, slot_mapping) -> None:
    _check_caches(k_cache, v_cache)
    _, _, hkv, d = k_cache.shape
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 3 or tuple(x.shape[1:]) != (hkv, d):
            raise ValueError(f"{name} must be [N, Hkv={hkv}, D={d}] to match the cache, got {tuple(x.shape)}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dimension")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} is not one of fp32/fp16/bf16")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens but v has {v.shape[0]}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping must be [N={k.shape[0]}], got shape {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping dtype {slot_mapping.dtype} must be int32 or int64")
    if d % 2:
        raise ValueError(f"head dim {d} must be even")
    devices = {t.device for t in (k, v, k_cache, v_cache, slot_mapping)}
    if len(devices) > 1:
        raise ValueError(f"k, v, caches and slot_mapping must share one device, got {devices}")


# ======================================================================== public functions ==


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    out: torch.Tensor | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    q [B, Hq, D] (already rotated); k_cache/v_cache [num_blocks, block_size, Hkv, D] (keys rotated);
    block_tables [B, max_blocks] int32; context_lens [B] int32, the cached tokens each sequence attends
    to, the current one (already written) included. Hq must be a multiple of Hkv (GQA).
    Returns [B, Hq, D] in q's dtype (into `out` if given). A context length of 0 gives zeros.

    max_context_len: a host-side upper bound of context_lens (no device sync); it sizes the context
    splits, and tokens past it are not read, so it must bound every context length. Default
    block_tables.shape[1] * block_size (fixed per shape: what a CUDA graph needs). On CUDA, contexts
    longer than that are clamped rather than checked (a check would need a host sync); the
    interpreter and the CPU reference check them. num_splits: force the split count (tests);
    config: override decode_config()'s launch parameters (tuning).
    """
    out, scale, bound = _check_decode(q, k_cache, v_cache, block_tables, context_lens, softmax_scale, out,
                                      max_context_len)  # fmt: skip
    if not use_triton(q):
        # CPU reference path: the host sync is free here, so check the real lengths too.
        out.copy_(reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, bound))
        return out
    if q.shape[0]:
        bound = _bound(bound, block_tables, k_cache)
        _decode_launch(q, k_cache, v_cache, block_tables, context_lens, scale, out, bound, num_splits, config)
    return out


def rope_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    rope_theta: float | reference.Rope = 10000.0,
    softmax_scale: float | None = None,
    out: torch.Tensor | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """A decode step's attention in one launch: rope_write_kv (rotate q and k, write the rotated k and v at
    slot_mapping) then paged_decode_attention, fused: the new token is attended from registers, as the cache holds
    it, and written by the program that attends to it (no separate rotary/write kernel, no read back).

    q [B, Hq, D] and k, v [B, Hkv, D] unrotated; positions [B] int; slot_mapping [B] int (-1: not written); the
    other arguments as paged_decode_attention's. Each sequence's context (context_lens, the new token included) ends
    with the new token, which must be the token slot_mapping writes (the engine's decode batches): position
    context_lens - 1 of the block table. Returns [B, Hq, D]; the caches are written in place. The decode config's
    `fuse_rope` (default 0: decode_config's measurements) says which: the fused kernel or the two kernels.
    """
    out, scale, bound = _check_decode(q, k_cache, v_cache, block_tables, context_lens, softmax_scale, out,
                                      max_context_len)  # fmt: skip
    _check_rope_inputs(q, k, v, positions, k_cache, v_cache, slot_mapping)
    if not use_triton(q):  # (the inputs are checked once: the two ops' own entry points would check them again)
        q_rot = reference.rope_write_kv(q, k, v, positions, k_cache, v_cache, slot_mapping, rope_theta)
        out.copy_(reference.paged_decode_attention(q_rot, k_cache, v_cache, block_tables, context_lens, scale, bound))
        return out
    if q.shape[0] == 0:
        return out
    bound = _bound(bound, block_tables, k_cache)
    if not {"fuse_rope": 0, **_overrides, **(config or {})}["fuse_rope"]:  # the two kernels (launch_rotary checks)
        q_rot = torch.empty_like(q)
        launch_rotary(k, v, positions, rope_theta=rope_theta, q=q, q_out=q_rot, k_cache=k_cache, v_cache=v_cache,
                      slot_mapping=slot_mapping)  # fmt: skip
        _decode_launch(q_rot, k_cache, v_cache, block_tables, context_lens, scale, out, bound, num_splits, config)
        return out
    check_slots(slot_mapping, k_cache)
    _decode_launch(q, k_cache, v_cache, block_tables, context_lens, scale, out, bound,
                   num_splits, config, new_kv=(k, v, positions, slot_mapping, rope_theta))  # fmt: skip
    return out


def _capacity(block_tables: torch.Tensor, k_cache: torch.Tensor) -> int:
    """Tokens a block table can address."""
    return block_tables.shape[1] * k_cache.shape[1]


def _bound(max_context_len: int | None, block_tables: torch.Tensor, k_cache: torch.Tensor) -> int:
    """The kernel's max_context_len: the caller's, else all the block table can address (fixed per shape)."""
    return _capacity(block_tables, k_cache) if max_context_len is None else max_context_len


def _check_decode(q, k_cache, v_cache, block_tables, context_lens, softmax_scale, out, max_context_len):
    """paged_decode_attention's argument checks (ValueError naming the problem). Returns out (allocated if None),
    the softmax scale and max_context_len (None stays None: the reference then reads the lengths)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    _check_caches(k_cache, v_cache)
    b, hq, d = q.shape
    _, block_size, hkv, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"q head dim {d} != cache head dim {dk}")
    if hq < 1 or hkv < 1:
        raise ValueError(f"q and the caches need at least one head, got {hq} query and {hkv} key/value heads")
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
    if k_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise ValueError(f"q dtype {q.dtype} != cache dtype {k_cache.dtype} (a cache may also be float8_e4m3fn)")
    if q.stride(-1) != 1:
        raise ValueError("q must be contiguous in its last (head) dimension")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens)}
    if len(devices) > 1:
        raise ValueError(f"q, caches, block_tables and context_lens must share one device, got {devices}")
    if block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables must be [B={b}, max_blocks], got shape {tuple(block_tables.shape)}")
    if block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_tables dtype {block_tables.dtype} must be int32")
    if context_lens.shape != (b,):
        raise ValueError(f"context_lens must be [B={b}], got shape {tuple(context_lens.shape)}")
    if context_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"context_lens dtype {context_lens.dtype} must be int32")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)}, contiguous in D")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    capacity = _capacity(block_tables, k_cache)
    if max_context_len is not None and max_context_len > capacity:
        raise ValueError(
            f"max_context_len {max_context_len} needs {-(-max_context_len // block_size)} blocks but "
            f"block_tables has {block_tables.shape[1]} columns"
        )
    if INTERPRET and use_triton(q) and b:
        # Only checkable with a host sync; the interpreter path is free to do it (CUDA must not).
        longest = int(context_lens.max())
        if longest > capacity:
            raise ValueError(f"context length {longest} needs more blocks than block_tables' {block_tables.shape[1]}")
        if max_context_len is not None and longest > max_context_len:
            raise ValueError(f"context length {longest} exceeds max_context_len {max_context_len}")
        _check_block_ids(block_tables, context_lens, block_size, k_cache.shape[0])
    return out, scale, max_context_len


def _check_block_ids(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, num_blocks: int) -> None:
    """The interpreter's check (a host sync) that every block a sequence's context reads is one of the cache's: the
    kernel addresses K and V by the ids as they are (past the cache: another tensor's memory, or a fault on a GPU)."""
    used = (
        torch.arange(block_tables.shape[1], device=block_tables.device)
        < (context_lens[:, None] + block_size - 1) // block_size
    )
    ids = block_tables[used]
    bad = (ids < 0) | (ids >= num_blocks)
    if bool(bad.any()):
        row = int(used.nonzero()[bad.nonzero()[0, 0], 0])
        raise ValueError(f"block_tables row {row} reads block {int(ids[bad][0])} of a cache of {num_blocks} blocks")


def _check_rope_inputs(q, k, v, positions, k_cache, v_cache, slot_mapping) -> None:
    """rope_write_kv's argument checks (ValueError naming the problem)."""
    _check_write_inputs(k, v, k_cache, v_cache, slot_mapping)
    n = k.shape[0]
    if q.dim() != 3 or q.shape[0] != n or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q must be [N={n}, Hq (a multiple of {k.shape[1]}), D={k.shape[2]}], got {tuple(q.shape)}")
    if q.stride(-1) != 1 or q.dtype not in _FLOAT_DTYPES:
        raise ValueError("q must be fp32/fp16/bf16 and contiguous in its last (head) dimension")
    if q.device != k.device or positions.device != k.device:
        raise ValueError(f"q ({q.device}), positions ({positions.device}) and k ({k.device}) must share one device")
    if positions.shape != (n,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 [N={n}], got {positions.dtype} {tuple(positions.shape)}")


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    rope_theta: float | reference.Rope = 10000.0,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k (HF rotate-half, fp32 cos/sin from integer positions), write rotated k and v to the cache.

    q [N, Hq, D], k/v [N, Hkv, D], positions [N] int, slot_mapping [N] int64 (-1: skip the write);
    caches [num_blocks, block_size, Hkv, D], written in place. Returns rotated q [N, Hq, D] (q_out if given).
    """
    _check_rope_inputs(q, k, v, positions, k_cache, v_cache, slot_mapping)
    if q_out is None:
        q_out = torch.empty_like(q)
    elif q_out.shape != q.shape or q_out.dtype != q.dtype or q_out.stride(-1) != 1:
        raise ValueError(f"q_out must be a {q.dtype} tensor of shape {tuple(q.shape)}, contiguous in D")
    if not use_triton(q):
        q_out.copy_(reference.rope_write_kv(q, k, v, positions, k_cache, v_cache, slot_mapping, rope_theta))
        return q_out
    launch_rotary(k, v, positions, rope_theta=rope_theta, q=q, q_out=q_out, k_cache=k_cache, v_cache=v_cache,
                  slot_mapping=slot_mapping)  # fmt: skip
    return q_out


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k/v [N, Hkv, D] as they are into caches [num_blocks, block_size, Hkv, D] at slot_mapping [N] (-1: skip)."""
    _check_write_inputs(k, v, k_cache, v_cache, slot_mapping)
    if not use_triton(k):
        reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
        return
    launch_rotary(k, v, slot_mapping, rotate=False, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
