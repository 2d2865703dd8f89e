"""`fusechat`: FuseChat. One pairwise fusion per source, then a merge of the pairwise targets in parameter space.

    baseline -> accuracy -> pairs -> merge -> evaluate
                            (per source: representations -> alignment -> train -> export, in branches/LABEL/)

Each pair is a `chat-fusion` run of its own (`fusion.stages.subruns`): the pivot (`model.path`) trained with two
teachers, itself and one source of `teachers`, MinCE choosing between them per conversation. A pair resumes on its
own, a finished one is never redone, and a source added to the recipe costs its pair and a new merge. The pivot's
representations are computed once and read by every pair (the shared store, `fusion.data.prepare`). The merge
(`merge`: VaRM by default, as FuseChat v1; SCE as v2; or mergekit's methods) takes the pivot as its base; the
evaluation puts the pivot, every pairwise target and the merged model side by side.
"""

from __future__ import annotations

import copy

from fusion.config import MergeSettings, Recipe, TeacherConfig
from fusion.data.chat import chat_datamodule
from fusion.errors import FusionError
from fusion.merge.config import load_merge_config
from fusion.methods.chat_fusion import CHAT_TRAINING, ChatFusion, check_teachers
from fusion.methods.fusellm import fusion_plan
from fusion.methods.sft import check_chat
from fusion.stages.chat import Accuracy, FuseChatEvaluate
from fusion.stages.merging import Merge, merge_config
from fusion.stages.subruns import SubRuns
from fusion.stages.teachers import Alignment, ChatRepresentations
from fusion.stages.training import EVALUATION, ROWS_VERSION, Baseline, Export, Train

PIVOT = "pivot"  # the pivot's label among each pair's teachers


def pivot_teacher(recipe: Recipe) -> TeacherConfig:
    m = recipe.model
    return TeacherConfig(path=m.path, tokenizer=m.tokenizer, name=PIVOT, trust_remote_code=m.trust_remote_code,
                         attn_implementation=m.attn_implementation)


def pairs(recipe: Recipe) -> dict[str, Recipe]:
    """One `chat-fusion` recipe per source: the pivot trained with teachers [pivot, source]."""
    branches = {}
    for source in recipe.teachers:
        branch = copy.deepcopy(recipe)
        branch.method, branch.name = "chat-fusion", f"{recipe.name}-{source.label}"
        branch.teachers = [pivot_teacher(recipe), source]
        branch.merge = MergeSettings()  # not the pair's business: another merge must not make its folder refuse it
        branches[source.label] = branch
    return branches


class FuseChat(ChatFusion):
    name = "fusechat"
    summary = "FuseChat: the pivot fused with each source in its own run, the results merged in parameter space"
    outputs = "recipe.yaml, stages/, branches/LABEL/ (each pair's own run folder), model/ (merged), results.md"
    # A source added to (or dropped from) the recipe, or another merge: only its pair and the merge run again.
    open_keys = ("teachers", "merge")
    stages = (Baseline(config=(*EVALUATION, "chat")), Accuracy(),
              SubRuns(name="pairs", config=CHAT_TRAINING, branches=pairs, method=ChatFusion(),
                      stages=(ChatRepresentations(), Alignment(),
                              Train(needs=("alignment",), config=CHAT_TRAINING, version=ROWS_VERSION), Export()),
                      summary="one chat-fusion run per source, the pivot and that source as teachers"),
              Merge(), FuseChatEvaluate())

    def check(self, recipe: Recipe) -> None:
        check_teachers(recipe, self.name)
        if PIVOT in (t.label for t in recipe.teachers):
            raise FusionError(f"recipe key 'teachers': {PIVOT!r} is the pivot's label in every pair (the pivot, "
                              "model.path, is a teacher of each); list only the sources, or rename that one")
        check_chat(recipe)
        unknown = sorted(set(recipe.merge.model_parameters) - {t.label for t in recipe.teachers})
        if unknown:
            raise FusionError(f"recipe key 'merge.model_parameters.{unknown[0]}': no source is labelled so; use one "
                              f"of: {', '.join(t.label for t in recipe.teachers)}")
        if recipe.merge.method == "slerp" and len(recipe.teachers) != 2:
            raise FusionError(f"recipe key 'merge.method': slerp interpolates two pairwise targets, and this recipe "
                              f"has {len(recipe.teachers)} sources; use two, or another method")
        try:  # checked now, with the sources' labels for paths, rather than after the pairs have trained
            load_merge_config(merge_config(recipe, "pivot", {t.label: t.label for t in recipe.teachers}))
        except FusionError as err:
            raise FusionError(f"recipe key 'merge': {err}".replace("merge config: ", "")) from None

    def plan(self, recipe: Recipe) -> list[str]:
        m = recipe.merge
        listed = ", ".join(f"{PIVOT} + {t.label}" for t in recipe.teachers)
        settings = ", ".join(f"{k}={v!r}" for k, v in m.parameters.items()) or "defaults"
        return [f"pairs     {listed} (branches/LABEL/: a chat-fusion run each)",
                *fusion_plan(recipe, [pivot_teacher(recipe), *recipe.teachers])[1:],
                f"merge     {m.method} ({settings}), base: the pivot, dtype {m.dtype}"]

    def datamodule(self, ctx):
        """The held-out conversations, on which the pivot, the pairwise targets and the merged model are compared."""
        return chat_datamodule(ctx.recipe, ctx.tokenizer_path)
