"""Benchmark the decode-step sampler: kernels.sampling.gumbel_sample (one pass per row) against the eager
PyTorch sampler it replaces (kernels.reference.gumbel_sample: int64 hash noise, Gumbel, argmax, log-softmax),
torch.compile of it, transformers' own step (softmax, torch.multinomial, and the sampled token's log-prob a rollout
keeps), and the floor (reading the logits once at --bandwidth, measured on the device). With top-k (--top-k) and
top-p (--top-p): ours (the floor by a radix select, then the one pass) against transformers' warpers (torch.topk;
torch.sort, softmax, cumsum, scatter), and the floors alone, also over one TP rank's half of the vocabulary.

    python bench/bench_sampling.py                     # batch 1, 64 and 256 x vocab 32000, bf16 logits, on CUDA
    python bench/bench_sampling.py --batch 1 64 256 --vocab 32000 --json sampling.json

Every tensor-parallel rank samples the full vocabulary at every decode step, so at batch 256 the eager
sampler's few hundred microseconds are a real share of a 13B step. Without a CUDA device: a tiny CPU run.
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
from engine.sampler import top_p_floor, topk_floor  # noqa: E402
from kernels import reference, sampling  # noqa: E402
from kernels.sampling import gumbel_sample, kth_largest, kth_largest_sharded, top_p_floor_sharded  # noqa: E402


def hf_sample(logits, seeds, counters, temperature, top_k=0, top_p=1.0):
    """The peer users run: transformers' sampling step (logits / T, with top_k its TopKLogitsWarper: -inf below the
    k-th largest; with top_p its TopPLogitsWarper: sort, softmax, cumsum, -inf where the mass up to a token is at most
    1 - top_p, scattered back; softmax, torch.multinomial), plus the log-prob of the sampled token that a PPO rollout
    keeps (a log_softmax of the raw logits)."""
    scaled = logits.float() / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < torch.topk(scaled, top_k, dim=-1).values[:, -1:], float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scaled, descending=False)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False  # (min_tokens_to_keep 1)
        scaled = scaled.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    tokens = torch.multinomial(torch.softmax(scaled, dim=-1), 1).squeeze(-1)
    return tokens, torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)


def ours_top_k(logits, seeds, counters, temperature, top_k):
    """engine.sampler's top-k: kernels.sampling.kth_largest finds each row's floor (a radix select, one launch; it was
    torch.topk until 2026-12-04: 0.372 ms at batch 64 on an H200), then the one-pass kernel samples above it."""
    return gumbel_sample(logits, seeds, counters, temperature, topk_floor(logits, top_k))


def ours_top_p(logits, seeds, counters, temperature, top_p):
    """engine.sampler's top-p: kernels.sampling.top_p_floor finds each row's floor (a radix select by mass, one
    launch; the engine sorted the rows with torch until 2026-12-05), then the one-pass kernel samples above it."""
    return gumbel_sample(logits, seeds, counters, temperature, top_p_floor(logits, top_p, temperature))


def sorted_top_p_floor(logits, top_p, temperature):
    """Top-p's floor by sorting (what engine/sampler.py did before top_p_floor, on the whole rows): sort, softmax,
    cumsum, the first place the mass reaches top_p."""
    ordered = torch.sort(logits.float(), descending=True).values
    first = ((ordered / temperature).softmax(-1).cumsum(-1) >= top_p).to(torch.int8).argmax(-1, keepdim=True)
    return ordered.gather(-1, first).squeeze(-1)


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        tail = r["error"] if "error" in r else f"{r['ms']:>9.4f} {r['extra_mib']:>9.1f}"
        print(f"{r['batch']:>6} {r['vocab']:>7} {r['impl']:<40} {tail}", flush=True)


def _check_top_p(logits, seeds, counters, args, dtype, b: int) -> None:
    """Before timing: top-p's floor against reference.top_p_floor (float64, sorted; a row may differ where top_p falls
    within the fp32 sums' rounding of a cumulative mass), over TP 2's simulated shards too, and no token drawn below
    it."""
    q, t = args.top_p, args.temperature
    floor_p = top_p_floor(logits, q, t)
    exact = reference.top_p_floor(logits, q, t).to(floor_p.device)
    off = (floor_p != exact).float().mean().item()
    tokens = ours_top_p(logits, seeds, counters, t, q)[0]
    below = (logits.float().gather(-1, tokens[:, None]).squeeze(-1) < floor_p).float().mean().item()
    even = logits[:, : args.vocab // 2 * 2]  # (two ranks' shards simulated as rows: rank r's of row i is r * b + i)
    shards = even.reshape(b, 2, -1).transpose(0, 1).reshape(2 * b, -1)
    summed = lambda hist: hist.copy_(hist.reshape(2, b, -1).sum(0).repeat(2, 1).view_as(hist))  # noqa: E731
    maxed = lambda m: m.copy_(m.view(2, b).amax(0).repeat(2))  # noqa: E731
    tp_floor = top_p_floor_sharded(shards, q, t, summed, maxed).view(2, b)
    tp_off = (tp_floor != reference.top_p_floor(even, q, t).to(tp_floor.device)).float().mean().item()
    print(f"batch {b}, top-p {q}: floor not the sorted one in {off:.1%} of rows ({tp_off:.1%} over TP 2 shards), "
          f"{below:.1%} drawn below it")  # fmt: skip
    check_close(f"top-p {q} floor batch {b} (rows off the sorted floor)", off, dtype, 0.01)
    check_close(f"top-p {q} floor over TP 2 shards batch {b} (rows off the sorted floor)", tp_off, dtype, 0.01)
    check_close(f"top-p {q} sampler batch {b} (rows drawn below the floor)", below, dtype, 0.0)


CPU_VOCAB = 1000  # (the tiny run's on a machine without CUDA)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=50, help="also time top-k sampling (the recipe's rollouts; 0: not)")
    ap.add_argument("--top-p", type=float, default=0.9, help="also time top-p sampling (1: not)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile peer row")
    add_elementwise_args(ap)
    args = ap.parse_args(argv)
    check_flags(ap, args, positive=("batch", "vocab"), positive_numbers=("bandwidth",))
    cuda = torch.cuda.is_available()
    vocab = args.vocab if cuda else CPU_VOCAB
    if not 0 <= args.top_k <= vocab // 2:  # (a TP 2 rank's rows take the top k of half the vocabulary)
        run = "" if cuda else " (the CPU run's)"
        ap.error(f"--top-k must be 0 (off) to {vocab // 2}, half the {vocab}-token vocabulary{run} as the TP 2 shard "
                 f"rows take it, got {args.top_k}")  # fmt: skip
    if not 0 < args.top_p <= 1:  # (NaN too)
        ap.error(f"--top-p must be in (0, 1] (1: off), got {args.top_p}")
    device = bench_device(args, batch=[4], vocab=CPU_VOCAB, dtype="float32")
    dtype = getattr(torch, args.dtype)
    impls = {
        "ours (one pass)": gumbel_sample,
        # a small batch's rows split into parts over the SMs (kernels.sampling.row_parts; batch 1: 16), against one
        # program a row (what ran until 2026-12-05: batch 1 streamed its row on one SM)
        "  ours, one program a row": lambda x, s, c, t: gumbel_sample(x, s, c, t, parts=1),
        "eager (reference)": reference.gumbel_sample,
        "HF: softmax + multinomial": hf_sample,  # what transformers' generate does per step (token and its log-prob)
    }
    if device == "cuda" and args.compile:  # (its cold compile: most of a GPU suite step's cap)
        impls["torch.compile(eager)"] = torch.compile(reference.gumbel_sample)
    if args.top_k > 0:
        k = args.top_k
        impls[f"ours top-{k}"] = lambda x, s, c, t: ours_top_k(x, s, c, t, k)
        impls[f"HF top-{k}"] = lambda x, s, c, t: hf_sample(x, s, c, t, k)
        # the floor alone: ours (radix select) against what engine/sampler.py ran before it (torch.topk's k-th value)
        impls[f"top-{k} floor: ours"] = lambda x, s, c, t: kth_largest(x, k)
        impls[f"  top-{k} floor: ours, one program a row"] = lambda x, s, c, t: kth_largest(x, k, parts=1)
        impls[f"top-{k} floor: torch.topk"] = lambda x, s, c, t: torch.topk(x, k, dim=-1).values[:, -1]
        # under TP 2, a rank's half of the vocabulary: our pass launches (kernels.sampling.kth_largest_sharded: 3 for
        # bf16 logits, 5 for fp32; its all-reduces of B x parts x 256 int32 not counted) against what the reference
        # path does (the shard's top k, then an all-gather of B x k values, not counted)
        half = lambda x: x[:, : x.shape[1] // 2]  # noqa: E731
        impls["TP 2 shard floor: ours"] = lambda x, s, c, t: kth_largest_sharded(half(x), k, lambda hist: None)
        impls["TP 2 shard: torch.topk"] = lambda x, s, c, t: torch.topk(half(x), k, dim=-1).values
    if args.top_p < 1.0:
        q = args.top_p
        impls[f"ours top-p {q}"] = lambda x, s, c, t: ours_top_p(x, s, c, t, q)
        impls[f"HF top-p {q}"] = lambda x, s, c, t: hf_sample(x, s, c, t, top_p=q)
        impls[f"top-p {q} floor: ours"] = lambda x, s, c, t: top_p_floor(x, q, t)
        impls[f"  top-p {q} floor: ours, one program a row"] = lambda x, s, c, t: sampling.top_p_floor(x, q, t, parts=1)
        impls[f"top-p {q} floor: torch.sort"] = lambda x, s, c, t: sorted_top_p_floor(x, q, t)
        # under TP 2, a rank's half: our nine pass launches (its nine all-reduces of B x 16 floats, and the max's, not
        # counted) against the gather of the whole rows (not counted) and their sort, as engine/sampler.py did
        half = lambda x: x[:, : x.shape[1] // 2]  # noqa: E731
        impls[f"TP 2 shard top-p {q} floor: ours"] = lambda x, s, c, t: top_p_floor_sharded(
            half(x), q, t, lambda hist: None, lambda m: None
        )
    rows = []
    for b in args.batch:
        logits = torch.randn(b, args.vocab, device=device, dtype=dtype) * 3
        seeds = torch.randint(0, 2**32, (b,), device=device, dtype=torch.int64)
        counters = torch.randint(0, 4096, (b,), device=device, dtype=torch.int64)
        t = args.temperature
        ours, ref = gumbel_sample(logits, seeds, counters, t), reference.gumbel_sample(logits, seeds, counters, t)
        same = (ours[0] == ref[0]).float().mean().item()
        err = (ours[1] - ref[1]).abs().max().item()
        print(f"batch {b}: ours vs eager, same token in {same:.1%} of rows, max |log-prob err| {err:.1e}")
        check_close(f"sampler batch {b} (rows sampling another token)", 1.0 - same, dtype, tol=0.01)
        if args.top_k > 0:  # the top-k path too: the reference's draw under the same floor, always within the top k
            floor_k = topk_floor(logits, args.top_k)
            ours = ours_top_k(logits, seeds, counters, t, args.top_k)
            ref = reference.gumbel_sample(logits, seeds, counters, t, floor_k)
            same = (ours[0] == ref[0]).float().mean().item()
            outside = (logits.float().gather(-1, ours[0][:, None]).squeeze(-1) < floor_k).float().mean().item()
            print(f"batch {b}, top-{args.top_k}: same token in {same:.1%} of rows, {outside:.1%} drawn below the floor")
            check_close(f"top-{args.top_k} sampler batch {b} (rows sampling another token)", 1.0 - same, dtype, 0.01)
            check_close(f"top-{args.top_k} sampler batch {b} (rows drawn outside the top k)", outside, dtype, 0.0)
            floor_err = (floor_k - torch.topk(logits, args.top_k, dim=-1).values[:, -1].float()).abs().max().item()
            check_close(f"top-{args.top_k} floor batch {b} (not torch.topk's k-th value)", floor_err, dtype, 0.0)
            # the TP floor, two ranks' shards simulated as rows (rank r's of row i: row r * b + i)
            even = logits[:, : args.vocab // 2 * 2]
            shards = even.reshape(b, 2, -1).transpose(0, 1).reshape(2 * b, -1)
            summed = lambda hist, b=b: hist.copy_(hist.reshape(2, b, -1).sum(0).repeat(2, 1).view_as(hist))  # noqa: E731
            tp_floor = kth_largest_sharded(shards, args.top_k, summed).view(2, b)
            tp_err = (tp_floor - torch.topk(even, args.top_k, dim=-1).values[:, -1].float()).abs().max().item()
            check_close(f"top-{args.top_k} floor over TP 2 shards batch {b} (not torch.topk's)", tp_err, dtype, 0.0)
        if args.top_p < 1.0:  # the top-p path: its floor is the sorted oracle's, nothing is drawn below it
            _check_top_p(logits, seeds, counters, args, dtype, b)
        for name, fn in impls.items():
            try:
                call = lambda fn=fn, x=logits, s=seeds, c=counters: fn(x, s, c, args.temperature)  # noqa: E731
                ms, mem = measure(call, device)
                rows.append(dict(batch=b, vocab=args.vocab, impl=name, ms=ms, extra_mib=mem / 2**20))
            except Exception as e:  # noqa: BLE001 - a peer failing on this device is reported
                rows.append(dict(batch=b, vocab=args.vocab, impl=name, error=f"{type(e).__name__}: {str(e)[:80]}"))
            _print_rows(rows[-1:])  # as it is measured: a run stopped at its deadline keeps what it had
            save_json(args.json, rows, args, device)
        floor = b * args.vocab * logits.element_size() / (args.bandwidth * 1e9)
        rows.append(dict(batch=b, vocab=args.vocab, impl=f"floor ({args.bandwidth} TB/s)", ms=floor, extra_mib=0.0))
    name = device_name(device)
    print(f"device: {name}, torch {torch.__version__}, {args.dtype} logits, temperature {args.temperature}")
    print(f"{'batch':>6} {'vocab':>7} {'impl':<40} {'ms':>9} {'+MiB':>9}")
    _print_rows(rows)
    save_json(args.json, rows, args, device)
    failed = [
        f"batch {r['batch']} {r['impl']}: {r['error']}" for r in rows if "error" in r and "ours" in r["impl"]
    ]  # (ours' rows, the floors' and the variants' among them, each name "ours")
    exit_if_ours_failed("bench_sampling", failed)
    return rows


if __name__ == "__main__":
    main()
