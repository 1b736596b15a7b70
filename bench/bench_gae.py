"""Benchmark kernels.gae.gae against the reversed Python loop of the peers and the bandwidth floor.

    python bench/bench_gae.py                       # 64 x 1024 on CUDA; a tiny CPU run without one
    python bench/bench_gae.py --batch 512 --seq 2048 --compile --json gae.json

Rows: ours (one Triton launch); the masked reference loop (kernels.reference.gae, what the CPU path
runs); the peers' loop as OpenRLHF writes it (mask multiplied in, one step per token, on the GPU
tensors); optionally that loop under torch.compile (--compile; compiling an unrolled T-step loop
takes a while); Liger-Kernel has no GAE op. The floor is bytes read + written / bandwidth.
Inputs are a realistic batch: left-padded prompts, then responses of different lengths, then padding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import check_close, check_flags, fill_peaks, measure, write_json  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.gae import gae  # noqa: E402


def make_batch(batch: int, seq: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, max(seq // 4, 1), (batch,), generator=gen)
    length = torch.randint(1, seq + 1, (batch,), generator=gen)
    length = torch.minimum(length, seq - prompt)
    pos = torch.arange(seq)[None, :]
    mask = (pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])
    rewards = torch.randn(batch, seq, generator=gen) * 0.1
    values = torch.randn(batch, seq, generator=gen)
    return rewards.to(device), values.to(device), mask.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=64, help="rows B (default 64)")
    ap.add_argument("--seq", type=int, default=1024, help="time steps T (default 1024)")
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=0.95)
    ap.add_argument("--bandwidth", type=float, default=None, help="TB/s for the floor (default: measured)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the peers' loop")
    ap.add_argument("--reps", type=int, default=20, help="repetitions on CPU (CUDA uses do_bench)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = ap.parse_args()
    check_flags(ap, args, positive=("batch", "seq", "reps"), positive_numbers=("bandwidth",))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, seq = args.batch, args.seq
    if device == "cpu":
        batch, seq = min(batch, 4), min(seq, 64)
        print(f"no CUDA device: tiny CPU run at {batch} x {seq}; GPU figures need a CUDA device.")
    fill_peaks(args, device, bandwidth="bandwidth")
    rewards, values, mask = make_batch(batch, seq, device)
    g, lam = args.gamma, args.lam

    candidates = {
        "reference loop (masked, eager)": lambda: reference.gae(rewards, values, mask, g, lam),
        "peer loop (OpenRLHF/TRL, eager)": lambda: reference.peer_gae_loop(rewards, values, g, lam, mask),
    }
    if device == "cuda":
        candidates = {"ours (Triton, 1 launch)": lambda: gae(rewards, values, mask, g, lam), **candidates}
    compile_s = None
    if args.compile:
        compiled = torch.compile(reference.peer_gae_loop, dynamic=False)
        start = time.perf_counter()
        compiled(rewards, values, g, lam, mask)
        compile_s = time.perf_counter() - start
        candidates["peer loop, torch.compile"] = lambda: compiled(rewards, values, g, lam, mask)

    # Sanity before timing: ours must agree with the float64 oracle.
    want_adv, _ = reference.gae(rewards.double(), values.double(), mask, g, lam)
    got_adv, _ = gae(rewards, values, mask, g, lam)
    max_err = (got_adv.double() - want_adv).abs().max().item()
    check_close("gae advantages", max_err / want_adv.abs().max().item(), torch.float32)

    n = batch * seq
    bytes_moved = n * (rewards.element_size() + values.element_size() + mask.element_size() + 2 * 4)
    floor_ms = bytes_moved / (args.bandwidth * 1e12) * 1e3

    rows = []
    for name, fn in candidates.items():
        ms, extra = measure(fn, device, min_reps=args.reps)
        rows.append({"name": name, "ms": ms, "extra_peak_mib": None if extra != extra else extra / 2**20})
    rows.append({"name": f"bandwidth floor ({args.bandwidth:g} TB/s)", "ms": floor_ms, "extra_peak_mib": None})
    rows.append({"name": "Liger-Kernel", "ms": None, "extra_peak_mib": None, "note": "no GAE op"})

    print(f"\nGAE  B={batch} T={seq} gamma={g} lam={lam} device={device}  ({bytes_moved / 1e6:.2f} MB moved)")
    if compile_s is not None:
        print(f"torch.compile of the loop took {compile_s:.1f} s")
    path = "Triton kernel" if device == "cuda" else "CPU path"
    print(f"gae() ({path}) vs float64 oracle: max |err| = {max_err:.2e}")
    print(f"{'':36s} {'ms':>10s} {'x floor':>9s} {'extra MiB':>10s}")
    for row in rows:
        ms = "n/a" if row["ms"] is None else f"{row['ms']:.4g}"
        ratio = "" if row["ms"] is None else f"{row['ms'] / floor_ms:.1f}"
        mem = "" if row["extra_peak_mib"] is None else f"{row['extra_peak_mib']:.2f}"
        print(f"{row['name']:36s} {ms:>10s} {ratio:>9s} {mem:>10s}  {row.get('note', '')}")

    if args.json:
        meta = {
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__,
            "batch": batch,
            "seq": seq,
            "gamma": g,
            "lam": lam,
            "bytes": bytes_moved,
            "compile_s": compile_s,
            "max_abs_err": max_err,
        }
        write_json(args.json, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
