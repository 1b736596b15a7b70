"""The checks a run passes before any weight is read, and the device and dtype its flags name: the batch sizes, the
paths, the checkpoints (config.json, the weight files' headers) against their roles, the tokenizer and prompts read
and checked against the models' shapes and the flags, a fixed KV cache, and on a GPU the memory plan. engine/state.py's
setup() and setup_evaluation() run them (those that read files under distributed.together, every rank at once); the
benches take the device and dtype from here too.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from engine import memory_plan
from engine.checkpoint import check_checkpoint, generation_eos_ids, weights_fingerprint
from engine.config import ModelConfig, PPOConfig
from engine.data import check_fills_a_rollout, prompts_digest
from engine.distributed import ProcessGrid, agree, print0, together
from engine.errors import InputError, InvalidInput, MissingInput, named
from engine.hub import RUN_FIELDS, config_sources, is_repo_id, model_dirs
from engine.kv_cache import BLOCK_SIZE, blocks_for_tokens, model_block_bytes, resolve_cache_dtype
from engine.tokenizer import PromptSet, check_vocabularies, load_prompts, load_tokenizer
from kernels.rope_attention import SUPPORTED_HEAD_DIMS

if TYPE_CHECKING:
    from engine.state import RunConfig


def resolve_device(name: str, grid: ProcessGrid) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(f"--device {name}, but torch sees no CUDA device (a CPU build of torch, or no GPU visible)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "cuda":
        return torch.device("cuda", local)
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        if grid.world_size > 1 and device.index != local:
            raise InvalidInput(
                f"--device {name} under torchrun: each process uses the GPU of its LOCAL_RANK ({local} here; every "
                "rank on one GPU would fail in its first collective); pass --device cuda, and choose the GPUs with "
                "CUDA_VISIBLE_DEVICES"
            )
        torch.cuda.set_device(device)  # (what the collectives and the memory queries take as this rank's GPU)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def device_error(device: str) -> str | None:
    """Why a --device cannot be run (None if it can): auto, cpu, cuda or cuda:N (train_ppo.py's and the benches')."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        return f"device must be auto, cpu, cuda or cuda:N, got {device!r}"
    return None


def check_batch_sizes(cfg: PPOConfig, grid: ProcessGrid, warn: bool = True) -> None:
    """Refuse batch sizes the rollout or the DP size cannot split; `warn`: say when a rank's share of a minibatch
    splits a prompt's samples."""
    seqs = cfg.rollout_sequences
    if seqs % cfg.train_batch_size:
        raise InvalidInput(f"rollout of {seqs} sequences is not a multiple of train_batch_size {cfg.train_batch_size}")
    if cfg.train_batch_size % grid.dp or cfg.rollout_batch_size % grid.dp:
        raise InvalidInput(f"train and rollout batch sizes must be multiples of the data-parallel size {grid.dp}")
    if warn and grid.dp > 1 and (cfg.train_batch_size // grid.dp) % cfg.samples_per_prompt:
        print0(
            f"warning: a rank's share of a minibatch ({cfg.train_batch_size // grid.dp} sequences) does not hold "
            f"whole prompts' {cfg.samples_per_prompt} samples: the minibatches differ from one process's (a run on "
            "another number of ranks trains on other minibatches)"
        )


def check_generator_slots(cfg: PPOConfig, run: RunConfig) -> None:
    """--samples-per-prompt within the generator's slots; a --micro-batch-tokens below one sequence's length said (a
    longer sequence is a micro-batch of its own: the memory plan counts it, but the bound given is not the bound)."""
    if cfg.samples_per_prompt > run.gen_max_num_seqs:  # (a prompt's samples decode together)
        raise InvalidInput(
            f"--samples-per-prompt {cfg.samples_per_prompt} exceeds --gen-max-num-seqs {run.gen_max_num_seqs}: the "
            "samples of a prompt are decoded together"
        )
    longest = cfg.max_prompt_len + cfg.max_new_tokens
    if run.micro_batch_tokens < longest:
        print0(f"warning: --micro-batch-tokens {run.micro_batch_tokens} is below one sequence's length (up to "
               f"--max-prompt-len + --max-new-tokens = {longest} tokens): a longer sequence is a micro-batch of "
               "its own")  # fmt: skip


def run_iterations(prompts: int, cfg: PPOConfig, run: RunConfig) -> int:
    """Rollouts the run makes: every prompt epoch's full batches (PromptBatches), or --max-iterations of them."""
    total = prompts // cfg.rollout_batch_size * cfg.prompt_epochs
    return min(run.max_iterations, total) if run.max_iterations else total


def check_profile_iteration(run: RunConfig, iterations: int) -> None:
    """--profile-iteration past the run's last iteration would profile nothing, silently."""
    if run.profile_iteration > iterations:
        raise InvalidInput(
            f"--profile-iteration {run.profile_iteration} is past the run's last iteration ({iterations}): "
            "it would profile nothing"
        )


READING_INPUTS = "reading the tokenizer and prompts"  # (what together names for read_inputs)


def check_attention_backend(device: torch.device) -> None:
    """TULU_PPO_ATTENTION=flash: flash-attn installed where it runs (a GPU), checked before any weight is read, not at
    the first training forward after a rollout; on a CPU it has nothing to run, which is said."""
    from engine.model import attention_backend, flash_attn_varlen
    from kernels.dispatch import switch_problem

    if why := switch_problem("TULU_PPO_ATTENTION"):  # (the command lines said so first; main() called from code too)
        raise InvalidInput(why)
    if attention_backend() != "flash":
        return
    if device.type == "cuda":
        flash_attn_varlen()
    else:
        print0(f"warning: TULU_PPO_ATTENTION=flash runs flash-attn on a GPU; on {device.type} it is ignored")


def read_inputs(cfg: PPOConfig, run: RunConfig, light: RunConfig, grid: ProcessGrid, device: torch.device,
                training: bool = True):  # fmt: skip
    """(tokenizer, training prompts or None, evaluation prompts or None): the tokenizer and the prompt files read and
    tokenised, and checked with the checkpoints' config.json (`light`: resolve_run's without weights) against the
    flags, before any weight is read; `training`: with the training prompts (--eval-only has none). No collective:
    setup runs it under together, since every file here may lie on a node's own disk (the tiny default's tokenizer
    and prompts are in each node's copy of the engine) and one that differs there fails on that node alone."""
    check_attention_backend(device)
    tokenizer_dir = light.tokenizer or light.policy
    tokenizer = load_tokenizer(tokenizer_dir)
    prompt_set = None
    if training:
        prompt_set = load_prompts(
            run.prompts, tokenizer, cfg.max_prompt_len, verbose=grid.rank == 0, template=run.chat_template
        )
    prompt_set, eval_set = evaluation_set(cfg, run, grid, tokenizer, prompt_set)
    check_tokenizer(light, tokenizer, tokenizer_dir, prompt_set, eval_set)
    check_context(light, cfg, grid)
    check_kv_cache_mb(light, cfg, grid, device)
    if training:
        check_fills_a_rollout(len(prompt_set.prompts), cfg.rollout_batch_size)
        check_profile_iteration(run, run_iterations(len(prompt_set.prompts), cfg, run))
    return tokenizer, prompt_set, eval_set


def check_same_prompts(run: RunConfig, prompt_set: PromptSet | None, eval_set: PromptSet | None) -> None:
    """Every rank tokenised the same prompts (a collective, after read_inputs): a node whose copy of a prompt file (or
    of the tokenizer) differs, stale or half copied, would deal its share of each rollout from another list and plan
    another number of iterations: the ranks' updates mixed in silence until the one with fewer left the others
    waiting in a collective. Refused on every rank, naming the flag, the ranks and their counts."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = [(len(s.prompts), prompts_digest(s.prompts)) if s is not None else None for s in (prompt_set, eval_set)]
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    held_out = f"--eval-holdout {run.eval_holdout} (of --prompts {run.prompts})"
    names = (f"--prompts {run.prompts}", f"--eval-prompts {run.eval_prompts}" if run.eval_prompts else held_out)
    count = lambda got: got[0] if got else 0  # noqa: E731
    for k, flag in enumerate(names):
        other = [r for r, got in enumerate(seen) if got[k] != seen[0][k]]
        if other:
            counts = ", ".join(f"rank {r}'s {count(seen[r][k])}" for r in other)
            raise InvalidInput(
                f"{flag}: rank{'s' if len(other) > 1 else ''} {', '.join(map(str, other))} tokenised other prompts "
                f"than rank 0 ({counts} against rank 0's {count(seen[0][k])}): a copy of the file, or of the "
                "tokenizer, that differs between nodes (stale, or still being copied)? every node must read the same"
            )


def check_paths(run: RunConfig) -> None:
    """Each checkpoint and tokenizer named is a directory or a Hub id (engine.hub fetches or names those), a local
    checkpoint's config.json one this engine runs, and each prompt file a file, checked first: a path that is none of
    these, or a config.json cut short, would otherwise be reported by the first reader of it (the memory plan's, on a
    GPU, or the tokenizer check's), without the flag that named it."""
    for name in RUN_FIELDS:
        path = getattr(run, name)
        if path and not os.path.isdir(path) and not is_repo_id(path):
            what = "tokenizer" if name == "tokenizer" else "checkpoint"
            hint = f": name the directory that holds it, {os.path.dirname(path) or '.'}" if os.path.isfile(path) else ""
            if os.path.islink(path) and not os.path.exists(path):  # (a broken link: not asked of the Hub either)
                hint = f": a broken symbolic link to {os.readlink(path)}"
            raise MissingInput(
                f"--{name} {path}: no such directory (a local {what} directory or a Hugging Face Hub id){hint}"
            )
        if path and name != "tokenizer" and os.path.isdir(path):
            try:
                ModelConfig.from_hf(path)
                generation_eos_ids(path)  # (where a rollout stops: read after the weights otherwise)
            except InputError as e:  # (only the checks' own findings: any other error is a fault, with its traceback)
                raise named(e, f"--{name}") from e
    for name in ("prompts", "eval_prompts"):
        path = getattr(run, name)
        if path and not os.path.isfile(path):
            flag = "--" + name.replace("_", "-")
            why = "a directory, not a JSONL file" if os.path.isdir(path) else "no such file"
            if os.path.exists(path) and not os.path.isdir(path):  # (every rank reads the file)
                why = ("not a regular file (a pipe or a device: <(zcat f.jsonl.gz), say): every rank reads the prompt "
                       "file, so write it out first (zcat f.jsonl.gz > f.jsonl)")  # fmt: skip
            raise MissingInput(f"{flag} {path}: {why}")


def check_checkpoints(sources: dict[str, tuple[str, str, str]]) -> None:
    """Every checkpoint of model_sources against its role, from config.json and the weight files' headers
    (engine.checkpoint.check_checkpoint): before an output directory given --overwrite-output-dir is cleared and
    before any weight is read, so a reward model saved as a causal LM or with two labels is refused in seconds, not
    after the policy's and the reference's weights (52 GB at 13B), and the old run is still there."""
    together("checking the checkpoints", _check_each, sources)  # (a rank whose copy differs: none waits)
    check_same_weights(sources)


def check_same_weights(sources: dict[str, tuple[str, str, str]]) -> None:
    """Every node holds the same weights for each checkpoint of model_sources (a collective; runs over several nodes
    only): each node's local rank 0 takes their fingerprints (engine.checkpoint.weights_fingerprint: the first rows
    of each tensor, ~20 MB at 13B) and a node whose copy differs (stale, or copied halfway on its own disk) is refused
    on every rank, naming the flag and the ranks, rather than trained with another model than the others (its TP
    shards, or its data-parallel replica's, diverging in silence)."""
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) >= world:  # (one node: every rank reads the same files)
        return
    # in one order on every rank (the reward model before the value model it starts, as above), each directory read
    # once (the policy's, the reference's by default)
    roles = sorted(sources.items(), key=lambda item: item[0] == "value")

    def fingerprints() -> list[str]:
        of: dict[str, str] = {}
        for _, (_, path, _) in roles:
            if path not in of:
                of[path] = weights_fingerprint(path)
        return [of[path] for _, (_, path, _) in roles]

    reads = os.environ.get("LOCAL_RANK", "0") == "0"  # (a node's local rank 0 speaks for its disk)
    mine = together("fingerprinting the checkpoints", fingerprints if reads else list)
    seen: list = [None] * world
    dist.all_gather_object(seen, mine)
    nodes = [(rank, got) for rank, got in enumerate(seen) if got]
    for k, (_, (what, path, _)) in enumerate(roles):
        other = [rank for rank, got in nodes if got[k] != nodes[0][1][k]]
        if other:
            many = len(other) > 1
            raise InvalidInput(
                f"{what} {path}: the node{'s' * many} of rank{'s' * many} {', '.join(map(str, other))} "
                f"hold{'' if many else 's'} other weights there than rank {nodes[0][0]}'s (a stale copy, or one still "
                "being copied?): every node must load the same"
            )


def _check_each(sources: dict[str, tuple[str, str, str]]) -> None:
    """check_checkpoints on this rank: the first refusal, named as its flag."""
    checked = set()
    # (the reward model before the value model it starts: a bad --reward is named as itself)
    for _, (what, path, head) in sorted(sources.items(), key=lambda item: item[0] == "value"):
        if (path, head) in checked:
            continue
        checked.add((path, head))
        try:
            check_checkpoint(path, head)
        except InputError as e:  # (only the check's own findings: any other error is a fault, with its traceback)
            raise named(e, what) from e


def check_context(run: RunConfig, cfg: PPOConfig, grid: ProcessGrid) -> None:
    """The models' shapes (config.json) against the run's flags, before any weight is read: a sequence of
    max_prompt_len + max_new_tokens tokens must fit every model's context (max_position_embeddings: the generator
    would otherwise cut responses short at the context, and PPO would score each as a response that hit the length
    limit without EOS); --tp must divide every model's heads and MLP width (on a GPU the memory plan says
    so too; on a CPU building a model would, without the flag); a number of layers to recompute is at most the
    trained models' layers."""
    configs = {role: ModelConfig.from_hf(path) for role, path in model_dirs(run).items()}
    memory_plan.check_tp({role: (c, "score" if role == "reward" else "lm") for role, c in configs.items()}, grid.tp)
    ac = run.activation_checkpointing
    for role in ("policy", "reward") if ac.isdigit() else ():  # (the trained two: the value model is --reward's)
        if int(ac) > configs[role].num_layers:
            what = "the value model (from --reward)" if role == "reward" else "the policy"
            raise InvalidInput(f"--activation-checkpointing {ac}: {what} has {configs[role].num_layers} layers")
    need = cfg.max_prompt_len + cfg.max_new_tokens
    for role, path in model_dirs(run).items():
        context = configs[role].max_position_embeddings
        if need > context:
            raise InvalidInput(
                f"--max-prompt-len {cfg.max_prompt_len} + --max-new-tokens {cfg.max_new_tokens} = {need} tokens do not "
                f"fit the {role} model's context ({path}: max_position_embeddings {context}); lower either"
            )


def check_kv_cache_mb(run: RunConfig, cfg: PPOConfig, grid: ProcessGrid, device: torch.device) -> None:
    """A fixed --kv-cache-mb must hold one sequence of max_prompt_len + max_new_tokens tokens in whole blocks of the
    policy's K/V on a rank (the generator refuses it otherwise, at the first rollout, after every model is loaded):
    checked from the policy's config.json before any weight is read."""
    if not run.kv_cache_mb:
        return
    c = ModelConfig.from_hf(model_dirs(run)["policy"])
    seq = cfg.max_prompt_len + cfg.max_new_tokens
    kv_dtype = resolve_cache_dtype(run.kv_cache_dtype, resolve_dtype(run.dtype, device))
    blocks = blocks_for_tokens(seq)
    need = blocks * model_block_bytes(c, grid.tp, kv_dtype)
    if need > run.kv_cache_mb * 2**20:
        raise InvalidInput(
            f"--kv-cache-mb {run.kv_cache_mb}: a KV cache of {run.kv_cache_mb} MiB cannot hold one sequence of "
            f"--max-prompt-len {cfg.max_prompt_len} + --max-new-tokens {cfg.max_new_tokens} = {seq} tokens ({blocks} "
            f"blocks of {BLOCK_SIZE} tokens, {need / 2**20:.2f} MiB of the policy's K/V per GPU): give it at least "
            f"{-(-need // 2**20)}, or 0 to size it from the GPU's memory (--kv-cache-fraction)"
        )


def check_tokenizer(run: RunConfig, tokenizer, tokenizer_dir: str, *prompt_sets) -> None:
    """The three checkpoints (config.json, tokenizer files) against the run's tokenizer and its tokenised prompts,
    before any weight is read (engine.tokenizer.check_vocabularies)."""
    models = {role: (path, ModelConfig.from_hf(path).vocab_size) for role, path in model_dirs(run).items()}
    for line in check_vocabularies(tokenizer, tokenizer_dir, models, [s.prompts for s in prompt_sets if s is not None]):
        print0(f"warning: {line}")


def check_memory(
    cfg: PPOConfig, run: RunConfig, grid: ProcessGrid, device: torch.device, evaluation: bool = False
) -> bool:
    """On a GPU, before the models are loaded (and before a Hub id's weights are fetched: its config.json alone is):
    refuse a layout whose weights and optimizer state cannot fit (with the layouts that would), else print what they
    take and what is left (engine/memory_plan.py). Returns whether the optimizer state must live in host memory
    (--offload-optimizer always, or auto where nothing else fits; every rank alike). `evaluation`: --eval-only's
    three frozen models, no optimizer."""
    if device.type != "cuda":
        return False
    sources = config_sources([run.policy, run.reference, run.reward])  # (its collectives outside `together`)
    # (every rank at once: a checkpoint one node lacks is MissingInput, not a ValueError)
    line, resident = together("planning memory", _plan_memory, cfg, run, grid, device, sources, evaluation)
    if line:
        print0(line)
    return bool(agree([int(resident)], "max")[0])


def _plan_memory(cfg: PPOConfig, run: RunConfig, grid: ProcessGrid, device, sources, evaluation: bool):
    """check_memory's plan on each rank: (the line to print, whether the optimizer state lives in host memory)."""
    if sources is None:  # (a Hub id's config.json could not be had; resolve_run names the problem)
        return "", False
    configs = memory_plan.run_configs(*sources, evaluation=evaluation)
    for name, (c, _) in configs.items():  # (the GPU's attention kernels: refused here, not at the first forward)
        if c.head_dim not in SUPPORTED_HEAD_DIMS:
            dims = ", ".join(map(str, SUPPORTED_HEAD_DIMS))
            raise InvalidInput(f"the {name} model's head dim {c.head_dim} is not one the GPU's attention kernels take "
                               f"({dims}; the CPU's reference ops take any)")  # fmt: skip
    dtype, (free, total) = resolve_dtype(run.dtype, device), torch.cuda.mem_get_info(device)
    kv_dtype = resolve_cache_dtype(run.kv_cache_dtype, dtype)
    seq_len = cfg.max_prompt_len + cfg.max_new_tokens
    reserve = memory_plan.generation_reserve(configs["policy"][0], grid.tp, seq_len, dtype, run.gen_max_num_seqs)
    cache = dict(
        total=total,
        fraction=run.kv_cache_fraction,
        seq_len=seq_len,
        kv_dtype=kv_dtype,
        reserve=reserve,
        max_num_seqs=run.gen_max_num_seqs,
        fixed=run.kv_cache_mb * 2**20,  # (--kv-cache-mb: the generator's budget whatever is free)
    )
    return memory_plan.plan_for(
        run.offload_optimizer, configs, dtype, grid.tp, grid.dp, run.distributed_optimizer, free, cache,
        host=memory_plan.host_available(), local_ranks=memory_plan.local_ranks(),
        idle_models=run.offload_idle_models, evaluation=evaluation,
    )  # fmt: skip


def evaluation_set(cfg: PPOConfig, run: RunConfig, grid: ProcessGrid, tokenizer, prompt_set: PromptSet | None):
    """(training prompts, evaluation prompts or None) from --eval-prompts or --eval-holdout."""
    eval_set = None
    if run.eval_holdout:
        if run.eval_prompts:
            raise InvalidInput("--eval-holdout and --eval-prompts both name an evaluation set: give one")
        prompt_set, eval_set = prompt_set.hold_out(run.eval_holdout, run.seed)
        print0(f"prompts: {len(eval_set.prompts)} held out for evaluation, {len(prompt_set.prompts)} to train on")
    elif run.eval_prompts:
        eval_set = load_prompts(
            run.eval_prompts, tokenizer, cfg.max_prompt_len, verbose=grid.rank == 0, template=run.chat_template
        )
        if prompt_set is not None:  # (not held out: an evaluation on prompts the policy trains on is no check)
            seen = {tuple(p) for p in prompt_set.prompts}
            shared = sum(tuple(p) in seen for p in eval_set.prompts)
            if shared:
                print0(f"warning: {shared} of the {len(eval_set.prompts)} evaluation prompts are training prompts too")
    elif run.eval_every or run.eval_greedy:  # (--eval-greedy was ignored in silence)
        flag = "--eval-every" if run.eval_every else "--eval-greedy"
        raise InvalidInput(f"{flag} needs --eval-prompts (a held-out prompt file) or --eval-holdout")
    if eval_set is not None and len(eval_set.prompts) < grid.dp:
        raise InvalidInput(f"{len(eval_set.prompts)} eval prompts cannot be split over {grid.dp} data-parallel ranks")
    return prompt_set, eval_set
