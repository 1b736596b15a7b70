"""engine/rollout.py's wiring: what a rollout's sampling is given (the run's stop ids, --ignore-eos) and where
forward_rollout reads the reward model's score (its config's pad_token_id, as transformers does). Their pieces are
tested apart elsewhere (reward_positions, the generator's stops); these check that the rollout passes them on."""

import types
from types import SimpleNamespace

import torch
from transformers import LlamaForSequenceClassification

from engine.checkpoint import load_pretrained
from engine.config import PPOConfig
from engine.data import Rollout
from engine.rollout import forward_rollout, generate_rollout, sampling_params
from engine.train_ppo import build_tiny_models
from kernels import dispatch
from tests.engine.runs import SMALL, tiny_state


def test_every_stop_id_of_the_run_reaches_the_rollouts_sampling():
    """Every stop id of the run (a generation_config.json list such as Llama 3's [<|end_of_text|>, <|eot_id|>]), not
    the first alone: a response would otherwise run past <|eot_id|> to the limit and take the missing-EOS penalty."""
    state = SimpleNamespace(cfg=PPOConfig(), run=SimpleNamespace(seed=0, ignore_eos=False), stop_ids=[2, 7])
    for greedy in (False, True):
        assert sampling_params(state, 0, greedy=greedy).stop_token_ids == [2, 7]


def test_sampling_params_of_an_ignore_eos_run_have_no_stop_ids():
    state = SimpleNamespace(cfg=PPOConfig(), run=SimpleNamespace(seed=0, ignore_eos=True), stop_ids=[2])
    p = sampling_params(state, 0)
    assert p.stop_token_ids == [] and p.ignore_eos


def test_ignore_eos_rollouts_run_to_the_length_limit(tmp_path):
    """--ignore-eos (bench/ppo_step.py's default): every response runs to --max-new-tokens, none marked as ended by
    EOS (the tiny policy's likeliest token is EOS: without the flag most stop early)."""
    state = tiny_state(tmp_path, "--max-new-tokens", "12", "--ignore-eos", "--top-k", "1")
    prompts = [[1, 5, 9], [1, 7, 3, 22], [1, 11], [1, 4, 4]]
    with dispatch.reference_ops():
        ro = generate_rollout(state, prompts, list(range(len(prompts))))
    assert [len(r) for r in ro.responses] == [12] * len(prompts)
    assert not ro.hit_eos.any()


def test_forward_rollout_reads_the_score_where_transformers_does_with_a_pad_token(tmp_path):
    """A reward model whose config names a pad_token_id (the EOS, as many HF reward models have it): forward_rollout
    scores each sequence where LlamaForSequenceClassification does, the token before a final EOS."""
    policy_dir, reward_dir = build_tiny_models(str(tmp_path / "tiny"))
    hf = LlamaForSequenceClassification.from_pretrained(reward_dir, torch_dtype=torch.float64)
    hf.config.pad_token_id = 2  # the EOS
    hf.save_pretrained(tmp_path / "rm")
    policy = load_pretrained(policy_dir, head="lm", dtype=torch.float32)
    reward = load_pretrained(str(tmp_path / "rm"), head="score", dtype=torch.float32)
    assert reward.config.pad_token_id == 2
    state = types.SimpleNamespace(
        policy=policy,
        ref=policy,
        value=reward,
        reward=reward,
        run=types.SimpleNamespace(micro_batch_tokens=10_000),
        device=torch.device("cpu"),
    )
    prompts, responses = [[1, 5, 9], [1, 7], [1, 4, 4]], [[11, 12, 2], [13, 14, 15], [16, 2]]
    ro = Rollout(prompts, responses, torch.tensor([True, False, True]), torch.zeros(8), [0, 3, 6, 8])
    with torch.no_grad(), dispatch.reference_ops():
        forward_rollout(state, ro)
        want = torch.cat([hf(input_ids=torch.tensor([p + r])).logits[:, 0] for p, r in zip(prompts, responses)])
    torch.testing.assert_close(ro.scores.double(), want, rtol=1e-5, atol=1e-5)


def test_a_reward_model_whose_pad_is_the_eos_is_named(tmp_path, capsys):
    """A reward model whose config.json names the EOS as its pad_token_id is scored, as transformers does, at the
    token before each response's EOS (EasyLM's scored the EOS): the run and --eval-only say so once, naming the id
    and the remedy; a reward model with another pad (or none) is not named."""
    import json
    import shutil

    from engine.distributed import init_process_grid
    from engine.state import setup, setup_evaluation
    from engine.tokenizer import TINY_DIR, TINY_EVAL_PROMPTS, TINY_PROMPTS
    from engine.train_ppo import parse_args

    policy_dir, reward_dir = build_tiny_models(str(tmp_path / "tiny"))
    for pad, named in ((2, True), (0, False)):
        rm = tmp_path / f"rm{pad}"
        shutil.copytree(reward_dir, rm)
        cfg = json.loads((rm / "config.json").read_text())
        (rm / "config.json").write_text(json.dumps({**cfg, "pad_token_id": pad}))
        flags = ["--policy", policy_dir, "--reward", str(rm), "--tokenizer", TINY_DIR]
        with dispatch.reference_ops():
            cfg_, run, _ = parse_args(
                ["--output-dir", str(tmp_path / f"out{pad}"), *flags, "--prompts", TINY_PROMPTS, *SMALL]
            )
            setup(cfg_, run)
            cfg_, run, _ = parse_args(["--output-dir", str(tmp_path / f"ev{pad}"), "--eval-only", *flags,
                                       "--eval-prompts", TINY_EVAL_PROMPTS, "--max-new-tokens", "4"])  # fmt: skip
            setup_evaluation(cfg_, run, init_process_grid())
        said = [ln for ln in capsys.readouterr().out.splitlines() if "pad_token_id" in ln]
        if named:
            assert len(said) == 2 and said[0] == said[1], said
            assert said[0].startswith("warning: the reward model's config.json names pad_token_id 2, which ends "
                                      "responses"), said  # fmt: skip
            assert "remove pad_token_id from the reward model's config.json" in said[0]
        else:
            assert said == [], said
