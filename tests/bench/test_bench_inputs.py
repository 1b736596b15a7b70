"""What the benches time their kernels over (graph timings' input sets 4x the L2, not one set replayed from the L2) and
which flag values they refuse before anything runs (one line, exit code 2), all on CPU."""

import importlib
import sys

import pytest
import torch

import bench.common
from tests.bench.refusals import refused_line


def test_l2_copies_total_4x_the_l2_and_no_more_than_one_set_above_it():
    """bench.common.l2_copies: enough sets of a size to hold 4x L2_BYTES (one where a set alone does), at most 64."""
    from bench.common import L2_BYTES, l2_copies

    for nbytes in (4 * 2**20, 6_553_600, 7_864_320, 20 * 2**20, 100 * 2**20, 4 * L2_BYTES - 1):
        n = l2_copies(nbytes)
        assert 4 * L2_BYTES <= n * nbytes < 4 * L2_BYTES + nbytes, nbytes  # (the memory: one set above 4x the L2)
    assert l2_copies(4 * L2_BYTES) == l2_copies(10 * L2_BYTES) == 1
    assert l2_copies(1000) == 64 and l2_copies(1000, most=8) == 8 and l2_copies(0) == 64  # (a toy's: capped)


def test_decode_linear_weight_copies_total_4x_the_l2_at_every_tp_shard():
    """bench_decode_linear's graph timing rotates weight copies totalling 4x the L2 for every projection of every
    named shape at TP 1 to 8, the small shards too (the 13B output projection at TP 8, 6.25 MiB, was timed over 8
    copies, 50 MiB: an H200's L2 held them all); one copy on a CPU."""
    from bench.bench_decode_linear import _copies, projections
    from bench.common import L2_BYTES, tp_error
    from engine.config import MODEL_SHAPES, ModelConfig

    checked = 0
    for model in (m for m in MODEL_SHAPES if m != "tiny"):
        for tp in (t for t in (1, 2, 4, 8) if tp_error(model, t) is None):
            for name, (n, k, _) in projections(ModelConfig.named(model), tp).items():
                copies, weight = _copies(n, k, 2, "cuda"), n * k * 2
                assert 4 * L2_BYTES <= copies * weight < 4 * L2_BYTES + weight, (model, tp, name, copies)
                checked += 1
    assert checked > 80
    assert _copies(5120, 640, 2, "cuda") == 41  # (the 13B output projection at TP 8)
    assert _copies(5120, 640, 2, "cpu") == 1


def test_paged_sweep_times_every_variant_over_input_sets_4x_the_l2(monkeypatch):
    """bench_paged_attention --sweep: each launch variant and each min_split_tokens timed over as many input sets as
    the graph rows (bench.common.l2_copies of the KV: 4x the L2 in all), each set's data its own (it replayed one set,
    whose KV a batch-1 shape's replays read from the L2)."""
    import bench.bench_paged_attention as bp
    from bench.common import l2_copies

    timed = []
    monkeypatch.setattr(bp, "_kernel_ms", lambda fns, device: timed.append(fns) or 1.0)
    monkeypatch.setattr(bp, "compile_ahead", lambda fns: None)
    shape = bp.CPU_SHAPES["tiny-b4-c100"]
    batch, ctx, hq, hkv, d, bs = shape
    rows = bp._sweep("tiny-b4-c100", *shape, dtype=torch.float32, device=torch.device("cpu"), bw=1e12)
    splits = [r for r in rows if "min_split_tokens" in r]
    assert splits and len(timed) == len(rows) == 36 + len(splits)  # (36 launch variants)
    want = l2_copies(batch * ctx * hkv * d * 2 * 4)
    assert want == 64 and all(isinstance(fns, list) and len(fns) == want for fns in timed)
    for fns in (timed[0], timed[-1]):  # a launch variant's and a split count's: different data per set
        first, second = fns[0](), fns[1]()
        assert first.shape == second.shape == (batch, hq, d) and not torch.equal(first, second)


class _Reached(Exception):
    """Raised by a stand-in for what a bench does first after its checks: the flags were accepted."""


def _reached(*args, **kwargs):
    raise _Reached


def _no_measuring(monkeypatch):
    """A refusal must come before the device's ceilings are measured (the first thing a bench times)."""
    for name in ("measured_copy_tbs", "measured_read_tbs", "measured_matmul_tflops"):
        monkeypatch.setattr(bench.common, name, lambda device: pytest.fail("measured before the flags were checked"))


NOWHERE = "/nonexistent/dir/out.json"
REFUSED = [
    ("bench_decode_linear", ["--bandwidth", "0"], "--bandwidth must be a finite number > 0, got 0.0"),
    ("bench_decode_linear", ["--bandwidth", "nan"], "--bandwidth must be a finite number > 0, got nan"),
    ("bench_decode_linear", ["--tp", "0"], "--tp must be >= 1, got 0"),
    ("bench_decode_linear", ["--tp", "3"], "--tp 3 does not divide the llama2-13b model's attention heads (40)"),
    ("bench_decode_linear", ["--tp", "8"], "--tp 8 does not divide the tiny model's attention heads (4): without"),
    ("bench_decode_linear", ["--json", NOWHERE], f"--json {NOWHERE}: not a file in an existing directory"),
    ("bench_paged_attention", ["--bandwidth-tbs", "0"], "--bandwidth-tbs must be a finite number > 0, got 0.0"),
    ("bench_paged_attention", ["--bandwidth-tbs", "1", "--json", NOWHERE], "not a file in an existing directory"),
    ("bench_logprob", ["--bandwidth", "0", "--skip-hidden"], "--bandwidth must be a finite number > 0, got 0.0"),
    ("bench_logprob", ["--tflops", "-1"], "--tflops must be a finite number > 0, got -1.0"),
    ("bench_logprob", ["--n", "0"], "--n must be >= 1, got 0"),
    ("bench_logprob", ["--bandwidth", "2", "--skip-hidden", "--json", NOWHERE], "not a file in an existing directory"),
    ("bench_rope_attention", ["--peak-tflops", "0"], "--peak-tflops must be a finite number > 0, got 0.0"),
    ("bench_rope_attention", ["--batch", "0"], "--batch must be >= 1, got 0"),
    ("bench_rope_attention", ["--kv-heads", "0"], "--kv-heads must be >= 1, got 0"),
    ("bench_rope_attention", ["--peak-tflops", "1", "--json", NOWHERE], "not a file in an existing directory"),
    ("bench_gae", ["--bandwidth", "0"], "--bandwidth must be a finite number > 0, got 0.0"),
    ("bench_gae", ["--bandwidth", "-1"], "--bandwidth must be a finite number > 0, got -1.0"),
    ("bench_gae", ["--batch", "0"], "--batch must be >= 1, got 0"),
    ("bench_gae", ["--seq", "0"], "--seq must be >= 1, got 0"),
    ("bench_gae", ["--bandwidth", "1", "--json", NOWHERE], "not a file in an existing directory"),
    ("bench_rmsnorm_swiglu", ["--bandwidth", "0"], "--bandwidth must be a finite number > 0, got 0.0"),
    ("bench_rmsnorm_swiglu", ["--tokens", "0"], "--tokens must be >= 1, got 0"),
    ("bench_rmsnorm_swiglu", ["--bandwidth", "1", "--json", NOWHERE], "not a file in an existing directory"),
    ("bench_grad_sums", ["--model", "llama2-7b:0"], "--model llama2-7b:0: the TP degree after ':' must be an integer"),
    ("bench_grad_sums", ["--model", "llama2-7b:3"], "--model llama2-7b:3: --tp 3 does not divide the llama2-7b model"),
    ("bench_grad_sums", ["--model", "llama2-7b", "--tp", "3"], "--tp 3 does not divide the llama2-7b model's"),
    ("bench_grad_sums", ["--model", "llama9:1"], "--model llama9:1: unknown model 'llama9' (known: tiny,"),
    ("bench_grad_sums", ["--tflops", "0"], "--tflops must be a finite number > 0, got 0.0"),
    ("bench_grad_sums", ["--tflops", "1", "--json", NOWHERE], "not a file in an existing directory"),
    ("activation_memory", ["--tokens", "0"], "--tokens must be >= 1, got 0"),
    ("activation_memory", ["--json", NOWHERE], "not a file in an existing directory"),
    ("bench_offload", ["--gib", "0"], "--gib must be a finite number > 0, got 0.0"),
    ("bench_offload", ["--gib", "nan"], "--gib must be a finite number > 0, got nan"),
    ("bench_offload", ["--reps", "0"], "--reps must be >= 1, got 0"),
    ("bench_offload", ["--json", NOWHERE], "not a file in an existing directory"),
    ("bench_sampling", ["--top-k", "5000"], "--top-k must be 0 (off) to 500, half the 1000-token vocabulary (the CPU"),
    ("bench_sampling", ["--top-k", "501"], "--top-k must be 0 (off) to 500"),  # (the TP 2 rows' half: 500 columns)
    ("bench_sampling", ["--top-p", "0"], "--top-p must be in (0, 1] (1: off), got 0.0"),
    ("bench_sampling", ["--vocab", "0"], "--vocab must be >= 1, got 0"),
    ("bench_sampling", ["--bandwidth", "1", "--json", NOWHERE], "not a file in an existing directory"),
    ("bench_compile", ["--threads", "0"], "--threads must be >= 1, got [0]"),
    ("tp_allreduce", ["--rows", "1,0"], "argument --rows: expected integers >= 1, got '1,0'"),
    ("tp_allreduce", ["--hidden", "0"], "--hidden must be >= 1, got 0"),
    ("train_overlaps", ["--timeout", "0"], "--timeout must be a finite number > 0, got 0.0"),
    ("ppo_step", ["--json", NOWHERE], "not a file in an existing directory"),
    # no abbreviations: an unknown --x took whichever flag it began (--tok for --tokens, --rep for --repeats)
    *(
        (m, [flag, "1"], f"unrecognized arguments: {flag} 1")
        for m, flag in (
            ("bench_gae", "--bat"),
            ("bench_rmsnorm_swiglu", "--tok"),
            ("bench_grad_sums", "--tfl"),
            ("activation_memory", "--tok"),
            ("bench_offload", "--gi"),
            ("bench_sampling", "--voc"),
            ("bench_compile", "--thr"),
            ("tp_allreduce", "--hid"),
            ("train_overlaps", "--time"),
            ("host_overheads", "--rep"),
            ("ppo_step", "--js"),
            ("bench_paged_attention", "--bandwidth"),
            ("bench_rope_attention", "--seq"),
            ("bench_decode_linear", "--row"),
        )
    ),  # fmt: skip
]


@pytest.mark.parametrize("module, flags, message", REFUSED, ids=[f"{m}{' '.join(['', *f])}" for m, f, _ in REFUSED])
def test_a_bench_refuses_a_value_it_cannot_run_when_parsed(module, flags, message, monkeypatch, capsys):
    """Zero, negative or non-finite peaks, zero sizes, a TP degree that does not divide the shape, a top-k above what
    the rows hold and a --json no run could write: each refused in one line naming the flag, its value and what is
    allowed, exit code 2, before anything is measured (they were ZeroDivisionErrors, a floor-divided shard, tracebacks
    from deep in a kernel, or figures lost when the run had ended)."""
    _no_measuring(monkeypatch)
    assert message in refused_line(module, flags, monkeypatch, capsys)


@pytest.mark.parametrize(
    "module, flags, first",
    [
        ("bench_sampling", ["--top-k", "0", "--top-p", "1"], "bench_device"),  # (0: off; 1: off)
        ("bench_sampling", ["--top-k", "500"], "bench_device"),
        ("bench_decode_linear", ["--tp", "2"], "bench_device"),  # (the 13B's and the tiny CPU shape's heads)
        ("bench_grad_sums", ["--model", "llama2-7b:2", "llama2-13b", "--tp", "8"], "fill_peaks"),
        ("bench_gae", ["--bandwidth", "0.5"], "fill_peaks"),
    ],
)
def test_a_bench_takes_the_values_it_can_run(module, flags, first, monkeypatch):
    """What may legitimately be 0 (top-k off) or sits at the edge of what runs passes the checks."""
    B = importlib.import_module(f"bench.{module}")
    monkeypatch.setattr(B, first, _reached)
    monkeypatch.setattr(sys, "argv", [f"{module}.py", *flags])
    with pytest.raises(_Reached):
        B.main(flags) if B.main.__code__.co_argcount else B.main()
