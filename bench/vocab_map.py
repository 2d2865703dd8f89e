"""Benchmark: the MinED vocabulary map between a 50 k byte-level BPE teacher and a 32 k Metaspace target.

Both tokenizers are trained here, offline, on the embedded corpus's train split (~6 MB). If one of them
falls short of its size, the corpus is augmented deterministically (upper-cased and character-reversed
copies of every text) and the tokenizer retrained; the JSON lines say whether that happened.

Ours: `fusion.data.vocab.build_vocab_map` (no cache): canonical token strings, exact matches by dict,
the rest by ``rapidfuzz.process.cdist`` on all cores.

Baseline, measured in the same run: the original FuseLLM method on the same cores,
`fusion.reference.mined_vocab_map`: the same canonical strings, the exact-match shortcut by dict, and
for each non-exact teacher token a Python loop of compiled per-pair Levenshtein calls
(``rapidfuzz.distance.Levenshtein.distance``, where FuseLLM called the C ``editdistance``) over every
ordinary target token, in a ``multiprocessing.Pool`` of ``os.cpu_count()`` workers. The full baseline
would take minutes, so it runs on a fixed random sample of ``BASELINE_SAMPLE`` of the non-exact teacher
tokens and its per-token time is scaled by (non-exact tokens / sample). Added once, unscaled: a call's
fixed cost (building the dict, starting and stopping the Pool; ~40 ms, timed as a call with no tokens)
and the time to build the canonical strings, which ours pays too. The original is slower still (as
copied in FATE-LLM's ``vocab_mapping.py``): it sends the whole target list with every task and tests
exact matches with ``in`` on a list, so the baseline is, if anything, flattered.

Figures (``ratio = baseline / value``, > 1 means we are faster):

- ``vocab_map_cpu_seconds_<target>k_<teacher>k``: CPU seconds, the figure to compare. Ours is
  ``time.process_time()`` of this process, which counts all its threads (rapidfuzz's ``workers=-1``
  threads included); the baseline's is this process's plus its Pool workers' (forked children, reaped
  when the Pool closes: ``getrusage(RUSAGE_CHILDREN)``).
- ``vocab_map_seconds_<target>k_<teacher>k``: wall-clock seconds, both on all ``os.cpu_count()`` cores.

``agreement``: on the sample, the fraction of teacher tokens for which the baseline's target token and
ours are at the same edit distance (a tie counts as agreement); ``same_id``, the fraction with the same
target id (below 1.0: the original breaks ties to the lowest id, which on a SentencePiece target is a
``<0xNN>`` byte token; ours prefers the target's own first token, then an ordinary piece; see
`fusion.data.vocab`).
"""

from __future__ import annotations

import os
import random
import resource
import time

from rapidfuzz.distance import Levenshtein
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fusion.data.corpus import embedded_corpus
from fusion.data.vocab import build_vocab_map, canonical_tokens
from fusion.reference import mined_vocab_map

TARGET_SIZE = 32_000
TEACHER_SIZE = 50_000
BASELINE_SAMPLE = 1000  # non-exact teacher tokens, ~5 ms each per core against 32 k: ~2.5 s on 2 cores


def _metaspace_bpe(texts: list[str], size: int) -> PreTrainedTokenizerFast:
    """Llama style: ``▁`` words, byte fallback (``<0x00>``..``<0xFF>`` at ids 3..258)."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  limit_alphabet=200, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _byte_level_bpe(texts: list[str], size: int) -> PreTrainedTokenizerFast:
    """GPT-2 style: bytes as printable chars, ``Ġ`` for space."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot)


def _train(make, texts: list[str], size: int):
    """(tokenizer, augmented): retrain on the augmented corpus if the plain one yields too few tokens."""
    tok = make(texts, size)
    if len(tok) >= size:
        return tok, False
    augmented = texts + [t.upper() for t in texts] + [t[::-1] for t in texts]
    return make(augmented, size), True


def _cost(fn):
    """``(fn(), wall seconds, CPU seconds)``; CPU = this process's, all threads (``time.process_time``),
    plus that of the child processes reaped meanwhile (``RUSAGE_CHILDREN``: the Pool's forked workers)."""
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += children1.ru_utime - children0.ru_utime + children1.ru_stime - children0.ru_stime
    return out, wall, cpu


def run() -> list[dict]:
    texts = [d["text"] for d in embedded_corpus("train")]
    t0 = time.perf_counter()
    target, target_aug = _train(_metaspace_bpe, texts, TARGET_SIZE)
    teacher, teacher_aug = _train(_byte_level_bpe, texts, TEACHER_SIZE)
    train_s = time.perf_counter() - t0

    vmap, ours_wall, ours_cpu = _cost(lambda: build_vocab_map(teacher, target, len(teacher), cache_dir=None))

    # The baseline's inputs: the same canonical strings (timed, and added to its cost once, since ours
    # builds them too), the target's ordinary tokens as the candidates, as ours.
    (t_strings, g_strings, g_special), canon_wall, canon_cpu = _cost(
        lambda: (canonical_tokens(teacher)[0], *canonical_tokens(target)[:2]))
    candidates = [j for j in range(len(g_strings)) if not g_special[j]]
    choices = [g_strings[j] for j in candidates]
    non_exact = [i for i in range(len(t_strings)) if not vmap.exact[i]]
    sample = random.Random(0).sample(non_exact, min(BASELINE_SAMPLE, len(non_exact)))

    # A call costs a fixed ~40 ms (the dict, the Pool's start and stop): paid once, not per token.
    _, fixed_wall, fixed_cpu = _cost(lambda: mined_vocab_map([], choices))
    chosen, sample_wall, sample_cpu = _cost(lambda: mined_vocab_map([t_strings[i] for i in sample], choices))
    scale = len(non_exact) / len(sample)
    base_wall = canon_wall + fixed_wall + (sample_wall - fixed_wall) * scale
    base_cpu = canon_cpu + fixed_cpu + (sample_cpu - fixed_cpu) * scale

    # Agreement, ties allowed: the baseline's choice is as near to the teacher token as ours.
    agree = sum(Levenshtein.distance(t_strings[i], g_strings[candidates[j]]) == vmap.distance[i]
                for i, j in zip(sample, chosen))
    same_id = sum(candidates[j] == vmap.ids[i] for i, j in zip(sample, chosen))

    stats = vmap.stats
    size = f"{len(target) // 1000}k_{len(teacher) // 1000}k"
    common = {
        "cores": os.cpu_count(), "target_tokens": len(target), "teacher_tokens": len(teacher),
        "augmented_corpus": {"target": target_aug, "teacher": teacher_aug},
        "exact": stats["exact"], "mined": stats["mined"], "mean_distance": round(stats["mean_distance"], 3),
        "baseline_sample": len(sample), "agreement": round(agree / len(sample), 4),
        "same_id": round(same_id / len(sample), 4),
        "tokenizer_training_s": round(train_s, 1),
    }
    return [
        {"bench": "vocab_map", "metric": f"vocab_map_cpu_seconds_{size}", "value": round(ours_cpu, 3),
         "unit": "s", "baseline": round(base_cpu, 1), "ratio": round(base_cpu / ours_cpu, 1), **common},
        {"bench": "vocab_map", "metric": f"vocab_map_seconds_{size}", "value": round(ours_wall, 3),
         "unit": "s", "baseline": round(base_wall, 1), "ratio": round(base_wall / ours_wall, 1), **common},
    ]
