"""Run under torchrun (gloo, CPU, 4 processes = TP 2 x DP 2): the DP reduction launched during the step's last
backward (engine.dp_overlap.backward) against the one after it, and the distributed optimizer's parameter all-gather
left running after the update until dp_overlap.settle() against the one before the update returns.

python -m torch.distributed.run --nproc_per_node 4 tests/engine/overlap_worker.py

A bf16 model with sequence parallelism (norm grads summed over TP first), its first layer recomputed in the backward,
the PPO policy loss with the LM head's grad made in the forward and the projections' straight into their fp32 sums
(engine.grad_sums), three micro-batches a step of rank-dependent tokens (none on DP rank 1 in the third step: it
launches every reduction when it reduces, in the same order), units small enough to make several, with the plain
optimizer and with the distributed one: with the overlap every DP reduction is launched inside the last
backward, last unit first, and the parameters after three steps are those of the run without it, to the bit (the
reductions after the backward, none inside it); so are those of the run whose updates leave the parameters' all-gather
running (the parameters untouched until settle(), and a backward before it refused). A grad set by hand after its unit
was launched is refused by name.
"""

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from engine import dp_overlap, grad_sums, optim, ppo  # noqa: E402
from engine.config import ModelConfig, PPOConfig  # noqa: E402
from engine.distributed import init_process_grid  # noqa: E402
from engine.model import Transformer  # noqa: E402
from kernels import dispatch  # noqa: E402
from tests.engine.ranks import leave  # noqa: E402

# the DP group's collectives: (what, elements, during the last micro-batch's dp_overlap.backward call, inside autograd's
# backward itself)
LOG: list[tuple[str, int, bool, bool]] = []
IN_CALL = [False]


def _logged(name, fn, grid):
    def call(*args, group=None, **kwargs):
        if group is grid.dp_group:
            LOG.append((name, args[-1].numel(), IN_CALL[0], torch._C._current_graph_task_id() != -1))
        return fn(*args, group=group, **kwargs)

    return call


def micro_batch(model, grid, it, mb):
    gen = torch.Generator().manual_seed(100 * it + 10 * mb + grid.dp_rank)
    n = 9 + mb
    ids = torch.randint(1, model.config.vocab_size, (n,), generator=gen)
    cu = torch.tensor([0, 4, n], dtype=torch.int32)
    pos = torch.cat([torch.arange(4), torch.arange(n - 4)])
    h = model.hidden_packed(ids, pos, cu)[:-1]
    targets = ids[1:]
    old = -torch.rand(n - 1, generator=gen) * 6
    adv = torch.randn(n - 1, generator=gen)
    loss, _ = ppo.policy_loss(
        h, model.lm_head_weight, targets, old, adv, clip_eps=0.2, denom=40.0, group=model.group,
        real_vocab=model.real_vocab,
    )  # fmt: skip
    return loss


def run(grid, distributed: bool, overlap: bool, gather: bool = False):
    dp_overlap.OVERLAP_REDUCE = overlap
    cfg = ModelConfig.named("tiny")
    cfg = dataclasses.replace(cfg, num_layers=3)
    model = Transformer(cfg, "lm", group=grid.tp_group, dtype=torch.bfloat16).init_weights(seed=1)
    model.activation_checkpointing = 1
    assert model.sequence_parallel and model.tp_partial_grads()
    opt = optim.make_optimizer(model, PPOConfig(max_grad_norm=0.5), grid, distributed=distributed,
                               bucket_bytes=4 * 6000)  # fmt: skip
    norms = []
    for it in range(3):
        dp_overlap.settle(opt)  # (the last update's parameter all-gather, left running with `gather`)
        del LOG[:]
        # the third step: DP rank 1 has no micro-batch (it launches every reduction when it reduces, in the order
        # rank 0's backward launches them)
        n = 0 if it == 2 and grid.dp_rank == 1 else 3
        for mb in range(n):
            with grad_sums.into_sums():
                loss = micro_batch(model, grid, it, mb)
                IN_CALL[0] = True
                dp_overlap.backward(opt, grid, loss, last=mb == n - 1)
                IN_CALL[0] = False
            optim.accumulate_grads(opt)
        norms.append(optim.reduce_grads(opt, grid))
        before = [p.detach().clone() for p in model.parameters()]
        optim.apply_update(opt, norms[-1], 1e-2, PPOConfig(max_grad_norm=0.5), later=gather)
        # with the distributed optimizer and `gather`, the parameters' all-gather is left running (on the host its
        # copies wait for settle(): the parameters are still the old ones), and a backward before settle() is refused
        assert dp_overlap.pending_gathers(opt) == (gather and distributed)
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert changed != dp_overlap.pending_gathers(opt)
        if dp_overlap.pending_gathers(opt):
            try:
                dp_overlap.backward(opt, grid, model.norm.weight.float().sum())
                raise AssertionError("a backward ran on parameters still being gathered")
            except RuntimeError as e:
                assert "still being gathered" in str(e), e
            assert model.norm.weight.grad is None
        units = [sum(opt.params[i].numel() for i in u.params) for u in opt.units]
        if distributed:
            units = [b.numel for b in opt.buckets]
        assert len(units) > 3, units
        reductions = [r[1:] for r in LOG if r[1] > 2]  # (not the grad norm's two numbers)
        assert [n for n, _, _ in reductions] == units[::-1], (reductions, units)
        early = overlap and n > 0
        assert all(during == early for _, during, _ in reductions), reductions
        # all inside autograd's backward, but for the distributed optimizer's last bucket: the LM head alone, its grad
        # made in the forward (into its sum), so nothing in the backward leads to it: launched just before
        inside = [inside for _, _, inside in reductions]
        alone = distributed and opt.units[-1].params == [len(opt.params) - 1]
        assert inside == ([not alone] + [True] * (len(units) - 1) if early else [False] * len(units)), reductions
    dp_overlap.settle(opt)
    return [p.detach().clone() for p in model.parameters()], norms, opt, model


def main() -> None:
    grid = init_process_grid(tp=2)
    assert grid.dp == 2 and grid.tp == 2
    dp_overlap.BUCKET_BYTES = 4 * 6000  # the plain optimizer's units too
    dist.all_reduce = _logged("all_reduce", dist.all_reduce, grid)
    dp_overlap.reduce_scatter_single = _logged("reduce_scatter", dp_overlap.reduce_scatter_single, grid)
    with dispatch.reference_ops():
        for distributed in (False, True):
            after, norms, _, _ = run(grid, distributed, overlap=False)
            for gather in (False, True):
                overlapped, norms2, opt, model = run(grid, distributed, overlap=True, gather=gather)
                for a, b in zip(after, overlapped, strict=True):
                    assert torch.equal(a, b), (distributed, gather, (a.float() - b.float()).abs().max())
                assert torch.equal(torch.stack(norms), torch.stack(norms2)), (norms, norms2)
        # a grad reaching a parameter whose unit was launched is refused by name
        with grad_sums.into_sums():
            loss = micro_batch(model, grid, 5, 0)
            dp_overlap.backward(opt, grid, loss, last=True)
        model.norm.weight.grad = torch.ones_like(model.norm.weight)
        try:
            optim.accumulate_grads(opt)
            raise AssertionError("a late grad was summed")
        except RuntimeError as e:
            assert "arrived after its DP reduction was launched" in str(e), e
        model.norm.weight.grad = None
        optim.reduce_grads(opt, grid)  # (the launched reductions waited for: none left in flight at the exit)
    print(f"rank {grid.rank} ok")
    leave()


if __name__ == "__main__":
    main()
