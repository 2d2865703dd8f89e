"""Benchmark: the MinED vocabulary map between a 50 k byte-level BPE teacher and a 32 k Metaspace target.

Both tokenizers are trained here, offline, on the embedded corpus's train split (~6 MB). If one of them
falls short of its size, the corpus is augmented deterministically (upper-cased and character-reversed
copies of every text) and the tokenizer retrained; the JSON line says whether that happened.

Baseline: the straightforward MinED, a pure-Python Levenshtein of each teacher token against every
target token, timed on a fixed random sample of teacher tokens and scaled to the whole teacher vocab.
"""

from __future__ import annotations

import random
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fusion.data.corpus import embedded_corpus
from fusion.data.vocab import build_vocab_map, canonical_tokens
from fusion.reference import levenshtein

TARGET_SIZE = 32_000
TEACHER_SIZE = 50_000
BASELINE_SAMPLE = 20


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


def run() -> list[dict]:
    texts = [d["text"] for d in embedded_corpus("train")]
    t0 = time.perf_counter()
    target, target_aug = _train(_metaspace_bpe, texts, TARGET_SIZE)
    teacher, teacher_aug = _train(_byte_level_bpe, texts, TEACHER_SIZE)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    vmap = build_vocab_map(teacher, target, len(teacher), cache_dir=None)
    ours = time.perf_counter() - t0

    # Baseline: pure-Python MinED for a sample of teacher tokens against the whole target vocab.
    t_strings, _, _ = canonical_tokens(teacher)
    g_strings, _, _ = canonical_tokens(target)
    sample = random.Random(0).sample(range(len(t_strings)), BASELINE_SAMPLE)
    t0 = time.perf_counter()
    for i in sample:
        distances = [levenshtein(t_strings[i], g) for g in g_strings]
        min(range(len(distances)), key=distances.__getitem__)
    baseline = (time.perf_counter() - t0) / BASELINE_SAMPLE * len(t_strings)

    stats = vmap.stats
    return [{
        "bench": "vocab_map", "metric": f"vocab_map_seconds_{len(target) // 1000}k_{len(teacher) // 1000}k",
        "value": round(ours, 3), "unit": "s", "baseline": round(baseline, 1), "ratio": round(baseline / ours, 1),
        "target_tokens": len(target), "teacher_tokens": len(teacher),
        "augmented_corpus": {"target": target_aug, "teacher": teacher_aug},
        "exact": stats["exact"], "mined": stats["mined"], "mean_distance": round(stats["mean_distance"], 3),
        "baseline_sample": BASELINE_SAMPLE, "tokenizer_training_s": round(train_s, 1),
    }]
