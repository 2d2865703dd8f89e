"""Plain text: the sources, their splits, and the held-out documents as packed token blocks for validation.

Training reads the chunk set's rows (`fusion.data.chunks`, laid out like these blocks; `fusion.data.rows`).
Held-out documents are tokenized (BOS as the tokenizer adds it), each ended with EOS, concatenated and
cut into blocks of `block_size` tokens. The blocks are cached on disk, keyed by everything that
changes them (the source's content, tokenizer, block size, splits) and built by one process while the others
wait (`fusion.data.cache.build_once`), so every run and every rank after the first reads them with
`load_from_disk` in milliseconds.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
import time
from functools import cache
from pathlib import Path

import datasets
import lightning.pytorch as pl
from huggingface_hub import HfApi, constants
from huggingface_hub.file_download import repo_folder_name
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fusion.config import DataConfig
from fusion.data.cache import build_once, cache_root, file_sha256, sha256_file
from fusion.data.corpus import embedded_corpus
from fusion.data.sampling import validation_loaders
from fusion.errors import FusionError, first_line

# Bump when the packing below changes, so stale caches are not reused.
_PACKING_VERSION = 1
_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# File times advance in coarse ticks: a file written this recently may be rewritten with the same size and
# time, which the per-version hash cache (`file_sha256`) would not notice, so such files are hashed afresh.
_RECENT_NS = 2_000_000_000


def default_cache_dir() -> Path:
    return cache_root() / "data"


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer that can pad: models without a pad token (Llama, GPT-2) pad with EOS."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise FusionError(f"cannot load a tokenizer from {path!r}: {first_line(err)}") from None
    if tokenizer.eos_token_id is None:
        raise FusionError(f"the tokenizer of {path!r} has no EOS token, which packing needs to separate documents")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Changes whenever the tokenizer would tokenize differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((content + specials).encode()).hexdigest()[:16]


def _is_saved_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json"))


def data_files(path: Path) -> list[Path]:
    """The files of a local `data.source` that `_load_source` reads: every file of a `save_to_disk` folder,
    else the files of a known kind (`_FILE_BUILDERS`) in the file or folder, in sorted order."""
    if _is_saved_folder(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(p for p in ([path] if path.is_file() else path.rglob("*"))
                  if p.suffix in _FILE_BUILDERS and p.is_file())


def _content_sha256(file: Path) -> str:
    """The sha256 of a data file: `file_sha256` (cached per file version), or hashed afresh if just written."""
    if time.time_ns() - file.stat().st_mtime_ns < _RECENT_NS:
        return sha256_file(file)
    return file_sha256(file)


def source_fingerprint(config: DataConfig) -> str:
    """What the documents of `data.source` are, for the keys of every cache built from them.

    Local data is keyed by content: per file `_load_source` reads (`data_files`), its name relative to
    the source, its size and its sha256, so a changed file gets new blocks and chunks while a moved or
    copied one reuses them. A hub dataset is ``hub:<id>@<commit>`` (`hub_dataset_revision`). The embedded
    corpus is ``embedded``; the callers add the Python version, which decides its content.
    """
    if config.source == "embedded":
        return "embedded"
    path = Path(config.source).expanduser()
    if not path.exists():
        return hub_dataset_revision(config.source)
    digest = hashlib.sha256()
    for file in data_files(path):
        entry = [file.relative_to(path).as_posix(), file.stat().st_size, _content_sha256(file)]
        digest.update(json.dumps(entry).encode())
    return digest.hexdigest()[:16]


def _offline() -> bool:
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return constants.HF_HUB_OFFLINE or any(os.environ.get(n, "").upper() in ("1", "ON", "YES", "TRUE") for n in names)


@cache  # once per process: every rank and stage of a run keys the same revision
def hub_dataset_revision(repo_id: str) -> str:
    """``hub:<id>@<commit>`` of a hub dataset: asked of the hub; offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE,
    or no network) the commit of ``main`` in the local Hugging Face cache, which is what `load_dataset` reads
    then; else ``hub:<id>``, with a warning that changes on the hub will go unnoticed."""
    reason = "offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) is set"
    if not _offline():
        try:
            sha = HfApi().dataset_info(repo_id, timeout=10).sha
            if sha:
                return f"hub:{repo_id}@{sha}"
            reason = "the hub gave no commit"
        except Exception as err:  # no network, a proxy, a gated or unknown repo, a bad id: try the cache
            reason = first_line(err)
    try:
        ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="dataset") / "refs" / "main"
        commit = ref.read_text().strip() if ref.is_file() else ""
    except (OSError, ValueError):
        commit = ""
    if commit:
        return f"hub:{repo_id}@{commit}"
    print(f"warning: data.source {repo_id!r}: its hub commit is unknown ({reason}); its cached blocks and chunks "
          "are keyed by its name only, so changes to it on the hub will not be noticed", file=sys.stderr)
    return f"hub:{repo_id}"


def _scan_text_file(file: Path) -> bool:
    """Whether a text data file holds anything but whitespace; a FusionError if it is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text, lines = False, 0
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            pending = decoder.getstate()[0]
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                data = pending + block
                line = lines + data[:err.start].count(b"\n") + 1
                raise FusionError(f"data.source: {file} is not UTF-8 text (byte 0x{data[err.start]:02x} on line "
                                  f"{line}); re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
            lines += block.count(b"\n")
            has_text = has_text or bool(block.strip())
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise FusionError(f"data.source: {file} is not UTF-8 text (it ends inside a character); "
                          "re-save it as UTF-8") from None
    return has_text


def _load_source(config: DataConfig, example: str) -> datasets.DatasetDict | datasets.Dataset:
    """The dataset behind `data.source`: a `save_to_disk` folder, local files, or a hub id. ``example`` ends the
    message for empty files: what one record looks like."""
    path = Path(config.source).expanduser()
    try:
        if _is_saved_folder(path):
            return datasets.load_from_disk(str(path))
        if path.exists():
            files = data_files(path)
            builders = {_FILE_BUILDERS[p.suffix] for p in files}
            if len(builders) != 1:
                raise FusionError(f"data.source {config.source!r}: expected files of one kind among "
                                  f"{', '.join(_FILE_BUILDERS)}, found {sorted(builders) or 'none'}")
            (builder,) = builders
            if builder != "parquet":  # checked here: the loaders fail midway, or later, without naming the file
                files = [p for p in files if _scan_text_file(p)]
                if not files:
                    raise FusionError(f"data.source {config.source!r} holds no documents (its files are empty); "
                                      f"add text, e.g. {example}")
            extra = {"sample_by": "document"} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=[str(p) for p in files], **extra)
        return datasets.load_dataset(config.source, config.subset)
    except FusionError:
        raise
    except Exception as err:  # datasets raises many types; all mean "this source cannot be read"
        raise FusionError(f"data.source {config.source!r} cannot be loaded: {first_line(err)}") from None


def load_splits(config: DataConfig, example: str) -> datasets.DatasetDict:
    """`data.source` as named splits, `data.train_split` among them (a source without splits is all training data).
    ``example`` ends the message for empty files: what one record looks like."""
    loaded = _load_source(config, example)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({config.train_split: loaded})
    if config.train_split not in loaded:
        raise FusionError(f"data.train_split {config.train_split!r} is not in {config.source!r}, "
                          f"which has splits {sorted(loaded)}")
    return loaded


def hold_out(config: DataConfig, records: datasets.Dataset, seed: int,
             unit: str = "document") -> tuple[datasets.Dataset, datasets.Dataset]:
    """``records`` less a seeded `data.validation_fraction` of them, and that fraction (for sources without a
    validation split); ``unit`` names a record in the message when there are too few."""
    try:
        held_out = records.train_test_split(test_size=config.validation_fraction, seed=seed)
    except ValueError:  # too few records to leave some for training
        more = "split the text into more documents (records)" if unit == "document" else f"add {unit}s"
        raise FusionError(
            f"data.source {config.source!r} has {len(records)} {unit}(s): too few to hold out "
            f"data.validation_fraction={config.validation_fraction} of them for validation and train on the rest; "
            f"{more}, or use data with a validation split (data.validation_split)") from None
    return held_out["train"], held_out["test"]


def document_splits(config: DataConfig, seed: int) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    """Training documents and named validation sets (one per domain for the embedded corpus)."""
    if config.source == "embedded":
        train = datasets.Dataset.from_list(embedded_corpus("train", tuple(config.domains)))
        validation = {d: datasets.Dataset.from_list(embedded_corpus("validation", (d,))) for d in config.domains}
        return train, validation
    loaded = load_splits(config, f"one JSON object with a {config.text_field!r} field per line")
    train = loaded[config.train_split]
    if config.text_field not in train.column_names:
        raise FusionError(f"data.text_field {config.text_field!r} is not a column of {config.source!r}; "
                          f"its columns are {train.column_names}")
    if len(train) == 0:
        raise FusionError(f"data.source {config.source!r}: its {config.train_split!r} split holds no documents; "
                          "add some")
    if config.validation_split and config.validation_split in loaded:
        return train, {"all": loaded[config.validation_split]}
    train, validation = hold_out(config, train, seed)
    return train, {"all": validation}


def pack(documents: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, text_field: str, block_size: int,
         num_proc: int = 1) -> datasets.Dataset:
    """Tokenize, end each document with EOS, concatenate, and cut into `block_size` blocks.

    The tail of each map batch of 1,000 documents that does not fill a block is dropped: under
    `block_size` tokens in 1,000 documents.
    """
    eos = tokenizer.eos_token_id

    def tokenize_and_cut(batch: dict) -> dict:
        stream: list[int] = []
        for ids in tokenizer(batch[text_field])["input_ids"]:
            stream.extend(ids if ids and ids[-1] == eos else [*ids, eos])
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i:i + block_size] for i in range(0, usable, block_size)]}

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    return documents.map(tokenize_and_cut, batched=True, batch_size=1000, remove_columns=documents.column_names,
                         features=features, num_proc=num_proc if num_proc > 1 else None, desc="packing")


class TextDataModule(pl.LightningDataModule):
    """The held-out text as packed blocks: one or more named validation sets.

    Batches are `{"input_ids": LongTensor[batch_size, block_size]}`; the model predicts every
    token from the ones before it. Training data comes from `fusion.data.rows.RowDataModule`, which
    validates with this module.
    """

    def __init__(self, config: DataConfig, tokenizer_path: str, batch_size: int, seed: int = 42,
                 trust_remote_code: bool = False) -> None:
        super().__init__()
        self.config, self.tokenizer_path, self.batch_size, self.seed = config, tokenizer_path, batch_size, seed
        self.trust_remote_code = trust_remote_code
        self.validation_sets: dict[str, datasets.Dataset] | None = None

    def cache_path(self) -> Path:
        tokenizer = load_tokenizer(self.tokenizer_path, self.trust_remote_code)
        c = self.config
        key = {
            "source": source_fingerprint(c),
            "python": list(sys.version_info[:3]) if c.source == "embedded" else None,
            "subset": c.subset, "domains": c.domains, "text_field": c.text_field, "train_split": c.train_split,
            "validation_split": c.validation_split, "validation_fraction": c.validation_fraction,
            "block_size": c.block_size, "seed": self.seed, "tokenizer": tokenizer_fingerprint(tokenizer),
            "packing": _PACKING_VERSION,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(c.cache_dir).expanduser() if c.cache_dir else default_cache_dir()
        return root / f"blocks-{digest}"

    def prepare_data(self) -> None:
        """Tokenize and pack once: one process builds the cache while the others (ranks, runs) wait for it."""
        build_once(self.cache_path(), lambda folder: (folder / "done").exists(), self._pack_into)

    def _pack_into(self, folder: Path) -> None:
        """Pack every validation set into the empty ``folder``; ``done`` is written last."""
        tokenizer = load_tokenizer(self.tokenizer_path, self.trust_remote_code)
        _, validation = document_splits(self.config, self.seed)
        for name, docs in validation.items():
            if self.config.text_field not in docs.column_names:
                raise FusionError(f"data.text_field {self.config.text_field!r} is not a column of the {name} split")
        for name, docs in {f"validation-{k}": v for k, v in validation.items()}.items():
            blocks = pack(docs, tokenizer, self.config.text_field, self.config.block_size,
                          self.config.preprocessing_workers)
            if len(blocks) == 0:
                raise FusionError(f"data: the {name} split has fewer than data.block_size={self.config.block_size} "
                                  "tokens; lower data.block_size or add text")
            blocks.save_to_disk(str(folder / name))
        (folder / "done").write_text(json.dumps({"validation_sets": list(validation)}))

    def setup(self, stage: str | None = None) -> None:
        if self.validation_sets is not None:
            return
        target = self.cache_path()
        names = json.loads((target / "done").read_text())["validation_sets"]
        self.validation_sets = {}
        for name in names:
            blocks = datasets.load_from_disk(str(target / f"validation-{name}"))
            if self.config.max_validation_blocks is not None:
                blocks = blocks.select(range(min(len(blocks), self.config.max_validation_blocks)))
            self.validation_sets[name] = blocks.with_format("torch")

    @property
    def validation_names(self) -> list[str]:
        return list(self.validation_sets or {})

    def val_dataloader(self) -> list[DataLoader]:
        return validation_loaders(list(self.validation_sets.values()), self.batch_size, self.trainer,
                                  self.config.num_workers)
