"""Plain-PyTorch oracles for every kernel.

Tests compare the Triton kernels with these (run in float64), benchmarks time them as "the
reference", and the engine's CPU path runs them. Each function computes in the input's dtype
promoted to at least fp32, and is differentiable through ordinary autograd.

Sections (one per kernel file) keep this file easy to extend without collisions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.dispatch import compute_dtype

# ===================================================================================== rotary ==


@dataclass(frozen=True)
class Rope:
    """The rotary embedding's frequencies, as HF's Llama computes them from config.json's rope parameters.

    kind is HF's rope_type: "default" (1 / theta^(2i/D)), "linear" (those divided by `factor`: positions
    interpolated) or "llama3" (Llama 3.1's: wavelengths longer than original_max_position_embeddings / low_freq_factor
    divided by `factor`, shorter than original_max_position_embeddings / high_freq_factor kept, smoothly blended in
    between). Every kernel's `rope_theta` takes a float theta (the default kind) or one of these. Types whose
    frequencies depend on the batch's length ("dynamic") or that scale the attention ("yarn", "longrope") are refused.
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    KINDS = ("default", "linear", "llama3")

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "theta", float(self.theta))
        except (TypeError, ValueError):  # (config.json's "rope_theta": null, or a string)
            raise ValueError(f"rope_theta must be a positive number, got {self.theta!r}") from None
        # fields a kind does not use are left at their defaults, so equal frequencies are one cache key
        unused = {
            "default": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "linear": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        }
        for name in unused.get(self.kind, ()):
            object.__setattr__(self, name, type(self).__dataclass_fields__[name].default)
        if self.kind not in self.KINDS:
            raise ValueError(f"rope scaling {self.kind!r} is not supported (supported: {', '.join(self.KINDS)})")
        if not (self.theta > 0 and math.isfinite(self.theta)):
            raise ValueError(f"rope_theta must be positive, got {self.theta}")
        if self.kind != "default" and not self.factor > 0:
            raise ValueError(f"rope scaling {self.kind!r} needs a positive factor, got {self.factor}")
        if self.kind == "llama3":
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                raise ValueError(
                    f"rope scaling 'llama3' needs 0 < low_freq_factor < high_freq_factor, got {self.low_freq_factor} "
                    f"and {self.high_freq_factor}"
                )
            if not self.original_max_position_embeddings > 0:
                raise ValueError("rope scaling 'llama3' needs a positive original_max_position_embeddings")

    @classmethod
    def of(cls, spec: float | Rope) -> Rope:
        """A Rope from a kernel's `rope_theta` argument: a float theta (the default kind) or a Rope."""
        return spec if isinstance(spec, Rope) else cls(theta=float(spec))

    @classmethod
    def from_hf(cls, cfg: dict, max_position_embeddings: int | None = None) -> Rope:
        """From an HF config.json dict: `rope_parameters` (transformers 5) or `rope_scaling` and `rope_theta` (older
        files); with both, `rope_scaling` alone, as transformers reads them (a default `rope_parameters` beside a
        user's linear `rope_scaling` is not plain RoPE). A theta outside the parameters is the top-level rope_theta,
        else 10000. A missing original_max_position_embeddings is max_position_embeddings, as transformers fills it."""
        params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
        kind = params.get("rope_type") or params.get("type") or "default"
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if kind not in cls.KINDS:
            why = {
                "dynamic": "its frequencies change with each batch's length",
                "yarn": "it scales the attention",
                "longrope": "it scales the attention",
            }.get(kind, "an unknown type")
            raise ValueError(
                f"rope scaling {kind!r} is not supported ({why}); supported: {', '.join(cls.KINDS)} (Llama 2, "
                "Llama 3 and 3.1+ checkpoints)"
            )
        if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"partial_rotary_factor {params['partial_rotary_factor']} is not supported (Llama: 1.0)")
        if kind == "default":
            return cls(theta=theta)
        need = ("factor",) if kind == "linear" else ("factor", "low_freq_factor", "high_freq_factor")
        missing = [k for k in need if k not in params]
        if missing:
            raise ValueError(f"rope scaling {kind!r} is missing {', '.join(missing)} in config.json")
        if kind == "linear":
            return cls(theta=theta, kind=kind, factor=float(params["factor"]))
        original = params.get("original_max_position_embeddings") or max_position_embeddings
        if original is None:
            raise ValueError("rope scaling 'llama3' is missing original_max_position_embeddings in config.json")
        return cls(
            theta=theta,
            kind=kind,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(original),
        )

    def to_hf(self) -> dict | None:
        """config.json's `rope_scaling` for this kind (None for the default)."""
        if self.kind == "default":
            return None
        if self.kind == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return {
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }


def rotary_inv_freq(
    head_dim: int, rope_theta: float | Rope, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """[D/2] inverse frequencies, as HF Llama computes them (in `dtype`; HF's are fp32) for a theta or a Rope
    (cached: do not modify)."""
    return _inv_freq(head_dim, Rope.of(rope_theta), dtype, torch.device(device) if device is not None else None)


@functools.lru_cache(maxsize=64)
def _inv_freq(head_dim: int, rope: Rope, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(dtype) / head_dim
    inv_freq = 1.0 / (rope.theta**exponent)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":  # HF's _compute_llama3_parameters, op for op
        old_len = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / rope.low_freq_factor, old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, rope_theta: float | Rope, dtype: torch.dtype):
    """cos, sin of shape [N, D] for integer positions [N] (the "rotate half" layout: halves repeated)."""
    inv_freq = rotary_inv_freq(head_dim, rope_theta, dtype, positions.device)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rope_theta: float | Rope = 10000.0) -> torch.Tensor:
    """Rotate x [N, H, D] at positions [N] with the Llama / HF rotate-half convention.

    Computes in at least fp32 and returns x's dtype.
    """
    ct = compute_dtype(x.dtype)
    cos, sin = rotary_cos_sin(positions, x.shape[-1], rope_theta, ct)
    return _rotate(x, cos, sin, ct).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """x [N, H, D] rotated by cos, sin [N, D] (rotate-half), in ct."""
    d = x.shape[-1]
    xc = x.to(ct)
    x1, x2 = xc[..., : d // 2], xc[..., d // 2 :]
    return xc * cos[:, None, :] + torch.cat([-x2, x1], dim=-1) * sin[:, None, :]


# ================================================================================= sampling ==

M32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2^32); constants < 2^31 keep
    every product below 2^63, so nothing overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & M32
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=8)
def _column_keys(vocab: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """Hash keys of vocabulary entries [offset, offset + vocab), computed once per (vocab, device, offset)."""
    return mix32(torch.arange(offset, offset + vocab, device=device, dtype=torch.int64) * 0x61C88647 & M32)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int, offset: int = 0) -> torch.Tensor:
    """[B, V] uniforms in (0, 1) from per-row seeds [B] and counters [B] (int64): a pure function. offset: the
    first column's vocabulary id (a tensor-parallel rank's shard: the same noise as the whole row's slice).

    23 bits a value, (k + 0.5) / 2^23: the largest is 1 - 2^-24, exact in fp32 (24 bits would round the largest
    to 1.0, whose Gumbel noise is +inf: one draw in 2^24 per entry, a random token in 0.2% of a 32k vocabulary's
    steps). The counter is hashed before it meets the seed: XORed in plain, two seeds whose hashes differ by d
    would draw the same noise at every pair of counters c and c ^ d."""
    seeds, counters = seeds.long(), counters.long()  # (int32 products would wrap before the mask)
    row = mix32(mix32(seeds & M32) ^ mix32((counters & M32) ^ 0x5BD1E995))
    col = _column_keys(vocab, seeds.device, offset)
    return bits_to_uniform(mix32(row[:, None] ^ col[None, :]))


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in (0, 1) from 32-bit hashes (int64 tensors): (bits >> 9 + 0.5) / 2^23, never 1."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def gumbel_sample(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    temperature: float,
    min_logit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of kernels.sampling.gumbel_sample: argmax of logits / temperature + Gumbel(uniform_noise) (argmax
    of the logits at temperature 0) -> (tokens [B] int64, log_softmax(logits) at them [B] fp32). min_logit [B]:
    only tokens whose logit is >= their row's may be drawn (top-k: the k-th largest logit); the log-prob stays
    under the whole row's raw logits."""
    logits = logits.float()
    tokens = _gumbel_scores(logits, seeds, counters, temperature, 0, min_logit).argmax(-1)
    return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)


def _gumbel_scores(logits, seeds, counters, temperature: float, vocab_offset: int, min_logit=None) -> torch.Tensor:
    """logits / temperature + Gumbel noise of columns vocab_offset + [0, V) (the logits at temperature 0), fp32;
    -inf where a logit is below its row's min_logit."""
    if temperature == 0:
        return logits
    noise = uniform_noise(seeds, counters, logits.shape[-1], vocab_offset)
    score = logits / temperature - torch.log(-torch.log(noise))
    if min_logit is not None:
        score = score.masked_fill(logits < min_logit.float()[:, None], float("-inf"))
    return score


def gumbel_sample_partial(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    temperature: float,
    vocab_offset: int,
    min_logit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of kernels.sampling.gumbel_sample_partial: gumbel_sample over one vocabulary shard (columns
    vocab_offset + [0, V)) -> (global token ids [B] int64, stats [B, 3] float64: the best score, the logit at the
    token, the shard's logsumexp (in float64: in fp32 it rounds at ulp(max), 1e-3 for logits of 1e4))."""
    logits = logits.float()
    score = _gumbel_scores(logits, seeds, counters, temperature, vocab_offset, min_logit)
    idx = score.argmax(-1)[:, None]  # the first maximum
    lse = torch.logsumexp(logits.double(), -1, keepdim=True)
    stats = torch.cat([score.gather(-1, idx).double(), logits.gather(-1, idx).double(), lse], -1)
    idx = idx.squeeze(-1)
    return idx + vocab_offset, stats


def combine_partial_samples(tokens: torch.Tensor, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of kernels.sampling.combine_partial_samples: tokens [S, B] and stats [S, B, 3] of gumbel_sample_partial
    over S shards in vocabulary order -> (tokens [B] int64, log-probs [B] fp32): the first shard holding the best
    score (the row's first maximum), its logit less the logsumexp of the shards' logsumexps in float64."""
    shard = stats[..., 0].argmax(0, keepdim=True)  # [1, B]: the first maximum over shards
    logit = stats[..., 1].gather(0, shard).squeeze(0)
    lse = torch.logsumexp(stats[..., 2].double(), 0)
    return tokens.gather(0, shard).squeeze(0), (logit.double() - lse).float()


def kth_largest_sharded(logits: torch.Tensor, k: int, all_reduce) -> torch.Tensor:
    """Oracle of kernels.sampling.kth_largest_sharded: the k-th largest value [B] fp32 of whole rows whose vocabulary
    shards [B, V / tp] the ranks hold, by the same radix select in torch (order keys, four passes of 8 bits, each
    pass's [B, 256] int32 histograms summed over the ranks by all_reduce, in place): torch.topk's k-th value of the
    gathered rows, without gathering them."""
    x = logits.float().contiguous()
    key = _order_keys(x)
    prefix = torch.zeros(x.shape[0], 1, dtype=torch.int64, device=x.device)  # the digits chosen so far
    need = torch.full((x.shape[0], 1), k, dtype=torch.int64, device=x.device)  # the rank sought among those matching
    for p in range(4):
        shift = 24 - 8 * p
        matching = ((key >> (shift + 8)) == (prefix >> (shift + 8))).to(torch.int32)  # (all of them on pass 0)
        hist = torch.zeros(x.shape[0], 256, dtype=torch.int32, device=x.device)
        all_reduce(hist.scatter_add_(1, (key >> shift) & 0xFF, matching))
        at_or_above = hist.flip(-1).cumsum(-1).flip(-1)  # of each digit: the matching values >= it
        digit = (at_or_above >= need).sum(-1, keepdim=True) - 1  # the highest digit reaching the rank
        need = need - (at_or_above - hist).gather(1, digit)
        prefix = prefix | (digit << shift)
    return _key_values(prefix.squeeze(1))


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> int64 in [0, 2^32) whose order is the floats' order (kernels.sampling._order_key)."""
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(u >> 31 == 1, u ^ 0xFFFFFFFF, u | 0x80000000)


def _key_values(key: torch.Tensor) -> torch.Tensor:
    """_order_keys back to the fp32 values."""
    bits = torch.where(key >> 31 == 1, key & 0x7FFFFFFF, key ^ 0xFFFFFFFF)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _top_p_mass(x: torch.Tensor, m: torch.Tensor, temperature: float, min_logit: torch.Tensor | None) -> torch.Tensor:
    """float64 softmax(x / temperature) over rows [B, V] up to its normaliser: exp((x - m) / temperature) with m the
    rows' max [B, 1] (every shard's; 0 where it is -inf), 0 below min_logit [B] (top-k's floor)."""
    w = torch.exp((x.double() - torch.where(m == -math.inf, 0.0, m.double())) / temperature)
    return w if min_logit is None else torch.where(x >= min_logit[:, None], w, 0.0)


def top_p_floor(
    logits: torch.Tensor, top_p: float, temperature: float = 1.0, min_logit: torch.Tensor | None = None
) -> torch.Tensor:
    """Oracle of kernels.sampling.top_p_floor, by sorting in float64: the lowest logit [B] fp32 that top-p sampling
    keeps in each row, the value at which the mass of softmax(logits / temperature), counted from the largest logit
    down, first reaches top_p. Sampling keeps the logits >= it: the smallest top set holding top_p of the mass, a run
    of tied logits whole (HF's warper keeps part of a tie at the edge, by its sort's order). min_logit [B]: only the
    logits >= it count (top-k's floor: HF's order, top-k first, then top-p over what it keeps). -inf for a row with no
    mass (every logit -inf)."""
    x = logits.double()
    w = _top_p_mass(x, x.amax(-1, keepdim=True), temperature, min_logit)
    ordered, order = x.sort(-1, descending=True)
    cum = w.gather(-1, order).cumsum(-1)
    total = cum[:, -1:]
    first = (cum >= top_p * total).to(torch.int8).argmax(-1, keepdim=True)  # the first place the mass reaches top_p
    floor = ordered.gather(-1, first).squeeze(-1)
    return torch.where(total.squeeze(-1) > 0, floor, -math.inf).float()


def top_p_floor_sharded(
    logits: torch.Tensor, top_p: float, temperature: float, all_reduce, all_reduce_max, min_logit=None
) -> torch.Tensor:
    """Oracle of kernels.sampling.top_p_floor_sharded: top_p_floor of whole rows whose vocabulary shards [B, V / tp]
    the ranks hold, without gathering them: the rows' max by all_reduce_max ([B] fp32, in place), then a radix
    select in torch on the order keys, eight passes of 4 bits, each pass's [B, 16] float64 masses of the logits
    matching the digits chosen so far summed over the ranks by all_reduce (in place); each pass chooses the highest
    digit at which the mass from the top reaches what is still sought."""
    x = logits.float().contiguous()
    m = x.amax(-1)
    all_reduce_max(m)
    w = _top_p_mass(x, m[:, None], temperature, min_logit)
    key = _order_keys(x)
    bins = torch.arange(16, device=x.device)
    prefix = torch.zeros(x.shape[0], 1, dtype=torch.int64, device=x.device)
    for p in range(8):
        shift = 28 - 4 * p
        matching = (key >> (shift + 4)) == (prefix >> (shift + 4))  # (all of them on pass 0)
        hist = torch.zeros(x.shape[0], 16, dtype=torch.float64, device=x.device)
        all_reduce(hist.scatter_add_(1, (key >> shift) & 0xF, torch.where(matching, w, 0.0)))
        if p == 0:
            total = hist.sum(-1, keepdim=True)
            need = top_p * total
        at_or_above = hist.flip(-1).cumsum(-1).flip(-1)  # of each digit: the matching mass >= it
        digit = torch.where((at_or_above >= need) & (hist > 0), bins, -1).amax(-1, keepdim=True)
        lowest = torch.where(hist > 0, bins, 15).amin(-1, keepdim=True)  # (rounding left the mass short of it)
        digit = torch.where(digit >= 0, digit, lowest)
        need = need - (at_or_above - hist).gather(1, digit)
        prefix = prefix | (digit << shift)
    return torch.where(total.squeeze(-1) > 0, _key_values(prefix.squeeze(1)), -math.inf)


# ======================================================================= norm and activation ==


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of kernels.rmsnorm.add_rms_norm: h = x + delta (torch's add, rounded to the dtype), (rms_norm(h), h)."""
    h = x + delta
    return rms_norm(h, weight, eps), h


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in (at least) fp32, round to x's dtype, then scale by weight."""
    ct = compute_dtype(x.dtype)
    xf = x if x.dtype == ct else x.to(ct)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """HF Llama's MLP activation on the fused projection [..., 2I] = [gate | up]: silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ========================================================================== rope_attention ==


def varlen_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence; no rotary. q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D].

    GQA: query head h reads key/value head h // (Hq // Hkv). Softmax in at least fp32.
    """
    n, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    ct = compute_dtype(q.dtype)
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].to(ct).transpose(0, 1)  # [Hq, L, D]
        ks = k[start:end].to(ct).transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        vs = v[start:end].to(ct).transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outs.append(o.transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0).to(q.dtype)


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    rope_theta: float | Rope = 10000.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Oracle of kernels.rope_attention.rope_attention: rotary on q and k, then varlen causal attention."""
    qr = apply_rotary(q, positions, rope_theta)
    kr = apply_rotary(k, positions, rope_theta)
    return varlen_causal_attention(qr, kr, v, cu_seqlens, softmax_scale)


# ========================================================================= paged_attention ==


def _flat_cache(cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, Hkv, D] -> [num_blocks * block_size, Hkv, D], always a view (writes must land)."""
    nb, bs, h, d = cache.shape
    return cache.view(nb * bs, h, d)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Oracle of kernels.paged_attention.paged_decode_attention: one query token per sequence.

    q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int;
    context_lens [B] int (tokens each query attends to, its own included). Returns [B, Hq, D] in q's
    dtype; a sequence with context length 0 gets zeros. Gathers the context through the block table
    (vectorised: one index_select for the whole batch), then softmax in at least fp32. max_context_len: at least
    max(context_lens), known on the host (else read from them: a device sync, and a graph break under torch.compile);
    a smaller one is refused where the lengths are on the host (on a GPU it would cut the contexts short).
    """
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    ct = compute_dtype(q.dtype)
    lens = context_lens.to(torch.int64)
    max_len = (int(lens.max()) if max_context_len is None else max_context_len) if b else 0
    if max_context_len is not None and b and lens.device.type == "cpu" and not torch.compiler.is_compiling():
        longest = int(lens.max())  # (free on the host: a bound below the real lengths would cut contexts short)
        if longest > max_context_len:
            raise ValueError(f"context length {longest} exceeds max_context_len {max_context_len}")
    if max_len == 0:
        return q.new_zeros(q.shape)
    if max_len > block_tables.shape[1] * block_size:
        raise ValueError(
            f"context length {max_len} needs {-(-max_len // block_size)} blocks but block_tables has "
            f"{block_tables.shape[1]} columns"
        )
    t = torch.arange(max_len, device=q.device)
    valid = t[None, :] < lens[:, None]  # [B, L]
    blocks = block_tables.to(torch.int64)[:, t // block_size]  # [B, L]
    slots = torch.where(valid, blocks * block_size + t % block_size, 0)
    # Zero what lies past each context: unwritten slots may hold anything (NaN included).
    keep = valid[:, :, None, None]
    k = torch.where(keep, _flat_cache(k_cache)[slots.reshape(-1)].view(b, max_len, hkv, d).to(ct), 0.0)
    v = torch.where(keep, _flat_cache(v_cache)[slots.reshape(-1)].view(b, max_len, hkv, d).to(ct), 0.0)
    qg = q.to(ct).view(b, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows (length 0) -> zeros
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return out.reshape(b, hq, d).to(q.dtype)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in a KV cache's dtype; float8 e4m3 saturates at +-448 as the GPU's conversion does (torch's own cast
    saturates only from 2.12 on: before, a value past 464 became NaN)."""
    if dtype == torch.float8_e4m3fn:
        x = x.float().clamp(-448.0, 448.0)
    return x.to(dtype)


def read_back_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [N, Hkv, D] as the cache holds them after a write (a float8 cache's rounding), in k's and v's dtypes;
    tokens with slot -1 as they are. Prefill attends to these, so that it sees what later decode steps read."""
    keep = (slot_mapping >= 0)[:, None, None]
    slots = slot_mapping.clamp(min=0).to(torch.int64)
    # straight through for autograd (the rounding passes the gradient on, as the kernel path's backward does)
    # (gathered as bytes: indexing has no float8 kernel on every device)
    k_back = _flat_cache(k_cache).view(torch.uint8)[slots].view(k_cache.dtype).to(k.dtype)
    v_back = _flat_cache(v_cache).view(torch.uint8)[slots].view(v_cache.dtype).to(v.dtype)
    return k + (torch.where(keep, k_back, k) - k).detach(), v + (torch.where(keep, v_back, v) - v).detach()


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Oracle of kernels.paged_attention.write_kv_cache: k/v [N, Hkv, D] into their slots, in place.

    slot = block_id * block_size + offset; slot -1 means "do not write".
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(torch.int64)
    for x, cache in ((k, k_cache), (v, v_cache)):
        # as bytes: index_copy_ has no float8 kernel
        _flat_cache(cache).view(torch.uint8).index_copy_(
            0, slots, to_cache_dtype(x[keep], cache.dtype).view(torch.uint8)
        )


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rope_theta: float | Rope = 10000.0,
) -> torch.Tensor:
    """Oracle of kernels.paged_attention.rope_write_kv: rotate q and k, write rotated k and v, return rotated q.

    q [N, Hq, D], k/v [N, Hkv, D], positions [N] int, slot_mapping [N] int64 (-1: skip).
    """
    ct = compute_dtype(q.dtype)
    cos, sin = rotary_cos_sin(positions, q.shape[-1], rope_theta, ct)  # once for q and k
    write_kv_cache(_rotate(k, cos, sin, ct), v, k_cache, v_cache, slot_mapping)  # one rounding, to the cache's dtype
    return _rotate(q, cos, sin, ct).to(q.dtype)


# ================================================================================= logprob ==


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *, return_entropy: bool = False, group=None
):
    """Oracle of kernels.logprob.token_logprobs: log_softmax(logits / T) gathered at targets.

    logits [..., V], targets [...] int64 -> log-probs [...] (and entropy [...]) in at least fp32.
    With `group` the logits are this rank's contiguous vocab slice: the full rows are all-gathered
    (differentiably) first, so this is a slow but obviously-correct oracle.
    """
    ct = compute_dtype(logits.dtype)
    x = logits.to(ct)
    if group is not None:
        # Gather the other ranks' slices without autograd and splice in our own differentiable slice:
        # the outputs are replicated over the group, so each rank's grad is that of its own slice.
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.detach().contiguous(), group=group)
        parts[dist.get_rank(group)] = x
        x = torch.cat(parts, dim=-1)
    # (x - max) / T, not x / T: that rounds at ulp(x / T) (1e-3 for logits of 1e4 at T = 0.7) before log_softmax
    # takes the max off; a constant shift changes no log-prob (a row of -inf: shifted by 0)
    top = x.detach().amax(-1, keepdim=True) if x.numel() else x.detach()
    z = (x - torch.where(torch.isfinite(top), top, 0.0)) / temperature
    v = z.shape[-1]
    # (a device sync: skipped under torch.compile, where it would split the graph, as benches compile this oracle)
    if targets.numel() and not torch.compiler.is_compiling() and (int(targets.min()) < 0 or int(targets.max()) >= v):
        raise ValueError(f"targets out of range [0, {v})")
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # p * logp is 0 * -inf = nan on masked (-inf) vocab entries; those contribute 0 (and no nan grad).
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(p))).sum(-1)
    return logp, entropy


def hidden_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    group=None,
    real_vocab: int | None = None,
):
    """Oracle of kernels.logprob.hidden_logprobs: hidden [N, H] @ weight[V, H].T, then token_logprobs.

    With `group`, weight is this rank's vocab slice and hidden is replicated: its grad is summed over
    the group (as Megatron's copy-to-tensor-parallel-region does before a column-parallel LM head). Rows of
    weight from `real_vocab` on pad the vocabulary: their logits are -inf.
    """
    ct = compute_dtype(hidden.dtype)
    if group is not None:
        hidden = _AllReduceGrad.apply(hidden, group)
    logits = hidden.to(ct) @ weight.to(ct).t()
    if real_vocab is not None:
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= real_vocab, -math.inf)
    return token_logprobs(logits, targets, temperature, return_entropy=return_entropy, group=group)


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; all_reduce(SUM) of the gradient in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimators from sampled-token log-probs (Schulman's k1, k2, k3)."""
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d  # (exp(-d) - 1 would cancel at ulp(1) for a small d, even below 0)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


# exp of a log-ratio above this is inf in float32 (exp(88.72) = 3.40e38, float32's largest)
MAX_LOG_RATIO = 88.72


def ppo_ratio(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """exp(logp - old), the PPO ratio, its log capped at MAX_LOG_RATIO where adv >= 0. There the clipped term
    -adv (1 + eps) is the max past the clip range, so the cap changes no loss, and the token's zero grad does not
    become 0 * inf = NaN in exp's backward (nor -0 * inf a NaN loss where adv is 0). Where adv < 0 the unclipped term
    is the loss: inf past float32's range, as it is."""
    log_ratio = logp - old
    return torch.exp(torch.where(adv >= 0, log_ratio.clamp(max=MAX_LOG_RATIO), log_ratio))


def ppo_token_loss(
    logits: torch.Tensor | None,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    temperature: float = 1.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k1",
    entropy_coef: float = 0.0,
    group=None,
    real_vocab: int | None = None,
):
    """Oracle of kernels.ppo_loss.ppo_token_loss: clipped PPO surrogate, masked mean over tokens.

    loss_t = max(-A r, -A clip(r, 1-eps, 1+eps)) + kl_coef * kl(logp, ref) - entropy_coef * H,
    r = exp(logp - old_logp); loss = sum(loss_t * mask) / max(sum(mask), 1).
    Returns (loss, stats) with stats: ratio, clip_frac, entropy, approx_kl (0.5 (logp-old)^2), kl_ref.
    """
    if logits is None:
        logp, ent = hidden_logprobs(
            hidden, weight, targets, temperature, return_entropy=True, group=group, real_vocab=real_vocab
        )
    else:
        logp, ent = token_logprobs(logits, targets, temperature, return_entropy=True, group=group)
    ct = logp.dtype
    m = mask.to(ct)
    denom = m.sum().clamp_min(1.0)
    keep = mask.bool()  # (off the mask: whatever old, advantages and ref hold there, NaN or a huge value, is not read)
    old = torch.where(keep, old_logprobs.to(ct), 0.0)
    adv = torch.where(keep, advantages.to(ct), 0.0)
    # (and the token's own log-prob: one of -300 would give k3 an inf off the mask, and its grad 0 * inf = NaN)
    logp_on = torch.where(keep, logp, 0.0)
    ratio = ppo_ratio(logp_on, old, adv)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_tok = torch.maximum(pg1, pg2) - entropy_coef * ent
    kl_ref = None
    if ref_logprobs is not None:
        kl_ref = kl_estimate(logp_on, torch.where(keep, ref_logprobs.to(ct), 0.0), kl_estimator)
        if kl_coef:  # (as the kernel path: a k3 that overflows fp32 on a masked token is no 0 * inf = NaN)
            per_tok = per_tok + kl_coef * kl_ref
    loss = torch.where(keep, per_tok * m, 0.0).sum() / denom
    with torch.no_grad():
        mean = lambda x: torch.where(keep, x * m, 0.0).sum() / denom
        stats = {
            "ratio": mean(ratio),
            "clip_frac": mean((pg2 > pg1).to(ct)),
            "entropy": mean(ent),
            "approx_kl": mean(0.5 * (logp - old) ** 2),
            "kl_ref": mean(kl_ref) if kl_ref is not None else torch.zeros((), dtype=ct, device=logp.device),
        }
    return loss, stats


# ===================================================================================== gae ==


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of kernels.gae.gae: the reversed Python loop of TRL / OpenRLHF / veRL, masked.

    rewards, values [B, T] float; mask [B, T] (bool or numbers, nonzero = response token).
    Returns (advantages, returns) [B, T] in compute_dtype of the inputs (float64 stays float64).

    The peers' loop runs over a contiguous response tensor. Here the masked positions of each row
    are the steps, taken in order, and everything else is skipped (the carry of veRL's multi-turn
    loop): V_next is the value at the row's next masked position (0 after the last one),
    delta_t = r_t + gamma * V_next - V_t, A_t = delta_t + gamma * lam * A_next, returns = A + V.
    Rewards and values outside the mask are never read into the result (even NaN there is fine);
    advantages and returns outside the mask are exactly 0.
    """
    ct = compute_dtype(torch.promote_types(rewards.dtype, values.dtype))
    m = mask != 0
    r = torch.where(m, rewards.to(ct), 0.0)
    v = torch.where(m, values.to(ct), 0.0)
    n_rows, n_steps = r.shape
    next_values = r.new_zeros(n_rows)
    last_gae_lam = r.new_zeros(n_rows)
    advantages_reversed = []
    for t in reversed(range(n_steps)):
        delta = r[:, t] + gamma * next_values - v[:, t]
        gae_t = delta + gamma * lam * last_gae_lam
        # Masked-out steps carry both the next value and the running advantage through unchanged.
        next_values = torch.where(m[:, t], v[:, t], next_values)
        last_gae_lam = torch.where(m[:, t], gae_t, last_gae_lam)
        advantages_reversed.append(last_gae_lam)
    if advantages_reversed:
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
    else:
        advantages = r.new_zeros(n_rows, 0)
    advantages = torch.where(m, advantages, 0.0)
    returns = torch.where(m, advantages + v, 0.0)
    return advantages, returns


def peer_gae_loop(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE exactly as TRL / OpenRLHF write it: a reversed loop over a contiguous response [B, L].

    With `mask` (OpenRLHF's action mask) rewards and values are zeroed outside it first. Tests check
    `gae` against it on contiguous responses; benchmarks time it as what users run today.
    """
    if mask is not None:
        values, rewards = mask * values, mask * rewards
    lastgaelam = 0
    advantages_reversed = []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Oracle of kernels.gae.masked_mean (single process): mean of x over mask != 0; NaN if none."""
    return x[mask != 0].to(compute_dtype(x.dtype)).mean()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Oracle of kernels.gae.masked_whiten (single process), TRL's masked_whiten with unbiased variance.

    (x - mean) * rsqrt(var + eps) over mask != 0, var with Bessel's correction (n - 1); with
    shift_mean=False the mean is added back (TRL). var is taken as 0 when fewer than 2 elements are
    masked (TRL raises there). Positions outside the mask are 0. Returns x's dtype.
    """
    ct = compute_dtype(x.dtype)
    m = mask != 0
    sel = x[m].to(ct)
    mean = sel.mean() if sel.numel() else sel.new_zeros(())
    var = sel.var(unbiased=True) if sel.numel() > 1 else sel.new_zeros(())
    out = (x.to(ct) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0.0).to(x.dtype)
