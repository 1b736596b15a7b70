"""Benchmark of kernels/logprob.py: token log-probs (+ entropy) and the LM-head-fused hidden path.

    python bench/bench_logprob.py                     # H100 defaults: 32768 x 32000 bf16; 8192 x 5120 x 32000
    python bench/bench_logprob.py --json out.json --n 16384 --v 32001

Rows: ours, the eager reference (kernels/reference.py: log_softmax + gather, in fp32), torch.compile of
that reference, Liger-Kernel when importable (cross entropy = -logp; fused linear cross entropy), and
the roofline floor (bytes / bandwidth for the token ops, FLOPs / peak for the GEMM-bound hidden path).
Time via triton.testing.do_bench; "extra" = peak memory allocated during the call minus what was
allocated before it and minus the returned tensors (outputs and grads). Without CUDA it runs a tiny
CPU shape (reference vs eager) and says that GPU figures need a CUDA device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import check_close, check_flags, exit_if_ours_failed, fill_peaks, measure, write_json  # noqa: E402
from kernels import logprob as logprob_kernels  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.dispatch import fp32_out_gemm  # noqa: E402
from kernels.logprob import hidden_logprobs, token_logprobs  # noqa: E402
from kernels.ppo_loss import ppo_token_loss  # noqa: E402

try:  # Liger-Kernel is optional
    from liger_kernel.transformers.functional import liger_cross_entropy, liger_fused_linear_cross_entropy
except Exception:  # noqa: BLE001
    liger_cross_entropy = liger_fused_linear_cross_entropy = None

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:120]}"


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def check_fwd_bwd(what: str, ours, ref, leaves: list[torch.Tensor], dtype: torch.dtype, scale: float = 0.0) -> None:
    """Before timing: ours' outputs and the grads of a random weighting of them (w.r.t. every leaf) against the fp32
    reference on the same values; a wrong backward's figures are not published. Errors are relative to the largest
    value of each, an output's to `scale` where that is larger (a loss near 0: relative to its terms' size)."""
    found, weights = [], []
    for f, cast in ((ours, lambda t: t), (ref, lambda t: t.float())):
        xs = [cast(t.detach()).requires_grad_() for t in leaves]
        outs = f(*xs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        weights = weights or [torch.randn(o.shape, device=o.device) for o in outs]
        obj = sum((o.float() * w).sum() for o, w in zip(outs, weights))
        found.append([o.detach().float() for o in outs] + [g.float() for g in torch.autograd.grad(obj, xs)])
    floors = [max(scale, 1e-30)] * len(weights) + [1e-30] * len(leaves)  # (the outputs, then the gradients)
    errs = [((a - b).abs().max() / b.abs().max().clamp_min(f)).item() for a, b, f in zip(*found, floors)]
    shown = " ".join(f"{e:.1e}" for e in errs)
    print(f"{what}: ours vs fp32 reference, max error relative to the largest value, outputs then gradients: {shown}")
    check_close(what, max(errs), dtype)


def check_into_sum(what: str, loss_fn, hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
                   scale: float) -> None:  # fmt: skip
    """Before timing the LM head's grad made straight into an fp32 sum (weight_grad_into): the loss (times a random
    loss_scale), the grad of hidden and the sum against the fp32 reference's loss and grads, as check_fwd_bwd."""
    s = float(torch.rand(()) + 0.5)
    acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    hh = hidden.detach().requires_grad_()
    loss = loss_fn(hh, weight, dict(loss_scale=s, weight_grad_into=acc))
    loss.backward()
    hr, wr = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    r_loss = s * loss_fn(hr, wr, None)
    r_loss.backward()
    errs = [
        ((a.float() - b).abs().max() / b.abs().max().clamp_min(f)).item()
        for a, b, f in ((loss, r_loss.detach(), s * scale), (hh.grad, hr.grad, 1e-30), (acc, wr.grad, 1e-30))
    ]
    print(f"{what}: ours vs fp32 reference, max error relative to the largest value, loss, grad of hidden, the sum: "
          + " ".join(f"{e:.1e}" for e in errs))  # fmt: skip
    check_close(what, max(errs), dtype)


def persistent_rows(f):
    """f run with kernels.logprob.PERSISTENT_ROWS on (the switch as it was after each call)."""

    def call(*args):
        before, logprob_kernels.PERSISTENT_ROWS = logprob_kernels.PERSISTENT_ROWS, True
        try:
            return f(*args)
        finally:
            logprob_kernels.PERSISTENT_ROWS = before

    return call


def fwd_bwd(f, inputs):
    """A callable doing f(*inputs) forward and the grads of sum(outputs * random weights) w.r.t. inputs."""
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def run():
        out = f()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        obj = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
        return torch.autograd.grad(obj, leaves)

    return run


def bench_token(args, device, dtype, rows):
    n, v = args.n, args.v
    logits = torch.randn(n, v, device=device, dtype=dtype) * 2
    targets = torch.randint(0, v, (n,), device=device)
    x = logits.clone().requires_grad_(True)
    elt = logits.element_size()
    floor = {
        "fwd": (n * v * elt + n * 12) / (args.bandwidth * 1e12) * 1e3,
        "fwd+ent": (n * v * elt + n * 16) / (args.bandwidth * 1e12) * 1e3,
        "fwd+bwd": (3 * n * v * elt + n * 24) / (args.bandwidth * 1e12) * 1e3,
    }
    cands = {
        "ours": lambda xx, ent: token_logprobs(xx, targets, return_entropy=ent),
        # the forward's persistent grid, rows copied in ahead (kernels.logprob.PERSISTENT_ROWS; the backward as ours)
        "ours, rows pipelined": persistent_rows(lambda xx, ent: token_logprobs(xx, targets, return_entropy=ent)),
        "eager (reference)": lambda xx, ent: reference.token_logprobs(xx, targets, return_entropy=ent),
    }
    if device == "cuda" and not args.skip_compile:
        compiled = torch.compile(reference.token_logprobs, dynamic=False)
        cands["torch.compile"] = lambda xx, ent: compiled(xx, targets, return_entropy=ent)
    # before timing: ours (both forwards) against the fp32 reference on the same logits (log-probs, entropy)
    want = reference.token_logprobs(logits.float(), targets, return_entropy=True)
    for what, f in (("", cands["ours"]), (", rows pipelined", cands["ours, rows pipelined"])):
        got = f(logits, True)
        errs = [(a.float() - b).abs().max().item() for a, b in zip(got, want)]
        print(f"token_logprobs{what} {n}x{v}: ours vs fp32 reference, max |err| log-prob {errs[0]:.2e}, entropy "
              f"{errs[1]:.2e}")  # fmt: skip
        rel = max(e / b.abs().max().item() for e, b in zip(errs, want))  # (the same logits: fp32 inside both)
        check_close(f"token_logprobs{what} {n}x{v}", rel, torch.float32)
        del got
    del want
    rows_checked = min(n, 512)  # (the backward: on a slice of the rows, each row's gradient its own)
    check_fwd_bwd(
        f"token_logprobs backward {rows_checked}x{v}",
        lambda xx: token_logprobs(xx, targets[:rows_checked], return_entropy=True),
        lambda xx: reference.token_logprobs(xx, targets[:rows_checked], return_entropy=True),
        [logits[:rows_checked]], dtype,
    )  # fmt: skip
    cases = [("fwd", False, logits), ("fwd+ent", True, logits), ("fwd+bwd", True, x)]
    jobs = [(name, case, (lambda f=f, i=inp, e=ent: f(i, e)) if case != "fwd+bwd" else fwd_bwd(
        lambda f=f, e=ent: f(x, e), [x])) for name, f in cands.items() for case, ent, inp in cases]  # fmt: skip
    if device == "cuda" and liger_cross_entropy is not None:
        # Liger writes its gradient into the logits in place: give it its own copy. No entropy output;
        # fwd+bwd uses reduction="sum" (its backward assumes a scalar loss).
        lx = logits.clone()
        jobs.append(("liger cross_entropy", "fwd", lambda: -_first(liger_cross_entropy(lx, targets, reduction="none"))))
        lxg = logits.clone().requires_grad_(True)
        jobs.append(("liger cross_entropy (no entropy)", "fwd+bwd", lambda: torch.autograd.grad(
            _first(liger_cross_entropy(lxg, targets, reduction="sum")), lxg)))  # fmt: skip
    for name, case, call in jobs:
        try:
            ms, extra = measure(call, device, warmup_ms=args.warmup, rep_ms=args.rep)
            gib = extra / 2**30
        except Exception as e:  # noqa: BLE001 (a peer failing must not stop the table)
            print(f"  {name} {case}: failed: {_error(e)}")
            rows.append(dict(op="token_logprobs", shape=f"{n}x{v}", case=case, impl=name, error=_error(e)))
            continue
        rows.append(dict(op="token_logprobs", shape=f"{n}x{v}", case=case, impl=name, ms=ms, extra_gib=gib))
    for case, ms in floor.items():
        rows.append(dict(op="token_logprobs", shape=f"{n}x{v}", case=case, impl="floor", ms=ms, extra_gib=0.0))


def bench_hidden(args, device, dtype, rows):
    n, h, v = args.hn, args.hh, args.v
    hidden = (torch.randn(n, h, device=device, dtype=dtype)).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, dtype=dtype) / h**0.5).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device=device)
    shape = f"{n}x{h}x{v}"
    ones = torch.ones(n, device=device)
    old = torch.zeros(n, device=device) - 10.0
    cands = {
        "ours hidden_logprobs (4 GEMMs)": lambda: hidden_logprobs(hidden, weight, targets, return_entropy=True),
        "eager (reference)": lambda: reference.hidden_logprobs(hidden, weight, targets, return_entropy=True),
    }
    ppo = {"ours ppo_token_loss(hidden) (3 GEMMs)": lambda: ppo_token_loss(
        None, targets, old, ones, ones, hidden=hidden, weight=weight
    )[0]}  # fmt: skip
    # before timing, on a slice of the rows: both fused paths against the fp32 reference, outputs and both grads; the
    # PPO loss with advantages of either sign and old log-probs giving ratios well inside the clip range or well
    # outside it, never near its edges, where a bf16 logit's rounding (ours) would flip a token's clipping
    m = min(n, 256)
    t_m = targets[:m]
    u = torch.rand(3, m, device=device)
    size = torch.where(u[0] < 0.5, 0.05 + 0.05 * u[1], 0.3 + 0.2 * u[1])  # |log ratio|: clip edges at 0.18 and 0.22
    gap = torch.where(u[2] < 0.5, size, -size)
    with torch.no_grad():
        near = reference.hidden_logprobs(hidden[:m].float(), weight.float(), t_m) + gap
    adv, keep = torch.randn(m, device=device), torch.rand(m, device=device) < 0.9
    check_fwd_bwd(f"hidden_logprobs {m}x{h}x{v}", lambda hh, ww: hidden_logprobs(hh, ww, t_m, return_entropy=True),
                  lambda hh, ww: reference.hidden_logprobs(hh, ww, t_m, return_entropy=True),
                  [hidden[:m], weight], dtype)  # fmt: skip
    check_fwd_bwd(f"ppo_token_loss(hidden) {m}x{h}x{v}",
                  lambda hh, ww: ppo_token_loss(None, t_m, near, adv, keep, hidden=hh, weight=ww)[0],
                  lambda hh, ww: reference.ppo_token_loss(None, t_m, near, adv, keep, hidden=hh, weight=ww)[0],
                  [hidden[:m], weight], dtype, scale=adv.abs().mean().item())  # fmt: skip
    # the LM head's grad straight into an fp32 sum (the trainer's: its optimizer's sum over micro-batches, allocated
    # before the call as the trainer's is), one GEMM a chunk into it where the device's torch has it (fp32_out_gemm)
    check_into_sum(f"ppo_token_loss(hidden, weight_grad_into) {m}x{h}x{v}",
                   lambda hh, ww, kw: (ppo_token_loss(None, t_m, near, adv, keep, hidden=hh, weight=ww, **kw)
                                       if kw else reference.ppo_token_loss(None, t_m, near, adv, keep, hidden=hh,
                                                                           weight=ww))[0],
                   hidden[:m], weight, dtype, adv.abs().mean().item())  # fmt: skip
    into = torch.zeros(v, h, dtype=torch.float32, device=device)
    into_row = (f"ours ppo_token_loss(hidden), LM head grad into an fp32 sum (3 GEMMs; fp32-out GEMM: "
                f"{'yes' if fp32_out_gemm(torch.device(device)) else 'no'})")  # fmt: skip
    ppo[into_row] = lambda: ppo_token_loss(None, targets, old, ones, ones, hidden=hidden, weight=weight,
                                           weight_grad_into=into)[0]  # fmt: skip
    if device == "cuda" and not args.skip_compile:
        compiled = torch.compile(reference.hidden_logprobs, dynamic=False)
        cands["torch.compile"] = lambda: compiled(hidden, weight, targets, return_entropy=True)
    if device == "cuda" and liger_fused_linear_cross_entropy is not None:
        ppo["liger fused_linear_cross_entropy (sum)"] = lambda: _first(
            liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum")
        )
    for name, f in {**cands, **ppo}.items():
        try:
            leaves = [hidden] if f is ppo.get(into_row) else [hidden, weight]  # (the sum is the weight's grad)
            ms, extra = measure(fwd_bwd(f, leaves), device, warmup_ms=args.warmup, rep_ms=args.rep)
            gib = extra / 2**30
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: failed: {_error(e)}")
            rows.append(dict(op="hidden_logprobs", shape=shape, case="fwd+bwd", impl=name, error=_error(e)))
            continue
        rows.append(dict(op="hidden_logprobs", shape=shape, case="fwd+bwd", impl=name, ms=ms, extra_gib=gib))
    for k in (3, 4):
        ms = 2 * k * n * h * v / (args.tflops * 1e12) * 1e3
        rows.append(
            dict(op="hidden_logprobs", shape=shape, case="fwd+bwd", impl=f"floor ({k} GEMMs)", ms=ms, extra_gib=0)
        )


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=32768, help="token rows for token_logprobs")
    p.add_argument("--v", type=int, default=32000, help="vocabulary size")
    p.add_argument("--hn", type=int, default=8192, help="token rows for hidden_logprobs")
    p.add_argument("--hh", type=int, default=5120, help="hidden size for hidden_logprobs")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--bandwidth", type=float, default=None, help="copy TB/s for the floor (default: measured)")
    p.add_argument("--tflops", type=float, default=None, help="dense bf16 TFLOP/s for the floor (default: measured)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition ms")
    p.add_argument("--skip-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--skip-hidden", action="store_true", help="skip the hidden_logprobs rows")
    p.add_argument("--json", type=str, default=None, help="write the figures to this path")
    args = p.parse_args(argv)
    check_flags(p, args, positive=("n", "v", "hn", "hh", "rep"), positive_numbers=("bandwidth", "tflops"))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    if device == "cpu":
        print("No CUDA device: timing a tiny CPU shape (reference vs eager); GPU figures need a CUDA device.")
        args.n, args.v, args.hn, args.hh, dtype = 64, 1000, 32, 64, torch.float32
    fill_peaks(args, device, bandwidth="bandwidth", tflops=None if args.skip_hidden else "tflops")
    torch.manual_seed(0)
    rows: list[dict] = []
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, dtype {dtype}, torch "
          f"{torch.__version__}")  # fmt: skip
    print(f"{'op':<16} {'shape':<18} {'case':<8} {'impl':<40} {'ms':>9} {'extra GiB':>10}")
    parts = [bench_token] + ([] if args.skip_hidden else [bench_hidden])
    for part in parts:  # each part's rows printed and saved as it ends: a run stopped at its deadline keeps them
        done = len(rows)
        part(args, device, dtype, rows)
        for r in rows[done:]:
            figures = f"failed: {r['error']}" if "error" in r else f"{r['ms']:>9.3f} {r['extra_gib']:>10.3f}"
            print(f"{r['op']:<16} {r['shape']:<18} {r['case']:<8} {r['impl']:<40} {figures}")
        if args.json:
            meta = {"device": device, "dtype": str(dtype), "bandwidth_tbs": args.bandwidth, "tflops": args.tflops}
            write_json(args.json, {**meta, "rows": rows}, indent=1)
    failed = [
        f"{r['op']} {r['case']} {r['impl']}: {r['error']}"
        for r in rows
        if "error" in r and r["impl"].startswith("ours")
    ]
    exit_if_ours_failed("bench_logprob", failed)
    return rows


if __name__ == "__main__":
    main()
