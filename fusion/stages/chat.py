"""The stages chat methods add: held-out skill accuracy before training, and an evaluation that reports it after.

    accuracy   greedy answers of the model before training to the embedded tasks' held-out questions, checked
    evaluate   the `training.Evaluate` stage, plus the same accuracy of the exported model: results.json holds
               {"accuracy": {"before": {skill: value}, "after": {skill: value}}, ...}; accuracy.png. With
               `scoring.reward_model`, also the mean reward of the answers: {"reward": {"before": ..., "after": ...}}.
               FuseChat's (`FuseChatEvaluate`): the pivot, each pairwise target and the merged model side by side
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from fusion.chat_eval import skill_accuracy
from fusion.data.prepare import uses_gpu
from fusion.data.representations import resolve_dtype
from fusion.data.rewards import reward_of
from fusion.report import plot_accuracy, plot_curves, write_results
from fusion.stages.base import Stage
from fusion.stages.merging import pair_exports
from fusion.stages.training import EVALUATION, Evaluate, generate_sample, validate
from fusion.trainer import build_predict_trainer
from fusion.zoo import resolve_model

# What a skill accuracy depends on: the model, the questions and the template they are asked with, how many.
ACCURACY = ("model", "chat", "evaluate", "zoo.size", "scoring.reward_model", "scoring.trust_remote_code",
            "scoring.max_length")


def skills_of(ctx) -> tuple[str, ...]:
    """The skills a run is evaluated on: those of the embedded chat tasks it trains on; none for other data."""
    return tuple(ctx.recipe.chat.skills) if ctx.recipe.data.source == "embedded" else ()


def measure(ctx, model_path: str) -> dict:
    """Per skill: held-out accuracy, and with `scoring.reward_model` the mean reward of the answers."""
    r = ctx.recipe
    e, c = r.evaluate, r.scoring
    scores = skill_accuracy(model_path, skills_of(ctx), r.chat.template, e.questions, e.max_new_tokens, e.batch_size,
                            r.model.trust_remote_code)
    result = {"accuracy": scores.accuracy, "questions": scores.questions, "examples": scores.examples}
    if c.reward_model:
        path = resolve_model(c.reward_model, r.zoo.size, r.zoo.dir)
        dtype = resolve_dtype(c.dtype, uses_gpu(r))
        result["reward"] = {skill: round(mean(reward_of(answers, path, c, dtype,
                                                        lambda callbacks: build_predict_trainer(r, callbacks))), 4)
                            for skill, answers in scores.answers.items()}
    return result


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
        return measure(ctx, ctx.model_path)


class ChatEvaluate(Evaluate):
    needs = ("baseline", "accuracy", "train", "export")
    config = (*EVALUATION, *ACCURACY)
    outputs = (*Evaluate.outputs, "accuracy.png")
    summary = "reload the export; perplexity and skill accuracy before and after; a generated sample"

    def more_results(self, ctx, exported: str) -> dict:
        before = ctx.record("accuracy")
        if not before["accuracy"]:
            return {}
        after = measure(ctx, exported)
        accuracy = {"before": before["accuracy"], "after": after["accuracy"]}
        plot_accuracy(accuracy, ctx.dir / "accuracy.png", title=ctx.recipe.name)
        results = {"accuracy": accuracy, "answers": after["examples"]}
        if "reward" in after:
            results["reward"] = {"before": before["reward"], "after": after["reward"]}
        if ctx.recipe.evaluate.lm_eval_tasks:
            results["lm_eval"] = lm_eval(exported, ctx.recipe)
        return results


def lm_eval(model_path: str, recipe) -> dict:
    """lm-evaluation-harness's metrics of the model at ``model_path`` on `evaluate.lm_eval_tasks`: {task: {metric:
    value}} (its own numbers, as users already compare them)."""
    import lm_eval as harness  # checked installed when the recipe loaded (`fusion.methods.sft.check_chat`)

    e = recipe.evaluate
    out = harness.simple_evaluate(model="hf", model_args=f"pretrained={model_path},trust_remote_code="
                                  f"{recipe.model.trust_remote_code}", tasks=list(e.lm_eval_tasks),
                                  batch_size=e.lm_eval_batch_size, apply_chat_template=True)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}


class CompareEvaluate(Stage):
    """Validation perplexity (assistant tokens) and skill accuracy of the starting model (the ``baseline`` and
    ``accuracy`` stages) and of each model `models` names, the last one the method's result; results.json holds
    ``{"validation": {model: metrics}, "accuracy": {model: {skill: value}}, ...}``."""

    name = "evaluate"
    config = (*EVALUATION, *ACCURACY)
    outputs = ("results.json", "results.md", "accuracy.png")
    start_label = "target"

    def models(self, ctx) -> dict[str, Path]:
        """The models to compare with the starting one, by name; the last is the method's result."""
        raise NotImplementedError

    def curves(self, ctx) -> list[Path]:
        """Run folders (sub-runs) whose ``metrics.jsonl`` gets a ``curves.png``."""
        return [ctx.dir]

    def run(self, ctx) -> dict:
        models = self.models(ctx)
        final = list(models.values())[-1]
        rows = {self.start_label: ctx.record("baseline")}
        for name, path in models.items():
            rows[name] = validate(ctx, str(path), name.replace(" ", "/"), step=0)
        result = {"validation": rows, "module": ctx.module_description()}
        if not ctx.is_global_zero:
            return result
        result["sample"] = generate_sample(str(final))
        before = ctx.record("accuracy")
        if before["accuracy"]:
            accuracy, reward = {self.start_label: before["accuracy"]}, {self.start_label: before.get("reward")}
            for name, path in models.items():
                measured = measure(ctx, str(path))
                accuracy[name], reward[name] = measured["accuracy"], measured.get("reward")
            result.update(accuracy=accuracy, answers=measured["examples"])  # the final model's
            if ctx.recipe.scoring.reward_model:
                result["reward"] = reward
            plot_accuracy(accuracy, ctx.dir / "accuracy.png", title=ctx.recipe.name)
        for folder in self.curves(ctx):
            plot_curves(folder / "metrics.jsonl", folder / "curves.png")
        extra = {k: v for k, v in result.items() if k not in ("validation", "module", "sample")}
        print("\n" + write_results(ctx.dir, rows, result["sample"], result["module"], extra))
        return result

    def damaged(self, ctx, result: dict) -> str | None:
        return None if (ctx.dir / "results.json").is_file() else f"{ctx.dir / 'results.json'} is missing"


class FuseChatEvaluate(CompareEvaluate):
    """FuseChat's evaluation: the pivot, each pairwise target and the merged model."""

    needs = ("baseline", "accuracy", "pairs", "merge")
    outputs = ("results.json", "results.md", "accuracy.png", "branches/LABEL/curves.png")
    summary = "perplexity and skill accuracy of the pivot, each pairwise target and the merged model"
    start_label = "pivot"

    def models(self, ctx) -> dict[str, Path]:
        pairs = {f"pair {label}": path for label, path in pair_exports(ctx).items()}
        return {**pairs, "merged": ctx.dir / ctx.record("merge")["path"]}

    def curves(self, ctx) -> list[Path]:
        return [path.parent for path in pair_exports(ctx).values()]


class PreferenceEvaluate(CompareEvaluate):
    """FuseChat-3.0's and WRPO's evaluation: the target, its SFT and the preference-trained model."""

    needs = ("baseline", "accuracy", "sft", "train", "export")
    outputs = ("results.json", "results.md", "accuracy.png", "curves.png", "branches/sft/curves.png")
    summary = "perplexity and skill accuracy of the target, the SFT model and the preference-trained model"

    def models(self, ctx) -> dict[str, Path]:
        return {"sft": ctx.dir / ctx.record("sft")["model"], ctx.recipe.method: ctx.dir / ctx.record("export")["path"]}

    def curves(self, ctx) -> list[Path]:
        return [ctx.dir, ctx.dir / ctx.record("sft")["dir"]]
