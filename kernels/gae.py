"""GAE advantages and returns in one Triton launch, plus masked mean / whitening (optionally across ranks).

Semantics of `gae` (the oracle is kernels.reference.gae, the reversed Python loop of TRL / OpenRLHF /
veRL generalised with a mask):
  - rewards, values, mask are [B, T]; mask != 0 marks response tokens. Each row's masked positions,
    in time order, are the steps of its trajectory: a left-padded prompt before them, right padding
    after them, and holes between them are all skipped ("next step" = next masked position).
  - V_next(t) = value at the row's next masked position after t, or 0 after the last one;
    delta_t = r_t + gamma * V_next(t) - V_t;  A_t = delta_t + gamma * lam * A_next(t);  R_t = A_t + V_t.
  - Rewards and values outside the mask are never read (NaN there is harmless); advantages and
    returns outside the mask are exactly 0. A row with no masked position comes back all 0.

How the kernel works: one program owns BLOCK_B rows and walks time backwards in chunks of BLOCK_T.
A step is an affine map of the carried state (A, V_next):
  masked t:   (A, V_next) <- (r_t - V_t + gamma * V_next + gamma * lam * A,  V_t)
  unmasked t: (A, V_next) <- (A, V_next)                       (the "skip")
Maps compose associatively, so each chunk is one tl.associative_scan over its time axis (loaded in
descending time order, so a forward scan runs backwards in time) and the chunk's last state is
carried into the next chunk. The linear part is [[p, q], [0, s]] plus an offset (u, w): five
fp32 numbers per element, log2(BLOCK_T) combine levels instead of T serial steps.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels import reference
from kernels.dispatch import compute_dtype, loop_bound, use_triton

_MAX_BLOCK_T = 1024  # a 1024-step response is one chunk; longer rows loop over chunks
_MAX_TILE = 2048  # elements per program: 5 scan operands + loads stay in registers at 4-8 warps
_TARGET_PROGRAMS = 128  # about one program per H100 SM before packing several rows per program
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ============================================================================ Triton kernel ==


@triton.jit
def _compose(p_a, q_a, s_a, u_a, w_a, p_b, q_b, s_b, u_b, w_b):
    # a: the maps of the later time steps (earlier in scan order), b: the map applied after them.
    # (b o a)(x) = L_b (L_a x + o_a) + o_b with L = [[p, q], [0, s]], o = (u, w).
    return (
        p_b * p_a,
        p_b * q_a + q_b * s_a,
        s_b * s_a,
        p_b * u_a + q_b * w_a + u_b,
        s_b * w_a + w_b,
    )


@triton.jit
def _gae_kernel(
    r_ptr,
    v_ptr,
    m_ptr,
    adv_ptr,
    ret_ptr,
    B,
    T,
    stride_rb,
    stride_rt,
    stride_vb,
    stride_vt,
    stride_mb,
    stride_mt,
    stride_ob,
    gamma,
    gamma_lam,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows = rows.to(tl.int64)  # B * T may pass 2**31 elements
    steps = tl.arange(0, BLOCK_T)
    is_last = (steps == BLOCK_T - 1)[None, :]
    carry_a = tl.zeros([BLOCK_B], dtype=tl.float32)  # A at the next masked position (later chunks)
    carry_v = tl.zeros([BLOCK_B], dtype=tl.float32)  # V at the next masked position (later chunks)
    for start in range(0, loop_bound(T), BLOCK_T):
        t = (T - 1 - start - steps).to(tl.int64)  # descending time; t < 0 pads the earliest chunk
        ok = row_ok[:, None] & (t >= 0)[None, :]
        m = tl.load(m_ptr + rows[:, None] * stride_mb + t[None, :] * stride_mt, mask=ok, other=0) != 0
        # Masked-off lanes never touch memory, so garbage outside the mask cannot leak in.
        r = tl.load(r_ptr + rows[:, None] * stride_rb + t[None, :] * stride_rt, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None] * stride_vb + t[None, :] * stride_vt, mask=m, other=0.0).to(tl.float32)
        p = tl.where(m, gamma_lam, 1.0)
        q = tl.where(m, gamma, 0.0)
        s = tl.where(m, 0.0, 1.0)
        p, q, s, u, w = tl.associative_scan((p, q, s, r - v, v), axis=1, combine_fn=_compose)
        state_a = p * carry_a[:, None] + q * carry_v[:, None] + u
        state_v = s * carry_v[:, None] + w
        adv = tl.where(m, state_a, 0.0)
        offs = rows[:, None] * stride_ob + t[None, :]
        tl.store(adv_ptr + offs, adv, mask=ok)
        tl.store(ret_ptr + offs, tl.where(m, adv + v, 0.0), mask=ok)
        # The last scan column holds the state after this chunk's earliest step (pad steps are identity).
        carry_a = tl.sum(tl.where(is_last, state_a, 0.0), axis=1)
        carry_v = tl.sum(tl.where(is_last, state_v, 0.0), axis=1)


# ============================================================================ host launcher ==


def _check_gae_inputs(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    for name, x in (("rewards", rewards), ("values", values), ("mask", mask)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"gae: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"gae: {name} must be 2-D [B, T], got shape {tuple(x.shape)}")
    if values.shape != rewards.shape:
        raise ValueError(f"gae: values shape {tuple(values.shape)} != rewards shape {tuple(rewards.shape)}")
    if mask.shape != rewards.shape:
        raise ValueError(f"gae: mask shape {tuple(mask.shape)} != rewards shape {tuple(rewards.shape)}")
    if values.device != rewards.device or mask.device != rewards.device:
        raise ValueError(
            f"gae: tensors on different devices: rewards {rewards.device}, values {values.device}, mask {mask.device}"
        )
    for name, x in (("rewards", rewards), ("values", values)):
        if not x.dtype.is_floating_point:
            raise ValueError(f"gae: {name} must be floating point, got {x.dtype}")
    if mask.dtype.is_complex:
        raise ValueError(f"gae: mask must be bool, integer or float, got {mask.dtype}")
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"gae: {name} must be a finite real number, got {x!r}")


def _block_sizes(n_rows: int, n_steps: int) -> tuple[int, int, int]:
    block_t = min(triton.next_power_of_2(max(n_steps, 1)), _MAX_BLOCK_T)
    block_t = max(block_t, 16)
    # Pack rows into a program only while enough programs remain to fill the GPU.
    block_b = 1
    while block_b * 2 * block_t <= _MAX_TILE and triton.cdiv(n_rows, block_b * 2) >= _TARGET_PROGRAMS:
        block_b *= 2
    num_warps = 4 if block_b * block_t <= 1024 else 8
    return block_b, block_t, num_warps


def gae_forward(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the GAE kernel. rewards, values [B, T] fp32/bf16/fp16 (any strides), mask [B, T] -> fp32 [B, T] x2.

    out: optional preallocated (advantages, returns), fp32, contiguous, [B, T]; every element is written.
    """
    _check_gae_inputs(rewards, values, mask, gamma, lam)
    for name, x in (("rewards", rewards), ("values", values)):
        if x.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"gae kernel: {name} dtype {x.dtype} not supported (fp32, bf16, fp16)")
    n_rows, n_steps = rewards.shape
    if out is None:
        advantages = torch.empty(n_rows, n_steps, dtype=torch.float32, device=rewards.device)
        returns = torch.empty_like(advantages)
    else:
        advantages, returns = out
        for name, o in (("advantages", advantages), ("returns", returns)):
            if o.shape != rewards.shape or o.dtype != torch.float32 or o.device != rewards.device:
                raise ValueError(
                    f"gae: out {name} must be fp32 {tuple(rewards.shape)} on {rewards.device}, "
                    f"got {o.dtype} {tuple(o.shape)} on {o.device}"
                )
            if not o.is_contiguous():
                raise ValueError(f"gae: out {name} must be contiguous")
    if advantages.numel() == 0:
        return advantages, returns
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; pointers to int1 are awkward in Triton
    block_b, block_t, num_warps = _block_sizes(n_rows, n_steps)
    _gae_kernel[(triton.cdiv(n_rows, block_b),)](
        rewards,
        values,
        mask,
        advantages,
        returns,
        n_rows,
        n_steps,
        rewards.stride(0),
        rewards.stride(1),
        values.stride(0),
        values.stride(1),
        mask.stride(0),
        mask.stride(1),
        advantages.stride(0),
        float(gamma),
        float(gamma) * float(lam),
        BLOCK_B=block_b,
        BLOCK_T=block_t,
        num_warps=num_warps,
    )
    return advantages, returns


# ============================================================================ public functions ==


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked positions of each row, in one launch.

    rewards, values: [B, T] float (fp32; bf16/fp16 are upcast in the kernel). mask: [B, T] bool or
    numbers, nonzero = response token (left prompt padding, right padding and holes are skipped).
    Returns (advantages, returns), both [B, T] fp32, exactly 0 outside the mask; not differentiable
    (advantages are constants in PPO). See the module docstring for the recursion.
    CUDA (or the interpreter): the Triton kernel. Otherwise, or for float64: kernels.reference.gae.
    """
    _check_gae_inputs(rewards, values, mask, gamma, lam)
    with torch.no_grad():
        if use_triton(rewards) and rewards.dtype in _KERNEL_DTYPES and values.dtype in _KERNEL_DTYPES:
            return gae_forward(rewards, values, mask, gamma, lam)
        advantages, returns = reference.gae(rewards, values, mask, gamma, lam)
        return advantages, returns


def _check_masked(fn: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if x.shape != mask.shape:
        raise ValueError(f"{fn}: mask shape {tuple(mask.shape)} != x shape {tuple(x.shape)}")
    if x.device != mask.device:
        raise ValueError(f"{fn}: x on {x.device} but mask on {mask.device}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{fn}: x must be floating point, got {x.dtype}")
    return mask != 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean of x over mask != 0 -> 0-d tensor in compute_dtype(x.dtype); NaN when nothing is masked.

    With `group`, the mean over every rank's masked elements: one all_reduce of [sum, count] in
    float64 (a sum has no cancellation to fear, and float64 keeps counts exact). No host sync.
    """
    m = _check_masked("masked_mean", x, mask)
    stats = torch.stack([torch.where(m, x.double(), 0.0).sum(), m.sum(dtype=torch.float64)])
    if group is not None:
        dist.all_reduce(stats, group=group)
    return (stats[0] / stats[1]).to(compute_dtype(x.dtype))


def _moments(x: torch.Tensor, m: torch.Tensor, group: dist.ProcessGroup | None):
    """(count, mean, M2 = sum of squared deviations) over masked elements, float64 0-d tensors."""
    xd = torch.where(m, x.double(), 0.0)
    n = m.sum(dtype=torch.float64)
    mean = xd.sum() / n.clamp(min=1.0)
    m2 = torch.where(m, xd - mean, 0.0).square().sum()  # two-pass: centred before squaring
    if group is None:
        return n, mean, m2
    # One collective: gather every rank's (count, mean, M2) and merge them exactly (Chan et al.):
    # M2 = sum_i M2_i + sum_i n_i (mean_i - mean)^2. Unlike all_reduce of [sum, sum_sq, count], no
    # term like sum_sq - n * mean^2 cancels when |mean| >> std; every rank merges the same gathered
    # tensor in the same order, so all ranks get bit-identical statistics.
    local = torch.stack([n, mean, m2])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    counts, means, m2s = torch.stack(gathered).unbind(1)
    n = counts.sum()
    mean = (counts * means).sum() / n.clamp(min=1.0)
    m2 = m2s.sum() + (counts * (means - mean).square()).sum()
    return n, mean, m2


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    group: dist.ProcessGroup | None = None,
    eps: float = 1e-8,
    return_count: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(x - mean) * rsqrt(var + eps) over mask != 0 (TRL's masked_whiten); 0 outside the mask.

    x: any shape, float; mask: same shape. var is unbiased (Bessel, / (n - 1)) like TRL's masked_var,
    taken as 0 when fewer than two elements are masked (TRL raises; here that needs no host sync).
    shift_mean=False adds the mean back (TRL). With `group`, mean and var are over all ranks' masked
    elements (see _moments for the one-collective, cancellation-free merge). Computed in float64,
    returned in x's dtype; `return_count`: with the number of masked elements (over every rank), float64 0-d.
    """
    m = _check_masked("masked_whiten", x, mask)
    n, mean, m2 = _moments(x, m, group)
    var = m2 / (n - 1.0).clamp(min=1.0)
    # Applied in float64 too: x - mean rounds once, when the result is cast back to x's dtype.
    out = (x.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    out = torch.where(m, out, 0.0).to(x.dtype)
    return (out, n) if return_count else out
