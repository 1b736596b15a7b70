"""One PPO iteration of the engine against PPO written out from RECIPE.md alone, in float64, on transformers' models.

The oracle below shares no code with the engine: transformers' LlamaForCausalLM / LlamaForSequenceClassification
(float64, eager attention, one unpadded sequence at a time), the recipe's definitions written as loops (k1 KL
penalty per token, the RM score or the missing-EOS penalty at the last response token, GAE backwards over each
response, advantages whitened over each minibatch as EasyLM's whiten() (unbiased variance), the clipped surrogate on
raw-logit log-probs, the clipped value loss times its coefficient, token means over the minibatch), torch's Adam with
transformers' warmup schedule (constant after the warmup: EasyLM's end_lr = the peak; linear decay in a variant) and
torch's grad-norm clip, one optimizer per model.

Where RECIPE.md leaves a choice open the oracle makes the engine's documented one: losses are token means over the
whole minibatch (micro-batches and ranks contribute sum / minibatch tokens); one PPO epoch takes the rollout's
sequences in order, train_batch_size at a time; whitening is EasyLM's (unbiased variance, eps 1e-6 under the root);
warmup steps are ceil(ratio x steps) as in HF Trainer.

The engine runs its own iteration on the tiny default (fp32) against a reference checkpoint near the policy (the policy
itself would make every KL term 0), with its rollout captured (and one response replaced by a lone EOS: the shortest
response there is, and the last one's EOS dropped if it had one: both kinds of response, whatever was sampled).
Compared: the scoring pass (old and reference log-probs, values, RM scores), rewards, advantages and returns token by
token; each reported loss, grad norm and per-token statistic (a
loss scaled by mistake changes no Adam update but changes these); and every weight of both trained models after the
iteration's four optimizer steps, as the update the step made (after - before; where Adam's RMS came near its eps,
so that rounding sways the update, with a looser bound: assert_update_close). Each of these changes to the engine
fails it: biased variance in the whitening, the KL penalty's sign, the value loss coefficient, the warmup's rounding,
the EOS penalty's condition, the value clip dropped or doubled, gamma in GAE's lambda term, the clip fraction's
comparison, a loss metric scaled by 1e-4, a micro-batch's loss divided by its own tokens, the LR decaying after the
warmup, the grad-norm clip applied to norms under the limit, every response marked as ended by EOS, the Triton GAE
kernel's gamma * lambda off by 1e-3, the KL per token or the generator's log-prob gap averaged over
sequences instead of tokens.

The engine's options beyond the recipe run against the same oracle in two more iterations (reference ops): "epochs"
(two PPO epochs, the second in a fresh order of the rollout's sequences; two samples per prompt; the k3 estimator;
rewards whitened over the rollout with their mean kept, TRL's variant; advantages not whitened; no grad-norm clip; the
LR decaying linearly to 0 after the warmup) and "easylm" (EasyLM's trainer: each minibatch scored again by the models
as its step finds them, the old log-probs (so every ratio is 1), the values (so the value clip never binds) and from
them the KL-shaped rewards, whitened over the minibatch here, the advantages and returns; the k2 estimator; AdamW's
decoupled weight decay; an entropy bonus). Where the recipe
leaves the order of a later epoch open, the oracle takes the engine's and checks that it is a permutation of the
rollout. Each of these changes to the engine fails one of them: k3's log term halved, k2 without its 1/2, whitened
rewards without their mean, advantages whitened when asked not to, a grad clip of 1 when asked for none, the linear
schedule not decaying, the quirk ignored (or its values and targets left the rollout's), the weight decay dropped or
coupled (Adam's L2), a later epoch's ratio taken against the sampler's log-probs, the entropy bonus dropped or its sign
flipped.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import pytest
import torch
from transformers import (
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    get_constant_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from engine import state as state_mod
from engine import trainer
from engine.checkpoint import save_pretrained
from engine.data import Rollout
from engine.tokenizer import TINY_PROMPTS
from engine.train_ppo import parse_args, prepare_tiny
from kernels import dispatch, gae, rmsnorm, rope_attention, swiglu

F64 = torch.float64
# Beside the recipe's hyperparameters, sizes for the tiny models (and a few to take every branch in four steps: a
# micro-batch of one sequence, so two per optimizer step; a warmup of two of the schedule's 96 steps, so the four
# steps warm up and then hold the peak; a grad-norm clip some steps exceed and some do not)
FLAGS = ["--rollout-batch-size", "8", "--train-batch-size", "2", "--max-new-tokens", "12", "--learning-rate", "3e-3",
         "--micro-batch-tokens", "30", "--warmup-ratio", "0.02", "--max-grad-norm", "5.0"]  # fmt: skip
# the options beyond the recipe (the later flag of a pair wins): see the module's docstring; the epochs variant's
# warmup ratio makes four of its 384 steps warm up, so its eight steps take both halves of the linear schedule
VARIANTS = {
    "recipe": [],
    "epochs": ["--ppo-epochs", "2", "--samples-per-prompt", "2", "--rollout-batch-size", "4", "--kl-estimator", "k3",
               "--whiten-rewards", "--no-whiten-advantages", "--max-grad-norm", "0", "--lr-schedule", "linear",
               "--warmup-ratio", "0.01"],
    "easylm": ["--recompute-old-logprobs-per-minibatch", "--kl-estimator", "k2", "--weight-decay", "0.5",
               "--whiten-rewards", "--clip-value", "0.05",  # (a value clip not the policy's: each where it belongs)
               "--entropy-coef", "0.05"],
}  # fmt: skip


# ------------------------------------------------------------------------------------------------- the oracle --


def _load(path, cls):
    return cls.from_pretrained(path, torch_dtype=F64, attn_implementation="eager")


def _logprobs(model, ids, p):
    """log pi(response token j | its prefix) for the tokens after the prompt's p, raw logits."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits[p - 1 : len(ids) - 1], dim=-1)
    return logp, logp.gather(1, torch.tensor(ids[p:])[:, None])[:, 0]


def _values(model, ids, p):
    """The scalar head at every state that emits a response token (the prefix ending just before it)."""
    h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return model.score(h)[p - 1 : len(ids) - 1, 0]


class RecipeOracle:
    """PPO of RECIPE.md over one rollout, step by step."""

    def __init__(self, policy_dir, reference_dir, reward_dir, cfg, total_steps):
        self.cfg = cfg
        self.policy, self.ref = _load(policy_dir, LlamaForCausalLM), _load(reference_dir, LlamaForCausalLM)
        self.value, self.rm = (
            _load(reward_dir, LlamaForSequenceClassification),
            _load(reward_dir, LlamaForSequenceClassification),
        )
        self.opts, self.scheds, self.lrs = {}, {}, []
        warmup = math.ceil(cfg.warmup_ratio * total_steps)  # (HF Trainer's warmup steps from a ratio)
        for name, model in (("policy", self.policy), ("value", self.value)):
            opt = torch.optim.AdamW(  # (Adam with decoupled weight decay; the recipe's decay is 0: plain Adam)
                model.parameters(), lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                weight_decay=cfg.weight_decay,
            )  # fmt: skip
            if cfg.lr_schedule == "linear":
                sched = get_linear_schedule_with_warmup(opt, warmup, total_steps)
            else:
                assert cfg.lr_schedule == "constant", cfg.lr_schedule
                sched = get_constant_schedule_with_warmup(opt, warmup)
            self.opts[name], self.scheds[name] = opt, sched
        # {model: {weight: its elements whose Adam RMS (bias-corrected sqrt of v) came within 100 eps at a step}}
        self.near_eps = {"policy": {}, "value": {}}

    @torch.no_grad()
    def score(self, prompts, responses, hit_eos):
        """Per sequence: old log-probs, reference log-probs, values, the RM score; KL, rewards, advantages, returns."""
        out = []
        for prompt, resp, eos in zip(prompts, responses, hit_eos):
            ids, p = prompt + resp, len(prompt)
            old, ref = _logprobs(self.policy, ids, p)[1], _logprobs(self.ref, ids, p)[1]
            score = self.rm(input_ids=torch.tensor([ids])).logits[0, 0]  # transformers' pooling: the last token
            out.append(dict(logprobs=old, ref_logprobs=ref, values=_values(self.value, ids, p), score=score, eos=eos))
        return self.targets(out)

    @torch.no_grad()
    def rescore(self, prompts, responses, scored):
        """EasyLM (--recompute-old-logprobs-per-minibatch): a minibatch's old log-probs and values from the models as
        this step finds them, and its rewards, advantages and returns from those (the reference and the RM: frozen)."""
        out = []
        for prompt, resp, s in zip(prompts, responses, scored):
            ids, p = prompt + resp, len(prompt)
            out.append(dict(s, logprobs=_logprobs(self.policy, ids, p)[1], values=_values(self.value, ids, p)))
        return self.targets(out)

    def targets(self, out):
        """KL, KL-shaped rewards (whitened over these sequences with whiten_rewards), GAE's advantages and returns."""
        cfg = self.cfg
        for s in out:
            log_ratio = s["logprobs"] - s["ref_logprobs"]  # log pi / ref of the sampled token; Schulman's estimators:
            kl = {"k1": log_ratio, "k2": 0.5 * log_ratio**2, "k3": torch.exp(-log_ratio) - 1 + log_ratio}
            s["kl"] = kl = kl[cfg.kl_estimator]
            rewards = [-cfg.kl_coef * kl[j] for j in range(len(kl))]
            rewards[-1] = rewards[-1] + (s["score"] if s["eos"] else cfg.missing_eos_penalty)
            s["rewards"] = torch.stack(rewards)
        if cfg.whiten_rewards:  # over the rollout's response tokens, unbiased variance, the mean kept (TRL)
            flat = torch.cat([s["rewards"] for s in out])
            mean, std = flat.mean(), torch.sqrt(flat.var(unbiased=True) + cfg.whiten_eps)
            for s in out:
                s["rewards"] = (s["rewards"] - mean) / std + mean
        for s in out:
            rewards, values, n = s["rewards"], s["values"], len(s["rewards"])
            adv, last = [0.0] * n, 0.0
            for j in reversed(range(n)):
                next_value = values[j + 1] if j + 1 < n else 0.0
                delta = rewards[j] + cfg.gamma * next_value - values[j]
                last = delta + cfg.gamma * cfg.lam * last
                adv[j] = last
            s["advantages"] = torch.stack([torch.as_tensor(a, dtype=F64) for a in adv])
            s["returns"] = s["advantages"] + values
        return out

    def step(self, prompts, responses, scored):
        """One optimizer step of each model on a minibatch; returns its losses, grad norms and token stats."""
        cfg = self.cfg
        if cfg.recompute_old_logprobs_per_minibatch:  # EasyLM: the minibatch scored as this step finds the models
            scored = self.rescore(prompts, responses, scored)
        adv = torch.cat([s["advantages"] for s in scored])
        if cfg.whiten_advantages:  # over the minibatch
            adv = (adv - adv.mean()) / torch.sqrt(adv.var(unbiased=True) + cfg.whiten_eps)
        n = adv.numel()
        stats = dict(clip_frac=0.0, entropy=0.0, ratio=0.0, approx_kl=0.0, value_clip_frac=0.0)
        policy_loss = value_loss = 0.0
        at = 0
        for prompt, resp, s in zip(prompts, responses, scored):
            ids, p, a = prompt + resp, len(prompt), adv[at : at + len(resp)]
            at += len(resp)
            logp_all, logp = _logprobs(self.policy, ids, p)
            old = s["logprobs"]
            ratio = torch.exp(logp - old)
            pg1, pg2 = -a * ratio, -a * ratio.clamp(1 - cfg.clip_ratio, 1 + cfg.clip_ratio)
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # (of the raw logits, per response token)
            loss = (torch.maximum(pg1, pg2) - cfg.entropy_coef * entropy).sum() / n
            loss.backward()
            policy_loss += loss.item()
            with torch.no_grad():
                stats["clip_frac"] += (pg2 > pg1).sum().item()
                stats["entropy"] += entropy.sum().item()
                stats["ratio"] += ratio.sum().item()
                stats["approx_kl"] += (0.5 * (logp - old) ** 2).sum().item()
            v, old_v, ret = _values(self.value, ids, p), s["values"], s["returns"]
            v_clipped = old_v + (v - old_v).clamp(-cfg.clip_value, cfg.clip_value)
            l1, l2 = (v - ret) ** 2, (v_clipped - ret) ** 2
            loss = 0.5 * torch.maximum(l1, l2).sum() / n
            (cfg.value_loss_coef * loss).backward()
            value_loss += loss.item()
            stats["value_clip_frac"] += (l2 > l1).sum().item()
        norms = {}
        self.lrs.append(self.opts["policy"].param_groups[0]["lr"])
        for name, model in (("policy", self.policy), ("value", self.value)):
            if cfg.max_grad_norm > 0:
                norms[name] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
            else:  # no clip: the norm is still reported
                norms[name] = torch.nn.utils.get_total_norm([w.grad for w in model.parameters()]).item()
            self.opts[name].step()
            self._note_near_eps(name, model)
            self.scheds[name].step()
            self.opts[name].zero_grad(set_to_none=True)
        return dict(policy_loss=policy_loss, value_loss=value_loss, grad_norm_policy=norms["policy"],
                    grad_norm_value=norms["value"], tokens=n, **stats)  # fmt: skip

    def _note_near_eps(self, name, model):
        """Where Adam divided a gradient by an RMS of a few eps (a gradient sum that nearly cancelled, the first
        time an embedding row is used): there the fp32 engine's rounding becomes a visible share of the update."""
        beta2, near = self.cfg.adam_betas[1], self.near_eps[name]
        for key, w in model.named_parameters():
            st = self.opts[name].state[w]
            rms = (st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))).sqrt()
            now = (rms > 0) & (rms < 100 * self.cfg.adam_eps)
            near[key] = now | near[key] if key in near else now


# -------------------------------------------------------------------------------------------------- the test --


def _engine_weights(model, path):
    """The model's weights under transformers' names, as save_pretrained writes them and transformers reads them."""
    save_pretrained(model, str(path))
    cls = LlamaForCausalLM if model.head == "lm" else LlamaForSequenceClassification
    return {k: v.double() for k, v in cls.from_pretrained(str(path), torch_dtype=torch.float32).state_dict().items()}


KERNEL_MODULES = (rope_attention, rmsnorm, swiglu, gae, dispatch)  # (logprob asks dispatch.use_triton itself)


@pytest.mark.parametrize("ops", ["reference", "kernels"])
def test_one_iteration_equals_ppo_written_from_the_recipe_in_float64(tmp_path, monkeypatch, ops):
    """`kernels`: the scoring and training passes through the Triton kernels (interpreted), as on a GPU;
    `reference`: through kernels/reference.py, as on a CPU. The rollout is sampled with the reference ops (the
    interpreter's decode steps would only add minutes). tests/engine/test_gpu.py runs it compiled on a GPU."""
    check_iteration_against_the_oracle(tmp_path, monkeypatch, ops, "cpu")


@pytest.mark.parametrize("variant", ["epochs", "easylm"])
def test_the_options_beyond_the_recipe_equal_the_oracle(tmp_path, monkeypatch, variant):
    """Later PPO epochs, several samples per prompt, the other KL estimators, whitened rewards, raw advantages, no clip,
    the linear decay to 0, EasyLM's recomputed old log-probs, weight decay (VARIANTS), through the reference ops."""
    check_iteration_against_the_oracle(tmp_path, monkeypatch, "reference", "cpu", variant)


def check_iteration_against_the_oracle(tmp_path, monkeypatch, ops: str, device: str, variant: str = "recipe") -> None:
    """The engine's iteration on `device` (fp32 parameters) with `ops` ("kernels" or "reference") and the flags of
    VARIANTS[variant] against the oracle on the CPU in float64."""
    base = [*FLAGS, *VARIANTS[variant]]
    run = prepare_tiny(parse_args(["--output-dir", str(tmp_path / "run"), *base])[1])
    reference = _perturbed(run.policy, tmp_path / "reference")  # (the SFT policy itself: every KL would be 0)
    flags = [*base, "--reference", reference, "--device", device, "--dtype", "float32"]
    cfg, run, _ = parse_args(["--output-dir", str(tmp_path / "run"), *flags])
    run = prepare_tiny(run)
    state = state_mod.setup(cfg, run, generator_factory=state_mod.make_generator)
    eos = state.policy.config.eos_token_id
    captured, launched, minibatches = [], {}, []

    def rollout_with_a_lone_eos(st, prompts, prompt_ids=None, params=None):
        with dispatch.reference_ops() if device == "cpu" else contextlib.nullcontext():
            ro = original(st, prompts, prompt_ids, params)
        # both kinds of response whatever was sampled: the shortest there is (one token, EOS) first, and one without
        # EOS last (the sample's EOS dropped if it had one)
        responses, hit = [[eos]] + ro.responses[1:], ro.hit_eos.clone()
        hit[0], hit[-1] = True, False
        if ro.hit_eos[-1]:
            responses[-1] = responses[-1][:-1] or [eos + 1]
        offsets = [0]
        for r in responses:
            offsets.append(offsets[-1] + len(r))
        gen = torch.cat([ro.gen_logprobs[a : a + len(r)] for a, r in zip(ro.offsets, responses)])
        captured.append(Rollout(ro.prompts, responses, hit, gen, offsets))
        return captured[-1]

    def train_step(st, ro, seqs, sums):  # (the sequences of each optimizer step, in the engine's order)
        minibatches.append(list(seqs))
        return original_step(st, ro, seqs, sums)

    original, original_step = trainer.generate_rollout, trainer.train_step
    monkeypatch.setattr(trainer, "generate_rollout", rollout_with_a_lone_eos)
    monkeypatch.setattr(trainer, "train_step", train_step)
    for mod in KERNEL_MODULES:  # which kernel families ran
        monkeypatch.setattr(mod, "use_triton", _spy(mod.use_triton, mod.__name__, launched))
    before = {
        "policy": _engine_weights(state.policy, tmp_path / "p0"),
        "value": _engine_weights(state.value, tmp_path / "v0"),
    }
    with dispatch.reference_ops() if ops == "reference" else contextlib.nullcontext():
        metrics = trainer.ppo_iteration(state)
    ran = {name for name, n in launched.items() if n}
    assert ran == ({m.__name__ for m in KERNEL_MODULES} if ops == "kernels" else set()), launched
    ro = captured[0]
    for key in ("logprobs", "ref_logprobs", "values", "scores"):
        setattr(ro, key, getattr(ro, key).cpu())
    ro.targets = {k: v.cpu() for k, v in ro.targets.items()}
    hit = ro.hit_eos.tolist()
    assert hit[0] and not hit[-1] and len(ro.responses[0]) == 1, hit
    assert hit == [r[-1] == eos for r in ro.responses]  # (the recipe's rule: a response ends with EOS or is cut)
    n_seq = len(ro.responses)
    assert n_seq == cfg.rollout_batch_size * cfg.samples_per_prompt
    # each prompt samples_per_prompt times (the tiny prompts are distinct)
    assert sorted(Counter(map(tuple, ro.prompts)).values()) == [cfg.samples_per_prompt] * cfg.rollout_batch_size

    # the scoring pass and the advantages, token by token
    with open(TINY_PROMPTS) as f:  # the schedule: every prompt (none too long), prompt_epochs times, in rollouts
        prompts = sum(1 for line in f if line.strip())
    steps_per_epoch = n_seq // cfg.train_batch_size
    total_steps = prompts * cfg.prompt_epochs // cfg.rollout_batch_size * cfg.ppo_epochs * steps_per_epoch
    assert state.total_steps == total_steps == {"recipe": 96, "epochs": 384, "easylm": 96}[variant]
    oracle = RecipeOracle(run.policy, reference, run.reward, cfg, total_steps)
    scored = oracle.score(ro.prompts, ro.responses, hit)
    flat = lambda key: torch.cat([s[key] for s in scored])  # noqa: E731
    close = dict(rtol=1e-5, atol=1e-5)
    for key in ("logprobs", "ref_logprobs", "values"):
        torch.testing.assert_close(getattr(ro, key).double(), flat(key), **close, msg=key)
    torch.testing.assert_close(ro.scores.double(), torch.stack([s["score"] for s in scored]), **close)
    for key in ("kl", "rewards", "advantages", "returns"):
        torch.testing.assert_close(ro.targets[key].double(), flat(key), **close, msg=key)
    n_tok = flat("kl").numel()
    penalized = [s["score"] if e else cfg.missing_eos_penalty for s, e in zip(scored, hit)]
    expected = {"kl": flat("kl").sum() / n_seq, "reward": flat("rewards").sum() / n_seq,
                "score": sum(s["score"] for s in scored) / n_seq, "score_penalized": sum(penalized) / n_seq,
                "value": flat("values").sum() / n_tok, "returns": flat("returns").sum() / n_tok,
                "response_len": n_tok / n_seq, "no_eos_frac": hit.count(False) / n_seq,
                "kl_per_token": flat("kl").sum() / n_tok,  # (the rollout's mean per response token)
                "gen_logprob_gap": (ro.gen_logprobs.cpu() - ro.logprobs).double().abs().sum() / n_tok}  # fmt: skip
    for k, v in expected.items():
        assert metrics[k] == pytest.approx(float(v), rel=1e-5, abs=1e-6), (k, metrics[k], v)
    if device == "cpu":  # (what was sampled: another device samples other responses)
        log_ratio = flat("logprobs") - flat("ref_logprobs")
        assert log_ratio.abs().mean() > 0.05, log_ratio  # the KL penalty matters: the reference is not the policy

    # the optimizer steps: minibatches of train_batch_size sequences, in rollout order in the first PPO epoch and in
    # the engine's order (each sequence once) in a later one
    per_step = cfg.train_batch_size
    assert len(minibatches) == metrics["step"] == cfg.ppo_epochs * steps_per_epoch
    epochs = [sum(minibatches[e * steps_per_epoch : (e + 1) * steps_per_epoch], []) for e in range(cfg.ppo_epochs)]
    assert all(len(mb) == per_step for mb in minibatches), minibatches
    assert epochs[0] == list(range(n_seq)), epochs
    for order in epochs[1:]:
        assert sorted(order) == list(range(n_seq)) != order, order  # a permutation, and a new one
    steps = [oracle.step([ro.prompts[i] for i in mb], [ro.responses[i] for i in mb], [scored[i] for i in mb])
             for mb in minibatches]  # fmt: skip
    tokens = sum(s["tokens"] for s in steps)
    expected = {k: sum(s[k] for s in steps) / len(steps) for k in PER_STEP}
    expected.update({k: sum(s[k] for s in steps) / tokens for k in PER_TOKEN})
    for k, v in expected.items():
        assert metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (k, metrics[k], v)
    # every branch taken: the warmup from a zero LR and what follows it; (on the CPU, where the samples are known)
    # clipped ratios and values, grad norms over and under the clip
    assert metrics["lr"] == pytest.approx(oracle.lrs[-1], rel=1e-12)
    lrs, lr = oracle.lrs, cfg.learning_rate
    norms = [s[k] for s in steps for k in ("grad_norm_policy", "grad_norm_value")]
    if variant == "recipe":  # two warmup steps, then the peak (EasyLM's end_lr = lr)
        assert lrs[0] == 0 < lrs[1] < lrs[2] == lrs[3] == lr, lrs
        if device == "cpu":
            assert 0 < expected["clip_frac"] < 0.5 and 0 < expected["value_clip_frac"] < 0.5, expected
            assert min(norms) < cfg.max_grad_norm < max(norms), norms
    elif variant == "epochs":  # four warmup steps, then the linear decay; norms a clip of 1 (the recipe's) would change
        assert lrs[0] == 0 < lrs[1] < lrs[2] < lrs[3] < lrs[4] == lr > lrs[5] > lrs[6] > lrs[7], lrs
        assert 0 < expected["clip_frac"] < 1 and 0 < expected["value_clip_frac"] < 1, expected
        assert max(norms) > 1.0, norms
    else:  # easylm: every ratio is 1 (old log-probs from the policy as each step finds it), so nothing is clipped
        assert expected["ratio"] == 1 and expected["clip_frac"] == 0, expected
        assert metrics["ratio"] == pytest.approx(1.0, abs=1e-6) and metrics["approx_kl"] < 1e-10, metrics

    # every weight of both models after the iteration, as the update it made
    for name, model, hf in (("policy", state.policy, oracle.policy), ("value", state.value, oracle.value)):
        after = _engine_weights(model, tmp_path / f"{name}1")
        assert after.keys() == hf.state_dict().keys()
        for key, w in hf.state_dict().items():
            near_eps = oracle.near_eps[name].get(key, torch.zeros_like(w, dtype=torch.bool))
            assert_update_close(after[key] - before[name][key], w - before[name][key], near_eps, f"{name} {key}")


def assert_update_close(ours: torch.Tensor, theirs: torch.Tensor, near_eps: torch.Tensor, what: str) -> None:
    """An optimizer's change to one weight tensor against the oracle's: every element within 1e-3 of the largest
    change, but those where Adam's RMS came within 100 eps at some step (RecipeOracle.near_eps) within 2e-2 of it.

    Those: Adam divides each element's gradient by its own RMS, so where a gradient is a sum that nearly cancels
    (an embedding row at its first use: 2.7e-7 against a row median of 3e-2, an RMS then near eps) fp32 rounding
    becomes a visible share of the update. One such element of the embedding reads 0.019, 0.32 or 1.8 times the
    1e-3 bound in the same iteration with nothing changed but how the micro-batches split (the order of the fp32
    sums; it differs between CPU instruction sets and torch builds too), and 0.2 of it with the engine in float64;
    every other element stays under 0.1 of it. A wrong update (a learning rate, a step, a clip, a decay, eps, a
    micro-batch's grads lost) moves the others."""
    scale = theirs.abs().max().item()
    assert scale > 0, what
    err = (ours.double() - theirs.double()).abs() / scale
    bound = torch.where(near_eps, 2e-2, 1e-3)
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {theirs.numel()} elements off by more than their bound (1e-3 of the largest "
        f"change, {scale:.3g}; 2e-2 where Adam's RMS came near eps), the worst by {err.max().item():.3g} of it"
    )


PER_STEP = ("policy_loss", "value_loss", "grad_norm_policy", "grad_norm_value")  # means over the optimizer steps
PER_TOKEN = ("clip_frac", "entropy", "ratio", "approx_kl", "value_clip_frac")  # means over the response tokens


def _perturbed(policy_dir, path):
    """A reference checkpoint near the policy (as after some training): noise of 1/4 of each tensor's spread."""
    model = LlamaForCausalLM.from_pretrained(policy_dir, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn(w.shape, generator=gen) * 0.25 * w.std())
    model.save_pretrained(str(path))
    return str(path)


def _spy(fn, name, launched):
    def use_triton(x):
        out = fn(x)
        launched[name] = launched.get(name, 0) + bool(out)
        return out

    return use_triton
