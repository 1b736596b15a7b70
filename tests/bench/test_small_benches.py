"""The small kernel benchmarks (RMSNorm / SwiGLU, sampling) run end to end on CPU (tiny shapes, no timing)."""


def test_norm_act_bench_smoke(tmp_path):
    from bench.bench_rmsnorm_swiglu import main

    rows = main(["--json", str(tmp_path / "n.json")])
    impls = {(r["op"].split()[0], r["impl"]) for r in rows if "error" not in r}
    assert {("RMSNorm", "ours"), ("RMSNorm", "eager (HF)"), ("SwiGLU", "ours"), ("SwiGLU", "eager (HF)")} <= impls
    assert (tmp_path / "n.json").exists()


def test_sampling_bench_smoke(tmp_path):
    from bench.bench_sampling import main

    rows = main(["--json", str(tmp_path / "s.json")])
    assert {r["impl"] for r in rows if "error" not in r} >= {"ours (one pass)", "eager (reference)"}


def test_ppo_step_bench_smoke(tmp_path):
    """One timed PPO iteration of the tiny models (reference ops), with fewer generator slots than prompts."""
    from bench.ppo_step import main
    from kernels.dispatch import reference_ops

    with reference_ops():
        out = main(["--gen-max-num-seqs", "3", "--no-ignore-eos", "--json", str(tmp_path / "p.json")])
    assert set(out["phases"]) == {"generate", "score (4 forwards)", "train (policy + value, fwd + bwd)", "iteration"}
    assert out["generator"]["decode_steps"] > 0 and (tmp_path / "p.json").exists()


def test_activation_memory_bench_smoke(tmp_path):
    """The activation-memory count runs (tiny shape, one process); its micro-batch totals follow its per-token
    figures."""
    from bench.activation_memory import main

    (row,) = main(["--micro-batch-tokens", "100", "--json", str(tmp_path / "a.json")])
    assert row["layer_bytes_per_token"] > row["checkpoint_bytes_per_token"] > 0
    assert row["micro_batch_keep_all_gib"] == 100 * 2 * row["layer_bytes_per_token"] / 2**30
