"""Rollout engine: continuous batching over a paged KV cache, on the very model the trainer updates.

One scheduler loop; each step is one forward: a decode step of every running sequence (paged decode
attention, captured as a CUDA graph per batch-size bucket on GPU), with the prompts admitted since the
last step packed in front of it (their prefill writes the KV cache in the same forward; eager). The n
samples of a prompt share the prompt's cache blocks (fork, copy-on-write). When blocks run out the most
recently admitted sequence is preempted (its blocks freed) and later recomputed from its tokens:
nothing is lost.

Sampling never synchronises with the host inside the step: randomness is counter-based (a hash
of the sequence's seed and the token's position), so a seeded run is reproducible whatever the
batching, preemption or tensor-parallel rank, as far as the logits are: in fp32 exactly (tested), in bf16 a step
computed in another batch (a bucket's padding, a prefill after a preemption) may round its logits differently
and flip a near-tie. Without a seed the tensor-parallel ranks draw one together. Each step is launched on the
previous step's sampled ids as they lie on the device; the host reads those (its one sync per step, for stop checks
and scheduling) while the next step runs.

Here: the Generator (cache sizing and allocation, the forwards, decode graphs, sampling, the loop); the sequences'
bookkeeping it schedules with (admission, preemption, a step's tokens appended) is engine/scheduler.py.
"""

from __future__ import annotations

import collections
import collections.abc
import numbers
import time
import warnings

import numpy as np
import torch

from engine import symm_reduce
from engine.config import GenerateConfig, is_integer
from engine.decode_graphs import DecodeGraphs, graph_key
from engine.distributed import agree
from engine.errors import InvalidInput
from engine.kv_cache import (
    BLOCK_SIZE,
    BlockManager,
    KVCachePool,
    OutOfBlocks,
    cuda_cache_budget,
    num_blocks_for_memory,
    resolve_cache_dtype,
    upload,
)
from engine.model import AttentionContext, Transformer, attention_context
from engine.sampler import sample_tokens, seed_for
from engine.scheduler import Completion, GenerationStats, Seq, Step, admit, apply_step, preempt

# -------------------------------------------------------------------------------- generator --


def _integer_key(key) -> bool:
    """An int (numpy's too), or a 0-d tensor of an integer dtype; not a bool."""
    if isinstance(key, torch.Tensor):
        return key.dim() == 0 and not (key.is_floating_point() or key.is_complex() or key.dtype == torch.bool)
    return is_integer(key)


class Generator:
    """Generates from `model` (an "lm" Transformer, possibly TP-sharded) with a paged KV cache.

    max_num_seqs: sequences decoded together at most. max_num_batched_tokens: prompt tokens per
    prefill forward (a longer single prompt still goes alone). kv_cache_fraction: share of the GPU
    memory left after weights and activations given to the cache. kv_cache_bytes: a fixed budget instead
    (on CPU the default is 256 MiB). num_blocks overrides both. The cache is allocated on first use and
    `release()` hands it back (the training phase needs the memory); the next generate call reallocates it.
    mix_prefill: prompts admitted while others run ride along with the running sequences' decode step
    (one forward, eager) instead of a forward of their own: with more prompts than max_num_seqs, each
    admission otherwise costs a whole read of the weights for a few prompts (a PPO rollout of 512 prompts
    through 256 slots admits one group at a time as sequences finish).
    kv_cache_dtype: the cache's element type: the model's (default) or "fp8" (torch.float8_e4m3fn, saturating
    at +-448, no scale): half the bytes of bf16, so twice the tokens fit and each decode step reads half the
    KV bytes (decode at long contexts is bound by them). Keys and values are rounded to 3 mantissa bits, so the
    samples come from a slightly perturbed policy; PPO's old log-probs are recomputed by the training forward
    anyway (the trainer reports the gap as gen_logprob_gap).
    admit_min_seqs: while sequences run, prompts are admitted only once the free slots take this many waiting
    sequences (whole groups of a prompt's samples, in order; or every waiting one): a step that carries prompts runs
    eagerly (its shapes vary), hundreds of launches that on a GPU can outlast the step itself, so slots freed one or
    two at a time are filled a few at once. Default max_num_seqs // 16 (4 of 64 slots, 16 of 256), at least 1
    (admit at once).
    overlap: launch each step before the host reads the previous step's tokens (they feed the next step on
    the device), so the host's bookkeeping runs while the GPU works. Scheduling then lags a step: a
    sequence that sampled a stop token is decoded once more (that token is dropped), and the slots it
    frees are filled a step later; a slot freed by a length limit, which the host knows before it reads
    the step, is filled in the next step. A sequence's samples do not depend on any of this (counter-based).
    """

    def __init__(
        self,
        model: Transformer,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        block_size: int = BLOCK_SIZE,
        max_model_len: int | None = None,
        kv_cache_fraction: float = 0.9,
        kv_cache_bytes: int | None = None,
        num_blocks: int | None = None,
        use_cuda_graphs: bool | None = None,
        mix_prefill: bool = True,
        admit_min_seqs: int | None = None,
        overlap: bool = True,
        kv_cache_dtype: torch.dtype | str | None = None,
    ):
        if not hasattr(model, "head"):  # (a transformers model, say: it failed here on its missing .head)
            raise ValueError(
                f"the generator runs an engine.model.Transformer, got a {type(model).__name__}: "
                "engine.checkpoint.load_pretrained loads a Hugging Face checkpoint as one"
            )
        if model.head != "lm":
            raise ValueError("the generator needs a model with an 'lm' head")
        bad = []
        for name, value in (
            ("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
            ("block_size", block_size), ("max_model_len", max_model_len), ("kv_cache_bytes", kv_cache_bytes),
            ("num_blocks", num_blocks), ("admit_min_seqs", admit_min_seqs),
        ):  # fmt: skip
            if value is not None and not is_integer(value):  # (a float or bool failed late, sizing the cache)
                bad.append(f"{name} must be an integer, got {value!r}")
            elif value is not None and value < 1:
                bad.append(f"{name} must be >= 1, got {value}")
        # (a string or None failed here with a bare TypeError from the comparison; True passed as 1.0)
        if isinstance(kv_cache_fraction, bool) or not isinstance(kv_cache_fraction, numbers.Real):
            bad.append(f"kv_cache_fraction must be a number in (0, 1], got {kv_cache_fraction!r}")
        elif not 0 < kv_cache_fraction <= 1:
            bad.append(f"kv_cache_fraction must be in (0, 1], got {kv_cache_fraction}")
        if is_integer(block_size) and block_size >= 1 and block_size & (block_size - 1):  # (here, not at the cache)
            bad.append(f"block_size {block_size} must be a power of two (the kernels tile by it)")
        if bad:  # (a 0 would otherwise read as "unset" or fail late)
            raise ValueError("; ".join(bad))
        # Python ints from here: numpy's int32 wraps around (or raises) in the cache's byte and length sums
        max_num_seqs, max_num_batched_tokens, block_size, max_model_len, kv_cache_bytes, num_blocks, admit_min_seqs = (
            None if v is None else int(v)
            for v in (max_num_seqs, max_num_batched_tokens, block_size, max_model_len, kv_cache_bytes, num_blocks,
                      admit_min_seqs)
        )  # fmt: skip
        self.model = model
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache_dtype = resolve_cache_dtype(kv_cache_dtype, self.dtype, self.device)
        if max_model_len is not None and max_model_len > cfg.max_position_embeddings:  # (not cut short unsaid)
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings} (its config.json)")  # fmt: skip
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.table_width = -(-self.max_model_len // block_size)
        self.kv_cache_fraction = kv_cache_fraction
        self.kv_cache_bytes = kv_cache_bytes
        self.requested_blocks = num_blocks
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.mix_prefill = mix_prefill
        self.admit_min_seqs = max(1, max_num_seqs // 16) if admit_min_seqs is None else admit_min_seqs
        self.overlap = overlap
        self.pool: KVCachePool | None = None
        self.blocks: BlockManager | None = None
        self._graphs: DecodeGraphs | None = None
        self._activation_peak: int | None = None  # bytes, measured once (the largest step's activations)
        self._caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.stats = GenerationStats()
        self._kv_heads = model.layers[0].self_attn.local_kv_heads
        # logits stay this rank's vocabulary shard (the LM head's split is the embedding's): the sampler exchanges
        # B x 4 numbers between tensor-parallel ranks instead of all-gathering B x V logits
        self._vocab_offset = model.embed_tokens.vocab_start

    # ---------------------------------------------------------------------------- memory --

    def _num_blocks(self) -> int:
        """The cache's blocks: the same on every TP rank (each rank schedules alike: one rank with more blocks
        would admit or preempt differently, and the ranks' collectives would no longer match)."""
        (n,) = agree([self._local_num_blocks()], "min", self.model.group)  # each rank measured its own memory
        last = self.pool.num_blocks if self.pool is not None else 0
        if last <= n < last + last // 4 and self.requested_blocks is None:
            # the size of the last rollout's cache: the allocator then tends to hand back the same address, and
            # the decode graphs captured on it replay instead of being captured again
            return last
        return n

    def _local_num_blocks(self) -> int:
        if self.requested_blocks is not None:
            return self.requested_blocks
        if self.kv_cache_bytes:
            budget = self.kv_cache_bytes
        elif self.device.type == "cuda":
            if self._activation_peak is None:  # the largest step's activations, measured once by running it
                self._activation_peak = self._measure_activation_peak()
            budget = cuda_cache_budget(self.device, self.kv_cache_fraction, self._activation_peak)
        else:
            budget = 256 * 1024**2
        c = self.model.config
        fit = num_blocks_for_memory(
            budget, num_layers=c.num_layers, block_size=self.block_size, num_kv_heads=self._kv_heads,
            head_dim=c.head_dim, dtype=self.cache_dtype,
        )  # fmt: skip
        # never more than every slot's sequence at full length holds (a small model on a large GPU would otherwise
        # take most of its memory, and a block manager of tens of millions of blocks rebuilt every rollout)
        return min(fit, self.max_num_seqs * self.table_width)

    @torch.no_grad()
    def _measure_activation_peak(self) -> int:
        torch.cuda.reset_peak_memory_stats(self.device)
        # the largest step the scheduler launches: a prefill of max_num_batched_tokens (or one prompt up to
        # max_model_len) with a decode token of every other sequence riding along, packed as long sequences
        n = max(self.max_num_batched_tokens, self.max_model_len) + self.max_num_seqs
        seq = self.max_model_len
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device) % seq
        cu = torch.tensor([*range(0, n, seq), n], dtype=torch.int32).to(self.device)
        h = self.model.hidden_packed(ids, pos, cu, sequence_parallel=False)  # generation's layout under TP
        self.model.head_packed(h[-min(n, self.max_num_seqs) :], gather=False)
        del h
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)

    def _ensure_cache(self) -> None:
        """Allocate the cache if released; keep the decode graphs only where they would still be right."""
        if self.pool is None or not self.pool.is_allocated:
            self._allocate_cache()
        if self._graphs is not None and self.use_cuda_graphs:
            # captured on another cache address or other parameter storage: capture anew, every TP rank alike (one
            # rank capturing while another replays would pair the capture's warm-up collectives with the replay's)
            (stale,) = agree([int(self._graphs.key != self._graph_key())], "max", self.model.group)
            if stale:
                self._graphs = None

    def _allocate_cache(self) -> None:
        n = self._num_blocks()
        if n < self.table_width:
            raise InvalidInput(
                f"the KV cache holds {n} blocks of {self.block_size} tokens, fewer than one sequence of "
                f"max_model_len={self.max_model_len} needs ({self.table_width}): lower max_model_len or give "
                "the cache more memory"
            )
        c = self.model.config
        if self.pool is None:
            self.pool = KVCachePool(
                c.num_layers, n, self.block_size, self._kv_heads, c.head_dim, self.cache_dtype, self.device
            )
        else:
            self.pool.reallocate(n)
        self.blocks = BlockManager(n, self.block_size)
        # under TP, a decode step's sums (two a layer, at most max_num_seqs x hidden) through symmetric memory where
        # switched on (engine/symm_reduce.py; made once, every rank here at once, before any graph is captured)
        symm_reduce.prepare(self.model.group, self.device, self.max_num_seqs * c.hidden_size * self.dtype.itemsize)

    def release(self, drop_graphs: bool = False) -> None:
        """Free the KV cache for the training phase.

        The decode graphs are kept (their memory pool: each batch bucket's logits, ~0.15 GiB at
        max_num_seqs 256 and a 32k vocabulary in bf16, divided by the TP degree) and replayed after the next
        allocation if the cache comes back at the same address and every parameter and buffer of the
        model still lives where it did (the trainer updates them in place); otherwise they are captured
        again. drop_graphs: free them now as well."""
        if drop_graphs:
            self._graphs = None
        self._caches = None  # views keep the pool's storage alive
        self.blocks = None
        if self.pool is not None:
            self.pool.release()

    # --------------------------------------------------------------------------- forwards --

    def _kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (k_cache, v_cache) views, built once per allocation (release() drops them)."""
        if self._caches is None:
            self._caches = [self.pool.layer(i) for i in range(self.pool.num_layers)]
        return self._caches

    def _prefill_inputs(self, parents: list[Seq]):
        """Packed token ids, positions, cu_seqlens (int32) and KV slots of the parents' prompts (on the device)."""
        dev = self.device
        lens = [len(s.tokens) for s in parents]
        ids = upload(torch.tensor([t for s in parents for t in s.tokens], dtype=torch.long), dev)
        pos = upload(torch.cat([torch.arange(n) for n in lens]), dev)
        cu = upload(torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32), dev)
        slots = self.blocks.slot_mapping([s.seq_id for s in parents], device=dev)
        self.stats.prefill_tokens += sum(lens)
        return ids, pos, cu, slots

    @torch.no_grad()
    def _prefill(self, parents: list[Seq]) -> torch.Tensor:
        """Packed forward of the parents' tokens, writing their KV; logits [G, V_shard] at each last token
        (V_shard: this tensor-parallel rank's vocabulary shard, the whole vocabulary without TP)."""
        ids, pos, cu, slots = self._prefill_inputs(parents)
        ctx = AttentionContext(self._kv_caches(), slots, decode=False)
        with attention_context(ctx):
            hidden = self.model.hidden_packed(ids, pos, cu)
        self.stats.prefill_steps += 1
        return self.model.head_packed(hidden[cu[1:].long() - 1], gather=False)

    def _decode_inputs(self, seqs: list[Seq], last: torch.Tensor | None):
        """A slot for each sequence's next token (copy-on-write done first) and the step's tensors; the input ids
        from the host unless `last` brings them on the device. Raises OutOfBlocks before any change."""
        batch = self.blocks.prepare_decode([s.seq_id for s in seqs], width=self.table_width, device=self.device)
        if batch.copies:
            self.pool.copy_blocks(batch.copies)
        if last is None:
            last = upload(torch.tensor([s.tokens[-1] for s in seqs], dtype=torch.long), self.device)
        return batch, last

    @torch.no_grad()
    def _prefill_and_decode(
        self, parents: list[Seq], seqs: list[Seq], last: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward for newly admitted prompts and a decode step of the running sequences, so an admission
        costs no extra read of the weights: (prompt logits [G, V_shard], decode logits [B, V_shard]). Eager (the
        shapes vary). Raises OutOfBlocks, before any change, when a running sequence gets no slot.
        last: the decode input ids on the device (as for _decode)."""
        batch, last = self._decode_inputs(seqs, last)
        ids, pos, cu, slots = self._prefill_inputs(parents)
        p = ids.shape[0]
        ctx = AttentionContext(
            self._kv_caches(), torch.cat([slots, batch.slot_mapping]), False, batch.block_tables,
            batch.context_lens, prefill_tokens=p,
        )  # fmt: skip
        with attention_context(ctx):
            hidden = self.model.hidden_packed(torch.cat([ids, last]), torch.cat([pos, batch.positions]), cu)
        rows = torch.cat([cu[1:].long() - 1, torch.arange(p, p + len(seqs), device=self.device)])
        logits = self.model.head_packed(hidden[rows], gather=False)
        self.stats.decode_steps += 1
        self.stats.mixed_steps += 1
        return logits[: len(parents)], logits[len(parents) :]

    @torch.no_grad()
    def _decode(self, seqs: list[Seq], last: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step for every running sequence -> logits [B, V_shard]. Raises OutOfBlocks (nothing changed).

        last: the input ids [B] on the device (an overlapped step: tokens the host has not read yet)."""
        batch, last = self._decode_inputs(seqs, last)
        self.stats.decode_steps += 1
        if self.use_cuda_graphs:
            graphs = self._graphs or self._capture()
            if graphs is not None:
                return graphs.run(last, batch)
        ctx = AttentionContext(self._kv_caches(), batch.slot_mapping, True, batch.block_tables, batch.context_lens)
        with attention_context(ctx):
            return self.model.head_packed(self.model.hidden_packed(last, batch.positions, None), gather=False)

    def _graph_key(self) -> tuple:
        return graph_key(self.model, self.pool.tensor)

    def _capture(self):
        start = time.perf_counter()
        try:
            self._graphs = DecodeGraphs(
                self.model, self._kv_caches, self.max_num_seqs, self.table_width, self._graph_key(), self.model.group
            )
            self.stats.graph_captures += len(self._graphs.buckets)
        except Exception as e:  # a failed capture must not stop generation: fall back to eager
            warnings.warn(f"CUDA graph capture failed ({e!r}); decoding eagerly", stacklevel=2)
            self.use_cuda_graphs = False
            self._graphs = None
        self.stats.setup_seconds += time.perf_counter() - start
        return self._graphs

    # ---------------------------------------------------------------------------- public --

    def generate(self, prompts: list[list[int]], params: GenerateConfig | None = None, **overrides) -> list[list[int]]:
        """Generated token ids for each prompt (n per prompt, prompt-major)."""
        return [c.tokens for c in self.generate_completions(prompts, params, **overrides)]

    def generate_completions(
        self,
        prompts: list[list[int]],
        params: GenerateConfig | None = None,
        *,
        seed_keys: list[int] | None = None,
        **overrides,
    ) -> list[Completion]:
        """Completions for each prompt (n per prompt, prompt-major), with log-probs and finish reasons.

        seed_keys: one integer per prompt that keys its samples' random streams (default: the prompt's
        position in `prompts`); pass dataset indices so a prompt samples the same wherever it lands.
        """
        if params is not None and not isinstance(params, GenerateConfig):  # (seed_keys by position, or a dict)
            raise ValueError(
                f"params must be a GenerateConfig or None, got {type(params).__name__} {params!r}: pass sampling "
                "settings as GenerateConfig(...) or as keywords, seed_keys as seed_keys=..."
            )
        params = params or GenerateConfig()
        if overrides:
            params = GenerateConfig(**{**params.__dict__, **overrides})
        prompts = self._check_prompts(prompts)
        if seed_keys is not None:  # (a numpy array or a 1-d tensor too; its truth value is ambiguous)
            if not hasattr(seed_keys, "__len__") or getattr(seed_keys, "ndim", 1) != 1:
                raise ValueError(f"seed_keys must be a sequence of one integer per prompt, got {seed_keys!r}")
            if len(seed_keys) != len(prompts):
                raise ValueError(f"{len(seed_keys)} seed_keys for {len(prompts)} prompts")
        for i, key in enumerate(() if seed_keys is None else seed_keys):
            if not _integer_key(key):
                raise ValueError(f"seed_keys[{i}] is {key!r}, not an integer")
        if params.n > self.max_num_seqs:
            raise ValueError(f"n={params.n} samples per prompt exceeds max_num_seqs={self.max_num_seqs}")
        vocab = self.model.config.vocab_size
        for t in params.stop_token_ids:  # (one the model cannot emit: another tokenizer's id, say)
            if not 0 <= t < vocab:
                raise ValueError(f"stop token id {t} is outside the vocabulary [0, {vocab})")
        self.stats = GenerationStats(prompts=len(prompts))
        start = time.perf_counter()
        self._ensure_cache()
        self.stats.setup_seconds = time.perf_counter() - start
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:  # (every EOS of a config's list)
            stop_ids.update(self.model.config.eos_token_ids)
        base_seed = params.seed
        if base_seed is None:
            base_seed = int(torch.randint(0, 2**31 - 1, ()).item())
            if self.model.group is not None:  # drawn once for the TP group: its ranks must sample the same tokens
                (base_seed,) = agree([base_seed], "max", self.model.group)

        waiting: collections.deque[list[Seq]] = collections.deque()
        next_id = 0
        for i, p in enumerate(prompts):
            group = []
            for j in range(params.n):
                max_len = min(len(p) + params.max_new_tokens, self.max_model_len)
                key = i if seed_keys is None else seed_keys[i]
                group.append(Seq(next_id, i, j, list(p), len(p), max_len, seed_for(base_seed, key, j)))
                next_id += 1
            waiting.append(group)
        running: list[Seq] = []  # admitted and not known to be finished (oldest first)
        done: list[Seq] = []
        inflight: Step | None = None  # the last launched step, when its tokens are not read yet (overlap)
        try:
            while waiting or running or inflight:
                step = self._launch(waiting, running, inflight, params)
                if inflight is not None:
                    apply_step(inflight, stop_ids, running, done, self.blocks)
                    inflight = None
                if step is None:
                    continue
                if self.overlap:
                    inflight = step
                else:
                    apply_step(step, stop_ids, running, done, self.blocks)
        except BaseException:
            self.blocks.reset()  # an aborted call must not leave its sequences' blocks taken
            raise
        self.stats.seconds = time.perf_counter() - start
        done.sort(key=lambda s: (s.prompt_index, s.sample_index))
        self.stats.generated_tokens = sum(s.num_generated for s in done)
        return [
            Completion(s.prompt_index, s.sample_index, s.tokens[s.prompt_len :], s.logprobs, s.finish_reason)
            for s in done
        ]

    # ------------------------------------------------------------------------- scheduling --

    def _launch(self, waiting, running, inflight: Step | None, params) -> Step | None:
        """Admit what fits and launch one step: the newly admitted prompts and/or a decode step of the
        running sequences, sampled on the device. With `inflight` (a step whose tokens the host has not
        read) the decode takes its input ids from that step's device tokens, so this step is queued
        behind it without waiting; returns None (nothing launched) when the host must read `inflight`
        first: every sequence ends with it, or a sequence gets no KV slot (then, with nothing in flight,
        the newest running sequences are preempted until the rest fit)."""
        # the sequences to decode: those of `inflight` still running after it as far as the host can tell (a
        # stop token shows once it is read), fed from its device tokens; then the running ones it left out
        # (their last token is on the host)
        rows, decode = [], []
        if inflight is not None:
            rows = [i for i, s in enumerate(inflight.seqs) if not s.finish_reason and len(s.tokens) + 1 < s.max_len]
            decode = [inflight.seqs[i] for i in rows]
        stepping = {s.seq_id for s in inflight.seqs} if inflight is not None else set()
        others = [s for s in running if s.seq_id not in stepping]
        leaving = stepping - {s.seq_id for s in decode}  # (at their length limit with `inflight`: their slots free)
        admitted = admit(
            waiting, running, self.blocks, self.max_num_seqs, self.max_num_batched_tokens, self.admit_min_seqs, leaving
        )
        new = [s for g in admitted for s in g]
        running.extend(new)  # active from now on: the next admission (before this step is read) counts them
        if admitted and not self.mix_prefill:  # the prompts get a forward of their own; the rest wait a step
            rows, decode, others = [], [], []
        pending = [1] * len(decode) + [0] * len(others)
        decode += others
        if not decode and not new:
            return None
        last = None
        if rows:
            last = inflight.tokens
            if len(rows) < len(inflight.seqs):  # (a blocking copy of the indices would wait for `inflight`)
                last = last[upload(torch.tensor(rows), self.device)]
            if others:
                host = torch.tensor([s.tokens[-1] for s in others], dtype=torch.long)
                last = torch.cat([last, upload(host, self.device)])
        try:
            if admitted and decode:
                prompt_logits, decode_logits = self._prefill_and_decode([g[0] for g in admitted], decode, last)
            elif decode:
                decode_logits = self._decode(decode, last)
            else:
                prompt_logits, decode_logits = self._prefill([g[0] for g in admitted]), None
        except OutOfBlocks:
            for group in reversed(admitted):  # undo the admission: those prompts wait again
                for seq in group:
                    self.blocks.free(seq.seq_id)
                waiting.appendleft(group)
            running[:] = [s for s in running if s.seq_id not in {x.seq_id for x in new}]
            if inflight is None:
                preempt(waiting, running, self.blocks, self.stats)
            return None
        logits = [] if decode_logits is None else [decode_logits]
        if admitted:
            rows_new = upload(torch.tensor([k for k, g in enumerate(admitted) for _ in g]), self.device)
            logits.append(prompt_logits[rows_new])
        if rows:
            self.stats.overlapped_steps += 1
        return self._sample(
            decode + new, torch.cat(logits) if len(logits) > 1 else logits[0], params, pending + [0] * len(new)
        )

    def _sample(self, seqs: list[Seq], logits: torch.Tensor, params, pending: list[int]) -> Step:
        """Sample a token per row (on the device) and start copying them to the host. pending: per sequence,
        tokens sampled but not yet appended on the host (its counter runs ahead by that many)."""
        counts = [len(s.tokens) + k for s, k in zip(seqs, pending)]
        host = torch.tensor([[s.seed for s in seqs], counts], dtype=torch.int64)
        seeds, counters = upload(host, self.device)  # (one copy: seeds and counters as int64 rows)
        tokens, logprobs = sample_tokens(logits, params, seeds, counters, self.model.group, self._vocab_offset)
        if self.device.type != "cuda":
            return Step(seqs, tokens, tokens, logprobs, None)
        host_tokens = torch.empty(len(seqs), dtype=torch.int64, pin_memory=True)
        host_logprobs = torch.empty(len(seqs), dtype=torch.float32, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        host_logprobs.copy_(logprobs, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Step(seqs, tokens, host_tokens, host_logprobs, ready)

    def _check_prompts(self, prompts) -> list:
        """The prompts as lists of Python ints (a tensor or numpy array among them too); each refused by name if bad."""
        vocab = self.model.config.vocab_size
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        prompts = [p.tolist() if isinstance(p, (torch.Tensor, np.ndarray)) else p for p in prompts]  # (Python ints)
        checked = []
        for i, p in enumerate(prompts):
            if isinstance(p, numbers.Number) or not hasattr(p, "__len__"):  # (a flat list of ids: one prompt)
                raise ValueError(f"prompt {i} is {p!r}, not a list of token ids: prompts is a list of token-id lists")
            if isinstance(p, (str, bytes, bytearray, memoryview)):  # (bytes iterate as ints: taken as ids)
                raise ValueError(f"prompt {i} is text ({type(p).__name__}), not token ids: tokenize it first")
            if isinstance(p, (collections.abc.Set, collections.abc.Mapping)):  # (a set's order is not the prompt's)
                raise ValueError(
                    f"prompt {i} is a {type(p).__name__}, not a sequence of token ids (a set has no order; a "
                    "tokenizer's output: pass its input_ids)"
                )
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if len(p) >= self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; the limit is {self.max_model_len - 1} "
                    f"(max_model_len {self.max_model_len} leaves room for at least one new token)"
                )
            for j, t in enumerate(p):
                if type(t) is not int and not _integer_key(t):  # (a 0-d integer tensor too: list(a tensor) holds those)
                    raise ValueError(f"prompt {i} has {t!r} at position {j}: token ids are integers")
            p = [int(t) for t in p]
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"prompt {i} has token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab})")
            checked.append(p)
        return checked
