"""The training phase's communication overlaps, A/B, on one machine's devices: PPO iterations (bench/ppo_step.py under
torchrun) with every overlap on (the default), with each one off alone, and with all three off, side by side.

    python bench/train_overlaps.py                          # CPU smoke: tiny models, 4 gloo processes (TP 2 x DP 2)
    python bench/train_overlaps.py --nproc 8 --tp 4 -- --model llama2-13b --random-weights --num-layers 10 \\
        --rollout-batch-size 64 --train-batch-size 32 --prompt-len 256 --max-new-tokens 256 --iterations 2

The overlaps (each the same bits as its serial form, so every run trains to the same losses and grad norms: the table's
last column, and a warning where a run moved by more than 1e-3): the grads' DP reduction during the last backward
(TULU_OVERLAP_GRAD_REDUCE), the parameters' all-gather left running after the update (TULU_OVERLAP_PARAM_GATHER, with
the distributed optimizer), sequence parallelism's backward with its gather and reduce-scatter behind the GEMMs
(TULU_SP_OVERLAP); last, all on with CUDA_DEVICE_MAX_CONNECTIONS=1 (Megatron's setting for its overlaps), and all on
with torch's async TP (TULU_ASYNC_TP=1, sequence parallelism's forwards fused with their collectives). What they save
grows with the collectives' cost: DP over nodes, TP 8. Flags after `--` go to
bench/ppo_step.py as they are (the model, the sizes, --iterations: the fastest timed iteration is each run's figure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import check_flags, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCHES = {  # short name: (what, its switch)
    "grad_reduce": ("grads' DP reduction", "TULU_OVERLAP_GRAD_REDUCE"),
    "param_gather": ("parameters' all-gather", "TULU_OVERLAP_PARAM_GATHER"),
    "sp": ("SP backward", "TULU_SP_OVERLAP"),
}
# what each run must train to, as the default does (the overlaps change no bits: on a GPU only a kernel's own
# run-to-run rounding, such as an atomic add's, could move them)
SAME = ("policy_loss", "value_loss", "grad_norm_policy", "grad_norm_value", "kl", "score")


def settings() -> dict[str, tuple[str, dict[str, str]]]:
    """{short name: (what, the environment it runs in)}, in the printed order: the default, each off alone, all off,
    all on in one hardware queue, all on with async TP."""
    out = {"default": ("all on (the default)", {})}
    out.update({key: (f"{what} in series", {env: "0"}) for key, (what, env) in SWITCHES.items()})
    out["none"] = ("all three in series", {env: "0" for _, env in SWITCHES.values()})
    # Megatron's setting for its overlaps (one hardware queue: a collective launched before a GEMM is dispatched
    # before it, and not starved of SMs by it); it also serialises the side streams (a stream's wait blocks the rest)
    out["one_queue"] = ("all on, CUDA_DEVICE_MAX_CONNECTIONS=1", {"CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    # torch's async TP for sequence parallelism's forwards (engine.parallel.ASYNC_TP; off by default, untimed): its
    # sums run in another order, so its row differs in bf16's last bits (its small losses may draw the warning)
    out["async_tp"] = ("all on, async TP (TULU_ASYNC_TP=1)", {"TULU_ASYNC_TP": "1"})
    return out


def run_one(nproc: int, tp: int, flags: list[str], env_off: dict[str, str], json_path: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    for env_name in [env for _, env in SWITCHES.values()] + ["CUDA_DEVICE_MAX_CONNECTIONS", "TULU_ASYNC_TP"]:
        env.pop(env_name, None)
    env.update(env_off)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "bench/ppo_step.py"), "--tp", str(tp), *flags, "--json", json_path]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    with open(json_path) as f:
        return json.load(f)


def _rel(a, b) -> float:
    if a is None or b is None:
        return math.inf if (a is None) != (b is None) else 0.0
    return abs(a - b) / max(abs(b), 1e-12)


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--nproc", type=int, default=4, help="processes (devices) on this machine")
    p.add_argument("--tp", type=int, default=2, help="tensor parallel degree (the rest is DP)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument(
        "--settings", default=",".join(settings()), help="which runs, the first the baseline (default: %(default)s)"
    )
    a = p.parse_args(own)
    check_flags(p, a, positive_numbers=("timeout",))
    chosen = a.settings.split(",")
    if not chosen or any(c not in settings() for c in chosen):
        p.error(f"--settings {a.settings!r}: a comma-separated list of {', '.join(settings())}")
    if a.nproc < 1 or a.tp < 1 or a.nproc % a.tp:
        p.error(f"--nproc {a.nproc} must be a positive multiple of --tp {a.tp}")
    if not any(f == "--iterations" or f.startswith("--iterations=") for f in flags):
        flags += ["--iterations", "2"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, key in enumerate(chosen):
            name, env_off = settings()[key]
            out = run_one(a.nproc, a.tp, flags, env_off, os.path.join(tmp, f"run{k}.json"), a.timeout)
            best = min(out["metrics"], key=lambda m: m["time_train"])
            rows.append({"setting": name, "env": env_off, "time_train": best["time_train"],
                         "time_iteration": best["time_iteration"], "train_tok_s": best["train_tok_s"],
                         "device": out["device"], "world_size": out["world_size"], "tp": out["tp"],
                         "metrics": out["metrics"]})  # fmt: skip
            print(f"ran: {name} ({best['time_train']:.3f} s of training)", flush=True)
    base = rows[0]
    for r in rows:  # the same training, step for step (the first timed iteration's metrics)
        r["max_rel_diff"] = max(_rel(r["metrics"][0].get(k), base["metrics"][0].get(k)) for k in SAME)
    print(f"\nthe training phase's overlaps: {base['device']} x {base['world_size']} (tp {base['tp']}, dp "
          f"{base['world_size'] // base['tp']}); ppo_step flags: {' '.join(flags)}")  # fmt: skip
    print(f"{'setting':<44}{'train s':>10}{'vs first':>11}{'iteration s':>13}{'train tok/s':>13}{'max rel diff':>14}")
    for r in rows:
        print(f"{r['setting']:<44}{r['time_train']:>10.3f}{r['time_train'] / base['time_train'] - 1:>+11.1%}"
              f"{r['time_iteration']:>13.3f}{r['train_tok_s']:>13.0f}{r['max_rel_diff']:>14.2e}")  # fmt: skip
    moved = [r["setting"] for r in rows if r["max_rel_diff"] > 1e-3]
    if moved:
        print(f"warning: trained otherwise than the first run (losses, grad norms, KL or score off by > 1e-3): {moved}")
    write_json(a.json, [{k: v for k, v in r.items() if k != "metrics"} for r in rows])
    return rows


if __name__ == "__main__":
    main()
