"""Checkpoint errors name the problem; saving is atomic."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import engine.checkpoint as ckpt
from engine.checkpoint import load_pretrained, save_pretrained
from engine.config import ModelConfig
from engine.model import Transformer
from tests.engine.hf_models import rel_err, save_hf_model
from tests.engine.ranks import init_gloo, leave, outcome


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
    save_hf_model(tmp_path / "rm", head="score")
    with pytest.raises(ValueError, match=r"missing tensor lm_head.weight.*a sequence-classification checkpoint: .*"
                       r"a causal LM \(LlamaForCausalLM\)"):  # fmt: skip
        load_pretrained(tmp_path / "rm", head="lm")
    save_hf_model(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"missing tensor score.weight.*a causal-LM checkpoint: .*"
                       r"LlamaForSequenceClassification with num_labels=1"):  # fmt: skip
        load_pretrained(tmp_path / "lm", head="score")


def test_a_tied_causal_lm_as_reward_model_gives_the_hint(tmp_path):
    """A causal LM with tied embeddings (Llama 3.2 1B / 3B) has no lm_head.weight to tell it by: its config.json's
    architectures does; given as a reward model, it gets the same hint as an untied one."""
    save_hf_model(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor score.weight.*a causal-LM checkpoint: .*"
                       r"LlamaForSequenceClassification with num_labels=1"):  # fmt: skip
        load_pretrained(tmp_path, head="score")


def test_an_openrlhf_value_head_is_named(tmp_path):
    """OpenRLHF saved its reward models' head as value_head.weight before its value_head_prefix became "score"
    (LlamaForSequenceClassification's layout): such a checkpoint is refused naming the tensor to rename."""
    save_hf_model(tmp_path, head="score")
    weights = load_file(tmp_path / "model.safetensors")
    weights["value_head.weight"] = weights.pop("score.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor score.weight .*an OpenRLHF reward model saved with "
                       r"value_head_prefix 'value_head'.* renamed\)$"):  # fmt: skip
        load_pretrained(tmp_path, head="score")


def test_a_tied_reward_model_lacking_its_head_gets_no_causal_lm_hint(tmp_path):
    """A sequence-classification checkpoint with tied embeddings whose score.weight is missing (a damaged save) is not
    called a causal LM: the class in its config.json's architectures tells the kinds apart, not the tying alone."""
    save_hf_model(tmp_path, head="score", tie_word_embeddings=True)
    _rewrite(tmp_path, lambda t: t.pop("score.weight"))
    with pytest.raises(ValueError, match=r"missing tensor score.weight \(expected shape \[1, 64\]\)$"):
        load_pretrained(tmp_path, head="score")


def test_a_classification_head_of_two_labels_is_named(tmp_path):
    """transformers' LlamaForSequenceClassification defaults to two labels: score.weight [2, hidden]."""
    save_hf_model(tmp_path, head="score")
    _rewrite(tmp_path, lambda t: t.update({"score.weight": torch.zeros(2, 64)}))
    with pytest.raises(ValueError, match=rf"checkpoint {tmp_path}: tensor score.weight .*shape \[2, 64\], expected "
                       r"\[1, 64\] \(a classification head of 2 labels: .*num_labels=1\)"):  # fmt: skip
        load_pretrained(tmp_path, head="score")


def test_check_checkpoint_reads_no_weight(tmp_path, monkeypatch):
    """The check a run makes of all its checkpoints before loading any: names and shapes from the headers only."""
    save_hf_model(tmp_path)

    class Headers:  # a weights file that gives its tensors' names and shapes, and nothing else
        def __init__(self, fn):
            self.f = real(fn)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, name):
            return Shape(self.f.get_slice(name))

    class Shape:  # (the header's shape and dtype)
        def __init__(self, sl):
            self.shape, self.dtype = sl.get_shape(), sl.get_dtype()

        def get_shape(self):
            return self.shape

        def get_dtype(self):
            return self.dtype

    real = ckpt._open_weights
    monkeypatch.setattr(ckpt, "_open_weights", Headers)
    config, files, prefix = ckpt.check_checkpoint(tmp_path)
    assert (
        prefix == "model." and config.hidden_size == 64 and set(files.values()) == {str(tmp_path / "model.safetensors")}
    )
    with pytest.raises(TypeError, match="not subscriptable"):  # (the same files refuse a load, which reads them)
        load_pretrained(tmp_path)


def test_other_architectures_refused(tmp_path):
    save_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture MistralForCausalLM .* not supported"):
        load_pretrained(tmp_path)
    # a Llama model with a head class of its own (OpenRLHF saves its reward model as "RewardModel"): the message names
    # the classes that load, not "Llama only" of a model whose model_type is llama
    cfg.update(architectures=["RewardModel"], model_type="llama")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"architecture RewardModel \(model_type 'llama'\) is not supported: "
                       r"LlamaForCausalLM, LlamaForSequenceClassification or LlamaModel only"):  # fmt: skip
        load_pretrained(tmp_path)


def test_a_directory_without_config_says_where_the_models_are(tmp_path):
    """--policy out/checkpoint-N (the run's checkpoint, not its policy/ in it) names the models' directories; a PEFT
    adapter's directory says to merge it."""
    from engine.config import ModelConfig
    from engine.errors import MissingInput

    save_hf_model(tmp_path / "checkpoint-000004" / "policy")
    save_hf_model(tmp_path / "checkpoint-000004" / "value", head="score")
    ckpt = tmp_path / "checkpoint-000004"
    with pytest.raises(MissingInput, match=rf"no config.json at {ckpt}/config.json \(a checkpoint of this engine: its "
                       rf"models are in {ckpt}/policy and {ckpt}/value\)$"):  # fmt: skip
        ModelConfig.from_hf(ckpt)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    with pytest.raises(MissingInput, match=r"\(a PEFT adapter: merge it into its base model and save that"):
        ModelConfig.from_hf(tmp_path / "lora")
    with pytest.raises(MissingInput, match=r"no config.json at .*/none$"):
        ModelConfig.from_hf(tmp_path / "none")


def _write_bin(src, dst, shards: int, legacy: bool = False) -> None:
    """src's safetensors weights as PyTorch pickles in dst (pytorch_model.bin, or `shards` files and the index), as
    older HF checkpoints are stored."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    save = lambda sd, fn: torch.save(sd, dst / fn, _use_new_zipfile_serialization=not legacy)  # noqa: E731
    if shards == 1:
        save(tensors, "pytorch_model.bin")
        return
    weight_map = {}
    for k in range(shards):
        fn = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: tensors[n] for n in names[k::shards]}
        save(part, fn)
        weight_map.update(dict.fromkeys(part, fn))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_config_without_a_dtype_loads_the_stored_one(tmp_path, fmt, dtype):
    """config.json naming no dtype (older converted checkpoints): the weights' own dtype, as transformers' dtype
    "auto" loads them (not float32, which a save then wrote at twice the size); a config.json's dtype still wins."""
    from transformers import AutoModelForCausalLM

    save_hf_model(tmp_path / "st", dtype=dtype)
    cfg = json.loads((tmp_path / "st" / "config.json").read_text())
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    (tmp_path / "st" / "config.json").write_text(json.dumps(cfg))
    src = tmp_path / "st"
    if fmt == "bin":
        _write_bin(src, tmp_path / "bin", 1)
        src = tmp_path / "bin"
    assert AutoModelForCausalLM.from_pretrained(src).dtype == dtype
    assert next(load_pretrained(src).parameters()).dtype == dtype
    (src / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}))
    assert next(load_pretrained(src).parameters()).dtype == torch.float32


def _same_parameters(a, b) -> None:
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and pa.dtype == pb.dtype and torch.equal(pa, pb), na


@pytest.mark.parametrize("head", ["lm", "score"])
@pytest.mark.parametrize("shards,legacy", [(1, False), (3, False), (1, True)])
def test_pytorch_bin_checkpoints_load(tmp_path, head, shards, legacy):
    """pytorch_model.bin (one file, sharded with its index, the legacy pre-zip format) loads the same weights as
    the safetensors it was written from; transformers' forward of the model agrees."""
    hf = save_hf_model(tmp_path / "st", head=head)
    _write_bin(tmp_path / "st", tmp_path / "bin", shards, legacy)
    ours = load_pretrained(tmp_path / "bin", head=head)
    _same_parameters(ours, load_pretrained(tmp_path / "st", head=head))
    bf16 = lambda d: load_pretrained(tmp_path / d, head=head, dtype=torch.bfloat16)  # noqa: E731
    _same_parameters(bf16("bin"), bf16("st"))
    ids = torch.randint(1, 301, (2, 7))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = ours(ids)
    if head == "score":  # transformers' score at the last token (no padding), ours at every token
        got, want = got[:, -1], want[:, 0]
    assert rel_err(got, want) < 2e-5


def test_pytorch_bin_tp_slices(tmp_path, monkeypatch):
    """A tensor-parallel rank reads its slices of a .bin checkpoint as of a safetensors one (TP rank 1 of 2)."""
    from tests.engine.fake_tp import FakeGroup, fake_tp

    save_hf_model(tmp_path / "st", vocab_size=302)
    _write_bin(tmp_path / "st", tmp_path / "bin", 2)
    fake_tp(monkeypatch)
    a, b = (load_pretrained(tmp_path / d, group=FakeGroup(2, 1)) for d in ("bin", "st"))
    assert a.layers[0].mlp.down_proj.weight.shape == (64, 48)  # half of the columns: sliced
    assert torch.equal(a.norm.weight, b.norm.weight)
    _same_parameters(a, b)


def test_no_weights_named(tmp_path):
    save_hf_model(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "training_args.bin")  # not model weights
    with pytest.raises(FileNotFoundError, match=r"no model weights in .*pytorch_model\*\.bin"):
        load_pretrained(tmp_path)


def test_bin_index_names_missing_shard(tmp_path):
    save_hf_model(tmp_path / "st")
    _write_bin(tmp_path / "st", tmp_path / "bin", 2)
    (tmp_path / "bin" / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin.index.json names pytorch_model-00002-of-00002"):
        load_pretrained(tmp_path / "bin")


def test_model_safetensors_is_read_before_a_bin_index(tmp_path):
    """A repo holding both formats, its .bin copy sharded and its safetensors in one file: engine.hub fetches the
    safetensors and every *.json, so the directory has model.safetensors and a pytorch_model.bin.index.json whose
    shards were never fetched. The safetensors are read (as transformers reads them), not the index refused."""
    hf = save_hf_model(tmp_path / "st")
    _write_bin(tmp_path / "st", tmp_path / "bin", 2)
    (tmp_path / "st" / "pytorch_model.bin.index.json").write_text(
        (tmp_path / "bin/pytorch_model.bin.index.json").read_text()
    )
    ours = load_pretrained(tmp_path / "st")
    ids = torch.randint(1, 301, (2, 7))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) < 2e-5


def test_model_safetensors_is_read_before_a_stale_safetensors_index(tmp_path):
    """transformers' save_pretrained of a sharded checkpoint's model, unsharded, into its own directory (fp32 shards
    re-saved in bf16, say) writes model.safetensors and deletes the shards but leaves their index: transformers reads
    model.safetensors first and loads it; so does the engine (the stale index, naming shards that are gone, is not
    read)."""
    hf = save_hf_model(tmp_path)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    assert {"model.safetensors", "model.safetensors.index.json"} <= set(os.listdir(tmp_path))
    assert not any(fn.startswith("model-") for fn in os.listdir(tmp_path))
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)  # (what transformers reads there)
    ours = load_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(1, 301, (2, 7))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) < 2e-5


def test_pytorch_model_bin_is_read_before_a_stale_bin_index(tmp_path):
    """The same for the older format: a pytorch_model.bin beside the index of shards it replaced is read (transformers
    reads pytorch_model.bin before pytorch_model.bin.index.json)."""
    hf = save_hf_model(tmp_path / "st")
    _write_bin(tmp_path / "st", tmp_path / "bin", 2)
    for fn in os.listdir(tmp_path / "bin"):
        if fn.startswith("pytorch_model-"):
            os.remove(tmp_path / "bin" / fn)
    torch.save(load_file(tmp_path / "st/model.safetensors"), tmp_path / "bin/pytorch_model.bin")
    ours = load_pretrained(tmp_path / "bin")
    ids = torch.randint(1, 301, (2, 7))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) < 2e-5


def test_model_safetensors_is_read_alone_as_transformers_reads_it(tmp_path):
    """A directory with model.safetensors (and no index) beside other safetensors files, a LoRA adapter saved next to
    the merged model say: transformers reads model.safetensors alone, and so does the engine (not the adapter's
    tensors refused as unexpected)."""
    hf = save_hf_model(tmp_path)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64)},
              tmp_path / "adapter_model.safetensors")  # fmt: skip
    ours = load_pretrained(tmp_path)
    ids = torch.randint(1, 301, (2, 7))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) < 2e-5
    assert set(ckpt.checkpoint_files(str(tmp_path)).values()) == {str(tmp_path / "model.safetensors")}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_damaged_index_is_named(tmp_path, fmt):
    """An index cut short, without its weight_map, or putting a tensor in a file that does not hold it: refused,
    naming the index or the file and the tensor (not json's, KeyError's or safetensors' bare messages)."""
    from transformers import LlamaForCausalLM

    from tests.engine.hf_models import hf_config

    path = tmp_path / fmt
    if fmt == "safetensors":
        LlamaForCausalLM(hf_config()).save_pretrained(path, max_shard_size="100KB")
    else:
        save_hf_model(tmp_path / "one")
        _write_bin(tmp_path / "one", path, 3)
    index = path / (ckpt.INDEX_FILE if fmt == "safetensors" else ckpt.BIN_INDEX_FILE)
    good = json.loads(index.read_text())
    index.write_text(json.dumps(good)[:60])
    with pytest.raises(ValueError, match=rf"{index.name} is not valid JSON \(.* at line 1, column"):
        load_pretrained(path)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=rf"{index.name} has no weight_map"):
        load_pretrained(path)
    shard = good["weight_map"]["model.norm.weight"]
    other = next(fn for fn in sorted(set(good["weight_map"].values())) if fn != shard)
    index.write_text(json.dumps({**good, "weight_map": {**good["weight_map"], "model.norm.weight": other}}))
    with pytest.raises(ValueError, match=rf"the index puts tensor model\.norm\.weight in {other}, which does not hold"):
        load_pretrained(path)


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


def test_a_config_dtype_of_auto_loads_at_the_dtype_asked(tmp_path):
    """The check before loading reads shapes only: a config.json whose torch_dtype is "auto" loads at the dtype the
    caller gives, as it did before the check."""
    save_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "auto"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_pretrained(tmp_path, dtype=torch.float32).embed_tokens.weight.dtype == torch.float32


def test_saved_files_take_the_umasks_permissions(tmp_path):
    """Every file of a checkpoint is as readable as the user's umask makes a new file (safetensors alone writes its
    files 0600: a team's other users could not read the weights beside a readable config.json)."""
    from engine.tokenizer import TINY_DIR

    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=1)
    # a tokenizer read-only where it is kept (a protected base model's): its copies are new files all the same (the
    # chat template's rewrite of a copied read-only tokenizer_config.json failed the run's first save, as a user)
    shutil.copytree(TINY_DIR, tmp_path / "tok")
    (tmp_path / "tok/tokenizer_config.json").chmod(0o444)
    (tmp_path / "tok/tokenizer.json").chmod(0o400)
    old = os.umask(0o027)
    try:
        save_pretrained(model, tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok", chat_template="{{ 'x' }}")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ckpt").iterdir()}
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(modes), modes
    assert set(modes.values()) == {0o640}, modes


def test_transformers_ignores_our_kernels_package():
    # PyPI has another package named `kernels`; transformers must not mistake ours for it.
    import transformers  # noqa: F401
    from transformers.utils.import_utils import is_kernels_available

    import kernels  # noqa: F401

    assert not is_kernels_available()


def test_fsync_dir_ignores_only_a_file_system_that_cannot_sync_directories(tmp_path, monkeypatch):
    """A directory fsync that a file system refuses (EINVAL) is skipped; one that fails to write back (EIO) raises,
    as a file's would: `latest` must not move to a checkpoint whose names may not be on disk."""
    import errno

    from engine import durable

    def failing(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))

        return fsync

    monkeypatch.setattr(durable.os, "fsync", failing(errno.EINVAL))
    durable.fsync_dir(str(tmp_path))
    monkeypatch.setattr(durable.os, "fsync", failing(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        durable.fsync_dir(str(tmp_path))


def test_weights_fingerprint_is_stable_across_versions(tmp_path):
    """The fingerprint a checkpoint's run recorded must come out the same from later code, or --resume refuses the
    very models it ran with: pinned for fixed weights (the value the code of the first runs gave; a config field
    added since, rope_scaling, is left out of it while unset)."""
    from engine.checkpoint import weights_fingerprint

    model = Transformer(ModelConfig.named("tiny"))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_((torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) % 97 - 48) / (100 + i))
    save_pretrained(model, tmp_path / "ckpt")
    assert weights_fingerprint(str(tmp_path / "ckpt")) == "2c022413dbc4d1b8"


@pytest.mark.parametrize("tied", [False, True])
def test_weights_fingerprint_ignores_what_loading_ignores(tmp_path, tied):
    """A copy re-saved without what loading skips (an old checkpoint's rotary inv_freq buffers, a tied LM head's
    duplicate) or with the "model." prefix an unprefixed export lacked keeps the fingerprint (a --resume with it is
    not refused); a changed weight still changes it."""
    import dataclasses

    cfg = dataclasses.replace(ModelConfig.named("tiny"), tie_word_embeddings=tied)
    model = Transformer(cfg)
    save_pretrained(model, tmp_path / "base")
    base = ckpt.weights_fingerprint(str(tmp_path / "base"))
    tensors = load_file(tmp_path / "base/model.safetensors")

    def variant(name, tensors):
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / name / "model.safetensors")
        for fn in ("config.json",):
            (tmp_path / name / fn).write_text((tmp_path / "base" / fn).read_text())
        return ckpt.weights_fingerprint(str(tmp_path / name))

    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(cfg.head_dim // 2) for i in range(2)}
    assert variant("inv_freq", {**tensors, **inv_freq}) == base
    plain = {k.removeprefix("model."): v for k, v in tensors.items()}
    assert variant("unprefixed", plain) == base
    if tied:
        assert "lm_head.weight" not in tensors
        assert variant("head_copy", {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}) == base
    changed = dict(tensors)
    changed["model.norm.weight"] = changed["model.norm.weight"] + 1
    assert variant("changed", changed) != base


def test_a_tied_config_beside_a_head_of_other_values_is_refused(tmp_path):
    """tie_word_embeddings with an lm_head.weight in the file: an equal copy loads (the tied model), one of other
    values is refused by name (transformers reads it untied, with that head); its config told untied, the engine
    reads it as transformers does."""
    from transformers import LlamaForCausalLM

    save_hf_model(tmp_path / "tied", tie_word_embeddings=True)
    tensors = load_file(tmp_path / "tied/model.safetensors")
    assert "lm_head.weight" not in tensors
    embed = tensors["model.embed_tokens.weight"]
    for name, head in (("copy", embed.clone()), ("other", torch.randn_like(embed))):
        (tmp_path / name).mkdir()
        save_file({**tensors, "lm_head.weight": head}, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text((tmp_path / "tied/config.json").read_text())
    assert load_pretrained(tmp_path / "copy").config.tie_word_embeddings
    with pytest.raises(
        ValueError,
        match=r"config.json ties the LM head to the embeddings \(tie_word_embeddings\) but "
        r"lm_head.weight differs from model.embed_tokens.weight: transformers reads the two untied",
    ):
        ckpt.check_checkpoint(tmp_path / "other")
    config = json.loads((tmp_path / "other/config.json").read_text())
    (tmp_path / "other/config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    ours = load_pretrained(tmp_path / "other")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "other").eval()
    ids = torch.randint(0, embed.shape[0], (1, 9))
    with torch.no_grad():
        want = theirs(ids).logits[0]
        got = ours.forward_packed(ids[0], torch.arange(9), torch.tensor([0, 9], dtype=torch.int32))
    assert rel_err(got, want) < 1e-5


def test_save_pretrained_syncs_every_file_and_the_rename(tmp_path, monkeypatch):
    import engine.checkpoint as ckpt
    import engine.durable as durable

    synced, dirs = [], []
    target = tmp_path / "ckpt"
    real_fsync = ckpt.fsync_file
    monkeypatch.setattr(ckpt, "fsync_file", lambda fn: (synced.append(os.path.basename(fn)), real_fsync(fn)))
    record = lambda p: dirs.append((os.path.abspath(p), target.exists()))  # noqa: E731
    monkeypatch.setattr(ckpt, "fsync_dir", record)
    monkeypatch.setattr(durable, "fsync_dir", record)  # (replace_dir's)
    ckpt.save_pretrained(Transformer(ModelConfig.named("tiny")).init_weights(seed=1), target)
    assert "config.json" in synced and "model.safetensors" in synced, synced
    assert (os.path.abspath(tmp_path), True) in dirs, dirs
    # a tokenizer's named chat templates (additional_chat_templates/) are synced too, and their folder; a folder whose
    # name starts like a tokenizer file's is no file to copy
    from engine.tokenizer import TINY_DIR

    tok = tmp_path / "tok"
    shutil.copytree(TINY_DIR, tok)
    (tok / "tokenizer_backup").mkdir()
    (tok / ckpt.CHAT_TEMPLATE_DIR).mkdir()
    (tok / ckpt.CHAT_TEMPLATE_DIR / "tool_use.jinja").write_text("{{ 'tool' }}")
    synced.clear(), dirs.clear()
    ckpt.save_pretrained(Transformer(ModelConfig.named("tiny")).init_weights(seed=1), target, tokenizer_dir=str(tok))
    assert "tool_use.jinja" in synced and any(d.endswith(ckpt.CHAT_TEMPLATE_DIR) for d, _ in dirs), (synced, dirs)
    assert not (target / "tokenizer_backup").exists() and (target / ckpt.CHAT_TEMPLATE_DIR / "tool_use.jinja").exists()


def test_sharded_index_total_size_is_bytes(tmp_path):
    from safetensors.torch import load_file

    import engine.checkpoint as ckpt

    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=1)
    ckpt.save_pretrained(model, tmp_path / "c", max_shard_bytes=200_000)
    index = json.load(open(tmp_path / "c" / ckpt.INDEX_FILE))
    files = set(index["weight_map"].values())
    assert len(files) > 1
    nbytes = sum(t.numel() * t.element_size() for f in files for t in load_file(tmp_path / "c" / f).values())
    assert index["metadata"]["total_size"] == nbytes


def test_save_pretrained_stores_the_dtype_asked(tmp_path):
    """dtype= casts the stored tensors and config.json's torch_dtype says so; loading reads them back at that dtype."""
    model = Transformer(ModelConfig.named("tiny"), dtype=torch.float32).init_weights(seed=1)
    save_pretrained(model, tmp_path / "c", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(tmp_path / "c" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.load(open(tmp_path / "c" / "config.json"))["torch_dtype"] == "bfloat16"
    back = load_pretrained(tmp_path / "c")
    for a, b in zip(model.parameters(), back.parameters()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b)


def test_a_checkpoint_without_the_model_prefix_loads(tmp_path):
    """Tensors named as a bare LlamaModel names them (no "model." prefix) load as the prefixed ones do."""
    save_hf_model(tmp_path)
    want = load_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({k[len("model.") :]: t.pop(k) for k in list(t) if k.startswith("model.")}))
    assert not any(k.startswith("model.") for k in load_file(tmp_path / "model.safetensors"))
    got = load_pretrained(tmp_path)
    for a, b in zip(want.parameters(), got.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_reward_checkpoint_with_its_score_head_and_an_openrlhf_one_gets_no_rename_hint(tmp_path):
    """The hint to rename value_head.weight is for a checkpoint that lacks score.weight: one that has both, and lacks
    another tensor (a damaged save), is named for that tensor alone."""
    save_hf_model(tmp_path, head="score")

    def damaged(tensors):
        tensors["value_head.weight"] = tensors["score.weight"].clone()
        del tensors["model.norm.weight"]

    _rewrite(tmp_path, damaged)
    with pytest.raises(ValueError, match=r"missing tensor model\.norm\.weight \(expected shape \[64\]\)$"):
        load_pretrained(tmp_path, head="score")


def test_a_causal_lm_with_a_value_head_given_as_reward_model_is_called_a_causal_lm(tmp_path):
    """A checkpoint with an LM head is a causal LM's, a value_head.weight beside it or not (a policy saved with a value
    head): its hint says so; the OpenRLHF rename hint is for a checkpoint without either head."""
    save_hf_model(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"value_head.weight": torch.zeros(1, 64)}))
    with pytest.raises(ValueError, match=r"missing tensor score.weight .*\(a causal-LM checkpoint: .*num_labels=1\)$"):
        load_pretrained(tmp_path, head="score")


class _NoHostMemory:
    """A gathered tensor whose copy to the host fails (save_pretrained's .detach().to("cpu")), as out of memory."""

    def __init__(self, error: Exception | None = None):
        self.error = error or MemoryError("out of host memory")

    def detach(self):
        raise self.error


def _save_or_error(model, path, got):
    got.extend(outcome(save_pretrained, model, path, max_shard_bytes=200_000, done="saved"))


def _save_pretrained_rank(rank, world, init_file, target, out_dir):
    import errno

    init_gloo(rank, world, init_file)
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=1)
    got = []
    save_pretrained(model, os.path.join(target, "whole"), max_shard_bytes=200_000)  # (files written in turn)
    got.append("saved")
    if rank == 1:  # (every tensor rank 1 would copy to the host fails: rank 0 copies and writes its own files)
        for spec in ckpt.hf_tensor_specs(model).values():
            spec.module.full_part = lambda part=0: _NoHostMemory()
    _save_or_error(model, os.path.join(target, "failed"), got)
    if rank == 1:  # (torch's own out of host memory is a RuntimeError, not a MemoryError)
        for spec in ckpt.hf_tensor_specs(model).values():
            spec.module.full_part = lambda part=0: _NoHostMemory(RuntimeError("DefaultCPUAllocator: not enough memory"))
    _save_or_error(model, os.path.join(target, "failed"), got)
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=1)
    finish = ckpt._finish_checkpoint_dir
    if rank == 0:  # (rank 0 alone writes the index and config.json and renames the directory: a bug of ours there)
        ckpt._finish_checkpoint_dir = lambda *args: (_ for _ in ()).throw(TypeError("a bug"))
    _save_or_error(model, os.path.join(target, "failed"), got)
    ckpt._finish_checkpoint_dir = finish
    makedirs, save_file = os.makedirs, ckpt.save_file
    if rank == 0:  # (rank 0 alone makes the temporary directory: its parent refused to it)
        os.makedirs = lambda *args: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied", target))
    _save_or_error(model, os.path.join(target, "failed"), got)
    os.makedirs = makedirs
    if rank == 1:  # (safetensors' own error writing a file, no OSError)
        ckpt.save_file = lambda *args, **kwargs: (_ for _ in ()).throw(ValueError("a safetensors error"))
    _save_or_error(model, os.path.join(target, "failed"), got)
    ckpt.save_file = save_file
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


def test_save_pretrained_on_two_ranks_raises_one_ranks_error_on_both(tmp_path):
    """save_pretrained under two ranks (gloo): the ranks write the files in turn and the checkpoint loads whole; a copy
    to the host that fails on rank 1 alone (out of memory, no OSError: Python's MemoryError or torch's RuntimeError),
    a bug on rank 0 as it finishes the directory alone, its temporary directory refused to rank 0 and safetensors' own
    error on rank 1, are raised on both ranks at once, the other naming the failing rank, and leave no temporary
    directory (rather than one rank waiting for the other in a collective until the process group's timeout)."""
    import torch.multiprocessing as mp

    target = tmp_path / "target"
    target.mkdir()
    mp.spawn(_save_pretrained_rank, args=(2, str(tmp_path / "init"), str(target), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    oom = "DefaultCPUAllocator: not enough memory"
    assert got == [
        ["saved", "RuntimeError: save_pretrained failed on rank 1: out of host memory", True,
         f"RuntimeError: save_pretrained failed on rank 1: {oom}", True, "TypeError: a bug", True,
         f"PermissionError: [Errno 13] Permission denied: '{target}'", True,
         "RuntimeError: save_pretrained failed on rank 1: a safetensors error", True],
        ["saved", "MemoryError: out of host memory", True, f"RuntimeError: {oom}", True,
         "RuntimeError: save_pretrained failed on rank 0: a bug", True,
         f"PermissionError: [Errno 13] save_pretrained failed on rank 0: Permission denied ({target})", True,
         "ValueError: a safetensors error", True],
    ]  # fmt: skip
    assert sorted(p.name for p in target.iterdir()) == ["whole"]
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=1)
    assert len(set(json.load(open(target / "whole" / ckpt.INDEX_FILE))["weight_map"].values())) > 1
    for a, b in zip(model.parameters(), load_pretrained(target / "whole").parameters()):
        assert torch.equal(a, b)
