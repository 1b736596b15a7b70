"""Weights & Biases tracking (engine/tracking.py): what the trainer sends, through a recording stand-in for the wandb
module (always), and through the real package in offline mode (where it is installed)."""

import dataclasses
import json
import os
import sys
import types

import pytest

from engine import state as state_mod
from engine.config import PPOConfig
from engine.parallel import ProcessGrid
from engine.state import RunConfig
from kernels import dispatch
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


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"--wandb-project p needs the wandb package \(pip install wandb\)"):
        run_tiny(tmp_path, "--max-iterations", "1", "--wandb-project", "p")


def test_real_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_tiny(tmp_path, "--max-iterations", "1", "--wandb-project", "p")
    run_tiny(tmp_path, "--max-iterations", "2", "--wandb-project", "p", "--resume")
    run_id = (tmp_path / "wandb-run-id").read_text().strip()
    runs = sorted(d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-"))
    assert len(runs) == 2 and all(d.endswith(run_id) for d in runs)  # one W&B run, continued


def test_eval_only_goes_to_wandb_too(tmp_path, monkeypatch):
    from engine.tokenizer import TINY_EVAL_PROMPTS
    from engine.train_ppo import main

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_tiny(tmp_path / "run", "--max-iterations", "1")
    fake.calls.clear()
    init = tmp_path / "run/init"
    with dispatch.reference_ops():
        main(["--eval-only", "--policy", str(init / "policy"), "--reward", str(init / "reward"), "--eval-prompts",
              TINY_EVAL_PROMPTS, "--output-dir", str(tmp_path / "only"), "--wandb-project", "p"])  # fmt: skip
    (kind, init_kw), (_, step, data), (_, _, table), finish = fake.calls
    assert kind == "init" and init_kw["name"] == "only" and finish == ("finish", 0)
    assert step == 0 and data["eval/prompts"] == 16 and len(table["eval/answers"].data) == 16


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
    assert fake.calls[0][1]["name"] == "out"
