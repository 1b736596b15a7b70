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


# ========================================================================= paged_attention ==


# ================================================================================= logprob ==


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *, return_entropy: bool = False, group=None
):
    """Oracle of kernels.logprob.token_logprobs: log_softmax(logits / T) gathered at targets.

    logits [..., V], targets [...] int64 -> log-probs [...] (and entropy [...]) in at least fp32.
    With `group` the logits are this rank's contiguous vocab slice: the full rows are all-gathered
    (differentiably) first, so this is a slow but obviously-correct oracle.
    """
    ct = compute_dtype(logits.dtype)
    z = logits.to(ct) / temperature
    if group is not None:
        # Gather the other ranks' slices without autograd and splice in our own differentiable slice:
        # the outputs are replicated over the group, so each rank's grad is that of its own slice.
        import torch.distributed as dist

        parts = [torch.empty_like(z) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, z.detach().contiguous(), group=group)
        parts[dist.get_rank(group)] = z
        z = torch.cat(parts, dim=-1)
    v = z.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= v):
        raise ValueError(f"targets out of range [0, {v})")
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # p * logp is 0 * -inf = nan on masked (-inf) vocab entries; those contribute 0 (and no nan grad).
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(p))).sum(-1)
    return logp, entropy


def hidden_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    group=None,
):
    """Oracle of kernels.logprob.hidden_logprobs: hidden [N, H] @ weight[V, H].T, then token_logprobs.

    With `group`, weight is this rank's vocab slice and hidden is replicated: its grad is summed over
    the group (as Megatron's copy-to-tensor-parallel-region does before a column-parallel LM head).
    """
    ct = compute_dtype(hidden.dtype)
    if group is not None:
        hidden = _AllReduceGrad.apply(hidden, group)
    logits = hidden.to(ct) @ weight.to(ct).t()
    return token_logprobs(logits, targets, temperature, return_entropy=return_entropy, group=group)


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; all_reduce(SUM) of the gradient in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimators from sampled-token log-probs (Schulman's k1, k2, k3)."""
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(-d) - 1 + d
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def ppo_token_loss(
    logits: torch.Tensor | None,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    temperature: float = 1.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k1",
    entropy_coef: float = 0.0,
    group=None,
):
    """Oracle of kernels.logprob.ppo_token_loss: clipped PPO surrogate, masked mean over tokens.

    loss_t = max(-A r, -A clip(r, 1-eps, 1+eps)) + kl_coef * kl(logp, ref) - entropy_coef * H,
    r = exp(logp - old_logp); loss = sum(loss_t * mask) / max(sum(mask), 1).
    Returns (loss, stats) with stats: ratio, clip_frac, entropy, approx_kl (0.5 (logp-old)^2), kl_ref.
    """
    if logits is None:
        logp, ent = hidden_logprobs(hidden, weight, targets, temperature, return_entropy=True, group=group)
    else:
        logp, ent = token_logprobs(logits, targets, temperature, return_entropy=True, group=group)
    ct = logp.dtype
    m = mask.to(ct)
    denom = m.sum().clamp_min(1.0)
    old = old_logprobs.to(ct)
    adv = advantages.to(ct)
    ratio = torch.exp(logp - old)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_tok = torch.maximum(pg1, pg2) - entropy_coef * ent
    kl_ref = None
    if ref_logprobs is not None:
        kl_ref = kl_estimate(logp, ref_logprobs.to(ct), kl_estimator)
        per_tok = per_tok + kl_coef * kl_ref
    loss = (per_tok * m).sum() / denom
    with torch.no_grad():
        mean = lambda x: (x * m).sum() / denom
        stats = {
            "ratio": mean(ratio),
            "clip_frac": mean((pg2 > pg1).to(ct)),
            "entropy": mean(ent),
            "approx_kl": mean(0.5 * (logp - old) ** 2),
            "kl_ref": mean(kl_ref) if kl_ref is not None else torch.zeros((), dtype=ct, device=logp.device),
        }
    return loss, stats


# ===================================================================================== gae ==
