"""The small kernel benchmarks (RMSNorm / SwiGLU, sampling) run end to end on CPU (tiny shapes, no timing)."""

import math

import pytest


def test_norm_act_bench_smoke(tmp_path):
    from bench.bench_rmsnorm_swiglu import main

    rows = main(["--bandwidth", "2", "--json", str(tmp_path / "n.json")])
    impls = {(r["op"].split()[0], r["impl"]) for r in rows if "error" not in r}
    assert {("RMSNorm", "ours"), ("RMSNorm", "eager (HF)"), ("SwiGLU", "ours"), ("SwiGLU", "eager (HF)")} <= impls
    assert (tmp_path / "n.json").exists()
    # the floors: the bytes each op must move (fp32, 64 tokens, hidden 256, intermediate 512) at 2 TB/s, in ms
    floor_rows = [r for r in rows if r["impl"] == "floor (2.0 TB/s)"]
    floors = {(r["op"].split()[0], k): r[k] for r in floor_rows for k in ("fwd_ms", "fwdbwd_ms")}
    th, ti = 64 * 256 * 4, 64 * 512 * 4
    assert floors == pytest.approx({
        ("RMSNorm", "fwd_ms"): 2 * th / 2e9, ("RMSNorm", "fwdbwd_ms"): 5 * th / 2e9,
        ("Add+RMSNorm", "fwd_ms"): 4 * th / 2e9, ("Add+RMSNorm", "fwdbwd_ms"): 8 * th / 2e9,
        ("SwiGLU", "fwd_ms"): 3 * ti / 2e9, ("SwiGLU", "fwdbwd_ms"): 8 * ti / 2e9,
    })  # fmt: skip


def test_sampling_bench_smoke(tmp_path):
    from bench.bench_sampling import main

    rows = main(["--bandwidth", "2", "--json", str(tmp_path / "s.json")])
    assert {r["impl"] for r in rows if "error" not in r} >= {"ours (one pass)", "eager (reference)", "ours top-50",
                                                             "ours top-p 0.9", "HF top-p 0.9",
                                                             "TP 2 shard top-p 0.9 floor: ours"}  # fmt: skip
    (floor,) = [r for r in rows if r["impl"].startswith("floor")]
    assert floor["ms"] == pytest.approx(4 * 1000 * 4 / 2e12 * 1e3)  # 4 x 1000 fp32 logits read once at 2 TB/s


def test_logprob_bench_checks_before_timing(tmp_path, monkeypatch):
    """The log-prob bench (tiny CPU shapes, the kernels in the interpreter) checks every timed path of ours, forward
    and backward, against the fp32 reference first; a wrong gradient stops it before any timing."""
    import pytest

    import bench.bench_logprob as B
    from kernels import reference

    flags = ["--warmup", "1", "--rep", "1", "--skip-compile", "--bandwidth", "2", "--tflops", "3"]
    rows = B.main(flags + ["--json", str(tmp_path / "l.json")])
    assert {(r["op"], r["case"]) for r in rows if r["impl"] == "ours"} == {
        ("token_logprobs", c) for c in ("fwd", "fwd+ent", "fwd+bwd")
    }
    # the floors (CPU: 64 x 1000 fp32 logits; hidden 32 x 64 x 1000): the logits read (twice and the gradient
    # written, backward) and 12/16/24 bytes a row at 2 TB/s; 2 x rows x hidden x vocab FLOPs a GEMM at 3 TFLOP/s
    floors = {(r["op"], r["impl"], r["case"]): r["ms"] for r in rows if r["impl"].startswith("floor")}
    logits = 64 * 1000 * 4
    assert floors == pytest.approx({
        ("token_logprobs", "floor", "fwd"): (logits + 64 * 12) / 2e9,
        ("token_logprobs", "floor", "fwd+ent"): (logits + 64 * 16) / 2e9,
        ("token_logprobs", "floor", "fwd+bwd"): (3 * logits + 64 * 24) / 2e9,
        ("hidden_logprobs", "floor (3 GEMMs)", "fwd+bwd"): 3 * 2 * 32 * 64 * 1000 / 3e9,
        ("hidden_logprobs", "floor (4 GEMMs)", "fwd+bwd"): 4 * 2 * 32 * 64 * 1000 / 3e9,
    })  # fmt: skip
    (into,) = [r for r in rows if r["impl"].startswith("ours ppo_token_loss(hidden), LM head grad into an fp32 sum")]
    assert into["ms"] > 0 and "fp32-out GEMM: no" in into["impl"]  # (none on the CPU)
    real_loss = B.ppo_token_loss

    def sum_5_percent_off(*args, weight_grad_into=None, **kw):
        out = real_loss(*args, weight_grad_into=weight_grad_into, **kw)
        if weight_grad_into is not None:
            weight_grad_into.mul_(1.05)
        return out

    # (the checks below are the hidden path's: the token ops' checks and timings, passed above, are left out)
    monkeypatch.setattr(B, "bench_token", lambda *a: None)
    monkeypatch.setattr(B, "ppo_token_loss", sum_5_percent_off)
    with pytest.raises(SystemExit, match="weight_grad_into.* differs from the reference"):
        B.main(flags)
    monkeypatch.setattr(B, "ppo_token_loss", real_loss)
    wrong = lambda h, w, t, return_entropy=False: reference.hidden_logprobs(h, w * 1.05, t, return_entropy=True)
    monkeypatch.setattr(B, "hidden_logprobs", wrong)
    with pytest.raises(SystemExit, match="hidden_logprobs .* differs from the reference"):
        B.main(["--warmup", "1", "--rep", "1", "--skip-compile"])


def test_logprob_bench_stops_on_a_wrong_backward_or_a_wrong_ppo_loss_of_ours(monkeypatch):
    """The checks before timing compare ours, not the reference, with the fp32 reference: token_logprobs' gradient 5%
    off (its outputs right) stops the bench; so does the fused PPO loss 5% of its terms' size off (its gradients
    right), however close to 0 the loss itself is."""
    import torch

    import bench.bench_logprob as B
    from kernels import reference

    class GradTimes(torch.autograd.Function):  # the identity, its gradient 1.05 x: right outputs, a wrong backward
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.05

    flags = ["--warmup", "1", "--rep", "1", "--skip-compile", "--bandwidth", "2", "--tflops", "3"]
    monkeypatch.setattr(B, "measure", lambda fn, device, **kw: (1.0, 0.0))
    wrong_grad = lambda x, t, return_entropy=False: reference.token_logprobs(
        GradTimes.apply(x), t, return_entropy=return_entropy
    )
    with monkeypatch.context() as m:
        m.setattr(B, "token_logprobs", wrong_grad)
        with pytest.raises(SystemExit, match="token_logprobs backward .* differs from the reference"):
            B.main(flags)

    def loss_off(logits, targets, old, adv, mask, **kw):
        loss, *rest = reference.ppo_token_loss(logits, targets, old, adv, mask, **kw)
        return (loss + 0.05 * adv.abs().mean(), *rest)

    monkeypatch.setattr(B, "ppo_token_loss", loss_off)
    monkeypatch.setattr(B, "bench_token", lambda *a: None)  # (this check is the hidden path's: the token part left out)
    with pytest.raises(SystemExit, match=r"ppo_token_loss\(hidden\) .* differs from the reference"):
        B.main(flags)


def test_logprob_bench_times_each_case_of_ours_as_named(monkeypatch):
    """ours' rows time what they are named: fwd the log-probs alone, fwd+ent with the entropy, fwd+bwd with the entropy
    and the backward (a leaf that requires grad)."""
    import bench.bench_logprob as B
    from kernels import reference

    calls, timed = [], []

    def ours(x, t, return_entropy=False):
        calls.append((return_entropy, x.requires_grad))
        return reference.token_logprobs(x, t, return_entropy=return_entropy)

    def measure(fn, device, **kw):
        done = len(calls)
        fn()
        timed.append(calls[done:])
        return 1.0, 0.0

    monkeypatch.setattr(B, "token_logprobs", ours)
    monkeypatch.setattr(B, "measure", measure)
    rows = B.main(["--skip-compile", "--skip-hidden", "--bandwidth", "2"])
    assert [r["case"] for r in rows if r["impl"] == "ours"] == ["fwd", "fwd+ent", "fwd+bwd"]
    assert timed[:3] == [[(False, False)], [(True, False)], [(True, True)]]


def test_ppo_step_bench_smoke(tmp_path):
    """Timed PPO iterations of the tiny models (reference ops), with fewer generator slots than sequences, two samples
    per prompt and two PPO epochs."""
    from bench.ppo_step import main
    from kernels.dispatch import reference_ops

    flags = ["--gen-max-num-seqs", "3", "--no-ignore-eos", "--iterations", "2", "--json", str(tmp_path / "p.json"),
             "--samples-per-prompt", "2", "--ppo-epochs", "2"]  # fmt: skip
    with reference_ops():
        out = main(flags)
    assert set(out["phases"]) == {"generate", "score (4 forwards)", "train (policy + value, fwd + bwd)", "iteration"}
    assert out["generator"]["decode_steps"] > 0 and (tmp_path / "p.json").exists()
    # the fastest timed iteration's figures: generation counts the new tokens only (8 prompts x 2 samples, their mean
    # response length), the scoring passes and the iteration the prompts' 24 tokens too, training them twice (epochs)
    import json

    best = min(json.loads((tmp_path / "p.json").read_text())["metrics"], key=lambda m: m["time_iteration"])
    assert best["step"] in (2 * 8, 3 * 8)  # (after the warm-up: 2 epochs of 16 sequences, 4 a step, per iteration)
    # each phase's model TFLOP/s per GPU is the trainer's own metric of that phase
    new = 16 * best["response_len"]
    for name, seconds, tokens, tflops in (
        ("generate", best["time_generate"], new, best["gen_tflops_gpu"]),
        ("score (4 forwards)", best["time_score"], new + 16 * 24, best["score_tflops_gpu"]),
        ("train (policy + value, fwd + bwd)", best["time_train"], 2 * (new + 16 * 24), best["train_tflops_gpu"]),
        ("iteration", best["time_iteration"], new + 16 * 24, None),
    ):
        phase = out["phases"][name]
        assert (phase["seconds"], phase["tokens"], phase["tflops_per_gpu"]) == (seconds, pytest.approx(tokens), tflops)
        assert phase["tok_s"] == pytest.approx(tokens / seconds)
    assert len({best["gen_tflops_gpu"], best["score_tflops_gpu"], best["train_tflops_gpu"]}) == 3
    # the peers' iteration after ours (bench/peer_ppo.py on transformers' models): every phase timed, the same
    # sequences (8 prompts x 2 samples, full length), losses and grad norms finite; saved beside ours
    peer = out["peer"]
    assert set(peer["seconds"]) == {"generate", "score", "train", "iteration"} and peer["response_tokens"] == 16 * 16
    assert all(math.isfinite(peer[k]) and peer[k] > 0 for k in ("value_loss", "grad_norm_policy", "grad_norm_value"))
    assert json.loads((tmp_path / "p.json").read_text())["peer"] == peer


def test_ppo_step_bench_times_a_checkpoint_both_ways(tmp_path, capsys):
    """--save-to: the timed state checkpointed before the run goes on and then in the background; each one's figures
    (the run's wait, the thread's write time, the bytes, the disk's rate for as many) printed and saved, the directory
    left as it was found but for them."""
    import json

    from bench.ppo_step import main
    from kernels.dispatch import reference_ops

    (tmp_path / "saves").mkdir()
    (tmp_path / "saves" / "kept.txt").write_text("x")
    with reference_ops():
        out = main(["--no-peer", "--save-to", str(tmp_path / "saves"), "--json", str(tmp_path / "p.json")])
    save = out["save"]
    timed = ("sync_s", "background_stall_s", "background_written_s", "disk_s", "overlapped_iteration_s", "iteration_s")
    assert save["bytes"] > 0 and all(save[k] > 0 for k in timed)
    assert json.loads((tmp_path / "p.json").read_text())["save"] == save
    assert [p.name for p in (tmp_path / "saves").iterdir()] == ["kept.txt"]
    printed = capsys.readouterr().out
    assert "in the background (the default)" in printed and "one process writing as many bytes" in printed
    assert "the iteration it was written beside" in printed


def test_ppo_step_bench_stopped_midway_keeps_its_timed_iterations(tmp_path, monkeypatch, capsys):
    """Each iteration is printed and saved as it ends: the GPU suite's cap stopping the bench in its second timed
    iteration leaves the first's figures in the JSON and the log."""
    import json

    import bench.ppo_step as ppo_step
    from kernels.dispatch import reference_ops

    real, calls = ppo_step.ppo_iteration, []

    def iteration(state):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # (as the cap's SIGTERM would stop it)
        return real(state)

    monkeypatch.setattr(ppo_step, "ppo_iteration", iteration)
    with reference_ops(), pytest.raises(KeyboardInterrupt):
        ppo_step.main(["--iterations", "2", "--json", str(tmp_path / "p.json")])
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["partial"] and [m["iteration"] for m in saved["metrics"]] == [2]
    out = capsys.readouterr().out
    assert "iteration 0 (warm-up): " in out and "iteration 1 (timed): " in out


def test_activation_memory_bench_smoke(tmp_path):
    """The activation-memory count runs (tiny shape, one process); its micro-batch totals follow its per-token
    figures."""
    from bench.activation_memory import main

    (row,) = main(["--micro-batch-tokens", "100", "--json", str(tmp_path / "a.json")])
    assert row["layer_bytes_per_token"] > row["checkpoint_bytes_per_token"] > 0
    assert row["micro_batch_keep_all_gib"] == 100 * 2 * row["layer_bytes_per_token"] / 2**30
    # the MLPs' activations recomputed: the activation (intermediate_size bf16 values a token) not kept
    from engine.config import ModelConfig

    width = ModelConfig.named("tiny").intermediate_size
    assert row["layer_bytes_per_token"] - row["layer_bytes_per_token_mlp_recompute"] == 2 * width


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


def test_paged_bench_refuses_an_unknown_shape(capsys):
    """A misspelt --shapes name is refused with the known names (it left nothing to time: an empty table, exit 0)."""
    from bench.bench_paged_attention import main

    with pytest.raises(SystemExit) as e:
        main(["--shapes", "13b-b64-c384", "13b-b64-c38", "--bandwidth-tbs", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--shapes 13b-b64-c38: no such shape (known: 13b-b64-c384," in err
    # the GPU suite's sweeps name shapes that exist
    import os
    import re

    suite = open(os.path.join(os.path.dirname(__file__), "..", "..", "bench", "run_gpu_suite.sh")).read()
    from bench.bench_paged_attention import SHAPES

    (names,) = re.findall(r'^sweep_shapes="([^"]*)"', suite, re.M)
    assert names.split() and set(names.split()) <= set(SHAPES)


@pytest.mark.parametrize(
    "module, flags",
    [
        ("bench_rope_attention", ["--peak-tflops", "1", "--warmup", "1", "--rep", "1"]),
        ("bench_logprob", ["--skip-compile", "--skip-hidden", "--bandwidth", "2", "--warmup", "1", "--rep", "1"]),
        ("bench_rmsnorm_swiglu", ["--bandwidth", "2"]),
        ("bench_sampling", ["--bandwidth", "2"]),
    ],
)
def test_a_bench_whose_own_kernel_fails_when_timed_exits_non_zero(module, flags, tmp_path, monkeypatch, capsys):
    """Ours raising where it is timed (its first measurement here) is reported like a peer's failure, the other
    figures still printed and saved, and then the bench exits non-zero naming it: the exit code is all that
    bench/run_gpu_suite.sh's summary keeps of a step, and a broken kernel read "exit 0" there."""
    import importlib
    import json
    import sys

    import bench.common

    B = importlib.import_module(f"bench.{module}")
    measure, calls = bench.common.measure, []

    def failing_first(fn, device, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("illegal memory access (stub)")
        return measure(fn, device, **kw)

    monkeypatch.setattr(B, "measure", failing_first)
    out = tmp_path / "b.json"
    monkeypatch.setattr(sys, "argv", [f"{module}.py", *flags, "--json", str(out)])
    with pytest.raises(SystemExit) as e:
        B.main()
    assert "ours" in str(e.value.code) and "illegal memory access (stub)" in str(e.value.code), e.value.code
    assert len(calls) > 2 and "illegal memory access (stub)" in capsys.readouterr().out  # the rest was timed
    rows = json.loads(out.read_text())["rows"]
    assert any("ms" in r or "fwd_ms" in r for r in rows)  # the others' figures are saved


@pytest.mark.parametrize("module", ["bench_rmsnorm_swiglu", "bench_sampling"])
def test_a_bench_stopped_midway_keeps_what_it_measured(module, tmp_path, monkeypatch, capsys):
    """The GPU suite stops a step at its cap (the torch.compile rows' cold compiles can outlast it): each row is
    printed and saved as it is measured (these two printed and saved nothing before the very end)."""
    import importlib
    import json

    B = importlib.import_module(f"bench.{module}")
    calls = []

    def measure_then_stop(fn, device, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt  # (the cap's signal, as far as this process gets)
        return 1.5, 0.0

    monkeypatch.setattr(B, "measure", measure_then_stop)
    out = tmp_path / "b.json"
    with pytest.raises(KeyboardInterrupt):
        B.main(["--bandwidth", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 1 and all(r.get("ms", r.get("fwd_ms")) == 1.5 for r in rows)
    printed = [line for line in capsys.readouterr().out.splitlines() if "1.5000" in line or "1.500 " in line]
    assert len(printed) == len(rows)


def test_rope_bench_keeps_the_gqa_group_on_cpu_and_refuses_an_impossible_one(tmp_path, monkeypatch, capsys):
    """--heads 32 --kv-heads 8 on a CPU: the tiny run keeps the group of 4 (it kept --kv-heads 8 beside its 4 query
    heads: every row failed); a --kv-heads that does not divide --heads is refused up front, in one line."""
    import json
    import sys

    import bench.bench_rope_attention as B

    out = tmp_path / "r.json"
    flags = ["--heads", "32", "--kv-heads", "8", "--peak-tflops", "1", "--warmup", "1", "--rep", "1"]
    monkeypatch.setattr(sys, "argv", ["bench_rope_attention.py", *flags, "--json", str(out)])
    B.main()
    rows = json.loads(out.read_text())["rows"]
    assert rows and not [r for r in rows if "error" in r] and rows[0]["case"].startswith("B2 H8/2 ")
    monkeypatch.setattr(sys, "argv", ["bench_rope_attention.py", "--heads", "32", "--kv-heads", "6"])
    with pytest.raises(SystemExit) as e:
        B.main()
    assert e.value.code == 2 and "--heads 32 is not a multiple of --kv-heads 6" in capsys.readouterr().err


def test_paged_bench_graph_rows_rotate_inputs_and_print(monkeypatch, capsys):
    """The graph-timed rows (bench.common.graph_ms needs CUDA: a stand-in here calls each fn and returns a time):
    ours, SDPA, the rope write and the fused step each timed over input sets that hold different data (4x the L2 in
    all, at most 64: 64 of a KV of 1 kB, 13 of 20 MiB), and the table prints ours_graph and sdpa_graph columns
    beside the per-call ones."""
    import torch

    import bench.bench_paged_attention as bp
    import bench.common

    calls = []

    def fake_graph_ms(fns, reps=20):
        calls.append([fn() for fn in fns])
        return 0.5

    monkeypatch.setattr(bp, "graph_ms", fake_graph_ms)
    shape = (2, 40, 4, 2, 16, 16)
    first = bp._make(*shape, torch.float32, torch.device("cpu"))
    row, kv_bytes = {"shape": "t", "kv_bytes": 1000, "floor_ms": 1.0}, 1000
    bp._graph_rows(row, first, shape, torch.float32, None, {}, kv_bytes)
    assert row["ours_graph_ms"] == row["sdpa_graph_ms"] == row["rope_write_graph_ms"] == row["fused_graph_ms"] == 0.5
    assert row["ours_graph_gbs"] == kv_bytes / 0.5e-3 / 1e9
    ours, sdpa, writes, fused = calls
    assert len(ours) == len(sdpa) == len(writes) == len(fused) == 64
    assert not torch.equal(ours[0], ours[1])  # (another set's data, not the first's again)
    bp._graph_rows(dict(row), first, shape, torch.float32, None, {}, 20 * 2**20)
    assert len(calls[4]) == -(-4 * bench.common.L2_BYTES // (20 * 2**20)) == 13
    torch.testing.assert_close(sdpa[3].reshape(ours[3].shape), ours[3], atol=1e-5, rtol=1e-5)  # (the same set)
    bp._print([row], 1.0)
    head = capsys.readouterr().out.splitlines()[0]
    assert "ours_graph ms" in head and "sdpa_graph ms" in head and "graph" in head.split("rope_write ms")[1]
    assert "graph" in head.split("fused ms")[1]  # the fused decode step's per-call and graph columns


def test_paged_sweep_times_variants_as_graph_replays_on_a_gpu(monkeypatch):
    """The sweep ranks launch variants by their CUDA graph replay time on a GPU (no host overhead in it), every input
    set's call in the graph, per call (the first set's) elsewhere."""
    import torch

    import bench.bench_paged_attention as bp

    graphed, timed = [], []
    monkeypatch.setattr(bp, "graph_ms", lambda fns, reps=20: graphed.append(list(fns)) or 0.25)
    monkeypatch.setattr(bp, "measure", lambda fn, device, **kw: timed.append(fn) or (3.0, float("nan")))
    fns = [lambda: 1, lambda: 2, lambda: 3]
    assert bp._kernel_ms(fns, torch.device("cuda")) == 0.25 and graphed == [fns]
    assert bp._kernel_ms(fns, torch.device("cpu")) == 3.0 and timed == [fns[0]]


def test_decode_linear_bench_smoke(tmp_path, monkeypatch):
    """bench_decode_linear on CPU (the kernel in the interpreter): every projection checked against cuBLAS's stand-in
    and timed, the sweep's variants too; the shards it times under --tp are the engine's."""
    import bench.bench_decode_linear as B
    from bench.bench_decode_linear import _SWEEP_SPLITS, _SWEEP_TILES, main, projections
    from engine.config import ModelConfig

    ahead = []  # (a sweep's variants handed to dispatch.compile_ahead before any is timed; a no-op here; none unswept)
    monkeypatch.setattr(B, "compile_ahead", lambda fns: ahead.append(len(fns)))

    rows = main(["--bandwidth", "2", "--json", str(tmp_path / "l.json")])
    assert {r["proj"] for r in rows} == {"qkv", "qkv+rope", "o", "gate_up+swiglu", "gate_up+norm", "down", "lm_head"}
    assert all(r["rel_err"] < 1e-4 and r["ours_ms"] > 0 and r["cublas_ms"] > 0 for r in rows)
    (down,) = [r for r in rows if r["proj"] == "down" and r["rows"] == 4]
    assert down["floor_ms"] == pytest.approx((64 * 176 + 4 * 176 + 4 * 64) * 4 / 2e9)  # tiny: hidden 64, MLP 176
    swept = main(["--bandwidth", "2", "--proj", "o", "--sweep"])  # (rows 1 and 4 on CPU)
    assert len(swept) == 2 * (1 + len(_SWEEP_TILES) + len(_SWEEP_SPLITS)) and all("ours_ms" in r for r in swept)
    assert ahead == [1 + len(_SWEEP_TILES) + len(_SWEEP_SPLITS)] * 2  # (rows 1 and 4: the default and each variant)
    shards = projections(ModelConfig.named("llama2-13b"), 2)
    assert shards == {"qkv": (7680, 5120, "plain"), "qkv+rope": (7680, 5120, "rope"), "o": (5120, 2560, "plain"),
                      "gate_up+swiglu": (13824, 5120, "swiglu"), "gate_up+norm": (13824, 5120, "norm_swiglu"),
                      "down": (5120, 6912, "plain"), "lm_head": (16000, 5120, "plain")}  # fmt: skip
    assert (tmp_path / "l.json").exists()


def test_grad_sums_bench_prints_ours_the_reference_and_the_floor_per_projection(tmp_path):
    """bench/bench_grad_sums.py on the CPU (tiny shapes): each model's four projections with ours, the reference and
    the GEMM's floor, and the whole model's per micro-batch as the layer's sum times its layers; both within bf16's
    rounding of float64 (the check before timing)."""
    import json

    import bench.bench_grad_sums as B

    rows = B.main(
        ["--tokens", "32", "--tflops", "2", "--model", "llama2-13b:8", "tiny", "--json", str(tmp_path / "g.json")]
    )
    assert json.loads((tmp_path / "g.json").read_text())["meta"]["fp32_out_gemm"] is False
    for model, tp, layers in (("llama2-13b", 8, 40), ("tiny", 1, 2)):
        mine = [r for r in rows if r["model"] == model and r["tp"] == tp]
        per_proj = [r for r in mine if not r["proj"].startswith("all")]
        assert {r["proj"] for r in per_proj} == {"qkv", "o", "gate_up", "down"}
        assert sorted(r["impl"] for r in per_proj) == sorted(["ours", "reference", "floor"] * 4)
        for impl in ("ours", "reference", "floor"):
            (total,) = [r for r in mine if r["proj"] == f"all {layers} layers" and r["impl"] == impl]
            assert total["ms"] == pytest.approx(layers * sum(r["ms"] for r in per_proj if r["impl"] == impl))
        assert all(r["err"] < 2e-2 for r in per_proj if r["impl"] != "floor")
    floor = [r for r in rows if r["model"] == "llama2-13b" and r["proj"] == "qkv" and r["impl"] == "floor"][0]
    assert floor["shape"] == "30x80" and floor["ms"] == pytest.approx(2 * 32 * 30 * 80 / 2e12 * 1e3)


def test_the_overlaps_ab_trains_the_same_bits_with_all_of_them_off(tmp_path, capsys, monkeypatch):
    """bench/train_overlaps.py on 4 gloo processes (TP 2 x DP 2, tiny models, the distributed optimizer): the PPO
    iteration with every training overlap on and with all three off (TULU_OVERLAP_GRAD_REDUCE, _PARAM_GATHER,
    TULU_SP_OVERLAP = 0) trains to the same losses, grad norms, KL and score, to the bit; both rows printed."""
    import json

    from bench.train_overlaps import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (the ranks run the CPU reference ops)
    rows = main(["--settings", "default,none", "--json", str(tmp_path / "o.json"), "--", "--iterations", "1"])
    assert [r["setting"] for r in rows] == ["all on (the default)", "all three in series"]
    assert rows[1]["env"] == {"TULU_OVERLAP_GRAD_REDUCE": "0", "TULU_OVERLAP_PARAM_GATHER": "0", "TULU_SP_OVERLAP": "0"}
    assert (rows[0]["world_size"], rows[0]["tp"]) == (4, 2)
    assert rows[1]["max_rel_diff"] == 0.0 and rows[1]["metrics"][0]["policy_loss"] != 0.0
    out = capsys.readouterr().out
    assert "all three in series" in out and "warning" not in out
    assert len(json.loads((tmp_path / "o.json").read_text())) == 2


def test_the_tp_allreduce_bench_prints_the_collectives_sizes_and_floor_on_cpu(tmp_path):
    """bench/tp_allreduce.py on the CPU: it starts torchrun itself (2 gloo processes), times gloo's all-reduce at each
    decode batch's size beside the floor at the measured bus bandwidth, says ours needs CUDA GPUs, and writes the
    rows."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TRITON_INTERPRET")}
    out = tmp_path / "ar.json"
    r = subprocess.run([sys.executable, os.path.join(root, "bench/tp_allreduce.py"), "--rows", "1,3", "--hidden",
                        "64", "--reps", "2", "--json", str(out)], env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "needs CUDA GPUs" in r.stdout and "CPU x 2 (gloo)" in r.stdout, r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(x["rows"], x["bytes"]) for x in rows] == [(1, 256), (3, 768)]
    assert all(x["nccl_us"] > 0 and 0 < x["floor_us"] for x in rows)


def test_the_tp_allreduce_table_puts_each_form_beside_nccl_and_the_step_cost():
    """bench/tp_allreduce.py's table as a GPU run prints it (forms timed; a row whose form failed its check has no
    figure for it): each form's column, the best form against NCCL and the 80 sums' cost a step each way."""
    from bench.tp_allreduce import recommend, table

    rows = [
        {"rows": 1, "bytes": 10240, "floor_us": 0.1, "nccl_us": 12.0, "one_shot_us": 4.0, "multimem_us": 6.0,
         "chosen_us": 4.1},
        {"rows": 64, "bytes": 655360, "floor_us": 2.0, "nccl_us": 20.0, "one_shot_us": 16.0, "chosen_us": 16.2},
    ]  # fmt: skip
    lines = table(rows, ["one_shot", "multimem"], 80)
    assert lines[0].split() == ["rows", "bytes", "nccl", "one_shot", "multimem", "chosen", "floor", "best/NCCL",
                                "step", "NCCL", "step", "best"]  # fmt: skip
    assert lines[1].split() == ["1", "10240", "12.0", "4.0", "6.0", "4.1", "0.1", "3.00x", "0.96ms", "0.32ms"]
    assert lines[2].split()[4] == "nan" and lines[2].split()[7:] == ["1.25x", "1.60ms", "1.28ms"]
    assert rows[0]["best_vs_nccl"] == 3.0
    # what it decides: one-shot the fastest at both sizes (the multicast form has no figure at 64 rows: its check
    # failed), and faster than NCCL everywhere; then, with one-shot losing at 64 rows, the threshold below it
    assert recommend(rows, ["one_shot", "multimem"]) == (
        "decides: TULU_ONE_SHOT_BYTES=655360 (one-shot the fastest up to it, multimem above); "
        "TULU_SYMM_ALL_REDUCE=1: faster than NCCL at every size"
    )
    rows[1].update(one_shot_us=30.0, multimem_us=25.0)
    assert recommend(rows, ["one_shot", "multimem"]) == (
        "decides: TULU_ONE_SHOT_BYTES=10240 (one-shot the fastest up to it, multimem above); "
        "NCCL as fast or faster at [64] rows"
    )
