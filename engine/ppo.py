"""PPO math, no models: KL-shaped rewards, advantages, whitening, the two losses, the LR schedule.

Everything works on response tokens laid out as [B, T] rows with a mask (nonzero = response token)
or, for the losses, on the flat [N] response tokens of a micro-batch. Definitions (RECIPE.md, EasyLM):
    kl_t      = kl_estimate(logp_t, ref_logp_t)          (k1: logp_t - ref_logp_t)
    reward_t  = -kl_coef * kl_t, plus the score at the row's last response token, where the score
                is the RM score, or missing_eos_penalty for a response that hit the length limit
                (kl_coef fixed, or adapted after each rollout: adapt_kl_coef)
    A, R      = GAE(reward, value, gamma, lam)           (kernels.gae.gae)
    A         whitened over each optimizer minibatch     (kernels.gae.masked_whiten, DP group)
    L_policy  = clipped surrogate on raw-logit log-probs (kernels.ppo_loss.ppo_token_loss, fused), less
                entropy_coef x the entropy of the raw logits (0 in the recipe)
    L_value   = 0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2), times value_loss_coef
Losses are token means with an explicit denominator, so micro-batches and data-parallel ranks each
contribute sum(loss_t) / (tokens in the whole minibatch) and their gradients simply add up.
"""

from __future__ import annotations

import math

import torch

from engine import grad_sums
from engine.config import PPOConfig
from kernels.gae import gae, masked_whiten
from kernels.logprob import kl_estimate
from kernels.ppo_loss import ppo_token_loss


def scores_with_eos_penalty(scores: torch.Tensor, hit_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores [B] (RM output) -> [B] fp32, replaced by `penalty` where hit_eos [B] (bool) is False."""
    return torch.where(hit_eos.bool(), scores.float(), torch.full_like(scores, penalty, dtype=torch.float32))


def last_response_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last nonzero mask entry: mask [B, T] -> [B] int64 (0 for an empty row)."""
    cols = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask != 0, cols, -1).amax(1).clamp_min(0)


def shaped_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * kl_t on response tokens, plus scores [B] at each row's last one.

    logprobs, ref_logprobs, mask: [B, T]; scores: [B] (already EOS-penalised). Returns (rewards, kl),
    both [B, T] fp32 and 0 outside the mask.
    """
    m = mask != 0
    kl = torch.where(m, kl_estimate(logprobs.float(), ref_logprobs.float(), kl_estimator), 0.0)
    rewards = -kl_coef * kl
    last = last_response_index(mask).unsqueeze(1)
    rewards = rewards.scatter_add(1, last, scores.float().unsqueeze(1) * m.any(1, keepdim=True))
    return rewards, kl


def advantages_and_returns(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    cfg: PPOConfig,
    group=None,
    kl_coef: float | None = None,
) -> dict[str, torch.Tensor]:
    """From one rollout's [B, T] log-probs, reference log-probs, values and mask and its [B] scores:
    rewards, kl, advantages and returns, all [B, T] fp32 (0 outside the mask); the KL penalty's coefficient is
    `kl_coef` (the run's adaptive one), else cfg.kl_coef. Advantages are not
    whitened here (that is per optimizer minibatch, `minibatch_advantages`). With cfg.whiten_rewards the rewards are
    whitened over the whole rollout: every rank's rows of it with the data-parallel `group`, so the ranks of a DP run
    whiten as one process would.
    """
    rewards, kl = shaped_rewards(
        logprobs, ref_logprobs, mask, scores, kl_coef=cfg.kl_coef if kl_coef is None else kl_coef,
        kl_estimator=cfg.kl_estimator,
    )  # fmt: skip
    if cfg.whiten_rewards:  # off in the recipe; TRL's variant keeps the mean
        rewards = masked_whiten(rewards, mask, shift_mean=False, group=group, eps=cfg.whiten_eps)
    advantages, returns = gae(rewards, values.float(), mask, cfg.gamma, cfg.lam)
    return {"rewards": rewards, "kl": kl, "advantages": advantages, "returns": returns}


def minibatch_advantages(
    advantages: torch.Tensor, mask: torch.Tensor, cfg: PPOConfig, group=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the advantages one optimizer step trains on: whitened over the minibatch's tokens on every DP rank; the number
    of those tokens over every rank, float64 0-d, which the whitening's collective counts anyway, or None when the
    advantages are not whitened)."""
    if not cfg.whiten_advantages:
        return advantages, None
    return masked_whiten(advantages, mask, shift_mean=True, group=group, eps=cfg.whiten_eps, return_count=True)


def policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float,
    denom: float | torch.Tensor,
    group=None,
    entropy_coef: float = 0.0,
    real_vocab: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO policy loss of N response tokens, LM head fused (no [N, V] logits in memory), less entropy_coef x
    each token's entropy (the entropy bonus; 0 in the recipe).

    hidden [N, H]: the final hidden state that predicts each response token; weight [V, H] the LM head
    (this rank's vocab shard with `group`, its rows from `real_vocab` on padding: the model's real_vocab);
    targets, old_logprobs, advantages [N]. Log-probs use the raw logits (temperature 1, RECIPE.md). Returns
    sum_t loss_t / denom (denom = tokens of the whole minibatch, across micro-batches and DP ranks) and the stats of
    kernels.ppo_loss.ppo_token_loss as sums over these N tokens (divide by the token count to get means). Inside
    engine.grad_sums.into_sums the LM head's grad goes straight into the optimizer's fp32 sum during the forward:
    backpropagate the loss as it is (loss.backward()).
    """
    n = targets.shape[0]
    mask = torch.ones(n, dtype=torch.float32, device=targets.device)
    loss, stats = ppo_token_loss(
        None, targets, old_logprobs, advantages, mask, hidden=hidden, weight=weight, clip_eps=clip_eps,
        temperature=1.0, entropy_coef=entropy_coef, group=group, real_vocab=real_vocab, loss_scale=n / denom,
        weight_grad_into=grad_sums.target(weight),
    )  # fmt: skip
    return loss, {k: v * n for k, v in stats.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    clip_value: float,
    denom: float | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss of N response tokens: sum_t 0.5 max((v-R)^2, (clip(v, v_old +- c) - R)^2) / denom.

    values [N] (differentiable), old_values [N] (the rollout's), returns [N]. The value_loss_coef is
    applied by the caller. Stats are sums over the N tokens: "clip_frac" (the clipped term is larger),
    "value" (v), "error" ((v - R)^2).
    """
    v = values.float()
    old, ret = old_values.float(), returns.float()
    v_clipped = old + (v - old).clamp(-clip_value, clip_value)
    loss1 = (v - ret).square()
    loss2 = (v_clipped - ret).square()
    loss = 0.5 * torch.maximum(loss1, loss2).sum() / denom
    with torch.no_grad():
        stats = {"clip_frac": (loss2 > loss1).float().sum(), "value": v.sum(), "error": loss1.sum()}
    return loss, stats


def adapt_kl_coef(kl_coef: float, kl: float, sequences: float, cfg: PPOConfig) -> float:
    """The KL coefficient of the next rollout, from this one's (Ziegler et al. 2019, "Fine-Tuning Language Models from
    Human Preferences", as TRL's AdaptiveKLController): the proportional error clip(kl / kl_target - 1, -0.2, 0.2)
    moves it by error * sequences / kl_horizon of itself, so it grows while the policy drifts past the target and
    shrinks while it stays under. kl: the rollout's mean over responses of the KL estimate summed over each response;
    sequences: the rollout's responses (over every data-parallel rank). cfg.kl_target 0: kl_coef unchanged."""
    if not cfg.kl_target:
        return kl_coef
    if not math.isfinite(kl):
        raise FloatingPointError(
            f"the rollout's KL to the reference is {kl}: the adaptive KL coefficient cannot follow it"
        )
    error = min(max(kl / cfg.kl_target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * sequences / cfg.kl_horizon)


def lr_at(step: int, total_steps: int, cfg: PPOConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total_steps`.

    "linear": warmup from 0 over ceil(warmup_ratio * total) steps, then linear decay to 0 at total_steps
    (HF get_linear_schedule_with_warmup, optax's warmup + linear schedule: step 0 has lr 0 when there is
    a warmup). "constant": constant after the same warmup.
    """
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.learning_rate * step / warmup
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if cfg.lr_schedule != "linear":
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; expected 'linear' or 'constant'")
    return cfg.learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - warmup))
