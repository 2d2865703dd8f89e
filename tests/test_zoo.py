"""The embedded tiny zoo: standard HF folders, three tokenizer families, sources that know their domain,
idempotent, locked and deterministic builds, `zoo:` references."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_build_waits_for_the_lock
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.chat_zoo import CHAT_MODELS
from fusion.errors import FusionError
from fusion.zoo import ZOO_CORE, ZOO_MODELS, ZOO_VERSION, build_zoo, is_zoo_ref, resolve_model, zoo_root

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURES = {"target": "llama", "gpt2-code": "gpt2", "neox-prose": "gpt_neox"}
CODE = "def area(radius):\n    return 3.14159 * radius ** 2  # → m²\n"
PROSE = "Return the area of a circle.  The radius is given in metres; naïve callers pass strings."


@pytest.fixture(scope="module")
def zoo(zoo_dir) -> Path:
    """The small zoo that conftest's session fixture builds once into a temporary folder."""
    return build_zoo("small", zoo_dir, progress=False)


@pytest.fixture(scope="module")
def manifest(zoo) -> dict:
    return json.loads((zoo / "zoo.json").read_text())


def load(zoo: Path, name: str):
    return AutoTokenizer.from_pretrained(zoo / name), AutoModelForCausalLM.from_pretrained(zoo / name)


def test_manifest_describes_three_models_with_different_vocabularies(zoo, manifest):
    assert zoo == zoo_root("small", zoo.parent) and zoo.name == f"small-{ZOO_VERSION}"
    assert manifest["version"] == ZOO_VERSION and manifest["size"] == "small"
    assert isinstance(manifest["seed"], int) and len(manifest["corpus_fingerprint"]) == 16
    assert tuple(manifest["models"]) == ZOO_CORE and ZOO_MODELS == (*ZOO_CORE, "oracle", *CHAT_MODELS, "chat-reward")
    vocab = [m["vocab_size"] for m in manifest["models"].values()]
    families = [m["tokenizer_family"] for m in manifest["models"].values()]
    assert len(set(vocab)) == 3 and len(set(families)) == 3
    for m in manifest["models"].values():
        assert m["parameters"] > 10_000
        assert all(1 < m["val_perplexity"][d] < 2 * m["vocab_size"] for d in ("code", "prose"))
    neox = manifest["models"]["neox-prose"]
    assert neox["config_vocab_size"] > neox["vocab_size"] and neox["config_vocab_size"] % 64 == 0


def test_the_built_zoo_is_readable_by_every_user(zoo):
    # a shared cache: safetensors writes weights 0600, which other users (and containers) could not read
    for path in [zoo, *zoo.rglob("*")]:
        assert path.stat().st_mode & 0o004, path


@pytest.mark.parametrize("name", ZOO_CORE)
def test_each_folder_loads_with_the_auto_classes(zoo, manifest, name):
    tokenizer, model = load(zoo, name)
    config, entry = model.config, manifest["models"][name]
    assert config.model_type == ARCHITECTURES[name] and type(model).__name__ == entry["architecture"]
    assert tokenizer.is_fast and len(tokenizer) == entry["vocab_size"]
    assert config.vocab_size == entry["config_vocab_size"] >= len(tokenizer)
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
    assert config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert getattr(config, "max_position_embeddings", getattr(config, "n_positions", 0)) >= 512
    dropouts = {k: v for k, v in config.to_dict().items() if "drop" in k and isinstance(v, float)}
    assert dropouts and not any(dropouts.values())
    assert sum(p.numel() for p in model.parameters()) == entry["parameters"]


def test_target_tokenizer_is_sentencepiece_bpe_with_byte_fallback_and_bos(zoo):
    tokenizer, _ = load(zoo, "target")
    assert tokenizer.backend_tokenizer.model.__class__.__name__ == "BPE"
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    assert tokenizer.pad_token == "<unk>"
    vocab = tokenizer.get_vocab()
    assert all(f"<0x{b:02X}>" in vocab for b in range(256))
    ids = tokenizer(CODE)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
    assert any(t.startswith("▁") for t in tokens)
    assert "<0xC2>" in tokens and "<0xB2>" in tokens  # "²" is not in its alphabet: spelled in UTF-8 bytes
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == CODE


def test_gpt2_tokenizer_is_byte_level_bpe(zoo):
    tokenizer, _ = load(zoo, "gpt2-code")
    assert tokenizer.backend_tokenizer.model.__class__.__name__ == "BPE"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert sum(t.startswith("Ġ") for t in tokenizer.get_vocab()) > 50
    assert not any(t.startswith("▁") or t.startswith("<0x") for t in tokenizer.get_vocab())
    ids = tokenizer(PROSE)["input_ids"]
    assert tokenizer.eos_token_id not in ids  # nothing prepended or appended, as in GPT-2
    assert "Ġthe" in tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids) == PROSE


def test_neox_tokenizer_is_unigram_with_byte_fallback(zoo):
    tokenizer, model = load(zoo, "neox-prose")
    assert tokenizer.backend_tokenizer.model.__class__.__name__ == "Unigram"
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|padding|>")
    assert "<0xE2>" in tokenizer.get_vocab()
    ids = tokenizer(CODE)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert any(t.startswith("▁") and len(t) > 1 for t in tokens)
    assert "<0xE2>" in tokens  # "→": bytes, not <unk>
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == CODE
    # The padded rows of the output layer exist: logits are wider than the tokenizer.
    assert model(input_ids=torch.tensor([ids])).logits.shape[-1] == model.config.vocab_size > len(tokenizer)


def test_each_source_beats_the_target_on_its_own_domain(manifest):
    ppl = {name: m["val_perplexity"] for name, m in manifest["models"].items()}
    assert ppl["gpt2-code"]["code"] < 0.8 * ppl["target"]["code"]
    assert ppl["neox-prose"]["prose"] < 0.8 * ppl["target"]["prose"]
    assert ppl["gpt2-code"]["prose"] > ppl["target"]["prose"]  # a code model reads English badly


@pytest.mark.parametrize("name", ZOO_CORE)
def test_models_generate_new_tokens(zoo, name):
    tokenizer, model = load(zoo, name)
    inputs = tokenizer(["def main():\n", "The"], return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 6)
    assert out[:, -6:].max() < len(tokenizer)  # never a padded, untrained row
    assert all(isinstance(text, str) for text in tokenizer.batch_decode(out, skip_special_tokens=True))


def test_second_build_returns_at_once(zoo):
    before = (zoo / "zoo.json").stat().st_mtime_ns
    start = time.perf_counter()
    assert build_zoo("small", zoo.parent, progress=False) == zoo
    assert time.perf_counter() - start < 1.0
    assert (zoo / "zoo.json").stat().st_mtime_ns == before


def test_a_build_waits_for_the_lock_and_reuses_what_the_holder_built(zoo, tmp_path):
    assert_build_waits_for_the_lock(lambda: build_zoo("small", tmp_path, False), zoo_root("small", tmp_path), zoo,
                                    "zoo.json")


def test_rebuild_is_bitwise_identical_and_cleans_up_a_killed_build(zoo, manifest, tmp_path):
    final = zoo_root("small", tmp_path)
    stale = tmp_path / f".{final.name}.tmp-killed"  # what a killed build leaves behind
    (stale / "target").mkdir(parents=True)
    (final / "target").mkdir(parents=True)  # a folder without zoo.json is not a zoo
    assert build_zoo("small", tmp_path, progress=False) == final
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name, f"{final.name}.lock"]
    assert sorted(p.name for p in final.iterdir()) == sorted([*ZOO_CORE, "zoo.json"])  # no oracle: built on use
    for name in ZOO_CORE:
        for file in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (final / name / file).read_bytes() == (zoo / name / file).read_bytes(), f"{name}/{file}"
    assert json.loads((final / "zoo.json").read_text())["models"] == manifest["models"]


def test_resolve_model(zoo):
    assert resolve_model("zoo:target", "small", zoo.parent) == str(zoo / "target")
    assert resolve_model("zoo:neox-prose", "small", zoo.parent) == str(zoo / "neox-prose")
    for ref in ("gpt2", "/models/llama", "./zoo:target"):
        assert resolve_model(ref, "small", zoo.parent) == ref
    with pytest.raises(FusionError, match="zoo:target, zoo:gpt2-code, zoo:neox-prose, zoo:oracle"):
        resolve_model("zoo:unknown", "small", zoo.parent)
    assert is_zoo_ref("zoo:target") and not is_zoo_ref("target") and not is_zoo_ref("")


def test_zoo_root_and_sizes(tmp_path, monkeypatch):
    monkeypatch.delenv("FUSION_ZOO_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo_root() == tmp_path / "home" / ".cache" / "fusion" / "zoo" / f"full-{ZOO_VERSION}"
    monkeypatch.setenv("FUSION_ZOO_DIR", str(tmp_path / "env"))
    assert zoo_root("small") == tmp_path / "env" / f"small-{ZOO_VERSION}"
    assert zoo_root("small", tmp_path / "given") == tmp_path / "given" / f"small-{ZOO_VERSION}"
    for call in (lambda: zoo_root("huge"), lambda: build_zoo("medium", tmp_path),
                 lambda: resolve_model("zoo:target", "tiny", tmp_path)):
        with pytest.raises(FusionError, match="zoo.size must be 'full' or 'small', got"):
            call()
    assert not any(tmp_path.iterdir())  # nothing was created for a bad size


def test_command_line_prints_the_perplexity_table(zoo, manifest):
    result = subprocess.run([sys.executable, "-m", "fusion.zoo", "--size", "small", "--dir", str(zoo.parent)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert str(zoo) in lines[0]
    for name in ZOO_CORE:
        row = next(line for line in lines if line.startswith(name))
        assert f"{manifest['models'][name]['val_perplexity']['code']:.2f}" in row
    assert not any(line.startswith("oracle") for line in lines)  # only with --with-oracle (test_zoo_oracle)
    bad = subprocess.run([sys.executable, "-m", "fusion.zoo", "--size", "huge"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2  # a user error: one line, no traceback
    assert bad.stderr.strip() == "error: zoo.size must be 'full' or 'small', got 'huge'"
