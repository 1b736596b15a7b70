"""No GPU in CI: lower the real (not interpreted) kernels to sm_90 machine code, so a change that
breaks the compiled path fails here rather than on the first GPU run. Each case runs in a
subprocess without TRITON_INTERPRET (the interpreter is chosen when triton is imported)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CASES = {
    "paged_attention": """
import torch
from bench.bench_paged_attention import ptxas_report
shapes = {"gqa8": (8, 4096, 64, 8, 128, 16), "mha": (64, 384, 40, 40, 128, 16)}
rows = ptxas_report(shapes, torch.bfloat16)
assert len(rows) == 6 and all(r["regs"] for r in rows), rows
assert all(r["spill_bytes"] == 0 for r in rows if r["kernel"] == "decode_rope"), rows  # the rope write fused in
fp8 = ptxas_report(shapes, torch.bfloat16, cache_dtype=torch.float8_e4m3fn)  # kv_cache_dtype="fp8"
assert len(fp8) == 6 and all(r["regs"] and r["spill_bytes"] == 0 for r in fp8), fp8
# decode_config's pdl: the decode kernel waits for the kernel before it ahead of any memory access, then lets the
# next one launch; without it, neither instruction
pdl = ptxas_report(shapes, torch.bfloat16, pdl=True)  # (the rope write kernel too)
assert len(pdl) == 6 and all(r["pdl_wait_first"] and r["pdl_triggers"] and r["spill_bytes"] == 0 for r in pdl), pdl
assert not any(r["pdl_wait_first"] or r["pdl_triggers"] for r in rows), rows
print("compiled")
""",
    "rope_attention": """
from bench.bench_rope_attention import ptxas_report
tma = ptxas_report(128, "bf16", 1, configs_per_kernel=1) + ptxas_report(64, "fp16", 4, configs_per_kernel=1)
pointers = ptxas_report(128, "bf16", 1, configs_per_kernel=1, tma=False)  # (sm_80, or use_tma refusing a layout)
rows = tma + pointers
assert all(r["regs"] for r in rows), rows
# the forward's inner loop reads pre-rotated keys straight into shared memory, software-pipelined: on sm_90 by the
# tensor memory accelerator (one bulk copy a tile), else by cp.async
fwd = [r for r in rows if r["kernel"] == "fwd" and "maxnreg" not in r["config"]]  # (uncapped: no spill at all)
assert fwd and all(r["spill_bytes"] == 0 for r in fwd), fwd
assert all(r["loads"].get("cp.async.bulk.tensor") for r in tma if r["kernel"] not in ("rotary", "dq_fin")), tma
assert all(not r["loads"].get("cp.async.bulk.tensor") for r in pointers), pointers
assert all(r["loads"].get("cp.async.cg.shared.global") for r in pointers if r["kernel"] == "fwd"), pointers
# every kernel's dots on Hopper's warpgroup MMA (wgmma), none on the Ampere-style mma.sync (dq's share in the dk/dv
# kernel included: a [query tile, D] product would be too short for wgmma, so it is computed transposed)
assert all(r["mma"].get("wgmma") and not r["mma"].get("mma") for r in rows if r["kernel"] not in ("rotary", "dq_fin"))
# DQ_ATOMIC: dq's shares leave the dk/dv kernel by bulk reduce (TMA) or by atomics from registers; nothing else adds
added = {r["kernel"]: r["reduces"] for r in rows if r["reduces"]}
assert set(added) == {"dkdv+dq"}, added
assert all(set(r["reduces"]) == {"cp.reduce.async.bulk.tensor"} for r in tma if r["kernel"] == "dkdv+dq"), tma
# the forward's 64-row variant under a 168-register cap (three programs an SM): ptxas spills, but only outside the
# loops (the q rotation before them), by TMA and by pointers; a kernel without MMA has no loop to speak of
capped = [r for r in rows if "maxnreg=168" in r["config"]]
assert len(capped) == 3 and all(r["regs"] <= 168 and r["loop_spills"] == 0 for r in capped), capped
assert all(r["loop_spills"] is None for r in rows if r["kernel"] in ("rotary", "dq_fin")), rows
# q rotated by the pre-pass (Q_PREPASS): the forward's register peak was the rotation; without it no cap is needed
# for four programs an SM by TMA (at most 128 registers at 64-row tiles, 4 warps; three by pointer loads)
prepass = [r for r in rows if "Q_PREPASS" in r["config"]]
assert len(prepass) == 3 and all(r["regs"] <= (128 if "TMA" in r["config"] else 168) for r in prepass), prepass
assert all(r["spill_bytes"] == 0 for r in prepass), prepass
# rope_attention.WARP_SPEC / rope_attention_bwd.WARP_SPEC: Triton's Hopper warp specialisation of the forward's key
# loop, the dk/dv kernel's query loop and the dq kernel's key loop: 12 warps (a producer warpgroup and two consumer
# warpgroups of 64 rows), registers moved from the producer to the consumers (setmaxnreg), the products on wgmma, no
# spill, within an SM's 227 KiB of shared memory; nothing else warp-specialised
ws = [r for r in rows if "WARP_SPEC" in r["config"]]
assert sorted(r["kernel"] for r in ws) == ["dkdv"] * 4 + ["dq"] * 4 + ["fwd"] * 4, ws
# the three kernels' BOUNDED variants (their inner tiles by per-sequence descriptors made in the kernel, zeros past
# the end): no copy of a tile for zeroing its rows past the end, so less shared memory than the same tiles without it
for kernel in ("fwd", "dkdv", "dq"):
    pair = [[r for r in ws if r["kernel"] == kernel and ("BOUNDED" in r["config"]) == b] for b in (False, True)]
    assert len(pair[1]) == 2 and all(b["shared"] < p["shared"] for p, b in zip(*pair)), pair
assert all(r["warps"] == 12 and r["spill_bytes"] == 0 and r["shared"] <= 232448 for r in ws), ws
assert all({k for k, _ in r["setmaxnreg"]} == {"inc", "dec"} and r["mma"].get("wgmma") for r in ws), ws
gluon_ws = [r for r in rows if {"PINGPONG", "PRODUCER"} & set(r["config"].split())]  # (Gluon's own, below)
assert not any(r["setmaxnreg"] for r in rows if r not in ws + gluon_ws), rows
# rope_attention.GLUON_FWD: the forward in Gluon, 8 warps and no producer, whose exponentials are computed while the
# last key tile's P @ V product is in flight (FlashAttention-3's intra-warpgroup order: the softmax of the scores and
# the rescale factor, two exp2 a tile), on wgmma with bulk copies, no spill, within 227 KiB; none of the Triton
# kernels computes an exponential with a product in flight (Triton 3.6 waits for each score product at once)
gluon = [r for r in rows if "GLUON" in r["config"] and "PINGPONG" not in r["config"] and r["kernel"] == "fwd"]
assert len(gluon) == 2 and all(r["exp2_in_flight"] == 2 and r["spill_bytes"] == 0 for r in gluon), gluon
# and its ping-pong form (attention_gluon.PINGPONG): the same overlap in each of its two consumer warpgroups (four
# exp2 in flight in all), 12 warps, registers moved from the producer warp's warpgroup (24) to the consumers (240)
pingpong = [r for r in rows if "PINGPONG" in r["config"]]
assert len(pingpong) == 2 and all(r["exp2_in_flight"] == 4 and r["spill_bytes"] == 0 for r in pingpong), pingpong
assert all({("dec", 24), ("inc", 240)} <= set(r["setmaxnreg"]) and r["warps"] == 12 for r in pingpong), pingpong
assert all(r["mma"].get("wgmma") and r["loads"].get("cp.async.bulk.tensor") for r in gluon + pingpong), gluon
assert all(r["shared"] <= 232448 for r in gluon + pingpong) and all(r["warps"] == 8 for r in gluon), gluon
# rope_attention_bwd.GLUON_DKDV: the dk/dv kernel in Gluon, P computed while dP's product is in flight (one exp2 a
# tile), 8 warps, no spill at its default tiles (32 queries at D = 128, 64 at D = 64)
dkdv = [r for r in rows if "GLUON" in r["config"] and r["kernel"] == "dkdv" and "PRODUCER" not in r["config"]]
assert len(dkdv) == 2 and all(r["exp2_in_flight"] == 1 and r["spill_bytes"] == 0 for r in dkdv), dkdv
assert all(r["warps"] == 8 and r["shared"] <= 232448 and r["loads"].get("cp.async.bulk.tensor") for r in dkdv), dkdv
# and its warp-specialised form (attention_gluon_bwd.BWD_PRODUCER): a producer warp and two consumer warpgroups of 64
# keys (one exp2 in flight each), 12 warps, setmaxnreg 24 and 240, no spill
producer = [r for r in rows if "PRODUCER" in r["config"]]
assert len(producer) == 2 and all(r["exp2_in_flight"] == 2 and r["spill_bytes"] == 0 for r in producer), producer
assert all({("dec", 24), ("inc", 240)} <= set(r["setmaxnreg"]) and r["warps"] == 12 for r in producer), producer
# rope_attention_bwd.GLUON_DQ: the dq kernel in Gluon, P computed while dP's product is in flight, 8 warps, no spill
dq = [r for r in rows if "GLUON" in r["config"] and r["kernel"] == "dq"]
assert len(dq) == 2 and all(r["exp2_in_flight"] == 1 and r["spill_bytes"] == 0 and r["warps"] == 8 for r in dq), dq
assert not any(r["exp2_in_flight"] for r in rows if r not in gluon + pingpong + dkdv + producer + dq), rows
# and no kernel whose warpgroup MMAs ptxas serialises (its advisory C7515: something other than a wgmma writing an
# accumulator while products are in flight, which undoes every overlap above; the Gluon dk/dv kernel did, while its
# dK product was in flight from one iteration to the next, and the Gluon dq did while it read dP's registers after a
# wait that left dP's product pending)
assert not any(r["wgmma_serialized"] for r in rows), [(r["kernel"], r["config"]) for r in rows if r["wgmma_serialized"]]
by_atomics = [r["reduces"] for r in pointers if r["kernel"] == "dkdv+dq"]
assert by_atomics and all(a and "cp.reduce.async.bulk.tensor" not in a for a in by_atomics), by_atomics
print("compiled")
""",
    "gae": """
from bench.common import ptxas_info
from kernels.gae import _block_sizes, _gae_kernel

for r_ty, m_ty, (n_rows, n_steps) in [("fp32", "u8", (64, 1024)), ("bf16", "fp32", (512, 200))]:
    types = {"r_ptr": "*" + r_ty, "v_ptr": "*" + r_ty, "m_ptr": "*" + m_ty, "adv_ptr": "*fp32", "ret_ptr": "*fp32"}
    types.update({a: "i32" for a in _gae_kernel.arg_names if a not in types}, gamma="fp32", gamma_lam="fp32")
    block_b, block_t, num_warps = _block_sizes(n_rows, n_steps)
    consts = {"BLOCK_B": block_b, "BLOCK_T": block_t}
    info = ptxas_info(_gae_kernel, {a: t for a, t in types.items() if a not in consts}, consts, num_warps, 3)
    assert info["regs"] and info["spill_bytes"] == 0, info
print("compiled")
""",
    "rmsnorm_swiglu": """
import itertools

from bench.common import ptxas_info
from kernels import rmsnorm, swiglu

block_rows, block_h, warps = rmsnorm._tiles(5120)  # Llama-2-13B hidden
fwd_ptrs = dict(X="*bf16", DELTA="*bf16", H="*bf16", W="*bf16", Y="*bf16", RSTD="*fp32", eps="fp32")
bwd_ptrs = dict(X="*bf16", W="*bf16", DY="*bf16", DX="*bf16", RSTD="*fp32", DW_PART="*fp32", DRES="*bf16")
for (fn, ptrs, flag), fused in itertools.product(
    [(rmsnorm._rmsnorm_fwd_kernel, fwd_ptrs, "HAS_DELTA"), (rmsnorm._rmsnorm_bwd_kernel, bwd_ptrs, "HAS_DRES")],
    (False, True),  # the plain norm and the residual add fused in (add_rms_norm)
):
    fwd = fn is rmsnorm._rmsnorm_fwd_kernel
    # (the forward with the add: by programmatic dependent launch, decode_config's pdl; its wait first, then the
    # trigger; the plain one without)
    consts = dict(BLOCK_ROWS=block_rows, BLOCK_H=block_h, **{flag: fused}, **({"PDL": fused} if fwd else {}))
    types = {a: ptrs.get(a, "i32") for a in fn.arg_names if a not in consts}
    info = ptxas_info(fn, types, consts, warps, 3, divisible=("n_cols",))  # 5120 is
    assert info["regs"] and info["spill_bytes"] == 0 and "ld.global.v4.b32" in info["loads"], info
    assert info["pdl_wait_first"] == info["pdl_triggers"] == (fwd and fused), info
for fn in (swiglu._swiglu_fwd_kernel, swiglu._swiglu_bwd_kernel):
    fwd = fn is swiglu._swiglu_fwd_kernel
    consts = dict(BLOCK_ROWS=swiglu._BLOCK_ROWS, BLOCK_C=swiglu._BLOCK_COLS, **({"PDL": True} if fwd else {}))
    types = {a: "*bf16" if a.isupper() else "i32" for a in fn.arg_names if a not in consts}
    info = ptxas_info(fn, types, consts, 4, 3, divisible=("n_cols",))  # 13824 is
    assert info["regs"] and info["spill_bytes"] == 0 and "ld.global.v4.b32" in info["loads"], info
    assert info["pdl_wait_first"] == info["pdl_triggers"] == fwd, info
print("compiled")
""",
    "sampling": """
from bench.common import ptxas_info
from kernels import sampling

types = dict(LOGITS="*bf16", SEEDS="*i64", COUNTERS="*i64", MIN_LOGIT="*fp32", TOKENS="*i64", LOGPROBS="*fp32",
             vocab="i32", vocab_offset="i32", stride_row="i32", temperature="fp32", chunk_v="i32")
# partial: a TP rank's vocabulary shard; has_min: top-k's floor; chunks: a small batch's rows in parts (batch 1: 16)
for greedy, partial, has_min, chunks in ((False, False, False, 1), (True, False, False, 1), (False, True, False, 1),
                                         (False, False, True, 1), (False, True, True, 1), (False, True, True, 16),
                                         (True, True, False, 2)):  # fmt: skip
    # (top-k's sampling launch after its floor's: by programmatic dependent launch here, decode_config's pdl)
    consts = dict(GREEDY=greedy, PARTIAL=partial, HAS_MIN=has_min, BLOCK_V=sampling._BLOCK_V, PDL=has_min,
                  CHUNKS=chunks)  # fmt: skip
    info = ptxas_info(sampling._gumbel_sample_kernel, types, consts, 8, 3, divisible=("vocab", "chunk_v"))  # 32000 is
    assert info["regs"] and info["spill_bytes"] == 0, info
    assert info["pdl_wait_first"] == info["pdl_triggers"] == has_min, info
# the parts' combination, one program a row (fp64 logsumexp): a small batch's row parts (the draw's, a TP rank's
# partial result) and the TP ranks' shards
for partial in (False, True):
    types = dict(TOKENS_IN="*i64", STATS_IN="*fp64", TOKENS="*i64", OUT="*fp64" if partial else "*fp32",
                 stride_part="i32", stride_row="i32")  # fmt: skip
    info = ptxas_info(sampling._combine_kernel, types, dict(CHUNKS=16, PARTS=16, PARTIAL=partial), 1, 1)
    assert info["regs"] and info["spill_bytes"] == 0, info
# top-k's floor: the radix select (four histogram passes over the row)
for dtype in ("*bf16", "*fp32"):
    types = dict(LOGITS=dtype, OUT="*fp32", k="i32", vocab="i32", stride_row="i32")
    pdl = dtype == "*bf16"
    consts = dict(BLOCK_V=sampling._BLOCK_V, PASSES=2 if pdl else 4, PDL=pdl)  # (bf16: two passes)
    info = ptxas_info(sampling._kth_largest_kernel, types, consts, 8, 3, divisible=("vocab",))
    assert info["regs"] and info["spill_bytes"] == 0 and info["pdl_wait_first"] == info["pdl_triggers"] == pdl, info
# under tensor parallelism one pass a launch, the histograms summed over the ranks between them (the first pass, a
# middle one, the last that only reads)
# (and a small batch's rows in parts: batch 1's in 16, the parts' histograms summed by the next pass)
types = dict(LOGITS="*bf16", HIST="*i32", STATE="*i32", OUT="*fp32", k="i32", vocab="i32", stride_row="i32",
             n_rows="i32", chunk_v="i32")  # fmt: skip
for p, chunks in ((0, 1), (1, 1), (2, 1), (0, 16), (1, 16), (2, 16), (1, 3)):
    consts = dict(P=p, BLOCK_V=sampling._BLOCK_V, PASSES=2, CHUNKS=chunks, PARTS=1 << (chunks - 1).bit_length())
    info = ptxas_info(sampling._kth_largest_pass_kernel, types, consts, 8, 3, divisible=("vocab", "chunk_v"))
    assert info["regs"] and info["spill_bytes"] == 0, info
# top-p's floor: the radix select by mass (the row's max, eight passes of 16 masked sums an element), with top-k's
# floor (has_min) and without; under TP one pass a launch (the first, a middle one, the last that only reads)
types = dict(LOGITS="*bf16", MIN_LOGIT="*fp32", OUT="*fp32", top_p="fp32", temperature="fp32", vocab="i32",
             stride_row="i32")  # fmt: skip
for has_min in (False, True):
    consts = dict(HAS_MIN=has_min, BLOCK_V=sampling._TOP_P_BLOCK_V, PASSES=4, PDL=has_min)
    info = ptxas_info(sampling._top_p_floor_kernel, types, consts, 8, 3, divisible=("vocab",))
    assert info["regs"] and info["spill_bytes"] == 0 and info["pdl_wait_first"] == info["pdl_triggers"] == has_min, info
types.update(M="*fp32", HIST="*fp32", PREFIX="*i32", NEED="*fp32", n_rows="i32", chunk_v="i32")
# (and a small batch's rows in parts: batch 1's in 16)
for p, chunks in ((0, 1), (1, 1), (3, 1), (4, 1), (0, 16), (1, 16), (4, 16)):
    parts = dict(CHUNKS=chunks, PARTS=chunks)
    consts = dict(P=p, HAS_MIN=p == 3, BLOCK_V=sampling._TOP_P_BLOCK_V, PASSES=4, **parts)
    info = ptxas_info(sampling._top_p_pass_kernel, types, consts, 8, 3, divisible=("vocab",))
    assert info["regs"] and info["spill_bytes"] == 0, info
print("compiled")
""",
    "logprob": """
from bench.common import ptxas_info
import kernels.logprob as L

fwd_ptrs = dict(x_ptr="*bf16", tgt_ptr="*i64", norm_ptr="*fp32", logp_ptr="*fp32", ent_ptr="*fp32", stats_ptr="*fp32")
kept = L._prune_persist(L._configs() + L._persist_configs(), {"V": 32000})
persist = [c for c in kept if c.kwargs.get("PERSIST")]
assert [(c.kwargs["BLOCK_V"], c.num_warps) for c in persist] == [(32768, 32), (32768, 16)], persist
for fn, ptrs, flags, configs in [
    (L._logprob_fwd_kernel, fwd_ptrs, dict(HAS_ENT=True, FINALIZE=True, PERSIST=False), L._configs()[-3:]),
    (L._logprob_fwd_kernel, fwd_ptrs, dict(HAS_ENT=True, FINALIZE=True), persist),
    (L._logprob_bwd_kernel, dict(x_ptr="*bf16", gx_ptr="*bf16", tgt_ptr="*i64", norm_ptr="*fp32", ent_ptr="*fp32",
                                 glp_ptr="*fp32", gent_ptr="*fp32"), dict(HAS_GENT=True), L._configs()[-3:]),
]:
    for cfg in configs:  # the configs a 32000-wide vocabulary keeps
        consts = dict(V=32000, **flags, **cfg.kwargs)
        types = {a: ptrs.get(a, "fp32" if a == "inv_temp" else "i32") for a in fn.arg_names if a not in consts}
        info = ptxas_info(fn, types, consts, cfg.num_warps, cfg.num_stages)
        assert info["regs"] and info["spill_bytes"] == 0, info
        if fn is L._logprob_fwd_kernel:  # the entropy's two sums in one reduction: no barrier round of its own
            base = ptxas_info(fn, types, {**consts, "HAS_ENT": False}, cfg.num_warps, cfg.num_stages)
            assert 0 < info["barriers"] == base["barriers"], (cfg, info["barriers"], base["barriers"])
            async_copies = sum(n for k, n in info["loads"].items() if k.startswith("cp.async"))
            # the persistent kernel's rows copied in ahead (cp.async: the pipeliner ran the row loop ahead)
            assert (async_copies > 0) == bool(cfg.kwargs.get("PERSIST")), (cfg, info["loads"])
print("compiled")
""",
    "decode_linear": """
import triton.language as tl
from bench.common import ptxas_info
from kernels import decode_linear as dl

K = dl._decode_linear_kernel
ptrs = dict(X="*bf16", W="*bf16", Y="*bf16", WS="*fp32", CNT="*i32", KC="*bf16", VC="*bf16", POS="*i64", SLOT="*i64",
            INV_FREQ="*fp32", DELTA="*bf16", GAMMA="*bf16", H_OUT="*bf16", eps="fp32")
# (rows, SwiGLU, the rotary and cache write (a 128-wide head a column block: Llama-2-13B's 40 + 40 + 40), split K,
# the add + RMSNorm prologue)
# norm 1: the rows' statistics in the prologue (with the add), 2: from a residual epilogue's row sums; resid: that
# epilogue (the output and down projections)
ptrs.update(RES="*bf16", SS="*fp32")
# (the last, PDL: launched with programmatic dependent launch, decode_config's pdl)
for block_m, swiglu, rope, split, norm, resid, pdl in [
    (64, False, False, 1, 0, 0, 0), (64, True, False, 1, 0, 0, 0), (64, False, False, 2, 0, 0, 0),
    (16, False, False, 4, 0, 0, 0), (16, True, False, 2, 0, 0, 0), (64, False, True, 2, 0, 0, 0),
    (64, False, True, 1, 0, 0, 0), (16, False, True, 1, 0, 0, 0), (16, False, True, 2, 1, 0, 0),
    (16, True, False, 1, 1, 0, 0), (64, False, True, 2, 2, 0, 0), (64, True, False, 1, 2, 0, 0),
    (64, False, False, 2, 0, 1, 0), (16, False, False, 4, 0, 1, 0), (64, False, True, 2, 2, 0, 1),
    (16, False, False, 4, 0, 1, 1),
]:
    rope_consts = dict(HQ=40, HKV=40, CACHE_BLOCK=16) if rope else dict(HQ=0, HKV=0, CACHE_BLOCK=1)
    consts = dict(SWIGLU=swiglu, ROPE=rope, NORM=norm, HAS_DELTA=norm == 1, RESID=bool(resid), SPLIT_K=split, EVEN=True,
                  BLOCK_M=block_m, PDL=bool(pdl),
                  BLOCK_N=128 if rope else dl._BLOCK_N, DOT_DTYPE=tl.bfloat16, PREC="tf32", **rope_consts)
    cfg = dl.linear_config(block_m, 5120, 5120, swiglu, 132, {"block_n": consts["BLOCK_N"]})  # (the launch's)
    consts["BLOCK_K"] = cfg["block_k"]
    types = {a: ptrs.get(a, "i32") for a in K.arg_names if a not in consts}
    info = ptxas_info(K, types, consts, cfg["num_warps"], cfg["num_stages"], divisible=("N", "K", "k_per_split"))
    # the default launch fits an H100's 227 KiB of shared memory, spills nothing, streams W with cp.async
    assert info["regs"] and info["spill_bytes"] == 0 and info["shared"] <= 227 * 1024, info
    assert info["loads"].get("cp.async.cg.shared.global"), info
    # nothing else but the partials (the rotary's epilogue reads positions, slots and frequencies, the norm's prologue
    # the stream, its row sums and gamma, the residual epilogue the stream)
    if not rope and not norm and not resid:
        assert set(info["loads"]) <= {"cp.async.cg.shared.global", "ld.global.cg.v4.b32"}, info
    assert (info["loads"].get("ld.global.cg.v4.b32", 0) > 0) == (split > 1), info
    assert info["mma"].get("wgmma" if block_m == 64 else "mma"), info
    # ptxas serialises the warpgroup MMAs (its advisory C7515) where the norm's prologue feeds the product from
    # registers at 64 rows and 64-wide column blocks (with or without SwiGLU, the norm's statistics from row sums or
    # its own; the rotary's 128-wide head blocks are clean): gate_up at a batch of 33 to 64 under decode_config's
    # linear 1 (bench/RESULTS.md); a change either way shows here
    assert info["wgmma_serialized"] == (block_m == 64 and norm > 0 and not rope), (block_m, swiglu, norm, info)
    # with PDL: the wait before any memory access (the split-K counters included), then the next kernel let in; the
    # first W tiles asked of L2 before the wait (W is no earlier kernel's output)
    assert info["pdl_wait_first"] == info["pdl_triggers"] == info["l2_prefetch_before_wait"] == bool(pdl), info
print("compiled")
""",
}


@pytest.mark.cpu_only  # on a GPU the kernel tests compile the kernels for real
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_compile_for_sm90(case):
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", CASES[case]], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
