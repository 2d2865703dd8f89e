"""`Method`: a method's stages, data module and module class, and how a recipe builds them."""

from __future__ import annotations

import importlib
import inspect
import typing

import lightning.pytorch as pl

from fusion.config import Recipe
from fusion.errors import FusionError
from fusion.schema import convert
from fusion.stages.base import Stage


def model_dtype(recipe: Recipe) -> str:
    """`model.dtype` with `auto` resolved: bf16 weights under bf16-true precision, else float32."""
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    return "bfloat16" if recipe.trainer.precision == "bf16-true" else "float32"


class Method:
    """A training method. Subclasses set `name`, `summary`, `stages` and `module`, and build the data module.

    Attributes:
        name: what recipes write as ``method: NAME``.
        summary: one line for the plan and the registry's listing.
        stages: the stages, in order.
        module: the LightningModule class that implements the objective (a ``module_class`` of a
            recipe must subclass it).
    """

    name: str = ""
    summary: str = ""
    stages: tuple[Stage, ...] = ()
    module: type | None = None
    outputs: str = "recipe.yaml, stages/, metrics.jsonl, checkpoints/, model/, results.md"
    """What its run folder holds, for the plan's ``output`` line."""
    open_keys: tuple[str, ...] = ()
    """Recipe keys that may change in an existing run folder (the stages whose keys depend on them run again);
    any other change is refused, so that results are never mixed."""

    # -- recipe --------------------------------------------------------------------------------
    def check(self, recipe: Recipe) -> None:
        """Method-specific recipe checks; raise `FusionError` naming the key and the fix."""

    def describe_data(self, recipe: Recipe) -> str:
        """What the method trains on, for the plan's ``data`` line."""
        d = recipe.data
        source = f"{d.source}" + (f" [{', '.join(d.domains)}]" if d.source == "embedded" else "")
        return (f"{source}, block {d.block_size} tokens, validation: split {d.validation_split!r} "
                f"or {d.validation_fraction:.0%} held out")

    def plan(self, recipe: Recipe) -> list[str]:
        """Method-specific lines of the `--dry-run` plan."""
        return []

    # -- building --------------------------------------------------------------------------------
    def datamodule(self, ctx) -> pl.LightningDataModule:
        """The data module of the run ``ctx`` (a `fusion.pipeline.Run`)."""
        raise NotImplementedError

    def module_kwargs(self, recipe: Recipe) -> dict:
        """Constructor arguments of the method's module beyond the common ones (e.g. its objective's config)."""
        return {}

    def module_class(self, recipe: Recipe) -> type:
        """The recipe's ``module_class`` (a subclass of `module`), or `module` itself."""
        if not recipe.module_class:
            return self.module
        module_name, _, class_name = recipe.module_class.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as err:
            raise FusionError(f"recipe key 'module_class': cannot import {recipe.module_class!r} ({err}); "
                              "give a dotted path such as mypackage.losses.MyModule on PYTHONPATH") from None
        if not (isinstance(cls, type) and issubclass(cls, self.module)):
            raise FusionError(f"recipe key 'module_class': {recipe.module_class!r} must subclass "
                              f"{self.module.__module__}.{self.module.__name__} (method {self.name!r})")
        return cls

    def module_args(self, recipe: Recipe) -> dict:
        """``module_args`` checked against the module class's constructor: names, required ones, types."""
        if self.module is None:  # a method that trains nothing
            if recipe.module_class or recipe.module_args:
                key = "module_class" if recipe.module_class else "module_args"
                raise FusionError(f"recipe key {key!r}: method {self.name!r} trains no module; remove it")
            return {}
        cls = self.module_class(recipe)
        accepted = constructor_parameters(cls)
        reserved = constructor_parameters(self.module)  # set by the framework from the recipe's sections
        user = {name: p for name, p in accepted.items() if name not in reserved}
        for key in recipe.module_args:
            if key in reserved:
                raise FusionError(f"recipe key 'module_args.{key}': {key!r} is set by the framework from the recipe "
                                  f"(e.g. optim, fusion, model sections), not by module_args; remove it")
            if key not in user:
                known = ", ".join(sorted(user)) or f"none ({cls.__name__} takes no arguments of its own)"
                raise FusionError(f"unknown recipe key 'module_args.{key}' for {cls.__name__}: remove it or use one "
                                  f"of: {known}")
        missing = [name for name, p in user.items() if p.default is inspect.Parameter.empty
                   and name not in recipe.module_args]
        if missing:
            raise FusionError(f"recipe key 'module_args.{missing[0]}' is required by {cls.__name__}: add it")
        return check_types(cls, recipe.module_args)

    def new_module(self, ctx, model_path: str, validation_names: tuple[str, ...]) -> pl.LightningModule:
        """The module that trains (or evaluates) the HF model at ``model_path``."""
        r = ctx.recipe
        cls, args = self.module_class(r), self.module_args(r)
        # ZeRO-3 partitions the head's weight outside its own forward: the loss must read the model's logits.
        zero3 = r.trainer.strategy == "deepspeed" and r.deepspeed.stage == 3
        module = cls(model_path=model_path, optim=r.optim, dtype=model_dtype(r),
                     gradient_checkpointing=r.model.gradient_checkpointing,
                     attn_implementation=r.model.attn_implementation, trust_remote_code=r.model.trust_remote_code,
                     validation_names=validation_names, fused_head=r.model.fused_head and not zero3,
                     loss_chunk_size=r.model.loss_chunk_size, **self.module_kwargs(r), **args)
        # Checkpoints say what was trained: the class, its own arguments and its objective.
        module.hparams["module"] = self.describe_module(r)
        return module

    def describe_module(self, recipe: Recipe) -> dict:
        """``{"class", "args", "objective"}`` of the module that trains ``recipe``, without building it."""
        if self.module is None:
            return {"class": None, "args": {}, "objective": "none (nothing is trained)"}
        cls, args = self.module_class(recipe), self.module_args(recipe)
        return {"class": f"{cls.__module__}.{cls.__qualname__}", "args": args,
                "objective": cls.objective(**self.module_kwargs(recipe), **args)}


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named parameters ``cls(...)`` accepts: its ``__init__``'s, and its bases' while ``**kwargs`` passes
    them on."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        forwards = False
        for name, p in inspect.signature(init).parameters.items():
            if name == "self" or p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            else:
                params.setdefault(name, p)
        if not forwards:
            break
    return params


def check_types(cls: type, args: dict) -> dict:
    """``args`` converted to the annotations of ``cls``'s constructor, with the recipe's errors and coercions."""
    hints: dict = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None:
            try:
                hints.update(typing.get_type_hints(init))
            except Exception:  # an annotation that does not resolve: take the value as it is
                pass
    return {key: convert(hints[key], value, f"module_args.{key}") if key in hints else value
            for key, value in args.items()}
