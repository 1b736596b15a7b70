"""Benchmark kernels.rope_attention (rotary fused) against SDPA with rotary applied separately.

Rows: ours (k rotated once per token by kernels/rotary.py, then attention with q rotated in-kernel; the
k rotation's own time is shown under it); SDPA flash and SDPA cuDNN backends after HF's rotary (bf16, its cos/sin
computed once, as transformers' Llama does: what users run today), and each backend alone without the rotary;
torch.compile of HF rotary + SDPA; the eager reference (kernels/reference.rope_attention); Liger's rope kernel +
SDPA flash if Liger-Kernel is importable; the FLOP roofline (the device's measured matmul rate). Forward and
forward+backward, causal, default shape B8 H40 T2048 D128 bf16, plus a packed batch of mixed lengths (ours varlen
vs SDPA padded to the longest). Ours is checked against the fp32 reference first; a mismatch stops the run.

FLOPs (causal): forward = 4*B*H*T^2*D / 2 (two matmuls, half the score matrix); forward+backward counted as
--fwd-bwd-factor (default 3.5, FlashAttention's convention: the backward 2.5x the forward) times the forward. A
packed batch counts each sequence's own L^2 (useful FLOPs only, for ours and the padded peers alike).

    python bench/bench_rope_attention.py [--batch 8 --heads 40 --kv-heads 40 --seqlen 2048 --head-dim 128]
        [--dtype bf16] [--peak-tflops TFLOPS (default: measured)] [--no-compile] [--json out.json]

Without a CUDA device it runs a tiny shape on the CPU (the reference against eager rotary + SDPA) and says
that GPU figures need a CUDA device.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch.nn.functional as F

from bench.common import (  # noqa: E402
    check_close,
    check_flags,
    exit_if_ours_failed,
    fill_peaks,
    measure,
    ptxas_info,
    write_json,
)
from kernels import attention_gluon, attention_gluon_bwd, dispatch, reference  # noqa: E402
from kernels.rope_attention import rope_attention  # noqa: E402
from kernels.rotary import launch_rotary  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OURS = ("ours", "reference (CPU path)")  # ours' rows (on a CPU, rope_attention runs the reference path)


def causal_flops(lengths: list[int], heads: int, head_dim: int) -> float:
    return sum(4.0 * heads * n * n * head_dim / 2 for n in lengths)


def rotary_tables(positions, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, D] in the model's dtype, computed once (as HF's LlamaRotaryEmbedding hands them to every layer)."""
    cos, sin = reference.rotary_cos_sin(positions, head_dim, theta, torch.float32)
    return cos.to(dtype), sin.to(dtype)


def sdpa_with_rotary(q, k, v, cos, sin, batch, seqlen, backend=None, rotary: bool = True):
    """Users' path today: HF's rotary as separate ops on [B*T, H, D] (bf16, tables computed once), then SDPA on
    [B, H, T, D] views. rotary=False: the attention alone (what the rotary costs them, by difference)."""
    if rotary:
        # HF's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, in the model's dtype (the oracle's own rotation,
        # computed in that dtype instead of fp32)
        q, k = reference._rotate(q, cos, sin, q.dtype), reference._rotate(k, cos, sin, k.dtype)
    qr = q.view(batch, seqlen, q.shape[1], -1).transpose(1, 2)
    kr = k.view(batch, seqlen, k.shape[1], -1).transpose(1, 2)
    vv = v.view(batch, seqlen, v.shape[1], -1).transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if backend is None:
        return F.scaled_dot_product_attention(qr, kr, vv, is_causal=True, enable_gqa=gqa)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(qr, kr, vv, is_causal=True, enable_gqa=gqa)


def _padded_sdpa(q, k, v, *, cos, sin, batch, seqlen, backend):
    return sdpa_with_rotary(q, k, v, cos, sin, batch, seqlen, backend)


def check_against_reference(hq: int, hkv: int, d: int, dtype: torch.dtype, theta: float) -> None:
    """Before timing on a GPU: ours vs the fp32 reference on a small packed batch (fwd and grads), at the modules'
    defaults and with each opt-in switch the bench times flipped (the three kernels warp-specialised or not, dq by
    atomic adds or by its own kernel). The Gluon forward's is checked where its row is timed, last (_gluon_row)."""
    from kernels import rope_attention as ra
    from kernels import rope_attention_bwd

    for name, flip in (
        ("defaults", {}),
        ("WARP_SPEC flipped", dict(warp_spec=not ra.WARP_SPEC)),
        ("DQ_ATOMIC flipped", dict(dq_atomic=not rope_attention_bwd.DQ_ATOMIC)),
    ):
        _check_one(name, flip, hq, hkv, d, dtype, theta)
    _ours(None, None, None, positions=None, cu=None, theta=None, run=False)  # (the defaults back)


def _check_one(
    name: str, flip: dict, hq: int, hkv: int, d: int, dtype: torch.dtype, theta: float, grads: bool = True
) -> None:
    """ours with the switches `flip` against the fp32 reference on a packed batch: out and (grads) dq, dk, dv."""
    lengths = [1, 100, 128, 257, 1000]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    cu = cu.cuda()
    positions = torch.cat([torch.arange(37, 37 + n) for n in lengths]).cuda()
    n = sum(lengths)
    q, k, v = (torch.randn(n, h, d, device="cuda", dtype=dtype, requires_grad=True) for h in (hq, hkv, hkv))
    do = torch.randn(n, hq, d, device="cuda", dtype=dtype)
    out = _ours(q, k, v, positions=positions, cu=cu, theta=theta, **flip)
    grad = torch.autograd.grad(out, (q, k, v), do) if grads else ()
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = reference.rope_attention(q32, k32, v32, positions, cu, rope_theta=theta)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float()) if grads else ()
    errs = [(a.float() - b).abs().max().item() for a, b in zip((out, *grad), (ref, *ref_grads))]
    said = "out/dq/dk/dv" if grads else "out"
    print(f"check vs fp32 reference ({name}), max abs error {said}: " + " ".join(f"{e:.2e}" for e in errs))
    rel = max(e / b.abs().max().item() for e, b in zip(errs, (ref, *ref_grads)))
    check_close(f"rope attention Hq{hq}/Hkv{hkv} D{d} {dtype} ({name})", rel, dtype)


_DEFAULTS: dict = {}


def _ours(
    q, k, v, *, positions, cu, theta, tma=None, dq_atomic=None, warp_spec=None, gluon=None, pingpong=None,
    gluon_dkdv=None, bwd_producer=None, gluon_dq=None, run=True,
):  # fmt: skip
    """rope_attention with its inner tiles by tensor descriptor or by pointer loads (tma True / False), dq by its own
    kernel or by the dk/dv kernel's atomic adds (dq_atomic False / True), the forward, dk/dv and dq kernels
    warp-specialised or not (warp_spec: rope_attention's and rope_attention_bwd's WARP_SPEC both), the forward in
    Gluon where it can run (gluon: rope_attention.GLUON_FWD) in its ping-pong form or not (pingpong:
    attention_gluon.PINGPONG), dk/dv in Gluon (gluon_dkdv: rope_attention_bwd.GLUON_DKDV) with a producer warp or
    not (bwd_producer: attention_gluon_bwd.BWD_PRODUCER), dq in Gluon (gluon_dq: rope_attention_bwd.GLUON_DQ); None:
    the modules' defaults. The switches stay set until the next call: the backward that follows a forward in a
    timing loop reads them. run False: only set them."""
    from kernels import attention_tiles, rope_attention_bwd
    from kernels import rope_attention as ra

    if not _DEFAULTS:
        _DEFAULTS.update(tma=attention_tiles.TMA_LOADS, dq_atomic=rope_attention_bwd.DQ_ATOMIC, ws=ra.WARP_SPEC)
        _DEFAULTS.update(bwd_ws=rope_attention_bwd.WARP_SPEC, gluon=ra.GLUON_FWD, pingpong=attention_gluon.PINGPONG)
        _DEFAULTS.update(gluon_dkdv=rope_attention_bwd.GLUON_DKDV, bwd_producer=attention_gluon_bwd.BWD_PRODUCER)
        _DEFAULTS.update(gluon_dq=rope_attention_bwd.GLUON_DQ)
    ra.GLUON_FWD = _DEFAULTS["gluon"] if gluon is None else gluon
    rope_attention_bwd.GLUON_DKDV = _DEFAULTS["gluon_dkdv"] if gluon_dkdv is None else gluon_dkdv
    attention_gluon_bwd.BWD_PRODUCER = _DEFAULTS["bwd_producer"] if bwd_producer is None else bwd_producer
    rope_attention_bwd.GLUON_DQ = _DEFAULTS["gluon_dq"] if gluon_dq is None else gluon_dq
    attention_gluon.PINGPONG = _DEFAULTS["pingpong"] if pingpong is None else pingpong
    attention_tiles.TMA_LOADS = _DEFAULTS["tma"] if tma is None else tma
    rope_attention_bwd.DQ_ATOMIC = _DEFAULTS["dq_atomic"] if dq_atomic is None else dq_atomic
    ra.WARP_SPEC = _DEFAULTS["ws"] if warp_spec is None else warp_spec
    rope_attention_bwd.WARP_SPEC = _DEFAULTS["bwd_ws"] if warp_spec is None else warp_spec
    return rope_attention(q, k, v, positions, cu, rope_theta=theta) if run else None


def make_rows(args, q, k, v, positions, cu, batch, seqlen, padded_mask=None):
    """name -> callable(q, k, v) -> output, for the dense (B, T) layout."""
    theta = args.rope_theta
    rows = {"ours (rotary fused)": functools.partial(_ours, positions=positions, cu=cu, theta=theta)}
    if q.is_cuda:
        from kernels import attention_tiles, rope_attention_bwd

        name = "  ours, dq by its own kernel" if rope_attention_bwd.DQ_ATOMIC else "  ours, dq by dk/dv's atomic adds"
        rows[name] = functools.partial(
            _ours, positions=positions, cu=cu, theta=theta, dq_atomic=not rope_attention_bwd.DQ_ATOMIC
        )
        from torch.nn.attention import SDPBackend

        from kernels import rope_attention as ra

        if attention_tiles._warp_spec_refused(q.dtype, attention_tiles.use_tma(q.shape[-1], q, k, v), None) is None:
            name = "  ours, not warp-specialised" if ra.WARP_SPEC else "  ours, warp-specialised"
            rows[name] = functools.partial(_ours, positions=positions, cu=cu, theta=theta, warp_spec=not ra.WARP_SPEC)
        if torch.cuda.get_device_capability()[0] >= 9 and q.shape[-1] >= 32:  # the tiles by TMA vs pointer loads
            rows["  ours, pointer loads (no TMA)"] = functools.partial(
                _ours, positions=positions, cu=cu, theta=theta, tma=False
            )
        cos, sin = rotary_tables(positions, q.shape[-1], theta, q.dtype)
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
            rows[f"SDPA {name} + HF rotary"] = functools.partial(
                sdpa_with_rotary, cos=cos, sin=sin, batch=batch, seqlen=seqlen, backend=be
            )
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
            rows[f"  SDPA {name} alone (no rotary)"] = functools.partial(
                sdpa_with_rotary, cos=cos, sin=sin, batch=batch, seqlen=seqlen, backend=be, rotary=False
            )
        if args.compile:  # (its integer arguments are specialised on by default)
            compiled = torch.compile(sdpa_with_rotary)
            rows["torch.compile(HF rotary + SDPA)"] = lambda q, k, v: compiled(q, k, v, cos, sin, batch, seqlen)
        try:
            from liger_kernel.ops.rope import LigerRopeFunction

            cos, sin = reference.rotary_cos_sin(positions[:seqlen], q.shape[-1], theta, torch.float32)
            cos, sin = cos.to(q.dtype)[None], sin.to(q.dtype)[None]

            def liger(q, k, v):
                qb = q.view(batch, seqlen, q.shape[1], -1).transpose(1, 2)
                kb = k.view(batch, seqlen, k.shape[1], -1).transpose(1, 2)
                qr, kr = LigerRopeFunction.apply(qb, kb, cos, sin)
                vv = v.view(batch, seqlen, v.shape[1], -1).transpose(1, 2)
                return F.scaled_dot_product_attention(qr, kr, vv, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

            rows["Liger rope + SDPA"] = liger
        except Exception:  # noqa: BLE001 - Liger is optional
            pass
    rows["eager reference"] = lambda q, k, v: reference.rope_attention(q, k, v, positions, cu, rope_theta=theta)
    if q.is_cuda:
        from kernels import rope_attention as ra

        if attention_gluon.refused(q.dtype, q.shape[-1], q.device, k, v) is None:  # (the Gluon forward: sm_90 only)
            # the forward the module does not run now (Triton's or Gluon's), then Gluon's other form (8 warps or
            # ping-pong: attention_gluon.PINGPONG), the last rows timed
            other = not attention_gluon.PINGPONG
            forms = ("8 warps", "ping-pong")
            names = [("  ours, forward in Triton", False, None)] if ra.GLUON_FWD else []
            names += [] if ra.GLUON_FWD else [(f"  ours, Gluon forward, {forms[not other]} (FA3)", True, not other)]
            names += [(f"  ours, Gluon forward, {forms[other]} (FA3)", True, other)]
            flips = [(name, dict(gluon=gluon, pingpong=pingpong)) for name, gluon, pingpong in names]
            # and dk/dv: in Triton where the module runs Gluon's, in Gluon's 8-warp and producer forms
            # (rope_attention_bwd.GLUON_DKDV, attention_gluon_bwd.BWD_PRODUCER), the module's form first
            dkdv, producer = rope_attention_bwd.GLUON_DKDV, attention_gluon_bwd.BWD_PRODUCER
            forms = ("8 warps", "producer warp")
            flips += [("  ours, dk/dv in Triton", dict(gluon_dkdv=False))] if dkdv else []
            flips += [] if dkdv else [(f"  ours, Gluon dk/dv, {forms[producer]} (FA3 order)", dict(gluon_dkdv=True))]
            name = f"  ours, Gluon dk/dv, {forms[not producer]} (FA3 order)"
            flips += [(name, dict(gluon_dkdv=True, bwd_producer=not producer))]
            # and dq in Gluon (rope_attention_bwd.GLUON_DQ), or in Triton where the module runs Gluon's
            dq_gluon = rope_attention_bwd.GLUON_DQ
            flips += [
                ("  ours, dq in Triton" if dq_gluon else "  ours, Gluon dq (FA3 order)", dict(gluon_dq=not dq_gluon))
            ]
            for name, flip in flips:
                rows[name] = functools.partial(_gluon_row, positions=positions, cu=cu, theta=theta, args=args, **flip)
    return rows


def select_rows(rows: dict, words: list[str] | None) -> dict:
    """The rows whose name holds one of `words` (case-sensitive), and ours at its defaults (the baseline every other
    row is read against); None: all of them."""
    if not words:
        return rows
    return {name: fn for name, fn in rows.items() if name == "ours (rotary fused)" or any(w in name for w in words)}


_GLUON_CHECKED: dict = {}


def _gluon_row(q, k, v, *, positions, cu, theta, args, **flip):
    """ours with _ours' Gluon switches `flip` (gluon: rope_attention.GLUON_FWD, pingpong: attention_gluon.PINGPONG,
    gluon_dkdv: rope_attention_bwd.GLUON_DKDV, bwd_producer: attention_gluon_bwd.BWD_PRODUCER, gluon_dq:
    rope_attention_bwd.GLUON_DQ; absent: as they are): the last rows timed, each checked against the fp32
    reference first (once a run, in a subprocess under a timeout: _gluon_check); a failed check is its row's
    error on every call (the bench then exits non-zero), and the other rows stand."""
    key = tuple(sorted(flip.items()))
    if key not in _GLUON_CHECKED:
        _GLUON_CHECKED[key] = _gluon_check(flip, q.shape[1], k.shape[1], q.shape[-1], q.dtype, args.rope_theta)
    if _GLUON_CHECKED[key]:
        raise RuntimeError(_GLUON_CHECKED[key])
    return _ours(q, k, v, positions=positions, cu=cu, theta=theta, **flip)


def _gluon_check(flip: dict, hq: int, hkv: int, d: int, dtype: torch.dtype, theta: float, timeout: float | None = None):
    """_check_one with _ours' switches `flip`, in a subprocess: None if ours matched the reference, else why not. The
    forward alone for the Gluon forward (the backward is the Triton one, checked already, and its cold autotuning
    would cost the subprocess a minute), with the gradients for the Gluon dk/dv and dq (gluon_dkdv, gluon_dq). A
    kernel new to the GPU that hangs (a barrier's phase wrong) is stopped at `timeout` seconds (None: 60, 150
    with the gradients: the dq kernel's autotuning) instead of holding the bench (and a lease's step) to its cap."""
    import subprocess

    grads = bool(flip.get("gluon_dkdv") or flip.get("gluon_dq"))
    timeout = timeout or (150 if grads else 60)
    name = ", ".join(f"{key}={value}" for key, value in flip.items())
    code = (
        "import torch, bench.bench_rope_attention as B; "
        f"B._check_one({name!r}, {flip!r}, {hq}, {hkv}, {d}, {dtype}, {theta!r}, grads={grads})"
    )
    root = Path(__file__).resolve().parents[1]
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"its check against the reference did not finish in {timeout:g} s (a hang?)"
    print(proc.stdout.strip(), flush=True)
    if proc.returncode:
        return (proc.stderr.strip().splitlines() or [f"its check exited {proc.returncode}"])[-1]
    return None


def bench_impl(fn, q, k, v, do, flops, args, cuda) -> dict:
    """Forward and forward+backward figures of one implementation fn(q, k, v) -> output."""
    ms, mem = measure(lambda: fn(q, k, v), "cuda" if cuda else "cpu", warmup_ms=args.warmup, rep_ms=args.rep)
    mem /= 2**30
    entry = dict(fwd_ms=ms, fwd_tflops=flops / ms / 1e9, fwd_extra_gib=mem)
    if args.backward:
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

        def step():
            out = fn(qg, kg, vg)
            # SDPA rows return [B, H, T, D] views of the packed [N, H, D] layout
            g = do if out.shape == q.shape else do.view(out.shape[0], -1, *q.shape[1:]).transpose(1, 2)
            torch.autograd.grad(out, (qg, kg, vg), g)

        ms, mem = measure(step, "cuda" if cuda else "cpu", warmup_ms=args.warmup, rep_ms=args.rep)
        mem /= 2**30
        entry.update(fwdbwd_ms=ms, fwdbwd_tflops=args.fwd_bwd_factor * flops / ms / 1e9, fwdbwd_extra_gib=mem)
    return entry


def run_rows(rows, q, k, v, flops, args, cuda, table, label, roofline=True):
    do = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    for name, fn in rows.items():
        entry = {"case": label, "impl": name}
        try:
            entry.update(bench_impl(fn, q, k, v, do, flops, args, cuda))
        except Exception as e:  # noqa: BLE001 - a peer that fails on this device is reported, not fatal
            entry["error"] = f"{type(e).__name__}: {str(e)[:80]}"
        table.append(entry)
        print_table([entry], header=False)  # as it is measured: a run stopped at its deadline keeps what it had
        save(args, table, cuda)
    if not roofline:
        return
    roof_ms = flops / (args.peak_tflops * 1e9)
    table.append(
        {
            "case": label,
            "impl": f"roofline ({args.peak_tflops:.4g} TFLOP/s)",
            "fwd_ms": roof_ms,
            "fwd_tflops": args.peak_tflops,
            "fwdbwd_ms": roof_ms * args.fwd_bwd_factor,
            "fwdbwd_tflops": args.peak_tflops,
        }
    )


def _fmt(e: dict, key: str, width: int, prec: int) -> str:
    if key in e and not math.isnan(e[key]):
        return f"{e[key]:>{width}.{prec}f}"
    return " " * (width - 1) + "-"


def print_table(table, header: bool = True):
    if header:
        print(
            f"{'case':<34} {'impl':<30} {'fwd ms':>8} {'TFLOP/s':>8} {'+GiB':>6} {'f+b ms':>8} {'TFLOP/s':>8} "
            f"{'+GiB':>6}"
        )
    for e in table:
        if "error" in e:
            print(f"{e['case']:<34} {e['impl']:<30} {e['error']}")
            continue
        print(
            f"{e['case']:<34} {e['impl']:<30} {_fmt(e, 'fwd_ms', 8, 3)} {_fmt(e, 'fwd_tflops', 8, 1)} "
            f"{_fmt(e, 'fwd_extra_gib', 6, 2)} {_fmt(e, 'fwdbwd_ms', 8, 3)} {_fmt(e, 'fwdbwd_tflops', 8, 1)} "
            f"{_fmt(e, 'fwdbwd_extra_gib', 6, 2)}"
        )


def _ws_builds(shapes: tuple, n: int | None, seq_block: int) -> list[tuple]:
    """The warp-specialised shapes a report builds: the first n plain ones, then the first n BOUNDED ones, of those
    whose inner tile divides the kernel's sequence block (attention_tiles._prune's rule)."""
    shapes = _fitting(shapes, seq_block)
    return [s for s in shapes if len(s) == 3][:n] + [s for s in shapes if len(s) > 3][:n]


def _fitting(shapes: tuple, seq_block: int) -> list[tuple]:
    """The autotune shapes whose inner tile (the first number) divides the sequence block: the others are pruned at
    launch (a SEQ_BLOCKS of 64 drops the 128-wide tiles), so the report does not build them either."""
    return [s for s in shapes if seq_block % s[0] == 0]


def ptxas_report(
    head_dim: int, dtype: str, group: int, configs_per_kernel: int | None = None, tma: bool = True
) -> list[dict]:
    """Compile every autotune config for sm_90 offline (no GPU needed) and print ptxas registers, spills, shared
    memory and the global loads by kind (cp.async: pipelined; cp.async.bulk.tensor: a tensor descriptor's TMA
    copy): the one performance signal without a GPU. tma: the inner tiles by tensor descriptor, as an sm_90 launch
    takes them (head dims from 32), else by pointer loads."""
    import triton.language as tl

    from kernels import attention_tiles as tiles
    from kernels import rope_attention as ra
    from kernels import rope_attention_bwd as ra_bwd
    from kernels import rotary

    ptr = "*" + dtype
    types = dict.fromkeys(["Q", "K", "V", "O", "DO", "DK", "DV", "DQ", "QR", "QO", "KO", "KC", "VC", "KP", "VP"], ptr)
    types.update(QP=ptr, DOP=ptr)
    types.update(LSE="*fp32", DELTA="*fp32", DQA="*fp32", INV_FREQ="*fp32", TAB="*fp32", POS="*i64", SLOT="*i64")
    types.update(CU_SEQ="*i32", CU_BLK="*i32")
    tl_dtype = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype]
    base = dict(N_STEPS=4, GROUP=group, HEAD_DIM=head_dim, HALF=max(head_dim // 2, 16), TAB_ROWS=rotary.TAB_ROWS)
    base.update(DOT_DTYPE=tl_dtype, PREC="ieee" if dtype == "fp32" else "tf32")
    tma = tma and head_dim >= 32
    # (each kernel at the sequence block a launch takes by default: attention_tiles.SEQ_BLOCKS)
    dkdv = dict(BLOCK_N=tiles.seq_block("dkdv", None, "BLOCK_N"), DQ_ATOMIC=False, WARP_SPEC=False, BOUNDED=False)
    dq = dict(BLOCK_M=tiles.seq_block("dq", None, "BLOCK_M"), WARP_SPEC=False, BOUNDED=False)
    fwd = dict(BLOCK_M=tiles.seq_block("fwd", None, "BLOCK_M"), SAVE_ROT=True, ROTATE_Q=True, WARP_SPEC=False)
    fwd["BOUNDED"] = False
    kernels = [  # (name, kernel, inner tile, shapes, constants, the arguments a TMA launch passes as descriptors)
        ("fwd", ra._fwd_kernel, "BLOCK_N", tiles._FWD_SHAPES, fwd, ("K", "V")),
        ("dkdv", ra_bwd._bwd_dkdv_kernel, "BLOCK_M", tiles._BWD_SHAPES, dkdv, ("Q", "DO")),
        ("dq", ra_bwd._bwd_dq_kernel, "BLOCK_N", tiles._BWD_SHAPES, dq, ("K", "V")),
        # rope_attention_bwd.DQ_ATOMIC: dk/dv adding each tile's dq share into an fp32 sum (no dq kernel)
        ("dkdv+dq", ra_bwd._bwd_dkdv_kernel, "BLOCK_M", tiles._BWD_SHAPES, {**dkdv, "DQ_ATOMIC": True},
         ("Q", "DO", "DQA")),
    ]  # fmt: skip
    rows, builds = [], []
    pool = ThreadPoolExecutor(dispatch.COMPILE_THREADS)  # (the builds at once: Triton and ptxas release the GIL)

    def report(name, fn, consts, warps, stages, label, descs=(), block=0, maxnreg=None, retype=None):
        arg_types = {a: types.get(a, "fp32" if "scale" in a else "i32") for a in fn.arg_names if a not in consts}
        arg_types.update(retype or {})  # (an argument of another type in this launch)
        for a in descs:  # (a [block, D] tile of the tensor's own dtype; (name, rows): another block; rows None: 1-D)
            a, rows_ = a if isinstance(a, tuple) else (a, block)
            shape = f"{dq['BLOCK_M']}" if rows_ is None else f"{rows_}, {head_dim}"  # (1-D: dq's lse, delta)
            arg_types[a] = f"tensordesc<{types[a].lstrip('*')}[{shape}]>"
        builds.append((name, label, pool.submit(ptxas_info, fn, arg_types, consts, warps, stages, maxnreg=maxnreg)))

    def collect(name, label, build):  # (in the order asked for)
        info = build.result()
        rows.append({"kernel": name, "config": label, **info})
        loads = " ".join(f"{k}:{v}" for k, v in sorted({**info["loads"], **info["reduces"]}.items()))
        mma = " ".join(f"{k}:{v}" for k, v in sorted(info["mma"].items())) or "no-mma"
        ws = f" warps={info['warps']} setmaxnreg={info['setmaxnreg']}" if info["setmaxnreg"] else ""
        ws += f" exp2-in-flight={info['exp2_in_flight']}" if info["exp2_in_flight"] else ""
        ws += " WGMMA-SERIALIZED (ptxas C7515)" if info["wgmma_serialized"] else ""
        print(f"{name:7} {label:42} smem={info['shared']:>6} regs={info['regs']} spill={info['spill_bytes']} "
              f"in-loop={info['loop_spills']} {mma} {loads}{ws}", flush=True)  # fmt: skip

    # the rotary pre-pass of the forward (k only, written to a buffer), at the default shape's tiles
    pre = dict(HQ=0, HKV=40 // group, **rotary.launch_shape(16384, 0, 40 // group, head_dim)[1], CACHE_BLOCK=1,
               ROTATE=True, WRITE_K=True, WRITE_CACHE=False, PDL=False)  # fmt: skip
    report("rotary", rotary._rotary_kernel, pre, 4, 1, f"BLOCK_T={pre['BLOCK_T']} BLOCK_H={pre['BLOCK_H']}")
    for name, fn, inner, shapes, extra, descs in kernels:
        for block, warps, stages in _fitting(shapes, extra[tiles._OTHER_BLOCK[inner]])[:configs_per_kernel]:
            consts = {**base, **extra, inner: block, "TMA": tma}
            label = f"{inner}={block} w={warps} s={stages}" + (" TMA" if tma else "")
            report(name, fn, consts, warps, stages, label, descs if tma else (), block)
    # the forward with 64-row blocks and 32-key tiles at 4 warps under a 168-register cap: its spills stay out of
    # the loops (the q rotation before them), and three programs fit on an SM instead of two (a sweep variant)
    capped = {**base, **kernels[0][4], "BLOCK_M": 64, "BLOCK_N": 32, "TMA": tma}
    label = "BLOCK_M=64 BLOCK_N=32 w=4 s=2 maxnreg=168" + (" TMA" if tma else "")
    report("fwd", ra._fwd_kernel, capped, 4, 2, label, kernels[0][5] if tma else (), 32, maxnreg=168)
    # and with q rotated by the pre-pass (rope_attention.Q_PREPASS): no rotation in the forward, no cap needed
    prepass = {**capped, "SAVE_ROT": False, "ROTATE_Q": False}
    label = "BLOCK_M=64 BLOCK_N=32 w=4 s=2 Q_PREPASS" + (" TMA" if tma else "")
    report("fwd", ra._fwd_kernel, prepass, 4, 2, label, kernels[0][5] if tma else (), 32)
    if tma:  # the WARP_SPEC switches (each kernel's loop warp-specialised: a producer warpgroup for the bulk copies,
        # two consumer warpgroups) at the autotuner's shapes, plain then BOUNDED (their inner tiles by descriptors
        # each program makes over its own sequence, zeros past the end); (name, kernel, shapes, inner tile, sequence
        # block, constants, the descriptors with their tiles, arguments of another type)
        ws_kernels = [
            # the forward: q's tile (rotated by the pre-pass) by bulk copy too
            ("fwd", ra._fwd_kernel, ra._FWD_WS_SHAPES, "BLOCK_N", fwd["BLOCK_M"],
             {**prepass, "BLOCK_M": fwd["BLOCK_M"]}, (("Q", fwd["BLOCK_M"]), "K", "V"), None),
            # dk/dv's query loop (its K and V tiles by bulk copy too)
            ("dkdv", ra_bwd._bwd_dkdv_kernel, ra_bwd._BWD_WS_SHAPES, "BLOCK_M", dkdv["BLOCK_N"], {**base, **dkdv},
             (("K", dkdv["BLOCK_N"]), ("V", dkdv["BLOCK_N"]), "Q", "DO"), None),
            # dq's key loop (q, do and the blocked lse and delta by bulk copy too; dq into fp32, for the finishing pass)
            ("dq", ra_bwd._bwd_dq_kernel, ra_bwd._DQ_WS_SHAPES, "BLOCK_N", dq["BLOCK_M"], {**base, **dq},
             (("Q", dq["BLOCK_M"]), ("DO", dq["BLOCK_M"]), "K", "V", ("LSE", None), ("DELTA", None)), {"DQ": "*fp32"}),
        ]  # fmt: skip
        for name, fn, shapes, inner_name, block, fixed, descs, retype in ws_kernels:
            for inner, warps, stages, *more in _ws_builds(shapes, configs_per_kernel, block):
                label = f"{inner_name}={inner} w={warps} s={stages} WARP_SPEC{' BOUNDED' if more else ''} TMA"
                consts = {**fixed, "TMA": True, "WARP_SPEC": True, inner_name: inner, **(more[0] if more else {})}
                report(name, fn, consts, warps, stages, label, descs, inner, retype=retype)
    if tma and dtype != "fp32" and head_dim in attention_gluon.HEAD_DIMS:  # rope_attention.GLUON_FWD's forward:
        # the softmax of one key tile while the last tile's P @ V runs (exp2 in flight), 8 warps, no producer
        for block_n, stages in attention_gluon.SHAPES[:configs_per_kernel]:
            consts = dict(N_STEPS=4, GROUP=group, HEAD_DIM=head_dim, BLOCK_M=attention_gluon.BLOCK_M, BLOCK_N=block_n)
            label = f"BLOCK_N={block_n} w={attention_gluon.NUM_WARPS} s={stages} GLUON TMA"
            retype = attention_gluon.build_types(dtype, head_dim, block_n)
            report("fwd", attention_gluon._fwd_fa3_kernel, {**consts, "STAGES": stages}, attention_gluon.NUM_WARPS, 1,
                   label, retype=retype)  # fmt: skip
            # its ping-pong form (attention_gluon.PINGPONG): a producer warp, two consumer warpgroups in turn, 12 warps
            # in all under a 168-register cap at launch that setmaxnreg hands on (240 to each consumer)
            consts.update(STAGES=stages, CONSUMER_REGS=attention_gluon.CONSUMER_REGS)
            label = f"BLOCK_N={block_n} w=4+4+1 s={stages} GLUON PINGPONG TMA"
            report("fwd", attention_gluon._fwd_fa3_ws_kernel, consts, attention_gluon.PINGPONG_WARPS, 1, label,
                   maxnreg=attention_gluon.PINGPONG_MAXNREG, retype=retype)  # fmt: skip
        # rope_attention_bwd.GLUON_DKDV's and GLUON_DQ's kernels: P computed while dP's product runs, in 8 warps (dk/dv:
        # 128-key blocks, its query tiles; dq: 128-row query blocks, its key tiles), at the default tile for the head
        # dim, then the other shapes: (name, kernel, warps, the block's name and size, the tile's name, tiles, shapes,
        # argument types)
        ag = attention_gluon_bwd
        for name, fn, warps, block, inner, tiles, shapes, types_of in (
            ("dkdv", ag._bwd_dkdv_kernel, ag.BWD_WARPS, ("BLOCK_N", ag.BWD_BLOCK_N), "BLOCK_M", ag.BWD_TILES,
             ag.BWD_SHAPES, ag.bwd_build_types),
            ("dq", ag._bwd_dq_kernel, ag.DQ_WARPS, ("BLOCK_M", ag.DQ_BLOCK_M), "BLOCK_N", ag.DQ_TILES, ag.DQ_SHAPES,
             ag.dq_build_types),
        ):  # fmt: skip
            tiles_ = [tiles[head_dim]] + [t for t in shapes if t != tiles[head_dim]]
            for tile, stages in tiles_[:configs_per_kernel]:
                consts = {"N_STEPS": 4, "GROUP": group, "HEAD_DIM": head_dim, block[0]: block[1], inner: tile}
                label = f"{inner}={tile} w={warps} s={stages} GLUON TMA"
                retype = types_of(dtype, head_dim, tile)
                report(name, fn, {**consts, "STAGES": stages}, warps, 1, label, retype=retype)
        # and the dk/dv kernel's warp-specialised form (attention_gluon_bwd.BWD_PRODUCER) at its default tile
        block_m, stages = ag.BWD_PRODUCER_TILES[head_dim]
        consts = dict(N_STEPS=4, GROUP=group, HEAD_DIM=head_dim, BLOCK_N=ag.BWD_BLOCK_N, BLOCK_M=block_m)
        consts.update(STAGES=stages, CONSUMER_REGS=attention_gluon.CONSUMER_REGS)
        label = f"BLOCK_M={block_m} w=4+4+1 s={stages} GLUON PRODUCER TMA"
        retype = ag.bwd_build_types(dtype, head_dim, block_m)
        report("dkdv", ag._bwd_dkdv_ws_kernel, consts, attention_gluon.PINGPONG_WARPS, 1, label,
               maxnreg=attention_gluon.PINGPONG_MAXNREG, retype=retype)  # fmt: skip
    fin = dict(HEAD_DIM=head_dim, HALF=base["HALF"], BLOCK_T=32, TAB_ROWS=rotary.TAB_ROWS)  # (DQ_ATOMIC's last pass)
    report("dq_fin", ra_bwd._bwd_dq_finish_kernel, fin, 8, 1, "BLOCK_T=32")
    with pool:
        for build in builds:
            collect(*build)
    return rows


# Launch variants the sweep times: (sequence block, inner tile, warps, stages, TMA[, more of the launch config]) per
# kernel: every one with the inner tiles by tensor descriptor, and the pointer-load variants that were fastest on the
# second lease (2026-12-04); the forward also at 64-row blocks under register caps (maxnreg 168: three programs an SM,
# spills outside the loops only; 128: four, 14 spill instructions in the loops; --ptxas) and with q rotated by the
# pre-pass (Q_PREPASS: 120 registers at 64 x 32 tiles, no spill, four programs an SM)
# rope_attention.WARP_SPEC first (the variant never timed): the key loop warp-specialised, 4 warps a partition
SWEEP_FWD = [(128, 128, 4, 2, True, {"WARP_SPEC": True})] + [
    (128, 64, 4, st, True, {"WARP_SPEC": True}) for st in (2, 3)
]
SWEEP_FWD += [(64, 64, 4, 2, True, {"WARP_SPEC": True})]
SWEEP_FWD += [
    (128, n, 4, st, True, {"WARP_SPEC": True, "BOUNDED": True}) for n, st in ((128, 2), (64, 2), (64, 3), (64, 4))
]
SWEEP_FWD += [(128, n, 8, st, True) for n in (64, 128) for st in (2, 3, 4)] + [(128, 32, 8, 3, True)]
SWEEP_FWD += [(64, n, 4, st, True) for n in (32, 64) for st in (2, 3)]
SWEEP_FWD += [(64, 32, 4, st, True, {"Q_PREPASS": True}) for st in (2, 3)]
SWEEP_FWD += [(64, 64, 4, 2, True, {"Q_PREPASS": True}), (128, 64, 8, 2, True, {"Q_PREPASS": True})]
SWEEP_FWD += [(64, 32, 4, st, True, {"maxnreg": 168}) for st in (2, 3)]
SWEEP_FWD += [(64, 64, 4, 2, True, {"maxnreg": 168}), (64, 32, 4, 2, True, {"maxnreg": 128})]
SWEEP_FWD += [(64, 64, 4, 3, False), (128, 128, 8, 3, False)]
# rope_attention.GLUON_FWD's forward (kernels/attention_gluon.py: its key tiles and stages), timed after the rest
SWEEP_GLUON = [
    (attention_gluon.BLOCK_M, n, attention_gluon.NUM_WARPS, st, True, {"GLUON": True})
    for n, st in attention_gluon.SHAPES
] + [  # (its ping-pong form: attention_gluon.PINGPONG)
    (attention_gluon.BLOCK_M, n, attention_gluon.PINGPONG_WARPS, st, True, {"GLUON": True, "PINGPONG": True})
    for n, st in attention_gluon.SHAPES
]
# rope_attention_bwd.GLUON_DKDV's kernel (kernels/attention_gluon_bwd.py: 128-key blocks in 8 warps; its query tiles and
# stages), timed after the rest
SWEEP_GLUON_DKDV = [
    (attention_gluon_bwd.BWD_BLOCK_N, m, attention_gluon_bwd.BWD_WARPS, st, True, {"GLUON": True})
    for m, st in attention_gluon_bwd.BWD_SHAPES
] + [  # (its warp-specialised form: attention_gluon_bwd.BWD_PRODUCER; 32-query tiles, 64-query ones spill at D = 128)
    (attention_gluon_bwd.BWD_BLOCK_N, 32, attention_gluon.PINGPONG_WARPS, st, True, {"GLUON": True, "PRODUCER": True})
    for st in (2, 3, 4)
]
# rope_attention_bwd.GLUON_DQ's kernel (128-row query blocks in 8 warps; its key tiles and stages), timed after the rest
SWEEP_GLUON_DQ = [
    (attention_gluon_bwd.DQ_BLOCK_M, n, attention_gluon_bwd.DQ_WARPS, st, True, {"GLUON": True})
    for n, st in attention_gluon_bwd.DQ_SHAPES
]
# rope_attention_bwd.WARP_SPEC first: the query loop warp-specialised, 4 warps a partition
SWEEP_DKDV = [(128, m, 4, st, True, {"WARP_SPEC": True}) for m, st in ((32, 2), (16, 2), (16, 3))]
SWEEP_DKDV += [(128, m, 4, st, True, {"WARP_SPEC": True, "BOUNDED": True}) for m, st in ((32, 2), (16, 2), (16, 3))]
SWEEP_DKDV += [(128, m, 8, st, True) for m in (16, 32) for st in (2, 3)]
SWEEP_DKDV += [(64, m, w, 2, True) for m in (16, 32, 64) for w in (4, 8)] + [(64, 32, 4, 2, False)]
# rope_attention_bwd.WARP_SPEC first: the key loop warp-specialised (lse and delta from the delta kernel's blocked copy)
SWEEP_DQ = [(128, n, 4, st, True, {"WARP_SPEC": True}) for n, st in ((64, 2), (32, 2), (32, 3))]
SWEEP_DQ += [(128, n, 4, st, True, {"WARP_SPEC": True, "BOUNDED": True}) for n, st in ((64, 2), (32, 2), (32, 3))]
SWEEP_DQ += [(128, n, 8, st, True) for n in (16, 32, 64) for st in (2, 3)]
SWEEP_DQ += [(64, n, 4, st, True) for n in (32, 64) for st in (2, 3)] + [(128, 32, 8, 3, False)]
# rope_attention_bwd.DQ_ATOMIC: dk/dv adding dq's shares (a whole backward without the dq kernel)
SWEEP_ATOMIC = [(128, m, 8, st, True) for m in (16, 32) for st in (2, 3)] + [(64, m, 8, 2, True) for m in (16, 32)]
SWEEP_ATOMIC += [(64, 64, 8, 2, True), (128, 16, 8, 2, False)]


def sweep(
    args, q, k, v, positions, cu, flops, fwd=SWEEP_FWD, dkdv=SWEEP_DKDV, dq=SWEEP_DQ, atomic=SWEEP_ATOMIC,
    gluon=SWEEP_GLUON, gluon_dkdv=SWEEP_GLUON_DKDV, gluon_dq=SWEEP_GLUON_DQ,
) -> list[dict]:  # fmt: skip
    """Time every launch variant of the three kernels on the dense shape (GPU): what the autotuner chooses
    among, printed so that a new GPU's figures show which tiles to keep. Each variant is
    (sequence block, inner tile, warps, stages, TMA); the backward variants time the whole backward with the
    other kernel at a fixed launch; "dkdv+dq" the whole backward with dq by the dk/dv kernel's atomic adds. The
    Gluon kernels' variants (where they run) come last, as "fwd" and "dkdv": a kernel new to the GPU costs no other
    row. Each group's variants are compiled at once (dispatch.compile_ahead: a cold machine's sweep was
    compile-bound, one variant after another on one core) before they are timed one by one."""
    from kernels import rope_attention as ra
    from kernels import rope_attention_bwd as ra_bwd

    theta, scale = args.rope_theta, 1.0 / math.sqrt(q.shape[-1])
    do = torch.randn_like(q)
    out, lse, q_rot, k_rot = ra._rope_attention_fwd(q, k, v, positions, cu, theta, scale, save_rotated=True)
    rows, pending = [], []

    def timed(kernel, cfg, fn, kernel_flops):
        pending.append((kernel, cfg, fn, kernel_flops))

    def flush():  # (a group's variants compiled at once, then timed one by one)
        dispatch.compile_ahead([fn for _, _, fn, _ in pending])
        for variant in pending:
            time_one(*variant)
        pending.clear()

    def time_one(kernel, cfg, fn, kernel_flops):
        try:
            ms, _ = measure(fn, q.device.type, warmup_ms=args.warmup, rep_ms=args.rep)
            row = {"kernel": kernel, **cfg, "ms": ms, "tflops": kernel_flops / ms / 1e9}
        except Exception as e:  # noqa: BLE001 - a variant that does not fit (shared memory) is reported
            row = {"kernel": kernel, **cfg, "error": f"{type(e).__name__}: {str(e)[:60]}"}
        rows.append(row)
        save_sweep(args, rows, q.device)  # (as measured: a sweep stopped at its cap keeps what it had)
        cfg_s = " ".join(f"{k}={v}" for k, v in cfg.items())
        res = f"{row['ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s" if "ms" in row else row["error"]
        print(f"{kernel:7} {cfg_s:72} {res}", flush=True)

    for bm, bn, w, st, tma, *more in fwd:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, TMA=tma, **(more[0] if more else {}))
        fn = lambda cfg=cfg: ra._rope_attention_fwd(q, k, v, positions, cu, theta, scale, config=cfg)
        timed("fwd", cfg, fn, flops)
    flush()
    bwd_flops = (args.fwd_bwd_factor - 1) * flops
    for bn, bm, w, st, tma in atomic:
        cfg = dict(BLOCK_N=bn, BLOCK_M=bm, num_warps=w, num_stages=st, TMA=tma, DQ_ATOMIC=True)
        fn = lambda cfg=cfg: ra_bwd._rope_attention_bwd(
            do, q_rot, k_rot, v, out, lse, positions, cu, theta, scale, dkdv_config=cfg
        )
        timed("dkdv+dq", cfg, fn, bwd_flops)  # the whole backward, no dq kernel (first: the one never timed)
    flush()
    default_dq = dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)
    default_dkdv = dict(BLOCK_N=128, BLOCK_M=32, num_warps=8, num_stages=2)
    for bn, bm, w, st, tma, *more in dkdv:
        cfg = dict(BLOCK_N=bn, BLOCK_M=bm, num_warps=w, num_stages=st, TMA=tma, **(more[0] if more else {}))
        fn = lambda cfg=cfg: ra_bwd._rope_attention_bwd(
            do, q_rot, k_rot, v, out, lse, positions, cu, theta, scale, dkdv_config=cfg, dq_config=default_dq
        )
        timed("dkdv", cfg, fn, bwd_flops)  # the whole backward, dq fixed
    flush()
    for bm, bn, w, st, tma, *more in dq:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, TMA=tma, **(more[0] if more else {}))
        fn = lambda cfg=cfg: ra_bwd._rope_attention_bwd(
            do, q_rot, k_rot, v, out, lse, positions, cu, theta, scale, dkdv_config=default_dkdv, dq_config=cfg
        )
        timed("dq", cfg, fn, bwd_flops)  # the whole backward, dk/dv fixed
    flush()
    gluon_here = attention_gluon.refused(q.dtype, q.shape[-1], q.device, k, v) is None
    for bm, bn, w, st, tma, *more in gluon if gluon_here else ():
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, TMA=tma, **more[0])
        fn = lambda cfg=cfg: ra._rope_attention_fwd(q, k, v, positions, cu, theta, scale, config=cfg)
        timed("fwd", cfg, fn, flops)
    flush()
    for bn, bm, w, st, tma, *more in gluon_dkdv if gluon_here else ():  # (the Gluon dk/dv: the whole backward)
        cfg = dict(BLOCK_N=bn, BLOCK_M=bm, num_warps=w, num_stages=st, TMA=tma, **more[0])
        fn = lambda cfg=cfg: ra_bwd._rope_attention_bwd(
            do, q_rot, k_rot, v, out, lse, positions, cu, theta, scale, dkdv_config=cfg, dq_config=default_dq
        )
        timed("dkdv", cfg, fn, bwd_flops)
    flush()
    for bm, bn, w, st, tma, *more in gluon_dq if gluon_here else ():  # (the Gluon dq: the whole backward)
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, TMA=tma, **more[0])
        fn = lambda cfg=cfg: ra_bwd._rope_attention_bwd(
            do, q_rot, k_rot, v, out, lse, positions, cu, theta, scale, dkdv_config=default_dkdv, dq_config=cfg
        )
        timed("dq", cfg, fn, bwd_flops)
    flush()
    for kernel in ("fwd", "dkdv+dq", "dkdv", "dq"):
        ok = [r for r in rows if r["kernel"] == kernel and "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            print(f"best {kernel}: " + " ".join(f"{k}={v}" for k, v in best.items() if k not in ("kernel",)))
            print(f"  (as the default: {as_default(best)})")
    return rows


# where a sweep's winner goes to become the default launch: its sequence block, and its (inner tile, warps, stages)
# among the autotuned shapes of its kind (the warp-specialised ones apart)
_AS_DEFAULT = {
    "fwd": ("fwd", "BLOCK_M", "BLOCK_N", "attention_tiles._FWD_SHAPES", "rope_attention._FWD_WS_SHAPES"),
    "dkdv": ("dkdv", "BLOCK_N", "BLOCK_M", "attention_tiles._BWD_SHAPES", "rope_attention_bwd._BWD_WS_SHAPES"),
    "dkdv+dq": ("dkdv", "BLOCK_N", "BLOCK_M", "attention_tiles._BWD_SHAPES", None),
    "dq": ("dq", "BLOCK_M", "BLOCK_N", "attention_tiles._BWD_SHAPES", "rope_attention_bwd._DQ_WS_SHAPES"),
}


def as_default(row: dict) -> str:
    """What makes a sweep's row the default launch: attention_tiles.SEQ_BLOCKS, the autotuned shapes, the switches;
    for a Gluon kernel its switches and tile."""
    if row.get("GLUON") and row["kernel"] == "dq":
        tile = f"({row['BLOCK_N']}, {row['num_stages']})"
        return f"rope_attention_bwd.GLUON_DQ = True, attention_gluon_bwd.DQ_TILES[head dim] = {tile}"
    if row.get("GLUON") and row["kernel"] == "dkdv":
        tile = f"({row['BLOCK_M']}, {row['num_stages']})"
        if row.get("PRODUCER"):
            said = "rope_attention_bwd.GLUON_DKDV = True, attention_gluon_bwd.BWD_PRODUCER = True"
            return f"{said}, attention_gluon_bwd.BWD_PRODUCER_TILES[head dim] = {tile}"
        return f"rope_attention_bwd.GLUON_DKDV = True, attention_gluon_bwd.BWD_TILES[head dim] = {tile}"
    if row.get("GLUON"):
        tile = f"({row['BLOCK_N']}, {row['num_stages']})"
        if row.get("PINGPONG"):
            said = "rope_attention.GLUON_FWD = True, attention_gluon.PINGPONG = True"
            return f"{said}, attention_gluon.PINGPONG_TILE = {tile}"
        return f"rope_attention.GLUON_FWD = True, attention_gluon.DEFAULT_TILE = {tile}"
    key, seq, inner, shapes, ws_shapes = _AS_DEFAULT[row["kernel"]]
    where = ws_shapes if row.get("WARP_SPEC") else shapes
    said = [f"attention_tiles.SEQ_BLOCKS[{key!r}] = {row[seq]}", f"({row[inner]}, {row['num_warps']}, "
            f"{row['num_stages']}) in {where}"]  # fmt: skip
    said += [f"{name}={row[name]}" for name in ("TMA", "WARP_SPEC", "DQ_ATOMIC", "Q_PREPASS", "maxnreg") if name in row]
    return ", ".join(said)


def main() -> None:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--peak-tflops", type=float, default=None, help="matmul roofline (default: measured on the device)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile peer row")
    p.add_argument(
        "--fwd-bwd-factor", type=float, default=3.5,
        help="fwd+bwd FLOPs as a multiple of the forward (FlashAttention's convention: the backward 2.5x)",
    )  # fmt: skip
    p.add_argument("--no-backward", dest="backward", action="store_false")
    p.add_argument("--no-mixed", dest="mixed", action="store_false", help="skip the packed mixed-length batch")
    p.add_argument("--warmup", type=int, default=25, help="ms")
    p.add_argument("--rep", type=int, default=100, help="ms")
    p.add_argument("--json", type=str, default=None, help="write the figures here")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="GPU: instead of the comparison, time every launch variant of the forward, dk/dv and dq kernels",
    )
    p.add_argument(
        "--ptxas",
        action="store_true",
        help="no timing: compile each autotune config for sm_90 offline "
        "and print registers / spills / shared memory for --head-dim, --dtype, --heads/--kv-heads",
    )
    p.add_argument("--no-tma", dest="tma", action="store_false", help="--ptxas: the pointer-load variants")
    p.add_argument(
        "--only", nargs="+", default=None, metavar="WORD",
        help="time only the rows whose name holds one of these words (and ours at its defaults): --only Gluon SDPA",
    )  # fmt: skip
    p.add_argument("--sweep-gluon", action="store_true", help="--sweep: the Gluon kernels' variants alone")
    args = p.parse_args()
    check_flags(p, args, positive=("batch", "heads", "kv_heads", "seqlen", "head_dim", "rep"),
                positive_numbers=("peak_tflops", "fwd_bwd_factor", "rope_theta"))  # fmt: skip
    if args.heads % (args.kv_heads or args.heads):
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads} (each serves a group of heads)")
    if args.ptxas:
        ptxas_report(args.head_dim, args.dtype, args.heads // (args.kv_heads or args.heads), tma=args.tma)
        return

    cuda = torch.cuda.is_available()
    if not cuda:
        print("No CUDA device: tiny CPU run of the reference path; GPU figures need a CUDA device.")
        group = args.heads // (args.kv_heads or args.heads)  # (GQA: the same group of query heads per KV head)
        args.heads, args.kv_heads = (4, None) if group == 1 else (2 * group, 2)
        args.batch, args.seqlen, args.head_dim, args.dtype = 2, 64, 64, "fp32"
        args.mixed = False
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype]
    hq, hkv = args.heads, args.kv_heads or args.heads
    b, t, d = args.batch, args.seqlen, args.head_dim
    torch.manual_seed(0)

    table: list[dict] = []
    n = b * t
    q = torch.randn(n, hq, d, device=device, dtype=dtype)
    k = torch.randn(n, hkv, d, device=device, dtype=dtype)
    v = torch.randn(n, hkv, d, device=device, dtype=dtype)
    positions = torch.arange(t, device=device).repeat(b)
    cu = torch.arange(0, n + 1, t, device=device, dtype=torch.int32)
    if not args.ptxas:
        fill_peaks(args, device, tflops="peak_tflops")
    if cuda:
        check_against_reference(hq, hkv, d, dtype, args.rope_theta)
    if args.sweep:
        if not cuda:
            raise SystemExit("--sweep times GPU launch variants: it needs a CUDA device")
        only = dict(fwd=[], dkdv=[], dq=[], atomic=[]) if args.sweep_gluon else {}
        sweep(args, q, k, v, positions, cu, causal_flops([t] * b, hq, d), **only)
        return
    rows = select_rows(make_rows(args, q, k, v, positions, cu, b, t), args.only)
    if not cuda:
        rows = {"reference (CPU path)": rows["ours (rotary fused)"]}
        cos, sin = rotary_tables(positions, d, args.rope_theta, dtype)
        rows["HF rotary + SDPA"] = functools.partial(sdpa_with_rotary, cos=cos, sin=sin, batch=b, seqlen=t)
    label = f"B{b} H{hq}/{hkv} T{t} D{d} {args.dtype}"
    run_rows(rows, q, k, v, causal_flops([t] * b, hq, d), args, cuda, table, label)
    if cuda:  # the share of ours spent in the once-per-token k rotation (memory-bound: read k, write k_rot)
        k_out = torch.empty_like(k)
        ms, _ = measure(
            lambda: launch_rotary(k, v, positions, rope_theta=args.rope_theta, k_out=k_out),
            "cuda",
            warmup_ms=args.warmup,
            rep_ms=args.rep,
        )
        gbps = 2 * k.numel() * k.element_size() / ms / 1e6
        table.append({"case": label, "impl": f"  of ours: k rotary ({gbps:.0f} GB/s)", "fwd_ms": ms})

    if args.mixed:
        # a packed batch of mixed lengths, about as many tokens as the dense case
        lengths = []
        gen = torch.Generator().manual_seed(1)
        while sum(lengths) < n:
            lengths.append(int(torch.randint(64, 2 * t, (1,), generator=gen)))
        lengths[-1] -= sum(lengths) - n
        lengths = [x for x in lengths if x > 0]
        cu_m = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu_m[1:] = torch.tensor(lengths).cumsum(0)
        cu_m = cu_m.to(device)
        pos_m = torch.cat([torch.arange(x) for x in lengths]).to(device)
        flops = causal_flops(lengths, hq, d)
        label_m = f"packed {len(lengths)} seqs, {n} tok, max {max(lengths)}"
        ours = {"ours varlen": lambda q, k, v: rope_attention(q, k, v, pos_m, cu_m, rope_theta=args.rope_theta)}
        run_rows(ours, q, k, v, flops, args, cuda, table, label_m, roofline=False)
        # SDPA pads every sequence to the longest one (useful FLOPs only are counted)
        tmax = max(lengths)
        qp = torch.randn(len(lengths) * tmax, hq, d, device=device, dtype=dtype)
        kp = torch.randn(len(lengths) * tmax, hkv, d, device=device, dtype=dtype)
        vp = torch.randn(len(lengths) * tmax, hkv, d, device=device, dtype=dtype)
        pos_p = torch.arange(tmax, device=device).repeat(len(lengths))
        cos_p, sin_p = rotary_tables(pos_p, d, args.rope_theta, dtype)
        from torch.nn.attention import SDPBackend

        padded = {
            f"SDPA {name} + HF rotary, padded": functools.partial(
                _padded_sdpa, cos=cos_p, sin=sin_p, batch=len(lengths), seqlen=tmax, backend=be
            )
            for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION))
        }
        run_rows(padded, qp, kp, vp, flops, args, cuda, table, label_m)

    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {device_name}, torch {torch.__version__}; causal FLOPs, fwd+bwd = {args.fwd_bwd_factor} x fwd")
    print_table(table)
    for pick in autotune_picks():  # (which tiles, stages and BOUNDED or not the rows above ran: what to keep)
        print(f"autotuned {pick['kernel']:8} {pick['key']}: {pick['config']}")
    save(args, table, cuda)
    # (ours' variants are indented rows: "  ours, warp-specialised")
    failed = [
        f"{e['case']} {e['impl']}: {e['error']}" for e in table if "error" in e and e["impl"].lstrip().startswith(OURS)
    ]
    exit_if_ours_failed("bench_rope_attention", failed)


def autotune_picks() -> list[dict]:
    """Each autotuned attention kernel's pick in this process, by autotune key (head dim, group, token bucket, the
    switches, the sequence block, the inputs' dtypes): which inner tile, warps, stages and, warp-specialised, whether
    BOUNDED won. Empty under the interpreter (nothing is autotuned there)."""
    from kernels import rope_attention as ra
    from kernels import rope_attention_bwd as ra_bwd

    tuned = {"fwd": ra._fwd_tuned, "fwd ws": ra._fwd_ws_tuned, "dkdv": ra_bwd._dkdv_tuned}
    tuned.update({"dkdv ws": ra_bwd._dkdv_ws_tuned, "dq": ra_bwd._dq_tuned, "dq ws": ra_bwd._dq_ws_tuned})
    return [
        {"kernel": name, "key": str(key), "config": str(config)}
        for name, autotuner in tuned.items()
        for key, config in autotuner.cache.items()
    ]


def save_sweep(args, rows: list[dict], device) -> None:
    """The sweep's variants so far as JSON at --json."""
    if getattr(args, "json", None):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        write_json(args.json, {"device": name, "args": vars(args), "sweep": rows}, indent=1)


def save(args, table: list[dict], cuda: bool) -> None:
    """The figures so far as JSON at --json (rewritten after each row)."""
    if args.json:
        device_name = torch.cuda.get_device_name() if cuda else "cpu"
        write_json(args.json, {"device": device_name, "torch": torch.__version__, "args": vars(args), "rows": table,
                               "autotuned": autotune_picks()}, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
