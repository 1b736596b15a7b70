"""What one decoder layer keeps for its backward, per token, and what activation checkpointing keeps instead.

    python bench/activation_memory.py                                   # tiny shape
    TRITON_INTERPRET=1 torchrun --nproc_per_node 8 bench/activation_memory.py --model llama2-13b --tp 8

Measured as engine/recompute.py measures it for activation_checkpointing=auto: one layer's forward on a probe
under autograd's saved-tensor hooks (through the Triton kernels: on CPU set TRITON_INTERPRET=1, else the
reference attention, which keeps a tokens x tokens score matrix, is measured). Prints bytes per token with and
without sequence parallelism at the given TP degree, and the memory of a micro-batch keeping every layer
against recomputing all of them. A count, the same on every device; no timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import check_flags, run_main, write_json  # noqa: E402
from engine import recompute  # noqa: E402
from engine.config import MODEL_SHAPES, ModelConfig  # noqa: E402
from engine.distributed import init_process_grid, print0  # noqa: E402
from engine.model import Transformer  # noqa: E402


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", choices=list(MODEL_SHAPES))
    p.add_argument("--tp", type=int, default=1, help="tensor parallel degree (under torchrun)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, default=64, help="probe length")
    p.add_argument("--micro-batch-tokens", type=int, default=8192)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    check_flags(p, a, positive=("tp", "tokens", "micro_batch_tokens"))
    grid = init_process_grid(a.tp)
    full = ModelConfig.named(a.model)
    cfg = dataclasses.replace(full, num_layers=2)  # one layer is measured; two keep the shapes honest
    dtype = getattr(torch, a.dtype)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rows = []
    for sp in (False, True) if grid.tp > 1 else (False,):
        model = Transformer(cfg, dtype=dtype, device=device, group=grid.tp_group, sequence_parallel=sp)
        with torch.no_grad():
            for q in model.parameters():  # values do not matter; uninitialised memory may hold NaN
                q.fill_(0.01)
        kept, kept_act = recompute.activation_bytes(model, a.tokens)
        ckpt = recompute.checkpoint_bytes(model)
        n, layers = a.micro_batch_tokens, full.num_layers
        rows.append({
            "model": a.model, "tp": grid.tp, "sequence_parallel": sp, "dtype": a.dtype,
            "layer_bytes_per_token": kept, "checkpoint_bytes_per_token": ckpt,
            "micro_batch_keep_all_gib": n * layers * kept / 2**30,
            "micro_batch_recompute_all_gib": n * (layers * ckpt + kept) / 2**30,
            # the MLPs' activations recomputed in the backward (engine.recompute.mlp_recompute), the layers kept
            "layer_bytes_per_token_mlp_recompute": kept_act,
            "micro_batch_keep_all_gib_mlp_recompute": n * layers * kept_act / 2**30,
        })  # fmt: skip
        del model
    print0(f"{a.model} ({full.num_layers} layers), {a.dtype}, TP={grid.tp}, micro-batch {a.micro_batch_tokens} tokens")
    print0(f"{'sequence parallel':<20}{'KB/token kept':>15}{'recomputed':>12}{'keep all GiB':>14}{'recompute GiB':>15}"
           f"{'MLP act recomputed: KB/token':>30}{'keep all GiB':>14}")  # fmt: skip
    for r in rows:
        print0(
            f"{'on' if r['sequence_parallel'] else 'off':<20}{r['layer_bytes_per_token'] / 1024:>15.1f}"
            f"{r['checkpoint_bytes_per_token'] / 1024:>12.2f}{r['micro_batch_keep_all_gib']:>14.2f}"
            f"{r['micro_batch_recompute_all_gib']:>15.2f}{r['layer_bytes_per_token_mlp_recompute'] / 1024:>30.1f}"
            f"{r['micro_batch_keep_all_gib_mlp_recompute']:>14.2f}"
        )
    write_json(a.json, rows)
    return rows


if __name__ == "__main__":
    run_main(main)
