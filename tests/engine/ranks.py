"""Two (or more) gloo processes on one host (torch.multiprocessing.spawn), for the tests of what the ranks share
(engine.distributed.together and its users): a process group whose timeout is short, and each call's outcome with
whether it came at once, not after a rank waited out that timeout for a peer that had stopped."""

import datetime
import time

GROUP_TIMEOUT_S = 30  # a rank left waiting in a collective fails after this
AT_ONCE_S = 20  # an outcome sooner than this came from the shared error, not from the group's timeout


def init_gloo(rank: int, world: int, init_file: str) -> None:
    """This spawned process's gloo process group (rendezvous through `init_file`), with the short timeout."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)


def error_said(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def outcome(fn, *args, done="ok", said=error_said, **kwargs) -> list:
    """[`done` (fn's result where `done` is None) or said(the exception fn raised), whether it came at once]."""
    started = time.monotonic()
    try:
        result = fn(*args, **kwargs)
        got = result if done is None else done
    except Exception as e:
        got = said(e)
    return [got, time.monotonic() - started < AT_ONCE_S]


def leave() -> None:
    """The end of a spawned rank whose outcome is written: the ranks meet at a barrier (none is left in a collective
    with a peer that has gone), the group is destroyed, and the process exits at once (os._exit(0)), past the
    interpreter's teardown, in which gloo's threads now and then abort a process whose test had passed (SIGABRT,
    "terminate called without an active exception": one CI run at e9613da). A rank that failed raised before this."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
