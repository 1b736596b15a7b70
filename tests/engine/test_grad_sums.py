"""engine/grad_sums.py: inside into_sums the linear layers' weight grads are made straight into the optimizer's fp32
sums (the LM head's through kernels/ppo_loss.py: tests/kernels/test_logprob.py), with the very sums the optimizer's
hook would have made from bf16 grads."""

import dataclasses

import pytest
import torch

from engine import grad_sums, optim
from engine.config import ModelConfig, PPOConfig
from engine.distributed import ProcessGrid
from engine.model import Transformer
from engine.parallel import ColumnParallelLinear, RowParallelLinear
from kernels import dispatch


def _pair(dp: int, checkpointing: bool):
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=2)
    grid = ProcessGrid(rank=0, world_size=dp, tp=1, dp=dp)
    models, opts = [], []
    for _ in range(2):
        m = Transformer(small, "score", dtype=torch.bfloat16).init_weights(seed=4)
        m.activation_checkpointing = checkpointing
        models.append(m)
        opts.append(optim.make_optimizer(m, PPOConfig(), grid, distributed=True, bucket_bytes=4 * 5000))
    return small, models, opts


def _backward(model, ids):
    pos, cu = torch.arange(ids.numel()), torch.tensor([0, ids.numel()], dtype=torch.int32)
    model.head_packed(model.hidden_packed(ids, pos, cu)).float().square().sum().backward()


@pytest.mark.parametrize("dp,checkpointing", [(1, False), (2, False), (1, True)])
def test_linear_weight_grads_go_straight_into_their_fp32_sums(monkeypatch, dp, checkpointing):
    """Two micro-batches' backwards inside into_sums leave every parameter's fp32 sum (a master grad, or with the
    distributed optimizer a piece of a bucket's flat grad) as the optimizer's hooks leave it outside, from bf16 grads
    (on the CPU the same half product, added one kernel later: the same bits); the projections' weights never get a
    bf16 grad to fold (the hook runs only for the norms, the embedding and the score head), and with activation
    checkpointing the recomputed layers make the same choice."""
    small, (fused, plain), (o_fused, o_plain) = _pair(dp, checkpointing)
    folded = []
    real_fold = optim._fold

    def fold(opt, i):  # (autograd runs the hook of a weight whose grad the backward left None, too)
        if opt.params[i].grad is not None:
            folded.append((opt is o_fused, i))
        real_fold(opt, i)

    monkeypatch.setattr(optim, "_fold", fold)
    ids = [torch.randint(0, small.vocab_size, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 6)]
    with dispatch.reference_ops():
        for x in ids:
            with grad_sums.into_sums():
                _backward(fused, x)
            _backward(plain, x)
    projections = {
        id(m.weight) for m in fused.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
    }  # fmt: skip
    assert len(projections) == 4 * small.num_layers
    fused_folds = {i for is_fused, i in folded if is_fused}
    assert fused_folds and not any(id(o_fused.params[i]) in projections for i in fused_folds)
    assert all(p.grad is None for p in fused.parameters())
    for i in range(len(o_fused.params)):
        a, b = optim.grad_sum(o_fused, i), optim.grad_sum(o_plain, i)
        assert a.dtype == torch.float32 and torch.equal(a, b), (i, (a - b).abs().max())
        assert a.abs().sum() > 0, i


def test_no_sum_outside_into_sums_without_autograd_or_optimizer():
    """target(weight) is None outside into_sums, under no_grad, for a parameter no optimizer holds and for an fp32
    parameter (its own master: autograd sums its grad in place)."""
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    m16 = Transformer(small, "score", dtype=torch.bfloat16).init_weights(seed=0)
    m32 = Transformer(small, "score", dtype=torch.float32).init_weights(seed=0)
    w16, w32 = m16.layers[0].mlp.down_proj.weight, m32.layers[0].mlp.down_proj.weight
    with grad_sums.into_sums():
        assert grad_sums.target(w16) is None  # (no optimizer yet)
    opt = optim.make_optimizer(m16, PPOConfig())
    optim.make_optimizer(m32, PPOConfig())
    assert grad_sums.target(w16) is None
    with grad_sums.into_sums():
        acc = grad_sums.target(w16)
        assert acc is not None and acc.dtype == torch.float32 and acc.shape == w16.shape
        assert acc is optim.grad_sum(opt, [id(p) for p in opt.params].index(id(w16))) and not acc.any()
        assert grad_sums.target(w32) is None
        with torch.no_grad():
            assert grad_sums.target(w16) is None
    del opt
    with grad_sums.into_sums():
        assert grad_sums.target(w16) is None  # (the optimizer gone)


def test_a_trained_step_is_the_same_with_and_without_the_sums(tmp_path, monkeypatch):
    """A tiny bf16 PPO run's weights after two iterations (several micro-batches a step) are the same bits whether the
    trainer's micro-batches make the weight grads straight into their sums or through the hooks (the CPU's product is
    the same half one); a sum overwritten by a micro-batch instead of added to fails it."""
    from tests.engine.runs import run_tiny, saved_weights

    flags = (
        "--dtype",
        "bfloat16",
        "--max-iterations",
        "2",
        "--save-every",
        "2",
        "--learning-rate",
        "1e-3",
        "--micro-batch-tokens",
        "40",
    )  # (several micro-batches a step: their grads summed)
    run_tiny(tmp_path / "fused", *flags)

    class Off:  # into_sums doing nothing: every grad through the hooks
        def __enter__(self):
            return None

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(grad_sums, "into_sums", Off)
    run_tiny(tmp_path / "plain", *flags)
    for name in ("policy", "value"):
        a = saved_weights(tmp_path / "fused" / "checkpoint-000002" / name, "lm" if name == "policy" else "score")
        b = saved_weights(tmp_path / "plain" / "checkpoint-000002" / name, "lm" if name == "policy" else "score")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
