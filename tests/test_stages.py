"""Stages as objects: keys, what a re-run skips, the plan, a method registered from outside, and sub-runs."""

import copy
import dataclasses
import json

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

from fusion.config import Recipe
from fusion.methods.base import Method
from fusion.methods.clm import row_datamodule
from fusion.methods.registry import METHODS, register
from fusion.modules.base import CausalLMModule
from fusion.pipeline import plan, read_records, run, stage_states
from fusion.recipe import load_recipe
from fusion.stages.base import Stage, recipe_slice
from fusion.stages.subruns import SubRuns
from fusion.stages.training import Export, Train


class Prepare(Stage):
    name = "prepare"
    config = ("data.block_size",)


class Fit(Stage):
    name = "fit"
    needs = ("prepare",)
    config = ("optim",)


class Report(Stage):
    name = "report"
    needs = ("fit",)
    config = ("data.max_validation_blocks",)


STAGES = (Prepare(), Fit(), Report())


def states(recipe: Recipe, records: dict) -> dict[str, str]:
    return {stage.name: state for stage, _, state in stage_states(recipe, STAGES, records)}


def test_a_stage_reruns_when_its_settings_change_and_so_does_everything_that_reads_it():
    recipe = load_recipe("clm.yaml")
    done = {s.name: {"key": key, "result": {}} for s, key, _ in stage_states(recipe, STAGES, {})}
    assert states(recipe, done) == {"prepare": "done", "fit": "done", "report": "done"}
    # a key the report does not read: nothing re-runs; W&B and workers never count
    assert states(load_recipe("clm.yaml", ["wandb.project=other", "data.num_workers=3"]), done)["prepare"] == "done"
    # the report's own setting: only the report
    assert states(load_recipe("clm.yaml", ["data.max_validation_blocks=3"]), done) == {
        "prepare": "done", "fit": "done", "report": "stale"}
    # the first stage's setting: it and everything downstream
    assert states(load_recipe("clm.yaml", ["data.block_size=64"]), done) == {
        "prepare": "stale", "fit": "stale", "report": "stale"}
    # a newer version of a stage is another stage
    done_again = dict(done)
    Fit.version = 2
    try:
        assert states(recipe, done_again) == {"prepare": "done", "fit": "stale", "report": "stale"}
    finally:
        Fit.version = 1
    assert states(recipe, {"prepare": done["prepare"]}) == {"prepare": "done", "fit": "todo", "report": "todo"}


def test_a_recipe_slice_holds_only_the_keys_asked_for():
    recipe = load_recipe("fusellm.yaml")
    sliced = recipe_slice(recipe, ("fusion.alignment", "teachers"))
    assert sliced["fusion.alignment"] == "prefix" and "fusion.function" not in sliced
    assert any(k.startswith("teachers") for k in sliced) and not any(k.startswith("wandb") for k in sliced)


def test_the_plan_lists_every_stage_with_its_key_and_state(tmp_path):
    recipe = load_recipe("fusellm.yaml", [f"output_dir={tmp_path}"])
    text = plan(recipe)
    for i, stage in enumerate(("representations", "alignment", "baseline", "train", "export", "evaluate"), 1):
        assert f"  {i}. {stage}" in text
    assert text.count(" todo ") == 6
    assert ("FuseLLMModule(): 0.7 x CLM + 0.3 x CE(MinCE-fused teachers at span level (32 tokens), the rest of the "
            "vocabulary as one outcome)") in text


class Seeds(Method):
    """A method from outside the package: CLM once per seed, each in a sub-run of its own."""

    name = "test-seeds"
    summary = "CLM with seeds 1 and 2"
    module = CausalLMModule
    stages = (SubRuns(name="seeds", config=("model", "data", "optim", "trainer"), stages=(Train(), Export()),
                      branches=lambda recipe: {f"seed{s}": dataclasses.replace(copy.deepcopy(recipe), seed=s)
                                               for s in (1, 2)}),)

    def datamodule(self, ctx):
        return row_datamodule(ctx)


@pytest.fixture
def seeds_method():
    register(Seeds())
    yield
    METHODS.pop("test-seeds")


def test_a_stage_fans_out_into_sub_runs_that_resume_on_their_own(seeds_method, tmp_path, zoo_dir, cache_dir, capsys):
    out = tmp_path / "seeds"
    overrides = tiny_overrides(out, zoo_dir, cache_dir, **{"method": "test-seeds", "trainer.max_steps": 3,
                                                            "trainer.val_every_n_steps": "null",
                                                            "wandb.mode": "disabled"})
    run(load_recipe("clm.yaml", overrides))
    branches = {label: out / "branches" / label for label in ("seed1", "seed2")}
    for folder in branches.values():
        assert (folder / "recipe.yaml").exists() and (folder / "stages" / "export.json").exists()
    a, b = (load_file(folder / "model" / "model.safetensors") for folder in branches.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the seeds changed the data order, so the weights
    record = read_records(out)["seeds"]["result"]["branches"]
    assert set(record) == {"seed1", "seed2"} and record["seed2"]["records"]["train"]["global_step"] == 3

    # a run killed in its second branch: the first is skipped, the second finishes its own missing stage
    (out / "stages" / "seeds.json").unlink()
    (branches["seed2"] / "stages" / "export.json").unlink()
    capsys.readouterr()
    run(load_recipe("clm.yaml", overrides))
    printed = capsys.readouterr().out
    assert printed.count("stage train: already done, skipped") == 2
    assert printed.count("stage export: already done, skipped") == 1 and "[fusion] stage export\n" in printed
    assert json.loads((out / "stages" / "seeds.json").read_text())["key"]
