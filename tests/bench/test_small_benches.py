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


def test_logprob_bench_checks_before_timing(tmp_path, monkeypatch):
    """The log-prob bench (tiny CPU shapes, the kernels in the interpreter) checks every timed path of ours, forward
    and backward, against the fp32 reference first; a wrong gradient stops it before any timing."""
    import pytest

    import bench.bench_logprob as B
    from kernels import reference

    rows = B.main(["--warmup", "1", "--rep", "1", "--skip-compile", "--json", str(tmp_path / "l.json")])
    assert {(r["op"], r["case"]) for r in rows if r["impl"] == "ours"} == {
        ("token_logprobs", c) for c in ("fwd", "fwd+ent", "fwd+bwd")
    }
    wrong = lambda h, w, t, return_entropy=False: reference.hidden_logprobs(h, w * 1.05, t, return_entropy=True)
    monkeypatch.setattr(B, "hidden_logprobs", wrong)
    with pytest.raises(SystemExit, match="hidden_logprobs .* differs from the reference"):
        B.main(["--warmup", "1", "--rep", "1", "--skip-compile"])


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


def test_offload_bench_smoke(tmp_path):
    """The offload bench's copies and Adam steps run (host to host on CPU), and its recipe figures follow the
    memory plan's bytes (the optimizer state at TP 8: 36.1 GiB per GPU each way)."""
    from bench.bench_offload import main

    out = main(["--reps", "1", "--json", str(tmp_path / "o.json")])
    assert all(rate > 0 for rate in out["copies_gb_s"].values()) and len(out["copies_gb_s"]) == 8
    assert set(out["adam_seconds"]) == {"state on the device (fused Adam)", "state in host memory (streamed)"}
    (rollouts,) = [r for r in out["recipe"] if r["tp"] == 8 and r["setting"] == "--offload-optimizer rollouts"]
    assert f"{rollouts['gb_out'] * 1e9 / 2**30:.1f}" == "36.1" and (tmp_path / "o.json").exists()


def test_the_oracles_the_benches_compile_trace_as_one_graph():
    """The torch.compile peer rows compile these reference oracles: a device sync inside (a range check, a length
    read from the device) would split each call into graphs with a host round trip between them, and understate
    the peer. Traced by dynamo (no backend compile), each is one graph."""
    import torch
    import torch._dynamo

    from kernels import reference

    x, t = torch.randn(6, 11), torch.randint(0, 11, (6,))
    h, w = torch.randn(6, 8), torch.randn(11, 8)
    q, kc, vc = torch.randn(2, 4, 16), torch.randn(5, 4, 2, 16), torch.randn(5, 4, 2, 16)
    bt, cl = torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 7])
    for fn, args, kw in (
        (reference.token_logprobs, (x, t), {"return_entropy": True}),
        (reference.hidden_logprobs, (h, w, t), {"return_entropy": True}),
        (reference.paged_decode_attention, (q, kc, vc, bt, cl), {"max_context_len": 7}),
    ):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args, **kw)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (fn.__name__, explained.break_reasons)
    out = reference.paged_decode_attention(q, kc, vc, bt, cl, max_context_len=7)
    torch.testing.assert_close(out, reference.paged_decode_attention(q, kc, vc, bt, cl))
