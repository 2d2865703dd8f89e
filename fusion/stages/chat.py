"""The stages chat methods add: held-out skill accuracy before training, and an evaluation that reports it after.

    accuracy   greedy answers of the model before training to the embedded tasks' held-out questions, checked
    evaluate   the `training.Evaluate` stage, plus the same accuracy of the exported model: results.json holds
               {"accuracy": {"before": {skill: value}, "after": {skill: value}}, ...}; accuracy.png
"""

from __future__ import annotations

from fusion.chat_eval import SkillScores, skill_accuracy
from fusion.report import plot_accuracy
from fusion.stages.base import Stage
from fusion.stages.training import EVALUATION, Evaluate

# What a skill accuracy depends on: the model, the questions and the template they are asked with, how many.
ACCURACY = ("model", "chat", "evaluate", "zoo.size")


def skills_of(ctx) -> tuple[str, ...]:
    """The skills a run is evaluated on: those of the embedded chat tasks it trains on; none for other data."""
    return tuple(ctx.recipe.chat.skills) if ctx.recipe.data.source == "embedded" else ()


def measure(ctx, model_path: str) -> SkillScores:
    r = ctx.recipe
    e = r.evaluate
    return skill_accuracy(model_path, skills_of(ctx), r.chat.template, e.questions, e.max_new_tokens, e.batch_size,
                          r.model.trust_remote_code)


class Accuracy(Stage):
    name = "accuracy"
    config = ACCURACY
    summary = "greedy accuracy per skill on held-out questions, before training"

    def describe(self, recipe) -> str:
        if recipe.data.source != "embedded":
            return "skipped: per-skill accuracy needs the embedded chat tasks (data.source: embedded)"
        return self.summary

    def run(self, ctx) -> dict:
        if not (skills_of(ctx) and ctx.is_global_zero):  # one process asks; the others only wait for the record
            return {"accuracy": {}}
        scores = measure(ctx, ctx.model_path)
        return {"accuracy": scores.accuracy, "questions": scores.questions, "examples": scores.examples}


class ChatEvaluate(Evaluate):
    needs = ("baseline", "accuracy", "train", "export")
    config = (*EVALUATION, *ACCURACY)
    outputs = (*Evaluate.outputs, "accuracy.png")
    summary = "reload the export; perplexity and skill accuracy before and after; a generated sample"

    def more_results(self, ctx, exported: str) -> dict:
        before = ctx.record("accuracy")["accuracy"]
        if not before:
            return {}
        scores = measure(ctx, exported)
        accuracy = {"before": before, "after": scores.accuracy}
        plot_accuracy(accuracy, ctx.dir / "accuracy.png", title=ctx.recipe.name)
        return {"accuracy": accuracy, "answers": scores.examples}
