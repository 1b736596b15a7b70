"""Vocab-parallel check of kernels/logprob.py, one process per rank (run by test_logprob_tp.py).

    TRITON_INTERPRET=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/kernels/logprob_tp_worker.py

Every rank draws the same full-vocabulary inputs, keeps its contiguous vocab slice, runs the op with
group=WORLD and compares forward outputs and its slice's grads with the full vocabulary computed on
one process by kernels/reference.py in float64. Both the Triton kernels (interpreter) and the
reference path (dispatch.reference_ops) are checked. Exits non-zero on any mismatch.
"""

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import kernels.logprob as L  # noqa: E402
import kernels.ppo_loss as P  # noqa: E402
from kernels import dispatch, reference  # noqa: E402
from tests.engine.ranks import leave  # noqa: E402
from tests.interpreter_fixes import fix_interpreter  # noqa: E402

fix_interpreter()  # as in the pytest process


def close(actual, expected, what, tol=1e-5):
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=tol, rtol=tol, msg=lambda m: f"rank {dist.get_rank()} {what}: {m}"
    )


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    torch.manual_seed(0)  # identical inputs on every rank
    L._INTERPRET_BLOCK_V = 32  # several blocks per slice
    L._CHUNK_ROWS = 4  # several LM-head chunks, the last one ragged
    n, v_local, hdim, temp = 11, 97, 16, 0.8
    v = v_local * world
    sl = slice(rank * v_local, (rank + 1) * v_local)
    logits = torch.randn(n, v) * 2
    logits[0, : v_local + 10] = float("-inf")  # rank 0's slice of row 0 is all -inf
    logits[1, 5:20] = float("-inf")
    targets = torch.randint(0, v, (n,))
    targets[0] = v - 1
    targets[1], targets[2] = v_local, v_local - 1  # the ids either side of a slice boundary (rank 1's first id: one
    # past rank 0's slice, whose row there is the next row's first logit)
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    hidden = torch.randn(n, hdim)
    weight = torch.randn(v, hdim) / 3
    old, adv, mask = torch.randn(n) - 5, torch.randn(n), torch.rand(n) > 0.2
    ref_lp = old + 0.1 * torch.randn(n)

    # Full-vocabulary oracle on one process, float64.
    x = logits.double().requires_grad_(True)
    r_lp, r_ent = reference.token_logprobs(x, targets, temp, return_entropy=True)
    (r_gx,) = torch.autograd.grad((r_lp * g_lp).sum() + (r_ent * g_ent).sum(), x)
    hd, wd = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    rh_lp, rh_ent = reference.hidden_logprobs(hd, wd, targets, temp, return_entropy=True)
    r_gh, r_gw = torch.autograd.grad((rh_lp * g_lp).sum() + (rh_ent * g_ent).sum(), (hd, wd))
    hd2, wd2 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ppo_kw = dict(temperature=temp, ref_logprobs=ref_lp.double(), kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    r_loss, r_stats = reference.ppo_token_loss(
        None, targets, old.double(), adv.double(), mask, hidden=hd2, weight=wd2, **ppo_kw
    )
    r_pgh, r_pgw = torch.autograd.grad(r_loss, (hd2, wd2))

    for mode in ("kernel", "reference"):
        with dispatch.reference_ops() if mode == "reference" else contextlib.nullcontext():
            xs = logits[:, sl].clone().requires_grad_(True)
            lp, ent = L.token_logprobs(xs, targets, temp, return_entropy=True, group=group)
            (gx,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), xs)
            close(lp, r_lp, f"{mode} token logp")
            close(ent, r_ent, f"{mode} token entropy")
            close(gx, r_gx[:, sl], f"{mode} token grad_logits")

            h = hidden.clone().requires_grad_(True)
            w = weight[sl].clone().requires_grad_(True)
            lp, ent = L.hidden_logprobs(h, w, targets, temp, return_entropy=True, group=group)
            gh, gw = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (h, w))
            close(lp, rh_lp, f"{mode} hidden logp")
            close(ent, rh_ent, f"{mode} hidden entropy")
            close(gh, r_gh, f"{mode} hidden grad_hidden")
            close(gw, r_gw[sl], f"{mode} hidden grad_weight")

            h = hidden.clone().requires_grad_(True)
            w = weight[sl].clone().requires_grad_(True)
            kw = dict(ppo_kw, ref_logprobs=ref_lp)
            loss, stats = P.ppo_token_loss(None, targets, old, adv, mask, hidden=h, weight=w, group=group, **kw)
            pgh, pgw = torch.autograd.grad(loss, (h, w))
            close(loss, r_loss, f"{mode} ppo loss")
            for k in r_stats:
                close(stats[k], r_stats[k], f"{mode} ppo stat {k}")
            close(pgh, r_pgh, f"{mode} ppo grad_hidden")
            close(pgw, r_pgw[sl], f"{mode} ppo grad_weight")

    # A target outside the whole vocabulary where the host check is off (a GPU's CHECK_TARGETS_ON_GPU = False, whose
    # async assert is all there is): NaN log-probs, as one rank's kernel gives, not a sum of every rank's 0 for it
    check = L._check_targets
    L._check_targets = lambda targets, v_total: None
    try:
        bad = targets.clone()
        bad[3], bad[4] = v, -1
        for lp in (
            L.token_logprobs(logits[:, sl].contiguous(), bad, temp, group=group),
            L.hidden_logprobs(hidden, weight[sl].contiguous(), bad, temp, group=group),
        ):
            assert torch.isnan(lp[3:5]).all() and torch.isfinite(lp[5:]).all(), (rank, lp)
    finally:
        L._check_targets = check
    if rank == 0:
        print("logprob TP OK", flush=True)
    leave()


if __name__ == "__main__":
    main()
