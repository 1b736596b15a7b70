"""What a PPO checkpoint says about the run that wrote it, read from global rank 0's state file (memory-mapped: its
tensors are not read): its PPO hyperparameters, the run settings that decided what it sampled (seed, greedy
evaluation, --ignore-eos, chat template), the frozen models it scored with, and its position (iteration, step). A
--resume takes them back for each flag its command line leaves out (engine/resume.py restores the rest); an
--eval-only of a checkpoint's policy answers as its run did (engine/state.py's setup_evaluation).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from typing import TYPE_CHECKING

import torch

from engine.config import LEGACY_PPO_VALUES, PPOConfig
from engine.distributed import agree, print0, together
from engine.errors import InvalidInput, MissingInput, first_line

if TYPE_CHECKING:
    from engine.state import RunConfig


def state_file(ckpt: str, rank: int) -> str:
    """The state file of global rank `rank` in checkpoint directory `ckpt`."""
    return os.path.join(ckpt, f"state-rank{rank:05d}.pt")


def load_state_file(fn: str) -> dict:
    """A checkpoint's state-rankRRRRR.pt, memory-mapped with weights_only (no code run); a damaged one is named."""
    try:
        return torch.load(fn, map_location="cpu", weights_only=True, mmap=True)
    except OSError as e:  # (no permission, an I/O error: the file may be whole)
        raise InvalidInput(f"cannot read the state file {fn}: {e.strerror or e}") from e
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:  # (what torch.load raises on bad bytes)
        raise InvalidInput(f"cannot read the state file {fn} ({type(e).__name__}: {first_line(e)}): the checkpoint "
                           "is damaged; resume from an earlier one (write its name into `latest`)") from e  # fmt: skip


def saved_models(ckpt: str) -> dict:
    """The frozen models' record checkpoint `ckpt` holds ({reference, reward: {path, fingerprint}}; {} for none: an
    older run's): what a resume checks the models against and pins their Hub ids to, and --eval-only's reference."""
    models = load_state_file(state_file(ckpt, 0)).get("models")
    return models if isinstance(models, dict) else {}


def saved_ppo_config(ckpt: str) -> dict:
    """The PPOConfig a checkpoint's run had (from rank 0's state file, memory-mapped: its tensors are not read)."""
    fn = state_file(ckpt, 0)
    if not os.path.exists(fn):
        raise MissingInput(f"{fn} is missing (every run writes it)")
    return dict(load_state_file(fn)["ppo_config"])


def checkpoint_config(cfg: PPOConfig, run: RunConfig, ckpt: str | None) -> PPOConfig:
    """cfg with checkpoint `ckpt`'s PPO hyperparameters for every one not given on this command line (run.ppo_flags),
    so a default changed since (lr_schedule, top_k) does not change a run halfway (load_trainer_state names those
    given, which win): a --resume's, or an --eval-only of a checkpoint's policy. Checked whole (PPOConfig's checks
    between fields, which the command line of a --resume leaves to this); cfg as it is (checked) without a
    checkpoint or with run.ppo_flags None (the API's)."""
    if ckpt is None or run.ppo_flags is None:
        return dataclasses.replace(cfg)
    saved = saved_ppo_config(ckpt)
    kw = {}
    for f in dataclasses.fields(PPOConfig):
        if f.name in run.ppo_flags or (f.name not in saved and f.name not in LEGACY_PPO_VALUES):
            continue
        value = saved.get(f.name, LEGACY_PPO_VALUES.get(f.name))
        kw[f.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(cfg, **kw)


# the run's settings (RunConfig fields) that decide what it sampled and evaluated, saved with each checkpoint: a
# --resume and an --eval-only of its policy take those no flag gives (checkpoint_run), so they answer as the run did
RUN_SETTINGS = ("seed", "eval_greedy", "ignore_eos", "chat_template")


def saved_run_settings(ckpt: str) -> dict:
    """RUN_SETTINGS as checkpoint `ckpt`'s run had them (rank 0's state file, memory-mapped); an older checkpoint's
    hold its seed alone (its prompt order's)."""
    sd = load_state_file(state_file(ckpt, 0))
    saved = dict(sd.get("run") or {})
    if "seed" not in saved and isinstance(sd.get("data"), dict) and "seed" in sd["data"]:
        saved["seed"] = int(sd["data"]["seed"])
    return {k: saved[k] for k in RUN_SETTINGS if k in saved}


def checkpoint_run(run: RunConfig, ckpt: str) -> RunConfig:
    """run with checkpoint `ckpt`'s settings that decide what its run sampled and evaluated (RUN_SETTINGS: the
    samples' seed, greedy decoding, --ignore-eos, the chat template) for each one not given on this command line
    (run.run_flags): a --resume continues with them, an --eval-only of its policy answers as that run's eval.jsonl
    did. A checkpoint from before they were saved: its seed alone, and a warning naming the others. run as it is
    without a checkpoint or with run.run_flags None (the API's)."""
    if ckpt is None or run.run_flags is None:
        return run
    saved, open_ = saved_run_settings(ckpt), [k for k in RUN_SETTINGS if k not in run.run_flags]
    if unknown := [f"--{k.replace('_', '-')} ({getattr(run, k)})" for k in open_ if k not in saved]:
        print0(f"warning: {ckpt} predates the record of its run's {', '.join(unknown)}: this command's are used; give "
               "them as its run had them to continue its numbers")  # fmt: skip
    return dataclasses.replace(run, **{k: saved[k] for k in open_ if k in saved})


def checkpoint_position_file(policy_dir: str) -> str | None:
    """Global rank 0's state file beside a PPO checkpoint's policy (checkpoint-N/policy), or None for any other
    directory (or a Hub id)."""
    fn = state_file(os.path.dirname(os.path.abspath(policy_dir)), 0)
    if os.path.basename(os.path.normpath(policy_dir)) != "policy" or not os.path.isfile(fn):
        return None
    return fn


def checkpoint_position(policy_dir: str) -> tuple[int, int]:
    """(iteration, step) of a PPO checkpoint's policy (checkpoint-N/policy, its state files beside it), from global
    rank 0's state file (memory-mapped: its tensors are not read); (0, 0) for any other checkpoint."""
    fn = checkpoint_position_file(policy_dir)
    if fn is None:
        return 0, 0
    sd = load_state_file(fn)
    return int(sd["iteration"]), int(sd["step"])


def checkpoint_reference(run: RunConfig, ckpt: str) -> RunConfig:
    """--eval-only of PPO checkpoint `ckpt`'s policy without --reference (a collective): the reference its run
    measured the KL against (saved with each checkpoint), where every rank finds it; else a warning that the KL is
    the policy's against itself (0, and the reward the penalized score), which that run's eval.jsonl did not measure.
    A relative path (an older checkpoint's) names no directory of its own here: not taken."""

    def saved_path() -> str | None:
        saved = saved_models(ckpt).get("reference") or {}
        return saved.get("path") if isinstance(saved, dict) else None

    path = together("reading the checkpoint's reference", saved_path)
    usable = bool(path) and os.path.isabs(path) and os.path.isdir(path)
    if agree([int(usable)], "min")[0]:  # (every rank: one node's own disk lacking it would mix two references)
        print0(f"reference: {path}, the one {ckpt}'s run measured the KL against (--reference for another)")
        return dataclasses.replace(run, reference=path)
    gone = f" ({path}, its run's, is not there on every node)" if path else ""
    print0(f"warning: no --reference for {ckpt}'s policy{gone}: the KL is measured against the policy itself (0, "
           "the reward the penalized score); give --reference the run's reference to compare with its "
           "eval.jsonl")  # fmt: skip
    return run
