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


def _interpreter_converts_like_the_gpu() -> None:
    """Triton 3.6's interpreter converts fp32 to bf16 by truncating the mantissa, and to float8 e4m3 without
    carrying a rounded-up mantissa into the exponent nor saturating (500 -> 256); the GPU rounds to nearest
    even and saturates fp8 at +-448. Make the interpreter convert as the GPU (and torch) do, so that kernel
    outputs in the tests carry the GPU's rounding rather than the interpreter's."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "cast_impl") or getattr(builder, "_gpu_conversions", False):
        return
    truncating, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def as_float32(src):
        if src.dtype.scalar == tl.bfloat16:  # held as raw bits
            return (np.ascontiguousarray(src.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(src.data, dtype=np.float32)

    def to_fp8(src, dst_type):
        bits = torch.from_numpy(as_float32(src)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return interpreter.TensorHandle(bits, dst_type.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = np.ascontiguousarray(src.data, dtype=np.float32)
            bits = x.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(x), np.uint16(0x7FC0), rounded)
            return interpreter.TensorHandle(rounded, dst_type.scalar)
        if dst_type.scalar == tl.float8e4nv and src.dtype.scalar in (tl.float32, tl.bfloat16, tl.float16):
            return to_fp8(src, dst_type)
        return truncating(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == tl.float8e4nv and src.dtype.scalar in (tl.float32, tl.bfloat16, tl.float16):
            return to_fp8(src, dst_type)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    builder._gpu_conversions = True


_interpreter_converts_like_the_gpu()


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
