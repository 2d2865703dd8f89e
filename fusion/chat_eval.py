"""How often a chat model answers held-out questions right: per-skill accuracy on the embedded chat tasks.

Each test question of a skill (`fusion.data.skills`, split ``test``) is rendered with the run's chat template up to
the assistant's turn, answered greedily (`fusion.data.generate.greedy_generate`) and checked by the skill's verifier
(`fusion.data.verify.check_many`; code answers run in a sandboxed child process). An answer ends at the template's
end-of-turn marker, at the tokenizer's EOS, or after ``max_new_tokens``. Greedy, so that a number is a property of
the model and not of a sampling seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from fusion.data.chat import ChatEncoder
from fusion.data.generate import greedy_generate
from fusion.data.skills import skill_conversations
from fusion.data.text import load_tokenizer
from fusion.data.verify import check_many
from fusion.errors import FusionError, first_line


@dataclass
class SkillScores:
    accuracy: dict[str, float]  # skill -> share of its questions answered right
    questions: dict[str, int]  # skill -> questions asked
    examples: list[dict]  # the first question of each skill: its prompt, the answer, whether it was right
    answers: dict[str, list[dict]]  # skill -> every question as a conversation: its prompt and the model's answer


def end_of_turn(encoder: ChatEncoder) -> str:
    """The text a template writes after an assistant message (ChatML's ``<|im_end|>``), found by rendering one."""
    messages = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    text = encoder.render(messages)
    return text[text.rindex("pong") + len("pong"):].strip()


def stop_ids(encoder: ChatEncoder, own: int | list[int] | None) -> list[int]:
    """The ids that end an answer: the template's end-of-turn marker when it is one token, EOS, and the model's own
    (``own``: its ``generation_config.eos_token_id``)."""
    tokenizer, ids = encoder.tokenizer, set()
    marker = tokenizer.encode(end_of_turn(encoder), add_special_tokens=False) if end_of_turn(encoder) else []
    if len(marker) == 1:
        ids.add(marker[0])
    ids.update(own if isinstance(own, list) else [own] if own is not None else [])
    ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def skill_accuracy(model_path: str, skills: tuple[str, ...], template: str | None = None, questions: int = 200,
                   max_new_tokens: int = 64, batch_size: int = 64, trust_remote_code: bool = False) -> SkillScores:
    """Greedy accuracy of the HF chat model at ``model_path`` on ``questions`` held-out questions per skill."""
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    encoder = ChatEncoder(tokenizer, template)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code).to(device)
    except (OSError, ValueError) as err:
        raise FusionError(f"cannot load model {model_path!r}: {first_line(err)}") from None
    marker, stops = end_of_turn(encoder), stop_ids(encoder, model.generation_config.eos_token_id)
    accuracy, asked, examples, answered = {}, {}, [], {}
    for skill in skills:
        tasks = skill_conversations("test", (skill,), size=questions)
        prompts = [encoder.render(t["messages"][:-1], add_generation_prompt=True) for t in tasks]
        ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        answers = greedy_generate(model, ids, stops, tokenizer.pad_token_id, max_new_tokens, batch_size)
        texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        texts = [t.split(marker)[0].strip() if marker else t.strip() for t in texts]
        right = check_many((skill, text, t["reference"]) for text, t in zip(texts, tasks))
        accuracy[skill], asked[skill] = sum(right) / len(right), len(right)
        examples.append({"skill": skill, "prompt": tasks[0]["messages"][-2]["content"], "answer": texts[0],
                         "right": right[0]})
        answered[skill] = [t["messages"][:-1] + [{"role": "assistant", "content": text}]
                           for t, text in zip(tasks, texts)]
    return SkillScores(accuracy, asked, examples, answered)
