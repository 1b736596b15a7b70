"""Prompt batches for PPO rollouts, and a rollout's sequences packed for the model.

PromptBatches: a seeded shuffle per epoch, fixed-size batches, DP sharding, resumable.

Each epoch over the PromptSet is a fresh permutation (seeded by (seed, epoch), the same on every
rank); it is cut into global batches of `batch_size` prompts, the last incomplete batch dropped so
every rollout has the same size. Data-parallel rank r takes the strided slice batch[r::dp]: with
minibatches cut contiguously from each rank's rollout, global minibatch k is then the same set of
prompts whatever the DP degree (rank r's local minibatch k holds global prompts k*m*dp + i*dp + r).

Rollout: one rank's sampled sequences with flat per-response-token tensors. pack() concatenates
prompt + response of some of them into the packed layout of Transformer.forward_packed (no padding is
ever computed) and says which hidden state predicts which response token.
"""

from __future__ import annotations

import array
import functools
import hashlib
from dataclasses import dataclass, field

import torch

from engine.errors import InvalidInput
from engine.kv_cache import upload
from engine.tokenizer import PromptSet


def global_position(local: int, rank: int, dp: int, samples: int) -> int:
    """Where data-parallel rank `rank`'s `local`-th rollout sequence (its prompt local // samples, that prompt's sample
    local % samples) stands in the rollout one process would hold: PromptBatches deals a batch's prompts out in turn
    (rank r gets positions r, r + dp, ...), each with its samples."""
    prompt, sample = divmod(local, samples)
    return (prompt * dp + rank) * samples + sample


def check_fills_a_rollout(prompts: int, batch_size: int) -> None:
    if prompts < batch_size:
        raise InvalidInput(f"{prompts} prompts cannot fill one rollout batch of {batch_size} (--rollout-batch-size)")


class PromptBatches:
    """Iterates rollout batches: lists of (prompt index, token ids) for this DP rank.

    state_dict() / load_state_dict() capture the position (epoch, batch within the epoch), so a resumed
    run continues with the very next batch.
    """

    def __init__(
        self,
        prompts: PromptSet | list[list[int]],
        batch_size: int,
        *,
        seed: int = 0,
        epochs: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        self.prompts = prompts.prompts if isinstance(prompts, PromptSet) else prompts
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % dp_size:
            raise ValueError(f"rollout batch size {batch_size} is not a multiple of the data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        check_fills_a_rollout(len(self.prompts), batch_size)
        self.batch_size, self.seed, self.epochs = batch_size, seed, epochs
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.batches_per_epoch = len(self.prompts) // batch_size
        self.epoch = 0
        self.batch = 0  # next batch within the epoch

    def __len__(self) -> int:
        """Rollout batches in the whole run (all epochs)."""
        return self.batches_per_epoch * self.epochs

    @property
    def batches_done(self) -> int:
        return self.epoch * self.batches_per_epoch + self.batch

    def epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=gen).tolist()

    def global_batch(self, epoch: int, batch: int) -> list[int]:
        """Prompt indices of one global rollout batch (every rank's)."""
        order = self.epoch_order(epoch)
        return order[batch * self.batch_size : (batch + 1) * self.batch_size]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[list[int], list[list[int]]]:
        """(prompt indices, prompt token ids) of this rank's share of the next rollout batch."""
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        if self.epoch >= self.epochs:
            raise StopIteration
        idx = self.global_batch(self.epoch, self.batch)[self.dp_rank :: self.dp_size]  # (dealt out: global_position)
        self.batch += 1
        return idx, [self.prompts[i] for i in idx]

    @functools.cached_property
    def digest(self) -> str:
        """prompts_digest of this set (its prompts do not change)."""
        return prompts_digest(self.prompts)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "num_prompts": len(self.prompts),
            "batch_size": self.batch_size,
            "prompts_digest": self.digest,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine, why in (
            ("seed", self.seed, "--seed: resume with the run's"),
            ("num_prompts", len(self.prompts), "another --prompts file, or other prompts dropped by --max-prompt-len "
             "or held out by --eval-holdout: resume with the run's"),
            ("batch_size", self.batch_size, "--rollout-batch-size: resume with the run's"),
        ):  # fmt: skip
            if state[key] != mine:
                raise InvalidInput(f"cannot resume the prompt order: saved {key} {state[key]}, now {mine} ({why})")
        if state.get("prompts_digest", self.digest) != self.digest:  # (older checkpoints have none)
            raise InvalidInput(
                "cannot resume: the prompts are other tokens than the checkpoint's run trained on (another --prompts "
                "file, tokenizer, --chat-template, --max-prompt-len or --eval-holdout); resume with the same ones"
            )
        self.epoch, self.batch = state["epoch"], state["batch"]


def prompts_digest(prompts: list[list[int]]) -> str:
    """A short hash of a prompt set's token ids, in order."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(array.array("q", [len(p), *p]).tobytes())
    return h.hexdigest()[:16]


@dataclass
class Rollout:
    """One rollout on this rank: sequences, and flat per-response-token tensors (sequence order)."""

    prompts: list[list[int]]
    responses: list[list[int]]
    hit_eos: torch.Tensor  # [B] bool
    gen_logprobs: torch.Tensor  # [N] the generator's log-probs of the sampled tokens
    offsets: list[int]  # sequence i's response tokens are flat rows offsets[i]:offsets[i + 1]
    logprobs: torch.Tensor | None = None  # [N] policy at rollout time (PPO's old log-probs)
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # [B] raw RM scores
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # rewards, kl, advantages, returns [N]


# ------------------------------------------------------------------- rollouts, packed --


def split_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Contiguous groups of indices whose lengths sum to at most `budget` (a longer one stands alone)."""
    groups: list[list[int]] = []
    size = budget + 1
    for i, n in enumerate(lengths):
        if size + n > budget:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def pack(ro: Rollout, seqs: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Prompt + response of sequences `seqs`, packed: ids, positions [N], cu_seqlens [S+1] int32;
    act [R]: packed row of the hidden state that predicts each response token; targets [R]: those
    tokens; rows [R]: their flat rollout rows; last [S]: each sequence's last token.
    """
    ids: list[int] = []
    positions: list[int] = []
    act: list[int] = []
    rows: list[int] = []
    cu = [0]
    for i in seqs:
        p, r = ro.prompts[i], ro.responses[i]
        off, n = cu[-1], len(p) + len(r)
        ids += p
        ids += r
        positions.extend(range(n))
        act.extend(range(off + len(p) - 1, off + n - 1))
        rows.extend(range(ro.offsets[i], ro.offsets[i + 1]))
        cu.append(off + n)
    t = lambda x, dt=torch.int64: upload(torch.tensor(x, dtype=dt), device)
    ids_t, act_t = t(ids), t(act)
    return {
        "ids": ids_t,
        "positions": t(positions),
        "cu_seqlens": t(cu, torch.int32),
        "act": act_t,
        "targets": ids_t[act_t + 1],
        "rows": t(rows),
        "last": t(cu[1:]) - 1,
    }


def to_padded(flat: torch.Tensor, offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat per-token values -> [B, T] right-padded, with the bool mask and the flat -> (row, col) index."""
    lens = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])])
    row = torch.repeat_interleave(torch.arange(len(lens)), lens)
    col = torch.arange(len(row)) - torch.tensor(offsets[:-1])[row]
    idx = (row.to(flat.device), col.to(flat.device))
    out = flat.new_zeros(len(lens), int(lens.max()))
    mask = torch.zeros(out.shape, dtype=torch.bool, device=flat.device)
    out[idx], mask[idx] = flat, True
    return out, mask, idx
