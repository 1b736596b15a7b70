"""The engine on a GPU with the compiled kernels and real CUDA graphs (skipped without CUDA).

    TULU_TEST_DEVICE=cuda python -m pytest -q tests/kernels tests/engine/test_gpu.py

The oracles are transformers on the same GPU and the engine's own reference path (kernels/reference.py,
itself checked against transformers on CPU). torch's default device stays the CPU, as in production:
everything here is placed on the GPU explicitly. Lengths cross the compiled kernels' 128-token tiles.
"""

import contextlib
import gc
import json
import math
import warnings

import pytest
import torch

from engine.checkpoint import load_pretrained
from engine.config import GenerateConfig, ModelConfig
from engine.generate import Generator
from engine.model import Transformer
from kernels.dispatch import INTERPRET, reference_ops
from tests.engine.hf_models import bf16_errors, padded_batch, rel_err, save_hf_model

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(  # (without it the conftest keeps Triton's interpreter: the kernels would not be compiled)
        torch.cuda.is_available() and INTERPRET,
        reason="run with TULU_TEST_DEVICE=cuda (the kernels compiled, not interpreted)",
    ),
]
CUDA = torch.device("cuda")
LENGTHS = [200, 11, 1, 129]  # two, one and one-plus-one 128-token tiles


def _prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers_on_gpu(tmp_path, kv_heads, side):
    hf = save_hf_model(tmp_path, num_key_value_heads=kv_heads).to(CUDA)
    ours = load_pretrained(tmp_path, device=CUDA)
    ids, mask, pos = (t.to(CUDA) for t in padded_batch(301, LENGTHS, side))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, mask)
    m = mask.bool()
    assert rel_err(out[m], ref[m]) < 5e-5


def test_bf16_logits_as_accurate_as_transformers_on_gpu(tmp_path):
    hf = save_hf_model(tmp_path, dtype=torch.bfloat16).to(CUDA)
    ours = load_pretrained(tmp_path, device=CUDA)
    assert next(ours.parameters()).dtype == torch.bfloat16
    ours_err, hf_err = bf16_errors(hf, ours, *(t.to(CUDA) for t in padded_batch(301, LENGTHS, "right")))
    assert ours_err < max(2 * hf_err, 1e-2), (ours_err, hf_err)


# the same comparison in Triton's interpreter on CPU measured 8.6e-7 (fp32) and 1.0e-2 (bf16) at most, relative to
# each gradient's largest value (a norm weight's in bf16)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_packed_forward_backward_kernels_match_reference_on_gpu(dtype, tol):
    """The training forward (rope flash attention, fused norm and activation) and every parameter's gradient."""
    cfg = ModelConfig.named("tiny")
    model = Transformer(cfg, dtype=dtype, device=CUDA).init_weights(std=0.05, seed=1)
    lens = [1, 17, 129, 300]
    ids = torch.randint(3, cfg.vocab_size, (sum(lens),), device=CUDA)
    pos = torch.cat([torch.arange(n, device=CUDA) for n in lens])
    cu = torch.tensor([0, *lens], device=CUDA).cumsum(0).to(torch.int32)
    w = torch.randn(sum(lens), cfg.vocab_size, device=CUDA)

    def run():
        model.zero_grad(set_to_none=True)
        logits = model.forward_packed(ids, pos, cu)
        (logits.float() * w).sum().backward()
        return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}

    got, got_grads = run()
    with reference_ops():
        want, want_grads = run()
    assert rel_err(got, want) < tol
    for name, g in want_grads.items():
        assert rel_err(got_grads[name], g) < tol, name


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_greedy_matches_transformers_on_gpu(tmp_path, kv_heads):
    """Prefill through rope attention writing the paged cache, decode through the paged kernel in CUDA graphs."""
    hf = save_hf_model(tmp_path, num_key_value_heads=kv_heads, eos_token_id=2).to(CUDA)
    model = load_pretrained(tmp_path, device=CUDA)
    prompts = _prompts(301, [5, 130, 1, 40])
    t = max(map(len, prompts))
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :], mask[i, t - len(p) :] = torch.tensor(p), 1
    out = hf.generate(
        input_ids=ids.to(CUDA), attention_mask=mask.to(CUDA), max_new_tokens=12, do_sample=False,
        pad_token_id=0, eos_token_id=2,
    )[:, t:].tolist()  # fmt: skip
    expected = [row[: row.index(2) + 1] if 2 in row else row for row in out]
    with warnings.catch_warnings():
        # a failed graph capture warns and decodes eagerly: fail instead
        warnings.filterwarnings("error", message="CUDA graph capture failed")
        gen = Generator(model, block_size=16, num_blocks=256, max_model_len=256, max_num_seqs=8)
        got = gen.generate(prompts, GenerateConfig(temperature=0.0, max_new_tokens=12))
    assert gen.use_cuda_graphs and gen.stats.graph_captures > 0
    assert got == expected


def test_graphs_and_overlap_sample_what_the_eager_loop_samples_on_gpu():
    """Sampled (temperature, n samples, stop tokens): CUDA graphs + the overlapped loop against eager
    synchronous decoding, and both against the reference path; then the graphs across a release()."""
    cfg = ModelConfig.named("tiny")
    model = Transformer(cfg, dtype=torch.float32, device=CUDA).init_weights(std=0.05, seed=2)
    prompts = _prompts(cfg.vocab_size, [3, 7, 1, 12, 5, 150], seed=4)
    # 15 of 512 ids stop (about 45% of the samples stop within 20 tokens): both finish reasons all but surely occur
    params = GenerateConfig(temperature=0.8, max_new_tokens=20, seed=5, n=2, stop_token_ids=list(range(100, 115)))
    kw = dict(block_size=16, num_blocks=128, max_num_seqs=6, max_model_len=256)
    fast = Generator(model, **kw)
    got = fast.generate_completions(prompts, params)
    assert fast._graphs is not None and fast.stats.overlapped_steps > 0
    slow = Generator(model, use_cuda_graphs=False, overlap=False, **kw).generate_completions(prompts, params)
    with reference_ops():
        ref = Generator(model, use_cuda_graphs=False, **kw).generate_completions(prompts, params)
    assert [c.tokens for c in got] == [c.tokens for c in slow] == [c.tokens for c in ref]
    assert any(c.finish_reason == "stop" for c in got) and any(c.finish_reason == "length" for c in got)
    flat = lambda comps: torch.tensor([x for c in comps for x in c.logprobs])  # noqa: E731
    torch.testing.assert_close(flat(got), flat(slow), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat(got), flat(ref), atol=1e-4, rtol=1e-4)

    graphs, address = fast._graphs, fast.pool.tensor.data_ptr()
    fast.release()
    torch.cuda.empty_cache()
    again = fast.generate_completions(prompts, params)
    assert [c.tokens for c in again] == [c.tokens for c in got]
    same_address = fast.pool.tensor.data_ptr() == address
    assert (fast._graphs is graphs) == same_address
    assert fast.stats.graph_captures == (0 if same_address else len(graphs.buckets))


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9), reason="no float8 on this GPU"
)
def test_fp8_kv_cache_on_gpu():
    """kv_cache_dtype="fp8" with the compiled kernels: CUDA graphs sample what eager decoding samples (a full
    bucket: the same GEMM shapes), and each sample's first token is the reference path's over the same float8 cache
    (the prefill attends to the K/V the cache holds, rounded to float8, so not the model-dtype cache's). The decode
    kernel itself is checked against float64 over the cache's values in tests/kernels/test_paged_attention.py; fp8
    rounding makes free-running tokens of two paths diverge by design."""
    cfg = ModelConfig.named("tiny")
    model = Transformer(cfg, dtype=torch.float32, device=CUDA).init_weights(std=0.05, seed=3)
    prompts = _prompts(cfg.vocab_size, [3, 9, 150, 1], seed=6)
    params = GenerateConfig(temperature=0.7, max_new_tokens=16, ignore_eos=True, seed=9)
    kw = dict(block_size=16, num_blocks=128, max_num_seqs=4, max_model_len=256)
    fp8 = Generator(model, kv_cache_dtype="fp8", **kw)
    got = fp8.generate_completions(prompts, params)
    assert fp8.pool.tensor.dtype == torch.float8_e4m3fn and fp8.stats.graph_captures > 0
    eager = Generator(model, kv_cache_dtype="fp8", use_cuda_graphs=False, **kw).generate_completions(prompts, params)
    with reference_ops():
        ref = Generator(model, kv_cache_dtype="fp8", use_cuda_graphs=False, **kw).generate_completions(prompts, params)
    assert [c.tokens for c in got] == [c.tokens for c in eager]
    flat = lambda comps: torch.tensor([x for c in comps for x in c.logprobs])  # noqa: E731
    torch.testing.assert_close(flat(got), flat(eager), atol=1e-5, rtol=1e-5)
    assert [c.tokens[0] for c in got] == [c.tokens[0] for c in ref]
    first = lambda comps: torch.tensor([c.logprobs[0] for c in comps])  # noqa: E731
    torch.testing.assert_close(first(got), first(ref), atol=1e-4, rtol=1e-4)


def test_ppo_iteration_on_gpu(tmp_path, monkeypatch):
    """Generate (graphs) -> score -> train -> generate again on the updated tensors, with the tiny models; the KV pool
    released for each training phase gives its memory back at once (no view of it kept: no full garbage collection
    needed, no warning)."""
    import types

    from bench.ppo_step import main
    from engine import kv_cache

    collections = []
    monkeypatch.setattr(kv_cache, "gc", types.SimpleNamespace(collect=lambda *a: collections.append(1) or 0))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="KV cache released but")
        out = main(["--device", "cuda", "--iterations", "2", "--rollout-batch-size", "8", "--train-batch-size", "4",
                    "--prompt-len", "24", "--max-new-tokens", "16", "--json", str(tmp_path / "ppo.json")])  # fmt: skip
    assert collections == []  # (release() found its bytes back without collecting)
    for phase in out["phases"].values():
        assert phase["seconds"] > 0 and phase["tokens"] > 0
    assert out["generator"]["decode_steps"] > 0
    metrics = json.loads((tmp_path / "ppo.json").read_text())["metrics"]
    assert len(metrics) == 2 and metrics[-1]["iteration"] == 3  # after the warm-up
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values() if not isinstance(v, str)), m
        assert m["recompute_layers"] == 0  # planned (activation_checkpointing=auto): the tiny models' activations fit
        assert min(m["mem_gib_generate"], m["mem_gib_score"], m["mem_gib_train"]) > 0  # each phase's peak


def test_one_iteration_equals_ppo_written_from_the_recipe_on_gpu(tmp_path, monkeypatch):
    """tests/engine/test_recipe_oracle.py's check with the compiled kernels in the scoring and training passes: one
    PPO iteration (fp32 parameters; the rollout sampled through the decode graphs) against PPO written from
    RECIPE.md in float64 on transformers' models (on the CPU)."""
    from tests.engine.test_recipe_oracle import check_iteration_against_the_oracle

    check_iteration_against_the_oracle(tmp_path, monkeypatch, "kernels", "cuda")


@pytest.mark.parametrize("offload", ["rollouts", "always"])
def test_train_ppo_tiny_with_evaluation_on_gpu(tmp_path, offload):
    """The entry point's tiny default on the GPU (bf16 parameters, the kernels, CUDA graphs), with the held-out
    evaluations (generation, reference, RM), the samples log and the optimizer state in host memory during rollouts
    or throughout, and the idle models' weights in host memory during rollouts (test_ppo_iteration_on_gpu runs the
    defaults, auto, which keep them on the GPU for models this small)."""
    from engine.train_ppo import main

    history = main(["--device", "cuda", "--output-dir", str(tmp_path), "--max-iterations", "2", "--eval-every", "1",
                    "--rollout-batch-size", "8", "--train-batch-size", "4", "--max-new-tokens", "8",
                    "--offload-optimizer", offload, "--offload-idle-models", "rollouts"])  # fmt: skip
    assert [m["iteration"] for m in history] == [1, 2]
    evals = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [0, 1, 2]
    for m in history + evals:
        assert all(math.isfinite(v) for v in m.values() if not isinstance(v, str)), m
    assert evals[0]["kl"] == 0.0 and evals[0]["prompts"] == 16  # policy == reference before the first update
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 4


def test_memory_plan_is_what_cuda_allocates():
    """The memory plan's weights and optimizer state (engine/memory_plan.py) against what the CUDA allocator hands
    out for four bf16 models and two optimizers (within its 512-byte rounding and Adam's step counters)."""
    from tests.engine.test_memory_plan import build_and_plan

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(CUDA)
    built = build_and_plan(CUDA)
    allocated = torch.cuda.memory_allocated(CUDA) - before
    assert abs(allocated - built[2]) < 0.01 * built[2], (allocated, built[2])


def _holders(storages: dict[int, str]) -> list[str]:
    """The live CUDA tensors on any of these storages (data pointer: parameter name), each with its shape and the
    types of the objects that refer to it (an autograd context, a cache's list, ...)."""
    found, objects = [], gc.get_objects()
    for o in objects:
        if isinstance(o, torch.Tensor) and o.is_cuda and o.untyped_storage().data_ptr() in storages:
            refs = sorted({type(r).__qualname__ for r in gc.get_referrers(o) if r is not objects and r is not found})
            grad_fn = type(o.grad_fn).__name__ if o.grad_fn is not None else None
            found.append(f"{storages[o.untyped_storage().data_ptr()]} {tuple(o.shape)} (grad_fn {grad_fn}) referred "
                         f"to by {refs or 'nothing Python sees (autograd C++ objects)'}")  # fmt: skip
    return found or ["no Python-visible tensor (a C++ holder: autograd's saved variables, a graph pool)"]


def test_idle_model_weights_free_their_gpu_memory_during_generation(tmp_path, monkeypatch):
    """--offload-idle-models rollouts over an iteration and two evaluations: each generation frees the
    reference's, reward model's and value model's weights from the GPU (the memory allocated lower by their bytes)
    into page-locked buffers (the frozen two copied only the first time), and the run's metrics and evaluations are
    those of a run that kept them there (the copies back are waited for before scoring)."""
    from engine import offload, rollout, trainer
    from engine import state as state_mod
    from engine.train_ppo import parse_args, prepare_tiny
    from tests.engine.runs import TIMING

    def run(out, setting):
        cfg, run, _ = parse_args(["--device", "cuda", "--output-dir", str(out), "--max-iterations", "1",
                                  "--eval-every", "1", "--rollout-batch-size", "8", "--train-batch-size", "4",
                                  "--max-new-tokens", "8", "--offload-idle-models", setting])  # fmt: skip
        state = state_mod.setup(cfg, prepare_tiny(run))
        assert state.offload_models == (setting == "rollouts")
        return trainer.train(state), state.evals

    seen, real = [], offload.offload_weights

    def spy(model, copies, frozen):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(CUDA)
        storages = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}  # (for the message)
        real(model, copies, frozen)  # (the allocator counts a freed block out at once, copies pending or not)
        freed, nbytes = before - torch.cuda.memory_allocated(CUDA), offload.weight_bytes(model)
        pinned = all(p.device.type == "cpu" and p.is_pinned() for p in model.parameters())
        where = {(p.device.type, p.is_pinned()) for p in model.parameters()}  # (for the message)
        msg = f"#{len(seen)} freed {freed} of {nbytes} bytes {where}"
        if freed < nbytes - 512:  # which old weights are still alive, and what refers to them
            msg += "; held: " + "; ".join(_holders(storages))
        seen.append((freed >= nbytes - 512, pinned, frozen, msg))

    monkeypatch.setattr(rollout, "offload_weights", spy)
    history, evals = run(tmp_path / "on", "rollouts")
    gc.collect()  # (the first run's host blocks unregistered now, not during the second's graph captures)
    assert len(seen) == 3 * 3, seen
    assert all(freed and pinned for freed, pinned, *_ in seen), [s for s in seen if not (s[0] and s[1])]
    assert sum(frozen for _, _, frozen, _ in seen) == 6  # (copied out at the first generation only)
    off_history, off_evals = run(tmp_path / "off", "off")
    for a, b in zip(history + evals, off_history + off_evals, strict=True):
        for k, v in b.items():
            if k not in (*TIMING, "time", "gen_graph_captures") and not k.startswith("mem_gib"):  # (clock, memory)
                assert a[k] == (v if isinstance(v, (str, bool)) else pytest.approx(v, rel=1e-5, abs=1e-6)), k


def test_offloaded_optimizer_state_frees_its_gpu_memory_and_comes_back():
    """offload_state frees exactly the state's bytes on the GPU into pinned host buffers; onload_state copies them
    back on a side stream, and an update issued at once (it waits for the copies) equals a twin's that never moved."""
    from engine import offload, optim
    from engine.config import PPOConfig
    from engine.distributed import ProcessGrid

    cfg, small = PPOConfig(max_grad_norm=0.5), ModelConfig.named("tiny")
    models = [Transformer(small, "score", dtype=torch.bfloat16, device=CUDA).init_weights(seed=2) for _ in range(2)]
    moved, twin = (optim.make_optimizer(m, cfg) for m in models)
    nbytes = offload.state_bytes(moved)
    for step in range(3):
        for a, b in zip(*(m.parameters() for m in models)):
            g = torch.randn(a.shape, device=CUDA).to(torch.bfloat16)
            a.grad, b.grad = g.clone(), g.clone()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(CUDA)
        offload.offload_state(moved)
        torch.cuda.synchronize()  # the copies out run on a side stream: their memory is released after them,
        torch.empty(1, device=CUDA)  # when the allocator next looks (at an allocation)
        freed = before - torch.cuda.memory_allocated(CUDA)
        host = [h for bufs in moved.offload.host.values() for h in bufs]
        assert abs(freed - nbytes) <= 512 * len(host), (freed, nbytes)
        assert all(h.is_pinned() and h.device.type == "cpu" for h in host)
        offload.onload_state(moved)  # no synchronize: the update below must wait for the side stream itself
        assert moved.offload.pending is not None and not moved.offload.on_host
        for o in (moved, twin):
            optim.accumulate_grads(o)
            optim.optimizer_step(o, 1e-2, cfg, ProcessGrid())
        assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models))), step
    for a, b in zip(offload.movable_state(moved), offload.movable_state(twin)):
        assert a.is_cuda and torch.equal(a, b)


def test_host_resident_optimizer_on_gpu(monkeypatch):
    """--offload-optimizer always on the GPU: the state is built in page-locked host memory (the device holds none of
    it), and each update streams it through in chunks on the side streams, holding a few chunks at a time (not the
    whole state: the CPU waits for the copies out); the updates equal a twin's whose state stays on the device (the
    same fused Adam on the same values), step after step."""
    from engine import offload, optim
    from engine.config import PPOConfig
    from engine.distributed import ProcessGrid

    monkeypatch.setattr(offload, "CHUNK_ELEMENTS", 1_000_000)
    cfg = PPOConfig(max_grad_norm=0.5)
    small = ModelConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                        num_kv_heads=8)  # fmt: skip
    models = [Transformer(small, "lm", dtype=torch.bfloat16, device=CUDA).init_weights(seed=3) for _ in range(2)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(CUDA)
    resident = optim.make_optimizer(models[0], cfg, host_resident=True)
    assert torch.cuda.memory_allocated(CUDA) - before <= 512 * len(resident.masters)  # the step counts only
    twin = optim.make_optimizer(models[1], cfg)
    parts = offload.chunks(resident)
    largest = max(sum(resident.masters[i].numel() for i in idx) for idx in parts)
    whole = offload.state_bytes(resident)
    assert len(parts) > 8 and 5 * 12 * largest < whole / 3
    for step in range(3):
        for a, b in zip(*(m.parameters() for m in models)):
            g = torch.randn(a.shape, device=CUDA).to(torch.bfloat16)
            a.grad, b.grad = g.clone(), g.clone()
        for o in (resident, twin):
            optim.accumulate_grads(o)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # (reserved, not allocated, memory: a freed block waiting on a copy is still held)
        torch.cuda.reset_peak_memory_stats(CUDA)
        base = torch.cuda.memory_reserved(CUDA)
        optim.optimizer_step(resident, 1e-2, cfg, ProcessGrid())
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_reserved(CUDA) - base
        assert peak <= whole / 2, (peak, largest, whole)  # a few chunks (about 5 * 12 * largest), never the state
        optim.optimizer_step(twin, 1e-2, cfg, ProcessGrid())
        assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models))), step
        assert all(not t.is_cuda and t.is_pinned() for t in offload.movable_state(resident))
    resident.offload.host_ready()
    for a, b in zip(offload.movable_state(resident), offload.movable_state(twin)):
        assert torch.equal(a, b.cpu())


def test_weight_grads_go_straight_into_fp32_sums_on_gpu():
    """engine/grad_sums.py's GEMM into an fp32 sum (kernels.dispatch.add_matmul_): within fp32 rounding of float64
    where this torch has the fp32-out GEMM (then one GEMM, far closer than the bf16 product added), else the bf16
    product added, as a backward without it; and two micro-batches of a bf16 model inside into_sums leave the sums a
    backward through the optimizer's hooks leaves, within the bf16 product's rounding."""
    import dataclasses

    from engine import grad_sums, optim
    from engine.config import PPOConfig
    from kernels import dispatch

    fused = dispatch.fp32_out_gemm(CUDA)
    print(f"fp32-out GEMM into the sum: {fused} (torch {torch.__version__})")
    g = torch.Generator(device=CUDA).manual_seed(0)
    a = torch.randn(1000, 257, device=CUDA, generator=g).bfloat16().t()  # (dy^T: a transposed operand)
    b = torch.randn(1000, 130, device=CUDA, generator=g).bfloat16()
    earlier = torch.randn(257, 130, device=CUDA, generator=g)
    want = earlier.double() + a.double() @ b.double()
    acc = earlier.clone()
    assert dispatch.add_matmul_(acc, a, b) is acc
    err = float((acc.double() - want).abs().max())
    half = float(((earlier + (a @ b).float()).double() - want).abs().max())
    assert err <= (0.01 * half if fused else half * (1 + 1e-6)), (err, half)
    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=2)
    models = [Transformer(small, "score", dtype=torch.bfloat16, device=CUDA).init_weights(seed=2) for _ in range(2)]
    opts = [optim.make_optimizer(m, PPOConfig()) for m in models]
    ids = torch.randint(0, small.vocab_size, (300,), device=CUDA, generator=g)
    pos, cu = torch.arange(300, device=CUDA), torch.tensor([0, 120, 300], dtype=torch.int32, device=CUDA)
    for k, m in enumerate(models):
        for _ in range(2):
            with grad_sums.into_sums() if k == 0 else contextlib.nullcontext():
                m.head_packed(m.hidden_packed(ids, pos, cu)).float().square().sum().backward()
    for i in range(len(opts[0].params)):
        x, y = optim.grad_sum(opts[0], i), optim.grad_sum(opts[1], i)
        assert float((x - y).norm() / y.norm()) < 1e-2, i


def test_the_mlps_recomputed_activation_gives_the_same_grads_on_gpu():
    """engine.recompute.mlp_recompute on the compiled kernels: the MLPs keep their gate/up output and recompute the
    activation in the backward, and every weight's fp32 sum (grads straight into the sums) is the same bits as
    keeping the activation (the same kernels and GEMMs, the activation recomputed by the same swiglu kernel)."""
    import dataclasses

    from engine import grad_sums, optim, recompute
    from engine.config import PPOConfig

    small = dataclasses.replace(ModelConfig.named("tiny"), num_layers=2)
    g = torch.Generator(device=CUDA).manual_seed(1)
    ids = torch.randint(0, small.vocab_size, (300,), device=CUDA, generator=g)
    pos, cu = torch.arange(300, device=CUDA), torch.tensor([0, 120, 300], dtype=torch.int32, device=CUDA)
    sums = []
    for on in (False, True):
        m = Transformer(small, "score", dtype=torch.bfloat16, device=CUDA).init_weights(seed=2)
        recompute.mlp_recompute(m, on)
        opt = optim.make_optimizer(m, PPOConfig())
        with grad_sums.into_sums():
            m.head_packed(m.hidden_packed(ids, pos, cu)).float().square().sum().backward()
        sums.append([optim.grad_sum(opt, i).clone() for i in range(len(opt.params))])
    for i, (a, b) in enumerate(zip(*sums, strict=True)):
        assert torch.equal(a, b), i


PARAM_GATHER_ON_GPU = """
import sys, types, torch, torch.distributed as dist
from engine import dp_overlap, optim
torch.distributed.init_process_group("nccl", init_method="file://" + sys.argv[1], rank=0, world_size=1)
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
params = [torch.randn(n, device=dev, generator=g).to(torch.bfloat16) for n in (3000, 77, 5000, 1)]
buckets = optim._make_buckets(params, types.SimpleNamespace(dp=1, dp_rank=0), 4000)
masters = [optim._flat_shard(params, b, 1) + 1.0 for b in buckets]
opt = types.SimpleNamespace(buckets=buckets, masters=masters, params=params, dp_group=dist.group.WORLD, gathers=None)
old = [p.clone() for p in params]
opt.gathers = dp_overlap.Gathers(stream=torch.cuda.Stream(dev))
torch.cuda._sleep(200_000_000)  # the current stream busy: the copies must wait for what it has queued
before = [p.clone() for p in params]  # (read by the current stream before the copies may write)
with torch.cuda.stream(opt.gathers.stream):
    torch.cuda._sleep(400_000_000)  # the side stream late: the reads after settle() must wait for its copies
dp_overlap.gather_params(opt, range(len(buckets)), later=True)
assert dp_overlap.pending_gathers(opt)
dp_overlap.settle(opt)
after = [p.clone() for p in params]
assert not dp_overlap.pending_gathers(opt)
assert all(torch.equal(a, b) for a, b in zip(before, old))
want = [(p.float() + 1.0).to(torch.bfloat16) for p in old]
assert all(torch.equal(a, w) for a, w in zip(after, want)), [(a.float() - w).abs().max() for a, w in zip(after, want)]
print("ok")
"""


def test_the_parameter_gather_left_running_lands_before_the_parameters_are_read_on_gpu(tmp_path):
    """engine.dp_overlap.gather_params(later=True) on a GPU (NCCL, one rank): the side stream's copies into the
    parameters come after what the current stream queued before (its reads see the old values, however long it is
    busy), and settle() makes the current stream's reads wait for them (however late the side stream is)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    r = subprocess.run([sys.executable, "-c", PARAM_GATHER_ON_GPU, str(tmp_path / "store")], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


ASYNC_TP_ON_TWO_GPUS = """
import os, torch, torch.distributed as dist
from engine import parallel
from engine.distributed import init_process_grid
from engine.parallel import ColumnParallelLinear, RowParallelLinear
grid = init_process_grid(2, "nccl")
dev = torch.device("cuda", grid.rank)
torch.manual_seed(3)
col = ColumnParallelLinear(512, [1024], grid.tp_group, dtype=torch.bfloat16, device=dev)
row = RowParallelLinear(1024, 512, grid.tp_group, dtype=torch.bfloat16, device=dev)
with torch.no_grad():
    col.weight.normal_(std=0.05)
    row.weight.normal_(std=0.05)
torch.manual_seed(10 + grid.rank)
x0, dy = torch.randn(1000, 512, device=dev).bfloat16(), torch.randn(1000, 512, device=dev).bfloat16()
got = []
for fused in (False, True):
    parallel.ASYNC_TP = fused
    x = x0.clone().requires_grad_()
    y = row(torch.nn.functional.silu(col(x, sequence_parallel=True)), sequence_parallel=True)
    y.backward(dy)
    with torch.no_grad():
        plain = row(torch.nn.functional.silu(col(x0, sequence_parallel=True)), sequence_parallel=True)
    got.append([t.float() for t in (y.detach(), x.grad, col.weight.grad, row.weight.grad, plain)])
    col.weight.grad = row.weight.grad = None
for a, b in zip(*got):
    assert float((a - b).norm() / b.norm()) < 1e-2, float((a - b).norm() / b.norm())
print("rank", grid.rank, "ok")
dist.destroy_process_group()
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NVLink peers)")
def test_async_tp_gives_the_plain_paths_products_on_two_gpus(tmp_path):
    """engine.parallel.ASYNC_TP with torch's fused symmetric-memory ops on two GPUs (TP 2, NCCL): a column- and a
    row-parallel layer under sequence parallelism give the plain path's output, input grad and weight grads (bf16,
    another summation order: to 1e-2 of their norms), with autograd and without."""
    _two_gpu_script(tmp_path / "async_tp.py", ASYNC_TP_ON_TWO_GPUS)


def _two_gpu_script(path, text: str) -> None:
    """Run `text` as a script under torchrun on two GPUs; each rank must print " ok"."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path.write_text(text)
    env = dict(os.environ, PYTHONPATH=root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count(" ok") == 2, r.stdout[-2000:] + r.stderr[-3000:]


SYMM_REDUCE_ON_TWO_GPUS = """
import torch, torch.distributed as dist
from engine import symm_reduce
from engine.distributed import init_process_grid
grid = init_process_grid(2, "nccl")
dev, group = torch.device("cuda", grid.rank), grid.tp_group
symm_reduce.SYMM_ALL_REDUCE = True
hidden = 5120
buf = symm_reduce.prepare(group, dev, 64 * hidden * 2)
assert buf is not None and buf.capacity == 64 * hidden * 2, buf
torch.manual_seed(grid.rank)
for dtype in (torch.bfloat16, torch.float32):
    for rows in (1, 3, 16, 64 * 2 // dtype.itemsize):  # one-shot, then (above 256 KiB) the switch's or two-shot
        x = torch.randn(rows, hidden, device=dev, dtype=dtype)
        want = x.clone()
        dist.all_reduce(want, group=group)
        got = symm_reduce.all_reduce(x, group)
        assert got is not None and got.shape == x.shape
        err = float((got.float() - want.float()).abs().max())
        assert err <= 1e-2 * float(want.float().abs().max()), (dtype, rows, err)
# captured in a CUDA graph: ten sums in a row on one buffer (each waits for the last one's readers), new inputs
xs = [torch.zeros(8, hidden, device=dev, dtype=torch.bfloat16) for _ in range(10)]
torch.cuda.synchronize()
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    outs = [symm_reduce.all_reduce(x * 1, group) for x in xs]
for trial in range(3):
    for x in xs:
        x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    for x, out in zip(xs, outs):
        want = x.clone()
        dist.all_reduce(want, group=group)
        assert torch.allclose(out.float(), want.float(), atol=1e-2, rtol=1e-2), trial
print("rank", grid.rank, "ok", "multicast" if buf.multicast else "no multicast")
dist.destroy_process_group()
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NVLink peers)")
def test_the_symmetric_memory_all_reduce_sums_like_nccl_on_two_gpus(tmp_path):
    """engine/symm_reduce.py on two GPUs (TP 2, NCCL beside it): every form at its sizes (one-shot up to 256 KiB, then
    the switch's multicast or two-shot), bf16 and fp32, sums what NCCL sums (to 1e-2 of the largest), and ten sums in a
    row captured in a CUDA graph (one buffer, reused) sum new inputs at every replay."""
    _two_gpu_script(tmp_path / "symm_reduce.py", SYMM_REDUCE_ON_TWO_GPUS)
