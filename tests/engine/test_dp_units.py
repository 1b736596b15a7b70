"""Three behaviours a data-parallel run relies on, checked directly and in seconds (stand-in models whose outputs can
be written down by hand; two gloo processes on CPU where ranks meet), against one process holding every rank's rows,
the ranks holding unequal numbers of sequences and of response tokens:

- held-out evaluation's metrics (engine.evaluate.evaluate): the means over every rank's answers;
- the value of each response token (engine.rollout.forward_rollout, minibatch_targets) and the GAE that reads it
  (shaped_targets): the value of the state that emits the token (no collective: one process, several micro-batches);
- --whiten-rewards (engine.trainer.rollout_targets -> engine.rollout.shaped_targets -> engine.ppo ->
  kernels.gae.masked_whiten with the DP group): the ranks whiten as one process over all their tokens.

The stand-in models: hidden_packed gives each packed token the features (token id, position), the score head a
fixed linear function of them (so a value or score names the token and position it was read at), the LM head a
seeded random [V, 2] matrix (policy and reference differ, so the KL terms are not 0).

The full-size checks (tests/engine/test_trainer.py's DP x TP run, on equal shares; test_recipe_oracle.py's
single-process iteration against transformers) take minutes; test_ppo.py whitens over DP with
ppo.advantages_and_returns called directly, not through the engine's wiring.
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from engine import evaluate, trainer
from engine.config import PPOConfig
from engine.data import Rollout
from engine.distributed import ProcessGrid
from engine.rollout import chunks, forward_rollout, minibatch_targets
from kernels import dispatch
from tests.engine.ranks import init_gloo, leave

VOCAB = 40
# five sequences: prompts of 1 to 4 tokens, responses of 1 to 6 (EOS is 2)
PROMPTS = [[1, 5, 9], [3], [1, 7, 3, 22], [4, 4], [11, 2, 6]]
RESPONSES = [[11, 12, 2], [13, 14, 15, 16, 17, 2], [16], [20, 21, 22, 23], [30, 31]]
# the DP shares: evaluate's deal of 5 prompts over 2 ranks (ids rank::2): 3 sequences and 6 response tokens on rank
# 0, 2 sequences and 10 tokens on rank 1
SHARES = [[0, 2, 4], [1, 3]]


def _value_head(h: torch.Tensor) -> torch.Tensor:
    """The stand-in score head: token id + position / 100 of the state it reads (distinct for every state here)."""
    return h[:, 0] + 0.01 * h[:, 1]


def _value_at(token: int, position: int) -> float:
    return token + 0.01 * position


class _Stub:
    """A Transformer as engine.rollout uses it, without layers: hidden_packed -> [N, 2] (token id, position)."""

    def __init__(self, head: str, seed: int = 0):
        self.head, self.group, self.real_vocab = head, None, None
        self.config = SimpleNamespace(pad_token_id=None)
        self.lm_head_weight = torch.randn(VOCAB, 2, generator=torch.Generator().manual_seed(seed)) * 0.1

    def hidden_packed(self, ids, positions, cu_seqlens):
        return torch.stack([ids.float(), positions.float()], 1)  # (nothing of the pack: a sequence's own states)

    def head_packed(self, h):
        return _value_head(h)


def _state(tmp_path, *, cfg: PPOConfig | None = None, grid: ProcessGrid | None = None, group=None, tokens=7):
    """What engine.rollout and engine.evaluate read of a TrainState, with the stand-in models; micro-batches of
    `tokens` tokens (several per rollout: sequences land in their rows from every micro-batch)."""
    cfg = cfg or PPOConfig()
    run = SimpleNamespace(micro_batch_tokens=tokens, output_dir=str(tmp_path), eval_greedy=False, eval_only=False,
                          seed=0, ignore_eos=False, policy="stub")  # fmt: skip
    return SimpleNamespace(
        cfg=cfg, run=run, grid=grid or ProcessGrid(), dp_group=group, device=torch.device("cpu"), kl_coef=cfg.kl_coef,
        policy=_Stub("lm", seed=1), ref=_Stub("lm", seed=2), value=_Stub("score"), reward=_Stub("score"),
        stop_ids=[2], iteration=3, step=6, tokenizer=None, tracker=None,
        eval_prompts=SimpleNamespace(prompts=[list(p) for p in PROMPTS]),
    )  # fmt: skip


def _rollout(seqs: list[int]) -> Rollout:
    """The sequences `seqs` of PROMPTS / RESPONSES as one rank's rollout (hit_eos: ends with EOS)."""
    offsets = [0]
    for i in seqs:
        offsets.append(offsets[-1] + len(RESPONSES[i]))
    return Rollout(
        prompts=[list(PROMPTS[i]) for i in seqs], responses=[list(RESPONSES[i]) for i in seqs],
        hit_eos=torch.tensor([RESPONSES[i][-1] == 2 for i in seqs]), gen_logprobs=torch.zeros(offsets[-1]),
        offsets=offsets,
    )  # fmt: skip


def _gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """GAE over one response, in Python floats: (advantages, returns)."""
    adv, ret = [0.0] * len(rewards), [0.0] * len(rewards)
    next_v = next_a = 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_v - values[t]
        next_a = delta + gamma * lam * next_a
        next_v = values[t]
        adv[t], ret[t] = next_a, next_a + values[t]
    return adv, ret


# ------------------------------------------------------------------------------------------ evaluation over DP --


def _fake_generate(state, prompts, prompt_ids=None, params=None):
    """engine.rollout.generate_rollout's stand-in: evaluation prompt i answered with RESPONSES[i]."""
    return _rollout(list(prompt_ids))


def _evaluate(state) -> dict:
    real = evaluate.generate_rollout
    evaluate.generate_rollout = _fake_generate
    try:
        with dispatch.reference_ops():
            return evaluate.evaluate(state)
    finally:
        evaluate.generate_rollout = real


def _eval_rank(rank, world, init_file, out_dir):
    import torch.distributed as dist

    init_gloo(rank, world, init_file)
    grid = ProcessGrid(rank=rank, world_size=world, dp=world, dp_group=dist.group.WORLD)
    metrics = _evaluate(_state(out_dir, grid=grid, group=dist.group.WORLD))
    with open(os.path.join(out_dir, f"metrics{rank}.json"), "w") as f:
        json.dump(metrics, f)
    leave()


def test_evaluation_metrics_over_unequal_dp_shares_are_one_process_means(tmp_path):
    """engine.evaluate.evaluate on 2 gloo ranks holding 3 and 2 of the 5 evaluation prompts (6 and 10 response
    tokens): every rank's metrics (score, score_penalized, kl, reward, response_len, no_eos_frac, prompts) and rank 0's
    eval.jsonl and eval/iter-N.jsonl are those of one process over all 5, and the score, response_len and no_eos_frac
    means are the hand-written ones. test_trainer.py's DP x TP run evaluates equal shares only (a per-rank mean
    averaged over ranks is right there); test_evaluate.py evaluates in one process."""
    import torch.multiprocessing as mp

    (tmp_path / "one").mkdir()
    one = _evaluate(_state(tmp_path / "one"))
    mp.spawn(_eval_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)

    lens = [len(r) for r in RESPONSES]
    scores = [_value_at(r[-1], len(p) + len(r) - 1) for p, r in zip(PROMPTS, RESPONSES)]
    assert one["prompts"] == 5
    assert one["score"] == pytest.approx(sum(scores) / 5, rel=1e-6)
    assert one["response_len"] == pytest.approx(sum(lens) / 5)
    assert one["no_eos_frac"] == pytest.approx(sum(r[-1] != 2 for r in RESPONSES) / 5)
    assert one["kl"] != 0.0 and one["score_penalized"] != one["score"]
    for rank in range(2):
        got = json.loads((tmp_path / f"metrics{rank}.json").read_text())
        for k in (*evaluate.EVAL_KEYS, "prompts"):
            assert got[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), (rank, k, got[k], one[k])
    logged = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and all(logged[0][k] == pytest.approx(one[k], rel=1e-5) for k in evaluate.EVAL_KEYS)
    recs = [json.loads(x) for x in (tmp_path / "eval/iter-000003.jsonl").read_text().splitlines()]
    assert [r["prompt_index"] for r in recs] == list(range(5))
    assert [r["response_ids"] for r in recs] == RESPONSES


# ---------------------------------------------------------------------------------------------- value alignment --


def test_values_are_read_at_the_state_that_emits_each_response_token(tmp_path):
    """forward_rollout's value of response token j of a sequence with prompt p is the value head at position
    len(p) - 1 + j (the prefix that ends just before the token: the state the token is the action of), read from
    every micro-batch into that token's own flat row; shaped_targets' GAE reads those values (advantages and returns
    written out here); minibatch_targets (EasyLM's per-minibatch targets) reads its minibatch's values at the same
    states, for a minibatch out of rollout order. test_data.py checks pack's indices alone and test_recipe_oracle.py
    the whole iteration against transformers (minutes); this checks the value rows and what GAE makes of them."""
    cfg = PPOConfig(gamma=0.9, lam=0.8, recompute_old_logprobs_per_minibatch=True)
    state = _state(tmp_path, cfg=cfg, tokens=12)  # (micro-batches of 1 and 2 sequences)
    seqs = list(range(len(PROMPTS)))
    ro = _rollout(seqs)
    with dispatch.reference_ops():
        forward_rollout(state, ro)
        trainer.rollout_targets(state, ro)
    want_v, want_adv, want_ret = [], [], []
    for i in seqs:
        p, r = PROMPTS[i], RESPONSES[i]
        tokens = p + r
        values = [_value_at(tokens[len(p) - 1 + j], len(p) - 1 + j) for j in range(len(r))]
        a, b = ro.offsets[i], ro.offsets[i + 1]
        # (the rest of the rewards from the engine's log-probs and score: the values are what is checked here)
        kl = (ro.logprobs[a:b] - ro.ref_logprobs[a:b]).double().tolist()
        rewards = [-cfg.kl_coef * k for k in kl]
        rewards[-1] += float(ro.scores[i]) if r[-1] == 2 else cfg.missing_eos_penalty
        adv, ret = _gae(rewards, values, cfg.gamma, cfg.lam)
        want_v += values
        want_adv += adv
        want_ret += ret
        assert float(ro.scores[i]) == pytest.approx(_value_at(tokens[-1], len(tokens) - 1))
    torch.testing.assert_close(ro.values.double(), torch.tensor(want_v, dtype=torch.float64), atol=1e-5, rtol=1e-6)
    for k, want in (("advantages", want_adv), ("returns", want_ret)):
        torch.testing.assert_close(ro.targets[k].double(), torch.tensor(want, dtype=torch.float64), atol=1e-5,
                                   rtol=1e-5, msg=k)  # fmt: skip

    mb = [3, 0]  # (a minibatch out of rollout order, in two micro-batches)
    rows = torch.cat([torch.arange(ro.offsets[i], ro.offsets[i + 1]) for i in mb])
    with dispatch.reference_ops():
        _, values, targets = minibatch_targets(state, ro, mb, list(chunks(state, ro, mb)), rows)
    torch.testing.assert_close(values.double(), torch.tensor(want_v, dtype=torch.float64), atol=1e-5, rtol=1e-6)
    for k, want in (("advantages", want_adv), ("returns", want_ret)):
        torch.testing.assert_close(targets[k][rows].double(), torch.tensor(want, dtype=torch.float64)[rows],
                                   atol=1e-5, rtol=1e-5, msg=k)  # fmt: skip


# ------------------------------------------------------------------------------------- whitened rewards over DP --


# each rank's share of one optimizer minibatch (global sequences, out of rollout order): 5 tokens on rank 0, 4 on rank 1
MINIBATCH = [[4, 0], [3]]
WHITEN = PPOConfig(whiten_rewards=True, gamma=0.95, lam=0.9, recompute_old_logprobs_per_minibatch=True)


def _whiten_targets(state, seqs: list[int], minibatch: list[int]) -> tuple[dict, dict, dict]:
    """The sequences `seqs` as this rank's rollout: (rollout_targets' rewards, advantages and returns; those of
    minibatch_targets for the sequences `minibatch` (global ids, a subset of `seqs`); the scoring pass's log-probs,
    values and scores), flat per token in `seqs` order (the minibatch's rows alone hold its targets)."""
    ro = _rollout(seqs)
    with dispatch.reference_ops():
        forward_rollout(state, ro)
        trainer.rollout_targets(state, ro)
        mb = [seqs.index(i) for i in minibatch]
        rows = torch.cat([torch.arange(ro.offsets[i], ro.offsets[i + 1]) for i in mb])
        _, _, mine = minibatch_targets(state, ro, mb, list(chunks(state, ro, mb)), rows)
    keep = ("rewards", "advantages", "returns")
    scored = dict(logprobs=ro.logprobs, ref_logprobs=ro.ref_logprobs, values=ro.values, scores=ro.scores)
    return {k: ro.targets[k] for k in keep}, {k: mine[k] for k in keep}, {**scored, "offsets": ro.offsets}


def _whiten_rank(rank, world, init_file, out_dir):
    import torch.distributed as dist

    init_gloo(rank, world, init_file)
    grid = ProcessGrid(rank=rank, world_size=world, dp=world, dp_group=dist.group.WORLD)
    state = _state(out_dir, cfg=WHITEN, grid=grid, group=dist.group.WORLD, tokens=6)
    torch.save(_whiten_targets(state, SHARES[rank], MINIBATCH[rank]), os.path.join(out_dir, f"whiten{rank}.pt"))
    leave()


def _whitened_by_hand(scored: list[dict], cfg: PPOConfig) -> list[dict]:
    """Each rank's KL-shaped, EOS-penalised rewards whitened with one mean and unbiased variance over every rank's
    tokens (the mean kept: TRL's variant), and their GAE, in Python floats from each rank's scoring pass (`scored`)."""
    raw = []  # per rank, per sequence: the rewards before whitening
    for share, d in zip(SHARES, scored):
        off, seqs = d["offsets"], []
        for j, i in enumerate(share):
            kl = (d["logprobs"][off[j] : off[j + 1]] - d["ref_logprobs"][off[j] : off[j + 1]]).double().tolist()
            r = [-cfg.kl_coef * k for k in kl]
            r[-1] += float(d["scores"][j]) if RESPONSES[i][-1] == 2 else cfg.missing_eos_penalty
            seqs.append(r)
        raw.append(seqs)
    flat = [x for seqs in raw for r in seqs for x in r]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    out = []
    for seqs, d in zip(raw, scored):
        off, cols = d["offsets"], {"rewards": [], "advantages": [], "returns": []}
        for j, r in enumerate(seqs):
            w = [(x - mean) / math.sqrt(var + 1e-8) + mean for x in r]
            adv, ret = _gae(w, d["values"][off[j] : off[j + 1]].double().tolist(), cfg.gamma, cfg.lam)
            cols["rewards"] += w
            cols["advantages"] += adv
            cols["returns"] += ret
        out.append({k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()})
    return out


def _rows_of(offsets: list[int], local: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in local])


def test_whitened_rewards_over_unequal_dp_shares_are_one_process_whitening(tmp_path):
    """--whiten-rewards through the engine's own wiring, on 2 gloo ranks holding 3 and 2 sequences (6 and 10 response
    tokens, padded [B, T] rows of other widths): trainer.rollout_targets -> shaped_targets with the state's dp_group
    gives every rank the rewards, advantages and returns of one process holding all 5 sequences, and those written out
    here (one mean and unbiased variance over all 16 tokens); minibatch_targets (EasyLM's per-minibatch targets), for
    a minibatch of 5 + 4 tokens, those of one process whitening that minibatch. test_ppo.py and
    tests/kernels/test_gae.py call ppo.advantages_and_returns and masked_whiten with the group by hand; a
    shaped_targets (the engine's one caller) that left the state's group out passes them and fails this."""
    import torch.multiprocessing as mp

    mp.spawn(_whiten_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"whiten{r}.pt", weights_only=False) for r in range(2)]
    seqs = SHARES[0] + SHARES[1]
    one_rollout, one_mb, one_scored = _whiten_targets(_state(tmp_path, cfg=WHITEN, tokens=6), seqs, sum(MINIBATCH, []))
    by_hand = _whitened_by_hand([g[2] for g in got], WHITEN)
    for rank, (rollout, mb, scored) in enumerate(got):
        mine = [seqs.index(i) for i in SHARES[rank]]
        rows = _rows_of(one_scored["offsets"], mine)  # (this rank's tokens among the one process's)
        mb_rows = _rows_of(one_scored["offsets"], [seqs.index(i) for i in MINIBATCH[rank]])
        mb_mine = _rows_of(scored["offsets"], [SHARES[rank].index(i) for i in MINIBATCH[rank]])
        for k in ("rewards", "advantages", "returns"):
            torch.testing.assert_close(rollout[k], one_rollout[k][rows], atol=1e-5, rtol=1e-5, msg=f"rank {rank} {k}")
            torch.testing.assert_close(rollout[k].double(), by_hand[rank][k], atol=1e-5, rtol=1e-5, msg=f"{rank} {k}")
            torch.testing.assert_close(
                mb[k][mb_mine], one_mb[k][mb_rows], atol=1e-5, rtol=1e-5, msg=f"minibatch, rank {rank} {k}"
            )
    # (the minibatch is whitened over its own tokens: not the rollout's targets again)
    mb_rows = _rows_of(one_scored["offsets"], [seqs.index(i) for i in sum(MINIBATCH, [])])
    assert not torch.allclose(one_mb["rewards"][mb_rows], one_rollout["rewards"][mb_rows], atol=1e-3)
