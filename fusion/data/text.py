"""Plain text → packed token blocks, for causal-LM training and validation.

Documents are tokenized (BOS as the tokenizer adds it), each ended with EOS, concatenated and
cut into blocks of `block_size` tokens. The blocks are cached on disk, keyed by everything that
changes them (source, tokenizer, block size, splits) and built by one process while the others
wait (`fusion.data.cache.build_once`), so every run and every rank after the first reads them with
`load_from_disk` in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import datasets
import lightning.pytorch as pl
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fusion.config import DataConfig
from fusion.data.cache import build_once
from fusion.data.corpus import embedded_corpus
from fusion.data.sampling import EpochBatchSampler, ResumableLoader
from fusion.errors import FusionError

# Bump when the packing below changes, so stale caches are not reused.
_PACKING_VERSION = 1
_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def cache_root() -> Path:
    """Where fusion caches what it computes: ``$FUSION_CACHE``, else ``~/.cache/fusion``."""
    return Path(os.environ.get("FUSION_CACHE", Path.home() / ".cache" / "fusion"))


def default_cache_dir() -> Path:
    return cache_root() / "data"


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer that can pad: models without a pad token (Llama, GPT-2) pad with EOS."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise FusionError(f"cannot load a tokenizer from {path!r}: {str(err).splitlines()[0]}") from None
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


def _load_source(config: DataConfig) -> datasets.DatasetDict | datasets.Dataset:
    """The dataset behind `data.source`: a `save_to_disk` folder, local files, or a hub id."""
    path = Path(config.source).expanduser()
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
            return datasets.load_from_disk(str(path))
        if path.exists():
            files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.suffix in _FILE_BUILDERS)
            builders = {_FILE_BUILDERS[p.suffix] for p in files}
            if len(builders) != 1:
                raise FusionError(f"data.source {config.source!r}: expected files of one kind among "
                                  f"{', '.join(_FILE_BUILDERS)}, found {sorted(builders) or 'none'}")
            (builder,) = builders
            extra = {"sample_by": "document"} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=[str(p) for p in files], **extra)
        return datasets.load_dataset(config.source, config.subset)
    except FusionError:
        raise
    except Exception as err:  # datasets raises many types; all mean "this source cannot be read"
        raise FusionError(f"data.source {config.source!r} cannot be loaded: {str(err).splitlines()[0]}") from None


def document_splits(config: DataConfig, seed: int) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    """Training documents and named validation sets (one per domain for the embedded corpus)."""
    if config.source == "embedded":
        train = datasets.Dataset.from_list(embedded_corpus("train", tuple(config.domains)))
        validation = {d: datasets.Dataset.from_list(embedded_corpus("validation", (d,))) for d in config.domains}
        return train, validation
    loaded = _load_source(config)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({config.train_split: loaded})
    if config.train_split not in loaded:
        raise FusionError(f"data.train_split {config.train_split!r} is not in {config.source!r}, "
                          f"which has splits {sorted(loaded)}")
    train = loaded[config.train_split]
    if config.text_field not in train.column_names:
        raise FusionError(f"data.text_field {config.text_field!r} is not a column of {config.source!r}; "
                          f"its columns are {train.column_names}")
    if config.validation_split and config.validation_split in loaded:
        return train, {"all": loaded[config.validation_split]}
    held_out = train.train_test_split(test_size=config.validation_fraction, seed=seed)
    return held_out["train"], {"all": held_out["test"]}


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
    """Packed blocks of text for causal-LM training, with one or more named validation sets.

    Batches are `{"input_ids": LongTensor[batch_size, block_size]}`; the model predicts every
    token from the ones before it. The training loader is resumable mid-epoch.
    """

    def __init__(self, config: DataConfig, tokenizer_path: str, batch_size: int, seed: int = 42,
                 trust_remote_code: bool = False) -> None:
        super().__init__()
        self.config, self.tokenizer_path, self.batch_size, self.seed = config, tokenizer_path, batch_size, seed
        self.trust_remote_code = trust_remote_code
        self.train_set: datasets.Dataset | None = None
        self.validation_sets: dict[str, datasets.Dataset] = {}

    def cache_path(self) -> Path:
        tokenizer = load_tokenizer(self.tokenizer_path, self.trust_remote_code)
        c = self.config
        key = {
            "source": c.source if c.source == "embedded" else str(Path(c.source).expanduser().resolve())
            if Path(c.source).expanduser().exists() else c.source,
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
        """Pack every split into the empty ``folder``; ``done`` is written last."""
        tokenizer = load_tokenizer(self.tokenizer_path, self.trust_remote_code)
        train, validation = document_splits(self.config, self.seed)
        for name, docs in {"train": train, **validation}.items():
            if self.config.text_field not in docs.column_names:
                raise FusionError(f"data.text_field {self.config.text_field!r} is not a column of the {name} split")
        for name, docs in {"train": train, **{f"validation-{k}": v for k, v in validation.items()}}.items():
            blocks = pack(docs, tokenizer, self.config.text_field, self.config.block_size,
                          self.config.preprocessing_workers)
            if len(blocks) == 0:
                raise FusionError(f"data: the {name} split has fewer than data.block_size={self.config.block_size} "
                                  "tokens; lower data.block_size or add text")
            blocks.save_to_disk(str(folder / name))
        (folder / "done").write_text(json.dumps({"validation_sets": list(validation)}))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        target = self.cache_path()
        names = json.loads((target / "done").read_text())["validation_sets"]
        self.train_set = datasets.load_from_disk(str(target / "train")).with_format("torch")
        for name in names:
            blocks = datasets.load_from_disk(str(target / f"validation-{name}"))
            if self.config.max_validation_blocks is not None:
                blocks = blocks.select(range(min(len(blocks), self.config.max_validation_blocks)))
            self.validation_sets[name] = blocks.with_format("torch")

    @property
    def validation_names(self) -> list[str]:
        return list(self.validation_sets)

    def _placement(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> ResumableLoader:
        rank, world_size = self._placement()
        if len(self.train_set) < self.batch_size * world_size:
            raise FusionError(f"data: {len(self.train_set)} training blocks cannot fill one batch of "
                              f"trainer.batch_size={self.batch_size} on {world_size} devices; lower either")
        sampler = EpochBatchSampler(len(self.train_set), self.batch_size, shuffle=True, seed=self.seed,
                                    rank=rank, world_size=world_size, drop_last=True)
        return ResumableLoader(self.train_set, sampler, num_workers=self.config.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        rank, world_size = self._placement()
        return [
            DataLoader(blocks, num_workers=self.config.num_workers, batch_sampler=EpochBatchSampler(
                len(blocks), self.batch_size, shuffle=False, rank=rank, world_size=world_size, drop_last=False))
            for blocks in self.validation_sets.values()
        ]
