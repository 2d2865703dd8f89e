"""Token alignments of a teacher's shards to the target's chunks, computed once and kept next to the shards.

For each shard of a teacher store (`fusion.data.store`) and one alignment mode, the file
``<teacher folder>/align-<mode>-<key>/shard-NNNNN.npz`` holds, for every chunk of the shard, the
``src`` array of `fusion.data.alignment.align` (int32, one entry per target position), concatenated,
with ``offsets`` into it, and in ``prefix`` mode the ``read`` array beside it (uint16: bytes of the
teacher's next token already in the text, `align_many`'s ``with_read``). ``key`` covers the target
tokenizer, the chunking and the vocabulary map, so a different target gets its own alignments. Shards
are aligned in parallel worker processes, each written atomically: a killed run keeps what it
finished. Training reads them memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fusion.data.alignment import TokenTable, align_many
from fusion.data.cache import atomic_write
from fusion.data.chunks import load_chunk_set
from fusion.data.store import TeacherStore, map_npz
from fusion.errors import FusionError

_ALIGN_FORMAT = 2  # 2: prefix mode serves positions inside teacher tokens, with `read`
_BATCH = 64  # chunks per align_many call: enough to share numpy's per-call overhead

_worker: dict = {}  # per worker process: the tables and map, sent once by the pool initializer


def alignment_folder(store: TeacherStore, mode: str, target_fingerprint: str, vocab_ids: np.ndarray) -> Path:
    digest = hashlib.sha256(json.dumps([_ALIGN_FORMAT, mode, target_fingerprint]).encode())
    digest.update(np.ascontiguousarray(vocab_ids, dtype=np.int64).tobytes())
    return store.folder / f"align-{mode}-{digest.hexdigest()[:12]}"


def _init(store: TeacherStore, target_table: TokenTable, teacher_table: TokenTable, mode: str,
          vocab_ids: np.ndarray, chunk_folder: Path, folder: Path) -> None:
    _worker.update(store=store, target_table=target_table, teacher_table=teacher_table, mode=mode,
                   vocab_ids=vocab_ids, chunks=load_chunk_set(chunk_folder)[0], folder=folder)


def _align_shard(shard: int) -> None:
    """Align one shard (in a worker process, or in this one)."""
    w = _worker
    data = w["store"].read_shard(shard)
    first = int(data.chunk_ids[0])  # chunk ids are row numbers of the chunk set
    targets = w["chunks"][first:first + len(data.chunk_ids)]
    with_read = w["mode"] == "prefix"
    aligned = []
    for start in range(0, len(data.chunk_ids), _BATCH):
        sequences = [(np.asarray(targets["input_ids"][i]), data.chunk(i)["tokens"], targets["ends_document"][i],
                      targets["nbytes"][i]) for i in range(start, min(start + _BATCH, len(data.chunk_ids)))]
        aligned += align_many(sequences, w["target_table"], w["teacher_table"], w["mode"], w["vocab_ids"],
                              with_read=with_read)
    srcs = [a[0] for a in aligned] if with_read else aligned
    arrays = {"src": np.concatenate(srcs).astype(np.int32),
              "offsets": np.concatenate([[0], np.cumsum([len(s) for s in srcs])]).astype(np.int64)}
    if with_read:
        arrays["read"] = np.concatenate([a[1] for a in aligned]).astype(np.uint16)
    path = w["folder"] / f"shard-{shard:05d}.npz"
    atomic_write(path, lambda f: np.savez(f, **arrays))


def align_teacher(store: TeacherStore, shards: list[int], chunk_folder: Path, target_table: TokenTable,
                  teacher_table: TokenTable, mode: str, vocab_ids: np.ndarray, target_fingerprint: str,
                  workers: int = 1, label: str = "", rank: int = 0, world_size: int = 1) -> dict:
    """Compute the missing alignment files among ``shards`` (this rank's share of them), and return
    ``{"positions", "fallback", "rate", "inside", "folder"}`` over the files of ``shards`` that exist
    (``inside``: the share of positions served from inside a teacher token, ``prefix`` mode).

    ``chunk_folder`` is the chunk set the store was computed on (`fusion.data.chunks`). Under several
    processes, call it on every rank, then once more after a barrier for the totals.
    """
    folder = alignment_folder(store, mode, target_fingerprint, vocab_ids)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [s for s in shards[rank::world_size] if not readable(folder, s)]
    if todo:
        args = (store, target_table, teacher_table, mode, vocab_ids, chunk_folder, folder)
        progress = tqdm(total=len(todo), desc=f"aligning {label} ({mode})", unit="shard")
        if workers > 1:
            with ProcessPoolExecutor(workers, initializer=_init, initargs=args) as pool:
                for _ in pool.map(_align_shard, todo):
                    progress.update()
        else:
            _init(*args)
            for shard in todo:
                _align_shard(shard)
                progress.update()
        progress.close()
    positions = fallback = inside = 0
    for shard in shards:
        if (folder / f"shard-{shard:05d}.npz").exists():
            src, _, read = read_alignment(folder, shard)
            positions, fallback = positions + len(src), fallback + int((src < 0).sum())
            inside += 0 if read is None else int((read > 0).sum())
    return {"positions": positions, "fallback": fallback, "rate": fallback / max(positions, 1),
            "inside": inside / max(positions, 1), "folder": str(folder)}


def readable(folder: Path, shard: int) -> bool:
    """Whether the shard's alignment file exists and opens (a truncated or damaged one is aligned again)."""
    path = folder / f"shard-{shard:05d}.npz"
    if not path.exists():
        return False
    try:
        read_alignment(folder, shard)
    except FusionError:
        print(f"[fusion] {path} cannot be read: aligning that shard again")
        return False
    return True


def read_alignment(folder: Path, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(src, offsets, read)`` of one shard, memory-mapped: chunk i of the shard has ``src[offsets[i]:offsets[i + 1]]``
    (``read`` likewise; None but in ``prefix`` mode)."""
    path = folder / f"shard-{shard:05d}.npz"
    try:
        arrays = map_npz(path)
        return arrays["src"], arrays["offsets"], arrays.get("read")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise FusionError(f"{path} cannot be read ({err}); run the same command again: damaged alignment files "
                          "are aligned again") from None
