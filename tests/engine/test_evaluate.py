"""Held-out evaluation and rollout samples (engine/evaluate.py) on the tiny default, on CPU: training unchanged by
it, its logs, its scores and KL against transformers, greedy evaluation, resume, bad flags, a data-parallel run's
samples. Data-parallel evaluation: in test_trainer.py's DP x TP test."""

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from engine import evaluate, trainer
from engine import state as state_mod
from engine.distributed import ProcessGrid
from engine.resume import latest_checkpoint
from engine.tokenizer import TINY_DIR, TINY_EVAL_PROMPTS, load_tokenizer, read_prompt_file
from engine.train_ppo import parse_args, prepare_tiny
from kernels import dispatch
from tests.engine.ppo_dp_worker import naive_factory
from tests.engine.ranks import init_gloo, leave, outcome
from tests.engine.runs import no_timing, run_tiny, tiny_state, torchrun_ranks

N_EVAL = len(read_prompt_file(TINY_EVAL_PROMPTS))


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _train(state) -> list[dict]:
    with dispatch.reference_ops():
        return trainer.train(state)


def test_evaluation_leaves_training_unchanged_and_logs_every_answer(tmp_path):
    with_eval = run_tiny(tmp_path / "a", "--max-iterations", "3", "--eval-every", "2")
    without = run_tiny(tmp_path / "b", "--max-iterations", "3", "--eval-prompts", "", "--log-samples", "0")
    assert no_timing(with_eval) == no_timing(without)  # evaluation draws none of the run's random numbers
    assert not (tmp_path / "b/eval.jsonl").exists() and not (tmp_path / "b/samples.jsonl").exists()

    evals = _lines(tmp_path / "a/eval.jsonl")
    assert [e["iteration"] for e in evals] == [0, 2, 3]  # before the first, every 2nd, after the last
    assert sorted(os.listdir(tmp_path / "a/eval")) == ["iter-000000.jsonl", "iter-000002.jsonl", "iter-000003.jsonl"]
    questions = [m[-1]["content"] for m in read_prompt_file(TINY_EVAL_PROMPTS)]
    for e in evals:
        recs = _lines(tmp_path / f"a/eval/iter-{e['iteration']:06d}.jsonl")
        assert [r["prompt_index"] for r in recs] == list(range(N_EVAL)) and e["prompts"] == N_EVAL
        assert all(q in r["prompt"] and r["prompt"].endswith("<|assistant|>\n") for q, r in zip(questions, recs))
        for k in ("score", "score_penalized", "kl", "reward", "response_len"):
            assert e[k] == pytest.approx(sum(r[k] for r in recs) / N_EVAL, rel=1e-5, abs=1e-6), k
        assert e["no_eos_frac"] == pytest.approx(sum(not r["hit_eos"] for r in recs) / N_EVAL)
        for r in recs:
            assert r["score_penalized"] == (r["score"] if r["hit_eos"] else -10.0)
            assert r["reward"] == pytest.approx(r["score_penalized"] - 0.05 * r["kl"], abs=1e-5)
            assert 1 <= r["response_len"] <= 8
    first = _lines(tmp_path / "a/eval/iter-000000.jsonl")
    assert all(r["kl"] == 0.0 for r in first)  # policy == reference before any update
    assert evals[-1]["kl"] > 0 and evals[-1]["step"] == 6
    samples = _lines(tmp_path / "a/samples.jsonl")
    assert [s["iteration"] for s in samples] == [1, 1, 2, 2, 3, 3]  # --log-samples 2 (the default)
    assert all("<|assistant|>" in s["prompt"] and isinstance(s["response"], str) for s in samples)
    # the token ids beside the text (what was scored), which the text decodes from
    tok = load_tokenizer(TINY_DIR)
    for r in [*samples, *first]:
        assert tok.decode(r["prompt_ids"]) == r["prompt"] and r["response_len"] == len(r["response_ids"])
        assert tok.decode(r["response_ids"], skip_special_tokens=True) == r["response"]
    assert evaluate.readable(samples[:1]) == [{k: v for k, v in samples[0].items() if not k.endswith("_ids")}]
    assert evaluate.readable([{"prompt_ids": [1]}]) == [{"prompt_ids": [1]}]  # (no text: the ids stay)


@torch.no_grad()
def _hf_score_and_kl(out, rec) -> tuple[float, float]:
    ids = torch.tensor([rec["prompt_ids"] + rec["response_ids"]])
    n_prompt = len(rec["prompt_ids"])
    load = lambda cls, path: cls.from_pretrained(path, dtype=torch.float64).eval()  # noqa: E731
    policy = load(AutoModelForCausalLM, f"{latest_checkpoint(str(out))}/policy")
    ref = load(AutoModelForCausalLM, out / "init/policy")
    rm = load(AutoModelForSequenceClassification, out / "init/reward")
    logps = []
    for m in (policy, ref):
        logp = torch.log_softmax(m(ids).logits[0, n_prompt - 1 : -1], -1)
        logps.append(logp.gather(1, ids[0, n_prompt:, None]).sum())
    return float(rm(ids).logits[0, 0]), float(logps[0] - logps[1])


def test_eval_scores_and_kl_match_transformers(tmp_path):
    """After one update (policy != reference), each answer's RM score and summed KL equal transformers' float64
    LlamaForSequenceClassification score and LlamaForCausalLM log-probs of the same tokens."""
    state = tiny_state(tmp_path, "--max-iterations", "1")
    state.tokenizer = None  # records keep the token ids
    _train(state)
    assert [e["iteration"] for e in state.evals] == [0, 1]
    recs = _lines(tmp_path / "eval/iter-000001.jsonl")
    assert any(abs(r["kl"]) > 1e-3 for r in recs)
    for rec in recs[:4]:
        score, kl = _hf_score_and_kl(tmp_path, rec)
        assert rec["score"] == pytest.approx(score, abs=1e-4)
        assert rec["kl"] == pytest.approx(kl, abs=1e-4)
        assert rec["response_len"] == len(rec["response_ids"])


def test_greedy_evaluation_does_not_depend_on_the_seed(tmp_path):
    answers = {}
    for seed in (0, 1):
        for greedy in ("--eval-greedy", "--no-eval-greedy"):
            state = tiny_state(tmp_path / f"{seed}{greedy}", "--seed", str(seed), greedy)
            state.tokenizer = None
            with dispatch.reference_ops():
                evaluate.evaluate(state)
            answers[seed, greedy] = [
                r["response_ids"] for r in _lines(tmp_path / f"{seed}{greedy}/eval/iter-000000.jsonl")
            ]
    state.iteration = 5  # the same policy evaluated later samples the same answers (one stream for every evaluation)
    with dispatch.reference_ops():
        evaluate.evaluate(state)
    later = [r["response_ids"] for r in _lines(tmp_path / "1--no-eval-greedy/eval/iter-000005.jsonl")]
    assert later == answers[1, "--no-eval-greedy"]
    assert answers[0, "--eval-greedy"] == answers[1, "--eval-greedy"]
    assert answers[0, "--no-eval-greedy"] != answers[1, "--no-eval-greedy"]  # sampled: the run's seed matters
    assert answers[0, "--eval-greedy"] != answers[0, "--no-eval-greedy"]


def test_resume_after_a_crash_keeps_one_line_per_evaluation_and_sample(tmp_path, capsys):
    run_tiny(tmp_path, "--max-iterations", "3", "--save-every", "2", "--keep-checkpoints", "2", "--eval-every", "1")
    (tmp_path / "latest").write_text(json.dumps({"checkpoint": "checkpoint-000002"}))  # as if it died at 3
    os.remove(tmp_path / "eval/iter-000003.jsonl")
    (tmp_path / "eval/iter-000004.jsonl").write_text("{}\n")  # a later evaluation of the dead run
    capsys.readouterr()
    run_tiny(tmp_path, "--max-iterations", "3", "--resume", "--eval-every", "1", "--keep-checkpoints", "2")
    assert "holds evaluations of another set" not in capsys.readouterr().out
    evals = _lines(tmp_path / "eval.jsonl")
    assert [e["iteration"] for e in evals] == [0, 1, 2, 3]
    assert len({e["eval_set"] for e in evals}) == 1 and not any(e["eval_greedy"] for e in evals)
    assert [s["iteration"] for s in _lines(tmp_path / "samples.jsonl")] == [1, 1, 2, 2, 3, 3]
    assert sorted(os.listdir(tmp_path / "eval")) == [f"iter-{i:06d}.jsonl" for i in range(4)]
    # resumed with another evaluation set: warned, and each line names its set
    (tmp_path / "latest").write_text(json.dumps({"checkpoint": "checkpoint-000002"}))
    with open(TINY_EVAL_PROMPTS) as f:
        (tmp_path / "fewer.jsonl").write_text("".join(f.readlines()[:8]))
    run_tiny(
        tmp_path,
        "--max-iterations",
        "3",
        "--resume",
        "--eval-every",
        "1",
        "--eval-prompts",
        str(tmp_path / "fewer.jsonl"),
    )
    assert "eval.jsonl holds evaluations of another set or decoding" in capsys.readouterr().out
    last = _lines(tmp_path / "eval.jsonl")[-1]
    assert last["iteration"] == 3 and last["prompts"] == 8 and last["eval_set"] != evals[-1]["eval_set"]


def test_logged_samples_are_the_rollouts_first_on_any_dp_size(tmp_path):
    """--log-samples K writes the first K sequences of the rollout one process would hold, on 2 data-parallel ranks
    too: not rank 0's first ones (global sequences 0, 2, 4, ...), and all K where K is more than one rank's share; on 2
    tensor-parallel ranks K, not each rank's copy of them."""
    flags = ["--max-iterations", "1", "--eval-prompts", "", "--log-samples", "6"]  # (8 sequences, 4 a rank)
    torchrun_ranks(tmp_path, 2, "dp2", *flags)
    run_tiny(tmp_path / "dp1", *flags, factory=naive_factory)
    one, two = _lines(tmp_path / "dp1/samples.jsonl"), _lines(tmp_path / "dp2/samples.jsonl")
    assert len(one) == 6 and [r["response"] for r in two] == [r["response"] for r in one]
    torchrun_ranks(tmp_path, 2, "tp2", *flags, "--tp", "2")  # (a TP group's two ranks hold the same sequences)
    assert len(_lines(tmp_path / "tp2/samples.jsonl")) == 6, "a TP group's ranks each logged its samples"
    for a, b in zip(one, two, strict=True):
        for k, v in a.items():
            assert b[k] == (v if isinstance(v, (str, bool, int)) else pytest.approx(v, rel=1e-4, abs=1e-6)), k


def test_bad_evaluation_flags_are_refused(tmp_path):
    cfg, run, _ = parse_args(["--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--eval-every needs --eval-prompts"):
        state_mod.setup(cfg, dataclasses.replace(prepare_tiny(run), eval_prompts=None, eval_every=2))
    with pytest.raises(FileNotFoundError):
        tiny_state(tmp_path, "--eval-prompts", str(tmp_path / "missing.jsonl"))
    grid = ProcessGrid(world_size=32, dp=32)  # more data-parallel ranks than eval prompts
    cfg, run, _ = parse_args(["--output-dir", str(tmp_path), "--rollout-batch-size", "32", "--train-batch-size", "32"])
    with pytest.raises(ValueError, match=f"{N_EVAL} eval prompts cannot be split over 32 data-parallel ranks"):
        state_mod.setup(cfg, prepare_tiny(run), grid=grid)


def test_eval_holdout_takes_the_evaluation_set_out_of_the_training_prompts(tmp_path, capsys):
    from engine.tokenizer import TINY_PROMPTS

    capsys.readouterr()
    tiny_state(tmp_path / "w", "--eval-prompts", TINY_PROMPTS)  # (evaluating on the training prompts: said)
    assert "warning: 48 of the 48 evaluation prompts are training prompts too" in capsys.readouterr().out
    tiny_state(tmp_path / "x")  # (the shipped held-out prompts: no warning)
    assert "evaluation prompts are training prompts" not in capsys.readouterr().out

    held = {}
    for seed in (0, 0, 1):
        state = tiny_state(tmp_path / "s", "--eval-holdout", "8", "--seed", str(seed), "--overwrite-output-dir")
        train_set, eval_set = state.data.prompts, state.eval_prompts.prompts
        assert len(eval_set) == 8 and len(train_set) == 40
        assert not {tuple(p) for p in eval_set} & {tuple(p) for p in train_set}
        held.setdefault(seed, []).append(eval_set)
    assert held[0][0] == held[0][1] != held[1][0]  # the seed draws them: a resumed run trains on the same set
    all_prompts = state.data.prompts + state.eval_prompts.prompts
    assert len({tuple(p) for p in all_prompts}) == len(read_prompt_file(TINY_PROMPTS))
    with pytest.raises(ValueError, match="--eval-holdout and --eval-prompts both name an evaluation set"):
        tiny_state(tmp_path / "b", "--eval-holdout", "8", "--eval-prompts", TINY_EVAL_PROMPTS)
    with pytest.raises(ValueError, match="cannot hold out 48 of 48 prompts"):
        tiny_state(tmp_path / "c", "--eval-holdout", "48")


def test_eval_only_reproduces_the_evaluation_after_training(tmp_path, capsys):
    """--eval-only of a checkpoint's policy against the initial one (--reference) gives the evaluation the run made
    after that iteration (the same stream, the same models), without building a value model or optimizers (here
    with the reference's and reward model's weights in host memory during generation). The checkpoint's run's PPO
    hyperparameters hold where no flag is given: its sampling and limits, and the KL coefficient and missing-EOS
    penalty of its reward (the recipe's defaults were taken: the same answers got another reward)."""
    from engine.train_ppo import main

    run_tiny(tmp_path / "run", "--max-iterations", "2", "--kl-coef", "0.5", "--missing-eos-penalty", "-3")
    ckpt, init = latest_checkpoint(str(tmp_path / "run")), tmp_path / "run/init"
    with dispatch.reference_ops():
        (only,) = main(
            [
                "--eval-only",
                "--policy",
                f"{ckpt}/policy",
                "--reference",
                str(init / "policy"),
                "--reward",
                str(init / "reward"),
                "--eval-prompts",
                TINY_EVAL_PROMPTS,
                "--output-dir",
                str(tmp_path / "only"),
                "--offload-idle-models",
                "rollouts",
            ]
        )  # fmt: skip (the reference and RM to host while sampling)
    during = _lines(tmp_path / "run/eval.jsonl")[-1]
    assert during["iteration"] == 2 and during["kl"] > 0 and during["eval_kl_coef"] == 0.5
    assert during["score_penalized"] != during["score"]  # (a response without EOS: the run's -3 in the numbers)
    for k in (*evaluate.EVAL_KEYS, "iteration", "step"):  # (logged at the checkpoint's iteration and step)
        assert only[k] == during[k], k
    logged = _lines(tmp_path / "only/eval.jsonl")[-1]
    assert {k: v for k, v in logged.items() if k.startswith("eval_")} == {
        k: v for k, v in during.items() if k.startswith("eval_")
    }
    assert _lines(tmp_path / "only/eval.jsonl")[-1]["iteration"] == 2
    answers = lambda path: [r["response"] for r in _lines(path)]  # noqa: E731
    assert answers(tmp_path / "only/eval/iter-000002.jsonl") == answers(tmp_path / "run/eval/iter-000002.jsonl")
    with pytest.raises(ValueError, match="--eval-only needs --policy, --reward and --eval-prompts"):
        main(["--eval-only", "--policy", f"{ckpt}/policy", "--reward", str(init / "reward")])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # (a usage error: refused when parsed)
        main(
            [
                "--eval-only",
                "--policy",
                "/nowhere",
                "--reward",
                "/nowhere",
                "--eval-prompts",
                TINY_EVAL_PROMPTS,
                "--offload-idle-models",
                "always",
            ]
        )  # fmt: skip (refused before anything is read)
    assert "--offload-idle-models must be one of auto, off, rollouts, got 'always'" in capsys.readouterr().err


def test_eval_only_of_a_checkpoint_takes_its_runs_reference(tmp_path, capsys):
    """--eval-only of a PPO checkpoint's policy without --reference measures the KL against the reference its run
    used (saved with the checkpoint), not against the policy itself (a KL of 0 and an unpenalized reward on a line
    that looked like the run's own); where that reference is gone, it says so."""
    from engine.train_ppo import main

    run_tiny(tmp_path / "run", "--max-iterations", "1")
    ckpt, init = latest_checkpoint(str(tmp_path / "run")), tmp_path / "run/init"
    flags = ["--eval-only", "--policy", f"{ckpt}/policy", "--reward", str(init / "reward"), "--eval-prompts",
             TINY_EVAL_PROMPTS]  # fmt: skip
    capsys.readouterr()
    with dispatch.reference_ops():
        (only,) = main([*flags, "--output-dir", str(tmp_path / "only")])
    assert f"reference: {init / 'policy'}, the one {ckpt}'s run measured the KL against" in capsys.readouterr().out
    during = _lines(tmp_path / "run/eval.jsonl")[-1]
    assert only["kl"] == during["kl"] > 0 and only["reward"] == during["reward"]
    os.rename(init / "policy", init / "moved")
    with dispatch.reference_ops():
        (alone,) = main([*flags, "--output-dir", str(tmp_path / "alone")])
    gone = f"warning: no --reference for {ckpt}'s policy ({init / 'policy'}, its run's, is not there on every node)"
    assert gone in capsys.readouterr().out
    assert alone["kl"] == 0


def test_eval_only_of_a_checkpoint_takes_its_runs_seed_and_decoding(tmp_path, capsys):
    """--eval-only of a PPO checkpoint's policy answers with its run's --seed, --eval-greedy, --ignore-eos and chat
    template where no flag is given (those are run settings, not PPO hyperparameters: it sampled another stream
    with seed 0, or sampled where the run had decoded greedily, and its line looked like the run's own); a flag
    given wins; a checkpoint from before they were saved gives its seed (its prompt order's) and names the others."""
    from engine.saved_run import state_file
    from engine.train_ppo import main

    run_tiny(tmp_path / "run", "--max-iterations", "1", "--seed", "3", "--eval-greedy")
    ckpt, init = latest_checkpoint(str(tmp_path / "run")), tmp_path / "run/init"
    flags = ["--eval-only", "--policy", f"{ckpt}/policy", "--reward", str(init / "reward"), "--eval-prompts",
             TINY_EVAL_PROMPTS]  # fmt: skip
    during = _lines(tmp_path / "run/eval.jsonl")[-1]
    assert during["eval_seed"] == 3 and during["eval_greedy"] is True and during["eval_ignore_eos"] is False
    with dispatch.reference_ops():
        (only,) = main([*flags, "--output-dir", str(tmp_path / "only")])
        (sampled,) = main([*flags, "--output-dir", str(tmp_path / "sampled"), "--no-eval-greedy", "--seed", "3"])
    for k in (*evaluate.EVAL_KEYS, "iteration"):
        assert only[k] == during[k], k
    logged = lambda name: _lines(tmp_path / name / "eval.jsonl")[-1]  # noqa: E731
    assert {k: v for k, v in logged("only").items() if k.startswith("eval_")} == {
        k: v for k, v in during.items() if k.startswith("eval_")
    }
    assert logged("sampled")["eval_greedy"] is False and logged("sampled")["eval_seed"] == 3
    assert sampled["response_len"] != only["response_len"] or sampled["kl"] != only["kl"]  # (sampled, not greedy)
    fn = state_file(ckpt, 0)  # an older checkpoint's state file: no record of the run's settings
    sd = torch.load(fn, weights_only=True)
    del sd["run"]
    torch.save(sd, fn)
    capsys.readouterr()
    with dispatch.reference_ops():
        main([*flags, "--output-dir", str(tmp_path / "older")])
    said = f"warning: {ckpt} predates the record of its run's --eval-greedy (False), --ignore-eos (False), --chat-te"
    assert said in capsys.readouterr().out
    assert logged("older")["eval_seed"] == 3 and logged("older")["eval_greedy"] is False


def test_a_resumed_evaluation_is_compared_with_the_last_logged_set(tmp_path, monkeypatch, capsys):
    """A run that changed its evaluation set once and is resumed again with that set is not warned again; another
    set is."""
    import types

    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"iteration": 0, "eval_set": "A"}) + "\n" + json.dumps({"iteration": 2, "eval_set": "B"}) + "\n"
    )
    state = types.SimpleNamespace(eval_prompts=object(), iteration=3, grid=types.SimpleNamespace(rank=0),
                                  run=types.SimpleNamespace(output_dir=str(tmp_path)))  # fmt: skip
    monkeypatch.setattr(evaluate, "eval_identity", lambda state: {"eval_set": "B"})
    evaluate.check_resumed_eval(state)
    assert "another set" not in capsys.readouterr().out
    monkeypatch.setattr(evaluate, "eval_identity", lambda state: {"eval_set": "C"})
    evaluate.check_resumed_eval(state)
    assert "another set" in capsys.readouterr().out


def test_a_resumed_evaluation_is_not_warned_of_for_what_an_older_line_does_not_record(tmp_path, monkeypatch, capsys):
    """eval.jsonl written by an older engine (its lines without eval_seed or eval_ignore_eos) resumed on the same set
    and decoding: the keys it lacks are no difference (a warning that the curve changes set would be false)."""
    import types

    (tmp_path / "eval.jsonl").write_text(json.dumps({"iteration": 2, "eval_set": "A", "eval_greedy": False}) + "\n")
    state = types.SimpleNamespace(eval_prompts=object(), iteration=3, grid=types.SimpleNamespace(rank=0),
                                  run=types.SimpleNamespace(output_dir=str(tmp_path)))  # fmt: skip
    now = {"eval_set": "A", "eval_greedy": False, "eval_seed": 0, "eval_ignore_eos": False}
    monkeypatch.setattr(evaluate, "eval_identity", lambda state: now)
    evaluate.check_resumed_eval(state)
    assert "another set" not in capsys.readouterr().out
    monkeypatch.setattr(evaluate, "eval_identity", lambda state: {**now, "eval_greedy": True})
    evaluate.check_resumed_eval(state)
    assert "another set" in capsys.readouterr().out


def test_eval_only_takes_no_relative_reference_path_from_a_checkpoint(tmp_path, monkeypatch, capsys):
    """checkpoint_reference: a checkpoint whose saved reference path is relative (an older run's) names no directory
    of its own here: a directory of that name under this command's working directory is not taken as the run's
    reference (the KL measured against another model, on a line that looked like the run's own); it is warned of.
    An absolute path that is there is taken."""
    from engine import saved_run
    from engine.state import RunConfig

    (tmp_path / "ref").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"reference": {"path": "ref"}}
    monkeypatch.setattr(saved_run, "saved_models", lambda ckpt: saved)
    run = RunConfig(output_dir=str(tmp_path / "out"))
    assert saved_run.checkpoint_reference(run, "ckpt").reference is None
    assert "warning: no --reference for ckpt's policy (ref, its run's, is not there on every node)" in (
        capsys.readouterr().out
    )
    saved["reference"]["path"] = str(tmp_path / "ref")
    assert saved_run.checkpoint_reference(run, "ckpt").reference == str(tmp_path / "ref")


def test_sequence_stats_written_out_by_hand():
    """sequence_stats' arithmetic per sequence: the configured estimator summed over each response, the missing-EOS
    penalty in place of the score, the reward with the run's --kl-coef or the one passed (a rollout's adaptive one)."""
    from types import SimpleNamespace

    from engine.config import PPOConfig
    from engine.data import Rollout

    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.25])
    ref = torch.tensor([-1.5, -1.0, -0.5, -2.0, -2.5, -1.0])
    ro = Rollout(prompts=[[1], [2], [3]], responses=[[4, 5], [6], [7, 8, 9]], hit_eos=torch.tensor([True, False, True]),
                 gen_logprobs=lp, offsets=[0, 2, 3, 6], logprobs=lp, ref_logprobs=ref,
                 scores=torch.tensor([1.0, 2.0, -0.5]))  # fmt: skip
    cfg = PPOConfig(kl_coef=0.1, kl_estimator="k2", missing_eos_penalty=-7.0)
    state = SimpleNamespace(cfg=cfg, device=torch.device("cpu"))
    k2 = [0.5 * (a - b) ** 2 for a, b in zip(lp.tolist(), ref.tolist())]
    kl = [k2[0] + k2[1], k2[2], k2[3] + k2[4] + k2[5]]
    penalized = [1.0, -7.0, -0.5]
    for coef, stats in ((0.1, evaluate.sequence_stats(state, ro)), (0.3, evaluate.sequence_stats(state, ro, 0.3))):
        assert stats["score"].tolist() == [1.0, 2.0, -0.5]
        assert stats["score_penalized"].tolist() == penalized
        assert stats["kl"].tolist() == pytest.approx(kl, rel=1e-6)
        assert stats["reward"].tolist() == pytest.approx([p - coef * k for p, k in zip(penalized, kl)], rel=1e-6)
        assert stats["response_len"].tolist() == [2.0, 1.0, 3.0]
        assert stats["no_eos"].tolist() == [0.0, 1.0, 0.0]


def test_sampling_params_are_the_runs_and_each_stream_its_own():
    """engine.rollout.sampling_params: the recipe's sampling from the config (top-p included), the rollout's samples
    per prompt unless n is given (an evaluation's one answer), greedy at temperature 0, a seed per stream."""
    from types import SimpleNamespace

    from engine.config import PPOConfig
    from engine.rollout import sampling_params

    cfg = PPOConfig(temperature=0.7, top_k=7, top_p=0.9, max_new_tokens=5, samples_per_prompt=2)
    state = SimpleNamespace(cfg=cfg, run=SimpleNamespace(seed=3, ignore_eos=False), stop_ids=[2])
    p = sampling_params(state, 4)
    assert (p.temperature, p.top_k, p.top_p, p.max_new_tokens, p.n, p.stop_token_ids) == (0.7, 7, 0.9, 5, 2, [2])
    assert sampling_params(state, 4, greedy=True, n=1).temperature == 0.0
    assert sampling_params(state, 4, n=1).n == 1
    assert len({sampling_params(state, s).seed for s in (0, 1, 4)}) == 3


def test_check_scores_refuses_infinite_scores_too():
    from engine.data import Rollout
    from engine.rollout import check_scores

    inf = float("inf")
    ro = Rollout(prompts=[[1]] * 3, responses=[[2]] * 3, hit_eos=torch.ones(3, dtype=torch.bool),
                 gen_logprobs=torch.zeros(3), offsets=[0, 1, 2, 3], scores=torch.tensor([1.0, inf, -inf]))  # fmt: skip
    with pytest.raises(FloatingPointError, match="reward model returned 2 non-finite scores in the test"):
        check_scores(ro, "in the test")
    ro.scores = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(FloatingPointError, match="returned 1 non-finite scores"):
        check_scores(ro, "in the test")


def _eval_due_rank(rank, world, init_file, out_dir):
    import types

    import torch.distributed as dist

    init_gloo(rank, world, init_file)
    run = types.SimpleNamespace(eval_every=2, output_dir=out_dir)
    state = types.SimpleNamespace(
        eval_prompts=[], run=run, iteration=2, iterations=4, grid=ProcessGrid(rank, world, dp=world)
    )
    log = os.path.join(out_dir, "eval.jsonl")
    got = []
    for holds in ('{"iteration": 2}\n', '{"iteration": 1}\n', 'not JSON\n{"iteration": 2}\n'):
        if rank == 0:  # (rank 0 alone reads it: another node's copy is never looked at)
            with open(log, "w") as f:
                f.write(holds)
        dist.barrier()
        got.extend(outcome(evaluate.eval_due, state, at_start=True, done=None))
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


def test_a_resumed_runs_evaluation_is_made_up_on_every_rank_as_rank_0s_eval_jsonl_says(tmp_path):
    """eval_due at a resumed run's start on two ranks (gloo): rank 0 reads eval.jsonl and every rank follows it, the
    evaluation made up on both only where the log lacks the checkpoint's iteration (the others' answer counts as
    logged, not as missing: rank 1 has not read it); an unreadable log on rank 0 stops both at once, rank 1 naming
    it."""
    import torch.multiprocessing as mp

    mp.spawn(_eval_due_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    bad = f"{tmp_path / 'eval.jsonl'}, line 1, is not a JSON record"
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1))
    assert rank0[:4] == rank1[:4] == [False, True, True, True]
    assert rank0[4].startswith(f"InvalidInput: {bad}") and rank0[5], rank0
    assert rank1[4].startswith(f"FailedOnAnotherRank: reading eval.jsonl failed on rank 0: {bad}") and rank1[5], rank1


def test_eval_every_0_evaluates_before_the_first_iteration_and_after_the_last(tmp_path):
    """--eval-every 0 (the default: "only before the first and after the last"): the starting point is evaluated
    too, eval.jsonl's iteration 0 (the tiny preset's eval_every 4 never takes this path)."""
    run = SimpleNamespace(eval_every=0, output_dir="")

    def due(iteration, **kw):
        return evaluate.eval_due(SimpleNamespace(eval_prompts=[], run=run, iteration=iteration, iterations=3), **kw)

    assert due(0, at_start=True)
    assert [due(i) for i in (1, 2, 3)] == [False, False, True]
    run_tiny(tmp_path, "--max-iterations", "1", "--eval-every", "0")
    lines = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in lines] == [0, 1]


def test_log_lines_are_strict_json_with_nan_as_null():
    """metrics.jsonl, eval.jsonl and the answers' files are written by json_line: a non-finite value (an evaluation's
    KL overflowing, say) is null, not Python's NaN, which no strict JSON reader takes."""
    from engine.config import json_line

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a log line"))

    line = json_line({"kl": float("nan"), "score": -1.5, "lengths": [3, float("inf")], "ids": (1, 2), "x": "NaN"})
    assert line.endswith("\n") and line.count("\n") == 1
    assert strict(line) == {"kl": None, "score": -1.5, "lengths": [3, None], "ids": [1, 2], "x": "NaN"}
