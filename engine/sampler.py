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
from engine.parallel import gather_dim, gather_from_tp, group_size
from kernels import reference
from kernels.reference import M32, mix32
from kernels.sampling import (
    combine_partial_samples,
    gumbel_sample,
    gumbel_sample_partial,
    kth_largest,
    kth_largest_sharded,
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
    histograms summed over the ranks: four all-reduces of B x 256 int32, where each rank's torch.topk and a gather
    of the B x k x tp values did it before."""
    tp = group_size(group)
    if tp == 1:
        return kth_largest(logits, min(top_k, logits.shape[-1]))
    summed = lambda hist: dist.all_reduce(hist, group=group)  # noqa: E731
    return kth_largest_sharded(logits, min(top_k, logits.shape[-1] * tp), summed)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) all but the top_k largest logits and the smallest set with probability >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < topk_floor(logits, top_k)[:, None], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_tokens(
    logits: torch.Tensor,
    params: GenerateConfig,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    group=None,
    vocab_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits [B, V] -> (tokens [B] int64, log-probs [B] fp32 under the raw logits).

    Temperature 0 is greedy. Otherwise Gumbel-max over the temperature-scaled, top-k/top-p filtered
    logits, with the noise from kernels.reference.uniform_noise(seeds, counters): no host sync, no global RNG. Without
    top-p (the recipe's sampling, top-k or not) one fused kernel does it all (kernels/sampling.py), top-k's floor
    (the k-th largest logit) found first (kernels.sampling's radix select).
    group: a tensor-parallel group whose ranks each hold a vocabulary shard [B, V / tp] starting at vocab_offset (the
    last ones -inf in the padding of a vocabulary tp does not divide: engine.parallel.shard_rows).
    Without top-p each rank samples its shard and the ranks exchange B x 4 numbers (the same token as the whole row,
    on every rank; top-k's floor by a radix select over the shards); with top-p the shards are gathered first.
    """
    if 0 < params.temperature < MIN_TEMPERATURE:  # (logits / T would overflow fp32: a tie of every positive logit)
        params = dataclasses.replace(params, temperature=0.0)
    elif params.temperature > MAX_TEMPERATURE:  # (logits / T: inf in float32, and -inf / inf is NaN)
        params = dataclasses.replace(params, temperature=MAX_TEMPERATURE)
    tp = group_size(group)
    vocab = logits.shape[-1] * tp
    top_k = params.top_k if params.top_k and params.top_k < vocab and params.temperature > 0 else 0
    if params.temperature == 0 or params.top_p >= 1.0:  # one pass over the logits (top-k: a floor found first)
        floor = topk_floor(logits, top_k, group) if top_k else None
        if tp == 1:
            return gumbel_sample(logits, seeds, counters, params.temperature, floor)
        tokens, stats = gumbel_sample_partial(logits, seeds, counters, params.temperature, vocab_offset, floor)
        mine = torch.cat([stats.double(), tokens[:, None].double()], -1)  # ids are exact in float64
        every = gather_dim(mine, 0, group).view(tp, -1, 4)  # [rank, row, (score, logit, lse, token)]
        return combine_partial_samples(every[..., 3].long(), every[..., :3])
    logits = gather_from_tp(logits, group)  # top-p: the whole rows, sorted
    logits = logits.float()
    scaled = filter_logits(logits / params.temperature, top_k, params.top_p)  # (HF's order: top-k, then top-p)
    tokens, _ = reference.gumbel_sample(scaled, seeds, counters, 1.0)  # already scaled: / 1.0 is exact
    return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
