"""Checkpoints and exact resume on CPU with the tiny models: the tiny default resumed exactly, stops by signal and
by the clock, crashes, durability, refused resumes, hyperparameters kept or named, resumes under DP 2 and another
layout (torchrun, gloo), and the optimizer state re-laid for another TP degree / DP size."""

import dataclasses
import fcntl
import json
import math
import os
import re
import shutil
import signal
import zipfile

import pytest
import torch

from engine import optim, ppo, trainer
from engine import state as state_mod
from engine.checkpoint import load_pretrained
from engine.config import ModelConfig, PPOConfig
from engine.distributed import ProcessGrid
from engine.errors import InvalidInput
from engine.model import Transformer
from engine.reshard import SavedOptimizer, needed_ranks, relayout
from engine.resume import latest_checkpoint, save_checkpoint
from engine.run_logs import trim_logs
from engine.train_ppo import main, parse_args, prepare_tiny
from kernels import dispatch
from tests.engine.fake_tp import FakeGroup, fake_tp
from tests.engine.ppo_dp_worker import naive_factory
from tests.engine.ranks import init_gloo, leave, outcome
from tests.engine.runs import SMALL, TIMING, no_timing, ranks_of, run_tiny, saved_weights, tiny_state, torchrun_ranks


def test_tiny_default_end_to_end_and_exact_resume(tmp_path):
    """Two iterations straight, against one iteration + checkpoint + --resume + one more."""
    straight = run_tiny(tmp_path / "a", "--max-iterations", "2")
    assert [m["iteration"] for m in straight] == [1, 2]
    assert straight[-1]["step"] == 4  # 8 sequences per rollout / 4 per step, 2 iterations
    for m in straight:
        assert all(math.isfinite(v) for v in m.values()), m
        assert 1 <= m["response_len"] <= 8 and 0 <= m["clip_frac"] <= 1
    assert straight[0]["kl"] == 0.0  # policy == reference before the first update
    # the generator's log-probs match the training pass, also after an update (it samples from the very tensors the
    # optimizer wrote: a copy would be one update behind)
    assert all(m["gen_logprob_gap"] < 1e-4 for m in straight), [m["gen_logprob_gap"] for m in straight]
    lines = (tmp_path / "a/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2]
    a = latest_checkpoint(str(tmp_path / "a"))
    assert os.path.basename(a) == "checkpoint-000002"
    assert os.path.exists(f"{a}/policy/tokenizer.json")
    trained, init = saved_weights(f"{a}/policy", "lm"), saved_weights(tmp_path / "a/init/policy", "lm")
    assert any(not torch.equal(trained[k], init[k]) for k in init)  # it learned something
    value, rm = saved_weights(f"{a}/value", "score"), saved_weights(tmp_path / "a/init/reward", "score")
    assert any(not torch.equal(value[k], rm[k]) for k in rm)

    first = run_tiny(tmp_path / "b", "--max-iterations", "1")
    second = run_tiny(tmp_path / "b", "--max-iterations", "2", "--resume")
    assert no_timing(first + second) == no_timing(straight)
    b = latest_checkpoint(str(tmp_path / "b"))
    for head, sub in (("lm", "policy"), ("score", "value")):
        wa, wb = saved_weights(f"{a}/{sub}", head), saved_weights(f"{b}/{sub}", head)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub
    sa = torch.load(f"{a}/state-rank00000.pt", weights_only=False)
    sb = torch.load(f"{b}/state-rank00000.pt", weights_only=False)
    # written without torch.save's CRC-32s (a pass over every byte that torch.load never checks), the option restored
    with zipfile.ZipFile(f"{a}/state-rank00000.pt") as z:
        assert sum(i.file_size for i in z.infolist()) > 1000 and {i.CRC for i in z.infolist()} == {0}
    assert torch.serialization.get_crc32_options()
    for k in ("exp_avg", "exp_avg_sq"):
        for i, st in sa["value_opt"]["adam"]["state"].items():
            assert torch.equal(st[k], sb["value_opt"]["adam"]["state"][i][k])
    assert not os.path.exists(tmp_path / "b/checkpoint-000001")  # keep_checkpoints=1
    assert len((tmp_path / "b/metrics.jsonl").read_text().splitlines()) == 2
    launches = [json.loads(x) for x in (tmp_path / "b/launches.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in launches] == [0, 1]  # a fresh start, then the resumed launch
    assert [x["run"]["resume"] for x in launches] == [False, True] and launches[1]["run"]["max_iterations"] == 2
    # (main's own flags, not those of the process that called it: pytest's here)
    assert [x["command"][1:3] for x in launches] == [["--output-dir", str(tmp_path / "b")]] * 2
    assert "--resume" in launches[1]["command"] and "--resume" not in launches[0]["command"]
    assert set(launches[0]["ppo"]) == {f.name for f in dataclasses.fields(PPOConfig)}  # every hyperparameter
    assert launches[0]["ppo"]["kl_coef"] == PPOConfig().kl_coef and launches[0]["ppo"]["train_batch_size"] == 4
    assert launches[0]["versions"]["torch"] == torch.__version__ and launches[0]["versions"]["engine"]
    assert all(k.startswith("TULU_") for k in launches[0]["switches"])  # (the environment's engine switches)
    assert (launches[0]["world_size"], launches[0]["tp"], launches[0]["dp"], launches[0]["dtype"]) == (
        1,
        1,
        1,
        "float32",
    )


def test_sigterm_stops_after_the_iteration_with_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch):
    """A scheduler's SIGTERM during iteration 2 of 3: the run finishes that iteration, checkpoints and returns; a
    resumed run then ends where a straight one does (weights and metrics). A second notice while that last checkpoint
    is written is the loop's too (it was the process's default action, a kill that lost the checkpoint)."""
    import engine.resume as resume_mod

    flags = ["--max-iterations", "3", "--eval-prompts", ""]  # (every generate call a rollout's)
    straight = run_tiny(tmp_path / "a", *flags)
    calls, killed = {"n": 0}, []
    write = resume_mod._save_state_file

    def second_notice(sd, fn):
        os.kill(os.getpid(), signal.SIGTERM)
        write(sd, fn)

    monkeypatch.setattr(resume_mod, "_save_state_file", second_notice)

    def outside_the_loop(signum, frame):  # (the process's own handler: not pytest's death where the loop lets go)
        killed.append(signum)

    before = signal.signal(signal.SIGTERM, outside_the_loop)

    def factory(policy, cfg, run):
        gen = state_mod.make_generator(policy, cfg, run)
        real = gen.generate_completions

        def generate_completions(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # delivered to our handler, between two bytecodes
            return real(*a, **k)

        gen.generate_completions = generate_completions
        return gen

    try:
        first = run_tiny(tmp_path / "b", *flags, factory=factory)
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert [m["iteration"] for m in first] == [1, 2]
    assert first.stopped and not straight.stopped  # (the command line's exit code: test_a_stopped_run_exits_...)
    assert os.path.basename(latest_checkpoint(str(tmp_path / "b"))) == "checkpoint-000002"
    assert not killed  # (the second notice, during the last save, was noted by the loop)
    assert after is outside_the_loop  # the loop's handler is gone with the loop
    monkeypatch.setattr(resume_mod, "_save_state_file", write)
    second = run_tiny(tmp_path / "b", *flags, "--resume")
    assert no_timing(first + second) == no_timing(straight)
    a, b = latest_checkpoint(str(tmp_path / "a")), latest_checkpoint(str(tmp_path / "b"))
    for head, sub in (("lm", "policy"), ("score", "value")):
        wa, wb = saved_weights(f"{a}/{sub}", head), saved_weights(f"{b}/{sub}", head)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub


def _record_saves(monkeypatch) -> list[int]:
    """The iterations the trainer saves a checkpoint at, as it saves them (the saves themselves go on)."""
    saved = []

    def save(state, **kw):
        saved.append(state.iteration)
        return save_checkpoint(state, **kw)

    monkeypatch.setattr(trainer, "save_checkpoint", save)
    return saved


def test_save_every_minutes_checkpoints_by_the_clock(tmp_path, monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(trainer.time, "monotonic", lambda: clock["t"])
    saved = _record_saves(monkeypatch)

    def tick(*a, **k):  # each iteration's line is 4 minutes later
        clock["t"] += 240.0

    import engine.tracking

    monkeypatch.setattr(engine.tracking, "print0", tick)
    history = run_tiny(tmp_path, "--max-iterations", "4", "--save-every-minutes", "7", "--keep-checkpoints", "9")
    assert len(history) == 4 and saved == [2, 4]  # 8 minutes after the start, then after the save at 2
    assert all(m["mem_gib_generate"] == m["mem_gib_train"] == 0.0 for m in history)  # (GPU only)


def test_each_iteration_is_checkpointed_once(tmp_path, monkeypatch):
    """--save-every 2 of 4 iterations saves at 2 and 4, the last not a second time at the end of the loop; a resumed
    run that has nothing left to train saves nothing (at 13B a checkpoint is written for minutes)."""
    saved = _record_saves(monkeypatch)
    flags = ["--max-iterations", "4", "--save-every", "2", "--keep-checkpoints", "9", "--eval-prompts", ""]
    assert len(run_tiny(tmp_path, *flags)) == 4 and saved == [2, 4]
    saved.clear()
    assert run_tiny(tmp_path, *flags, "--resume") == [] and saved == []
    run_tiny(tmp_path, "--max-iterations", "5", "--resume", "--keep-checkpoints", "9")  # (5: not a multiple of 2)
    assert saved == [5]


def test_resume_after_a_crash_keeps_one_metrics_line_per_iteration(tmp_path):
    """A run that logged iteration 3 but died before checkpointing it (and in the middle of writing iteration 4's
    line, and after leaving a checkpoint 1 without its value model and a 5 `latest` never pointed to) resumes from 2:
    metrics.jsonl then holds iterations 1, 2, 3 once each, the 3rd from the resumed run; the pruning keeps the
    complete checkpoint 2 beside the new 3 (--keep-checkpoints 2), not the dead run's leftovers."""
    run_tiny(tmp_path, "--max-iterations", "3", "--save-every", "2", "--keep-checkpoints", "2")
    (tmp_path / "latest").write_text(json.dumps({"checkpoint": "checkpoint-000002"}))  # as if it died at 3
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "step": 8, "lr": 1e-')  # (killed mid-write)
    shutil.copytree(tmp_path / "checkpoint-000002/policy", tmp_path / "checkpoint-000001/policy")
    shutil.copytree(tmp_path / "checkpoint-000003", tmp_path / "checkpoint-000005")
    resumed = run_tiny(tmp_path, "--max-iterations", "3", "--resume", "--keep-checkpoints", "2")
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2, 3]
    assert no_timing(lines[2:]) == no_timing(resumed)
    assert sorted(d.name for d in tmp_path.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n{"iteration": 2}\n{"iteration": 3, "lr')  # (alone)
    trim_logs(str(tmp_path), 2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iteration": 1}\n{"iteration": 2}\n'  # (rewritten)
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')  # (an edited file)
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2, is not a JSON record .*: mend or remove it"):
        trim_logs(str(tmp_path), 1)
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n')
    for note in ('{"note": "lr sweep B"}', '["iteration", 2]', '{"iteration": "2"}'):  # (JSON, but no record of ours)
        (tmp_path / "eval.jsonl").write_text(f'{{"iteration": 1}}\n{note}\n')
        with pytest.raises(ValueError, match=r'eval\.jsonl, line 2, is no record of the run \(one has an integer "it'):
            trim_logs(str(tmp_path), 1)


def test_a_resume_without_latest_continues_from_the_newest_complete_checkpoint(tmp_path, capsys):
    """--resume in a directory whose complete checkpoints have no `latest` (a kill in the run's first save, after the
    state files and before `latest` was written; or a directory copied without it) continues from the newest complete
    one, saying so, exactly as the uninterrupted run: not refused (a requeued job would need a person), not started
    over (that deleted them). A later incomplete one (a save killed before every rank's state file) is not taken."""
    straight = run_tiny(tmp_path / "a", "--max-iterations", "3")
    run_tiny(tmp_path / "b", "--max-iterations", "2", "--save-every", "1", "--keep-checkpoints", "2")
    (tmp_path / "b/latest").unlink()
    shutil.copytree(tmp_path / "b/checkpoint-000002", tmp_path / "b/checkpoint-000003")
    os.remove(tmp_path / "b/checkpoint-000003/state-rank00000.pt")
    capsys.readouterr()
    resumed = run_tiny(tmp_path / "b", "--max-iterations", "3", "--resume")
    out = capsys.readouterr().out
    assert "resuming from " + str(tmp_path / "b/checkpoint-000002") in out and "no `latest` in " in out
    assert [m["iteration"] for m in resumed] == [3] and no_timing(resumed) == no_timing(straight[2:])
    lines = [json.loads(x)["iteration"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3]
    assert latest_checkpoint(str(tmp_path / "b")) == str(tmp_path / "b/checkpoint-000003")  # (saved anew, whole)
    assert os.path.exists(tmp_path / "b/checkpoint-000003/state-rank00000.pt")


def test_a_checkpoint_lacking_a_ranks_state_file_is_incomplete(tmp_path):
    """A DP 2 checkpoint whose save was killed after rank 0's state file and before rank 1's: not complete (not resumed
    without `latest`, pruned, not named); with rank 1's file it is. A rank 0 file that cannot be read counts as whole
    (pruning never removes a checkpoint for a read error; the resume names it)."""
    from engine.resume import _complete, prune_checkpoints, resume_checkpoint

    for n in (1, 2):
        torch.save({"world_size": 2}, _fake_ckpt(tmp_path, n, state=False) + "/state-rank00000.pt")
    torch.save({"world_size": 2}, str(tmp_path / "checkpoint-000001/state-rank00001.pt"))
    assert _complete(str(tmp_path / "checkpoint-000001")) and not _complete(str(tmp_path / "checkpoint-000002"))
    assert resume_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-000001")
    (tmp_path / "checkpoint-000002/state-rank00000.pt").write_bytes(b"damaged")
    assert _complete(str(tmp_path / "checkpoint-000002"))
    for unreadable in ({}, {"world_size": None}, {"world_size": "two"}):  # (no number of ranks to be told: whole too)
        torch.save(unreadable, str(tmp_path / "checkpoint-000002/state-rank00000.pt"))
        assert _complete(str(tmp_path / "checkpoint-000002")), unreadable
    _fake_ckpt(tmp_path, 3, state=False)
    torch.save({"world_size": 3}, str(tmp_path / "checkpoint-000003/state-rank00000.pt"))
    torch.save({"world_size": 3}, str(tmp_path / "checkpoint-000003/state-rank00002.pt"))
    _fake_ckpt(tmp_path, 4)
    prune_checkpoints(str(tmp_path), "checkpoint-000004", keep=9)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000001", "checkpoint-000002", "checkpoint-000004"]


def test_a_resume_whose_latest_names_a_checkpoint_that_is_gone_says_so(tmp_path):
    """`latest` pointed back by hand to a checkpoint pruned since (or not copied with the directory): the resume is
    refused naming `latest`, the checkpoint it names and the one there is to resume from, not a state file."""
    run_tiny(tmp_path, "--max-iterations", "2", "--save-every", "1")  # (checkpoint-000001 pruned: --keep-checkpoints 1)
    (tmp_path / "latest").write_text(json.dumps({"checkpoint": "checkpoint-000001"}))
    with pytest.raises(
        FileNotFoundError,
        match=r"--resume: .*latest names checkpoint-000001, which is not in .* \(removed or moved\?\); it holds "
        r'checkpoint-000002: write \{"checkpoint": "checkpoint-000002"\} into .*latest to resume from it',
    ):
        run_tiny(tmp_path, "--max-iterations", "3", "--resume")
    assert [d.name for d in tmp_path.glob("checkpoint-*")] == ["checkpoint-000002"]  # (nothing removed)


def test_an_output_dir_on_a_file_system_without_locks_is_warned_of_once_and_run_in(tmp_path, monkeypatch, capsys):
    """flock refused (ENOLCK: some network mounts): the run goes on, fresh or resumed, saying once that a second run
    there would not be refused (the output directory is checked at more than one place), and ends freeing nothing."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    for flags in ((), ("--resume",)):
        run_tiny(tmp_path, "--max-iterations", str(1 + len(flags)), *flags)
        out = capsys.readouterr().out
        assert out.count(f"warning: cannot lock {tmp_path}/.run.lock (No locks available): a second run") == 1, out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_checkpoint_is_durable_before_latest_points_to_it(tmp_path, monkeypatch):
    """Every file is fsynced before its rename and every directory whose entries changed after it: each model's
    directory before it is renamed into place, the checkpoint's parent after, checkpoint-N before `latest` moves,
    and the output directory after `latest` is replaced and before the previous checkpoint is removed."""
    import engine.checkpoint as ckpt_mod
    import engine.durable as durable_mod
    import engine.resume as resume_mod

    state = tiny_state(tmp_path, "--max-iterations", "1")
    events, real_rmtree = [], shutil.rmtree

    def fsync_dir(path):
        events.append(("dir", os.path.relpath(path, tmp_path)))

    for module in (ckpt_mod, durable_mod, resume_mod):  # (durable's: replace_dir's and atomic_write's)
        monkeypatch.setattr(module, "fsync_dir", fsync_dir)
    monkeypatch.setattr(resume_mod, "fsync_file", lambda fn: events.append(("file", os.path.relpath(fn, tmp_path))))
    for log in ("metrics.jsonl", "samples.jsonl"):  # (the logs' lines of the iterations saved: durable first)
        (tmp_path / log).write_text('{"iteration": 1}\n')
    monkeypatch.setattr(resume_mod.os, "replace", lambda a, b: (events.append(("replace", os.path.basename(b))),
                                                               os.rename(a, b)))  # fmt: skip
    monkeypatch.setattr(resume_mod.shutil, "rmtree", lambda p, **k: (events.append(("rm", os.path.basename(p))),
                                                                     real_rmtree(p, **k)))  # fmt: skip
    save_checkpoint(state)
    state.iteration = 1
    events.clear()
    save_checkpoint(state)
    dirs = [e[1] for e in events if e[0] == "dir"]
    assert sum(d.startswith("checkpoint-000001/policy.tmp-") for d in dirs) == 1, dirs
    assert sum(d.startswith("checkpoint-000001/value.tmp-") for d in dirs) == 1, dirs
    tail = events[events.index(("replace", "state-rank00000.pt")) :]
    assert tail == [("replace", "state-rank00000.pt"), ("dir", "checkpoint-000001"), ("file", "metrics.jsonl"),
                    ("file", "samples.jsonl"), ("dir", "."), ("replace", "latest"), ("dir", "."),
                    ("rm", "checkpoint-000000")], tail  # fmt: skip


def test_a_checkpoint_saved_again_loses_what_a_killed_save_left_in_it(tmp_path, capsys):
    """A save killed midway leaves a model's .tmp-/.old- directory and a state file's .tmp-PID in checkpoint-N; when
    a resume from an earlier checkpoint saves N again they are removed (at 13B a model's copy is 26 GB), and that
    resume warns first that it replaces the later complete checkpoints `latest` no longer names."""
    run_tiny(tmp_path, "--max-iterations", "2", "--save-every", "1", "--keep-checkpoints", "3")
    ckpt = tmp_path / "checkpoint-000002"
    shutil.copytree(ckpt / "policy", ckpt / "policy.tmp-1a2b3c4d")
    shutil.copytree(ckpt / "value", ckpt / "value.old-9f8e7d6c")
    (ckpt / "state-rank00000.pt.tmp-4242").write_bytes(b"half")
    (tmp_path / "latest").write_text(json.dumps({"checkpoint": "checkpoint-000001"}))  # (pointed back by hand)
    capsys.readouterr()
    run_tiny(tmp_path, "--max-iterations", "2", "--resume")
    out = capsys.readouterr().out
    assert (f"warning: resuming from checkpoint-000001, before checkpoint-000002: this run replaces them, and its "
            f"next checkpoint removes them (move them out of {tmp_path} to keep them)") in out  # fmt: skip
    assert sorted(p.name for p in ckpt.iterdir()) == ["policy", "state-rank00000.pt", "value"]
    assert latest_checkpoint(str(tmp_path)) == str(ckpt)
    capsys.readouterr()
    run_tiny(tmp_path, "--max-iterations", "3", "--resume")  # (nothing after the latest: no warning)
    assert "warning: resuming from" not in capsys.readouterr().out


def test_a_resume_from_an_earlier_checkpoint_removes_the_later_ones_at_its_first_save(tmp_path, capsys):
    """`latest` pointed back to checkpoint 1 past a checkpoint 2 (or one a killed save left unpointed to, at DP 2
    without another rank's state file): the resumed run, with another learning rate and saving first at 3, removes 2
    as its warning says, and keeps its own 1, not the other run's 2 beside its 3 (--keep-checkpoints 2)."""
    run_tiny(tmp_path, "--max-iterations", "2", "--save-every", "1", "--keep-checkpoints", "3")
    (tmp_path / "latest").write_text(json.dumps({"checkpoint": "checkpoint-000001"}))
    capsys.readouterr()
    flags = ["--max-iterations", "3", "--save-every", "3", "--keep-checkpoints", "2", "--learning-rate", "1e-6"]
    run_tiny(tmp_path, *flags, "--resume")
    assert "before checkpoint-000002: this run replaces them, and its next checkpoint removes them" in (
        capsys.readouterr().out
    )
    assert sorted(d.name for d in tmp_path.glob("checkpoint-*")) == ["checkpoint-000001", "checkpoint-000003"]


def test_a_resume_from_a_checkpoint_of_another_name_continues_it(tmp_path, capsys):
    """`latest` pointed by hand at a copy of another name (checkpoint-1 kept as checkpoint-best) past a checkpoint 2:
    the run continues from the copy's iteration exactly as from checkpoint-1 itself, warns of checkpoint-2 only (its
    iteration read from the copy's state file, not its name), and its first save removes 2 as it said, the copy and
    checkpoint-1 kept."""
    flags = ["--max-iterations", "3", "--save-every", "3", "--keep-checkpoints", "2"]
    run_tiny(tmp_path / "a", "--max-iterations", "2", "--save-every", "1", "--keep-checkpoints", "3")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.copytree(tmp_path / "a/checkpoint-000001", tmp_path / "a/checkpoint-best")
    (tmp_path / "a/latest").write_text(json.dumps({"checkpoint": "checkpoint-best"}))
    (tmp_path / "b/latest").write_text(json.dumps({"checkpoint": "checkpoint-000001"}))
    capsys.readouterr()
    resumed = run_tiny(tmp_path / "a", *flags, "--resume")
    said = capsys.readouterr().out
    assert (f"warning: resuming from checkpoint-best, before checkpoint-000002: this run replaces them, and its next "
            f"checkpoint removes them (move them out of {tmp_path / 'a'} to keep them)") in said  # fmt: skip
    assert no_timing(resumed) == no_timing(run_tiny(tmp_path / "b", *flags, "--resume"))
    names = sorted(d.name for d in (tmp_path / "a").glob("checkpoint-*"))
    assert names == ["checkpoint-000001", "checkpoint-000003", "checkpoint-best"]
    wa, wb = (saved_weights(tmp_path / f"{d}/checkpoint-000003/policy", "lm") for d in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_stopped_run_exits_with_its_own_code(monkeypatch):
    """The command line of a run a signal stopped (its checkpoint written) exits with STOPPED_EXIT (75), not 0: a
    scheduler, torchrun or `train && evaluate` does not take it for a finished run; a finished one returns."""
    import engine.train_ppo as train_ppo
    from engine.errors import STOPPED_EXIT
    from engine.trainer import RunHistory

    history = RunHistory([{"iteration": 1}])
    monkeypatch.setattr(train_ppo, "main", lambda argv, **kw: history)
    assert train_ppo.cli([]) == [{"iteration": 1}]
    history.stopped = True
    with pytest.raises(SystemExit) as e:
        train_ppo.cli([])
    assert e.value.code == STOPPED_EXIT == 75


def test_a_stop_signal_at_an_evaluation_is_made_up_for_when_resumed(tmp_path, capsys):
    """SIGTERM during the last iteration, when the final evaluation is due: the run checkpoints without it (a
    scheduler's grace period is for the checkpoint) and the resumed run evaluates first, so eval.jsonl ends as a
    straight run's; a resume with nothing put off evaluates nothing again."""
    straight = run_tiny(tmp_path / "a", "--max-iterations", "2")
    evals = lambda d: [json.loads(x) for x in (tmp_path / d / "eval.jsonl").read_text().splitlines()]  # noqa: E731
    assert [e["iteration"] for e in evals("a")] == [0, 2]
    calls = {"n": 0}

    def factory(policy, cfg, run):
        gen = state_mod.make_generator(policy, cfg, run)
        real = gen.generate_completions

        def generate_completions(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:  # (the evaluation at the start, iteration 1's rollout, iteration 2's)
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)

        gen.generate_completions = generate_completions
        return gen

    first = run_tiny(tmp_path / "b", "--max-iterations", "2", factory=factory)
    assert [m["iteration"] for m in first] == [1, 2] and [e["iteration"] for e in evals("b")] == [0]
    assert first.stopped  # (every iteration made, but not its evaluation: not done)
    assert run_tiny(tmp_path / "b", "--max-iterations", "2", "--resume") == []  # (no iteration left: the evaluation)
    ours, theirs = evals("b"), evals("a")
    assert [e["iteration"] for e in ours] == [0, 2]
    for k in ("score", "kl", "reward", "response_len"):
        assert ours[1][k] == theirs[1][k], k
    assert no_timing(first) == no_timing(straight)
    capsys.readouterr()
    run_tiny(tmp_path / "b", "--max-iterations", "2", "--resume")
    assert [e["iteration"] for e in evals("b")] == [0, 2]  # (made up once)
    assert "nothing to train: the run has made 2 iterations (--max-iterations up to 24 continues it)" in (
        capsys.readouterr().out
    )


def test_resuming_with_other_frozen_models_is_refused(tmp_path, monkeypatch, capsys):
    """The reference's and reward model's weights are fingerprinted into each checkpoint: a resume with a reward
    model of the same shape but other weights is refused before any weight is loaded (its rewards would measure
    something else), --resume-other-models lets it through with a warning, and the same files moved are accepted."""
    from engine.tokenizer import TINY_PROMPTS

    run_tiny(tmp_path / "tiny", "--max-iterations", "1")  # (the tiny default's models, in tiny/init)
    init = tmp_path / "tiny/init"
    shutil.copytree(init, tmp_path / "moved")
    other = load_pretrained(str(init / "reward"), head="score")
    with torch.no_grad():
        other.norm.weight.mul_(1.5)
    from engine.checkpoint import save_pretrained

    save_pretrained(other, str(tmp_path / "other-rm"), tokenizer_dir=str(init / "reward"))
    from engine.checkpoint import weights_fingerprint

    same = load_pretrained(str(init / "reward"), head="score")  # the same weights re-saved in four shards
    save_pretrained(same, str(tmp_path / "resharded"), max_shard_bytes=same.norm.weight.numel() * 400)
    assert len(list((tmp_path / "resharded").glob("*.safetensors"))) > 1
    assert weights_fingerprint(str(tmp_path / "resharded")) == weights_fingerprint(str(init / "reward"))
    assert weights_fingerprint(str(tmp_path / "other-rm")) != weights_fingerprint(str(init / "reward"))
    flags = ["--prompts", TINY_PROMPTS, "--max-prompt-len", "128", "--output-dir", str(tmp_path / "run")]
    run = lambda *f: run_tiny(tmp_path / "run", *flags, "--policy", str(init / "policy"), *f)  # noqa: E731
    run("--reward", str(init / "reward"), "--max-iterations", "1")
    with pytest.raises(ValueError, match=r"resuming with the reward model \(then .*init/reward, now .*other-rm\) "
                       r"whose weights differ .*--resume-other-models if that is meant"):  # fmt: skip
        run("--reward", str(tmp_path / "other-rm"), "--max-iterations", "2", "--resume")
    loaded = []
    monkeypatch.setattr(state_mod, "load_pretrained", lambda *a, **k: loaded.append(a) or pytest.fail("loaded"))
    with pytest.raises(ValueError, match="whose weights differ"):
        run("--reward", str(tmp_path / "other-rm"), "--max-iterations", "2", "--resume")
    assert loaded == []  # (refused before a weight was read)
    monkeypatch.undo()
    capsys.readouterr()
    run("--reward", str(tmp_path / "moved/reward"), "--max-iterations", "2", "--resume")  # the same weights, moved
    assert "whose weights differ" not in capsys.readouterr().out
    run("--reward", str(tmp_path / "other-rm"), "--max-iterations", "3", "--resume", "--resume-other-models")
    assert "warning: resuming with the reward model" in capsys.readouterr().out


def test_a_resume_at_another_dtype_says_its_numbers_are_no_longer_the_runs(tmp_path, capsys):
    """--dtype (and --kv-cache-dtype) are this launch's, not the checkpoint's: a resume at another parameter dtype
    loads (the optimizer state crosses dtypes) and says that the run's numbers do not continue; one at the same says
    nothing."""
    run_tiny(tmp_path, "--max-iterations", "1")
    capsys.readouterr()
    run_tiny(tmp_path, "--max-iterations", "2", "--resume")
    assert "warning: this resume runs with" not in capsys.readouterr().out
    run_tiny(tmp_path, "--max-iterations", "3", "--resume", "--dtype", "bfloat16")
    assert (
        "warning: this resume runs with parameter dtype bfloat16 where the run's last launch had float32 (--dtype): "
        "its numbers are no longer those of a run that had not stopped"
    ) in capsys.readouterr().out


def test_a_resume_ends_responses_where_its_run_did(tmp_path, capsys):
    """--resume with another --policy (the same weights and tokenizer, a generation_config.json with more EOS ids):
    the weights are the checkpoint's, and so are the ids that end a response (its policy keeps the run's
    generation_config.json), not the new directory's; the difference is named."""
    import shutil

    from engine.tokenizer import TINY_DIR, TINY_PROMPTS

    run_tiny(tmp_path / "b", "--max-iterations", "1")
    init = tmp_path / "b" / "init"
    other = tmp_path / "other"
    shutil.copytree(init / "policy", other)
    (other / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5, 6]}))
    flags = ["--output-dir", str(tmp_path / "b"), *SMALL, "--reference", str(init / "policy"), "--reward",
             str(init / "reward"), "--prompts", TINY_PROMPTS, "--tokenizer", TINY_DIR, "--max-iterations", "2",
             "--resume"]  # fmt: skip

    def resumed(policy):
        cfg, run, _ = parse_args([*flags, "--policy", str(policy)])
        assert run.policy == str(policy)
        return state_mod.setup(cfg, run, generator_factory=state_mod.make_generator)

    saved = resumed(init / "policy").stop_ids
    capsys.readouterr()
    state = resumed(other)
    assert state.stop_ids == saved and 5 not in saved
    assert f"--policy {other} ends responses at token ids [" in capsys.readouterr().out


def test_a_resume_keeps_the_checkpoints_hyperparameters_unless_given_again(tmp_path, capsys):
    """--resume takes every PPO hyperparameter not on its command line from the checkpoint (a default changed since,
    as lr_schedule and top_k were, does not change a run halfway; the resumed run is the straight one); one given
    again wins, and is named; a checkpoint from before top-k existed resumes sampling the whole vocabulary."""
    flags = ["--lr-schedule", "linear", "--top-k", "7", "--learning-rate", "3e-3"]
    straight = run_tiny(tmp_path / "a", "--max-iterations", "2", *flags)
    run_tiny(tmp_path / "b", "--max-iterations", "1", *flags)
    capsys.readouterr()
    resumed = run_tiny(tmp_path / "b", "--max-iterations", "2", "--resume")
    assert "other than the checkpoint's" not in capsys.readouterr().out
    assert no_timing(resumed) == no_timing(straight[1:])
    state = tiny_state(tmp_path / "b", "--max-iterations", "2", "--resume", "--top-k", "3")
    assert (state.cfg.lr_schedule, state.cfg.top_k, state.cfg.learning_rate) == ("linear", 3, 3e-3)
    assert "PPO hyperparameters other than the checkpoint's: top_k 7 -> 3" in capsys.readouterr().out
    # a checkpoint written before top_k / top_p were hyperparameters: its run sampled the whole vocabulary
    ckpt = latest_checkpoint(str(tmp_path / "b"))
    fn = f"{ckpt}/state-rank00000.pt"
    sd = torch.load(fn, weights_only=False)
    del sd["ppo_config"]["top_k"], sd["ppo_config"]["top_p"]
    del sd["ppo_config"]["kl_target"], sd["ppo_config"]["kl_horizon"], sd["kl_coef"]  # (before the adaptive beta too)
    del sd["ppo_config"]["whiten_eps"]  # (before EasyLM's 1e-6: TRL's 1e-8)
    torch.save(sd, fn)
    state = tiny_state(tmp_path / "b", "--max-iterations", "2", "--resume")
    assert (state.cfg.top_k, state.cfg.top_p, state.cfg.lr_schedule) == (0, 1.0, "linear")
    assert (state.cfg.kl_target, state.cfg.kl_horizon, state.kl_coef) == (0.0, 10000, 0.05)
    assert state.cfg.whiten_eps == 1e-8
    assert "other than the checkpoint's" not in capsys.readouterr().out


def test_a_resumes_checks_between_hyperparameters_wait_for_the_checkpoints_values(tmp_path):
    """--kl-horizon is checked against a rollout's sequences: on a --resume that gives it (and --kl-target) again but
    not the rollout size, against the checkpoint's (8 here), not the preset's (16: 3 would be refused); a horizon
    the checkpoint's rollout makes too short is refused once its values are in, and so is one with no checkpoint."""
    kl = ["--kl-target", "0.02", "--kl-horizon", "3"]
    run_tiny(tmp_path / "a", "--max-iterations", "1", "--eval-prompts", "", *kl)

    def setup(out, *flags):
        cfg, run, _ = parse_args(["--output-dir", str(out), "--resume", "--max-iterations", "2", *flags])
        return state_mod.setup(cfg, prepare_tiny(run))

    state = setup(tmp_path / "a", *kl)
    assert (state.cfg.rollout_sequences, state.cfg.kl_horizon, state.iteration) == (8, 3, 1)
    with pytest.raises(InvalidInput, match="kl_horizon must exceed a fifth of a rollout's 8 sequences"):
        setup(tmp_path / "a", "--kl-horizon", "1")
    with pytest.raises(InvalidInput, match="kl_horizon must exceed a fifth of a rollout's 16 sequences"):
        setup(tmp_path / "fresh", *kl)  # (no checkpoint: the preset's rollout)


@pytest.fixture(scope="session")
def dp2_runs(tmp_path_factory):
    """Two DP=2 runs of the tiny default (torchrun, the optimizer sharded) the DP 2 tests start from, run once a
    session (pytest-xdist's workers share them: the first to come runs them, under a lock): `straight`, two
    iterations, and `one`, the first of them. Read-only: a test resumes a copy."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # (this session's directory, above each worker's own)
    root = base / "dp2_runs"
    root.mkdir(exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():  # (a worker's try that failed leaves no `done`: the next starts afresh)
            for name in ("straight", "one"):
                shutil.rmtree(root / name, ignore_errors=True)
            torchrun_ranks(root, 2, "straight", "--max-iterations", "2")
            torchrun_ranks(root, 2, "one", "--max-iterations", "1")
            (root / "done").touch()
    return root


def test_dp2_distributed_optimizer_resumes_exactly(tmp_path, dp2_runs):
    """DP=2 with the optimizer sharded over the ranks: two iterations straight equal one + --resume + one (weights,
    metrics, each rank's shard of the Adam moments), also with the state in host memory throughout (and the idle
    models' weights during the resumed run's rollout) and each update's parameter all-gather finished before it
    returns (TULU_OVERLAP_PARAM_GATHER=0; to the bit); the sharded state re-gathered for a resume without sharding,
    whose unsharded update equals the sharded one (to fp32's last bits); a rank's state file lost or the log edited
    stops both ranks with a clear error."""
    straight = ranks_of(dp2_runs / "straight")
    first = ranks_of(dp2_runs / "one")
    shutil.copytree(dp2_runs / "one", tmp_path / "b")
    second = torchrun_ranks(tmp_path, 2, "b", "--max-iterations", "2", "--resume")
    assert no_timing(first[0]["history"] + second[0]["history"]) == no_timing(straight[0]["history"])
    a, b = latest_checkpoint(str(dp2_runs / "straight")), latest_checkpoint(str(tmp_path / "b"))
    for head, sub in (("lm", "policy"), ("score", "value")):
        wa, wb = saved_weights(f"{a}/{sub}", head), saved_weights(f"{b}/{sub}", head)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub
    for rank in range(2):
        sa = torch.load(f"{a}/state-rank{rank:05d}.pt", weights_only=False)
        sb = torch.load(f"{b}/state-rank{rank:05d}.pt", weights_only=False)
        for opt in ("policy_opt", "value_opt"):
            assert sa[opt]["distributed"] and len(sa[opt]["masters"]) >= 1
            for m, n in zip(sa[opt]["masters"], sb[opt]["masters"], strict=True):
                assert torch.equal(m, n)
            for i, st in sa[opt]["adam"]["state"].items():
                assert torch.equal(st["exp_avg_sq"], sb[opt]["adam"]["state"][i]["exp_avg_sq"])
    s0 = torch.load(f"{a}/state-rank00000.pt", weights_only=False)["policy_opt"]["masters"]
    s1 = torch.load(f"{a}/state-rank00001.pt", weights_only=False)["policy_opt"]["masters"]
    numel = sum(v.numel() for v in saved_weights(f"{a}/policy", "lm").values())
    assert sum(m.numel() for m in s0) == sum(m.numel() for m in s1) < numel  # each rank holds about half
    # the sharded optimizer re-gathered for a resume without sharding, and the unsharded update: the second iteration
    # as the sharded run's
    shutil.copytree(dp2_runs / "one", tmp_path / "c")
    unsharded = torchrun_ranks(tmp_path, 2, "c", "--max-iterations", "2", "--resume", "--no-distributed-optimizer")
    assert [m["iteration"] for m in unsharded[0]["history"]] == [2]
    for k, v in unsharded[0]["history"][0].items():
        if k not in TIMING:  # (the weights differ in last bits; the KL sums differences of fp32 log-probs of ~6)
            assert straight[0]["history"][1][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    for k, v in unsharded[0]["policy"].items():
        torch.testing.assert_close(straight[0]["policy"][k], v, atol=1e-6, rtol=1e-5)
    # the state in host memory throughout (--offload-optimizer always), checkpointed and resumed, and each update's
    # parameter all-gather finished before it returns, not left running into what follows: the same bits
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TULU_OVERLAP_PARAM_GATHER", "0")
        resident = torchrun_ranks(tmp_path, 2, "d", "--max-iterations", "1", "--offload-optimizer", "always")
        resident += torchrun_ranks(
            tmp_path,
            2,
            "d",
            "--max-iterations",
            "2",
            "--resume",
            "--offload-optimizer",
            "always",
            "--offload-idle-models",
            "rollouts",
        )  # (and the idle models' weights during the rollout)
    assert no_timing(resident[0]["history"] + resident[2]["history"]) == no_timing(straight[0]["history"])
    assert all(torch.equal(v, straight[0]["policy"][k]) for k, v in resident[2]["policy"].items())
    # rank 1's state file lost: rank 1 stops, and so does rank 0 (rather than wait for it in a collective)
    shutil.copytree(tmp_path / "b", tmp_path / "lost")
    os.remove(f"{latest_checkpoint(str(tmp_path / 'lost'))}/state-rank00001.pt")
    err = torchrun_ranks(tmp_path, 2, "lost", "--max-iterations", "3", "--resume", fails=True)
    # each in one line (rank 0's on stderr, rank 1's in torchrun's failure summary), no traceback of the engine's
    assert "error: resuming failed on rank 1: " in err and "state-rank00001.pt is missing (resume reads" in err
    assert err.count("error: resuming failed on rank 1: ") == 1 + 1  # (rank 0's line, and in torchrun's summary)
    assert not re.search(r'File "[^"]*/engine/\w+\.py"', err)  # (no traceback through the engine: torchrun's only)
    # an edited log, which rank 0 alone reads: rank 1 stops too (it went on into the optimizers' collectives)
    shutil.copytree(tmp_path / "b", tmp_path / "edited")
    (tmp_path / "edited/metrics.jsonl").write_text("not json\n" + (tmp_path / "b/metrics.jsonl").read_text())
    err = torchrun_ranks(tmp_path, 2, "edited", "--max-iterations", "3", "--resume", fails=True)
    assert "metrics.jsonl, line 1, is not a JSON record" in err and "error: resuming failed on rank 0: " in err
    assert not re.search(r'File "[^"]*/engine/\w+\.py"', err)


def full_disk_hook(rank: int, prefix: str, nth: int, how: str = "w") -> str:
    """A sitecustomize.py for torchrun_ranks: on global rank `rank` the disk fills at the `nth` file opened for writing
    (`how`: "a", appending) whose name starts with `prefix` (the others written as usual)."""
    return f"""
import builtins, errno, os
if os.environ.get("RANK") == "{rank}":
    real, writes = builtins.open, []
    def full_open(file, mode="r", *a, **k):
        if "{how}" in mode and os.path.basename(str(file)).startswith("{prefix}"):
            writes.append(file)
            if len(writes) == {nth}:
                raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real(file, mode, *a, **k)
    builtins.open = full_open
"""


def test_a_full_disk_when_rank_0_moves_latest_stops_every_rank(tmp_path):
    """DP 2: rank 0 alone writes `latest`; a full disk there stops rank 1 too, naming rank 0's error (rank 1 went on
    into the next rollout's collectives and died there with gloo's 'Connection closed by peer')."""
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks/sitecustomize.py").write_text(full_disk_hook(0, "latest.tmp-", 2))  # (the second `latest`)
    flags = ["--max-iterations", "2", "--save-every", "1", "--eval-prompts", ""]
    err = torchrun_ranks(tmp_path, 2, "a", *flags, fails=True, hooks=tmp_path / "hooks")
    assert "saving a checkpoint failed on rank 0: No space left on device (" in err  # (the file named)
    assert "Connection closed by peer" not in err
    assert latest_checkpoint(str(tmp_path / "a")) == str(tmp_path / "a/checkpoint-000001")


def test_a_full_disk_met_by_a_background_save_stops_every_rank(tmp_path):
    """DP 2: rank 1's thread meets a full disk writing checkpoint 1 while iteration 2 runs; at that iteration's end
    both ranks stop, rank 0 naming rank 1's error and the file, and no checkpoint becomes `latest`."""
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks/sitecustomize.py").write_text(full_disk_hook(1, "state-rank00001.pt.tmp-", 1))
    flags = ["--max-iterations", "3", "--save-every", "1", "--eval-prompts", ""]
    err = torchrun_ranks(tmp_path, 2, "a", *flags, fails=True, hooks=tmp_path / "hooks")
    assert "saving a checkpoint failed on rank 1: No space left on device (" in err and "state-rank00001.pt" in err
    assert "Connection closed by peer" not in err
    assert latest_checkpoint(str(tmp_path / "a")) is None
    metrics = (tmp_path / "a/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in metrics] == [1, 2]  # (stopped at iteration 2's end, not later)


def test_an_error_every_rank_raises_completes_the_checkpoint_written_meanwhile(tmp_path):
    """DP 2: rank 0 meets a full disk logging iteration 3 while checkpoint 2 is written in the background: the error,
    raised on both ranks together, stops the run, and the ranks complete that checkpoint first (collectively: both
    stop at the same point), so `latest` names it (it was left incomplete, and a resume went back to the start)."""
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks/sitecustomize.py").write_text(full_disk_hook(0, "metrics.jsonl", 3, how="a"))
    flags = ["--max-iterations", "4", "--save-every", "2", "--eval-prompts", ""]
    err = torchrun_ranks(tmp_path, 2, "a", *flags, fails=True, hooks=tmp_path / "hooks")
    assert "logging the iteration's metrics failed on rank 0: No space left on device" in err
    assert latest_checkpoint(str(tmp_path / "a")) == str(tmp_path / "a/checkpoint-000002")
    names = sorted(os.listdir(tmp_path / "a/checkpoint-000002"))
    assert names == ["policy", "state-rank00000.pt", "state-rank00001.pt", "value"]


def test_resume_with_another_layout(tmp_path, dp2_runs):
    """Resumed on another layout, each run continues as a straight DP=2 run does (the same up to the order of the
    reductions: the prompt order and the samples depend on neither the DP size nor the TP degree, and the optimizer is
    re-laid): 2 DP ranks (optimizer sharded) -> 1 process, 1 process -> 2 DP ranks (sharded anew), 2 DP ranks -> TP 2,
    TP 2 -> 1 process."""
    straight = ranks_of(dp2_runs / "straight")[0]["history"]
    shutil.copytree(dp2_runs / "one", tmp_path / "two_to_one")
    shutil.copytree(dp2_runs / "one", tmp_path / "dp2_to_tp2")
    one = run_tiny(tmp_path / "two_to_one", "--max-iterations", "2", "--resume", factory=naive_factory)
    run_tiny(tmp_path / "one_to_two", "--max-iterations", "1", factory=naive_factory)
    two = torchrun_ranks(tmp_path, 2, "one_to_two", "--max-iterations", "2", "--resume")[0]["history"]
    tp2 = torchrun_ranks(tmp_path, 2, "dp2_to_tp2", "--max-iterations", "2", "--resume", "--tp", "2")[0]["history"]
    torchrun_ranks(tmp_path, 2, "tp2_to_one", "--max-iterations", "1", "--tp", "2")
    tp1 = run_tiny(tmp_path / "tp2_to_one", "--max-iterations", "2", "--resume", factory=naive_factory)
    for resumed in (one, two, tp2, tp1):
        assert [m["iteration"] for m in resumed] == [2]
        for k, v in straight[1].items():
            if k not in TIMING:
                assert resumed[0][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    runs = ("two_to_one", "one_to_two", "dp2_to_tp2", "tp2_to_one")
    for sub, head in (("policy", "lm"), ("value", "score")):
        w = {d: saved_weights(f"{latest_checkpoint(str(tmp_path / d))}/{sub}", head) for d in runs}
        w["straight"] = saved_weights(f"{latest_checkpoint(str(dp2_runs / 'straight'))}/{sub}", head)
        for d in runs:
            for k, v in w["straight"].items():
                torch.testing.assert_close(w[d][k], v, atol=1e-6, rtol=1e-5, msg=f"{d} {sub} {k}")


def test_a_sharded_optimizer_saved_before_re_laying_is_refused_naming_both_layouts(tmp_path):
    """A checkpoint whose sharded optimizer state predates re-laying (no bucket lists in its state files), resumed on
    another layout, ended in a traceback (a ValueError from deep in engine/reshard.py) naming neither layout: now the
    input error (one line, every rank) says the one to resume with."""
    from engine.distributed import ProcessGrid
    from engine.errors import InvalidInput
    from engine.resume import _load_states
    from engine.saved_run import state_file

    opt = {"distributed": True, "masters": [], "adam": {}}
    for rank in range(2):
        torch.save({"tp": 1, "world_size": 2, "policy_opt": opt, "value_opt": opt}, state_file(str(tmp_path), rank))
    with pytest.raises(InvalidInput, match=r"its sharded optimizer state predates re-laying it for another layout "
                       r"\(an older engine saved it\): resume with its layout, --tp 1 on 2 processes, not --tp 1 on 1 "
                       r"process with --no-distributed-optimizer$"):  # fmt: skip
        _load_states(str(tmp_path), ProcessGrid(), False)
    torch.save({"tp": 1, "world_size": 2, "policy_opt": opt, "value_opt": opt}, state_file(str(tmp_path), 1))
    assert _load_states(str(tmp_path), ProcessGrid(rank=1, world_size=2, tp=1, dp=2), True)[1] is None  # (its own)


def test_resume_names_changed_hyperparameters(tmp_path, capsys):
    run_tiny(tmp_path, "--max-iterations", "1")
    capsys.readouterr()
    run_tiny(tmp_path, "--max-iterations", "2", "--resume", "--adam-betas", "0.9", "0.999")  # the same values
    out = capsys.readouterr().out
    assert "other than the checkpoint's" not in out and "eta 0h00m" in out
    run_tiny(tmp_path, "--max-iterations", "3", "--resume", "--kl-coef", "0.1", "--clip-ratio", "0.3")
    assert (
        "hyperparameters other than the checkpoint's: clip_ratio 0.2 -> 0.3, kl_coef 0.05 -> 0.1"
        in capsys.readouterr().out
    )


def test_the_adaptive_kl_coefficient_follows_the_kl_and_resumes_exactly(tmp_path, capsys):
    """--kl-target: each rollout's rewards take the coefficient the controller (engine.ppo.adapt_kl_coef, checked by
    hand in test_ppo.py) made of the previous rollout's KL, the samples' rewards theirs, the held-out evaluations' the
    run's --kl-coef (a curve that moves with the policy alone); a resume continues the coefficient where the
    checkpoint left it (the run is the straight one), and starts over from a --kl-coef given again."""
    flags = ["--kl-target", "0.02", "--kl-horizon", "8"]  # (8 sequences a rollout: each moves it by up to 20%)
    straight = run_tiny(tmp_path / "a", "--max-iterations", "3", *flags)
    coef = [m["kl_coef"] for m in straight]
    assert coef[0] == 0.05 and len(set(coef)) == 3
    for m, nxt in zip(straight, coef[1:]):
        error = min(max(m["kl"] / 0.02 - 1, -0.2), 0.2)
        assert nxt == pytest.approx(m["kl_coef"] * (1 + error * 8 / 8), rel=1e-9)
    for m in straight:  # the rewards of the rollout: its RM scores less its coefficient times its KL
        assert m["reward"] == pytest.approx(m["score_penalized"] - m["kl_coef"] * m["kl"], rel=1e-5, abs=1e-6)
    samples = [json.loads(x) for x in (tmp_path / "a/samples.jsonl").read_text().splitlines()]
    assert {r["iteration"] for r in samples} == {1, 2, 3}
    for r in samples:
        want = r["score_penalized"] - coef[r["iteration"] - 1] * r["kl"]
        assert r["reward"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    last_eval = json.loads((tmp_path / "a/eval.jsonl").read_text().splitlines()[-1])
    assert last_eval["kl"] > 0 and last_eval["iteration"] == 3
    assert last_eval["reward"] == pytest.approx(last_eval["score_penalized"] - 0.05 * last_eval["kl"], rel=1e-5)

    run_tiny(tmp_path / "b", "--max-iterations", "2", *flags)
    resumed = run_tiny(tmp_path / "b", "--max-iterations", "3", "--resume")  # (the flags: the checkpoint's)
    assert no_timing(resumed) == no_timing(straight[2:])
    capsys.readouterr()
    state = tiny_state(tmp_path / "b", "--max-iterations", "4", "--resume", "--kl-coef", "0.1")
    assert state.kl_coef == 0.1 and state.cfg.kl_target == 0.02
    out = capsys.readouterr().out
    nxt = coef[2] * (1 + min(max(straight[2]["kl"] / 0.02 - 1, -0.2), 0.2))  # (the checkpoint's: iteration 4's)
    assert f"the adaptive KL coefficient starts over from --kl-coef 0.1 (the checkpoint's run had taken it to " \
        f"{nxt:.6g})" in out  # fmt: skip
    # a checkpoint from before the adaptive coefficient (no kl_coef in its state): its run's fixed one
    fn = f"{latest_checkpoint(str(tmp_path / 'b'))}/state-rank00000.pt"
    sd = torch.load(fn, weights_only=False)
    del sd["kl_coef"]
    torch.save(sd, fn)
    assert tiny_state(tmp_path / "b", "--max-iterations", "4", "--resume").kl_coef == 0.05


def test_resume_with_a_longer_schedule_spans_it(tmp_path, capsys):
    """Resumed with twice the prompt epochs, the learning rate follows this run's schedule (the checkpoint's ended
    at 0 halfway, and every later update was a no-op)."""
    plans = [tiny_state(tmp_path / f"plan{e}", "--prompt-epochs", e) for e in ("1", "2")]
    (old, new), cfg = [p.total_steps for p in plans], plans[1].cfg
    assert new == 2 * old
    run_tiny(tmp_path, "--max-iterations", "1", "--prompt-epochs", "1")
    capsys.readouterr()
    history = run_tiny(tmp_path, "--max-iterations", "2", "--resume", "--prompt-epochs", "2")
    out = capsys.readouterr().out
    assert f"a learning-rate schedule of {new} optimizer steps (the checkpoint's run: {old}): " in out
    lr = history[-1]["lr"]
    assert lr == pytest.approx(ppo.lr_at(history[-1]["step"] - 1, new, cfg)) and lr > 0


def test_a_resume_checks_the_batch_sizes_it_runs_with(tmp_path):
    """The batch sizes are checked once the checkpoint's hyperparameters are in: a resume that gives a new
    --train-batch-size, which divides the checkpoint's rollouts, runs (the tiny preset's --rollout-batch-size 16,
    which it does not divide, is not the run's), and one that divides neither is refused naming the run's."""
    run_tiny(tmp_path, "--max-iterations", "1", "--rollout-batch-size", "12", "--train-batch-size", "6")
    flags = ["--output-dir", str(tmp_path), "--max-new-tokens", "8", "--max-iterations", "2", "--resume"]
    with dispatch.reference_ops():
        history = main([*flags, "--train-batch-size", "12"])
    assert [(m["iteration"], m["step"]) for m in history] == [(2, 3)]  # (12 sequences, 2 steps, then 1)
    with pytest.raises(ValueError, match="rollout of 12 sequences is not a multiple of train_batch_size 8"):
        main([*flags, "--train-batch-size", "8"])


@pytest.mark.parametrize("src_tp,src_dp,src_dist,dst_tp,dst_dp,dst_dist,vocab", [
    (1, 3, True, 1, 2, True, 512),  # DP 3 sharded -> DP 2 sharded (uneven padding, parameters across buckets, shards)
    (1, 3, True, 1, 1, False, 512),  # DP 3 sharded -> one process
    (2, 3, True, 1, 1, False, 512),  # TP 2 x DP 3 sharded -> one process
    (2, 1, False, 1, 2, True, 512),  # TP 2 unsharded -> DP 2 sharded
    (1, 2, True, 2, 1, False, 512),  # DP 2 sharded -> TP 2
    (1, 1, False, 2, 3, True, 512),  # one process -> TP 2 x DP 3 sharded
    (2, 1, False, 2, 2, True, 512),  # TP 2 unsharded -> TP 2 x DP 2 sharded (each TP rank reads its own saved slices)
    (2, 3, True, 2, 2, True, 512),  # TP 2 x DP 3 sharded -> TP 2 x DP 2 sharded
    (2, 3, True, 1, 1, False, 509),  # TP 2 with its vocabulary padded (255 rows a rank) -> one process
    (1, 1, False, 2, 3, True, 509),  # one process -> TP 2 x DP 3 sharded, the vocabulary padded
    (2, 1, False, 2, 2, True, 509),  # TP 2 padded unsharded -> TP 2 x DP 2 sharded
])  # fmt: skip
def test_optimizer_state_relaid_for_another_tp_degree(
    monkeypatch, src_tp, src_dp, src_dist, dst_tp, dst_dp, dst_dist, vocab
):
    """Saved at one (TP, DP, sharded or not) layout, re-laid for another: every master and moment of every rank
    equals the slice the checkpoint loader cuts for that TP rank (load_part, from whole HF-layout tensors drawn
    here), laid flat and cut into the DP shard by hand (not through the optimizer's own sharding). Fused parts
    (q/k/v, gate/up), row- and vocab-parallel and replicated weights; small buckets, so that parameters straddle
    buckets and shards; a vocabulary TP 2 does not divide (its padding rows zero in each layout). In one process, with
    stand-in TP groups."""
    from engine.checkpoint import hf_tensor_specs

    fake_tp(monkeypatch)
    cfg, small = PPOConfig(), dataclasses.replace(ModelConfig.named("tiny"), num_layers=1, vocab_size=vocab)
    gen = torch.Generator().manual_seed(0)
    specs = hf_tensor_specs(Transformer(small, "lm", dtype=torch.bfloat16))
    whole = {k: {n: torch.randn(sp.shape, generator=gen) for n, sp in specs.items()} for k in ("m", "a", "b")}

    def make(tp, dp, rank, distributed, bucket_bytes):  # rank's model (its TP slices), optimizer, expected values
        group = FakeGroup(tp, rank % tp) if tp > 1 else None
        model = Transformer(small, "lm", group=group, dtype=torch.float32)
        local = {}
        for k, full in whole.items():
            for n, sp in hf_tensor_specs(model).items():
                sp.module.load_part(full[n], sp.part, n)  # what a TP rank loads of a whole tensor
            local[k] = [p.detach().clone() for p in model.parameters()]
        model.to(torch.bfloat16)
        grid = ProcessGrid(rank=rank, world_size=tp * dp, tp=tp, dp=dp)
        opt = optim.make_optimizer(model, cfg, grid, distributed=distributed, bucket_bytes=bucket_bytes)
        if opt.buckets is None:
            return opt, local
        shards = {k: [] for k in local}
        for b in opt.buckets:  # each bucket's flat values, zero-padded, cut into this rank's shard
            for k, ts in local.items():
                flat = torch.cat([ts[i].reshape(-1) for i in b.params])
                flat = torch.cat([flat, flat.new_zeros(b.numel - flat.numel())])
                shards[k].append(flat[b.lo : b.lo + b.numel // dp])
        return opt, shards

    states = []
    for rank in range(src_tp * src_dp):
        # saved with buckets of several parameters (one starts inside a bucket and crosses a DP shard's edge)
        src, want = make(src_tp, src_dp, rank, src_dist, 4 * 20000)
        assert (src.buckets is not None) == src_dist and (not src_dist or len(src.buckets) > 3)
        for k, m in enumerate(src.masters):
            m.copy_(want["m"][k])
            st = src.adam.state[m]
            st["exp_avg"].copy_(want["a"][k])
            st["exp_avg_sq"].copy_(want["b"][k])
            st["step"].fill_(5)
        states.append(optim.optimizer_state(src))
    # only the saved ranks' files that engine.resume reads for a re-layout (engine.reshard.needed_ranks)
    needed = needed_ranks(src_tp, src_dp, src_dist)
    saved = SavedOptimizer([st if r in needed else None for r, st in enumerate(states)], src_tp, src_dp)
    for rank in range(dst_tp * dst_dp):
        dst, want = make(dst_tp, dst_dp, rank, dst_dist, 4 * 3001)
        masters, adam = relayout(dst, saved, dst_tp, rank % dst_tp)
        assert len(masters) == len(want["m"]) == len(adam["state"])
        for k, m in enumerate(masters):
            assert torch.equal(m, want["m"][k]), (rank, k)
            assert torch.equal(adam["state"][k]["exp_avg"], want["a"][k]), (rank, k)
            assert torch.equal(adam["state"][k]["exp_avg_sq"], want["b"][k]), (rank, k)
            assert float(adam["state"][k]["step"]) == 5
    if src_dist and not dst_dist:  # the whole parameters need every saved rank's shards
        lost = SavedOptimizer([*states[:-1], None], src_tp, src_dp)
        with pytest.raises(ValueError, match=f"needs the state of saved rank {len(states) - 1}"):
            relayout(dst, lost, dst_tp, 0)


def test_a_checkpoint_with_masters_of_only_some_parameters_is_refused():
    """A checkpoint of another dtype's run holds fp32 masters of every parameter (a bf16 run's) or of none (an fp32
    run's); any other count cannot be matched to the parameters and is refused, naming the dtype."""
    from engine.reshard import _saved_mixed

    assert _saved_mixed(0, 5) == [] and _saved_mixed(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="fp32 masters of 3 of the 5 parameters: resume with the dtype"):
        _saved_mixed(3, 5)


def _fake_ckpt(out, n, complete=True, state=True):
    d = os.path.join(out, f"checkpoint-{n:06d}")
    for m in ("policy", "value"):
        os.makedirs(os.path.join(d, m))
        if complete:
            open(os.path.join(d, m, "config.json"), "w").close()
    if state:
        open(os.path.join(d, "state-rank00000.pt"), "w").close()
    return d


@pytest.mark.parametrize("lacks", [{"complete": False}, {"state": False}], ids=["config", "state_file"])
def test_pruning_keeps_complete_checkpoints_past_an_incomplete_one(tmp_path, lacks):
    """An incomplete checkpoint (a model's config.json or rank 0's state file missing: a run died writing it) is
    removed and does not count among the kept ones."""
    from engine.resume import prune_checkpoints

    _fake_ckpt(tmp_path, 1)
    _fake_ckpt(tmp_path, 2, **lacks)
    _fake_ckpt(tmp_path, 3)
    prune_checkpoints(str(tmp_path), "checkpoint-000003", keep=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000001", "checkpoint-000003"]


def test_atomic_write_syncs_the_file_before_the_rename(tmp_path, monkeypatch):
    import engine.durable as durable

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))  # fmt: skip
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b)))
    durable.atomic_write(str(tmp_path / "x"), lambda f: f.write(b"data"))
    assert events.index(("fsync", False)) < events.index(("replace", None)), events


def test_an_atomic_write_that_fails_leaves_the_file_and_no_partial_copy(tmp_path):
    """A full disk in the middle of a write (a 13B run's state file is tens of GB): the file keeps its old bytes and
    the partial copy is removed, not left on the full disk (nor a `latest.tmp-PID` in the output directory for good)."""
    import errno

    import engine.durable as durable

    (tmp_path / "x").write_bytes(b"old")

    def write(f):
        f.write(b"ha")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left on device") as e:
        durable.atomic_write(str(tmp_path / "x"), write)
    assert os.listdir(tmp_path) == ["x"] and (tmp_path / "x").read_bytes() == b"old"
    assert e.value.filename == str(tmp_path / "x")  # (the error names the file: the kernel's carries none)


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # (@record's, under pytest's capture)
def test_a_full_disk_names_the_file_it_was_writing(tmp_path, monkeypatch, capsys):
    """The kernel's ENOSPC from a write, a flush or an fsync names no file, so the run's one line said "No space left
    on device: free space, then --resume ..." without saying where: every write of the run's own (the JSONL logs'
    appends, the atomic writes of `latest` and the state files, a checkpoint's shards) names its file now."""
    import errno

    from engine import checkpoint, durable, train_ppo

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class Full:
        def __init__(self, *a, **k):
            pass

        __enter__ = lambda self: self  # noqa: E731
        __exit__ = lambda self, *a: None  # noqa: E731
        write = full

    with monkeypatch.context() as m:
        m.setattr(durable, "open", Full, raising=False)
        with pytest.raises(OSError) as e:
            durable.append(str(tmp_path / "metrics.jsonl"), "{}\n")
    assert e.value.filename == str(tmp_path / "metrics.jsonl") and e.value.errno == errno.ENOSPC
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "fsync_file", full)
        with pytest.raises(OSError) as e:
            checkpoint._write_shard({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    assert e.value.filename == str(tmp_path / "model.safetensors")
    # a run whose disk fills as it appends its first metrics line: its one line of error names the file
    out = tmp_path / "run"
    monkeypatch.setattr(durable, "open", lambda p, *a, **k: Full() if p.endswith("metrics.jsonl") else open(p, *a, **k),
                        raising=False)  # fmt: skip
    monkeypatch.delenv("TULU_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e, dispatch.reference_ops():
        train_ppo.cli(["--output-dir", str(out), "--max-iterations", "1", *SMALL])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and err == (
        f"train_ppo.py: error: No space left on device writing {out}/metrics.jsonl: "
        "free space, then --resume continues exactly from the last checkpoint"
    )


def test_pruning_keeps_exactly_keep_checkpoints(tmp_path):
    from engine.resume import prune_checkpoints

    for n in range(1, 6):
        _fake_ckpt(tmp_path, n)
    prune_checkpoints(str(tmp_path), "checkpoint-000005", keep=3)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000003", "checkpoint-000004", "checkpoint-000005"]
    prune_checkpoints(str(tmp_path), "checkpoint-000005", keep=1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000005"]


def test_trim_logs_removes_the_evaluations_after_the_checkpoint(tmp_path):
    """eval/iter-N.jsonl of iterations after the one resumed from go (the resumed run evaluates them again); the
    checkpoint's own and earlier ones stay; so does a file of another name there (a user's copy, which raised a
    ValueError), while a later one's leftover from a killed write goes with it."""
    os.makedirs(tmp_path / "eval")
    for n in (2, 4, 6):
        (tmp_path / "eval" / f"iter-{n:06d}.jsonl").write_text("{}\n")
    for name in ("iter-4 copy.jsonl", "iter-notes.txt", "iter-000006.jsonl.tmp-123"):
        (tmp_path / "eval" / name).write_text("{}\n")
    trim_logs(str(tmp_path), 4)
    assert sorted(os.listdir(tmp_path / "eval")) == [
        "iter-000002.jsonl", "iter-000004.jsonl", "iter-4 copy.jsonl", "iter-notes.txt"
    ]  # fmt: skip


def test_starting_over_removes_a_linked_checkpoint_not_what_it_links_to(tmp_path):
    """--overwrite-output-dir where the run holds a checkpoint-N that is a symlink (a checkpoint moved to another
    disk) removes the link and leaves what it links to: rmtree refused the link, and the run stopped with a traceback
    halfway through emptying the directory (its `latest` naming a checkpoint already deleted)."""
    from engine.output_dir import start_fresh
    from engine.resume import LATEST

    out, kept = tmp_path / "out", _fake_ckpt(tmp_path / "elsewhere", 2)
    _fake_ckpt(out, 3)
    (out / "checkpoint-000002").symlink_to(kept)
    (out / LATEST).write_text(json.dumps({"checkpoint": "checkpoint-000003"}))
    start_fresh(str(out), True, 0)
    assert os.listdir(out) == [] and sorted(os.listdir(kept)) == ["policy", "state-rank00000.pt", "value"]


def test_starting_over_removes_the_earlier_runs_profiler_traces(tmp_path):
    """--profile-iteration's traces are a run's files: --overwrite-output-dir (and the tiny default's restart) removes
    them with its checkpoints and logs (they were left behind, an earlier run's trace beside the new run's)."""
    from engine.output_dir import start_fresh

    _fake_ckpt(tmp_path, 3)
    (tmp_path / "trace-iter000002-rank00000.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    start_fresh(str(tmp_path), True, 0)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_a_resume_that_cannot_continue_the_prompt_order_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    """Another --seed, or another prompt set (another --prompts file, --max-prompt-len, --eval-holdout), is refused
    naming the flag before any model is loaded: it was found only once the four models were (minutes at 13B)."""
    from engine.tokenizer import TINY_DIR, TINY_PROMPTS

    run_tiny(tmp_path, "--max-iterations", "1")  # (the tiny models, in init/)
    init, out = tmp_path / "init", tmp_path / "run"
    flags = ["--policy", str(init / "policy"), "--reward", str(init / "reward"), "--prompts", TINY_PROMPTS,
             "--tokenizer", TINY_DIR, "--max-iterations", "2", "--resume"]  # fmt: skip
    run_tiny(out, *flags[:-3], "--max-iterations", "1")
    monkeypatch.setattr(state_mod, "load_pretrained", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(ValueError, match=r"prompt order: saved seed 0, now 1 \(--seed: resume with the run's\)"):
        run_tiny(out, *flags, "--seed", "1")
    with pytest.raises(ValueError, match=r"saved num_prompts 48, now 40 \(another --prompts file, or .*--eval-holdout"):
        run_tiny(out, *flags, "--eval-holdout", "8")


def test_check_resumable_names_only_complete_checkpoints_and_the_newest(tmp_path):
    """check_resumable: an output directory not made yet, or holding only an incomplete checkpoint (a run killed in its
    first save), has nothing to lose: no refusal; otherwise the complete checkpoints are named, the newest as the one
    to write into `latest`."""
    from engine.resume import LATEST, check_resumable

    check_resumable(str(tmp_path / "not-yet"))
    _fake_ckpt(tmp_path, 3, complete=False)
    check_resumable(str(tmp_path))
    _fake_ckpt(tmp_path, 1)
    _fake_ckpt(tmp_path, 2)
    (tmp_path / LATEST).write_text(json.dumps({"checkpoint": "checkpoint-000005"}))
    with pytest.raises(
        FileNotFoundError,
        match=r"latest names checkpoint-000005, .*; it holds checkpoint-000001, checkpoint-000002: write "
        r'\{"checkpoint": "checkpoint-000002"\} into',
    ):
        check_resumable(str(tmp_path))


def test_resume_checkpoint_is_latests_or_the_newest_complete_one(tmp_path, monkeypatch):
    """resume_checkpoint: None for an output directory not made yet or holding no complete checkpoint; without `latest`
    the newest complete checkpoint by number (whatever order the directory lists them in); with `latest` the one it
    names (and a run that diverged names the same). check_resumable lets a `latest` naming a checkpoint that is there
    pass."""
    from types import SimpleNamespace

    from engine.resume import LATEST, check_resumable, resume_checkpoint

    assert resume_checkpoint(str(tmp_path / "not-yet")) is None
    _fake_ckpt(tmp_path, 3, complete=False)
    assert resume_checkpoint(str(tmp_path)) is None
    for n in (1, 2):
        _fake_ckpt(tmp_path, n)
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda d: sorted(real_listdir(d), reverse=True))
    assert resume_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-000002")
    diverged = SimpleNamespace(run=SimpleNamespace(output_dir=str(tmp_path)))  # (a run that diverged names it too)
    assert trainer._where_to_resume(diverged).startswith(f"the last checkpoint is {tmp_path / 'checkpoint-000002'}: ")
    (tmp_path / LATEST).write_text(json.dumps({"checkpoint": "checkpoint-000001"}))
    assert resume_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-000001")
    check_resumable(str(tmp_path))


def test_a_writable_directory_is_made_and_left_as_it_was(tmp_path):
    """why_unwritable: a directory that can hold a run's files is made if missing, and its probe file removed."""
    from engine.output_dir import why_unwritable

    assert why_unwritable(str(tmp_path / "new/out")) is None
    assert os.listdir(tmp_path / "new/out") == []


def test_start_fresh_names_what_would_delete_an_input(tmp_path):
    """An input inside the earlier run's checkpoint: a fresh run is refused as deleting it, overwrite or not;
    --eval-only as an evaluation of its own (it deletes nothing), and with --overwrite-output-dir naming that flag.
    Nothing is removed by a refusal; an input outside what is doomed is no refusal."""
    from engine.output_dir import start_fresh

    ckpt = _fake_ckpt(tmp_path, 1)
    inputs = {"--policy": os.path.join(ckpt, "policy")}
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=f"--policy {ckpt}/policy lies in {ckpt}, which starting a fresh run in "):
            start_fresh(str(tmp_path), overwrite, 0, inputs=inputs)
    with pytest.raises(FileExistsError, match="--eval-only writes an evaluation of its own"):
        start_fresh(str(tmp_path), False, 0, evaluation=True, inputs=inputs)
    with pytest.raises(ValueError, match=f"--policy {ckpt}/policy lies in {ckpt}, which --overwrite-output-dir would"):
        start_fresh(str(tmp_path), True, 0, evaluation=True, inputs=inputs)
    assert os.path.isdir(ckpt)
    samples = tmp_path / "samples.jsonl"  # (an input that is one of the run's files itself: the last run's samples
    samples.write_text("{}\n")  # as the next run's prompts)
    with pytest.raises(ValueError, match=f"--prompts {samples} lies in {samples}, which starting a fresh run in "):
        start_fresh(str(tmp_path), True, 0, inputs={"--prompts": str(samples)})
    start_fresh(str(tmp_path), True, 0, evaluation=True, inputs={"--policy": str(tmp_path / "elsewhere")})
    assert not os.path.exists(ckpt)


def test_a_resume_continues_with_the_runs_sampling_settings_and_says_evaluation_stopped(tmp_path, capsys):
    """A --resume that leaves out the run's --ignore-eos and --seed (run settings, not PPO hyperparameters) continues
    with the checkpoint's, as a straight run does (it sampled to EOS from then on, in silence; the seed was refused);
    one that leaves out the evaluation set says that eval.jsonl's curve ends there."""
    flags = ("--eval-prompts", "", "--ignore-eos", "--seed", "3")  # (the tiny default's models built from it too)
    straight = run_tiny(tmp_path / "straight", *flags, "--max-iterations", "4")
    run_tiny(tmp_path / "r", *flags, "--max-iterations", "2")
    resumed = run_tiny(tmp_path / "r", "--eval-prompts", "", "--resume", "--max-iterations", "4")
    assert no_timing(resumed) == no_timing(straight)[2:]
    assert all(m["response_len"] == 8 for m in resumed)  # (EOS ignored: every response at the limit)
    run_tiny(tmp_path / "e", "--max-iterations", "1")  # (the tiny default evaluates on its held-out prompts)
    capsys.readouterr()
    run_tiny(tmp_path / "e", "--eval-prompts", "", "--resume", "--max-iterations", "2")
    said = f"warning: {tmp_path / 'e' / 'eval.jsonl'} holds this run's evaluations, and this resumed run evaluates "
    assert said in capsys.readouterr().out


def test_a_resume_is_compared_with_the_last_launch_not_the_first(monkeypatch):
    """_warn_of_other_numerics reads the last line of launches.jsonl: a run resumed once at bfloat16 (warned then) and
    resumed again at bfloat16 continues that launch's numbers and is not warned again; one back at float32 is."""
    from engine import run_logs

    said = []
    monkeypatch.setattr(run_logs, "print0", said.append)
    launches = [{"dtype": "float32", "run": {}}, {"dtype": "bfloat16", "run": {}}]
    earlier = "".join(json.dumps(x) + "\n" for x in launches).encode()
    run_logs._warn_of_other_numerics(earlier, {"dtype": "bfloat16", "run": {}})
    assert said == []
    run_logs._warn_of_other_numerics(earlier, {"dtype": "float32", "run": {}})
    assert len(said) == 1 and "parameter dtype float32 where the run's last launch had bfloat16" in said[0]


def test_a_resume_at_another_kv_cache_dtype_is_named_and_an_older_record_is_not(monkeypatch):
    """_warn_of_other_numerics: a resume at another --kv-cache-dtype than the last launch's is said too, and one under
    another value of a switch that changes the numbers; a last record without a setting (an older engine's) is no
    difference."""
    from engine import run_logs

    said = []
    monkeypatch.setattr(run_logs, "print0", said.append)
    now = {"dtype": "bfloat16", "run": {"kv_cache_dtype": "fp8"}}
    run_logs._warn_of_other_numerics(json.dumps({"dtype": "bfloat16", "run": {"kv_cache_dtype": "auto"}}).encode(), now)
    assert len(said) == 1 and "KV-cache dtype fp8 where the run's last launch had auto (--kv-cache-dtype)" in said[0]
    run_logs._warn_of_other_numerics(json.dumps({"run": {}}).encode() + b"\n", now)
    assert len(said) == 1
    # the micro-batch size (another summation order), --ignore-eos, and under DP the token balance: named likewise
    del said[:]
    last = {"dtype": "bfloat16", "run": {"micro_batch_tokens": 64, "ignore_eos": True, "balance_dp_tokens": True}}
    now = {"dtype": "bfloat16", "dp": 2, "run": {"micro_batch_tokens": 8192, "ignore_eos": False,
                                                 "balance_dp_tokens": False}}  # fmt: skip
    run_logs._warn_of_other_numerics(json.dumps(last).encode(), now)
    assert len(said) == 3, said
    assert "micro-batch size 8192 where the run's last launch had 64 (--micro-batch-tokens)" in said[0]
    assert "ignore-EOS setting False where the run's last launch had True (--ignore-eos)" in said[1]
    assert "DP token balance False where the run's last launch had True (--balance-dp-tokens)" in said[2]
    run_logs._warn_of_other_numerics(json.dumps(last).encode(), {**now, "dp": 1})  # (one DP rank: nothing to balance)
    assert len(said) == 5
    # an engine switch that changes the numbers, set where it was not (or the reverse): named (the TP ones under TP
    # only); one that changes only the timing (an overlap) is not; a record without switches (an older engine's) is no
    # difference
    del said[:]
    same = {"dtype": "bfloat16", "run": {"kv_cache_dtype": "auto"}}
    last = {**same, "switches": {"TULU_ASYNC_TP": "1", "TULU_SP_OVERLAP": "0", "TULU_GRAD_SUMS": "0"}}
    now = {**same, "tp": 2, "switches": {"TULU_SYMM_ALL_REDUCE": "1"}}
    run_logs._warn_of_other_numerics(json.dumps(last).encode(), now)
    assert len(said) == 3, said
    assert "TULU_GRAD_SUMS=unset where the run's last launch had TULU_GRAD_SUMS=0" in said[0]
    assert "TULU_ASYNC_TP=unset where the run's last launch had TULU_ASYNC_TP=1" in said[1]
    assert "TULU_SYMM_ALL_REDUCE=1 where the run's last launch had TULU_SYMM_ALL_REDUCE=unset" in said[2]
    run_logs._warn_of_other_numerics(json.dumps(last).encode(), {**now, "tp": 1})  # (no TP: its switches do nothing)
    assert len(said) == 4 and "TULU_GRAD_SUMS" in said[3]
    run_logs._warn_of_other_numerics(json.dumps(same).encode(), now)
    run_logs._warn_of_other_numerics(json.dumps({**same, "switches": {"TULU_SYMM_ALL_REDUCE": "1"}}).encode(), now)
    assert len(said) == 4


def test_the_prompt_order_check_leaves_a_missing_state_file_to_the_load(tmp_path):
    """check_prompt_order reads rank 0's state file where there is one; a checkpoint without it is named when the
    trainer state is loaded (not here, by another message)."""
    from engine.resume import check_prompt_order

    ckpt = _fake_ckpt(tmp_path, 1, state=False)
    check_prompt_order(ckpt, [[1, 2]], PPOConfig(rollout_batch_size=1, train_batch_size=1), 0)


def test_an_output_dir_nested_in_another_runs_files_is_refused_either_way(tmp_path):
    """nested_run: a directory inside what a run (a directory with .run.lock) writes and deletes, its checkpoints,
    evaluations or traces, at any depth and through a link, is refused naming that run's file; so is a directory
    holding another run (its .run.lock) inside what it would write. A run in that run's directory outside its files
    (the tiny default's models), beside it, or in a checkpoint-named directory of no run is no refusal."""
    from engine.output_dir import RUN_LOCK, nested_run

    run = tmp_path / "run"
    (run / "models/x").mkdir(parents=True)
    (run / RUN_LOCK).touch()
    for inner in ("checkpoint-000001/x", "checkpoint-000003/a/b", "checkpoint-000002", "eval/x", "trace-iter000002/x"):
        error = nested_run(str(run / inner))
        assert isinstance(error, ValueError), inner
        how = "is" if "/" not in inner else "lies in"
        assert str(error) == (
            f"{run / inner} {how} {run / inner.split('/')[0]}, which the run writing {run} deletes as it prunes its "
            "checkpoints or starts over: give this run an --output-dir outside it"
        )
    os.symlink(run / "checkpoint-000001", tmp_path / "link")
    linked = str(nested_run(str(tmp_path / "link/x")))
    assert linked.startswith(f"{tmp_path / 'link/x'} lies in {run / 'checkpoint-000001'}, which the run writing {run}")
    for fine in ("models/x", "sub", "."):
        assert nested_run(str(run / fine)) is None, fine
    assert nested_run(str(tmp_path / "beside")) is None
    (tmp_path / "plain/checkpoint-000001").mkdir(parents=True)  # (no run there: a user's own directory)
    assert nested_run(str(tmp_path / "plain/checkpoint-000001/x")) is None
    # the other way: a run made inside what this one writes (before this one was a run there)
    (tmp_path / "plain/checkpoint-000001/x/y").mkdir(parents=True)
    (tmp_path / "plain/checkpoint-000001/x/y" / RUN_LOCK).touch()
    error = nested_run(str(tmp_path / "plain"))
    assert isinstance(error, ValueError) and str(error) == (
        f"{tmp_path / 'plain'} holds another run's output directory, {tmp_path / 'plain/checkpoint-000001/x/y'}, in "
        "checkpoint-000001, which this run would delete as it prunes its checkpoints or starts over: move that run out "
        "of there first, or give this run another --output-dir"
    )
    (tmp_path / "plain/checkpoint-000001/x/y" / RUN_LOCK).unlink()
    (tmp_path / "plain/models/z").mkdir(parents=True)  # (a run in its directory outside its files: no refusal)
    (tmp_path / "plain/models/z" / RUN_LOCK).touch()
    assert nested_run(str(tmp_path / "plain")) is None


def test_a_run_behind_a_link_in_this_runs_files_is_not_refused(tmp_path):
    """nested_run looks for another run inside what this one would delete as it prunes or starts over, and that
    deletion (shutil.rmtree) removes a link in a checkpoint, not the directory it names: another run there, behind a
    link, is no refusal; the same run in a directory of the checkpoint is."""
    from engine.output_dir import RUN_LOCK, nested_run

    other = tmp_path / "other"
    other.mkdir()
    (other / RUN_LOCK).touch()
    (tmp_path / "out/checkpoint-000001").mkdir(parents=True)
    os.symlink(other, tmp_path / "out/checkpoint-000001/link")
    assert nested_run(str(tmp_path / "out")) is None
    shutil.move(other, tmp_path / "out/checkpoint-000001/moved")
    assert f"holds another run's output directory, {tmp_path / 'out/checkpoint-000001/moved'}," in str(
        nested_run(str(tmp_path / "out"))
    )


def test_a_run_that_ended_still_marks_its_directory_for_nested_run(tmp_path):
    """nested_run after a run ended (its .run.lock removed as it ends): its `latest`, launches.jsonl or a log still
    mark its directory as a run's, inside whose checkpoints another output directory is refused, and which no other
    run's files may hold."""
    from engine.output_dir import RUN_LOCK, nested_run
    from engine.resume import LATEST
    from engine.run_logs import LAUNCHES, LOGS

    for i, mark in enumerate((LATEST, LAUNCHES, *LOGS)):
        run = tmp_path / f"m{i}" / "run"
        (run / "checkpoint-000001").mkdir(parents=True)
        (run / mark).touch()
        assert not (run / RUN_LOCK).exists()
        assert "which the run writing" in str(nested_run(str(run / "checkpoint-000001/x"))), mark
        outer = tmp_path / f"o{i}"
        (outer / "checkpoint-000001/x").mkdir(parents=True)
        (outer / "checkpoint-000001/x" / mark).touch()
        assert "holds another run's output directory" in str(nested_run(str(outer))), mark
    assert nested_run(str(tmp_path / "plain/checkpoint-000001/x")) is None  # (no run there: fine, as before)


def test_the_shared_directory_probe_is_the_file_with_its_token_or_none(tmp_path):
    """_holds, check_shared's look at rank 0's probe: a file there holding another token (or cut short, as a network
    file system may show a file being written) is not it; a probe path that cannot be read at all (the output
    directory a file, or the probe a directory, on this rank's node) is no probe seen, not an error."""
    from engine.output_dir import _holds

    probe = tmp_path / ".shared-test-abc"
    assert not _holds(str(probe), "abc")
    probe.write_text("ab")
    assert not _holds(str(probe), "abc")
    probe.write_text("abc")
    assert _holds(str(probe), "abc")
    (tmp_path / "file").write_text("")
    assert not _holds(str(tmp_path / "file/.shared-test-abc"), "abc")
    (tmp_path / "dir/.shared-test-abc").mkdir(parents=True)
    assert not _holds(str(tmp_path / "dir/.shared-test-abc"), "abc")


def test_a_blank_shared_directory_wait_is_the_minute(monkeypatch):
    """TULU_SHARED_DIR_WAIT_S set to spaces alone (an exported empty value padded, a blank in a job script) is unset:
    the minute, not a refusal of it as no number of seconds."""
    from engine.output_dir import SHARED_WAIT_S, shared_wait_s

    for blank in ("", " ", " \t "):
        monkeypatch.setenv("TULU_SHARED_DIR_WAIT_S", blank)
        assert shared_wait_s() == SHARED_WAIT_S == 60, repr(blank)


def _check_shared_cases_rank(rank, world, init_file, root, out_dir):
    import builtins
    import datetime
    import errno

    import torch.distributed as dist

    from engine import output_dir

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    got = []

    def check(directory, wait):
        os.environ["TULU_SHARED_DIR_WAIT_S"] = wait
        try:
            output_dir.check_shared(directory, rank)
            got.append("ok")
        except Exception as e:
            got.append(f"{type(e).__name__}: {e}")

    # a probe seen late (a network file system's cached view of the directory): waited for, not refused
    misses, holds = [], output_dir._holds
    output_dir._holds = lambda path, token: holds(path, token) if len(misses) >= 2 or misses.append(1) else False
    check(os.path.join(root, "late"), "10")
    output_dir._holds = holds
    # rank 0 cannot write its probe (a full disk): every rank raises at once, none waits for the probe
    real_open = builtins.open

    def full(file, *args, **kwargs):
        if rank == 0 and output_dir.SHARED_PROBE in str(file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, *args, **kwargs)

    builtins.open = full
    check(os.path.join(root, "full"), "10")
    builtins.open = real_open
    # each node its own directory: refused, and again when checked again (a refusal is no directory checked)
    for _ in range(2):
        check(os.path.join(root, f"local{rank}"), "0")
    # a wait that is no number of seconds on rank 1 alone: named on every rank, none left waiting for it
    check(os.path.join(root, "shared"), "abc" if rank == 1 else "10")
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


def test_check_shared_waits_for_a_late_probe_and_raises_on_every_rank_at_once(tmp_path):
    """check_shared on two ranks: a probe rank 1 sees only on its third look is waited for; rank 0 failing to write
    its probe, or rank 1 given a TULU_SHARED_DIR_WAIT_S that is no number, stops both ranks at once naming it (rather
    than rank 1 waiting out the minute, or rank 0 waiting in its next collective for the process group's timeout); a
    directory each node has its own copy of is refused on both, again when checked again, and rank 0's probe is not
    left in it."""
    import socket

    import torch.multiprocessing as mp

    from engine.output_dir import SHARED_PROBE

    root = tmp_path / "dirs"
    for name in ("late", "full", "local0", "local1", "shared"):
        (root / name).mkdir(parents=True)
    mp.spawn(_check_shared_cases_rank, args=(2, str(tmp_path / "init"), str(root), str(tmp_path)), nprocs=2, join=True)
    host = socket.gethostname()
    full = f"cannot write to the output directory {root / 'full'}: No space left on device"
    local = (
        f"the output directory {root / 'local1'} is not shared between the nodes: a file global rank 0 (host {host}) "
        f"wrote there is not seen by rank 1 (host {host}) within 0 s (TULU_SHARED_DIR_WAIT_S). Every rank saves its "
        "share of each checkpoint there and a resume reads them back: give --output-dir a path on a file system every "
        "node mounts, the same path on each"
    )
    wait = (
        "TULU_SHARED_DIR_WAIT_S='abc': not a number of seconds >= 0 (how long each rank looks for the file global rank "
        "0 writes into the output directory; unset for a minute)"
    )
    on = "checking the output directory failed on rank"
    assert json.loads((tmp_path / "rank0").read_text()) == [
        "ok", f"UnwritableOutput: {full}", *[f"FailedOnAnotherRank: {on} 1: {local}"] * 2,
        f"FailedOnAnotherRank: {on} 1: {wait}",
    ]  # fmt: skip
    assert json.loads((tmp_path / "rank1").read_text()) == [
        "ok", f"FailedOnAnotherRank: {on} 0: {full}", *[f"InvalidInput: {local}"] * 2, f"InvalidInput: {wait}",
    ]  # fmt: skip
    assert [n for d in root.iterdir() for n in os.listdir(d) if n.startswith(SHARED_PROBE)] == []


def _save_checkpoint_cases_rank(rank, world, out, out_dir, background):
    import errno
    import types

    from engine import resume
    from engine.distributed import raise_together

    init_gloo(rank, world, f"{out_dir}/init")

    # (tested on its own; its directory made at the finish, as the real one renames it into place then)
    def save_pretrained(model, path, defer=False, **kw):
        finish = lambda error=None: (raise_together(error, "save_pretrained"), os.makedirs(path, exist_ok=True))
        return types.SimpleNamespace(jobs=[], finish=finish) if defer else finish()

    resume.save_pretrained = save_pretrained
    resume._host_copy_fits = lambda state: True
    run = types.SimpleNamespace(output_dir=out, chat_template=None, policy=None, keep_checkpoints=2)
    state = types.SimpleNamespace(run=run, iteration=0, grid=types.SimpleNamespace(rank=rank), tokenizer=None,
                                  tokenizer_dir=None, policy=None, value=None, template_warned=False)  # fmt: skip
    resume.trainer_state_dict = lambda state, copy=False: {"iteration": state.iteration, "world_size": world}
    real = {name: getattr(resume, name) for name in ("remove_leftovers", "trainer_state_dict", "prune_checkpoints",
                                                     "_save_state_file")}  # fmt: skip
    got = []

    def save(iteration, name, fails):
        setattr(resume, name, fails)
        state.iteration = iteration
        said = lambda e: f"{type(e).__name__} {getattr(e, 'errno', None)}: {e}"  # noqa: E731
        if background:  # (written by a thread; its errors, and the finish's, met by finish_checkpoint)
            saving = lambda: (resume.save_checkpoint(state, background=True), resume.finish_checkpoint(state))
        else:
            saving = lambda: resume.save_checkpoint(state)
        got.extend(outcome(saving, done="saved", said=said))
        setattr(resume, name, real[name])

    def bug(*args):
        raise RuntimeError("a bug")

    def io_error(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    save(1, "trainer_state_dict", real["trainer_state_dict"])
    # rank 0 fails making checkpoint-2 by a bug of ours (no OSError): rank 1 does not go on to save into it
    save(2, "remove_leftovers", bug if rank == 0 else real["remove_leftovers"])
    # rank 1's state holds what does not pickle: rank 0 does not wait for it, and `latest` does not move
    unpicklable = lambda state, copy=False: {"iteration": state.iteration, "data": (x for x in ())}  # noqa: E731
    save(3, "trainer_state_dict", unpicklable if rank == 1 else real["trainer_state_dict"])
    # rank 0's pruning after `latest` moved fails (an I/O error): rank 1 does not go on to its next collective
    save(4, "prune_checkpoints", io_error if rank == 0 else real["prune_checkpoints"])

    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # rank 1's state file meets a full disk (in the background: on the thread): both stop, `latest` stays
    save(5, "_save_state_file", full_disk if rank == 1 else real["_save_state_file"])
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


@pytest.mark.parametrize("background", [False, True])
def test_save_checkpoint_raises_one_ranks_error_on_every_rank_at_once(tmp_path, background):
    """save_checkpoint on two ranks (gloo; the models' save left out): an error on one rank alone at any of its steps,
    a bug or an unpicklable state as well as a full disk, is raised on both at once, the other rank naming it (rather
    than that rank waiting in its next collective for the process group's timeout); `latest` moves only once every
    rank's state file is saved. The same in the background (the files written by a thread, the checkpoint completed
    by finish_checkpoint): each error met where the synchronous save meets it, or at the finish for the thread's."""
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_save_checkpoint_cases_rank, args=(2, str(out), str(tmp_path), background), nprocs=2, join=True)
    on = "saving a checkpoint failed on rank"
    pickling = "cannot pickle 'generator' object"
    full = "No space left on device"
    assert json.loads((tmp_path / "rank0").read_text()) == [
        "saved", True, "RuntimeError None: a bug", True, f"RuntimeError None: {on} 1: {pickling}", True,
        "OSError 5: [Errno 5] Input/output error", True, f"OSError 28: [Errno 28] {on} 1: {full}", True,
    ]  # fmt: skip
    assert json.loads((tmp_path / "rank1").read_text()) == [
        "saved", True, f"RuntimeError None: {on} 0: a bug", True, f"TypeError None: {pickling}", True,
        f"OSError 5: [Errno 5] {on} 0: Input/output error", True, f"OSError 28: [Errno 28] {full}", True,
    ]  # fmt: skip
    assert json.loads((out / "latest").read_text()) == {"checkpoint": "checkpoint-000004"}
    assert sorted(os.listdir(out / "checkpoint-000003")) == ["policy", "state-rank00000.pt", "value"]


def _resume_sites_rank(rank, world, root, out_dir):
    import errno
    import types

    from engine import output_dir, resume, run_logs

    init_gloo(rank, world, f"{out_dir}/init")
    got = []

    def call(fn, *args):
        got.extend(outcome(fn, *args))

    def on_rank_0(real, error):
        return (lambda *args: (_ for _ in ()).throw(error)) if rank == 0 else real

    # rank 0 cannot read a directory above the output directory (nested_run: a PermissionError)
    nested_run = output_dir.nested_run
    output_dir.nested_run = on_rank_0(nested_run, PermissionError(errno.EACCES, "Permission denied", root))
    call(output_dir.check_writable, os.path.join(root, "out"), rank)
    output_dir.nested_run = nested_run
    # --overwrite-output-dir: rank 0 may not delete the earlier run's checkpoint
    rmtree = output_dir.shutil.rmtree
    denied = PermissionError(errno.EACCES, "Permission denied", "checkpoint-000001")
    output_dir.shutil.rmtree = on_rank_0(rmtree, denied)
    call(output_dir.start_fresh, os.path.join(root, "earlier"), True, rank)
    output_dir.shutil.rmtree = rmtree
    # a value of the configuration that is no JSON on rank 0 (a bug of ours, no OSError)
    append = run_logs._append_launch
    run_logs._append_launch = on_rank_0(append, TypeError("Object of type PosixPath is not JSON serializable"))
    state = types.SimpleNamespace(run=types.SimpleNamespace(output_dir=root), grid=types.SimpleNamespace(rank=rank))
    call(run_logs.record_launch, state)
    run_logs._append_launch = append
    # --resume where rank 1's own state file is damaged: rank 0 does not go on to load the optimizers' state
    grid = types.SimpleNamespace(rank=rank, tp=1, dp=world, tp_rank=0)
    state = types.SimpleNamespace(grid=grid, policy_opt=types.SimpleNamespace(buckets=None))
    call(resume.load_trainer_state, state, os.path.join(root, "checkpoint-000001"))
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


def test_resume_checks_raise_one_ranks_error_on_every_rank_at_once(tmp_path):
    """The output directory's checks, a fresh start's deletions, launches.jsonl and a resume's state files on two
    ranks (gloo): an error on one rank alone, whatever its kind, is raised on both at once, the other naming it (rather
    than that rank waiting in its next collective for the process group's timeout)."""
    import torch.multiprocessing as mp

    root = tmp_path / "root"
    (root / "earlier/checkpoint-000001").mkdir(parents=True)
    ckpt = root / "checkpoint-000001"
    ckpt.mkdir()
    torch.save({"tp": 1, "world_size": 2, "policy_opt": {"distributed": False}}, ckpt / "state-rank00000.pt")
    (ckpt / "state-rank00001.pt").write_bytes(b"half a state file")
    mp.spawn(_resume_sites_rank, args=(2, str(root), str(tmp_path)), nprocs=2, join=True)
    denied = "[Errno 13] Permission denied"
    damaged = json.loads((tmp_path / "rank1").read_text())[6]
    assert damaged.startswith(f"InvalidInput: cannot read the state file {ckpt / 'state-rank00001.pt'} ("), damaged
    assert json.loads((tmp_path / "rank0").read_text()) == [
        f"PermissionError: {denied}: '{root}'", True, f"PermissionError: {denied}: 'checkpoint-000001'", True,
        "TypeError: Object of type PosixPath is not JSON serializable", True,
        f"FailedOnAnotherRank: resuming failed on rank 1: {damaged.removeprefix('InvalidInput: ')}", True,
    ]  # fmt: skip
    on = "failed on rank 0"
    assert json.loads((tmp_path / "rank1").read_text()) == [
        f"PermissionError: [Errno 13] checking the output directory {on}: Permission denied ({root})", True,
        f"PermissionError: [Errno 13] starting the run {on}: Permission denied (checkpoint-000001)", True,
        f"RuntimeError: recording the launch in launches.jsonl {on}: Object of type PosixPath is not JSON serializable",
        True, damaged, True,
    ]  # fmt: skip
    assert (root / "earlier/checkpoint-000001").exists()


def _lock_and_trim_rank(rank, world, root, out_dir):
    import types

    import torch.distributed as dist

    from engine import output_dir, resume
    from engine.errors import InvalidInput

    init_gloo(rank, world, f"{out_dir}/init")
    got = []

    def call(fn, *args):
        got.extend(outcome(fn, *args))

    call(output_dir.lock_output_dir, root, rank)  # (rank 0 alone takes it: rank 1, another process, is not refused)
    output_dir.unlock_output_dir(root)
    if rank == 0:  # (the reference model's weights unreadable on rank 0, which alone fingerprints them)
        resume.model_fingerprints = lambda run: (_ for _ in ()).throw(InvalidInput("ref: unreadable weights"))
    call(resume.fingerprint_models, None, None, rank)
    # --resume where rank 0's logs cannot be trimmed (an edited metrics.jsonl): rank 1 does not go on to load the
    # optimizers' state through collectives (the checkpoint's reading and the rest of the resume left out)
    sd = {"iteration": 1, "step": 1, "ppo_config": {}, "total_steps": 1, "data": None, "policy_opt": None}
    resume._load_states = lambda *args: (sd, None)
    resume._changed_hyperparameters = resume._resume_kl_coef = lambda *args: None
    resume.load_optimizer_state = lambda *args: dist.barrier()
    if rank == 0:
        resume.trim_logs = lambda *args: (_ for _ in ()).throw(InvalidInput("metrics.jsonl, line 2, is not JSON"))
    grid = types.SimpleNamespace(rank=rank, tp=1, dp=world, tp_rank=0)
    state = types.SimpleNamespace(grid=grid, policy_opt=types.SimpleNamespace(buckets=None), value_opt=None,
                                  cfg=PPOConfig(), total_steps=1, run=types.SimpleNamespace(output_dir=root),
                                  data=types.SimpleNamespace(load_state_dict=lambda d: None))  # fmt: skip
    call(resume.load_trainer_state, state, os.path.join(root, "checkpoint-000001"))
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


def test_the_lock_and_a_resumes_log_trimming_are_rank_0s_and_its_error_stops_both(tmp_path):
    """On two ranks (gloo): the output directory's lock is taken by global rank 0 alone (rank 1, another process, is
    not refused as a second run); the frozen models' fingerprints failing on rank 0, which alone reads them, and a
    resume whose logs rank 0 cannot trim stop rank 1 at once, naming rank 0's error, rather than rank 1 waiting in its
    next collective for the process group's timeout."""
    import torch.multiprocessing as mp

    root = tmp_path / "root"
    root.mkdir()
    mp.spawn(_lock_and_trim_rank, args=(2, str(root), str(tmp_path)), nprocs=2, join=True)
    edited = "metrics.jsonl, line 2, is not JSON"
    models = "ref: unreadable weights"
    assert json.loads((tmp_path / "rank0").read_text()) == [
        "ok", True, f"InvalidInput: {models}", True, f"InvalidInput: {edited}", True,
    ]  # fmt: skip
    assert json.loads((tmp_path / "rank1").read_text()) == [
        "ok", True, f"FailedOnAnotherRank: checking the reference and reward models failed on rank 0: {models}", True,
        f"FailedOnAnotherRank: resuming failed on rank 0: {edited}", True,
    ]  # fmt: skip


def test_a_resume_names_the_state_file_it_lacks(tmp_path):
    """_load_states: a checkpoint without rank 0's state file, or without this rank's, names the missing file and why
    it is read (MissingInput), on the same grid or another."""
    from engine.errors import MissingInput
    from engine.resume import _load_states

    grid = ProcessGrid(rank=1, world_size=2, dp=2)
    with pytest.raises(MissingInput, match=r"state-rank00000\.pt is missing \(every run writes it\)"):
        _load_states(str(tmp_path), grid, False)
    torch.save({"tp": 1, "world_size": 2, "policy_opt": {"distributed": False}}, tmp_path / "state-rank00000.pt")
    with pytest.raises(MissingInput, match=r"state-rank00001\.pt is missing \(resume reads the state file each rank"):
        _load_states(str(tmp_path), grid, False)
    sharded = {"distributed": True, "buckets": [[0]]}  # (an engine's that re-lays it: its buckets saved)
    torch.save({"tp": 1, "world_size": 2, "policy_opt": sharded, "value_opt": sharded}, tmp_path / "state-rank00000.pt")
    with pytest.raises(MissingInput, match=r"state-rank00001\.pt is missing \(re-laying the optimizer"):
        _load_states(str(tmp_path), ProcessGrid(), False)  # (one rank now: every saved rank's shard is read)


def _start_fresh_rank(rank, world, out, out_dir):
    import errno

    from engine import output_dir

    init_gloo(rank, world, f"{out_dir}/init")
    real = output_dir.run_files

    def run_files(path):  # (the output directory unreadable on rank 1's node alone)
        if rank == 1:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path)

    output_dir.run_files = run_files
    got = outcome(output_dir.start_fresh, out, False, rank)
    output_dir.run_files = real
    got += outcome(output_dir.start_fresh, out, False, rank)  # (readable on both: nothing there, nothing refused)
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


def test_a_fresh_start_one_rank_cannot_check_stops_every_rank_at_once(tmp_path):
    """start_fresh reads the output directory on every rank (a node whose mount of it is unreadable is not left to
    rank 0's view): rank 1 failing to list it stops both ranks at once, rank 0 naming rank 1's error."""
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_start_fresh_rank, args=(2, str(out), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    assert got == [
        [f"PermissionError: [Errno 13] starting the run failed on rank 1: Permission denied ({out})", True, "ok", True],
        [f"PermissionError: [Errno 13] Permission denied: '{out}'", True, "ok", True],
    ]


def _equal(a, b) -> bool:
    """Two state files' contents alike: every tensor to the bit, the rest equal."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _latest_before_each_iteration(monkeypatch) -> list:
    """The checkpoint `latest` names as each iteration starts (its N, None before the first)."""
    seen, real = [], trainer.ppo_iteration

    def iteration(state):
        last = latest_checkpoint(state.run.output_dir)
        seen.append(int(last.rsplit("-", 1)[1]) if last else None)
        return real(state)

    monkeypatch.setattr(trainer, "ppo_iteration", iteration)
    return seen


def test_checkpoints_written_in_the_background_are_a_synchronous_saves_bits(tmp_path, monkeypatch, capsys):
    """--async-save (the default): each checkpoint but the last is written by a thread while the next iteration runs,
    from host copies made at the save (the run's tensors change meanwhile), and `latest` names it once that iteration
    has run. Every file holds what --no-async-save writes (both models' weights; the state file's optimizer moments,
    masters, RNG and data order, to the bit), and a resume from a checkpoint written so ends as the straight run."""
    import threading

    import engine.resume as resume_mod

    flags = ["--max-iterations", "3", "--save-every", "1", "--keep-checkpoints", "3", "--eval-prompts", ""]
    seen = _latest_before_each_iteration(monkeypatch)
    # the thread writes nothing before the finish (the next iteration has changed every tensor by then)
    go, run, finish = threading.Event(), resume_mod._Writing._run, trainer.finish_checkpoint
    monkeypatch.setattr(resume_mod._Writing, "_run", lambda self, parts: (go.wait(), run(self, parts)))
    monkeypatch.setattr(trainer, "finish_checkpoint", lambda state: (go.set(), finish(state), go.clear())[1])
    background = run_tiny(tmp_path / "bg", *flags)
    assert seen == [None, None, 1]  # (checkpoint 1 completed after iteration 2, 2 after 3, the last at once)
    assert latest_checkpoint(str(tmp_path / "bg")).endswith("checkpoint-000003")
    seen.clear()
    straight = run_tiny(tmp_path / "sync", *flags, "--no-async-save")
    assert seen == [None, 1, 2]
    assert no_timing(background) == no_timing(straight)
    for n in (1, 2, 3):
        a, b = tmp_path / f"bg/checkpoint-{n:06d}", tmp_path / f"sync/checkpoint-{n:06d}"
        for head, sub in (("lm", "policy"), ("score", "value")):
            wa, wb = saved_weights(a / sub, head), saved_weights(b / sub, head)
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (n, sub)
        sa, sb = (torch.load(d / "state-rank00000.pt", weights_only=False) for d in (a, b))
        models = [{k: m["fingerprint"] for k, m in sd.pop("models").items()} for sd in (sa, sb)]  # (paths differ)
        assert _equal(sa, sb) and models[0] == models[1], n
        assert sorted(os.listdir(a)) == sorted(os.listdir(b)) and not any(".tmp-" in x for x in os.listdir(a))
    # a resume from the first, written while iteration 2 ran, repeats the rest exactly
    shutil.rmtree(tmp_path / "bg/checkpoint-000002")
    shutil.rmtree(tmp_path / "bg/checkpoint-000003")
    (tmp_path / "bg/latest").write_text(json.dumps({"checkpoint": "checkpoint-000001"}))
    resumed = run_tiny(tmp_path / "bg", *flags, "--resume")
    assert no_timing(straight[:1] + resumed) == no_timing(straight)
    wa, wb = (saved_weights(tmp_path / f"{d}/checkpoint-000003/policy", "lm") for d in ("bg", "sync"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "written before the run goes on" not in capsys.readouterr().out


def test_a_checkpoint_whose_host_copy_would_not_fit_is_written_at_once(tmp_path, monkeypatch, capsys):
    """Where the background save's host copy would take more than half the host's available memory, each checkpoint
    is written before the run goes on (said once), `latest` moving as the save returns."""
    import engine.resume as resume_mod

    monkeypatch.setattr(resume_mod, "host_available", lambda: 1024)
    seen = _latest_before_each_iteration(monkeypatch)
    run_tiny(tmp_path, "--max-iterations", "3", "--save-every", "1", "--eval-prompts", "")
    assert seen == [None, 1, 2]
    assert capsys.readouterr().out.count("checkpoints are written before the run goes on: their host copy") == 1


def _resume_other_checkpoint_rank(rank, world, out_dir, tmp, theirs):
    import engine.state as state_mod
    from engine.train_ppo import parse_args

    init_gloo(rank, world, f"{tmp}/init")
    if rank == 1:  # (this node's cached view of `latest`: the checkpoint before, or another)
        state_mod.resume_checkpoint = lambda output_dir: os.path.join(output_dir, theirs)
    cfg, run, _ = parse_args(["--policy", "p", "--reward", "r", "--prompts", "x.jsonl", "--output-dir", out_dir,
                              "--resume", "--rollout-batch-size", "8", "--train-batch-size", "4"])  # fmt: skip
    got = outcome(state_mod.setup, cfg, run)
    with open(os.path.join(tmp, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


@pytest.mark.parametrize(
    "mine, theirs",
    [("checkpoint-000002", "checkpoint-000001"), ("checkpoint-best", "checkpoint-000001"), ("best", "best")],
)
def test_ranks_that_see_different_checkpoints_to_resume_are_refused_together(tmp_path, mine, theirs):
    """A --resume whose ranks find different checkpoints (a node's NFS view of `latest` a minute old) is refused on
    every rank at once, naming both (rank 0's first; a name `latest` was pointed at by hand too), before anything
    loads: each rank would otherwise continue its own iteration, weights, optimizer shard and data position, sum
    metrics with the others, and hang in a collective later. Ranks that agree on a checkpoint of any name go on."""
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    for name in {mine, theirs}:
        (out / name).mkdir(parents=True)
    (out / "latest").write_text(json.dumps({"checkpoint": mine}))
    mp.spawn(_resume_other_checkpoint_rank, args=(2, str(out), str(tmp_path), theirs), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{rank}").read_text()) for rank in range(2)]
    if mine == theirs:  # (on to reading the checkpoint, which holds nothing here)
        assert all(g[0].endswith("best/state-rank00000.pt is missing (every run writes it)") for g in got), got
        return
    want = (
        f"InvalidInput: --resume: the ranks do not see the same checkpoint to continue in {out}: some {mine}, some "
        f"{theirs} (a node's cached view of a shared directory lags up to a minute on NFS; or a node's own copy): run "
        "again once every node sees the same `latest`"
    )
    assert got == [[want, True]] * 2


def test_a_run_removes_what_killed_writes_left_in_its_output_directory(tmp_path):
    """What a run killed mid-write left outside a checkpoint (latest.tmp-PID, a metrics or eval file's .tmp-PID, the
    tiny default's half-built init/policy.tmp-* model) is removed by the next run once it holds the directory's lock:
    no run writes them then, and none would take them up again (another PID, another random suffix); a user's own
    files there stay."""
    run_tiny(tmp_path, "--max-iterations", "1", "--eval-every", "1")
    left = [tmp_path / "latest.tmp-4242", tmp_path / "metrics.jsonl.tmp-77", tmp_path / "eval/iter-000001.jsonl.tmp-9"]
    for fn in left:
        fn.write_text("{}")
    (tmp_path / "init/policy.tmp-0a1b2c3d").mkdir()
    (tmp_path / "init/policy.tmp-0a1b2c3d/model.safetensors").write_bytes(b"half")
    kept = [tmp_path / "notes.tmp", tmp_path / "eval/mine.tmp-draft"]
    for fn in kept:
        fn.write_text("mine")
    run_tiny(tmp_path, "--max-iterations", "1", "--eval-every", "1", "--resume")
    assert not any(fn.exists() for fn in left) and not (tmp_path / "init/policy.tmp-0a1b2c3d").exists()
    assert all(fn.read_text() == "mine" for fn in kept)
    assert json.loads((tmp_path / "latest").read_text()) == {"checkpoint": "checkpoint-000001"}
