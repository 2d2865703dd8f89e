"""Text sources and packing: local files, save_to_disk folders, held-out validation, clear errors."""

import json
import os
import subprocess
import sys

import datasets
import pytest

from fusion.config import DataConfig
from fusion.data.text import TextDataModule, document_splits, load_tokenizer, pack
from fusion.errors import FusionError
from fusion.zoo import resolve_model

DOCS = [f"Document number {i} talks about {'parsing' if i % 2 else 'sockets'} at some length." * 3
        for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer_path(zoo_dir):
    return resolve_model("zoo:target", "small", zoo_dir)


def test_jsonl_parquet_txt_and_saved_folders_load_the_same_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(tmp_path / "b.parquet"))
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "txt").mkdir()
    for i, doc in enumerate(DOCS):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(doc)
    for source in ("a.jsonl", "b.parquet", "saved", "txt"):
        train, validation = document_splits(DataConfig(source=str(tmp_path / source), validation_fraction=0.1), 0)
        assert sorted(list(train["text"]) + list(validation["all"]["text"])) == sorted(DOCS), source
        assert len(validation["all"]) == 4


def test_packing_ends_documents_with_eos_and_cuts_full_blocks(tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    blocks = pack(datasets.Dataset.from_dict({"text": DOCS}), tokenizer, "text", 32)
    stream = [t for ids in tokenizer(DOCS)["input_ids"] for t in ids + [tokenizer.eos_token_id]]
    assert len(blocks) == len(stream) // 32
    assert [t for row in blocks["input_ids"] for t in row] == stream[:len(blocks) * 32]


def test_datamodule_caches_blocks_by_content(tmp_path, tokenizer_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in DOCS))
    config = DataConfig(source=str(tmp_path / "a.jsonl"), text_field="body", block_size=16,
                        cache_dir=str(tmp_path / "cache"))
    module = TextDataModule(config, tokenizer_path, batch_size=2)
    module.prepare_data()
    module.setup()
    assert module.validation_names == ["all"]
    batch = next(iter(module.val_dataloader()[0]))
    assert batch["input_ids"].shape == (2, 16)
    other = TextDataModule(DataConfig(**{**config.__dict__, "block_size": 8}), tokenizer_path, batch_size=2)
    assert other.cache_path() != module.cache_path()
    assert TextDataModule(config, tokenizer_path, batch_size=4).cache_path() == module.cache_path()


# One rank of a torchrun job (or one of two runs): prepare the block cache when the other process does.
_PREPARE = """
import json, os, sys, time
from pathlib import Path
import fusion.data.text as text
from fusion.config import DataConfig
config, tokenizer_path, ready, log = DataConfig(**json.loads(sys.argv[1])), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
pack = text.pack
def logged_pack(*args, **kwargs):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.5)  # the other process arrives while this one builds
    return pack(*args, **kwargs)
text.pack = logged_pack
module = text.TextDataModule(config, tokenizer_path, batch_size=2)
module.cache_path()  # loads the tokenizer: both processes are ready to build when they meet
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < 2:
    time.sleep(0.01)
module.prepare_data()
module.setup()
print(len(module.validation_sets["all"]), module.validation_names)
"""


def test_two_processes_preparing_the_same_blocks_at_once_build_them_once(tmp_path, tokenizer_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    config = {"source": str(tmp_path / "a.jsonl"), "block_size": 16, "cache_dir": str(tmp_path / "cache")}
    ready, log = tmp_path / "ready", tmp_path / "packs.log"
    ready.mkdir()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE, json.dumps(config), tokenizer_path, str(ready),
                               str(log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert len(set(log.read_text().split())) == 1  # one process packed, the other waited
    assert results[0][0] == results[1][0] and results[0][0].split()[-1] == "['all']"
    cache = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(cache) == 1 and cache[0].startswith("blocks-")  # no temporary folder left


def test_unreadable_sources_and_missing_columns_are_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(FusionError, match="data.text_field 'text'"):
        document_splits(DataConfig(source=str(tmp_path / "a.jsonl")), 0)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("x")
    (tmp_path / "mixed" / "b.jsonl").write_text("{}")
    with pytest.raises(FusionError, match="files of one kind"):
        document_splits(DataConfig(source=str(tmp_path / "mixed")), 0)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FusionError, match="data.source 'nobody/no-such-dataset' cannot be loaded"):
        document_splits(DataConfig(source="nobody/no-such-dataset"), 0)
