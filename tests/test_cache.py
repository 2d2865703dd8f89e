"""`fusion.data.cache`: one process builds a shared cache while the others wait; failed builds leave nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

from fusion.data.cache import build_once

# Two processes start building the same folder at the same moment; each build is logged.
_BUILD = """
import os, sys, time
from pathlib import Path
from fusion.data.cache import build_once
folder, log, ready = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < 2:
    time.sleep(0.01)
def build(tmp):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1)  # the other process arrives while this one builds
    (tmp / "done").write_text(str(os.getpid()))
build_once(folder, lambda f: (f / "done").is_file(), build)
print((folder / "done").read_text())
"""


def is_done(folder: Path) -> bool:
    return (folder / "done").is_file()


def test_two_processes_building_one_cache_at_once_build_it_once(tmp_path):
    folder, log, ready = tmp_path / "cache", tmp_path / "builds.log", tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(folder), str(log), str(ready)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    builders = log.read_text().split()
    assert len(builders) == 1  # the second process waited, then found the cache done
    assert [out.strip() for out, _ in results] == builders * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "builds.log", "cache", "ready"]


def test_a_failed_build_leaves_nothing_and_a_killed_one_is_cleaned_up(tmp_path):
    folder = tmp_path / "cache"

    def fail(tmp: Path) -> None:
        (tmp / "part").write_text("half")
        raise RuntimeError("boom")

    def build(tmp: Path) -> None:
        (tmp / "done").write_text("whole")

    with pytest.raises(RuntimeError, match="boom"):
        build_once(folder, is_done, fail)
    assert [p.name for p in tmp_path.iterdir()] == [".cache.lock"]
    killed = tmp_path / ".cache.tmp-killed"  # what a build killed midway leaves
    killed.mkdir()
    (folder / "stale").mkdir(parents=True)  # an unfinished folder: no marker
    assert build_once(folder, is_done, build) == folder
    assert not killed.exists() and sorted(p.name for p in folder.iterdir()) == ["done"]
    assert oct(folder.stat().st_mode & 0o777) == "0o755"  # readable by every user of a shared cache
    build_once(folder, is_done, fail)  # done: nothing is built again
