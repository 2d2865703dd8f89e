"""Benchmark: token alignment (`fusion.data.alignment.align_many`) on 2,048-token chunks, one core.

Tokenizers are the full tiny zoo's (`fusion.zoo`, built or reused in ``~/.cache/fusion/zoo``): the
target (SentencePiece-style BPE, 1,024 tokens) against both teachers, ``gpt2-code`` (byte-level BPE,
2,048) and ``neox-prose`` (SentencePiece-style Unigram, 1,500). The chunks are the pieces of `make_rows` of a fixed
shuffle of the embedded corpus's train documents of each domain at ``block_size=2048``; ``CHUNKS / 2``
nearly full ones (at least ``FULL`` target tokens) per domain, spread over the documents, are aligned
with each teacher in one ``align_many`` call, as `fusion.data.align_shards` does (64 chunks per call),
and for ``mined`` also one chunk per call.
Everything runs on one core: the DTW's Levenshtein distances use rapidfuzz with ``workers=1``, and the
rest is single-threaded numpy.

Figures (throughputs in target tokens per second, counted as the target sequences' lengths):

- ``align_<mode>_tokens_per_s``: both teachers together (total target tokens aligned / total time),
  best of ``REPEATS`` timings per teacher; also one figure per teacher; ``align_mined_tokens_per_s_single``
  the same with one chunk per ``align_many`` call;
- ``align_fallback`` (with ``mode``, ``teacher`` and ``domain``: ``code``, ``prose`` or ``all``): the
  fraction of target positions that train on a one-hot on the gold token instead of the teacher's
  distribution, exactly as `fusion.data.fused` decides it from the teacher model's own top-k (the
  embedded default's ``representations.top_k``, from ``recipes/fusellm.yaml``): no
  aligned teacher prediction, or every candidate dropped (``exact``: no exact vocabulary match;
  ``prefix`` inside a teacher token: no candidate fits the text). On ``FALLBACK_CHUNKS`` validation
  chunks of 256 target tokens per domain, the embedded default's (a chunk a teacher spells in more
  than the 512 positions the zoo's models read is left out, and ``chunks`` says how many count);
- ``align_gold_logprob`` (same keys): what those served positions teach: the mean over them of
  log max(p(gold), 1e-4), p the aligned candidates' own probability of the target's next token (0 when it
  is not among them), beside ``initial_target`` and ``oracle``, the same for those two models' own top-k
  at the same positions (the target's tokenizer: no alignment). A source that scores below the initial
  target there teaches the target less about its next token than it already knows;
- ``align_gold_logprob_inside`` (``teacher``, ``domain``): the same, at the positions ``prefix`` serves
  from inside a teacher token (``share``: their fraction of all positions), where the candidates are
  conditioned on the bytes read (`fusion.data.alignment`);
- ``align_prefix_inside``: the fraction of target positions that ``prefix`` serves from inside a
  teacher token (the 2,048-token chunks);
- ``align_mined_pairs_agreement``: on the baseline's chunks, the one-to-one DTW pairs of our banded DTW
  against the reference's full DTW, as |ours ∩ reference| / |ours ∪ reference| (1.0 = the same pairs).

Baseline, measured in the same run: a straightforward DTW like FuseLLM's, a full O(n·m) matrix with
the Levenshtein distance of every (target token, teacher token) string pair as the cell cost
(``rapidfuzz.distance.Levenshtein.distance``, one call per cell, where FuseLLM called the C
``editdistance`` package), Python loops for the DP and for the backtrack (ties prefer diagonal, then
up, then left), then the same one-to-one filter and MinED acceptance. It takes seconds per chunk, so it
is timed on ``BASELINE_CHUNKS`` of the same chunks with the ``gpt2-code`` teacher. It keeps the matrix
in Python lists, a little faster than FuseLLM's per-cell indexing of a numpy matrix: the baseline is,
if anything, flattered.

Ratios: for throughputs ``ratio = value / baseline`` (so ratio > 1 means we are faster); ``baseline``
is the reference's target tokens/s.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from fusion.data.alignment import (
    TokenTable,
    _dtw_pairs,
    _spelled,
    align_many,
    aligned_distribution,
    byte_spans,
    gold_probability,
)
from fusion.data.chunks import make_rows, sequence_ids
from fusion.data.corpus import embedded_corpus
from fusion.data.text import load_tokenizer
from fusion.data.vocab import build_vocab_map
from fusion.recipe import load_recipe
from fusion.reference import dtw_path, one_to_one
from fusion.zoo import resolve_model

BLOCK = 2048
CHUNKS = 64  # one align_many call, as align_shards batches them; half of them from each domain
FULL = 1900  # target tokens a chunk needs to count as full-ish
DOCUMENTS = 160  # shuffled train documents chunked (~1.5 MB of text: a few hundred full chunks)
TEACHERS = ("gpt2-code", "neox-prose")
MODES = ("prefix", "mined", "exact", "offsets")
DOMAINS = ("code", "prose")
FALLBACK_CHUNKS, FALLBACK_BLOCK = 48, 256  # per domain; the embedded default's chunk size
TOP_K = load_recipe("fusellm.yaml").representations.top_k
REPEATS = 3
BASELINE_TEACHER = "gpt2-code"
BASELINE_CHUNKS = 2


def _chunks(target_tok, domain: str, count: int, split: str = "train", block: int = BLOCK) -> list[tuple[str, bool]]:
    """``count`` full-ish chunks of one domain, evenly spread over those of ``DOCUMENTS`` shuffled documents."""
    docs = embedded_corpus(split, (domain,))
    order = list(range(len(docs)))
    random.Random(0).shuffle(order)
    rows = make_rows([docs[i]["text"] for i in order[:DOCUMENTS]], target_tok, block_size=block)
    chunks = [(text, ends) for row in rows for text, _, ends in row]
    lengths = [len(s) for s in sequence_ids(target_tok, [c[0] for c in chunks], [c[1] for c in chunks])]
    full = [c for c, n in zip(chunks, lengths) if n >= block * FULL // BLOCK]
    if len(full) < count:
        raise RuntimeError(f"only {len(full)} full-ish {domain} chunks of {block} target tokens; raise DOCUMENTS")
    step = len(full) / count
    return [full[int(i * step)] for i in range(count)]


def _reference_align(target_ids, teacher_ids, ends_document, nbytes, tt: TokenTable, ut: TokenTable,
                     vocab_ids: np.ndarray) -> tuple[np.ndarray, set]:
    """``(src, one-to-one pairs)`` with the reference DTW, in `align`'s layout and MinED acceptance."""
    end = 1 if ends_document else 0
    t_text, u_text = target_ids[1:len(target_ids) - end], teacher_ids[1:len(teacher_ids) - end]
    a_str = _spelled(t_text, tt, byte_spans(t_text, tt, nbytes)[2])
    b_str = _spelled(u_text, ut, byte_spans(u_text, ut, nbytes)[2])
    pairs = one_to_one(dtw_path(a_str, b_str))
    src = np.full(len(target_ids) - 1, -1, dtype=np.int32)
    if ends_document:
        src[len(t_text)] = len(u_text)
    for i, j in pairs:
        if a_str[i] == b_str[j] or vocab_ids[u_text[j]] == t_text[i]:
            src[i] = j
    return src, set(pairs)


def _banded_pairs(target_ids, teacher_ids, ends_document, nbytes, tt: TokenTable, ut: TokenTable) -> set:
    end = 1 if ends_document else 0
    t_text, u_text = target_ids[1:len(target_ids) - end], teacher_ids[1:len(teacher_ids) - end]
    ts, us = byte_spans(t_text, tt, nbytes), byte_spans(u_text, ut, nbytes)
    ((a, b),) = _dtw_pairs([(_spelled(t_text, tt, ts[2]), _spelled(u_text, ut, us[2]), ts, us)])
    return set(zip(a.tolist(), b.tolist()))


def _figure(metric: str, value: float, unit: str, **extra) -> dict:
    return {"bench": "alignment", "metric": metric, "value": value, "unit": unit, **extra}


def run() -> list[dict]:
    target_tok = load_tokenizer(resolve_model("zoo:target", "full", None))
    tt = TokenTable.of(target_tok)
    chunks = [c for d in DOMAINS for c in _chunks(target_tok, d, CHUNKS // len(DOMAINS))]
    texts, ends = [c[0] for c in chunks], [c[1] for c in chunks]
    nbytes = [len(t.encode()) for t in texts]
    target_seqs = [np.array(s) for s in sequence_ids(target_tok, texts, ends)]
    target_tokens = sum(len(s) for s in target_seqs)

    figures, seconds, setups, inside = [], {m: {} for m in MODES + ("mined_single",)}, {}, {}
    for name in TEACHERS:
        teacher_tok = load_tokenizer(resolve_model(f"zoo:{name}", "full", None))
        ut = TokenTable.of(teacher_tok)
        vocab_ids = build_vocab_map(teacher_tok, target_tok).ids
        teacher_seqs = [np.array(s) for s in sequence_ids(teacher_tok, texts, ends)]
        sequences = list(zip(target_seqs, teacher_seqs, ends, nbytes))
        setups[name] = (ut, vocab_ids, sequences)
        for mode in MODES:
            with_read = mode == "prefix"  # as the alignment stage runs it
            align_many(sequences[:2], tt, ut, mode, vocab_ids, with_read=with_read)  # warm-up
            best = float("inf")
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                srcs = align_many(sequences, tt, ut, mode, vocab_ids, with_read=with_read)
                best = min(best, time.perf_counter() - t0)
            seconds[mode][name] = best
            if with_read:
                inside[name] = float(np.mean(np.concatenate([read for _, read in srcs]) > 0))
        best = float("inf")
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for seq in sequences:
                align_many([seq], tt, ut, "mined", vocab_ids)
            best = min(best, time.perf_counter() - t0)
        seconds["mined_single"][name] = best

    # Baseline: the FuseLLM-style full DTW on the first chunks with one teacher.
    ut, vocab_ids, sequences = setups[BASELINE_TEACHER]
    t0 = time.perf_counter()
    reference = [_reference_align(*seq, tt, ut, vocab_ids) for seq in sequences[:BASELINE_CHUNKS]]
    baseline_s = time.perf_counter() - t0
    baseline = sum(len(seq[0]) for seq in sequences[:BASELINE_CHUNKS]) / baseline_s
    ours = align_many(sequences[:BASELINE_CHUNKS], tt, ut, "mined", vocab_ids)
    same_src = all(np.array_equal(a, b) for a, (b, _) in zip(ours, reference))
    inter = union = 0
    for seq, (_, ref_pairs) in zip(sequences[:BASELINE_CHUNKS], reference):
        banded = _banded_pairs(*seq, tt, ut)
        inter, union = inter + len(banded & ref_pairs), union + len(banded | ref_pairs)

    common = {"chunks": CHUNKS, "block_size": BLOCK, "target_tokens_per_teacher": target_tokens}
    for mode in MODES + ("mined_single",):
        value = len(TEACHERS) * target_tokens / sum(seconds[mode].values())
        extra = {}
        if mode == "mined":
            extra = {"baseline": round(baseline, 1), "ratio": round(value / baseline, 1),
                     "baseline_chunks": BASELINE_CHUNKS, "baseline_teacher": BASELINE_TEACHER}
        metric = "align_mined_tokens_per_s_single" if mode == "mined_single" else f"align_{mode}_tokens_per_s"
        figures.append(_figure(metric, round(value), "target tokens/s", teachers=list(TEACHERS),
                               chunks_per_call=1 if mode == "mined_single" else CHUNKS, **extra, **common))
        for name in TEACHERS:
            figures.append(_figure(f"{metric}_{name}", round(target_tokens / seconds[mode][name]),
                                   "target tokens/s", **common))
    figures.append(_figure("align_mined_pairs_agreement", round(inter / max(union, 1), 4), "fraction",
                           chunks=BASELINE_CHUNKS, teacher=BASELINE_TEACHER, pairs_in_either=union,
                           same_src=same_src))
    for name, share in inside.items():
        figures.append(_figure("align_prefix_inside", round(share, 4), "fraction of target positions",
                               teacher=name, chunks=CHUNKS))
    rates, gold = _fallback_rates(target_tok, tt)
    for (mode, name, domain), (rate, chunks, positions) in rates.items():
        figures.append(_figure("align_fallback", round(rate, 4), "fraction of target positions", mode=mode,
                               teacher=name, domain=domain, chunks=chunks, positions=positions,
                               block_size=FALLBACK_BLOCK, top_k=TOP_K))
    for (mode, name, domain), (teacher, initial, oracle, *share) in gold.items():
        extra = {"share": round(share[0], 4)} if share else {"mode": mode}
        figures.append(_figure("align_gold_logprob_inside" if mode == "inside" else "align_gold_logprob",
                               round(teacher, 3), "mean log p(gold), floored at 1e-4", teacher=name, domain=domain,
                               initial_target=round(initial, 3), oracle=round(oracle, 3), top_k=TOP_K, **extra))
    return figures


@torch.inference_mode()
def _top_k(model, sequences: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The teacher's top-k ids and float32 log-probs at every position but the last, per sequence."""
    out = []
    for ids in sequences:
        logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0, :-1].float()
        top = torch.log_softmax(logits, -1).topk(TOP_K, dim=-1)
        out.append((top.indices.numpy(), top.values.numpy()))
    return out


def _reference_gold(path: str, chunks: dict[str, list[np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """A model with the target's tokenizer: its own top-k's probability of each gold token, per chunk."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return {d: [gold_probability(*top, seq[1:]) for top, seq in zip(_top_k(model, seqs), seqs)]
            for d, seqs in chunks.items()}


def _fallback_rates(target_tok, tt: TokenTable) -> tuple[dict, dict]:
    """Per (mode, teacher, domain): the share of target positions that train on the gold one-hot, as
    `fusion.data.fused` builds them from the teacher model's own top-k (``prefix`` positions inside a
    teacher token where no candidate fits count): ``FALLBACK_CHUNKS`` validation chunks of each domain.
    And the quality of what the served positions get: the mean of log max(p(gold), 1e-4) over them, p the
    aligned candidates' own probabilities (as ``fusion.tail: bucket`` trains them), beside the same for
    the initial target's and the oracle's own top-k at those positions (no alignment: the target's tokens)."""
    chunks = {d: _chunks(target_tok, d, FALLBACK_CHUNKS, split="validation", block=FALLBACK_BLOCK) for d in DOMAINS}
    target_chunks = {d: [np.array(s) for s in sequence_ids(target_tok, [c[0] for c in pieces], [c[1] for c in pieces])]
                     for d, pieces in chunks.items()}
    references = {name: _reference_gold(resolve_model(f"zoo:{name}", "full", None), target_chunks)
                  for name in ("target", "oracle")}
    rates, gold = {}, {}
    for name in TEACHERS:
        path = resolve_model(f"zoo:{name}", "full", None)
        teacher_tok, model = load_tokenizer(path), AutoModelForCausalLM.from_pretrained(path).eval()
        ut = TokenTable.of(teacher_tok)
        vmap = build_vocab_map(teacher_tok, target_tok)
        fell = {mode: {d: [] for d in DOMAINS} for mode in MODES}
        logp = {mode: {d: [] for d in DOMAINS} for mode in MODES}  # rows: (teacher, initial target, oracle)
        inside = {d: [] for d in DOMAINS}  # prefix: the same at the positions inside a teacher token
        for domain, pieces in chunks.items():
            texts, ends = [c[0] for c in pieces], [c[1] for c in pieces]
            teacher_seqs = map(np.array, sequence_ids(teacher_tok, texts, ends))
            sequences, kept = [], []
            for i, seq in enumerate(zip(target_chunks[domain], teacher_seqs, ends, [len(t.encode()) for t in texts])):
                if len(seq[1]) <= model.config.max_position_embeddings:
                    sequences.append(seq)
                    kept.append(i)
            tops = _top_k(model, [u for _, u, _, _ in sequences])
            for mode in MODES:
                prefix = mode == "prefix"
                aligned = align_many(sequences, tt, ut, mode, vmap.ids, with_read=prefix)
                for (target, teacher, _, _), (ids, logprobs), item, i in zip(sequences, tops, aligned, kept):
                    src, extra = item, {}
                    if prefix:
                        src, read = item
                        extra = {"read": read, "teacher_tokens": teacher,
                                 "continuations": (vmap.cont_offsets, vmap.cont_first, vmap.cont_read)}
                    a_ids, a_logprobs, fallback = aligned_distribution(
                        src, ids, logprobs, vmap.first if prefix else vmap.ids, target,
                        keep=vmap.exact if mode == "exact" else None, **extra)
                    fell[mode][domain].append(fallback)
                    served = ~fallback
                    p = [gold_probability(a_ids, a_logprobs, target[1:])[served],
                         references["target"][domain][i][served], references["oracle"][domain][i][served]]
                    logp[mode][domain].append(np.log(np.maximum(np.stack(p), 1e-4)))
                    if prefix:
                        inside[domain].append(logp[mode][domain][-1][:, (read > 0)[served]])
        for mode, by_domain in fell.items():
            for domain, parts in [*by_domain.items(), ("all", sum(by_domain.values(), []))]:
                joined = np.concatenate(parts)
                rates[(mode, name, domain)] = (float(joined.mean()), len(parts), len(joined))
                values = np.concatenate(logp[mode][domain] if domain != "all" else sum(logp[mode].values(), []), axis=1)
                gold[(mode, name, domain)] = values.mean(axis=1).tolist()
        for domain, parts in [*inside.items(), ("all", sum(inside.values(), []))]:
            values = np.concatenate(parts, axis=1)
            positions = rates[("prefix", name, domain)][2]
            gold[("inside", name, domain)] = [*values.mean(axis=1).tolist(), values.shape[1] / positions]
    return rates, gold
