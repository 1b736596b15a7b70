"""Time one PPO iteration by phase: generation, the scoring passes, training.

    python bench/ppo_step.py                                   # tiny random models on CPU (a smoke run)
    python bench/ppo_step.py --model llama2-7b --random-weights --num-layers 8 --rollout-batch-size 64 \\
        --train-batch-size 16 --prompt-len 256 --max-new-tokens 256 --json out.json      # one GPU
    torchrun --nproc_per_node 8 bench/ppo_step.py --model llama2-13b --random-weights --tp 8 ...  # a node

The four models (policy, reference, value, reward) get random weights of the named shape
(--num-layers shrinks it so four models, two of them with fp32 masters and Adam moments, fit on one
GPU). Prompts are random token ids of --prompt-len; --ignore-eos (default on) makes every response
--max-new-tokens long so the phases see fixed token counts. One untimed warm-up iteration (CUDA
graphs, autotuning), then --iterations timed ones through engine.trainer.ppo_iteration. Printed per
phase: seconds, tokens, tokens/s, and model TFLOP/s per GPU, the trainer's own metrics (engine.model.forward_flops;
generation: each prompt's prefill once, a policy forward per sampled token after it; scoring: four forwards; training:
the policy's and the value model's forward + backward, 3 forwards each; LM heads on the response rows only).
Then, in one process, the peers' iteration on the same shapes (bench/peer_ppo.py: what TRL's PPOTrainer does without
vLLM, on transformers' models: generate, eager passes, AdamW over fp32 weights under bf16 autocast), phase by phase
beside ours (--no-peer: ours alone).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import check_fits, check_flags, run_main, write_json  # noqa: E402
from engine import grad_sums  # noqa: E402
from engine.config import MODEL_SHAPES, ModelConfig, PPOConfig  # noqa: E402
from engine.distributed import backend_for, init_process_grid, print0  # noqa: E402
from engine.errors import InvalidInput  # noqa: E402
from engine.model import Transformer  # noqa: E402
from engine.preflight import check_generator_slots, resolve_device, resolve_dtype  # noqa: E402
from engine.state import RunConfig, make_state  # noqa: E402
from engine.trainer import ppo_iteration  # noqa: E402
from kernels.dispatch import fp32_out_gemm  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", choices=list(MODEL_SHAPES), help="a named shape")
    p.add_argument("--random-weights", action="store_true", help="random weights for a named shape (implied for tiny)")
    p.add_argument("--num-layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--rollout-batch-size", type=int, default=None, help="prompts per rollout (CPU 8, GPU 64)")
    p.add_argument("--train-batch-size", type=int, default=None, help="sequences per optimizer step (CPU 4, GPU 16)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (CPU 24, GPU 256)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response tokens (CPU 16, GPU 256)")
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--samples-per-prompt", type=int, default=1, help="responses sampled per prompt (the recipe's 1)")
    p.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout (the recipe's 1)")
    p.add_argument(
        "--gen-max-num-seqs", type=int, default=None, help="generator slots (default: the rollout's sequences at once)"
    )
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--iterations", type=int, default=1, help="timed iterations (after one warm-up)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--kv-cache-fraction", type=float, default=0.5, help="GPU share for the KV cache")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel degree (under torchrun; the rest is DP)")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--activation-checkpointing", default="auto", help="auto, on, off or a number of layers")
    p.add_argument("--offload-optimizer", default="auto", help="auto, off, rollouts or always (RunConfig's)")
    p.add_argument("--offload-idle-models", default="auto", help="auto, off or rollouts (RunConfig's)")
    p.add_argument(
        "--grad-sums", action=argparse.BooleanOptionalAction, default=True,
        help="weight grads straight into their fp32 sums (engine/grad_sums.py); --no-grad-sums: the A/B",
    )  # fmt: skip
    p.add_argument(
        "--peer", action=argparse.BooleanOptionalAction, default=True,
        help="also time the peers' iteration (bench/peer_ppo.py: transformers' generate, eager passes, AdamW) on the "
        "same shapes after ours (one process only)",
    )  # fmt: skip
    p.add_argument("--peer-micro-batch", type=int, default=4, help="the peer's sequences a forward + backward")
    p.add_argument(
        "--save-to", default=None, metavar="DIR",
        help="also checkpoint the state after the timed iterations into DIR (a directory on the file system runs save "
        "to), written before the run goes on and then in the background: what each costs the run, the background "
        "thread's write time, and the disk's own rate for as many bytes (DIR's checkpoints are removed after)",
    )  # fmt: skip
    p.add_argument("--json", default=None, help="write the figures to this file")
    a = p.parse_args(argv)
    sizes = ("rollout_batch_size", "train_batch_size", "prompt_len", "max_new_tokens")
    # (None: the default; 0 is not it)
    check_flags(p, a, positive=("num_layers", *sizes, "gen_max_num_seqs", "iterations", "tp", "peer_micro_batch"))
    try:  # (RunConfig's checks of the two, as train_ppo.py's: float16 trains without loss scaling)
        RunConfig(output_dir="", device=a.device, dtype=a.dtype)
    except ValueError as e:
        p.error(str(e))
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    before, grad_sums.ENABLED = grad_sums.ENABLED, a.grad_sums
    try:
        return _run(a)
    finally:
        grad_sums.ENABLED = before


def _run(a: argparse.Namespace) -> dict:
    grid = init_process_grid(a.tp, backend_for(a.device))
    device = resolve_device(a.device, grid)
    dtype = resolve_dtype(a.dtype, device)
    gpu = device.type == "cuda"
    pick = lambda v, cpu, cuda: v if v is not None else (cuda if gpu else cpu)
    rollout, train_bs = pick(a.rollout_batch_size, 8, 64), pick(a.train_batch_size, 4, 16)
    prompt_len, new_tokens = pick(a.prompt_len, 24, 256), pick(a.max_new_tokens, 16, 256)
    if a.model != "tiny" and not a.random_weights:
        raise InvalidInput(f"--model {a.model} is a shape: pass --random-weights (this bench builds random models)")
    mc = ModelConfig.named(a.model)
    mc.max_position_embeddings = max(mc.max_position_embeddings, prompt_len + new_tokens)
    if a.num_layers:
        mc.num_layers = a.num_layers
    elem = torch.empty((), dtype=dtype).element_size()
    check_fits(
        f"--model {a.model}'s four models' {str(dtype).replace('torch.', '')} weights (before any optimizer state)",
        sum(mc.num_params(head, a.tp) for head in ("lm", "lm", "score", "score")) * elem, device,
    )  # fmt: skip
    cfg = PPOConfig(
        rollout_batch_size=rollout, train_batch_size=train_bs, max_new_tokens=new_tokens,
        max_prompt_len=prompt_len, learning_rate=1e-6, samples_per_prompt=a.samples_per_prompt,
        ppo_epochs=a.ppo_epochs,
    )  # fmt: skip
    run = RunConfig(
        output_dir="", micro_batch_tokens=a.micro_batch_tokens, kv_cache_fraction=a.kv_cache_fraction,
        gen_max_num_seqs=a.gen_max_num_seqs or cfg.rollout_sequences, ignore_eos=a.ignore_eos, tp=a.tp,
        sequence_parallel=a.sequence_parallel, distributed_optimizer=a.distributed_optimizer,
        activation_checkpointing=a.activation_checkpointing, offload_optimizer=a.offload_optimizer,
        offload_idle_models=a.offload_idle_models,
    )  # fmt: skip
    check_generator_slots(cfg, run)
    models = tuple(
        Transformer(
            mc, head, dtype=dtype, device=device, group=grid.tp_group, sequence_parallel=a.sequence_parallel
        ).init_weights(seed=i)
        for i, head in enumerate(("lm", "lm", "score", "score"))
    )
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, mc.vocab_size, (2 * (a.iterations + 1) * rollout, prompt_len), generator=gen).tolist()
    state = make_state(cfg, run, grid, models, prompts, stop_ids=[mc.eos_token_id])
    runs = []
    for k in range(a.iterations + 1):  # the first a warm-up; each printed and saved as it ends (a step stopped at
        m = ppo_iteration(state)  # the GPU suite's cap keeps what it measured)
        phases = ("generate", "score", "train")
        print0(f"iteration {k} ({'timed' if k else 'warm-up'}): {m['time_iteration']:.2f} s ("
               + ", ".join(f"{p} {m['time_' + p]:.2f}" for p in phases) + "); peak GiB "
               + ", ".join(f"{p} {m['mem_gib_' + p]:.1f}" for p in phases))  # fmt: skip
        if k:
            runs.append(m)
            write_json(a.json, {"model": a.model, "partial": True, "metrics": runs})
    best = min(runs, key=lambda m: m["time_iteration"])

    n_seq = cfg.rollout_sequences
    resp = best["response_len"] * n_seq
    seq_tok = resp + prompt_len * n_seq
    phases = [  # (the model TFLOP/s per GPU are the trainer's metrics: engine.model.forward_flops)
        ("generate", best["time_generate"], resp, best["gen_tflops_gpu"]),
        ("score (4 forwards)", best["time_score"], seq_tok, best["score_tflops_gpu"]),
        ("train (policy + value, fwd + bwd)", best["time_train"], seq_tok * cfg.ppo_epochs, best["train_tflops_gpu"]),
        ("iteration", best["time_iteration"], seq_tok, None),
    ]
    where = "on the device" if not state.offload else "in host memory during rollouts"
    where = "in host memory, updated in chunks" if state.policy_opt.host_resident else where
    print0(
        f"PPO iteration, {a.model} ({mc.num_layers} layers) {dtype} on {device} x {grid.world_size} "
        f"(dp {grid.dp} x tp {grid.tp}): {rollout} prompts x {prompt_len} tokens, {best['response_len']:.0f} new "
        f"tokens each, train batch {train_bs}; layers recomputed in the backward: {best['recompute_layers']}; "
        f"optimizer state: {where}; idle models' weights: "
        f"{'in host memory during rollouts' if state.offload_models else 'on the device'}; weight grads: "
        + (f"into their fp32 sums (fp32-out GEMM: {'yes' if fp32_out_gemm(device) else 'no'})" if a.grad_sums
           else "through the optimizer's hook (--no-grad-sums)")
    )  # fmt: skip
    print0(f"{'phase':<36}{'seconds':>10}{'tokens':>10}{'tok/s':>12}{'TFLOP/s per GPU':>16}")
    out = {"model": a.model, "num_layers": mc.num_layers, "device": str(device), "dtype": str(dtype), "phases": {}}
    out.update(world_size=grid.world_size, tp=grid.tp, sequence_parallel=a.sequence_parallel, optimizer_state=where,
               idle_models_offloaded=state.offload_models, grad_sums=a.grad_sums,
               fp32_out_gemm=fp32_out_gemm(device))  # fmt: skip
    for name, sec, tok, tflops in phases:
        tf = f"{tflops:16.2f}" if tflops is not None else f"{'':>16}"
        print0(f"{name:<36}{sec:>10.3f}{tok:>10.0f}{tok / sec:>12.0f}{tf}")
        out["phases"][name] = {"seconds": sec, "tokens": tok, "tok_s": tok / sec, "tflops_per_gpu": tflops}
    st = state.generator.stats  # the last timed rollout's scheduler
    keys = ("prefill_steps", "decode_steps", "mixed_steps", "overlapped_steps", "graph_captures", "setup_seconds")
    out["generator"] = {k: getattr(st, k) for k in keys}  # graph_captures 0: last iteration's graphs replayed
    print0("generator: " + ", ".join(f"{k} {v:.3g}" for k, v in out["generator"].items()))
    write_json(a.json, {**out, "metrics": runs})
    if a.save_to:
        out["save"] = _time_saves(state, a.save_to, best["time_iteration"])
        write_json(a.json, {**out, "metrics": runs})
    if a.peer and grid.world_size == 1:
        first_prompts = torch.tensor(prompts[:rollout], device=device)
        del state, models
        out["peer"] = _run_peer(a, mc, cfg, first_prompts, device, dtype, out)
    elif a.peer:
        print0("(the peer's iteration runs in one process: not timed under torchrun)")
    if not gpu:
        print0("(CPU figures: a smoke run; GPU figures need a CUDA device)")
    write_json(a.json, {**out, "metrics": runs})
    return out


def _time_saves(state, directory: str, iteration_s: float) -> dict:
    """A checkpoint of `state` into `directory` (engine.resume.save_checkpoint) written before the run goes on, then
    one written in the background (--async-save, the default) while one more PPO iteration runs: the seconds each costs
    the run (the background one's: its host copy, and what that iteration took beyond `iteration_s`, the fastest timed
    one's, the writing thread sharing the host with it), the thread's write time, the checkpoint's bytes (every
    rank's files), and the seconds global rank 0 takes to write and sync as many bytes in one file (the disk's own
    rate; one checkpoint on the disk at a time, each removed after)."""
    import dataclasses
    import shutil
    import time

    import torch.distributed as dist

    from engine.resume import finish_checkpoint, save_checkpoint

    rank = dist.get_rank() if dist.is_initialized() else 0
    os.makedirs(directory, exist_ok=True)
    state.run = dataclasses.replace(state.run, output_dir=directory, keep_checkpoints=1, log_samples=0)

    def remove() -> None:  # (one checkpoint on the disk at a time: a GPU machine's disk holds ~2 of 7B's)
        for name in os.listdir(directory) if rank == 0 else ():
            target = os.path.join(directory, name)
            if name.startswith("checkpoint-"):
                shutil.rmtree(target, ignore_errors=True)
            elif name == "latest":
                os.remove(target)

    start = time.monotonic()
    path = save_checkpoint(state)
    sync_s = time.monotonic() - start
    nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    remove()
    state.iteration += 1
    start = time.monotonic()
    save_checkpoint(state, background=True)
    writing, stall_s = state.pending_save, time.monotonic() - start
    overlapped_s = ppo_iteration(state)["time_iteration"]
    finish_checkpoint(state)
    remove()
    floor_s = None
    if rank == 0:  # (one file of the checkpoint's bytes in 64 MiB writes, synced: the disk's own rate)
        block, fn = bytes(min(64 * 2**20, max(nbytes, 1))), os.path.join(directory, "rate.tmp")
        start = time.monotonic()
        with open(fn, "wb") as f:
            for _ in range(-(-nbytes // len(block))):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        floor_s = time.monotonic() - start
        os.remove(fn)
    written_s = writing.written_s if writing is not None else None
    print0(f"checkpoint of {nbytes / 2**30:.2f} GiB (every rank's files) into {directory}:")
    print0(f"{'save':<40}{'run waits s':>14}{'written in s':>14}")
    print0(f"{'before the run goes on (--no-async-save)':<40}{sync_s:>14.2f}{sync_s:>14.2f}")
    if writing is None:
        print0("in the background: the host copy would not fit, written before the run went on as well")
    else:
        print0(f"{'in the background (the default)':<40}{stall_s:>14.2f}{written_s:>14.2f}")
        print0(f"  the iteration it was written beside: {overlapped_s:.2f} s ({iteration_s:.2f} s alone)")
    if floor_s is not None:
        print0(f"{'one process writing as many bytes':<40}{'':>14}{floor_s:>14.2f}")
    return {"bytes": nbytes, "sync_s": sync_s, "background_stall_s": stall_s if writing is not None else None,
            "background_written_s": written_s, "disk_s": floor_s, "overlapped_iteration_s": overlapped_s,
            "iteration_s": iteration_s}  # fmt: skip


def _run_peer(a, mc: ModelConfig, cfg: PPOConfig, prompts: torch.Tensor, device, dtype, out: dict) -> dict:
    """bench/peer_ppo.py's iteration on the same shapes (one warm-up, then --iterations; the fastest), printed beside
    ours phase by phase. Ours' models freed first; a peer that does not fit is reported, not fatal."""
    import gc

    from bench import peer_ppo

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    train_dtype = torch.float32  # (accelerate's mixed precision: fp32 weights, bf16 autocast on a GPU)
    try:
        models = peer_ppo.build(mc, device, train_dtype, dtype)
        opts = peer_ppo.optimizers(models, cfg)
        runs = [peer_ppo.iteration(models, opts, prompts, cfg, a.peer_micro_batch) for _ in range(a.iterations + 1)]
    except torch.OutOfMemoryError as e:
        print0(f"peer: out of memory on {device} ({str(e).splitlines()[0]}): not timed")
        return {"error": "out of memory"}
    best = min(runs[1:], key=lambda r: r["seconds"]["iteration"])
    print0(f"\nthe peers' iteration (bench/peer_ppo.py: transformers' generate and eager passes, trained weights fp32"
           f"{' under bf16 autocast' if device.type == 'cuda' else ''}, AdamW; micro-batches of "
           f"{a.peer_micro_batch}) against ours, the same shapes:")  # fmt: skip
    print0(f"{'phase':<36}{'ours s':>10}{'peer s':>10}{'peer / ours':>13}")
    names = {"generate": "generate", "score (4 forwards)": "score", "train (policy + value, fwd + bwd)": "train",
             "iteration": "iteration"}  # fmt: skip
    for name, key in names.items():
        ours_s, peer_s = out["phases"][name]["seconds"], best["seconds"][key]
        print0(f"{name:<36}{ours_s:>10.3f}{peer_s:>10.3f}{peer_s / ours_s:>12.2f}x")
    ours_new = out["phases"]["generate"]["tokens"]
    note = "" if abs(ours_new - best["response_tokens"]) < 0.5 else " (the peer's responses always run to full length)"
    print0(f"response tokens: ours {ours_new:.0f}, the peer's {best['response_tokens']}{note}")
    return best


if __name__ == "__main__":
    run_main(main)
