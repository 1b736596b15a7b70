"""kernels.dispatch.autotune compiles a new key's candidates in parallel before the timing loop, which then finds each
in the JIT's cache; kernels.dispatch.compile_ahead compiles whatever a list of calls would launch, in parallel, before
they run. Checked without a GPU: a subprocess without TRITON_INTERPRET stands a driver in for the device
(bench.common.OfflineDriver: an sm_90 target, launches that do nothing), so the real JIT specialises, caches and
compiles with the bundled ptxas, and the tuner's timing loop launches through the same cache lookups as on a GPU."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    '''
    import sys, threading

    import torch
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from bench.common import OfflineDriver
    from kernels import dispatch, logprob

    THREADS = int(sys.argv[1])
    dispatch.COMPILE_THREADS = THREADS
    driver, launches = OfflineDriver(), []  # (an sm_90 GPU stood in for, its launches counted)
    driver.launcher_cls = lambda src, metadata: lambda *args: launches.append(1)
    triton.runtime.driver.set_active(driver)


    def record(kernel):
        """Each compile of a kernel (or an autotuned kernel's): the thread it ran on."""
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        fn.device_caches[0]  # (the binder, with the compile function it calls)
        inner, seen = fn.compile, []

        def compile(*args, **kwargs):
            seen.append(threading.current_thread().name)
            return inner(*args, **kwargs)

        fn.compile = compile
        return seen


    def block_hook(nargs):  # (as the attention's: the descriptor's block follows the tile, part of the specialisation)
        nargs["in_desc"].block_shape = [nargs["BLOCK"], 16]


    @dispatch.autotune(
        [triton.Config({"BLOCK": b}, num_warps=4, pre_hook=block_hook) for b in (16, 32, 64)], key=["n_rows"]
    )
    @triton.jit
    def copy_tiles(in_desc, out_ptr, n_rows, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tile = in_desc.load([tl.program_id(0) * BLOCK, 0])
        tl.store(out_ptr + rows[:, None] * 16 + tl.arange(0, 16)[None, :], tile, mask=(rows < n_rows)[:, None])


    def report(name, seen, expect):
        pool = sum(t.startswith("triton-compile") for t in seen)
        print(f"{name} compiles={len(seen)} pool={pool} expect={expect}")


    x = torch.zeros(256, 16, dtype=torch.bfloat16)
    desc = TensorDescriptor.from_tensor(x, [16, 16])
    seen = record(copy_tiles)
    copy_tiles[(4,)](desc, torch.empty_like(x), 256)
    report("tiles", seen, 3)
    copy_tiles[(4,)](desc, torch.empty_like(x), 256)  # (the key tuned: no compile)
    report("tiles again", seen, 3)

    V, rows = 32000, 4
    logits = torch.zeros(rows, V, dtype=torch.bfloat16)
    tgt = torch.zeros(rows, dtype=torch.int64)
    norm, logp, ent = torch.empty(rows, 2), torch.empty(rows), torch.empty(rows)
    tuner = logprob._fwd_tuned
    seen = record(tuner)
    tuner[(rows,)](logits, 0, V, 1, tgt, norm, logp, ent, norm, V, 0, 1.0, rows, HAS_ENT=True, FINALIZE=True)
    report("logprob", seen, len(logprob._prune_configs(tuner.configs, {"V": V})))

    # compile_ahead: a sweep's variants (plain launches at three tiles, and an autotuned launch) compiled at once
    @triton.jit
    def fill(out_ptr, BLOCK: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, BLOCK), tl.full([BLOCK], 1.0, tl.float32))


    @triton.jit
    def fill_other(out_ptr, BLOCK: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, BLOCK), tl.full([BLOCK], 2.0, tl.float32))


    def another_thread():  # (its launch runs as always: compile_ahead holds back its own thread's alone)
        t = threading.Thread(target=lambda: fill_other[(1,)](out, BLOCK=64))
        t.start()
        t.join()


    out = torch.zeros(64)
    tuner = logprob._bwd_tuned
    seen, seen_bwd = record(fill), record(tuner)
    grad = torch.empty(rows, V, dtype=torch.bfloat16)
    fns = [lambda b=b: fill[(1,)](out, BLOCK=b) for b in (16, 32, 64)]
    fns.append(lambda: logprob.logprob_backward(logits, tgt, norm, ent, logp, logp, 1.0, out=grad))
    fns.append(another_thread)
    launches.clear()
    dispatch.compile_ahead(fns)
    n_bwd = len(logprob._prune_configs(tuner.configs, {"V": V}))
    ahead = THREADS > 1
    report("ahead fill", seen, 3 if ahead else 0)
    report("ahead bwd", seen_bwd, n_bwd if ahead else 0)
    # (nothing tuned: its timings would be of no launch; nothing launched but the other thread's kernel, with threads)
    print(f"ahead tuned={len(tuner.cache)} launched={len(launches)}")
    for fn in fns:
        fn()
    report("fill", seen, 3)
    report("bwd", seen_bwd, n_bwd)
    '''
)


@pytest.mark.cpu_only  # (on a GPU the kernel tests autotune for real)
@pytest.mark.parametrize("threads", [2, 1])
def test_autotune_compiles_the_candidates_in_parallel_before_timing_them(tmp_path, threads):
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = tmp_path / "tune.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # (cold: every candidate compiles)
    proc = subprocess.run(
        [sys.executable, str(script), str(threads)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = dict(line.split(" compiles=") for line in proc.stdout.splitlines() if " compiles=" in line)
    names = {"tiles", "tiles again", "logprob", "ahead fill", "ahead bwd", "fill", "bwd"}
    assert set(lines) == names and f"ahead tuned=0 launched={int(threads > 1)}" in proc.stdout, proc.stdout
    for name, fields in lines.items():
        compiles, pool, expect = (int(f.split("=")[1]) if "=" in f else int(f) for f in fields.split())
        # each candidate compiled once (a second compile: the timing loop's specialisation differed from the warm-up's,
        # e.g. a config's descriptor block not applied first), all by the pool with threads, none by it without;
        # compile_ahead's variants compiled by the pool, none again by their real calls
        assert compiles == expect and (expect > 1 or name.startswith("ahead")), (name, fields)
        assert pool == (compiles if threads > 1 else 0), (name, fields)


@pytest.mark.cpu_only
def test_compile_bench_runs_each_case_cold_in_a_subprocess(tmp_path):
    """bench/bench_compile.py: each (case, threads) in a fresh process with an empty cache, every compile counted."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from bench.bench_compile import main

    main(["--cases", "logprob", "--threads", "1", "2", "--json", str(tmp_path / "c.json")])
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    # the forward with entropy and the backward, every candidate of each (Triton's tuner prunes to 7 at 32000 logits)
    assert [(r["threads"], r["compiles"], r["gpu"]) for r in rows] == [(1, 14, False), (2, 14, False)], rows


def test_compile_threads_share_the_cores_with_the_processes_beside(monkeypatch):
    """The cores a process may use (compile threads, and the tests' torch threads: tests/conftest.py) are the machine's
    divided among the processes started beside it."""
    from kernels import dispatch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert dispatch.cores_of_this_process() == cores
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert dispatch.cores_of_this_process() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # (more ranks than cores: one thread each)
    assert dispatch.cores_of_this_process() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(cores))  # (as many test workers as cores)
    assert dispatch.cores_of_this_process() == 1
