"""engine/kv_cache.py: block bookkeeping invariants, copy-on-write, pool sizing and views."""

import os
import random

import pytest
import torch

from engine.errors import InvalidInput
from engine.kv_cache import (
    BlockManager,
    KVCachePool,
    OutOfBlocks,
    bytes_per_block,
    cuda_cache_budget,
    num_blocks_for_memory,
    resolve_cache_dtype,
)


def _slots_of(bm: BlockManager, seq: int) -> list[int]:
    return bm.slot_mapping([seq]).tolist()


def test_allocate_append_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate(1, 6) == [0, 1]
    assert bm.num_free_blocks == 6 and bm.num_tokens(1) == 6
    assert _slots_of(bm, 1) == [0, 1, 2, 3, 4, 5]
    assert bm.append_slot(1) == (6, None)
    assert bm.append_slot(1) == (7, None)
    assert bm.num_free_blocks == 6
    slot, copy = bm.append_slot(1)  # block 1 is full: a new block
    assert (slot, copy) == (8, None) and bm.blocks(1) == [0, 1, 2]
    assert bm.num_free_blocks == 5
    bm.check_invariants()
    bm.free(1)
    assert bm.num_free_blocks == 8 and bm.num_sequences == 0
    bm.check_invariants()
    # Empty sequence: the first append takes a block.
    assert bm.allocate(2, 0) == []
    assert bm.append_slot(2)[0] % 4 == 0 and bm.num_free_blocks == 7


def test_freed_blocks_come_back_in_table_order():
    """A sequence's freed blocks go back so that the next allocation of that size takes the same blocks in the same
    order (a sequence's cache stays contiguous in the pool while it can)."""
    bm = BlockManager(num_blocks=12, block_size=4)
    bm.allocate(0, 10)
    first = bm.blocks(0)
    bm.free(0)
    bm.allocate(1, 10)
    assert bm.blocks(1) == first
    bm.check_invariants()


def test_fork_shares_and_copy_on_write():
    bm = BlockManager(num_blocks=10, block_size=4)
    prompt = bm.allocate(0, 6)  # blocks [a, b], b half full
    for child in (1, 2, 3):
        bm.fork(0, child)
    assert all(bm.ref_count(b) == 4 for b in prompt) and bm.num_free_blocks == 8
    bm.check_invariants()
    # Child 1 writes into the shared partial block: it moves to a private copy first.
    slot, copy = bm.append_slot(1)
    assert copy is not None and copy[0] == prompt[1] and copy[1] not in prompt
    assert slot == copy[1] * 4 + 2
    assert bm.blocks(1) == [prompt[0], copy[1]] and bm.ref_count(prompt[1]) == 3
    # Its next append lands in its now private block: no copy.
    assert bm.append_slot(1) == (copy[1] * 4 + 3, None)
    # The parent shares block b with children 2 and 3 still: it copies too.
    _, copy0 = bm.append_slot(0)
    assert copy0 is not None and copy0[0] == prompt[1]
    bm.check_invariants()
    # Children 2 and 3 in one decode batch: 2 copies (b has refcount 2), then 3 has it alone.
    slots, copies = bm.append_slots([2, 3])
    assert len(copies) == 1 and copies[0][0] == prompt[1] and bm.blocks(3)[1] == prompt[1]
    assert slots[1] == prompt[1] * 4 + 2
    bm.check_invariants()
    # Freeing everything returns every block.
    for s in (0, 1, 2, 3):
        bm.free(s)
    assert bm.num_free_blocks == 10
    bm.check_invariants()


def test_fork_at_block_edge_needs_no_copy():
    bm = BlockManager(num_blocks=6, block_size=4)
    prompt = bm.allocate(0, 8)
    bm.fork(0, 1)
    slot, copy = bm.append_slot(1)
    assert copy is None and bm.blocks(1)[:2] == prompt and slot // 4 not in prompt


def test_errors():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(0, 5)
    with pytest.raises(KeyError, match="unknown sequence id 7"):
        bm.append_slot(7)
    with pytest.raises(KeyError, match="unknown sequence"):
        bm.fork(7, 8)
    with pytest.raises(ValueError, match="already has blocks"):
        bm.allocate(0, 1)
    with pytest.raises(ValueError, match="already has blocks"):
        bm.fork(0, 0)
    with pytest.raises(OutOfBlocks, match="need 3, 2 free") as info:
        bm.allocate(1, 9)
    assert info.value.needed == 3 and info.value.free == 2
    assert not bm.can_allocate(9) and bm.can_allocate(8)
    bm.free(0)
    with pytest.raises(ValueError, match="double free of sequence 0"):
        bm.free(0)
    with pytest.raises(KeyError, match="unknown sequence id 5"):
        bm.free(5)
    with pytest.raises(ValueError, match="block table width"):
        bm.allocate(3, 9)
        bm.block_table([3], width=2)
    with pytest.raises(ValueError, match="appears twice"):  # two slots for one sequence in one step
        bm.append_slots([3, 3])
    assert bm.num_tokens(3) == 9
    bm.check_invariants()


def test_out_of_blocks_on_append_leaves_state_unchanged():
    bm = BlockManager(num_blocks=2, block_size=2)
    bm.allocate(0, 2)
    bm.allocate(1, 1)
    bm.fork(1, 2)
    assert not bm.can_append([0, 1])
    with pytest.raises(OutOfBlocks):
        bm.append_slot(0)  # needs a fresh block, none free
    with pytest.raises(OutOfBlocks):
        bm.append_slots([1, 2])  # 1 copies the shared block: none free
    assert bm.num_tokens(0) == 2 and bm.num_tokens(1) == 1 and bm.num_tokens(2) == 1
    bm.check_invariants()
    bm.free(0)
    slots, copies = bm.append_slots([1, 2])
    assert len(copies) == 1 and len(set(slots)) == 2
    bm.check_invariants()


def test_block_table_and_slot_mapping():
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.allocate(0, 3)
    bm.allocate(1, 9)
    table = bm.block_table([1, 0], width=5)
    assert table.dtype == torch.int32 and table.shape == (2, 5)
    assert table[0, :3].tolist() == bm.blocks(1) and table[1, :1].tolist() == bm.blocks(0)
    assert bm.block_table([0, 1]).shape == (2, 3)
    bm.allocate(2, 4)  # one block, not block 0: a table one column wide holds it
    assert bm.block_table([2]).tolist() == [bm.blocks(2)] and bm.blocks(2) != [0]
    slots = bm.slot_mapping([0, 1], starts=[1, 8])
    b0, b1 = bm.blocks(0), bm.blocks(1)
    assert slots.dtype == torch.int64
    assert slots.tolist() == [b0[0] * 4 + 1, b0[0] * 4 + 2, b1[2] * 4 + 0]
    # Slots agree with what the kernels compute from the block table.
    full = bm.slot_mapping([1])
    pos = torch.arange(9)
    assert torch.equal(full, table[0, pos // 4].long() * 4 + pos % 4)


def test_prepare_decode():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, 4)
    bm.allocate(1, 2)
    bm.fork(1, 2)
    batch = bm.prepare_decode([0, 1, 2], width=3)
    assert batch.positions.tolist() == [4, 2, 2] and batch.context_lens.tolist() == [5, 3, 3]
    assert batch.context_lens.dtype == torch.int32 and batch.slot_mapping.dtype == torch.int64
    assert batch.block_tables.shape == (3, 3) and batch.max_context_len == 5
    assert len(batch.copies) == 1  # 1 and 2 shared a partial block: one of them copies
    for i, pos in enumerate(batch.positions.tolist()):  # slots agree with the tables the kernel reads
        assert batch.slot_mapping[i] == batch.block_tables[i, pos // 4] * 4 + pos % 4
    assert batch.slot_mapping.unique().numel() == 3
    bm.check_invariants()


def test_random_operations_never_leak():
    """Thousands of random allocate / fork / append / batched append / free, OutOfBlocks handled by freeing.

    A fake cache maps slot -> (sequence, position) written there, with CoW copies applied, so a block
    handed to two owners or written while shared shows up as a wrong position.
    """
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    live: list[int] = []
    next_id = 0
    cache: dict[int, int] = {}  # slot -> position written there

    def apply_copy(copy):
        if copy is not None:
            src, dst = copy
            for off in range(4):
                if src * 4 + off in cache:
                    cache[dst * 4 + off] = cache[src * 4 + off]

    def write(seq, slot, pos):
        assert bm.ref_count(slot // 4) == 1  # never write into a shared block
        cache[slot] = pos

    for _ in range(4000):
        op = rng.random()
        try:
            if op < 0.2 or not live:
                n = rng.randint(0, 20)
                bm.allocate(next_id, n)
                for p, s in enumerate(_slots_of(bm, next_id)):
                    write(next_id, s, p)
                live.append(next_id)
                next_id += 1
            elif op < 0.35:
                bm.fork(rng.choice(live), next_id)
                live.append(next_id)
                next_id += 1
            elif op < 0.65:
                seq = rng.choice(live)
                pos = bm.num_tokens(seq)
                slot, copy = bm.append_slot(seq)
                apply_copy(copy)
                write(seq, slot, pos)
            elif op < 0.85:
                batch = rng.sample(live, rng.randint(1, len(live)))
                positions = [bm.num_tokens(s) for s in batch]
                fits = bm.can_append(batch)
                try:
                    slots, copies = bm.append_slots(batch)
                except OutOfBlocks:
                    assert not fits
                    assert [bm.num_tokens(s) for s in batch] == positions  # all or nothing
                    raise
                assert fits
                for copy in copies:
                    apply_copy(copy)
                for seq, slot, pos in zip(batch, slots, positions):
                    write(seq, slot, pos)
            else:
                bm.free(live.pop(rng.randrange(len(live))))
        except OutOfBlocks:
            bm.free(live.pop(rng.randrange(len(live))))
        if rng.random() < 0.05:
            bm.check_invariants()
            for seq in live:  # every live token's slot still holds what was written for its position
                assert [cache[s] for s in _slots_of(bm, seq)] == list(range(bm.num_tokens(seq)))
            tables = bm.block_table(live).tolist() if live else []  # the step's array gather == the lists
            assert tables == [bm.blocks(s) + [0] * (len(tables[0]) - len(bm.blocks(s))) for s in live]
    bm.check_invariants()
    assert next_id > 500 and bm.num_free_blocks < 64
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == 64
    bm.check_invariants()


# ------------------------------------------------------------------------------------------ pool


def test_pool_sizing_math():
    per = bytes_per_block(40, 16, 40, 128, torch.bfloat16)
    assert per == 40 * 2 * 16 * 40 * 128 * 2  # Llama-2-13B: 13.1 MB per 16-token block
    shape = dict(num_layers=40, block_size=16, num_kv_heads=40, head_dim=128, dtype=torch.bfloat16)
    assert num_blocks_for_memory(50 * 2**30, **shape) == 50 * 2**30 // per
    assert num_blocks_for_memory(per - 1, **shape) == 0
    fp8 = dict(shape, dtype=torch.float8_e4m3fn)
    assert num_blocks_for_memory(50 * 2**30, **fp8) == 50 * 2**30 // (per // 2)  # twice the blocks


def test_cuda_cache_budget(monkeypatch):
    """The GPU budget, with the memory queries faked: the fraction of the device, less what is in use and the
    largest step's activations."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (50 * gib, 80 * gib))  # 30 GiB in use
    assert cuda_cache_budget("cuda", 0.9, 2 * gib) == int(80 * gib * 0.9) - 30 * gib - 2 * gib
    n = num_blocks_for_memory(cuda_cache_budget("cuda", 0.9, 2 * gib), num_layers=40, block_size=16,
                              num_kv_heads=40, head_dim=128, dtype=torch.bfloat16)  # fmt: skip
    assert n * 16 > 45_000  # ~46k tokens of 13B KV cache in 40 GB
    assert cuda_cache_budget("cuda", 0.3) == 0  # less than what is in use: no cache (the generator says so)
    assert cuda_cache_budget("cuda", 0.3, clamp=False) == int(80 * gib * 0.3) - 30 * gib  # (the shortfall)
    with pytest.raises(ValueError, match="fraction 1.5"):
        cuda_cache_budget("cuda", 1.5)


def test_pool_views_alias_storage_and_release():
    pool = KVCachePool(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    assert pool.tensor.shape == (3, 2, 5, 4, 2, 8) and pool.tensor.dtype == torch.float16
    for l in range(3):
        k, v = pool.layer(l)
        assert k.shape == (5, 4, 2, 8) and v.shape == (5, 4, 2, 8)
        assert k.untyped_storage().data_ptr() == pool.tensor.untyped_storage().data_ptr()
        assert k.data_ptr() == pool.tensor[l, 0].data_ptr() and v.data_ptr() == pool.tensor[l, 1].data_ptr()
        k.fill_(l)
        v.fill_(-l)
    assert torch.equal(pool.tensor[2, 0], torch.full((5, 4, 2, 8), 2.0, dtype=torch.float16))
    assert torch.equal(pool.tensor[1, 1], torch.full((5, 4, 2, 8), -1.0, dtype=torch.float16))
    # Views are the per-layer caches the kernels accept: one flat slot index per token.
    assert pool.layer(0)[0].view(-1, 2, 8).data_ptr() == pool.tensor.data_ptr()
    with pytest.raises(IndexError):
        pool.layer(3)
    # Copy-on-write copies whole blocks in every layer.
    pool.tensor.copy_(torch.randn(pool.shape).half())
    before = pool.tensor.clone()
    pool.copy_blocks([(1, 3), (0, 4)])
    assert torch.equal(pool.tensor[:, :, 3], before[:, :, 1]) and torch.equal(pool.tensor[:, :, 4], before[:, :, 0])
    assert torch.equal(pool.tensor[:, :, :3], before[:, :, :3])
    pool.release()
    assert not pool.is_allocated
    with pytest.raises(RuntimeError, match="released"):
        pool.layer(0)
    pool.reallocate()
    assert pool.is_allocated and pool.tensor.shape == (3, 2, 5, 4, 2, 8)
    pool.reallocate(num_blocks=7)
    assert pool.num_blocks == 7 and pool.tensor.shape == (3, 2, 7, 4, 2, 8)
    held = pool.tensor
    pool.reallocate(num_blocks=7)  # the same shape: a no-op (the same memory, the decode graphs' address)
    assert pool.tensor is held
    with pytest.raises(ValueError, match="power of two"):
        KVCachePool(1, 4, 6, 1, 8)


def test_manager_and_pool_with_the_kernels():
    """A prefill write, a fork, a CoW copy and decode attention through the manager's tables."""
    from kernels import reference
    from kernels.paged_attention import paged_decode_attention, write_kv_cache

    pool = KVCachePool(num_layers=1, num_blocks=6, block_size=4, num_kv_heads=1, head_dim=16, dtype=torch.float32)
    pool.tensor.fill_(float("nan"))
    k_cache, v_cache = pool.layer(0)
    bm = BlockManager(pool.num_blocks, pool.block_size)
    bm.allocate(0, 6)
    k, v = torch.randn(7, 1, 16), torch.randn(7, 1, 16)
    write_kv_cache(k[:6], v[:6], k_cache, v_cache, bm.slot_mapping([0]))
    bm.fork(0, 1)
    slot, copy = bm.append_slot(1)
    assert copy is not None
    pool.copy_blocks([copy])
    write_kv_cache(k[6:], v[6:], k_cache, v_cache, torch.tensor([slot]))
    q = torch.randn(2, 2, 16)
    tables = bm.block_table([0, 1], width=3)
    lens = torch.tensor([6, 7], dtype=torch.int32)
    got = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    for i, n in enumerate((6, 7)):
        s = torch.einsum("hd,ld->hl", q[i].double(), k[:n, 0].double()) / 4.0
        want = torch.softmax(s, -1) @ v[:n, 0].double()
        torch.testing.assert_close(got[i].double(), want, atol=1e-5, rtol=1e-5)
    ref = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _native_block_ops(build_dir):
    """torch.ops.tulu from engine._csrc when installed (TULU_PPO_BUILD_CSRC=1), else from csrc/block_ops.cpp compiled
    here (about 12 s) where a C++ compiler and ninja are found; None without them."""
    import shutil

    try:
        import engine._csrc  # noqa: F401 (registers the op)

        return torch.ops.tulu
    except ImportError:
        pass
    from torch.utils.cpp_extension import is_ninja_available, load

    if not (is_ninja_available() and (shutil.which("c++") or shutil.which("g++"))):
        return None
    source = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "block_ops.cpp")
    load(name="tulu_block_ops_test", sources=[source], build_directory=str(build_dir), is_python_module=False)
    return torch.ops.tulu


def test_optional_native_slot_mapping_matches(tmp_path):
    """csrc/block_ops.cpp (built into the package only with TULU_PPO_BUILD_CSRC=1; compiled by the test otherwise)
    computes the same slots as Python, and refuses a position past a sequence's table and inputs that do not fit."""
    native = _native_block_ops(tmp_path)
    if native is None:
        pytest.skip("no engine._csrc, and no C++ compiler and ninja to build csrc/block_ops.cpp")
    bm = BlockManager(num_blocks=64, block_size=4)
    for sid, n in enumerate([5, 1, 12, 8]):
        bm.allocate(sid, n)
    ids = [0, 1, 2, 3]
    for starts in ([2, 0, 7, 8], [0, 0, 0, 0], [5, 1, 12, 3]):  # (the last: nothing of the first three)
        counts = [bm.num_tokens(s) - st for s, st in zip(ids, starts)]
        got = native.slot_mapping(bm.block_table(ids), torch.tensor(starts), torch.tensor(counts), 4)
        assert got.dtype == torch.int64 and torch.equal(got, bm.slot_mapping(ids, starts)), starts
    table = bm.block_table(ids)
    with pytest.raises(RuntimeError, match="position 12 of sequence 2 is past its block table"):
        native.slot_mapping(table, torch.tensor([2, 0, 7, 8]), torch.tensor([1, 1, 6, 1]), 4)
    with pytest.raises(RuntimeError, match=r"start and count need one entry per block-table row \(4\), got 3 and 4"):
        native.slot_mapping(table, torch.tensor([0, 0, 0]), torch.tensor([1, 1, 1, 1]), 4)
    with pytest.raises(RuntimeError, match="sequence 1: start 0 and count -1 must be >= 0"):
        native.slot_mapping(table, torch.tensor([0, 0, 0, 0]), torch.tensor([1, -1, 1, 1]), 4)
    with pytest.raises(RuntimeError, match="block_size must be positive, got 0"):
        native.slot_mapping(table, torch.tensor([0, 0, 0, 0]), torch.tensor([1, 1, 1, 1]), 0)


def test_block_table_as_wide_as_the_longest_table():
    from engine.kv_cache import BlockManager

    bm = BlockManager(8, 4)
    bm.allocate(0, 8)  # two full blocks
    assert bm.block_table([0], width=2).tolist() == [bm.blocks(0)]


def test_headroom_counts_the_sequences_that_will_take_a_block():
    """headroom(): a block for each sequence that will still take one (a new block, or a copy of a shared partial
    last block: all its sharers but one copy it); none for one already holding every block it will need.
    prompt_headroom() says the same of a prompt and its forks before they are allocated."""
    bm = BlockManager(num_blocks=64, block_size=4)
    cases = [(6, 3, 7), (6, 3, 8), (6, 3, 9), (8, 2, 9), (8, 2, 8), (3, 1, 4), (3, 1, 5), (4, 1, 4)]
    cases += [(6, 3, 6), (3, 2, 3)]  # a shared partial last block, and the sequences already at their most
    for tokens, n, most in cases:
        bm.allocate(0, tokens)
        for child in range(1, n):
            bm.fork(0, child)
        got = bm.headroom((s, most) for s in range(n))
        assert got == bm.prompt_headroom(tokens, n, most), (tokens, n, most)
        # at most the blocks they will take before they end (copies, then new blocks up to `most` tokens each)
        free = bm.num_free_blocks
        for _ in range(most - tokens):
            bm.append_slots(list(range(n)))
        assert got <= free - bm.num_free_blocks, (tokens, n, most)
        assert got >= min(n, free - bm.num_free_blocks), (tokens, n, most)
        for s in range(n):
            bm.free(s)
    assert bm.prompt_headroom(6, 3, 7) == 2 and bm.prompt_headroom(6, 3, 9) == 3 and bm.prompt_headroom(4, 1, 4) == 0
    bm.allocate(0, 5)
    assert bm.headroom([(0, 5)]) == 0 and bm.headroom([(0, 6)]) == 0 and bm.headroom([(0, 9)]) == 1
    bm.free(0)
    # a sequence whose partial last block another one shares that is not counted (it will not grow): it copies it
    bm.allocate(0, 6)
    bm.fork(0, 1)
    assert bm.headroom([(0, 7)]) == 1 and bm.headroom([(0, 7), (1, 6)]) == 1 and bm.headroom([(0, 7), (1, 7)]) == 1


def test_a_table_longer_than_twice_the_rows_width_is_allocated_at_once():
    """A prompt of more blocks than twice the block-table array's columns (it starts at 16) widens it in one go."""
    bm = BlockManager(num_blocks=64, block_size=4)
    bm.allocate(0, 4 * 40 - 1)  # 40 blocks
    assert bm.block_table([0]).tolist() == [list(range(40))]
    bm.fork(0, 1)
    bm.allocate(2, 3)
    assert bm.block_table([2, 1], width=41).tolist() == [[40] + [0] * 40, list(range(40)) + [0]]
    bm.check_invariants()


def test_fp8_cache_needs_compute_capability_8_9(monkeypatch):
    """fp8 is refused on a GPU older than Ada (8.9), with the device queries faked; the model's dtype is accepted."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a fake GPU")
    cuda = torch.device("cuda", 0)
    for cc, ok in [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cc=cc: cc)
        if ok:
            assert resolve_cache_dtype("fp8", torch.bfloat16, cuda) == torch.float8_e4m3fn
        else:
            with pytest.raises(InvalidInput, match=rf"compute capability 8.9 or later .* is {cc[0]}\.{cc[1]}"):
                resolve_cache_dtype("fp8", torch.bfloat16, cuda)
    assert resolve_cache_dtype("auto", torch.bfloat16, cuda) == torch.bfloat16
    assert resolve_cache_dtype(None, torch.float32) == torch.float32


def test_release_collects_garbage_only_when_the_memory_did_not_come_back(monkeypatch):
    """release(): a full gc.collect() (a tenth of a second or more, each rollout) only when the pool's
    bytes did not come back as it dropped the tensor (a view held in a reference cycle), and a warning only when they
    did not come back after it either. On CPU there is nothing to give back: no collection. (CUDA's counters faked.)"""
    import gc
    import warnings

    collected = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or 0)
    pool = KVCachePool(num_layers=1, num_blocks=2, block_size=4, num_kv_heads=1, head_dim=8)
    pool.release()
    assert collected == [] and not pool.is_allocated
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    for allocated, collections, warned in (
        ([1000, 1000 - pool.nbytes], 0, False),  # freed as the tensor went
        ([1000, 1000, 1000 - pool.nbytes], 1, False),  # freed by the collection
        ([1000, 1000, 1000 - pool.nbytes + 1], 1, True),  # a byte short after it: still referenced
    ):
        counter = iter(allocated)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None, counter=counter: next(counter))
        pool.reallocate()
        pool.device = torch.device("cuda")  # (the tensor stays on the CPU: only the accounting is CUDA's)
        collected.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pool.release()
        assert len(collected) == collections and next(counter, None) is None
        assert [str(w.message) for w in caught] == (
            ["KV cache released but its memory is still referenced (a layer view alive?)"] if warned else []
        )
        pool.device = torch.device("cpu")


def test_release_against_cuda_accounting_that_follows_the_pool_tensor(monkeypatch):
    """release() with CUDA's allocated bytes modelled by the pool tensor's life (a layer view keeps it alive, as it
    keeps the storage): dropped at once, no collection and no warning; a view in a reference cycle, one collection
    frees it, no warning; a view held, a collection and the warning. Each time the allocator's cached blocks are
    handed back (torch.cuda.empty_cache), so the pool's memory serves the training phase; on CPU there are none."""
    import gc
    import warnings
    import weakref

    collected, emptied, real_collect = [], [], gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or real_collect(*a))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    pool = KVCachePool(num_layers=1, num_blocks=2, block_size=4, num_kv_heads=1, head_dim=8)
    pool.release()
    assert (collected, emptied) == ([], [])
    alive = []  # (a weak reference to the pool tensor: its bytes count as allocated while it lives)
    monkeypatch.setattr(
        torch.cuda, "memory_allocated", lambda device=None: 1000 + pool.nbytes * (alive[0]() is not None)
    )
    enabled = gc.isenabled()
    gc.disable()  # (the cycle is left to release's collection, not an automatic one)
    try:
        for how, collections, warned in (("dropped", 0, False), ("cycle", 1, False), ("held", 1, True)):
            pool.reallocate()
            alive[:] = [weakref.ref(pool.tensor)]
            pool.device = torch.device("cuda")  # (the tensor stays on the CPU: only the accounting is CUDA's)
            held = pool.layer(0) if how == "held" else None
            if how == "cycle":
                cycle = [pool.layer(0)]
                cycle.append(cycle)
                del cycle
            collected.clear()
            emptied.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pool.release()
            assert (len(collected), len(emptied)) == (collections, 1), how
            assert [str(w.message) for w in caught] == (
                ["KV cache released but its memory is still referenced (a layer view alive?)"] if warned else []
            ), how
            del held
            pool.device = torch.device("cpu")
    finally:
        if enabled:
            gc.enable()
