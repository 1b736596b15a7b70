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

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
if DEVICE != "cpu" and DEVICE.startswith("cuda") and not torch.cuda.is_available():
    raise RuntimeError(f"TULU_TEST_DEVICE={DEVICE} but torch sees no CUDA device")

_GPU_MODE_PATHS = ("tests/kernels/", "tests/engine/test_gpu.py")


def pytest_collection_modifyitems(config, items):
    """On a GPU (TULU_TEST_DEVICE) skip what only makes sense on CPU: the engine's CPU tests (they build models
    and HF references on the host), torchrun/gloo workers and tests marked cpu_only."""
    if DEVICE == "cpu":
        return
    skip = pytest.mark.skip(reason=f"CPU-only test (TULU_TEST_DEVICE={DEVICE} runs {' and '.join(_GPU_MODE_PATHS)})")
    for item in items:
        path = item.path.as_posix()
        if item.get_closest_marker("cpu_only") or not any(p in path for p in _GPU_MODE_PATHS):
            item.add_marker(skip)


def _interpreter_rounds_bf16_to_nearest() -> None:
    """Triton 3.6's interpreter converts fp32 to bf16 by truncating the mantissa; the GPU rounds to nearest
    even. Make the interpreter round like the GPU, so that bf16 kernel outputs in the tests carry the
    GPU's rounding error rather than up to twice as much, all biased towards zero."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "cast_impl") or getattr(builder, "_rne_bf16", False):
        return
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = np.ascontiguousarray(src.data, dtype=np.float32)
            bits = x.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(x), np.uint16(0x7FC0), rounded)
            return interpreter.TensorHandle(rounded, dst_type.scalar)
        return truncating(self, src, dst_type)

    builder.cast_impl = cast_impl
    builder._rne_bf16 = True


_interpreter_rounds_bf16_to_nearest()


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
