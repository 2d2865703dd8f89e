"""Token alignment: the i -> i+1 convention on hand-built cases, the three modes, and the zoo's real tokenizers."""

import numpy as np
import pytest

from fusion.data.alignment import TokenTable, align, align_many, aligned_distribution
from fusion.data.chunks import sequence_ids
from fusion.data.corpus import embedded_corpus
from fusion.data.text import load_tokenizer
from fusion.data.vocab import build_vocab_map
from fusion.reference import dtw_path, one_to_one
from fusion.zoo import resolve_model

# Hand-built vocabularies: id 0 = start, 1 = eos, then text pieces (canonical strings: " " is a space).
TARGET = ["<s>", "</s>", "Hello", " world", "Hel", "lo", " wor", "ld", "The", " cat", " sat", "!"]
TEACHER = ["<|bos|>", "<|eos|>", "Hel", "lo", " world", "Hello", "The", " cat", " sa", "t", "!", " wrld", "Hel world"]


def table(strings: list[str]) -> TokenTable:
    nbytes = np.array([0, 0] + [len(s.encode()) for s in strings[2:]])
    return TokenTable(strings=strings, nbytes=nbytes)


def ids(vocab: list[str], *pieces: str, eos: bool = True) -> np.ndarray:
    return np.array([0, *[vocab.index(p) for p in pieces], *([1] if eos else [])])


def run(target: np.ndarray, teacher: np.ndarray, text: str, mode: str = "mined", vocab_ids=None, eos=True):
    if vocab_ids is None:  # the identity on equal strings, else the target's "!" (never right by accident)
        vocab_ids = np.array([TARGET.index(s) if s in TARGET else TARGET.index("!") for s in TEACHER])
        vocab_ids[:2] = [0, 1]
    return align(target, teacher, eos, len(text.encode()), table(TARGET), table(TEACHER), mode, vocab_ids)


@pytest.mark.parametrize("mode", ["mined", "exact", "offsets"])
def test_one_to_many_first_token_falls_back_and_eos_aligns(mode):
    # target: <s> Hello _world </s>     teacher: <bos> Hel lo _world <eos>
    src = run(ids(TARGET, "Hello", " world"), ids(TEACHER, "Hel", "lo", " world"), "Hello world", mode)
    # position 0 predicts "Hello": the teacher spells it with two tokens -> no single prediction, fallback.
    # position 1 predicts " world": teacher token 3 is " world", predicted at teacher position 2.
    # position 2 predicts </s>: the teacher's EOS (token 4) is predicted at teacher position 3.
    assert src.tolist() == [-1, 2, 3]


@pytest.mark.parametrize("mode", ["mined", "exact", "offsets"])
def test_many_to_one(mode):
    # target: <s> Hel lo _world (no eos)     teacher: <bos> Hello _world
    src = run(ids(TARGET, "Hel", "lo", " world", eos=False), ids(TEACHER, "Hello", " world", eos=False),
              "Hello world", mode, eos=False)
    # "Hel" and "lo" share one teacher token: no teacher prediction is for either alone.
    assert src.tolist() == [-1, -1, 1]


@pytest.mark.parametrize("mode", ["mined", "exact", "offsets"])
def test_first_token_aligned_from_the_start_tokens(mode):
    src = run(ids(TARGET, "The", " cat", "!"), ids(TEACHER, "The", " cat", "!"), "The cat!", mode)
    assert src.tolist() == [0, 1, 2, 3]  # position 0 (start) predicts "The": the teacher's start does too


def test_mined_accepts_a_mapped_token_exact_does_not():
    # " sat" (target) vs " sa" + "t" (teacher) is one-to-many: fallback in every mode. " wrld" (a teacher
    # typo token) is one-to-one with " world"; MinED maps " wrld" -> " world", so mined accepts it.
    vocab_ids = np.array([0, 1, 4, 5, 3, 2, 8, 9, 10, 11, 11, 3])  # TEACHER -> TARGET, " wrld" -> " world"
    target, teacher = ids(TARGET, "Hello", " world"), ids(TEACHER, "Hello", " wrld")
    assert run(target, teacher, "Hello world", "mined", vocab_ids).tolist() == [0, 1, 2]
    assert run(target, teacher, "Hello world", "exact", vocab_ids).tolist() == [0, -1, 2]
    cat = run(ids(TARGET, "The", " cat", " sat"), ids(TEACHER, "The", " cat", " sa", "t"), "The cat sat", "mined")
    assert cat.tolist() == [0, 1, -1, 4]


def test_fallback_is_a_one_hot_on_the_next_target_token():
    target = ids(TARGET, "Hello", " world")
    src = np.array([-1, 2, 3], dtype=np.int32)
    k = 3
    topk_ids = np.array([[2, 5, 4], [5, 2, 4], [4, 1, 3], [1, 4, 2]])  # teacher rows for positions 0..3
    topk_lp = np.log(np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1], [0.9, 0.05, 0.05]]))
    vocab_ids = np.array([0, 1, 4, 5, 3, 2, 8, 9, 10, 11, 11, 3])
    out_ids, out_lp, fallback = aligned_distribution(src, topk_ids, topk_lp, vocab_ids, target)
    assert fallback.tolist() == [True, False, False]
    # position 0 predicts target token 1 ("Hello", id 2) -- not target token 0 (<s>), FuseLLM's off-by-one
    assert out_ids[0, 0] == 2 and out_lp[0, 0] == 0 and np.isneginf(out_lp[0, 1:]).all()
    assert out_ids[1].tolist() == vocab_ids[topk_ids[2]].tolist()
    np.testing.assert_allclose(np.exp(out_lp[2]), [0.9, 0.05, 0.05], rtol=1e-6)
    assert out_ids.shape == out_lp.shape == (3, k)


def test_duplicate_mapped_candidates_pool_their_probability_and_exact_mode_drops_mined_ones():
    src = np.array([0], dtype=np.int32)
    topk_ids = np.array([[4, 11, 5]])  # " world", " wrld" (-> " world" by MinED), "Hello"
    topk_lp = np.log(np.array([[0.5, 0.3, 0.2]]))
    vocab_ids = np.array([0, 1, 4, 5, 3, 2, 8, 9, 10, 11, 11, 3])
    target = ids(TARGET, " world", eos=False)
    out_ids, out_lp, _ = aligned_distribution(src, topk_ids, topk_lp, vocab_ids, target)
    assert out_ids[0].tolist() == [3, 3, 2]
    np.testing.assert_allclose(np.exp(out_lp[0]), [0.8, 0.0, 0.2], atol=1e-6)
    exact = np.array([s in TARGET for s in TEACHER])
    _, out_lp, _ = aligned_distribution(src, topk_ids, topk_lp, vocab_ids, target, keep=exact)
    np.testing.assert_allclose(np.exp(out_lp[0]), [0.5, 0.0, 0.2], atol=1e-6)


@pytest.fixture(scope="module")
def zoo_tokenizers(zoo_dir):
    return {name: load_tokenizer(resolve_model(f"zoo:{name}", "small", zoo_dir))
            for name in ("target", "gpt2-code", "neox-prose")}


@pytest.fixture(scope="module")
def texts():
    docs = embedded_corpus("validation", ("code", "prose"))
    return [d["text"][:600] for d in docs[:24]]


def test_identical_tokenizers_give_the_identity(zoo_tokenizers, texts):
    tok = zoo_tokenizers["target"]
    t = TokenTable.of(tok)
    seqs = sequence_ids(tok, texts, [True] * len(texts))
    vmap = build_vocab_map(tok, tok)
    for mode in ("mined", "exact", "offsets", "prefix"):
        srcs = align_many([(np.array(s), np.array(s), True, len(x.encode())) for s, x in zip(seqs, texts)],
                          t, t, mode, vmap.ids)
        for s, src in zip(seqs, srcs):
            assert src.tolist() == list(range(len(s) - 1)), mode


@pytest.mark.parametrize("teacher", ["gpt2-code", "neox-prose"])
def test_zoo_teachers_report_a_fallback_rate_and_banded_dtw_matches_full_dtw(zoo_tokenizers, texts, teacher):
    target_tok, teacher_tok = zoo_tokenizers["target"], zoo_tokenizers[teacher]
    tt, ut = TokenTable.of(target_tok), TokenTable.of(teacher_tok)
    vmap = build_vocab_map(teacher_tok, target_tok)
    ends = [True] * len(texts)
    sequences = list(zip(map(np.array, sequence_ids(target_tok, texts, ends)),
                         map(np.array, sequence_ids(teacher_tok, texts, ends)), ends, [len(x.encode()) for x in texts]))
    rates = {}
    for mode in ("mined", "exact", "offsets", "prefix"):
        srcs = align_many(sequences, tt, ut, mode, vmap.ids)
        for (target, teacher_ids, _, _), src in zip(sequences, srcs):
            assert len(src) == len(target) - 1
            assert src.max() < len(teacher_ids) - 1  # a real teacher prediction row
            assert (np.diff(src[src >= 0]) > 0).all()  # monotone: alignment never goes back in the text
        rates[mode] = float(np.mean(np.concatenate(srcs) < 0))
        assert 0 < rates[mode] < 1, rates
    print(f"\nfallback rates {teacher} -> target (small zoo): {rates}")
    assert rates["exact"] >= rates["mined"]  # exact accepts a subset of what MinED accepts
    assert rates["prefix"] < min(rates["offsets"], rates["mined"])  # every shared boundary, spans equal or not

    # The banded DTW finds the full DTW's one-to-one pairs (text tokens, exact-string acceptance).
    from fusion.data.alignment import _dtw_pairs, _spelled, byte_spans

    for target, teacher_ids, _, nbytes in sequences[:6]:
        t_text, u_text = target[1:-1], teacher_ids[1:-1]
        ts, us = byte_spans(t_text, tt, nbytes), byte_spans(u_text, ut, nbytes)
        a_str, b_str = _spelled(t_text, tt, ts[2]), _spelled(u_text, ut, us[2])
        ((a, b),) = _dtw_pairs([(a_str, b_str, ts, us)])
        assert set(zip(a.tolist(), b.tolist())) == set(one_to_one(dtw_path(a_str, b_str)))


def adversarial_texts(seed: int = 0, n: int = 40) -> list[str]:
    """Random text built from what breaks alignments: quotes, digits, whitespace runs, newlines with
    indentation, unicode (accents, CJK, emoji), code punctuation, and real words."""
    rng = np.random.default_rng(seed)
    pieces = ['"', "'", "`", "BSD", "Sun", "existent", "non", "un", "tin", "in", "greg", "orian", "0", "00",
              "1", "2024", "3.14", " ", "  ", "    ", "\t", "\n", "\n    ", "\n\n", "é", "ü", "日本", "語", "😀",
              "->", "==", "()", "[]", "{", "}", ":", ",", ".", "_", "def", "return", "the", "The", " a", "'s", "'t"]
    return ["".join(rng.choice(pieces, size=int(rng.integers(20, 120)))) for _ in range(n)]


def char_starts(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Per text token, the byte its character starts at (from the tokenizer's own offsets), and whether it
    is the first piece of that character (byte-fallback tokens of one character share its start)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = np.array([len(text[:a].encode()) for a, _ in offsets], dtype=np.int64)
    first = np.ones(len(starts), dtype=bool)
    first[1:] = starts[1:] != starts[:-1]
    return starts, first


@pytest.mark.parametrize("teacher", ["gpt2-code", "neox-prose"])
@pytest.mark.parametrize("mode", ["mined", "exact", "offsets", "prefix"])
def test_every_accepted_pair_follows_the_same_text_prefix(zoo_tokenizers, texts, teacher, mode):
    """The convention: src[i] = j only when target token i+1 and teacher token j+1 start at the same byte
    (the tokenizers' own offsets say where), on real text and adversarial text."""
    target_tok, teacher_tok = zoo_tokenizers["target"], zoo_tokenizers[teacher]
    vmap = build_vocab_map(teacher_tok, target_tok)
    corpus = texts + adversarial_texts()
    ends = [True] * len(corpus)
    sequences = list(zip(map(np.array, sequence_ids(target_tok, corpus, ends)),
                         map(np.array, sequence_ids(teacher_tok, corpus, ends)), ends,
                         [len(x.encode()) for x in corpus]))
    srcs = align_many(sequences, TokenTable.of(target_tok), TokenTable.of(teacher_tok), mode, vmap.ids)
    checked = 0
    for text, (target, teacher_ids, _, _), src in zip(corpus, sequences, srcs):
        t_start, t_first = char_starts(target_tok, text)
        u_start, u_first = char_starts(teacher_tok, text)
        assert len(t_start) == len(target) - 2 and len(u_start) == len(teacher_ids) - 2
        a = np.flatnonzero(src[:len(t_start)] >= 0)  # target text token a (sequence token a+1): position a
        b = src[a]
        a, b = a[b < len(u_start)], b[b < len(u_start)]
        whole = t_first[a] & u_first[b]
        assert (t_start[a][whole] == u_start[b][whole]).all(), [
            (text[:40], int(x), int(y)) for x, y in zip(a[whole], b[whole]) if t_start[x] != u_start[y]][:5]
        checked += int(whole.sum())
    assert checked > 1000


def test_a_position_whose_candidates_are_all_dropped_falls_back_instead_of_nan():
    vocab_ids = np.array([0, 1, 2, 3])
    keep = np.array([True, True, False, False])  # teacher ids 2 and 3 have no exact match
    src = np.array([0, 1])
    topk_ids = np.array([[2], [1]])  # top_k = 1: position 0's only candidate is dropped
    topk_logprobs = np.array([[-0.1], [-0.2]], dtype=np.float32)
    ids, logprobs, fallback = aligned_distribution(src, topk_ids, topk_logprobs, vocab_ids, np.array([0, 3, 1]), keep)
    assert fallback.tolist() == [True, False]
    assert ids[0, 0] == 3 and logprobs[0, 0] == 0.0  # the one-hot on the gold token
    import torch

    from fusion.modules.losses import teacher_probs

    probs = teacher_probs(torch.tensor([[-np.inf, -np.inf], [-1.0, -np.inf]]))
    assert torch.isfinite(probs).all() and probs[0].sum() == 0 and probs[1, 0] == 1


def test_prefix_pairs_every_position_where_both_have_a_boundary():
    # target: <s> Hel lo _world </s>     teacher: <bos> Hello _world <eos>
    src = run(ids(TARGET, "Hel", "lo", " world"), ids(TEACHER, "Hello", " world"), "Hello world", "prefix")
    # position 0 (after the start: empty prefix) <- teacher position 0, although "Hel" != "Hello";
    # position 1 (after "Hel") has no teacher boundary there; position 2 (after "Hello") <- teacher 1;
    # position 3 (after the whole text: EOS) <- teacher position 2.
    assert src.tolist() == [0, -1, 1, 2]
    # and where one side has more boundaries than the other, each shared one is used
    src = run(ids(TARGET, "Hello", " wor", "ld"), ids(TEACHER, "Hel", "lo", " world"), "Hello world", "prefix")
    assert src.tolist() == [0, 2, -1, 3]


def test_prefix_projects_candidates_onto_the_target_token_they_start_with_and_pools_them():
    # At target position 0 (gold "Hel"), the teacher predicts "Hello" 0.6, "Hel" 0.3, "The" 0.1. The target
    # spells "Hello" as "Hel|lo", so the `first` map sends both "Hello" and "Hel" to "Hel": 0.9 pooled.
    first = np.array([0, 1, TARGET.index("Hel"), TARGET.index("lo"), TARGET.index(" wor"), TARGET.index("Hel"),
                      TARGET.index("The"), TARGET.index(" cat"), TARGET.index(" sat"), TARGET.index("!"),
                      TARGET.index("!"), TARGET.index(" wor")])
    topk_ids = np.array([[TEACHER.index("Hello"), TEACHER.index("Hel"), TEACHER.index("The")]])
    topk_lp = np.log(np.array([[0.6, 0.3, 0.1]], dtype=np.float32))
    out_ids, out_lp, fallback = aligned_distribution(np.array([0]), topk_ids, topk_lp, first,
                                                     ids(TARGET, "Hel", eos=False))
    probs = {}
    for token, p in zip(out_ids[0].tolist(), np.exp(out_lp[0]).tolist()):  # the pooled entry's twin has 0
        probs[token] = probs.get(token, 0.0) + p
    assert not fallback[0]
    assert probs[TARGET.index("Hel")] == pytest.approx(0.9) and probs[TARGET.index("The")] == pytest.approx(0.1)


def test_prefix_credits_the_teachers_own_next_token_to_the_targets():
    # target: <s> Hello _world </s>     teacher: <bos> Hel lo _world <eos>
    # At target position 0 (gold "Hello") the teacher predicts "Hel" 0.5 (its own next token), "The" 0.3,
    # "Hello" 0.2. Alone, "Hel" would be projected to the target's "Hel"; but it is what the text holds, and
    # the target spells that text "Hello": the teacher's truth is the target's truth, so "Hello" gets 0.7.
    target, teacher = ids(TARGET, "Hello", " world"), ids(TEACHER, "Hel", "lo", " world")
    src, read = align_many([(target, teacher, True, len(b"Hello world"))], table(TARGET), table(TEACHER), "prefix",
                           with_read=True)[0]
    assert src[0] == 0 and read[0] == 0
    first = np.array([TARGET.index(t) if t in TARGET else 0 for t in TEACHER])
    topk_ids = np.zeros((len(teacher) - 1, 3), dtype=np.int64)
    topk_ids[0] = [TEACHER.index("Hel"), TEACHER.index("The"), TEACHER.index("Hello")]
    topk_lp = np.log(np.full((len(teacher) - 1, 3), 1 / 3, dtype=np.float32))
    topk_lp[0] = np.log([0.5, 0.3, 0.2])
    out_ids, out_lp, _ = aligned_distribution(src, topk_ids, topk_lp, first, target, read=read, teacher_tokens=teacher)
    probs = {}
    for token, p in zip(out_ids[0].tolist(), np.exp(out_lp[0]).tolist()):  # the pooled entry's twin has 0
        probs[token] = probs.get(token, 0.0) + p
    assert probs[TARGET.index("Hello")] == pytest.approx(0.7) and probs[TARGET.index("The")] == pytest.approx(0.3)
    assert TARGET.index("Hel") not in out_ids[0]
    # without the teacher's own tokens (a teacher that did not say what came next), the projection stands
    out_ids, _, _ = aligned_distribution(src, topk_ids, topk_lp, first, target)
    assert TARGET.index("Hel") in out_ids[0]


@pytest.mark.parametrize("teacher", ["target", "gpt2-code", "neox-prose"])
def test_first_map_is_a_target_token_spelling_a_prefix_of_the_teacher_token(zoo_tokenizers, teacher):
    """`VocabMap.first` (the prefix mode's projection): the target token spells the start of the teacher
    token's bytes, and for the target's own vocabulary it is mostly the token itself."""
    from fusion.data.vocab import canonical_tokens

    target_tok, teacher_tok = zoo_tokenizers["target"], zoo_tokenizers[teacher]
    vmap = build_vocab_map(teacher_tok, target_tok)
    target_strings, target_special, _ = canonical_tokens(target_tok)
    teacher_strings, _, _ = canonical_tokens(teacher_tok)
    rows = [i for i in range(vmap.n_tokens) if not vmap.special[i]]
    assert not target_special[vmap.first[rows]].any()

    def spelled(text: str) -> bytes:
        return text.encode("utf-8", "surrogateescape")

    assert all(spelled(teacher_strings[i]).startswith(spelled(target_strings[vmap.first[i]])) for i in rows)
    if teacher == "target":  # a piece the tokenizer emits for its own text, unless BPE merges it otherwise
        assert np.mean(vmap.first[rows] == np.array(rows)) > 0.75


def test_prefix_with_read_serves_positions_inside_a_teacher_token():
    # target: <s> Hel lo _world </s>     teacher: <bos> Hello _world <eos>
    src, read = align_many([(ids(TARGET, "Hel", "lo", " world"), ids(TEACHER, "Hello", " world"), True,
                             len(b"Hello world"))], table(TARGET), table(TEACHER), "prefix", with_read=True)[0]
    # position 1 predicts "lo", which starts 3 bytes into the teacher's "Hello", predicted at teacher position 0
    assert src.tolist() == [0, 0, 1, 2] and read.tolist() == [0, 3, 0, 0]


def test_inside_a_teacher_token_only_candidates_that_fit_the_text_count_projected_from_the_rest():
    from fusion.data.vocab import _continuations

    lookup = {(s, False): i for i, s in enumerate(TARGET) if i >= 2}
    cont = _continuations(TEACHER, np.array([True, True] + [False] * (len(TEACHER) - 2)), len(TEACHER), lookup,
                          lambda text: TARGET.index(text) if text in TARGET else -1)
    # At target position 1 (gold "lo"), 3 bytes ("Hel") of the teacher's next token "Hello" are read. The
    # teacher (position 0) said "Hello" 0.5, "Hel" 0.3 (ends where the text goes on: no next token of it),
    # "The" 0.2 (not the text): only "Hello" fits, and its rest "lo" is the target token "lo". Conditioned
    # on "Hel", it gets the top-k's whole mass: 0.5 · 1.0 / 0.5.
    topk_ids = np.array([[TEACHER.index("Hello"), TEACHER.index("Hel"), TEACHER.index("The")]])
    topk_lp = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    target = ids(TARGET, "Hel", "lo", eos=False)
    teacher_tokens = ids(TEACHER, "Hello", eos=False)
    src, read = np.array([-1, 0]), np.array([0, 3], dtype=np.uint16)
    first = np.arange(len(TEACHER))  # unused at read > 0
    out_ids, out_lp, fallback = aligned_distribution(src, topk_ids, topk_lp, first, target, read=read,
                                                     teacher_tokens=teacher_tokens, continuations=cont)
    assert fallback.tolist() == [True, False]
    assert out_ids[1, 0] == TARGET.index("lo") and out_lp[1, 0] == pytest.approx(0.0, abs=1e-6)
    assert np.isneginf(out_lp[1, 1:]).all()
    # the top-k summing to 0.8 (the tail holds 0.2): the fit is scaled to 0.8, the tail stays the teacher's
    _, lp, _ = aligned_distribution(src, topk_ids, np.log(np.array([[0.4, 0.2, 0.2]], dtype=np.float32)), first,
                                    target, read=read, teacher_tokens=teacher_tokens, continuations=cont)
    assert lp[1, 0] == pytest.approx(np.log(0.8), abs=1e-6)
    # the teacher's own token ("Hello") not in its top-k: the one that fits ("Hel world": " world" after "Hel")
    # is a guess and keeps its own probability
    guess = np.array([[TEACHER.index("Hel world"), TEACHER.index("Hel"), TEACHER.index("The")]])
    g_ids, lp, fallback = aligned_distribution(src, guess, np.log(np.array([[0.1, 0.3, 0.2]], dtype=np.float32)),
                                               first, target, read=read, teacher_tokens=teacher_tokens,
                                               continuations=cont)
    assert not fallback[1] and g_ids[1, 0] == TARGET.index(" world") and lp[1, 0] == pytest.approx(np.log(0.1))

    # a position where nothing fits falls back to the gold one-hot
    _, lp, fallback = aligned_distribution(src, topk_ids[:, 1:], topk_lp[:, 1:], first, target, read=read,
                                           teacher_tokens=teacher_tokens, continuations=cont)
    assert fallback.tolist() == [True, True] and lp[1, 0] == 0


@pytest.mark.parametrize("teacher", ["gpt2-code", "neox-prose"])
def test_prefix_with_read_pairs_a_target_token_with_the_teacher_token_it_starts_in(zoo_tokenizers, texts, teacher):
    """On real and adversarial text: every target position served from inside a teacher token starts
    ``read`` bytes after that token's start and before its end (the tokenizers' own offsets say so), and
    the served share only grows."""
    target_tok, teacher_tok = zoo_tokenizers["target"], zoo_tokenizers[teacher]
    corpus = texts + adversarial_texts(seed=1)
    ends = [True] * len(corpus)
    sequences = list(zip(map(np.array, sequence_ids(target_tok, corpus, ends)),
                         map(np.array, sequence_ids(teacher_tok, corpus, ends)), ends,
                         [len(x.encode()) for x in corpus]))
    tt, ut = TokenTable.of(target_tok), TokenTable.of(teacher_tok)
    with_read = align_many(sequences, tt, ut, "prefix", with_read=True)
    plain = align_many(sequences, tt, ut, "prefix")
    inside = 0
    for text, (src, read), boundary in zip(corpus, with_read, plain):
        assert (src[read == 0] == boundary[read == 0]).all() and (boundary[read > 0] < 0).all()
        t_start, t_first = char_starts(target_tok, text)
        u_start, _ = char_starts(teacher_tok, text)
        u_end = np.append(u_start[1:], len(text.encode()))
        a = np.flatnonzero((read[:len(t_start)] > 0) & t_first)
        b = src[a]
        assert (u_start[b] + read[a] == t_start[a]).all() and (t_start[a] < u_end[b]).all()
        inside += len(a)
    assert inside > 0
    assert np.mean(np.concatenate([s for s, _ in with_read]) < 0) < np.mean(np.concatenate(plain) < 0)
