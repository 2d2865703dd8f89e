"""The stages every causal-LM method ends with: baseline → train → export → evaluate.

    baseline   validation perplexity of the model before training
    train      Lightning fit; resumes from checkpoints/last.ckpt; ends with checkpoints/final.ckpt
    export     final.ckpt → model/ (Hugging Face folder: config, safetensors, tokenizer)
    evaluate   reload model/ with from_pretrained, validation perplexity, a generated sample,
               results.json / results.md / curves.png
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from fusion.data.text import load_tokenizer
from fusion.errors import FusionError
from fusion.export import export_checkpoint
from fusion.interrupt import Interrupted, StopAtSafePoint, requested, safe_points
from fusion.report import plot_curves, write_results
from fusion.stages.base import Stage
from fusion.trainer import build_trainer

# What a validation pass depends on: the model, the data, how it is run, and the module's code.
EVALUATION = ("model", "data", "trainer.accelerator", "trainer.precision", "trainer.batch_size", "seed", "zoo.size",
              "module_class", "module_args")
# The version of a Train stage that reads the chunk set's rows (clm, fusellm, chat fusion): 2 = the first epoch in
# the order every method shares (`fusion.data.rows`), so runs trained in the older order are stale, not reused.
ROWS_VERSION = 2
# What training depends on: everything but where results go and how they are logged.
TRAINING = ("model", "data", "teachers", "representations", "fusion", "optim", "trainer", "fsdp", "deepspeed", "seed",
            "module_class", "module_args", "zoo.size")


def validate(ctx, model_path: str, prefix: str, step: int) -> dict:
    """Validation perplexity of the HF model at ``model_path``, logged as ``PREFIX/val/...`` at ``step``."""
    loggers = ctx.loggers()  # first: a logger that cannot start fails before the work, not after it
    trainer = build_trainer(ctx.recipe, ctx.dir, loggers=[], training=False)
    trainer.validate(ctx.new_module(model_path), datamodule=ctx.datamodule, verbose=False)
    ctx.trainer = trainer
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    for logger in loggers:
        logger.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)
    return metrics


class Baseline(Stage):
    name = "baseline"
    config = EVALUATION
    outputs = ("metrics.jsonl",)
    summary = "validation perplexity of the model before training"

    def run(self, ctx) -> dict:
        return validate(ctx, ctx.model_path, "baseline", step=0)


class Train(Stage):
    name = "train"
    config = TRAINING
    outputs = ("checkpoints/last.ckpt", "checkpoints/final.ckpt", "metrics.jsonl", "wandb/")
    summary = "Lightning fit, resumable at the exact batch from its last checkpoint"

    start_from: str | None = None
    """A stage whose record's ``model`` (a folder in the run) training starts from, e.g. the SFT before DPO; None:
    `model.path`."""

    def run(self, ctx) -> dict:
        trainer = build_trainer(ctx.recipe, ctx.dir, ctx.loggers(), callbacks=ctx.extra_callbacks)
        ctx.trainer = trainer
        last = ctx.dir / "checkpoints" / "last.ckpt"
        module = ctx.new_module(starting_model(ctx, self.start_from))
        module.stage_key = ctx.stage_key
        # A checkpoint of a run under other settings (a changed recipe key or an earlier stage that ran again) is
        # not resumed: training starts over, and the next checkpoint replaces it.
        resume = last.exists() and checkpoint_stage_key(last) in (None, ctx.stage_key)
        if last.exists() and not resume:
            print(f"[fusion] {last} is from a run under other settings; training from the start")
        with safe_points():  # a first Ctrl-C / SIGTERM ends the fit after the step, with last.ckpt saved
            trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=str(last) if resume else None)
        stop = next(c for c in trainer.callbacks if isinstance(c, StopAtSafePoint))
        if stop.saved_at is not None:  # (a request after the last step lets the stage finish: see Run)
            raise Interrupted(requested(), f"training stopped; saved {last} at step {stop.saved_at}")
        if trainer.interrupted:
            raise FusionError(f"training was interrupted at step {trainer.global_step}; "
                              f"run the same command again to resume from {last}")
        final = ctx.dir / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(final, weights_only=True)
        # Paths in records are relative to the run folder, so that a moved folder still resumes.
        return {"global_step": trainer.global_step, "checkpoint": str(final.relative_to(ctx.dir))}

    def damaged(self, ctx, result: dict) -> str | None:
        final = ctx.dir / result["checkpoint"]
        return None if final.is_file() else f"{final} is missing"


def starting_model(ctx, stage: str | None) -> str:
    """The model a stage starts from: the folder ``stage``'s record names as its ``model``, or `model.path`."""
    return ctx.model_path if stage is None else str(ctx.dir / ctx.record(stage)["model"])


def checkpoint_stage_key(path) -> str | None:
    """The key of the train stage that wrote the checkpoint at ``path`` (None for checkpoints older than the key)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("fusion_stage_key")


class Export(Stage):
    name = "export"
    needs = ("train",)
    config = ("model",)
    outputs = ("model/",)
    summary = "the final weights as a Hugging Face folder (from_pretrained)"

    def run(self, ctx) -> dict:
        out = ctx.dir / "model"
        if ctx.is_global_zero:
            export_checkpoint(ctx.dir / ctx.record("train")["checkpoint"], ctx.model_path, ctx.tokenizer_path, out,
                              trust_remote_code=ctx.recipe.model.trust_remote_code)
        if ctx.trainer is not None:
            ctx.trainer.strategy.barrier("export")
        return {"path": str(out.relative_to(ctx.dir))}

    def damaged(self, ctx, result: dict) -> str | None:
        folder = ctx.dir / result["path"]
        weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin")] if folder.is_dir() else []
        intact = (folder / "config.json").is_file() and weights
        return None if intact else f"the export {folder} is missing or incomplete"


class Evaluate(Stage):
    name = "evaluate"
    needs = ("baseline", "train", "export")
    config = EVALUATION
    outputs = ("results.json", "results.md", "curves.png")
    summary = "reload the export; validation perplexity before and after; a generated sample"

    def run(self, ctx) -> dict:
        before, exported = ctx.record("baseline"), str(ctx.dir / ctx.record("export")["path"])
        after = validate(ctx, exported, "final", step=ctx.record("train")["global_step"])
        result = {"validation": {"before": before, "after": after}, "module": ctx.module_description()}
        if ctx.is_global_zero:
            result["sample"] = generate_sample(exported)
            result.update(self.more_results(ctx, exported))
            rows = {f"{ctx.recipe.model.path} (before)": before, f"{ctx.recipe.name} (after, exported)": after}
            extra = {k: v for k, v in result.items() if k not in ("validation", "module", "sample")}
            print("\n" + write_results(ctx.dir, rows, result["sample"], result["module"], extra))
            plot_curves(ctx.dir / "metrics.jsonl", ctx.dir / "curves.png")
        return result

    def more_results(self, ctx, exported: str) -> dict:
        """Results beyond perplexity (global rank 0; override in a subclass), added to the record and results.json."""
        return {}

    def damaged(self, ctx, result: dict) -> str | None:
        return None if (ctx.dir / "results.json").is_file() else f"{ctx.dir / 'results.json'} is missing"


def generate_sample(model_path: str, prompts: tuple[str, ...] = ("def", "The"), max_new_tokens: int = 40) -> str:
    """Sampled continuations of `prompts` by the HF model at `model_path`, reloaded from disk.

    Seeded top-k sampling, not greedy: greedy decoding of small models collapses into one
    repeated token (the zoo's target repeats an indentation token). The prompts end without a
    space: a trailing space marker alone is a rare token that leads small models astray.
    """
    tokenizer = load_tokenizer(model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
    samples = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.7,
                                 pad_token_id=tokenizer.pad_token_id)
        samples.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return "\n---\n".join(samples)
