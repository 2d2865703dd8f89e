"""`DPOModule`: direct preference optimisation and its variants on pairs of responses (FuseChat-3.0's second stage).

A batch holds ``k · B`` sequences, the same prompt's responses in blocks of ``B``: ``[chosen; rejected]`` for DPO
(``k = 2``), ``[source_chosen; chosen; rejected]`` for WRPO (``k = 3``, `fusion.modules.wrpo`), each labelled on its
response only (`fusion.data.preference`). One forward pass runs over all of them; the summed log-probability of each
response comes from the chunked head (`fusion.modules.logps`), never from ``[k·B, T, V]`` logits. The reference
model's log-probabilities are the batch's ``ref_logps`` (computed once by a stage before training: no second model
in memory) or, with ``reference="online"``, a frozen copy of the starting model run every step.

With ``r = log π(y|x) − log π_ref(y|x)`` per response (divided by its token count for ``sigmoid_norm`` and ``ipo``,
as TRL does), ``Δ = r(chosen) − r(rejected)``:

    sigmoid        −(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ)        DPO; ε > 0 is cDPO's label smoothing (TRL ≤ 0.28's
                                                                `label_smoothing`; TRL 1.x ignores it for sigmoid)
    sigmoid_norm   the same on per-token log-ratios            FuseChat-3.0's length-normalised DPO (LN-DPO)
    ipo            (Δ − 1/(2β))²                                IPO, on per-token log-ratios

Logged as TRL logs them: ``rewards/chosen`` and ``rewards/rejected`` (β·r on summed log-probs, batch means),
``rewards/accuracies`` (the share with chosen > rejected), ``rewards/margins``, ``logps/chosen`` and
``logps/rejected`` (summed log-probs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fusion.errors import FusionError
from fusion.modules.base import _DTYPES, lm_head
from fusion.modules.logps import sequence_logps
from fusion.modules.losses import next_token_targets
from fusion.modules.sft import SFTModule

LOSS_TYPES = ("sigmoid", "sigmoid_norm", "ipo")


def log_ratios(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, loss_type: str) -> torch.Tensor:
    """``log π − log π_ref`` per response, per token for the length-normalised losses (``sigmoid_norm``, ``ipo``)."""
    ratio = policy - reference
    return ratio / tokens.clamp(min=1) if loss_type in ("sigmoid_norm", "ipo") else ratio


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, loss_type: str, beta: float,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair losses ``[B]`` from the chosen and rejected responses' log-ratios (`log_ratios`), ``[B]`` each."""
    delta = chosen - rejected
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type in ("sigmoid", "sigmoid_norm"):
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    raise ValueError(f"unknown preference loss {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


class DPOModule(SFTModule):
    """DPO (``loss_type`` sigmoid, sigmoid_norm, ipo; β; label smoothing) on ``[chosen; rejected]`` batches.

    Subclass it for another preference loss: override `pair_loss` (the chosen and rejected log-ratios -> per-pair
    losses), or `responses` and `preference_step` for another batch layout, as `WRPOModule` does.
    """

    responses = 2  # sequences per example in a batch: chosen, rejected

    def __init__(self, *args, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 reference: str = "precomputed", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if loss_type not in LOSS_TYPES:
            raise FusionError(f"preference.loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
        self.loss_type, self.beta, self.label_smoothing, self.reference = loss_type, beta, label_smoothing, reference
        self._reference_model: list = []  # online reference: a plain list, so Lightning neither wraps nor saves it

    @classmethod
    def objective(cls, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                  reference: str = "precomputed", **kwargs) -> str:
        if cls is not DPOModule:
            return super().objective(loss_type=loss_type, beta=beta, **kwargs)
        name = {"sigmoid": "DPO", "sigmoid_norm": "length-normalised DPO", "ipo": "IPO"}[loss_type]
        smoothing = f", label smoothing {label_smoothing:g}" if label_smoothing else ""
        return f"{name} (loss {loss_type}, beta {beta:g}{smoothing}; reference log-probs {reference})"

    # -- log-probabilities ---------------------------------------------------------------------------
    def sequence_logps(self, batch: dict, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ log p over each row's labelled tokens, their count)``, ``[rows]`` each, of ``model`` (default: the
        policy) on the batch's rows."""
        model = self.model if model is None else model
        targets = next_token_targets(batch["labels"])
        rows, length = targets.shape
        segments = torch.arange(rows, device=targets.device).repeat_interleave(length)
        head = lm_head(model) if self.hparams.fused_head else None
        if head is None:
            hidden, weight, bias = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, \
                None, None
        else:
            hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                                      ).last_hidden_state
            weight, bias = head.weight, head.bias
        return sequence_logps(hidden.reshape(rows * length, -1), weight, targets.reshape(-1), segments, rows,
                              bias=bias, chunk_size=self.hparams.loss_chunk_size)

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """The reference model's summed log-probs of the batch's rows: precomputed, or from the frozen copy."""
        if self.reference == "online":
            with torch.no_grad():
                return self.sequence_logps(batch, self._reference_model[0])[0]
        if "ref_logps" not in batch:
            raise FusionError("preference.reference is 'precomputed' but the batch has no reference log-probs: run "
                              "the recipe's reference stage first (fusion.fit runs it), or set preference.reference: "
                              "online")
        return batch["ref_logps"].float()

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference == "online" and not self._reference_model:
            h = self.hparams
            reference = AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=_DTYPES[h.dtype], attn_implementation=h.attn_implementation,
                trust_remote_code=h.trust_remote_code)
            self._reference_model.append(reference.eval().requires_grad_(False))

    def on_fit_start(self) -> None:
        if self._reference_model:
            self._reference_model[0].to(self.device)

    # -- the loss --------------------------------------------------------------------------------------
    def blocks(self, values: torch.Tensor) -> list[torch.Tensor]:
        """A ``[k·B]`` tensor as its ``k`` blocks of ``[B]`` (chosen, rejected; or source, chosen, rejected)."""
        return list(values.view(self.responses, -1))

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """Per-pair losses from the chosen and rejected log-ratios (override for another preference loss)."""
        return preference_loss(chosen, rejected, self.loss_type, self.beta, self.label_smoothing)

    def training_loss(self, batch: dict) -> torch.Tensor:
        loss, metrics = self.preference_step(batch)
        if self._trainer is not None:
            for name, value in metrics.items():
                self.log(f"train/{name}", value, prog_bar=name == "rewards/accuracies")
        return loss

    def preference_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's mean loss and TRL's metrics (`rewards`)."""
        policy, tokens = self.sequence_logps(batch)
        reference = self.reference_logps(batch)
        chosen, rejected = self.blocks(log_ratios(policy, reference, tokens, self.loss_type))
        raw, logps = self.blocks((policy - reference).detach()), self.blocks(policy.detach())
        metrics = self.rewards({"chosen": raw[0], "rejected": raw[1]}, {"chosen": logps[0], "rejected": logps[1]})
        return self.pair_loss(chosen, rejected).mean(), metrics

    def rewards(self, ratios: dict[str, torch.Tensor], logps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """TRL's metrics, batch means: ``rewards/NAME`` (β·log-ratio of the summed log-probs, whatever the loss
        normalises), ``rewards/accuracies`` and ``rewards/margins`` (``chosen`` against ``rejected``, strict),
        ``logps/NAME``."""
        rewards = {name: self.beta * ratio for name, ratio in ratios.items()}
        metrics = {f"rewards/{name}": value.mean() for name, value in rewards.items()}
        metrics["rewards/accuracies"] = (rewards["chosen"] > rewards["rejected"]).float().mean()
        metrics["rewards/margins"] = (rewards["chosen"] - rewards["rejected"]).mean()
        metrics.update({f"logps/{name}": value.mean() for name, value in logps.items()})
        return metrics

    # -- reference log-probs, for the stage that precomputes them ----------------------------------------
    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict:
        """``{"index": [B], "logps": [B, k]}``: the summed log-probs of each example's responses (this model as the
        reference)."""
        logps = self.sequence_logps(batch)[0].view(self.responses, -1).T
        return {"index": batch["index"].cpu(), "logps": logps.double().cpu()}
