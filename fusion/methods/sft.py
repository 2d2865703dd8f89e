"""`sft`: supervised fine-tuning of a chat model on the assistant's turns of conversations.

    baseline -> accuracy -> train -> export -> evaluate

The conversations are `data.source` rendered with `chat.template` (default: the tokenizer's own) and labelled on
the assistant's turns (`fusion.data.chat`); with ``data.source: embedded``, the embedded chat tasks
(`fusion.data.skills`), whose held-out questions give a per-skill accuracy before and after training.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fusion.config import Recipe
from fusion.data.chat import ChatDataModule, chat_datamodule
from fusion.data.skills import SKILLS
from fusion.errors import FusionError
from fusion.methods.base import Method
from fusion.modules.sft import SFTModule
from fusion.stages.chat import ACCURACY, Accuracy, ChatEvaluate
from fusion.stages.training import EVALUATION, TRAINING, Baseline, Export, Train


def check_chat(recipe: Recipe) -> None:
    """The `chat` and `evaluate` keys of a chat method's recipe."""
    c, e = recipe.chat, recipe.evaluate
    if c.max_length < 2:
        raise FusionError(f"recipe key 'chat.max_length': must be at least 2, got {c.max_length}")
    if recipe.data.source == "embedded" and (unknown := [s for s in c.skills if s not in SKILLS]):
        raise FusionError(f"recipe key 'chat.skills': the embedded chat tasks have skills {', '.join(SKILLS)}, "
                          f"not {', '.join(unknown)}")
    if recipe.data.source == "embedded" and not c.skills:
        raise FusionError("recipe key 'chat.skills': name at least one skill of the embedded chat tasks")
    template = c.template
    if template and "{{" not in template and "{%" not in template and not Path(template).expanduser().is_file():
        raise FusionError(f"recipe key 'chat.template': {template!r} is neither a Jinja template nor a file holding "
                          "one; give the template text, or fix the path")
    for key, value in (("evaluate.questions", e.questions), ("evaluate.max_new_tokens", e.max_new_tokens),
                       ("evaluate.batch_size", e.batch_size), ("evaluate.lm_eval_batch_size", e.lm_eval_batch_size)):
        if value < 1:
            raise FusionError(f"recipe key {key!r}: must be at least 1, got {value}")
    if e.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:  # before training, not after it
        raise FusionError("recipe key 'evaluate.lm_eval_tasks': lm-evaluation-harness is not installed; "
                          "pip install -e '.[lm-eval]', or remove the key")


def chat_source(recipe: Recipe) -> str:
    """Which conversations a chat method trains on and which it holds out, for the plan's ``data`` line."""
    d = recipe.data
    if d.source == "embedded":
        return f"the embedded chat tasks [{', '.join(recipe.chat.skills)}], held out: their test questions"
    return f"{d.source}, held out: split {d.validation_split!r} or {d.validation_fraction:.0%}"


class SFT(Method):
    name = "sft"
    summary = "supervised fine-tuning of a chat model on the assistant's turns"
    stages = (Baseline(config=(*EVALUATION, "chat")), Accuracy(), Train(config=(*TRAINING, "chat")), Export(),
              ChatEvaluate(config=(*EVALUATION, *ACCURACY)))
    module = SFTModule

    def check(self, recipe: Recipe) -> None:
        check_chat(recipe)

    def describe_data(self, recipe: Recipe) -> str:
        c, source = recipe.chat, chat_source(recipe)
        template = "the recipe's chat template" if c.template else "the tokenizer's chat template"
        return f"{source}; {template}, at most {c.max_length} tokens per conversation"

    def datamodule(self, ctx) -> ChatDataModule:
        return chat_datamodule(ctx.recipe, ctx.tokenizer_path)
