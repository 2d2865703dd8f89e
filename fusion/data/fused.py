"""`FusionDataModule`: target tokens with every teacher's aligned, sparse next-token distribution.

Training batches are `fusion.data.rows.RowBatches`' batches of the chunk set's rows, in the order every
method shares, with each chunk's positions given its teachers' aligned predictions; the position before a
chunk that starts a document (an EOS predicting the next BOS) gets the gold one-hot, as a fallback. Besides
the rows' ``input_ids``, ``attention_mask``, ``labels`` and ``chunk_ids``:

    teacher_ids      [B, T, L, k]  teacher t's candidates for the token after position l, in target ids
    teacher_logprobs [B, T, L, k]  their log-probs (-inf for dropped / pooled entries; a one-hot 0 where
                                   the alignment fell back to the gold token)
    teacher_ce       [B, T]        teacher t's mean CE on its own tokens of the row's chunks
    teacher_ce_per_target_token [B, T]  its summed CE over the row's chunks / the row's target predictions
                                   (comparable across tokenizers: a fine tokenizer's own-token CE is lower);
                                   conversations: both are `trained_cross_entropy`, over the assistant's tokens
    teacher_token_ce [B, T, L]     its CE on target token l+1 under its aligned distribution at l, a
                                   probability below 1e-4 (or none: not a candidate) counted as 1e-4;
                                   0 where it fell back (fusion's span and token levels skip those)
    teacher_fallback [B, T, L]     bool: no aligned teacher prediction at l

T is the number of teachers, k their top-k: nothing is ever `[B, L, V]`. Rows holding a chunk on which any
teacher produced NaN/inf are left out.

Memory: shards are memory-mapped and only the rows of a batch's chunks are copied out, so a worker's
private memory is the batches it collates; `loader_memory` estimates it, and the shared page cache,
from a recipe (``--dry-run`` prints it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fusion.config import Recipe
from fusion.data.align_shards import read_alignment
from fusion.data.alignment import aligned_distribution, gold_one_hot, gold_probability
from fusion.data.chunks import usable_rows
from fusion.data.prepare import PreparedTeacher
from fusion.data.rows import WINDOW, RowBatches, RowDataModule
from fusion.data.store import bytes_per_token
from fusion.data.text import TextDataModule

_PREFETCH = 2  # batches each DataLoader worker keeps ready (torch's default prefetch_factor)
_ALIGNMENT_BYTES = 4  # per target token and teacher: the int32 src of `fusion.data.align_shards`


_MISS_PROB = 1e-4  # a gold token the teacher's candidates miss: ~9.2 nats, like a top-k miss in the benchmark


def gold_cross_entropy(ids: np.ndarray, logprobs: np.ndarray, gold: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``-log p(gold)`` per position of an aligned distribution (``ids / logprobs [n, k]``): the teacher's CE
    on the target's next token, in target tokens whatever its tokenizer; at least `_MISS_PROB`, 0 at fallbacks."""
    p = gold_probability(ids, logprobs, gold)
    return np.where(fallback, 0.0, -np.log(np.maximum(p, _MISS_PROB))).astype(np.float32)


def trained_cross_entropy(token_ce: np.ndarray, fallback: np.ndarray, labels: np.ndarray) -> float:
    """A teacher's mean CE on the target's labelled next tokens where it has an aligned prediction (a fallback is the
    gold one-hot, CE 0, and would flatter a teacher that aligns badly); `_MISS_PROB`'s CE where it has none.

    FuseChat's per-sequence MinCE compares the pivot and a source on the assistant's tokens: this is that CE in target
    tokens, which compares teachers with different tokenizers fairly (the original scores each in its own tokens)."""
    scored = (labels[1:] != -100) & ~fallback
    return float(token_ce[scored].mean()) if scored.any() else float(-np.log(_MISS_PROB))


class FusedBatches(RowBatches):
    """`RowBatches` with every teacher's aligned predictions (module docstring)."""

    def __init__(self, chunk_folder: Path, teachers: list[PreparedTeacher], rows: np.ndarray, batch_size: int,
                 seed: int, rank: int, world_size: int, keep_exact_only: bool, pad_id: int) -> None:
        super().__init__(chunk_folder, rows, batch_size, seed, rank, world_size, pad_id,
                         teachers[0].store.chunks_per_shard)
        self.teachers, self.keep_exact_only = teachers, keep_exact_only
        self._cache: dict = {}

    def verify(self) -> None:
        """Check the sha256 of every shard this dataset reads, once per process (`TeacherStore.verify_shard`).

        Called by the loader in the main process before its workers start: the forked workers inherit
        the checks instead of each hashing every shard again. It reads the whole store once per run and
        rank: ~240 GB for the 7B recipe's three teachers, a few minutes at ~1.5 GB/s.
        """
        first, size = self.rows[:, 0], self.rows[:, 1]
        ids = np.repeat(first - np.cumsum(size) + size, size) + np.arange(size.sum())  # every chunk of every row
        shards = np.unique(ids // self.chunks_per_shard).tolist()
        for teacher in self.teachers:
            for shard in shards:
                teacher.store.verify_shard(shard)

    def _shard(self, t: int, shard: int):
        """Teacher t's shard and alignment, memory-mapped; the last `WINDOW` of each teacher stay mapped (an
        epoch visits a window's shards in mixed order, then moves on). Mapped pages are page cache, shared
        by the workers and ranks, not this process's private memory (`loader_memory`)."""
        key = (t, shard)
        if key not in self._cache:
            mine = [k for k in self._cache if k[0] == t]
            if len(mine) >= WINDOW:
                del self._cache[mine[0]]  # dicts keep insertion order: the oldest
            teacher = self.teachers[t]
            self._cache[key] = (teacher.store.read_shard(shard), read_alignment(teacher.alignment, shard))
        return self._cache[key]

    def example(self, first: int) -> dict:
        """One row, from chunk ``first`` on (module docstring): its target ids and, per teacher, the aligned
        distribution and CEs."""
        n_teachers = len(self.teachers)
        parts, labels, per_teacher = [], [], [[] for _ in range(n_teachers)]
        nll, predictions = np.zeros(n_teachers), np.zeros(n_teachers)  # the teachers' summed CE and its positions
        for chunk_id, chunk, skip in self.chunks(first):
            target = np.asarray(chunk["input_ids"], dtype=np.int64)
            shard, i = divmod(chunk_id, self.chunks_per_shard)
            for t, teacher in enumerate(self.teachers):
                data, (src, offsets, read) = self._shard(t, shard)
                row = data.chunk(i)
                chunk_src = src[offsets[i]:offsets[i + 1]]
                inside = {} if read is None else {
                    "read": read[offsets[i]:offsets[i + 1]], "teacher_tokens": row["tokens"],
                    "continuations": teacher.continuations}
                ids, logprobs, fallback = aligned_distribution(
                    chunk_src, row["topk_ids"], row["topk_logprobs"], teacher.vocab_ids, target,
                    keep=teacher.exact if self.keep_exact_only else None, **inside)
                token_ce = gold_cross_entropy(ids, logprobs, target[1:], fallback)
                if parts:  # the previous chunk's last token (an EOS) predicts this one's first: the gold one-hot
                    per_teacher[t].append((*gold_one_hot(target[skip:skip + 1], ids.shape[1]), np.ones(1, dtype=bool),
                                           np.zeros(1, dtype=np.float32)))
                per_teacher[t].append((ids[skip:], logprobs[skip:], fallback[skip:], token_ce[skip:]))
                nll[t] += row["chunk_ce"] * (len(row["tokens"]) - 1)
                predictions[t] += len(row["tokens"]) - 1
            row_ids, row_labels = self.tokens(chunk, skip)
            parts.append(row_ids)
            labels.append(row_labels)
        target, labels = np.concatenate(parts), np.concatenate(labels)
        teachers = [(*(np.concatenate(arrays) for arrays in zip(*pieces)), nll[t] / max(predictions[t], 1),
                     nll[t] / max(len(target) - 1, 1)) for t, pieces in enumerate(per_teacher)]
        if "labels" in chunk:  # a conversation (`fusion.data.chat_chunks`): judge teachers on the trained tokens only
            for t, (ids, logprobs, fallback, token_ce, _, _) in enumerate(teachers):
                ce = trained_cross_entropy(token_ce, fallback, labels)
                teachers[t] = (ids, logprobs, fallback, token_ce, ce, ce)
        return {"input_ids": target, "labels": labels, "teachers": teachers}

    def collate(self, firsts: np.ndarray) -> dict:
        """The rows starting at chunks ``firsts``, collated, with their teachers' predictions."""
        examples = [self.example(int(c)) for c in firsts]
        arrays = self.padded(firsts, examples)
        b, t, length = len(examples), len(self.teachers), arrays["input_ids"].shape[1]
        k = examples[0]["teachers"][0][0].shape[1]
        t_ids = np.zeros((b, t, length, k), dtype=np.int64)
        t_lp = np.full((b, t, length, k), -np.inf, dtype=np.float32)
        t_lp[..., 0] = 0.0  # positions without a prediction: a one-hot (on id 0), masked by the labels
        t_ce = np.zeros((b, t), dtype=np.float32)
        t_ce_target = np.zeros((b, t), dtype=np.float32)
        t_token_ce = np.zeros((b, t, length), dtype=np.float32)
        t_fallback = np.ones((b, t, length), dtype=bool)
        for n, e in enumerate(examples):
            size = len(e["input_ids"])
            for j, (ids, lp, fallback, token_ce, ce, ce_target) in enumerate(e["teachers"]):
                t_ids[n, j, :size - 1], t_lp[n, j, :size - 1] = ids, lp
                t_fallback[n, j, :size - 1], t_token_ce[n, j, :size - 1] = fallback, token_ce
                t_ce[n, j], t_ce_target[n, j] = ce, ce_target
        arrays.update({"teacher_ids": t_ids, "teacher_logprobs": t_lp, "teacher_ce": t_ce,
                       "teacher_ce_per_target_token": t_ce_target, "teacher_token_ce": t_token_ce,
                       "teacher_fallback": t_fallback})
        return {key: torch.from_numpy(value) for key, value in arrays.items()}


@dataclass
class LoaderMemory:
    """One rank's training loader's host memory, estimated by `loader_memory`; sizes in bytes."""

    workers: int  # DataLoader workers (0: the main process reads the shards)
    shards: int  # shards each reading process keeps mapped per teacher
    teachers: int
    shard_bytes: int  # one teacher's shard file and its alignment file
    batch_bytes: int  # one collated batch
    batches: int  # collated batches in flight

    @property
    def mapped(self) -> int:
        """What the reading processes map: workers x shards x teachers x shard bytes (virtual, not resident)."""
        return max(self.workers, 1) * self.shards * self.teachers * self.shard_bytes

    @property
    def page_cache(self) -> int:
        """The distinct mapped pages in use at a time: the same in every worker and every rank of a node."""
        return self.shards * self.teachers * self.shard_bytes

    @property
    def private(self) -> int:
        """The rank's own memory: its collated batches in flight."""
        return self.batches * self.batch_bytes

    def describe(self) -> str:
        readers = f"{self.workers} workers" if self.workers else "1 process"
        batches = f"{self.batches} batch{'es' if self.batches > 1 else ''}"
        return (f"~{_size(self.private)} private host memory per rank ({batches} in flight); shards memory-mapped: "
                f"{readers} x {self.shards} shards x {self.teachers} teachers x {_size(self.shard_bytes)} = "
                f"{_size(self.mapped)}, the same ~{_size(self.page_cache)} of page cache for all workers and ranks")


def loader_memory(recipe: Recipe) -> LoaderMemory:
    """The host memory one rank's training loader holds, from the recipe's settings alone (no file is read).

    Every reading process (each of ``data.num_workers`` DataLoader workers, or the main process
    without workers) keeps the last `WINDOW` shards of each teacher mapped with their alignment
    files. A shard is ``representations.chunks_per_shard`` chunks of at most ``data.block_size``
    tokens, at the store format's bytes per token (`fusion.data.store.bytes_per_token`, 2-byte ids:
    44 at k = 10; 3-byte ids above a 65,536 vocabulary add 27 %) plus 4 bytes of alignment per target
    token; a teacher's token count is taken as the target's (tokenizers differ by ~10-20 %).

    Resident versus page cache: the mapped files are page cache, not private memory. A page is read
    from disk when a batch needs its chunk, is one physical page for every worker and every rank of
    the node that maps it (the ranks read the same window of shards, each its slice of the same global
    batches), and the kernel evicts it under pressure. So ``mapped`` is virtual, ``page_cache``
    (shards x teachers x shard bytes) is what is in use at a time per node, and ``private`` is only
    the collated batches in flight, ``prefetch_factor`` (2) per worker: ``[B, T, L, k]`` int64 ids and
    float32 log-probs, ~1.6 MB per batch at B = 2, T = 3, L = 2048, k = 10. Before shards were mapped,
    each worker held its 4 x T shards loaded with ids widened to int64: ~2.8 GB per worker at the 7B
    recipe. Not counted: the worker processes themselves (Python and torch, forked and mostly shared)
    and the chunk set (Arrow, memory-mapped too).
    """
    d, r, b = recipe.data, recipe.representations, recipe.trainer.batch_size
    teachers, length, k = len(recipe.teachers), d.block_size, r.top_k
    batch = (3 * 8 * b * length  # input_ids, attention_mask, labels: int64 [B, L]
             + (8 + 4) * b * teachers * length * k  # teacher_ids int64, teacher_logprobs float32 [B, T, L, k]
             + (4 + 1) * b * teachers * length  # teacher_token_ce float32, teacher_fallback bool [B, T, L]
             + 2 * 4 * b * teachers + 8 * b)  # teacher_ce, teacher_ce_per_target_token [B, T]; chunk_ids [B]
    return LoaderMemory(workers=d.num_workers, shards=WINDOW, teachers=teachers,
                        shard_bytes=r.chunks_per_shard * length * (bytes_per_token(k) + _ALIGNMENT_BYTES),
                        batch_bytes=batch, batches=_PREFETCH * d.num_workers or 1)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


class FusionDataModule(RowDataModule):
    """Fused training batches (`FusedBatches`) and the target's held-out validation sets (`TextDataModule`)."""

    def __init__(self, chunk_folder: Path, teachers: list[PreparedTeacher], n_chunks: int, bad_chunks: set[int],
                 validation: TextDataModule, batch_size: int, seed: int, keep_exact_only: bool, pad_id: int,
                 num_workers: int = 0) -> None:
        def batches(rank: int, world_size: int) -> FusedBatches:
            return FusedBatches(chunk_folder, teachers, self.rows, batch_size, seed, rank, world_size,
                                keep_exact_only, pad_id)

        super().__init__(chunk_folder, usable_rows(chunk_folder, n_chunks, bad_chunks), validation, batch_size, batches,
                         f"the first {n_chunks} chunks hold too few: raise representations.max_chunks", num_workers)
