"""Token alignment: which teacher prediction serves which target position, on the same text chunk.

Both models read the same chunk of text, each with its own tokenizer, laid out the same way:
``[start] + text tokens + [eos if the chunk ends a document]``, where ``start`` is the tokenizer's
BOS token (its EOS if it has none, as GPT-2 is used). The convention, for a target of ``T`` tokens:

    target position ``i`` (0 <= i < T-1) predicts target token ``i+1``; the teacher's prediction at
    teacher position ``j`` predicts teacher token ``j+1``. ``src[i] = j`` when teacher token ``j+1``
    is aligned with target token ``i+1``, so both predictions follow the same text prefix; else
    ``src[i] = -1`` and position ``i`` falls back to a one-hot on the gold target token ``i+1``.

So target position 0 (the start token) gets the teacher's prediction of its first text token from
the teacher's start token, when the first tokens align; the last text position gets the teacher's
EOS prediction when the chunk ends a document. (FuseLLM's code put its fallback one-hot on target
token ``i``, which position ``i`` does not predict; we never do.)

Four modes:

- ``prefix``: target position ``i`` takes the teacher's prediction at every teacher position ``j`` that
  follows the same text prefix, i.e. target token ``i+1`` and teacher token ``j+1`` start at the same
  byte, whatever their lengths (empty tokens, like a lone dummy-prefix ``▁``, pair only with empty
  tokens at the same byte). The two next tokens may then differ: the teacher's candidates are teacher
  tokens, each the start of a continuation of that prefix, and each is projected onto the target
  token that the target's tokenizer emits first for its text (`fusion.data.vocab.VocabMap.first`:
  `` theory`` -> `` the`` for a target that spells it `` the|ory``); candidates projecting to the
  same target token pool their probability. That is the teacher's distribution of the target's next
  token, up to how the target would cut the text beyond the candidate. On the zoo's validation text,
  the projection of the teacher's own next token gives the target's next token at 84-88 % of the
  positions (the MinED map: 77-82 %, the longest target prefix: 25-52 %). A target position whose
  token starts *inside* a teacher token (no teacher boundary there) is served by that teacher
  token's prediction, conditioned on the bytes of it the text already holds (``read``): only the
  candidates that start with those bytes and go on past them fit, each projected from its remaining
  bytes (`` return`` with `` re`` read -> ``turn``), the rest dropped; if none fits, the position
  falls back. (A candidate that ends within the read bytes would need the teacher's next prediction
  too; it is dropped, which makes this the teacher's distribution given that its token goes on.) The
  fitting candidates are conditioned on the bytes read: where the teacher's own token is among them,
  they are scaled to the top-k's total mass, ``P(c | read) = P(c) · Σ top-k / Σ fitting`` (the tail
  beyond the top-k taken to hold as large a share of fitting tokens), so `fusion.tail: bucket` keeps
  the same tail as at any other position and `renormalise` gets the conditional among the top-k.
  Where the teacher's own token is not in its top-k, the few that fit are guesses and keep their own
  (small) probabilities: scaling those up turned them into confident wrong targets. On the zoo's
  gpt2-code on code, where 38 % of target positions are inside a teacher token, the mean log-probability
  of the gold token there went from -2.26 unconditioned (below the initial target's own -1.80: the
  teacher taught less than the target knew) to -1.33 (the oracle's own top-50: -1.22;
  `bench/run.py alignment`, ``align_gold_logprob_inside``).
  One exception to the projection: the candidate that *is* the teacher's own next token (what the text
  holds) becomes the target's own next token, whatever the target would emit for its text alone. Both
  spell the text from the same byte, so the teacher predicting its truth predicts the target's: a
  teacher's ``)`` is the target's ``)``-and-newline token where the target merges the two, and so on
  for runs of spaces and digits (the alignment learns from the tokens actually aligned, as the paper's
  vocabulary map does).
  On the embedded default's validation chunks, with the teachers' own top-50, 12.6-13.0 % of positions
  still fall back (9.2-15.9 % per domain; mined: 48-63 %, offsets: 36-57 %; `bench/run.py alignment`);
- ``mined`` (the paper's MinED): dynamic time warping over the two token strings with Levenshtein
  cost; a target token aligned one-to-one with a teacher token is accepted when both start at the
  same byte of the text (so the two predictions follow the same prefix: the DTW alone also pairs
  ``SD`` with ``BSD``) and the strings are equal or the MinED vocabulary map sends the teacher token
  to that target token; one-to-many and many-to-one stretches fall back;
- ``exact``: the same path, accepted only when the strings are equal and start at the same byte (the
  paper's EM ablation; candidates without an exact vocabulary match are also dropped, see
  `aligned_distribution`, and a position whose candidates are all dropped falls back);
- ``offsets``: no DTW: target token ``i+1`` and teacher token ``j+1`` are aligned when they span the
  same bytes of the text: both predictions follow exactly the same prefix and their gold tokens are
  the same text. Exact by construction, and a vectorised search instead of a DP.

Token strings and byte offsets come from the canonical forms of `fusion.data.vocab` (``Ġ``/``▁``
spaces, ``<0xNN>`` bytes decoded): a tokenizer's text tokens spell the text, possibly with one
prepended space (SentencePiece-style ``add_dummy_prefix``), which is trimmed. Spans are in bytes, so
byte-fallback tokens of one character (``<0xC3><0xA9>`` = "é") get one byte each.

The ``prefix`` and ``offsets`` modes are vectorised searches over the byte spans; ``mined`` and
``exact`` share a DTW. Speed: the DTW is banded (Sakoe-Chiba style) around the byte-offset diagonal: target token ``a``
is only compared with teacher tokens that overlap its bytes, plus ``BAND`` tokens either side, so
cost and time are linear in the chunk length instead of quadratic; each DP row is a few vectorised
numpy operations (the left-move recurrence is a cumulative-min scan).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from fusion.data.vocab import canonical_tokens

MODES = ("prefix", "mined", "exact", "offsets")
BAND = 8  # teacher tokens compared beyond the byte overlap, each side: room for DTW detours (whitespace runs)


@dataclass
class TokenTable:
    """What alignment needs to know about one tokenizer's ids: canonical strings and byte lengths."""

    strings: list[str]
    nbytes: np.ndarray  # int64 [len(tokenizer)]

    @classmethod
    def of(cls, tokenizer) -> TokenTable:
        strings, _, _ = canonical_tokens(tokenizer)
        nbytes = np.array([len(s.encode("utf-8", "surrogateescape")) for s in strings], dtype=np.int64)
        return cls(strings=strings, nbytes=nbytes)


def byte_spans(text_ids: np.ndarray, table: TokenTable, text_nbytes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(starts, ends, prefix)``: each text token's byte span in the text, and how many bytes the
    tokenizer prepended (0, or 1 for a dummy-prefix space). Spans of prefix bytes are clipped to 0."""
    lengths = table.nbytes[text_ids]
    ends = np.cumsum(lengths)
    prefix = int(ends[-1]) - text_nbytes if len(ends) else 0
    prefix = prefix if 0 <= prefix <= 1 else 0  # a normalising tokenizer: offsets are approximate
    ends = ends - prefix
    starts = np.maximum(ends - lengths, 0)
    return starts, np.maximum(ends, 0), prefix


def _offsets_pairs(target: tuple, teacher: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Text-token index pairs ``(a, b)`` spanning the same bytes (empty spans, such as a dummy-prefix
    ``▁`` token, included: they match only an empty span at the same place)."""
    scale = int(max(target[1].max(initial=0), teacher[1].max(initial=0))) + 1
    t_keys = target[0] * scale + target[1]
    u_keys = teacher[0] * scale + teacher[1]  # nondecreasing: spans follow each other in the text
    at = np.searchsorted(u_keys, t_keys).clip(max=len(u_keys) - 1)
    a = np.flatnonzero(u_keys[at] == t_keys)
    return a, at[a]


def _prefix_pairs(target: tuple, teacher: tuple, inside: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text-token index pairs ``(a, b)`` that start at the same byte, so the predictions of target token
    ``a`` and teacher token ``b`` follow the same text prefix, and ``read`` = 0 bytes. Non-empty tokens
    pair with non-empty ones (their starts strictly increase: they tile the text), and an empty token,
    such as a lone dummy-prefix ``▁``, which shares its start with the next token, only with an empty one.
    ``inside``: a non-empty target token starting inside teacher token ``b`` also pairs with it, with
    ``read`` = how many of ``b``'s bytes come before the target token."""
    (ts, te), (us, ue) = target[:2], teacher[:2]
    pairs = []
    for nonempty in (True, False):
        a = np.flatnonzero((te > ts) == nonempty)
        b = np.flatnonzero((ue > us) == nonempty)
        if not (len(a) and len(b)):
            continue
        if inside and nonempty:  # the teacher token holding byte ts[a]: the last one starting at or before it
            at = np.searchsorted(us[b], ts[a], side="right") - 1
            hit = (at >= 0) & (ue[b][at.clip(min=0)] > ts[a])
        else:
            at = np.searchsorted(us[b], ts[a]).clip(max=len(b) - 1)
            hit = us[b][at] == ts[a]
        a, b = a[hit], b[at[hit]]
        pairs.append((a, b, ts[a] - us[b]))
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    a, b, read = (np.concatenate(side) for side in zip(*pairs))
    order = np.argsort(a, kind="stable")
    return a[order], b[order], read[order]


def _band(target: tuple, teacher: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per target token ``a``, the teacher window ``[lo[a], hi[a])``: overlapping tokens plus BAND."""
    (ts, te), (us, ue) = target[:2], teacher[:2]
    m = len(us)
    lo = np.searchsorted(ue, ts, side="right") - BAND  # teacher tokens ending at or before a's start
    hi = np.searchsorted(us, te, side="left") + BAND  # teacher tokens starting before a's end
    lo = np.maximum.accumulate(lo.clip(0, m - 1))
    hi = np.maximum.accumulate(hi.clip(1, m))
    lo[0], hi[-1] = 0, m
    hi = np.maximum(hi, lo + 1)
    lo[1:] = np.minimum(lo[1:], hi[:-1])  # every row reaches the previous one (diagonal or up move)
    return lo, hi


_BIG = 1e9  # cost of cells outside a band: finite, so sums stay exact integers in float64 (< 2**53)


def _dtw_pairs(items: list[tuple[list[str], list[str], tuple, tuple]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each ``(target_strings, teacher_strings, target_spans, teacher_spans)``, the one-to-one pairs
    ``(a, b)`` on the banded DTW path between the two text-token sequences.

    All items advance through their DP rows together, so each numpy call works on ``[items, band]``
    arrays and the per-call overhead is shared: this, not the arithmetic, is what bounds speed.
    """
    bands = [_band(target, teacher) for _, _, target, teacher in items]
    n_rows = [len(t) for t, _, _, _ in items]
    n, w_max = max(n_rows), max(int((hi - lo).max()) for lo, hi in bands)
    cost = np.full((len(items), n, w_max), _BIG)
    lo_all = np.zeros((len(items), n), dtype=np.int64)
    # Distances of distinct string pairs only: whitespace and common pieces repeat a lot.
    codes: dict[str, int] = {}
    keys, where = [], []
    for i, ((t_str, u_str, _, _), (lo, hi)) in enumerate(zip(items, bands)):
        t_code = np.array([codes.setdefault(x, len(codes)) for x in t_str], dtype=np.int64)
        u_code = np.array([codes.setdefault(x, len(codes)) for x in u_str], dtype=np.int64)
        width = hi - lo
        rows = np.repeat(np.arange(len(t_str)), width)
        offset = np.arange(len(rows)) - np.repeat(np.cumsum(width) - width, width)
        keys.append((t_code[rows], u_code[lo[rows] + offset]))
        where.append((np.full(len(rows), i), rows, offset))
        lo_all[i, :len(lo)], lo_all[i, len(lo):] = lo, lo[-1]
    strings = list(codes)
    pair_keys = np.concatenate([t * len(strings) + u for t, u in keys])
    unique, inverse = np.unique(pair_keys, return_inverse=True)
    distances = process.cpdist([strings[k] for k in (unique // len(strings)).tolist()],
                               [strings[k] for k in (unique % len(strings)).tolist()],
                               scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    cost[tuple(np.concatenate(parts) for parts in zip(*where))] = distances[inverse]

    # moves[i, a, t]: how cell (a, lo[a] + t) was reached: 0 diagonal, 1 up, 2 left. Ties prefer
    # diagonal, then up, then left (FuseLLM's order). The row loop is sequential, so it only does what
    # must be: everything that can is computed for all rows at once, before (run) or after (moves) it,
    # and the previous row is read by flat indices (take_along_axis costs more than the arithmetic).
    items_n, width = len(items), 2 * w_max + 1
    totals = np.full((items_n, n, width), _BIG)  # row a's cells at [1, 1 + w_max): room for shifts
    totals[:, 0, 1:1 + w_max] = np.cumsum(cost[:, 0], axis=1)
    best_in = np.empty((items_n, n, w_max))
    diag_first = np.zeros((items_n, n, w_max), dtype=bool)
    run = np.cumsum(cost, axis=2)  # D[t] = min(best_in[t], D[t-1] + c[t]) = run[t] + min_{s<=t}(best_in[s] - run[s])
    # Flat index of row a-1's cell under row a's first cell: lo[a] - lo[a-1] <= w_max by `_band`.
    up_base = (np.arange(items_n)[:, None] * n * width + (np.arange(n) - 1) * width + 1
               + np.diff(lo_all, axis=1, prepend=0)).T.copy()
    flat, columns = totals.reshape(-1), np.arange(w_max)
    gap = np.empty((items_n, w_max))
    for a in range(1, n):
        up_at = up_base[a][:, None] + columns
        up, diag = flat.take(up_at), flat.take(up_at - 1)
        np.less_equal(diag, up, out=diag_first[:, a])
        np.add(cost[:, a], np.minimum(diag, up, out=up), out=best_in[:, a])
        np.minimum.accumulate(np.subtract(best_in[:, a], run[:, a], out=gap), axis=1, out=gap)
        np.add(run[:, a], gap, out=totals[:, a, 1:1 + w_max])
    moves = np.where(totals[:, :, 1:1 + w_max] < best_in, 2, np.where(diag_first, 0, 1)).astype(np.int8)
    moves[:, 0, 0], moves[:, 0, 1:] = 0, 2  # row 0 is reached from (0, 0) by left moves only

    pairs = []
    for i, (t_str, u_str, _, _) in enumerate(items):
        lo, grid = lo_all[i].tolist(), moves[i].tobytes()  # bytes: indexing gives Python ints, fast
        path_a, path_b = [], []
        a, b = len(t_str) - 1, len(u_str) - 1
        while a or b:
            path_a.append(a)
            path_b.append(b)
            move = grid[a * w_max + b - lo[a]]
            if move == 0:
                a, b = a - 1, b - 1
            elif move == 1:
                a -= 1
            else:
                b -= 1
        path_a.append(0)
        path_b.append(0)
        pa, pb = np.array(path_a[::-1]), np.array(path_b[::-1])
        once = (np.bincount(pa)[pa] == 1) & (np.bincount(pb)[pb] == 1)
        pairs.append((pa[once], pb[once]))
    return pairs


def align_many(sequences: list[tuple[np.ndarray, np.ndarray, bool, int]], target_table: TokenTable,
               teacher_table: TokenTable, mode: str = "mined", vocab_ids: np.ndarray | None = None,
               with_read: bool = False) -> list[np.ndarray] | list[tuple[np.ndarray, np.ndarray]]:
    """`align` for many chunks at once (faster for DTW): ``sequences`` holds
    ``(target_ids, teacher_ids, ends_document, text_nbytes)`` per chunk.

    ``with_read`` (``prefix`` mode): ``(src, read)`` per chunk, where a target position whose token starts
    inside a teacher token is served by that token's prediction too, ``read[i]`` (uint16) being how many
    of its bytes the text holds before target token ``i+1`` (0 where the boundaries coincide); see
    `aligned_distribution` for what becomes of the candidates there.
    """
    if mode not in MODES:
        raise ValueError(f"alignment mode {mode!r} is not one of {MODES}")
    if mode == "mined" and vocab_ids is None:
        raise ValueError("mode='mined' needs vocab_ids, the MinED teacher -> target map")
    if with_read and mode != "prefix":
        raise ValueError("with_read is for mode='prefix'")
    results, todo = [], []
    for target_ids, teacher_ids, ends_document, text_nbytes in sequences:
        end = 1 if ends_document else 0
        t_text = np.asarray(target_ids[1:len(target_ids) - end], dtype=np.int64)
        u_text = np.asarray(teacher_ids[1:len(teacher_ids) - end], dtype=np.int64)
        src = np.full(len(target_ids) - 1, -1, dtype=np.int32)
        read = np.zeros(len(target_ids) - 1, dtype=np.uint16)
        if ends_document:  # predicting EOS after the whole text: the same prefix for both
            src[len(t_text)] = len(u_text)
        results.append((src, read))
        if len(t_text) and len(u_text):
            todo.append((src, read, t_text, u_text, byte_spans(t_text, target_table, text_nbytes),
                         byte_spans(u_text, teacher_table, text_nbytes)))
    if mode == "prefix":
        pairs = [_prefix_pairs(target, teacher, inside=with_read) for *_, target, teacher in todo]
    elif mode == "offsets":
        pairs = [_offsets_pairs(target, teacher) for *_, target, teacher in todo]
    elif todo:
        strings = [(_spelled(t_text, target_table, target[2]), _spelled(u_text, teacher_table, teacher[2]))
                   for _, _, t_text, u_text, target, teacher in todo]
        pairs = _dtw_pairs([(*s, t[4], t[5]) for s, t in zip(strings, todo)])
        for n, ((a, b), (t_str, u_str), item) in enumerate(zip(pairs, strings, todo)):
            _, _, t_text, u_text, target, teacher = item
            accept = np.array([t_str[i] == u_str[j] for i, j in zip(a.tolist(), b.tolist())], dtype=bool)
            if mode == "mined":
                accept |= vocab_ids[u_text[b]] == t_text[a]
            accept &= target[0][a] == teacher[0][b]  # the same prefix: both tokens start at the same byte
            pairs[n] = (a[accept], b[accept])
    for (src, read, *_), (a, b, *rest) in zip(todo, pairs):
        src[a] = b  # target text token a is sequence token a+1, predicted at position a; teacher likewise
        if rest:
            read[a] = np.minimum(rest[0], np.iinfo(np.uint16).max)
    return results if with_read else [src for src, _ in results]


def align(target_ids: np.ndarray, teacher_ids: np.ndarray, ends_document: bool, text_nbytes: int,
          target_table: TokenTable, teacher_table: TokenTable, mode: str = "mined",
          vocab_ids: np.ndarray | None = None) -> np.ndarray:
    """``src`` (int32, ``len(target_ids) - 1``): the teacher position serving each target position, or -1.

    ``target_ids`` / ``teacher_ids`` are whole sequences in the layout of the module docstring;
    ``text_nbytes`` is the chunk text's UTF-8 length; ``vocab_ids`` (teacher id -> target id, the
    MinED map) is needed by ``mode="mined"``.
    """
    return align_many([(target_ids, teacher_ids, ends_document, text_nbytes)], target_table, teacher_table,
                      mode, vocab_ids)[0]


def _spelled(text_ids: np.ndarray, table: TokenTable, prefix: int) -> list[str]:
    """Token strings as they spell the text: the first loses the prepended dummy-prefix space."""
    strings = [table.strings[i] for i in text_ids.tolist()]
    if prefix and strings and strings[0].startswith(" "):
        strings[0] = strings[0][1:]
    return strings


def gold_one_hot(gold: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [n, k], logprobs [n, k])``: a one-hot on each gold token, the fallback where no teacher serves."""
    ids = np.repeat(np.asarray(gold, dtype=np.int64)[:, None], k, axis=1)
    logprobs = np.full(ids.shape, -np.inf, dtype=np.float32)
    logprobs[:, 0] = 0.0
    return ids, logprobs


def gold_probability(ids: np.ndarray, logprobs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Per position, the probability a sparse distribution (``ids / logprobs [n, k]``) gives the gold token
    ``gold [n]``: the sum over its entries with that id, 0 when it is not a candidate."""
    return np.where(ids == gold[:, None], np.exp(logprobs), 0.0).sum(axis=1)


def aligned_distribution(src: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray, vocab_ids: np.ndarray,
                         target_ids: np.ndarray, keep: np.ndarray | None = None, read: np.ndarray | None = None,
                         teacher_tokens: np.ndarray | None = None,
                         continuations: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher's next-token distribution at every target position, in target ids.

    Args:
        src: ``[T-1]`` from `align`.
        topk_ids, topk_logprobs: the teacher's ``[U-1, k]`` top-k ids and log-probs (its positions).
        vocab_ids: teacher id -> target id.
        target_ids: ``[T]`` the target sequence (gold tokens for the fallback).
        keep: optional bool per teacher id; candidates whose entry is False are dropped (``exact``
            mode keeps only exact vocabulary matches).
        read, teacher_tokens, continuations: ``prefix`` mode's positions inside a teacher token
            (`align_many` with ``with_read``): ``read[i]`` bytes of the teacher's next token, the token
            ``teacher_tokens[src[i] + 1]``, are already in the text. Only candidates that start with
            those bytes and go on past them fit; each becomes the target token the target's tokenizer
            emits first for its remaining bytes, the others are dropped. ``continuations`` is
            ``(cont_offsets, cont_first, cont_read)`` of `fusion.data.vocab.VocabMap`. With
            ``teacher_tokens`` (``prefix`` mode), a candidate equal to the teacher's own next token is
            mapped to the target's next token.

    Returns:
        ``(ids [T-1, k] int64, logprobs [T-1, k] float32, fallback [T-1] bool)``. Teacher candidates
        that map to the same target id pool their probability (on the first of them); dropped and
        pooled entries get log-prob ``-inf``. Fallback rows (no aligned teacher position, or every
        candidate dropped) are a one-hot (log-prob 0) on target token ``i+1``.
    """
    k = topk_ids.shape[1]
    fallback = src < 0
    rows = src.clip(min=0)
    teacher_ids = topk_ids[rows].astype(np.int64)
    ids = vocab_ids[teacher_ids]
    logprobs = topk_logprobs[rows].astype(np.float32)
    if keep is not None:
        logprobs = np.where(keep[teacher_ids], logprobs, -np.inf).astype(np.float32)
    if read is not None:
        inside = np.flatnonzero((read > 0) & ~fallback)
        if inside.size:
            offsets, cont_first, cont_read = continuations
            n_read = read[inside].astype(np.int64)
            actual = np.asarray(teacher_tokens, dtype=np.int64)[src[inside] + 1]
            candidates = teacher_ids[inside]  # [n, k]
            entries = offsets[candidates + 1] - offsets[candidates]  # a token of b bytes has b - 1
            at = offsets[candidates] + np.minimum(n_read[:, None], entries.clip(min=1)) - 1
            actual_at = offsets[actual] + n_read - 1
            fits = (n_read[:, None] <= entries) & ((offsets[actual + 1] - offsets[actual]) >= n_read)[:, None]
            if len(cont_read):
                at, actual_at = at.clip(0, len(cont_read) - 1), actual_at.clip(0, len(cont_read) - 1)
                fits &= (cont_read[at] == cont_read[actual_at][:, None]) & (cont_first[at] >= 0)
                ids[inside] = np.where(fits, cont_first[at], ids[inside])
            inside_lp = logprobs[inside]
            # Condition on the bytes read: where the teacher's own token is among the fitting candidates, they are
            # scaled to the top-k's mass (P(c | read) = P(c) · Σ top-k / Σ fits: the tail is assumed to hold as
            # large a share of fitting tokens as the top-k). Elsewhere they keep their own probabilities.
            known = (fits & (candidates == actual[:, None])).any(axis=1)
            with np.errstate(divide="ignore"):
                scale = (np.log(np.exp(inside_lp).sum(axis=1))
                         - np.log(np.where(fits, np.exp(inside_lp), 0.0).sum(axis=1)))
            inside_lp = inside_lp + np.where(known, scale, 0.0)[:, None]
            logprobs[inside] = np.where(fits, inside_lp, -np.inf)
    gold = np.asarray(target_ids[1:], dtype=np.int64)
    if teacher_tokens is not None:  # the teacher's own next token, where it is a candidate, is the target's
        tokens = np.asarray(teacher_tokens, dtype=np.int64)
        served = np.flatnonzero(~fallback & (src + 1 < len(tokens)))
        truth = teacher_ids[served] == tokens[src[served] + 1][:, None]
        ids[served] = np.where(truth, gold[served, None], ids[served])
    fallback |= np.isneginf(logprobs).all(axis=1)  # nothing left: a softmax over it would be NaN
    # Pool duplicates: entry j adds its probability to the first entry with the same id.
    first = (ids[:, :, None] == ids[:, None, :]).argmax(axis=2)  # [T-1, k]: index of the first equal id
    if (first != np.arange(k)).any():
        probs = np.zeros_like(logprobs)
        np.add.at(probs, (np.arange(len(ids))[:, None].repeat(k, 1), first), np.exp(logprobs))
        with np.errstate(divide="ignore"):
            logprobs = np.log(probs)
    ids[fallback], logprobs[fallback] = gold_one_hot(gold[fallback], k)
    return ids, logprobs, fallback
