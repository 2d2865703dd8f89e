"""Conversations → token ids with labels on the assistant's turns only, for chat training (FuseChat's data).

A row holds one conversation in one of three forms, each normalised to a list of
``{"role": "system" | "user" | "assistant", "content": str}``:

    messages         [{role, content}, ...]     role: system (first only), user, assistant
    conversations    [{from, value}, ...]       ShareGPT; from: system, human/user, gpt/assistant
    prompt/chosen/rejected                      preference data: each a string or a message list

A row that is not a conversation to train on raises `MalformedRow` (a `FusionError` naming the row,
what is wrong and the fix, with a short ``reason`` that `ChatDataModule` counts when it skips such rows).

`ChatEncoder` renders a conversation with a chat template (the tokenizer's own, or one given: FuseChat
renders every model's input with the pivot's), tokenizes the text once and labels the tokens of each
assistant turn, its end-of-turn marker included; every other label is -100. The turns are located in
the rendered text by the template itself, not by per-model offsets (FuseChat's hard-coded "-2" and
``legacy`` ±1 fixes): assistant message ``i`` starts where ``render(messages[:i], add_generation_prompt)``
ends and ends where ``render(messages[:i + 1])`` does, trailing whitespace left out (ChatML's newline
after ``<|im_end|>`` is not something to generate). This needs each such render to be the start of the
whole conversation's: a template that renders a message differently once others follow is refused, since
the spans it gives would be wrong. A token is labelled when its characters overlap a span, so a token
that joins the template's space with the answer's first word (OpenChat's ``Assistant: answer``) is
trained: the model has to produce it.

BOS is in the ids only if the template writes it: the text is tokenized with ``add_special_tokens=False``,
as ``apply_chat_template(tokenize=True)`` and vLLM tokenize a rendered chat at inference, so training sees
the sequences inference will feed, and a template that writes ``{{ bos_token }}`` never gets a second one.
A template without BOS on a tokenizer that adds one to plain text (ChatML on a Llama tokenizer) trains
without it; to train with it, give a template that writes it (``chat.template``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import jinja2
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fusion.config import ChatConfig, DataConfig, Recipe
from fusion.data.cache import build_once
from fusion.data.sampling import ResumableLoader, train_loader, validation_loaders
from fusion.data.skills import skill_conversations
from fusion.data.text import (
    default_cache_dir,
    hold_out,
    load_splits,
    load_tokenizer,
    source_fingerprint,
    tokenizer_fingerprint,
)
from fusion.errors import FusionError, first_line

# Bump when the encoding below changes, so stale caches are not reused.
_ENCODING_VERSION = 3  # 2: validation sets in named folders (per skill for the embedded tasks); 3: the text
IGNORE_INDEX = -100
Message = dict[str, str]
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
# What becomes of a row, counted per split: kept whole, or shortened to fit chat.max_length.
KEPT = ("whole", "truncated", "cut")
SKIP_HINT = "or set chat.skip_malformed: true to skip such rows (counted by reason)"


class MalformedRow(FusionError):
    """A row that is not a conversation to train on; ``reason`` is the short name it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # the data module's worker processes send it back pickled
        return type(self), (self.reason, str(self))


class Preference(NamedTuple):
    """A preference row: the shared prompt messages and the two completions (each starting with an assistant turn)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


class Encoded(NamedTuple):
    """A conversation as a training example, at most ``max_length`` tokens."""

    input_ids: list[int]
    labels: list[int]
    """``input_ids`` on the assistant's tokens, -100 elsewhere."""
    turns_dropped: int
    """Assistant turns left out (with the user turns before them) to fit ``max_length``."""
    cut: bool
    """The first exchange alone was too long and was cut at ``max_length`` tokens."""
    text: str = ""
    """The rendered text that ``input_ids`` tokenize (up to the cut, if cut): what chat fusion's teachers read."""

    @property
    def status(self) -> str:
        return "cut" if self.cut else "truncated" if self.turns_dropped else "whole"


# --- rows → messages ----------------------------------------------------------------------------------------------

def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text[:40] + '...' if len(text) > 40 else text} ({type(value).__name__})"


def _message(item: Any, row: int, label: str) -> Message:
    """One message as ``{role, content}``; ``label`` names it in errors (``message 2 of chosen``)."""
    if not isinstance(item, dict):
        raise MalformedRow("wrong type", f"row {row}: {label} is {_describe(item)}, not a mapping with a role and "
                                         "content; make every message {\"role\": ..., \"content\": ...}")
    if item.get("role") is not None:
        role_key, content_key, roles = "role", "content", ROLES
    elif item.get("from") is not None:
        role_key, content_key, roles = "from", "value", SHAREGPT_ROLES
    else:
        raise MalformedRow("wrong type", f"row {row}: {label} has neither a role (with content) nor a from (with "
                                         f"value), its keys are {sorted(item)}; give it one of the two pairs")
    role, content = item[role_key], item.get(content_key)
    if not isinstance(role, str) or role not in roles:
        raise MalformedRow("unknown role", f"row {row}: {label} has {role_key} {role!r}; use one of "
                                           f"{', '.join(roles)}")
    if not isinstance(content, str):
        raise MalformedRow("content not a string", f"row {row}: the {content_key} of {label} is "
                                                   f"{_describe(content)}, not a string; give its text")
    return {"role": roles[role], "content": content}


def check_conversation(messages: list[Message], row: int, what: str = "the conversation") -> None:
    """Raise `MalformedRow` unless ``messages`` are an optional system message, then user and assistant turns
    alternating from a user turn, with at least one assistant turn, none empty (but the system message: see
    `_without_empty_system`)."""
    for j, m in enumerate(messages):
        if m["role"] == "system" and j > 0:
            raise MalformedRow("system message not first", f"row {row}: message {j} of {what} is a system message; "
                                                           "only the first may be one: merge it into that or drop it")
        if m["role"] != "system" and not m["content"].strip():
            raise MalformedRow("empty content", f"row {row}: message {j} ({m['role']}) of {what} is empty; "
                                                "give it text or drop the row")
    start = 1 if messages and messages[0]["role"] == "system" else 0
    for j in range(start, len(messages)):
        expected = "user" if (j - start) % 2 == 0 else "assistant"
        if messages[j]["role"] != expected:
            problem = (f"starts with an {messages[j]['role']} turn" if j == start else
                       f"has two {messages[j]['role']} turns in a row (messages {j - 1} and {j})")
            raise MalformedRow("roles do not alternate", f"row {row}: {what} {problem}; turns must alternate user, "
                                                         "assistant, user, ... after an optional system message")
    if not any(m["role"] == "assistant" for m in messages):
        raise MalformedRow("no assistant turn", f"row {row}: {what} has no assistant message, so nothing to train "
                                                "on; add the answer or drop the row")


def _messages(value: Any, row: int, name: str) -> list[Message]:
    """A list of `{role, content}` or `{from, value}` items as `{role, content}` dicts (not yet checked as a whole)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise MalformedRow("wrong type", f"row {row}: {name} is {_describe(value)}, not a non-empty list of "
                                         "messages; give a list of {\"role\": ..., \"content\": ...}")
    return [_message(item, row, f"message {j} of {name}") for j, item in enumerate(value)]


def _without_empty_system(messages: list[Message]) -> list[Message]:
    """An empty system message says nothing (datasets write one where there is none): left out, after the checks,
    so that errors count messages as the row does."""
    return [m for m in messages if m["role"] != "system" or m["content"].strip()]


def normalise_messages(value: Any, row: int = 0) -> list[Message]:
    """A row's conversation (`messages`- or ShareGPT-style list) as checked `{role, content}` dicts.

    Raises `MalformedRow` naming ``row``, the message and the fix when it is not one (`check_conversation`)."""
    messages = _messages(value, row, "the conversation")
    check_conversation(messages, row)
    return _without_empty_system(messages)


def normalise_prompt(value: Any, row: int = 0) -> list[Message]:
    """A prompt to answer: a conversation's messages up to (not including) its last assistant turn, checked."""
    messages = _messages(value, row, "the prompt")
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise MalformedRow("no prompt", f"row {row}: the prompt has only assistant messages; give it a user message")
    check_conversation(messages + [{"role": "assistant", "content": "-"}], row, "the prompt")
    return _without_empty_system(messages)


def _completion(value: Any, prompt: list[Message], row: int, name: str) -> list[Message]:
    """``chosen`` or ``rejected``: a string (the answer) or messages, with the prompt at their start or not."""
    if isinstance(value, str):
        messages = [{"role": "assistant", "content": value}]
    else:
        messages = _messages(value, row, name)
        if messages[:len(prompt)] == prompt:  # the whole conversation, as in UltraFeedback-binarized
            messages = messages[len(prompt):]
    if not messages:
        raise MalformedRow("no assistant turn", f"row {row}: {name} holds only the prompt; add the answer")
    check_conversation(prompt + messages, row, f"the prompt followed by {name}")
    return messages


def normalise_preference(prompt: Any, chosen: Any, rejected: Any, row: int = 0) -> Preference:
    """A preference row as its prompt messages and the two completions (`Preference`), checked.

    ``prompt``: a string (one user turn) or messages ending with a user turn; ``chosen`` and ``rejected``: a string
    (one assistant turn) or messages, which may repeat the prompt first (it is removed).
    """
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = _messages(prompt, row, "prompt")
    if prompt_messages[-1]["role"] != "user":
        raise MalformedRow("roles do not alternate", f"row {row}: the prompt's last message is the "
                                                     f"{prompt_messages[-1]['role']}'s; it must end with the user turn "
                                                     "the answers reply to")
    chosen, rejected = (_completion(value, prompt_messages, row, name)
                        for value, name in ((chosen, "chosen"), (rejected, "rejected")))
    return Preference(_without_empty_system(prompt_messages), chosen, rejected)


def conversation_columns(columns: list[str], column: str | None = None) -> tuple[str, ...]:
    """The columns a dataset holds its conversations in: ``(column,)`` for a list of messages per row (``column``,
    else `messages`, else `conversations`), or `PREFERENCE_COLUMNS`."""
    if column is not None:
        if column not in columns:
            raise FusionError(f"chat.column {column!r} is not a column of data.source; its columns are {columns}")
        return (column,)
    for name in ("messages", "conversations"):
        if name in columns:
            return (name,)
    if all(name in columns for name in PREFERENCE_COLUMNS):
        return PREFERENCE_COLUMNS
    raise FusionError(f"data.source has no conversations: none of the columns messages, conversations or "
                      f"prompt/chosen/rejected (its columns are {columns}); set chat.column to the one that holds them")


def row_conversation(row: dict, columns: tuple[str, ...], index: int) -> list[Message]:
    """The conversation to train on in a dataset row: its messages, or a preference row's prompt and chosen answer."""
    if columns == PREFERENCE_COLUMNS:
        preference = normalise_preference(*(row[name] for name in PREFERENCE_COLUMNS), row=index)
        return preference.prompt + preference.chosen
    return normalise_messages(row[columns[0]], index)


# --- messages → ids and labels ------------------------------------------------------------------------------------

def resolve_template(tokenizer: PreTrainedTokenizerBase, template: str | None) -> tuple[str, str]:
    """The Jinja source of the chat template and its name for messages: ``template`` itself (it holds ``{{`` or
    ``{%``), the file it names, or the tokenizer's own."""
    if template is None:
        own = tokenizer.chat_template
        own = own.get("default") if isinstance(own, dict) else own  # a tokenizer may name several templates
        if not own:
            raise FusionError(f"the tokenizer {tokenizer.name_or_path!r} has no chat template; set chat.template to "
                              "a Jinja template or a file holding one (FuseChat renders every model's input with the "
                              "pivot model's template)")
        return own, f"the chat template of {tokenizer.name_or_path!r}"
    if "{{" in template or "{%" in template:
        return template, "chat.template"
    path = Path(template).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # a name too long to be a path
        is_file = False
    if not is_file:
        raise FusionError(f"chat.template {template!r} is neither a Jinja template (it holds no '{{{{' or '{{%') nor "
                          "a file; give the template's text or the path of a file holding it")
    return path.read_text(), f"chat.template {str(path)!r}"


class ChatEncoder:
    """Renders conversations with one chat template and tokenizes them, labelled on the assistant's turns only.

    ``tokenizer`` must be a fast one: the labels come from its offset mapping. ``template``: a Jinja string, a file
    holding one, or None for the tokenizer's own (`resolve_template`).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str | None = None, max_length: int = 2048) -> None:
        if not tokenizer.is_fast:
            raise FusionError(f"the tokenizer {tokenizer.name_or_path!r} is a slow (Python) one; chat data needs a "
                              "fast one, whose offsets locate the assistant's tokens (save it with tokenizer.json)")
        if max_length < 2:
            raise FusionError(f"chat.max_length must be at least 2, got {max_length}")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.template, self.template_name = resolve_template(tokenizer, template)

    def render(self, messages: list[Message], add_generation_prompt: bool = False, row: int = 0) -> str:
        """The template's text for ``messages``; a template that refuses them raises `MalformedRow`."""
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateSyntaxError as err:
            raise FusionError(f"{self.template_name} is not a valid Jinja template: {first_line(err)} "
                              f"(line {err.lineno}); fix it") from None
        except Exception as err:  # raise_exception() in the template, or an expression failing on this row
            raise MalformedRow("refused by the template", f"row {row}: {self.template_name} refuses this "
                                                          f"conversation: {first_line(err)}; fix the row or the "
                                                          "template") from None

    def assistant_spans(self, messages: list[Message], row: int = 0) -> tuple[str, list[tuple[int, int]], list[int]]:
        """The rendered conversation, the character span of each assistant turn in it (its text and end-of-turn
        marker), and where the rendering of the conversation up to and including that turn ends."""
        text = self.render(messages, row=row)
        spans, turn_ends = [], []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True, row=row)
            turn = self.render(messages[:i + 1], row=row)
            for part, n, how in ((prompt, i, " with the generation prompt"), (turn, i + 1, "")):
                if not text.startswith(part):
                    raise FusionError(
                        f"{self.template_name} is not prefix-consistent: in row {row}, rendering the first {n} "
                        f"message(s){how} does not give the start of the whole conversation's text, so its assistant "
                        "turns cannot be located; use a template that renders each message the same whatever follows "
                        "it (chat.template)")
            start, end = len(prompt), len(turn.rstrip())
            if message["content"].strip() not in text[start:end]:
                raise FusionError(f"{self.template_name} does not write assistant message {i} of row {row} between "
                                  "the generation prompt and the end of its turn, so its tokens cannot be located; "
                                  "use a template that writes each answer as it is (chat.template)")
            spans.append((start, end))
            turn_ends.append(len(turn))
        return text, spans, turn_ends

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int], np.ndarray]:
        """Ids, labels (the ids of tokens overlapping a span, else -100) and the tokens' start characters."""
        # verbose=False: the tokenizer would warn about texts above the model's length, which encode() shortens.
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = np.asarray(encoding["input_ids"], dtype=np.int64)
        offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        inside = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            inside |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        return ids.tolist(), np.where(inside, ids, IGNORE_INDEX).tolist(), offsets[:, 0]

    def encode(self, messages: list[Message], row: int = 0) -> Encoded | None:
        """``messages`` (checked, e.g. by `normalise_messages`) as ids and labels of at most ``max_length`` tokens;
        None when no assistant token is left to train on within them.

        Messages after the last assistant turn teach nothing and are left out. A longer conversation loses whole
        exchanges from its end (the longest prefix ending with an assistant turn that fits); if even the first one
        is too long, it is cut at ``max_length`` tokens, keeping the labels before the cut.
        """
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text, spans, turn_ends = self.assistant_spans(messages[:last + 1], row)
        ids, labels, starts = self._tokenize(text, spans)
        keep, cut, end = len(spans), False, len(text)
        if len(ids) > self.max_length:
            # The renders are prefix-consistent, so the conversation up to assistant turn k is text[:turn_ends[k]].
            # The tokens starting before that end estimate its length; re-tokenizing it gives the exact ids, one turn
            # less while a token across the cut makes it one too long.
            keep = int(np.searchsorted([np.searchsorted(starts, end) for end in turn_ends], self.max_length, "right"))
            while keep > 0:
                end = turn_ends[keep - 1]
                ids, labels, _ = self._tokenize(text[:end], spans[:keep])
                if len(ids) <= self.max_length:
                    break
                keep -= 1
            if keep == 0:  # even the first exchange is too long: cut it
                keep, end = 1, turn_ends[0]
                ids, labels, starts = self._tokenize(text[:end], spans[:1])
                cut = len(ids) > self.max_length
                if cut:  # the text up to the first token left out
                    ids, labels, end = ids[:self.max_length], labels[:self.max_length], int(starts[self.max_length])
        # Labels are targets of the position before them: one at position 0 is never trained.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            return None
        return Encoded(ids, labels, turns_dropped=len(spans) - keep, cut=cut, text=text[:end])


# --- the data module ----------------------------------------------------------------------------------------------

def pad_batch(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of ``input_ids`` and ``labels`` as right-padded ``LongTensor[B, T]`` (T: the longest row):
    ``input_ids`` (``pad_id`` on padding), ``attention_mask`` (1 on tokens, 0 on padding), ``labels`` (-100 on
    padding)."""
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"])
        labels[i, :n] = torch.as_tensor(row["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def summary(counts: dict[str, int], max_length: int) -> str:
    """What became of a split's rows (`ChatDataModule.counts`), in words."""
    skipped = {k.removeprefix("skipped: "): v for k, v in counts.items() if k.startswith("skipped: ")}
    parts = [f"{counts.get('whole', 0)} kept whole",
             f"{counts.get('truncated', 0)} truncated by whole turns to chat.max_length={max_length}",
             f"{counts.get('cut', 0)} cut inside their first exchange",
             f"{counts.get('dropped', 0)} dropped (no assistant token within chat.max_length)",
             f"{sum(skipped.values())} skipped as malformed"
             + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})" if skipped else "")]
    return f"{sum(counts.values())} conversations: {', '.join(parts)}"


class ChatDataModule(pl.LightningDataModule):
    """Conversations for supervised fine-tuning: one example per conversation, labelled on the assistant's turns.

    Batches are ``{"input_ids", "attention_mask", "labels"}``, each ``LongTensor[batch_size, T]`` right-padded to the
    longest conversation in the batch (``labels``: -100 but on assistant tokens and their end-of-turn markers). The
    held-out set is `data.validation_split` if the source has it, else a seeded `data.validation_fraction` of the
    conversations. The encoded splits are cached like text blocks (`fusion.data.text`), keyed by the source's content,
    the tokenizer, the template and the `chat` settings. The training loader is resumable mid-epoch.
    """

    def __init__(self, data: DataConfig, chat: ChatConfig, tokenizer_path: str, batch_size: int, seed: int = 42,
                 trust_remote_code: bool = False) -> None:
        super().__init__()
        self.data, self.chat, self.tokenizer_path = data, chat, tokenizer_path
        self.batch_size, self.seed, self.trust_remote_code = batch_size, seed, trust_remote_code
        self.train_set: datasets.Dataset | None = None
        self.validation_sets: dict[str, datasets.Dataset] = {}
        # Per split, how many rows were kept ``whole``, ``truncated``, ``cut``, ``dropped``, ``skipped: REASON``.
        self.counts: dict[str, dict[str, int]] = {}
        self.pad_id: int | None = None

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.tokenizer_path, self.trust_remote_code)

    def _encoder(self) -> ChatEncoder:
        return ChatEncoder(self.tokenizer(), self.chat.template, self.chat.max_length)

    def cache_path(self) -> Path:
        encoder, d, c = self._encoder(), self.data, self.chat
        embedded = d.source == "embedded"
        key = {
            "source": source_fingerprint(d), "skills": list(c.skills) if embedded else None,
            "python": list(sys.version_info[:3]) if embedded else None,  # the embedded tasks depend on it
            "subset": d.subset, "train_split": d.train_split,
            "validation_split": d.validation_split, "validation_fraction": d.validation_fraction, "seed": self.seed,
            "tokenizer": tokenizer_fingerprint(encoder.tokenizer),
            "template": hashlib.sha256(encoder.template.encode()).hexdigest(), "column": c.column,
            "max_length": c.max_length, "skip_malformed": c.skip_malformed, "encoding": _ENCODING_VERSION,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir()
        return root / f"chat-{digest}"

    def prepare_data(self) -> None:
        """Encode once: one process builds the cache while the others (ranks, runs) wait for it."""
        build_once(self.cache_path(), lambda folder: (folder / "done").exists(), self._encode_into)

    def _encode_split(self, rows: datasets.Dataset, split: str, encoder: ChatEncoder, columns: tuple[str, ...],
                      work: Path) -> tuple[datasets.Dataset, dict[str, int]]:
        """The split's kept examples and what became of its rows (`counts`); intermediate files go to ``work``."""
        source, skip = self.data.source, self.chat.skip_malformed

        def encode_rows(batch: dict, indices: list[int]) -> dict:
            out = {"input_ids": [], "labels": [], "text": [], "status": []}
            for offset, index in enumerate(indices):
                row = {name: batch[name][offset] for name in columns}
                try:
                    encoded = encoder.encode(row_conversation(row, columns, index), index)
                except MalformedRow as err:
                    if not skip:
                        raise FusionError(f"data.source {source!r}, {split} split: {err}; {SKIP_HINT}") from None
                    encoded, status = None, f"skipped: {err.reason}"
                else:
                    status = "dropped" if encoded is None else encoded.status
                out["input_ids"].append(encoded.input_ids if encoded else [])
                out["labels"].append(encoded.labels if encoded else [])
                out["text"].append(encoded.text if encoded else "")
                out["status"].append(status)
            return out

        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                      "labels": datasets.Sequence(datasets.Value("int32")),
                                      "text": datasets.Value("string"), "status": datasets.Value("string")})
        workers = self.data.preprocessing_workers
        # datasets writes a map's output next to its input by default: into a save_to_disk source folder, whose
        # content, hence fingerprint and cache key, would change. So it goes to ``work``.
        encoded = rows.map(encode_rows, batched=True, batch_size=1000, with_indices=True, features=features,
                           remove_columns=rows.column_names, num_proc=workers if workers > 1 else None,
                           cache_file_name=str(work / f"{split}-encoded.arrow"), desc=f"encoding {split} conversations")
        counts = dict(Counter(encoded["status"]))
        kept = encoded.filter(lambda status: status in KEPT, input_columns="status",
                              cache_file_name=str(work / f"{split}-kept.arrow")).remove_columns("status")
        if len(kept) == 0:
            raise FusionError(f"data: no conversation of the {split} split is left to train on (of "
                              f"{summary(counts, self.chat.max_length)}); raise chat.max_length or fix the data")
        return kept, counts

    def _encode_into(self, folder: Path) -> None:
        """Encode the training and held-out conversations into the empty ``folder``; ``done`` is written last."""
        encoder, work = self._encoder(), folder / "work"
        work.mkdir()
        if self.data.source == "embedded":
            self._encode_embedded(folder, encoder, work)
            return
        loaded = load_splits(self.data, "one JSON object with a 'messages' list of {role, content} per line")
        train = loaded[self.data.train_split]
        columns = conversation_columns(train.column_names, self.chat.column)
        if len(train) == 0:
            raise FusionError(f"data.source {self.data.source!r}: its {self.data.train_split!r} split holds no "
                              "conversations; add some")
        # Rows are encoded before any are held out, so that errors name their index in the source's split.
        train, counts = self._encode_split(train, "train", encoder, columns, work)
        counts = {"train": counts}
        validation_split = self.data.validation_split
        if validation_split and validation_split in loaded:
            validation = loaded[validation_split]
            if missing := [name for name in columns if name not in validation.column_names]:
                raise FusionError(f"data.validation_split {validation_split!r} of {self.data.source!r} lacks the "
                                  f"column(s) {missing} that the training split holds its conversations in")
            validation, counts["validation"] = self._encode_split(validation, validation_split, encoder, columns,
                                                                  work)
        else:
            train, validation = hold_out(self.data, train, self.seed, unit="conversation")
        train.save_to_disk(str(folder / "train"))
        validation.save_to_disk(str(folder / "validation" / "all"))
        shutil.rmtree(work)
        (folder / "done").write_text(json.dumps({"counts": counts, "validation": ["all"]}))

    def _encode_embedded(self, folder: Path, encoder: ChatEncoder, work: Path) -> None:
        """The embedded chat tasks (`fusion.data.skills`): their train split, and their test split per skill."""
        skills = tuple(self.chat.skills)
        rows = [{"messages": c["messages"]} for c in skill_conversations("train", skills)]
        train, counts = self._encode_split(datasets.Dataset.from_list(rows), "train", encoder, ("messages",), work)
        counts = {"train": counts}
        for skill in skills:
            rows = [{"messages": c["messages"]} for c in skill_conversations("test", (skill,))]
            held_out, counts[skill] = self._encode_split(datasets.Dataset.from_list(rows), skill, encoder,
                                                         ("messages",), work)
            held_out.save_to_disk(str(folder / "validation" / skill))
        train.save_to_disk(str(folder / "train"))
        shutil.rmtree(work)
        (folder / "done").write_text(json.dumps({"counts": counts, "validation": list(skills)}))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        target = self.cache_path()
        done = json.loads((target / "done").read_text())
        self.counts = done["counts"]
        self.train_set = datasets.load_from_disk(str(target / "train"))
        self.validation_sets = {name: datasets.load_from_disk(str(target / "validation" / name))
                                for name in done["validation"]}
        self.pad_id = self.tokenizer().pad_token_id
        if rank_zero_only.rank == 0:  # once: setup() returns early from now on
            for split, counts in self.counts.items():
                print(f"[fusion] chat data, {split}: {summary(counts, self.chat.max_length)}", file=sys.stderr)

    @property
    def validation_names(self) -> list[str]:
        return list(self.validation_sets)

    def train_dataloader(self) -> ResumableLoader:
        return train_loader(self.train_set, self.batch_size, self.seed, self.trainer, self.data.num_workers,
                            "conversations", partial(pad_batch, pad_id=self.pad_id))

    def val_dataloader(self) -> list[DataLoader]:
        return validation_loaders(list(self.validation_sets.values()), self.batch_size, self.trainer,
                                  self.data.num_workers, partial(pad_batch, pad_id=self.pad_id))


def chat_datamodule(recipe: Recipe, tokenizer_path: str) -> ChatDataModule:
    """The recipe's conversations, tokenized by the model's tokenizer and rendered with `chat.template` (default: the
    tokenizer's own)."""
    return ChatDataModule(recipe.data, recipe.chat, tokenizer_path, recipe.trainer.batch_size, seed=recipe.seed,
                          trust_remote_code=recipe.model.trust_remote_code)
