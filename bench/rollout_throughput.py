"""Rollout throughput: our generator against transformers' generate on the same model and lengths.

    python bench/rollout_throughput.py                       # tiny model on CPU (a smoke run)
    python bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 --prompt-len 128 --gen-len 256
    python bench/rollout_throughput.py --model /path/to/hf/checkpoint --batch 1 --json out.json
    torchrun --nproc_per_node 8 bench/rollout_throughput.py --model llama2-13b --random-weights --tp 8 --batch 256

Prints tokens/s of ours and of HF generate (dynamic cache, and static cache with --hf-static), the
peak memory of each, and our fraction of the decode roofline: weight bytes plus the KV bytes each
step reads, at the device-to-device copy bandwidth measured at the start of the run; and of the end-to-end
roofline, which adds the prefill at the measured matmul rate (what a run timed from the prompts to the last token,
as both engines are, could reach at best). Our row and the rooflines are printed (and the JSON written) before HF's
generate runs, so a run stopped during HF's still leaves them. With --tp (under
torchrun) the model is split over the ranks (HF generate is not run: it has no tensor parallelism); the
roofline is then each rank's share of the bytes.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    check_fits,
    check_flags,
    check_out_path,
    measured_copy_tbs,
    measured_matmul_tflops,
    measured_read_tbs,
    run_main,
    sync,
    write_json,
)
from engine import symm_reduce  # noqa: E402
from engine.checkpoint import hf_tensor_specs, load_pretrained  # noqa: E402
from engine.config import MODEL_SHAPES, GenerateConfig, ModelConfig, PPOConfig  # noqa: E402
from engine.distributed import backend_for, init_process_grid, print0  # noqa: E402
from engine.errors import InvalidInput  # noqa: E402
from engine.generate import Generator  # noqa: E402
from engine.kv_cache import blocks_for_tokens, model_block_bytes, resolve_cache_dtype  # noqa: E402
from engine.model import Transformer, forward_flops  # noqa: E402
from engine.preflight import device_error, resolve_device  # noqa: E402
from kernels.decode_config import parse_decode_config, set_decode_config  # noqa: E402

# The most a size flag takes (sequences, or tokens a sequence): far above any run a machine holds (what a run
# holds is check_fits's to say), below where a size overflows torch's int64 shapes into a TypeError traceback.
MAX_SIZE = 2**22
MAX_BLOCK_SIZE = 1024  # tokens a KV block (the kernels tile by it; the engine's default is 16)
# host bytes a prompt token costs before the run: the int64 tensor drawn, then the list of Python ints it becomes
# (an 8-byte pointer and a 28-byte int object)
PROMPT_TOKEN_BYTES = 8 + 8 + 28


def parse_args(argv=None) -> argparse.Namespace:
    # allow_abbrev=False: "--temp 0" or "--hf" is no flag (argparse took it for --temperature or --hf-static unsaid)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--model", default="tiny", help=f"a named shape ({', '.join(MODEL_SHAPES)}) or an HF checkpoint dir")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights for a named shape (default for 'tiny'; a checkpoint directory's own are loaded)",
    )
    p.add_argument("--batch", type=int, default=None, help="prompts per run (default 64 on GPU, 8 on CPU)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128 on GPU, 32 on CPU)")
    p.add_argument("--gen-len", type=int, default=None, help="new tokens per prompt (default 256 on GPU, 32 on CPU)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (the recipe samples at 0.7)")
    p.add_argument(
        "--top-k",
        type=int,
        default=PPOConfig().top_k,
        help="sample from the k likeliest tokens, ours and HF's alike (default: the recipe's rollouts; 0: off)",
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling, ours and HF's alike (default 1: off, the recipe's)"
    )
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default bf16 on GPU")
    p.add_argument("--device", default=None, help="default cuda if available")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-fraction", type=float, default=0.9)
    p.add_argument(
        "--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="fp8: float8 e4m3 K/V (half the bytes)"
    )
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-overlap", action="store_true", help="read each step's tokens before launching the next")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequence slots (default --batch)")
    p.add_argument(
        "--stop-tokens",
        type=int,
        default=0,
        help="make this many token ids stop tokens (responses of varied length; with --max-num-seqs below "
        "--batch, prompts are admitted while others run, as in a PPO rollout); skips HF generate",
    )
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    p.add_argument(
        "--hf-static", action="store_true", help="also time HF generate with a static cache (not with --no-hf)"
    )
    p.add_argument("--repeats", type=int, default=2, help="timed runs of ours and of HF each (the best is reported)")
    p.add_argument("--bandwidth", type=float, default=None, help="copy bandwidth in TB/s (default: measured)")
    p.add_argument("--tflops", type=float, default=None, help="bf16 matmul TFLOP/s (default: measured)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel degree (under torchrun)")
    p.add_argument(
        "--profile",
        default=None,
        metavar="TRACE_JSON",
        help="after the timings, one more run of ours under torch.profiler: the costliest kernels (GPU time; on CPU, "
        "ops) per step printed, and its Chrome trace written here",
    )
    p.add_argument(
        "--profile-tokens",
        type=int,
        default=None,
        help="new tokens per prompt in the --profile run (default 32; the eager decode under the profiler is several "
        "times slower than the timed run: 256 steps of the 13B batch-64 run took over a minute on an H200). Its "
        "prefill's kernels show with fewer calls per step than a layer count",
    )
    p.add_argument(
        "--decode-config",
        default=None,
        help="JSON object overriding the decode step's launches (kernels.decode_config.set_decode_config: the paged "
        "kernel's block_n, num_warps, num_stages, dot_min_group, min_split_tokens, fuse_rope; linear 1: the "
        "projections through kernels/decode_linear.py, with norm_rows; pdl 1: the decode kernels by programmatic "
        'dependent launch, sm_90+), e.g. \'{"block_n": 128, "num_warps": 8}\': a sweep\'s fastest variant tried on the '
        "whole generator",
    )
    p.add_argument("--json", default=None, help="write the figures to this file")
    a = p.parse_args(argv)
    sizes = ("batch", "prompt_len", "gen_len", "max_num_seqs", "block_size", "tp", "profile_tokens", "repeats")
    check_flags(p, a, positive=sizes, positive_numbers=("bandwidth", "tflops"))
    for flag in ("batch", "max_num_seqs", "prompt_len", "gen_len", "profile_tokens"):
        if (value := getattr(a, flag)) is not None and value > MAX_SIZE:
            what = "sequences" if flag in ("batch", "max_num_seqs") else "tokens a sequence"
            p.error(f"--{flag.replace('_', '-')} must be at most {MAX_SIZE} ({what}), got {value}")
    check_out_path(p, "--profile", a.profile, "the trace would be lost after the run")
    if a.profile_tokens is not None and not a.profile:
        p.error(f"--profile-tokens {a.profile_tokens} without --profile: no profiled run to take it")
    if a.random_weights and a.model not in MODEL_SHAPES:
        p.error(
            f"--random-weights with --model {a.model}: random weights are for a named shape "
            f"({', '.join(MODEL_SHAPES)}); a checkpoint directory's own weights are timed (drop --random-weights)"
        )
    if a.hf_static:
        for clash, why in (
            ("--no-hf", a.no_hf),
            (f"--stop-tokens {a.stop_tokens}", a.stop_tokens > 0),  # (varied lengths: HF generate is skipped)
            (f"--tp {a.tp}", a.tp > 1),  # (HF generate has no tensor parallelism: skipped)
        ):
            if why:
                p.error(f"--hf-static with {clash}: HF generate does not run, so neither does its static cache")
    if a.stop_tokens < 0:
        p.error(f"--stop-tokens must be >= 0 (0: none), got {a.stop_tokens}")
    if a.device is not None and (why := device_error(a.device)) is not None:  # (as train_ppo.py's)
        p.error(f"--{why}")
    if a.decode_config is not None:
        try:
            a.decode_config = parse_decode_config(a.decode_config)  # (set in main, where the run starts)
        except ValueError as e:
            p.error(f"--decode-config {a.decode_config!r}: {e}")
    if a.top_k < 0:
        p.error(f"--top-k must be >= 0 (0: off), got {a.top_k}")
    if not 0 < a.top_p <= 1:  # (NaN too)
        p.error(f"--top-p must be in (0, 1] (1: off), got {a.top_p}")
    if not 0 < a.kv_cache_fraction <= 1:
        p.error(f"--kv-cache-fraction must be in (0, 1], got {a.kv_cache_fraction}")
    if a.block_size & (a.block_size - 1) or a.block_size > MAX_BLOCK_SIZE:
        p.error(
            f"--block-size must be a power of two up to {MAX_BLOCK_SIZE} (the kernels tile by it), got {a.block_size}"
        )
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        p.error(f"--temperature must be a finite number >= 0 (0: greedy), got {a.temperature}")
    return a


def peak_memory(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def decode_roofline(
    cfg: ModelConfig,
    batch: int,
    prompt_len: int,
    gen_len: int,
    elem: int,
    bw: float,
    kv_elem: int | None = None,
    tp: int = 1,
    flops: float | None = None,
) -> dict:
    """Tokens/s if each decode step only streamed the weights once and each sequence's KV once (kv_elem: bytes
    per cached element, default elem); with tp, one rank's share of both (the all-reduces not counted).

    flops (FLOP/s) adds the prefill: batch x prompt_len tokens at that rate (or the weights' read, if longer), whose
    logits give the first new token, then gen_len - 1 decode steps; tok_s_e2e: new tokens over that time, the best a
    run timed from the prompts to the last token can reach."""
    # every weight but the embedding (its lookup reads B rows); tied, the embedding is also the LM head, read whole
    lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    weight_bytes = (cfg.num_params("lm") - lookup) * elem / tp
    avg_context = prompt_len + gen_len / 2
    kv_bytes = batch * avg_context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * (kv_elem or elem) / tp
    step = (weight_bytes + kv_bytes) / bw
    roof = {"weight_gb": weight_bytes / 1e9, "kv_gb_per_step": kv_bytes / 1e9, "tok_s": batch / step}
    roof["step_ms"] = step * 1e3
    if flops is not None:
        work = forward_flops(cfg, batch * prompt_len, batch * prompt_len**2, head_tokens=batch) / tp
        prefill = max(work / flops, weight_bytes / bw)
        roof.update(prefill_ms=prefill * 1e3, tok_s_e2e=batch * gen_len / (prefill + (gen_len - 1) * step))
    return roof


def _print_row(label: str, r: dict, roof: dict, gen_len: int) -> None:
    """A row of the table: tok/s, ms a forward (the whole run over its forwards, the prompts' included), ms a decode
    step (the run less the prompts' forward, over the decode steps; ours alone times that apart), peak memory, and the
    fractions of the decode roofline (tok/s, the prefill included, as the issue's target counts it) and the end-to-end
    one."""
    steps = r.get("decode_steps", 0) + r.get("prefill_steps", 0) or gen_len  # ours counts its forwards
    step_ms = r["seconds"] / steps * 1e3
    decode = f"{r['decode_step_ms']:>13.2f}" if "decode_step_ms" in r else f"{'-':>13}"
    own = r["peak_gib"] - r.get("kv_pool_gib", 0.0)  # (HF's cache grows within its peak)
    print0(
        f"{label:<24}{r['tok_s']:>12.1f}{step_ms:>12.2f}{decode}{r['peak_gib']:>11.2f}{own:>14.2f}"
        f"{r['tok_s'] / roof['tok_s']:>10.1%}{r['tok_s'] / roof['tok_s_e2e']:>14.1%}"
    )


def to_transformers(model: Transformer):
    """An HF LlamaForCausalLM holding a copy of our weights (the peer users would run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    p = next(model.parameters())
    hf_cfg = LlamaConfig(**{k: v for k, v in model.config.to_hf().items() if k != "architectures"})
    default = torch.get_default_dtype()
    torch.set_default_dtype(p.dtype)  # build in bf16 directly: an fp32 13B copy would not fit beside ours
    try:
        with torch.device(p.device):
            hf = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(default)
    state = hf.state_dict()
    with torch.no_grad():
        for name, spec in hf_tensor_specs(model).items():
            state[name].copy_(spec.module.full_part(spec.part))
    return hf


def time_ours(gen: Generator, prompts, params, repeats: int, device) -> dict:
    warm = GenerateConfig(**{**params.__dict__, "max_new_tokens": min(8, params.max_new_tokens)})
    gen.generate(prompts, warm)  # capture graphs, autotune, allocate
    best = None
    for _ in range(repeats):
        reset_peak(device)
        sync(device)
        t = time.perf_counter()
        comps = gen.generate_completions(prompts, params)
        sync(device)
        dt = time.perf_counter() - t
        tokens = sum(len(c.tokens) for c in comps)
        if best is None or dt < best["seconds"]:
            best = {"seconds": dt, "tokens": tokens, "tok_s": tokens / dt, "peak_gib": peak_memory(device)}
    best["preemptions"] = gen.stats.preemptions
    for key in ("prefill_steps", "decode_steps", "mixed_steps", "overlapped_steps"):
        best[key] = getattr(gen.stats, key)
    # the prompts' forward alone (with the first token its logits give), timed the same way: the run's time less
    # this is its decode steps', each of them what a step of the decode roofline is (the time a step above counts the
    # prefill too)
    first = GenerateConfig(**{**params.__dict__, "max_new_tokens": 1})
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        gen.generate_completions(prompts, first)
        sync(device)
        best["prefill_seconds"] = min(best.get("prefill_seconds", math.inf), time.perf_counter() - t)
    if best["decode_steps"]:
        best["decode_step_ms"] = max(0.0, best["seconds"] - best["prefill_seconds"]) / best["decode_steps"] * 1e3
    return best


def profile_ours(gen: Generator, prompts, params, trace: str, device, top: int = 15) -> dict:
    """One more run of ours under torch.profiler: where a step's time goes. On a GPU the costliest kernels by GPU time,
    on CPU the costliest ops by their own CPU time, each per step with its share of the total; the Chrome trace
    written to `trace`. The decode steps run eagerly here (the same kernels the graphs replay, each seen by the
    profiler): their kernel time per step against the timed run's step time says what the gaps between kernels cost."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    graphs, gen.use_cuda_graphs = gen.use_cuda_graphs, False
    sync(device)
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t = time.perf_counter()
            gen.generate_completions(prompts, params)
            sync(device)
            wall = time.perf_counter() - t
    finally:
        gen.use_cuda_graphs = graphs
    before = _file_id(trace)
    prof.export_chrome_trace(trace)
    if not os.path.isfile(trace) or _file_id(trace) == before:  # (torch.profiler says nothing when it cannot write)
        raise OSError(f"--profile {trace}: torch.profiler wrote no trace there")
    steps = max(1, gen.stats.decode_steps + gen.stats.prefill_steps)
    want = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == want]
    cost = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # microseconds
    total = sum(cost(e) for e in events) or 1.0
    rows = [
        {"name": e.key, "us_per_step": cost(e) / steps, "share": cost(e) / total, "calls_per_step": e.count / steps}
        for e in sorted(events, key=cost, reverse=True)[:top]
    ]
    what = "GPU kernel" if cuda else "CPU op (self)"
    print0(
        f"\nours profiled (one more run, eager, {steps} steps, {wall * 1e3 / steps:.2f} ms per step under the "
        f"profiler): {what} time {total / 1e3 / steps:.2f} ms per step; the costliest (trace: {trace}):"
    )
    print0(f"{'us/step':>10}{'share':>8}{'calls/step':>12}  name")
    for r in rows:
        print0(f"{r['us_per_step']:>10.1f}{r['share']:>8.1%}{r['calls_per_step']:>12.1f}  {r['name'][:100]}")
    return {"trace": trace, "steps": steps, "ms_per_step": wall * 1e3 / steps, "busy_ms_per_step": total / 1e3 / steps,
            "by": what, "top": rows}  # fmt: skip


def _file_id(path: str):
    """What tells a file written anew from the one there before (None: no file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def time_hf(
    hf, prompts, gen_len: int, temperature: float, top_k: int, device, static: bool, repeats: int, top_p: float = 1.0
) -> dict:
    """HF generate producing exactly gen_len tokens per prompt, timed as ours is (the best of `repeats` runs after a
    warm-up). A static cache is warmed up at the full length: transformers compiles generate for a static cache
    and recompiles for another cache length, which would land in the timed run."""
    ids = torch.tensor(prompts, device=device)
    kw = dict(max_new_tokens=gen_len, min_new_tokens=gen_len, pad_token_id=0)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    else:
        kw.update(do_sample=False)
    if static:
        kw["cache_implementation"] = "static"
    best = None
    with torch.no_grad():
        hf.generate(ids, **(kw if static else {**kw, "max_new_tokens": 4, "min_new_tokens": 4}))
        for _ in range(repeats):
            reset_peak(device)
            sync(device)
            t = time.perf_counter()
            out = hf.generate(ids, **kw)
            sync(device)
            dt = time.perf_counter() - t
            tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
            if best is None or dt < best["seconds"]:
                best = {"seconds": dt, "tokens": tokens, "tok_s": tokens / dt, "peak_gib": peak_memory(device)}
    return best


def main(argv=None) -> dict:
    args = parse_args(argv)
    grid = init_process_grid(args.tp, backend_for(args.device))
    device = resolve_device(args.device or "auto", grid)  # (a GPU: this rank's, torchrun's LOCAL_RANK)
    on_gpu = device.type == "cuda"
    batch = args.batch or (64 if on_gpu else 8)
    prompt_len = args.prompt_len or (128 if on_gpu else 32)
    gen_len = args.gen_len or (256 if on_gpu else 32)
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))

    shape = args.model in MODEL_SHAPES
    if not shape and not os.path.isdir(args.model):
        shapes = ", ".join(MODEL_SHAPES)
        raise InvalidInput(f"--model {args.model}: neither a shape ({shapes}) nor a checkpoint directory")
    if shape and args.model != "tiny" and not args.random_weights:
        raise InvalidInput(f"--model {args.model} is a shape: pass --random-weights, or give a checkpoint directory")
    cfg = ModelConfig.named(args.model) if shape else ModelConfig.from_hf(args.model)
    if shape:
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, prompt_len + gen_len)
    if prompt_len + gen_len > cfg.max_position_embeddings:
        raise InvalidInput(
            f"--prompt-len {prompt_len} + --gen-len {gen_len} = {prompt_len + gen_len} tokens a sequence exceeds "
            f"--model {args.model}'s max_position_embeddings {cfg.max_position_embeddings} (its config.json)"
        )
    if args.stop_tokens >= cfg.vocab_size - 3:
        raise InvalidInput(
            f"--stop-tokens {args.stop_tokens} leaves no token of the {cfg.vocab_size}-token vocabulary free"
        )
    args.no_hf = args.no_hf or bool(args.stop_tokens) or grid.tp > 1
    elem = torch.empty((), dtype=dtype).element_size()
    copies = 1 if args.no_hf else 2  # (transformers' copy is built beside ours)
    what = f"--model {args.model}'s {str(dtype).replace('torch.', '')} weights"
    what += "" if args.no_hf else " (and transformers' copy)"
    weight_bytes = copies * cfg.num_params("lm", grid.tp) * elem
    check_fits(what, weight_bytes, device)
    # and what the run cannot do without: the KV cache of one sequence at its full length (the generator refuses a
    # cache that holds less), and the prompts, drawn on the host
    cache_dtype = resolve_cache_dtype(args.kv_cache_dtype, dtype)
    seq_blocks = blocks_for_tokens(prompt_len + gen_len, args.block_size)
    kv_bytes = seq_blocks * model_block_bytes(cfg, grid.tp, cache_dtype, args.block_size)
    prompt_bytes = batch * prompt_len * PROMPT_TOKEN_BYTES
    kv_what = (
        f"{what}, the KV cache of one sequence of --prompt-len {prompt_len} + --gen-len {gen_len} tokens "
        f"({seq_blocks} blocks of --block-size {args.block_size})"
    )
    prompts_what = f"--batch {batch} prompts of --prompt-len {prompt_len} tokens"
    if on_gpu:
        check_fits(kv_what, weight_bytes + kv_bytes, device)
        check_fits(prompts_what + " (on the host)", prompt_bytes, torch.device("cpu"))
    else:
        check_fits(f"{kv_what} and {prompts_what}", weight_bytes + kv_bytes + prompt_bytes, device)
    if shape:
        model = Transformer(cfg, dtype=dtype, device=device, group=grid.tp_group).init_weights(std=0.02)
    else:
        model = load_pretrained(args.model, dtype=dtype, device=device, group=grid.tp_group)
        cfg = model.config
    model.eval()

    bw = (args.bandwidth or measured_copy_tbs(device)) * 1e12
    read_bw = measured_read_tbs(device) * 1e12  # (a read-dominated step's own ceiling, printed beside)
    flops = (args.tflops or measured_matmul_tflops(device)) * 1e12
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    stops = list(range(3, 3 + args.stop_tokens))
    params = GenerateConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_new_tokens=gen_len, ignore_eos=not stops,
        stop_token_ids=stops, seed=0,
    )  # fmt: skip
    kv_elem = torch.empty((), dtype=cache_dtype).element_size()
    slots = min(batch, args.max_num_seqs or batch)  # the sequences a decode step carries at most
    roof = decode_roofline(cfg, slots, prompt_len, gen_len, elem, bw, kv_elem, grid.tp, flops)

    if args.decode_config:
        print0(f"paged decode launch overridden: {set_decode_config(**args.decode_config)}")
    gen = Generator(
        model,
        max_num_seqs=args.max_num_seqs or max(batch, 1),
        block_size=args.block_size,
        max_model_len=prompt_len + gen_len,
        kv_cache_fraction=args.kv_cache_fraction,
        use_cuda_graphs=not args.no_cuda_graphs and on_gpu,
        overlap=not args.no_overlap,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    try:
        ours = time_ours(gen, prompts, params, args.repeats, device)
    except InvalidInput as e:
        if gen.pool is not None or not str(e).startswith("the KV cache holds"):  # (not the cache's size)
            raise
        # the generator's own words count max_model_len and KV blocks: name the flags that set them
        raise InvalidInput(
            f"--prompt-len {prompt_len} + --gen-len {gen_len} = {prompt_len + gen_len} tokens a sequence "
            f"({seq_blocks} KV blocks of --block-size {args.block_size}) do not fit the generator's KV cache: lower "
            f"them, or on a GPU raise --kv-cache-fraction ({args.kv_cache_fraction}) (the generator: {e})"
        ) from None
    ours["cuda_graphs"] = bool(gen.use_cuda_graphs)
    profile_failed = None
    if args.profile:
        tokens = min(args.profile_tokens or 32, params.max_new_tokens)
        short = GenerateConfig(**{**params.__dict__, "max_new_tokens": tokens})
        try:
            ours["profile"] = profile_ours(gen, prompts, short, args.profile, device)
        except OSError as e:  # (the trace not written: the timings are still printed and saved, then the exit says so)
            profile_failed = str(e)
    # its KV pool is allocated up front from the free memory (--kv-cache-fraction): the peak minus the pool is what
    # the run itself took
    ours["kv_pool_gib"] = gen.pool.tensor.numel() * gen.pool.tensor.element_size() / 2**30 if gen.pool else 0.0
    gen.release()
    del gen
    gc.collect()

    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print0(
        f"\nrollout throughput: {args.model}, {name} x {grid.world_size} (tp {grid.tp}), {dtype}, batch {batch}, "
        f"prompt {prompt_len}, new {gen_len}"
    )
    read_roof = decode_roofline(cfg, slots, prompt_len, gen_len, elem, read_bw, kv_elem, grid.tp)
    print0(
        f"measured copy bandwidth {bw / 1e9:.0f} GB/s (a read alone {read_bw / 1e9:.0f} GB/s: the decode roofline "
        f"{read_roof['tok_s']:.1f} tok/s at that rate), matmul {flops / 1e12:.3g} TFLOP/s; weights "
        f"{roof['weight_gb']:.2f} GB, KV read per step {roof['kv_gb_per_step']:.3f} GB (average context), prefill "
        f"{roof['prefill_ms']:.1f} ms at best"
    )
    print0(
        f"{'engine':<24}{'tok/s':>12}{'ms/forward':>12}{'ms/decode':>13}{'peak GiB':>11}{'less KV pool':>14}"
        f"{'roofline':>10}{'e2e roofline':>14}"
    )
    print0(f"{'roofline (decode)':<24}{roof['tok_s']:>12.1f}{'':>12}{roof['step_ms']:>13.2f}{'':>25}{1:>10.0%}")
    print0(f"{'roofline (end to end)':<24}{roof['tok_s_e2e']:>12.1f}{'':>25}{'':>25}{'':>10}{1:>14.0%}")
    _print_row("ours", ours, roof, gen_len)
    if ours.get("decode_step_ms"):
        share = roof["step_ms"] / ours["decode_step_ms"]
        print0(
            f"(ours' decode steps: {ours['decode_step_ms']:.2f} ms each, {share:.1%} of the decode roofline's step; "
            f"the prompts' forward and first token apart: {ours['prefill_seconds'] * 1e3:.1f} ms, "
            f"{roof['prefill_ms']:.1f} at best)"
        )
    if ours.get("kv_pool_gib"):
        print0(f"(ours' peak includes its KV pool of {ours['kv_pool_gib']:.2f} GiB, sized from the free memory)")
    if ours.get("preemptions"):
        print0(f"(ours preempted {ours['preemptions']} sequences for lack of KV blocks)")
    print0(
        f"ours: {ours['tokens']} tokens in {ours['prefill_steps']} prompt-only + {ours['decode_steps']} decode steps "
        f"({ours['mixed_steps']} carrying admitted prompts, {ours['overlapped_steps']} launched ahead of the host)"
    )
    if grid.tp > 1:
        print0(f"TP sums: {symm_reduce.describe(grid.tp_group)}")
    result = {
        "model": args.model,
        "device": name,
        "tp": grid.tp,
        "dtype": str(dtype).replace("torch.", ""),
        "kv_cache_dtype": args.kv_cache_dtype,
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "bandwidth_gbs": bw / 1e9,
        "read_bandwidth_gbs": read_bw / 1e9,
        "roofline_at_read_rate": read_roof,
        "matmul_tflops": flops / 1e12,
        "roofline": roof,
        "ours": ours,
        "decode_config": args.decode_config,
        "tp_sums": symm_reduce.describe(grid.tp_group),
        "torch": torch.__version__,
    }
    write_json(args.json, result)  # (written again with the peers: a run stopped during HF's keeps ours)

    if not args.no_hf:
        hf = to_transformers(model)
        del model
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        runs = [("hf_generate", False)] + ([("hf_generate_static", True)] if args.hf_static else [])
        for label, static in runs:
            result[label] = time_hf(
                hf, prompts, gen_len, args.temperature, args.top_k, device, static, args.repeats, args.top_p
            )
            _print_row(label, result[label], roof, gen_len)
            write_json(args.json, result)
    if profile_failed:
        raise SystemExit(profile_failed)
    return result


if __name__ == "__main__":
    run_main(main)
