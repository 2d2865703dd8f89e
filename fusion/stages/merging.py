"""The stage that merges FuseChat's pairwise targets into one model, in parameter space (`fusion.merge`).

    merge   the exports of the ``pairs`` stage's branches, merged with the pivot as base by `merge.method` into
            ``model/`` (an HF folder with the pivot's tokenizer, chat template and generation config) and
            ``model/merge.json`` (the config it ran, and VaRM's / SCE's per-tensor weights)
"""

from __future__ import annotations

from pathlib import Path

from fusion.config import Recipe
from fusion.merge.config import load_merge_config
from fusion.merge.stream import run_merge
from fusion.stages.base import Stage


def pair_exports(ctx) -> dict[str, Path]:
    """Each pairwise target's HF folder, by source label, from the ``pairs`` stage's record."""
    branches = ctx.record("pairs")["branches"]
    return {label: ctx.dir / "branches" / label / b["records"]["export"]["path"] for label, b in branches.items()}


def merge_config(recipe: Recipe, pivot: str, targets: dict[str, str]) -> dict:
    """The mergekit-style config (`fusion.merge.config`) of ``recipe``'s merge of ``targets`` over ``pivot``."""
    m = recipe.merge
    models = [{"model": path, "parameters": dict(m.model_parameters.get(label, {}))} for label, path in targets.items()]
    # SLERP interpolates two models, from the first target (t = 0) to the second, as FuseChat's config does.
    base = models[0]["model"] if m.method == "slerp" else pivot
    config = {"merge_method": m.method, "base_model": base, "parameters": dict(m.parameters), "models": models}
    if m.dtype != "auto":
        config["dtype"] = m.dtype
    return config


class Merge(Stage):
    name = "merge"
    needs = ("pairs",)
    config = ("model", "merge")
    outputs = ("model/ (the merged model, with merge.json)",)
    summary = "merge the pairwise targets in parameter space, the pivot as base"

    def describe(self, recipe: Recipe) -> str:
        return f"{recipe.merge.method} merge of the pairwise targets, the pivot as base"

    def run(self, ctx) -> dict:
        out = ctx.dir / "model"
        targets = {label: str(path) for label, path in pair_exports(ctx).items()}
        config = load_merge_config(merge_config(ctx.recipe, ctx.model_path, targets))
        record = run_merge(config, out) if ctx.is_global_zero else {}
        if ctx.trainer is not None:  # the other ranks evaluate the merged model next: wait until it is written
            ctx.trainer.strategy.barrier("merge")
        return {"path": "model", "method": config.merge_method, "tensors": record.get("tensors"),
                "seconds": record.get("seconds")}

    def damaged(self, ctx, result: dict) -> str | None:
        folder = ctx.dir / result["path"]
        intact = (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
        return None if intact else f"the merged model {folder} is missing or incomplete"
