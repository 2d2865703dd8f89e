"""Where metrics go: Weights & Biases (online or offline) and a JSON-lines file in the run folder."""

from __future__ import annotations

import json
import netrc
import os
import time
import uuid
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from fusion.config import WandbConfig


class JsonlLogger(Logger):
    """Appends one JSON object per logging call to `metrics.jsonl`: `{"step", "time", name: value, ...}`.

    Appending (unlike Lightning's CSVLogger, which rewrites its file) keeps the metrics of an
    interrupted run; after a resume, steps between the last checkpoint and the interruption appear
    twice, and readers keep the last value (see `read_metrics`).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> dict[str, dict[int, float]]:
    """`{metric: {step: value}}` from a `metrics.jsonl`, the last value winning for repeated steps."""
    series: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key not in ("step", "time"):
                series.setdefault(key, {})[row["step"]] = value
    return series


def wandb_has_credentials() -> bool:
    """True when W&B can log online without asking: an API key in the environment or from `wandb login`."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(config: WandbConfig) -> str:
    """The W&B mode in force: `auto` becomes online with credentials, offline without."""
    if config.mode != "auto":
        return config.mode
    return "online" if wandb_has_credentials() else "offline"


def build_wandb_logger(config: WandbConfig, run_dir: Path, run_name: str, recipe_dict: dict) -> WandbLogger | None:
    """A WandbLogger writing under `run_dir/wandb`; the run id is kept in the run folder so a resume continues it."""
    mode = wandb_mode(config)
    if mode == "disabled" or rank_zero_only.rank != 0:  # other ranks would log nothing, but race for the id file
        return None
    id_file = run_dir / "wandb_id"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:8]  # W&B's own id format: 8 lowercase hex/alphanumeric characters
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
    logger = WandbLogger(name=run_name, save_dir=str(run_dir), project=config.project, entity=config.entity,
                         id=run_id, resume="allow", mode=mode, tags=config.tags or None, log_model=False)
    logger.log_hyperparams(recipe_dict)
    return logger
