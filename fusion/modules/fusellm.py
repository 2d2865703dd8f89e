"""`FuseLLMModule`: continual training of the target on its own tokens and on the fused teachers.

    loss = λ · CLM + (1 − λ) · D(fused teacher distribution ‖ target)

with λ = ``fusion.clm_weight`` (the paper: 0.9), the teachers fused by MinCE or AvgCE at sequence or
token level, and D a cross-entropy (the paper) or KL divergence over the teachers' sparse top-k
candidates. Everything stays sparse: the student's log-probs are gathered at the candidate ids.

To add a fusion function or a loss, subclass and override a hook, then name the class in a recipe
(``module_class: mypackage.MyModule``):

- `fuse(batch)` → ``(ids, probs)``: the fused distribution, ``[B, L, K]`` each;
- `distillation(logits, batch, ids, probs)` → ``(clm_loss, distill_loss)``, both means over tokens.

`fusion.modules.reverse_kl.ReverseKLFuseLLM` is a worked example.
"""

from __future__ import annotations

import dataclasses

import torch

from fusion.config import FusionConfig
from fusion.modules.base import CausalLMModule
from fusion.modules.losses import fuse_teachers, sparse_distillation, teacher_probs

_FUNCTION_NAMES = {"mince": "MinCE", "avgce": "AvgCE"}


class FuseLLMModule(CausalLMModule):
    """`CausalLMModule` + the FuseLLM objective; batches come from `fusion.data.fused.FusionDataModule`."""

    def __init__(self, *args, fusion: FusionConfig | None = None, teacher_labels: tuple[str, ...] = (),
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fusion_config = fusion or FusionConfig()
        self.hparams["fusion"] = dataclasses.asdict(self.fusion_config)
        self.teacher_labels = tuple(teacher_labels)

    @classmethod
    def objective(cls, fusion: FusionConfig | None = None, teacher_labels: tuple[str, ...] = (), **kwargs) -> str:
        f = fusion or FusionConfig()
        own = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        loss = f.loss.upper() if cls.distillation is FuseLLMModule.distillation else f"{cls.__name__}.distillation"
        fused = f"{_FUNCTION_NAMES[f.function]}-fused teachers at {f.level} level"
        schedule = ", lambda growing linearly to 1" if f.clm_weight_schedule == "linear" else ""
        return f"{f.clm_weight:g} x CLM + {1 - f.clm_weight:g} x {loss}({fused}{', ' + own if own else ''}){schedule}"

    def clm_weight(self) -> float:
        """λ now: constant, or growing linearly from ``clm_weight`` to 1 over the run."""
        f = self.fusion_config
        if f.clm_weight_schedule == "constant" or self._trainer is None:
            return f.clm_weight
        progress = min(self.global_step / max(self.total_steps(), 1), 1.0)
        return f.clm_weight + (1 - f.clm_weight) * progress

    def fuse(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused teacher distribution ``(ids, probs)``, ``[B, L, K]`` (override for a new fusion function)."""
        f = self.fusion_config
        probs = teacher_probs(batch["teacher_logprobs"], f.temperature)
        if f.level == "token":
            ce = batch["teacher_token_ce"]
        else:
            ce = batch["teacher_ce"] if f.ce_unit == "own_token" else batch["teacher_ce_per_target_token"]
        ids, fused, weights = fuse_teachers(batch["teacher_ids"], probs, ce, f.function)
        if self.teacher_labels and self._trainer is not None:  # how often each teacher is chosen / weighed
            share = weights.float().mean(dim=tuple(d for d in range(weights.dim()) if d != 1))
            for label, value in zip(self.teacher_labels, share):
                self.log(f"train/teacher_weight/{label}", value)
        return ids, fused

    def distillation(self, logits: torch.Tensor, batch: dict, ids: torch.Tensor,
                     probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(clm_loss, distill_loss)``, each a mean over the label tokens (override for a new loss)."""
        nll, distill, tokens = sparse_distillation(logits, batch["labels"], ids, probs, self.fusion_config.loss,
                                                   self.fusion_config.chunk_size)
        tokens = tokens.clamp(min=1)
        return nll / tokens, distill / tokens

    def training_loss(self, batch: dict) -> torch.Tensor:
        logits = self(batch)
        ids, probs = self.fuse(batch)
        clm, distill = self.distillation(logits, batch, ids, probs)
        lam = self.clm_weight()
        if self._trainer is not None:
            self.log("train/clm_loss", clm)
            self.log("train/distill_loss", distill)
            self.log("train/clm_weight", lam)
        return lam * clm + (1 - lam) * distill
