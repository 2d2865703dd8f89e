"""What fusion training reads, prepared from a recipe: chunks → teacher representations → alignments.

Every product is content-keyed under ``representations.dir`` (default ``$FUSION_CACHE/representations``
or ``~/.cache/fusion/representations``) and shared by all runs::

    chunks-<key>/                   the chunk set (`fusion.data.chunks`), key = corpus + target tokenizer + block
      <teacher>-<key>/              one teacher's shards (`fusion.data.store`), key = weights, tokenizer, k, ...
        align-<mode>-<key>/         its alignment to the target (`fusion.data.align_shards`)
    vocab-maps/                     teacher -> target vocabulary maps (`fusion.data.vocab`)

so the runs of a comparison (CLM, KD per teacher, MinCE, AvgCE, ...) extract each teacher once.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fusion.config import Recipe, TeacherConfig
from fusion.data.align_shards import align_teacher, alignment_folder
from fusion.data.alignment import TokenTable
from fusion.data.cache import build_once
from fusion.data.chunks import CHUNKING_VERSION, build_chunk_set, is_chunk_set, load_chunk_set
from fusion.data.representations import (
    ShardWriter,
    default_store_dir,
    extract,
    resolve_dtype,
    teacher_identity,
    teacher_store,
)
from fusion.data.store import TeacherStore
from fusion.data.text import document_splits, load_tokenizer, source_fingerprint, tokenizer_fingerprint
from fusion.data.vocab import build_vocab_map
from fusion.errors import FusionError
from fusion.zoo import resolve_model


def uses_gpu(recipe: Recipe) -> bool:
    a = recipe.trainer.accelerator
    return a in ("gpu", "cuda") or (a == "auto" and torch.cuda.is_available())


def store_root(recipe: Recipe) -> Path:
    return Path(recipe.representations.dir).expanduser() if recipe.representations.dir else default_store_dir()


def corpus_key(recipe: Recipe) -> str:
    """What the training documents depend on: the source's content (`source_fingerprint`) and how it is split."""
    d = recipe.data
    key = {"source": source_fingerprint(d), "subset": d.subset,
           "domains": d.domains if d.source == "embedded" else None,
           "python": list(sys.version_info[:2]) if d.source == "embedded" else None, "text_field": d.text_field,
           "train_split": d.train_split, "validation_split": d.validation_split,
           "validation_fraction": d.validation_fraction, "seed": recipe.seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def chunk_folder(recipe: Recipe, target_tokenizer) -> Path:
    key = json.dumps([corpus_key(recipe), tokenizer_fingerprint(target_tokenizer), recipe.data.block_size,
                      CHUNKING_VERSION])
    return store_root(recipe) / f"chunks-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def prepare_chunks(recipe: Recipe, target_tokenizer) -> tuple[Path, object, dict]:
    """The recipe's chunk set, built on first use by one process (the others wait): ``(folder, chunks, info)``."""
    def build(tmp: Path) -> None:
        train, _ = document_splits(recipe.data, recipe.seed)
        # Shuffled documents decide which ones share a row. Which rows max_chunks takes is decided by
        # build_chunk_set's shuffle of the rows themselves: a document shuffle alone made the first max_chunks a
        # few whole documents, not a sample of the text (`fusion.data.chunks`).
        train = train.shuffle(seed=recipe.seed)
        build_chunk_set(train, recipe.data.text_field, target_tokenizer, recipe.data.block_size, tmp,
                        recipe.data.preprocessing_workers, seed=recipe.seed)

    folder = build_once(chunk_folder(recipe, target_tokenizer), is_chunk_set, build)
    chunks, info = load_chunk_set(folder)
    return folder, chunks, info


def used_chunks(recipe: Recipe, info: dict) -> int:
    """How many chunks (from the first) the run uses: all, or ``representations.max_chunks``."""
    limit = recipe.representations.max_chunks
    return info["chunks"] if limit is None else min(limit, info["chunks"])


@dataclass
class PreparedTeacher:
    """A teacher ready for training: its store, its alignment to the target, and its vocabulary map."""

    label: str
    store: TeacherStore
    alignment: Path
    vocab_ids: np.ndarray  # teacher id -> the target id its candidates go to (`first` in prefix mode)
    exact: np.ndarray  # per teacher id: an exact vocabulary match (the `exact` mode keeps only these)
    shards: list[int]
    continuations: tuple[np.ndarray, np.ndarray, np.ndarray]  # `VocabMap.cont_*`: prefix mode, inside tokens


def _teacher_paths(recipe: Recipe, teacher: TeacherConfig) -> tuple[str, str]:
    z = recipe.zoo
    return resolve_model(teacher.path, z.size, z.dir), resolve_model(teacher.tokenizer or teacher.path, z.size, z.dir)


def open_teacher_store(recipe: Recipe, teacher: TeacherConfig, info: dict, gpu: bool) -> TeacherStore:
    model_path, tokenizer_path = _teacher_paths(recipe, teacher)
    tokenizer = load_tokenizer(tokenizer_path, teacher.trust_remote_code)
    identity = teacher_identity(teacher, model_path, tokenizer, recipe.representations.top_k,
                                resolve_dtype(teacher.dtype, gpu), info, corpus_key(recipe), teacher.trust_remote_code)
    return teacher_store(teacher, identity, store_root(recipe), info["chunks"], recipe.representations.chunks_per_shard)


def teacher_stores(recipe: Recipe, info: dict) -> list[TeacherStore]:
    """Every teacher's store, after checking what would fail only midway: ``representations.top_k`` against
    each teacher's vocabulary."""
    gpu = uses_gpu(recipe)
    stores = [open_teacher_store(recipe, teacher, info, gpu) for teacher in recipe.teachers]
    for i, (teacher, store) in enumerate(zip(recipe.teachers, stores)):
        if recipe.representations.top_k > store.identity["vocab_rows"]:
            raise FusionError(f"recipe key 'representations.top_k': {recipe.representations.top_k} is more than the "
                              f"{store.identity['vocab_rows']} tokens of teacher {teacher.label!r} (teachers[{i}]); "
                              "lower it (FuseLLM uses 10)")
    return stores


def store_problems(recipe: Recipe, info: dict) -> list[str]:
    """What a re-run must repair in the teachers' stores: a manifest or a used shard missing, a shard failing
    its sha256 (`TeacherStore.unusable_shards`). A manifest that cannot be read is a `FusionError`."""
    limit, problems = used_chunks(recipe, info), []
    how = {"missing": "is missing", "corrupt": "fails its sha256 check"}
    for teacher, store in zip(recipe.teachers, teacher_stores(recipe, info)):
        if not (store.folder / "manifest.json").is_file():
            problems.append(f"teacher {teacher.label}: {store.folder / 'manifest.json'} is missing")
            continue
        store.manifest()
        bad = store.unusable_shards(list(range(-(-limit // store.chunks_per_shard))))
        problems += [f"teacher {teacher.label}: shard {shard} {how[why]}" for shard, why in bad.items()]
    return problems


def extract_teachers(recipe: Recipe, chunks, info: dict, build_trainer) -> dict:
    """Compute every teacher's missing shards; ``build_trainer(callbacks)`` makes the predict Trainer.

    Returns ``{label: {"folder", "shards", "bad_chunks"}}`` for the stage record.
    """
    result = {}
    limit = used_chunks(recipe, info)
    stores = teacher_stores(recipe, info)  # every teacher checked before any is run
    for teacher, store in zip(recipe.teachers, stores):
        shards = list(range(-(-limit // store.chunks_per_shard)))
        trainer = build_trainer([ShardWriter(store)])
        model_path, tokenizer_path = _teacher_paths(recipe, teacher)
        manifest = extract(teacher, model_path, tokenizer_path, chunks, store, trainer,
                           recipe.representations.batch_size, shards=shards)
        bad = [c for c in manifest["bad_chunks"] if c < limit]
        result[teacher.label] = {"folder": str(store.folder), "shards": len(shards), "bad_chunks": len(bad),
                                 "tokens": sum(i["tokens"] for k, i in manifest["shards"].items() if int(k) in shards)}
    return result


def align_teachers(recipe: Recipe, mode: str, chunk_dir: Path, info: dict, rank: int = 0,
                   world_size: int = 1) -> tuple[list[PreparedTeacher], dict]:
    """Align every teacher's used shards to the target (this rank's share of the missing ones, when
    ``world_size > 1``); returns the teachers and their fallback rates over the aligned shards."""
    z = recipe.zoo
    target_tokenizer = load_tokenizer(resolve_model(recipe.model.tokenizer or recipe.model.path, z.size, z.dir),
                                      recipe.model.trust_remote_code)
    target_table = TokenTable.of(target_tokenizer)
    limit = used_chunks(recipe, info)
    prepared, rates = [], {}
    for teacher in recipe.teachers:
        store = open_teacher_store(recipe, teacher, info, uses_gpu(recipe))
        shards = list(range(-(-limit // store.chunks_per_shard)))
        _, tokenizer_path = _teacher_paths(recipe, teacher)
        teacher_tokenizer = load_tokenizer(tokenizer_path, teacher.trust_remote_code)
        vmap = build_vocab_map(teacher_tokenizer, target_tokenizer, store.identity["vocab_rows"],
                               cache_dir=store_root(recipe) / "vocab-maps")
        vocab_ids = vmap.first if mode == "prefix" else vmap.ids  # how candidates become target tokens
        stats = align_teacher(store, shards, chunk_dir, target_table, TokenTable.of(teacher_tokenizer), mode,
                              vocab_ids, tokenizer_fingerprint(target_tokenizer),
                              workers=recipe.data.preprocessing_workers, label=teacher.label, rank=rank,
                              world_size=world_size)
        rates[teacher.label] = {"fallback_rate": stats["rate"], "inside_rate": stats["inside"],
                                "positions": stats["positions"],
                                "vocab_map": vmap.stats, "bad_chunks": [c for c in store.manifest()["bad_chunks"]
                                                                        if c < limit]}
        prepared.append(PreparedTeacher(label=teacher.label, store=store,
                                        alignment=alignment_folder(store, mode, tokenizer_fingerprint(target_tokenizer),
                                                                   vocab_ids),
                                        vocab_ids=vocab_ids, exact=vmap.exact, shards=shards,
                                        continuations=(vmap.cont_offsets, vmap.cont_first, vmap.cont_read)))
    return prepared, rates
