"""engine/scheduler.py's host-side bookkeeping on its own (no model, no forward): admission, preemption; the
generator's end-to-end scheduling under memory pressure is tests/engine/test_generate.py's."""

import collections

from engine.kv_cache import BlockManager
from engine.scheduler import GenerationStats, Seq, admission_waits, admit, preempt


def test_admission_does_not_wait_when_every_waiting_sequence_fits():
    waiting = collections.deque([[object()], [object()]])
    assert admission_waits(waiting, [object()] * 2, max_num_seqs=8, admit_min_seqs=4) is False


def test_preemption_takes_the_newest_sequences_first():
    """preempt frees the most recently admitted sequences until the others can all take a slot; they wait at the
    front of the queue in admission order (the oldest keep their cache and progress)."""
    blocks, stats = BlockManager(num_blocks=3, block_size=4), GenerationStats()
    running = [Seq(i, i, 0, [1] * 4, 4, 8, 0) for i in range(3)]
    for s in running:
        blocks.allocate(s.seq_id, 4)  # each holds one full block: its next token needs a new one, none free
    waiting = collections.deque([["queued"]])
    preempt(waiting, running, blocks, stats)
    assert [s.seq_id for s in running] == [0]
    assert [[s if isinstance(s, str) else s.seq_id for s in g] for g in waiting] == [[1], [2], ["queued"]]
    assert stats.preemptions == 2 and blocks.can_append([0]) and blocks.num_sequences == 1


def test_admission_keeps_a_block_of_headroom_for_each_admitted_sequence():
    """admit: each group admitted in one pass keeps its own headroom (a block for a sequence that will grow past its
    prompt's blocks) for the groups after it; a lone group into an empty engine is admitted whatever it will need."""
    limits = dict(max_num_seqs=8, max_num_batched_tokens=8192, admit_min_seqs=1)
    blocks = BlockManager(num_blocks=4, block_size=4)
    # prompts of one block, each to grow to 11 tokens (3 blocks): a block and a block of headroom each
    waiting = collections.deque([[Seq(i, i, 0, [1] * 4, 4, 12, 0)] for i in range(4)])
    admitted = admit(waiting, [], blocks, **limits)
    assert [[s.seq_id for s in g] for g in admitted] == [[0], [1]] and [g[0].seq_id for g in waiting] == [2, 3]
    assert blocks.num_free_blocks == 2
    # in 3 blocks the second's block and its own block of headroom do not fit beside the first's block of headroom
    blocks = BlockManager(num_blocks=3, block_size=4)
    waiting = collections.deque([[Seq(i, i, 0, [1] * 4, 4, 12, 0)] for i in range(2)])
    assert [[s.seq_id for s in g] for g in admit(waiting, [], blocks, **limits)] == [[0]]
    assert [g[0].seq_id for g in waiting] == [1]
    # a prompt of 9 tokens and its fork in a cache of 3 blocks (one sequence at full length): admitted, nothing runs
    blocks = BlockManager(num_blocks=3, block_size=4)
    waiting = collections.deque([[Seq(j, 0, j, [1] * 9, 9, 12, 0) for j in range(2)]])
    assert [[s.seq_id for s in g] for g in admit(waiting, [], blocks, **limits)] == [[0, 1]] and not waiting


def test_admission_takes_the_slots_of_sequences_leaving_with_the_step_in_flight():
    """admit's `leaving` (running sequences at their length limit with the step in flight): their slots go to the
    waiting groups at once (not a step later: a prompt that could have joined the next decode got a forward of its
    own), their blocks do not (freed once the step is read); with every running sequence leaving, a group is still
    admitted only if its blocks fit beside theirs (the lone-sequence rule is for an empty pool)."""
    limits = dict(max_num_seqs=2, max_num_batched_tokens=8192, admit_min_seqs=1)
    blocks = BlockManager(num_blocks=8, block_size=4)
    running = [Seq(i, i, 0, [1] * 4, 4, 5 if i == 0 else 12, 0) for i in range(2)]  # 0 ends with the step in flight
    for s in running:
        blocks.allocate(s.seq_id, 4)
    queue = lambda: collections.deque([[Seq(5, 5, 0, [1] * 3, 3, 8, 0)]])  # noqa: E731
    waiting = queue()
    assert admit(waiting, running, blocks, **limits) == [] and len(waiting) == 1  # (both slots taken)
    assert [[s.seq_id for s in g] for g in admit(waiting, running, blocks, **limits, leaving={0})] == [[5]]
    assert blocks.num_free_blocks == 5  # (sequence 0's block still held)
    # every running sequence leaving, the pool too full for the prompt beside their blocks: nothing admitted now
    blocks = BlockManager(num_blocks=2, block_size=4)
    for s in running:
        blocks.allocate(s.seq_id, 4)
    waiting = queue()
    assert admit(waiting, running, blocks, **limits, leaving={0, 1}) == [] and len(waiting) == 1
