"""`CausalLMModule`: continual causal-LM training of any Hugging Face `AutoModelForCausalLM`."""

from __future__ import annotations

import dataclasses
import math

import lightning.pytorch as pl
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from fusion.config import OptimConfig
from fusion.errors import FusionError
from fusion.modules.losses import next_token_nll
from fusion.modules.metrics import TokenPerplexity
from fusion.modules.optim import build_optimizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLMModule(pl.LightningModule):
    """A LightningModule around an HF causal LM. Subclass it and override `training_loss` for new objectives.

    Features:
        - the model is loaded in `configure_model`, so FSDP and DeepSpeed can shard it as it loads;
        - AdamW or bitsandbytes AdamW8bit, warmup + cosine/linear/constant schedule, stepped per
          optimizer step; clipping, accumulation and precision come from the Trainer;
        - optional non-reentrant gradient checkpointing;
        - validation perplexity per named validation set and overall (`val/perplexity`).

    Batches are dicts with `input_ids` `[B, T]` and optionally `labels` `[B, T]` (-100 = no loss)
    and `attention_mask` `[B, T]`.
    """

    def __init__(self, model_path: str, optim: OptimConfig, dtype: str = "float32",
                 gradient_checkpointing: bool = False, attn_implementation: str | None = None,
                 trust_remote_code: bool = False, validation_names: tuple[str, ...] = ("all",)) -> None:
        super().__init__()
        # Plain types only in checkpoints, so that they load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["optim"], logger=False)
        self.hparams["optim"] = dataclasses.asdict(optim)
        self.model_path, self.optim_config = model_path, optim
        self.validation_names = tuple(validation_names)
        self.model: nn.Module | None = None
        names = ("overall", *self.validation_names) if len(self.validation_names) > 1 else ("overall",)
        self.val_perplexity = nn.ModuleDict({name: TokenPerplexity() for name in names})

    @classmethod
    def objective(cls, **kwargs) -> str:
        """The training objective in words, for the plan, checkpoints and results (override in subclasses)."""
        own = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        name = "CLM (next-token cross-entropy)"
        return name if cls is CausalLMModule else f"{cls.__name__}.training_loss({own})"

    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=_DTYPES[h.dtype], attn_implementation=h.attn_implementation,
                trust_remote_code=h.trust_remote_code)
        except (OSError, ValueError) as err:
            raise FusionError(f"cannot load model {self.model_path!r}: {str(err).splitlines()[0]}") from None
        if h.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False  # the KV cache only helps generation and costs memory here
        self.model.train()  # from_pretrained returns eval mode (no dropout); Lightning keeps the mode it finds

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits `[B, T, V]` (V = the model's embedding rows, which may exceed the tokenizer's size)."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits

    def clm_loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean next-token NLL, summed NLL)` of the batch's labels (its `input_ids` if it has none)."""
        nll, mask = next_token_nll(logits, batch.get("labels", batch["input_ids"]))
        total = nll.sum()
        return total / mask.sum().clamp(min=1), total

    def training_loss(self, batch: dict) -> torch.Tensor:
        """The objective; subclasses add their terms here. Logs under `train/`."""
        loss, _ = self.clm_loss(self(batch), batch)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):  # one host sync per step: negligible next to a step of a real model
            raise FusionError(f"the training loss became {loss.item()} at step {self.global_step}; lower optim.lr, "
                              "keep trainer.gradient_clip_val, or use bf16 instead of fp16 (checkpoints are kept)")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        nll, mask = next_token_nll(self(batch), batch.get("labels", batch["input_ids"]))
        tokens = mask.sum()
        self.val_perplexity["overall"].update(nll.sum(), tokens)
        if len(self.val_perplexity) > 1:
            self.val_perplexity[self.validation_names[dataloader_idx]].update(nll.sum(), tokens)

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_perplexity.items():
            key = "val/perplexity" if name == "overall" else f"val/perplexity/{name}"
            self.log(key, metric, prog_bar=name == "overall")  # Lightning computes (synced) and resets it

    def total_steps(self) -> int:
        """Optimizer steps of the whole run, for the learning-rate schedule.

        Not `trainer.estimated_stepping_batches`: that builds the train loader before Lightning
        restores the loader's checkpointed position, so a resumed run would restart its epoch.
        """
        trainer = self.trainer
        batches = len(trainer.datamodule.train_dataloader())
        by_epochs = math.ceil(batches / trainer.accumulate_grad_batches) * trainer.max_epochs
        return max(1, min(by_epochs, trainer.max_steps) if trainer.max_steps > 0 else by_epochs)

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self, self.optim_config, self.total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
