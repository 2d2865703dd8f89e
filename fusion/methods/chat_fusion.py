"""`chat-fusion`: a chat model trained on conversations and on the fused top-k distributions of its teachers.

    representations -> alignment -> baseline -> accuracy -> train -> export -> evaluate

FuseChat's pairwise step is this with two teachers, the pivot itself and one source (`fusion.methods.fusechat` runs
one per source); its "Multi" baseline is this with the pivot and every source. Every teacher reads each training
conversation as the pivot's template renders it (`fusion.data.chat_chunks`); the loss, λ·CLM + (1−λ)·D(fused ‖
target), counts the assistant's tokens only, and MinCE at the sequence level picks, per conversation, the teacher
with the lowest CE on those tokens (`fusion.data.fused.trained_cross_entropy`; the first teacher listed wins ties,
as the pivot does in FuseChat). The module is FuseLLM's (`fusion.modules.fusellm.FuseLLMModule`): its loss is
computed in float32 chunks whatever the model's dtype (FuseChat asks for float32 CE, not bf16).
"""

from __future__ import annotations

from fusion.config import Recipe
from fusion.data.chat import chat_datamodule
from fusion.errors import FusionError
from fusion.methods.fusellm import FuseLLM, fusion_plan
from fusion.methods.sft import chat_source, check_chat
from fusion.stages.chat import ACCURACY, Accuracy, ChatEvaluate
from fusion.stages.teachers import Alignment, ChatRepresentations
from fusion.stages.training import EVALUATION, ROWS_VERSION, TRAINING, Baseline, Export, Train

CHAT_TRAINING = (*TRAINING, "chat")


def check_teachers(recipe: Recipe, method: str) -> None:
    """At least one teacher (the recipe loader checks that their names differ)."""
    if not recipe.teachers:
        raise FusionError(f"recipe key 'teachers': method {method!r} needs at least one teacher, "
                          "e.g. teachers: [{path: zoo:chat-gpt2-code}]")


class ChatFusion(FuseLLM):
    name = "chat-fusion"
    summary = "a chat model learns from its conversations and the fused top-k distributions of its teachers"
    stages = (ChatRepresentations(), Alignment(), Baseline(config=(*EVALUATION, "chat")), Accuracy(),
              Train(needs=("alignment",), config=CHAT_TRAINING, version=ROWS_VERSION),
              Export(), ChatEvaluate(config=(*EVALUATION, *ACCURACY)))

    def check(self, recipe: Recipe) -> None:
        check_teachers(recipe, self.name)
        check_chat(recipe)

    def describe_data(self, recipe: Recipe) -> str:
        c, source = recipe.chat, chat_source(recipe)
        template = "the recipe's chat template" if c.template else "the model's chat template"
        return (f"{source}; every model reads them rendered with {template}, at most {c.max_length} tokens; "
                "losses on the assistant's tokens")

    def plan(self, recipe: Recipe) -> list[str]:
        return fusion_plan(recipe, recipe.teachers)

    def validation_data(self, ctx):
        """The held-out conversations (`fusion.data.chat.ChatDataModule`)."""
        return chat_datamodule(ctx.recipe, ctx.tokenizer_path)
