"""Kernels run in Triton's interpreter on CPU: the variable must be set before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
