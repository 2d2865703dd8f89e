"""The typed recipe: one YAML file describes a whole run, and is checked before any weight loads.

A recipe is a tree of dataclasses. Loading it checks every key and type, resolves paths, and
looks for impossible combinations, so that a mistake costs a second, not a GPU-hour. Every
problem raises `FusionError` with the dotted key and the fix.

    recipe = load_recipe("clm.yaml", overrides=["trainer.max_steps=10"])

A recipe NAME that is not a path is looked up in the shipped `recipes/` folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from fusion.errors import FusionError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class ZooConfig:
    """Where the embedded tiny models come from (`zoo:NAME` model paths)."""

    size: Literal["full", "small"] = "full"
    """`full` for the embedded defaults (built in a few minutes), `small` for tests (seconds)."""
    dir: str | None = None
    """Cache folder; default `$FUSION_ZOO_DIR` or `~/.cache/fusion/zoo`."""


@dataclass
class ModelConfig:
    """The model being trained (the target)."""

    path: str = "zoo:target"
    """A Hugging Face hub id, a local HF folder, or `zoo:NAME` for the embedded tiny zoo."""
    tokenizer: str | None = None
    """Tokenizer location when it differs from `path`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype when loading; `auto` means bfloat16 under `bf16-true` precision, else float32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (HF `gradient_checkpointing_enable`, non-reentrant)."""
    attn_implementation: str | None = None
    """Passed to `from_pretrained`, e.g. `sdpa` or `flash_attention_2`; None lets transformers choose."""
    trust_remote_code: bool = False
    """Needed by models with code on the hub, e.g. MPT-7B."""


@dataclass
class DataConfig:
    """The text the target trains on."""

    source: str = "embedded"
    """`embedded` (the stdlib corpus), a hub dataset id, a `save_to_disk` folder, or .txt/.jsonl/.parquet files."""
    subset: str | None = None
    """Hub dataset configuration name, if it has several."""
    domains: list[str] = field(default_factory=lambda: ["code", "prose"])
    """Embedded corpus only: which domains to use; each gets its own validation perplexity."""
    text_field: str = "text"
    """Column that holds the text."""
    train_split: str = "train"
    validation_split: str | None = "validation"
    """Used if the dataset has it; otherwise `validation_fraction` of the train documents is held out."""
    validation_fraction: float = 0.05
    block_size: int = 256
    """Tokens per training example; documents are packed, each ended by EOS."""
    max_validation_blocks: int | None = None
    """Cap on validation blocks per validation set, to keep evaluation cheap."""
    cache_dir: str | None = None
    """Where tokenized blocks are cached; default `$FUSION_CACHE/data` or `~/.cache/fusion/data`."""
    preprocessing_workers: int = 1
    """Processes for tokenization (`datasets.map(num_proc=...)`)."""
    num_workers: int = 0
    """DataLoader worker processes per device."""


@dataclass
class TeacherConfig:
    """A model whose next-token distributions the target learns from (a FuseLLM "source")."""

    path: str
    """A Hugging Face hub id, a local HF folder, or `zoo:NAME`. The target itself may be one (FuseLLM includes it)."""
    tokenizer: str | None = None
    """Tokenizer location when it differs from `path`."""
    name: str | None = None
    """Label in tables and logs; default: the last part of `path`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for extraction; `auto` = bfloat16 on GPUs, float32 on CPUs."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """bitsandbytes loading: `8bit` (LLM.int8) or `4bit` (NF4, bf16 compute) to fit big teachers on small GPUs."""
    trust_remote_code: bool = False
    """Needed by models with code on the hub, e.g. MPT-7B."""
    attn_implementation: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.path.rstrip("/").split("/")[-1].split(":")[-1]


@dataclass
class RepresentationsConfig:
    """How the teachers' top-k distributions are computed and stored (`fusion.data.store`)."""

    top_k: int = 10
    """Candidates kept per position (the paper: 10)."""
    batch_size: int = 8
    """Chunks per forward pass per device."""
    chunks_per_shard: int = 256
    """Chunks per shard file: the unit of resumption (a killed extraction loses at most one shard per device)."""
    dir: str | None = None
    """Where shards are kept, shared by all runs; default `$FUSION_CACHE/representations` or `~/.cache/fusion/...`."""
    max_chunks: int | None = None
    """Use only the first N training chunks (a slice of a big corpus); None = all."""


@dataclass
class FusionConfig:
    """FuseLLM's objective: loss = clm_weight * CLM + (1 - clm_weight) * distillation on the fused teachers."""

    alignment: Literal["mined", "exact", "offsets"] = "mined"
    """Token alignment (`fusion.data.alignment`): the paper's MinED DTW, exact-match DTW (the paper's EM
    ablation), or byte offsets."""
    function: Literal["mince", "avgce"] = "mince"
    """MinCE: the distribution of the teacher with the lowest cross-entropy; AvgCE: teachers weighted by
    softmax(-CE)."""
    level: Literal["sequence", "token"] = "sequence"
    """Where the CE that picks or weighs teachers is measured: per chunk (the paper) or per token."""
    ce_unit: Literal["own_token", "target_token"] = "own_token"
    """Sequence level: a teacher's chunk CE per token of its own tokenizer (the paper), or its summed CE per
    target token, which compares teachers with finer and coarser tokenizers fairly."""
    clm_weight: float = 0.9
    """The paper's lambda."""
    clm_weight_schedule: Literal["constant", "linear"] = "constant"
    """`linear`: lambda grows from `clm_weight` to 1 over training (the distillation weight decays to 0)."""
    loss: Literal["ce", "kl"] = "ce"
    """Distillation loss against the fused distribution: cross-entropy (the paper) or KL divergence."""
    temperature: float = 1.0
    """Teacher temperature: the stored top-k log-probs are divided by it and renormalised over the k."""
    chunk_size: int = 1024
    """Sequence positions per chunk of the sparse loss (bounds its float32 memory)."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw8bit` is bitsandbytes' 8-bit AdamW: optimizer state in 2 bytes/param instead of 8."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    """Not applied to biases and norm weights."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.0
    """Fraction of all optimizer steps spent warming up linearly from 0."""
    min_lr_ratio: float = 0.0
    """The schedule ends at `lr * min_lr_ratio`."""


@dataclass
class FSDPConfig:
    """Settings of `trainer.strategy: fsdp`."""

    wrap: list[str] = field(default_factory=list)
    """Module class names that become FSDP units, e.g. `LlamaDecoderLayer`; empty = the model's `_no_split_modules`."""
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD"
    activation_checkpointing: bool = False
    """Checkpoint the wrapped layers (use this, not `model.gradient_checkpointing`, under FSDP)."""
    cpu_offload: bool = False
    state_dict_type: Literal["full", "sharded"] = "full"
    """`full` gathers checkpoints on rank 0 (needed for HF export); `sharded` saves faster for huge models."""


@dataclass
class DeepSpeedConfig:
    """Settings of `trainer.strategy: deepspeed` (needs `pip install deepspeed`)."""

    stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass
class TrainerConfig:
    """Lightning Trainer settings."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "32-true"
    batch_size: int = 8
    """Sequences per device per micro-batch.

    Global batch = batch_size * devices * num_nodes * accumulate_grad_batches."""
    accumulate_grad_batches: int = 1
    max_epochs: int = 1
    max_steps: int = -1
    """Optimizer steps; -1 means `max_epochs` decides."""
    gradient_clip_val: float | None = 1.0
    val_every_n_steps: int | None = None
    """Validate every N optimizer steps; None = at the end of each epoch only."""
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 500
    """Resumable checkpoints (`checkpoints/last.ckpt`) are written this often."""
    process_group_backend: str | None = None
    """`gloo` to run DDP on CPUs; None lets Lightning choose (nccl on GPUs)."""


@dataclass
class WandbConfig:
    """Weights & Biases logging."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """`auto`: online when W&B credentials exist (WANDB_API_KEY or `wandb login`), else offline."""
    project: str = "fusion"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    """A whole run: what to train, on what, how, and where the results go."""

    name: str
    method: Literal["clm", "fusellm"] = "clm"
    """`clm`: continual causal-LM training of the target (the baseline every fusion run is compared with);
    `fusellm`: FuseLLM, training on the fused distributions of `teachers` (chunks -> representations -> alignment)."""
    output_dir: str | None = None
    """Run folder; default `runs/NAME`. A re-run with the same folder resumes."""
    seed: int = 42
    module_class: str | None = None
    """Dotted path of a LightningModule subclass to train with; default: the method's own module."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    """Source models for fusion methods, any number, any tokenizers."""
    representations: RepresentationsConfig = field(default_factory=RepresentationsConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    source_file: str | None = None
    """Set by the loader: the YAML file this recipe came from."""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


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
        raise FusionError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
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
    check(recipe)
    return recipe


def build(cls: type, raw: Any, prefix: str) -> Any:
    """A dataclass of type `cls` from a YAML mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise FusionError(f"{prefix or 'recipe'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names or key == "source_file":
            close = ", ".join(sorted(n for n in names if n != "source_file"))
            raise FusionError(f"unknown recipe key {dotted!r}: remove it or use one of: {close}")
        values[key] = _convert(hints[key], value, dotted)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise FusionError(f"recipe key {prefix}{missing[0]!r} is required: add it to the recipe")
    return cls(**values)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """`value` checked (and lightly coerced: int → float, list → tuple) against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, {} if value is None else value, f"{key}.")
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, key)
            except FusionError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        items = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(items):
            return tuple(_convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(items, value)))
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            return float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise FusionError(f"recipe key {key!r} must be {_type_name(tp)}, got {value!r}: fix its value")


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
    if o.lr <= 0:
        _fail("optim.lr", f"must be positive, got {o.lr}")
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
    if recipe.module_class:
        module_class(recipe)


def _check_teachers(recipe: Recipe) -> None:
    from fusion.zoo import ZOO_MODELS

    labels = [t.label for t in recipe.teachers]
    for i, teacher in enumerate(recipe.teachers):
        for key in ("path", "tokenizer"):
            ref = getattr(teacher, key)
            if ref:
                check_location(ref, f"teachers[{i}].{key}", "teacher")
                if ref.startswith("zoo:") and ref[4:] not in ZOO_MODELS:
                    _fail(f"teachers[{i}].{key}", f"{ref!r} is not in the zoo; use one of "
                          + ", ".join("zoo:" + m for m in ZOO_MODELS))
        if labels.count(teacher.label) > 1:
            _fail(f"teachers[{i}].name", f"two teachers are called {teacher.label!r}; give them distinct names")
    if recipe.method == "fusellm" and not recipe.teachers:
        _fail("teachers", "method 'fusellm' needs at least one teacher, e.g. teachers: [{path: zoo:gpt2-code}]")
    f = recipe.fusion
    if not 0 <= f.clm_weight <= 1:
        _fail("fusion.clm_weight", f"must be in [0, 1], got {f.clm_weight}")
    if f.temperature <= 0:
        _fail("fusion.temperature", f"must be positive, got {f.temperature}")
    if f.chunk_size < 1:
        _fail("fusion.chunk_size", f"must be at least 1, got {f.chunk_size}")
    rep = recipe.representations
    for key, value in (("top_k", rep.top_k), ("batch_size", rep.batch_size),
                       ("chunks_per_shard", rep.chunks_per_shard), ("max_chunks", rep.max_chunks or 1)):
        if value < 1:
            _fail(f"representations.{key}", f"must be at least 1, got {value}")


def module_class(recipe: Recipe) -> type:
    """The LightningModule class that trains this recipe (a subclass of the method's module)."""
    from fusion.modules.base import CausalLMModule

    if recipe.method == "fusellm":
        from fusion.modules.fusellm import FuseLLMModule as CausalLMModule  # subclasses must extend this one
    if not recipe.module_class:
        return CausalLMModule
    module_name, _, class_name = recipe.module_class.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise FusionError(f"recipe key 'module_class': cannot import {recipe.module_class!r} ({err}); "
                          "give a dotted path such as mypackage.losses.MyModule on PYTHONPATH") from None
    if not (isinstance(cls, type) and issubclass(cls, CausalLMModule)):
        raise FusionError(f"recipe key 'module_class': {recipe.module_class!r} must subclass {CausalLMModule.__name__}")
    return cls


def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain YAML-able data (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(recipe))
