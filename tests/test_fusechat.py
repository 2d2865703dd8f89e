"""FuseChat end to end on the small chat zoo, as a user runs it: pairs, merge, evaluation, resume, an added source;
the chat chunk layout; how teachers are judged on conversations; the recipes' checks."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, run_fit, start_fit, tiny_overrides, wait_until
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.data.chat import IGNORE_INDEX, ChatEncoder
from fusion.data.chat_chunks import chat_chunk
from fusion.data.chunks import sequence_ids, start_token_id
from fusion.data.fused import trained_cross_entropy
from fusion.data.skills import skill_conversations
from fusion.zoo import resolve_model

SOURCES = [{"path": "zoo:chat-gpt2-code", "name": "gpt2-code"}, {"path": "zoo:chat-neox-prose", "name": "neox-prose"}]


def fusechat_overrides(out: Path, zoo_dir: Path, cache_dir: Path, **changes) -> list[str]:
    values = {"representations.dir": str(cache_dir / "representations"), "representations.max_chunks": 96,
              "representations.chunks_per_shard": 32, "representations.batch_size": 16, "trainer.max_steps": 6,
              "trainer.val_every_n_steps": 6, "trainer.checkpoint_every_n_steps": 2, "evaluate.questions": 6,
              "evaluate.max_new_tokens": 16, "chat.max_length": 160, "optim.lr": 3e-3}
    values.update(changes)
    return tiny_overrides(out, zoo_dir, cache_dir, **values)


def recipe_with(tmp_path: Path, **changes) -> str:
    """recipes/fusechat.yaml with top-level ``changes`` (e.g. other teachers), written to ``tmp_path``."""
    recipe = yaml.safe_load((ROOT / "recipes" / "fusechat.yaml").read_text())
    recipe.update(changes)
    path = tmp_path / "fusechat.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def mtimes(folder: Path) -> dict[str, int]:
    """What a pair computed: its records, checkpoints and export (a re-run re-claims the folder: recipe.yaml, .lock)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for part in ("stages", "checkpoints", "model")
            for p in sorted((folder / part).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fusechat_run(tmp_path_factory, zoo_dir, cache_dir):
    out, store = tmp_path_factory.mktemp("runs") / "fusechat", tmp_path_factory.mktemp("store")
    result = run_fit("--recipe", "fusechat.yaml", *fusechat_overrides(out, zoo_dir, cache_dir, **{
        "representations.dir": str(store)}), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_fusechat_trains_a_pair_per_source_merges_them_and_compares_all(fusechat_run):
    out, result = fusechat_run
    results = json.loads((out / "results.json").read_text())
    models = ["pivot", "pair gpt2-code", "pair neox-prose", "merged"]
    assert list(results["validation"]) == models and list(results["accuracy"]) == models
    assert all(set(a) == {"arithmetic", "stdlib", "code"} for a in results["accuracy"].values())
    assert results["validation"]["merged"]["val/perplexity"] < results["validation"]["pivot"]["val/perplexity"]
    for label in ("gpt2-code", "neox-prose"):
        branch = out / "branches" / label
        saved = yaml.safe_load((branch / "recipe.yaml").read_text())
        assert saved["method"] == "chat-fusion" and [t["name"] for t in saved["teachers"]] == ["pivot", label]
        assert (branch / "model" / "config.json").is_file() and (branch / "curves.png").is_file()
    # The pivot's representations are computed once, for the first pair; the second reads them.
    computed = [line for line in result.stdout.splitlines() if "shards to compute" in line]
    assert [line.split(":")[0] for line in computed] == ["[fusion] teacher pivot", "[fusion] teacher gpt2-code",
                                                         "[fusion] teacher neox-prose"], computed
    assert "| merged |" in result.stdout and (out / "accuracy.png").stat().st_size > 1000


def test_the_merge_is_varm_over_the_pairwise_targets_with_the_pivot_as_base(fusechat_run, zoo_dir):
    out, _ = fusechat_run
    pivot = load_file(Path(resolve_model("zoo:chat-target", "small", zoo_dir)) / "model.safetensors")
    pairs = [load_file(out / "branches" / label / "model" / "model.safetensors")
             for label in ("gpt2-code", "neox-prose")]
    merged = load_file(out / "model" / "model.safetensors")
    checked = 0
    for name, base in pivot.items():
        deltas = [p[name].double() - base.double() for p in pairs]
        energy = torch.stack([d.pow(2).mean() for d in deltas])
        if energy.sum() == 0:
            continue
        expected = base.double() + sum(w * d for w, d in zip(energy / energy.sum(), deltas))
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked > len(pivot) // 2
    assert json.loads((out / "model" / "merge.json").read_text())["config"]["merge_method"] == "varm"


def test_the_merged_model_reloads_and_chats_through_the_pivots_template(fusechat_run, zoo_dir):
    out, _ = fusechat_run
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    pivot = AutoTokenizer.from_pretrained(resolve_model("zoo:chat-target", "small", zoo_dir))
    assert tokenizer.chat_template == pivot.chat_template
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    answer = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert answer.shape[1] > prompt["input_ids"].shape[1]


def test_the_table_reuses_a_finished_run_only_under_its_own_settings(fusechat_run):
    from fusion.errors import FusionError
    from fusion.experiments.finished import check_same_settings

    out, _ = fusechat_run
    check_same_settings(out, str(out / "recipe.yaml"), [])  # as it was trained: every stage, pairs included, done
    with pytest.raises(FusionError, match="made with other settings") as refused:
        check_same_settings(out, str(out / "recipe.yaml"), ["merge.method=slerp"])
    stale = str(refused.value).split("its stages ")[1].split(" differ")[0].split(", ")
    assert stale[0] == "merge" and "pairs" not in stale  # what another merge would redo: not the pairs


def test_a_pair_killed_mid_training_resumes_and_the_finished_pair_is_not_redone(tmp_path, zoo_dir, cache_dir):
    out = tmp_path / "run"
    args = fusechat_overrides(out, zoo_dir, cache_dir, **{"trainer.max_steps": 30, "trainer.val_every_n_steps": 1000,
                                                          "trainer.checkpoint_every_n_steps": 4})
    run = start_fit("--recipe", "fusechat.yaml", *args)
    last = out / "branches" / "neox-prose" / "checkpoints" / "last.ckpt"
    wait_until(run, last.exists, 400)
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    saved = torch.load(last, weights_only=False)["global_step"]
    first = out / "branches" / "gpt2-code"
    assert (first / "stages" / "export.json").is_file() and not (out / "stages" / "pairs.json").exists()
    before = mtimes(first)
    result = run_fit("--recipe", "fusechat.yaml", *args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert mtimes(first) == before  # nothing of the finished pair was computed or written again
    rows = [json.loads(line) for line in (out / "branches" / "neox-prose" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    # Resumed from last.ckpt: the steps it held ran once; only those after it (killed unsaved) ran again.
    assert sorted(set(steps)) == list(range(30)) and all(steps.count(step) == 1 for step in range(saved))
    assert (out / "results.json").is_file()


def test_a_source_added_later_with_another_merge_trains_its_pair_only_and_merges_again(tmp_path, zoo_dir,
                                                                                        cache_dir):
    out = tmp_path / "run"
    args = fusechat_overrides(out, zoo_dir, cache_dir)
    one = run_fit("--recipe", recipe_with(tmp_path, teachers=SOURCES[:1]), *args, "merge.method=task_arithmetic",
                  "merge.parameters.weight=0.5", timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    first = mtimes(out / "branches" / "gpt2-code")
    merged = (out / "model" / "model.safetensors").read_bytes()
    two = run_fit("--recipe", recipe_with(tmp_path, teachers=SOURCES), *args, timeout=600)  # and back to VaRM
    assert two.returncode == 0, two.stderr[-3000:]
    assert mtimes(out / "branches" / "gpt2-code") == first
    assert (out / "branches" / "neox-prose" / "stages" / "export.json").is_file()
    assert (out / "model" / "model.safetensors").read_bytes() != merged  # merged again, over both pairs
    assert json.loads((out / "model" / "merge.json").read_text())["config"]["merge_method"] == "varm"
    assert "[fusion] stage baseline: already done, skipped" in two.stdout


def test_chat_chunks_keep_a_templates_start_token_and_add_one_where_it_writes_none(zoo_dir):
    messages = skill_conversations("train", ("arithmetic",))[0]["messages"]
    for name, template_writes_start in (("chat-target", True), ("chat-gpt2-code", False)):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(f"zoo:{name}", "small", zoo_dir))
        encoded = ChatEncoder(tokenizer).encode(messages)
        start = start_token_id(tokenizer)
        chunk = chat_chunk(encoded.input_ids, encoded.labels, encoded.text, start,
                           tokenizer.convert_ids_to_tokens(start))
        if template_writes_start:
            assert chunk["input_ids"] == encoded.input_ids and chunk["labels"] == encoded.labels
        else:
            assert chunk["input_ids"] == [start, *encoded.input_ids] and chunk["labels"][0] == IGNORE_INDEX
            assert chunk["labels"][1:] == encoded.labels
        # What every teacher and the alignment read: [start] + the text's tokens, which are the target's ids.
        assert sequence_ids(tokenizer, [chunk["text"]], [False])[0] == chunk["input_ids"]
        assert chunk["nbytes"] == len(chunk["text"].encode())
        assert not (tokenizer.bos_token and chunk["text"].startswith(tokenizer.bos_token))


def test_teachers_are_judged_on_the_assistant_tokens_they_have_a_prediction_for():
    labels = np.array([5, -100, -100, 7, 8, 9])  # position l predicts label l + 1: positions 2, 3, 4 are trained
    token_ce = np.array([9.0, 9.0, 1.0, 2.0, 0.0], dtype=np.float32)
    fallback = np.array([False, False, False, False, True])  # position 4 fell back: a one-hot, CE 0, not counted
    assert trained_cross_entropy(token_ce, fallback, labels) == pytest.approx(1.5)
    assert trained_cross_entropy(token_ce, np.ones(5, dtype=bool), labels) == pytest.approx(-np.log(1e-4))


@pytest.mark.parametrize("changes, message", [
    ({"teachers": [{"path": "zoo:chat-gpt2-code", "name": "pivot"}]}, "recipe key 'teachers': 'pivot' is the pivot's"),
    ({"teachers": []}, "recipe key 'teachers': method 'fusechat' needs at least one teacher"),
    ({"merge": {"method": "ties"}}, "recipe key 'merge': models[0].parameters.weight is needed by ties"),
    ({"merge": {"method": "varm", "model_parameters": {"mixtral": {"weight": 1}}}},
     "recipe key 'merge.model_parameters.mixtral': no source is labelled so"),
    ({"merge": {"method": "slerp"}, "teachers": SOURCES[:1]}, "slerp interpolates two pairwise targets"),
])
def test_bad_fusechat_keys_are_named_before_anything_runs(changes, message, tmp_path):
    result = run_fit("--recipe", recipe_with(tmp_path, **changes), "--dry-run")
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("recipe", ["fusechat-7b.yaml", "fusechat2-7b.yaml"])
def test_the_paper_recipes_pass_dry_run(recipe):
    result = run_fit("--recipe", recipe, "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fusechat: FuseChat" in result.stdout and "merge     " in result.stdout
