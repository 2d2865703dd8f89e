"""Ctrl-C and SIGTERM: stop at a safe point, keep what is done, and say how to resume.

`python -m fusion.fit` runs a recipe inside `signals_handled()`. A signal then raises `Interrupted`,
except during training (inside `safe_points()`), where the first one only asks to stop:
`StopAtSafePoint` saves ``checkpoints/last.ckpt`` at the end of the current optimizer step (after
the validation in progress, if any) and ends the fit, and the train stage raises `Interrupted`
then. A second signal stops at once.
Everything else a run writes is atomic (shards, caches, records), so stopping anywhere loses at
most the work in progress. The exit code is the shell's: 130 for SIGINT, 143 for SIGTERM (what
schedulers send before they kill a job).

`Interrupted` is a `BaseException`, like `KeyboardInterrupt`, so that no ``except Exception`` on the
way up swallows it; Lightning only tears down and re-raises it (a `KeyboardInterrupt` would make
Lightning call ``sys.exit(1)`` itself).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"requested": None, "training": False, "installed": False}  # first signal; in safe_points; handled


class Interrupted(BaseException):
    """A run stopped by a signal; ``exit_code`` is 128 + the signal's number."""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(detail)
        self.signum, self.detail = signum, detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def _handle(signum: int, frame) -> None:
    if _state["requested"] is None and _state["training"]:
        _state["requested"] = signum
        print(f"\n[fusion] {signal.Signals(signum).name}: stopping after this step and saving checkpoints/last.ckpt "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
        return
    raise Interrupted(signum)


def requested() -> int | None:
    """The signal that asked training to stop, if any."""
    return _state["requested"]


@contextmanager
def signals_handled() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` (or, in `safe_points`, ask to stop) while inside."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    _state.update(requested=None, installed=True)
    for s in _SIGNALS:
        signal.signal(s, _handle)
    try:
        yield
    finally:
        _state["installed"] = False
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def safe_points() -> Iterator[None]:
    """While inside, a first signal waits for `StopAtSafePoint` instead of raising."""
    _state["training"] = True
    try:
        yield
    finally:
        _state["training"] = False


def ignore_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the workers too; they must keep serving
    batches until the main process stops at its safe point (it shuts them down)."""
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StopAtSafePoint(pl.Callback):
    """After a stop request: save ``last`` at the end of the optimizer step, then end the fit.

    Put it after the callbacks that record the loader's position (`ConsumedBatches`), so that the
    checkpoint resumes at the next batch. Under several processes the ranks agree first (a signal may
    reach one rank only, or at different steps).

    Lightning installs its own SIGTERM handler when the fit starts, which raises at the end of a step
    or in the middle of a validation, racing this hook for the checkpoint; under `signals_handled`
    ours is put back once training starts (Lightning restores the handlers it found when it ends).
    """

    def __init__(self, last: Path) -> None:
        self.last = Path(last)
        self.saved_at: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        if _state["installed"] and threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                signal.signal(s, _handle)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches and batch_idx + 1 != trainer.num_training_batches:
            return  # in the middle of an accumulation: a checkpoint here would lose the gradients so far
        stop = requested() is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and self.saved_at is None:
            trainer.save_checkpoint(self.last)
            self.saved_at = trainer.global_step
            trainer.should_stop = True
