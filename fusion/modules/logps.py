"""Summed log-probabilities of whole responses, the quantity preference losses (DPO, WRPO) are made of.

``sequence_logps(hidden, weight, targets, segments, n)`` returns, for each of ``n`` sequences, the sum of
``log p(target_t)`` over its positions, computed from the final hidden states and the LM head a chunk of tokens
at a time, so the ``[tokens, V]`` logits never exist whole (as `fusion.modules.losses.vocab_loss`). Unlike the
CLM loss, a preference loss is not a fixed weighting of per-token terms: its weight per sequence,
``dL/d logp_s``, is known only once every sequence's log-prob is. So the forward pass keeps only each token's
log Z (4 bytes), and the backward pass computes each chunk's logits once more and its gradient
``g_s · (onehot − softmax)``: one head matmul more than the CLM engine, never the ``[N, V]`` float32 tensor
that gathering from ``log_softmax(logits)`` keeps for backward (2.5 GB at V = 152k and 2 × 2,048 tokens).
Only the positions that count (the responses) go through the head (`fusion.modules.losses.labelled_rows`): a
prompt costs the body's forward and backward, not the head's three matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion import kernels
from fusion.modules.losses import IGNORE_INDEX, auto_chunk_size, labelled_rows


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor, segments: torch.Tensor,
                   n: int, *, bias: torch.Tensor | None = None, chunk_size: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ log p, token count)`` per sequence, both ``[n]`` float32 (the sum differentiable).

    Args:
        hidden: ``[N, H]`` final hidden states, or ``[N, V]`` logits when ``weight`` is None (heads this cannot
            compute itself: their logits are read as given, chunk by chunk, under plain autograd).
        weight, bias: the LM head.
        targets: ``[N]`` next-token ids, ``IGNORE_INDEX`` where nothing is counted (prompt, padding).
        segments: ``[N]`` which of the ``n`` sequences each position belongs to.
        chunk_size: tokens per chunk (default: `fusion.modules.losses.auto_chunk_size`).
    """
    mask = targets != IGNORE_INDEX
    counts = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add_(0, segments, mask.float())
    vocab = hidden.size(-1) if weight is None else weight.size(0)
    chunk = chunk_size or auto_chunk_size(vocab)
    if weight is None:
        sums = hidden.new_zeros(n, dtype=torch.float32)
        for start in range(0, hidden.size(0), chunk):
            rows = slice(start, start + chunk)
            logits = hidden[rows].float()
            token = logits.gather(-1, targets[rows].clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
            sums = sums.index_add(0, segments[rows], torch.where(mask[rows], token, 0.0))
        return sums, counts
    keep = labelled_rows(targets)  # the prompts and padding skip the head's matmuls, forward and backward
    if keep is not None:
        hidden, targets, segments = hidden.index_select(0, keep), targets[keep], segments[keep]
    sums = _ChunkedSequenceLogps.apply(hidden, weight, bias, targets, segments, n, chunk)
    return sums, counts


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class _ChunkedSequenceLogps(torch.autograd.Function):
    """Forward: per-sequence sums of token log-probs, keeping each token's log Z. Backward: the logits again, chunk
    by chunk, and ``g_s · (onehot(gold) − softmax)`` into the hidden states' and the head's gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, segments, n, chunk_size):
        mm_dtype = _matmul_dtype(hidden, weight)
        w = weight.to(mm_dtype)
        b = None if bias is None else bias.to(mm_dtype)
        mask = targets != IGNORE_INDEX
        gold = targets.clamp(min=0)
        lz = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        token = torch.empty_like(lz)
        for start in range(0, hidden.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            logits = F.linear(hidden[rows].to(mm_dtype), w, b)
            lz[rows] = kernels.row_log_z(logits) if kernels.available(logits) else logits.float().logsumexp(-1)
            token[rows] = logits.gather(-1, gold[rows].unsqueeze(-1)).squeeze(-1).float() - lz[rows]
        sums = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add_(
            0, segments, torch.where(mask, token, 0.0))
        ctx.save_for_backward(hidden, weight, bias, targets, segments, lz)
        ctx.chunk_size, ctx.mm_dtype = chunk_size, mm_dtype
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        hidden, weight, bias, targets, segments, lz = ctx.saved_tensors
        want = ctx.needs_input_grad
        mm_dtype, chunk_size = ctx.mm_dtype, ctx.chunk_size
        w = weight.to(mm_dtype)
        b = None if bias is None else bias.to(mm_dtype)
        # d/dz of g·log p(gold) = g·(onehot(gold) − softmax(z)), g the sequence's gradient (0 where not counted)
        g = torch.where(targets != IGNORE_INDEX, grad_sums.float()[segments], 0.0)
        gold = targets.clamp(min=0).unsqueeze(-1)
        grad_hidden = torch.empty_like(hidden) if want[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if bias is not None and want[2] else None
        for start in range(0, hidden.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows].to(mm_dtype)
            logits = F.linear(h, w, b)
            if kernels.available(logits):  # softmax·(−g) in place, in the logits' own dtype
                grad, _ = kernels.scaled_softmax(logits, -g[rows], logits)
            else:
                grad = torch.sub(logits.float(), lz[rows].unsqueeze(-1)).exp_().mul_(-g[rows].unsqueeze(-1))
            grad.scatter_add_(-1, gold[rows], g[rows].unsqueeze(-1).to(grad.dtype))
            grad = grad.to(mm_dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad @ w
            if grad_weight is not None:
                grad_weight += grad.T @ h
            if grad_bias is not None:
                grad_bias += grad.sum(0, dtype=torch.float32)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None
