"""Preference pairs (and WRPO triples) → batches of ``k`` responses per prompt, for `fusion.modules.dpo`.

A row holds ``prompt`` (a string or messages ending with the user's turn) and a response per column of
``responses``: ``(chosen, rejected)`` for DPO, ``(source_chosen, chosen, rejected)`` for WRPO; each a string or
messages (`fusion.data.chat.normalise_preference`). Each response is rendered after the prompt with the chat template
and labelled on its assistant turn (`fusion.data.chat.ChatEncoder`), so the prompt, as the model reads it at
inference, carries no loss.

Length (TRL's and WRPO's rule): when the prompt and its longest response exceed ``max_length`` tokens, the prompt
keeps its last ``max_prompt_length`` tokens; if that is still too long, the responses are cut at ``max_length``. A
row left with a response of no labelled token is dropped and counted.

A batch is ``{"input_ids", "attention_mask", "labels"}`` ``[k·B, T]`` in blocks of ``B`` (all first responses, then
all second ones, ...), right-padded to the longest, with ``index`` ``[B]`` (the rows' numbers) and, once the reference
stage has scored the rows, ``ref_logps`` ``[k·B]`` in the same order. The held-out set is a chat data module's
(`fusion.data.chat.ChatDataModule`): the perplexity of held-out conversations' assistant turns.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import datasets
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from fusion.config import ChatConfig, DataConfig
from fusion.data.cache import build_once
from fusion.data.chat import IGNORE_INDEX, SKIP_HINT, ChatDataModule, ChatEncoder, MalformedRow, normalise_preference
from fusion.data.representations import FixedBatches
from fusion.data.sampling import ResumableLoader, placement, train_loader
from fusion.data.text import default_cache_dir, load_splits, load_tokenizer, source_fingerprint, tokenizer_fingerprint
from fusion.errors import FusionError

_ENCODING_VERSION = 1
PAIR = ("chosen", "rejected")
TRIPLE = ("source_chosen", "chosen", "rejected")


def fit_lengths(sequences: list[tuple[list[int], list[int]]], max_length: int, max_prompt_length: int
                ) -> tuple[list[tuple[list[int], list[int]]], str]:
    """The responses of one prompt (``(ids, labels)`` each) within ``max_length``, and what it took: ``whole``,
    ``prompt truncated`` (its first tokens left out, down to ``max_prompt_length``) or ``responses cut``."""
    if max(len(ids) for ids, _ in sequences) <= max_length:
        return sequences, "whole"
    prompt = min(next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
                 for _, labels in sequences)
    drop = max(0, prompt - max_prompt_length)
    sequences = [(ids[drop:], labels[drop:]) for ids, labels in sequences]
    if max(len(ids) for ids, _ in sequences) <= max_length:
        return sequences, "prompt truncated"
    return [(ids[:max_length], labels[:max_length]) for ids, labels in sequences], "responses cut"


class PreferenceBatch:
    """Collates rows into a batch of ``k`` blocks (a class, so DataLoader workers can pickle it)."""

    def __init__(self, pad_id: int, responses: tuple[str, ...], reference: np.ndarray | None = None) -> None:
        self.pad_id, self.responses, self.reference = pad_id, responses, reference

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [(row[f"{name}_input_ids"], row[f"{name}_labels"]) for name in self.responses for row in rows]
        length = max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, (ids, row_labels) in enumerate(sequences):
            input_ids[i, :len(ids)] = torch.as_tensor(ids)
            labels[i, :len(ids)] = torch.as_tensor(row_labels)
            attention_mask[i, :len(ids)] = 1
        index = torch.as_tensor([row["index"] for row in rows], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}
        if self.reference is not None:  # [rows, k] -> [k·B], block by block
            batch["ref_logps"] = torch.as_tensor(self.reference[index.numpy()].T.reshape(-1), dtype=torch.float32)
        return batch


class PreferenceDataModule(pl.LightningDataModule):
    """Preference rows for `DPOModule` / `WRPOModule` (see the module docstring).

    ``data``: where the rows are (`data.source`, its `train_split`); ``validation``: the chat data module whose
    held-out conversations the runs are validated on; ``reference``: called when training starts, the file of the
    reference log-probs (``[rows, k]`` float64, `fusion.stages.preference.Reference`) or None.
    """

    def __init__(self, data: DataConfig, chat: ChatConfig, tokenizer_path: str, batch_size: int, seed: int,
                 max_prompt_length: int, responses: tuple[str, ...], validation: ChatDataModule,
                 reference: Callable[[], Path | None] = lambda: None, trust_remote_code: bool = False) -> None:
        super().__init__()
        self.data, self.chat, self.tokenizer_path, self.batch_size, self.seed = data, chat, tokenizer_path, \
            batch_size, seed
        self.max_prompt_length, self.responses, self.validation = max_prompt_length, tuple(responses), validation
        self.reference, self.trust_remote_code = reference, trust_remote_code
        self.train_set: datasets.Dataset | None = None
        self.counts: dict[str, int] = {}
        self.pad_id: int | None = None

    def _encoder(self) -> ChatEncoder:
        # no length limit here: the pair's responses are fitted together (`fit_lengths`)
        return ChatEncoder(load_tokenizer(self.tokenizer_path, self.trust_remote_code), self.chat.template,
                           max_length=sys.maxsize)

    def cache_path(self) -> Path:
        encoder = self._encoder()
        key = {"source": source_fingerprint(self.data), "train_split": self.data.train_split,
               "tokenizer": tokenizer_fingerprint(encoder.tokenizer),
               "template": hashlib.sha256(encoder.template.encode()).hexdigest(), "responses": self.responses,
               "max_length": self.chat.max_length, "max_prompt_length": self.max_prompt_length,
               "skip_malformed": self.chat.skip_malformed, "encoding": _ENCODING_VERSION}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(self.data.cache_dir).expanduser() if self.data.cache_dir else default_cache_dir()
        return root / f"preference-{digest}"

    def prepare_data(self) -> None:
        self.validation.prepare_data()
        build_once(self.cache_path(), lambda folder: (folder / "done").exists(), self._encode_into)

    def _encode_into(self, folder: Path) -> None:
        rows = load_splits(self.data, 'one JSON object per line: {"prompt": ..., "chosen": ..., "rejected": ...}')[
            self.data.train_split]
        if missing := [c for c in ("prompt", *self.responses) if c not in rows.column_names]:
            raise FusionError(f"data.source {self.data.source!r}: preference rows need the columns prompt, "
                              f"{', '.join(self.responses)}; it lacks {', '.join(missing)}")
        encoder, skip = self._encoder(), self.chat.skip_malformed
        out, counts = [], Counter()
        for index, row in enumerate(rows):
            try:
                # the last column is the rejected response; each other one is normalised against it
                pairs = [normalise_preference(row["prompt"], row[name], row[self.responses[-1]], index)
                         for name in self.responses[:-1]]
                completions = [pair.chosen for pair in pairs] + [pairs[0].rejected]
                encoded = [encoder.encode(pairs[0].prompt + completion, index) for completion in completions]
            except MalformedRow as err:
                if not skip:
                    raise FusionError(f"data.source {self.data.source!r}: {err}; {SKIP_HINT}") from None
                counts[f"skipped: {err.reason}"] += 1
                continue
            if any(e is None for e in encoded):  # a response with nothing to train on
                counts["dropped"] += 1
                continue
            sequences, status = fit_lengths([(e.input_ids, e.labels) for e in encoded], self.chat.max_length,
                                            self.max_prompt_length)
            if any(all(label == IGNORE_INDEX for label in labels[1:]) for _, labels in sequences):
                counts["dropped"] += 1
                continue
            counts[status] += 1
            item = {"index": len(out)}
            for name, (ids, labels) in zip(self.responses, sequences):
                item[f"{name}_input_ids"], item[f"{name}_labels"] = ids, labels
            out.append(item)
        if not out:
            raise FusionError(f"data.source {self.data.source!r}: no preference row is left to train on "
                              f"({dict(counts)}); raise chat.max_length or fix the data")
        datasets.Dataset.from_list(out).save_to_disk(str(folder / "train"))
        (folder / "done").write_text(json.dumps({"counts": dict(counts)}))

    def setup(self, stage: str | None = None) -> None:
        self.validation.setup(stage)
        if self.train_set is not None:
            return
        folder = self.cache_path()
        self.counts = json.loads((folder / "done").read_text())["counts"]
        self.train_set = datasets.load_from_disk(str(folder / "train"))
        self.pad_id = self.validation.pad_id
        if rank_zero_only.rank == 0:
            print(f"[fusion] preference data: {summary(self.counts, self.chat.max_length, self.max_prompt_length)}",
                  file=sys.stderr)

    @property
    def validation_names(self) -> list[str]:
        return self.validation.validation_names

    def reference_logps(self) -> np.ndarray | None:
        """The reference log-probs, ``[rows, k]``, if the reference stage has written them."""
        path = self.reference()
        if path is None:
            return None
        logps = np.load(path)
        if logps.shape != (len(self.train_set), len(self.responses)):
            raise FusionError(f"{path}: reference log-probs of shape {logps.shape}, for {len(self.train_set)} rows of "
                              f"{len(self.responses)} responses; delete it and re-run (the reference stage runs again)")
        return logps

    def train_dataloader(self) -> ResumableLoader:
        collate = PreferenceBatch(self.pad_id, self.responses, self.reference_logps())
        return train_loader(self.train_set, self.batch_size, self.seed, self.trainer, self.data.num_workers,
                            "preference rows", collate)

    def predict_dataloader(self) -> DataLoader:
        """Every row once, in order, each rank every world_size-th batch: what the reference stage scores."""
        rank, world_size = placement(self.trainer)
        starts = range(rank * self.batch_size, len(self.train_set), self.batch_size * world_size)
        batches = [list(range(start, min(start + self.batch_size, len(self.train_set)))) for start in starts]
        return DataLoader(self.train_set, batch_sampler=FixedBatches(batches), num_workers=self.data.num_workers,
                          collate_fn=PreferenceBatch(self.pad_id, self.responses))

    def val_dataloader(self):
        self.validation.trainer = self.trainer  # its loaders take this rank's share
        return self.validation.val_dataloader()


def summary(counts: dict[str, int], max_length: int, max_prompt_length: int) -> str:
    skipped = sum(v for k, v in counts.items() if k.startswith("skipped: "))
    return (f"{sum(counts.values())} rows: {counts.get('whole', 0)} whole, "
            f"{counts.get('prompt truncated', 0)} with the prompt cut to its last {max_prompt_length} tokens, "
            f"{counts.get('responses cut', 0)} with responses cut at chat.max_length={max_length}, "
            f"{counts.get('dropped', 0)} dropped (a response with no token left), {skipped} skipped as malformed")
