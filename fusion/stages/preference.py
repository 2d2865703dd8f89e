"""The stages FuseChat-3.0 and WRPO add between sampling and preference training.

    pairs       the scored source responses as SFT examples and DPO pairs (`fusion.data.pairs`): ``pairs/sft.jsonl``,
                ``pairs/preference.jsonl``, ``pairs.md`` (what was kept, what was dropped and why)
    sft         SFT of the target on the SFT examples, a sub-run in ``branches/sft/`` (its own checkpoints, resumable);
                its export, ``branches/sft/model``, is where preference training starts and its reference
    on-policy   WRPO: the SFT model samples `preference.samples` responses per preference prompt, scored like the
                sources'; with the best source response they make ``pairs/wrpo.jsonl`` (source_chosen, chosen,
                rejected)
    reference   the reference model (the one training starts from) scores every training row once:
                ``reference/logps.npy``, ``[rows, responses]``; nothing with ``preference.reference: online``
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from fusion.config import DataConfig, Recipe, SamplerConfig
from fusion.data.pairs import build, format_counts, group, in_sft_split, triples
from fusion.data.prepare import uses_gpu
from fusion.data.representations import model_fingerprint, resolve_dtype
from fusion.data.responses import (
    SAMPLE_FORMAT,
    ResponseStore,
    load_prompts,
    prompts_fingerprint,
    sample_responses,
    write_jsonl,
)
from fusion.data.rewards import read_scores, score_store, scores_key
from fusion.errors import FusionError
from fusion.stages.base import Stage
from fusion.stages.sampling import SAMPLES_DIR, _barrier, _rank, _store
from fusion.trainer import build_predict_trainer
from fusion.zoo import resolve_model

PAIRS_DIR = "pairs"
PAIRS = ("pairs", "seed")


def source_rows(ctx) -> list[dict]:
    """Every scored source response (the ``sample`` and ``score`` stages' stores)."""
    key = ctx.record("score")["key"]
    return [row for model in ctx.record("sample")["models"].values() for row in read_scores(_store(model), key)]


def sft_conversation(messages: list[dict], response: str) -> dict:
    return {"messages": [*messages, {"role": "assistant", "content": response}]}


class Pairs(Stage):
    name = "pairs"
    needs = ("score",)
    config = PAIRS
    outputs = ("pairs/sft.jsonl", "pairs/preference.jsonl", "pairs.md")
    summary = "the scored responses as SFT examples (the best across sources) and same-source DPO pairs"

    def describe(self, recipe: Recipe) -> str:
        p = recipe.pairs
        window = f"reward gap in [{p.min_margin}, {p.max_margin}]"
        source = "one source's best vs its worst" if p.same_source else "the best vs the worst across sources"
        return (f"{p.sft_share:.0%} of prompts to SFT (the best response), the rest to preference pairs ({source}, "
                f"{window}{'' if p.margin_on_verified else ' unless verified'}; correct vs incorrect where checked)")

    def damaged(self, ctx, result: dict) -> str | None:
        missing = [f for f in result["files"].values() if not (ctx.dir / f).is_file()]
        return f"{missing[0]} is missing" if missing else None

    def run(self, ctx) -> dict:
        r = ctx.recipe
        messages = {p["id"]: p["messages"] for p in load_prompts(r)}
        rows = source_rows(ctx)
        sft, preference, counts = build(rows, r.pairs, r.seed)
        files = {"sft": f"{PAIRS_DIR}/sft.jsonl", "preference": f"{PAIRS_DIR}/preference.jsonl"}
        if ctx.is_global_zero:
            (ctx.dir / PAIRS_DIR).mkdir(exist_ok=True)
            write_jsonl(ctx.dir / files["sft"], [{**sft_conversation(messages[row["prompt_id"]], row["response"]),
                                                  **row} for row in sft])
            write_jsonl(ctx.dir / files["preference"], [{"prompt": messages[row["prompt_id"]], **row}
                                                        for row in preference])
            text = format_counts(counts)
            print(f"[fusion] pairs from {r.sampling.n} samples per prompt of {len(r.sampling.models)} source(s):\n"
                  f"{text}")
            (ctx.dir / "pairs.md").write_text(f"# Training data of {r.name}\n\n" + "\n\n".join(text.splitlines()) +
                                              "\n")
        _barrier()  # the other ranks read the files next
        side = [prompt_id for prompt_id in group(rows) if not in_sft_split(prompt_id, r.pairs.sft_share, r.seed)]
        return {"files": files, "counts": counts, "preference_side": side}


def sft_recipe(recipe: Recipe, sft_file: Path) -> Recipe:
    """The SFT sub-run's recipe: method sft on ``sft_file`` (5 % held out), the `sft` section's optimizer and length,
    the rest of the recipe's trainer."""
    child = copy.deepcopy(recipe)
    child.method, child.name = "sft", f"{recipe.name}-sft"
    d = recipe.data
    child.data = DataConfig(source=str(sft_file), validation_split=None, cache_dir=d.cache_dir,
                            num_workers=d.num_workers, preprocessing_workers=d.preprocessing_workers)
    s = recipe.sft
    child.optim = copy.deepcopy(s.optim)
    t = child.trainer
    t.batch_size, t.accumulate_grad_batches, t.max_epochs, t.max_steps = \
        s.batch_size, s.accumulate_grad_batches, s.max_epochs, s.max_steps
    child.module_class, child.module_args = None, {}  # the recipe's module is the preference one
    return child


class SFTPhase(Stage):
    """SFT on the ``pairs`` stage's examples as a sub-run in ``branches/sft/``; its record names the export."""

    name = "sft"
    needs = ("pairs",)
    # The trainer keys the sub-run takes from the recipe (its batch and length are the `sft` section's): another
    # length or batch of the preference training must not retrain the SFT.
    config = ("model", "sft", "chat", "fsdp", "deepspeed", "seed", "zoo.size",
              *(f"trainer.{k}" for k in ("accelerator", "devices", "num_nodes", "strategy", "precision",
                                         "gradient_clip_val", "val_every_n_steps", "log_every_n_steps",
                                         "checkpoint_every_n_steps", "process_group_backend")))
    outputs = ("branches/sft/ (its own run folder)", "branches/sft/model/")
    summary = "SFT of the target on the best source responses (a sub-run)"
    stages: tuple = ()  # the sub-run's stages and its method (`fusion.methods.sft.SFT`), set by the method
    method = None

    def describe(self, recipe: Recipe) -> str:
        s = recipe.sft
        length = f"max_steps {s.max_steps}" if s.max_steps > 0 else f"{s.max_epochs} epoch(s)"
        return (f"SFT on the best source responses in branches/sft/: lr {s.optim.lr:g} {s.optim.schedule}, batch "
                f"{s.batch_size} x {s.accumulate_grad_batches}, {length}")

    def damaged(self, ctx, result: dict) -> str | None:
        return None if (ctx.dir / result["model"] / "config.json").is_file() else f"{result['model']} is missing"

    def run(self, ctx) -> dict:
        folder = ctx.dir / "branches" / "sft"
        marker = folder / "upstream.json"
        # The sub-run's own records know its recipe, not the pairs it read: a folder from other pairs starts anew.
        if marker.is_file() and json.loads(marker.read_text()) != ctx.stage_key and ctx.is_global_zero:
            print(f"[fusion] stage sft: {folder} was trained on other pairs or settings; starting it anew")
            shutil.rmtree(folder)
        if ctx.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(ctx.stage_key))
        _barrier()
        child = ctx.child("sft", sft_recipe(ctx.recipe, ctx.dir / ctx.record("pairs")["files"]["sft"]), self.stages,
                          self.method)
        child.run()
        export = child.record("export")["path"]
        return {"dir": "branches/sft", "model": f"branches/sft/{export}", "train": child.record("train")}


class OnPolicy(Stage):
    """WRPO's on-policy responses: the SFT model samples each preference prompt; with the best source response,
    the best and worst of them make the triples."""

    name = "on-policy"
    needs = ("pairs", "sft")
    config = ("preference.samples", "preference.temperature", "preference.max_new_tokens", "sampling.batch_size",
              "sampling.prompts_per_shard", "sampling.backend", "scoring", "pairs", "seed")
    outputs = ("samples/sft-<key>/", "pairs/wrpo.jsonl", "pairs.md")
    summary = "the SFT model samples each preference prompt; triples (best source, best own, worst own)"

    def describe(self, recipe: Recipe) -> str:
        p = recipe.preference
        return (f"the SFT model samples {p.samples} responses per preference prompt (T={p.temperature}, top-p 0.95, "
                f"<= {p.max_new_tokens} tokens), scored like the sources'; triples: the best source response, the best "
                "and the worst of them")

    def damaged(self, ctx, result: dict) -> str | None:
        return None if (ctx.dir / result["files"]["wrpo"]).is_file() else f"{result['files']['wrpo']} is missing"

    def run(self, ctx) -> dict:
        r = ctx.recipe
        s, p, c = r.sampling, r.preference, r.scoring
        ids = set(ctx.record("pairs")["preference_side"])  # every one: the target's own samples may pair where
        # the sources' did not
        prompts = [prompt for prompt in load_prompts(r) if prompt["id"] in ids]
        model = str(ctx.dir / ctx.record("sft")["model"])
        sampler = SamplerConfig(path=model, name="sft", temperature=p.temperature, top_p=0.95,
                                max_new_tokens=p.max_new_tokens, trust_remote_code=r.model.trust_remote_code)
        gpu = uses_gpu(r)
        dtype = resolve_dtype(sampler.dtype, gpu)
        identity = {"format": SAMPLE_FORMAT, "model": model_fingerprint(model), "dtype": dtype, "backend": s.backend,
                    "settings": {k: getattr(sampler, k) for k in ("temperature", "top_p", "max_new_tokens")},
                    "n": p.samples, "seed": r.seed, "prompts": prompts_fingerprint(prompts),
                    "prompts_per_shard": s.prompts_per_shard}
        store = ResponseStore.for_identity(ctx.dir / SAMPLES_DIR, "sft", identity, len(prompts), s.prompts_per_shard)
        settings = copy.deepcopy(s)
        settings.n = p.samples
        sample_responses(settings, sampler, model, prompts, store, r.seed,
                         lambda callbacks: build_predict_trainer(r, callbacks), dtype)
        reward_path = resolve_model(c.reward_model, r.zoo.size, r.zoo.dir) if c.reward_model else None
        key = scores_key(c, model_fingerprint(reward_path) if reward_path else None)
        rank, world = _rank()
        score_store(store, prompts, c, key, reward_path, resolve_dtype(c.dtype, gpu),
                    lambda callbacks: build_predict_trainer(r, callbacks), rank, world)
        _barrier()
        sources = [row for row in source_rows(ctx) if row["prompt_id"] in ids]
        rows, counts = triples(sources, read_scores(store, key), [prompt["id"] for prompt in prompts], r.pairs)
        messages = {prompt["id"]: prompt["messages"] for prompt in prompts}
        files = {"wrpo": f"{PAIRS_DIR}/wrpo.jsonl"}
        if ctx.is_global_zero:
            write_jsonl(ctx.dir / files["wrpo"], [{"prompt": messages[row["prompt_id"]], **row} for row in rows])
            text = format_counts({"wrpo triples": counts})
            print(f"[fusion] {text}")
            with (ctx.dir / "pairs.md").open("a") as f:
                f.write(f"\n{text}\n")
        _barrier()  # the other ranks read the file next
        own = read_scores(store, key)
        return {"files": files, "counts": counts, "samples": str(store.folder.relative_to(ctx.dir)),
                "pass_rate": round(sum(bool(row["passed"]) for row in own) / max(1, len(own)), 4)}


class _LogpsWriter(BasePredictionWriter):
    """Collects this rank's reference log-probs by row index."""

    def __init__(self, rows: int, responses: int) -> None:
        super().__init__(write_interval="batch")
        self.logps = np.full((rows, responses), np.nan)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        self.logps[prediction["index"].numpy()] = prediction["logps"].numpy()


class Reference(Stage):
    """The reference model's summed log-probs of every training row's responses, computed once."""

    name = "reference"
    config = ("model", "data", "chat", "preference.reference", "preference.max_prompt_length", "trainer.precision",
              "trainer.batch_size", "zoo.size")
    outputs = ("reference/logps.npy",)
    summary = "the reference model scores every training row's responses once (no second model while training)"
    start_from: str | None = None  # the stage whose record names the reference model (see `Train.start_from`)

    def describe(self, recipe: Recipe) -> str:
        if recipe.preference.reference == "online":
            return "skipped: preference.reference is online (a frozen copy runs beside the policy every step)"
        start = "the SFT model" if self.start_from else "model.path"
        return f"{start} scores every training row's responses once (no second model in memory while training)"

    def damaged(self, ctx, result: dict) -> str | None:
        path = result.get("path")
        return None if path is None or (ctx.dir / path).is_file() else f"{path} is missing"

    def run(self, ctx) -> dict:
        if ctx.recipe.preference.reference == "online":
            return {"path": None}
        from fusion.stages.training import starting_model

        dm = ctx.datamodule
        dm.prepare_data()
        dm.setup("predict")
        writer = _LogpsWriter(len(dm.train_set), len(dm.responses))
        trainer = build_predict_trainer(ctx.recipe, [writer], precision=ctx.recipe.trainer.precision)
        module = ctx.new_module(starting_model(ctx, self.start_from))
        trainer.predict(module, datamodule=dm, return_predictions=False)
        logps = torch.as_tensor(writer.logps)
        if trainer.world_size > 1:  # each rank scored its share, NaN elsewhere
            gathered = trainer.strategy.all_gather(logps.to(trainer.strategy.root_device)).cpu()
            logps = torch.where(torch.isnan(gathered), -torch.inf, gathered).max(0).values
        path = ctx.dir / "reference" / "logps.npy"
        if ctx.is_global_zero:
            if bad := int((~torch.isfinite(logps)).sum()):
                raise FusionError(f"the reference model gave {bad} non-finite log-probs of {logps.numel()} responses; "
                                  "check the model (it must load and run at trainer.precision)")
            path.parent.mkdir(exist_ok=True)
            np.save(path, logps.numpy())
        trainer.strategy.barrier("reference")
        return {"path": str(path.relative_to(ctx.dir)), "rows": len(dm.train_set),
                "mean_logps": [round(float(v), 4) for v in logps.mean(0)]}
