"""An example of a new fusion loss with an argument from the recipe: skew KL (DistiLLM, Ko et al., 2024).

    D = KL(p ‖ α·p + (1 − α)·q) = Σ_u p(u) · (log p(u) − log(α·p(u) + (1 − α)·q(u)))

over the fused teachers' candidates u, with q the student's probabilities. Mixing a little of the
teacher into the student's side keeps the loss and its gradient bounded where the student gives a
candidate almost no mass (α = 0 is the forward KL). α comes from the recipe:

    module_class: fusion.modules.skew_kl.SkewKLFuseLLM
    module_args: {alpha: 0.1}
"""

from __future__ import annotations

import torch

from fusion.errors import FusionError
from fusion.modules.fusellm import FuseLLMModule
from fusion.modules.losses import candidate_logprobs, pooled_probs


class SkewKLFuseLLM(FuseLLMModule):
    def __init__(self, *args, alpha: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0 <= alpha < 1:
            raise FusionError(f"recipe key 'module_args.alpha' must be in [0, 1), got {alpha}")
        self.alpha = alpha

    def distillation_loss(self, logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        p = pooled_probs(ids, probs)
        mix = self.alpha * p + (1 - self.alpha) * candidate_logprobs(logits, ids).exp()
        return (p * (p.clamp(min=1e-30).log() - mix.clamp(min=1e-30).log())).sum(-1)
