"""Launch parameters of kernels/paged_attention.py's decode kernel: the measured defaults (decode_config), the
process-wide overrides a tuning run sets (set_decode_config), and how many context splits a launch makes
(choose_num_splits)."""

from __future__ import annotations

import json

# Splits shorter than this are not worth the merge: the workspace round trip costs ~S*D*4 bytes per
# head against 256 * D * 4 bytes of K/V read per split.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 64
# Enough programs in flight to cover the HBM latency on every SM (a few CTAs per SM).
_PROGRAMS_PER_SM = 4

_CONFIG_KEYS = (
    "block_n", "num_warps", "num_stages", "dot_min_group", "fuse_rope", "min_split_tokens", "linear", "norm_rows",
    "pdl",
)  # fmt: skip
# With `linear`: decode steps of at most this many sequences run each layer's add + RMSNorm in the next projection's
# prologue (kernels/decode_linear.py's norm): every program reads its rows whole first, cheap for a few rows only.
# A guess (4 rows: ~80 KB of L2 reads a program against a launch saved), not yet timed.
_NORM_ROWS = 4
_SWITCHES = ("fuse_rope", "linear", "pdl")  # 0 or 1
_overrides: dict = {}  # set_decode_config's, merged over decode_config() in every launch (a per-call config wins)


def set_decode_config(**overrides) -> dict:
    """Override decode_config()'s launch parameters for every later decode launch in this process (tuning: a
    bench sweep's fastest variant tried on a whole generator without editing decode_config). No arguments: back
    to the defaults. Returns the overrides now in force. A captured CUDA graph keeps the launch it captured."""
    check_decode_config(overrides)
    _overrides.clear()
    _overrides.update(overrides)
    return dict(_overrides)


def parse_decode_config(text: str) -> dict:
    """A --decode-config flag's JSON object as set_decode_config's overrides; ValueError naming what is wrong (the
    JSON, a value that is not an object, an unknown key, a bad value)."""
    overrides = json.loads(text)  # (a syntax error is a ValueError too)
    if not isinstance(overrides, dict):
        raise ValueError(f"expected a JSON object such as '{{\"linear\": 1}}', got {text!r}")
    check_decode_config(overrides)
    return overrides


def check_decode_config(overrides: dict) -> None:
    """Raise ValueError naming the first launch parameter set_decode_config would refuse (changes nothing)."""
    bad = sorted(set(overrides) - set(_CONFIG_KEYS))
    if bad:
        raise ValueError(f"unknown decode launch parameter(s) {bad}: expected some of {list(_CONFIG_KEYS)}")
    for k, v in overrides.items():
        if k == "norm_rows":
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 64:
                raise ValueError(f"decode launch parameter norm_rows must be an int from 0 to 64, got {v!r}")
            continue
        if k in _SWITCHES:
            if not isinstance(v, int) or isinstance(v, bool) or v not in (0, 1):
                raise ValueError(f"decode launch parameter {k} must be 0 or 1, got {v!r}")
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"decode launch parameter {k} must be a positive int, got {v!r}")
        if k in ("block_n", "num_warps") and v & (v - 1):
            raise ValueError(f"decode launch parameter {k} must be a power of two, got {v}")


def decode_config(group: int, block_d: int, elem_size: int) -> dict:
    """Launch parameters of the decode kernel (tokens per tile, warps, pipeline stages, when to use tl.dot);
    elem_size: bytes per cached element.

    Measured on an H200 (bench/bench_paged_attention.py --sweep, CUDA graph replays over inputs 4x the L2, bf16,
    D = 128; bench/RESULTS.md "Tuned on the second lease"): tl.dot for every group, MHA's one query row padded to 16,
    beats the CUDA-core multiply-reduce by 1.4-1.5x (Llama-2-13B batch 64 at 384 tokens: 0.122 ms against 0.176, 97%
    of copy bandwidth; batch 8 at 4096: 0.160 against 0.234, 99%); 64-token tiles, 4 warps, 2 stages lead both MHA
    shapes, and GQA (group 8, 70B-like) runs fastest on 32-token tiles (0.0775 ms against 0.096 at 64, 81%). The tile
    holds the same bytes at other row widths: 128-byte rows (an fp8 cache) double it, 512-byte rows (fp32, or D = 256)
    halve it (down to tl.dot's 16; those widths are not measured yet).

    fuse_rope (rope_decode_attention): 1 rotates and writes the new token inside this kernel, 0 (the default) runs
    rope_write_kv's kernel first. Measured on an H200 (bench/RESULTS.md "The fused decode step"): as CUDA graph
    replays the fused step beats the two kernels at long contexts (Llama-2-13B batch 8 at 4,096 tokens 0.161 ms
    against 0.181; 70B-like GQA batch 32 at 2,048 0.079 against 0.090; batch 64 at 384 0.131 against 0.132), but in the
    13B rollouts (contexts 128-384) it lost: batch 64 13.05 ms a step against 12.91, batch 1 7.87 against 7.61 (every
    program rotates q and loads the new token before its loop: latency a short context cannot hide).

    linear (kernels/decode_linear.py, read by linear_enabled): 1 runs the decode step's projections (at most 64 rows)
    through our split-K kernel with SwiGLU fused into the gate_up projection, 0 (the default: not yet timed on a GPU)
    through cuBLAS and kernels/swiglu.py. With it, norm_rows (default _NORM_ROWS): decode steps of at most that many
    sequences also fuse each add + RMSNorm into the next projection (0: never).

    pdl (read by pdl_enabled): 1 launches every kernel of ours a decode step runs (decode_linear's projections, the
    paged attention and its merge, the rotary + cache write, RMSNorm's and SwiGLU's forwards, top-k's floor and the
    sampling) with programmatic dependent launch on sm_90+: each may start while the one before it finishes and waits
    on the device instead (dispatch.pdl_prologue), which takes the gap between them out of a decode step (~2.5 us a
    kernel boundary in the second lease's profile). RMSNorm's and SwiGLU's forwards take it in training too (the
    same wait: harmless). 0, the default, until a GPU times it.
    """
    row_bytes = block_d * elem_size
    tokens_at_256_bytes = 64 if group == 1 else 32
    block_n = min(128, max(16, tokens_at_256_bytes * 256 // row_bytes))
    return {"block_n": block_n, "num_warps": 4, "num_stages": 2, "dot_min_group": 1, "fuse_rope": 0,
            "min_split_tokens": _MIN_TOKENS_PER_SPLIT, "linear": 0, "norm_rows": _NORM_ROWS, "pdl": 0}  # fmt: skip


def linear_enabled() -> bool:
    """decode_config's `linear` switch as set_decode_config left it (kernels/decode_linear.py; default 0)."""
    return bool(_overrides.get("linear", 0))


def pdl_enabled(device, on: int | None = None) -> bool:
    """decode_config's `pdl` switch (`on`, or as set_decode_config left it: default 0), where programmatic dependent
    launch exists: a CUDA device of sm_90 or later (so never under the interpreter, whose tensors are on the CPU)."""
    if not (_overrides.get("pdl", 0) if on is None else on) or device.type != "cuda":
        return False
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_args(device, on: int | None = None) -> dict:
    """A decode-step kernel's launch keywords for the switch (pdl_enabled): its PDL constant (dispatch.pdl_prologue's
    wait and trigger) and Triton's launch_pdl, always together: a kernel launched early that did not wait would race,
    one that waits but is never launched early gains nothing."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device, on) else {"PDL": False}


def norm_rows() -> int:
    """decode_config's `norm_rows` as set_decode_config left it: the most rows whose norms fuse into a projection."""
    return _overrides.get("norm_rows", _NORM_ROWS)


def choose_num_splits(
    batch: int, kv_heads: int, max_context_len: int, block_n: int, num_sms: int,
    min_split_tokens: int = _MIN_TOKENS_PER_SPLIT,
) -> int:  # fmt: skip
    """Context splits so batch * kv_heads * splits programs fill the GPU, none shorter than min_split_tokens (the
    decode config's; 256: a guess, not swept yet, that a split must outweigh its trip through the merge kernel)."""
    programs = max(1, batch * kv_heads)
    want = -(-_PROGRAMS_PER_SM * num_sms // programs)
    most = max(1, -(-max_context_len // max(min_split_tokens, block_n)))
    return max(1, min(want, most, _MAX_SPLITS))
