"""Files and directories written so that a crash of the node leaves each whole or untouched: a file written beside
its name and renamed over it (atomic_write), a directory's finished copy renamed over it (replace_dir), each with the
fsyncs that make the rename durable (fsync_file, fsync_dir). Checkpoints, `latest`, state files and the run's logs
are written through these."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid


@contextlib.contextmanager
def naming(path: str):
    """An OSError raised inside names `path` where it names no file: a full disk's ENOSPC from a write, a flush, an
    fsync or a close carries none, and the run's one-line error (engine.errors.run_command) says the file it was."""
    try:
        yield
    except OSError as e:
        _name(e, path)
        raise


def _name(e: BaseException, path: str) -> None:
    """`path` as the file of OSError `e` where it has an errno and no file (one built from a message alone keeps it:
    its str would become "[Errno None] None: path")."""
    if isinstance(e, OSError) and e.errno is not None and e.filename is None:
        e.filename = path


def append(path: str, text: str) -> None:
    """Append `text` (a JSONL log's lines) to the file at `path`; an error names it (naming)."""
    with naming(path), open(path, "a") as f:
        f.write(text)


def atomic_write(path: str, write) -> None:
    """write(f) into a temporary file beside `path`, synced, then renamed over it (the rename synced too): `path` is
    whole or untouched, also after a crash of the node; a write that fails (a full disk) removes the temporary file,
    and its error names `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # (a full disk: its partial copy, a state file's tens of GB, is not left there)
        if os.path.exists(tmp):
            os.remove(tmp)
        _name(e, path)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_file(fn: str) -> None:
    with open(fn, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """Make a directory's entries (files created, renamed or removed in it) durable, as a file's fsync does its
    bytes: without it a crash of the node can lose a rename that was made after the file's own fsync. A file system
    that cannot sync a directory (some network ones refuse it: EINVAL, ENOTSUP) is left as it is; a failure to write
    back (EIO, ENOSPC) raises, as a file's fsync would."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EISDIR, errno.EINVAL, errno.ENOTSUP):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def replace_dir(tmp: str, path: str) -> None:
    """Move the finished tmp dir to path (durably: the parent directory synced); an existing path is moved aside
    first and removed last."""
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
