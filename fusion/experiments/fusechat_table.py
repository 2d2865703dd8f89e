"""The FuseChat paper's comparison in miniature, on the chat zoo: one command, one table, one plot.

    python -m fusion.experiments.fusechat_table           # 3 seeds, about 20 minutes per seed on 2 CPU cores

Every trained model starts from the pivot (``zoo:chat-target``) and trains for the same steps, batch and learning
rate (those of ``recipes/fusechat.yaml``) on the same conversations; only the teachers differ:

    pivot            the pivot as it is (the chat zoo's: it knows the format and little else)
    pivot-sft        ``recipes/sft.yaml`` with fusechat.yaml's steps: the assistant tokens alone, no teachers (the
                     paper's "CLM" row, what a user runs without fusion)
    multi            FuseLLM-style fusion of the pivot and both sources in one run (``method: chat-fusion``; the
                     paper's "Multi")
    pair SOURCE      each pairwise target of ``recipes/fusechat.yaml`` (the pivot and that source as teachers)
    merged METHOD    the pairwise targets merged: VaRM (fusechat.yaml's own), SCE (both semantics), task
                     arithmetic, TIES, DARE-TIES, SLERP and linear, the pivot as base (SLERP: halfway between them)
    source SOURCE    the sources themselves, asked through their own templates (not trained here)

Per model and seed: held-out accuracy per skill (greedy answers to ``evaluate.questions`` questions per skill,
checked) and assistant-token perplexity on the held-out conversations (the pivot's tokenizer; none for the sources,
whose tokenizers differ). Mean and sample std over the seeds; paired differences (per seed) of the mean accuracy
over skills for the paper's orderings, called real only beyond 2 standard deviations; and, for the first seed, the
straight line between the two pairwise targets (`interpolation`: whether they can be merged at all). Runs live in
``runs/fusechat-table/`` (re-running skips finished ones, and refuses one made under other settings); the
table and plot go to ``docs/results/`` (``fusechat-table.md``, ``.json``, ``.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fusion.chat_eval import skill_accuracy
from fusion.data.chat import IGNORE_INDEX, chat_datamodule, pad_batch
from fusion.errors import FusionError
from fusion.experiments.finished import check_same_settings
from fusion.merge.config import load_merge_config
from fusion.merge.stream import run_merge
from fusion.recipe import load_recipe
from fusion.report import write_table
from fusion.stages.merging import merge_config
from fusion.zoo import resolve_model

SOURCES = {"gpt2-code": "zoo:chat-gpt2-code", "neox-prose": "zoo:chat-neox-prose"}
MULTI = ("[{path: zoo:chat-target, name: pivot}, {path: zoo:chat-gpt2-code, name: gpt2-code}, "
         "{path: zoo:chat-neox-prose, name: neox-prose}]")
# The merges over the two pairwise targets, as FuseChat's configs set them for equal targets (`fusechat.md` §4).
MERGES = {
    "varm": {},  # fusechat.yaml's own: its run's `merged` row
    "sce": {"parameters": {"select_topk": 0.1}},
    "sce-fusechat": {"parameters": {"select_topk": 0.1, "sce_semantics": "fusechat"}},
    "task_arithmetic": {"parameters": {"weight": 1.0, "normalize": True}},
    "ties": {"parameters": {"weight": 1.0, "density": 0.5, "normalize": True}},
    "dare_ties": {"parameters": {"weight": 1.0, "density": 0.5, "normalize": True}},
    "slerp": {"parameters": {"t": 0.5}},
    "linear": {"parameters": {"weight": 0.5}},
}
OVERALL = "val/perplexity"


def fit(recipe: str, out: Path, overrides: list[str]) -> dict:
    """Train (or find) one run with ``python -m fusion.fit``; its results.json."""
    args = [sys.executable, "-m", "fusion.fit", "--recipe", recipe, f"output_dir={out}", *overrides]
    if (out / "stages" / "evaluate.json").exists():
        check_same_settings(out, recipe, args[5:])
    else:
        print(f"[table] {' '.join(args[3:])}", flush=True)
        if subprocess.run(args).returncode != 0:
            raise FusionError(f"{out} failed; see the output above, then re-run to resume it")
    return json.loads((out / "results.json").read_text())


@torch.no_grad()
def assistant_perplexity(model_path: str, recipe) -> dict[str, float]:
    """Perplexity on the assistant's tokens of the held-out conversations, per set and overall: what the runs'
    validation reports (summed NLL over tokens), for a model that was not trained by a run (a merge)."""
    conversations = chat_datamodule(recipe, model_path)
    conversations.prepare_data()
    conversations.setup("validate")
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    sums, result = [0.0, 0], {}
    for name, rows in conversations.validation_sets.items():
        nll, tokens = 0.0, 0
        for start in range(0, len(rows), 32):
            batch = pad_batch([rows[i] for i in range(start, min(start + 32, len(rows)))], conversations.pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            nll += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum").item()
            tokens += int((targets != IGNORE_INDEX).sum())
        result[f"{OVERALL}/{name}"] = math.exp(nll / tokens)
        sums = [sums[0] + nll, sums[1] + tokens]
    result[OVERALL] = math.exp(sums[0] / sums[1])
    return result


def evaluate(model_path: str, recipe, out: Path, perplexity: bool = True, template_of_model: bool = False) -> dict:
    """``{"accuracy": {skill: rate}, "validation": {...}}`` of a model no run evaluated, cached in ``out``."""
    if out.is_file():
        return json.loads(out.read_text())
    e = recipe.evaluate
    template = None if template_of_model else recipe.chat.template
    scores = skill_accuracy(model_path, tuple(recipe.chat.skills), template, e.questions, e.max_new_tokens,
                            e.batch_size)
    result = {"accuracy": scores.accuracy,
              "validation": assistant_perplexity(model_path, recipe) if perplexity else {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def one_seed(seed: int, runs: Path, extra: list[str]) -> dict[str, dict]:
    """Every trained model of one seed: ``{model: {"accuracy": {skill: rate}, "validation": {...}}}``."""
    base = [f"seed={seed}", *extra]
    fusechat_out = runs / f"fusechat-s{seed}"
    fused = fit("fusechat.yaml", fusechat_out, [f"name=fusechat-table-fusechat-s{seed}", *base])
    recipe = load_recipe("fusechat.yaml", base)
    steps, lr = recipe.trainer.max_steps, recipe.optim.lr
    same_budget = [f"trainer.max_steps={steps}", f"optim.lr={lr}", f"trainer.batch_size={recipe.trainer.batch_size}",
                   f"trainer.max_epochs={recipe.trainer.max_epochs}", f"optim.warmup_ratio={recipe.optim.warmup_ratio}"]
    sft = fit("sft.yaml", runs / f"pivot-sft-s{seed}", [f"name=fusechat-table-sft-s{seed}", *base, *same_budget])
    multi = fit("fusechat.yaml", runs / f"multi-s{seed}", [f"name=fusechat-table-multi-s{seed}", "method=chat-fusion",
                                                           f"teachers={MULTI}", *base])
    models = {"pivot-sft": {"accuracy": sft["accuracy"]["after"], "validation": _after(sft)},
              "multi": {"accuracy": multi["accuracy"]["after"], "validation": _after(multi)}}
    for label in SOURCES:
        models[f"pair {label}"] = {"accuracy": fused["accuracy"][f"pair {label}"],
                                   "validation": fused["validation"][f"pair {label}"]}
    models["merged varm"] = {"accuracy": fused["accuracy"]["merged"], "validation": fused["validation"]["merged"]}
    pivot = resolve_model(recipe.model.path, recipe.zoo.size, recipe.zoo.dir)
    targets = {label: str(fusechat_out / "branches" / label / "model") for label in SOURCES}
    for method, settings in MERGES.items():
        if method == "varm":
            continue
        folder = fusechat_out / "merges" / method
        if not (folder / "config.json").is_file():
            merge_recipe = load_recipe("fusechat.yaml", base)
            merge_recipe.merge.method, merge_recipe.merge.parameters = method.split("-")[0], settings["parameters"]
            run_merge(load_merge_config(merge_config(merge_recipe, pivot, targets)), folder, progress=False)
        models[f"merged {method}"] = evaluate(str(folder), recipe, folder / "evaluation.json")
    return models


def interpolation(runs: Path, seed: int, extra: list[str]) -> dict:
    """Why a merge of the pairwise targets can fall below both (the paper's regime is not the miniature's): the size
    of each target's update against the pivot's weights, the cosine between the two updates, and the assistant-token
    perplexity along the straight line from one target to the other (a barrier: the middle is worse than both ends)."""
    from safetensors.torch import load_file

    recipe = load_recipe("fusechat.yaml", [f"seed={seed}", *extra])
    fused = runs / f"fusechat-s{seed}"
    pivot = Path(resolve_model(recipe.model.path, recipe.zoo.size, recipe.zoo.dir))
    (a, b), base = [fused / "branches" / label / "model" for label in SOURCES], load_file(pivot / "model.safetensors")
    deltas = [torch.cat([(load_file(m / "model.safetensors")[k] - w).flatten() for k, w in base.items()])
              for m in (a, b)]
    weights = torch.cat([w.flatten() for w in base.values()])
    path = {}
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        folder = fused / "merges" / f"interpolate-{t}"
        if t in (0.0, 1.0):
            folder = a if t == 0.0 else b
        elif not (folder / "config.json").is_file():
            config = {"merge_method": "linear", "parameters": {"normalize": False},
                      "models": [{"model": str(a), "parameters": {"weight": 1 - t}},
                                 {"model": str(b), "parameters": {"weight": t}}]}
            run_merge(load_merge_config(config), folder, progress=False)
        path[str(t)] = assistant_perplexity(str(folder), recipe)[OVERALL]
    return {"seed": seed, "pivot_norm": weights.norm().item(), "update_norms": [d.norm().item() for d in deltas],
            "update_cosine": F.cosine_similarity(deltas[0], deltas[1], dim=0).item(), "perplexity_along_the_line": path}


def _after(results: dict) -> dict:
    (after,) = [v for k, v in results["validation"].items() if k.endswith("(after, exported)")]
    return after


def fixed_rows(runs: Path, seed: int, extra: list[str]) -> dict[str, dict]:
    """Models that do not depend on the seed: the pivot (from a run's records) and the sources."""
    recipe = load_recipe("fusechat.yaml", [f"seed={seed}", *extra])
    fused = json.loads((runs / f"fusechat-s{seed}" / "results.json").read_text())
    rows = {"pivot": {"accuracy": fused["accuracy"]["pivot"], "validation": fused["validation"]["pivot"]}}
    for label, path in SOURCES.items():
        model = resolve_model(path, recipe.zoo.size, recipe.zoo.dir)
        rows[f"source {label}"] = evaluate(model, recipe, runs / "sources" / f"{label}.json", perplexity=False,
                                           template_of_model=True)
    return rows


def mean_accuracy(row: dict) -> float:
    return statistics.mean(row["accuracy"].values())


def score(row: dict, skills: tuple[str, ...] | None) -> float:
    """The mean accuracy over ``skills`` (None: all)."""
    return statistics.mean(row["accuracy"][k] for k in skills) if skills else mean_accuracy(row)


def summarise(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Per model: per skill (and their mean) and perplexity, the per-seed values, mean and sample std."""
    seeds = list(per_seed)
    summary = {}
    for model in per_seed[seeds[0]]:
        rows = [per_seed[s][model] for s in seeds]
        columns = {skill: [r["accuracy"][skill] for r in rows] for skill in rows[0]["accuracy"]}
        columns["mean"] = [mean_accuracy(r) for r in rows]
        if rows[0]["validation"]:
            columns["perplexity"] = [r["validation"][OVERALL] for r in rows]
        summary[model] = {name: {"per_seed": values, "mean": statistics.mean(values),
                                 "std": statistics.stdev(values) if len(values) > 1 else 0.0}
                          for name, values in columns.items()}
    return summary


# Each source's own skills: a pairwise target should gain most on those of its source.
SOURCE_SKILLS = {"gpt2-code": ("code",), "neox-prose": ("arithmetic", "stdlib")}


def orderings(per_seed: dict[int, dict[str, dict]]) -> list[dict]:
    """The paper's orderings as paired differences (per seed) of the mean accuracy over skills, or over a source's
    own skills, in percentage points."""
    pairs = [f"pair {label}" for label in SOURCES]
    claims = [("merged varm", p, None) for p in pairs] + [(p, "pivot-sft", None) for p in pairs]
    claims += [("multi", "pivot-sft", None), ("merged varm", "multi", None)]
    claims += [(f"pair {label}", f"pair {other}", skills) for label, skills in SOURCE_SKILLS.items()
               for other in SOURCES if other != label]
    out = []
    for better, worse, skills in claims:
        diffs = [100 * (score(per_seed[s][better], skills) - score(per_seed[s][worse], skills)) for s in per_seed]
        mean, std = statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        claim = f"{better} > {worse}" + (f" on {' and '.join(skills)}" if skills else "")
        out.append({"claim": claim, "per_seed": diffs, "mean": mean, "std": std,
                    "beyond_2std": len(diffs) > 1 and abs(mean) > 2 * std})
    return out


def markdown(fixed: dict[str, dict], summary: dict[str, dict], claims: list[dict]) -> str:
    skills = [k for k in next(iter(summary.values())) if k not in ("mean", "perplexity")]
    lines = ["| model | " + " | ".join(skills) + " | mean | perplexity |", "|---" * (len(skills) + 3) + "|"]
    for model, row in fixed.items():
        cells = [f"{100 * row['accuracy'][s]:.1f}" for s in skills] + [f"{100 * mean_accuracy(row):.1f}"]
        ppl = row["validation"].get(OVERALL)
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {f'{ppl:.2f}' if ppl else '–'} |")
    for model, row in summary.items():
        cells = [f"{100 * row[s]['mean']:.1f} ± {100 * row[s]['std']:.1f}" for s in [*skills, "mean"]]
        ppl = row.get("perplexity")
        cells.append(f"{ppl['mean']:.2f} ± {ppl['std']:.2f}" if ppl else "–")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "| the paper's ordering | paired difference of the accuracy (points) | holds? |",
              "|---|---|---|"]
    for c in claims:
        verdict = ("yes" if c["mean"] > 0 else "no, the reverse") if c["beyond_2std"] else "not beyond 2σ"
        lines.append(f"| {c['claim']} | {c['mean']:+.1f} ± {c['std']:.1f} | {verdict} |")
    return "\n".join(lines)


def plot(fixed: dict[str, dict], summary: dict[str, dict], out_file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skills = [k for k in next(iter(summary.values())) if k != "perplexity"]
    names = list(fixed) + list(summary)
    fig, axes = plt.subplots(1, len(skills), figsize=(4.2 * len(skills), 0.32 * len(names) + 1.5), sharey=True)
    for ax, skill in zip(axes, skills):
        values = [100 * (mean_accuracy(fixed[n]) if skill == "mean" else fixed[n]["accuracy"][skill]) for n in fixed]
        values += [100 * summary[n][skill]["mean"] for n in summary]
        errors = [0.0] * len(fixed) + [100 * summary[n][skill]["std"] for n in summary]
        colors = ["#999999" if n in fixed else "#4c72b0" if n in ("pivot-sft", "multi") else
                  "#dd8452" if n.startswith("pair") else "#55a868" for n in names]
        ax.barh(names, values, xerr=errors, color=colors, capsize=3)
        ax.set_title(f"{skill} accuracy (%)")
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion.experiments.fusechat_table",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/fusechat-table", help="where the runs' folders go")
    parser.add_argument("--out", default="docs/results", help="where fusechat-table.md/.json/.png are written")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="seeds of every trained model")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                        help="applied to every run, e.g. trainer.max_steps=500")
    args = parser.parse_args(argv)
    try:
        runs, out = Path(args.runs), Path(args.out)
        per_seed = {seed: one_seed(seed, runs, args.overrides) for seed in args.seeds}
        fixed = fixed_rows(runs, args.seeds[0], args.overrides)
        summary, claims = summarise(per_seed), orderings(per_seed)
        line = interpolation(runs, args.seeds[0], args.overrides)
        recipe = load_recipe("fusechat.yaml", args.overrides)
        command = " ".join(["python -m fusion.experiments.fusechat_table", *args.overrides, "--seeds",
                            *map(str, args.seeds)])
        header = (f"FuseChat in miniature: held-out accuracy (%) per skill ({recipe.evaluate.questions} questions "
                  f"each, greedy) and assistant-token perplexity, after {recipe.trainer.max_steps} steps of "
                  f"{recipe.trainer.batch_size} conversations from zoo:chat-target, mean ± sample std over seeds "
                  f"{', '.join(map(str, args.seeds))} (`{command}`)\n\n")
        labels = " and ".join(SOURCES)
        table = markdown(fixed, summary, claims) + (
            f"\n\nThe pairwise targets {labels} of seed {line['seed']}: updates of norm "
            f"{' and '.join(f'{n:.1f}' for n in line['update_norms'])} against the pivot's weights' "
            f"{line['pivot_norm']:.1f}, cosine {line['update_cosine']:.2f} between them; assistant-token perplexity "
            f"from one to the other (t = 0 ... 1): "
            f"{', '.join(f'{v:.2f}' for v in line['perplexity_along_the_line'].values())}")
        write_table(out, "fusechat-table", header, table, {"command": command, "fixed": fixed, "models": summary,
                                                           "orderings": claims, "interpolation": line})
        plot(fixed, summary, out / "fusechat-table.png")
    except FusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
