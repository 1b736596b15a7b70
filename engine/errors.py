"""Errors in what a run was given: a flag, a file, a checkpoint, a prompt.

The command lines (`engine/train_ppo.py`, and the benches through bench.common.run_main: run_command) report an
`InputError` in one line, `train_ppo.py: error: <message>`, with exit code 2 and no traceback (under torchrun the line
also goes into torchrun's failure summary, the last thing it prints); any other exception is a fault of the engine's
and keeps its traceback. Each class is also the built-in error a caller of the library would catch (an `InvalidInput`
is a ValueError, a `MissingInput` a FileNotFoundError). `TULU_TRACEBACK=1` shows the traceback of an input error too.

Raise one only for what the user gave and can mend; an invariant of the engine's own stays a plain error (a traceback
is what finds a bug), and a handler that catches a check's errors to add the flag catches these classes only.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class InputError(Exception):
    """Base of the errors in a run's inputs (mixed into the built-in error each subclass also is)."""


class InvalidInput(InputError, ValueError):
    """A value, file or checkpoint that cannot serve: a flag out of range, a prompt file that is not JSONL, a
    checkpoint of the wrong kind, a model that does not fit in memory, a TP degree that does not divide the heads."""


class MissingInput(InputError, FileNotFoundError):
    """A directory or file the run needs is not there."""


class OutputInUse(InputError, FileExistsError):
    """The output directory holds an earlier run that neither --resume nor --overwrite-output-dir claims."""


class UnwritableOutput(InputError, OSError):
    """The output directory cannot be written."""


class MissingPackage(InputError, ImportError):
    """A flag needs an optional package that is not installed."""


class FailedOnAnotherRank(InputError, RuntimeError):
    """Another rank's input error, as raise_together reports it (with that error's message) on the ranks that had
    none."""


def failed_on(error: BaseException) -> int | None:
    """The rank whose error `error` is, where it is another rank's as raise_together raised it on this one (a rank
    that had no error of its own); None for this rank's own error."""
    return getattr(error, "failed_on", None)


def raised_on_every_rank(error: BaseException) -> bool:
    """Whether every rank raised `error` or its counterpart at the same point (raise_together: the failing rank its own
    error, the others one naming it), so that the ranks may still meet in collectives as they stop; also where a
    handler raised another error from it (its cause or context)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if failed_on(error) is not None or getattr(error, "raised_together", False):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def named(error: InputError, what: str) -> InputError:
    """The same kind of input error with its message led by `what` (the flag that named the input), for a handler
    that knows which flag a check's finding belongs to (the check's own exception stays its __cause__)."""
    return type(error)(f"{what}: {error}")


def first_line(error: BaseException) -> str:
    """The first line of another library's error message (a Jinja or torch error may run over several), for a message
    of ours that quotes it in one line."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def global_rank() -> int:
    """This process's global rank as torchrun sets it (RANK), 0 without one (or an empty or odd value)."""
    rank = os.environ.get("RANK", "")
    return int(rank) if rank.isdigit() else 0


def write_error_file(line: str) -> None:
    """Under torchrun, `line` into this rank's error file (TORCHELASTIC_ERROR_FILE), which torchrun's failure summary
    prints (its reader takes a plain message: torch.distributed.elastic.multiprocessing.errors)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass


def report(error: BaseException | str, prog: str) -> None:
    """An input error's message in place of a traceback: on stderr from global rank 0 (every rank of a torchrun met
    the same one, or was told by raise_together which rank met which), and into this rank's torchrun error file."""
    line = f"{prog}: error: {error}"
    if global_rank() == 0:
        print(line, file=sys.stderr, flush=True)
    write_error_file(line)


def _check_switches() -> None:
    """The TULU_* switches in the environment, each a value of its kind (kernels.dispatch.check_switches): one that
    is not ("off" for 0, a typo) is a usage error of the command, not a setting taken silently the other way."""
    from kernels.dispatch import check_switches

    try:
        unknown = check_switches()
    except ValueError as e:
        raise InvalidInput(f"{e} (unset a switch for its default)") from None
    if unknown and global_rank() == 0:
        print(f"warning: {'; '.join(unknown)}", file=sys.stderr, flush=True)


# The exit code of a run a signal stopped (SIGTERM / SIGUSR1: a scheduler's notice) after its checkpoint: not done,
# and --resume continues it exactly (sysexits' EX_TEMPFAIL: a scheduler or `train && evaluate` does not take it for a
# finished run)
STOPPED_EXIT = 75


def run_command(
    main: Callable[[], T], prog: str, disk_full: str = "free space and run it again", argv: list[str] | None = None
) -> T:
    """main() as a command line named `prog`: an InputError reported in one line (report) with exit code 2, a full
    disk (or quota) in one line with what to do (`disk_full`) and exit code 1, another rank's error as raise_together
    raises it on this one (failed_on) in one line with exit code 1 (the failing rank prints the traceback), or, where
    TULU_TRACEBACK is 1, raised with its traceback as any other error is (exit code 1), which torch's
    @record also writes into torchrun's failure summary."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from kernels.dispatch import env_switch

    traceback = env_switch("TULU_TRACEBACK", False)

    @record
    def run() -> T:
        try:
            if not {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):  # (help whatever the switches)
                _check_switches()
            return main()
        except InputError as e:
            if traceback:
                raise
            report(e, prog)
            raise SystemExit(2) from None
        except Exception as e:
            full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
            if traceback or not (full or failed_on(e) is not None):
                raise
            if full:  # (not the engine's fault: no traceback, the file and what to do)
                report(f"{e.strerror or e}{f' writing {e.filename}' if e.filename else ''}: {disk_full}", prog)
            else:  # (the failing rank prints the traceback that finds the fault; this one's shows where it heard)
                said = e.strerror if isinstance(e, OSError) else e
                report(f"{said} (rank {failed_on(e)} printed its traceback)", prog)
            raise SystemExit(1) from None

    return run()


def unreadable(path: str, e: OSError) -> str:
    """Why `path` could not be read, in words: "permission denied" where the file is there but this user may not read
    it (safetensors reports that as "No such file or directory"), else the system's reason."""
    if os.path.exists(path) and not os.access(path, os.R_OK):
        return "permission denied"
    return e.strerror or str(e)
