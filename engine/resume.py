"""A PPO run's checkpoints: checkpoint-NNNNNN/{policy, value} (HF directories every rank writes its share of),
each rank's state-rankRRRRR.pt (iteration, step, data order, optimizer state, RNG), and the `latest` pointer,
each written atomically; resuming restores all of it, so a resumed run continues exactly where it stopped. The
run's logs (metrics.jsonl, ..., trimmed on a resume) and launches.jsonl are engine/run_logs.py's; the output
directory before the run writes there (checks, the run's lock, a fresh start) is engine/output_dir.py's; what a
checkpoint says about its run (hyperparameters, run settings, models, position) engine/saved_run.py's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import threading
import time
import zlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from engine.checkpoint import save_pretrained
from engine.config import LEGACY_PPO_VALUES
from engine.data import PromptBatches
from engine.distributed import agree, print0, rank0_together, together
from engine.durable import atomic_write, fsync_dir, fsync_file
from engine.errors import InputError, InvalidInput, MissingInput
from engine.hub import model_dirs
from engine.memory_plan import host_available, local_ranks
from engine.offload import state_bytes, weight_bytes
from engine.optim import host_copy, load_optimizer_state, optimizer_state
from engine.reshard import SavedOptimizer, needed_ranks
from engine.run_logs import LOGS, trim_logs
from engine.saved_run import RUN_SETTINGS, load_state_file, saved_models, state_file
from engine.tokenizer import TULU_CHAT_TEMPLATE, tulu_chat_template

if TYPE_CHECKING:
    from engine.state import TrainState

LATEST = "latest"
WANDB_RUN_ID = "wandb-run-id"  # the W&B run a resumed run continues (engine/tracking.py)


def latest_checkpoint(output_dir: str) -> str | None:
    path = os.path.join(output_dir, LATEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return os.path.join(output_dir, json.load(f)["checkpoint"])
    except (ValueError, KeyError, TypeError, OSError) as e:  # (written atomically: only a damaged disk or a hand)
        raise InvalidInput(
            f'{path} is damaged ({type(e).__name__}: {e}); write {{"checkpoint": "checkpoint-NNNNNN"}} naming the '
            "checkpoint to resume from"
        ) from e


def trainer_state_dict(state: TrainState, copy: bool = False) -> dict:
    """A rank's state file. `copy`: every tensor and container in it new (host memory), none the run's own: a
    checkpoint written while the run goes on."""
    mine = host_copy if copy else lambda x: x
    return {
        "iteration": state.iteration,
        "step": state.step,
        "total_steps": state.total_steps,
        "kl_coef": state.kl_coef,  # (the next rollout's: adaptive with kl_target)
        "data": mine(state.data.state_dict()),
        "policy_opt": optimizer_state(state.policy_opt, copy),
        "value_opt": optimizer_state(state.value_opt, copy),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(state.device) if state.device.type == "cuda" else None,
        "world_size": state.grid.world_size,
        "tp": state.grid.tp,
        "ppo_config": dataclasses.asdict(state.cfg),
        "run": {k: getattr(state.run, k) for k in RUN_SETTINGS},  # (a resume's, an --eval-only's: checkpoint_run)
        "models": mine(state.model_fingerprints),  # (the frozen models' weights, as a resume checks them; rank 0)
    }


def save_checkpoint(state: TrainState, *, background: bool = False) -> str:
    """checkpoint-NNNNNN/{policy, value (HF dirs), state-rankRRRRR.pt}, then the `latest` pointer. `background`: what
    the files hold is copied to host memory here (the device's tensors: the model and optimizer may change once this
    returns) and written by a thread of this rank's while the run goes on; finish_checkpoint(state) (the trainer's,
    an iteration later or when the run stops) waits for it and completes the checkpoint, `latest` included."""
    finish_checkpoint(state)  # (one save at a time)
    started = time.monotonic()
    out = state.run.output_dir
    name = f"checkpoint-{state.iteration:06d}"
    path = os.path.join(out, name)
    # (any error of rank 0's, a full disk or a bug, stops every rank: none waits in save_pretrained's collectives)
    rank0_together("saving a checkpoint", state.grid.rank, _make_checkpoint_dir, path)
    policy_dir = os.path.join(path, "policy")
    template = None  # (--chat-template tokenizer: the tokenizer's own, as the policy was trained)
    if state.run.chat_template == "tulu":
        template = tulu_chat_template(state.tokenizer) if state.tokenizer is not None else TULU_CHAT_TEMPLATE
        if template is None:
            template = TULU_CHAT_TEMPLATE  # (its text is the format's; its ids may differ from the run's)
            if not state.template_warned:
                state.template_warned = True
                print0(
                    "warning: no variant of the Tulu chat template gives this tokenizer's apply_chat_template the "
                    "ids of the run's prompts; the saved policy gets the plain one (encode_chat formats exactly)"
                )
    state_fn = state_file(path, state.grid.rank)
    if background and not _host_copy_fits(state):
        background = False
    if not background:
        save_pretrained(state.policy, policy_dir, tokenizer_dir=state.tokenizer_dir, source_dir=state.run.policy,
                        chat_template=template)  # fmt: skip
        save_pretrained(state.value, os.path.join(path, "value"))
        # (a full disk, or a state that does not pickle on one rank alone: every rank stops; once all have returned,
        # every file and name in checkpoint-N is durable and `latest` may move)
        together("saving a checkpoint", lambda: _save_state_file(trainer_state_dict(state), state_fn))
        # (`latest` not moved on rank 0, or its pruning failed: no rank goes on, none waits for rank 0 in a collective)
        rank0_together("saving a checkpoint", state.grid.rank, _point_latest, out, name, state.run.keep_checkpoints)
        print0(f"{name} saved ({time.monotonic() - started:.1f} s)")
        return path
    models = [
        save_pretrained(state.policy, policy_dir, tokenizer_dir=state.tokenizer_dir, source_dir=state.run.policy,
                        chat_template=template, defer=True),
        save_pretrained(state.value, os.path.join(path, "value"), defer=True),
    ]  # fmt: skip
    sd = together("saving a checkpoint", trainer_state_dict, state, copy=True)
    jobs = [m.jobs for m in models] + [[functools.partial(_save_state_file, sd, state_fn)]]
    state.pending_save = _Writing(path, name, models, jobs, time.monotonic() - started)
    return path


def finish_checkpoint(state: TrainState) -> str | None:
    """The checkpoint a background save_checkpoint is writing, completed: this rank's thread waited for, every rank's
    error raised on every rank (save_pretrained's and the state file's, in the order of a synchronous save), the
    models' directories renamed into place, `latest` moved. Collective; a no-op (None) with none under way."""
    writing = getattr(state, "pending_save", None)
    if writing is None:
        return None
    state.pending_save = None
    errors = writing.wait()
    for model, error in zip(writing.models, errors):
        model.finish(error)
    together("saving a checkpoint", _raise, errors[-1])
    out = state.run.output_dir
    rank0_together("saving a checkpoint", state.grid.rank, _point_latest, out, writing.name, state.run.keep_checkpoints)
    print0(f"{writing.name} saved ({writing.copied_s:.1f} s of the run's time; written in {writing.written_s:.1f} s "
           "while it went on)")  # fmt: skip
    return writing.path


def abandon_checkpoint(state: TrainState) -> None:
    """A run that stops on an error of one rank alone (the trainer's; one that every rank raised together completes
    the checkpoint instead): a checkpoint being written in the background is waited for on this rank (no file is
    written once the run has returned) and left incomplete (its completion would be collective, and the other ranks
    may be anywhere; the run's next save or resume removes it)."""
    writing = getattr(state, "pending_save", None)
    state.pending_save = None
    if writing is not None:
        writing.wait()


class _Writing:
    """A checkpoint's files written on a thread of this rank's: its parts' jobs in order (the policy's files, the
    value model's, the state file), the first error kept with its part, the later parts then left."""

    def __init__(self, path: str, name: str, models: list, parts: list[list], copied_s: float):
        self.path, self.name, self.models, self.copied_s = path, name, models, copied_s
        self.written_s = 0.0
        self.errors: list[BaseException | None] = [None] * len(parts)
        self.thread = threading.Thread(target=self._run, args=(parts,), name=f"writing {name}", daemon=True)
        self.thread.start()

    def _run(self, parts: list[list]) -> None:
        started = time.monotonic()
        for i, jobs in enumerate(parts):
            try:
                for job in jobs:
                    job()
            except BaseException as e:  # (a full disk: raised on every rank by finish_checkpoint)
                self.errors[i] = e
                break
        self.written_s = time.monotonic() - started

    def wait(self) -> list[BaseException | None]:
        self.thread.join()
        return self.errors


def _host_copy_fits(state: TrainState) -> bool:
    """Whether a background save's host copy (this rank's optimizer state and its share of both models' files, on
    every local rank alike) fits in half the host's available memory, on every rank (said once where it does not)."""
    mine = sum(state_bytes(o) for o in (state.policy_opt, state.value_opt) if o is not None)
    weights = weight_bytes(state.policy) + weight_bytes(state.value)
    need = (mine + weights * state.grid.tp // state.grid.world_size) * local_ranks()
    have = host_available()
    (short,) = agree([int(need > have // 2)], "max")
    if short and not state.async_save_warned:
        state.async_save_warned = True
        print0(
            f"checkpoints are written before the run goes on: their host copy ({need / 2**30:.1f} GiB a node) would "
            "not fit in half the host's available memory"
        )
    return not short


def _raise(error: BaseException | None) -> None:
    if error is not None:
        raise error


def _make_checkpoint_dir(path: str) -> None:
    """save_checkpoint on rank 0, before any rank writes into checkpoint-N: made, and a killed save's leftovers gone."""
    os.makedirs(path, exist_ok=True)
    remove_leftovers(path)


def _save_state_file(sd: dict, fn: str) -> None:
    """save_checkpoint on every rank: its trainer state (trainer_state_dict: optimizer, RNG, data order), atomically."""
    atomic_write(fn, lambda f: save_without_crc(sd, f))


def save_without_crc(obj, f) -> None:
    """torch.save without its zip records' CRC-32s (torch.load never checks them): computing them is one more pass over
    every byte on the writing core, ~0.3 s a GiB here, and a state file holds the fp32 masters and Adam moments (39 GB
    a rank at 13B TP 8). The option is read as the writer opens, so it is set for this call alone."""
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, f)
    finally:
        torch.serialization.set_crc32_options(crc)


def _point_latest(out: str, name: str, keep: int) -> None:
    """save_checkpoint on rank 0 once every rank's files are durable: the logs' lines of the iterations checkpoint
    `name` holds and its own entry synced, `latest` moved to it, then the checkpoints it replaces pruned."""
    for log in (os.path.join(out, n) for n in LOGS):  # (the lines of the iterations checkpoint-N holds: durable before
        if os.path.exists(log):  # `latest` names it)
            fsync_file(log)
    fsync_dir(out)  # (checkpoint-N's own entry)
    try:  # (the checkpoint `latest` names until now: the one resumed from, or this run's last)
        previous = _iteration_of(latest_checkpoint(out))
    except InputError:  # (damaged by hand since the resume read it: pruning as without one)
        previous = None
    atomic_write(os.path.join(out, LATEST), lambda f: f.write(json.dumps({"checkpoint": name}).encode()))
    prune_checkpoints(out, name, keep, previous)


def remove_leftovers(ckpt: str) -> None:
    """What a save of this checkpoint killed midway left in it (a model's policy.tmp-*/.old-* directory, a state
    file's .tmp-PID: a 13B model's is 26 GB), before it is saved again (rank 0, before any rank writes into it); also
    what a killed run's other writes left in the output directory, once a run holds its lock (output_dir)."""
    for name in os.listdir(ckpt):
        if re.search(r"\.(tmp|old)-[0-9a-f]+$", name):
            path = os.path.join(ckpt, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def _complete(ckpt: str) -> bool:
    """Whether a checkpoint directory holds what a resume reads: both models and the state file of every rank that
    saved it (their number from rank 0's; one it cannot read counts as whole here, so pruning never removes a
    checkpoint for a read error, and the resume names the error)."""
    files = (os.path.join(ckpt, "policy/config.json"), os.path.join(ckpt, "value/config.json"), state_file(ckpt, 0))
    if not all(os.path.exists(f) for f in files):
        return False
    try:
        ranks = int(load_state_file(files[2])["world_size"])
    except (InputError, KeyError, TypeError, ValueError):
        return True
    return all(os.path.exists(state_file(ckpt, r)) for r in range(1, ranks))


def checkpoint_number(name: str) -> int | None:
    """N of a checkpoint-N directory's name (None for any other name)."""
    digits = name.removeprefix("checkpoint-")
    return int(digits) if name.startswith("checkpoint-") and digits.isdigit() else None


def _iteration_of(path: str | None) -> int | None:
    """The iteration checkpoint `path` holds: N of checkpoint-N; for a directory of another name (`latest` pointed by
    hand at a copy, checkpoint-best), what its state file says; None when there is none."""
    if path is None:
        return None
    n = checkpoint_number(os.path.basename(path))
    if n is not None:
        return n
    try:
        return int(load_state_file(state_file(path, 0))["iteration"])
    except (InputError, KeyError, TypeError, ValueError):
        return None


def _whole(output_dir: str) -> list[str]:
    """The complete checkpoints in output_dir, oldest first."""
    names = sorted(os.listdir(output_dir))
    return [d for d in names if checkpoint_number(d) is not None and _complete(os.path.join(output_dir, d))]


def resume_checkpoint(output_dir: str) -> str | None:
    """The checkpoint --resume continues: the one `latest` names; without `latest` (a save stopped before it was first
    written, or a directory copied without it), the newest complete checkpoint there; None if there is none."""
    latest = latest_checkpoint(output_dir)
    if latest is not None or not os.path.isdir(output_dir):
        return latest
    whole = _whole(output_dir)
    return os.path.join(output_dir, whole[-1]) if whole else None


def check_same_checkpoint(ckpt: str | None, output_dir: str) -> None:
    """Every rank of a --resume continues the same checkpoint (a collective; `ckpt` this rank's resume_checkpoint):
    a node whose view of a shared output directory lags (NFS caches a file's attributes, `latest` too, for up to a
    minute by default) would load another iteration's weights, optimizer shard and data position beside the others,
    train on, and leave every rank waiting in a collective an hour later. Refused on every rank, naming both."""
    name = "no checkpoint" if ckpt is None else os.path.basename(ckpt)  # (any name: `latest` pointed by hand too)
    key = -1 if ckpt is None else zlib.crc32(name.encode())
    lo, neg_hi = agree([key, -key], "min")
    if lo == -neg_hi:
        return
    names = [None] * dist.get_world_size()  # (only on this failing path: every rank's, for the message)
    dist.all_gather_object(names, name)
    seen = ", some ".join(dict.fromkeys(names))  # (rank 0's first)
    raise InvalidInput(
        f"--resume: the ranks do not see the same checkpoint to continue in {output_dir}: some {seen} (a node's "
        "cached view of a shared directory lags up to a minute on NFS; or a node's own copy): run again once every "
        "node sees the same `latest`"
    )


def check_resumable(output_dir: str) -> None:
    """--resume where `latest` names a checkpoint that is not there (pruned since `latest` was pointed back by hand, or
    not copied): refused, naming the checkpoints there are, rather than taken for none (the fresh start would delete
    them)."""
    latest = latest_checkpoint(output_dir)
    if latest is None or os.path.isdir(latest):
        return
    whole = _whole(output_dir)
    path = os.path.join(output_dir, LATEST)
    there = "it holds no complete checkpoint: start over there with --overwrite-output-dir, without --resume"
    if whole:
        there = f'it holds {", ".join(whole)}: write {{"checkpoint": "{whole[-1]}"}} into {path} to resume from it'
    raise MissingInput(
        f"--resume: {path} names {os.path.basename(latest)}, which is not in {output_dir} (removed or moved?); {there}"
    )


def prune_checkpoints(out: str, current: str, keep: int, previous: int | None = None) -> None:
    """After checkpoint `current` is the latest: keep it and the keep - 1 newest complete checkpoints before it;
    remove the older ones and what a dead run left (an incomplete checkpoint, or one after `current` that `latest`
    never pointed to), which would otherwise count among the kept and push out a complete one. `previous`: the number
    of the checkpoint `latest` named before `current`; one after it is not this run's (a checkpoint of the run a resume
    from an earlier one replaces, or one a save killed before `latest` moved left, at DP 2 without another rank's
    state file): removed too."""
    now = checkpoint_number(current)
    last = now if previous is None else previous
    kept, doomed = [], []
    for d in sorted(os.listdir(out)):
        n = checkpoint_number(d)
        if d == current or n is None:
            continue
        (kept if n < now and n <= last and _complete(os.path.join(out, d)) else doomed).append(d)
    doomed += kept[: max(0, len(kept) - keep + 1)]
    for d in doomed:
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)


def _layout(tp: int, dp: int, distributed: bool) -> str:
    """A run's layout as the flags and launch that give it."""
    n = tp * dp
    return f"--tp {tp} on {n} process{'es' * (n > 1)}" + ("" if distributed else " with --no-distributed-optimizer")


def _load_states(ckpt: str, grid, distributed: bool) -> tuple[dict, list[dict | None] | None]:
    """This rank's saved state and, when the optimizers must be re-laid (another TP degree, number of DP ranks or
    --distributed-optimizer setting), every saved rank's state that re-laying reads (None for the others). After a
    run of another grid, the iteration, data order and RNG come from the saved state of this TP rank at DP rank 0 (of
    TP rank 0 when the TP degree changed). The files are memory-mapped: only the tensors used are read. A missing or
    damaged file raises the input error naming it."""
    load = load_state_file

    def missing(fn: str, why: str):
        raise MissingInput(f"{fn} is missing ({why})")

    if not os.path.exists(head := state_file(ckpt, 0)):
        missing(head, "every run writes it")
    sd = load(head)
    saved_tp, saved_dp, sharded = sd["tp"], sd["world_size"] // sd["tp"], sd["policy_opt"]["distributed"]
    same_grid = saved_tp == grid.tp and saved_dp == grid.dp
    if same_grid:  # this rank's own state (its RNG too)
        if not os.path.exists(own := state_file(ckpt, grid.rank)):
            missing(own, "resume reads the state file each rank wrote")
        if distributed == sharded:
            return load(own), None
    elif saved_tp == grid.tp and not sharded and not distributed:  # every DP rank saved the same: DP rank 0's
        return load(state_file(ckpt, grid.tp_rank)), None
    if sharded and any(sd[k].get("buckets") is None for k in ("policy_opt", "value_opt")):
        raise InvalidInput(
            f"{ckpt}: its sharded optimizer state predates re-laying it for another layout (an older engine saved it): "
            f"resume with its layout, {_layout(saved_tp, saved_dp, True)}, not {_layout(grid.tp, grid.dp, distributed)}"
        )
    states: list[dict | None] = [None] * sd["world_size"]
    for r in needed_ranks(saved_tp, saved_dp, sharded):
        if not os.path.exists(fn := state_file(ckpt, r)):
            missing(fn, "re-laying the optimizer for another layout reads it")
        states[r] = load(fn)
    if same_grid:
        head = states[grid.rank] if states[grid.rank] is not None else load(own)
    else:
        head = states[grid.tp_rank if saved_tp == grid.tp else 0]
    return head, states


def model_fingerprints(run) -> dict[str, dict[str, str]]:
    """{reference, reward: {path, fingerprint}}: the frozen models a run scores with (global rank 0 saves them with
    each checkpoint; a resume compares)."""
    from engine.checkpoint import weights_fingerprint

    dirs = model_dirs(run)  # (absolute: an --eval-only of the checkpoint reads the reference from another directory)
    return {k: {"path": os.path.abspath(dirs[k]), "fingerprint": weights_fingerprint(dirs[k])}
            for k in ("reference", "reward")}  # fmt: skip


def fingerprint_models(run, ckpt: str | None, rank: int) -> dict | None:
    """Global rank 0: the frozen models' fingerprints (model_fingerprints) and, resuming from `ckpt`, their check
    against the ones saved there (check_models), before any weight is loaded; every rank raises together."""
    # (a truncated state file, unreadable weights: every rank stops, none waits)
    return rank0_together("checking the reference and reward models", rank, _fingerprint_models, run, ckpt)


def _fingerprint_models(run, ckpt: str | None) -> dict:
    """fingerprint_models on global rank 0."""
    found = model_fingerprints(run)
    if ckpt and os.path.exists(state_file(ckpt, 0)):  # (a missing one is named by load_trainer_state)
        check_models(saved_models(ckpt), found, run.resume_other_models)
    return found


def check_models(saved: dict | None, now: dict | None, allow: bool) -> None:
    """Refuse (or with `allow` only warn) a resume whose reference or reward model has other weights than the run
    saved had: its KL terms and rewards would silently measure against another model. A checkpoint of a run without
    fingerprints (or a benchmark's state without paths) is not checked."""
    if not saved or not now:
        return
    other = [f"the {k} model (then {saved[k]['path']}, now {now[k]['path']})" for k in ("reference", "reward")
             if k in saved and k in now and saved[k]["fingerprint"] != now[k]["fingerprint"]]  # fmt: skip
    if not other:
        return
    what = f"resuming with {' and '.join(other)} whose weights differ from those the checkpoint's run used"
    if not allow:
        raise InvalidInput(f"{what}: pass the same checkpoints, or --resume-other-models if that is meant")
    print0(f"warning: {what} (--resume-other-models)")


def check_prompt_order(ckpt: str, prompts: list[list[int]], cfg, seed: int) -> None:
    """This run's prompts, --seed and --rollout-batch-size against the prompt order checkpoint `ckpt` continues (rank
    0's state file, memory-mapped), before any weight is read: a resume that cannot continue it is refused then, not
    once four models are loaded."""
    fn = state_file(ckpt, 0)
    if os.path.exists(fn):  # (a missing one is named by load_trainer_state)
        data = PromptBatches(prompts, cfg.rollout_batch_size, seed=seed, epochs=cfg.prompt_epochs)
        data.load_state_dict(load_state_file(fn)["data"])


def _changed_hyperparameters(saved: dict, now: dict) -> str:
    """'name saved -> now' for each PPOConfig field whose value differs ('' if none); a field the checkpoint predates
    counts at the value its run had (config.LEGACY_PPO_VALUES)."""
    saved = {**LEGACY_PPO_VALUES, **saved}
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
    keys = sorted(set(saved) | set(now))
    return ", ".join(f"{k} {saved.get(k)} -> {now.get(k)}" for k in keys if norm(saved.get(k)) != norm(now.get(k)))


def _resume_kl_coef(state: TrainState, sd: dict) -> None:
    """An adaptive KL coefficient (kl_target) continues where the checkpoint's run left it, unless the coefficient it
    starts from (--kl-coef) was given again with another value: then it starts over from that one. A fixed one is the
    run's --kl-coef."""
    saved = sd.get("kl_coef")  # (None: a checkpoint from before the adaptive coefficient, whose runs had it fixed)
    if not state.cfg.kl_target or saved is None:
        return
    if sd["ppo_config"].get("kl_coef") == state.cfg.kl_coef:
        state.kl_coef = saved
    else:
        print0(f"the adaptive KL coefficient starts over from --kl-coef {state.cfg.kl_coef} (the checkpoint's run had "
               f"taken it to {saved:.6g})")  # fmt: skip


def _warn_of_later_checkpoints(out: str, resumed: str, since: int) -> None:
    """Complete checkpoints after the one resumed (iteration `since`; `latest` pointed back by hand): this run replaces
    them, and its next save removes them (prune_checkpoints); said now, while they can still be moved away."""
    later = [d for d in sorted(os.listdir(out)) if (checkpoint_number(d) or 0) > since]
    later = [d for d in later if _complete(os.path.join(out, d))]
    if later:
        print0(
            f"warning: resuming from {resumed}, before {', '.join(later)}: this run replaces them, and its next "
            f"checkpoint removes them (move them out of {out} to keep them)"
        )


def _trim_logs_of(out: str, iteration: int, ckpt: str) -> None:
    """load_trainer_state on rank 0: the logs' lines after the checkpoint's iteration dropped, and the checkpoints after
    it warned of."""
    trim_logs(out, iteration)
    _warn_of_later_checkpoints(out, os.path.basename(ckpt), iteration)


def load_trainer_state(state: TrainState, ckpt: str) -> None:
    """Restore the run from checkpoint `ckpt`, also with another TP degree or number of data-parallel ranks: the
    prompt order and the samples do not depend on them, and the optimizers are re-laid (engine/reshard.py)."""
    grid = state.grid
    # (a state file missing or damaged on one rank alone, a key a damaged file lacks: every rank stops before the
    # optimizers' state loads through collectives below)
    sd, saved = together("resuming", _load_states, ckpt, grid, state.policy_opt.buckets is not None)
    state.iteration, state.step = sd["iteration"], sd["step"]
    changed = _changed_hyperparameters(sd["ppo_config"], dataclasses.asdict(state.cfg))
    if changed:  # (it may be meant, as a lower learning rate after a spike; it is never silent)
        print0(f"resuming with PPO hyperparameters other than the checkpoint's: {changed}")
    if sd["total_steps"] != state.total_steps:
        # More prompt epochs, PPO epochs or samples, or another train batch size: the schedule spans this run's steps
        # (the checkpoint's would have ended the learning rate at 0 before the run does, or left it undecayed)
        print0(
            f"resuming with a learning-rate schedule of {state.total_steps} optimizer steps (the checkpoint's run: "
            f"{sd['total_steps']}): the learning rate continues at step {state.step} of the new schedule"
        )
    _resume_kl_coef(state, sd)
    state.data.load_state_dict(sd["data"])
    # (an edited log, a full disk on rank 0: every rank stops, none waits in the optimizers' loads)
    rank0_together("resuming", grid.rank, _trim_logs_of, state.run.output_dir, state.iteration, ckpt)
    for name, opt in (("policy_opt", state.policy_opt), ("value_opt", state.value_opt)):
        if saved is None:
            load_optimizer_state(opt, sd[name])
        else:
            states = [s[name] if s is not None else None for s in saved]
            load_optimizer_state(opt, SavedOptimizer(states, sd["tp"], len(saved) // sd["tp"]), grid.tp, grid.tp_rank)
    torch.set_rng_state(sd["rng"])
    if sd["cuda_rng"] is not None and state.device.type == "cuda":
        torch.cuda.set_rng_state(sd["cuda_rng"], state.device)
