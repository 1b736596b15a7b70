"""Multi-node launches, as a user launches two machines: two torchrun commands (--nnodes 2, --node-rank 0 and 1)
meeting at one master address, here both on localhost (gloo, the naive sampler of ppo_dp_worker.py). Each launch
takes 10 to 25 s on 2 cores."""

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from engine.config import PPOConfig
from engine.output_dir import SHARED_PROBE
from engine.tokenizer import TINY_PROMPTS
from engine.train_ppo import build_tiny_models
from tests.engine.ppo_dp_worker import naive_factory
from tests.engine.ranks import leave
from tests.engine.runs import ROOT, no_timing, run_tiny, small


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(outs, *flags, nproc: int = 1, timeout: float = 120, node_flags=((), ()), node_paths=((), ())):
    """The tiny default under two torchrun "nodes" of `nproc` ranks each, node k writing into outs[k] (the same
    directory for a shared file system, two for node-local disks) with node_flags[k] after `flags` and node_paths[k]
    before the repository on its PYTHONPATH (a sitecustomize.py there, or a module, that node's alone):
    [(returncode, output)] of each node's torchrun."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TULU_SHARED_DIR_WAIT_S="3")  # (not a minute)
    env.pop("TRITON_INTERPRET", None)  # the workers run the CPU reference ops
    port = free_port()
    procs = []
    for node, out in enumerate(outs):
        env["PYTHONPATH"] = os.pathsep.join([*map(str, node_paths[node]), ROOT])
        os.makedirs(out, exist_ok=True)  # (the worker's result file goes there)
        given = [*flags, *node_flags[node]]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port),
               os.path.join(ROOT, "tests/engine/ppo_dp_worker.py"), str(out), "--output-dir", str(out),
               *small(given), "--dist-timeout-minutes", "1", *given]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for p in procs:
            output, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, output))
    finally:
        for p in procs:  # (a node left waiting for the other: not left running)
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def listing(directory: str) -> list[str]:
    """(name, modification time) of what `directory` holds, less the run lock (taken before the check)."""
    names = [n for n in os.listdir(directory) if n != ".run.lock"]
    return sorted((n, os.stat(os.path.join(directory, n)).st_mtime_ns) for n in names)


def histories(out, ranks: int):
    return [no_timing(torch.load(os.path.join(out, f"result-rank{r}.pt"), weights_only=False)["history"])
            for r in range(ranks)]  # fmt: skip


def test_two_nodes_train_save_and_resume_exactly(tmp_path):
    """DP across two nodes: a run stopped after its checkpoint at iteration 2 and resumed on both nodes continues
    exactly as the run that did not stop (every iteration's metrics alike), and the directory keeps no probe file."""
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    for outs, flags in (((whole, whole), ["--max-iterations", "4"]), ((cut, cut), ["--max-iterations", "2"]),
                        ((cut, cut), ["--max-iterations", "4", "--resume"])):  # fmt: skip
        for code, output in two_nodes(outs, "--save-every", "2", *flags):
            assert code == 0, output[-3000:]
    assert histories(whole, 2)[0] == histories(whole, 2)[1]
    resumed = histories(cut, 2)
    assert [m["iteration"] for m in resumed[0]] == [3, 4]
    assert resumed[0] == histories(whole, 2)[0][2:]
    assert not [n for n in os.listdir(cut) if n.startswith(SHARED_PROBE)]


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_an_output_directory_the_nodes_do_not_share_is_refused_before_anything_runs(tmp_path, resume):
    """--output-dir on a node-local disk (modelled by giving each node its own directory): refused on both nodes at
    once, naming the problem, before a model is built or a checkpoint read, rather than found at the first save (a
    rank's state file written into a directory rank 0 never made) or resumed from another checkpoint on each node."""
    a, b = str(tmp_path / "node0"), str(tmp_path / "node1")
    if resume:  # (node 0's directory holds a run's checkpoint, one process's; node 1's none: it would start over)
        run_tiny(a, "--max-iterations", "1", factory=naive_factory)
        before = listing(a)
    for code, output in two_nodes((a, b), *(["--resume"] if resume else [])):
        assert code != 0
        assert f"the output directory {b} is not shared between the nodes: a file global rank 0" in output, output
        assert "not seen by rank 1 (host " in output and ") within 3 s (TULU_SHARED_DIR_WAIT_S)" in output, output
    assert not os.path.exists(os.path.join(b, "init"))  # (the tiny default's models were not built on node 1)
    if resume:
        assert listing(a) == before  # (nothing trimmed, pruned or written)
    else:
        assert listing(a) == []


def test_a_checkpoint_one_node_lacks_stops_both_nodes_at_once_naming_it(tmp_path):
    """--policy on one node's local disk only (modelled by another path on node 1): node 1's refusal reaches node 0,
    which reports it (global rank 0 speaks for the run), rather than node 0 waiting in its next collective for
    --dist-timeout-minutes (an hour by default) or ending in a transport error that names nothing."""
    policy, reward = build_tiny_models(str(tmp_path / "models"))
    missing = str(tmp_path / "node1-disk/policy")
    out = str(tmp_path / "out")
    results = two_nodes((out, out), "--reward", reward, "--prompts", TINY_PROMPTS,
                        node_flags=(("--policy", policy), ("--policy", missing)))  # fmt: skip
    assert all(code != 0 for code, _ in results)
    said = f"error: checking the checkpoints and prompt files failed on rank 1: --policy {missing}: no such directory"
    assert said in results[0][1], results[0][1][-3000:]


def test_other_weights_on_one_node_stop_both_nodes_naming_them(tmp_path):
    """--reward copied to each node's own disk, node 1's copy another model of the same shape (a stale copy): every
    check of shapes passed and each node trained against its own reward model in silence; now the nodes compare their
    copies' fingerprints before any weight is loaded, and both refuse, naming the flag and node 1's rank."""
    from safetensors.torch import load_file, save_file

    policy, reward = build_tiny_models(str(tmp_path / "models"))
    stale = str(tmp_path / "node1-disk/reward")
    shutil.copytree(reward, stale)
    weights = load_file(os.path.join(stale, "model.safetensors"))
    weights["score.weight"] = weights["score.weight"] + 1
    save_file(weights, os.path.join(stale, "model.safetensors"), metadata={"format": "pt"})
    out = str(tmp_path / "out")
    results = two_nodes((out, out), "--policy", policy, "--prompts", TINY_PROMPTS,
                        node_flags=(("--reward", reward), ("--reward", stale)))  # fmt: skip
    assert all(code != 0 for code, _ in results)
    for node, (_, output) in enumerate(results):
        said = f"--reward {(reward, stale)[node]}: the node of rank 1 holds other weights there than rank 0's (a stale"
        assert said in output, output[-3000:]
    # the same weights on both nodes (under their own paths: each node reads its own name, not rank 0's) train
    shutil.copy(os.path.join(reward, "model.safetensors"), os.path.join(stale, "model.safetensors"))
    results = two_nodes((out, out), "--policy", policy, "--prompts", TINY_PROMPTS, "--max-iterations", "1",
                        "--overwrite-output-dir", node_flags=(("--reward", reward), ("--reward", stale)))  # fmt: skip
    assert all(code == 0 for code, _ in results), results[0][1][-3000:]


def test_a_resume_one_node_cannot_read_stops_both_nodes_at_once_naming_it(tmp_path):
    """--resume where one node's `latest` names a checkpoint its disk lacks (a node-local directory, modelled by
    another path on node 1): node 1's refusal reaches node 0 from the first check of a resume, before the output
    directory's own check, rather than node 0 going on alone to its next collective."""
    policy, reward = build_tiny_models(str(tmp_path / "models"))
    a, b = str(tmp_path / "node0"), str(tmp_path / "node1")
    models = ("--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS)
    run_tiny(a, *models, "--max-iterations", "1", factory=naive_factory)  # (a checkpoint: one process's will do)
    os.makedirs(b, exist_ok=True)
    with open(os.path.join(b, "latest"), "w") as f:
        f.write('{"checkpoint": "checkpoint-000001"}')
    results = two_nodes((a, b), *models, "--max-iterations", "2", "--resume")
    assert all(code != 0 for code, _ in results)
    said = f"error: reading the checkpoint to resume failed on rank 1: --resume: {b}/latest names checkpoint-000001"
    assert said in results[0][1], results[0][1][-3000:]


def cut_short(path: str, out: str) -> str:
    """A copy of the file `path` at `out` cut short in its second line (a copy to one node's disk that stopped)."""
    with open(path, "rb") as f:
        data = f.read()
    first = data.index(b"\n") + 1
    with open(out, "wb") as f:
        f.write(data[: first + (data.index(b"\n", first) - first) // 2])
    return out


@pytest.mark.parametrize("eval_only", [False, True], ids=["train", "eval-only"])
def test_a_prompt_file_cut_short_on_one_node_stops_both_nodes_at_once_naming_it(tmp_path, eval_only):
    """--prompts (or --eval-prompts of an --eval-only) copied to each node's own disk, node 1's copy cut short: its
    refusal, as the tokenizer and prompts are read, reaches node 0, which names it, rather than node 0 going on alone
    to the checkpoints' check and waiting there for --dist-timeout-minutes."""
    policy, reward = build_tiny_models(str(tmp_path / "models"))
    bad = cut_short(TINY_PROMPTS, str(tmp_path / "node1-prompts.jsonl"))
    flag = "--eval-prompts" if eval_only else "--prompts"
    out = str(tmp_path / "out")
    models = ("--policy", policy, "--reward", reward) + (("--eval-only",) if eval_only else ("--prompts", TINY_PROMPTS))
    results = two_nodes((out, out), *models, node_flags=((flag, TINY_PROMPTS), (flag, bad)))
    assert all(code != 0 for code, _ in results)
    said = f"error: reading the tokenizer and prompts failed on rank 1: {bad}:2: malformed JSON"
    assert said in results[0][1], results[0][1][-3000:]


def test_a_resume_with_other_prompts_on_one_node_stops_both_nodes_at_once_naming_it(tmp_path):
    """--resume where node 1's --prompts holds other prompts than the checkpoint's run trained on (a copy edited on
    that node alone, as many prompts, two swapped): refused on both nodes before any weight is loaded, by the ranks'
    comparison of the prompts they read (before the prompt order's check, which would refuse on node 1 alone)."""
    policy, reward = build_tiny_models(str(tmp_path / "models"))
    out = str(tmp_path / "out")
    models = ("--policy", policy, "--reward", reward)
    run_tiny(out, *models, "--prompts", TINY_PROMPTS, "--max-iterations", "1", factory=naive_factory)
    with open(TINY_PROMPTS) as f:
        lines = f.read().splitlines(keepends=True)
    other = str(tmp_path / "node1-prompts.jsonl")
    with open(other, "w") as f:  # (the same number of prompts, two swapped)
        f.writelines([lines[1], lines[0], *lines[2:]])
    results = two_nodes((out, out), *models, "--max-iterations", "2", "--resume",
                        node_flags=(("--prompts", TINY_PROMPTS), ("--prompts", other)))  # fmt: skip
    assert all(code != 0 for code, _ in results)
    for node, (_, output) in enumerate(results):
        said = (f"error: --prompts {(TINY_PROMPTS, other)[node]}: rank 1 tokenised other prompts than rank 0 (rank 1's "
                f"{len(lines)} against rank 0's {len(lines)})")  # fmt: skip
        assert said in output, output[-3000:]


def node_site(directory, code: str) -> str:
    """`directory` holding a sitecustomize.py of `code`, run as each Python process of the node whose PYTHONPATH it
    leads starts (two_nodes' node_paths): what that node's own disk does differently."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
        f.write(code)
    return str(directory)


def test_an_evaluated_checkpoint_one_node_cannot_read_stops_both_nodes_at_once_naming_it(tmp_path):
    """--eval-only of a PPO checkpoint's policy whose state file (its hyperparameters, the iteration evaluated) node 1
    cannot read (an I/O error on its disk, or its copy damaged): node 0 names it rather than going on alone to its
    next collective."""
    run = str(tmp_path / "run")
    run_tiny(run, "--max-iterations", "1", "--eval-prompts", "", factory=naive_factory)
    site = node_site(tmp_path / "node1-site", (
        "import errno, os, torch\n"
        "real = torch.load\n"
        "def load(f, *a, **k):\n"
        "    if str(f).endswith('state-rank00000.pt'):\n"
        "        raise OSError(errno.EIO, os.strerror(errno.EIO))\n"
        "    return real(f, *a, **k)\n"
        "torch.load = load\n"
    ))  # fmt: skip
    out, state_file = str(tmp_path / "out"), os.path.join(run, "checkpoint-000001/state-rank00000.pt")
    results = two_nodes((out, out), "--policy", os.path.join(run, "checkpoint-000001/policy"), "--reward",
                        os.path.join(run, "init/reward"), "--eval-only", "--eval-prompts", TINY_PROMPTS,
                        node_paths=((), (site,)))  # fmt: skip
    assert all(code != 0 for code, _ in results)
    said = (f"error: reading the checkpoint's hyperparameters failed on rank 1: cannot read the state file "
            f"{state_file}: Input/output error")  # fmt: skip
    assert said in results[0][1], results[0][1][-3000:]


def test_weights_one_node_cannot_read_stop_both_nodes_at_once_naming_it(tmp_path):
    """An I/O error reading the reward model's weights on node 1 alone (its disk; the files' headers read fine, so
    the checkpoints' check passed): node 0 names it in one line rather than waiting for node 1 in the next model's
    load; the traceback is node 1's, where the error was met (node 0's would show only where it heard of it)."""
    site = node_site(tmp_path / "node1-site", (
        "import errno, os, engine.checkpoint as c\n"
        "real = c._Source.__getitem__\n"
        "def read(self, idx):\n"
        "    if self.sl.get_shape()[0] == 1:  # (the reward model's score.weight: one row)\n"
        "        raise OSError(errno.EIO, os.strerror(errno.EIO))\n"
        "    return real(self, idx)\n"
        "c._Source.__getitem__ = read\n"
    ))  # fmt: skip
    out = str(tmp_path / "out")
    results = two_nodes((out, out), node_paths=((), (site,)))
    assert all(code != 0 for code, _ in results)
    said = "train_ppo.py: error: loading the value model failed on rank 1: Input/output error (rank 1 printed its "
    assert said in results[0][1] and "raise_together" not in results[0][1], results[0][1][-3000:]  # (no frame of ours)
    assert "OSError: [Errno 5] Input/output error" in results[1][1], results[1][1][-3000:]  # (node 1's traceback)


def test_an_evaluation_rank_0_cannot_write_stops_both_nodes_at_once_naming_it(tmp_path):
    """The evaluation before the first iteration, which global rank 0 alone writes (eval.jsonl; a full disk, modelled
    on node 0): every rank stops there, node 1 naming rank 0's error in one line, rather than waiting for rank 0 in the
    first rollout."""
    site = node_site(tmp_path / "node0-site", (
        "import builtins, errno, os\n"
        "real = builtins.open\n"
        "def open_(file, mode='r', *a, **k):\n"
        "    if str(file).endswith('eval.jsonl') and 'a' in mode:\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "    return real(file, mode, *a, **k)\n"
        "builtins.open = open_\n"
    ))  # fmt: skip
    out = str(tmp_path / "out")
    results = two_nodes((out, out), node_paths=((site,), ()))
    assert all(code != 0 for code, _ in results)
    # (node 1's torchrun summary: one line, as node 0's, no traceback of an error that is not node 1's)
    # (the file named on both: the kernel's ENOSPC carries none, engine.durable.append attaches it)
    said = f"error: writing the evaluation failed on rank 0: No space left on device ({out}/eval.jsonl): free space"
    assert said in results[1][1] and "raise_together" not in results[1][1], results[1][1][-3000:]  # (no frame of ours)
    said = f"train_ppo.py: error: No space left on device writing {out}/eval.jsonl: free space"
    assert said in results[0][1], results[0][1][-3000:]


def _one_rank_fails_rank(rank, init_file, check, out_dir):
    """`check` on two gloo ranks where it fails on one alone, then a collective (the next one the run would enter):
    writes what each rank raised."""
    import datetime
    import types

    import torch.distributed as dist

    from engine.distributed import ProcessGrid
    from engine.evaluate import check_resumed_eval
    from engine.preflight import check_memory
    from engine.state import RunConfig, model_loader
    from engine.tracking import Tracker

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=10))  # fmt: skip
    grid = ProcessGrid(rank=rank, world_size=2, tp=1, dp=2)
    said = "none"
    try:
        if check == "device":  # --device cuda:1 on two nodes of one GPU each: LOCAL_RANK 0 on both, say
            torch.cuda.is_available = lambda: True
            torch.cuda.set_device = lambda device: None
            os.environ["LOCAL_RANK"] = str(rank)
            model_loader(RunConfig(device="cuda:1"), grid)
        elif check == "memory":  # the memory plan on a GPU where node 1 lacks the policy's directory
            torch.cuda.mem_get_info = lambda device=None: (80 * 2**30, 80 * 2**30)
            policy = "tiny" if rank == 0 else os.path.join(out_dir, "node1-disk/policy")
            check_memory(PPOConfig(), RunConfig(policy=policy, reward="tiny"), grid, torch.device("cuda", 0))
        elif check == "metrics":  # an iteration's metrics that rank 0, their only writer, cannot append (a full disk)
            import collections

            from engine.tracking import log_metrics

            os.makedirs(os.path.join(out_dir, "metrics.jsonl"), exist_ok=True)  # (a directory of that name, say)
            state = types.SimpleNamespace(history=[], grid=grid, tracker=None, cfg=PPOConfig(), iteration=1,
                                          iterations=2, run=RunConfig(output_dir=out_dir))  # fmt: skip
            log_metrics(state, collections.defaultdict(float, iteration=1, step=2), per_iteration=1.0)
        elif check == "eval-log":  # a resumed run's eval.jsonl that rank 0, its only reader, cannot read
            os.makedirs(os.path.join(out_dir, "eval.jsonl"), exist_ok=True)  # (a directory of that name, say)
            run = RunConfig(output_dir=out_dir)
            check_resumed_eval(types.SimpleNamespace(eval_prompts=object(), iteration=3, grid=grid, run=run))
        else:  # W&B refuses rank 0's key (its node's own ~/.netrc, say)
            wandb = types.ModuleType("wandb")
            wandb.errors = types.SimpleNamespace(Error=type("Error", (Exception,), {}))

            def init(**kw):
                raise wandb.errors.Error("api_key not valid")

            wandb.init = init
            sys.modules["wandb"] = wandb
            run = RunConfig(output_dir=out_dir, wandb_project="p")
            Tracker(types.SimpleNamespace(run=run, grid=grid, cfg=PPOConfig(), iteration=0))
        dist.barrier()
    except Exception as e:
        said = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(said)
    leave()


@pytest.mark.parametrize("check", ["device", "memory", "tracker", "eval-log", "metrics"])
def test_a_check_of_one_rank_alone_stops_every_rank_naming_it(tmp_path, check):
    """--device cuda:N refused on the ranks whose LOCAL_RANK is not N, a checkpoint one node lacks in the memory plan
    (a GPU's: on a CPU no plan is made), W&B failing to start on global rank 0 (the only rank that starts it), a
    resumed run's eval.jsonl rank 0 cannot read, an iteration's metrics rank 0 cannot write: every rank raises at
    once, the others naming the rank that failed, none waits in the next collective."""
    import torch.multiprocessing as mp

    mp.spawn(_one_rank_fails_rank, args=(str(tmp_path / "init"), check, str(tmp_path)), nprocs=2, join=True)
    said = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    if check == "device":
        assert said[0].startswith("InvalidInput: --device cuda:1 under torchrun: each process uses the GPU"), said
        assert said[1].startswith("FailedOnAnotherRank: choosing the device failed on rank 0: --device cuda:1"), said
    elif check == "memory":
        assert said[0] == f"FailedOnAnotherRank: planning memory failed on rank 1: {said[1][14:]}", said
        assert said[1].startswith(f"MissingInput: checkpoint directory {tmp_path}/node1-disk/policy does not"), said
    elif check == "metrics":
        assert said[0] == f"IsADirectoryError: [Errno 21] Is a directory: '{tmp_path}/metrics.jsonl'", said
        message = f"logging the iteration's metrics failed on rank 0: Is a directory ({tmp_path}/metrics.jsonl)"
        assert said[1] == f"IsADirectoryError: [Errno 21] {message}", said
    elif check == "eval-log":
        assert said[0].startswith(f"IsADirectoryError: [Errno 21] Is a directory: '{tmp_path}/eval.jsonl'"), said
        message = f"reading eval.jsonl failed on rank 0: Is a directory ({tmp_path}/eval.jsonl)"
        assert said[1] == f"IsADirectoryError: [Errno 21] {message}", said
    else:
        assert said[0] == "InvalidInput: --wandb-project p: W&B could not start the run: api_key not valid", said
        assert said[1] == f"FailedOnAnotherRank: starting the trackers failed on rank 0: {said[0][14:]}", said


def _check_shared_rank(rank, world, init_file, dirs, out_dir):
    import uuid

    import torch.distributed as dist

    from engine import output_dir

    made = []
    real = uuid.uuid4
    uuid.uuid4 = lambda: made.append(1) or real()  # (rank 0 draws one token per check it runs)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for d in dirs:
        output_dir.check_shared(d, rank)
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(repr(len(made)))
    leave()


def test_the_shared_directory_check_runs_once_per_directory(tmp_path):
    """check_shared on the same directory again (the tiny default checks its output directory before setup does):
    one probe and one wait, not two; another directory is checked in its turn; no probe is left behind."""
    import torch.multiprocessing as mp

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    dirs = [str(a), str(a), str(b), str(a)]
    mp.spawn(_check_shared_rank, args=(2, str(tmp_path / "init"), dirs, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text() == repr(2)
    assert (tmp_path / "rank1").read_text() == repr(0)
    assert os.listdir(a) == os.listdir(b) == []  # (read here, after both ranks ended: rank 0 removes each probe last)


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", "1e999"])
def test_a_bad_shared_directory_wait_is_named(monkeypatch, value):
    from engine.errors import InvalidInput
    from engine.output_dir import shared_wait_s

    monkeypatch.setenv("TULU_SHARED_DIR_WAIT_S", value)
    with pytest.raises(InvalidInput, match=rf"TULU_SHARED_DIR_WAIT_S='{re.escape(value)}': not a number of seconds"):
        shared_wait_s()


def test_the_shared_directory_wait_is_a_minute_unless_set(monkeypatch):
    from engine.output_dir import shared_wait_s

    monkeypatch.delenv("TULU_SHARED_DIR_WAIT_S", raising=False)
    assert shared_wait_s() == 60
    monkeypatch.setenv("TULU_SHARED_DIR_WAIT_S", " 2.5 ")
    assert shared_wait_s() == 2.5
    monkeypatch.setenv("TULU_SHARED_DIR_WAIT_S", "0")
    assert shared_wait_s() == 0
