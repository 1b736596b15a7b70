"""Decode steps captured as CUDA graphs, one per batch-size bucket (used by engine/generate.py).

A graph replays kernels on raw addresses: those of the static inputs below, the KV cache and every
parameter and buffer of the model. `graph_key` names that storage, so the generator replays graphs
across a training phase only when the cache came back at the same address and every parameter was
updated in place, and captures anew otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from engine.distributed import agree
from engine.model import AttentionContext, Transformer, attention_context
from kernels.dispatch import compile_ahead


def graph_key(model: Transformer, kv_pool: torch.Tensor) -> tuple:
    """The storage a captured decode step reads and writes through raw addresses."""
    storage = (*model.parameters(), *model.buffers())
    return (kv_pool.data_ptr(), tuple(kv_pool.shape), *(t.data_ptr() for t in storage))


class DecodeGraphs:
    """Decode steps captured as CUDA graphs, one per batch-size bucket, sharing one memory pool.

    Static inputs are padded to the bucket: padding rows write nowhere (slot -1) and attend to
    nothing (context length 0). The graph covers the whole model forward and the LM head (this rank's
    vocabulary shard: the sampler, outside the graph, combines the ranks' samples).
    caches: returns the per-layer (k_cache, v_cache) views; key: graph_key() at capture; group: the model's TP
    group (its ranks capture together and fail together).
    """

    def __init__(
        self,
        model: Transformer,
        caches: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]],
        max_num_seqs: int,
        table_width: int,
        key: tuple,
        group=None,
    ):
        self.model, self.caches, self.key = model, caches, key
        dev, max_b = next(model.parameters()).device, max_num_seqs
        self.device = dev
        self.buckets = sorted({b for b in (1, 2, 4, 8) if b < max_b} | set(range(16, max_b, 16)) | {max_b})
        self.ids = torch.zeros(max_b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_b, dtype=torch.long, device=dev)
        self.slots = torch.full((max_b,), -1, dtype=torch.long, device=dev)
        self.context_lens = torch.zeros(max_b, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(max_b, table_width, dtype=torch.int32, device=dev)
        self.replays, self.logits = {}, {}
        mempool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        if group is None:  # every bucket's kernels compiled at once, not one bucket's after another's; not under
            # TP: its forwards run collectives, which an error compile_ahead drops could leave unmatched
            compile_ahead([functools.partial(self._warm_up, b) for b in self.buckets])
        for b in reversed(self.buckets):  # largest first so smaller graphs reuse its memory
            error = None
            try:
                self._warm_up(b)  # (autotuning, allocations) outside the capture
                self._sync()
                with attention_context(self.context(b)):
                    self.replays[b], self.logits[b] = self._capture_one(b, mempool)
            except Exception as e:
                error = e
            # a TP rank whose capture failed stops every rank at the same bucket (the warm-ups run collectives)
            (failed,) = agree([int(error is not None)], "max", group)
            if failed:
                raise error or RuntimeError(f"CUDA graph capture failed on another tensor-parallel rank (bucket {b})")
        self._sync()

    def context(self, b: int) -> AttentionContext:
        """The attention context of bucket b: the static inputs' first b rows over the current cache views."""
        return AttentionContext(self.caches(), self.slots[:b], True, self.tables[:b], self.context_lens[:b])

    def _warm_up(self, b: int) -> None:
        with attention_context(self.context(b)):
            self._forward(b)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _capture_one(self, b: int, mempool):
        """Capture the bucket-b forward: (replay function, the static logits it writes)."""
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=mempool):
            logits = self._forward(b)
        return g.replay, logits

    def _forward(self, b: int) -> torch.Tensor:
        m = self.model
        return m.head_packed(m.hidden_packed(self.ids[:b], self.positions[:b], None), gather=False)

    def run(self, last: torch.Tensor, batch) -> torch.Tensor:
        """Replay the smallest bucket that holds the batch: logits [B, V] (a view of the graph's output)."""
        n = last.shape[0]
        b = next(x for x in self.buckets if x >= n)
        self.ids[:n].copy_(last)
        self.positions[:n].copy_(batch.positions)
        self.slots[:n].copy_(batch.slot_mapping)
        self.slots[n:b].fill_(-1)
        self.context_lens[:n].copy_(batch.context_lens)
        self.context_lens[n:b].zero_()
        self.tables[:n].copy_(batch.block_tables)
        self.replays[b]()
        return self.logits[b][:n]
