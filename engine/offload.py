"""Tensors kept in pinned host memory while the device does not need them (--offload-optimizer, engine/optim.py, and
--offload-idle-models, engine/rollout.py).

offload_state / onload_state move an optimizer's idle state (the fp32 masters and Adam moments) out before a rollout
and back after it (offload_weights / onload_weights the weights of the models a rollout does not run); a
host-resident optimizer's state lives on the host and each update works through it in chunks (streamed), the next
chunk coming in and the last going out while one is updated.

HostCopies moves groups of tensors (each keyed, e.g. one master weight with its two Adam moments) between their
device and host buffers kept for the run: one block per batch of buffers, page-locked by registering it with CUDA
(torch's pinned allocator would round every buffer up to a power of two: up to twice the memory, locked). A tensor
keeps its identity as it moves (only its storage is swapped, `t.data = ...`), so an optimizer's state and its list
of masters stay valid. On CUDA the copies run on two side streams: into the device while the caller goes on (move_in
returns an event that whoever reads the tensors first waits for), out of it after the work queued so far (the device
memory is reused only once the copy has read it; the host buffers are read on the CPU only after host_ready()).
"""

from __future__ import annotations

import math
import mmap
import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.optim import Optimizer

Group = tuple[int, list[torch.Tensor]]  # (key, tensors that move together)
Spec = tuple[int, list[tuple[torch.Size, torch.dtype]]]  # (key, the shapes and dtypes of its tensors)
ALIGN = 512  # bytes: where each buffer starts in its block
CHUNK_ELEMENTS = 2**26  # masters' elements whose state a host-resident update moves to the device at once (768 MiB)


@dataclass
class HostCopies:
    home: torch.device  # where the tensors live while in use
    host: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # per key, its host buffers
    on_host: set[int] = field(default_factory=set)  # keys whose tensors are in their host buffers now
    streams: tuple | None = None  # (in, out) side streams, on CUDA
    arrived: dict[int, torch.cuda.Event] = field(default_factory=dict)  # per key, its last move_in's copies
    written: dict[int, torch.cuda.Event] = field(default_factory=dict)  # per key, its last move_out's copies
    pending: torch.cuda.Event | None = None  # the last move_in's copies (and every earlier one's: one stream)
    last_written: torch.cuda.Event | None = None  # the last move_out's copies (likewise)
    blocks: list[torch.Tensor] = field(default_factory=list)  # the host memory of the buffers, page-locked on CUDA
    unlockers: dict[int, weakref.finalize] = field(default_factory=dict)  # per locked block's address, its unlock

    @property
    def cuda(self) -> bool:
        return self.home.type == "cuda"

    def _streams(self):
        if self.streams is None:
            self.streams = (torch.cuda.Stream(self.home), torch.cuda.Stream(self.home))
        return self.streams

    def reserve(self, specs: list[Spec]) -> None:
        """Host buffers for the keys that have none of these shapes yet, in one new block (page-locked on CUDA). A
        block none of whose buffers a key holds any longer (every key in it got new shapes) is let go: unlocked, and
        freed once no tensor made on it (on_buffers) is left."""
        specs = [(k, shapes) for k, shapes in specs if [(b.shape, b.dtype) for b in self.host.get(k, [])] != shapes]
        if not specs:
            return
        sizes = [[math.prod(shape) * dtype.itemsize for shape, dtype in shapes] for _, shapes in specs]
        block = _whole_pages(sum(-(-n // ALIGN) * ALIGN for ns in sizes for n in ns))
        if self.cuda and block.numel():
            self.unlockers[block.data_ptr()] = _page_lock(self, block)
        self.blocks.append(block)
        at = 0
        for (key, shapes), ns in zip(specs, sizes):
            self.host[key] = []
            for (shape, dtype), n in zip(shapes, ns):
                self.host[key].append(block[at : at + n].view(dtype).view(shape))
                at += -(-n // ALIGN) * ALIGN
        held = {h.untyped_storage().data_ptr() for bufs in self.host.values() for h in bufs}
        for old in [b for b in self.blocks if b is not block and b.untyped_storage().data_ptr() not in held]:
            self.blocks.remove(old)
            unlock = self.unlockers.pop(old.data_ptr(), None)
            if unlock is not None:
                unlock()  # (a finalizer runs once: not again when the owner is collected)

    def _reserve_for(self, groups: list[Group]) -> None:
        self.reserve([(k, [(t.shape, t.dtype) for t in ts]) for k, ts in groups])

    def adopt(self, groups: list[Group]) -> None:
        """Tensors to keep on the host, wherever they are now (loaded from a checkpoint, say): their values are copied
        into the keys' host buffers, which the tensors then use."""
        self.host_ready()
        if self.pending is not None:
            self.pending.synchronize()  # (no copy out of a buffer may still be running)
        self._reserve_for(groups)
        for key, tensors in groups:
            for t, h in zip(tensors, self.host[key]):
                if t.data_ptr() != h.data_ptr():
                    h.copy_(t)
                    t.data = h
            self.on_host.add(key)

    @torch.no_grad()
    def move_out(self, groups: list[Group], copy: bool = True) -> torch.cuda.Event | None:
        """Into the host buffers after the work queued so far on the current stream; the device memory is free for
        reuse once the copies have read it (the caching allocator waits for them). Returns their event (None on CPU
        or when nothing moved). copy=False: the host buffers hold these values already (a frozen model's weights
        since their first move out): the tensors only go back to them."""
        groups = [(k, ts) for k, ts in groups if k not in self.on_host]
        if not groups:
            return None
        if not copy and all(k in self.host for k, _ in groups):
            for key, tensors in groups:
                for t, h in zip(tensors, self.host[key]):
                    t.data = h
                self.on_host.add(key)
            return None
        self._reserve_for(groups)
        if self.cuda:
            _, out = self._streams()
            out.wait_stream(torch.cuda.current_stream(self.home))
            for k, _ in groups:  # (tensors still arriving: their copies in first)
                if k in self.arrived:
                    out.wait_event(self.arrived.pop(k))
        for key, tensors in groups:
            for t, h in zip(tensors, self.host[key]):
                if self.cuda:
                    with torch.cuda.stream(out):
                        h.copy_(t, non_blocking=True)
                    t.data.record_stream(out)
                else:
                    h.copy_(t)
                t.data = h
            self.on_host.add(key)
        if not self.cuda:
            return None
        self.last_written = out.record_event()
        self.written.update({k: self.last_written for k, _ in groups})
        return self.last_written

    @torch.no_grad()
    def move_in(self, groups: list[Group]) -> torch.cuda.Event | None:
        """Back to the device: the memory is allocated now (on the current stream), the copies run on a side stream
        while the caller goes on; returns their event (None on CPU): wait() makes the current stream wait for it."""
        groups = [(k, ts) for k, ts in groups if k in self.on_host]
        if not groups:
            return None
        dev = [[torch.empty(h.shape, dtype=h.dtype, device=self.home) for h in self.host[k]] for k, _ in groups]
        event = None
        if self.cuda:
            into, _ = self._streams()
            into.wait_stream(torch.cuda.current_stream(self.home))  # after the allocation
            for k, _ in groups:  # after the key's buffers were last written
                if k in self.written:
                    into.wait_event(self.written.pop(k))
            with torch.cuda.stream(into):
                for (k, _), ds in zip(groups, dev):
                    for d, h in zip(ds, self.host[k]):
                        d.copy_(h, non_blocking=True)
                        d.record_stream(into)
            event = self.pending = into.record_event()
            self.arrived.update({k: event for k, _ in groups})
        else:
            for (k, _), ds in zip(groups, dev):
                for d, h in zip(ds, self.host[k]):
                    d.copy_(h)
        for (k, tensors), ds in zip(groups, dev):
            for t, d in zip(tensors, ds):
                t.data = d
            self.on_host.discard(k)
        return event

    def on_buffers(self, specs: list[Spec]) -> dict[int, list[torch.Tensor]]:
        """New tensors (not views) on the keys' host buffers (reserved for `specs`), to build a state there."""
        self.reserve(specs)
        self.on_host.update(k for k, _ in specs)
        return {k: [torch.empty(0, dtype=h.dtype).set_(h) for h in self.host[k]] for k, _ in specs}

    def wait(self, event: torch.cuda.Event | None) -> None:
        """The current stream waits for a move_in's copies."""
        if event is not None:
            torch.cuda.current_stream(self.home).wait_event(event)

    def settle(self) -> None:
        """The current stream waits for every move_in so far."""
        self.wait(self.pending)
        self.pending = None
        self.arrived.clear()

    def host_ready(self) -> None:
        """The CPU waits for every move_out so far (before it reads or writes the host buffers itself)."""
        if self.last_written is not None:
            self.last_written.synchronize()
            self.last_written = None
            self.written.clear()


def _whole_pages(nbytes: int) -> torch.Tensor:
    """A uint8 host tensor of whole pages covering `nbytes`, its own anonymous mapping: registering it with CUDA then
    page-locks no page that other memory shares, and every view of it has a registered storage start (torch's
    is_pinned() looks at the storage's first byte)."""
    page = os.sysconf("SC_PAGE_SIZE")
    length = -(-nbytes // page) * page
    if length == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, length), dtype=torch.uint8)  # (the tensor keeps the mapping alive)


_UNLOCK_LATER: list[torch.Tensor] = []  # blocks collected while a CUDA graph was being captured


def _page_lock(owner: HostCopies, block: torch.Tensor) -> weakref.finalize:
    """Register `block` with CUDA (page-locked: copies to and from it run asynchronously at full speed) until
    `owner` is collected, or the returned finalizer is called."""
    while _UNLOCK_LATER:
        _unlock(_UNLOCK_LATER.pop())
    cudart = torch.cuda.cudart()
    nbytes = block.numel()
    err = int(cudart.cudaHostRegister(block.data_ptr(), nbytes, 0))
    if err != 0:
        raise RuntimeError(
            f"could not page-lock {nbytes / 2**30:.1f} GiB of host memory (cudaError {err}): --offload-optimizer off "
            "and --offload-idle-models off keep the optimizer state and the models on the GPU"
        )
    return weakref.finalize(owner, _unlock, block)  # (holds the block until it is unregistered)


def _unlock(block: torch.Tensor) -> None:
    try:
        if torch.cuda.is_current_stream_capturing():  # (a collection during a capture: synchronizing would end it)
            _UNLOCK_LATER.append(block)
            return
        torch.cuda.synchronize()  # (no copy may still be using it)
        torch.cuda.cudart().cudaHostUnregister(block.data_ptr())
    except Exception:  # (at interpreter exit the CUDA runtime may be gone: the process frees everything anyway)
        pass


# ------------------------------------------------- the weights of a model a rollout does not run --


def weight_groups(model: torch.nn.Module) -> list[Group]:
    """Each parameter on its own (its buffers, a few small tables, stay)."""
    return [(i, [p]) for i, p in enumerate(model.parameters())]


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def offload_weights(model: torch.nn.Module, copies: HostCopies, frozen: bool) -> None:
    """A model's weights to its host buffers while a rollout generates (--offload-idle-models), back when this returns
    (the cache is sized from the memory they free). A `frozen` model's host copy is made once: each later offload
    only drops the device copy (nothing writes a frozen model's weights)."""
    copies.move_out(weight_groups(model), copy=not frozen)
    copies.host_ready()


def onload_weights(model: torch.nn.Module, copies: HostCopies) -> None:
    """Back to the device, the current stream waiting for the copies (the scoring passes read them next)."""
    copies.move_in(weight_groups(model))
    copies.settle()


# -------------------------------------------------------------- an optimizer's state --


def groups(opt: Optimizer, idx=None) -> list[Group]:
    """Per master (index), the tensors that move with it: the master unless it is the parameter itself (an fp32
    parameter, which the generator reads), and its Adam moments (the scalar step counts stay)."""
    out = []
    for i in range(len(opt.masters)) if idx is None else idx:
        m = opt.masters[i]
        st = opt.adam.state.get(m, {})
        own = opt.buckets is not None or m is not opt.params[i]
        tensors = [m] * own + [st[k] for k in ("exp_avg", "exp_avg_sq") if k in st]
        if tensors:
            out.append((i, tensors))
    return out


def movable_state(opt: Optimizer) -> list[torch.Tensor]:
    """The tensors offload_state moves (each master's group in turn)."""
    return [t for _, ts in groups(opt) for t in ts]


def state_bytes(opt: Optimizer) -> int:
    """Bytes of the optimizer's state that can live in host memory."""
    return sum(t.numel() * t.element_size() for t in movable_state(opt))


def offload_state(opt: Optimizer) -> None:
    """Move the idle state to host memory (a host-resident one is there: its last update's copies finish). Returns
    when the copies are done: a rollout's KV cache is sized from the memory they free (which it needs before it can
    start anyway), and no copy is in flight while its decode graphs are captured. Each tensor keeps its identity
    (only its storage moves)."""
    if opt.offload is None:
        opt.offload = HostCopies(opt.params[0].device if opt.params else torch.device("cpu"))
    opt.offload.move_out(groups(opt))
    opt.offload.host_ready()


def onload_state(opt: Optimizer) -> None:
    """Bring the state back to the device (not a host-resident one): the memory is allocated now, the copies run on
    a side stream while the caller goes on; the update (and a checkpoint) waits for them first."""
    if opt.offload is not None and not opt.host_resident:
        opt.offload.move_in(groups(opt))


def ensure_state(opt: Optimizer) -> None:
    """Before the current stream reads or writes the state: on the device, its copies done (a host-resident state:
    the CPU waits for its copies out)."""
    if opt.offload is None:
        return
    if opt.host_resident:
        opt.offload.host_ready()
        return
    onload_state(opt)
    opt.offload.settle()


def chunks(opt: Optimizer) -> list[list[int]]:
    """Consecutive masters of about CHUNK_ELEMENTS elements (a larger one alone)."""
    out, size = [], 0
    for i, m in enumerate(opt.masters):
        if not out or size + m.numel() > CHUNK_ELEMENTS:
            out.append([])
            size = 0
        out[-1].append(i)
        size += m.numel()
    return out


def streamed(opt: Optimizer, fn) -> None:
    """fn(chunk) for each chunk of masters, with the chunk's state on the device: the next chunk's copies in run
    while fn works on this one, and this one's copies out while the next is worked on. The CPU waits for a chunk's
    copies out before it allocates the one two after it (else it would queue every chunk's allocation ahead of the
    GPU, and the device would hold much more than three chunks)."""
    parts, gone = chunks(opt), []
    event = opt.offload.move_in(groups(opt, parts[0])) if parts else None
    for k, idx in enumerate(parts):
        if k >= 2 and gone[k - 2] is not None:  # the CPU no further ahead: chunk k - 2's memory serves chunk k + 1
            gone[k - 2].synchronize()
        following = opt.offload.move_in(groups(opt, parts[k + 1])) if k + 1 < len(parts) else None
        opt.offload.wait(event)
        fn(idx)
        gone.append(opt.offload.move_out(groups(opt, idx)))
        event = following
