"""A rollout's no-grad halves, shared by PPO training (engine.trainer) and held-out evaluation (engine.evaluate).

- generate_rollout: the Generator samples responses from the policy's own parameter tensors (no copy);
- forward_rollout: packed passes (prompt + response concatenated, no padding computed) give the policy's and the
  reference's log-probs of every response token, the value of every state and the reward model's score at each
  sequence's last token (check_scores: every rank stops together on a non-finite score);
- reduce_sums: per-rank metric sums added up over the data-parallel ranks in one collective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from engine import ppo
from engine.config import GenerateConfig
from engine.data import Rollout, pack, split_by_tokens, to_padded
from engine.distributed import raise_together
from engine.kv_cache import upload
from engine.model import Transformer
from engine.offload import HostCopies, offload_state, offload_weights, onload_state, onload_weights
from kernels.logprob import hidden_logprobs

if TYPE_CHECKING:
    from engine.state import TrainState


def sampling_params(state: TrainState, stream: int, *, greedy: bool = False, n: int | None = None) -> GenerateConfig:
    """The recipe's sampling (temperature, top-k / top-p, response limit, EOS) with the random stream `stream`: the PPO
    iteration's index for rollouts, so a resumed run samples what a straight one does."""
    cfg, run = state.cfg, state.run
    return GenerateConfig(
        temperature=0.0 if greedy else cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        stop_token_ids=[] if run.ignore_eos else list(state.stop_ids), n=n or cfg.samples_per_prompt,
        seed=run.seed * 1_000_003 + stream, ignore_eos=run.ignore_eos,
    )  # fmt: skip


def generate_rollout(
    state: TrainState,
    prompts: list[list[int]],
    prompt_ids: list[int] | None = None,
    params: GenerateConfig | None = None,
) -> Rollout:
    """Sample responses (default: the rollout of iteration state.iteration); prompt_ids (the prompts' indices in their
    prompt set) key each sample's random stream, so a data-parallel run samples exactly what one process would."""
    params = params or sampling_params(state, state.iteration)
    opts = [o for o in (state.policy_opt, state.value_opt) if o is not None] if state.offload else []
    idle = idle_models(state) if state.offload_models else []
    for o in opts:  # the idle optimizer state to host memory: the KV cache gets its GPU memory
        offload_state(o)
    for name, model, frozen in idle:  # likewise the weights of the models generation does not run
        offload_weights(model, state.model_copies.setdefault(name, HostCopies(state.device)), frozen)
    try:
        with torch.no_grad():
            comps = state.generator.generate_completions(prompts, params, seed_keys=prompt_ids)
    finally:  # (the weights first: the scoring passes wait for them, the optimizer state only the update does)
        state.generator.release()  # (first, also after an error: its memory is what the models come back into)
        for name, model, _ in idle:
            onload_weights(model, state.model_copies[name])
        for o in opts:  # back on a side stream, overlapping the scoring passes
            onload_state(o)
    offsets = [0]
    for c in comps:
        if not c.tokens:
            raise RuntimeError(f"the generator returned an empty response for prompt {c.prompt_index}")
        offsets.append(offsets[-1] + len(c.tokens))
    return Rollout(
        prompts=[prompts[c.prompt_index] for c in comps],
        responses=[list(c.tokens) for c in comps],
        hit_eos=torch.tensor([c.finish_reason == "stop" for c in comps], device=state.device),
        gen_logprobs=torch.tensor([x for c in comps for x in c.logprobs], dtype=torch.float32, device=state.device),
        offsets=offsets,
    )


def idle_models(state: TrainState) -> list[tuple[str, Transformer, bool]]:
    """(name, model, frozen) of the models a rollout's generation does not run: the reference and the reward model
    (frozen) and the value model (trained: copied out anew each time); none that is the policy itself."""
    models = [("reference", state.ref, True), ("reward", state.reward, True), ("value", state.value, False)]
    return [(n, m, f) for n, m, f in models if m is not None and m is not state.policy]


@torch.no_grad()
def policy_logprobs(model: Transformer, pk: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probs (raw logits) of the packed response tokens, LM head fused: [R] fp32."""
    h = model.hidden_packed(pk["ids"], pk["positions"], pk["cu_seqlens"])[pk["act"]]
    return hidden_logprobs(h, model.lm_head_weight, pk["targets"], group=model.group, real_vocab=model.real_vocab)


def chunks(state: TrainState, ro: Rollout, seqs: list[int]):
    """Micro-batches of the sequences `seqs`, packed (engine.data.pack), each within micro_batch_tokens."""
    lengths = [len(ro.prompts[i]) + len(ro.responses[i]) for i in seqs]
    for group in split_by_tokens(lengths, state.run.micro_batch_tokens):
        yield pack(ro, [seqs[g] for g in group], state.device)


@torch.no_grad()
def forward_rollout(state: TrainState, ro: Rollout, *, values: bool = True) -> None:
    """Fill ro.logprobs and ro.ref_logprobs [N], ro.values [N] (with `values`) and ro.scores [B] (the RM's)."""
    n = ro.offsets[-1]
    flat = lambda: torch.empty(n, dtype=torch.float32, device=state.device)
    ro.logprobs, ro.ref_logprobs = flat(), flat()
    ro.values = flat() if values else None
    ro.scores = torch.empty(len(ro.responses), dtype=torch.float32, device=state.device)
    seq0 = 0
    for pk in chunks(state, ro, list(range(len(ro.responses)))):
        rows, n_seq = pk["rows"], pk["last"].numel()
        ro.logprobs[rows] = policy_logprobs(state.policy, pk)
        ro.ref_logprobs[rows] = policy_logprobs(state.ref, pk)
        if values:
            h = state.value.hidden_packed(pk["ids"], pk["positions"], pk["cu_seqlens"])[pk["act"]]
            ro.values[rows] = state.value.head_packed(h).float()
        where = reward_positions(pk, state.reward.config.pad_token_id)
        h = state.reward.hidden_packed(pk["ids"], pk["positions"], pk["cu_seqlens"])[where]
        ro.scores[seq0 : seq0 + n_seq] = state.reward.head_packed(h).float()
        seq0 += n_seq


def shaped_targets(state: TrainState, logprobs, ref_logprobs, values, offsets: list[int], scores) -> dict:
    """engine.ppo.advantages_and_returns of flat [N] per-token tensors of sequences laid out by `offsets` and their
    [B] scores (EOS-penalised): rewards, kl, advantages and returns, flat [N] (with --whiten-rewards the rewards
    whitened over these sequences on every DP rank)."""
    padded = [to_padded(x, offsets) for x in (logprobs, ref_logprobs, values)]
    mask, idx = padded[0][1], padded[0][2]
    out = ppo.advantages_and_returns(
        padded[0][0], padded[1][0], padded[2][0], mask, scores, state.cfg, state.dp_group, kl_coef=state.kl_coef
    )
    return {k: v[idx] for k, v in out.items()}


@torch.no_grad()
def minibatch_targets(state: TrainState, ro: Rollout, seqs: list[int], packs: list[dict], rows: torch.Tensor):
    """--recompute-old-logprobs-per-minibatch, as EasyLM's PPO trainer (the recipe's) scores each optimizer minibatch
    with the policy and value model as that step finds them: the minibatch `seqs`' old log-probs and values from the
    models now (`packs`, its micro-batches; `rows`, its flat rows in `seqs` order), and from them its KL-shaped
    rewards, advantages and returns; the reference's log-probs and the RM's scores are the rollout's (frozen models:
    the same). Returns flat [N] copies of ro.logprobs, ro.values and ro.targets with the minibatch's rows replaced (the
    rollout's own stay for its metrics). The scores: ro.targets["score_tokens"] (each sequence's EOS-penalised score
    at its last token)."""
    logprobs, values = ro.logprobs.clone(), ro.values.clone()
    for pk in packs:
        logprobs[pk["rows"]] = policy_logprobs(state.policy, pk)
        h = state.value.hidden_packed(pk["ids"], pk["positions"], pk["cu_seqlens"])[pk["act"]]
        values[pk["rows"]] = state.value.head_packed(h).float()
    offsets = [0]
    for i in seqs:
        offsets.append(offsets[-1] + ro.offsets[i + 1] - ro.offsets[i])
    last = upload(torch.tensor(offsets[1:]) - 1, state.device)
    scores = ro.targets["score_tokens"][rows][last]
    mine = shaped_targets(state, logprobs[rows], ro.ref_logprobs[rows], values[rows], offsets, scores)
    targets = dict(ro.targets)
    for k, v in mine.items():
        targets[k] = (ro.targets[k].clone() if k in ro.targets else torch.zeros_like(logprobs)).index_copy_(0, rows, v)
    return logprobs, values, targets


def score_tokens(ro: Rollout, scores: torch.Tensor) -> torch.Tensor:
    """[N] each sequence's score [B] at its last response token, 0 elsewhere (minibatch_targets' scores, which
    travel with the tokens where engine.balance deals them over the DP ranks)."""
    last = upload(torch.tensor(ro.offsets[1:]) - 1, scores.device)
    return torch.zeros_like(ro.logprobs).index_copy_(0, last, scores.float())


def check_scores(ro: Rollout, where: str) -> None:
    """Every rank raises together (engine.distributed.raise_together) if any rank's reward model returned a non-finite
    score `where`: called after forward_rollout and before any collective a failing rank would skip."""
    bad = int((~torch.isfinite(ro.scores)).sum())
    error = FloatingPointError(f"the reward model returned {bad} non-finite scores {where}") if bad else None
    raise_together(error, "scoring the rollout")


def reward_positions(pk: dict[str, torch.Tensor], pad_token_id: int | None) -> torch.Tensor:
    """[S] the packed row of each sequence the reward model scores: its last token, or, when the reward model's config
    names a pad_token_id, its last token that is not that id (transformers' LlamaForSequenceClassification pooling: a
    config whose pad is the EOS scores the token before a final EOS; a sequence of pads alone, its first token)."""
    if pad_token_id is None:
        return pk["last"]
    ids, cu = pk["ids"], pk["cu_seqlens"].long()
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=ids.device), cu.diff(), output_size=ids.numel())
    rows = torch.where(ids != pad_token_id, torch.arange(ids.numel(), device=ids.device), cu[:-1][seq])
    return torch.zeros_like(pk["last"]).scatter_reduce(0, seq, rows, "amax", include_self=False)


def pad_is_a_stop_warning(pad_token_id: int | None, stop_ids: list[int]) -> str | None:
    """The warning a run prints where the reward model's config.json names a pad_token_id that ends responses (its
    EOS): reward_positions then scores each response that stopped at the token before its EOS, as transformers'
    LlamaForSequenceClassification does (a reward model trained that way, TRL's with pad = EOS, expects it), where
    EasyLM's (the recipe's) scored the EOS itself; None otherwise."""
    if pad_token_id is None or pad_token_id not in stop_ids:
        return None
    return (
        f"warning: the reward model's config.json names pad_token_id {pad_token_id}, which ends responses: as "
        "transformers' LlamaForSequenceClassification reads it, a response is scored at the token before its final "
        f"{pad_token_id}, not at it (EasyLM's reward models score the EOS: remove pad_token_id from the reward "
        "model's config.json for that)"
    )


def add_to(sums: dict[str, torch.Tensor | float], **values) -> None:
    """sums[k] += v for each value (tensors detached, as fp32)."""
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))


def reduce_sums(sums: dict[str, torch.Tensor | float], device: torch.device, group=None) -> dict[str, float]:
    """Per-rank sums -> their totals over the data-parallel `group` (one all-reduce), as floats on every rank."""
    keys = sorted(sums)
    totals = torch.stack([torch.as_tensor(sums[k], device=device, dtype=torch.float32) for k in keys])
    if group is not None:
        dist.all_reduce(totals, group=group)
    return dict(zip(keys, totals.tolist()))
