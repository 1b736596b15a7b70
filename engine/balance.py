"""Each optimizer step's minibatch dealt out over the data-parallel ranks by tokens.

A DP rank samples its own sequences, and each optimizer step trains every rank on its share of the global minibatch.
Left where they were sampled, one rank's share may hold many more tokens than another's (PPO's responses run from a
few tokens to the length limit: at the recipe's 64 sequences a step over 2 ranks, ~3% more than the mean on the fuller
rank, over 4 ranks ~8%), and every rank waits for the fullest at the step's gradient reduction. With
RunConfig.balance_dp_tokens (on by default) the rollout's training data is all-gathered over the DP ranks once
(gather: the token ids and four per-token floats, six with --recompute-old-logprobs-per-minibatch, a few MB at the
recipe's shape), and each step deals the global minibatch's sequences out longest first, each to the rank with the
fewest tokens so far (a tie to the sequence's own rank, then the lowest): every rank computes the same deal from the
same data (share). The global minibatch, its whitening (over its tokens) and the losses (sums over every rank divided
by its token count) are those of the sequences where they were sampled; only which rank computes which sequence, and
so the order of the sums, differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.data import Rollout
from engine.kv_cache import upload
from engine.parallel import gather_dim

# the per-token tensors a step reads: the old log-probs, the values, and the rollout targets of these names; with
# --recompute-old-logprobs-per-minibatch also what engine.rollout.minibatch_targets makes a minibatch's targets of
FIELDS = ("logprobs", "values", "advantages", "returns")
MINIBATCH_FIELDS = ("ref_logprobs", "score_tokens")


@dataclass
class Gathered:
    """Every DP rank's rollout, as training reads it: [rank][sequence] token ids, and per field one flat tensor of
    every rank's response tokens, rank after rank (on the device)."""

    prompts: list[list[list[int]]]
    responses: list[list[list[int]]]
    starts: list[list[int]]  # [rank][sequence] its first response token's row in the flat tensors
    flat: dict[str, torch.Tensor]


def _field(ro: Rollout, name: str) -> torch.Tensor:
    return getattr(ro, name) if name in ("logprobs", "values", "ref_logprobs") else ro.targets[name]


def _gather_padded(t: torch.Tensor, counts: list[int], group) -> list[torch.Tensor]:
    """Each rank's 1-D t (counts[r] elements) gathered to every rank: one collective over max(counts) each."""
    most = max(counts)
    padded = torch.zeros(most, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = gather_dim(padded, 0, group)
    return [out[r * most : r * most + n] for r, n in enumerate(counts)]


def gather(ro: Rollout, group, device: torch.device) -> Gathered:
    """Every DP rank's rollout sequences and their per-token training data, on every rank (two host reads: the
    sizes, then the token ids)."""
    dp = dist.get_world_size(group)
    n = len(ro.responses)
    ids = [t for p, r in zip(ro.prompts, ro.responses) for t in (*p, *r)]
    lens = [len(p) for p in ro.prompts] + [len(r) for r in ro.responses]
    sizes = torch.tensor([n, len(ids), ro.offsets[-1]], dtype=torch.int64)
    every = gather_dim(upload(sizes, device), 0, group).view(dp, 3).tolist()
    ints = _gather_padded(upload(torch.tensor(lens + ids, dtype=torch.int64), device), [2 * m + k for m, k, _ in every],
                          group)  # fmt: skip
    prompts, responses, starts, base = [], [], [], 0
    for (m, _, _), got in zip(every, ints):
        got = got.tolist()
        pl, rl, at = got[:m], got[m : 2 * m], 2 * m
        ps, rs, st = [], [], []
        for a, b in zip(pl, rl):
            ps.append(got[at : at + a])
            rs.append(got[at + a : at + a + b])
            st.append(base)
            at, base = at + a + b, base + b
        prompts.append(ps)
        responses.append(rs)
        starts.append(st)
    rows = [r for _, _, r in every]
    fields = FIELDS + (MINIBATCH_FIELDS if "score_tokens" in ro.targets else ())
    flat = {f: torch.cat(_gather_padded(_field(ro, f).reshape(-1), rows, group)) for f in fields}
    return Gathered(prompts, responses, starts, flat)


def deal(lengths: dict[tuple[int, int], int], dp: int) -> dict[tuple[int, int], int]:
    """{(rank, sequence): its tokens} -> {(rank, sequence): the rank that trains it}: longest first, each to the rank
    with the fewest tokens so far (a tie to its own rank, then the lowest)."""
    load, to = [0] * dp, {}
    for key in sorted(lengths, key=lambda k: (-lengths[k], k)):
        to[key] = min(range(dp), key=lambda b: (load[b], b != key[0], b))
        load[to[key]] += lengths[key]
    return to


def share(g: Gathered, members: list[tuple[int, int]], rank: int, dp: int, device: torch.device) -> Rollout:
    """This rank's share of the global minibatch `members` ((rank, sequence) where each was sampled), dealt by
    tokens (deal), as a rollout of its own: its sequences in (rank, sequence) order and their per-token data."""
    lengths = {(r, i): len(g.prompts[r][i]) + len(g.responses[r][i]) for r, i in members}
    to = deal(lengths, dp)
    mine = sorted(k for k in members if to[k] == rank)
    prompts = [g.prompts[r][i] for r, i in mine]
    responses = [g.responses[r][i] for r, i in mine]
    offsets, rows = [0], []
    for (r, i), resp in zip(mine, responses):
        offsets.append(offsets[-1] + len(resp))
        rows.extend(range(g.starts[r][i], g.starts[r][i] + len(resp)))
    idx = upload(torch.tensor(rows, dtype=torch.int64), device)
    data = {f: t[idx] for f, t in g.flat.items()}
    return Rollout(  # (no EOS flags nor the generator's log-probs: training reads neither)
        prompts, responses, hit_eos=torch.zeros(0, dtype=torch.bool), gen_logprobs=torch.zeros(0), offsets=offsets,
        logprobs=data.pop("logprobs"), values=data.pop("values"), ref_logprobs=data.pop("ref_logprobs", None),
        targets=data,
    )  # fmt: skip
