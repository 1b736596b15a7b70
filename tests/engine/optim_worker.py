"""Run under torchrun (gloo, CPU, 2 processes = DP 2): the distributed optimizer (ZeRO-1) against the plain one.

python -m torch.distributed.run --nproc_per_node 2 tests/engine/optim_worker.py

bf16 parameters, buckets small enough that parameters straddle buckets and shard boundaries, a rank-dependent
grad in two micro-batches per step, clipping active: after three steps both optimizers hold the same parameters
(to the last bf16 bit but for a few roundings) and report the same grad norms; a checkpointed state loads back
into a fresh optimizer that then steps the same. A host-resident ZeRO optimizer (its state in host memory, updated in
chunks that cross the buckets) steps exactly as the device one, and loads the same checkpoint.
"""

import copy
import dataclasses
import io
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from engine import offload, optim  # noqa: E402
from engine.config import ModelConfig, PPOConfig  # noqa: E402
from engine.distributed import init_process_grid  # noqa: E402
from engine.model import Transformer  # noqa: E402
from engine.reshard import SavedOptimizer  # noqa: E402
from tests.engine.ranks import leave  # noqa: E402


def model():
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=2)
    return Transformer(small, "lm", dtype=torch.bfloat16).init_weights(seed=1)


def step(opt, models, cfg, grid, it):
    for micro in range(2):
        for p in models.parameters():
            gen = torch.Generator().manual_seed(1000 * it + 10 * micro + grid.dp_rank)
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        optim.accumulate_grads(opt)
    return optim.optimizer_step(opt, 1e-2, cfg, grid)


def main() -> None:
    grid = init_process_grid(tp=1)
    assert grid.dp == 2
    cfg = PPOConfig(max_grad_norm=0.5)
    plain_m, zero_m = model(), model()
    plain = optim.make_optimizer(plain_m, cfg, grid)
    zero = optim.make_optimizer(zero_m, cfg, grid, distributed=True, bucket_bytes=4 * 5000)
    assert zero.buckets is not None and len(zero.buckets) > 3 and plain.buckets is None
    numel = sum(p.numel() for p in zero_m.parameters())
    assert numel // 2 <= sum(m.numel() for m in zero.masters) <= numel // 2 + len(zero.buckets)  # half each
    offload.CHUNK_ELEMENTS = 6000  # a few buckets' shards per chunk
    res_m = model()
    res = optim.make_optimizer(res_m, cfg, grid, distributed=True, bucket_bytes=4 * 5000, host_resident=True)
    assert 1 < len(offload.chunks(res)) < len(res.buckets)
    for it in range(3):
        n_plain, n_zero = step(plain, plain_m, cfg, grid, it), step(zero, zero_m, cfg, grid, it)
        torch.testing.assert_close(n_zero, n_plain, rtol=1e-6, atol=0)
        assert n_plain > cfg.max_grad_norm  # clipping is on
        assert torch.equal(step(res, res_m, cfg, grid, it), n_zero)
        assert all(torch.equal(a, b) for a, b in zip(zero_m.parameters(), res_m.parameters()))
        assert res.offload.on_host == set(range(len(res.masters)))
    # the same fp32 updates up to the clip factor's last bit (the norm summed in another order): the bf16
    # parameters equal but for a few elements rounded the other way, by one bf16 step (or ~0 near 0)
    differ = 0
    for (name, a), b in zip(plain_m.named_parameters(), zero_m.parameters()):
        d = (b.float() - a.float()).abs()
        assert (d <= torch.finfo(torch.bfloat16).eps * a.float().abs() + 1e-6).all(), name  # Adam moves ~lr=1e-2
        differ += int((d > 0).sum())
    assert differ <= numel // 1000, differ
    buf = io.BytesIO()
    torch.save(optim.optimizer_state(zero), buf)  # as a checkpoint does (the state dict holds live tensors)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    again_m = model()
    again = optim.make_optimizer(again_m, cfg, grid, distributed=True, bucket_bytes=4 * 5000)
    optim.load_optimizer_state(again, saved)
    for a, b in zip(zero_m.parameters(), again_m.parameters()):
        assert torch.equal(a, b)  # the parameters written back from the loaded masters
    res_again_m = model()
    res_again = optim.make_optimizer(
        res_again_m, cfg, grid, distributed=True, bucket_bytes=4 * 5000, host_resident=True
    )
    optim.load_optimizer_state(res_again, copy.deepcopy(saved))  # (torch would share the tensors with `again`)
    step(zero, zero_m, cfg, grid, 3)
    step(again, again_m, cfg, grid, 3)
    step(res_again, res_again_m, cfg, grid, 3)
    for a, b, c in zip(zero_m.parameters(), again_m.parameters(), res_again_m.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    try:
        optim.load_optimizer_state(plain, saved)  # this rank's shard alone cannot make the whole state
        raise AssertionError("one rank's shard loaded into an unsharded optimizer")
    except ValueError as e:
        assert "re-sharding needs every rank's" in str(e)
    # every rank's shards into an unsharded optimizer (a resume with --no-distributed-optimizer or another DP size)
    states = [None] * grid.dp
    dist.all_gather_object(states, optim.optimizer_state(zero))
    unsharded_m = model()
    unsharded = optim.make_optimizer(unsharded_m, cfg, grid)
    optim.load_optimizer_state(unsharded, SavedOptimizer(states, tp=1, dp=grid.dp))
    for a, b in zip(zero_m.parameters(), unsharded_m.parameters()):
        assert torch.equal(a, b)
    whole = [unsharded.adam.state[u]["exp_avg_sq"] for u in unsharded.masters]
    for k, m in enumerate(zero.masters):  # the moments, sharded back, are zero's own
        assert torch.equal(optim._flat_shard(whole, zero.buckets[k], 2), zero.adam.state[m]["exp_avg_sq"])
    step(zero, zero_m, cfg, grid, 4)
    step(unsharded, unsharded_m, cfg, grid, 4)
    for a, b in zip(zero_m.parameters(), unsharded_m.parameters()):  # the same update, as plain and zero above
        d = (b.float() - a.float()).abs()
        assert (d <= torch.finfo(torch.bfloat16).eps * a.float().abs() + 1e-6).all()
    print("optim worker ok")
    leave()


if __name__ == "__main__":
    main()
