"""Optimizers of the trained models: Adam over fp32 master weights, written back in place.

With bf16 parameters the optimizer keeps fp32 masters and moments and copies each update back into
the very same bf16 tensors, so the generator (which reads those tensors) sees it with no copy.
Gradients are summed over data-parallel ranks in a few flat all-reduces, and the global grad norm
is correct under tensor parallelism (sharded tensors summed over the TP group, replicated ones once).

With data parallelism, `distributed=True` shards the optimizer over the DP ranks (ZeRO stage 1, Megatron's
distributed optimizer): the parameters are laid end to end in buckets of flat fp32 grads; each step
reduce-scatters every bucket over the DP group (half an all-reduce's bytes), each rank updates the fp32
masters and Adam moments of its 1/dp of every bucket, and an all-gather (the other half) brings the updated
values back into the parameters. The same update; 12 / dp instead of 12 bytes of optimizer state per parameter.

The grads' DP reduction runs during the step's last backward and the parameters' all-gather after the trainer's
updates while what follows runs (engine/dp_overlap.py: backward(), settle()).

Between updates the state is idle: offload_state() moves the fp32 masters and Adam moments to pinned host memory (the
rollout's KV cache gets their GPU memory) and onload_state() brings them back on a side stream, overlapping whatever
runs next (the scoring passes); the update waits for it. With `host_resident` the state lives in host memory
throughout and each update streams it through the device in chunks (the next chunk coming in and the last going out
while one is updated): the device holds the weights, the grads and a few chunks, and the update is the same
(engine/offload.py moves the tensors).
"""

from __future__ import annotations

import copy
import functools
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.config import PPOConfig
from engine.distributed import ProcessGrid
from engine.dp_overlap import (
    BUCKET_BYTES,
    Gathers,
    Unit,
    Watch,
    all_reduce_flat,
    dp_units,
    gather_params,
    launch,
    own_grad,
    param_done,
    wait,
)
from engine.model import Transformer
from engine.offload import HostCopies, ensure_state, groups, streamed
from engine.parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from engine.reshard import SavedOptimizer, relayout


@dataclass
class _Bucket:
    """Consecutive parameters whose fp32 grads share one flat buffer, split in dp equal shards (ZeRO-1)."""

    params: list[int]  # indices into Optimizer.params
    offsets: list[int]  # where each starts in the flat buffer
    numel: int  # the parameters' elements, padded to a multiple of dp
    lo: int  # this rank's shard of the buffer: [lo, lo + numel / dp)
    # [numel] fp32, this rank's sum over a step's micro-batches: allocated by the first, freed by the reduce-scatter
    # (so the rollout's KV cache has that memory between steps)
    grad: torch.Tensor | None = None
    # the pieces of parameters in this rank's shard: (param, start, stop) in the shard, first element in the param
    segments: list[tuple[int, int, int, int]] = field(default_factory=list)


@dataclass
class Optimizer:
    """Adam over fp32 masters of one model's parameters (the parameters themselves when fp32), or with `buckets`
    over this DP rank's shards of them (then `masters` holds one flat fp32 shard per bucket)."""

    params: list[torch.nn.Parameter]
    masters: list[torch.Tensor]
    sharded: list[bool]  # split across TP ranks (their squared grad norms are summed over the group)
    adam: torch.optim.Optimizer
    tp_partial: list[bool]  # grads that each TP rank holds its tokens' share of (sequence parallel): summed
    # how each parameter is split over the TP ranks, whatever the degree (the layer's tp_split: dim, part sizes),
    # None where every rank holds it whole: what re-laying a checkpoint for another TP degree needs
    splits: list[tuple[int, list[int]] | None]
    buckets: list[_Bucket] | None = None  # the distributed optimizer (ZeRO-1) over grid.dp_group
    dp_group: dist.ProcessGroup | None = None
    # per master, its fp32 grad summed over a step's micro-batches (and reduced) on the device, until the update
    grads: list[torch.Tensor | None] = field(default_factory=list)
    offload: HostCopies | None = None  # the state's host copies (offload_state, or host_resident)
    host_resident: bool = False  # the state lives in host memory; each update streams it through the device
    # which of the grad norm's pieces are TP-sharded, on the device: built at the first norm (a copy from pageable
    # host memory waits for the stream: each step's would stall the CPU behind the backward it queues work after)
    norm_mask: torch.Tensor | None = None
    slots: dict[int, tuple[_Bucket, int]] = field(default_factory=dict)  # with buckets: parameter -> (bucket, offset)
    # with DP > 1: the DP reductions' units (built at the first), each parameter's unit, and how many units (the
    # first ones) are not launched yet this step: they go last first (dp_overlap.launch)
    units: list[Unit] | None = None
    unit_of: dict[int, int] = field(default_factory=dict)
    unlaunched: int = 0
    watch: Watch | None = None  # the backward launching them, while it runs
    gathers: Gathers | None = None  # the distributed optimizer's parameter all-gathers left running (settle())

    def __post_init__(self) -> None:
        self.grads = self.grads or [None] * len(self.masters)
        for b in self.buckets or ():
            self.slots.update({i: (b, start) for i, start in zip(b.params, b.offsets)})


def make_optimizer(
    model: Transformer,
    cfg: PPOConfig,
    grid: ProcessGrid | None = None,
    *,
    distributed: bool = False,
    bucket_bytes: int = BUCKET_BYTES,
    host_resident: bool = False,
) -> Optimizer:
    """Adam for `model`; `distributed` (and more than one DP rank in `grid`): shard it over the DP ranks, in
    buckets of about `bucket_bytes` of fp32 grads (a larger parameter has a bucket of its own); `host_resident`:
    the masters and moments are built in pinned host memory and stay there (never whole on the device)."""
    params = [p for p in model.parameters() if p.requires_grad]
    parallel = [
        m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding))
    ]
    split_of = {id(m.weight): m.tp_split for m in parallel}
    sharded_ids = {id(m.weight) for m in parallel if m.tp > 1}
    partial_ids = {id(p) for p in model.tp_partial_grads()}
    sharded = [id(p) in sharded_ids for p in params]
    tp_partial = [id(p) in partial_ids for p in params]
    buckets = None
    home = params[0].device if params else torch.device("cpu")
    if distributed and grid is not None and grid.dp > 1:
        buckets = _make_buckets(params, grid, bucket_bytes // 4)
    # a host-resident state is made on its host buffers (one page-locked block): never whole on the device, nor twice
    # on the host. {master index: [its master (unless the parameter is its own), exp_avg, exp_avg_sq]}
    copies = HostCopies(home) if host_resident else None
    built = copies.on_buffers(_state_specs(params, buckets, grid)) if copies else None
    if buckets is not None:
        masters = [_flat_shard(params, b, grid.dp, out=built[k][0] if built else None) for k, b in enumerate(buckets)]
    elif built:
        masters = [built[i][0].copy_(p.detach()) if p.dtype != torch.float32 else p for i, p in enumerate(params)]
    else:
        masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in params]
    fused = {"fused": True} if home.type == "cuda" else {}
    adam = torch.optim.AdamW(
        masters, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay, **fused,
    )  # fmt: skip
    dp_group = grid.dp_group if buckets else None
    splits = [split_of.get(id(p)) for p in params]
    opt = Optimizer(params, masters, sharded, adam, tp_partial, splits, buckets, dp_group)
    fold_during_backward(opt)
    if built is None:
        _allocate_moments(adam)
        return opt
    for i, m in enumerate(masters):  # what torch's first step would create: zero moments, a step count of 0
        step = torch.zeros((), dtype=torch.float32, device=home if fused else "cpu")  # (on the device if fused)
        adam.state[m] = {"step": step, "exp_avg": built[i][-2].zero_(), "exp_avg_sq": built[i][-1].zero_()}
    opt.host_resident, opt.offload = True, copies
    return opt


def _state_specs(params, buckets, grid):
    """Per master (index), the shapes of the tensors offload.groups() moves: its master unless the parameter is its
    own (fp32), and the two moments."""
    if buckets is not None:
        return [(k, [(torch.Size([b.numel // grid.dp]), torch.float32)] * 3) for k, b in enumerate(buckets)]
    return [(i, [(p.shape, torch.float32)] * (2 if p.dtype == torch.float32 else 3)) for i, p in enumerate(params)]


def _allocate_moments(adam: torch.optim.Optimizer) -> None:
    """Allocate Adam's moments now rather than at the first step (torch's way), so the memory they take is in use
    before the first rollout sizes its KV cache: every rollout then gets a cache of the same size, and its decode
    graphs can replay from the second rollout on. One step at lr 0 on zero grads (the values stay as they are:
    p * (1 - 0 * wd) - 0 * update), then the step count back to 0, so the first real step is the first."""
    lrs = [g["lr"] for g in adam.param_groups]
    for g in adam.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    adam.step()
    adam.zero_grad(set_to_none=True)
    for g, lr in zip(adam.param_groups, lrs):
        g["lr"] = lr
    for st in adam.state.values():
        st["step"] = torch.zeros_like(st["step"]) if torch.is_tensor(st["step"]) else 0


def _make_buckets(params: list[torch.nn.Parameter], grid: ProcessGrid, cap: int) -> list[_Bucket]:
    groups: list[list[int]] = []
    size = 0
    for i, p in enumerate(params):  # a new bucket when full or when the dtype changes
        if not groups or size + p.numel() > cap or params[groups[-1][0]].dtype != p.dtype:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += p.numel()
    buckets = []
    for idx in groups:
        offsets = [0]
        for i in idx:
            offsets.append(offsets[-1] + params[i].numel())
        numel = -(-offsets[-1] // grid.dp) * grid.dp
        shard = numel // grid.dp
        lo = grid.dp_rank * shard
        b = _Bucket(idx, offsets[:-1], numel, lo)
        for i, start in zip(idx, b.offsets):
            a, z = max(start, lo), min(start + params[i].numel(), lo + shard)
            if a < z:
                b.segments.append((i, a - lo, z - lo, a - start))
        buckets.append(b)
    return buckets


def _flat_shard(tensors: list[torch.Tensor], b: _Bucket, dp: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's shard of bucket b of per-parameter `tensors` (the parameters: the masters; or Adam's moments),
    flat fp32, on their device (or into `out`)."""
    if out is None:
        out = torch.empty(b.numel // dp, dtype=torch.float32, device=tensors[b.params[0]].device)
    shard = out.zero_()
    for i, start, stop, first in b.segments:
        shard[start:stop] = tensors[i].detach().reshape(-1)[first : first + stop - start]
    return shard


def accumulate_grads(opt: Optimizer) -> None:
    """Move a micro-batch's grads into the fp32 master grads (no-op for fp32 parameters without `buckets`). The
    backward has already moved each as autograd finished it (fold_during_backward); this takes what a caller set
    on the parameters by hand."""
    for i in range(len(opt.params)):
        _fold(opt, i)


def grad_sum(opt: Optimizer, i: int) -> torch.Tensor | None:
    """Parameter i's fp32 sum of grads over the step's micro-batches, as a tensor of its shape (its master grad, or
    its place in its bucket's flat grad), made zero if the step has none yet; None for an fp32 parameter, its own
    master (autograd sums its grad in place). What _fold adds a grad to, and where engine/grad_sums.py has a weight's
    grad made straight into."""
    p = opt.params[i]
    if opt.buckets is not None:
        b, start = opt.slots[i]
        if b.grad is None:
            b.grad = torch.zeros(b.numel, dtype=torch.float32, device=p.device)
        return b.grad[start : start + p.numel()].view(p.shape)
    if opt.masters[i] is p:
        return None
    if opt.grads[i] is None:
        opt.grads[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    return opt.grads[i]


def _fold(opt: Optimizer, i: int) -> None:
    """Add parameter i's grad (a micro-batch's, in the parameter's dtype) into its fp32 sum (grad_sum) and free it."""
    p = opt.params[i]
    if p.grad is None:
        return
    if opt.units is not None and opt.unit_of[i] >= opt.unlaunched:
        raise RuntimeError(
            f"a grad of parameter {i} {tuple(p.shape)} arrived after its DP reduction was launched (during the "
            "step's last backward, once autograd had finished the parameter): a grad set by hand belongs before it"
        )
    if opt.buckets is None and opt.masters[i] is p:  # (an fp32 parameter's grad accumulates in place)
        return
    if opt.buckets is None and opt.grads[i] is None:
        opt.grads[i] = p.grad.float()  # (the step's first: a copy, no zeros to add to)
    else:
        grad_sum(opt, i).add_(p.grad)
    p.grad = None


def fold_during_backward(opt: Optimizer) -> None:
    """Each parameter's grad is folded into its fp32 sum (_fold) as soon as autograd has finished it, so a backward
    never holds the whole model's grads in the parameters' dtype beside the fp32 ones (a 13B model's bf16 grads at
    tp 8: 3.3 GB per GPU), only those of the layers in flight. The optimizer built last for a parameter takes its
    grads; a dead one's hooks do nothing. Each parameter's `grad_sum()` gives its sum (grad_sum, or None once the
    optimizer is gone): where engine/grad_sums.py makes a linear layer's weight grad in the first place."""
    ref = _OptimizerRef(opt)
    for i, p in enumerate(opt.params):
        old = getattr(p, "_fold_hook", None)
        if old is not None:
            old.remove()
        p._fold_hook = p.register_post_accumulate_grad_hook(functools.partial(_fold_hook, ref, i))
        p.grad_sum = functools.partial(_grad_sum_of, ref, i)


class _OptimizerRef:
    """A weak reference to an optimizer, which a parameter's hook and grad_sum getter hold; pickled (torch.save of a
    model, whose parameters carry them) as a dead one: a model loaded back has no optimizer."""

    def __init__(self, opt: Optimizer | None = None) -> None:
        self._ref = weakref.ref(opt) if opt is not None else None

    def __call__(self) -> Optimizer | None:
        return self._ref() if self._ref is not None else None

    def __reduce__(self):
        return (_OptimizerRef, ())


def _fold_hook(ref: _OptimizerRef, i: int, param: torch.Tensor) -> None:
    opt = ref()
    if opt is not None:
        _fold(opt, i)
        if opt.watch is not None:  # (autograd has finished the parameter: runs once a backward)
            param_done(opt, i)


def _grad_sum_of(ref: _OptimizerRef, i: int) -> torch.Tensor | None:
    opt = ref()
    return None if opt is None else grad_sum(opt, i)


def _grad_norm(opt: Optimizer, grads: list[torch.Tensor], sharded: list[bool], grid: ProcessGrid, device,
               dp_group=None):  # fmt: skip
    """sqrt of the sum of squares: TP-sharded pieces (`sharded`, the same every step: opt.norm_mask) summed over the
    TP group, replicated ones counted once; with `dp_group` the pieces are disjoint shards over the DP ranks, summed
    over them too."""
    if grads:
        sq = torch.stack(torch._foreach_norm(grads)).square()  # one fused launch per few tensors
        if opt.norm_mask is None:
            opt.norm_mask = torch.tensor(sharded, device=sq.device)
        is_sharded = opt.norm_mask
        parts = torch.stack([torch.where(is_sharded, 0.0, sq).sum(), torch.where(is_sharded, sq, 0.0).sum()])
    else:  # a rank whose shards hold only padding
        parts = torch.zeros(2, device=device)
    if dp_group is not None:
        dist.all_reduce(parts, group=dp_group)
    replicated, tp_sharded = parts.unbind()
    if grid.tp > 1:  # TP shards: each rank holds a slice; replicated tensors are counted once
        tp_sharded = tp_sharded.clone()
        dist.all_reduce(tp_sharded, group=grid.tp_group)
    return (replicated + tp_sharded).sqrt()


def optimizer_step(opt: Optimizer, lr: float, cfg: PPOConfig, grid: ProcessGrid) -> torch.Tensor:
    """reduce_grads then apply_update. Returns the grad norm before clipping (0-d tensor, no host sync)."""
    norm = reduce_grads(opt, grid)
    apply_update(opt, norm, lr, cfg)
    return norm


def reduce_grads(opt: Optimizer, grid: ProcessGrid) -> torch.Tensor:
    """Sum the accumulated grads over DP (all-reduce, or reduce-scatter into this rank's shards with `buckets`)
    and the sequence-parallel partial ones over TP; return the global grad norm (0-d, the same on every rank,
    no host sync). Nothing is updated yet: a caller can check the norm first. The DP reductions the step's last
    backward launched (backward()) are waited for here, after the rest are launched in the same order."""
    device = opt.params[0].device
    accumulate_grads(opt)  # grads a caller left on the parameters
    if grid.dp > 1:
        units = dp_units(opt)
        while opt.unlaunched:
            launch(opt, grid)
        for u in units:
            wait(opt, u)
        opt.unlaunched = len(units)  # (the next step's)
        if opt.buckets is None:
            return _grad_norm(opt, opt.grads, opt.sharded, grid, device)
        pieces = [(opt.grads[k][a:z], opt.sharded[i]) for k, b in enumerate(opt.buckets) for i, a, z, _ in b.segments]
        return _grad_norm(opt, [g for g, _ in pieces], [s for _, s in pieces], grid, device, opt.dp_group)
    for i in range(len(opt.params)):
        own_grad(opt, i)
    partial = [g for g, p in zip(opt.grads, opt.tp_partial) if p]
    if partial and grid.tp > 1:  # one flat all-reduce per step, not one per norm per micro-batch
        all_reduce_flat(partial, grid.tp_group)
    return _grad_norm(opt, opt.grads, opt.sharded, grid, device)


def apply_update(opt: Optimizer, norm: torch.Tensor, lr: float, cfg: PPOConfig, *, later: bool = False) -> None:
    """Clip to cfg.max_grad_norm given the global norm, Adam, and write the result into the parameters in place
    (the generator reads these very tensors). A host-resident state is updated chunk by chunk on the device.
    `later`: the distributed optimizer's all-gather of the updated shards is left running until
    engine.dp_overlap.settle(opt), which must come before the parameters are read."""
    grads = opt.grads
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        torch._foreach_mul_(grads, (cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
    for group in opt.adam.param_groups:
        group["lr"] = lr

    def update(idx: list[int]) -> None:
        for i in idx:
            opt.masters[i].grad = opt.grads[i]
        opt.adam.step()  # (the masters without a grad are left as they are)
        for i in idx:
            opt.masters[i].grad = opt.grads[i] = None
        write_back(opt, idx, later=later)

    if opt.host_resident:
        streamed(opt, update)
    else:
        ensure_state(opt)
        update(list(range(len(opt.masters))))


@torch.no_grad()
def write_back(opt: Optimizer, idx: list[int] | None = None, *, later: bool = False) -> None:
    """The updated masters `idx` (default all) into the parameters, in place (the generator reads these very
    tensors); the distributed optimizer's shards (one per bucket) all-gathered over the DP ranks (`later`: left
    running, engine.dp_overlap.gather_params). A master may be on the host (a host-resident state being loaded)."""
    idx = range(len(opt.masters)) if idx is None else idx
    if opt.buckets is None:
        for i in idx:
            if opt.masters[i] is not opt.params[i]:
                opt.params[i].copy_(opt.masters[i])
        return
    gather_params(opt, idx, later)


def optimizer_state(opt: Optimizer, copy: bool = False) -> dict:
    """What a checkpoint keeps of an optimizer (the parameters themselves go to the HF checkpoint); with buckets,
    their parameters too, so that a run of another layout can re-lay it (engine/reshard.py). `copy`: every tensor a
    new one in host memory (a checkpoint written while the run goes on), never the live state (which a CPU run's or
    a host-resident state's .cpu() would return)."""
    ensure_state(opt)
    if opt.buckets is not None:
        masters = [m.detach().to("cpu", copy=copy) for m in opt.masters]
    else:
        masters = [m.detach().to("cpu", copy=copy) for m, p in zip(opt.masters, opt.params) if m is not p]
    buckets = [b.params for b in opt.buckets] if opt.buckets is not None else None
    return {
        "adam": host_copy(opt.adam.state_dict()) if copy else opt.adam.state_dict(),
        "masters": masters,
        "distributed": opt.buckets is not None,
        "buckets": buckets,
    }


def host_copy(obj):
    """obj with every tensor in it copied to host memory (new tensors, never the live ones) and the rest copied."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return copy.deepcopy(obj)


def load_optimizer_state(opt: Optimizer, saved: dict | SavedOptimizer, tp: int = 1, tp_rank: int = 0) -> None:
    """Restore `opt` (on TP rank `tp_rank` of `tp`) from a checkpoint's optimizer state: this rank's own (a dict,
    the same layout), or every saved rank's (SavedOptimizer) to resume with another TP degree, number of DP ranks or
    --distributed-optimizer setting, re-laid here (engine/reshard.py)."""
    ensure_state(opt)
    if isinstance(saved, dict):
        if saved["distributed"] != (opt.buckets is not None):
            raise ValueError(
                "the checkpoint's optimizer is laid out otherwise (sharded over the data-parallel ranks or not): "
                "re-sharding needs every rank's state"
            )
        masters, adam = saved["masters"], saved["adam"]
    else:
        masters, adam = relayout(opt, saved, tp, tp_rank)
    with torch.no_grad():
        if opt.buckets is not None:
            for m, v in zip(opt.masters, masters, strict=True):
                m.copy_(v)
            write_back(opt)  # (a host-resident shard is copied to the device for its all-gather)
        else:
            mixed = [(m, p) for m, p in zip(opt.masters, opt.params) if m is not p]
            if len(masters) != len(mixed):  # the checkpoint's run had another dtype
                if len(masters) == len(opt.params):  # a bf16 or fp16 run's masters: these fp32 parameters' values
                    mixed = list(zip(opt.masters, opt.params))
                elif not masters:  # an fp32 run's (each parameter its own master): the weights as loaded
                    masters = [p.detach().float() for _, p in mixed]
                else:
                    raise ValueError(
                        f"the checkpoint's optimizer holds fp32 masters of {len(masters)} of the {len(opt.params)} "
                        "parameters: resume with the dtype of the run that saved it"
                    )
            for (m, p), v in zip(mixed, masters, strict=True):
                m.copy_(v)
                p.copy_(v)
    # this run's hyperparameters (betas, eps, weight decay: a resume may change them, and a re-laid one does) and Adam
    # kernel (a CPU run's checkpoint on a GPU), whatever the saved groups held; only the moments and steps are loaded
    kept = [{k: v for k, v in g.items() if k != "params"} for g in opt.adam.param_groups]
    opt.adam.load_state_dict(adam)  # (the moments land where the masters are)
    for g, own in zip(opt.adam.param_groups, kept):
        g.update(own)
    if kept and kept[0].get("fused"):  # a fused step count lives on the device, wherever a host-resident state is
        home = opt.params[0].device
        for st in opt.adam.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(home)
    if opt.host_resident:
        opt.offload.adopt(groups(opt))  # the loaded moments into the host buffers
