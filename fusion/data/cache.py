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

Staging names carry the host and process id (``.<name>.tmp-<host>-<pid>-<random>``): two processes
never share one, and `remove_dead_staging` deletes those whose process is gone (a kill leaves them).
`hold_lock` is the non-blocking lock a run holds on its folder (`fusion.pipeline.Run`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from fusion.errors import FusionError, first_line

_PROGRESS_BYTES = 1 << 30  # a progress bar while hashing files above 1 GiB (a 7B model: ~14 GB, 8-30 s)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` next to ``path`` while inside; blocks while another holds it.

    The lock file is hidden, so that globs over a cache's folders (``chunks-*``) do not see it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock, also when the process dies


def hold_lock(path: Path):
    """Take the exclusive lock ``path`` without waiting: the open lock file (keep it; closing it, or the
    process's death, releases the lock), or None when another process holds it. The holder writes its
    host and pid into the file, for the message a second process shows (`lock_holder`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{socket.gethostname()} {os.getpid()}\n")
    handle.flush()
    return handle


def lock_holder(path: Path) -> str:
    """``pid N on HOST`` as written by `hold_lock`'s holder, or ``another process`` if unknown."""
    try:
        host, pid = path.read_text().split()[:2]
        return f"pid {pid} on {host}"
    except (OSError, ValueError):
        return "another process"


def staging_prefix(name: str) -> str:
    """The prefix of this process's temporary siblings of ``name`` (see the module docstring)."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_staging(folder: Path) -> list[Path]:
    """Delete the temporary files and folders in ``folder`` left by dead processes of this host; returns them.

    Only names made by `staging_prefix` with this host's name are considered: a process on another
    machine (a shared file system) cannot be checked from here.
    """
    host, removed = socket.gethostname(), []
    for path in folder.glob(".*.tmp-*") if folder.is_dir() else ():
        owner = path.name.rsplit(".tmp-", 1)[1].rsplit("-", 2)
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit() or _alive(int(owner[1])):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


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


def read_json(path: Path, fix: str):
    """A JSON file's content; an unreadable one (truncated, not JSON) is a `FusionError` naming it and ``fix``."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FusionError(f"{path} cannot be read ({first_line(err)}); {fix}") from None


def cache_root() -> Path:
    """Where fusion caches what it computes: ``$FUSION_CACHE``, else ``~/.cache/fusion``."""
    return Path(os.environ.get("FUSION_CACHE", Path.home() / ".cache" / "fusion"))


def sha256_file(path: Path, progress: bool = False) -> str:
    """The file's sha256, read in 16 MiB blocks (~1-2 GB/s on one core); a progress bar if ``progress``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.fstat(f.fileno()).st_size, unit="B", unit_scale=True,
                                     desc=f"hashing {path.name}", disable=not progress) as bar:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def file_sha256(file: Path) -> str:
    """The sha256 of a file's bytes, computed once per file version.

    Hashing reads the whole file (a 7B model's 14 GB: ~8 s at sha256's ~1.8 GB/s with SHA-NI, more from
    a cold disk), so the result is kept in ``<cache root>/file-hashes.json`` by absolute path, size and
    mtime (rewriting a file changes its mtime). One process hashes while the others (the ranks of a run)
    wait on a lock, then read it.
    """
    file = file.resolve()
    stat = file.stat()
    index = cache_root() / "file-hashes.json"
    with locked(index):
        known = json.loads(index.read_text()) if index.is_file() else {}
        entry = known.get(str(file), {})
        if (entry.get("size"), entry.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            return entry["sha256"]
        sha = sha256_file(file, progress=stat.st_size > _PROGRESS_BYTES)
        known = {name: e for name, e in known.items() if Path(name).exists()}  # forget deleted files
        known[str(file)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
        atomic_write(index, lambda f: f.write(json.dumps(known, indent=1).encode()))
    return sha


def atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, flush it to disk, rename it into
    place, and flush the folder (which holds the rename)."""
    fd, tmp = tempfile.mkstemp(prefix=staging_prefix(path.name), dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp made it private; what fusion writes is shared like any file
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
        # A temporary folder left by an earlier holder of the lock was a build killed midway; so are
        # those of other caches here whose builder died (this host's only: see remove_dead_staging).
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        remove_dead_staging(folder.parent)
        tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(folder.name), dir=folder.parent))
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
