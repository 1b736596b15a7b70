"""What each GPU will hold before anything is loaded: the four models' weights (this rank's TP slices), the two
trained models' fp32 masters and Adam moments (1/dp of them with the distributed optimizer) and their fp32
gradients. A run whose fixed share does not fit is refused before four checkpoints are read, with the numbers and
the layouts that would fit; one that fits prints what is left for the KV cache and the activations.

The shapes come from meta-device models built as the run builds them (this rank's TP slices, no memory).
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.model import Transformer

GiB = 2**30
FIXED_SHARE_LIMIT = 0.95  # of the free memory: the rest goes to the CUDA context, NCCL buffers and fragmentation


def local_numel(config: ModelConfig, head: str, group=None) -> int:
    """Parameters of `config` that this TP rank holds (its slices of the split weights, the replicated ones)."""
    model = Transformer(config, head, group=group, dtype=torch.bfloat16, device="meta")
    return sum(p.numel() for p in model.parameters())


def fixed_bytes(numels: dict[str, int], trained: tuple[str, ...], dtype: torch.dtype, dp: int, distributed: bool):
    """{what: bytes} this rank holds for the whole run: every model's weights in `dtype`; for the trained ones the
    fp32 masters (none for fp32 weights, which are their own) and the two Adam moments, split over the `dp` ranks
    with the distributed optimizer, and the fp32 gradients (summed over a step's micro-batches, whole on every
    rank until the reduce-scatter)."""
    elt = torch.empty((), dtype=dtype).element_size()
    state_per_param = (8 if dtype == torch.float32 else 12) / (dp if distributed and dp > 1 else 1)
    out = {f"weights ({name})": n * elt for name, n in numels.items()}
    out["optimizer (masters, Adam moments)"] = int(sum(numels[m] for m in trained) * state_per_param)
    out["fp32 gradients"] = sum(numels[m] for m in trained) * 4
    return out


def describe(parts: dict[str, int], free: int) -> str:
    used = sum(parts.values())
    items = ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items())
    return f"{used / GiB:.1f} GiB of {free / GiB:.1f} GiB free per GPU ({items})"


def check_fits(parts: dict[str, int], free: int, alternatives: list[str]) -> str:
    """The plan's line (for the log), or ValueError naming the numbers and `alternatives` that would fit."""
    used = sum(parts.values())
    if used <= FIXED_SHARE_LIMIT * free:
        return f"memory plan: {describe(parts, free)}; {(free - used) / GiB:.1f} GiB left for KV cache and activations"
    hint = f"; it would fit with {' or '.join(alternatives)}" if alternatives else ""
    raise ValueError(
        f"the models and optimizer state need {describe(parts, free)}: more than {FIXED_SHARE_LIMIT:.0%} of the "
        f"free memory, before any KV cache or activation{hint} (a larger --tp splits every model; more "
        "data-parallel ranks with --distributed-optimizer split the optimizer state)"
    )


def plan(
    configs: dict[str, tuple[ModelConfig, str]],
    trained: tuple[str, ...],
    dtype: torch.dtype,
    tp: int,
    dp: int,
    distributed: bool,
    free: int,
    group=None,
) -> str:
    """check_fits for models {name: (config, head)} at this grid; when they do not fit, the alternatives named are
    the next TP degree that would (one that divides the heads, vocabulary and MLP) and, with the distributed
    optimizer, the DP size that would."""
    numels = {name: local_numel(c, head, group) for name, (c, head) in configs.items()}
    parts = fixed_bytes(numels, trained, dtype, dp, distributed)
    fits = lambda p: sum(p.values()) <= FIXED_SHARE_LIMIT * free  # noqa: E731
    alternatives = []
    if not fits(parts):
        sizes = [n for c, _ in configs.values() for n in (c.num_kv_heads, c.vocab_size, c.intermediate_size)]
        for t in (2 * tp, 4 * tp, 8 * tp):  # the TP slices scale as 1/tp (the replicated norms are negligible)
            scaled = {k: v * tp // t for k, v in numels.items()}
            if all(n % t == 0 for n in sizes) and fits(fixed_bytes(scaled, trained, dtype, dp, distributed)):
                alternatives.append(f"--tp {t}")
                break
        for d in (2 * dp, 4 * dp, 8 * dp, 16 * dp) if distributed else ():
            if fits(fixed_bytes(numels, trained, dtype, d, True)):
                alternatives.append(f"{d} data-parallel ranks of --tp {tp} ({d * tp} GPUs)")
                break
    return check_fits(parts, free, alternatives)
