"""Sampling one token per row of logits in one pass: Gumbel-max with counter-based noise, and the log-prob.

gumbel_sample(logits [B, V], seeds [B], counters [B], temperature) -> (tokens [B] int64, logprobs [B] fp32):
token = argmax_v(logits_v / temperature + g_v) with g_v = -log(-log(u_v)), u_v a pure function of
(seed, counter, v) (kernels.reference.uniform_noise: a 32-bit integer hash, the same bits here); temperature
0 is greedy (argmax of the logits); logprob = log_softmax(logits)[token] under the raw logits (temperature
1), as PPO's training side computes it. No host sync, no global RNG.

gumbel_sample_partial(logits [B, V_shard], ..., vocab_offset): the same over one tensor-parallel rank's vocabulary
shard (the noise keyed by global ids), returning the global id of the shard's best token and (best score, its
logit, the shard's logsumexp; float64) [B, 3]: the ranks exchange B x 4 numbers (those and the token's id) instead of
all-gathering B x V logits (engine/sampler.py combines them into exactly the token the whole row gives).

Eager PyTorch builds the [B, V] noise in int64 through a dozen elementwise passes, then the Gumbel
transform, the argmax and a log-softmax: about 0.5 GB of traffic per decode step at batch 64 over a
32000-word vocabulary (a few hundred microseconds, on every tensor-parallel rank). Here one program per
row streams its logits once, computes the noise in registers and keeps a running argmax and logsumexp.

Top-k and top-p restrict the draw to the logits at or above a floor, which gumbel_sample takes (min_logit), found
first without sorting: kth_largest (top-k's: the k-th largest logit) and top_p_floor (top-p's: where the mass counted
from the largest logit down reaches top_p), each a radix select on the logits' order keys, and their forms over TP's
vocabulary shards (the passes' histograms summed by all-reduces).

A small batch's rows are split into parts (row_parts: the largest power of two with the batch's parts at most the
SMs, whole blocks each; batch 1 over 32000 logits on an H100 or H200: 16): one program a row leaves all but B SMs
idle, and the draw (0.059 ms for one row's program on an H200) and top-k's two passes would stream batch 1's row on
one SM. The draw's parts then meet in one more launch (_combine_kernel: the first part holding the best score, the
parts' logsumexps in float64), so the tokens are whole rows' exactly; top-k's select runs one launch a pass over the
parts (the next pass sums their histograms), exactly as whole rows; top-p's likewise (the rows' max by torch first).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.decode_config import pdl_args
from kernels.dispatch import INTERPRET, loop_bound, pdl_prologue, sm_count, use_triton

_BLOCK_V = 1024 if INTERPRET else 2048


@triton.jit
def _mix32(x):
    """kernels.reference.mix32 on uint32 (products wrap modulo 2^32, as the reference masks them)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def _uniform(bits):
    """kernels.reference.bits_to_uniform on uint32: in (0, 1), never 1."""
    return ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _gumbel_sample_kernel(
    LOGITS, SEEDS, COUNTERS, MIN_LOGIT, TOKENS, LOGPROBS, vocab, vocab_offset, stride_row, temperature, chunk_v,
    GREEDY: tl.constexpr, PARTIAL: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr,
    CHUNKS: tl.constexpr = 1,
):  # fmt: skip
    """One row (CHUNKS > 1: one of a row's CHUNKS parts of chunk_v logits, program row * CHUNKS + part): stream the
    logits in blocks; running (best score, its index, its logit) and logsumexp. PARTIAL: LOGPROBS is [programs, 3]
    (best score, its logit, logsumexp) and the token id is offset by vocab_offset (_combine_kernel, or the ranks of
    a TP group, combine the parts). HAS_MIN: a logit below the row's MIN_LOGIT is never drawn (it still counts in the
    logsumexp). PDL: programmatic dependent launch (dispatch.pdl_prologue)."""
    pdl_prologue(PDL)
    pid = tl.program_id(0)
    row = pid // CHUNKS
    lo = (pid % CHUNKS) * chunk_v  # (the part's logits: [lo, hi))
    hi = tl.minimum(vocab, lo + chunk_v)
    base = LOGITS + row.to(tl.int64) * stride_row
    seed = tl.load(SEEDS + row).to(tl.uint32)  # the low 32 bits, as the reference's & 0xFFFFFFFF
    counter = tl.load(COUNTERS + row).to(tl.uint32)
    row_key = _mix32(_mix32(seed) ^ _mix32(counter ^ 0x5BD1E995))  # (see reference.uniform_noise)
    best = tl.full([], -float("inf"), tl.float32)
    best_idx = lo
    # the part's first logit: what a part with nothing drawable returns (as argmax; an empty part's is -inf)
    best_logit = tl.load(base + lo, mask=lo < hi, other=-float("inf")).to(tl.float32)
    m = tl.full([], -float("inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for v0 in range(loop_bound(lo), loop_bound(hi), BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < hi
        x = tl.load(base + offs, mask=ok, other=-float("inf")).to(tl.float32)
        if GREEDY:
            score = x
        else:
            bits = _mix32(row_key ^ _mix32((offs + vocab_offset).to(tl.uint32) * 0x61C88647))
            u = _uniform(bits)
            drawable = ok
            if HAS_MIN:
                drawable = ok & (x >= tl.load(MIN_LOGIT + row))
            score = tl.where(drawable, x / temperature - tl.log(-tl.log(u)), -float("inf"))
        blk_best = tl.max(score, axis=0)
        blk_idx = v0 + tl.argmax(score, axis=0)  # the first maximum, as torch.argmax
        blk_logit = tl.sum(tl.where(offs == blk_idx, x, 0.0), axis=0)
        better = blk_best > best  # strict: an earlier block keeps a tie
        best_logit = tl.where(better, blk_logit, best_logit)
        best_idx = tl.where(better, blk_idx, best_idx)
        best = tl.where(better, blk_best, best)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # (every logit so far -inf: exp(-inf - -inf) is NaN)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.where(ok, tl.exp(x - m_safe), 0.0), axis=0)
        m = m_new
    tl.store(TOKENS + pid, best_idx.to(tl.int64) + vocab_offset)
    if PARTIAL:  # (LOGPROBS is float64: m + log s in fp32 would round at ulp(m), 1e-3 for logits of 1e4)
        tl.store(LOGPROBS + pid * 3, best.to(tl.float64))
        tl.store(LOGPROBS + pid * 3 + 1, best_logit.to(tl.float64))
        tl.store(LOGPROBS + pid * 3 + 2, m.to(tl.float64) + tl.log(s).to(tl.float64))
    else:
        tl.store(LOGPROBS + pid, (best_logit - m) - tl.log(s))  # (not - (m + log s): it rounds at ulp(m))


@triton.jit
def _combine_kernel(
    TOKENS_IN, STATS_IN, TOKENS, OUT, stride_part, stride_row, CHUNKS: tl.constexpr, PARTS: tl.constexpr,
    PARTIAL: tl.constexpr,
):  # fmt: skip
    """Program b: row b's CHUNKS parts, in vocabulary order (part c's token at TOKENS_IN[b * stride_row + c *
    stride_part], its (best score, logit, logsumexp) float64 at STATS_IN [that, 3]; PARTS: CHUNKS to a power of two),
    into its token (the first part holding the best score, as the row's first maximum) and, PARTIAL, OUT [B, 3] the
    row's (best score, its logit, logsumexp), else OUT [B] fp32 its log-prob (the logit less the logsumexp of the
    parts' logsumexps, in float64: reference.combine_partial_samples' arithmetic)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.arange(0, PARTS)
    ok = part < CHUNKS
    at = row * stride_row + part * stride_part
    score = tl.load(STATS_IN + at * 3, mask=ok, other=-float("inf"))
    first = tl.argmax(score, axis=0)  # (the first maximum)
    pick = part == first
    logit = tl.sum(tl.where(pick, tl.load(STATS_IN + at * 3 + 1, mask=ok, other=0.0), 0.0), axis=0)
    lse_part = tl.load(STATS_IN + at * 3 + 2, mask=ok, other=-float("inf"))
    m = tl.max(lse_part, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    lse = m_safe + tl.log(tl.sum(tl.exp(lse_part - m_safe), axis=0))
    tl.store(TOKENS + row, tl.sum(tl.where(pick, tl.load(TOKENS_IN + at, mask=ok, other=0), 0), axis=0))
    if PARTIAL:
        tl.store(OUT + row * 3, tl.max(score, axis=0))
        tl.store(OUT + row * 3 + 1, logit)
        tl.store(OUT + row * 3 + 2, lse)
    else:
        tl.store(OUT + row, (logit - lse).to(tl.float32))


def _combine(part_tokens, part_stats, tokens, out, parts: int, stride_part: int, stride_row: int, partial: bool):
    if tokens.shape[0]:
        _combine_kernel[(tokens.shape[0],)](part_tokens, part_stats, tokens, out, stride_part, stride_row,
                                            CHUNKS=parts, PARTS=triton.next_power_of_2(parts), PARTIAL=partial,
                                            num_warps=1)  # fmt: skip


def gumbel_sample(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    temperature: float,
    min_logit: torch.Tensor | None = None,
    *,
    parts: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (fp32/bf16/fp16), seeds and counters [B] int64 -> tokens [B] int64, log-probs [B] fp32.
    min_logit [B] (optional): only a logit >= its row's may be drawn (top-k sampling: the k-th largest logit,
    engine/sampler.py), in the same single pass; the log-prob stays under the whole row. At a small batch each row
    is split into parts (row_parts; parts: an explicit count) whose best tokens one more launch combines: the same
    tokens, the log-probs within float rounding."""
    _check(logits, seeds, counters, temperature, min_logit)
    if not use_triton(logits):
        return reference.gumbel_sample(logits, seeds, counters, temperature, min_logit)
    return _launch(logits, seeds, counters, temperature, 0, min_logit, partial=False, parts=parts)


def gumbel_sample_partial(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    temperature: float,
    vocab_offset: int,
    min_logit: torch.Tensor | None = None,
    *,
    parts: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V_shard] of vocabulary ids vocab_offset + [0, V_shard) -> (the shard's best token, a global id
    [B] int64; stats [B, 3] float64: its score, its logit (both fp32 values), the shard's logsumexp of the raw logits,
    in float64 so that it does not round at ulp(max)). A shard with no logit >= min_logit has a best score of -inf
    (another shard's token wins). parts: as gumbel_sample's (the shard's parts combined into the shard's stats)."""
    _check(logits, seeds, counters, temperature, min_logit)
    if not use_triton(logits):
        return reference.gumbel_sample_partial(logits, seeds, counters, temperature, vocab_offset, min_logit)
    return _launch(logits, seeds, counters, temperature, vocab_offset, min_logit, partial=True, parts=parts)


def combine_partial_samples(tokens: torch.Tensor, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [S, B] and stats [S, B, 3] of gumbel_sample_partial over S shards in vocabulary order -> (tokens [B]
    int64, log-probs [B] fp32): the token of the whole row (the first shard holding the best score wins a tie,
    as the row's first maximum does) and its logit less the logsumexp of the shards' logsumexps (in float64). One
    launch (_combine_kernel, which also joins a small batch's row parts); reference.combine_partial_samples off it."""
    if tokens.dim() != 2 or stats.shape != (*tokens.shape, 3):
        raise ValueError(f"tokens [S, B] and stats [S, B, 3] expected, got {tuple(tokens.shape)} {tuple(stats.shape)}")
    if not use_triton(stats):
        return reference.combine_partial_samples(tokens, stats)
    s, b = tokens.shape
    out_tokens = torch.empty(b, dtype=torch.int64, device=stats.device)
    out = torch.empty(b, dtype=torch.float32, device=stats.device)
    _combine(tokens.long().contiguous(), stats.double().contiguous(), out_tokens, out, s, b, 1, False)
    return out_tokens, out


def _check(logits, seeds, counters, temperature, min_logit=None) -> None:
    if logits.dim() != 2 or seeds.shape != (logits.shape[0],) or counters.shape != (logits.shape[0],):
        raise ValueError(
            f"logits must be [B, V] with seeds and counters [B]; got {tuple(logits.shape)}, "
            f"{tuple(seeds.shape)}, {tuple(counters.shape)}"
        )
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be >= 0 and finite, got {temperature}")
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    if min_logit is not None and min_logit.shape != (logits.shape[0],):
        raise ValueError(f"min_logit must be [B] = [{logits.shape[0]}], got {tuple(min_logit.shape)}")
    if seeds.is_floating_point() or counters.is_floating_point():
        raise ValueError(f"seeds and counters must be integer tensors, got {seeds.dtype} and {counters.dtype}")


def row_parts(b: int, v: int, device: torch.device, parts: int | None = None) -> tuple[int, int]:
    """(parts a row is split into, logits a part) for a pass over B x V logits: one program a row leaves most SMs idle
    at a small batch (batch 1: one SM streams the whole row), so a row is split into the largest power of two of
    parts, each at least one block, with B x parts at most the GPU's SMs (dispatch.sm_count: 4 off a GPU); once
    two parts a row would pass the SMs (from 67 rows on 132), one program a row. parts: an explicit count (tests,
    benches), at most the row's blocks."""
    blocks = triton.cdiv(v, _BLOCK_V)
    if parts is None:
        parts, sms = 1, sm_count(device)
        while 2 * parts <= blocks and b * 2 * parts <= sms and parts < 64:
            parts *= 2
    parts = max(1, min(parts, blocks))
    per = triton.cdiv(blocks, parts) * _BLOCK_V
    return triton.cdiv(v, per), per  # (whole blocks a part; so no part is empty)


def _launch(logits, seeds, counters, temperature, vocab_offset, min_logit=None, *, partial, parts=None):
    b, v = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    out = torch.empty((b, 3) if partial else (b,), dtype=torch.float64 if partial else torch.float32,
                      device=logits.device)  # fmt: skip
    if not b:
        return tokens, out
    has_min = min_logit is not None and temperature > 0  # (greedy draws the row's largest logit anyway)
    floor = min_logit.float().contiguous() if has_min else out  # (a placeholder pointer, never read)
    parts, per = row_parts(b, v, logits.device, parts)
    # (a row in parts: each part's best token and (score, logit, logsumexp), then one program a row combines them)
    part_tokens, part_out = tokens, out
    if parts > 1:
        part_tokens = torch.empty(b * parts, dtype=torch.int64, device=logits.device)
        part_out = torch.empty(b * parts, 3, dtype=torch.float64, device=logits.device)
    _gumbel_sample_kernel[(b * parts,)](
        logits, seeds.contiguous(), counters.contiguous(), floor, part_tokens, part_out, v, vocab_offset,
        logits.stride(0), float(temperature) if temperature > 0 else 1.0, per, GREEDY=temperature == 0,
        PARTIAL=partial or parts > 1, HAS_MIN=has_min, BLOCK_V=_BLOCK_V, CHUNKS=parts, num_warps=8,
        **pdl_args(logits.device),
    )  # fmt: skip
    if parts > 1:  # (row b's part c at b * parts + c)
        _combine(part_tokens, part_out, tokens, out, parts, 1, parts, partial)
    return tokens, out


# ------------------------------------------------------------------------------ top-k's floor --


@triton.jit
def _order_key(x):
    """fp32 -> uint32 whose unsigned order is the floats' order (-inf lowest; a NaN of either sign beyond +-inf)."""
    b = x.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) == 1, b ^ 0xFFFFFFFF, b | 0x80000000)  # (xor: the interpreter cannot ~ a uint32)


@triton.jit
def _digit_histogram(base, vocab, prefix, P: tl.constexpr, BLOCK_V: tl.constexpr):
    """Radix select's pass P (0 to 3) over a row: the 256-bin histogram of the order keys' next 8 bits among the
    logits whose higher bits match the digits chosen so far (prefix)."""
    shift: tl.constexpr = 24 - 8 * P
    offs = tl.arange(0, BLOCK_V)
    hist = tl.zeros((256,), tl.int32)
    for v0 in range(0, loop_bound(vocab), BLOCK_V):
        ok = v0 + offs < vocab
        key = _order_key(tl.load(base + v0 + offs, mask=ok, other=0.0).to(tl.float32))
        if P > 0:  # (no digit chosen yet on the first pass)
            ok = ok & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
        hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=ok)
    return hist


@triton.jit
def _choose_digit(hist, need, prefix, P: tl.constexpr):
    """Pass P's digit: the highest whose count from the top reaches the rank still sought (need) among the logits
    matching prefix; returns the prefix with it and the rank still sought among those matching that."""
    shift: tl.constexpr = 24 - 8 * P
    at_or_above = tl.sum(hist) - tl.cumsum(hist, 0) + hist  # of each digit: the matching logits >= it
    digit = tl.sum((at_or_above >= need).to(tl.int32)) - 1  # the highest digit reaching the rank
    above = tl.sum(tl.where(tl.arange(0, 256) == digit, at_or_above - hist, 0))  # matching logits past that digit
    return prefix | (digit.to(tl.uint32) << shift), need - above


@triton.jit
def _key_value(key, LOW: tl.constexpr):
    """An order key (_order_key) whose bits above LOW are known back to its fp32 value: the LOW bits below are the
    ones every logit of the input's dtype has there (its mantissa is shorter than fp32's: 0 in the float, so 0 in a
    positive value's key and 1 in a negative one's)."""
    if LOW > 0:
        key = tl.where((key >> 31) == 1, key, key | ((1 << LOW) - 1))
    bits = tl.where((key >> 31) == 1, key & 0x7FFFFFFF, key ^ 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


# The low bits of a logit's fp32 order key that its dtype leaves constant (a bf16 or fp16 mantissa is shorter than
# fp32's): a radix select stops above them, so bf16 logits (the engine's) take half the passes.
_CONSTANT_LOW_BITS = {torch.bfloat16: 16, torch.float16: 13}


def _passes(dtype: torch.dtype, bits: int) -> int:
    """Passes of `bits` bits a radix select over logits of `dtype` needs to spell a whole order key."""
    return -(-(32 - _CONSTANT_LOW_BITS.get(dtype, 0)) // bits)


@triton.jit
def _kth_largest_kernel(
    LOGITS, OUT, k, vocab, stride_row, BLOCK_V: tl.constexpr, PASSES: tl.constexpr, PDL: tl.constexpr
):
    """Program b: OUT[b] = the k-th largest of LOGITS[b, :vocab] (fp32), by radix select on its order key: PASSES
    passes over the row (_passes: 4, or 2 for bf16 logits), each a 256-bin histogram of the next 8 bits among the
    logits whose higher bits match the digits chosen so far, choosing the digit where the count from the top reaches
    the rank still sought. PDL: programmatic dependent launch (dispatch.pdl_prologue)."""
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    prefix = tl.zeros((), tl.uint32)  # the key's digits chosen so far (in place)
    need = k  # the rank still sought among the logits matching them
    for p in tl.static_range(PASSES):
        prefix, need = _choose_digit(_digit_histogram(base, vocab, prefix, p, BLOCK_V), need, prefix, p)
    tl.store(OUT + row, _key_value(prefix, 32 - 8 * PASSES))


@triton.jit
def _kth_largest_pass_kernel(
    LOGITS, HIST, STATE, OUT, k, vocab, stride_row, n_rows, chunk_v, P: tl.constexpr, BLOCK_V: tl.constexpr,
    PASSES: tl.constexpr, CHUNKS: tl.constexpr = 1, PARTS: tl.constexpr = 1,
):  # fmt: skip
    """Radix select one pass a launch, program row * CHUNKS + part (a row's CHUNKS parts of chunk_v logits: a small
    batch's rows split over the SMs; PARTS: CHUNKS to a power of two): from P = 1, choose pass P - 1's digit from the
    sum of the row's parts' histograms HIST[(P - 1) % 2, row] [CHUNKS, 256] (summed over the shards of a TP group
    between the launches, kth_largest_sharded) and the state STATE[P - 1, row] = (the digits chosen so far, the rank
    still sought; (0, k) before the first digit, never stored), part 0 storing the new state in STATE[P, row]; then
    P < PASSES: HIST[P % 2, row, part] = the
    part's histogram of pass P; P = PASSES: OUT[row] = the value the digits spell. (Each pass reads one plane and
    writes the other: no program of a launch overwrites what another of it still reads.)"""
    pid = tl.program_id(0)
    row = (pid // CHUNKS).to(tl.int64)
    part = pid % CHUNKS
    lo = part * chunk_v
    bins = tl.arange(0, 256)
    prefix = tl.zeros((), tl.uint32)  # (the state before the first digit: no digit chosen, the k-th sought)
    need = k
    if P > 1:
        prefix = tl.load(STATE + ((P - 1) * n_rows + row) * 2).to(tl.uint32, bitcast=True)
        need = tl.load(STATE + ((P - 1) * n_rows + row) * 2 + 1)
    if P > 0:
        parts = tl.arange(0, PARTS)
        plane = HIST + (((P - 1) % 2) * n_rows + row) * CHUNKS * 256
        hist = tl.load(plane + parts[:, None] * 256 + bins[None, :], mask=(parts < CHUNKS)[:, None], other=0)
        prefix, need = _choose_digit(tl.sum(hist, axis=0), need, prefix, P - 1)
        if part == 0:
            tl.store(STATE + (P * n_rows + row) * 2, prefix.to(tl.int32, bitcast=True))
            tl.store(STATE + (P * n_rows + row) * 2 + 1, need)
    if P < PASSES:
        hist = _digit_histogram(LOGITS + row * stride_row + lo, tl.minimum(vocab - lo, chunk_v), prefix, P, BLOCK_V)
        tl.store(HIST + ((P % 2) * n_rows + row) * CHUNKS * 256 + part * 256 + bins, hist)
    elif part == 0:
        tl.store(OUT + row, _key_value(prefix, 32 - 8 * PASSES))


def kth_largest(logits: torch.Tensor, k: int, *, parts: int | None = None) -> torch.Tensor:
    """logits [B, V] (fp32/bf16/fp16) -> [B] fp32: each row's k-th largest value (1 <= k <= V), exactly
    torch.topk(logits, k).values[:, -1] (ties counted as torch counts them), without sorting: top-k sampling's floor
    (engine/sampler.py), in one launch where torch.topk took ~6x the sampling kernel itself on an H200 (batch 64:
    0.372 against 0.059 ms; bench/RESULTS.md). At a small batch (row_parts; parts: an explicit count) each row is
    split into parts, one launch a pass (the parts' histograms summed by the next), so that a batch of one does not
    stream its row on one SM."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"kth_largest needs logits [B, V] with V >= 1, got {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"kth_largest: k must be 1 to the vocabulary's {logits.shape[1]}, got {k}")
    if not use_triton(logits):
        return torch.topk(logits, k, dim=-1).values[:, -1].float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if row_parts(*logits.shape, logits.device, parts)[0] > 1:
        return _kth_by_passes(logits, k, None, parts)
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        _kth_largest_kernel[(logits.shape[0],)](logits, out, k, logits.shape[1], logits.stride(0), BLOCK_V=_BLOCK_V,
                                                PASSES=_passes(logits.dtype, 8), num_warps=8,
                                                **pdl_args(logits.device))  # fmt: skip
    return out


def kth_largest_sharded(logits: torch.Tensor, k: int, all_reduce, *, parts: int | None = None) -> torch.Tensor:
    """The k-th largest value of each whole row [B] fp32 when each rank holds a vocabulary shard [B, V / tp] of it
    (tensor parallelism; -inf padding counts as any logit), exactly as torch.topk of the gathered rows: kth_largest's
    radix select with each pass's 256-bin histograms summed over the shards by all_reduce (an in-place sum over the
    ranks, e.g. torch.distributed.all_reduce on the TP group): four sums of B x 256 int32 a shard's part (two for
    bf16 logits) instead of each rank's top k by torch.topk and a gather. Every rank gets the same floor. 1 <= k <= V
    (the whole rows' width). parts: as kth_largest's (the same on every rank: the shards' shapes are equal)."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"kth_largest_sharded needs logits [B, V / tp] with V / tp >= 1, got {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"kth_largest_sharded: k must be >= 1, got {k}")
    if not use_triton(logits):
        return reference.kth_largest_sharded(logits, k, all_reduce)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _kth_by_passes(logits, k, all_reduce, parts)


def _kth_by_passes(logits: torch.Tensor, k: int, all_reduce, parts: int | None) -> torch.Tensor:
    """The radix select one pass a launch (_kth_largest_pass_kernel) over each row's parts, each pass's histograms
    summed by all_reduce over a TP group's shards between the launches (None: one rank's whole rows)."""
    b, v = logits.shape
    parts, per = row_parts(b, v, logits.device, parts)
    passes = _passes(logits.dtype, 8)
    hist = torch.empty(2, b, parts, 256, dtype=torch.int32, device=logits.device)
    state = torch.empty(passes + 1, b, 2, dtype=torch.int32, device=logits.device)  # (plane 0 unused: (0, k))
    out = torch.empty(b, dtype=torch.float32, device=logits.device)
    for p in range(passes + 1):
        if b:
            _kth_largest_pass_kernel[(b * parts,)](
                logits, hist, state, out, k, v, logits.stride(0), b, per, P=p, BLOCK_V=_BLOCK_V, PASSES=passes,
                CHUNKS=parts, PARTS=triton.next_power_of_2(parts), num_warps=8,
            )  # fmt: skip
        if p < passes and all_reduce is not None:
            all_reduce(hist[p % 2])
    return out


# ------------------------------------------------------------------------------ top-p's floor --
# The same radix select on the order keys, choosing by probability mass instead of by count: 16 bins of 4 bits a
# pass (a weighted histogram is 16 sums an element; 256 bins would be 256), eight passes (four for bf16). A logit's
# mass goes to its bin as a 4 x 4 product: the mass in the row of its digit's high 2 bits, times a one-hot of the low
# 2, one fused multiply-add a bin (16 compares, selects and adds a logit took ~20% more instructions in the loop).
# The bins lead each thread's [4, 4, BLOCK_V] partial sums, so that every thread holds all 16 bins of its own logits
# (bins last, Triton spread them over 16 threads, each computing every logit's mass again; sm_90 builds).
_TOP_P_BLOCK_V = 256 if INTERPRET else 1024  # (8 warps: 124 registers, no spill at sm_90; 2048 spills)


@triton.jit
def _row_max(base, vocab, BLOCK_V: tl.constexpr):
    """A row's largest logit, fp32 (0 where every one is -inf: exp(x - max) then gives 0, not NaN)."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], -float("inf"), tl.float32)
    for v0 in range(0, loop_bound(vocab), BLOCK_V):
        m = tl.maximum(m, tl.load(base + v0 + offs, mask=v0 + offs < vocab, other=-float("inf")).to(tl.float32))
    m = tl.max(m, axis=0)
    return tl.where(m == -float("inf"), 0.0, m)


@triton.jit
def _mass_histogram(base, vocab, prefix, m, temperature, low, P: tl.constexpr, BLOCK_V: tl.constexpr):
    """Top-p select's pass P (0 to 7) over a row: the mass exp((x - m) / temperature) (softmax's numerator; 0 below
    low, top-k's floor) of the logits whose order keys' higher digits match prefix, in 16 bins by the next 4 bits
    (bin = 4 * their high 2 + their low 2)."""
    shift: tl.constexpr = 28 - 4 * P
    offs = tl.arange(0, BLOCK_V)
    b4 = tl.arange(0, 4)
    acc = tl.zeros((4, 4, BLOCK_V), tl.float32)  # (each thread's own bins, summed across the threads once at the end)
    for v0 in range(0, loop_bound(vocab), BLOCK_V):
        ok = v0 + offs < vocab
        x = tl.load(base + v0 + offs, mask=ok, other=-float("inf")).to(tl.float32)
        key = _order_key(x)
        if P > 0:  # (no digit chosen yet on the first pass)
            ok = ok & ((key >> (shift + 4)) == (prefix >> (shift + 4)))
        w = tl.where(ok & (x >= low), tl.exp((x - m) / temperature), 0.0)
        hi = ((key >> (shift + 2)) & 0x3).to(tl.int32)
        lo = ((key >> shift) & 0x3).to(tl.int32)
        w_hi = tl.where(b4[:, None] == hi[None, :], w[None, :], 0.0)
        one_lo = tl.where(b4[:, None] == lo[None, :], 1.0, 0.0)
        acc = tl.fma(w_hi[:, None, :], one_lo[None, :, :], acc)
    return tl.reshape(tl.sum(acc, axis=2), (16,))


@triton.jit
def _choose_mass_digit(hist, need, prefix, P: tl.constexpr):
    """Pass P's digit: the highest whose mass from the top (among the logits matching prefix) reaches the mass still
    sought (need); where rounding left every digit short of it, the lowest digit holding any. Returns the prefix with
    it and the mass still sought among the logits matching that."""
    shift: tl.constexpr = 28 - 4 * P
    bins = tl.arange(0, 16)
    at_or_above = tl.sum(tl.where(bins[None, :] >= bins[:, None], hist[None, :], 0.0), axis=1)  # suffix sums
    digit = tl.max(tl.where((at_or_above >= need) & (hist > 0), bins, -1), axis=0)
    digit = tl.where(digit >= 0, digit, tl.min(tl.where(hist > 0, bins, 15), axis=0))
    above = tl.sum(tl.where(bins > digit, hist, 0.0), axis=0)  # the matching mass past that digit
    return prefix | (digit.to(tl.uint32) << shift), need - above


@triton.jit
def _top_p_floor_kernel(
    LOGITS, MIN_LOGIT, OUT, top_p, temperature, vocab, stride_row, HAS_MIN: tl.constexpr, BLOCK_V: tl.constexpr,
    PASSES: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program b: OUT[b] = top_p_floor of LOGITS[b, :vocab]: the row's max, then PASSES passes (_passes: 8, or 4 for
    bf16 logits) of _mass_histogram and _choose_mass_digit; -inf for a row with no mass. HAS_MIN: only logits >=
    MIN_LOGIT[b] count. PDL: programmatic dependent launch (dispatch.pdl_prologue)."""
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    low = tl.load(MIN_LOGIT + row) if HAS_MIN else -float("inf")
    m = _row_max(base, vocab, BLOCK_V)
    prefix = tl.zeros((), tl.uint32)
    total = tl.zeros((), tl.float32)
    need = tl.zeros((), tl.float32)
    for p in tl.static_range(PASSES):
        hist = _mass_histogram(base, vocab, prefix, m, temperature, low, p, BLOCK_V)
        if p == 0:
            total = tl.sum(hist, axis=0)
            need = top_p * total
        prefix, need = _choose_mass_digit(hist, need, prefix, p)
    tl.store(OUT + row, tl.where(total > 0, _key_value(prefix, 32 - 4 * PASSES), -float("inf")))


@triton.jit
def _top_p_pass_kernel(
    LOGITS, MIN_LOGIT, M, HIST, PREFIX, NEED, OUT, top_p, temperature, vocab, stride_row, n_rows, chunk_v,
    P: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_V: tl.constexpr, PASSES: tl.constexpr, CHUNKS: tl.constexpr = 1,
    PARTS: tl.constexpr = 1,
):  # fmt: skip
    """Top-p's select one pass a launch, program row * CHUNKS + part (a row's CHUNKS parts of chunk_v logits; PARTS:
    CHUNKS to a power of two), M[row] the whole row's max: from P = 1, choose pass P - 1's digit from the sum of the
    row's parts' masses HIST[(P - 1) % 2, row] [CHUNKS, 16] (summed over the shards of a TP group between the
    launches, top_p_floor_sharded), PREFIX[P - 1, row] (the digits chosen so far) and NEED[P - 1, row] (the mass still
    sought, and the row's whole mass, found at P = 1), part 0 storing the new state at [P, row]; then P < PASSES:
    HIST[P % 2, row, part] = the part's masses of pass P; P = PASSES: OUT[row] = the value the digits spell. (Each
    pass reads one plane and writes the other, as _kth_largest_pass_kernel.)"""
    pid = tl.program_id(0)
    row = (pid // CHUNKS).to(tl.int64)
    part = pid % CHUNKS
    lo = part * chunk_v
    bins = tl.arange(0, 16)
    prefix = tl.zeros((), tl.uint32)  # (the state before the first digit; the masses found at P = 1)
    need = tl.zeros((), tl.float32)
    total = tl.zeros((), tl.float32)
    if P > 1:
        prev = (P - 1) * n_rows + row
        prefix = tl.load(PREFIX + prev).to(tl.uint32, bitcast=True)
        need = tl.load(NEED + prev * 2)
        total = tl.load(NEED + prev * 2 + 1)
    m = tl.load(M + row)
    m = tl.where(m == -float("inf"), 0.0, m)
    if P > 0:
        parts = tl.arange(0, PARTS)
        plane = HIST + (((P - 1) % 2) * n_rows + row) * CHUNKS * 16
        hist = tl.load(plane + parts[:, None] * 16 + bins[None, :], mask=(parts < CHUNKS)[:, None], other=0.0)
        hist = tl.sum(hist, axis=0)
        if P == 1:
            total = tl.sum(hist, axis=0)
            need = top_p * total
        prefix, need = _choose_mass_digit(hist, need, prefix, P - 1)
        if part == 0:
            cur = P * n_rows + row
            tl.store(PREFIX + cur, prefix.to(tl.int32, bitcast=True))
            tl.store(NEED + cur * 2, need)
            tl.store(NEED + cur * 2 + 1, total)
    if P < PASSES:
        low = tl.load(MIN_LOGIT + row) if HAS_MIN else -float("inf")
        base = LOGITS + row * stride_row + lo
        hist = _mass_histogram(base, tl.minimum(vocab - lo, chunk_v), prefix, m, temperature, low, P, BLOCK_V)
        tl.store(HIST + ((P % 2) * n_rows + row) * CHUNKS * 16 + part * 16 + bins, hist)
    elif part == 0:
        tl.store(OUT + row, tl.where(total > 0, _key_value(prefix, 32 - 4 * PASSES), -float("inf")))


def _check_top_p(logits: torch.Tensor, top_p: float, temperature: float, min_logit, name: str) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{name} needs logits [B, V] with V >= 1, got {tuple(logits.shape)}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{name}: top_p must be in (0, 1], got {top_p}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"{name}: temperature must be > 0 and finite, got {temperature}")
    if min_logit is not None and min_logit.shape != (logits.shape[0],):
        raise ValueError(f"{name}: min_logit must be [B] = [{logits.shape[0]}], got {tuple(min_logit.shape)}")


def top_p_floor(
    logits: torch.Tensor,
    top_p: float,
    temperature: float = 1.0,
    min_logit: torch.Tensor | None = None,
    *,
    parts: int | None = None,
) -> torch.Tensor:
    """logits [B, V] (fp32/bf16/fp16) -> [B] fp32: the lowest logit top-p sampling keeps in each row, where the mass
    of softmax(logits / temperature) counted from the largest logit down first reaches top_p (a run of tied logits
    counted together, so kept whole); -inf for a row with no mass. min_logit [B]: only logits >= it count (top-k's
    floor: top-k, then top-p over what it keeps, HF's order). Without sorting: a radix select by mass in one launch,
    nine passes over the row (five for bf16 logits; from L2 after the first), where torch.sort, a softmax, a cumsum
    and a scatter did it; gumbel_sample then draws above the floor in its one pass. The masses are fp32 sums: where
    top_p falls within their rounding of a cumulative mass the floor may be the neighbouring logit
    (reference.top_p_floor sorts in float64). At a small batch (row_parts; parts: an explicit count) the rows are
    split into parts, one launch a pass (the next pass sums the parts' masses), the max by torch first."""
    _check_top_p(logits, top_p, temperature, min_logit, "top_p_floor")
    if not use_triton(logits):
        return reference.top_p_floor(logits, top_p, temperature, min_logit)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if row_parts(*logits.shape, logits.device, parts)[0] > 1:  # (a small batch: rows in parts, one launch a pass)
        return _top_p_by_passes(logits, top_p, temperature, min_logit, None, None, parts)
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    low = min_logit.float().contiguous() if min_logit is not None else out  # (a placeholder pointer, never read)
    if logits.shape[0]:
        _top_p_floor_kernel[(logits.shape[0],)](
            logits, low, out, float(top_p), float(temperature), logits.shape[1], logits.stride(0),
            HAS_MIN=min_logit is not None, BLOCK_V=_TOP_P_BLOCK_V, PASSES=_passes(logits.dtype, 4), num_warps=8,
            **pdl_args(logits.device),
        )  # fmt: skip
    return out


def top_p_floor_sharded(
    logits: torch.Tensor,
    top_p: float,
    temperature: float,
    all_reduce,
    all_reduce_max,
    min_logit=None,
    *,
    parts: int | None = None,
) -> torch.Tensor:
    """top_p_floor of whole rows [B] fp32 when each rank holds a vocabulary shard [B, V / tp] of them (tensor
    parallelism; -inf padding holds no mass), without gathering them: the rows' max by all_reduce_max ([B] fp32, an
    in-place max over the ranks), then top_p_floor's passes (8, or 4 for bf16 logits), one launch each, with each
    pass's [B, parts, 16] fp32 masses summed over the shards by all_reduce (in place, e.g. torch.distributed.all_reduce
    on the TP group): sums of B x 16 floats a part where the ranks gathered B x V logits to sort them. Every rank gets
    the same floor. parts: as top_p_floor's (the same on every rank)."""
    _check_top_p(logits, top_p, temperature, min_logit, "top_p_floor_sharded")
    if not use_triton(logits):
        return reference.top_p_floor_sharded(logits, top_p, temperature, all_reduce, all_reduce_max, min_logit)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _top_p_by_passes(logits, top_p, temperature, min_logit, all_reduce, all_reduce_max, parts)


def _top_p_by_passes(logits, top_p, temperature, min_logit, all_reduce, all_reduce_max, parts) -> torch.Tensor:
    """Top-p's select one pass a launch (_top_p_pass_kernel) over each row's parts: the rows' max by torch (then
    all_reduce_max over a TP group's shards), each pass's masses summed by all_reduce between the launches (None: one
    rank's whole rows)."""
    b, v = logits.shape
    parts, per = row_parts(b, v, logits.device, parts)
    m = logits.amax(-1).float() if b else torch.empty(0, dtype=torch.float32, device=logits.device)
    if all_reduce_max is not None:
        all_reduce_max(m)
    passes = _passes(logits.dtype, 4)
    hist = torch.empty(2, b, parts, 16, dtype=torch.float32, device=logits.device)
    prefix = torch.empty(passes + 1, b, dtype=torch.int32, device=logits.device)  # (plane 0 unused: no digit yet)
    need = torch.empty(passes + 1, b, 2, dtype=torch.float32, device=logits.device)
    out = torch.empty(b, dtype=torch.float32, device=logits.device)
    low = min_logit.float().contiguous() if min_logit is not None else out  # (a placeholder pointer, never read)
    for p in range(passes + 1):
        if b:
            _top_p_pass_kernel[(b * parts,)](
                logits, low, m, hist, prefix, need, out, float(top_p), float(temperature), v, logits.stride(0), b,
                per, P=p, HAS_MIN=min_logit is not None, BLOCK_V=_TOP_P_BLOCK_V, PASSES=passes, CHUNKS=parts,
                PARTS=triton.next_power_of_2(parts), num_warps=8,
            )  # fmt: skip
        if p < passes and all_reduce is not None:
            all_reduce(hist[p % 2])
    return out
