"""Held-out evaluation and rollout samples: the curves and the texts that tell a policy that learns from one that
games its reward model.

Evaluation (--eval-prompts FILE, or --eval-holdout N prompts of --prompts kept out of training): the policy answers a
held-out prompt set with the rollouts' sampling (or greedy decoding, --eval-greedy) on the same random stream at
every evaluation, so the curve moves with the policy and not with the sampling noise; the reward model scores the
answers and the frozen reference gives their KL. It runs before the first iteration (the starting point), every
--eval-every iterations and after the last one. Each evaluation appends one line to OUTPUT_DIR/eval.jsonl (means over
the set: score, score_penalized (with the missing-EOS penalty), kl (summed over a response's tokens, the estimator of
the rollouts), reward (score_penalized - kl_coef * kl: the objective PPO maximises; with an adaptive coefficient,
--kl-target, the one the run started from, so that the curve moves with the policy alone), response_len,
no_eos_frac; and what makes two lines comparable: the prompt set's digest, eval_set, and the decoding, eval_greedy,
eval_temperature, eval_top_k, eval_top_p, eval_max_new_tokens) and writes every answer to
OUTPUT_DIR/eval/iter-NNNNNN.jsonl. The prompts are split over the data-parallel ranks. An evaluation draws none of
the run's random numbers, so training is the same with or without it.

Evaluation alone (--eval-only): --policy (say a PPO checkpoint's policy/) against --reference (say the SFT model) and
--reward on the evaluation set, without training, no value model or optimizer built (setup_evaluation); a PPO
checkpoint's policy is logged at that checkpoint's iteration and step (engine.saved_run.checkpoint_position).

Samples (--log-samples K): the first K sequences of each iteration's rollout (as one process holds it, on any
data-parallel size), with their scores, KL and reward (at the KL coefficient of that rollout's rewards), appended to
OUTPUT_DIR/samples.jsonl.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from engine import ppo
from engine.config import json_line
from engine.data import Rollout, global_position, prompts_digest
from engine.distributed import agree, print0, rank0_together
from engine.durable import append, atomic_write
from engine.rollout import check_scores, forward_rollout, generate_rollout, reduce_sums, sampling_params
from engine.run_logs import EVAL_DIR, read_log
from engine.state import TrainState, setup_evaluation
from kernels.logprob import kl_estimate

EVAL_STREAM = -1  # the random stream evaluations sample from (a rollout's is its iteration index, >= 0)
EVAL_KEYS = ("score", "score_penalized", "kl", "reward", "response_len", "no_eos_frac")
EVAL_TABLE_ROWS = 32  # answers of each evaluation shown in W&B (eval/iter-N.jsonl holds them all)


def eval_due(state: TrainState, *, at_start: bool = False) -> bool:
    """Whether to evaluate now: before the first iteration, every eval_every iterations, after the last one. A
    resumed run's start (`at_start`) also makes up for an evaluation due at the checkpoint's iteration that is not
    in eval.jsonl (a stop signal during that iteration checkpoints first and leaves it out). Every rank alike."""
    if state.eval_prompts is None:
        return False
    every = state.run.eval_every
    due = state.iteration == state.iterations or (every > 0 and state.iteration % every == 0)
    if not at_start or state.iteration == 0:
        return at_start or due
    if not due:
        return False
    # (an unreadable log: every rank stops, none waits in the agreement)
    logged = rank0_together("reading eval.jsonl", state.grid.rank, _logged, state.run.output_dir, state.iteration)
    return not agree([1 if logged is None else logged], "min")[0]  # (None: not rank 0)


def _logged(output_dir: str, iteration: int) -> int:
    """eval_due on rank 0: whether eval.jsonl holds the evaluation after `iteration` (1) or not (0)."""
    fn = os.path.join(output_dir, "eval.jsonl")
    return int(os.path.exists(fn) and any(r.get("iteration") == iteration for r in read_log(fn)[1]))


def eval_identity(state: TrainState) -> dict:
    """What makes two evaluations comparable, logged with each: the prompt set's digest, the decoding (greedy, or
    the sampling: temperature, top-k, top-p and the seed; the response limit, --ignore-eos) and the terms of the
    reward (the KL coefficient and estimator, the missing-EOS penalty)."""
    params, cfg = sampling_params(state, EVAL_STREAM, greedy=state.run.eval_greedy, n=1), state.cfg
    return {
        "eval_set": prompts_digest(state.eval_prompts.prompts), "eval_greedy": state.run.eval_greedy,
        "eval_seed": state.run.seed, "eval_ignore_eos": state.run.ignore_eos,
        "eval_temperature": params.temperature, "eval_top_k": params.top_k, "eval_top_p": params.top_p,
        "eval_max_new_tokens": params.max_new_tokens, "eval_kl_coef": cfg.kl_coef,
        "eval_kl_estimator": cfg.kl_estimator, "eval_missing_eos_penalty": cfg.missing_eos_penalty,
    }  # fmt: skip


def check_resumed_eval(state: TrainState) -> None:
    """A resumed run evaluating on another prompt set (or decoding otherwise) than the evaluations eval.jsonl holds
    would draw one curve through two sets: say so (each line names its set: `eval_set`); one evaluating nothing
    would end the curve in silence: said too."""
    if state.iteration == 0 or not state.run.output_dir:
        return
    fn = os.path.join(state.run.output_dir, "eval.jsonl")
    # (rank 0 reads it; an error there stops every rank, none waits for it in eval_due or the first rollout)
    logged = rank0_together("reading eval.jsonl", state.grid.rank, _logged_sets, fn)
    if not logged:  # (None on the other ranks)
        return
    if state.eval_prompts is None:  # (--eval-prompts or --eval-holdout left out of the resume's command)
        print0(f"warning: {fn} holds this run's evaluations, and this resumed run evaluates nothing (no --eval-prompts "
               "or --eval-holdout): its curve ends here; give the run's to go on")  # fmt: skip
        return
    now = eval_identity(state)
    if any(k in logged[-1] and logged[-1][k] != v for k, v in now.items()):
        before = {k: logged[-1].get(k) for k in now if k in logged[-1]}
        print0(
            f"warning: {fn} holds evaluations of another set or decoding ({before}) than this resumed run's ({now}): "
            "its curve changes set here (each line names its own)"
        )


def sequence_stats(state: TrainState, ro: Rollout, kl_coef: float | None = None) -> dict[str, torch.Tensor]:
    """Per sequence [B] fp32, from a rollout through forward_rollout: score, score_penalized, kl (summed over the
    response), reward (score_penalized - kl_coef * kl; kl_coef by default the run's --kl-coef), response_len, no_eos.
    With --eval-greedy the tokens are the argmax, not samples of the policy: kl is then the estimator summed over
    them, not an estimate of KL(pi || ref)."""
    cfg = state.cfg
    lens = torch.tensor([b - a for a, b in zip(ro.offsets[:-1], ro.offsets[1:])], device=state.device)
    seq = torch.repeat_interleave(torch.arange(len(lens), device=state.device), lens)
    kl_tok = kl_estimate(ro.logprobs.float(), ro.ref_logprobs.float(), cfg.kl_estimator)
    kl = torch.zeros(len(lens), device=state.device).index_add_(0, seq, kl_tok)
    penalized = ppo.scores_with_eos_penalty(ro.scores, ro.hit_eos, cfg.missing_eos_penalty)
    return {
        "score": ro.scores.float(),
        "score_penalized": penalized,
        "kl": kl,
        "reward": penalized - (cfg.kl_coef if kl_coef is None else kl_coef) * kl,
        "response_len": lens.float(),
        "no_eos": (~ro.hit_eos).float(),
    }


def sample_records(state: TrainState, ro: Rollout, stats: dict[str, torch.Tensor], rows: list[int]) -> list[dict]:
    """JSON-ready records of the rollout's sequences `rows`: prompt and response (as text when the run has a
    tokenizer) and their token ids (what was scored: a decoded text need not encode back to the same tokens), and
    their statistics."""
    tok = state.tokenizer
    host = {k: v.tolist() for k, v in stats.items()}
    records = []
    for i in rows:
        rec: dict = {}
        if tok is not None:
            rec["prompt"] = tok.decode(ro.prompts[i], skip_special_tokens=False)
            rec["response"] = tok.decode(ro.responses[i], skip_special_tokens=True)
        rec["prompt_ids"], rec["response_ids"] = list(ro.prompts[i]), list(ro.responses[i])
        rec.update({k: host[k][i] for k in ("score", "score_penalized", "kl", "reward")})
        rec["response_len"], rec["hit_eos"] = int(host["response_len"][i]), not host["no_eos"][i]
        records.append(rec)
    return records


def readable(records: list[dict]) -> list[dict]:
    """Records for a tracker's table: without the token ids where the text is there (the JSONL files keep both)."""
    return [{k: v for k, v in r.items() if not (k.endswith("_ids") and k.removesuffix("_ids") in r)} for r in records]


def _gather_to_rank0(state: TrainState, records: list[dict]) -> list[dict] | None:
    """Every data-parallel rank's records on global rank 0 (None elsewhere); TP ranks other than 0 send none."""
    if not dist.is_initialized() or state.grid.world_size == 1:
        return records
    out = [None] * state.grid.world_size if state.grid.rank == 0 else None
    dist.gather_object(records, out, dst=0)
    return [r for part in out for r in part] if out is not None else None


def _logged_sets(fn: str) -> list[dict]:
    """The records of eval.jsonl at `fn` that name their set ([] without the file, or with one eval_due names)."""
    try:
        return [r for r in read_log(fn)[1] if "eval_set" in r] if os.path.exists(fn) else []
    except ValueError:  # (named by eval_due, which reads it too)
        return []


def evaluate(state: TrainState) -> dict:
    """Answer the held-out prompts with the current policy, score them, log eval.jsonl and eval/iter-N.jsonl."""
    t0 = time.perf_counter()
    grid, prompt_set = state.grid, state.eval_prompts
    ids = list(range(grid.dp_rank, len(prompt_set.prompts), grid.dp))
    params = sampling_params(state, EVAL_STREAM, greedy=state.run.eval_greedy, n=1)
    ro = generate_rollout(state, [prompt_set.prompts[i] for i in ids], ids, params)
    forward_rollout(state, ro, values=False)
    check_scores(ro, f"in the evaluation after iteration {state.iteration}")
    stats = sequence_stats(state, ro)
    g = reduce_sums({"sequences": float(len(ids)), **{k: v.sum() for k, v in stats.items()}}, state.device,
                    state.dp_group)  # fmt: skip
    n = g["sequences"]
    metrics = {"iteration": state.iteration, "step": state.step, "prompts": int(n), **eval_identity(state)}
    metrics.update({k: g[k] / n for k in EVAL_KEYS if k != "no_eos_frac"})
    metrics["no_eos_frac"] = g["no_eos"] / n
    records = []  # (a TP group's ranks hold the same answers: its rank 0 decodes them)
    if grid.tp_rank == 0:
        records = sample_records(state, ro, stats, list(range(len(ids))))
        for rec, i in zip(records, ids):
            rec["prompt_index"] = i
    records = _gather_to_rank0(state, records)
    metrics["time"] = time.perf_counter() - t0
    # (a full disk, W&B: rank 0's alone, after the last collective here; every rank at once: the others would
    # otherwise wait for rank 0 in the next rollout's collectives)
    rank0_together("writing the evaluation", grid.rank, _log_evaluation, state, metrics, records)
    return metrics


def _log_evaluation(state: TrainState, metrics: dict, records: list[dict]) -> None:
    """Global rank 0: an evaluation's answers to eval/iter-N.jsonl, its metrics to eval.jsonl, both to the trackers,
    and its line printed."""
    out = state.run.output_dir
    os.makedirs(os.path.join(out, EVAL_DIR), exist_ok=True)
    records = sorted(records, key=lambda r: r["prompt_index"])
    data = "".join(json_line(r) for r in records).encode()
    atomic_write(os.path.join(out, EVAL_DIR, f"iter-{state.iteration:06d}.jsonl"), lambda f: f.write(data))
    append(os.path.join(out, "eval.jsonl"), json_line(metrics))
    if state.tracker is not None:
        state.tracker.log(metrics, prefix="eval/")
        state.tracker.log_table("eval/answers", readable(records[:EVAL_TABLE_ROWS]), step=state.iteration)
    what = f"eval of {state.run.policy}" if state.run.eval_only else f"eval after iteration {state.iteration}"
    print0(f"{what} ({int(metrics['prompts'])} prompts, {metrics['time']:.1f}s): "
           + " ".join(f"{k} {metrics[k]:.4g}" for k in EVAL_KEYS))  # fmt: skip


def evaluate_only(cfg, run, grid, generator_factory=None) -> dict:
    """--eval-only: set up, evaluate once (logged as usual, W&B included), return the metrics."""
    state = setup_evaluation(cfg, run, grid, generator_factory)
    with state.tracker:
        return evaluate(state)


def log_samples(state: TrainState, ro: Rollout) -> None:
    """Append the first log_samples sequences of the rollout (scored), as one process would hold it whatever the
    data-parallel size (each rank's among them gathered on global rank 0), to samples.jsonl."""
    k, grid = state.run.log_samples, state.grid
    if k <= 0 or not state.run.output_dir:  # (a bench's run writes nothing)
        return
    mine = []  # (position in the whole rollout, record) of this rank's sequences among its first k
    if grid.tp_rank == 0:  # (a TP group's ranks hold the same sequences: its rank 0 sends them)
        n = state.cfg.samples_per_prompt
        rows = [i for i in range(len(ro.responses)) if global_position(i, grid.dp_rank, grid.dp, n) < k]
        if rows:
            records = sample_records(state, ro, sequence_stats(state, ro, state.kl_coef), rows)  # (its rewards')
            mine = [(global_position(i, grid.dp_rank, grid.dp, n), rec) for i, rec in zip(rows, records)]
    gathered = _gather_to_rank0(state, mine)
    if gathered is None:
        return
    os.makedirs(state.run.output_dir, exist_ok=True)
    records = [{"iteration": state.iteration + 1, **rec} for _, rec in sorted(gathered, key=lambda x: x[0])]
    append(os.path.join(state.run.output_dir, "samples.jsonl"), "".join(json_line(rec) for rec in records))
    if state.tracker is not None:
        state.tracker.log_table("samples", readable(records), step=state.iteration + 1)
