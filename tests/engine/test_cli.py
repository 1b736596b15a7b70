"""The command line of train_ppo.py: flags refused when parsed, input errors named in one line (by the flag
or file) before anything is built or written, --help, and the output directory's refusals."""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from engine import preflight
from engine import state as state_mod
from engine.checkpoint import load_pretrained
from engine.config import PPOConfig
from engine.distributed import ProcessGrid
from engine.errors import InputError, InvalidInput, first_line, run_command
from engine.output_dir import run_files
from engine.state import RunConfig
from engine.train_ppo import build_parser, parse_args
from tests.engine.ranks import init_gloo, leave, outcome
from tests.engine.runs import ROOT, run_tiny, tiny_state


def test_a_fresh_run_into_a_used_output_dir_is_refused_unless_overwritten(tmp_path):
    from engine.tokenizer import TINY_DIR, TINY_EVAL_PROMPTS, TINY_PROMPTS

    run_tiny(tmp_path, "--max-iterations", "1")  # the tiny default (which starts over each time) leaves a run here
    assert not (tmp_path / ".run.lock").exists()  # (its lock file removed as it ended)
    flags = ["--policy", str(tmp_path / "init/policy"), "--reward", str(tmp_path / "init/reward"),
             "--prompts", TINY_PROMPTS, "--tokenizer", TINY_DIR, "--max-iterations", "1"]  # fmt: skip
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(checkpoint-000001, eval, eval.jsonl, ...\)"):
        run_tiny(tmp_path, *flags)
    (tmp_path / "checkpoint-best").mkdir()  # (a user's, beside the run's checkpoint-N: no file a run writes)
    (tmp_path / "checkpoint-notes.txt").write_text("lr sweep")
    assert run_files(str(tmp_path))[:2] == ["checkpoint-000001", "eval"]
    run_tiny(tmp_path, *flags, "--overwrite-output-dir")
    assert (tmp_path / "checkpoint-best").is_dir() and (tmp_path / "checkpoint-notes.txt").exists()
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
            run_tiny(tmp_path, *stage, *how)
        assert (ckpt / "policy/model.safetensors").exists() and (tmp_path / "metrics.jsonl").exists()
    # --eval-only of that checkpoint there: refused as an evaluation of its own (not as a fresh run that would delete
    # it: it deletes nothing), and with --overwrite-output-dir for what that flag would delete
    evaluate = ["--eval-only", "--eval-prompts", TINY_EVAL_PROMPTS, *flags[2:4], "--tokenizer", TINY_DIR,
                "--policy", str(ckpt / "policy")]  # fmt: skip
    with pytest.raises(FileExistsError, match="--eval-only writes an evaluation of its own"):
        run_tiny(tmp_path, *evaluate)
    with pytest.raises(ValueError, match=f"--policy {ckpt}/policy lies in {ckpt}, which --overwrite-output-dir would"):
        run_tiny(tmp_path, *evaluate, "--overwrite-output-dir")
    assert (ckpt / "policy/model.safetensors").exists()
    # a run that ended no iteration (out of memory in its first rollout, say) left only its launch and first evaluation:
    # the refusal says there is nothing to continue, and --resume starts over
    fresh = tmp_path / "unfinished"
    fresh.mkdir()
    (fresh / "launches.jsonl").write_text('{"iteration": 0}\n')
    (fresh / "eval.jsonl").write_text('{"iteration": 0}\n')
    with pytest.raises(FileExistsError, match=r"\(eval.jsonl, launches.jsonl\): it ended no iteration: --resume or"):
        run_tiny(fresh, *flags)
    run_tiny(fresh, *flags, "--resume")
    assert len((fresh / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_checkpoint_of_the_wrong_kind_is_refused_before_anything_is_read_or_cleared(tmp_path, monkeypatch):
    """A reward model saved as a causal LM (or a policy as a classifier) is refused from the files' headers: before
    any model's weights are read, and before --overwrite-output-dir clears the run there (nothing is lost); a
    checkpoint path that is no directory is named as its flag's, not as the tokenizer's it defaults to."""
    from engine.evaluate import evaluate_only
    from engine.tokenizer import TINY_DIR, TINY_EVAL_PROMPTS, TINY_PROMPTS

    run_tiny(tmp_path, "--max-iterations", "1")  # the tiny default leaves a run here
    init = tmp_path / "init"
    flags = ["--prompts", TINY_PROMPTS, "--tokenizer", TINY_DIR, "--max-iterations", "1", "--overwrite-output-dir"]
    monkeypatch.setattr(state_mod, "load_pretrained", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(
        ValueError,
        match=rf"^--reward: checkpoint {init}/policy is missing tensor score.weight .*"
        r"a causal-LM checkpoint: this model is a LlamaForSequenceClassification with num_labels=1",
    ):
        run_tiny(tmp_path, "--policy", str(init / "policy"), "--reward", str(init / "policy"), *flags)
    with pytest.raises(ValueError, match=rf"--reference: checkpoint {init}/reward is missing tensor lm_head.weight "
                       r".*a sequence-classification checkpoint: this model is a causal LM"):  # fmt: skip
        run_tiny(tmp_path, "--policy", str(init / "policy"), "--reference", str(init / "reward"),
             "--reward", str(init / "reward"), *flags)  # fmt: skip
    monkeypatch.setattr(state_mod, "check_memory", lambda *a, **k: pytest.fail("planned before the paths were checked"))
    with pytest.raises(FileNotFoundError, match=r"--policy /nowhere/policy: no such directory \(a local checkpoint"):
        run_tiny(tmp_path, "--policy", "/nowhere/policy", "--reward", str(init / "reward"), *flags)
    monkeypatch.undo()
    monkeypatch.setattr(state_mod, "load_pretrained", lambda *a, **k: pytest.fail("weights read"))
    shutil.copytree(init / "reward", tmp_path / "truncated")
    (tmp_path / "truncated/config.json").write_text("{")
    with pytest.raises(ValueError, match=rf"^--reward: {tmp_path}/truncated/config.json is not valid JSON \(Expecting"):
        run_tiny(tmp_path, "--policy", str(init / "policy"), "--reward", str(tmp_path / "truncated"), *flags)
    (tmp_path / "truncated/config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match=r"^--reference: architecture GPT2LMHeadModel \(model_type 'gpt2'\) is not"):
        run_tiny(tmp_path, "--policy", str(init / "policy"), "--reference", str(tmp_path / "truncated"),
             "--reward", str(init / "reward"), *flags)  # fmt: skip
    assert (tmp_path / "checkpoint-000001/policy/model.safetensors").exists() and (tmp_path / "metrics.jsonl").exists()
    cfg, run, _ = parse_args(["--eval-only", "--policy", str(init / "policy"), "--reward", str(init / "policy"),
                              "--eval-prompts", TINY_EVAL_PROMPTS, "--output-dir", str(tmp_path)])  # fmt: skip
    with pytest.raises(ValueError, match=rf"--reward: checkpoint {init}/policy is missing tensor score.weight"):
        evaluate_only(cfg, run, ProcessGrid())
    assert (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train-batch-size", "0"], "--train-batch-size must be >= 1, got 0"),
        (["--ppo-epochs", "0"], "--ppo-epochs must be >= 1, got 0"),
        (["--lr-schedule", "cosine"], "--lr-schedule must be 'linear' or 'constant', got 'cosine'"),
        (["--kl-estimator", "k9"], "--kl-estimator must be 'k1', 'k2' or 'k3'"),
        (["--temperature", "0"], r"--temperature must be > 0 for PPO's rollouts, got 0\.0 \(--eval-greedy"),
        (["--warmup-ratio", "2"], r"--warmup-ratio must be in \[0, 1\], got 2\.0"),
        (["--clip-ratio", "-0.2"], "--clip-ratio must be >= 0"),
        (["--adam-betas", "0.9", "1.0"], r"--adam-betas must be two numbers in \[0, 1\)"),
        (["--adam-eps", "0"], r"--adam-eps must be > 0, got 0\.0"),
        (["--lam", "1.5"], r"--lam must be in \[0, 1\], got 1\.5"),
        (["--max-prompt-len", "0"], "--max-prompt-len must be >= 1, got 0"),
        (
            ["--max-iterations", "-1", "--keep-checkpoints", "0"],
            "--keep-checkpoints must be >= 1, got 0; --max-iterations",
        ),
        (["--save-every", "-1"], "--save-every must be >= 0"),
        (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32\), got -1"),
        (["--seed", str(2**32)], r"--seed must be in \[0, 2\*\*32\), got 4294967296"),
        (["--dist-timeout-minutes", "0"], r"--dist-timeout-minutes must be > 0 and finite, got 0\.0"),
        (["--dist-timeout-minutes", "inf"], r"--dist-timeout-minutes must be > 0 and finite, got inf"),
        # (torch.distributed's timedelta overflows: a traceback at 1e30, every collective timed out at once at 1e12)
        (["--dist-timeout-minutes", "1e12"], r"--dist-timeout-minutes must be at most 1000000 .*got 1e\+12"),
        (["--kv-cache-fraction", "1.5"], r"--kv-cache-fraction must be in \(0, 1\]"),
        (["--learning-rate", "inf"], "--learning-rate must be > 0 and finite, got inf"),
        (["--missing-eos-penalty", "-inf"], "--missing-eos-penalty must be finite, got -inf"),
        (["--dtype", "float16"], r"--dtype float16 trains without loss scaling .*\(float16 serves --eval-only\)"),
        (["--dtype", "int8"], "--dtype must be auto, bfloat16, float16 or float32, got 'int8'"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--kv-cache-dtype", "int4"], "--kv-cache-dtype must be auto or fp8, got 'int4'"),
        (["--decode-config", "{linear: 1}"], "--decode-config: Expecting property name enclosed in double quotes"),
        (
            ["--decode-config", "[1]"],
            r"--decode-config: expected a JSON object such as '\{\"linear\": 1\}', got '\[1\]'",
        ),
        (["--decode-config", '{"linar": 1}'], r"--decode-config: unknown decode launch parameter\(s\) \['linar'\]"),
        # (a field's name within a quoted value of the user's stays as typed)
        (["--decode-config", '{"max_iterations": 1}'], r"parameter\(s\) \['max_iterations'\]"),
        (["--decode-config", '{"pdl": 2}'], "--decode-config: decode launch parameter pdl must be 0 or 1, got 2"),
        # (refused by setup only after the tiny default's models were built, and by ppo_step.py after its four)
        (["--offload-optimizer", "x"], "--offload-optimizer must be one of auto, off, rollouts, always, got 'x'"),
        (["--offload-idle-models", "always"], "--offload-idle-models must be one of auto, off, rollouts, got 'always'"),
        (["--activation-checkpointing", "maybe"], "--activation-checkpointing must be auto, on, off or a number"),
        (["--output-dir", ""], "--output-dir must not be empty"),
        (["--output-dir", " "], "--output-dir ' ' is only whitespace"),
        (["--save-every-minutes", "inf"], r"--save-every-minutes must be finite \(0: off\), got inf"),
        (["--top-k", "-1"], r"--top-k must be >= 0 \(0: no top-k\), got -1"),
        (["--top-p", "0"], r"--top-p must be in \(0, 1\], got 0\.0"),
        (["--kl-target", "-1"], r"--kl-target must be >= 0 and finite, got -1\.0"),
        (["--entropy-coef", "-0.01"], r"--entropy-coef must be >= 0 and finite, got -0\.01"),
        (["--kl-horizon", "0"], "--kl-horizon must be >= 1, got 0"),
        (["--kl-target", "6", "--kl-coef", "0"], "--kl-target 6.0 needs a --kl-coef > 0"),
        (
            ["--kl-target", "6", "--kl-horizon", "8", "--rollout-batch-size", "20", "--samples-per-prompt", "2"],
            r"--kl-horizon must exceed a fifth of a rollout's 40 sequences \(one rollout could take",
        ),  # fmt: skip
        (["--reward", "r"], r"--reward/--prompts need --policy \(without --policy the tiny default builds its own"),
        (
            ["--resume", "--overwrite-output-dir"],
            "--resume continues the run in --output-dir and --overwrite-output-dir deletes it: give one",
        ),  # fmt: skip
        (["--eval-only", "--resume"], r"--eval-only evaluates --policy \(a checkpoint\) without training; --resume"),
        (
            ["--eval-only", "--max-iterations", "3", "--log-samples", "2"],
            "--eval-only evaluates --policy once and trains nothing: --max-iterations, --log-samples would do nothing",
        ),  # fmt: skip
        (["--eval-only", "--save-every", "1"], "trains nothing: --save-every would do nothing"),
        (
            ["--eval-only", "--learning-rate", "0.5", "--ppo-epochs", "3", "--temperature", "0.7"],
            "--eval-only evaluates --policy once and trains nothing: --learning-rate, --ppo-epochs would do nothing",
        ),
        (["--eval-only", "--samples-per-prompt", "2"], "trains nothing: --samples-per-prompt would do nothing"),
        (
            [
                "--policy",
                "p",
                "--reward",
                "r",
                "--eval-only",
                "--prompts",
                "x.jsonl",
                "--no-async-save",
                "--activation-checkpointing",
                "on",
                "--no-balance-dp-tokens",
            ],
            "trains nothing: --prompts, --activation-checkpointing, --no-async-save, --no-balance-dp-tokens would do",
        ),  # fmt: skip
        (
            ["--ppo-epochs", str(10**23)],
            "--ppo-epochs must be at most 2,147,483,647, got 100,000,000,000,000,000,000,000",
        ),
        (["--dist-timeout-minutes", "1e-9"], r"--dist-timeout-minutes must be at least a second \(1/60\), got 1e-09"),
        (["--learning-rate", "0"], "--learning-rate must be > 0 and finite, got 0.0"),
        (["--eval-only", "--eval-every", "1"], "trains nothing: --eval-every would do nothing"),
        (["--wandb-run-name", "x"], "--wandb-run-name names a run in a W&B project: give --wandb-project too"),
        # no abbreviations: --lr took --lr-schedule ("lr_schedule must be 'linear' or 'constant', got '1e-5'")
        (["--lr", "1e-5"], "unrecognized arguments: --lr 1e-5"),
        (["--learning", "1e-5"], "unrecognized arguments: --learning 1e-5"),
    ],
)
def test_nonsense_flags_are_refused_when_parsed(flags, message, capsys):
    """A usage error (exit code 2, the message after the usage lines), not a traceback from inside."""
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert e.value.code == 2 and re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("betas", [(0.9,), (0.9, 0.99, 0.999)])
def test_adam_betas_of_another_length_are_refused(betas):
    """A config made in code or read back from a checkpoint has no argparse nargs=2 to hold its betas to two."""
    with pytest.raises(ValueError, match=r"adam_betas must be two numbers in \[0, 1\)"):
        PPOConfig(adam_betas=betas)


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
    assert "error: --top-k must be >= 0" in json.loads(error_file.read_text())["message"]

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
            run_tiny(out, *argv)
        # (nothing written: at most the directory checked, with the run's lock)
        assert not out.exists() or [p.name for p in out.iterdir()] in ([], [".run.lock"])

    refused(rf"^--prompts {tmp_path}/none.jsonl: no such file", prompts=tmp_path / "none.jsonl")
    refused(rf"^--prompts {tmp_path}: a directory, not a JSONL file", prompts=tmp_path)
    os.mkfifo(tmp_path / "pipe")  # (<(zcat f.jsonl.gz): there, but read once only; not "no such file")
    refused(rf"^--prompts {tmp_path}/pipe: not a regular file \(a pipe or a device", prompts=tmp_path / "pipe")
    refused(rf"^--eval-prompts {tmp_path}/e.jsonl: no such file", "--eval-prompts", str(tmp_path / "e.jsonl"))
    refused(r"^--samples-per-prompt 4 exceeds --gen-max-num-seqs 2", "--samples-per-prompt", "4",
            "--gen-max-num-seqs", "2", "--rollout-batch-size", "8", "--train-batch-size", "8")  # fmt: skip
    refused(r"^--activation-checkpointing 9: the policy has 2 layers", "--activation-checkpointing", "9")
    weights = os.path.join(policy, "model.safetensors")  # (a file of the checkpoint, not its directory)
    refused(rf"^--policy {weights}: no such directory .*: name the directory that holds it, {policy}$", policy=weights)
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
        preflight.check_context(run, cfg, grid)  # (on a CPU too: no memory plan there)
    # a damaged `latest` (here a directory) names itself
    (out / LATEST).mkdir(parents=True)
    with pytest.raises(InputError, match=r"latest is damaged \(IsADirectoryError"):
        run_tiny(out, "--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS, "--resume")
    # a fault inside a check is no input error: it keeps its own type (and so its traceback at the command line)
    monkeypatch.setattr(preflight, "check_checkpoint", lambda *a: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="^a bug$") as e:
        run_tiny(tmp_path / "o2", "--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS)
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
        tiny_state(tmp_path / "a", "--rollout-batch-size", "64")
    with pytest.raises(ValueError, match=r"--max-prompt-len 128 \+ --max-new-tokens 2000 = 2128 tokens do not fit "
                       r"the policy model's context \(.*: max_position_embeddings 2048\); lower either"):  # fmt: skip
        tiny_state(tmp_path / "b", "--max-new-tokens", "2000")
    check_fills_a_rollout(64, 64)
    split = PPOConfig(train_batch_size=8, rollout_batch_size=16, samples_per_prompt=3)
    preflight.check_batch_sizes(split, ProcessGrid(world_size=2, dp=2))
    out = capsys.readouterr().out
    assert "a rank's share of a minibatch (4 sequences) does not hold whole prompts' 3 samples" in out
    preflight.check_batch_sizes(split, ProcessGrid(world_size=2, dp=2), warn=False)  # (make_state's, after setup's)
    assert capsys.readouterr().out == ""


def test_a_kv_cache_too_small_for_one_sequence_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    """--kv-cache-mb that cannot hold one sequence of --max-prompt-len + --max-new-tokens was refused by the generator
    at the first rollout, after the four models were loaded, naming its max_model_len and not the flag."""
    from engine.checkpoint import save_pretrained
    from engine.config import ModelConfig
    from engine.model import Transformer
    from engine.tokenizer import TINY_DIR, TINY_PROMPTS

    config = dataclasses.replace(ModelConfig.named("tiny"), num_layers=8)  # (32 KiB of float32 K/V a 16-token block)
    for name, head in (("policy", "lm"), ("reward", "score")):
        save_pretrained(Transformer(config, head).init_weights(seed=0), str(tmp_path / name), tokenizer_dir=TINY_DIR)
    monkeypatch.setattr(state_mod, "load_pretrained", lambda *a, **k: pytest.fail("weights read"))
    flags = ["--policy", str(tmp_path / "policy"), "--reward", str(tmp_path / "reward"), "--prompts", TINY_PROMPTS]
    with pytest.raises(InvalidInput, match=r"^--kv-cache-mb 1: a KV cache of 1 MiB cannot hold one sequence of "
                       r"--max-prompt-len 1024 \+ --max-new-tokens 8 = 1032 tokens \(65 blocks of 16 tokens, 2\.03 "
                       r"MiB of the policy's K/V per GPU\): give it at least 3, or 0"):  # fmt: skip
        run_tiny(tmp_path / "a", *flags, "--kv-cache-mb", "1")
    with pytest.raises(pytest.fail.Exception, match="weights read"):  # (3 MiB holds it)
        run_tiny(tmp_path / "b", *flags, "--kv-cache-mb", "3")
    evaluation = ["--policy", str(tmp_path / "policy"), "--reward", str(tmp_path / "reward"), "--eval-only"]
    with pytest.raises(InvalidInput, match=r"^--kv-cache-mb 1: a KV cache of 1 MiB cannot hold one sequence"):
        run_tiny(tmp_path / "c", *evaluation, "--eval-prompts", TINY_PROMPTS, "--kv-cache-mb", "1")  # (--eval-only's)


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
    assert "(default: )" not in flat and "(default: None)" not in flat and '.[wandb]"`) (default: none)' in flat
    flags = {"--" + f.name.replace("_", "-") for cls in (PPOConfig, RunConfig) for f in dataclasses.fields(cls)}
    for action in build_parser()._actions:  # every flag says what it is (its field's comment), not only its default
        if action.option_strings[0] in flags:
            assert not action.help.startswith("(default:"), action.option_strings[0]


def test_batch_sizes_that_do_not_divide_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a multiple of train_batch_size 4"):
        tiny_state(tmp_path, "--rollout-batch-size", "6")


def test_the_tiny_default_never_deletes_another_run(tmp_path):
    """Without --policy the demo starts over in a directory it ran in before (its init/ models there), but a
    directory holding another run is refused as any fresh run's would be (it was emptied)."""
    other = tmp_path / "other"
    (other / "checkpoint-000006").mkdir(parents=True)
    (other / "metrics.jsonl").write_text('{"iteration": 6}\n')
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        run_tiny(other, "--max-iterations", "1")
    assert (other / "checkpoint-000006").is_dir() and (other / "metrics.jsonl").read_text() == '{"iteration": 6}\n'
    assert not (other / "init").exists()  # (refused before the demo's models are written there)
    # --resume without --policy continues the demo: another run's directory is refused too (its own flags resume it)
    with pytest.raises(FileExistsError, match=r"holds a run of other models than the tiny default's: resume it with "
                       r"its own --policy, --reward and --prompts"):  # fmt: skip
        run_tiny(other, "--max-iterations", "1", "--resume")
    assert (other / "checkpoint-000006").is_dir() and (other / "metrics.jsonl").read_text() == '{"iteration": 6}\n'
    assert not (other / "init").exists()
    # a run of other models whose directory holds an init/ (an older refused demo left one) is refused as well
    (other / "init").mkdir()
    (other / "launches.jsonl").write_text(json.dumps({"run": {"policy": "/elsewhere/policy"}}) + "\n")
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        run_tiny(other, "--max-iterations", "1")
    assert (other / "checkpoint-000006").is_dir()
    run_tiny(tmp_path / "demo", "--max-iterations", "1")
    run_tiny(tmp_path / "demo", "--max-iterations", "1")  # (its own directory: starts over)
    shutil.copytree(tmp_path / "demo", tmp_path / "copy")  # (a demo's directory moved or copied: --resume continues it)
    assert [m["iteration"] for m in run_tiny(tmp_path / "copy", "--max-iterations", "2", "--resume")] == [2]


def test_the_tiny_default_starts_over_in_its_directory_without_a_launch_record(tmp_path):
    """A demo's directory with no launches.jsonl (from before it was written, or removed) is still the demo's (its
    init/ models are there): a fresh demo run starts over in it instead of refusing it as another run's."""
    run_tiny(tmp_path, "--max-iterations", "1", "--eval-prompts", "")
    os.remove(tmp_path / "launches.jsonl")
    assert [m["iteration"] for m in run_tiny(tmp_path, "--max-iterations", "1", "--eval-prompts", "")] == [1]


def test_the_tiny_default_refuses_eval_every_with_its_evaluation_turned_off(tmp_path, monkeypatch):
    """--eval-prompts "" turns the tiny default's evaluation off, and with it its preset --eval-every 4; an --eval-every
    given beside it was dropped in silence: refused as for any run (no evaluation set to evaluate every N)."""
    assert parse_args(["--eval-prompts", ""])[1].eval_every == 0
    assert parse_args(["--eval-prompts", "", "--eval-holdout", "8"])[1].eval_every == 0  # (as before: 0 unless given)
    assert parse_args(["--eval-holdout", "8"])[1].eval_every == 4
    monkeypatch.setattr(state_mod, "load_pretrained", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(InvalidInput, match=r"^--eval-every needs --eval-prompts \(a held-out prompt file\)"):
        tiny_state(tmp_path, "--eval-prompts", "", "--eval-every", "2")
    with pytest.raises(InvalidInput, match=r"^--eval-greedy needs --eval-prompts \(a held-out prompt file\) or "):
        tiny_state(tmp_path, "--eval-prompts", "", "--eval-greedy")  # (it was ignored in silence)


def test_the_tiny_defaults_seed_is_checked_only_against_a_recorded_seed_and_a_checkpoint(tmp_path):
    """The seed of the tiny default's init/ models is compared on --resume only where it was recorded (seed.json
    holding an object: anything else reads as unrecorded) and a checkpoint is there to continue: an init/ without the
    record resumes, and a --resume with another --seed where no checkpoint was kept starts afresh from it."""
    from engine.train_ppo import _built_seed

    for text, seed in (('{"seed": 3}', 3), ("[3]", None), ("{", None)):
        (tmp_path / "seed.json").write_text(text)
        assert _built_seed(str(tmp_path)) == seed, text
    out = tmp_path / "run"
    run_tiny(out, "--max-iterations", "1")
    (out / "init" / "seed.json").unlink()  # (not recorded)
    assert [m["iteration"] for m in run_tiny(out, "--max-iterations", "2", "--resume")] == [2]
    for name in os.listdir(out):  # (no checkpoint kept: a run stopped in its first iteration)
        if name.startswith("checkpoint-") or name == "latest":
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    assert [m["iteration"] for m in run_tiny(out, "--max-iterations", "1", "--resume", "--seed", "5")] == [1]


def test_a_rebuild_of_the_tiny_models_killed_midway_leaves_no_seed_naming_them(tmp_path, monkeypatch):
    """The tiny models rebuilt from another --seed and killed after the policy, before the reward model: seed.json
    does not still name the old seed (the next build with it would keep the new seed's policy as its own); it is
    written whole, after both models."""
    import engine.checkpoint
    from engine.train_ppo import _built_seed, build_tiny_models

    d = str(tmp_path / "init")
    build_tiny_models(d, seed=1)
    assert _built_seed(d) == 1 and os.listdir(tmp_path / "init").count("seed.json") == 1
    real, calls = engine.checkpoint.save_pretrained, []

    def killed(*a, **k):
        calls.append(a[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine.checkpoint, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_models(d, seed=2)
    assert _built_seed(d) is None
    monkeypatch.setattr(engine.checkpoint, "save_pretrained", real)
    build_tiny_models(d, seed=1)
    again = tmp_path / "again"
    build_tiny_models(str(again), seed=1)
    for m in ("policy/model.safetensors", "reward/model.safetensors"):
        assert (tmp_path / "init" / m).read_bytes() == (again / m).read_bytes(), m
    assert sorted(os.listdir(tmp_path / "init")) == ["policy", "reward", "seed.json"]


def test_an_evaluation_of_the_tiny_default_never_deletes_its_training_run(tmp_path):
    """--eval-only without --policy (the tiny default's init models) into the directory the demo trained in is refused
    as any --eval-only into a run's directory is, not taken for the demo starting over: its checkpoints and logs
    stay."""
    run_tiny(tmp_path, "--max-iterations", "1")
    held = sorted(os.listdir(tmp_path))
    with pytest.raises(FileExistsError, match="--eval-only writes an evaluation of its own"):
        run_tiny(tmp_path, "--eval-only")
    assert sorted(os.listdir(tmp_path)) == held and (tmp_path / "checkpoint-000001/policy").is_dir()
    assert run_tiny(tmp_path / "heldout", "--eval-only")[0]["prompts"] == 16  # (its own directory: evaluated there)
    with pytest.raises(ValueError, match=f"^{tmp_path}/eval is {tmp_path}/eval, which the run writing"):
        run_tiny(tmp_path / "eval", "--eval-only")  # (not in the run's own evaluations, which it deletes starting over)


def test_another_seed_never_rebuilds_the_tiny_defaults_models_under_its_run(tmp_path):
    """The demo's init/ policy is its run's reference model: --resume or --eval-only with another --seed is refused
    before init/ is rebuilt from that seed (the same seed resumes, and a --resume without --seed takes the run's)."""
    run_tiny(tmp_path, "--max-iterations", "1", "--seed", "3")
    init = {p: (tmp_path / "init" / p).read_bytes() for p in ("seed.json", "policy/model.safetensors")}
    with pytest.raises(ValueError, match=r"--seed 0: the tiny default's run in .* was built and trained with --seed 3; "
                       r"resume it with --seed 3"):  # fmt: skip
        run_tiny(tmp_path, "--max-iterations", "2", "--resume", "--seed", "0")
    assert {p: (tmp_path / "init" / p).read_bytes() for p in init} == init
    with pytest.raises(FileExistsError, match="--eval-only writes an evaluation of its own"):
        run_tiny(tmp_path, "--eval-only", "--seed", "5")
    assert {p: (tmp_path / "init" / p).read_bytes() for p in init} == init
    (tmp_path / "latest").rename(tmp_path / "latest.lost")  # (and with `latest` lost: its checkpoint is resumed, so
    with pytest.raises(ValueError, match=r"was built and trained with --seed 3"):  # refused before init/ too)
        run_tiny(tmp_path, "--max-iterations", "2", "--resume", "--seed", "0")
    assert {p: (tmp_path / "init" / p).read_bytes() for p in init} == init
    (tmp_path / "latest.lost").rename(tmp_path / "latest")
    assert [m["iteration"] for m in run_tiny(tmp_path, "--max-iterations", "2", "--resume", "--seed", "3")] == [2]
    assert [m["iteration"] for m in run_tiny(tmp_path, "--max-iterations", "3", "--resume")] == [3]  # (the run's)
    assert {p: (tmp_path / "init" / p).read_bytes() for p in init} == init


def test_the_tiny_default_takes_the_tokenizer_and_the_generator_it_is_given(tmp_path):
    from engine.train_ppo import prepare_tiny

    run = prepare_tiny(parse_args(["--output-dir", str(tmp_path), "--tokenizer", str(tmp_path / "tok")])[1])
    assert run.tokenizer == str(tmp_path / "tok") and run.policy == str(tmp_path / "init/policy")

    class Made(Exception):
        pass

    def factory(policy, cfg, run):
        raise Made(run.output_dir)

    with pytest.raises(Made, match=str(tmp_path / "gen")):
        run_tiny(tmp_path / "gen", "--max-iterations", "1", factory=factory)


def test_an_output_dir_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "file").write_text("x")
    evaluate = ("--eval-only", "--eval-prompts", os.path.join(ROOT, "engine/assets/prompts_tiny_eval.jsonl"))
    for flags in (("--max-iterations", "1"), evaluate):
        with pytest.raises(OSError, match="cannot write to the output directory"):
            run_tiny(tmp_path / "file" / "out", *flags)
    from engine.output_dir import check_writable

    # a file, or something else that is not a directory, named as the output directory itself (makedirs said "File
    # exists" of /dev/null)
    with pytest.raises(OSError, match=f"output directory {tmp_path / 'file'}: a file of that name is there"):
        check_writable(str(tmp_path / "file"), 0)
    if os.path.exists("/dev/null"):
        with pytest.raises(OSError, match="output directory /dev/null: it is not a directory"):
            check_writable("/dev/null", 0)


LOCK_AND_WAIT = (  # (a run's lock taken by another process, which then waits to be killed)
    "import sys, time; from engine.output_dir import lock_output_dir; lock_output_dir(sys.argv[1], 0); "
    "print('locked', flush=True); time.sleep(120)"
)


@contextlib.contextmanager
def locked_by_another_process(out):
    """The output directory `out` locked by another process (its pid yielded) until the block ends."""
    argv = [sys.executable, "-c", LOCK_AND_WAIT, str(out)]
    other = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        yield other.pid
    finally:
        other.kill()
        other.wait()
        other.stdout.close()  # (now, not when the Popen is collected: a test counts this process's descriptors)


def test_a_second_run_in_an_output_dir_being_written_is_refused_before_it_touches_it(tmp_path):
    """Two runs writing into one output directory at once (a requeued job while the first still runs, a command
    started twice) would save checkpoints, `latest` and metrics over each other: while another process runs there,
    a run (fresh, --resume or --eval-only) is refused before it writes anything, naming that process; once it has
    ended, however it ended, the directory is free again, and a run frees it when it ends, failed or not."""
    out = tmp_path / "out"
    with locked_by_another_process(out) as pid:
        evaluation = ("--eval-only", "--eval-prompts", os.path.join(ROOT, "engine/assets/prompts_tiny_eval.jsonl"))
        for flags in (("--max-iterations", "1"), ("--max-iterations", "1", "--resume"), evaluation):
            with pytest.raises(InputError, match=rf"{out} is being written by another run \(host .*, pid {pid}, "
                               r"since .*\): wait for it to end"):  # fmt: skip
                run_tiny(out, *flags)
        assert sorted(os.listdir(out)) == [".run.lock"]  # (nothing read or written there)
    run_tiny(out, "--max-iterations", "1")  # (the lock went with the process)
    free = [sys.executable, "-c", LOCK_AND_WAIT.split("; print")[0]]  # (another process takes the lock, and ends)
    assert subprocess.run([*free, str(out)], cwd=ROOT).returncode == 0  # (and this run freed it as it ended)
    with pytest.raises(InputError, match="--seed 5: the tiny default's run"):
        run_tiny(out, "--max-iterations", "2", "--resume", "--seed", "5")
    assert subprocess.run([*free, str(out)], cwd=ROOT).returncode == 0  # (a failed run frees it too)


def test_a_run_refused_for_an_output_dir_being_written_reads_and_writes_nothing_there_first(tmp_path):
    """The refusal comes before anything else touches the directory: a resume of other models does not read `latest`
    first (the other run's --overwrite-output-dir may have deleted the checkpoint it names, and the resume was told to
    start over there with --overwrite-output-dir), and no run writes its probe of the directory there (its mtime)."""
    from engine.tokenizer import TINY_DIR, TINY_PROMPTS
    from engine.train_ppo import build_tiny_models

    policy, reward = build_tiny_models(str(tmp_path / "models"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "latest").write_text('{"checkpoint": "checkpoint-000002"}')  # (the other run deleting what it names)
    with locked_by_another_process(out) as pid:
        os.utime(out, (1, 1))
        flags = ["--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS, "--tokenizer", TINY_DIR]
        for how in (flags + ["--resume"], flags + ["--overwrite-output-dir"], ["--resume"], []):
            with pytest.raises(InputError, match=rf"^{out} is being written by another run \(host .*, pid {pid}"):
                run_tiny(out, "--max-iterations", "1", *how)
            assert sorted(os.listdir(out)) == [".run.lock", "latest"] and os.stat(out).st_mtime == 1


def test_a_full_disk_met_taking_the_lock_is_an_unwritable_output_dir(tmp_path, monkeypatch):
    """The lock is taken before the directory's probe (check_writable): a full disk met writing the holder's line into
    the lock file (an empty one there, a page to allocate) is the probe's refusal, raised together by every rank, not
    rank 0's bare OSError (the other ranks, waiting for it in a collective, died with gloo's traceback)."""
    import errno

    out = tmp_path / "out"
    out.mkdir()
    (out / ".run.lock").touch()

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(InputError, match=f"^cannot write to the output directory {out}: No space left on device$"):
        run_tiny(out, "--max-iterations", "1")
    assert sorted(os.listdir(out)) == [".run.lock"]
    monkeypatch.undo()
    from engine.output_dir import lock_output_dir, unlock_output_dir

    lock_output_dir(str(out), 0)  # (the failed lock's descriptor is closed: nothing holds it)
    unlock_output_dir(str(out))


def test_the_directory_probes_a_killed_run_left_are_removed_when_old(tmp_path, monkeypatch):
    """A run killed as it checks its output directory leaves its probe (.write-test-PID, .shared-test-TOKEN): one more
    each kill, and no run removed them. The next run to take the lock removes those older than STALE_PROBE_S, not a
    newer one (another launch checking the directory now, which the lock will refuse); a full disk's failed probe
    leaves no empty file."""
    import errno
    import time

    from engine import output_dir

    out = tmp_path / "out"
    out.mkdir()
    old = time.time() - output_dir.STALE_PROBE_S - 60
    for name in (".write-test-4242", ".shared-test-0a1b2c", ".write-test-77"):
        (out / name).write_text("ok")
    for name in (".write-test-4242", ".shared-test-0a1b2c"):
        os.utime(out / name, (old, old))
    (out / ".write-test-notes").write_text("a user's")  # (not a probe's name: kept, however old)
    os.utime(out / ".write-test-notes", (old, old))
    output_dir.lock_output_dir(str(out), 0)
    output_dir.unlock_output_dir(str(out))
    assert sorted(os.listdir(out)) == [".write-test-77", ".write-test-notes"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (real(p, *a, **k).close(), full())[1]
                        if ".write-test-" in str(p) else real(p, *a, **k))  # fmt: skip
    assert output_dir.why_unwritable(str(out)) == "No space left on device"
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == [".write-test-77", ".write-test-notes"]


def test_a_run_lock_that_cannot_be_opened_is_named(tmp_path):
    """A .run.lock there that cannot be opened for writing (a directory of that name; another user's file) names
    the lock file, not the output directory, which can be written."""
    out = tmp_path / "out"
    (out / ".run.lock").mkdir(parents=True)
    with pytest.raises(InputError, match=f"^cannot write to its run lock {out}/.run.lock: Is a directory$"):
        run_tiny(out, "--max-iterations", "1")


def test_damaged_files_are_named(tmp_path):
    from engine.resume import LATEST, latest_checkpoint
    from engine.saved_run import load_state_file
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


def test_first_line():
    assert first_line(ValueError("  first\nsecond\nthird ")) == "first"
    assert first_line(KeyError()) == "KeyError"


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_tulu_traceback_0_still_reports_in_one_line(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("TULU_TRACEBACK", "0")

    def main():
        raise InvalidInput("bad flag")

    with pytest.raises(SystemExit) as e:
        run_command(main, "prog")
    assert e.value.code == 2 and capsys.readouterr().err == "prog: error: bad flag\n"


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # (@record's, under pytest's capture)
def test_a_full_disk_is_one_line_with_what_to_do(tmp_path, monkeypatch, capsys):
    """A full disk (or quota) while the run writes its logs or a checkpoint is no fault of the engine's: one line
    naming the file and saying --resume continues (the resume is exact: tests/engine/test_resume.py), exit code 1, not
    a traceback (a quota exceeded too); TULU_TRACEBACK=1 raises it, and any other OSError keeps its traceback."""
    import errno

    from engine import train_ppo

    monkeypatch.delenv("TULU_TRACEBACK", raising=False)
    metrics = tmp_path / "metrics.jsonl"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(metrics))

    monkeypatch.setattr(train_ppo, "main", full)
    with pytest.raises(SystemExit) as e:
        train_ppo.cli([])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err, err
    assert err == (f"train_ppo.py: error: No space left on device writing {metrics}: free space, then --resume "
                   "continues exactly from the last checkpoint\n")  # fmt: skip
    monkeypatch.setenv("TULU_TRACEBACK", "1")
    with pytest.raises(OSError, match="No space left"):
        train_ppo.cli([])
    monkeypatch.delenv("TULU_TRACEBACK")

    def over_quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(metrics))

    monkeypatch.setattr(train_ppo, "main", over_quota)
    with pytest.raises(SystemExit) as e:
        train_ppo.cli([])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f"train_ppo.py: error: Disk quota exceeded writing {metrics}: "), err

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(metrics))

    monkeypatch.setattr(train_ppo, "main", denied)
    with pytest.raises(PermissionError):
        train_ppo.cli([])


def test_a_run_nested_in_another_runs_checkpoints_is_refused_before_it_writes_there(tmp_path):
    """A run whose --output-dir lies in another run's checkpoint would be deleted as that run prunes its checkpoints:
    refused with nothing made or written there, fresh or resumed, made already or not (the other way round, a run
    around another: test_resume's nested_run test)."""
    out = tmp_path / "out"
    run_tiny(out, "--max-iterations", "1")
    inner = out / "checkpoint-000001" / "next"
    before = sorted(os.listdir(out / "checkpoint-000001"))
    for flags in ((), ("--resume",)):
        with pytest.raises(InputError, match=rf"^{inner} lies in {out}/checkpoint-000001, which the run writing {out}"):
            run_tiny(inner, "--max-iterations", "1", *flags)
    assert not inner.exists() and sorted(os.listdir(out / "checkpoint-000001")) == before
    inner.mkdir()  # (made already: refused before its lock is taken there, which would write .run.lock)
    with pytest.raises(InputError, match=rf"^{inner} lies in {out}/checkpoint-000001, which the run writing {out}"):
        run_tiny(inner, "--max-iterations", "1", "--resume")
    assert os.listdir(inner) == []


def test_a_run_holds_its_output_dirs_lock_while_it_runs_whether_it_made_the_directory_or_not(tmp_path):
    """main locks a directory that is there; check_writable locks one it makes: either way the lock is held from
    then on, and another process taking it meanwhile (here as the models are set up) is refused."""
    take = [sys.executable, "-c", LOCK_AND_WAIT.split("; print")[0]]

    class Taken(Exception):
        pass

    def factory(policy, cfg, run):
        other = subprocess.run([*take, run.output_dir], cwd=ROOT, capture_output=True, text=True)
        raise Taken(other.returncode, other.stderr)

    (tmp_path / "there").mkdir()
    for out in (tmp_path / "new", tmp_path / "there"):
        with pytest.raises(Taken) as e:
            run_tiny(out, "--max-iterations", "1", factory=factory)
        code, err = e.value.args
        assert code != 0 and f"{out} is being written by another run (host " in err, (out, err)


def test_the_lock_file_holds_this_runs_line_alone_and_a_refusal_is_output_in_use(tmp_path):
    """The holder's line replaces a longer one left by an earlier run (no tail of it after this run's); a run refused
    for another one holding the lock gets OutputInUse, and neither a refusal nor a file system without locks leaves a
    descriptor open."""
    import errno
    import fcntl
    import socket

    from engine.errors import OutputInUse
    from engine.output_dir import RUN_LOCK, lock_output_dir, unlock_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_LOCK).write_text(f"host {'x' * 300}, pid 1, since long ago\n")
    lock_output_dir(str(out), 0)
    try:
        held = (out / RUN_LOCK).read_text()
        assert re.fullmatch(rf"host {re.escape(socket.gethostname())}, pid {os.getpid()}, since [^\n]+\n", held), held
    finally:
        unlock_output_dir(str(out))
    fds = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else None
    with locked_by_another_process(out):
        for _ in range(3):
            with pytest.raises(OutputInUse, match="is being written by another run"):
                lock_output_dir(str(out), 0)
    real_flock = fcntl.flock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    fcntl.flock = no_locks
    try:
        lock_output_dir(str(out), 0)  # (warned of, and run on)
    finally:
        fcntl.flock = real_flock
        unlock_output_dir(str(out))
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == len(fds)


def test_a_lock_released_in_this_process_is_free_and_can_be_taken_again_by_any_name_of_its_directory(tmp_path):
    """unlock_output_dir releases the lock taken under another name of the directory (a link to it), and a lock taken
    again after one released in the same process (a second run in one process, as the tests run) is held again."""
    from engine.output_dir import lock_output_dir, unlock_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "link").symlink_to(out)
    take = [sys.executable, "-c", LOCK_AND_WAIT.split("; print")[0], str(out)]

    def another_process_takes_it():
        return subprocess.run(take, cwd=ROOT, capture_output=True).returncode == 0

    for taken, released in ((out, tmp_path / "link"), (tmp_path / "link", out)):
        lock_output_dir(str(taken), 0)
        try:
            assert not another_process_takes_it(), (taken, released)
        finally:
            unlock_output_dir(str(released))
        assert another_process_takes_it(), (taken, released)


def test_a_run_that_ends_removes_its_lock_file_but_never_another_runs(tmp_path, monkeypatch):
    """unlock_output_dir removes .run.lock as the run ends (the file was left in every output directory), while it
    still holds the lock and only if the path still names the file it holds: a file put there since (another run's)
    stays. A run that locked the file just as its holder removed it takes the path's new file instead (two runs
    would otherwise each hold a lock, one on a file no longer there). A crashed run's file is taken as before."""
    import fcntl

    from engine import output_dir
    from engine.output_dir import RUN_LOCK, lock_output_dir, unlock_output_dir

    out = tmp_path / "out"
    out.mkdir()
    lock = out / RUN_LOCK
    lock.write_text("host gone, pid 1, since long ago\n")  # (a crashed run's)
    lock_output_dir(str(out), 0)
    assert f"pid {os.getpid()}," in lock.read_text()
    unlock_output_dir(str(out))
    assert not lock.exists()
    lock_output_dir(str(out), 0)  # (a run after it: a new file, locked)
    try:
        assert lock.exists()
        assert subprocess.run([sys.executable, "-c", LOCK_AND_WAIT.split("; print")[0], str(out)], cwd=ROOT).returncode
    finally:
        lock.unlink()  # (the path replaced by another run's file while this one held the old one)
        lock.write_text("another run's\n")
        unlock_output_dir(str(out))
    assert lock.read_text() == "another run's\n"
    lock.unlink()
    real_flock, removed = fcntl.flock, []

    def holder_removes_it_first(fd, operation):  # (the holder ends between this run's open and its flock)
        if not removed:
            removed.append(os.fstat(fd).st_ino)
            lock.unlink()
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", holder_removes_it_first)
    lock_output_dir(str(out), 0)
    try:
        held = os.fstat(output_dir._locks[os.path.realpath(out)])
        assert removed and (held.st_dev, held.st_ino) == (lock.stat().st_dev, lock.stat().st_ino)
        assert f"pid {os.getpid()}," in lock.read_text()
    finally:
        unlock_output_dir(str(out))
    assert not lock.exists()


def test_a_run_lock_that_is_a_dangling_link_is_named(tmp_path):
    """A .run.lock there that is a link to nothing (its target's directory gone) names the lock file, not the output
    directory."""
    from engine.output_dir import lock_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / ".run.lock").symlink_to(tmp_path / "gone" / "lock")
    with pytest.raises(InputError, match=f"^cannot write to its run lock {out}/.run.lock: No such file or directory$"):
        lock_output_dir(str(out), 0)


def _tiny_resume_rank(rank, world, init_file, out):
    import datetime

    import torch.distributed as dist

    from engine import resume
    from engine.errors import MissingInput
    from engine.train_ppo import prepare_tiny

    def unread(output_dir):
        raise MissingInput(f"--resume: {output_dir}/latest unread on this node")

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    if rank == 1:  # (its node's copy of the directory: `latest` naming a checkpoint that node lacks)
        resume.check_resumable = unread
    try:
        prepare_tiny(RunConfig(output_dir=out, resume=True))
        got = "ok"
    except Exception as e:
        got = f"{type(e).__name__}: {e}"
    with open(os.path.join(os.path.dirname(out), f"rank{rank}"), "w") as f:
        f.write(got)
    leave()


def test_the_tiny_defaults_resume_check_failing_on_one_rank_stops_every_rank_before_its_models_are_built(tmp_path):
    """prepare_tiny's resume check on two ranks, failing on rank 1 alone: rank 0, which reports for the run, names rank
    1's refusal at once, before it builds the tiny default's models, rather than going on alone to wait in its next
    collective for a peer that has stopped."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "out")
    mp.spawn(_tiny_resume_rank, args=(2, str(tmp_path / "init"), out), nprocs=2)
    refusal = f"--resume: {out}/latest unread on this node"
    reading = "reading the checkpoint to resume"
    assert (tmp_path / "rank0").read_text() == f"FailedOnAnotherRank: {reading} failed on rank 1: {refusal}"
    assert (tmp_path / "rank1").read_text() == f"MissingInput: {refusal}"
    assert not os.path.exists(os.path.join(out, "init"))


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # (@record's, under pytest's capture)
def test_another_ranks_fault_is_one_line_on_this_rank(tmp_path, monkeypatch, capsys):
    """A rank stopped by another rank's fault or system error (raise_together's copy, marked with the failing rank)
    reports it in one line, exit code 1, naming the rank that printed the traceback: its own traceback would show only
    where it heard of it. Its own fault, or TULU_TRACEBACK=1, keeps the traceback; a copy of a full disk says what to
    do, as the rank that met it."""
    import errno

    from engine import train_ppo

    monkeypatch.delenv("TULU_TRACEBACK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def copy(error, rank):
        error.failed_on = rank  # (as raise_together marks it on the ranks without an error)
        return error

    cases = (
        (copy(RuntimeError("saving failed on rank 3: 'a bug'"), 3), "saving failed on rank 3: 'a bug'"),
        (copy(OSError(errno.EIO, "loading failed on rank 1: Input/output error"), 1),
         "loading failed on rank 1: Input/output error"),
    )  # fmt: skip
    for made, said in cases:
        monkeypatch.setattr(train_ppo, "main", lambda *a, made=made, **k: (_ for _ in ()).throw(made))
        with pytest.raises(SystemExit) as e:
            train_ppo.cli([])
        line = f"train_ppo.py: error: {said} (rank {made.failed_on} printed its traceback)"
        assert e.value.code == 1 and capsys.readouterr().err == line + "\n"
        assert json.loads(error_file.read_text())["message"] == line  # (torchrun's summary: the same line)
    full = copy(OSError(errno.ENOSPC, "writing the evaluation failed on rank 0: No space left on device"), 0)
    monkeypatch.setattr(train_ppo, "main", lambda *a, **k: (_ for _ in ()).throw(full))
    with pytest.raises(SystemExit):
        train_ppo.cli([])
    assert capsys.readouterr().err.endswith("No space left on device: free space, then --resume continues exactly "
                                            "from the last checkpoint\n")  # fmt: skip
    monkeypatch.setenv("TULU_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="a bug"):
        monkeypatch.setattr(train_ppo, "main", lambda *a, **k: (_ for _ in ()).throw(cases[0][0]))
        train_ppo.cli([])
    monkeypatch.delenv("TULU_TRACEBACK")
    monkeypatch.setattr(train_ppo, "main", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("mine")))
    with pytest.raises(RuntimeError, match="mine"):  # (this rank's own fault: its traceback)
        train_ppo.cli([])


def _prepare_tiny_rank(rank, world, out, out_dir):
    import errno

    from engine import train_ppo

    init_gloo(rank, world, f"{out_dir}/init")
    real = train_ppo._demo_ran_in

    def demo_ran_in(output_dir, init_dir, moved=False):
        if rank == 1:  # (launches.jsonl unreadable on rank 1's node alone)
            raise PermissionError(errno.EACCES, "Permission denied", os.path.join(output_dir, "launches.jsonl"))
        return real(output_dir, init_dir, moved)

    train_ppo._demo_ran_in = demo_ran_in
    run = parse_args(["--output-dir", out])[1]
    got = outcome(train_ppo.prepare_tiny, run, done="prepared")
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


def test_prepare_tiny_raises_one_ranks_error_on_every_rank_at_once(tmp_path):
    """The tiny default's checks of its output directory on two ranks (gloo): an error reading it on rank 1 alone is
    raised on both at once, rank 0 naming it (rather than rank 0 waiting in start_fresh's collectives for the process
    group's timeout), before any model is built there."""
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    mp.spawn(_prepare_tiny_rank, args=(2, str(out), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    launches = out / "launches.jsonl"
    assert got == [
        [
            f"PermissionError: [Errno 13] preparing the tiny default failed on rank 1: Permission denied ({launches})",
            True,
        ],
        [f"PermissionError: [Errno 13] Permission denied: '{launches}'", True],
    ]
    assert not (out / "init").exists()


def _tiny_resume_of_another_run_rank(rank, world, out, out_dir, flags=()):

    from engine import train_ppo

    init_gloo(rank, world, f"{out_dir}/init")
    run = parse_args(["--output-dir", out, "--resume", *flags])[1]
    got = outcome(train_ppo.prepare_tiny, run, done="prepared")
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


def test_the_tiny_defaults_resume_of_another_run_is_refused_on_every_rank_at_once(tmp_path):
    """--resume without --policy on two ranks in an output directory holding another run (its metrics.jsonl, no
    launch of the tiny default): every rank reads it and refuses (rather than rank 1 going on alone to the next check
    and waiting there for the process group's timeout), before any model is built there."""
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    mp.spawn(_tiny_resume_of_another_run_rank, args=(2, str(out), str(tmp_path)), nprocs=2, join=True)
    refusal = f"OutputInUse: {out} holds a run of other models than the tiny default's"
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}").read_text())
        assert got[0].startswith(refusal) and got[1], got
    assert not (out / "init").exists()


def test_the_tiny_defaults_resume_with_another_seed_is_refused_on_every_rank_at_once(tmp_path):
    """--resume of the tiny default's run with another --seed than its models were built from, on two ranks: every
    rank refuses (rank 1 does not go on alone to rebuild init/ and wait in the next collective), and init/ keeps the
    models the run was trained from."""
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    run_tiny(out, "--max-iterations", "1", "--save-every", "1")
    policy = (out / "init" / "policy" / "model.safetensors").read_bytes()
    mp.spawn(_tiny_resume_of_another_run_rank, args=(2, str(out), str(tmp_path), ("--seed", "1")), nprocs=2, join=True)
    refusal = f"InvalidInput: --seed 1: the tiny default's run in {out} was built and trained with --seed 0"
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}").read_text())
        assert got[0].startswith(refusal) and got[1], got
    assert (out / "init" / "policy" / "model.safetensors").read_bytes() == policy


def test_a_misspelt_switch_is_named_and_help_is_printed_whatever_the_switches(monkeypatch, capsys):
    """A TULU_* name that is no switch (a typo: set to no effect) is named on stderr with the switch it is closest to,
    and the run goes on; a number of seconds that is none (TULU_SHARED_DIR_WAIT_S) is a usage error before anything
    runs, as the other kinds are; --help prints the help even beside a switch of no value of its kind."""
    import engine.train_ppo as train_ppo
    from kernels import dispatch

    for name in dispatch.SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TULU_GRAD_SUM", "0")
    monkeypatch.setenv("TULU_TEST_DEVICE", "cpu")  # (the tests' own: no switch of a command, not named)
    assert dispatch.check_switches() == ["TULU_GRAD_SUM is no switch of this engine (did you mean TULU_GRAD_SUMS?): "
                                         "ignored"]  # fmt: skip
    monkeypatch.setenv("TULU_SHARED_DIR_WAIT_S", "soon")
    assert train_ppo.cli(["--help"]) is None  # (argparse's exit 0, as torch's @record returns it)
    assert "usage: " in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        train_ppo.cli(["--max-iterations", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "train_ppo.py: error: TULU_SHARED_DIR_WAIT_S='soon': not a number of seconds >= 0 (unset a switch" in err, (
        err
    )
    monkeypatch.setenv("TULU_SHARED_DIR_WAIT_S", "2.5")
    assert dispatch.env_seconds("TULU_SHARED_DIR_WAIT_S", 60) == 2.5
    with pytest.raises(SystemExit) as e:
        train_ppo.cli(["--max-iterations", "1", "--kl-coef", "-1"])  # (a usage error after the switches' check)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "warning: TULU_GRAD_SUM is no switch of this engine (did you mean TULU_GRAD_SUMS?): ignored" in err, err


def test_switches_in_the_environment_are_values_of_their_kind(monkeypatch, capsys):
    """A TULU_* switch holding no value of its kind ("off" for 0, "256K", a typo of a word) ends the command in one
    line with exit code 2 naming each, before anything is loaded; read at import it takes the default meanwhile
    (a bare int() of it was a traceback at import, "off" was taken as on and "yes" as off)."""
    import engine.train_ppo as train_ppo
    from kernels import dispatch

    for name in dispatch.SWITCHES:
        monkeypatch.delenv(name, raising=False)
    dispatch.check_switches()
    monkeypatch.setenv("TULU_GRAD_SUMS", "off")
    monkeypatch.setenv("TULU_ASYNC_TP", "yes")
    monkeypatch.setenv("TULU_ONE_SHOT_BYTES", "256K")
    monkeypatch.setenv("TULU_PPO_ATTENTION", "sdpa")
    assert dispatch.env_switch("TULU_GRAD_SUMS", True) and not dispatch.env_switch("TULU_ASYNC_TP", False)
    assert dispatch.env_int("TULU_ONE_SHOT_BYTES", 7) == 7
    with pytest.raises(SystemExit) as e:
        train_ppo.cli(["--max-iterations", "1"])
    assert e.value.code == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [
        "train_ppo.py: error: TULU_GRAD_SUMS='off': not 0 or 1; TULU_ASYNC_TP='yes': not 0 or 1; "
        "TULU_ONE_SHOT_BYTES='256K': not an integer >= 0; TULU_PPO_ATTENTION='sdpa': not one of triton, flash "
        "(unset a switch for its default)"
    ], said
    for name, value, want in (("TULU_GRAD_SUMS", "0", False), ("TULU_ASYNC_TP", " 1 ", True)):
        monkeypatch.setenv(name, value)
        assert dispatch.env_switch(name, not want) is want
    monkeypatch.setenv("TULU_ONE_SHOT_BYTES", "10240")
    monkeypatch.setenv("TULU_PPO_ATTENTION", "flash")
    assert dispatch.env_int("TULU_ONE_SHOT_BYTES", 7) == 10240
    dispatch.check_switches()


def test_a_micro_batch_bound_below_one_sequence_is_said(capsys):
    """--micro-batch-tokens below --max-prompt-len + --max-new-tokens: a longer sequence runs as a micro-batch of its
    own (the memory plan counts it), which the run says once instead of exceeding the given bound unsaid."""
    from engine.preflight import check_generator_slots
    from engine.train_ppo import parse_args

    cfg, run, _ = parse_args(["--micro-batch-tokens", "100", "--max-prompt-len", "64", "--max-new-tokens", "48"])
    check_generator_slots(cfg, run)
    assert capsys.readouterr().out == (
        "warning: --micro-batch-tokens 100 is below one sequence's length (up to --max-prompt-len + --max-new-tokens "
        "= 112 tokens): a longer sequence is a micro-batch of its own\n"
    )
    cfg, run, _ = parse_args(["--micro-batch-tokens", "112", "--max-prompt-len", "64", "--max-new-tokens", "48"])
    check_generator_slots(cfg, run)
    assert capsys.readouterr().out == ""
