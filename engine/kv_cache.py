"""Paged KV cache: one preallocated pool, and the host-side block bookkeeping that hands it out.

Layout (the contract of kernels/paged_attention.py and the prefill kernel): the pool is one tensor
[layers, 2, num_blocks, block_size, Hkv, D]; layer l reads k_cache = pool[l, 0] and v_cache = pool[l, 1],
each [num_blocks, block_size, Hkv, D], as views (no copies). Token t of a sequence lives at
slot = table[t // block_size] * block_size + t % block_size.

`KVCachePool` owns the memory (sized explicitly or from measured free memory, released for the
training phase and reallocated after). `BlockManager` is pure Python bookkeeping: a free list,
per-block reference counts and per-sequence block tables, so the n samples of one prompt share the
prompt's blocks (`fork`) and copy a shared partial last block only when one of them writes to it.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import InvalidInput


def upload(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: to a GPU through pinned memory (a copy from pageable
    memory may wait for the work already queued on the stream, which would undo the generator's overlapped steps;
    torch's pinned block stays reserved until its copy has run). Elsewhere (or device None) as it is."""
    if device is None or torch.device(device).type != "cuda":
        return t if device is None else t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class OutOfBlocks(RuntimeError):
    """Not enough free blocks; the scheduler catches this to preempt (free) sequences and retry."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"out of KV-cache blocks: need {needed}, {free} free")
        self.needed = needed
        self.free = free


# =========================================================================================== pool ==

BLOCK_SIZE = 16  # tokens per block: the Generator's default (the memory planner counts the cache in such blocks)


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one block index costs across the whole pool: every layer, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * block_size * num_kv_heads * head_dim * elem


def blocks_for_tokens(num_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks a sequence of num_tokens tokens takes (whole blocks: the last one partly filled)."""
    return -(-num_tokens // block_size)


def model_block_bytes(config, tp: int, dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> int:
    """bytes_per_block of a model (its engine.config.ModelConfig) on one of `tp` ranks (its share of the K/V heads):
    what the generator's pool costs per block, for the planners that size it before any model is built."""
    return bytes_per_block(config.num_layers, block_size, config.num_kv_heads // tp, config.head_dim, dtype)


def resolve_cache_dtype(
    kv_cache_dtype: torch.dtype | str | None, model_dtype: torch.dtype, device: torch.device | None = None
) -> torch.dtype:
    """The KV cache's dtype: None / "auto" -> the model's; "fp8" -> torch.float8_e4m3fn; or a torch dtype (name).
    float8 needs a GPU that converts it (compute capability 8.9: Ada, Hopper and later)."""
    if kv_cache_dtype is None or kv_cache_dtype == "auto":
        return model_dtype
    dtype = kv_cache_dtype
    if isinstance(dtype, str):
        dtype = torch.float8_e4m3fn if dtype == "fp8" else getattr(torch, dtype, None)
    if dtype not in (model_dtype, torch.float8_e4m3fn):
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: the cache holds the model's dtype ({model_dtype}) or fp8")
    if dtype == torch.float8_e4m3fn and device is not None and device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        if cc < (8, 9):
            raise InvalidInput(
                f"kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or later (Ada, Hopper); "
                f"{torch.cuda.get_device_name(device)} is {cc[0]}.{cc[1]}: use the model's dtype"
            )
    return dtype


def cuda_cache_budget(
    device: torch.device | str, fraction: float = 0.9, reserved_bytes: int = 0, *, clamp: bool = True
) -> int:
    """Bytes the KV cache may take on a GPU: `fraction` of the device's memory, less what is in use now (the
    weights; a kept decode graph's private pool) and `reserved_bytes` (the activations of the largest step).
    The caching allocator's unused blocks go back to the device first, so they count as free. `clamp` False: a
    shortfall is negative (what freeing memory must first make up)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the KV cache's memory fraction {fraction} must be in (0, 1]")
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * fraction) - (total - free) - reserved_bytes
    return max(0, budget) if clamp else budget


def num_blocks_for_memory(
    budget_bytes: int, *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """How many blocks of the pool fit in budget_bytes."""
    return max(0, budget_bytes // bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype))


class KVCachePool:
    """The KV cache of every layer in one tensor [layers, 2, num_blocks, block_size, Hkv, D]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size {block_size} must be a power of two (the kernels tile by it)")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks {num_blocks} must be positive (not enough memory for one block?)")
        self.shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.tensor: torch.Tensor | None = None
        self.reallocate()

    @property
    def num_layers(self) -> int:
        return self.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.shape[2]

    @property
    def block_size(self) -> int:
        return self.shape[3]

    @property
    def nbytes(self) -> int:
        return bytes_per_block(self.num_layers, self.block_size, *self.shape[4:], self.dtype) * self.num_blocks

    @property
    def is_allocated(self) -> bool:
        return self.tensor is not None

    def _pool(self) -> torch.Tensor:
        if self.tensor is None:
            raise RuntimeError("the KV cache pool was released; call reallocate() first")
        return self.tensor

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer: views [num_blocks, block_size, Hkv, D] into the pool."""
        pool = self._pool()
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range for a pool of {self.num_layers} layers")
        return pool[index, 0], pool[index, 1]

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: block src -> block dst in every layer, K and V, for each (src, dst) pair."""
        if not copies:
            return
        pool = self._pool()
        # (upload: a blocking host-to-device copy would wait for every step already queued, the overlap)
        src, dst = upload(torch.tensor(copies, dtype=torch.int64).view(-1, 2).t().contiguous(), self.device)
        pool = pool.view(torch.uint8)  # bytes: exact for every cache dtype, float8 included
        pool[:, :, dst] = pool[:, :, src]

    def release(self) -> None:
        """Give the memory back (the training phase needs it).

        Views from layer() keep the storage alive: take them per forward rather than holding them.
        On CUDA a warning says when the memory did not come back for that reason.
        """
        if self.tensor is None:
            return
        cuda = self.device.type == "cuda"
        before = torch.cuda.memory_allocated(self.device) if cuda else 0
        self.tensor = None
        if cuda:
            freed = lambda: before - torch.cuda.memory_allocated(self.device) >= self.nbytes  # noqa: E731
            if not freed():  # (a view held in a reference cycle: collected first; a full collection only then, not
                gc.collect()  # each rollout: it takes a process with transformers in it a tenth of a second or more)
                if not freed():
                    warnings.warn(
                        "KV cache released but its memory is still referenced (a layer view alive?)", stacklevel=2
                    )
            torch.cuda.empty_cache()

    def reallocate(self, num_blocks: int | None = None) -> None:
        """Allocate the pool again (contents undefined), optionally with a new block count (e.g. re-sized
        from the memory left after training). No-op if allocated with that shape already."""
        if num_blocks is not None and num_blocks != self.num_blocks:
            if num_blocks <= 0:
                raise ValueError(f"num_blocks {num_blocks} must be positive")
            self.release()
            self.shape = (*self.shape[:2], num_blocks, *self.shape[3:])
        if self.tensor is None:
            self.tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)


# ================================================================================= bookkeeping ==


@dataclass
class DecodeBatch:
    """Kernel arguments of one decode step (BlockManager.prepare_decode), on the requested device."""

    slot_mapping: torch.Tensor  # [B] int64: where each new token's K/V goes (rope_write_kv)
    positions: torch.Tensor  # [B] int64: each new token's position (rotary)
    context_lens: torch.Tensor  # [B] int32: tokens attended, the new one included
    block_tables: torch.Tensor  # [B, width] int32
    copies: list[tuple[int, int]]  # copy-on-write (src, dst) blocks: KVCachePool.copy_blocks before the write
    max_context_len: int  # host-side bound for paged_decode_attention (no device sync)


class BlockManager:
    """Free list, reference counts and block tables of a pool of `num_blocks` blocks of `block_size` tokens.

    A sequence owns a block table (list of block ids) and a length (tokens that have a slot).
    Blocks shared by forked sequences have reference count > 1; a shared block is never written:
    appending into a shared partial last block first moves the writer to a private copy.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks {num_blocks} and block_size {block_size} must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Reversed so blocks come out 0, 1, 2, ... (LIFO reuse keeps recently freed blocks warm).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._freed: set[int] = set()
        # The same tables as rows of one int32 array, kept in step with every mutation, so that a decode
        # step's [B, width] block tables are one fancy-index gather rather than B * width Python ints.
        self._rows = np.zeros((16, 16), dtype=np.int32)
        self._row_of: dict[int, int] = {}
        self._free_rows: list[int] = list(range(15, -1, -1))

    # ----------------------------------------------------------------------------------- queries

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for_tokens(num_tokens, self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of num_tokens tokens fits now."""
        return self.blocks_for(num_tokens) <= len(self._free)

    def can_append(self, seq_ids: Iterable[int]) -> bool:
        """Whether every sequence can get its next slot now (a new or copy-on-write block each at most)."""
        return self._batch_need(list(seq_ids)) <= len(self._free)

    def headroom(self, seqs: Iterable[tuple[int, int]]) -> int:
        """Free blocks to keep for (seq_id, the most tokens it will hold) pairs: one for each sequence that will still
        take a block (a new one as it grows, or a copy of the partial last block it shares: all but one of its sharers
        copy it), so that each can grow by a block before any is preempted; none for one that already holds every
        block it will need (a shared full-length prompt, a sequence on its last block)."""
        need = 0
        sharers: dict[int, int] = {}
        bs, tables, lengths, ref = self.block_size, self._tables, self._lengths, self._ref
        for s, most in seqs:
            table, length = tables[self._known(s)], lengths[s]
            if length >= most:  # no slot left to take
                continue
            if self.blocks_for(most) > len(table):  # a new block ahead (a copy of a shared last one first: one block)
                need += 1
            elif length % bs and ref[table[-1]] > 1:
                sharers[table[-1]] = sharers.get(table[-1], 0) + 1
        return need + sum(min(k, ref[b] - 1) for b, k in sharers.items())

    def prompt_headroom(self, num_tokens: int, n: int, most: int) -> int:
        """headroom() of a prompt of num_tokens tokens and its n - 1 forks, each to hold at most `most` tokens, before
        they are allocated."""
        if num_tokens >= most:
            return 0
        if self.blocks_for(most) > self.blocks_for(num_tokens):
            return n
        return n - 1 if num_tokens % self.block_size else 0

    def num_tokens(self, seq_id: int) -> int:
        return self._lengths[self._known(seq_id)]

    def blocks(self, seq_id: int) -> list[int]:
        """The sequence's block table (a copy)."""
        return list(self._tables[self._known(seq_id)])

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # --------------------------------------------------------------------------------- mutations

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Blocks for a new sequence's first num_tokens tokens (its prompt). Raises OutOfBlocks."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        if num_tokens < 0:
            raise ValueError(f"num_tokens {num_tokens} must be >= 0")
        need = self.blocks_for(num_tokens)
        if need > len(self._free):
            raise OutOfBlocks(need, len(self._free))
        table = [self._take() for _ in range(need)]
        self._tables[seq_id] = table
        self._lengths[seq_id] = num_tokens
        self._freed.discard(seq_id)
        self._set_row(seq_id, table)
        return list(table)

    def append_slot(self, seq_id: int) -> tuple[int, tuple[int, int] | None]:
        """Slot of the sequence's next token, and the (src, dst) block copy the caller must do first, or None.

        A new block is taken when the last one is full; a shared partial last block is replaced by a
        private one (copy-on-write): copy block src to dst (KVCachePool.copy_blocks) before writing.
        Raises OutOfBlocks, leaving the sequence unchanged.
        """
        slots, _, copies = self._append_batch([seq_id])
        return slots[0], (copies[0] if copies else None)

    def append_slots(self, seq_ids: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """append_slot for a decode batch, all or nothing: (slots, copies to do before the KV write)."""
        slots, _, copies = self._append_batch(seq_ids)
        return slots, copies

    def _append_batch(self, seq_ids: Sequence[int]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """append_slot for each of seq_ids, all or nothing: (slots, positions, copies). The loop of every
        decode step (one pass, ~1 us a sequence): the checks come first, so the pass cannot fail half-way."""
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a sequence appears twice in one decode batch")
        need = self._batch_need(seq_ids)
        if need > len(self._free):
            raise OutOfBlocks(need, len(self._free))
        bs, tables, lengths, ref = self.block_size, self._tables, self._lengths, self._ref
        slots, positions, copies = [], [], []
        for s in seq_ids:
            table, pos = tables[s], lengths[s]
            off = pos % bs
            if off == 0:  # the last block is full: a new one
                block = self._take()
                table.append(block)
                self._set_entry(s, len(table) - 1, block)
            else:
                block = table[-1]
                if ref[block] > 1:  # shared partial block: copy-on-write into a private one
                    dst = self._take()
                    ref[block] -= 1
                    table[-1] = dst
                    self._set_entry(s, len(table) - 1, dst)
                    copies.append((block, dst))
                    block = dst
            lengths[s] = pos + 1
            slots.append(block * bs + off)
            positions.append(pos)
        return slots, positions, copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (one more reference each); same length."""
        table = self._tables[self._known(parent_id)]
        if child_id in self._tables:
            raise ValueError(f"fork target sequence {child_id} already has blocks")
        for b in table:
            self._ref[b] += 1
        self._tables[child_id] = list(table)
        self._lengths[child_id] = self._lengths[parent_id]
        self._freed.discard(child_id)
        self._set_row(child_id, table)

    def free(self, seq_id: int) -> None:
        """Drop the sequence; each of its blocks loses a reference and returns to the free list at zero."""
        if seq_id not in self._tables and seq_id in self._freed:
            raise ValueError(f"double free of sequence {seq_id}")
        table = self._tables.pop(self._known(seq_id))
        del self._lengths[seq_id]
        row = self._row_of.pop(seq_id)
        self._rows[row, : len(table)] = 0  # padding is block 0
        self._free_rows.append(row)
        for b in reversed(table):  # reversed: the LIFO free list hands them back in table order
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
            elif self._ref[b] < 0:
                raise AssertionError(f"block {b} reference count went negative")
        self._freed.add(seq_id)

    def reset(self) -> None:
        """Forget every sequence (end of a rollout phase)."""
        self.__init__(self.num_blocks, self.block_size)

    # ------------------------------------------------------------------------- kernel arguments

    def prepare_decode(
        self, seq_ids: Sequence[int], width: int | None = None, device: torch.device | str | None = None
    ) -> DecodeBatch:
        """Append one slot to every sequence (all or nothing, OutOfBlocks) and build the step's tensors.

        width: block-table columns (fix it, e.g. max_model_len // block_size, for CUDA graphs).
        """
        slots, positions, copies = self._append_batch(seq_ids)
        table = self.block_table(seq_ids, width)
        host = torch.tensor([slots, positions], dtype=torch.int64)
        lens = (host[1] + 1).to(torch.int32)
        if device is not None:
            # non-blocking: a blocking copy would wait for the decode step still running (the generator's overlap)
            host, lens, table = (upload(t, device) for t in (host, lens, table))
        return DecodeBatch(host[0], host[1], lens, table, copies, max(positions, default=-1) + 1)

    def block_table(
        self, seq_ids: Sequence[int], width: int | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """int32 [len(seq_ids), width] block tables, padded with block 0 (never read past a context)."""
        rows = [self._row_of[self._known(s)] for s in seq_ids]
        longest = self.blocks_for(max((self._lengths[s] for s in seq_ids), default=0))
        if width is None:
            width = max(longest, 1)
        elif width < longest:
            raise ValueError(f"block table width {width} is narrower than the longest table ({longest} blocks)")
        out = np.zeros((len(rows), width), dtype=np.int32)
        cols = min(width, self._rows.shape[1])
        out[:, :cols] = self._rows[rows, :cols]  # one gather: this runs every decode step
        return upload(torch.from_numpy(out), device)

    def slot_mapping(
        self,
        seq_ids: Sequence[int],
        starts: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """int64 slots of tokens [start, length) of each sequence, concatenated (a prefill's KV write).

        starts defaults to 0 (the whole allocated prompt); pass the cached prefix length to skip it.
        """
        parts = []
        for i, s in enumerate(seq_ids):
            length = self._lengths[self._known(s)]
            start = 0 if starts is None else starts[i]
            if not 0 <= start <= length:
                raise ValueError(f"start {start} outside the {length} tokens of sequence {s}")
            pos = torch.arange(start, length, dtype=torch.int64)
            table = torch.tensor(self._tables[s], dtype=torch.int64)
            parts.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
        return upload(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64), device)

    # --------------------------------------------------------------------------------- internals

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests, debugging)."""
        counts = [0] * self.num_blocks
        for s, table in self._tables.items():
            assert len(table) == self.blocks_for(self._lengths[s]), f"sequence {s}: table/length mismatch"
            for b in table:
                counts[b] += 1
        assert counts == self._ref, "reference counts do not match the block tables"
        assert len(set(self._free)) == len(self._free), "a block is on the free list twice"
        assert all(self._ref[b] == 0 for b in self._free), "a referenced block is on the free list"
        used = sum(1 for c in counts if c > 0)
        assert used + len(self._free) == self.num_blocks, "blocks leaked: free + used != total"
        assert set(self._row_of) == set(self._tables), "block-table rows out of step with the tables"
        for s, table in self._tables.items():
            row = self._rows[self._row_of[s]]
            assert row[: len(table)].tolist() == table and not row[len(table) :].any(), f"sequence {s}: row differs"
        assert not self._rows[self._free_rows].any(), "a free block-table row is not zeroed"

    def _set_row(self, seq_id: int, table: list[int]) -> None:
        """Give a new sequence an array row holding its table (the array grows by doubling)."""
        if not self._free_rows:
            n = self._rows.shape[0]
            self._rows = np.concatenate([self._rows, np.zeros_like(self._rows)])
            self._free_rows = list(range(2 * n - 1, n - 1, -1))
        row = self._free_rows.pop()
        self._row_of[seq_id] = row
        self._grow_columns(len(table))
        self._rows[row, : len(table)] = table

    def _set_entry(self, seq_id: int, col: int, block: int) -> None:
        self._grow_columns(col + 1)
        self._rows[self._row_of[seq_id], col] = block

    def _grow_columns(self, cols: int) -> None:
        if cols > self._rows.shape[1]:
            grown = np.zeros((self._rows.shape[0], max(cols, 2 * self._rows.shape[1])), dtype=np.int32)
            grown[:, : self._rows.shape[1]] = self._rows
            self._rows = grown

    def _known(self, seq_id: int) -> int:
        if seq_id not in self._tables:
            raise KeyError(f"unknown sequence id {seq_id}")
        return seq_id

    def _take(self) -> int:
        b = self._free.pop()
        self._ref[b] = 1
        return b

    def _batch_need(self, seq_ids: Sequence[int]) -> int:
        """Blocks one append to each of seq_ids takes: a shared block held only by batch members is
        copied by all but the last of them (that one then owns it alone)."""
        need = 0
        sharers: dict[int, int] = {}
        bs, tables, lengths, ref = self.block_size, self._tables, self._lengths, self._ref
        for s in seq_ids:
            if s not in tables:
                raise KeyError(f"unknown sequence id {s}")
            if lengths[s] % bs == 0:
                need += 1
            else:
                last = tables[s][-1]
                if ref[last] > 1:
                    sharers[last] = sharers.get(last, 0) + 1
        return need + sum(min(k, ref[b] - 1) for b, k in sharers.items())
