"""bench/run_gpu_suite.sh's deadline and packing, with a stand-in interpreter (no GPU needed): a lease returns at
most 8 files and kills a call at its timeout, so the suite must cap each step, skip what cannot start in time,
and leave every finished step's log in one archive."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Stands in for python3: the env probe, the module probes (absent), pytest, and benches (rollout_b64 is slow).
STUB = """#!/usr/bin/env bash
case "$1" in
  -) cat > /dev/null; echo "device stub torch 0 triton 0";;
  -c) exit 1;;
  -m) echo "pytest $*"; echo "1 passed";;
  *) echo "bench $*"; [[ "$*" == *"--batch 64"* ]] && sleep 60; echo '{"ok": 1}' > "${@: -1}";;
esac
"""


def _run_suite(args: list[str], env: dict, cwd=None, timeout: int = 120) -> subprocess.CompletedProcess:
    """bash bench/run_gpu_suite.sh ARGS under env (the stand-in interpreter's), which must exit 0."""
    script = os.path.join(ROOT, "bench", "run_gpu_suite.sh")
    proc = subprocess.run(["bash", script, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc


def _run_group(tmp_path, stub_text: str, group: str) -> tuple[list[str], str, dict]:
    """The suite's `group` under the stand-in interpreter `stub_text` (no time budget set): the steps that ran (in
    order), the summary, and the paths and environment it ran with (out, work, env) for a second run."""
    stub = tmp_path / "py"
    stub.write_text(stub_text)
    stub.chmod(0o755)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": str(stub), "SUITE_WORK_DIR": str(work), "SUITE_COMMIT": "abc1234"}
    _run_suite([str(out), group], env, timeout=120)
    summary = (out / "summary.txt").read_text()
    steps = [line.split(":")[0] for line in summary.splitlines() if ": exit " in line]
    return steps, summary, {"out": out, "work": work, "env": env, "stub": stub}


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_suite_caps_steps_and_packs_logs(tmp_path):
    stub = tmp_path / "py"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": str(stub),
        "SUITE_BUDGET_S": "12",
        "SUITE_MIN_STEP_S": "3",
        "SUITE_WORK_DIR": str(tmp_path / "work"),
        "SUITE_COMMIT": "abc1234",
    }
    _run_suite([str(out), "first"], env, timeout=120)
    summary = (out / "summary.txt").read_text()
    lines = {line.split(":")[0]: line for line in summary.splitlines() if ": " in line}
    assert lines["rope_attention"].startswith("rope_attention: exit 0")  # the headline figures first
    assert "stopped at its" in lines["rollout_b64"], summary  # 60 s of work in what is left of 12 s
    skipped = ("rollout_b1", "paged_attention", "logprob", "gpu_tests", "kernel_tests", "gluon_tests", "pingpong_tests")
    for name in skipped:
        assert "skipped" in lines[name], summary
    assert "commit abc1234" in summary  # (SUITE_COMMIT: the device's copy of the files may have no .git)
    # and the sources' fingerprint, as `--tree` prints it for a checkout (the device's .git was once stale)
    tree = subprocess.run(["bash", os.path.join(ROOT, "bench", "run_gpu_suite.sh"), "--tree"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    assert re.fullmatch(r"[0-9a-f]{12}", tree) and f"tree {tree}" in summary, summary
    assert "gae" not in lines and "rope_sweep" not in lines  # not in the group
    assert sorted(os.listdir(out)) == ["suite.tgz", "summary.txt"]  # far under the lease's 8 files
    with tarfile.open(out / "suite.tgz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"env.log", "rope_attention.log", "rope_attention.json", "rollout_b64.log"} <= names
    log = (tmp_path / "work" / "rope_attention.log").read_text()
    assert "bench_rope_attention.py --no-compile --json" in log  # the group's lighter run


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_suite_takes_relative_out_and_work_dirs(tmp_path):
    """OUT_DIR and SUITE_WORK_DIR relative to the caller's directory (the script changes directory before the steps
    run): every step's log lands in the one work directory and in the archive."""
    stub = tmp_path / "py"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "SUITE_WORK_DIR": "work", "SUITE_COMMIT": "abc1234"}
    _run_suite(["out", "gae", "sampling"], env, cwd=tmp_path, timeout=60)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "gae: exit 0" in summary and "sampling: exit 0" in summary, summary
    assert {"env.log", "gae.log", "gae.json", "sampling.log"} <= set(os.listdir(tmp_path / "work"))
    with tarfile.open(tmp_path / "out" / "suite.tgz") as tar:
        assert {"gae.log", "gae.json", "sampling.json"} <= {os.path.basename(n) for n in tar.getnames()}
    assert not os.path.exists(os.path.join(ROOT, "work"))


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_a_step_that_ignores_sigterm_is_said_to_be_killed(tmp_path):
    """A step that does not stop at its cap is killed 10 s later (exit 137): the summary says so, as it says a
    stopped one (124), rather than a bare exit code."""
    stub = tmp_path / "py"
    stub.write_text(STUB.replace('*) echo "bench $*";', "*) trap '' TERM; sleep 30;"))
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "SUITE_BUDGET_S": "4", "SUITE_MIN_STEP_S": "1",
           "SUITE_WORK_DIR": str(tmp_path / "work"), "SUITE_COMMIT": "abc1234"}  # fmt: skip
    _run_suite([str(tmp_path / "out"), "gae"], env, timeout=60)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert re.search(r"gae: exit 137 \(killed 10 s after its \ds cap: it did not stop on SIGTERM\)", summary), summary


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_tune_group_sweeps_then_tries_the_fastest_decode_launch(tmp_path):
    """`tune`: the paged decode sweep first, the batch-64 rollout again with the sweep's fastest launch for the
    rollout's shape (read from the sweep's JSON), the rope sweep, then the GPU tests; nothing of the other groups.
    A sweep with no row for that shape skips the rollout and says why."""
    sweep_json = (
        '[{"shape": "13b-b64-c384", "kv_bytes": 1, "ours_ms": 0.2}, {"shape": "13b-b64-c384", "block_n": 64, '
        '"num_warps": 4, "num_stages": 2, "dot_min_group": 2, "ms": 0.3}, {"shape": "13b-b64-c384", "block_n": 128, '
        '"num_warps": 8, "num_stages": 3, "dot_min_group": 1, "ms": 0.25}, {"shape": "13b-b8-c4096", "block_n": 32, '
        '"num_warps": 4, "num_stages": 1, "dot_min_group": 2, "ms": 0.1}]'
    )
    real_py = shutil.which("python3") or shutil.which("python")
    stub_text = (  # a real interpreter for the selection script, the stub's answers for the rest
        STUB.replace('-) cat > /dev/null; echo "device stub torch 0 triton 0";;',
                     f'-) if [ $# -gt 1 ]; then exec {real_py} "$@"; fi; cat > /dev/null; echo "device stub";;')
        .replace("sleep 60", "true")  # (no slow rollout here)
        .replace("""echo '{"ok": 1}' > "${@: -1}";;""",
                 f"""[[ "$*" == *--sweep*--shapes* ]] && echo '{sweep_json}' >"${{@: -1}}" || echo 1 >"${{@: -1}}";;""")
    )  # fmt: skip
    steps, summary, run = _run_group(tmp_path, stub_text, "tune")
    stub, out, work, env = run["stub"], run["out"], run["work"], run["env"]
    assert steps == ["paged_sweep", "rollout_b64_tuned", "rope_sweep", "gpu_tests", "kernel_tests_fixed"], summary
    rollout = (work / "rollout_b64_tuned.log").read_text()
    want = '--decode-config {"block_n": 128, "num_warps": 8, "num_stages": 3, "dot_min_group": 1}'
    assert want in rollout and "--no-hf" in rollout, rollout  # the fastest at 13b-b64-c384, not overall
    assert "--profile /" in rollout and "rollout_b64_trace.json --json" in rollout  # (the trace outside the archive)
    assert "--shapes 13b-b64-c384" in (work / "paged_sweep.log").read_text()
    tests = (work / "kernel_tests_fixed.log").read_text()
    assert "decode_step_end_to_end" in tests and "set_decode_config" in tests
    # no usable sweep row: the tuned rollout is skipped and said to be
    stub.write_text(stub.read_text().replace("13b-b64-c384", "other-shape"))
    shutil.rmtree(out)
    _run_suite([str(out), "tune"], env, timeout=120)
    assert "rollout_b64_tuned: skipped (no paged_sweep row for 13b-b64-c384)" in (out / "summary.txt").read_text()


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_check_group_runs_the_defaults_first_and_fits_what_is_left(tmp_path):
    """`check`: the batch-64 rollout at the decode launch decode_config picks (no override, no HF), the paged decode
    bench on the sweep's shapes, the offload test that failed, then the rest while the budget lasts; nothing of the
    other groups."""
    steps, summary, run = _run_group(tmp_path, STUB.replace("sleep 60", "true"), "check")
    work = run["work"]
    assert steps == ["rollout_b64_default", "paged_default", "gpu_test_offload", "rollout_b1_default", "logprob",
                     "grad_sums", "sampling", "rmsnorm_swiglu"], summary  # fmt: skip
    rollout = (work / "rollout_b64_default.log").read_text()
    assert "--batch 64" in rollout and "--no-hf" in rollout and "--decode-config" not in rollout, rollout
    assert "-k idle_model_weights_free" in (work / "gpu_test_offload.log").read_text()


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_fused_group_runs_the_batch_64_rollout_with_and_without_the_fused_rope_write(tmp_path):
    """`fused`: the paged attention tests on the GPU, the paged bench (its fused columns), the batch-64 rollout with the
    fused step (fuse_rope 1, profiled) and again at the defaults (the two kernels), batch 1 both ways, the rest."""
    steps, summary, run = _run_group(tmp_path, STUB.replace("sleep 60", "true"), "fused")
    work = run["work"]
    assert steps == ["fused_tests", "paged_fused", "rollout_b64_fused", "rollout_b64_unfused", "rollout_b1_fused",
                     "rollout_b1_unfused", "logprob", "grad_sums", "sampling", "rmsnorm_swiglu"], summary  # fmt: skip
    assert "tests/kernels/test_paged_attention.py" in (work / "fused_tests.log").read_text()
    fused, unfused = (work / "rollout_b64_fused.log").read_text(), (work / "rollout_b64_unfused.log").read_text()
    assert '--decode-config {"fuse_rope": 1}' in fused and "--profile /" in fused, fused
    assert "--decode-config" not in unfused and "--batch 64" in unfused, unfused


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_b1_group_profiles_sweeps_then_tries_one_split(tmp_path):
    """`b1`: the batch-1 rollout profiled, the paged sweep at its shape, then the rollout with one context split
    (min_split_tokens 512 at the 384-token table), with and without the fused step, then the light kernel rows."""
    steps, summary, run = _run_group(tmp_path, STUB.replace("sleep 60", "true"), "b1")
    work = run["work"]
    assert steps == ["rollout_b1_profile", "paged_sweep_b1", "rollout_b1_split1", "rollout_b1_split1_fused", "logprob",
                     "grad_sums", "sampling", "rmsnorm_swiglu"], summary  # fmt: skip
    assert (
        "--sweep" in (work / "paged_sweep_b1.log").read_text()
        and "13b-b1-c384" in (work / "paged_sweep_b1.log").read_text()
    )
    assert '{"min_split_tokens": 512}' in (work / "rollout_b1_split1.log").read_text()
    assert '"fuse_rope": 1' in (work / "rollout_b1_split1_fused.log").read_text()


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_long_group_runs_the_long_rollout_both_ways(tmp_path):
    """`long`: the batch-32 rollout at 512 + 1024 tokens at the defaults, then with the fused decode step."""
    steps, summary, run = _run_group(tmp_path, STUB.replace("sleep 60", "true"), "long")
    assert steps == ["rollout_long_unfused", "rollout_long_fused"], summary
    fused = (run["work"] / "rollout_long_fused.log").read_text()
    assert "--gen-len 1024" in fused and '{"fuse_rope": 1}' in fused, fused


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_linear_group_tests_benches_then_runs_the_rollouts_both_ways(tmp_path):
    """`linear`: the decode projections' kernel tests on the GPU (with the paged attention and rotary ones), its bench
    against cuBLAS, the sampling bench (top-k's floor), the batch-64 and batch-1 rollouts with it (linear 1), with it
    and programmatic dependent launch (pdl 1), then at the defaults, batch 1 with norm_rows 0, then its sweep."""
    steps, summary, run = _run_group(tmp_path, STUB.replace("sleep 60", "true"), "linear")
    work = run["work"]
    assert steps == ["linear_tests", "linear", "sampling", "rollout_b64_linear", "rollout_b64_linear_pdl",
                     "rollout_b1_linear", "rollout_b1_linear_pdl", "rollout_b64_cublas", "rollout_b1_cublas",
                     "rollout_b1_linear_nonorm", "linear_sweep"], summary  # fmt: skip
    assert '{"linear": 1, "pdl": 1}' in (work / "rollout_b64_linear_pdl.log").read_text()
    assert '{"linear": 1, "norm_rows": 0}' in (work / "rollout_b1_linear_nonorm.log").read_text()
    tests = (work / "linear_tests.log").read_text()
    assert "tests/kernels/test_decode_linear.py" in tests and "tests/kernels/test_sampling.py" in tests, tests
    ours, cublas = (work / "rollout_b64_linear.log").read_text(), (work / "rollout_b64_cublas.log").read_text()
    assert '--decode-config {"linear": 1}' in ours and "--batch 64" in ours, ours
    assert "--decode-config" not in cublas and "--batch 64" in cublas, cublas
    assert "--sweep" in (work / "linear_sweep.log").read_text()


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_tma_group_tests_then_benches_the_attention_both_ways_then_sweeps(tmp_path):
    """`tma`: the rope attention tests on the GPU, its bench (ours by tensor descriptor beside ours by pointer loads,
    SDPA's backends; no torch.compile row), then the launch sweep; nothing of the other groups."""
    steps, summary, run = _run_group(tmp_path, STUB.replace("sleep 60", "true"), "tma")
    work = run["work"]
    assert steps == ["tma_tests", "rope_attention_tma", "gluon_tests", "pingpong_tests", "rope_sweep"], summary
    tests, gluon = (work / "tma_tests.log").read_text(), (work / "gluon_tests.log").read_text()
    assert "tests/kernels/test_rope_attention.py -k not gluon" in tests, tests
    # (apart, each under its own cap: the Gluon forward in 8 warps, then its ping-pong form)
    assert "tests/kernels/test_rope_attention.py -k gluon and not pingpong and not producer" in gluon, gluon
    assert "test_rope_attention.py -k pingpong or producer" in (work / "pingpong_tests.log").read_text()
    bench = (work / "rope_attention_tma.log").read_text()
    assert "bench/bench_rope_attention.py --no-compile" in bench and "--sweep" not in bench, bench
    assert "--sweep" in (work / "rope_sweep.log").read_text()


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_gluon_group_tests_then_times_the_gluon_kernels_alone(tmp_path):
    """`gluon`: issue 4's Gluon kernels apart: their tests (the ping-pong form under its own cap), the rope bench's
    Gluon and SDPA rows beside ours at its defaults, then the sweep of the Gluon variants alone."""
    steps, summary, run = _run_group(tmp_path, STUB.replace("sleep 60", "true"), "gluon")
    work = run["work"]
    assert steps == ["gluon_tests", "pingpong_tests", "rope_gluon", "rope_sweep_gluon"], summary
    assert "-k gluon and not pingpong and not producer" in (work / "gluon_tests.log").read_text()
    assert "-k pingpong or producer" in (work / "pingpong_tests.log").read_text()
    bench = (work / "rope_gluon.log").read_text()
    assert "bench/bench_rope_attention.py --no-compile --no-mixed --only Gluon Triton SDPA" in bench, bench
    assert "--sweep --sweep-gluon" in (work / "rope_sweep_gluon.log").read_text()


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_next_group_tests_then_times_each_switch_against_the_defaults(tmp_path):
    """`next`: the kernel tests compiled, the engine's GPU tests of the training side, the batch-64 rollouts with
    linear 1, with linear 1 + pdl 1 and at the defaults, the rope attention bench (TMA against pointer loads), the
    same three at batch 1 and batch 1 with pdl 1 alone, the projections' and sampling benches, the weight grads into
    their sums, then the two sweeps; nothing of the other groups."""
    steps, summary, run = _run_group(tmp_path, STUB.replace("sleep 60", "true"), "next")
    work = run["work"]
    assert steps == ["next_tests", "train_tests", "rollout_b64_linear", "rollout_b64_linear_pdl", "rollout_b64_cublas",
                     "rope_attention_tma", "rollout_b1_linear", "rollout_b1_linear_pdl", "rollout_b1_cublas",
                     "rollout_b1_pdl", "linear", "sampling", "grad_sums", "gluon_tests", "pingpong_tests",
                     "linear_sweep", "rope_sweep"], summary  # fmt: skip
    assert '--decode-config {"pdl": 1}' in (work / "rollout_b1_pdl.log").read_text()
    tests = (work / "next_tests.log").read_text()
    assert "test_decode_linear.py" in tests and "test_rope_attention.py -k not gluon" in tests, tests
    train = (work / "train_tests.log").read_text()  # (the training side built without a GPU: three engine tests)
    assert "test_gpu.py -k straight_into_fp32_sums or recomputed_activation or parameter_gather" in train, train
    gluon = (work / "gluon_tests.log").read_text()
    assert "test_rope_attention.py -k gluon and not pingpong and not producer" in gluon, gluon  # (apart)
    assert "test_rope_attention.py -k pingpong or producer" in (work / "pingpong_tests.log").read_text()
    for b in (64, 1):
        pdl, cublas = (
            (work / f"rollout_b{b}_linear_pdl.log").read_text(),
            (work / f"rollout_b{b}_cublas.log").read_text(),
        )
        assert f"--batch {b} " in pdl and '{"linear": 1, "pdl": 1}' in pdl, pdl
        assert f"--batch {b} " in cublas and "--decode-config" not in cublas, cublas


# Stands in for python3 and records every command the suite gives it, one JSON list a line.
RECORDER = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["SUITE_RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:2] == ["-"]:
    sys.stdin.read()
    print("device stub torch 0 triton 0")
elif sys.argv[1:2] == ["-c"]:
    sys.exit(1)
elif sys.argv[1:2] != ["-m"]:
    with open(sys.argv[-1], "w") as f:
        f.write('{"ok": 1}')
"""


class _Parsed(Exception):
    pass


def _names(node_id: str) -> list[str]:
    """What pytest's -k matches a test by, near enough: its file's, class's and function's names and its parameters'
    ids, lower-cased."""
    return [n.removesuffix(".py").lower() for n in re.split(r"::|\[|\]|/|-", node_id) if n]


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_every_command_the_suite_gives_parses_and_every_test_path_exists(tmp_path, monkeypatch):
    """Each bench command line of every group and of the full run, as bash expands it, is taken by that bench's own
    argument parser (a flag misspelt in the suite would otherwise cost a lease its step), and every pytest step's
    files exist and its -k expression selects some of their tests (matched as pytest's -k matches names)."""
    import argparse
    import json
    import runpy
    import sys

    stub = tmp_path / "py"
    stub.write_text(RECORDER)
    stub.chmod(0o755)
    record = tmp_path / "calls.jsonl"
    groups = ["first", "tune", "check", "fused", "b1", "long", "linear", "tma", "next", "gluon", "tests"]
    for k, group in enumerate([*groups, None]):  # (None: the full run)
        env = {
            **os.environ,
            "PYTHON": str(stub),
            "SUITE_WORK_DIR": str(tmp_path / f"w{k}"),
            "SUITE_RECORD": str(record),
        }
        _run_suite([str(tmp_path / f"o{k}"), *([group] if group else [])], env, timeout=120)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    benches = {tuple(c) for c in calls if c and c[0].startswith("bench/")}
    tests = [c for c in calls if c[:2] == ["-m", "pytest"]]
    assert len(benches) > 40 and len(tests) > 5, (len(benches), len(tests))
    for c in tests:
        paths = [a for a in c if a.startswith("tests/")]
        assert paths and all(os.path.exists(os.path.join(ROOT, p.split("::")[0])) for p in paths), c
    from _pytest.mark.expression import Expression

    named = sorted({a for c in tests for a in c if a.startswith("tests/")})
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *named],
                            cwd=ROOT, capture_output=True, text=True, timeout=300).stdout.splitlines()  # fmt: skip
    ids = [line for line in listed if "::" in line]
    assert len(ids) > 300, listed[-5:]
    for c in tests:
        paths = [a for a in c if a.startswith("tests/")]
        chosen = [i for i in ids if any(i == p or i.startswith(p.rstrip("/") + ("" if p.endswith(".py") else "/"))
                                        for p in paths)]  # fmt: skip
        if "-k" in c:
            expr = Expression.compile(c[c.index("-k") + 1])
            chosen = [i for i in chosen if expr.evaluate(lambda word, i=i: any(word.lower() in n for n in _names(i)))]
        assert chosen, f"{' '.join(c)}: selects no test"
    real_parse = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        _, extras = real_parse(self, args, namespace)  # (a malformed flag exits here with argparse's message)
        if extras:
            raise SystemExit(f"unrecognized arguments: {' '.join(extras)}")
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
    monkeypatch.chdir(ROOT)
    for c in sorted(benches):
        monkeypatch.setattr(sys, "argv", list(c))
        with pytest.raises(_Parsed):
            try:
                runpy.run_path(os.path.join(ROOT, c[0]), run_name="__main__")
            except SystemExit as e:
                raise AssertionError(f"{' '.join(c)}: its parser refused it ({e})") from None


def test_multi_group_runs_the_multi_gpu_figures_where_there_are_several_gpus(tmp_path):
    """`multi`: on a machine of several GPUs (the stand-in says 4) the two-GPU tests, the all-reduce bench and the 13B
    rollouts at TP 4 by NCCL and through symmetric memory, a PPO iteration at TP, the overlaps' A/B at TP 2 x DP 2
    (its --json before the flags it passes on); on one GPU, nothing but a line saying why."""
    # (a bench's JSON written only where --json names it: a step ending in a number would leave a file in the checkout)
    four = STUB.replace("-c) exit 1;;", '-c) [[ "$2" == *device_count* ]] && echo 4 || exit 1;;').replace(
        """echo '{"ok": 1}' > "${@: -1}";;""", """if [ "${@: -2:1}" = --json ]; then echo 1 > "${@: -1}"; fi;;"""
    )
    steps, summary, run = _run_group(tmp_path, four.replace("sleep 60", "true"), "multi")
    assert steps == ["multi_tests", "tp_allreduce", "rollout_tp_b64", "rollout_tp_b64_symm", "rollout_tp_b256",
                     "rollout_tp_b256_symm", "ppo_step_tp", "train_overlaps"], summary  # fmt: skip
    work = run["work"]
    assert "-k two_gpus" in (work / "multi_tests.log").read_text()
    symm = (work / "rollout_tp_b256_symm.log").read_text()
    assert "--nproc_per_node 4" in symm and "--tp 4 --batch 256 --prompt-len 512 --gen-len 512" in symm, symm
    plain = (work / "rollout_tp_b64.log").read_text()
    assert "--tp 4 --batch 64 --prompt-len 128" in plain and "TULU_SYMM" not in plain, plain
    overlaps = (work / "train_overlaps.log").read_text()
    assert re.search(r"--nproc 4 --tp 2 --settings \S+ --json \S+train_overlaps.json -- --model llama2-13b", overlaps)
    one = STUB.replace("-c) exit 1;;", '-c) [[ "$2" == *device_count* ]] && echo 1 || exit 1;;')
    (tmp_path / "one").mkdir()
    steps, summary, _ = _run_group(tmp_path / "one", one, "multi")
    assert steps == [] and "multi: skipped (it needs two GPUs or more; this machine has 1)" in summary, summary
