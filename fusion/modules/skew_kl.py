"""An example of a new fusion loss with an argument from the recipe: skew KL (DistiLLM, Ko et al., 2024).

    D = KL(p ‖ α·p + (1 − α)·q) = Σ_u p(u) · (log p(u) − log(α·p(u) + (1 − α)·q(u)))

over the fused teachers' candidates u, with q the student's probabilities, and, with `fusion.tail: bucket`,
the rest of the vocabulary as one more u (the teacher's `tail_mass`, the student's 1 − Σ q). Mixing a
little of the teacher into the student's side keeps the loss and its gradient bounded where the student
gives a candidate almost no mass (α = 0 is the forward KL). α comes from the recipe:

    module_class: fusion.modules.skew_kl.SkewKLFuseLLM
    module_args: {alpha: 0.1}
"""

from __future__ import annotations

import torch

from fusion.errors import FusionError
from fusion.modules.fusellm import FuseLLMModule
from fusion.modules.losses import candidate_logprobs, pooled_probs, tail_mass


class SkewKLFuseLLM(FuseLLMModule):
    def __init__(self, *args, alpha: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0 <= alpha < 1:
            raise FusionError(f"recipe key 'module_args.alpha' must be in [0, 1), got {alpha}")
        self.alpha = alpha

    def distillation_loss(self, logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        p = pooled_probs(ids, probs)
        q = candidate_logprobs(logits, ids).exp() * (p > 0)  # each candidate id once
        rest = tail_mass(probs)  # 0 when the candidates sum to one (`fusion.tail: renormalise`)
        p, q = torch.cat([p, rest[:, None]], -1), torch.cat([q, (1 - q.sum(-1, keepdim=True)).clamp(min=0)], -1)
        mix = self.alpha * p + (1 - self.alpha) * q
        return (p * (p.clamp(min=1e-30).log() - mix.clamp(min=1e-30).log())).sum(-1)
