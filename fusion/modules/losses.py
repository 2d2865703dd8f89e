"""Loss functions: pure tensor math, tested against straightforward references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position negative log-likelihood of the next token.

    Args:
        logits: `[B, T, V]`, any float dtype; position `t` predicts token `t + 1`.
        labels: `[B, T]` int64 token ids, `IGNORE_INDEX` where no loss is wanted.

    Returns:
        `(nll, mask)`, both `[B, T - 1]`: float32 NLL (0 where masked) and a bool mask of the
        positions that count. The log-softmax runs in float32, so bf16 logits lose nothing.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        targets.masked_fill(~mask, 0).reshape(-1),
        reduction="none",
    ).view_as(targets)
    return nll * mask, mask
