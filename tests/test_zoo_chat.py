"""The zoo's chat models: three template families on three tokenizers, standard HF folders that load and stop at the
end of a turn, built on first use only, into the zoo folder, once, deterministically, with their numbers recorded."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_build_waits_for_the_lock
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.chat_zoo import CHAT_BASES, CHAT_FOLDER, CHAT_JSON, CHAT_MODELS
from fusion.data.chat import ChatEncoder
from fusion.data.generate import greedy_generate
from fusion.data.skills import SKILLS, skill_conversations
from fusion.recipe import load_recipe
from fusion.zoo import ZOO_MODELS, build_chat, resolve_model, zoo_root

ROOT = Path(__file__).resolve().parent.parent
CONVERSATION = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is 4."},
                {"role": "user", "content": "Which module defines `copyfile`?"},
                {"role": "assistant", "content": "It is defined in `shutil`."}]
# What each family writes around a user turn and before an answer, in the models' own template.
FAMILIES = {
    "chat-target": ("llama-3", "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>",
                    "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "chat-gpt2-code": ("chatml", "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n", "<|im_start|>assistant\n",
                       "<|im_end|>"),
    "chat-neox-prose": ("openchat", "GPT4 Correct User: What is 2 + 2?<|end_of_turn|>", "GPT4 Correct Assistant:",
                        "<|end_of_turn|>"),
}


def copy_core(zoo_dir: Path, root: Path) -> Path:
    """A copy of the session's small zoo, core models only: the chat models built into it stay out of the zoo that
    the other tests use."""
    shutil.copytree(zoo_root("small", zoo_dir), zoo_root("small", root),
                    ignore=shutil.ignore_patterns("oracle*", ".oracle*", "chat*", ".chat*"))
    return zoo_root("small", root)


@pytest.fixture(scope="module")
def zoo(zoo_dir, tmp_path_factory) -> Path:
    return copy_core(zoo_dir, tmp_path_factory.mktemp("chat-zoo"))


@pytest.fixture(scope="module")
def chat(zoo) -> Path:
    assert not (zoo / CHAT_FOLDER).exists()  # a core build does not build them
    return build_chat("small", zoo.parent, progress=False)


@pytest.fixture(scope="module")
def record(chat) -> dict:
    return json.loads((chat / CHAT_JSON).read_text())


def load(chat: Path, name: str):
    return AutoTokenizer.from_pretrained(chat / CHAT_BASES[name]), AutoModelForCausalLM.from_pretrained(
        chat / CHAT_BASES[name])


def test_refs_resolve_to_the_chat_folder_without_touching_the_core(zoo_dir, zoo, chat):
    assert set(CHAT_MODELS) <= set(ZOO_MODELS)
    for name in CHAT_MODELS:
        assert resolve_model(f"zoo:{name}", "small", zoo.parent) == str(chat / CHAT_BASES[name])
    assert chat == zoo / CHAT_FOLDER and sorted(p.name for p in chat.iterdir()) == sorted([CHAT_JSON,
                                                                                        *CHAT_BASES.values()])
    core = zoo_root("small", zoo_dir)
    assert (zoo / "zoo.json").read_bytes() == (core / "zoo.json").read_bytes()
    for base in CHAT_BASES.values():
        assert (zoo / base / "model.safetensors").read_bytes() == (core / base / "model.safetensors").read_bytes()


@pytest.mark.parametrize("name", CHAT_MODELS)
def test_template_is_saved_and_round_trips_through_auto_tokenizer(chat, record, name):
    family, user_turn, generation_prompt, end_of_turn = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(chat / CHAT_BASES[name])
    config = json.loads((chat / CHAT_BASES[name] / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tokenizer.chat_template
    m = record["models"][name]
    assert (m["template_family"], m["end_of_turn"]) == (family, end_of_turn)

    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert user_turn in text and text.count(end_of_turn) == len(CONVERSATION)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(generation_prompt) and text.startswith(prompt)
    # One special token per marker, the end of turn the one generation stops at; the text decodes back.
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert ids.count(m["end_of_turn_id"]) == len(CONVERSATION)
    assert tokenizer.convert_ids_to_tokens(m["end_of_turn_id"]) == end_of_turn
    assert m["end_of_turn_id"] in tokenizer.all_special_ids
    assert tokenizer.decode(ids) == text
    plain = tokenizer.decode(ids, skip_special_tokens=True)
    assert all(message["content"] in plain for message in CONVERSATION) and end_of_turn not in plain
    # What chat training reads: the template's ids, labelled on the answers and their end-of-turn markers.
    encoded = ChatEncoder(tokenizer).encode(CONVERSATION)
    assert encoded.input_ids == ids
    assert [i for i, label in zip(ids, encoded.labels) if label == m["end_of_turn_id"]] == [m["end_of_turn_id"]] * 2


def test_the_three_templates_are_different_families(chat, record):
    families = {record["models"][name]["template_family"] for name in CHAT_MODELS}
    templates = {AutoTokenizer.from_pretrained(chat / CHAT_BASES[name]).chat_template for name in CHAT_MODELS}
    ends = {record["models"][name]["end_of_turn"] for name in CHAT_MODELS}
    assert len(families) == len(templates) == len(ends) == 3


@pytest.mark.parametrize("name", CHAT_MODELS)
def test_models_load_with_rows_for_the_new_tokens(zoo, chat, record, name):
    tokenizer, model = load(chat, name)
    base = AutoModelForCausalLM.from_pretrained(zoo / CHAT_BASES[name])
    m = record["models"][name]
    assert model.config.model_type == base.config.model_type
    assert model.config.vocab_size == m["config_vocab_size"] >= len(tokenizer) == m["vocab_size"]
    assert model.generation_config.eos_token_id == m["end_of_turn_id"]
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == model.config.vocab_size and torch.isfinite(embeddings).all()
    ids = torch.tensor([tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


@pytest.mark.parametrize("name", CHAT_MODELS)
def test_generate_stops_at_the_end_of_turn(chat, name):
    """Made the model's every next token (its logit raised by a hook on the output layer), the end of turn ends
    generation after one token, both in `greedy_generate` and in a plain ``generate`` that reads
    generation_config.json."""
    tokenizer, model = load(chat, name)
    end = model.generation_config.eos_token_id
    model.get_output_embeddings().register_forward_hook(lambda module, inputs, logits: logits.index_fill(-1,
                                                        torch.tensor([end]), 1e4))
    prompt = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    assert greedy_generate(model, [prompt], [end], tokenizer.pad_token_id, max_new_tokens=8) == [[end]]
    out = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=8)
    assert out[0, len(prompt):].tolist() == [end]


def test_a_trained_chat_model_ends_its_answers(chat):
    """Without help: the small neox chat model ends its short answers (arithmetic's) with its end of turn."""
    tokenizer, model = load(chat, "chat-neox-prose")
    end = model.generation_config.eos_token_id
    questions = skill_conversations("test", ("arithmetic",), 8)
    prompts = [tokenizer.apply_chat_template(c["messages"][:-1], tokenize=True, add_generation_prompt=True,
                                             return_dict=False) for c in questions]
    answers = greedy_generate(model, prompts, [end], tokenizer.pad_token_id, max_new_tokens=32, batch_size=5)
    assert all(len(a) <= 32 and end not in a[:-1] for a in answers)
    assert sum(a[-1] == end for a in answers) >= 6
    assert tokenizer.decode(answers[0], skip_special_tokens=True).strip().startswith("The answer is")


def test_greedy_generate_pads_on_the_left_without_changing_any_answer(chat):
    tokenizer, model = load(chat, "chat-gpt2-code")
    conversations = skill_conversations("test", size=3)
    prompts = [tokenizer.apply_chat_template(c["messages"][:-1], tokenize=True, add_generation_prompt=True,
                                             return_dict=False) for c in conversations]
    assert len({len(p) for p in prompts}) > 1  # some rows are padded
    alone = [greedy_generate(model, [p], [], tokenizer.pad_token_id, max_new_tokens=6)[0] for p in prompts]
    assert greedy_generate(model, prompts, [], tokenizer.pad_token_id, max_new_tokens=6, batch_size=4) == alone
    assert all(len(a) == 6 for a in alone)
    stop = alone[0][2]  # a stop id ends that answer at its first occurrence, which is kept
    cut = greedy_generate(model, prompts, [stop], tokenizer.pad_token_id, max_new_tokens=6, batch_size=4)
    assert cut == [a[:a.index(stop) + 1] if stop in a else a for a in alone]


def test_record_holds_each_models_numbers_per_skill(record):
    assert record["size"] == "small" and tuple(record["models"]) == CHAT_MODELS
    pivot = record["models"]["chat-target"]
    for name, m in record["models"].items():
        assert m["train_steps"] > 0 and abs(sum(m["train_mixture"].values()) - 1) < 1e-3
        assert set(m["accuracy"]) == set(m["perplexity"]) == set(SKILLS)
        assert all(0 <= m["accuracy"][s] <= 1 and m["perplexity"][s] > 1 for s in SKILLS)
        if name != "chat-target":  # the pivot is fine-tuned for fewer steps than the specialists
            assert m["train_steps"] > pivot["train_steps"]


def test_rebuild_is_bitwise_identical(zoo_dir, chat, record, tmp_path):
    rebuilt = build_chat("small", copy_core(zoo_dir, tmp_path).parent, progress=False)
    files = sorted(p.relative_to(chat) for p in chat.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(rebuilt) for p in rebuilt.rglob("*") if p.is_file())
    for file in files:
        if file.name != CHAT_JSON:
            assert (rebuilt / file).read_bytes() == (chat / file).read_bytes(), file
    assert without_times(json.loads((rebuilt / CHAT_JSON).read_text())) == without_times(record)


def without_times(record: dict) -> dict:
    return {**record, "build_seconds": 0, "models": {n: {**m, "build_seconds": 0} for n, m in record["models"].items()}}


def test_a_build_waits_for_the_lock_and_reuses_what_the_holder_built(zoo_dir, chat, tmp_path):
    final = copy_core(zoo_dir, tmp_path) / CHAT_FOLDER
    assert_build_waits_for_the_lock(lambda: build_chat("small", tmp_path, False), final, chat, CHAT_JSON)


def test_command_line_prints_the_table(zoo, chat, record):
    result = subprocess.run([sys.executable, "-m", "fusion.zoo", "--size", "small", "--dir", str(zoo.parent),
                             "--with-chat"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("chat-gpt2-code "))
    assert "chatml" in row and f"{record['models']['chat-gpt2-code']['perplexity']['code']:.2f}" in row


def test_recipes_accept_chat_refs_without_building_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_ZOO_DIR", str(tmp_path))
    recipe = load_recipe("fusellm.yaml", ["model.path=zoo:chat-target",
                                          "teachers=[{path: zoo:chat-gpt2-code, name: code}]"])
    assert recipe.model.path == "zoo:chat-target" and recipe.teachers[0].path == "zoo:chat-gpt2-code"
    assert not any(tmp_path.iterdir())  # checking a recipe builds nothing


FULL = zoo_root("full") / CHAT_FOLDER / CHAT_JSON


@pytest.mark.skipif(not FULL.is_file(), reason="the full chat zoo is not built (python -m fusion.zoo --with-chat)")
def test_full_size_specialists_beat_the_pivot_on_their_skills():
    """The recorded full-size numbers (built once by `python -m fusion.zoo --with-chat`, ~2 min): each specialist has
    the lowest perplexity of the three on its skills and answers them at least as often as the pivot, gpt2-code its
    code questions far more often; the pivot has room on every skill. (On arithmetic and stdlib the tiny models learn
    only trivial rules: see `fusion.chat_zoo`.)"""
    models = json.loads(FULL.read_text())["models"]
    pivot = models["chat-target"]
    for name, skills in {"chat-gpt2-code": ("code",), "chat-neox-prose": ("arithmetic", "stdlib")}.items():
        for skill in skills:
            assert models[name]["perplexity"][skill] < 0.5 * pivot["perplexity"][skill], (name, skill)
            assert models[name]["perplexity"][skill] == min(m["perplexity"][skill] for m in models.values())
            assert models[name]["accuracy"][skill] >= pivot["accuracy"][skill], (name, skill)
    assert models["chat-gpt2-code"]["accuracy"]["code"] >= pivot["accuracy"]["code"] + 0.5
    assert all(pivot["accuracy"][s] < 0.1 for s in SKILLS)
