"""A PPO iteration as the peers run it without an inference engine: bench/ppo_step.py's peer.

What TRL's PPOTrainer (and OpenRLHF or DeepSpeed-Chat without vLLM) does on one GPU, written out on transformers'
models: the policy generates with transformers' `generate` (sampled at the rollout's temperature and top-k, every
response the full length, as ppo_step's --ignore-eos); the four models' eager forwards score the sequences
(log_softmax over the vocabulary and a gather for the policy's and the reference's log-probs, the value and reward
models' `score` head on the last hidden states: TRL's get_reward); per-token KL rewards with the score on the last
token, GAE in a Python loop over the tokens, advantages whitened; then each minibatch's clipped policy loss and clipped
value loss by autograd, in micro-batches, each model stepped by torch's AdamW after a grad-norm clip. The trained
models hold fp32 weights and run under bf16 autocast on a GPU (accelerate's mixed precision, what TRL's `bf16=True`
gives); the frozen reference and reward models are bf16. Random weights (timing only: ppo_step's four models are
random too).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench.common import sync
from engine.config import ModelConfig, PPOConfig
from kernels.reference import peer_gae_loop


def build(mc: ModelConfig, device: torch.device, train_dtype: torch.dtype, frozen_dtype: torch.dtype) -> dict:
    """The peer's four models (transformers' Llama classes of ppo_step's shape, random weights) and two AdamW."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    models = {}
    for name, cls, head, dtype in (("policy", LlamaForCausalLM, "lm", train_dtype),
                                   ("ref", LlamaForCausalLM, "lm", frozen_dtype),
                                   ("value", LlamaForSequenceClassification, "score", train_dtype),
                                   ("reward", LlamaForSequenceClassification, "score", frozen_dtype)):  # fmt: skip
        cfg = LlamaConfig(**{k: v for k, v in mc.to_hf(head).items() if k != "architectures"})
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                models[name] = cls(cfg)
        finally:
            torch.set_default_dtype(default)
        models[name].train(name in ("policy", "value")).requires_grad_(name in ("policy", "value"))
    return models


def _autocast(device: torch.device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def _logprobs(model, seq: torch.Tensor, prompt_len: int, temperature: float) -> torch.Tensor:
    """The log-probs of the response tokens [B, N] at the temperature, TRL's way: the logits whole, divided by the
    temperature, log_softmax over the vocabulary, a gather."""
    logits = model(seq).logits[:, prompt_len - 1 : -1].float() / temperature
    return torch.gather(F.log_softmax(logits, -1), 2, seq[:, prompt_len:, None]).squeeze(-1)


def _values(model, seq: torch.Tensor) -> torch.Tensor:
    """Per-token scalars [B, T] of a score model: its head over the last hidden states (TRL's get_reward)."""
    return model.score(model.model(seq).last_hidden_state).squeeze(-1).float()


def _clip_step(model, opt, max_norm: float) -> torch.Tensor:
    """Clip the model's grad norm, step its optimizer: the norm (a device tensor: read once, at the iteration's end)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.detach()


def iteration(models: dict, opts: dict, prompts: torch.Tensor, cfg: PPOConfig, micro_batch: int) -> dict:
    """One PPO iteration over `prompts` [B, P] (ids on the device; each prompt's samples_per_prompt responses drawn
    at once, as a batch of the prompt repeated): each phase's seconds, the response tokens, the last minibatch's
    losses; ppo_epochs passes over the rollout, each in a new order."""
    policy, ref, value, reward = (models[k] for k in ("policy", "ref", "value", "reward"))
    prompts = prompts.repeat_interleave(cfg.samples_per_prompt, 0)
    device, p_len, n_new = prompts.device, prompts.shape[1], cfg.max_new_tokens
    times = {}
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), _autocast(device):
        seq = policy.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=cfg.temperature,
            top_k=cfg.top_k, top_p=cfg.top_p, max_new_tokens=n_new, min_new_tokens=n_new,
            pad_token_id=0,
        )  # fmt: skip
    sync(device)
    times["generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad(), _autocast(device):
        old_lp = _logprobs(policy, seq, p_len, cfg.temperature)
        ref_lp = _logprobs(ref, seq, p_len, cfg.temperature)
        old_v = _values(value, seq)[:, p_len - 1 : -1]
        score = _values(reward, seq)[:, -1]
    kl = old_lp - ref_lp
    rewards = -cfg.kl_coef * kl
    rewards[:, -1] += score
    adv, returns = peer_gae_loop(rewards, old_v, cfg.gamma, cfg.lam)  # (the peers' loop over the tokens)
    sync(device)
    times["score"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = seq.shape[0]
    losses = {}
    minibatches = [(order, start) for order in (torch.randperm(b, device=device) for _ in range(cfg.ppo_epochs))
                   for start in range(0, b, cfg.train_batch_size)]  # fmt: skip
    for order, start in minibatches:
        rows = order[start : start + cfg.train_batch_size]
        a = adv[rows]
        a = (a - a.mean()) / (a.std() + 1e-8)  # (whitened per minibatch)
        n_tok = a.numel()
        for first in range(0, len(rows), micro_batch):
            mb = slice(first, first + micro_batch)
            s = seq[rows[mb]]
            with _autocast(device):
                lp = _logprobs(policy, s, p_len, cfg.temperature)
            ratio = torch.exp(lp - old_lp[rows[mb]])
            pg = torch.max(-a[mb] * ratio, -a[mb] * ratio.clamp(1 - cfg.clip_ratio, 1 + cfg.clip_ratio))
            (pg.sum() / n_tok).backward()
            with _autocast(device):
                v = _values(value, s)[:, p_len - 1 : -1]
            v_old, ret = old_v[rows[mb]], returns[rows[mb]]
            clipped = v_old + (v - v_old).clamp(-cfg.clip_value, cfg.clip_value)
            vf = 0.5 * torch.max((v - ret) ** 2, (clipped - ret) ** 2)
            (cfg.value_loss_coef * vf.sum() / n_tok).backward()
            losses = {"policy_loss": pg.detach().mean(), "value_loss": vf.detach().mean()}  # (read at the end)
        losses["grad_norm_policy"] = _clip_step(policy, opts["policy"], cfg.max_grad_norm)
        losses["grad_norm_value"] = _clip_step(value, opts["value"], cfg.max_grad_norm)
    sync(device)
    times["train"] = time.perf_counter() - t0
    times["iteration"] = sum(times.values())
    losses = {k: float(v) for k, v in losses.items()}
    return {"seconds": times, "response_tokens": int(seq.shape[0] * (seq.shape[1] - p_len)), **losses}


def optimizers(models: dict, cfg: PPOConfig) -> dict:
    """torch's AdamW over the trained models' fp32 weights (fused on a GPU), the recipe's settings."""
    fused = next(models["policy"].parameters()).is_cuda
    return {k: torch.optim.AdamW(models[k].parameters(), lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay, fused=fused or None)
            for k in ("policy", "value")}  # fmt: skip
