"""Tensors kept in pinned host memory while the device does not need them (--offload-optimizer, engine/optim.py).

HostCopies moves groups of tensors (each keyed, e.g. one master weight with its two Adam moments) between their
device and pinned host buffers kept for the run (pinning is slow). A tensor keeps its identity as it moves (only its
storage is swapped, `t.data = ...`), so an optimizer's state and its list of masters stay valid. On CUDA the copies
run on two side streams: into the device while the caller goes on (move_in returns an event that whoever reads the
tensors first waits for), out of it after the work queued so far (the device memory is reused only once the copy has
read it; the host buffers are read on the CPU only after host_ready()).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Group = tuple[int, list[torch.Tensor]]  # (key, tensors that move together)


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
