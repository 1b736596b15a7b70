"""Tensor parallelism's all-reduces at a decode step's sizes: NCCL against engine/symm_reduce.py's symmetric-memory
forms (one-shot, two-shot, the switch's multicast, and the one it chooses), side by side with the floor at the bus
bandwidth a large NCCL all-reduce measures.

    torchrun --nproc_per_node 8 bench/tp_allreduce.py          # a node's GPUs (TP 8): 13B's hidden 5120 in bf16
    python bench/tp_allreduce.py                               # CPU smoke: 2 gloo processes (NCCL's column: gloo's)

A row is one decode batch (rows x hidden numbers a sum). Each figure is microseconds a sum, 80 sums in a row (a 13B
decode step's two a layer), over different inputs, captured in one CUDA graph and replayed, as the engine's decode
graphs run them; the slowest rank's. Every form is checked against NCCL's sum first (a form that differs by more than
bf16's rounding is not timed). The last columns: the best form against NCCL, and what the 80 sums cost a step with
each. ONE_SHOT_BYTES (TULU_ONE_SHOT_BYTES) is where the chosen form turns from one-shot to the others: the table says
where it should.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.common import check_flags, graph_ms, positive_ints, run_main, save_json  # noqa: E402
from engine import symm_reduce  # noqa: E402
from engine.distributed import agree, init_process_grid, print0  # noqa: E402

FORMS = ("one_shot", "two_shot", "multimem")


def _time_eager(fn, reps: int) -> float:
    """ms a call, the host's clock (gloo on the CPU)."""
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) * 1e3 / reps


def bus_bandwidth(group, device, nbytes: int, reps: int = 5) -> float:
    """GB/s of a large NCCL all-reduce's bus (nccl-tests' busbw: 2 (n - 1) / n x the bytes over the time)."""
    n = dist.get_world_size(group)
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    ms = _time_eager(lambda: dist.all_reduce(x, group=group), reps) if device.type == "cpu" else None
    if ms is None:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.all_reduce(x, group=group)
        start.record()
        for _ in range(reps):
            dist.all_reduce(x, group=group)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / reps
    (ms,) = agree([ms], "max", group, dtype=torch.float64)
    return 2 * (n - 1) / n * nbytes / (ms * 1e-3) / 1e9


def table(rows: list[dict], forms: list[str], sums: int) -> list[str]:
    """The printed table: a line per row (us a sum: NCCL, each form timed, the chosen one; the floor), with the best
    form against NCCL and what `sums` sums cost a step each way where forms were timed (each row gets its
    best_vs_nccl)."""
    cols = ["nccl", *forms, *(["chosen"] if forms else [])]
    lines = [f"{'rows':>6}{'bytes':>10}" + "".join(f"{c:>11}" for c in cols) + f"{'floor':>9}"
             + (f"{'best/NCCL':>11}{'step NCCL':>11}{'step best':>11}" if forms else "")]  # fmt: skip
    for r in rows:
        line = f"{r['rows']:>6}{r['bytes']:>10}" + "".join(f"{r.get(c + '_us', float('nan')):>11.1f}" for c in cols)
        line += f"{r['floor_us']:>9.1f}"
        if forms:
            best = min(r.get(f + "_us", float("inf")) for f in forms)
            r["best_vs_nccl"] = r["nccl_us"] / best
            line += f"{r['best_vs_nccl']:>10.2f}x{r['nccl_us'] * sums / 1e3:>9.2f}ms{best * sums / 1e3:>9.2f}ms"
        lines.append(line)
    return lines


def recommend(rows: list[dict], forms: list[str]) -> str:
    """What the table decides: the one-shot threshold (the largest size at which one-shot is the fastest form, where it
    beats the others at every size up to it) and whether the sums should leave NCCL (TULU_SYMM_ALL_REDUCE=1: the best
    form faster than NCCL at every size timed)."""
    if not forms or not rows:
        return ""
    best = lambda r: min(forms, key=lambda f: r.get(f + "_us", float("inf")))  # noqa: E731
    upto = 0
    for r in sorted(rows, key=lambda r: r["bytes"]):
        if best(r) != "one_shot":
            break
        upto = r["bytes"]
    slower = [r["rows"] for r in rows if r["nccl_us"] <= r.get(best(r) + "_us", float("inf"))]
    verdict = ("TULU_SYMM_ALL_REDUCE=1: faster than NCCL at every size" if not slower
               else f"NCCL as fast or faster at {slower} rows")  # fmt: skip
    others = [f for f in forms if f != "one_shot"]
    above = f", {others[0]} above" if others else ""
    return f"decides: TULU_ONE_SHOT_BYTES={upto} (one-shot the fastest up to it{above}); {verdict}"


def main() -> list[dict]:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--rows", type=positive_ints, default="1,2,4,8,16,32,64,128,256", help="decode batch sizes (rows a sum)"
    )
    p.add_argument("--hidden", type=int, default=5120, help="numbers a row (13B: 5120)")
    p.add_argument("--sums", type=int, default=80, help="sums a step, captured in one graph (13B: 2 x 40 layers)")
    p.add_argument("--reps", type=int, default=20, help="graph replays timed")
    p.add_argument("--nproc", type=int, default=2, help="processes, where this starts torchrun itself (CPU smoke)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    a = p.parse_args()
    check_flags(p, a, positive=("hidden", "sums", "reps", "nproc"))
    rows_list = a.rows
    if "RANK" not in os.environ:  # (not under torchrun: start it, a process a device)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
               os.path.abspath(__file__), *sys.argv[1:]]  # fmt: skip
        raise SystemExit(subprocess.call(cmd))
    grid = init_process_grid(int(os.environ["WORLD_SIZE"]))
    group = grid.tp_group
    cuda = torch.cuda.is_available() and dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    width = dtype.itemsize
    biggest = max(rows_list) * a.hidden * width
    buf = None
    if cuda:
        symm_reduce.SYMM_ALL_REDUCE = True
        buf = symm_reduce.prepare(group, device, biggest)
    forms = [f for f in FORMS if buf is not None and (f == "one_shot" or (f == "multimem") == buf.multicast)]
    if buf is not None and buf.size not in (2, 4, 8):
        forms = ["one_shot"]
    busbw = bus_bandwidth(group, device, 256 * 2**20 if cuda else 16 * 2**20)
    n = grid.tp
    out, failed = [], []
    torch.manual_seed(grid.rank)
    for rows in rows_list:
        nbytes = rows * a.hidden * width
        # different inputs for each of a step's sums (no sum reads the last one's from the L2)
        xs = [torch.randn(rows, a.hidden, device=device, dtype=dtype) for _ in range(a.sums if cuda else 1)]
        row = {"rows": rows, "bytes": nbytes, "floor_us": 2 * (n - 1) / n * nbytes / (busbw * 1e9) * 1e6}
        if cuda:
            row["nccl_us"] = graph_ms([lambda x=x: dist.all_reduce(x, group=group) for x in xs], reps=a.reps) * 1e3
        else:
            x0 = xs[0]
            row["nccl_us"] = _time_eager(lambda x0=x0: dist.all_reduce(x0, group=group), a.reps) * 1e3
        for form in [*forms, "chosen"] if forms else []:
            how = None if form == "chosen" else form
            want = xs[0].clone()
            dist.all_reduce(want, group=group)
            got = symm_reduce.all_reduce(xs[0], group, how)
            err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
            (err,) = agree([err], "max", group, dtype=torch.float64)
            if not err <= 2e-2:
                failed.append(f"{form} at {rows} rows: off by {err:.3g}")
                continue
            fns = [lambda x=x, how=how: symm_reduce.all_reduce(x, group, how) for x in xs]
            row[f"{form}_us"] = graph_ms(fns, reps=a.reps) * 1e3
        if buf is not None:
            row["chosen_form"] = symm_reduce.method(buf, nbytes)
        for k in [k for k in row if k.endswith("_us")]:
            (row[k],) = agree([row[k]], "max", group, dtype=torch.float64)
        out.append(row)
    where = f"{torch.cuda.get_device_name(device)} x {n}" if cuda else f"CPU x {n} (gloo)"
    how_timed = f"{a.sums} in a row in one CUDA graph" if cuda else "one at a time (the nccl column: gloo's)"
    print0(f"\nTP all-reduces of rows x {a.hidden} {str(dtype).split('.')[-1]}, {where}: us a sum, {how_timed}, "
           f"the slowest rank's; floor at NCCL's measured bus bandwidth {busbw:.0f} GB/s; "
           f"multicast: {'yes' if buf is not None and buf.multicast else 'no'}; one-shot up to "
           f"{symm_reduce.ONE_SHOT_BYTES} bytes")  # fmt: skip
    for line in table(out, forms, a.sums):
        print0(line)
    if not forms:
        print0("ours: torch's symmetric memory needs CUDA GPUs over NVLink (launch under torchrun on a node)")
    else:
        print0(recommend(out, forms))
    if grid.rank == 0:
        save_json(a.json, out, a, device)
    if failed:
        raise SystemExit("tp_allreduce: ours differed from NCCL: " + "; ".join(failed))
    return out


if __name__ == "__main__":
    run_main(main)
