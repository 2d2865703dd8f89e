"""The zoo's reward model: built on first use after the chat models, a standard HF sequence-classification folder with
the pivot's template, and a scorer that ranks a held-out reference answer above what the chat models get wrong."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fusion.chat_zoo import CHAT_BASES, CHAT_FOLDER
from fusion.data.generate import greedy_generate
from fusion.data.skills import SKILLS, skill_conversations
from fusion.data.verify import check_many
from fusion.reward_zoo import REWARD_FOLDER, REWARD_JSON
from fusion.zoo import ZOO_MODELS, resolve_model, zoo_root

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reward(zoo_dir) -> Path:
    return Path(resolve_model("zoo:chat-reward", "small", zoo_dir))


def test_it_is_built_into_the_chat_folder_with_the_pivots_tokenizer_and_template(zoo_dir, reward):
    assert "chat-reward" in ZOO_MODELS
    chat = zoo_root("small", zoo_dir) / CHAT_FOLDER
    assert reward == chat / REWARD_FOLDER and (reward / REWARD_JSON).is_file()
    pivot = AutoTokenizer.from_pretrained(chat / CHAT_BASES["chat-target"])
    tokenizer = AutoTokenizer.from_pretrained(reward)
    assert tokenizer.chat_template == pivot.chat_template and tokenizer.get_vocab() == pivot.get_vocab()
    model = AutoModelForSequenceClassification.from_pretrained(reward)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    record = json.loads((reward / REWARD_JSON).read_text())
    assert record["train"]["pairs"] > 0 and set(record["eval"]["pairwise_accuracy"]) == {
        "reference_over_failing_answer", "answer_over_another_tasks_answer"}
    assert resolve_model("zoo:chat-reward", "small", zoo_dir) == str(reward)  # a second request reuses it


@torch.no_grad()
def test_it_ranks_held_out_references_above_the_pivots_wrong_answers(zoo_dir, reward):
    """Held-out test questions the scorer never saw; the wrong answers are the untrained pivot's, which a random head
    would rank above the references about half the time."""
    pivot_path = zoo_root("small", zoo_dir) / CHAT_FOLDER / CHAT_BASES["chat-target"]
    tokenizer = AutoTokenizer.from_pretrained(pivot_path)
    pivot = AutoModelForCausalLM.from_pretrained(pivot_path)
    scorer = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    test = [c for s in SKILLS for c in skill_conversations("test", (s,), 12)]
    prompts = [tokenizer.apply_chat_template(c["messages"][:-1], add_generation_prompt=True, tokenize=True)
               for c in test]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    answers = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in greedy_generate(
        pivot, prompts, [pivot.generation_config.eos_token_id], tokenizer.pad_token_id, max_new_tokens=24)]
    passed = check_many((c["skill"], a, c["reference"]) for c, a in zip(test, answers))

    def score(conversation: dict, answer: str) -> float:
        ids = tokenizer.apply_chat_template(conversation["messages"][:-1] + [{"role": "assistant", "content": answer}],
                                            tokenize=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return float(scorer(input_ids=ids).logits[0, 0])

    wins = [score(c, c["messages"][-1]["content"]) > score(c, a) for c, a, ok in zip(test, answers, passed) if not ok]
    assert len(wins) >= 30 and sum(wins) / len(wins) >= 0.8, (sum(wins), len(wins))


def test_command_line_prints_its_held_out_accuracy(zoo_dir, reward):
    result = subprocess.run([sys.executable, "-m", "fusion.zoo", "--size", "small", "--dir", str(zoo_dir),
                             "--with-reward"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(reward) in result.stdout and "reference_over_failing_answer" in result.stdout
