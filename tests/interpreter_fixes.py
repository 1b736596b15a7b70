"""Triton's interpreter made to convert floats as the GPU does, to patch triton.language once a kernel launch, and to
build each block shape's values once: tests/conftest.py applies all three (fix_interpreter), and so does every torchrun
worker the tests start (they do not load conftest), so that both sides of a comparison round alike and run as fast."""

import os

import numpy as np
import torch


def fix_interpreter() -> None:
    interpreter_converts_like_the_gpu()
    interpreter_patches_the_language_once_a_launch()
    interpreter_builds_each_shape_once()


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


def interpreter_builds_each_shape_once() -> None:
    """Triton 3.6's interpreter type-checks each operation of each program as the compiler does, and on the way builds
    every shape anew: a block type unwraps its dims into a new triton.language tuple (whose tuple_type is named by
    formatting each dim's type) and names itself by formatting that; a tensor wraps its type's dims as constexprs in
    another such tuple; a load maps the Triton dtype to numpy's through a dict built at each call. That was half an
    interpreted generation's time (tests/engine/test_generate.py's fused decode step test, a run of the tiny model
    9.8 -> 5 s). Here a shape's tuples and element count are built once a process, keyed by its dims, and shared
    (nothing assigns into them: the compiler's tuple _setitem is not on the interpreter's path); a block type's and a
    tuple type's names are formatted when read; each dtype's numpy dtype is Triton's answer, asked once. The values
    are Triton's, and so are the errors (a dim not a power of two, a 0-d block). Only for Triton 3.6, whose code
    these replace, and only in a process that interprets kernels (TRITON_INTERPRET=1: a GPU run of the tests,
    TULU_TEST_DEVICE=cuda, compiles through Triton's own code, as do the CPU's sm_90 builds: subprocesses without
    it). The originals stay at block_type._triton_init, tensor._triton_init, tuple_type._triton_init and
    interpreter._triton_np_dtype."""
    import math

    try:
        import triton
        import triton.language as tl
        from triton._utils import validate_block_shape
        from triton.language import core
        from triton.runtime import interpreter
    except ImportError:
        return
    if not triton.__version__.startswith("3.6.") or hasattr(core.block_type, "_triton_init"):
        return
    if os.environ.get("TRITON_INTERPRET") != "1":  # (compiled kernels, TULU_TEST_DEVICE=cuda: Triton's own code)
        return
    shapes = {}  # dims -> (the dims' tuple, the tuple of their constexprs, the constexpr numel, the int numel)

    def shape_of(dims: tuple) -> tuple:
        got = shapes.get(dims)
        ints = True
        for d in dims:  # (2.0 is a key equal to 2's, and Triton refuses it)
            if type(d) is not int:
                ints = False
                break
        if got is None or not ints:
            numel = validate_block_shape(list(dims)) if dims else 1  # (Triton's errors: not an int, not a power of 2)
            cs = core.tuple([core.constexpr(d) for d in dims])
            got = (core.tuple(list(dims)), cs, core.constexpr(math.prod(dims)), numel)
            if ints:
                shapes[dims] = got
        return got

    def block_init(self, element_ty, shape):
        self.element_ty = element_ty
        assert isinstance(shape, (list, core.tuple))  # (as Triton's: `tuple` is core.tuple there)
        dims = tuple([d.value if isinstance(d, core.constexpr) else d for d in getattr(shape, "values", shape)])
        if not dims:
            raise TypeError("0d block_type is forbidden")
        self._shape_entry = entry = shape_of(dims)  # (for its tensors)
        self.shape, self.numel = entry[0], entry[3]

    scalar = shape_of(())

    def tensor_init(self, handle, type):
        self.handle = handle
        self.type = type
        self.dtype = type.scalar
        entry = type.__dict__.get("_shape_entry") or (shape_of(tuple(type.shape)) if type.is_block() else scalar)
        self.shape, self.numel = entry[1], entry[2]

    def tuple_init(self, types, fields=None):
        self.types = types
        self.fields = fields or [""] * len(types)

    def named(fmt):  # a `name` formatted when read (unless set: gluon's distributed_type names itself)
        def get(self):
            name = self.__dict__.get("_name")
            return fmt(self) if name is None else name

        return property(get, lambda self, name: self.__dict__.__setitem__("_name", name))

    np_types, triton_np_dtype = {}, interpreter._get_np_dtype

    def np_dtype(tt_dtype):  # (Triton's own answer, once a dtype)
        if isinstance(tt_dtype, tl.block_type):
            tt_dtype = tt_dtype.element_ty
        if isinstance(tt_dtype, tl.pointer_type):
            return np.dtype(np.uint64)
        got = np_types.get(tt_dtype)
        if got is None:
            got = np_types[tt_dtype] = triton_np_dtype(tt_dtype)
        return got

    core.block_type._triton_init, core.tensor._triton_init = core.block_type.__init__, core.tensor.__init__
    core.tuple_type._triton_init, interpreter._triton_np_dtype = core.tuple_type.__init__, triton_np_dtype
    core.block_type.__init__, core.tensor.__init__, core.tuple_type.__init__ = block_init, tensor_init, tuple_init
    core.block_type.name = named(lambda self: f"<{self.shape}, {self.element_ty}>")
    core.tuple_type.name = named(lambda self: "[" + ",".join(f"{k}:{v}" for k, v in zip(self.fields, self.types)) + "]")
    interpreter._get_np_dtype = np_dtype
