"""FuseChat-3.0, WRPO and DPO end to end on the small chat zoo, as a user runs them: sampling, scoring, pairs, the SFT
sub-run, on-policy samples, reference log-probs, preference training, evaluation, export, resume after a kill; the
preference data layout; the recipes' checks."""

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_fit, start_fit, tiny_overrides, wait_until
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.config import ChatConfig, DataConfig
from fusion.data.chat import IGNORE_INDEX, ChatDataModule
from fusion.data.preference import PAIR, PreferenceBatch, PreferenceDataModule, fit_lengths
from fusion.methods.registry import get_method
from fusion.zoo import resolve_model


@pytest.fixture(scope="module")
def reward_model(zoo_dir) -> str:
    return resolve_model("zoo:chat-reward", "small", zoo_dir)


def preference_overrides(out: Path, zoo_dir: Path, cache_dir: Path, reward_model: str, **changes) -> list[str]:
    """The small zoo's chat models answer nothing right, so the small zoo's reward model ranks their answers (no
    verifier, no window): every prompt with two different scores gives a pair."""
    values = {"sampling.prompts": 8, "sampling.prompts_per_shard": 8, "sampling.batch_size": 8, "sampling.n": 2,
              "scoring.verify": "false", "scoring.reward_model": reward_model, "pairs.min_margin": "null",
              "pairs.max_margin": "null", "chat.max_length": 160, "preference.max_prompt_length": 96,
              "sft.batch_size": 4, "sft.max_epochs": 1, "trainer.batch_size": 2, "trainer.max_epochs": 2,
              "trainer.max_steps": -1, "trainer.val_every_n_steps": 1000, "trainer.checkpoint_every_n_steps": 2,
              "evaluate.questions": 4, "evaluate.max_new_tokens": 8}
    values.update(changes)
    return tiny_overrides(out, zoo_dir, cache_dir, **values)


@pytest.fixture(scope="module")
def fusechat3_run(tmp_path_factory, zoo_dir, cache_dir, reward_model):
    out = tmp_path_factory.mktemp("runs") / "fusechat3"
    result = run_fit("--recipe", "fusechat3.yaml", *preference_overrides(out, zoo_dir, cache_dir, reward_model),
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fusechat3_builds_pairs_trains_sft_then_dpo_and_compares_the_three(fusechat3_run):
    out, result = fusechat3_run
    summary = [line for line in result.stdout.splitlines() if line.startswith(("sft: ", "preference: "))]
    assert len(summary) == 2 and all(" kept, " in line and " dropped" in line for line in summary)
    sft_rows = [json.loads(line) for line in (out / "pairs" / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "pairs" / "preference.jsonl").read_text().splitlines()]
    assert sft_rows and pairs and not {r["prompt_id"] for r in sft_rows} & {p["prompt_id"] for p in pairs}
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert all(r["messages"][-1] == {"role": "assistant", "content": r["response"]} for r in sft_rows)
    # the SFT is a run of its own, and DPO starts from its export, which is also the reference
    assert (out / "branches" / "sft" / "stages" / "export.json").is_file()
    reference = np.load(out / "reference" / "logps.npy")
    assert reference.shape == (len(pairs), 2) and np.isfinite(reference).all()
    results = json.loads((out / "results.json").read_text())
    assert list(results["validation"]) == ["target", "sft", "fusechat3"]
    assert set(results["reward"]) == {"target", "sft", "fusechat3"}
    rows = metrics(out)
    trained = [r for r in rows if "train/loss" in r]
    assert trained and all(k in trained[-1] for k in ("train/rewards/chosen", "train/rewards/rejected",
                                                       "train/rewards/accuracies", "train/rewards/margins",
                                                       "train/logps/chosen", "train/logps/rejected"))
    # the first step is at the reference: every log-ratio is 0, the loss log 2
    assert trained[0]["train/loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert trained[0]["train/rewards/margins"] == pytest.approx(0, abs=1e-5)


def test_the_dpo_export_reloads_and_differs_from_the_sft_model(fusechat3_run, zoo_dir):
    out, _ = fusechat3_run
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    assert model.generate(**prompt, max_new_tokens=4, do_sample=False).shape[1] > prompt["input_ids"].shape[1]
    dpo = load_file(out / "model" / "model.safetensors")
    sft = load_file(out / "branches" / "sft" / "model" / "model.safetensors")
    assert dpo.keys() == sft.keys() and any(not torch.equal(dpo[k], sft[k]) for k in dpo)


def test_killed_during_dpo_it_resumes_at_the_exact_batch(fusechat3_run, tmp_path, zoo_dir, cache_dir, reward_model):
    reference, _ = fusechat3_run
    out = tmp_path / "run"
    # The finished run with its training undone: samples, pairs, SFT and reference are reused, only DPO reruns.
    shutil.copytree(reference, out)
    for stage in ("train", "export", "evaluate"):
        (out / "stages" / f"{stage}.json").unlink()
    shutil.rmtree(out / "checkpoints")
    shutil.rmtree(out / "model")
    kept = [line for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" not in json.loads(line)]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    args = preference_overrides(out, zoo_dir, cache_dir, reward_model)
    run = start_fit("--recipe", "fusechat3.yaml", *args)
    last = out / "checkpoints" / "last.ckpt"  # the DPO's (the SFT's are in branches/sft/)
    wait_until(run, last.exists, 400)
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    assert not (out / "stages" / "train.json").exists(), "the run finished before it was killed"
    saved = torch.load(last, weights_only=False)["global_step"]
    result = run_fit("--recipe", "fusechat3.yaml", *args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r["step"] for r in metrics(out) if "train/loss" in r]
    total = max(steps) + 1
    assert sorted(set(steps)) == list(range(total)) and all(steps.count(step) == 1 for step in range(saved))
    ours, uninterrupted = (load_file(folder / "model" / "model.safetensors") for folder in (out, reference))
    assert all(torch.equal(ours[k], uninterrupted[k]) for k in ours)  # bit for bit the uninterrupted run's weights


def test_another_loss_in_the_same_folder_reruns_only_the_preference_training(fusechat3_run, tmp_path, zoo_dir,
                                                                              cache_dir, reward_model):
    from fusion.pipeline import read_records, stage_states
    from fusion.recipe import load_recipe

    reference, _ = fusechat3_run
    out = tmp_path / "moved"
    shutil.copytree(reference, out)  # a moved run folder resumes: its records hold relative paths
    args = preference_overrides(out, zoo_dir, cache_dir, reward_model, **{"preference.loss_type": "ipo"})
    states = {stage.name: state for stage, _, state in stage_states(
        load_recipe("fusechat3.yaml", args), get_method("fusechat3").stages, read_records(out))}
    assert states == {"sample": "done", "score": "done", "pairs": "done", "sft": "done", "reference": "done",
                      "baseline": "done", "accuracy": "done", "train": "stale", "export": "stale",
                      "evaluate": "stale"}
    samples = {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.jsonl")}
    result = run_fit("--recipe", "fusechat3.yaml", *args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage sample: already done" in result.stdout and "stage reference: already done" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.jsonl")} == samples
    assert "IPO" in json.loads((out / "results.json").read_text())["module"]["objective"]


def test_the_table_keeps_a_variant_only_under_the_settings_it_was_made_with(fusechat3_run, tmp_path, zoo_dir,
                                                                          cache_dir, reward_model):
    from fusion.errors import FusionError
    from fusion.experiments.fusechat3_table import fit

    reference, _ = fusechat3_run
    out, save_as = tmp_path / "fusechat3", tmp_path / "dpo.json"
    shutil.copytree(reference, out)
    args = [a for a in preference_overrides(out, zoo_dir, cache_dir, reward_model) if not a.startswith("output_dir=")]
    saved = fit("fusechat3.yaml", out, args, save_as)  # the finished run: every stage skipped, the variant saved
    recorded = {p.stem: json.loads(p.read_text())["key"] for p in (out / "stages").glob("*.json")}
    assert saved["stage_keys"] == recorded and json.loads(save_as.read_text()) == saved
    assert fit("fusechat3.yaml", out, args, save_as) == saved  # found again under the same settings
    with pytest.raises(FusionError, match="dpo.json holds a variant made with other settings"):
        fit("fusechat3.yaml", out, [*args, "preference.loss_type=ipo"], save_as)


def test_wrpo_samples_the_sft_model_and_trains_on_triples_with_a_growing_alpha(tmp_path, zoo_dir, cache_dir,
                                                                               reward_model):
    out = tmp_path / "wrpo"
    result = run_fit("--recipe", "wrpo.yaml", *preference_overrides(out, zoo_dir, cache_dir, reward_model, **{
        "preference.samples": 3, "preference.max_new_tokens": 16, "preference.alpha": 0.5}), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrpo triples: " in result.stdout
    triples = [json.loads(line) for line in (out / "pairs" / "wrpo.jsonl").read_text().splitlines()]
    assert triples and all(t["chosen_reward"] > t["rejected_reward"] for t in triples)
    own = [json.loads(line) for f in sorted((out / "samples").glob("sft-*/shard-*.jsonl"))
           for line in f.read_text().splitlines()]
    assert {r["model"] for r in own} == {"sft"} and len(own) % 3 == 0
    assert np.load(out / "reference" / "logps.npy").shape == (len(triples), 3)
    trained = [r for r in metrics(out) if "train/loss" in r]
    alphas = [r["train/alpha"] for r in trained]
    assert alphas[0] == 0 and alphas == sorted(alphas) and 0 < alphas[-1] <= 0.5
    assert {"train/rewards/source_accuracies", "train/rewards/target_accuracies"} <= set(trained[-1])
    assert list(json.loads((out / "results.json").read_text())["validation"]) == ["target", "sft", "wrpo"]


def test_dpo_trains_on_a_file_of_pairs_with_its_reference_precomputed(tmp_path, zoo_dir, cache_dir):
    rows = [{"prompt": f"Is {a} + {b} = {a + b}?", "chosen": "Yes, it is.", "rejected": "No."}
            for a in range(6) for b in range(4)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo"
    result = run_fit("--recipe", "fusechat3.yaml", "method=dpo", f"data.source={data}", *tiny_overrides(
        out, zoo_dir, cache_dir, **{"chat.max_length": 64, "preference.max_prompt_length": 32, "preference.beta": 0.5,
                                    "trainer.batch_size": 4, "trainer.max_steps": 12, "trainer.max_epochs": 3,
                                    "optim.lr": 1e-3, "trainer.val_every_n_steps": 1000, "evaluate.questions": 4}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.load(out / "reference" / "logps.npy").shape == (len(rows), 2)
    trained = [r for r in metrics(out) if "train/loss" in r]
    assert trained[0]["train/loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert max(r["train/loss"] for r in trained[-3:]) < 0.5  # it learns to prefer the chosen answers
    assert all(r["train/rewards/accuracies"] == 1 for r in trained[-3:])


def test_responses_are_labelled_after_the_same_prompt_and_batched_in_blocks(tmp_path, zoo_dir):
    path = resolve_model("zoo:chat-target", "small", zoo_dir)
    rows = [{"prompt": "What is 2 + 3?", "chosen": "It is 5.", "rejected": "6 or maybe 7"},
            {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = ChatConfig(max_length=64)
    validation = ChatDataModule(DataConfig(source="embedded", cache_dir=str(tmp_path)), chat, path, 2)
    dm = PreferenceDataModule(DataConfig(source=str(data), cache_dir=str(tmp_path)), chat, path, 2, 0, 32, PAIR,
                              validation)
    dm.prepare_data()
    dm.setup()
    tokenizer = AutoTokenizer.from_pretrained(path)
    for row in dm.train_set:
        chosen, rejected = (row[f"{k}_labels"] for k in PAIR)
        prompt = next(i for i, label in enumerate(chosen) if label != IGNORE_INDEX)
        assert row["chosen_input_ids"][:prompt] == row["rejected_input_ids"][:prompt]  # one prompt, unlabelled
        assert all(label == IGNORE_INDEX for label in rejected[:prompt])
        answer = tokenizer.decode([t for t in chosen if t != IGNORE_INDEX])
        assert answer.startswith(("It is 5.", "Hello"))
    batch = PreferenceBatch(dm.pad_id, PAIR, np.array([[-1.0, -2.0], [-3.0, -4.0]]))([dm.train_set[1],
                                                                                     dm.train_set[0]])
    assert batch["ref_logps"].tolist() == [-3.0, -1.0, -4.0, -2.0]  # [chosen of both rows; rejected of both rows]
    assert batch["input_ids"].shape[0] == 4 and batch["index"].tolist() == [1, 0]
    assert batch["input_ids"][0, :len(dm.train_set[1]["chosen_input_ids"])].tolist() == \
        dm.train_set[1]["chosen_input_ids"]


def test_an_overlong_pair_loses_the_prompts_start_first_then_the_responses_end():
    def seq(prompt, response):
        return list(range(prompt + response)), [IGNORE_INDEX] * prompt + [1] * response

    short = [seq(4, 3), seq(4, 5)]
    assert fit_lengths(short, 10, 3) == (short, "whole")
    fitted, status = fit_lengths([seq(8, 3), seq(8, 2)], 10, 6)  # 11 > 10: the prompt keeps its last 6 tokens
    assert status == "prompt truncated" and [len(ids) for ids, _ in fitted] == [9, 8]
    assert fitted[0][0][:2] == [2, 3]
    fitted, status = fit_lengths([seq(8, 9), seq(8, 2)], 10, 6)  # still too long: the responses are cut
    assert status == "responses cut" and [len(ids) for ids, _ in fitted] == [10, 8]


@pytest.mark.parametrize("changes, message", [
    (["preference.beta=0"], "'preference.beta': must be positive"),
    (["preference.max_prompt_length=300"], "'preference.max_prompt_length'"),
    (["pairs.sft_share=1.0"], "'pairs.sft_share': must be in (0, 1)"),
    (["preference.label_smoothing=0.1", "preference.loss_type=ipo"], "'preference.label_smoothing'"),
    (["method=dpo"], "'data.source': dpo trains on preference rows"),
    (["preference.reference=online", "trainer.strategy=fsdp"], "'preference.reference': online"),
])
def test_bad_preference_keys_are_named_before_anything_runs(changes, message, tmp_path):
    result = run_fit("--recipe", "fusechat3.yaml", f"output_dir={tmp_path / 'run'}", *changes)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe, expected", [
    ("fusechat3-llama31-8b.yaml", ["length-normalised DPO (loss sigmoid_norm, beta 10;", "lr 8e-07",
                                   "sft       adamw lr 5e-06 cosine (warmup 0.1), batch 2 x 8, 3 epoch(s)"]),
    ("wrpo-llama3-8b.yaml", ["WRPO (loss sigmoid", "beta 0.01, α 0 -> 0.1 over the optimizer steps", "lr 3e-07",
                             "batch 2 x 8 accumulation per device", "prompts cut to"]),
])
def test_the_paper_recipes_pass_dry_run_with_the_papers_settings(recipe, expected):
    result = run_fit("--recipe", recipe, "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    missing = [text for text in expected if text not in result.stdout]
    assert not missing, result.stdout


def test_the_table_reads_what_the_folders_latest_preference_training_saw(tmp_path):
    from fusion.experiments.fusechat3_table import training_seen

    def write(stage: str, result: dict) -> None:
        (tmp_path / "stages").mkdir(exist_ok=True)
        (tmp_path / "stages" / f"{stage}.json").write_text(json.dumps({"key": "k", "result": result}))

    write("pairs", {"counts": {"sft": {"kept": 561}, "preference": {"kept": 256}}})
    write("train", {"global_step": 16})
    # DPO trained first (accuracy 0), then LN-DPO in the same folder (its steps start again); validation rows between
    rows = [{"step": s, "train/loss": 0.7, "train/rewards/accuracies": 0.0, "train/rewards/margins": -1.0}
            for s in range(4, 20, 4)]
    rows += [{"step": 19, "val/loss": 1.0}]
    rows += [{"step": s, "train/loss": 0.6, "train/rewards/accuracies": s / 16, "train/rewards/margins": s / 8}
             for s in range(4, 20, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = training_seen(tmp_path)
    assert seen == {"sft_examples": 561, "preference_examples": 256, "steps": 16, "reward_accuracy": 1.0,
                    "reward_margin": 2.0}  # the last quarter of the latest training's 4 rows: step 16 alone
    write("on-policy", {"counts": {"kept": 140}})  # WRPO: its triples are the preference examples
    assert training_seen(tmp_path)["preference_examples"] == 140


def test_the_table_gives_the_mean_reward_and_its_orderings_when_the_runs_had_a_reward_model():
    from fusion.experiments.fusechat3_table import ORDERING, claims, markdown, summarise

    models = {m for pair in ORDERING for m in pair}
    # three seeds; "+ wrpo" is above "+ dpo" in reward by 0.5 ± 0.1 but level in accuracy
    per_seed = {s: {m: {"accuracy": {"code": 0.2, "stdlib": 0.1}, "validation": {"val/perplexity": 9.0},
                        "reward": {"code": 1.0 + s / 10, "stdlib": 0.0}} for m in models} for s in range(3)}
    for s in range(3):
        per_seed[s]["+ wrpo"]["reward"] = {"code": 1.5 + s / 10 + (0.1 if s == 2 else 0.0), "stdlib": 0.5}
    found = {c["claim"]: c for c in claims(per_seed)}
    wrpo = found["+ wrpo > + dpo"]
    assert wrpo["mean"] == 0 and not wrpo["beyond_2std"]
    assert wrpo["reward"]["per_seed"] == pytest.approx([0.5, 0.5, 0.55]) and wrpo["reward"]["beyond_2std"]
    table = markdown(summarise(per_seed), per_seed, list(found.values()))
    assert "| mean reward |" in table.splitlines()[0]
    assert "| + wrpo > + dpo | +0.0 ± 0.0 | not beyond 2σ | +0.517 ± 0.029 | yes |" in table
    for s in range(3):  # one run without a reward model: no reward column, no reward orderings
        per_seed[s]["target"]["reward"] = None
    table = markdown(summarise(per_seed), per_seed, claims(per_seed))
    assert "mean reward" not in table and "| + wrpo > + dpo | +0.0 ± 0.0 | not beyond 2σ |" in table
