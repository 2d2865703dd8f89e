"""Where metrics go: Weights & Biases (online or offline) and a JSON-lines file in the run folder."""

from __future__ import annotations

import functools
import json
import netrc
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from fusion.config import WandbConfig
from fusion.errors import FusionError, first_line


class JsonlLogger(Logger):
    """Appends one JSON object per logging call to `metrics.jsonl`: `{"step", "time", name: value, ...}`.

    Appending (unlike Lightning's CSVLogger, which rewrites its file) keeps the metrics of an
    interrupted run; after a resume, steps between the last checkpoint and the interruption appear
    twice, and readers keep the last value (see `read_metrics`). A call repeating the row just
    written (same step, same values) writes nothing: `RowBeforeCheckpoint` hands a training step's
    row over before Lightning does.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._last_row: str | None = None

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the resolved recipe is written next to the metrics as recipe.yaml

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}})  # NaN compares equal here
        if values == self._last_row:
            return
        self._last_row = values
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": step, "time": round(time.time(), 3), **json.loads(values)}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class RowBeforeCheckpoint(pl.Callback):
    """Writes a training step's metrics row before the step's checkpoint can be written.

    Lightning writes checkpoints in `on_train_batch_end` (`ModelCheckpoint`, `StopAtSafePoint`) but
    hands the step's metrics to the loggers only after every hook has run: a run killed in between
    resumes after a step whose row was never written. Put before those callbacks, this hands the row
    to `JsonlLogger` as Lightning's `_LoggerConnector.update_train_step_metrics` will (same keys, same
    step), and the logger skips Lightning's own call. (W&B keeps Lightning's timing.)
    """

    def __init__(self, logger: JsonlLogger) -> None:
        self.logger = logger

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        connector = trainer._logger_connector
        if (trainer.fit_loop._should_accumulate() and trainer.lightning_module.automatic_optimization) \
                or not connector.should_update_logs:
            return
        metrics = convert_tensors_to_scalars(connector.metrics["log"])
        if not metrics:
            return
        step = metrics.pop("step", None)
        if step is None:
            metrics.setdefault("epoch", trainer.current_epoch)
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.logger.log_metrics(metrics, int(step))


def read_metrics(path: str | Path) -> dict[str, dict[int, float]]:
    """`{metric: {step: value}}` from a `metrics.jsonl`, the last value winning for repeated steps."""
    series: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key not in ("step", "time"):
                series.setdefault(key, {})[row["step"]] = value
    return series


WANDB_PROBE_SECONDS = 5.0  # the whole server probe, DNS included; wandb.init alone would wait ~109 s
WANDB_INIT_SECONDS = 60.0  # bounds wandb.init once the probe passed (W&B's default is 90 s)


def wandb_base_url() -> str:
    """The W&B server that wandb itself would talk to: `$WANDB_BASE_URL`, else the public one."""
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")


def wandb_api_key(base_url: str) -> str | None:
    """The key wandb would use: `$WANDB_API_KEY`, else the netrc entry `wandb login` wrote for the server's host."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    host = base_url.split("://")[-1].split("/")[0]
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def wandb_has_credentials() -> bool:
    """True when W&B can log online without asking: an API key in the environment or from `wandb login`."""
    return wandb_api_key(wandb_base_url()) is not None


def _short_reason(err: BaseException) -> str:
    """`[Errno 111] Connection refused` rather than requests' three nested reprs; else the exception's type."""
    found = re.findall(r"\[Errno -?\d+\] [^'\")\]]+", str(err))
    return found[-1].strip() if found else type(err).__name__


def _ask_viewer(base_url: str, key: str) -> str | None:
    """One GraphQL `viewer` query, the cheapest authenticated call; None when the key is accepted, else why not."""
    import requests  # a wandb dependency; imported here so that loading fusion stays fast

    try:
        response = requests.post(f"{base_url}/graphql", json={"query": "query { viewer { id } }"},
                                 auth=("api", key), timeout=WANDB_PROBE_SECONDS)
    except requests.RequestException as err:
        return f"server {base_url} unreachable ({_short_reason(err)})"
    if response.status_code in (401, 403):
        return f"API key refused by {base_url} (HTTP {response.status_code})"
    if response.status_code != 200:
        return f"server {base_url} answered HTTP {response.status_code}"
    try:
        viewer = (response.json().get("data") or {}).get("viewer")
    except (ValueError, AttributeError):
        return f"server {base_url} answered something other than W&B's GraphQL"
    return None if viewer else f"API key refused by {base_url} (no such user)"


@functools.cache
def wandb_server_problem(base_url: str, key: str) -> str | None:
    """Why W&B cannot log online with this server and key, or None when it can.

    Asked before `wandb.init`, which otherwise hangs ~109 s on an offline node and then crashes.
    The query runs in a daemon thread joined for at most WANDB_PROBE_SECONDS, because requests'
    timeout does not cover DNS. Cached: `plan()` and `Run.loggers()` agree and the server is asked once.
    """
    answer: list[str | None] = []
    thread = threading.Thread(target=lambda: answer.append(_ask_viewer(base_url, key)), daemon=True)
    thread.start()
    thread.join(WANDB_PROBE_SECONDS)
    return answer[0] if answer else f"server {base_url} did not answer within {WANDB_PROBE_SECONDS:g} s"


@functools.cache
def _auto_falls_back(base_url: str, key: str) -> bool:
    """True (after one warning line, printed once per process) when `auto` must log offline despite a key."""
    problem = wandb_server_problem(base_url, key)
    if problem:
        print(f"warning: W&B {problem}; wandb.mode=auto logs offline into the run folder; "
              f"sync later with `wandb sync RUN_DIR/wandb/offline-run-*`", file=sys.stderr)
    return problem is not None


def wandb_mode(config: WandbConfig) -> str:
    """The W&B mode in force: `auto` is online with credentials and a server that accepts them, else offline.

    `online` with a server that is unreachable or refuses the key raises FusionError at once
    instead of hanging in `wandb.init`.
    """
    if config.mode not in ("auto", "online"):
        return config.mode
    base_url = wandb_base_url()
    key = wandb_api_key(base_url)
    if config.mode == "auto":
        return "online" if key and not _auto_falls_back(base_url, key) else "offline"
    problem = wandb_server_problem(base_url, key) if key else "no API key (WANDB_API_KEY or `wandb login`)"
    if problem:
        raise FusionError(f"wandb.mode=online: W&B {problem}; check WANDB_API_KEY, WANDB_BASE_URL and the "
                          f"network, or set wandb.mode=offline (or auto, which falls back to offline)")
    return "online"


def describe_wandb_mode(config: WandbConfig) -> str:
    """The mode for the plan, without asking the server (`--dry-run` loads and contacts nothing)."""
    if config.mode != "auto":
        return config.mode
    if wandb_api_key(wandb_base_url()) is None:
        return "offline (auto: no credentials)"
    return "online (auto: credentials found; offline if the server does not accept them)"


def _start_wandb(logger: WandbLogger, mode: str) -> None:
    """Creates the W&B run now (Lightning would do it lazily), so a W&B failure is one FusionError line."""
    try:
        _ = logger.experiment
    except Exception as err:  # wandb raises CommError, UsageError, TimeoutError, ... — all the user's to fix
        raise FusionError(f"wandb.mode={mode}: W&B could not start a run ({first_line(err)}); check "
                          f"WANDB_API_KEY, WANDB_BASE_URL and the network, or set wandb.mode=offline") from err


def build_wandb_logger(config: WandbConfig, run_dir: Path, run_name: str, recipe_dict: dict) -> WandbLogger | None:
    """A WandbLogger writing under `run_dir/wandb`; the run id is kept in the run folder so a resume continues it."""
    if rank_zero_only.rank != 0:  # other ranks would log nothing, but race for the id file (and probe the server)
        return None
    mode = wandb_mode(config)
    if mode == "disabled":
        return None
    import wandb

    id_file = run_dir / "wandb_id"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:8]  # W&B's own id format: 8 lowercase hex/alphanumeric characters
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
    logger = WandbLogger(name=run_name, save_dir=str(run_dir), project=config.project, entity=config.entity,
                         id=run_id, resume="allow", mode=mode, tags=config.tags or None, log_model=False,
                         settings=wandb.Settings(init_timeout=WANDB_INIT_SECONDS))
    _start_wandb(logger, mode)
    logger.log_hyperparams(recipe_dict)
    return logger
