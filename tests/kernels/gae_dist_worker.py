"""torchrun worker for tests/kernels/test_gae.py: masked_whiten / masked_mean over a process group, and a rollout's
rewards, advantages and returns with the rewards whitened over the ranks (engine.ppo, what a DP run's ranks do).

Every rank builds the same global batch, keeps its own rows (different row counts per rank), and
checks the group result against the single-process float64 oracle on the whole batch. Run as:
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/kernels/gae_dist_worker.py
Exits non-zero (an AssertionError on some rank) when a check fails.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine import ppo
from engine.config import PPOConfig
from kernels import reference
from kernels.gae import masked_mean, masked_whiten
from tests.engine.ranks import leave


def _check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1234)
    rows = [3 + 2 * i for i in range(world)]
    n_steps = 37
    # A large mean next to a small spread: the case where sum_sq - n * mean^2 would cancel.
    x = torch.randn(sum(rows), n_steps, generator=gen, dtype=torch.float64) * 2.5 + 1000.0
    full_mask = torch.rand(sum(rows), n_steps, generator=gen) < 0.6
    empty_first = full_mask.clone()
    empty_first[: rows[0]] = False  # rank 0 contributes no masked element
    start = sum(rows[:rank])
    mine = slice(start, start + rows[rank])
    group = dist.group.WORLD

    for case, mask in (("random", full_mask), ("rank0-empty", empty_first)):
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
            xs = x.to(dtype)
            # Garbage outside the mask must not reach the statistics.
            local_x = torch.where(mask[mine], xs[mine], torch.nan)
            for shift_mean in (True, False):
                got = masked_whiten(local_x, mask[mine], shift_mean=shift_mean, group=group)
                want = reference.masked_whiten(xs.double(), mask, shift_mean=shift_mean)[mine]
                _check(f"{case} {dtype} shift_mean={shift_mean} rank {rank}", got, want, tol)
                assert torch.equal(got[~mask[mine]], torch.zeros_like(got[~mask[mine]])), "nonzero outside mask"
            mean = masked_mean(local_x, mask[mine], group=group)
            _check(f"{case} {dtype} masked_mean rank {rank}", mean, reference.masked_mean(xs.double(), mask), tol)
            # Every rank must hold bit-identical statistics.
            means = [torch.empty_like(mean) for _ in range(world)]
            dist.all_gather(means, mean)
            assert all(torch.equal(m, means[0]) for m in means), f"ranks disagree on the mean: {means}"
    # a rollout's targets with whitened rewards: this rank's rows, whitened with the group, equal the whole batch's
    cfg = PPOConfig(whiten_rewards=True)
    lp, ref, values = (torch.randn(sum(rows), n_steps, generator=gen) for _ in range(3))
    scores = torch.randn(sum(rows), generator=gen)
    mask = torch.arange(n_steps) < torch.randint(1, n_steps + 1, (sum(rows), 1), generator=gen)  # prefix masks
    whole = ppo.advantages_and_returns(lp, ref, values, mask, scores, cfg)
    got = ppo.advantages_and_returns(lp[mine], ref[mine], values[mine], mask[mine], scores[mine], cfg, group)
    local = ppo.advantages_and_returns(lp[mine], ref[mine], values[mine], mask[mine], scores[mine], cfg)
    for key in ("rewards", "kl", "advantages", "returns"):
        _check(f"whitened rewards: {key} rank {rank}", got[key], whole[key][mine], 1e-5)
    assert not torch.allclose(local["rewards"], whole["rewards"][mine]), "a rank's own statistics would pass too"
    print(f"rank {rank}: ok", flush=True)
    leave()


if __name__ == "__main__":
    main()
