"""Responses sampled from chat models: ``n`` per prompt per model, stored in shards that a re-run never recomputes.

A model's responses live in ``<run>/samples/<label>/``: ``identity.json`` (what they depend on: the model's weights,
its decoding settings and template, the prompts) and one ``shard-NNNNN.jsonl`` per `prompts_per_shard` prompts, a row
per response::

    {"model": label, "prompt_id": ..., "sample": 0..n-1, "text": ..., "tokens": generated tokens (the end-of-turn
     token included), "finish_reason": "stop" | "length", "skill": ..., "reference": ...}

A shard is written (to a temporary name, then renamed) only once every response of its prompts is in, so a killed
run loses at most the shards in flight, and a re-run samples only the missing ones. Sampling is seeded per batch
(the run's seed, the model's label, the batch's first prompt) and batches never cross shards, so a resumed run writes
what an uninterrupted one would, on the same hardware and software and with the same `sampling.batch_size`. A
changed identity (another model or setting) gets a fresh folder and leaves the old one in place.

Backends: ``hf``, HF ``generate`` (KV cache, left-padded batches) under `Trainer.predict`, whose ranks take every
world_size-th missing shard; ``vllm`` (GPUs, the ``vllm`` extra), one engine over the missing shards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader
from transformers import GenerationConfig

from fusion.config import Recipe, SamplerConfig, SamplingConfig
from fusion.data.cache import atomic_write
from fusion.data.chat import ChatEncoder, conversation_columns, normalise_prompt
from fusion.data.representations import DTYPES, FixedBatches
from fusion.data.skills import SPLITS, skill_conversations
from fusion.data.text import load_splits, load_tokenizer
from fusion.errors import FusionError, first_line

SAMPLE_FORMAT = 1  # bump when a shard's rows change
EMBEDDED_PROMPTS = 100  # per skill, when sampling.prompts is not set


def load_prompts(recipe: Recipe) -> list[dict]:
    """The prompts to sample: ``{"id", "messages" (up to the assistant's turn), "skill", "reference"}``.

    From the embedded chat tasks (`sampling.split` of `chat.skills`, `sampling.prompts` per skill), or from
    `data.source`'s split `sampling.split`: a `prompt` column (a string or messages), or a conversation column whose
    last assistant turn is left out; `id` (or `prompt_id`), `skill` and `reference` columns are kept when there are.
    """
    s, data = recipe.sampling, recipe.data
    if data.source == "embedded":
        if s.split not in SPLITS:
            raise FusionError(f"recipe key 'sampling.split': the embedded chat tasks have splits "
                              f"{', '.join(SPLITS)}, not {s.split!r}")
        tasks = skill_conversations(s.split, tuple(recipe.chat.skills), s.prompts or EMBEDDED_PROMPTS)
        return [{"id": t["id"], "messages": t["messages"][:-1], "skill": t["skill"], "reference": t["reference"]}
                for t in tasks]
    splits = load_splits(data, 'one prompt per row: {"prompt": "..."} or {"messages": [...]}')
    if s.split not in splits:
        raise FusionError(f"recipe key 'sampling.split': {data.source!r} has splits {sorted(splits)}, not {s.split!r}")
    rows = splits[s.split]
    rows = rows.select(range(min(s.prompts, len(rows)))) if s.prompts else rows
    columns = ("prompt",) if "prompt" in rows.column_names else conversation_columns(rows.column_names,
                                                                                     recipe.chat.column)[:1]
    prompts = []
    for index, row in enumerate(rows):
        value = row[columns[0]]
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else normalise_prompt(value, index)
        # UltraFeedback's datasets call it prompt_id; a JSON row without one reads as None
        prompt_id = next((row[k] for k in ("id", "prompt_id") if row.get(k) is not None), index)
        prompts.append({"id": str(prompt_id), "messages": messages, "skill": row.get("skill"),
                        "reference": row.get("reference")})
    return prompts


def prompts_fingerprint(prompts: list[dict]) -> str:
    return hashlib.sha256(json.dumps([[p["id"], p["messages"]] for p in prompts]).encode()).hexdigest()[:16]


class ResponseStore:
    """The shards of one model's responses to a list of prompts (see the module docstring)."""

    def __init__(self, folder: Path, n_prompts: int, prompts_per_shard: int, identity: dict | None = None) -> None:
        self.folder, self.identity = Path(folder), identity
        self.n_prompts, self.prompts_per_shard = n_prompts, prompts_per_shard
        self.n_shards = -(-n_prompts // prompts_per_shard)

    @classmethod
    def for_identity(cls, root: Path, label: str, identity: dict, n_prompts: int,
                     prompts_per_shard: int) -> ResponseStore:
        """The store of ``label``'s responses under ``root``, in a folder named by a hash of ``identity``."""
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
        slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)
        return cls(root / f"{slug}-{key}", n_prompts, prompts_per_shard, identity)

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "identity.json").write_text(json.dumps(self.identity, indent=2, sort_keys=True) + "\n")

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.jsonl"

    def shard_prompts(self, shard: int) -> range:
        first = shard * self.prompts_per_shard
        return range(first, min(first + self.prompts_per_shard, self.n_prompts))

    def missing(self) -> list[int]:
        return [s for s in range(self.n_shards) if not self.shard_path(s).exists()]

    def write_shard(self, shard: int, rows: list[dict]) -> None:
        write_jsonl(self.shard_path(shard), rows)

    def rows(self, shard: int) -> list[dict]:
        """One shard's responses; a truncated or edited shard is an error naming the file and the fix."""
        path = self.shard_path(shard)
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines()]
        except (OSError, json.JSONDecodeError) as err:
            raise FusionError(f"{path}: cannot read its responses ({first_line(err)}); delete the file and re-run "
                              "to sample that shard again") from None
        return rows

    def all_rows(self) -> list[dict]:
        return [row for shard in range(self.n_shards) for row in self.rows(shard)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines, written to a temporary name and renamed (`atomic_write`): a file that exists is
    whole."""
    atomic_write(path, lambda f: f.writelines((json.dumps(row) + "\n").encode() for row in rows))


def sampling_seed(seed: int, label: str, prompt_index: int) -> int:
    """The seed of the batch that starts at prompt ``prompt_index``: a shard is always cut into the same batches, so
    its samples do not depend on which other shards ran before it in the process."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{label}:{prompt_index}".encode()).digest()[:4], "little")


class SamplerModule(pl.LightningModule):
    """Generates ``n`` responses per prompt for `Trainer.predict`; the HF model is kept outside the submodules."""

    def __init__(self, model_path: str, sampler: SamplerConfig, n: int, seed: int, stop_ids: list[int],
                 pad_id: int, dtype: str) -> None:
        super().__init__()
        self.model_path, self.sampler, self.n, self.seed = model_path, sampler, n, seed
        self.stop_ids, self.pad_id, self.dtype_name = stop_ids, pad_id, dtype
        self.generator: list = []

    def configure_model(self) -> None:
        if self.generator:
            return
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=DTYPES[self.dtype_name],
                                                         trust_remote_code=self.sampler.trust_remote_code)
        except (OSError, ValueError, ImportError) as err:
            raise FusionError(f"cannot load sampling model {self.model_path!r}: {first_line(err)}") from None
        self.generator.append(model.to(self.trainer.strategy.root_device if self._trainer else "cpu").eval())

    def predict_step(self, batch: dict, batch_idx: int = 0) -> list[dict]:
        """A batch of prompts of one shard, left-padded, ``n`` samples each, seeded by the batch's first prompt: a
        shard is cut into the same batches on every run, so a resumed shard gets the samples it would have had."""
        model, s = self.generator[0], self.sampler
        torch.manual_seed(sampling_seed(self.seed, s.label, batch["prompt_index"][0]))
        width = max(map(len, batch["input_ids"]))
        ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in batch["input_ids"]], device=model.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch["input_ids"]], device=model.device)
        greedy = s.temperature == 0
        out = model.generate(
            ids, attention_mask=mask, do_sample=not greedy, temperature=None if greedy else s.temperature,
            top_p=None if greedy else s.top_p, top_k=None, repetition_penalty=s.repetition_penalty,
            max_new_tokens=s.max_new_tokens, num_return_sequences=self.n, eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id)
        generated = out[:, width:].tolist()  # prompt-major: the n samples of prompt 0, then of prompt 1, ...
        return [{"prompt_index": batch["prompt_index"][j // self.n], "sample": j % self.n,
                 **finish(g, self.stop_ids)} for j, g in enumerate(generated)]


def finish(generated: list[int], stop_ids: list[int]) -> dict:
    """The generated ids up to and including the first stop id, and why generation ended."""
    for position, token in enumerate(generated):
        if token in stop_ids:
            return {"ids": generated[:position + 1], "finish_reason": "stop"}
    return {"ids": generated, "finish_reason": "length"}


class ResponseWriter(BasePredictionWriter):
    """Collects a batch's responses per shard and writes each shard as soon as it is whole."""

    def __init__(self, store: ResponseStore, make_row) -> None:
        super().__init__(write_interval="batch")
        self.store, self.make_row = store, make_row
        self.pending: dict[int, list[dict]] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        for generated in prediction:
            shard = generated["prompt_index"] // self.store.prompts_per_shard
            self.pending.setdefault(shard, []).append(self.make_row(generated))
            expected = len(self.store.shard_prompts(shard)) * pl_module.n
            if len(self.pending[shard]) == expected:
                rows = sorted(self.pending.pop(shard), key=lambda r: (r["prompt_index"], r["sample"]))
                self.store.write_shard(shard, [{k: v for k, v in r.items() if k != "prompt_index"} for r in rows])


class _Rows:
    """Prompt rows -> a batch of token lists (a class, so that DataLoader workers can pickle it)."""

    def __call__(self, rows: list[dict]) -> dict:
        return {"prompt_index": [r["prompt_index"] for r in rows], "input_ids": [r["input_ids"] for r in rows]}


def sample_responses(sampling: SamplingConfig, sampler: SamplerConfig, model_path: str, prompts: list[dict],
                     store: ResponseStore, seed: int, build_trainer, dtype: str) -> None:
    """Sample the store's missing shards (``build_trainer(callbacks)`` makes the predict Trainer, for ``hf``)."""
    from fusion.chat_eval import end_of_turn, stop_ids

    store.open()
    missing = store.missing()
    if not missing:
        return
    tokenizer = load_tokenizer(model_path, sampler.trust_remote_code)
    encoder = ChatEncoder(tokenizer, sampler.template)
    marker = end_of_turn(encoder)
    try:
        own = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # a model without generation_config.json
        own = None
    stops = stop_ids(encoder, own)

    def row(generated: dict) -> dict:
        prompt = prompts[generated["prompt_index"]]
        text = tokenizer.decode(generated["ids"], skip_special_tokens=True)
        text = (text.split(marker)[0] if marker else text).strip()
        return {"model": sampler.label, "prompt_index": generated["prompt_index"], "prompt_id": prompt["id"],
                "sample": generated["sample"], "text": text, "tokens": len(generated["ids"]),
                "finish_reason": generated["finish_reason"], "skill": prompt.get("skill"),
                "reference": prompt.get("reference")}

    encoded = {i: tokenizer.encode(encoder.render(prompts[i]["messages"], add_generation_prompt=True),
                                   add_special_tokens=False)
               for shard in missing for i in store.shard_prompts(shard)}
    if rank_zero_only.rank == 0:
        print(f"[fusion] sampling {sampler.label}: {len(missing)} of {store.n_shards} shards to sample, "
              f"{sampling.n} responses per prompt -> {store.folder}")
    if sampling.backend == "vllm":
        _sample_vllm(sampling, sampler, model_path, encoded, missing, store, seed, stops, row, dtype)
        return
    trainer = build_trainer([ResponseWriter(store, row)])
    items = [{"prompt_index": i, "input_ids": encoded[i]} for i in sorted(encoded)]
    position = {item["prompt_index"]: n for n, item in enumerate(items)}
    batches = [[position[i] for i in shard_prompts[first:first + sampling.batch_size]]
               for shard in missing[trainer.global_rank::trainer.world_size]
               for shard_prompts in [list(store.shard_prompts(shard))]
               for first in range(0, len(shard_prompts), sampling.batch_size)]
    module = SamplerModule(model_path, sampler, sampling.n, seed, stops, tokenizer.pad_token_id, dtype)
    loader = DataLoader(items, batch_sampler=FixedBatches(batches), collate_fn=_Rows())
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier("sampling")


def _sample_vllm(sampling: SamplingConfig, sampler: SamplerConfig, model_path: str, encoded: dict[int, list[int]],
                 missing: list[int], store: ResponseStore, seed: int, stops: list[int], row, dtype: str) -> None:
    """The missing shards with a vLLM engine, shard by shard (each written as soon as it is done)."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError:
        raise FusionError("sampling.backend 'vllm' needs vLLM, which is not installed: pip install -e '.[vllm]' "
                          "(GPUs only), or use sampling.backend: hf") from None
    engine = LLM(model=model_path, dtype=dtype, seed=seed,
                 trust_remote_code=sampler.trust_remote_code)
    for shard in missing:
        indices = list(store.shard_prompts(shard))
        params = [SamplingParams(n=sampling.n, temperature=sampler.temperature, top_p=sampler.top_p,
                                 repetition_penalty=sampler.repetition_penalty, max_tokens=sampler.max_new_tokens,
                                 stop_token_ids=stops, seed=sampling_seed(seed, sampler.label, i)) for i in indices]
        outputs = engine.generate([TokensPrompt(prompt_token_ids=encoded[i]) for i in indices], params)
        rows = []
        for i, output in zip(indices, outputs):
            for sample, completion in enumerate(output.outputs):
                ids = list(completion.token_ids)
                reason = "length" if completion.finish_reason == "length" else "stop"
                rows.append(row({"prompt_index": i, "sample": sample, "ids": ids, "finish_reason": reason}))
        store.write_shard(shard, [{k: v for k, v in r.items() if k != "prompt_index"} for r in rows])
