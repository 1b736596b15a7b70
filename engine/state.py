"""A run's state and how it is built: RunConfig (the flags that are not PPO hyperparameters), TrainState (what the
flat functions of engine/trainer.py and engine/evaluate.py work on), and setup(): the process grid, tokenizer, prompts,
the four models loaded from their checkpoints (the policy and value from the run's own when resuming), the
optimizers and the generator; setup_evaluation() the part --eval-only needs. The checks both run before any weight
is read are engine/preflight.py's; what a checkpoint's run had (taken back by a --resume and an --eval-only)
engine/saved_run.py's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

import torch

from engine import memory_plan, recompute
from engine.checkpoint import load_pretrained
from engine.config import PPOConfig
from engine.data import PromptBatches
from engine.distributed import ProcessGrid, agree, backend_for, init_process_grid, print0, together
from engine.errors import InvalidInput
from engine.hub import check_same_sources, model_dirs, pin_as_saved, pin_run, resolve_run
from engine.kv_cache import blocks_for_tokens, cuda_cache_budget, model_block_bytes, resolve_cache_dtype
from engine.model import Transformer
from engine.offload import HostCopies, state_bytes, weight_bytes
from engine.optim import Optimizer, make_optimizer
from engine.output_dir import check_writable, start_fresh
from engine.preflight import (
    READING_INPUTS,
    check_batch_sizes,
    check_checkpoints,
    check_generator_slots,
    check_memory,
    check_paths,
    check_same_prompts,
    device_error,
    read_inputs,
    resolve_device,
    resolve_dtype,
    run_iterations,
)
from engine.resume import (
    check_prompt_order,
    check_resumable,
    check_same_checkpoint,
    fingerprint_models,
    latest_checkpoint,
    load_trainer_state,
    resume_checkpoint,
)
from engine.rollout import idle_models, pad_is_a_stop_warning
from engine.saved_run import (
    checkpoint_config,
    checkpoint_position,
    checkpoint_position_file,
    checkpoint_reference,
    checkpoint_run,
    saved_models,
)
from engine.tokenizer import CHAT_TEMPLATES, PromptSet, end_of_turn_warning, response_stop_ids
from engine.tracking import Tracker, check_available
from kernels.decode_config import parse_decode_config, set_decode_config

# the longest --dist-timeout-minutes: torch.distributed takes the timeout as a timedelta it converts to integer
# milliseconds and nanoseconds, which overflow far past this (1e12 minutes: every collective timed out at once; 1e30: an
# OverflowError from init_process_group)
MAX_DIST_TIMEOUT_MINUTES = 1_000_000


@dataclass
class RunConfig:
    """Everything about a run that is not a PPO hyperparameter (CLI flags next to PPOConfig's)."""

    # checkpoints: HF directories or Hugging Face Hub ids (engine/hub.py)
    policy: str | None = None  # the SFT policy (also the frozen reference, unless --reference)
    reference: str | None = None  # the frozen KL reference (default: --policy, the recipe's)
    reward: str | None = None  # the reward model (also the value model's start)
    prompts: str | None = None  # JSONL prompt file
    tokenizer: str | None = None  # tokenizer directory (default: the policy's)
    # how prompts become tokens: tulu (the recipe's <|user|> format) or tokenizer (the tokenizer's chat_template)
    chat_template: str = "tulu"
    output_dir: str = "out/ppo"  # checkpoints, metrics.jsonl
    tp: int = 1  # tensor parallel degree (must divide the heads; world = dp x tp)
    dist_timeout_minutes: float = 60.0  # how long a rank waits for its peers in a collective (a slow rollout)
    sequence_parallel: bool = True  # under TP, split the tokens between the TP regions (norms run on 1/tp of them)
    distributed_optimizer: bool = True  # with DP, shard the fp32 masters and Adam moments over the DP ranks (ZeRO-1)
    # with DP, deal each optimizer step's minibatch out over the ranks by tokens (longest first, to the emptiest rank),
    # not by where its sequences were sampled: no rank waits for a fuller one (engine/balance.py)
    balance_dp_tokens: bool = True
    resume: bool = False  # continue from output_dir's latest checkpoint (if there is none, start fresh)
    # the PPO hyperparameters given on the command line (set by train_ppo.parse_args; not a flag): a resumed run takes
    # every other one from its checkpoint, so it continues with its own. None (the API's): all of them are as meant
    ppo_flags: tuple[str, ...] | None = field(default=None, metadata={"cli": False})
    run_flags: tuple[str, ...] | None = field(default=None, metadata={"cli": False})  # (the others given, likewise)
    overwrite_output_dir: bool = False  # start over in an output_dir that holds a run (its checkpoints are deleted)
    save_every: int = 0  # iterations between checkpoints (0: only at the end)
    keep_checkpoints: int = 1  # the newest checkpoints kept in output_dir; older ones are pruned
    # write each checkpoint's files on a thread while the run goes on (what they hold copied to host memory first;
    # `latest` moves to it an iteration later, or when the run stops); a save whose copy would not fit in half the
    # host's available memory is written at once instead
    async_save: bool = True
    # --resume with a reference or reward model whose weights differ from those the checkpoint's run used (refused
    # otherwise: its KL and rewards would measure against another model)
    resume_other_models: bool = False
    max_iterations: int = 0  # stop after this many iterations (0: the whole prompt set; the LR schedule spans it)
    # the LR schedule always spans the whole prompt set, so a run cut short and resumed is the same run
    seed: int = 0  # prompt order and sampling
    device: str = "auto"  # auto: cuda if available
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu (float16: --eval-only alone, no loss scaling)
    micro_batch_tokens: int = 8192  # tokens (prompt + response) per forward/backward micro-batch (memory bound)
    gen_max_num_seqs: int = 256  # sequences the generator decodes together at most
    kv_cache_fraction: float = 0.9  # share of the GPU's memory the rollouts may fill, their KV cache included
    kv_cache_mb: int = 0  # KV cache budget in MiB (0: the generator's default / kv_cache_fraction)
    kv_cache_dtype: str = "auto"  # auto (the model's) or fp8: float8 e4m3 K/V, half the bytes read per decode step
    # the decode step's kernel launches as a JSON object (kernels/decode_config.py's keys): the opt-in switches, e.g.
    # '{"linear": 1, "pdl": 1}' (the projections in five launches a layer; programmatic dependent launch, sm_90+),
    # or a sweep's tiles; empty: the measured defaults
    decode_config: str = ""
    # the trained models' fp32 masters and Adam moments in pinned host memory: rollouts (during rollouts, their GPU
    # memory in the KV cache), always (throughout: each update streams them through the GPU in chunks; the GPU holds
    # the weights and grads), off, or auto (on a GPU: always where the layout fits no other way, else rollouts when
    # the cache would otherwise hold fewer sequences than the generator decodes together and the host has room)
    offload_optimizer: str = "auto"
    # the weights of the models a rollout's generation does not run (the frozen reference and reward model, the value
    # model) in pinned host memory while it generates, their GPU memory in its KV cache: rollouts, off, or auto (on a
    # GPU: when the cache would otherwise hold fewer sequences than the generator decodes together, the optimizer
    # state's offload counted, and the host has room). A frozen model is copied out once, then only copied back in
    offload_idle_models: str = "auto"
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)
    profile_iteration: int = 0  # a torch.profiler trace of this iteration (1-based; 0: none) per rank in output_dir
    save_every_minutes: float = 0.0  # also checkpoint when this long has passed since the last one (0: off)
    # recompute layers in the backward: on / off / N (the first N layers) / auto (on a GPU the fewest layers
    # that let a micro-batch fit the memory left, planned before each training phase; off on CPU)
    activation_checkpointing: str = "auto"
    # held-out JSONL prompts, answered and scored before, during and after training (the tiny default evaluates on
    # its shipped held-out prompts; an empty string turns evaluation off)
    eval_prompts: str | None = None
    eval_every: int = 0  # iterations between evaluations (0: only before the first and after the last)
    eval_holdout: int = 0  # hold this many prompts of --prompts out of training as the evaluation set (seeded)
    eval_greedy: bool = False  # evaluate with greedy decoding instead of the rollouts' sampling
    eval_only: bool = False  # evaluate --policy (against --reference) on the evaluation set, then stop: no training
    log_samples: int = 2  # rollout sequences per iteration written with their scores to samples.jsonl
    wandb_project: str = ""  # also log the metrics to this Weights & Biases project (needs `pip install -e ".[wandb]"`)
    wandb_run_name: str = ""  # the W&B run's name (default: the output directory's name)
    # also write the metrics as TensorBoard event files here (needs `pip install -e ".[tensorboard]"`)
    tensorboard_dir: str = ""

    def __post_init__(self) -> None:
        """Refuse nonsense when the flags are parsed (a run that would train nothing and exit 0, or fail late)."""
        bad = [f"{n} must be >= {lo}, got {getattr(self, n)}" for n, lo in (
            ("tp", 1), ("save_every", 0), ("keep_checkpoints", 1), ("max_iterations", 0), ("micro_batch_tokens", 1),
            ("gen_max_num_seqs", 1), ("kv_cache_mb", 0), ("profile_iteration", 0), ("save_every_minutes", 0),
            ("eval_every", 0), ("eval_holdout", 0), ("log_samples", 0))
            if not getattr(self, n) >= lo]  # fmt: skip
        if self.save_every_minutes == math.inf:  # (never: 0 says off)
            bad.append("save_every_minutes must be finite (0: off), got inf")
        if self.output_dir and not self.output_dir.strip():  # (a directory named " ": a stray quote in a script)
            bad.append(f"output_dir {self.output_dir!r} is only whitespace")
        if not 0 <= self.seed < 2**32:  # (the samples' streams take 32 bits of it: engine.sampler.seed_for)
            bad.append(f"seed must be in [0, 2**32), got {self.seed}")
        if not 0 < self.dist_timeout_minutes < math.inf:  # (0: every collective times out at once; inf: no timedelta)
            bad.append(f"dist_timeout_minutes must be > 0 and finite, got {self.dist_timeout_minutes}")
        elif self.dist_timeout_minutes * 60 < 1:  # (under a millisecond it is 0: the rendezvous itself times out)
            bad.append(f"dist_timeout_minutes must be at least a second (1/60), got {self.dist_timeout_minutes:g}")
        elif self.dist_timeout_minutes > MAX_DIST_TIMEOUT_MINUTES:  # (torch's timedelta overflows: see the constant)
            bad.append(f"dist_timeout_minutes must be at most {MAX_DIST_TIMEOUT_MINUTES} (about two years; longer ones "
                       f"overflow torch.distributed's clocks), got {self.dist_timeout_minutes:g}")  # fmt: skip
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            bad.append(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        elif self.dtype == "float16" and not self.eval_only:  # (the losses are divided by a rollout's token count)
            bad.append("dtype float16 trains without loss scaling (the gradients would underflow); use bfloat16 or "
                       "float32 (float16 serves --eval-only)")  # fmt: skip
        if (why := device_error(self.device)) is not None:
            bad.append(why)
        if self.kv_cache_dtype not in ("auto", "fp8"):
            bad.append(f"kv_cache_dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
        if self.decode_config:
            try:
                parse_decode_config(self.decode_config)
            except ValueError as e:
                bad.append(f"decode_config: {e}")
        if not re.fullmatch(r"auto|on|off|\d+", self.activation_checkpointing):
            bad.append(f"activation_checkpointing must be auto, on, off or a number of layers, got "
                       f"{self.activation_checkpointing!r}")  # fmt: skip
        if self.chat_template not in CHAT_TEMPLATES:
            bad.append(f"chat_template must be one of {', '.join(CHAT_TEMPLATES)}, got {self.chat_template!r}")
        if not 0 < self.kv_cache_fraction <= 1:
            bad.append(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        for name, allowed in (("offload_optimizer", memory_plan.OFFLOAD_SETTINGS),
                              ("offload_idle_models", memory_plan.IDLE_MODEL_SETTINGS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                bad.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if bad:
            raise InvalidInput("; ".join(bad))

    def decode_overrides(self) -> dict:
        """decode_config's JSON as the overrides kernels.decode_config.set_decode_config takes ({} when empty)."""
        return parse_decode_config(self.decode_config) if self.decode_config else {}


@dataclass
class TrainState:
    cfg: PPOConfig
    run: RunConfig
    grid: ProcessGrid
    device: torch.device
    policy: Transformer
    ref: Transformer
    value: Transformer
    reward: Transformer
    policy_opt: Optimizer
    value_opt: Optimizer
    data: PromptBatches
    generator: object
    stop_ids: list[int]
    tokenizer_dir: str | None
    iterations: int  # iterations this run stops after
    total_steps: int  # optimizer steps of the whole schedule
    iteration: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    tokenizer: object | None = None  # decodes the logged samples
    eval_prompts: PromptSet | None = None  # held-out prompts (engine.evaluate)
    evals: list[dict] = field(default_factory=list)
    tracker: Tracker | None = None  # Weights & Biases, on global rank 0 (engine/tracking.py)
    layer_bytes: dict[str, float] = field(default_factory=dict)  # per token, measured once (engine.recompute)
    offload: bool = False  # optimizer state in host memory during rollouts (decide_offload)
    offload_models: bool = False  # the idle models' weights in host memory during rollouts (decide_offload)
    model_copies: dict[str, HostCopies] = field(default_factory=dict)  # their host buffers, by name
    model_fingerprints: dict | None = None  # the frozen models' weights (global rank 0; engine.resume.check_models)
    template_warned: bool = False  # a saved policy's chat template could not reproduce the prompts' ids (said once)
    command: list[str] | None = None  # the launch's command line for launches.jsonl (None: this process's sys.argv)
    pending_save: object | None = None  # a checkpoint being written in the background (engine.resume.finish_checkpoint)
    async_save_warned: bool = False  # a background save did not fit in host memory (said once)
    kl_coef: float | None = None  # the KL penalty's coefficient now: cfg.kl_coef, or the adaptive one (cfg.kl_target)

    def __post_init__(self) -> None:
        if self.kl_coef is None:
            self.kl_coef = self.cfg.kl_coef

    @property
    def dp_group(self):
        return self.grid.dp_group if self.grid.dp > 1 else None


def make_generator(policy: Transformer, cfg: PPOConfig, run: RunConfig):
    from engine.generate import Generator

    kw = {"kv_cache_bytes": run.kv_cache_mb * 2**20} if run.kv_cache_mb else {}
    return Generator(
        policy,
        max_num_seqs=run.gen_max_num_seqs,
        max_model_len=cfg.max_prompt_len + cfg.max_new_tokens,
        kv_cache_fraction=run.kv_cache_fraction,
        kv_cache_dtype=run.kv_cache_dtype,
        **kw,
    )


def _with_decode_config(factory, policy: Transformer, cfg: PPOConfig, run: RunConfig):
    """The run's generator, made after --decode-config took effect (process-wide: every decode launch from here on;
    the CUDA graphs are captured later, with it)."""
    if run.decode_config:
        set_decode_config(**run.decode_overrides())
    return factory(policy, cfg, run)


def run_inputs(run: RunConfig) -> dict[str, str | None]:
    """The paths a run reads, by flag (local directories and files once resolve_run has made Hub ids local)."""
    return {
        "--policy": run.policy, "--reference": run.reference, "--reward": run.reward, "--tokenizer": run.tokenizer,
        "--prompts": run.prompts, "--eval-prompts": run.eval_prompts,
    }  # fmt: skip


def setup(
    cfg: PPOConfig, run: RunConfig, *, grid: ProcessGrid | None = None, generator_factory=make_generator
) -> TrainState:
    """Process grid, tokenizer, prompts, the four models (loaded), optimizers; resumes when run.resume."""
    if not (run.policy and run.reward and run.prompts):
        raise InvalidInput("--policy, --reward and --prompts are all needed (or no flag at all for the tiny default)")
    memory_plan.check_offload_setting(run.offload_optimizer)
    memory_plan.check_offload_setting(run.offload_idle_models, "--offload-idle-models")
    grid = grid or init_process_grid(run.tp, backend_for(run.device), timeout_minutes=run.dist_timeout_minutes)
    ckpt = None
    if run.resume:  # (before anything is checked or planned from the hyperparameters: the checkpoint's, unless given)
        # (`latest` naming a checkpoint that is gone: refused, not a fresh start; on every rank at once, as below)
        together("reading the checkpoint to resume", check_resumable, run.output_dir)
        ckpt = together("reading the checkpoint to resume", resume_checkpoint, run.output_dir)
        check_same_checkpoint(ckpt, run.output_dir)  # (outside `together`: a collective of its own)
        cfg = together("reading the checkpoint to resume", checkpoint_config, cfg, run, ckpt)
        run = together("reading the checkpoint to resume", checkpoint_run, run, ckpt)  # (its seed, EOS, template...)
    check_batch_sizes(cfg, grid)  # before loading four models
    check_generator_slots(cfg, run)
    # (every rank at once: a path one node lacks, copied to another's local disk only, stops every node, named)
    together("checking the checkpoints and prompt files", check_paths, run)
    check_same_sources(run)  # (a local directory on one node, a Hub id on another: refused on every rank)
    check_writable(run.output_dir, grid.rank)  # (which creates it: after the flags that name no directory)
    if ckpt and not run.resume_other_models:  # (a Hub id of a frozen model: the commit the run fetched)
        run = together("reading the checkpoint's models", lambda: pin_as_saved(run, saved_models(ckpt)))
    run = pin_run(run)  # a Hub id to the commit it names now: every node fetches that one
    check_available(run, grid.rank)
    device, load = model_loader(run, grid)
    if check_memory(cfg, run, grid, device):  # (from config.json alone: before a Hub id's weights are fetched)
        run = dataclasses.replace(run, offload_optimizer="always")  # (auto, where nothing else fits)
    light = resolve_run(run, weights=False)  # a Hub id's configs and tokenizer files, checked before its weights
    tokenizer_dir = light.tokenizer or light.policy
    tokenizer, prompt_set, eval_set = together(READING_INPUTS, read_inputs, cfg, run, light, grid, device)
    check_same_prompts(run, prompt_set, eval_set)  # (a node's stale copy: refused on every rank)
    # Hub ids -> local directories with the weights (engine/hub.py; the same directories); a resume's policy is the
    # checkpoint's: --policy's weights are fetched only where it is the reference too
    unread = ("policy",) if ckpt and model_dirs(run)["reference"] != run.policy else ()
    run = resolve_run(run, configs_only=unread)
    if run.resume:
        print0(f"resuming from {ckpt}" if ckpt else f"--resume: no checkpoint in {run.output_dir} yet, starting fresh")
        if ckpt and latest_checkpoint(run.output_dir) is None:
            print0(f"(no `latest` in {run.output_dir}: a save stopped before it was first written, or not copied; "
                   "the newest complete checkpoint there is resumed)")  # fmt: skip
    if ckpt:  # (before any weight is read; on every rank at once: a prompt file one node's disk holds otherwise)
        together("checking the prompt order the checkpoint continues", check_prompt_order, ckpt, prompt_set.prompts,
                 cfg, run.seed)  # fmt: skip
    sources = model_sources(run, ckpt)
    check_checkpoints(sources)  # (before an output directory is cleared and before any weight is read)
    fingerprints = fingerprint_models(run, ckpt, grid.rank)  # (a resume with other frozen models: refused here)
    if ckpt is None and run.output_dir:  # (a resume with nothing to resume drops the dead run's metrics)
        start_fresh(run.output_dir, run.overwrite_output_dir or run.resume, grid.rank, inputs=run_inputs(run))
    models = tuple(together(f"loading the {role} model", load, path, head) for role, (_, path, head) in sources.items())
    stop_ids = response_stop_ids(tokenizer, run.policy)
    if ckpt:  # (the run's own, kept with its policy: another --policy's generation_config.json would end responses
        # elsewhere than the run did, the weights being the checkpoint's whatever --policy names)
        saved = response_stop_ids(tokenizer, os.path.join(ckpt, "policy"))
        if saved != stop_ids:
            print0(f"warning: --policy {run.policy} ends responses at token ids {stop_ids}, the checkpoint's run at "
                   f"{saved}: resuming with the run's")  # fmt: skip
        stop_ids = saved
    for said in (pad_is_a_stop_warning(models[3].config.pad_token_id, stop_ids),
                 end_of_turn_warning(tokenizer, stop_ids, run.chat_template)):  # fmt: skip
        if said:
            print0(said)
    state = make_state(
        cfg,
        run,
        grid,
        models,
        prompt_set.prompts,
        stop_ids,
        tokenizer_dir,
        generator_factory=None,
        checked=True,  # (warned above, before the models loaded: once, not twice)
    )
    state.tokenizer, state.eval_prompts, state.model_fingerprints = tokenizer, eval_set, fingerprints
    if ckpt:
        load_trainer_state(state, ckpt)
    state.generator = _with_decode_config(generator_factory, state.policy, cfg, run)
    return state


def model_sources(run: RunConfig, ckpt: str | None, evaluation: bool = False) -> dict[str, tuple[str, str, str]]:
    """{role: (what names it, checkpoint directory, head)} for the models a run loads, in the order it loads them:
    the policy, the reference, then (training) the value model and the reward model; a resumed run's trained
    models from its checkpoint `ckpt`."""
    dirs = model_dirs(run)  # (the reference defaults to the policy)
    sources = {
        "policy": (f"the checkpoint {ckpt}'s policy", os.path.join(ckpt, "policy"), "lm") if ckpt
        else ("--policy", dirs["policy"], "lm"),
        "reference": ("--reference" if run.reference else "--policy (the reference)", dirs["reference"], "lm"),
        "value": (f"the checkpoint {ckpt}'s value model", os.path.join(ckpt, "value"), "score") if ckpt
        else ("--reward (the value model's start)", dirs["reward"], "score"),
        "reward": ("--reward", dirs["reward"], "score"),
    }  # fmt: skip
    if evaluation:
        del sources["value"]
    return sources


def model_loader(run: RunConfig, grid: ProcessGrid):
    """(device, load(path, head) -> Transformer on it, this run's dtype, TP group and layout)."""
    # (on every rank at once: --device cuda:N is refused on the ranks whose LOCAL_RANK is not N only, --device cuda on a
    # node that sees no GPU only; the others would wait in the memory plan's collective)
    device = together("choosing the device", resolve_device, run.device, grid)
    dtype = resolve_dtype(run.dtype, device)
    kw = {"dtype": dtype, "device": device, "group": grid.tp_group, "sequence_parallel": run.sequence_parallel}
    return device, lambda path, head: load_pretrained(path, head=head, **kw)


def make_state(
    cfg: PPOConfig,
    run: RunConfig,
    grid: ProcessGrid,
    models: tuple[Transformer, Transformer, Transformer, Transformer],
    prompts: list[list[int]],
    stop_ids: list[int],
    tokenizer_dir: str | None = None,
    *,
    generator_factory=make_generator,
    checked: bool = False,
) -> TrainState:
    """TrainState from models already built: (policy, reference, value, reward); the frozen two are
    set to requires_grad=False. Used by setup() and by bench/ppo_step.py (random weights). `checked`: setup checked
    the batch sizes already (and warned, before loading the models)."""
    check_batch_sizes(cfg, grid, warn=not checked)
    policy, ref, value, reward = models
    ref.requires_grad_(False)
    reward.requires_grad_(False)
    data = PromptBatches(
        prompts, cfg.rollout_batch_size, seed=run.seed, epochs=cfg.prompt_epochs, dp_rank=grid.dp_rank, dp_size=grid.dp
    )
    iterations = run_iterations(len(prompts), cfg, run)
    steps_per_rollout = cfg.steps_per_rollout
    device = next(policy.parameters()).device
    setting = recompute.setting(run.activation_checkpointing, len(policy.layers), device)
    policy.activation_checkpointing = value.activation_checkpointing = setting
    resident = run.offload_optimizer == "always"  # (on CPU too: it frees nothing there, but runs the same path)
    optimizers = [
        make_optimizer(m, cfg, grid, distributed=run.distributed_optimizer, host_resident=resident)
        for m in (policy, value)
    ]
    state = TrainState(
        cfg, run, grid, device, policy, ref, value, reward, *optimizers,
        data, None, stop_ids, tokenizer_dir, iterations, len(data) * steps_per_rollout,
    )  # fmt: skip
    state.offload, state.offload_models = decide_offload(state)
    if generator_factory is not None:
        state.generator = _with_decode_config(generator_factory, policy, cfg, run)
    return state


def decide_offload(state: TrainState) -> tuple[bool, bool]:
    """--offload-optimizer, then --offload-idle-models (with the first's choice counted), decided from what the models
    and optimizers hold now; every rank alike (offloading only if every rank would: their memory differs a little).
    Returns (the optimizer state, the idle models' weights) in host memory during rollouts."""
    run, cfg, dev = state.run, state.cfg, state.device
    memory_plan.check_offload_setting(run.offload_optimizer)
    memory_plan.check_offload_setting(run.offload_idle_models, "--offload-idle-models")
    nbytes = sum(state_bytes(o) for o in (state.policy_opt, state.value_opt) if o is not None)
    idle = idle_models(state)
    mbytes = sum(weight_bytes(m) for _, m, _ in idle)
    wanted = min(run.gen_max_num_seqs, cfg.rollout_sequences // state.grid.dp)
    budget, per_seq = 0, 1
    if dev.type == "cuda" and {run.offload_optimizer, run.offload_idle_models} & {"auto", "rollouts"}:
        # the rollouts' KV cache in full-length sequences, with and without what is offloaded
        seq_len = cfg.max_prompt_len + cfg.max_new_tokens
        c = state.policy.config
        kv_dtype = resolve_cache_dtype(run.kv_cache_dtype, next(state.policy.parameters()).dtype)
        per_seq = blocks_for_tokens(seq_len) * model_block_bytes(c, state.grid.tp, kv_dtype)  # (whole blocks)
        dtype = next(state.policy.parameters()).dtype
        reserve = memory_plan.generation_reserve(c, state.grid.tp, seq_len, dtype, run.gen_max_num_seqs)
        budget = cuda_cache_budget(dev, run.kv_cache_fraction, reserve, clamp=False)  # (a shortfall counts)
        if run.kv_cache_mb:  # a fixed cache: what is offloaded does not enlarge it
            budget = run.kv_cache_mb * 2**20
    host, ranks, out = memory_plan.host_available(), memory_plan.local_ranks(), []
    for setting, nb, what, flag in (
        (run.offload_optimizer, nbytes, "optimizer state", "--offload-optimizer"),
        (run.offload_idle_models, mbytes, f"idle models' weights ({', '.join(n for n, _, _ in idle)})",
         "--offload-idle-models"),
    ):  # fmt: skip
        if nb == 0:  # (--eval-only has no optimizer)
            out.append(False)
            continue
        # (auto yields to an explicit --offload-idle-models rollouts: it takes the host memory those weights need
        # only from what is left, or their check below would refuse the run it had let load)
        room = host - (mbytes * ranks if setting == "auto" and flag == "--offload-optimizer"
                       and run.offload_idle_models == "rollouts" else 0)  # fmt: skip
        seqs = (max(0, budget) // per_seq, max(0, budget + (0 if run.kv_cache_mb else nb)) // per_seq)
        seqs = tuple(min(n, run.gen_max_num_seqs) for n in seqs)  # (the generator's cap: its slots, full length)
        # (no room on one node's host alone, or any other error there: every rank stops, none waits in the agreement)
        on, line = together(f"deciding {flag}", memory_plan.offload_decision, setting, dev, nb, ranks, seqs, wanted,
                            room, what, flag, run.distributed_optimizer)  # fmt: skip
        (every,) = agree([int(on)], "min")
        print0(line if every == on else f"{what}: on the GPU throughout (another rank has no room to offload)")
        out.append(bool(every))
        if every and setting != "always":  # what the next decision starts from: a larger cache, less host memory
            budget, host = budget + nb, host - nb * ranks  # (a host-resident state is counted in both already)
    return out[0], out[1]


def setup_evaluation(cfg, run, grid, generator_factory=None) -> TrainState:
    """The state --eval-only needs: the policy, the reference (--reference, default the policy) and the reward
    model, frozen, the evaluation set and a generator; no value model, optimizers or training prompts."""
    if not (run.policy and run.reward and (run.eval_prompts or run.eval_holdout)):
        raise InvalidInput("--eval-only needs --policy, --reward and --eval-prompts")
    if run.eval_holdout:
        raise InvalidInput("--eval-only takes --eval-prompts (--eval-holdout draws from a training set)")
    memory_plan.check_offload_setting(run.offload_idle_models, "--offload-idle-models")
    check_available(run, grid.rank)
    together("checking the checkpoints and prompt files", check_paths, run)  # (as in setup)
    check_same_sources(run)
    # a PPO checkpoint's policy is evaluated as its run evaluated it (sampling, limits, the KL and missing-EOS terms of
    # the reward) unless a flag says otherwise: the same numbers as that run's eval.jsonl at that iteration
    ckpt = os.path.dirname(os.path.abspath(run.policy)) if checkpoint_position_file(run.policy) else None
    cfg = together("reading the checkpoint's hyperparameters", checkpoint_config, cfg, run, ckpt)
    if ckpt is not None and run.reference is None:  # (the policy itself would make every KL 0)
        run = checkpoint_reference(run, ckpt)
    if ckpt is not None:  # (and its seed, greedy or sampled, --ignore-eos, template: the answers its run drew)
        run = together("reading the checkpoint's run settings", checkpoint_run, run, ckpt)
        print0(f"evaluating {ckpt}'s policy with its run's PPO hyperparameters (sampling and its seed, limits, the "
               "reward's KL and missing-EOS terms) where no flag is given")  # fmt: skip
    check_writable(run.output_dir, grid.rank)
    run = pin_run(run)  # (as in setup)
    device, load = model_loader(run, grid)
    check_memory(cfg, run, grid, device, evaluation=True)  # (as in setup: before a Hub id's weights are fetched)
    light = resolve_run(run, weights=False)
    tokenizer_dir = light.tokenizer or light.policy
    tokenizer, _, eval_set = together(READING_INPUTS, read_inputs, cfg, run, light, grid, device, training=False)
    check_same_prompts(run, None, eval_set)
    run = resolve_run(run)
    sources = model_sources(run, None, evaluation=True)
    check_checkpoints(sources)  # (as in setup)
    start_fresh(run.output_dir, run.overwrite_output_dir, grid.rank, evaluation=True, inputs=run_inputs(run))
    policy, ref, reward = (together(f"loading the {role} model", load, path, head)
                           for role, (_, path, head) in sources.items())  # fmt: skip
    for m in (policy, ref, reward):
        m.requires_grad_(False)
    stops = response_stop_ids(tokenizer, run.policy)
    for said in (pad_is_a_stop_warning(reward.config.pad_token_id, stops),
                 end_of_turn_warning(tokenizer, stops, run.chat_template)):  # fmt: skip
        if said:
            print0(said)
    # (what eval.jsonl and eval/iter-N.jsonl name; on every rank at once: a checkpoint copied to each node's own disk,
    # one copy's state file damaged)
    iteration, step = together("reading the checkpoint's position", checkpoint_position, run.policy)
    state = TrainState(cfg, run, grid, device, policy, ref, None, reward, None, None, None, None, stops, tokenizer_dir,
                       iterations=0, total_steps=0, iteration=iteration, step=step)  # fmt: skip
    state.tokenizer, state.eval_prompts = tokenizer, eval_set
    state.offload, state.offload_models = decide_offload(state)  # (the reference's and reward model's weights)
    state.generator = _with_decode_config(generator_factory or make_generator, policy, cfg, run)
    state.tracker = Tracker(state)
    return state
