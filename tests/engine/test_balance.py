"""engine/balance.py: each optimizer step's minibatch dealt out over the DP ranks by tokens."""

import json
import random

import pytest
import torch

from engine import balance
from tests.engine.runs import TIMING, torchrun_ranks


def test_the_deal_gives_the_longest_first_to_the_emptiest_rank():
    lengths = {(0, 0): 50, (0, 1): 40, (0, 2): 5, (1, 0): 30, (1, 1): 30, (1, 2): 20}
    # loads: 50 -> rank 0 (a tie: its own) 50/0; 40 -> 1: 50/40; 30 -> 1: 50/70; 30 -> 0: 80/70; 20 -> 1: 80/90;
    # 5 -> 0: 85/90
    to = balance.deal(lengths, 2)
    assert to == {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 0, (1, 2): 1, (0, 2): 0}, to
    # a tie of loads goes to the sequence's own rank, then the lowest
    assert balance.deal({(1, 0): 7, (0, 0): 7}, 2) == {(0, 0): 0, (1, 0): 1}
    assert balance.deal({(2, 0): 3}, 3) == {(2, 0): 2} and balance.deal({(1, 0): 3}, 3) == {(1, 0): 1}
    assert balance.deal({(0, 0): 3, (0, 1): 3}, 2) == {(0, 0): 0, (0, 1): 1}


@pytest.mark.parametrize("dp", [2, 3, 4])
def test_the_deal_is_within_one_sequence_of_even_and_the_same_on_every_rank(dp):
    """Any minibatch: every rank gets a sequence, the fullest and the emptiest rank differ by at most the longest
    sequence, and the deal does not depend on the order the ranks list the sequences in."""
    rnd = random.Random(dp)
    for _ in range(50):
        per = rnd.randint(1, 9)
        lengths = {
            (r, i): rnd.choice([rnd.randint(3, 40), rnd.randint(200, 1100)]) for r in range(dp) for i in range(per)
        }
        to = balance.deal(lengths, dp)
        loads = [sum(n for k, n in lengths.items() if to[k] == b) for b in range(dp)]
        assert all(any(to[k] == b for k in lengths) for b in range(dp))
        assert max(loads) - min(loads) <= max(lengths.values()), (loads, lengths)
        shuffled = list(lengths.items())
        rnd.shuffle(shuffled)
        assert balance.deal(dict(shuffled), dp) == to


def test_a_share_carries_each_sequences_own_ids_and_per_token_rows():
    """Two ranks' rollouts gathered (as balance.gather lays them: rank after rank): every rank's share of a
    minibatch holds whole sequences, each with its own token ids and its own rows of the four per-token fields, and
    the shares cover the minibatch once."""
    prompts = [[[1, 2], [3]], [[4, 5, 6], [7], [8, 9]]]
    responses = [[[10, 11, 12], [13]], [[14], [15, 16, 17, 18], [19, 20]]]
    starts, base = [], 0
    for rs in responses:
        starts.append([])
        for r in rs:
            starts[-1].append(base)
            base += len(r)
    # each token's value in every field names its field, rank, sequence and position
    flat = {}
    for f, name in enumerate(balance.FIELDS):
        flat[name] = torch.tensor(
            [1000 * f + 100 * r + 10 * i + t for r, rs in enumerate(responses) for i, s in enumerate(rs)
             for t in range(len(s))], dtype=torch.float32,
        )  # fmt: skip
    g = balance.Gathered(prompts, responses, starts, flat)
    members = [(0, 0), (1, 0), (1, 1), (1, 2)]
    parts = [balance.share(g, members, rank, 2, torch.device("cpu")) for rank in range(2)]
    seen = []
    for part in parts:
        for j, (p, resp) in enumerate(zip(part.prompts, part.responses)):
            (r, i) = next((r, i) for r, i in members if prompts[r][i] == p and responses[r][i] == resp)
            seen.append((r, i))
            a, b = part.offsets[j], part.offsets[j + 1]
            assert b - a == len(resp)
            for f, name in enumerate(balance.FIELDS):
                got = part.logprobs if name == "logprobs" else part.values if name == "values" else part.targets[name]
                want = [1000 * f + 100 * r + 10 * i + t for t in range(len(resp))]
                assert got[a:b].tolist() == want, (name, r, i)
    assert sorted(seen) == members
    # tokens: (0,0) 5, (1,1) 5, (1,0) 4, (1,2) 4: 5 -> rank 0 (own) 5/0, 5 -> 1: 5/5, 4 -> 1 (a tie: own) 5/9, 4 -> 0:
    # rank 1's third sequence trains on rank 0
    assert [p.prompts for p in parts] == [[prompts[0][0], prompts[1][2]], [prompts[1][0], prompts[1][1]]]


RECORD_SHARES = """
import atexit, json, os
import engine.balance as b
rec = []
real = b.share
def share(g, members, rank, dp, device):
    part = real(g, members, rank, dp, device)
    lens = {(r, i): len(g.prompts[r][i]) + len(g.responses[r][i]) for r, i in members}
    own = [g.prompts[rank][i] + g.responses[rank][i] for r, i in members if r == rank]
    rec.append({"trained": sum(len(p) + len(r) for p, r in zip(part.prompts, part.responses)),
                "sampled": sum(n for (r, _), n in lens.items() if r == rank), "longest": max(lens.values()),
                "moved": sum(p + r not in own for p, r in zip(part.prompts, part.responses))})
    return part
b.share = share
atexit.register(lambda: open(os.path.join(os.environ["COUNT_DIR"], "shares" + os.environ["RANK"]), "w").write(
    json.dumps(rec)))
"""


def test_dp2_deals_each_steps_tokens_evenly_and_trains_as_where_they_were_sampled(tmp_path, monkeypatch):
    """DP 2 (torchrun, gloo), two PPO epochs: with the deal (the default) each step's two shares differ by at most the
    longest sequence, hold the same tokens between them as the minibatch sampled on the two ranks, and some sequences
    train on the other rank; the run trains as the one with --no-balance-dp-tokens (the same minibatches, the sums
    in another order)."""
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks/sitecustomize.py").write_text(RECORD_SHARES)
    monkeypatch.setenv("COUNT_DIR", str(tmp_path))
    flags = ["--max-iterations", "1", "--ppo-epochs", "2", "--eval-prompts", ""]
    dealt = torchrun_ranks(tmp_path, 2, "dealt", *flags, hooks=tmp_path / "hooks")
    shares = [json.loads((tmp_path / f"shares{r}").read_text()) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 4  # (8 sequences, minibatches of 4: two steps an epoch, two epochs)
    for a, b in zip(*shares):
        assert abs(a["trained"] - b["trained"]) <= a["longest"] == b["longest"], (a, b)
        assert a["trained"] + b["trained"] == a["sampled"] + b["sampled"]
    assert sum(s["moved"] for rank in shares for s in rank) > 0, shares
    (tmp_path / "hooks/sitecustomize.py").unlink()
    kept = torchrun_ranks(tmp_path, 2, "kept", *flags, "--no-balance-dp-tokens")
    for m, n in zip(dealt[0]["history"], kept[0]["history"], strict=True):
        for k, v in n.items():
            if k not in TIMING:
                assert m[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for k, v in kept[0]["policy"].items():
        torch.testing.assert_close(dealt[0]["policy"][k], v, atol=1e-6, rtol=1e-5)


def test_dp2_deals_what_easylms_per_minibatch_targets_need(tmp_path):
    """--recompute-old-logprobs-per-minibatch (each minibatch's targets made again from the models as its step finds
    them, with the reference's log-probs and the scores) under DP 2: dealt by tokens, the run trains as with
    --no-balance-dp-tokens (the same minibatches; the rewards whitened over each, across the ranks)."""
    flags = ["--max-iterations", "1", "--eval-prompts", "", "--recompute-old-logprobs-per-minibatch"]
    flags += ["--whiten-rewards"]
    dealt = torchrun_ranks(tmp_path, 2, "dealt", *flags)
    kept = torchrun_ranks(tmp_path, 2, "kept", *flags, "--no-balance-dp-tokens")
    for m, n in zip(dealt[0]["history"], kept[0]["history"], strict=True):
        assert m["ratio"] == pytest.approx(1.0, abs=1e-6) and m["value_clip_frac"] == 0.0
        for k, v in n.items():
            if k not in TIMING:
                assert m[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for k, v in kept[0]["policy"].items():
        torch.testing.assert_close(dealt[0]["policy"][k], v, atol=1e-6, rtol=1e-5)
