"""The learning rate of the embedded CLM and FuseLLM recipes, swept: each compared at its own best rate.

    python -m fusion.experiments.lr_sweep wandb.mode=disabled     # 2 variants x 8 rates x 3 seeds, ~55 minutes

A baseline tuned worse than the method flatters the method. This trains ``clm`` and ``fusellm`` (the variants of
`fusion.experiments.fusellm_table`, with every setting of their recipes but ``optim.lr``) at every rate of
``--lrs`` and every seed, then reports per rate the held-out overall perplexity (mean ± sample std over seeds),
each variant's best rate, and the paired difference (per seed, in %) of ``fusellm`` at its best rate against
``clm`` at its best rate: the comparison a user who tunes both would see. Runs live in
``runs/lr-sweep/<rate>/<variant>-s<seed>`` (finished ones are skipped, and refused if made under other
settings: pass ``--runs`` with a new folder when adding overrides); the table, JSON and plot go to
``docs/results/lr-sweep.*``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from fusion.errors import FusionError
from fusion.experiments import fusellm_table
from fusion.report import write_table

VARIANTS = ("clm", "fusellm")
LRS = ("1e-3", "2e-3", "3e-3", "4e-3", "6e-3", "8e-3", "1.2e-2", "1.6e-2")


def sweep(lrs: list[str], seeds: list[int], runs: Path, overrides: list[str]) -> dict[str, dict[str, list[float]]]:
    """``{variant: {rate: overall perplexity per seed}}``, training what is missing."""
    results: dict[str, dict[str, list[float]]] = {name: {} for name in VARIANTS}
    for lr in lrs:
        fusellm_table._extra[:] = [*overrides, f"optim.lr={lr}"]
        for name in VARIANTS:
            results[name][lr] = [fusellm_table.run_variant(name, seed, runs / lr)["after"]["val/perplexity"]
                                 for seed in seeds]
    return results


def summarise(results: dict[str, dict[str, list[float]]]) -> dict:
    """Mean and std per variant and rate, each variant's best rate (lowest mean), and the paired difference of
    ``fusellm`` at its best against ``clm`` at its best."""
    table = {name: {lr: {"per_seed": v, "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                    for lr, v in by_lr.items()} for name, by_lr in results.items()}
    best = {name: min(by_lr, key=lambda lr: by_lr[lr]["mean"]) for name, by_lr in table.items()}
    return {"variants": table, "best_lr": best, "fusellm_best_vs_clm_best": fusellm_table.paired(
        table["clm"][best["clm"]]["per_seed"], table["fusellm"][best["fusellm"]]["per_seed"])}


def markdown(summary: dict) -> str:
    lrs = list(summary["variants"]["clm"])
    lines = ["| optim.lr | " + " | ".join(VARIANTS) + " | fusellm vs clm, paired (%) |", "|---|---|---|---|"]
    for lr in lrs:
        cells = []
        for name in VARIANTS:
            e = summary["variants"][name][lr]
            mark = " **(best)**" if summary["best_lr"][name] == lr else ""
            cells.append(f"{e['mean']:.2f} ± {e['std']:.2f}{mark}")
        d = fusellm_table.paired(*(summary["variants"][n][lr]["per_seed"] for n in VARIANTS))
        cells.append(f"{d['pct_mean']:+.1f} ± {d['pct_std']:.1f}")
        lines.append(f"| {lr} | " + " | ".join(cells) + " |")
    d = summary["fusellm_best_vs_clm_best"]
    lines.append(f"\nfusellm at {summary['best_lr']['fusellm']} against clm at {summary['best_lr']['clm']}, paired "
                 f"by seed: {d['pct_mean']:+.2f} ± {d['pct_std']:.2f} % (per seed "
                 f"{', '.join(f'{x:+.2f}' for x in d['pct_per_seed'])})"
                 + ("; beyond 2σ" if d["beyond_2std"] else "; within 2σ"))
    return "\n".join(lines)


def plot(summary: dict, out_file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, color in zip(VARIANTS, ("#4c72b0", "#dd8452")):
        by_lr = summary["variants"][name]
        ax.errorbar([float(lr) for lr in by_lr], [e["mean"] for e in by_lr.values()],
                    yerr=[e["std"] for e in by_lr.values()], label=name, color=color, marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("optim.lr")
    ax.set_ylabel("held-out overall perplexity (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion.experiments.lr_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", nargs="*", default=list(LRS), help="learning rates, written as in the run folders")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/lr-sweep", help="one folder per rate, holding the variants' runs")
    parser.add_argument("--out", default="docs/results", help="where lr-sweep.md/.json/.png are written")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="applied to every run")
    args = parser.parse_args(argv)
    try:
        for lr in args.lrs:
            float(lr)
    except ValueError:
        print(f"error: --lrs: {lr!r} is not a number; write rates like 4e-3", file=sys.stderr)
        return 2
    try:
        summary = summarise(sweep(args.lrs, args.seeds, Path(args.runs), args.overrides))
    except FusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = " ".join(["python -m fusion.experiments.lr_sweep", *args.overrides, "--lrs", *args.lrs,
                        "--seeds", *map(str, args.seeds), *fusellm_table.folder_options(parser, args)])
    header = (f"Held-out overall perplexity of `clm` and `fusellm` (the embedded recipes, all else unchanged) per "
              f"learning rate, mean ± sample std over seeds {', '.join(map(str, args.seeds))} (`{command}`)\n\n")
    out = Path(args.out)
    write_table(out, "lr-sweep", header, markdown(summary), {"command": command, **summary})
    plot(summary, out / "lr-sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
