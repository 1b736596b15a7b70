"""The generation engine's host-side costs per decode step, and the forwards a PPO-like rollout takes.

    python bench/host_overheads.py                     # both parts, the README's sizes (under a minute on 2 CPU cores)
    python bench/host_overheads.py --skip-rollout --batches 64,256,1024 --repeats 5000
    python bench/host_overheads.py --skip-host --settings default,at-once,admit-2,admit-8 --json h.json

Part 1, host time of a decode step's bookkeeping (no model, no device): each call timed alone, the median of
--repeats calls in ms, at each batch of --batches sequences of random lengths (from --prompt-min tokens up), with
block tables of --width columns (the generator fixes them at max_model_len / block size, for its CUDA graphs):
  block_table     BlockManager.block_table: the step's int32 [B, width] tables, one gather from the numpy rows
  prepare_decode  BlockManager.prepare_decode: a slot appended to each of the B sequences, and the step's slot
                  mapping, positions, context lengths and tables as tensors (the whole step's bookkeeping of the
                  cache; every --chunk calls the sequences are rebuilt, untimed, so they never outgrow the tables)
  python lists    the same tables from padded Python lists through torch.tensor, as block_table built them before
                  the numpy rows (bfc2478; here each list through BlockManager.blocks, a copy more), for scale;
                  at most 200 calls timed
The tensors stay on the host here; on a GPU each also costs a non-blocking copy from pinned memory. Read them
against a GPU's decode step (milliseconds at 13B): the host's share of a step that does not overlap it. On a
machine whose cores other processes share, a figure can come out twice as high from one run to the next.

Part 2, a PPO-like rollout on the tiny random model through the reference ops on the CPU (bench/RESULTS.md's
"Scheduler, a PPO-like rollout"): --prompts prompts of --prompt-min to --prompt-max tokens through --slots sequence
slots, sampling at --temperature with --stop-tokens stop tokens (ids 3, 4, ...; EOS ignored), up to --max-new
tokens each, seeded (--seed: the model, the prompts and the samples), once per generator setting of --settings:
  default                 prompts ride along in decode steps (mix_prefill), steps launched ahead of the host
                          (overlap), prompts admitted a few at once (admit_min_seqs: slots // 16)
  at-once, admit-K        the default with admit_min_seqs 1 (admitted as soon as a slot frees) or K
  prefill-per-admission   mix_prefill and overlap off, admitted at once: a forward of its own for each admission
                          (the README's "was 579")
  no-overlap, no-mix      the default with overlap, or mix_prefill, off
The columns: forwards (counted at the model's embedding, each a read of every weight on a GPU) = prompt-only
forwards + decode steps; of the decode steps, those carrying admitted prompts (eager on a GPU, where a plain decode
step replays a CUDA graph) and those launched ahead of the host; decode rows (sequences the decode steps carried);
dropped (rows sampled and then thrown away: a sequence that stopped is decoded once more when steps overlap);
sampled tokens (kept); whether the samples are those of the first setting (counter-based sampling: they should be,
whatever the batching); wall seconds (the CPU's reference ops, not what a GPU's step costs).
The counts are what to read: on a GPU each forward avoided saves a read of the weights, and each eager step a few
hundred kernel launches of host time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import check_flags, positive_ints, run_main, write_json  # noqa: E402
from engine.config import GenerateConfig, ModelConfig  # noqa: E402
from engine.generate import Generator  # noqa: E402
from engine.kv_cache import BlockManager  # noqa: E402
from engine.model import Transformer  # noqa: E402
from kernels.dispatch import reference_ops  # noqa: E402

# a setting's generator options (admit_min_seqs None: the generator's default, slots // 16); "admit-K" also parses
SETTINGS = {
    "default": {},
    "at-once": {"admit_min_seqs": 1},
    "prefill-per-admission": {"mix_prefill": False, "overlap": False, "admit_min_seqs": 1},
    "no-overlap": {"overlap": False},
    "no-mix": {"mix_prefill": False},
}
DEFAULT_SETTINGS = "default,at-once,admit-8,prefill-per-admission"
LIST_REPEATS = 200  # calls timed of the Python-list tables at most


def setting_options(name: str) -> dict | None:
    """The Generator keywords of a named setting, or None if there is no such setting."""
    if name in SETTINGS:
        return dict(SETTINGS[name])
    k = name.removeprefix("admit-")
    if name.startswith("admit-") and k.isdigit() and int(k) >= 1:
        return {"admit_min_seqs": int(k)}
    return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    host = p.add_argument_group("part 1: host time per decode step")
    host.add_argument("--batches", type=positive_ints, default=[64, 256], help="sequences per step (default 64,256)")
    host.add_argument("--repeats", type=int, default=1000, help="calls timed per figure (the median is printed)")
    host.add_argument(
        "--width",
        type=int,
        default=128,
        help="block-table columns (default 128: a max_model_len of 2,048 in blocks of 16, as the README's figures)",
    )
    host.add_argument("--chunk", type=int, default=64, help="prepare_decode calls between rebuilds of the sequences")
    host.add_argument("--skip-host", action="store_true", help="leave part 1 out")
    roll = p.add_argument_group("part 2: a PPO-like rollout")
    roll.add_argument("--prompts", type=int, default=256)
    roll.add_argument("--slots", type=int, default=64, help="sequence slots (the generator's max_num_seqs)")
    roll.add_argument("--prompt-min", type=int, default=20, help="shortest prompt (tokens)")
    roll.add_argument("--prompt-max", type=int, default=120, help="longest prompt (tokens)")
    roll.add_argument("--max-new", type=int, default=300, help="new tokens per prompt at most")
    roll.add_argument("--stop-tokens", type=int, default=6, help="stop token ids (3, 4, ...): varied response lengths")
    roll.add_argument("--temperature", type=float, default=1.0)
    roll.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        help=f"comma-separated generator settings, the first the reference for 'same samples' (default "
        f"{DEFAULT_SETTINGS}; known: {', '.join(SETTINGS)}, admit-K)",
    )
    roll.add_argument(
        "--num-blocks", type=int, default=None, help="KV blocks (default: every slot at full length; fewer preempt)"
    )
    roll.add_argument("--skip-rollout", action="store_true", help="leave part 2 out")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="the model's weights, the prompts and the samples")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads during the run (default 1: the tiny model's ops are too small to share, and a "
        "thread pool on cores other processes use is many times slower)",
    )
    p.add_argument("--json", default=None, help="write the figures to this file")
    a = p.parse_args(argv)
    sizes = ("repeats", "chunk", "prompts", "slots", "prompt_min", "prompt_max", "max_new", "block_size", "threads",
             "width", "num_blocks")  # fmt: skip
    check_flags(p, a, positive=sizes)
    if a.prompt_max < a.prompt_min:
        p.error(f"--prompt-max {a.prompt_max} is below --prompt-min {a.prompt_min}")
    if a.block_size & (a.block_size - 1):
        p.error(f"--block-size must be a power of two (the kernels tile by it), got {a.block_size}")
    vocab = ModelConfig.named("tiny").vocab_size
    if not 0 <= a.stop_tokens < vocab - 4:
        p.error(f"--stop-tokens must be in [0, {vocab - 4}) (ids 3, 4, ... of the {vocab}-token vocabulary)")
    if not a.temperature >= 0 or a.temperature == float("inf"):  # (NaN too)
        p.error(f"--temperature must be a finite number >= 0 (0: greedy), got {a.temperature}")
    a.settings = [s for s in a.settings.split(",") if s]
    unknown = [s for s in a.settings if setting_options(s) is None]
    if unknown or not a.settings:
        p.error(f"--settings {','.join(unknown)}: unknown (known: {', '.join(SETTINGS)}, admit-K with K >= 1)")
    if len(set(a.settings)) != len(a.settings):
        p.error("--settings names a setting twice")
    return a


# ------------------------------------------------------------------------------------ part 1 --


def _sequences(batch: int, lo: int, top: int, width: int, block_size: int, g: torch.Generator) -> BlockManager:
    """A block manager holding `batch` sequences (ids 0..batch-1) of random lengths in [lo, top], with blocks for
    each to grow to `width` blocks."""
    lengths = torch.randint(lo, top + 1, (batch,), generator=g).tolist()
    blocks = BlockManager(batch * width, block_size)
    for i, n in enumerate(lengths):
        blocks.allocate(i, n)
    return blocks


def _median_ms(samples_ns: list[int]) -> float:
    return statistics.median(samples_ns) / 1e6


def time_host(batch: int, width: int, block_size: int, repeats: int, chunk: int, shortest: int, seed: int) -> dict:
    """Medians (ms) of block_table, prepare_decode and the Python-list tables at one batch of sequences of `shortest`
    tokens or more (part 1)."""
    context = width * block_size  # tokens the tables hold at most
    chunk = max(1, min(chunk, context // 2))  # prepare_decode grows each sequence by a token a call
    top = context - chunk  # the longest a sequence starts at: `chunk` appends later it still fits the tables
    lo = min(top, shortest)
    g = torch.Generator().manual_seed(seed)
    clock = time.perf_counter_ns
    ids = list(range(batch))

    blocks = _sequences(batch, lo, top, width, block_size, g)
    blocks.block_table(ids, width)  # (first call outside the timing)
    tables, lists = [], []
    for _ in range(repeats):
        t = clock()
        blocks.block_table(ids, width)
        tables.append(clock() - t)
    for _ in range(min(repeats, LIST_REPEATS)):  # (milliseconds a call: a few hundred medians are plenty)
        t = clock()
        rows = [b + [0] * (width - len(b)) for b in (blocks.blocks(s) for s in ids)]
        torch.tensor(rows, dtype=torch.int32)
        lists.append(clock() - t)

    steps = []
    for r in range(repeats):
        if r % chunk == 0:
            blocks = _sequences(batch, lo, top, width, block_size, g)
        t = clock()
        blocks.prepare_decode(ids, width)
        steps.append(clock() - t)
    blocks.check_invariants()
    return {
        "batch": batch,
        "width": width,
        "repeats": repeats,
        "block_table_ms": _median_ms(tables),
        "prepare_decode_ms": _median_ms(steps),
        "python_lists_ms": _median_ms(lists),
        "python_lists_repeats": len(lists),
    }


# ------------------------------------------------------------------------------------ part 2 --


def rollout_inputs(args, vocab: int) -> tuple[list[list[int]], GenerateConfig]:
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    params = GenerateConfig(
        temperature=args.temperature, max_new_tokens=args.max_new, stop_token_ids=list(range(3, 3 + args.stop_tokens)),
        seed=args.seed, ignore_eos=True,
    )  # fmt: skip
    return prompts, params


def _label(name: str, gen: Generator) -> str:
    parts = ["mix" if gen.mix_prefill else "prefill apart", "overlap" if gen.overlap else "sync"]
    return f"{name} ({', '.join(parts)}, admit {gen.admit_min_seqs})"


def run_rollout(model: Transformer, name: str, prompts, params, args, max_model_len: int) -> tuple[dict, list]:
    """One rollout under a setting: its counts (part 2's row) and its completions."""
    gen = Generator(
        model, max_num_seqs=args.slots, block_size=args.block_size, max_model_len=max_model_len,
        num_blocks=args.num_blocks, use_cuda_graphs=False, **setting_options(name),
    )  # fmt: skip
    seen = {"forwards": 0, "tokens": 0}

    def count(module, inputs, output):  # every forward embeds its tokens once
        seen["forwards"] += 1
        seen["tokens"] += inputs[0].numel()

    hook = model.embed_tokens.register_forward_hook(count)
    try:
        start = time.perf_counter()
        with reference_ops():
            comps = gen.generate_completions(prompts, params)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    gen.blocks.check_invariants()
    if gen.blocks.num_free_blocks != gen.blocks.num_blocks:
        raise SystemExit(f"{name}: {gen.blocks.num_blocks - gen.blocks.num_free_blocks} KV blocks left taken")
    s = gen.stats
    decode_rows = seen["tokens"] - s.prefill_tokens
    # each admission (the prompts', and a preempted sequence's again) samples a token from its prompt's logits; the
    # rest came from decode rows
    sampled_rows = decode_rows + len(prompts) * params.n + s.preemptions
    kept = sum(len(c.tokens) for c in comps)
    row = {
        "setting": name,
        "label": _label(name, gen),
        "mix_prefill": gen.mix_prefill,
        "overlap": gen.overlap,
        "admit_min_seqs": gen.admit_min_seqs,
        "forwards": seen["forwards"],
        "prefill_steps": s.prefill_steps,
        "decode_steps": s.decode_steps,
        "mixed_steps": s.mixed_steps,
        "overlapped_steps": s.overlapped_steps,
        "prefill_tokens": s.prefill_tokens,
        "decode_rows": decode_rows,
        "dropped_rows": sampled_rows - kept,
        "generated_tokens": s.generated_tokens,
        "completion_tokens": kept,
        "preemptions": s.preemptions,
        "num_blocks": gen.blocks.num_blocks,
        "seconds": seconds,
    }
    gen.release()
    return row, comps


def _digest(comps) -> str:
    h = hashlib.sha256()
    for c in comps:
        h.update(repr((c.prompt_index, c.sample_index, c.tokens)).encode())
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------------------- main --


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    cfg = ModelConfig.named("tiny")
    max_model_len = args.prompt_max + args.max_new
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, max_model_len)
    width = args.width
    result = {
        "meta": {
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "args": {k: v for k, v in vars(args).items() if k != "json"},
        },
        "host": [],
        "rollout": [],
    }

    if not args.skip_host:
        print(
            f"host time per decode step (no model; ms, the median of {args.repeats} calls each, of "
            f"{min(args.repeats, LIST_REPEATS)} for the Python lists; block tables of {width} columns of "
            f"{args.block_size} tokens)"
        )
        print(f"{'batch':>7}{'block_table':>14}{'prepare_decode':>16}{'python lists':>14}{'repeats':>9}")
        for batch in args.batches:
            row = time_host(batch, width, args.block_size, args.repeats, args.chunk, args.prompt_min, args.seed)
            result["host"].append(row)
            print(
                f"{batch:>7}{row['block_table_ms']:>14.4f}{row['prepare_decode_ms']:>16.4f}"
                f"{row['python_lists_ms']:>14.4f}{row['repeats']:>9}"
            )
            write_json(args.json, result)

    if not args.skip_rollout:
        model = Transformer(cfg).init_weights(seed=args.seed).eval()
        prompts, params = rollout_inputs(args, cfg.vocab_size)
        stops = params.stop_token_ids
        said = f"ids {stops[0]}-{stops[-1]}" if stops else "none"
        print(
            f"\nPPO-like rollout: {args.prompts} prompts of {args.prompt_min}-{args.prompt_max} tokens through "
            f"{args.slots} slots, T={args.temperature:g}, {len(stops)} stop tokens ({said}), up to {args.max_new} new; "
            f"tiny random model (seed {args.seed}), reference ops on the CPU ({args.threads} thread(s))"
        )
        head = (
            f"{'setting':<54}{'forwards':>9}{'prompt-only':>12}{'decode':>8}{'w/ prompts':>11}{'ahead':>7}"
            f"{'decode rows':>12}{'dropped':>9}{'sampled':>9}{'same':>6}{'s':>7}"
        )
        first = None
        for name in args.settings:
            row, comps = run_rollout(model, name, prompts, params, args, max_model_len)
            digest = _digest(comps)
            if first is None:
                first = comps
                lengths = [len(c.tokens) for c in comps]
                stopped = sum(c.finish_reason == "stop" for c in comps)
                result["responses"] = {
                    "min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths),
                    "stopped": stopped, "at_length_limit": len(comps) - stopped,
                }  # fmt: skip
                r = result["responses"]
                print(
                    f"responses: {r['min']}-{r['max']} tokens, mean {r['mean']:.1f}; {r['stopped']} stopped, "
                    f"{r['at_length_limit']} at the length limit"
                )
                print(head)
            row["samples_digest"] = digest
            row["same_samples"] = [c.tokens for c in comps] == [c.tokens for c in first]
            result["rollout"].append(row)
            print(
                f"{row['label']:<54}{row['forwards']:>9}{row['prefill_steps']:>12}{row['decode_steps']:>8}"
                f"{row['mixed_steps']:>11}{row['overlapped_steps']:>7}{row['decode_rows']:>12}{row['dropped_rows']:>9}"
                f"{row['completion_tokens']:>9}{'yes' if row['same_samples'] else 'NO':>6}{row['seconds']:>7.1f}"
            )
            write_json(args.json, result)
        rows = result["rollout"]
        if any(r["preemptions"] for r in rows):
            print("preemptions: " + ", ".join(f"{r['setting']} {r['preemptions']}" for r in rows))
        if not all(r["same_samples"] for r in rows):
            print(f"(NO: a setting sampled other tokens than {rows[0]['setting']}: samples should not depend on it)")
    return result


if __name__ == "__main__":
    run_main(main)
