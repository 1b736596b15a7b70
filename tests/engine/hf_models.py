"""Small random HF Llama checkpoints the tests save themselves."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def hf_config(**overrides) -> LlamaConfig:
    kw = dict(
        vocab_size=301,  # not a power of two
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # large enough that layers change the logits visibly
        rms_norm_eps=1e-5,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_hf_model(path, head: str = "lm", seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    cfg = hf_config(**overrides)
    if head == "lm":
        model = LlamaForCausalLM(cfg)
    else:
        cfg.num_labels = 1
        model = LlamaForSequenceClassification(cfg)
    model = model.to(dtype).eval()
    model.save_pretrained(path)
    return model


def bf16_errors(hf, ours, ids, mask, pos) -> tuple[float, float]:
    """Relative errors of ours and of transformers' own bf16 forward (bf16 `hf`, `ours` loaded from it), each
    against an fp32 forward of the same weights, over the real tokens: bf16 rounds differently in each."""
    m = mask.bool()
    with torch.no_grad():
        hf_bf16 = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits[m]
        out = ours(ids, mask)[m]
        truth = fp32_rotary(hf.float())(input_ids=ids, attention_mask=mask, position_ids=pos).logits[m]
    return rel_err(out, truth), rel_err(hf_bf16, truth)


def fp32_rotary(hf):
    """`hf` with its rotary frequencies computed again in fp32: a model cast to bf16 rounds its inv_freq buffers, and
    casting back does not restore them (an fp32 "truth" whose rotation drifts from the exact one with the position)."""
    for mod in hf.modules():
        if isinstance(getattr(mod, "inv_freq", None), torch.Tensor) and hasattr(mod, "rope_type"):
            default = mod.rope_type == "default"
            init = mod.compute_default_rope_parameters if default else ROPE_INIT_FUNCTIONS[mod.rope_type]
            inv_freq, _ = init(mod.config, mod.inv_freq.device)
            mod.inv_freq.copy_(inv_freq)
            mod.original_inv_freq.copy_(inv_freq)
    return hf


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def padded_batch(vocab: int, lengths: list[int], side: str, pad_id: int = 0, seed: int = 0):
    """ids [B, T] with real tokens drawn from 1..vocab-1 and pad_id elsewhere; mask [B, T]; HF position ids."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):
        sl = slice(t - n, t) if side == "left" else slice(0, n)
        ids[b, sl] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


def last_token_scores(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The score at each row's last attention-mask token: scores [B, T] -> [B]. What transformers'
    LlamaForSequenceClassification reads where no row holds the config's pad_token_id among its own tokens (it reads
    the last token that is not that id: engine.rollout.reward_positions, the run's rule)."""
    if attention_mask is None:
        return scores[:, -1]
    idx = torch.arange(scores.shape[1], device=scores.device) * attention_mask.bool()
    return scores.gather(1, idx.argmax(-1, keepdim=True)).squeeze(1)
