"""The zoo's reward model, ``zoo:chat-reward``: a Bradley-Terry scorer of answers to the chat skills.

FuseChat-3.0 ranks sampled answers with a reward model (ArmoRM) and reports the mean reward of a model's answers
beside its accuracy. The embedded recipes need one that no one downloads, so the zoo trains one, the way reward models
are trained (TRL's `RewardTrainer`): the pivot ``chat-target`` with a one-logit head (`LlamaForSequenceClassification`,
its tokenizer and Llama-3 template), trained on pairs of answers to the skills' *train* prompts with the loss
``-log σ(r(chosen) - r(rejected))`` plus a small ``(r(chosen) + r(rejected))²`` term that keeps rewards centred on 0
(TRL's ``center_rewards_coefficient``), so a mean reward reads the same across models. The pairs of a prompt:

- its reference answer over each answer of the zoo's three chat models that the skill's verifier fails (greedy, as
  the chat evaluations decode: the mistakes these models make);
- its reference answer, and each passing model answer, over the reference answer of another task of the same skill
  (the right form for another question: the scorer has to read the question).

The two kinds teach different things: the first, what a wrong answer of these models looks like; the second, that an
answer must fit its question. A ~1M-parameter scorer cannot do the arithmetic itself, so on arithmetic it judges
mostly the form, as a small real reward model would. ``reward.json`` records, on held-out *test* prompts, how often it
ranks the reference above each kind of wrong answer, and how often a passing greedy answer of the chat models above a
failing one of the same skill: what its mean reward is worth as a second opinion beside the accuracy.

Built on the first request for ``zoo:chat-reward`` (`fusion.zoo.build_reward`), after the chat models, into
``<zoo>/<CHAT_FOLDER>/reward-<REWARD_VERSION>``, ``reward.json`` written last. Full size: ~2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fusion.chat_zoo import CHAT_BASES, CHAT_MODELS

REWARD_JSON = "reward.json"  # the reward model's record, written last
REWARD_VERSION = "1"  # bump when its recipe changes: it names its folder
REWARD_FOLDER = f"reward-{REWARD_VERSION}"
SEED = 8765
CENTER = 0.01  # weight of the (r_chosen + r_rejected)^2 term


@dataclass(frozen=True)
class _RewardSize:
    prompts_per_skill: int  # train prompts per skill the pairs come from
    eval_per_skill: int  # held-out test prompts per skill behind reward.json's numbers
    max_new_tokens: int  # the chat models' answers, as long as the chat evaluations let them be
    steps: int
    batch: int  # pairs per step
    lr: float


_SIZES = {
    "full": _RewardSize(prompts_per_skill=400, eval_per_skill=150, max_new_tokens=64, steps=600, batch=16, lr=1e-3),
    # For tests: a few seconds.
    "small": _RewardSize(prompts_per_skill=40, eval_per_skill=12, max_new_tokens=24, steps=60, batch=8, lr=3e-3),
}


def build_reward_model(folder: Path, chat_folder: Path, size: str, progress: bool) -> None:
    """Train the reward model from the chat models in ``chat_folder`` into the empty ``folder``, ``reward.json``
    last. The caller (`fusion.zoo.build_reward`) holds the lock, makes torch deterministic and renames the folder."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from fusion.data.skills import SKILLS, skill_conversations

    cfg, start = _SIZES[size], time.time()
    pivot = chat_folder / CHAT_BASES["chat-target"]
    tokenizer = AutoTokenizer.from_pretrained(pivot)
    train = [c for s in SKILLS for c in skill_conversations("train", (s,), cfg.prompts_per_skill)]
    test = [c for s in SKILLS for c in skill_conversations("test", (s,), cfg.eval_per_skill)]
    answers = _model_answers(chat_folder, train + test, cfg.max_new_tokens)
    rng = random.Random(SEED)
    train_pairs, _ = _pairs(train, answers, rng)
    test_pairs, kinds = _pairs(test, answers, rng)

    torch.manual_seed(SEED)
    model = LlamaForSequenceClassification.from_pretrained(pivot, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    encode = _Encoder(tokenizer)
    losses = _train(model, [(encode(p, c), encode(p, r)) for p, c, r in train_pairs], cfg, tokenizer.pad_token_id,
                    progress=progress, desc=f"zoo {size} chat-reward")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder, save_jinja_files=False)

    chosen = _rewards(model, [encode(p, c) for p, c, _ in test_pairs], tokenizer.pad_token_id)
    rejected = _rewards(model, [encode(p, r) for p, _, r in test_pairs], tokenizer.pad_token_id)
    accuracy: dict[str, dict[str, float]] = {}
    for kind in sorted(set(kinds)):
        for skill in SKILLS:
            wins = [c > r for c, r, k, (p, _, _) in zip(chosen, rejected, kinds, test_pairs)
                    if k == kind and p["skill"] == skill]
            if wins:
                accuracy.setdefault(kind, {})[skill] = round(sum(wins) / len(wins), 4)
    record = {
        "version": REWARD_VERSION, "size": size, "seed": SEED, "base": "chat-target",
        "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
        "train": {"prompts_per_skill": cfg.prompts_per_skill, "pairs": len(train_pairs), "steps": cfg.steps,
                  "batch_pairs": cfg.batch, "lr": cfg.lr, "center_rewards_coefficient": CENTER,
                  "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4)},
        "eval": {"split": "test", "prompts_per_skill": cfg.eval_per_skill,
                 "pairs": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
                 "pairwise_accuracy": accuracy,
                 "passing_over_failing": _passing_over_failing(model, encode, test, answers, tokenizer.pad_token_id)},
        "build_seconds": round(time.time() - start, 1),
    }
    (folder / REWARD_JSON).write_text(json.dumps(record, indent=2) + "\n")


class _Encoder:
    """(prompt conversation, answer text) -> token ids, rendered as `fusion.data.rewards` renders what it scores."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, conversation: dict, answer: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template(conversation["messages"][:-1] + [
            {"role": "assistant", "content": answer}], tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _model_answers(chat_folder: Path, conversations: list[dict], max_new_tokens: int) -> dict[str, list]:
    """Per conversation id, each chat model's greedy answer to its prompt with the verifier's verdict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion.data.generate import greedy_generate
    from fusion.data.verify import check_many

    answers: dict[str, list] = {c["id"]: [] for c in conversations}
    for name in CHAT_MODELS:
        path = chat_folder / CHAT_BASES[name]
        tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
        prompts = [tokenizer(tokenizer.apply_chat_template(c["messages"][:-1], tokenize=False,
                                                           add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"] for c in conversations]
        generated = greedy_generate(model, prompts, [model.generation_config.eos_token_id], tokenizer.pad_token_id,
                                    max_new_tokens)
        texts = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]
        passed = check_many((c["skill"], t, c["reference"]) for c, t in zip(conversations, texts))
        for c, text, ok in zip(conversations, texts, passed):
            answers[c["id"]].append((text, bool(ok)))
    return answers


def _pairs(conversations: list[dict], answers: dict[str, list], rng: random.Random):
    """(prompt, chosen, rejected) triples by the module docstring's rules, and each one's kind."""
    by_skill: dict[str, list[dict]] = {}
    for c in conversations:
        by_skill.setdefault(c["skill"], []).append(c)
    pairs, kinds = [], []
    for c in conversations:
        reference = c["messages"][-1]["content"]
        others = [o for o in by_skill[c["skill"]] if o["reference"] != c["reference"]]
        other = rng.choice(others)["messages"][-1]["content"]
        for text, ok in answers[c["id"]]:
            if not ok:
                pairs.append((c, reference, text))
                kinds.append("reference_over_failing_answer")
        for chosen in [reference] + [t for t, ok in answers[c["id"]] if ok and t != reference]:
            pairs.append((c, chosen, other))
            kinds.append("answer_over_another_tasks_answer")
    return pairs, kinds


def _score(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    from fusion.data.rewards import _Pad  # right padding, as the scoring stage pads

    batch = _Pad(pad_id)([{"input_ids": row, "row": i} for i, row in enumerate(rows)])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


def _train(model, pairs: list[tuple[list[int], list[int]]], cfg: _RewardSize, pad_id: int, progress: bool,
           desc: str) -> list[float]:
    """Bradley-Terry with centring: AdamW, 10 % linear warmup, linear decay to a tenth; random pairs per step."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup, losses = max(1, cfg.steps // 10), []
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    for step in bar:
        scale = (step + 1) / warmup if step < warmup else 1 - 0.9 * (step - warmup) / max(1, cfg.steps - warmup)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * scale
        batch = [pairs[i] for i in torch.randint(len(pairs), (cfg.batch,), generator=generator).tolist()]
        rewards = _score(model, [c for c, _ in batch] + [r for _, r in batch], pad_id)
        chosen, rejected = rewards[:cfg.batch], rewards[cfg.batch:]
        loss = -F.logsigmoid(chosen - rejected).mean() + CENTER * ((chosen + rejected) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return losses


@torch.no_grad()
def _rewards(model, rows: list[list[int]], pad_id: int, batch: int = 64) -> list[float]:
    return [v for i in range(0, len(rows), batch) for v in _score(model, rows[i:i + batch], pad_id).tolist()]


def _passing_over_failing(model, encode, conversations: list[dict], answers: dict[str, list],
                          pad_id: int) -> dict[str, float | None]:
    """Per skill, the chance that a passing greedy answer of the chat models outscores a failing one (the AUROC of
    the reward as a test of correctness); None where one of the two kinds is missing."""
    scored: dict[str, list[tuple[float, bool]]] = {}
    for c in conversations:
        texts = answers[c["id"]]
        values = _rewards(model, [encode(c, t) for t, _ in texts], pad_id)
        scored.setdefault(c["skill"], []).extend((v, ok) for v, (_, ok) in zip(values, texts))
    result = {}
    for skill, items in scored.items():
        good, bad = [v for v, ok in items if ok], [v for v, ok in items if not ok]
        wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
        result[skill] = round(wins / (len(good) * len(bad)), 4) if good and bad else None
    return result


def format_reward(record: dict) -> str:
    """reward.json as a few lines: per skill the held-out pairwise accuracies."""
    lines = [f"chat-reward  {record['parameters']:,} parameters, {record['train']['pairs']} train pairs, "
             f"{record['train']['steps']} steps, final loss {record['train']['final_loss']}"]
    rows = {**record["eval"]["pairwise_accuracy"],
            "passing_over_failing (AUROC)": record["eval"]["passing_over_failing"]}
    skills = list(record["eval"]["passing_over_failing"])
    lines.append(f"{'held-out test':<36}" + "".join(f" {s:>10}" for s in skills))
    for name, values in rows.items():
        lines.append(f"{name:<36}" + "".join(f" {'-' if values.get(s) is None else format(values[s], '.1%'):>10}"
                                             for s in skills))
    return "\n".join(lines)
