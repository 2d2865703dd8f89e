"""A stage: one step of a method, with a name, the stages it reads, and the recipe keys it depends on.

A method (`fusion.methods`) is a list of stages; `fusion.pipeline.Run` runs them in order, records
each finished one in ``stages/NAME.json`` and skips it on a re-run. A stage's *key* is a hash of the
recipe keys it depends on and of the keys of the stages it reads, so a record made under other
settings (or by an older version of the stage) is never taken for this one.

A stage reads and writes through the run it is given (``ctx``, a `Context`; `fusion.pipeline.Run` is one):

    ctx.recipe, ctx.dir               the recipe and the run folder
    ctx.record(name)                  the result of an earlier stage (a JSON-able dict)
    ctx.datamodule, ctx.new_module()  the method's data module and LightningModule
    ctx.loggers(), ctx.trainer        the run's loggers; the last Trainer built (for ranks and barriers)
    ctx.is_global_zero                only global rank 0 writes shared files
    ctx.stage_key                     the running stage's key (outputs that outlive a record may carry it)
    ctx.child(label, recipe, stages, method)  a sub-run in its own folder (see `fusion.stages.subruns`)

Stages hold no loss math and no data logic: they build a Trainer, a data module and a module from
the recipe and run them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from fusion.config import Recipe, to_dict

# Recipe keys that never change what a stage computes: left out of every key (and may change on resume).
NOT_COMPUTED = ("name", "output_dir", "source_file", "wandb", "data.num_workers", "data.preprocessing_workers")


def recipe_slice(recipe: Recipe, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of dotted recipe ``keys`` (sections or single fields), ``NOT_COMPUTED`` ones dropped."""
    return {k: v for k, v in flatten(to_dict(recipe)).items() if within(k, keys) and not within(k, NOT_COMPUTED)}


def within(key: str, sections: tuple[str, ...]) -> bool:
    """Whether the dotted ``key`` is one of ``sections`` or lies inside one (``optim.lr`` in ``optim``)."""
    return any(key == s or key.startswith(s + ".") for s in sections)


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested mapping as ``{dotted.key: value}`` (an empty mapping stays one value)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Context(Protocol):
    """What a stage may use of the run it is part of (`fusion.pipeline.Run` implements it)."""

    recipe: Recipe
    dir: Path
    trainer: Any
    artifacts: dict
    extra_callbacks: list
    model_path: str
    tokenizer_path: str
    is_global_zero: bool
    datamodule: Any
    records: dict[str, dict]
    stage_key: str | None  # the key of the stage running now

    def record(self, name: str) -> dict: ...
    def loggers(self) -> list: ...
    def new_module(self, model_path: str) -> Any: ...
    def module_description(self) -> dict: ...
    def child(self, label: str, recipe: Recipe, stages: tuple[Stage, ...], method: Any = None) -> Context: ...
    def run(self) -> Context: ...


class Stage:
    """One step of a method. Subclasses set the class attributes and implement `run`.

    Attributes:
        name: the stage's name, unique in its method; its record is ``stages/NAME.json``.
        needs: the stages whose records `run` reads (they run first; their keys are part of this key).
        config: the dotted recipe keys (or whole sections) its result depends on.
        outputs: what it writes: paths in the run folder, or a shared store by name.
        version: bump when the stage computes something different from the same inputs.
        summary: one line for the `--dry-run` plan.

    A re-run skips a recorded stage only if `damaged` finds its outputs intact.
    """

    name: str = ""
    needs: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    version: int = 1
    summary: str = ""

    def __init__(self, **attributes: Any) -> None:
        """Class attributes may be set per instance, e.g. ``Train(needs=("alignment",))`` in a method."""
        for name, value in attributes.items():
            if not hasattr(type(self), name):
                raise TypeError(f"{type(self).__name__} has no attribute {name!r}")
            setattr(self, name, value)

    def key(self, recipe: Recipe, needed: dict[str, str]) -> str:
        """A hash of this stage's recipe slice, its version and the keys of the stages it needs."""
        content = {"stage": self.name, "version": self.version, "config": recipe_slice(recipe, self.config),
                   "needs": {name: needed[name] for name in self.needs}}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def describe(self, recipe: Recipe) -> str:
        """What the stage does, for the plan; override for details that depend on the recipe."""
        return self.summary

    def damaged(self, ctx: Context, result: dict) -> str | None:
        """Why the outputs of this stage's finished run (its recorded ``result``) cannot be used, or None.

        Called on a re-run before skipping the stage: a reason (an output missing, a checksum failing)
        makes the run repeat the stage to repair them. Override for stages whose outputs can go missing.
        """
        return None

    def run(self, ctx: Context) -> dict:
        """Do the work; return the stage's record (JSON-able)."""
        raise NotImplementedError(f"stage {self.name!r} does not implement run()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

