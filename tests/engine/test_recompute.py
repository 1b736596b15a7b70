"""Activation checkpointing planned from memory (engine/recompute.py): the measured per-layer bytes, the plan,
and the trainer's setting."""

import dataclasses

import pytest
import torch

from engine import recompute, trainer
from engine.config import ModelConfig
from engine.model import Transformer
from engine.state import RunConfig


def _model(dtype=torch.float32):
    return Transformer(dataclasses.replace(ModelConfig.named("tiny"), num_layers=2), dtype=dtype).init_weights()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_bytes_are_linear_in_tokens_and_count_what_the_layer_keeps(dtype):
    m = _model(dtype)
    a, b = recompute.layer_activation_bytes(m, 64), recompute.layer_activation_bytes(m, 320)
    assert a == pytest.approx(b, rel=1e-2)  # the kernels keep no tokens x tokens scores
    cfg, elt = m.config, dtype.itemsize
    # at least: the two inputs, the normed inputs of both projections, q/k/v, the MLP's gate/up and its product
    floor = elt * (4 * cfg.hidden_size + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)
    floor += elt * 3 * cfg.intermediate_size
    assert floor < b < 3 * floor
    assert recompute.checkpoint_bytes(m) == 2 * cfg.hidden_size * elt


@pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated")  # (isinstance over gc's objects)
def test_the_probe_leaves_nothing_alive():
    """After the measurement no tensor outside the model's parameters shares a weight's storage and none of the
    probe's activations lives on: its saved tensors once formed a cycle through autograd that Python's gc cannot
    break, which kept the probed layer's q/k/v and output projections on the GPU after an idle model's weights were
    offloaded (the GPU test of --offload-idle-models, 2026-12-04)."""
    import gc

    m = _model(torch.bfloat16)
    params = {id(p) for p in m.parameters()}
    storages = {p.untyped_storage().data_ptr() for p in m.parameters()}
    recompute.layer_activation_bytes(m, 64)  # (once first: the caches a first call fills, the rotary tables, stay)
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    recompute.layer_activation_bytes(m, 64)
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in before | params]
    assert not [tuple(o.shape) for o in alive if o.untyped_storage().data_ptr() in storages]
    # (kernels.dispatch.derived keeps its last few cu_seqlens, integers, by design)
    assert not [tuple(o.shape) for o in alive if o.is_floating_point()]


def test_plan_recomputes_the_fewest_layers_that_fit():
    per_layer, ckpt, fixed, tokens, layers = 1000.0, 100.0, 50.0, 10, 8
    full = tokens * (layers * per_layer + per_layer + fixed)
    assert recompute.plan_recompute(layers, tokens, per_layer, ckpt, fixed, full) == 0
    assert recompute.plan_recompute(layers, tokens, per_layer, ckpt, fixed, full - 1) == 1
    assert recompute.plan_recompute(layers, tokens, per_layer, ckpt, fixed, full - 3 * 900 * tokens) == 3
    assert recompute.plan_recompute(layers, tokens, per_layer, ckpt, fixed, 0) == layers  # nothing fits: all


def test_trainer_setting():
    cpu = torch.device("cpu")
    setting = lambda ac: recompute.setting(ac, 2, cpu)
    assert (setting("on"), setting("off"), setting("auto"), setting("1")) == (True, False, False, 1)
    assert recompute.setting(RunConfig().activation_checkpointing, 2, torch.device("cuda")) is True  # until planned
    for bad in ("3", "-1", "some"):
        with pytest.raises(ValueError, match="a number of layers up to 2"):
            setting(bad)


def test_auto_plans_each_training_phase_from_the_budget(tmp_path, monkeypatch):
    from tests.engine.runs import tiny_state

    state = tiny_state(tmp_path)
    state.device = torch.device("cuda")  # the plan runs on GPUs only; its inputs are stubbed below
    layers = len(state.policy.layers)
    for budget, expected in ((0, layers), (2**40, 0)):
        monkeypatch.setattr(recompute, "training_budget", lambda opts, dev, b=budget, held=0: b)
        trainer.plan_recompute(state)
        assert state.policy.activation_checkpointing == state.value.activation_checkpointing == expected
        # the MLPs' activations recomputed where layers are, not where none is
        assert all(layer.mlp.recompute_act == (expected > 0) for layer in state.policy.layers + state.value.layers)
    assert set(state.layer_bytes) == {"policy", "value"}
    kept, kept_act = state.layer_bytes["policy"]  # the activation: intermediate_size values a token fewer
    elt = next(state.policy.parameters()).element_size()
    assert kept - kept_act == state.policy.config.intermediate_size * elt and kept_act > 0, (kept, kept_act)
    state.run.activation_checkpointing = "on"
    monkeypatch.setattr(recompute, "training_budget", lambda opts, dev, held=0: 0)
    trainer.plan_recompute(state)  # only auto is planned
    assert state.policy.activation_checkpointing == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_budget_leaves_room_for_every_grad_the_step_will_hold(monkeypatch, dtype):
    """Without the distributed optimizer every trained model's fp32 grads are held until the step's updates (an fp32
    parameter's in its .grad), and a backward holds a parameter's grad in the parameters' dtype before it folds it
    into those (one at a time; not for fp32 parameters, whose grads those are): the budget is the free memory less
    all of that (and the margin)."""
    from engine.config import PPOConfig
    from engine.optim import make_optimizer

    models = [_model(dtype), _model(dtype)]
    opts = [make_optimizer(m, PPOConfig()) for m in models]
    numel = sum(p.numel() for p in models[0].parameters())
    largest = max(p.numel() for p in models[0].parameters())
    free, total = 10 * 2**30, 16 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    held = 2 * 4 * numel + (0 if dtype == torch.float32 else largest * dtype.itemsize)
    assert recompute.training_budget(opts, torch.device("cuda"), margin=0.0) == free - held
    # the distributed optimizer (2 DP ranks): one model's flat fp32 grads at a time, both models' shards until the
    # updates, and a backward's grad in the parameters' dtype (an fp32 parameter's too: it joins the flat buffer)
    from engine.distributed import ProcessGrid

    opts = [make_optimizer(m, PPOConfig(), ProcessGrid(world_size=2, dp=2), distributed=True) for m in models]
    assert all(o.buckets is not None and len(o.masters) < len(o.params) for o in opts)
    flat = sum(4 * b.numel for b in opts[0].buckets)
    shards = sum(4 * m.numel() for o in opts for m in o.masters)
    held = flat + shards + largest * dtype.itemsize
    assert recompute.training_budget(opts, torch.device("cuda"), margin=0.0) == free - held


def test_the_fused_losss_lm_head_grad_is_set_aside(monkeypatch):
    """A bf16 LM head's fp32 gradient lives from the fused loss's forward through the backward, beside the
    micro-batch's activations: plan_models leaves it out of their budget (an fp32 head's is its own .grad), and only
    what the grad straight into the optimizer's sum still holds."""
    budgets = []
    monkeypatch.setattr(recompute, "training_budget", lambda opts, dev, held=0: budgets.append(held) or 10**12)
    monkeypatch.setattr(recompute, "agree", lambda values, op: values)
    for dtype in (torch.bfloat16, torch.float32):
        policy, value = _model(dtype), _model(dtype)
        value.head = "score"  # (the value model has no LM head)
        recompute.plan_models({"policy": policy}, [], 64, torch.device("cuda"), {"policy": (1, 1)})
        assert recompute.lm_head_grad_bytes({"policy": policy, "value": value}) == budgets[-1]
    bf16 = _model(torch.bfloat16)
    assert budgets == [4 * bf16.lm_head_weight.numel(), 0]
    # an optimizer's model: the grad goes straight into its fp32 sum (the optimizer's, counted with its grads), a
    # chunk's product in bf16 beside it where the device has no fp32-out GEMM (this CPU), nothing where it has
    from engine import grad_sums
    from engine.config import PPOConfig
    from engine.optim import make_optimizer

    opt = make_optimizer(bf16, PPOConfig())  # noqa: F841 (held: the parameters' getters reach it by weak reference)
    numel = bf16.lm_head_weight.numel()
    assert recompute.lm_head_grad_bytes({"policy": bf16}) == 2 * numel
    monkeypatch.setattr(recompute, "fp32_out_gemm", lambda device: True)
    assert recompute.lm_head_grad_bytes({"policy": bf16}) == 0
    monkeypatch.setattr(grad_sums, "ENABLED", False)
    assert recompute.lm_head_grad_bytes({"policy": bf16}) == 4 * numel


def test_a_recomputed_layer_keeps_this_ranks_share_of_its_input(monkeypatch):
    """Under sequence parallelism a checkpointed layer keeps its input (and the residual) for this rank's 1/tp of
    the tokens; without it, for every token."""
    from tests.engine.fake_tp import FakeGroup, fake_tp

    fake_tp(monkeypatch)
    cfg = ModelConfig.named("tiny")
    split = Transformer(cfg, group=FakeGroup(2, 0), dtype=torch.bfloat16)
    assert split.sequence_parallel
    assert recompute.checkpoint_bytes(split) == 2 * cfg.hidden_size * 2 / 2
    whole = Transformer(cfg, group=FakeGroup(2, 0), dtype=torch.bfloat16, sequence_parallel=False)
    assert recompute.checkpoint_bytes(whole) == 2 * cfg.hidden_size * 2


def test_every_layer_may_be_named_and_all_are_counted():
    """--activation-checkpointing N takes N up to the layer count; `on` recomputes (and the metric counts) them all."""
    assert recompute.setting("2", 2, torch.device("cpu")) == 2
    m = Transformer(dataclasses.replace(ModelConfig.named("tiny"), num_layers=3))
    m.activation_checkpointing = True
    assert recompute.layers_recomputed(m) == 3
    m.activation_checkpointing = 2
    assert recompute.layers_recomputed(m) == 2


def test_the_plan_counts_the_gathered_hidden_states_and_their_grad(monkeypatch):
    """Beside the layers, a micro-batch holds 4 x hidden values per token (the final hidden states and their grad):
    a budget of exactly what no recompute needs plans none, one byte less one layer."""
    m = Transformer(dataclasses.replace(ModelConfig.named("tiny"), num_layers=4), dtype=torch.bfloat16)
    tokens, per_layer, elt, h, n = 64, 5000.0, 2, m.config.hidden_size, 4
    need = tokens * (n * per_layer + per_layer + 4 * h * elt)
    monkeypatch.setattr(recompute, "agree", lambda values, op: values)
    for budget, want in ((need, 0), (need - 1, 1)):
        monkeypatch.setattr(recompute, "training_budget", lambda opts, dev, held=0, b=budget: b)
        recompute.plan_models({"policy": m}, [], tokens, torch.device("cuda"), {"policy": (per_layer, per_layer)})
        assert m.activation_checkpointing == want, (budget, m.activation_checkpointing)


def test_the_budget_counts_the_allocators_cached_blocks_and_a_margin_of_the_whole_device(monkeypatch):
    """The free memory includes what torch's allocator has reserved but not handed out (reusable by the micro-batch),
    and the margin is a fraction of the device's whole memory, not of what is free."""
    free, total, reserved, allocated = 3 * 2**30, 16 * 2**30, 5 * 2**30, 2 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)
    want = free + reserved - allocated - total // 4
    assert recompute.training_budget([], torch.device("cuda"), margin=0.25) == want


@pytest.mark.parametrize("distributed", [False, True])
def test_the_budget_counts_only_what_the_optimizer_has_yet_to_allocate(monkeypatch, distributed):
    """Adam moments not allocated yet are pending (two fp32 values per master element); grads the step already holds
    (an fp32 parameter's own .grad, a master's fp32 grad, a distributed optimizer's shard and flat bucket grad) are
    in use already and not counted again."""
    from engine.config import PPOConfig
    from engine.distributed import ProcessGrid
    from engine.optim import make_optimizer

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 16 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    budget = lambda opt: recompute.training_budget([opt], torch.device("cuda"), margin=0.0)
    model = _model(torch.float32)
    grid = ProcessGrid(world_size=2, dp=2) if distributed else None
    opt = make_optimizer(model, PPOConfig(), grid, distributed=distributed)
    assert (opt.buckets is not None) == distributed
    master_bytes = sum(4 * m.numel() for m in opt.masters)
    flat = sum(4 * b.numel for b in opt.buckets) if distributed else 0
    largest = max(p.numel() for p in opt.params) * 4 if distributed else 0  # (fp32 without buckets: its own grad)
    assert budget(opt) == 10 * 2**30 - master_bytes - flat - largest  # the grads to come
    if distributed:
        for b in opt.buckets:
            b.grad = torch.zeros(b.numel)
        opt.grads = [torch.zeros(m.shape) for m in opt.masters]
    else:
        for p in opt.params:
            p.grad = torch.zeros_like(p)
    assert budget(opt) == 10 * 2**30 - largest  # every grad held already
    opt.adam.state.clear()  # (moments not allocated yet)
    assert budget(opt) == 10 * 2**30 - largest - 2 * master_bytes


def test_every_rank_takes_the_largest_plan_of_any_rank(monkeypatch):
    """A rank whose budget fits every layer still recomputes as many as the rank that needs the most (the layers'
    collectives must match): a peer that plans 3 layers makes this rank recompute 3."""
    m = Transformer(dataclasses.replace(ModelConfig.named("tiny"), num_layers=4), dtype=torch.bfloat16)
    ops = {"max": max, "min": min}
    monkeypatch.setattr(recompute, "agree", lambda values, op: [ops[op](v, 3) for v in values])
    monkeypatch.setattr(recompute, "training_budget", lambda opts, dev, held=0: 2**40)
    recompute.plan_models({"policy": m}, [], 64, torch.device("cuda"), {"policy": (5000.0, 4000.0)})
    assert m.activation_checkpointing == 3 and m.layers[0].mlp.recompute_act


@pytest.mark.parametrize("into_sums", [False, True])
@pytest.mark.parametrize("reference", [False, True])
def test_the_mlps_recomputed_activation_gives_the_same_grads_to_the_bit(into_sums, reference):
    """A bf16 model whose MLPs keep their gate/up output and recompute the activation in the backward (one layer also
    recomputed whole) against the same model keeping both: every parameter's grad (to autograd, or into the
    optimizer's fp32 sums) and the input's bits alike, through the Triton kernels (interpreter) and the reference
    ops."""
    import contextlib

    from engine import grad_sums
    from engine.config import PPOConfig
    from engine.optim import grad_sum, make_optimizer
    from kernels import dispatch

    ids = torch.randint(1, 200, (19,), generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    pos = torch.cat([torch.arange(7), torch.arange(12)])
    got = []
    for on in (False, True):
        m = _model(torch.bfloat16)
        m.activation_checkpointing = 1
        recompute.mlp_recompute(m, on)
        opt = make_optimizer(m, PPOConfig()) if into_sums else None
        ctx = dispatch.reference_ops() if reference else contextlib.nullcontext()
        with ctx, grad_sums.into_sums():
            h = m.hidden_packed(ids, pos, cu)
            (h.float().square().mean() + h[3].float().sum()).backward()
        grads = [grad_sum(opt, i) for i in range(len(opt.params))] if into_sums else [p.grad for p in m.parameters()]
        names = [n for n, _ in m.named_parameters()]
        got.append({n: g for n, g in zip(names, grads) if n != "lm_head.weight"})  # (the loss reads no logits)
        assert all(g is not None and g.abs().sum() > 0 for g in got[-1].values())
    for name in got[0]:
        a, b = got[0][name], got[1][name]
        assert torch.equal(a, b), (name, (a.float() - b.float()).abs().max())


def test_the_mlps_recomputed_activation_is_not_kept():
    """With mlp_recompute a layer keeps intermediate_size values a token fewer (the activation), measured as the
    plan measures; activation_bytes leaves the models as it found them."""
    m = _model(torch.bfloat16)
    kept, kept_act = recompute.activation_bytes(m)
    assert kept - kept_act == m.config.intermediate_size * 2 and not m.layers[0].mlp.recompute_act
    recompute.mlp_recompute(m, True)
    assert recompute.activation_bytes(m) == (kept, kept_act) and m.layers[1].mlp.recompute_act
