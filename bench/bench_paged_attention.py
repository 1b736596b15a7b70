"""Benchmark paged decode attention: ours vs the eager reference (gather + attention) vs torch.compile vs the
peers' decode over an unpaged cache (transformers' static cache through SDPA; flash-attn's kvcache kernel when
installed).

    python bench/bench_paged_attention.py [--json out.json] [--bandwidth-tbs TBS] [--shapes NAME ...] [--sweep]
        [--kv-dtype fp8]

Shapes are Llama-2-13B decode steps (Hq = Hkv = 40, D = 128, block 16, bf16) plus a GQA one; every
sequence of a batch has the same context length. Reported: time (ms), GB/s of KV read
(context * Hkv * D * 2 tensors * bytes), its fraction of the copy bandwidth (measured at the start: about 3.0
TB/s on an H100, 4.3 on an H200), the roofline floor and the extra peak memory of each variant.
Also times rope_write_kv for the batch, and the engine's decode step's attention (rope_decode_attention: the rope
write fused into ours, "fused") against the two kernels it replaces. On a GPU, ours, SDPA, the rope write and the
fused step are also timed as replays of a CUDA graph ("ours_graph", "sdpa_graph", the "graph" columns): the GPU's
own time, as inside the engine's decode graphs; the per-call columns (triton's do_bench) also count a call's host
overhead where it exceeds the kernel (the first H200 run: ours 0.072 ms per call at batch 1, 4,096 tokens, against
a 0.020 ms floor).
--kv-dtype fp8: the cache in float8 e4m3 (the generator's kv_cache_dtype="fp8"), half the bytes of bf16.
--sweep also times the decode kernel's launch variants (tile, warps, stages, tl.dot or not) per
shape and prints the fastest, to tune kernels.paged_attention.decode_config on a new GPU.
--ptxas needs no GPU: it compiles the kernels for sm_90 at each shape's launch config and prints
shared memory, registers, spills and the global-load mix from ptxas (bundled with Triton).
Without a GPU it runs a tiny shape on CPU (reference eager only) and says that GPU figures need CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import check_close, check_flags, fill_peaks, graph_ms, l2_copies, measure, ptxas_info, write_json  # noqa: E402
from engine.kv_cache import resolve_cache_dtype  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.dispatch import compile_ahead  # noqa: E402
from kernels.paged_attention import paged_decode_attention, rope_decode_attention, rope_write_kv  # noqa: E402

# name: (batch, context, Hq, Hkv, D, block_size)
SHAPES = {
    "13b-b64-c384": (64, 384, 40, 40, 128, 16),
    "13b-b8-c4096": (8, 4096, 40, 40, 128, 16),
    "13b-b1-c4096": (1, 4096, 40, 40, 128, 16),
    "13b-b1-c384": (1, 384, 40, 40, 128, 16),  # the batch-1 rollout's table (prompt 128 + 256 new tokens)
    "13b-b256-c1024": (256, 1024, 40, 40, 128, 16),
    "13b-b32-c2048": (32, 2048, 40, 40, 128, 16),
    "70b-gqa8-b32-c2048": (32, 2048, 64, 8, 128, 16),
}
CPU_SHAPES = {"tiny-b4-c100": (4, 100, 4, 2, 64, 16)}


def _make(batch, ctx, hq, hkv, d, block_size, dtype, device, cache_dtype=None):
    """Random caches (in cache_dtype, default dtype) with each sequence's blocks scattered over the pool."""
    per_seq = -(-ctx // block_size)
    num_blocks = batch * per_seq + 8
    k_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device).to(cache_dtype or dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device).to(cache_dtype or dtype)
    perm = torch.randperm(num_blocks, device=device)[: batch * per_seq]
    block_tables = perm.view(batch, per_seq).to(torch.int32)
    context_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, hq, d, dtype=dtype, device=device)
    return q, k_cache, v_cache, block_tables, context_lens


def _dense_peers(q, kc, vc, bt, ctx, dtype) -> dict:
    """Decode attention over an unpaged cache, as users run it today: transformers' static cache (K/V contiguous
    [batch, Hkv, context, D] in the model's dtype) through SDPA, one query per sequence; flash-attn's
    flash_attn_with_kvcache on the same cache when flash-attn is installed."""
    batch, hkv, d = q.shape[0], kc.shape[2], kc.shape[3]

    def dense(c):  # [B, ctx, Hkv, D] in the model's dtype (gathered as bytes: float8 indexing is not everywhere)
        rows = c.view(torch.uint8)[bt.long()] if c.element_size() == 1 else c[bt.long()]
        return rows.view(c.dtype).reshape(batch, -1, hkv, d)[:, :ctx].to(dtype)

    kd, vd = dense(kc), dense(vc)
    kt, vt = kd.transpose(1, 2).contiguous(), vd.transpose(1, 2).contiguous()
    gqa = q.shape[1] != hkv
    peers = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kt, vt, enable_gqa=gqa)}
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return peers
    seqlens = torch.full((batch,), ctx, dtype=torch.int32, device=q.device)
    peers["flash_attn"] = lambda: flash_attn_with_kvcache(q[:, None], kd, vd, cache_seqlens=seqlens)
    return peers


def _ms(fn, device) -> float:
    return measure(fn, device, rep_ms=500 if torch.device(device).type != "cuda" else 100)[0]


def _kernel_ms(fns, device) -> float:
    """A launch variant's time, `fns` its calls on each input set (_input_sets): on a GPU as CUDA graph replays
    rotating over them (the kernel's own time, as in the decode graphs, its KV read from memory, not the L2: timed per
    call, a variant faster than its host overhead would rank by that overhead), elsewhere per call on the first set."""
    return graph_ms(fns) if torch.device(device).type == "cuda" else _ms(fns[0], device)


def _input_sets(first, shape, dtype, cache_dtype, kv_bytes) -> list[tuple]:
    """`first` and further random inputs of the same shape, 4x the L2 in all (bench.common.l2_copies, at most 64 sets:
    batch 1 at 384 tokens is 7.9 MB, 8 copies were one L2's worth): a graph timing that rotates over them reads no
    call's KV from the cache the last call left."""
    device = first[0].device
    return [first] + [_make(*shape, dtype, device, cache_dtype) for _ in range(l2_copies(kv_bytes) - 1)]


def _bench_shape(name, batch, ctx, hq, hkv, d, bs, *, dtype, device, bw, compile_, cache_dtype=None) -> dict:
    q, kc, vc, bt, cl = _make(batch, ctx, hq, hkv, d, bs, dtype, device, cache_dtype)
    kv_bytes = batch * ctx * hkv * d * 2 * kc.element_size()
    variants, read = {}, {}  # read: a variant's KV bytes where they differ from kv_bytes
    if device.type == "cuda":
        variants["ours"] = lambda: paged_decode_attention(q, kc, vc, bt, cl, max_context_len=ctx)
        if kc.dtype != dtype:  # an fp8 cache: ours over the same context in the model's dtype, side by side
            kc16, vc16 = kc.to(dtype), vc.to(dtype)
            name16 = "ours_" + str(dtype).replace("torch.", "")
            variants[name16] = lambda: paged_decode_attention(q, kc16, vc16, bt, cl, max_context_len=ctx)
            read[name16] = kv_bytes * kc16.element_size() // kc.element_size()
    variants["eager"] = lambda: reference.paged_decode_attention(q, kc, vc, bt, cl)
    try:  # what transformers' static cache runs (+ flash-attn); a peer failing here must not stop ours
        variants.update(_dense_peers(q, kc, vc, bt, ctx, dtype))
    except Exception as e:
        print(f"{name}: the dense-cache peers could not be set up ({type(e).__name__}: {e})")
    for peer in ("sdpa", "flash_attn"):
        if kc.dtype != dtype and peer in variants:  # (their cache is in the model's dtype)
            read[peer] = kv_bytes * torch.empty((), dtype=dtype).element_size() // kc.element_size()
    if device.type == "cuda" and compile_:
        compiled = torch.compile(reference.paged_decode_attention)
        variants["compile"] = lambda: compiled(q, kc, vc, bt, cl, max_context_len=ctx)  # (no sync: one graph)
    row = {"shape": name, "batch": batch, "context": ctx, "hq": hq, "hkv": hkv, "head_dim": d, "block": bs}
    row.update({"dtype": str(dtype), "kv_dtype": str(kc.dtype), "kv_bytes": kv_bytes, "floor_ms": kv_bytes / bw * 1e3})
    want = variants["eager"]().float()  # before timing: ours and the peers against the eager reference (fp32 inside)
    for vname in ("ours", "sdpa", "flash_attn"):
        if vname in variants:
            err = (variants[vname]().float().reshape(want.shape) - want).abs().max().item()  # the same fp8 values
            row["max_abs_err" if vname == "ours" else f"{vname}_max_abs_err"] = err
            print(f"{name}: {vname} vs eager reference, max |err| = {err:.2e}")
            check_close(f"paged decode {name} ({vname})", err / want.abs().max().item(), dtype)
    for vname, fn in variants.items():
        try:
            ms = _ms(fn, device)
            row[f"{vname}_ms"] = ms
            row[f"{vname}_gbs"] = read.get(vname, kv_bytes) / (ms * 1e-3) / 1e9
            row[f"{vname}_mem_mb"] = measure(fn, device)[1] / 2**20
        except Exception as e:  # a failing peer (OOM, compile error) must not hide the other figures
            print(f"{name} {vname}: failed ({type(e).__name__}: {e})")
    if device.type == "cuda":
        # The decode-step companion: rotary + KV write of one token per sequence; and both fused into ours.
        k1 = torch.randn(batch, hkv, d, dtype=dtype, device=device)
        pos, slots = _new_token(bt, cl, bs)
        row["rope_write_ms"] = _ms(lambda: rope_write_kv(q, k1, k1, pos, kc, vc, slots), device)
        two = paged_decode_attention(rope_write_kv(q, k1, k1, pos, kc, vc, slots), kc, vc, bt, cl).float()
        fused = lambda: rope_decode_attention(q, k1, k1, pos, kc, vc, slots, bt, cl, max_context_len=ctx, config=_FUSED)
        err = (fused().float() - two).abs().max().item()
        print(f"{name}: fused step vs rope write + ours, max |err| = {err:.2e}")
        check_close(f"paged decode {name} (fused step)", err / two.abs().max().item(), dtype)
        row["fused_ms"] = _ms(fused, device)
        _graph_rows(row, (q, kc, vc, bt, cl), (batch, ctx, hq, hkv, d, bs), dtype, cache_dtype, read, kv_bytes)
    return row


_FUSED = {"fuse_rope": 1}  # (decode_config's default runs the two kernels)


def _new_token(bt: torch.Tensor, cl: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and slots of a decode step's new tokens: each context's last position."""
    pos = cl.to(torch.int64) - 1
    return pos, bt.gather(1, (pos // bs)[:, None])[:, 0].to(torch.int64) * bs + pos % bs


def _graph_rows(row, first, shape, dtype, cache_dtype, read, kv_bytes) -> None:
    """ours and SDPA (and the rope write) timed as replays of a CUDA graph (bench.common.graph_ms): the GPU's time,
    as a decode step under CUDA graphs sees it, where do_bench's per-call timing also counts each call's host
    overhead. Inputs rotate among copies totalling 4x the L2 (_input_sets) so no call reads the last one's KV from
    cache."""
    batch, ctx, hq, hkv, d, bs = shape
    try:
        sets = _input_sets(first, shape, dtype, cache_dtype, kv_bytes)
        ours = [lambda s=s: paged_decode_attention(*s, max_context_len=ctx) for s in sets]
        row["ours_graph_ms"] = graph_ms(ours)
        row["ours_graph_gbs"] = read.get("ours", kv_bytes) / (row["ours_graph_ms"] * 1e-3) / 1e9
        peers = [_dense_peers(*s[:4], ctx, dtype)["sdpa"] for s in sets]
        row["sdpa_graph_ms"] = graph_ms(peers)
        row["sdpa_graph_gbs"] = read.get("sdpa", kv_bytes) / (row["sdpa_graph_ms"] * 1e-3) / 1e9
        k1 = torch.randn(batch, hkv, d, dtype=dtype, device=first[0].device)
        writes, fused = [], []
        for q, kc, vc, bt, cl in sets:
            pos, slots = _new_token(bt, cl, bs)
            writes.append(lambda q=q, kc=kc, vc=vc, slots=slots, pos=pos: rope_write_kv(q, k1, k1, pos, kc, vc, slots))
            fused.append(lambda q=q, kc=kc, vc=vc, bt=bt, cl=cl, slots=slots, pos=pos: rope_decode_attention(
                q, k1, k1, pos, kc, vc, slots, bt, cl, max_context_len=ctx, config=_FUSED))  # fmt: skip
        row["rope_write_graph_ms"] = graph_ms(writes)
        row["fused_graph_ms"] = graph_ms(fused)
    except Exception as e:  # (a failure here must not lose the per-call figures above)
        print(f"{row['shape']}: graph timing failed ({type(e).__name__}: {e})")


def _sweep(name, batch, ctx, hq, hkv, d, bs, *, dtype, device, bw, cache_dtype=None) -> list[dict]:
    """Each launch variant timed as graph replays over input sets 4x the L2 in all (_input_sets, _kernel_ms)."""
    first = _make(batch, ctx, hq, hkv, d, bs, dtype, device, cache_dtype)
    kv_bytes = batch * ctx * hkv * d * 2 * first[1].element_size()
    sets = _input_sets(first, (batch, ctx, hq, hkv, d, bs), dtype, cache_dtype, kv_bytes)
    results = []
    variants = [
        {"block_n": block_n, "num_warps": warps, "num_stages": stages, "dot_min_group": dot_min}
        for block_n, warps, stages, dot_min in itertools.product((32, 64, 128), (4, 8), (1, 2, 3), (1, 2))
    ]
    launch = lambda cfg: [lambda s=s: paged_decode_attention(*s, max_context_len=ctx, config=cfg) for s in sets]  # noqa: E731
    compile_ahead([launch(cfg)[0] for cfg in variants])  # (all at once: one by one, a cold sweep was compile-bound)
    for cfg in variants:
        try:
            ms = _kernel_ms(launch(cfg), device)
        except Exception as e:  # out of shared memory / registers for this variant
            print(f"{name} {cfg}: failed ({type(e).__name__})")
            continue
        results.append({"shape": name, **cfg, "ms": ms, "tbs": kv_bytes / (ms * 1e-3) / 1e12})
        print(f"{name} {cfg}: {ms:.4f} ms {results[-1]['tbs']:.2f} TB/s", flush=True)  # (a run stopped at its cap)
    results.sort(key=lambda r: r["ms"])
    print(f"fastest launch variants of {name}:")
    for r in results[:5]:
        print(f"  {name:<20} {r['ms']:.4f} ms {r['tbs']:.2f} TB/s ({r['tbs'] * 1e12 / bw * 100:.0f}%) {r}")
    return results + _split_sweep(name, sets, ctx, kv_bytes, device)


def _split_sweep(name, sets, ctx, kv_bytes, device) -> list[dict]:
    """The default launch at each min_split_tokens (how many context splits, and so whether the merge kernel runs),
    timed over the input sets `sets` as _sweep's variants: rows {"shape", "min_split_tokens", "splits", "ms", "tbs"},
    fastest first."""
    import triton

    import kernels.paged_attention as pa
    from kernels.dispatch import sm_count

    q, kc = sets[0][0], sets[0][1]
    cfg = pa.decode_config(q.shape[1] // kc.shape[2], triton.next_power_of_2(q.shape[2]), kc.element_size())
    rows = []
    for tokens in (64, 128, 256, 512, 1024, 4096):
        splits = pa.choose_num_splits(q.shape[0], kc.shape[2], ctx, cfg["block_n"], sm_count(q.device), tokens)
        if rows and splits == rows[-1]["splits"]:
            continue  # (the same launch as the last one)
        config = {"min_split_tokens": tokens}
        fns = [lambda s=s, c=config: paged_decode_attention(*s, max_context_len=ctx, config=c) for s in sets]
        ms = _kernel_ms(fns, device)
        rows.append({"shape": name, "min_split_tokens": tokens, "splits": splits, "ms": ms,
                     "tbs": kv_bytes / (ms * 1e-3) / 1e12})  # fmt: skip
        print(f"{name} min_split_tokens {tokens} ({splits} split{'s' * (splits > 1)}): {ms:.4f} ms", flush=True)
    return sorted(rows, key=lambda r: r["ms"])


def ptxas_report(
    shapes: dict, dtype: torch.dtype, arch: int = 90, cache_dtype: torch.dtype | None = None, pdl: bool = False
) -> list[dict]:
    """Registers / spills / shared memory of the decode kernel (alone and with the rope write fused in) and the
    rope-write kernel at each shape's default config (the cache in cache_dtype, default dtype); pdl: the kernels as
    decode_config's `pdl` launches them (programmatic dependent launch)."""
    import triton

    import kernels.paged_attention as pa
    from kernels import rotary

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv"}
    tname, cname = names[dtype], names[cache_dtype or dtype]
    cache_elem = torch.empty((), dtype=cache_dtype or dtype).element_size()
    rows = []
    for name, (batch, ctx, hq, hkv, d, bs) in shapes.items():
        group, block_d = hq // hkv, triton.next_power_of_2(d)
        cfg = pa.decode_config(group, block_d, cache_elem)
        use_dot = group >= cfg["dot_min_group"]
        splits = pa.choose_num_splits(batch, hkv, ctx, cfg["block_n"], 132)  # H100 SXM
        types = {n: "i32" for n in pa._paged_decode_kernel.arg_names}
        types.update({n: f"*{tname}" for n in ("Q", "O")} | {n: f"*{cname}" for n in ("K", "V")})
        types.update({"BT": "*i32", "CL": "*i32", "WS_M": "*fp32", "WS_L": "*fp32", "WS_ACC": "*fp32"})
        types.update({"KN": f"*{tname}", "VN": f"*{tname}", "POS": "*i64", "SLOT": "*i64", "INV_FREQ": "*fp32"})
        types["scale_log2e"] = "fp32"
        consts = dict(
            HEAD_DIM=d, BLOCK_D=block_d, GROUP=group, BLOCK_SIZE=bs, BLOCK_N=cfg["block_n"], NUM_SPLITS=splits,
            GROUP_PAD=max(16, triton.next_power_of_2(group)) if use_dot else triton.next_power_of_2(group),
            USE_DOT=use_dot, UPCAST=dtype == torch.float32, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
            PDL=pdl,
        )  # fmt: skip
        for kernel, fused in (("decode", False), ("decode_rope", True)):  # (rope_decode_attention: NEW_KV)
            info = ptxas_info(pa._paged_decode_kernel, types, {**consts, "NEW_KV": fused}, cfg["num_warps"],
                              cfg["num_stages"], arch)  # fmt: skip
            rows.append({"shape": name, "kernel": kernel, "splits": splits, **cfg, **info})
        types = {n: "i32" for n in rotary._rotary_kernel.arg_names}
        types.update({n: f"*{tname}" for n in ("Q", "QO", "K", "KO", "V")} | {n: f"*{cname}" for n in ("KC", "VC")})
        types.update({"POS": "*i64", "SLOT": "*i64", "INV_FREQ": "*fp32"})
        consts = dict(HQ=hq, HKV=hkv, **rotary.launch_shape(batch, hq, hkv, d, 132)[1], CACHE_BLOCK=bs, ROTATE=True,
                      WRITE_K=False, WRITE_CACHE=True, PDL=pdl)  # fmt: skip
        info = ptxas_info(rotary._rotary_kernel, types, consts, 4, 1, arch)
        rows.append({"shape": name, "kernel": "rope_write", **info})
    for r in rows:
        print("  " + " ".join(f"{k}={v}" for k, v in r.items()))
    return rows


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    cache_dtype = resolve_cache_dtype(args.kv_dtype, dtype, device)  # a clear error on GPUs without fp8
    if args.ptxas:
        print(f"ptxas (sm_{args.arch}, no GPU needed), {args.dtype}, cache {cache_dtype}:")
        shapes = {k: v for k, v in SHAPES.items() if not args.shapes or k in args.shapes}
        return ptxas_report(shapes, dtype, args.arch, cache_dtype)
    shapes = SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.shapes:
        shapes = {k: v for k, v in {**SHAPES, **CPU_SHAPES}.items() if k in args.shapes}
    if device.type != "cuda":
        print("no CUDA device: timing a tiny shape on CPU (reference only); GPU figures need a CUDA device")
    fill_peaks(args, device, bandwidth="bandwidth_tbs")
    bw = args.bandwidth_tbs * 1e12
    rows = []
    for name, shape in shapes.items():
        rows.append(
            _bench_shape(
                name, *shape, dtype=dtype, device=device, bw=bw, compile_=not args.no_compile, cache_dtype=cache_dtype
            )
        )
        _print(rows[-1:], args.bandwidth_tbs)  # as it is measured: a run stopped at its deadline keeps what it had
        _save(args.json, rows)
    if args.sweep and device.type == "cuda":
        for name, shape in shapes.items():
            rows.extend(_sweep(name, *shape, dtype=dtype, device=device, bw=bw, cache_dtype=cache_dtype))
            _save(args.json, rows)  # (each shape's variants as they are done: a run stopped at its cap keeps them)
    _print([r for r in rows if "kv_bytes" in r], args.bandwidth_tbs)
    if device.type == "cuda":
        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {_triton_version()}")
    return rows


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "n/a"


def _print(rows, tbs) -> None:
    head = f"{'shape':<20} {'KV MB':>8} {'floor ms':>9}"
    # ours, then ours over the same context in the model's dtype beside an fp8 cache (ours_bfloat16_ms; not ours_ms)
    others = {k[:-3] for r in rows for k in r if k.startswith("ours_") and k.endswith("_ms") and k != "ours_ms"}
    variants = ["ours", *sorted(others)]
    variants += ["eager", "compile", "sdpa"] + (["flash_attn"] if any("flash_attn_ms" in r for r in rows) else [])
    variants += ["sdpa_graph"] if any("sdpa_graph_ms" in r for r in rows) else []  # (beside ours_graph: GPU time)
    for v in variants:
        head += f" {v + ' ms':>11} {v + ' GB/s':>11} {'%' + str(tbs) + 'TB/s':>10} {'+MB':>8}"
    head += f" {'rope_write ms':>14} {'graph':>8} {'fused ms':>9} {'graph':>8}"
    print(head)
    for r in rows:
        line = f"{r['shape']:<20} {r['kv_bytes'] / 1e6:8.1f} {r['floor_ms']:9.4f}"
        for v in variants:
            ms = r.get(f"{v}_ms", float("nan"))
            gbs = r.get(f"{v}_gbs", float("nan"))
            frac = gbs / (tbs * 1e3) * 100 if not math.isnan(gbs) else float("nan")
            line += f" {ms:11.4f} {gbs:11.1f} {frac:9.1f}% {r.get(f'{v}_mem_mb', float('nan')):8.1f}"
        line += f" {r.get('rope_write_ms', float('nan')):14.4f} {r.get('rope_write_graph_ms', float('nan')):8.4f}"
        line += f" {r.get('fused_ms', float('nan')):9.4f} {r.get('fused_graph_ms', float('nan')):8.4f}"
        print(line)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    p.add_argument("--bandwidth-tbs", type=float, default=None, help="copy bandwidth for the roofline (TB/s; default: "
                   "measured on the device)")  # fmt: skip
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "fp8"], help="cache dtype (auto: --dtype)")
    p.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(SHAPES) + list(CPU_SHAPES)}")
    p.add_argument("--ptxas", action="store_true", help="compile for --arch and print ptxas register/spill use")
    p.add_argument("--arch", type=int, default=90, help="compute capability for --ptxas (default 90: H100)")
    p.add_argument("--sweep", action="store_true", help="also time the kernel's launch variants (GPU only)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to warm up)")
    args = p.parse_args(argv)
    check_flags(p, args, positive_numbers=("bandwidth_tbs",))
    unknown = [s for s in args.shapes or () if s not in {**SHAPES, **CPU_SHAPES}]
    if unknown:  # (else skipped without a word: a typo left an empty table and exit code 0)
        p.error(f"--shapes {' '.join(unknown)}: no such shape (known: {', '.join([*SHAPES, *CPU_SHAPES])})")
    _save(args.json, run(args))


def _save(path: Path | None, rows: list[dict]) -> None:
    write_json(path, rows)


if __name__ == "__main__":
    main()
