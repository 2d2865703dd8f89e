"""Loss functions: pure tensor math, tested against straightforward dense references.

Two layers:

- **building blocks** for a loss at one position, on a chunk of float32 logits ``[n, V]`` and a sparse
  teacher distribution ``ids / probs [n, K]``: `log_z`, `candidate_logprobs`, `pooled_probs`. A new
  distillation loss is a few lines of them (see `fusion.modules.skew_kl`);
- **`vocab_loss`**, the engine every module trains with: ``a · NLL + b · D(teacher ‖ student)`` summed
  over tokens, computed chunk by chunk from the final hidden states and the LM head, so the
  ``[tokens, V]`` logits exist only one chunk at a time. Each chunk's gradient is computed in the
  forward pass and kept (``[tokens, hidden]`` and ``[V, hidden]``: the sizes of the activations and of
  the head, never of the logits), so memory is bounded by ``chunk_size`` however long the batch.

At V = 152k and 2 × 2,048 tokens, float32 logits alone are 2.5 GB; the cross-entropy of HF (and our
earlier loss) keeps two such tensors alive for backward. Here a chunk of 1,024 tokens costs ~0.6 GB,
transiently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fusion import kernels

IGNORE_INDEX = -100
_TAIL_MIN = 1e-6  # a teacher's tail mass below this is float error; the student's 1 − Q is kept above it

# --- building blocks ---------------------------------------------------------------------------------


def log_z(logits: torch.Tensor) -> torch.Tensor:
    """``log Σ_v exp(z_v)`` per position: ``[n, V]`` float32 logits -> ``[n]``."""
    return logits.logsumexp(dim=-1)


def candidate_logprobs(logits: torch.Tensor, ids: torch.Tensor, lz: torch.Tensor | None = None) -> torch.Tensor:
    """The student's log-probabilities at the teacher's candidate ids: ``[n, V]``, ``[n, K]`` -> ``[n, K]``."""
    return logits.gather(-1, ids) - (log_z(logits) if lz is None else lz).unsqueeze(-1)


def first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """``[n, K]`` ids -> ``[n, K]`` bool: True at the first occurrence of each distinct id in its row."""
    same = ids.unsqueeze(-1) == ids.unsqueeze(-2)  # [n, K, K]
    return same.float().argmax(-1) == torch.arange(ids.size(-1), device=ids.device)


def pooled_probs(ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The teacher distribution on distinct ids: ``[n, K]`` -> ``[n, K]``.

    A candidate id listed several times (teachers that map two tokens to one target id, AvgCE's
    concatenated lists) gets the sum of its probabilities at its first occurrence and 0 at the others,
    so each id counts once and the row still sums to the teacher's total mass.
    """
    same = ids.unsqueeze(-1) == ids.unsqueeze(-2)  # [n, K, K]
    return (same * probs.unsqueeze(-2)).sum(-1) * first_occurrence(ids)


def tail_mass(probs: torch.Tensor) -> torch.Tensor:
    """The teacher's probability outside its candidates, ``1 − Σ p`` per row: ``[n, K]`` -> ``[n]``.

    0 where the candidates sum to one up to float error (a renormalised list) and where they sum to 0
    (a row with no teacher)."""
    total = probs.sum(-1)
    rest = 1 - total
    return torch.where((rest > _TAIL_MIN) & (total > 0), rest, 0.0)


def tail_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
                       lz: torch.Tensor | None = None) -> torch.Tensor:
    """``−r · log(1 − Σ_u q(u))`` per position: the teacher's tail mass r (`tail_mass`) as one more outcome,
    against the student's probability outside the candidates' distinct ids u (those with a probability:
    a dropped candidate's id is not the teacher's word on that token, so it stays in the tail)."""
    inside = (candidate_logprobs(logits, ids, lz).exp() * (pooled_probs(ids, probs) > 0)).sum(-1)
    return -tail_mass(probs) * torch.log1p(-inside.clamp(max=1 - _TAIL_MIN))


def teacher_probs(logprobs: torch.Tensor, temperature: float = 1.0, tail: str = "renormalise") -> torch.Tensor:
    """Stored top-k log-probs ``[..., k]`` -> the candidates' probabilities at ``temperature``.

    ``tail="renormalise"`` (FuseLLM): a softmax over the k, so they sum to one. ``tail="bucket"``: the
    probability the teacher gave to the rest of its vocabulary, ``1 − Σ exp(logprob)``, is one more
    outcome of the softmax and is left out of the result, so the candidates keep their own probabilities
    (at temperature 1, exactly) and sum to less than one; `vocab_loss` with ``tail=True`` trains the
    student's mass outside the candidates towards that remainder (`tail_cross_entropy`).
    ``-inf`` entries get 0, and so does a row with no finite entry (its softmax would be NaN, which a mask
    by multiplication would spread).
    """
    logprobs = logprobs.float()
    if tail == "bucket":
        rest = (1 - logprobs.exp().sum(-1, keepdim=True)).clamp(min=0).log()
        probs = torch.softmax(torch.cat([logprobs, rest], dim=-1) / temperature, dim=-1)[..., :-1]
    elif tail == "renormalise":
        probs = torch.softmax(logprobs / temperature, dim=-1)
    else:
        raise ValueError(f"unknown tail {tail!r}: use 'renormalise' or 'bucket'")
    return torch.where(torch.isneginf(logprobs).all(-1, keepdim=True), 0.0, probs)


NO_PREDICTION = 1e4  # the CE of a teacher with no prediction in a span: never the lowest; softmax(-CE) weight 0


def span_mean(values: torch.Tensor, missing: torch.Tensor, width: int) -> torch.Tensor:
    """Per position, the mean of ``values [..., L]`` over the ``width`` positions centred on it (``width // 2``
    before), leaving out ``missing`` ones (bool, same shape); `NO_PREDICTION` where the window has none."""
    shape, length = values.shape, values.shape[-1]
    pad = (width // 2, width - 1 - width // 2)
    kernel = torch.ones(1, 1, width, dtype=torch.float32, device=values.device)
    def window_sum(x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(F.pad(x.reshape(-1, 1, length), pad), kernel).reshape(shape)
    present = (~missing).float()
    count = window_sum(present)
    total = window_sum(torch.where(missing, 0.0, values.float()))
    return torch.where(count > 0, total / count.clamp(min=1), NO_PREDICTION)


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


def cross_entropy_to_teacher(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
                             lz: torch.Tensor | None = None) -> torch.Tensor:
    """``-Σ_j p_j log q(id_j)`` per position (duplicate ids add up): the paper's distillation loss."""
    return -(probs * candidate_logprobs(logits, ids, lz)).sum(-1)


def kl_to_teacher(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
                  lz: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(p ‖ q) = Σ_u p(u) (log p(u) − log q(u))`` over the teacher's distinct ids, per position."""
    p = pooled_probs(ids, probs)
    entropy = torch.where(p > 0, p * p.clamp(min=1e-30).log(), 0).sum(-1)
    return entropy - (p * candidate_logprobs(logits, ids, lz)).sum(-1)


DISTILLATION = {"ce": cross_entropy_to_teacher, "kl": kl_to_teacher}

# --- the chunked engine -----------------------------------------------------------------------------


class LossParts(NamedTuple):
    """What `vocab_loss` returns: the loss to backpropagate and its parts, summed over tokens."""

    loss: torch.Tensor  # a · Σ nll + b · Σ distill: differentiable, float32
    nll_sum: torch.Tensor  # Σ next-token NLL (no gradient)
    distill_sum: torch.Tensor  # Σ distillation loss (no gradient; 0 without a teacher)
    tokens: torch.Tensor  # positions with a target


def auto_chunk_size(vocab: int) -> int:
    """Tokens per chunk when none is given: the power of two at or above 2^27 / V, so a chunk holds 2^27 to
    2^28 logits (0.25-0.5 GB in bf16): 1,024 tokens at V = 152k, 8,192 at 32k. Fewer, larger chunks at a
    small vocabulary keep the per-chunk kernel launches from dominating; at 152k, 1,024 tokens measured
    as fast as HF's step at liger-kernel's memory (`bench/fusion_step.py`)."""
    return 1 << max(0, math.ceil(math.log2((1 << 27) / vocab)))


def labelled_rows(targets: torch.Tensor) -> torch.Tensor | None:
    """Indices of the ``[N]`` targets that count (not ``IGNORE_INDEX``), or None when nearly all do. The LM head need
    only run on those rows: a chat or preference batch's prompts and padding are a third to a half of its tokens,
    and at a large vocabulary the head is a large share of the step. Selecting costs one host sync and an ``[M, H]``
    copy, so text rows (one unlabelled position per row) keep every row."""
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    return None if 8 * keep.numel() > 7 * targets.numel() else keep


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` labels -> ``[B, T]`` targets: position ``t`` predicts ``labels[:, t + 1]``; the last
    position has none (``IGNORE_INDEX``). Shifting the labels, not the hidden states, avoids a copy."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def vocab_loss(hidden: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor, *,
               bias: torch.Tensor | None = None, clm_weight: torch.Tensor | float = 1.0,
               ids: torch.Tensor | None = None, probs: torch.Tensor | None = None,
               distill_weight: torch.Tensor | float = 0.0, distillation: str | Callable = "ce",
               tail: bool = False, chunk_size: int | None = None) -> LossParts:
    """``clm_weight · Σ NLL + distill_weight · Σ D`` over the tokens with a target, chunk by chunk.

    Args:
        hidden: ``[N, H]`` final hidden states (any float dtype; autocast applies to the head), or
            ``[N, V]`` logits when ``weight`` is None (for heads this engine cannot compute itself).
        weight, bias: the LM head, ``[V, H]`` and ``[V]``; logits = hidden @ weight.T + bias.
        targets: ``[N]`` int64 next-token ids, ``IGNORE_INDEX`` where no loss is wanted.
        clm_weight, distill_weight: per-token weights of the two sums (e.g. λ / tokens); scalars or
            0-dim tensors (no host sync).
        ids, probs: ``[N, K]`` the teacher's candidate ids (in the student's vocabulary) and their
            probabilities, for the distillation term; None for the CLM loss alone.
        distillation: ``"ce"`` or ``"kl"`` (gradients written out by hand: the fast path), or a
            function ``(logits [n, V] float32, ids [n, K], probs [n, K]) -> [n]`` made of the building
            blocks above (its gradient comes from autograd, inside each chunk).
        tail: the candidates may sum to less than one (`teacher_probs` with ``tail="bucket"``): ``"ce"``
            and ``"kl"`` add the rest of the vocabulary as one more outcome, `tail_cross_entropy` (and,
            for KL, its ``r log r``). A function gets the candidates as they are.
        chunk_size: tokens per chunk: the logits exist ``chunk_size`` rows at a time (in the head's
            dtype with the CUDA kernel; float32 plus one copy in the head's dtype on the eager path);
            None: `auto_chunk_size`.

    Returns:
        `LossParts`. Backward works once (the gradient was computed in the forward pass and is
        handed over, not recomputed), as with any loss that is backpropagated once per step.
    """
    keep = labelled_rows(targets) if weight is not None else None  # given logits exist whole already: no copy
    if keep is not None:  # the masked rows add nothing to either term, so they skip the head's matmuls
        hidden, targets = hidden.index_select(0, keep), targets[keep]
        if ids is not None:
            ids, probs = ids[keep], probs[keep]
    mask = targets != IGNORE_INDEX
    if ids is None:  # no teacher: empty candidate lists
        ids = torch.zeros((targets.numel(), 0), dtype=torch.long, device=hidden.device)
        probs = torch.zeros((targets.numel(), 0), dtype=torch.float32, device=hidden.device)
        distill_weight = 0.0
    vocab = hidden.size(-1) if weight is None else weight.size(0)
    weights = torch.stack([torch.as_tensor(clm_weight, dtype=torch.float32, device=hidden.device),
                           torch.as_tensor(distill_weight, dtype=torch.float32, device=hidden.device)])
    loss, nll_sum, distill_sum = _ChunkedVocabLoss.apply(hidden, weight, bias, targets, ids, probs.float(), weights,
                                                         distillation, tail, chunk_size or auto_chunk_size(vocab))
    return LossParts(loss, nll_sum, distill_sum, mask.sum())


class _ChunkedVocabLoss(torch.autograd.Function):
    """`vocab_loss` as one autograd node: forward computes the loss and its gradients chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ids, probs, weights, distillation, tail, chunk_size):
        want = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if want[0] else None
        # The head's gradient is summed over chunks in float32, whatever the weights' dtype.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight is not None and want[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if bias is not None and want[2] else None
        needs_grad = grad_hidden is not None or grad_weight is not None or grad_bias is not None
        device = hidden.device.type
        # The dtype of the head's matmuls: autocast's when it is on (bf16-mixed), else the weights'.
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else \
            (hidden.dtype if weight is None else weight.dtype)
        nll_sum = hidden.new_zeros((), dtype=torch.float32)
        distill_sum = hidden.new_zeros((), dtype=torch.float32)
        loss = hidden.new_zeros((), dtype=torch.float32)
        # One copy of the head in the matmuls' dtype for the whole pass (autocast would cast it per chunk).
        w = None if weight is None else weight.to(mm_dtype)
        b = None if bias is None else bias.to(mm_dtype)
        # On CUDA the fast path's softmax is one Triton kernel on the logits in their own dtype (`kernels`).
        fused = needs_grad and not callable(distillation) and kernels.available(hidden)
        for start in range(0, hidden.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            if weight is None:  # the input's rows, read only: the gradient goes to its own buffer
                logits = h if fused else h.float()
                same = grad_hidden is not None and (fused or h.dtype == torch.float32)
                out = grad_hidden[rows] if same else None
            else:  # our own logits: the gradient overwrites them
                h = h.to(mm_dtype)
                logits = F.linear(h, w, b)
                logits = logits if fused else logits.float()
                out = logits
            nll, distill, chunk_loss, grad_logits = _chunk(logits, targets[rows], ids[rows], probs[rows], weights,
                                                           distillation, tail, needs_grad, out, fused)
            nll_sum += nll
            distill_sum += distill
            loss += chunk_loss
            if not needs_grad:
                continue
            if weight is None:
                if out is None:
                    grad_hidden[rows] = grad_logits
                continue
            g = grad_logits.to(mm_dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = g @ w
            if grad_weight is not None:
                grad_weight += g.T @ h
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
        ctx.mark_non_differentiable(nll_sum, distill_sum)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss, nll_sum, distill_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_distill):
        if getattr(ctx, "used", False):  # the buffers below were scaled in place by the first backward
            raise RuntimeError("vocab_loss supports one backward pass per forward (no retain_graph)")
        ctx.used = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss.float()
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(scale.to(grad_hidden.dtype))  # our own buffer: scaled in place
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(scale).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _chunk(logits: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
           weights: torch.Tensor, distillation: str | Callable, tail: bool, needs_grad: bool,
           out: torch.Tensor | None, fused: bool = False):
    """One chunk of logits ``[n, V]``: ``(Σ nll, Σ distill, weighted loss, d loss / d logits or None)``.

    The logits are float32, or in the head's dtype when ``fused`` (the Triton kernel reads them as they
    are). The gradient is written into ``out`` (may be ``logits`` itself: one ``[n, V]`` buffer, not two),
    or a new tensor when ``out`` is None. Each pass over ``[n, V]`` costs as much as the matmul's output,
    so the eager fast path makes as few as HF's cross-entropy: log Z (read), the gradient (write), its
    exp (in place); the kernel reads twice and writes once.
    """
    mask = targets != IGNORE_INDEX
    a = weights[0] * mask  # [n] per-token weights of the two terms
    b = weights[1] * mask
    gold = targets.clamp(min=0).unsqueeze(-1)
    teacher = ids.size(-1) > 0
    if callable(distillation):
        with torch.enable_grad():
            z = logits.detach().requires_grad_(needs_grad)
            nll = log_z(z) - z.gather(-1, gold).squeeze(-1)
            distill = distillation(z, ids, probs) if teacher else torch.zeros_like(nll)
            loss = (a * nll).sum() + (b * distill).sum()
            grad = torch.autograd.grad(loss, z)[0] if needs_grad else None
        if grad is not None and out is not None:
            grad = out.copy_(grad)
        return (nll * mask).sum().detach(), (distill * mask).sum().detach(), loss.detach(), grad
    # What the loss reads of the logits, gathered before the gradient may overwrite them.
    z_gold = logits.gather(-1, gold).squeeze(-1).float()
    z_ids = logits.gather(-1, ids).float()
    # d/dz of a·NLL + b·CE(p‖q) = softmax(z)·(a + b·Σp) − a·onehot(gold) − b·p (at the candidate ids).
    # KL differs from CE by the teacher's entropy, which does not depend on z: the same gradient.
    scale = a + b * probs.sum(-1) if teacher else a
    tail = tail and teacher
    lz = grad = None
    if tail:
        # The tail term −r·log(1 − Q), Q the student's mass on the distinct candidate ids, has the gradient
        # −c·Q·softmax(z) + c·q at those ids, c = r / (1 − Q): its scale needs log Z before the gradient.
        lz = kernels.row_log_z(logits) if fused else log_z(logits)
        q = (z_ids - lz.unsqueeze(-1)).exp() * (pooled_probs(ids, probs) > 0)  # each candidate id once
        inside = q.sum(-1).clamp(max=1 - _TAIL_MIN)
        rest = tail_mass(probs)
        coef = b * rest / (1 - inside)
        scale = scale - coef * inside  # may be negative: the student's mass belongs in the tail
    if fused:
        grad, lz = kernels.scaled_softmax(logits, scale, out)
    else:
        lz = log_z(logits) if lz is None else lz
        if needs_grad and tail:  # a signed scale: exp, then multiply
            grad = torch.sub(logits, lz.unsqueeze(-1), out=out).exp_().mul_(scale.unsqueeze(-1))
        elif needs_grad:  # softmax(z)·s = exp(z − (log Z − log s)), one pass (rows with s = 0 get exp(−inf) = 0)
            grad = torch.sub(logits, (lz - scale.log()).unsqueeze(-1), out=out).exp_()
    nll = lz - z_gold
    logq = z_ids - lz.unsqueeze(-1)
    distill = -(probs * logq).sum(-1) if teacher else torch.zeros_like(nll)
    if tail:
        distill = distill - rest * torch.log1p(-inside)
    if teacher and distillation == "kl":
        pooled = pooled_probs(ids, probs)
        distill = distill + torch.where(pooled > 0, pooled * pooled.clamp(min=1e-30).log(), 0).sum(-1)
        if tail:
            distill = distill + torch.where(rest > 0, rest * rest.clamp(min=1e-30).log(), 0)
    elif distillation not in DISTILLATION:
        raise ValueError(f"unknown distillation loss {distillation!r}: use 'ce', 'kl' or a function")
    loss = (a * nll).sum() + (b * distill).sum()
    if grad is not None:
        grad.scatter_add_(-1, gold, -a.unsqueeze(-1).to(grad.dtype))
        if teacher:
            at_ids = -(b.unsqueeze(-1) * probs)
            if tail:
                at_ids = at_ids + coef.unsqueeze(-1) * q
            grad.scatter_add_(-1, ids, at_ids.to(grad.dtype))
    return (nll * mask).sum(), (distill * mask).sum(), loss, grad
