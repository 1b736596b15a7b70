"""PPO training of a Llama policy against a reward model (the Tulu V2.5 PPO recipe, RECIPE.md).

The real run (one node, 8 GPUs, tensor parallel 8 within it; add nodes for data parallel):
    torchrun --nproc_per_node 8 engine/train_ppo.py --policy PATH/tulu2-13b --reward PATH/tulu2-13b-rm \\
        --prompts PATH/stackexchange_60k.jsonl --tp 8 --output-dir out/ppo-13b --save-every 10
    # same command + --resume continues from out/ppo-13b/latest exactly where it stopped

The embedded tiny default (no flag): builds a tiny random policy and reward model itself
(ModelConfig.named("tiny"), written with save_pretrained into out/ppo-tiny/init so they load through
the same path), uses the shipped tokenizer and prompts, and runs a few small iterations (small enough for a CPU;
on the GPU where there is one, --device auto):
    python engine/train_ppo.py
    torchrun --nproc_per_node 1 engine/train_ppo.py
    torchrun --nproc_per_node 2 engine/train_ppo.py       # data parallel 2 on CPU (gloo)

Every PPOConfig field (engine/config.py) is a flag (--learning-rate, --kl-coef, ...; booleans take
--x / --no-x), next to the run flags of engine.state.RunConfig; `--help` lists them all.
Metrics: printed per iteration on rank 0 and appended to OUTPUT_DIR/metrics.jsonl; a few scored samples of each
rollout go to OUTPUT_DIR/samples.jsonl (--log-samples). With --eval-prompts FILE (held-out prompts) the policy is
evaluated before the first iteration, every --eval-every iterations and after the last: OUTPUT_DIR/eval.jsonl (RM
score, KL, reward, length per evaluation) and every answer in OUTPUT_DIR/eval/iter-NNNNNN.jsonl (engine/evaluate.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys

if __name__ == "__main__" and os.path.basename(sys.path[0]) == "engine":
    # Run as a script: import the package from the repo root, not this directory's modules as top-level names.
    sys.path[0] = os.path.dirname(sys.path[0])

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from engine.config import EVALUATION_FIELDS, ModelConfig, PPOConfig  # noqa: E402
from engine.errors import global_rank, write_error_file  # noqa: E402
from engine.state import RunConfig, setup  # noqa: E402
from engine.trainer import train  # noqa: E402

# What the no-flag run changes from the recipe: small batches and responses for a 2-core CPU, and a
# larger learning rate so a few steps move the tiny policy visibly.
TINY_PPO = {
    "rollout_batch_size": 16,
    "train_batch_size": 8,
    "max_new_tokens": 24,
    "max_prompt_len": 128,
    "learning_rate": 1e-4,
    "prompt_epochs": 4,  # 12 iterations: enough to watch the no-EOS penalty being learned away
    # the whole vocabulary (the random tiny policy's likeliest token is EOS: among only its 50 likeliest, responses
    # end at once and there is no missing-EOS penalty to learn away)
    "top_k": 0,
}
TINY_RUN = {
    "output_dir": "out/ppo-tiny",
    "max_iterations": 0,
    "micro_batch_tokens": 1024,
    "gen_max_num_seqs": 16,
    "eval_every": 4,  # on the shipped held-out prompts (engine/assets/prompts_tiny_eval.jsonl)
}


def _flag_kind(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else str(f.type)
    t = t.replace("typing.", "").replace("<class '", "").replace("'>", "")
    for kind in ("bool", "tuple", "int", "float", "str"):
        if t.startswith(kind):
            return kind
    raise TypeError(f"no CLI flag type for field {f.name}: {f.type}")


def _field_comments(cls) -> dict[str, str]:
    """The `# ...` comment after each field in the dataclass source, or else the comment lines right above it: one
    place documents a field."""
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=[^#]*(?:#\s*(.+))?$", line)
        if m and (m.group(2) or above):
            comments[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        c = re.match(r"\s+#\s*(.+)$", line)
        above = [*above, c.group(1)] if c else []
    return comments


def _add_fields(parser: argparse.ArgumentParser, cls, title: str) -> None:
    group = parser.add_argument_group(title)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_kind(f)
        tiny = {**TINY_PPO, **TINY_RUN}.get(f.name)
        tiny = None if tiny == f.default else tiny  # (the tiny default's own value only where it differs)
        shown = "none" if f.default in ("", None) else f.default  # (an empty --wandb-project, no --policy: not set)
        help_ = f"(default: {shown}" + (f"; tiny default: {tiny})" if tiny is not None else ")")
        if f.name in comments:  # (a comment that states the default itself is not followed by a second one)
            says_default = "(default:" in comments[f.name]
            own = f"(tiny default: {tiny})" if tiny is not None else ""
            help_ = f"{comments[f.name]} {own if says_default else help_}".rstrip()
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        elif kind == "tuple":
            group.add_argument(flag, type=float, nargs=len(f.default), default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(
                flag, type={"int": int, "float": float, "str": str}[kind], default=argparse.SUPPRESS, help=help_
            )


class _Parser(argparse.ArgumentParser):
    """argparse's, printing (usage errors, --help) on global rank 0 only: under torchrun every rank parses the same
    flags, and one copy is enough (every rank still exits); a usage error also goes into torchrun's failure summary."""

    def _print_message(self, message: str, file=None) -> None:  # (argparse's one printer, stable since Python 3.2)
        if global_rank() == 0:
            super()._print_message(message, file)

    def error(self, message: str):
        write_error_file(f"{self.prog}: error: {message}")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # no abbreviations: with this many flags one picks another silently (--lr took --lr-schedule), and a flag
        # added later would change what an abbreviation in someone's script means
        allow_abbrev=False,
        epilog="With no --policy: the embedded tiny default (random tiny models, shipped prompts), small enough for a "
        "CPU; on --device auto it runs on the GPU where there is one.",
    )
    _add_fields(parser, RunConfig, "run")
    _add_fields(parser, PPOConfig, "PPO hyperparameters (defaults: the Tulu V2.5 PPO 13B recipe)")
    # a negative number in scientific notation (--missing-eos-penalty -1e3) is a value, not a flag: argparse's own
    # test (a private attribute, stable since Python 3.2) knows only -12 and -1.5
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[PPOConfig, RunConfig, bool]:
    """(PPOConfig, RunConfig, tiny): flags override the recipe, or the tiny preset when --policy is absent."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    tiny = "policy" not in given
    if tiny and ("reward" in given or "prompts" in given):
        parser.error("--reward/--prompts need --policy (without --policy the tiny default builds its own models)")
    ppo_names = {f.name for f in dataclasses.fields(PPOConfig)}
    ppo_kw = dict(TINY_PPO) if tiny else {}
    run_kw = dict(TINY_RUN) if tiny else {}
    for k, v in given.items():
        if k in ppo_names:
            ppo_kw[k] = tuple(v) if isinstance(v, list) else v
        else:
            run_kw[k] = v
    run_kw["ppo_flags"] = tuple(sorted(k for k in given if k in ppo_names))  # (a resume takes the others' saved)
    run_kw["run_flags"] = tuple(sorted(k for k in given if k not in ppo_names))  # (--eval-only of a checkpoint too)
    if tiny and given.get("eval_prompts") == "" and "eval_every" not in given:
        run_kw["eval_every"] = 0  # (the preset's, with evaluation turned off; one given beside it is refused by setup)
    if given.get("resume") and given.get("overwrite_output_dir"):  # (resume would win silently where there is one)
        parser.error("--resume continues the run in --output-dir and --overwrite-output-dir deletes it: give one")
    if given.get("resume") and given.get("eval_only"):  # (--resume did nothing there)
        parser.error("--eval-only evaluates --policy (a checkpoint) without training; --resume trains on")
    # (flags a run of this kind would accept and leave out in silence)
    training_only = ("prompts", "eval_every", "save_every", "save_every_minutes", "keep_checkpoints", "max_iterations",
                     "log_samples", "profile_iteration", "offload_optimizer", "activation_checkpointing", "async_save",
                     "resume_other_models", "distributed_optimizer", "balance_dp_tokens")  # fmt: skip
    training_only += tuple(sorted(ppo_names - set(EVALUATION_FIELDS)))  # (the optimizer's, PPO's, the rollout's)
    said = lambda k: f"--{'no-' if given[k] is False else ''}{k.replace('_', '-')}"  # noqa: E731  (as given)
    idle = [said(k) for k in training_only if k in given]
    if given.get("eval_only") and idle:
        parser.error(f"--eval-only evaluates --policy once and trains nothing: {', '.join(idle)} would do nothing")
    if "wandb_run_name" in given and not given.get("wandb_project"):
        parser.error("--wandb-run-name names a run in a W&B project: give --wandb-project too")
    if run_kw.get("output_dir", "x") == "":  # (RunConfig's "" is a bench's: no files at all)
        parser.error("--output-dir must not be empty")
    try:
        # (--resume: the checkpoint's values fill in those not given, and the checks between fields wait for them)
        return PPOConfig(**ppo_kw, check_relations=not given.get("resume")), RunConfig(**run_kw), tiny
    except ValueError as e:  # (nonsense values: a usage error, exit code 2, not a traceback)
        parser.error(as_flags(str(e), ppo_names | {f.name for f in dataclasses.fields(RunConfig)}))


def as_flags(message: str, fields: set[str]) -> str:
    """A PPOConfig or RunConfig error in the command line's words: each fault's leading field name, and any field name
    with an underscore, as its flag (learning_rate -> --learning-rate)."""
    flag = lambda m: f"--{m[0].replace('_', '-')}" if m[0] in fields else m[0]  # noqa: E731
    parts = [re.sub(r"^\w+\b", flag, part) for part in message.split("; ")]
    # (not inside a quoted value, the user's own: a path, a --decode-config key; nor within a path or a word)
    pieces = re.split(r"""('[^']*'|"[^"]*")""", "; ".join(parts))
    return "".join(p if k % 2 else re.sub(r"(?<![-\w/.])[a-z]+(?:_[a-z0-9]+)+\b(?![/.]\w)", flag, p)
                   for k, p in enumerate(pieces))  # fmt: skip


def build_tiny_models(directory: str, seed: int = 0) -> tuple[str, str]:
    """A tiny random policy and reward model saved as HF checkpoints under `directory` (kept if there, built from
    this `seed`: another seed's are built again).

    Under torchrun every rank calls this (save_pretrained is collective; global rank 0 writes).
    """
    from engine.checkpoint import save_pretrained
    from engine.distributed import collective_device
    from engine.durable import atomic_write
    from engine.model import Transformer
    from engine.tokenizer import TINY_DIR

    cfg = ModelConfig.named("tiny")
    policy_dir, reward_dir = os.path.join(directory, "policy"), os.path.join(directory, "reward")
    seed_file = os.path.join(directory, "seed.json")
    same_seed = _built_seed(directory) == seed
    missing = [not (same_seed and os.path.exists(os.path.join(d, "config.json"))) for d in (policy_dir, reward_dir)]
    if dist.is_initialized():  # decide together, before rank 0 writes anything
        flags = torch.tensor(missing, dtype=torch.int32, device=collective_device())
        dist.broadcast(flags, src=0)
        missing = [bool(x) for x in flags.tolist()]
    writer = not dist.is_initialized() or dist.get_rank() == 0
    if any(missing) and writer and os.path.exists(seed_file):  # (a kill while rebuilding leaves no seed naming it)
        os.remove(seed_file)
    if missing[0]:
        policy = Transformer(cfg, "lm").init_weights(seed=seed)
        with torch.no_grad():
            # A random model almost never samples EOS (1 in 512), so every response would get the
            # missing-EOS penalty and the RM score would never matter: give every embedding a shared
            # component that the LM head turns into an EOS logit: p(EOS) about 1/40 on random contexts over the
            # whole vocabulary at temperature 1 (tests/engine/test_trainer.py checks 1/100 to 1/10); EOS is then
            # the likeliest token, and sampling at the recipe's temperature 0.7 ends responses after ~5 tokens.
            policy.embed_tokens.weight[:, 0] += 0.1
            policy.lm_head.weight[cfg.eos_token_id, 0] = 0.85
        save_pretrained(policy, policy_dir, tokenizer_dir=TINY_DIR)
    if missing[1]:
        rm = Transformer(cfg, "score").init_weights(seed=seed + 1)
        with torch.no_grad():
            rm.score.weight.mul_(10.0)  # scores of order 1, so the reward outweighs the KL term
        save_pretrained(rm, reward_dir, tokenizer_dir=TINY_DIR)
    if any(missing) and writer:
        atomic_write(seed_file, lambda f: f.write(json.dumps({"seed": seed}).encode()))
    return policy_dir, reward_dir


def _built_seed(directory: str) -> int | None:
    """The --seed the tiny models in `directory` were built from (None: not recorded)."""
    try:
        with open(os.path.join(directory, "seed.json")) as f:
            return json.load(f).get("seed")
    except (OSError, ValueError, AttributeError):
        return None


def _demo_ran_in(output_dir: str, init_dir: str, moved: bool = False) -> bool:
    """Whether the tiny default ran in output_dir before: its init/ models are there and the last launch recorded there
    (if any) trained them, not a run of other models that only holds an init/ directory. `moved`: also when the
    directory has been moved or copied since (that launch trained the init/ models of the directory it ran in)."""
    from engine.run_logs import LAUNCHES

    if not os.path.isdir(init_dir):
        return False
    try:
        with open(os.path.join(output_dir, LAUNCHES)) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return True
    try:
        record = json.loads(lines[-1])["run"] if lines else {"policy": os.path.join(init_dir, "policy")}
        policy = str(record["policy"])
        if moved and lines:
            return os.path.relpath(policy, str(record["output_dir"])) == os.path.join("init", "policy")
    except (ValueError, KeyError, TypeError):  # (a damaged record: not known to be the demo's)
        return False
    return os.path.realpath(policy) == os.path.realpath(os.path.join(init_dir, "policy"))


def _refuse_another_run(output_dir: str, init_dir: str) -> None:
    """prepare_tiny's --resume: refused in an output directory that holds a run of other models than the demo's."""
    from engine.errors import OutputInUse
    from engine.output_dir import run_files

    if not _demo_ran_in(output_dir, init_dir, moved=True) and run_files(output_dir):
        raise OutputInUse(
            f"{output_dir} holds a run of other models than the tiny default's: resume it with its own "
            "--policy, --reward and --prompts (without --policy, --resume continues the tiny default)"
        )


def _check_built_seed(run: RunConfig, init_dir: str) -> None:
    """prepare_tiny's --resume: refused with another --seed than the one the demo's models were built from."""
    from engine.errors import InvalidInput
    from engine.resume import resume_checkpoint

    built = _built_seed(init_dir)
    if built is not None and built != run.seed and resume_checkpoint(run.output_dir) is not None:
        raise InvalidInput(
            f"--seed {run.seed}: the tiny default's run in {run.output_dir} was built and trained with --seed "
            f"{built}; resume it with --seed {built}"
        )


def prepare_tiny(run: RunConfig) -> RunConfig:
    """Build the tiny default's models (if not there yet) and fill in its paths."""
    from engine.distributed import together
    from engine.output_dir import check_writable, start_fresh
    from engine.resume import check_resumable
    from engine.tokenizer import TINY_DIR, TINY_EVAL_PROMPTS, TINY_PROMPTS

    rank = dist.get_rank() if dist.is_initialized() else 0
    check_writable(run.output_dir, rank)  # (before building models there)
    init_dir = os.path.join(run.output_dir, "init")
    # (the demo starts over there; another run's is not overwritten. Read on every rank: an unreadable launches.jsonl
    # on one node alone stops every rank, none waits in start_fresh's collectives)
    demo_dir = together("preparing the tiny default", _demo_ran_in, run.output_dir, init_dir)
    if not (demo_dir or run.overwrite_output_dir or run.resume):
        start_fresh(run.output_dir, False, rank)  # another run's directory: refused before the demo writes models in it
    elif run.eval_only and not run.overwrite_output_dir:  # (the demo's run there: refused before init/ is rebuilt)
        start_fresh(run.output_dir, False, rank, evaluation=True)
    elif run.resume:  # (the demo would write its models into another run's directory, and start over or fail there)
        together("resuming the tiny default", _refuse_another_run, run.output_dir, init_dir)
    if run.resume:  # (`latest` naming a checkpoint that is gone: refused before init/ is rebuilt, as setup refuses it)
        together("reading the checkpoint to resume", check_resumable, run.output_dir)
        built = together("resuming the tiny default", _built_seed, init_dir)
        if built is not None and run.run_flags is not None and "seed" not in run.run_flags:
            run = dataclasses.replace(run, seed=built)  # (left out: the run's, as setup takes a checkpoint's)
        # (refused here, before init/ is rebuilt from another seed: its policy is the run's reference model)
        together("resuming the tiny default", _check_built_seed, run, init_dir)
    build_tiny_models(init_dir, seed=run.seed)
    return dataclasses.replace(
        run,
        # the demo starts over each time in its own directory (--resume still continues it); an --eval-only there is
        # refused as in any run's directory, not the demo's training run deleted
        overwrite_output_dir=run.overwrite_output_dir or (demo_dir and not run.eval_only),
        policy=os.path.join(init_dir, "policy"),
        reward=os.path.join(init_dir, "reward"),
        prompts=TINY_PROMPTS,
        # the shipped held-out prompts unless evaluation is turned off ("") or given otherwise
        eval_prompts=TINY_EVAL_PROMPTS if run.eval_prompts is None and not run.eval_holdout else run.eval_prompts,
        tokenizer=run.tokenizer or TINY_DIR,
    )


def main(argv: list[str] | None = None, *, generator_factory=None) -> list[dict]:
    """Parse flags, set up, train; returns the per-iteration metrics (with --eval-only: the evaluation's)."""
    from engine.distributed import backend_for, init_process_grid
    from engine.output_dir import lock_output_dir, unlock_output_dir

    cfg, run, tiny = parse_args(argv)
    grid = init_process_grid(run.tp, backend_for(run.device), timeout_minutes=run.dist_timeout_minutes)
    try:
        # an output directory that is there already is locked before anything reads or writes in it (a resume's
        # `latest`, check_writable's probe): a run going on there is named first; a new one, as check_writable makes it
        lock_output_dir(run.output_dir if os.path.isdir(run.output_dir) else None, grid.rank)
        if tiny:
            run = prepare_tiny(run)
        if run.eval_only:
            from engine.evaluate import evaluate_only

            return [evaluate_only(cfg, run, grid, generator_factory)]
        kw = {"generator_factory": generator_factory} if generator_factory else {}
        state = setup(cfg, run, grid=grid, **kw)
        if argv is not None:  # (main called with its own flags, not this process's: what launches.jsonl records)
            state.command = [sys.argv[0] if sys.argv else "train_ppo.py", *argv]
        return train(state)
    finally:
        unlock_output_dir(run.output_dir)  # (check_writable's lock: a later run in this process may take it)
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(argv: list[str] | None = None, **kw) -> list[dict]:
    """The command line: main(argv, **kw), an error in the run's inputs reported in one line with exit code 2, any
    other with its traceback (engine.errors.run_command); a run a signal stopped after its checkpoint exits with
    STOPPED_EXIT (75)."""
    from engine.errors import STOPPED_EXIT, run_command

    history = run_command(
        lambda: main(argv, **kw),
        "train_ppo.py",
        "free space, then --resume continues exactly from the last checkpoint",
        argv,
    )
    if getattr(history, "stopped", False):  # (a signal stopped it after a checkpoint: not done)
        raise SystemExit(STOPPED_EXIT)
    return history


if __name__ == "__main__":
    cli()
