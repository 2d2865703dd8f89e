"""Shared fixtures: the small tiny zoo and a data cache, built once per test session."""

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fusion.zoo import build_zoo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """Everything fusion caches during the tests (representations, weight hashes, ...) goes to a temporary
    folder, not the user's ~/.cache/fusion; subprocesses inherit it."""
    previous = os.environ.get("FUSION_CACHE")
    os.environ["FUSION_CACHE"] = str(tmp_path_factory.mktemp("fusion-cache"))
    yield
    if previous is None:
        os.environ.pop("FUSION_CACHE")
    else:
        os.environ["FUSION_CACHE"] = previous


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    build_zoo("small", root, progress=False)
    return root


@pytest.fixture(scope="session")
def zoo(zoo_dir) -> dict:
    """name -> (tokenizer, config vocab_size) for the small zoo's three models."""
    from transformers import AutoConfig, AutoTokenizer

    from fusion.zoo import resolve_model

    out = {}
    for name in ("target", "gpt2-code", "neox-prose"):
        path = resolve_model(f"zoo:{name}", "small", zoo_dir)
        out[name] = (AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path).vocab_size)
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


def tiny_overrides(out: Path, zoo_dir: Path, cache_dir: Path, **changes) -> list[str]:
    """`dotted.key=value` overrides that make a shipped recipe run in seconds on the small zoo, writing to `out`."""
    values = {
        "output_dir": str(out), "zoo.size": "small", "zoo.dir": str(zoo_dir), "data.cache_dir": str(cache_dir),
        "representations.dir": str(cache_dir / "representations"),  # the chunk set clm trains on, too
        "data.block_size": 128, "data.max_validation_blocks": 8, "trainer.batch_size": 8, "optim.lr": 1e-3,
        "trainer.max_steps": 40, "trainer.val_every_n_steps": 20, "trainer.log_every_n_steps": 1,
        "trainer.checkpoint_every_n_steps": 10, "trainer.accelerator": "cpu", "wandb.mode": "offline",
    }
    values.update(changes)
    return [f"{k}={v}" for k, v in values.items()]


def fusellm_overrides(out: Path, zoo_dir: Path, cache_dir: Path, **changes) -> list[str]:
    """`tiny_overrides` for the FuseLLM recipe: 96 chunks in shards of 16, stored under ``cache_dir``."""
    values = {"representations.dir": str(cache_dir / "representations"), "representations.max_chunks": 96,
              "representations.chunks_per_shard": 16, "data.block_size": 96, "trainer.batch_size": 4,
              "trainer.max_steps": 16, "trainer.val_every_n_steps": 8, "trainer.checkpoint_every_n_steps": 4,
              "data.max_validation_blocks": 4}
    values.update(changes)
    return tiny_overrides(out, zoo_dir, cache_dir, **values)


def start_fit(*args: str) -> subprocess.Popen:
    """`python -m fusion.fit ARGS` started in the background, as `run_fit` runs it (stderr piped, stdout dropped)."""
    env = {**os.environ, "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "fusion.fit", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(run: subprocess.Popen, done, seconds: float, poll: float = 0.2) -> None:
    """Poll ``done()`` until it holds, ``run`` ends, or ``seconds`` pass (the caller then checks what happened)."""
    deadline = time.time() + seconds
    while not done() and run.poll() is None and time.time() < deadline:
        time.sleep(poll)


def run_fit(*args: str, timeout: int = 300, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m fusion.fit ARGS` in a subprocess, as a user runs it (``pythonpath``: where their own code is)."""
    env = {**os.environ, "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "fusion.fit", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def assert_build_waits_for_the_lock(build, final: Path, built: Path, marker: str) -> None:
    """``build()`` blocks while another process holds ``final``'s build lock, then returns the folder that
    process put in place (a copy of ``built``) untouched: the marker file is not rewritten."""
    result = {}
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # we are "another process" building it
        worker = threading.Thread(target=lambda: result.update(path=build()))
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and "path" not in result  # waiting for us
        shutil.copytree(built, final)  # "our" build is done
        mtime = (final / marker).stat().st_mtime_ns
        fcntl.flock(lock, fcntl.LOCK_UN)
    worker.join(timeout=10)
    assert result["path"] == final and (final / marker).stat().st_mtime_ns == mtime


def tiny_reward_model(folder: Path, zoo_dir: Path) -> str:
    """A random tiny reward model (`LlamaForSequenceClassification`) with the small chat target's tokenizer and
    template, saved in ``folder``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from fusion.zoo import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("zoo:chat-target", "small", zoo_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
