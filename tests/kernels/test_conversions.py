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
