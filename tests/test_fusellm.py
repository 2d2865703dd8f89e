"""The FuseLLM recipe end to end on the small zoo: stages, results, export, resume at the exact batch, DDP."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, fusellm_overrides, run_fit, tiny_overrides
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fusion.data.chunks import load_chunk_set, row_ids, usable_rows
from fusion.data.fused import FusedBatches
from fusion.data.prepare import align_teachers, prepare_chunks
from fusion.data.rows import RowBatches, all_rows
from fusion.data.text import load_tokenizer
from fusion.loggers import read_metrics
from fusion.recipe import load_recipe
from fusion.zoo import resolve_model


@pytest.fixture(scope="module")
def fusellm_run(tmp_path_factory, zoo_dir, cache_dir):
    out = tmp_path_factory.mktemp("runs") / "fusellm"
    overrides = fusellm_overrides(out, zoo_dir, cache_dir)
    result = run_fit("--recipe", "fusellm.yaml", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, overrides, result


def test_fusellm_runs_every_stage_and_reports(fusellm_run, zoo_dir):
    out, _, result = fusellm_run
    for stage in ("representations", "alignment", "baseline", "train", "export", "evaluate"):
        assert (out / "stages" / f"{stage}.json").exists(), stage
    alignment = json.loads((out / "stages" / "alignment.json").read_text())["result"]["teachers"]
    assert alignment["target"]["fallback_rate"] == 0  # the target aligned with itself: the identity
    # the default `prefix` alignment leaves next to no position without a teacher prediction
    assert alignment["gpt2-code"]["fallback_rate"] < 0.05 and alignment["neox-prose"]["fallback_rate"] < 0.05
    assert "falls back to the gold token" in result.stdout
    metrics = read_metrics(out / "metrics.jsonl")
    assert {"train/clm_loss", "train/distill_loss", "train/teacher_weight/gpt2-code"} <= metrics.keys()
    results = json.loads((out / "results.json").read_text())["validation"]
    assert {"zoo:target (before)", "fusellm (after, exported)"} <= results.keys()
    assert 1 < results["fusellm (after, exported)"]["val/perplexity"] < 1000
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.model_type == "llama"
    assert list((out / "wandb").glob("offline-run-*"))

    # It learns: the first batch it trained on costs less after training (16 steps are too few to promise held-out
    # gains, and the losses of different batches differ by more than 16 steps change them).
    reps = json.loads((out / "stages" / "representations.json").read_text())["result"]
    rows = usable_rows(Path(reps["chunks"]), reps["used_chunks"])
    batch = RowBatches(Path(reps["chunks"]), rows, 4, 0, 0, 1, 0, 16).collate(rows[:4, 0])
    before = AutoModelForCausalLM.from_pretrained(resolve_model("zoo:target", "small", zoo_dir))
    losses = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
              for m in (before, model)]
    assert losses[1] < losses[0] - 0.1


def test_clm_on_the_same_seed_trains_on_the_fusion_runs_batches_first(fusellm_run, zoo_dir, cache_dir, tmp_path):
    """clm.yaml and fusellm.yaml differ in their teachers, not their data: the same rows in the same batches until the
    fusion run's rows are used up (`fusion.data.rows`)."""
    out, overrides, _ = fusellm_run
    recipe = load_recipe("fusellm.yaml", overrides)
    reps = json.loads((out / "stages" / "representations.json").read_text())["result"]
    folder = Path(reps["chunks"])
    clm = load_recipe("clm.yaml", tiny_overrides(tmp_path, zoo_dir, cache_dir, **{
        "data.block_size": recipe.data.block_size, "trainer.batch_size": recipe.trainer.batch_size}))
    tok = load_tokenizer(resolve_model("zoo:target", "small", zoo_dir))
    assert prepare_chunks(clm, tok)[0] == folder  # the same chunk set
    teachers, _ = align_teachers(recipe, "prefix", folder, reps["chunk_info"])
    fused = FusedBatches(folder, teachers, usable_rows(folder, reps["used_chunks"]), recipe.trainer.batch_size,
                         recipe.seed, 0, 1, False, tok.pad_token_id)
    plain = RowBatches(folder, all_rows(folder), clm.trainer.batch_size, clm.seed, 0, 1, tok.pad_token_id,
                       clm.representations.chunks_per_shard)
    assert len(plain) > 2 * len(fused) > 0
    for epoch in (0, 1):
        fused.epoch = plain.epoch = epoch
        same = [(a == b).all() for a, b in zip(fused.batches(), plain.batches())]
        assert all(same) if epoch == 0 else not all(same)  # later epochs shuffle each one's own rows
    fused.epoch = plain.epoch = 0
    for b in fused.batches()[:2]:
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(fused.collate(b)[key], plain.collate(b)[key])


def test_training_rows_are_clms_layout_with_each_chunks_teacher_predictions(fusellm_run):
    out, overrides, _ = fusellm_run
    recipe = load_recipe("fusellm.yaml", overrides)
    reps = json.loads((out / "stages" / "representations.json").read_text())["result"]
    folder = Path(reps["chunks"])
    teachers, _ = align_teachers(recipe, "prefix", folder, reps["chunk_info"])  # the run's alignments, reused
    tok = load_tokenizer(resolve_model("zoo:target", "small", recipe.zoo.dir))
    chunks, _ = load_chunk_set(folder)
    rows = usable_rows(chunks, reps["used_chunks"])
    starts = np.array(chunks["starts_document"][:reps["used_chunks"]])
    joined = rows[rows[:, 1] > 1][:2]  # documents joined in a row
    alone = rows[(rows[:, 1] == 1) & ~starts[rows[:, 0]]][:2]  # a row of one piece, mid-document
    assert len(joined) >= 1 and len(alone) == 2
    dataset = FusedBatches(folder, teachers, rows, 4, recipe.seed, 0, 1, False, tok.pad_token_id)
    picked = np.concatenate([joined, alone])
    batch = dataset.collate(picked[:, 0])
    bos = tok.bos_token_id
    for n, (first, size) in enumerate(picked.tolist()):
        pieces = [(chunks[c]["text"], chunks[c]["starts_document"], chunks[c]["ends_document"])
                  for c in range(first, first + size)]
        ids = row_ids(tok, pieces)  # BOS text EOS BOS text ..., no BOS where the row begins mid-document
        assert batch["input_ids"][n, :len(ids)].tolist() == ids and (batch["labels"][n, len(ids):] == -100).all()
        assert (ids[0] == bos) == pieces[0][1]
        # Each chunk's positions get its teachers' predictions; an EOS before a document's BOS gets the gold one-hot.
        seams = [i - 1 for i in range(1, len(ids)) if ids[i] == bos]
        assert len(seams) == sum(p[1] for p in pieces[1:]) and (len(seams) > 0) == (size > 1)
        fallback = batch["teacher_fallback"][n, 0, :len(ids) - 1]  # teacher 0 is the target: the identity
        assert fallback.nonzero().flatten().tolist() == seams
        assert (batch["teacher_ids"][n, :, seams, 0] == bos).all()
        assert (batch["teacher_logprobs"][n, :, seams, 0] == 0).all()
        # The target aligned with itself: each position holds its chunk's stored top-k at the same text position.
        expected = []
        for p, chunk_id in enumerate(range(first, first + size)):
            shard, i = divmod(chunk_id, teachers[0].store.chunks_per_shard)
            stored = torch.from_numpy(teachers[0].store.read_shard(shard).chunk(i)["topk_ids"].astype(np.int64))
            expected += [None] * (p > 0) + list(stored[0 if pieces[p][1] else 1:])
        for i, top in enumerate(expected):
            if top is not None:
                assert batch["teacher_ids"][n, 0, i].tolist() == top.tolist(), (n, i)
        # Each teacher's token CE is its aligned distribution's CE on the target's next token (0 at fallbacks).
        gold = torch.tensor(ids[1:])
        p_gold = ((batch["teacher_ids"][n, :, :len(ids) - 1] == gold[:, None]) *
                  batch["teacher_logprobs"][n, :, :len(ids) - 1].exp()).sum(-1)
        want = torch.where(batch["teacher_fallback"][n, :, :len(ids) - 1], 0.0, -p_gold.clamp(min=1e-4).log())
        torch.testing.assert_close(batch["teacher_token_ce"][n, :, :len(ids) - 1], want, rtol=1e-5, atol=1e-5)
        assert (want[1:] > 0).any()  # the sources' CE is not all zero (or all fallback)


def test_a_new_teacher_is_the_only_one_computed(fusellm_run, tmp_path, zoo_dir, cache_dir):
    teachers = "[{path: zoo:target, name: target}, {path: zoo:gpt2-code, name: gpt2-8bit, quantization: 8bit}]"
    other = fusellm_overrides(tmp_path / "again", zoo_dir, cache_dir, **{
        "teachers": teachers, "trainer.max_steps": 2, "trainer.val_every_n_steps": 2, "fusion.function": "avgce",
        "fusion.alignment": "mined"})
    result = run_fit("--recipe", "fusellm.yaml", *other)
    assert result.returncode == 0, result.stderr[-3000:]
    computed = [line for line in result.stdout.splitlines() if "shards to compute" in line]
    assert len(computed) == 1 and "teacher gpt2-8bit:" in computed[0]  # the target's shards were reused
    # the paper's MinED alignment, end to end: the identity for the target, above the prefix rate for the source
    alignment = json.loads((tmp_path / "again" / "stages" / "alignment.json").read_text())["result"]
    prefix = json.loads((fusellm_run[0] / "stages" / "alignment.json").read_text())["result"]["teachers"]
    assert alignment["mode"] == "mined" and alignment["teachers"]["target"]["fallback_rate"] == 0
    assert prefix["gpt2-code"]["fallback_rate"] < alignment["teachers"]["gpt2-8bit"]["fallback_rate"] < 1


_KILL_AT_STEP_9 = """
import os, signal, sys
import lightning.pytorch as pl
from fusion.recipe import load_recipe
from fusion.pipeline import run

class Kill(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 9:
            os.kill(os.getpid(), signal.SIGKILL)

run(load_recipe("fusellm.yaml", sys.argv[1:]), extra_callbacks=[Kill()])
"""


def test_killed_fusellm_run_resumes_at_the_exact_batch(fusellm_run, tmp_path, zoo_dir, cache_dir):
    uninterrupted, _, _ = fusellm_run
    out = tmp_path / "killed"
    overrides = fusellm_overrides(out, zoo_dir, cache_dir)
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILL_AT_STEP_9), *overrides], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    resumed = run_fit("--recipe", "fusellm.yaml", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    a = load_file(uninterrupted / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    for name in a:  # the same batches in the same order: the same weights
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    losses_a = read_metrics(uninterrupted / "metrics.jsonl")["train/loss"]
    losses_b = read_metrics(out / "metrics.jsonl")["train/loss"]
    for step in range(8, 16):
        assert losses_b[step] == pytest.approx(losses_a[step], rel=1e-5)


_RECORD_CHUNKS = """
import json, os, sys
import lightning.pytorch as pl
from fusion.recipe import load_recipe
from fusion.pipeline import run

class Record(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(batch["chunk_ids"].tolist()) + "\\n")

run(load_recipe("fusellm.yaml", sys.argv[2:]), extra_callbacks=[Record()])
"""


@pytest.mark.slow
def test_two_process_ddp_sees_every_row_once_per_epoch(fusellm_run, tmp_path, zoo_dir, cache_dir):
    script = tmp_path / "record.py"  # Lightning's DDP launcher re-runs this file for rank 1
    script.write_text(textwrap.dedent(_RECORD_CHUNKS))
    out = tmp_path / "ddp"
    overrides = fusellm_overrides(out, zoo_dir, cache_dir, **{
        "trainer.devices": 2, "trainer.strategy": "ddp", "trainer.process_group_backend": "gloo",
        "trainer.max_steps": -1, "trainer.max_epochs": 1, "trainer.val_every_n_steps": "null",
        "wandb.mode": "disabled"})
    result = subprocess.run([sys.executable, str(script), str(tmp_path), *overrides], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = {rank: [c for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()
                   for c in json.loads(line)] for rank in (0, 1)}
    reps = json.loads((out / "stages" / "representations.json").read_text())["result"]
    rows = usable_rows(load_chunk_set(Path(reps["chunks"]))[0], reps["used_chunks"])[:, 0].tolist()
    steps = len(rows) // 8  # global batches of 2 ranks x 4 rows; the rest of the epoch's order is dropped
    assert len(seen[0]) == len(seen[1]) == 4 * steps and len(rows) - 8 < 8 * steps
    assert len(set(seen[0] + seen[1])) == 8 * steps and set(seen[0] + seen[1]) <= set(rows)  # each row once at most
    assert (out / "model" / "model.safetensors").exists()


def readme_loss() -> str:
    """The Python block of the README's "Add a loss" section: the code a user writes."""
    section = (ROOT / "README.md").read_text().split("## Add a loss", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_loss_trains_with_alpha_from_the_recipe(fusellm_run, tmp_path, zoo_dir, cache_dir):
    code = readme_loss()
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    (tmp_path / "my_losses.py").write_text(code)
    distill, outputs = {}, {}
    for alpha in (0.0, 0.9):
        out = tmp_path / f"skew{alpha}"
        overrides = fusellm_overrides(out, zoo_dir, cache_dir, **{
            "module_class": "my_losses.SkewKL", "module_args.alpha": alpha, "trainer.max_steps": 2,
            "trainer.val_every_n_steps": 2, "wandb.mode": "disabled"})
        result = run_fit("--recipe", "fusellm.yaml", *overrides, pythonpath=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"SkewKL(alpha={alpha}): 0.7 x CLM + 0.3 x SkewKL.distillation_loss(" in result.stdout
        distill[alpha] = read_metrics(out / "metrics.jsonl")["train/distill_loss"][0]
        outputs[alpha] = out
    # alpha reached the loss: the same first batch, a smaller skew KL the more teacher is mixed into the student
    assert 0 < distill[0.9] < distill[0.0]
    hparams = torch.load(outputs[0.9] / "checkpoints" / "final.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["module"]["class"] == "my_losses.SkewKL" and hparams["module"]["args"] == {"alpha": 0.9}
    results = json.loads((outputs[0.9] / "results.json").read_text())
    assert results["module"]["args"] == {"alpha": 0.9} and "SkewKL" in (outputs[0.9] / "results.md").read_text()
    # a typo or a wrong type in module_args: one line, exit 2, before anything loads
    for bad, named in (("module_args.alpah=0.2", "module_args.alpah"), ("module_args.alpha=high", "module_args.alpha")):
        result = run_fit("--recipe", "fusellm.yaml", *overrides, bad, "--dry-run", pythonpath=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and named in lines[0], result.stderr
