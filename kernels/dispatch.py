"""Where an op runs: the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) or kernels/reference.py."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# Whether Triton runs its interpreter: its own reading of TRITON_INTERPRET (which takes 1, true, on, yes, ...), so the
# two always agree; Triton before its knobs (3.4) took "1" alone.
_knobs = getattr(triton, "knobs", None)
INTERPRET: bool = (
    bool(_knobs.runtime.interpret) if _knobs is not None else os.environ.get("TRITON_INTERPRET", "0") == "1"
)


def _interpreter_descriptor_reduce() -> None:
    """Triton 3.6's interpreter runs tensor-descriptor loads and stores but has no descriptor reduce (what
    `desc.atomic_add` builds: Hopper's bulk reduce, cp.reduce.async.bulk.tensor). Give it one, as the masked atomic
    add it stands for: each element of the tile inside the tensor's bounds added once, those outside dropped, as
    the bulk copy clips them. Only while interpreting, only if Triton lacks it."""
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder

    if hasattr(InterpreterBuilder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"descriptor reduce {kind} under the interpreter (only ADD)")
        ptrs, mask = desc.materialize_pointers(indices)
        op = ir.ATOMIC_OP.FADD if desc.base.dtype.element_ty.is_floating() else ir.ATOMIC_OP.ADD
        return self.create_atomic_rmw(op, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)

    InterpreterBuilder.create_descriptor_reduce = create_descriptor_reduce


if INTERPRET:
    _interpreter_descriptor_reduce()

_force_reference = 0


def use_triton(x: torch.Tensor) -> bool:
    """True when `x` should go through the Triton kernel rather than the PyTorch reference."""
    if _force_reference:
        return False
    if x.is_cuda:
        return True
    return INTERPRET and x.device.type == "cpu"


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Run every op through kernels/reference.py inside this block (tests of engine logic on CPU)."""
    global _force_reference
    _force_reference += 1
    try:
        yield
    finally:
        _force_reference -= 1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a reference op: fp32 for half types, else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached): sizes persistent grids; a small stand-in elsewhere."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_counts:
        _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_counts[idx]


def fill_sms(tile: int, programs, num_sms: int) -> int:
    """`tile` halved (down to 1) while `programs(tile)`, the grid it gives, would leave over half the GPU's SMs
    without a program: a small launch (a decode step of a few sequences) spreads out instead of queueing on a few
    SMs. Measured on an H200 (132 SMs), the rotary/cache write of a decode step in a CUDA graph: 8 tokens took 8.3 us
    in 10 programs, 3.5 us in 80; but 64 tokens took 4.2 us in 80 programs and 5.3 us in 320 (more programs, each
    with less to do, are not faster once most SMs have one). num_sms 0 (the interpreter): `tile` as it is."""
    while num_sms and tile > 1 and 2 * programs(tile) < num_sms:
        tile //= 2
    return tile


# ------------------------------------------------------------------ switches in the environment (TULU_*)

# every TULU_* setting the engine reads at import or where it is used, by kind: a 0/1 flag, an integer (>= 0), a
# number of seconds (>= 0, finite), or one of a few words. A value of another kind ("off" for 0, a typo) is named by
# check_switches, every command's first step, in one line (read at import it takes the default meanwhile: nothing can
# report it there)
SWITCHES: dict[str, str | tuple[str, ...]] = {
    "TULU_GRAD_SUMS": "flag", "TULU_OVERLAP_GRAD_REDUCE": "flag", "TULU_OVERLAP_PARAM_GATHER": "flag",
    "TULU_SP_OVERLAP": "flag", "TULU_ASYNC_TP": "flag", "TULU_SYMM_ALL_REDUCE": "flag", "TULU_TRACEBACK": "flag",
    "TULU_COMPILE_THREADS": "int", "TULU_ONE_SHOT_BYTES": "int", "TULU_PPO_ATTENTION": ("triton", "flash"),
    "TULU_SHARED_DIR_WAIT_S": "seconds",
}  # fmt: skip
# TULU_* names read elsewhere (setup.py's build of csrc/, the tests' device): no switch of a command, not checked
OTHER_SWITCHES = ("TULU_PPO_BUILD_CSRC", "TULU_TEST_DEVICE")


def _why_not(name: str, value: str) -> str | None:
    """Why `value` (set, stripped) is no value of switch `name`'s kind, or None."""
    kind = SWITCHES[name]
    if kind == "flag":
        return None if value in ("0", "1") else f"{name}={value!r}: not 0 or 1"
    if kind == "int":
        return None if value.isascii() and value.isdigit() else f"{name}={value!r}: not an integer >= 0"
    if kind == "seconds":
        try:
            ok = 0 <= float(value) < float("inf")  # (NaN is not)
        except ValueError:
            ok = False
        return None if ok else f"{name}={value!r}: not a number of seconds >= 0"
    return None if value in kind else f"{name}={value!r}: not one of {', '.join(kind)}"


def switch_problem(name: str) -> str | None:
    """Why switch `name`'s value in the environment is no value of its kind; None where it is, or unset."""
    value = os.environ.get(name, "").strip()
    return _why_not(name, value) if value else None


def _env(name: str) -> str | None:
    """Switch `name`'s value where it is one of its kind; None where unset, empty, or not (check_switches names it)."""
    value = os.environ.get(name, "").strip()
    return value if value and _why_not(name, value) is None else None


def env_switch(name: str, default: bool) -> bool:
    """A 0/1 flag of SWITCHES: `default` where unset (or not 0 or 1: "off" was taken as on, "yes" as off, silently,
    before check_switches named it)."""
    value = _env(name)
    return default if value is None else value == "1"


def env_int(name: str, default: int) -> int:
    """An integer of SWITCHES: `default` where unset (or not an integer: a bare int() ended every command, --help
    too, in a traceback at import)."""
    value = _env(name)
    return default if value is None else int(value)


def env_word(name: str, default: str) -> str:
    """One of the words of a switch of SWITCHES (TULU_PPO_ATTENTION): `default` where unset (or not one of them)."""
    return _env(name) or default


def env_seconds(name: str, default: float) -> float:
    """A number of seconds of SWITCHES: `default` where unset (or not a finite number >= 0)."""
    value = _env(name)
    return default if value is None else float(value)


def check_switches() -> list[str]:
    """Raise ValueError naming every TULU_* switch in the environment whose value is not of its kind. Returns what
    to warn of: each TULU_* name that is no switch (a typo of one is set to no effect), with the switch it is
    closest to."""
    import difflib

    bad = [why for name in SWITCHES if (why := switch_problem(name))]
    if bad:
        raise ValueError("; ".join(bad))
    unknown = sorted(n for n in os.environ if n.startswith("TULU_") and n not in SWITCHES and n not in OTHER_SWITCHES)
    said = []
    for name in unknown:
        near = difflib.get_close_matches(name, list(SWITCHES), n=1)
        said.append(f"{name} is no switch of this engine{f' (did you mean {near[0]}?)' if near else ''}: ignored")
    return said


def cores_of_this_process() -> int:
    """The cores this process may use, shared among the processes started beside it on the machine (torchrun's
    ranks, pytest-xdist's workers), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for beside in ("LOCAL_WORLD_SIZE", "PYTEST_XDIST_WORKER_COUNT"):
        cores //= max(1, int(os.environ.get(beside, "1")))
    return max(1, cores)


# Threads that compile an autotuned kernel's candidates at once (autotune below), by default this process's cores,
# at most 16; 0 or 1: one after another, as Triton's own tuner does. TULU_COMPILE_THREADS overrides the default.
COMPILE_THREADS: int = env_int("TULU_COMPILE_THREADS", min(16, cores_of_this_process()))
_compile_pool = None
_ahead: int | None = None  # (the thread inside compile_ahead, whose launches compile and return)


def _async_compile():
    """Triton's AsyncCompileMode over the module's pool of COMPILE_THREADS threads (compile errors left to the
    launch that meets them again)."""
    global _compile_pool
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    if _compile_pool is None:
        _compile_pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="triton-compile")
    return AsyncCompileMode(_compile_pool, ignore_errors=True)


class _ParallelAutotuner(triton.runtime.Autotuner):
    """triton.autotune's tuner, compiling a new key's candidates all at once before it times them.

    Triton's tuner compiles each candidate when its timing loop first launches it, one after another: 1 to 2 s each
    for the attention's kernels (sm_90a, ptxas included), against ~0.1 s to time one, so a cold start (a fresh GPU
    machine, a training run's first step) spends most of its autotuning in the compiler on one core. Here the
    pruned candidates are specialised one by one (each config's pre_hook first: the attention's sets its tensor
    descriptors' blocks, which are part of the specialisation) and compiled by COMPILE_THREADS threads (the
    compiler's passes and ptxas release the GIL) through Triton's AsyncCompileMode; the timing loop then finds each
    in the JIT's cache. A candidate that fails to compile is left to the timing loop, which handles it as Triton
    always has. Nothing changes under the interpreter, with one thread, or with results cached on disk. Inside
    compile_ahead a launch compiles every candidate and tunes nothing (its timings would be of no launch)."""

    def prune_configs(self, kwargs: dict) -> list:
        configs = super().prune_configs(kwargs)
        if COMPILE_THREADS > 1 and len(configs) > 1 and not INTERPRET and not self.cache_results:
            precompile(self, configs, kwargs)
        return configs

    def run(self, *args, **kwargs):
        if _ahead is None or _ahead != threading.get_ident():  # (every tuned launch: None, the usual case, first)
            return super().run(*args, **kwargs)
        self.nargs = dict(zip(self.arg_names, args))
        try:
            precompile(self, super().prune_configs(kwargs), kwargs)
        finally:
            self.nargs = None


def precompile(tuner, configs: list, kwargs: dict) -> None:
    """Compile `configs` of an autotuned kernel for the arguments of the launch being tuned (tuner.nargs, the
    positional ones, and kwargs) in COMPILE_THREADS threads, into the kernel's JIT cache."""
    from triton.runtime._async_compile import active_mode

    ahead = _ahead == threading.get_ident()  # (compile_ahead's own mode collects the compiles)
    if active_mode.get() is not None and not ahead:  # (inside someone else's: its owner collects them)
        return
    args = tuple(tuner.nargs.values())  # (positional: in the kernel's argument order)
    launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}  # (a launch's: ours are warm-ups)
    with contextlib.nullcontext() if ahead else _async_compile():
        for config in configs:
            meta = dict(launch, **config.all_kwargs())
            try:
                if config.pre_hook:
                    config.pre_hook({**tuner.nargs, **meta})
                tuner.fn.run(*args, grid=None, warmup=True, **meta)
            except Exception:  # (the timing loop meets it again and handles it)
                continue


def compile_ahead(fns) -> None:
    """Call each of `fns` (a benchmark sweep's variants, say) with every Triton launch in them turned into a compile
    in COMPILE_THREADS threads (an autotuned launch: all its candidates), and return once all have compiled: each
    fn's real calls afterwards find their kernels in the JIT's cache. What the fns compute meanwhile is garbage (no
    kernel runs) and their errors are dropped (a real call meets them). Only this thread's launches: another's (an
    autograd worker, say) run as always. Nothing under the interpreter or with one thread (each launch compiles when
    it comes, as before)."""
    global _ahead
    from triton.runtime._async_compile import active_mode
    from triton.runtime.jit import JITFunction

    if INTERPRET or COMPILE_THREADS <= 1 or _ahead is not None or active_mode.get() is not None:
        return
    launch, me = JITFunction.run, threading.get_ident()

    def compile_only(self, *args, grid, warmup, **kwargs):
        return launch(self, *args, grid=grid, warmup=warmup or threading.get_ident() == me, **kwargs)

    JITFunction.run, _ahead = compile_only, me
    try:
        with _async_compile():
            for fn in fns:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - (the real call meets it again)
                    continue
    finally:
        JITFunction.run, _ahead = launch, None


def autotune(configs: list, key: list, **kwargs):
    """triton.autotune (the same arguments) with the candidates of each new key compiled in parallel."""

    def decorator(fn):
        tuner = triton.autotune(configs, key, **kwargs)(fn)
        tuner.__class__ = _ParallelAutotuner
        return tuner

    return decorator


_INTERP = tl.constexpr(INTERPRET)


@triton.jit
def loop_bound(x):
    """A runtime value as a `range()` bound inside a kernel.

    Triton 3.6's interpreter keeps scalars as shape-(1,) numpy arrays, which numpy >= 2.4 refuses to
    turn into the int range() needs (triton#9171); hand it the element. Compiled code: x itself, so
    loops stay ordinary (software-pipelined) for loops.
    """
    if _INTERP:
        y = x.handle.data[0]
    else:
        y = x
    return y


# ------------------------------------------------------------------------ GEMMs into fp32 sums --

_FP32_OUT_GEMM: dict[tuple, bool] = {}


def fp32_out_gemm(device: torch.device) -> bool:
    """Whether this device's torch multiplies half matrices into an fp32 matrix in place, C += A @ B in one cuBLAS
    call (torch.addmm's out_dtype with out=C, C fp32: its epilogue reads and writes C in fp32, the product never
    rounded to half nor stored apart). CUDA only (the CPU has no such kernel), and only where a first small call,
    made here once per device, gives the float64 sum: a torch whose out_dtype wants C in the inputs' dtype (some
    releases) or returns something else is not used."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _FP32_OUT_GEMM:
        gen = torch.Generator(device=device).manual_seed(0)
        c = torch.randn(48, 40, device=device, generator=gen)
        a = torch.randn(72, 48, device=device, generator=gen).to(torch.bfloat16).t()  # (dy^T: transposed, as used)
        b = torch.randn(72, 40, device=device, generator=gen).to(torch.bfloat16)
        want = c.double() + a.double() @ b.double()
        try:
            got = torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            ok = got is c and bool(torch.allclose(c.double(), want, rtol=1e-5, atol=1e-4))
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _FP32_OUT_GEMM[key] = ok
    return _FP32_OUT_GEMM[key]


def add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = True) -> torch.Tensor:
    """acc (+)= a @ b in place: acc [M, N] fp32, a [M, K] and b [K, N] of one dtype (any strides). Half a and b on a
    GPU whose torch has it (fp32_out_gemm): one GEMM into acc, the products summed in fp32 and added to acc unrounded;
    elsewhere the product in a's dtype (cuBLAS's own fp32 accumulation, rounded once to half), then added. How a
    weight's grad goes straight into its fp32 sum over micro-batches (the LM head's in kernels/ppo_loss.py, the
    linear layers' in engine/grad_sums.py) without a [M, N] half grad beside it. accumulate False: acc = a @ b."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b) if accumulate else torch.mm(a, b, out=acc)
    if a.dtype in (torch.float16, torch.bfloat16) and fp32_out_gemm(acc.device):
        return torch.addmm(acc, a, b, beta=1 if accumulate else 0, out_dtype=torch.float32, out=acc)
    return acc.add_(a @ b) if accumulate else acc.copy_(a @ b)


# The last few values derived from a tensor, with the tensor (held, so its identity is not reused) and its version
# (an in-place change makes a new one): what every layer of a forward rebuilds from the same cu_seqlens
_DERIVED: list[tuple] = []


def derived(t: torch.Tensor, key: tuple, build):
    """build(), or the value it gave for this very tensor, unchanged since, under `key` (one of the last 8)."""
    full = (key, t._version)
    for held, held_key, value in list(_DERIVED):  # (a copy: a backward may run on another thread)
        if held is t and held_key == full:
            return value
    value = build()
    _DERIVED[:] = [(t, full, value), *_DERIVED[:7]]
    return value


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def sum_pair(a, b, axis: tl.constexpr):
    """(sum of a, sum of b) along axis: on a GPU one block reduction of the pair (one round of shuffles, shared-memory
    stores and barriers for both, where two tl.sum take two); under the interpreter two tl.sum (its tl.reduce runs a
    Python combine per element: 25x slower on a 1000-wide row)."""
    if _INTERP:
        sa = tl.sum(a, axis)
        sb = tl.sum(b, axis)
    else:
        sa, sb = tl.reduce((a, b), axis, _add_pair)
    return sa, sb


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """A kernel launched with programmatic dependent launch (PDL; launch_pdl: decode_config.pdl_args) may start while
    the kernel before it in the stream still runs: wait here until that one has finished and its writes are visible
    (before any read or write of memory another kernel touches), then let the next kernel launch in turn (its
    programs take free SM slots once all of this kernel's have started, and wait here likewise). What PDL saves is
    the gap between dependent kernels: the launch and ramp of the next overlap the tail of this one. PDL False:
    nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
