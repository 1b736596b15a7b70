"""Tensor parallelism (Megatron style) and the torchrun process grid.

The layers hold only this rank's shard of each weight. Each parameter carries a `weight_loader`
that receives a lazily-indexable source of the full tensor (a safetensors slice or a tensor) and
copies in just its shard, so a TP load never reads more than its slice from disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------ process grid --


@dataclass
class ProcessGrid:
    rank: int = 0
    world_size: int = 1
    tp: int = 1
    dp: int = 1
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp


def init_process_grid(tp: int = 1, backend: str | None = None) -> ProcessGrid:
    """Initialise torch.distributed from torchrun's environment (NCCL on GPUs, gloo on CPU).

    Without torchrun (no WORLD_SIZE) returns a single-process grid and starts nothing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        if tp != 1:
            raise ValueError(f"tensor parallel degree {tp} needs {tp} processes; launch with torchrun")
        return ProcessGrid()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise ValueError(f"world size {world} is not a multiple of the tensor parallel degree {tp}")
    dp = world // tp
    grid = ProcessGrid(rank=rank, world_size=world, tp=tp, dp=dp)
    for d in range(dp):  # every rank must create every group, in the same order
        ranks = list(range(d * tp, (d + 1) * tp))
        g = dist.new_group(ranks)
        if rank in ranks:
            grid.tp_group = g
    for t in range(tp):
        ranks = list(range(t, world, tp))
        g = dist.new_group(ranks)
        if rank in ranks:
            grid.dp_group = g
    return grid


def print0(*args, **kwargs) -> None:
    """print on global rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


# --------------------------------------------------------------- autograd-aware collectives --


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward (input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward (output of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dim forward, slice backward (full logits from vocab shards)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        size = grad.shape[-1] // dist.get_world_size(ctx.group)
        r = dist.get_rank(ctx.group)
        return grad[..., r * size : (r + 1) * size].contiguous(), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


# ---------------------------------------------------------------------------------- layers --


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"tensor {name}: shard has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def _rows(source, start: int, stop: int) -> torch.Tensor:
    return source[start:stop]


def _cols(source, start: int, stop: int) -> torch.Tensor:
    return source[:, start:stop]


def _split(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"tensor parallel degree {tp} does not divide {what} ({n})")
    return n // tp


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across TP ranks; several logical weights may be fused.

    `output_sizes` are the full sizes of the fused parts (e.g. [q, k, v]); rank r holds rows
    [r*s/tp, (r+1)*s/tp) of every part, concatenated. `shard_units` gives each part's indivisible
    unit (a head's width), so the error names heads rather than rows.
    """

    def __init__(self, in_features, output_sizes, group=None, shard_units=None, names=None, **factory):
        super().__init__()
        tp = group_size(group)
        self.group, self.tp, self.tp_rank = group, tp, group_rank(group)
        self.output_sizes = list(output_sizes)
        units = shard_units or [1] * len(self.output_sizes)
        names = names or [f"output part {i}" for i in range(len(self.output_sizes))]
        for size, unit, nm in zip(self.output_sizes, units, names):
            _split(size // unit, tp, nm)
        self.local_sizes = [s // tp for s in self.output_sizes]
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), in_features, **factory))
        self.weight.weight_loader = self.load_part

    def load_part(self, source, part: int = 0, name: str = "weight") -> None:
        size = self.local_sizes[part]
        offset = sum(self.local_sizes[:part])
        start = self.tp_rank * size
        _copy_checked(self.weight.data[offset : offset + size], _rows(source, start, start + size), name)

    def full_part(self, part: int = 0) -> torch.Tensor:
        """This part's full weight, gathered from every rank (for saving)."""
        offset = sum(self.local_sizes[:part])
        local = self.weight.data[offset : offset + self.local_sizes[part]]
        return _gather_dim(local, 0, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across TP ranks; the partial outputs are all-reduced."""

    def __init__(self, in_features, out_features, group=None, shard_unit=1, name="input", **factory):
        super().__init__()
        tp = group_size(group)
        self.group, self.tp, self.tp_rank = group, tp, group_rank(group)
        _split(in_features // shard_unit, tp, name)
        self.local_in = in_features // tp
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in, **factory))
        self.weight.weight_loader = self.load_part

    def load_part(self, source, part: int = 0, name: str = "weight") -> None:
        start = self.tp_rank * self.local_in
        _copy_checked(self.weight.data, _cols(source, start, start + self.local_in), name)

    def full_part(self, part: int = 0) -> torch.Tensor:
        return _gather_dim(self.weight.data, 1, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(F.linear(x, self.weight), self.group)


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary rows split across TP ranks; out-of-shard ids contribute zeros."""

    def __init__(self, vocab_size, hidden_size, group=None, **factory):
        super().__init__()
        tp = group_size(group)
        self.group, self.tp, self.tp_rank = group, tp, group_rank(group)
        self.vocab_size = vocab_size
        self.local_vocab = _split(vocab_size, tp, "the vocabulary")
        self.vocab_start = self.tp_rank * self.local_vocab
        self.weight = nn.Parameter(torch.empty(self.local_vocab, hidden_size, **factory))
        self.weight.weight_loader = self.load_part

    def load_part(self, source, part: int = 0, name: str = "weight") -> None:
        start = self.vocab_start
        _copy_checked(self.weight.data, _rows(source, start, start + self.local_vocab), name)

    def full_part(self, part: int = 0) -> torch.Tensor:
        return _gather_dim(self.weight.data, 0, self.group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return reduce_from_tp(out, self.group)


class ReplicatedLinear(nn.Module):
    """A small weight every rank holds whole (the scalar score head)."""

    def __init__(self, in_features, out_features, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.weight.weight_loader = self.load_part

    def load_part(self, source, part: int = 0, name: str = "weight") -> None:
        _copy_checked(self.weight.data, source[:], name)

    def full_part(self, part: int = 0) -> torch.Tensor:
        return self.weight.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _gather_dim(local: torch.Tensor, dim: int, group) -> torch.Tensor:
    if group_size(group) == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(group_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
