"""Chunks, teacher extraction through Trainer.predict, the shard store and its manifest, on the small zoo."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import fusion.data.cache as cache
import fusion.data.representations as representations
from fusion.config import Recipe
from fusion.data.cache import file_sha256
from fusion.data.chunks import sequence_ids
from fusion.data.prepare import open_teacher_store, prepare_chunks
from fusion.data.representations import (
    ShardWriter,
    extract,
    model_fingerprint,
    safetensors_header,
    shard_bytes_per_token,
)
from fusion.data.text import load_tokenizer
from fusion.errors import FusionError
from fusion.schema import build
from fusion.trainer import build_predict_trainer
from fusion.zoo import resolve_model

ROOT = Path(__file__).resolve().parent.parent


def make_recipe(zoo_dir: Path, store_dir: Path, teachers: list[dict], **representations) -> Recipe:
    return build(Recipe, {
        "name": "reps", "zoo": {"size": "small", "dir": str(zoo_dir)},
        "data": {"block_size": 128}, "trainer": {"accelerator": "cpu", "devices": 1},
        "teachers": teachers,
        "representations": {"dir": str(store_dir), "chunks_per_shard": 16, "max_chunks": 64, "batch_size": 8,
                            **representations},
    }, "")


@pytest.fixture(scope="module")
def chunked(zoo_dir, tmp_path_factory) -> Path:
    """A store folder holding only the chunk set (chunking the corpus takes ~10 s: done once)."""
    root = tmp_path_factory.mktemp("chunked")
    prepare_chunks(make_recipe(zoo_dir, root, []), load_tokenizer(resolve_model("zoo:target", "small", zoo_dir)))
    return root


@pytest.fixture
def store_dir(chunked, tmp_path) -> Path:
    """A fresh store folder with a copy of the chunk set."""
    for folder in chunked.glob("chunks-*"):
        shutil.copytree(folder, tmp_path / "store" / folder.name)
    return tmp_path / "store"


def run_extraction(recipe: Recipe, teacher_index: int = 0):
    folder, chunks, info = prepare_chunks(recipe, load_tokenizer(resolve_model("zoo:target", "small",
                                                                               recipe.zoo.dir)))
    teacher = recipe.teachers[teacher_index]
    store = open_teacher_store(recipe, teacher, info, gpu=False)
    path = resolve_model(teacher.path, "small", recipe.zoo.dir)
    manifest = extract(teacher, path, path, chunks, store, build_predict_trainer(recipe, [ShardWriter(store)]),
                       recipe.representations.batch_size, shards=list(range(4)))
    return store, manifest, chunks


def test_shards_are_written_and_read_back(zoo_dir, store_dir):
    recipe = make_recipe(zoo_dir, store_dir, [{"path": "zoo:gpt2-code"}])
    store, manifest, chunks = run_extraction(recipe)
    assert manifest["top_k"] == 10 and manifest["vocab_rows"] >= 768
    assert sorted(manifest["shards"]) == ["00000", "00001", "00002", "00003"] and manifest["bad_chunks"] == []
    bytes_per_token = shard_bytes_per_token(store)
    assert bytes_per_token <= 64, bytes_per_token

    # Read back and compare with a direct forward pass of the teacher on one chunk.
    path = resolve_model("zoo:gpt2-code", "small", zoo_dir)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    shard = store.read_shard(2)
    row = shard.chunk(5)
    chunk = chunks[int(shard.chunk_ids[5])]
    ids = sequence_ids(tok, [chunk["text"]], [chunk["ends_document"]])[0]
    assert row["tokens"].tolist() == ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    top = logprobs.topk(10, -1)
    assert (row["topk_ids"][:, 0] == top.indices[:, 0].numpy()).mean() > 0.99  # fp16 ties may swap
    np.testing.assert_allclose(row["topk_logprobs"], top.values.numpy(), atol=2e-2)
    nll = -logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).numpy()
    np.testing.assert_allclose(row["token_ce"], nll, atol=2e-2)
    assert row["chunk_ce"] == pytest.approx(nll.mean(), abs=1e-3)


def test_manifest_mismatch_and_corruption_are_refused(zoo_dir, store_dir):
    recipe = make_recipe(zoo_dir, store_dir, [{"path": "zoo:gpt2-code"}])
    store, manifest, _ = run_extraction(recipe)
    for key, change in (("top_k", 5), ("tokenizer", "0123456789abcdef"), ("corpus", "another-corpus")):
        other = type(store)(store.folder, {**store.identity, key: change}, store.n_chunks, store.chunks_per_shard)
        with pytest.raises(FusionError, match=f"computed with {key} = .*delete that folder"):
            other.read_shard(0)
        with pytest.raises(FusionError, match=f"computed with {key}"):
            other.open()
    data = bytearray(store.shard_file(1).read_bytes())
    data[len(data) // 2] ^= 0xFF
    store.shard_file(1).write_bytes(bytes(data))
    fresh = type(store)(store.folder, store.identity, store.n_chunks, store.chunks_per_shard)
    fresh.read_shard(0)
    with pytest.raises(FusionError, match="shard-00001.npz is corrupted"):
        fresh.read_shard(1)


_KILLABLE = """
import sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_representations import make_recipe, run_extraction
from fusion.data.store import TeacherStore
write = TeacherStore.write_shard
def slow_write(self, shard, chunks):  # slow enough to be killed between two shards
    time.sleep(1.5)
    return write(self, shard, chunks)
TeacherStore.write_shard = slow_write
run_extraction(make_recipe({zoo!r}, {store!r}, [{{"path": "zoo:neox-prose"}}]))
"""


def test_killed_extraction_resumes_without_recomputing_finished_shards(zoo_dir, store_dir):
    code = _KILLABLE.format(root=str(ROOT), tests=str(ROOT / "tests"), zoo=str(zoo_dir), store=str(store_dir))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.time() + 120
    while time.time() < deadline and not list(store_dir.glob("*/shard-00001.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in store_dir.glob("*/shard-*.npz")}
    assert 2 <= len(finished) < 4, finished  # killed in the middle

    recipe = make_recipe(zoo_dir, store_dir, [{"path": "zoo:neox-prose"}])
    store, manifest, _ = run_extraction(recipe)
    assert sorted(manifest["shards"]) == ["00000", "00001", "00002", "00003"]
    for name, mtime in finished.items():  # finished shards were kept, not recomputed
        assert (store.folder / name).stat().st_mtime_ns == mtime
    for shard in range(4):
        store.read_shard(shard)  # checksums hold
    assert not list(store.folder.glob(".*"))  # no temporary file left


def test_nan_chunks_are_counted_and_excluded(zoo_dir, store_dir, tmp_path):
    # A copy of the NeoX teacher (untied input embeddings) whose input embedding of one token is NaN:
    # exactly the chunks that contain the token give NaN outputs (0 * NaN in masked attention spreads it).
    recipe = make_recipe(zoo_dir, store_dir, [{"path": "zoo:neox-prose"}])
    _, chunks, _ = prepare_chunks(recipe, load_tokenizer(resolve_model("zoo:target", "small", zoo_dir)))
    source = Path(resolve_model("zoo:neox-prose", "small", zoo_dir))
    tok = load_tokenizer(str(source))
    seqs = [sequence_ids(tok, [chunks[i]["text"]], [chunks[i]["ends_document"]])[0] for i in range(64)]
    counts = np.bincount(np.concatenate([np.unique(s) for s in seqs]), minlength=len(tok))
    poisoned = int(np.abs(counts - 32).argmin())  # a token in about half of the chunks
    broken = tmp_path / "broken-neox"
    broken.mkdir()
    for file in source.iterdir():
        if file.is_file() and file.name != "model.safetensors":
            (broken / file.name).write_bytes(file.read_bytes())
    weights = load_file(source / "model.safetensors")
    key = next(k for k in weights if k.endswith("embed_in.weight"))
    weights[key][poisoned] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})

    recipe = make_recipe(zoo_dir, store_dir, [{"path": str(broken), "name": "broken"}])
    store, manifest, chunks = run_extraction(recipe)
    assert manifest["complete"] is False  # only the 4 requested shards of the whole chunk set
    bad = set(manifest["bad_chunks"])
    assert bad == {i for i, s in enumerate(seqs) if poisoned in s} and 0 < len(bad) < 64
    shard = store.read_shard(0)
    for i, chunk_id in enumerate(shard.chunk_ids.tolist()):
        assert shard.bad[i] == (chunk_id in bad)
        assert np.isnan(shard.chunk_ce[i]) == (chunk_id in bad)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_bitsandbytes_teachers_agree_with_full_precision(zoo_dir, store_dir, quantization):
    full = make_recipe(zoo_dir, store_dir, [{"path": "zoo:gpt2-code"}], max_chunks=16)
    quant = make_recipe(zoo_dir, store_dir, [{"path": "zoo:gpt2-code", "quantization": quantization}], max_chunks=16)
    store_full, _, _ = run_extraction(full)
    store_quant, manifest, _ = run_extraction(quant)
    assert store_quant.folder != store_full.folder and manifest["teacher"]["quantization"] == quantization
    a, b = store_full.read_shard(0), store_quant.read_shard(0)
    agree = (a.topk_ids[:, 0] == b.topk_ids[:, 0]).mean()
    assert agree > 0.8, agree
    assert np.abs(a.chunk_ce - b.chunk_ce).max() < 0.2
    assert json.loads((store_quant.folder / "manifest.json").read_text())["bad_chunks"] == []


def test_a_fine_tuned_copy_with_the_same_file_sizes_gets_new_representations(zoo_dir, store_dir, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("FUSION_CACHE", str(tmp_path / "cache"))  # the file-hash index
    source = Path(resolve_model("zoo:gpt2-code", "small", zoo_dir))
    copy, tuned = tmp_path / "copy" / "gpt2-code", tmp_path / "tuned" / "gpt2-code"
    shutil.copytree(source, copy)
    shutil.copytree(source, tuned)
    weights = load_file(tuned / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    save_file({name: w + 0.05 * torch.randn(w.shape, generator=generator, dtype=w.dtype)
               for name, w in weights.items()}, tuned / "model.safetensors", metadata={"format": "pt"})
    for file in source.iterdir():  # same names, shapes, dtypes: every file keeps its size
        assert (tuned / file.name).stat().st_size == file.stat().st_size, file.name
    assert safetensors_header(tuned / "model.safetensors") == safetensors_header(source / "model.safetensors")

    original, manifest, _ = run_extraction(make_recipe(zoo_dir, store_dir, [{"path": str(source), "name": "gpt2"}]))
    written = {p.name: p.stat().st_mtime_ns for p in original.folder.glob("shard-*.npz")}
    assert len(written) == 4
    # An identical copy elsewhere: the fingerprint is the content's, so the same representations are reused.
    same, same_manifest, _ = run_extraction(make_recipe(zoo_dir, store_dir, [{"path": str(copy), "name": "gpt2"}]))
    assert same.folder == original.folder and same_manifest == manifest
    assert {p.name: p.stat().st_mtime_ns for p in same.folder.glob("shard-*.npz")} == written  # nothing recomputed
    # The fine-tuned copy: a new folder, computed from its own weights.
    new, new_manifest, _ = run_extraction(make_recipe(zoo_dir, store_dir, [{"path": str(tuned), "name": "gpt2"}]))
    assert new.folder != original.folder and sorted(new_manifest["shards"]) == ["00000", "00001", "00002", "00003"]
    assert new_manifest["teacher"]["model"] != manifest["teacher"]["model"]
    assert np.abs(new.read_shard(0).chunk(0)["topk_logprobs"].astype(np.float32)
                  - original.read_shard(0).chunk(0)["topk_logprobs"].astype(np.float32)).max() > 0.01


def test_weights_are_hashed_once_per_file_version(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE", str(tmp_path / "cache"))
    hashed = []
    hash_file = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda path, **kw: hashed.append(path) or hash_file(path, **kw))
    weights = tmp_path / "model" / "model.bin"
    weights.parent.mkdir()
    weights.write_bytes(b"\x00" * 1000)
    (tmp_path / "model" / "config.json").write_text("{}")
    first = model_fingerprint(str(weights.parent))
    assert model_fingerprint(str(weights.parent)) == first and hashed == [weights]  # the second time: cached
    index = json.loads((tmp_path / "cache" / "file-hashes.json").read_text())
    assert index[str(weights)]["size"] == 1000
    stat = weights.stat()
    weights.write_bytes(b"\x01" * 1000)  # fine-tuned in place: same size, a new mtime
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert model_fingerprint(str(weights.parent)) != first and hashed == [weights, weights]
    assert file_sha256(weights) == hash_file(weights)
    (tmp_path / "model" / "broken.safetensors").write_bytes(b"\xff" * 12)  # a header length past the end
    with pytest.raises(FusionError, match="broken.safetensors is not a safetensors file.*download it again"):
        model_fingerprint(str(weights.parent))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A local Hugging Face cache holding ``org/cached`` at commit ``a...a``; the hub is never asked unless a
    test says so."""
    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    repo = root / "models--org--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("a" * 40) / "config.json").write_text("{}")
    monkeypatch.setattr(representations.HfApi, "model_info", lambda *a, **k: pytest.fail("the hub was asked"))
    return root


def test_a_hub_teacher_is_its_commit_offline_from_the_local_cache(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_fingerprint("org/cached") == "hub:org/cached@" + "a" * 40
    with pytest.raises(FusionError, match=r"teacher 'org/missing'.*HF_HUB_OFFLINE.*download it \(hf download "
                                          r"org/missing\) or set its path to a local folder"):
        model_fingerprint("org/missing")
    with pytest.raises(FusionError, match="teacher './no/such/folder': no such local folder"):
        model_fingerprint("./no/such/folder")


def test_a_hub_teacher_is_its_commit_on_the_hub_or_cached_when_the_hub_cannot_be_reached(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(representations.HfApi, "model_info", lambda self, repo_id, **kw: SimpleNamespace(sha="b" * 40))
    assert model_fingerprint("org/cached") == "hub:org/cached@" + "b" * 40  # the hub's main, newer than the cache

    def unreachable(self, repo_id, **kw):
        raise ConnectionError("cannot reach huggingface.co")

    monkeypatch.setattr(representations.HfApi, "model_info", unreachable)
    assert model_fingerprint("org/cached") == "hub:org/cached@" + "a" * 40
    with pytest.raises(FusionError, match="'org/missing'.*cannot reach huggingface.co"):
        model_fingerprint("org/missing")
