"""engine.data: PromptBatches (seeded epoch order, fixed batches, DP sharding, resumable) and rollout packing."""

import pytest
import torch

from engine.data import PromptBatches, Rollout, global_position, pack, split_by_tokens, to_padded
from engine.tokenizer import PromptSet

PROMPTS = [[100 + i, i] for i in range(23)]  # prompt i is recognisable by its last token


def _ids(batch):
    idx, toks = batch
    assert [t[-1] for t in toks] == idx
    return idx


def test_epochs_are_seeded_permutations_and_drop_the_last_batch():
    data = PromptBatches(PROMPTS, 5, seed=3, epochs=2)
    assert len(data) == 8  # 23 // 5 = 4 per epoch
    batches = [_ids(b) for b in data]
    assert len(batches) == 8 and all(len(b) == 5 for b in batches)
    for epoch in (batches[:4], batches[4:]):
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 20  # no prompt twice in an epoch
    assert batches[:4] != batches[4:]  # a fresh order each epoch
    assert [_ids(b) for b in PromptBatches(PROMPTS, 5, seed=3, epochs=2)] == batches  # deterministic
    assert [_ids(b) for b in PromptBatches(PROMPTS, 5, seed=4, epochs=2)] != batches
    assert sorted(batches[0]) != batches[0] or sorted(batches[1]) != batches[1]  # shuffled


def test_dp_shards_are_strided_slices_of_the_global_batch():
    full = [_ids(b) for b in PromptBatches(PROMPTS, 6, seed=1)]
    shards = [[_ids(b) for b in PromptBatches(PROMPTS, 6, seed=1, dp_rank=r, dp_size=3)] for r in range(3)]
    for k, batch in enumerate(full):
        assert [shards[r][k] for r in range(3)] == [batch[r::3] for r in range(3)]


def test_resume_continues_with_the_next_batch():
    data = PromptBatches(PromptSet(PROMPTS, [[]] * len(PROMPTS)), 4, seed=7, epochs=3)
    straight = [_ids(b) for b in data]
    first = PromptBatches(PROMPTS, 4, seed=7, epochs=3)
    head = [_ids(next(first)) for _ in range(6)]  # crosses the epoch boundary (5 per epoch)
    state = first.state_dict()
    resumed = PromptBatches(PROMPTS, 4, seed=7, epochs=3)
    resumed.load_state_dict(state)
    assert resumed.batches_done == 6
    assert head + [_ids(b) for b in resumed] == straight


def test_bad_sizes_and_mismatched_resume():
    with pytest.raises(ValueError, match="multiple of the data-parallel size"):
        PromptBatches(PROMPTS, 5, dp_size=2)
    with pytest.raises(ValueError, match="cannot fill one rollout batch"):
        PromptBatches(PROMPTS, 24)
    for rank in (-1, 2):
        with pytest.raises(ValueError, match=f"dp_rank {rank} outside"):
            PromptBatches(PROMPTS, 4, dp_rank=rank, dp_size=2)
    state = PromptBatches(PROMPTS, 4, seed=7).state_dict()
    with pytest.raises(ValueError, match="saved seed 7, now 8"):
        PromptBatches(PROMPTS, 4, seed=8).load_state_dict(state)


def test_pack_lines_up_hidden_states_and_targets():
    ro = Rollout(
        prompts=[[1, 5, 6], [1, 7]], responses=[[8, 9, 2], [4]], hit_eos=torch.tensor([True, False]),
        gen_logprobs=torch.zeros(4), offsets=[0, 3, 4],
    )  # fmt: skip
    pk = pack(ro, [1, 0], torch.device("cpu"))
    assert pk["ids"].tolist() == [1, 7, 4, 1, 5, 6, 8, 9, 2]
    assert pk["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert pk["cu_seqlens"].tolist() == [0, 3, 9]
    assert pk["act"].tolist() == [1, 5, 6, 7]  # the token before each response token
    assert pk["targets"].tolist() == [4, 8, 9, 2]
    assert pk["rows"].tolist() == [3, 0, 1, 2]
    assert pk["last"].tolist() == [2, 8]
    assert split_by_tokens([3, 4, 2, 9, 1], 7) == [[0, 1], [2], [3], [4]]


def test_to_padded_round_trips():
    flat = torch.arange(6, dtype=torch.float32)
    padded, mask, idx = to_padded(flat, [0, 2, 3, 6])
    assert padded.tolist() == [[0, 1, 0], [2, 0, 0], [3, 4, 5]]
    assert mask.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert torch.equal(padded[idx], flat)


def test_resume_refuses_prompts_that_encode_otherwise():
    """The same number of prompts, other tokens (another template, tokenizer or file): a resume would train on
    other prompts than the checkpoint's run dealt, so it is refused by name; the same prompts resume."""
    from engine.data import PromptBatches

    prompts = [[1, 5, 9], [1, 7], [1, 4, 4, 2]] * 4
    saved = PromptBatches(prompts, 4, seed=3).state_dict()
    PromptBatches([list(p) for p in prompts], 4, seed=3).load_state_dict(saved)
    other = [p[:-1] + [p[-1] + 1] for p in prompts]
    with pytest.raises(ValueError, match="the prompts are other tokens than the checkpoint's run trained on"):
        PromptBatches(other, 4, seed=3).load_state_dict(saved)
    del saved["prompts_digest"]  # (a checkpoint from before the digest: not checked)
    PromptBatches(other, 4, seed=3).load_state_dict(saved)


def test_prompts_digest_separates_prompt_boundaries():
    from engine.data import prompts_digest

    assert prompts_digest([[1, 2], [3]]) != prompts_digest([[1], [2, 3]])


def test_resume_refuses_another_batch_size():
    from engine.data import PromptBatches

    state = PromptBatches(PROMPTS, 4, seed=7).state_dict()
    with pytest.raises(ValueError, match="saved batch_size 4, now 5"):
        PromptBatches(PROMPTS, 5, seed=7).load_state_dict(state)


def test_epoch_orders_of_neighbouring_seeds_differ():
    from engine.data import PromptBatches

    assert PromptBatches(PROMPTS, 4, seed=3).epoch_order(1) != PromptBatches(PROMPTS, 4, seed=4).epoch_order(0)


def test_resume_restores_epoch_and_batch_not_swapped():
    from engine.data import PromptBatches

    first = PromptBatches(PROMPTS, 4, seed=7, epochs=3)
    for _ in range(2):
        next(first)
    resumed = PromptBatches(PROMPTS, 4, seed=7, epochs=3)
    resumed.load_state_dict(first.state_dict())
    assert (resumed.epoch, resumed.batch) == (0, 2)
    assert next(resumed) == next(first)


def test_global_position_is_where_a_ranks_sequence_stands_in_the_whole_rollout():
    """Rank r's local sequence l (its prompt l // samples, sample l % samples) stands where one process's rollout
    of the same global batch holds that prompt's sample."""
    samples, dp = 3, 2
    whole = [(i, s) for i in next(iter(PromptBatches(PROMPTS, 4, seed=1)))[0] for s in range(samples)]
    for rank in range(dp):
        mine = [(i, s) for i in next(iter(PromptBatches(PROMPTS, 4, seed=1, dp_rank=rank, dp_size=dp)))[0]
                for s in range(samples)]  # fmt: skip
        assert [whole[global_position(k, rank, dp, samples)] for k in range(len(mine))] == mine
