"""Benchmark of a training step's weight grads made straight into the optimizer's fp32 sums (engine/grad_sums.py).

    python bench/bench_grad_sums.py                          # llama2-13b at TP 8 and llama2-7b at TP 1, 16384 tokens
    python bench/bench_grad_sums.py --model llama2-13b --tp 4 --tokens 8192 --json gs.json

For each projection of a layer (this rank's shard at --tp) and a micro-batch of --tokens tokens, the weight's grad
dW = dy^T x added to its fp32 sum over the step's micro-batches, three ways, side by side:
  - ours: kernels.dispatch.add_matmul_, one GEMM into the fp32 sum where the device's torch has it (fp32_out_gemm;
    the row says which ran);
  - reference: what a backward without it does (autograd's GEMM writes dW in bf16, the optimizer's hook adds it to
    the fp32 sum: engine/optim.py's fold), the peers' way too (Megatron without gradient-accumulation fusion,
    DeepSpeed's and FSDP's bf16 grads);
  - floor: the GEMM's FLOPs at the measured matmul ceiling.
Then the layer's sum and the whole model's per micro-batch, and the accuracy of each against float64 on a slice.
Without a GPU: a tiny CPU run (the reference path: the two are the same arithmetic there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import check_close, check_flags, device_name, fill_peaks, measure, tp_error, write_json  # noqa: E402
from engine.config import MODEL_SHAPES, ModelConfig  # noqa: E402
from kernels.dispatch import add_matmul_, fp32_out_gemm  # noqa: E402


def projections(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, int]]:
    """(out, in) of this rank's shard of each projection of a layer at TP degree tp."""
    q = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    h, f = cfg.hidden_size, cfg.intermediate_size
    return {
        "qkv": ((q + 2 * kv) // tp, h),
        "o": (h, q // tp),
        "gate_up": (2 * f // tp, h),
        "down": (h, f // tp),
    }


def _reference(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    acc.add_(a @ b)  # (the half grad autograd makes, then the hook's fp32 add)


def _errors(out: int, inn: int, tokens: int, device: str, dtype: torch.dtype) -> tuple[float, float]:
    """Max error relative to the largest value of ours and of the reference against float64, at out x inn over
    `tokens` rows of random grads, added to a random earlier sum."""
    gen = torch.Generator(device=device).manual_seed(0)
    dy = torch.randn(tokens, out, device=device, generator=gen).to(dtype)
    x = torch.randn(tokens, inn, device=device, generator=gen).to(dtype)
    earlier = torch.randn(out, inn, device=device, generator=gen)
    want = earlier.double() + dy.double().t() @ x.double()
    errs = []
    for fn in (add_matmul_, _reference):
        acc = earlier.clone()
        fn(acc, dy.t(), x)
        errs.append(float((acc.double() - want).abs().max() / want.abs().max()))
    return errs[0], errs[1]


def _model_tp(ap: argparse.ArgumentParser, spec: str, tp: int | None) -> tuple[str, int]:
    """(name, TP degree) of a --model NAME[:TP], or ap.error where the name is no shape or the degree cannot shard it
    (0 divided by zero; 3 of the 7B's 32 heads floor-divided the shards)."""
    name, colon, degree = spec.partition(":")
    if name not in MODEL_SHAPES:
        ap.error(f"--model {spec}: unknown model {name!r} (known: {', '.join(MODEL_SHAPES)})")
    if colon and not (degree.isdigit() and int(degree) >= 1):
        ap.error(f"--model {spec}: the TP degree after ':' must be an integer >= 1, got {degree!r}")
    tp = int(degree) if colon else tp or 1
    if why := tp_error(name, tp):
        ap.error(f"--model {spec}: {why}")
    return name, tp


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", nargs="+", default=["llama2-13b:8", "llama2-7b:1"],
                    help="shapes as NAME:TP (default: the recipe's 13B at TP 8 and a 7B on one GPU)")  # fmt: skip
    ap.add_argument("--tp", type=int, default=None, help="one TP degree for every --model given without one")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens of a micro-batch (bench/ppo_step.py's)")
    ap.add_argument("--tflops", type=float, default=None, help="matmul TFLOP/s for the floor (default: measured)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = ap.parse_args(argv)
    check_flags(ap, args, positive=("tp", "tokens"), positive_numbers=("tflops",))
    models = [_model_tp(ap, spec, args.tp) for spec in args.model]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    tokens = args.tokens
    if device == "cpu":
        tokens = min(tokens, 64)
        print("no CUDA device: tiny CPU run (the reference path: the same arithmetic both ways); GPU figures need one.")
    fill_peaks(args, device, tflops="tflops")
    fused = fp32_out_gemm(torch.device(device))
    print(f"{device_name(device)}, torch {torch.__version__}: fp32-out GEMM into the sum: {'yes' if fused else 'no'}")
    rows = []
    for name, tp in models:
        cfg = ModelConfig.named(name)
        shapes = projections(cfg, tp)
        if device == "cpu":
            shapes = {k: (max(1, o // 64), max(1, i // 64)) for k, (o, i) in shapes.items()}
        totals = {"ours": 0.0, "reference": 0.0, "floor": 0.0}
        for proj, (out, inn) in shapes.items():
            err_ours, err_ref = _errors(out, inn, min(tokens, 1024), device, dtype)
            check_close(f"{name} tp {tp} {proj} weight grad into its sum", err_ours, dtype)
            dy = torch.randn(tokens, out, device=device, dtype=dtype)
            x = torch.randn(tokens, inn, device=device, dtype=dtype)
            acc = torch.zeros(out, inn, device=device)
            floor = 2 * tokens * out * inn / (args.tflops * 1e12) * 1e3
            found, dy_t = {}, dy.t()
            for impl, fn in (("ours", add_matmul_), ("reference", _reference)):
                ms, extra = measure(lambda fn=fn, acc=acc, a=dy_t, b=x: fn(acc, a, b), device)
                found[impl] = ms
                rows.append(dict(model=name, tp=tp, tokens=tokens, proj=proj, shape=f"{out}x{inn}", impl=impl, ms=ms,
                                 extra_gib=extra / 2**30, err=err_ours if impl == "ours" else err_ref))  # fmt: skip
            rows.append(dict(model=name, tp=tp, tokens=tokens, proj=proj, shape=f"{out}x{inn}", impl="floor", ms=floor,
                             extra_gib=0.0, err=None))  # fmt: skip
            for k, v in (*found.items(), ("floor", floor)):
                totals[k] += v
        per_model = {k: v * cfg.num_layers for k, v in totals.items()}
        for impl, ms in per_model.items():
            rows.append(dict(model=name, tp=tp, tokens=tokens, proj=f"all {cfg.num_layers} layers", shape="",
                             impl=impl, ms=ms, extra_gib=None, err=None))  # fmt: skip
    print(f"\nweight grads into fp32 sums, bf16, {tokens} tokens a micro-batch")
    print(f"{'model':<12} {'tp':>3} {'proj':<14} {'shape':<12} {'impl':<10} {'ms':>9} {'extra GiB':>10} {'err':>9}")
    for r in rows:
        extra = "" if r["extra_gib"] is None or r["extra_gib"] != r["extra_gib"] else f"{r['extra_gib']:.3f}"
        err = "" if r["err"] is None else f"{r['err']:.1e}"
        print(f"{r['model']:<12} {r['tp']:>3} {r['proj']:<14} {r['shape']:<12} {r['impl']:<10} {r['ms']:>9.3f} "
              f"{extra:>10} {err:>9}")  # fmt: skip
    write_json(args.json, {"meta": {"device": device_name(device), "torch": torch.__version__, "fp32_out_gemm": fused,
                                    "tflops": args.tflops, "tokens": tokens}, "rows": rows})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
