"""The Llama model: one parameter set that serves training (packed forward, TP) and generation (paged KV).

Every layer works on packed tokens [N, hidden]: a batch of sequences is concatenated and delimited by
`cu_seqlens`, so no padding is ever computed. The padded `forward(input_ids [B, T], attention_mask)`
packs, runs, and scatters back.

Generation sets an `AttentionContext` (nano-vllm style) before calling `forward_packed`; the attention
layers read it to write the paged KV cache during prefill, or to run paged decode attention, so the
block tables and slot mappings never thread through every forward signature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from engine import grad_sums
from engine.config import ModelConfig
from engine.distributed import group_size
from engine.errors import MissingPackage
from engine.parallel import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp,
    gather_from_tp,
    gather_tokens,
    shard_range,
    take_shard,
)
from kernels.decode_config import norm_rows
from kernels.decode_linear import (
    RowSquares,
    decode_linear,
    linear,
    qkv_rope_linear,
    swiglu_linear,
    wants_decode_linear,
)
from kernels.rmsnorm import add_rms_norm, rms_norm
from kernels.rope_attention import rope_attention
from kernels.swiglu import swiglu, swiglu_backward

# ------------------------------------------------------------------------ attention context --


@dataclass
class AttentionContext:
    """What the attention layers need during generation (set by engine.generate, else None).

    kv_caches: per layer (k_cache, v_cache), each [num_blocks, block_size, Hkv_local, D].
    slot_mapping: [N] int64 cache slot of each input token (-1: do not write).
    decode: one new token per sequence (paged decode attention) rather than a prefill.
    block_tables [B, max_blocks] int32 and context_lens [B] int32: for the decode tokens.
    prefill_tokens: a mixed step (decode False): the first prefill_tokens tokens are prompts (delimited by the
    forward's cu_seqlens), the remaining B are one decode token each, in block_tables' order.
    """

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    slot_mapping: torch.Tensor
    decode: bool = False
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    prefill_tokens: int | None = None

    def num_prefill(self, n_tokens: int) -> int:
        """How many of the n_tokens input tokens are prefill tokens (the rest decode)."""
        if self.decode:
            return 0
        return n_tokens if self.prefill_tokens is None else self.prefill_tokens


_CONTEXT: AttentionContext | None = None


@contextlib.contextmanager
def attention_context(ctx: AttentionContext | None) -> Iterator[None]:
    global _CONTEXT
    prev, _CONTEXT = _CONTEXT, ctx
    try:
        yield
    finally:
        _CONTEXT = prev


# ---------------------------------------------------------------------------------- layers --


class RMSNorm(nn.Module):
    """HF Llama's RMSNorm: normalise in fp32, cast back, then scale (the order matters in bf16); kernels/rmsnorm.py."""

    def __init__(self, hidden_size: int, eps: float, **factory):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, **factory))
        self.weight.weight_loader = self.load_part

    def load_part(self, source, part: int = 0, name: str = "weight") -> None:
        src = source[:]
        if tuple(src.shape) != tuple(self.weight.shape):
            raise ValueError(f"tensor {name}: shape {tuple(src.shape)}, expected {tuple(self.weight.shape)}")
        self.weight.data.copy_(src)

    def full_part(self, part: int = 0) -> torch.Tensor:
        return self.weight.data

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None):
        """rms_norm(x); with delta, (rms_norm(x + delta), x + delta): the residual add that feeds the norm, fused
        (one pass each way, kernels/rmsnorm.py; the same rounding as HF's add then norm)."""
        if delta is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, delta, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, group, **factory):
        super().__init__()
        tp = group_size(group)
        d = cfg.head_dim
        self.layer_idx = layer_idx
        self.head_dim = d
        self.rope = cfg.rope  # theta and scaling (kernels.reference.Rope)
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size,
            [cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d],
            group,
            shard_units=[d, d, d],
            names=["the attention heads", "the key/value heads", "the key/value heads"],
            **factory,
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, group, d, "the attention heads", **factory)
        self.local_heads = cfg.num_heads // tp
        self.local_kv_heads = cfg.num_kv_heads // tp

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None, sp: bool = False
    ) -> torch.Tensor:
        """x [N, hidden] (with `sp`, [N/tp, hidden] this rank's tokens: see Transformer.hidden_packed); positions
        and cu_seqlens describe all N tokens. Returns the same layout as x."""
        d = self.head_dim
        ctx = _CONTEXT
        if ctx is not None and not sp and ctx.num_prefill(x.shape[0]) == 0 and self._fused_qkv(x):
            return self.o_proj(self._decode_step(x, positions, ctx).reshape(x.shape[0], self.local_heads * d), sp)
        qkv = self.qkv_proj(x, sp)
        n = qkv.shape[0]
        q, k, v = qkv.split([self.local_heads * d, self.local_kv_heads * d, self.local_kv_heads * d], dim=-1)
        q = q.view(n, self.local_heads, d)
        k = k.view(n, self.local_kv_heads, d)
        v = v.view(n, self.local_kv_heads, d)
        if ctx is None and q.is_cuda and attention_backend() == "flash":
            o = _flash_attention(q, k, v, positions, cu_seqlens, self.rope)
        elif ctx is None:
            o = rope_attention(q, k, v, positions, cu_seqlens, rope_theta=self.rope)
        else:
            o = self._cached_attention(q, k, v, positions, cu_seqlens, ctx)
        return self.o_proj(o.reshape(n, self.local_heads * d), sp)

    def _fused_qkv(self, x: torch.Tensor) -> bool:
        """Whether a decode step's QKV projection takes kernels/decode_linear.py's qkv_rope_linear (decode_config's
        `linear` switch; a power-of-two head dim: one head a column block)."""
        d = self.head_dim
        return d >= 16 and not d & (d - 1) and wants_decode_linear(x, self.qkv_proj.weight)

    def _decode_step(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext, norm=None):
        """A decode-only step in two launches: the QKV projection rotating q and k and writing k and v into the cache
        in its epilogue, then paged attention over the cache (no rotary kernel, no q/k/v round trip). norm: x is the
        residual stream, normalised in the projection's prologue (kernels/decode_linear.py); returns (attention, the
        stream after the add) then."""
        from kernels.paged_attention import paged_decode_attention

        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        x = copy_to_tp(x, self.qkv_proj.group)
        q = qkv_rope_linear(x, self.qkv_proj.weight, positions, k_cache, v_cache, ctx.slot_mapping,
                            num_heads=self.local_heads, rope_theta=self.rope, norm=norm)  # fmt: skip
        q, h = q if norm is not None else (q, None)
        o = paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens)
        return o if norm is None else (o, h)

    def _cached_attention(self, q, k, v, positions, cu_seqlens, ctx: AttentionContext) -> torch.Tensor:
        """Generation: prompts (flash attention over the packed prompts, writing their KV) and/or decode tokens
        (their KV written, then paged attention over each sequence's cache), in one step."""
        from kernels.paged_attention import rope_decode_attention

        kv_cache = ctx.kv_caches[self.layer_idx]
        n, p = q.shape[0], ctx.num_prefill(q.shape[0])
        if p == n:  # prompts only
            return rope_attention(
                q, k, v, positions, cu_seqlens, rope_theta=self.rope, kv_cache=kv_cache,
                slot_mapping=ctx.slot_mapping,
            )  # fmt: skip
        if p == 0:  # decode only (what a CUDA graph captures): rotary + cache write, then paged attention
            return rope_decode_attention(
                q, k, v, positions, *kv_cache, ctx.slot_mapping, ctx.block_tables, ctx.context_lens,
                rope_theta=self.rope,
            )  # fmt: skip
        prompts = rope_attention(
            q[:p], k[:p], v[:p], positions[:p], cu_seqlens, rope_theta=self.rope, kv_cache=kv_cache,
            slot_mapping=ctx.slot_mapping[:p],
        )  # fmt: skip
        decode = rope_decode_attention(
            q[p:], k[p:], v[p:], positions[p:], *kv_cache, ctx.slot_mapping[p:], ctx.block_tables, ctx.context_lens,
            rope_theta=self.rope,
        )  # fmt: skip
        return torch.cat([prompts, decode])


def attention_backend() -> str:
    """TULU_PPO_ATTENTION=flash uses flash-attn (when installed) for the training forward on a GPU; default "triton"
    (the switch read as every TULU_* switch is: kernels.dispatch, whose check_switches named any other value)."""
    from kernels.dispatch import env_word

    return env_word("TULU_PPO_ATTENTION", "triton")


def flash_attn_varlen():
    """flash-attn's varlen function (TULU_PPO_ATTENTION=flash); MissingPackage where it is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise MissingPackage("TULU_PPO_ATTENTION=flash needs flash-attn: pip install -e '.[flash]'") from e
    return flash_attn_varlen_func


def _flash_attention(q, k, v, positions, cu_seqlens, rope) -> torch.Tensor:
    """flash-attn's varlen kernel with the rotary applied separately (the optional path)."""
    flash_attn_varlen_func = flash_attn_varlen()
    from kernels.dispatch import derived
    from kernels.reference import apply_rotary

    q, k = apply_rotary(q, positions, rope), apply_rotary(k, positions, rope)
    # (a host sync: once per cu_seqlens, not once per layer)
    max_len = derived(cu_seqlens, ("max_len",), lambda: int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=True)


class _SwiGLUDown(torch.autograd.Function):
    """down(swiglu(gate_up)) for training, keeping gate_up (which swiglu's backward reads anyway) and not the
    activation, the down projection's input (I x 2 bytes a token: 3.4 of the 22.7 KB a 13B layer keeps at TP 8, 27 of
    181 at TP 1); the backward recomputes it in one elementwise pass. The same bits as swiglu then the projection.
    The weight's grad goes into its fp32 sum (`acc`, engine/grad_sums.py) or to autograd."""

    @staticmethod
    def forward(ctx, gate_up, weight, acc):
        ctx.save_for_backward(gate_up, weight)
        ctx.acc = acc
        return F.linear(swiglu(gate_up), weight)

    @staticmethod
    def backward(ctx, dy):
        gate_up, weight = ctx.saved_tensors
        acc, ctx.acc = ctx.acc, None
        dy2 = dy.reshape(-1, dy.shape[-1])
        act = swiglu(gate_up).reshape(-1, weight.shape[1])  # (recomputed)
        gw, dgu = grad_sums.weight_grad(acc, dy2, act, ctx.needs_input_grad[1]), None
        if ctx.needs_input_grad[0]:
            dgu = swiglu_backward(gate_up, (dy2 @ weight).view(*gate_up.shape[:-1], weight.shape[1]))
        return dgu, gw, None


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one column-parallel weight. `recompute_act`
    (set by engine/recompute.py's plan when layers would otherwise be recomputed): training keeps the projection's
    output, not the activation, and recomputes the activation in the backward (_SwiGLUDown)."""

    recompute_act = False

    def __init__(self, cfg: ModelConfig, group, **factory):
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [i, i], group, names=["the MLP width", "the MLP width"], **factory
        )
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, group, 1, "the MLP width", **factory)

    def forward(self, x: torch.Tensor, sp: bool = False) -> torch.Tensor:
        # a decode step's projection and activation in one launch (kernels/decode_linear.py, decode_config's `linear`)
        act = None if sp else swiglu_linear(copy_to_tp(x, self.gate_up_proj.group), self.gate_up_proj.weight)
        if act is None:
            gate_up = self.gate_up_proj(x, sp)
            if self.recompute_act and torch.is_grad_enabled() and gate_up.requires_grad:
                down = self.down_proj
                return down.reduce(_SwiGLUDown.apply(gate_up, down.weight, grad_sums.target(down.weight)), sp)
            act = swiglu(gate_up)  # silu(gate) * up, fused (kernels/swiglu.py)
        return self.down_proj(act, sp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, group, **factory):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **factory)
        self.self_attn = Attention(cfg, layer_idx, group, **factory)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **factory)
        self.mlp = MLP(cfg, group, **factory)

    def forward(
        self,
        h: torch.Tensor,
        delta: torch.Tensor | None,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        sp: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream h and the previous layer's MLP output delta (None before the first layer) ->
        (the stream after this layer's attention, this layer's MLP output): each residual add is fused into the
        norm it feeds (this layer's two, the next layer's input norm, the final norm). With `sp` (sequence
        parallel) h and delta hold this rank's tokens only, and so do the norms."""
        if not sp and self._norms_fused(h):
            return self._decode_step(h, delta, positions)
        if isinstance(delta, RowSquares):  # (the stream already holds the last fused layer's add)
            delta = None
        x, h = (self.input_layernorm(h), h) if delta is None else self.input_layernorm(h, delta)
        x, h = self.post_attention_layernorm(h, self.self_attn(x, positions, cu_seqlens, sp))
        return h, self.mlp(x, sp)

    def _norms_fused(self, h: torch.Tensor) -> bool:
        """Whether a decode-only step runs the layer's adds and norms inside its projections (kernels/decode_linear.py,
        decode_config's `linear` switch): always on one rank; under TP (whose output and down projections are
        all-reduced before their adds) for at most decode_config's norm_rows sequences."""
        ctx = _CONTEXT
        if ctx is None or ctx.num_prefill(h.shape[0]):
            return False
        if self.self_attn.o_proj.tp > 1 and h.shape[0] > norm_rows():
            return False
        return self.self_attn._fused_qkv(h) and wants_decode_linear(h, self.mlp.gate_up_proj.weight)

    def _decode_step(self, h: torch.Tensor, delta, positions: torch.Tensor):
        """The layer in five launches: input norm + QKV + rotary + cache write, paged attention, the output projection,
        post-attention norm + gate_up + SwiGLU, the down projection.

        One rank: the output and down projections add themselves to the stream in their epilogues and leave its
        rows' sums of squares (RowSquares: what this returns as `delta`), from which the next projection normalises;
        only the first layer of a step of more than norm_rows sequences runs its norm alone (every program would read
        the rows whole). Under TP: the norms' adds take the all-reduced outputs, each program reading its rows whole
        (few rows)."""
        attn, mlp, ctx = self.self_attn, self.mlp, _CONTEXT
        norm, post = self.input_layernorm, self.post_attention_layernorm
        n, width = h.shape[0], attn.local_heads * attn.head_dim
        if attn.o_proj.tp == 1:
            if delta is None and n > norm_rows():
                o = attn._decode_step(norm(h), positions, ctx)
            else:
                o, h = attn._decode_step(h, positions, ctx, norm=(delta, norm.weight, norm.eps))
            h, squares = decode_linear(o.reshape(n, width), attn.o_proj.weight, residual=h)
            act, h = decode_linear(h, mlp.gate_up_proj.weight, swiglu=True, norm=(squares, post.weight, post.eps))
            return decode_linear(act, mlp.down_proj.weight, residual=h)
        o, h = attn._decode_step(h, positions, ctx, norm=(delta, norm.weight, norm.eps))
        out = attn.o_proj(o.reshape(n, width))
        act, h = decode_linear(copy_to_tp(h, mlp.gate_up_proj.group), mlp.gate_up_proj.weight, swiglu=True,
                               norm=(out, post.weight, post.eps))  # fmt: skip
        return h, mlp.down_proj(act)


# ---------------------------------------------------------------------------------- model --


class Transformer(nn.Module):
    """Llama with an "lm" head (logits over the vocabulary) or a "score" head (one scalar per token).

    With a TP `group`, every weight is this rank's shard (see engine.parallel); the trainer updates
    these very tensors and the generator reads them, so there is never a second copy.
    """

    def __init__(
        self,
        config: ModelConfig,
        head: str = "lm",
        *,
        group=None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        sequence_parallel: bool = True,
    ):
        super().__init__()
        if head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {head!r}")
        self.config, self.head, self.group = config, head, group
        self.tp = group_size(group)
        # Under TP, the packed forward outside generation splits the tokens between the TP regions (see
        # hidden_packed). Fixed at construction: the optimizer must know whether the norms' grads are partial.
        self.sequence_parallel = sequence_parallel and self.tp > 1
        # recompute layers in the backward (training memory): True (all), False (none) or how many (the first k)
        self.activation_checkpointing: bool | int = False
        factory = {"dtype": dtype or config.torch_dtype, "device": device}
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group, **factory)
        self.layers = nn.ModuleList(DecoderLayer(config, i, group, **factory) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        if head == "lm":
            if config.tie_word_embeddings:
                self.lm_head = None
            else:
                self.lm_head = ColumnParallelLinear(
                    config.hidden_size, [config.vocab_size], group, names=["the vocabulary"], padded=True, **factory
                )
        else:
            self.score = ReplicatedLinear(config.hidden_size, 1, **factory)

    # The LM head's weight [V_local, hidden] (tied to the embedding or not), for fused log-prob kernels.
    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.head != "lm":
            raise AttributeError("a score model has no LM head")
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def real_vocab(self) -> int | None:
        """How many of this rank's LM head rows are tokens, None where all are: a TP degree that does not divide the
        vocabulary pads its last shards (engine.parallel.shard_rows), and the kernels given the weight must see the
        padding's logits as -inf (kernels.logprob's real_vocab)."""
        e = self.embed_tokens
        return None if e.real_rows == e.local_vocab else e.real_rows

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int = 0) -> Transformer:
        """Random weights (benchmarks, tests): normal(0, std) matrices, unit norms, drawn on the
        parameters' own device (a 13B model initialises on the GPU in seconds). Under tensor parallelism each rank
        draws a parameter's whole tensor, as one process does, and keeps its shard: the same model at any TP degree
        (drawing only the shard made every rank's shard a copy of rank 0's: duplicated heads and vocabulary)."""
        gens: dict[torch.device, torch.Generator] = {}
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
                continue
            gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            module = self.get_submodule(name.rpartition(".")[0])
            split = getattr(module, "tp_split", None) if getattr(module, "tp", 1) > 1 else None
            if split is None and p.dtype in (torch.float32, torch.float64):
                p.normal_(0.0, std, generator=gen)
                continue
            shape = list(p.shape)
            if split is not None:
                dim, sizes = split
                shape[dim] = sum(sizes)
            # (drawn in fp32: bf16 normal_ is not implemented everywhere; one tensor at a time)
            full = torch.empty(shape, device=p.device).normal_(0.0, std, generator=gen)
            if split is not None:  # this rank's 1/tp of each fused part, in order (a padded vocabulary's zero rows)
                parts, offset = [], 0
                for n in sizes:
                    rows, start, real = shard_range(n, module.tp, module.tp_rank)
                    parts.append(take_shard(full, dim, rows, offset + start, real))
                    offset += n
                full = torch.cat(parts, dim)
            p.copy_(full)
        return self

    def hidden_packed(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        *,
        sequence_parallel: bool = True,
    ) -> torch.Tensor:
        """Final normed hidden states [N, hidden] of packed tokens input_ids [N] at positions [N] (cu_seqlens None:
        the N tokens are one sequence).

        Under TP outside generation (sequence parallel, Megatron's): the residual stream between the attention
        and MLP regions holds only this rank's 1/tp of the tokens, so its adds and norms run once per token
        across the group instead of once per rank; the tokens are padded to a multiple of tp with a dummy
        sequence. The result is all-gathered and replicated; its grad must be the same on every rank (as
        head_packed's and kernels.logprob.hidden_logprobs' are: each sums the vocabulary shards' parts). The
        norms' weight grads are then this rank's tokens' share: see `tp_partial_grads`. `sequence_parallel=False`
        keeps every token on every rank (the layout generation uses; without autograd only, since the optimizer
        sums the norms' grads as partial).
        """
        if self.sequence_parallel and not sequence_parallel and torch.is_grad_enabled():
            raise ValueError(
                "hidden_packed(sequence_parallel=False) on a sequence-parallel model must run without autograd: "
                "the norms' grads would be whole on every rank, and the optimizer sums them over the TP group"
            )
        n = input_ids.shape[0]
        if cu_seqlens is None and _CONTEXT is None:  # one sequence (generation's context describes its own)
            cu_seqlens = torch.tensor([0, n], dtype=torch.int32, device=input_ids.device)
        sp = self.sequence_parallel and sequence_parallel and _CONTEXT is None
        if sp:
            input_ids, positions, cu_seqlens = _pad_tokens(input_ids, positions, cu_seqlens, self.tp)
        h, delta = self.embed_tokens(input_ids, sp), None
        ac = self.activation_checkpointing
        recompute = (len(self.layers) if ac is True else int(ac)) if torch.is_grad_enabled() and _CONTEXT is None else 0
        for i, layer in enumerate(self.layers):
            if i < recompute:  # keep only the layer's inputs; recompute its inside during backward
                h, delta = torch.utils.checkpoint.checkpoint(
                    layer, h, delta, positions, cu_seqlens, sp, use_reentrant=False
                )
            else:
                h, delta = layer(h, delta, positions, cu_seqlens, sp)
        # (a fused decode step's last layer leaves the stream added: RowSquares beside it)
        out = self.norm(h) if delta is None or isinstance(delta, RowSquares) else self.norm(h, delta)[0]
        return gather_tokens(out, self.group, replicated_grad=True)[:n] if sp else out

    def tp_partial_grads(self) -> list[nn.Parameter]:
        """The parameters whose grads each TP rank holds only its tokens' share of, to be summed over the TP
        group before the optimizer step (the norms' weights, under sequence parallelism; engine.optim does)."""
        if not self.sequence_parallel:
            return []
        return [m.weight for m in self.modules() if isinstance(m, RMSNorm)]

    def head_packed(self, hidden: torch.Tensor, *, gather: bool = True) -> torch.Tensor:
        """LM head -> logits [N, V] (this rank's vocab shard if not `gather`, -inf in the padding that ends the last
        shards when the TP degree does not divide the vocabulary), or score head -> [N]."""
        if self.head == "score":
            return self.score(hidden).squeeze(-1)
        logits = linear(copy_to_tp(hidden, self.group), self.lm_head_weight)
        if self.real_vocab is not None:  # the padding of a vocabulary the TP degree does not divide: no token
            logits[..., self.real_vocab :] = float("-inf")
        return gather_from_tp(logits, self.group)[..., : self.config.vocab_size] if gather else logits

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        *,
        gather: bool = True,
    ) -> torch.Tensor:
        """Packed forward: input_ids, positions [N]; cu_seqlens [S+1] int32 -> logits [N, V] or scores [N]."""
        return self.head_packed(self.hidden_packed(input_ids, positions, cu_seqlens), gather=gather)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, gather: bool = True
    ) -> torch.Tensor:
        """Padded forward: input_ids [B, T] (left or right padding) -> logits [B, T, V] or scores [B, T].

        Positions count only the real tokens of each row (a left-padded row starts at 0). Padding
        positions come back as 0.
        """
        ids, positions, cu_seqlens, mask = pack_padded(input_ids, attention_mask)
        self.check_token_ids(ids)
        out = self.forward_packed(ids, positions, cu_seqlens, gather=gather)
        full = out.new_zeros(*input_ids.shape, *out.shape[1:])
        full[mask] = out
        return full

    def check_token_ids(self, ids: torch.Tensor) -> None:
        """A clear error for an id outside the vocabulary (the embedding would fail obscurely or silently)."""
        if ids.numel() == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """[B, T] ids and mask -> packed ids [N], positions [N], cu_seqlens [B+1] int32, bool mask [B, T]."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        mask = attention_mask.bool()
    positions = (mask.long().cumsum(-1) - 1)[mask]
    lengths = mask.sum(-1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return input_ids[mask], positions, cu_seqlens, mask


def _pad_tokens(ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, tp: int):
    """Pad packed tokens to a multiple of tp with one dummy sequence (attends only to itself; cut off after)."""
    n = ids.shape[0]
    pad = -n % tp
    if pad == 0:
        return ids, positions, cu_seqlens
    ids = torch.cat([ids, ids.new_zeros(pad)])
    positions = torch.cat([positions, torch.arange(pad, dtype=positions.dtype, device=positions.device)])
    cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_full((1,), n + pad)])
    return ids, positions, cu_seqlens


def forward_flops(
    cfg: ModelConfig, tokens: float, sum_sq_len: float = 0.0, head: str = "lm", head_tokens: float | None = None
) -> float:
    """Forward FLOPs of `tokens` tokens in causal sequences whose lengths squared sum to `sum_sq_len`, the head (LM or
    score) applied to `head_tokens` of them (default: all; the engine's passes apply it to the response rows, or the
    last token): 2 per weight multiply-add of a matrix (not the embedding lookup, not the norms' scales) and
    attention's QK^T and PV, 4 x heads x head_dim FLOPs per pair of tokens, about L^2 / 2 pairs in a sequence of L.
    A backward is twice a forward; recomputed layers are not counted (the model FLOPs a step needs, as MFU counts
    them)."""
    h, embedding = cfg.hidden_size, cfg.vocab_size * cfg.hidden_size
    tied_head = embedding if head == "lm" and cfg.tie_word_embeddings else 0  # (it multiplies, though not a parameter)
    weights = cfg.num_params(head) - embedding - (2 * cfg.num_layers + 1) * h + tied_head
    head_weights = embedding if head == "lm" else h  # (the LM head, tied or not; the score head's one row)
    head_tokens = tokens if head_tokens is None else head_tokens
    attention = 2.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * sum_sq_len
    return 2.0 * (weights - head_weights) * tokens + 2.0 * head_weights * head_tokens + attention
