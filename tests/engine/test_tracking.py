"""Weights & Biases and TensorBoard tracking (engine/tracking.py): what the trainer sends, through recording stand-ins
for the wandb module and torch's SummaryWriter (always), through the real wandb package in offline mode (where it is
installed), and the real TensorBoard event files read back."""

import dataclasses
import io
import json
import os
import sys
import types

import pytest

from engine import evaluate
from engine import state as state_mod
from engine.config import PPOConfig
from engine.distributed import ProcessGrid
from engine.state import RunConfig
from kernels import dispatch
from tests.engine.ranks import init_gloo, leave, outcome
from tests.engine.runs import run_tiny


class FakeWandb(types.ModuleType):
    """Records init / log / finish as the trainer calls them."""

    def __init__(self):
        super().__init__("wandb")
        self.calls, self.metrics = [], {}

    def init(self, **kw):
        self.calls.append(("init", kw))
        return object()

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, data, step=None):  # recorded as (iteration, the rest): the trainer charts against the iteration
        assert step is None, "an explicit W&B step drops a resumed run's repeated iterations"
        data = dict(data)
        self.calls.append(("log", data.pop("iteration"), data))

    def finish(self, exit_code=None):
        self.calls.append(("finish", exit_code))


def test_metrics_and_evaluations_go_to_the_wandb_run_and_a_resume_continues_it(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    history = run_tiny(tmp_path / "run", "--max-iterations", "2", "--eval-every", "2", "--wandb-project", "p")
    (kind, init), *logs, finish = fake.calls
    assert kind == "init" and finish == ("finish", 0)
    assert fake.metrics == {"iteration": None, "*": "iteration"}  # every chart against the iteration
    tables = [c for c in logs if any(isinstance(v, FakeWandb.Table) for v in c[2].values())]
    logs = [c for c in logs if c not in tables]
    assert [(step, list(data)) for _, step, data in tables] == [(0, ["eval/answers"]), (1, ["samples"]),
                                                                 (2, ["samples"]), (2, ["eval/answers"])]  # fmt: skip
    answers = tables[-1][2]["eval/answers"]
    assert len(answers.data) == 16 and answers.columns[:2] == ["prompt", "response"]
    assert not any(c.endswith("_ids") for t in tables for c in next(iter(t[2].values())).columns)  # (the text shown)
    assert [row[answers.columns.index("prompt_index")] for row in answers.data] == list(range(16))
    assert tables[1][2]["samples"].columns[0] == "iteration" and len(tables[1][2]["samples"].data) == 2
    run_id = (tmp_path / "run/wandb-run-id").read_text().strip()
    assert init["project"] == "p" and init["name"] == "run" and init["id"] == run_id and init["resume"] == "allow"
    assert init["config"]["ppo"]["kl_coef"] == 0.05 and init["config"]["run"]["wandb_project"] == "p"
    assert [(c[1], "eval/score" in c[2]) for c in logs] == [(0, True), (1, False), (2, False), (2, True)]
    assert logs[1][2] == {k: v for k, v in history[0].items() if k != "iteration"}
    evals = [json.loads(x) for x in (tmp_path / "run/eval.jsonl").read_text().splitlines()]
    assert logs[3][2]["eval/score"] == evals[-1]["score"]

    fake.calls.clear()
    run_tiny(tmp_path / "run", "--max-iterations", "3", "--wandb-project", "p", "--resume")
    assert fake.calls[0][1]["id"] == run_id  # the same W&B run
    assert [c[1] for c in fake.calls if c[0] == "log"] == [3, 3, 3, 3]  # iteration 3 (+ samples), its evaluation (+)

    fake.calls.clear()
    run_tiny(tmp_path / "run", "--max-iterations", "1", "--wandb-project", "p", "--overwrite-output-dir")
    assert fake.calls[0][1]["id"] != run_id  # starting over starts a new W&B run


def test_a_failing_run_is_marked_failed(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)

    def factory(policy, cfg, run):
        gen = state_mod.make_generator(policy, cfg, run)
        gen.generate_completions = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        return gen

    with pytest.raises(RuntimeError, match="boom"):
        run_tiny(tmp_path, "--max-iterations", "1", "--wandb-project", "p", factory=factory)
    assert fake.calls[-1] == ("finish", 1)


def test_a_tracker_failing_mid_run_is_said_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """W&B's log raising at iteration 2 (its network) stopped every rank with no checkpoint since the start (the
    default saves at the end) and metrics.jsonl a line short (the tracker was sent the line before it was written).
    Now the line is written first, the failure is said once, nothing more goes to W&B, the run ends as it would have;
    TensorBoard failing on its own goes on with W&B."""
    fake = _fake_trackers(monkeypatch)
    real = FakeWandb.log

    def log(self, data, step=None):
        if data.get("iteration") == 2 and "score" in data:
            raise ConnectionError("wandb.ai unreachable")
        real(self, data, step)

    monkeypatch.setattr(FakeWandb, "log", log)
    history = run_tiny(tmp_path / "run", "--max-iterations", "3", "--wandb-project", "p")
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2, 3] and len(history) == 3
    assert (tmp_path / "run/checkpoint-000003").is_dir()
    out = capsys.readouterr().out
    assert (
        out.count("warning: W&B failed") == 1
        and (
            "warning: W&B failed at iteration 2 (ConnectionError: wandb.ai "
            "unreachable): nothing more is sent to it this run"
        )
        in out
    )
    # (the evaluation before training, iteration 1, iteration 2's samples table before its line failed; no more)
    assert [c[1] for c in fake.calls if c[0] == "log"] == [0, 0, 1, 1, 2] and fake.calls[-1] == ("finish", 0)

    def add_scalar(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FakeWandb, "log", real)
    monkeypatch.setattr(FakeSummaryWriter, "add_scalar", add_scalar, raising=False)
    fake.calls.clear()
    run_tiny(tmp_path / "tb-run", "--max-iterations", "2", "--wandb-project", "p", "--tensorboard-dir",
             str(tmp_path / "tb"))  # fmt: skip
    assert "warning: TensorBoard (" in capsys.readouterr().out
    assert [c[1] for c in fake.calls if c[0] == "log" and "score" in c[2]] == [1, 2]  # (W&B goes on)


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    match = r"--wandb-project p needs the wandb package \(pip install -e '\.\[wandb\]' in the checkout"
    with pytest.raises(ImportError, match=match):  # (the README's install of the extra, its tested version)
        run_tiny(tmp_path, "--max-iterations", "1", "--wandb-project", "p")


def test_real_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_tiny(tmp_path, "--max-iterations", "1", "--wandb-project", "p")
    run_tiny(tmp_path, "--max-iterations", "2", "--wandb-project", "p", "--resume")
    run_id = (tmp_path / "wandb-run-id").read_text().strip()
    runs = sorted(d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-"))
    # offline-run-<time>-<id>: the first launch as the kept id, the resumed one as a run of its own (offline, W&B
    # cannot continue a run: a second launch of one id, synced, replaces the first one's history)
    assert len(runs) == 2 and sorted(d.split("-")[3] == run_id for d in runs) == [False, True], runs


def test_offline_each_launch_is_a_run_of_its_own_in_one_group(tmp_path, monkeypatch, capsys):
    """Offline, a resumed launch used the kept id, which W&B cannot continue: it recorded the run as new, its steps
    from 0 again, and `wandb sync` of it replaced the first launch's history. Now each offline launch logs as a run
    of its own, named alike, in a group of the kept id; online, a resume still continues the kept id."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_tiny(tmp_path / "run", "--max-iterations", "1", "--wandb-project", "p")
    run_id = (tmp_path / "run/wandb-run-id").read_text().strip()
    run_tiny(tmp_path / "run", "--max-iterations", "2", "--wandb-project", "p", "--resume")
    first, second = [c[1] for c in fake.calls if c[0] == "init"]
    assert (first["id"], first["group"], first["name"]) == (run_id, run_id, "run")
    assert second["id"] != run_id and (second["group"], second["name"]) == (run_id, "run") and "resume" not in second
    said = f"W&B is offline, where it cannot continue run {run_id}: this launch logs as run {second['id']} of group"
    assert said in capsys.readouterr().out
    monkeypatch.setenv("WANDB_MODE", "online")
    fake.calls.clear()
    run_tiny(tmp_path / "run", "--max-iterations", "3", "--wandb-project", "p", "--resume")
    (init,) = [c[1] for c in fake.calls if c[0] == "init"]
    assert (init["id"], init["resume"]) == (run_id, "allow") and "group" not in init


def _no_wandb_key(monkeypatch, tmp_path) -> None:
    """No W&B key in reach: none in the environment, no ~/.netrc, ~/_netrc or settings file (HOME and NETRC in
    tmp_path, which the test may fill), no W&B settings in the working directory."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_CONFIG_DIR", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("mode, why", [("online", "W&B is not logged in"), ("ofline", "W&B refuses its settings")])
def test_wandb_that_cannot_start_is_refused_before_any_model_is_loaded(tmp_path, monkeypatch, mode, why):
    """W&B online with no API key anywhere (WANDB_API_KEY, an identity token, a .netrc, a settings file) and no
    terminal to ask for one, or a WANDB_MODE that wandb refuses: an input error naming it before anything is loaded,
    not wandb.init's traceback once every model has been."""
    wandb = pytest.importorskip("wandb")

    _no_wandb_key(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # (no terminal to ask on)
    _refused_before_loading(wandb, tmp_path / "run", "p", rf"--wandb-project p: {why}")


def test_what_lets_wandb_start_without_a_key(tmp_path, monkeypatch):
    """_why_wandb_cannot_start: online with no key in reach and no terminal is refused; the offline and disabled modes,
    WANDB_API_KEY, a .netrc where NETRC names it (only there: ~/_netrc is not read then), ~/_netrc without NETRC and a
    terminal to ask on each let W&B start. A WANDB_MODE that W&B refuses is said in one line, without pydantic's
    links."""
    wandb = pytest.importorskip("wandb")
    from engine.tracking import _why_wandb_cannot_start

    _no_wandb_key(monkeypatch, tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO())

    def why(mode, **env):
        monkeypatch.setenv("WANDB_MODE", mode)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        wandb.teardown()
        try:
            return _why_wandb_cannot_start("p")
        finally:
            wandb.teardown()
            for k in env:
                monkeypatch.delenv(k)

    (tmp_path / "_netrc").write_text("machine api.wandb.ai login user password " + "x" * 40 + "\n")
    assert why("online").startswith("W&B is not logged in and its mode is online")
    assert why("offline") is None and why("disabled") is None
    assert why("online", WANDB_API_KEY="x" * 40) is None
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "x" * 40 + "\n")
    assert why("online") is None
    (tmp_path / "netrc").unlink()
    monkeypatch.delenv("NETRC")  # (unset: ~/.netrc or ~/_netrc, where `wandb login` writes on Windows)
    assert why("online") is None
    (tmp_path / "_netrc").unlink()
    assert why("online").startswith("W&B is not logged in and its mode is online")
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(isatty=lambda: True))
    assert why("online") is not None  # (a terminal to type on, but none shown the prompt: stderr redirected)
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: True))
    assert why("online") is None
    refused = why("ofline")
    assert refused.startswith("W&B refuses its settings: ") and "\n" not in refused and "pydantic.dev" not in refused


def test_wandb_asks_for_its_key_before_anything_is_loaded(tmp_path, monkeypatch):
    """Online W&B with no key in reach but a terminal: W&B's own login prompt comes from check_available (global rank 0,
    before any model is loaded), not from wandb.init once they all are; not with a key in reach, offline, or on another
    rank. A login that does not complete is an input error naming it."""
    wandb = pytest.importorskip("wandb")
    from engine.errors import InvalidInput
    from engine.tracking import check_available

    _no_wandb_key(monkeypatch, tmp_path)
    tty = types.SimpleNamespace(isatty=lambda: True)
    monkeypatch.setattr(sys, "stdin", tty)
    monkeypatch.setattr(sys, "stderr", tty)
    logins, answer = [], [True]
    monkeypatch.setattr(wandb, "login", lambda **kw: logins.append(kw) or answer[0])
    run = RunConfig(output_dir=str(tmp_path / "out"), wandb_project="p")

    def check(rank, mode="online", **env):
        monkeypatch.setenv("WANDB_MODE", mode)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        wandb.teardown()
        try:
            check_available(run, rank)
        finally:
            wandb.teardown()
            for k in env:
                monkeypatch.delenv(k)
        return len(logins)

    assert check(1) == 0 and check(0) == 1 and logins == [{"verify": False}]  # (no network: a compute node)
    assert check(0, WANDB_API_KEY="x" * 40) == 1 and check(0, "offline") == 1
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "x" * 40 + "\n")
    assert check(0) == 1
    (tmp_path / "netrc").unlink()
    answer[0] = False
    with pytest.raises(InvalidInput, match="^--wandb-project p: W&B's login did not complete: run `wandb login`"):
        check(0)


def _refused_before_loading(wandb, out, project: str, match: str) -> None:
    """The tiny default with --wandb-project `project` is an input error matching `match`, raised before anything ran
    (W&B's settings read afresh from the environment, and forgotten after)."""
    from engine.errors import InputError

    wandb.teardown()
    try:
        with pytest.raises(InputError, match=match):
            run_tiny(out, "--max-iterations", "1", "--wandb-project", project)
    finally:
        wandb.teardown()
    assert not (out / "launches.jsonl").exists()


def test_a_wandb_project_name_wandb_refuses_is_refused_before_any_model_is_loaded(tmp_path, monkeypatch):
    """--wandb-project team/project (the entity is WANDB_ENTITY) or another name W&B refuses: an input error naming
    it before anything is loaded, not wandb.init's traceback once every model has been."""
    wandb = pytest.importorskip("wandb")

    monkeypatch.setenv("WANDB_MODE", "offline")
    _refused_before_loading(
        wandb, tmp_path / "run", "team/p", r"--wandb-project team/p: .*Invalid project name .*WANDB_ENTITY"
    )


def test_wandb_failing_to_start_ends_in_one_line(tmp_path, monkeypatch):
    """wandb.init's own failure (a key the server refuses, no network: wandb's errors) is an input error naming the
    flag and W&B's message in one line, not a traceback; any other exception stays the engine's fault."""
    from engine.errors import InputError
    from engine.tracking import Tracker

    fake = FakeWandb()
    fake.errors = types.SimpleNamespace(Error=type("Error", (Exception,), {}))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = RunConfig(output_dir=str(tmp_path / "out"), wandb_project="p")
    state = types.SimpleNamespace(run=run, cfg=PPOConfig(), grid=ProcessGrid(), iteration=0)
    timeout = fake.errors.Error("Run initialization has timed out after 90.0 sec.\nPlease try again.")
    fake.init = lambda **kw: (_ for _ in ()).throw(timeout)
    with pytest.raises(InputError, match="^--wandb-project p: W&B could not start the run: Run initialization has "
                       "timed out after 90.0 sec.$"):  # fmt: skip
        Tracker(state)
    fake.init = lambda **kw: (_ for _ in ()).throw(KeyError("x"))
    with pytest.raises(KeyError):
        Tracker(state)
    tensorboard = types.ModuleType("torch.utils.tensorboard")  # (a writer opened before: closed, its events kept)
    tensorboard.SummaryWriter, FakeSummaryWriter.writers = FakeSummaryWriter, []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    state.run = dataclasses.replace(run, tensorboard_dir=str(tmp_path / "tb"))
    with pytest.raises(KeyError):
        Tracker(state)
    assert FakeSummaryWriter.writers[0].calls == [("close",)]


def _fake_trackers(monkeypatch) -> "FakeWandb":
    """Stand-ins for wandb and TensorBoard's SummaryWriter (its writers listed afresh); returns the fake wandb."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = FakeSummaryWriter
    FakeSummaryWriter.writers = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    return fake


def test_a_writer_that_fails_to_close_neither_skips_the_wandb_end_nor_hides_the_runs_error(
    tmp_path, monkeypatch, capsys
):
    """The TensorBoard writer's close failing (a full disk): the W&B run still ends, marked failed, and the loop's own
    error is the one raised; without one, the run's outcome stands (its checkpoints and JSONL logs are written): the
    failure is said, not raised, and so is W&B's own failing to end the run."""
    from engine.tracking import Tracker

    fake = _fake_trackers(monkeypatch)

    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FakeSummaryWriter, "close", full, raising=False)
    run = RunConfig(output_dir=str(tmp_path / "out"), wandb_project="p", tensorboard_dir=str(tmp_path / "tb"))
    state = types.SimpleNamespace(run=run, cfg=PPOConfig(), grid=ProcessGrid(), iteration=0)
    with pytest.raises(ValueError, match="the loop's"), Tracker(state):
        raise ValueError("the loop's")
    assert fake.calls[-1] == ("finish", 1)
    with Tracker(state):
        pass
    assert fake.calls[-1] == ("finish", 1)
    said = capsys.readouterr().out.splitlines()[-1]
    assert (
        said == f"warning: TensorBoard ({tmp_path / 'tb'}) failed to close: OSError: [Errno 28] No space left on device"
    )
    monkeypatch.setattr(FakeSummaryWriter, "close", lambda self: None, raising=False)
    monkeypatch.setattr(FakeWandb, "finish", lambda self, exit_code=None: (_ for _ in ()).throw(ConnectionError("x")))
    with Tracker(state):
        pass
    assert capsys.readouterr().out.splitlines()[-1] == "warning: W&B failed to end the run: ConnectionError: x"


def test_eval_only_goes_to_wandb_and_tensorboard_too(tmp_path, monkeypatch):
    from engine.tokenizer import TINY_EVAL_PROMPTS
    from engine.train_ppo import main

    fake = _fake_trackers(monkeypatch)
    run_tiny(tmp_path / "run", "--max-iterations", "1")
    fake.calls.clear()
    init = tmp_path / "run/init"
    with dispatch.reference_ops():
        main(["--eval-only", "--policy", str(init / "policy"), "--reward", str(init / "reward"), "--eval-prompts",
              TINY_EVAL_PROMPTS, "--output-dir", str(tmp_path / "only"), "--wandb-project", "p",
              "--tensorboard-dir", str(tmp_path / "tb")])  # fmt: skip
    (kind, init_kw), (_, step, data), (_, _, table), finish = fake.calls
    assert kind == "init" and init_kw["name"] == "only" and finish == ("finish", 0)
    assert step == 0 and data["eval/prompts"] == 16 and len(table["eval/answers"].data) == 16
    (w,) = FakeSummaryWriter.writers
    assert w.purge_step is None  # (an evaluation alone hides nothing of the run's events)
    assert ("scalar", "eval/prompts", 0, 16) in w.calls


def test_wandb_run_name_is_used(tmp_path, monkeypatch):
    from engine.tracking import Tracker

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = RunConfig(output_dir=str(tmp_path / "out"), wandb_project="p", wandb_run_name="my-run")
    Tracker(types.SimpleNamespace(run=run, cfg=PPOConfig(), grid=ProcessGrid()))
    (kind, init), *_ = fake.calls
    assert kind == "init" and init["name"] == "my-run"
    fake.calls.clear()
    Tracker(types.SimpleNamespace(run=dataclasses.replace(run, wandb_run_name=""), cfg=PPOConfig(), grid=ProcessGrid()))
    assert fake.calls[0][1]["name"] is None  # (the run resumed, its id kept: W&B keeps the name it has, my-run)
    fake.calls.clear()
    os.remove(tmp_path / "out/wandb-run-id")  # (a fresh run: the output directory's name)
    Tracker(types.SimpleNamespace(run=dataclasses.replace(run, wandb_run_name=""), cfg=PPOConfig(), grid=ProcessGrid()))
    assert fake.calls[0][1]["name"] == "out"


class FakeSummaryWriter:
    """Records what the trainer writes (torch.utils.tensorboard.SummaryWriter's methods it calls)."""

    writers: list = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.calls = log_dir, purge_step, []
        FakeSummaryWriter.writers.append(self)

    def add_scalar(self, tag, value, global_step=None):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (tag, value)
        self.calls.append(("scalar", tag, global_step, value))

    def add_text(self, tag, text, global_step=None):
        self.calls.append(("text", tag, global_step, text))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


def test_metrics_and_evaluations_go_to_tensorboard_and_a_resume_purges_what_it_repeats(tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    FakeSummaryWriter.writers = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    tb = str(tmp_path / "tb")
    history = run_tiny(tmp_path / "run", "--max-iterations", "2", "--eval-every", "2", "--tensorboard-dir", tb)
    (w,) = FakeSummaryWriter.writers
    assert (w.log_dir, w.purge_step) == (tb, 0) and w.calls[-1] == ("close",)  # (a fresh run: every older event)
    scalars = {(tag, step): v for kind, *rest in w.calls if kind == "scalar" for tag, step, v in [rest]}
    for m in history:
        for k, v in m.items():
            if k != "iteration":
                assert scalars[(k, m["iteration"])] == v, k
    evals = [json.loads(x) for x in (tmp_path / "run/eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [0, 2]
    for e in evals:
        assert scalars[("eval/score", e["iteration"])] == e["score"]
        assert ("eval/eval_set", e["iteration"]) not in scalars and ("eval/eval_greedy", e["iteration"]) not in scalars
    texts = [(tag, step, text) for kind, *rest in w.calls if kind == "text" for tag, step, text in [rest]]
    assert [(tag, step) for tag, step, _ in texts] == [("eval/answers", 0), ("samples", 1), ("samples", 2),
                                                       ("eval/answers", 2)]  # fmt: skip
    first = json.loads(texts[1][2].split("\n\n")[0])  # (a record a paragraph)
    samples = [json.loads(x) for x in (tmp_path / "run/samples.jsonl").read_text().splitlines()]
    assert first == evaluate.readable(samples)[0] and "prompt_ids" in samples[0]  # (the text shown, the ids kept)
    assert w.calls.index(("flush",)) < len(w.calls) - 1  # (flushed as it goes, not only at the end)

    run_tiny(tmp_path / "run", "--max-iterations", "3", "--resume", "--tensorboard-dir", tb)
    assert FakeSummaryWriter.writers[1].purge_step == 3  # (the events past checkpoint 2: a dead run's repeats)


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # -> ImportError
    with pytest.raises(ImportError, match=r"--tensorboard-dir .*tb needs the tensorboard package"):
        run_tiny(tmp_path, "--max-iterations", "1", "--tensorboard-dir", str(tmp_path / "tb"))
    assert not (tmp_path / "metrics.jsonl").exists()  # (refused before anything ran)


@pytest.mark.parametrize("where", ["a-file", "a-file/tb"])
def test_a_tensorboard_dir_that_cannot_be_written_is_an_input_error(tmp_path, monkeypatch, where):
    """A --tensorboard-dir that names a file (or lies under one) is refused by name before any model is loaded, an
    input error (one line, exit code 2), not an OSError traceback from the writer after setup."""
    from engine.errors import InputError

    _fake_trackers(monkeypatch)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(InputError, match=rf"--tensorboard-dir {tmp_path / where}: cannot write there: "):
        run_tiny(tmp_path / "run", "--max-iterations", "1", "--tensorboard-dir", str(tmp_path / where))
    assert not (tmp_path / "run/launches.jsonl").exists()  # (refused before anything ran)
    assert FakeSummaryWriter.writers == []


def test_real_tensorboard_events_read_back(tmp_path):
    """The event files a run writes, read back with TensorBoard's own reader: every iteration's metrics once, also
    after a run that died having logged iteration 3 past its checkpoint 2 is resumed (its repeat replaces it)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = str(tmp_path / "tb")
    run_tiny(tmp_path / "run", "--max-iterations", "3", "--save-every", "2", "--keep-checkpoints", "2",
             "--tensorboard-dir", tb)  # fmt: skip
    (tmp_path / "run/latest").write_text(json.dumps({"checkpoint": "checkpoint-000002"}))  # as if it died at 3
    run_tiny(tmp_path / "run", "--max-iterations", "3", "--resume", "--tensorboard-dir", tb)
    events = EventAccumulator(tb)
    events.Reload()
    metrics = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    score = [(e.step, e.value) for e in events.Scalars("score")]
    assert score == [(m["iteration"], pytest.approx(m["score"], rel=1e-6)) for m in metrics]  # 1, 2, 3 once each
    assert [e.step for e in events.Scalars("eval/score")] == [0, 3]


def test_the_tracker_itself(tmp_path, monkeypatch):
    """engine.tracking.Tracker without a run: a rank other than 0 sends and imports nothing; the iteration is the
    x-axis, not a chart; flags and digests are no TensorBoard scalars; each line and table is flushed as it goes; a
    table's text keeps non-ASCII prompts as written; no records, no table; the W&B run is named after an output
    directory given with a trailing slash, keeps its id in a file there that a resumed Tracker reads back, and a
    failure marks it failed; a resumed TensorBoard writer hides what follows its checkpoint, an evaluation nothing."""
    from engine.tracking import Tracker, check_available

    fake = _fake_trackers(monkeypatch)
    run = RunConfig(output_dir=str(tmp_path / "out") + "/", wandb_project="p", tensorboard_dir=str(tmp_path / "tb"))

    def state(rank, iteration=0, **run_kw):
        grid = ProcessGrid(rank=rank, world_size=2, dp=2)
        return types.SimpleNamespace(run=dataclasses.replace(run, **run_kw), cfg=PPOConfig(), grid=grid,
                                     iteration=iteration)  # fmt: skip

    with Tracker(state(1)) as other:
        other.log({"iteration": 1, "score": 1.0})
        other.log_table("samples", [{"prompt": "p"}], 1)
    assert fake.calls == [] and FakeSummaryWriter.writers == []
    monkeypatch.setitem(sys.modules, "wandb", None)  # (import wandb -> ImportError)
    check_available(run, 1)  # (a rank other than 0 needs neither package)
    with pytest.raises(ImportError, match="--wandb-project p needs the wandb package"):
        check_available(run, 0)
    monkeypatch.setitem(sys.modules, "wandb", fake)

    with Tracker(state(0, iteration=2)) as t:
        (w,) = FakeSummaryWriter.writers
        assert w.purge_step == 3  # (a resume from checkpoint 2: the dead run's 3 and later are repeated)
        t.log({"iteration": 3, "score": 0.5, "eval_greedy": True, "eval_set": "ab12", "prompts": 16}, prefix="eval/")
        assert w.calls == [("scalar", "eval/score", 3, 0.5), ("scalar", "eval/prompts", 3, 16), ("flush",)]
        t.log_table("samples", [], 3)  # (nothing to show: no table)
        t.log_table("samples", [{"prompt": "héllo ✓", "score": 1.0}, {"prompt": "b", "score": 0.0}], 3)
    assert w.calls[3:] == [("text", "samples", 3, '    {"prompt": "héllo ✓", "score": 1.0}\n\n'
                            '    {"prompt": "b", "score": 0.0}'), ("flush",), ("close",)]  # fmt: skip
    (_, init), (_, step, data), (_, table_step, table), finish = fake.calls
    assert init["name"] == "out" and init["dir"] == run.output_dir and finish == ("finish", 0)
    assert (tmp_path / "out/wandb-run-id").read_text() == init["id"] + "\n"
    assert step == 3 and data == {"eval/score": 0.5, "eval/eval_greedy": True, "eval/eval_set": "ab12",
                                  "eval/prompts": 16}  # fmt: skip
    assert table_step == 3 and table["samples"].columns == ["prompt", "score"]
    assert table["samples"].data == [["héllo ✓", 1.0], ["b", 0.0]]

    fake.calls.clear()
    with pytest.raises(RuntimeError), Tracker(state(0, eval_only=True)):
        raise RuntimeError("boom")
    assert fake.calls[0][1]["id"] == init["id"] and fake.calls[-1] == ("finish", 1)
    assert FakeSummaryWriter.writers[1].purge_step is None  # (an evaluation alone hides nothing)
    Tracker(state(0)).finish()
    assert FakeSummaryWriter.writers[2].purge_step == 0  # (a fresh run: every earlier event)


def _broken_import_rank(rank, world, init_file, out_dir, tb_dir):
    import importlib

    from engine import tracking

    init_gloo(rank, world, init_file)
    real = importlib.import_module

    def import_module(name, *a, **k):  # (tensorboard's protobuf clash: a TypeError, not an ImportError)
        if name == "torch.utils.tensorboard":
            raise TypeError("Descriptors cannot be created directly")
        return real(name, *a, **k)

    tracking.importlib = types.SimpleNamespace(import_module=import_module)
    run = RunConfig(output_dir=out_dir, tensorboard_dir=tb_dir)
    got, at_once = outcome(tracking.check_available, run, rank, done="nothing")
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(got if at_once else "not at once")
    leave()


def test_any_error_checking_the_trackers_on_rank_0_stops_every_rank(tmp_path):
    """check_available's import on global rank 0 failing otherwise than as a missing package (tensorboard against a
    protobuf it cannot use raises a TypeError): rank 1 raises it too, naming rank 0, rather than waiting for rank 0
    until the timeout."""
    import torch.multiprocessing as mp

    args = (2, str(tmp_path / "init"), str(tmp_path), str(tmp_path / "tb"))
    mp.spawn(_broken_import_rank, args=args, nprocs=2, join=True)
    got = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    assert got == [
        "TypeError: Descriptors cannot be created directly",
        "RuntimeError: checking the trackers failed on rank 0: Descriptors cannot be created directly",
    ]
