"""Prompt batches for PPO rollouts: a seeded shuffle per epoch, fixed-size batches, DP sharding, resumable.

Each epoch over the PromptSet is a fresh permutation (seeded by (seed, epoch), the same on every
rank); it is cut into global batches of `batch_size` prompts, the last incomplete batch dropped so
every rollout has the same size. Data-parallel rank r takes the strided slice batch[r::dp]: with
minibatches cut contiguously from each rank's rollout, global minibatch k is then the same set of
prompts whatever the DP degree (rank r's local minibatch k holds global prompts k*m*dp + i*dp + r).
"""

from __future__ import annotations

import torch

from engine.tokenizer import PromptSet


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
        if len(self.prompts) < batch_size:
            raise ValueError(f"{len(self.prompts)} prompts cannot fill one rollout batch of {batch_size}")
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
        idx = self.global_batch(self.epoch, self.batch)[self.dp_rank :: self.dp_size]
        self.batch += 1
        return idx, [self.prompts[i] for i in idx]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "num_prompts": len(self.prompts),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("num_prompts", len(self.prompts)), ("batch_size", self.batch_size)):
            if state[key] != mine:
                raise ValueError(f"cannot resume the prompt order: saved {key} {state[key]}, now {mine}")
        self.epoch, self.batch = state["epoch"], state["batch"]
