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
