"""Plain-PyTorch oracles for every kernel.

Tests compare the Triton kernels with these (run in float64), benchmarks time them as "the
reference", and the engine's CPU path runs them. Each function computes in the input's dtype
promoted to at least fp32, and is differentiable through ordinary autograd.

Sections (one per kernel file) keep this file easy to extend without collisions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.dispatch import compute_dtype

# ===================================================================================== rotary ==


def rotary_inv_freq(head_dim: int, rope_theta: float, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[D/2] inverse frequencies, as HF Llama computes them: 1 / theta^(2i/D)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(dtype) / head_dim
    return 1.0 / (rope_theta**exponent)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, rope_theta: float, dtype: torch.dtype):
    """cos, sin of shape [N, D] for integer positions [N] (the "rotate half" layout: halves repeated)."""
    inv_freq = rotary_inv_freq(head_dim, rope_theta, dtype, positions.device)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rope_theta: float = 10000.0) -> torch.Tensor:
    """Rotate x [N, H, D] at positions [N] with the Llama / HF rotate-half convention.

    Computes in at least fp32 and returns x's dtype.
    """
    ct = compute_dtype(x.dtype)
    d = x.shape[-1]
    cos, sin = rotary_cos_sin(positions, d, rope_theta, ct)
    xc = x.to(ct)
    x1, x2 = xc[..., : d // 2], xc[..., d // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    out = xc * cos[:, None, :] + rotated * sin[:, None, :]
    return out.to(x.dtype)


# ========================================================================== rope_attention ==


def varlen_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence; no rotary. q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D].

    GQA: query head h reads key/value head h // (Hq // Hkv). Softmax in at least fp32.
    """
    n, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    ct = compute_dtype(q.dtype)
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].to(ct).transpose(0, 1)  # [Hq, L, D]
        ks = k[start:end].to(ct).transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        vs = v[start:end].to(ct).transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outs.append(o.transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0).to(q.dtype)


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    rope_theta: float = 10000.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Oracle of kernels.rope_attention.rope_attention: rotary on q and k, then varlen causal attention."""
    qr = apply_rotary(q, positions, rope_theta)
    kr = apply_rotary(k, positions, rope_theta)
    return varlen_causal_attention(qr, kr, v, cu_seqlens, softmax_scale)


def rope_attention_cache_write(
    k_rot: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write rotated k and v [N, Hkv, D] into paged caches [num_blocks, block_size, Hkv, D] in place.

    slot_mapping [N] int: slot = block * block_size + offset; tokens with slot -1 are not written.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k_rot[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


# ========================================================================= paged_attention ==


# ================================================================================= logprob ==


# ===================================================================================== gae ==
