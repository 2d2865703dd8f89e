"""FuseChat-3.0's and WRPO's comparison in miniature, on the chat zoo: one command, one table, one plot.

    python -m fusion.experiments.fusechat3_table           # 3 seeds

Every model starts from the target ``zoo:chat-target`` (it knows the chat format and little else); the sources are
``recipes/fusechat3.yaml``'s, its prompts, samples and SFT settings for all:

    target             the target as it is
    target self-sft    SFT on the target's own best samples (fusechat3.yaml, the target its only source, SFT batch 4)
    sft                SFT on the sources' best samples (FuseChat-3.0's first stage)
    + dpo              then DPO (sigmoid, fusechat3.yaml's beta) on same-source pairs
    + ln-dpo           then length-normalised DPO (FuseChat-3.0's LN-DPO) on the same pairs, beta ``--ln-beta``
    + wrpo             then WRPO (wrpo.yaml: the SFT model's own samples, the sources' best weighted in, alpha 0 -> 0.1)
                       after the same SFT (fusechat3.yaml's samples and 4:6 split)
    wrpo alpha=0       the same with alpha 0: DPO on the SFT model's own best and worst samples (on-policy DPO)
    wrpo alpha=0.5     the same with alpha 0 -> 0.5: whether the sources' answers move the model once they weigh more
                       (at the papers' 0.1 alpha averages 0.05 over training)

Per model and seed: held-out accuracy per skill (greedy, checked), the held-out conversations' assistant-token
perplexity, and with ``scoring.reward_model`` the answers' mean reward. Mean and sample std over the seeds; paired
differences (per seed) of the mean accuracy for the papers' ordering WRPO > SFT + DPO > SFT > target, called real
only beyond 2 standard deviations. The variants that share samples and SFT run in one folder, one after another
(`fusechat3` and `wrpo` accept another loss or alpha in the same folder and re-run only what depends on it). Runs live
in ``runs/fusechat3-table/`` (a finished variant is kept as ``s<seed>/<variant>.json`` and reused, or refused with exit
2 if saved under other settings); the table and plot go to ``docs/results/`` (``fusechat3-table.md``, ``.json``,
``.png``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from fusion.config import to_dict
from fusion.errors import FusionError
from fusion.experiments.finished import stage_keys
from fusion.experiments.fusechat_table import OVERALL, score, summarise
from fusion.recipe import load_recipe
from fusion.report import plot_accuracy, write_table

SELF = "[{path: zoo:chat-target, temperature: 0.8, top_p: 0.95, max_new_tokens: 64}]"
# The papers' ordering, and the alpha that WRPO's source term needs to show, as (better, worse) pairs of rows.
ORDERING = (("+ wrpo", "+ dpo"), ("+ dpo", "sft"), ("sft", "target"), ("+ wrpo", "wrpo alpha=0"),
            ("+ ln-dpo", "+ dpo"), ("sft", "target self-sft"), ("wrpo alpha=0.5", "wrpo alpha=0"))


def fit(recipe: str, out: Path, overrides: list[str], save_as: Path) -> dict:
    """Run (or resume) ``recipe`` in ``out`` and keep its results.json, with what its training saw, as ``save_as``
    (the next variant in the same folder rewrites both); a saved file means the variant is done, if it was saved
    under the settings this command gives it (its stage keys; files saved before they were kept are taken as is)."""
    keys = stage_keys(recipe, [f"output_dir={out}", *overrides])
    if save_as.is_file():
        saved = json.loads(save_as.read_text())
        if saved.get("stage_keys", keys) != keys:
            raise FusionError(f"{save_as} holds a variant made with other settings than this command's; pass --runs "
                              f"with a new folder for these settings, or delete {save_as} to train it again")
        return saved
    args = [sys.executable, "-m", "fusion.fit", "--recipe", recipe, f"output_dir={out}", *overrides]
    print(f"[table] {' '.join(args[3:])}", flush=True)
    if subprocess.run(args).returncode != 0:
        raise FusionError(f"{out} failed; see the output above, then re-run to resume it")
    results = {**json.loads((out / "results.json").read_text()), "training": training_seen(out), "stage_keys": keys}
    save_as.write_text(json.dumps(results, indent=1))
    return results


def training_seen(out: Path) -> dict:
    """The run's data and its preference training's end: SFT examples, pairs (WRPO: triples), optimizer steps, and
    the reward accuracy and margin averaged over the last quarter of the logged steps of the folder's latest training
    (its rows since the step counter last went back: a training after another in the same folder, or the part after
    a resume, which re-logs the steps since its checkpoint; either way the end of the latest training)."""
    def result(stage: str) -> dict:
        return json.loads((out / "stages" / f"{stage}.json").read_text())["result"]

    counts = result("pairs")["counts"]
    triples = out / "stages" / "on-policy.json"
    examples = result("on-policy")["counts"]["kept"] if triples.is_file() else counts["preference"]["kept"]
    trained = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in row]
    start = max((i for i, row in enumerate(trained) if i == 0 or row["step"] <= trained[i - 1]["step"]), default=0)
    latest = trained[start:]
    tail = latest[-max(1, len(latest) // 4):]

    def mean(key: str) -> float | None:  # None: fewer steps than one logging interval
        return statistics.mean(row[key] for row in tail) if tail else None

    return {"sft_examples": counts["sft"]["kept"], "preference_examples": examples,
            "steps": result("train")["global_step"], "reward_accuracy": mean("train/rewards/accuracies"),
            "reward_margin": mean("train/rewards/margins")}


def row(results: dict, model: str, trained: bool = False) -> dict:
    """One model's accuracy, validation and reward from a run's results.json; ``trained``: and what its preference
    training saw."""
    return {"accuracy": results["accuracy"][model], "validation": results["validation"][model],
            "reward": (results.get("reward") or {}).get(model),
            **({"training": results["training"]} if trained else {})}


def one_seed(seed: int, runs: Path, extra: list[str], ln_beta: float) -> dict[str, dict]:
    base = [f"seed={seed}", *extra]
    folder = runs / f"s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    # the target answers ~1 % of the prompts right: its SFT set is a dozen conversations, smaller than a batch of 16
    own = fit("fusechat3.yaml", folder / "self", [*base, f"sampling.models={SELF}", "sft.batch_size=4"],
              folder / "self.json")
    dpo = fit("fusechat3.yaml", folder / "fusechat3", base, folder / "dpo.json")
    ln = fit("fusechat3.yaml", folder / "fusechat3", [*base, "preference.loss_type=sigmoid_norm",
                                                     f"preference.beta={ln_beta}"], folder / "ln-dpo.json")
    # WRPO after the very same SFT: fusechat3's sources, decoding and split (WRPO's own triples have no reward window).
    # Same settings and seed give the same sample key, so the wrpo folder starts with a copy of fusechat3's samples,
    # which sampling's per-shard resume takes as done, instead of drawing the same 24,000 answers again.
    models = json.dumps(to_dict(load_recipe("fusechat3.yaml", base))["sampling"]["models"])
    wrpo_base = [*base, "pairs.sft_share=0.4", f"sampling.models={models}"]
    for sampled in (folder / "fusechat3" / "samples").iterdir():
        if not (folder / "wrpo" / "samples" / sampled.name).exists():
            shutil.copytree(sampled, folder / "wrpo" / "samples" / sampled.name)
    wrpo = fit("wrpo.yaml", folder / "wrpo", wrpo_base, folder / "wrpo.json")
    alpha0 = fit("wrpo.yaml", folder / "wrpo", [*wrpo_base, "preference.alpha=0.0"], folder / "wrpo-alpha0.json")
    half = fit("wrpo.yaml", folder / "wrpo", [*wrpo_base, "preference.alpha=0.5"], folder / "wrpo-alpha0.5.json")
    return {"target": row(dpo, "target"), "target self-sft": row(own, "sft"), "sft": row(dpo, "sft"),
            "+ dpo": row(dpo, "fusechat3", True), "+ ln-dpo": row(ln, "fusechat3", True),
            "+ wrpo": row(wrpo, "wrpo", True), "wrpo alpha=0": row(alpha0, "wrpo", True),
            "wrpo alpha=0.5": row(half, "wrpo", True)}


def mean_reward(model_row: dict) -> float | None:
    """A model's mean reward over the skills (each skill's mean reward of its answers), None without a reward model."""
    return statistics.mean(model_row["reward"].values()) if model_row["reward"] else None


def claims(per_seed: dict[int, dict[str, dict]]) -> list[dict]:
    """`ORDERING` as paired differences (per seed) of the mean accuracy over skills, in percentage points, and where
    the runs had a reward model, of the mean reward."""
    def paired(diffs: list[float]) -> dict:
        mean, std = statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        return {"per_seed": diffs, "mean": mean, "std": std, "beyond_2std": len(diffs) > 1 and abs(mean) > 2 * std}

    out = []
    for better, worse in ORDERING:
        found = {"claim": f"{better} > {worse}",
                 **paired([100 * (score(per_seed[s][better], None) - score(per_seed[s][worse], None))
                           for s in per_seed])}
        rewards = [(mean_reward(per_seed[s][better]), mean_reward(per_seed[s][worse])) for s in per_seed]
        if all(None not in pair for pair in rewards):
            found["reward"] = paired([b - w for b, w in rewards])
        out.append(found)
    return out


def spread(values: list[float | None], digits: int) -> str:
    if None in values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def markdown(summary: dict[str, dict], per_seed: dict[int, dict[str, dict]], found: list[dict]) -> str:
    skills = [k for k in next(iter(summary.values())) if k not in ("mean", "perplexity", "reward")]
    rewards = all(per_seed[s][m]["reward"] for s in per_seed for m in summary)
    lines = ["| model | " + " | ".join(skills) + " | mean | perplexity |" + (" mean reward |" if rewards else ""),
             "|---" * (len(skills) + 3 + rewards) + "|"]
    for model, values in summary.items():
        cells = [f"{100 * values[s]['mean']:.1f} ± {100 * values[s]['std']:.1f}" for s in [*skills, "mean"]]
        ppl = values["perplexity"]
        cells.append(f"{ppl['mean']:.2f} ± {ppl['std']:.2f}")
        if rewards:
            cells.append(spread([mean_reward(per_seed[s][model]) for s in per_seed], 3))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "What each preference training saw, mean ± std over the seeds (reward accuracy and margin: over "
              "the last quarter of its logged steps):", "",
              "| model | SFT examples | pairs (WRPO: triples) | steps | reward accuracy | reward margin |",
              "|---|---|---|---|---|---|"]
    for model in summary:
        seen = [per_seed[s][model].get("training") for s in per_seed]
        if all(seen):
            cells = [spread([t[key] for t in seen], digits) for key, digits in (
                ("sft_examples", 0), ("preference_examples", 0), ("steps", 0), ("reward_accuracy", 2),
                ("reward_margin", 2))]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    def verdict(c: dict) -> str:
        return ("yes" if c["mean"] > 0 else "no, the reverse") if c["beyond_2std"] else "not beyond 2σ"

    lines += ["", "| ordering | paired difference of the mean accuracy (points) | holds? |"
              + (" of the mean reward | holds? |" if rewards else ""),
              "|---|---|---|" + ("---|---|" if rewards else "")]
    for c in found:
        cells = [f"{c['mean']:+.1f} ± {c['std']:.1f}", verdict(c)]
        if rewards:
            cells += [f"{c['reward']['mean']:+.3f} ± {c['reward']['std']:.3f}", verdict(c["reward"])]
        lines.append(f"| {c['claim']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion.experiments.fusechat3_table",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/fusechat3-table", help="where the runs' folders go")
    parser.add_argument("--out", default="docs/results", help="where fusechat3-table.md/.json/.png are written")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="seeds of every run")
    parser.add_argument("--ln-beta", type=float, default=2.0,
                        help="LN-DPO's beta: its log-ratios are per token, so it needs about the response length "
                             "times DPO's (FuseChat-3.0: 10 against 0.01 at 8B)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="applied to every run")
    args = parser.parse_args(argv)
    try:
        runs, out = Path(args.runs), Path(args.out)
        per_seed = {seed: one_seed(seed, runs, args.overrides, args.ln_beta) for seed in args.seeds}
        for rows in per_seed.values():  # `summarise` reads the overall perplexity only
            for r in rows.values():
                r["validation"] = {OVERALL: r["validation"][OVERALL]}
        summary, found = summarise(per_seed), claims(per_seed)
        recipe = load_recipe("fusechat3.yaml", args.overrides)
        command = " ".join(["python -m fusion.experiments.fusechat3_table", *args.overrides, "--seeds",
                            *map(str, args.seeds), "--ln-beta", str(args.ln_beta)])
        rewards = {model: [mean_reward(per_seed[s][model]) for s in per_seed] for model in summary}
        scored = all(None not in values for values in rewards.values())
        reward_note = (f", and the mean reward of the answers by {recipe.scoring.reward_model} (the mean of its "
                       "per-skill means)") if scored else ""
        header = (f"FuseChat-3.0 and WRPO in miniature: held-out accuracy (%) per skill ({recipe.evaluate.questions} "
                  f"questions each, greedy) and assistant-token perplexity{reward_note}, from zoo:chat-target, mean "
                  f"± sample std over seeds {', '.join(map(str, args.seeds))} (`{command}`)\n\n")
        if scored:
            for model, values in rewards.items():
                summary[model]["reward"] = {"per_seed": values, "mean": statistics.mean(values),
                                            "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        write_table(out, "fusechat3-table", header, markdown(summary, per_seed, found),
                    {"command": command, "models": summary, "orderings": found,
                     "per_seed": {str(s): rows for s, rows in per_seed.items()}})
        plot_accuracy({model: {skill: v["mean"] for skill, v in values.items() if skill not in ("perplexity", "reward")}
                       for model, values in summary.items()}, out / "fusechat3-table.png",
                      title="FuseChat-3.0 and WRPO in miniature (mean over seeds)")
    except FusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
