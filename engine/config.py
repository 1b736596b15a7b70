"""Configuration dataclasses: model shapes, sampling, PPO hyperparameters (RECIPE.md). The parallel layout is the
run's (RunConfig.tp, engine/state.py) and the process grid's (engine/distributed.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from engine.errors import InvalidInput, MissingInput, first_line, unreadable
from engine.parallel import shard_rows
from kernels.reference import Rope


def json_error(e: json.JSONDecodeError, line: bool = False) -> str:
    """Where and why a JSON text failed to parse, in words ("Expecting value at line 1, column 2"; `line` False: the
    column alone, for one line of a JSONL file); json's own message for some errors ends in "at"."""
    return f"{e.msg.removesuffix(' at')} at {f'line {e.lineno}, ' if line else ''}column {e.colno}"


def is_integer(x) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def json_line(value) -> str:
    """`value` as one JSON Lines line (newline included), a non-finite float (a NaN metric) written as null: Python's
    json writes NaN and Infinity, which are no JSON (jq, pandas' strict readers and W&B's importers refuse the
    line)."""

    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), allow_nan=False) + "\n"


def parse_json(text: str | bytes, where: str, whole_file: bool = False):
    """json.loads(text); text that does not parse, or that Python's json cannot hold (an integer of more than 4300
    digits, arrays or objects nested a thousand deep), is an InvalidInput naming `where` and why: a file's path
    (`whole_file`: the line and column) or a JSONL file's path:line (the column)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        said = json_error(e, line=whole_file)
        raise InvalidInput(
            f"{where} is not valid JSON ({said})" if whole_file else f"{where}: malformed JSON ({said})"
        ) from e
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{where}: not UTF-8 text (byte {e.start + 1})") from None
    except RecursionError:
        raise InvalidInput(f"{where}: JSON nested too deep for Python's json to read") from None
    except ValueError as e:  # (int's digit limit: "Exceeds the limit (4300 digits) for integer string conversion")
        raise InvalidInput(f"{where}: JSON holding a value Python's json cannot read ({first_line(e)})") from None


def read_json(path: str):
    """A JSON file's value; one that does not parse (a truncated copy, say) is an InvalidInput naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # (no permission, a directory of the name: one line naming the file, not a traceback)
        raise InvalidInput(f"cannot read {path}: {unreadable(path, e)}") from e
    return parse_json(data, path, whole_file=True)


def checked_rope(params: dict, max_position_embeddings: int) -> Rope:
    """kernels.reference.Rope from config.json's settings, its ValueError for unsupported ones an InvalidInput (the
    kernels know no engine error; these settings are a run's input)."""
    try:
        return Rope.from_hf(params, max_position_embeddings)
    except ValueError as e:
        raise InvalidInput(str(e)) from e
    except TypeError as e:  # (a setting of the wrong kind: "factor": null, a list)
        raise InvalidInput(f"config.json's rope settings are not numbers where they must be ({e})") from e


# the config.json entries a model's shape cannot do without
LLAMA_BOS, LLAMA_EOS = 1, 2  # transformers' LlamaConfig defaults, for a config.json that names no such id
HF_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


# the largest batch size, epoch count or token count a flag takes: far past any run (a million epochs), and far below
# where the schedule's steps (epochs x prompts x samples) overflow the 64-bit index len() takes, late in setup
MAX_COUNT = 2**31 - 1


@dataclass
class ModelConfig:
    """Shape of a Llama model. Field names follow ours; `from_hf` / `to_hf` translate HF's config.json."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # config.json's rope_scaling without the theta (None: plain rotary), e.g. Llama 3.1's {"rope_type": "llama3",
    # "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    extra_eos_token_ids: tuple[int, ...] = ()  # the rest of a config.json list of EOS ids (Llama 3's); all stop
    pad_token_id: int | None = None
    dtype: str = "bfloat16"  # the checkpoint's stored dtype

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise InvalidInput(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise InvalidInput(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise InvalidInput(f"head_dim {self.head_dim} must be even for the rotary embedding")
        rope = self.rope  # checked (checked_rope), and in one spelling (a theta given inside rope_scaling is the theta)
        self.rope_theta, self.rope_scaling = rope.theta, rope.to_hf()

    @property
    def rope(self) -> Rope:
        """The rotary embedding's frequencies (what every attention kernel's `rope_theta` takes)."""
        return checked_rope(
            {"rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling}, self.max_position_embeddings
        )

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a response (config.json's eos_token_id, one or a list; none without one)."""
        return [] if self.eos_token_id is None else [self.eos_token_id, *self.extra_eos_token_ids]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def num_params(self, head: str = "lm", tp: int = 1) -> int:
        """Parameters of the model with this head, or those one of `tp` tensor-parallel ranks holds (its 1/tp of
        every split weight, a vocabulary padded to a multiple of tp; the norms and the score head whole)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        layer = attn + 3 * h * i + 2 * h
        vocab = shard_rows(self.vocab_size, tp) * tp  # (padded to a multiple of tp)
        out = vocab * h if head == "lm" and not self.tie_word_embeddings else (h if head == "score" else 0)
        total = vocab * h + self.num_layers * layer + h + out
        replicated = (2 * self.num_layers + 1) * h + (h if head == "score" else 0)
        return (total - replicated) // tp + replicated

    @classmethod
    def named(cls, name: str) -> ModelConfig:
        if name not in MODEL_SHAPES:
            raise InvalidInput(f"unknown model shape {name!r}; known: {', '.join(MODEL_SHAPES)}")
        return dataclasses.replace(MODEL_SHAPES[name])

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> ModelConfig:
        """From an HF config.json (a path to the file or its directory, or the parsed dict)."""
        if isinstance(source, dict):
            cfg, path = source, "config.json"
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            folder = os.path.dirname(path)
            if not os.path.exists(path) and os.path.isdir(folder) and not os.access(folder, os.X_OK):
                raise InvalidInput(f"cannot read the directory {folder}: permission denied")  # (not "no config.json")
            if not os.path.exists(path):
                hint = _where_the_models_are(folder) if path.endswith("config.json") else ""
                raise MissingInput(f"no config.json at {path}{hint}")
            cfg = read_json(path)
        if not isinstance(cfg, dict):
            raise InvalidInput(f"{path} holds a JSON {type(cfg).__name__}, not an object of settings")
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if model_type != "llama" or any(a not in SUPPORTED_ARCHITECTURES for a in archs):
            name = ", ".join(archs) or model_type
            known = f"{', '.join(SUPPORTED_ARCHITECTURES[:-1])} or {SUPPORTED_ARCHITECTURES[-1]}"
            raise InvalidInput(
                f"architecture {name} (model_type {model_type!r}) is not supported: "
                + (f"{known} only" if model_type == "llama" else "Llama only")
            )
        max_pos = cfg.get("max_position_embeddings") or 2048  # (missing: LlamaConfig's default, as transformers)
        rope = checked_rope(cfg, max_pos)
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise InvalidInput(f"{flag}=True is not supported (Llama-2 layers have no biases)")
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):  # (transformers' two names of one function)
            raise InvalidInput(f"hidden_act {cfg['hidden_act']!r} is not supported (SwiGLU with silu only)")
        quant = cfg.get("quantization_config")
        if quant:  # (its weights are packed integers under other names: said so, not "missing tensor ...")
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            raise InvalidInput(f"{path}: a quantized checkpoint (quantization_config, quant_method {method!r}) is not "
                               "supported: give the unquantized weights (PPO trains them in bf16 or fp32)")  # fmt: skip
        eps = cfg.get("rms_norm_eps", 1e-6)
        try:
            ok = type(eps) in (int, float) and 0 < float(eps) < math.inf  # (NaN or negative: NaN logits, much later)
        except OverflowError:  # (an integer of 400 digits)
            ok = False
        if not ok:
            raise InvalidInput(f"{path}: rms_norm_eps {eps!r:.40} is not a positive number")
        missing = [k for k in HF_SHAPE_KEYS if k not in cfg]
        if missing:
            raise InvalidInput(f"{path} has no {', '.join(missing)}")
        sizes = (*HF_SHAPE_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings")
        bad = [k for k in sizes if cfg.get(k) is not None and (type(cfg[k]) is not int or cfg[k] < 1)]
        if bad:
            raise InvalidInput(f"{path}: {', '.join(f'{k} {cfg[k]!r}' for k in bad)}: not a positive integer")
        eos, extra = cfg.get("eos_token_id", LLAMA_EOS), ()  # (absent: LlamaConfig's default, where HF stops)
        if isinstance(eos, list):
            eos, extra = (eos[0], tuple(eos[1:])) if eos else (None, ())
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"),
            rms_norm_eps=float(eps),
            rope_theta=rope.theta,
            rope_scaling=rope.to_hf(),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id", LLAMA_BOS),
            eos_token_id=eos,
            extra_eos_token_ids=extra,
            pad_token_id=cfg.get("pad_token_id"),
            dtype=str(dtype).replace("torch.", ""),
        )

    def to_hf(self, head: str = "lm") -> dict[str, Any]:
        """An HF config.json dict that transformers' Llama classes load."""
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM" if head == "lm" else "LlamaForSequenceClassification"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope.to_hf(),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids if self.extra_eos_token_ids else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.dtype,
        }
        if head == "score":
            cfg["num_labels"] = 1
            cfg["id2label"] = {"0": "LABEL_0"}
            cfg["label2id"] = {"LABEL_0": 0}
        return cfg


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaModel")

MODEL_SHAPES: dict[str, ModelConfig] = {
    # A CPU-sized model for the embedded default and the tests: the vocabulary matches the shipped tokenizer.
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=2048,
        dtype="float32",
    ),
    "llama2-7b": ModelConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    "llama2-13b": ModelConfig(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    # Llama 3.1 8B (Tulu 3's base): GQA, a 128k vocabulary, scaled rotary, three EOS ids
    "llama3.1-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=128001,
        extra_eos_token_ids=(128008, 128009),
    ),
}


@dataclass
class GenerateConfig:
    """Sampling parameters of one generate call (RECIPE.md: temperature 0.7, up to 1024 new tokens)."""

    temperature: float = 0.7  # sampling temperature (training log-probs use raw logits)
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    max_new_tokens: int = 1024
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1  # samples per prompt
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past the model's EOS (benchmarks)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):  # (None or "0.9": a TypeError from the comparison below)
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), numbers.Real):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not 0 <= self.temperature < math.inf:  # (NaN too)
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        ids = self.stop_token_ids
        if isinstance(ids, (int, str, bytes)) or not hasattr(ids, "__len__") or not all(is_integer(t) for t in ids):
            # (an iterator, map(int, ids), would be used up by this check and the stop tokens silently ignored)
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        if self.seed is not None and not is_integer(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name, low in (("top_k", 0), ("max_new_tokens", 1), ("n", 1)):  # (2.5 tokens, or True samples: a mistake)
            value = getattr(self, name)
            if not is_integer(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
            setattr(self, name, int(value))  # (a numpy int32 wraps around in the generator's length sums)
        if self.seed is not None:
            self.seed = int(self.seed)


# PPOConfig fields added after checkpoints were first written, at the value those runs had: an older run resumed
# samples as it did (engine.saved_run.checkpoint_config)
LEGACY_PPO_VALUES = {"top_k": 0, "top_p": 1.0, "kl_target": 0.0, "kl_horizon": 10000, "entropy_coef": 0.0,
                     "whiten_eps": 1e-8}  # fmt: skip


# the PPOConfig fields an evaluation reads (--eval-only: the others would be ignored, and are refused): the decoding,
# the response and prompt limits, and the terms of the reward
EVALUATION_FIELDS = ("temperature", "top_k", "top_p", "max_new_tokens", "max_prompt_len", "kl_coef", "kl_estimator",
                     "missing_eos_penalty")  # fmt: skip


@dataclass
class PPOConfig:
    """PPO hyperparameters; defaults are the Tulu V2.5 PPO 13B recipe (RECIPE.md)."""

    learning_rate: float = 1e-6  # peak LR of both optimizers
    # constant: linear warmup, then the peak LR to the end, as EasyLM's PPO (the recipe's code) builds its optimizer
    # (init_lr 0, end_lr = the peak); linear: decay to 0 after the warmup (RECIPE.md's model card reads "linear")
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.1  # share of the optimizer steps spent warming up
    adam_betas: tuple[float, float] = (0.9, 0.999)  # Adam's beta1 and beta2 (both optimizers)
    adam_eps: float = 1e-8  # Adam's epsilon (both optimizers)
    weight_decay: float = 0.0  # Adam (decoupled decay, 0 in the recipe)
    max_grad_norm: float = 1.0  # global grad-norm clip per model (0: off)
    train_batch_size: int = 64  # sequences per optimizer step
    rollout_batch_size: int = 512  # prompts per PPO iteration
    samples_per_prompt: int = 1  # responses sampled per prompt
    ppo_epochs: int = 1  # passes over each rollout (a later one reshuffled into new minibatches)
    prompt_epochs: int = 1  # passes over the prompt set
    kl_coef: float = 0.05  # beta of the per-token KL penalty in the reward
    kl_estimator: str = "k1"  # k1 (logp - ref_logp), k2 or k3
    # adaptive KL coefficient (Ziegler et al. 2019, as TRL, OpenRLHF and veRL offer it): after each rollout, kl_coef *=
    # 1 + clip(KL / kl_target - 1, -0.2, 0.2) * sequences / kl_horizon, KL the rollout's mean over responses of the
    # estimate summed over each response's tokens (the "kl" metric), sequences the rollout's; 0: fixed (the recipe)
    kl_target: float = 0.0
    kl_horizon: int = 10000  # sequences over which the adaptive coefficient moves by at most a factor e^0.2
    missing_eos_penalty: float = -10.0  # score of a response that hits the length limit without EOS
    whiten_rewards: bool = False  # off in the recipe
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # per optimizer minibatch
    # added to the (unbiased) variance under the root when whitening advantages or rewards: EasyLM's whiten() (the
    # recipe's code); TRL's is 1e-8
    whiten_eps: float = 1e-6
    clip_ratio: float = 0.2  # policy ratio clip
    clip_value: float = 0.2  # value clip around the rollout values
    value_loss_coef: float = 0.1  # weight of the value loss
    # entropy bonus: the policy loss less entropy_coef x each response token's entropy (of the raw logits, as the
    # log-probs), its gradient fused in the loss kernel; 0 in the recipe
    entropy_coef: float = 0.0
    temperature: float = 0.7  # sampling temperature of rollouts and evaluations (> 0; see --eval-greedy)
    # rollouts sample from the 50 likeliest tokens: EasyLM's rollouts (the recipe's code) called transformers' Flax
    # generate with a GenerationConfig that left top_k at its default, 50, which Flax applies (0: the whole vocabulary;
    # logits tied with the 50th are kept, as transformers' PyTorch TopKLogitsWarper does)
    top_k: int = 50
    top_p: float = 1.0  # nucleus sampling of rollouts (1: off, as in the recipe)
    max_new_tokens: int = 1024  # response length limit
    max_prompt_len: int = 1024  # longer prompts are dropped, not truncated
    # EasyLM's trainer (the quirk RECIPE.md names): each optimizer minibatch scored again by the policy and value model
    # as its step finds them: its old log-probs (every ratio 1 in one epoch), values and from them its KL-shaped
    # rewards, advantages and returns (off: once per rollout, standard PPO)
    recompute_old_logprobs_per_minibatch: bool = False
    # (not a hyperparameter: False leaves the checks between fields to a later dataclasses.replace, for the command line
    # of a --resume, whose values not given come from the checkpoint; each field's own range is checked at once)
    check_relations: InitVar[bool] = True

    @property
    def rollout_sequences(self) -> int:
        """Sequences a rollout generates: rollout_batch_size prompts x samples_per_prompt."""
        return self.rollout_batch_size * self.samples_per_prompt

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps of each trained model per rollout: ppo_epochs passes over its sequences in minibatches of
        train_batch_size."""
        return self.ppo_epochs * self.rollout_sequences // self.train_batch_size

    def __post_init__(self, check_relations: bool = True) -> None:
        """Refuse a value that makes no sense when the flags are parsed, not after four models are loaded (or an
        hour in, when the warmup ends and the schedule is first asked for)."""
        bad = []
        for name in ("train_batch_size", "rollout_batch_size", "samples_per_prompt", "ppo_epochs", "prompt_epochs",
                     "max_new_tokens", "max_prompt_len", "kl_horizon"):  # fmt: skip
            if getattr(self, name) < 1:
                bad.append(f"{name} must be >= 1, got {getattr(self, name)}")
            elif getattr(self, name) > MAX_COUNT:  # (the schedule's step count would overflow an index)
                bad.append(f"{name} must be at most {MAX_COUNT:,}, got {getattr(self, name):,}")
        if not 0 < self.learning_rate < math.inf:  # (0: a run that trains nothing and exits 0)
            bad.append(f"learning_rate must be > 0 and finite, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm", "kl_coef", "kl_target", "clip_ratio", "clip_value",
                     "value_loss_coef", "entropy_coef", "whiten_eps"):  # fmt: skip
            if not 0 <= getattr(self, name) < math.inf:
                bad.append(f"{name} must be >= 0 and finite, got {getattr(self, name)}")
        for name in ("warmup_ratio", "gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                bad.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            bad.append(f"adam_betas must be two numbers in [0, 1), got {tuple(self.adam_betas)}")
        if not self.adam_eps > 0:
            bad.append(f"adam_eps must be > 0, got {self.adam_eps}")
        if check_relations and self.kl_target > 0 and self.kl_coef == 0:  # (the controller scales it: 0 stays 0)
            bad.append(f"kl_target {self.kl_target} needs a kl_coef > 0 to start the adaptive coefficient from")
        sequences = self.rollout_sequences
        # (a rollout moves the coefficient by <= 0.2 sequences / horizon)
        if check_relations and self.kl_target > 0 and self.kl_horizon <= 0.2 * sequences:
            bad.append(f"kl_horizon must exceed a fifth of a rollout's {sequences} sequences (one rollout could take "
                       f"the adaptive KL coefficient to 0 or below), got {self.kl_horizon}")  # fmt: skip
        if self.lr_schedule not in ("linear", "constant"):
            bad.append(f"lr_schedule must be 'linear' or 'constant', got {self.lr_schedule!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            bad.append(f"kl_estimator must be 'k1', 'k2' or 'k3', got {self.kl_estimator!r}")
        if self.top_k < 0:
            bad.append(f"top_k must be >= 0 (0: no top-k), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            bad.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0:  # (0 is greedy decoding: PPO would train on samples its policy never draws)
            bad.append(f"temperature must be > 0 for PPO's rollouts, got {self.temperature} (--eval-greedy evaluates "
                       "greedily)")  # fmt: skip
        for name, value in vars(self).items():  # every other number finite too (the missing-EOS score, the temperature)
            if isinstance(value, float) and not math.isfinite(value) and not any(b.startswith(f"{name} ") for b in bad):
                bad.append(f"{name} must be finite, got {value}")
        if bad:
            raise InvalidInput("; ".join(bad))


def _where_the_models_are(directory: str) -> str:
    """A hint for a directory without config.json: a checkpoint of this engine holds its models in policy/ and
    value/; a PEFT adapter's directory has adapter_config.json (the engine reads merged weights)."""
    subs = [d for d in ("policy", "value") if os.path.exists(os.path.join(directory, d, "config.json"))]
    if subs:
        dirs = " and ".join(os.path.join(directory, d) for d in subs)
        return f" (a checkpoint of this engine: its models are in {dirs})"
    if os.path.exists(os.path.join(directory, "adapter_config.json")):
        return " (a PEFT adapter: merge it into its base model and save that, e.g. with peft's merge_and_unload)"
    return ""
