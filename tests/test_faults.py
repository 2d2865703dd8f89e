"""Fault injection: damaged stores and records, a busy or unwritable run folder, Ctrl-C and SIGTERM.

Each case runs the CLI as a user would, breaks something, and checks three things: the exit code,
the one line the user reads (no traceback), and that nothing computed before is lost or computed
again. (W&B without a server: `test_faults_wandb.py`; bad data and recipe values: `test_faults_data.py`.)
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fusellm_overrides, run_fit, start_fit, tiny_overrides, wait_until

from fusion.data.cache import hold_lock


def error_line(result: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a failed run; fails on a traceback or on several lines."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


@pytest.fixture(scope="module")
def store_run(tmp_path_factory, zoo_dir, cache_dir):
    """A finished FuseLLM run with its own representations store (the cases below damage it)."""
    root = tmp_path_factory.mktemp("faults")
    out = root / "run"
    overrides = fusellm_overrides(out, zoo_dir, cache_dir, **{
        "representations.dir": str(root / "store"), "trainer.max_steps": 4, "trainer.val_every_n_steps": 4})
    result = run_fit("--recipe", "fusellm.yaml", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, overrides, root / "store"


def teacher_folder(store: Path, label: str) -> Path:
    (folder,) = store.glob(f"{label}-*")
    return folder


def flip_a_byte(path: Path, offset: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


def test_a_flipped_byte_in_a_reused_shard_is_recomputed_before_training(store_run, tmp_path, zoo_dir, cache_dir):
    _, overrides, store = store_run
    folder = teacher_folder(store, "gpt2-code")
    flip_a_byte(folder / "shard-00002.npz")
    before = mtimes(store, "*/shard-*.npz")
    # A new run reuses the store: its representations stage checks every shard before training.
    result = run_fit("--recipe", "fusellm.yaml", *fusellm_overrides(tmp_path / "new", zoo_dir, cache_dir, **{
        "representations.dir": str(store), "trainer.max_steps": 2, "trainer.val_every_n_steps": 2}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher gpt2-code: shards [2] fail their sha256 check: recomputing them" in result.stdout
    assert "teacher gpt2-code: 1 of" in result.stdout  # that shard only
    computed = [line for line in result.stdout.splitlines() if "shards to compute" in line]
    assert len(computed) == 1, computed  # nothing for the other teachers
    after = mtimes(store, "*/shard-*.npz")
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {f"{folder.name}/shard-00002.npz"}, changed
    sidecar = json.loads((folder / "shard-00002.json").read_text())
    assert hashlib.sha256((folder / "shard-00002.npz").read_bytes()).hexdigest() == sidecar["sha256"]


def test_a_damaged_shard_of_a_finished_run_is_repaired_and_nothing_else_reruns(store_run):
    out, overrides, store = store_run
    folder = teacher_folder(store, "neox-prose")
    flip_a_byte(folder / "shard-00001.npz")
    (folder / "shard-00003.npz").unlink()  # as the old advice said: deleted
    result = run_fit("--recipe", "fusellm.yaml", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    repair = next(line for line in result.stdout.splitlines() if line.startswith("[fusion] stage representations"))
    assert "shard 1 fails its sha256 check" in repair and "shard 3 is missing" in repair
    assert repair.endswith("running it again to repair it")
    assert "teacher neox-prose: 2 of" in result.stdout
    for stage in ("alignment", "baseline", "train", "export", "evaluate"):  # the repaired result is the same
        assert f"stage {stage}: already done, skipped" in result.stdout, stage


def test_a_truncated_manifest_names_the_file_and_the_advice_works(store_run):
    out, overrides, store = store_run
    manifest = teacher_folder(store, "target") / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    shards = mtimes(store, "*/shard-*.npz")
    result = run_fit("--recipe", "fusellm.yaml", *overrides)
    assert result.returncode == 2
    line = error_line(result)
    assert str(manifest) in line and "delete it and run the same command again" in line
    manifest.unlink()
    result = run_fit("--recipe", "fusellm.yaml", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads(manifest.read_text())["shards"]) == 6  # rebuilt from the shards' sidecars
    assert "shards to compute" not in result.stdout and mtimes(store, "*/shard-*.npz") == shards  # all kept


def test_a_truncated_stage_record_or_recipe_names_the_file_and_the_advice_works(store_run):
    out, overrides, _ = store_run
    record = out / "stages" / "export.json"
    record.write_text(record.read_text()[:20])
    result = run_fit("--recipe", "fusellm.yaml", *overrides)
    assert result.returncode == 2 and str(record) in error_line(result)
    record.unlink()
    result = run_fit("--recipe", "fusellm.yaml", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[fusion] stage export\n" in result.stdout
    for stage in ("representations", "alignment", "baseline", "train"):
        assert f"stage {stage}: already done, skipped" in result.stdout, stage
    saved = out / "recipe.yaml"  # the recipe the folder was claimed with: the same advice
    saved.write_text(saved.read_text()[:20] + "\nmethod: [fusellm\n")  # cut short, then a stray line
    result = run_fit("--recipe", "fusellm.yaml", *overrides)
    assert result.returncode == 2 and str(saved) in error_line(result)
    saved.unlink()
    result = run_fit("--recipe", "fusellm.yaml", *overrides)
    assert result.returncode == 0 and "stage evaluate: already done, skipped" in result.stdout, result.stderr[-3000:]


def test_a_truncated_alignment_file_is_aligned_again(store_run, tmp_path, zoo_dir, cache_dir):
    _, _, store = store_run
    (path,) = teacher_folder(store, "gpt2-code").glob("align-*/shard-00001.npz")
    path.write_bytes(path.read_bytes()[:1000])
    result = run_fit("--recipe", "fusellm.yaml", *fusellm_overrides(tmp_path / "new", zoo_dir, cache_dir, **{
        "representations.dir": str(store), "trainer.max_steps": 2, "trainer.val_every_n_steps": 2}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{path} cannot be read: aligning that shard again" in result.stdout
    assert len(path.read_bytes()) > 1000


def test_top_k_above_a_teachers_vocabulary_stops_before_any_extraction(tmp_path, zoo_dir, cache_dir):
    store = tmp_path / "store"
    result = run_fit("--recipe", "fusellm.yaml", *fusellm_overrides(tmp_path / "run", zoo_dir, cache_dir, **{
        "representations.dir": str(store), "representations.top_k": 5000}))
    assert result.returncode == 2
    line = error_line(result)
    assert "representations.top_k" in line and "5000" in line and "lower it" in line
    assert not list(store.glob("*/shard-*.npz"))


def clm(out: Path, zoo_dir: Path, cache_dir: Path, **changes) -> list[str]:
    return tiny_overrides(out, zoo_dir, cache_dir, **{"trainer.max_steps": 4, "trainer.val_every_n_steps": 4,
                                                      **changes})


def test_a_second_process_on_a_busy_run_folder_gets_one_line(tmp_path, zoo_dir, cache_dir):
    out = tmp_path / "run"
    lock = hold_lock(out / ".lock")  # this process plays the first run
    result = run_fit("--recipe", "clm.yaml", *clm(out, zoo_dir, cache_dir))
    assert result.returncode == 2
    line = error_line(result)
    assert f"output_dir {out} is in use by another run (pid {os.getpid()} on {socket.gethostname()})" in line
    assert not (out / "stages").exists()
    lock.close()  # the first run ends (or dies): its lock file stays, unlocked, and is taken over
    result = run_fit("--recipe", "clm.yaml", *clm(out, zoo_dir, cache_dir))
    assert result.returncode == 0, result.stderr[-3000:]


def test_an_unwritable_output_dir_is_one_line(tmp_path, zoo_dir, cache_dir):
    (tmp_path / "file").write_text("not a folder")
    result = run_fit("--recipe", "clm.yaml", *clm(tmp_path / "file" / "run", zoo_dir, cache_dir))
    assert result.returncode == 2
    assert "output_dir" in error_line(result) and "choose a writable output_dir" in error_line(result)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_of_output_dir_is_one_line(tmp_path, zoo_dir, cache_dir):
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o555)
    result = run_fit("--recipe", "clm.yaml", *clm(parent / "run", zoo_dir, cache_dir))
    assert result.returncode == 2 and "Permission denied" in error_line(result)


def test_a_resume_accepts_another_spelling_of_output_dir_and_a_moved_folder(tmp_path, zoo_dir, cache_dir):
    out = tmp_path / "run"
    assert run_fit("--recipe", "clm.yaml", *clm(out, zoo_dir, cache_dir)).returncode == 0
    for spelling in (tmp_path / "sub" / ".." / "run", tmp_path / "moved"):
        if spelling.name == "moved":
            out.rename(spelling)
        result = run_fit("--recipe", "clm.yaml", *clm(spelling, zoo_dir, cache_dir))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "stage evaluate: already done, skipped" in result.stdout


def test_staging_left_by_dead_processes_is_removed(tmp_path, zoo_dir, cache_dir):
    out, host = tmp_path / "run", socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    out.mkdir()
    leftovers = [out / f".model.tmp-{host}-{pid}-abc123", cache_dir / f".blocks-x.tmp-{host}-{pid}-def456"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "weights").write_bytes(b"0" * 1000)
    alive = cache_dir / f".blocks-y.tmp-{host}-{os.getppid()}-ghi789"  # a live process's: kept
    alive.mkdir()
    result = run_fit("--recipe", "clm.yaml", *clm(out, zoo_dir, cache_dir, **{"data.block_size": 64}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(p.exists() for p in leftovers) and alive.exists()
    alive.rmdir()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_training_saves_last_ckpt_exits_128_plus_it_and_resumes(signum, tmp_path, zoo_dir,
                                                                               cache_dir):
    out = tmp_path / "run"
    args = tiny_overrides(out, zoo_dir, cache_dir, **{"trainer.max_steps": 60, "trainer.val_every_n_steps": 1000,
                                                      "trainer.checkpoint_every_n_steps": 10})
    run = start_fit("--recipe", "clm.yaml", *args)
    wait_until(run, (out / "checkpoints" / "last.ckpt").exists, 240)
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    name = signal.Signals(signum).name
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted by {name}: training stopped; saved {out / 'checkpoints' / 'last.ckpt'} "
                           "at step ") and last.endswith("run the same command again to resume"), last
    step = int(last.split(" at step ")[1].split(";")[0])
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    # Resuming: the rest of the steps, none twice (the checkpoint is the step the run stopped at).
    result = run_fit("--recipe", "clm.yaml", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)) == 60
    assert json.loads((out / "stages" / "train.json").read_text())["result"]["global_step"] == 60


def test_ctrl_c_during_extraction_exits_130_and_keeps_the_finished_shards(tmp_path, zoo_dir, cache_dir):
    store, out = tmp_path / "store", tmp_path / "run"
    args = fusellm_overrides(out, zoo_dir, cache_dir, **{"representations.dir": str(store),
                                                         "representations.chunks_per_shard": 4,
                                                         "representations.batch_size": 1})
    run = start_fit("--recipe", "fusellm.yaml", *args)
    wait_until(run, lambda: len(list(store.glob("target-*/shard-*.json"))) >= 2, 240, poll=0.1)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == (
        "interrupted by SIGINT; run the same command again to resume")
    # Finished shards: their sidecar is written last (a shard interrupted between the two is computed again).
    kept = {n: t for n, t in mtimes(store, "*/shard-*.npz").items() if (store / n).with_suffix(".json").exists()}
    assert kept and not (out / "stages" / "representations.json").exists()
    result = run_fit("--recipe", "fusellm.yaml", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    after = mtimes(store, "*/shard-*.npz")
    assert all(after[name] == kept[name] for name in kept)  # the finished shards were not computed again
    assert len(after) > len(kept)
