"""Fused token log-probs and entropy, from logits or from hidden states, and the KL estimators.

token_logprobs(logits [..., V], targets [...]) -> log softmax(logits / T)[target] (fp32 [...]) and
optionally the entropy of softmax(logits / T) (fp32 [...]). One read of each row forward: an online
logsumexp over BLOCK_V chunks keeps the running max m of the raw logits x, sum s = sum exp(d) and, for the entropy,
w = sum exp(d) * d with d = (x - m) / T = z - max z (relative to m so logits of 1e4 do not cancel; x / T first would
round at ulp(x / T)); then logp = d_t - log s, entropy = log s - w / s, never forming lse = max z + log s (it rounds
at ulp(m), 1e-3 for logits of 1e4). Backward is one more read of the row that writes grad_logits in the logits'
dtype from the saved per-row (m, log s) pair and entropy, with p_j = exp(d_j - log s):
    dlogp/dz_j = [j == t] - p_j,    dH/dz_j = -p_j (log p_j + H).

hidden_logprobs(hidden [N, H], weight [V, H], targets [N]) fuses the LM head: rows are processed in
chunks of C rows (logits chunk [C, V] = one torch GEMM, then the same row kernel), so the extra memory
is O(C x V), never O(N x V). Backward recomputes each chunk's logits, turns them into grad_logits in
place and does the two grad GEMMs (4 GEMMs in all, because per-token outputs can receive any
gradient). The PPO token loss built on these kernels (3 GEMMs: it knows its gradient in the forward) is
kernels/ppo_loss.py.

Cost model (H100, bf16, N = 32768, V = 32000): forward reads the logits once (2.1 GB, 0.70 ms at
3 TB/s), backward reads them once and writes grad_logits once (1.4 ms); extra memory O(N). Hidden path
(N = 8192, H = 5120, V = 32000): each GEMM is 2.7 TFLOP, so hidden_logprobs forward + backward
(4 GEMMs) has a 14.8 ms floor at 724 TFLOP/s.

Vocab parallel (`group`): logits / weight rows are this rank's contiguous vocab slice
[r * V_local, (r + 1) * V_local); targets are global ids. The kernel writes per-row partial stats
(m, s, w, x_t) and the host combines them with one all_reduce(MAX) and one all_reduce(SUM) of a
stacked [N, 3] tensor. Outputs are replicated over the group; each rank's backward writes the grad
of its own slice (no collective), and the grad of `hidden` is all-reduced (hidden is replicated).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import dispatch, reference

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
# Block size used under the interpreter (tests lower it to exercise the multi-block paths).
_INTERPRET_BLOCK_V = 4096
# Target size of one [C, V] logits chunk in hidden_logprobs / the fused PPO loss.
_CHUNK_BYTES = 256 * 1024 * 1024
# CUDA targets are range-checked with an async device assert (a few tiny launches, no host sync);
# set False to skip it (out-of-range targets still come back as NaN log-probs).
CHECK_TARGETS_ON_GPU = True
# Tests set a fixed number of rows per chunk to exercise several (and ragged) chunks.
_CHUNK_ROWS: int | None = None
# (tests) the interpreter runs the forward's persistent kernel (PERSISTENT_ROWS' on a GPU) with this many programs
_INTERPRET_PERSIST_PROGRAMS = 0

# ------------------------------------------------------------------------------------ jit kernels


@triton.jit(do_not_specialize=["n_rows"])  # (read by the persistent loop alone: one binary for every row count)
def _logprob_fwd_kernel(
    x_ptr,  # [B, T, V] logits (last stride 1)
    stride_b,
    stride_t,
    T,
    tgt_ptr,  # [B * T] int64 global target ids
    norm_ptr,  # [B * T, 2] fp32 out (FINALIZE): m (of the raw logits), log s
    logp_ptr,  # [B * T] fp32 out (FINALIZE)
    ent_ptr,  # [B * T] fp32 out (FINALIZE and HAS_ENT)
    stats_ptr,  # [B * T, 4] fp32 out (not FINALIZE): m, s, w, x_target (m and x raw, s and w of z = x / T)
    V: tl.constexpr,  # constexpr: vocab sizes are few, and the loop bound must be static for the interpreter
    v_start,
    inv_temp,
    n_rows,
    BLOCK_V: tl.constexpr,
    HAS_ENT: tl.constexpr,
    FINALIZE: tl.constexpr,
    PERSIST: tl.constexpr = False,
    STAGES: tl.constexpr = 2,
):
    """One row a program; PERSIST: a grid of fewer programs, each taking rows pid, pid + programs, ... in a loop that
    Triton's pipeliner runs ahead: the next STAGES - 1 rows' logits copied into shared memory while one is reduced
    (num_stages given to the loop itself: without it the pipeliner stages only loads that feed a dot)."""
    if PERSIST:
        first, step = dispatch.loop_bound(tl.program_id(0)), dispatch.loop_bound(tl.num_programs(0))
        for row in tl.range(first, dispatch.loop_bound(n_rows), step, num_stages=STAGES):
            _logprob_fwd_row(
                tl.cast(row, tl.int64), x_ptr, stride_b, stride_t, T, tgt_ptr, norm_ptr, logp_ptr, ent_ptr, stats_ptr,
                V, v_start, inv_temp, BLOCK_V, HAS_ENT, FINALIZE,
            )  # fmt: skip
    else:
        _logprob_fwd_row(
            tl.program_id(0).to(tl.int64), x_ptr, stride_b, stride_t, T, tgt_ptr, norm_ptr, logp_ptr, ent_ptr,
            stats_ptr, V, v_start, inv_temp, BLOCK_V, HAS_ENT, FINALIZE,
        )  # fmt: skip


@triton.jit
def _logprob_fwd_row(
    row, x_ptr, stride_b, stride_t, T, tgt_ptr, norm_ptr, logp_ptr, ent_ptr, stats_ptr, V: tl.constexpr, v_start,
    inv_temp, BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, FINALIZE: tl.constexpr,
):  # fmt: skip
    """The forward of one row (see _logprob_fwd_kernel's arguments)."""
    x_row = x_ptr + (row // T) * stride_b + (row % T) * stride_t
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    w = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        # -inf padding: exp gives 0 and the entropy term is clamped below, so it adds nothing.
        x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))  # (m: the max of the raw logits; T > 0 keeps it that of z)
        # A prefix of all -inf (masked vocab) keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # (x - m) / T, not x / T - m / T: x / T rounds at ulp(x / T), 1e-3 for logits of 1e4 at T = 0.7
        d = (x - m_safe) * inv_temp
        e = tl.exp(d)
        alpha = tl.exp((m - m_safe) * inv_temp)
        if HAS_ENT:
            # e * (z - m): e is exactly 0 below d = -104, so clamping d at -200 only removes 0 * -inf. The two sums in
            # one reduction: one round of shuffles and barriers for both (the entropy's extra time was its own round)
            s_blk, w_blk = dispatch.sum_pair(e, e * tl.maximum(d, -200.0), 0)
            shift = tl.where(m == float("-inf"), 0.0, (m - m_safe) * inv_temp)
            w = alpha * (w + shift * s) + w_blk
        else:
            s_blk = tl.sum(e, 0)
        s = alpha * s + s_blk
        m = m_new
    t_local = tl.load(tgt_ptr + row) - v_start
    in_shard = (t_local >= 0) & (t_local < V)
    x_t = tl.load(x_row + t_local, mask=in_shard, other=0.0).to(tl.float32)
    if FINALIZE:
        log_s = tl.log(s)
        # An out-of-range target (the host checks CPU tensors; CUDA gets an async assert) gives NaN.
        # (x_t - m) / T - log(s), not z_t - lse: lse = m + log(s) rounds at ulp(m), 1e-3 for logits of 1e4
        tl.store(logp_ptr + row, tl.where(in_shard, (x_t - m) * inv_temp - log_s, float("nan")))
        tl.store(norm_ptr + row * 2, m)
        tl.store(norm_ptr + row * 2 + 1, log_s)
        if HAS_ENT:
            tl.store(ent_ptr + row, log_s - w / s)
    else:
        tl.store(stats_ptr + row * 4 + 0, m)
        tl.store(stats_ptr + row * 4 + 1, s)
        tl.store(stats_ptr + row * 4 + 2, w)
        tl.store(stats_ptr + row * 4 + 3, x_t)


@triton.jit
def _logprob_bwd_kernel(
    x_ptr,  # [B, T, V] logits (last stride 1)
    stride_b,
    stride_t,
    T,
    gx_ptr,  # [B * T, V] grad of the logits, contiguous (may alias x when x is contiguous)
    tgt_ptr,  # [B * T] int64
    norm_ptr,  # [B * T, 2] fp32 global (max of x, log sum exp((x - max) / temperature))
    ent_ptr,  # [B * T] fp32 entropy (HAS_GENT)
    glp_ptr,  # [B * T] fp32 grad of the log-probs
    gent_ptr,  # [B * T] fp32 grad of the entropy (HAS_GENT)
    V: tl.constexpr,  # constexpr: vocab sizes are few, and the loop bound must be static for the interpreter
    v_start,
    inv_temp,
    BLOCK_V: tl.constexpr,
    HAS_GENT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // T) * stride_b + (row % T) * stride_t
    gx_row = gx_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    m = tl.load(norm_ptr + row * 2)
    log_s = tl.load(norm_ptr + row * 2 + 1)
    glp = tl.load(glp_ptr + row)
    t_local = tl.load(tgt_ptr + row) - v_start
    if HAS_GENT:
        gent = tl.load(gent_ptr + row)
        ent = tl.load(ent_ptr + row)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        lp = (x - m) * inv_temp - log_s  # (not z - lse: lse rounds at ulp(m); nor x / T - m / T)
        p = tl.exp(lp)
        g = tl.where(offs == t_local, glp, 0.0) - glp * p
        if HAS_GENT:
            # p is 0 where lp < -104, so the clamp only removes 0 * -inf on masked (-inf) entries.
            g -= gent * p * (tl.maximum(lp, -200.0) + ent)
        tl.store(gx_row + offs, (g * inv_temp).to(gx_ptr.dtype.element_ty), mask=mask)


def _configs():
    # One program per row; the row is streamed in BLOCK_V chunks. Wide blocks with many warps keep
    # enough bytes in flight per SM to run at HBM bandwidth; autotuned per (V, dtype) on the GPU. 32768: Llama's
    # whole 32000-token row in one block (no loop-carried rescaling; ptxas at sm_90: no spills either way).
    shapes = [(256, 2), (1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32), (16384, 32), (32768, 32)]
    return [triton.Config({"BLOCK_V": b}, num_warps=w) for b, w in shapes]


def _prune_configs(configs, named_args, **kwargs):
    """Drop blocks much wider than the row (a tiny vocabulary) and narrow blocks for a large one."""
    v = named_args["V"]
    cap = max(256, triton.next_power_of_2(v))
    kept = [c for c in configs if c.kwargs["BLOCK_V"] <= cap and (v < 8192 or c.kwargs["BLOCK_V"] >= 2048)]
    return kept or configs[:1]


def _persist_configs():
    # (block, warps, stages) of the persistent forward (PERSISTENT_ROWS): the whole row in one block, the next rows'
    # logits copied into shared memory (num_stages - 1 rows ahead) while this one is reduced
    # (3 stages: two rows' buffers, one being copied in while the other is reduced; 2 would issue the next row's copy
    # only after this row's reductions, its one buffer still being read)
    shapes = [(32768, 32, 3), (32768, 16, 3), (16384, 16, 3), (8192, 8, 3)]
    return [
        triton.Config({"BLOCK_V": b, "PERSIST": True, "STAGES": st}, num_warps=w, num_stages=st) for b, w, st in shapes
    ]


def _prune_persist(configs, named_args, **kwargs):
    """The plain configs as _prune_configs keeps them, and the persistent ones whose block holds the whole row (a
    narrower block has a loop over the row inside, which the pipeliner would run ahead instead of the rows')."""
    v = named_args["V"]
    plain = _prune_configs([c for c in configs if not c.kwargs.get("PERSIST")], named_args)
    cap = max(256, triton.next_power_of_2(v))
    return plain + [c for c in configs if c.kwargs.get("PERSIST") and v <= c.kwargs["BLOCK_V"] <= cap]


def persist_programs(n_rows: int, meta: dict, num_sms: int, elt: int) -> int:
    """The persistent forward's grid: as many programs as the SMs' shared memory holds at once (STAGES - 1 row
    buffers a program; for every persistent config the tighter limit, threads never), at most one a row. From the
    kernel's own arguments (BLOCK_V, STAGES): the grid a launch computes sees those, not num_warps nor num_stages."""
    staged = meta["BLOCK_V"] * elt * max(1, meta["STAGES"] - 1)
    return max(1, min(n_rows, num_sms * max(1, 200 * 1024 // staged)))


_prune = {"early_config_prune": _prune_configs}
_fwd_tuned = dispatch.autotune(_configs(), key=["V", "HAS_ENT", "FINALIZE"], prune_configs_by=_prune)(
    _logprob_fwd_kernel
)
# the forward with the persistent configs beside the plain ones (PERSISTENT_ROWS): the tuner times both kinds
_fwd_persist_tuned = dispatch.autotune(
    _configs() + _persist_configs(),
    key=["V", "HAS_ENT", "FINALIZE"],
    prune_configs_by={"early_config_prune": _prune_persist},
)(_logprob_fwd_kernel)

# The forward's rows taken in a loop by a persistent grid whose next rows' logits are copied in while one is reduced
# (the plain kernel holds one row a program, two programs an SM at a 32000-wide row: each row's load and its
# reductions in series, 77% of the copy rate on an H200). Opt-in until a GPU has timed it: the log-prob bench's rows
# "ours, rows pipelined"; on, the autotuner times the persistent configs beside the plain ones and keeps the faster.
PERSISTENT_ROWS = False
# restore_value: the grad may be written in place over the logits, which a re-run would then misread.
_bwd_tuned = dispatch.autotune(_configs(), key=["V", "HAS_GENT"], prune_configs_by=_prune, restore_value=["gx_ptr"])(
    _logprob_bwd_kernel
)

# ------------------------------------------------------------------------------- host launchers


def _interpret_block(V: int) -> int:
    """The interpreter's block: the row, within _INTERPRET_BLOCK_V (tests shrink it to take several blocks a row)."""
    return max(16, min(triton.next_power_of_2(V), _INTERPRET_BLOCK_V))


def _launch(raw, tuned, n_rows: int, V: int, *args, **meta) -> None:
    if n_rows == 0:
        return
    if dispatch.INTERPRET:
        raw[(n_rows,)](*args, BLOCK_V=_interpret_block(V), num_warps=4, **meta)
    else:
        tuned[(n_rows,)](*args, **meta)


def _launch_fwd(n_rows: int, V: int, x3: torch.Tensor, *args, **meta) -> None:
    """The forward: the plain tuner, or with PERSISTENT_ROWS the one that also times the persistent configs (a grid of
    persist_programs for those). `_INTERPRET_PERSIST_PROGRAMS` (tests): the interpreter runs the persistent kernel
    with that many programs."""
    if n_rows == 0:
        return
    if dispatch.INTERPRET and _INTERPRET_PERSIST_PROGRAMS:
        grid = (min(n_rows, _INTERPRET_PERSIST_PROGRAMS),)
        _logprob_fwd_kernel[grid](x3, *args, n_rows, BLOCK_V=_interpret_block(V), num_warps=4, PERSIST=True, **meta)
    elif dispatch.INTERPRET or not PERSISTENT_ROWS:
        _launch(_logprob_fwd_kernel, _fwd_tuned, n_rows, V, x3, *args, n_rows, **meta)
    else:
        sms, elt = dispatch.sm_count(x3.device), x3.element_size()
        grid = lambda m: (persist_programs(n_rows, m, sms, elt) if m.get("PERSIST") else n_rows,)
        _fwd_persist_tuned[grid](x3, *args, n_rows, **meta)


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """View logits [..., V] as [B, T, V] with unit last stride, copying only when no such view exists."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 1:
        return logits.view(1, 1, -1)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() == 3:
        return logits
    return logits.reshape(math.prod(logits.shape[:-2]), logits.shape[-2], logits.shape[-1])  # (-1: no empty batch)


def _check_targets(targets: torch.Tensor, v_total: int) -> None:
    if targets.numel() == 0:
        return
    if targets.device.type == "cpu":
        lo, hi = torch.aminmax(targets)
        if int(lo) < 0 or int(hi) >= v_total:
            raise ValueError(f"targets out of range [0, {v_total}): min {int(lo)}, max {int(hi)}")
    elif CHECK_TARGETS_ON_GPU:
        # No host sync on the GPU: the check fails the stream asynchronously (and the kernel writes NaN).
        torch._assert_async(((targets >= 0) & (targets < v_total)).all(), f"targets out of range [0, {v_total})")


def _tp_group(group):
    """`group`, or None where it holds one rank (the TP group of a data-parallel-only run): the whole vocabulary is
    here, and the vocab-parallel path would only add collectives (two per forward, one per backward) over one rank and
    round otherwise than one process does."""
    if group is None:
        return None
    import torch.distributed as dist

    return None if dist.get_world_size(group) == 1 else group


def _group_info(group, v_local: int) -> tuple[int, int]:
    """(first global vocab id of this rank's slice, total vocab size)."""
    if group is None:
        return 0, v_local
    import torch.distributed as dist

    return dist.get_rank(group) * v_local, dist.get_world_size(group) * v_local


def _combine_stats(
    stats: torch.Tensor, group, temperature: float, targets: torch.Tensor, v_total: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rank [N, 4] (m, s, w, x_t) -> global (norm [N, 2] = (m, log s), logp, entropy) with two collectives. A
    target outside [0, v_total) gets a NaN log-prob, as one rank's kernel gives it (no host sync): every rank holds
    x_t 0 for a target outside its slice, and one outside them all would otherwise combine into a real-looking one."""
    import torch.distributed as dist

    m, s, w, x_t = stats.unbind(-1)
    m_all = m.clone()
    dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
    alpha = torch.exp((m - m_all) / temperature)  # 0 on a rank whose slice of the row is all -inf
    shift = torch.where(s > 0, (m - m_all) / temperature, torch.zeros_like(m))
    local = torch.stack([s * alpha, (w + shift * s) * alpha, x_t], dim=-1)
    dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
    s_all, w_all, x_t_all = local.unbind(-1)
    log_s = torch.log(s_all)
    # (as the kernel: never m + log s, which rounds at ulp(m), nor x / T - m / T)
    logp = torch.where((targets >= 0) & (targets < v_total), (x_t_all - m_all) / temperature - log_s, float("nan"))
    return torch.stack([m_all, log_s], dim=-1), logp, log_s - w_all / s_all


def _fwd_outputs(like: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (norm [n, 2], logp [n], entropy [n]) fp32 on `like`'s device."""
    return (
        like.new_empty(n, 2, dtype=torch.float32),
        like.new_empty(n, dtype=torch.float32),
        like.new_empty(n, dtype=torch.float32),
    )


def _fwd(x3, targets, temperature, has_ent, v_start, norm=None, logp=None, ent=None, stats=None) -> None:
    """Launch the forward kernel: final (norm [N, 2], logp, ent) when `stats` is None, else partial [N, 4] stats."""
    ptrs = (norm, logp, ent, norm) if stats is None else (stats,) * 4
    _launch_fwd(
        targets.numel(), x3.shape[-1], x3, x3.stride(0), x3.stride(1), x3.shape[1], targets, *ptrs,
        x3.shape[-1], v_start, 1.0 / temperature, HAS_ENT=has_ent, FINALIZE=stats is None,
    )  # fmt: skip


def logprob_forward(
    x3: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    has_ent: bool,
    group=None,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x3 [B, T, V] (this rank's slice), targets [B*T] int64 -> (norm, logp, entropy or None), fp32: norm [B*T, 2]
    = the row's (max of x, log sum exp((x - max) / temperature)), which the backward needs; logp, entropy [B*T].

    `out` = preallocated (norm, logp, entropy) fp32 tensors (tests poison them with NaN).
    """
    n, v = targets.numel(), x3.shape[-1]
    v_start, v_total = _group_info(group, v)
    if group is None:
        norm, logp, ent = out if out is not None else _fwd_outputs(x3, n)
        _fwd(x3, targets, temperature, has_ent, v_start, norm, logp, ent)
        return norm, logp, ent if has_ent else None
    stats = x3.new_empty(n, 4, dtype=torch.float32)
    _fwd(x3, targets, temperature, has_ent, v_start, stats=stats)
    norm, logp, ent = _combine_stats(stats, group, temperature, targets, v_total)
    if out is not None:
        for dst, src in zip(out, (norm, logp, ent)):
            dst.copy_(src)
        norm, logp, ent = out
    return norm, logp, ent if has_ent else None


def logprob_backward(
    x3: torch.Tensor,
    targets: torch.Tensor,
    norm: torch.Tensor,
    ent: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_ent: torch.Tensor | None,
    temperature: float,
    v_start: int = 0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad of this rank's logits slice, [B*T, V] contiguous in x3's dtype (`out` may alias x3)."""
    n, v = targets.numel(), x3.shape[-1]
    gx = out if out is not None else torch.empty(n, v, dtype=x3.dtype, device=x3.device)
    glp = grad_logp.float().contiguous() if grad_logp is not None else norm.new_zeros(n)
    has_gent = grad_ent is not None and ent is not None
    gent = grad_ent.float().contiguous() if has_gent else glp
    _launch(
        _logprob_bwd_kernel, _bwd_tuned, n, v,
        x3, x3.stride(0), x3.stride(1), x3.shape[1], gx, targets, norm, ent if has_gent else glp, glp, gent,
        v, v_start, 1.0 / temperature, HAS_GENT=has_gent,
    )  # fmt: skip
    return gx


# ---------------------------------------------------------------------------- autograd functions


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, has_ent, group):
        ctx.set_materialize_grads(False)  # an unused output (often the entropy) costs nothing backward
        x3 = _as_rows(logits)
        norm, logp, ent = logprob_forward(x3, targets, temperature, has_ent, group)
        ctx.save_for_backward(x3, targets, norm, ent)
        ctx.temperature, ctx.group, ctx.shape = temperature, group, logits.shape
        if has_ent:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        x3, targets, norm, ent = ctx.saved_tensors
        v_start, _ = _group_info(ctx.group, x3.shape[-1])
        gx = logprob_backward(x3, targets, norm, ent, grad_logp, grad_ent, ctx.temperature, v_start)
        return gx.view(ctx.shape), None, None, None, None


def _chunk_rows(n: int, v: int, elt: int) -> int:
    """Rows C per [C, V] logits chunk: about _CHUNK_BYTES, a multiple of 128 rows (GEMM tiles) when large."""
    if _CHUNK_ROWS is not None:
        return _CHUNK_ROWS
    rows = max(1, _CHUNK_BYTES // max(1, v * elt))
    return max(1, min(n, rows - rows % 128 if rows >= 256 else rows))


def _hidden_grad_chunk(lg, h, weight, targets, norm, ent, glp, gent, temperature, v_start, gh, gw, first,
                       real_vocab=None):  # fmt: skip
    """Turn one chunk's logits lg [c, V] into grad_logits in place, then the two grad GEMMs:
    gh [c, H] = grad_logits @ weight, gw [V, H] (+)= grad_logits.T @ h. A gw in fp32 under half weights (_weight_grad:
    several chunks, or a caller's fp32 sum) takes each chunk's product in fp32 (dispatch.add_matmul_), never a half
    running sum. Rows from `real_vocab` on (padding) get a zero grad_logits, even where a target lies among them (its
    one-hot term)."""
    logprob_backward(lg.unsqueeze(0), targets, norm, ent, glp, gent, temperature, v_start, out=lg)
    _mask_padding(lg, real_vocab, 0.0)
    if gh is not None:
        torch.mm(lg, weight, out=gh)
    if gw is not None:
        if gw.dtype != lg.dtype:  # (an fp32 sum of half chunks: on a GPU one GEMM into it, no half product apart)
            dispatch.add_matmul_(gw, lg.t(), h, accumulate=not first)
        elif first:
            torch.mm(lg.t(), h, out=gw)
        else:
            gw.addmm_(lg.t(), h)


def _scale_(g: torch.Tensor, scale: torch.Tensor) -> None:
    """g *= scale (0-d fp32) computed in fp32: a half g times a device scalar rounds the scalar to g's dtype first
    (0.3 -> 0.30078 in bf16); a few thousand rows at a time, so the fp32 copy stays small."""
    if g.dtype == torch.float32:
        g.mul_(scale)
        return
    for r0 in range(0, g.shape[0], 4096):
        part = g[r0 : r0 + 4096]
        part.copy_(part.float().mul_(scale))


def _weight_grad(weight: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    """The LM head's grad buffer: the weight's dtype for one chunk, fp32 when half weights take several (a bf16 sum
    rounded once per chunk drifts by about 2^-9 a chunk, and cancelling chunks lose more)."""
    half = weight.dtype in (torch.float16, torch.bfloat16)
    return torch.empty(weight.shape, dtype=torch.float32 if half and n > rows else weight.dtype, device=weight.device)


def _mask_padding(lg: torch.Tensor, real_vocab: int | None, fill: float = float("-inf")) -> torch.Tensor:
    """-inf (or `fill`: 0 in a grad) in the logits of weight rows past `real_vocab` (the padding of a vocabulary the
    TP degree does not divide: engine.parallel.shard_rows), in place: no token, and a zero grad for those rows."""
    if real_vocab is not None and real_vocab < lg.shape[-1]:
        lg[..., real_vocab:] = fill
    return lg


def _hidden_forward(hidden, weight, targets, temperature, has_ent, group, rows, real_vocab=None):
    """Chunked forward; with `group` the partial stats of all chunks are combined at once (2 collectives)."""
    n, v = hidden.shape[0], weight.shape[0]
    v_start, v_total = _group_info(group, v)
    norm, logp, ent = _fwd_outputs(hidden, n)
    stats = hidden.new_empty(n, 4, dtype=torch.float32) if group is not None else None
    for r0 in range(0, n, rows):
        sl = slice(r0, min(n, r0 + rows))
        lg = _mask_padding(hidden[sl] @ weight.t(), real_vocab).unsqueeze(0)
        if group is None:
            _fwd(lg, targets[sl], temperature, has_ent, v_start, norm[sl], logp[sl], ent[sl])
        else:
            _fwd(lg, targets[sl], temperature, has_ent, v_start, stats=stats[sl])
    if group is not None:
        norm, logp, ent = _combine_stats(stats, group, temperature, targets, v_total)
    return norm, logp, ent if has_ent else None


def _all_reduce_(t: torch.Tensor, group) -> None:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)


class _HiddenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, has_ent, group, rows, real_vocab):
        ctx.set_materialize_grads(False)
        norm, logp, ent = _hidden_forward(hidden, weight, targets, temperature, has_ent, group, rows, real_vocab)
        ctx.save_for_backward(hidden, weight, targets, norm, ent)
        ctx.temperature, ctx.group, ctx.rows, ctx.real_vocab = temperature, group, rows, real_vocab
        return (logp, ent) if has_ent else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, targets, norm, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(hidden) if need_h else None
        gw = _weight_grad(weight, hidden.shape[0], ctx.rows) if need_w else None
        v_start, _ = _group_info(ctx.group, weight.shape[0])
        for i, r0 in enumerate(range(0, hidden.shape[0], ctx.rows)):
            r1 = min(hidden.shape[0], r0 + ctx.rows)
            sl = slice(r0, r1)
            pick = lambda t, sl=sl: t[sl] if t is not None else None
            lg = _mask_padding(hidden[sl] @ weight.t(), ctx.real_vocab)  # recomputed: outputs can get any grad
            _hidden_grad_chunk(
                lg, hidden[sl], weight, targets[sl], norm[sl], pick(ent), pick(grad_logp), pick(grad_ent),
                ctx.temperature, v_start, pick(gh), gw, i == 0, ctx.real_vocab,
            )  # fmt: skip
        if gw is not None and hidden.shape[0] == 0:
            gw.zero_()
        if gh is not None:
            _all_reduce_(gh, ctx.group)
        return gh, None if gw is None else gw.to(weight.dtype), None, None, None, None, None, None


# ------------------------------------------------------------------------------ public functions


def _check_temperature(temperature: float) -> None:
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    group=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature) at `targets`, and optionally the entropy of that softmax.

    logits [..., V] fp32/bf16/fp16 (with `group`: this rank's contiguous vocab slice), targets [...]
    int64 global ids in [0, V_total) -> fp32 log-probs [...] (and fp32 entropy [...]). Differentiable
    w.r.t. logits through both outputs; grad_logits comes back in the logits' dtype.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocab) dim, got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"targets on {targets.device} but logits on {logits.device}")
    _check_temperature(temperature)
    group = _tp_group(group)
    if not dispatch.use_triton(logits) or logits.dtype not in _SUPPORTED:
        return reference.token_logprobs(logits, targets, temperature, return_entropy=return_entropy, group=group)
    _, v_total = _group_info(group, logits.shape[-1])
    _check_targets(targets, v_total)
    t = targets.reshape(-1).to(torch.int64).contiguous()
    out = _TokenLogprobs.apply(logits, t, float(temperature), bool(return_entropy), group)
    if return_entropy:
        return out[0].view(targets.shape), out[1].view(targets.shape)
    return out.view(targets.shape)


def _check_real_vocab(real_vocab: int | None, weight: torch.Tensor) -> None:
    if real_vocab is not None and not 0 < real_vocab <= weight.shape[0]:
        raise ValueError(f"real_vocab {real_vocab} must be in [1, {weight.shape[0]}] (the weight's rows)")


def _check_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden [N, {hidden.shape[1]}] vs weight [V, {weight.shape[1]}]")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocab dim")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} differs from weight dtype {weight.dtype}")
    if tuple(targets.shape) != (hidden.shape[0],):
        raise ValueError(f"targets shape {tuple(targets.shape)} must be [N] = ({hidden.shape[0]},)")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")


def hidden_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    group=None,
    real_vocab: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs(hidden @ weight.T, targets, ...) without materialising the [N, V] logits.

    hidden [N, H], weight [V, H] (the LM head; with `group`, this rank's vocab rows), targets [N]
    -> fp32 [N] (and entropy). Extra memory is one [C, V] logits chunk (about 256 MiB,
    _CHUNK_BYTES). Differentiable w.r.t. hidden and weight; with `group` the grad of hidden is summed over
    the group and the grad of weight is this rank's slice. `real_vocab`: only weight's first rows are tokens, the
    rest pad a vocabulary the TP degree does not divide (their logits -inf, their grad 0; the model's real_vocab).
    """
    _check_hidden(hidden, weight, targets)
    _check_temperature(temperature)
    _check_real_vocab(real_vocab, weight)
    group = _tp_group(group)
    if not dispatch.use_triton(hidden) or hidden.dtype not in _SUPPORTED:
        return reference.hidden_logprobs(
            hidden, weight, targets, temperature, return_entropy=return_entropy, group=group, real_vocab=real_vocab
        )
    _, v_total = _group_info(group, weight.shape[0])
    _check_targets(targets, v_total)
    t = targets.to(torch.int64).contiguous()
    hidden, weight = hidden.contiguous(), weight.contiguous()
    rows = _chunk_rows(hidden.shape[0], weight.shape[0], weight.element_size())
    return _HiddenLogprobs.apply(hidden, weight, t, float(temperature), bool(return_entropy), group, rows, real_vocab)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled tokens' log-probs (Schulman's estimators).

    k1 = logp - ref (unbiased, what the Tulu recipe puts in the reward), k2 = 0.5 (logp - ref)^2,
    k3 = exp(ref - logp) - 1 - (ref - logp) (unbiased and >= 0). Differentiable; any matching shapes.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if estimator == "k3":
        r = ref_logprobs - logprobs
        return torch.expm1(r) - r  # expm1 keeps the tiny values near r = 0 accurate
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")
