"""Tensor parallel TP=2 against TP=1 (torchtitan style), on CPU with gloo through torchrun."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from engine.checkpoint import load_pretrained
from tests.engine.hf_models import save_hf_model
from tests.engine.ranks import leave

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tp2_matches_tp1(tmp_path):
    save_hf_model(tmp_path / "ckpt", num_key_value_heads=2)  # vocab 301: rank 1's shards end in padding
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        os.path.join(ROOT, "tests/engine/tp_worker.py"),
        str(tmp_path / "ckpt"),
        str(tmp_path),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tp2 = torch.load(tmp_path / "tp2.pt")

    model = load_pretrained(tmp_path / "ckpt")
    logits = model(tp2["ids"], tp2["mask"])
    logits.float().logsumexp(-1).sum().backward()
    m = tp2["mask"].bool()
    torch.testing.assert_close(tp2["logits"][m], logits.detach()[m], atol=1e-5, rtol=1e-5)
    attn = model.layers[0].self_attn.qkv_proj
    q_rows = attn.local_sizes[0]
    torch.testing.assert_close(tp2["q_proj"], attn.weight[:q_rows].detach())
    # every parameter's grad, TP=2 with and without sequence parallelism (whose norm grads are partial sums)
    for run in ("grads_tp", "grads_sp"):
        grads = load_pretrained(tmp_path / run)
        for (name, p), (name2, g) in zip(model.named_parameters(), grads.named_parameters()):
            assert name == name2
            torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4, msg=f"{run}: {name}")
    # the LM head fused into the log-prob, entropy and PPO kernels, the padding masked out (real_vocab)
    from engine.model import pack_padded
    from tests.engine.tp_worker import fused_head_losses

    model.zero_grad()
    torch.manual_seed(1)
    ids, pos, cu, _ = pack_padded(torch.randint(1, 301, (2, 9)), None)
    fused = fused_head_losses(model, model.hidden_packed(ids, pos, cu))
    fused.pop("total").backward()
    for key, value in fused.items():
        torch.testing.assert_close(tp2[key], value, atol=1e-5, rtol=1e-5, msg=key)
    grads = load_pretrained(tmp_path / "grads_fused")
    for (name, p), (_, g) in zip(model.named_parameters(), grads.named_parameters()):
        torch.testing.assert_close(g, p.grad, atol=5e-5, rtol=1e-4, msg=f"fused: {name}")

    from engine.config import GenerateConfig
    from engine.generate import Generator

    # one process, every prompt admitted at once, read step by step: the same samples as TP=2's scheduling, whether
    # the ranks combined their vocabulary shards' samples (top-k: the floor from each rank's top k) or gathered the
    # logits (top-p)
    gen = Generator(model, block_size=4, num_blocks=32, max_model_len=12, overlap=False)
    for key, params in [
        ("generated", GenerateConfig(temperature=0.9, max_new_tokens=8, seed=3)),
        ("generated_top_p", GenerateConfig(temperature=0.9, top_p=0.8, max_new_tokens=8, seed=4)),
        ("generated_top_k", GenerateConfig(temperature=0.9, top_k=5, max_new_tokens=8, seed=5)),
    ]:
        comps = gen.generate_completions([[5, 9, 13], [7, 3, 22, 41, 8, 2, 19], [11, 4]], params)
        expected = torch.tensor([c.tokens + [-1] * (8 - len(c.tokens)) for c in comps])
        assert torch.equal(tp2[key], expected), key
        logprobs = torch.tensor([lp for c in comps for lp in c.logprobs])
        torch.testing.assert_close(tp2[key + "_logprobs"], logprobs, atol=1e-5, rtol=1e-5)
    assert tp2["mixed_steps"] > 0 and tp2["overlapped_steps"] > 0
    fp8 = Generator(model, block_size=4, num_blocks=32, max_model_len=12, overlap=False, kv_cache_dtype="fp8")
    comps = fp8.generate_completions(
        [[5, 9, 13], [7, 3, 22, 41, 8, 2, 19], [11, 4]], GenerateConfig(temperature=0.9, max_new_tokens=8, seed=3)
    )
    assert torch.equal(tp2["generated_fp8"], torch.tensor([c.tokens + [-1] * (8 - len(c.tokens)) for c in comps]))

    # random weights at TP=2 are TP=1's (tied embeddings or not: the tiny config's, and a score head)
    from engine.model import Transformer

    for head in ("lm", "score"):
        one = Transformer(model.config, head, dtype=torch.bfloat16).init_weights(seed=7)
        two = load_pretrained(tmp_path / f"random_{head}", head=head)
        for (n1, p1), (n2, p2) in zip(one.named_parameters(), two.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2.to(p1.dtype)), f"random {head}: {n1}"

    # gathered from both ranks; in one file (written by rank 0) and in several (written by the two in turn)
    for name in ("saved", "saved_sharded"):
        saved = load_pretrained(tmp_path / name)
        for (n1, p1), (n2, p2) in zip(model.named_parameters(), saved.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2), f"{name}: {n1}"
    files = sorted(p.name for p in (tmp_path / "saved_sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 4
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "saved_sharded")
    torch.testing.assert_close(hf.model.embed_tokens.weight, model.embed_tokens.weight)


def test_process_group_timeout_is_the_runs(monkeypatch):
    """The collectives' timeout reaches init_process_group (torch's 10-minute default would stop a run whose DP
    ranks wait on a long rollout)."""
    import datetime

    import torch.distributed as dist

    from engine import distributed

    seen = {}

    def fake_init(backend, **kw):
        seen.update(kw, backend=backend)
        raise InterruptedError  # stop here: nothing to initialise in this process

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", fake_init)
    with pytest.raises(InterruptedError):
        distributed.init_process_grid(1, backend="gloo", timeout_minutes=77)
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=77)}
    # and the tensor- and data-parallel subgroups get it too (a subgroup does not inherit it: NCCL's 10 minutes)
    groups = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: None)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "new_group", lambda ranks, **kw: groups.append((ranks, kw)) or len(groups))
    grid = distributed.init_process_grid(2, backend="gloo", timeout_minutes=77)
    assert (grid.tp, grid.dp) == (2, 2) and [r for r, _ in groups] == [[0, 1], [2, 3], [0, 2], [1, 3]]
    assert all(kw == {"timeout": datetime.timedelta(minutes=77)} for _, kw in groups)


def test_a_gpu_named_by_index_under_torchrun_must_be_the_ranks(monkeypatch):
    """--device cuda:N puts every rank on GPU N (NCCL fails at the first collective): refused under several
    processes unless N is the rank's LOCAL_RANK; --device cuda takes the LOCAL_RANK's GPU."""
    import torch

    from engine.distributed import ProcessGrid
    from engine.preflight import resolve_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    two = ProcessGrid(rank=1, world_size=2, tp=2, dp=1)
    assert resolve_device("cuda", two) == torch.device("cuda", 1)
    assert resolve_device("cuda:1", two) == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    with pytest.raises(ValueError, match=r"--device cuda:0 under torchrun: each process uses the GPU of its"):
        resolve_device("cuda:0", two)
    assert resolve_device("cuda:0", ProcessGrid()) == torch.device("cuda", 0)  # (one process: any GPU)


def test_small_collective_tensors_go_to_the_ranks_gpu_under_nccl(monkeypatch):
    """NCCL takes no CPU tensor: agree's and the tiny default's small tensors go to this rank's current GPU under it,
    stay on the CPU under gloo."""
    import torch
    import torch.distributed as dist

    from engine.distributed import collective_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device() is None


def test_tensor_parallelism_in_one_process_says_how_to_launch(monkeypatch):
    from engine.distributed import init_process_grid

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"degree 3 needs a multiple of 3 processes, .*torchrun --nproc_per_node 3"):
        init_process_grid(tp=3)
    assert init_process_grid(tp=1).world_size == 1


def test_the_vocab_parallel_embedding_at_its_shards_edges(monkeypatch):
    """The ids either side of each shard's edge (the first id past rank 0's slice is rank 1's): the ranks' partial
    embeddings sum to the whole embedding (built in one process, the all-reduce left to the sum here), a vocabulary
    the degree does not divide too (the last shards end in zero rows of padding, written by the load)."""
    import engine.parallel
    from tests.engine.fake_tp import FakeGroup, fake_tp

    fake_tp(monkeypatch)
    monkeypatch.setattr(engine.parallel, "reduce_from_tp", lambda x, group: x)  # each rank's partial sum
    hidden = 4
    # 10 rows over 2 ranks; 11 over 2 (6 and 5, a row of padding) and over 4 (3, 3, 3 and 2 real rows of 3)
    for vocab, tp, real in ((10, 2, [5, 5]), (11, 2, [6, 5]), (11, 4, [3, 3, 3, 2])):
        full = torch.randn(vocab, hidden)
        ids = torch.tensor([0, 4, 5, 9, 5, 4, vocab - 1, 2, 3, 6, 8, 7])
        total = 0
        for rank in range(tp):
            emb = engine.parallel.VocabParallelEmbedding(vocab, hidden, FakeGroup(tp, rank))
            emb.weight.data.fill_(float("nan"))  # (the load must write the padding too)
            emb.load_part(full)
            assert emb.real_rows == real[rank] and emb.vocab_start == rank * emb.local_vocab
            assert not emb.weight[emb.real_rows :].any()
            total = total + emb(ids)
        torch.testing.assert_close(total, full[ids])


def _raise_together_rank(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from engine.distributed import raise_together
    from engine.errors import InvalidInput

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        raise_together(InvalidInput(f"bad input on rank {rank}") if rank in (1, 2) else None, "testing")
        got = "nothing"
    except Exception as e:
        got = str(e)
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(got)
    leave()


def test_raise_together_names_the_first_failing_rank(tmp_path):
    """Ranks 1 and 2 of 3 fail: rank 0, which reports for the run, names rank 1 and its message; each failing rank
    raises its own error."""
    import torch.multiprocessing as mp

    mp.spawn(_raise_together_rank, args=(3, str(tmp_path / "init"), str(tmp_path)), nprocs=3, join=True)
    got = [(tmp_path / f"rank{r}").read_text() for r in range(3)]
    assert got == ["testing failed on rank 1: bad input on rank 1", "bad input on rank 1", "bad input on rank 2"]


def _together_rank(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from engine.distributed import rank0_together, together
    from engine.errors import InputError, InvalidInput, failed_on, raised_on_every_rank

    def check(fail_on, bug=False, disk=False):
        if rank == fail_on and disk:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if rank == fail_on:
            raise KeyError("a bug") if bug else InvalidInput(f"a bad file on rank {rank}")
        return rank * 10

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    got = [together("checking", check, fail_on=None)]  # (none fails: each rank's own result, no raise)
    try:
        together("checking", check, fail_on=1)
        got.append("nothing")
    except InputError as e:  # (FailedOnAnotherRank on rank 0 is one too: exit code 2, no traceback)
        got.append(f"{type(e).__name__} {failed_on(e)}: {e}")
    try:
        together("checking", check, fail_on=1, bug=True)
    except (KeyError, RuntimeError) as e:  # (a bug: rank 1 raises it as itself, rank 0 is not left waiting)
        got.append(f"{type(e).__name__} {failed_on(e)}: {e}")
    try:
        together("saving", check, fail_on=1, disk=True)
    except OSError as e:  # (a full disk on rank 1: the same errno on rank 0, which run_command reports in one line)
        got.append(f"{type(e).__name__} {e.errno} {failed_on(e)}: {e.strerror}")
    # rank0_together: the check on rank 0 alone (rank 1's would fail, but never runs), its result there, None elsewhere
    got.append(rank0_together("writing", rank, check, fail_on=1))
    try:
        rank0_together("writing", rank, check, fail_on=0, disk=True)
    except OSError as e:  # (rank 0's full disk: rank 1 stops too)
        got.append(f"{type(e).__name__} {e.errno} {failed_on(e)}: {e.strerror}")
    try:  # (every rank's error, the failing rank's own too, is known as raised together, also once wrapped)
        try:
            together("checking", check, fail_on=1, bug=True)
        except (KeyError, RuntimeError) as e:
            raise ValueError("wrapped by a handler") from e
    except ValueError as e:
        got.append(raised_on_every_rank(e) and raised_on_every_rank(e.__cause__))
    got.append(raised_on_every_rank(KeyError("a rank's own error")))
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(repr(got))
    leave()


def test_together_returns_each_ranks_result_or_raises_on_every_rank(tmp_path):
    """together: a check that passes on every rank returns its result on each; an input error on rank 1 alone
    is raised on rank 1 as itself and on rank 0 naming rank 1 and its message (a file on one node's disk only); a bug
    on rank 1 is raised there as itself and on rank 0 as a RuntimeError naming it; a full disk on rank 1 as an OSError
    of its errno on rank 0 too. Rank 0's copies carry the failing rank (failed_on: one line, no traceback of rank
    0's), rank 1's own errors none. rank0_together runs the check on rank 0 alone (its result there, None on rank 1)
    and raises rank 0's full disk on rank 1 too. Every rank's error is known as raised on every rank (the trainer
    completes a checkpoint collectively on it), also through a handler's error raised from it; one of a rank's own
    not."""
    import torch.multiprocessing as mp

    mp.spawn(_together_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    assert got == [
        repr(
            [
                0,
                "FailedOnAnotherRank 1: checking failed on rank 1: a bad file on rank 1",
                "RuntimeError 1: checking failed on rank 1: 'a bug'",
                "OSError 28 1: saving failed on rank 1: No space left on device",
                0,
                "OSError 28 None: No space left on device",
                True,
                False,
            ]
        ),
        repr(
            [
                10,
                "InvalidInput None: a bad file on rank 1",
                "KeyError None: 'a bug'",
                "OSError 28 None: No space left on device",
                None,
                "OSError 28 0: writing failed on rank 0: No space left on device",
                True,
                False,
            ]
        ),
    ]


def test_together_raises_a_fault_of_ours_as_itself_with_its_traceback():
    """One process: a bug leaves together as itself, unwrapped, its traceback reaching the line that raised it."""
    import traceback

    from engine.distributed import together
    from engine.errors import InvalidInput

    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug") as raised:
        together("checking", bug)
    assert traceback.extract_tb(raised.value.__traceback__)[-1].name == "bug"
    with pytest.raises(InvalidInput, match="bad"):
        together("checking", lambda: (_ for _ in ()).throw(InvalidInput("bad")))
    assert together("checking", lambda a, b=0: a + b, 1, b=2) == 3


def test_grid_ranks_are_tensor_parallel_fastest():
    """Global rank = dp_rank * tp + tp_rank, as init_process_grid lays out its groups (a TP group is consecutive
    ranks, a DP group every tp-th) and as the checkpoints number their state files."""
    from engine.distributed import ProcessGrid

    got = [(g.tp_rank, g.dp_rank) for g in (ProcessGrid(rank=r, world_size=6, tp=2, dp=3) for r in range(6))]
    assert got == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]


def test_a_rank_without_an_error_raises_the_kind_of_the_failing_ranks():
    """raise_together's kinds for another rank's error: an input error stays one (FailedOnAnotherRank), a divergence a
    FloatingPointError, anything else a RuntimeError."""
    from engine.distributed import _error_kind
    from engine.errors import FailedOnAnotherRank, InputError, InvalidInput

    assert issubclass(FailedOnAnotherRank, InputError)
    assert _error_kind(InvalidInput("a bad flag")) is FailedOnAnotherRank
    assert _error_kind(FloatingPointError("a NaN loss")) is FloatingPointError
    assert _error_kind(KeyError("a bug")) is RuntimeError
    assert (
        _error_kind(OSError(errno.EIO, "an I/O error")) is OSError and _error_kind(OSError("no errno")) is RuntimeError
    )


def test_a_cpu_run_takes_gloo_whatever_the_machine():
    """--device cpu needs gloo (NCCL, the default where a GPU exists, takes no CPU tensor); a GPU run or no --device
    leaves the choice to init_process_grid."""
    from engine.distributed import backend_for

    assert backend_for("cpu") == backend_for("cpu:0") == "gloo"
    assert backend_for("cuda") is None and backend_for("cuda:1") is None and backend_for(None) is None


def _one_rank_tp_group_rank(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from engine.distributed import init_process_grid
    from kernels.logprob import hidden_logprobs, token_logprobs
    from kernels.ppo_loss import ppo_token_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    grid = init_process_grid(tp=1)  # data parallel only: each rank's TP group holds itself alone
    calls = []
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor"):
        orig = getattr(dist, name)
        setattr(dist, name, lambda *a, _orig=orig, _name=name, **k: calls.append(_name) or _orig(*a, **k))
    torch.manual_seed(rank)
    h, w = torch.randn(37, 16), torch.randn(301, 16) * 2
    t, adv = torch.randint(0, 301, (37,)), torch.randn(37)
    got = {}
    for key, group in (("alone", grid.tp_group), ("none", None)):
        calls.clear()
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp, ent = hidden_logprobs(hh, ww, t, return_entropy=True, group=group)
        (logp.sum() + ent.sum()).backward()
        loss, _ = ppo_token_loss(None, t, logp.detach() - 0.1, adv, torch.ones(37), hidden=hh, weight=ww, group=group)
        loss.backward()
        logits = (h @ w.t()).requires_grad_()
        token_logprobs(logits, t, 0.7, group=group).sum().backward()
        got[key] = {"out": [logp, ent, loss, hh.grad, ww.grad, logits.grad], "calls": list(calls)}
    torch.save(got, os.path.join(out_dir, f"alone{rank}.pt"))
    leave()


def test_a_tp_group_of_one_rank_costs_no_collective(tmp_path):
    """Data parallel without TP: each rank's TP group holds itself alone. The fused log-prob and PPO loss kernels given
    that group make no collective (the vocab-parallel combine, the hidden grad's all-reduce: 3 per training
    micro-batch, 2 per scoring pass) and give one process's numbers bit for bit."""
    import torch.multiprocessing as mp

    mp.spawn(_one_rank_tp_group_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"alone{rank}.pt")
        assert got["alone"]["calls"] == [] and got["none"]["calls"] == []
        for a, b in zip(got["alone"]["out"], got["none"]["out"]):
            assert torch.equal(a, b)


def test_tensor_parallel_groups_across_nodes_are_warned_of(monkeypatch, capsys):
    """Several nodes (LOCAL_WORLD_SIZE below the world): a TP group spans two nodes when the processes per node are
    not a multiple of --tp (every layer's all-reduces then cross the network), warned of once on rank 0; one node, or
    groups within nodes, no warning."""
    import torch.distributed as dist

    from engine import distributed

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: None)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 8)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "new_group", lambda ranks, **kw: None)
    for per_node, tp, warned in ((4, 2, False), (4, 4, False), (8, 8, False), (None, 8, False), (2, 4, True),
                                 (4, 8, True), (3, 2, True), (1, 2, True), (2, 1, False)):  # fmt: skip
        if per_node is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
        distributed.init_process_grid(tp, backend="gloo")
        expected = (
            f"warning: --tp {tp} with {per_node} processes per node: tensor-parallel groups span nodes, and each "
            "layer's all-reduces cross the network between them (slow); launch with --nproc-per-node a multiple of "
            "--tp\n"
        )
        assert capsys.readouterr().out == (expected if warned else ""), (per_node, tp)
