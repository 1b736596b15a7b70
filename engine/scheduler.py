"""Continuous batching's bookkeeping on the host (engine/generate.py's Generator runs the forwards and the loop).

The sequences (a prompt's samples, each with its tokens, log-probs and seed), the completions they end as and a
call's statistics; the scheduler's decisions on them: which waiting prompts are admitted (sequence slots, the
prefill token budget, free KV blocks with headroom), which running sequences are preempted when blocks run out,
and a sampled step's tokens appended (stop checks, finished sequences' blocks freed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.kv_cache import BlockManager

# -------------------------------------------------------------------------------- sequences --


@dataclass
class Completion:
    """One sample: the generated tokens (the stop token included if one was hit) and their log-probs."""

    prompt_index: int
    sample_index: int
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" or "length"


@dataclass
class Seq:
    seq_id: int
    prompt_index: int
    sample_index: int
    tokens: list[int]  # prompt + generated
    prompt_len: int
    max_len: int  # prompt_len + max_new_tokens, capped at the model's limit
    seed: int
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class GenerationStats:
    prompts: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    prefill_steps: int = 0  # forwards of prompts alone (each reads every weight once, like a decode step)
    decode_steps: int = 0
    mixed_steps: int = 0  # decode steps that also took newly admitted prompts (no forward of their own)
    overlapped_steps: int = 0  # decode steps launched before the host had read the previous step's tokens
    preemptions: int = 0
    graph_captures: int = 0  # decode graphs captured in this call (0: the previous call's graphs replayed)
    setup_seconds: float = 0.0  # allocating (and on a GPU sizing) the KV cache, capturing graphs
    seconds: float = 0.0  # the whole call, setup included


@dataclass
class Step:
    """A sampled step whose tokens the host may not have read yet (copied out asynchronously on a GPU)."""

    seqs: list[Seq]
    tokens: torch.Tensor  # [B] int64 on the device: the next step's input ids
    host_tokens: torch.Tensor  # [B] int64 on the host (pinned; valid once `ready` has completed)
    host_logprobs: torch.Tensor  # [B] fp32 on the host
    ready: torch.cuda.Event | None  # recorded after the copies (None on a CPU: already there)


# ------------------------------------------------------------------------- scheduling --


def admission_waits(waiting, running, max_num_seqs: int, admit_min_seqs: int) -> bool:
    """While sequences run: whether the waiting groups that the free slots would take now (in order, whole
    groups) hold fewer than admit_min_seqs sequences while more wait."""
    free, fits, queued, blocked = max_num_seqs - len(running), 0, 0, False
    for group in waiting:
        blocked = blocked or fits + len(group) > free
        fits += 0 if blocked else len(group)
        queued += len(group)
        if fits >= admit_min_seqs:
            return False
        if blocked and queued >= admit_min_seqs:
            return True
    return fits < min(admit_min_seqs, queued)


def admit(
    waiting,
    running,
    blocks: BlockManager,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    admit_min_seqs: int,
    leaving: set[int] | frozenset[int] = frozenset(),
) -> list[list[Seq]]:
    """Take waiting groups that fit (sequence slots, prefill token budget, free blocks with headroom), once
    admit_min_seqs slots are free while others run (or every waiting sequence fits). `leaving`: the seq ids of
    running sequences that end with the step in flight (at their length limit: the host knows before it reads the
    step), whose slots this step's admission takes and whose blocks, freed once the step is read, it does not."""
    admitted, tokens = [], 0
    staying = [s for s in running if s.seq_id not in leaving]
    if staying and waiting and admission_waits(waiting, staying, max_num_seqs, admit_min_seqs):
        return admitted
    free = blocks.num_free_blocks
    headroom = None
    while waiting:
        group = waiting[0]
        n_tokens = len(group[0].tokens)
        active = len(staying) + sum(len(g) for g in admitted)
        if active and active + len(group) > max_num_seqs:
            break
        if admitted and tokens + n_tokens > max_num_batched_tokens:
            break
        # headroom: a free block for each active sequence that will still take one (it grows past its blocks, or
        # copies a shared partial block), so every one can grow by a block before any is preempted; none for one
        # that holds every block it will need (a cache of every slot at full length then admits every slot), and
        # none if no sequence holds blocks, so a lone sequence is always admitted (the pool holds one at full
        # length). A sequence holds at most max_len - 1 tokens' K/V (its last token is sampled, never fed back)
        if headroom is None:
            headroom = blocks.headroom((s.seq_id, s.max_len - 1) for s in staying) if staying else 0
        own = blocks.prompt_headroom(n_tokens, len(group), group[0].max_len - 1)
        if (running or admitted) and blocks.blocks_for(n_tokens) + headroom + own > free:
            break
        waiting.popleft()
        parent = group[0]
        blocks.allocate(parent.seq_id, n_tokens)
        for child in group[1:]:
            blocks.fork(parent.seq_id, child.seq_id)
        free = blocks.num_free_blocks
        headroom += own
        admitted.append(group)
        tokens += n_tokens
    return admitted


def preempt(waiting, running, blocks: BlockManager, stats: GenerationStats) -> None:
    """Free the newest running sequences until the others can all take their next slot; they wait (at the
    front) and are recomputed when admitted again."""
    while running and not blocks.can_append([s.seq_id for s in running]):
        victim = running.pop()  # the most recently admitted
        blocks.free(victim.seq_id)
        waiting.appendleft([victim])
        stats.preemptions += 1


def apply_step(step: Step, stop_ids, running, done, blocks: BlockManager) -> None:
    """Append a step's tokens on the host (the one sync of a step), finish sequences, free their blocks.

    A sequence finished while `step` was in flight (an overlapped step) drops its token from `step`."""
    if step.ready is not None:
        step.ready.synchronize()
    tokens, logprobs = step.host_tokens.tolist(), step.host_logprobs.tolist()
    stepped = {s.seq_id for s in step.seqs}
    new_running = [s for s in running if s.seq_id not in stepped]
    for s, t, lp in zip(step.seqs, tokens, logprobs):
        if s.finish_reason:
            continue
        s.tokens.append(t)
        s.logprobs.append(lp)
        if t in stop_ids:
            s.finish_reason = "stop"
        elif len(s.tokens) >= s.max_len:
            s.finish_reason = "length"
        if s.finish_reason:
            blocks.free(s.seq_id)
            done.append(s)
        else:
            new_running.append(s)
    # keep admission order: older sequences first, so preemption takes the newest
    new_running.sort(key=lambda s: s.seq_id)
    running[:] = new_running
