"""The rollout benchmark runs end to end on CPU and its figures are consistent (no timing asserted)."""

import json

import pytest

from kernels.dispatch import reference_ops


def test_rollout_bench_smoke(tmp_path):
    from bench.rollout_throughput import decode_roofline, main
    from engine.config import ModelConfig

    out = tmp_path / "r.json"
    with reference_ops():
        result = main(["--batch", "3", "--prompt-len", "5", "--gen-len", "4", "--repeats", "1", "--top-p", "0.9",
                       "--json", str(out)])  # fmt: skip
    # (standard JSON: a figure no CPU measures, the peak memory, is null, not NaN, which jq and browsers refuse)
    saved = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the bench's JSON"))
    assert saved["ours"]["tokens"] == 3 * 4 == saved["hf_generate"]["tokens"] and saved["top_p"] == 0.9
    assert result["ours"]["tok_s"] > 0
    # the decode steps' time apart from the prompts' forward (timed alone: a run of one new token)
    ours = saved["ours"]
    # (no timing compared: a loaded machine can time the prompts' run alone slower than the whole one, then 0)
    assert ours["prefill_seconds"] > 0 and ours["seconds"] > 0 and ours["decode_steps"] == 3
    decode_s = max(0.0, ours["seconds"] - ours["prefill_seconds"])
    assert ours["decode_step_ms"] == pytest.approx(decode_s / 3 * 1e3)
    # the roofline: 13B bf16 weights alone at 3.0 TB/s, batch 1 -> about 115 tok/s (RECIPE.md)
    roof = decode_roofline(ModelConfig.named("llama2-13b"), 1, 0, 0, 2, 3.0e12)
    assert 110 < roof["tok_s"] < 120
    # batch 64, 128 + 256 at 3.0 TB/s: 4,907 tok/s decoding (RESULTS.md); with the prefill's 8,192 tokens at
    # 720 TFLOP/s (0.29 s against 3.3 s of decoding) about 4,530 from the prompts to the last token
    roof = decode_roofline(ModelConfig.named("llama2-13b"), 64, 128, 256, 2, 3.0e12, flops=720e12)
    assert 4900 < roof["tok_s"] < 4915 and 280 < roof["prefill_ms"] < 300 and 4500 < roof["tok_s_e2e"] < 4560
    assert saved["roofline"]["tok_s_e2e"] > 0 and saved["matmul_tflops"] > 0


def test_rollout_bench_refuses_impossible_flags(tmp_path, capsys):
    """0 is not the default in disguise, impossible numbers are named, and a --json that is no file in an existing
    directory is refused before the run (not a traceback, or figures lost after it)."""
    from bench.rollout_throughput import parse_args

    for flags, message in (
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--gen-len", "0"], "--gen-len must be >= 1, got 0"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--json", str(tmp_path / "nodir" / "r.json")], "not a file in an existing directory"),
        (["--json", str(tmp_path)], "not a file in an existing directory"),  # (a directory: lost after the run)
        (["--block-size", "7"], "--block-size must be a power of two"),
        (["--top-p", "0"], "--top-p must be in (0, 1] (1: off), got 0.0"),
        (["--top-p", "nan"], "--top-p must be in (0, 1] (1: off), got nan"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
        (["--bandwidth", "0"], "--bandwidth must be a finite number > 0, got 0.0"),  # (0 fell back to the measured one)
        (["--bandwidth", "-1"], "--bandwidth must be a finite number > 0, got -1.0"),  # (negative rooflines)
        (["--tflops", "inf"], "--tflops must be a finite number > 0, got inf"),
        (["--stop-tokens", "-1"], "--stop-tokens must be >= 0 (0: none), got -1"),
        (["--decode-config", '{"block_n": 48}'], "block_n must be a power of two"),
        (["--decode-config", '{"tile": 64}'], "unknown decode launch parameter"),
        (["--decode-config", "block_n=64"], "--decode-config 'block_n=64'"),  # (not JSON)
        (["--decode-config", "[64]"], """expected a JSON object such as '{"linear": 1}', got '[64]'"""),
    ):
        with pytest.raises(SystemExit):
            parse_args(flags)
        assert message in capsys.readouterr().err
    assert parse_args(["--temperature", "0"]).temperature == 0  # (greedy)
    from kernels import paged_attention as pa

    assert parse_args(["--decode-config", '{"block_n": 64}']).decode_config == {"block_n": 64}
    assert pa._overrides == {}  # (parsing checks a launch; only main sets it, for the run)


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # (@record's, under pytest's capture)
def test_a_model_that_cannot_fit_is_refused_before_it_is_built(tmp_path, monkeypatch, capsys):
    """The 13B shape on a CPU by mistake (--device cpu: the host's memory, stubbed here, on any machine): refused
    in one line (exit code 2) before a byte is allocated, as are a --model that names nothing and a shape without
    --random-weights; the same for the PPO step bench."""
    import sys

    import bench.ppo_step as ppo_step
    import bench.rollout_throughput as rollout
    from bench.common import run_main
    from engine.errors import InvalidInput

    monkeypatch.setattr(rollout.Transformer, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr(ppo_step.Transformer, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr("engine.memory_plan.host_available", lambda: 20 * 2**30)
    with pytest.raises(InvalidInput, match=r"llama2-13b's bfloat16 weights need 24\.2 GiB, more than the 20\.0 GiB"):
        rollout.main(["--model", "llama2-13b", "--random-weights", "--no-hf", "--dtype", "bfloat16", "--device", "cpu"])
    with pytest.raises(InvalidInput, match=r"weights \(and transformers' copy\) need 48\.5 GiB"):
        rollout.main(["--model", "llama2-13b", "--random-weights", "--dtype", "bfloat16", "--device", "cpu"])
    with pytest.raises(InvalidInput, match=r"four models' float32 weights \(before any optimizer state\) need 192\.7"):
        ppo_step.main(["--model", "llama2-13b", "--random-weights", "--device", "cpu"])  # (the host's memory, stubbed)
    monkeypatch.setattr(sys, "argv", ["rollout_throughput.py"])
    for flags, message in (
        (["--model", str(tmp_path / "none")], f"--model {tmp_path / 'none'}: neither a shape (tiny, llama2-7b"),
        (["--model", "llama2-13b"], "--model llama2-13b is a shape: pass --random-weights"),
    ):
        with pytest.raises(SystemExit) as e:
            run_main(lambda flags=flags: rollout.main(flags))
        assert e.value.code == 2 and capsys.readouterr().err.startswith(f"rollout_throughput.py: error: {message}")


def test_ppo_step_bench_refuses_impossible_flags(capsys):
    """0 is not the default in disguise (--num-layers 0 and --gen-max-num-seqs 0 fell back to it silently), and a
    number that cannot run is named when parsed, not a traceback after four models are built (--iterations 0: an
    empty min(); --num-layers -2: an IndexError), nor a message about another flag (--tp 0, --iterations -1)."""
    from bench.ppo_step import parse_args

    for flags, message in (
        (["--iterations", "0"], "--iterations must be >= 1, got 0"),
        (["--iterations", "-1"], "--iterations must be >= 1, got -1"),
        (["--num-layers", "0"], "--num-layers must be >= 1, got 0"),
        (["--num-layers", "-2"], "--num-layers must be >= 1, got -2"),
        (["--gen-max-num-seqs", "0"], "--gen-max-num-seqs must be >= 1, got 0"),
        (["--tp", "0"], "--tp must be >= 1, got 0"),
        (["--prompt-len", "0"], "--prompt-len must be >= 1, got 0"),
        (["--rollout-batch-size", "0"], "--rollout-batch-size must be >= 1, got 0"),
    ):
        with pytest.raises(SystemExit) as e:
            parse_args(flags)
        assert e.value.code == 2 and message in capsys.readouterr().err, flags


def test_the_benches_refuse_a_device_or_dtype_they_cannot_run_when_parsed(capsys):
    """A device torch does not know, or a dtype that is none, was a traceback from inside (torch.device,
    getattr(torch, ...)); float16 training, which train_ppo.py refuses (no loss scaling), ran in ppo_step.py."""
    import bench.ppo_step as ppo_step
    import bench.rollout_throughput as rollout

    for parse, flags, message in (
        (ppo_step.parse_args, ["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (ppo_step.parse_args, ["--dtype", "bf16"], "dtype must be auto, bfloat16, float16 or float32, got 'bf16'"),
        (ppo_step.parse_args, ["--dtype", "float16"], "dtype float16 trains without loss scaling"),
        (rollout.parse_args, ["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ):
        with pytest.raises(SystemExit) as e:
            parse(flags)
        assert e.value.code == 2 and message in capsys.readouterr().err, flags


def test_ppo_step_bench_decodes_a_rollouts_samples_together(monkeypatch):
    """The generator's slots default to the rollout's sequences, its prompts x --samples-per-prompt ("all at once"),
    not its prompts: two samples per prompt were decoded in two waves, and more samples than prompts ended in a
    ValueError after the four models were built; slots fewer than a prompt's samples are refused before them."""
    import bench.ppo_step as ppo_step
    from engine.errors import InvalidInput

    class Built(Exception):
        pass

    def make_state(cfg, run, *args, **kw):
        raise Built(run.gen_max_num_seqs)

    monkeypatch.setattr(ppo_step, "make_state", make_state)
    for flags, slots in (
        (["--samples-per-prompt", "2"], 16),
        (["--samples-per-prompt", "16", "--train-batch-size", "8"], 128),
    ):
        with pytest.raises(Built) as e:
            ppo_step.main(["--device", "cpu", *flags])
        assert e.value.args == (slots,), flags
    monkeypatch.setattr(ppo_step.Transformer, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(InvalidInput, match="--samples-per-prompt 4 exceeds --gen-max-num-seqs 2: the samples of a"):
        ppo_step.main(["--device", "cpu", "--samples-per-prompt", "4", "--gen-max-num-seqs", "2"])


def test_rollout_bench_profiles_where_a_step_goes_and_keeps_its_settings(tmp_path, capsys):
    """--profile: one more run under torch.profiler (decoding eagerly, so every kernel is seen; the generator's
    CUDA graph setting restored after it) of --profile-tokens new tokens per prompt: the costliest ops per step with
    their shares in the JSON and printed, the Chrome trace written. --decode-config is in force for the run (and in
    the JSON), and set back afterwards."""
    from bench import rollout_throughput as rt
    from kernels import paged_attention as pa

    seen = []
    real = rt.profile_ours

    def spy(gen, *a, **kw):
        seen.append(dict(pa._overrides))
        gen.use_cuda_graphs, run = True, gen.generate_completions  # (as on a GPU)
        gen.generate_completions = lambda *a, **kw: seen.append(gen.use_cuda_graphs) or run(*a, **kw)
        out = real(gen, *a, **kw)
        seen.append(gen.use_cuda_graphs)
        gen.use_cuda_graphs = False
        return out

    out, trace = tmp_path / "r.json", tmp_path / "trace.json"
    flags = ["--batch", "3", "--prompt-len", "5", "--gen-len", "4", "--repeats", "1", "--no-hf", "--json", str(out)]
    flags += ["--profile", str(trace), "--profile-tokens", "2", "--decode-config", '{"block_n": 32, "num_warps": 8}']
    try:
        with reference_ops(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(rt, "profile_ours", spy)
            rt.main(flags)
        assert seen == [{"block_n": 32, "num_warps": 8}, False, True]  # (eager under the profiler, then restored)
    finally:
        pa.set_decode_config()
    saved = json.loads(out.read_text())
    prof = saved["ours"]["profile"]
    assert saved["decode_config"] == {"block_n": 32, "num_warps": 8}
    assert prof["steps"] == 2 and prof["by"] == "CPU op (self)" and len(prof["top"]) == 15  # (--profile-tokens 2)
    shares = [r["share"] for r in prof["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert json.loads(trace.read_text())["traceEvents"]
    printed = capsys.readouterr().out
    assert "ours profiled (one more run, eager, 2 steps" in printed and "paged decode launch overridden" in printed


def test_rollout_bench_under_tensor_parallelism_says_how_its_sums_run(tmp_path):
    """bench/rollout_throughput.py --tp 2 under torchrun (2 gloo processes, tiny model, the reference ops): the
    rollout runs on the sharded weights and the header and JSON say how the TP sums ran (the process group's: the
    symmetric-memory buffer is CUDA's, engine/symm_reduce.py)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TRITON_INTERPRET")}
    out = tmp_path / "tp2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(root, "bench/rollout_throughput.py"), "--tp", "2", "--batch", "3", "--prompt-len", "5",
           "--gen-len", "4", "--repeats", "1", "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "(tp 2)" in r.stdout and "TP sums: gloo" in r.stdout, r.stdout
    saved = json.loads(out.read_text())
    assert saved["tp"] == 2 and saved["tp_sums"] == "gloo" and saved["ours"]["tokens"] == 3 * 4
