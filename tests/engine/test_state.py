"""engine/state.py's and engine/preflight.py's checks and decisions: a resume's hyperparameters (the checkpoint's,
the command line's, the legacy defaults), RunConfig's bounds, the context and recompute checks, and the offload
decisions as on a GPU."""

import dataclasses
import json
import os
import re
import shutil
import types

import pytest
import torch

from engine import memory_plan, offload, preflight, saved_run
from engine import state as state_mod
from engine.config import PPOConfig
from engine.distributed import ProcessGrid
from engine.errors import InvalidInput
from engine.kv_cache import bytes_per_block
from engine.saved_run import checkpoint_config, checkpoint_position
from engine.state import RunConfig
from engine.train_ppo import parse_args, prepare_tiny
from tests.engine.ranks import init_gloo, leave, outcome
from tests.engine.runs import tiny_state


def _fake_checkpoint(monkeypatch, saved):
    monkeypatch.setattr(saved_run, "saved_ppo_config", lambda ckpt: dict(saved))


def test_api_resume_keeps_cfg_as_given(monkeypatch, tmp_path):
    """A resume through the library (no command line: ppo_flags None) keeps the PPOConfig it is given."""
    _fake_checkpoint(monkeypatch, {**dataclasses.asdict(PPOConfig()), "learning_rate": 1.0})
    cfg = PPOConfig(learning_rate=3e-3)
    out = checkpoint_config(cfg, RunConfig(output_dir=str(tmp_path), ppo_flags=None), "ckpt")
    assert out.learning_rate == 3e-3


def test_a_checkpoint_predating_top_k_resumes_at_the_legacy_values(monkeypatch, tmp_path):
    saved = dataclasses.asdict(PPOConfig())
    del saved["top_k"], saved["top_p"]
    _fake_checkpoint(monkeypatch, saved)
    out = checkpoint_config(PPOConfig(top_k=50, top_p=0.9), RunConfig(output_dir=str(tmp_path), ppo_flags=()), "ckpt")
    assert (out.top_k, out.top_p) == (0, 1.0)
    # one given on the command line still wins over the legacy value
    out = checkpoint_config(
        PPOConfig(top_k=50, top_p=0.9), RunConfig(output_dir=str(tmp_path), ppo_flags=("top_k",)), "ckpt"
    )
    assert (out.top_k, out.top_p) == (50, 1.0)


def test_a_checkpoint_that_saved_a_later_field_resumes_at_its_own_value_not_the_legacy_one(monkeypatch, tmp_path):
    """LEGACY_PPO_VALUES stand in only for fields a checkpoint predates: one that saved top_k=50 and an entropy bonus
    resumes with them, not at the legacy top_k 0 (sampling from the whole vocabulary halfway through the run)."""
    _fake_checkpoint(monkeypatch, {**dataclasses.asdict(PPOConfig()), "top_k": 50, "top_p": 0.9, "entropy_coef": 0.01})
    out = checkpoint_config(PPOConfig(), RunConfig(output_dir=str(tmp_path), ppo_flags=()), "ckpt")
    assert (out.top_k, out.top_p, out.entropy_coef) == (50, 0.9, 0.01)


def _state_file_with(ckpt, record: dict) -> str:
    """A checkpoint directory whose rank 0 state file holds `record` (what saved_run reads of it)."""
    os.makedirs(ckpt, exist_ok=True)
    torch.save(record, saved_run.state_file(str(ckpt), 0))
    return str(ckpt)


def test_a_resume_takes_each_run_setting_its_command_line_leaves_out(tmp_path, capsys):
    """checkpoint_run: a --resume (or --eval-only of a checkpoint's policy) without --seed, --eval-greedy, --ignore-eos
    or --chat-template takes each from the checkpoint (the chat template too: the run's prompts rendered otherwise
    would score another text than it trained on), a flag given wins, nothing is warned of; through the library
    (run_flags None) the RunConfig is kept as given."""
    saved = {"seed": 7, "eval_greedy": True, "ignore_eos": True, "chat_template": "tokenizer"}
    ckpt = _state_file_with(tmp_path / "checkpoint-2", {"run": saved, "data": {"seed": 99}})
    out = saved_run.checkpoint_run(RunConfig(output_dir=str(tmp_path), run_flags=()), ckpt)
    assert {k: getattr(out, k) for k in saved_run.RUN_SETTINGS} == saved
    given = RunConfig(output_dir=str(tmp_path), run_flags=("seed", "chat_template"), seed=1, chat_template="tulu")
    out = saved_run.checkpoint_run(given, ckpt)
    assert (out.seed, out.chat_template, out.eval_greedy, out.ignore_eos) == (1, "tulu", True, True)
    api = RunConfig(output_dir=str(tmp_path), run_flags=None, seed=1)
    assert saved_run.checkpoint_run(api, ckpt) == api
    assert "warning" not in capsys.readouterr().out


def test_an_older_checkpoint_resumes_with_its_prompt_orders_seed_and_names_the_other_settings(tmp_path, capsys):
    """saved_run_settings / checkpoint_run: a checkpoint from before the run settings were saved (no "run" record)
    still holds its data loader's seed: a resume without --seed takes it (its prompt order and samples go on, not seed
    0's), and the settings it cannot know are named in a warning, the flags given left out of it."""
    ckpt = _state_file_with(tmp_path / "checkpoint-2", {"data": {"seed": 5}})
    assert saved_run.saved_run_settings(ckpt) == {"seed": 5}
    out = saved_run.checkpoint_run(RunConfig(output_dir=str(tmp_path), run_flags=("ignore_eos",)), ckpt)
    assert out.seed == 5
    said = capsys.readouterr().out
    assert f"warning: {ckpt} predates the record of its run's --eval-greedy (False), --chat-template (tulu):" in said
    assert "--seed" not in said and "--ignore-eos" not in said


def test_kv_cache_fraction_one_is_allowed():
    assert RunConfig(kv_cache_fraction=1.0).kv_cache_fraction == 1.0
    with pytest.raises(InvalidInput, match="kv_cache_fraction"):
        RunConfig(kv_cache_fraction=1.0001)


def test_a_two_digit_cuda_index_is_a_device():
    assert RunConfig(device="cuda:10").device == "cuda:10"
    for bad in ("cuda:", "cpu0", "cuda:1x", "autocpu"):  # (the whole name: not a device's that it begins with)
        assert preflight.device_error(bad) == f"device must be auto, cpu, cuda or cuda:N, got {bad!r}"


def _tiny_run(tmp_path, *flags):
    from engine.tokenizer import TINY_PROMPTS
    from engine.train_ppo import build_tiny_models, parse_args

    policy, reward = build_tiny_models(str(tmp_path / "m"))
    cfg, run, _ = parse_args(["--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS, *flags])
    return cfg, run, policy, reward


def test_context_one_token_over_is_refused(tmp_path):
    """The tiny models' context is 2048 tokens: exactly that fits, one more is refused."""
    cfg, run, _, _ = _tiny_run(tmp_path, "--max-prompt-len", "128", "--max-new-tokens", "1920")
    preflight.check_context(run, cfg, ProcessGrid())  # exactly the context: fine
    cfg = dataclasses.replace(cfg, max_new_tokens=1921)
    with pytest.raises(InvalidInput, match=r"= 2049 tokens do not fit the policy model's context"):
        preflight.check_context(run, cfg, ProcessGrid())


def test_recomputing_more_layers_than_the_value_model_has_is_refused(tmp_path):
    cfg, run, _, reward = _tiny_run(tmp_path, "--activation-checkpointing", "2")
    shallow = tmp_path / "shallow-rm"
    shutil.copytree(reward, shallow)
    c = json.loads((shallow / "config.json").read_text())
    (shallow / "config.json").write_text(json.dumps({**c, "num_hidden_layers": 1}))
    run = dataclasses.replace(run, reward=str(shallow))
    with pytest.raises(InvalidInput, match=r"--activation-checkpointing 2: the value model \(from --reward\) has 1"):
        preflight.check_context(run, cfg, ProcessGrid())


@pytest.fixture
def gpu_like(tmp_path, monkeypatch):
    """The tiny state with decide_offload run as on a GPU: the cache's budget (2 full-length sequences unless given)
    and the host's memory stubbed."""
    state = tiny_state(tmp_path, "--max-iterations", "1")
    state.device = torch.device("cuda", 0)
    c, cfg = state.policy.config, state.cfg
    seq_len = cfg.max_prompt_len + cfg.max_new_tokens
    assert seq_len % 16  # (a partly filled last block, which the generator allocates whole)
    per_seq = bytes_per_block(c.num_layers, 16, c.num_kv_heads, c.head_dim, torch.float32) * (seq_len // 16 + 1)
    nbytes = offload.state_bytes(state.policy_opt) + offload.state_bytes(state.value_opt)
    mbytes = sum(offload.weight_bytes(m) for m in (state.ref, state.reward, state.value))
    monkeypatch.setattr(memory_plan, "host_available", lambda: 2**40)

    def decide(opt, models, budget_seqs=2, **run_kw):
        monkeypatch.setattr(state_mod, "cuda_cache_budget", lambda *a, **k: budget_seqs * per_seq)
        state.run = dataclasses.replace(state.run, offload_optimizer=opt, offload_idle_models=models, **run_kw)
        return state_mod.decide_offload(state)

    return types.SimpleNamespace(state=state, per_seq=per_seq, nbytes=nbytes, mbytes=mbytes, decide=decide)


def test_offload_decisions_follow_one_another(gpu_like, capsys):
    """decide_offload as on a GPU (the cache's budget and the host's memory given): --offload-optimizer first, then
    --offload-idle-models from the cache the first left; a host-resident state (always) is not counted twice."""
    state, per_seq, nbytes, mbytes = gpu_like.state, gpu_like.per_seq, gpu_like.nbytes, gpu_like.mbytes
    assert nbytes // per_seq > 8 and mbytes // per_seq > 8  # (either alone makes room for the rollout's 8)

    def decide(opt, models, **run_kw):
        capsys.readouterr()
        return gpu_like.decide(opt, models, **run_kw), capsys.readouterr().out

    # (the sequences a cache of 2 plus what moves out holds, at most what the generator's slots fill: it allocates
    # no more)
    holds = lambda moved: min((2 * per_seq + moved) // per_seq, state.run.gen_max_num_seqs)  # noqa: E731
    assert holds(nbytes) == holds(mbytes) == state.run.gen_max_num_seqs > 8
    (o, m), out = decide("auto", "auto")
    assert (o, m) == (True, False) and f"holds {holds(nbytes)} sequences" in out
    (o, m), out = decide("off", "auto")
    assert (o, m) == (False, True) and f"holds {holds(mbytes)} instead of 2 full-length" in out
    (o, m), out = decide("always", "auto")  # (its state is in host memory already: the budget above excludes it)
    assert (o, m) == (True, True) and "updated in chunks" in out
    (o, m), out = decide("rollouts", "rollouts")
    assert (o, m) == (True, True) and f"holds {holds(nbytes + mbytes)} instead of " in out
    (o, m), out = decide("off", "off")
    assert (o, m) == (False, False)
    (o, m), out = decide("auto", "auto", kv_cache_mb=1)  # a fixed cache, whatever the GPU's memory
    assert (o, m) == (False, False) and out.count(f"KV cache holds {2**20 // per_seq} sequences") == 2


def test_host_memory_taken_by_the_first_offload_counts_every_local_rank(gpu_like, monkeypatch):
    g = gpu_like
    L = memory_plan.HOST_LIMIT
    host = int(2 * g.nbytes + (2 * g.mbytes) / L - g.nbytes / 2)  # room for both only if the first took one rank's
    assert 2 * g.nbytes <= L * host
    monkeypatch.setattr(memory_plan, "local_ranks", lambda: 2)
    monkeypatch.setattr(memory_plan, "host_available", lambda: host)
    with pytest.raises(
        InvalidInput, match=r"idle models. weights \(.*\) in host memory \(--offload-idle-models rollouts\)"
    ):
        g.decide("rollouts", "rollouts")


def test_auto_leaves_the_host_memory_an_explicit_idle_offload_needs(gpu_like, monkeypatch, capsys):
    """--offload-optimizer auto beside --offload-idle-models rollouts, on a host with room for either but not both:
    auto keeps the optimizer state on the GPU, and the idle models go out as asked (auto took the host memory first,
    and the run that had loaded every model was then refused for the idle models' room)."""
    g = gpu_like
    monkeypatch.setattr(state_mod, "weight_bytes", lambda m: 2 * offload.weight_bytes(m))
    m, n = 2 * g.mbytes, g.nbytes
    host = 2 * n + 2
    assert n <= memory_plan.OFFLOAD_HOST_SHARE * host and m > memory_plan.HOST_LIMIT * (host - n)  # (either alone)
    assert m <= memory_plan.HOST_LIMIT * host and n > memory_plan.OFFLOAD_HOST_SHARE * (host - m)
    monkeypatch.setattr(memory_plan, "host_available", lambda: host)
    capsys.readouterr()
    assert g.decide("auto", "rollouts") == (False, True)
    assert g.decide("auto", "auto") == (True, False)  # (auto and auto: the optimizer first, as before)
    # two ranks on the node: auto leaves both ranks' idle weights their room (a host with room for the state beside
    # one rank's of them, not two)
    monkeypatch.setattr(memory_plan, "local_ranks", lambda: 2)
    monkeypatch.setattr(memory_plan, "host_available", lambda: 4 * n + m + 2)
    assert g.decide("auto", "rollouts") == (False, True)


def test_a_fixed_kv_cache_is_not_enlarged_by_offloading(gpu_like, monkeypatch, capsys):
    g = gpu_like
    blocks = (g.state.cfg.max_prompt_len + g.state.cfg.max_new_tokens) // 16 + 1  # (a sequence's, in whole blocks)
    monkeypatch.setattr(state_mod, "model_block_bytes", lambda *a, **k: 2**19 // blocks + 1)  # 1 MiB: 1 sequence
    assert 2**20 + g.nbytes >= 2 * (2**19 // blocks + 1) * blocks  # (offloading would add room, were it not fixed)
    capsys.readouterr()
    assert g.decide("auto", "off", kv_cache_mb=1) == (False, False)
    assert "--kv-cache-mb fixes it" in capsys.readouterr().out


def test_offload_only_if_every_rank_would(gpu_like, monkeypatch, capsys):
    other_rank = 0  # another rank that would not offload
    monkeypatch.setattr(
        state_mod, "agree", lambda v, op, *a, **k: [min(v[0], other_rank) if op == "min" else max(v[0], other_rank)]
    )
    capsys.readouterr()
    assert gpu_like.decide("rollouts", "off") == (False, False)
    assert "another rank has no room to offload" in capsys.readouterr().out


def test_wanted_sequences_are_a_ranks_share_of_the_rollout(gpu_like):
    """A cache of 5 sequences holds a DP rank's 4 of the rollout's 8: auto does not offload."""
    g = gpu_like
    g.state.grid = dataclasses.replace(g.state.grid, world_size=2, dp=2)
    assert g.decide("auto", "off", budget_seqs=5) == (False, False)
    g.state.grid = dataclasses.replace(g.state.grid, world_size=1, dp=1)
    assert g.decide("auto", "off", budget_seqs=5) == (True, False)  # (one rank: 8 wanted, 5 held)


def test_batch_sizes_against_the_rollout_and_the_data_parallel_ranks(capsys):
    """check_batch_sizes: a rollout's rollout_batch_size x samples_per_prompt sequences in whole minibatches, both
    batch sizes split over the DP ranks, and the warning for a rank's share that splits a prompt's samples only
    where there are several ranks (one rank's minibatches are what they are)."""
    check = preflight.check_batch_sizes
    check(PPOConfig(train_batch_size=8, rollout_batch_size=4, samples_per_prompt=2), ProcessGrid())  # 8 sequences
    with pytest.raises(InvalidInput, match="rollout of 12 sequences is not a multiple of train_batch_size 8"):
        check(PPOConfig(train_batch_size=8, rollout_batch_size=4, samples_per_prompt=3), ProcessGrid())
    with pytest.raises(InvalidInput, match="must be multiples of the data-parallel size 2"):  # (a rollout of 9)
        check(
            PPOConfig(train_batch_size=6, rollout_batch_size=9, samples_per_prompt=2), ProcessGrid(world_size=2, dp=2)
        )
    capsys.readouterr()
    check(PPOConfig(train_batch_size=4, rollout_batch_size=4, samples_per_prompt=3), ProcessGrid())
    assert capsys.readouterr().out == ""


def test_a_prompts_samples_may_fill_the_generators_slots(monkeypatch):
    """setup: --samples-per-prompt equal to --gen-max-num-seqs decodes a prompt's samples together; one more is
    refused (before the paths are checked)."""
    run = RunConfig(policy="p", reward="r", prompts="x.jsonl", gen_max_num_seqs=4)

    class Checked(Exception):
        pass

    monkeypatch.setattr(state_mod, "check_paths", lambda run: (_ for _ in ()).throw(Checked()))
    cfg = PPOConfig(train_batch_size=8, rollout_batch_size=8, samples_per_prompt=4)
    with pytest.raises(Checked):
        state_mod.setup(cfg, run, grid=ProcessGrid())
    with pytest.raises(InvalidInput, match="--samples-per-prompt 5 exceeds --gen-max-num-seqs 4"):
        state_mod.setup(dataclasses.replace(cfg, samples_per_prompt=5, train_batch_size=8), run, grid=ProcessGrid())


def test_run_config_bounds():
    for kw, message in (
        ({"gen_max_num_seqs": 0}, "gen_max_num_seqs must be >= 1, got 0"),
        ({"kv_cache_fraction": 0.0}, r"kv_cache_fraction must be in \(0, 1\], got 0.0"),
        ({"activation_checkpointing": ""}, "activation_checkpointing must be auto, on, off or a number of layers"),
    ):
        with pytest.raises(InvalidInput, match=message):
            RunConfig(**kw)
    assert RunConfig(dist_timeout_minutes=1_000_000).dist_timeout_minutes == 1_000_000  # (the longest allowed)


def test_iterations_and_the_profiled_one():
    """A run's rollouts: every prompt epoch's full batches (the last partial one dropped), or --max-iterations of them
    when fewer; --profile-iteration may name the last one."""
    cfg = PPOConfig(rollout_batch_size=16, train_batch_size=16, prompt_epochs=3)
    assert preflight.run_iterations(50, cfg, RunConfig()) == 9
    assert preflight.run_iterations(50, cfg, RunConfig(max_iterations=20)) == 9
    assert preflight.run_iterations(50, cfg, RunConfig(max_iterations=4)) == 4
    preflight.check_profile_iteration(RunConfig(profile_iteration=9), 9)
    with pytest.raises(InvalidInput, match=r"--profile-iteration 10 is past the run's last iteration \(9\)"):
        preflight.check_profile_iteration(RunConfig(profile_iteration=10), 9)


def test_dtype_and_generator_settings(monkeypatch):
    """auto is bf16 on a GPU, fp32 on CPU; the generator gets the run's slots, context, cache fraction and dtype, and
    --kv-cache-mb in MiB."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert (
        preflight.resolve_dtype("auto", cuda) is torch.bfloat16
        and preflight.resolve_dtype("auto", cpu) is torch.float32
    )
    assert preflight.resolve_dtype("float16", cuda) is torch.float16
    import engine.generate

    built = []
    monkeypatch.setattr(engine.generate, "Generator", lambda model, **kw: built.append(kw))
    cfg = PPOConfig(max_prompt_len=100, max_new_tokens=28)
    run = RunConfig(gen_max_num_seqs=7, kv_cache_fraction=0.5, kv_cache_dtype="fp8", kv_cache_mb=3)
    state_mod.make_generator(None, cfg, run)
    state_mod.make_generator(None, cfg, dataclasses.replace(run, kv_cache_mb=0))
    assert built == [
        dict(max_num_seqs=7, max_model_len=128, kv_cache_fraction=0.5, kv_cache_dtype="fp8", kv_cache_bytes=3 * 2**20),
        dict(max_num_seqs=7, max_model_len=128, kv_cache_fraction=0.5, kv_cache_dtype="fp8"),
    ]


def test_the_schedule_spans_every_rollouts_optimizer_steps():
    """make_state: the LR schedule's steps are every rollout's (2 prompt epochs of 10 prompts in full batches of 4:
    4 rollouts) ppo_epochs passes over its 8 sequences in minibatches of 4, whatever --max-iterations cuts short."""
    from engine.config import ModelConfig
    from engine.model import Transformer

    c = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    models = tuple(Transformer(c, head, dtype=torch.float32) for head in ("lm", "lm", "score", "score"))
    cfg = PPOConfig(rollout_batch_size=4, samples_per_prompt=2, train_batch_size=4, ppo_epochs=3, prompt_epochs=2)
    run = RunConfig(max_iterations=1, offload_optimizer="off", offload_idle_models="off")
    state = state_mod.make_state(cfg, run, ProcessGrid(), models, [[1, 2]] * 10, [0], generator_factory=None)
    assert state.iterations == 1 and state.total_steps == 4 * 3 * 2
    assert not any(p.requires_grad for m in (state.ref, state.reward) for p in m.parameters())  # (frozen)
    assert all(p.requires_grad for m in (state.policy, state.value) for p in m.parameters())


def test_the_cache_budget_keeps_the_generators_activations_free(gpu_like, monkeypatch):
    """decide_offload asks for the cache's budget less the generator's activation reserve (as the generator will)."""
    g = gpu_like
    asked = []
    monkeypatch.setattr(state_mod, "cuda_cache_budget", lambda *a, **k: asked.append((a, k)) or 2 * g.per_seq)
    g.state.run = dataclasses.replace(g.state.run, offload_optimizer="auto", offload_idle_models="off")
    state_mod.decide_offload(g.state)
    cfg, run = g.state.cfg, g.state.run
    reserve = memory_plan.generation_reserve(g.state.policy.config, 1, cfg.max_prompt_len + cfg.max_new_tokens,
                                             torch.float32, run.gen_max_num_seqs)  # fmt: skip
    assert asked == [((g.state.device, run.kv_cache_fraction, reserve), {"clamp": False})] and reserve > 0


def test_the_plan_on_a_gpu_caps_the_cache_at_the_generators_slots(tmp_path, monkeypatch, capsys):
    """setup's memory plan counts a rollout's cache as the generator allocates it: at most --gen-max-num-seqs
    full-length sequences, however much memory is left."""
    from tests.engine.hf_models import save_hf_model

    save_hf_model(tmp_path / "policy")
    save_hf_model(tmp_path / "rm", head="score")
    run = RunConfig(policy=str(tmp_path / "policy"), reward=str(tmp_path / "rm"), dtype="bfloat16", gen_max_num_seqs=3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 10 * 2**30))
    capsys.readouterr()
    preflight.check_memory(PPOConfig(), run, ProcessGrid(), torch.device("cuda", 0))
    assert "(3 sequences of 2048)" in capsys.readouterr().out


def test_no_plan_on_a_gpu_without_the_models_configs_keeps_the_optimizer_on_the_gpu(monkeypatch, capsys):
    """check_memory where a Hub id's config.json could not be had (config_sources: None; resolve_run names that): no
    plan printed, and the optimizer state not made host-resident on its account."""
    monkeypatch.setattr(preflight, "config_sources", lambda paths: None)
    capsys.readouterr()
    assert preflight.check_memory(PPOConfig(), RunConfig(), ProcessGrid(), torch.device("cuda", 0)) is False
    assert capsys.readouterr().out == ""


def test_an_evaluation_set_as_large_as_the_data_parallel_ranks(tmp_path):
    """Each DP rank answers at least one evaluation prompt: as many prompts as ranks is enough, fewer refused."""
    held = lambda n, seed: (types.SimpleNamespace(prompts=[[1]] * 8), types.SimpleNamespace(prompts=[[2]] * n))  # noqa: E731
    prompt_set, grid = types.SimpleNamespace(hold_out=held), ProcessGrid(world_size=2, dp=2)
    _, eval_set = preflight.evaluation_set(PPOConfig(), RunConfig(eval_holdout=2), grid, None, prompt_set)
    assert len(eval_set.prompts) == 2
    with pytest.raises(InvalidInput, match="1 eval prompts cannot be split over 2 data-parallel ranks"):
        preflight.evaluation_set(PPOConfig(), RunConfig(eval_holdout=1), grid, None, prompt_set)


def test_a_resume_restores_the_checkpoints_pairs_as_tuples(monkeypatch, tmp_path):
    """A checkpoint's JSON holds adam_betas as a list: the resumed PPOConfig has the tuple a fresh run has (equal to
    its defaults, hashable)."""
    _fake_checkpoint(monkeypatch, {**dataclasses.asdict(PPOConfig()), "adam_betas": [0.8, 0.95]})
    out = checkpoint_config(PPOConfig(), RunConfig(output_dir=str(tmp_path), ppo_flags=()), "ckpt")
    assert out.adam_betas == (0.8, 0.95) and isinstance(out.adam_betas, tuple)


def test_an_evaluated_checkpoints_position(tmp_path):
    """--eval-only of a PPO checkpoint's policy names its iteration and step (from the state file beside it); any
    other directory there (its value model) or elsewhere is at (0, 0)."""
    ckpt = tmp_path / "checkpoint-000005"
    for d in ("policy", "value"):
        (ckpt / d).mkdir(parents=True)
    torch.save({"iteration": 5, "step": 20}, ckpt / "state-rank00000.pt")
    assert checkpoint_position(str(ckpt / "policy")) == (5, 20)
    assert checkpoint_position(str(ckpt / "policy") + "/") == (5, 20)
    assert checkpoint_position(str(ckpt / "value")) == (0, 0)
    assert checkpoint_position(str(tmp_path)) == (0, 0)


def test_the_models_a_run_loads_and_an_evaluation_without_holdout():
    """model_sources: --reference when given (else the policy), a resume's trained two from its checkpoint, no value
    model for --eval-only; --eval-only refuses --eval-holdout (it draws from a training set) before anything else."""
    run = RunConfig(policy="p", reference="ref", reward="r")
    assert state_mod.model_sources(run, None) == {
        "policy": ("--policy", "p", "lm"),
        "reference": ("--reference", "ref", "lm"),
        "value": ("--reward (the value model's start)", "r", "score"),
        "reward": ("--reward", "r", "score"),
    }
    resumed = state_mod.model_sources(dataclasses.replace(run, reference=None), "ck", evaluation=True)
    assert resumed == {
        "policy": ("the checkpoint ck's policy", "ck/policy", "lm"),
        "reference": ("--policy (the reference)", "p", "lm"),
        "reward": ("--reward", "r", "score"),
    }
    with pytest.raises(InvalidInput, match=r"--eval-only takes --eval-prompts \(--eval-holdout draws from a training"):
        state_mod.setup_evaluation(PPOConfig(), RunConfig(policy="p", reward="r", eval_holdout=2), ProcessGrid())


def test_make_state_warns_of_split_samples_unless_setup_did(monkeypatch):
    """make_state checks the batch sizes again, and warns of a rank's share that splits a prompt's samples only when
    setup has not (checked=True: setup warned before loading the models, once)."""
    seen = []

    class Checked(Exception):
        pass

    def check(cfg, grid, warn=True):
        seen.append(warn)
        raise Checked

    monkeypatch.setattr(state_mod, "check_batch_sizes", check)
    for checked in (False, True):
        with pytest.raises(Checked):
            state_mod.make_state(PPOConfig(), RunConfig(), ProcessGrid(), (None,) * 4, [], [], checked=checked)
    assert seen == [True, False]


def test_a_fixed_kv_cache_must_hold_a_sequence_of_the_policys_kv_on_a_rank(tmp_path):
    """check_kv_cache_mb: one sequence of max_prompt_len + max_new_tokens in whole blocks of 16 tokens of the policy's
    K/V on a rank (its share of the heads at --tp) in the cache's dtype (the run's), against --kv-cache-mb; exactly
    as large is enough."""
    from engine.config import ModelConfig

    c = dataclasses.replace(ModelConfig.named("tiny"), num_layers=8)  # (2 K/V heads of 16: 32 KiB a block in fp32)
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf("lm")))
    cfg = PPOConfig(max_prompt_len=1024, max_new_tokens=1024)  # 128 blocks: 4 MiB in fp32
    cpu = torch.device("cpu")
    run = RunConfig(policy=str(tmp_path), reward=str(tmp_path), dtype="float32", kv_cache_mb=4)
    preflight.check_kv_cache_mb(run, cfg, ProcessGrid(), cpu)  # (exactly 4 MiB)
    with pytest.raises(InvalidInput, match=r"--kv-cache-mb 3: .* = 2048 tokens \(128 blocks of 16 tokens, 4\.00 MiB"):
        preflight.check_kv_cache_mb(dataclasses.replace(run, kv_cache_mb=3), cfg, ProcessGrid(), cpu)
    small = dataclasses.replace(run, kv_cache_mb=2)
    preflight.check_kv_cache_mb(small, cfg, ProcessGrid(world_size=2, tp=2), cpu)  # (a rank's one K/V head: 2 MiB)
    preflight.check_kv_cache_mb(dataclasses.replace(small, dtype="bfloat16"), cfg, ProcessGrid(), cpu)  # (bf16)
    with pytest.raises(InvalidInput, match=r"2\.00 MiB of the policy's K/V per GPU\): give it at least 2"):
        preflight.check_kv_cache_mb(dataclasses.replace(run, kv_cache_mb=1), cfg, ProcessGrid(world_size=2, tp=2), cpu)


def _one_rank_refuses_rank(rank, world, init_file, policy, reward, prompts, out_dir):
    import datetime

    import torch.distributed as dist

    from engine.errors import MissingInput

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    grid = ProcessGrid(rank=rank, world_size=world, tp=1, dp=world)
    gone = "-gone" if rank == 1 else ""  # (rank 1's copy of a file missing: a node-local disk)
    got = []

    def attempt(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
            got.append("ok")
        except Exception as e:
            got.append(f"{type(e).__name__}: {e}")
        dist.barrier()  # (the next case starts on both ranks together)

    sources = {"policy": ("--policy", policy, "lm"), "reward": ("--reward", reward + gone, "score")}
    attempt(preflight.check_checkpoints, sources)
    run = RunConfig(policy=policy, reward=reward, prompts=prompts, output_dir=os.path.join(out_dir, "run"), resume=True)

    def unread(*args):
        raise MissingInput("unread on this node")

    for name in ("check_resumable", "resume_checkpoint"):  # (the resume's reading of the checkpoint, failing on rank 1)
        real = getattr(state_mod, name)
        setattr(state_mod, name, unread if rank == 1 else real)
        attempt(state_mod.setup, PPOConfig(), run, grid=grid)
        setattr(state_mod, name, real)
    evaluation = dataclasses.replace(run, resume=False, eval_only=True, eval_prompts=prompts + gone)
    attempt(state_mod.setup_evaluation, PPOConfig(), evaluation, grid)
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


def test_a_check_that_fails_on_one_rank_alone_stops_every_rank_at_once_naming_it(tmp_path):
    """Two ranks, rank 1's node without a file rank 0's has (its copy of --reward or --eval-prompts, or a resume's
    checkpoint it cannot read): rank 1 names it and rank 0, which reports for the run, names rank 1's refusal at once
    (check_checkpoints, setup's resume block, setup_evaluation's path check), rather than going on alone and waiting in
    its next collective for a peer that has stopped."""
    import torch.multiprocessing as mp

    from engine.tokenizer import TINY_PROMPTS
    from engine.train_ppo import build_tiny_models

    policy, reward = build_tiny_models(str(tmp_path / "m"))
    args = (2, str(tmp_path / "init"), policy, reward, TINY_PROMPTS, str(tmp_path))
    mp.spawn(_one_rank_refuses_rank, args=args, nprocs=2)
    paths = "checking the checkpoints and prompt files"
    refusals = [
        ("checking the checkpoints", "MissingInput", f"--reward: checkpoint directory {reward}-gone does not exist"),
        *[("reading the checkpoint to resume", "MissingInput", "unread on this node")] * 2,
        (paths, "MissingInput", f"--eval-prompts {TINY_PROMPTS}-gone: no such file"),
    ]
    assert json.loads((tmp_path / "rank0").read_text()) == [
        f"FailedOnAnotherRank: {what} failed on rank 1: {message}" for what, _, message in refusals
    ]
    assert json.loads((tmp_path / "rank1").read_text()) == [f"{kind}: {message}" for _, kind, message in refusals]


def _stale_prompts_rank(rank, world, init_file, policy, reward, prompts, out_dir):

    init_gloo(rank, world, init_file)
    grid = ProcessGrid(rank=rank, world_size=world, tp=1, dp=world)
    mine = prompts if rank == 0 else os.path.join(out_dir, "stale.jsonl")  # (rank 1's node: a copy cut short)
    run = RunConfig(policy=policy, reward=reward, prompts=mine, output_dir=os.path.join(out_dir, "run"))
    cfg = PPOConfig(rollout_batch_size=4, train_batch_size=4, max_new_tokens=4)
    got = [
        outcome(state_mod.setup, cfg, run, grid=grid),
        outcome(state_mod.setup_evaluation, cfg, dataclasses.replace(run, eval_only=True, eval_prompts=mine), grid),
    ]
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


def test_a_prompt_file_that_differs_between_nodes_is_refused_on_every_rank(tmp_path):
    """A node whose copy of --prompts is stale or half copied (rank 1 reads 40 of its 48 lines): each rank dealt its
    rollouts from its own list and planned its own number of iterations; the updates mixed in silence until rank 1
    finished early and rank 0 waited out the process group's timeout (an hour by default) at the end. Now every rank
    refuses at setup, before a model is loaded, naming the flag and rank 1's count; --eval-only's --eval-prompts
    likewise."""
    import torch.multiprocessing as mp

    from engine.tokenizer import TINY_PROMPTS
    from engine.train_ppo import build_tiny_models

    policy, reward = build_tiny_models(str(tmp_path / "m"))
    lines = open(TINY_PROMPTS).read().splitlines(keepends=True)
    (tmp_path / "stale.jsonl").write_text("".join(lines[:40]))
    mp.spawn(
        _stale_prompts_rank, args=(2, str(tmp_path / "init"), policy, reward, TINY_PROMPTS, str(tmp_path)), nprocs=2
    )
    ranks = [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
    said = [
        rf"--prompts \S+: rank 1 tokenised other prompts than rank 0 \(rank 1's 40 against rank 0's {len(lines)}\)",
        r"--eval-prompts \S+: rank 1 tokenised other prompts than rank 0 \(rank 1's 40 against",
    ]
    for got in ranks:
        assert all(at_once for _, at_once in got), got
        for (message, _), pattern in zip(got, said):
            assert re.match("InvalidInput: " + pattern, message), (message, pattern)
        assert got[0][0].endswith("differs between nodes (stale, or still being copied)? every node must read the same")


def test_a_fault_in_the_checkpoint_check_is_raised_as_itself(monkeypatch):
    """check_checkpoints names the flag of the check's own findings (input errors) only: a bug of ours in the check
    leaves as itself, its message and traceback its own, not dressed as a refusal of --reward."""

    def bug(path, head):
        raise KeyError("a bug")

    monkeypatch.setattr(preflight, "check_checkpoint", bug)
    with pytest.raises(KeyError) as raised:
        preflight.check_checkpoints({"reward": ("--reward", "/some/reward", "score")})
    assert raised.value.args == ("a bug",) and raised.value.__cause__ is None


def _decide_offload_rank(rank, world, out_dir):

    init_gloo(rank, world, f"{out_dir}/init")
    state_mod.state_bytes = state_mod.weight_bytes = lambda x: 2**20  # (the optimizer state's and weights' bytes)
    state_mod.idle_models = lambda state: [("reference", None, True)]
    real = memory_plan.offload_decision

    def decision(*args):
        if rank == 1:
            raise RuntimeError("a bug")  # (not the ValueError of a host without room: a fault of ours, one rank)
        return real(*args)

    memory_plan.offload_decision = decision
    run = RunConfig(offload_optimizer="rollouts", offload_idle_models="off")
    grid = types.SimpleNamespace(dp=world, tp=1)
    state = types.SimpleNamespace(run=run, cfg=PPOConfig(), device=torch.device("cpu"), grid=grid, policy_opt=1,
                                  value_opt=1)  # fmt: skip
    got = outcome(lambda: repr(state_mod.decide_offload(state)), done=None)
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


def test_decide_offload_raises_one_ranks_error_on_every_rank_at_once(tmp_path):
    """decide_offload on two ranks (gloo): any error deciding an offload on one rank alone, not only a host without
    room (a ValueError), is raised on both at once, rank 0 naming rank 1 (rather than rank 0 waiting in the agreement
    on the decision for the process group's timeout)."""
    import torch.multiprocessing as mp

    mp.spawn(_decide_offload_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    assert got == [
        ["RuntimeError: deciding --offload-optimizer failed on rank 1: a bug", True],
        ["RuntimeError: a bug", True],
    ]


def _plan_rank(rank, world, init_file, out_dir):

    from engine.errors import MissingInput

    init_gloo(rank, world, init_file)

    def plan(*args):  # (a checkpoint rank 1's node lacks: its config unread there alone)
        if rank == 1:
            raise MissingInput("--reward: checkpoint directory rm does not exist")
        return "the plan", False

    preflight._plan_memory = plan
    grid = ProcessGrid(rank, world, dp=world)
    got = outcome(
        lambda: str(preflight.check_memory(PPOConfig(), RunConfig(), grid, torch.device("cuda", 0))), done=None
    )
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(json.dumps(got))
    leave()


def test_check_memorys_plan_failing_on_one_rank_stops_every_rank_at_once(tmp_path):
    """check_memory on two ranks (gloo, as on a GPU): its plan failing on rank 1 alone is raised on both at once, rank
    0 naming rank 1's error, rather than rank 0 waiting in the agreement for the process group's timeout."""
    import torch.multiprocessing as mp

    mp.spawn(_plan_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    missing = "--reward: checkpoint directory rm does not exist"
    assert json.loads((tmp_path / "rank0").read_text()) == [
        f"FailedOnAnotherRank: planning memory failed on rank 1: {missing}", True,
    ]  # fmt: skip
    assert json.loads((tmp_path / "rank1").read_text()) == [f"MissingInput: {missing}", True]


def test_the_runs_decode_config_takes_effect_before_its_generator_is_made():
    """--decode-config '{"linear": 1, "pdl": 1}': set process-wide (kernels.decode_config) before the generator
    factory runs, so every decode launch and captured graph of the run has it; an empty one leaves the defaults."""
    from kernels import decode_config

    seen = []
    factory = lambda policy, cfg, run: seen.append(dict(decode_config._overrides)) or "generator"  # noqa: E731
    run = state_mod.RunConfig(decode_config='{"linear": 1, "pdl": 1}')
    try:
        assert state_mod._with_decode_config(factory, None, PPOConfig(), run) == "generator"
        assert seen == [{"linear": 1, "pdl": 1}] and decode_config.linear_enabled()
    finally:
        decode_config.set_decode_config()
    state_mod._with_decode_config(factory, None, PPOConfig(), state_mod.RunConfig())
    assert seen[-1] == {}


def test_an_evaluation_alone_takes_the_decode_config_too(tmp_path):
    """--eval-only --decode-config: its generator made after the setting took effect, as a training run's (it was
    accepted and left out)."""
    from kernels import decode_config

    seen = []
    factory = lambda policy, cfg, run: seen.append(dict(decode_config._overrides)) or "generator"  # noqa: E731
    cfg, run, _ = parse_args(["--eval-only", "--output-dir", str(tmp_path), "--decode-config", '{"norm_rows": 2}'])
    try:
        state_mod.setup_evaluation(cfg, prepare_tiny(run), ProcessGrid(), generator_factory=factory)
        assert seen == [{"norm_rows": 2}] and decode_config.norm_rows() == 2
    finally:
        decode_config.set_decode_config()
