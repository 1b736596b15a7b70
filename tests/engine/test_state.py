"""engine/state.py's checks and decisions: a resume's hyperparameters (the checkpoint's, the command line's, the
legacy defaults), RunConfig's bounds, the context and recompute checks, and the offload decisions as on a GPU."""

import dataclasses
import json
import shutil
import types

import pytest
import torch

from engine import memory_plan, offload
from engine import state as state_mod
from engine.config import PPOConfig
from engine.errors import InvalidInput
from engine.kv_cache import bytes_per_block
from engine.parallel import ProcessGrid
from engine.state import RunConfig, resumed_config
from tests.engine.runs import tiny_state


def _fake_checkpoint(monkeypatch, saved):
    monkeypatch.setattr(state_mod, "latest_checkpoint", lambda out: "ckpt")
    monkeypatch.setattr(state_mod, "saved_ppo_config", lambda ckpt: dict(saved))


def test_api_resume_keeps_cfg_as_given(monkeypatch, tmp_path):
    """A resume through the library (no command line: ppo_flags None) keeps the PPOConfig it is given."""
    _fake_checkpoint(monkeypatch, {**dataclasses.asdict(PPOConfig()), "learning_rate": 1.0})
    cfg = PPOConfig(learning_rate=3e-3)
    out = resumed_config(cfg, RunConfig(output_dir=str(tmp_path), ppo_flags=None))
    assert out.learning_rate == 3e-3


def test_a_checkpoint_predating_top_k_resumes_at_the_legacy_values(monkeypatch, tmp_path):
    saved = dataclasses.asdict(PPOConfig())
    del saved["top_k"], saved["top_p"]
    _fake_checkpoint(monkeypatch, saved)
    out = resumed_config(PPOConfig(top_k=50, top_p=0.9), RunConfig(output_dir=str(tmp_path), ppo_flags=()))
    assert (out.top_k, out.top_p) == (0, 1.0)
    # one given on the command line still wins over the legacy value
    out = resumed_config(PPOConfig(top_k=50, top_p=0.9), RunConfig(output_dir=str(tmp_path), ppo_flags=("top_k",)))
    assert (out.top_k, out.top_p) == (50, 1.0)


def test_kv_cache_fraction_one_is_allowed():
    assert RunConfig(kv_cache_fraction=1.0).kv_cache_fraction == 1.0
    with pytest.raises(InvalidInput, match="kv_cache_fraction"):
        RunConfig(kv_cache_fraction=1.0001)


def test_a_two_digit_cuda_index_is_a_device():
    assert RunConfig(device="cuda:10").device == "cuda:10"


def _tiny_run(tmp_path, *flags):
    from engine.tokenizer import TINY_PROMPTS
    from engine.train_ppo import build_tiny_models, parse_args

    policy, reward = build_tiny_models(str(tmp_path / "m"))
    cfg, run, _ = parse_args(["--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS, *flags])
    return cfg, run, policy, reward


def test_context_one_token_over_is_refused(tmp_path):
    """The tiny models' context is 2048 tokens: exactly that fits, one more is refused."""
    cfg, run, _, _ = _tiny_run(tmp_path, "--max-prompt-len", "128", "--max-new-tokens", "1920")
    state_mod.check_context(run, cfg, ProcessGrid())  # exactly the context: fine
    cfg = dataclasses.replace(cfg, max_new_tokens=1921)
    with pytest.raises(InvalidInput, match=r"= 2049 tokens do not fit the policy model's context"):
        state_mod.check_context(run, cfg, ProcessGrid())


def test_recomputing_more_layers_than_the_value_model_has_is_refused(tmp_path):
    cfg, run, _, reward = _tiny_run(tmp_path, "--activation-checkpointing", "2")
    shallow = tmp_path / "shallow-rm"
    shutil.copytree(reward, shallow)
    c = json.loads((shallow / "config.json").read_text())
    (shallow / "config.json").write_text(json.dumps({**c, "num_hidden_layers": 1}))
    run = dataclasses.replace(run, reward=str(shallow))
    with pytest.raises(InvalidInput, match=r"--activation-checkpointing 2: the value model \(from --reward\) has 1"):
        state_mod.check_context(run, cfg, ProcessGrid())


@pytest.fixture
def gpu_like(tmp_path, monkeypatch):
    """The tiny state with decide_offload run as on a GPU: the cache's budget (2 full-length sequences unless given)
    and the host's memory stubbed."""
    state = tiny_state(tmp_path, "--max-iterations", "1")
    state.device = torch.device("cuda", 0)
    c, cfg = state.policy.config, state.cfg
    per_seq = bytes_per_block(c.num_layers, 1, c.num_kv_heads, c.head_dim, torch.float32)
    per_seq *= cfg.max_prompt_len + cfg.max_new_tokens
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


def test_a_fixed_kv_cache_is_not_enlarged_by_offloading(gpu_like, monkeypatch, capsys):
    g = gpu_like
    seq_len = g.state.cfg.max_prompt_len + g.state.cfg.max_new_tokens
    monkeypatch.setattr(state_mod, "bytes_per_block", lambda *a: 2**19 // seq_len + 1)  # 1 MiB: 1 sequence
    assert 2**20 + g.nbytes >= 2 * (2**19 // seq_len + 1) * seq_len  # (offloading would add room, were it not fixed)
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
