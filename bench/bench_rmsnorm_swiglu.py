"""Benchmark kernels.rmsnorm and kernels.swiglu against eager PyTorch (HF's layers), torch.compile, Liger-Kernel
(when importable) and the bandwidth floor, forward and forward+backward.

    python bench/bench_rmsnorm_swiglu.py                      # 8192 tokens, Llama-2-13B widths, bf16, on CUDA
    python bench/bench_rmsnorm_swiglu.py --tokens 16384 --hidden 4096 --intermediate 11008 --json norm.json

Shapes: RMSNorm on [tokens, hidden]; the residual add fused into it (Add+RMSNorm: h = x + delta, rms_norm(h), what
each decoder layer does twice); SwiGLU on the fused gate_up [tokens, 2 * intermediate] (13B with TP=1: hidden
5120, intermediate 13824). The floor is the bytes the op must move at --bandwidth: RMSNorm reads x and writes y
forward, reads x and dy and writes dx backward; Add+RMSNorm reads x and delta and writes h and y forward, reads
h, dy and dh and writes one gradient backward; SwiGLU reads gate and up and writes y forward, reads gate, up and
dy and writes both halves of the gradient backward. Without a CUDA device: a tiny CPU run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    add_elementwise_args,
    bench_device,
    check_close,
    check_flags,
    device_name,
    exit_if_ours_failed,
    measure,
    save_json,
)
from kernels import reference  # noqa: E402
from kernels.rmsnorm import add_rms_norm, rms_norm  # noqa: E402
from kernels.swiglu import swiglu  # noqa: E402


def _rows(args, device):
    """op name -> (inputs maker, {impl: fn}, floor bytes forward, floor bytes forward+backward)."""
    t, h, i, dt = args.tokens, args.hidden, args.intermediate, getattr(torch, args.dtype)
    eps = 1e-5
    elem = torch.empty((), dtype=dt).element_size()
    norm_impls = {"ours": lambda x, w: rms_norm(x, w, eps), "eager (HF)": lambda x, w: reference.rms_norm(x, w, eps)}
    add_impls = {
        "ours": lambda x, d, w: add_rms_norm(x, d, w, eps),
        "eager (HF)": lambda x, d, w: reference.add_rms_norm(x, d, w, eps),
    }
    act_impls = {"ours": swiglu, "eager (HF)": reference.swiglu}
    if device == "cuda":
        norm_impls["torch.compile"] = torch.compile(lambda x, w: reference.rms_norm(x, w, eps))
        add_impls["torch.compile"] = torch.compile(lambda x, d, w: reference.add_rms_norm(x, d, w, eps))
        act_impls["torch.compile"] = torch.compile(reference.swiglu)
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            norm_impls["Liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, eps)
            # HF + Liger hands it gate_proj's and up_proj's outputs, each contiguous (given the halves of one tensor,
            # Liger copies both on every call): split before timing, as _time_impl does for a (fn, prepare) pair
            halves = lambda gu: tuple(x.contiguous() for x in gu.chunk(2, dim=-1))
            act_impls["Liger"] = (LigerSiLUMulFunction.apply, halves)
        except Exception:  # noqa: BLE001 - Liger is optional
            pass
    norm_inputs = lambda: (
        torch.randn(t, h, device=device, dtype=dt),
        1 + 0.1 * torch.randn(h, device=device, dtype=dt),
    )
    add_inputs = lambda: (torch.randn(t, h, device=device, dtype=dt), *norm_inputs())
    act_inputs = lambda: (2 * torch.randn(t, 2 * i, device=device, dtype=dt),)
    return {
        f"RMSNorm {t}x{h}": (norm_inputs, norm_impls, 2 * t * h * elem, 5 * t * h * elem),
        f"Add+RMSNorm {t}x{h}": (add_inputs, add_impls, 4 * t * h * elem, 8 * t * h * elem),
        f"SwiGLU {t}x2x{i}": (act_inputs, act_impls, 3 * t * i * elem, 8 * t * i * elem),
    }


def _outputs(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def check(op: str, fn, inputs, dy: tuple) -> None:
    """Before timing: ours against the eager layer in float64 (outputs and every input's gradient)."""
    ref = {
        "RMSNorm": lambda x, w: reference.rms_norm(x, w, 1e-5),
        "Add+RMSNorm": lambda x, d, w: reference.add_rms_norm(x, d, w, 1e-5),
        "SwiGLU": reference.swiglu,
    }[op.split()[0]]
    outs = []
    for f, cast in ((fn, lambda t: t), (ref, lambda t: t.double())):
        leaves = [cast(x.detach()).requires_grad_() for x in inputs]
        out = _outputs(f(*leaves))
        outs.append([*out, *torch.autograd.grad(out, leaves, [cast(g) for g in dy])])
    errs = [((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(*outs)]
    shown = " ".join(f"{e:.1e}" for e in errs)
    print(f"{op}: max error relative to the largest value, outputs then gradients: {shown}")
    check_close(op, max(errs), inputs[0].dtype)


def _time_impl(op: str, name: str, fn, inputs, dy, device) -> dict:
    """Forward and forward+backward time (and extra peak memory) of fn(*inputs); fn may be a pair (fn, prepare):
    fn(*prepare(*inputs)), the inputs laid out as that peer takes them, before any timing."""
    if isinstance(fn, tuple):
        fn, prepare = fn
        inputs = prepare(*inputs)
    leaves = [x.detach().requires_grad_() for x in inputs]

    def step():
        torch.autograd.grad(_outputs(fn(*leaves)), leaves, dy)

    try:
        fwd_ms, fwd_mem = measure(lambda: fn(*inputs), device)
        fb_ms, fb_mem = measure(step, device)
    except Exception as e:  # noqa: BLE001 - a peer failing on this device is reported
        return dict(op=op, impl=name, error=f"{type(e).__name__}: {str(e)[:80]}")
    return dict(op=op, impl=name, fwd_ms=fwd_ms, fwdbwd_ms=fb_ms, fwd_extra_gib=fwd_mem / 2**30,
                fwdbwd_extra_gib=fb_mem / 2**30)  # fmt: skip


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<24} {r['impl']:<20} {r['error']}")
            continue
        mem = f"{r['fwd_extra_gib']:>9.3f} {r['fwdbwd_extra_gib']:>9.3f}" if "fwd_extra_gib" in r else ""
        print(f"{r['op']:<24} {r['impl']:<20} {r['fwd_ms']:>8.3f} {r['fwdbwd_ms']:>8.3f} {mem}", flush=True)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--intermediate", type=int, default=13824)
    add_elementwise_args(ap)
    args = ap.parse_args(argv)
    check_flags(ap, args, positive=("tokens", "hidden", "intermediate"), positive_numbers=("bandwidth",))
    device = bench_device(args, tokens=64, hidden=256, intermediate=512, dtype="float32")
    rows = []
    for op, (make, impls, fwd_bytes, fb_bytes) in _rows(args, device).items():
        inputs = make()
        dy = tuple(torch.randn_like(o) for o in _outputs(impls["eager (HF)"](*inputs)))
        check(op, impls["ours"], inputs, dy)
        for name, fn in impls.items():
            rows.append(_time_impl(op, name, fn, inputs, dy, device))
            _print_rows(rows[-1:])  # as it is measured: a run stopped at its deadline keeps what it had
            save_json(args.json, rows, args, device)
        bw = args.bandwidth * 1e9  # bytes per ms
        rows.append(dict(op=op, impl=f"floor ({args.bandwidth} TB/s)", fwd_ms=fwd_bytes / bw, fwdbwd_ms=fb_bytes / bw))
    name = device_name(device)
    print(f"device: {name}, torch {torch.__version__}, {args.dtype}")
    print(f"{'op':<24} {'impl':<20} {'fwd ms':>8} {'f+b ms':>8} {'fwd +GiB':>9} {'f+b +GiB':>9}")
    _print_rows(rows)
    save_json(args.json, rows, args, device)
    failed = [f"{r['op']} {r['impl']}: {r['error']}" for r in rows if "error" in r and r["impl"] == "ours"]
    exit_if_ours_failed("bench_rmsnorm_swiglu", failed)
    return rows


if __name__ == "__main__":
    main()
