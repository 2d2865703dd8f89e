"""The CLM recipe end to end on the small zoo, as a user runs it: train, export, reload, resume, W&B."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, run_fit, tiny_overrides
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from wandb_history import wandb_history

from fusion.loggers import read_metrics


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory, zoo_dir, cache_dir):
    out = tmp_path_factory.mktemp("runs") / "clm"
    overrides = tiny_overrides(out, zoo_dir, cache_dir)
    result = run_fit("--recipe", "clm.yaml", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, overrides


def test_training_lowers_validation_perplexity(clm_run):
    out, _ = clm_run
    results = json.loads((out / "results.json").read_text())["validation"]
    before, after = results["zoo:target (before)"], results["clm (after, exported)"]
    assert after["val/perplexity"] < before["val/perplexity"]
    assert {"val/perplexity/code", "val/perplexity/prose"} <= after.keys()
    assert (out / "results.md").read_text().count("|") > 10 and (out / "curves.png").stat().st_size > 1000


def test_export_reloads_and_matches_the_trained_weights(clm_run):
    out, _ = clm_run
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    prompt = tokenizer("def ", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert tokenizer.decode(generated[0], skip_special_tokens=True).strip()
    # The exported model scores the validation data exactly as the trained module did at the last step.
    metrics = read_metrics(out / "metrics.jsonl")
    last_validation = metrics["val/perplexity"][max(metrics["val/perplexity"])]  # after the last step
    assert metrics["final/val/perplexity"][40] == pytest.approx(last_validation, rel=1e-4)


def test_rerun_skips_finished_stages(clm_run):
    out, overrides = clm_run
    before = (out / "model" / "model.safetensors").stat().st_mtime
    result = run_fit("--recipe", "clm.yaml", *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("already done, skipped") == 4
    # the run folder's recipe.yaml is a recipe: given back to fit on its own, it resumes the same run
    result = run_fit("--recipe", str(out / "recipe.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("already done, skipped") == 4
    assert (out / "model" / "model.safetensors").stat().st_mtime == before


def test_rerun_with_another_recipe_in_the_same_folder_is_refused(clm_run):
    out, overrides = clm_run
    result = run_fit("--recipe", "clm.yaml", *overrides, "optim.lr=0.1")
    assert result.returncode == 2 and "optim.lr" in result.stderr and "Traceback" not in result.stderr


def test_offline_wandb_run_holds_the_logged_metrics(clm_run):
    out, _ = clm_run
    history = wandb_history(out / "wandb")
    logged = {row["trainer/global_step"]: row["train/loss"] for row in history if "train/loss" in row}
    expected = read_metrics(out / "metrics.jsonl")["train/loss"]
    assert sorted(logged) == sorted(expected) == list(range(40))
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value)
    assert any("val/perplexity" in row for row in history)


_KILL = """
import os, signal, sys
import lightning.pytorch as pl
from fusion.recipe import load_recipe
from fusion.pipeline import run

AFTER_CHECKPOINT = sys.argv.pop(1) == "after-checkpoint"

def die():
    os.kill(os.getpid(), signal.SIGKILL)  # as a preempted job dies: no cleanup at all

class Kill(pl.Callback):
    def on_train_start(self, trainer, *args):
        save = trainer.save_checkpoint  # what ModelCheckpoint calls

        def save_then_die(*args, **kwargs):
            save(*args, **kwargs)
            if AFTER_CHECKPOINT and trainer.global_step == 10:
                die()  # the checkpoint is written, Lightning has not logged the step yet

        trainer.save_checkpoint = save_then_die

    def on_train_batch_end(self, trainer, *args):
        if not AFTER_CHECKPOINT and trainer.global_step == 15:
            die()

run(load_recipe("clm.yaml", sys.argv[1:]), extra_callbacks=[Kill()])
"""


@pytest.mark.parametrize("moment", ["at-step-15", "after-checkpoint"])
def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_one(clm_run, tmp_path, zoo_dir,
                                                                                  cache_dir, moment):
    uninterrupted, _ = clm_run
    out = tmp_path / "killed"
    overrides = tiny_overrides(out, zoo_dir, cache_dir)
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILL), moment, *overrides], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "model").exists()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    before = [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in row]
    assert before == list(range(14 if moment == "at-step-15" else 10))  # every step the checkpoint holds has its row

    resumed = run_fit("--recipe", "clm.yaml", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage baseline: already done" in resumed.stdout
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    train = json.loads((out / "stages" / "train.json").read_text())["result"]
    assert train["global_step"] == 40
    rows = [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in row]
    # The step count went on from 10 to 40; steps 10-13 of a run killed in step 14 were trained, and logged, twice.
    assert rows == before + list(range(10, 40))

    a = load_file(uninterrupted / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, dtype", [
    (["trainer.precision=bf16-true", "optim.name=adamw8bit"], "bfloat16"),
    (["trainer.precision=bf16-mixed", "model.gradient_checkpointing=true"], "float32"),
])
def test_precisions_8bit_adamw_and_checkpointing_train_and_export(tmp_path, zoo_dir, cache_dir, options, dtype):
    out = tmp_path / "run"
    overrides = tiny_overrides(out, zoo_dir, cache_dir, **{"trainer.max_steps": 4, "trainer.val_every_n_steps": 4,
                                                           "wandb.mode": "disabled"})
    result = run_fit("--recipe", "clm.yaml", *overrides, *options)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == dtype
    after = json.loads((out / "stages" / "evaluate.json").read_text())["result"]["validation"]["after"]
    assert 1 < after["val/perplexity"] < 1000


def test_a_diverging_run_stops_with_one_line_and_keeps_its_checkpoint(tmp_path, zoo_dir, cache_dir):
    out = tmp_path / "nan"
    overrides = tiny_overrides(out, zoo_dir, cache_dir, **{"optim.lr": 1e6, "trainer.gradient_clip_val": "null",
                                                           "trainer.checkpoint_every_n_steps": 1,
                                                           "wandb.mode": "disabled"})
    result = run_fit("--recipe", "clm.yaml", *overrides)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the training loss became nan")
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "stages" / "baseline.json").exists()
