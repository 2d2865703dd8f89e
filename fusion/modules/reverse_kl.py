"""An example of a new fusion loss by subclassing: reverse KL on the teachers' support.

    D = KL(q̃ ‖ p) = Σ_{u ∈ S} q̃(u) · (log q̃(u) − log p(u))

where S is the fused distribution's candidate set, p the fused teacher probabilities and q̃ the
student's distribution renormalised on S. Reverse KL is mode-seeking: the student concentrates on
what the teachers agree is likely instead of covering every candidate. Use it from a recipe with

    module_class: fusion.modules.reverse_kl.ReverseKLFuseLLM
"""

from __future__ import annotations

import torch

from fusion.modules.fusellm import FuseLLMModule
from fusion.modules.losses import IGNORE_INDEX, next_token_nll


class ReverseKLFuseLLM(FuseLLMModule):
    def distillation(self, logits: torch.Tensor, batch: dict, ids: torch.Tensor,
                     probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nll, mask = next_token_nll(logits, batch["labels"])
        tokens = mask.sum().clamp(min=1)
        # Duplicate candidate ids are pooled: sum each id's probability, and count it once.
        ids, probs = ids[:, :-1], probs[:, :-1].float()
        same = ids.unsqueeze(-1) == ids.unsqueeze(-2)
        first = same.float().argmax(-1) == torch.arange(ids.size(-1), device=ids.device)
        p = (same * probs.unsqueeze(-2)).sum(-1)
        support = first & (p > 0)
        student = logits[:, :-1].float().log_softmax(-1).gather(-1, ids)
        student = student.masked_fill(~support, float("-inf"))
        q = student.log_softmax(-1).masked_fill(~support, 0)  # renormalised on the support; 0, not -inf,
        kl = (support * q.exp() * (q - p.clamp(min=1e-30).log())).sum(-1)  # off it: no 0 * inf in backward
        valid = batch["labels"][:, 1:] != IGNORE_INDEX
        return nll.sum() / tokens, (kl * valid).sum() / tokens
