"""The FuseLLM paper's comparison in miniature, on the embedded zoo: one command, one table, one plot.

    python -m fusion.experiments.fusellm_table            # 3 variants x 3 seeds, ~20 minutes on 2 CPU cores

Every variant starts from the same target (``zoo:target``) and trains for the same steps and batch shape
(those of ``recipes/fusellm.yaml``); only the objective (or the data path) differs, and the learning rate, which
each recipe sets to its own best (`fusion.experiments.lr_sweep`; the fusion variants take ``fusellm.yaml``'s).
By default ``clm``, ``fusellm`` and ``kd-oracle``; ``--only`` picks any of

    clm                  ``recipes/clm.yaml``: the causal-LM loss, what a user runs without fusion (the paper's
                         "Llama-2 CLM"); every difference is measured against it. On the same seed it trains on
                         the same rows in the same batches as every fusion variant (`fusion.data.rows`), so a
                         paired difference measures the objective, not two draws of data
    clm-chunks           ``fusellm.yaml`` with lambda = 1 at ``clm.yaml``'s learning rate: the same loss, rate and
                         batches through the fusion module and loader
    fusellm              FuseLLM as the embedded default runs it (``recipes/fusellm.yaml``): target + both
                         sources, top-50, prefix alignment, MinCE per 32-token span, the top-k's tail as one
                         outcome
    fusellm-paper        the paper's objective on the same teachers: top-10 renormalised, MinED alignment,
                         MinCE per sequence, lambda 0.9
    fusellm-paper-avgce  the same with AvgCE (the paper's MinCE > AvgCE ordering)
    fusellm-paper-exact  the same with exact-match (EM) alignment (the paper's MinED > EM ordering)
    kd-oracle            the embedded default's objective with ``zoo:oracle`` as the only teacher, a stronger
                         model with the target's own tokenizer: no alignment loss at all, so it checks the
                         distillation path and bounds what aligned sources of that strength could give

and the variants that change one setting of ``fusellm`` at a time: ``fusellm-renormalise``, ``fusellm-top10``,
``fusellm-top100``, ``fusellm-t2`` (the teachers at temperature 2), ``fusellm-sequence``, ``fusellm-token``,
``fusellm-span8`` / ``-span128``, ``fusellm-mined``, ``fusellm-lambda0.9`` / ``0.5`` / ``0.3`` (and
``fusellm-lambda0.5-renormalise``: λ × tail; ``fusellm-lambda0.5-lr8e-3``: λ × rate); ``fusellm-route-domain``
(each document taught by the source of its domain: a bound on teacher selection,
`fusion.experiments.domain_routing`); ``fusellm-no-self`` (the two sources without the target as a teacher of
itself); ``kd-oracle-top10``; ``kd-gpt2-code`` / ``kd-neox-prose`` (one source alone).

Each variant runs with every seed of ``--seeds`` (the recipe's ``seed``: data order, initial shuffles,
anything random). Per variant: held-out perplexity per domain and overall (the validation blocks),
mean and sample standard deviation over the seeds, and the paired difference to ``clm`` per seed (in
%, negative = better; ``--against fusellm`` pairs every row with another variant instead, e.g. to compare
settings with the default); a difference is called real only beyond 2 standard deviations of the paired
differences. The initial target's and each source model's perplexities are tabulated beside them (a
source's on the same text: its summed NLL under its own tokenizer divided by the number of *target*
tokens, so all rows share one unit). ``--validation-blocks N`` scores every finished run's exported model (and
the fixed rows) on the first N held-out blocks per domain instead of the ``data.max_validation_blocks`` it
validated on: more held-out text, no training changed. Runs live in ``runs/fusellm-table/<variant>-s<seed>``
(re-running skips finished ones; one finished under other settings is refused, exit 2, rather than
reported under this command); the table and plot go to ``docs/results/`` (``fusellm-table.md``, ``.json``,
``.png``).
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
from transformers import AutoModelForCausalLM

from fusion.data.chunks import start_token_id
from fusion.data.text import TextDataModule, load_tokenizer
from fusion.errors import FusionError
from fusion.experiments.finished import check_same_settings
from fusion.recipe import load_recipe
from fusion.report import write_table
from fusion.zoo import resolve_model

TEACHERS = {
    "target": "{path: zoo:target, name: target}",
    "gpt2-code": "{path: zoo:gpt2-code, name: gpt2-code}",
    "neox-prose": "{path: zoo:neox-prose, name: neox-prose}",
}
ALL = f"[{TEACHERS['target']}, {TEACHERS['gpt2-code']}, {TEACHERS['neox-prose']}]"
ORACLE = "[{path: zoo:oracle, name: oracle}]"
# The paper's own objective (FuseLLM's settings, `recipes/fusellm-7b.yaml`): its MinCE > AvgCE and MinED > EM
# orderings are measured with these, whatever the embedded default has moved on to.
PAPER = ["representations.top_k=10", "fusion.alignment=mined", "fusion.level=sequence", "fusion.tail=renormalise",
         "fusion.clm_weight=0.9"]
VARIANTS = {  # name -> (recipe, overrides)
    "clm": ("clm.yaml", []),
    "clm-chunks": ("fusellm.yaml", ["fusion.clm_weight=1.0"]),
    "fusellm": ("fusellm.yaml", []),
    "fusellm-paper": ("fusellm.yaml", PAPER),
    "fusellm-paper-avgce": ("fusellm.yaml", [*PAPER, "fusion.function=avgce"]),
    "fusellm-paper-exact": ("fusellm.yaml", [*PAPER, "fusion.alignment=exact"]),
    "kd-oracle": ("fusellm.yaml", [f"teachers={ORACLE}"]),
    # with --only: what moves the result (see the README)
    "fusellm-renormalise": ("fusellm.yaml", ["fusion.tail=renormalise"]),
    "fusellm-top10": ("fusellm.yaml", ["representations.top_k=10"]),
    "fusellm-sequence": ("fusellm.yaml", ["fusion.level=sequence", "fusion.ce_unit=target_token"]),
    "fusellm-token": ("fusellm.yaml", ["fusion.level=token"]),
    "fusellm-span8": ("fusellm.yaml", ["fusion.span=8"]),
    "fusellm-span128": ("fusellm.yaml", ["fusion.span=128"]),
    "fusellm-mined": ("fusellm.yaml", ["fusion.alignment=mined"]),
    "fusellm-lambda0.9": ("fusellm.yaml", ["fusion.clm_weight=0.9"]),
    "fusellm-lambda0.5": ("fusellm.yaml", ["fusion.clm_weight=0.5"]),
    "fusellm-lambda0.3": ("fusellm.yaml", ["fusion.clm_weight=0.3"]),
    "fusellm-lambda0.5-lr8e-3": ("fusellm.yaml", ["fusion.clm_weight=0.5", "optim.lr=8.0e-3"]),
    "fusellm-top100": ("fusellm.yaml", ["representations.top_k=100"]),
    "fusellm-t2": ("fusellm.yaml", ["fusion.temperature=2.0"]),
    "fusellm-lambda0.5-renormalise": ("fusellm.yaml", ["fusion.clm_weight=0.5", "fusion.tail=renormalise"]),
    "kd-oracle-top10": ("fusellm.yaml", [f"teachers={ORACLE}", "representations.top_k=10"]),
    "fusellm-route-domain": ("fusellm.yaml", ["module_class=fusion.experiments.domain_routing.DomainRoutedFuseLLM"]),
    "fusellm-no-self": ("fusellm.yaml", [f"teachers=[{TEACHERS['gpt2-code']}, {TEACHERS['neox-prose']}]"]),
    "kd-gpt2-code": ("fusellm.yaml", [f"teachers=[{TEACHERS['gpt2-code']}]"]),
    "kd-neox-prose": ("fusellm.yaml", [f"teachers=[{TEACHERS['neox-prose']}]"]),
}
DEFAULT = ("clm", "fusellm", "kd-oracle")
SOURCES = ("gpt2-code", "neox-prose", "oracle")
KEYS = {"overall": "val/perplexity", "code": "val/perplexity/code", "prose": "val/perplexity/prose"}


def rate_override(name: str) -> list[str]:
    """clm-chunks checks the data path against clm: same loss, same rate (unless the table sets one for all)."""
    return [f"optim.lr={load_recipe('clm.yaml').optim.lr}"] if name == "clm-chunks" else []


def variant_command(name: str, seed: int, runs: Path) -> tuple[str, list[str]]:
    """The recipe and the overrides ``python -m fusion.fit`` is given for one variant at one seed."""
    recipe, overrides = VARIANTS[name]
    teachers = [] if recipe == "clm.yaml" or any(o.startswith("teachers=") for o in overrides) else [f"teachers={ALL}"]
    return recipe, [f"name=fusellm-table-{name}", f"output_dir={runs / f'{name}-s{seed}'}", f"seed={seed}", *teachers,
                    *rate_override(name), *_extra, *overrides]  # the variant has the last word


def run_variant(name: str, seed: int, runs: Path) -> dict:
    """Train (or find) one variant at one seed with ``python -m fusion.fit``; its before/after perplexities."""
    out = runs / f"{name}-s{seed}"
    recipe, overrides = variant_command(name, seed, runs)
    if (out / "stages" / "evaluate.json").exists():
        check_same_settings(out, recipe, overrides)
    else:
        args = [sys.executable, "-m", "fusion.fit", "--recipe", recipe, *overrides]
        print(f"[table] training {name}, seed {seed}: {' '.join(args[3:])}", flush=True)
        if subprocess.run(args).returncode != 0:
            raise FusionError(f"variant {name} (seed {seed}) failed; see the output above, then re-run to resume it")
    evaluation = json.loads((out / "stages" / "evaluate.json").read_text())["result"]["validation"]
    return {"before": evaluation["before"], "after": evaluation["after"]}


@torch.no_grad()
def block_perplexities(model_path: str | Path, sets: dict) -> dict[str, float]:
    """The target-tokenizer model's perplexity on each named set of validation blocks and, token-weighted, on
    all (``val/perplexity``), as the training run's validation computes them."""
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    nll, tokens = {}, {}
    for name, blocks in sets.items():
        nll[name] = tokens[name] = 0
        for start in range(0, len(blocks), 16):
            ids = blocks[start:start + 16]["input_ids"]
            logits = model(ids).logits[:, :-1].float()
            nll[name] += torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                           reduction="sum").item()
            tokens[name] += ids[:, 1:].numel()
    return {KEYS["overall"]: math.exp(sum(nll.values()) / sum(tokens.values())),
            **{f"val/perplexity/{name}": math.exp(nll[name] / tokens[name]) for name in sets}}


def rescore(results: dict[str, dict[int, dict]], runs: Path, overrides: list[str]) -> None:
    """Replace each run's before/after perplexities by its exported model's (and the initial target's) on the
    validation blocks of ``fusellm.yaml`` with ``overrides`` (e.g. a larger ``data.max_validation_blocks``)."""
    recipe, target_path, sets = validation_sets(overrides)
    before = block_perplexities(target_path, sets)
    for name, by_seed in results.items():
        for seed in by_seed:
            print(f"[table] scoring {name}, seed {seed} on {recipe.data.max_validation_blocks} blocks per domain",
                  flush=True)
            by_seed[seed] = {"before": before, "after": block_perplexities(runs / f"{name}-s{seed}" / "model", sets)}


def paired(reference: list[float], other: list[float]) -> dict:
    """Per-seed differences of ``other`` against ``reference`` (% of the reference's perplexity, negative =
    better), their mean, sample std and 2σ verdict."""
    diffs = [100 * (o / r - 1) for r, o in zip(reference, other)]
    mean, std = statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {"pct_per_seed": diffs, "pct_mean": mean, "pct_std": std,
            "beyond_2std": len(diffs) > 1 and abs(mean) > 2 * std}


def summarise(results: dict[str, dict[int, dict]], seeds: list[int], against: str = "clm") -> dict[str, dict]:
    """Per variant: per-seed perplexities, mean and sample std per domain, and the paired difference to
    ``against`` per seed (``vs_<against>_pct_per_seed``, ``_mean``, ``_std``, ``vs_<against>_beyond_2std``)."""
    summary = {}
    for name, by_seed in results.items():
        entry = {"seeds": seeds, "recipe": VARIANTS[name][0], "overrides": [*rate_override(name), *VARIANTS[name][1]]}
        for domain, key in KEYS.items():
            values = [by_seed[s]["after"][key] for s in seeds]
            entry[f"{domain}_ppl_per_seed"] = values
            entry[f"{domain}_ppl_mean"] = statistics.mean(values)
            entry[f"{domain}_ppl_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if against in results and name != against:
            reference = [results[against][s]["after"][KEYS["overall"]] for s in seeds]
            difference = paired(reference, entry["overall_ppl_per_seed"])
            entry.update({f"vs_{against}_{k}": v for k, v in difference.items()})
        summary[name] = entry
    return summary


def markdown(summary: dict[str, dict], fixed: dict[str, dict[str, float]], against: str = "clm") -> str:
    """The table: fixed rows (initial target, sources) with one value, variants with mean ± std."""
    lines = [f"| model | overall | code | prose | vs {against}, paired (%) |", "|---|---|---|---|---|"]
    for name, row in fixed.items():
        lines.append(f"| {name} | {row[KEYS['overall']]:.2f} | {row[KEYS['code']]:.2f} | {row[KEYS['prose']]:.2f} | |")
    for name, e in summary.items():
        cells = [f"{e[f'{d}_ppl_mean']:.2f} ± {e[f'{d}_ppl_std']:.2f}" for d in KEYS]
        versus = ""
        if f"vs_{against}_pct_mean" in e:
            versus = f"{e[f'vs_{against}_pct_mean']:+.1f} ± {e[f'vs_{against}_pct_std']:.1f}" + (
                " (beyond 2σ)" if e[f"vs_{against}_beyond_2std"] else "")
        lines.append(f"| {name} | {' | '.join(cells)} | {versus} |")
    return "\n".join(lines)


@torch.no_grad()
def source_perplexity(model_path: str, blocks, target_tokenizer) -> float:
    """exp(source NLL of the blocks' text / their number of target tokens), the zoo's unit.

    Each block is cut at the target's EOS into documents; a source reads each as
    ``[start] + tokens + [eos if the document ended]`` and its NLL counts every predicted token.
    """
    tokenizer = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    nll, target_tokens = 0.0, 0
    for block in blocks:
        ids = block["input_ids"].tolist()
        target_tokens += len(ids) - 1
        segments, current = [], []
        for token in ids:
            if token == target_tokenizer.eos_token_id:
                segments.append((current, True))
                current = []
            else:
                current.append(token)
        segments.append((current, False))
        for segment, ended in segments:
            text = target_tokenizer.decode(segment, skip_special_tokens=True)
            seq = [start_token_id(tokenizer), *tokenizer(text, add_special_tokens=False)["input_ids"]]
            seq += [tokenizer.eos_token_id] if ended else []
            if len(seq) < 2:
                continue
            for start in range(0, len(seq) - 1, 511):  # the zoo's models take 512 positions
                window = torch.tensor([seq[start:start + 512]])
                logits = model(window).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    return math.exp(nll / target_tokens)


def validation_sets(overrides: list[str]) -> tuple:
    """``(recipe, target_path, sets)``: ``fusellm.yaml`` with ``overrides``, and its named validation blocks."""
    recipe = load_recipe("fusellm.yaml", overrides)
    target_path = resolve_model(recipe.model.path, recipe.zoo.size, recipe.zoo.dir)
    text = TextDataModule(recipe.data, target_path, recipe.trainer.batch_size, seed=recipe.seed)
    text.prepare_data()
    text.setup("validate")
    return recipe, target_path, text.validation_sets


def source_rows(overrides: list[str]) -> dict[str, dict[str, float]]:
    recipe, target_path, sets = validation_sets(overrides)
    target_tokenizer = load_tokenizer(target_path)
    rows = {}
    for source in SOURCES:
        path = resolve_model(f"zoo:{source}", recipe.zoo.size, recipe.zoo.dir)
        per_set = {name: source_perplexity(path, blocks, target_tokenizer) for name, blocks in sets.items()}
        tokens = {name: _tokens(blocks) for name, blocks in sets.items()}
        overall = math.exp(sum(math.log(per_set[n]) * tokens[n] for n in tokens) / sum(tokens.values()))
        rows[f"source {source}"] = {"val/perplexity": overall,
                                    **{f"val/perplexity/{n}": v for n, v in per_set.items()}}
    return rows


def _tokens(blocks) -> int:
    return sum(len(b["input_ids"]) - 1 for b in blocks)


def plot(summary: dict[str, dict], fixed: dict[str, dict[str, float]], out_file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, domain in zip(axes, KEYS):
        names = list(fixed) + list(summary)
        values = [fixed[n][KEYS[domain]] for n in fixed] + [summary[n][f"{domain}_ppl_mean"] for n in summary]
        errors = [0.0] * len(fixed) + [summary[n][f"{domain}_ppl_std"] for n in summary]
        colors = ["#999999" if n in fixed else "#4c72b0" if n.startswith("clm") else "#dd8452" for n in names]
        ax.barh(names, values, xerr=errors, color=colors, capsize=3)
        ax.invert_yaxis()
        ax.set_title(f"{domain} perplexity (mean ± std over seeds)")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


_extra: list[str] = []


def folder_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """``--runs`` and ``--out`` as given, where not the defaults: the recorded command then re-reads the same runs."""
    return [f"--{key} {getattr(args, key)}" for key in ("runs", "out")
            if getattr(args, key) != parser.get_default(key)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion.experiments.fusellm_table",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/fusellm-table", help="where the variants' run folders go")
    parser.add_argument("--out", default="docs/results", help="where fusellm-table.md/.json/.png are written")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help=f"variants (default: {', '.join(DEFAULT)})")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="seeds of every variant")
    parser.add_argument("--against", choices=list(VARIANTS),
                        help="the variant every other is paired with, seed by seed (default: clm)")
    parser.add_argument("--validation-blocks", type=int, metavar="N",
                        help="score the finished runs on the first N held-out blocks per domain (see above)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                        help="applied to every variant, e.g. trainer.max_steps=100")
    args = parser.parse_args(argv)
    _extra[:] = args.overrides
    names = args.only or list(DEFAULT)
    if args.against and args.against not in names:
        parser.error(f"--against {args.against} is not among the variants run; add it to --only")
    against = args.against or "clm"
    blocks = args.validation_blocks
    if blocks is not None and blocks < 1:
        parser.error(f"--validation-blocks must be at least 1, got {blocks}")
    try:
        runs, out = Path(args.runs), Path(args.out)
        results = {name: {seed: run_variant(name, seed, runs) for seed in args.seeds} for name in names}
        scoring = args.overrides
        if blocks is not None:
            scoring = [*args.overrides, f"data.max_validation_blocks={blocks}"]
            rescore(results, runs, scoring)
        first = results[names[0]][args.seeds[0]]
        fixed = {"initial target": first["before"], **source_rows(scoring)}
        summary = summarise(results, args.seeds, against)
        recipe = load_recipe("fusellm.yaml", args.overrides)
        # overrides first: after --only or --seeds, argparse would read them as more of those
        command = " ".join(["python -m fusion.experiments.fusellm_table", *args.overrides,
                            *(["--only", *names] if args.only else []), "--seeds", *map(str, args.seeds),
                            *(["--against", args.against] if args.against else []),
                            *(["--validation-blocks", str(blocks)] if blocks is not None else []),
                            *folder_options(parser, args)])
        held_out = f" on {blocks} blocks per domain" if blocks is not None else ""
        header = (f"FuseLLM in miniature: held-out perplexity{held_out} after {recipe.trainer.max_steps} steps of "
                  f"batch {recipe.trainer.batch_size} x {recipe.data.block_size} tokens from zoo:target, mean ± sample "
                  f"std over seeds {', '.join(map(str, args.seeds))} (`{command}`)\n\n")
        table = markdown(summary, fixed, against)
        write_table(out, "fusellm-table", header, table, {"command": command, "fixed": fixed, "variants": summary})
        plot(summary, fixed, out / "fusellm-table.png")
    except FusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
