"""A cold start's autotuning: the attention's and the log-probs' kernels tuned from an empty Triton cache, their
candidates compiled one after another (Triton's tuner) against all at once (kernels.dispatch.autotune, COMPILE_THREADS
threads), each case in a fresh subprocess with its own empty cache. What a fresh GPU machine or a training run's first
step spends before its first timed step.

    python bench/bench_compile.py                     # both cases, 1 thread against the machine's default
    python bench/bench_compile.py --threads 1 4 16    # any thread counts
    python bench/bench_compile.py --json out.json

On a GPU: the real launches (the tuner times each candidate). Without one: an sm_90 GPU stood in for
(bench.common.OfflineDriver): the same specialisations and compiles with the bundled ptxas, launches that do nothing,
so the figures are the compiler's alone. The attention case: the forward and the backward of a packed batch (2 x 512
tokens, 8 query heads in groups of 2, D = 128, bf16); the log-probs case: forward with entropy and backward over 32000
logits a row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("attention", "logprob")


def _child(case: str, threads: int) -> dict:
    """Run `case` once in this (fresh) process: its compiles and seconds."""
    import torch
    import triton

    from bench.common import OfflineDriver
    from kernels import dispatch

    dispatch.COMPILE_THREADS = threads
    gpu = torch.cuda.is_available()
    if not gpu:
        triton.runtime.driver.set_active(OfflineDriver())
    device = torch.device("cuda" if gpu else "cpu")
    compiles = []
    triton.knobs.runtime.jit_post_compile_hook = lambda *args, **kwargs: compiles.append(1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    start = time.perf_counter()
    if case == "attention":
        from kernels.rope_attention import _rope_attention_fwd
        from kernels.rope_attention_bwd import _rope_attention_bwd

        n, hq, hkv, d = 1024, 8, 4, 128
        q, k, v = (torch.randn(n, h, d, generator=gen).to(device, torch.bfloat16) for h in (hq, hkv, hkv))
        cu = torch.tensor([0, 512, 1024], dtype=torch.int32, device=device)
        positions = torch.cat([torch.arange(512), torch.arange(512)]).to(device)
        out, lse, q_rot, k_rot = _rope_attention_fwd(
            q, k, v, positions, cu, 10000.0, d**-0.5, None, None, save_rotated=True
        )
        _rope_attention_bwd(torch.randn_like(out), q_rot, k_rot, v, out, lse, positions, cu, 10000.0, d**-0.5)
    else:
        from kernels.logprob import logprob_backward, logprob_forward

        rows, vocab = 64, 32000
        x = torch.randn(1, rows, vocab, generator=gen).to(device, torch.bfloat16)
        targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
        norm, logp, ent = logprob_forward(x, targets, 1.0, True)
        logprob_backward(x, targets, norm, ent, torch.ones_like(logp), torch.ones_like(ent), 1.0)
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"case": case, "threads": threads, "compiles": len(compiles), "seconds": seconds, "gpu": gpu}


def run(case: str, threads: int) -> dict:
    """_child in a subprocess with an empty Triton cache of its own (and no TRITON_INTERPRET)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=cache, PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--threads", str(threads)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} with {threads} threads failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from kernels import dispatch

    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--threads", nargs="+", type=int, default=sorted({1, max(2, dispatch.COMPILE_THREADS)}))
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from bench.common import check_flags

    check_flags(p, args, positive=("threads",))
    if args.child:
        print(json.dumps(_child(args.child, args.threads[0])))
        return
    rows = []
    print(f"{'case':10s} {'threads':>7s} {'compiles':>8s} {'seconds':>8s} {'vs 1 thread':>11s}  (cold Triton cache)")
    for case in args.cases:
        base = None
        for threads in args.threads:
            row = run(case, threads)
            base = row["seconds"] if threads == 1 else base
            speedup = f"{base / row['seconds']:.2f}x" if base else "-"
            where = "GPU" if row["gpu"] else "sm_90 compiles, no GPU"
            print(f"{case:10s} {threads:7d} {row['compiles']:8d} {row['seconds']:8.1f} {speedup:>11s}  ({where})")
            rows.append(row)
    if args.json:
        from bench.common import write_json

        write_json(args.json, {"rows": rows, "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
