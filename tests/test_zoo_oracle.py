"""`zoo:oracle`: the target's tokenizer byte for byte and better than the target on both domains; built on
first use only, into the zoo folder, once, under a lock, deterministically."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_build_waits_for_the_lock
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.errors import FusionError
from fusion.recipe import load_recipe
from fusion.zoo import ORACLE_JSON, ZOO_CORE, build_oracle, resolve_model, zoo_root

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["def area(radius):\n    return 3.14159 * radius ** 2  # → m²\n",
         "Return the area of a circle.  The radius is given in metres; naïve callers pass strings.", ""]


def copy_core(zoo_dir: Path, root: Path) -> Path:
    """A copy of the session's small zoo, core models only: the oracle built into it stays out of the
    zoo that the other tests use (and the chat models other tests may have built stay out of the copy)."""
    shutil.copytree(zoo_root("small", zoo_dir), zoo_root("small", root),
                    ignore=shutil.ignore_patterns("oracle*", ".oracle*", "chat*", ".chat*"))
    return zoo_root("small", root)


@pytest.fixture(scope="module")
def zoo(zoo_dir, tmp_path_factory) -> Path:
    return copy_core(zoo_dir, tmp_path_factory.mktemp("oracle-zoo"))


@pytest.fixture(scope="module")
def oracle(zoo) -> Path:
    assert not (zoo / "oracle").exists()  # a core build does not build it (see also test_zoo's rebuild test)
    return Path(resolve_model("zoo:oracle", "small", zoo.parent))


def test_oracle_is_built_into_the_zoo_folder_without_touching_the_core(zoo_dir, zoo, oracle):
    assert oracle == zoo / "oracle" and (oracle / ORACLE_JSON).is_file()
    core = zoo_root("small", zoo_dir)
    assert (zoo / "zoo.json").read_bytes() == (core / "zoo.json").read_bytes()
    for name in ZOO_CORE:
        for file in (core / name).iterdir():
            assert (zoo / name / file.name).read_bytes() == file.read_bytes(), f"{name}/{file.name}"
    assert sorted(p.name for p in zoo.iterdir()) == sorted([*ZOO_CORE, "oracle", "oracle.lock", "zoo.json"])


def test_oracle_loads_and_tokenizes_exactly_as_the_target(zoo, oracle):
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (oracle / file).read_bytes() == (zoo / "target" / file).read_bytes()
    target_tokenizer, oracle_tokenizer = (AutoTokenizer.from_pretrained(p) for p in (zoo / "target", oracle))
    assert oracle_tokenizer.get_vocab() == target_tokenizer.get_vocab()
    for text in TEXTS:
        assert oracle_tokenizer(text)["input_ids"] == target_tokenizer(text)["input_ids"]
    target, model = (AutoModelForCausalLM.from_pretrained(p) for p in (zoo / "target", oracle))
    assert model.config.model_type == target.config.model_type == "llama"
    assert model.config.vocab_size == target.config.vocab_size == len(oracle_tokenizer)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, key) == getattr(target.config, key) == getattr(oracle_tokenizer, key)
    ids = torch.tensor([oracle_tokenizer(TEXTS[0])["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(oracle_tokenizer))
    out = model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_oracle_beats_the_target_on_both_domains(zoo, oracle):
    manifest = json.loads((oracle / ORACLE_JSON).read_text())
    core = json.loads((zoo / "zoo.json").read_text())
    assert manifest["val_perplexity_unit"] == core["val_perplexity_unit"]
    assert (manifest["size"], manifest["version"]) == (core["size"], core["version"])
    target = core["models"]["target"]
    assert manifest["tokenizer_family"] == target["tokenizer_family"]
    assert manifest["train_mixture"] == target["train_mixture"] and manifest["train_steps"] > 2 * target["train_steps"]
    for domain in ("code", "prose"):
        assert 1 < manifest["val_perplexity"][domain] < 0.9 * target["val_perplexity"][domain], domain


def test_a_second_resolve_reuses_it(zoo, oracle):
    before = (oracle / ORACLE_JSON).stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model("zoo:oracle", "small", zoo.parent) == str(oracle)
    assert build_oracle("small", zoo.parent, progress=False) == oracle
    assert time.perf_counter() - start < 1.0
    assert (oracle / ORACLE_JSON).stat().st_mtime_ns == before


def test_a_build_waits_for_the_lock_and_reuses_what_the_holder_built(zoo_dir, oracle, tmp_path):
    final = copy_core(zoo_dir, tmp_path) / "oracle"
    assert_build_waits_for_the_lock(lambda: build_oracle("small", tmp_path, False), final, oracle, ORACLE_JSON)


def test_rebuild_is_bitwise_identical_and_cleans_up_a_killed_build(zoo_dir, oracle, tmp_path):
    zoo = copy_core(zoo_dir, tmp_path)
    stale = zoo / ".oracle.tmp-killed"  # what a killed build leaves behind
    stale.mkdir()
    (zoo / "oracle").mkdir()  # a folder without oracle.json is not a finished oracle
    assert build_oracle("small", tmp_path, progress=False) == zoo / "oracle"
    assert not stale.exists()
    assert sorted(p.name for p in zoo.iterdir()) == sorted([*ZOO_CORE, "oracle", "oracle.lock", "zoo.json"])
    assert sorted(p.name for p in (zoo / "oracle").iterdir()) == sorted(p.name for p in oracle.iterdir())
    for file in oracle.iterdir():
        if file.name != ORACLE_JSON:
            assert (zoo / "oracle" / file.name).read_bytes() == file.read_bytes(), file.name
    rebuilt = json.loads((zoo / "oracle" / ORACLE_JSON).read_text())
    first = json.loads((oracle / ORACLE_JSON).read_text())
    assert rebuilt.pop("build_seconds") >= 0 and {**rebuilt, "build_seconds": first["build_seconds"]} == first


def test_command_line_builds_the_oracle_on_request(zoo, oracle):
    manifest = json.loads((oracle / ORACLE_JSON).read_text())
    result = subprocess.run([sys.executable, "-m", "fusion.zoo", "--size", "small", "--dir", str(zoo.parent),
                             "--with-oracle"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("oracle "))
    assert "LlamaForCausalLM" in row and f"{manifest['val_perplexity']['prose']:.2f}" in row


def test_recipes_accept_it_as_teacher_or_model_without_building_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_ZOO_DIR", str(tmp_path))
    recipe = load_recipe("fusellm.yaml", ["teachers=[{path: zoo:oracle, name: oracle}]", "model.path=zoo:oracle"])
    assert [t.path for t in recipe.teachers] == ["zoo:oracle"] and recipe.model.path == "zoo:oracle"
    with pytest.raises(FusionError, match="zoo:neox-prose, zoo:oracle"):
        load_recipe("fusellm.yaml", ["teachers=[{path: zoo:oracles, name: oracle}]"])
    assert not any(tmp_path.iterdir())  # checking a recipe builds nothing
