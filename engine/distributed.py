"""The torchrun process grid (TP groups inside data-parallel replicas) and how ranks agree: a value every rank
reduces, an error any rank meets raised on every rank (none left waiting in a collective), rank 0's output.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import FailedOnAnotherRank, InputError, InvalidInput

# ------------------------------------------------------------------------------ process grid --


@dataclass
class ProcessGrid:
    rank: int = 0
    world_size: int = 1
    tp: int = 1
    dp: int = 1
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp


def backend_for(device: str | None) -> str | None:
    """The process group backend a run on `device` needs: gloo for --device cpu (NCCL, the default where a GPU
    exists, takes no CPU tensor), else None (NCCL on a GPU machine, gloo without one)."""
    return "gloo" if device is not None and str(device).startswith("cpu") else None


def init_process_grid(tp: int = 1, backend: str | None = None, timeout_minutes: float = 60.0) -> ProcessGrid:
    """Initialise torch.distributed from torchrun's environment (NCCL on GPUs, gloo on CPU).

    Without torchrun (no WORLD_SIZE) returns a single-process grid and starts nothing. timeout_minutes: how long
    a collective may wait for a peer before the job is stopped. Data-parallel ranks meet after each rollout,
    and one whose responses run longer keeps the others waiting for it: torch's 10-minute default could stop a
    healthy run at the recipe's scale (1,024-token responses).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        if tp != 1:
            raise InvalidInput(
                f"tensor parallel degree {tp} needs a multiple of {tp} processes, and this is one process: launch "
                f"with torchrun --nproc_per_node {tp} (or a multiple of it: data parallelism takes the rest)"
            )
        return ProcessGrid()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    # (a subgroup does not inherit the default group's timeout: NCCL's own default, 10 minutes, would then stop a
    # run whose tensor- or data-parallel peers wait on a long checkpoint write or an uneven rollout)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise InvalidInput(f"world size {world} is not a multiple of the tensor parallel degree {tp}")
    dp = world // tp
    if warning := tp_across_nodes(tp, int(os.environ.get("LOCAL_WORLD_SIZE", world))):
        print0(warning)
    grid = ProcessGrid(rank=rank, world_size=world, tp=tp, dp=dp)
    for d in range(dp):  # every rank must create every group, in the same order
        ranks = list(range(d * tp, (d + 1) * tp))
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            grid.tp_group = g
    for t in range(tp):
        ranks = list(range(t, world, tp))
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            grid.dp_group = g
    return grid


def tp_across_nodes(tp: int, per_node: int) -> str | None:
    """The warning for tensor-parallel groups (tp consecutive ranks, as torchrun numbers a node's ranks) that span
    nodes: every layer's all-reduces then cross the network. None when each group lies within a node (one node: the
    world, a multiple of tp)."""
    if per_node % tp == 0:
        return None
    return (
        f"warning: --tp {tp} with {per_node} processes per node: tensor-parallel groups span nodes, and each layer's "
        "all-reduces cross the network between them (slow); launch with --nproc-per-node a multiple of --tp"
    )


def print0(*args, **kwargs) -> None:
    """print on global rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device | None:
    """Where a small tensor for a collective over `group` must live: this rank's GPU under NCCL (which takes no CPU
    tensor), else None (the CPU, for gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None


def agree(values: list, op: str, group: dist.ProcessGroup | None = None, dtype: torch.dtype = torch.int64) -> list:
    """The element-wise "min" or "max" of small integers (or of `dtype` numbers: the slowest rank's times) over
    `group` (the default group when None and torch.distributed is initialised): for decisions every rank must take
    alike (how large a cache, whether to capture again, whether any rank failed). Without a group of several ranks,
    the values themselves."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return list(values)
    t = torch.tensor(values, dtype=dtype, device=collective_device(group))
    dist.all_reduce(t, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op], group=group)
    return t.tolist()


def raise_together(error: BaseException | None, what: str) -> None:
    """Every rank learns whether any rank failed at `what`: the one that did raises its own error, the others one
    naming the first rank that failed with its message (an input error when that rank's was one: engine.errors; a
    FloatingPointError when that rank's run diverged; an OSError of the same errno for a system error, so a full disk
    on one node is one line on every node, as engine.errors.run_command reports it), so no rank is left waiting in a
    collective for a peer that has stopped and rank 0, which reports for the run, has the message. The others' error
    carries the failing rank (engine.errors.failed_on): the command lines report it in one line, not with a traceback
    that would show only where they learnt of it. Returns None if none did."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    failed, first = agree([int(error is not None), -rank if error is not None else -world], "max")
    if not failed:
        return
    first = -first
    if world > 1:  # (the first failing rank's kind and message to every rank: only ever on this failing path)
        box = [_error_said(error) if rank == first else None]
        dist.broadcast_object_list(box, src=first)
        kind, message, code = box[0]
    if error is not None:
        with contextlib.suppress(AttributeError):  # (engine.errors.raised_on_every_rank; an error without a __dict__)
            error.raised_together = True
        raise error
    message = f"{what} failed on rank {first}: {message}"
    error = OSError(code, message) if kind is OSError else kind(message)
    error.failed_on = first  # (engine.errors.failed_on: the command line says it in one line, no traceback of ours)
    raise error


def together(what: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) on every rank, an error it raises on any rank raised on every rank (raise_together): a
    check that fails on one node alone (a file on its own disk only) stops every node at once, named on global rank
    0, rather than leaving the others waiting in their next collective until the timeout. The failing rank raises its
    own error, traceback and all (a fault of ours stays one); the others what raise_together gives them for it (an
    input error for an input error, exit code 2; an OSError of its errno for a system error; else a RuntimeError).
    Returns what fn returns."""
    error = result = None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # (not a KeyboardInterrupt or SystemExit: those end this process as they would anyway)
        error = e
    raise_together(error, what)
    return result


def rank0_together(what: str, rank: int, fn, *args, **kwargs):
    """fn(*args, **kwargs) on global rank 0 alone (`rank`: this process's; what rank 0 alone reads or writes:
    metrics.jsonl, an evaluation's files, the trackers), an error there raised on every rank (together): a full disk
    on rank 0 stops every rank at once rather than leaving the others waiting for it in the next collective. Returns
    what fn returns on rank 0, None elsewhere."""
    return together(what, fn if rank == 0 else _nothing, *args, **kwargs)


def _nothing(*args, **kwargs) -> None:
    return None


def _error_said(error: BaseException) -> tuple[type[Exception], str, int | None]:
    """(kind, message, errno) of `error` for the other ranks (raise_together): a system error's message without its
    "[Errno N]", which the OSError they raise of that errno adds again."""
    kind = _error_kind(error)
    if kind is not OSError:
        return kind, str(error), None
    where = f" ({error.filename})" if error.filename else ""
    return kind, f"{error.strerror or error}{where}", error.errno


def _error_kind(error: BaseException) -> type[Exception]:
    """What the ranks without an error raise for another rank's `error` (raise_together)."""
    if isinstance(error, InputError):
        return FailedOnAnotherRank
    if isinstance(error, OSError) and error.errno is not None:  # (a full disk, an I/O error: the system's, not ours)
        return OSError
    return FloatingPointError if isinstance(error, FloatingPointError) else RuntimeError


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)
