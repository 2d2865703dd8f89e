"""Parameter-space merges as pure functions of one tensor per model.

Every function takes the base (pivot) tensor and the models' tensors of one parameter, already of one shape and
dtype, and returns the merged tensor in the base's dtype; arithmetic is done in float32 (bf16 sums of deltas lose
most of their bits). `fusion.merge.stream` calls them tensor by tensor over safetensors checkpoints.

- ``linear``: ``Σ w_j θ_j`` (``/ Σ w_j`` when normalised); no base.
- ``task_arithmetic``: ``θ_b + Σ w_j δ_j`` (``δ_j = θ_j − θ_b``; ``/ Σ w_j`` when normalised).
- ``ties``: each ``δ_j`` keeps its ``density`` largest-magnitude entries; a sign is elected per entry from the sum
  of the weighted deltas; deltas of the other sign are dropped; the rest are summed (``/`` the weights that agree,
  when normalised). (Yadav et al. 2023, as mergekit computes it.)
- ``dare``: each ``δ_j`` keeps an entry with probability ``density`` and is rescaled by ``1/density``; then linear
  (``dare_linear``) or TIES's sign election (``dare_ties``). (Yu et al. 2024.)
- ``slerp``: spherical interpolation between two tensors at ``t`` (linear when they are nearly parallel).
- ``sce``: FuseChat-2.0's select-calculate-erase: the ``select_topk`` share of entries whose deltas vary most
  across models is selected; each model's weight is its mean squared selected delta over the sum of those; signs
  are elected as in TIES; the kept deltas are averaged with those weights. ``masked_merge`` says whether the
  selection also masks the deltas that are merged (mergekit) or only those the weights are computed from (the
  FuseChat-2.0 release, which scored 7.38 on MT-Bench).
- ``varm``: FuseChat-1.0's variation-ratio merge, per tensor: ``W_j = mean(δ_j²) / Σ_i mean(δ_i²)``,
  ``θ = θ_b + Σ W_j δ_j`` (the paper's formula; the released script averaged, see `../shared/reference`).
"""

from __future__ import annotations

import math

import torch

Tensors = list[torch.Tensor]


def _float(tensors: Tensors) -> torch.Tensor:
    return torch.stack([t.float() for t in tensors])


def _weights(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-model weights shaped to broadcast over stacked tensors ``like`` ([K, ...])."""
    return torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * (like.dim() - 1)))


def linear(tensors: Tensors, weights: list[float], normalize: bool = True) -> torch.Tensor:
    stacked = _float(tensors)
    w = _weights(weights, stacked)
    merged = (stacked * w).sum(0)
    if normalize:
        merged = merged / w.sum()
    return merged.to(tensors[0].dtype)


def _majority_sign_mask(deltas: torch.Tensor) -> torch.Tensor:
    """Per model and entry: whether its delta has the sign of the entries' sum over models (0 counts as +)."""
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    return deltas.sign() == majority


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The ``density`` share of ``delta``'s entries largest in magnitude: ``max(1, int(density · numel))`` of them
    (none at density 0), as mergekit keeps them."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    if density > 0 and delta.numel():
        k = max(1, int(density * delta.numel()))
        mask[torch.argsort(delta.abs().flatten(), descending=True)[:k]] = True
    return mask.view_as(delta)


def task_arithmetic(base: torch.Tensor, tensors: Tensors, weights: list[float], normalize: bool = False,
                    scale: float = 1.0) -> torch.Tensor:
    return _combine(base, [t.float() - base.float() for t in tensors], weights, normalize, False, scale)


def ties(base: torch.Tensor, tensors: Tensors, weights: list[float], density: float | list[float],
         normalize: bool = True, scale: float = 1.0) -> torch.Tensor:
    densities = density if isinstance(density, list) else [density] * len(tensors)
    deltas = []
    for t, d in zip(tensors, densities):
        delta = t.float() - base.float()
        deltas.append(delta * magnitude_mask(delta, d))
    return _combine(base, deltas, weights, normalize, True, scale)


def dare(base: torch.Tensor, tensors: Tensors, weights: list[float], density: float | list[float],
         generator: torch.Generator, elect_sign: bool = False, normalize: bool = False, rescale: bool = True,
         scale: float = 1.0) -> torch.Tensor:
    """DARE: random drop (keep probability ``density``) and rescale, then linear or TIES-style sign election."""
    densities = density if isinstance(density, list) else [density] * len(tensors)
    deltas = []
    for t, d in zip(tensors, densities):
        delta = t.float() - base.float()
        if d < 1:
            kept = delta * torch.bernoulli(torch.full_like(delta, d), generator=generator)
            before, after = float(delta.abs().sum()), float(kept.abs().sum())
            # mergekit's rescale: the kept deltas scaled back to the L1 norm of all of them (DARE's paper: 1/density,
            # the same in expectation)
            delta = kept * (before / after) if rescale and before >= 1e-7 and after >= 1e-7 else kept
        deltas.append(delta)
    return _combine(base, deltas, weights, normalize, elect_sign, scale)


def _combine(base: torch.Tensor, deltas: Tensors, weights: list[float], normalize: bool, elect_sign: bool,
             scale: float = 1.0) -> torch.Tensor:
    """``θ_b + λ Σ w_j δ_j``, optionally only over deltas with the elected sign, optionally over the weights summed
    (mergekit's ``lambda`` is ``scale``)."""
    stacked = torch.stack(deltas)
    w = _weights(weights, stacked)
    weighted = stacked * w
    if elect_sign:
        mask = _majority_sign_mask(weighted)
        merged = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        merged = weighted.sum(0)
        divisor = w.sum(0).expand_as(merged).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        merged = merged / divisor
    return (base.float() + scale * merged).to(base.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), the tensors taken as flat vectors."""
    fa, fb = a.float(), b.float()
    na, nb = fa / fa.norm().clamp_min(eps), fb / fb.norm().clamp_min(eps)
    dot = float((na * nb).sum())
    if abs(dot) > dot_threshold:
        merged = (1 - t) * fa + t * fb
    else:
        theta = math.acos(dot)
        merged = (math.sin((1 - t) * theta) * fa + math.sin(t * theta) * fb) / math.sin(theta)
    return merged.to(a.dtype)


def sce_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """The entries whose deltas vary most across models: the top ``int(select_topk · nonzero)`` by variance."""
    if select_topk >= 1:
        return torch.ones(deltas.shape[1:], dtype=torch.bool)
    variance = deltas.var(0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * select_topk)
    mask = torch.zeros(variance.numel(), dtype=torch.bool)
    if k > 0:
        mask[variance.flatten().topk(k).indices] = True
    return mask.view_as(variance)


def _energy_weights(deltas: torch.Tensor, uniform_below: float = 0.0) -> torch.Tensor:
    """Per model, its mean squared delta over the sum of them; uniform when that sum is at most ``uniform_below``."""
    energy = deltas.pow(2).flatten(1).mean(1)
    total = float(energy.sum())
    return torch.full_like(energy, 1 / len(energy)) if total == 0 or abs(total) < uniform_below else energy / total


def sce_weights(deltas: torch.Tensor, select_topk: float, masked_merge: bool) -> torch.Tensor:
    """SCE's per-model weights of one tensor from its stacked deltas ([K, ...])."""
    # mergekit falls back to uniform weights below a sum of 1e-6, which fine-tunes of real models stay under (mean
    # squared updates of ~1e-8 per matrix at lr 5e-6): its SCE then weighs every model alike. The release: below 0.
    return _energy_weights(deltas * sce_mask(deltas, select_topk), 1e-6 if masked_merge else 0.0)


def sce(base: torch.Tensor, tensors: Tensors, select_topk: float = 0.1, masked_merge: bool = True) -> torch.Tensor:
    deltas = torch.stack([t.float() - base.float() for t in tensors])
    merged_deltas = deltas * sce_mask(deltas, select_topk) if masked_merge else deltas
    w = sce_weights(deltas, select_topk, masked_merge).view(-1, *([1] * (deltas.dim() - 1)))
    erased = w * _majority_sign_mask(merged_deltas)
    divisor = erased.sum(0)
    if masked_merge:
        divisor = divisor.clamp_min(1e-6)  # mergekit's
    else:
        divisor[divisor == 0] = 1  # the FuseChat-2.0 release's
    return (base.float() + (merged_deltas * erased).sum(0) / divisor).to(base.dtype)


def varm_weights(deltas: torch.Tensor) -> torch.Tensor:
    """VaRM's per-model weights of one tensor: ``mean(δ_j²) / Σ_i mean(δ_i²)`` (uniform when nothing moved)."""
    return _energy_weights(deltas)


def varm(base: torch.Tensor, tensors: Tensors) -> torch.Tensor:
    deltas = torch.stack([t.float() - base.float() for t in tensors])
    w = varm_weights(deltas).view(-1, *([1] * (deltas.dim() - 1)))
    return (base.float() + (w * deltas).sum(0)).to(base.dtype)
