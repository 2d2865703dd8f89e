"""Shared on-disk caches: built by one process while the others wait, and durable once in place.

Under torchrun every rank prepares the same caches (the chunk set, the packed text blocks), and two
runs on one machine may too. `build_once` makes one of them build while the others wait on an
``fcntl`` lock next to the folder (``.<folder>.lock``), then find it done; the folder is built in a
temporary sibling, its files flushed to disk, and renamed into place, so a killed build leaves no
half cache and a crash after the rename no empty files. The lock holds between the processes of one
machine (across machines only on a shared file system that supports ``flock``).

`atomic_write` does the same for one file: written aside, flushed, renamed, the folder flushed. A
rename can reach the disk before the data it names, so without the flush a crash can leave an empty
file under the final name.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` next to ``path`` while inside; blocks while another holds it.

    The lock file is hidden, so that globs over a cache's folders (``chunks-*``) do not see it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock, also when the process dies


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk (before renaming it into place)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, flush it to disk, rename it into
    place, and flush the folder (which holds the rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_once(folder: Path, is_done: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """Make ``folder`` exist, built by exactly one process; returns it.

    ``is_done(folder)`` says whether a folder is finished (its marker file, written last by ``build``);
    ``build(tmp)`` fills an empty temporary folder. The first process to take the lock builds; the
    others block on the lock, then find ``is_done`` and return. An exception in ``build`` leaves no
    folder behind and reaches the caller (a waiting process then tries the build itself).
    """
    if is_done(folder):
        return folder
    with locked(folder):
        if is_done(folder):  # another process built it while we waited
            return folder
        # A temporary folder left by an earlier holder of the lock was a build killed midway.
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp made it private; a shared cache should be readable by all
            fsync_tree(tmp)
            if folder.exists():  # an unfinished folder (no marker), e.g. from an older version
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            fsync_dir(folder.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
