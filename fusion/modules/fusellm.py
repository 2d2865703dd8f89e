"""`FuseLLMModule`: continual training of the target on its own tokens and on the fused teachers.

    loss = λ · CLM + (1 − λ) · D(fused teacher distribution ‖ target)

with λ = ``fusion.clm_weight`` (the paper: 0.9), the teachers fused by MinCE or AvgCE at sequence, span
or token level, and D a cross-entropy (the paper) or KL divergence over the teachers' sparse top-k
candidates: renormalised over them (the paper), or at their own probabilities with the rest of the
vocabulary as one more outcome (``fusion.tail: bucket``). Everything stays sparse and chunked: the
student's log-probs are gathered at the candidate ids, one chunk of positions at a time
(`fusion.modules.losses.vocab_loss`).

To add a loss or a fusion function, subclass and override a hook, then name the class in a recipe
(``module_class: mypackage.MyModule``, its own constructor arguments in ``module_args``):

- `distillation_loss(logits, ids, probs)` → ``[n]``: D at each position of a chunk, from float32
  logits ``[n, V]`` and the fused candidates ``[n, K]`` (with ``tail: bucket`` their probabilities sum to
  less than one; `tail_mass` is the rest); the building blocks of `fusion.modules.losses` (`log_z`,
  `candidate_logprobs`, `pooled_probs`, `tail_mass`) make it a few lines, and autograd gives its gradient;
- `fuse(batch)` → ``(ids, probs)``: the fused distribution, ``[B, L, K]`` each.

`fusion.modules.skew_kl.SkewKLFuseLLM` and `fusion.modules.reverse_kl.ReverseKLFuseLLM` are worked examples.
"""

from __future__ import annotations

import dataclasses

import torch

from fusion.config import FusionConfig
from fusion.modules.base import CausalLMModule
from fusion.modules.losses import DISTILLATION, fuse_teachers, span_mean, teacher_probs

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
        own_loss = cls.distillation_loss is not FuseLLMModule.distillation_loss
        loss = f"{cls.__name__}.distillation_loss" if own_loss else f.loss.upper()
        fused = f"{_FUNCTION_NAMES[f.function]}-fused teachers at {f.level_label}"
        fused += ", the rest of the vocabulary as one outcome" if f.tail == "bucket" else ""
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
        probs = teacher_probs(batch["teacher_logprobs"], f.temperature, f.tail)
        if f.level in ("span", "token"):
            ce = span_mean(batch["teacher_token_ce"], batch["teacher_fallback"], f.span if f.level == "span" else 1)
        else:
            ce = batch["teacher_ce"] if f.ce_unit == "own_token" else batch["teacher_ce_per_target_token"]
        ids, fused, weights = fuse_teachers(batch["teacher_ids"], probs, ce, f.function)
        if self.teacher_labels and self._trainer is not None:  # how often each teacher is chosen / weighed
            share = weights.float().mean(dim=tuple(d for d in range(weights.dim()) if d != 1))
            # and how often it had no prediction for a (trained) position: the one-hot fallback
            fell = batch["teacher_fallback"][..., :-1]  # [B, T, L-1]: position l predicts token l+1
            trained = (batch["labels"][:, None, 1:] != -100).expand_as(fell)
            fallback = (fell & trained).sum(dim=(0, 2)) / trained.sum(dim=(0, 2)).clamp(min=1)
            for label, value, fell in zip(self.teacher_labels, share, fallback):
                self.log(f"train/teacher_weight/{label}", value)
                self.log(f"train/teacher_fallback/{label}", fell.float())
        return ids, fused

    def distillation_loss(self, logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """D(teacher ‖ student) per position: float32 ``logits [n, V]``, candidates ``ids / probs [n, K]`` -> ``[n]``.

        The default is ``fusion.loss`` (CE or KL), whose gradient `vocab_loss` writes out by hand; an
        override gets its gradient from autograd, chunk by chunk.
        """
        return DISTILLATION[self.fusion_config.loss](logits, ids, probs)

    def training_loss(self, batch: dict) -> torch.Tensor:
        ids, probs = self.fuse(batch)
        lam = self.clm_weight()
        custom = type(self).distillation_loss is not FuseLLMModule.distillation_loss
        parts = self.vocab_loss(batch, clm_weight=lam, distill_weight=1 - lam, ids=ids, probs=probs,
                                distillation=self.distillation_loss if custom else self.fusion_config.loss,
                                tail=self.fusion_config.tail == "bucket")
        if self._trainer is not None:
            tokens = parts.tokens.clamp(min=1)
            self.log("train/clm_loss", parts.nll_sum / tokens)
            self.log("train/distill_loss", parts.distill_sum / tokens)
            self.log("train/clm_weight", lam)
        return parts.loss
