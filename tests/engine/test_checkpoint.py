"""Checkpoint errors name the problem; saving is atomic."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.checkpoint as ckpt
from engine.checkpoint import load_pretrained, save_pretrained
from engine.config import ModelConfig
from engine.model import Transformer
from tests.engine.hf_models import save_hf_model


def _rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    save_hf_model(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \[96, 64\]\)"
    ):
        load_pretrained(tmp_path)


def test_wrong_shape_names_both_shapes(tmp_path):
    save_hf_model(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight .*shape \[63\], expected \[64\]"):
        load_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    save_hf_model(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_pretrained(tmp_path)


def test_wrong_head_gives_a_hint(tmp_path):
    save_hf_model(tmp_path, head="score")
    with pytest.raises(ValueError, match="missing tensor lm_head.weight.*head='score'"):
        load_pretrained(tmp_path, head="lm")


def test_other_architectures_refused(tmp_path):
    save_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture MistralForCausalLM .* not supported"):
        load_pretrained(tmp_path)


def test_no_safetensors(tmp_path):
    save_hf_model(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no safetensors files.*\.bin.*save_pretrained\(dst\)"):
        load_pretrained(tmp_path)


def test_tp_degree_must_divide_heads():
    from engine.parallel import ColumnParallelLinear

    class FakeGroup:  # only its size matters to the shape check
        pass

    import engine.parallel as par

    orig = par.group_size, par.group_rank
    par.group_size, par.group_rank = (lambda g: 3), (lambda g: 0)
    try:
        with pytest.raises(ValueError, match=r"tensor parallel degree 3 does not divide the attention heads \(4\)"):
            ColumnParallelLinear(
                64, [64, 32, 32], FakeGroup(), shard_units=[16, 16, 16], names=["the attention heads", "kv", "kv"]
            )
    finally:
        par.group_size, par.group_rank = orig


def test_save_is_atomic(tmp_path, monkeypatch):
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=1)
    target = tmp_path / "ckpt"
    save_pretrained(model, target)
    before = load_file(target / "model.safetensors")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    model.init_weights(seed=2)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, target)
    # the old checkpoint is intact and no temporary directory is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    after = load_file(target / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    save_pretrained(model, target)  # overwriting a complete checkpoint works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    reloaded = load_pretrained(target)
    assert torch.equal(reloaded.embed_tokens.weight, model.embed_tokens.weight)


def test_transformers_ignores_our_kernels_package():
    # PyPI has another package named `kernels`; transformers must not mistake ours for it.
    import transformers  # noqa: F401
    from transformers.utils.import_utils import is_kernels_available

    import kernels  # noqa: F401

    assert not is_kernels_available()
