"""Conversations as a chunk set: what chat fusion's teachers read and its target trains on (FuseChat's data).

A chat chunk set has the columns of a text chunk set (`fusion.data.chunks`), so teacher representations
(`fusion.data.representations`), their store and the alignment (`fusion.data.align_shards`) work on it unchanged,
plus ``labels``: one chunk per conversation, each its own row, its text the conversation as the pivot's template
renders it (`fusion.data.chat.ChatEncoder`: every model reads the same characters, which the alignment needs;
FuseChat's original fed each source the pivot's rendering with the source's own EOS as the separator, so here a
source reads the pivot's end-of-turn marker as plain text), and its target ids and labels those of
`fusion.data.chat.ChatDataModule`'s training split.

Every model reads a chunk as ``[start] + its tokens of the text`` (`fusion.data.chunks.sequence_ids`): a teacher
needs a start position to predict the first token. A template that writes the start token itself (Llama-3's and
OpenChat's ``{{ bos_token }}``) keeps its ids as they are, the token's text taken off the chunk's; one that does not
(ChatML) gets the start token in front, unlabelled, which its inference ids lack (the one difference from SFT).
No EOS is added: the last assistant turn ends with the template's own end-of-turn marker.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import numpy as np

from fusion.data.cache import build_once
from fusion.data.chat import IGNORE_INDEX
from fusion.data.chunks import is_chunk_set, load_chunk_set, start_token_id
from fusion.errors import FusionError

CHAT_CHUNKING_VERSION = 1  # bump when the layout below changes: part of every fingerprint


def chat_chunk(ids: list[int], labels: list[int], text: str, start: int, start_text: str) -> dict:
    """One conversation's chunk columns (module docstring): ``[start] + ids`` unless the template wrote the start."""
    if ids and ids[0] == start and text.startswith(start_text):
        text = text[len(start_text):]
    else:
        ids, labels = [start, *ids], [IGNORE_INDEX, *labels]
    return {"text": text, "starts_document": True, "ends_document": False, "nbytes": len(text.encode()),
            "input_ids": ids, "labels": labels}


def build_chat_chunk_set(train: datasets.Dataset, tokenizer, folder: Path, seed: int) -> datasets.Dataset:
    """The encoded training conversations (``input_ids``, ``labels``, ``text``) as chunks numbered in a seeded random
    order, saved to the new, empty ``folder`` (``chunks.json`` last)."""
    start = start_token_id(tokenizer)
    start_text = tokenizer.convert_ids_to_tokens(start)
    if len(train) == 0:
        raise FusionError("data: no training conversation is left to fuse on; check data.source and chat.max_length")

    def to_chunks(batch: dict) -> dict:
        rows = [chat_chunk(i, lab, t, start, start_text) for i, lab, t in
                zip(batch["input_ids"], batch["labels"], batch["text"])]
        return {key: [row[key] for row in rows] for key in rows[0]}

    features = datasets.Features({"text": datasets.Value("string"), "starts_document": datasets.Value("bool"),
                                  "ends_document": datasets.Value("bool"), "nbytes": datasets.Value("int64"),
                                  "input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32"))})
    # Shuffled, so that any prefix of the ids (representations.max_chunks) is a uniform sample of the conversations.
    order = np.random.default_rng(seed).permutation(len(train))
    chunks = train.select(order).flatten_indices().map(to_chunks, batched=True, remove_columns=train.column_names,
                                                       features=features, desc="chat chunks")
    ids = np.arange(len(chunks), dtype=np.int64)
    chunks = chunks.add_column("row", ids).add_column("id", ids)
    digest = hashlib.sha256(f"chat chunking v{CHAT_CHUNKING_VERSION}\n".encode())
    for text, labels in zip(chunks["text"], chunks["labels"]):
        digest.update(hashlib.sha256(f"{text}\n{labels}".encode()).digest())
    chunks.save_to_disk(str(folder / "chunks"))
    lengths = [len(ids) for ids in chunks["input_ids"]]
    info = {"fingerprint": digest.hexdigest()[:16], "chunks": len(chunks), "rows": len(chunks),
            "block_size": max(lengths), "tokens": int(sum(lengths))}
    (folder / "chunks.json").write_text(json.dumps(info, indent=2))
    return chunks


def prepare_chat_chunks(root: Path, data_module, seed: int) -> tuple[Path, datasets.Dataset, dict]:
    """The chat chunk set of a set-up `ChatDataModule` (its training split), under ``root``, built on first use by
    one process (the others wait): ``(folder, chunks, info)``."""
    encoded = data_module.cache_path()  # keyed by the data, the tokenizer, the template and the chat settings
    key = hashlib.sha256(json.dumps([encoded.name, seed, CHAT_CHUNKING_VERSION]).encode()).hexdigest()[:12]
    tokenizer = data_module.tokenizer()
    folder = build_once(root / f"chat-chunks-{key}", is_chunk_set,
                        lambda tmp: build_chat_chunk_set(data_module.train_set, tokenizer, tmp, seed))
    chunks, info = load_chunk_set(folder)
    return folder, chunks, info
