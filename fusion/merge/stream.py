"""Merging checkpoints a block of rows at a time, so that memory holds a block per model, never a whole model.

The inputs are read a block of a tensor at a time (`Checkpoint`: plain reads of its byte range, not a memory map);
`fusion.merge.methods` merges the blocks, in two passes for the methods that need a tensor's statistics first.
The output's safetensors files are written as a stream: every output tensor has the base's shape and a known dtype,
so each file's header (names, dtypes, shapes, byte offsets) is computed first and written, then each merged tensor's
bytes as it is made. The folder gets the base's config (its dtype updated), generation config and the tokenizer of
`tokenizer_source`, and a ``merge.json`` with the config and the per-tensor weights VaRM and SCE chose. It is built
under a temporary name and renamed when whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fusion.errors import FusionError
from fusion.merge import methods
from fusion.merge.config import MergeConfig

_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
          torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.int8: "I8", torch.int16: "I16"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
# Vocabulary-sized tensors, whose rows may differ between models (tokens added for a chat template)
_VOCAB = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
SHARD_BYTES = 5 * 2**30
BLOCK_ELEMENTS = 2**22  # entries per model merged at once: 16 MB of float32


class Checkpoint:
    """A model folder's tensors by name, each read from its safetensors file when asked for.

    Read with plain file reads of the tensor's byte range, not through a memory map: pages of a mapped file count
    in the process's resident memory once touched, so mapping three 1 GB checkpoints shows 3 GB resident by the
    end of a merge that never needed more than a few tensors.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FusionError(f"{self.folder}: no .safetensors weights to merge; save the model with "
                              "save_pretrained(safe_serialization=True)")
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for file in files:
            with open(file, "rb") as f:
                try:
                    (length,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(length))
                except (struct.error, ValueError) as err:
                    raise FusionError(f"{file}: not a safetensors file ({err}); re-save or re-download it") from None
            header.pop("__metadata__", None)
            self.where.update({name: (file, 8 + length, entry) for name, entry in header.items()})

    def names(self) -> list[str]:
        return list(self.where)

    def rows(self, name: str, first: int, end: int, fallback=None) -> torch.Tensor:
        """Rows ``first:end`` of tensor ``name`` (a 0-d or 1-d tensor's entries), read from its file. Rows this
        checkpoint does not have (a vocabulary smaller than the base's) come from ``fallback(first, end)``."""
        if name not in self.where:
            raise FusionError(f"{self.folder}: has no tensor {name!r}, which the base has; merge models of one "
                              "architecture")
        file, start, entry = self.where[name]
        shape, dtype = self.shape_dtype(name)
        own_rows = shape[0] if shape else 1
        if end > own_rows:
            if fallback is None:
                raise FusionError(f"{self.folder}: tensor {name!r} has {own_rows} rows, fewer than the base's")
            head = self.rows(name, first, own_rows) if first < own_rows else None
            tail = fallback(max(first, own_rows), end)
            return tail if head is None else torch.cat([head.to(tail.dtype), tail])
        row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
        size = torch.empty((), dtype=dtype).element_size()
        begin = entry["data_offsets"][0] + first * row_numel * size
        count = (end - first) * row_numel * size
        block_shape = [end - first, *shape[1:]] if shape else []
        if count == 0:
            return torch.empty(block_shape, dtype=dtype)
        with open(file, "rb") as f:
            f.seek(start + begin)
            data = bytearray(f.read(count))
        if len(data) != count:
            raise FusionError(f"{file}: tensor {name!r} is cut short; the file is truncated: re-save or re-download it")
        return torch.frombuffer(data, dtype=dtype).reshape(block_shape)

    def shape_dtype(self, name: str) -> tuple[list[int], torch.dtype]:
        entry = self.where[name][2]
        return list(entry["shape"]), {v: k for k, v in _CODES.items()}[entry["dtype"]]

    def config(self) -> dict:
        path = self.folder / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def layer_position(name: str, num_layers: int) -> float:
    """Where a tensor sits in the stack, 0 (first layer) to 1 (last); 0 outside the layers, as mergekit does."""
    match = _LAYER.search(name)
    if match is None or num_layers <= 1:
        return 0.0 if match is None else 1.0
    return int(match.group(1)) / (num_layers - 1)


def tensor_merge(config: MergeConfig, name: str, t: float, numel: int) -> methods.TensorMerge:
    """The merge of tensor ``name`` at layer position ``t``, its parameters resolved."""
    method = config.merge_method

    def each(key: str) -> list:
        return [float(config.parameter(key, name, t, i)) for i in range(len(config.models))]

    def shared(key: str):
        return config.parameter(key, name, t)

    merge = methods.TensorMerge(method, numel=numel)
    if method in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"):
        merge.weights, merge.normalize = each("weight"), bool(shared("normalize"))
    if method in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
        merge.scale = float(shared("lambda"))
    merge.densities = each("density") if method in ("ties", "dare_linear", "dare_ties") else [1.0] * len(
        config.models)
    if method in ("dare_linear", "dare_ties"):
        merge.rescale = bool(shared("rescale"))
        merge.seed = int.from_bytes(hashlib.sha256(f"{shared('seed')}:{name}".encode()).digest()[:6], "little")
    if method == "slerp":
        merge.t = float(shared("t"))
    if method == "sce":
        merge.select_topk, merge.masked_merge = float(shared("select_topk")), shared("sce_semantics") == "mergekit"
    return merge


def _header(names: list[str], shapes: dict, dtypes: dict) -> bytes:
    """A safetensors header for these tensors in this order, padded to 8 bytes."""
    entries, offset = {}, 0
    for name in names:
        size = int(torch.Size(shapes[name]).numel()) * torch.empty((), dtype=dtypes[name]).element_size()
        entries[name] = {"dtype": _CODES[dtypes[name]], "shape": shapes[name], "data_offsets": [offset, offset + size]}
        offset += size
    entries["__metadata__"] = {"format": "pt"}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def run_merge(config: MergeConfig, out: str | Path, progress: bool = True, shard_bytes: int = SHARD_BYTES,
              block_elements: int = BLOCK_ELEMENTS) -> dict:
    """Merge ``config``'s models into the HF folder ``out`` (replaced if it exists); returns the merge record.

    Tensors are merged ``block_elements`` entries (whole rows) at a time."""
    start, out = time.time(), Path(out)
    base = Checkpoint(config.base_model) if config.base_model else None
    models = [base if base and m.model == config.base_model else Checkpoint(m.model) for m in config.models]
    reference = base or models[0]
    base_config = reference.config()
    num_layers = int(base_config.get("num_hidden_layers") or base_config.get("n_layer") or 0)
    if config.layer_range and config.layer_range != (0, num_layers):
        raise FusionError(f"merge config: the slice's layer_range {list(config.layer_range)} does not cover the "
                          f"models' {num_layers} layers; merging parts of models is not supported")
    names = reference.names()
    out_dtype = _DTYPES.get(config.dtype)
    shapes, dtypes = {}, {}
    for name in names:
        shape, dtype = reference.shape_dtype(name)
        shapes[name] = shape
        dtypes[name] = out_dtype if out_dtype is not None and dtype.is_floating_point else dtype
    shards, size = [[]], 0
    for name in names:
        nbytes = int(torch.Size(shapes[name]).numel()) * torch.empty((), dtype=dtypes[name]).element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    chosen: dict[str, list[float]] = {}
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = tqdm(total=len(names), desc=f"merge {config.merge_method}", disable=not progress, dynamic_ncols=True)
    inputs = models if config.merge_method != "slerp" else [
        m for m, entry in zip(models, config.models) if entry.model != config.base_model]
    for file, shard in zip(files, shards):
        with open(tmp / file, "wb") as f:
            f.write(_header(shard, shapes, dtypes))
            for name in shard:
                _merge_one(config, name, shapes[name], dtypes[name], reference, base, inputs,
                           layer_position(name, num_layers), block_elements, f, chosen)
                bar.update()
    bar.close()
    if len(files) > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=2))
    _copy_metadata(config, reference, tmp)
    record = {"config": {"merge_method": config.merge_method, "base_model": config.base_model,
                         "models": [{"model": m.model, "parameters": m.parameters} for m in config.models],
                         "parameters": config.parameters, "dtype": config.dtype},
              "tensors": len(names), "bytes": sum((tmp / f).stat().st_size for f in files),
              "seconds": round(time.time() - start, 2), "weights": chosen}
    (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return record


def _merge_one(config: MergeConfig, name: str, shape: list[int], dtype: torch.dtype, reference: Checkpoint,
               base: Checkpoint | None, inputs: list[Checkpoint], t: float, block_elements: int, f,
               chosen: dict) -> None:
    """Merge tensor ``name`` block by block and append its bytes to the open file ``f``."""
    rows = shape[0] if shape else 1
    row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
    per_block = max(1, block_elements // max(row_numel, 1))
    n_blocks = max(1, -(-rows // per_block))
    for checkpoint in inputs:
        own = checkpoint.shape_dtype(name)[0]
        if own[1:] != shape[1:] or (own[:1] != shape[:1] and not any(v in name for v in _VOCAB)):
            raise FusionError(f"{checkpoint.folder}: tensor {name!r} has shape {own}, the base {shape}; merge models "
                              "of one architecture and size")

    def span(i: int) -> tuple[int, int]:
        return i * per_block, min(rows, (i + 1) * per_block)

    if not reference.shape_dtype(name)[1].is_floating_point:  # position ids, masks: the base's, unmerged
        for i in range(n_blocks):
            f.write(reference.rows(name, *span(i)).contiguous().view(torch.uint8).numpy().tobytes())
        return

    def read(i: int):
        first, end = span(i)
        base_block = base.rows(name, first, end) if base else None
        # vocabulary rows a model lacks are the base's (no delta); rows beyond the base's are never read
        fallback = (lambda a, b: base.rows(name, a, b)) if base else None
        return base_block, [m.rows(name, first, end, fallback) for m in inputs]

    merge = tensor_merge(config, name, t, rows * row_numel)
    methods.run_passes(merge, read, n_blocks, lambda i, merged: f.write(
        merged.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()))
    if merge.chosen is not None:
        chosen[name] = merge.chosen


def _copy_metadata(config: MergeConfig, reference: Checkpoint, folder: Path) -> None:
    """The base's config (with the output dtype) and generation config, and the tokenizer's files."""
    model_config = reference.config()
    if config.dtype:
        model_config["dtype"] = config.dtype
        model_config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    if (reference.folder / "generation_config.json").is_file():
        shutil.copy(reference.folder / "generation_config.json", folder)
    source = reference.folder if config.tokenizer_source in (None, "base") else Path(config.tokenizer_source)
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder)
