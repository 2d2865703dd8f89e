"""A recipe's run: its folder, its stages, and what makes a re-run resume instead of starting over.

The CLM method runs four stages, each recorded in `stages/NAME.json` when it finishes:

    baseline   validation perplexity of the model before training
    train      Lightning fit; resumes from checkpoints/last.ckpt; ends with checkpoints/final.ckpt
    export     final.ckpt → model/ (Hugging Face folder: config, safetensors, tokenizer)
    evaluate   reload model/ with from_pretrained, validation perplexity, a generated sample,
               results.json / results.md / curves.png

FuseLLM runs two more first (`fusion.data.prepare`):

    representations  chunk the corpus, run every teacher (Trainer.predict), write its shards
    alignment        vocabulary maps and token alignments of each teacher to the target

A re-run skips finished stages. Under several processes every rank runs this file; files are
written by global rank 0 only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_only
from transformers import AutoModelForCausalLM

from fusion.data.fused import FusionDataModule
from fusion.data.prepare import align_teachers, extract_teachers, prepare_chunks, used_chunks
from fusion.data.text import TextDataModule, load_tokenizer
from fusion.errors import FusionError
from fusion.export import export_checkpoint
from fusion.loggers import JsonlLogger, build_wandb_logger
from fusion.recipe import Recipe, module_class, to_dict
from fusion.report import plot_curves, write_results
from fusion.trainer import build_predict_trainer, build_trainer
from fusion.zoo import resolve_model

STAGES = {
    "clm": ("baseline", "train", "export", "evaluate"),
    "fusellm": ("representations", "alignment", "baseline", "train", "export", "evaluate"),
}
# Keys that may change between a run and its resumption without changing what is computed.
_RESUMABLE_CHANGES = ("wandb.", "source_file", "data.num_workers", "data.preprocessing_workers")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def model_dtype(recipe: Recipe) -> str:
    """`model.dtype` with `auto` resolved: bf16 weights under bf16-true precision, else float32."""
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    return "bfloat16" if recipe.trainer.precision == "bf16-true" else "float32"


@dataclass
class Run:
    """One recipe's run folder and the objects its stages share."""

    recipe: Recipe
    extra_callbacks: list = field(default_factory=list)
    done: dict = field(default_factory=dict)
    trainer: pl.Trainer | None = None

    def __post_init__(self) -> None:
        self.dir = self.recipe.run_dir
        self.loggers: list | None = None
        self._datamodule: TextDataModule | None = None
        self._aligned: tuple | None = None  # (teachers, rates) of the alignment stage, for the data module
        z = self.recipe.zoo  # zoo:NAME paths build the zoo on first use
        self.model_path = resolve_model(self.recipe.model.path, z.size, z.dir)
        self.tokenizer_path = resolve_model(self.recipe.model.tokenizer or self.recipe.model.path, z.size, z.dir)

    # -- files ---------------------------------------------------------------------------------
    @property
    def is_global_zero(self) -> bool:
        return self.trainer.is_global_zero if self.trainer is not None else rank_zero_only.rank == 0

    def claim_folder(self) -> None:
        """Write recipe.yaml, or check that the folder's earlier run used the same recipe."""
        resolved = to_dict(self.recipe)
        saved_file = self.dir / "recipe.yaml"
        if saved_file.exists():
            saved = _flatten(yaml.safe_load(saved_file.read_text()))
            for key, value in _flatten(resolved).items():
                # a key missing from the saved recipe did not exist when it was written: not a difference
                if not key.startswith(_RESUMABLE_CHANGES) and key in saved and saved[key] != value:
                    raise FusionError(
                        f"{self.dir} holds a run of a different recipe ({key}: {saved.get(key)!r} there, "
                        f"{value!r} now); resume with the same recipe, or start anew with output_dir=runs/NEW_NAME")
        if self.is_global_zero:
            self.dir.mkdir(parents=True, exist_ok=True)
            saved_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
        stage_dir = self.dir / "stages"
        self.done = {p.stem: json.loads(p.read_text()) for p in stage_dir.glob("*.json")} if stage_dir.exists() else {}

    def finish_stage(self, name: str, result: dict) -> None:
        self.done[name] = result
        if self.is_global_zero:
            (self.dir / "stages").mkdir(parents=True, exist_ok=True)
            (self.dir / "stages" / f"{name}.json").write_text(json.dumps(result, indent=2))

    # -- shared objects ----------------------------------------------------------------------------
    def get_loggers(self) -> list:
        if self.loggers is None:
            self.loggers = [JsonlLogger(self.dir / "metrics.jsonl")]
            wandb_logger = build_wandb_logger(self.recipe.wandb, self.dir, self.recipe.name, to_dict(self.recipe))
            if wandb_logger is not None:
                self.loggers.append(wandb_logger)
        return self.loggers

    @property
    def datamodule(self) -> TextDataModule | FusionDataModule:
        if self._datamodule is None:
            r = self.recipe
            text = TextDataModule(r.data, self.tokenizer_path, r.trainer.batch_size, seed=r.seed,
                                  trust_remote_code=r.model.trust_remote_code)
            self._datamodule = text if r.method == "clm" else self._fusion_datamodule(text)
        return self._datamodule

    def _fusion_datamodule(self, validation: TextDataModule) -> FusionDataModule:
        r = self.recipe
        reps = self.done["representations"]
        teachers, rates = self._aligned or align_teachers(r, r.fusion.alignment, Path(reps["chunks"]),
                                                          reps["chunk_info"])
        bad = {c for rate in rates.values() for c in rate["bad_chunks"]}
        tokenizer = load_tokenizer(self.tokenizer_path, r.model.trust_remote_code)
        return FusionDataModule(Path(reps["chunks"]), teachers, reps["used_chunks"], bad, validation,
                                r.trainer.batch_size, r.seed, keep_exact_only=r.fusion.alignment == "exact",
                                pad_id=tokenizer.pad_token_id, num_workers=r.data.num_workers)

    def new_module(self, model_path: str, cls: type | None = None):
        r, dm = self.recipe, self.datamodule
        dm.prepare_data()
        dm.setup("fit")
        extra = {"fusion": r.fusion, "teacher_labels": tuple(t.label for t in r.teachers)} \
            if r.method == "fusellm" else {}
        return (cls or module_class(r))(
            model_path=model_path, optim=r.optim, dtype=model_dtype(r),
            gradient_checkpointing=r.model.gradient_checkpointing, attn_implementation=r.model.attn_implementation,
            trust_remote_code=r.model.trust_remote_code, validation_names=tuple(dm.validation_names), **extra)

    # -- stages ------------------------------------------------------------------------------------
    def evaluate(self, model_path: str, stage: str, step: int) -> dict:
        """Validation perplexity of the HF model at `model_path`, logged as `STAGE/val/...` at `step`."""
        trainer = build_trainer(self.recipe, self.dir, loggers=[], training=False)
        trainer.validate(self.new_module(model_path, cls=module_class(self.recipe)), datamodule=self.datamodule,
                         verbose=False)
        self.trainer = trainer
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        for logger in self.get_loggers():
            logger.log_metrics({f"{stage}/{k}": v for k, v in metrics.items()}, step=step)
        return metrics

    def representations(self) -> dict:
        r = self.recipe
        folder, chunks, info = prepare_chunks(r, load_tokenizer(self.tokenizer_path, r.model.trust_remote_code))
        teachers = extract_teachers(r, chunks, info, lambda callbacks: build_predict_trainer(r, callbacks))
        return {"chunks": str(folder), "chunk_info": info, "used_chunks": used_chunks(r, info), "teachers": teachers}

    def alignment(self) -> dict:
        r, reps = self.recipe, self.done["representations"]
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # the ranks share the missing shards, then everyone sees all of them
            align_teachers(r, r.fusion.alignment, Path(reps["chunks"]), reps["chunk_info"],
                           torch.distributed.get_rank(), torch.distributed.get_world_size())
            torch.distributed.barrier()
        self._aligned = align_teachers(r, r.fusion.alignment, Path(reps["chunks"]), reps["chunk_info"])
        rates = self._aligned[1]
        if self.is_global_zero:
            for label, rate in rates.items():
                print(f"[fusion] teacher {label}: {r.fusion.alignment} alignment falls back to the gold token at "
                      f"{rate['fallback_rate']:.1%} of {rate['positions']:,} positions; "
                      f"{len(rate['bad_chunks'])} chunks excluded (NaN/inf)")
        return {"mode": r.fusion.alignment, "teachers": rates}

    def baseline(self) -> dict:
        return self.evaluate(self.model_path, "baseline", step=0)

    def train(self) -> dict:
        trainer = build_trainer(self.recipe, self.dir, self.get_loggers(), callbacks=self.extra_callbacks)
        self.trainer = trainer
        last = self.dir / "checkpoints" / "last.ckpt"
        trainer.fit(self.new_module(self.model_path), datamodule=self.datamodule,
                    ckpt_path=str(last) if last.exists() else None)
        if trainer.interrupted:
            raise FusionError(f"training was interrupted at step {trainer.global_step}; "
                              f"run the same command again to resume from {last}")
        final = self.dir / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(final, weights_only=True)
        return {"global_step": trainer.global_step, "checkpoint": str(final)}

    def export(self) -> dict:
        out = self.dir / "model"
        if self.is_global_zero:
            export_checkpoint(Path(self.done["train"]["checkpoint"]), self.model_path, self.tokenizer_path, out,
                              trust_remote_code=self.recipe.model.trust_remote_code)
        if self.trainer is not None:
            self.trainer.strategy.barrier("export")
        return {"path": str(out)}

    def final_evaluation(self) -> dict:
        step = self.done["train"]["global_step"]
        final = self.evaluate(self.done["export"]["path"], "final", step=step)
        result = {"validation": {"before": self.done["baseline"], "after": final}}
        if self.is_global_zero:
            result["sample"] = generate_sample(self.done["export"]["path"])
            rows = {f"{self.recipe.model.path} (before)": self.done["baseline"],
                    f"{self.recipe.name} (after, exported)": final}
            print("\n" + write_results(self.dir, rows, result["sample"]))
            plot_curves(self.dir / "metrics.jsonl", self.dir / "curves.png")
        return result


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


def run(recipe: Recipe, extra_callbacks: list[pl.Callback] = ()) -> Run:
    """Run (or resume) every unfinished stage of the recipe."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked DataLoader workers otherwise warn
    pl.seed_everything(recipe.seed, workers=True, verbose=False)
    state = Run(recipe, list(extra_callbacks))
    state.claim_folder()
    steps = {"representations": state.representations, "alignment": state.alignment, "baseline": state.baseline,
             "train": state.train, "export": state.export, "evaluate": state.final_evaluation}
    stages = STAGES[recipe.method]
    todo = [name for name in stages if name not in state.done]
    for name in stages:
        if name not in todo:
            print(f"[fusion] stage {name}: already done, skipped")
            continue
        print(f"[fusion] stage {name}")
        state.finish_stage(name, steps[name]())
    for logger in state.loggers or []:  # None when every stage was already done
        logger.finalize("success")
    return state
