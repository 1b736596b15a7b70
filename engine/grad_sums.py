"""Weight grads straight into the optimizer's fp32 sums (Megatron's gradient-accumulation fusion).

Without it a training backward makes each linear layer's weight grad in the weight's dtype (bf16: a [out, in] tensor
the GEMM writes), then the optimizer's hook (engine/optim.py, fold_during_backward) adds it to that parameter's fp32
sum over the step's micro-batches and frees it: per micro-batch and parameter a kernel reading the half grad and
reading and writing the fp32 sum (10 bytes a parameter: 16 GB a micro-batch for a 13B model's 1.6B parameters a GPU
at TP 8, ~5 ms at an H100's copy rate), and each micro-batch's grad rounded to bf16 before it is summed. The GEMM into
the sum moves 6 bytes a parameter more in its epilogue (the fp32 sum read and written instead of a half grad written),
hidden as far as its main loop covers them: 2 to 5 ms less a micro-batch there.

Inside `into_sums()` (the trainer's micro-batches) a linear layer's weight grad is made by one GEMM that adds it to
its fp32 sum as it goes (kernels.dispatch.add_matmul_: torch.addmm with an fp32 out_dtype into the sum, the products
never rounded to half), where the device's torch has that GEMM; elsewhere the half product is added as before, one
kernel later, with the same rounding. The policy's LM head does the same through kernels/ppo_loss.py
(engine/ppo.py passes `target(weight)` as its weight_grad_into). The parameter's .grad then stays None, as the
optimizer's hook would have left it; grads of the other parameters (norms, embeddings) take the hook as before.

`target(weight)` is the sum a weight's grad goes to, or None (not inside into_sums, no autograd, a parameter no
optimizer holds, an fp32 parameter that is its own master, or ENABLED False): the optimizer sets `weight.grad_sum`
(engine/optim.py). ENABLED (default on; TULU_GRAD_SUMS=0 in the environment turns it off, as bench/ppo_step.py's
--no-grad-sums does): off, every grad takes the optimizer's hook as before (what the CPU's arithmetic equals bit for
bit; on a GPU the other side of an A/B). The choice is made in the forward and kept for its backward, so a layer
recomputed in the backward (activation checkpointing) makes the same one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kernels.decode_linear import linear as _plain_linear
from kernels.dispatch import add_matmul_, env_switch

ENABLED = env_switch("TULU_GRAD_SUMS", True)
_ACTIVE = 0


@contextlib.contextmanager
def into_sums() -> Iterator[None]:
    """Inside this block (a micro-batch's forward and backward), weight grads go straight into their fp32 sums."""
    global _ACTIVE
    _ACTIVE += 1
    try:
        yield
    finally:
        _ACTIVE -= 1


def target(weight: torch.Tensor) -> torch.Tensor | None:
    """The fp32 sum (weight's shape, made zero at its first use in a step) that weight's grad goes straight into, or
    None: see the module's docstring."""
    if not _ACTIVE or not ENABLED or not torch.is_grad_enabled() or not weight.requires_grad:
        return None
    getter = getattr(weight, "grad_sum", None)
    return getter() if getter is not None else None


class _LinearIntoSum(torch.autograd.Function):
    """y = x W^T whose backward adds dy^T x to W's fp32 sum (no grad for W itself)."""

    @staticmethod
    def forward(ctx, x, weight, acc):
        ctx.save_for_backward(x, weight)
        ctx.acc = acc
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ weight).view(*dy.shape[:-1], weight.shape[1]) if ctx.needs_input_grad[0] else None
        weight_grad(ctx.acc, dy2, x.reshape(-1, x.shape[-1]), False)
        ctx.acc = None
        return dx, None, None


def weight_grad(acc: torch.Tensor | None, dy: torch.Tensor, x: torch.Tensor, needed: bool) -> torch.Tensor | None:
    """The grad of W in y = x W^T (dy [M, out], x [M, in]) in a custom backward: added into W's fp32 sum `acc` (then
    None), else, where autograd wants it (`needed`), returned as autograd makes F.linear's (x^T dy, transposed)."""
    if acc is not None:
        add_matmul_(acc, dy.t(), x)
        return None
    return x.t().mm(dy).t() if needed else None


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T: inside into_sums with W's grad summed by an optimizer, the weight's grad straight into that sum;
    otherwise kernels.decode_linear.linear (F.linear, or a decode step's kernel)."""
    acc = target(weight)
    if acc is None:
        return _plain_linear(x, weight)
    return _LinearIntoSum.apply(x, weight, acc)
