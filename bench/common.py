"""What every benchmark measures the same way: time per call and the extra peak memory of a call."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch


def _storages_alive(device_type: str = "cuda") -> set[int]:
    """Data pointers of the live tensors on this device type. What only looks like one is skipped: a weak proxy
    whose object is gone (isinstance raises ReferenceError) and a fake tensor (no data: torch.compile's caches keep
    some after a compile), which used to fail every later measurement of the bench."""
    import gc
    import warnings

    alive = set()
    with warnings.catch_warnings():  # (isinstance on a deprecated module alias warns: torch.distributed.reduce_op)
        warnings.simplefilter("ignore", FutureWarning)
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor) and o.device.type == device_type:
                    if type(o).__name__ in ("FakeTensor", "FunctionalTensor"):  # (torch warns on their data pointers)
                        continue
                    alive.add(o.untyped_storage().data_ptr())
            except (ReferenceError, RuntimeError):
                continue
    return alive


def _new_outputs(obj, before: set[int]):
    if isinstance(obj, torch.Tensor):
        return obj if obj.untyped_storage().data_ptr() not in before else None
    if isinstance(obj, (tuple, list)):
        return [_new_outputs(o, before) for o in obj]
    if isinstance(obj, dict):
        return [_new_outputs(o, before) for o in obj.values()]
    return None


def check_close(what: str, err: float, dtype: torch.dtype, tol: float | None = None) -> None:
    """Stop the bench before anything is timed when ours differs from the reference by more than `tol` (a relative
    error; default 2e-2 for bf16/fp16/fp8 inputs, 1e-3 for fp32): a wrong kernel's figures are not published."""
    tol = tol if tol is not None else (1e-3 if dtype in (torch.float32, torch.float64) else 2e-2)
    if not err <= tol:  # (NaN too)
        raise SystemExit(f"{what}: ours differs from the reference by {err:.3g} (more than {tol:g}): not timed")


def exit_if_ours_failed(what: str, failed: list[str]) -> None:
    """After a bench has printed and saved its figures: exit non-zero naming each case where ours raised while it was
    timed (a peer's failure is only reported). The exit code is all bench/run_gpu_suite.sh's summary keeps of a
    step: ours failing at the timed shape must not read "exit 0" there."""
    if failed:
        raise SystemExit(f"{what}: ours failed where it was timed: " + "; ".join(failed))


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def measure(fn, device, *, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 1) -> tuple[float, float]:
    """(milliseconds per call, extra peak bytes) of fn().

    CUDA: triton.testing.do_bench (L2 flushed between calls), after one call outside the measurement
    (compilation, autotuning); the extra memory is the peak allocated during one call above what was
    allocated before it, not counting the outputs it returns. CPU: after one untimed call, wall time over at
    least min_reps calls and rep_ms milliseconds; where min_reps is 1 and that first call alone outlasts rep_ms (one
    call of ours in Triton's interpreter does), it is the timing and no second call is made (the CPU run checks that a
    bench works, its kernels' times are the interpreter's); memory is not measured (nan).
    """
    if torch.device(device).type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        before = _storages_alive()
        out = fn()
        torch.cuda.synchronize()
        # the outputs are not extra memory, unless they live in storage that existed before the call (an in-place
        # gradient written into its input: Liger's cross-entropy)
        extra = torch.cuda.max_memory_allocated() - base - _nbytes(_new_outputs(out, before))
        del out
        ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return float(ms), float(max(extra, 0))
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if min_reps <= 1 and first >= rep_ms / 1000:
        return first * 1e3, float("nan")
    n, start = 0, time.perf_counter()
    while n < min_reps or time.perf_counter() - start < rep_ms / 1000:
        fn()
        n += 1
    return (time.perf_counter() - start) * 1e3 / n, float("nan")


# Bytes a graph timing's inputs should exceed (4x in all) so that no call reads the last one's data from the L2: an
# H200's L2 is 60 MiB (an H100's 50). bench_paged_attention.py and bench_decode_linear.py rotate their inputs by it.
L2_BYTES = 64 * 2**20


def l2_copies(nbytes: int, most: int = 64) -> int:
    """How many input sets of `nbytes` bytes each (the first among them) a CUDA graph timing rotates over so that
    together they hold at least 4x L2_BYTES and no call reads what the last one read from the L2: one where a set alone
    is that big, never more than `most` (each set is a launch in the captured graph: a set under 4x L2_BYTES / most, 4
    MiB at the default, a toy shape's, totals less). Memory stays bounded by the count itself: the sets total under
    4x L2_BYTES plus one set (about 256 MiB beyond the first set), whatever the size of one."""
    return max(1, min(most, -(-4 * L2_BYTES // max(1, nbytes))))


def graph_ms(fns, *, reps: int = 20) -> float:
    """Milliseconds per call of the CUDA work of `fns` (no-argument callables), captured once in turn into one CUDA
    graph and replayed `reps` times: the GPU's own time without the host's launch overhead, as a kernel runs inside
    the engine's decode graphs (do_bench times each call from the host: a call whose Python and launch cost more
    than its kernel is timed by its host). Several fns over different inputs keep one call's data out of the L2
    cache of the next."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # (compilation and autotuning outside the capture)
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (reps * len(fns))


def sync(device) -> None:
    """Wait for the device's queued work (a CUDA device; nothing on the CPU): before a wall-clock reading."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measured_copy_tbs(device) -> float:
    """TB/s of a device-to-device copy, counting bytes read plus written: the ceiling of a memory-bound kernel on
    this very device (an H100 SXM moves about 3.0, an H200 about 4.3; a datasheet's figure is not reached)."""
    cuda = torch.device(device).type == "cuda"
    n = (1 << 30) if cuda else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    reps = 20 if cuda else 5
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - t) / 1e12


def measured_read_tbs(device) -> float:
    """TB/s of reading a buffer once (a sum over 1 GiB of fp32, its one-number result written): what a kernel that
    mostly reads (decode, paged attention, log-probs, sampling) can reach, above the copy rate (measured_copy_tbs) on a
    GPU whose reads outrun its copies (an H200's SDPA decode read its KV at 106% of the copy rate)."""
    cuda = torch.device(device).type == "cuda"
    n = (1 << 28) if cuda else (1 << 24)
    a = torch.ones(n, dtype=torch.float32, device=device)
    for _ in range(3):
        a.sum()
    sync(device)
    reps = 20 if cuda else 5
    t = time.perf_counter()
    for _ in range(reps):
        a.sum()
    sync(device)
    return 4 * n * reps / (time.perf_counter() - t) / 1e12


def measured_matmul_tflops(device) -> float:
    """TFLOP/s of a dense 8192^3 bf16 matrix product on random data (the mean of ten after three warm-ups): the
    ceiling of a GEMM-bound kernel on this device (an H100 or H200 SXM about 720-790, not the datasheet's 990).
    On CPU, a 512^3 fp32 product (a smoke figure)."""
    cuda = torch.device(device).type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 10) if cuda else (512, torch.float32, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def fill_peaks(args, device, *, bandwidth: str | None = None, tflops: str | None = None) -> None:
    """Set the args attributes named `bandwidth` (TB/s) and `tflops` (TFLOP/s) that are None (their flags' default)
    to this device's measured ceilings, and print them: a roofline drawn from the machine it runs on."""
    said = []
    if bandwidth and getattr(args, bandwidth) is None:
        setattr(args, bandwidth, float(f"{measured_copy_tbs(device):.4g}"))
        read = measured_read_tbs(device)  # (a read-dominated kernel's own ceiling, said beside)
        said.append(f"copy bandwidth {getattr(args, bandwidth):.2f} TB/s (a read alone {read:.2f})")
    if tflops and getattr(args, tflops) is None:
        setattr(args, tflops, float(f"{measured_matmul_tflops(device):.4g}"))
        said.append(f"matmul {getattr(args, tflops):.4g} TFLOP/s")
    if said:
        print(f"measured on {device_name(device)}: " + ", ".join(said) + " (the roofline's ceilings)")


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


def add_elementwise_args(
    ap, bandwidth_help: str = "copy bandwidth in TB/s for the floor (default: measured on the device)"
) -> None:
    """The flags every memory-bound kernel bench takes: --dtype, --bandwidth (TB/s; fill_peaks measures it when
    not given), --json."""
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--bandwidth", type=float, default=None, help=bandwidth_help)
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")


def check_flags(
    p: argparse.ArgumentParser,
    a: argparse.Namespace,
    *,
    positive: tuple[str, ...] = (),
    positive_numbers: tuple[str, ...] = (),
    json_attr: str | None = "json",
) -> None:
    """Refuse, right after parsing (before anything is built, measured or timed), each value a bench cannot run, by
    p.error: one line naming the flag, the value and what is allowed, exit code 2. The benches' common cases, by
    attribute name (the flag is --name with dashes):
    positive: sizes and counts, an int or a list of them (nargs), each >= 1 (0 is no default in disguise: it divided
    by zero or ended in an empty min(); the default None is let through);
    positive_numbers: a device's figure (a bandwidth in TB/s, a peak TFLOP/s) or a size in GiB or seconds, a finite
    number > 0 (0 divided the roofline by zero, a negative one printed negative floors; None: measured);
    json_attr: the attribute of --json, a file in an existing, writable directory (check_out_path: else the figures
    were lost after the run)."""
    for flag in positive:
        value = getattr(a, flag)
        if any(v is not None and v < 1 for v in (value if isinstance(value, list) else [value])):
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    for flag in positive_numbers:
        value = getattr(a, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{flag.replace('_', '-')} must be a finite number > 0, got {value}")
    if json_attr:
        check_out_path(p, "--json", getattr(a, json_attr))


def check_out_path(
    p: argparse.ArgumentParser, flag: str, path: str | None, lost: str = "the figures would be lost after the run"
) -> None:
    """Refuse by p.error an output file (`flag`'s value, None: not asked for) that the run could not write when it
    ends: no file in an existing directory (a directory itself was replaced by a file, or the write failed), or one
    that is not writable (a read-only directory or file: a PermissionError once everything had run)."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        p.error(f"{flag} {path}: not a file in an existing directory ({lost})")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        where = f"the directory {folder}" if not os.access(folder, os.W_OK) else "the file"
        p.error(f"{flag} {path}: {where} is not writable ({lost})")


def positive_ints(text: str) -> list[int]:
    """argparse type of a comma-separated list of integers >= 1 ("64,256": batch sizes, rows)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def tp_error(model: str, tp: int) -> str | None:
    """Why a TP degree cannot shard the named shape (engine.memory_plan.check_tp: it must divide the heads, key/value
    heads and MLP width), or None: for a bench's p.error, where the shards would be floor-divided or crash deep."""
    from engine.config import ModelConfig
    from engine.errors import InvalidInput
    from engine.memory_plan import check_tp

    try:
        check_tp({model: (ModelConfig.named(model), "lm")}, tp)
    except InvalidInput as e:
        return str(e)
    return None


def bench_device(args, **tiny_cpu) -> str:
    """ "cuda" if there is one; else "cpu", with args shrunk to tiny_cpu (a smoke run of the reference path)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        for name, value in tiny_cpu.items():
            setattr(args, name, value)
        print("no CUDA device: tiny CPU run (the reference path); GPU figures need a CUDA device.")
    fill_peaks(args, device, bandwidth="bandwidth" if hasattr(args, "bandwidth") else None)
    return device


def write_json(path, obj, indent: int = 2) -> None:
    """obj as standard JSON at path (a figure that is not finite, such as a peak memory no CPU measures, written as
    null: NaN is no JSON value, and jq or a browser's parser refuses it), by global rank 0 only under torchrun
    (nothing when path is None). Every bench's --json goes through it."""
    if path and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        with open(path, "w") as f:
            json.dump(_finite(obj), f, indent=indent, allow_nan=False, default=str)


def _finite(obj):
    """obj with every float that is not finite replaced by None, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def check_fits(what: str, need: int, device: torch.device) -> None:
    """Refuse a bench whose `need` bytes (its models' weights, a lower bound of what it allocates) exceed the device's
    free memory, or on a CPU the host's available memory, before any is allocated: a 13B shape run on a CPU by
    mistake is otherwise killed by the kernel's OOM killer without a word."""
    from engine.errors import InvalidInput
    from engine.memory_plan import host_available

    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], f"{device_name(device)} has free"
    else:
        free, where = host_available(), "this machine has available (the CPU runs it: no GPU given)"
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # (torchrun's processes share the host)
        if ranks > 1:
            need, what = need * ranks, f"{what} ({ranks} processes on this machine)"
    if need > free:
        raise InvalidInput(f"{what} need {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB {where}")


def run_main(main) -> None:
    """A bench's entry point: main() (an input error in one line, exit code 2: engine.errors.run_command), then leave
    torch.distributed if torchrun launched it."""
    from engine.errors import run_command

    try:
        run_command(main, os.path.basename(sys.argv[0]))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def save_json(path: str | None, rows: list[dict], args, device) -> None:
    """Write a bench's rows with the device, torch version and arguments (nothing when path is None)."""
    meta = {"device": device_name(device), "torch": torch.__version__, "args": vars(args)}
    write_json(path, {**meta, "rows": rows}, indent=1)


class _OfflineUtils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}  # (an H100's)

    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, 1024


class OfflineDriver:
    """Triton's driver for an sm_<arch> GPU that is not there: Triton's JIT specialises, caches and compiles (the
    bundled ptxas) as for a real launch, and launches do nothing, as does the tuner's timing (each candidate once,
    1 ms). What a machine without a GPU can say about compiling: how many kernels, how long, on which threads."""

    utils = _OfflineUtils()

    def __init__(self, arch: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target

    def launcher_cls(self, src, metadata):
        return lambda *args: None

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()  # (the timing loop's launch: a cache hit, or the compile Triton's tuner does itself)
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench


def ptxas_info(
    kernel,
    types: dict,
    consts: dict,
    warps: int,
    stages: int,
    arch: int = 90,
    divisible: tuple[str, ...] = (),
    maxnreg: int | None = None,
) -> dict:
    """Compile a jit kernel for sm_<arch> without a GPU and read ptxas -v: shared memory, registers, spills and
    the global loads by kind (cp.async ones are software-pipelined). The one performance signal a machine
    without a GPU has.

    types: argument name -> Triton type ("*bf16", "i32", "fp32") for every non-constexpr argument. Pointers and
    arguments named stride* are marked 16-divisible, as Triton's JIT specialises them in a real launch: without
    that the compiler cannot vectorise the loads, does not pipeline them, and the report describes a kernel
    that never runs. `divisible` names further integer arguments a real launch has 16-divisible (a width
    that masks the columns, say: 13824 is, and a mask the compiler cannot prove 16-aligned blocks vectors).
    maxnreg: a register cap per thread (Triton's launch option), which ptxas meets by spilling.
    loop_spills: the spill stores and loads (STL / LDL in the machine code) between the kernel's first and last
    warpgroup MMA: those its loops execute, against those of a prologue or epilogue run once (None without MMA).
    types may give a tensor descriptor as "tensordesc<bf16[64, 128]>" (its block; a Gluon kernel's names its shared
    layout too: "tensordesc<bf16[64, 128],NVMMASharedLayout(...)>", the layout's repr).
    exp2_in_flight: the exp2 operations (TTGIR) computed while a warpgroup MMA is in flight (after a wait that leaves
    one pending, before the next wait for none): FlashAttention-3's overlap of a warpgroup's softmax with its own
    tensor-core work; 0: none within a warpgroup (a warp-specialised kernel overlaps across warpgroups instead).
    wgmma_serialized: ptxas serialised the warpgroup MMAs (its advisory C7515), which undoes that overlap."""
    import collections
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kernel.is_gluon():  # (a Gluon kernel: its source goes through Gluon's front end, tensordesc types name layouts)
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource

    names = kernel.arg_names
    sig = {n: ("constexpr" if n in consts else types[n]) for n in names}
    div16 = [
        n for n in names if n not in consts and (sig[n].startswith("*") or n.startswith("stride") or n in divisible)
    ]
    src = ASTSource(
        fn=kernel,
        signature=sig,
        constexprs={(names.index(n),): v for n, v in consts.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div16},
    )
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    res = subprocess.run(
        [ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull], capture_output=True, text=True
    )
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    # (cp.async.bulk.tensor: a tensor descriptor's TMA copy)
    loads = collections.Counter(re.findall(r"\b(ld\.global[\w.]*|cp\.async\.c[ag][\w.]*|cp\.async\.bulk\.tensor)", ptx))
    # the global adds: per-element atomics from registers (red / atom) or a tensor descriptor's bulk reduce of a
    # whole tile from shared memory (cp.reduce.async.bulk.tensor: Hopper's TMA doing the adds in L2)
    reduces = collections.Counter(
        re.findall(r"\b(red\.global[\w.]*|atom\.global[\w.]*|cp\.reduce\.async\.bulk\.tensor)", ptx)
    )
    # the tensor-core instructions: Hopper's asynchronous warpgroup MMA (wgmma), or the Ampere-style mma.sync that
    # caps a kernel near flash-attention-2's rate on an H100
    mma = collections.Counter(m.split(".")[0] for m in re.findall(r"\b(wgmma\.mma_async|mma\.sync)\b", ptx))
    # programmatic dependent launch (dispatch.pdl_prologue): its wait must come before the kernel's first access to
    # global memory (a load, store, async copy or atomic), in the PTX's order
    wait = ptx.find("griddepcontrol.wait")
    # (word-bounded: "red." must not match inside "ld.shared.")
    first = re.search(r"\b(?:ld\.global|st\.global|cp\.async|cp\.reduce|atom\.|red\.)", ptx)
    accesses = [first.start()] if first else []
    # FlashAttention-3's intra-warpgroup overlap: exponentials computed while a warpgroup MMA is in flight (after a
    # wait that leaves products pending, before the next wait for none), in the TTGIR's order (structured: a loop's
    # body in program order, where the PTX may place a rotated loop's blocks in another)
    exp2_in_flight, in_flight = 0, False
    for m in re.finditer(r"warp_group_dot_wait .*\{pendings = (\d+)|= math\.exp2 ", compiled.asm["ttgir"]):
        if m.group(1) is not None:
            in_flight = m.group(1) != "0"
        else:
            exp2_in_flight += in_flight
    return {
        "shared": compiled.metadata.shared,
        "exp2_in_flight": exp2_in_flight,
        # ptxas's advisory C7515: it serialised the kernel's warpgroup MMAs (each waits for the one before), as when
        # something other than a wgmma writes a product's accumulator registers while products are in flight: every
        # overlap an asynchronous MMA was written for is lost
        "wgmma_serialized": "C7515" in res.stderr or "wgmma.mma_async instructions are serialized" in res.stderr,
        "regs": regs and int(regs.group(1)),
        "spill_bytes": spill and int(spill.group(1)),
        "loads": dict(loads),
        "reduces": dict(reduces),
        "mma": dict(mma),
        "pdl_wait_first": wait >= 0 and all(wait < i for i in accesses),
        "pdl_triggers": "griddepcontrol.launch_dependents" in ptx,
        "l2_prefetch_before_wait": 0 <= ptx.find("prefetch.global.L2") < wait,  # (a weight's stream begun early)
        "loop_spills": _loop_spills(compiled.asm["cubin"]),
        # the block-wide barriers (bar.sync): each block reduction's cross-warp round waits at them
        "barriers": len(re.findall(r"\bbar\.sync\b", ptx)),
        # warp specialisation (tl.range(warp_specialize=True)): the warps of every partition, and the per-partition
        # register budgets it sets (setmaxnreg: a producer gives registers up, the consumers take them)
        "warps": compiled.metadata.num_warps,
        "setmaxnreg": sorted(
            {(m[0], int(m[1])) for m in re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)}
        ),
    }


def _loop_spills(cubin: bytes) -> int | None:
    """Spill instructions (STL, LDL) between the first and the last HGMMA of a cubin's machine code (Triton's bundled
    cuobjdump), or None where it has no HGMMA or no cuobjdump."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass, re.MULTILINE)
    mma = [i for i, op in enumerate(ops) if op.startswith("HGMMA")]
    if not mma:
        return None
    return sum(op.startswith(("STL", "LDL")) for op in ops[mma[0] : mma[-1] + 1])
