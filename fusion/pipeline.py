"""A recipe's run: its folder, its method's stages, and what makes a re-run resume instead of starting over.

`Run` is the orchestrator. It locks the run folder for its lifetime (``.lock``: a second process on
the same folder is refused; the lock dies with its process), claims it (``recipe.yaml``; a different
recipe in the same folder is refused, but for the method's `open_keys`), runs the method's stages
(`fusion.methods`) in order, records each finished one in ``stages/NAME.json`` with its key, and on a
re-run skips every stage whose record has the key it would have now; a stage whose key changed runs
again, and so does everything that reads it. A stage whose record is current but whose outputs are
missing or damaged (`Stage.damaged`) runs again to repair them; what reads it runs again only if the
repaired result differs.

Under several processes every rank runs this file; files are written by global rank 0 only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import yaml
from lightning.pytorch.utilities import rank_zero_only

from fusion.config import Recipe, to_dict
from fusion.data.cache import atomic_write, hold_lock, lock_holder, read_json, remove_dead_staging
from fusion.errors import FusionError, first_line
from fusion.interrupt import Interrupted, requested
from fusion.loggers import JsonlLogger, build_wandb_logger, describe_wandb_mode
from fusion.methods.base import Method, model_dtype
from fusion.methods.registry import get_method
from fusion.stages.base import NOT_COMPUTED, Stage, flatten, within
from fusion.zoo import resolve_model


class Run:
    """One recipe's run folder, the state its stages share, and the loop that runs them.

    Stages use: ``recipe``, ``dir``, ``record(name)``, ``datamodule``, ``new_module(path)``,
    ``loggers()``, ``trainer``, ``is_global_zero``, ``artifacts`` (objects one stage hands to the next
    in this process), ``model_path`` / ``tokenizer_path`` (zoo names resolved) and ``child(...)``.
    """

    def __init__(self, recipe: Recipe, extra_callbacks: list[pl.Callback] = (), method: Method | None = None,
                 stages: tuple[Stage, ...] | None = None) -> None:
        self.recipe = recipe
        self.method = method or get_method(recipe.method)
        self.stages = tuple(stages if stages is not None else self.method.stages)
        self.dir = recipe.run_dir
        self.extra_callbacks = list(extra_callbacks)
        self.trainer: pl.Trainer | None = None
        self.records: dict[str, dict] = {}  # stage name -> {"key": ..., "result": ...}
        self.artifacts: dict = {}
        self._loggers: list | None = None
        self._datamodule: pl.LightningDataModule | None = None
        self._paths: tuple[str, str] | None = None
        self._lock = None  # the open lock file of the run folder, held while running
        self.stage_key: str | None = None

    # -- what stages read ----------------------------------------------------------------------------
    @property
    def model_path(self) -> str:
        return self._resolved()[0]

    @property
    def tokenizer_path(self) -> str:
        return self._resolved()[1]

    def _resolved(self) -> tuple[str, str]:
        if self._paths is None:  # zoo:NAME paths build the zoo on first use
            m, z = self.recipe.model, self.recipe.zoo
            self._paths = (resolve_model(m.path, z.size, z.dir), resolve_model(m.tokenizer or m.path, z.size, z.dir))
        return self._paths

    @property
    def is_global_zero(self) -> bool:
        return self.trainer.is_global_zero if self.trainer is not None else rank_zero_only.rank == 0

    def record(self, name: str) -> dict:
        """The result of the finished stage ``name``."""
        if name not in self.records:
            raise FusionError(f"{self.dir}: stage {name!r} has not run; run the recipe's stages in order")
        return self.records[name]["result"]

    def loggers(self) -> list:
        """metrics.jsonl and W&B, created on first use (a run whose stages are all done creates none)."""
        if self._loggers is None:
            self._loggers = [JsonlLogger(self.dir / "metrics.jsonl")]
            wandb_logger = build_wandb_logger(self.recipe.wandb, self.dir, self.recipe.name, to_dict(self.recipe))
            if wandb_logger is not None:
                self._loggers.append(wandb_logger)
        return self._loggers

    @property
    def datamodule(self) -> pl.LightningDataModule:
        if self._datamodule is None:
            self._datamodule = self.method.datamodule(self)
        return self._datamodule

    def new_module(self, model_path: str) -> pl.LightningModule:
        """The method's module (or the recipe's subclass) around the HF model at ``model_path``."""
        dm = self.datamodule
        dm.prepare_data()
        dm.setup("fit")
        return self.method.new_module(self, model_path, tuple(dm.validation_names))

    def module_description(self) -> dict:
        """The module class, its own arguments and its objective, for results and the plan."""
        return self.method.describe_module(self.recipe)

    def child(self, label: str, recipe: Recipe, stages: tuple[Stage, ...], method: Method | None = None) -> Run:
        """A sub-run of ``stages`` (of ``method``, default this run's) in ``DIR/branches/LABEL``
        (`fusion.stages.subruns`); sets ``recipe``'s folder."""
        recipe.output_dir = str(self.dir / "branches" / label)
        return Run(recipe, self.extra_callbacks, method or self.method, stages)

    # -- the folder --------------------------------------------------------------------------------
    def lock_folder(self) -> None:
        """Hold ``DIR/.lock`` until this process ends or `release` (global rank 0 only: the other ranks are its run)."""
        if not self.is_global_zero or self._lock is not None:
            return
        lock = self.dir / ".lock"
        try:
            self._lock = hold_lock(lock)
        except OSError as err:
            raise FusionError(f"output_dir {self.dir}: cannot create the run folder or its lock "
                              f"({err.strerror or first_line(err)}); choose a writable output_dir") from None
        if self._lock is None:
            raise FusionError(f"output_dir {self.dir} is in use by another run ({lock_holder(lock)}); wait for it "
                              "to finish, or give this run another output_dir")
        remove_dead_staging(self.dir)  # what a killed export or write left

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def claim_folder(self) -> None:
        """Write recipe.yaml, or check that the folder's earlier run used the same recipe; read the records."""
        resolved = to_dict(self.recipe)
        saved_file = self.dir / "recipe.yaml"
        if saved_file.exists():
            saved = flatten(read_yaml(saved_file, "delete it and re-run with the same recipe (finished stages are "
                                                  "kept)"))
            for key, value in flatten(resolved).items():
                # a key missing from the saved recipe did not exist when it was written: not a difference
                changeable = within(key, NOT_COMPUTED) or within(key, self.method.open_keys)
                if not changeable and key in saved and saved[key] != value:
                    raise FusionError(
                        f"{self.dir} holds a run of a different recipe ({key}: {saved.get(key)!r} there, "
                        f"{value!r} now); resume with the same recipe, or start anew with output_dir=runs/NEW_NAME")
        if self.is_global_zero:  # a recipe again: `fit --recipe RUN/recipe.yaml` resumes this run
            text = yaml.safe_dump({k: v for k, v in resolved.items() if k != "source_file"}, sort_keys=False).encode()
            atomic_write(saved_file, lambda f: f.write(text))
        self.records = read_records(self.dir)

    def finish(self, name: str, key: str, result: dict) -> None:
        self.records[name] = {"key": key, "result": json.loads(json.dumps(result))}  # as a re-run reads it
        if self.is_global_zero:
            (self.dir / "stages").mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.records[name], indent=2).encode()
            atomic_write(self.dir / "stages" / f"{name}.json", lambda f: f.write(text))

    # -- running -----------------------------------------------------------------------------------
    def run(self) -> Run:
        """Run every stage that is not done with its current key, in order, holding the folder's lock."""
        # Seeded here, not once per process: a branch's results must not depend on the branches before it.
        pl.seed_everything(self.recipe.seed, workers=True, verbose=False)
        self.lock_folder()
        try:
            self.claim_folder()
            self._run_stages()
        finally:
            self.release()
        for logger in self._loggers or []:
            logger.finalize("success")
        return self

    def _run_stages(self) -> None:
        keys: dict[str, str] = {}
        changed: set[str] = set()  # stages that ran with a result their readers have not seen
        for stage in self.stages:
            key = keys[stage.name] = stage.key(self.recipe, keys)
            record = self.records.get(stage.name)
            state = stage_state(record, key, stage, changed)
            if state == "done":
                problem = stage.damaged(self, record["result"])
                if problem is None:
                    print(f"[fusion] stage {stage.name}: already done, skipped")
                    continue
                print(f"[fusion] stage {stage.name}: {problem}; running it again to repair it")
            elif state == "stale":
                print(f"[fusion] stage {stage.name}: its record is from other settings or an older version; "
                      "running it again")
            else:
                print(f"[fusion] stage {stage.name}")
            self.stage_key = key  # what the running stage is keyed by (its outputs may carry it)
            self.finish(stage.name, key, stage.run(self))
            if state != "done" or self.records[stage.name]["result"] != record["result"]:
                changed.add(stage.name)
            if requested():  # a stop asked for too late to cut the stage short: it finished, now stop
                raise Interrupted(requested(), f"stopped after stage {stage.name}")


def read_records(run_dir: Path) -> dict[str, dict]:
    folder = run_dir / "stages"
    if not folder.is_dir():
        return {}
    fix = "delete it and re-run: that stage runs again (the others are kept)"
    return {p.stem: read_json(p, fix) for p in sorted(folder.glob("*.json"))}


def read_yaml(path: Path, fix: str):
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise FusionError(f"{path} cannot be read ({first_line(err)}); {fix}") from None
    if not isinstance(content, dict):
        raise FusionError(f"{path} is not a recipe (a mapping of keys); {fix}")
    return content


def stage_state(record: dict | None, key: str, stage: Stage, rerun: set[str]) -> str:
    """``done`` (recorded with this key, and none of what it reads runs again), ``stale`` (recorded with
    another key, or something it reads runs again) or ``todo`` (never recorded)."""
    if record is None:
        return "todo"
    return "done" if record.get("key") == key and not rerun & set(stage.needs) else "stale"


def stage_states(recipe: Recipe, stages: tuple[Stage, ...], records: dict[str, dict]) -> list[tuple[Stage, str, str]]:
    """``(stage, key, state)`` in order, as a run would find them (outputs are not checked: see `Stage.damaged`)."""
    keys: dict[str, str] = {}
    rerun: set[str] = set()
    states = []
    for stage in stages:
        key = keys[stage.name] = stage.key(recipe, keys)
        state = stage_state(records.get(stage.name), key, stage, rerun)
        if state != "done":
            rerun.add(stage.name)
        states.append((stage, key, state))
    return states


def plan(recipe: Recipe) -> str:
    """What a run of this recipe will do, without loading anything heavy."""
    method = get_method(recipe.method)
    t, o = recipe.trainer, recipe.optim
    devices = f"{t.devices} device(s) x {t.num_nodes} node(s)"
    per_step = f"{t.batch_size} x {t.accumulate_grad_batches} accumulation per device"
    strategy = t.strategy
    if t.strategy == "fsdp":
        f = recipe.fsdp
        strategy += (f" ({f.sharding_strategy}, wrap {', '.join(f.wrap) or 'model default'}, "
                     f"activation checkpointing {f.activation_checkpointing}, {f.state_dict_type} state dict)")
    elif t.strategy == "deepspeed":
        strategy += f" (ZeRO stage {recipe.deepspeed.stage}, offload optimizer {recipe.deepspeed.offload_optimizer})"
    lines = [f"recipe    {recipe.name} ({recipe.source_file})", f"method    {method.name}: {method.summary}"]
    if method.module is None:  # nothing is trained: no model, module or optimizer to describe
        lines += [f"output    {recipe.run_dir}/ (recipe.yaml, stages/ and what the stages write)",
                  f"data      {method.describe_data(recipe)}",
                  f"trainer   {devices}, accelerator {t.accelerator} (prediction only)"]
    else:
        module = method.describe_module(recipe)
        args = ", ".join(f"{k}={v!r}" for k, v in module["args"].items())
        lines += [
            f"output    {recipe.run_dir}/ ({method.outputs})",
            f"model     {recipe.model.path} (dtype {model_dtype(recipe)}, gradient checkpointing "
            f"{recipe.model.gradient_checkpointing})",
            f"module    {module['class'].rsplit('.', 1)[-1]}({args}): {module['objective']}",
            f"data      {method.describe_data(recipe)}",
            f"optim     {o.name} lr {o.lr:g}, weight decay {o.weight_decay:g}, betas {tuple(o.betas)}, "
            f"{o.schedule} schedule, warmup {o.warmup_ratio:g}",
            f"trainer   {devices}, strategy {strategy}, precision {t.precision}, batch {per_step}, "
            f"{'max_steps ' + str(t.max_steps) if t.max_steps > 0 else str(t.max_epochs) + ' epoch(s)'}, "
            f"clip {t.gradient_clip_val}, checkpoint every {t.checkpoint_every_n_steps} steps",
        ]
    lines += [
        f"logging   W&B {describe_wandb_mode(recipe.wandb)} (project {recipe.wandb.project}), metrics.jsonl",
        *method.plan(recipe),
        "stages    (key: a hash of the recipe keys a stage depends on; done = recorded in the run folder)",
    ]
    records = read_records(recipe.run_dir)
    for i, (stage, key, state) in enumerate(stage_states(recipe, method.stages, records), 1):
        lines.append(f"  {i}. {stage.name:<16} {key}  {state:<5}  {stage.describe(recipe)}")
        if stage.outputs:
            lines.append(f"     {'':<16} {'':<12}  {'':<5}  -> {', '.join(stage.outputs)}")
    return "\n".join(lines)


def run(recipe: Recipe, extra_callbacks: list[pl.Callback] = ()) -> Run:
    """Run (or resume) every unfinished stage of the recipe."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked DataLoader workers otherwise warn
    return Run(recipe, list(extra_callbacks)).run()
