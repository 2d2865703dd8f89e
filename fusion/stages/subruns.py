"""A stage that fans out into sub-runs: the same stages run once per branch, each in a folder of its own.

FuseChat trains one pair (pivot + one source) per source, then merges the results; a sweep trains
one model per setting. Each branch is a full run of its own (``RUN/branches/LABEL/``: its recipe.yaml,
stages/, checkpoints/, metrics and W&B run), so it resumes on its own, and adding a branch to a
recipe runs only that branch. The stage's record lists every branch's records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fusion.config import Recipe
from fusion.stages.base import Stage


class SubRuns(Stage):
    """Run ``stages`` once per branch; ``branches(recipe)`` gives each branch's label and recipe.

    A branch's recipe gets its own ``output_dir`` (``RUN/branches/LABEL``); everything else is as the
    method's ``branches`` function sets it (e.g. a different teacher or seed). Each branch is seeded
    with its recipe's seed, so it computes the same whichever branches ran before it.
    """

    stages: tuple[Stage, ...] = ()
    branches: Callable[[Recipe], dict[str, Recipe]] | None = None
    method: Any = None  # the `fusion.methods.base.Method` each branch runs (its data module, module); None: the run's
    outputs = ("branches/LABEL/ (one run folder per branch)",)

    def describe(self, recipe: Recipe) -> str:
        labels = ", ".join(self.branches(recipe)) if self.branches else "none"
        inner = " -> ".join(s.name for s in self.stages)
        return f"{self.summary or 'one sub-run per branch'}: {inner} for each of {labels}"

    def run(self, ctx) -> dict:
        results = {}
        for label, recipe in self.branches(ctx.recipe).items():
            print(f"[fusion] stage {self.name}: branch {label}")
            child = ctx.child(label, recipe, self.stages, self.method)
            child.run()
            results[label] = {"dir": str(child.dir), "records": {name: child.record(name) for name in child.records}}
        return {"branches": results}
