"""The sampler: one token per sequence from its logits, with no host sync and no global RNG.

Randomness is counter-based: the uniforms of a row are a hash of the sequence's seed and the
position of the token being sampled, so a seeded sequence samples the same tokens whatever it is
batched with, when it is preempted and recomputed, or which tensor-parallel rank samples it.
"""

from __future__ import annotations

import functools

import torch

from engine.config import GenerateConfig

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2^32); constants < 2^31 keep
    every product below 2^63, so nothing overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def seed_for(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """A 32-bit seed per (request seed, prompt, sample), independent of batching."""
    t = torch.tensor([base_seed & _M32, prompt_index & _M32, sample_index & _M32], dtype=torch.int64)
    h = _mix32(t[0:1])
    h = _mix32(h ^ t[1:2])
    h = _mix32((h + 0x632BE5AB) & _M32 ^ t[2:3])
    return int(h)


@functools.lru_cache(maxsize=8)
def _column_keys(vocab: int, device: torch.device) -> torch.Tensor:
    """Per-vocabulary-entry hash keys, computed once per (vocab, device) rather than every step."""
    return _mix32(torch.arange(vocab, device=device, dtype=torch.int64) * 0x61C88647 & _M32)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] uniforms in (0, 1) from per-row seeds [B] and counters [B] (int64): a pure function."""
    row = _mix32(_mix32(seeds & _M32) ^ (counters & _M32))
    col = _column_keys(vocab, seeds.device)
    bits = _mix32(row[:, None] ^ col[None, :])
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) all but the top_k largest logits and the smallest set with probability >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_tokens(
    logits: torch.Tensor, params: GenerateConfig, seeds: torch.Tensor, counters: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits [B, V] -> (tokens [B] int64, log-probs [B] fp32 under the raw logits).

    Temperature 0 is greedy. Otherwise Gumbel-max over the temperature-scaled, top-k/top-p filtered
    logits, with the noise from uniform_noise(seeds, counters): no host sync, no global RNG.
    """
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
    else:
        scaled = filter_logits(logits / params.temperature, params.top_k, params.top_p)
        gumbel = -torch.log(-torch.log(uniform_noise(seeds, counters, logits.shape[-1])))
        tokens = (scaled + gumbel).argmax(-1)
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
