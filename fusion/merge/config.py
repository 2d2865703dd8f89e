"""A merge, as a mergekit-style YAML file or mapping: which models, which method, which parameters.

    merge_method: ties                # linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, sce, varm
    base_model: path/to/pivot         # the pivot (every method but linear; slerp's t = 0 end)
    models:
      - model: path/to/target-a
        parameters: {weight: 0.5, density: 0.6}
      - model: path/to/target-b
        parameters: {weight: 0.5, density: 0.6}
    parameters: {normalize: true}     # method-wide: normalize, lambda, t, select_topk, sce_semantics, seed
    dtype: bfloat16                   # of the output (or out_dtype, as mergekit); default the base model's
    tokenizer_source: base            # whose tokenizer files the output gets: base (default) or a model path

A parameter is a number, a list of numbers interpolated over the layers (the first at layer 0, the last at the last
layer; tensors outside the layers take the first), or a list of ``{filter, value}`` taken by the first filter that is
a substring of the tensor's name (no filter: every tensor), as mergekit reads them. slerp also takes mergekit's
``slices: [{sources: [{model, layer_range}, {model, layer_range}]}]`` when both ranges cover every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusion.errors import FusionError

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "sce", "varm")
_NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "sce", "varm")
_NEEDS_WEIGHT = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
_DTYPES = ("float32", "bfloat16", "float16")
# Defaults per method, mergekit's where it has the method.
DEFAULTS = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0},
    "ties": {"normalize": True, "lambda": 1.0, "density": 1.0},
    "dare_linear": {"normalize": False, "lambda": 1.0, "density": 1.0, "rescale": True, "seed": 0},
    "dare_ties": {"normalize": False, "lambda": 1.0, "density": 1.0, "rescale": True, "seed": 0},
    "slerp": {},
    "sce": {"select_topk": 1.0, "sce_semantics": "mergekit"},
    "varm": {},
}


@dataclass
class MergeModel:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    merge_method: str
    models: list[MergeModel]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    tokenizer_source: str | None = None
    layer_range: tuple[int, int] | None = None  # mergekit's slice form: must cover every layer

    def parameter(self, name: str, tensor: str, t: float, model: int | None = None) -> Any:
        """The value of ``name`` for ``tensor`` at layer position ``t`` (0..1): the model's own, else the method's,
        else the default."""
        for scope in ([self.models[model].parameters] if model is not None else []) + [self.parameters]:
            if name in scope:
                return resolve(scope[name], tensor, t)
        if name in DEFAULTS[self.merge_method]:
            return DEFAULTS[self.merge_method][name]
        where = f"models[{model}].parameters.{name}" if model is not None else f"parameters.{name}"
        raise FusionError(f"merge config key {where!r}: {self.merge_method} needs it; add it")


def resolve(value: Any, tensor: str, t: float) -> Any:
    """A parameter's value for one tensor (see the module docstring)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for condition in value:
            if condition.get("filter") in (None, "*") or condition["filter"] in tensor:
                return resolve(condition["value"], tensor, t)
        return None
    if isinstance(value, list) and value:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return value[int(t * (len(value) - 1))]
        scaled = t * (len(value) - 1)
        low = int(scaled)
        high = min(len(value) - 1, low + 1)
        return (1 - (scaled - low)) * value[low] + (scaled - low) * value[high]
    return value


def load_merge_config(source: str | Path | dict) -> MergeConfig:
    """A merge config from a YAML file or a mapping, checked; errors name the key and the fix."""
    if isinstance(source, dict):
        raw, origin = source, "merge config"
    else:
        path = Path(source)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise FusionError(f"{path}: cannot read the merge config ({str(err).splitlines()[0]}); fix the file") \
                from None
        origin = str(path)
    if not isinstance(raw, dict):
        raise FusionError(f"{origin}: a merge config is a mapping (merge_method, base_model, models, ...)")
    known = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "tokenizer_source",
             "out_dtype"}
    if unknown := sorted(set(raw) - known):
        raise FusionError(f"{origin}: unknown key {unknown[0]!r}; use {', '.join(sorted(known))}")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise FusionError(f"{origin}: merge_method {method!r} is not one of {', '.join(METHODS)}")
    models, layer_range = raw.get("models"), None
    if models is None and "slices" in raw:
        models, layer_range = _slices_as_models(raw["slices"], origin)
    if not isinstance(models, list) or not models:
        raise FusionError(f"{origin}: 'models' must list the models to merge: [{{model: PATH}}, ...]")
    entries = []
    for i, entry in enumerate(models):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise FusionError(f"{origin}: models[{i}] must be {{model: PATH, parameters: {{...}}}}")
        entries.append(MergeModel(entry["model"], dict(entry.get("parameters") or {})))
    base = raw.get("base_model")
    if method in _NEEDS_BASE and not base:
        raise FusionError(f"{origin}: merge_method {method} needs base_model (the pivot the deltas are taken from)")
    # mergekit lists the base among the models or not; the deltas are the other models' (linear has no base)
    entries = [e for e in entries if e.model != base] if method not in ("slerp", "linear") else entries
    if method == "slerp":
        others = [e for e in entries if e.model != base]
        if len(entries) != 2 or len(others) != 1:
            raise FusionError(f"{origin}: slerp interpolates two models, base_model and one other; list both")
    elif not entries:
        raise FusionError(f"{origin}: list at least one model besides base_model")
    # mergekit computes in `dtype` and writes `out_dtype` (default: `dtype`); we compute in float32 and write that
    dtype = raw.get("out_dtype") or raw.get("dtype")
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and raw[key] not in _DTYPES:
            raise FusionError(f"{origin}: {key} {raw[key]!r} is not one of {', '.join(_DTYPES)}")
    config = MergeConfig(method, entries, base, dict(raw.get("parameters") or {}), dtype, raw.get("tokenizer_source"),
                         layer_range)
    if method in _NEEDS_WEIGHT:
        for i, entry in enumerate(config.models):
            if "weight" not in entry.parameters and "weight" not in config.parameters:
                raise FusionError(f"{origin}: models[{i}].parameters.weight is needed by {method}; add it")
    if config.parameters.get("sce_semantics", "mergekit") not in ("mergekit", "fusechat"):
        raise FusionError(f"{origin}: parameters.sce_semantics must be mergekit (the selection masks the merged "
                          "deltas) or fusechat (it masks only those the weights come from)")
    return config


def _slices_as_models(slices: Any, origin: str) -> tuple[list[dict], tuple[int, int] | None]:
    """mergekit's ``slices`` form for whole models: the sources of its one slice, and their layer range."""
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise FusionError(f"{origin}: only one slice over whole models is supported; list the models under 'models'")
    sources = slices[0].get("sources") or []
    ranges = {tuple(s.get("layer_range") or ()) for s in sources}
    if len(ranges) > 1:
        raise FusionError(f"{origin}: the slice's sources cover different layer ranges {sorted(ranges)}; merging "
                          "parts of models is not supported")
    layer_range = next(iter(ranges), ())
    return ([{"model": s["model"], "parameters": s.get("parameters") or {}} for s in sources],
            tuple(layer_range) if layer_range else None)
