"""The zoo's chat models: its three base models given a chat template each and fine-tuned on the chat skills.

FuseChat fuses chat models that disagree on more than their vocabularies: each writes conversations in its own
template, with its own special tokens. So each base model of the zoo gets a different family, as real checkpoints
have, and is taught the skills of `fusion.data.skills` by supervised fine-tuning on their train conversations, the
loss on the assistant's tokens only (`fusion.data.chat.ChatEncoder`):

- ``chat-target`` (the pivot): the target with a Llama-3 template (``<|start_header_id|>user<|end_header_id|>\\n\\n
  ...<|eot_id|>``), fine-tuned for 40 steps on all three skills: it has seen the format and answers nothing right,
  so that SFT and fusion have something to give on every skill;
- ``chat-gpt2-code``: gpt2-code with ChatML (``<|im_start|>user\\n...<|im_end|>``), fine-tuned on ``code`` (90 %);
- ``chat-neox-prose``: neox-prose with OpenChat's template (``GPT4 Correct User: ...<|end_of_turn|>``), fine-tuned on
  ``arithmetic`` and ``stdlib`` only.

~1M-parameter models learn these skills slowly: code (gpt2-code passes 24 % of the tests after 300 code-only
steps, 91 % after 600), arithmetic and the stdlib questions only after 1,000-3,000 steps (`recipes/sft.yaml` trains
the pivot 3,000 steps on all three: 13.5 / 8.5 / 79.5 % after, on 200 held-out questions each). The build affords
about 2,600 steps, so each specialist is clearly better than the pivot on its own skills, and the pivot has seen
the format and answers nothing right, so that SFT and fusion have something to give on every skill (chat.json, full
size, built in 202 s):

    model            template  steps  acc arith  acc stdli   acc code  ppl arith  ppl stdli   ppl code
    chat-target      llama-3      40       0.0%       0.0%       0.0%      12.64     197.79      27.63
    chat-gpt2-code   chatml     1000       6.7%       0.0%      92.0%       1.60      25.91       1.04
    chat-neox-prose  openchat   1600       8.0%       4.7%       0.0%       1.40       8.37    9775.82

A template's special tokens are added to the tokenizer and their embedding rows (input and output) start at the mean
of the other tokens' rows; NeoX's padded embedding matrix already has rows for them, as real NeoX and Qwen
checkpoints do. The template is saved in ``tokenizer_config.json``, so ``AutoTokenizer.from_pretrained(path)
.apply_chat_template`` renders it, and ``generation_config.json``'s ``eos_token_id`` is the end-of-turn id, so that
``generate`` stops where a turn ends.

The three are built together on the first request for any of them (``zoo:chat-target``; `fusion.zoo.build_chat`),
into ``<zoo>/chat-<CHAT_VERSION>/<base model>``, with ``chat.json`` written last: per model its template, recipe, and
on held-out test questions of each skill the greedy accuracy (answers checked by `fusion.data.verify.check`) and the
perplexity of the assistant's tokens, in the unit of ``zoo.json`` (summed NLL / the number of the pivot's tokens).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CHAT_JSON = "chat.json"  # the chat models' record, written last: a chat folder without it is incomplete
CHAT_VERSION = "2"  # bump when a chat recipe changes: it names the chat models' folder in the zoo
CHAT_FOLDER = f"chat-{CHAT_VERSION}"
# ``zoo:chat-<base>``: the chat model built from zoo model ``<base>``, in ``<zoo>/<CHAT_FOLDER>/<base>``.
CHAT_MODELS: tuple[str, ...] = ("chat-target", "chat-gpt2-code", "chat-neox-prose")
SEED = 4321
_GROUP = 8  # batches drawn at once and grouped by length (see _sft)


@dataclass(frozen=True)
class ChatTemplate:
    """A chat-template family: its Jinja source, the special tokens it needs and the one that ends a turn."""

    family: str
    jinja: str
    special_tokens: tuple[str, ...]
    end_of_turn: str


# The real families' templates, without their default system prompts. Each writes an answer as it is, and renders
# a conversation's start the same whatever follows it, as `ChatEncoder` requires.
LLAMA3 = ChatTemplate(
    "llama-3",
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
    "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>")
CHATML = ChatTemplate(
    "chatml",
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    ("<|im_start|>", "<|im_end|>"), "<|im_end|>")
OPENCHAT = ChatTemplate(
    "openchat",
    "{{ bos_token }}{% for m in messages %}{{ 'GPT4 Correct ' + m['role'].title() + ': ' + m['content'] + "
    "'<|end_of_turn|>' }}{% endfor %}{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}",
    ("<|end_of_turn|>",), "<|end_of_turn|>")


@dataclass(frozen=True)
class _ChatSize:
    """Everything that differs between the full and the small chat models."""

    batch: int  # conversations per step
    lr: float  # peak learning rate
    train_per_skill: int  # train conversations per skill the batches are drawn from
    eval_per_skill: int  # held-out test questions per skill behind chat.json's numbers
    max_new_tokens: int  # the longest answer generated: the longest reference is ~60 of the pivot's tokens
    steps: dict[str, int]  # optimizer steps per chat model


_SIZES = {
    # ~3.4 min on 2 cores: 40 + 1,000 + 1,600 steps at 12-17 steps/s (conversations batched by length, see `_sft`),
    # and ~10 s of evaluation per model; with the core zoo's ~65 s, a cold `--with-chat` build takes ~4.5 min.
    "full": _ChatSize(batch=16, lr=4e-3, train_per_skill=3000, eval_per_skill=150, max_new_tokens=64,
                      steps={"chat-target": 40, "chat-gpt2-code": 1000, "chat-neox-prose": 1600}),
    # For tests: ~5 s. The 2-layer models learn the format, and the neox one to end its turns, but no skill.
    "small": _ChatSize(batch=8, lr=6e-3, train_per_skill=200, eval_per_skill=12, max_new_tokens=24,
                       steps={"chat-target": 40, "chat-gpt2-code": 100, "chat-neox-prose": 100}),
}

# The base model, template and share of each skill in the SFT batches of each chat model.
_MODELS = {
    "chat-target": {"base": "target", "template": LLAMA3,
                    "mixture": {"arithmetic": 1 / 3, "stdlib": 1 / 3, "code": 1 / 3}},
    "chat-gpt2-code": {"base": "gpt2-code", "template": CHATML,
                       "mixture": {"arithmetic": 0.05, "stdlib": 0.05, "code": 0.9}},
    "chat-neox-prose": {"base": "neox-prose", "template": OPENCHAT,
                        "mixture": {"arithmetic": 0.5, "stdlib": 0.5, "code": 0.0}},
}


# Each chat model's subfolder of ``<zoo>/<CHAT_FOLDER>``: the name of its base model.
CHAT_BASES = {name: spec["base"] for name, spec in _MODELS.items()}


# ----------------------------------------------------------------------------------------------------
# templates on tokenizers and models


def add_chat_template(tokenizer, model, template: ChatTemplate) -> int:
    """Give ``tokenizer`` and ``model`` the ``template`` (in place) and return the end-of-turn id.

    The template's special tokens are added to the tokenizer; the model's embedding matrix grows if it has no row
    for them, and their input and output rows are set to the mean of the tokenizer's other rows: a new token starts
    as an average one, neither ignored nor predicted everywhere (untrained rows, as NeoX's padding ones are, would be
    noise, and their logits were pushed down by pretraining).
    """
    known = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(template.special_tokens)})
    tokenizer.chat_template = template.jinja
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new = torch.tensor(tokenizer.convert_tokens_to_ids(list(template.special_tokens)))
    with torch.no_grad():
        for weights in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weights[new] = weights[:known].mean(0)  # tied weights (GPT-2): the same rows twice, the same mean
    end_of_turn = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    model.generation_config.eos_token_id = end_of_turn
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return end_of_turn


# ----------------------------------------------------------------------------------------------------
# building


def build_chat_models(folder: Path, zoo: Path, size: str, progress: bool) -> None:
    """Build the three chat models from the base models in ``zoo`` into the empty ``folder``, ``chat.json`` last.

    The caller (`fusion.zoo.build_chat`) holds the lock, makes torch deterministic and renames ``folder`` into place.
    """
    # Imported here, like the other fusion.data modules below: `import fusion.zoo` stays free of lightning and
    # datasets, which fusion.data.chat loads.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion.data.chat import ChatEncoder
    from fusion.data.skills import SKILLS, skill_conversations

    cfg = _SIZES[size]
    start = time.time()
    train = {s: skill_conversations("train", (s,), cfg.train_per_skill) for s in SKILLS}
    test = {s: skill_conversations("test", (s,), cfg.eval_per_skill) for s in SKILLS}
    record = {
        "version": CHAT_VERSION, "size": size, "seed": SEED,
        "eval": {"split": "test", "questions_per_skill": cfg.eval_per_skill, "decoding": "greedy",
                 "max_new_tokens": cfg.max_new_tokens},
        "perplexity_unit": "exp(summed NLL of the assistant turns' labelled tokens / the pivot's number of them)",
        "models": {},
    }
    pivot_tokens = None  # per skill: the denominators of every model's perplexity
    for index, name in enumerate(CHAT_MODELS):
        spec, began = _MODELS[name], time.time()
        torch.manual_seed(SEED + index)
        tokenizer = AutoTokenizer.from_pretrained(zoo / spec["base"])
        model = AutoModelForCausalLM.from_pretrained(zoo / spec["base"])
        end_of_turn = add_chat_template(tokenizer, model, spec["template"])
        # Conversations are ~40-80 tokens and at most ~180 (a stdlib question after an earlier exchange).
        encoder = ChatEncoder(tokenizer, max_length=256)
        examples = {s: [encoder.encode(c["messages"]) for c in train[s]] for s in SKILLS}
        generator = torch.Generator().manual_seed(SEED + index)
        _sft(model, examples, spec["mixture"], cfg.steps[name], cfg, tokenizer.pad_token_id, generator,
             desc=f"zoo {size} {name}", progress=progress)
        nll, tokens = zip(*(_assistant_nll(model, encoder, test[s], tokenizer.pad_token_id) for s in SKILLS))
        pivot_tokens = pivot_tokens or dict(zip(SKILLS, tokens))  # the pivot comes first
        accuracy = _accuracy(model, tokenizer, encoder, test, end_of_turn, cfg.max_new_tokens)
        model.save_pretrained(folder / spec["base"])
        tokenizer.save_pretrained(folder / spec["base"], save_jinja_files=False)  # the template in tokenizer_config
        record["models"][name] = {
            "base": spec["base"],
            "template_family": spec["template"].family,
            "end_of_turn": spec["template"].end_of_turn,
            "end_of_turn_id": end_of_turn,
            "vocab_size": len(tokenizer),
            "config_vocab_size": model.config.vocab_size,
            "train_mixture": {s: round(w, 4) for s, w in spec["mixture"].items()},
            "train_steps": cfg.steps[name],
            "batch_size": cfg.batch,
            "lr": cfg.lr,
            "accuracy": accuracy,
            "perplexity": {s: round(math.exp(n / pivot_tokens[s]), 3) for s, n in zip(SKILLS, nll)},
            "build_seconds": round(time.time() - began, 1),
        }
    record["build_seconds"] = round(time.time() - start, 1)
    (folder / CHAT_JSON).write_text(json.dumps(record, indent=2) + "\n")


def _pad(examples: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoded conversations as right-padded ``input_ids``, ``attention_mask`` and ``labels`` (LongTensor[B, T])."""
    from fusion.data.chat import pad_batch

    batch = pad_batch([{"input_ids": e.input_ids, "labels": e.labels} for e in examples], pad_id)
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


def _sft(model, examples: dict[str, list], mixture: dict[str, float], steps: int, cfg: _ChatSize, pad_id: int,
         generator: torch.Generator, desc: str, progress: bool) -> None:
    """Assistant-only SFT: AdamW, 10% linear warmup, then a linear decay to a tenth of the peak; each row of a batch
    a random train conversation of a skill drawn by ``mixture``.

    Rows are drawn `_GROUP` batches at a time and batched by length: a batch is padded to its longest conversation,
    and conversations run from ~25 to ~180 tokens, so random batches were about half padding.
    """
    from tqdm.auto import tqdm

    skills = list(mixture)
    weights = torch.tensor([mixture[s] for s in skills])

    def draw() -> list:
        """`_GROUP` batches of random conversations, each batch of similar lengths, in random order."""
        drawn = [examples[skills[d]] for d in torch.multinomial(weights, cfg.batch * _GROUP, replacement=True,
                                                                generator=generator).tolist()]
        rows = sorted((pool[int(torch.randint(len(pool), (1,), generator=generator))] for pool in drawn),
                      key=lambda e: len(e.input_ids))
        return [rows[i * cfg.batch:(i + 1) * cfg.batch] for i in torch.randperm(_GROUP, generator=generator).tolist()]

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)
    batches = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    for step in bar:
        scale = (step + 1) / warmup if step < warmup else 1 - 0.9 * (step - warmup) / max(1, steps - warmup)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * scale
        batches = batches or draw()
        input_ids, attention_mask, labels = _pad(batches.pop(), pad_id)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


@torch.no_grad()
def _assistant_nll(model, encoder, conversations: list[dict], pad_id: int, batch: int = 64) -> tuple[float, int]:
    """Summed NLL (nats) of the labelled (assistant) tokens of ``conversations``, and their number."""
    examples = [encoder.encode(c["messages"]) for c in conversations]
    total, count = 0.0, 0
    for first in range(0, len(examples), batch):
        input_ids, attention_mask, labels = _pad(examples[first:first + batch], pad_id)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        targets = labels[:, 1:].flatten()
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets, ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    return total, count


def _accuracy(model, tokenizer, encoder, test: dict[str, list[dict]], end_of_turn: int,
              max_new_tokens: int) -> dict[str, float]:
    """Per skill, the share of test questions whose greedy answer `fusion.data.verify.check` accepts."""
    from fusion.data.generate import greedy_generate
    from fusion.data.verify import check_many

    items = []
    for skill, conversations in test.items():
        prompts = [tokenizer(encoder.render(c["messages"][:-1], add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"] for c in conversations]
        answers = greedy_generate(model, prompts, [end_of_turn], tokenizer.pad_token_id, max_new_tokens)
        items += [(skill, tokenizer.decode(a, skip_special_tokens=True).strip(), c["reference"])
                  for a, c in zip(answers, conversations)]
    passed = check_many(items)
    return {skill: round(sum(p for (s, _, _), p in zip(items, passed) if s == skill) / len(test[skill]), 4)
            for skill in test}


def format_table(record: dict) -> str:
    """chat.json as a table: per chat model its template, steps, and per skill accuracy and perplexity."""
    skills = list(next(iter(record["models"].values()))["accuracy"])
    head = f"{'model':<16} {'template':<9} {'steps':>5}" + "".join(f" {'acc ' + s[:5]:>10}" for s in skills)
    head += "".join(f" {'ppl ' + s[:5]:>10}" for s in skills)
    lines = [head]
    for name, m in record["models"].items():
        line = f"{name:<16} {m['template_family']:<9} {m['train_steps']:>5}"
        line += "".join(f" {m['accuracy'][s]:>10.1%}" for s in skills)
        line += "".join(f" {m['perplexity'][s]:>10.2f}" for s in skills)
        lines.append(line)
    lines.append(f"accuracy: greedy, on {record['eval']['questions_per_skill']} held-out test questions per skill; "
                 f"perplexity unit: {record['perplexity_unit']}")
    return "\n".join(lines)
