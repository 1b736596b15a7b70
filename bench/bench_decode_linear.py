"""Benchmark the decode step's projections: kernels.decode_linear (split-K in one launch, SwiGLU fused into gate_up)
against cuBLAS (F.linear, plus kernels/swiglu.py after gate_up: what the engine runs by default) and the copy floor.

    python bench/bench_decode_linear.py                          # Llama-2-13B, batch 1, 8 and 64, bf16, on CUDA
    python bench/bench_decode_linear.py --rows 64 --sweep        # every launch variant at batch 64
    python bench/bench_decode_linear.py --model llama2-7b --tp 2 --json linear.json

Each projection of one layer (QKV, QKV with the rotary and the KV-cache write in its epilogue against cuBLAS and the
rotary kernel, the output projection, gate_up with SwiGLU, the down projection, and the LM head),
this rank's shard under --tp, at each row count: ours checked against cuBLAS first, then both timed as CUDA graph
replays (the GPU's own time, as inside the engine's decode graphs) over weight copies totalling at least 4x the L2
(bench.common.l2_copies: at most 64 copies, so a weight under 4 MiB, a toy shape's, totals less; in memory never more
than 4x the L2 plus one weight), so no call reads the last one's weight from cache. The floor: the weight's bytes
(plus x and y) at the measured copy bandwidth.
Without a CUDA device: a tiny CPU run (the interpreter; figures are not performance figures).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    add_elementwise_args,
    bench_device,
    check_close,
    check_flags,
    device_name,
    graph_ms,
    l2_copies,
    measure,
    save_json,
    tp_error,
)
from engine.config import MODEL_SHAPES, ModelConfig  # noqa: E402
from kernels.decode_linear import RowSquares, decode_linear, qkv_rope_linear  # noqa: E402
from kernels.dispatch import compile_ahead  # noqa: E402
from kernels.paged_attention import rope_write_kv  # noqa: E402
from kernels.rmsnorm import rms_norm  # noqa: E402
from kernels.swiglu import swiglu  # noqa: E402

# --sweep's variants: tiles, warps and stages at the default split, then split counts at the default tiles
_SWEEP_TILES = [dict(block_n=n, block_k=k, num_warps=4, num_stages=s) for n, k, s in
                itertools.product((32, 64, 128), (64, 128, 256), (3, 4))]  # fmt: skip
_SWEEP_SPLITS = [dict(split_k=s) for s in (1, 2, 4, 8)]
# and 128-wide column blocks split in two (as many programs as the default's 64-wide blocks at 64 rows): the norm
# prologue's launch is built without serialised warpgroup MMAs there (ptxas C7515 at 64-wide blocks: RESULTS.md)
_SWEEP_SPLITS += [dict(block_n=128, split_k=2, num_stages=s) for s in (3, 4)]


def projections(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, int, str]]:
    """name -> (weight rows N, depth K, epilogue) of this rank's shard: column-parallel layers split N, row-parallel K.
    The QKV projection twice: plain (a prompt's), and with the rotary and the KV-cache write (a decode step's)."""
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d // tp
    return {
        "qkv": (qkv, h, "plain"),
        "qkv+rope": (qkv, h, "rope"),
        "o": (h, cfg.num_heads * d // tp, "plain"),
        "gate_up+swiglu": (2 * cfg.intermediate_size // tp, h, "swiglu"),
        # (the decode step's own gate_up launch: the post-attention norm in its prologue, from the row sums the output
        # projection's epilogue left; at 64 rows ptxas serialises its warpgroup MMAs (C7515, bench/RESULTS.md))
        "gate_up+norm": (2 * cfg.intermediate_size // tp, h, "norm_swiglu"),
        "down": (h, cfg.intermediate_size // tp, "plain"),
        "lm_head": (-(-cfg.vocab_size // tp), h, "plain"),
    }


def _calls(m, n, k, kind, dtype, device, heads, config):
    """(ours, cuBLAS's, output elements) on fresh inputs; the cuBLAS side is what the engine runs without the switch
    (the projection, then kernels/swiglu.py or the rotary/cache-write kernel)."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    if kind == "norm_swiglu":  # (the stream x, its rows' sums of squares as one part, the norm's weight)
        gamma = 1 + 0.1 * torch.randn(k, device=device, dtype=dtype)
        squares = RowSquares(x.float().pow(2).sum(-1)[None].contiguous())
        ours = lambda: decode_linear(x, w, swiglu=True, norm=(squares, gamma, 1e-5), config=config)[0]  # noqa: E731
        return ours, lambda: swiglu(F.linear(rms_norm(x, gamma, 1e-5), w)), m * n // 2
    if kind != "rope":
        sw = kind == "swiglu"
        peer = (lambda: swiglu(F.linear(x, w))) if sw else (lambda: F.linear(x, w))
        return lambda: decode_linear(x, w, swiglu=sw, config=config), peer, m * (n // 2 if sw else n)
    hq, hkv, d = heads
    kc = torch.zeros(-(-m // 16), 16, hkv, d, device=device, dtype=dtype)
    vc, slots = torch.zeros_like(kc), torch.arange(m, device=device)
    pos = torch.randint(0, 4096, (m,), device=device)

    def peer():
        q, kk, v = F.linear(x, w).split([hq * d, hkv * d, hkv * d], -1)
        return rope_write_kv(q.view(m, hq, d), kk.view(m, hkv, d), v.view(m, hkv, d), pos, kc, vc, slots)

    return lambda: qkv_rope_linear(x, w, pos, kc, vc, slots, num_heads=hq, config=config), peer, m * n


def _time(fns, device) -> float:
    if torch.device(device).type == "cuda":
        return graph_ms(fns)
    return measure(fns[0], device)[0]


def _bench_one(name, m, n, k, kind, dtype, device, bw, copies, heads, config=None) -> dict:
    calls = [_calls(m, n, k, kind, dtype, device, heads, config) for _ in range(copies)]
    ours, ref = calls[0][0](), calls[0][1]()
    err = ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
    check_close(f"{name} rows {m} {config or ''}", err, dtype, tol=2e-2 if dtype != torch.float32 else 1e-4)
    elem = dtype.itemsize
    moved = (n * k + m * k + calls[0][2]) * elem
    row = dict(proj=name, rows=m, n=n, k=k, weight_mb=n * k * elem / 1e6, floor_ms=moved / (bw * 1e9), rel_err=err)
    if config:
        row["config"] = config
    row["ours_ms"] = _time([c[0] for c in calls], device)
    if not config:
        row["cublas_ms"] = _time([c[1] for c in calls], device)
    return row


def _copies(n, k, elem, device) -> int:
    """Weight copies the graph timing rotates over (4x the L2 in all: bench.common.l2_copies); one on a CPU."""
    return l2_copies(n * k * elem) if torch.device(device).type == "cuda" else 1


def _print(rows) -> None:
    print(f"{'proj':<15} {'rows':>4} {'N':>6} {'K':>6} {'MB':>7} {'floor ms':>9} {'cuBLAS ms':>9} {'%':>5} "
          f"{'ours ms':>9} {'%':>5} {'ours/cuBLAS':>11}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['proj']:<15} {r['rows']:>4} {r['error']}")
            continue
        cb = r.get("cublas_ms", float("nan"))
        line = f"{r['proj']:<15} {r['rows']:>4} {r['n']:>6} {r['k']:>6} {r['weight_mb']:>7.1f} {r['floor_ms']:>9.4f} "
        ours, floor = r["ours_ms"], r["floor_ms"]
        line += f"{cb:>9.4f} {100 * floor / cb:>5.1f} {ours:>9.4f} {100 * floor / ours:>5.1f}"
        line += f" {r['ours_ms'] / cb:>11.3f}"
        print(line + (f"  {r['config']}" if "config" in r else ""), flush=True)


def run(args, device) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    cfg = ModelConfig.named(args.model)
    rows, deadline = [], time.monotonic() + args.budget_s
    heads = (cfg.num_heads // args.tp, cfg.num_kv_heads // args.tp, cfg.head_dim)
    for name, (n, k, kind) in projections(cfg, args.tp).items():
        if args.proj and name not in args.proj:
            continue
        copies = _copies(n, k, dtype.itemsize, device)
        for m in args.rows:
            swept = args.sweep and kind != "rope"  # (its column block is a head)
            variants = [None] + ((_SWEEP_TILES + _SWEEP_SPLITS) if swept else [])
            if swept:  # (all at once: one after another, a cold sweep was compile-bound; each call's inputs freed
                # after it; the calls made before the loop goes on)
                ahead = [lambda c=c: _calls(m, n, k, kind, dtype, device, heads, c)[0]() for c in variants]  # noqa: B023
                compile_ahead(ahead)
            for config in variants:
                if time.monotonic() > deadline:
                    print(f"stopped at the --budget-s deadline ({args.budget_s} s): {name} rows {m} {config or ''}")
                    return rows
                try:
                    rows.append(_bench_one(name, m, n, k, kind, dtype, device, args.bandwidth, copies, heads, config))
                except Exception as e:  # noqa: BLE001 - one variant failing (resources) is reported, not fatal
                    if config is None:
                        raise
                    rows.append(dict(proj=name, rows=m, config=config, error=f"{type(e).__name__}: {str(e)[:90]}"))
                _print(rows[-1:])
                save_json(args.json, rows, args, device)
            if swept:
                timed = [r for r in rows if r["proj"] == name and r["rows"] == m and "ours_ms" in r]
                best = min(timed, key=lambda r: r["ours_ms"])
                print(f"fastest {name} rows {m}: {best['ours_ms']:.4f} ms {best.get('config', 'default')}")
            torch.cuda.empty_cache() if device == "cuda" else None
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="llama2-13b", choices=list(MODEL_SHAPES), help="a named shape")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: time one rank's shards")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64], help="decode batch sizes (at most 64)")
    ap.add_argument("--proj", nargs="+", choices=["qkv", "qkv+rope", "o", "gate_up+swiglu", "gate_up+norm", "down",
                                                   "lm_head"],
                    help="only these")  # fmt: skip
    ap.add_argument("--sweep", action="store_true", help="also time every launch variant (tiles, stages, splits)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new rows after this many seconds")
    add_elementwise_args(ap)
    args = ap.parse_args(argv)
    check_flags(ap, args, positive=("tp",), positive_numbers=("bandwidth", "budget_s"))
    if any(not 1 <= m <= 64 for m in args.rows):
        ap.error(f"--rows must be 1 to 64 (a decode batch), got {args.rows}")
    if why := tp_error(args.model, args.tp):
        ap.error(why)
    if not torch.cuda.is_available() and (why := tp_error("tiny", args.tp)):
        ap.error(f"{why}: without a CUDA device the tiny shape is run")
    device = bench_device(args, model="tiny", rows=[1, 4], dtype="float32")
    print(f"device: {device_name(device)}, torch {torch.__version__}, {args.model} tp {args.tp}, {args.dtype}, "
          f"copy bandwidth {args.bandwidth} TB/s; graph replays on CUDA")  # fmt: skip
    rows = run(args, device)
    print("all rows:")
    _print(rows)
    save_json(args.json, rows, args, device)  # (a sweep variant the GPU cannot launch is listed; ours at the default
    return rows  # raises, and a wrong result stops the bench before timing: check_close)


if __name__ == "__main__":
    main()
