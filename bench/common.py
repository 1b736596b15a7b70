"""What every benchmark measures the same way: time per call and the extra peak memory of a call."""

from __future__ import annotations

import time

import torch


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def measure(fn, device, *, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 3) -> tuple[float, float]:
    """(milliseconds per call, extra peak bytes) of fn().

    CUDA: triton.testing.do_bench (L2 flushed between calls), after one call outside the measurement
    (compilation, autotuning); the extra memory is the peak allocated during one call above what was
    allocated before it, not counting the outputs it returns. CPU: wall time over at least min_reps
    calls and rep_ms milliseconds; memory is not measured (nan).
    """
    if torch.device(device).type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base - _nbytes(out)
        del out
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms)), float(max(extra, 0))
    fn()
    n, start = 0, time.perf_counter()
    while n < min_reps or time.perf_counter() - start < rep_ms / 1000:
        fn()
        n += 1
    return (time.perf_counter() - start) * 1e3 / n, float("nan")
