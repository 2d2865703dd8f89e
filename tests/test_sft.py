"""SFT end to end on the small chat zoo, as a user runs it; the assistant-only loss; the chat recipes' checks."""

import json

import pytest
import torch
from conftest import run_fit, tiny_overrides, tiny_reward_model
from transformers import AutoTokenizer

from fusion.config import OptimConfig
from fusion.data.chat import ChatEncoder, pad_batch
from fusion.data.skills import skill_conversations
from fusion.modules.sft import SFTModule
from fusion.zoo import resolve_model


def sft_overrides(out, zoo_dir, cache_dir, **changes):
    values = {"data.block_size": 128, "trainer.max_steps": 30, "trainer.val_every_n_steps": 15,
              "evaluate.questions": 8, "evaluate.max_new_tokens": 24, "optim.lr": 3e-3, "chat.max_length": 160}
    values.update(changes)
    return tiny_overrides(out, zoo_dir, cache_dir, **values)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, zoo_dir, cache_dir):
    out = tmp_path_factory.mktemp("runs") / "sft"
    reward_model = tiny_reward_model(tmp_path_factory.mktemp("rm"), zoo_dir)
    result = run_fit("--recipe", "sft.yaml", *sft_overrides(out, zoo_dir, cache_dir,
                                                            **{"scoring.reward_model": reward_model}), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_sft_reports_accuracy_and_perplexity_per_skill_before_and_after(sft_run):
    out, result = sft_run
    results = json.loads((out / "results.json").read_text())
    accuracy = results["accuracy"]
    assert set(accuracy["before"]) == set(accuracy["after"]) == {"arithmetic", "stdlib", "code"}
    assert all(0 <= v <= 1 for when in accuracy.values() for v in when.values())
    after = results["validation"]["sft (after, exported)"]
    before = results["validation"]["zoo:chat-target (before)"]
    assert {"val/perplexity/arithmetic", "val/perplexity/stdlib", "val/perplexity/code"} <= after.keys()
    assert after["val/perplexity"] < before["val/perplexity"]  # 30 steps on the assistant's tokens
    assert "Held-out accuracy" in (out / "results.md").read_text() and "| arithmetic |" in result.stdout
    assert (out / "accuracy.png").stat().st_size > 1000


def test_with_a_reward_model_the_answers_mean_reward_before_and_after(sft_run):
    out, _ = sft_run
    reward = json.loads((out / "results.json").read_text())["reward"]
    assert set(reward["before"]) == set(reward["after"]) == {"arithmetic", "stdlib", "code"}
    assert all(isinstance(v, float) and abs(v) < 100 for when in reward.values() for v in when.values())
    assert reward["before"] != reward["after"]  # other answers, other rewards
    assert "Mean reward of those answers" in (out / "results.md").read_text()


def test_sft_loss_counts_assistant_tokens_only(zoo_dir):
    path = resolve_model("zoo:chat-target", "small", zoo_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = ChatEncoder(tokenizer, max_length=160)
    rows = [encoder.encode(c["messages"])._asdict() for c in skill_conversations("train", size=2)]
    batch = pad_batch([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], tokenizer.pad_token_id)
    module = SFTModule(path, OptimConfig())
    module.configure_model()
    loss = module.training_loss(batch)
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # training on the prompts too would give another loss
    unmasked = dict(batch, labels=torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100))
    assert module.training_loss(unmasked).item() != pytest.approx(loss.item(), rel=1e-3)


@pytest.mark.parametrize("override, message", [
    ("chat.skills=[arithmetic, poetry]", "recipe key 'chat.skills'"),
    ("chat.template=/no/such/template.jinja", "recipe key 'chat.template'"),
    ("chat.max_length=1", "recipe key 'chat.max_length'"),
    ("evaluate.questions=0", "recipe key 'evaluate.questions'"),
])
def test_bad_chat_keys_are_named(override, message, tmp_path):
    result = run_fit("--recipe", "sft.yaml", f"output_dir={tmp_path / 'run'}", override, "--dry-run")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_paper_sft_twin_dry_run_passes():
    result = run_fit("--recipe", "sft-llama31-8b.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lr 5e-06" in result.stdout and "3 epoch(s)" in result.stdout and "warmup 0.1" in result.stdout
    assert "batch 4 x 4 accumulation per device" in result.stdout and "8 device(s)" in result.stdout


def test_a_template_file_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    from fusion.recipe import load_recipe

    (tmp_path / "chatml.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("sft.yaml", ["chat.template=chatml.jinja"])
    assert recipe.chat.template == str(tmp_path / "chatml.jinja")  # a resume from another folder finds it
    inline = "{{ messages[0]['content'] }}"
    assert load_recipe("sft.yaml", [f"chat.template={inline!r}"]).chat.template == inline


def test_lm_eval_tasks_without_the_harness_fail_before_training(tmp_path, zoo_dir, cache_dir):
    try:
        import lm_eval  # noqa: F401
        pytest.skip("lm-evaluation-harness is installed: the guard does not apply")
    except ImportError:
        pass
    result = run_fit("--recipe", "sft.yaml", "evaluate.lm_eval_tasks=[gsm8k]",
                     *sft_overrides(tmp_path / "x", zoo_dir, cache_dir))
    assert result.returncode == 2 and "pip install -e '.[lm-eval]'" in result.stderr, result.stderr[-2000:]
    assert "evaluate.lm_eval_tasks" in result.stderr and not (tmp_path / "x" / "stages").exists()
