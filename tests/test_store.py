"""The shard store on synthetic shards: memory-mapped reads, ids in their stored width, one checksum per
process, durable writes, clear errors; and the loader's host-memory estimate."""

import json
import mmap
import multiprocessing
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import fusion.data.store as store_module
from fusion.config import Recipe
from fusion.data.cache import atomic_write
from fusion.data.fused import FusedBatches, loader_memory
from fusion.data.store import STORE_FORMAT, ChunkPredictions, TeacherStore, bytes_per_token, id_dtype, map_npz
from fusion.errors import FusionError
from fusion.methods.fusellm import FuseLLM
from fusion.schema import build

K = 10


def make_store(folder: Path, vocab_rows: int, n_chunks: int = 6, chunks_per_shard: int = 3) -> TeacherStore:
    ids = id_dtype(vocab_rows)
    identity = {"format": STORE_FORMAT, "teacher": {"model": "synthetic"}, "tokenizer": "synthetic",
                "vocab_rows": vocab_rows, "top_k": K, "chunking": {"chunks": n_chunks}, "corpus": "synthetic",
                "dtypes": {"tokens": "uint16" if ids == "uint16" else "uint32", "topk_ids": ids,
                           "topk_logprobs": "float16", "token_ce": "float16", "chunk_ce": "float32"}}
    store = TeacherStore(folder, identity, n_chunks, chunks_per_shard)
    store.open()
    return store


def predictions(chunk_id: int, length: int, vocab_rows: int) -> ChunkPredictions:
    rng = np.random.default_rng(chunk_id)
    return ChunkPredictions(chunk_id=chunk_id, tokens=rng.integers(0, vocab_rows, length),
                            topk_ids=rng.integers(0, vocab_rows, (length - 1, K)),
                            topk_logprobs=-rng.random((length - 1, K), dtype=np.float32) * 10,
                            token_ce=rng.random(length - 1, dtype=np.float32) * 10)


def write_all(store: TeacherStore, vocab_rows: int, length: int = 50) -> list[ChunkPredictions]:
    chunks = [predictions(c, length + c, vocab_rows) for c in range(store.n_chunks)]
    for shard in range(store.n_shards):
        store.write_shard(shard, [chunks[c] for c in store.shard_chunks(shard)])
    store.finalize()
    return chunks


def backing(array: np.ndarray):
    """What an array's memory belongs to, following views."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """Every file `fusion.data.store` hashes; its record of checked shards is this test's own."""
    files = []
    hash_file = store_module.sha256_file
    monkeypatch.setattr(store_module, "_verified", set())
    monkeypatch.setattr(store_module, "sha256_file", lambda path, **kw: files.append(path) or hash_file(path, **kw))
    return files


def new_process(hashed: list[Path]) -> None:
    """Forget the shards checked (and hashed when written) so far, as a new process would not know them."""
    store_module._verified.clear()
    hashed.clear()


@pytest.mark.parametrize("vocab_rows", [1000, 100_000])
def test_shards_are_memory_mapped_and_ids_keep_their_stored_width_until_a_chunk_is_read(tmp_path, vocab_rows):
    store = make_store(tmp_path / "teacher", vocab_rows)
    chunks = write_all(store, vocab_rows)
    shard = store.read_shard(1)
    packed = vocab_rows > 1 << 16
    assert shard.topk_ids.dtype == (np.uint8 if packed else np.uint16)
    assert shard.topk_ids.shape[1:] == ((K, 3) if packed else (K,))
    assert shard.tokens.dtype == (np.uint32 if packed else np.uint16)
    for name in ("tokens", "topk_ids", "topk_logprobs", "token_ce", "chunk_ce"):  # views of the file, not copies
        assert isinstance(backing(getattr(shard, name)), mmap.mmap), name
        assert not getattr(shard, name).flags.writeable
    with np.load(store.shard_file(1)) as data:  # the same arrays np.load reads
        for name in data.files:
            np.testing.assert_array_equal(map_npz(store.shard_file(1))[name], data[name])
    for i, chunk_id in enumerate(shard.chunk_ids.tolist()):
        row, expected = shard.chunk(i), chunks[chunk_id]
        assert row["tokens"].dtype == row["topk_ids"].dtype == np.int64  # widened here, for this chunk only
        np.testing.assert_array_equal(row["tokens"], expected.tokens)
        np.testing.assert_array_equal(row["topk_ids"], expected.topk_ids)
        np.testing.assert_allclose(row["topk_logprobs"], expected.topk_logprobs, atol=1e-2)
        assert row["topk_logprobs"].flags.writeable  # a copy: safe to hand to torch.from_numpy


def test_a_shard_is_hashed_once_per_process_and_file_version(tmp_path, hashed):
    store = make_store(tmp_path / "teacher", 1000)
    write_all(store, 1000)
    new_process(hashed)
    path = store.shard_file(0)
    for _ in range(3):  # new store objects, as every stage and loader makes its own
        TeacherStore(store.folder, store.identity, store.n_chunks, store.chunks_per_shard).read_shard(0)
    assert hashed == [path]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new version of the file
    store.read_shard(0)
    assert hashed == [path, path]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern changed
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    with pytest.raises(FusionError, match=r"shard-00000.npz is corrupted .* run the same command again"):
        store.read_shard(0)


def test_loader_workers_inherit_the_checks_instead_of_hashing_every_shard_again(tmp_path, hashed):
    store = make_store(tmp_path / "teacher", 1000)
    write_all(store, 1000)
    new_process(hashed)
    rows = np.stack([np.arange(store.n_chunks), np.ones(store.n_chunks, dtype=np.int64)], axis=1)  # a chunk each
    dataset = FusedBatches(tmp_path, [SimpleNamespace(store=store)], rows, batch_size=1,
                           seed=0, rank=0, world_size=1, keep_exact_only=False, pad_id=0)
    dataset.verify()  # what RowLoader does in the main process before its workers start
    assert sorted(hashed) == [store.shard_file(0), store.shard_file(1)]
    context = multiprocessing.get_context("fork")  # how DataLoader starts its workers on Linux
    results = context.Queue()
    worker = context.Process(target=lambda: results.put([len(store.read_shard(s).chunk_ids) for s in (0, 1)]
                                                        + [len(hashed)]))
    worker.start()
    assert results.get(timeout=60) == [3, 3, 2]  # read both shards, hashed nothing more
    worker.join()


def test_a_truncated_or_foreign_shard_is_one_clear_error(tmp_path, hashed):
    store = make_store(tmp_path / "teacher", 1000)
    write_all(store, 1000)
    path = store.shard_file(1)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(FusionError, match=r"shard-00001.npz is corrupted .* recomputes only the bad ones"):
        store.read_shard(1)
    with pytest.raises(FusionError, match=r"shard-00001.npz cannot be read .* run the same command again"):
        store.read_shard(1, verify=False)
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(FusionError, match=r"shard-00001.npz cannot be read"):
        store.read_shard(1, verify=False)
    store.shard_file(0).unlink()
    with pytest.raises(FusionError, match=r"shard-00000.npz is missing or unfinished; run the same command again"):
        store.read_shard(0)


def test_atomic_write_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or replace(a, b))
    target = tmp_path / "manifest.json"
    atomic_write(target, lambda f: f.write(json.dumps({"shards": 3}).encode()))
    assert json.loads(target.read_text()) == {"shards": 3}
    (_, written), (_, tmp, final), (_, folder) = events
    assert written == tmp and Path(tmp).parent == tmp_path and final == str(target) and folder == str(tmp_path)


def test_bytes_per_token_is_what_a_shard_takes_on_disk(tmp_path):
    assert bytes_per_token(10) == 44 and bytes_per_token(10, "uint24") == 56  # the module docstring's figures
    for vocab_rows in (1000, 100_000):
        store = make_store(tmp_path / str(vocab_rows), vocab_rows, n_chunks=3)
        write_all(store, vocab_rows, length=2000)
        measured = store.shard_file(0).stat().st_size / store.manifest()["tokens"]
        assert measured == pytest.approx(bytes_per_token(K, id_dtype(vocab_rows)), rel=0.02), measured


def test_the_loader_memory_of_the_7b_recipe_is_page_cache_not_private_memory():
    recipe = build(Recipe, {  # fusellm-llama2-7b.yaml's loader settings
        "name": "7b", "method": "fusellm", "model": {"path": "meta-llama/Llama-2-7b-hf"},
        "teachers": [{"path": p} for p in ("meta-llama/Llama-2-7b-hf", "openlm-research/open_llama_7b_v2",
                                           "mosaicml/mpt-7b")],
        "representations": {"top_k": 10, "chunks_per_shard": 1024},
        "data": {"block_size": 2048, "num_workers": 4}, "trainer": {"batch_size": 2},
    }, "")
    memory = loader_memory(recipe)
    shard = 1024 * 2048 * (44 + 4)  # shard + alignment file: ~101 MB
    assert memory.shard_bytes == shard
    assert memory.mapped == 4 * 4 * 3 * shard  # workers x shards x teachers: ~4.8 GB, virtual
    assert memory.page_cache == 4 * 3 * shard  # ~1.2 GB per node, whatever the workers and ranks
    widened = 4 * 3 * 1024 * 2048 * (8 + 8 * 10 + 2 * 10 + 2)  # what each worker held before: ids as int64
    assert widened / 1e9 == pytest.approx(2.77, abs=0.01)  # the review's ~2.8 GB per worker
    assert 10e6 < memory.private < 20e6  # 8 batches in flight of ~1.6 MB
    line = next(line for line in FuseLLM().plan(recipe) if line.startswith("loader"))
    assert "~13.1 MB private host memory per rank" in line and "4 workers x 4 shards x 3 teachers x 101 MB" in line
    single = loader_memory(build(Recipe, {"name": "zoo", "method": "fusellm", "teachers": [{"path": "zoo:target"}],
                                          "data": {"num_workers": 0}}, ""))
    assert single.mapped == single.page_cache and single.batches == 1
