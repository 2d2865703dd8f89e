"""The embedded model zoo: three tiny causal LMs with three different tokenizers, built offline.

Knowledge fusion needs a *target* model and *source* models that know things the target does not,
with tokenizers that disagree. Real checkpoints are gigabytes and need a download, so the zoo trains
its own in about two minutes on two CPU cores from the embedded corpus (`fusion.data.corpus`):

- ``target``: a Llama with a SentencePiece-style BPE tokenizer (``▁`` marks spaces, ``<0x..>`` byte
  fallback, ``<s>`` prepended), trained on both domains but on purpose for few steps: it is the
  weakest model, the one that continual training and fusion should improve.
- ``gpt2-code``: a GPT-2 with a byte-level BPE tokenizer (``Ġ`` marks spaces), trained mostly on
  ``code``: clearly better than the target there.
- ``neox-prose``: a GPT-NeoX with a SentencePiece-style Unigram tokenizer with byte fallback,
  trained mostly on ``prose``. Its config's ``vocab_size`` is padded to a multiple of 64 above
  ``len(tokenizer)``, as real NeoX / Qwen checkpoints do, so downstream code must not assume the
  two are equal.

Each model is a standard Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer
files) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load. ``zoo.json`` next to them records
the recipe and the validation perplexity of every model on each domain.

A fourth model, ``oracle``, is built only when ``zoo:oracle`` is first asked for (`build_oracle`),
into ``<zoo>/oracle``, so that runs without it do not wait for it: the target's architecture, trained
on the same texts and 50/50 mixture for about four times the steps, with the target's tokenizer files
copied byte for byte. It beats the target on both domains, and aligning it to the target is the
identity: a teacher for checking distillation without any cross-tokenizer alignment.
``oracle/oracle.json`` records its recipe and perplexities, in the same unit as ``zoo.json``'s.

The chat models ``chat-target``, ``chat-gpt2-code`` and ``chat-neox-prose`` (`fusion.chat_zoo`: the three
base models with a chat template each, fine-tuned on the chat skills) are built the same way, all three on
the first request for any of them (`build_chat`), into ``<zoo>/chat-<CHAT_VERSION>``, with its ``chat.json``.
The reward model ``chat-reward`` (`fusion.reward_zoo`: the pivot with a scoring head, trained on the skills' answers)
is built on its first request after them (`build_reward`), into ``<zoo>/chat-<CHAT_VERSION>/reward-<N>``.

Perplexities are comparable across models although the tokenizers differ: the summed negative
log-likelihood of the validation text is divided by the number of *target* tokens of that text. For
the target that is its ordinary per-token perplexity; for a source it is the perplexity the source
would have if it used the target's tokenization.

Builds are seeded and deterministic: rebuilding on the same machine (same torch, same thread count)
gives bitwise-identical weights. Usage::

    python -m fusion.zoo                 # build (or reuse) the full zoo, print its perplexities
    python -m fusion.zoo --size small    # the tiny one that the tests use, about 10 seconds
    python -m fusion.zoo --with-oracle   # the zoo and zoo:oracle
    python -m fusion.zoo --with-chat     # the zoo and its chat models, with their accuracy per skill
    python -m fusion.zoo --with-reward   # ... and zoo:chat-reward, with its held-out pairwise accuracy
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from fusion.chat_zoo import CHAT_BASES, CHAT_FOLDER, CHAT_JSON, CHAT_MODELS, build_chat_models, format_table
from fusion.data.corpus import DOMAINS, corpus_fingerprint, embedded_corpus
from fusion.errors import FusionError
from fusion.reward_zoo import REWARD_FOLDER, REWARD_JSON, build_reward_model, format_reward

ZOO_VERSION = "3"  # bump whenever the recipe of a core model changes: it names the cache folder
ZOO_CORE: tuple[str, ...] = ("target", "gpt2-code", "neox-prose")  # built together by build_zoo, in zoo.json
ZOO_EXTRAS: tuple[str, ...] = ("oracle", *CHAT_MODELS, "chat-reward")  # built on first use, into the same zoo folder
ZOO_MODELS: tuple[str, ...] = ZOO_CORE + ZOO_EXTRAS  # every valid ``zoo:NAME``
ZOO_PREFIX = "zoo:"
SEED = 1234
ZOO_JSON = "zoo.json"  # the core zoo's manifest, written last: a zoo folder without it is incomplete
ORACLE_JSON = "oracle.json"  # the same for the oracle, in its own folder
MAX_POSITIONS = 512  # every model accepts 512 positions (training blocks are shorter, see _Size)


@dataclass(frozen=True)
class _Size:
    """How big and how long: everything that differs between the full and the small zoo."""

    width: int
    layers: int
    heads: int
    block: int  # tokens per training sequence
    batch: int  # sequences per step
    lr: float  # peak learning rate; tiny models tolerate (and need) a high one
    tokenizer_chars: int  # characters each tokenizer is trained on (Unigram training is slow: ~10 s/MB)
    train_chars: int  # characters per domain packed into the training streams
    val_chars: int  # characters per domain of validation text behind zoo.json's perplexities
    vocab: dict[str, int]  # len(tokenizer) per model
    steps: dict[str, int]  # optimizer steps per model


_SIZES = {
    # ~1.1 M parameters, trained at ~10 k tokens/s on 2 cores (2 k tokens a step, 4-5 steps a second):
    # ~75 s of training and ~110 s in all. The target's 110 steps are shared by two domains, and a Llama
    # learns slower than a NeoX this early on, so each source ends ~3x better than the target on its
    # domain (perplexity 19 vs 58 on code, 78 vs 229 on prose) and no better on the other one.
    "full": _Size(
        width=128, layers=4, heads=4, block=256, batch=8, lr=3e-3,
        tokenizer_chars=600_000, train_chars=1_000_000, val_chars=100_000,
        vocab={"target": 1024, "gpt2-code": 2048, "neox-prose": 1500},
        steps={"target": 110, "gpt2-code": 135, "neox-prose": 100},
    ),
    # ~0.2 M parameters, for tests: ~8 s once the corpus is loaded, and the sources still beat the target.
    "small": _Size(
        width=64, layers=2, heads=4, block=128, batch=8, lr=5e-3,
        tokenizer_chars=150_000, train_chars=300_000, val_chars=30_000,
        vocab={"target": 512, "gpt2-code": 768, "neox-prose": 600},
        steps={"target": 20, "gpt2-code": 60, "neox-prose": 50},
    ),
}

# Architecture, tokenizer family and the share of each domain in the training batches (and in the
# tokenizer's training text). The sources see 2% of the other domain: enough to read it, badly.
_MODELS = {
    "target": {"arch": "llama", "tokenizer": "sentencepiece-bpe", "mixture": {"code": 0.5, "prose": 0.5}},
    "gpt2-code": {"arch": "gpt2", "tokenizer": "byte-level-bpe", "mixture": {"code": 0.98, "prose": 0.02}},
    "neox-prose": {"arch": "gpt_neox", "tokenizer": "sentencepiece-unigram",
                   "mixture": {"code": 0.02, "prose": 0.98}},
}

# The oracle: the target's architecture, tokenizer (its files, copied byte for byte), training texts and
# 50/50 mixture, trained about four times as long, so that it beats the target on both domains: on the
# full zoo 0.46x its perplexity on code (26 vs 58) and 0.45x on prose (103 vs 229). Width 192 would give
# 24 and 91 for twice the build time. Its learning rate and blocks are the zoo's `_Size`'s.
_ORACLE = {
    "full": {"width": 128, "layers": 4, "heads": 4, "steps": 400},
    "small": {"width": 64, "layers": 2, "heads": 4, "steps": 80},
}


# ----------------------------------------------------------------------------------------------------
# public API


def is_zoo_ref(ref: str) -> bool:
    """Whether a model reference names a zoo model, like ``"zoo:target"``."""
    return isinstance(ref, str) and ref.startswith(ZOO_PREFIX)


def zoo_root(size: str = "full", root: str | Path | None = None) -> Path:
    """The folder of one zoo: ``root``, else ``$FUSION_ZOO_DIR``, else ``~/.cache/fusion/zoo``; then
    ``<size>-<ZOO_VERSION>``."""
    _check_size(size)
    if root is None:
        root = os.environ.get("FUSION_ZOO_DIR") or Path.home() / ".cache" / "fusion" / "zoo"
    return Path(root).expanduser() / f"{size}-{ZOO_VERSION}"


def resolve_model(ref: str, size: str = "full", root: str | Path | None = None) -> str:
    """The folder of a ``zoo:<name>`` model (building the zoo, and the oracle or the chat models if one
    of them is asked for, if needed); any other ref unchanged."""
    if not is_zoo_ref(ref):
        return ref
    name = ref[len(ZOO_PREFIX):]
    if name not in ZOO_MODELS:
        valid = ", ".join(ZOO_PREFIX + m for m in ZOO_MODELS)
        raise FusionError(f"unknown zoo model {ref!r}: the zoo has {valid}")
    if name == "oracle":
        return str(build_oracle(size, root))
    if name in CHAT_MODELS:
        return str(build_chat(size, root) / CHAT_BASES[name])
    if name == "chat-reward":
        return str(build_reward(size, root))
    return str(build_zoo(size, root) / name)


def build_zoo(size: str = "full", root: str | Path | None = None, progress: bool = True) -> Path:
    """Build the zoo once and return its folder; later calls return at once.

    The zoo is built in a temporary sibling folder that is renamed into place when ``zoo.json``,
    written last, is there: a killed build leaves no half zoo. A lock file next to it makes other
    processes (DDP ranks, parallel tests) wait for the build instead of repeating it.
    """
    final = zoo_root(size, root)
    if _is_complete(final, ZOO_JSON):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    return _build_once(final, ZOO_JSON, lambda tmp: _build(tmp, size, progress))


def build_oracle(size: str = "full", root: str | Path | None = None, progress: bool = True) -> Path:
    """Build ``zoo:oracle`` once, after the core zoo, and return its folder (``<zoo>/oracle``); later
    calls return at once.

    It is not part of `build_zoo`, so that runs that do not use it do not wait for it. Same scheme
    one level down: a lock file ``oracle.lock`` in the zoo folder, a temporary ``.oracle.tmp-*``
    folder renamed into place once ``oracle.json`` (its recipe and validation perplexities, written
    last) is in it. The core models and ``zoo.json`` are never touched.
    """
    zoo = build_zoo(size, root, progress)
    final = zoo / "oracle"
    if _is_complete(final, ORACLE_JSON):
        return final
    if not os.access(zoo, os.W_OK):
        raise FusionError(f"zoo:oracle is built on first use, into the zoo folder {zoo}, which is not writable; "
                          "set zoo.dir (or $FUSION_ZOO_DIR) to a folder you can write")
    return _build_once(final, ORACLE_JSON, lambda tmp: _build_oracle(tmp, zoo, size, progress))


def build_chat(size: str = "full", root: str | Path | None = None, progress: bool = True) -> Path:
    """Build the three chat models once, after the core zoo, and return their folder (``<zoo>/<CHAT_FOLDER>``,
    one subfolder per base model); later calls return at once. Same scheme as `build_oracle`: a lock
    file ``<CHAT_FOLDER>.lock`` in the zoo folder, a temporary ``.<CHAT_FOLDER>.tmp-*`` folder renamed into place
    once ``chat.json`` is in it."""
    zoo = build_zoo(size, root, progress)
    return _build_extra(zoo / CHAT_FOLDER, CHAT_JSON, "the zoo's chat models are",
                        lambda tmp: build_chat_models(tmp, zoo, size, progress))


def build_reward(size: str = "full", root: str | Path | None = None, progress: bool = True) -> Path:
    """Build ``zoo:chat-reward`` once, after the chat models, and return its folder
    (``<zoo>/<CHAT_FOLDER>/<REWARD_FOLDER>``); later calls return at once. Same scheme as `build_oracle`, one level
    further down, with ``reward.json`` as the marker."""
    chat = build_chat(size, root, progress)
    return _build_extra(chat / REWARD_FOLDER, REWARD_JSON, "zoo:chat-reward is",
                        lambda tmp: build_reward_model(tmp, chat, size, progress))


def _build_extra(final: Path, marker: str, what: str, build) -> Path:
    """An on-first-use model built into ``final`` (deterministically, quietly) unless its ``marker`` is there; its
    parent folder must be writable."""
    if _is_complete(final, marker):
        return final
    if not os.access(final.parent, os.W_OK):
        raise FusionError(f"{what} built on first use, into the zoo folder {final.parent}, which is not writable; "
                          "set zoo.dir (or $FUSION_ZOO_DIR) to a folder you can write")

    def quietly(tmp: Path) -> None:
        with _deterministic(), _quiet_transformers():
            build(tmp)

    return _build_once(final, marker, quietly)


def _build_once(final: Path, marker: str, build) -> Path:
    """Run ``build(tmp)`` under a lock file next to ``final``, in a temporary sibling folder that is
    renamed to ``final`` once ``marker``, written last, is in it; unless another process, holding the
    lock before us, built it meanwhile."""
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process builds
        if _is_complete(final, marker):  # it was that other process
            return final
        # Whoever held the lock before us and left a temporary folder was killed mid-build.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            # A shared cache is readable by all: mkdtemp made the folder private, and safetensors writes
            # the weights 0600.
            for path in [tmp, *tmp.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            if final.exists():  # an incomplete folder from elsewhere: no marker in it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_size(size: str) -> None:
    if size not in _SIZES:
        raise FusionError(f"zoo.size must be 'full' or 'small', got {size!r}")


def _is_complete(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


# ----------------------------------------------------------------------------------------------------
# building


@contextmanager
def _deterministic():
    """Seeded and deterministic inside, without changing the caller's RNG or torch settings outside."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@contextmanager
def _quiet_transformers():
    """No "Writing model shards" / "Loading weights" bars from save_pretrained / from_pretrained: the zoo
    shows one bar per model."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _build(folder: Path, size: str, progress: bool) -> None:
    cfg = _SIZES[size]
    start = time.time()
    train = {d: _texts("train", d, cfg.train_chars, shuffle=True) for d in DOMAINS}
    val = {d: _texts("validation", d, cfg.val_chars) for d in DOMAINS}
    manifest = {
        "version": ZOO_VERSION,
        "size": size,
        "seed": SEED,
        "corpus_fingerprint": corpus_fingerprint(embedded_corpus("train") + embedded_corpus("validation")),
        "val_perplexity_unit": "exp(summed NLL of the validation text / its number of target tokens)",
        "val_chars_per_domain": cfg.val_chars,
        "models": {},
    }
    val_target_tokens = None  # per domain: the denominators of every model's perplexity
    with _deterministic():
        for index, name in enumerate(ZOO_CORE):
            spec = _MODELS[name]
            torch.manual_seed(SEED + index)
            tok_texts = _mix(train, spec["mixture"], cfg.tokenizer_chars)
            tokenizer = _TOKENIZERS[spec["tokenizer"]](tok_texts, cfg.vocab[name])
            specials = torch.tensor(tokenizer.all_special_ids)
            train_streams = [_stream(tokenizer, train[d]) for d in DOMAINS]
            val_streams = {d: _stream(tokenizer, val[d]) for d in DOMAINS}
            if val_target_tokens is None:  # the target comes first
                val_target_tokens = {d: int((~torch.isin(s, specials)).sum()) for d, s in val_streams.items()}

            model = _new_model(spec["arch"], tokenizer, cfg)
            weights = torch.tensor([spec["mixture"][d] for d in DOMAINS])
            generator = torch.Generator().manual_seed(SEED + index)
            _train(model, train_streams, weights, cfg.steps[name], cfg, generator,
                   desc=f"zoo {size} {name}", progress=progress)
            perplexity = {
                d: round(math.exp(_nll(model, val_streams[d], specials, cfg.block) / val_target_tokens[d]), 3)
                for d in DOMAINS
            }
            with _quiet_transformers():
                model.save_pretrained(folder / name)
            tokenizer.save_pretrained(folder / name)
            manifest["models"][name] = {
                "architecture": type(model).__name__,
                "model_type": model.config.model_type,
                "tokenizer_family": spec["tokenizer"],
                "vocab_size": len(tokenizer),
                "config_vocab_size": model.config.vocab_size,
                "parameters": sum(p.numel() for p in model.parameters()),
                "train_mixture": spec["mixture"],
                "train_steps": cfg.steps[name],
                "val_perplexity": perplexity,
            }
    manifest["build_seconds"] = round(time.time() - start, 1)
    (folder / ZOO_JSON).write_text(json.dumps(manifest, indent=2) + "\n")


def _build_oracle(folder: Path, zoo: Path, size: str, progress: bool) -> None:
    """The oracle: a Llama like the target's, on the target's own tokenizer, texts and mixture, with
    `_ORACLE`'s width and steps; its perplexities in the same unit as zoo.json's (per target token,
    which here is its own token)."""
    from transformers import AutoTokenizer

    recipe = _ORACLE[size]
    cfg = dataclasses.replace(_SIZES[size], width=recipe["width"], layers=recipe["layers"], heads=recipe["heads"])
    spec = _MODELS["target"]
    index = ZOO_MODELS.index("oracle")  # its own seed, after the core models' SEED + 0..2
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(zoo / "target")
    train = {d: _texts("train", d, cfg.train_chars, shuffle=True) for d in DOMAINS}
    val = {d: _texts("validation", d, cfg.val_chars) for d in DOMAINS}
    with _deterministic():
        torch.manual_seed(SEED + index)
        specials = torch.tensor(tokenizer.all_special_ids)
        train_streams = [_stream(tokenizer, train[d]) for d in DOMAINS]
        val_streams = {d: _stream(tokenizer, val[d]) for d in DOMAINS}
        val_target_tokens = {d: int((~torch.isin(s, specials)).sum()) for d, s in val_streams.items()}
        model = _new_model(spec["arch"], tokenizer, cfg)
        weights = torch.tensor([spec["mixture"][d] for d in DOMAINS])
        generator = torch.Generator().manual_seed(SEED + index)
        _train(model, train_streams, weights, recipe["steps"], cfg, generator, desc=f"zoo {size} oracle",
               progress=progress)
        perplexity = {
            d: round(math.exp(_nll(model, val_streams[d], specials, cfg.block) / val_target_tokens[d]), 3)
            for d in DOMAINS
        }
        with _quiet_transformers():
            model.save_pretrained(folder)
    copied = []
    for file in sorted((zoo / "target").iterdir()):  # the target's files that the model did not write:
        if file.is_file() and not (folder / file.name).exists():  # its tokenizer's, byte for byte
            shutil.copyfile(file, folder / file.name)
            copied.append(file.name)
    manifest = {
        "version": ZOO_VERSION,
        "size": size,
        "seed": SEED + index,
        "corpus_fingerprint": corpus_fingerprint(embedded_corpus("train") + embedded_corpus("validation")),
        "val_perplexity_unit": "exp(summed NLL of the validation text / its number of target tokens)",
        "val_chars_per_domain": cfg.val_chars,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "tokenizer_family": spec["tokenizer"],
        "tokenizer_files_from_target": copied,
        "vocab_size": len(tokenizer),
        "config_vocab_size": model.config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "width": cfg.width,
        "layers": cfg.layers,
        "heads": cfg.heads,
        "lr": cfg.lr,
        "train_mixture": spec["mixture"],
        "train_steps": recipe["steps"],
        "val_perplexity": perplexity,
        "build_seconds": round(time.time() - start, 1),
    }
    (folder / ORACLE_JSON).write_text(json.dumps(manifest, indent=2) + "\n")


def _texts(split: str, domain: str, max_chars: int, shuffle: bool = False) -> list[str]:
    """The documents of one split and domain, seeded-shuffled if asked, cut to ``max_chars`` in all."""
    docs = list(embedded_corpus(split, (domain,)))
    if shuffle:  # the corpus is sorted by module path: a prefix of it would be all `a*` to `h*` modules
        random.Random(SEED).shuffle(docs)
    texts, total = [], 0
    for doc in docs:
        if total >= max_chars:
            break
        texts.append(doc["text"][: max_chars - total])
        total += len(texts[-1])
    return texts


def _mix(texts: dict[str, list[str]], mixture: dict[str, float], chars: int) -> list[str]:
    """About ``chars`` characters of text, each domain in proportion to the model's mixture."""
    out = []
    for domain, weight in mixture.items():
        budget = int(chars * weight)
        for text in texts[domain]:
            if budget <= 0:
                break
            out.append(text[:budget])
            budget -= len(out[-1])
    return out


def _stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, each encoded as the tokenizer does (the target prepends
    ``<s>``) and followed by EOS, so that the models learn where documents start and end."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts)  # the backend: no length warnings
    eos = tokenizer.eos_token_id
    return torch.tensor([i for e in encodings for i in [*e.ids, eos]])


# ----------------------------------------------------------------------------------------------------
# tokenizers: three families, so that fusion has to align tokens that do not match


def _byte_tokens() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


def _metaspace_decoder():
    # Llama-2's: "▁" back to a space, runs of <0x..> pieces back to UTF-8 characters, then drop the
    # space that the pre-tokenizer prepended to the text.
    return decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                              decoders.Strip(" ", 1, 0)])


def _with_byte_tokens(tokenizer: Tokenizer, n_specials: int) -> Tokenizer:
    """Insert ``<0x00>``..``<0xFF>`` right after the special tokens (ids 3..258 in Llama) and turn on
    byte fallback: characters the tokenizer has no piece for are spelled as their UTF-8 bytes."""
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    byte_tokens = _byte_tokens()
    if model["type"] == "BPE":
        pieces = sorted(model["vocab"], key=model["vocab"].get)
        pieces = pieces[:n_specials] + byte_tokens + [p for p in pieces[n_specials:] if p not in byte_tokens]
        model["vocab"] = {p: i for i, p in enumerate(pieces)}
    else:  # Unigram: [piece, log-probability] pairs
        # The Unigram trainer is not deterministic: scores vary in the 11th digit, and the rare characters
        # that it appends at the bottom, with made-up scores 0.0001 apart, come in hash order. Rounded,
        # with one score for the bottom ones, and sorted, the pieces are the same every time.
        pieces = [[p, round(s, 6)] for p, s in model["vocab"][n_specials:]]
        lowest = round(min(s for _, s in pieces), 2)
        pieces = sorted(([p, s if s > lowest + 0.01 else lowest] for p, s in pieces),
                        key=lambda ps: (-ps[1], ps[0]))
        bytes_score = lowest - 10.0  # below everything: bytes are the last resort
        model["vocab"] = model["vocab"][:n_specials] + [[b, bytes_score] for b in byte_tokens] + pieces
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


def _wrap(tokenizer: Tokenizer, **special_tokens):
    from transformers import PreTrainedTokenizerFast

    # model_max_length: what the models accept, so that `truncation=True` cuts there.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=MAX_POSITIONS,
                                   **special_tokens)


def _sentencepiece_bpe(texts: list[str], vocab_size: int):
    """Llama-2 style: BPE over words marked with ``▁``, byte fallback, ``<s>`` prepended."""
    specials = ["<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    # limit_alphabet: the 100 most frequent characters get their own token, rarer ones (accents,
    # arrows, CJK in a few docstrings) are spelled in bytes.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, limit_alphabet=100,
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer = _with_byte_tokens(tokenizer, len(specials))
    tokenizer.decoder = _metaspace_decoder()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    # <unk> pads: with byte fallback it never occurs in text, so masking pads never hides a real </s>.
    return _wrap(tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
                 add_bos_token=True, add_eos_token=False)


def _byte_level_bpe(texts: list[str], vocab_size: int):
    """GPT-2 style: BPE over the 256 bytes written as printable characters (a space is ``Ġ``)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    eot = "<|endoftext|>"  # GPT-2 uses it as BOS, EOS and (by convention) padding
    return _wrap(tokenizer, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot)


def _sentencepiece_unigram(texts: list[str], vocab_size: int):
    """T5 / ALBERT style: a Unigram language model over ``▁``-marked pieces, with byte fallback."""
    specials = ["<|endoftext|>", "<|padding|>", "<unk>"]  # Unigram needs an unk piece for byte fallback
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size - 256, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer = _with_byte_tokens(tokenizer, len(specials))
    tokenizer.decoder = _metaspace_decoder()
    eot = "<|endoftext|>"  # like Pythia: BOS and EOS, but nothing is prepended
    return _wrap(tokenizer, bos_token=eot, eos_token=eot, unk_token="<unk>", pad_token="<|padding|>")


_TOKENIZERS = {
    "sentencepiece-bpe": _sentencepiece_bpe,
    "byte-level-bpe": _byte_level_bpe,
    "sentencepiece-unigram": _sentencepiece_unigram,
}


# ----------------------------------------------------------------------------------------------------
# models and training


def _new_model(arch: str, tokenizer, cfg: _Size):
    """A freshly initialised model of one architecture, sized by ``cfg``, with dropout 0."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if arch == "llama":
        mlp = (cfg.width * 8 // 3 + 31) // 32 * 32  # SwiGLU 8/3 as wide has the weights of a 4x GELU MLP
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.width, intermediate_size=mlp,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
            max_position_embeddings=MAX_POSITIONS, attention_dropout=0.0, **ids)
        return LlamaForCausalLM(config)
    if arch == "gpt2":
        # No pad_token_id in the config, as in GPT-2 itself: its pad is its EOS, and with one set the model
        # warns about a missing attention mask whenever EOS appears in the input. generate() gets it below.
        config = GPT2Config(
            vocab_size=len(tokenizer), n_embd=cfg.width, n_layer=cfg.layers, n_head=cfg.heads,
            n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            summary_first_dropout=0.0, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
        model = GPT2LMHeadModel(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model
    if arch == "gpt_neox":
        padded = (len(tokenizer) // 64 + 1) * 64  # strictly above len(tokenizer), as in real checkpoints
        config = GPTNeoXConfig(
            vocab_size=padded, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
            max_position_embeddings=MAX_POSITIONS, hidden_dropout=0.0, attention_dropout=0.0,
            classifier_dropout=0.0, **ids)
        return GPTNeoXForCausalLM(config)
    raise ValueError(arch)


def _batch(streams: list[torch.Tensor], weights: torch.Tensor, cfg: _Size, generator) -> torch.Tensor:
    """``cfg.batch`` random windows of ``cfg.block + 1`` tokens, each from a domain drawn by ``weights``."""
    domains = torch.multinomial(weights, cfg.batch, replacement=True, generator=generator)
    rows = []
    for d in domains.tolist():
        start = int(torch.randint(len(streams[d]) - cfg.block - 1, (1,), generator=generator))
        rows.append(streams[d][start: start + cfg.block + 1])
    return torch.stack(rows)


def _train(model, streams, weights, steps: int, cfg: _Size, generator, desc: str, progress: bool) -> None:
    """Plain AdamW with a 10% linear warmup and a cosine decay to a tenth of the peak.

    No weight decay: runs of a few hundred steps are far too short for it to matter.
    """
    from tqdm.auto import tqdm

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    for step in bar:
        if step < warmup:
            lr = cfg.lr * (step + 1) / warmup
        else:
            done = (step - warmup) / max(1, steps - warmup)  # 0 -> 1 over the decay
            lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = _batch(streams, weights, cfg, generator)
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


@torch.no_grad()
def _nll(model, stream: torch.Tensor, specials: torch.Tensor, block: int, batch: int = 16) -> float:
    """Summed negative log-likelihood (nats) of the non-special tokens of a stream, in windows of
    ``block`` tokens (each window starts without context, as in training)."""
    windows = [stream[i: i + block + 1] for i in range(0, len(stream) - 1, block)]
    total = 0.0
    full = [w for w in windows if len(w) == block + 1]
    groups = [torch.stack(full[i: i + batch]) for i in range(0, len(full), batch)]
    groups += [w[None] for w in windows if len(w) < block + 1]
    for x in groups:
        logits = model(input_ids=x[:, :-1]).logits
        nll = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        total += float(nll[~torch.isin(x[:, 1:].flatten(), specials)].sum())
    return total


# ----------------------------------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fusion.zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="full", help="full (default) or small")
    parser.add_argument("--dir", default=None,
                        help="parent folder (default: $FUSION_ZOO_DIR, else ~/.cache/fusion/zoo)")
    parser.add_argument("--with-oracle", action="store_true",
                        help="also build (or reuse) zoo:oracle, which is otherwise built on first use only")
    parser.add_argument("--with-chat", action="store_true",
                        help="also build (or reuse) the chat models (zoo:chat-target, ...), otherwise built on first "
                             "use only, and print their accuracy and perplexity per skill")
    parser.add_argument("--with-reward", action="store_true",
                        help="also build (or reuse) the chat models and zoo:chat-reward, and print the reward model's "
                             "held-out pairwise accuracy")
    args = parser.parse_args(argv)
    start = time.time()
    folder = build_zoo(args.size, args.dir)
    manifest = json.loads((folder / ZOO_JSON).read_text())
    print(f"{folder}  (ready in {time.time() - start:.1f} s; built in {manifest['build_seconds']} s)")
    models = dict(manifest["models"])
    if args.with_oracle:
        build_oracle(args.size, args.dir)
        oracle = json.loads((folder / "oracle" / ORACLE_JSON).read_text())
        print(f"{folder / 'oracle'}  (ready in {time.time() - start:.1f} s; built in {oracle['build_seconds']} s)")
        models["oracle"] = oracle
    print(f"{'model':<12} {'architecture':<20} {'tokenizer':<22} {'vocab':>6} {'config':>6} {'params':>9}"
          f" {'ppl code':>9} {'ppl prose':>9}")
    for name, m in models.items():
        print(f"{name:<12} {m['architecture']:<20} {m['tokenizer_family']:<22} {m['vocab_size']:>6}"
              f" {m['config_vocab_size']:>6} {m['parameters']:>9,} {m['val_perplexity']['code']:>9.2f}"
              f" {m['val_perplexity']['prose']:>9.2f}")
    print(f"perplexity unit: {manifest['val_perplexity_unit']}")
    if args.with_chat or args.with_reward:
        chat_folder = build_chat(args.size, args.dir)
        chat = json.loads((chat_folder / CHAT_JSON).read_text())
        print(f"\n{chat_folder}  (ready in {time.time() - start:.1f} s; built in {chat['build_seconds']} s)")
        print(format_table(chat))
    if args.with_reward:
        reward_folder = build_reward(args.size, args.dir)
        reward = json.loads((reward_folder / REWARD_JSON).read_text())
        print(f"\n{reward_folder}  (ready in {time.time() - start:.1f} s; built in {reward['build_seconds']} s)")
        print(format_reward(reward))


if __name__ == "__main__":
    try:
        _main()
    except FusionError as error:  # a user-fixable problem: one line, no traceback, exit code 2
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
