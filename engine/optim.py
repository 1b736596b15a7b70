"""Optimizers of the trained models: Adam over fp32 master weights, written back in place.

With bf16 parameters the optimizer keeps fp32 masters and moments and copies each update back into
the very same bf16 tensors, so the generator (which reads those tensors) sees it with no copy.
Gradients are summed over data-parallel ranks in a few flat all-reduces, and the global grad norm
is correct under tensor parallelism (sharded tensors summed over the TP group, replicated ones once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.config import PPOConfig
from engine.model import Transformer
from engine.parallel import ColumnParallelLinear, ProcessGrid, RowParallelLinear, VocabParallelEmbedding


@dataclass
class Optimizer:
    """Adam over fp32 masters of one model's parameters (the parameters themselves when fp32)."""

    params: list[torch.nn.Parameter]
    masters: list[torch.Tensor]
    sharded: list[bool]  # split across TP ranks (their squared grad norms are summed over the group)
    adam: torch.optim.Optimizer
    tp_partial: list[bool]  # grads that each TP rank holds its tokens' share of (sequence parallel): summed


def make_optimizer(model: Transformer, cfg: PPOConfig) -> Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in params]
    sharded_ids = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)) and m.tp > 1
    }
    fused = {"fused": True} if params and params[0].is_cuda else {}
    adam = torch.optim.AdamW(
        masters, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay, **fused,
    )  # fmt: skip
    partial_ids = {id(p) for p in model.tp_partial_grads()}
    return Optimizer(
        params, masters, [id(p) in sharded_ids for p in params], adam, [id(p) in partial_ids for p in params]
    )


def accumulate_grads(opt: Optimizer) -> None:
    """Move a micro-batch's bf16 grads into the fp32 master grads (no-op for fp32 parameters)."""
    for p, m in zip(opt.params, opt.masters):
        if m is p or p.grad is None:
            continue
        if m.grad is None:
            m.grad = p.grad.float()
        else:
            m.grad.add_(p.grad)
        p.grad = None


def _all_reduce_flat(tensors: list[torch.Tensor], group, bucket_bytes: int = 256 * 2**20) -> None:
    """Sum tensors over `group` in a few large flat all_reduces."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors + [None]:
        if t is not None:
            bucket.append(t)
            size += t.numel() * t.element_size()
        if bucket and (t is None or size >= bucket_bytes):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat, group=group)
            for b, f in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(f.view_as(b))
            bucket, size = [], 0


def optimizer_step(opt: Optimizer, lr: float, cfg: PPOConfig, grid: ProcessGrid) -> torch.Tensor:
    """All-reduce grads over DP (and the sequence-parallel partial ones over TP), clip the global grad norm,
    Adam, write back to the parameters.

    Returns the grad norm before clipping (0-d tensor, no host sync).
    """
    for m in opt.masters:
        if m.grad is None:
            m.grad = torch.zeros_like(m)
    grads = [m.grad for m in opt.masters]
    partial = [g for g, p in zip(grads, opt.tp_partial) if p]
    if partial and grid.tp > 1:  # one flat all-reduce per step, not one per norm per micro-batch
        _all_reduce_flat(partial, grid.tp_group)
    if grid.dp > 1:
        _all_reduce_flat(grads, grid.dp_group)
    sq = torch.stack(torch._foreach_norm(grads)).square()  # one fused launch per few tensors
    sharded = torch.tensor(opt.sharded, device=sq.device)
    sharded_sq = torch.where(sharded, sq, 0.0).sum()
    if grid.tp > 1:  # TP shards: each rank holds a slice; replicated tensors are counted once
        dist.all_reduce(sharded_sq, group=grid.tp_group)
    norm = (torch.where(sharded, 0.0, sq).sum() + sharded_sq).sqrt()
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        torch._foreach_mul_(grads, (cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
    for group in opt.adam.param_groups:
        group["lr"] = lr
    opt.adam.step()
    opt.adam.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, m in zip(opt.params, opt.masters):
            if m is not p:
                p.copy_(m)  # in place: the generator reads these very tensors
    return norm
