"""`fusion.experiments.fusellm_table`'s summary: differences paired by seed against a chosen variant."""

import pytest

from fusion.experiments import fusellm_table


def _run(overall: float) -> dict:
    return {"after": {"val/perplexity": overall, "val/perplexity/code": overall / 2,
                      "val/perplexity/prose": overall * 2}}


def test_every_row_is_paired_by_seed_with_the_chosen_variant():
    results = {"clm": {0: _run(70.0), 1: _run(68.0)}, "fusellm": {0: _run(66.5), 1: _run(68.0)},
               "fusellm-t2": {0: _run(69.825), 1: _run(64.6)}}
    summary = fusellm_table.summarise(results, [0, 1], against="fusellm")
    assert "vs_fusellm_pct_mean" not in summary["fusellm"]
    assert summary["clm"]["vs_fusellm_pct_per_seed"] == pytest.approx([100 * (70 / 66.5 - 1), 0.0])
    assert summary["fusellm-t2"]["vs_fusellm_pct_per_seed"] == pytest.approx([5.0, -5.0])
    assert summary["fusellm-t2"]["vs_fusellm_pct_mean"] == pytest.approx(0.0)
    assert not summary["fusellm-t2"]["vs_fusellm_beyond_2std"]
    table = fusellm_table.markdown(summary, {}, "fusellm")
    assert "| model | overall | code | prose | vs fusellm, paired (%) |" in table
    assert "| fusellm-t2 | 67.21 ± 3.69 | 33.61 ± 1.85 | 134.43 ± 7.39 | +0.0 ± 7.1 |" in table
    # the default reference stays clm: the keys docs/results/fusellm-table.json has always had
    assert fusellm_table.summarise(results, [0, 1])["fusellm"]["vs_clm_pct_per_seed"] == pytest.approx(
        [-5.0, 0.0])


def test_a_reference_that_is_not_run_is_refused_before_any_training(capsys):
    with pytest.raises(SystemExit) as exit_:
        fusellm_table.main(["--only", "clm", "fusellm", "--against", "kd-oracle"])
    assert exit_.value.code == 2
    assert "--against kd-oracle is not among the variants run" in capsys.readouterr().err


def test_no_held_out_blocks_is_refused_before_any_training(capsys):
    with pytest.raises(SystemExit) as exit_:
        fusellm_table.main(["--only", "clm", "--validation-blocks", "0"])
    assert exit_.value.code == 2
    assert "--validation-blocks must be at least 1, got 0" in capsys.readouterr().err


def test_the_json_lists_the_rate_clm_chunks_trains_at():
    from fusion.recipe import load_recipe

    results = {name: {0: _run(70.0)} for name in ("clm", "clm-chunks")}
    overrides = fusellm_table.summarise(results, [0])["clm-chunks"]["overrides"]
    clm_rate = load_recipe("clm.yaml").optim.lr
    assert overrides == [f"optim.lr={clm_rate}", "fusion.clm_weight=1.0"]


@pytest.fixture(scope="module")
def finished_clm_run(tmp_path_factory, zoo_dir, cache_dir):
    """A 6-step tiny ``clm`` run at seed 0 in ``<runs>/clm-s0``, as the table lays it out: (runs, overrides)."""
    from conftest import run_fit, tiny_overrides

    runs = tmp_path_factory.mktemp("table") / "runs"
    overrides = tiny_overrides(runs / "clm-s0", zoo_dir, cache_dir, **{"trainer.max_steps": 6, "seed": 0,
                                                                          "trainer.val_every_n_steps": 6,
                                                                          "wandb.mode": "disabled"})
    result = run_fit("--recipe", "clm.yaml", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return runs, overrides


def test_rescoring_a_finished_run_reproduces_its_validation_and_reads_the_cap(finished_clm_run):
    import json

    runs, overrides = finished_clm_run
    validated = json.loads((runs / "clm-s0" / "stages" / "evaluate.json").read_text())["result"]["validation"]
    scoring = [o for o in overrides if o.split("=")[0] in ("zoo.size", "zoo.dir", "data.cache_dir", "data.block_size")]

    results = {"clm": {0: None}}
    fusellm_table.rescore(results, runs, [*scoring, "data.max_validation_blocks=8"])  # the run's own blocks
    for when in ("before", "after"):
        assert results["clm"][0][when].keys() == validated[when].keys()
        for key, value in validated[when].items():
            assert results["clm"][0][when][key] == pytest.approx(value, rel=1e-4), (when, key)

    fusellm_table.rescore(results, runs, [*scoring, "data.max_validation_blocks=24"])  # three times the text
    for when in ("before", "after"):  # the initial target is re-scored as well
        more = results["clm"][0][when]
        assert all(more[key] != pytest.approx(value, rel=1e-3) for key, value in validated[when].items())


def test_a_finished_run_is_reused_only_under_the_settings_it_was_trained_with(finished_clm_run, monkeypatch, capsys):
    import json

    runs, overrides = finished_clm_run
    validated = json.loads((runs / "clm-s0" / "stages" / "evaluate.json").read_text())["result"]["validation"]
    same = [o for o in overrides if not o.startswith("output_dir=")]  # the table sets the folder itself
    monkeypatch.setattr(fusellm_table, "_extra", same)
    assert fusellm_table.run_variant("clm", 0, runs)["after"] == validated["after"]  # found, not trained again
    out = runs.parent / "table"
    assert fusellm_table.main([*same, "--runs", str(runs), "--out", str(out), "--only", "clm", "--seeds", "0"]) == 0
    table = json.loads((out / "fusellm-table.json").read_text())
    assert table["variants"]["clm"]["overall_ppl_mean"] == pytest.approx(validated["after"]["val/perplexity"])
    assert table["command"].endswith(f"--seeds 0 --runs {runs} --out {out}")  # re-reads these runs, not the default's

    # the same folder under a command with another batch size: refused, naming the folder, nothing retrained
    before = (runs / "clm-s0" / "stages" / "train.json").read_text()
    code = fusellm_table.main([*same, "trainer.batch_size=16", "--runs", str(runs), "--out", str(runs.parent),
                              "--only", "clm", "--seeds", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{runs / 'clm-s0'} holds a finished run made with other settings" in err
    assert "train" in err and "--runs" in err
    assert (runs / "clm-s0" / "stages" / "train.json").read_text() == before
