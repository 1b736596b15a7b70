"""Our Llama against transformers' LlamaForCausalLM / LlamaForSequenceClassification."""

import contextlib
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM

from engine.checkpoint import load_pretrained, save_pretrained
from engine.config import ModelConfig
from engine.errors import InvalidInput
from engine.model import Transformer, pack_padded
from kernels.dispatch import reference_ops
from tests.engine.hf_models import bf16_errors, fp32_rotary, last_token_scores, padded_batch, rel_err, save_hf_model

VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "theta500k": dict(rope_theta=500000.0),
    "tied": dict(tie_word_embeddings=True),
    "mqa_hd32": dict(num_attention_heads=2, num_key_value_heads=1, hidden_size=64),
}
# head dim 16, original length 64: of the 8 frequencies 2 are kept, 1 blended, 5 divided (Llama 3.1's rule)
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=64,
)  # fmt: skip
SCALED = {"llama3": LLAMA3_ROPE, "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0)}


@pytest.mark.parametrize("kind", list(SCALED))
def test_scaled_rotary_matches_transformers(tmp_path, kind):
    """Llama 3.1-style and linear rope scaling: logits equal transformers' over positions up to 200 (past the
    original length), read from transformers 5's config.json (`rope_parameters`) and from the older spelling Llama
    3.1 checkpoints ship (`rope_scaling` beside a top-level `rope_theta`); what we save, transformers loads back."""
    import json

    hf = save_hf_model(tmp_path / "hf", num_key_value_heads=2, rope_parameters=SCALED[kind])
    ids, mask, pos = padded_batch(301, [200, 37, 1], "right")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        plain = save_hf_model(tmp_path / "plain", num_key_value_heads=2)(input_ids=ids, attention_mask=mask).logits
    m = mask.bool()
    assert rel_err(plain[m], ref[m]) > 1e-3  # the scaling matters at these positions
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.rope.kind == kind
    legacy = json.loads((tmp_path / "hf" / "config.json").read_text())
    params = legacy.pop("rope_parameters")
    legacy["rope_theta"] = params.pop("rope_theta")
    legacy["rope_scaling"] = params
    (tmp_path / "hf" / "config.json").write_text(json.dumps(legacy))
    assert load_pretrained(tmp_path / "hf").config.rope == ours.config.rope
    save_pretrained(ours, tmp_path / "ours")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        for out in (ours(ids, mask), back(input_ids=ids, attention_mask=mask, position_ids=pos).logits):
            assert rel_err(out[m], ref[m]) < 2e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(tmp_path, variant, side):
    hf = save_hf_model(tmp_path, **VARIANTS[variant])
    ours = load_pretrained(tmp_path)
    ids, mask, pos = padded_batch(301, [11, 5, 1, 8], side)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, mask)
    m = mask.bool()
    assert out.shape == ref.shape
    assert rel_err(out[m], ref[m]) < 2e-5
    assert (out[~m] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_bf16_as_accurate_as_transformers(tmp_path, seed):
    """In bf16 both implementations round differently, so compare each with an fp32 run of the same
    weights: ours must be about as close to it as transformers' own bf16 forward is."""
    hf = save_hf_model(tmp_path, dtype=torch.bfloat16, seed=seed)
    ours = load_pretrained(tmp_path)
    assert next(ours.parameters()).dtype == torch.bfloat16
    ours_err, hf_err = bf16_errors(hf, ours, *padded_batch(301, [7, 4], "right", seed=seed))
    assert ours_err < max(2 * hf_err, 1e-2), (ours_err, hf_err)


def test_the_fp32_truth_of_a_bf16_model_rotates_exactly(tmp_path):
    """bf16_errors' fp32 forward of a bf16 model takes fp32 rotary frequencies (a bf16 cast rounds them, by up to
    ~2e-4 here, and casting back keeps the rounding): the same logits as the model built in fp32 with the weights
    rounded to bf16 and back."""
    hf = save_hf_model(tmp_path, dtype=torch.bfloat16)
    exact = LlamaForCausalLM(hf.config).float()
    exact.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
    ids, mask, pos = padded_batch(301, [200], "right")
    with torch.no_grad():
        want = exact(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = fp32_rotary(hf.float())(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("side", ["right", "left"])
def test_score_head_matches_sequence_classification(tmp_path, side):
    hf = save_hf_model(tmp_path, head="score")
    ours = load_pretrained(tmp_path, head="score")
    ids, mask, pos = padded_batch(301, [9, 3, 6], side)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.squeeze(-1)  # pooled [B]
        scores = ours(ids, mask)
    assert scores.shape == ids.shape
    assert rel_err(last_token_scores(scores, mask), ref) < 2e-5


def test_save_then_transformers_loads(tmp_path):
    save_hf_model(tmp_path / "src", tie_word_embeddings=False)
    ours = load_pretrained(tmp_path / "src")
    save_pretrained(ours, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask, pos = padded_batch(301, [6, 10], "left")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, mask)
    assert rel_err(out[mask.bool()], ref[mask.bool()]) < 2e-5


def test_save_score_model_then_transformers_loads(tmp_path):
    ours = Transformer(ModelConfig.named("tiny"), head="score").init_weights(std=0.1, seed=3)
    ours.config.pad_token_id = 0
    save_pretrained(ours, tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask, pos = padded_batch(ours.config.vocab_size, [5, 8], "right")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.squeeze(-1)
        out = last_token_scores(ours(ids, mask), mask)
    assert rel_err(out, ref) < 2e-5


def test_sharded_checkpoints_load(tmp_path):
    hf = save_hf_model(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="40KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    ours = load_pretrained(tmp_path / "hf_sharded")
    save_pretrained(ours, tmp_path / "ours_sharded", max_shard_bytes=30_000)
    files = sorted(p.name for p in (tmp_path / "ours_sharded").iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 2
    again = load_pretrained(tmp_path / "ours_sharded")
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_packed_matches_padded(tmp_path):
    save_hf_model(tmp_path)
    ours = load_pretrained(tmp_path)
    lengths = [4, 1, 13]
    ids, mask, _ = padded_batch(301, lengths, "right")
    packed_ids, positions, cu, m = pack_padded(ids, mask)
    assert cu.tolist() == [0, 4, 5, 18]
    with torch.no_grad():
        padded = ours(ids, mask)
        packed = ours.forward_packed(packed_ids, positions, cu)
        # one sequence at a time, unpadded
        single = torch.cat([ours(ids[b : b + 1, :n])[0] for b, n in enumerate(lengths)])
    assert torch.allclose(padded[m], packed, atol=1e-5, rtol=1e-5)
    assert torch.allclose(single, packed, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # cu_seqlens None: the tokens are one sequence
        one = ours.forward_packed(packed_ids[5:], positions[5:], None)
    assert torch.allclose(one, packed[5:], atol=1e-5, rtol=1e-5)


def test_packed_positions_count_each_rows_real_tokens_from_zero():
    """pack_padded: each row's positions start at 0 at its first real token, left- or right-padded (a shift of every
    position leaves rotary attention's logits as they are, so the logits above cannot show it; generation's KV cache
    positions would disagree with training's)."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ids, positions, cu, m = pack_padded(torch.arange(15).view(3, 5), mask)
    assert ids.tolist() == [2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14] and torch.equal(m, mask.bool())
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 6, 11]


def test_gradients_flow_to_every_parameter(tmp_path):
    save_hf_model(tmp_path)
    ours = load_pretrained(tmp_path)
    ids, mask, _ = padded_batch(301, [5, 3], "left")
    ours(ids, mask).logsumexp(-1).sum().backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_token_id_outside_vocabulary():
    model = Transformer(ModelConfig.named("tiny")).init_weights()
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        model(torch.tensor([[1, 2, 512]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[1, -1]]))


def test_named_shapes_are_llama2():
    c13 = ModelConfig.named("llama2-13b")
    assert (c13.hidden_size, c13.num_layers, c13.num_heads, c13.intermediate_size) == (5120, 40, 40, 13824)
    assert abs(c13.num_params() - 13.016e9) / 13.016e9 < 1e-3
    c7 = ModelConfig.named("llama2-7b")
    assert abs(c7.num_params() - 6.738e9) / 6.738e9 < 1e-3
    c8 = ModelConfig.named("llama3.1-8b")
    assert abs(c8.num_params() - 8.030e9) / 8.030e9 < 1e-3 and c8.rope.kind == "llama3"
    assert ModelConfig.from_hf(c8.to_hf()) == c8
    with pytest.raises(ValueError, match="unknown model shape"):
        ModelConfig.named("llama2-70b-chat")


def test_attention_backend_choice(monkeypatch, capsys):
    """TULU_PPO_ATTENTION read as check_switches reads it (spaces stripped; another word was named up front, and
    '' or ' flash' passed it only to fail at the first training forward); flash-attn missing is refused before any
    weight is read where it would run (a GPU), and a CPU run says it ignores the switch."""
    import sys

    from engine.errors import MissingPackage
    from engine.model import attention_backend
    from engine.preflight import check_attention_backend
    from kernels import dispatch

    for value, want in (("flash", "flash"), (" flash\n", "flash"), ("", "triton"), ("xformers", "triton")):
        monkeypatch.setenv("TULU_PPO_ATTENTION", value)
        assert attention_backend() == want
    with pytest.raises(ValueError, match="TULU_PPO_ATTENTION='xformers': not one of triton, flash"):
        dispatch.check_switches()
    with pytest.raises(ValueError, match="TULU_PPO_ATTENTION='xformers': not one of"):  # (main() called from code)
        check_attention_backend(torch.device("cpu"))
    monkeypatch.setenv("TULU_PPO_ATTENTION", "flash")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # (not installed, even where it is)
    with pytest.raises(MissingPackage, match="TULU_PPO_ATTENTION=flash needs flash-attn"):
        check_attention_backend(torch.device("cuda"))
    check_attention_backend(torch.device("cpu"))
    assert "warning: TULU_PPO_ATTENTION=flash runs flash-attn on a GPU; on cpu it is ignored" in capsys.readouterr().out


def test_kernel_path_gradients_match_the_reference_path(tmp_path):
    """Every parameter's gradient through the kernels (rope attention, the residual add fused into the norms,
    SwiGLU; Triton's interpreter here) equals the pure-PyTorch reference path's, whose forward matches HF's."""
    save_hf_model(tmp_path, num_key_value_heads=2)
    ids, mask, _ = padded_batch(301, [7, 3, 5], "right")
    grads = []
    for ref in (False, True):
        model = load_pretrained(tmp_path)
        with reference_ops() if ref else contextlib.nullcontext():
            model(ids, mask).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_activation_checkpointing_same_gradients(tmp_path):
    """No layer, the first of two, or both recomputed in the backward: the same gradients."""
    save_hf_model(tmp_path)
    grads = []
    for recompute in (False, 1, True):
        model = load_pretrained(tmp_path)
        model.activation_checkpointing = recompute
        ids, mask, _ = padded_batch(301, [6, 4], "right")
        model(ids, mask).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_activation_checkpointing_recomputes_the_first_k_layers_under_autograd_only(monkeypatch):
    """activation_checkpointing True (every layer), k (the first k) or False (none), as the memory plan counts them
    (engine.recompute.layers_recomputed); nothing is checkpointed in a forward without autograd."""
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda fn, *a, **kw: calls.append(fn) or real(fn, *a, **kw)
    )
    model = Transformer(dataclasses.replace(ModelConfig.named("tiny"), num_layers=3)).init_weights()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    for ac, want in ((False, []), (2, list(model.layers)[:2]), (True, list(model.layers))):
        model.activation_checkpointing = ac
        calls.clear()
        model(ids).logsumexp(-1).sum().backward()
        assert calls == want, ac
        calls.clear()
        with torch.no_grad():
            model(ids)
        assert calls == [], ac


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_weights_are_unit_norms_and_seeded_normal_matrices(dtype):
    """init_weights: every norm's weight is ones; every matrix is drawn normal(0, std) from `seed` (the same seed
    gives the same weights, another seed other weights)."""
    cfg, std = ModelConfig.named("tiny"), 0.05
    a, b, c = (Transformer(cfg, dtype=dtype).init_weights(std=std, seed=s) for s in (1, 1, 2))
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert p.dtype == dtype and torch.equal(p, q), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)) and torch.equal(r, p), name
            continue
        assert not torch.equal(p, r), name
        x = p.float()
        assert abs(x.std().item() - std) < 0.1 * std and abs(x.mean().item()) < 0.1 * std, name


@pytest.mark.parametrize("head,tied", [("lm", False), ("lm", True), ("score", False), ("score", True)])
def test_forward_flops_are_what_the_forward_multiplies(head, tied):
    """engine.model.forward_flops (the metrics' TFLOP/s) against torch's FLOP counter on a packed forward of three
    sequences through the reference ops (an LM head tied to the embedding still multiplies): the same weight FLOPs;
    attention's twice ours, as torch counts the causal attention as dense (every pair of tokens, where a causal one
    computes about half)."""
    from torch.utils.flop_counter import FlopCounterMode

    from engine.model import forward_flops

    cfg = dataclasses.replace(ModelConfig.named("tiny"), tie_word_embeddings=tied)
    model = Transformer(cfg, head).init_weights(seed=0)
    lengths = [5, 17, 33]
    ids = torch.randint(0, cfg.vocab_size, (sum(lengths),))
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, 5, 22, 55], dtype=torch.int32)
    with torch.no_grad(), reference_ops(), FlopCounterMode(display=False) as counter:
        model.head_packed(model.hidden_packed(ids, pos, cu))
    sum_sq = sum(n * n for n in lengths)
    attention = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * sum_sq  # ours: the causal half
    assert counter.get_total_flops() == forward_flops(cfg, sum(lengths), sum_sq, head) + attention
    rows = torch.tensor([3, 4, 20, 54])  # the head on a few rows only, as the engine's passes apply it
    with torch.no_grad(), reference_ops(), FlopCounterMode(display=False) as counter:
        model.head_packed(model.hidden_packed(ids, pos, cu)[rows])
    assert counter.get_total_flops() == forward_flops(cfg, sum(lengths), sum_sq, head, len(rows)) + attention


def test_rope_config_in_one_spelling():
    """A theta given inside rope_scaling is the model's theta (not silently 10000), and the scaling is stored as
    config.json's rope_scaling (without the theta); an unknown type is refused when the config is made."""
    cfg = ModelConfig(rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0})
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope.theta) == (500000.0, {"rope_type": "linear", "factor": 2.0}, 5e5)
    with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(InvalidInput, match="rope settings are not numbers where they must be"):  # (not a TypeError)
        ModelConfig(rope_scaling={"rope_type": "linear", "factor": None})


def test_a_config_without_optional_keys_reads_as_transformers_reads_it():
    """rms_norm_eps, tie_word_embeddings, num_key_value_heads, max_position_embeddings (the context a run may fill)
    and the BOS / EOS ids (where transformers' generate stops) missing from config.json: LlamaConfig's defaults."""
    from transformers import LlamaConfig

    hf = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
          "num_hidden_layers": 2, "num_attention_heads": 4}  # fmt: skip
    ours, theirs = ModelConfig.from_hf(hf), LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert ours.num_kv_heads == theirs.num_key_value_heads
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert (ours.bos_token_id, ours.eos_token_ids) == (theirs.bos_token_id, [theirs.eos_token_id])


TINY_HF = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
           "num_hidden_layers": 2, "num_attention_heads": 4}  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"attention_bias": True}, r"attention_bias=True is not supported"),
        ({"mlp_bias": True}, r"mlp_bias=True is not supported"),
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
        (
            {"quantization_config": {"quant_method": "gptq", "bits": 4}},
            r"config.json: a quantized checkpoint "
            r"\(quantization_config, quant_method 'gptq'\) is not supported: give the unquantized weights",
        ),
        ({"rms_norm_eps": float("nan")}, r"config.json: rms_norm_eps nan is not a positive number"),
        ({"rms_norm_eps": -1e-5}, r"rms_norm_eps -1e-05 is not a positive number"),
        ({"rms_norm_eps": "1e-5"}, r"rms_norm_eps '1e-5' is not a positive number"),
        ({"rms_norm_eps": True}, r"rms_norm_eps True is not a positive number"),
        ({"rms_norm_eps": 10**400}, r"rms_norm_eps 1000000000.* is not a positive number"),  # (float() overflows)
        ({"num_key_value_heads": 0}, r"num_key_value_heads 0: not a positive integer"),
        ({"head_dim": 0}, r"head_dim 0: not a positive integer"),
        ({"max_position_embeddings": 0}, r"max_position_embeddings 0: not a positive integer"),  # (not 2048 quietly)
        ({"num_hidden_layers": True}, r"num_hidden_layers True: not a positive integer"),
        ({"num_key_value_heads": 3}, r"num_heads 4 is not a multiple of num_kv_heads 3"),
        ({"head_dim": 15}, r"head_dim 15 must be even for the rotary embedding"),
        ({"hidden_size": 66}, r"hidden_size 66 is not a multiple of num_heads 4"),
    ],
)
def test_a_config_the_model_cannot_compute_is_refused(extra, message):
    """config.json settings our Llama layers would silently compute otherwise (biases, another activation) or could
    not shape (no heads, an odd head_dim, heads that do not group) are refused when read."""
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**TINY_HF, **extra})


def test_swish_is_silu_and_an_integer_eps_is_taken():
    """hidden_act "swish" is transformers' other name of silu (ACT2FN maps both to one module): read as the same
    model; rms_norm_eps 0 would divide by zero for a zero row, but 1 (an int) is a number like any."""
    assert ModelConfig.from_hf({**TINY_HF, "hidden_act": "swish"}) == ModelConfig.from_hf(TINY_HF)
    assert ModelConfig.from_hf({**TINY_HF, "rms_norm_eps": 1}).rms_norm_eps == 1.0
    with pytest.raises(ValueError, match="rms_norm_eps 0 is not a positive number"):
        ModelConfig.from_hf({**TINY_HF, "rms_norm_eps": 0})


def test_config_json_dtype_eos_and_a_model_without_eos():
    """transformers 5's "dtype" is read before the older "torch_dtype" beside it; a model without an EOS id has no
    stop ids (not [None])."""
    assert ModelConfig.from_hf({**TINY_HF, "dtype": "bfloat16", "torch_dtype": "float32"}).dtype == "bfloat16"
    assert ModelConfig.from_hf({**TINY_HF, "torch_dtype": "float16"}).dtype == "float16"
    assert ModelConfig.from_hf({**TINY_HF, "eos_token_id": None}).eos_token_ids == []
    assert ModelConfig.from_hf({**TINY_HF, "eos_token_id": [7, 9]}).eos_token_ids == [7, 9]


def test_last_token_scores_without_a_mask_is_the_last_column():
    s = torch.arange(12.0).view(3, 4)
    assert torch.equal(last_token_scores(s, None), s[:, -1])
    assert torch.equal(last_token_scores(s, torch.ones(3, 4)), s[:, -1])


@pytest.mark.parametrize("n,tp", [(5, 4), (13, 8), (6, 3), (7, 2), (8, 8)])
def test_sequence_parallel_padding_makes_a_multiple_of_tp(n, tp):
    """The packed tokens padded to split evenly over any TP degree (the tests' torchrun runs only TP 2, where n % tp
    and -n % tp agree), the padding a sequence of its own."""
    from engine.model import _pad_tokens

    ids, pos, cu = _pad_tokens(torch.arange(n), torch.arange(n), torch.tensor([0, n], dtype=torch.int32), tp)
    assert ids.shape[0] % tp == 0 and ids.shape[0] - n < tp and pos.shape == ids.shape
    assert int(cu[-1]) == ids.shape[0] and (cu.numel() == 2) == (ids.shape[0] == n)


def test_one_process_is_not_sequence_parallel():
    """Sequence parallelism is for a TP group of several ranks: one process keeps every token, its norms' grads are
    whole (none for the optimizer to sum over a TP group), and generation's layout may run under autograd."""
    model = Transformer(ModelConfig.named("tiny")).init_weights()
    assert not model.sequence_parallel and model.tp_partial_grads() == []
    ids, pos, cu = torch.tensor([5, 9, 13, 2]), torch.arange(4), torch.tensor([0, 4], dtype=torch.int32)
    out = model.hidden_packed(ids, pos, cu, sequence_parallel=False)
    assert out.requires_grad and torch.equal(out, model.hidden_packed(ids, pos, cu))
