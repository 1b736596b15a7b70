"""The PPO loop on CPU with the tiny models: end to end, exact resume, micro-batching, bf16 masters,
NaN errors, the CLI, and data parallel 2 (torchrun, gloo) against 1 on the same global batch."""

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from engine import offload, optim, trainer
from engine import state as state_mod
from engine.checkpoint import load_pretrained
from engine.config import ModelConfig, PPOConfig
from engine.model import Transformer
from engine.parallel import ProcessGrid
from engine.reshard import SavedOptimizer, relayout
from engine.resume import latest_checkpoint, save_checkpoint, trim_logs
from engine.state import RunConfig
from engine.train_ppo import build_parser, main, parse_args, prepare_tiny
from kernels import dispatch
from tests.engine.ppo_dp_worker import naive_factory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--rollout-batch-size", "8", "--train-batch-size", "4", "--max-new-tokens", "8"]
TIMING = ("gen_tok_s", "score_tok_s", "train_tok_s", "time_generate", "time_score", "time_train", "time_iteration")
TIMING += ("time_gen_setup", "gen_tflops_gpu", "score_tflops_gpu", "train_tflops_gpu", "time_dp_wait")


def _run(out, *flags, factory=None):
    with dispatch.reference_ops():
        return main(["--output-dir", str(out), *SMALL, *flags], generator_factory=factory)


def _state(out, *flags, factory=None):
    cfg, run, _ = parse_args(["--output-dir", str(out), *SMALL, *flags])
    return state_mod.setup(cfg, prepare_tiny(run), generator_factory=factory or state_mod.make_generator)


def _weights(path, head):
    return load_pretrained(path, head=head).state_dict()


def _no_timing(history):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


def test_tiny_default_end_to_end_and_exact_resume(tmp_path):
    """Two iterations straight, against one iteration + checkpoint + --resume + one more."""
    straight = _run(tmp_path / "a", "--max-iterations", "2")
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
    trained, init = _weights(f"{a}/policy", "lm"), _weights(tmp_path / "a/init/policy", "lm")
    assert any(not torch.equal(trained[k], init[k]) for k in init)  # it learned something
    value, rm = _weights(f"{a}/value", "score"), _weights(tmp_path / "a/init/reward", "score")
    assert any(not torch.equal(value[k], rm[k]) for k in rm)

    first = _run(tmp_path / "b", "--max-iterations", "1")
    second = _run(tmp_path / "b", "--max-iterations", "2", "--resume")
    assert _no_timing(first + second) == _no_timing(straight)
    b = latest_checkpoint(str(tmp_path / "b"))
    for head, sub in (("lm", "policy"), ("score", "value")):
        wa, wb = _weights(f"{a}/{sub}", head), _weights(f"{b}/{sub}", head)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub
    sa = torch.load(f"{a}/state-rank00000.pt", weights_only=False)
    sb = torch.load(f"{b}/state-rank00000.pt", weights_only=False)
    for k in ("exp_avg", "exp_avg_sq"):
        for i, st in sa["value_opt"]["adam"]["state"].items():
            assert torch.equal(st[k], sb["value_opt"]["adam"]["state"][i][k])
    assert not os.path.exists(tmp_path / "b/checkpoint-000001")  # keep_checkpoints=1
    assert len((tmp_path / "b/metrics.jsonl").read_text().splitlines()) == 2
    launches = [json.loads(x) for x in (tmp_path / "b/launches.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in launches] == [0, 1]  # a fresh start, then the resumed launch
    assert [x["run"]["resume"] for x in launches] == [False, True] and launches[1]["run"]["max_iterations"] == 2
    assert set(launches[0]["ppo"]) == {f.name for f in dataclasses.fields(PPOConfig)}  # every hyperparameter
    assert launches[0]["ppo"]["kl_coef"] == PPOConfig().kl_coef and launches[0]["ppo"]["train_batch_size"] == 4
    assert launches[0]["versions"]["torch"] == torch.__version__ and launches[0]["versions"]["engine"]
    assert (launches[0]["world_size"], launches[0]["tp"], launches[0]["dp"], launches[0]["dtype"]) == (
        1,
        1,
        1,
        "float32",
    )


def test_sigterm_stops_after_the_iteration_with_a_checkpoint_and_resume_is_exact(tmp_path):
    """A scheduler's SIGTERM during iteration 2 of 3: the run finishes that iteration, checkpoints and returns; a
    resumed run then ends where a straight one does (weights and metrics)."""
    flags = ["--max-iterations", "3", "--eval-prompts", ""]  # (every generate call a rollout's)
    straight = _run(tmp_path / "a", *flags)
    calls, before = {"n": 0}, signal.getsignal(signal.SIGTERM)

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

    first = _run(tmp_path / "b", *flags, factory=factory)
    assert [m["iteration"] for m in first] == [1, 2]
    assert os.path.basename(latest_checkpoint(str(tmp_path / "b"))) == "checkpoint-000002"
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is gone with the loop
    second = _run(tmp_path / "b", *flags, "--resume")
    assert _no_timing(first + second) == _no_timing(straight)
    a, b = latest_checkpoint(str(tmp_path / "a")), latest_checkpoint(str(tmp_path / "b"))
    for head, sub in (("lm", "policy"), ("score", "value")):
        wa, wb = _weights(f"{a}/{sub}", head), _weights(f"{b}/{sub}", head)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub


def test_save_every_minutes_checkpoints_by_the_clock(tmp_path, monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(trainer.time, "monotonic", lambda: clock["t"])
    saved = []
    real = save_checkpoint

    def save(state):
        saved.append(state.iteration)
        return real(state)

    monkeypatch.setattr(trainer, "save_checkpoint", save)

    def tick(*a, **k):  # each log line is 4 minutes later
        clock["t"] += 240.0

    monkeypatch.setattr(trainer, "print0", tick)
    history = _run(tmp_path, "--max-iterations", "4", "--save-every-minutes", "7", "--keep-checkpoints", "9")
    assert len(history) == 4 and saved == [2, 4]  # 8 minutes after the start, then after the save at 2
    assert all(m["mem_gib_generate"] == m["mem_gib_train"] == 0.0 for m in history)  # (GPU only)


def test_resume_after_a_crash_keeps_one_metrics_line_per_iteration(tmp_path):
    """A run that logged iteration 3 but died before checkpointing it (and in the middle of writing iteration 4's
    line, and after leaving a checkpoint 1 without its value model and a 5 `latest` never pointed to) resumes from 2:
    metrics.jsonl then holds iterations 1, 2, 3 once each, the 3rd from the resumed run; the pruning keeps the
    complete checkpoint 2 beside the new 3 (--keep-checkpoints 2), not the dead run's leftovers."""
    _run(tmp_path, "--max-iterations", "3", "--save-every", "2", "--keep-checkpoints", "2")
    (tmp_path / "latest").write_text(json.dumps({"checkpoint": "checkpoint-000002"}))  # as if it died at 3
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "step": 8, "lr": 1e-')  # (killed mid-write)
    shutil.copytree(tmp_path / "checkpoint-000002/policy", tmp_path / "checkpoint-000001/policy")
    shutil.copytree(tmp_path / "checkpoint-000003", tmp_path / "checkpoint-000005")
    resumed = _run(tmp_path, "--max-iterations", "3", "--resume", "--keep-checkpoints", "2")
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2, 3]
    assert _no_timing(lines[2:]) == _no_timing(resumed)
    assert sorted(d.name for d in tmp_path.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n{"iteration": 2}\n{"iteration": 3, "lr')  # (alone)
    trim_logs(str(tmp_path), 2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iteration": 1}\n{"iteration": 2}\n'  # (rewritten)
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')  # (an edited file)
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2, is not a JSON record .*: mend or remove it"):
        trim_logs(str(tmp_path), 1)


def test_a_checkpoint_is_durable_before_latest_points_to_it(tmp_path, monkeypatch):
    """Every file is fsynced before its rename and every directory whose entries changed after it: each model's
    directory before it is renamed into place, the checkpoint's parent after, checkpoint-N before `latest` moves,
    and the output directory after `latest` is replaced and before the previous checkpoint is removed."""
    import engine.checkpoint as ckpt_mod
    import engine.resume as resume_mod

    state = _state(tmp_path, "--max-iterations", "1")
    events, real_rmtree = [], shutil.rmtree

    def fsync_dir(path):
        events.append(("dir", os.path.relpath(path, tmp_path)))

    monkeypatch.setattr(ckpt_mod, "fsync_dir", fsync_dir)
    monkeypatch.setattr(resume_mod, "fsync_dir", fsync_dir)
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
    assert tail == [("replace", "state-rank00000.pt"), ("dir", "checkpoint-000001"), ("dir", "."),
                    ("replace", "latest"), ("dir", "."), ("rm", "checkpoint-000000")], tail  # fmt: skip


def test_a_stop_signal_at_an_evaluation_is_made_up_for_when_resumed(tmp_path, capsys):
    """SIGTERM during the last iteration, when the final evaluation is due: the run checkpoints without it (a
    scheduler's grace period is for the checkpoint) and the resumed run evaluates first, so eval.jsonl ends as a
    straight run's; a resume with nothing put off evaluates nothing again."""
    straight = _run(tmp_path / "a", "--max-iterations", "2")
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

    first = _run(tmp_path / "b", "--max-iterations", "2", factory=factory)
    assert [m["iteration"] for m in first] == [1, 2] and [e["iteration"] for e in evals("b")] == [0]
    assert _run(tmp_path / "b", "--max-iterations", "2", "--resume") == []  # (no iteration left: the evaluation)
    ours, theirs = evals("b"), evals("a")
    assert [e["iteration"] for e in ours] == [0, 2]
    for k in ("score", "kl", "reward", "response_len"):
        assert ours[1][k] == theirs[1][k], k
    assert _no_timing(first) == _no_timing(straight)
    capsys.readouterr()
    _run(tmp_path / "b", "--max-iterations", "2", "--resume")
    assert [e["iteration"] for e in evals("b")] == [0, 2]  # (made up once)
    assert "nothing to train: the run has made its 2 iterations (--max-iterations up to 24 continues it)" in (
        capsys.readouterr().out
    )


def test_resuming_with_other_frozen_models_is_refused(tmp_path, monkeypatch, capsys):
    """The reference's and reward model's weights are fingerprinted into each checkpoint: a resume with a reward
    model of the same shape but other weights is refused before any weight is loaded (its rewards would measure
    something else), --resume-other-models lets it through with a warning, and the same files moved are accepted."""
    from engine.tokenizer import TINY_PROMPTS

    _run(tmp_path / "tiny", "--max-iterations", "1")  # (the tiny default's models, in tiny/init)
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
    run = lambda *f: _run(tmp_path / "run", *flags, "--policy", str(init / "policy"), *f)  # noqa: E731
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


def test_a_fresh_run_into_a_used_output_dir_is_refused_unless_overwritten(tmp_path):
    from engine.tokenizer import TINY_DIR, TINY_PROMPTS

    _run(tmp_path, "--max-iterations", "1")  # the tiny default (which starts over each time) leaves a run here
    flags = ["--policy", str(tmp_path / "init/policy"), "--reward", str(tmp_path / "init/reward"),
             "--prompts", TINY_PROMPTS, "--tokenizer", TINY_DIR, "--max-iterations", "1"]  # fmt: skip
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(checkpoint-000001, eval, eval.jsonl, ...\)"):
        _run(tmp_path, *flags)
    _run(tmp_path, *flags, "--overwrite-output-dir")
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1  # this run's line only
    assert not (tmp_path / "eval").exists()  # the earlier run's evaluations are gone (this one has no --eval-prompts)
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2  # this run's samples only
    assert (tmp_path / "init/policy/config.json").exists()  # other files stay
    # the next stage from this run's checkpoint, in the same directory: refused (starting over would delete the very
    # policy it loads), --overwrite-output-dir or not, and nothing is deleted
    ckpt = tmp_path / "checkpoint-000001"
    for how in ([], ["--overwrite-output-dir"], ["--tokenizer", str(ckpt / "policy"), "--overwrite-output-dir"]):
        stage = [*flags[:1], str(ckpt / "policy"), *flags[2:]] if "--tokenizer" not in how else flags
        with pytest.raises(ValueError, match=f"--(policy|tokenizer) {ckpt}/policy lies in {ckpt}, which starting a"):
            _run(tmp_path, *stage, *how)
        assert (ckpt / "policy/model.safetensors").exists() and (tmp_path / "metrics.jsonl").exists()
    # a run that ended no iteration (out of memory in its first rollout, say) left only its launch and first evaluation:
    # the refusal says there is nothing to continue, and --resume starts over
    fresh = tmp_path / "unfinished"
    fresh.mkdir()
    (fresh / "launches.jsonl").write_text('{"iteration": 0}\n')
    (fresh / "eval.jsonl").write_text('{"iteration": 0}\n')
    with pytest.raises(FileExistsError, match=r"\(eval.jsonl, launches.jsonl\): it ended no iteration: --resume or"):
        _run(fresh, *flags)
    _run(fresh, *flags, "--resume")
    assert len((fresh / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_checkpoint_of_the_wrong_kind_is_refused_before_anything_is_read_or_cleared(tmp_path, monkeypatch):
    """A reward model saved as a causal LM (or a policy as a classifier) is refused from the files' headers: before
    any model's weights are read, and before --overwrite-output-dir clears the run there (nothing is lost); a
    checkpoint path that is no directory is named as its flag's, not as the tokenizer's it defaults to."""
    from engine.evaluate import evaluate_only
    from engine.tokenizer import TINY_DIR, TINY_EVAL_PROMPTS, TINY_PROMPTS

    _run(tmp_path, "--max-iterations", "1")  # the tiny default leaves a run here
    init = tmp_path / "init"
    flags = ["--prompts", TINY_PROMPTS, "--tokenizer", TINY_DIR, "--max-iterations", "1", "--overwrite-output-dir"]
    monkeypatch.setattr(state_mod, "load_pretrained", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(
        ValueError,
        match=rf"^--reward: checkpoint {init}/policy is missing tensor score.weight .*"
        r"a causal-LM checkpoint: this model is a LlamaForSequenceClassification with num_labels=1",
    ):
        _run(tmp_path, "--policy", str(init / "policy"), "--reward", str(init / "policy"), *flags)
    with pytest.raises(ValueError, match=rf"--reference: checkpoint {init}/reward is missing tensor lm_head.weight "
                       r".*a sequence-classification checkpoint: this model is a causal LM"):  # fmt: skip
        _run(tmp_path, "--policy", str(init / "policy"), "--reference", str(init / "reward"),
             "--reward", str(init / "reward"), *flags)  # fmt: skip
    monkeypatch.setattr(state_mod, "check_memory", lambda *a, **k: pytest.fail("planned before the paths were checked"))
    with pytest.raises(FileNotFoundError, match=r"--policy /nowhere/policy: no such directory \(a local checkpoint"):
        _run(tmp_path, "--policy", "/nowhere/policy", "--reward", str(init / "reward"), *flags)
    monkeypatch.undo()
    monkeypatch.setattr(state_mod, "load_pretrained", lambda *a, **k: pytest.fail("weights read"))
    shutil.copytree(init / "reward", tmp_path / "truncated")
    (tmp_path / "truncated/config.json").write_text("{")
    with pytest.raises(ValueError, match=rf"^--reward: {tmp_path}/truncated/config.json is not valid JSON \(Expecting"):
        _run(tmp_path, "--policy", str(init / "policy"), "--reward", str(tmp_path / "truncated"), *flags)
    (tmp_path / "truncated/config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match=r"^--reference: architecture GPT2LMHeadModel \(model_type 'gpt2'\) is not"):
        _run(tmp_path, "--policy", str(init / "policy"), "--reference", str(tmp_path / "truncated"),
             "--reward", str(init / "reward"), *flags)  # fmt: skip
    assert (tmp_path / "checkpoint-000001/policy/model.safetensors").exists() and (tmp_path / "metrics.jsonl").exists()
    cfg, run, _ = parse_args(["--eval-only", "--policy", str(init / "policy"), "--reward", str(init / "policy"),
                              "--eval-prompts", TINY_EVAL_PROMPTS, "--output-dir", str(tmp_path)])  # fmt: skip
    with pytest.raises(ValueError, match=rf"--reward: checkpoint {init}/policy is missing tensor score.weight"):
        evaluate_only(cfg, run, ProcessGrid())
    assert (tmp_path / "metrics.jsonl").exists()


def test_micro_batches_accumulate_to_the_same_update(tmp_path):
    one = _run(tmp_path / "one", "--max-iterations", "1", "--micro-batch-tokens", "100000", factory=naive_factory)
    many = _run(tmp_path / "many", "--max-iterations", "1", "--micro-batch-tokens", "30", factory=naive_factory)
    for k in ("policy_loss", "value_loss", "entropy", "grad_norm_policy", "grad_norm_value"):
        assert one[0][k] == pytest.approx(many[0][k], rel=1e-4, abs=1e-6), k
    a, b = latest_checkpoint(str(tmp_path / "one")), latest_checkpoint(str(tmp_path / "many"))
    wa, wb = _weights(f"{a}/policy", "lm"), _weights(f"{b}/policy", "lm")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_easylm_quirk_recomputes_old_logprobs_per_minibatch(tmp_path):
    """With the quirk the ratio is exactly 1 in every minibatch (1 PPO epoch); without it, not after step 1."""
    flags = ("--max-iterations", "1", "--learning-rate", "1e-2", "--warmup-ratio", "0")
    quirk = _run(tmp_path / "q", *flags, "--recompute-old-logprobs-per-minibatch", factory=naive_factory)[0]
    plain = _run(tmp_path / "p", *flags, factory=naive_factory)[0]
    assert quirk["ratio"] == pytest.approx(1.0, abs=1e-6) and quirk["approx_kl"] < 1e-10
    assert abs(plain["ratio"] - 1.0) > 1e-4 and plain["approx_kl"] > 1e-8


def test_bf16_parameters_keep_fp32_masters_and_are_updated_in_place(tmp_path):
    state = _state(tmp_path, "--dtype", "bfloat16", "--max-iterations", "1", "--learning-rate", "1e-3")
    params = list(state.policy.parameters())
    ptrs = [p.data_ptr() for p in params]
    before = [p.detach().clone() for p in params]
    assert state.generator.model is state.policy
    assert all(m.dtype == torch.float32 and m is not p for m, p in zip(state.policy_opt.masters, params))
    with dispatch.reference_ops():
        trainer.train(state)
    assert [p.data_ptr() for p in state.policy.parameters()] == ptrs  # the very same tensors
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    for m, p in zip(state.policy_opt.masters, params):
        assert torch.equal(m.to(torch.bfloat16), p)


def test_mixed_optimizer_step_matches_fp32_adam():
    """bf16 parameters with fp32 masters step as fp32 Adam on the same values, each step's grads the fp32 sum of two
    micro-batches' bf16 grads (accumulate_grads adds each into the master grads)."""
    cfg = PPOConfig(max_grad_norm=0.5)
    grid = ProcessGrid()
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    m32 = Transformer(small, "score", dtype=torch.float32).init_weights(seed=1)
    m16 = Transformer(small, "score", dtype=torch.bfloat16)
    with torch.no_grad():
        for a, b in zip(m32.parameters(), m16.parameters()):
            a.copy_(a.to(torch.bfloat16))  # start both from bf16-exact values
            b.copy_(a)
    o32, o16 = optim.make_optimizer(m32, cfg), optim.make_optimizer(m16, cfg)
    for _ in range(3):
        grads = [[torch.randn(a.shape).to(torch.bfloat16) for a in m32.parameters()] for _ in range(2)]
        for a, g1, g2 in zip(m32.parameters(), *grads):
            a.grad = g1.float() + g2.float()
        for micro in grads:
            for b, g in zip(m16.parameters(), micro):
                b.grad = g.clone()
            optim.accumulate_grads(o16)
        n32 = optim.optimizer_step(o32, 1e-2, cfg, grid)
        n16 = optim.optimizer_step(o16, 1e-2, cfg, grid)
        assert torch.equal(n32, n16)
    for a, m, b in zip(m32.parameters(), o16.masters, m16.parameters()):
        assert torch.equal(a, m) and torch.equal(m.to(torch.bfloat16), b)


def test_distributed_optimizer_matches_plain_adam():
    """DP=2 (torchrun, gloo): the optimizer sharded over the ranks in small buckets against the unsharded one, and
    its checkpointed state reloaded (tests/engine/optim_worker.py asserts)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.join(ROOT, "tests/engine/optim_worker.py")]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.count("optim worker ok") == 2, r.stdout[-3000:] + r.stderr[-3000:]


class _FakeGroup:
    """A stand-in TP group for building one rank's shards in one process (no collective is called)."""

    def __init__(self, size, rank):
        self.size, self.rank = size, rank


@pytest.mark.parametrize("src_tp,src_dp,src_dist,dst_tp,dst_dp,dst_dist", [
    (1, 3, True, 1, 2, True),  # DP 3 sharded -> DP 2 sharded (uneven padding, parameters across buckets and shards)
    (1, 3, True, 1, 1, False),  # DP 3 sharded -> one process
    (2, 3, True, 1, 1, False),  # TP 2 x DP 3 sharded -> one process
    (2, 1, False, 1, 2, True),  # TP 2 unsharded -> DP 2 sharded
    (1, 2, True, 2, 1, False),  # DP 2 sharded -> TP 2
    (1, 1, False, 2, 3, True),  # one process -> TP 2 x DP 3 sharded
])  # fmt: skip
def test_optimizer_state_relaid_for_another_tp_degree(monkeypatch, src_tp, src_dp, src_dist, dst_tp, dst_dp, dst_dist):
    """Saved at one (TP, DP, sharded or not) layout, re-laid for another: every master and moment of every rank
    equals the slice the checkpoint loader cuts for that TP rank (load_part, from whole HF-layout tensors drawn
    here), laid flat and cut into the DP shard by hand (not through the optimizer's own sharding). Fused parts
    (q/k/v, gate/up), row- and vocab-parallel and replicated weights; small buckets, so that parameters straddle
    buckets and shards. In one process, with stand-in TP groups."""
    import engine.model
    import engine.parallel
    from engine.checkpoint import hf_tensor_specs

    for mod in (engine.parallel, engine.model):
        monkeypatch.setattr(mod, "group_size", lambda g: 1 if g is None else g.size, raising=False)
        monkeypatch.setattr(mod, "group_rank", lambda g: 0 if g is None else g.rank, raising=False)
    cfg, small = PPOConfig(), dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    gen = torch.Generator().manual_seed(0)
    specs = hf_tensor_specs(Transformer(small, "lm", dtype=torch.bfloat16))
    whole = {k: {n: torch.randn(sp.shape, generator=gen) for n, sp in specs.items()} for k in ("m", "a", "b")}

    def make(tp, dp, rank, distributed):  # rank's model (its TP slices), optimizer, and its expected values
        group = _FakeGroup(tp, rank % tp) if tp > 1 else None
        model = Transformer(small, "lm", group=group, dtype=torch.float32)
        local = {}
        for k, full in whole.items():
            for n, sp in hf_tensor_specs(model).items():
                sp.module.load_part(full[n], sp.part, n)  # what a TP rank loads of a whole tensor
            local[k] = [p.detach().clone() for p in model.parameters()]
        model.to(torch.bfloat16)
        grid = ProcessGrid(rank=rank, world_size=tp * dp, tp=tp, dp=dp)
        opt = optim.make_optimizer(model, cfg, grid, distributed=distributed, bucket_bytes=4 * 3001)
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
        src, want = make(src_tp, src_dp, rank, src_dist)
        assert (src.buckets is not None) == src_dist and (not src_dist or len(src.buckets) > 3)
        for k, m in enumerate(src.masters):
            m.copy_(want["m"][k])
            st = src.adam.state[m]
            st["exp_avg"].copy_(want["a"][k])
            st["exp_avg_sq"].copy_(want["b"][k])
            st["step"].fill_(5)
        states.append(optim.optimizer_state(src))
    saved = SavedOptimizer(states, src_tp, src_dp)
    for rank in range(dst_tp * dst_dp):
        dst, want = make(dst_tp, dst_dp, rank, dst_dist)
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


def test_optimizer_steps_as_torch_adamw_from_the_first_step():
    """Our optimizer allocates Adam's moments at construction (a step at lr 0): the parameters stay as they were,
    and its steps equal a fresh torch.optim.AdamW's bit for bit (the step count starts from 0 again)."""
    cfg = PPOConfig(max_grad_norm=0.0, weight_decay=0.1)
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    ours = Transformer(small, "score", dtype=torch.float32).init_weights(seed=3)
    plain = Transformer(small, "score", dtype=torch.float32).init_weights(seed=3)
    opt = optim.make_optimizer(ours, cfg)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), plain.parameters()))
    assert all(st["exp_avg"].shape == p.shape for p, st in opt.adam.state.items())  # allocated already
    ref = torch.optim.AdamW(plain.parameters(), lr=1e-2, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)  # fmt: skip
    for step in range(3):
        for a, b in zip(ours.parameters(), plain.parameters()):
            g = torch.randn(a.shape, generator=torch.Generator().manual_seed(step))
            a.grad, b.grad = g.clone(), g.clone()
        optim.optimizer_step(opt, 1e-2, cfg, ProcessGrid())
        ref.step()
        for a, b in zip(ours.parameters(), plain.parameters()):
            assert torch.equal(a, b)


def test_a_loaded_optimizer_keeps_this_runs_hyperparameters():
    """Loading a saved optimizer (the same layout, or re-laid for another) takes its moments and step counts and keeps
    this run's betas, eps and weight decay (a resume may change them, and says so): the next step is the one a fresh
    AdamW with those hyperparameters and the saved moments takes."""
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    model = lambda: Transformer(small, "score", dtype=torch.float32).init_weights(seed=3)  # noqa: E731
    saved = optim.make_optimizer(model(), PPOConfig(max_grad_norm=0.0))
    for p in saved.params:
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    optim.optimizer_step(saved, 1e-2, PPOConfig(max_grad_norm=0.0), ProcessGrid())
    state = optim.optimizer_state(saved)
    new = PPOConfig(max_grad_norm=0.0, weight_decay=0.1, adam_betas=(0.5, 0.9), adam_eps=1e-6)
    for how in (state, SavedOptimizer([state], 1, 1)):
        opt = optim.make_optimizer(model(), new)
        optim.load_optimizer_state(opt, how)
        g = opt.adam.param_groups[0]
        assert (g["weight_decay"], tuple(g["betas"]), g["eps"]) == (0.1, (0.5, 0.9), 1e-6), type(how)
        assert all(torch.equal(opt.adam.state[m]["exp_avg"], saved.adam.state[n]["exp_avg"])
                   for m, n in zip(opt.masters, saved.masters))  # fmt: skip


def test_one_model_is_reduced_before_the_other_backward(tmp_path, monkeypatch):
    """A step runs the policy's micro-batches and reduces its grads (with the distributed optimizer that frees its
    whole fp32 grads) before the value model's backward, and updates both only after both reductions."""
    state = _state(tmp_path, "--max-iterations", "1", "--micro-batch-tokens", "16")
    names = {id(state.policy_opt): "policy", id(state.value_opt): "value"}
    calls = []

    def recorded(fn):
        orig = getattr(trainer, fn)

        def call(opt, *args):
            calls.append((fn, names[id(opt)]))
            return orig(opt, *args)

        monkeypatch.setattr(trainer, fn, call)

    for fn in ("accumulate_grads", "reduce_grads", "apply_update"):
        recorded(fn)
    with dispatch.reference_ops():
        trainer.train(state)
    steps, start = [], 0
    for i, c in enumerate(calls):
        if c == ("apply_update", "value"):
            steps.append(calls[start : i + 1])
            start = i + 1
    assert len(steps) == state.step == 2 and start == len(calls)
    for step in steps:
        k = step.index(("reduce_grads", "policy"))
        assert k > 1 and set(step[:k]) == {("accumulate_grads", "policy")}  # several micro-batches
        assert set(step[k + 1 : -3]) == {("accumulate_grads", "value")} and len(step) == 2 * k + 4
        assert step[-3:] == [("reduce_grads", "value"), ("apply_update", "policy"), ("apply_update", "value")]


def test_nan_loss_names_the_loss_iteration_and_step(tmp_path):
    state = _state(tmp_path, "--max-iterations", "1")
    with torch.no_grad():
        state.value.score.weight.fill_(float("nan"))
    with dispatch.reference_ops(), pytest.raises(FloatingPointError, match=r"value loss .*iteration 1, step 1 "):
        trainer.train(state)


def test_nonfinite_grad_norm_raises_before_any_update(tmp_path):
    state = _state(tmp_path, "--max-iterations", "1")
    before = {k: v.clone() for k, v in state.policy.state_dict().items()}
    state.value.layers[0].mlp.down_proj.weight.register_hook(lambda g: g * float("inf"))  # finite loss, inf grad
    with dispatch.reference_ops(), pytest.raises(FloatingPointError, match=r"gradient norm of the value \(.*step 1 "):
        trainer.train(state)
    assert all(torch.equal(v, state.policy.state_dict()[k]) for k, v in before.items())  # policy not stepped


def test_nonfinite_reward_scores_raise(tmp_path):
    state = _state(tmp_path, "--max-iterations", "1")
    with torch.no_grad():
        state.reward.norm.weight.fill_(float("inf"))
    with dispatch.reference_ops(), pytest.raises(FloatingPointError, match="reward model .* iteration 1"):
        trainer.train(state)


def test_profile_iteration_writes_a_trace_with_the_phases(tmp_path):
    _run(tmp_path, "--max-iterations", "2", "--profile-iteration", "2")
    (trace,) = [p for p in tmp_path.iterdir() if p.name.startswith("trace-")]
    assert trace.name == "trace-iter000002-rank00000.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"ppo/generate", "ppo/score", "ppo/train"} <= names
    with pytest.raises(ValueError, match=r"--profile-iteration 3 is past the run's last iteration \(2\)"):
        _run(tmp_path / "b", "--max-iterations", "2", "--profile-iteration", "3")  # (refused before loading models)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").glob("checkpoint-*"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train-batch-size", "0"], "train_batch_size must be >= 1, got 0"),
        (["--ppo-epochs", "0"], "ppo_epochs must be >= 1, got 0"),
        (["--lr-schedule", "cosine"], "lr_schedule must be 'linear' or 'constant', got 'cosine'"),
        (["--kl-estimator", "k9"], "kl_estimator must be 'k1', 'k2' or 'k3'"),
        (["--temperature", "0"], r"temperature must be > 0 for PPO's rollouts, got 0\.0 \(--eval-greedy"),
        (["--warmup-ratio", "2"], r"warmup_ratio must be in \[0, 1\], got 2\.0"),
        (["--clip-ratio", "-0.2"], "clip_ratio must be >= 0"),
        (["--adam-betas", "0.9", "1.0"], r"adam_betas must be two numbers in \[0, 1\)"),
        (["--max-iterations", "-1", "--keep-checkpoints", "0"], "keep_checkpoints must be >= 1, got 0; max_iterations"),
        (["--save-every", "-1"], "save_every must be >= 0"),
        (["--kv-cache-fraction", "1.5"], r"kv_cache_fraction must be in \(0, 1\]"),
        (["--learning-rate", "inf"], "learning_rate must be >= 0 and finite, got inf"),
        (["--missing-eos-penalty", "-inf"], "missing_eos_penalty must be finite, got -inf"),
        (["--dtype", "int8"], "dtype must be auto, bfloat16, float16 or float32, got 'int8'"),
        (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--kv-cache-dtype", "int4"], "kv_cache_dtype must be auto or fp8, got 'int4'"),
        (["--activation-checkpointing", "maybe"], "activation_checkpointing must be auto, on, off or a number"),
        (["--output-dir", ""], "output_dir must not be empty"),
        (["--top-k", "-1"], r"top_k must be >= 0 \(0: no top-k\), got -1"),
        (["--top-p", "0"], r"top_p must be in \(0, 1\], got 0\.0"),
        (["--reward", "r"], r"--reward/--prompts need --policy \(without --policy the tiny default builds its own"),
    ],
)
def test_nonsense_flags_are_refused_when_parsed(flags, message, capsys):
    """A usage error (exit code 2, the message after the usage lines), not a traceback from inside."""
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert e.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_only_global_rank_0_prints_usage_errors_and_help(monkeypatch, capsys):
    """Under torchrun every rank parses the same flags: one copy of a usage error or of --help is printed."""
    monkeypatch.setenv("RANK", "1")
    for flags in (["--top-k", "-1"], ["--help"]):
        with pytest.raises(SystemExit):
            parse_args(flags)
        assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--policy" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # (@record's, under pytest's capture)
def test_an_input_error_is_one_line_and_a_fault_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """The command line (cli) reports an error in the run's inputs in one line with exit code 2, and writes it into
    torchrun's error file (which torchrun's failure summary prints); TULU_TRACEBACK=1 raises it; any other error is
    raised with its traceback, which torch's @record writes into the error file."""
    from engine import train_ppo
    from engine.errors import MissingInput

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.delenv("TULU_TRACEBACK", raising=False)
    flags = ["--policy", str(tmp_path / "none"), "--reward", str(tmp_path), "--prompts", "p.jsonl"]
    line = f"train_ppo.py: error: --policy {tmp_path / 'none'}: no such directory (a local checkpoint directory or a "
    with pytest.raises(SystemExit) as e:
        train_ppo.cli(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(line) and err.count("\n") == 1 and "Traceback" not in err
    assert json.loads(error_file.read_text())["message"] == err.strip()
    monkeypatch.setenv("RANK", "1")  # (another rank of a torchrun: into its error file only)
    with pytest.raises(SystemExit):
        train_ppo.cli(flags)
    assert capsys.readouterr().err == "" and json.loads(error_file.read_text())["message"] == err.strip()
    monkeypatch.setenv("TULU_TRACEBACK", "1")
    with pytest.raises(MissingInput, match="no such directory"):
        train_ppo.cli(flags)
    monkeypatch.delenv("TULU_TRACEBACK")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):  # (a usage error: into torchrun's summary too)
        train_ppo.cli(["--top-k", "-1"])
    assert "error: top_k must be >= 0" in json.loads(error_file.read_text())["message"]

    def fault(*args, **kwargs):
        raise KeyError("a fault of the engine's")

    monkeypatch.setattr(train_ppo, "main", fault)
    with pytest.raises(KeyError):
        train_ppo.cli([])
    recorded = json.loads(error_file.read_text())["message"]
    assert "Traceback" in recorded["extraInfo"]["py_callstack"] and "a fault of the engine's" in recorded["message"]


def test_mistakes_in_the_inputs_are_input_errors_named_before_anything_is_built(tmp_path, monkeypatch):
    """Each common mistake is an InputError naming the flag or file, found before a model is built or anything is
    written; a fault inside a check (not the user's) keeps its own type and traceback."""
    from engine.errors import InputError
    from engine.resume import LATEST
    from engine.tokenizer import TINY_PROMPTS
    from engine.train_ppo import build_tiny_models

    policy, reward = build_tiny_models(str(tmp_path / "m"))
    out = tmp_path / "out"
    monkeypatch.setattr(state_mod, "load_pretrained", lambda *a, **k: pytest.fail("weights read"))
    monkeypatch.setattr(state_mod, "make_state", lambda *a, **k: pytest.fail("models built"))

    def refused(match, *flags, **paths):
        given = {"policy": policy, "reward": reward, "prompts": TINY_PROMPTS, **paths}
        argv = [x for k, v in given.items() for x in (f"--{k}", str(v))] + ["--max-iterations", "1", *flags]
        with pytest.raises(InputError, match=match):
            _run(out, *argv)
        assert not out.exists() or not any(out.iterdir())  # (nothing written: at most the directory checked)

    refused(rf"^--prompts {tmp_path}/none.jsonl: no such file", prompts=tmp_path / "none.jsonl")
    refused(rf"^--prompts {tmp_path}: a directory, not a JSONL file", prompts=tmp_path)
    refused(rf"^--eval-prompts {tmp_path}/e.jsonl: no such file", "--eval-prompts", str(tmp_path / "e.jsonl"))
    refused(r"^--samples-per-prompt 4 exceeds --gen-max-num-seqs 2", "--samples-per-prompt", "4",
            "--gen-max-num-seqs", "2", "--rollout-batch-size", "8", "--train-batch-size", "8")  # fmt: skip
    refused(r"^--activation-checkpointing 9: the policy has 2 layers", "--activation-checkpointing", "9")
    for name, text, match in (
        ("config.json", "[1]", r"config.json holds a JSON list, not an object"),
        ("config.json", '{"model_type": "llama"}', r"config.json has no vocab_size, hidden_size, intermediate_size"),
        ("config.json", None, r"config.json: num_attention_heads '4': not a positive integer"),
        ("generation_config.json", '{"eos_token_id": "x"}', r"generation_config.json: eos_token_id 'x' is not a"),
        ("tokenizer.json", '{"version": ', r"transformers cannot load the tokenizer in .*: is its tokenizer.json"),
    ):
        bad = tmp_path / f"bad-{len(text or '')}-{name}"
        shutil.copytree(policy, bad)
        if text is None:
            cfg = json.loads((bad / name).read_text())
            text = json.dumps({**cfg, "num_attention_heads": "4"})
        (bad / name).write_text(text)
        refused(("" if name == "tokenizer.json" else f"^--policy: {bad}/") + match, policy=bad)
    grid = ProcessGrid(rank=0, world_size=3, tp=3)
    cfg, run, _ = parse_args(["--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS])
    with pytest.raises(InputError, match=r"--tp 3 does not divide the policy model's attention heads \(4\)"):
        state_mod.check_context(run, cfg, grid)  # (on a CPU too: no memory plan there)
    # a damaged `latest` (here a directory) names itself
    (out / LATEST).mkdir(parents=True)
    with pytest.raises(InputError, match=r"latest is damaged \(IsADirectoryError"):
        _run(out, "--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS, "--resume")
    # a fault inside a check is no input error: it keeps its own type (and so its traceback at the command line)
    monkeypatch.setattr(state_mod, "check_checkpoint", lambda *a: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="^a bug$") as e:
        _run(tmp_path / "o2", "--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS)
    assert not isinstance(e.value, InputError)


def test_the_command_line_reports_an_input_error_in_one_line(tmp_path):
    """engine/train_ppo.py as a script: exit code 2 and one line on stderr, with nothing written."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TULU_TRACEBACK", None)
    cmd = [sys.executable, os.path.join(ROOT, "engine/train_ppo.py"), "--policy", str(tmp_path / "none"),
           "--reward", str(tmp_path), "--prompts", str(tmp_path / "p.jsonl"),
           "--output-dir", str(tmp_path / "out")]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("train_ppo.py: error: --policy ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_rollouts_sample_with_the_runs_top_k(tmp_path):
    """--top-k reaches the rollouts (and the evaluations that sample): top-k 1 draws what greedy decoding does, and
    the recipe's 50 draws other tokens than the whole vocabulary (the tiny preset's) does (the tiny vocabulary has
    512)."""
    from engine.rollout import generate_rollout, sampling_params

    prompts, ids = [[1, 5, 9], [1, 7, 3, 22], [1, 11]], [0, 1, 2]
    state = _state(tmp_path / "a", "--top-k", "1", "--max-new-tokens", "12", "--ignore-eos")
    with dispatch.reference_ops():
        top1 = generate_rollout(state, prompts, ids, sampling_params(state, 0)).responses
        greedy = generate_rollout(state, prompts, ids, sampling_params(state, 0, greedy=True)).responses
        state.cfg.top_k = 0
        free = generate_rollout(state, prompts, ids, sampling_params(state, 0)).responses
    assert top1 == greedy != free  # (the tiny init policy's likeliest token is EOS: without top-k it draws others)
    state = _state(tmp_path / "b", "--max-new-tokens", "12", "--ignore-eos")
    assert sampling_params(state, 0).top_k == 0 and sampling_params(state, 0).top_p == 1.0  # (the tiny preset's)
    responses = {}
    for k in (50, 0):
        state.cfg.top_k = k
        with dispatch.reference_ops():
            responses[k] = generate_rollout(state, prompts * 4, ids * 4, sampling_params(state, 0)).responses
    assert responses[50] != responses[0]


def test_each_iteration_and_the_evaluations_sample_their_own_noise(tmp_path):
    """A rollout's random stream is its iteration's (a later prompt epoch draws new responses to a prompt seen
    before) and evaluations have one of their own; the same stream draws the same responses."""
    from engine.evaluate import EVAL_STREAM
    from engine.rollout import generate_rollout, sampling_params

    state = _state(tmp_path / "a", "--max-new-tokens", "8", "--ignore-eos")
    prompts, ids = [[1, 5, 9], [1, 7, 3, 22]], [0, 1]
    with dispatch.reference_ops():
        draw = lambda stream: generate_rollout(state, prompts, ids, sampling_params(state, stream)).responses
        drawn = {s: draw(s) for s in (0, 1, EVAL_STREAM)}
        again = draw(1)
    assert again == drawn[1] and len({str(r) for r in drawn.values()}) == 3


def test_a_resume_keeps_the_checkpoints_hyperparameters_unless_given_again(tmp_path, capsys):
    """--resume takes every PPO hyperparameter not on its command line from the checkpoint (a default changed since,
    as lr_schedule and top_k were, does not change a run halfway; the resumed run is the straight one); one given
    again wins, and is named; a checkpoint from before top-k existed resumes sampling the whole vocabulary."""
    flags = ["--lr-schedule", "linear", "--top-k", "7", "--learning-rate", "3e-3"]
    straight = _run(tmp_path / "a", "--max-iterations", "2", *flags)
    _run(tmp_path / "b", "--max-iterations", "1", *flags)
    capsys.readouterr()
    resumed = _run(tmp_path / "b", "--max-iterations", "2", "--resume")
    assert "other than the checkpoint's" not in capsys.readouterr().out
    assert _no_timing(resumed) == _no_timing(straight[1:])
    state = _state(tmp_path / "b", "--max-iterations", "2", "--resume", "--top-k", "3")
    assert (state.cfg.lr_schedule, state.cfg.top_k, state.cfg.learning_rate) == ("linear", 3, 3e-3)
    assert "PPO hyperparameters other than the checkpoint's: top_k 7 -> 3" in capsys.readouterr().out
    # a checkpoint written before top_k / top_p were hyperparameters: its run sampled the whole vocabulary
    ckpt = latest_checkpoint(str(tmp_path / "b"))
    fn = f"{ckpt}/state-rank00000.pt"
    sd = torch.load(fn, weights_only=False)
    del sd["ppo_config"]["top_k"], sd["ppo_config"]["top_p"]
    torch.save(sd, fn)
    state = _state(tmp_path / "b", "--max-iterations", "2", "--resume")
    assert (state.cfg.top_k, state.cfg.top_p, state.cfg.lr_schedule) == (0, 1.0, "linear")
    assert "other than the checkpoint's" not in capsys.readouterr().out


def test_negative_numbers_in_scientific_notation_are_values():
    assert parse_args(["--missing-eos-penalty", "-1e3"])[0].missing_eos_penalty == -1000.0
    assert parse_args(["--missing-eos-penalty", "-2.5E+1"])[0].missing_eos_penalty == -25.0


def test_a_layout_that_cannot_run_is_refused_before_any_weight_is_read(tmp_path, monkeypatch, capsys):
    """Too few prompts for one rollout batch, or prompt + response limits beyond a model's context (the generator
    would cut responses there and PPO score them as without EOS), are refused before a checkpoint's weights are
    read; a rank's share of a minibatch that splits a prompt's samples is warned about."""
    from engine.data import check_fills_a_rollout

    monkeypatch.setattr(state_mod, "load_pretrained", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(ValueError, match=r"48 prompts cannot fill one rollout batch of 64 \(--rollout-batch-size\)"):
        _state(tmp_path / "a", "--rollout-batch-size", "64")
    with pytest.raises(ValueError, match=r"--max-prompt-len 128 \+ --max-new-tokens 2000 = 2128 tokens do not fit "
                       r"the policy model's context \(.*: max_position_embeddings 2048\); lower either"):  # fmt: skip
        _state(tmp_path / "b", "--max-new-tokens", "2000")
    check_fills_a_rollout(64, 64)
    state_mod.check_batch_sizes(PPOConfig(train_batch_size=8, rollout_batch_size=16, samples_per_prompt=3),
                                ProcessGrid(world_size=2, dp=2))  # fmt: skip
    out = capsys.readouterr().out
    assert "a rank's share of a minibatch (4 sequences) does not hold whole prompts' 3 samples" in out


@pytest.mark.parametrize("pad", [None, 2, 15])
def test_the_reward_is_read_where_transformers_reads_it(tmp_path, pad):
    """The reward model scores each packed sequence where LlamaForSequenceClassification does: its last token, or
    with a pad_token_id in the reward model's config its last token that is not the pad (a pad that is the EOS: the
    token before a final EOS; another id that ends a response: the token before it; a sequence of pads alone: its
    first token)."""
    from transformers import LlamaForSequenceClassification

    from engine.data import Rollout, pack
    from engine.rollout import reward_positions
    from engine.train_ppo import build_tiny_models

    _, reward = build_tiny_models(str(tmp_path / "tiny"))
    hf = LlamaForSequenceClassification.from_pretrained(reward, torch_dtype=torch.float64)
    hf.config.pad_token_id = pad
    hf.save_pretrained(tmp_path / "rm")
    ours = load_pretrained(str(tmp_path / "rm"), head="score", dtype=torch.float32)
    assert ours.config.pad_token_id == pad
    prompts, responses = [[1, 5, 9], [1, 7], [1, 4, 4], [2]], [[11, 12, 2], [13, 14, 15], [2, 2], [2]]
    ro = Rollout(prompts, responses, torch.tensor([True, False, True, True]), torch.zeros(9), [0, 3, 6, 8, 9])
    pk = pack(ro, [0, 1, 2, 3], torch.device("cpu"))
    with torch.no_grad(), dispatch.reference_ops():
        h = ours.hidden_packed(pk["ids"], pk["positions"], pk["cu_seqlens"])[reward_positions(pk, pad)]
        got = ours.head_packed(h)
        want = torch.cat([hf(input_ids=torch.tensor([p + r])).logits[:, 0] for p, r in zip(prompts, responses)])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    moved = (reward_positions(pk, pad) != pk["last"]).tolist()  # (read elsewhere than at the last token)
    assert moved == {None: [False] * 4, 2: [True, False, True, True], 15: [False, True, False, False]}[pad]


def test_help_lists_every_flag():
    text = build_parser().format_help()
    for cls in (PPOConfig, RunConfig):
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli") is not False:  # (RunConfig.ppo_flags: what parse_args saw, not a flag)
                assert "--" + f.name.replace("_", "-") in text, f.name
    cfg, run, tiny = parse_args(["--policy", "p", "--reward", "r", "--prompts", "x", "--no-whiten-advantages",
                                 "--adam-betas", "0.8", "0.9"])  # fmt: skip
    assert not tiny and not cfg.whiten_advantages and cfg.adam_betas == (0.8, 0.9)
    assert cfg.rollout_batch_size == 512 and run.policy == "p"  # the recipe, not the tiny preset
    flat = " ".join(text.split())  # each default said once: the tiny one where it differs, none after a comment's own
    assert "(default: 512; tiny default: 16)" in flat and "(default: 0; tiny default: 0)" not in flat
    assert "(default: the output directory's name) (default" not in flat


@pytest.mark.parametrize("samples", [1, 2])
def test_later_ppo_epochs_reshuffle_into_the_same_minibatches_on_any_dp_size(samples):
    """engine.trainer.minibatch_order: the ranks of DP 1, 2 and 4 (each holding the prompts PromptBatches deals it, with
    their samples) train on the same global minibatches in every epoch; each later epoch is a permutation of every
    rank's sequences, a new one per epoch and iteration, and mixes the minibatches (no minibatch of epoch 0 comes
    back whole)."""
    from types import SimpleNamespace

    from engine.data import PromptBatches

    prompts, train = 16, 8  # 16 x samples sequences, minibatches of 8: 2 x samples steps per epoch

    def minibatches(dp, epoch, iteration=0):
        cfg = PPOConfig(train_batch_size=train, samples_per_prompt=samples, rollout_batch_size=prompts)
        steps = []
        for rank in range(dp):
            state = SimpleNamespace(cfg=cfg, grid=SimpleNamespace(dp=dp, dp_rank=rank), run=RunConfig(seed=3),
                                    iteration=iteration)  # fmt: skip
            batches = PromptBatches([[i] for i in range(prompts)], prompts, dp_rank=rank, dp_size=dp)
            positions = next(batches)[0]  # (the prompts' places in the global batch: a permutation's values)
            glob = [batches.global_batch(0, 0).index(p) * samples + a for p in positions for a in range(samples)]
            order, per_step = trainer.minibatch_order(state, epoch, len(glob)), train // dp
            assert sorted(order) == list(range(len(glob))), order
            for k in range(len(glob) // per_step):
                if rank == 0:
                    steps.append(set())
                steps[k] |= {glob[i] for i in order[k * per_step : (k + 1) * per_step]}
        return steps

    first = minibatches(1, 0)
    assert first == [set(range(k * train, (k + 1) * train)) for k in range(prompts * samples // train)]
    for epoch in (1, 2):
        one = minibatches(1, epoch)
        assert minibatches(2, epoch) == one == minibatches(4, epoch) != first
        assert all(len(a & b) < train for a in one for b in first), (one, first)
    assert minibatches(1, 1) != minibatches(1, 2) and minibatches(1, 1) != minibatches(1, 1, iteration=1)


def test_phase_times_are_the_slowest_ranks(tmp_path, monkeypatch):
    """DP 2 with rank 1's rollout 3 s slower: the generation's time is the slowest rank's (rank 0's own would make its
    tokens/s 100x too high), the wait is shown as time_dp_wait, and training's time holds none of it."""
    monkeypatch.setenv("TEST_SLOW_ROLLOUT", "1:3")
    (m,) = _torchrun(tmp_path, 2, "slow", "--max-iterations", "1", "--eval-prompts", "")[0]["history"]
    assert m["time_generate"] >= 3.0 and m["time_dp_wait"] >= 2.5, m
    assert m["time_train"] < m["time_generate"] - 2.0, m
    assert m["gen_tok_s"] == pytest.approx(m["response_len"] * 8 / m["time_generate"], rel=1e-6)  # (8 sequences)


def _torchrun(tmp_path, nproc: int, name: str, *flags, fails: bool = False):
    """engine.train_ppo under torchrun (gloo, the naive sampler) in tmp_path/name: every rank's result (or, with
    `fails`, the output of a run that must fail)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the workers run the CPU reference ops
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           os.path.join(ROOT, "tests/engine/ppo_dp_worker.py"), str(out), "--output-dir", str(out), *SMALL,
           *flags]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if fails:
        assert r.returncode != 0
        return r.stdout + r.stderr
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [torch.load(out / f"result-rank{k}.pt", weights_only=False) for k in range(nproc)]


def test_dp2_tp2_matches_one_process(tmp_path):
    """4 processes (data parallel 2 x tensor parallel 2, gloo; the optimizer sharded over the 2 DP ranks and the
    tokens between the TP regions) against 1 on the same global batch: two samples per prompt and two PPO epochs, the
    second reshuffled into the same global minibatches on 2 ranks as on one (engine.trainer.minibatch_order)."""
    flags = ["--max-iterations", "1", "--ppo-epochs", "2", "--samples-per-prompt", "2"]
    ranks = _torchrun(tmp_path, 4, "dp2", *flags, "--tp", "2")
    one = _run(tmp_path / "dp1", *flags, factory=naive_factory)
    assert one[0]["step"] == 8  # (16 sequences, four minibatches in each epoch)
    for k, v in one[0].items():
        if k not in TIMING:
            assert ranks[0]["history"][0][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for sub, head in (("policy", "lm"), ("value", "score")):
        w1 = _weights(f"{latest_checkpoint(str(tmp_path / 'dp1'))}/{sub}", head)
        w4 = _weights(f"{latest_checkpoint(str(tmp_path / 'dp2'))}/{sub}", head)  # gathered TP shards
        for k in w1:
            torch.testing.assert_close(w4[k], w1[k], atol=1e-6, rtol=1e-5, msg=f"{sub} {k}")
    for k, v in ranks[0]["policy"].items():  # ranks 0 and 2: the same TP shard in the two DP replicas
        assert torch.equal(v, ranks[2]["policy"][k]), k
    # the held-out evaluations (the tiny default's, before and after): prompts split over the DP ranks
    evals = [[json.loads(x) for x in (tmp_path / d / "eval.jsonl").read_text().splitlines()] for d in ("dp1", "dp2")]
    assert [e["iteration"] for e in evals[1]] == [0, 1]
    for e1, e4 in zip(*evals, strict=True):
        for k, v in e1.items():
            if k != "time":
                assert e4[k] == (v if isinstance(v, (str, bool)) else pytest.approx(v, rel=1e-4, abs=1e-6)), k
    recs = [[json.loads(x) for x in (tmp_path / d / "eval/iter-000001.jsonl").read_text().splitlines()]
            for d in ("dp1", "dp2")]  # fmt: skip
    assert [r["response"] for r in recs[1]] == [r["response"] for r in recs[0]] and len(recs[1]) == 16


def test_dp2_distributed_optimizer_resumes_exactly(tmp_path):
    """DP=2 with the optimizer sharded over the ranks: two iterations straight equal one + --resume + one (weights,
    metrics, each rank's shard of the Adam moments), also with the state in host memory throughout (and the idle
    models' weights during the resumed run's rollout), and the unsharded
    optimizer's run; resuming a sharded checkpoint without sharding is refused with a clear error."""
    straight = _torchrun(tmp_path, 2, "a", "--max-iterations", "2")
    first = _torchrun(tmp_path, 2, "b", "--max-iterations", "1")
    second = _torchrun(tmp_path, 2, "b", "--max-iterations", "2", "--resume")
    assert _no_timing(first[0]["history"] + second[0]["history"]) == _no_timing(straight[0]["history"])
    a, b = latest_checkpoint(str(tmp_path / "a")), latest_checkpoint(str(tmp_path / "b"))
    for head, sub in (("lm", "policy"), ("score", "value")):
        wa, wb = _weights(f"{a}/{sub}", head), _weights(f"{b}/{sub}", head)
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
    numel = sum(v.numel() for v in _weights(f"{a}/policy", "lm").values())
    assert sum(m.numel() for m in s0) == sum(m.numel() for m in s1) < numel  # each rank holds about half
    plain = _torchrun(tmp_path, 2, "c", "--max-iterations", "2", "--no-distributed-optimizer")
    for m, n in zip(plain[0]["history"], straight[0]["history"]):
        for k, v in m.items():
            if k not in TIMING:  # (the weights differ in last bits; the KL sums differences of fp32 log-probs of ~6)
                assert n[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    for k, v in plain[0]["policy"].items():
        torch.testing.assert_close(straight[0]["policy"][k], v, atol=1e-6, rtol=1e-5)
    # the state in host memory throughout (--offload-optimizer always), checkpointed and resumed: the same run
    resident = _torchrun(tmp_path, 2, "d", "--max-iterations", "1", "--offload-optimizer", "always")
    resident += _torchrun(
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
    assert _no_timing(resident[0]["history"] + resident[2]["history"]) == _no_timing(straight[0]["history"])
    # the sharded optimizer re-gathered for a resume without sharding
    third = _torchrun(tmp_path, 2, "b", "--max-iterations", "3", "--resume", "--no-distributed-optimizer")
    assert [m["iteration"] for m in third[0]["history"]] == [3]
    # rank 1's state file lost: rank 1 stops, and so does rank 0 (rather than wait for it in a collective)
    shutil.copytree(tmp_path / "b", tmp_path / "lost")
    os.remove(f"{latest_checkpoint(str(tmp_path / 'lost'))}/state-rank00001.pt")
    err = _torchrun(tmp_path, 2, "lost", "--max-iterations", "3", "--resume", fails=True)
    # each in one line (rank 0's on stderr, rank 1's in torchrun's failure summary), no traceback of the engine's
    assert "error: resuming failed on rank 1: " in err and "state-rank00001.pt is missing (resume reads" in err
    assert err.count("error: resuming failed on rank 1: ") == 1 + 1  # (rank 0's line, and in torchrun's summary)
    assert not re.search(r'File "[^"]*/engine/\w+\.py"', err)  # (no traceback through the engine: torchrun's only)


def test_resume_with_another_layout(tmp_path):
    """Resumed on another layout, each run continues as a straight DP=2 run does (the same up to the order of the
    reductions: the prompt order and the samples depend on neither the DP size nor the TP degree, and the optimizer is
    re-laid): 2 DP ranks (optimizer sharded) -> 1 process, 1 process -> 2 DP ranks (sharded anew), 2 DP ranks -> TP 2,
    TP 2 -> 1 process."""
    straight = _torchrun(tmp_path, 2, "straight", "--max-iterations", "2")[0]["history"]
    _torchrun(tmp_path, 2, "two_to_one", "--max-iterations", "1")
    shutil.copytree(tmp_path / "two_to_one", tmp_path / "dp2_to_tp2")
    one = _run(tmp_path / "two_to_one", "--max-iterations", "2", "--resume", factory=naive_factory)
    _run(tmp_path / "one_to_two", "--max-iterations", "1", factory=naive_factory)
    two = _torchrun(tmp_path, 2, "one_to_two", "--max-iterations", "2", "--resume")[0]["history"]
    tp2 = _torchrun(tmp_path, 2, "dp2_to_tp2", "--max-iterations", "2", "--resume", "--tp", "2")[0]["history"]
    _torchrun(tmp_path, 2, "tp2_to_one", "--max-iterations", "1", "--tp", "2")
    tp1 = _run(tmp_path / "tp2_to_one", "--max-iterations", "2", "--resume", factory=naive_factory)
    for resumed in (one, two, tp2, tp1):
        assert [m["iteration"] for m in resumed] == [2]
        for k, v in straight[1].items():
            if k not in TIMING:
                assert resumed[0][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    runs = ("two_to_one", "one_to_two", "dp2_to_tp2", "tp2_to_one")
    for sub, head in (("policy", "lm"), ("value", "score")):
        w = {d: _weights(f"{latest_checkpoint(str(tmp_path / d))}/{sub}", head) for d in ("straight", *runs)}
        for d in runs:
            for k, v in w["straight"].items():
                torch.testing.assert_close(w[d][k], v, atol=1e-6, rtol=1e-5, msg=f"{d} {sub} {k}")


def test_batch_sizes_that_do_not_divide_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a multiple of train_batch_size 4"):
        _state(tmp_path, "--rollout-batch-size", "6")


def test_resume_names_changed_hyperparameters(tmp_path, capsys):
    _run(tmp_path, "--max-iterations", "1")
    capsys.readouterr()
    _run(tmp_path, "--max-iterations", "2", "--resume", "--adam-betas", "0.9", "0.999")  # the same values
    out = capsys.readouterr().out
    assert "other than the checkpoint's" not in out and "eta 0h00m" in out
    _run(tmp_path, "--max-iterations", "3", "--resume", "--kl-coef", "0.1", "--clip-ratio", "0.3")
    assert (
        "hyperparameters other than the checkpoint's: clip_ratio 0.2 -> 0.3, kl_coef 0.05 -> 0.1"
        in capsys.readouterr().out
    )


def test_resume_with_a_longer_schedule_spans_it(tmp_path, capsys):
    """Resumed with twice the prompt epochs, the learning rate follows this run's schedule (the checkpoint's ended
    at 0 halfway, and every later update was a no-op)."""
    from engine import ppo

    plans = [_state(tmp_path / f"plan{e}", "--prompt-epochs", e) for e in ("1", "2")]
    (old, new), cfg = [p.total_steps for p in plans], plans[1].cfg
    assert new == 2 * old
    _run(tmp_path, "--max-iterations", "1", "--prompt-epochs", "1")
    capsys.readouterr()
    history = _run(tmp_path, "--max-iterations", "2", "--resume", "--prompt-epochs", "2")
    out = capsys.readouterr().out
    assert f"a learning-rate schedule of {new} optimizer steps (the checkpoint's run: {old}): " in out
    lr = history[-1]["lr"]
    assert lr == pytest.approx(ppo.lr_at(history[-1]["step"] - 1, new, cfg)) and lr > 0


def _host_buffers(opt):
    """The pinned buffers of an optimizer's offloaded state, in movable_state's order."""
    return [h for k, _ in offload.groups(opt) for h in opt.offload.host[k]]


def _in_host_buffers(opt) -> bool:
    """Every tensor of the optimizer's state uses its host buffer."""
    return [t.data_ptr() for t in offload.movable_state(opt)] == [h.data_ptr() for h in _host_buffers(opt)]


@pytest.mark.parametrize("dtype,dp", [(torch.bfloat16, 1), (torch.float32, 1), (torch.bfloat16, 2)])
def test_optimizer_state_goes_to_host_memory_and_back(dtype, dp):
    """offload_state moves the masters (not the fp32 parameters, which are their own masters and which the generator
    reads) and Adam's moments into host buffers kept for the run, each tensor keeping its identity (Adam's state
    and the masters' list stay valid); onload_state brings back the same values into fresh device storage. With
    DP 2 the distributed optimizer's flat shards move (built in one process: no collective runs here)."""
    cfg, small = PPOConfig(), dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    model = Transformer(small, "score", dtype=dtype).init_weights(seed=1)
    grid = ProcessGrid(rank=0, world_size=dp, tp=1, dp=dp)
    opt = optim.make_optimizer(model, cfg, grid, distributed=True, bucket_bytes=4 * 3001)
    assert (opt.buckets is not None) == (dp > 1)
    tensors = offload.movable_state(opt)
    n_masters = len(opt.buckets) if dp > 1 else len(opt.params) if dtype != torch.float32 else 0
    assert len(tensors) == n_masters + 2 * len(opt.masters)  # (masters,) exp_avg, exp_avg_sq
    gen = torch.Generator().manual_seed(0)
    for t in tensors:
        t.copy_(torch.randn(t.shape, generator=gen))
    values = [t.clone() for t in tensors]
    params = [(p.data_ptr(), p.clone()) for p in model.parameters()]
    host_ptrs = None
    for _ in range(2):
        on_device = [t.data for t in tensors]  # (kept alive: their memory cannot be handed out again meanwhile)
        offload.offload_state(opt)
        offload.offload_state(opt)  # twice: a no-op
        assert [id(t) for t in offload.movable_state(opt)] == [id(t) for t in tensors]
        assert [t.data_ptr() for t in tensors] == [h.data_ptr() for h in _host_buffers(opt)]
        assert not {d.data_ptr() for d in on_device} & {t.data_ptr() for t in tensors}
        host_ptrs = host_ptrs or [h.data_ptr() for h in _host_buffers(opt)]
        assert [h.data_ptr() for h in _host_buffers(opt)] == host_ptrs  # the same host buffers every time
        (block,) = opt.offload.blocks  # all of them in one block of host memory
        assert all(block.data_ptr() <= p < block.data_ptr() + block.numel() for p in host_ptrs)
        assert all(torch.equal(t, v) for t, v in zip(tensors, values))
        offload.onload_state(opt)
        assert not {t.data_ptr() for t in tensors} & set(host_ptrs)
        assert all(torch.equal(t, v) for t, v in zip(tensors, values))
    assert all(p.data_ptr() == ptr and torch.equal(p, v) for p, (ptr, v) in zip(model.parameters(), params))


def _twins(dtype=torch.bfloat16, num_layers=1, **kw):
    """Two identical small models and their optimizers (the first's built with **kw)."""
    cfg, small = PPOConfig(max_grad_norm=0.5), dataclasses.replace(ModelConfig.named("tiny"), num_layers=num_layers)
    models = [Transformer(small, "score", dtype=dtype).init_weights(seed=2) for _ in range(2)]
    return cfg, models, optim.make_optimizer(models[0], cfg, **kw), optim.make_optimizer(models[1], cfg)


def _step_both(cfg, models, opts, step):
    for a, b in zip(*(m.parameters() for m in models)):
        g = torch.randn(a.shape, generator=torch.Generator().manual_seed(step)).to(a.dtype)
        a.grad, b.grad = g.clone(), g.clone()
    for o in opts:
        optim.accumulate_grads(o)
        optim.optimizer_step(o, 1e-2, cfg, ProcessGrid())


def test_an_update_or_a_checkpoint_of_offloaded_state_brings_it_back():
    """Steps of an optimizer whose state went to host memory and back (or is still there: the update brings it back
    first) equal a twin's that never moved, bit for bit; a state loaded from a checkpoint (new tensors in Adam's
    state) is offloaded as well."""
    cfg, models, moved, twin = _twins()
    for step in range(4):
        offload.offload_state(moved)
        if step % 2:
            offload.onload_state(moved)
        _step_both(cfg, models, (moved, twin), step)
        assert not moved.offload.on_host
        assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))
    offload.offload_state(moved)
    saved = optim.optimizer_state(moved)  # (brings it back first)
    assert not moved.offload.on_host
    offload.offload_state(moved)
    saved["adam"]["param_groups"][0]["foreach"] = True  # as another run's Adam kernel: this one keeps its own
    optim.load_optimizer_state(moved, saved)
    assert moved.adam.param_groups[0]["foreach"] == twin.adam.param_groups[0]["foreach"]
    offload.offload_state(moved)  # Adam's state is new tensors now: those move
    assert _in_host_buffers(moved)
    offload.onload_state(moved)
    for a, b in zip(offload.movable_state(moved), offload.movable_state(twin)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_host_resident_optimizer_updates_in_chunks_as_the_device_one(monkeypatch, dtype):
    """host_resident: the masters and moments are built in host buffers and stay there between updates (never
    whole on the device: each update moves a chunk at a time, here 3 layers' worth); the updates equal a twin's
    that keeps its state on the device, bit for bit, and so does a checkpoint of it and its reload."""
    monkeypatch.setattr(offload, "CHUNK_ELEMENTS", 40_000)
    cfg, models, resident, twin = _twins(dtype, num_layers=3, host_resident=True)
    assert len(offload.chunks(resident)) > 3 and len(resident.offload.blocks) == 1  # built in one block
    chunks_seen = []
    streamed = offload.streamed

    def spy(opt, fn):
        def counted(idx):
            here = [k for k, _ in offload.groups(opt) if k not in opt.offload.on_host]
            chunks_seen.append((sorted(here), list(idx)))
            fn(idx)

        streamed(opt, counted)

    monkeypatch.setattr(optim, "streamed", spy)
    assert all(torch.equal(a, b) for a, b in zip(offload.movable_state(resident), offload.movable_state(twin)))
    for step in range(3):
        assert resident.offload.on_host == {k for k, _ in offload.groups(resident)}  # all of it on the host
        assert _in_host_buffers(resident)
        _step_both(cfg, models, (resident, twin), step)
        assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))
    for here, idx in chunks_seen:  # on the device during a chunk's update: that chunk and the one coming in
        assert set(idx) <= set(here) and len(here) < len(resident.masters)
    assert [idx for _, idx in chunks_seen] == offload.chunks(resident) * 3
    offloaded = offload.offload_state, offload.onload_state
    for f in offloaded:  # (a host-resident state stays where it is)
        f(resident)
    assert resident.offload.on_host == {k for k, _ in offload.groups(resident)}
    saved, same = optim.optimizer_state(resident), optim.optimizer_state(twin)
    assert all(torch.equal(a, b) for a, b in zip(saved["masters"], same["masters"]))
    for k, st in saved["adam"]["state"].items():
        assert all(torch.equal(st[n], same["adam"]["state"][k][n]) for n in ("exp_avg", "exp_avg_sq", "step"))
    saved = {k: v for k, v in saved.items()}
    saved["adam"] = {
        **same["adam"],
        "state": {k: {n: t.clone() for n, t in st.items()} for k, st in same["adam"]["state"].items()},
    }
    optim.load_optimizer_state(resident, saved)  # loaded into the host buffers again
    assert len(resident.offload.blocks) == 1
    assert resident.offload.on_host == {k for k, _ in offload.groups(resident)}
    assert _in_host_buffers(resident)
    _step_both(cfg, models, (resident, twin), 3)
    assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))


def test_idle_model_weights_go_to_host_memory_and_back():
    """offload_weights: every parameter to its host buffer (identity kept), back with the same values; a frozen
    model's host copy is made once (a later offload copies nothing: shown by a device value the host never gets),
    a trained model's each time."""
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    model = Transformer(small, "score", dtype=torch.bfloat16).init_weights(seed=4)
    params = list(model.parameters())
    for frozen in (True, False):
        copies = offload.HostCopies(torch.device("cpu"))
        values = [p.detach().clone() for p in params]
        offload.offload_weights(model, copies, frozen)
        host = [copies.host[k][0] for k, _ in offload.weight_groups(model)]
        assert [p.data_ptr() for p in params] == [h.data_ptr() for h in host] and len(copies.blocks) == 1
        assert list(model.parameters()) == params and all(torch.equal(p, v) for p, v in zip(params, values))
        offload.onload_weights(model, copies)
        assert all(p.data_ptr() != h.data_ptr() for p, h in zip(params, host))
        assert all(torch.equal(p, v) for p, v in zip(params, values))
        with torch.no_grad():
            params[0].add_(1.0)  # (an update between rollouts: a trained model's only)
        offload.offload_weights(model, copies, frozen)
        assert torch.equal(host[0], values[0] if frozen else values[0] + 1.0)
        assert len(copies.blocks) == 1  # the same buffers
        offload.onload_weights(model, copies)


def _idle_on_host(state) -> list[bool]:
    """Per idle model (reference, reward, value): whether its weights use their host buffers now."""
    out = []
    for name, model in (("reference", state.ref), ("reward", state.reward), ("value", state.value)):
        copies = state.model_copies.get(name)
        out.append(copies is not None and [p.data_ptr() for p in model.parameters()] ==
                   [copies.host[k][0].data_ptr() for k, _ in offload.weight_groups(model)])  # fmt: skip
    return out


def test_offloaded_optimizer_trains_the_same(tmp_path):
    """--offload-optimizer rollouts and always (bf16 parameters with fp32 masters, on CPU): during each rollout and
    evaluation the state is in the host buffers (with rollouts, and --offload-idle-models rollouts, so are the
    reference's, reward model's and value model's weights), and the run's metrics and weights equal those of a run
    that never moved them."""
    flags = ["--dtype", "bfloat16", "--max-iterations", "3", "--eval-every", "2", "--learning-rate", "1e-3"]
    off = _run(tmp_path / "off", *flags, "--offload-optimizer", "off", "--offload-idle-models", "off")
    for mode in ("rollouts", "always"):
        models = "rollouts" if mode == "rollouts" else "off"
        state = _state(tmp_path / mode, *flags, "--offload-optimizer", mode, "--offload-idle-models", models)
        assert state.offload and state.policy_opt.host_resident == (mode == "always")
        assert state.offload_models == (models == "rollouts")
        seen = []
        generate = state.generator.generate_completions

        def spy(*args, state=state, generate=generate, seen=seen, **kw):
            opts = (state.policy_opt, state.value_opt)
            ok = all(o.offload.on_host == {k for k, _ in offload.groups(o)}
                     and offload.movable_state(o)[0].data_ptr() == _host_buffers(o)[0].data_ptr()
                     for o in opts)  # fmt: skip
            seen.append(ok and all(on_host == state.offload_models for on_host in _idle_on_host(state)))
            return generate(*args, **kw)

        state.generator.generate_completions = spy
        with dispatch.reference_ops():
            on = trainer.train(state)
        assert seen == [True] * 6  # 3 rollouts, evaluations before, at 2 and after
        assert not any(_idle_on_host(state))  # back on the "device" after each
        assert _no_timing(on) == _no_timing(off)
        for name, head in (("policy", "lm"), ("value", "score")):
            a = _weights(latest_checkpoint(str(tmp_path / mode)) + f"/{name}", head)
            b = _weights(latest_checkpoint(str(tmp_path / "off")) + f"/{name}", head)
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_offload_decisions_follow_one_another(tmp_path, monkeypatch, capsys):
    """decide_offload as on a GPU (the cache's budget and the host's memory given): --offload-optimizer first, then
    --offload-idle-models from the cache the first left; a host-resident state (always) is not counted twice."""
    from engine import memory_plan
    from engine.kv_cache import bytes_per_block

    state = _state(tmp_path, "--max-iterations", "1")
    state.device = torch.device("cuda", 0)
    c, cfg = state.policy.config, state.cfg
    per_seq = bytes_per_block(c.num_layers, 1, c.num_kv_heads, c.head_dim, torch.float32)
    per_seq *= cfg.max_prompt_len + cfg.max_new_tokens
    nbytes = offload.state_bytes(state.policy_opt) + offload.state_bytes(state.value_opt)
    mbytes = sum(offload.weight_bytes(m) for m in (state.ref, state.reward, state.value))
    monkeypatch.setattr(
        state_mod, "cuda_cache_budget", lambda device, fraction, reserve=0, clamp=True: 2 * per_seq
    )  # 2 of the 8 wanted
    monkeypatch.setattr(memory_plan, "host_available", lambda: 2**40)
    assert nbytes // per_seq > 8 and mbytes // per_seq > 8  # (either alone makes room for the rollout's 8)

    def decide(opt, models):
        state.run = dataclasses.replace(state.run, offload_optimizer=opt, offload_idle_models=models)
        capsys.readouterr()
        return state_mod.decide_offload(state), capsys.readouterr().out

    # (the sequences a cache of 2 plus what moves out holds, at most what the generator's slots fill: it allocates
    # no more)
    holds = lambda moved: min((2 * per_seq + moved) // per_seq, state.run.gen_max_num_seqs)  # noqa: E731
    assert holds(nbytes) == holds(mbytes) == state.run.gen_max_num_seqs > 8
    (o, m), out = decide("auto", "auto")
    assert (o, m) == (True, False) and f"holds {holds(nbytes)} sequences" in out
    (o, m), out = decide("off", "auto")
    assert (o, m) == (False, True) and f"holds {holds(mbytes)} instead of 2 full-length" in out
    (o, m), out = decide("always", "auto")  # (its state is in host memory already: the budget above excludes it)
    assert (o, m) == (True, True) and "updated in chunks" in out
    (o, m), out = decide("rollouts", "rollouts")
    assert (o, m) == (True, True) and f"holds {holds(nbytes + mbytes)} instead of " in out
    (o, m), out = decide("off", "off")
    assert (o, m) == (False, False)
    state.run = dataclasses.replace(state.run, kv_cache_mb=1)  # a fixed cache, whatever the GPU's memory
    (o, m), out = decide("auto", "auto")
    assert (o, m) == (False, False) and out.count(f"KV cache holds {2**20 // per_seq} sequences") == 2


def test_a_host_block_collected_during_a_graph_capture_is_unregistered_later(monkeypatch):
    """A host block's finalizer (engine.offload._unlock) run by a garbage collection during a CUDA graph capture must
    not synchronize (that would end the capture): the block waits, and the next registration unregisters it."""
    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(("register", ptr))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))

    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(("synchronize", None)))
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    old, new = offload._whole_pages(10), offload._whole_pages(10)
    offload._unlock(old)
    assert calls == [] and offload._UNLOCK_LATER == [old]
    capturing[0] = False
    owner = offload.HostCopies(torch.device("cpu"))
    offload._page_lock(owner, new)
    assert calls == [("synchronize", None), ("unregister", old.data_ptr()), ("register", new.data_ptr())]
    assert offload._UNLOCK_LATER == []
    del owner  # (its finalizer unregisters the new block, no capture running)
    assert calls[-1] == ("unregister", new.data_ptr())


def test_chat_template_flag_encodes_training_and_evaluation_prompts_with_the_tokenizers_template(tmp_path):
    from engine.tokenizer import TINY_DIR, TINY_EVAL_PROMPTS, TINY_PROMPTS, load_prompts, load_tokenizer

    shutil.copytree(TINY_DIR, tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}"
    )
    tok = load_tokenizer(tmp_path / "tok")
    st = _state(tmp_path / "out", "--tokenizer", str(tmp_path / "tok"), "--chat-template", "tokenizer")
    for have, path in ((st.data.prompts, TINY_PROMPTS), (st.eval_prompts.prompts, TINY_EVAL_PROMPTS)):
        want = load_prompts(path, tok, verbose=False, template="tokenizer").prompts
        assert have == want and want != load_prompts(path, tok, verbose=False).prompts


def test_a_failed_rollout_hands_the_kv_cache_back(tmp_path, monkeypatch):
    """The generator's cache is released also when sampling raises, before any model's weights come back into the
    memory it held (an out-of-memory error there would hide the first error)."""
    from engine.rollout import generate_rollout

    st = _state(tmp_path)
    calls = []

    def boom(*args, **kwargs):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(st.generator, "generate_completions", boom)
    monkeypatch.setattr(st.generator, "release", lambda: calls.append("release"))
    with pytest.raises(RuntimeError, match="sampling failed"):
        generate_rollout(st, [[1, 5, 9]], [0])
    assert calls == ["release"]


def test_the_policys_generation_config_stops_rollouts_and_is_saved(tmp_path):
    from engine.tokenizer import TINY_PROMPTS
    from engine.train_ppo import build_tiny_models

    policy, reward = build_tiny_models(str(tmp_path / "tiny"))
    with open(os.path.join(policy, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 7], "top_p": 0.9}, f)
    flags = ("--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS, "--max-iterations", "1")
    cfg, run, _ = parse_args(["--output-dir", str(tmp_path / "out"), *SMALL, *flags])
    assert state_mod.setup(cfg, run, generator_factory=state_mod.make_generator).stop_ids == [2, 7]
    _run(tmp_path / "run", *flags)
    with open(tmp_path / "run" / "checkpoint-000001" / "policy" / "generation_config.json") as f:
        assert json.load(f) == {"eos_token_id": [2, 7], "top_p": 0.9}


def test_the_tiny_default_never_deletes_another_run(tmp_path):
    """Without --policy the demo starts over in a directory it ran in before (its init/ models there), but a
    directory holding another run is refused as any fresh run's would be (it was emptied)."""
    other = tmp_path / "other"
    (other / "checkpoint-000006").mkdir(parents=True)
    (other / "metrics.jsonl").write_text('{"iteration": 6}\n')
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        _run(other, "--max-iterations", "1")
    assert (other / "checkpoint-000006").is_dir() and (other / "metrics.jsonl").read_text() == '{"iteration": 6}\n'
    _run(tmp_path / "demo", "--max-iterations", "1")
    _run(tmp_path / "demo", "--max-iterations", "1")  # (its own directory: starts over)


def test_the_tiny_models_follow_the_seed(tmp_path):
    from engine.train_ppo import build_tiny_models

    policy, _ = build_tiny_models(str(tmp_path), seed=0)
    w0 = _weights(policy, "lm")
    build_tiny_models(str(tmp_path), seed=7)
    w7 = _weights(policy, "lm")
    assert not torch.equal(w0["embed_tokens.weight"], w7["embed_tokens.weight"])
    stamp = os.stat(os.path.join(policy, "model.safetensors")).st_mtime_ns
    build_tiny_models(str(tmp_path), seed=7)  # (the same seed: kept)
    assert os.stat(os.path.join(policy, "model.safetensors")).st_mtime_ns == stamp


def test_an_output_dir_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "file").write_text("x")
    for flags in ((), ("--eval-only", "--eval-prompts", os.path.join(ROOT, "engine/assets/prompts_tiny_eval.jsonl"))):
        with pytest.raises(OSError, match="cannot write to the output directory"):
            _run(tmp_path / "file" / "out", "--max-iterations", "1", *flags)


def test_damaged_files_are_named(tmp_path):
    from engine.resume import LATEST, latest_checkpoint, load_state_file
    from engine.train_ppo import build_tiny_models

    policy, _ = build_tiny_models(str(tmp_path / "tiny"))
    weights = os.path.join(policy, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=f"cannot read the weights file {re.escape(weights)}"):
        load_pretrained(policy, head="lm")
    (tmp_path / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="cannot read the state file .*state.pt .*the checkpoint is damaged"):
        load_state_file(str(tmp_path / "state.pt"))
    (tmp_path / LATEST).write_text('{"checkp')
    with pytest.raises(ValueError, match="latest is damaged"):
        latest_checkpoint(str(tmp_path))
