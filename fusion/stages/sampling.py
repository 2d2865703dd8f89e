"""The stages that sample chat models and score their responses (FuseChat-3.0's data; a tool of its own).

    sample   n responses per prompt from every model of `sampling.models`, each with its own template and decoding
             settings, into ``samples/<model>-<key>/shard-*.jsonl`` (`fusion.data.responses`)
    score    rule verifiers and a reward model over every response, into ``scores-<key>-*.jsonl`` next to each shard
             (`fusion.data.rewards`); per model and skill the pass rate, the best-of-n pass rate and the mean
             reward, printed and written as ``sampling.md`` and ``pass_rates.png``

Both work shard by shard: a re-run (after a crash, or with a model added) computes only the shards without a file.
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean

import torch

from fusion.data.prepare import uses_gpu
from fusion.data.representations import model_fingerprint, resolve_dtype
from fusion.data.responses import SAMPLE_FORMAT, ResponseStore, load_prompts, prompts_fingerprint, sample_responses
from fusion.data.rewards import read_scores, score_store, scores_key, scores_path
from fusion.report import plot_accuracy
from fusion.stages.base import Stage
from fusion.trainer import build_predict_trainer
from fusion.zoo import resolve_model

SAMPLING = ("sampling", "chat.skills", "chat.column", "data", "seed", "zoo.size")
SAMPLES_DIR = "samples"


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _store(model: dict) -> ResponseStore:
    return ResponseStore(Path(model["folder"]), model["prompts"], model["prompts_per_shard"])


class Sample(Stage):
    name = "sample"
    config = SAMPLING
    outputs = ("samples/<model>-<key>/shard-*.jsonl",)
    summary = "n responses per prompt from every sampling model, sharded and resumable"

    def describe(self, recipe) -> str:
        s = recipe.sampling
        models = ", ".join(f"{m.label} (T={m.temperature}, top-p {m.top_p}, rep {m.repetition_penalty}, "
                           f"<= {m.max_new_tokens} tokens)" for m in s.models)
        backend = s.backend
        if backend == "vllm":
            try:
                import vllm  # noqa: F401
            except ImportError:
                backend += " (not installed here: pip install -e '.[vllm]')"
        return f"{s.n} responses per prompt, backend {backend}: {models}"

    def damaged(self, ctx, result: dict) -> str | None:
        for label, model in result["models"].items():
            if missing := _store(model).missing():
                return f"{label}'s shards {missing[:5]} are missing"
        return None

    def run(self, ctx) -> dict:
        r = ctx.recipe
        s, gpu = r.sampling, uses_gpu(r)
        prompts = load_prompts(r)
        fingerprint = prompts_fingerprint(prompts)
        models = {}
        for sampler in s.models:
            path = resolve_model(sampler.path, r.zoo.size, r.zoo.dir)
            dtype = resolve_dtype(sampler.dtype, gpu)
            settings = {k: getattr(sampler, k) for k in ("template", "temperature", "top_p", "repetition_penalty",
                                                           "max_new_tokens")}
            identity = {"format": SAMPLE_FORMAT, "model": model_fingerprint(path), "dtype": dtype, "backend": s.backend,
                        "settings": settings, "n": s.n, "seed": r.seed, "prompts": fingerprint,
                        "prompts_per_shard": s.prompts_per_shard}
            store = ResponseStore.for_identity(ctx.dir / SAMPLES_DIR, sampler.label, identity, len(prompts),
                                               s.prompts_per_shard)
            sample_responses(s, sampler, path, prompts, store, r.seed,
                             lambda callbacks: build_predict_trainer(r, callbacks), dtype)
            _barrier()
            rows = store.all_rows()
            models[sampler.label] = {
                "path": path, "folder": str(store.folder), "prompts": len(prompts),
                "prompts_per_shard": s.prompts_per_shard, "responses": len(rows),
                "mean_tokens": round(mean(row["tokens"] for row in rows), 2),
                "finish_reasons": {reason: sum(row["finish_reason"] == reason for row in rows)
                                   for reason in ("stop", "length")}}
            if ctx.is_global_zero:
                m = models[sampler.label]
                print(f"[fusion] {sampler.label}: {m['responses']} responses, {m['mean_tokens']} tokens on average, "
                      f"{m['finish_reasons']['length']} cut at {sampler.max_new_tokens} tokens")
        return {"prompts": len(prompts), "prompt_fingerprint": fingerprint, "models": models}


class Score(Stage):
    name = "score"
    needs = ("sample",)
    config = ("scoring",)
    outputs = ("samples/<model>-<key>/scores-*.jsonl", "sampling.md", "pass_rates.png")
    summary = "verify every response (and score it with the reward model); pass rates per model and skill"

    def describe(self, recipe) -> str:
        c = recipe.scoring
        parts = ["rule verifiers"] if c.verify else []
        parts += [f"reward model {c.reward_model}"] if c.reward_model else []
        return f"score every response: {' + '.join(parts) or 'nothing (scoring.verify false, no reward model)'}"

    def damaged(self, ctx, result: dict) -> str | None:
        for label, model in ctx.record("sample")["models"].items():
            store = _store(model)
            if missing := [s for s in range(store.n_shards) if not scores_path(store, result["key"], s).exists()]:
                return f"the scores of {label}'s shards {missing[:5]} are missing"
        return None if (ctx.dir / "sampling.md").is_file() else "sampling.md is missing"

    def run(self, ctx) -> dict:
        r, sampled = ctx.recipe, ctx.record("sample")
        c = r.scoring
        reward_path = resolve_model(c.reward_model, r.zoo.size, r.zoo.dir) if c.reward_model else None
        key = scores_key(c, model_fingerprint(reward_path) if reward_path else None)
        prompts = load_prompts(r)
        rank, world = _rank()
        dtype = resolve_dtype(c.dtype, uses_gpu(r))
        models = {}
        for label, model in sampled["models"].items():
            store = _store(model)
            score_store(store, prompts, c, key, reward_path, dtype,
                        lambda callbacks: build_predict_trainer(r, callbacks), rank, world)
            _barrier()
            models[label] = summarise(read_scores(store, key))
        result = {"key": key, "reward_model": c.reward_model, "models": models}
        if ctx.is_global_zero:
            table = format_scores(result)
            print(table)
            (ctx.dir / "sampling.md").write_text(f"# Sampled responses of {r.name}\n\n{table}\n")
            rates = {label: {skill: v["pass_rate"] for skill, v in m["skills"].items() if v["pass_rate"] is not None}
                     for label, m in models.items()}
            if any(rates.values()):
                plot_accuracy(rates, ctx.dir / "pass_rates.png", title=f"{r.name}: verified responses",
                              ylabel="responses that pass (%)")
        return result


def summarise(rows: list[dict]) -> dict:
    """Per skill (and over all): responses, the share that pass, the share of prompts with a passing one, the mean
    reward."""
    def stats(group: list[dict]) -> dict:
        checked = [row for row in group if row["passed"] is not None]
        by_prompt: dict[str, bool] = {}
        for row in checked:
            by_prompt[row["prompt_id"]] = by_prompt.get(row["prompt_id"], False) or row["passed"]
        rewards = [row["reward"] for row in group if row["reward"] is not None]
        return {"responses": len(group),
                "pass_rate": round(mean(row["passed"] for row in checked), 4) if checked else None,
                "best_of_n": round(mean(by_prompt.values()), 4) if by_prompt else None,
                "mean_reward": round(mean(rewards), 4) if rewards else None}

    skills = sorted({row["skill"] for row in rows if row["skill"] is not None})
    return {"skills": {skill: stats([row for row in rows if row["skill"] == skill]) for skill in skills},
            "all": stats(rows)}


def format_scores(result: dict) -> str:
    """The score record as a markdown table: a row per model and skill."""
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f} %"

    lines = ["| model | skill | responses | pass rate | best of n | mean reward |", "|---|---|---|---|---|---|"]
    for label, model in result["models"].items():
        for skill, v in [*model["skills"].items(), ("all", model["all"])]:
            reward = "-" if v["mean_reward"] is None else f"{v['mean_reward']:.3f}"
            lines.append(f"| {label} | {skill} | {v['responses']} | {pct(v['pass_rate'])} | {pct(v['best_of_n'])} | "
                         f"{reward} |")
    return "\n".join(lines)
