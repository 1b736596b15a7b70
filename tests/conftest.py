"""Kernels run in Triton's interpreter on CPU: the variable must be set before triton is imported.

TULU_TEST_DEVICE=cuda runs the same kernel tests compiled on a GPU instead: the tensors a kernel test makes
land on the GPU (torch's default device, for tests/kernels only), Triton compiles for real (production tile
sizes, tensor cores), and only tests/kernels and tests/engine/test_gpu.py run (the latter places its tensors
itself, with the default device left on the CPU as in production), less the tests marked cpu_only:
    TULU_TEST_DEVICE=cuda python -m pytest -q tests/kernels tests/engine/test_gpu.py
"""

import os

DEVICE = os.environ.get("TULU_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.dispatch import cores_of_this_process  # noqa: E402
from tests.interpreter_fixes import fix_interpreter  # noqa: E402

# The cores divided among pytest-xdist's workers (one thread each on CI's two cores): two workers of two threads each
# spin in torch's OpenMP barriers against each other and the torchrun ranks beside them, which made the in-process
# PPO runs up to ten times slower under `-n 2` than alone (bench/RESULTS.md, "CI and the tiny default over time").
torch.set_num_threads(min(2, cores_of_this_process()))
fix_interpreter()
if DEVICE != "cpu" and DEVICE.startswith("cuda") and not torch.cuda.is_available():
    raise RuntimeError(f"TULU_TEST_DEVICE={DEVICE} but torch sees no CUDA device")

_GPU_MODE_PATHS = ("tests/kernels/", "tests/engine/test_gpu.py")


# On CPU these run first: each is one subprocess compiling for sm_90 for up to a minute and a half (rope_attention's),
# and last in the files' order they were the run's tail: pytest-xdist's other worker sat idle for a minute, its
# share done (a timeline of a whole run, bench/RESULTS.md). First, the many short kernel tests even out the end.
_LONG_FIRST = ("tests/kernels/test_sm90_compile.py::",)


def pytest_collection_modifyitems(config, items):
    """On CPU: the long compilations first (_LONG_FIRST), the rest in their order. On a GPU (TULU_TEST_DEVICE) skip
    what only makes sense on CPU: the engine's CPU tests (they build models and HF references on the host),
    torchrun/gloo workers and tests marked cpu_only."""
    if DEVICE == "cpu":
        items.sort(key=lambda item: not item.nodeid.startswith(_LONG_FIRST))  # (stable: the rest keep their order)
        return
    skip = pytest.mark.skip(reason=f"CPU-only test (TULU_TEST_DEVICE={DEVICE} runs {' and '.join(_GPU_MODE_PATHS)})")
    for item in items:
        path = item.path.as_posix()
        if item.get_closest_marker("cpu_only") or not any(p in path for p in _GPU_MODE_PATHS):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _kernel_tests_on_device(request):
    """Under TULU_TEST_DEVICE the kernel tests' tensors are made on that device."""
    if DEVICE == "cpu" or "tests/kernels/" not in request.node.path.as_posix():
        yield
        return
    torch.set_default_device(DEVICE)
    try:
        yield
    finally:
        torch.set_default_device(None)


GPU_TEST_CACHE_BYTES = 2**30  # each test generator's KV cache under test_gpu.py on a GPU


@pytest.fixture(autouse=True)
def _one_gpu_shared_by_workers(request, monkeypatch):
    """tests/engine/test_gpu.py on a GPU runs in several pytest-xdist workers sharing the device: each generator's KV
    cache gets a fixed GiB instead of 90% of the device less what is in use (the first worker's cache would leave the
    others none, and their activation-checkpointing plans would see a full device), and the attention kernels keep
    one autotune config (each other config is a compilation in every worker; tests/kernels tries them all)."""
    if not (torch.cuda.is_available() and request.node.path.as_posix().endswith("tests/engine/test_gpu.py")):
        yield
        return
    import engine.generate
    import engine.state
    from kernels import rope_attention, rope_attention_bwd

    fixed = lambda device, fraction=0.9, reserved_bytes=0, clamp=True: GPU_TEST_CACHE_BYTES  # noqa: E731
    monkeypatch.setattr(engine.generate, "cuda_cache_budget", fixed)
    monkeypatch.setattr(engine.state, "cuda_cache_budget", fixed)
    for tuned in (rope_attention._fwd_tuned, rope_attention_bwd._dkdv_tuned, rope_attention_bwd._dq_tuned):
        monkeypatch.setattr(tuned, "configs", tuned.configs[:1])
    yield
