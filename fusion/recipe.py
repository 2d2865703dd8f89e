"""Loading a recipe: one YAML file, overrides from the command line, and every check before any weight loads.

A recipe is a tree of dataclasses (`fusion.config`). Loading it checks every key and type, resolves
paths, and looks for impossible combinations, so that a mistake costs a second, not a GPU-hour. Every
problem raises `FusionError` with the dotted key and the fix.

    recipe = load_recipe("clm.yaml", overrides=["trainer.max_steps=10"])

A recipe NAME that is not a path is looked up in the shipped `recipes/` folder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from fusion.config import Recipe
from fusion.errors import FusionError, first_line
from fusion.methods.registry import get_method
from fusion.schema import build

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# --- loading -------------------------------------------------------------------------------------

def find_recipe_file(name: str) -> Path:
    """A path as given, else the shipped recipe of that name (with or without `.yaml`)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in RECIPES_DIR.glob("*.yaml")))
    raise FusionError(f"recipe {name!r} not found: give a path to a YAML file or one of the shipped recipes: {shipped}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`trainer.max_steps=10` → (["trainer", "max_steps"], 10); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise FusionError(f"override {text!r} is not of the form dotted.key=value, e.g. trainer.max_steps=10")
    return key.split("."), yaml.safe_load(value) if value else None


def load_recipe(name: str, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file, apply `dotted.key=value` overrides, and check everything."""
    path = find_recipe_file(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise FusionError(f"{path}: not valid YAML ({first_line(err)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise FusionError(f"{path}: a recipe must be a mapping of keys to values")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise FusionError(f"override {text!r}: {key!r} is not a section")
        node[keys[-1]] = value
    raw.setdefault("name", path.stem)
    recipe = build(Recipe, raw, "")
    recipe.source_file = str(path)
    normalise_paths(recipe)
    check(recipe)
    return recipe


def _absolute(value: str | None, always: bool) -> str | None:
    """``value`` as an absolute path if it is a local one (``always``: a folder that may not exist yet);
    hub ids, ``zoo:`` names and ``embedded`` stay as written."""
    if value is None or value.startswith("zoo:") or value == "embedded":
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if always or path.exists() else value


def normalise_paths(recipe: Recipe) -> None:
    """Local paths made absolute, so that ``runs/x``, ``./runs/x`` and ``~/fusion/runs/x`` are one recipe
    (a resume compares them) and one stage key."""
    recipe.output_dir = _absolute(recipe.output_dir, always=True)
    for section, key in (("data", "cache_dir"), ("representations", "dir"), ("zoo", "dir")):
        setattr(getattr(recipe, section), key, _absolute(getattr(getattr(recipe, section), key), always=True))
    for holder in (recipe.model, *recipe.teachers):
        holder.path = _absolute(holder.path, always=False)
        holder.tokenizer = _absolute(holder.tokenizer, always=False)
    for sampler in recipe.sampling.models:
        sampler.path = _absolute(sampler.path, always=False)
        sampler.template = _template_file(sampler.template)
    recipe.scoring.reward_model = _absolute(recipe.scoring.reward_model, always=False)
    recipe.data.source = _absolute(recipe.data.source, always=False)
    recipe.chat.template = _template_file(recipe.chat.template)


def _template_file(template: str | None) -> str | None:
    """A chat template that names a file, made absolute; Jinja text (too long for a path) as it is."""
    if template and "{{" not in template and "{%" not in template:
        return _absolute(template, always=False)
    return template


# --- cross-field checks ---------------------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def check_location(value: str, key: str, kind: str) -> None:
    """A hub id passes (it is checked when loaded); a local-looking path must exist."""
    if value.startswith("zoo:") or Path(value).expanduser().exists():
        return
    looks_local = value.startswith(("/", "./", "../", "~")) or not _HUB_ID.fullmatch(value)
    if looks_local:
        raise FusionError(f"recipe key {key!r}: {kind} {value!r} does not exist; fix the path")


def _fail(key: str, problem: str) -> None:
    raise FusionError(f"recipe key {key!r}: {problem}")


def check(recipe: Recipe) -> None:
    """Checks that need several keys at once, or the file system."""
    t, d, o = recipe.trainer, recipe.data, recipe.optim
    if not re.fullmatch(r"[\w.-]+", recipe.name):
        _fail("name", f"{recipe.name!r} may hold only letters, digits, '.', '_' and '-'")
    check_location(recipe.model.path, "model.path", "model")
    if recipe.model.tokenizer:
        check_location(recipe.model.tokenizer, "model.tokenizer", "tokenizer")
    if d.source != "embedded":
        check_location(d.source, "data.source", "dataset")
    elif unknown := set(d.domains) - {"code", "prose"}:
        _fail("data.domains", f"the embedded corpus has domains 'code' and 'prose', not {sorted(unknown)}")
    if recipe.model.path.startswith("zoo:") or recipe.model.tokenizer and recipe.model.tokenizer.startswith("zoo:"):
        from fusion.zoo import ZOO_MODELS

        for key in ("path", "tokenizer"):
            ref = getattr(recipe.model, key)
            if ref and ref.startswith("zoo:") and ref[4:] not in ZOO_MODELS:
                names = ", ".join("zoo:" + m for m in ZOO_MODELS)
                _fail(f"model.{key}", f"{ref!r} is not in the zoo; use one of {names}")
    for key, value, low in (("data.block_size", d.block_size, 2), ("trainer.batch_size", t.batch_size, 1),
                            ("trainer.accumulate_grad_batches", t.accumulate_grad_batches, 1),
                            ("trainer.max_epochs", t.max_epochs, 1), ("trainer.num_nodes", t.num_nodes, 1),
                            ("trainer.log_every_n_steps", t.log_every_n_steps, 1),
                            ("trainer.checkpoint_every_n_steps", t.checkpoint_every_n_steps, 1),
                            ("data.preprocessing_workers", d.preprocessing_workers, 1),
                            ("model.loss_chunk_size", recipe.model.loss_chunk_size or 1, 1),
                            ("data.num_workers", d.num_workers, 0)):
        if value < low:
            _fail(key, f"must be at least {low}, got {value}")
    if t.max_steps == 0 or t.max_steps < -1:
        _fail("trainer.max_steps", f"must be a positive number of steps or -1, got {t.max_steps}")
    if t.val_every_n_steps is not None and t.val_every_n_steps < 1:
        _fail("trainer.val_every_n_steps", f"must be at least 1 or null, got {t.val_every_n_steps}")
    if isinstance(t.devices, str) and t.devices != "auto":
        _fail("trainer.devices", f"must be a number of devices or 'auto', got {t.devices!r}")
    if not 0 < d.validation_fraction < 1:
        _fail("data.validation_fraction", f"must be between 0 and 1, got {d.validation_fraction}")
    if d.max_validation_blocks is not None and d.max_validation_blocks < 1:
        _fail("data.max_validation_blocks", f"must be at least 1 or null (no cap), got {d.max_validation_blocks}")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        _fail("optim.lr", f"must be a finite positive number, got {o.lr}")
    for key, value in (("optim.weight_decay", o.weight_decay), ("optim.eps", o.eps),
                       ("trainer.gradient_clip_val", t.gradient_clip_val)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            _fail(key, f"must be a finite number at least 0{' or null' if key.startswith('trainer') else ''}, "
                       f"got {value}")
    if not 0 <= o.warmup_ratio < 1:
        _fail("optim.warmup_ratio", f"must be in [0, 1), got {o.warmup_ratio}")
    if not 0 <= o.min_lr_ratio <= 1:
        _fail("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    if not all(0 <= b < 1 for b in o.betas):
        _fail("optim.betas", f"both must be in [0, 1), got {list(o.betas)}")
    if t.strategy == "fsdp" and recipe.model.gradient_checkpointing and recipe.fsdp.activation_checkpointing:
        _fail("model.gradient_checkpointing", "use either it or fsdp.activation_checkpointing under FSDP, not both")
    if t.strategy == "deepspeed" and o.name == "adamw8bit":
        _fail("optim.name", "adamw8bit does not work under DeepSpeed, which manages its own optimizer; use adamw")
    if t.precision == "16-mixed" and t.strategy == "fsdp":
        _fail("trainer.precision", "use bf16-mixed or bf16-true with FSDP; fp16 needs a sharded grad scaler")
    _check_teachers(recipe)
    for i, sampler in enumerate(recipe.sampling.models):
        check_model_ref(sampler.path, f"sampling.models[{i}].path", "model")
    if recipe.scoring.reward_model:
        check_model_ref(recipe.scoring.reward_model, "scoring.reward_model", "reward model")
    method = get_method(recipe.method)
    method.check(recipe)
    method.module_args(recipe)  # imports the module class and checks the arguments against its constructor


def check_model_ref(ref: str, key: str, kind: str) -> None:
    """A model location: a hub id, an existing folder, or a ``zoo:NAME`` of the zoo."""
    from fusion.zoo import ZOO_MODELS

    check_location(ref, key, kind)
    if ref.startswith("zoo:") and ref[4:] not in ZOO_MODELS:
        _fail(key, f"{ref!r} is not in the zoo; use one of " + ", ".join("zoo:" + m for m in ZOO_MODELS))


def _check_teachers(recipe: Recipe) -> None:
    labels = [t.label for t in recipe.teachers]
    for i, teacher in enumerate(recipe.teachers):
        for key in ("path", "tokenizer"):
            if ref := getattr(teacher, key):
                check_model_ref(ref, f"teachers[{i}].{key}", "teacher")
        if labels.count(teacher.label) > 1:
            _fail(f"teachers[{i}].name", f"two teachers are called {teacher.label!r}; give them distinct names")
    f = recipe.fusion
    if not 0 <= f.clm_weight <= 1:
        _fail("fusion.clm_weight", f"must be in [0, 1], got {f.clm_weight}")
    if f.span < 1:
        _fail("fusion.span", f"must be at least 1 target token, got {f.span}")
    if f.temperature <= 0:
        _fail("fusion.temperature", f"must be positive, got {f.temperature}")
    rep = recipe.representations
    for key, value in (("top_k", rep.top_k), ("batch_size", rep.batch_size),
                       ("chunks_per_shard", rep.chunks_per_shard), ("max_chunks", rep.max_chunks or 1)):
        if value < 1:
            _fail(f"representations.{key}", f"must be at least 1, got {value}")
