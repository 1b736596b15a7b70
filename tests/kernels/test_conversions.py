"""Float conversions inside a kernel equal torch's: round to nearest even, float8 e4m3 saturating at +-448.

On CPU this checks tests/conftest.py's fix of Triton's interpreter (which truncates to bf16 and wraps
float8); under TULU_TEST_DEVICE=cuda it checks the GPU's own conversions, which the fp8 KV cache relies on.
"""

import pytest
import torch
import triton
import triton.language as tl

from kernels import reference


@triton.jit
def _round_trip(X, Y, Z, N: tl.constexpr):
    o = tl.arange(0, N)
    y = tl.load(X + o).to(Y.dtype.element_ty)
    tl.store(Y + o, y)
    tl.store(Z + o, y.to(tl.float32))


def _inputs(src):
    x = torch.randn(4096) * 100
    x[:8] = torch.tensor([500.0, -1000.0, 31.5, 0.0, -0.0, 447.9, 464.0, 1e-4])  # saturate, carry, zeros, tiny
    x[8:12] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, float("inf"), -float("inf")])  # bf16 ties, infinities
    return x.to(src)


@pytest.mark.parametrize(
    "src,dst",
    [(s, torch.float8_e4m3fn) for s in (torch.float32, torch.bfloat16, torch.float16)]
    + [(torch.float32, torch.bfloat16)],
)
def test_kernel_conversions_match_torch(src, dst):
    if dst == torch.float8_e4m3fn and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no float8 conversions on this GPU")
    x = _inputs(src)
    if dst == torch.float8_e4m3fn:
        x[~x.float().isfinite()] = 0.0  # an infinity has no fp8 value: torch gives NaN, the GPU saturates
    y, z = torch.empty(x.numel(), dtype=dst), torch.empty(x.numel())
    _round_trip[(1,)](x, y, z, x.numel())
    want = reference.to_cache_dtype(x, dst)  # (float8: clamped to +-448, then torch's rounding)
    assert torch.equal(y.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(z, want.float())


@triton.jit
def _row_max(x):  # a helper of ours, calling the language's own jit functions (tl.max: triton.language.standard)
    return tl.max(x, 0)


@triton.jit
def _rows_max(X, Y, N: tl.constexpr):
    r = tl.program_id(0)
    tl.store(Y + r, _row_max(tl.load(X + r * N + tl.arange(0, N))))


@pytest.mark.cpu_only
def test_the_interpreter_patches_the_language_once_a_launch(monkeypatch):
    """tests/interpreter_fixes.py: a launch patches triton.language once (not again at each helper call in each
    program: tl.max's own call included), its results are right, and the language is as it was after the launch."""
    from triton.runtime import interpreter

    patched = []
    real = interpreter._patch_lang
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: patched.append(fn.__name__) or real(fn))
    before = {name: getattr(tl, name) for name in ("program_id", "load", "store", "arange", "maximum")}
    x = torch.randn(5, 16)
    y = torch.empty(5)
    _rows_max[(5,)](x, y, N=16)
    _rows_max[(5,)](x, y, N=16)
    assert torch.equal(y, x.max(1).values)
    # once a launch, and tl.max once at most in this process (its triton.language.core patched for good then);
    # Triton's own calls: 1 + 5 programs x 2 helper calls a launch
    assert patched.count("_rows_max") == 2 and len(patched) <= 3, patched
    assert {name: getattr(tl, name) for name in before} == before


@pytest.mark.cpu_only
def test_the_interpreter_builds_each_shape_once():
    """tests/interpreter_fixes.py: block types, tensors and tuple types built once a shape and named when read hold
    what Triton 3.6's own code builds (shape, element count, name, equality, the numpy dtype of a load), raise its
    errors, and two block types of one shape share its tuple."""
    from triton.language import core
    from triton.runtime import interpreter

    if not hasattr(core.block_type, "_triton_init"):
        pytest.skip(f"the fix is for Triton 3.6 only, not {triton.__version__}")

    def triton_block(element_ty, dims):
        bt = object.__new__(core.block_type)
        core.block_type._triton_init(bt, element_ty, dims)
        return bt

    def triton_tensor(type):
        t = object.__new__(core.tensor)
        core.tensor._triton_init(t, None, type)
        return t

    elements = [tl.float32, tl.bfloat16, tl.int1, tl.float8e4nv, tl.pointer_type(tl.float32)]
    for dims in ([16], [4, 8], [1, 32, 2], [tl.constexpr(8), 2], core.tuple([tl.constexpr(2), tl.constexpr(64)])):
        for elt in elements:
            ours, theirs = core.block_type(elt, dims), triton_block(elt, dims)
            assert type(ours.shape) is type(theirs.shape) is core.tuple and ours.shape.values == theirs.shape.values
            assert (ours.numel, ours.name, str(ours), repr(ours)) == (theirs.numel, theirs.name, str(theirs),
                                                                      repr(theirs))  # fmt: skip
            assert ours == theirs and ours.with_element_ty(tl.int32) == theirs.with_element_ty(tl.int32)
            assert ours.mangle() == theirs.mangle() and ours.shape is core.block_type(elt, list(dims)).shape
            assert interpreter._get_np_dtype(ours) == interpreter._triton_np_dtype(theirs)
            a, b = core.tensor(None, ours), triton_tensor(theirs)
            assert [d.value for d in a.shape] == [d.value for d in b.shape] and a.numel.value == b.numel.value
            assert (a.dtype, a.type, str(a)) == (b.dtype, b.type, str(b))
    for scalar in (tl.int32, tl.float32, tl.pointer_type(tl.bfloat16)):
        a, b = core.tensor(None, scalar), triton_tensor(scalar)
        assert list(a.shape) == list(b.shape) == [] and a.numel.value == b.numel.value == 1 and a.dtype == b.dtype
        assert interpreter._get_np_dtype(scalar) == interpreter._triton_np_dtype(scalar)
    core.block_type(tl.float32, [2])  # (2.0 after 2, whose tuples are built: refused all the same)
    for dims, error, match in (([3], ValueError, "must be a power of 2"), ([], TypeError, "0d block_type"),
                               ([2.0], TypeError, "must have type"), ((4,), AssertionError, None)):  # fmt: skip
        for make in (core.block_type, triton_block):
            with pytest.raises(error, match=match):
                make(tl.float32, dims)
    values = [tl.constexpr(3), core.tensor(None, core.block_type(tl.float16, [4]))]
    ours, theirs = core._type_for_tuple_values(values, ["a", "b"]), object.__new__(core.tuple_type)
    core.tuple_type._triton_init(theirs, [v.type for v in values], ["a", "b"])
    assert ours.name == str(ours) == theirs.name == "[a:constexpr_type[3],b:<['4'], fp16>]" and ours == theirs
