"""Sampling chat models and scoring their responses, on the small chat zoo, as a user runs it (`sample.yaml`)."""

import json

import lightning.pytorch as pl
import pytest
from conftest import run_fit, tiny_overrides, tiny_reward_model
from transformers import AutoTokenizer

from fusion.config import ScoringConfig
from fusion.data.responses import ResponseStore
from fusion.data.rewards import read_scores, score_store, scores_key, verify_rows
from fusion.data.skills import skill_conversations
from fusion.errors import FusionError

PROMPTS, N, PER_SHARD = 5, 2, 4  # 15 prompts (5 per skill): 4 shards per model


def sample_overrides(out, zoo_dir, cache_dir, **changes):
    values = {"sampling.prompts": PROMPTS, "sampling.n": N, "sampling.prompts_per_shard": PER_SHARD,
              "sampling.batch_size": 3}
    values.update(changes)
    return tiny_overrides(out, zoo_dir, cache_dir, **values)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, zoo_dir, cache_dir):
    out = tmp_path_factory.mktemp("runs") / "sample"
    result = run_fit("--recipe", "sample.yaml", *sample_overrides(out, zoo_dir, cache_dir), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def records(out):
    return {name: json.loads((out / "stages" / f"{name}.json").read_text())["result"] for name in ("sample", "score")}


def shard_files(out):
    return sorted((out / "samples").glob("*/*.jsonl"))


def test_every_model_answers_every_prompt_n_times_with_what_a_response_needs(sample_run):
    out, _ = sample_run
    sampled = records(out)["sample"]
    assert set(sampled["models"]) == {"chat-gpt2-code", "chat-neox-prose", "chat-target"}
    expected_ids = [c["id"] for c in skill_conversations("train", size=PROMPTS)]
    for label, model in sampled["models"].items():
        rows = ResponseStore(model["folder"], model["prompts"], model["prompts_per_shard"]).all_rows()
        assert len(rows) == model["responses"] == 3 * PROMPTS * N
        assert [r["prompt_id"] for r in rows[::N]] == expected_ids  # prompt-major, in the prompts' order
        assert [r["sample"] for r in rows[:N]] == list(range(N))
        assert all(r["model"] == label and isinstance(r["text"], str) for r in rows)
        assert all(r["finish_reason"] in ("stop", "length") and r["tokens"] >= 1 for r in rows)
        assert all(r["tokens"] == 64 for r in rows if r["finish_reason"] == "length")  # max_new_tokens
        assert sum(model["finish_reasons"].values()) == len(rows)
    # sampled, not greedy: a prompt's two answers differ somewhere
    rows = [r for m in sampled["models"].values()
            for r in ResponseStore(m["folder"], m["prompts"], m["prompts_per_shard"]).all_rows()]
    assert any(a["text"] != b["text"] for a, b in zip(rows[::2], rows[1::2]))


def test_scores_give_pass_rates_per_model_and_skill_in_a_table_and_a_plot(sample_run):
    out, result = sample_run
    scored = records(out)["score"]
    for model in scored["models"].values():
        assert set(model["skills"]) == {"arithmetic", "stdlib", "code"}
        for stats in model["skills"].values():
            assert stats["responses"] == PROMPTS * N
            assert 0 <= stats["pass_rate"] <= stats["best_of_n"] <= 1
            assert stats["mean_reward"] is None  # no reward model in sample.yaml
    assert "| chat-gpt2-code | code |" in (out / "sampling.md").read_text() and "| chat-target |" in result.stdout
    assert (out / "pass_rates.png").stat().st_size > 1000


def test_a_rerun_samples_only_the_missing_shard_and_writes_what_it_had(sample_run, zoo_dir, cache_dir):
    out, _ = sample_run
    before = {p: (p.read_text(), p.stat().st_mtime_ns) for p in shard_files(out)}
    lost = sorted(p for p in before if p.name.startswith("shard-"))[1]  # one model's second shard
    for p in lost.parent.glob(f"scores-*-{lost.stem.split('-')[1]}.jsonl"):
        p.unlink()
    lost.unlink()
    (out / "stages" / "sample.json").unlink()  # as if the run had been killed while sampling
    (out / "stages" / "score.json").unlink()
    result = run_fit("--recipe", "sample.yaml", *sample_overrides(out, zoo_dir, cache_dir), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"1 of {-(-3 * PROMPTS // PER_SHARD)} shards to sample" in result.stdout
    assert result.stdout.count("shards to sample") == 1  # the other models: nothing to do
    after = {p: (p.read_text(), p.stat().st_mtime_ns) for p in shard_files(out)}
    assert after.keys() == before.keys()
    rewritten = {p for p in after if after[p][1] != before[p][1]}
    assert {p.name.split("-")[-1] for p in rewritten} == {lost.name.split("-")[-1]}  # that shard and its scores
    assert all(after[p][0] == before[p][0] for p in after)  # seeded per batch: the same responses again
    # scores lost with the records intact: the score stage sees it and scores only that shard again
    score_file = next(p for p in after if p.name.startswith("scores-"))
    score_file.unlink()
    result = run_fit("--recipe", "sample.yaml", *sample_overrides(out, zoo_dir, cache_dir), timeout=600)
    assert result.returncode == 0 and "shards to sample" not in result.stdout, result.stderr[-3000:]
    assert "are missing; running it again" in result.stdout and score_file.read_text() == after[score_file][0]


def test_code_that_loops_or_allocates_without_bound_is_stopped_and_fails():
    task = next(c for c in skill_conversations("test", ("code",), size=5))
    right = task["messages"][-1]["content"]
    name = right.split("def ")[1].split("(")[0]
    params = right.split("(")[1].split(")")[0]
    loops = f"```python\ndef {name}({params}):\n    while True:\n        pass\n```"
    allocates = f"```python\ndef {name}({params}):\n    x = [0] * 10**11\n    return x\n```"
    rows = [{"skill": "code", "text": t, "reference": task["reference"]} for t in (loops, allocates, right)]
    rows.append({"skill": None, "text": "anything", "reference": None})  # nothing to check it against
    assert verify_rows(rows, workers=2) == [False, False, True, None]


def _trainer(callbacks):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


def test_reward_model_scores_do_not_depend_on_the_batch(tmp_path, zoo_dir):
    path = tiny_reward_model(tmp_path / "rm", zoo_dir)
    prompts = [{"id": c["id"], "messages": c["messages"][:-1]} for c in skill_conversations("train", size=3)]
    store = ResponseStore(tmp_path / "samples", len(prompts), 4)
    store.open()
    for shard in range(store.n_shards):
        store.write_shard(shard, [{"prompt_id": prompts[i]["id"], "sample": 0, "text": "The answer is " + "7" * i,
                                   "skill": None, "reference": None} for i in store.shard_prompts(shard)])
    rewards = {}
    for batch_size in (1, 5):
        scoring = ScoringConfig(reward_model=path, batch_size=batch_size, verify=False)
        key = scores_key(scoring, f"rm-batch-{batch_size}")
        score_store(store, prompts, scoring, key, path, "float32", _trainer)
        rewards[batch_size] = [r["reward"] for r in read_scores(store, key)]
    assert len(rewards[1]) == len(prompts) and len(set(rewards[1])) > 1
    assert rewards[1] == pytest.approx(rewards[5], abs=1e-5)  # padding and batch neighbours change nothing


def test_reward_model_with_code_on_the_hub_needs_the_opt_in(tmp_path, zoo_dir):
    from fusion.data.rewards import reward_pad_id

    path = tiny_reward_model(tmp_path / "rm", zoo_dir)
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert reward_pad_id(path, tokenizer, trust_remote_code=False) == config["pad_token_id"]  # before the code
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomRewardModel"}
    (tmp_path / "rm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FusionError, match="scoring.trust_remote_code: true"):
        reward_pad_id(path, tokenizer, trust_remote_code=False)


def test_bad_sampling_keys_are_named(tmp_path, zoo_dir, cache_dir):
    for override, key in (("sampling.models=[]", "sampling.models"), ("sampling.n=0", "sampling.n"),
                          ("sampling.models=[{path: zoo:nope}]", "sampling.models[0].path")):
        result = run_fit("--recipe", "sample.yaml", "--dry-run", override,
                         *tiny_overrides(tmp_path / "x", zoo_dir, cache_dir))
        assert result.returncode == 2 and key in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_vllm_backend_without_vllm_says_how_to_install_it(tmp_path, zoo_dir, cache_dir):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed: the guard does not apply")
    except ImportError:
        pass
    result = run_fit("--recipe", "sample.yaml", *sample_overrides(tmp_path / "v", zoo_dir, cache_dir,
                                                                   **{"sampling.backend": "vllm"}))
    assert result.returncode == 2 and "pip install -e '.[vllm]'" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_prompts_from_a_dataset_of_prompts_or_conversations(tmp_path):
    from fusion.data.responses import load_prompts
    from fusion.recipe import load_recipe

    rows = [{"prompt": "What is 2 + 2?", "prompt_id": "p1"},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chats = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye"}],
              "skill": "arithmetic", "reference": 4}]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    recipe = load_recipe("sample.yaml", [f"data.source={tmp_path / 'prompts.jsonl'}",
                                         f"data.cache_dir={tmp_path / 'cache'}"])
    prompts = load_prompts(recipe)
    assert [p["id"] for p in prompts] == ["p1", "1"]
    assert prompts[0]["messages"] == [{"role": "user", "content": "What is 2 + 2?"}]
    assert [m["role"] for m in prompts[1]["messages"]] == ["system", "user"]
    recipe = load_recipe("sample.yaml", [f"data.source={tmp_path / 'chats.jsonl'}",
                                         f"data.cache_dir={tmp_path / 'cache'}"])
    (prompt,) = load_prompts(recipe)  # the conversation up to its last assistant turn
    assert [m["content"] for m in prompt["messages"]] == ["Hi", "Hello", "Bye?"]
    assert (prompt["skill"], prompt["reference"]) == ("arithmetic", 4)


def test_two_ranks_sample_and_score_what_one_process_does(tmp_path, zoo_dir, cache_dir):
    """DDP over two CPU processes: each rank samples and scores every other missing shard, and the files are the
    ones a single process writes, byte for byte (batches are seeded by their first prompt, not by rank)."""
    runs = {}
    for devices in (1, 2):
        out = tmp_path / f"ranks{devices}"
        ddp = {"trainer.devices": devices, "trainer.strategy": "ddp", "trainer.process_group_backend": "gloo"}
        result = run_fit("--recipe", "sample.yaml", *sample_overrides(out, zoo_dir, cache_dir,
                                                                       **(ddp if devices == 2 else {})), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[devices] = {p.relative_to(out): p.read_bytes() for p in shard_files(out)}
    assert runs[1].keys() == runs[2].keys() and len(runs[1]) == 3 * 2 * -(-3 * PROMPTS // PER_SHARD)
    assert all(runs[1][name] == runs[2][name] for name in runs[1])
