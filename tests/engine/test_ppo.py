"""engine.ppo against straightforward float64 formulas written here (loops over Python floats)."""

import dataclasses
import math
import os

import pytest
import torch

from engine import ppo
from engine.config import ModelConfig, PPOConfig
from kernels import dispatch
from kernels.dispatch import reference_ops
from tests.engine.ranks import leave


def _rows(B=4, T=9, seed=0):
    """Random [B, T] rollout tensors with response masks of varied lengths and starts (one row of length 1)."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    scores = torch.randn(B, generator=g, dtype=torch.float64) * 2
    mask = torch.zeros(B, T, dtype=torch.bool)
    spans = [(0, T), (2, 5), (T - 1, 1), (1, T - 3)][:B]
    for b, (start, n) in enumerate(spans):
        mask[b, start : start + n] = True
    return lp, ref, values, scores, mask


def _expected(lp, ref, values, scores, mask, beta, gamma, lam, estimator="k1"):
    """Per row: kl, rewards (score at the last response token), GAE over the response positions."""
    B, T = mask.shape
    out = {k: [[0.0] * T for _ in range(B)] for k in ("kl", "rewards", "advantages", "returns")}
    for b in range(B):
        cols = [t for t in range(T) if mask[b, t]]
        for t in cols:
            d = float(lp[b, t]) - float(ref[b, t])
            kl = {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1 + d}[estimator]
            out["kl"][b][t] = kl
            out["rewards"][b][t] = -beta * kl
        out["rewards"][b][cols[-1]] += float(scores[b])
        next_v, next_a = 0.0, 0.0
        for t in reversed(cols):
            delta = out["rewards"][b][t] + gamma * next_v - float(values[b, t])
            next_a = delta + gamma * lam * next_a
            next_v = float(values[b, t])
            out["advantages"][b][t] = next_a
            out["returns"][b][t] = next_a + next_v
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


@pytest.mark.parametrize("gamma,lam,estimator", [(1.0, 0.95, "k1"), (0.9, 0.7, "k3"), (1.0, 1.0, "k2")])
def test_rewards_advantages_returns(gamma, lam, estimator):
    lp, ref, values, scores, mask = _rows()
    cfg = PPOConfig(gamma=gamma, lam=lam, kl_estimator=estimator)
    with dispatch.reference_ops():
        got = ppo.advantages_and_returns(lp.float(), ref.float(), values.float(), mask, scores.float(), cfg)
    want = _expected(lp, ref, values, scores, mask, cfg.kl_coef, gamma, lam, estimator)
    for k in want:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), want[k], atol=1e-5, rtol=1e-5, msg=k)


def test_gae_kernel_path_matches():
    """Same numbers through the GAE Triton kernel (interpreter) as through the reference."""
    lp, ref, values, scores, mask = _rows(seed=3)
    cfg = PPOConfig()
    got = ppo.advantages_and_returns(lp.float(), ref.float(), values.float(), mask, scores.float(), cfg)
    want = _expected(lp, ref, values, scores, mask, cfg.kl_coef, cfg.gamma, cfg.lam)
    torch.testing.assert_close(got["advantages"].double(), want["advantages"], atol=1e-5, rtol=1e-5)


def test_whiten_rewards_option():
    lp, ref, values, scores, mask = _rows(seed=1)
    cfg = PPOConfig(whiten_rewards=True)
    with dispatch.reference_ops():
        got = ppo.advantages_and_returns(lp.float(), ref.float(), values.float(), mask, scores.float(), cfg)
    raw = _expected(lp, ref, values, scores, mask, cfg.kl_coef, 1.0, 0.95)["rewards"]
    sel = [float(raw[b, t]) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    mean = sum(sel) / len(sel)
    std = math.sqrt(sum((x - mean) ** 2 for x in sel) / (len(sel) - 1))
    want = torch.where(mask, (raw - mean) / std + mean, 0.0)  # TRL keeps the mean (shift_mean=False)
    torch.testing.assert_close(got["rewards"].double(), want, atol=1e-5, rtol=1e-5)


def test_eos_penalty():
    scores = torch.tensor([0.5, -1.0, 2.0])
    got = ppo.scores_with_eos_penalty(scores, torch.tensor([True, False, True]), -10.0)
    assert got.tolist() == [0.5, -10.0, 2.0]


def test_minibatch_whitening():
    x = torch.randn(37, dtype=torch.float64) * 3 + 2
    m = torch.ones(37, dtype=torch.bool)
    got, n = ppo.minibatch_advantages(x.float(), m, PPOConfig())
    assert n.item() == 37  # (the count its collective makes, the losses' denominator)
    vals = x.tolist()
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    torch.testing.assert_close(got.double(), (x - mean) / std, atol=1e-5, rtol=1e-5)
    same, n = ppo.minibatch_advantages(x, m, PPOConfig(whiten_advantages=False))
    assert same is x and n is None


def test_whitening_adds_easylms_eps_to_the_variance():
    """Advantages (and with --whiten-rewards the rewards) are whitened as EasyLM's whiten() (the recipe's code):
    (x - mean) / sqrt(unbiased var + 1e-6). Visible where the spread is small: at std 1e-3, TRL's 1e-8 gives unit
    variance where EasyLM's gives about 0.5; --whiten-eps sets it."""
    x = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 1e-3 + 0.2
    m = torch.ones(300, dtype=torch.bool)
    mask2 = m.reshape(3, 100)  # (three responses of 100 tokens)
    for cfg in (PPOConfig(), PPOConfig(whiten_eps=1e-8)):
        mean, var = x.mean(), x.var(unbiased=True)
        want = (x - mean) / torch.sqrt(var + cfg.whiten_eps)
        got, _ = ppo.minibatch_advantages(x, m, cfg)
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
        cfg_r = PPOConfig(whiten_rewards=True, whiten_eps=cfg.whiten_eps, kl_coef=0.0)
        zero = torch.zeros(3, 100, dtype=torch.float64)
        scores = torch.tensor([1e-3, -2e-3, 5e-4], dtype=torch.float64)
        with dispatch.reference_ops():  # (kl 0: each row's reward is its score at its last token)
            out = ppo.advantages_and_returns(zero, zero, zero, mask2, scores, cfg_r)
        raw = torch.zeros(3, 100, dtype=torch.float64)
        raw[:, -1] = scores
        mean, var = raw.mean(), raw.var(unbiased=True)
        want = (raw - mean) / torch.sqrt(var + cfg.whiten_eps) + mean  # (TRL's variant keeps the mean)
        torch.testing.assert_close(out["rewards"].double(), want, atol=1e-6, rtol=1e-5)
    assert PPOConfig().whiten_eps == 1e-6
    with pytest.raises(ValueError, match="whiten_eps must be >= 0 and finite"):
        PPOConfig(whiten_eps=-1.0)


def test_value_loss_and_grad():
    g = torch.Generator().manual_seed(0)
    n = 23
    old = torch.randn(n, generator=g, dtype=torch.float64)
    v = (old + torch.randn(n, generator=g, dtype=torch.float64) * 0.4).requires_grad_(True)
    ret = torch.randn(n, generator=g, dtype=torch.float64)
    denom, c = 40.0, 0.2
    loss, stats = ppo.value_loss(v.float(), old.float(), ret.float(), clip_value=c, denom=denom)
    want, clipped, grads = 0.0, 0, []
    for vi, oi, ri in zip(v.tolist(), old.tolist(), ret.tolist()):
        vc = min(max(vi, oi - c), oi + c)
        a, b = (vi - ri) ** 2, (vc - ri) ** 2
        want += 0.5 * max(a, b) / denom
        clipped += b > a
        # d/dv: the unclipped branch gives (v - R) / denom; the clipped one is flat outside the band
        inside = oi - c < vi < oi + c
        grads.append((vi - ri) / denom if a >= b else ((vc - ri) / denom if inside else 0.0))
    assert abs(loss.item() - want) < 1e-6 * max(1.0, abs(want))
    assert stats["clip_frac"].item() == clipped
    vf = v.detach().float().requires_grad_(True)
    ppo.value_loss(vf, old.float(), ret.float(), clip_value=c, denom=denom)[0].backward()
    torch.testing.assert_close(vf.grad.double(), torch.tensor(grads, dtype=torch.float64), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "interpreter"])
def test_policy_loss_and_grads(kernel):
    g = torch.Generator().manual_seed(0)
    N, H, V, denom, eps = 13, 16, 37, 20.0, 0.2
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    logits = hidden @ weight.T
    logp_true = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    old = logp_true + torch.randn(N, generator=g, dtype=torch.float64) * 0.3  # ratios on both sides of the band

    h = hidden.float().requires_grad_(True)
    w = weight.float().requires_grad_(True)
    ctx = dispatch.reference_ops() if not kernel else torch.enable_grad()
    with ctx:
        loss, stats = ppo.policy_loss(h, w, targets, old.float(), adv.float(), clip_eps=eps, denom=denom)
        loss.backward()

    # float64, written out: per token max(-A r, -A clip(r)), summed, / denom
    h64 = hidden.clone().requires_grad_(True)
    w64 = weight.clone().requires_grad_(True)
    lsm = torch.log_softmax(h64 @ w64.T, -1)
    total, n_clip = 0.0, 0
    terms = []
    for i in range(N):
        r = torch.exp(lsm[i, targets[i]] - old[i])
        a = float(adv[i])
        u, c = -a * r, -a * torch.clamp(r, 1 - eps, 1 + eps)
        terms.append(torch.maximum(u, c))
        n_clip += bool(c > u)
    want = torch.stack(terms).sum() / denom
    want.backward()
    total = want.item()
    assert abs(loss.item() - total) < 1e-5 * max(1.0, abs(total))
    assert abs(stats["clip_frac"].item() - n_clip) < 1e-4
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "interpreter"])
def test_policy_loss_of_far_ratios_against_float64(kernel):
    """Log-ratios of +-50, +-100 and 120 (exp overflows fp32 past 88.7), advantages of each sign and 0: the loss and
    grads of float64 wherever those are finite in fp32. A token whose ratio overflows but whose clipped term is the
    max (A >= 0) has grad 0, not 0 * inf = NaN (which stopped the run for a non-finite grad norm)."""
    g = torch.Generator().manual_seed(3)
    shifts = [100.0, 100.0, 50.0, -50.0, -100.0, 0.1, 50.0, -50.0, 0.05, 120.0, -120.0]
    advs = [1.0, 0.0, -1.0, 1.0, -1.0, 0.5, 1.0, -1.0, -0.3, 0.7, -0.2]
    N, H, V, denom, eps = len(shifts), 8, 11, 16.0, 0.2
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    adv = torch.tensor(advs, dtype=torch.float64)
    logp_true = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    old = (logp_true - torch.tensor(shifts, dtype=torch.float64)).float()
    h = hidden.float().requires_grad_(True)
    w = weight.float().requires_grad_(True)
    with dispatch.reference_ops() if not kernel else torch.enable_grad():
        loss, stats = ppo.policy_loss(h, w, targets, old, adv.float(), clip_eps=eps, denom=denom)
        loss.backward()
    h64 = hidden.clone().requires_grad_(True)
    w64 = weight.clone().requires_grad_(True)
    lsm = torch.log_softmax(h64 @ w64.T, -1)
    terms = []
    for i in range(N):
        r = torch.exp(lsm[i, targets[i]] - float(old[i]))
        a = advs[i]
        terms.append(torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps, 1 + eps)))
    want = torch.stack(terms).sum() / denom
    want.backward()
    assert math.isfinite(loss.item()) and abs(loss.item() - want.item()) < 1e-5 * abs(want.item())
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-6, rtol=1e-4)
    assert (h.grad[[0, 1, 9]] == 0).all()  # the clipped term: no gradient


@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "interpreter"])
def test_a_ratio_past_float32_where_the_advantage_is_negative_is_an_inf_loss(kernel):
    """The log-ratio cap (reference.ppo_ratio) applies only where A >= 0, where the clipped term is the loss anyway:
    where A < 0 the unclipped -A ratio is the loss, inf past float32's range, not a finite -A exp(88.72)."""
    g = torch.Generator().manual_seed(4)
    N, H, V = 3, 8, 11
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    logp = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None]).squeeze(1)
    old = (logp - torch.tensor([100.0, 0.0, 100.0], dtype=torch.float64)).float()
    for advs, finite in (([-1.0, 0.5, 0.5], False), ([1.0, 0.5, 0.0], True)):
        with dispatch.reference_ops() if not kernel else torch.enable_grad():
            loss, _ = ppo.policy_loss(hidden, weight, targets, old, torch.tensor(advs), clip_eps=0.2, denom=3.0)
        assert math.isfinite(loss.item()) == finite, (advs, loss.item())
        if not finite:
            assert loss.item() == math.inf


@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "interpreter"])
def test_policy_loss_of_a_padded_lm_head_is_that_of_its_real_rows(kernel):
    """real_vocab (a TP shard padded past its real rows) reaches the fused loss: the loss and grads of the weight's real
    rows alone, and no grad to the padding rows (however likely their logits would make them)."""
    g = torch.Generator().manual_seed(6)
    N, H, V, real = 9, 8, 13, 10
    hidden = torch.randn(N, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.8).requires_grad_(True)
    targets = torch.randint(0, real, (N,), generator=g)
    old, adv = torch.randn(N, generator=g) - 2, torch.randn(N, generator=g)
    with dispatch.reference_ops() if not kernel else torch.enable_grad():
        loss, _ = ppo.policy_loss(hidden, weight, targets, old, adv, clip_eps=0.2, denom=N, real_vocab=real)
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        want, _ = ppo.policy_loss(hidden, weight[:real], targets, old, adv, clip_eps=0.2, denom=N)
        wh, ww = torch.autograd.grad(want, (hidden, weight))
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gh, wh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, ww, atol=1e-6, rtol=1e-5)
    assert not gw[real:].any()


def test_lr_schedule():
    cfg = PPOConfig(learning_rate=2.0, warmup_ratio=0.1, lr_schedule="linear")
    total = 100  # warmup 10 steps
    assert ppo.lr_at(0, total, cfg) == 0.0
    assert ppo.lr_at(5, total, cfg) == pytest.approx(1.0)
    assert ppo.lr_at(10, total, cfg) == pytest.approx(2.0)
    assert ppo.lr_at(55, total, cfg) == pytest.approx(1.0)
    assert ppo.lr_at(100, total, cfg) == 0.0
    assert ppo.lr_at(7, 16, cfg) == pytest.approx(2.0 * (16 - 7) / (16 - 2))  # warmup ceil(1.6) = 2
    cfg_c = PPOConfig(learning_rate=2.0)  # the default: EasyLM's (the same warmup, then the peak to the end)
    assert cfg_c.lr_schedule == "constant"
    assert [ppo.lr_at(s, total, cfg_c) for s in (0, 5, 10, 55, 99)] == [0.0, 1.0, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="lr_schedule"):
        ppo.lr_at(50, total, PPOConfig(lr_schedule="cosine"))


def test_adaptive_kl_coef():
    """Ziegler et al.'s controller, worked by hand: the proportional error clipped to +-0.2, times the rollout's
    sequences over the horizon; no change without a target."""
    cfg = PPOConfig(kl_coef=0.05, kl_target=6.0, kl_horizon=10000)
    assert ppo.adapt_kl_coef(0.05, 6.6, 512, cfg) == pytest.approx(0.05 * (1 + 0.1 * 512 / 10000), rel=1e-12)
    assert ppo.adapt_kl_coef(0.05, 3.0, 512, cfg) == pytest.approx(0.05 * (1 - 0.2 * 512 / 10000), rel=1e-12)
    assert ppo.adapt_kl_coef(0.04, 60.0, 100, cfg) == pytest.approx(0.04 * (1 + 0.2 * 100 / 10000), rel=1e-12)
    assert ppo.adapt_kl_coef(0.04, -1.5, 100, cfg) == pytest.approx(0.04 * (1 - 0.2 * 100 / 10000), rel=1e-12)
    assert ppo.adapt_kl_coef(0.05, 6.0, 512, cfg) == 0.05  # on target
    assert ppo.adapt_kl_coef(0.05, 60.0, 512, PPOConfig()) == 0.05  # kl_target 0: the recipe's fixed beta
    with pytest.raises(FloatingPointError, match="KL to the reference is nan"):
        ppo.adapt_kl_coef(0.05, math.nan, 512, cfg)


def test_last_response_index():
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert ppo.last_response_index(mask).tolist() == [2, 0, 3]


def test_defaults_are_the_recipe():
    """PPOConfig's defaults and the 13B shape are RECIPE.md's table (Tulu V2.5 PPO 13B), value by value: a default
    changed by accident would change every run that relies on it."""

    recipe = dict(
        learning_rate=1e-6, lr_schedule="constant", warmup_ratio=0.1, adam_betas=(0.9, 0.999), adam_eps=1e-8,
        weight_decay=0.0, max_grad_norm=1.0, train_batch_size=64, rollout_batch_size=512, samples_per_prompt=1,
        ppo_epochs=1, prompt_epochs=1, kl_coef=0.05, kl_estimator="k1", missing_eos_penalty=-10.0,
        whiten_rewards=False, gamma=1.0, lam=0.95, whiten_advantages=True, clip_ratio=0.2, clip_value=0.2,
        value_loss_coef=0.1, temperature=0.7, max_new_tokens=1024, max_prompt_len=1024,
        # RECIPE.md names no top-k, and its card's "linear schedule" is EasyLM's linear warmup: its PPO script sets
        # end_lr to the peak (constant after the warmup) and its Flax generate applies GenerationConfig's top_k 50
        top_k=50, top_p=1.0,
        recompute_old_logprobs_per_minibatch=False,
        kl_target=0.0, kl_horizon=10000,  # the fixed coefficient (kl_horizon: TRL's and OpenRLHF's default)
        entropy_coef=0.0,
        whiten_eps=1e-6,  # EasyLM's whiten(): sqrt(unbiased var + 1e-6)
    )  # fmt: skip
    cfg = PPOConfig()
    assert {k: getattr(cfg, k) for k in recipe} == recipe
    assert set(recipe) == {f.name for f in dataclasses.fields(cfg)}  # a new field needs its recipe value here
    assert cfg.rollout_batch_size * cfg.samples_per_prompt // cfg.train_batch_size == 8  # optimizer steps a rollout
    m = ModelConfig.named("llama2-13b")
    shape = (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.intermediate_size, m.vocab_size)
    assert shape == (5120, 40, 40, 40, 13824, 32000)
    assert (m.rms_norm_eps, m.rope_theta, m.max_position_embeddings, m.dtype) == (1e-5, 10000.0, 4096, "bfloat16")


def test_a_row_without_response_tokens_gets_nothing():
    """An all-masked row (no response token) gets no reward, KL, advantage or return: its score is not placed at
    column 0 (0 outside the mask, as the contract says), and the other rows are as without it."""
    lp, ref, values, scores, mask = _rows(B=3, T=7, seed=3)
    mask[1] = 0
    cfg = PPOConfig(kl_coef=0.1)
    out = ppo.advantages_and_returns(lp, ref, values, mask, scores, cfg)
    for name in ("rewards", "kl", "advantages", "returns"):
        assert torch.all(out[name][1] == 0), name
    keep = [0, 2]
    alone = ppo.advantages_and_returns(lp[keep], ref[keep], values[keep], mask[keep], scores[keep], cfg)
    for name in ("rewards", "advantages", "returns"):
        torch.testing.assert_close(out[name][keep], alone[name])


def test_policy_loss_stats_are_token_sums():
    g = torch.Generator().manual_seed(0)
    N, H, V = 11, 8, 19
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    logp = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    old = logp.gather(1, targets[:, None]).squeeze(1) + torch.randn(N, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(N, generator=g)
    with reference_ops():
        _, stats = ppo.policy_loss(hidden, weight, targets, old.float(), adv, clip_eps=0.2, denom=30.0)
    ratio = torch.exp(logp.gather(1, targets[:, None]).squeeze(1) - old)
    entropy = -(logp.exp() * logp).sum(-1)
    assert stats["ratio"].item() == pytest.approx(ratio.sum().item(), rel=1e-4)
    assert stats["entropy"].item() == pytest.approx(entropy.sum().item(), rel=1e-4)


def _split_rows():
    g = torch.Generator().manual_seed(5)
    B, T = 4, 7
    lp, ref = -torch.rand(B, T, generator=g) * 3, -torch.rand(B, T, generator=g) * 3
    values, scores = torch.randn(B, T, generator=g), torch.randn(B, generator=g) * 2
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, n) in enumerate([(0, 7), (1, 3), (2, 5), (0, 2)]):
        mask[b, s : s + n] = True
    return lp, ref, values, scores, mask


def _whiten_rank(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    lp, ref, values, scores, mask = _split_rows()
    rows = [rank, rank + 2]
    with reference_ops():
        out = ppo.advantages_and_returns(
            lp[rows], ref[rows], values[rows], mask[rows], scores[rows], PPOConfig(whiten_rewards=True),
            dist.group.WORLD,
        )  # fmt: skip
    torch.save(out["rewards"], os.path.join(out_dir, f"rewards{rank}.pt"))
    leave()


def test_whitened_rewards_are_whitened_over_every_dp_rank(tmp_path):
    """With --whiten-rewards, two DP ranks (gloo processes) holding half the rows each whiten as one process holding
    all of them (the statistics are the global batch's, not each rank's)."""
    import torch.multiprocessing as mp

    mp.spawn(_whiten_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    lp, ref, values, scores, mask = _split_rows()
    with reference_ops():
        one = ppo.advantages_and_returns(lp, ref, values, mask, scores, PPOConfig(whiten_rewards=True))["rewards"]
    for rank in range(2):
        got = torch.load(tmp_path / f"rewards{rank}.pt")
        torch.testing.assert_close(got, one[[rank, rank + 2]], atol=1e-5, rtol=1e-5)


def test_value_loss_stats_are_the_values_and_errors_summed():
    """stats["value"] is the sum of the new values v (not the rollout's), stats["error"] that of (v - R)^2 (the
    unclipped error, whichever branch the loss took)."""
    old = torch.tensor([0.0, 1.0, -2.0])
    v = torch.tensor([0.5, 1.1, -1.0])  # the first and last move past the clip band 0.2
    ret = torch.tensor([1.0, 0.0, -3.0])
    _, stats = ppo.value_loss(v, old, ret, clip_value=0.2, denom=3.0)
    assert stats["value"].item() == pytest.approx(0.5 + 1.1 - 1.0)
    assert stats["error"].item() == pytest.approx(0.5**2 + 1.1**2 + 2.0**2)


def test_lr_without_warmup_starts_at_the_peak():
    cfg = PPOConfig(learning_rate=2.0, warmup_ratio=0.0, lr_schedule="linear")
    assert [ppo.lr_at(s, 10, cfg) for s in (0, 5)] == [2.0, pytest.approx(1.0)]
    assert ppo.lr_at(0, 10, PPOConfig(learning_rate=2.0, warmup_ratio=0.0)) == 2.0


def test_adaptive_kl_coef_refuses_an_infinite_kl():
    cfg = PPOConfig(kl_coef=0.05, kl_target=6.0)
    for kl in (math.inf, -math.inf):
        with pytest.raises(FloatingPointError, match="KL to the reference is -?inf"):
            ppo.adapt_kl_coef(0.05, kl, 512, cfg)


def test_the_adaptive_kl_coef_argument_replaces_the_configured_one():
    """advantages_and_returns(kl_coef=...) (the run's adaptive coefficient) shapes the rewards, not cfg.kl_coef."""
    lp, ref, values, scores, mask = _rows(seed=2)
    cfg = PPOConfig()
    with dispatch.reference_ops():
        got = ppo.advantages_and_returns(
            lp.float(), ref.float(), values.float(), mask, scores.float(), cfg, kl_coef=0.3
        )
    want = _expected(lp, ref, values, scores, mask, 0.3, cfg.gamma, cfg.lam)
    for k in ("rewards", "advantages"):
        torch.testing.assert_close(got[k].double(), want[k], atol=1e-5, rtol=1e-5, msg=k)


def _minibatch_rank(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    _, _, values, _, mask = _split_rows()
    rows = [rank, rank + 2]
    got, n = ppo.minibatch_advantages(values[rows], mask[rows], PPOConfig(), dist.group.WORLD)
    torch.save((got, n), os.path.join(out_dir, f"adv{rank}.pt"))
    leave()


def test_minibatch_advantages_are_whitened_over_every_dp_rank(tmp_path):
    """Two DP ranks (gloo processes) holding half a minibatch's rows each whiten its advantages as one process holding
    all of them, and count the minibatch's tokens over both (the losses' denominator), not their own."""
    import torch.multiprocessing as mp

    mp.spawn(_minibatch_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    _, _, values, _, mask = _split_rows()
    one, count = ppo.minibatch_advantages(values, mask, PPOConfig())
    assert count.item() == mask.sum().item() == 17
    for rank in range(2):
        got, n = torch.load(tmp_path / f"adv{rank}.pt")
        torch.testing.assert_close(got, one[[rank, rank + 2]], atol=1e-5, rtol=1e-5)
        assert n.item() == 17
