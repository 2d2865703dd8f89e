"""The Lightning Trainer of a recipe: strategy, precision, checkpoints, loggers, progress bar."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from transformers import AutoConfig

from fusion.config import Recipe
from fusion.data.sampling import ConsumedBatches
from fusion.errors import FusionError
from fusion.interrupt import StopAtSafePoint
from fusion.loggers import JsonlLogger, RowBeforeCheckpoint

# Lightning advertises its cloud logger on every Trainer; one line of noise per stage.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda rec: "litlogger" not in rec.getMessage())
# Our batch samplers are exact by construction; Lightning cannot know and warns on every predict/validate.
warnings.filterwarnings("ignore", message=".*custom batch sampler.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def _layer_classes(names: list[str], recipe: Recipe) -> set[type]:
    """The `torch.nn.Module` classes called `names`: looked up in the model's own transformers module
    first, then in every transformers model module that imports (some need optional packages)."""
    import transformers

    from fusion.zoo import resolve_model

    modules = []
    try:  # e.g. transformers.models.llama.modeling_llama for a Llama checkpoint
        path = resolve_model(recipe.model.path, recipe.zoo.size, recipe.zoo.dir)
        model_type = AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code).model_type
        package = model_type.replace("-", "_")
        modules.append(importlib.import_module(f"transformers.models.{package}.modeling_{package}"))
    except Exception:  # hub id not reachable, custom code, unusual layout: fall back to the scan below
        pass
    found = set()
    for name in names:
        cls = next((getattr(m, name) for m in modules if isinstance(getattr(m, name, None), type)), None)
        for module_name in [] if cls is not None else dir(transformers.models):
            try:
                cls = getattr(getattr(transformers.models, module_name), name, None)
            except Exception:  # a lazy module whose optional backend (librosa, ...) is missing
                cls = None
            if isinstance(cls, type):
                break
        if not isinstance(cls, type):
            raise FusionError(f"recipe key 'fsdp.wrap': no transformers layer class named {name!r} "
                              f"(for {recipe.model.path}: e.g. LlamaDecoderLayer, MistralDecoderLayer, "
                              "Qwen2DecoderLayer)")
        found.add(cls)
    return found


def build_strategy(recipe: Recipe):
    """`auto`/`ddp` as Lightning names them; FSDP and DeepSpeed from their recipe sections."""
    t = recipe.trainer
    if t.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=t.process_group_backend)
    if t.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        f = recipe.fsdp
        layers = _layer_classes(f.wrap, recipe) if f.wrap else None
        return FSDPStrategy(
            auto_wrap_policy=layers, activation_checkpointing_policy=layers if f.activation_checkpointing else None,
            sharding_strategy=f.sharding_strategy, state_dict_type=f.state_dict_type, cpu_offload=f.cpu_offload,
            process_group_backend=t.process_group_backend, limit_all_gathers=True)
    if t.strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise FusionError("trainer.strategy 'deepspeed' needs DeepSpeed: pip install deepspeed (GPU machines only)")
        from lightning.pytorch.strategies import DeepSpeedStrategy

        d = recipe.deepspeed
        return DeepSpeedStrategy(stage=d.stage, offload_optimizer=d.offload_optimizer,
                                 offload_parameters=d.offload_parameters,
                                 process_group_backend=t.process_group_backend)
    return "auto"


class FSDPGradientClipping(pl.Callback):
    """Clip the global gradient norm under FSDP, where Lightning's `gradient_clip_val` is refused
    ("not supported for FSDPPrecision"): the FSDP root module computes the norm over all shards."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        trainer.strategy.model.clip_grad_norm_(self.max_norm)


def build_trainer(recipe: Recipe, run_dir: Path, loggers: list, callbacks: list = (),
                  training: bool = True) -> pl.Trainer:
    """A Trainer for training (checkpoints, resumable data) or evaluation (no checkpoints, no loggers' steps)."""
    t = recipe.trainer
    all_callbacks = [TQDMProgressBar(refresh_rate=1 if t.log_every_n_steps < 10 else 10), *callbacks]
    clip = t.gradient_clip_val
    if training and clip is not None and t.strategy == "fsdp":
        all_callbacks.append(FSDPGradientClipping(clip))
        clip = None
    if training:
        all_callbacks += [RowBeforeCheckpoint(logger) for logger in loggers if isinstance(logger, JsonlLogger)]
        all_callbacks += [
            ConsumedBatches(),
            StopAtSafePoint(run_dir / "checkpoints" / "last.ckpt"),  # after ConsumedBatches: see its docstring
            # Only last.ckpt: resuming needs nothing older, and a 7B checkpoint with optimizer state is ~80 GB.
            ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=t.checkpoint_every_n_steps,
                            save_last=True, save_top_k=0),
        ]
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(recipe),
        precision=t.precision, max_epochs=t.max_epochs, max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=clip,
        val_check_interval=t.val_every_n_steps * t.accumulate_grad_batches if t.val_every_n_steps else None,
        check_val_every_n_epoch=None if t.val_every_n_steps else 1,
        log_every_n_steps=t.log_every_n_steps, logger=loggers or False, callbacks=all_callbacks,
        enable_checkpointing=training, use_distributed_sampler=False, num_sanity_val_steps=0,
        default_root_dir=str(run_dir), enable_model_summary=training,
    )


def build_predict_trainer(recipe: Recipe, callbacks: list = (), precision: str | None = None) -> pl.Trainer:
    """A Trainer for `Trainer.predict` (teacher extraction): DDP over the recipe's devices, no loggers.

    Never FSDP or DeepSpeed: a teacher only runs forward, and each device holds its own copy (use
    `teachers[].quantization` when one does not fit). ``precision``: Lightning's (a reference model scores under the
    training's); None: the weights' own dtype.
    """
    t = recipe.trainer
    strategy = "auto"
    if t.strategy != "auto":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend=t.process_group_backend)
    return pl.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
                      precision=precision, logger=False, enable_checkpointing=False, enable_model_summary=False,
                      use_distributed_sampler=False, callbacks=[TQDMProgressBar(refresh_rate=1), *callbacks])
