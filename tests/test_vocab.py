"""The teacher -> target vocabulary map (MinED) on the small zoo's three tokenizers."""

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from fusion.data import vocab
from fusion.data.vocab import build_vocab_map, canonical_tokens, tokenizer_family, vocab_map_key
from fusion.errors import FusionError
from fusion.reference import levenshtein


def test_byte_decoder_is_gpt2s_alphabet():
    table = vocab._BYTE_DECODER
    assert len(table) == 256 and sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n") and table["a"] == ord("a")


def test_families_come_from_the_backend(zoo):
    assert tokenizer_family(zoo["gpt2-code"][0])[0] == "byte-level"
    assert tokenizer_family(zoo["target"][0]) == ("metaspace", "▁", True)
    assert tokenizer_family(zoo["neox-prose"][0]) == ("metaspace", "▁", True)


def test_identical_tokenizers_give_the_identity(zoo):
    tok, rows = zoo["target"]
    vmap = build_vocab_map(tok, tok, rows)
    assert vmap.ids.dtype == np.int64 and len(vmap) == rows
    np.testing.assert_array_equal(vmap.ids, np.arange(rows))
    assert vmap.exact.all() and (vmap.distance == 0).all()
    assert vmap.stats["mined"] == 0


@pytest.mark.parametrize("teacher", ["gpt2-code", "neox-prose"])
def test_every_entry_is_at_minimal_edit_distance(zoo, teacher):
    teacher_tok, rows = zoo[teacher]
    target_tok, _ = zoo["target"]
    vmap = build_vocab_map(teacher_tok, target_tok, rows)
    t_strings, t_special, t_byte = canonical_tokens(teacher_tok)
    g_strings, g_special, g_byte = canonical_tokens(target_tok)
    candidates = [j for j in range(len(g_strings)) if not g_special[j]]
    ordinary = [i for i in range(len(t_strings)) if not t_special[i]]
    assert vmap.stats["exact"] > 0 and vmap.stats["mined"] > 0
    sample = random.Random(0).sample(ordinary, 50)
    sample += [i for i in ordinary if not vmap.exact[i]][:10]  # make sure some MinED entries are checked
    for i in sample:
        distances = [levenshtein(t_strings[i], g_strings[j]) for j in candidates]
        best = min(distances)
        ties = [j for j, d in zip(candidates, distances) if d == best]
        same_kind = [j for j in ties if g_byte[j] == t_byte[i]]
        # an exact match prefers the piece of the same kind (byte token or text), then the lowest id; MinED
        # ties prefer the target's own first token, else an ordinary piece (the full order: test_vocab_ties.py)
        assert vmap.distance[i] == best, (t_strings[i], g_strings[vmap.ids[i]])
        if best == 0:
            assert vmap.ids[i] == (same_kind[0] if same_kind else ties[0])
        else:
            assert vmap.ids[i] in ties
        assert vmap.exact[i] == (best == 0)


def _without_newline(tokenizer):
    """A copy of a BPE tokenizer whose "\n" text piece is renamed, so only <0x0A> spells a newline."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if "\n" in model["vocab"]:
        model["vocab"]["<no-newline>"] = model["vocab"].pop("\n")
        model["merges"] = [m for m in model["merges"] if "\n" not in "".join(m)]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def test_newline_and_space_markers_normalise(zoo):
    gpt2, rows = zoo["gpt2-code"]
    target, _ = zoo["target"]
    vmap = build_vocab_map(gpt2, target, rows)
    g_vocab, t_vocab = gpt2.get_vocab(), target.get_vocab()
    # Ċ is "\n": it matches the target's text piece "\n" when there is one (the piece the target's
    # tokenizer emits), else its byte-fallback token <0x0A>; a byte token prefers the byte token.
    newline = g_vocab["Ċ"]
    assert vmap.ids[newline] == t_vocab.get("\n", t_vocab["<0x0A>"]) and vmap.exact[newline]
    only_bytes = build_vocab_map(gpt2, _without_newline(target), rows)
    assert only_bytes.ids[newline] == t_vocab["<0x0A>"] and only_bytes.exact[newline]
    neox, neox_rows = zoo["neox-prose"]
    assert build_vocab_map(neox, target, neox_rows).ids[neox.get_vocab()["<0x0A>"]] == t_vocab["<0x0A>"]
    # A partial UTF-8 byte: GPT-2's "Ã" is byte 0xC3, as is the target's <0xC3>.
    if "Ã" in g_vocab:
        assert vmap.ids[g_vocab["Ã"]] == t_vocab["<0xC3>"]
    pairs = [(g, "▁" + g[1:]) for g in g_vocab if g.startswith("Ġ") and len(g) > 2 and "▁" + g[1:] in t_vocab]
    assert len(pairs) >= 5, "the zoo vocabularies should share some space-prefixed words"
    for g, t in pairs:
        assert vmap.ids[g_vocab[g]] == t_vocab[t] and vmap.exact[g_vocab[g]], (g, t)
    # Special tokens by role: GPT-2's <|endoftext|> is the target's eos.
    eot = g_vocab["<|endoftext|>"]
    assert vmap.ids[eot] == target.eos_token_id and vmap.special[eot]


def test_padding_rows_map_to_the_targets_unk(zoo):
    neox, rows = zoo["neox-prose"]
    target, _ = zoo["target"]
    assert rows > len(neox)  # the zoo pads NeoX's vocab_size on purpose
    vmap = build_vocab_map(neox, target, rows)
    assert len(vmap) == rows and vmap.n_tokens == len(neox)
    assert (vmap.ids[len(neox):] == target.unk_token_id).all()
    assert (vmap.distance[len(neox):] == -1).all() and not vmap.exact[len(neox):].any()
    assert vmap.stats["padding"] == rows - len(neox)
    assert (vmap.ids[:len(neox)] < len(target)).all()
    assert vmap.ids[neox.eos_token_id] == target.eos_token_id
    assert vmap.ids[neox.unk_token_id] == target.unk_token_id
    with pytest.raises(FusionError, match="embedding rows"):
        build_vocab_map(neox, target, len(neox) - 1)


def test_cache(zoo, tmp_path, monkeypatch):
    gpt2, rows = zoo["gpt2-code"]
    neox, neox_rows = zoo["neox-prose"]
    target, _ = zoo["target"]
    first = build_vocab_map(gpt2, target, rows, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("vocab-map-*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("computed again instead of loading the cache")

    monkeypatch.setattr(vocab, "compute_vocab_map", fail)
    second = build_vocab_map(gpt2, target, rows, cache_dir=tmp_path)
    for field in ("ids", "exact", "distance", "special"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
    assert second.n_tokens == first.n_tokens
    monkeypatch.undo()

    assert vocab_map_key(gpt2, target, rows) != vocab_map_key(neox, target, neox_rows)
    assert vocab_map_key(gpt2, target, rows) != vocab_map_key(gpt2, target, rows + 64)
    build_vocab_map(neox, target, neox_rows, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("vocab-map-*.npz"))) == 2
