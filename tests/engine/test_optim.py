"""The optimizer: fp32 masters written back into bf16 parameters, Adam as torch's AdamW, the DP-sharded
optimizer, its state in host memory (offloaded for rollouts or resident and updated in chunks), idle models'
weights offloaded, and the offload decisions."""

import collections
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from engine import offload, optim, trainer
from engine.config import ModelConfig, PPOConfig
from engine.distributed import ProcessGrid
from engine.model import Transformer
from engine.reshard import SavedOptimizer
from engine.resume import latest_checkpoint
from engine.rollout import idle_models
from kernels import dispatch
from tests.engine.runs import ROOT, no_timing, run_tiny, saved_weights, tiny_state


def test_bf16_parameters_keep_fp32_masters_and_are_updated_in_place(tmp_path):
    state = tiny_state(tmp_path, "--dtype", "bfloat16", "--max-iterations", "1", "--learning-rate", "1e-3")
    params = list(state.policy.parameters())
    ptrs = [p.data_ptr() for p in params]
    before = [p.detach().clone() for p in params]
    assert state.generator.model is state.policy
    assert all(m.dtype == torch.float32 and m is not p for m, p in zip(state.policy_opt.masters, params))
    with dispatch.reference_ops():
        trainer.train(state)
    assert [p.data_ptr() for p in state.policy.parameters()] == ptrs  # the very same tensors
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    for m, p in zip(state.policy_opt.masters, params):
        assert torch.equal(m.to(torch.bfloat16), p)


def test_mixed_optimizer_step_matches_fp32_adam():
    """bf16 parameters with fp32 masters step as fp32 Adam on the same values, each step's grads the fp32 sum of two
    micro-batches' bf16 grads (accumulate_grads adds each into the master grads)."""
    cfg = PPOConfig(max_grad_norm=0.5)
    grid = ProcessGrid()
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    m32 = Transformer(small, "score", dtype=torch.float32).init_weights(seed=1)
    m16 = Transformer(small, "score", dtype=torch.bfloat16)
    with torch.no_grad():
        for a, b in zip(m32.parameters(), m16.parameters()):
            a.copy_(a.to(torch.bfloat16))  # start both from bf16-exact values
            b.copy_(a)
    o32, o16 = optim.make_optimizer(m32, cfg), optim.make_optimizer(m16, cfg)
    for _ in range(3):
        grads = [[torch.randn(a.shape).to(torch.bfloat16) for a in m32.parameters()] for _ in range(2)]
        for a, g1, g2 in zip(m32.parameters(), *grads):
            a.grad = g1.float() + g2.float()
        for micro in grads:
            for b, g in zip(m16.parameters(), micro):
                b.grad = g.clone()
            optim.accumulate_grads(o16)
        n32 = optim.optimizer_step(o32, 1e-2, cfg, grid)
        n16 = optim.optimizer_step(o16, 1e-2, cfg, grid)
        assert torch.equal(n32, n16)
    for a, m, b in zip(m32.parameters(), o16.masters, m16.parameters()):
        assert torch.equal(a, m) and torch.equal(m.to(torch.bfloat16), b)


def test_a_backward_folds_each_grad_into_its_fp32_sum_as_autograd_finishes_it():
    """A bf16 model's grads never stand whole in bf16 during a backward: when autograd reaches the embedding (the
    last grad it makes) the layers' and the head's grads are already in their fp32 sums, the bf16 ones freed. Two
    micro-batches' backwards sum as accumulate_grads summed the grads autograd left (the same fp32 adds); the
    optimizer built last for a model takes its grads, and the fp32 parameters keep their grads in place."""
    cfg, grid = PPOConfig(), ProcessGrid()
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=2)
    model = Transformer(small, "score", dtype=torch.bfloat16).init_weights(seed=3)
    optim.make_optimizer(model, cfg)  # (an earlier optimizer of the same model: the later one gets the grads)
    opt = optim.make_optimizer(model, cfg)
    params = list(model.parameters())
    emb = model.embed_tokens.weight
    seen = []
    emb.register_hook(lambda g: seen.append([p.grad is None and opt.grads[i] is not None
                                             for i, p in enumerate(params) if p is not emb]))  # fmt: skip
    ids = [torch.randint(0, small.vocab_size, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 5)]
    want = [torch.zeros(p.shape) for p in params]
    ref = Transformer(small, "score", dtype=torch.bfloat16)
    ref.load_state_dict(model.state_dict())
    with dispatch.reference_ops():
        for x in ids:
            pos, cu = torch.arange(x.numel()), torch.tensor([0, x.numel()], dtype=torch.int32)
            model.head_packed(model.hidden_packed(x, pos, cu)).float().square().sum().backward()
            ref.head_packed(ref.hidden_packed(x, pos, cu)).float().square().sum().backward()
            for w, p in zip(want, ref.parameters()):
                w.add_(p.grad)  # (what accumulate_grads did after each backward)
                p.grad = None
    assert len(seen) == 2 and all(all(s) for s in seen), seen
    optim.accumulate_grads(opt)  # (the embedding's, finished after its grad hook ran)
    assert all(p.grad is None for p in params)
    for i, w in enumerate(want):
        assert torch.equal(opt.grads[i], w), i
    m32 = Transformer(small, "score", dtype=torch.float32)
    o32 = optim.make_optimizer(m32, cfg)
    with dispatch.reference_ops():
        x = ids[0]
        m32.head_packed(
            m32.hidden_packed(x, torch.arange(x.numel()), torch.tensor([0, x.numel()]).int())
        ).sum().backward()
    assert all(p.grad is not None for p in m32.parameters()) and all(g is None for g in o32.grads)
    optim.reduce_grads(o32, grid)
    assert all(g is not None for g in o32.grads)
    for p in params:  # (grads a caller set by hand, not accumulated: reduce_grads takes them)
        p.grad = torch.ones_like(p)
    optim.reduce_grads(opt, grid)
    assert all(p.grad is None for p in params)
    for i, w in enumerate(want):
        assert torch.equal(opt.grads[i], w + 1), i


def test_distributed_optimizer_matches_plain_adam():
    """DP=2 (torchrun, gloo): the optimizer sharded over the ranks in small buckets against the unsharded one, and
    its checkpointed state reloaded (tests/engine/optim_worker.py asserts)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.join(ROOT, "tests/engine/optim_worker.py")]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.count("optim worker ok") == 2, r.stdout[-3000:] + r.stderr[-3000:]


def test_the_dp_reduction_runs_during_the_last_backward_to_the_same_bits():
    """TP 2 x DP 2 (torchrun, gloo): with the plain and the distributed optimizer, each unit's DP reduction launched
    inside the step's last backward, last unit first, leaves the parameters and grad norms of the reduction after
    it to the bit, and so does the parameters' all-gather left running after each update until settle() (the
    parameters untouched before it, a backward before it refused); a grad arriving after its unit was launched is
    refused (tests/engine/overlap_worker.py asserts)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # (the worker runs the reference ops)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone",
           os.path.join(ROOT, "tests/engine/overlap_worker.py")]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.count(" ok") == 4, r.stdout[-3000:] + r.stderr[-3000:]


def test_optimizer_steps_as_torch_adamw_from_the_first_step():
    """Our optimizer allocates Adam's moments at construction (a step at lr 0): the parameters stay as they were,
    and its steps equal a fresh torch.optim.AdamW's bit for bit (the step count starts from 0 again)."""
    cfg = PPOConfig(max_grad_norm=0.0, weight_decay=0.1)
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    ours = Transformer(small, "score", dtype=torch.float32).init_weights(seed=3)
    plain = Transformer(small, "score", dtype=torch.float32).init_weights(seed=3)
    opt = optim.make_optimizer(ours, cfg)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), plain.parameters()))
    assert all(st["exp_avg"].shape == p.shape for p, st in opt.adam.state.items())  # allocated already
    ref = torch.optim.AdamW(plain.parameters(), lr=1e-2, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)  # fmt: skip
    for step in range(3):
        for a, b in zip(ours.parameters(), plain.parameters()):
            g = torch.randn(a.shape, generator=torch.Generator().manual_seed(step))
            a.grad, b.grad = g.clone(), g.clone()
        optim.optimizer_step(opt, 1e-2, cfg, ProcessGrid())
        ref.step()
        for a, b in zip(ours.parameters(), plain.parameters()):
            assert torch.equal(a, b)


def test_a_loaded_optimizer_keeps_this_runs_hyperparameters():
    """Loading a saved optimizer (the same layout, or re-laid for another) takes its moments and step counts and keeps
    this run's betas, eps and weight decay (a resume may change them, and says so): the next step is the one a fresh
    AdamW with those hyperparameters and the saved moments takes."""
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    model = lambda: Transformer(small, "score", dtype=torch.float32).init_weights(seed=3)  # noqa: E731
    saved = optim.make_optimizer(model(), PPOConfig(max_grad_norm=0.0))
    for p in saved.params:
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    optim.optimizer_step(saved, 1e-2, PPOConfig(max_grad_norm=0.0), ProcessGrid())
    state = optim.optimizer_state(saved)
    new = PPOConfig(max_grad_norm=0.0, weight_decay=0.1, adam_betas=(0.5, 0.9), adam_eps=1e-6)
    for how in (state, SavedOptimizer([state], 1, 1)):
        opt = optim.make_optimizer(model(), new)
        optim.load_optimizer_state(opt, how)
        g = opt.adam.param_groups[0]
        assert (g["weight_decay"], tuple(g["betas"]), g["eps"]) == (0.1, (0.5, 0.9), 1e-6), type(how)
        assert all(torch.equal(opt.adam.state[m]["exp_avg"], saved.adam.state[n]["exp_avg"])
                   for m, n in zip(opt.masters, saved.masters))  # fmt: skip


def test_an_optimizers_state_copied_for_a_background_save_shares_nothing_with_the_live_one():
    """optimizer_state(copy=True), what a checkpoint written while the run goes on holds: the same values as the state
    itself, every tensor its own (on the CPU, where .cpu() returns the live tensor: a bf16 model's fp32 masters and
    the Adam moments), so that the next update cannot reach the files."""
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    opt = optim.make_optimizer(Transformer(small, "score", dtype=torch.bfloat16).init_weights(seed=3), PPOConfig())
    for p in opt.params:
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p.dtype)
    optim.accumulate_grads(opt)
    optim.optimizer_step(opt, 1e-2, PPOConfig(), ProcessGrid())
    live, copied = optim.optimizer_state(opt), optim.optimizer_state(opt, copy=True)
    tensors = lambda sd: [*sd["masters"], *(t for st in sd["adam"]["state"].values() for t in st.values())]  # noqa: E731
    assert len(tensors(live)) == len(tensors(copied)) > len(opt.params)
    assert all(torch.equal(a, b) for a, b in zip(tensors(live), tensors(copied)))
    ptrs = {t.untyped_storage().data_ptr() for t in tensors(live)}
    assert {m.untyped_storage().data_ptr() for m in opt.masters} <= ptrs  # (without copy: the masters themselves)
    assert not ptrs & {t.untyped_storage().data_ptr() for t in tensors(copied)}
    assert copied["adam"]["param_groups"] is not opt.adam.state_dict()["param_groups"]


@pytest.mark.parametrize("saved_dtype,dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("relaid", [False, True])
def test_an_optimizer_saved_at_another_dtype_loads(saved_dtype, dtype, relaid):
    """A checkpoint of a bf16 run resumed in fp32 (--dtype auto on a machine without a GPU) or the other way round, in
    the same layout or re-laid: the parameters start from the checkpoint's fp32 masters where it kept them (a bf16
    run's), else from the weights as loaded (an fp32 run's parameters were their own masters); the moments and step
    counts are the checkpoint's."""
    cfg, small = PPOConfig(max_grad_norm=0.0), dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    model = Transformer(small, "score", dtype=saved_dtype).init_weights(seed=3)
    saved = optim.make_optimizer(model, cfg)
    for step in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(p.dtype)
        optim.accumulate_grads(saved)
        optim.optimizer_step(saved, 1e-2, cfg, ProcessGrid())
    state = optim.optimizer_state(saved)
    resumed = Transformer(small, "score", dtype=dtype)
    with torch.no_grad():  # the checkpoint's weights, loaded at this run's dtype
        for a, b in zip(resumed.parameters(), model.parameters()):
            a.copy_(b)
    opt = optim.make_optimizer(resumed, cfg)
    optim.load_optimizer_state(opt, SavedOptimizer([state], 1, 1) if relaid else state)
    for m, p, n in zip(opt.masters, resumed.parameters(), saved.masters):
        want = n if saved_dtype != torch.float32 else n.to(dtype).float()  # (an fp32 run's: the weights as loaded)
        assert torch.equal(m, want) and torch.equal(p, want.to(dtype))
        assert torch.equal(opt.adam.state[m]["exp_avg"], saved.adam.state[n]["exp_avg"])
        assert float(opt.adam.state[m]["step"]) == 2


def _host_buffers(opt):
    """The pinned buffers of an optimizer's offloaded state, in movable_state's order."""
    return [h for k, _ in offload.groups(opt) for h in opt.offload.host[k]]


def _in_host_buffers(opt) -> bool:
    """Every tensor of the optimizer's state uses its host buffer."""
    return [t.data_ptr() for t in offload.movable_state(opt)] == [h.data_ptr() for h in _host_buffers(opt)]


@pytest.mark.parametrize("dtype,dp", [(torch.bfloat16, 1), (torch.float32, 1), (torch.bfloat16, 2)])
def test_optimizer_state_goes_to_host_memory_and_back(dtype, dp):
    """offload_state moves the masters (not the fp32 parameters, which are their own masters and which the generator
    reads) and Adam's moments into host buffers kept for the run, each tensor keeping its identity (Adam's state
    and the masters' list stay valid); onload_state brings back the same values into fresh device storage. With
    DP 2 the distributed optimizer's flat shards move (built in one process: no collective runs here)."""
    cfg, small = PPOConfig(), dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    model = Transformer(small, "score", dtype=dtype).init_weights(seed=1)
    grid = ProcessGrid(rank=0, world_size=dp, tp=1, dp=dp)
    opt = optim.make_optimizer(model, cfg, grid, distributed=True, bucket_bytes=4 * 3001)
    assert (opt.buckets is not None) == (dp > 1)
    tensors = offload.movable_state(opt)
    n_masters = len(opt.buckets) if dp > 1 else len(opt.params) if dtype != torch.float32 else 0
    assert len(tensors) == n_masters + 2 * len(opt.masters)  # (masters,) exp_avg, exp_avg_sq
    gen = torch.Generator().manual_seed(0)
    for t in tensors:
        t.copy_(torch.randn(t.shape, generator=gen))
    values = [t.clone() for t in tensors]
    params = [(p.data_ptr(), p.clone()) for p in model.parameters()]
    host_ptrs = None
    for _ in range(2):
        on_device = [t.data for t in tensors]  # (kept alive: their memory cannot be handed out again meanwhile)
        offload.offload_state(opt)
        offload.offload_state(opt)  # twice: a no-op
        assert [id(t) for t in offload.movable_state(opt)] == [id(t) for t in tensors]
        assert [t.data_ptr() for t in tensors] == [h.data_ptr() for h in _host_buffers(opt)]
        assert not {d.data_ptr() for d in on_device} & {t.data_ptr() for t in tensors}
        host_ptrs = host_ptrs or [h.data_ptr() for h in _host_buffers(opt)]
        assert [h.data_ptr() for h in _host_buffers(opt)] == host_ptrs  # the same host buffers every time
        (block,) = opt.offload.blocks  # all of them in one block of host memory
        assert all(block.data_ptr() <= p < block.data_ptr() + block.numel() for p in host_ptrs)
        assert all(torch.equal(t, v) for t, v in zip(tensors, values))
        offload.onload_state(opt)
        assert not {t.data_ptr() for t in tensors} & set(host_ptrs)
        assert all(torch.equal(t, v) for t, v in zip(tensors, values))
    assert all(p.data_ptr() == ptr and torch.equal(p, v) for p, (ptr, v) in zip(model.parameters(), params))


def _twins(dtype=torch.bfloat16, num_layers=1, **kw):
    """Two identical small models and their optimizers (the first's built with **kw)."""
    cfg, small = PPOConfig(max_grad_norm=0.5), dataclasses.replace(ModelConfig.named("tiny"), num_layers=num_layers)
    models = [Transformer(small, "score", dtype=dtype).init_weights(seed=2) for _ in range(2)]
    return cfg, models, optim.make_optimizer(models[0], cfg, **kw), optim.make_optimizer(models[1], cfg)


def _step_both(cfg, models, opts, step):
    for a, b in zip(*(m.parameters() for m in models)):
        g = torch.randn(a.shape, generator=torch.Generator().manual_seed(step)).to(a.dtype)
        a.grad, b.grad = g.clone(), g.clone()
    for o in opts:
        optim.accumulate_grads(o)
        optim.optimizer_step(o, 1e-2, cfg, ProcessGrid())


def test_an_update_or_a_checkpoint_of_offloaded_state_brings_it_back():
    """Steps of an optimizer whose state went to host memory and back (or is still there: the update brings it back
    first) equal a twin's that never moved, bit for bit; a state loaded from a checkpoint (new tensors in Adam's
    state) is offloaded as well."""
    cfg, models, moved, twin = _twins()
    for step in range(4):
        offload.offload_state(moved)
        if step % 2:
            offload.onload_state(moved)
        _step_both(cfg, models, (moved, twin), step)
        assert not moved.offload.on_host
        assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))
    offload.offload_state(moved)
    saved = optim.optimizer_state(moved)  # (brings it back first)
    assert not moved.offload.on_host
    offload.offload_state(moved)
    saved["adam"]["param_groups"][0]["foreach"] = True  # as another run's Adam kernel: this one keeps its own
    optim.load_optimizer_state(moved, saved)
    assert moved.adam.param_groups[0]["foreach"] == twin.adam.param_groups[0]["foreach"]
    offload.offload_state(moved)  # Adam's state is new tensors now: those move
    assert _in_host_buffers(moved)
    offload.onload_state(moved)
    for a, b in zip(offload.movable_state(moved), offload.movable_state(twin)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_host_resident_optimizer_updates_in_chunks_as_the_device_one(monkeypatch, dtype):
    """host_resident: the masters and moments are built in host buffers and stay there between updates (never
    whole on the device: each update moves a chunk at a time, here 3 layers' worth); the updates equal a twin's
    that keeps its state on the device, bit for bit, and so does a checkpoint of it and its reload."""
    monkeypatch.setattr(offload, "CHUNK_ELEMENTS", 40_000)
    cfg, models, resident, twin = _twins(dtype, num_layers=3, host_resident=True)
    assert len(offload.chunks(resident)) > 3 and len(resident.offload.blocks) == 1  # built in one block
    chunks_seen = []
    streamed = offload.streamed

    def spy(opt, fn):
        def counted(idx):
            here = [k for k, _ in offload.groups(opt) if k not in opt.offload.on_host]
            chunks_seen.append((sorted(here), list(idx)))
            fn(idx)

        streamed(opt, counted)

    monkeypatch.setattr(optim, "streamed", spy)
    assert all(torch.equal(a, b) for a, b in zip(offload.movable_state(resident), offload.movable_state(twin)))
    for step in range(3):
        assert resident.offload.on_host == {k for k, _ in offload.groups(resident)}  # all of it on the host
        assert _in_host_buffers(resident)
        _step_both(cfg, models, (resident, twin), step)
        assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))
    for here, idx in chunks_seen:  # on the device during a chunk's update: that chunk and the one coming in
        assert set(idx) <= set(here) and len(here) < len(resident.masters)
    assert [idx for _, idx in chunks_seen] == offload.chunks(resident) * 3
    offloaded = offload.offload_state, offload.onload_state
    for f in offloaded:  # (a host-resident state stays where it is)
        f(resident)
    assert resident.offload.on_host == {k for k, _ in offload.groups(resident)}
    saved, same = optim.optimizer_state(resident), optim.optimizer_state(twin)
    assert all(torch.equal(a, b) for a, b in zip(saved["masters"], same["masters"]))
    for k, st in saved["adam"]["state"].items():
        assert all(torch.equal(st[n], same["adam"]["state"][k][n]) for n in ("exp_avg", "exp_avg_sq", "step"))
    saved = {k: v for k, v in saved.items()}
    saved["adam"] = {
        **same["adam"],
        "state": {k: {n: t.clone() for n, t in st.items()} for k, st in same["adam"]["state"].items()},
    }
    optim.load_optimizer_state(resident, saved)  # loaded into the host buffers again
    assert len(resident.offload.blocks) == 1
    assert resident.offload.on_host == {k for k, _ in offload.groups(resident)}
    assert _in_host_buffers(resident)
    _step_both(cfg, models, (resident, twin), 3)
    assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))


def test_idle_model_weights_go_to_host_memory_and_back():
    """offload_weights: every parameter to its host buffer (identity kept), back with the same values; a frozen
    model's host copy is made once (a later offload copies nothing: shown by a device value the host never gets),
    a trained model's each time."""
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    model = Transformer(small, "score", dtype=torch.bfloat16).init_weights(seed=4)
    params = list(model.parameters())
    for frozen in (True, False):
        copies = offload.HostCopies(torch.device("cpu"))
        values = [p.detach().clone() for p in params]
        offload.offload_weights(model, copies, frozen)
        host = [copies.host[k][0] for k, _ in offload.weight_groups(model)]
        assert [p.data_ptr() for p in params] == [h.data_ptr() for h in host] and len(copies.blocks) == 1
        assert list(model.parameters()) == params and all(torch.equal(p, v) for p, v in zip(params, values))
        offload.onload_weights(model, copies)
        assert all(p.data_ptr() != h.data_ptr() for p, h in zip(params, host))
        assert all(torch.equal(p, v) for p, v in zip(params, values))
        with torch.no_grad():
            params[0].add_(1.0)  # (an update between rollouts: a trained model's only)
        offload.offload_weights(model, copies, frozen)
        assert torch.equal(host[0], values[0] if frozen else values[0] + 1.0)
        assert len(copies.blocks) == 1  # the same buffers
        offload.onload_weights(model, copies)


def test_no_idle_model_is_the_policy(tmp_path):
    """idle_models: the reference, the reward and the value model go to host memory while the policy generates, but
    a library caller's state whose reference is the policy object itself keeps it (offloading it would leave the
    generator reading host buffers); a missing model is skipped."""
    state = tiny_state(tmp_path / "run")
    assert [n for n, _, _ in idle_models(state)] == ["reference", "reward", "value"]
    assert [f for _, _, f in idle_models(state)] == [True, True, False]
    state.ref, state.value = state.policy, None
    assert [(n, m) for n, m, _ in idle_models(state)] == [("reward", state.reward)]


def _idle_on_host(state) -> list[bool]:
    """Per idle model (reference, reward, value): whether its weights use their host buffers now."""
    out = []
    for name, model in (("reference", state.ref), ("reward", state.reward), ("value", state.value)):
        copies = state.model_copies.get(name)
        out.append(copies is not None and [p.data_ptr() for p in model.parameters()] ==
                   [copies.host[k][0].data_ptr() for k, _ in offload.weight_groups(model)])  # fmt: skip
    return out


def test_offloaded_optimizer_trains_the_same(tmp_path):
    """--offload-optimizer rollouts and always (bf16 parameters with fp32 masters, on CPU): during each rollout and
    evaluation the state is in the host buffers (with rollouts, and --offload-idle-models rollouts, so are the
    reference's, reward model's and value model's weights), and the run's metrics and weights equal those of a run
    that never moved them."""
    flags = ["--dtype", "bfloat16", "--max-iterations", "3", "--eval-every", "2", "--learning-rate", "1e-3"]
    off = run_tiny(tmp_path / "off", *flags, "--offload-optimizer", "off", "--offload-idle-models", "off")
    for mode in ("rollouts", "always"):
        models = "rollouts" if mode == "rollouts" else "off"
        state = tiny_state(tmp_path / mode, *flags, "--offload-optimizer", mode, "--offload-idle-models", models)
        assert state.offload and state.policy_opt.host_resident == (mode == "always")
        assert state.offload_models == (models == "rollouts")
        seen = []
        generate = state.generator.generate_completions

        def spy(*args, state=state, generate=generate, seen=seen, **kw):
            opts = (state.policy_opt, state.value_opt)
            ok = all(o.offload.on_host == {k for k, _ in offload.groups(o)}
                     and offload.movable_state(o)[0].data_ptr() == _host_buffers(o)[0].data_ptr()
                     for o in opts)  # fmt: skip
            seen.append(ok and all(on_host == state.offload_models for on_host in _idle_on_host(state)))
            return generate(*args, **kw)

        state.generator.generate_completions = spy
        with dispatch.reference_ops():
            on = trainer.train(state)
        assert seen == [True] * 6  # 3 rollouts, evaluations before, at 2 and after
        assert not any(_idle_on_host(state))  # back on the "device" after each
        assert no_timing(on) == no_timing(off)
        for name, head in (("policy", "lm"), ("value", "score")):
            a = saved_weights(latest_checkpoint(str(tmp_path / mode)) + f"/{name}", head)
            b = saved_weights(latest_checkpoint(str(tmp_path / "off")) + f"/{name}", head)
            assert all(torch.equal(a[k], b[k]) for k in a)


def _fake_cudart(monkeypatch) -> list:
    """torch.cuda.cudart() replaced by one that records each page-lock's register and unregister (no GPU)."""
    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(("register", ptr))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    return calls


def test_a_host_block_collected_during_a_graph_capture_is_unregistered_later(monkeypatch):
    """A host block's finalizer (engine.offload._unlock) run by a garbage collection during a CUDA graph capture must
    not synchronize (that would end the capture): the block waits, and the next registration unregisters it."""
    calls = _fake_cudart(monkeypatch)
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(("synchronize", None)))
    old, new = offload._whole_pages(10), offload._whole_pages(10)
    offload._unlock(old)
    assert calls == [] and offload._UNLOCK_LATER == [old]
    capturing[0] = False
    owner = offload.HostCopies(torch.device("cpu"))
    offload._page_lock(owner, new)
    assert calls == [("synchronize", None), ("unregister", old.data_ptr()), ("register", new.data_ptr())]
    assert offload._UNLOCK_LATER == []
    del owner  # (its finalizer unregisters the new block, no capture running)
    assert calls[-1] == ("unregister", new.data_ptr())


def test_host_buffers_start_aligned():
    """Every host buffer starts at an ALIGN boundary (the copy engines' fast path), whatever the sizes before it."""
    c = offload.HostCopies(torch.device("cpu"))
    c.reserve([(0, [(torch.Size([3]), torch.bfloat16), (torch.Size([5]), torch.float32)]),
               (1, [(torch.Size([7, 3]), torch.bfloat16)])])  # fmt: skip
    assert all(h.data_ptr() % offload.ALIGN == 0 for hs in c.host.values() for h in hs)


def test_a_host_block_no_key_holds_is_let_go(monkeypatch):
    """reserve() with new shapes for keys puts them in a new block; the old block is kept while another key's buffers
    are in it, and unlocked and dropped once none are (a run whose shapes change does not pile up page-locked host
    memory). Its unlock runs once: not again when the owner is collected."""
    calls = _fake_cudart(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    c = offload.HostCopies(torch.device("cuda"))  # (nothing touches a device: the copies are not called)
    spec = lambda *n: [(torch.Size([m]), torch.float32) for m in n]  # noqa: E731
    c.reserve([(0, spec(100)), (1, spec(300))])
    first = c.blocks[0].data_ptr()
    c.reserve([(0, spec(200))])  # key 1 still in the first block
    assert len(c.blocks) == 2 and c.blocks[0].data_ptr() == first and ("unregister", first) not in calls
    c.reserve([(1, spec(50, 60))])  # nothing left in the first block
    assert len(c.blocks) == 2 and first not in [b.data_ptr() for b in c.blocks]
    assert calls.count(("unregister", first)) == 1
    assert [h.numel() for h in c.host[0]] == [200] and [h.numel() for h in c.host[1]] == [50, 60]
    c.reserve([(0, spec(200)), (1, spec(50, 60))])  # the same shapes: nothing new
    assert len(c.blocks) == 2 and calls.count(("register", first)) == 1
    kept = [b.data_ptr() for b in c.blocks]
    del c
    assert calls.count(("unregister", first)) == 1 and all(("unregister", p) in calls for p in kept)


def test_bf16_micro_batch_grads_accumulate_once_each():
    import dataclasses

    from engine import optim
    from engine.distributed import ProcessGrid

    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    model = Transformer(small, "score", dtype=torch.bfloat16).init_weights(seed=0)
    opt = optim.make_optimizer(model, PPOConfig())
    want = [torch.zeros(p.shape) for p in opt.params]
    for step in range(3):
        for p, w in zip(opt.params, want):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
            p.grad = g.clone() if p.grad is None else p.grad + g  # (as autograd accumulates)
            w += g.float()
        optim.accumulate_grads(opt)
    optim.reduce_grads(opt, ProcessGrid())
    for g, w in zip(opt.grads, want):
        torch.testing.assert_close(g, w)


def test_distributed_buckets_cover_an_odd_number_of_elements():
    from engine.distributed import ProcessGrid
    from engine.optim import _make_buckets

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    covered = collections.Counter()
    for rank in range(2):
        for b in _make_buckets(params, ProcessGrid(rank=rank, world_size=2, dp=2), cap=1000):
            for i, lo, hi, first in b.segments:
                covered.update((i, first + k) for k in range(hi - lo))
    assert sorted(covered) == [(0, k) for k in range(3)] + [(1, k) for k in range(4)]
    assert set(covered.values()) == {1}


@pytest.mark.parametrize("max_norm", [0.5, 100.0], ids=["clipped", "under_the_limit"])
def test_grad_norm_clip_matches_torch(max_norm):
    """The norm returned and the clip applied are torch's clip_grad_norm_ (then AdamW) on the same grads, for a norm
    above the limit (scaled down) and one under it (left as it is)."""
    cfg = PPOConfig(max_grad_norm=max_norm)
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    ours = Transformer(small, "score", dtype=torch.float32).init_weights(seed=1)
    ref = Transformer(small, "score", dtype=torch.float32)
    ref.load_state_dict(ours.state_dict())
    opt = optim.make_optimizer(ours, cfg)
    adam = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for a, b in zip(ours.parameters(), ref.parameters()):
        a.grad = torch.randn(a.shape, generator=gen) * 0.01
        b.grad = a.grad.clone()
    norm = optim.optimizer_step(opt, 1e-2, cfg, ProcessGrid())
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    assert (want > max_norm) == (max_norm == 0.5)
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    adam.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_grad_norm_counts_tp_sharded_grads_once_at_tp_1():
    """With one TP rank the sharded pieces are summed over a group of one: the norm is every grad's, each once."""
    model = Transformer(dataclasses.replace(ModelConfig.named("tiny"), num_layers=1), "score", dtype=torch.float32)
    opt = optim.make_optimizer(model.init_weights(seed=1), PPOConfig())
    opt.sharded = [k % 2 == 0 for k in range(len(opt.params))]
    for p in opt.params:
        p.grad = torch.randn(p.shape)
    want = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in opt.params]))
    torch.testing.assert_close(optim.reduce_grads(opt, ProcessGrid()), want)


def test_chunks_fill_up_to_exactly_chunk_elements(monkeypatch):
    """A host-resident update's chunks: consecutive masters up to CHUNK_ELEMENTS elements, a chunk of exactly that
    many included; a larger master alone."""
    from types import SimpleNamespace

    monkeypatch.setattr(offload, "CHUNK_ELEMENTS", 5)
    opt = SimpleNamespace(masters=[torch.empty(n) for n in (3, 2, 5, 6, 1, 4)])
    assert offload.chunks(opt) == [[0, 1], [2], [3], [4, 5]]


def test_a_model_with_an_optimizer_pickles_and_loads_back_without_it():
    """torch.save(model) of a model whose parameters carry an optimizer's hooks and grad-sum getters (weak references
    to it, which pickle refuses) writes, and the model loaded back has the same weights and no optimizer: its grads
    stay on its parameters."""
    import io

    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=1)
    model = Transformer(small, "score", dtype=torch.bfloat16).init_weights(seed=0)
    opt = optim.make_optimizer(model, PPOConfig())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert all(p.grad_sum() is None for p in back.parameters())
    x = torch.randint(0, small.vocab_size, (5,))
    with dispatch.reference_ops():
        back.head_packed(
            back.hidden_packed(x, torch.arange(5), torch.tensor([0, 5], dtype=torch.int32))
        ).sum().backward()
    assert all(p.grad is not None for p in back.parameters())
    assert all(g is None for g in opt.grads)  # (the original optimizer untouched)
    assert opt.params[0].grad_sum() is opt.grads[0] is not None  # (and still its parameters')
