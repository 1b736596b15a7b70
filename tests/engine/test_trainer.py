"""The PPO loop on CPU with the tiny models: micro-batching, the EasyLM quirk, the order of the two models'
reductions, non-finite losses, gradient norms and scores, profiling, sampling, where the reward is read, the PPO
epochs' reshuffle, phase times and the throughput metrics, DP 2 x TP 2 against one process (torchrun, gloo), and the
rollout's other inputs."""

import json
import os
import re
import shutil
import time
import types

import pytest
import torch

from engine import state as state_mod
from engine import trainer
from engine.checkpoint import load_pretrained
from engine.config import GenerateConfig, PPOConfig
from engine.resume import latest_checkpoint
from engine.state import RunConfig
from engine.train_ppo import parse_args
from kernels import dispatch
from tests.engine.ppo_dp_worker import naive_factory
from tests.engine.runs import SMALL, TIMING, run_tiny, saved_weights, tiny_state, torchrun_ranks


def test_micro_batches_accumulate_to_the_same_update(tmp_path):
    one = run_tiny(tmp_path / "one", "--max-iterations", "1", "--micro-batch-tokens", "100000", factory=naive_factory)
    many = run_tiny(tmp_path / "many", "--max-iterations", "1", "--micro-batch-tokens", "30", factory=naive_factory)
    for k in ("policy_loss", "value_loss", "entropy", "grad_norm_policy", "grad_norm_value"):
        assert one[0][k] == pytest.approx(many[0][k], rel=1e-4, abs=1e-6), k
    a, b = latest_checkpoint(str(tmp_path / "one")), latest_checkpoint(str(tmp_path / "many"))
    wa, wb = saved_weights(f"{a}/policy", "lm"), saved_weights(f"{b}/policy", "lm")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_easylm_quirk_recomputes_old_logprobs_per_minibatch(tmp_path):
    """With the quirk the ratio is exactly 1 in every minibatch (1 PPO epoch) and the value clip never binds (the old
    values are the value model's as the step finds it); without it, not after step 1."""
    flags = ("--max-iterations", "1", "--learning-rate", "1e-3", "--warmup-ratio", "0", "--clip-value", "1e-4")
    quirk = run_tiny(tmp_path / "q", *flags, "--recompute-old-logprobs-per-minibatch", factory=naive_factory)[0]
    plain = run_tiny(tmp_path / "p", *flags, factory=naive_factory)[0]
    assert quirk["ratio"] == pytest.approx(1.0, abs=1e-6) and quirk["approx_kl"] < 1e-10
    assert quirk["value_clip_frac"] == 0.0
    assert abs(plain["ratio"] - 1.0) > 1e-4 and plain["approx_kl"] > 1e-8 and plain["value_clip_frac"] > 0


def test_one_model_is_reduced_before_the_other_backward(tmp_path, monkeypatch):
    """A step runs the policy's micro-batches and reduces its grads (with the distributed optimizer that frees its
    whole fp32 grads) before the value model's backward, and updates both only after both reductions, leaving their
    parameters' all-gathers running: each model's passes settle its own first, and the rollout's training settles
    both at its end."""
    state = tiny_state(tmp_path, "--max-iterations", "1", "--micro-batch-tokens", "16")
    names = {id(state.policy_opt): "policy", id(state.value_opt): "value"}
    calls = []

    def recorded(fn):
        orig = getattr(trainer, fn)

        def call(opt, *args, **kw):
            calls.append((fn, names[id(opt)]) + tuple(kw.items()))
            return orig(opt, *args, **kw)

        monkeypatch.setattr(trainer, fn, call)

    for fn in ("accumulate_grads", "reduce_grads", "apply_update", "settle"):
        recorded(fn)
    with dispatch.reference_ops():
        trainer.train(state)
    steps, start = [], 0
    for i, c in enumerate(calls):
        if c == ("apply_update", "value", ("later", True)):
            steps.append(calls[start : i + 1])
            start = i + 1
    assert len(steps) == state.step == 2 and calls[start:] == [("settle", "policy"), ("settle", "value")]
    for step in steps:
        assert step[0] == ("settle", "policy")
        k = step.index(("reduce_grads", "policy"))
        assert k > 2 and set(step[1:k]) == {("accumulate_grads", "policy")}  # several micro-batches
        assert step[k + 1] == ("settle", "value")
        assert set(step[k + 2 : -3]) == {("accumulate_grads", "value")} and len(step) == 2 * k + 4
        assert step[-3:] == [
            ("reduce_grads", "value"), ("apply_update", "policy", ("later", True)),
            ("apply_update", "value", ("later", True)),
        ]  # fmt: skip


def test_an_optimizer_step_reads_its_losses_and_grad_norms_in_one_host_sync(tmp_path, monkeypatch):
    """Each step's check that its losses and grad norms are finite waits for the device once (one read of the four
    numbers), not once for the losses and again for the norms."""
    import sys

    state = tiny_state(tmp_path, "--max-iterations", "1", "--eval-prompts", "")
    reads = []
    for name in ("tolist", "item", "__float__", "__bool__", "cpu"):
        orig = getattr(torch.Tensor, name)

        def read(self, *a, _orig=orig, _name=name, **k):
            if sys._getframe(1).f_code is trainer.train_step.__code__:
                reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)
    with dispatch.reference_ops():
        trainer.train(state)
    assert state.step == 2 and reads == ["tolist"] * state.step


COUNT_STEP_COLLECTIVES = """
import atexit, os, sys
import torch.distributed as dist
calls = []
for name in ("all_reduce", "all_gather"):
    def counted(*a, _orig=getattr(dist, name), _name=name, **k):
        caller = sys._getframe(1).f_code.co_name
        if caller in ("train_step", "_moments"):  # a step's own (not its models' or optimizers')
            calls.append(f"{_name} in {caller}")
        return _orig(*a, **k)
    setattr(dist, name, counted)
atexit.register(lambda: open(os.path.join(os.environ["COUNT_DIR"], "rank" + os.environ["RANK"]), "w").write(
    "\\n".join(calls)))
"""


def test_an_optimizer_step_counts_its_tokens_in_the_whitenings_collective(tmp_path, monkeypatch):
    """DP 2: the advantages' whitening gathers every rank's token count (with the mean and M2), which is the
    minibatch's token count the losses divide by: no all-reduce of its own. A step's own collectives are then that
    all-gather and the losses' all-reduce (every rank raises together)."""
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks/sitecustomize.py").write_text(COUNT_STEP_COLLECTIVES)
    monkeypatch.setenv("COUNT_DIR", str(tmp_path))
    flags = ["--max-iterations", "1", "--eval-prompts", ""]
    torchrun_ranks(tmp_path, 2, "count", *flags, hooks=tmp_path / "hooks")
    step = ["all_gather in _moments", "all_reduce in train_step"]
    for rank in range(2):
        assert (tmp_path / f"rank{rank}").read_text().split("\n") == step * 2  # two optimizer steps


def test_a_failing_step_lands_both_models_gathers_and_reports_its_own_error(tmp_path, monkeypatch):
    """A step that raises after an earlier one updated the models: the rollout's training still settles both models'
    parameter all-gathers (the updates made so far are in the parameters), and an error while settling does not hide
    the step's own."""
    state = tiny_state(tmp_path, "--max-iterations", "1", "--eval-prompts", "")
    settled, real_step = [], trainer.train_step

    def settle(opt):
        settled.append(opt)
        if opt is state.policy_opt and steps:
            raise ValueError("the gather failed too")

    def step(st, ro, seqs, sums):
        if steps:
            del settled[:]  # (the first step's own, before its passes)
            raise RuntimeError("the second step failed")
        steps.append(real_step(st, ro, seqs, sums))

    steps = []
    monkeypatch.setattr(trainer, "settle", settle)
    monkeypatch.setattr(trainer, "train_step", step)
    with dispatch.reference_ops(), pytest.raises(RuntimeError, match="the second step failed"):
        trainer.train(state)
    assert len(steps) == 1 and settled == [state.policy_opt, state.value_opt]


def test_nan_loss_names_the_loss_iteration_and_step(tmp_path):
    state = tiny_state(tmp_path, "--max-iterations", "1")
    with torch.no_grad():
        state.value.score.weight.fill_(float("nan"))
    with dispatch.reference_ops(), pytest.raises(FloatingPointError, match=r"value loss .*iteration 1, step 1 ") as e:
        trainer.train(state)
    assert str(e.value).endswith("no checkpoint was saved before it (--save-every N saves one every N iterations)")
    assert "KL" not in str(e.value)  # (the rollout's KL is finite: the value model's NaN is not blamed on it)


def _poison_after_saving(monkeypatch, iteration: int) -> None:
    """The value model's score head NaN right after the trainer's save at `iteration` (in the background: the weights
    copied before), so that the next iteration's value loss diverges."""
    save = trainer.save_checkpoint

    def save_then_poison(st, **kw):
        save(st, **kw)
        if st.iteration == iteration:
            with torch.no_grad():
                st.value.score.weight.fill_(float("nan"))

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_poison)


@pytest.mark.parametrize("write_fails", [False, True])
def test_a_run_that_diverges_names_the_checkpoint_to_resume_from(tmp_path, monkeypatch, capsys, write_fails):
    """A non-finite loss after a checkpoint names that checkpoint, and says that a resume repeats the run unless a
    hyperparameter given again changes it. That checkpoint, written in the background while the diverging iteration
    ran, holds the weights as they were at the save; where its writing met a full disk, the run still reports the
    divergence, naming the checkpoint before (the failed one never became `latest`), and warns of the save."""
    import errno

    import engine.resume as resume_mod

    state = tiny_state(tmp_path, "--max-iterations", "3", "--save-every", "1", "--eval-prompts", "")
    write = resume_mod._save_state_file

    def full_disk_at_2(sd, fn):
        if sd["iteration"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(sd, fn)

    if write_fails:
        monkeypatch.setattr(resume_mod, "_save_state_file", full_disk_at_2)
    _poison_after_saving(monkeypatch, 2)
    with dispatch.reference_ops(), pytest.raises(FloatingPointError, match=r"value loss .*iteration 3, step ") as e:
        trainer.train(state)
    last = tmp_path / ("checkpoint-000001" if write_fails else "checkpoint-000002")
    assert f"the last checkpoint is {last}: --resume continues from it exactly" in str(e.value)
    assert latest_checkpoint(str(tmp_path)) == str(last)
    warned = "warning: the checkpoint being written could not be completed: [Errno 28]" in capsys.readouterr().out
    assert warned == write_fails
    if write_fails:
        return
    # (written in the background while iteration 3 ran: the weights as they were at the save, not the poisoned ones)
    assert all(
        torch.isfinite(w).all() for w in load_pretrained(str(last / "value"), head="score").state_dict().values()
    )
    (tmp_path / "latest").write_text("{")  # a damaged pointer is said, and does not hide the divergence
    assert trainer._where_to_resume(state).startswith("the last checkpoint cannot be told: ")


@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()])
def test_a_run_stopped_by_an_error_keeps_the_checkpoint_written_meanwhile(tmp_path, monkeypatch, error):
    """An error that is no divergence (a bug, an out-of-memory, Ctrl-C) while a checkpoint is written in the
    background: in one process (or an error every rank raised together) it is completed and becomes `latest`, as a
    synchronous save would be (it was left incomplete: a first save lost, and --resume started the run over)."""
    state = tiny_state(tmp_path, "--max-iterations", "3", "--save-every", "2", "--eval-prompts", "")
    rollout = trainer.generate_rollout

    def fails_at_3(st, *a, **k):
        if st.iteration == 2:  # (iteration 3's rollout, checkpoint 2 being written)
            assert st.pending_save is not None
            raise error
        return rollout(st, *a, **k)

    monkeypatch.setattr(trainer, "generate_rollout", fails_at_3)
    with dispatch.reference_ops(), pytest.raises(type(error)):
        trainer.train(state)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-000002")
    assert sorted(os.listdir(tmp_path / "checkpoint-000002")) == ["policy", "state-rank00000.pt", "value"]
    assert state.pending_save is None


@pytest.mark.parametrize("estimator", ["k3", "k1"])
def test_a_kl_that_overflows_is_named(tmp_path, monkeypatch, estimator):
    """--kl-estimator k3 where the reference's log-prob of a sampled token is far above the policy's: exp overflows,
    the rewards and returns are not finite, and the run stops naming the KL (it said only "non-finite value loss").
    k1's KL, not finite only where a log-prob is not (here the reference's, stood in), gets no word of k3's."""
    state = tiny_state(tmp_path, "--max-iterations", "1", "--kl-estimator", estimator, "--eval-prompts", "")
    targets, far = trainer.rollout_targets, slice(2, 3) if estimator == "k3" else slice(2, 5)  # (flat: tokens)

    def far_reference(st, ro):
        ro.ref_logprobs[far] = ro.logprobs[far] + (100.0 if estimator == "k3" else float("inf"))
        targets(st, ro)

    monkeypatch.setattr(trainer, "rollout_targets", far_reference)
    with (
        dispatch.reference_ops(),
        pytest.raises(FloatingPointError, match=r"loss .* from the rollout's KL to the reference \(--kl-estimator "
                      rf"{estimator}\), not finite at \d+ response tokens") as e,
    ):  # fmt: skip
        trainer.train(state)
    assert ("k3 = exp(ref - logp) - 1 - (ref - logp) overflows" in str(e.value)) == (estimator == "k3")
    assert f"not finite at {far.stop - far.start} response tokens" in str(e.value)  # (each counted)


def test_nonfinite_grad_norm_raises_before_any_update(tmp_path):
    state = tiny_state(tmp_path, "--max-iterations", "1")
    before = {k: v.clone() for k, v in state.policy.state_dict().items()}
    state.value.layers[0].mlp.down_proj.weight.register_hook(lambda g: g * float("inf"))  # finite loss, inf grad
    with dispatch.reference_ops(), pytest.raises(FloatingPointError, match=r"gradient norm of the value \(.*step 1 "):
        trainer.train(state)
    assert all(torch.equal(v, state.policy.state_dict()[k]) for k, v in before.items())  # policy not stepped


@pytest.mark.parametrize("evals", [False, True])
def test_nonfinite_reward_scores_raise(tmp_path, evals):
    """Named by where they came: a rollout's iteration, or the evaluation before the first iteration."""
    state = tiny_state(tmp_path, "--max-iterations", "1", *([] if evals else ["--eval-prompts", ""]))
    with torch.no_grad():
        state.reward.norm.weight.fill_(float("inf"))
    where = "in the evaluation after iteration 0" if evals else "at iteration 1"
    with (
        dispatch.reference_ops(),
        pytest.raises(FloatingPointError, match=rf"reward model returned \d+ non-finite scores {where}(;|$)"),
    ):
        trainer.train(state)


def test_profile_iteration_writes_a_trace_with_the_phases(tmp_path):
    run_tiny(tmp_path, "--max-iterations", "2", "--profile-iteration", "2")
    (trace,) = [p for p in tmp_path.iterdir() if p.name.startswith("trace-")]
    assert trace.name == "trace-iter000002-rank00000.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"ppo/generate", "ppo/score", "ppo/train"} <= names
    with pytest.raises(ValueError, match=r"--profile-iteration 3 is past the run's last iteration \(2\)"):
        run_tiny(tmp_path / "b", "--max-iterations", "2", "--profile-iteration", "3")  # (refused before loading models)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").glob("checkpoint-*"))


def test_rollouts_sample_with_the_runs_top_k(tmp_path):
    """--top-k reaches the rollouts (and the evaluations that sample): top-k 1 draws what greedy decoding does, and
    the recipe's 50 draws other tokens than the whole vocabulary (the tiny preset's) does (the tiny vocabulary has
    512)."""
    from engine.rollout import generate_rollout, sampling_params

    prompts, ids = [[1, 5, 9], [1, 7, 3, 22], [1, 11]], [0, 1, 2]
    state = tiny_state(tmp_path / "a", "--top-k", "1", "--max-new-tokens", "12", "--ignore-eos")
    with dispatch.reference_ops():
        top1 = generate_rollout(state, prompts, ids, sampling_params(state, 0)).responses
        greedy = generate_rollout(state, prompts, ids, sampling_params(state, 0, greedy=True)).responses
        state.cfg.top_k = 0
        free = generate_rollout(state, prompts, ids, sampling_params(state, 0)).responses
    assert top1 == greedy != free  # (the tiny init policy's likeliest token is EOS: without top-k it draws others)
    state = tiny_state(tmp_path / "b", "--max-new-tokens", "12", "--ignore-eos")
    assert sampling_params(state, 0).top_k == 0 and sampling_params(state, 0).top_p == 1.0  # (the tiny preset's)
    responses = {}
    for k in (50, 0):
        state.cfg.top_k = k
        with dispatch.reference_ops():
            responses[k] = generate_rollout(state, prompts * 4, ids * 4, sampling_params(state, 0)).responses
    assert responses[50] != responses[0]


def test_each_iteration_and_the_evaluations_sample_their_own_noise(tmp_path):
    """A rollout's random stream is its iteration's (a later prompt epoch draws new responses to a prompt seen
    before) and evaluations have one of their own; the same stream draws the same responses."""
    from engine.evaluate import EVAL_STREAM
    from engine.rollout import generate_rollout, sampling_params

    state = tiny_state(tmp_path / "a", "--max-new-tokens", "8", "--ignore-eos")
    prompts, ids = [[1, 5, 9], [1, 7, 3, 22]], [0, 1]
    with dispatch.reference_ops():
        draw = lambda stream: generate_rollout(state, prompts, ids, sampling_params(state, stream)).responses
        drawn = {s: draw(s) for s in (0, 1, EVAL_STREAM)}
        again = draw(1)
    assert again == drawn[1] and len({str(r) for r in drawn.values()}) == 3


@pytest.mark.parametrize("pad", [None, 2, 15])
def test_the_reward_is_read_where_transformers_reads_it(tmp_path, pad):
    """The reward model scores each packed sequence where LlamaForSequenceClassification does: its last token, or
    with a pad_token_id in the reward model's config its last token that is not the pad (a pad that is the EOS: the
    token before a final EOS; another id that ends a response: the token before it; a sequence of pads alone: its
    first token)."""
    from transformers import LlamaForSequenceClassification

    from engine.data import Rollout, pack
    from engine.rollout import reward_positions
    from engine.train_ppo import build_tiny_models

    _, reward = build_tiny_models(str(tmp_path / "tiny"))
    hf = LlamaForSequenceClassification.from_pretrained(reward, torch_dtype=torch.float64)
    hf.config.pad_token_id = pad
    hf.save_pretrained(tmp_path / "rm")
    ours = load_pretrained(str(tmp_path / "rm"), head="score", dtype=torch.float32)
    assert ours.config.pad_token_id == pad
    prompts, responses = [[1, 5, 9], [1, 7], [1, 4, 4], [2]], [[11, 12, 2], [13, 14, 15], [2, 2], [2]]
    ro = Rollout(prompts, responses, torch.tensor([True, False, True, True]), torch.zeros(9), [0, 3, 6, 8, 9])
    pk = pack(ro, [0, 1, 2, 3], torch.device("cpu"))
    with torch.no_grad(), dispatch.reference_ops():
        h = ours.hidden_packed(pk["ids"], pk["positions"], pk["cu_seqlens"])[reward_positions(pk, pad)]
        got = ours.head_packed(h)
        want = torch.cat([hf(input_ids=torch.tensor([p + r])).logits[:, 0] for p, r in zip(prompts, responses)])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    moved = (reward_positions(pk, pad) != pk["last"]).tolist()  # (read elsewhere than at the last token)
    assert moved == {None: [False] * 4, 2: [True, False, True, True], 15: [False, True, False, False]}[pad]


def test_a_padded_lm_head_reaches_the_rollouts_logprobs_and_the_policy_loss(tmp_path, monkeypatch):
    """A TP shard's LM head padded past its real rows (model.real_vocab; stood in for here, on one process): the
    rollout's log-probs are those of the real rows alone, and training sends the padding rows no grad (they stay as
    they are while the real rows move), as the kernels' real_vocab promises only where the engine passes it on."""
    from engine.data import Rollout, pack
    from engine.model import Transformer
    from engine.rollout import policy_logprobs
    from kernels.logprob import hidden_logprobs

    state = tiny_state(tmp_path, "--max-iterations", "1", "--eval-prompts", "")
    v = state.policy.lm_head_weight.shape[0]
    real = v - 12
    monkeypatch.setattr(Transformer, "real_vocab", property(lambda self: real if self.head == "lm" else None))
    prompts, responses = [[1, 5, 9], [1, 7]], [[11, 12, 2], [13, real - 1, 15]]
    ro = Rollout(prompts, responses, torch.tensor([True, False]), torch.zeros(6), [0, 3, 6])
    pk = pack(ro, [0, 1], torch.device("cpu"))
    with torch.no_grad(), dispatch.reference_ops():
        got = policy_logprobs(state.policy, pk)
        h = state.policy.hidden_packed(pk["ids"], pk["positions"], pk["cu_seqlens"])[pk["act"]]
        want = hidden_logprobs(h, state.policy.lm_head_weight[:real], pk["targets"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    before = state.policy.lm_head_weight.detach().clone()
    with dispatch.reference_ops():
        trainer.train(state)
    after = state.policy.lm_head_weight.detach()
    assert torch.equal(after[real:], before[real:]), "the padding rows of the LM head were trained"
    assert not torch.equal(after[:real], before[:real])


@pytest.mark.parametrize("samples", [1, 2])
def test_later_ppo_epochs_reshuffle_into_the_same_minibatches_on_any_dp_size(samples):
    """engine.trainer.minibatch_order: the ranks of DP 1, 2 and 4 (each holding the prompts PromptBatches deals it, with
    their samples) train on the same global minibatches in every epoch; each later epoch is a permutation of every
    rank's sequences, a new one per epoch and iteration, and mixes the minibatches (no minibatch of epoch 0 comes
    back whole)."""
    from types import SimpleNamespace

    from engine.data import PromptBatches

    prompts, train = 16, 8  # 16 x samples sequences, minibatches of 8: 2 x samples steps per epoch

    def minibatches(dp, epoch, iteration=0):
        cfg = PPOConfig(train_batch_size=train, samples_per_prompt=samples, rollout_batch_size=prompts)
        steps = []
        for rank in range(dp):
            state = SimpleNamespace(cfg=cfg, grid=SimpleNamespace(dp=dp, dp_rank=rank), run=RunConfig(seed=3),
                                    iteration=iteration)  # fmt: skip
            batches = PromptBatches([[i] for i in range(prompts)], prompts, dp_rank=rank, dp_size=dp)
            positions = next(batches)[0]  # (the prompts' places in the global batch: a permutation's values)
            glob = [batches.global_batch(0, 0).index(p) * samples + a for p in positions for a in range(samples)]
            order, per_step = trainer.minibatch_order(state, epoch, len(glob)), train // dp
            assert sorted(order) == list(range(len(glob))), order
            for k in range(len(glob) // per_step):
                if rank == 0:
                    steps.append(set())
                steps[k] |= {glob[i] for i in order[k * per_step : (k + 1) * per_step]}
        return steps

    first = minibatches(1, 0)
    assert first == [set(range(k * train, (k + 1) * train)) for k in range(prompts * samples // train)]
    for epoch in (1, 2):
        one = minibatches(1, epoch)
        assert minibatches(2, epoch) == one == minibatches(4, epoch) != first
        assert all(len(a & b) < train for a in one for b in first), (one, first)
    assert minibatches(1, 1) != minibatches(1, 2) and minibatches(1, 1) != minibatches(1, 1, iteration=1)


def test_later_ppo_epochs_reshuffle_with_any_seed():
    """A later PPO epoch's order is drawn for any --seed: a large one (a date, 20240607, or the largest, 2**32 - 1)
    does not overflow torch's 64-bit seed (it crashed after the rollout), and a seed that fitted keeps its order."""
    from types import SimpleNamespace

    def order(seed):
        cfg = PPOConfig(train_batch_size=4, rollout_batch_size=12)
        state = SimpleNamespace(cfg=cfg, grid=SimpleNamespace(dp=1, dp_rank=0), run=RunConfig(seed=seed), iteration=5)
        return trainer.minibatch_order(state, 1, 12)

    for seed in (20240607, 2**32 - 1):
        assert sorted(order(seed)) == list(range(12)), seed
    assert order(20240607) != order(20240608)
    gen = torch.Generator().manual_seed(((3 * 1_000_003 + 5) * 101 + 1) * 100_003 + 2)  # (column 2 of seed 3)
    rows = torch.randperm(3, generator=gen).tolist()
    assert [order(3)[k * 4 + 2] for k in range(3)] == [r * 4 + 2 for r in rows]


@pytest.mark.parametrize("quirk", [False, True])
def test_throughput_metrics_count_each_phases_tokens_and_flops(tmp_path, monkeypatch, quirk):
    """Each phase's tokens/s and TFLOP/s times its time give its work, counted here from the rollout (four samples per
    prompt, two PPO epochs): generation samples the response tokens after each prompt's prefill once (its samples share
    its cache), scoring runs the four models over every sequence, training the policy's and the value model's forward
    and backward (3 forwards) over every sequence in each epoch, with the EasyLM quirk's no-grad policy forward too."""
    from engine.model import forward_flops

    flags = ["--max-iterations", "1", "--rollout-batch-size", "4", "--samples-per-prompt", "4", "--ppo-epochs", "2",
             "--eval-prompts", ""]  # fmt: skip
    state = tiny_state(tmp_path, *flags, *(["--recompute-old-logprobs-per-minibatch"] if quirk else []))
    rollouts, original = [], trainer.generate_rollout
    monkeypatch.setattr(trainer, "generate_rollout", lambda *a: rollouts.append(original(*a)) or rollouts[-1])
    with dispatch.reference_ops():
        m = trainer.ppo_iteration(state)
    (ro,) = rollouts
    n_seq, n_resp = len(ro.responses), sum(len(r) for r in ro.responses)
    seq_tokens = sum(len(p) + len(r) for p, r in zip(ro.prompts, ro.responses))
    sq = sum((len(p) + len(r)) ** 2 for p, r in zip(ro.prompts, ro.responses))
    unique = ro.prompts[::4]  # (each prompt's four samples side by side)
    assert [p for p in unique for _ in range(4)] == ro.prompts and n_seq == 16
    prefill, prefill_sq = sum(len(p) for p in unique), sum(len(p) ** 2 for p in unique)
    # (a sequence's last token is never fed; a prompt's own attention is computed once, not once per sample)
    gen = forward_flops(state.policy.config, prefill + n_resp - n_seq, sq - 3 * prefill_sq, "lm", n_resp)
    fwd = {name: forward_flops(model.config, seq_tokens, sq, head, rows)
           for name, model, head, rows in (("policy", state.policy, "lm", n_resp), ("ref", state.ref, "lm", n_resp),
                                           ("value", state.value, "score", n_resp),
                                           ("reward", state.reward, "score", n_seq))}  # fmt: skip
    train = 2 * (3 + quirk) * (fwd["policy"] + fwd["value"])  # (the quirk: each minibatch's no-grad passes again)
    work = {"gen_tok_s": ("time_generate", n_resp), "score_tok_s": ("time_score", seq_tokens),
            "train_tok_s": ("time_train", 2 * seq_tokens), "gen_tflops_gpu": ("time_generate", gen / 1e12),
            "score_tflops_gpu": ("time_score", sum(fwd.values()) / 1e12),
            "train_tflops_gpu": ("time_train", train / 1e12)}  # fmt: skip
    for k, (time_key, want) in work.items():
        assert m[k] * m[time_key] == pytest.approx(want, rel=1e-9), k


def test_phase_times_are_the_slowest_ranks(tmp_path, monkeypatch):
    """DP 2 with rank 1's rollout 3 s slower: the generation's time is the slowest rank's (rank 0's own would make its
    tokens/s 100x too high), the wait is shown as time_dp_wait, and training's time holds none of it. So is each
    phase's peak memory the fullest rank's (rank 1's 7.5 GiB; rank 0's own, 0 on CPU, was reported)."""
    monkeypatch.setenv("TEST_SLOW_ROLLOUT", "1:3")
    monkeypatch.setenv("TEST_PEAK_GIB", "1:7.5")
    (m,) = torchrun_ranks(tmp_path, 2, "slow", "--max-iterations", "1", "--eval-prompts", "")[0]["history"]
    assert m["mem_gib_generate"] == m["mem_gib_score"] == m["mem_gib_train"] == 7.5, m
    assert m["time_generate"] >= 3.0 and m["time_dp_wait"] >= 2.5, m
    assert m["time_train"] < m["time_generate"] - 2.0, m
    assert m["gen_tok_s"] == pytest.approx(m["response_len"] * 8 / m["time_generate"], rel=1e-6)  # (8 sequences)


@pytest.mark.parametrize("start", [0, 1])
def test_the_eta_counts_what_the_loop_does_between_iterations(tmp_path, monkeypatch, capsys, start):
    """The ETA printed with each iteration is the wall time per iteration so far times the iterations left: with an
    evaluation after every iteration that takes 2 hours (on a clock moved on), iteration 2's, one iteration left, is
    an hour (the iterations' own time alone, 0h00m, leaves out the evaluations the rest of the run makes too). A run
    resumed at iteration 1 (start 1, one more iteration) counts only the iterations this launch ran, not the first."""
    state = tiny_state(tmp_path, "--max-iterations", str(3 + start), "--eval-every", "1")
    state.iteration = start  # (a resumed run's position)
    offset, real_monotonic, real_evaluate = [0.0], time.monotonic, trainer.evaluate
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + offset[0])

    def evaluate(state):
        offset[0] += 7200.0 if state.iteration else 0.0  # (the starting point's is no iteration's)
        return real_evaluate(state)

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    with dispatch.reference_ops():
        trainer.train(state)
    etas = re.findall(rf"^iter (\d)/{3 + start} .* eta (\S+)$", capsys.readouterr().out, re.M)
    assert etas == [(str(1 + start), "0h00m"), (str(2 + start), "1h00m"), (str(3 + start), "0h00m")], etas


@pytest.mark.parametrize("where", ["trainer", "evaluate"])
def test_a_nonfinite_score_on_one_rank_stops_every_rank(tmp_path, monkeypatch, where):
    """A reward model's NaN on rank 1 only stops both ranks with its message: in training before the rewards are
    whitened over the ranks (a collective rank 1 would never reach), and in an evaluation before its metrics' sums."""
    monkeypatch.setenv("TEST_NAN_SCORES", f"1:{where}")
    out = torchrun_ranks(tmp_path, 2, "nan", "--max-iterations", "1", "--whiten-rewards", "--dist-timeout-minutes", "2",
                         fails=True)  # fmt: skip
    when = "at iteration 1" if where == "trainer" else "in the evaluation after iteration 0"
    mine = f"the reward model returned 1 non-finite scores {when}"
    assert f"scoring the rollout failed on rank 1: {mine}" in out, out[-3000:]
    assert "Timeout" not in out and "timed out" not in out
    # (rank 0 had no NaN of its own: one line naming rank 1, whose traceback is the one that finds the fault; in
    # training too, where the loop adds where to resume from)
    one_line = r"train_ppo.py: error: scoring the rollout failed on rank 1: .*\(rank 1 printed its traceback\)"
    assert re.search(one_line, out), out[-3000:]


def test_tp2_with_a_vocabulary_it_does_not_divide_matches_one_process(tmp_path):
    """Models of 515 tokens (the tiny tokenizer's 512 and three more, as an added pad token makes Llama 2's 32001) at
    TP 2: each rank holds 258 rows of every embedding and LM head, rank 1's last one padding (engine.parallel
    .shard_rows). The run's metrics and saved weights (515 rows, what transformers loads) equal one process's."""
    import dataclasses

    from engine.checkpoint import save_pretrained
    from engine.config import ModelConfig
    from engine.model import Transformer
    from engine.tokenizer import TINY_DIR, TINY_PROMPTS

    cfg = dataclasses.replace(ModelConfig.named("tiny"), vocab_size=515)
    policy = Transformer(cfg, "lm").init_weights(seed=0)
    with torch.no_grad():  # (EOS likely, as the tiny default's policy: engine.train_ppo.build_tiny_models)
        policy.embed_tokens.weight[:, 0] += 0.1
        policy.lm_head.weight[cfg.eos_token_id, 0] = 0.85
    save_pretrained(policy, tmp_path / "init/policy", tokenizer_dir=TINY_DIR)
    reward = Transformer(cfg, "score").init_weights(seed=1)
    with torch.no_grad():
        reward.score.weight.mul_(10.0)
    save_pretrained(reward, tmp_path / "init/reward", tokenizer_dir=TINY_DIR)
    flags = ["--policy", str(tmp_path / "init/policy"), "--reward", str(tmp_path / "init/reward"), "--prompts",
             TINY_PROMPTS, "--tokenizer", TINY_DIR, "--eval-prompts", "", "--max-iterations", "1"]  # fmt: skip
    (two, _) = torchrun_ranks(tmp_path, 2, "tp2", *flags, "--tp", "2")
    one = run_tiny(tmp_path / "tp1", *flags, factory=naive_factory)
    for k, v in one[0].items():
        if k not in TIMING:
            assert two["history"][0][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for sub, head in (("policy", "lm"), ("value", "score")):
        w1 = saved_weights(f"{latest_checkpoint(str(tmp_path / 'tp1'))}/{sub}", head)
        w2 = saved_weights(f"{latest_checkpoint(str(tmp_path / 'tp2'))}/{sub}", head)  # gathered TP shards
        assert w2["embed_tokens.weight"].shape == (515, 64)
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=1e-5, msg=f"{sub} {k}")


def test_dp2_tp2_matches_one_process(tmp_path):
    """4 processes (data parallel 2 x tensor parallel 2, gloo; the optimizer sharded over the 2 DP ranks and the
    tokens between the TP regions) against 1 on the same global batch: two samples per prompt and two PPO epochs, the
    second reshuffled into the same global minibatches on 2 ranks as on one (engine.trainer.minibatch_order), and the
    adaptive KL coefficient the next rollout gets (from the whole rollout's KL and sequences) on every rank."""
    flags = ["--max-iterations", "1", "--ppo-epochs", "2", "--samples-per-prompt", "2", "--kl-target", "0.02",
             "--kl-horizon", "8"]  # fmt: skip
    ranks = torchrun_ranks(tmp_path, 4, "dp2", *flags, "--tp", "2")
    one = run_tiny(tmp_path / "dp1", *flags, factory=naive_factory)
    assert one[0]["step"] == 8  # (16 sequences, four minibatches in each epoch)
    for k, v in one[0].items():
        if k not in TIMING:
            assert ranks[0]["history"][0][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for sub, head in (("policy", "lm"), ("value", "score")):
        w1 = saved_weights(f"{latest_checkpoint(str(tmp_path / 'dp1'))}/{sub}", head)
        w4 = saved_weights(f"{latest_checkpoint(str(tmp_path / 'dp2'))}/{sub}", head)  # gathered TP shards
        for k in w1:
            torch.testing.assert_close(w4[k], w1[k], atol=1e-6, rtol=1e-5, msg=f"{sub} {k}")
    coef = [torch.load(f"{latest_checkpoint(str(tmp_path / d))}/state-rank{r:05d}.pt", weights_only=False)["kl_coef"]
            for d, r in (("dp1", 0), ("dp2", 0), ("dp2", 1), ("dp2", 2), ("dp2", 3))]  # fmt: skip
    assert coef[0] != 0.05 and coef == pytest.approx([coef[0]] * 5, rel=1e-6), coef
    for k, v in ranks[0]["policy"].items():  # ranks 0 and 2: the same TP shard in the two DP replicas
        assert torch.equal(v, ranks[2]["policy"][k]), k
    # the held-out evaluations (the tiny default's, before and after): prompts split over the DP ranks
    evals = [[json.loads(x) for x in (tmp_path / d / "eval.jsonl").read_text().splitlines()] for d in ("dp1", "dp2")]
    assert [e["iteration"] for e in evals[1]] == [0, 1]
    for e1, e4 in zip(*evals, strict=True):
        for k, v in e1.items():
            if k != "time":
                assert e4[k] == (v if isinstance(v, (str, bool)) else pytest.approx(v, rel=1e-4, abs=1e-6)), k
    recs = [[json.loads(x) for x in (tmp_path / d / "eval/iter-000001.jsonl").read_text().splitlines()]
            for d in ("dp1", "dp2")]  # fmt: skip
    assert [r["response"] for r in recs[1]] == [r["response"] for r in recs[0]] and len(recs[1]) == 16


def test_chat_template_flag_encodes_training_and_evaluation_prompts_with_the_tokenizers_template(tmp_path):
    from engine.tokenizer import TINY_DIR, TINY_EVAL_PROMPTS, TINY_PROMPTS, load_prompts, load_tokenizer

    shutil.copytree(TINY_DIR, tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}"
    )
    tok = load_tokenizer(tmp_path / "tok")
    st = tiny_state(tmp_path / "out", "--tokenizer", str(tmp_path / "tok"), "--chat-template", "tokenizer")
    for have, path in ((st.data.prompts, TINY_PROMPTS), (st.eval_prompts.prompts, TINY_EVAL_PROMPTS)):
        want = load_prompts(path, tok, verbose=False, template="tokenizer").prompts
        assert have == want and want != load_prompts(path, tok, verbose=False).prompts


def test_a_failed_rollout_hands_the_kv_cache_back(tmp_path, monkeypatch):
    """The generator's cache is released also when sampling raises, before any model's weights come back into the
    memory it held (an out-of-memory error there would hide the first error)."""
    from engine.rollout import generate_rollout

    st = tiny_state(tmp_path)
    calls = []

    def boom(*args, **kwargs):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(st.generator, "generate_completions", boom)
    monkeypatch.setattr(st.generator, "release", lambda: calls.append("release"))
    with pytest.raises(RuntimeError, match="sampling failed"):
        generate_rollout(st, [[1, 5, 9]], [0])
    assert calls == ["release"]


def test_the_policys_generation_config_stops_rollouts_and_is_saved(tmp_path):
    from engine.tokenizer import TINY_PROMPTS
    from engine.train_ppo import build_tiny_models

    policy, reward = build_tiny_models(str(tmp_path / "tiny"))
    with open(os.path.join(policy, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 7], "top_p": 0.9}, f)
    flags = ("--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS, "--max-iterations", "1")
    cfg, run, _ = parse_args(["--output-dir", str(tmp_path / "out"), *SMALL, *flags])
    assert state_mod.setup(cfg, run, generator_factory=state_mod.make_generator).stop_ids == [2, 7]
    run_tiny(tmp_path / "run", *flags)
    with open(tmp_path / "run" / "checkpoint-000001" / "policy" / "generation_config.json") as f:
        assert json.load(f) == {"eos_token_id": [2, 7], "top_p": 0.9}


def test_the_tiny_models_follow_the_seed(tmp_path):
    from engine.train_ppo import build_tiny_models

    policy, _ = build_tiny_models(str(tmp_path), seed=0)
    w0 = saved_weights(policy, "lm")
    build_tiny_models(str(tmp_path), seed=7)
    w7 = saved_weights(policy, "lm")
    assert not torch.equal(w0["embed_tokens.weight"], w7["embed_tokens.weight"])
    stamp = os.stat(os.path.join(policy, "model.safetensors")).st_mtime_ns
    build_tiny_models(str(tmp_path), seed=7)  # (the same seed: kept)
    assert os.stat(os.path.join(policy, "model.safetensors")).st_mtime_ns == stamp


def test_the_tiny_models_stop_sometimes_and_score_on_the_order_of_1(tmp_path):
    """engine.train_ppo.build_tiny_models' two adjustments of the random models, which the demo needs: the policy's EOS
    logit makes it stop now and then (1 in 42 tokens on random contexts: without it 1 in 540, and every response
    would take the missing-EOS penalty), and the reward model's scores spread on the order of 1 (so the reward
    outweighs the KL term)."""
    from engine.train_ppo import build_tiny_models

    policy_dir, reward_dir = build_tiny_models(str(tmp_path), seed=0)
    policy, rm = load_pretrained(policy_dir, head="lm"), load_pretrained(reward_dir, head="score")
    ids = torch.randint(3, policy.config.vocab_size, (16, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), dispatch.reference_ops():
        p_eos = policy(ids).float().softmax(-1)[..., policy.config.eos_token_id].mean().item()
        scores = rm(ids)[:, -1]
    assert 1 / 100 < p_eos < 1 / 10, p_eos
    assert 0.5 < scores.std().item() < 10, scores


def test_a_response_cut_by_the_length_limit_did_not_hit_eos():
    from engine.rollout import generate_rollout
    from engine.scheduler import Completion

    comps = [Completion(0, 0, [5, 6], [-1.0, -1.0], "length"), Completion(1, 0, [7, 2], [-1.0, -1.0], "stop")]
    gen = types.SimpleNamespace(generate_completions=lambda *a, **k: comps, release=lambda: None)
    state = types.SimpleNamespace(offload=False, offload_models=False, generator=gen, device=torch.device("cpu"))
    ro = generate_rollout(state, [[1, 3], [1, 4]], [0, 1], GenerateConfig(max_new_tokens=8, seed=0))
    assert ro.hit_eos.tolist() == [False, True]


def test_rollout_seeds_of_neighbouring_run_seeds_differ():
    from engine.rollout import sampling_params

    def state(seed):
        cfg = PPOConfig()
        run = types.SimpleNamespace(seed=seed, ignore_eos=False)
        return types.SimpleNamespace(cfg=cfg, run=run, stop_ids=[2])

    assert sampling_params(state(1), 1).seed != sampling_params(state(2), 0).seed


def test_each_phases_peak_memory_is_read_where_its_time_ends(tmp_path, monkeypatch):
    """The rollout's targets (KL, rewards, GAE) count as the scoring phase in time, and so in memory: mem_gib_score is
    read after them (their peak landed in mem_gib_train). A stand-in peak counter: the phases done when it is read."""
    done = []
    monkeypatch.setattr(trainer, "_peak_gib", lambda device: float(len(done)))
    for name in ("generate_rollout", "forward_rollout", "rollout_targets", "train_rollout"):
        real = getattr(trainer, name)
        monkeypatch.setattr(trainer, name, lambda *a, _real=real, _name=name, **k: done.append(_name) or _real(*a, **k))
    state = tiny_state(tmp_path, "--max-iterations", "1", "--eval-prompts", "")
    with dispatch.reference_ops():
        (m,) = trainer.train(state)
    assert (m["mem_gib_generate"], m["mem_gib_score"], m["mem_gib_train"]) == (1.0, 3.0, 4.0), m
