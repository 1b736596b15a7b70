"""HF safetensors checkpoints <-> engine.model.Transformer.

Loading reads tensor by tensor through safetensors slices, so peak host memory stays near one
tensor and a tensor-parallel rank reads only its own slice from disk (older checkpoints stored as
pytorch_model*.bin are read too, memory-mapped). Saving writes a directory
that transformers' AutoModelForCausalLM / AutoModelForSequenceClassification load back, sharded
above a size limit, into a temporary directory that is renamed into place only once complete; under
torchrun the ranks write the files in turn, in parallel.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import ModelConfig, read_json
from engine.distributed import raise_together, rank0_together
from engine.durable import fsync_dir, fsync_file, naming, replace_dir
from engine.errors import InvalidInput, MissingInput, first_line, unreadable
from engine.model import Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"  # older checkpoints: PyTorch pickles, read (never written)
BIN_SINGLE_FILE = "pytorch_model.bin"
# Buffers old HF Llama checkpoints carry that are recomputed, not loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class TensorSpec:
    """Where one HF tensor goes: module.load_part(source, part) / module.full_part(part)."""

    module: torch.nn.Module
    part: int
    shape: tuple[int, ...]


def hf_tensor_specs(model: Transformer, prefix: str = "model.") -> dict[str, TensorSpec]:
    """HF tensor name -> spec, for every tensor the model expects (full, unsharded shapes)."""
    c = model.config
    h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
    specs = {f"{prefix}embed_tokens.weight": TensorSpec(model.embed_tokens, 0, (c.vocab_size, h))}
    for n, layer in enumerate(model.layers):
        p = f"{prefix}layers.{n}."
        attn, mlp = layer.self_attn, layer.mlp
        specs[p + "self_attn.q_proj.weight"] = TensorSpec(attn.qkv_proj, 0, (c.num_heads * d, h))
        specs[p + "self_attn.k_proj.weight"] = TensorSpec(attn.qkv_proj, 1, (c.num_kv_heads * d, h))
        specs[p + "self_attn.v_proj.weight"] = TensorSpec(attn.qkv_proj, 2, (c.num_kv_heads * d, h))
        specs[p + "self_attn.o_proj.weight"] = TensorSpec(attn.o_proj, 0, (h, c.num_heads * d))
        specs[p + "mlp.gate_proj.weight"] = TensorSpec(mlp.gate_up_proj, 0, (i, h))
        specs[p + "mlp.up_proj.weight"] = TensorSpec(mlp.gate_up_proj, 1, (i, h))
        specs[p + "mlp.down_proj.weight"] = TensorSpec(mlp.down_proj, 0, (h, i))
        specs[p + "input_layernorm.weight"] = TensorSpec(layer.input_layernorm, 0, (h,))
        specs[p + "post_attention_layernorm.weight"] = TensorSpec(layer.post_attention_layernorm, 0, (h,))
    specs[f"{prefix}norm.weight"] = TensorSpec(model.norm, 0, (h,))
    if model.head == "score":
        specs["score.weight"] = TensorSpec(model.score, 0, (1, h))
    elif model.lm_head is not None:
        specs["lm_head.weight"] = TensorSpec(model.lm_head, 0, (c.vocab_size, h))
    return specs


GENERATION_CONFIG = "generation_config.json"


def generation_eos_ids(path: str | os.PathLike | None) -> list[int]:
    """The EOS ids of a checkpoint directory's generation_config.json (an id or a list; none without the file): where
    transformers' generate stops, which can name more than config.json does (Llama 3 Instruct's <|eot_id|>)."""
    fn = os.path.join(os.fspath(path), GENERATION_CONFIG) if path is not None else ""
    if not os.path.isfile(fn):
        return []
    eos = read_json(fn)
    eos = eos.get("eos_token_id") if isinstance(eos, dict) else None
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if any(type(e) is not int or e < 0 for e in ids):
        raise InvalidInput(f"{fn}: eos_token_id {eos!r} is not a token id (or a list of them)")
    return ids


def weights_fingerprint(path: str, rows: int = 4) -> str:
    """A short hash telling two checkpoints' weights apart without reading them whole: the model's shape (config.json
    parsed: not its transformers version or stored dtype) and, per tensor, its name, shape and first `rows` rows as
    fp32 (about 20 MB for a 13B model), of the tensors loading reads. The same weights moved, re-sharded or re-saved
    (in the other file format, without what loading ignores) keep it; two models of one shape with other weights
    differ in it."""
    h = hashlib.sha256()
    shape = dataclasses.asdict(ModelConfig.from_hf(path))
    shape.pop("dtype")
    if shape.get("rope_scaling") is None:  # (a field added later: plain rotary hashes as it always did)
        shape.pop("rope_scaling", None)
    h.update(json.dumps(shape, sort_keys=True).encode())
    files, tensors = checkpoint_files(path), {}
    # the tensors a model loads, by their names in transformers' layout: a re-saved copy that drops what loading
    # ignores (old rotary buffers, the tied LM head's duplicate) or writes the "model." prefix keeps the fingerprint
    loaded = {n: n if n.startswith("model.") or n in ("lm_head.weight", "score.weight") else f"model.{n}"
              for n in files if not n.endswith(IGNORED_SUFFIXES)
              and not (n == "lm_head.weight" and shape["tie_word_embeddings"])}  # fmt: skip
    for fn in sorted(set(files.values())):
        with _open_weights(fn) as f:
            for name in (n for n in loaded if files[n] == fn):
                part = f.get_slice(name)
                head = part[:rows].to(torch.float32).contiguous().numpy().tobytes()
                tensors[loaded[name]] = f"{loaded[name]} {list(part.get_shape())}".encode() + head
    for name in sorted(tensors):  # (by name: however the tensors are split into files)
        h.update(tensors[name])
    return h.hexdigest()[:16]


def checkpoint_files(path: str) -> dict[str, str]:
    """tensor name -> file path, from the index or from the files: safetensors (model.safetensors[.index.json]),
    else PyTorch pickles (pytorch_model.bin[.index.json], as older HF checkpoints are stored)."""
    listed = sorted(os.listdir(path))
    shards = [fn for fn in listed if fn.endswith(".safetensors")]
    # transformers' order: model.safetensors, its index, pytorch_model.bin, its index; a file found first is read alone
    # (not an adapter_model.safetensors saved beside it, nor a stale index: transformers' save_pretrained of a sharded
    # model's weights, unsharded, into its directory deletes the shards but leaves their index). A repo with both
    # formats and only its .bin copy sharded has a pytorch_model.bin.index.json beside its model.safetensors, and
    # engine.hub fetches every *.json but no .bin: the safetensors are read.
    for name in (SINGLE_FILE, INDEX_FILE, BIN_SINGLE_FILE, BIN_INDEX_FILE):
        if name not in listed:
            continue
        if name in (SINGLE_FILE, BIN_SINGLE_FILE):
            shards = [name]
            break
        files = {n: os.path.join(path, fn) for n, fn in weight_map(os.path.join(path, name)).items()}
        for fn in sorted(set(files.values())):
            if not os.path.exists(fn):
                raise MissingInput(f"{name} names {os.path.basename(fn)}, which is not in {path}")
        return files
    shards = shards or [fn for fn in listed if fn.startswith("pytorch_model") and fn.endswith(".bin")]
    if not shards:
        raise MissingInput(f"no model weights in {path} (neither *.safetensors nor pytorch_model*.bin)")
    files = {}
    for fn in shards:
        with _open_weights(os.path.join(path, fn)) as f:
            for name in f.keys():
                files[name] = os.path.join(path, fn)
    return files


def weight_map(index: str) -> dict[str, str]:
    """An index file's weight_map (tensor name -> file name); a damaged index (cut short, no weight_map) is named."""
    data = read_json(index)
    mapping = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(mapping, dict) or not all(isinstance(fn, str) for fn in mapping.values()):
        raise InvalidInput(f"{index} has no weight_map (an object of tensor name -> file name)")
    return mapping


class _TorchFile:
    """A PyTorch weights pickle read like safetensors' safe_open: memory-mapped (only the slices used are read),
    with weights_only=True (a pickle can run code; weights_only unpickles tensors and plain containers only)."""

    def __init__(self, fn: str):
        try:
            self.tensors = torch.load(fn, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip, torch < 1.6) format cannot be memory-mapped: read it whole
            self.tensors = torch.load(fn, map_location="cpu", weights_only=True)
        if not isinstance(self.tensors, dict):
            raise InvalidInput(f"{fn} holds a {type(self.tensors).__name__}, not a state dict of tensors")

    def keys(self):
        return self.tensors.keys()

    def get_slice(self, name: str) -> _TensorSlice:
        return _TensorSlice(self.tensors[name])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.tensors = None


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}  # (their header's names)
STORED_DTYPES = {name: str(t).removeprefix("torch.") for t, name in SAFETENSORS_DTYPES.items()}  # -> ModelConfig.dtype


class _TensorSlice:
    """safetensors' slice interface over a tensor: get_shape() and [a:b] / [:, a:b]."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def get_shape(self) -> list[int]:
        return list(self.t.shape)

    def get_dtype(self) -> str:
        return SAFETENSORS_DTYPES.get(self.t.dtype, str(self.t.dtype))

    def __getitem__(self, idx) -> torch.Tensor:
        return self.t[idx]


def _open_weights(fn: str):
    try:
        return _TorchFile(fn) if fn.endswith(".bin") else safe_open(fn, framework="pt", device="cpu")
    except (ValueError, MemoryError):
        raise
    except OSError as e:  # (no permission, an I/O error: the file may be whole)
        raise InvalidInput(f"cannot read the weights file {fn}: {unreadable(fn, e)}") from e
    except Exception as e:  # (a truncated or damaged file: safetensors' own error names no file)
        raise InvalidInput(f"cannot read the weights file {fn} ({type(e).__name__}: {first_line(e)})") from e


class _Source:
    """A lazily sliced checkpoint tensor: source[a:b] reads only those rows, cast to the model dtype."""

    def __init__(self, sl, dtype: torch.dtype):
        self.sl, self.dtype = sl, dtype

    def __getitem__(self, idx) -> torch.Tensor:
        return self.sl[idx].to(self.dtype)


HEAD_CLASSES = {"lm": "a causal LM (LlamaForCausalLM)", "score": "a LlamaForSequenceClassification with num_labels=1"}


def check_checkpoint(path: str | os.PathLike, head: str = "lm") -> tuple[ModelConfig, dict[str, str], str]:
    """A checkpoint directory against what a model with `head` loads from it, from config.json and the weight files'
    headers alone (no weight is read, but for a legacy pre-zip .bin, which cannot be memory-mapped, and an LM head
    saved beside a tied config, compared with the embeddings): every tensor there, none unexpected, each of its
    shape. Cheap, so a run checks all its checkpoints before it loads (or clears) anything. Returns (config, tensor
    name -> file, name prefix); the config's dtype is the first floating-point tensor's where config.json names none.
    Raises FileNotFoundError / ValueError naming the directory, the tensor, both shapes and, for a checkpoint of the
    other kind, what this model is."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingInput(f"checkpoint directory {path} does not exist")
    config = ModelConfig.from_hf(path)
    files = checkpoint_files(path)
    names = [n for n in files if not n.endswith(IGNORED_SUFFIXES)]
    prefix = "model." if any(n.startswith("model.") for n in names) else ""
    meta = Transformer(config, head, dtype=torch.float32, device="meta")  # (shapes alone; any config.json dtype)
    shapes = {n: spec.shape for n, spec in hf_tensor_specs(meta, prefix).items()}
    if head == "lm" and config.tie_word_embeddings and "lm_head.weight" in files:  # some writers save the tied copy
        _check_tied_copy(path, files, f"{prefix}embed_tokens.weight")
        names = [n for n in names if n != "lm_head.weight"]
    kind = ""
    # (a checkpoint of the other kind: its head's tensor, or, a causal LM with tied embeddings having none, its class)
    raw = read_json(os.path.join(path, "config.json"))
    archs = raw.get("architectures") or []
    tied_lm = (
        head == "score" and config.tie_word_embeddings and "score.weight" not in files and "LlamaForCausalLM" in archs
    )
    if {"lm": "score.weight", "score": "lm_head.weight"}[head] in files or tied_lm:
        other = "sequence-classification" if head == "lm" else "causal-LM"
        kind = f" (a {other} checkpoint: this model is {HEAD_CLASSES[head]})"
    elif head == "score" and "value_head.weight" in files and "score.weight" not in files:
        kind = (  # (OpenRLHF's reward and critic models before its value_head_prefix default became "score")
            " (an OpenRLHF reward model saved with value_head_prefix 'value_head': its head is value_head.weight, "
            "which transformers' LlamaForSequenceClassification, and this engine, read as score.weight; save it again "
            "with that tensor renamed)"
        )
    missing = [n for n in shapes if n not in files]
    if missing:
        detail = ", ".join(f"{n} (expected shape {list(shapes[n])})" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidInput(f"checkpoint {path} is missing tensor {detail}{more}{kind}")
    unexpected = [n for n in names if n not in shapes]
    if unexpected:
        raise InvalidInput(f"checkpoint {path} has unexpected tensor(s) {', '.join(unexpected[:5])}{kind}")
    stored = None  # (the first floating-point tensor's dtype: the model's, where config.json names none)
    for fn, tensor_names in _by_file(shapes, files).items():
        with _open_weights(fn) as f:
            held = set(f.keys())
            for name in tensor_names:
                if name not in held:  # (an index whose weight_map names another file than the one holding it)
                    raise InvalidInput(
                        f"checkpoint {path}: the index puts tensor {name} in {os.path.basename(fn)}, which does not "
                        "hold it"
                    )
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                stored = stored or STORED_DTYPES.get(sl.get_dtype())
                if shape != shapes[name]:
                    labels = ""
                    if name == "score.weight" and len(shape) == 2 and shape[1:] == shapes[name][1:]:
                        labels = f" (a classification head of {shape[0]} labels: this model is {HEAD_CLASSES[head]})"
                    raise InvalidInput(
                        f"checkpoint {path}: tensor {name} in {os.path.basename(fn)} has shape {list(shape)}, "
                        f"expected {list(shapes[name])}{labels}"
                    )
    if stored and not (raw.get("dtype") or raw.get("torch_dtype")):  # (as transformers' dtype "auto" reads it)
        config = dataclasses.replace(config, dtype=stored)
    return config, files, prefix


def _check_tied_copy(path: str, files: dict[str, str], embed: str) -> None:
    """A config.json that ties the LM head to the embeddings beside an lm_head.weight of other values is refused:
    transformers (5) then reads the two untied, with that head, while a tied model reads the embeddings; which one
    was trained is the checkpoint writer's to say."""
    if embed not in files:
        return  # (named as missing by the check)
    with _open_weights(files["lm_head.weight"]) as f:
        lm_head = f.get_slice("lm_head.weight")[:]
    with _open_weights(files[embed]) as f:
        same = tuple(lm_head.shape) == tuple(f.get_slice(embed).get_shape()) and torch.equal(
            lm_head, f.get_slice(embed)[:]
        )
    if not same:
        raise InvalidInput(
            f"checkpoint {path}: config.json ties the LM head to the embeddings (tie_word_embeddings) but "
            f"lm_head.weight differs from {embed}: transformers reads the two untied, this engine would read the "
            "embeddings; set tie_word_embeddings to false in config.json to use that head, or remove lm_head.weight"
        )


def _by_file(names, files: dict[str, str]) -> dict[str, list[str]]:
    """The tensor names grouped by the file holding them (each file opened once)."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(files[name], []).append(name)
    return grouped


def load_pretrained(
    path: str | os.PathLike,
    *,
    head: str = "lm",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    group=None,
    sequence_parallel: bool = True,
) -> Transformer:
    """Load an HF Llama checkpoint directory (config.json + safetensors, or pytorch_model*.bin) into a Transformer.

    head: "lm" (LlamaForCausalLM) or "score" (LlamaForSequenceClassification with one label).
    dtype: defaults to the checkpoint's stored dtype. group: a TP process group (load this rank's shard).
    sequence_parallel: under TP, split the tokens between the TP regions of the packed forward (Transformer).
    Missing, unexpected or wrongly shaped tensors raise ValueError naming the tensor and both shapes
    (check_checkpoint, before anything is allocated).
    """
    config, files, prefix = check_checkpoint(path, head)
    dtype = dtype or config.torch_dtype
    model = Transformer(config, head, group=group, dtype=dtype, device=device, sequence_parallel=sequence_parallel)
    specs = hf_tensor_specs(model, prefix)
    with torch.no_grad():
        for fn, tensor_names in _by_file(specs, files).items():
            with _open_weights(fn) as f:
                for name in tensor_names:
                    specs[name].module.load_part(_Source(f.get_slice(name), dtype), specs[name].part, name)
    return model


def _umask() -> int:
    """The process's umask (read by setting it: there is no other way; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _plan_shards(specs: dict[str, TensorSpec], elt: int, max_shard_bytes: int) -> list[list[str]]:
    """The tensors of each file, in order, from the shapes alone (every rank computes the same plan)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        nbytes = elt * int(torch.Size(spec.shape).numel())
        if size and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class SaveInProgress:
    """A save_pretrained whose files are left to write (save_pretrained(..., defer=True)): `jobs`, this rank's
    file writes, each from host copies already made (run them in order on any thread: no collective, no device
    work); then finish(error), on every rank in the same order as its other collectives, with the error the jobs
    raised here if any: every rank raises together, or rank 0 completes the directory and renames it into place."""

    def __init__(self, rank: int, tmp: str, finish_args: tuple):
        self.rank, self.tmp, self.finish_args = rank, tmp, finish_args
        self.jobs: list = []
        self.failed: BaseException | None = None  # (an error while the tensors were gathered or written)

    def finish(self, error: BaseException | None = None) -> None:
        try:
            raise_together(self.failed or error, "save_pretrained")
            # (its agreement is the last collective: no rank returns before rank 0 has finished the directory)
            rank0_together("save_pretrained", self.rank, _finish_checkpoint_dir, *self.finish_args)
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise


def save_pretrained(
    model: Transformer,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
    chat_template: str | None = None,
    defer: bool = False,
) -> SaveInProgress | None:
    """Write `model` as an HF checkpoint directory at `path`, atomically (temp dir + rename).

    Under torchrun every rank must call this: the TP shards are gathered (collectives) and the files are
    written by the ranks in turn (file k by global rank k % world size, each file as soon as its tensors are
    gathered), so a large model is written in parallel with one file's worth of host memory per rank; global
    rank 0 then writes the index and config.json and renames the directory into place. `path` must be on a
    file system every rank sees (as the trainer's output directory is).
    dtype: the stored dtype (default: the model's). tokenizer_dir: tokenizer files to copy alongside. source_dir: the
    checkpoint the model started from, whose generation_config.json (its EOS ids, its sampling defaults) is copied.
    chat_template: the chat template the model was trained with (the run's --chat-template tulu), written into the
    copied tokenizer files in place of their own, so that apply_chat_template formats prompts as the model learned.
    defer: the tensors gathered and copied to host memory (new tensors: the model may change once this returns), the
    files left as the jobs of the SaveInProgress returned, to write and finish (this rank's share of the model in
    host memory until they have run); without it the save is whole when this returns (None).
    """
    path = os.fspath(path).rstrip("/")
    specs = hf_tensor_specs(model)
    rank, world = _world()
    store_dtype = dtype or next(model.parameters()).dtype
    elt = torch.empty((), dtype=store_dtype).element_size()
    plan = _plan_shards(specs, elt, max_shard_bytes)
    n = len(plan)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    tmp = [f"{path}.tmp-{uuid.uuid4().hex[:8]}"]
    if world > 1:
        dist.broadcast_object_list(tmp, src=0)  # one temporary directory for all ranks
    tmp = tmp[0]
    rank0_together("save_pretrained", rank, os.makedirs, tmp)  # no rank is left waiting in a collective
    save = SaveInProgress(
        rank, tmp, (model, tmp, path, plan, names, specs, elt, store_dtype, tokenizer_dir, source_dir, chat_template)
    )
    try:
        for k, shard in enumerate(plan):
            mine = k % world == rank
            tensors = {}
            for name in shard:
                full = specs[name].module.full_part(specs[name].part)  # collective within the TP group
                if mine and save.failed is None:
                    try:  # (a rank that fails goes on joining the gathers above, so the others are not left waiting)
                        # (deferred: a copy, never the parameter itself, which a CPU run's .to() would return)
                        tensors[name] = full.detach().to("cpu", store_dtype, copy=defer).contiguous()
                    except Exception as e:  # (out of host memory: not a KeyboardInterrupt, which ends the process)
                        save.failed = e
            if mine and save.failed is None:
                job = functools.partial(_write_shard, tensors, os.path.join(tmp, names[k]))
                if defer:
                    save.jobs.append(job)
                else:
                    try:
                        job()
                    except Exception as e:  # (a full disk, a safetensors error: every rank raises together in finish)
                        save.failed = e
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if defer:
        return save
    save.finish()
    return None


def _write_shard(tensors: dict[str, torch.Tensor], fn: str) -> None:
    with naming(fn):  # (a full disk's error names the file)
        save_file(tensors, fn, metadata={"format": "pt"})
        os.chmod(fn, 0o666 & ~_umask())  # (safetensors writes 0600: unreadable to a team's other users)
        fsync_file(fn)


# what a tokenizer directory holds, whatever its kind (fast tokenizer.json, SentencePiece's tokenizer.model or
# spiece.model, BPE's vocab.json + merges.txt, WordPiece's vocab.txt), so that AutoTokenizer loads the saved model's
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # a tokenizer's named chat templates (tool_use, ...), NAME.jinja
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "chat_template", "added_tokens", "vocab.", "merges.txt",
                   "spiece.model", "sentencepiece")  # fmt: skip


def _finish_checkpoint_dir(
    model, tmp, path, plan, names, specs, elt, store_dtype, tokenizer_dir, source_dir, chat_template=None
) -> None:
    """Rank 0, once every file is written: the index, config.json, the tokenizer files (with `chat_template`), the
    source's generation_config.json, fsync, rename."""
    if len(plan) > 1:
        mapping = {name: names[k] for k, shard in enumerate(plan) for name in shard}
        total = elt * sum(torch.Size(spec.shape).numel() for spec in specs.values())
        _write_json(os.path.join(tmp, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": mapping})
    cfg = model.config.to_hf(model.head)
    cfg["torch_dtype"] = str(store_dtype).replace("torch.", "")
    _write_json(os.path.join(tmp, "config.json"), cfg)
    # (the files' contents alone: new files as the umask makes them, not a read-only source's mode, which the chat
    # template's rewrite of tokenizer_config.json then could not open, nor a private one's 0600)
    if tokenizer_dir is not None:
        for fn in os.listdir(tokenizer_dir):
            if fn.startswith(TOKENIZER_FILES) and os.path.isfile(os.path.join(tokenizer_dir, fn)):
                shutil.copyfile(os.path.join(tokenizer_dir, fn), os.path.join(tmp, fn))
        if os.path.isdir(named := os.path.join(tokenizer_dir, CHAT_TEMPLATE_DIR)):  # (transformers 5's named ones)
            os.makedirs(os.path.join(tmp, CHAT_TEMPLATE_DIR))
            for fn in (fn for fn in os.listdir(named) if os.path.isfile(os.path.join(named, fn))):
                shutil.copyfile(os.path.join(named, fn), os.path.join(tmp, CHAT_TEMPLATE_DIR, fn))
        _read_as_shipped(tmp, tokenizer_dir)
        if chat_template is not None:
            _set_chat_template(tmp, chat_template)
    if source_dir is not None and os.path.isfile(os.path.join(source_dir, GENERATION_CONFIG)):
        shutil.copyfile(os.path.join(source_dir, GENERATION_CONFIG), os.path.join(tmp, GENERATION_CONFIG))
    for d in (os.path.join(tmp, CHAT_TEMPLATE_DIR), tmp):
        if os.path.isdir(d):
            for fn in (fn for fn in os.listdir(d) if os.path.isfile(os.path.join(d, fn))):
                fsync_file(os.path.join(d, fn))
            fsync_dir(d)  # (its entries: the files' names)
    replace_dir(tmp, path)


def _read_as_shipped(directory: str, source: str | os.PathLike) -> None:
    """Name PreTrainedTokenizerFast as the class of the tokenizer files copied into `directory` from `source` where
    transformers would rebuild their tokenizer.json's pipeline from the class they name (tokenizer.read_as_shipped,
    what load_tokenizer found for these files: a Llama-2 tokenizer under transformers 5): AutoTokenizer then splits
    text as the run did (the file as it is; what transformers 4 did too), and the saved chat template gives the
    run's ids. Files transformers cannot read are left as copied, with a warning (the weights are saved all the
    same)."""
    from engine.tokenizer import read_as_shipped

    cfg_fn = os.path.join(directory, "tokenizer_config.json")
    if not (os.path.isfile(cfg_fn) and os.path.isfile(os.path.join(directory, "tokenizer.json"))):
        return
    try:
        if not read_as_shipped(source):
            return
    except Exception as e:  # (transformers' and the tokenizers library's errors have no common class)
        warnings.warn(
            f"the tokenizer files of {source} were copied as they are: transformers cannot load them "
            f"({type(e).__name__}: {first_line(e)})",
            stacklevel=2,
        )
        return
    cfg = read_json(cfg_fn)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(cfg_fn, cfg)


def _set_chat_template(directory: str, template: str) -> None:
    """Make `template` the chat template of the tokenizer files in `directory`: tokenizer_config.json's chat_template
    (chat_template.jinja / .json, which transformers reads first, removed); chat_template.jinja without that file, or
    beside named templates (additional_chat_templates/, where transformers takes the default from that file only)."""
    for fn in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(directory, fn)):
            os.remove(os.path.join(directory, fn))
    cfg_fn = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(cfg_fn) or os.path.isdir(os.path.join(directory, CHAT_TEMPLATE_DIR)):
        with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
            f.write(template)
    if not os.path.isfile(cfg_fn):
        return
    with open(cfg_fn) as f:
        cfg = json.load(f)
    named = cfg.get("chat_template")
    if isinstance(named, list):  # (transformers 4's named templates: the default one replaced, the others kept)
        others = [t for t in named if not (isinstance(t, dict) and t.get("name") == "default")]
        cfg["chat_template"] = [{"name": "default", "template": template}, *others]
    else:
        cfg["chat_template"] = template
    _write_json(cfg_fn, cfg)


def _write_json(fn: str, obj) -> None:
    with open(fn, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
