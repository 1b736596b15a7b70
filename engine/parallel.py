"""Tensor parallelism (Megatron style): autograd-aware collectives and the sharded layers (the process grid and how
ranks agree: engine/distributed.py).

The layers hold only this rank's shard of each weight. Each parameter carries a `weight_loader`
that receives a lazily-indexable source of the full tensor (a safetensors slice or a tensor) and
copies in just its shard, so a TP load never reads more than its slice from disk.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from engine import symm_reduce
from engine.distributed import group_rank, group_size
from engine.errors import InvalidInput
from engine.grad_sums import linear, target, weight_grad
from kernels.dispatch import env_switch

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
        summed = symm_reduce.all_reduce(x, group)  # (a decode step's small sums, where prepared: engine/symm_reduce.py)
        if summed is not None:
            return summed
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
        return gather_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        size = grad.shape[-1] // dist.get_world_size(ctx.group)
        r = dist.get_rank(ctx.group)
        return grad[..., r * size : (r + 1) * size].contiguous(), None


# Sequence parallelism (Megatron's, for training): between the TP regions every rank holds only its
# contiguous 1/tp of the tokens, so the per-token passes there (residual adds, norms) are not repeated on
# every rank. A column-parallel layer all-gathers its input (reduce-scatter of the grad backward) in place
# of copy_to_tp, a row-parallel one reduce-scatters its output (all-gather backward) in place of the
# all-reduce: the same bytes on the wire as one all-reduce, split in its two halves.

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def gather_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's x concatenated along dim in rank order (no autograd), with one collective into one buffer."""
    tp = group_size(group)
    if tp == 1:
        return x
    out = x.new_empty(x.shape[0] * tp, *x.shape[1:])
    all_gather_single(out, x.contiguous(), group=group)
    if dim % x.dim() == 0:
        return out
    return torch.cat(out.view(tp, *x.shape).unbind(0), dim)


def _reduce_scatter_tokens(x: torch.Tensor, group) -> torch.Tensor:
    tp = group_size(group)
    if x.shape[0] % tp:
        raise ValueError(f"sequence parallel: {x.shape[0]} tokens do not split over {tp} tensor parallel ranks")
    out = x.new_empty(x.shape[0] // tp, *x.shape[1:])
    reduce_scatter_single(out, x.contiguous(), group=group)
    return out


def _my_tokens(x: torch.Tensor, group) -> torch.Tensor:
    n = x.shape[0] // group_size(group)
    r = group_rank(group)
    return x[r * n : (r + 1) * n].contiguous()


class _GatherTokens(torch.autograd.Function):
    """All-gather along the tokens forward; backward, this rank's tokens of the summed grad (reduce-scatter:
    each rank's grad is a partial sum, as a column-parallel layer's is) or of the grad as it is (`replicated`:
    every rank computed the same full grad)."""

    @staticmethod
    def forward(ctx, x, group, replicated):
        ctx.group, ctx.replicated = group, replicated
        return gather_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.replicated:
            return _my_tokens(grad, ctx.group), None, None
        return _reduce_scatter_tokens(grad, ctx.group), None, None


class _ScatterTokens(torch.autograd.Function):
    """Reduce-scatter along the tokens forward (partial sums -> this rank's tokens, summed), all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_tokens(x, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_dim(grad, 0, ctx.group), None


# A column-parallel layer under sequence parallelism keeps its input as this rank's tokens only and gathers them again
# in the backward (Megatron's): off (TULU_SP_OVERLAP=0), the gathered input is kept from the forward and the backward's
# collectives run in series with its GEMMs, the other side of an A/B
SP_OVERLAP = env_switch("TULU_SP_OVERLAP", True)


# Async TP (torch's symmetric-memory ops, as torchtitan's async tensor parallelism: a column-parallel layer's all-gather
# pipelined chunk by chunk into the GEMM that consumes it, a row-parallel layer's GEMM into the reduce-scatter that sums
# it, over NVLink peers' memory without NCCL kernels on the SMs) for sequence parallelism's training and scoring
# forwards and the row-parallel layer's backward: off until a multi-GPU machine has timed it (TULU_ASYNC_TP=1; CUDA
# only; the same products in another summation order, so not the same bits)
ASYNC_TP = env_switch("TULU_ASYNC_TP", False)
_SYMM_GROUPS: set[str] = set()


def _async_tp(x: torch.Tensor) -> bool:
    """Whether x's layer takes torch's fused ops: ASYNC_TP, on a GPU, and not inside a CUDA graph's capture."""
    return ASYNC_TP and x.is_cuda and not torch.cuda.is_current_stream_capturing()


def _symm_group(group) -> str:
    """The group's name for torch's symmetric-memory ops, which are enabled for it at its first use."""
    name = group.group_name
    if name not in _SYMM_GROUPS:
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        with warnings.catch_warnings():  # (needed before torch 2.8, deprecated since: a FutureWarning)
            warnings.simplefilter("ignore", FutureWarning)
            enable_symm_mem_for_group(name)
        _SYMM_GROUPS.add(name)
    return name


def _ag_mm(x: torch.Tensor, b: torch.Tensor, group, keep: bool = False):
    """(every rank's rows of x gathered, or None unless `keep`; that gathered x @ b), by torch's fused op."""
    gathered, (y,) = torch.ops.symm_mem.fused_all_gather_matmul(x, [b], 0, _symm_group(group), return_A=keep)
    return gathered, y


def _mm_rs(x: torch.Tensor, b: torch.Tensor, group) -> torch.Tensor:
    """This rank's rows of x @ b summed over the ranks, by torch's fused op."""
    return torch.ops.symm_mem.fused_matmul_reduce_scatter(x, b, "sum", 0, _symm_group(group))


def gathered_linear(x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
    """(every rank's tokens x) W^T, x [N/tp, in] this rank's (no autograd): with ASYNC_TP by the fused all-gather +
    GEMM, else gathered first."""
    if _async_tp(x):
        return _ag_mm(x, weight.t(), group)[1]
    return F.linear(gather_dim(x, 0, group), weight)


class _ScatteredLinear(torch.autograd.Function):
    """This rank's tokens of x W^T summed over the TP ranks (a row-parallel layer under sequence parallelism, ASYNC_TP)
    by the fused GEMM + reduce-scatter; the backward gathers dy into dx's GEMM by the fused all-gather + GEMM, keeping
    the gathered dy for the weight's grad (into its fp32 sum `acc`, or to autograd)."""

    @staticmethod
    def forward(ctx, x, weight, acc, group):
        ctx.save_for_backward(x, weight)
        ctx.acc, ctx.group = acc, group
        return _mm_rs(x, weight.t(), group)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        group, acc = ctx.group, ctx.acc
        ctx.acc = None
        dy = dy.contiguous()
        if ctx.needs_input_grad[0]:
            dy_full, dx = _ag_mm(dy, weight, group, keep=True)
        else:
            dy_full, dx = gather_dim(dy, 0, group), None
        want_w = acc is not None or ctx.needs_input_grad[1]
        gw = weight_grad(acc, dy_full, x, ctx.needs_input_grad[1]) if want_w else None
        return dx, gw, None, None


class _GatheredLinear(torch.autograd.Function):
    """y = (every rank's tokens x) W^T, x [N/tp, in] this rank's tokens (a column-parallel layer under sequence
    parallelism), whose backward overlaps both its collectives with its GEMMs (Megatron's): it keeps x, not the
    gathered [N, in] (tp times the bytes: at 13B, TP 8, 18 of the 40 KB a token and layer kept for the backward), so
    the backward gathers it again, launched first and run behind dx's GEMM (which does not read it); then dx's
    reduce-scatter runs behind the weight grad's GEMM. The weight's grad goes into its fp32 sum (`acc`,
    engine/grad_sums.py) or to autograd. The same products as gather_tokens then linear, to the bit."""

    @staticmethod
    def forward(ctx, x, weight, acc, group):
        ctx.save_for_backward(x, weight)
        ctx.acc, ctx.group = acc, group
        return gathered_linear(x, weight, group)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        group, acc = ctx.group, ctx.acc
        ctx.acc = None
        dy = dy.reshape(-1, dy.shape[-1])
        want_w = acc is not None or ctx.needs_input_grad[1]
        if want_w:
            full = x.new_empty(x.shape[0] * group_size(group), *x.shape[1:])
            gathering = all_gather_single(full, x.contiguous(), group=group, async_op=True)
        dx = scattering = None
        if ctx.needs_input_grad[0]:
            dx_full = dy @ weight
            dx = dx_full.new_empty(x.shape)
        if want_w:
            gathering.wait()
        if dx is not None:
            scattering = reduce_scatter_single(dx, dx_full, group=group, async_op=True)
        gw = weight_grad(acc, dy, full, ctx.needs_input_grad[1]) if want_w else None
        if scattering is not None:
            scattering.wait()
        return dx, gw, None, None


def gather_tokens(x: torch.Tensor, group, *, replicated_grad: bool = False) -> torch.Tensor:
    """[N/tp, ...] this rank's tokens -> [N, ...] every rank's (sequence parallel -> TP region)."""
    return x if group_size(group) == 1 else _GatherTokens.apply(x, group, replicated_grad)


def scatter_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """[N, ...] partial sums over the TP ranks -> [N/tp, ...] this rank's tokens, summed (TP region -> sequence
    parallel)."""
    return x if group_size(group) == 1 else _ScatterTokens.apply(x, group)


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


def _load_rows(dst: torch.Tensor, source, size: int, tp: int, rank: int, name: str) -> None:
    """Copy this rank's rows of a `size`-row source into its shard `dst` (shard_range): the real rows, zeros in the
    padding after them."""
    rows, start, real = shard_range(size, tp, rank)
    _copy_checked(dst[:real], _rows(source, start, start + real), name)
    dst[real:].zero_()


def _rows(source, start: int, stop: int) -> torch.Tensor:
    return source[start:stop]


def _cols(source, start: int, stop: int) -> torch.Tensor:
    return source[:, start:stop]


def _split(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise InvalidInput(f"tensor parallel degree {tp} does not divide {what} ({n})")
    return n // tp


def shard_rows(size: int, tp: int) -> int:
    """The rows of a `size`-row tensor that each of `tp` ranks holds: size / tp, rounded up. A vocabulary the degree
    does not divide (Llama 2 with an added pad token: 32001) is padded so (Megatron's way): the last ranks' shards
    end in rows that are no token, zero in the weights, whose logits the model sets to -inf."""
    return -(-size // tp)


def shard_range(size: int, tp: int, rank: int, what: str = "the vocabulary") -> tuple[int, int, int]:
    """(rows per rank, this rank's first row, how many of its rows are real) of a tensor of `size` rows split over
    `tp` ranks (shard_rows); a degree that would leave a rank no real row is refused."""
    if tp < 1:
        raise InvalidInput(f"tensor parallel degree {tp} must be at least 1")
    rows = shard_rows(size, tp)
    if rows * (tp - 1) >= size:
        raise InvalidInput(f"tensor parallel degree {tp} leaves a rank none of {what} ({size})")
    start = rank * rows
    return rows, start, max(0, min(rows, size - start))


def take_shard(full: torch.Tensor, dim: int, rows: int, start: int, real: int) -> torch.Tensor:
    """A rank's shard of `full` along `dim` (shard_range's rows, start, real): its real rows, zero rows after them."""
    part = full.narrow(dim, start, real)
    if real == rows:
        return part
    shape = list(full.shape)
    shape[dim] = rows - real
    return torch.cat([part, full.new_zeros(shape)], dim)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across TP ranks; several logical weights may be fused.

    `output_sizes` are the full sizes of the fused parts (e.g. [q, k, v]); rank r holds rows
    [r*s/tp, (r+1)*s/tp) of every part, concatenated. `shard_units` gives each part's indivisible
    unit (a head's width), so the error names heads rather than rows. `padded` (one part: an LM head): the degree
    need not divide it, each rank holds shard_rows(s, tp) rows from r*shard_rows, the last ones zero padding.
    """

    def __init__(self, in_features, output_sizes, group=None, shard_units=None, names=None, padded=False, **factory):
        super().__init__()
        tp = group_size(group)
        self.group, self.tp, self.tp_rank = group, tp, group_rank(group)
        self.output_sizes = list(output_sizes)
        units = shard_units or [1] * len(self.output_sizes)
        names = names or [f"output part {i}" for i in range(len(self.output_sizes))]
        if padded:  # one part (an LM head) whose rows the degree need not divide: see shard_rows
            assert len(self.output_sizes) == 1, "only a single-part layer is padded"
            rows, _, self.real_rows = shard_range(self.output_sizes[0], tp, self.tp_rank, names[0])
            self.local_sizes = [rows]
        else:
            for size, unit, nm in zip(self.output_sizes, units, names):
                _split(size // unit, tp, nm)
            self.local_sizes = [s // tp for s in self.output_sizes]
            self.real_rows = sum(self.local_sizes)
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), in_features, **factory))
        self.weight.weight_loader = self.load_part

    def load_part(self, source, part: int = 0, name: str = "weight") -> None:
        size = self.local_sizes[part]
        offset = sum(self.local_sizes[:part])
        _load_rows(self.weight.data[offset : offset + size], source, self.output_sizes[part], self.tp, self.tp_rank,
                   name)  # fmt: skip

    @property
    def tp_split(self) -> tuple[int, list[int]]:
        """(the split dim, the full sizes of the parts along it): each rank holds shard_rows(size, tp) rows of every
        part, in order (1/tp of it, but where a padded vocabulary's last rows pad it)."""
        return 0, self.output_sizes

    def full_part(self, part: int = 0) -> torch.Tensor:
        """This part's full weight, gathered from every rank (for saving)."""
        offset = sum(self.local_sizes[:part])
        local = self.weight.data[offset : offset + self.local_sizes[part]]
        return gather_dim(local, 0, self.group)[: self.output_sizes[part]]  # (less a padded vocabulary's tail)

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """x [N, in] replicated, or [N/tp, in] this rank's tokens with `sequence_parallel` (gathered first; with
        autograd, _GatheredLinear)."""
        if sequence_parallel and self.tp > 1 and SP_OVERLAP and torch.is_grad_enabled() and x.dim() == 2:
            if x.requires_grad or self.weight.requires_grad:
                return _GatheredLinear.apply(x, self.weight, target(self.weight), self.group)
        if sequence_parallel and self.tp > 1 and _async_tp(x) and not torch.is_grad_enabled() and x.dim() == 2:
            return gathered_linear(x, self.weight, self.group)  # (the scoring passes)
        x = gather_tokens(x, self.group) if sequence_parallel else copy_to_tp(x, self.group)
        return linear(x, self.weight)  # (F.linear, a decode step's kernels/decode_linear.py, or engine/grad_sums.py)


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

    @property
    def tp_split(self) -> tuple[int, list[int]]:
        return 1, [self.local_in * self.tp]

    def full_part(self, part: int = 0) -> torch.Tensor:
        return gather_dim(self.weight.data, 1, self.group)

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """-> [N, out] summed over the ranks, or with `sequence_parallel` [N/tp, out] this rank's tokens, summed."""
        # (with ASYNC_TP, the GEMM and its reduce-scatter fused)
        if sequence_parallel and self.tp > 1 and _async_tp(x) and x.dim() == 2:
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _ScatteredLinear.apply(x, self.weight, target(self.weight), self.group)
            return _mm_rs(x, self.weight.t(), self.group)
        return self.reduce(linear(x, self.weight), sequence_parallel)

    def reduce(self, y: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """This rank's partial product y [N, out] summed over the ranks (with `sequence_parallel`, this rank's
        tokens of the sum): the layer's forward after its GEMM."""
        return scatter_tokens(y, self.group) if sequence_parallel else reduce_from_tp(y, self.group)


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary rows split across TP ranks; out-of-shard ids contribute zeros."""

    def __init__(self, vocab_size, hidden_size, group=None, **factory):
        super().__init__()
        tp = group_size(group)
        self.group, self.tp, self.tp_rank = group, tp, group_rank(group)
        self.vocab_size = vocab_size
        # (the last ranks' rows may end in padding: shard_rows; ids never reach it)
        self.local_vocab, self.vocab_start, self.real_rows = shard_range(vocab_size, tp, self.tp_rank)
        self.weight = nn.Parameter(torch.empty(self.local_vocab, hidden_size, **factory))
        self.weight.weight_loader = self.load_part

    def load_part(self, source, part: int = 0, name: str = "weight") -> None:
        _load_rows(self.weight.data, source, self.vocab_size, self.tp, self.tp_rank, name)

    @property
    def tp_split(self) -> tuple[int, list[int]]:
        return 0, [self.vocab_size]

    def full_part(self, part: int = 0) -> torch.Tensor:
        return gather_dim(self.weight.data, 0, self.group)[: self.vocab_size]

    def forward(self, ids: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """ids [N] -> [N, hidden], or with `sequence_parallel` [N/tp, hidden] this rank's tokens."""
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return scatter_tokens(out, self.group) if sequence_parallel else reduce_from_tp(out, self.group)


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
