"""An example of a new fusion loss by subclassing: reverse KL on the teachers' support.

    D = KL(q̃ ‖ p) = Σ_{u ∈ S} q̃(u) · (log q̃(u) − log p(u))

where S is the fused distribution's candidate set, p the fused teacher probabilities renormalised on S
(with `fusion.tail: bucket` they sum to less than one) and q̃ the student's distribution renormalised
on S. Reverse KL is mode-seeking: the student concentrates on what the teachers agree is likely
instead of covering every candidate. Use it from a recipe with

    module_class: fusion.modules.reverse_kl.ReverseKLFuseLLM
"""

from __future__ import annotations

import torch

from fusion.modules.fusellm import FuseLLMModule
from fusion.modules.losses import candidate_logprobs, pooled_probs


class ReverseKLFuseLLM(FuseLLMModule):
    def distillation_loss(self, logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        p = pooled_probs(ids, probs)  # each distinct candidate once, with its total probability
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
        support = p > 0
        q = candidate_logprobs(logits, ids).masked_fill(~support, float("-inf")).log_softmax(-1)
        q = q.masked_fill(~support, 0)  # 0, not -inf, off the support: no 0 * inf in backward
        return (support * q.exp() * (q - p.clamp(min=1e-30).log())).sum(-1)
