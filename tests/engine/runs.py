"""The tiny PPO run the engine tests share: in one process with the reference ops, its TrainState, or under
torchrun (gloo) with every rank's result."""

import os
import subprocess
import sys

import torch

from engine import state as state_mod
from engine.checkpoint import load_pretrained
from engine.train_ppo import main, parse_args, prepare_tiny
from kernels import dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--rollout-batch-size", "8", "--train-batch-size", "4", "--max-new-tokens", "8"]
TIMING = ("gen_tok_s", "score_tok_s", "train_tok_s", "time_generate", "time_score", "time_train", "time_iteration")
TIMING += ("time_gen_setup", "gen_tflops_gpu", "score_tflops_gpu", "train_tflops_gpu", "time_dp_wait")


def small(flags) -> list[str]:
    """SMALL, less the batch sizes where `flags` evaluate alone (--eval-only refuses what it would not read)."""
    return SMALL[-2:] if "--eval-only" in flags else SMALL


def run_tiny(out, *flags, factory=None):
    with dispatch.reference_ops():
        return main(["--output-dir", str(out), *small(flags), *flags], generator_factory=factory)


def tiny_state(out, *flags, factory=None):
    cfg, run, _ = parse_args(["--output-dir", str(out), *small(flags), *flags])
    return state_mod.setup(cfg, prepare_tiny(run), generator_factory=factory or state_mod.make_generator)


def saved_weights(path, head):
    return load_pretrained(path, head=head).state_dict()


def no_timing(history):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


def torchrun_ranks(tmp_path, nproc: int, name: str, *flags, fails: bool = False, hooks=None):
    """engine.train_ppo under torchrun (gloo, the naive sampler) in tmp_path/name: every rank's result (or, with
    `fails`, the output of a run that must fail). `hooks`: a directory whose sitecustomize.py every process runs
    first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hooks), ROOT] if hooks else [ROOT]), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the workers run the CPU reference ops
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           os.path.join(ROOT, "tests/engine/ppo_dp_worker.py"), str(out), "--output-dir", str(out), *small(flags),
           *flags]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if fails:
        assert r.returncode != 0
        return r.stdout + r.stderr
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return ranks_of(out, nproc)


def ranks_of(out, nproc: int = 2) -> list[dict]:
    """Every rank's result of a torchrun_ranks run in directory `out`."""
    return [torch.load(out / f"result-rank{k}.pt", weights_only=False) for k in range(nproc)]
