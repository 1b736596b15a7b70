"""What moving state between the GPU and pinned host memory costs (engine/offload.py): the figures the offload settings
(--offload-optimizer, --offload-idle-models) are chosen on, and what each costs the recipe per PPO iteration.

    python bench/bench_offload.py                       # 1 GiB each way, a step of about 1B parameters on CUDA
    python bench/bench_offload.py --gib 4 --json offload.json

Copies, in GB/s of the same bytes: ours (engine.offload.HostCopies: one page-locked block, side streams) out to the
host, in to the device, and both at once (what a streamed update overlaps); the peers' ways: a buffer from torch's
pinned allocator (`pin_memory=True`, rounded up to a power of two) and pageable memory (an unpinned offload, as a
plain `.cpu()` does); and a device-to-device copy of the same bytes (the GPU's own bandwidth, not the link's).
Adam: one optimizer step of a Llama-shaped model's bf16 parameters with fp32 masters, the state on the device (fused
Adam: what off and rollouts update with) and in host memory (always: streamed through the device in chunks), in ms
and per billion parameters. Then the recipe (four 13B models, 512 rollouts of 8 optimizer steps per iteration) at
the measured rates: what rollouts (the state out before and in after each rollout), always (16 streamed updates)
and the idle models (their weights in, the value model's out) move per GPU and iteration, and the seconds that takes
(an upper bound: the copies in overlap the scoring passes).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import check_flags, device_name, write_json  # noqa: E402
from engine.config import ModelConfig, PPOConfig  # noqa: E402
from engine.distributed import ProcessGrid  # noqa: E402
from engine.memory_plan import STATE, fixed_bytes  # noqa: E402
from engine.model import Transformer  # noqa: E402
from engine.offload import HostCopies  # noqa: E402
from engine.optim import accumulate_grads, make_optimizer, optimizer_step  # noqa: E402
from engine.trainer import clock  # noqa: E402

GB = 1e9


def _best(fn, device, reps: int, after=None) -> float:
    """Seconds of the fastest of `reps` calls of fn (after one warm-up); after(), untimed, follows each call."""
    times = []
    for _ in range(reps + 1):
        t0 = clock(device, every_stream=True)
        fn()
        times.append(clock(device, every_stream=True) - t0)  # (the copies run on side streams)
        if after is not None:
            after()
    return min(times[1:])


def copy_rates(nbytes: int, device: torch.device, reps: int) -> dict[str, float]:
    """GB/s of each way of moving `nbytes` (in 64 MiB tensors) between the device and host memory."""
    parts = max(1, nbytes // 2**26)
    size = nbytes // parts // 4
    total = parts * size * 4
    dev = [torch.randn(size, device=device) for _ in range(parts)]
    other = [torch.randn(size, device=device) for _ in range(parts)]
    ours = HostCopies(device)
    a, b = [(i, [t]) for i, t in enumerate(dev)], [(parts + i, [t]) for i, t in enumerate(other)]

    def out(groups):
        ours.move_out(groups)
        ours.host_ready()

    def into(groups):
        ours.move_in(groups)
        ours.settle()

    rates = {"ours: out (device -> host)": total / _best(lambda: out(a), device, reps, lambda: into(a)) / GB}
    out(a)
    rates["ours: in (host -> device)"] = total / _best(lambda: into(a), device, reps, lambda: out(a)) / GB
    into(a)
    out(b)  # (one set on the host: it comes in while the other goes out)

    def both():
        ours.move_out(a)
        into(b)
        ours.host_ready()

    def swap_back():
        out(b)
        into(a)

    rates["ours: both ways at once"] = 2 * total / _best(both, device, reps, swap_back) / GB
    into(b)
    pinned = [torch.empty(size, pin_memory=device.type == "cuda") for _ in range(parts)]
    pageable = [torch.empty(size) for _ in range(parts)]
    for name, host in (("torch pinned allocator", pinned), ("pageable host memory", pageable)):

        def to_host(host=host):
            for h, d in zip(host, dev):
                h.copy_(d, non_blocking=True)

        def to_device(host=host):
            for h, d in zip(host, dev):
                d.copy_(h, non_blocking=True)

        rates[f"{name}: out"] = total / _best(to_host, device, reps) / GB
        rates[f"{name}: in"] = total / _best(to_device, device, reps) / GB

    def on_device():
        for d, o in zip(dev, other):
            o.copy_(d)

    rates["device to device (read + write)"] = 2 * total / _best(on_device, device, reps) / GB
    return rates


def adam_seconds(config: ModelConfig, device: torch.device, reps: int) -> dict[str, float]:
    """Seconds of one optimizer step of `config`'s bf16 (fp32 on CPU) parameters, the state on the device and in
    host memory (streamed)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Transformer(config, "lm", dtype=dtype, device=device).init_weights(seed=0)
    cfg, out = PPOConfig(), {}
    for name, resident in (("state on the device (fused Adam)", False), ("state in host memory (streamed)", True)):
        opt = make_optimizer(model, cfg, host_resident=resident)

        def step(opt=opt):
            for p in opt.params:
                p.grad = torch.full_like(p, 1e-3)
            accumulate_grads(opt)
            optimizer_step(opt, 1e-6, cfg, ProcessGrid())

        out[name] = _best(step, device, reps)
        del opt, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["parameters"] = sum(p.numel() for p in model.parameters())
    return out


def recipe_costs(rates: dict[str, float]) -> list[dict]:
    """Bytes each offload setting moves per GPU and PPO iteration for the recipe's four 13B models, and seconds at the
    measured rates (8 optimizer steps of both trained models per iteration)."""
    c, cfg = ModelConfig.named("llama2-13b"), PPOConfig()
    steps = cfg.steps_per_rollout  # optimizer steps of both models
    rows = []
    for tp in (8, 4):
        numels = {"policy": c.num_params("lm", tp), "reference": c.num_params("lm", tp),
                  "value": c.num_params("score", tp), "reward": c.num_params("score", tp)}  # fmt: skip
        state = fixed_bytes(numels, ("policy", "value"), torch.bfloat16, 1, False)[STATE]
        idle_in = 2 * (numels["reference"] + numels["value"] + numels["reward"])
        moves = [  # (out, in) bytes per iteration
            ("--offload-optimizer rollouts", state, state),  # (once around the rollout)
            ("--offload-optimizer always", steps * state, steps * state),  # (through the device at each step)
            ("--offload-idle-models rollouts", 2 * numels["value"], idle_in),  # (the frozen two: in only)
        ]
        for name, out_b, in_b in moves:
            if "always" in name:  # both ways at once, chunk after chunk
                seconds = (out_b + in_b) / (rates["ours: both ways at once"] * GB)
            else:
                seconds = out_b / (rates["ours: out (device -> host)"] * GB) + in_b / (
                    rates["ours: in (host -> device)"] * GB
                )
            rows.append({"tp": tp, "setting": name, "gb_out": out_b / GB, "gb_in": in_b / GB, "seconds": seconds})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gib", type=float, default=1.0, help="bytes moved each way per copy measurement (GiB)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the llama2-7b shape whose optimizer step is timed")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    a = ap.parse_args(argv)
    check_flags(ap, a, positive=("layers", "reps"), positive_numbers=("gib",))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = "llama2-7b" if device.type == "cuda" else "tiny"
    config = dataclasses.replace(ModelConfig.named(shape), num_layers=a.layers)
    if device.type == "cpu":
        a.gib, config.num_layers = min(a.gib, 1 / 64), 2
        print("no CUDA device: tiny CPU run (host to host copies); GPU figures need a CUDA device.")
    rates = copy_rates(int(a.gib * 2**30), device, a.reps)
    print(f"copies of {a.gib:g} GiB on {device_name(device)}")
    for name, rate in rates.items():
        print(f"  {name:<40}{rate:>10.1f} GB/s")
    adam = adam_seconds(config, device, a.reps)
    n = adam.pop("parameters")
    print(f"optimizer step (grads in, norm, clip, Adam), {n / 1e9:.4g}B parameters ({config.num_layers} layers of "
          f"the {shape} shape)")  # fmt: skip
    for name, sec in adam.items():
        print(f"  {name:<40}{sec * 1e3:>10.1f} ms{sec / n * 1e9:>10.2f} s per 1B parameters")
    costs = recipe_costs(rates)
    print("the recipe (four 13B models, bf16, one DP rank), per GPU and PPO iteration, at the rates above")
    print(f"  {'tp':>3} {'setting':<34}{'GB out':>9}{'GB in':>9}{'seconds':>10}")
    for r in costs:
        print(f"  {r['tp']:>3} {r['setting']:<34}{r['gb_out']:>9.1f}{r['gb_in']:>9.1f}{r['seconds']:>10.2f}")
    if device.type == "cpu":
        print("(CPU figures: a smoke run; GPU figures need a CUDA device)")
    out = {"device": device_name(device), "torch": torch.__version__, "gib": a.gib, "copies_gb_s": rates,
           "adam_seconds": adam, "adam_parameters": n, "recipe": costs}  # fmt: skip
    write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
