"""Rotary embedding applied once per token, and the paged KV-cache write, in one kernel.

One launch rotates (Llama / HF "rotate half") q and/or k of N tokens at integer positions, writes the
rotated q and k to output tensors and/or the rotated k and the v of each token into a paged KV cache.
It serves three callers:
- decode (`kernels.paged_attention.rope_write_kv`): rotate q -> q_out, rotate k, write k and v to the cache;
- prefill and training (`kernels.rope_attention`): rotate k once per token -> k_out, which the attention
  kernels then read as it is (no rotation in their inner loops), and in prefill also write the cache;
- `kernels.paged_attention.write_kv_cache`: k and v into the cache as they are (ROTATE False).
So prefill and decode put bit-identical rotated keys into the cache for the same (k, position).

Angles: HF's fp32 inverse frequencies (kernels.reference.rotary_inv_freq, passed in as a tensor), pos * f in
fp32, reduced mod 2*pi before cos/sin (accurate at large positions whatever the device's sin/cos do: to about 4e5,
where k * 6.28125 stops being exact in fp32; Llama contexts end at 131072).
Tiles are [BLOCK_T tokens, BLOCK_H heads, half head dim]: cos/sin are computed once per (token, frequency)
in a program and shared by its heads. Grid (token blocks, q-head blocks + k-head blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.decode_config import pdl_args
from kernels.dispatch import INTERPRET, fill_sms, pdl_prologue, sm_count

TAB_ROWS = 128  # rows of the cos/sin(j * f) table (kernels.rope_attention's tile rotation)


@triton.jit
def reduce_angle(a):
    """a mod 2*pi in [-pi, pi] (Cody-Waite, 2*pi = 6.28125 + c2): keeps sin/cos accurate at large positions.
    Explicit fmas: every kernel that inlines this rounds the same way whatever the compiler would contract."""
    k = tl.floor(tl.fma(a, 0.15915494309189535, 0.5))
    return tl.fma(-k, 0.0019353071795864769, tl.fma(-k, 6.28125, a))


@triton.jit
def rotate_pair(x1, x2, c, s):
    """(x1 * c - x2 * s, x2 * c + x1 * s) in fp32 with explicit fmas, so that every kernel rotating a key stores the
    very same bits: prefill and decode keys agree (kernels/paged_attention.py's fused decode step computes the same
    fmas on a whole head row at once: _rotate_half)."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return tl.fma(x1, c, -(x2 * s)), tl.fma(x2, c, x1 * s)


@triton.jit
def _tile_ptrs(base, rows, stride_n, heads, stride_h, offs_i):
    return base + rows[:, None, None] * stride_n + heads[None, :, None] * stride_h + offs_i[None, None, :]


FP8_MAX = 448.0  # largest finite float8 e4m3 (torch.float8_e4m3fn); conversions saturate to it


@triton.jit
def _rotate_store(x1, x2, c, s, out, mask, HALF: tl.constexpr, ROTATE: tl.constexpr):
    """Store x (halves x1, x2) rotated by the angles whose cos/sin are c, s (or as it is) at out, out + HALF.
    An fp8 output (a KV cache in float8 e4m3) saturates at +-448, as torch's and the GPU's conversions do."""
    if ROTATE:
        y1, y2 = rotate_pair(x1, x2, c, s)
    else:
        y1 = x1
        y2 = x2
    if out.dtype.element_ty == tl.float8e4nv:
        y1 = tl.clamp(y1.to(tl.float32), -448.0, 448.0)
        y2 = tl.clamp(y2.to(tl.float32), -448.0, 448.0)
    tl.store(out, y1.to(out.dtype.element_ty), mask=mask)
    tl.store(out + HALF, y2.to(out.dtype.element_ty), mask=mask)


# fmt: off
@triton.jit
def _rotary_kernel(
    Q, QO, K, KO, V, KC, VC, POS, SLOT, INV_FREQ, n_tokens, n_slots,
    stride_qn, stride_qh, stride_qon, stride_qoh, stride_kn, stride_kh, stride_kon, stride_koh, stride_vn, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, CACHE_BLOCK: tl.constexpr, ROTATE: tl.constexpr, WRITE_K: tl.constexpr,
    WRITE_CACHE: tl.constexpr, PDL: tl.constexpr,
):
    """Program (t, j): tokens [t * BLOCK_T, +BLOCK_T); head block j of q (j < cdiv(HQ, BLOCK_H)) or else of k/v.

    q heads: QO = rot(Q). k heads: KO = rot(K) if WRITE_K; if WRITE_CACHE, rot(K) and V at each token's slot
    (slot = block * CACHE_BLOCK + offset; -1 skips, and so does a slot past the cache's n_slots: on a GPU, where the
    host cannot check without a sync, nothing outside the cache is written). HQ = 0: no q. ROTATE False: copies.
    PDL: programmatic dependent launch (dispatch.pdl_prologue)."""
    pdl_prologue(PDL)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.program_id(1)
    t_ok = offs_t < n_tokens
    rows = offs_t.to(tl.int64)
    offs_i = tl.arange(0, HALF_PAD)
    i_ok = offs_i < HALF
    c = 0.0
    s = 0.0
    if ROTATE:
        pos = tl.load(POS + offs_t, mask=t_ok, other=0).to(tl.float32)
        inv_freq = tl.load(INV_FREQ + offs_i, mask=i_ok, other=0.0)
        a = reduce_angle(pos[:, None] * inv_freq[None, :])
        c = tl.cos(a)[:, None, :]
        s = tl.sin(a)[:, None, :]
    Q_BLOCKS: tl.constexpr = (HQ + BLOCK_H - 1) // BLOCK_H
    if j < Q_BLOCKS:
        heads = j * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = t_ok[:, None, None] & (heads < HQ)[None, :, None] & i_ok[None, None, :]
        q_ptrs = _tile_ptrs(Q, rows, stride_qn, heads, stride_qh, offs_i)
        x1 = tl.load(q_ptrs, mask=mask, other=0.0)
        x2 = tl.load(q_ptrs + HALF, mask=mask, other=0.0)
        _rotate_store(x1, x2, c, s, _tile_ptrs(QO, rows, stride_qon, heads, stride_qoh, offs_i), mask, HALF, ROTATE)
    else:
        heads = (j - Q_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = t_ok[:, None, None] & (heads < HKV)[None, :, None] & i_ok[None, None, :]
        k_ptrs = _tile_ptrs(K, rows, stride_kn, heads, stride_kh, offs_i)
        x1 = tl.load(k_ptrs, mask=mask, other=0.0)
        x2 = tl.load(k_ptrs + HALF, mask=mask, other=0.0)
        if WRITE_K:
            ko_ptrs = _tile_ptrs(KO, rows, stride_kon, heads, stride_koh, offs_i)
            _rotate_store(x1, x2, c, s, ko_ptrs, mask, HALF, ROTATE)
        if WRITE_CACHE:
            slot = tl.load(SLOT + offs_t, mask=t_ok, other=-1).to(tl.int64)  # caches can exceed 2^31 elements
            w_mask = mask & ((slot >= 0) & (slot < n_slots))[:, None, None]
            blk = slot // CACHE_BLOCK
            off = slot % CACHE_BLOCK
            kc_ptrs = _tile_ptrs(KC + off[:, None, None] * stride_kct, blk, stride_kcb, heads, stride_kch, offs_i)
            _rotate_store(x1, x2, c, s, kc_ptrs, w_mask, HALF, ROTATE)
            v_ptrs = _tile_ptrs(V, rows, stride_vn, heads, stride_vh, offs_i)
            v1 = tl.load(v_ptrs, mask=w_mask, other=0.0)
            v2 = tl.load(v_ptrs + HALF, mask=w_mask, other=0.0)
            vc_ptrs = _tile_ptrs(VC + off[:, None, None] * stride_vct, blk, stride_vcb, heads, stride_vch, offs_i)
            _rotate_store(v1, v2, c, s, vc_ptrs, w_mask, HALF, False)
# fmt: on


# ---------------------------------------------------------------------------------- host side --

_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_tables(
    head_dim: int, rope_theta: float | reference.Rope, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """inv_freq [max(D/2, 16)] fp32 (HF's fp32 formula) and cos/sin(j * inv_freq) [2, TAB_ROWS, max(D/2, 16)] fp32.

    The half head dim is padded to at least 16 (tl.dot's minimum); padded columns have frequency 0.
    Built on the device with no host sync, cached per (head_dim, rope, device).
    """
    key = (head_dim, reference.Rope.of(rope_theta), str(device))
    if key not in _tables:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # a cached tensor allocated inside a capture would live in the graph's private pool
            raise RuntimeError(
                f"rotary tables for head_dim={head_dim}, theta={rope_theta} must be built before CUDA-graph "
                "capture: run the step once eagerly first"
            )
        half = head_dim // 2
        inv = reference.rotary_inv_freq(head_dim, rope_theta, torch.float32, device)
        inv_pad = torch.zeros(max(half, 16), dtype=torch.float32, device=device)
        inv_pad[:half] = inv
        ang = torch.arange(TAB_ROWS, dtype=torch.float64, device=device)[:, None] * inv_pad.double()[None, :]
        tab = torch.stack([ang.cos(), ang.sin()]).float().contiguous()
        _tables[key] = (inv_pad, tab)
    return _tables[key]


def check_slots(slot_mapping: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Under the interpreter, raise IndexError for a slot past the cache [num_blocks, block_size, ...] (a host sync,
    free there; the reference path raises likewise). On a GPU the kernels skip such a slot instead: checking would
    sync the host in the decode loop."""
    if INTERPRET and slot_mapping.numel():
        capacity = k_cache.shape[0] * k_cache.shape[1]
        if int(slot_mapping.max()) >= capacity:
            raise IndexError(f"slot {int(slot_mapping.max())} is outside the KV cache's {capacity} slots")


def launch_shape(n: int, hq: int, hkv: int, head_dim: int, num_sms: int | None = None) -> tuple[tuple[int, int], dict]:
    """Grid and tile constexprs for n tokens: up to 8 heads and about 4096 elements of each half per program; with
    `num_sms`, fewer tokens per program while the grid would leave over half the SMs idle (kernels.dispatch.fill_sms:
    a decode step of 8 sequences, 10 programs of 8 tokens on 132 SMs before, now 80 of 1)."""
    block_h = min(8, triton.next_power_of_2(max(hq, hkv)))
    half_pad = triton.next_power_of_2(head_dim // 2)
    block_t = max(1, min(64, 4096 // (block_h * half_pad), triton.next_power_of_2(n)))
    head_blocks = triton.cdiv(hq, block_h) + triton.cdiv(hkv, block_h)
    block_t = fill_sms(block_t, lambda t: triton.cdiv(n, t) * head_blocks, num_sms or 0)
    grid = (triton.cdiv(n, block_t), head_blocks)
    return grid, dict(HALF=head_dim // 2, HALF_PAD=half_pad, BLOCK_T=block_t, BLOCK_H=block_h)


def launch_rotary(
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    *,
    rope_theta: float | reference.Rope = 10000.0,
    rotate: bool = True,
    q: torch.Tensor | None = None,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> None:
    """One launch of the kernel (callers check shapes): k, v [N, Hkv, D]; q, q_out [N, Hq, D]; k_out [N, Hkv, D];
    caches [num_blocks, block_size, Hkv, D] with slot_mapping [N] int (-1: skip). Every tensor's last dim must
    be contiguous; positions [N] int (any stride is made contiguous). Nothing is written for an omitted output."""
    n, hkv, d = k.shape
    if n == 0:
        return
    hq = 0 if q is None else q.shape[1]
    write_cache = k_cache is not None
    positions = positions.contiguous()
    inv_freq = rope_tables(d, rope_theta, k.device)[0] if rotate else k
    grid, tiles = launch_shape(n, hq, hkv, d, sm_count(k.device) if k.is_cuda else None)
    q = k if q is None else q
    q_out = q if q_out is None else q_out
    k_out_ = k if k_out is None else k_out
    kc, vc = (k_cache, v_cache) if write_cache else (k, v)
    slots = slot_mapping.contiguous() if write_cache else positions
    if write_cache:
        check_slots(slots, k_cache)
    cache_strides = (*kc.stride()[:3], *vc.stride()[:3]) if write_cache else (0,) * 6
    # fmt: off
    _rotary_kernel[grid](
        q, q_out, k, k_out_, v, kc, vc, positions, slots, inv_freq, n, kc.shape[0] * kc.shape[1] if write_cache else 0,
        q.stride(0), q.stride(1), q_out.stride(0), q_out.stride(1), k.stride(0), k.stride(1),
        k_out_.stride(0), k_out_.stride(1), v.stride(0), v.stride(1), *cache_strides,
        HQ=hq, HKV=hkv, **tiles, CACHE_BLOCK=kc.shape[1] if write_cache else 1, ROTATE=rotate,
        WRITE_K=k_out is not None, WRITE_CACHE=write_cache, num_warps=4, **pdl_args(k.device),
    )
    # fmt: on
