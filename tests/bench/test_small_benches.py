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
