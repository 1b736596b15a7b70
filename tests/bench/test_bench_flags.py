"""bench/rollout_throughput.py's flags: what no run can honour is refused when parsed (one line naming the flag, exit
code 2), before a model is built, and what the run could not write is said, not claimed; all on CPU."""

import importlib
import json
import os
import sys

import pytest

from kernels.dispatch import reference_ops
from tests.bench.refusals import refused_line

TINY = ["--batch", "2", "--prompt-len", "4", "--gen-len", "4", "--repeats", "1", "--bandwidth", "1", "--tflops", "1"]


def _refused(parse, flags, capsys) -> str:
    """The one line rollout_throughput.py's parse(flags) exits with, code 2."""
    with pytest.MonkeyPatch.context() as mp:
        return refused_line("rollout_throughput", flags, mp, capsys, parse)


@pytest.fixture
def rollout(monkeypatch):
    import bench.rollout_throughput as rt

    monkeypatch.setattr(sys, "argv", ["rollout_throughput.py"])  # (the program name argparse's errors start with)
    return rt


def _unwritable(monkeypatch, *paths):
    """os.access saying 'not writable' of these paths (the tests run as root, whom chmod does not deny)."""
    real, denied = os.access, {os.path.abspath(p) for p in paths}
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) in denied else real(p, mode))


def test_a_profile_trace_no_run_could_write_is_refused_when_parsed(rollout, tmp_path, monkeypatch, capsys):
    """--profile was never checked: a missing directory ran the whole bench and said the trace was written (exit 0),
    an existing directory was replaced by the trace (or left <dir>.tmp beside it)."""
    missing = "/nonexistent/dir/t.json"
    line = _refused(rollout.parse_args, ["--no-hf", "--profile", missing], capsys)
    assert f"--profile {missing}: not a file in an existing directory (the trace would be lost" in line
    folder = tmp_path / "traces"
    folder.mkdir()
    line = _refused(rollout.parse_args, ["--profile", str(folder)], capsys)
    assert f"--profile {folder}: not a file in an existing directory" in line
    assert folder.is_dir() and list(tmp_path.iterdir()) == [folder]  # (nothing written, nothing replaced)
    _unwritable(monkeypatch, folder)
    line = _refused(rollout.parse_args, ["--profile", str(folder / "t.json")], capsys)
    assert f"--profile {folder / 't.json'}: the directory {folder} is not writable (the trace would be lost" in line
    assert rollout.parse_args(["--profile", str(tmp_path / "t.json")]).profile == str(tmp_path / "t.json")


@pytest.mark.parametrize("stale", [False, True], ids=["no file", "a stale trace there"])
def test_a_trace_the_profiler_did_not_write_is_said_after_the_figures_are_saved(rollout, tmp_path, monkeypatch, stale):
    """torch.profiler writes no trace without a word where it cannot (its export returns as if it had): the run
    checks the file is there, written anew (a trace left by an earlier run is not this one), and ends non-zero naming
    --profile, after its figures are printed and saved."""
    import torch.profiler

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", lambda self, path, **kw: None)
    trace, out = tmp_path / "t.json", tmp_path / "r.json"
    if stale:
        trace.write_text('{"traceEvents": []}')
    flags = [*TINY, "--no-hf", "--profile", str(trace), "--profile-tokens", "2", "--json", str(out)]
    with reference_ops(), pytest.raises(SystemExit) as e:
        rollout.main(flags)
    assert str(e.value) == f"--profile {trace}: torch.profiler wrote no trace there"
    saved = json.loads(out.read_text())
    assert saved["ours"]["tokens"] == 2 * 4 and "profile" not in saved["ours"]


@pytest.mark.parametrize("module", ["rollout_throughput", "bench_gae", "bench_offload", "activation_memory"])
def test_a_json_into_a_directory_or_file_that_is_not_writable_is_refused_when_parsed(
    module, tmp_path, monkeypatch, capsys
):
    """bench.common.check_flags: a --json in a directory that exists but cannot be written passed, the whole bench
    ran, then a PermissionError traceback lost its figures; the same for a read-only file there."""
    B = importlib.import_module(f"bench.{module}")
    parse = B.parse_args if hasattr(B, "parse_args") else B.main

    def refused(path, monkeypatch):
        return refused_line(module, ["--json", str(path)], monkeypatch, capsys, parse)

    path = tmp_path / "r.json"
    with pytest.MonkeyPatch.context() as mp:
        _unwritable(mp, tmp_path)
        err = refused(path, mp)
    assert err.startswith(f"{module}.py: error: --json {path}: the directory {tmp_path} is not writable"), err
    path.write_text("{}")
    _unwritable(monkeypatch, path)
    err = refused(path, monkeypatch)
    assert err.startswith(f"{module}.py: error: --json {path}: the file is not writable (the figures"), err


@pytest.mark.parametrize(
    "flags",
    [["--temp", "0"], ["--block", "32"], ["--random"], ["--stop", "3"], ["--hf"], ["--prof", "t.json"]],
    ids=lambda f: " ".join(f),
)
def test_an_abbreviated_flag_is_no_flag(rollout, flags, capsys):
    """argparse took a flag's prefix for the flag (--temp 0 for --temperature, --hf for --hf-static): a typo ran
    another setting than the one meant, unsaid."""
    assert f"unrecognized arguments: {' '.join(flags)}" in _refused(rollout.parse_args, flags, capsys)


def test_the_full_flags_still_parse(rollout, tmp_path):
    a = rollout.parse_args(["--temperature", "0", "--block-size", "32", "--random-weights", "--stop-tokens", "3"])
    assert (a.temperature, a.block_size, a.random_weights, a.stop_tokens) == (0, 32, True, 3)
    a = rollout.parse_args(["--hf-static", "--profile", str(tmp_path / "t.json"), "--profile-tokens", "4"])
    assert a.hf_static and a.profile_tokens == 4
    assert rollout.parse_args([]).profile_tokens is None  # (32 in the profiled run)


def test_flags_that_cannot_apply_together_are_refused_naming_both(rollout, tmp_path, capsys):
    """--random-weights with a checkpoint directory timed the checkpoint's weights; --hf-static with HF generate
    skipped (--no-hf, --stop-tokens, --tp) timed nothing; --profile-tokens without --profile profiled nothing."""
    for flags, message in (
        (["--model", str(tmp_path), "--random-weights"], f"--random-weights with --model {tmp_path}: random weights"),
        (["--no-hf", "--hf-static"], "--hf-static with --no-hf: HF generate does not run"),
        (["--stop-tokens", "2", "--hf-static"], "--hf-static with --stop-tokens 2: HF generate does not run"),
        (["--tp", "2", "--hf-static"], "--hf-static with --tp 2: HF generate does not run"),
        (["--profile-tokens", "8"], "--profile-tokens 8 without --profile"),
    ):
        assert message in _refused(rollout.parse_args, flags, capsys), flags
    assert rollout.parse_args(["--model", "llama2-7b", "--random-weights"]).random_weights


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch", "99999999999999999999999"], "--batch must be at most 4194304 (sequences), got 99999999999999999"),
        (["--batch", "100000000"], "--batch must be at most 4194304 (sequences), got 100000000"),
        (["--max-num-seqs", "5000000"], "--max-num-seqs must be at most 4194304 (sequences)"),
        (["--prompt-len", "5000000"], "--prompt-len must be at most 4194304 (tokens a sequence)"),
        (["--gen-len", "5000000"], "--gen-len must be at most 4194304 (tokens a sequence)"),
        (["--block-size", "2048"], "--block-size must be a power of two up to 1024 (the kernels tile by it)"),
    ],
)
def test_a_size_past_any_run_is_refused_when_parsed(rollout, flags, message, capsys):
    """--batch 99999999999999999999999 ended in torch's TypeError (an int64 overflow drawing the prompts)."""
    assert message in _refused(rollout.parse_args, flags, capsys)


def test_prompts_and_kv_cache_past_the_memory_are_refused_before_anything_is_allocated(rollout, monkeypatch):
    """--batch 4000000 --prompt-len 100000 ended in the allocator's RuntimeError drawing the prompts: the fits check
    counts them (and one sequence's KV cache) beside the weights, naming the flags, before the model is built."""
    from engine.errors import InvalidInput

    monkeypatch.setattr(rollout.Transformer, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr(rollout.torch, "randint", lambda *a, **k: pytest.fail("the prompts were drawn"))
    monkeypatch.setattr("engine.memory_plan.host_available", lambda: 20 * 2**30)
    flags = ["--batch", "4000000", "--prompt-len", "100000", "--no-hf", "--device", "cpu"]
    with pytest.raises(InvalidInput) as e:
        rollout.main(flags)
    assert str(e.value).startswith(
        "--model tiny's float32 weights, the KV cache of one sequence of --prompt-len 100000 + --gen-len 32 tokens "
        "(6252 blocks of --block-size 16) and --batch 4000000 prompts of --prompt-len 100000 tokens need 16391.3 GiB, "
        "more than the 20.0 GiB"
    ), e.value
    # one sequence's KV alone: the 13B shape's 4,000,000 tokens (0.8 MB each in bf16), not the weights' 24 GiB
    flags = ["--model", "llama2-13b", "--random-weights", "--dtype", "bfloat16", "--batch", "1", "--prompt-len", "8"]
    monkeypatch.setattr("engine.memory_plan.host_available", lambda: 30 * 2**30)
    with pytest.raises(InvalidInput, match=r"KV cache of one sequence of --prompt-len 8 \+ --gen-len 4000000 tokens"):
        rollout.main([*flags, "--gen-len", "4000000", "--no-hf", "--device", "cpu"])


def test_a_length_the_model_or_its_kv_cache_cannot_hold_names_the_flags(rollout, tmp_path):
    """--gen-len past a checkpoint's max_position_embeddings, and a sequence longer than the generator's KV cache
    holds, spoke of max_model_len and KV blocks: they name --prompt-len, --gen-len and --block-size."""
    from engine.config import ModelConfig
    from engine.errors import InvalidInput

    cfg = ModelConfig.named("tiny").to_hf()
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 64}))
    with pytest.raises(InvalidInput) as e:
        rollout.main(["--model", str(tmp_path), "--prompt-len", "32", "--gen-len", "40", "--no-hf", "--device", "cpu"])
    assert str(e.value) == (
        f"--prompt-len 32 + --gen-len 40 = 72 tokens a sequence exceeds --model {tmp_path}'s max_position_embeddings "
        "64 (its config.json)"
    )
    # the CPU's cache: 256 MiB, 524,288 of the tiny model's fp32 tokens
    flags = [*TINY, "--no-hf", "--device", "cpu", "--batch", "1", "--gen-len", "600000"]
    for block in ("16", "1024"):
        with reference_ops(), pytest.raises(InvalidInput) as e:
            rollout.main([*flags, "--block-size", block])
        blocks = -(-600004 // int(block))
        assert str(e.value).startswith(
            f"--prompt-len 4 + --gen-len 600000 = 600004 tokens a sequence ({blocks} KV blocks of --block-size "
            f"{block}) do not fit the generator's KV cache"
        ), e.value
