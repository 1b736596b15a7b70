"""The rope-attention launch sweep (a GPU run's tuning table) runs end to end in the interpreter on tiny shapes."""

from types import SimpleNamespace

import torch


def test_rope_sweep_smoke(capsys, monkeypatch):
    from bench.bench_rope_attention import as_default, causal_flops, sweep
    from kernels import dispatch

    ahead = []  # (each group's variants handed to dispatch.compile_ahead before any is timed; a no-op here)
    monkeypatch.setattr(dispatch, "compile_ahead", lambda fns: ahead.append(len(fns)))

    b, t, h, d = 2, 40, 2, 32
    q, k, v = (torch.randn(b * t, h, d) for _ in range(3))
    positions = torch.arange(t).repeat(b)
    cu = torch.arange(0, b * t + 1, t, dtype=torch.int32)
    args = SimpleNamespace(rope_theta=10000.0, warmup=0, rep=0, fwd_bwd_factor=3.5)
    rows = sweep(
        args, q, k, v, positions, cu, causal_flops([t] * b, h, d),
        fwd=[(32, 16, 4, 2, True), (32, 64, 4, 2, True), (32, 16, 4, 2, False, {"maxnreg": 168}),
             (32, 16, 4, 2, True, {"WARP_SPEC": True})],
        dkdv=[(16, 16, 4, 2, True), (16, 16, 4, 2, False), (32, 16, 4, 2, True, {"WARP_SPEC": True})],
        dq=[(32, 16, 4, 2, False)], atomic=[(32, 16, 4, 2, True)],
    )  # fmt: skip
    assert [r["kernel"] for r in rows] == ["fwd", "fwd", "fwd", "fwd", "dkdv+dq", "dkdv", "dkdv", "dkdv", "dq"]
    assert ahead == [4, 1, 3, 1, 0, 0, 0]  # (fwd, dkdv+dq, dkdv, dq, then the Gluon groups: none in the interpreter)
    assert all(r["ms"] > 0 for i, r in enumerate(rows) if i != 1)  # (tiles by tensor descriptor and by pointers)
    assert "must divide" in rows[1]["error"]  # an impossible variant is reported, not fatal
    assert rows[4]["DQ_ATOMIC"] is True and rows[2]["maxnreg"] == 168  # (a register cap: a launch option)
    assert rows[3]["WARP_SPEC"] is True and rows[7]["WARP_SPEC"] is True  # (warp-specialised: a config's switch)
    out = capsys.readouterr().out
    assert "best fwd: BLOCK_M=32 BLOCK_N=16" in out and "best dq:" in out and "best dkdv+dq:" in out
    # each best row says what makes it the default launch: the kernel's sequence block, its shape among the autotuned
    # ones of its kind, its switches
    assert "best dkdv:" in out and out.count("  (as the default: attention_tiles.SEQ_BLOCKS[") == 4
    assert as_default(rows[3]) == (
        "attention_tiles.SEQ_BLOCKS['fwd'] = 32, (16, 4, 2) in rope_attention._FWD_WS_SHAPES, TMA=True, WARP_SPEC=True"
    )
    assert as_default(rows[4]) == (
        "attention_tiles.SEQ_BLOCKS['dkdv'] = 32, (16, 4, 2) in attention_tiles._BWD_SHAPES, TMA=True, DQ_ATOMIC=True"
    )
    assert as_default(rows[2]).endswith("(16, 4, 2) in attention_tiles._FWD_SHAPES, TMA=False, maxnreg=168")
    assert as_default(rows[8]).startswith("attention_tiles.SEQ_BLOCKS['dq'] = 32, (16, 4, 2) in attention_tiles._BWD")
    # (the Gluon forward's variants, timed last where it runs: its switch and tile; none in the interpreter)
    gluon = dict(kernel="fwd", BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=True, GLUON=True)
    assert as_default(gluon) == "rope_attention.GLUON_FWD = True, attention_gluon.DEFAULT_TILE = (64, 3)"
    gluon.update(num_warps=4, num_stages=2, PINGPONG=True)  # (its ping-pong form)
    assert as_default(gluon) == (
        "rope_attention.GLUON_FWD = True, attention_gluon.PINGPONG = True, attention_gluon.PINGPONG_TILE = (64, 2)"
    )
    dkdv = dict(kernel="dkdv", BLOCK_N=128, BLOCK_M=32, num_warps=8, num_stages=3, TMA=True, GLUON=True)
    assert as_default(dkdv) == "rope_attention_bwd.GLUON_DKDV = True, attention_gluon_bwd.BWD_TILES[head dim] = (32, 3)"
    dkdv.update(num_warps=4, num_stages=2, PRODUCER=True)  # (its warp-specialised form)
    assert as_default(dkdv) == (
        "rope_attention_bwd.GLUON_DKDV = True, attention_gluon_bwd.BWD_PRODUCER = True, "
        "attention_gluon_bwd.BWD_PRODUCER_TILES[head dim] = (32, 2)"
    )
    dq = dict(kernel="dq", BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, TMA=True, GLUON=True)
    assert as_default(dq) == "rope_attention_bwd.GLUON_DQ = True, attention_gluon_bwd.DQ_TILES[head dim] = (64, 2)"
    assert not any(r.get("GLUON") for r in rows)


def test_the_bench_reports_each_autotuners_pick(monkeypatch):
    """bench_rope_attention prints (and saves) which config each autotuned kernel picked per key: on a GPU that says
    which tiles and whether the BOUNDED variants won without a sweep; nothing is autotuned in the interpreter."""
    import triton

    from bench.bench_rope_attention import autotune_picks
    from kernels import rope_attention_bwd as ra_bwd

    assert autotune_picks() == []
    pick = triton.Config({"BLOCK_N": 64, "BOUNDED": True}, num_warps=4, num_stages=2)
    monkeypatch.setattr(ra_bwd._dq_ws_tuned, "cache", {(128, 1, 3, True, 128, "torch.bfloat16"): pick})
    (row,) = autotune_picks()
    assert row["kernel"] == "dq ws" and "128, 1, 3, True" in row["key"]
    assert "BLOCK_N: 64" in row["config"] and "BOUNDED: True" in row["config"] and "num_stages: 2" in row["config"]
