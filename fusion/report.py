"""Results people would rather see than read: a perplexity table and the loss curves, as files."""

from __future__ import annotations

import json
from pathlib import Path

from fusion.loggers import read_metrics


def perplexity_table(rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per model, one column per validation set (`val/perplexity...` keys)."""
    columns = sorted({k for metrics in rows.values() for k in metrics}, key=lambda k: (k != "val/perplexity", k))
    names = ["overall" if c == "val/perplexity" else c.rsplit("/", 1)[-1] for c in columns]
    lines = ["| model | " + " | ".join(f"{n} ppl" for n in names) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, metrics in rows.items():
        cells = [f"{metrics[c]:.2f}" if c in metrics else "–" for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_table(accuracy: dict[str, dict[str, float]], percent: bool = True) -> str:
    """A Markdown table of ``{group: {skill: value}}``: one row per skill, one column per group (``before`` and
    ``after`` get a ``change`` column), in % (or as they are, for rewards)."""
    def show(value: float, sign: str = "") -> str:
        return f"{100 * value:{sign}.1f}" + (" %" if not sign else "") if percent else f"{value:{sign}.4f}"

    groups = list(accuracy)
    change = groups == ["before", "after"]
    lines = ["| skill | " + " | ".join(groups + ["change"] * change) + " |", "|---" * (len(groups) + 1 + change) + "|"]
    for skill in accuracy[groups[-1]]:
        cells = [show(accuracy[g][skill]) if skill in accuracy[g] else "–" for g in groups]
        if change:
            cells.append(show(accuracy["after"][skill] - accuracy["before"][skill], "+"))
        lines.append(f"| {skill} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(run_dir: Path, rows: dict[str, dict[str, float]], sample: str, module: dict,
                  extra: dict | None = None) -> str:
    """`results.json` and `results.md` in the run folder; returns the Markdown.

    ``module`` names what was trained: ``{"class", "args", "objective"}``; ``extra``: more results for results.json
    (an ``accuracy`` among them, ``{"before": {skill: value}, "after": ...}`` or one group per model, is also a table
    in results.md)."""
    extra = extra or {}
    (run_dir / "results.json").write_text(json.dumps({"validation": rows, "module": module, "sample": sample, **extra},
                                                     indent=2))
    args = ", ".join(f"{k}={v!r}" for k, v in module["args"].items())
    text = (f"# Results of {run_dir.name}\n\nTrained with `{module['class']}({args})`: {module['objective']}.\n\n"
            f"Validation perplexity (lower is better):\n\n{perplexity_table(rows)}\n")
    if "accuracy" in extra:
        text += f"\nHeld-out accuracy (greedy answers, checked by each skill's verifier):\n\n" \
                f"{accuracy_table(extra['accuracy'])}\n"
    if "reward" in extra:
        text += f"\nMean reward of those answers (the reward model of `scoring.reward_model`):\n\n" \
                f"{accuracy_table(extra['reward'], percent=False)}\n"
    text += f"\nSampled from the exported model (seed 0, top-k 40, temperature 0.7):\n\n```\n{sample}\n```\n"
    (run_dir / "results.md").write_text(text)
    return text


def write_table(out: Path, name: str, header: str, table: str, record: dict) -> None:
    """An experiment's results in ``out``: ``NAME.md`` (``header`` + ``table``) and ``NAME.json`` (``record``); the
    table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(header + table + "\n")
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n" + header + table)


def plot_curves(metrics_file: Path, out_file: Path) -> Path | None:
    """Training loss and validation perplexity against optimizer steps, as a PNG."""
    if not metrics_file.exists():
        return None
    plt = _pyplot()
    series = read_metrics(metrics_file)
    panels = [k for k in ("train/loss", "val/perplexity") if k in series]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for name in sorted(k for k in series if k == key or k.startswith(key + "/")):
            steps = sorted(series[name])
            ax.plot(steps, [series[name][s] for s in steps], marker="." if key != "train/loss" else None,
                    label=name.removeprefix(key).strip("/") or "overall")
        ax.set_xlabel("optimizer step")
        ax.set_title(key)
        ax.legend()
    return _save(plt, fig, out_file)


def plot_accuracy(accuracy: dict[str, dict[str, float]], out_file: Path, title: str = "",
                  ylabel: str = "held-out accuracy (%)") -> Path:
    """Per-skill rates of several groups (``{"before": {skill: rate}, "after": ...}``, or one per model) as grouped
    bars in a PNG."""
    plt = _pyplot()
    skills = list(next(reversed(accuracy.values())))
    width = 0.8 / len(accuracy)
    fig, ax = plt.subplots(figsize=(max(1.6, 0.5 * len(accuracy)) * len(skills) + 2, 3.5))
    for index, (group, rates) in enumerate(accuracy.items()):
        offset = (index - (len(accuracy) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(skills))], [100 * rates.get(s, 0.0) for s in skills], width=width,
               label=group)
    ax.set_xticks(range(len(skills)), skills)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, out_file)


def _pyplot():
    """matplotlib's pyplot on the file-only backend (imported late: most commands never plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out_file: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file
