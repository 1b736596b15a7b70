"""What each GPU holds for the whole run, known before anything is loaded: the four models' weights (this rank's TP
slices), the two trained models' fp32 masters and Adam moments (1/dp of them with the distributed optimizer) and
their fp32 gradients. setup() refuses a run whose fixed share does not fit before four checkpoints are read, with the
numbers and the layouts that would fit; one that fits prints what is left for the KV cache and the activations.
--eval-only plans its three frozen models (policy, reference, reward) the same way.

Also a planning tool that needs no GPU:
    python -m engine.memory_plan --policy llama2-13b --reward llama2-13b --tp 8 --dp 2 --gpu-gib 80
(a named shape, a checkpoint directory or a Hub id each, of which only config.json is fetched; the reference is
the policy's shape unless --reference).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from engine.checkpoint import check_checkpoint
from engine.config import MODEL_SHAPES, ModelConfig
from engine.dp_overlap import BUCKET_BYTES
from engine.errors import InvalidInput, MissingInput
from engine.hub import config_dir, is_repo_id, weight_patterns
from engine.kv_cache import BLOCK_SIZE, blocks_for_tokens, model_block_bytes
from engine.offload import CHUNK_ELEMENTS
from engine.parallel import shard_range, shard_rows

GiB = 2**30
FIXED_SHARE_LIMIT = 0.95  # of the free memory: the rest goes to the CUDA context, NCCL buffers and fragmentation
TRAINED = ("policy", "value")


STATE = "optimizer (masters, Adam moments)"
CHUNKS = "optimizer chunks in flight (the state in host memory)"


def fixed_bytes(
    numels: dict[str, int],
    trained: tuple[str, ...],
    dtype: torch.dtype,
    dp: int,
    distributed: bool,
    resident_chunk: int = 0,
):
    """{what: bytes} one rank holds for the whole run, given each model's parameters on the rank: every model's
    weights in `dtype`; for the trained ones the fp32 masters (none for fp32 weights, which are their own) and the
    two Adam moments, split over the `dp` ranks with the distributed optimizer, and the fp32 gradients summed over a
    step's micro-batches (every trained model's whole; with the distributed optimizer one model's whole at a time,
    the others' reduce-scattered into their 1/dp shards: engine.trainer.train_step). `resident_chunk`: the state
    lives in host memory (--offload-optimizer always) and an update holds three chunks of this many elements on
    the device (one updated, one coming in, one going out)."""
    elt = torch.empty((), dtype=dtype).element_size()
    sharded = distributed and dp > 1
    # fp32 masters of their own (none for fp32 weights, unless the distributed optimizer shards them) + two moments
    per_elt = 8 if dtype == torch.float32 and not sharded else 12
    out = {f"weights ({name})": n * elt for name, n in numels.items()}

    def shard(n: int) -> int:  # elements of a model's n a rank holds: with the distributed optimizer, 1/dp of each
        # bucket (about BUCKET_BYTES of fp32 grads, at most 2 n / cap + 1 of them) padded to a multiple of dp
        return -(-n // dp) + 2 * -(-n * 4 // BUCKET_BYTES) + 1 if sharded else n

    state = sum(shard(numels[m]) for m in trained) * per_elt
    if resident_chunk:  # (never more than the whole state: a small model's chunks are its tensors)
        out[CHUNKS] = min(3 * per_elt * resident_chunk, state)
    elif trained:
        out[STATE] = state
    grads = [numels[m] * 4 for m in trained]
    if grads:  # (none to hold for an evaluation's frozen models)
        out["fp32 gradients"] = max(grads) + sum(shard(numels[m]) * 4 for m in trained) if sharded else sum(grads)
    return out


def _describe(parts: dict[str, int], free: int) -> str:
    used = sum(parts.values())
    items = ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items())
    return f"{used / GiB:.1f} GiB of {free / GiB:.1f} GiB free per GPU ({items})"


def generation_reserve(
    config: ModelConfig, tp: int, seq_len: int, dtype: torch.dtype, max_num_seqs: int = 256, batched_tokens: int = 8192
) -> int:
    """Bytes the generator keeps free beside its KV cache for its largest step's activations (it measures them on the
    GPU, engine.generate.Generator._measure_activation_peak; this estimates them from the shapes): a prefill of
    max(batched_tokens, seq_len) tokens with a decode token of every other sequence, each token's hidden state,
    residual, q/k/v, attention output and MLP activations of one layer at a time, and the sampled rows' logits."""
    elt = torch.empty((), dtype=dtype).element_size()
    c = config
    tokens = max(batched_tokens, seq_len) + max_num_seqs
    per_token = (
        4 * c.hidden_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim // tp + 3 * c.intermediate_size // tp
    )
    return tokens * per_token * elt + max_num_seqs * shard_rows(c.vocab_size, tp) * (elt + 4)


def cache_tokens(
    config: ModelConfig,
    tp: int,
    held: int,
    total: int,
    fraction: float,
    seq_len: int,
    kv_dtype,
    reserve: int = 0,
    max_num_seqs: int | None = None,
    fixed: int = 0,
) -> tuple[int, int]:
    """(bytes, tokens) of a rollout's KV cache (engine.kv_cache.cuda_cache_budget: `fraction` of the GPU's `total`
    memory less what is held then, the weights and optimizer state and what was in use before they were loaded, and
    the generator's activation `reserve`), in whole blocks of BLOCK_SIZE tokens as the generator allocates it, and at
    most max_num_seqs sequences of seq_len, each in whole blocks (the generator allocates no more than its slots can
    fill). `fixed` (--kv-cache-mb, bytes): that budget whatever is held, as the generator takes it; none (0, 0) where
    it would not fit beside what is held and the reserve (its allocation would run out of memory)."""
    per_block = model_block_bytes(config, tp, kv_dtype)
    if fixed:
        blocks = fixed // per_block if fixed <= total - held - reserve else 0
    else:
        blocks = max(0, int(total * fraction) - held - reserve) // per_block
    if max_num_seqs is not None:
        blocks = min(blocks, max_num_seqs * blocks_for_tokens(seq_len))
    return blocks * per_block, blocks * BLOCK_SIZE


def rollout_cache(config: ModelConfig, tp: int, held: int, total: int, fraction: float, seq_len: int, kv_dtype,
                  reserve: int = 0, max_num_seqs: int | None = None, fixed: int = 0) -> str:  # fmt: skip
    """What a rollout's KV cache gets (cache_tokens) in tokens and in sequences of `seq_len` tokens."""
    budget, tokens = cache_tokens(config, tp, held, total, fraction, seq_len, kv_dtype, reserve, max_num_seqs, fixed)
    if fixed and not tokens:
        room = max(0, total - held - reserve)
        return f"no room for --kv-cache-mb's {fixed / GiB:.1f} GiB of KV cache ({room / GiB:.1f} GiB free then)"
    sequences = tokens // (blocks_for_tokens(seq_len) * BLOCK_SIZE)  # (each in whole blocks)
    how = " (--kv-cache-mb)" if fixed else ""
    return f"a KV cache of {budget / GiB:.1f} GiB{how}, {tokens:,} tokens ({sequences} sequences of {seq_len})"


def check_tp(configs: dict[str, tuple[ModelConfig, str]], tp: int) -> None:
    """Refuse a TP degree that does not divide every model's heads, key/value heads and MLP width (a vocabulary it
    need not divide is padded, engine.parallel.shard_rows, unless a rank would hold none of it)."""
    for name, (c, _) in configs.items():
        for what, n in (("attention heads", c.num_heads), ("key/value heads", c.num_kv_heads),
                        ("MLP width", c.intermediate_size)):  # fmt: skip
            if tp < 1 or n % tp:
                raise InvalidInput(f"--tp {tp} does not divide the {name} model's {what} ({n})")
        shard_range(c.vocab_size, tp, 0, f"the {name} model's vocabulary")


def _tp_lays_out(configs: dict[str, tuple[ModelConfig, str]], tp: int) -> bool:
    """Whether check_tp takes this degree (a layout to suggest)."""
    try:
        check_tp(configs, tp)
    except InvalidInput:
        return False
    return True


def host_available() -> int:
    """Bytes of host memory available now: MemAvailable (free plus reclaimable page cache), or less where a cgroup of
    this process (a container, a job's allocation, or one above it) has a limit: its limit less what it uses, its
    reclaimable page cache not counted as used."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = _cgroup_room()
    return available if room is None else max(0, min(available, room))


def _cgroup_room() -> int | None:
    """The least (limit - usage + inactive page cache) over this process's memory cgroup and those above it (v2, or
    v1's memory controller), or None where none has a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v2 = ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file")
    v1 = ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        layout = v2 if controllers == "" else v1 if "memory" in controllers.split(",") else None
        if layout is None:
            continue
        root, limit_name, usage_name, cache_name = layout
        parts = [x for x in path.split("/") if x]
        for depth in range(len(parts), -1, -1):  # this cgroup, then each one above it
            where = os.path.join(root, *parts[:depth])
            try:
                with open(os.path.join(where, limit_name)) as f:
                    limit = f.read().strip()
                with open(os.path.join(where, usage_name)) as f:
                    used = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if not limit.isdigit() or int(limit) >= 2**60:  # ("max", or v1's huge number: no limit here)
                continue
            cache = 0
            try:
                with open(os.path.join(where, "memory.stat")) as f:
                    for stat in f:
                        key, _, value = stat.partition(" ")
                        if key == cache_name:
                            cache = int(value)
            except (OSError, ValueError):
                pass
            room = int(limit) - used + cache
            best = room if best is None else min(best, room)
    return best


OFFLOAD_SETTINGS = ("auto", "off", "rollouts", "always")


IDLE_MODEL_SETTINGS = ("auto", "off", "rollouts")  # --offload-idle-models (no "always": scoring runs them)


def check_offload_setting(setting: str, flag: str = "--offload-optimizer") -> None:
    allowed = IDLE_MODEL_SETTINGS if flag == "--offload-idle-models" else OFFLOAD_SETTINGS
    if setting not in allowed:
        raise InvalidInput(f"{flag} must be one of {', '.join(allowed)}, got {setting!r}")


HOST_LIMIT = 0.9  # of the available host memory that the offloaded state may take


def local_ranks() -> int:
    """This node's ranks (torchrun's LOCAL_WORLD_SIZE): they share its host memory."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_host_room(
    state: int,
    ranks: int,
    host: int,
    how: str,
    what: str = "optimizer state",
    flag: str = "--offload-optimizer",
    distributed: bool = True,
) -> None:
    """Refuse the optimizer state (or `what`: `state` bytes per rank, `ranks` ranks on the node) to be put in host
    memory (`flag` `how`: the setting that puts it there) where it would take more than HOST_LIMIT of what the host has
    available; the way out named is one that shrinks it (`distributed`: the optimizer is sharded over the DP ranks, so
    more of them would; without it, more would not)."""
    if ranks * state > HOST_LIMIT * host:
        shards = ""
        if what == "optimizer state":
            shards = (
                " or more data-parallel ranks (the distributed optimizer shards the state)"
                if distributed
                else " or --distributed-optimizer with data-parallel ranks (it shards the state over them)"
            )
        raise InvalidInput(
            f"the {what} in host memory ({flag} {how}) needs {ranks * state / GiB:.1f} GiB of "
            f"host memory for {ranks} rank(s) on this node, {host / GiB:.1f} available: use fewer ranks per node, a "
            f"larger --tp{shards}" + (f", or {flag} off" if how in ("rollouts", "always") else "")
        )  # fmt: skip


OFFLOAD_HOST_SHARE = 0.5  # auto offloads when every local rank's state takes at most this share of the free host RAM


def offload_decision(
    setting: str,
    device: torch.device,
    state: int,
    local_ranks: int,
    seqs: tuple[int, int],
    wanted: int,
    host: int,
    what: str = "optimizer state",
    flag: str = "--offload-optimizer",
    distributed: bool = True,
) -> tuple[bool, str]:
    """Whether the trained models' optimizer state (`state` bytes per GPU) is in host memory during rollouts
    (--offload-optimizer auto|off|rollouts|always; always: it lives there, engine.optim's host_resident), and a
    line saying why. `seqs`: the full-length sequences a rollout's KV cache holds without and with it; `wanted`: how
    many the generator would decode together (its max_num_seqs, or the rank's rollout if fewer); `host`: host memory
    available, shared by `local_ranks` ranks. auto offloads on a GPU when the cache cannot hold `wanted` sequences
    otherwise and the host has room for it (OFFLOAD_HOST_SHARE); setup() has turned auto into always already where
    the state fits nowhere else. The same rules decide --offload-idle-models (`what` and `flag` name it: the weights
    of the models a rollout does not run)."""
    check_offload_setting(setting, flag)
    need = state * local_ranks
    room = f"{need / GiB:.1f} GiB of host memory for {local_ranks} rank(s) on this node, {host / GiB:.1f} available"
    gain = f"the rollouts' KV cache holds {seqs[1]} instead of {seqs[0]} full-length sequences"
    if device.type != "cuda":
        if setting in ("rollouts", "always") and state:
            return True, f"{what}: in other host memory ({setting}; on CPU this frees nothing)"
        return False, f"{what}: in place throughout (on CPU)"
    if setting == "off" or state == 0:
        return False, f"{what}: on the GPU throughout"
    if setting == "always":  # (built there already: the plan checked the host's room before anything was loaded)
        return True, f"{what}: {state / GiB:.1f} GiB per GPU in host memory, updated in chunks"
    if setting == "rollouts":
        check_host_room(state, local_ranks, host, setting, what, flag, distributed)
        return True, f"{what}: {state / GiB:.1f} GiB per GPU in host memory during rollouts ({gain}; {room})"
    if seqs[0] >= wanted:
        return False, f"{what}: on the GPU throughout (the rollouts' KV cache holds {seqs[0]} sequences)"
    if seqs[1] <= seqs[0]:
        return (
            False,
            f"{what}: on the GPU throughout (offloading would not enlarge the KV cache: --kv-cache-mb fixes it)",
        )
    if need > OFFLOAD_HOST_SHARE * host:
        return False, f"{what}: on the GPU throughout (offloading would take {room})"
    return True, f"{what}: {state / GiB:.1f} GiB per GPU in host memory during rollouts ({gain}; {room})"


def plan(
    configs: dict[str, tuple[ModelConfig, str]],
    dtype: torch.dtype,
    tp: int,
    dp: int,
    distributed: bool,
    free: int,
    cache: dict | None = None,
    resident: bool = False,
    trained: tuple[str, ...] = TRAINED,
) -> str:
    """The plan's line for models {name: (config, head)} (the trained ones named "policy" and "value") on a rank of
    a dp x tp grid with `free` bytes, or ValueError naming the numbers and, when it does not fit, the next TP degree
    (one that divides the heads and MLP), with the distributed optimizer the DP size, and the optimizer
    state in host memory (--offload-optimizer always), that would. `cache` (rollout_cache's total, fraction,
    seq_len, kv_dtype) adds what the rollouts' KV cache gets. `resident`: the state lives in host memory. `trained`:
    the models with an optimizer; none for --eval-only (its policy, reference and reward model are frozen)."""
    trained = tuple(m for m in trained if m in configs)
    check_tp(configs, tp)

    def parts_at(t: int, d: int, host: bool = resident) -> dict[str, int]:
        chunk = 0
        if host:  # a chunk: CHUNK_ELEMENTS or the largest tensor of this rank (the vocabulary or the MLP's)
            chunk = max(CHUNK_ELEMENTS, *(c.hidden_size * max(shard_rows(c.vocab_size, t), 2 * c.intermediate_size // t)
                                          for c, _ in configs.values()))  # fmt: skip
        numels = {k: c.num_params(head, t) for k, (c, head) in configs.items()}
        return fixed_bytes(numels, trained, dtype, d, distributed, chunk)

    fits = lambda parts: sum(parts.values()) <= FIXED_SHARE_LIMIT * free  # noqa: E731
    parts = parts_at(tp, dp)
    if fits(parts):
        left = (free - sum(parts.values())) / GiB
        line = f"memory plan: {_describe(parts, free)}; {left:.1f} GiB left for KV cache and activations"
        if cache:  # during a rollout the grads are freed: the weights and the optimizer state are held
            weights = sum(v for k, v in parts.items() if k.startswith("weights"))
            in_use = max(0, cache["total"] - free)  # (before loading: the CUDA context, other processes)
            at = lambda held: rollout_cache(configs["policy"][0], tp, held + in_use, **cache)  # noqa: E731
            own = parts["weights (policy)"]  # (what generation runs)
            if cache_tokens(configs["policy"][0], tp, own + in_use, **cache)[1] < cache["seq_len"]:
                how = "a larger --tp splits every model" + ("; or another --kv-cache-mb" if cache.get("fixed") else "")
                raise InvalidInput(
                    f"{line}; but a rollout's KV cache would not hold one sequence of {cache['seq_len']} tokens, even "
                    f"with every other model in host memory: {at(own)} ({how})"
                )
            idle = f"the idle models' weights (--offload-idle-models rollouts, {(weights - own) / GiB:.1f} GiB per GPU)"
            if resident or not trained:
                return line + f"; rollouts: {at(weights)}; with {idle} in host memory: {at(own)}"
            state = parts[STATE]
            line += f"; rollouts: {at(weights + state)}; with the optimizer state in host memory (--offload-optimizer "
            line += f"rollouts, {state / GiB:.1f} GiB per GPU): {at(weights)}; with {idle} too: {at(own)}"
        return line
    alternatives = []
    for t in (2 * tp, 4 * tp, 8 * tp):
        if _tp_lays_out(configs, t) and fits(parts_at(t, dp)):
            alternatives.append(f"--tp {t}")
            break
    for d in (2 * dp, 4 * dp, 8 * dp, 16 * dp) if distributed and trained else ():
        if fits(parts_at(tp, d)):
            alternatives.append(f"{d} data-parallel ranks of --tp {tp} ({d * tp} GPUs)")
            break
    if trained and not resident and fits(parts_at(tp, dp, host=True)):
        alternatives.append("--offload-optimizer always (the optimizer state in host memory)")
    hint = f"; it would fit with {' or '.join(alternatives)}" if alternatives else ""
    if not trained:
        raise InvalidInput(
            f"the models need {_describe(parts, free)}: more than {FIXED_SHARE_LIMIT:.0%} of the free memory, before "
            f"any KV cache or activation{hint} (a larger --tp splits every model)"
        )
    raise InvalidInput(
        f"the models and optimizer state need {_describe(parts, free)}: more than {FIXED_SHARE_LIMIT:.0%} of the "
        f"free memory, before any KV cache or activation{hint} (a larger --tp splits every model; more "
        "data-parallel ranks with --distributed-optimizer split the optimizer state)"
    )


def plan_for(
    setting: str, configs, dtype, tp, dp, distributed, free, cache=None, host=None, local_ranks=1, idle_models="off",
    evaluation: bool = False,
):  # fmt: skip
    """(plan()'s line, whether the optimizer state lives in host memory) under --offload-optimizer `setting`: always
    plans it there; auto does so only where the layout fits no other way, and says so. With `host` (bytes of host
    memory available to the node's `local_ranks` ranks) a state to be put there that the host cannot hold is
    refused, and so are the idle models' weights with --offload-idle-models `idle_models` rollouts. `evaluation`:
    --eval-only's frozen models (run_configs(evaluation=True)), no optimizer state whatever `setting` says."""
    check_offload_setting(setting)
    if evaluation:
        setting = "off"
    args = (configs, dtype, tp, dp, distributed, free, cache)
    trained = () if evaluation else TRAINED
    if setting == "always":
        line, resident = plan(*args, resident=True, trained=trained), True
    else:
        try:
            line, resident = plan(*args, trained=trained), False
        except ValueError as e:
            if setting != "auto":
                raise
            try:
                line, resident = plan(*args, resident=True, trained=trained), True
            except ValueError:
                raise e from None
            line += " (--offload-optimizer auto: always, the only way this layout fits)"
    numels = {k: c.num_params(head, tp) for k, (c, head) in configs.items()}
    if host is not None and (resident or setting == "rollouts"):
        state = fixed_bytes(numels, TRAINED, dtype, dp, distributed)[STATE]
        how = "auto: always, the only way this layout fits the GPUs" if setting == "auto" else setting
        check_host_room(state, local_ranks, host, how, distributed=distributed)
        host -= state * local_ranks
    idle = sum(n for k, n in numels.items() if k != "policy") * torch.empty((), dtype=dtype).element_size()
    if host is not None and idle_models == "rollouts":
        check_host_room(idle, local_ranks, host, "rollouts", "idle models' weights", "--offload-idle-models")
    if cache is not None:  # a rollout must hold one sequence with what these settings keep on the GPU then
        parts = fixed_bytes(numels, trained, dtype, dp, distributed)
        weights, state = sum(v for k, v in parts.items() if k.startswith("weights")), parts.get(STATE, 0)
        # auto moves the optimizer state out for rollouts only where the host has room (offload_decision), and the
        # idle models' weights then get what room is left
        # (auto yields to an explicit --offload-idle-models rollouts, as decide_offload does: the host memory left)
        # (a fixed --kv-cache-mb: auto moves nothing, as offloading would not enlarge the cache: offload_decision)
        room = None if host is None else host - (idle * local_ranks if idle_models == "rollouts" else 0)
        fixed = cache.get("fixed", 0)
        state_moved = (
            resident
            or setting == "rollouts"
            or (setting == "auto" and not fixed and (room is None or state * local_ranks <= OFFLOAD_HOST_SHARE * room))
        )
        if host is not None and setting == "auto" and state_moved and not resident:
            host -= state * local_ranks
        moved = idle_models == "rollouts" or (
            idle_models == "auto" and not fixed and (host is None or idle * local_ranks <= OFFLOAD_HOST_SHARE * host)
        )
        held = weights - (idle if moved else 0) + (0 if state_moved else state) + max(0, cache["total"] - free)
        if cache_tokens(configs["policy"][0], tp, held, **cache)[1] < cache["seq_len"]:
            no_room = [what for what, lacks in (("the optimizer state", setting == "auto" and not state_moved),
                                                ("the idle models' weights", idle_models == "auto" and not moved))
                       if lacks]  # fmt: skip
            raise InvalidInput(
                f"{line}; but a rollout's KV cache would not hold one sequence of {cache['seq_len']} tokens with what "
                f"--offload-optimizer {setting} and --offload-idle-models {idle_models} keep on the GPU"
                + (f" (the host has no room for {' and '.join(no_room)})" if no_room else "")
                + ": a larger --tp splits every model"
                + ("; or another --kv-cache-mb" if fixed else "")
                + (
                    "; --offload-idle-models rollouts puts the idle models' weights in host memory"
                    if idle_models == "off"
                    else ""
                )
            )
    return line, resident


def run_configs(policy, reference, reward, evaluation: bool = False) -> dict[str, tuple[ModelConfig, str]]:
    """The four models of a run from their checkpoint directories (config.json only) or named shapes; `evaluation`:
    --eval-only's three (no value model)."""

    def load(src: str) -> ModelConfig:
        if os.path.isdir(src):
            return ModelConfig.from_hf(src)
        if src in MODEL_SHAPES:
            return ModelConfig.named(src)
        raise MissingInput(f"checkpoint directory {src} does not exist")

    lm, rm = load(policy), load(reward)
    configs = {"policy": (lm, "lm"), "reference": (load(reference) if reference else lm, "lm"),
               "value": (rm, "score"), "reward": (rm, "score")}  # fmt: skip
    if evaluation:
        del configs["value"]
    return configs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    shapes = f"a named shape ({', '.join(MODEL_SHAPES)}), a checkpoint directory or a Hub id"
    # (the defaults are the recipe's: a --policy given alone is planned beside the recipe's 13B reward model)
    p.add_argument("--policy", default="llama2-13b", help=f"{shapes} (default: llama2-13b)")
    p.add_argument("--reference", default=None, help=f"{shapes} (default: the policy's)")
    p.add_argument(
        "--reward", default="llama2-13b", help=f"{shapes}; the value model has its shape (default: llama2-13b)"
    )
    p.add_argument("--tp", type=int, default=8, help="tensor parallel degree (default: 8)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel ranks (default: 1)")
    p.add_argument("--no-distributed-optimizer", dest="distributed", action="store_false")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--gpu-gib", type=float, default=79.0, help="memory per GPU (default: 79, an H100 80GB's)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--kv-cache-fraction", type=float, default=0.9)
    p.add_argument(
        "--seq-len", type=int, default=None, help="prompt + response tokens (default 2048: the recipe's 1024 + 1024)"
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=256, help="sequences the generator decodes together at most (default: 256)"
    )
    p.add_argument("--kv-cache-mb", type=int, default=0, help="a fixed KV cache budget in MiB, as train_ppo.py's "
                   "(default: 0, --kv-cache-fraction's)")  # fmt: skip
    p.add_argument("--offload-optimizer", default="auto", choices=OFFLOAD_SETTINGS)
    p.add_argument("--eval-only", action="store_true", help="plan --eval-only: policy, reference and reward model")
    a = p.parse_args(argv)
    given_len, a.seq_len = a.seq_len is not None, 2048 if a.seq_len is None else a.seq_len
    for flag, value in (("--tp", a.tp), ("--dp", a.dp), ("--seq-len", a.seq_len), ("--max-num-seqs", a.max_num_seqs)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if not 0 < a.kv_cache_fraction <= 1:
        p.error(f"--kv-cache-fraction must be in (0, 1], got {a.kv_cache_fraction}")
    if a.kv_cache_mb < 0:
        p.error(f"--kv-cache-mb must be >= 0, got {a.kv_cache_mb}")
    if not 0 < a.gpu_gib < float("inf"):
        p.error(f"--gpu-gib must be a positive number, got {a.gpu_gib}")
    if a.dtype == "float16" and not a.eval_only:  # (as train_ppo refuses it: no loss scaling)
        p.error("--dtype float16 trains without loss scaling, which train_ppo.py refuses; plan bfloat16 or float32 "
                "(float16 serves --eval-only)")  # fmt: skip
    names = {}
    for src in (a.policy, a.reference, a.reward):
        if src and src not in MODEL_SHAPES and not os.path.isdir(src):
            if not is_repo_id(src):
                p.error(f"{src} is neither {shapes}")
            try:
                names[src] = config_dir(src)
            except Exception as e:  # (offline and not cached, a typo, a gated repo)
                p.error(f"{src}: its config.json could not be fetched from the Hugging Face Hub ({type(e).__name__})")
    try:
        configs = run_configs(*(names.get(x, x) for x in (a.policy, a.reference, a.reward)), evaluation=a.eval_only)
    except (ValueError, FileNotFoundError) as e:  # (an unsupported config.json, a directory without one)
        p.error(str(e))
    for role, src in (("policy", a.policy), ("reference", a.reference), ("reward", a.reward)):
        # (weights there, not a config.json alone: a shape to plan; a causal LM as --reward planned a score head)
        if src and os.path.isdir(src) and weight_patterns(os.listdir(src)):
            try:  # (the weight files' headers alone: a run checks its checkpoints so before it loads one)
                check_checkpoint(src, "score" if role == "reward" else "lm")
            except (ValueError, FileNotFoundError) as e:
                p.error(f"--{role}: {e}")
    for name, (c, _) in configs.items():  # (train_ppo refuses these limits for such a model)
        if a.seq_len > c.max_position_embeddings:
            flag = f"--seq-len {a.seq_len}" if given_len else f"--seq-len's default, {a.seq_len} (the recipe's),"
            p.error(f"{flag} is longer than the {name} model's context ({c.max_position_embeddings} tokens, its "
                    "max_position_embeddings): give the --seq-len its run will use")  # fmt: skip
    try:  # (a usage error, as in train_ppo: the degrees that do lay these models out are named)
        check_tp(configs, a.tp)
    except InvalidInput as e:
        fits = [t for t in (1, 2, 4, 8, 16) if _tp_lays_out(configs, t)]  # (1 always: a head divides by 1)
        named = f"{', '.join(map(str, fits[:-1]))} or {fits[-1]}" if len(fits) > 1 else str(fits[0])
        p.error(f"{e}; --tp {named} divides them")
    dtype, gpu = getattr(torch, a.dtype), int(a.gpu_gib * GiB)
    kv_dtype = torch.float8_e4m3fn if a.kv_cache_dtype == "fp8" else dtype
    reserve = generation_reserve(configs["policy"][0], a.tp, a.seq_len, dtype, a.max_num_seqs)
    cache = {
        "total": gpu,
        "fraction": a.kv_cache_fraction,
        "seq_len": a.seq_len,
        "kv_dtype": kv_dtype,
        "reserve": reserve,
        "max_num_seqs": a.max_num_seqs,
        "fixed": a.kv_cache_mb * 2**20,
    }
    try:
        print(plan_for(a.offload_optimizer, configs, dtype, a.tp, a.dp, a.distributed, gpu, cache,
                       idle_models="auto", evaluation=a.eval_only)[0])  # fmt: skip
    except ValueError as e:
        print(e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
