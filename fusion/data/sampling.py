"""Deterministic, rank-sharded batches whose position in the epoch survives a restart.

Lightning saves the `state_dict()` of a stateful train dataloader in every checkpoint and
restores it on resume, but it cannot know how many batches the *model* has consumed: the
DataLoader and Lightning's own fetcher read ahead. So the count is kept here and advanced by
`ConsumedBatches` after each training batch; a resumed run starts at the first batch that never
reached the model, so no sample is seen twice and none is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fusion.errors import FusionError
from fusion.interrupt import ignore_signals


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices: shuffled per epoch by `seed + epoch`, split evenly across ranks.

    Every rank gets `len(self)` batches of `batch_size` (the last partial global batch is dropped
    when `drop_last`, else the indices wrap around so that all ranks stay in step — FSDP and DDP
    need the same number of forward passes on every rank).
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True) -> None:
        if num_samples < 1:
            raise ValueError("EpochBatchSampler needs at least one sample")
        self.num_samples, self.batch_size, self.shuffle, self.seed = num_samples, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.consumed = 0  # batches of this epoch that reached the model on this rank

    def __len__(self) -> int:
        per_rank = self.num_samples // self.world_size if self.drop_last else -(-self.num_samples // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch; a new epoch starts from its first batch."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def epoch_indices(self) -> list[int]:
        """This rank's sample indices for the current epoch, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank_batches = len(self)
        needed = per_rank_batches * self.batch_size * self.world_size
        order = (order * (needed // len(order) + 1))[:needed]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        indices = self.epoch_indices()
        for start in range(self.consumed * self.batch_size, len(indices), self.batch_size):
            yield indices[start:start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "batches": len(self)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("batches") != len(self):
            raise ValueError(
                f"the checkpoint's data order (seed {state.get('seed')}, {state.get('batches')} batches per epoch) "
                f"differs from this run's (seed {self.seed}, {len(self)} batches); resume with the same recipe"
            )
        self.epoch, self.consumed = state["epoch"], state["consumed"]


class ResumableLoader(DataLoader):
    """A DataLoader over an `EpochBatchSampler` that Lightning checkpoints and restores (its workers leave
    Ctrl-C to the main process: `fusion.interrupt.ignore_signals`)."""

    def __init__(self, dataset: Dataset, batch_sampler: EpochBatchSampler, **kwargs) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, worker_init_fn=ignore_signals, **kwargs)

    def __iter__(self):
        # Lightning calls `set_epoch` on a loader's sampler, never on its batch sampler: without this, every epoch
        # after the first would start with all its batches consumed and yield none.
        sampler = self.batch_sampler
        if sampler.consumed >= len(sampler):  # the previous epoch ran to its end: start the next one
            sampler.set_epoch(sampler.epoch + 1)
        return super().__iter__()

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)

    def batch_consumed(self) -> None:
        self.batch_sampler.consumed += 1


class ConsumedBatches(pl.Callback):
    """Counts each training batch once the model has used it, for `ResumableLoader` state.

    Lightning runs `ModelCheckpoint` after all other callbacks, so the count is up to date
    when a checkpoint is written in the same `on_train_batch_end`.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        loaders = trainer.train_dataloader
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            if hasattr(loader, "batch_consumed"):  # ResumableLoader, fusion.data.rows.RowLoader
                loader.batch_consumed()


def placement(trainer: pl.Trainer | None) -> tuple[int, int]:
    """``(rank, world_size)`` of the process a data module serves: (0, 1) outside a Trainer."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def train_loader(rows: Dataset, batch_size: int, seed: int, trainer: pl.Trainer | None, num_workers: int,
                 unit: str, collate_fn=None) -> ResumableLoader:
    """The resumable, shuffled training loader of a data module; ``unit`` names a row in the error for too few."""
    rank, world_size = placement(trainer)
    if len(rows) < batch_size * world_size:
        raise FusionError(f"data: {len(rows)} training {unit} cannot fill one batch of trainer.batch_size={batch_size} "
                          f"on {world_size} devices; lower either")
    sampler = EpochBatchSampler(len(rows), batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size,
                                drop_last=True)
    return ResumableLoader(rows, sampler, num_workers=num_workers, collate_fn=collate_fn)


def validation_loaders(sets: list[Dataset], batch_size: int, trainer: pl.Trainer | None, num_workers: int,
                       collate_fn=None) -> list[DataLoader]:
    """One loader per validation set, in order, each rank a padded share (ranks stay in step)."""
    rank, world_size = placement(trainer)
    return [DataLoader(rows, num_workers=num_workers, collate_fn=collate_fn, batch_sampler=EpochBatchSampler(
        len(rows), batch_size, shuffle=False, rank=rank, world_size=world_size, drop_last=False)) for rows in sets]
