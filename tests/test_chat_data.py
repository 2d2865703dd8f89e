"""Chat data: conversations in three row formats, rendered with real chat templates, labelled on the assistant's
turns only; malformed rows, truncation to max_length, and the data module's batches, cache and counts."""

import json
import re
from dataclasses import dataclass

import datasets
import pytest
from transformers import AutoTokenizer

from fusion.config import ChatConfig, DataConfig
from fusion.data.chat import (
    IGNORE_INDEX,
    ChatDataModule,
    ChatEncoder,
    MalformedRow,
    Preference,
    normalise_messages,
    normalise_preference,
    row_conversation,
)
from fusion.errors import FusionError
from fusion.zoo import resolve_model

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
          "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
OPENCHAT = ("{{ bos_token }}{% for m in messages %}{{ 'GPT4 Correct ' + m['role'].title() + ': ' + m['content'] + "
            "'<|end_of_turn|>' }}{% endfor %}{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}")
# Mistral-Instruct's: no generation prompt (the answer follows [/INST]), and no system role.
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
           "{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# A plain one whose generation prompt ends with a space: the answer's first token ("ĠI") starts before the answer.
PLAIN = ("{% for m in messages %}{{ m['role'].title() + ': ' + m['content'] + eos_token + '\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")

SYSTEM = {"role": "system", "content": "You answer briefly."}
EXCHANGES = [("What is two plus two?", "It is four."), ("And three plus three?", "Six, of course.\nAnything else?"),
             ("Name a colour.", "Blue")]
CONVERSATION = [m for q, a in EXCHANGES for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


@dataclass
class Family:
    tokenizer: object
    template: str
    end_of_turn: str
    before_answer: str  # what the labelled tokens decode to before each answer: the space that joins its first word
    writes_bos: bool


@pytest.fixture(scope="module")
def families(zoo_dir) -> dict[str, Family]:
    """Four template families on the zoo's tokenizers: a SentencePiece-like BPE that adds BOS to plain text (target)
    and a byte-level BPE that adds none (gpt2-code), with the families' special tokens added."""
    def tokenizer(name, specials=(), **tokens):
        tok = AutoTokenizer.from_pretrained(resolve_model(f"zoo:{name}", "small", zoo_dir))
        tok.add_special_tokens({"additional_special_tokens": list(specials), **tokens})
        return tok

    llama3 = tokenizer("gpt2-code", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                       bos_token="<|begin_of_text|>")
    mistral = tokenizer("gpt2-code", bos_token="<s>", eos_token="</s>")
    return {
        "chatml": Family(tokenizer("target", ["<|im_start|>", "<|im_end|>"]), CHATML, "<|im_end|>", "", False),
        "llama3": Family(llama3, LLAMA3, "<|eot_id|>", "", True),
        # The target's decoder drops the leading space of a decoded piece, so its answers decode without it.
        "openchat": Family(tokenizer("target", ["<|end_of_turn|>"]), OPENCHAT, "<|end_of_turn|>", "", True),
        "mistral": Family(mistral, MISTRAL, "</s>", " ", True),
    }


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive labelled positions, as their ids."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        assert label in (token, IGNORE_INDEX)
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + [current] if current else runs


def answers(tokenizer, encoded) -> list[str]:
    return [tokenizer.decode(run) for run in labelled_runs(encoded.input_ids, encoded.labels)]


# Mistral's template refuses system messages: test_a_row_the_template_refuses_is_malformed.
@pytest.mark.parametrize("name,system", [(name, system) for name in ("chatml", "llama3", "openchat", "mistral")
                                         for system in (False, True) if name != "mistral" or not system])
def test_labels_are_each_answer_and_its_end_of_turn_marker_and_nothing_else(families, name, system):
    family = families[name]
    tok = family.tokenizer
    messages = normalise_messages(([SYSTEM] if system else []) + CONVERSATION)
    encoded = ChatEncoder(tok, family.template, max_length=512).encode(messages)
    assert encoded.status == "whole"
    assert answers(tok, encoded) == [family.before_answer + a + family.end_of_turn for _, a in EXCHANGES]
    text = tok.decode(encoded.input_ids)
    assert (SYSTEM["content"] in text) == system and all(q in text for q, _ in EXCHANGES)
    # BOS only as the template writes it: once, first. The target adds one to plain text, yet ChatML on it has none
    # and OpenChat's, which writes it, has exactly one.
    if name in ("chatml", "openchat"):
        assert tok("plain text")["input_ids"][0] == tok.bos_token_id
    assert encoded.input_ids.count(tok.bos_token_id) == family.writes_bos
    assert (encoded.input_ids[0] == tok.bos_token_id) == family.writes_bos


def test_a_token_joining_the_prompt_and_the_answer_is_trained(families):
    tok = families["mistral"].tokenizer
    encoder = ChatEncoder(tok, PLAIN)
    messages = normalise_messages(CONVERSATION[:2])
    text, [(start, _)], _ = encoder.assistant_spans(messages)
    assert text[start - 1:start + 2] == " It"
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    first = next(k for k, (_, end) in enumerate(offsets) if end > start)
    assert offsets[first][0] == start - 1  # the answer's first token ("ĠI") starts with the prompt's last space
    # The model has to produce that token, so it is labelled (and nothing before it).
    encoded = encoder.encode(messages)
    assert encoded.labels[first] == encoded.input_ids[first] and set(encoded.labels[:first]) == {IGNORE_INDEX}
    assert answers(tok, encoded) == [" It is four.</s>"]


def test_the_tokenizers_own_template_a_file_and_a_string_encode_alike(families, tmp_path):
    tok = families["chatml"].tokenizer
    file = tmp_path / "chatml.jinja"
    file.write_text(CHATML)
    messages = normalise_messages(CONVERSATION)
    expected = ChatEncoder(tok, CHATML).encode(messages)
    assert ChatEncoder(tok, str(file)).encode(messages) == expected
    own = AutoTokenizer.from_pretrained(tok.name_or_path)
    own.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    own.chat_template = CHATML
    assert ChatEncoder(own).encode(messages) == expected
    # OpenChat's template on the same tokenizer gives other ids: the template given is the one used.
    assert ChatEncoder(tok, OPENCHAT).encode(messages).input_ids != expected.input_ids


def test_template_problems_are_clear_errors(families):
    tok = families["chatml"].tokenizer
    messages = normalise_messages(CONVERSATION)
    with pytest.raises(FusionError, match=r"has no chat template; set chat\.template"):
        ChatEncoder(tok)
    with pytest.raises(FusionError, match=r"chat\.template 'no/such/template\.jinja' is neither a Jinja template"):
        ChatEncoder(tok, "no/such/template.jinja")
    with pytest.raises(FusionError, match="not a valid Jinja template") as err:
        ChatEncoder(tok, "{% for m in messages %}{{ m['content'] }}").encode(messages)
    assert not isinstance(err.value, MalformedRow)  # the template is broken, not the row: never skipped
    # The message count changes the start of the text: the prefixes do not locate the turns.
    with pytest.raises(FusionError, match="chat.template is not prefix-consistent: in row 0, rendering the first 1"):
        ChatEncoder(tok, "{{ messages | length }}" + CHATML).encode(messages)
    with pytest.raises(FusionError, match="does not write assistant message 1"):
        ChatEncoder(tok, CHATML.replace("m['content']", "m['content'] | upper")).encode(messages)


def test_a_row_the_template_refuses_is_malformed(families):
    family = families["mistral"]
    with pytest.raises(MalformedRow, match="row 4: chat.template refuses this conversation: Only user and assistant") \
            as err:
        ChatEncoder(family.tokenizer, family.template).encode(normalise_messages([SYSTEM] + CONVERSATION), row=4)
    assert err.value.reason == "refused by the template"


MALFORMED = [
    ("hello", "wrong type", "not a non-empty list of messages"),
    ([], "wrong type", "not a non-empty list of messages"),
    (["hi"], "wrong type", "message 0 of the conversation is 'hi' (str), not a mapping"),
    ([{"text": "hi"}], "wrong type", "neither a role"),
    ([{"role": "tool", "content": "42"}], "unknown role", "role 'tool'; use one of system, user, assistant"),
    ([{"from": "bing", "value": "hi"}], "unknown role", "from 'bing'; use one of system, human, user, gpt, assistant"),
    ([{"role": "user", "content": 5}], "content not a string",
     "the content of message 0 of the conversation is 5 (int), not a string"),
    ([{"from": "human", "value": None}], "content not a string",
     "the value of message 0 of the conversation is None (NoneType)"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}], "empty content",
     "message 0 (user) of the conversation is empty"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "empty content",
     "message 1 (assistant)"),
    ([{"role": "user", "content": "q"}, SYSTEM, {"role": "assistant", "content": "a"}], "system message not first",
     "message 1 of the conversation is a system message"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "roles do not alternate", "two user turns in a row (messages 0 and 1)"),
    ([SYSTEM, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "roles do not alternate",
     "starts with an assistant turn"),
    ([SYSTEM, {"role": "user", "content": "q"}], "no assistant turn", "has no assistant message"),
]


@pytest.mark.parametrize("value,reason,message", MALFORMED)
def test_malformed_rows_name_the_row_what_is_wrong_and_the_fix(value, reason, message):
    with pytest.raises(MalformedRow) as err:
        normalise_messages(value, row=7)
    assert isinstance(err.value, FusionError) and err.value.reason == reason
    assert str(err.value).startswith("row 7: ") and message in str(err.value)
    fixes = ("give", "make", "use one of", "drop", "merge", "must alternate", "add")
    assert any(fix in str(err.value) for fix in fixes)


def test_sharegpt_and_messages_rows_are_the_same_conversation_and_empty_system_messages_go():
    sharegpt = [{"from": "system", "value": SYSTEM["content"]}] + [
        {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in CONVERSATION]
    assert normalise_messages(sharegpt) == [SYSTEM] + CONVERSATION
    assert normalise_messages([{"role": "system", "content": ""}] + CONVERSATION) == CONVERSATION
    with pytest.raises(MalformedRow, match=r"two user turns in a row \(messages 1 and 2\)"):  # counted as in the row
        normalise_messages([{"role": "system", "content": ""}, CONVERSATION[0], *CONVERSATION])
    row = {"conversations": sharegpt, "other": 1}
    assert row_conversation(row, ("conversations",), 0) == [SYSTEM] + CONVERSATION


def test_preference_rows_give_the_shared_prompt_and_both_completions():
    user, good, bad = CONVERSATION[0], CONVERSATION[1], {"role": "assistant", "content": "Five."}
    assert normalise_preference(user["content"], good["content"], "Five.") == Preference([user], [good], [bad])
    # Completions that repeat the prompt (UltraFeedback-binarized) lose it; a multi-turn prompt is kept whole.
    prompt = [SYSTEM, *CONVERSATION[:3]]
    assert normalise_preference(prompt, prompt + [good], [bad]) == Preference(prompt, [good], [bad])
    row = {"prompt": user["content"], "chosen": [user, good], "rejected": "Five."}
    assert row_conversation(row, ("prompt", "chosen", "rejected"), 0) == [user, good]
    for args, reason, message in [
        ((CONVERSATION[:2], "a", "b"), "roles do not alternate", "the prompt's last message is the assistant's"),
        (("q", "", "b"), "empty content", "message 1 (assistant) of the prompt followed by chosen is empty"),
        (("q", "a", 3), "wrong type", "rejected is 3 (int)"),
        ((user["content"], [user], "b"), "no assistant turn", "chosen holds only the prompt"),
        (("q", "a", [user, good]), "roles do not alternate", "followed by rejected has two user turns"),
    ]:
        with pytest.raises(MalformedRow, match=f"row 3: .*{re.escape(message)}") as err:
            normalise_preference(*args, row=3)
        assert err.value.reason == reason


def test_long_conversations_lose_whole_exchanges_from_the_end(families):
    family = families["chatml"]
    tok, messages = family.tokenizer, normalise_messages([SYSTEM] + CONVERSATION)
    full = ChatEncoder(tok, family.template, 512)
    two = full.encode(messages[:5])
    encoded = ChatEncoder(tok, family.template, len(two.input_ids)).encode(messages)
    assert (encoded.status, encoded.turns_dropped, encoded.cut) == ("truncated", 1, False)
    assert encoded.input_ids == two.input_ids and encoded.labels == two.labels
    assert answers(tok, encoded) == [a + "<|im_end|>" for _, a in EXCHANGES[:2]]
    encoded = ChatEncoder(tok, family.template, len(two.input_ids) - 1).encode(messages)
    assert encoded.turns_dropped == 2 and encoded.input_ids == full.encode(messages[:3]).input_ids
    # A trailing user turn teaches nothing and is not rendered.
    assert full.encode(messages + [{"role": "user", "content": "Thanks!"}]) == full.encode(messages)


def test_a_first_exchange_too_long_is_cut_and_one_without_answer_tokens_is_dropped(families):
    family = families["chatml"]
    tok = family.tokenizer
    answer = "One two three four five six seven eight nine ten eleven twelve."
    messages = normalise_messages([{"role": "user", "content": "Count."}, {"role": "assistant", "content": answer},
                                   *CONVERSATION])
    prompt = len(tok(ChatEncoder(tok, family.template).render(messages[:1], add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"])
    encoded = ChatEncoder(tok, family.template, prompt + 6).encode(messages)
    assert (encoded.status, encoded.cut, len(encoded.input_ids)) == ("cut", True, prompt + 6)
    (run,) = labelled_runs(encoded.input_ids, encoded.labels)
    assert len(run) == 6 and answer.startswith(tok.decode(run))
    # Every answer token lies beyond max_length (a label at position 0 would never be trained: none at prompt + 1).
    assert ChatEncoder(tok, family.template, prompt).encode(messages) is None


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")


@pytest.fixture(scope="module")
def chatml_tokenizer_path(families, tmp_path_factory):
    """The ChatML family's tokenizer saved with the template as its own."""
    folder = tmp_path_factory.mktemp("chatml-tokenizer")
    tok = families["chatml"].tokenizer
    tok.chat_template = CHATML
    try:
        tok.save_pretrained(folder)
    finally:
        tok.chat_template = None
    return str(folder)


def test_the_data_module_skips_counts_pads_caches_and_resumes(tmp_path, chatml_tokenizer_path, capsys):
    good = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
            for i in range(30)]
    long_answer = {"role": "assistant", "content": "words " * 60}
    rows = good[:10] + [
        [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "a"}],  # row 10
        [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}],
        [*good[0], {"role": "user", "content": "More?"}, long_answer],  # truncated to its first exchange
        [{"role": "user", "content": "words " * 60}, long_answer],  # no answer token within max_length: dropped
    ] + good[10:]
    _write_jsonl(tmp_path / "chat.jsonl", [{"messages": m, "id": i} for i, m in enumerate(rows)])
    data = DataConfig(source=str(tmp_path / "chat.jsonl"), validation_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    chat = ChatConfig(max_length=48)
    with pytest.raises(FusionError, match=r"chat\.jsonl', train split: row 10: message 0 of the conversation has role "
                                          r"'tool'.*chat\.skip_malformed: true"):
        ChatDataModule(data, chat, chatml_tokenizer_path, batch_size=4).prepare_data()

    chat = ChatConfig(max_length=48, skip_malformed=True)
    module = ChatDataModule(data, chat, chatml_tokenizer_path, batch_size=4, seed=1)
    module.prepare_data()
    module.setup()
    module.setup()
    assert module.counts == {"train": {"whole": 30, "truncated": 1, "dropped": 1, "skipped: unknown role": 1,
                                       "skipped: roles do not alternate": 1, "skipped: empty content": 1}}
    printed = capsys.readouterr().err
    assert printed.count("[fusion] chat data") == 1
    assert ("train: 35 conversations: 30 kept whole, 1 truncated by whole turns to chat.max_length=48, 0 cut inside "
            "their first exchange, 1 dropped (no assistant token within chat.max_length), 3 skipped as malformed "
            "(empty content: 1, roles do not alternate: 1, unknown role: 1)") in printed
    assert len(module.train_set) + len(module.validation_sets["all"]) == 31 and module.validation_names == ["all"]

    loader = module.train_dataloader()
    batches = iter(loader)
    batch = next(batches)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, int(lengths.max()))
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["input_ids"][pad] == module.pad_id).all() and (batch["labels"][pad] == -100).all()
    for i, n in enumerate(lengths):  # right padding: the tokens first, each row with answer tokens
        assert not pad[i, :n].any() and pad[i, n:].all() and (batch["labels"][i, 1:n] != -100).any()
    loader.batch_consumed()
    expected = next(batches)
    state = loader.state_dict()
    resumed = ChatDataModule(data, chat, chatml_tokenizer_path, batch_size=4, seed=1)
    resumed.setup()
    resumed_loader = resumed.train_dataloader()
    resumed_loader.load_state_dict(state)
    assert all((next(iter(resumed_loader))[k] == expected[k]).all() for k in expected)
    validation = next(iter(module.val_dataloader()[0]))
    assert set(validation) == {"input_ids", "attention_mask", "labels"}

    assert ChatDataModule(data, chat, chatml_tokenizer_path, batch_size=8, seed=1).cache_path() == module.cache_path()
    for other in (ChatConfig(max_length=64, skip_malformed=True), ChatConfig(max_length=48, skip_malformed=True,
                                                                            template=OPENCHAT)):
        assert ChatDataModule(data, other, chatml_tokenizer_path, batch_size=4, seed=1).cache_path() != \
            module.cache_path()


def test_the_data_module_trains_on_preference_rows_prompt_and_chosen_with_their_validation_split(
        tmp_path, chatml_tokenizer_path):
    def rows(n):
        return [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
                for i in range(n)]

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(8)),
                          "validation": datasets.Dataset.from_list(rows(3))}).save_to_disk(str(tmp_path / "pairs"))
    data = DataConfig(source=str(tmp_path / "pairs"), cache_dir=str(tmp_path / "cache"))
    module = ChatDataModule(data, ChatConfig(max_length=64), chatml_tokenizer_path, batch_size=2)
    files, path = sorted((tmp_path / "pairs").rglob("*")), module.cache_path()
    module.prepare_data()
    module.setup()
    # Encoding wrote nothing into the source folder: its content, and so the cache key, are as before.
    assert sorted((tmp_path / "pairs").rglob("*")) == files and module.cache_path() == path
    assert module.counts == {"train": {"whole": 8}, "validation": {"whole": 3}}
    tok = AutoTokenizer.from_pretrained(chatml_tokenizer_path)
    decoded = sorted(tok.decode(run) for example in module.train_set
                     for run in labelled_runs(example["input_ids"], example["labels"]))
    assert decoded == sorted(f"Good answer {i}.<|im_end|>" for i in range(8))


def test_a_source_without_conversations_is_a_clear_error(tmp_path, chatml_tokenizer_path):
    _write_jsonl(tmp_path / "text.jsonl", [{"text": f"just text {i}"} for i in range(10)])
    data = DataConfig(source=str(tmp_path / "text.jsonl"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FusionError, match=r"no conversations: none of the columns .* set chat\.column"):
        ChatDataModule(data, ChatConfig(), chatml_tokenizer_path, 2).prepare_data()
    with pytest.raises(FusionError, match=r"chat\.column 'dialogue' is not a column of data\.source"):
        ChatDataModule(data, ChatConfig(column="dialogue"), chatml_tokenizer_path, 2).prepare_data()


def test_the_embedded_source_is_the_chat_tasks_held_out_per_skill(tmp_path, chatml_tokenizer_path):
    module = ChatDataModule(DataConfig(cache_dir=str(tmp_path / "cache")), ChatConfig(skills=["arithmetic", "code"]),
                            chatml_tokenizer_path, 2)
    module.prepare_data()
    module.setup()
    assert module.validation_names == ["arithmetic", "code"]
    assert len(module.train_set) == 6000 and len(module.validation_sets["code"]) == 300
