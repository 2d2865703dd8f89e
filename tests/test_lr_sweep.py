"""The learning-rate sweep compares each variant at its own best rate (finished runs are read, not retrained)."""

import json

import pytest

from fusion.experiments import fusellm_table, lr_sweep
from fusion.experiments.finished import stage_keys


def finished_run(runs, lr: str, name: str, seed: int, perplexity: float, monkeypatch) -> None:
    """A run folder as `fusion.fit` leaves it after the sweep's command, as far as the tables read it: every stage
    recorded with the key that command gives, and the validation result."""
    monkeypatch.setattr(fusellm_table, "_extra", [f"optim.lr={lr}"])  # what the sweep adds for this rate
    keys = stage_keys(*fusellm_table.variant_command(name, seed, runs / lr))
    folder = runs / lr / f"{name}-s{seed}" / "stages"
    folder.mkdir(parents=True)
    after = {"val/perplexity": perplexity, "val/perplexity/code": perplexity, "val/perplexity/prose": perplexity}
    for stage, key in keys.items():
        result = {"validation": {"before": {"val/perplexity": 160.0}, "after": after}} if stage == "evaluate" else {}
        (folder / f"{stage}.json").write_text(json.dumps({"key": key, "result": result}))


def test_each_variant_is_taken_at_its_best_rate_and_paired_by_seed(tmp_path, monkeypatch):
    # clm is best at 4e-3, fusellm at 8e-3, where clm is worse: the claim must pair fusellm@8e-3 with clm@4e-3.
    perplexity = {("clm", "4e-3"): [70.0, 68.0, 70.0], ("clm", "8e-3"): [72.0, 72.0, 72.0],
                  ("fusellm", "4e-3"): [69.0, 68.0, 71.0], ("fusellm", "8e-3"): [67.9, 66.3, 67.2]}
    for (name, lr), values in perplexity.items():
        for seed, value in enumerate(values):
            finished_run(tmp_path / "runs", lr, name, seed, value, monkeypatch)
    assert lr_sweep.main(["--lrs", "4e-3", "8e-3", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "lr-sweep.json").read_text())
    assert record["best_lr"] == {"clm": "4e-3", "fusellm": "8e-3"}
    claim = record["fusellm_best_vs_clm_best"]
    assert claim["pct_per_seed"] == pytest.approx([-3.0, -2.5, -4.0])
    assert claim["pct_mean"] == pytest.approx(-3.1667, abs=1e-3) and claim["beyond_2std"]
    table = (tmp_path / "lr-sweep.md").read_text()
    assert "| 4e-3 | 69.33 ± 1.15 **(best)** | 69.33 ± 1.53 | +0.0 ± 1.4 |" in table
    assert "fusellm at 8e-3 against clm at 4e-3, paired by seed: -3.17 ± 0.76 %" in table
    assert (tmp_path / "lr-sweep.png").stat().st_size > 1000


def test_a_rate_that_is_not_a_number_is_one_line(capsys):
    assert lr_sweep.main(["--lrs", "4e-3", "fast"]) == 2
    assert capsys.readouterr().err.strip() == "error: --lrs: 'fast' is not a number; write rates like 4e-3"


def test_runs_made_at_another_rate_are_refused_not_reported(tmp_path, monkeypatch, capsys):
    for name in ("clm", "fusellm"):  # runs of the 4e-3 command, in the folder the 8e-3 command reads
        finished_run(tmp_path / "runs", "4e-3", name, 0, 70.0, monkeypatch)
    (tmp_path / "runs" / "4e-3").rename(tmp_path / "runs" / "8e-3")
    runs = ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path)]
    assert lr_sweep.main(["--lrs", "8e-3", "--seeds", "0", *runs]) == 2
    assert "clm-s0 holds a finished run made with other settings" in capsys.readouterr().err
    assert not (tmp_path / "lr-sweep.json").exists()
