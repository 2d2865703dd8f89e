"""The FuseLLM paper's comparison in miniature, on the embedded zoo: one command, one table, one plot.

    python -m fusion.experiments.fusellm_table            # ~7 minutes on 2 CPU cores once the zoo and shards exist

Every variant starts from the same target (``zoo:target``), reads the same chunks in the same order
and trains for the same steps (those of ``recipes/fusellm.yaml``); only the objective differs:

    clm             lambda = 1: the causal-LM loss only (the paper's "Llama-2 CLM")
    kd-gpt2-code    single-teacher distillation from the code source alone, lambda = 0.9
    kd-neox-prose   single-teacher distillation from the prose source alone
    fusellm-mince   FuseLLM: target + both sources, MinCE, MinED alignment (the paper's method)
    fusellm-avgce   the same with AvgCE
    fusellm-exact   the same with exact-match (EM) alignment instead of MinED

and two more that probe why the result comes out as it does:

    fusellm-lambda0.5   MinCE with lambda = 0.5: more weight on the teachers
    fusellm-target-ce   MinCE choosing teachers by CE per *target* token instead of per own token
    fusellm-target-ce-lambda0.5   both

Held-out perplexity per domain and overall (the validation blocks of every run) is tabulated beside
the initial target's and each source model's. A source's perplexity is measured on the same text:
its summed NLL under its own tokenizer divided by the number of *target* tokens, so all rows share
one unit. Runs live in ``runs/fusellm-table/`` (re-running skips finished ones); the table and plot
are written to ``docs/results/`` (``fusellm-table.md``, ``.json``, ``.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from fusion.data.chunks import start_token_id
from fusion.data.text import TextDataModule, load_tokenizer
from fusion.errors import FusionError
from fusion.recipe import load_recipe
from fusion.report import perplexity_table
from fusion.zoo import resolve_model

TEACHERS = {
    "target": "{path: zoo:target, name: target}",
    "gpt2-code": "{path: zoo:gpt2-code, name: gpt2-code}",
    "neox-prose": "{path: zoo:neox-prose, name: neox-prose}",
}
ALL = f"[{TEACHERS['target']}, {TEACHERS['gpt2-code']}, {TEACHERS['neox-prose']}]"
VARIANTS = {
    "clm": ["fusion.clm_weight=1.0"],
    "kd-gpt2-code": [f"teachers=[{TEACHERS['gpt2-code']}]"],
    "kd-neox-prose": [f"teachers=[{TEACHERS['neox-prose']}]"],
    "fusellm-mince": [],
    "fusellm-avgce": ["fusion.function=avgce"],
    "fusellm-exact": ["fusion.alignment=exact"],
    # beyond the paper: what moves the result (see the README)
    "fusellm-lambda0.5": ["fusion.clm_weight=0.5"],
    "fusellm-target-ce": ["fusion.ce_unit=target_token"],
    "fusellm-target-ce-lambda0.5": ["fusion.ce_unit=target_token", "fusion.clm_weight=0.5"],
}
SOURCES = ("gpt2-code", "neox-prose")


def run_variant(name: str, overrides: list[str], runs: Path) -> dict:
    """Train (or find) one variant with ``python -m fusion.fit``; returns its after-training perplexities."""
    out = runs / name
    args = [sys.executable, "-m", "fusion.fit", "--recipe", "fusellm.yaml", f"name=fusellm-table-{name}",
            f"output_dir={out}", f"teachers={ALL}", *_extra, *overrides]  # the variant has the last word
    if not (out / "stages" / "evaluate.json").exists():
        print(f"[table] training {name}: {' '.join(args[3:])}", flush=True)
        if subprocess.run(args).returncode != 0:
            raise FusionError(f"variant {name} failed; see the output above, then re-run to resume it")
    evaluation = json.loads((out / "stages" / "evaluate.json").read_text())["result"]["validation"]
    return {"before": evaluation["before"], "after": evaluation["after"]}


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


def source_rows(overrides: list[str]) -> dict[str, dict[str, float]]:
    recipe = load_recipe("fusellm.yaml", overrides)
    target_path = resolve_model(recipe.model.path, recipe.zoo.size, recipe.zoo.dir)
    text = TextDataModule(recipe.data, target_path, recipe.trainer.batch_size, seed=recipe.seed)
    text.prepare_data()
    text.setup("validate")
    target_tokenizer = load_tokenizer(target_path)
    rows = {}
    for source in SOURCES:
        path = resolve_model(f"zoo:{source}", recipe.zoo.size, recipe.zoo.dir)
        per_set = {name: source_perplexity(path, blocks, target_tokenizer)
                   for name, blocks in text.validation_sets.items()}
        tokens = {name: _tokens(blocks) for name, blocks in text.validation_sets.items()}
        overall = math.exp(sum(math.log(per_set[n]) * tokens[n] for n in tokens) / sum(tokens.values()))
        rows[f"source {source}"] = {"val/perplexity": overall,
                                    **{f"val/perplexity/{n}": v for n, v in per_set.items()}}
    return rows


def _tokens(blocks) -> int:
    return sum(len(b["input_ids"]) - 1 for b in blocks)


def plot(rows: dict[str, dict[str, float]], out_file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("val/perplexity", "overall"), ("val/perplexity/code", "code"), ("val/perplexity/prose", "prose")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, title) in zip(axes, keys):
        names = list(rows)
        values = [rows[n].get(key, float("nan")) for n in names]
        colors = ["#999999" if n.startswith(("source", "initial")) else "#4c72b0" if n == "clm" else "#dd8452"
                  for n in names]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        ax.set_title(f"{title} perplexity (lower is better)")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


_extra: list[str] = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion.experiments.fusellm_table",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/fusellm-table", help="where the variants' run folders go")
    parser.add_argument("--out", default="docs/results", help="where fusellm-table.md/.json/.png are written")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="train only these variants")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                        help="applied to every variant, e.g. trainer.max_steps=100")
    args = parser.parse_args(argv)
    _extra[:] = args.overrides
    try:
        runs, out = Path(args.runs), Path(args.out)
        results = {name: run_variant(name, overrides, runs) for name, overrides in VARIANTS.items()
                   if not args.only or name in args.only}
        rows = {"initial target": next(iter(results.values()))["before"], **source_rows(args.overrides)}
        rows.update({name: r["after"] for name, r in results.items()})
        out.mkdir(parents=True, exist_ok=True)
        table = perplexity_table(rows)
        recipe = load_recipe("fusellm.yaml", args.overrides)
        header = (f"FuseLLM in miniature: held-out perplexity after {recipe.trainer.max_steps} steps of batch "
                  f"{recipe.trainer.batch_size} x {recipe.data.block_size} tokens from zoo:target "
                  f"(`python -m fusion.experiments.fusellm_table {' '.join(args.overrides)}`)\n\n")
        (out / "fusellm-table.md").write_text(header + table + "\n")
        (out / "fusellm-table.json").write_text(json.dumps(rows, indent=2) + "\n")
        plot(rows, out / "fusellm-table.png")
        print("\n" + header + table)
    except FusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
