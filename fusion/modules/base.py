"""`CausalLMModule`: continual causal-LM training of any Hugging Face `AutoModelForCausalLM`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from fusion.config import OptimConfig
from fusion.errors import FusionError, first_line
from fusion.modules.losses import IGNORE_INDEX, LossParts, next_token_targets, vocab_loss
from fusion.modules.metrics import TokenPerplexity
from fusion.modules.optim import build_optimizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLMModule(pl.LightningModule):
    """A LightningModule around an HF causal LM. Subclass it and override `training_loss` for new objectives.

    Features:
        - the model is loaded in `configure_model`, so FSDP and DeepSpeed can shard it as it loads;
        - the loss is computed from the final hidden states in chunks of ``loss_chunk_size`` tokens
          (`fusion.modules.losses.vocab_loss`): the ``[B, T, V]`` logits never exist whole, in training
          or validation; heads it cannot compute itself (logit soft-capping or scaling) use the logits;
        - AdamW or bitsandbytes AdamW8bit, warmup + cosine/linear/constant schedule, stepped per
          optimizer step; clipping, accumulation and precision come from the Trainer;
        - optional non-reentrant gradient checkpointing;
        - validation perplexity per named validation set and overall (`val/perplexity`).

    Batches are dicts with `input_ids` `[B, T]` and optionally `labels` `[B, T]` (-100 = no loss)
    and `attention_mask` `[B, T]`.
    """

    def __init__(self, model_path: str, optim: OptimConfig, dtype: str = "float32",
                 gradient_checkpointing: bool = False, attn_implementation: str | None = None,
                 trust_remote_code: bool = False, validation_names: tuple[str, ...] = ("all",),
                 fused_head: bool = True, loss_chunk_size: int | None = None) -> None:
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
            raise FusionError(f"cannot load model {self.model_path!r}: {first_line(err)}") from None
        if h.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False  # the KV cache only helps generation and costs memory here
        self.model.train()  # from_pretrained returns eval mode (no dropout); Lightning keeps the mode it finds

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits `[B, T, V]` (V = the model's embedding rows, which may exceed the tokenizer's size)."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits

    def vocab_loss(self, batch: dict, clm_weight: float = 1.0, distill_weight: float = 0.0,
                   ids: torch.Tensor | None = None, probs: torch.Tensor | None = None,
                   distillation: str | Callable = "ce", tail: bool = False) -> LossParts:
        """``clm_weight · mean NLL + distill_weight · mean D(teacher ‖ model)`` over the batch's target tokens.

        ``ids / probs`` ``[B, T, K]``: the teacher's candidates for the token after each position;
        ``distillation``: ``ce``, ``kl`` or a per-position function, ``tail``: the candidates may sum to less
        than one, the rest is one more outcome (see `vocab_loss`). The targets are
        the batch's ``labels`` (its ``input_ids`` if it has none), shifted by one.
        """
        targets = next_token_targets(batch.get("labels", batch["input_ids"])).reshape(-1)
        tokens = (targets != IGNORE_INDEX).sum().clamp(min=1)
        head = lm_head(self.model) if self.hparams.fused_head else None
        if head is None:
            hidden, weight, bias = self(batch), None, None
        else:
            hidden = self.model.base_model(input_ids=batch["input_ids"],
                                           attention_mask=batch.get("attention_mask")).last_hidden_state
            weight, bias = head.weight, head.bias
        if ids is not None:
            ids, probs = ids.reshape(targets.numel(), -1), probs.reshape(targets.numel(), -1)
        return vocab_loss(hidden.reshape(targets.numel(), -1), weight, targets, bias=bias,
                          clm_weight=clm_weight / tokens, distill_weight=distill_weight / tokens, ids=ids,
                          probs=probs, distillation=distillation, tail=tail, chunk_size=self.hparams.loss_chunk_size)

    def training_loss(self, batch: dict) -> torch.Tensor:
        """The objective; subclasses add their terms here. Logs under `train/`."""
        return self.vocab_loss(batch).loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):  # one host sync per step: negligible next to a step of a real model
            raise FusionError(f"the training loss became {loss.item()} at step {self.global_step}; lower optim.lr, "
                              "keep trainer.gradient_clip_val, or use bf16 instead of fp16 (checkpoints are kept)")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        parts = self.vocab_loss(batch)
        self.val_perplexity["overall"].update(parts.nll_sum, parts.tokens)
        if len(self.val_perplexity) > 1:
            self.val_perplexity[self.validation_names[dataloader_idx]].update(parts.nll_sum, parts.tokens)

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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the train stage's key: a later run resumes this checkpoint only under the same settings
        checkpoint["fusion_stage_key"] = getattr(self, "stage_key", None)

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self, self.optim_config, self.total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# Config attributes of heads that do more than ``hidden @ weight.T + bias`` (Gemma-2 soft-capping,
# Cohere and Granite scaling): the fused loss would compute other logits than the model, so it reads them.
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def lm_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when the fused loss can compute its logits from ``base_model``'s hidden states."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    if not isinstance(head, nn.Linear) or getattr(model, "base_model", model) is model:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_TRANSFORMS):
        return None
    return head
