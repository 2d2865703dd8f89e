"""The stages that prepare what fusion trains on (`fusion.data.prepare`): teacher representations, then alignment.

    representations  chunk the corpus, run every teacher (Trainer.predict), write its shards (ChatRepresentations:
                     the training conversations instead of the corpus)
    alignment        vocabulary maps and token alignments of each teacher to the target

Both products live in the shared, content-keyed store (``representations.dir``), so every run with
the same teacher and corpus reuses them; the run folder only records where they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fusion.data.chat import chat_datamodule
from fusion.data.chat_chunks import prepare_chat_chunks
from fusion.data.chunks import is_chunk_set
from fusion.data.prepare import (
    align_teachers,
    extract_teachers,
    prepare_chunks,
    store_problems,
    store_root,
    used_chunks,
)
from fusion.data.text import load_tokenizer
from fusion.stages.base import Stage
from fusion.trainer import build_predict_trainer

# What the chunks and each teacher's top-k depend on.
REPRESENTATIONS = ("model.path", "model.tokenizer", "model.trust_remote_code", "data", "teachers", "representations",
                   "seed", "zoo.size", "trainer.accelerator")


class Representations(Stage):
    name = "representations"
    config = REPRESENTATIONS
    outputs = ("chunk set and teacher shards (shared store: representations.dir)",)
    summary = "cut the corpus into text chunks; run every teacher over them; store its top-k"

    def damaged(self, ctx, result: dict) -> str | None:
        """A chunk set gone, a teacher's manifest or shard missing, a shard failing its sha256 (checked once
        per process: training then reads them without hashing again)."""
        if not is_chunk_set(Path(result["chunks"])):
            return f"its chunk set {result['chunks']} is missing"
        return "; ".join(store_problems(ctx.recipe, result["chunk_info"])) or None

    def run(self, ctx) -> dict:
        r = ctx.recipe
        folder, chunks, info = prepare_chunks(r, load_tokenizer(ctx.tokenizer_path, r.model.trust_remote_code))
        teachers = extract_teachers(r, chunks, info, lambda callbacks: build_predict_trainer(r, callbacks))
        return {"chunks": str(folder), "chunk_info": info, "used_chunks": used_chunks(r, info), "teachers": teachers}


class ChatRepresentations(Representations):
    """`Representations` on conversations: one chunk per training conversation, rendered with the pivot's template
    (`fusion.data.chat_chunks`), which every teacher reads."""

    config = (*REPRESENTATIONS, "chat")
    summary = "render the training conversations with the pivot's template; run every teacher; store its top-k"

    def run(self, ctx) -> dict:
        r = ctx.recipe
        conversations = chat_datamodule(r, ctx.tokenizer_path)
        conversations.prepare_data()
        conversations.setup("fit")
        folder, chunks, info = prepare_chat_chunks(store_root(r), conversations, r.seed)
        teachers = extract_teachers(r, chunks, info, lambda callbacks: build_predict_trainer(r, callbacks))
        return {"chunks": str(folder), "chunk_info": info, "used_chunks": used_chunks(r, info), "teachers": teachers}


class Alignment(Stage):
    name = "alignment"
    needs = ("representations",)
    config = ("fusion.alignment",)
    outputs = ("vocabulary maps and alignments (shared store)",)
    summary = "map each teacher's vocabulary and tokens onto the target's (shared cache)"

    def describe(self, recipe) -> str:
        return f"{recipe.fusion.alignment} alignment of each teacher's vocabulary and tokens to the target's"

    def run(self, ctx) -> dict:
        r, reps = ctx.recipe, ctx.record("representations")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # the ranks share the missing shards, then everyone sees all of them
            align_teachers(r, r.fusion.alignment, Path(reps["chunks"]), reps["chunk_info"],
                           torch.distributed.get_rank(), torch.distributed.get_world_size())
            torch.distributed.barrier()
        aligned = align_teachers(r, r.fusion.alignment, Path(reps["chunks"]), reps["chunk_info"])
        ctx.artifacts["aligned_teachers"] = aligned  # the data module's, without aligning twice
        if ctx.is_global_zero:
            for label, rate in aligned[1].items():
                inside = ""
                if rate["inside_rate"]:  # prefix mode: those positions fall back when no candidate fits
                    inside = (f" ({rate['inside_rate']:.1%} served from inside a teacher token; training logs "
                              f"train/teacher_fallback/{label})")
                print(f"[fusion] teacher {label}: {r.fusion.alignment} alignment falls back to the gold token at "
                      f"{rate['fallback_rate']:.1%} of {rate['positions']:,} positions{inside}; "
                      f"{len(rate['bad_chunks'])} chunks excluded (NaN/inf)")
        return {"mode": r.fusion.alignment, "teachers": aligned[1]}
