"""Scores of sampled responses: rule verifiers per skill, and a reward model's scalar per response.

Each response shard of a `fusion.data.responses.ResponseStore` gets a scores file next to it,
``scores-<key>-NNNNN.jsonl``, a row per response in the shard's order::

    {"prompt_id": ..., "sample": ..., "passed": true | false | null, "reward": float | null}

``passed`` is `fusion.data.verify.check` of the response against the prompt's reference (null where the prompt has no
skill or reference); code runs in a sandboxed child process with time and memory limits, never in this process, so a
response that loops or allocates without bound is stopped and fails. ``reward`` is the reward model's score of the
prompt and the response rendered with the reward model's own chat template (null without a reward model). ``key``
hashes what the scores depend on (the reward model's weights, the verifiers' version, the length limit), so another
reward model writes other files, and a re-run scores only the shards without one.

Reward models are `AutoModelForSequenceClassification` checkpoints whose output is one logit (Skywork-Reward, most
TRL-trained ones) or which return a ``score`` (ArmoRM, whose code is on the hub: `scoring.trust_remote_code` must
say so). They run through `Trainer.predict`, each rank scoring every world_size-th missing shard.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from fusion.config import ScoringConfig
from fusion.data.representations import DTYPES, FixedBatches
from fusion.data.responses import ResponseStore, write_jsonl
from fusion.data.skills import SKILLS
from fusion.data.verify import check_many
from fusion.errors import FusionError, first_line

VERIFIERS_VERSION = 1  # bump when a verifier judges differently


def scores_key(scoring: ScoringConfig, reward_fingerprint: str | None) -> str:
    content = {"verify": scoring.verify and VERIFIERS_VERSION, "reward": reward_fingerprint,
               "max_length": scoring.max_length if reward_fingerprint else None}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]


def scores_path(store: ResponseStore, key: str, shard: int) -> Path:
    return store.folder / f"scores-{key}-{shard:05d}.jsonl"


def verify_rows(rows: list[dict], workers: int) -> list[bool | None]:
    """Each response checked by its prompt's skill verifier; None where the prompt has no known skill or reference."""
    checkable = [i for i, r in enumerate(rows) if r.get("skill") in SKILLS and r.get("reference") is not None]
    passed = check_many(((rows[i]["skill"], rows[i]["text"], rows[i]["reference"]) for i in checkable), workers)
    verdicts: list[bool | None] = [None] * len(rows)
    for i, ok in zip(checkable, passed):
        verdicts[i] = bool(ok)
    return verdicts


class RewardModule(pl.LightningModule):
    """A sequence-classification reward model for `Trainer.predict`: token batches in, one float per row out."""

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, pad_id: int) -> None:
        super().__init__()
        self.model_path, self.dtype_name, self.pad_id = model_path, dtype, pad_id
        self.trust_remote_code = trust_remote_code
        self.scorer: list = []  # outside the submodules, as `TeacherModule`'s model

    def configure_model(self) -> None:
        if self.scorer:
            return
        self.scorer.append(load_reward_model(self.model_path, self.dtype_name, self.trust_remote_code, self.pad_id)
                           .to(self.trainer.strategy.root_device if self._trainer else "cpu"))

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int = 0) -> list[dict]:
        model = self.scorer[0]
        out = model(input_ids=batch["input_ids"].to(model.device),
                    attention_mask=batch["attention_mask"].to(model.device))
        score = out.score if getattr(out, "score", None) is not None else out.logits[:, 0]
        values = score.float().reshape(len(batch["row"]), -1)[:, 0].tolist()
        return [{"row": row, "reward": value} for row, value in zip(batch["row"], values)]


def _loading(path: str, trust_remote_code: bool, load):
    """``load()`` of a reward model's config or weights, its errors as one message naming the fix."""
    try:
        return load()
    except (OSError, ValueError, ImportError) as err:
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise FusionError(f"reward model {path!r} runs code from its repository; read it, then set "
                              "scoring.trust_remote_code: true to allow it") from None
        raise FusionError(f"cannot load reward model {path!r}: {first_line(err)}") from None


def reward_pad_id(path: str, tokenizer, trust_remote_code: bool) -> int:
    """The id to pad a reward model's batches with: its config's, which is how it finds each row's last token (a
    batch padded with another id would be scored at a padding position), else the tokenizer's.

    Refuses a model whose config maps `AutoModelForSequenceClassification` to code of its own (ArmoRM) without the
    opt-in: transformers would load the stock class of its `model_type` instead, with a new random head.
    """
    from transformers import AutoConfig

    config = _loading(path, trust_remote_code, lambda: AutoConfig.from_pretrained(
        path, trust_remote_code=trust_remote_code))
    custom = (getattr(config, "auto_map", None) or {}).get("AutoModelForSequenceClassification")
    if custom and not trust_remote_code:
        raise FusionError(f"reward model {path!r} defines its scoring head in code of its own ({custom}); without it "
                          "transformers would load a stock head with random weights. Read the code, then set "
                          "scoring.trust_remote_code: true to allow it")
    return config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id


def load_reward_model(path: str, dtype: str, trust_remote_code: bool, pad_id: int):
    from transformers import AutoModelForSequenceClassification

    model = _loading(path, trust_remote_code, lambda: AutoModelForSequenceClassification.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code))
    model.config.pad_token_id = pad_id  # `reward_pad_id`: the config's own when it has one
    return model.eval()


class _Pad:
    """Token lists -> a right-padded batch (a class, so that DataLoader workers can pickle it)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(i["input_ids"]) for i in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for j, item in enumerate(items):
            ids[j, :len(item["input_ids"])] = torch.tensor(item["input_ids"])
            mask[j, :len(item["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "row": [i["row"] for i in items]}


class _ScoreWriter(BasePredictionWriter):
    """Collects the rewards of a shard's rows and writes its scores file once all are in."""

    def __init__(self, shard_rows: dict[int, list[dict]], verdicts: dict[int, list], write) -> None:
        super().__init__(write_interval="batch")
        self.shard_rows, self.verdicts, self.write = shard_rows, verdicts, write
        self.rewards: dict[int, dict[int, float]] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        for item in prediction:
            shard, row = item["row"]
            self.rewards.setdefault(shard, {})[row] = item["reward"]
            if len(self.rewards[shard]) == len(self.shard_rows[shard]):
                rewards = self.rewards.pop(shard)
                self.write(shard, [rewards[i] for i in range(len(self.shard_rows[shard]))])


def score_store(store: ResponseStore, prompts: list[dict], scoring: ScoringConfig, key: str,
                reward_path: str | None, dtype: str, build_trainer, rank: int = 0, world_size: int = 1) -> None:
    """Write the scores file of every shard of ``store`` that has none (this rank's share of them)."""
    missing = [s for s in range(store.n_shards) if not scores_path(store, key, s).exists()][rank::world_size]
    if not missing:
        return
    shard_rows = {s: store.rows(s) for s in missing}
    verdicts = {s: verify_rows(rows, scoring.workers) if scoring.verify else [None] * len(rows)
                for s, rows in shard_rows.items()}

    def write(shard: int, rewards: list) -> None:
        write_jsonl(scores_path(store, key, shard),
                    [{"prompt_id": r["prompt_id"], "sample": r["sample"], "passed": v, "reward": w}
                     for r, v, w in zip(shard_rows[shard], verdicts[shard], rewards)])

    if reward_path is None:
        for shard in missing:
            write(shard, [None] * len(shard_rows[shard]))
        return
    from fusion.data.text import load_tokenizer

    tokenizer = load_tokenizer(reward_path, scoring.trust_remote_code)
    messages_of = {p["id"]: p["messages"] for p in prompts}
    items = [{"input_ids": _reward_ids(tokenizer, messages_of[r["prompt_id"]] + [{"role": "assistant",
                                                                                  "content": r["text"]}],
                                       scoring.max_length, reward_path), "row": (shard, row)}
             for shard in missing for row, r in enumerate(shard_rows[shard])]
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))  # little padding
    batches = [order[i:i + scoring.batch_size] for i in range(0, len(order), scoring.batch_size)]
    pad_id = reward_pad_id(reward_path, tokenizer, scoring.trust_remote_code)
    trainer = build_trainer([_ScoreWriter(shard_rows, verdicts, write)])
    module = RewardModule(reward_path, dtype, scoring.trust_remote_code, pad_id)
    loader = DataLoader(items, batch_sampler=FixedBatches(batches), collate_fn=_Pad(pad_id))
    trainer.predict(module, dataloaders=loader, return_predictions=False)


def reward_of(conversations: list[list[dict]], reward_path: str, scoring: ScoringConfig, dtype: str,
              build_trainer) -> list[float]:
    """The reward model's score of each conversation (its last message the answer), in order."""
    from fusion.data.text import load_tokenizer

    tokenizer = load_tokenizer(reward_path, scoring.trust_remote_code)
    items = [{"input_ids": _reward_ids(tokenizer, c, scoring.max_length, reward_path), "row": i}
             for i, c in enumerate(conversations)]
    pad_id = reward_pad_id(reward_path, tokenizer, scoring.trust_remote_code)
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    batches = [order[i:i + scoring.batch_size] for i in range(0, len(order), scoring.batch_size)]
    loader = DataLoader(items, batch_sampler=FixedBatches(batches), collate_fn=_Pad(pad_id))
    module = RewardModule(reward_path, dtype, scoring.trust_remote_code, pad_id)
    predictions = build_trainer([]).predict(module, dataloaders=loader)
    rewards = {p["row"]: p["reward"] for batch in predictions for p in batch}
    return [rewards[i] for i in range(len(conversations))]


def _reward_ids(tokenizer, conversation: list[dict], max_length: int, reward_path: str) -> list[int]:
    """A conversation rendered with the reward model's template, its last ``max_length`` tokens."""
    if not tokenizer.chat_template:
        raise FusionError(f"reward model {reward_path!r}: its tokenizer has no chat template to render the prompt and "
                          "response with; use a reward model trained on chat (its tokenizer_config.json has one)")
    ids = tokenizer.apply_chat_template(conversation, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return list(ids)[-max_length:]


def read_scores(store: ResponseStore, key: str) -> list[dict]:
    """Every response of the store with its scores: the shard rows joined with their scores files."""
    joined = []
    for shard in range(store.n_shards):
        path = scores_path(store, key, shard)
        try:
            scores = [json.loads(line) for line in path.read_text().splitlines()]
        except (OSError, json.JSONDecodeError) as err:
            raise FusionError(f"{path}: cannot read its scores ({first_line(err)}); delete the file and re-run to "
                              "score that shard again") from None
        rows = store.rows(shard)
        if len(scores) != len(rows):
            raise FusionError(f"{path}: {len(scores)} scores for {len(rows)} responses; delete the file and re-run")
        joined += [{**r, "passed": s["passed"], "reward": s["reward"]} for r, s in zip(rows, scores)]
    return joined
