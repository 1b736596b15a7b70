"""Multi-node launches, as a user launches two machines: two torchrun commands (--nnodes 2, --node-rank 0 and 1)
meeting at one master address, here both on localhost (gloo, the naive sampler of ppo_dp_worker.py). Each launch
takes 10 to 25 s on 2 cores."""

import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from engine.resume import SHARED_PROBE
from engine.tokenizer import TINY_PROMPTS
from engine.train_ppo import build_tiny_models
from tests.engine.runs import ROOT, SMALL, no_timing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(outs, *flags, nproc: int = 1, timeout: float = 120, node_flags=((), ())):
    """The tiny default under two torchrun "nodes" of `nproc` ranks each, node k writing into outs[k] (the same
    directory for a shared file system, two for node-local disks) with node_flags[k] after `flags`:
    [(returncode, output)] of each node's torchrun."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TULU_SHARED_DIR_WAIT_S="3")  # (not a minute)
    env.pop("TRITON_INTERPRET", None)  # the workers run the CPU reference ops
    port = free_port()
    procs = []
    for node, out in enumerate(outs):
        os.makedirs(out, exist_ok=True)  # (the worker's result file goes there)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port),
               os.path.join(ROOT, "tests/engine/ppo_dp_worker.py"), str(out), "--output-dir", str(out), *SMALL,
               "--dist-timeout-minutes", "1", *flags, *node_flags[node]]  # fmt: skip
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
    if resume:  # (node 0's directory holds a run's checkpoint; node 1's none: it would have started over)
        for code, output in two_nodes((a, a), "--max-iterations", "1"):
            assert code == 0, output[-3000:]
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


def test_a_resume_one_node_cannot_read_stops_both_nodes_at_once_naming_it(tmp_path):
    """--resume where one node's `latest` names a checkpoint its disk lacks (a node-local directory, modelled by
    another path on node 1): node 1's refusal reaches node 0 from the first check of a resume, before the output
    directory's own check, rather than node 0 going on alone to its next collective."""
    policy, reward = build_tiny_models(str(tmp_path / "models"))
    a, b = str(tmp_path / "node0"), str(tmp_path / "node1")
    models = ("--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS)
    for code, output in two_nodes((a, a), *models, "--max-iterations", "1"):
        assert code == 0, output[-3000:]
    os.makedirs(b, exist_ok=True)
    with open(os.path.join(b, "latest"), "w") as f:
        f.write('{"checkpoint": "checkpoint-000001"}')
    results = two_nodes((a, b), *models, "--max-iterations", "2", "--resume")
    assert all(code != 0 for code, _ in results)
    said = f"error: reading the checkpoint to resume failed on rank 1: --resume: {b}/latest names checkpoint-000001"
    assert said in results[0][1], results[0][1][-3000:]


def _check_shared_rank(rank, world, init_file, dirs, out_dir):
    import uuid

    import torch.distributed as dist

    from engine import resume

    made = []
    real = uuid.uuid4
    uuid.uuid4 = lambda: made.append(1) or real()  # (rank 0 draws one token per check it runs)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for d in dirs:
        resume.check_shared(d, rank)
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(repr((len(made), sorted(n for d in set(dirs) for n in os.listdir(d)))))
    dist.destroy_process_group()


def test_the_shared_directory_check_runs_once_per_directory(tmp_path):
    """check_shared on the same directory again (the tiny default checks its output directory before setup does):
    one probe and one wait, not two; another directory is checked in its turn; no probe is left behind."""
    import torch.multiprocessing as mp

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    dirs = [str(a), str(a), str(b), str(a)]
    mp.spawn(_check_shared_rank, args=(2, str(tmp_path / "init"), dirs, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text() == repr((2, []))
    assert (tmp_path / "rank1").read_text() == repr((0, []))


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", "1e999"])
def test_a_bad_shared_directory_wait_is_named(monkeypatch, value):
    from engine.errors import InvalidInput
    from engine.resume import shared_wait_s

    monkeypatch.setenv("TULU_SHARED_DIR_WAIT_S", value)
    with pytest.raises(InvalidInput, match=rf"TULU_SHARED_DIR_WAIT_S='{re.escape(value)}': not a number of seconds"):
        shared_wait_s()


def test_the_shared_directory_wait_is_a_minute_unless_set(monkeypatch):
    from engine.resume import shared_wait_s

    monkeypatch.delenv("TULU_SHARED_DIR_WAIT_S", raising=False)
    assert shared_wait_s() == 60
    monkeypatch.setenv("TULU_SHARED_DIR_WAIT_S", " 2.5 ")
    assert shared_wait_s() == 2.5
    monkeypatch.setenv("TULU_SHARED_DIR_WAIT_S", "0")
    assert shared_wait_s() == 0
