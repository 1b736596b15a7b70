"""kernels/logprob.py in Triton's interpreter against kernels/reference.py computed in float64."""

import contextlib
import math

import pytest
import torch

import kernels.logprob as L
import kernels.ppo_loss as P
from kernels import dispatch, reference

DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 1e-2, 1e-2),
    (torch.float16, 1e-2, 1e-2),
]


@pytest.fixture
def small_block(monkeypatch):
    """A 64-wide block, so that small vocabularies still take several blocks per row."""
    monkeypatch.setattr(L, "_INTERPRET_BLOCK_V", 64)


def _ref_fwd_bwd(logits, targets, temperature, g_lp, g_ent):
    """Reference outputs and grad of (g_lp . logp + g_ent . entropy) w.r.t. logits, in float64."""
    x = logits.detach().double().requires_grad_(True)
    lp, ent = reference.token_logprobs(x, targets, temperature, return_entropy=True)
    obj = (lp * g_lp.double()).sum() + ((ent * g_ent.double()).sum() if g_ent is not None else 0.0)
    (gx,) = torch.autograd.grad(obj, x)
    return lp, ent, gx


def _close(actual, expected, atol, rtol, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize(
    "shape,temperature,entropy",
    [
        ((1, 3), 1.0, True),
        ((7, 100), 0.7, True),
        ((2, 128), 1.0, True),  # rows end exactly at a block edge
        ((3, 5, 129), 1.0, False),
        ((2, 1000), 2.5, True),
        ((4,), 1.0, True),
        ((2, 2, 3, 70), 1.0, True),  # more than 3 dims
    ],
)
def test_token_logprobs_matches_reference(small_block, shape, temperature, entropy, dtype, atol, rtol):
    logits = (torch.randn(shape) * 3).to(dtype).requires_grad_(True)
    targets = torch.randint(0, shape[-1], shape[:-1])
    g_lp = torch.randn(shape[:-1])
    g_ent = torch.randn(shape[:-1]) if entropy else None
    out = L.token_logprobs(logits, targets, temperature, return_entropy=entropy)
    lp, ent = out if entropy else (out, None)
    assert lp.dtype == torch.float32 and lp.shape == targets.shape
    obj = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
    (gx,) = torch.autograd.grad(obj, logits)
    assert gx.dtype == dtype
    r_lp, r_ent, r_gx = _ref_fwd_bwd(logits, targets, temperature, g_lp, g_ent)
    # Forward math is fp32 on the exact (rounded) inputs, so it stays tight even for half inputs.
    _close(lp, r_lp, 1e-5, 1e-5, "logp")
    if entropy:
        _close(ent, r_ent, 1e-5, 1e-5, "entropy")
    # grad_logits is stored in the logits' dtype.
    _close(gx, r_gx, atol, rtol, "grad_logits")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2])
def test_vocab_32001_single_row(dtype, atol, rtol):
    """A real vocabulary that is not a multiple of any block (default interpreter block, several blocks)."""
    logits = (torch.randn(2, 32001) * 2).to(dtype).requires_grad_(True)
    targets = torch.tensor([0, 32000])
    lp, ent = L.token_logprobs(logits, targets, 0.9, return_entropy=True)
    g_lp, g_ent = torch.randn(2), torch.randn(2)
    (gx,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), logits)
    r_lp, r_ent, r_gx = _ref_fwd_bwd(logits, targets, 0.9, g_lp, g_ent)
    _close(lp, r_lp, 1e-5, 1e-5, "logp")
    _close(ent, r_ent, 1e-4, 1e-5, "entropy")
    _close(gx, r_gx, atol, rtol, "grad_logits")


def test_poisoned_outputs_are_all_written(small_block):
    logits = torch.randn(9, 200)
    targets = torch.randint(0, 200, (9,))
    x3 = L._as_rows(logits)
    out = (torch.full((9, 2), float("nan")), torch.full((9,), float("nan")), torch.full((9,), float("nan")))
    norm, lp, ent = L.logprob_forward(x3, targets, 1.3, True, out=out)
    assert norm is out[0] and lp is out[1] and ent is out[2]
    r_lp, r_ent = reference.token_logprobs(logits.double(), targets, 1.3, return_entropy=True)
    _close(lp, r_lp, 1e-5, 1e-5, "logp")
    _close(ent, r_ent, 1e-5, 1e-5, "entropy")
    _close(norm[:, 0], logits.amax(-1), 0, 0, "row max")  # (of the raw logits)
    lse = norm[:, 0].double() / 1.3 + norm[:, 1].double()
    _close(lse, torch.logsumexp(logits.double() / 1.3, -1), 1e-5, 1e-5, "max / T + log sum exp")
    g_lp, g_ent = torch.randn(9), torch.randn(9)
    gx = torch.full((9, 200), float("nan"))
    L.logprob_backward(x3, targets, norm, ent, g_lp, g_ent, 1.3, out=gx)
    _close(gx, _ref_fwd_bwd(logits, targets, 1.3, g_lp, g_ent)[2], 1e-5, 1e-5, "grad_logits")


def test_non_contiguous_logits_and_entropy_only_grad(small_block):
    """logits[:, :-1] (the usual shift) is read through its strides; grad may come from entropy alone."""
    full = torch.randn(3, 6, 130, requires_grad=True)
    logits = full[:, :-1]
    targets = torch.randint(0, 130, (3, 5))
    lp, ent = L.token_logprobs(logits, targets, return_entropy=True)
    g_ent = torch.randn(3, 5)
    (gx,) = torch.autograd.grad((ent * g_ent).sum(), full)
    r_lp, r_ent, r_gx = _ref_fwd_bwd(logits, targets, 1.0, torch.zeros(3, 5), g_ent)
    _close(lp, r_lp, 1e-5, 1e-5, "logp")
    _close(gx[:, :-1], r_gx, 1e-5, 1e-5, "grad_logits")
    assert torch.all(gx[:, -1] == 0)


@pytest.mark.parametrize("case", ["scale_1e4", "offset_1e4", "one_hot_peaked", "masked_vocab"])
def test_numerics_stress(small_block, case):
    n, v = 6, 300
    logits = torch.randn(n, v)
    targets = torch.randint(0, v, (n,))
    if case == "scale_1e4":
        logits = logits * 1e4
        targets[0] = logits[0].argmax()  # one row whose target is the max, the rest deep in the tail
    elif case == "offset_1e4":  # ordinary spreads far from 0: logp must not round at ulp(1e4) ~ 1e-3
        logits = 2 * logits + 1e4
    elif case == "one_hot_peaked":
        logits = torch.full((n, v), -30.0)
        logits[torch.arange(n), targets] = 30.0
        logits[1] = 0.0
        logits[1, 5] = 1e4  # a row whose target has probability exp(-1e4) = 0
    else:
        logits[:, : v // 2] = float("-inf")  # the first blocks entirely -inf: the running max stays -inf
        logits[:, 200:205] = float("-inf")
        targets = torch.randint(v // 2, v, (n,))
        targets[0] = 202  # a masked target: logp = -inf, grads stay finite
    logits.requires_grad_(True)
    lp, ent = L.token_logprobs(logits, targets, return_entropy=True)
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    if case == "masked_vocab":
        g_lp[0] = 0.0  # d(-inf)/dx is meaningless; the row still gets its entropy grad
    (gx,) = torch.autograd.grad((torch.where(g_lp != 0, lp, 0) * g_lp).sum() + (ent * g_ent).sum(), logits)
    r_lp, r_ent, r_gx = _ref_fwd_bwd(logits, targets, 1.0, g_lp, g_ent)
    _close(lp, r_lp, 1e-5, 1e-6, "logp")
    _close(ent, r_ent, 1e-5, 1e-5, "entropy")
    assert torch.isfinite(ent).all() and torch.isfinite(gx).all()
    # (offset: probabilities formed as exp(z - lse) would round with lse at ulp(1e4), 1e-3 of p; exp((z - m) - log s)
    # does not)
    _close(gx, r_gx, 1e-5, 1e-5, "grad_logits")


@pytest.mark.parametrize("path", ["kernel", "reference", "hidden"])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_logits_far_from_0_at_a_temperature(small_block, monkeypatch, path, temperature):
    """Logits of 1e4 (ordinary spreads, a dominant token, a masked vocabulary tail) at a temperature other than 1:
    log-probs, entropy and grads against float64 on every path. x / T rounds at ulp(x / T) (1e-3 at 1.4e4) before
    the row's max is taken off; (x - max) / T keeps what the spreads give, as at T = 1."""
    monkeypatch.setattr(L, "_CHUNK_ROWS", 3)
    gen = torch.Generator(torch.get_default_device()).manual_seed(11)
    n, v, real = 5, 150, 100
    logits = 2 * torch.randn(n, v, generator=gen) + 1e4
    logits[1, 7] = 1e4 + 40.0  # a dominant token: entropy ~ 0, its log-prob ~ 0
    logits[:, real:] = float("-inf")  # a masked tail (the padding of a vocabulary, with real_vocab on the LM head)
    targets = torch.randint(0, real, (n,), generator=gen)
    targets[1] = 7
    g_lp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    x64 = logits.double().requires_grad_(True)
    lsm = torch.log_softmax(x64 / temperature, -1)
    want_lp = lsm.gather(-1, targets[:, None]).squeeze(-1)
    p = lsm.exp()
    want_ent = -(p * torch.where(p > 0, lsm, 0.0)).sum(-1)
    (want_g,) = torch.autograd.grad((want_lp * g_lp).sum() + (want_ent * g_ent).sum(), x64)
    if path == "hidden":  # the LM head fused: a one-hot hidden state makes hidden @ weight.T these very logits
        weight = torch.where(torch.isfinite(logits), logits, 0.0).t().contiguous().requires_grad_(True)  # [v, n]
        lp, ent = L.hidden_logprobs(torch.eye(n), weight, targets, temperature, return_entropy=True, real_vocab=real)
        (got_g,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), weight)
        got_g = got_g.t()  # d/dweight[j, i] of a one-hot row i is d/dlogits[i, j]
    else:
        x = logits.clone().requires_grad_(True)
        with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
            lp, ent = L.token_logprobs(x, targets, temperature, return_entropy=True)
        (got_g,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), x)
    _close(lp, want_lp, 1e-5, 1e-5, "logp")
    _close(ent, want_ent, 1e-5, 1e-5, "entropy")
    _close(got_g, want_g, 1e-6, 1e-5, "grad_logits")


@pytest.mark.cpu_only  # (on a GPU the check is a device-side assert, which would end the test process's CUDA context)
def test_targets_out_of_range_are_named():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="out of range"):
        L.token_logprobs(logits, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="out of range"):
        L.token_logprobs(logits, torch.tensor([0, -1, 3, 2]))
    with pytest.raises(ValueError, match="out of range"):
        L.hidden_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 10]))


def test_errors_name_the_problem():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="temperature must be > 0 and finite, got inf"):
        L.token_logprobs(logits, torch.zeros(4, dtype=torch.long), math.inf)
    with pytest.raises(ValueError, match="targets shape"):
        L.token_logprobs(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="int64"):
        L.token_logprobs(logits, torch.zeros(4))
    with pytest.raises(ValueError, match="temperature"):
        L.token_logprobs(logits, torch.zeros(4, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        L.hidden_logprobs(torch.randn(4, 8), torch.randn(10, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="estimator"):
        L.kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="advantages shape"):
        P.ppo_token_loss(logits, t, torch.zeros(4), torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="either logits or both hidden and weight"):
        P.ppo_token_loss(None, t, torch.zeros(4), torch.zeros(4), torch.ones(4), hidden=torch.randn(4, 8))


def test_cpu_path_without_interpreter_uses_reference(monkeypatch):
    """Outside the interpreter a CPU tensor runs kernels/reference.py (never the Triton launcher)."""

    def boom(*a, **k):
        raise AssertionError("the Triton launcher ran on the reference path")

    monkeypatch.setattr(L, "_launch", boom)
    logits = torch.randn(3, 50, requires_grad=True)
    targets = torch.randint(0, 50, (3,))
    with dispatch.reference_ops():
        lp, ent = L.token_logprobs(logits, targets, 1.5, return_entropy=True)
        h, w = torch.randn(3, 8), torch.randn(50, 8)
        hl = L.hidden_logprobs(h, w, targets)
        loss, _ = P.ppo_token_loss(logits, targets, lp.detach(), torch.ones(3), torch.ones(3))
    _close(lp, torch.log_softmax(logits.double() / 1.5, -1)[torch.arange(3), targets], 1e-6, 1e-6, "logp")
    _close(hl, torch.log_softmax((h @ w.t()).double(), -1)[torch.arange(3), targets], 1e-5, 1e-5, "hidden logp")
    assert loss.requires_grad
    # float64 has no kernel: it takes the reference path even under the interpreter.
    lp64 = L.token_logprobs(logits.double(), targets)
    assert lp64.dtype == torch.float64


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)])
@pytest.mark.parametrize("entropy,temperature,chunk_rows", [(True, 1.0, 8), (False, 0.6, 13), (True, 1.7, None)])
def test_hidden_logprobs_matches_reference(
    small_block, monkeypatch, dtype, atol, rtol, entropy, temperature, chunk_rows
):
    monkeypatch.setattr(L, "_CHUNK_ROWS", chunk_rows)
    n, hdim, v = 29, 32, 211
    hidden = torch.randn(n, hdim).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, hdim) / math.sqrt(hdim)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,))
    out = L.hidden_logprobs(hidden, weight, targets, temperature, return_entropy=entropy)
    lp, ent = out if entropy else (out, None)
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    obj = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
    gh, gw = torch.autograd.grad(obj, (hidden, weight))
    hd, wd = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    r_lp, r_ent = reference.hidden_logprobs(hd, wd, targets, temperature, return_entropy=True)
    r_obj = (r_lp * g_lp.double()).sum() + ((r_ent * g_ent.double()).sum() if entropy else 0.0)
    r_gh, r_gw = torch.autograd.grad(r_obj, (hd, wd))
    # bf16 logits chunks are rounded once by the GEMM, hence the looser forward tolerance there.
    _close(lp, r_lp, atol, rtol, "logp")
    if entropy:
        _close(ent, r_ent, atol, rtol, "entropy")
    _close(gh, r_gh, 2 * atol, 2 * rtol, "grad_hidden")
    _close(gw, r_gw, 2 * atol, 2 * rtol, "grad_weight")


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_a_padded_vocabulary_is_the_vocabulary_without_its_padding(small_block, monkeypatch, path):
    """A TP shard padded past its real rows (a vocabulary the degree does not divide: engine.parallel.shard_rows):
    with real_vocab, hidden_logprobs and the fused PPO loss give the log-probs, entropy and grads of the weight's real
    rows alone (float64 oracle), whatever the padding rows hold (random here, zero in the model), and a zero grad to
    the padding; in several chunks, and the backward recomputing each (not the forward's buffer)."""
    monkeypatch.setattr(L, "_CHUNK_ROWS", 7)
    n, hdim, v, real = 19, 16, 101, 90
    hidden = torch.randn(n, hdim, dtype=torch.float32, requires_grad=True)
    weight = (3 * torch.randn(v, hdim) / math.sqrt(hdim)).requires_grad_(True)  # (padding as likely as any row)
    targets = torch.randint(0, real, (n,))
    targets[0] = real - 1  # the last real row
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    old, adv, ref = torch.randn(n) - 3, torch.randn(n), torch.randn(n) - 3
    mask = torch.ones(n)
    with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
        lp, ent = L.hidden_logprobs(hidden, weight, targets, 0.8, return_entropy=True, real_vocab=real)
        loss, _ = P.ppo_token_loss(None, targets, old, adv, mask, hidden=hidden, weight=weight, temperature=0.8,
                                   ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, real_vocab=real)  # fmt: skip
        gh, gw = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum() + loss, (hidden, weight))
    hd, wd = hidden.detach().double().requires_grad_(True), weight.detach()[:real].double().requires_grad_(True)
    r_lp, r_ent = reference.hidden_logprobs(hd, wd, targets, 0.8, return_entropy=True)
    r_loss, _ = reference.ppo_token_loss(None, targets, old, adv, mask, hidden=hd, weight=wd, temperature=0.8,
                                         ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01)  # fmt: skip
    r_gh, r_gw = torch.autograd.grad((r_lp * g_lp).sum() + (r_ent * g_ent).sum() + r_loss, (hd, wd))
    _close(lp, r_lp, 1e-5, 1e-5, "logp")
    _close(ent, r_ent, 1e-5, 1e-5, "entropy")
    _close(loss, r_loss, 1e-5, 1e-5, "loss")
    _close(gh, r_gh, 2e-5, 2e-5, "grad_hidden")
    _close(gw[:real], r_gw, 2e-5, 2e-5, "grad_weight")
    assert torch.equal(gw[real:], torch.zeros_like(gw[real:])), "the padding rows got a grad"
    for bad in (0, v + 1):
        with pytest.raises(ValueError, match=f"real_vocab {bad} must be in \\[1, {v}\\]"):
            L.hidden_logprobs(hidden, weight, targets, real_vocab=bad)
    with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():  # (the range's top: no padding)
        whole = L.hidden_logprobs(hidden, weight, targets, 0.8, real_vocab=v)
        assert torch.equal(whole, L.hidden_logprobs(hidden, weight, targets, 0.8))
    with pytest.raises(ValueError, match="real_vocab goes with hidden/weight"):
        P.ppo_token_loss(torch.randn(n, v), targets, old, adv, mask, real_vocab=real)


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_a_target_in_the_padding_sends_no_grad_to_it(small_block, monkeypatch, path):
    """A target past real_vocab (an id of the padding, which the vocabulary-parallel check of [0, V_total) lets
    through): its log-prob is -inf on either path, and, as real_vocab promises, the padding rows get no grad (the
    kernel's one-hot term of the target must not land there) and give none to the hidden states, as the oracle's."""
    monkeypatch.setattr(L, "_CHUNK_ROWS", 3)
    n, hdim, v, real = 5, 16, 70, 60
    hidden = torch.randn(n, hdim, requires_grad=True)
    weight = torch.randn(v, hdim, requires_grad=True)  # (random padding rows: a grad through them would show)
    targets = torch.tensor([3, real, 7, v - 1, real - 1])
    with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
        lp = L.hidden_logprobs(hidden, weight, targets, real_vocab=real)
        gh, gw = torch.autograd.grad(lp, (hidden, weight), torch.ones(n))
    assert lp[1] == lp[3] == -math.inf and lp[[0, 2, 4]].isfinite().all()
    assert torch.equal(gw[real:], torch.zeros_like(gw[real:])), "a target in the padding sent its row a grad"
    hd, wd = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    r_lp = reference.hidden_logprobs(hd, wd, targets, real_vocab=real)
    r_gh, r_gw = torch.autograd.grad(r_lp, (hd, wd), torch.ones(n, dtype=torch.float64))
    _close(gh, r_gh, 1e-5, 1e-5, "grad_hidden")
    _close(gw, r_gw, 1e-5, 1e-5, "grad_weight")


def test_hidden_logprobs_grad_of_hidden_only(small_block, monkeypatch):
    monkeypatch.setattr(L, "_CHUNK_ROWS", 2)
    hidden = torch.randn(5, 16, requires_grad=True)
    weight = torch.randn(70, 16)
    targets = torch.randint(0, 70, (5,))
    (gh,) = torch.autograd.grad(L.hidden_logprobs(hidden, weight, targets).sum(), hidden)
    hd = hidden.detach().double().requires_grad_(True)
    (r_gh,) = torch.autograd.grad(reference.hidden_logprobs(hd, weight.double(), targets).sum(), hd)
    _close(gh, r_gh, 1e-5, 1e-5, "grad_hidden")


def test_kl_estimate_values():
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-2.0, -2.0, -0.25], dtype=torch.float64)
    d = torch.tensor([1.0, 0.0, -0.25], dtype=torch.float64)
    _close(L.kl_estimate(lp, ref, "k1"), d, 0, 1e-12, "k1")
    _close(L.kl_estimate(lp, ref, "k2"), 0.5 * d**2, 0, 1e-12, "k2")
    k3 = torch.tensor([math.exp(-1.0) - 1 + 1.0, 0.0, math.exp(0.25) - 1 - 0.25], dtype=torch.float64)
    _close(L.kl_estimate(lp, ref, "k3"), k3, 1e-15, 1e-12, "k3")
    for est in ("k1", "k2", "k3"):
        _close(reference.kl_estimate(lp, ref, est), L.kl_estimate(lp, ref, est), 1e-15, 1e-12, f"reference {est}")
    assert (L.kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_k3_of_small_log_ratios_keeps_its_precision_and_sign(path):
    """k3 = exp(-d) - 1 + d is about d^2 / 2 for a small d = logp - ref: written as it reads, fp32 loses it to the
    cancellation in exp(-d) - 1 at ulp(1) (d = 1e-4: -1.7e-8 for 5e-9, below 0); expm1(-d) + d only at ulp(d). Both
    paths (the reference runs the CPU engine's PPO loss) against float64, in kl_estimate and in ppo_token_loss."""
    logits = torch.zeros(6, 5)
    targets = torch.zeros(6, dtype=torch.int64)
    with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
        logp = L.token_logprobs(logits, targets)  # log 1/5
        ref = logp - torch.tensor([1e-4, -1e-4, 3e-4, -3e-3, 1e-2, -0.5])
        got = L.kl_estimate(logp, ref, "k3") if path == "kernel" else reference.kl_estimate(logp, ref, "k3")
        loss, stats = P.ppo_token_loss(
            logits, targets, logp, torch.zeros(6), torch.ones(6), ref_logprobs=ref, kl_coef=1.0, kl_estimator="k3"
        )
    d = logp.double() - ref.double()  # (of the fp32 inputs, exactly)
    want = torch.exp(-d) - 1.0 + d
    bound = 2e-7 * d.abs() + 1e-6 * want  # a few ulp of d, then of k3
    assert (got >= 0).all(), got
    assert ((got.double() - want).abs() <= bound).all(), (got, want)
    for name, x in (("kl_ref", stats["kl_ref"]), ("loss", loss)):
        assert abs(float(x) - float(want.mean())) <= float(bound.mean()), (name, float(x), float(want.mean()))


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("kl_estimator,kl_coef,entropy_coef", [("k1", 0.1, 0.0), ("k2", 0.05, 0.01), ("k3", 0.2, 0.0)])
def test_ppo_token_loss_matches_reference(small_block, monkeypatch, path, kl_estimator, kl_coef, entropy_coef):
    monkeypatch.setattr(L, "_CHUNK_ROWS", 7)
    n, hdim, v, temperature = 23, 16, 150, 0.8
    hidden = torch.randn(n, hdim, requires_grad=True)
    weight = (torch.randn(v, hdim) / 2).requires_grad_(True)
    targets = torch.randint(0, v, (n,))
    with torch.no_grad():
        cur = reference.hidden_logprobs(hidden.double(), weight.double(), targets, temperature).float()
    old = cur + 0.4 * torch.randn(n)  # large enough that some ratios get clipped
    ref_lp = cur + 0.2 * torch.randn(n)
    adv = torch.randn(n)
    mask = torch.rand(n) > 0.25
    kw = dict(
        clip_eps=0.2, temperature=temperature, ref_logprobs=ref_lp, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
    )  # fmt: skip
    if path == "hidden":
        loss, stats = P.ppo_token_loss(None, targets, old, adv, mask, hidden=hidden, weight=weight, **kw)
        gh, gw = torch.autograd.grad(3.0 * loss, (hidden, weight))
    else:
        logits = (hidden @ weight.t()).detach().requires_grad_(True)
        loss, stats = P.ppo_token_loss(logits, targets, old, adv, mask, **kw)
        (gl,) = torch.autograd.grad(3.0 * loss, logits)
        gh, gw = gl @ weight.detach(), gl.t() @ hidden.detach()
    hd, wd = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    kw["ref_logprobs"] = ref_lp.double()
    r_loss, r_stats = reference.ppo_token_loss(
        None, targets, old.double(), adv.double(), mask, hidden=hd, weight=wd, **kw
    )
    r_gh, r_gw = torch.autograd.grad(3.0 * r_loss, (hd, wd))
    assert 0 < float(r_stats["clip_frac"]) < 1, "the test inputs should clip some tokens"
    _close(loss, r_loss, 1e-5, 1e-5, "loss")
    for k in ("ratio", "clip_frac", "entropy", "approx_kl", "kl_ref"):
        _close(stats[k], r_stats[k], 1e-5, 1e-5, k)
    _close(gh, r_gh, 1e-5, 1e-5, "grad_hidden")
    _close(gw, r_gw, 1e-5, 1e-5, "grad_weight")


def test_ppo_token_loss_empty_mask_is_zero(small_block):
    logits = torch.randn(2, 3, 40, requires_grad=True)
    targets = torch.randint(0, 40, (2, 3))
    z = torch.zeros(2, 3)
    loss, stats = P.ppo_token_loss(logits, targets, z, torch.ones(2, 3), z.bool())
    (g,) = torch.autograd.grad(loss, logits)
    assert float(loss.detach()) == 0.0 and torch.all(g == 0)
    assert all(torch.isfinite(s) for s in stats.values())


@pytest.mark.parametrize("path", ["logits", "hidden", "reference"])
def test_ppo_token_loss_ignores_what_lies_off_the_mask(small_block, path):
    """Padding may hold anything in old log-probs, advantages and reference log-probs (NaN, -200 whose ratio
    overflows to inf): the loss, its gradients and the stats are those of the masked tokens alone."""
    gen = torch.Generator(torch.get_default_device()).manual_seed(3)  # (the GPU test mode: cuda)
    n, h, v = 8, 16, 40
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / 4
    targets = torch.randint(0, v, (n,), generator=gen)
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    clean = [torch.randn(n, generator=gen) - 2, torch.randn(n, generator=gen), torch.randn(n, generator=gen) - 2]
    dirty = [x.clone() for x in clean]
    dirty[0][3], dirty[0][6], dirty[0][7] = -200.0, float("nan"), float("inf")
    dirty[1][3], dirty[1][6] = 0.0, float("nan")
    dirty[2][6], dirty[2][7] = float("nan"), -float("inf")
    results = []
    for old, adv, ref in (clean, dirty):
        hd, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        kw = dict(ref_logprobs=ref, kl_coef=0.1, kl_estimator="k3")
        with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
            if path == "hidden":
                loss, stats = P.ppo_token_loss(None, targets, old, adv, mask, hidden=hd, weight=w, **kw)
            else:
                loss, stats = P.ppo_token_loss(hd @ w.T, targets, old, adv, mask, **kw)
        loss.backward()
        results.append((loss.detach(), hd.grad, w.grad, stats))
    (l0, gh0, gw0, s0), (l1, gh1, gw1, s1) = results
    assert torch.isfinite(l1) and torch.isfinite(gh1).all() and torch.isfinite(gw1).all()
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(gh1, gh0)
    torch.testing.assert_close(gw1, gw0)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], msg=k)


@pytest.mark.parametrize("path", ["logits", "hidden", "reference"])
def test_ppo_token_loss_off_the_mask_a_far_unlikely_target_adds_no_nan(small_block, path):
    """A padding token whose own log-prob is far below zero (-300: exp(ref - logp) of k3 overflows to inf there)
    leaves the loss and the grads those of the masked tokens alone: no 0 * inf = NaN in any gradient."""
    gen = torch.Generator(torch.get_default_device()).manual_seed(5)
    n, h, v = 6, 16, 40
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / 4
    targets = torch.randint(0, v, (n,), generator=gen)
    hidden[4] = -weight[targets[4]] * (300.0 / weight[targets[4]].square().sum())  # that target's logit: -300
    mask = torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool)
    old, adv, ref = torch.randn(n, generator=gen) - 2, torch.randn(n, generator=gen), torch.randn(n, generator=gen) - 2
    results = []
    for rows in (torch.arange(n), mask.nonzero().squeeze(1)):  # with the padding token, then without it
        hd, w = hidden[rows].clone().requires_grad_(), weight.clone().requires_grad_()
        kw = dict(ref_logprobs=ref[rows], kl_coef=0.1, kl_estimator="k3")
        args = (targets[rows], old[rows], adv[rows], mask[rows])
        with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
            if path == "hidden":
                loss, _ = P.ppo_token_loss(None, *args, hidden=hd, weight=w, **kw)
            else:
                loss, _ = P.ppo_token_loss(hd @ w.T, *args, **kw)
        loss.backward()
        results.append((loss.detach(), hd.grad, w.grad))
    (l0, gh0, gw0), (l1, gh1, gw1) = results
    assert torch.isfinite(gh0).all() and torch.isfinite(gw0).all()
    assert torch.all(gh0[4] == 0)
    torch.testing.assert_close(l0, l1)
    torch.testing.assert_close(gh0[mask], gh1)
    torch.testing.assert_close(gw0, gw1)


@pytest.mark.parametrize("path", ["logits", "hidden", "reference"])
def test_ppo_token_loss_without_its_kl_term_adds_no_nan(small_block, path):
    """kl_coef 0 with ref_logprobs given (the stats' kl_ref still computed): a k3 estimate that overflows fp32 on a
    masked token (ref - logp ~ 100) leaves the loss the clipped surrogate's, on every path (the reference path added
    0 * inf = NaN)."""
    logits = torch.tensor([[0.0, 0.0, 0.0, -100.0], [1.0, 2.0, 0.5, 0.0]])
    targets = torch.tensor([3, 1])
    old = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).squeeze(-1).float()  # ratio 1
    adv, mask, ref = torch.tensor([1.0, -0.5]), torch.ones(2), torch.tensor([-1.0, -1.0])
    kw = dict(ref_logprobs=ref, kl_coef=0.0, kl_estimator="k3")
    with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
        if path == "hidden":  # (hidden = I, weight = the logits' transpose: the same logits)
            loss, _ = P.ppo_token_loss(
                None, targets, old, adv, mask, hidden=torch.eye(2), weight=logits.T.clone(), **kw
            )
        else:
            loss, _ = P.ppo_token_loss(logits, targets, old, adv, mask, **kw)
    assert float(loss) == pytest.approx(-0.25, abs=1e-6), float(loss)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_fused_ppo_loss_outside_grad_mode_takes_no_grad(small_block, mode):
    """The fused loss (hidden/weight) under no_grad or inference_mode: the loss and stats alone, as the reference path
    gives them; no grad taken, and none added to a weight_grad_into sum no backward will follow (it was, under
    no_grad, corrupting an optimizer's sum; inference_mode raised)."""
    gen = torch.Generator(torch.get_default_device()).manual_seed(3)
    n, h, v = 5, 8, 30
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    old, adv, mask = torch.randn(n, generator=gen) - 3, torch.randn(n, generator=gen), torch.ones(n)
    results = []
    for path in ("kernel", "reference"):
        into = torch.zeros(v, h)
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
                loss, stats = P.ppo_token_loss(
                    None, targets, old, adv, mask, hidden=hidden, weight=weight, weight_grad_into=into
                )
        assert not loss.requires_grad and torch.all(into == 0), path
        results.append((loss, stats))
    torch.testing.assert_close(results[0][0], results[1][0])
    for k in results[0][1]:
        torch.testing.assert_close(results[0][1][k], results[1][1][k], msg=k)


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_fused_ppo_loss_into_a_sum_with_a_frozen_hidden(small_block, path):
    """weight_grad_into with a hidden that takes no grad (a frozen trunk): the LM head's grad goes into the sum and the
    documented loss.backward() runs on both paths (the reference path's loss had no graph to run)."""
    gen = torch.Generator(torch.get_default_device()).manual_seed(4)
    n, h, v = 5, 8, 30
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    old, adv, mask = torch.randn(n, generator=gen) - 3, torch.randn(n, generator=gen), torch.ones(n)
    w = weight.detach().requires_grad_()
    want = torch.autograd.grad(reference.ppo_token_loss(hidden @ w.T, targets, old, adv, mask)[0], w)[0]
    into = torch.zeros(v, h)
    with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
        loss, _ = P.ppo_token_loss(None, targets, old, adv, mask, hidden=hidden, weight=weight, weight_grad_into=into)
    loss.backward()
    torch.testing.assert_close(into, want)
    assert weight.grad is None


def test_gemm_counts_per_chunk(small_block, monkeypatch):
    """hidden_logprobs: 1 GEMM per chunk forward, 3 backward; the fused PPO loss: 3 per chunk in all."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (
                torch.ops.aten.mm,
                torch.ops.aten.addmm,
                torch.ops.aten.addmm_,
                torch.ops.aten.bmm,
            ):
                self.n += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(L, "_CHUNK_ROWS", 4)
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (10,))
    with CountMM() as c:
        lp = L.hidden_logprobs(hidden, weight, targets)  # 3 chunks
        fwd = c.n
        torch.autograd.grad(lp.sum(), (hidden, weight))
    assert (fwd, c.n) == (3, 12)
    z = torch.zeros(10)
    with CountMM() as c:
        loss, _ = P.ppo_token_loss(None, targets, z, z + 1, z + 1, hidden=hidden, weight=weight)
        torch.autograd.grad(loss, (hidden, weight))
    assert c.n == 9


def test_autotune_config_pruning():
    """The GPU autotuner only tries blocks that fit the row (checked here since CI has no GPU)."""
    blocks = lambda v: sorted({c.kwargs["BLOCK_V"] for c in L._prune_configs(L._configs(), {"V": v})})
    assert blocks(3) == [256]
    assert blocks(1000) == [256, 1024]
    assert min(blocks(32000)) >= 2048 and max(blocks(32000)) == 32768  # (the whole row in one block, too)


def test_default_chunk_is_bounded():
    """The LM-head chunk stays within _CHUNK_BYTES (the O(chunk x V) extra memory) and is GEMM-tile sized."""
    rows = L._chunk_rows(8192, 32000, 2)
    assert rows % 128 == 0 and 0 < rows * 32000 * 2 <= L._CHUNK_BYTES
    assert L._chunk_rows(5, 32000, 2) == 5
    assert L._chunk_rows(10, 10**9, 4) == 1


def test_half_lm_head_grads_keep_their_scale_and_precision(small_block, monkeypatch):
    """bf16 hidden and weight through the fused PPO loss over 64 chunks, the loss scaled by 0.3 (as a micro-batch's
    share of a minibatch is): the grads keep the fp32 scale (rounded to bf16 first, 0.3 is 0.30078: every grad of the
    micro-batch 0.26% too large), and the LM head's grad, summed over the chunks in fp32, stays within bf16's rounding
    of the float64 one (a bf16 running sum drifts by about 2^-9 a chunk)."""
    monkeypatch.setattr(L, "_CHUNK_ROWS", 4)
    n, hdim, v = 256, 64, 96
    gen = torch.Generator(torch.get_default_device()).manual_seed(5)  # (the GPU test mode's default device: cuda)
    hidden = torch.randn(n, hdim, generator=gen).bfloat16().requires_grad_(True)
    weight = (torch.randn(v, hdim, generator=gen) / 8).bfloat16().requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=gen)
    adv = torch.randn(n, generator=gen)
    # old log-probs near the new ones (ratios near 1, as in PPO): far from them a few heavy-tailed ratios dominate, and
    # the draw's own rounding noise (another draw on a GPU) is as large as the 0.26% this test is for
    new = reference.hidden_logprobs(hidden.detach().double(), weight.detach().double(), targets).float()
    old = new + 0.1 * torch.randn(n, generator=gen)
    mask = torch.ones(n, dtype=torch.bool)
    loss, _ = P.ppo_token_loss(None, targets, old, adv, mask, hidden=hidden, weight=weight, clip_eps=1e9)
    gh, gw = torch.autograd.grad(0.3 * loss, (hidden, weight))
    hd, wd = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    r_loss, _ = reference.ppo_token_loss(None, targets, old.double(), adv.double(), mask, hidden=hd, weight=wd,
                                         clip_eps=1e9)  # fmt: skip
    r_gh, r_gw = torch.autograd.grad(0.3 * r_loss, (hd, wd))
    for name, ours, ref in (("grad_hidden", gh, r_gh), ("grad_weight", gw, r_gw)):
        scale = float((ours.double() * ref).sum() / (ref * ref).sum())  # (random roundings average out)
        assert abs(scale - 1) < 1e-3, (name, scale)
    # bf16 grad_logits and each chunk's product rounded once: about 0.4% RMS (the final rounding alone 0.16%); a bf16
    # running sum over the 64 chunks: 0.7-0.9%
    error = float((gw.double() - r_gw).norm() / r_gw.norm())
    assert error < 5.5e-3, error


def test_the_in_place_backward_is_autotuned_with_its_grad_restored():
    """The fused LM-head path writes the logits' grad over the logits (logprob_backward's `out` aliases them): the
    autotuner's timing runs of the backward (GPU only: the interpreter never tunes) would each read the previous
    run's grads as logits unless it restores that buffer between them. The forward writes only its own outputs."""
    assert L._bwd_tuned.restore_value == ["gx_ptr"]
    assert "gx_ptr" in L._bwd_tuned.arg_names
    assert not L._fwd_tuned.restore_value


def test_logits_without_unit_last_stride(small_block):
    """A transposed view (last stride != 1) is copied for the kernel, which reads a row with unit stride."""
    for base, perm in ((torch.randn(130, 5), (1, 0)), (torch.randn(2, 97, 3), (0, 2, 1))):
        full = base.requires_grad_(True)
        logits = full.permute(*perm)
        assert logits.stride(-1) != 1
        targets = torch.randint(0, logits.shape[-1], logits.shape[:-1])
        lp, ent = L.token_logprobs(logits, targets, 0.9, return_entropy=True)
        g_lp, g_ent = torch.randn(targets.shape), torch.randn(targets.shape)
        (gx,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), full)
        r_lp, r_ent, r_gx = _ref_fwd_bwd(logits, targets, 0.9, g_lp, g_ent)
        _close(lp, r_lp, 1e-5, 1e-5, "logp")
        _close(ent, r_ent, 1e-5, 1e-5, "entropy")
        _close(gx.permute(*perm), r_gx, 1e-5, 1e-5, "grad_logits")


def test_empty_inputs(small_block, monkeypatch):
    """0 tokens: empty outputs and grads; the LM head's grad is all zeros (its buffer, poisoned here, is written by
    no chunk)."""
    for shape in ((0, 50), (2, 0, 50), (2, 3, 0, 50)):
        logits = torch.randn(shape, requires_grad=True)
        targets = torch.zeros(shape[:-1], dtype=torch.long)
        lp, ent = L.token_logprobs(logits, targets, return_entropy=True)
        assert lp.shape == ent.shape == targets.shape and lp.dtype == torch.float32
        (gx,) = torch.autograd.grad(lp.sum() + ent.sum(), logits)
        assert gx.shape == logits.shape
    weight_grad = L._weight_grad
    monkeypatch.setattr(L, "_weight_grad", lambda w, n, rows: weight_grad(w, n, rows).fill_(float("nan")))
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long)
    lp = L.hidden_logprobs(hidden, weight, targets)
    assert lp.shape == (0,)
    gh, gw = torch.autograd.grad(lp.sum(), (hidden, weight))
    assert gh.shape == (0, 8) and torch.all(gw == 0)
    z = torch.zeros(0)
    loss, _ = P.ppo_token_loss(None, targets, z, z, z.bool(), hidden=hidden, weight=weight)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert float(loss.detach()) == 0.0 and gh.shape == (0, 8) and torch.all(gw == 0)


def test_more_errors_name_the_problem():
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="non-empty last"):
        L.token_logprobs(torch.randn(4, 0), t)
    with pytest.raises(ValueError, match="targets shape"):  # the same count of tokens, another shape
        L.token_logprobs(torch.randn(2, 3, 10), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="empty vocab"):
        L.hidden_logprobs(torch.randn(4, 8), torch.randn(0, 8), t)
    with pytest.raises(ValueError, match="dtype"):
        L.hidden_logprobs(torch.randn(4, 8), torch.randn(10, 8).double(), t)
    with pytest.raises(ValueError, match="targets shape"):
        L.hidden_logprobs(torch.randn(4, 8), torch.randn(10, 8), t.view(4, 1))
    z, one = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="not both"):
        P.ppo_token_loss(torch.randn(4, 10), t, z, z, one, weight=torch.randn(10, 8))
    with pytest.raises(ValueError, match="ref_logprobs shape"):
        P.ppo_token_loss(torch.randn(4, 10), t, z, z, one, ref_logprobs=torch.zeros(1))
    with pytest.raises(ValueError, match="hidden size mismatch"):
        P.ppo_token_loss(None, t, z, z, one, hidden=torch.randn(4, 8), weight=torch.randn(10, 6))
    blocks = lambda v: sorted({c.kwargs["BLOCK_V"] for c in L._prune_configs(L._configs(), {"V": v})})
    assert min(blocks(8192)) == 2048 and min(blocks(8191)) == 256  # (narrow blocks only below 8192)


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf])
def test_ppo_token_loss_refuses_a_bad_temperature_on_either_path(path, temperature):
    """The CPU reference path (the engine's without the interpreter) refuses what token_logprobs refuses, rather
    than a NaN (temperature 0) or a silently wrong loss."""
    t, z, one = torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.ones(4)
    with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
        with pytest.raises(ValueError, match="temperature"):
            P.ppo_token_loss(torch.randn(4, 10), t, z, z, one, temperature=temperature)
        with pytest.raises(ValueError, match="temperature"):
            P.ppo_token_loss(
                None, t, z, z, one, hidden=torch.randn(4, 8), weight=torch.randn(10, 8), temperature=temperature
            )


def test_fused_ppo_loss_refuses_a_second_backward(small_block):
    """The fused path scales its saved grads in place: a second backward would return them scaled twice."""
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    targets, z = torch.randint(0, 30, (5,)), torch.zeros(5)
    loss, _ = P.ppo_token_loss(None, targets, z - 3, torch.randn(5), torch.ones(5), hidden=hidden, weight=weight)
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_ppo_loss_adds_the_lm_heads_grad_to_a_given_fp32_sum(small_block, monkeypatch, dtype):
    """weight_grad_into: the LM head's grad, scaled by loss_scale, is added during the forward to an fp32 sum holding
    earlier micro-batches' grads (every chunk adds, none overwrites), none reaches weight.grad, and it equals the
    float64 grad; the loss comes back scaled, the grad of hidden as the unfused call's. The loss backpropagated with a
    grad other than 1 is refused (that grad could not reach what the forward already added)."""
    monkeypatch.setattr(L, "_CHUNK_ROWS", 5)
    n, hdim, v = 23, 16, 90
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(n, hdim, generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, hdim, generator=gen) / 4).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=gen)
    with torch.no_grad():
        new = reference.hidden_logprobs(hidden.double(), weight.double(), targets).float()
    old, adv, mask = new + 0.3 * torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.rand(n) > 0.2
    earlier = torch.randn(v, hdim, generator=gen)
    acc = earlier.clone()
    scale = torch.tensor(0.37)
    loss, stats = P.ppo_token_loss(None, targets, old, adv, mask, hidden=hidden, weight=weight, loss_scale=scale,
                                   weight_grad_into=acc)  # fmt: skip
    assert not torch.equal(acc, earlier)  # (added during the forward)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    hd, wd = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    r_loss, r_stats = reference.ppo_token_loss(None, targets, old.double(), adv.double(), mask, hidden=hd, weight=wd)
    r_gh, r_gw = torch.autograd.grad(0.37 * r_loss, (hd, wd))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    _close(loss, 0.37 * r_loss, tol, tol, "scaled loss")
    _close(stats["ratio"], r_stats["ratio"], tol, tol, "ratio (not scaled)")
    _close(acc - earlier, r_gw, tol * 0.1, tol, "the sum's increment")
    _close(hidden.grad, r_gh, tol * 0.1, tol, "grad_hidden")
    # the unfused call's grads: the same up to the inputs' rounding
    h2, w2 = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    loss2, _ = P.ppo_token_loss(None, targets, old, adv, mask, hidden=h2, weight=w2, loss_scale=scale)
    loss2.backward()
    _close(loss2, loss, 1e-6, 1e-6, "loss without the sum")
    _close(w2.grad, acc - earlier, tol * 0.1, tol, "grad_weight without the sum")
    again = earlier.clone()
    loss3, _ = P.ppo_token_loss(None, targets, old, adv, mask, hidden=h2, weight=w2, weight_grad_into=again)
    with pytest.raises(RuntimeError, match="backpropagated as it is"):
        (2 * loss3).backward()


def test_fused_ppo_loss_refuses_a_sum_of_another_shape_or_dtype(small_block):
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    targets, z = torch.randint(0, 30, (5,)), torch.zeros(5)
    for bad in (torch.zeros(30, 8, dtype=torch.bfloat16), torch.zeros(8, 30)):
        with pytest.raises(ValueError, match="weight_grad_into must be an fp32 tensor of the weight's shape"):
            P.ppo_token_loss(None, targets, z, z, z + 1, hidden=hidden, weight=weight, weight_grad_into=bad)
    with pytest.raises(ValueError, match="weight_grad_into"):
        P.ppo_token_loss(torch.randn(5, 30), targets, z, z, z + 1, weight_grad_into=torch.zeros(30, 8))


def test_add_matmul_sums_in_fp32(monkeypatch):
    """dispatch.add_matmul_: on the CPU (no fp32-out GEMM: fp32_out_gemm is False) the half product is added, the same
    bits as adding a @ b; where the device has the GEMM, one torch.addmm into the sum itself (out=acc, out_dtype fp32,
    beta 0 when not accumulating)."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(9, 33, generator=gen).bfloat16()
    b = torch.randn(7, 33, generator=gen).bfloat16().t()
    acc = torch.randn(9, 7, generator=gen)
    want = acc + (a @ b).float()
    assert not dispatch.fp32_out_gemm(acc.device)
    assert torch.equal(dispatch.add_matmul_(acc, a, b), want)
    assert torch.equal(dispatch.add_matmul_(acc, a, b, accumulate=False), (a @ b).float())
    a32, b32 = a.float(), b.float()
    acc2 = want.clone()
    assert torch.equal(dispatch.add_matmul_(acc2, a32, b32), torch.addmm(want, a32, b32))
    calls = []

    def fake_addmm(c, x, y, *, beta=1, alpha=1, out_dtype=None, out=None):
        calls.append((c is acc, out is acc, out_dtype, beta))
        return out.mul_(beta).add_(x.float() @ y.float())

    monkeypatch.setattr(dispatch, "fp32_out_gemm", lambda device: True)
    monkeypatch.setattr(torch, "addmm", fake_addmm)
    acc.copy_(want)
    dispatch.add_matmul_(acc, a, b)
    dispatch.add_matmul_(acc, a, b, accumulate=False)
    assert calls == [(True, True, torch.float32, 1), (True, True, torch.float32, 0)]
    torch.testing.assert_close(acc, a.float() @ b.float())


def test_the_reference_path_adds_the_lm_heads_grad_to_the_sum_too():
    """On the reference ops (the engine on a CPU) weight_grad_into takes the weight's grad as well (by autograd, in
    the forward), the loss still backpropagating into hidden."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, 8, generator=gen, requires_grad=True)
    weight = torch.randn(30, 8, generator=gen, requires_grad=True)
    targets, z, adv = torch.randint(0, 30, (7,), generator=gen), torch.zeros(7), torch.randn(7, generator=gen)
    earlier = torch.randn(30, 8, generator=gen)
    acc = earlier.clone()
    with dispatch.reference_ops():
        loss, _ = P.ppo_token_loss(None, targets, z - 2, adv, z + 1, hidden=hidden, weight=weight, loss_scale=0.5,
                                   weight_grad_into=acc)  # fmt: skip
    loss.backward()
    r_loss, _ = reference.ppo_token_loss(None, targets, z - 2, adv, z + 1, hidden=hidden, weight=weight)
    r_gh, r_gw = torch.autograd.grad(0.5 * r_loss, (hidden, weight))
    assert weight.grad is None
    torch.testing.assert_close(loss, 0.5 * r_loss)
    torch.testing.assert_close(acc - earlier, r_gw)
    torch.testing.assert_close(hidden.grad, r_gh)


def test_the_reference_paths_loss_is_differentiated_once_and_only_as_it_is():
    """On the reference ops the grads under weight_grad_into are taken in the forward, as the kernel path takes them:
    the loss's graph leads to hidden alone (no leaf standing for the weight, whose grad GEMM the caller's backward
    would run a second time, nor the [N, V] logits kept for it), and a scaled backward is refused as the kernel
    path refuses it (the sum already holds the grad for 1)."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 8, generator=gen).requires_grad_()
    weight = torch.randn(30, 8, generator=gen, requires_grad=True)
    targets, z, adv = torch.randint(0, 30, (6,), generator=gen), torch.zeros(6), torch.randn(6, generator=gen)
    with dispatch.reference_ops():
        loss, _ = P.ppo_token_loss(None, targets, z - 2, adv, z + 1, hidden=hidden * 1.0, weight=weight,
                                   weight_grad_into=torch.zeros(30, 8))  # fmt: skip
    leaves, todo, seen = [], [loss.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.append(fn.variable)
        todo.extend(f for f, _ in fn.next_functions)
    assert len(leaves) == 1 and leaves[0] is hidden
    with pytest.raises(RuntimeError, match="a grad of 1"):
        (loss * 2).backward()


@pytest.mark.parametrize("has_ent", [False, True])
def test_the_persistent_forward_gives_the_plain_ones_bits(small_block, monkeypatch, has_ent):
    """PERSISTENT_ROWS' kernel (rows pid, pid + programs, ... in one loop; here 3 programs for 11 rows of 150 logits in
    64-wide blocks, and 1 program) writes the very bits of one program a row: log-probs, norms and entropy, and a TP
    rank's partial statistics."""
    gen = torch.Generator().manual_seed(4)
    x3 = (torch.randn(11, 150, generator=gen) * 3).bfloat16().view(1, 11, 150)
    x3[0, 2, 40:] = float("-inf")  # (a row with -inf logits, as a padded vocabulary's)
    targets = torch.randint(0, 150, (11,), generator=gen)
    plain = L.logprob_forward(x3, targets, 0.7, has_ent)
    stats = torch.empty(11, 4)
    L._fwd(x3, targets, 0.7, has_ent, 0, stats=stats)
    for programs in (3, 1):
        monkeypatch.setattr(L, "_INTERPRET_PERSIST_PROGRAMS", programs)
        ours = L.logprob_forward(x3, targets, 0.7, has_ent)
        for a, b in zip(plain, ours):
            assert (a is None and b is None) or torch.equal(a, b)
        got = torch.full((11, 4), float("nan"))
        L._fwd(x3, targets, 0.7, has_ent, 0, stats=got)
        assert torch.equal(got, stats)


def test_the_persistent_configs_and_grid():
    """The persistent configs a row keeps: those whose block holds it whole (a 32000-wide row: the 32768-wide ones;
    Llama 3's 128256: none, the plain ones only), beside the plain configs _prune_configs keeps; the grid: as many
    programs as the SMs' shared memory holds at once (two rows' buffers each; their threads fit too), at most one a
    row."""
    configs = L._configs() + L._persist_configs()
    keep = lambda v: [(c.kwargs["BLOCK_V"], c.num_warps, bool(c.kwargs.get("PERSIST"))) for c in L._prune_persist(
        configs, {"V": v})]  # fmt: skip
    plain = lambda v: [(c.kwargs["BLOCK_V"], c.num_warps, False) for c in L._prune_configs(L._configs(), {"V": v})]
    assert keep(32000) == plain(32000) + [(32768, 32, True), (32768, 16, True)]
    assert keep(128256) == plain(128256)
    assert keep(5000) == plain(5000) + [(8192, 8, True)]
    for c in L._persist_configs():  # (shared memory the tighter limit: never more programs than their threads fit)
        per_sm = L.persist_programs(10**6, c.kwargs, 1, 2)
        assert c.num_stages == c.kwargs["STAGES"] and per_sm * c.num_warps * 32 <= 2048, (c, per_sm)
    meta = lambda b, st: {"BLOCK_V": b, "STAGES": st, "PERSIST": True}
    assert L.persist_programs(10**6, meta(32768, 3), 132, 2) == 132  # (128 KiB of buffers: one an SM)
    assert L.persist_programs(10**6, meta(8192, 3), 132, 2) == 132 * 6  # (32 KiB: six, by 200 KiB)
    assert L.persist_programs(100, meta(8192, 3), 132, 2) == 100


def test_a_pair_of_sums_is_combined_each_with_its_own(small_block):
    """dispatch.sum_pair's GPU form (one tl.reduce of the pair, which the interpreter replaces by two tl.sum for
    speed) run through the interpreter: each sum keeps its own operand."""
    import triton
    import triton.language as tl

    @triton.jit
    def pair_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        sa, sb = tl.reduce((tl.load(a_ptr + offs), tl.load(b_ptr + offs)), 0, dispatch._add_pair)
        tl.store(out_ptr, sa)
        tl.store(out_ptr + 1, sb)

    a, b, out = torch.arange(16.0), torch.arange(16.0) * -3 + 1, torch.zeros(2)
    pair_kernel[(1,)](a, b, out, 16)
    assert out.tolist() == [a.sum().item(), b.sum().item()]
