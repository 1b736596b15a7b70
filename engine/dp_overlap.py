"""The trained models' data-parallel collectives, overlapped with the compute around them (engine/optim.py's
optimizers run them).

The grads' DP reduction overlaps the step's last backward (Megatron's overlap_grad_reduce): `backward()` on a step's
last micro-batch launches each unit's collective (a bucket's reduce-scatter, or a flat all-reduce of consecutive
parameters' grads) as soon as autograd has finished every parameter in it, asynchronously, last unit first on every
rank (the order a backward finishes them in, and the same on every rank whatever their timing); optim.reduce_grads()
then launches what is left in that order and waits. Where it would have stood at the end of the step, the reduction's
time hides behind the backward's last layers: ~65 ms per model and step for 13B at TP 8 over two nodes at 400 Gb/s.
The same sums, the same bits (OVERLAP_REDUCE False, or TULU_OVERLAP_GRAD_REDUCE=0: reduced after the backward).

The distributed optimizer's updated shards come back into the parameters by an all-gather over the DP ranks
(gather_params). Asked to (`later`, the trainer's updates) it is launched and left running (Megatron's
overlap_param_gather, at the model's grain): on a GPU a side stream waits for each bucket's gather and copies it into
the parameters, its buffer freed as soon as it is copied, while the device goes on with what follows the update (the
value model's update behind the policy's gather, then the next step's policy passes behind the value model's);
settle() makes the current stream wait for it before the parameters are read (the trainer: before each model's
passes, and when a rollout's training ends, even by an error). ~33 ms a model and step at 13B TP 8 over two nodes
(1.6 GB of bf16 parameters received per GPU at 50 GB/s), of which the value model's hides whole. The same bits
(OVERLAP_GATHER False, or TULU_OVERLAP_PARAM_GATHER=0: gathered before the update returns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from engine.distributed import ProcessGrid
from engine.parallel import all_gather_single, reduce_scatter_single
from kernels.dispatch import env_switch

if TYPE_CHECKING:
    from engine.optim import Optimizer

BUCKET_BYTES = 256 * 2**20  # fp32 grads per flat bucket (and per all-reduce / reduce-scatter)
# with DP > 1, each unit's reduction launched during the step's last backward (module docstring)
OVERLAP_REDUCE = env_switch("TULU_OVERLAP_GRAD_REDUCE", True)
# the distributed optimizer's parameter all-gather left running after the trainer's updates (module docstring)
OVERLAP_GATHER = env_switch("TULU_OVERLAP_PARAM_GATHER", True)


@dataclass
class Unit:
    """Parameters whose fp32 grads are summed over the DP ranks by one collective: a bucket's reduce-scatter (the
    distributed optimizer), or one flat all-reduce of consecutive parameters' grads (about BUCKET_BYTES)."""

    params: list[int]  # indices into Optimizer.params
    bucket: int | None = None  # the distributed optimizer's bucket
    work: dist.Work | None = None  # the collective in flight
    flat: torch.Tensor | None = None  # without buckets: the grads being all-reduced, end to end


@dataclass
class Watch:
    """A backward whose finished parameters launch their units' DP reductions (backward())."""

    grid: ProcessGrid
    waiting: set[int]  # parameters autograd has not finished yet
    pending: list[int]  # per unit, how many of them


@dataclass
class Gathers:
    """An optimizer's parameter all-gathers left running (gather_params with `later`) until settle()."""

    stream: torch.cuda.Stream | None = None  # on a GPU: the side stream copying them into the parameters (kept)
    done: torch.cuda.Event | None = None  # its copies since the last settle()
    # on the host: (collective, buffer, bucket) per gather, copied into the parameters by settle()
    works: list[tuple[dist.Work, torch.Tensor, int]] = field(default_factory=list)


def all_reduce_flat(tensors: list[torch.Tensor], group, bucket_bytes: int = BUCKET_BYTES) -> None:
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


def backward(opt: Optimizer, grid: ProcessGrid, out: torch.Tensor, *, last: bool = True) -> None:
    """out.backward() for a micro-batch of opt's model. On the step's `last` micro-batch with DP > 1 (and
    OVERLAP_REDUCE), each unit's DP reduction is launched while the backward runs, as soon as autograd has finished
    all its parameters' grads (a parameter's grad hook: after it, nothing more reaches it in this backward), in a
    fixed order: last unit first, a unit only after those behind it (a rank's timing never changes the collectives'
    order). The parameters the backward cannot reach (nothing in out's graph leads to them: a grad made during the
    forward, as the LM head's into its sum, or a parameter unused) count as finished from the start. (A weight whose
    grad went into its sum reaches its hook with no grad, which torch runs since its AccumulateGrad's refactor for
    compiled autograd; an older torch that skips it leaves its unit, and those before it, to reduce_grads: the same
    sums, later.)"""
    if pending_gathers(opt):
        raise RuntimeError(
            "the model's parameters are still being gathered from the last update (engine.dp_overlap.settle() "
            "before its forward)"
        )
    if not (last and grid.dp > 1 and OVERLAP_REDUCE and out.grad_fn is not None):
        out.backward()
        return
    units = dp_units(opt)
    waiting = _reached(out.grad_fn, opt.params)
    pending = [sum(i in waiting for i in u.params) for u in units]
    opt.watch = Watch(grid, waiting, pending)
    try:
        param_done(opt, None)  # (the units nothing in the graph leads to)
        out.backward()
    except BaseException:
        for u in units:  # (the step fails: nothing waits for what was launched)
            u.work = u.flat = None
        opt.unlaunched = len(units)
        raise
    finally:
        opt.watch = None


def dp_units(opt: Optimizer) -> list[Unit]:
    """The DP reductions' units (made once): one per bucket with the distributed optimizer, else consecutive
    parameters' fp32 grads up to about BUCKET_BYTES each (one flat all-reduce a unit)."""
    if opt.units is None:
        if opt.buckets is not None:
            units = [Unit(b.params, k) for k, b in enumerate(opt.buckets)]
        else:
            units, size = [], BUCKET_BYTES
            for i, p in enumerate(opt.params):
                if size >= BUCKET_BYTES:
                    units.append(Unit([]))
                    size = 0
                units[-1].params.append(i)
                size += p.numel() * 4
        opt.unit_of = {i: k for k, u in enumerate(units) for i in u.params}
        opt.units, opt.unlaunched = units, len(units)
    return opt.units


def _reached(root, params: list[torch.nn.Parameter]) -> set[int]:
    """The indices of `params` whose grad accumulators autograd's graph from node `root` leads to (a walk over its
    nodes, a few thousand for a 13B model's backward: milliseconds, once a step and model)."""
    where = {id(p): i for i, p in enumerate(params)}
    found: set[int] = set()
    seen, stack = set(), [root]
    while stack and len(found) < len(where):
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if isinstance(fn, torch._C._functions.AccumulateGrad):
            i = where.get(id(fn.variable))
            if i is not None:
                found.add(i)
        stack.extend(f for f, _ in fn.next_functions)
    return found


def param_done(opt: Optimizer, i: int | None) -> None:
    """Autograd has finished parameter i in the watched backward: launch the units now complete, in order."""
    w = opt.watch
    if i in w.waiting:
        w.waiting.discard(i)
        w.pending[opt.unit_of[i]] -= 1
    while opt.unlaunched and not w.pending[opt.unlaunched - 1]:
        launch(opt, w.grid)


def own_grad(opt: Optimizer, i: int) -> torch.Tensor:
    """Parameter i's fp32 grad summed over the step's micro-batches, as opt.grads[i] (an fp32 parameter's, which
    autograd summed in place, moved there; zeros for a parameter no micro-batch reached)."""
    p = opt.params[i]
    if opt.masters[i] is p:
        opt.grads[i], p.grad = p.grad, None
    if opt.grads[i] is None:
        opt.grads[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    return opt.grads[i]


def launch(opt: Optimizer, grid: ProcessGrid) -> None:
    """Launch the last unlaunched unit's DP reduction (asynchronous), its sequence-parallel partial grads summed
    over TP first."""
    opt.unlaunched -= 1
    u = opt.units[opt.unlaunched]
    if u.bucket is None:
        grads = [own_grad(opt, i) for i in u.params]
        partial = [g for g, i in zip(grads, u.params) if opt.tp_partial[i]]
    else:
        b, p0 = opt.buckets[u.bucket], opt.params[u.params[0]]
        if b.grad is None:  # no micro-batch reached these parameters
            b.grad = torch.zeros(b.numel, dtype=torch.float32, device=p0.device)
        partial = [b.grad[s : s + opt.params[i].numel()] for i, s in zip(b.params, b.offsets) if opt.tp_partial[i]]
    if partial and grid.tp > 1:
        all_reduce_flat(partial, grid.tp_group)
    if u.bucket is None:  # each grad becomes its piece of the flat tensor reduced in place (the old ones freed)
        u.flat = torch.cat([g.reshape(-1) for g in grads])
        for i, g in zip(u.params, u.flat.split([g.numel() for g in grads])):
            opt.grads[i] = g.view(opt.params[i].shape)
        u.work = dist.all_reduce(u.flat, group=grid.dp_group, async_op=True)
    else:
        out = opt.grads[u.bucket] = torch.empty(opt.masters[u.bucket].shape, dtype=torch.float32, device=p0.device)
        u.work = reduce_scatter_single(out, b.grad, group=opt.dp_group, async_op=True)


def wait(opt: Optimizer, u: Unit) -> None:
    """Wait for a unit's DP reduction (on a GPU: the stream waits, not the host); with buckets, free the bucket's
    grad (the reduced shard is in opt.grads)."""
    u.work.wait()
    u.work = u.flat = None
    if u.bucket is not None:
        opt.buckets[u.bucket].grad = None


@torch.no_grad()
def gather_params(opt: Optimizer, buckets, later: bool = False) -> None:
    """The distributed optimizer's updated shards of `buckets` (indices) all-gathered over the DP ranks into the
    parameters, in place. `later` (and OVERLAP_GATHER): launched and left running until settle() (module
    docstring). A master may be on the host (a host-resident state's)."""
    later = later and OVERLAP_GATHER
    side = None  # (on a GPU, with `later`: the side stream copying the gathers in)
    for k in buckets:
        b, m = opt.buckets[k], opt.masters[k]
        p0 = opt.params[b.params[0]]
        flat = torch.empty(b.numel, dtype=p0.dtype, device=p0.device)
        shard = m.to(p0.device, p0.dtype)
        if not later:
            all_gather_single(flat, shard, group=opt.dp_group)
            _unflatten(opt, k, flat)
            continue
        g = opt.gathers = opt.gathers or Gathers()
        work = all_gather_single(flat, shard, group=opt.dp_group, async_op=True)
        if p0.device.type != "cuda":
            g.works.append((work, flat, k))
            continue
        if side is None:
            side = g.stream = g.stream or torch.cuda.Stream(p0.device)
            # (after what the current stream has queued: the backward's last reads of these parameters among it)
            side.wait_stream(torch.cuda.current_stream(p0.device))
        with torch.cuda.stream(side):
            work.wait()  # (the side stream waits, not the host)
            _unflatten(opt, k, flat)
        # (their memory free again once the side stream is past the gather and the copies, whichever stream the
        # collective's own bookkeeping frees them on)
        flat.record_stream(side)
        shard.record_stream(side)
    if side is not None:  # (settle() waits for this: every copy so far, one stream)
        g.done = torch.cuda.Event()
        g.done.record(side)


def _unflatten(opt: Optimizer, k: int, flat: torch.Tensor) -> None:
    b = opt.buckets[k]
    for i, start in zip(b.params, b.offsets):
        p = opt.params[i]
        p.copy_(flat[start : start + p.numel()].view_as(p))


def pending_gathers(opt: Optimizer) -> bool:
    """Whether parameter all-gathers of opt's are left running (settle() not called since)."""
    g = opt.gathers
    return g is not None and (g.done is not None or bool(g.works))


@torch.no_grad()
def settle(opt: Optimizer) -> None:
    """Before the parameters are read: the all-gathers gather_params left running are in them (on a GPU the current
    stream waits for the side stream's copies, not the host)."""
    g = opt.gathers
    if g is None:
        return
    if g.done is not None:
        torch.cuda.current_stream(g.stream.device).wait_event(g.done)
        g.done = None
    works, g.works = g.works, []
    for work, flat, k in works:
        work.wait()
        _unflatten(opt, k, flat)
