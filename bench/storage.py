"""Benchmark: bytes on disk of a teacher's top-10 representations, per token, against FuseLLM's layout.

A real extraction (`fusion.data.representations.extract` through ``Trainer.predict`` with a
`ShardWriter`, on CPU) of the full tiny zoo's ``gpt2-code`` teacher (vocabulary 2,048) with k = 10,
on the first ``CHUNKS`` chunks of the embedded corpus at ``block_size=512`` (the zoo models accept
512 positions), into a temporary ``representations.dir``. The figure is `shard_bytes_per_token`:
the shard files' bytes on disk (``.npz``; sidecars and manifest are not counted) over the teacher
tokens they hold (``[start] + text + [eos]`` of every chunk).

A second figure does the same for a vocabulary above 65,536, whose top-k ids take 3 packed bytes:
a tiny random GPT-2 (``vocab_size=100_000``, one layer of width 32) with the ``gpt2-code`` tokenizer
files (the store sizes ids by the model's embedding rows, ``config.vocab_size``), on ``BIG_CHUNKS``
chunks.

Baseline, measured in the same run from the same teacher outputs (read back from our shards): the
way FuseLLM saved them, a Hugging Face `datasets.Dataset` written with ``save_to_disk``, one row per
chunk, built with ``Dataset.map`` as FuseLLM's ``forward_for_logits`` did: ``input_ids``,
``attention_mask`` and ``labels`` as the tokenizer's Python lists (datasets picks the integer widths),
``per_step_logits`` (the top-k values as a float16 tensor: FuseLLM casts the logits to float16 before
``topk``), ``per_step_indices`` (``topk``'s int64 indices), ``per_step_metric_ce`` (float16 per
token, its ``--save_per_token_metric``) and ``metric_ce`` (float16 per chunk). Rows are not padded
(FuseLLM's were, to ``model_max_length``) and the text column is not kept, both in the baseline's
favour. Its bytes are the ``.arrow`` data files over the same token count. ``baseline_float64_logits``
is the same dataset with the top-k values given as Python lists of floats, which ``datasets`` infers as
float64 (the layout `fusion.data.store`'s docstring estimated as ~110 bytes/token).

Ratio: ``baseline / value`` (how many times smaller our shards are).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

import datasets
import torch

from fusion.config import Recipe
from fusion.data.prepare import open_teacher_store, prepare_chunks
from fusion.data.representations import ShardWriter, extract, shard_bytes_per_token
from fusion.data.text import load_tokenizer
from fusion.schema import build
from fusion.trainer import build_predict_trainer
from fusion.zoo import resolve_model

BLOCK = 512
TOP_K = 10
CHUNKS, CHUNKS_PER_SHARD = 128, 64
BIG_VOCAB, BIG_CHUNKS = 100_000, 16


def _recipe(store_dir: Path, teacher: dict, chunks: int, per_shard: int, batch_size: int) -> Recipe:
    return build(Recipe, {
        "name": "bench-storage", "zoo": {"size": "full"}, "data": {"block_size": BLOCK},
        "trainer": {"accelerator": "cpu", "devices": 1}, "teachers": [teacher],
        "representations": {"dir": str(store_dir), "top_k": TOP_K, "chunks_per_shard": per_shard,
                            "max_chunks": chunks, "batch_size": batch_size},
    }, "")


def _extract(recipe: Recipe):
    """Extract the recipe's teacher on its ``max_chunks`` chunks; the store."""
    with contextlib.redirect_stdout(sys.stderr):  # extract() reports on stdout; ours is for JSON lines
        _, chunks, info = prepare_chunks(recipe, load_tokenizer(resolve_model("zoo:target", "full", None)))
        teacher = recipe.teachers[0]
        store = open_teacher_store(recipe, teacher, info, gpu=False)
        path = resolve_model(teacher.path, "full", None)
        shards = list(range(-(-recipe.representations.max_chunks // store.chunks_per_shard)))
        extract(teacher, path, path, chunks, store, build_predict_trainer(recipe, [ShardWriter(store)]),
                recipe.representations.batch_size, shards=shards)
    return store


def _arrow_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.arrow"))


def _fusellm_bytes(store, folder: Path, float64_logits: bool = False) -> int:
    """Bytes of the store's chunks saved in FuseLLM's layout (see the module docstring)."""
    rows = [shard.chunk(i) for s in range(store.n_shards) if store.shard_file(s).is_file()
            for shard in [store.read_shard(s)] for i in range(len(shard.chunk_ids))]

    def tokenize(batch: dict, indices: list[int]) -> dict:  # FuseLLM's tokenize_dataset: Python lists
        ids = [rows[i]["tokens"].tolist() for i in indices]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": [list(x) for x in ids]}

    def forward(example: dict, index: int) -> dict:  # FuseLLM's forward_for_logits, one chunk at a time
        row = rows[index]
        logits = torch.from_numpy(row["topk_logprobs"]).to(torch.float16)
        ce = torch.from_numpy(row["token_ce"]).to(torch.float16)
        return {"per_step_logits": logits.double().tolist() if float64_logits else logits,
                "per_step_indices": torch.from_numpy(row["topk_ids"]).to(torch.int64),
                "per_step_metric_ce": ce, "metric_ce": ce.float().mean().to(torch.float16)}

    ds = datasets.Dataset.from_dict({"row": list(range(len(rows)))})
    ds = ds.map(tokenize, batched=True, with_indices=True, remove_columns=["row"], keep_in_memory=True)
    ds = ds.map(forward, with_indices=True, keep_in_memory=True)
    ds.save_to_disk(str(folder))
    return _arrow_bytes(folder)


def _big_vocab_teacher(folder: Path) -> Path:
    """A random GPT-2 with ``BIG_VOCAB`` embedding rows and the zoo gpt2-code tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    source = Path(resolve_model("zoo:gpt2-code", "full", None))
    tokenizer = load_tokenizer(str(source))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=BIG_VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=BLOCK,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


def _figure(metric: str, store, root: Path, **extra) -> dict:
    value = shard_bytes_per_token(store)
    manifest = store.manifest()
    baseline = _fusellm_bytes(store, root / f"fusellm-{metric}") / manifest["tokens"]
    baseline64 = _fusellm_bytes(store, root / f"fusellm64-{metric}", float64_logits=True) / manifest["tokens"]
    return {"bench": "storage", "metric": metric, "value": round(value, 2), "unit": "bytes/token/teacher",
            "baseline": round(baseline, 2), "ratio": round(baseline / value, 2),
            "baseline_float64_logits": round(baseline64, 2), "top_k": TOP_K, "tokens": manifest["tokens"],
            "chunks": sum(info["chunks"] for info in manifest["shards"].values()), "block_size": BLOCK,
            "vocab_rows": manifest["vocab_rows"], "id_dtype": manifest["dtypes"]["topk_ids"], **extra}


def run() -> list[dict]:
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="fusion-bench-storage-") as tmp:
        root = Path(tmp)
        store = _extract(_recipe(root / "reps", {"path": "zoo:gpt2-code"}, CHUNKS, CHUNKS_PER_SHARD, 8))
        figures = [_figure("storage_bytes_per_token_k10", store, root, teacher="zoo:gpt2-code")]
        big = _big_vocab_teacher(root / "gpt2-100k")
        store = _extract(_recipe(root / "reps", {"path": str(big), "name": "gpt2-100k"}, BIG_CHUNKS, BIG_CHUNKS, 2))
        figures.append(_figure("storage_bytes_per_token_k10_vocab_over_64k", store, root,
                               teacher=f"random GPT-2, vocab_size {BIG_VOCAB}"))
    return figures
