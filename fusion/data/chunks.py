"""Training rows and their chunks: what the target trains on and every teacher reads, cut independently of the teachers.

The training documents become **rows**, what every method trains on (clm too), laid out exactly as the held-out text
is packed into blocks (`fusion.data.text.pack`): documents one after another, each ``[start] + tokens + [eos]``, at
most ``block_size`` target tokens per row, a document that does not fit going on at the start of the next row
without a start token (as in a packed block, whose first token is mid-document). A row is made of **chunks**, one
per piece of a document in it, and a chunk is what the teachers and the alignment see: plain text, so every
tokenizer reads exactly the same characters and teachers can be added later without re-cutting anything (FuseLLM cut
by the longest tokenization over all models, so adding a model meant starting over). Every model reads a chunk as
one sequence ``[start] + text tokens + [eos if it ends a document]`` (the stored ``input_ids`` are the target's),
teachers always with their start token: a model reading mid-document text without one predicts worse. Training
concatenates a row's chunks in the target's layout, dropping the start token of a chunk that does not start a
document (`fusion.data.rows`).

Why rows and not one chunk per sequence (chunking v2, measured with `fusion.experiments.fusellm_table`, 3 seeds):
CLM on v2's chunks ended +2.0 ± 0.4 % in held-out perplexity against clm.yaml at the same steps. Two causes, both
measured: (1) every chunk began with a start token, also mid-document, so the target learned to lean on one at
position 0, which the packed validation blocks rarely have (scoring the v2 model's validation blocks with a start
token prepended took its code gap from 3.1 % to 1.2 %, a one-off diagnostic at seed 0); (2) a chunk held only one
piece of a document (short ones joined by a blank line instead of EOS and BOS), 247 target tokens on average against
256: 3.5 % fewer tokens per step (clm.yaml with trainer.max_steps=290, 3.3 % fewer, ends +0.9 % on seeds 0-2). On
rows: +0.0 ± 1.3 % over seeds 0-5, equal within noise.

Rows are numbered in a seeded random order and chunk ids are consecutive within a row, in row order: ids are stable
for a given corpus, target tokenizer, block size and seed, which the ``fingerprint`` covers. Teachers are run on the
first ``representations.max_chunks`` ids (a row cut off there is not used) and shards hold consecutive ids. With
rows in random order, the rows used are a uniform sample of the whole corpus, the first epoch reads them in id order
(a uniform shuffle, the same for every method: `fusion.data.rows`) and every window of shards that later epochs
shuffle within mixes all of it (in corpus order, chunking v1, the 2,560 chunks of the embedded default were ~140
whole documents and CLM on them ended ~6 % worse). The chunk set is cached on disk (a `datasets` Arrow folder with
columns ``id, row, text, starts_document, ends_document, nbytes, input_ids``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path

import datasets
import numpy as np

from fusion.errors import FusionError

CHUNKING_VERSION = 3  # bump when the cutting or numbering below changes: part of every fingerprint
# v2: chunks numbered in a seeded random order (was corpus order); v3: rows packed like clm's blocks (docstring)
_MIN_PIECE = 8  # a document starts in a row only where this many of its tokens fit; else the row ends there


def start_token_id(tokenizer) -> int:
    """The token every sequence starts with: BOS, or EOS for tokenizers without one (GPT-2 style)."""
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise FusionError(f"tokenizer {tokenizer.name_or_path!r} has neither a BOS nor an EOS token to start "
                          "sequences with; set one (tokenizer.bos_token = ...) and save it")
    return int(token_id)


def sequence_ids(tokenizer, texts: list[str], ends_document: list[bool]) -> list[list[int]]:
    """``[start] + tokens(text) + [eos if ends_document]`` for each text: the layout alignment assumes."""
    start, eos = start_token_id(tokenizer), tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[start, *ids, eos] if end else [start, *ids] for ids, end in zip(encoded, ends_document)]


def _count(tokenizer, texts: list[str]) -> list[int]:
    """Text tokens of each text (one batched call: far faster than one call per text)."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


Piece = tuple[str, bool, bool]  # (text, starts_document, ends_document)


def _pack(texts: list[str], tokenizer, block_size: int) -> list[list[Piece]]:
    """Rows of pieces, each piece counted as it re-tokenizes on its own (module docstring)."""
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    rows: list[list[Piece]] = [[]]
    used = 0
    for text, offsets in zip(texts, encoded["offset_mapping"]):
        starts = [a for a, _ in offsets]
        pos, char = 0, 0  # the document's next token and character to place
        while pos < len(starts):
            first = pos == 0
            room = block_size - used - int(first)  # for the piece's text tokens and its EOS if it ends the document
            if room <= _MIN_PIECE:  # only for a document starting mid-row: begin it in the next one
                rows.append([])
                used = 0
                continue
            left = len(starts) - pos
            take = left if left + 1 <= room else min(room, left - 1)  # by the document's own tokenization
            while True:
                end = pos + take
                while end < len(starts) and starts[end] <= char:  # byte tokens of one character share a start
                    end += 1
                ends = end >= len(starts)
                cut = len(text) if ends else starts[end]
                size = _count(tokenizer, [text[char:cut]])[0] + int(ends)  # a piece cut mid-document may grow
                if size <= room or end - pos <= 1:
                    break
                take = end - pos - max(size - room, 1)
            rows[-1].append((text[char:cut], first, ends))
            used += int(first) + size
            if not ends:  # the row is full: the document goes on at the start of the next one
                rows.append([])
                used = 0
            char, pos = cut, bisect.bisect_left(starts, cut)
    return [row for row in rows if row]


def make_rows(texts: list[str], tokenizer, block_size: int) -> list[list[Piece]]:
    """The documents as rows of ``(text, starts_document, ends_document)`` pieces, in order (module docstring)."""
    if block_size <= _MIN_PIECE + 2:
        raise FusionError(f"data.block_size={block_size} is too small to train on; use at least {_MIN_PIECE + 3} "
                          "target tokens")
    return _pack([t for t in texts if t], tokenizer, block_size)


def row_ids(tokenizer, row: list[Piece]) -> list[int]:
    """A row's target tokens as training reads them: its pieces' sequences, each without its start token where
    it does not start a document (`fusion.data.fused` builds the same from the stored chunks)."""
    seqs = sequence_ids(tokenizer, [p[0] for p in row], [p[2] for p in row])
    return [t for p, s in zip(row, seqs) for t in (s if p[1] else s[1:])]


def build_chunk_set(documents: datasets.Dataset, text_field: str, tokenizer, block_size: int, folder: Path,
                    num_proc: int = 1, seed: int = 0) -> datasets.Dataset:
    """Pack ``documents`` into rows (within batches of 1,000 documents), number the rows in an order shuffled by
    ``seed``, the chunks consecutively within them, and save the chunks to ``folder``.

    ``folder`` is new and empty: `fusion.data.prepare.prepare_chunks` builds the set once in a temporary
    folder and renames it into place (`fusion.data.cache.build_once`); ``chunks.json`` is written last.
    """
    def chunk_batch(batch: dict) -> dict:
        rows = make_rows(batch[text_field], tokenizer, block_size)
        pieces = [p for row in rows for p in row]
        texts, ends = [p[0] for p in pieces], [p[2] for p in pieces]
        return {"text": texts, "starts_document": [p[1] for p in pieces], "ends_document": ends,
                "row_start": [n == 0 for row in rows for n in range(len(row))],
                "nbytes": [len(t.encode()) for t in texts], "input_ids": sequence_ids(tokenizer, texts, ends)}

    features = datasets.Features({"text": datasets.Value("string"), "starts_document": datasets.Value("bool"),
                                  "ends_document": datasets.Value("bool"), "row_start": datasets.Value("bool"),
                                  "nbytes": datasets.Value("int64"),
                                  "input_ids": datasets.Sequence(datasets.Value("int32"))})
    chunks = documents.map(chunk_batch, batched=True, batch_size=1000, remove_columns=documents.column_names,
                           features=features, num_proc=num_proc if num_proc > 1 else None, desc="chunking")
    if len(chunks) == 0:
        raise FusionError("data: the training documents are empty; there is nothing to chunk")
    # Rows in random order, so that any prefix of the ids (max_chunks) and any run of them (a shard, a loader
    # window) is a uniform sample of the corpus, not a few whole documents (module docstring). flatten_indices
    # rewrites the chunks in that order, so that reading by id needs no indices mapping.
    row = np.cumsum(chunks.data.column("row_start").to_numpy(zero_copy_only=False)) - 1
    number = np.random.default_rng(seed).permutation(int(row[-1]) + 1)[row]
    chunks = chunks.select(np.lexsort((np.arange(len(row)), number))).flatten_indices().remove_columns("row_start")
    chunks = chunks.add_column("row", np.sort(number)).add_column("id", np.arange(len(chunks), dtype=np.int64))
    digest = hashlib.sha256(f"chunking v{CHUNKING_VERSION} block={block_size}\n".encode())
    for text, r, starts in zip(chunks["text"], chunks["row"], chunks["starts_document"]):
        digest.update(hashlib.sha256(f"{r} {starts}\n{text}".encode()).digest())
    chunks.save_to_disk(str(folder / "chunks"))
    info = {"fingerprint": digest.hexdigest()[:16], "chunks": len(chunks), "rows": int(number.max()) + 1,
            "block_size": block_size, "tokens": int(sum(len(ids) for ids in chunks["input_ids"]))}
    (folder / "chunks.json").write_text(json.dumps(info, indent=2))
    return chunks


def usable_rows(folder_or_chunks, n_chunks: int, bad_chunks: set[int] = frozenset()) -> np.ndarray:
    """``[R, 2]`` (first chunk id, chunks) of the rows wholly within the first ``n_chunks`` ids and free of
    ``bad_chunks`` (chunks on which a teacher gave NaN/inf), in id order."""
    chunks = folder_or_chunks if isinstance(folder_or_chunks, datasets.Dataset) else load_chunk_set(folder_or_chunks)[0]
    row = chunks.data.column("row").to_numpy()
    first = np.flatnonzero(np.diff(row, prepend=-1))
    size = np.diff(first, append=len(row))
    keep = first + size <= n_chunks
    bad = np.array(sorted(bad_chunks), dtype=np.int64)
    if len(bad):
        keep &= np.searchsorted(bad, first + size) == np.searchsorted(bad, first)  # no bad id within the row
    return np.stack([first[keep], size[keep]], axis=1).astype(np.int64)


def is_chunk_set(folder: Path) -> bool:
    """A finished chunk set: ``chunks.json`` is written last."""
    return (folder / "chunks.json").is_file()


def load_chunk_set(folder: Path) -> tuple[datasets.Dataset, dict]:
    """The chunks saved by `build_chunk_set` and their info (``fingerprint``, ``chunks``, ``rows``, ``tokens``)."""
    info_file = folder / "chunks.json"
    if not is_chunk_set(folder):
        raise FusionError(f"{folder} holds no finished chunk set (chunks.json is missing); delete it and re-run")
    return datasets.load_from_disk(str(folder / "chunks")), json.loads(info_file.read_text())
