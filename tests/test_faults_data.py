"""Faults in the data (issue 9): caches keyed by the data's content, and one-line errors for bad inputs.

Through the CLI on the small tiny zoo and real files, as a user meets them: a data file replaced
after a first run must be re-read (not trained on from the old blocks or chunks), unchanged data must
not be re-read, and empty, non-UTF-8 or single-document files and out-of-range recipe values must
end in one ``error:`` line and exit code 2.
"""

import collections
import inspect
import json
import os
import pathlib
import subprocess
import textwrap

import pytest
from conftest import run_fit, tiny_overrides

from fusion.config import DataConfig
from fusion.data.prepare import chunk_folder, corpus_key
from fusion.data.text import hub_dataset_revision, load_tokenizer, source_fingerprint
from fusion.fit import main as fit_main
from fusion.recipe import load_recipe
from fusion.zoo import resolve_model

FAST = {"trainer.max_steps": 4, "trainer.val_every_n_steps": 4, "trainer.checkpoint_every_n_steps": 4}
HOUR_NS = 3600 * 10**9


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """~140 English documents (~90 kB): docstrings of standard-library modules, no download."""
    docs = [obj.__doc__ for module in (json, inspect, collections, os, pathlib, textwrap)
            for name, obj in sorted(vars(module).items())
            if not name.startswith("_") and isinstance(getattr(obj, "__doc__", None), str) and len(obj.__doc__) > 200]
    return list(dict.fromkeys(docs))


def write_jsonl(path: pathlib.Path, texts: list[str]) -> pathlib.Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def good_jsonl(documents, tmp_path_factory) -> pathlib.Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "m.jsonl", documents)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def blocks_folders(cache: pathlib.Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache.glob("blocks-*")}


# --- stale caches ---------------------------------------------------------------------------------

def test_clm_reuses_unchanged_data_and_rereads_a_replaced_file(tmp_path, zoo_dir, documents):
    data, cache = write_jsonl(tmp_path / "m.jsonl", documents), tmp_path / "cache"

    def fit(out: str):
        return run_fit("--recipe", "clm.yaml", *tiny_overrides(tmp_path / out, zoo_dir, cache, **FAST,
                                                               **{"data.source": str(data)}))

    first = fit("run-1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "packing" in first.stderr
    built = blocks_folders(cache)
    assert len(built) == 1

    again = fit("run-2")  # same file, new run: the blocks are read from the cache, not re-packed
    assert again.returncode == 0, again.stderr[-3000:]
    assert "packing" not in again.stderr
    assert blocks_folders(cache) == built

    write_jsonl(data, ["tiny"] * 20)  # the same path, now too little text to fill one block
    replaced = fit("run-3")
    assert "packing" in replaced.stderr  # re-tokenized, not trained on the old blocks
    assert_one_line_error(replaced, "data.block_size=128", "fewer than")
    assert blocks_folders(cache) == built  # the failed build left nothing behind


def test_the_fingerprint_follows_content_not_size_time_or_place(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "alpha"}\n')
    key = source_fingerprint(DataConfig(source=str(data)))
    data.write_text('{"text": "omega"}\n')  # same size, written at once: hashed afresh, not from file-hashes.json
    changed = source_fingerprint(DataConfig(source=str(data)))
    assert changed != key

    old = data.stat().st_mtime_ns - HOUR_NS  # an old file: its hash comes from the per-version cache
    os.utime(data, ns=(old, old))
    assert source_fingerprint(DataConfig(source=str(data))) == changed
    data.write_text('{"text": "gamma"}\n')
    os.utime(data, ns=(old + 10**9, old + 10**9))  # edited later, same size
    assert source_fingerprint(DataConfig(source=str(data))) not in (key, changed)

    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    (elsewhere / "a.jsonl").write_bytes(data.read_bytes())  # a copy elsewhere reuses the original's caches
    assert source_fingerprint(DataConfig(source=str(elsewhere / "a.jsonl"))) == \
        source_fingerprint(DataConfig(source=str(data)))


def test_a_folder_is_keyed_by_the_files_the_loader_reads(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"document {i}")
    config = DataConfig(source=str(folder))
    key = source_fingerprint(config)
    (folder / "notes.md").write_text("not read by the loader")
    assert source_fingerprint(config) == key
    (folder / "sub").mkdir()
    (folder / "sub" / "3.txt").write_text("document 3")  # the loader reads sub-folders too
    with_more = source_fingerprint(config)
    assert with_more != key
    (folder / "sub" / "3.txt").rename(folder / "3.txt")  # the same text under another name: another order
    assert source_fingerprint(config) not in (key, with_more)


def test_fusellm_chunks_are_keyed_by_content(tmp_path, zoo_dir, cache_dir, good_jsonl):
    data = tmp_path / "m.jsonl"
    data.write_bytes(good_jsonl.read_bytes())
    recipe = load_recipe("fusellm.yaml", tiny_overrides(tmp_path / "run", zoo_dir, cache_dir,
                                                        **{"data.source": str(data)}))
    tokenizer = load_tokenizer(resolve_model("zoo:target", "small", zoo_dir))
    key, folder = corpus_key(recipe), chunk_folder(recipe, tokenizer)
    assert (corpus_key(recipe), chunk_folder(recipe, tokenizer)) == (key, folder)
    data.write_text(data.read_text().replace("the", "teh", 1))  # one word of one document, same size
    assert corpus_key(recipe) != key
    assert chunk_folder(recipe, tokenizer) != folder


def test_a_hub_dataset_is_keyed_by_its_commit_offline_by_the_cached_one(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    hub_dataset_revision.cache_clear()
    ref = tmp_path / "datasets--someone--corpus" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("0123abcd\n")
    assert source_fingerprint(DataConfig(source="someone/corpus")) == "hub:someone/corpus@0123abcd"
    assert "warning" not in capsys.readouterr().err
    assert source_fingerprint(DataConfig(source="someone/uncached")) == "hub:someone/uncached"
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: data.source 'someone/uncached'")
    assert "will not be noticed" in warning[0]
    hub_dataset_revision.cache_clear()


# --- bad inputs: one line, exit code 2 --------------------------------------------------------------

def huge_document(documents):
    return [" ".join(documents)]


BAD_FILES = {
    "empty": (b"", "holds no documents"),
    "blank-lines": (b"\n\n\n", "holds no documents"),
    "latin-1": ("\n".join(json.dumps({"text": "caf\u00e9 cr\u00e8me " * 40}, ensure_ascii=False)
                          for _ in range(30)).encode("latin-1"), "is not UTF-8"),
    "one-huge-document": (None, "has 1 document(s)"),
}


@pytest.mark.parametrize("recipe, case", [("clm.yaml", name) for name in BAD_FILES]
                         + [("fusellm.yaml", "latin-1"), ("fusellm.yaml", "one-huge-document")])
def test_bad_data_files_are_one_line_errors(recipe, case, tmp_path, zoo_dir, cache_dir, documents):
    content, expected = BAD_FILES[case]
    data = tmp_path / "bad.jsonl"
    if content is None:
        write_jsonl(data, huge_document(documents))
    else:
        data.write_bytes(content)
    result = run_fit("--recipe", recipe, *tiny_overrides(tmp_path / "run", zoo_dir, cache_dir, **FAST,
                                                         **{"data.source": str(data)}))
    line = assert_one_line_error(result, str(data), expected)
    assert "data.source" in line
    if case == "one-huge-document":
        assert "data.validation_split" in line and "more documents" in line
    if case == "latin-1":
        assert "UTF-8" in line.split("is not UTF-8", 1)[1]  # and says what to re-save it as


@pytest.mark.parametrize("override, key, expected", [
    ("data.max_validation_blocks=0", "data.max_validation_blocks", "at least 1 or null"),
    ("optim.lr=.inf", "optim.lr", "finite"),
    ("optim.lr=.nan", "optim.lr", "finite"),
    ("optim.lr=1e999", "optim.lr", "finite"),
    ("optim.lr=0", "optim.lr", "positive"),
    ("optim.weight_decay=-0.1", "optim.weight_decay", "at least 0"),
    ("optim.eps=-1e-8", "optim.eps", "at least 0"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val", "at least 0 or null"),
    ("fusion.temperature=-.inf", "fusion.temperature", "finite"),
    ("fusion.span=0", "fusion.span", "at least 1"),
])
def test_out_of_range_recipe_values_are_one_line_errors(override, key, expected, tmp_path, zoo_dir, cache_dir,
                                                        capsys):
    # `fusion.fit.main` in this process (the CLI's own entry point; a subprocess per case costs ~4 s of imports)
    code = fit_main(["--recipe", "clm.yaml", *tiny_overrides(tmp_path / "run", zoo_dir, cache_dir), override])
    err = capsys.readouterr().err
    assert_one_line_error(subprocess.CompletedProcess([], code, "", err), f"'{key}'", expected)
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_a_recipe_value_error_through_a_real_cli_process(tmp_path, zoo_dir, cache_dir):
    result = run_fit("--recipe", "clm.yaml", *tiny_overrides(tmp_path / "run", zoo_dir, cache_dir), "optim.lr=.inf")
    assert_one_line_error(result, "'optim.lr'", "finite")


def test_the_limits_still_accept_what_recipes_use(tmp_path, zoo_dir, cache_dir):
    for override in ("trainer.gradient_clip_val=null", "optim.weight_decay=0", "optim.eps=0", "optim.lr=3e-4"):
        recipe = load_recipe("clm.yaml", [*tiny_overrides(tmp_path, zoo_dir, cache_dir), override])
        assert recipe.optim.lr > 0
    for name in ("clm.yaml", "fusellm.yaml", "clm-llama2-7b.yaml", "fusellm-llama2-7b.yaml"):
        load_recipe(name, ["zoo.size=small", f"zoo.dir={zoo_dir}"])
