"""Parameter-space merges, computed over a tensor's rows a block at a time.

A merge of one tensor is a `TensorMerge`: a first pass over the row blocks gathers the per-tensor statistics the
method needs (``observe``; none for the element-wise ones), ``settle`` turns them into thresholds and weights, and a
second pass merges each block (``combine``). So memory holds a block of every model plus, for the methods that rank
all of a tensor's entries (TIES, SCE), one float32 copy of a single statistic, never a tensor per model in float32.
`merge_whole` runs the passes over a whole tensor at once (one block), for tests and small tensors.

- ``linear``: ``Σ w_j θ_j`` (``/ Σ w_j`` when normalised); no base.
- ``task_arithmetic``: ``θ_b + λ Σ w_j δ_j`` (``δ_j = θ_j − θ_b``; ``/ Σ w_j`` when normalised).
- ``ties``: each ``δ_j`` keeps its ``max(1, ⌊density·n⌋)`` largest-magnitude entries; a sign is elected per entry
  from the sum of the weighted deltas; deltas of the other sign are dropped; the rest summed (``/`` the weights that
  agree, when normalised). (Yadav et al. 2023, as mergekit computes it.)
- ``dare_linear`` / ``dare_ties``: each ``δ_j`` keeps an entry with probability ``density`` and is rescaled to its
  L1 norm (mergekit's rescale; the DARE paper's ``1/density`` is the same in expectation); then task arithmetic or
  TIES's sign election. (Yu et al. 2024.)
- ``slerp``: spherical interpolation from the base (t = 0) to the other model (t = 1); linear when they are nearly
  parallel.
- ``sce``: FuseChat-2.0's select-calculate-erase: the ``select_topk`` share of the entries whose deltas vary most
  across models is selected; each model's weight is its mean squared selected delta over the sum of those; signs are
  elected as in TIES; the kept deltas are averaged with those weights. ``masked_merge``: whether the selection also
  masks the deltas that are merged (mergekit) or only those the weights come from (the FuseChat-2.0 release).
- ``varm``: FuseChat-1.0's variation-ratio merge: ``W_j = mean(δ_j²) / Σ_i mean(δ_i²)``, ``θ = θ_b + Σ W_j δ_j`` (the
  paper's formula; the released script averaged).

Arithmetic is float32 whatever the checkpoints' dtype, rounded once to the output's. A top-k keeps exactly k entries;
which of several equal values make the cut is mergekit's choice up to `EXACT_TOP_K` entries, the first in the
tensor's order above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

Blocks = list[torch.Tensor]
# Tensors up to this many entries rank them as mergekit does (an argsort, whose order among equal values is its
# own); larger ones by threshold, keeping tied entries first in the tensor's order, so that no index array of the
# tensor's size is made (8 bytes an entry: 4 GB for a 152k x 3,584 embedding).
EXACT_TOP_K = 2**24


def kth_largest(values: np.ndarray, k: int) -> float:
    """The ``k``-th largest of ``values`` (float32, flat; reordered in place: no copy of a tensor-sized array)."""
    n = values.size
    values.partition(n - k)
    return float(values[n - k])


def _deltas(base: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    return torch.stack([b.float() - base.float() for b in blocks])


def _column(values, like: torch.Tensor) -> torch.Tensor:
    """Per-model scalars shaped to broadcast over stacked blocks ``like`` ([K, ...])."""
    return torch.as_tensor(values, dtype=torch.float32).view(-1, *([1] * (like.dim() - 1)))


def _majority(deltas: torch.Tensor) -> torch.Tensor:
    """Per model and entry: whether its delta has the sign of the entries' sum over models (0 counts as +)."""
    return deltas.sign() == torch.where(deltas.sum(0) >= 0, 1.0, -1.0)


def _energy_weights(energy: list[float], uniform_below: float = 0.0) -> list[float]:
    """Each model's mean squared delta over the sum of them; uniform when that sum is 0 or below ``uniform_below``."""
    total = sum(energy)
    return [1 / len(energy)] * len(energy) if total == 0 or abs(total) < uniform_below else [e / total for e in energy]


@dataclass
class TensorMerge:
    """One tensor's merge: ``observe`` every block, ``settle``, then ``combine`` every block (see the module)."""

    method: str
    weights: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    normalize: bool = True
    scale: float = 1.0  # mergekit's lambda
    t: float = 0.5
    select_topk: float = 1.0
    masked_merge: bool = True  # SCE: mergekit's semantics
    rescale: bool = True  # DARE
    seed: int = 0  # DARE: the masks of block i come from seed + i
    numel: int = 0  # entries of the whole tensor
    chosen: list[float] | None = None  # VaRM's and SCE's per-model weights, once settled
    _sums: list[float] = field(default_factory=list)
    _ranked: list[np.ndarray] = field(default_factory=list)
    _offset: int = 0
    _thresholds: list[float] = field(default_factory=list)
    _tied: list[int] = field(default_factory=list)  # entries equal to the threshold still to keep, per ranking
    _masks: list[np.ndarray | None] = field(default_factory=list)  # exact top-k masks of tensors up to EXACT_TOP_K
    _cursor: int = 0  # entries of the tensor the merging pass has done

    @property
    def passes(self) -> int:
        return 1 if self.method in ("linear", "task_arithmetic") else 2

    def _dare_keep(self, block: int, model: int, shape: torch.Size) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 7919 * block + model)
        return torch.bernoulli(torch.full(shape, self.densities[model]), generator=generator)

    # -- pass 1 ---------------------------------------------------------------------------------------------------
    def observe(self, index: int, base: torch.Tensor | None, blocks: Blocks) -> None:
        m = self.method
        if m in ("linear", "task_arithmetic"):
            return
        if m == "slerp":  # |a|², |b|², a·b
            a, b = base.float(), blocks[0].float()
            sums = [float((a * a).sum()), float((b * b).sum()), float((a * b).sum())]
        elif m in ("dare_linear", "dare_ties"):  # per model: L1 of its delta, and of what its mask keeps
            deltas = _deltas(base, blocks)
            sums = []
            for j in range(len(blocks)):
                kept = deltas[j] * self._dare_keep(index, j, deltas[j].shape) if self.densities[j] < 1 else deltas[j]
                sums += [float(deltas[j].abs().sum()), float(kept.abs().sum())]
        elif m == "varm":
            sums = [float(d.pow(2).sum()) for d in _deltas(base, blocks)]
        else:  # ties: |δ_j| of every entry; sce: the variance of every entry over models
            deltas = _deltas(base, blocks)
            if not self._ranked:
                count = len(blocks) if m == "ties" else 1
                self._ranked = [np.empty(self.numel, dtype=np.float32) for _ in range(count)]
            rows = slice(self._offset, self._offset + deltas[0].numel())
            if m == "ties":
                for j, d in enumerate(deltas):
                    self._ranked[j][rows] = d.abs().flatten().numpy()
            else:
                self._ranked[0][rows] = deltas.var(0, unbiased=False).flatten().numpy()
            self._offset += deltas[0].numel()
            return
        self._sums = [x + y for x, y in zip(self._sums, sums)] if self._sums else sums

    def settle(self) -> None:
        """Each ranking's threshold (its k-th largest value) and how many entries equal to it make up the k: the
        first of them in the tensor's order, as a stable descending sort (mergekit's argsort on a CPU) takes them."""
        m = self.method
        if m == "ties":
            counts = [-1 if d >= 1 else 0 if d <= 0 or r.size == 0 else max(1, int(d * r.size))
                      for r, d in zip(self._ranked, self.densities)]
        elif m == "sce":
            variance = self._ranked[0]
            counts = [-1 if self.select_topk >= 1 else int(int(np.count_nonzero(variance)) * self.select_topk)]
        else:
            return
        self._thresholds, self._tied, self._masks = [], [], []
        for ranked, k in zip(self._ranked, counts):
            self._masks.append(None)
            if k < 0:  # everything
                self._thresholds.append(-math.inf)
                self._tied.append(0)
            elif k == 0:  # nothing
                self._thresholds.append(math.inf)
                self._tied.append(0)
            elif ranked.size <= EXACT_TOP_K:  # mergekit's own ranking, ties in its order
                values = torch.from_numpy(ranked)
                top = torch.argsort(values, descending=True)[:k] if m == "ties" else values.topk(k).indices
                mask = np.zeros(ranked.size, dtype=bool)
                mask[top.numpy()] = True
                self._masks[-1] = mask
                self._thresholds.append(0.0)
                self._tied.append(0)
            else:
                threshold = kth_largest(ranked, k)
                self._thresholds.append(threshold)
                self._tied.append(k - int(np.count_nonzero(ranked > threshold)))
        self._ranked = []

    def _top(self, values: torch.Tensor, ranking: int, consume: bool) -> torch.Tensor:
        """The block's entries among ranking ``ranking``'s top k (``consume``: spend the ties kept)."""
        if self._masks[ranking] is not None:
            return torch.from_numpy(self._masks[ranking][self._cursor:self._cursor + values.numel()]).view_as(values)
        threshold = self._thresholds[ranking]
        if math.isinf(threshold):
            return torch.full_like(values, threshold < 0, dtype=torch.bool)
        tied = values == threshold
        keep_tied = tied & (tied.flatten().cumsum(0).view_as(values) <= self._tied[ranking])
        if consume:
            self._tied[ranking] -= int(keep_tied.sum())
        return (values > threshold) | keep_tied

    def sce_energy(self, base: torch.Tensor, blocks: Blocks) -> list[float]:
        """SCE's pass between the two: each model's summed squared *selected* delta in this block."""
        deltas = _deltas(base, blocks)
        selected = deltas * self._top(deltas.var(0, unbiased=False), 0, consume=True)
        self._cursor += deltas[0].numel()
        return [float(d.pow(2).sum()) for d in selected]

    # -- pass 2 ---------------------------------------------------------------------------------------------------
    def combine(self, index: int, base: torch.Tensor | None, blocks: Blocks) -> torch.Tensor:
        m = self.method
        if m == "linear":
            stacked = torch.stack([b.float() for b in blocks])
            w = _column(self.weights, stacked)
            merged = (stacked * w).sum(0)
            return merged / w.sum() if self.normalize else merged
        if m == "slerp":
            aa, bb, ab = self._sums
            a, b = base.float(), blocks[0].float()
            dot = ab / (max(math.sqrt(aa), 1e-8) * max(math.sqrt(bb), 1e-8))
            if abs(dot) > 0.9995:
                return (1 - self.t) * a + self.t * b
            theta = math.acos(dot)
            return (math.sin((1 - self.t) * theta) * a + math.sin(self.t * theta) * b) / math.sin(theta)
        deltas = _deltas(base, blocks)
        if m == "varm":
            self.chosen = _energy_weights(self._sums)
            return base.float() + (_column(self.chosen, deltas) * deltas).sum(0)
        if m == "sce":
            selected = deltas * self._top(deltas.var(0, unbiased=False), 0, consume=True)
            self._cursor += deltas[0].numel()
            merged = selected if self.masked_merge else deltas
            w = _column(self.chosen, deltas) * _majority(merged)
            divisor = w.sum(0)
            divisor = divisor.clamp_min(1e-6) if self.masked_merge else torch.where(divisor == 0, 1.0, divisor)
            return base.float() + (merged * w).sum(0) / divisor
        if m == "ties":
            deltas = deltas * torch.stack([self._top(d.abs(), j, consume=True) for j, d in enumerate(deltas)])
            self._cursor += deltas[0].numel()
        elif m in ("dare_linear", "dare_ties"):
            for j in range(len(blocks)):
                if self.densities[j] < 1:
                    deltas[j] *= self._dare_keep(index, j, deltas[j].shape)
                    before, after = self._sums[2 * j], self._sums[2 * j + 1]
                    if self.rescale and before >= 1e-7 and after >= 1e-7:
                        deltas[j] *= before / after
        w = _column(self.weights, deltas)
        weighted = deltas * w
        if m in ("ties", "dare_ties"):
            agree = _majority(weighted)
            merged = (weighted * agree).sum(0)
            divisor = (w * agree).sum(0)
            divisor = torch.where(divisor == 0, 1.0, divisor)
        else:
            merged = weighted.sum(0)
            divisor = w.sum(0).expand_as(merged)
            divisor = torch.where(divisor.abs() < 1e-8, 1.0, divisor)
        return base.float() + self.scale * (merged / divisor if self.normalize else merged)


def run_passes(merge: TensorMerge, read, n_blocks: int, write) -> None:
    """Both passes over ``n_blocks`` blocks: ``read(i)`` gives ``(base block, model blocks)``, ``write(i, merged)``."""
    if merge.passes == 2:
        for i in range(n_blocks):
            merge.observe(i, *read(i))
        merge.settle()
        if merge.method == "sce":
            energy, tied = None, list(merge._tied)
            for i in range(n_blocks):
                block = merge.sce_energy(*read(i))
                energy = block if energy is None else [e + x for e, x in zip(energy, block)]
            merge._tied, merge._cursor = tied, 0  # the merging pass walks the tensor again
            # mergekit falls back to uniform weights below a sum of 1e-6, which fine-tunes of real models stay under
            # (mean squared updates ~1e-8 per matrix at lr 5e-6): its SCE then weighs every model alike.
            merge.chosen = _energy_weights([e / merge.numel for e in energy], 1e-6 if merge.masked_merge else 0.0)
        elif merge.method == "varm":
            merge.chosen = _energy_weights(merge._sums)
    for i in range(n_blocks):
        write(i, merge.combine(i, *read(i)))


def merge_whole(merge: TensorMerge, base: torch.Tensor | None, tensors: Blocks) -> torch.Tensor:
    """``merge`` of whole tensors (one block), in the dtype of the base (or of the first tensor)."""
    merge.numel = tensors[0].numel()
    if not merge.densities:
        merge.densities = [1.0] * len(tensors)
    out = []
    run_passes(merge, lambda i: (base, tensors), 1, lambda i, merged: out.append(merged))
    return out[0].to((base if base is not None else tensors[0]).dtype)
