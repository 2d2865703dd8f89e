"""Finished runs that the experiment tables reuse: only under the settings they were trained with."""

from __future__ import annotations

from pathlib import Path

from fusion.errors import FusionError
from fusion.methods.registry import get_method
from fusion.pipeline import read_records, stage_states
from fusion.recipe import load_recipe


def check_same_settings(out: Path, recipe: str, overrides: list[str]) -> None:
    """Refuse to reuse the finished run in ``out`` unless ``python -m fusion.fit --recipe RECIPE OVERRIDES`` would
    run none of its stages again (each recorded with the key this recipe gives); otherwise a table re-run with,
    say, ``trainer.batch_size=16`` on a folder of batch-8 runs would report the old runs under the new command."""
    records = read_records(out)
    stale = [name for name, key in stage_keys(recipe, overrides).items() if records.get(name, {}).get("key") != key]
    if stale:
        raise FusionError(f"{out} holds a finished run made with other settings than this command's (its stages "
                          f"{', '.join(stale)} differ); pass --runs with a new folder for these settings, or "
                          f"delete {out} to train it again")


def stage_keys(recipe: str, overrides: list[str]) -> dict[str, str]:
    """Each stage's key under ``recipe`` with ``overrides``: what a run's records must hold to count as this run.
    For tables that keep a finished variant's results apart from its folder, which a later variant re-uses."""
    resolved = load_recipe(recipe, overrides)
    return {stage.name: key for stage, key, _ in stage_states(resolved, get_method(resolved.method).stages, {})}
