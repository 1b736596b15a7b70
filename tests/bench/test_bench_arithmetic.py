"""The arithmetic behind the benches' figures (tok/s, TFLOP/s, GB/s, floors, rooflines, memory), checked against
hand-computed values with the timer stubbed out: no timing is asserted, only what a measured time becomes."""

from __future__ import annotations

import json
import os
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

approx = pytest.approx


def _fake_clock(module, monkeypatch, times):
    """module.time.perf_counter returning `times` in turn."""
    ticks = iter(times)
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))


# bench/common.py


def test_measure_on_cpu_is_the_mean_call_after_one_untimed_warmup_or_one_call_that_outlasts_rep_ms(monkeypatch):
    import bench.common as C

    now, calls = [0.0], []

    def fn():  # 2 ms a call on the stubbed clock
        calls.append(now[0])
        now[0] += 0.002

    monkeypatch.setattr(C, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    ms, mem = C.measure(fn, "cpu", rep_ms=10, min_reps=3)
    assert ms == approx(2.0) and mem != mem  # (memory: nan on CPU)
    assert len(calls) == 1 + 5  # the warm-up, then 10 ms of 2 ms calls
    calls.clear()
    assert C.measure(fn, "cpu", rep_ms=0, min_reps=3)[0] == approx(2.0) and len(calls) == 1 + 3
    calls.clear()  # by default one call alone where it outlasts rep_ms (ours in the interpreter): it is the timing
    assert C.measure(fn, "cpu", rep_ms=1)[0] == approx(2.0) and len(calls) == 1
    calls.clear()  # (one that does not is a warm-up, then timed over rep_ms)
    assert C.measure(fn, "cpu", rep_ms=3)[0] == approx(2.0) and len(calls) == 1 + 2


def test_measured_ceilings_count_the_bytes_and_flops_of_their_work(monkeypatch):
    """The copy counts its bytes read plus written (2 x 64 MiB x 5 copies on CPU), the matmul 2 n^3 (512^3 x 3), each
    over the time between its two clock reads (1 s here), in units of 1e12."""
    import bench.common as C

    _fake_clock(C, monkeypatch, [0.0, 1.0])
    assert C.measured_copy_tbs("cpu") == approx(2 * 2**26 * 5 / 1e12)
    _fake_clock(C, monkeypatch, [0.0, 1.0])
    assert C.measured_matmul_tflops("cpu") == approx(2 * 512**3 * 3 / 1e12)
    _fake_clock(C, monkeypatch, [0.0, 1.0])  # (a read alone: 16M fp32 read 5 times, nothing written back)
    assert C.measured_read_tbs("cpu") == approx(4 * 2**24 * 5 / 1e12)


def test_fill_peaks_sets_each_ceiling_from_its_own_measurement(monkeypatch, capsys):
    import bench.common as C

    monkeypatch.setattr(C, "measured_copy_tbs", lambda device: 3.14159)
    monkeypatch.setattr(C, "measured_matmul_tflops", lambda device: 789.123)
    monkeypatch.setattr(C, "measured_read_tbs", lambda device: 3.33)
    args = SimpleNamespace(bandwidth=None, tflops=None, given=5.0)
    C.fill_peaks(args, "cpu", bandwidth="bandwidth", tflops="tflops")
    assert (args.bandwidth, args.tflops) == (3.142, 789.1)
    C.fill_peaks(args, "cpu", bandwidth="given")  # a flag's value is kept
    said = capsys.readouterr().out
    assert args.given == 5.0 and "copy bandwidth 3.14 TB/s (a read alone 3.33), matmul 789.1 TFLOP/s" in said


def test_write_json_is_standard_json_with_null_for_figures_not_finite(tmp_path):
    """write_json: a figure that is not finite (NaN, either infinity), in a dict, list or tuple at any depth, is written
    as null, not as NaN or Infinity (no JSON value); a value JSON has no type for (a Path among a bench's arguments) as
    its text; indent as asked; nothing without a path."""
    from pathlib import Path

    import bench.common as C

    nan, inf = float("nan"), float("inf")
    obj = {"rows": [{"peak": nan, "ms": 1.5, "range": (-inf, 2.0)}], "meta": {"top": inf, "json": Path("a.json")}}
    C.write_json(str(tmp_path / "r.json"), obj, indent=1)
    text = (tmp_path / "r.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert saved == {"rows": [{"peak": None, "ms": 1.5, "range": [None, 2.0]}], "meta": {"top": None, "json": "a.json"}}
    assert text.startswith('{\n "rows"')  # (indent 1)
    C.write_json(None, obj)
    assert os.listdir(tmp_path) == ["r.json"]


def test_check_close_tolerances():
    from bench.common import check_close

    check_close("ok", 0.019, torch.bfloat16)
    check_close("ok", 9e-4, torch.float32)
    for err, dtype in ((0.03, torch.bfloat16), (2e-3, torch.float32), (float("nan"), torch.bfloat16)):
        with pytest.raises(SystemExit, match="not timed"):
            check_close("bad", err, dtype)


def test_extra_memory_leaves_out_the_new_outputs_only():
    """measure's extra peak (CUDA) subtracts the bytes of the outputs a call returns, not of a tensor it returns
    that lived before the call (an in-place gradient)."""
    from bench.common import _nbytes, _new_outputs

    old = torch.zeros(4, dtype=torch.float64)  # (32 bytes: not the new outputs' 24)
    before = {old.untyped_storage().data_ptr()}
    out = (old, [torch.zeros(5, dtype=torch.float32)], {"x": torch.zeros(2, dtype=torch.int16)}, 7)
    assert _nbytes(_new_outputs(out, before)) == 5 * 4 + 2 * 2


def test_check_fits_counts_every_process_on_the_host(monkeypatch):
    from bench.common import check_fits
    from engine.errors import InvalidInput

    monkeypatch.setattr("engine.memory_plan.host_available", lambda: 20 * 2**30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    check_fits("weights", 3 * 2**30, torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(InvalidInput, match=r"weights \(8 processes on this machine\) need 24\.0 GiB, more than the 20"):
        check_fits("weights", 3 * 2**30, torch.device("cpu"))


def test_measure_on_cuda_is_the_median_of_do_bench_and_the_peak_less_new_outputs(monkeypatch):
    """CUDA (its calls stubbed): ms is do_bench's median at the given warm-up and repetition; the extra memory is the
    peak above what was allocated before the call, less the bytes of the outputs it returns, and never below 0."""
    import triton.testing

    import bench.common as C

    peak, seen = [1000], {}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 100 + peak[0])

    def do_bench(fn, warmup, rep, return_mode):
        seen.update(warmup=warmup, rep=rep, mode=return_mode)
        return 1.5

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(C, "_storages_alive", lambda: set())  # (no CUDA tensor lives here)
    out = lambda: (torch.zeros(10), torch.zeros(5, dtype=torch.float64))  # 40 + 40 new bytes
    assert C.measure(out, "cuda", warmup_ms=7, rep_ms=9) == (1.5, 1000.0 - 80)
    assert seen == {"warmup": 7, "rep": 9, "mode": "median"}
    peak[0] = 50  # (less than the outputs: 0, not negative)
    assert C.measure(out, "cuda")[1] == 0.0


def test_storages_alive_skips_dead_proxies_and_fake_tensors():
    """The scan of live tensors that measure() makes before a call survives what torch.compile leaves behind (fake
    tensors, which have no data) and a weak proxy whose object is gone (isinstance on it raises ReferenceError): on
    an H200 (2026-12-04) both failed every measurement after a torch.compile peer's row."""
    import weakref

    from torch._subclasses.fake_tensor import FakeTensorMode

    import bench.common as C

    class Box:
        pass

    box = Box()
    dead = weakref.proxy(box)
    del box
    with FakeTensorMode():
        fake = torch.empty(4)  # noqa: F841 (alive in gc while the scan runs)
    real = torch.ones(3)
    with warnings.catch_warnings(record=True) as caught:  # (nor reads a fake one's data pointer: torch warns then)
        warnings.simplefilter("always")
        alive = C._storages_alive("cpu")
    assert real.untyped_storage().data_ptr() in alive
    assert not [w for w in caught if "FakeTensor" in str(w.message)], [str(w.message) for w in caught]
    assert dead is not None  # (kept alive until here)


# bench/rollout_throughput.py


def test_decode_roofline_by_hand():
    """The tiny shape (GQA: 4 heads, 2 KV heads of 16), batch 4, prompts of 10, 6 new tokens, bf16 weights, fp8 KV,
    TP 2, 1 TB/s, 1 TFLOP/s."""
    from bench.rollout_throughput import decode_roofline
    from engine.config import ModelConfig

    cfg = ModelConfig.named("tiny")
    attn, mlp = 64 * 16 * (2 * 4 + 2 * 2), 3 * 64 * 176
    weights = 2 * (attn + mlp + 2 * 64) + 64 + 512 * 64  # layers, final norm, LM head (not the embedding lookup)
    weight_bytes = weights * 2 / 2  # bf16, half on each rank
    kv_bytes = 4 * (10 + 6 / 2) * 2 * 2 * 2 * 16 * 1 / 2  # sequences x average context x layers x K,V x heads x D
    step = (weight_bytes + kv_bytes) / 1e12
    # prefill: 40 tokens through the layers' matrices, the LM head on the 4 last rows, causal attention (4 x heads x
    # D FLOPs a pair of tokens, L^2 / 2 pairs in each of the 4 sequences, 2 layers); half on each rank
    work = (2 * 2 * (attn + mlp) * 40 + 2 * 512 * 64 * 4 + 4 * 4 * 16 * (4 * 10 * 10 / 2) * 2) / 2
    roof = decode_roofline(cfg, 4, 10, 6, 2, 1e12, kv_elem=1, tp=2, flops=1e12)
    assert roof["weight_gb"] == approx(weight_bytes / 1e9) and roof["kv_gb_per_step"] == approx(kv_bytes / 1e9)
    assert roof["step_ms"] == approx(step * 1e3) and roof["tok_s"] == approx(4 / step)
    assert roof["prefill_ms"] == approx(work / 1e12 * 1e3)  # compute-bound: more than the weights' read
    assert roof["tok_s_e2e"] == approx(4 * 6 / (work / 1e12 + 5 * step))  # new tokens only; 5 decode steps
    # a rate the weights cannot feed: the prefill is the weights' read
    roof = decode_roofline(cfg, 4, 10, 6, 2, 1e12, kv_elem=1, tp=2, flops=1e21)
    assert roof["prefill_ms"] == approx(weight_bytes / 1e12 * 1e3)


def test_decode_roofline_reads_a_tied_lm_head():
    """Tied embeddings (Llama 3.2): the embedding matrix is also the LM head, read whole at every decode step; only
    the lookup of B rows is left out, as for an untied model (whose head is a matrix of the same size)."""
    import dataclasses

    from bench.rollout_throughput import decode_roofline
    from engine.config import ModelConfig

    cfg = ModelConfig.named("tiny")
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    assert tied.num_params("lm") == cfg.num_params("lm") - 512 * 64  # (one matrix fewer held...)
    untied_roof, tied_roof = (decode_roofline(c, 4, 10, 6, 2, 1e12) for c in (cfg, tied))
    assert tied_roof["weight_gb"] == approx(untied_roof["weight_gb"])  # (... the same bytes read)
    assert tied_roof["tok_s"] == approx(untied_roof["tok_s"])


def test_rollout_row_figures(capsys):
    """ms a forward over every forward ours ran, ms a decode step where timed apart, its peak less its KV pool, tok/s
    over each roofline."""
    from bench.rollout_throughput import _print_row

    r = {"tok_s": 50.0, "seconds": 2.0, "decode_steps": 15, "prefill_steps": 5, "peak_gib": 3.0, "kv_pool_gib": 1.0,
         "decode_step_ms": 80.0}  # fmt: skip
    _print_row("ours", r, {"tok_s": 200.0, "tok_s_e2e": 100.0}, 999)
    assert capsys.readouterr().out.split() == ["ours", "50.0", "100.00", "80.00", "3.00", "2.00", "25.0%", "50.0%"]
    _print_row("hf", {"tok_s": 50.0, "seconds": 2.0, "peak_gib": 3.0}, {"tok_s": 200.0, "tok_s_e2e": 100.0}, 4)
    assert capsys.readouterr().out.split()[1:6] == ["50.0", "500.00", "-", "3.00", "3.00"]  # (HF: gen_len steps)


def test_rollout_bench_reports_the_best_run_at_the_given_peaks(tmp_path, monkeypatch):
    """The fastest of --repeats runs (the clock stubbed: 5 s then 2 s for ours, then its prompts' forward alone 0.5 s
    and 0.25 s, 3 s then 1 s for HF), new tokens only, the decode steps' time less the fastest prompts' forward, and
    the rooflines at --bandwidth / --tflops with --max-num-seqs slots."""
    import bench.rollout_throughput as R
    from engine.config import ModelConfig
    from kernels.dispatch import reference_ops

    _fake_clock(R, monkeypatch, [0.0, 5.0, 10.0, 12.0, 14.0, 14.5, 15.0, 15.25, 20.0, 23.0, 30.0, 31.0])
    pools, release = [], R.Generator.release

    def release_noting_the_pool(g):
        pools.append(g.pool.tensor.numel() * g.pool.tensor.element_size())
        release(g)

    monkeypatch.setattr(R.Generator, "release", release_noting_the_pool)
    out = tmp_path / "r.json"
    flags = ["--batch", "3", "--prompt-len", "5", "--gen-len", "4", "--repeats", "2", "--max-num-seqs", "2"]
    with reference_ops():
        R.main(flags + ["--bandwidth", "2", "--tflops", "3", "--json", str(out)])
    saved = json.loads(out.read_text())
    ours, hf = saved["ours"], saved["hf_generate"]
    assert (ours["seconds"], ours["tokens"], ours["tok_s"]) == (2.0, 12, 6.0)
    assert ours["prefill_seconds"] == 0.25 and ours["decode_step_ms"] == approx(1.75 / ours["decode_steps"] * 1e3)
    assert (hf["seconds"], hf["tokens"], hf["tok_s"]) == (1.0, 12, 12.0)
    assert saved["bandwidth_gbs"] == 2000 and saved["matmul_tflops"] == 3
    want = R.decode_roofline(ModelConfig.named("tiny"), 2, 5, 4, 4, 2e12, 4, 1, 3e12)  # fp32 on CPU
    assert saved["roofline"] == approx(want)
    assert saved["ours"]["kv_pool_gib"] == pools[0] / 2**30 > 0


def test_rollout_bench_roofline_reads_an_fp8_cache_at_one_byte_an_element(monkeypatch):
    """--kv-cache-dtype fp8: the decode roofline's KV read per step counts the cache's one byte an element, not the
    model's four (fp32 on CPU)."""
    import bench.rollout_throughput as R
    from engine.config import ModelConfig
    from kernels.dispatch import reference_ops

    flags = ["--batch", "3", "--prompt-len", "5", "--gen-len", "4", "--repeats", "1", "--no-hf"]
    with reference_ops():
        out = R.main(flags + ["--kv-cache-dtype", "fp8", "--bandwidth", "2", "--tflops", "3"])
    want = R.decode_roofline(ModelConfig.named("tiny"), 3, 5, 4, 4, 2e12, 1, 1, 3e12)
    assert out["roofline"] == approx(want) and out["roofline"]["kv_gb_per_step"] == approx(3 * 7 * 2 * 2 * 2 * 16 / 1e9)


# bench/bench_rope_attention.py


def test_causal_flops_count_each_sequence_half_its_square():
    from bench.bench_rope_attention import causal_flops

    # 2 matmuls x 2 FLOPs x heads x D per (query, key) pair, L^2 / 2 pairs in each sequence of a packed batch
    assert causal_flops([4, 2], heads=3, head_dim=8) == 4 * 3 * 8 * (4 * 4 + 2 * 2) / 2 == 960


def test_rope_rows_figures(monkeypatch):
    """TFLOP/s = FLOPs / ms / 1e9; forward+backward counts --fwd-bwd-factor x the forward's FLOPs; the roofline row
    is the FLOPs at --peak-tflops; extra memory in GiB."""
    import bench.bench_rope_attention as B

    monkeypatch.setattr(B, "measure", lambda fn, device, **kw: (2.0, 3 * 2**30))  # 2 ms, 3 GiB a call
    args = SimpleNamespace(warmup=0, rep=0, backward=True, fwd_bwd_factor=3.5, peak_tflops=100.0, json=None)
    q = torch.zeros(4, 1, 8)
    entry = B.bench_impl(None, q, q, q, q, 4e9, args, cuda=False)
    assert entry == approx(dict(fwd_ms=2.0, fwd_tflops=2.0, fwd_extra_gib=3.0, fwdbwd_ms=2.0, fwdbwd_tflops=7.0,
                                fwdbwd_extra_gib=3.0))  # fmt: skip
    table = []
    B.run_rows({}, q, q, q, 4e9, args, False, table, "case")
    (roof,) = table
    assert roof["fwd_ms"] == approx(0.04) and roof["fwdbwd_ms"] == approx(0.14) and roof["fwd_tflops"] == 100.0


def test_rope_sweep_figures_and_best(monkeypatch, capsys):
    """Each variant's TFLOP/s from its (stubbed) time, the backward's FLOPs (factor - 1) x the forward's (the atomic-dq
    backward's too), and the fastest variant named, with how its tiles are read (TMA: tensor descriptors, or pointer
    loads) and any register cap."""
    import bench.bench_rope_attention as B

    times = iter([4.0, 2.0, 8.0, 5.0, 10.0])
    monkeypatch.setattr(B, "measure", lambda fn, device, **kw: (next(times), float("nan")))
    b, t, h, d = 1, 40, 1, 32
    q, k, v = (torch.randn(b * t, h, d) for _ in range(3))
    cu = torch.arange(0, b * t + 1, t, dtype=torch.int32)
    args = SimpleNamespace(rope_theta=10000.0, warmup=0, rep=0, fwd_bwd_factor=3.5)
    rows = B.sweep(
        args, q, k, v, torch.arange(t), cu, 1e9,
        fwd=[(32, 16, 4, 2, True), (16, 16, 4, 2, False, {"Q_PREPASS": True, "maxnreg": 168})],
        dkdv=[(16, 16, 4, 2, True)], dq=[(32, 16, 4, 2, True)],
        atomic=[(16, 16, 4, 2, False)],
    )  # fmt: skip
    assert [r["kernel"] for r in rows] == ["fwd", "fwd", "dkdv+dq", "dkdv", "dq"]
    assert [r["tflops"] for r in rows] == approx([1e9 / 4 / 1e9, 1e9 / 2 / 1e9, 2.5 / 8, 2.5 * 1e9 / 5 / 1e9, 0.25])
    out = capsys.readouterr().out
    assert "best fwd: BLOCK_M=16 BLOCK_N=16 num_warps=4 num_stages=2 TMA=False Q_PREPASS=True maxnreg=168" in out
    assert "best dkdv+dq: BLOCK_N=16 BLOCK_M=16 num_warps=4 num_stages=2 TMA=False DQ_ATOMIC=True" in out
    # (the launch, TMA or not, and for some forwards a register cap)
    assert all(len(v) == 5 for v in B.SWEEP_ATOMIC)
    ws = ({"WARP_SPEC": True}, {"WARP_SPEC": True, "BOUNDED": True})  # (BOUNDED: per-sequence descriptors)
    for swept in (B.SWEEP_DKDV, B.SWEEP_DQ):  # (the warp-specialised variants first, plain and BOUNDED)
        assert all(len(v) == 5 or v[5] in ws for v in swept) and swept[0][5] == ws[0]
        assert [len(v) == 6 and v[5] == ws[1] for v in swept].count(True) == 3
    extra = {"maxnreg", "Q_PREPASS", "WARP_SPEC", "BOUNDED"}
    assert all(len(v) == 5 or (len(v) == 6 and set(v[5]) <= extra) for v in B.SWEEP_FWD)
    assert extra == {key for v in B.SWEEP_FWD for key in (v[5] if len(v) == 6 else ())}
    assert B.SWEEP_FWD[0][5] == {"WARP_SPEC": True}  # (the one never timed goes first)
    assert {v[4] for v in B.SWEEP_FWD} == {True, False} and {v[4] for v in B.SWEEP_ATOMIC} == {True, False}


def test_rope_bench_checks_the_gluon_forward_once_where_it_is_timed(monkeypatch):
    """The Gluon forward's rows (timed last, where it can run: 8 warps and ping-pong) are each checked against the fp32
    reference on their first call, once a run, in a subprocess under a timeout: a mismatch, a crash or a hang is that
    row's error on every call (the bench then exits non-zero), a match times ours with its switches set."""
    import subprocess

    import bench.bench_rope_attention as B

    checks, timed = [], []
    q, kv = torch.zeros(4, 8, 64), torch.zeros(4, 2, 64)
    args = SimpleNamespace(rope_theta=5e5)
    monkeypatch.setattr(B, "_ours", lambda *a, **kw: timed.append((kw.get("gluon"), kw.get("pingpong"))))
    for verdict in ("ours differs from the reference", None):
        monkeypatch.setattr(B, "_GLUON_CHECKED", {})
        checks.clear(), timed.clear()
        monkeypatch.setattr(B, "_gluon_check", lambda *a, verdict=verdict: checks.append(a) or verdict)
        for pingpong in (False, True, False, True):
            row = dict(positions=None, cu=None, theta=5e5, args=args, gluon=True, pingpong=pingpong)
            if verdict:
                with pytest.raises(RuntimeError, match=verdict):
                    B._gluon_row(q, kv, kv, **row)
            else:
                B._gluon_row(q, kv, kv, **row)
        forms = [dict(gluon=True, pingpong=p) for p in (False, True)]
        assert checks == [(f, 8, 2, 64, torch.float32, 5e5) for f in forms], checks
        assert timed == ([] if verdict else [(True, False), (True, True)] * 2)
    monkeypatch.undo()
    # the check itself: here (no GPU) the subprocess's _check_one fails, and its last word is the reason; a hang stops
    # at the timeout
    why = B._gluon_check(dict(gluon=True, pingpong=None), 4, 2, 64, torch.bfloat16, 1e4, timeout=300)
    assert why and ("CUDA" in why or "cuda" in why), why

    asked = []

    def hang(*a, **kw):
        asked.append(a[0][-1])
        raise subprocess.TimeoutExpired(a[0], kw["timeout"])

    monkeypatch.setattr(subprocess, "run", hang)
    assert B._gluon_check(dict(gluon=True, pingpong=True), 4, 2, 64, torch.bfloat16, 1e4, timeout=7) == (
        "its check against the reference did not finish in 7 s (a hang?)"
    )
    # (the forward alone for the Gluon forward; the switches flipped there as in the row)
    assert asked == ["import torch, bench.bench_rope_attention as B; B._check_one('gluon=True, pingpong=True', "
                     "{'gluon': True, 'pingpong': True}, 4, 2, 64, torch.bfloat16, 10000.0, grads=False)"]  # fmt: skip
    # the Gluon dk/dv's row: checked with the gradients, under a longer default timeout (the dq kernel's autotuning)
    assert B._gluon_check(dict(gluon_dkdv=True), 4, 2, 64, torch.bfloat16, 1e4) == (
        "its check against the reference did not finish in 150 s (a hang?)"
    )
    assert asked[-1].endswith("B._check_one('gluon_dkdv=True', {'gluon_dkdv': True}, 4, 2, 64, torch.bfloat16, "
                              "10000.0, grads=True)"), asked  # fmt: skip


def test_rope_bench_counts_the_query_heads_of_each_sequence(tmp_path, monkeypatch):
    """The CPU run of main with --heads 32 --kv-heads 8 (tiny: B2 H8/2 T64 D64), every call 2 ms: the FLOPs are those of
    the 8 query heads (GQA shares K/V, not the work) over each of the 2 sequences of 64, not one sequence of 128."""
    import bench.bench_rope_attention as B

    monkeypatch.setattr(B, "measure", lambda fn, device, **kw: (2.0, float("nan")))
    out = tmp_path / "r.json"
    flags = ["--heads", "32", "--kv-heads", "8", "--peak-tflops", "1", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["bench_rope_attention.py", *flags])
    B.main()
    rows = json.loads(out.read_text())["rows"]
    flops = 2 * 4 * 8 * 64 * 64 * 64 / 2
    timed = [r for r in rows if not r["impl"].startswith("roofline")]
    assert len(timed) == 2 and all(r["fwd_tflops"] == approx(flops / 2 / 1e9) for r in timed)
    assert all(r["fwdbwd_tflops"] == approx(3.5 * flops / 2 / 1e9) for r in timed)
    (roof,) = [r for r in rows if r["impl"].startswith("roofline")]
    assert roof["fwd_ms"] == approx(flops / 1e9)


# bench/bench_paged_attention.py

PAGED_TINY = (4, 100, 4, 2, 64, 16)  # batch, context, Hq, Hkv, D, block


def test_paged_shape_figures_fp8_cache(monkeypatch):
    """KV bytes = batch x context x Hkv x D x (K, V) x the cache's bytes (fp8: 1); GB/s = those bytes over the
    time; the dense-cache peer reads its cache in the model's dtype (fp32: 4x); the floor at the bandwidth."""
    import bench.bench_paged_attention as B

    monkeypatch.setattr(B, "measure", lambda fn, device, **kw: (2.0, 3 * 2**20))  # 2 ms, 3 MiB a call
    row = B._bench_shape("tiny", *PAGED_TINY, dtype=torch.float32, device=torch.device("cpu"), bw=2e12,
                         compile_=False, cache_dtype=torch.float8_e4m3fn)  # fmt: skip
    kv = 4 * 100 * 2 * 64 * 2 * 1
    assert row["kv_bytes"] == kv and row["floor_ms"] == approx(kv / 2e12 * 1e3)
    assert row["eager_gbs"] == approx(kv / 2e-3 / 1e9) and row["sdpa_gbs"] == approx(4 * kv / 2e-3 / 1e9)
    assert row["eager_mem_mb"] == row["sdpa_mem_mb"] == 3.0


def test_paged_table_and_sweep_figures(monkeypatch, capsys):
    import bench.bench_paged_attention as B

    B._print([{"shape": "s", "kv_bytes": 2e6, "floor_ms": 1.0, "ours_ms": 0.5, "ours_gbs": 1500.0}], 3.0)
    line = capsys.readouterr().out.splitlines()[1].split()
    assert line[:6] == ["s", "2.0", "1.0000", "0.5000", "1500.0", "50.0%"]  # 1500 GB/s of 3 TB/s
    monkeypatch.setattr(B, "measure", lambda fn, device, **kw: (2.0, float("nan")))
    ahead = []  # (the 36 launch variants handed to dispatch.compile_ahead before any is timed; a no-op here)
    monkeypatch.setattr(B, "compile_ahead", lambda fns: ahead.append(len(fns)))
    rows = B._sweep("s", *PAGED_TINY, dtype=torch.float32, device=torch.device("cpu"), bw=2e12)
    assert rows and all(r["tbs"] == approx(4 * 100 * 2 * 64 * 2 * 4 / 2e-3 / 1e12) for r in rows)
    assert ahead == [36]


def test_paged_peers_are_checked_against_the_reference_relative_to_its_largest_value(monkeypatch):
    """Before timing, a peer (sdpa here; ours on a GPU) is checked against the eager reference, its error relative to
    the output's largest value: 0.05% off on values in the thousands passes the fp32 tolerance (1e-3), 1% stops it."""
    import bench.bench_paged_attention as B
    from kernels import reference

    make = B._make
    monkeypatch.setattr(B, "_make", lambda *a: (lambda q, kc, vc, bt, cl: (q, kc, 1000 * vc, bt, cl))(*make(*a)))
    monkeypatch.setattr(B, "measure", lambda fn, device, **kw: (2.0, 0.0))
    for off, ok in ((5e-4, True), (1e-2, False)):

        def peers(q, kc, vc, bt, ctx, dtype, off=off):
            cl = torch.full((q.shape[0],), ctx, dtype=torch.int32)
            return {"sdpa": lambda: reference.paged_decode_attention(q, kc, vc, bt, cl) * (1 + off)}

        monkeypatch.setattr(B, "_dense_peers", peers)
        run = lambda: B._bench_shape("tiny", *PAGED_TINY, dtype=torch.float32, device=torch.device("cpu"), bw=2e12,
                                     compile_=False)  # fmt: skip
        if ok:
            assert run()["sdpa_ms"] == 2.0
        else:
            with pytest.raises(SystemExit, match=r"paged decode tiny \(sdpa\).*not timed"):
                run()


def test_paged_sweep_lists_the_fastest_first_with_its_share_of_the_bandwidth(monkeypatch, capsys):
    """The sweep's 36 launch variants timed 36 ms down to 1 ms: returned fastest first (then the split variants), and
    printed with TB/s and its percentage of the bandwidth (the tiny shape's 409600 fp32 KV bytes in 1 ms: 4.096e-4
    TB/s, 25% of 1.6384e-3)."""
    import bench.bench_paged_attention as B

    times = iter([*range(36, 0, -1), 5.0, 3.0])
    monkeypatch.setattr(B, "measure", lambda fn, device, **kw: (float(next(times)), float("nan")))
    rows = B._sweep("s", *PAGED_TINY, dtype=torch.float32, device=torch.device("cpu"), bw=1.6384e9)
    assert [r["ms"] for r in rows if "block_n" in r] == list(range(1, 37))
    # then the default launch at each min_split_tokens giving a new split count (4 stand-in SMs, 8 programs, 100
    # tokens: 2 splits of 64 tokens, then 1 from 128 on), fastest first
    assert [(r["min_split_tokens"], r["splits"], r["ms"]) for r in rows[36:]] == [(128, 1, 3.0), (64, 2, 5.0)]
    out = capsys.readouterr().out.split("fastest launch variants of s:\n")[1].splitlines()
    assert out[5:] == ["s min_split_tokens 64 (2 splits): 5.0000 ms", "s min_split_tokens 128 (1 split): 3.0000 ms"]
    assert len(out) == 7 and out[0].split()[1:5] == ["1.0000", "ms", "0.00", "TB/s"] and "(25%)" in out[0]
    assert "2.0000 ms" in out[1] and "(12%)" in out[1]


def test_paged_bench_without_a_gpu_times_the_tiny_shape(monkeypatch, tmp_path):
    """main on a CPU (each call stubbed at 2 ms): the tiny shape only (a 13B decode step's cache would not be allocated
    on a host by mistake), its KV bytes (bf16, the default --dtype) and floor at --bandwidth-tbs in the JSON."""
    import bench.bench_paged_attention as B

    real = B._bench_shape

    def tiny_only(name, *a, **k):
        assert name == "tiny-b4-c100", name  # (before its cache is allocated)
        return real(name, *a, **k)

    monkeypatch.setattr(B, "_bench_shape", tiny_only)
    monkeypatch.setattr(B, "measure", lambda fn, device, **kw: (2.0, float("nan")))
    out = tmp_path / "p.json"
    B.main(["--bandwidth-tbs", "2", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    kv = 4 * 100 * 2 * 64 * 2 * 2
    assert (row["shape"], row["kv_bytes"], row["floor_ms"]) == ("tiny-b4-c100", kv, approx(kv / 2e12 * 1e3))
    assert row["eager_gbs"] == approx(kv / 2e-3 / 1e9) and row["eager_mem_mb"] is None  # (nan: not measured)


# bench/bench_gae.py


def test_gae_floor(tmp_path, monkeypatch):
    """The floor reads rewards, values (fp32) and the mask (bool), and writes advantages and returns (fp32)."""
    import bench.bench_gae as B

    out = tmp_path / "g.json"
    monkeypatch.setattr(sys, "argv", ["bench_gae.py", "--bandwidth", "2", "--reps", "1", "--json", str(out)])
    B.main()
    saved = json.loads(out.read_text())
    moved = 4 * 64 * (4 + 4 + 1 + 4 + 4)  # the CPU run's 4 x 64
    assert saved["meta"]["bytes"] == moved
    (floor,) = [r for r in saved["rows"] if r["name"].startswith("bandwidth floor")]
    assert floor["ms"] == approx(moved / 2e12 * 1e3)


# bench/bench_offload.py


def test_offload_best_leaves_out_the_warmup(monkeypatch):
    import bench.bench_offload as B

    now, durations = [0.0], iter([1.0, 5.0, 3.0, 4.0])  # the warm-up fastest of all
    monkeypatch.setattr(B, "clock", lambda device, every_stream: now[0])

    def fn():
        now[0] += next(durations)

    assert B._best(fn, torch.device("cpu"), 3) == 3.0


def test_offload_copy_rates_count_their_bytes(monkeypatch):
    """GB/s (1e9) of the bytes moved: both ways at once and a device-to-device copy move them twice."""
    import bench.bench_offload as B

    seconds = {"to_host": 0.25, "to_device": 0.5}
    monkeypatch.setattr(B, "_best", lambda fn, device, reps, after=None: seconds.get(fn.__name__, 1.0))
    rates = B.copy_rates(2**20, torch.device("cpu"), 1)
    gb = 2**20 / 1e9
    assert rates["ours: out (device -> host)"] == approx(gb) and rates["ours: in (host -> device)"] == approx(gb)
    assert rates["ours: both ways at once"] == approx(2 * gb)
    assert rates["device to device (read + write)"] == approx(2 * gb)
    assert rates["torch pinned allocator: out"] == approx(4 * gb)  # (0.25 s)
    assert rates["pageable host memory: in"] == approx(2 * gb)  # (0.5 s)


def test_offload_recipe_costs_by_hand():
    """At 10 GB/s out, 20 in, 25 both ways: rollouts moves the two trained models' state out and back once;
    always streams it through at each of the 8 optimizer steps (512 rollouts / 64 per step, one epoch) both ways
    at once; the idle models bring the frozen two and the value model's bf16 weights in, and the value model's out."""
    from bench.bench_offload import recipe_costs
    from engine.config import ModelConfig, PPOConfig
    from engine.memory_plan import STATE, fixed_bytes

    c, cfg = ModelConfig.named("llama2-13b"), PPOConfig()
    steps = cfg.ppo_epochs * cfg.rollout_batch_size // cfg.train_batch_size
    assert steps == 8
    rows = {(r["tp"], r["setting"]): r for r in recipe_costs({"ours: out (device -> host)": 10.0,
            "ours: in (host -> device)": 20.0, "ours: both ways at once": 25.0})}  # fmt: skip
    for tp in (8, 4):
        lm, score = c.num_params("lm", tp), c.num_params("score", tp)
        state = fixed_bytes({"policy": lm, "reference": lm, "value": score, "reward": score}, ("policy", "value"),
                            torch.bfloat16, 1, False)[STATE]  # fmt: skip
        r = rows[tp, "--offload-optimizer rollouts"]
        assert (r["gb_out"], r["gb_in"]) == approx((state / 1e9, state / 1e9))
        assert r["seconds"] == approx(state / 10e9 + state / 20e9)
        r = rows[tp, "--offload-optimizer always"]
        assert (r["gb_out"], r["gb_in"]) == approx((8 * state / 1e9, 8 * state / 1e9))
        assert r["seconds"] == approx(16 * state / 25e9)
        r = rows[tp, "--offload-idle-models rollouts"]
        out_b, in_b = 2 * score, 2 * (lm + score + score)
        assert (r["gb_out"], r["gb_in"]) == approx((out_b / 1e9, in_b / 1e9))
        assert r["seconds"] == approx(out_b / 10e9 + in_b / 20e9)


def test_offload_recipe_streams_the_state_at_every_optimizer_step_of_every_epoch(monkeypatch):
    """always moves the state both ways at each optimizer step: two PPO epochs over the rollout make 16 steps (the
    recipe's one: 8), twice the bytes; so do two samples per prompt (1024 sequences in minibatches of 64)."""
    import bench.bench_offload as B
    from engine.config import PPOConfig

    rates = {"ours: out (device -> host)": 10.0, "ours: in (host -> device)": 20.0, "ours: both ways at once": 25.0}
    always = lambda rows: [r for r in rows if r["setting"] == "--offload-optimizer always"]
    one = always(B.recipe_costs(rates))
    monkeypatch.setattr(B, "PPOConfig", lambda: PPOConfig(ppo_epochs=2))
    two = always(B.recipe_costs(rates))
    assert [r["gb_out"] for r in two] == approx([2 * r["gb_out"] for r in one])
    assert [r["seconds"] for r in two] == approx([2 * r["seconds"] for r in one])
    monkeypatch.setattr(B, "PPOConfig", lambda: PPOConfig(samples_per_prompt=2))  # (a rollout of twice the sequences)
    assert [r["gb_out"] for r in always(B.recipe_costs(rates))] == approx([2 * r["gb_out"] for r in one])


def test_offload_adam_figures_per_billion_parameters(monkeypatch, capsys):
    """The optimizer step's printed ms and seconds per 1B parameters (0.5 s for 1e8 parameters: 500 ms, 5 s)."""
    import bench.bench_offload as B

    rates = {"ours: out (device -> host)": 10.0, "ours: in (host -> device)": 20.0, "ours: both ways at once": 25.0}
    monkeypatch.setattr(B, "copy_rates", lambda nbytes, device, reps: rates)
    monkeypatch.setattr(B, "adam_seconds", lambda config, device, reps: {"on the device": 0.5, "parameters": 10**8})
    out = B.main(["--reps", "1"])
    assert out["adam_seconds"] == {"on the device": 0.5} and out["adam_parameters"] == 10**8
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("on the device")]
    assert line.split()[3:] == ["500.0", "ms", "5.00", "s", "per", "1B", "parameters"]


# bench/activation_memory.py


def test_activation_memory_totals_use_the_full_models_layers(tmp_path, monkeypatch):
    """Measured on two layers, totalled over the named shape's (five here): keep all = tokens x layers x kept;
    recompute all = tokens x (layers x checkpoint + one layer's kept, the one being recomputed)."""
    import dataclasses

    import bench.activation_memory as A
    from engine.config import MODEL_SHAPES

    monkeypatch.setattr(A.ModelConfig, "named", lambda name: dataclasses.replace(MODEL_SHAPES["tiny"], num_layers=5))
    (row,) = A.main(["--micro-batch-tokens", "100"])
    kept, ckpt = row["layer_bytes_per_token"], row["checkpoint_bytes_per_token"]
    assert row["micro_batch_keep_all_gib"] == approx(100 * 5 * kept / 2**30)
    assert row["micro_batch_recompute_all_gib"] == approx(100 * (5 * ckpt + kept) / 2**30)


def test_paged_table_has_one_column_per_variant(capsys):
    """A GPU row holds ours_ms (and, with an fp8 cache, ours_bfloat16_ms): each variant gets one column, ours not
    twice (ours_ms also starts with "ours_")."""
    import bench.bench_paged_attention as B

    row = {"shape": "s", "kv_bytes": 2e6, "floor_ms": 1.0, "ours_ms": 0.5, "ours_gbs": 4000.0,
           "ours_bfloat16_ms": 1.0, "ours_bfloat16_gbs": 2000.0, "eager_ms": 4.0, "eager_gbs": 500.0}  # fmt: skip
    B._print([row], 4.0)
    head, line = capsys.readouterr().out.splitlines()
    words = head.split()
    assert [w for w, nxt in zip(words, words[1:]) if nxt == "ms"][1:] == ["ours", "ours_bfloat16", "eager", "compile",
                                                                          "sdpa", "rope_write", "fused"]  # fmt: skip
    assert line.split()[3:11] == ["0.5000", "4000.0", "100.0%", "nan", "1.0000", "2000.0", "50.0%", "nan"]


def measure_then_stop(*times):
    """A stand-in for bench.common.measure: `times` (ms) one per call, then the GPU suite's cap stopping the bench
    (as far as this process gets the signal)."""
    left = iter(times)

    def measure(fn, device, **kw):
        ms = next(left, None)
        if ms is None:
            raise KeyboardInterrupt
        return ms, float("nan")

    return measure


def test_paged_sweep_stopped_midway_keeps_what_it_measured(monkeypatch, capsys, tmp_path):
    """The sweep steps of bench/run_gpu_suite.sh stop at a cap (a killed process): each variant is printed as it is
    measured, and the JSON holds every shape swept so far (it held none of the sweep until the very end)."""
    import argparse

    import bench.bench_paged_attention as B

    monkeypatch.setattr(B, "measure", measure_then_stop(2.0, 1.0, 4.0))
    with pytest.raises(KeyboardInterrupt):
        B._sweep("s", *PAGED_TINY, dtype=torch.float32, device=torch.device("cpu"), bw=2e12)
    printed = [line for line in capsys.readouterr().out.splitlines() if " ms " in line]
    assert len(printed) == 3 and "4.0000 ms" in printed[2]

    # run(): on a GPU (stubbed here), the sweep rows of each finished shape are saved before the next shape
    monkeypatch.setattr(B.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(B, "fill_peaks", lambda args, device, bandwidth: setattr(args, bandwidth, 3.0))
    monkeypatch.setattr(B, "_bench_shape", lambda name, *a, **k: {"shape": name, "kv_bytes": 1.0, "floor_ms": 1.0})
    swept = []

    def sweep(name, *a, **k):
        if swept:
            raise KeyboardInterrupt
        swept.append(name)
        return [{"shape": name, "block_n": 64, "ms": 1.0, "tbs": 1.0}]

    monkeypatch.setattr(B, "_sweep", sweep)
    out = tmp_path / "p.json"
    args = argparse.Namespace(json=out, bandwidth_tbs=None, dtype="bfloat16", kv_dtype="auto", ptxas=False,
                              shapes=["13b-b64-c384", "13b-b8-c4096"], sweep=True, no_compile=True)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        B.run(args)
    saved = json.loads(out.read_text())
    assert [r["shape"] for r in saved] == ["13b-b64-c384", "13b-b8-c4096", "13b-b64-c384"]
    assert saved[-1]["block_n"] == 64


def test_rope_sweep_stopped_midway_keeps_what_it_measured(monkeypatch, tmp_path):
    """The rope_sweep step stops at its cap: the JSON holds every variant measured so far (none until the end)."""
    import bench.bench_rope_attention as B

    monkeypatch.setattr(B, "measure", measure_then_stop(4.0, 2.0))
    b, t, h, d = 1, 40, 1, 32
    q, k, v = (torch.randn(b * t, h, d) for _ in range(3))
    cu = torch.arange(0, b * t + 1, t, dtype=torch.int32)
    out = tmp_path / "s.json"
    args = SimpleNamespace(rope_theta=10000.0, warmup=0, rep=0, fwd_bwd_factor=3.5, json=str(out))
    with pytest.raises(KeyboardInterrupt):
        B.sweep(
            args,
            q,
            k,
            v,
            torch.arange(t),
            cu,
            1e9,
            fwd=[(32, 16, 4, 2, True), (16, 16, 4, 2, True), (32, 32, 4, 2, False)],
        )
    saved = json.loads(out.read_text())
    assert [r["ms"] for r in saved["sweep"]] == [4.0, 2.0] and saved["device"] == "cpu"


def test_the_ptxas_report_builds_only_the_tiles_a_sequence_block_takes():
    """With attention_tiles.SEQ_BLOCKS at 64 rows, the 128-wide inner tiles are pruned at launch: the offline sm_90
    report skips them too (plain and BOUNDED warp-specialised shapes alike), and builds every one at 128."""
    from bench.bench_rope_attention import _fitting, _ws_builds
    from kernels import rope_attention as ra

    assert _fitting(((128, 4, 2), (64, 4, 2), (32, 8, 3)), 64) == [(64, 4, 2), (32, 8, 3)]
    builds = _ws_builds(ra._FWD_WS_SHAPES, None, 64)
    assert builds and all(64 % b[0] == 0 for b in builds) and any(len(b) > 3 for b in builds)
    assert len(builds) < len(ra._FWD_WS_SHAPES) == len(_ws_builds(ra._FWD_WS_SHAPES, None, 128))
    assert _ws_builds(ra._FWD_WS_SHAPES, 1, 128) == [ra._FWD_WS_SHAPES[0], ra._FWD_WS_SHAPES[3]]


def test_rope_bench_only_keeps_the_named_rows_and_ours_at_its_defaults():
    """--only WORD...: the rows whose name holds one of the words, and ours at its defaults (the baseline); no words:
    all of them."""
    from bench.bench_rope_attention import select_rows

    rows = dict.fromkeys(["ours (rotary fused)", "  ours, Gluon dk/dv (FA3 order)", "SDPA flash + HF rotary",
                          "  ours, pointer loads (no TMA)", "eager reference"])  # fmt: skip
    assert list(select_rows(rows, ["Gluon", "SDPA"])) == [
        "ours (rotary fused)", "  ours, Gluon dk/dv (FA3 order)", "SDPA flash + HF rotary"
    ]  # fmt: skip
    assert select_rows(rows, None) is rows and list(select_rows(rows, ["nothing"])) == ["ours (rotary fused)"]
