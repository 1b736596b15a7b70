"""Llama's MLP activation silu(gate) * up in one pass, reading the fused gate_up projection as it is.

gate_up [..., 2I] holds [gate | up] (the fused projection's output, this rank's shard under TP).
Forward: y [..., I] = silu(gate).to(dtype) * up, HF's arithmetic in bf16 (silu rounded, then the product
rounded). Backward writes d(gate_up) [..., 2I] in the same fused layout, so autograd never concatenates
two half gradients:  d_up = dy * silu(gate),  d_gate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))).
Eager PyTorch takes a chunk, a silu, a product (and in backward two more products and a cat); here each
direction is one read and one write of each element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.decode_config import pdl_args
from kernels.dispatch import INTERPRET, fill_sms, pdl_prologue, sm_count, use_triton

_BLOCK_COLS = 1024
_BLOCK_ROWS = 64 if INTERPRET else 4


@triton.jit
def _load_gate_up(GU, n_rows, n_cols, stride_gu, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: rows, columns, mask, and gate and up in fp32."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    base = GU + rows[:, None] * stride_gu + cols[None, :]
    g = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + n_cols, mask=mask, other=0.0).to(tl.float32)
    return rows, cols, mask, g, u


@triton.jit
def _swiglu_fwd_kernel(
    GU, Y, n_rows, n_cols, stride_gu, stride_y, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr
):
    pdl_prologue(PDL)  # (programmatic dependent launch: decode_config's pdl)
    rows, cols, mask, g, u = _load_gate_up(GU, n_rows, n_cols, stride_gu, BLOCK_ROWS, BLOCK_C)
    act = (g * tl.sigmoid(g)).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (act * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    GU, DY, DGU, n_rows, n_cols, stride_gu, stride_dy, stride_dgu, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr
):
    rows, cols, mask, g, u = _load_gate_up(GU, n_rows, n_cols, stride_gu, BLOCK_ROWS, BLOCK_C)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    act = g * sig
    d_gate = dy * u * sig * (1.0 + g * (1.0 - sig))
    out = DGU + rows[:, None] * stride_dgu + cols[None, :]
    tl.store(out, d_gate.to(DGU.dtype.element_ty), mask=mask)
    tl.store(out + n_cols, (dy * act).to(DGU.dtype.element_ty), mask=mask)


def _launch(n_rows: int, n_cols: int, num_sms: int) -> tuple[tuple[int, int], int]:
    """(grid, rows per program): fewer rows a program while the grid would leave over half the SMs idle
    (kernels.dispatch.fill_sms: a decode step of 8 sequences at 13,824 columns, 28 programs of 4 rows on 132 SMs
    before, now 112 of 1); num_sms 0: as tiled."""
    col_blocks = triton.cdiv(n_cols, _BLOCK_COLS)
    rows = fill_sms(_BLOCK_ROWS, lambda r: triton.cdiv(n_rows, r) * col_blocks, num_sms)
    return (triton.cdiv(n_rows, rows), col_blocks), rows


def _sms(x: torch.Tensor) -> int:
    return sm_count(x.device) if x.is_cuda else 0  # (the interpreter: its few large programs)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gu = gate_up.reshape(-1, gate_up.shape[-1])
        if gu.stride(-1) != 1:
            gu = gu.contiguous()
        n_rows, n_cols = gu.shape[0], gu.shape[1] // 2
        y = torch.empty((n_rows, n_cols), dtype=gu.dtype, device=gu.device)
        if n_rows:
            grid, rows = _launch(n_rows, n_cols, _sms(gu))
            _swiglu_fwd_kernel[grid](
                gu,
                y,
                n_rows,
                n_cols,
                gu.stride(0),
                y.stride(0),
                BLOCK_ROWS=rows,
                BLOCK_C=_BLOCK_COLS,
                **pdl_args(gu.device),  # (decode_config's pdl: programmatic dependent launch, sm_90+)
            )
        ctx.save_for_backward(gu)
        ctx.shape = gate_up.shape
        return y.view(*gate_up.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy):
        (gu,) = ctx.saved_tensors
        return _backward(gu, dy).view(ctx.shape)


def _backward(gu: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """d(gate_up) [R, 2I] of gu [R, 2I] (last dim contiguous) for dy (R x I elements), by the backward kernel."""
    n_rows, n_cols = gu.shape[0], gu.shape[1] // 2
    dy2 = dy.reshape(n_rows, n_cols)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    dgu = torch.empty_like(gu)
    if n_rows:
        grid, rows = _launch(n_rows, n_cols, _sms(gu))
        _swiglu_bwd_kernel[grid](
            gu, dy2, dgu, n_rows, n_cols, gu.stride(0), dy2.stride(0), dgu.stride(0),
            BLOCK_ROWS=rows, BLOCK_C=_BLOCK_COLS,
        )  # fmt: skip
    return dgu


def _check_gate_up(gate_up: torch.Tensor) -> None:
    if gate_up.dim() < 1 or not gate_up.dtype.is_floating_point:
        raise ValueError(
            f"gate_up must be a floating-point [..., 2I] tensor, got {gate_up.dtype} {tuple(gate_up.shape)}"
        )
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even ([gate | up]), got {gate_up.shape[-1]}")


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2I] = [gate | up] (fp32/bf16/fp16) -> [..., I]; differentiable."""
    _check_gate_up(gate_up)
    if not use_triton(gate_up) or gate_up.dtype == torch.float64:  # (float64: the reference, in float64)
        return reference.swiglu(gate_up)
    return _SwiGLU.apply(gate_up)


def swiglu_backward(gate_up: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The grad of gate_up [..., 2I] for the grad dy [..., I] of swiglu(gate_up), without autograd (what swiglu's
    backward computes, the same bits): for a caller that kept gate_up and recomputes the activation itself."""
    _check_gate_up(gate_up)
    want = (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    if tuple(dy.shape) != want or not dy.dtype.is_floating_point:
        raise ValueError(f"dy must be a floating-point tensor of swiglu's output shape {want}, got {dy.dtype} "
                         f"{tuple(dy.shape)}")  # fmt: skip
    if not use_triton(gate_up) or gate_up.dtype == torch.float64:
        with torch.enable_grad():
            gu = gate_up.detach().requires_grad_()
            (dgu,) = torch.autograd.grad(reference.swiglu(gu), gu, dy)
        return dgu
    gu = gate_up.reshape(-1, gate_up.shape[-1])
    return _backward(gu if gu.stride(-1) == 1 else gu.contiguous(), dy).view(gate_up.shape)
