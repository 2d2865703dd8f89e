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


def write_results(run_dir: Path, rows: dict[str, dict[str, float]], sample: str, module: dict) -> str:
    """`results.json` and `results.md` in the run folder; returns the Markdown.

    ``module`` names what was trained: ``{"class", "args", "objective"}``.
    """
    (run_dir / "results.json").write_text(json.dumps({"validation": rows, "module": module, "sample": sample},
                                                     indent=2))
    args = ", ".join(f"{k}={v!r}" for k, v in module["args"].items())
    text = (f"# Results of {run_dir.name}\n\nTrained with `{module['class']}({args})`: {module['objective']}.\n\n"
            f"Validation perplexity (lower is better):\n\n{perplexity_table(rows)}\n")
    text += f"\nSampled from the exported model (seed 0, top-k 40, temperature 0.7):\n\n```\n{sample}\n```\n"
    (run_dir / "results.md").write_text(text)
    return text


def plot_curves(metrics_file: Path, out_file: Path) -> Path | None:
    """Training loss and validation perplexity against optimizer steps, as a PNG."""
    if not metrics_file.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file
