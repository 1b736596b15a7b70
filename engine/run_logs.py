"""A run's logs beside its checkpoints: metrics.jsonl, eval.jsonl and samples.jsonl (a line per iteration,
evaluation or sample; trimmed back to the checkpoint a resume continues) with eval/iter-N.jsonl, and launches.jsonl (a
line per launch: its command, layout, versions and whole configuration). The checkpoints are engine/resume.py's; how
every file of the run's own is written, engine/durable.py's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import sys
import time
from typing import TYPE_CHECKING

import torch

from engine.distributed import print0, rank0_together
from engine.durable import atomic_write
from engine.errors import InvalidInput

if TYPE_CHECKING:
    from engine.state import TrainState

LOGS = ("metrics.jsonl", "eval.jsonl", "samples.jsonl")  # a line per iteration, evaluation or sample
EVAL_DIR = "eval"  # iter-NNNNNN.jsonl: every answer of the evaluation after iteration N
LAUNCHES = "launches.jsonl"  # a line per launch (fresh or resumed): configuration, layout, versions (record_launch)


def record_launch(state: TrainState) -> None:
    """Global rank 0 appends this launch to output_dir/launches.jsonl (atomically; a resumed run's launch is added
    after the earlier ones, which stay): when, from which iteration, the command line, the layout and device, the
    software versions and the engine's commit, and the whole resolved configuration (PPOConfig and RunConfig, the
    Hub ids made local paths). What a run was can be read back without its checkpoints or W&B. Every rank calls it."""
    if not state.run.output_dir:
        return
    # (a full disk, or a value of the configuration that is no JSON: every rank stops, none waits for rank 0)
    rank0_together("recording the launch in launches.jsonl", state.grid.rank, _append_launch, state)


def _append_launch(state: TrainState) -> None:
    import transformers
    import triton

    dev = state.device
    record = {
        "launched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "iteration": state.iteration,  # (0: a fresh start; else resumed from checkpoint-<iteration>)
        "command": state.command or sys.argv,
        "world_size": state.grid.world_size, "tp": state.grid.tp, "dp": state.grid.dp,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(next(state.policy.parameters()).dtype).removeprefix("torch."),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                     "transformers": transformers.__version__, "engine": engine_version()},
        "ppo": dataclasses.asdict(state.cfg),
        "run": dataclasses.asdict(state.run),
        # the engine's switches set in the environment (README's table: TULU_ASYNC_TP=1 and the like)
        "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("TULU_")},
    }  # fmt: skip
    os.makedirs(state.run.output_dir, exist_ok=True)
    path = os.path.join(state.run.output_dir, LAUNCHES)
    earlier = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            earlier = f.read()
    if state.iteration:  # (a resume: settings that change the numbers, unlike the PPO flags, are this launch's own)
        _warn_of_other_numerics(earlier, record)
    line = (json.dumps(record, default=str) + "\n").encode()
    atomic_write(path, lambda f: f.write(earlier + line))


# the switches of the environment that change a run's numbers (another kernel or summation order: README's table),
# the TP ones only under tensor parallelism; the others (the overlaps, compile threads) change only when things run
NUMERIC_SWITCHES = ("TULU_GRAD_SUMS", "TULU_PPO_ATTENTION")
TP_NUMERIC_SWITCHES = ("TULU_ASYNC_TP", "TULU_ONE_SHOT_BYTES", "TULU_SYMM_ALL_REDUCE")


def _warn_of_other_numerics(earlier: bytes, record: dict) -> None:
    """A resume whose parameter dtype, KV-cache dtype, micro-batch size, --ignore-eos or (under DP) token balance
    differs from the last launch's is allowed (the optimizer state loads across dtypes; a micro-batch sums in another
    order) but no longer continues the run's numbers: said, with the flag that sets each; so is
    one under another value of an engine switch that changes the numbers (NUMERIC_SWITCHES, and under TP
    TP_NUMERIC_SWITCHES; unset is its default)."""
    try:
        last = json.loads(earlier.decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):  # (no record, or a damaged one: nothing to compare)
        return
    last_run = last.get("run") if isinstance(last, dict) else None
    if not isinstance(last_run, dict):
        return
    settings = [("parameter dtype", "--dtype", last.get("dtype"), record["dtype"])]
    for what, name in (("KV-cache dtype", "kv_cache_dtype"), ("micro-batch size", "micro_batch_tokens"),
                       ("ignore-EOS setting", "ignore_eos")) + (
                      (("DP token balance", "balance_dp_tokens"),) if record.get("dp", 1) > 1 else ()):  # fmt: skip
        settings.append((what, f"--{name.replace('_', '-')}", last_run.get(name), record["run"].get(name)))
    for what, flag, before, now in settings:
        if before is not None and before != now:
            print0(
                f"warning: this resume runs with {what} {now} where the run's last launch had {before} ({flag}): "
                "its numbers are no longer those of a run that had not stopped"
            )
    last_switches = last.get("switches")
    if isinstance(last_switches, dict):  # (an older engine's record has none: no difference)
        for key in NUMERIC_SWITCHES + (TP_NUMERIC_SWITCHES if record.get("tp", 1) > 1 else ()):
            before, now = last_switches.get(key, "unset"), record["switches"].get(key, "unset")
            if before != now:
                print0(
                    f"warning: this resume runs with {key}={now} where the run's last launch had {key}={before}: "
                    "its numbers are no longer those of a run that had not stopped"
                )


def engine_version() -> str:
    """The engine's git commit (with "+changes" when tracked files differ from it), or its package version outside a
    checkout."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=10)  # noqa: E731
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode == 0 and head.stdout.strip():
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return head.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return version("tulu-ppo-engine")
    except PackageNotFoundError:
        return "unknown"


def trim_logs(output_dir: str, iteration: int) -> None:
    """Keep what output_dir's logs (LOGS, EVAL_DIR) say of iterations up to `iteration` (the checkpoint resumed
    from): a run that died after it had logged iterations the resumed run repeats (rewritten atomically; rank 0
    calls this). A last line the dead run left half written is dropped; a line elsewhere that is not JSON is an
    error naming it (the file was edited)."""
    for name in LOGS:
        fn = os.path.join(output_dir, name)
        if not os.path.exists(fn):
            continue
        lines, records = read_log(fn)
        kept = [line for line, rec in zip(lines, records) if rec["iteration"] <= iteration]
        if len(kept) != len(lines):  # (a half-written last line has no record: rewritten without it too)
            data = "".join(kept).encode()
            atomic_write(fn, lambda f, data=data: f.write(data))
    eval_dir = os.path.join(output_dir, EVAL_DIR)
    for name in os.listdir(eval_dir) if os.path.isdir(eval_dir) else []:
        number = re.match(r"iter-(\d+)\.jsonl", name)  # (and a killed write's .tmp-PID; a user's copy is left)
        if number and int(number[1]) > iteration:
            os.remove(os.path.join(eval_dir, name))


def read_log(fn: str) -> tuple[list[str], list[dict]]:
    """A JSONL log's lines and their records; a last line written only in part (a run killed mid-write) has no
    record (and is reported); a line elsewhere that is not JSON is an error naming it (the file was edited)."""
    with open(fn) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for k, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if k + 1 < len(lines):
                raise InvalidInput(f"{fn}, line {k + 1}, is not a JSON record ({e}): mend or remove it") from None
            print0(f"{fn}: dropping its last line, written only in part when the run stopped")
            continue
        if not (isinstance(record, dict) and type(record.get("iteration")) is int):  # (a note added by hand)
            raise InvalidInput(f'{fn}, line {k + 1}, is no record of the run (one has an integer "iteration"): mend or '
                               "remove it")  # fmt: skip
        records.append(record)
    return lines, records
