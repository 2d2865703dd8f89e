"""Training rows in one order for every method: the chunk set's rows (`fusion.data.chunks`), batched.

A row is its chunks' target sequences one after another, each without its start token where the chunk does
not start a document: clm.yaml's packed layout. `RowBatches` yields them as collated batches

    input_ids        [B, L]        target tokens (padded with the pad id)
    attention_mask   [B, L]
    labels           [B, L]        input_ids, -100 on padding (conversations: their labels, -100 but on the
                                   assistant's tokens; `fusion.data.chat_chunks`)
    chunk_ids        [B]           the first chunk id of each row

and `fusion.data.fused.FusedBatches` adds each teacher's aligned predictions to the same batches.

**Order.** The chunk set numbers its rows in a seeded random order, so the first epoch reads them in id order:
that is already a uniform shuffle, and it is the same for every method and every number of rows used. A
fusion run reads the first ``representations.max_chunks`` ids; `clm` reads all of them; on the same seed both
train on the same rows in the same batches, step for step, until the fusion run's rows are used up. Measured
with `fusion.experiments.fusellm_table` (600 steps, seeds 0-2, both at 6e-3): FuseLLM against CLM on its own
uniformly shuffled packed blocks, paired by seed, −6.2 ± 5.4 %; against CLM on the same rows in the same order,
−5.8 ± 1.5 %. Each seed's draw of data decides much of a run's result (a seed that is lucky for CLM is lucky at
every learning rate), so a comparison on different draws measures the draws. Later epochs are shuffled
again: shards in random order, rows shuffled within windows of `WINDOW` consecutive shards, so a reading
process reads each shard once. Epochs are cut into global batches of ``batch_size * world_size``; rank r takes
its slice of every global batch, and DataLoader worker w the batches ``b`` with ``(b - start) % workers == w``
(PyTorch returns worker results round-robin, so the stream is in batch order). `RowLoader` saves the position
(epoch, batches consumed) in checkpoints: a resumed run continues at the next batch, no row seen twice, none
skipped.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fusion.data.chunks import load_chunk_set, usable_rows
from fusion.data.sampling import placement
from fusion.data.text import TextDataModule
from fusion.errors import FusionError
from fusion.interrupt import ignore_signals

WINDOW = 4  # shards whose rows are shuffled together after the first epoch


def epoch_order(chunk_ids: np.ndarray, chunks_per_shard: int, seed: int, epoch: int) -> np.ndarray:
    """The chunk ids (of the rows' first chunks, ascending) in the order of one epoch: as numbered in the first
    (module docstring), then shards shuffled and ids shuffled within windows of `WINDOW` shards."""
    if epoch == 0:
        return chunk_ids
    rng = np.random.default_rng([seed, epoch])
    shards = np.unique(chunk_ids // chunks_per_shard)
    rng.shuffle(shards)
    order = []
    for start in range(0, len(shards), WINDOW):
        window = chunk_ids[np.isin(chunk_ids // chunks_per_shard, shards[start:start + WINDOW])]
        order.append(rng.permutation(window))
    return np.concatenate(order) if order else chunk_ids[:0]


def rank_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's batches: its slice of each full global batch (a last partial global batch is dropped)."""
    global_size = batch_size * world_size
    n = len(order) // global_size
    return [order[b * global_size + rank * batch_size:b * global_size + (rank + 1) * batch_size] for b in range(n)]


class RowBatches(IterableDataset):
    """Yields collated batches of rows (module docstring) for one rank, from batch ``start`` of ``epoch``."""

    def __init__(self, chunk_folder: Path, rows: np.ndarray, batch_size: int, seed: int, rank: int, world_size: int,
                 pad_id: int, chunks_per_shard: int) -> None:
        """``rows``: ``[R, 2]`` first chunk id and number of chunks of each row to train on (`usable_rows`)."""
        self.chunk_folder, self.rows = chunk_folder, rows
        self.row_size = dict(zip(rows[:, 0].tolist(), rows[:, 1].tolist()))
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.pad_id, self.chunks_per_shard = pad_id, chunks_per_shard
        self.epoch, self.start = 0, 0
        self._chunks = None

    def batches(self) -> list[np.ndarray]:
        order = epoch_order(self.rows[:, 0], self.chunks_per_shard, self.seed, self.epoch)
        return rank_batches(order, self.batch_size, self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self.rows) // (self.batch_size * self.world_size)

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        batches = self.batches()
        for b in range(self.start + worker, len(batches), workers):
            yield self.collate(batches[b])

    def verify(self) -> None:
        """Checks before the loader's workers fork (`fusion.data.fused.FusedBatches` hashes its shards)."""

    def chunks(self, first: int):
        """``(chunk id, chunk, skip)`` of the row from chunk ``first`` on; ``skip`` is 1 where the chunk's start
        token is left out (it goes on mid-document, as in a packed block)."""
        if self._chunks is None:
            self._chunks, _ = load_chunk_set(self.chunk_folder)
        for chunk_id in range(first, first + self.row_size[first]):
            chunk = self._chunks[chunk_id]
            yield chunk_id, chunk, 0 if chunk["starts_document"] else 1

    @staticmethod
    def tokens(chunk: dict, skip: int) -> tuple[np.ndarray, np.ndarray]:
        """A chunk's target ids and labels as the row holds them."""
        target = np.asarray(chunk["input_ids"], dtype=np.int64)[skip:]
        return target, np.asarray(chunk["labels"], dtype=np.int64)[skip:] if "labels" in chunk else target

    def example(self, first: int) -> dict:
        """One row: its target ids and labels."""
        parts = [self.tokens(chunk, skip) for _, chunk, skip in self.chunks(first)]
        return {"input_ids": np.concatenate([p[0] for p in parts]), "labels": np.concatenate([p[1] for p in parts])}

    def collate(self, firsts: np.ndarray) -> dict:
        """The rows starting at chunks ``firsts``, collated."""
        return {key: torch.from_numpy(value) for key, value in self.padded(firsts, [self.example(int(c))
                                                                                   for c in firsts]).items()}

    def padded(self, firsts: np.ndarray, examples: list[dict]) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask``, ``labels`` and ``chunk_ids`` of ``examples``, padded to the longest."""
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = np.full((len(examples), length), self.pad_id, dtype=np.int64)
        labels = np.full((len(examples), length), -100, dtype=np.int64)
        mask = np.zeros((len(examples), length), dtype=np.int64)
        for n, e in enumerate(examples):
            size = len(e["input_ids"])
            input_ids[n, :size], labels[n, :size], mask[n, :size] = e["input_ids"], e["labels"], 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "chunk_ids": np.asarray(firsts, dtype=np.int64)}


class RowLoader(DataLoader):
    """A DataLoader over `RowBatches` whose position Lightning checkpoints (see `ConsumedBatches`)."""

    def __init__(self, dataset: RowBatches, num_workers: int = 0) -> None:
        super().__init__(dataset, batch_size=None, num_workers=num_workers, worker_init_fn=ignore_signals)
        self.consumed = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        if self.consumed >= len(self):  # the previous epoch ran to its end: start the next one
            self.dataset.epoch, self.consumed = self.dataset.epoch + 1, 0
        self.dataset.start = self.consumed  # read by the workers, created by this call
        self.dataset.verify()  # here, before the workers fork, so that none of them checks again
        return super().__iter__()

    def batch_consumed(self) -> None:
        self.consumed += 1

    def state_dict(self) -> dict:
        return {"epoch": self.dataset.epoch, "consumed": self.consumed, "seed": self.dataset.seed,
                "batches": len(self)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.dataset.seed or state.get("batches") != len(self):
            raise FusionError(f"the checkpoint's data order (seed {state.get('seed')}, {state.get('batches')} batches "
                              f"per epoch) differs from this run's (seed {self.dataset.seed}, {len(self)}); resume "
                              "with the same recipe")
        self.dataset.epoch, self.consumed = state["epoch"], state["consumed"]


class RowDataModule(pl.LightningDataModule):
    """Training batches of rows (`RowBatches`, built by ``make_batches(rank, world_size)``) and the target's
    held-out validation sets (`TextDataModule`)."""

    def __init__(self, chunk_folder: Path, rows: np.ndarray, validation: TextDataModule, batch_size: int,
                 make_batches, too_few: str, num_workers: int = 0) -> None:
        """``rows``: of the chunk set in ``chunk_folder``; ``too_few``: what to change when they cannot fill one
        batch (the end of the error message)."""
        super().__init__()
        self.chunk_folder, self.rows, self.validation = chunk_folder, rows, validation
        self.batch_size, self.make_batches = batch_size, make_batches
        self.too_few, self.num_workers = too_few, num_workers
        self._train: RowLoader | None = None

    def prepare_data(self) -> None:
        self.validation.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.validation.setup(stage)

    @property
    def validation_names(self) -> list[str]:
        return self.validation.validation_names

    def train_dataloader(self) -> RowLoader:
        rank, world_size = placement(self.trainer)
        if len(self.rows) < self.batch_size * world_size:
            raise FusionError(f"{len(self.rows)} usable training rows cannot fill one batch of "
                              f"trainer.batch_size={self.batch_size} on {world_size} devices; {self.too_few}")
        if self._train is None:  # one loader per run, so its position survives Lightning's reloads
            self._train = RowLoader(self.make_batches(rank, world_size), num_workers=self.num_workers)
        return self._train

    def val_dataloader(self):
        self.validation.trainer = self.trainer
        return self.validation.val_dataloader()


def all_rows(chunk_folder: Path) -> np.ndarray:
    """Every row of a chunk set (`usable_rows` of all its chunks)."""
    return usable_rows(chunk_folder, load_chunk_set(chunk_folder)[1]["chunks"])
