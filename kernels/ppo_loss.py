"""The clipped PPO policy loss fused with the log-prob / entropy kernel (kernels/logprob.py), from logits or from
hidden states.

ppo_token_loss(logits, ...) is the masked mean of per-token PPO terms over token_logprobs' log-probs and entropy.
ppo_token_loss(hidden=..., weight=...) fuses the LM head as hidden_logprobs does, and knows its gradient during the
forward (the loss is a scalar of per-token terms), so it writes the grads of hidden and weight in the forward,
Liger-style: 3 GEMMs in all (hidden_logprobs takes 4), one [C, V] logits chunk of extra memory, and its backward only
scales them. Cost model (H100, bf16, N = 8192, H = 5120, V = 32000): each GEMM is 2.7 TFLOP, an 11.1 ms floor at
724 TFLOP/s. Vocab parallel (`group`) as kernels/logprob.py: the grad of hidden is summed over the group, the grad of
weight is this rank's slice.
"""

from __future__ import annotations

import contextlib

import torch

from kernels import dispatch, logprob, reference

_GRAD_OF_ONE = (
    "ppo_token_loss(weight_grad_into=...): the loss must be backpropagated as it is (a grad of 1), its weight's grad "
    "having gone into the sum during the forward; scale it with loss_scale instead"
)

# ---------------------------------------------------------------------------- autograd functions


class _FusedHiddenLoss(torch.autograd.Function):
    """Scalar loss = scale x the sum over chunks of token_loss(logp, entropy, r0, r1); grads computed in the forward
    (scale folded into the grad logits before their one rounding). `into`: the weight's grad is added to this fp32
    sum of the weight's shape as the forward makes it (no [V, H] buffer), and the backward must bring grad 1."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, group, rows, token_loss, real_vocab, scale, into, grad):
        n, v = hidden.shape[0], weight.shape[0]
        v_start, _ = logprob._group_info(group, v)
        # (grad: the caller's grad mode; needs_input_grad holds under no_grad and inference_mode too, where no grad may
        # be taken nor added to `into`)
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        gh = torch.empty_like(hidden) if need_h else None
        if need_w and into is not None:
            gw = into  # (the caller's fp32 sum: every chunk adds to it)
        else:  # (fp32 kept until the backward scales it)
            gw = logprob._weight_grad(weight, n, rows) if need_w else None
        logp, ent = (hidden.new_empty(n, dtype=torch.float32) for _ in range(2))
        total = hidden.new_zeros((), dtype=torch.float32)
        for i, r0 in enumerate(range(0, n, rows)):
            r1 = min(n, r0 + rows)
            # the only logits GEMM: becomes grad_logits
            lg = logprob._mask_padding(hidden[r0:r1] @ weight.t(), real_vocab)
            norm_c, logp_c, ent_c = logprob.logprob_forward(lg.unsqueeze(0), targets[r0:r1], temperature, True, group)
            logp[r0:r1], ent[r0:r1] = logp_c, ent_c
            with torch.enable_grad() if need_h or need_w else contextlib.nullcontext():
                lp = logp_c.detach().requires_grad_(need_h or need_w)
                en = ent_c.detach().requires_grad_(need_h or need_w)
                loss_c = token_loss(lp, en, r0, r1)
                if scale is not None:  # (in fp32, before the grad logits are rounded to the inputs' dtype)
                    loss_c = loss_c * scale
            total += loss_c.detach()
            if need_h or need_w:
                # An unused entropy (entropy_coef = 0) gives None: the backward kernel then skips its term.
                glp, gent = torch.autograd.grad(loss_c, (lp, en), allow_unused=True)
                logprob._hidden_grad_chunk(
                    lg, hidden[r0:r1], weight, targets[r0:r1], norm_c, ent_c, glp, gent, temperature, v_start,
                    gh[r0:r1] if need_h else None, gw, i == 0 and gw is not into, real_vocab,
                )  # fmt: skip
        if gw is not None and n == 0 and gw is not into:
            gw.zero_()
        if gh is not None:
            logprob._all_reduce_(gh, group)
        ctx.into = gw is not None and gw is into
        ctx.save_for_backward(gh, None if ctx.into else gw)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(logp, ent)
        return total, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if getattr(ctx, "used", False):
            raise RuntimeError(
                "ppo_token_loss(hidden=...) supports one backward per forward (grads are scaled in place)"
            )
        ctx.used = True
        gh, gw = ctx.saved_tensors
        if ctx.into:  # (the weight's grad is in its sum already, for a grad of 1: a device-side check, no sync)
            torch._assert_async(grad_loss == 1.0, _GRAD_OF_ONE)
        # Scale in place (a [V, H] copy of the weight grad would cost as much as the logits chunk), by the fp32 scale:
        # rounded to bf16 first it would be off by up to 0.4% for every grad of the micro-batch (0.3 -> 0.30078)
        for g in (gh, gw):
            if g is not None:
                logprob._scale_(g, grad_loss.float())
        return gh, None if gw is None else gw.to(ctx.weight_dtype), *(None,) * 9


class _GradsTaken(torch.autograd.Function):
    """The reference path's loss under weight_grad_into: its grads taken in the forward (the weight's already in the
    sum); the backward hands hidden its grad, for a grad of 1 as the kernel path checks."""

    @staticmethod
    def forward(ctx, hidden, loss, grad_hidden):
        ctx.save_for_backward(grad_hidden)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        torch._assert_async(grad_loss == 1.0, _GRAD_OF_ONE)
        (gh,) = ctx.saved_tensors
        return gh, None, None


# ------------------------------------------------------------------------------ public functions


def _ppo_per_token(logp, ent, old, adv, ref, clip_eps, kl_coef, kl_estimator, entropy_coef):
    """Elementwise PPO terms: (per-token loss, ratio, unclipped loss, clipped loss, kl to ref or None)."""
    ratio = reference.ppo_ratio(logp, old, adv)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_tok = torch.maximum(pg1, pg2)
    if entropy_coef:
        per_tok = per_tok - entropy_coef * ent
    kl = None
    if ref is not None:
        kl = logprob.kl_estimate(logp, ref, kl_estimator)
        if kl_coef:
            per_tok = per_tok + kl_coef * kl
    return per_tok, ratio, pg1, pg2, kl


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
    real_vocab: int | None = None,
    loss_scale: float | torch.Tensor | None = None,
    weight_grad_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO policy loss, fused with the log-prob / entropy kernel; masked mean over tokens (kl_estimate:
    kernels.logprob's).

    Either logits [..., V] (targets, old_logprobs, advantages, mask, ref_logprobs all [...]) or
    logits=None with hidden [N, H] and weight [V, H] (the LM head fused; those tensors are [N]; real_vocab as
    hidden_logprobs').
        ratio = exp(logp - old_logp)
        loss_t = max(-A ratio, -A clip(ratio, 1 - clip_eps, 1 + clip_eps))
                 + kl_coef * kl_estimate(logp, ref_logprobs, kl_estimator) - entropy_coef * entropy
        loss = sum(loss_t * mask) / max(sum(mask), 1)
    Returns (loss fp32 scalar, stats) with detached masked means: "ratio", "clip_frac" (fraction of
    tokens where the clipped term is the larger), "entropy", "approx_kl" (0.5 (logp - old)^2) and
    "kl_ref" (the chosen estimator, 0 without ref_logprobs). With hidden/weight the grads of hidden and
    weight are computed during the forward (3 GEMMs, one [chunk, V] logits buffer) and backward scales them.

    loss_scale: the loss returned is loss x loss_scale (a micro-batch's share of a larger mean; the stats are not
    scaled), folded into the grads before they are rounded. weight_grad_into (hidden/weight on the kernel path): an
    fp32 tensor of the weight's shape (an optimizer's sum of its grads over micro-batches) that the weight's grad is
    added to during the forward, on a GPU by one GEMM a chunk straight into it: no [V, H] grad of the weight is ever
    made, and none reaches weight.grad; the loss must then be backpropagated as it is (loss.backward(): a grad of 1,
    checked on the device), any scale going through loss_scale. On the reference ops the same: both grads taken by
    autograd in the forward, hidden's handed back by the backward.
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; expected 'k1', 'k2' or 'k3'")
    if logits is None and (hidden is None or weight is None):
        raise ValueError("ppo_token_loss needs either logits or both hidden and weight")
    if logits is not None and (hidden is not None or weight is not None):
        raise ValueError("ppo_token_loss takes logits or hidden/weight, not both")
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        if t.shape != targets.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal targets shape {tuple(targets.shape)}")
    if ref_logprobs is not None and ref_logprobs.shape != targets.shape:
        raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} must equal targets shape")
    if weight_grad_into is not None and (
        logits is not None or weight_grad_into.shape != weight.shape or weight_grad_into.dtype != torch.float32
        or weight_grad_into.device != weight.device
    ):  # fmt: skip
        raise ValueError(
            "weight_grad_into must be an fp32 tensor of the weight's shape on its device, with hidden/weight; got "
            f"{weight_grad_into.dtype} {tuple(weight_grad_into.shape)} on {weight_grad_into.device}"
        )
    if logits is None:
        logprob._check_hidden(hidden, weight, targets)
        logprob._check_real_vocab(real_vocab, weight)
    elif real_vocab is not None:
        raise ValueError("real_vocab goes with hidden/weight (padded logits already hold -inf)")
    logprob._check_temperature(temperature)  # (before the dispatch: the reference path would take 0 or inf silently)
    group = logprob._tp_group(group)
    src = logits if logits is not None else hidden
    if not dispatch.use_triton(src) or src.dtype not in logprob._SUPPORTED:
        into = weight_grad_into is not None and weight.requires_grad and torch.is_grad_enabled()
        # (into: both grads taken here, as the kernel path does, from leaves standing for hidden and the weight; the
        # caller's backward then only scales hidden's: the LM head's grad GEMM runs once, and the [N, V] graph is
        # freed before the forward returns)
        h = hidden.detach().requires_grad_(hidden.requires_grad) if into else hidden
        w = weight.detach().requires_grad_() if into else weight
        loss, stats = reference.ppo_token_loss(
            logits, targets, old_logprobs, advantages, mask, hidden=h, weight=w, clip_eps=clip_eps,
            temperature=temperature, ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator,
            entropy_coef=entropy_coef, group=group, real_vocab=real_vocab,
        )  # fmt: skip
        loss = loss if loss_scale is None else loss * loss_scale
        if into:
            grads = torch.autograd.grad(loss, (w, h) if h.requires_grad else (w,))
            weight_grad_into.add_(grads[0])
            # (a frozen hidden: the loss hangs on the weight, so that the documented loss.backward() still runs)
            loss = _GradsTaken.apply(
                hidden if h.requires_grad else weight, loss.detach(), grads[1] if h.requires_grad else None
            )
        return loss, stats
    m = mask.to(torch.float32)
    denom = m.sum().clamp_min(1.0)
    keep = mask.bool()  # (off the mask: whatever old, advantages and ref hold there, NaN or a huge value, is not read)
    old, adv = torch.where(keep, old_logprobs.float(), 0.0), torch.where(keep, advantages.float(), 0.0)
    ref = torch.where(keep, ref_logprobs.float(), 0.0) if ref_logprobs is not None else None
    terms = (clip_eps, kl_coef, kl_estimator, entropy_coef)
    if logits is not None:
        logp, ent = logprob.token_logprobs(logits, targets, temperature, return_entropy=True, group=group)
        # (off the mask the token's own log-prob is 0 too: one of -300 would give k3 an inf, and its grad 0 * inf)
        per_tok = _ppo_per_token(torch.where(keep, logp, 0.0), ent, old, adv, ref, *terms)[0]
        loss = torch.where(keep, per_tok * m, 0.0).sum() / denom
        loss = loss if loss_scale is None else loss * loss_scale
    else:
        _, v_total = logprob._group_info(group, weight.shape[0])
        logprob._check_targets(targets, v_total)
        hidden, weight = hidden.contiguous(), weight.contiguous()
        rows = logprob._chunk_rows(hidden.shape[0], weight.shape[0], weight.element_size())

        def token_loss(lp, en, r0, r1):  # this chunk's share of the masked mean
            r_c = ref[r0:r1] if ref is not None else None
            per = _ppo_per_token(torch.where(keep[r0:r1], lp, 0.0), en, old[r0:r1], adv[r0:r1], r_c, *terms)[0]
            return torch.where(keep[r0:r1], per * m[r0:r1], 0.0).sum() / denom

        t = targets.to(torch.int64).contiguous()
        loss, logp, ent = _FusedHiddenLoss.apply(
            hidden,
            weight,
            t,
            float(temperature),
            group,
            rows,
            token_loss,
            real_vocab,
            loss_scale,
            weight_grad_into,
            torch.is_grad_enabled(),
        )
    with torch.no_grad():
        _, ratio, pg1, pg2, kl = _ppo_per_token(logp.detach(), ent.detach(), old, adv, ref, *terms)
        mean = lambda x: torch.where(keep, x * m, 0.0).sum() / denom
        stats = {
            "ratio": mean(ratio),
            "clip_frac": mean((pg2 > pg1).float()),
            "entropy": mean(ent.detach()),
            "approx_kl": mean(0.5 * (logp.detach() - old).square()),
            "kl_ref": mean(kl) if kl is not None else denom.new_zeros(()),
        }
    return loss, stats
