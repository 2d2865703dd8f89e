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


def teacher_probs(logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Stored top-k log-probs ``[..., k]`` -> probabilities renormalised over the k at ``temperature``
    (FuseLLM's softmax over the stored candidates); ``-inf`` entries get 0."""
    return torch.softmax(logprobs.float() / temperature, dim=-1)


def fuse_teachers(ids: torch.Tensor, probs: torch.Tensor, ce: torch.Tensor,
                  function: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fuse T teachers' sparse distributions into one.

    Args:
        ids, probs: ``[B, T, L, k]`` candidates and their probabilities per teacher.
        ce: ``[B, T]`` (sequence level) or ``[B, T, L]`` (token level) teacher cross-entropies.
        function: ``mince`` (the lowest-CE teacher; ties go to the first listed) or ``avgce``
            (teachers weighted by softmax(-CE)).

    Returns:
        ``(ids, probs, weights)``: ``[B, L, k]`` (MinCE) or ``[B, L, T*k]`` (AvgCE) and the teacher
        weights, ``[B, T]`` or ``[B, T, L]`` (one-hot for MinCE).
    """
    b, t, length, k = ids.shape
    ce = ce.float()
    if function == "mince":
        weights = F.one_hot(ce.argmin(dim=1), t).movedim(-1, 1).to(probs.dtype)  # argmin: the first of equals
        pick = ce.argmin(dim=1)  # [B] or [B, L]
        index = pick.view(b, 1, 1, 1).expand(b, 1, length, k) if ce.dim() == 2 else \
            pick.view(b, 1, length, 1).expand(b, 1, length, k)
        return ids.gather(1, index).squeeze(1), probs.gather(1, index).squeeze(1), weights
    if function == "avgce":
        weights = torch.softmax(-ce, dim=1)
        w = weights.view(b, t, 1, 1) if ce.dim() == 2 else weights.view(b, t, length, 1)
        return (ids.permute(0, 2, 1, 3).reshape(b, length, t * k),
                (probs * w).permute(0, 2, 1, 3).reshape(b, length, t * k), weights)
    raise ValueError(f"unknown fusion function {function!r}: use 'mince' or 'avgce'")


def sparse_distillation(logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
                        loss: str = "ce", chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CLM NLL and the distillation loss against a sparse teacher distribution, without ``[B, L, V]`` targets.

    Position ``l`` of ``logits [B, L, V]`` predicts ``labels[:, l + 1]``; the teacher distribution for it
    is ``ids / probs [B, L, K]`` at ``l`` (duplicate ids add up). Both losses share one log-sum-exp per
    position, computed in float32 over chunks of ``chunk_size`` positions.

    Returns ``(nll_sum, distill_sum, tokens)``: summed over the positions whose label is not
    ``IGNORE_INDEX``. ``loss="ce"``: ``-sum_j p_j log q(id_j)``; ``"kl"``: that minus the teacher's entropy.
    """
    nll_sum = logits.new_zeros((), dtype=torch.float32)
    distill_sum = logits.new_zeros((), dtype=torch.float32)
    tokens = labels.new_zeros(())
    positions = logits.size(1) - 1
    for start in range(0, positions, chunk_size):
        end = min(start + chunk_size, positions)
        lg = logits[:, start:end].float()
        gold = labels[:, start + 1:end + 1]
        mask = gold != IGNORE_INDEX
        lse = lg.logsumexp(dim=-1)
        nll = lse - lg.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        p = probs[:, start:end].float()
        logq = lg.gather(-1, ids[:, start:end]) - lse.unsqueeze(-1)
        distill = -(p * logq).sum(-1)
        if loss == "kl":
            i = ids[:, start:end]
            merged = ((i.unsqueeze(-1) == i.unsqueeze(-2)) * p.unsqueeze(-2)).sum(-1)  # mass of each entry's id
            distill = distill + torch.where(p > 0, p * merged.clamp(min=1e-30).log(), 0).sum(-1)
        elif loss != "ce":
            raise ValueError(f"unknown distillation loss {loss!r}: use 'ce' or 'kl'")
        nll_sum = nll_sum + (nll * mask).sum()
        distill_sum = distill_sum + (distill * mask).sum()
        tokens = tokens + mask.sum()
    return nll_sum, distill_sum, tokens
