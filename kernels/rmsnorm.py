"""Llama's RMSNorm in one pass forward and one pass backward (plus a small reduction for the weight grad).

y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), statistics in fp32: HF LlamaRMSNorm's arithmetic
(normalise in fp32, round to the input dtype, then scale). Eager PyTorch spends about six passes over
[tokens, hidden] on it (upcast, square, mean, scale, downcast, weight), forward and again backward; at
8192 tokens x 5120 that is ~1.5 GB of traffic per norm, two norms per layer. Here: read x, write y, and
an fp32 rstd per row saved for the backward, which reads x and dy once and writes dx once.

Backward (n = x * rstd in fp32, g = dy * weight):  dx = rstd * (g - n * mean(g * n)),  dweight = sum_rows dy * n_r
with n_r the normalised x rounded to the input dtype as the forward multiplied it. Each backward program
walks several row blocks and writes one fp32 partial of dweight; the partials are summed after.

Rows are tiled [BLOCK_ROWS, BLOCK_H] (the whole hidden dim in one tile: up to 16384 columns).

add_rms_norm(x, delta, weight) -> (y, h): the residual add fused in (h = x + delta, rounded to the dtype as
torch's add rounds it; y = rms_norm(h)), one pass instead of two: a decoder layer's two residual adds each
feed a norm (the next layer's, or the final one). Backward: dx = ddelta = dh + the norm's dx, also one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.decode_config import pdl_args
from kernels.dispatch import INTERPRET, loop_bound, pdl_prologue, sm_count, use_triton

_MAX_HIDDEN = 16384
_ROW_ELEMENTS = 8192 if not INTERPRET else 1 << 20  # elements per tile (interpreter: few big programs)
_BWD_PROGRAMS_PER_SM = 4


@triton.jit
def _rmsnorm_fwd_kernel(
    X, DELTA, H, W, Y, RSTD, n_rows, n_cols, stride_x, stride_d, stride_h, stride_y, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, HAS_DELTA: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Rows [pid * BLOCK_ROWS, +BLOCK_ROWS): Y = W * (X * rstd).to(X dtype); RSTD [n_rows] fp32. HAS_DELTA: the
    normalised rows are H = (X + DELTA).to(X dtype), stored. PDL: programmatic dependent launch (pdl_prologue)."""
    pdl_prologue(PDL)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_H)
    r_ok = rows < n_rows
    c_ok = cols < n_cols
    mask = r_ok[:, None] & c_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(DELTA + rows64[:, None] * stride_d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + d).to(H.dtype.element_ty)
        tl.store(H + rows64[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    n = (x * rstd[:, None]).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], (n * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=r_ok)


@triton.jit
def _rmsnorm_bwd_kernel(
    X, W, DY, DX, RSTD, DW_PART, DRES, n_rows, n_cols, stride_x, stride_dy, stride_dx, stride_dres, num_programs,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, HAS_DRES: tl.constexpr,
):  # fmt: skip
    """Row blocks pid, pid + num_programs, ...: DX, and this program's fp32 partial of dweight in DW_PART[pid].
    HAS_DRES: DX also carries DRES (the gradient reaching the normalised rows directly: the residual stream)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    c_ok = cols < n_cols
    w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], tl.float32)
    n_blocks = tl.cdiv(n_rows, BLOCK_ROWS)
    for blk in range(loop_bound(pid), loop_bound(n_blocks), loop_bound(num_programs)):
        rows = blk * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        r_ok = rows < n_rows
        mask = r_ok[:, None] & c_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=r_ok, other=0.0)
        n = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - n * (tl.sum(g * n, axis=1) / n_cols)[:, None])
        if HAS_DRES:
            dx += tl.load(DRES + rows64[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * n.to(DX.dtype.element_ty).to(tl.float32), axis=0)
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=c_ok)


def _tiles(n_cols: int) -> tuple[int, int, int]:
    block_h = triton.next_power_of_2(n_cols)
    block_rows = max(1, min(64, _ROW_ELEMENTS // block_h))
    num_warps = 4 if block_h <= 2048 else 8 if block_h <= 8192 else 16
    return block_rows, block_h, num_warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, hidden] with a contiguous last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rmsnorm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, rstd, h): h the normalised rows, x + delta when delta is given (a new tensor), else x itself."""
    x2, weight = _rows(x), weight.contiguous()  # (the kernels read weight with unit stride)
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    d2 = x2 if delta is None else _rows(delta)
    h = x2 if delta is None else torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows:
        block_rows, block_h, num_warps = _tiles(n_cols)
        _rmsnorm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
            x2, d2, h, weight, y, rstd, n_rows, n_cols, x2.stride(0), d2.stride(0), h.stride(0), y.stride(0), eps,
            BLOCK_ROWS=block_rows, BLOCK_H=block_h, HAS_DELTA=delta is not None, num_warps=num_warps,
            **pdl_args(x.device),  # (decode_config's pdl: programmatic dependent launch, sm_90+)
        )  # fmt: skip
    return y.view(x.shape), rstd, h.view(x.shape)


def _rmsnorm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dres: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of y = rms_norm(x); with dres, dx + dres (x also fed the residual stream)."""
    x2, dy2, weight = _rows(x), _rows(dy), weight.contiguous()
    r2 = dy2 if dres is None else _rows(dres)
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block_rows, block_h, num_warps = _tiles(n_cols)
    n_blocks = triton.cdiv(n_rows, block_rows)
    # a few programs per SM on a GPU; two elsewhere (the interpreter: each program walks several blocks)
    programs = max(1, min(n_blocks, _BWD_PROGRAMS_PER_SM * sm_count(x.device) if x.is_cuda else 2))
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    if n_rows:
        _rmsnorm_bwd_kernel[(programs,)](
            x2, weight, dy2, dx, rstd, partial, r2, n_rows, n_cols, x2.stride(0), dy2.stride(0), dx.stride(0),
            r2.stride(0), programs, BLOCK_ROWS=block_rows, BLOCK_H=block_h, HAS_DRES=dres is not None,
            num_warps=num_warps,
        )  # fmt: skip
    else:
        partial.zero_()
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd, _ = _rmsnorm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rmsnorm_bwd(dy, x, weight, rstd)
        return dx, dw, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, eps):
        y, rstd, h = _rmsnorm_fwd(x, weight, eps, delta)
        ctx.save_for_backward(h, weight, rstd)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no pass over zeros)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:  # only the sum was used
            return dh, dh, None, None
        dx, dw = _rmsnorm_bwd(dy.contiguous(), h, weight, rstd, None if dh is None else dh.contiguous())
        return dx, dx, dw, None


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h), h) with h = x + delta (both [..., H], one dtype): a residual add and the norm it feeds, in
    one pass each way; differentiable in x, delta and weight."""
    if x.shape != delta.shape or x.dtype != delta.dtype:
        raise ValueError(f"x {x.dtype} {tuple(x.shape)} and delta {delta.dtype} {tuple(delta.shape)} must match")
    _check_norm_args(x, weight)
    if not use_triton(x) or x.shape[-1] > _MAX_HIDDEN or x.dtype not in _KERNEL_DTYPES:
        return reference.add_rms_norm(x, delta, weight, eps)
    if weight.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    return _AddRMSNorm.apply(x, delta, weight, eps)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # (float64 goes to the reference, in float64)


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point [..., H] tensor, got {x.dtype} of shape {tuple(x.shape)}")
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight must be [H={x.shape[-1]}], got {tuple(weight.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """HF LlamaRMSNorm: x [..., H] (fp32/bf16/fp16), weight [H] -> [..., H] in x's dtype; differentiable in both."""
    _check_norm_args(x, weight)
    if not use_triton(x) or x.shape[-1] > _MAX_HIDDEN or x.dtype not in _KERNEL_DTYPES:
        return reference.rms_norm(x, weight, eps)
    if weight.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    return _RMSNorm.apply(x, weight, eps)
