"""An iteration's metrics: the printed line and metrics.jsonl (log_metrics, on global rank 0), and experiment
tracking in Weights & Biases (optional: `pip install -e '.[wandb]'`), next to the JSONL logs.

With --wandb-project P, global rank 0 sends every line it writes to metrics.jsonl and to eval.jsonl (as eval/<key>),
charted against the run's iteration (a crash-resumed run's repeated iterations are kept, not dropped), with the PPO
and run configuration as the W&B run's config, and tables of answers: each evaluation's first EVAL_TABLE_ROWS
(eval/answers) and each iteration's logged samples (samples). The W&B run's id is kept in OUTPUT_DIR/wandb-run-id,
so --resume continues the same W&B run (a fresh run, or --overwrite-output-dir, starts a new one; offline, where W&B
cannot continue a run, each launch is a run of its own in a group of that id). A tracker that fails mid-run (W&B's
network, a full disk under --tensorboard-dir) is said and sent nothing more; the run goes on, its JSONL logs written
before the trackers are sent a line. WANDB_MODE=offline and the other WANDB_* variables work as usual, but for what
the run sets itself: WANDB_PROJECT, WANDB_NAME, WANDB_RUN_ID, WANDB_RESUME and WANDB_DIR give way to --wandb-project,
--wandb-run-name, the kept id and the output directory.

With --tensorboard-dir D (optional: `pip install tensorboard`), global rank 0 writes the same lines as TensorBoard
scalars (eval/<key> for the evaluations; numbers only), against the iteration, and the tables as text, flushed after
each line. A resumed run purges what the dead run wrote after its checkpoint's iteration (the iterations it repeats);
a fresh run purges every earlier event in D.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import secrets
import sys
from typing import TYPE_CHECKING

from engine.config import json_line
from engine.distributed import print0, rank0_together
from engine.durable import append, atomic_write
from engine.errors import InvalidInput, MissingPackage, UnwritableOutput, first_line
from engine.output_dir import why_unwritable
from engine.resume import WANDB_RUN_ID

if TYPE_CHECKING:
    from engine.state import TrainState

ITERATION = "iteration"  # the x-axis of every chart (W&B's step metric)


def check_available(run, rank: int) -> None:
    """With a W&B project, rank 0 must be able to import wandb and W&B be able to start (_why_wandb_cannot_start),
    and with a TensorBoard directory torch's TensorBoard writer (the tensorboard package) and write in that directory
    (made now: a file of its name, or one it cannot be made under, is named before anything is loaded, not by the
    writer's traceback after setup); every rank raises together if it cannot, or if anything else fails there (an
    import failing otherwise than as missing, say protobuf's TypeError: none is left waiting for rank 0)."""
    if run.wandb_project or run.tensorboard_dir:  # (every rank alike; none asked for: no collective)
        rank0_together("checking the trackers", rank, _check_available, run)


def _check_available(run) -> None:
    """check_available on global rank 0: raises what stops a tracker from starting."""
    for flag, value, package, module in (("--wandb-project", run.wandb_project, "wandb", "wandb"),
                                         ("--tensorboard-dir", run.tensorboard_dir, "tensorboard",
                                          "torch.utils.tensorboard")):  # fmt: skip
        if value:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise MissingPackage(
                    f"{flag} {value} needs the {package} package (pip install -e '.[{package}]' in the checkout, the "
                    f"version the project is tested with; or pip install {package}): {e}"
                ) from e
    if run.wandb_project and (why := _why_wandb_cannot_start(run.wandb_project) or _log_in_to_wandb()):
        raise InvalidInput(f"--wandb-project {run.wandb_project}: {why}")  # (W&B's prompt only where it can start)
    if run.tensorboard_dir and (why := why_unwritable(run.tensorboard_dir)):
        raise UnwritableOutput(f"--tensorboard-dir {run.tensorboard_dir}: cannot write there: {why}")


def _why_wandb_cannot_start(project: str) -> str | None:
    """Why wandb.init would fail at once, where that can be told now (before minutes of loading) without a prompt or
    the network: a project name W&B refuses (team/project: the entity is WANDB_ENTITY), W&B's own settings it refuses
    (WANDB_MODE=ofline, say), or the online mode with no credentials in reach (WANDB_API_KEY, an identity token file,
    an api_key setting, a .netrc: `wandb login`'s) and no terminal to ask for them on. None otherwise, and where this
    wandb's settings cannot be read so (wandb.init then says what fails)."""
    import wandb

    if not hasattr(wandb, "setup"):
        return None
    try:
        wandb.Settings(project=project)
    except getattr(getattr(wandb, "errors", None), "Error", ()) as e:
        return f"{first_line(e)} (a project's name alone: its entity, a team say, is WANDB_ENTITY)"
    try:
        settings = wandb.setup().settings
    except (ValueError, getattr(getattr(wandb, "errors", None), "Error", ())) as e:  # (pydantic's: one line of its)
        lines = [x.strip() for x in str(e).splitlines() if x.strip() and "errors.pydantic.dev" not in x]
        return f"W&B refuses its settings: {'; '.join(lines) or type(e).__name__}"
    if _wandb_has_credentials(settings) is not False or _terminal():
        return None
    return (
        f"W&B is not logged in and its mode is {settings.mode} (no WANDB_API_KEY, no `wandb login` key in "
        f"{_netrcs()[0]}, no terminal to ask for one): log in first, or set WANDB_MODE=offline (`wandb sync` uploads "
        "the run later) or WANDB_MODE=disabled"
    )


def _log_in_to_wandb() -> str | None:
    """Online W&B with no credentials in reach but a terminal to ask on (_why_wandb_cannot_start let it through): W&B's
    own login prompt now, on global rank 0, rather than from wandb.init once minutes of loading are done (the key it
    is given is kept where `wandb login` keeps it; not checked over the network, which wandb.init needs anyway). Why it
    did not log in, or None."""
    import wandb

    if not hasattr(wandb, "setup") or _wandb_has_credentials(wandb.setup().settings) is not False:
        return None
    try:
        logged_in = wandb.login(verify=False)
    except getattr(getattr(wandb, "errors", None), "Error", ()) as e:
        return f"W&B's login failed: {first_line(e)}"
    return None if logged_in else "W&B's login did not complete: run `wandb login`, or set WANDB_MODE=offline"


def _wandb_has_credentials(settings) -> bool | None:
    """Whether W&B can start without asking for a key: offline or disabled, or a key in reach (WANDB_API_KEY, an
    identity token file, an api_key setting, a .netrc: `wandb login`'s). None where this wandb's settings cannot be
    read so."""
    try:
        offline = settings._offline or settings._noop
        keys = [settings.api_key, getattr(settings, "identity_token_file", None)]
    except AttributeError:
        return None
    keys += [os.environ.get("WANDB_API_KEY"), os.environ.get("WANDB_IDENTITY_TOKEN_FILE")]
    return bool(offline or any(keys) or any(os.path.isfile(f) for f in _netrcs()))


def _netrcs() -> list[str]:
    """Where `wandb login` keeps a key: NETRC's file alone where it is set, else ~/.netrc and ~/_netrc."""
    netrc = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    return [netrc] if os.environ.get("NETRC") else [netrc, os.path.expanduser("~/_netrc")]


def _terminal() -> bool:
    """A terminal to type on and to show a prompt on."""
    return sys.stdin is not None and sys.stdin.isatty() and sys.stderr is not None and sys.stderr.isatty()


class Tracker:
    """Sends metrics to a W&B run and/or TensorBoard event files on global rank 0; does nothing elsewhere or without
    either."""

    def __init__(self, state: TrainState):
        run = state.run
        self.wandb = self.tensorboard = None
        self.tensorboard_dir, self.stopped = run.tensorboard_dir, set()  # (stopped: the trackers that failed)
        if run.tensorboard_dir or run.wandb_project:  # (every rank alike; none to start: no collective)
            # on rank 0; W&B refusing its key, no network: every rank stops at once, none waits for rank 0 in the
            # first evaluation or rollout
            rank0_together("starting the trackers", state.grid.rank, self._start, state)

    def _start(self, state: TrainState) -> None:
        run = state.run
        if run.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # a fresh run hides every earlier event in the directory, a resumed one those after its checkpoint (the
            # dead run's iterations it repeats); an evaluation alone adds its line without hiding anything
            purge = None if run.eval_only else state.iteration + 1 if state.iteration else 0
            self.tensorboard = SummaryWriter(run.tensorboard_dir, purge_step=purge)
        if run.wandb_project:
            try:
                self._init_wandb(state)
            except BaseException:  # (W&B could not start: the writer opened above is closed, its events flushed)
                self.finish(failed=True)
                raise

    def _init_wandb(self, state: TrainState) -> None:
        run = state.run
        import wandb

        os.makedirs(run.output_dir, exist_ok=True)
        id_file = os.path.join(run.output_dir, WANDB_RUN_ID)
        resumed = os.path.exists(id_file)  # (a fresh run has had the file removed)
        if resumed:
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(6)  # W&B ids: letters and digits, unique within the project
            atomic_write(id_file, lambda f: f.write(run_id.encode() + b"\n"))  # (never an empty id after a crash)
        # (a resumed run keeps the name it has unless given one: --wandb-run-name is not a setting a resume restores)
        name = run.wandb_run_name or (None if resumed else os.path.basename(os.path.normpath(run.output_dir)))
        config = {"ppo": dataclasses.asdict(state.cfg), "run": dataclasses.asdict(run), "world": state.grid.world_size}
        kw = {"id": run_id, "resume": "allow"}
        if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "dryrun"):
            # offline, W&B cannot continue a run: a later launch of the same id, synced, replaces the earlier one's
            # history (wandb/wandb#4624, #5865). Each launch is a run of its own, in a group of the kept id.
            kw = {"id": run_id if not resumed else secrets.token_hex(6), "group": run_id}
            name = name or os.path.basename(os.path.normpath(run.output_dir))
            if resumed:
                print0(f"W&B is offline, where it cannot continue run {run_id}: this launch logs as run {kw['id']} of "
                       f"group {run_id} (`wandb sync` each; online, --resume continues {run_id} itself)")  # fmt: skip
        try:
            wandb.init(project=run.wandb_project, name=name, config=config, dir=run.output_dir, **kw)
        except getattr(getattr(wandb, "errors", None), "Error", ()) as e:  # (wandb's: a key refused, no network)
            raise InvalidInput(
                f"--wandb-project {run.wandb_project}: W&B could not start the run: {first_line(e)}"
            ) from e
        # Charts against the run's iteration, logged as a metric: W&B's own step only grows, so the iterations that a
        # run resumed after a crash repeats are kept beside the dead run's (at steps W&B had seen they'd be dropped)
        wandb.define_metric(ITERATION)
        wandb.define_metric("*", step_metric=ITERATION)
        self.wandb = wandb

    def log(self, metrics: dict, *, prefix: str = "") -> None:
        """A line of metrics.jsonl or eval.jsonl (written first: the trackers are copies of it)."""
        step = metrics[ITERATION]

        def scalars(writer):
            for k, v in metrics.items():  # (numbers: an evaluation's set digest and decoding flags are not charts)
                if k != ITERATION and isinstance(v, (int, float)) and not isinstance(v, bool):
                    writer.add_scalar(prefix + k, v, global_step=step)
            writer.flush()

        self._send("tensorboard", step, scalars)
        self._send("wandb", step, lambda w: w.log({**{prefix + k: v for k, v in metrics.items() if k != ITERATION},
                                                   ITERATION: step}))  # fmt: skip

    def log_table(self, key: str, records: list[dict], step: int) -> None:
        """Records (dicts with the same keys: sampled answers) as a W&B table, and as TensorBoard text, at `step`."""
        if not records:
            return

        def text(writer):  # (a JSON record a paragraph, as code: markdown would eat prompts' marks)
            writer.add_text(key, "\n\n".join("    " + json.dumps(r, ensure_ascii=False) for r in records), step)
            writer.flush()

        def table(w):
            columns = list(records[0])
            w.log({key: w.Table(columns=columns, data=[[r.get(c) for c in columns] for r in records]), ITERATION: step})

        self._send("tensorboard", step, text)
        self._send("wandb", step, table)

    def _send(self, which: str, step: int, send) -> None:
        """send(the tracker) where it runs; a tracker that fails (W&B's network, a full disk under --tensorboard-dir)
        is said and sent nothing more this run, and the run goes on: the JSONL logs, written before, hold every line
        (a tracker's failure stopped the run, whatever it had trained since its last checkpoint lost)."""
        tracker = getattr(self, which)
        if tracker is None or which in self.stopped:
            return
        try:
            send(tracker)
        except Exception as e:
            self.stopped.add(which)  # (the W&B run is still ended as the run ends: finish)
            name = "W&B" if which == "wandb" else f"TensorBoard ({self.tensorboard_dir})"
            print0(f"warning: {name} failed at iteration {step} ({type(e).__name__}: {first_line(e)}): nothing more "
                   f"is sent to it this run; metrics.jsonl, eval.jsonl and samples.jsonl hold every line")  # fmt: skip
            if which == "tensorboard":
                self.tensorboard = None
                with contextlib.suppress(Exception):
                    tracker.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(failed=exc_type is not None)

    def finish(self, failed: bool = False) -> None:
        """Close the TensorBoard writer and end the W&B run (marked failed when the training loop raised, or when the
        writer could not close). Either failing (a full disk, W&B's last upload) is said, not raised: the run's own
        outcome, its checkpoints and JSONL logs, stands (a finished run does not end in an error, nor is the loop's
        own error hidden)."""
        writer, self.tensorboard, run, self.wandb = self.tensorboard, None, self.wandb, None
        if writer is not None:
            try:
                writer.close()
            except Exception as e:
                failed = True  # (the W&B run is marked failed too: the events the writer held are lost)
                why = f"{type(e).__name__}: {first_line(e)}"
                print0(f"warning: TensorBoard ({self.tensorboard_dir}) failed to close: {why}")
        if run is not None:
            try:
                run.finish(exit_code=1 if failed else 0)
            except Exception as e:
                print0(f"warning: W&B failed to end the run: {type(e).__name__}: {first_line(e)}")


def log_metrics(state: TrainState, metrics: dict, per_iteration: float | None = None) -> None:
    """Record an iteration's metrics (history; rank 0: the trackers, the printed line, metrics.jsonl); `per_iteration`:
    the loop's wall time per iteration so far, for the ETA. A failure on rank 0 (a full disk) stops every rank at once
    (rank0_together: one small all-reduce per iteration), none left waiting for it in the next rollout."""
    state.history.append(metrics)
    rank0_together("logging the iteration's metrics", state.grid.rank, _write_metrics, state, metrics, per_iteration)


def _all_ranks(state: TrainState) -> str:
    """The tok/s a line prints are the whole run's (every DP rank's tokens): said where there are several ranks."""
    n = state.grid.world_size
    return f"tok/s of all {n} ranks; " if n > 1 else ""


def _write_metrics(state: TrainState, metrics: dict, per_iteration: float | None) -> None:
    """log_metrics on global rank 0: the printed line, metrics.jsonl, then the trackers (copies of it)."""
    keys = ("score", "kl", "reward", "policy_loss", "value_loss", "clip_frac", "entropy", "response_len")
    keys = keys[:2] + ("kl_coef",) + keys[2:] if state.cfg.kl_target else keys
    line = " ".join(f"{k} {metrics[k]:.4g}" for k in keys)
    print0(
        f"iter {metrics['iteration']}/{state.iterations} step {metrics['step']} {line} "
        f"no_eos {metrics['no_eos_frac']:.2f} gen {metrics['gen_tok_s']:.0f} tok/s "
        f"train {metrics['train_tok_s']:.0f} tok/s ({_all_ranks(state)}{metrics['train_tflops_gpu']:.3g} TFLOP/s per "
        "GPU) "
        f"time {metrics['time_iteration']:.1f}s "
        f"(gen {metrics['time_generate']:.1f} score {metrics['time_score']:.1f} train {metrics['time_train']:.1f}) "
        f"eta {_eta(state, per_iteration)}"
    )
    os.makedirs(state.run.output_dir, exist_ok=True)
    append(os.path.join(state.run.output_dir, "metrics.jsonl"), json_line(metrics))
    if state.tracker is not None:
        state.tracker.log(metrics)


def _eta(state: TrainState, per_iteration: float | None = None) -> str:
    """The time the run's remaining iterations take at this process's mean so far, as 1h02m: the loop's wall time per
    iteration (`per_iteration`: the evaluations, checkpoints and logs between iterations included, which the remaining
    ones have too), else the iterations' own time_iteration."""
    if per_iteration is None:
        per_iteration = sum(m["time_iteration"] for m in state.history) / len(state.history)
    seconds = per_iteration * (state.iterations - state.iteration)
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
