"""The sampler: one token per sequence from its logits, with no host sync and no global RNG.

Randomness is counter-based: the uniforms of a row are a hash of the sequence's seed and the
position of the token being sampled, so a seeded sequence samples the same tokens whatever it is
batched with, when it is preempted and recomputed, or which tensor-parallel rank samples it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from engine.config import GenerateConfig
from engine.distributed import group_size
from engine.parallel import gather_dim
from kernels import sampling
from kernels.reference import M32, mix32
from kernels.sampling import (
    combine_partial_samples,
    gumbel_sample,
    gumbel_sample_partial,
    kth_largest,
    kth_largest_sharded,
    top_p_floor_sharded,
)

# below this a temperature samples what greedy decoding picks (its limit), computed as greedy: logit / T overflows
# float32 near T = 1e-37 (every positive logit +inf, the first of them drawn)
MIN_TEMPERATURE = 1e-20
# above this (finite as a Python float) a temperature is inf in float32, and -inf / inf is NaN: a -inf logit (the
# vocabulary padding of a tensor-parallel rank) would be drawn; computed as this, float32's largest (near uniform)
MAX_TEMPERATURE = torch.finfo(torch.float32).max


def seed_for(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """A 32-bit seed per (request seed, prompt, sample), independent of batching."""
    # (as Python ints first: a narrow numpy int overflows on & M32, a narrow tensor wraps a negative value)
    t = torch.tensor([int(base_seed) & M32, int(prompt_index) & M32, int(sample_index) & M32], dtype=torch.int64)
    h = mix32(t[0:1])
    h = mix32(h ^ t[1:2])
    h = mix32((h + 0x632BE5AB) & M32 ^ t[2:3])
    return int(h)


def topk_floor(logits: torch.Tensor, top_k: int, group=None) -> torch.Tensor:
    """The k-th largest logit of each row [B] fp32: top-k sampling draws only logits >= it (ties at it included).
    On one rank: kernels.sampling.kth_largest (a radix select in one launch). Under tensor parallelism (`group`, each
    rank a vocabulary shard): kernels.sampling.kth_largest_sharded, the same radix select with each pass's B x 256
    histograms summed over the ranks: four all-reduces of B x parts x 256 int32 (two for bf16 logits; parts: a small
    batch's rows split over the SMs, kernels.sampling.row_parts), where each rank's torch.topk and a gather of the
    B x k x tp values did it before."""
    tp = group_size(group)
    if tp == 1:
        return kth_largest(logits, min(top_k, logits.shape[-1]))
    summed = lambda hist: dist.all_reduce(hist, group=group)  # noqa: E731
    return kth_largest_sharded(logits, min(top_k, logits.shape[-1] * tp), summed)


def top_p_floor(
    logits: torch.Tensor, top_p: float, temperature: float, min_logit: torch.Tensor | None = None, group=None
) -> torch.Tensor:
    """The lowest logit of each row [B] fp32 that top-p sampling keeps: where the mass of softmax(logits /
    temperature) (over the logits >= min_logit, top-k's floor, when given) counted from the largest down first reaches
    top_p; a run of logits tied there is kept whole. On one rank: kernels.sampling.top_p_floor (a radix select by
    mass, one launch; a pass a launch over a small batch's row parts). Under tensor parallelism (`group`, each rank a
    vocabulary shard): its sharded form, the rows' max and each pass's B x parts x 16 masses summed over the ranks
    (nine all-reduces, five for bf16 logits), where the ranks gathered the whole rows and sorted them before."""
    if group_size(group) == 1:
        return sampling.top_p_floor(logits, top_p, temperature, min_logit)
    summed = lambda t: dist.all_reduce(t, group=group)  # noqa: E731
    maxed = lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # noqa: E731
    return top_p_floor_sharded(logits, top_p, temperature, summed, maxed, min_logit)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) all but the top_k largest logits and the smallest top set with probability >= top_p (HF's order:
    top-k, then top-p over what it keeps), the logits tied at either edge kept: what sample_tokens draws from, at
    temperature 1."""
    floor = topk_floor(logits, top_k) if top_k and top_k < logits.shape[-1] else None
    if top_p < 1.0:
        floor = top_p_floor(logits, top_p, 1.0, floor)
    return logits if floor is None else logits.masked_fill(logits < floor[:, None], float("-inf"))


def sample_tokens(
    logits: torch.Tensor,
    params: GenerateConfig,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    group=None,
    vocab_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits [B, V] -> (tokens [B] int64, log-probs [B] fp32 under the raw logits).

    Temperature 0 is greedy. Otherwise Gumbel-max over the temperature-scaled logits at or above a floor, with the
    noise from kernels.reference.uniform_noise(seeds, counters): no host sync, no global RNG. One fused kernel draws
    (kernels/sampling.py), the floor found first: top-k's (the k-th largest logit) and then top-p's (where the mass
    from the top reaches top_p), each by a radix select, no sort.
    group: a tensor-parallel group whose ranks each hold a vocabulary shard [B, V / tp] starting at vocab_offset (the
    last ones -inf in the padding of a vocabulary tp does not divide: engine.parallel.shard_rows). Each rank samples
    its shard and the ranks exchange B x 4 numbers (the same token as the whole row, on every rank); the floors come
    from radix selects over the shards (histograms summed by all-reduces), never from gathered rows.
    """
    if 0 < params.temperature < MIN_TEMPERATURE:  # (logits / T would overflow fp32: a tie of every positive logit)
        params = dataclasses.replace(params, temperature=0.0)
    elif params.temperature > MAX_TEMPERATURE:  # (logits / T: inf in float32, and -inf / inf is NaN)
        params = dataclasses.replace(params, temperature=MAX_TEMPERATURE)
    tp = group_size(group)
    vocab = logits.shape[-1] * tp
    sampled = params.temperature > 0
    top_k = params.top_k if params.top_k and params.top_k < vocab and sampled else 0
    floor = topk_floor(logits, top_k, group) if top_k else None
    if sampled and params.top_p < 1.0:  # (HF's order: top-k, then top-p over what it keeps)
        floor = top_p_floor(logits, params.top_p, params.temperature, floor, group)
    if tp == 1:
        return gumbel_sample(logits, seeds, counters, params.temperature, floor)
    tokens, stats = gumbel_sample_partial(logits, seeds, counters, params.temperature, vocab_offset, floor)
    mine = torch.cat([stats.double(), tokens[:, None].double()], -1)  # ids are exact in float64
    every = gather_dim(mine, 0, group).view(tp, -1, 4)  # [rank, row, (score, logit, lse, token)]
    return combine_partial_samples(every[..., 3].long(), every[..., :3])
