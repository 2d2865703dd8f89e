"""Text chunks: the unit every teacher and the target read, cut independently of the teachers.

The training documents are cut into chunks of text by *target* tokens: each chunk's target
sequence ``[start] + text tokens + [eos if it ends a document]`` has at most ``block_size`` tokens.
Long documents are cut at target-token boundaries; consecutive short documents are joined with a
blank line (``"\\n\\n"``) while they fit, so little compute is spent on padding. A chunk is plain
text, so every tokenizer reads exactly the same characters, and teachers can be added later
without re-cutting anything (FuseLLM cut by the longest tokenization over all models, so adding a
model meant starting over).

Chunks are numbered in a seeded random order, not in corpus order: ``id`` is stable for a given
corpus, target tokenizer, block size and seed, which the ``fingerprint`` covers. Teachers are run on
the first ``representations.max_chunks`` ids, shards hold consecutive ids and the training loader
shuffles within windows of a few shards (`fusion.data.fused.epoch_order`); with ids in random order,
the chunks used are a uniform sample of the whole corpus and every window mixes all of it, as clm's
uniform shuffle of packed blocks does. In corpus order (version 1) the 2,560 chunks of the embedded
default were ~140 whole documents of ~660 and the last 64 steps saw ~50 of them: CLM on those chunks
ended ~6 % worse in held-out perplexity than on the blocks, at the same steps and batch shape.
The chunk set is cached on disk (a `datasets` Arrow folder with columns
``id, text, ends_document, nbytes, input_ids``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import numpy as np

from fusion.errors import FusionError

CHUNKING_VERSION = 2  # bump when the cutting or numbering below changes: part of every fingerprint
# v2: chunks numbered in a seeded random order (was corpus order) and _MARGIN 2 (was 8); see the docstring
_JOIN = "\n\n"
# Target tokens kept free when cutting: a piece cut mid-document re-tokenizes a little longer at its start (a
# SentencePiece-style dummy-prefix space: +1 token at ~22 % of the zoo target's cuts, +2 at under 1 %; the
# rare longer piece is split again by `_cut`). 8 left chunks at 241.7 tokens on average against clm's 256-token
# blocks: 6 % fewer tokens per step, which cost ~1 % held-out perplexity; 2 leaves them at ~247.
_MARGIN = 2


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


def _cut(texts: list[str], tokenizer, budget: int) -> list[list[tuple[str, int]]]:
    """Each text cut into ``(piece, tokens)`` of at most ``budget`` target tokens, at token boundaries."""
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    step = max(budget - _MARGIN, 1)
    pieces: list[list[str]] = []
    for text, offsets in zip(texts, encoded["offset_mapping"]):
        starts = [a for a, _ in offsets]
        cuts, i = [0], step
        while i < len(starts):
            while i < len(starts) and starts[i] <= cuts[-1]:  # byte tokens of one character share a start
                i += 1
            if i < len(starts):
                cuts.append(starts[i])
            i += step
        pieces.append([text[a:b] for a, b in zip(cuts, [*cuts[1:], len(text)]) if a < b])
    flat = [p for doc in pieces for p in doc]
    sizes = iter(_count(tokenizer, flat))
    out = []
    for doc in pieces:
        cut = []
        for piece in doc:
            size = next(sizes)
            if size > budget and len(piece) > 1:  # re-tokenized at the cut it grew: split it again (rare)
                half = len(piece) // 2
                cut += [p for part in _cut([piece[:half], piece[half:]], tokenizer, budget) for p in part]
            else:
                cut.append((piece, size))
        out.append(cut)
    return out


def make_chunks(texts: list[str], tokenizer, block_size: int) -> list[tuple[str, bool]]:
    """``(text, ends_document)`` chunks of the documents, in order (see the module docstring)."""
    budget = block_size - 2  # start and eos
    if budget < 1:
        raise FusionError(f"data.block_size={block_size} leaves no room for text next to the start and EOS tokens")
    texts = [t for t in texts if t]
    # Group pieces greedily by their token counts, then check every joined group with one batched call.
    groups: list[list[tuple[str, bool]]] = []
    group_size = 0
    for doc in _cut(texts, tokenizer, budget):
        for n, (piece, size) in enumerate(doc):
            ends = n == len(doc) - 1
            if groups and groups[-1][-1][1] and group_size + size + _MARGIN <= budget:  # after a document's end
                groups[-1].append((piece, ends))
                group_size += size + 2
            else:
                groups.append([(piece, ends)])
                group_size = size
    joined = [i for i, g in enumerate(groups) if len(g) > 1]
    sizes = _count(tokenizer, [_JOIN.join(p for p, _ in groups[i]) for i in joined])
    chunks: list[tuple[str, bool]] = []
    too_long = {i for i, size in zip(joined, sizes) if size > budget}
    for i, group in enumerate(groups):
        if i in too_long:  # the join tokenized longer than estimated: keep its parts apart
            chunks += group
        else:
            chunks.append((_JOIN.join(p for p, _ in group), group[-1][1]))
    return chunks


def build_chunk_set(documents: datasets.Dataset, text_field: str, tokenizer, block_size: int, folder: Path,
                    num_proc: int = 1, seed: int = 0) -> datasets.Dataset:
    """Chunk ``documents`` (joining only within batches of 1,000 documents), number the chunks in an order
    shuffled by ``seed`` and save them to ``folder``.

    ``folder`` is new and empty: `fusion.data.prepare.prepare_chunks` builds the set once in a temporary
    folder and renames it into place (`fusion.data.cache.build_once`); ``chunks.json`` is written last.
    """
    def chunk_batch(batch: dict) -> dict:
        chunks = make_chunks(batch[text_field], tokenizer, block_size)
        texts, ends = [c[0] for c in chunks], [c[1] for c in chunks]
        return {"text": texts, "ends_document": ends, "nbytes": [len(t.encode()) for t in texts],
                "input_ids": sequence_ids(tokenizer, texts, ends)}

    features = datasets.Features({"text": datasets.Value("string"), "ends_document": datasets.Value("bool"),
                                  "nbytes": datasets.Value("int64"),
                                  "input_ids": datasets.Sequence(datasets.Value("int32"))})
    chunks = documents.map(chunk_batch, batched=True, batch_size=1000, remove_columns=documents.column_names,
                           features=features, num_proc=num_proc if num_proc > 1 else None, desc="chunking")
    if len(chunks) == 0:
        raise FusionError("data: the training documents are empty; there is nothing to chunk")
    # Random ids, so that any prefix of them (max_chunks) and any run of them (a shard, a loader window) is a
    # uniform sample of the corpus, not a few whole documents (module docstring). flatten_indices rewrites
    # the rows in that order, so that reading by id needs no indices mapping.
    chunks = chunks.shuffle(seed=seed).flatten_indices()
    chunks = chunks.add_column("id", np.arange(len(chunks), dtype=np.int64))
    digest = hashlib.sha256(f"chunking v{CHUNKING_VERSION} block={block_size}\n".encode())
    for text in chunks["text"]:
        digest.update(hashlib.sha256(text.encode()).digest())
    chunks.save_to_disk(str(folder / "chunks"))
    info = {"fingerprint": digest.hexdigest()[:16], "chunks": len(chunks), "block_size": block_size,
            "tokens": int(sum(len(ids) for ids in chunks["input_ids"]))}
    (folder / "chunks.json").write_text(json.dumps(info, indent=2))
    return chunks


def is_chunk_set(folder: Path) -> bool:
    """A finished chunk set: ``chunks.json`` is written last."""
    return (folder / "chunks.json").is_file()


def load_chunk_set(folder: Path) -> tuple[datasets.Dataset, dict]:
    """The chunks saved by `build_chunk_set` and their info (``fingerprint``, ``chunks``, ``tokens``)."""
    info_file = folder / "chunks.json"
    if not is_chunk_set(folder):
        raise FusionError(f"{folder} holds no finished chunk set (chunks.json is missing); delete it and re-run")
    return datasets.load_from_disk(str(folder / "chunks")), json.loads(info_file.read_text())
