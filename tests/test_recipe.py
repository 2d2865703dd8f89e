"""The recipe schema: every shipped recipe loads, and every kind of mistake is one clear line and exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusion.config import to_dict
from fusion.errors import FusionError
from fusion.recipe import RECIPES_DIR, load_recipe

SHIPPED = sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))


def fit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusion.fit", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_dry_runs(name):
    result = fit("--recipe", name, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "stages" in result.stdout and "trainer" in result.stdout


def test_7b_dry_run_prints_the_plan_without_loading():
    result = fit("--recipe", "clm-llama2-7b.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr
    for expected in ("meta-llama/Llama-2-7b-hf", "JeanKaddour/minipile", "fsdp (FULL_SHARD, wrap LlamaDecoderLayer",
                     "bf16-mixed", "lr 1e-05", "weight decay 0.1", "betas (0.9, 0.95)", "warmup 0.008", "8 device(s)"):
        assert expected in result.stdout
    deepspeed = fit("--recipe", "clm-llama2-7b.yaml", "--dry-run", "trainer.strategy=deepspeed")
    assert deepspeed.returncode == 0 and "deepspeed (ZeRO stage 2" in deepspeed.stdout


def write(tmp_path: Path, changes: dict) -> Path:
    raw = yaml.safe_load((RECIPES_DIR / "clm.yaml").read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("changes, named", [
    ({"trainer.max_stepz": 10}, "trainer.max_stepz"),
    ({"optim.lr": "fast"}, "optim.lr"),
    ({"trainer.precision": "bf17"}, "trainer.precision"),
    ({"model.path": "./no/such/model"}, "model.path"),
    ({"data.source": "/no/such/corpus.jsonl"}, "data.source"),
    ({"optim.betas": [0.9]}, "optim.betas"),
    ({"model.path": "zoo:gpt5"}, "model.path"),
])
def test_bad_recipe_exits_2_with_one_line_naming_the_key(tmp_path, changes, named):
    result = fit("--recipe", str(write(tmp_path, changes)), "--dry-run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


def test_bad_override_and_missing_recipe_exit_2():
    result = fit("--recipe", "clm.yaml", "--dry-run", "trainer.batch_size=-3")
    assert result.returncode == 2 and "trainer.batch_size" in result.stderr
    result = fit("--recipe", "no-such-recipe.yaml", "--dry-run")
    assert result.returncode == 2 and "clm.yaml" in result.stderr  # lists the shipped ones


def test_impossible_combinations_are_refused():
    with pytest.raises(FusionError, match="model.gradient_checkpointing"):
        load_recipe("clm-llama2-7b.yaml", ["model.gradient_checkpointing=true"])
    with pytest.raises(FusionError, match="optim.name"):
        load_recipe("clm-llama2-7b.yaml", ["trainer.strategy=deepspeed", "optim.name=adamw8bit"])
    with pytest.raises(FusionError, match="module_class"):
        load_recipe("clm.yaml", ["module_class=collections.OrderedDict"])


def test_overrides_are_typed_and_round_trip():
    recipe = load_recipe("clm.yaml", ["trainer.max_steps=7", "optim.lr=0.01", "data.domains=[prose]"])
    assert recipe.trainer.max_steps == 7 and recipe.optim.lr == 0.01 and recipe.data.domains == ["prose"]
    assert isinstance(recipe.optim.betas, tuple)
    again = to_dict(recipe)
    assert again["trainer"]["max_steps"] == 7 and again["optim"]["betas"] == [0.9, 0.95]


def test_fsdp_strategy_finds_the_layer_class(zoo_dir):
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from fusion.trainer import build_strategy

    # the class is found in the model's own transformers module, not by importing every model module
    # (some need optional packages such as librosa: that scan broke on a GPU machine); the session's small zoo, as
    # the full one would be built first on a fresh machine (a minute)
    recipe = load_recipe("clm-llama2-7b.yaml", ["model.path=zoo:target", "zoo.size=small", f"zoo.dir={zoo_dir}"])
    strategy = build_strategy(recipe)
    assert isinstance(strategy, FSDPStrategy)
    assert LlamaDecoderLayer in strategy.kwargs["auto_wrap_policy"]._module_classes


@pytest.mark.parametrize("overrides, message", [
    (["module_args.alpha=0.2"], "unknown recipe key 'module_args.alpha' for FuseLLMModule"),  # takes none of its own
    (["module_class=fusion.modules.skew_kl.SkewKLFuseLLM", "module_args.optim=1"], "set by the framework"),
    (["module_class=fusion.modules.skew_kl.SkewKLFuseLLM", "module_args.alpha=[1]"], "must be float"),
    (["module_class=fusion.modules.base.CausalLMModule"], "must subclass fusion.modules.fusellm.FuseLLMModule"),
    (["method=fusechat4"], "unknown method 'fusechat4'"),
])
def test_module_args_and_methods_are_checked_like_every_recipe_key(overrides, message):
    with pytest.raises(FusionError, match=message):
        load_recipe("fusellm.yaml", overrides)


def test_module_args_are_typed_by_the_constructor():
    from fusion.methods.registry import get_method

    recipe = load_recipe("fusellm.yaml", ["module_class=fusion.modules.skew_kl.SkewKLFuseLLM", "module_args.alpha=1"])
    assert get_method("fusellm").module_args(recipe) == {"alpha": 1.0}  # an int where a float is due, as elsewhere
    assert isinstance(get_method("fusellm").module_args(recipe)["alpha"], float)
