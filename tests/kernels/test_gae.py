"""kernels.gae: the GAE kernel (Triton interpreter on CPU) against float64 oracles, and masked whitening."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import dispatch, reference
from kernels import gae as gae_mod
from kernels.gae import gae, gae_forward, masked_mean, masked_whiten

REPO = Path(__file__).resolve().parents[2]

# (input dtype, atol, rtol): the kernel upcasts loads to fp32, so half inputs are compared with the
# oracle on the same rounded values and only fp32 arithmetic error remains; tolerances per brief.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-2, 1e-2), (torch.float16, 1e-2, 1e-2)]


def _skip_oracle(rewards, values, mask, gamma, lam):
    """Independent of reference.gae: gather each row's masked steps, run the peer loop, scatter back."""
    adv = torch.zeros(rewards.shape, dtype=torch.float64)
    ret = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        idx = (mask[b] != 0).nonzero().flatten()
        if idx.numel():
            a, r = reference.peer_gae_loop(rewards[b, idx][None].double(), values[b, idx][None].double(), gamma, lam)
            adv[b, idx], ret[b, idx] = a[0], r[0]
    return adv, ret


def _poisoned_out(shape):
    return torch.full(shape, torch.nan), torch.full(shape, torch.nan)


def _assert_close(got, want, atol, rtol):
    # atol relative to the advantages' scale (a 1024-step sum at gamma * lam ~ 0.95 reaches ~20).
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), atol=atol * scale, rtol=rtol)


def _run_kernel(rewards, values, mask, gamma, lam):
    adv, ret = gae_forward(rewards, values, mask, gamma, lam, out=_poisoned_out(rewards.shape))
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    m = mask != 0
    # Exactly 0 outside the mask (and no NaN left from the poison anywhere).
    assert torch.equal(adv[~m], torch.zeros_like(adv[~m])) and torch.equal(ret[~m], torch.zeros_like(ret[~m]))
    assert not adv.isnan().any() and not ret.isnan().any()
    return adv, ret


def _left_padded_batch(lengths, prompt_lens, n_steps):
    """mask [B, T]: prompt_lens[b] unmasked prompt tokens, then lengths[b] response tokens, then padding."""
    mask = torch.zeros(len(lengths), n_steps, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(prompt_lens, lengths)):
        mask[b, p : p + n] = True
    return mask


# fp32 over every odd shape (T=1, a block edge at 1024, a second chunk at 1030); half inputs on a few.
CASES = [((b, t), *DTYPES[0]) for b, t in [(1, 1), (3, 1), (1, 17), (3, 1023), (2, 1024), (2, 1030), (37, 5)]]
CASES += [(shape, *d) for d in DTYPES[1:] for shape in [(3, 1), (2, 300), (37, 5)]]


@pytest.mark.parametrize("shape,dtype,atol,rtol", CASES, ids=[f"{s[0]}x{s[1]}-{str(d)[6:]}" for s, d, _, _ in CASES])
def test_gae_random_matches_reference(shape, dtype, atol, rtol):
    rewards = torch.randn(shape).to(dtype)
    values = torch.randn(shape).to(dtype)
    mask = torch.rand(shape) < 0.7
    adv, ret = _run_kernel(rewards, values, mask, 0.99, 0.95)
    want_adv, want_ret = reference.gae(rewards.double(), values.double(), mask, 0.99, 0.95)
    _assert_close(adv, want_adv, atol, rtol)
    _assert_close(ret, want_ret, atol, rtol)


def test_gae_left_padded_prompts_variable_lengths_match_peer_loop():
    # Rows: prompt + response + right pad, a full row, an all-zero mask row, a 1-token response,
    # and a response ending exactly at T; the T > 1024 rows cross a chunk boundary.
    n_steps = 1100
    prompt_lens = [5, 0, 0, 1099, 40, 3]
    lengths = [700, 1100, 0, 1, 1060, 1]
    mask = _left_padded_batch(lengths, prompt_lens, n_steps)
    rewards = torch.randn(len(lengths), n_steps)
    values = torch.randn(len(lengths), n_steps)
    # Garbage outside the responses must be ignored, never multiplied in.
    rewards = torch.where(mask, rewards, torch.nan)
    values = torch.where(mask, values, torch.inf)
    gamma, lam = 1.0, 0.95
    adv, ret = _run_kernel(rewards, values, mask, gamma, lam)
    want_adv, want_ret = reference.gae(rewards.double(), values.double(), mask, gamma, lam)
    _assert_close(adv, want_adv, 1e-5, 1e-5)
    _assert_close(ret, want_ret, 1e-5, 1e-5)
    # The generalisation reduces to the peers' loop on each row's contiguous response.
    for b, (p, n) in enumerate(zip(prompt_lens, lengths)):
        if n == 0:
            assert torch.equal(adv[b], torch.zeros(n_steps))
            continue
        peer_adv, peer_ret = reference.peer_gae_loop(
            rewards[b : b + 1, p : p + n].double(), values[b : b + 1, p : p + n].double(), gamma, lam
        )
        _assert_close(adv[b, p : p + n], peer_adv[0], 1e-5, 1e-5)
        _assert_close(ret[b, p : p + n], peer_ret[0], 1e-5, 1e-5)
        _assert_close(want_adv[b, p : p + n], peer_adv[0], 1e-12, 1e-12)


@pytest.mark.parametrize("n_steps", [9, 300])
def test_gae_mask_with_holes_skips_to_next_masked(n_steps):
    mask = torch.rand(4, n_steps) < 0.5
    mask[0] = False
    mask[1, ::2] = True  # alternate holes
    rewards, values = torch.randn(4, n_steps), torch.randn(4, n_steps)
    adv, ret = _run_kernel(rewards, values, mask, 0.97, 0.9)
    want_adv, want_ret = _skip_oracle(rewards, values, mask, 0.97, 0.9)
    ref_adv, ref_ret = reference.gae(rewards.double(), values.double(), mask, 0.97, 0.9)
    _assert_close(ref_adv, want_adv, 1e-12, 1e-12)
    _assert_close(ref_ret, want_ret, 1e-12, 1e-12)
    _assert_close(adv, want_adv, 1e-5, 1e-5)
    _assert_close(ret, want_ret, 1e-5, 1e-5)


def test_gae_carries_across_a_chunk_with_no_masked_step(monkeypatch):
    """A hole longer than a whole chunk (a 1024-step gap in production; 16 here): the value and advantage of the
    next masked step are carried through the chunk that has none."""
    monkeypatch.setattr(gae_mod, "_MAX_BLOCK_T", 16)
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[:, :5] = True
    mask[:, 35:] = True
    mask[2, 20] = True  # (and one row with a step inside the long hole)
    rewards, values = torch.randn(3, 40), torch.randn(3, 40)
    adv, ret = _run_kernel(rewards, values, mask, 0.99, 0.95)
    want_adv, want_ret = _skip_oracle(rewards, values, mask, 0.99, 0.95)
    _assert_close(adv, want_adv, 1e-5, 1e-5)
    _assert_close(ret, want_ret, 1e-5, 1e-5)


def test_gae_hand_computed_two_steps_with_hole():
    # Steps at t=1 and t=3 (t=0 prompt, t=2 hole, t=4 pad): A3 = r3 - V3; A1 = r1 + g V3 - V1 + g l A3.
    rewards = torch.tensor([[9.0, 1.0, 9.0, 2.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 9.0, 1.5, 9.0]])
    mask = torch.tensor([[0, 1, 0, 1, 0]])
    g, lam = 0.9, 0.5
    a3 = 2.0 - 1.5
    a1 = 1.0 + g * 1.5 - 0.5 + g * lam * a3
    adv, ret = _run_kernel(rewards, values, mask, g, lam)
    torch.testing.assert_close(adv, torch.tensor([[0.0, a1, 0.0, a3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, a1 + 0.5, 0.0, a3 + 1.5, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (1.0, 0.0), (0.0, 0.5), (0.9, 0.9), (1.0, 1.0)])
def test_gae_gamma_lam(gamma, lam):
    rewards, values = torch.randn(3, 100), torch.randn(3, 100)
    mask = _left_padded_batch([60, 100, 7], [10, 0, 50], 100)
    adv, ret = _run_kernel(rewards, values, mask, gamma, lam)
    want_adv, want_ret = reference.gae(rewards.double(), values.double(), mask, gamma, lam)
    _assert_close(adv, want_adv, 1e-5, 1e-5)
    _assert_close(ret, want_ret, 1e-5, 1e-5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64, torch.int32, torch.uint8])
def test_gae_mask_dtypes_and_strides(mask_dtype):
    # Non-contiguous inputs: transposed views and a column slice.
    rewards = torch.randn(50, 6).t()
    values = torch.randn(6, 80)[:, 10:60]
    mask = (torch.rand(50, 6) < 0.6).t().to(mask_dtype)
    adv, ret = _run_kernel(rewards, values, mask, 0.99, 0.95)
    want_adv, want_ret = reference.gae(rewards.double(), values.double(), mask != 0, 0.99, 0.95)
    _assert_close(adv, want_adv, 1e-5, 1e-5)
    _assert_close(ret, want_ret, 1e-5, 1e-5)


def test_gae_empty_batch():
    for shape in [(0, 5), (4, 0)]:
        adv, ret = gae(torch.randn(shape), torch.randn(shape), torch.ones(shape, dtype=torch.bool))
        assert adv.shape == shape and ret.shape == shape


def test_gae_dispatch(monkeypatch):
    rewards, values = torch.randn(2, 30), torch.randn(2, 30)
    mask = torch.rand(2, 30) < 0.5
    calls = []
    real = gae_mod.gae_forward
    monkeypatch.setattr(gae_mod, "gae_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    adv_kernel, ret_kernel = gae(rewards, values, mask)
    assert calls == [1] and dispatch.use_triton(rewards) == (dispatch.INTERPRET or rewards.is_cuda)
    # reference_ops (the non-interpreter CPU path) and float64 anywhere run the reference, never the kernel.
    with dispatch.reference_ops():
        adv_ref, ret_ref = gae(rewards, values, mask)
    adv64, _ = gae(rewards.double(), values.double(), mask)
    assert calls == [1]
    assert adv_ref.dtype == torch.float32 and adv64.dtype == torch.float64
    _assert_close(adv_kernel, adv_ref, 1e-5, 1e-5)
    _assert_close(ret_kernel, ret_ref, 1e-5, 1e-5)
    _assert_close(adv_ref, adv64, 1e-5, 1e-5)


def test_gae_float64_values_with_float32_rewards_take_the_reference():
    """Either input in float64 runs the reference (the kernel takes fp32 / half only): fp32 rewards with float64
    values (a value head kept in double) give the oracle's numbers, not the kernel's dtype error."""
    g = torch.Generator(torch.get_default_device()).manual_seed(4)  # (the GPU test mode's default device: cuda)
    rewards, values = torch.randn(3, 20, generator=g), torch.randn(3, 20, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 20, generator=g) < 0.7
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    want_adv, want_ret = _skip_oracle(rewards, values, mask, 0.9, 0.8)
    assert adv.dtype == torch.float64
    _assert_close(adv, want_adv, 1e-6, 1e-6)
    _assert_close(ret, want_ret, 1e-6, 1e-6)


def test_gae_bad_input():
    r = torch.randn(2, 5)
    with pytest.raises(ValueError, match="rewards must be 2-D"):
        gae(torch.randn(10), torch.randn(10), torch.ones(10))
    with pytest.raises(ValueError, match="mask must be 2-D"):
        gae(r, r, torch.ones(2, 5, 1))
    with pytest.raises(ValueError, match="values shape"):
        gae(r, torch.randn(2, 6), torch.ones(2, 5))
    with pytest.raises(ValueError, match="mask shape"):
        gae(r, r, torch.ones(5, 2))
    with pytest.raises(ValueError, match="rewards must be floating point"):
        gae(torch.ones(2, 5, dtype=torch.int64), r, torch.ones(2, 5))
    with pytest.raises(ValueError, match="lam must be a finite real number, got inf"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), 1.0, float("inf"))
    with pytest.raises(ValueError, match="gamma must be a finite real number"):
        gae(r, r, torch.ones(2, 5), gamma=float("nan"))
    with pytest.raises(ValueError, match="out advantages must be fp32"):
        gae_forward(r, r, torch.ones(2, 5), out=(torch.empty(2, 5, dtype=torch.float64), torch.empty(2, 5)))
    with pytest.raises(ValueError, match="out returns must be contiguous"):
        gae_forward(r, r, torch.ones(2, 5), out=(torch.empty(2, 5), torch.empty(5, 2).t()))
    with pytest.raises(ValueError, match="rewards dtype torch.float64 not supported"):
        gae_forward(r.double(), r, torch.ones(2, 5))


# ------------------------------------------------------------------------------ whitening ----


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (8, 129), (2, 3, 5)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(shape, shift_mean):
    x = torch.randn(shape) * 3.0 + 2.0
    mask = torch.rand(shape) < 0.6
    got = masked_whiten(torch.where(mask, x, torch.nan), mask, shift_mean=shift_mean)
    want = reference.masked_whiten(x.double(), mask, shift_mean=shift_mean)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))


def test_masked_whiten_statistics_and_edge_cases():
    x = torch.randn(4, 50, dtype=torch.float64) * 0.01 + 1e4  # large mean, small spread
    mask = torch.rand(4, 50) < 0.5
    out = masked_whiten(x, mask, eps=0.0)  # eps would show at var ~ 1e-4
    sel = out[mask]
    torch.testing.assert_close(sel.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(sel.var(unbiased=True), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0)
    m = mask.to(torch.float32)
    torch.testing.assert_close(masked_mean(x, m), x[mask].mean())
    torch.testing.assert_close(masked_mean(x.float(), mask).double(), reference.masked_mean(x, mask), rtol=1e-6, atol=0)
    # Nothing masked: all 0 (mean is NaN); one element masked: var taken as 0, result 0.
    none = torch.zeros(4, 50, dtype=torch.bool)
    assert torch.equal(masked_whiten(x, none), torch.zeros_like(x))
    assert masked_mean(x, none).isnan()
    one = none.clone()
    one[2, 7] = True
    assert torch.equal(masked_whiten(x, one), torch.zeros_like(x))
    torch.testing.assert_close(masked_whiten(x, one, shift_mean=False)[2, 7], x[2, 7])
    torch.testing.assert_close(reference.masked_whiten(x, one), torch.zeros_like(x))


def test_masked_whiten_bad_input():
    with pytest.raises(ValueError, match="masked_whiten: mask shape"):
        masked_whiten(torch.randn(3, 4), torch.ones(4, 3))
    with pytest.raises(ValueError, match="masked_mean: x must be floating point"):
        masked_mean(torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4))


@pytest.mark.cpu_only  # gloo ranks on CPU
def test_masked_whiten_group_matches_concatenation():
    """Two gloo ranks on CPU vs the single-process oracle on the concatenated batch (see the worker)."""
    worker = Path(__file__).with_name("gae_dist_worker.py")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count(": ok") == 2, proc.stdout


def test_gae_mask_strides_differ_from_the_rewards():
    """Each input read through its own strides: transposed rewards, a contiguous mask, column-sliced values."""
    rewards = torch.randn(37, 5).t()
    values = torch.randn(5, 50)[:, 4:41]
    mask = torch.rand(5, 37) < 0.6
    adv, ret = _run_kernel(rewards, values, mask, 0.99, 0.95)
    want_adv, want_ret = reference.gae(rewards.double(), values.double(), mask, 0.99, 0.95)
    _assert_close(adv, want_adv, 1e-5, 1e-5)
    _assert_close(ret, want_ret, 1e-5, 1e-5)
    with pytest.raises(ValueError, match="mask must be bool, integer or float"):
        gae(rewards, values, mask.to(torch.complex64))


def test_gae_rows_packed_into_one_program_stay_in_their_rows(monkeypatch):
    """Several rows per program (BLOCK_B > 1, what a GPU batch of 256+ rows gets; the other tests have too few rows
    for it) over several time chunks, with a batch that is not a multiple of BLOCK_B: each row carries its own
    state, and the program's rows past the batch read and write nothing (the inputs and outputs are views into
    larger buffers whose rows past the batch are valid, so an over-wide row mask would show as writes there)."""
    monkeypatch.setattr(gae_mod, "_TARGET_PROGRAMS", 1)
    monkeypatch.setattr(gae_mod, "_MAX_BLOCK_T", 16)
    b, t, extra = 37, 40, 5
    assert gae_mod._block_sizes(b, t)[:2] == (128, 16)  # one program of 128 rows, 91 of them past the batch
    rewards, values = torch.randn(b + extra, t), torch.randn(b + extra, t)
    mask = torch.rand(b + extra, t) < 0.7
    adv_buf, ret_buf = torch.full(((b + extra) * t,), torch.nan), torch.full(((b + extra) * t,), torch.nan)
    adv, ret = gae_forward(
        rewards[:b], values[:b], mask[:b], 0.99, 0.95, out=(adv_buf[: b * t].view(b, t), ret_buf[: b * t].view(b, t))
    )
    assert adv_buf[b * t :].isnan().all() and ret_buf[b * t :].isnan().all()
    want_adv, want_ret = _skip_oracle(rewards[:b], values[:b], mask[:b], 0.99, 0.95)
    _assert_close(adv, want_adv, 1e-5, 1e-5)
    _assert_close(ret, want_ret, 1e-5, 1e-5)


def test_gae_empty_batch_on_the_reference_path():
    """Empty batches on the CPU reference path (reference_ops: the CPU demo's, and float64 anywhere), not only through
    the kernel launcher's early return."""
    for shape in [(0, 5), (4, 0)]:
        for dtype in (torch.float32, torch.float64):
            with dispatch.reference_ops():
                adv, ret = gae(
                    torch.randn(shape, dtype=dtype),
                    torch.randn(shape, dtype=dtype),
                    torch.ones(shape, dtype=torch.bool),
                )
            assert adv.shape == shape and ret.shape == shape
