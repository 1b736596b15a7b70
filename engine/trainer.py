"""The PPO loop: rollout -> score -> advantages -> updates, with optimizers, checkpoints and metrics.

Four models: policy ("lm", trained), reference ("lm", frozen, same checkpoint), value ("score",
trained, initialised from the reward model) and reward ("score", frozen). One iteration:
  1. generate: the Generator samples responses from the policy's own parameter tensors (no copy);
  2. score: packed no-grad passes (prompt + response concatenated, no padding computed) give the
     policy's and the reference's log-probs of every response token, the value of every state and
     the RM score at each sequence's last token; engine.ppo turns them into rewards and GAE;
  3. train: ppo_epochs x minibatches of train_batch_size sequences (global over data-parallel ranks),
     each split into micro-batches of at most micro_batch_tokens tokens whose gradients accumulate;
     one Adam step each for the policy and the value model (separate optimizers, grad-norm clip).
With bf16 parameters the optimizers keep fp32 master weights and moments and write the update back
into the very same bf16 tensors in place, so the generator sees it. Flat functions over TrainState (built by
engine/state.py's setup).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from torch.profiler import record_function

from engine import balance, grad_sums, ppo, recompute
from engine.data import Rollout, global_position
from engine.distributed import agree, print0
from engine.dp_overlap import backward, settle
from engine.errors import STOPPED_EXIT, InputError, failed_on, raised_on_every_rank
from engine.evaluate import check_resumed_eval, eval_due, evaluate, log_samples
from engine.kv_cache import upload
from engine.model import forward_flops
from engine.optim import accumulate_grads, apply_update, reduce_grads
from engine.output_dir import TRACE_PREFIX
from engine.resume import abandon_checkpoint, finish_checkpoint, resume_checkpoint, save_checkpoint
from engine.rollout import (
    add_to,
    check_scores,
    chunks,
    forward_rollout,
    generate_rollout,
    minibatch_targets,
    reduce_sums,
    score_tokens,
    shaped_targets,
)
from engine.run_logs import record_launch
from engine.scheduler import GenerationStats
from engine.state import TrainState  # (the state and its setup: engine/state.py)
from engine.tracking import Tracker, log_metrics

# --------------------------------------------------------------------------------- phases --


def plan_recompute(state: TrainState) -> None:
    """activation_checkpointing=auto on a GPU: before a training phase, recompute the fewest layers of each
    trained model that let a micro-batch fit the memory left (engine/recompute.py)."""
    if state.run.activation_checkpointing == "auto" and state.device.type == "cuda":
        # the largest micro-batch: micro_batch_tokens, or a longer sequence alone, and sequence parallelism's padding
        cfg, run = state.cfg, state.run
        tokens = max(run.micro_batch_tokens, cfg.max_prompt_len + cfg.max_new_tokens) + state.grid.tp - 1
        recompute.plan_models(
            {"policy": state.policy, "value": state.value}, [state.policy_opt, state.value_opt], tokens,
            state.device, state.layer_bytes,
        )  # fmt: skip


@torch.no_grad()
def rollout_targets(state: TrainState, ro: Rollout) -> None:
    """A scored rollout's (engine.rollout.forward_rollout) rewards, advantages and returns (engine.ppo); with
    --whiten-rewards a collective over the data-parallel ranks."""
    scores = ppo.scores_with_eos_penalty(ro.scores, ro.hit_eos, state.cfg.missing_eos_penalty)
    ro.targets = shaped_targets(state, ro.logprobs, ro.ref_logprobs, ro.values, ro.offsets, scores)
    if state.cfg.recompute_old_logprobs_per_minibatch:  # (each minibatch's own again: minibatch_targets)
        ro.targets["score_tokens"] = score_tokens(ro, scores)


def _nonfinite_kl(state: TrainState, kl: torch.Tensor) -> str:
    """Where the rollout's per-token KL to the reference (`kl`, this rank's) is not finite (the rewards, advantages and
    returns it makes are not either), that, as a clause of the non-finite loss's message; every DP rank calls it (their
    losses agree)."""
    n = (~torch.isfinite(kl)).sum().float()
    if state.dp_group is not None:
        dist.all_reduce(n, group=state.dp_group)
    if not n:
        return ""
    est = state.cfg.kl_estimator
    return (
        f", from the rollout's KL to the reference (--kl-estimator {est}), not finite at {int(n)} response tokens"
        + (" (k3 = exp(ref - logp) - 1 - (ref - logp) overflows where the reference's log-prob of a sampled token is "
           "over 88.7 above the policy's; k1, the recipe's, stays finite)" if est == "k3" else "")
    )  # fmt: skip


def train_step(
    state: TrainState, ro: Rollout, seqs: list[int], sums: dict[str, torch.Tensor], kl: torch.Tensor | None = None
) -> None:
    """One optimizer step of each model on this rank's share `seqs` of a global minibatch (sequences of `ro`: this
    rank's rollout, or its share dealt by tokens, engine/balance.py, with `kl` its rollout's per-token KL).

    The policy's micro-batches and its grads' DP reduction (launched while its last micro-batch's backward runs:
    engine.dp_overlap.backward), then the value model's (the two are independent within a step): with the distributed
    optimizer only one model's whole fp32 grads exist at a time (the first's are reduce-scattered into its shards
    before the second's backward). Both updates are applied once both models' losses and grad norms are known to be
    finite, so a step that raises has changed nothing. With the distributed optimizer each update's all-gather of
    the parameters is left running (the policy's behind the value model's update, the value model's behind the next
    step's policy passes): each model's passes settle its own first, and train_rollout all of them at its end.

    Adds to `sums` (DP-local sums): the losses (each already a share of the global minibatch mean), token sums of the
    per-token stats, token counts, and the grad norms.
    """
    cfg, dev, grid = state.cfg, state.device, state.grid
    kl = ro.targets["kl"] if kl is None else kl
    # (no blocking host-to-device copy: it would wait here for the previous step's update before the packing below)
    rows = upload(torch.cat([torch.arange(ro.offsets[i], ro.offsets[i + 1]) for i in seqs]), dev)
    ones = torch.ones(rows.numel(), dtype=torch.bool, device=dev)
    packs = list(chunks(state, ro, seqs))  # packed once for both models (a few int tensors per micro-batch)
    old_logprobs, old_values, targets = ro.logprobs, ro.values, ro.targets
    if cfg.recompute_old_logprobs_per_minibatch:  # (EasyLM: the minibatch scored by the models as this step finds them)
        settle(state.policy_opt)
        settle(state.value_opt)
        old_logprobs, old_values, targets = minibatch_targets(state, ro, seqs, packs, rows)
        kl = targets["kl"]
    # the minibatch's tokens over every DP rank (the losses' denominator): the whitening's collective counts them
    adv, n_global = ppo.minibatch_advantages(targets["advantages"][rows], ones, cfg, state.dp_group)
    if n_global is not None:
        n_global = n_global.float()  # (an exact count: the same float32 the all-reduce below sums)
    else:
        n_global = torch.full((), float(rows.numel()), device=dev)
        if state.dp_group is not None:
            dist.all_reduce(n_global, group=state.dp_group)
    pos = torch.full((ro.offsets[-1],), -1, dtype=torch.int64, device=dev)
    pos[rows] = torch.arange(rows.numel(), device=dev)  # flat rollout row -> minibatch row
    losses, norms = {}, {}
    for name, opt in (("policy", state.policy_opt), ("value", state.value_opt)):
        settle(opt)  # (the last step's parameter all-gather: in the parameters before they are read)
        step_loss = torch.zeros((), device=dev)
        for pk in packs:
            r, last = pk["rows"], pk is packs[-1]  # (the last's backward launches the DP reduction as it goes)
            with grad_sums.into_sums():  # (each weight's grad made straight into its fp32 sum)
                if name == "policy":
                    h = state.policy.hidden_packed(pk["ids"], pk["positions"], pk["cu_seqlens"])[pk["act"]]
                    loss, st = ppo.policy_loss(
                        h, state.policy.lm_head_weight, pk["targets"], old_logprobs[r], adv[pos[r]],
                        clip_eps=cfg.clip_ratio,
                        denom=n_global, group=state.policy.group, entropy_coef=cfg.entropy_coef,
                        real_vocab=state.policy.real_vocab,
                    )  # fmt: skip
                    backward(opt, grid, loss, last=last)
                    add_to(sums, tokens=r.numel(), seq_tokens=pk["ids"].numel(),
                           **{k: st[k] for k in ("clip_frac", "entropy", "ratio", "approx_kl")})  # fmt: skip
                else:
                    h = state.value.hidden_packed(pk["ids"], pk["positions"], pk["cu_seqlens"])[pk["act"]]
                    loss, vst = ppo.value_loss(
                        state.value.head_packed(h), old_values[r], targets["returns"][r], clip_value=cfg.clip_value,
                        denom=n_global,
                    )  # fmt: skip
                    backward(opt, grid, cfg.value_loss_coef * loss, last=last)
                    add_to(sums, value_clip_frac=vst["clip_frac"])
            accumulate_grads(opt)
            step_loss += loss.detach()
        losses[name] = step_loss
        norms[name] = reduce_grads(opt, grid)  # (with the distributed optimizer: frees the whole fp32 grads)
    add_to(sums, policy_loss=losses["policy"], value_loss=losses["value"])
    step_loss = torch.stack([losses["policy"], losses["value"]])
    if state.dp_group is not None:  # every rank sees the same losses, so all of them raise together
        dist.all_reduce(step_loss, group=state.dp_group)
    # (one host read of the losses and the grad norms, which are the same on every rank too: all raise together)
    checked = torch.cat([step_loss, torch.stack([norms["policy"], norms["value"]])]).tolist()
    bad = [f"{name} loss ({x})" for name, x in zip(("policy", "value"), checked[:2]) if not math.isfinite(x)]
    if bad:
        raise FloatingPointError(
            f"non-finite {' and '.join(bad)} at iteration {state.iteration + 1}, step {state.step + 1} "
            f"(optimizer steps counted over the run, as in the metrics){_nonfinite_kl(state, kl)}; no update was "
            "applied"
        )
    bad = [f"{name} ({x})" for name, x in zip(("policy", "value"), checked[2:]) if not math.isfinite(x)]
    if bad:
        raise FloatingPointError(
            f"non-finite gradient norm of the {' and '.join(bad)} model at iteration {state.iteration + 1}, "
            f"step {state.step + 1} (the losses were finite: an overflow in the backward?); no update was applied"
        )
    lr = ppo.lr_at(state.step, state.total_steps, cfg)
    apply_update(state.policy_opt, norms["policy"], lr, cfg, later=True)
    apply_update(state.value_opt, norms["value"], lr, cfg, later=True)
    # the same on every DP rank, and the metrics sum over ranks
    add_to(sums, grad_norm_policy=norms["policy"] / grid.dp, grad_norm_value=norms["value"] / grid.dp,
           steps=1.0 / grid.dp)  # fmt: skip
    state.step += 1


def minibatch_order(state: TrainState, epoch: int, n_local: int, rank: int | None = None) -> list[int]:
    """This rank's (or DP rank `rank`'s) rollout sequences in the order PPO epoch `epoch` trains on them,
    train_batch_size / dp at a time.

    Epoch 0 takes them in rollout order. A later epoch reshuffles the minibatches column by column: seen as one
    process would see it, the rollout is a [steps, train_batch_size] grid (minibatch k is row k) and each column c
    draws its own permutation of the rows from (seed, iteration, epoch, c), so every minibatch is a new mix. A
    data-parallel rank holds whole columns of that grid (engine.data.PromptBatches deals prompts out in turn, each
    with its samples_per_prompt samples; as long as those divide a rank's share of a minibatch), so it reshuffles
    its own sequences alone and the global minibatches are those of a single process: a DP run trains on the same
    minibatches in every epoch, whatever the number of ranks.
    """
    per_step = state.cfg.train_batch_size // state.grid.dp
    if epoch == 0:
        return list(range(n_local))
    steps, grid = n_local // per_step, state.grid
    order = [0] * (steps * per_step)
    for lc in range(per_step):  # this rank's column lc of a minibatch
        column = global_position(lc, grid.dp_rank if rank is None else rank, grid.dp, state.cfg.samples_per_prompt)
        seed = ((state.run.seed * 1_000_003 + state.iteration) * 101 + epoch) * 100_003 + column
        # (modulo 2^64: torch takes no larger seed, and maps a negative one to the same residue)
        rows = torch.randperm(steps, generator=torch.Generator().manual_seed(seed % 2**64)).tolist()
        for k, row in enumerate(rows):
            order[k * per_step + lc] = row * per_step + lc
    return order


def train_rollout(state: TrainState, ro: Rollout) -> dict[str, torch.Tensor]:
    cfg = state.cfg
    n_local = len(ro.responses)
    per_step = cfg.train_batch_size // state.grid.dp
    sums: dict[str, torch.Tensor] = {}
    dp, dev = state.grid.dp, state.device
    # with DP, each step's minibatch dealt over the ranks by tokens (engine/balance.py): every rank's data, once
    every = balance.gather(ro, state.dp_group, dev) if dp > 1 and state.run.balance_dp_tokens else None
    try:
        for epoch in range(cfg.ppo_epochs):
            if every is None:
                order = minibatch_order(state, epoch, n_local)
                for k in range(n_local // per_step):
                    train_step(state, ro, order[k * per_step : (k + 1) * per_step], sums)
                continue
            orders = [minibatch_order(state, epoch, len(every.responses[r]), rank=r) for r in range(dp)]
            for k in range(n_local // per_step):
                members = [(r, i) for r in range(dp) for i in orders[r][k * per_step : (k + 1) * per_step]]
                part = balance.share(every, members, state.grid.dp_rank, dp, dev)
                train_step(state, part, list(range(len(part.responses))), sums, kl=ro.targets["kl"])
    except BaseException:  # (the updates made so far in the parameters; the step's own error is the one reported)
        for opt in (state.policy_opt, state.value_opt):
            with contextlib.suppress(Exception):
                settle(opt)
        raise
    settle(state.policy_opt)  # (the last updates' parameter all-gathers: in the parameters for what reads them next)
    settle(state.value_opt)
    return sums


def clock(device: torch.device, every_stream: bool = False) -> float:
    """perf_counter() once the device has finished what was queued on the current stream (phase timing): not the side
    streams', whose copies (the optimizer state coming back from host memory after a rollout) overlap the next phase
    and are waited for by their own events where they are used; every_stream: theirs too (timing those copies)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device) if every_stream else torch.cuda.current_stream(device).synchronize()
    return time.perf_counter()


def _peak_gib(device: torch.device) -> float:
    """This rank's peak GPU memory since the last call, in GiB (0 on CPU); starts the next phase's count."""
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def ppo_iteration(state: TrainState) -> dict:
    """One rollout + its updates; returns the iteration's metrics (global over DP ranks)."""
    dev = state.device
    t0 = clock(dev)
    _peak_gib(dev)
    prompt_ids, prompts = next(state.data)
    with record_function("ppo/generate"):
        ro = generate_rollout(state, prompts, prompt_ids)
    t1 = clock(dev)
    peak_generate = _peak_gib(dev)
    with record_function("ppo/score"), torch.no_grad():
        forward_rollout(state, ro)
    t2 = clock(dev)
    # the ranks meet: a non-finite score on one stops every rank before the rewards' collectives (none is left
    # waiting in one), and a slower rank's rollout is waited for here, not inside the first training step (whose time
    # it would otherwise count)
    check_scores(ro, f"at iteration {state.iteration + 1}")
    waited = clock(dev) - t2
    with record_function("ppo/score"):
        rollout_targets(state, ro)
    t2 = clock(dev) - waited  # (the targets' time counts as the scoring phase's, the wait does not)
    peak_score = _peak_gib(dev)  # (and their memory)
    log_samples(state, ro)
    plan_recompute(state)
    t_train = clock(dev)
    with record_function("ppo/train"):
        train = train_rollout(state, ro)
    # (every stream: with --offload-optimizer always the last chunk's copy back to host memory is still running; the
    # generator returns cached training memory to the device when it sizes its cache)
    t3 = clock(dev, every_stream=True)
    peak_train = _peak_gib(dev)
    sums = dict(train)
    penalized = ppo.scores_with_eos_penalty(ro.scores, ro.hit_eos, state.cfg.missing_eos_penalty)
    add_to(
        sums, sequences=len(ro.responses), response_tokens=ro.offsets[-1], score=ro.scores.sum(),
        rollout_tokens=ro.offsets[-1] + sum(len(p) for p in ro.prompts),
        prefill_tokens=sum(len(p) for p in ro.prompts) / state.cfg.samples_per_prompt,  # (a prompt's n samples: once)
        shared_prefill_sq=sum(len(p) ** 2 for p in ro.prompts) * (1 - 1 / state.cfg.samples_per_prompt),
        seq_len_sq=float(sum((len(p) + len(r)) ** 2 for p, r in zip(ro.prompts, ro.responses))),
        score_penalized=penalized.sum(), kl=ro.targets["kl"].sum(), reward=ro.targets["rewards"].sum(),
        no_eos=(~ro.hit_eos).sum(), value=ro.values.sum(), returns=ro.targets["returns"].sum(),
        gen_logprob_gap=(ro.gen_logprobs - ro.logprobs).abs().sum(),
    )  # fmt: skip
    g = reduce_sums(sums, dev, state.dp_group)
    # each phase's time: the slowest rank's (the others wait for it); the wait: the longest any rank waited; each
    # phase's peak memory: the fullest rank's (the one that runs out first); one collective over every rank
    names = ("generate", "score", "train", "dp_wait")
    slowest = agree([t1 - t0, t2 - t1, t3 - t_train, waited, peak_generate, peak_score, peak_train], "max",
                    dtype=torch.float64)  # fmt: skip
    times, peaks = dict(zip(names, slowest[:4])), slowest[4:]
    gen_stats = getattr(state.generator, "stats", None) or GenerationStats()  # a test's stand-in may keep none
    n_seq, n_resp, n_tok, n_steps = g["sequences"], g["response_tokens"], max(g["tokens"], 1.0), max(g["steps"], 1)
    # model FLOPs per GPU and second of each phase: forwards over the rollout's sequences (prompt + response), each
    # head applied where the passes apply it (the response rows; the reward model's: a token per sequence)
    fwd = {k: forward_flops(m.config, g["rollout_tokens"], g["seq_len_sq"], head, rows)
           for k, m, head, rows in (("policy", state.policy, "lm", n_resp), ("reference", state.ref, "lm", n_resp),
                                    ("value", state.value, "score", n_resp),
                                    ("reward", state.reward, "score", n_seq))}  # fmt: skip
    # generation: each prompt's prefill once (its samples share its cache), a token at a time after it, a logits row
    # per sampled token
    gen_flops = forward_flops(  # (a sequence's last token is never fed; a shared prompt's attention counted once)
        state.policy.config,
        g["prefill_tokens"] + n_resp - n_seq,
        g["seq_len_sq"] - g["shared_prefill_sq"],
        "lm",
        n_resp,
    )
    # (its extra no-grad forwards: each minibatch's old log-probs and values again)
    quirk = fwd["policy"] + fwd["value"] if state.cfg.recompute_old_logprobs_per_minibatch else 0.0
    per_gpu = lambda flops, seconds: flops / max(seconds, 1e-9) / state.grid.world_size / 1e12  # noqa: E731
    kl_coef = state.kl_coef  # this rollout's; the next one's follows its KL (every rank alike: global sums)
    state.kl_coef = ppo.adapt_kl_coef(kl_coef, g["kl"] / n_seq, n_seq, state.cfg)
    state.iteration += 1
    return {
        "iteration": state.iteration,
        "step": state.step,
        "lr": ppo.lr_at(max(state.step - 1, 0), state.total_steps, state.cfg),
        "score": g["score"] / n_seq,  # the RM's
        "score_penalized": g["score_penalized"] / n_seq,  # with the missing-EOS penalty
        "kl": g["kl"] / n_seq,  # summed over each response's tokens, averaged over responses
        "kl_per_token": g["kl"] / n_resp,
        "kl_coef": kl_coef,  # the KL penalty's coefficient in this rollout's rewards (adaptive with --kl-target)
        "reward": g["reward"] / n_seq,  # the same, of the per-token rewards (score + KL penalty)
        "no_eos_frac": g["no_eos"] / n_seq,
        "response_len": n_resp / n_seq,
        "value": g["value"] / n_resp,
        "returns": g["returns"] / n_resp,
        "gen_logprob_gap": g["gen_logprob_gap"] / n_resp,  # mean |generator log-prob - training log-prob|
        "policy_loss": g["policy_loss"] / n_steps,
        "value_loss": g["value_loss"] / n_steps,
        "clip_frac": g["clip_frac"] / n_tok,
        "entropy": g["entropy"] / n_tok,
        "ratio": g["ratio"] / n_tok,
        "approx_kl": g["approx_kl"] / n_tok,
        "value_clip_frac": g["value_clip_frac"] / n_tok,
        "grad_norm_policy": g["grad_norm_policy"] / n_steps,
        "grad_norm_value": g["grad_norm_value"] / n_steps,
        "gen_tok_s": n_resp / max(times["generate"], 1e-9),
        "score_tok_s": g["rollout_tokens"] / max(times["score"], 1e-9),
        "train_tok_s": g["seq_tokens"] / max(times["train"], 1e-9),  # sequence tokens, policy and value fwd + bwd
        # (generation: each prompt's prefill once, a policy forward per sampled token after it; scoring: the four
        # models' forwards; training: the policy's and the value model's forward and backward, 3 forwards each, per PPO
        # epoch; every LM head on the response rows only)
        "gen_tflops_gpu": per_gpu(gen_flops, times["generate"]),
        "score_tflops_gpu": per_gpu(sum(fwd.values()), times["score"]),
        "train_tflops_gpu": per_gpu(
            state.cfg.ppo_epochs * (3 * (fwd["policy"] + fwd["value"]) + quirk), times["train"]
        ),
        "time_generate": times["generate"],  # (the slowest rank's)
        "time_score": times["score"],
        "time_train": times["train"],
        "time_dp_wait": times["dp_wait"],  # the longest a rank waited for the others' rollouts (their imbalance)
        "time_iteration": t3 - t0,
        # the rollout's decode-graph captures (0: the previous iteration's graphs replayed) and setup time
        "gen_graph_captures": gen_stats.graph_captures,
        "time_gen_setup": gen_stats.setup_seconds,
        "recompute_layers": recompute.layers_recomputed(state.policy),  # the policy's, in the backward
        # the fullest rank's peak GPU memory in each phase, GiB (0 on CPU): room left for the cache and the
        # micro-batches
        "mem_gib_generate": peaks[0],
        "mem_gib_score": peaks[1],
        "mem_gib_train": peaks[2],
    }


# -------------------------------------------------------------------------------- the loop --


def _profiled_iteration(state: TrainState) -> dict:
    """ppo_iteration under torch.profiler: a Chrome trace per rank in output_dir (open it in Perfetto), the phases
    marked ppo/generate, ppo/score, ppo/train."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if state.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        metrics = ppo_iteration(state)
    os.makedirs(state.run.output_dir, exist_ok=True)
    path = os.path.join(state.run.output_dir, f"{TRACE_PREFIX}{state.iteration:06d}-rank{state.grid.rank:05d}.json")
    prof.export_chrome_trace(path)
    print0(f"profiled iteration {state.iteration}: {path} (one per rank)")
    return metrics


class _StopSignals:
    """SIGTERM / SIGUSR1 (a scheduler's notice before it ends or preempts a job) ask the run to stop after the
    current iteration, with a checkpoint, instead of dying mid-iteration and losing the iterations since the last
    one. Installed for the loop only, on the main thread (where Python delivers signals)."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class RunHistory(list):
    """train()'s per-iteration metrics; `stopped`: the loop stopped on a signal before its last iteration, with a
    checkpoint (the command line then exits with STOPPED_EXIT: not done, --resume continues)."""

    stopped = False


def train(state: TrainState) -> RunHistory:
    """Run iterations until state.iterations; checkpoint every save_every and at the end. SIGTERM or SIGUSR1 to
    any rank stops every rank after the current iteration, with a checkpoint (resume with --resume)."""
    g = state.grid
    print0(
        f"PPO: world {g.world_size} (dp {g.dp} x tp {g.tp}) on {state.device}, "
        f"{next(state.policy.parameters()).dtype} params, iterations {state.iteration}..{state.iterations} "
        f"of {len(state.data)}, {state.total_steps} optimizer steps in the schedule"
    )
    if state.iteration >= state.iterations:  # (a resumed run that has finished)
        more = f" (--max-iterations up to {len(state.data)} continues it)" if state.iterations < len(state.data) else ""
        print0(f"nothing to train: the run has made {state.iteration} iterations{more}")
    record_launch(state)
    state.tracker = state.tracker or Tracker(state)
    with state.tracker:  # (a W&B run ends with the loop, marked failed if it raised)
        try:
            stopped = _loop(state)
        except BaseException as e:
            # (a checkpoint written in the background meanwhile: completed where every rank stops here alike (one
            # process, or an error every rank raised together), so its whole files are not lost with the run; else
            # waited for and left incomplete: no file is written once the run has returned)
            if g.world_size == 1 or raised_on_every_rank(e):
                _complete_pending_save(state)
            else:
                abandon_checkpoint(state)
            raise
    history = RunHistory(state.history)
    history.stopped = stopped
    return history


def _complete_pending_save(state: TrainState) -> None:
    """A run stopping on an error (every rank alike): the checkpoint being written completed if it can be (its error
    said, not raised: the run's own is what it reports; the checkpoint before stays `latest`)."""
    try:
        finish_checkpoint(state)
    except Exception as failed:
        print0(f"warning: the checkpoint being written could not be completed: {failed}")


def _where_to_resume(state: TrainState) -> str:
    """For a run that diverged: the checkpoint to go back to, and that a resume repeats the run exactly unless a
    hyperparameter given again changes it."""
    try:
        last = resume_checkpoint(state.run.output_dir) if state.run.output_dir else None
    except InputError as e:  # (a damaged `latest`: said, without hiding the divergence)
        return f"the last checkpoint cannot be told: {e}"
    if last is None:
        return "no checkpoint was saved before it (--save-every N saves one every N iterations)"
    return (
        f"the last checkpoint is {last}: --resume continues from it exactly as this run did (the same rollouts), so "
        "give it a changed hyperparameter (a lower --learning-rate, say) to take another way"
    )


def _loop(state: TrainState) -> bool:
    """The iterations (and the evaluations and checkpoints between them); True where a signal stopped them."""
    saved_at, last_save, stop = state.iteration, time.monotonic(), False
    if 0 < state.run.profile_iteration <= state.iteration:
        print0(f"warning: --profile-iteration {state.run.profile_iteration} was done before the checkpoint this run "
               f"resumes from (iteration {state.iteration}): nothing is profiled")  # fmt: skip
    check_resumed_eval(state)
    with _StopSignals() as signals:
        # the starting point, or an evaluation a stop signal put off (a signal during it stops after iteration 1)
        if eval_due(state, at_start=True):
            state.evals.append(evaluate(state))
        # the ETA's clock: the iterations and what the loop does between them
        started, first = time.monotonic(), state.iteration
        while state.iteration < state.iterations:
            try:
                if state.iteration + 1 == state.run.profile_iteration:
                    metrics = _profiled_iteration(state)
                else:
                    metrics = ppo_iteration(state)
            except FloatingPointError as e:  # (every rank alike: a loss, a gradient norm or the scores)
                _complete_pending_save(state)  # (the last one's files, written meanwhile: the one to go back to)
                diverged = FloatingPointError(f"{e}; {_where_to_resume(state)}")
                diverged.failed_on = failed_on(e)  # (another rank's scores: one line here, its traceback there)
                raise diverged from e
            log_metrics(state, metrics, (time.monotonic() - started) / (state.iteration - first))
            finish_checkpoint(state)  # (the last iteration's, written meanwhile: now `latest`)
            minutes = state.run.save_every_minutes
            late = bool(minutes) and time.monotonic() - last_save >= 60 * minutes
            # every rank decides alike: a clock or a signal seen by one rank
            stop, late = agree([int(signals.received is not None), int(late)], "max")
            if eval_due(state) and not stop:  # (before the checkpoint: a resumed run does not evaluate again)
                state.evals.append(evaluate(state))
            if (state.run.save_every and state.iteration % state.run.save_every == 0) or late:
                # (the last iteration's written at once; the others by a thread while the next one runs)
                last = state.iteration >= state.iterations or stop
                save_checkpoint(state, background=state.run.async_save and not last)
                saved_at, last_save = state.iteration, time.monotonic()
            if stop:
                print0(f"stopping after iteration {state.iteration} on a signal: checkpoint, then exit (exit code "
                       f"{STOPPED_EXIT}: --resume continues)")  # fmt: skip
                break
        # (the run's last save, under the signal handlers too: a scheduler's second notice is noted, not a kill)
        finish_checkpoint(state)
        if state.run.output_dir and saved_at != state.iteration:
            save_checkpoint(state)
    return bool(stop)
