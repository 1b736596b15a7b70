"""Triton's interpreter made to convert floats as the GPU does, and to patch triton.language once a kernel launch:
tests/conftest.py applies both (fix_interpreter), and so does every torchrun worker the tests start (they do not load
conftest), so that both sides of a comparison round alike."""

import numpy as np
import torch


def fix_interpreter() -> None:
    interpreter_converts_like_the_gpu()
    interpreter_patches_the_language_once_a_launch()


def interpreter_converts_like_the_gpu() -> None:
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
        # saturating at +-448 as the GPU does (clamped first: torch's cast saturates only from 2.12 on)
        bits = torch.from_numpy(as_float32(src)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
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


def interpreter_patches_the_language_once_a_launch() -> None:
    """Triton 3.6's interpreter patches triton.language for interpretation (inspect.getmembers over its modules and
    the tensor class, ~1.5 ms) at each kernel launch, restoring it at the launch's end, and again at every call of a
    @triton.jit function inside the kernel (ours, and the language's own: tl.max, tl.sum), where those patches are
    in place already: a kernel whose per-row reductions run once a program spent a third of its interpreted time
    there. A helper's call patches the language modules it sees and never restores them (Triton drops that scope).
    So a helper's patching is skipped where every language module it sees (triton.language, triton.language.core)
    is patched already: by the launch in progress, or for good by an earlier helper's patching (of a module its
    launch did not see, which that launch's end did not restore). The same patches are in place as with Triton's
    own calls; anything else patches as Triton does."""
    import inspect

    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    launch, helper = getattr(interpreter, "GridExecutor", None), getattr(interpreter, "InterpretedFunction", None)
    if launch is None or helper is None or getattr(helper, "_patched_once_a_launch", False):
        return
    if not (hasattr(helper, "rewrite") and hasattr(interpreter, "InterpreterError")):
        return
    launched, for_good, seen = [], set(), {}

    def langs(fn) -> frozenset:
        if fn not in seen:
            seen[fn] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        return seen[fn]

    launch_call, helper_call = launch.__call__, helper.__call__

    def call_launch(self, *args, **kwargs):
        launched.append(langs(self.fn))
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            launched.pop()

    def call_helper(self, *args, **kwargs):
        if not launched or not langs(self.fn) <= launched[-1] | for_good:
            if launched:  # (what the launch does not see stays patched: its end restores only its own)
                for_good.update(langs(self.fn) - launched[-1])
            return helper_call(self, *args, **kwargs)
        fn = self.rewrite()  # (Triton's call, less its _patch_lang)
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    launch.__call__, helper.__call__ = call_launch, call_helper
    helper._patched_once_a_launch = True
