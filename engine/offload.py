"""Tensors kept in pinned host memory while the device does not need them (--offload-optimizer, engine/optim.py).

offload_state / onload_state move an optimizer's idle state (the fp32 masters and Adam moments) out before a rollout
and back after it; a host-resident optimizer's state lives on the host and each update works through it in chunks
(streamed), the next chunk coming in and the last going out while one is updated.

HostCopies moves groups of tensors (each keyed, e.g. one master weight with its two Adam moments) between their
device and pinned host buffers kept for the run (pinning is slow). A tensor keeps its identity as it moves (only its
storage is swapped, `t.data = ...`), so an optimizer's state and its list of masters stay valid. On CUDA the copies
run on two side streams: into the device while the caller goes on (move_in returns an event that whoever reads the
tensors first waits for), out of it after the work queued so far (the device memory is reused only once the copy has
read it; the host buffers are read on the CPU only after host_ready()).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.optim import Optimizer

Group = tuple[int, list[torch.Tensor]]  # (key, tensors that move together)
CHUNK_ELEMENTS = 2**26  # masters' elements whose state a host-resident update moves to the device at once (768 MiB)


@dataclass
class HostCopies:
    home: torch.device  # where the tensors live while in use
    host: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # per key, the pinned buffers
    on_host: set[int] = field(default_factory=set)  # keys whose tensors are in their host buffers now
    streams: tuple | None = None  # (in, out) side streams, on CUDA
    arrived: dict[int, torch.cuda.Event] = field(default_factory=dict)  # per key, its last move_in's copies
    written: dict[int, torch.cuda.Event] = field(default_factory=dict)  # per key, its last move_out's copies
    pending: torch.cuda.Event | None = None  # the last move_in's copies (and every earlier one's: one stream)
    last_written: torch.cuda.Event | None = None  # the last move_out's copies (likewise)

    @property
    def cuda(self) -> bool:
        return self.home.type == "cuda"

    def _streams(self):
        if self.streams is None:
            self.streams = (torch.cuda.Stream(self.home), torch.cuda.Stream(self.home))
        return self.streams

    def adopt(self, groups: list[Group]) -> None:
        """Tensors to keep on the host, wherever they are now (built on the host, loaded from a checkpoint): their
        values are copied into the keys' pinned buffers, which the tensors then use."""
        self.host_ready()
        if self.pending is not None:
            self.pending.synchronize()  # (no copy out of a buffer may still be running)
        for key, tensors in groups:
            if key not in self.host and all(
                t.device.type == "cpu" and (not self.cuda or t.is_pinned()) for t in tensors
            ):
                self.host[key] = [t.data for t in tensors]  # where they belong already: their storage is the buffer
            bufs = self._buffers(key, tensors)
            for t, h in zip(tensors, bufs):
                if t.data_ptr() != h.data_ptr():
                    h.copy_(t)
                    t.data = h
            self.on_host.add(key)

    def _buffers(self, key: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        bufs = self.host.get(key)
        if bufs is None or [(b.shape, b.dtype) for b in bufs] != [(t.shape, t.dtype) for t in tensors]:
            bufs = self.host[key] = [torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda) for t in tensors]
        return bufs

    @torch.no_grad()
    def move_out(self, groups: list[Group]) -> None:
        """Into the host buffers after the work queued so far on the current stream; the device memory is free for
        reuse once the copies have read it (the caching allocator waits for them)."""
        groups = [(k, ts) for k, ts in groups if k not in self.on_host]
        if not groups:
            return
        if self.cuda:
            _, out = self._streams()
            out.wait_stream(torch.cuda.current_stream(self.home))
            for k, _ in groups:  # (tensors still arriving: their copies in first)
                if k in self.arrived:
                    out.wait_event(self.arrived.pop(k))
        for key, tensors in groups:
            bufs = self._buffers(key, tensors)
            for t, h in zip(tensors, bufs):
                if self.cuda:
                    with torch.cuda.stream(out):
                        h.copy_(t, non_blocking=True)
                    t.data.record_stream(out)
                else:
                    h.copy_(t)
                t.data = h
            self.on_host.add(key)
        if self.cuda:
            self.last_written = out.record_event()
            self.written.update({k: self.last_written for k, _ in groups})

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
    """Move the idle state to host memory (pinned when it lives on a GPU); its device memory is free for reuse
    once the copies have read it. Each tensor keeps its identity (only its storage moves)."""
    if opt.offload is None:
        opt.offload = HostCopies(opt.params[0].device if opt.params else torch.device("cpu"))
    opt.offload.move_out(groups(opt))


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
    while fn works on this one, and this one's copies out while the next is worked on."""
    parts = chunks(opt)
    event = opt.offload.move_in(groups(opt, parts[0])) if parts else None
    for k, idx in enumerate(parts):
        following = opt.offload.move_in(groups(opt, parts[k + 1])) if k + 1 < len(parts) else None
        opt.offload.wait(event)
        fn(idx)
        opt.offload.move_out(groups(opt, idx))
        event = following
