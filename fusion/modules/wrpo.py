"""`WRPOModule`: weighted-reward preference optimisation (WRPO, the implicit fusion behind FuseChat-3.0).

Each example is a prompt with three responses: ``source_chosen`` (y_ws, the best response of the source models),
``chosen`` (y_wt, the best of the SFT model's own samples) and ``rejected`` (y_l, the worst of them). The chosen
side's reward mixes the two preferred responses:

    L = −log σ(α·r(y_ws) + (1 − α)·r(y_wt) − r(y_l)),    r(y) = β·log π(y|x)/π_ref(y|x) on summed log-probs

α grows linearly from 0 to ``alpha`` over the run's optimizer steps (the official code's schedule, which it calls
a decay: ``α = alpha · step / T``, ``step`` the optimizer steps done, so α is constant within an accumulation
window); ``dynamic_alpha=False`` holds it at ``alpha``. Because the loss is linear in the log-ratios, WRPO(α) is
DPO on the α-mixed chosen log-probs, α = 0 is DPO on (y_wt, y_l) (on-policy DPO after SFT) and α = 1 DPO on
(y_ws, y_l); ``loss_type`` (sigmoid, sigmoid_norm, ipo) applies to the mixed log-ratios as in `DPOModule`.

Logged beyond DPO's metrics: ``alpha``, ``rewards/source_chosen``, ``rewards/target_chosen``, and the share of
examples whose source / target response out-scores the rejected one (``rewards/source_accuracies``,
``rewards/target_accuracies``: per example, unlike the official code's target metric, which compares a ``[B]``
tensor with a ``[B, 1]`` one and so averages a ``B × B`` table).
"""

from __future__ import annotations

import torch

from fusion.modules.dpo import DPOModule, log_ratios


def alpha_at(step: int, total_steps: int, alpha: float, dynamic: bool = True) -> float:
    """α after ``step`` optimizer steps of ``total_steps``: ``alpha · step / total_steps`` (capped), or ``alpha``."""
    if not dynamic:
        return alpha
    return alpha * min(max(step, 0), total_steps) / max(total_steps, 1)


class WRPOModule(DPOModule):
    """WRPO on ``[source_chosen; chosen; rejected]`` batches (see the module docstring)."""

    responses = 3

    def __init__(self, *args, alpha: float = 0.1, dynamic_alpha: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alpha, self.dynamic_alpha = alpha, dynamic_alpha
        self._total_steps: int | None = None

    @classmethod
    def objective(cls, loss_type: str = "sigmoid", beta: float = 0.1, alpha: float = 0.1, dynamic_alpha: bool = True,
                  reference: str = "precomputed", **kwargs) -> str:
        if cls is not WRPOModule:
            return super().objective(loss_type=loss_type, beta=beta, **kwargs)
        schedule = f"0 -> {alpha:g} over the optimizer steps" if dynamic_alpha else f"{alpha:g}"
        return (f"WRPO (loss {loss_type} on α·r(source) + (1-α)·r(target chosen) - r(rejected), beta {beta:g}, "
                f"α {schedule}; reference log-probs {reference})")

    def current_alpha(self) -> float:
        """α at this optimizer step (`alpha_at`); the run's length is read once."""
        if not self.dynamic_alpha:
            return self.alpha
        if self._total_steps is None:
            self._total_steps = self.total_steps()
        return alpha_at(self.global_step, self._total_steps, self.alpha)

    def preference_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        alpha = self.current_alpha() if self._trainer is not None else self.alpha
        return self.wrpo_step(batch, alpha)

    def wrpo_step(self, batch: dict, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's mean WRPO loss at ``alpha`` and its metrics."""
        policy, tokens = self.sequence_logps(batch)
        reference = self.reference_logps(batch)
        source, target, rejected = self.blocks(log_ratios(policy, reference, tokens, self.loss_type))
        chosen = alpha * source + (1 - alpha) * target
        raw, logps = self.blocks((policy - reference).detach()), self.blocks(policy.detach())
        metrics = self.rewards({"chosen": alpha * raw[0] + (1 - alpha) * raw[1], "rejected": raw[2],
                                "source_chosen": raw[0], "target_chosen": raw[1]},
                               {"chosen": alpha * logps[0] + (1 - alpha) * logps[1], "rejected": logps[2],
                                "source_chosen": logps[0], "target_chosen": logps[1]})
        metrics["rewards/source_accuracies"] = (raw[0] > raw[2]).float().mean()
        metrics["rewards/target_accuracies"] = (raw[1] > raw[2]).float().mean()
        metrics["alpha"] = torch.tensor(alpha)
        return self.pair_loss(chosen, rejected).mean(), metrics
