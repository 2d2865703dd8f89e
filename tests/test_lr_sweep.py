"""The learning-rate sweep compares each variant at its own best rate (finished runs are read, not retrained)."""

import json

import pytest

from fusion.experiments import lr_sweep


def finished_run(folder, perplexity: float) -> None:
    """A run folder as `fusion.fit` leaves it, as far as the tables read it."""
    (folder / "stages").mkdir(parents=True)
    after = {"val/perplexity": perplexity, "val/perplexity/code": perplexity, "val/perplexity/prose": perplexity}
    record = {"result": {"validation": {"before": {"val/perplexity": 160.0}, "after": after}}}
    (folder / "stages" / "evaluate.json").write_text(json.dumps(record))


def test_each_variant_is_taken_at_its_best_rate_and_paired_by_seed(tmp_path):
    # clm is best at 4e-3, fusellm at 8e-3, where clm is worse: the claim must pair fusellm@8e-3 with clm@4e-3.
    perplexity = {("clm", "4e-3"): [70.0, 68.0, 70.0], ("clm", "8e-3"): [72.0, 72.0, 72.0],
                  ("fusellm", "4e-3"): [69.0, 68.0, 71.0], ("fusellm", "8e-3"): [67.9, 66.3, 67.2]}
    for (name, lr), values in perplexity.items():
        for seed, value in enumerate(values):
            finished_run(tmp_path / "runs" / lr / f"{name}-s{seed}", value)
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
