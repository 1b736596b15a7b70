"""Run under torchrun (gloo, CPU): the model with TP=2 (sequence parallel or not) must match TP=1 in logits,
gradients and saving; the test's vocabulary (301) is odd, so rank 1's shards end in a row of padding.

python -m torch.distributed.run --nproc_per_node 2 tests/engine/tp_worker.py CKPT OUT
"""

import sys
import warnings

import torch
import torch.distributed as dist

from engine.checkpoint import load_pretrained, save_pretrained
from engine.distributed import init_process_grid
from kernels import dispatch
from tests.engine.ranks import leave
from tests.interpreter_fixes import fix_interpreter

fix_interpreter()  # as in the pytest process this is compared with


def main(ckpt: str, out: str) -> None:
    grid = init_process_grid(tp=2)
    _gathered_linear_matches(grid)
    _async_tp_matches(grid)
    torch.manual_seed(0)
    ids = torch.randint(1, 301, (3, 7))
    ids[1, 3] = 300  # the last token: rank 1's last real row, before its padding
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    mask[2, 5:] = 0  # a right-padded row
    # 17 tokens: sequence parallelism pads them to 18 with a dummy sequence
    plain = load_pretrained(ckpt, group=grid.tp_group, sequence_parallel=False)
    assert not plain.sequence_parallel and plain.tp_partial_grads() == []
    # 301 rows: 151 a rank, rank 1's last one padding, zero in the weights (and in their grads below)
    assert plain.embed_tokens.weight.shape[0] == 151 and plain.real_vocab == [None, 150][grid.rank]
    for w in (plain.embed_tokens.weight, plain.lm_head.weight):
        assert not w[151 if grid.rank == 0 else 150 :].any()
    _save_grads(plain, out + "/grads_tp", plain(ids, mask).float().logsumexp(-1).sum())
    model = load_pretrained(ckpt, group=grid.tp_group)  # sequence parallel: the default under TP
    assert model.sequence_parallel and len(model.tp_partial_grads()) == 2 * len(model.layers) + 1
    # the recompute planner's probe of one layer runs through the collectives of either layout; sequence parallelism
    # keeps the norms' and the residual's activations for this rank's half of the tokens only
    from engine.recompute import layer_activation_bytes

    sp_bytes, plain_bytes = layer_activation_bytes(model, 63), layer_activation_bytes(plain, 63)
    assert 0 < sp_bytes < plain_bytes, (sp_bytes, plain_bytes)
    model.activation_checkpointing = True  # the recompute goes through the same collectives
    from engine.recompute import mlp_recompute

    mlp_recompute(model, True)  # (and the MLPs' activations recomputed: their projection's reduce-scatter after it)
    logits = model(ids, mask)  # gathered over the vocabulary
    _save_grads(model, out + "/grads_sp", logits.float().logsumexp(-1).sum())
    logits = logits.detach()
    fused = _fused_head_losses(model)
    _save_grads(model, out + "/grads_fused", fused.pop("total"))
    grads = {"q_proj": model.layers[0].self_attn.qkv_proj.full_part(0)}  # weights, gathered
    try:  # generation's layout with autograd on would leave whole norm grads that the optimizer sums as partial
        model.hidden_packed(ids[0], torch.arange(7), None, sequence_parallel=False)
        raise AssertionError("a sequence-parallel model ran the replicated layout with autograd")
    except ValueError as e:
        assert "without autograd" in str(e)
    # fewer tokens than ranks (one token: a rank holds only the dummy), and a sequence-less call (one sequence)
    with torch.no_grad():
        for n, cu in ((1, torch.tensor([0, 1], dtype=torch.int32)), (5, None)):
            one, pos = torch.tensor([7, 3, 22, 41, 8][:n]), torch.arange(n)
            torch.testing.assert_close(
                model.forward_packed(one, pos, cu),
                plain.forward_packed(one, pos, torch.tensor([0, n], dtype=torch.int32)),
                atol=1e-5,
                rtol=1e-5,
            )
    save_pretrained(model, out + "/saved")
    from engine.model import Transformer

    for head in ("lm", "score"):  # random weights: each rank its shard of the tensors one process draws
        random = Transformer(plain.config, head, group=grid.tp_group, dtype=torch.bfloat16).init_weights(seed=7)
        save_pretrained(random, f"{out}/random_{head}")
    save_pretrained(model, out + "/saved_sharded", max_shard_bytes=40_000)  # files written by both ranks
    import engine.checkpoint as ckpt

    # a disk error on one rank, writing its files (rank 1) or the index (rank 0): every rank raises (none waits in
    # a collective), and nothing is left behind
    for fn, bad_rank in (("save_file", 1), ("_write_json", 0)):
        real = getattr(ckpt, fn)
        if grid.rank == bad_rank:
            setattr(ckpt, fn, lambda *a, **k: (_ for _ in ()).throw(OSError(f"disk full on rank {grid.rank}")))
        try:
            save_pretrained(model, out + "/saved_sharded", max_shard_bytes=40_000)
            raise AssertionError("a failed save did not raise")
        except (OSError, RuntimeError) as e:
            expected = f"disk full on rank {bad_rank}" if grid.rank == bad_rank else f"failed on rank {bad_rank}"
            assert expected in str(e)
        setattr(ckpt, fn, real)
    from engine.distributed import raise_together
    from engine.errors import FailedOnAnotherRank, InvalidInput

    # the ranks without an error raise the kind of the failing rank's: an input error, a divergence, anything else
    for made, kind in ((InvalidInput("a bad flag"), FailedOnAnotherRank), (FloatingPointError("a NaN loss"),
                       FloatingPointError), (KeyError("a bug"), RuntimeError)):  # fmt: skip
        try:
            raise_together(made if grid.rank == 1 else None, "testing")
            raise AssertionError("raise_together raised nothing")
        except Exception as e:
            if grid.rank == 1:
                assert e is made, e
            else:
                assert type(e) is kind and str(e) == f"testing failed on rank 1: {made}", (type(e), e)
    # generation on the TP-sharded weights: every rank runs the same schedule and samples the same tokens
    from engine.config import GenerateConfig
    from engine.generate import Generator

    # two slots for three prompts, the second capped by max_model_len (5 new tokens): the third is admitted
    # while the first still runs (a mixed step), every step launched ahead of the host, on every rank alike
    gen = Generator(model, block_size=4, num_blocks=32, max_model_len=12, max_num_seqs=2)
    prompts = [[5, 9, 13], [7, 3, 22, 41, 8, 2, 19], [11, 4]]
    # each rank samples its vocabulary shard and the ranks combine (no top-k/p), or the logits are gathered (top-p)
    for key, params in [
        ("generated", GenerateConfig(temperature=0.9, max_new_tokens=8, seed=3)),
        ("generated_top_p", GenerateConfig(temperature=0.9, top_p=0.8, max_new_tokens=8, seed=4)),
        ("generated_top_k", GenerateConfig(temperature=0.9, top_k=5, max_new_tokens=8, seed=5)),
    ]:
        generated = gen.generate_completions(prompts, params)
        grads["mixed_steps"] = gen.stats.mixed_steps
        grads["overlapped_steps"] = gen.stats.overlapped_steps
        tokens = torch.tensor([c.tokens + [-1] * (8 - len(c.tokens)) for c in generated])
        everyone = [torch.empty_like(tokens) for _ in range(2)]
        dist.all_gather(everyone, tokens, group=model.group)
        assert torch.equal(everyone[0], everyone[1]), "TP ranks sampled different tokens"
        grads[key] = tokens
        grads[key + "_logprobs"] = torch.tensor([lp for c in generated for lp in c.logprobs])
    # the decode steps through kernels/decode_linear.py (decode_config's linear 1; two sequences at most, so under TP
    # each layer's norms run in its projections' prologues on the all-reduced outputs): the same samples
    from kernels.decode_config import set_decode_config

    set_decode_config(linear=1)
    try:
        again = gen.generate_completions(prompts, GenerateConfig(temperature=0.9, max_new_tokens=8, seed=3))
    finally:
        set_decode_config()
    tokens = torch.tensor([c.tokens + [-1] * (8 - len(c.tokens)) for c in again])
    assert torch.equal(tokens, grads["generated"]), ("decode_linear's TP decode steps sampled other tokens", tokens)
    # an fp8 KV cache holding each rank's heads
    fp8 = Generator(model, block_size=4, num_blocks=32, max_model_len=12, max_num_seqs=2, kv_cache_dtype="fp8")
    generated = fp8.generate_completions(prompts, GenerateConfig(temperature=0.9, max_new_tokens=8, seed=3))
    grads["generated_fp8"] = torch.tensor([c.tokens + [-1] * (8 - len(c.tokens)) for c in generated])
    # what the ranks agree on beyond the kernels' TP paths above (a seed drawn together, caches sized alike, decode
    # graphs captured alike, the symmetric-memory sums) on the reference ops: a generation there takes milliseconds,
    # one in Triton's interpreter seconds. Their tokens and log-probs to match are those of a reference run
    with dispatch.reference_ops():
        ref = gen.generate_completions(prompts, GenerateConfig(temperature=0.9, max_new_tokens=8, seed=3))
        ref_tokens = torch.tensor([c.tokens + [-1] * (8 - len(c.tokens)) for c in ref])
        ref_logprobs = torch.tensor([lp for c in ref for lp in c.logprobs])
        # no seed given, and each rank's own RNG elsewhere: the ranks draw one seed (top-p gathers the logits and
        # every rank samples them: with seeds of their own they would feed their shards different tokens)
        torch.manual_seed(100 + grid.rank)
        unseeded = gen.generate_completions(prompts, GenerateConfig(temperature=0.9, top_p=0.8, max_new_tokens=8))
        tokens = torch.tensor([c.tokens + [-1] * (8 - len(c.tokens)) for c in unseeded])
        everyone = [torch.empty_like(tokens) for _ in range(2)]
        dist.all_gather(everyone, tokens, group=model.group)
        assert torch.equal(everyone[0], everyone[1]), "TP ranks sampled different tokens without a seed"
        # ranks that measure different memory still size the cache alike (the smallest), or they would schedule
        # apart
        from engine.kv_cache import bytes_per_block

        per_block = bytes_per_block(model.config.num_layers, 4, model.config.num_kv_heads // 2, model.config.head_dim,
                                    torch.float32)  # fmt: skip
        uneven = Generator(model, block_size=4, kv_cache_bytes=(9 + 4 * grid.rank) * per_block, max_model_len=12)
        uneven.generate_completions(prompts, GenerateConfig(temperature=0.9, max_new_tokens=8, seed=3))
        blocks = torch.tensor([uneven.pool.num_blocks])
        everyone = [torch.empty_like(blocks) for _ in range(2)]
        dist.all_gather(everyone, blocks, group=model.group)
        assert [int(b) for b in everyone] == [9, 9], everyone
        _graphs_agree_across_ranks(model, grid, prompts, ref_tokens)
        _symm_reduce_matches(model, grid, prompts, ref_tokens, ref_logprobs)
    if grid.rank == 0:
        torch.save({"ids": ids, "mask": mask, "logits": logits, **fused, **grads}, out + "/tp2.pt")
    leave()


def _gathered_linear_matches(grid) -> None:
    """A column-parallel layer under sequence parallelism (engine.parallel._GatheredLinear, SP_OVERLAP) against
    gather_tokens then linear (SP_OVERLAP off): the same output, x grad and weight grad to the bit (to autograd, and
    into an fp32 sum as engine.grad_sums makes it), half the input kept for the backward (this rank's tokens, not
    both ranks'), and the backward's two collectives launched asynchronously, the gather before the reduce-scatter."""
    from engine import grad_sums, parallel
    from engine.parallel import ColumnParallelLinear

    torch.manual_seed(3)
    layer = ColumnParallelLinear(24, [40], grid.tp_group, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_()
    torch.manual_seed(10 + grid.rank)
    x0, dy = torch.randn(7, 24).to(torch.bfloat16), torch.randn(14, 20).to(torch.bfloat16)
    calls = []

    def logged(name, fn):
        def call(*args, async_op=False, **kwargs):
            calls.append((name, async_op))
            return fn(*args, async_op=async_op, **kwargs)

        return call

    real = parallel.all_gather_single, parallel.reduce_scatter_single
    parallel.all_gather_single = logged("gather", real[0])
    parallel.reduce_scatter_single = logged("scatter", real[1])
    got = {}
    try:
        for overlap in (False, True):
            parallel.SP_OVERLAP = overlap
            for into in (False, True):
                acc = torch.full((20, 24), 0.5)
                layer.weight.grad_sum = (lambda acc=acc: acc) if into else None
                x = x0.clone().requires_grad_()
                saved = []
                calls.clear()
                keep = torch.autograd.graph.saved_tensors_hooks(
                    lambda t, s=saved: s.append(t.numel()) or t, lambda t: t
                )
                with grad_sums.into_sums(), keep:
                    y = layer(x, sequence_parallel=True)
                forward_calls = list(calls)
                y.backward(dy)
                grad = acc if into else layer.weight.grad
                got[overlap, into] = (y.detach(), x.grad, grad, sum(saved), forward_calls, calls[len(forward_calls) :])
                layer.weight.grad = None
    finally:
        parallel.all_gather_single, parallel.reduce_scatter_single = real
        parallel.SP_OVERLAP = True
        layer.weight.grad_sum = None
    for into in (False, True):
        old, new = got[False, into], got[True, into]
        for a, b, what in zip(old[:3], new[:3], ("output", "x grad", "weight grad")):
            assert torch.equal(a, b), (into, what, (a.float() - b.float()).abs().max())
        assert new[3] == old[3] - 7 * 24, (old[3], new[3])  # (x kept: this rank's 7 tokens, not all 14)
        assert old[4] == new[4] == [("gather", False)], (old[4], new[4])
        assert old[5] == [("scatter", False)] and new[5] == [("gather", True), ("scatter", True)], (old[5], new[5])


def _async_tp_matches(grid) -> None:
    """engine.parallel's async TP (ASYNC_TP: torch's fused all-gather + GEMM and GEMM + reduce-scatter, CUDA only),
    wired here to torch's own reference forms of the two ops (their _fused_*_fallback: the same products by plain
    functional collectives): a column- and a row-parallel layer under sequence parallelism give the plain path's
    outputs, x grads and weight grads (to autograd and into an fp32 sum), with and without autograd, and both fused
    ops are used (the row-parallel layer's backward gathering dy by the fused all-gather + GEMM)."""
    import torch.distributed._symmetric_memory as symm

    from engine import grad_sums, parallel
    from engine.parallel import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(3)
    col = ColumnParallelLinear(24, [40], grid.tp_group, dtype=torch.float32)
    row = RowParallelLinear(40, 24, grid.tp_group, dtype=torch.float32)
    with torch.no_grad():
        col.weight.normal_()
        row.weight.normal_()
    torch.manual_seed(10 + grid.rank)
    x0, dy = torch.randn(7, 24), torch.randn(7, 24)
    used = []

    def ag_mm(x, b, group, keep=False):
        used.append(("ag_mm", keep))
        gathered, (y,) = symm._fused_all_gather_matmul_fallback(x, [b], 0, group.group_name, return_A=keep)
        return gathered, y

    def mm_rs(x, b, group):
        used.append(("mm_rs", False))
        return symm._fused_matmul_reduce_scatter_fallback(x, b, "sum", 0, group.group_name)

    real = parallel._async_tp, parallel._ag_mm, parallel._mm_rs
    got = {}
    try:
        for fused in (False, True):
            parallel._async_tp = (lambda x: True) if fused else (lambda x: False)
            parallel._ag_mm, parallel._mm_rs = (ag_mm, mm_rs) if fused else real[1:]
            for into in (False, True):
                accs = {m: torch.full(m.weight.shape, 0.5) for m in (col, row)}
                for m in (col, row):
                    m.weight.grad_sum = (lambda acc=accs[m]: acc) if into else None
                x = x0.clone().requires_grad_()
                used.clear()
                with grad_sums.into_sums():
                    y = row(torch.nn.functional.silu(col(x, sequence_parallel=True)), sequence_parallel=True)
                y.backward(dy)
                grads = [accs[m] if into else m.weight.grad for m in (col, row)]
                with torch.no_grad():
                    plain = row(torch.nn.functional.silu(col(x0, sequence_parallel=True)), sequence_parallel=True)
                got[fused, into] = (y.detach(), x.grad, *grads, plain, list(used))
                for m in (col, row):
                    m.weight.grad = None
    finally:
        parallel._async_tp, parallel._ag_mm, parallel._mm_rs = real
        for m in (col, row):
            m.weight.grad_sum = None
    for into in (False, True):
        old, new = got[False, into], got[True, into]
        for a, b, what in zip(
            old[:5], new[:5], ("output", "x grad", "column weight grad", "row weight grad", "no grad")
        ):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"{what} (into a sum: {into})")
        assert old[5] == [], old[5]
        # forward: the column layer's fused all-gather + GEMM, the row layer's GEMM + reduce-scatter; backward: the row
        # layer's dy gathered by the fused op (kept for its weight grad); no grad: the two fused ops again
        assert new[5] == [("ag_mm", False), ("mm_rs", False), ("ag_mm", True), ("ag_mm", False), ("mm_rs", False)], new[
            5
        ]


def _symm_reduce_matches(model, grid, prompts, tokens, logprobs) -> None:
    """engine/symm_reduce.py (TULU_SYMM_ALL_REDUCE: TP's small sums through a symmetric-memory buffer, CUDA only)
    wired here to gloo: its buffer a CPU tensor, torch's three symm_mem forms each its copy into the buffer, an
    all-reduce of the buffer and the copy out (two ranks' fp32 sums: NCCL's bits). The generator makes the buffer for
    its largest decode step, its decode steps' sums take it (the same tokens and log-probs), a larger sum takes NCCL;
    each form is chosen at its sizes; a rank that cannot make the buffer leaves both on NCCL with a warning."""
    from engine import symm_reduce
    from engine.config import GenerateConfig
    from engine.generate import Generator

    group, used = model.group, []

    def alloc(nbytes, device):
        used.append(("alloc", nbytes))
        if fail_on == grid.rank:
            raise RuntimeError("no peer access")
        return torch.zeros(nbytes, dtype=torch.uint8, device=device)

    def form(kind):
        def run(buf, *args):
            out = args[-1]
            if kind == "one_shot":  # (its copy into the buffer inside the op)
                buf.copy_(args[0])
            dist.all_reduce(buf, group=group)
            out.copy_(buf)
            used.append((kind, buf.numel() * buf.element_size()))

        return run

    saved = dict(symm_reduce.OPS), symm_reduce.SYMM_ALL_REDUCE, symm_reduce.DEVICES, symm_reduce.ONE_SHOT_BYTES
    multicast, fail_on = False, None
    symm_reduce.OPS.update(alloc=alloc, rendezvous=lambda t, g: multicast,
                           **{k: form(k) for k in ("one_shot", "multimem", "two_shot")})  # fmt: skip
    symm_reduce.SYMM_ALL_REDUCE, symm_reduce.DEVICES = True, {"cuda", "cpu"}
    try:
        gen = Generator(model, block_size=4, num_blocks=32, max_model_len=12, max_num_seqs=2)
        again = gen.generate_completions(prompts, GenerateConfig(temperature=0.9, max_new_tokens=8, seed=3))
        hidden = model.config.hidden_size
        assert used[0] == ("alloc", 2 * hidden * 4), used[:3]  # (two decode rows of fp32 at most)
        assert ("one_shot", 2 * hidden * 4) in used and ("one_shot", hidden * 4) in used, sorted(set(used))
        assert torch.equal(torch.tensor([c.tokens + [-1] * (8 - len(c.tokens)) for c in again]), tokens)
        assert torch.equal(torch.tensor([lp for c in again for lp in c.logprobs]), logprobs)
        # each form at its sizes: one-shot up to ONE_SHOT_BYTES, then two-shot (multicast: the switch's), NCCL for
        # what the buffer does not take (larger, fp16, a size not a multiple of 16 bytes)
        symm_reduce.ONE_SHOT_BYTES = 64
        x = torch.arange(2 * hidden, dtype=torch.float32) * (grid.rank + 1)
        for multicast in (False, True):
            symm_reduce.release()
            symm_reduce.prepare(group, x.device, 8 * hidden)
            for n, kind in ((16, "one_shot"), (2 * hidden, "multimem" if multicast else "two_shot")):
                del used[:]
                summed = symm_reduce.all_reduce(x[:n], group)
                assert torch.equal(summed, x[:n] * 3 / (grid.rank + 1)) and used == [(kind, 4 * n)], (kind, used)
        for bad in (torch.zeros(2 * hidden + 4), torch.zeros(16, dtype=torch.float16), torch.zeros(3)):
            assert symm_reduce.all_reduce(bad, group) is None
        said = symm_reduce.describe(group)  # (the rollout bench's header and JSON)
        assert (
            said == f"symmetric memory up to {8 * hidden} bytes (one-shot up to 64, then the switch's multicast), "
            "NCCL above"
        ), said
        # a rank that cannot allocate: every rank warns and keeps NCCL
        symm_reduce.release()
        fail_on = 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert symm_reduce.prepare(group, x.device, 64) is None
        assert any("stay NCCL's" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert symm_reduce.all_reduce(x[:16], group) is None
        assert symm_reduce.describe(group) == "gloo (the symmetric-memory buffer could not be made)"
    finally:
        symm_reduce.release()
        symm_reduce.OPS.update(saved[0])
        symm_reduce.SYMM_ALL_REDUCE, symm_reduce.DEVICES, symm_reduce.ONE_SHOT_BYTES = saved[1:]


def _graphs_agree_across_ranks(model, grid, prompts, expected):
    """Decode graphs under TP (captures stood in for on CPU by an eager re-run, as in test_generate): a rank
    whose graphs went stale makes every rank capture again, and a capture failing on one rank sends every rank
    to eager decoding, with the same tokens in each case."""
    import engine.generate as generate
    from engine.config import GenerateConfig
    from engine.model import attention_context

    real = generate.DecodeGraphs
    fail = {"on": False}

    class EagerGraphs(real):
        def _capture_one(self, b, mempool):
            out = self._forward(b)  # the stand-in runs the collectives a real capture records
            if fail["on"] and grid.rank == 1 and b == 1:
                raise RuntimeError("capture failed on rank 1")

            def replay():
                with attention_context(self.context(b)):
                    out.copy_(self._forward(b))

            return replay, out

    generate.DecodeGraphs = EagerGraphs
    params = GenerateConfig(temperature=0.9, max_new_tokens=8, seed=3)
    gen = generate.Generator(model, block_size=4, num_blocks=32, max_model_len=12, max_num_seqs=2,
                             use_cuda_graphs=True)  # fmt: skip

    def run():
        comps = gen.generate_completions(prompts, params)
        assert torch.equal(torch.tensor([c.tokens + [-1] * (8 - len(c.tokens)) for c in comps]), expected)
        captures = torch.tensor([gen.stats.graph_captures, int(gen.use_cuda_graphs)])
        everyone = [torch.empty_like(captures) for _ in range(2)]
        dist.all_gather(everyone, captures, group=model.group)
        assert torch.equal(everyone[0], everyone[1]), everyone
        return captures.tolist()

    assert run() == [2, 1]  # buckets 2 and 1 captured
    assert run() == [0, 1]  # replayed on both ranks
    if grid.rank == 1:  # as if rank 1's cache had come back at another address after a release
        gen._graphs.key = ("moved",)
    assert run() == [2, 1]  # captured again on both
    gen.release(drop_graphs=True)
    fail["on"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run() == [0, 0]  # failed on rank 1, after bucket 2 was captured: eager on both
    generate.DecodeGraphs = real


def fused_head_inputs(n: int):
    """What _fused_head_losses feeds the fused LM-head kernels besides the hidden states (the test's TP 1 too)."""
    g = torch.Generator().manual_seed(5)
    targets = torch.randint(0, 301, (n,), generator=g)
    targets[0] = 300  # the last real token, next to rank 1's padding
    return targets, torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)


def fused_head_losses(model, hidden, group=None, real_vocab=None) -> dict:
    """Log-probs and entropy (hidden_logprobs) and the fused PPO loss of `hidden` through the model's LM head, and
    one loss of all three."""
    from kernels.logprob import hidden_logprobs
    from kernels.ppo_loss import ppo_token_loss

    targets, g_lp, old, adv = fused_head_inputs(hidden.shape[0])
    w, kw = model.lm_head_weight, {"group": group, "real_vocab": real_vocab}
    lp, ent = hidden_logprobs(hidden, w, targets, 0.8, return_entropy=True, **kw)
    ppo, _ = ppo_token_loss(None, targets, old - 4, adv, torch.ones_like(adv), hidden=hidden, weight=w,
                            entropy_coef=0.01, **kw)  # fmt: skip
    return {"fused_lp": lp.detach(), "fused_ent": ent.detach(), "fused_ppo": ppo.detach(),
            "total": (lp * g_lp).sum() + 0.3 * ent.sum() + ppo}  # fmt: skip


def _fused_head_losses(model) -> dict:
    """fused_head_losses under TP (the vocabulary padding masked by real_vocab), on sequence-parallel hidden states."""
    from engine.model import pack_padded

    torch.manual_seed(1)
    ids, pos, cu, _ = pack_padded(torch.randint(1, 301, (2, 9)), None)
    hidden = model.hidden_packed(ids, pos, cu)
    return fused_head_losses(model, hidden, model.group, model.real_vocab)


def _save_grads(model, path, loss):
    """Backward of `loss`; every parameter's grad (the sequence-parallel partial ones summed over the group, as the
    optimizer does) saved as a checkpoint in the HF layout, gathered from the shards by the same code that saves
    weights. The padding of rank 1's vocabulary shards gets no grad."""
    loss.backward()
    if model.real_vocab is not None:
        for w in (model.embed_tokens.weight, model.lm_head.weight):
            assert not w.grad[model.real_vocab :].any(), "a grad reached the vocabulary's padding"
    for p in model.tp_partial_grads():
        dist.all_reduce(p.grad, group=model.group)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
            p.grad = None
        save_pretrained(model, path)
        for name, p in model.named_parameters():
            p.copy_(weights[name])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
