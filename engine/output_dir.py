"""A run's output directory before the run writes into it: whether it can be used (writable, seen by every rank,
not nested in another run's files), the lock the run holds on it (.run.lock), and which of its files are a run's
(run_files), which a fresh start refuses or, with --overwrite-output-dir, removes (start_fresh). What the run then
writes there, its checkpoints and logs, is engine/resume.py's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time

import torch.distributed as dist

from engine.distributed import print0, rank0_together, together
from engine.errors import InputError, InvalidInput, OutputInUse, UnwritableOutput
from engine.resume import LATEST, WANDB_RUN_ID, checkpoint_number, remove_leftovers
from engine.run_logs import EVAL_DIR, LAUNCHES, LOGS


def check_writable(output_dir: str, rank: int) -> None:
    """Before anything is loaded or run: global rank 0 makes output_dir and writes a file there (a read-only or
    full file system is named now, not after the training or evaluation it would lose), then takes the run's lock
    there (lock_output_dir), and checks that every rank sees it (check_shared); every rank raises together. A
    directory inside what another run writes, or holding another run inside what this one writes, is refused first
    (nested_run)."""
    rank0_together("checking the output directory", rank, _check_writable, output_dir)
    lock_output_dir(output_dir, rank)
    check_shared(output_dir, rank)  # (its probe written under the lock: never beside another run's files)


def _check_writable(output_dir: str) -> None:
    """check_writable on rank 0 (any error it raises, an unreadable directory above output_dir say, on every rank)."""
    if (error := nested_run(output_dir)) is None and (why := why_unwritable(output_dir)):
        error = UnwritableOutput(f"cannot write to the output directory {output_dir}: {why}")
    if error is not None:
        raise error


WRITE_PROBE = ".write-test-"  # why_unwritable's file (its PID after it), removed once written
SHARED_PROBE = ".shared-test-"  # check_shared's file (a random token after it), removed once every rank has read it
# how long a rank looks for it: NFS caches a directory's attributes, and a name it did not hold, for up to a minute
# by default (acdirmax), so another node's new file may be seen late; only a directory that is not shared waits it out
SHARED_WAIT_S = 60.0
_shared_checked: set[str] = set()  # the output directories check_shared found shared, as given (the same on each rank)


def shared_wait_s() -> float:
    """check_shared's wait: TULU_SHARED_DIR_WAIT_S seconds if set (a test's few seconds; a slow NFS's more), else a
    minute, read when the check runs; a value that is not a number of seconds is named."""
    from kernels.dispatch import env_seconds, switch_problem

    if why := switch_problem("TULU_SHARED_DIR_WAIT_S"):
        raise InvalidInput(
            f"{why} (how long each rank looks for the file global rank 0 writes into the output directory; unset for "
            "a minute)"
        )
    return env_seconds("TULU_SHARED_DIR_WAIT_S", SHARED_WAIT_S)


def check_shared(output_dir: str, rank: int) -> None:
    """Under torchrun with several ranks: every rank sees the output directory global rank 0 writes, checked by a
    file with a random token that rank 0 writes there and every rank reads back. Each rank saves its share of every
    checkpoint there (its state file, model shards) and a resume reads them back, so a directory on another node's
    own disk (a node-local scratch path, a relative --output-dir from another working directory) would otherwise be
    met at the first checkpoint, hours in, as a missing file, and a --resume there could continue each node from
    another checkpoint (or from none). Every rank raises together."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or output_dir in _shared_checked:
        return  # (checked once per directory: the tiny default checks its output directory before setup does again)
    import socket
    import uuid

    box = [(uuid.uuid4().hex, socket.gethostname()) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    token, host0 = box[0]
    probe = os.path.join(output_dir, SHARED_PROBE + token)
    try:
        rank0_together("checking the output directory", rank, _write_probe, output_dir, probe, token)
        wait = together("checking the output directory", shared_wait_s)  # (every rank's: each may have its own)
        together("checking the output directory", _wait_for_probe, output_dir, probe, token, wait, rank, host0)
        _shared_checked.add(output_dir)
    finally:
        if rank == 0 and os.path.exists(probe):  # (after the last collective: every rank has read it)
            os.remove(probe)


def _write_probe(output_dir: str, probe: str, token: str) -> None:
    """check_shared on rank 0: its probe written."""
    try:
        with open(probe, "w") as f:
            f.write(token)
    except OSError as e:
        raise UnwritableOutput(f"cannot write to the output directory {output_dir}: {e.strerror or e}") from e


def _wait_for_probe(output_dir: str, probe: str, token: str, wait: float, rank: int, host0: str) -> None:
    """check_shared on every rank: rank 0's probe looked for (on the others), `wait` seconds at most."""
    import socket

    deadline = time.monotonic() + wait
    while rank != 0 and not _holds(probe, token):
        if time.monotonic() > deadline:
            raise InvalidInput(
                f"the output directory {output_dir} is not shared between the nodes: a file global rank 0 (host "
                f"{host0}) wrote there is not seen by rank {rank} (host {socket.gethostname()}) within "
                f"{wait:g} s (TULU_SHARED_DIR_WAIT_S). Every rank saves its share of each checkpoint "
                "there and a resume reads them back: give --output-dir a path on a file system every node mounts, "
                "the same path on each"
            )
        time.sleep(0.5)


def _holds(path: str, token: str) -> bool:
    """Whether `path` is a file holding `token` (check_shared's probe, as this rank sees it)."""
    try:
        os.listdir(os.path.dirname(path))  # (reading the directory revalidates a network file system's cached view)
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def why_unwritable(directory: str) -> str | None:
    """Why `directory` cannot hold a run's files (None if it can): made if missing, and a file written and removed
    there."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, WRITE_PROBE + str(os.getpid()))
        try:
            with open(probe, "w") as f:
                f.write("ok")
        finally:  # (a full disk's error: the empty file is not left)
            if os.path.exists(probe):
                os.remove(probe)
    except OSError as e:
        if os.path.exists(directory) and not os.path.isdir(directory):  # (makedirs: "File exists")
            return "a file of that name is there" if os.path.isfile(directory) else "it is not a directory"
        return e.strerror or str(e)
    return None


RUN_LOCK = ".run.lock"  # held by the run writing into an output directory (lock_output_dir)
_locks: dict[str, int] = {}  # output directory (real path) -> the descriptor holding its lock (-1: none), this process


def lock_output_dir(output_dir: str | None, rank: int) -> None:
    """Global rank 0 takes an exclusive lock on output_dir/.run.lock for as long as the run goes on: a second run
    writing into the same directory at once (a job requeued while the first still runs, a command started twice)
    is refused before it reads or writes anything there, naming the first (its host, process and start, which the
    file holds), rather than both saving checkpoints, `latest` and metrics over each other. The process holds it
    until unlock_output_dir (train_ppo's main, as it ends; the file removed) or its own end, however it ends (the
    kernel's flock; the file left, and taken by the next run). A file system without locks (some network mounts) is
    warned of and run on. Every rank raises together."""
    rank0_together("locking the output directory", rank, _lock_once, output_dir)


def _lock_once(output_dir: str | None) -> None:
    """lock_output_dir on rank 0: the lock taken unless this process holds it already; a refusal raised."""
    if not output_dir or os.path.realpath(output_dir) in _locks:
        return
    if error := nested_run(output_dir) or _lock(output_dir):
        raise error


def _lock(output_dir: str) -> InputError | None:
    import fcntl
    import socket

    fn = os.path.join(output_dir, RUN_LOCK)
    for tries in range(1, 101):
        try:
            os.makedirs(output_dir, exist_ok=True)
            fd = os.open(fn, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # (the directory, or a lock file there that is not this user's to write, or no file)
            what = f"its run lock {fn}" if os.path.lexists(fn) else f"the output directory {output_dir}"
            return UnwritableOutput(f"cannot write to {what}: {e.strerror or e}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "its host and process unknown"
            os.close(fd)
            return OutputInUse(
                f"{output_dir} is being written by another run ({holder}): wait for it to end or stop it (its lock "
                "goes with it, however it ends), or give this run another --output-dir"
            )
        except OSError as e:  # (ENOLCK, EINVAL: a file system without flock)
            os.close(fd)
            print0(f"warning: cannot lock {fn} ({e.strerror or e}): a second run started in {output_dir} meanwhile "
                   "would not be refused")  # fmt: skip
            # (said once: the run checks its output directory more than once)
            _locks[os.path.realpath(output_dir)] = -1
            return None
        # (the run that held it removed it as this process opened it: a lock on a file no run will look at again,
        # let go, and the file there now taken; a file system whose stat and fstat disagree, taken after 100 tries)
        if _names(fn, fd) or tries == 100:
            break
        os.close(fd)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode(), 0)
    except OSError as e:  # (a full disk: taken before check_writable's probe, which would have named it)
        os.close(fd)
        return UnwritableOutput(f"cannot write to the output directory {output_dir}: {e.strerror or e}")
    _locks[os.path.realpath(output_dir)] = fd
    # what a killed run's writes left (latest.tmp-PID, a metrics or eval file's, the tiny default's init/policy.tmp-*
    # model): no run writes them now that this one holds the lock, and none would be taken up again (another PID)
    for d in (output_dir, os.path.join(output_dir, EVAL_DIR), os.path.join(output_dir, "init")):
        if os.path.isdir(d):
            remove_leftovers(d)
    _remove_stale_probes(output_dir)
    return None


STALE_PROBE_S = 600  # a directory probe this old is a killed run's (a live check writes and removes its own in seconds)


def _remove_stale_probes(output_dir: str) -> None:
    """The directory probes a run killed while checking left (why_unwritable's .write-test-PID, check_shared's
    .shared-test-TOKEN): one more each kill, otherwise for good. Only old ones: a run launched into the directory
    beside this one may be checking it now, before it meets this run's lock."""
    now = time.time()
    for name in os.listdir(output_dir):
        if any(name.startswith(p) and re.fullmatch("[0-9a-f]+", name[len(p) :]) for p in (WRITE_PROBE, SHARED_PROBE)):
            with contextlib.suppress(OSError):  # (gone already, or another run's to remove)
                if now - os.stat(os.path.join(output_dir, name)).st_mtime > STALE_PROBE_S:
                    os.remove(os.path.join(output_dir, name))


def unlock_output_dir(output_dir: str | None) -> None:
    """Releases lock_output_dir's lock and removes its file: unlinked while the lock is still held, and only if the
    path still names the file held (never a new file another run took there). A run that opened the file just before
    it went finds, once it has locked it, that the path no longer names it, and takes the path's new file (_lock)."""
    real = os.path.realpath(output_dir) if output_dir else None
    fd = _locks.pop(real, None) if real else None
    if fd is not None and fd >= 0:
        fn = os.path.join(real, RUN_LOCK)
        try:
            if _names(fn, fd):
                os.unlink(fn)
        except OSError:  # (the directory no longer writable, say: the file stays, as a crashed run's does)
            pass
        finally:
            os.close(fd)  # (closing the only descriptor of the lock releases it)


def _names(path: str, fd: int) -> bool:
    """Whether `path` names the file open as `fd` (False if nothing is there)."""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


TRACE_PREFIX = "trace-iter"  # --profile-iteration's Chrome traces (engine.trainer._profiled_iteration)


def run_files(output_dir: str) -> list[str]:
    """The names in output_dir that a run writes (its checkpoints, `latest`, logs, launches, W&B id, profiler traces),
    sorted."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if _run_file(n))


def _run_file(name: str) -> bool:
    """Whether `name` in an output directory is one a run writes, and deletes as it prunes or starts over: its
    checkpoint-N directories (not a user's checkpoint-best beside them)."""
    return (
        name in (LATEST, EVAL_DIR, WANDB_RUN_ID, LAUNCHES, *LOGS)
        or checkpoint_number(name) is not None
        or name.startswith(TRACE_PREFIX)
    )


def nested_run(output_dir: str) -> InputError | None:
    """The refusal of an output directory nested in another run's files: inside what a run (a directory with a
    .run.lock, or, once the run ended and removed it, its logs, launches.jsonl or `latest`: _ran_in) writes there,
    `D/checkpoint-000001/x` or `D/eval/x`, which that run deletes as it prunes its checkpoints or starts over; or
    holding, inside what this run would write and delete, another run's directory. None if neither (a run beside
    another's, or in another's directory outside its files, is fine)."""
    real = os.path.realpath(output_dir)
    inner, outer = real, os.path.dirname(real)
    while outer != inner:
        below = os.path.relpath(real, outer)
        top = below.split(os.sep)[0]
        if _run_file(top) and _ran_in(outer):
            how = "is" if below == top else "lies in"
            return InvalidInput(
                f"{output_dir} {how} {os.path.join(outer, top)}, which the run writing {outer} deletes as it prunes "
                "its checkpoints or starts over: give this run an --output-dir outside it"
            )
        inner, outer = outer, os.path.dirname(outer)
    for name in run_files(real):
        for where, _, files in os.walk(os.path.join(real, name)):  # (links not followed: what a run deletes)
            if _ran_in(where, files):
                return InvalidInput(
                    f"{output_dir} holds another run's output directory, {where}, in {name}, which this run would "
                    "delete as it prunes its checkpoints or starts over: move that run out of there first, or give "
                    "this run another --output-dir"
                )
    return None


def _ran_in(directory: str, names: list[str] | None = None) -> bool:
    """Whether a run writes, or wrote, into `directory` (whose entries are `names`, if listed already): its lock file
    there (a run going on, or one that crashed), or what every run leaves when it ends (its logs, launches.jsonl or
    `latest`; an ended run's lock file is removed)."""
    marks = (RUN_LOCK, LATEST, LAUNCHES, *LOGS)
    if names is not None:
        return any(n in names for n in marks)
    return any(os.path.exists(os.path.join(directory, n)) for n in marks)


def start_fresh(
    output_dir: str, overwrite: bool, rank: int, evaluation: bool = False, inputs: dict[str, str | None] | None = None
) -> None:
    """Before a run that starts from iteration 0: an output_dir holding an earlier run's checkpoints or logs is
    refused (its metrics would mix with this run's, its `latest` would point at the other run), or with
    `overwrite` emptied of them (rank 0; other files, such as the tiny default's init models, stay). `inputs` (flag:
    path, say {"--policy": ...}): a path the run reads that lies in what would be emptied (a checkpoint's policy/ as the
    next stage's --policy) is refused, overwrite or not: deleting it would lose the model."""
    # (a directory one node cannot read, a bug: every rank stops, none waits for another in the next collective)
    held = together("starting the run", _earlier_run, output_dir, overwrite, evaluation, inputs)
    rank0_together("starting the run", rank, _remove, output_dir, held)


def _earlier_run(output_dir: str, overwrite: bool, evaluation: bool, inputs: dict[str, str | None] | None) -> list:
    """start_fresh on every rank: the names of an earlier run's files in output_dir, or its refusal raised."""
    held = run_files(output_dir)
    error = None
    doomed = {os.path.realpath(os.path.join(output_dir, n)): n for n in held}
    # (--eval-only without --overwrite-output-dir deletes nothing: refused below, as an evaluation of its own)
    for flag, path in (inputs or {}).items() if overwrite or not evaluation else ():
        real = os.path.realpath(path) if path else None
        inside = [n for d, n in doomed.items() if real and (real == d or real.startswith(d + os.sep))]
        if inside:
            how = "--overwrite-output-dir" if evaluation else f"starting a fresh run in {output_dir}"
            error = InvalidInput(
                f"{flag} {path} lies in {os.path.join(output_dir, inside[0])}, which {how} would delete: copy it "
                "out of there first, or give this run another --output-dir"
            )
            break
    if error is None and held and not overwrite:
        # (a run that stopped before its first iteration ended, say out of memory in its first rollout, left no
        # checkpoint or metrics: there is nothing to continue, and --resume starts over as --overwrite-output-dir does)
        unfinished = not any(checkpoint_number(n) is not None or n in (LATEST, "metrics.jsonl") for n in held)
        if evaluation:
            how = "--eval-only writes an evaluation of its own: another --output-dir (or --overwrite-output-dir)"
        elif unfinished:
            how = "it ended no iteration: --resume or --overwrite-output-dir starts over there, or another --output-dir"
        else:
            how = "pass --resume to continue it, --overwrite-output-dir to start over there, or another --output-dir"
        error = OutputInUse(
            f"{output_dir} holds an earlier run ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): {how}"
        )
    if error is not None:
        raise error
    return held


def _remove(output_dir: str, names: list[str]) -> None:
    """start_fresh on rank 0: an earlier run's files removed (a link, to a checkpoint kept elsewhere say: the link
    alone)."""
    for name in names:
        target = os.path.join(output_dir, name)
        shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)
