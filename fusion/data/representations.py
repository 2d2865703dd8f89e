"""Teacher representations: each teacher's top-k next-token log-probs on every chunk, via `Trainer.predict`.

For every teacher of a recipe, the chunks (`fusion.data.chunks`) are tokenized with the teacher's
tokenizer, run through the teacher in batches, and the top-k log-probs and ids of every position,
plus the teacher's cross-entropy on its own next tokens, are written to the teacher's shard folder
(`fusion.data.store`). It is `Trainer.predict` with a `BasePredictionWriter`, so several devices
extract with the same code (each takes every world_size-th missing shard).

Everything is resumable and incremental:

- the folder of a teacher is named by a hash of what its numbers depend on (the weights' content or
  hub commit, tokenizer, dtype, quantization, k, the chunks), so adding a teacher to a recipe computes
  only that teacher, any run with the same teacher and chunks reuses the shards, and a fine-tuned
  teacher gets new ones;
- only missing shards are computed; a shard is written atomically once all its chunks are done.

Teachers that produce NaN/inf on a chunk do not stop the run: those chunks are flagged in the
shard, counted in the manifest, reported, and excluded when training reads the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from huggingface_hub import HfApi, constants, try_to_load_from_cache
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Sampler
from transformers import AutoConfig, AutoModelForCausalLM

from fusion import kernels
from fusion.config import TeacherConfig
from fusion.data.cache import cache_root, file_sha256
from fusion.data.chunks import sequence_ids
from fusion.data.store import STORE_FORMAT, ChunkPredictions, TeacherStore, id_dtype
from fusion.data.text import load_tokenizer, tokenizer_fingerprint
from fusion.errors import FusionError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def default_store_dir() -> Path:
    return cache_root() / "representations"


def model_fingerprint(path: str) -> str:
    """Changes when the weights do: their content for a local folder, the hub commit for a hub id.

    A local folder: its ``config.json`` bytes and, per weight file, its name, its safetensors header
    (tensor names, dtypes, shapes) and the sha256 of the whole file (`file_sha256`, computed once per
    file version). The folder's own path is not part of it: an identical copy of a teacher elsewhere
    reuses the original's representations, while a fine-tuned copy with the same file sizes gets new
    ones. A hub id: ``hub:<id>@<commit>`` (`hub_commit`).
    """
    folder = Path(path)
    if not folder.is_dir():
        return f"hub:{path}@{hub_commit(path)}"
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.name == "config.json":
            digest.update(file.read_bytes())
        elif file.suffix in _WEIGHT_SUFFIXES:
            digest.update(file.name.encode())
            if file.suffix == ".safetensors":
                digest.update(safetensors_header(file))
            digest.update(file_sha256(file).encode())
    return digest.hexdigest()[:16]


def safetensors_header(file: Path) -> bytes:
    """The JSON header at the start of a ``.safetensors`` file: an 8-byte little-endian length, then the header."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            raise FusionError(f"{file} is not a safetensors file (its header is truncated); download it again")
        return f.read(length)


def hub_commit(repo_id: str) -> str:
    """The commit a hub id stands for: asked of the hub; offline (``HF_HUB_OFFLINE=1``, or the hub cannot be
    reached) the commit of ``main`` in the local Hugging Face cache, which is what `from_pretrained` loads then."""
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    reason = "HF_HUB_OFFLINE is set"
    if not offline:
        try:
            sha = HfApi().model_info(repo_id, timeout=10).sha
            if sha:
                return sha
            reason = "the hub gave no commit"
        except Exception as err:  # no network, a proxy, a gated or unknown repo, a bad id: try the cache
            reason = first_line(err)
    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid hub id (a local path that does not exist)
        cached = None
    if isinstance(cached, str):
        return Path(cached).parent.name  # <hub cache>/models--ORG--NAME/snapshots/<commit>/config.json
    raise FusionError(f"teacher {repo_id!r}: no such local folder, and its hub commit cannot be known ({reason}) "
                      f"nor found in the local Hugging Face cache; download it (hf download {repo_id}) or set "
                      "its path to a local folder")


def vocab_rows(model_path: str, trust_remote_code: bool = False) -> int:
    """The model's embedding rows (config ``vocab_size``), which may exceed ``len(tokenizer)``."""
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise FusionError(f"cannot read the config of {model_path!r}: {first_line(err)}") from None
    return int(config.get_text_config().vocab_size)


def resolve_dtype(dtype: str, accelerator_is_gpu: bool) -> str:
    return dtype if dtype != "auto" else ("bfloat16" if accelerator_is_gpu else "float32")


class TeacherModule(pl.LightningModule):
    """Runs one teacher for `Trainer.predict`: batches of chunks in, `ChunkPredictions` out.

    The HF model is kept outside the module's submodules: Lightning must neither move a
    bitsandbytes-quantized model (it is placed on its device when loaded) nor wrap it.
    """

    def __init__(self, model_path: str, dtype: str, quantization: str, top_k: int, trust_remote_code: bool = False,
                 attn_implementation: str | None = None) -> None:
        super().__init__()
        self.model_path, self.dtype_name, self.quantization = model_path, dtype, quantization
        self.top_k, self.trust_remote_code, self.attn_implementation = top_k, trust_remote_code, attn_implementation
        self.teacher: list = []  # [model]; a list so that it is not registered as a submodule

    def configure_model(self) -> None:
        if self.teacher:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        extra = {}
        if self.quantization != "none":
            from transformers import BitsAndBytesConfig

            extra["quantization_config"] = (
                BitsAndBytesConfig(load_in_8bit=True) if self.quantization == "8bit" else
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
            extra["device_map"] = {"": str(device)}  # quantized weights are made on their device, never moved
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=DTYPES[self.dtype_name], trust_remote_code=self.trust_remote_code,
                attn_implementation=self.attn_implementation, **extra)
        except (OSError, ValueError, ImportError) as err:
            raise FusionError(f"cannot load teacher {self.model_path!r}: {first_line(err)}") from None
        if self.quantization == "none":
            model.to(device)
        model.eval()
        self.teacher.append(model)

    # Rows of logits are log-softmaxed in float32 a chunk at a time, into a buffer of at most this many
    # floats (at least one row), never the whole sequence: a float32 [L, V] copy is 1.2 GB at 2,048 x
    # 151,936 and twice that with its log-softmax. On a CPU, 16 MiB (27 rows at V = 152k) stays in L3,
    # so only the logits are read from memory: on 2 cores at V = 152k, 2^22 and 2^20 took 92 ms, 2^24
    # 110 ms and 2^26 156 ms for 1,022 rows. On a GPU each chunk costs a few kernel launches, which
    # dominate small chunks: on an H200 at V = 152k, 8 x 2,048 tokens, 2^20 / 2^22 / 2^23 / 2^24 / 2^26
    # gave 0.45 / 0.67 / 0.71 / 0.73 / 0.75 of a bare forward's speed (`bench/run.py extraction`).
    _CHUNK_ELEMENTS = 1 << 22  # on a CPU
    _GPU_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of float32: on every other device
    _TOPK_BLOCK = 128  # columns per block of `_topk_ids`

    @classmethod
    def chunk_elements(cls, device: torch.device) -> int:
        return cls._CHUNK_ELEMENTS if device.type == "cpu" else cls._GPU_CHUNK_ELEMENTS

    @classmethod
    def _topk_ids(cls, logits: torch.Tensor, k: int) -> torch.Tensor:
        """``logits.topk(k).indices`` of a 2-D ``[n, V]`` tensor (values descending), from one pass over it.

        `torch.topk` over 152k columns is a multi-pass radix select per row, slower than the forward
        that made the logits on a GPU. Instead: the maximum of each block of `_TOPK_BLOCK` columns (one
        read), the k blocks with the largest maxima, and the top k among their columns and the tail
        columns that fill no whole block. A block holding one of the k largest values has a maximum at
        least the k-th largest value, which at most k-1 other blocks reach, so those k blocks hold them
        all (at exact ties any of the tied ids may be chosen, as with `torch.topk`).
        """
        n, vocab = logits.shape
        block = cls._TOPK_BLOCK
        blocks = vocab // block
        if blocks <= k or n == 0:
            return logits.topk(k, dim=-1).indices
        whole = blocks * block
        maxima = logits[:, :whole].view(n, blocks, block).amax(dim=-1)
        chosen = maxima.topk(k, dim=-1).indices  # [n, k]
        columns = (chosen[:, :, None] * block + torch.arange(block, device=logits.device)).view(n, k * block)
        if whole < vocab:
            tail = torch.arange(whole, vocab, device=logits.device).expand(n, vocab - whole)
            columns = torch.cat([columns, tail], dim=1)
        best = logits.gather(1, columns).topk(k, dim=-1).indices
        return columns.gather(1, best)

    @torch.inference_mode()
    def predict_step(self, batch: dict, batch_idx: int = 0) -> list[ChunkPredictions]:
        """The batch's `ChunkPredictions`, one per sequence, without a float32 [L, V] tensor.

        Per sequence (the rows before its padding, views of the logits): top-k ids on the logits in
        the model's dtype (`_topk_ids`; log-softmax is a shift by log Z per row, so it keeps their order), then the
        log-softmax in float32 a chunk of rows at a time (`chunk_elements`), from which the top-k
        ids' and the actual next token's log-probs are gathered. The numbers are those of a float32
        log-softmax of each row, as before (bit for bit on CPUs), NaN/inf included: a row with a NaN
        or +inf logit gives NaN log-probs, a -inf logit of the next token an infinite CE, and the
        chunk is flagged `bad`. Log Z comes from the fused row-wise log-softmax kernel rather than
        `torch.logsumexp`, which is unfused (max, subtract, exp, sum: four passes over a chunk and two
        float32 copies of it): at V = 152k on a CPU, logsumexp took 2.7x as long over the same chunks,
        and a hand-written max / subtract / exp / sum 2x. On CUDA with Triton, log Z comes from a fused
        kernel instead (`kernels.row_log_z`: one read of the logits, no float32 copy; the log-probs agree
        with the log-softmax's to float32 rounding). All of the batch's results are packed into one
        int32 tensor on the device and copied to the host once.

        Every position's logits are needed (all but each sequence's last), so the model is not asked
        for fewer (HF's ``logits_to_keep``). Transformers 5 returns the logits in the model's dtype;
        versions that upcast them to float32 in the model (Llama before ~4.45) would make the [B, L, V]
        logits themselves float32, which nothing here can avoid.
        """
        model = self.teacher[0]
        # Read before the forward is queued, so that these small copies wait for nothing.
        chunk_ids, lengths = batch["chunk_ids"].tolist(), batch["lengths"].tolist()
        input_ids = batch["input_ids"].to(model.device)
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(model.device)).logits
        k, vocab, device = self.top_k, logits.shape[-1], logits.device
        rows = [max(n - 1, 0) for n in lengths]  # position t predicts token t + 1
        chunk = max(1, self.chunk_elements(device) // vocab)
        fused = kernels.available(logits)
        if not fused:
            buffer = torch.empty(min(chunk, max(rows)), vocab, dtype=torch.float32, device=device)
        picked = torch.empty(sum(rows), k + 1, dtype=torch.float32, device=device)  # top-k log-probs, next token's
        top_ids, tokens, offset = [], [], 0
        for row, n in enumerate(rows):
            seq_logits = logits[row, :n]  # a view: the rows before the padding
            ids = self._topk_ids(seq_logits, k)  # [n, k], on the logits in their dtype
            index = torch.cat([ids, input_ids[row, 1:n + 1, None]], dim=-1)
            if fused:  # log Z in one read of the logits, no float32 copy of them
                log_z = kernels.row_log_z(seq_logits)
                torch.sub(seq_logits.gather(1, index).float(), log_z[:, None], out=picked[offset:offset + n])
            else:
                for start in range(0, n, chunk):
                    stop = min(start + chunk, n)
                    logprobs = buffer[:stop - start]
                    torch.log_softmax(seq_logits[start:stop], dim=-1, dtype=torch.float32, out=logprobs)
                    torch.gather(logprobs, 1, index[start:stop], out=picked[offset + start:offset + stop])
            top_ids.append(ids)
            tokens.append(input_ids[row, :lengths[row]])
            offset += n
        # One copy to the host: the top-k ids, the float32 log-probs' bits and the tokens, as one int32 tensor.
        flat = torch.cat([torch.cat(top_ids).to(torch.int32).flatten(), picked.view(torch.int32).flatten(),
                          torch.cat(tokens).to(torch.int32)]).cpu()
        return self._unpack(flat, chunk_ids, lengths, k)

    @staticmethod
    def _unpack(flat: torch.Tensor, chunk_ids: list[int], lengths: list[int], k: int) -> list[ChunkPredictions]:
        """`predict_step`'s packed host tensor back into one `ChunkPredictions` per sequence."""
        rows = [max(n - 1, 0) for n in lengths]
        total = sum(rows)
        ids = flat[:total * k].view(total, k).long()
        picked = flat[total * k:total * (2 * k + 1)].view(torch.float32).view(total, k + 1)
        tokens = flat[total * (2 * k + 1):].long()
        out, row, token = [], 0, 0
        for chunk_id, n, length in zip(chunk_ids, rows, lengths):
            seq = picked[row:row + n]
            out.append(ChunkPredictions(chunk_id=chunk_id, tokens=tokens[token:token + length].numpy(),
                                        topk_ids=ids[row:row + n].numpy(),
                                        topk_logprobs=seq[:, :k].contiguous().numpy(),
                                        token_ce=(-seq[:, k]).numpy()))
            row, token = row + n, token + length
        return out


class ShardWriter(BasePredictionWriter):
    """Collects a batch's predictions per shard and writes each shard as soon as it is whole."""

    def __init__(self, store: TeacherStore) -> None:
        super().__init__(write_interval="batch")
        self.store = store
        self.pending: dict[int, list[ChunkPredictions]] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        for chunk in prediction:
            shard = chunk.chunk_id // self.store.chunks_per_shard
            self.pending.setdefault(shard, []).append(chunk)
            if len(self.pending[shard]) == len(self.store.shard_chunks(shard)):
                self.store.write_shard(shard, sorted(self.pending.pop(shard), key=lambda c: c.chunk_id))


class FixedBatches(Sampler[list[int]]):
    """A precomputed list of batches (Lightning's predict loop wraps batch samplers and needs an object)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Collate:
    """Chunk rows → the teacher's padded sequences (a class, so DataLoader workers can pickle it)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict]) -> dict:
        seqs = sequence_ids(self.tokenizer, [r["text"] for r in rows], [r["ends_document"] for r in rows])
        width = max(len(s) for s in seqs)
        input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "lengths": torch.tensor([len(s) for s in seqs]),
                "chunk_ids": torch.tensor([r["id"] for r in rows])}


def teacher_identity(teacher: TeacherConfig, model_path: str, tokenizer, top_k: int, dtype: str,
                     chunk_info: dict, corpus_key: str, trust_remote_code: bool = False) -> dict:
    """Everything a teacher's shards depend on: the manifest's identity, and its folder's name."""
    rows = vocab_rows(model_path, trust_remote_code)
    if rows < len(tokenizer):
        raise FusionError(f"teacher {teacher.label!r}: the model has {rows} embedding rows but its tokenizer "
                          f"{len(tokenizer)} tokens; tokenizer and model do not belong together")
    return {
        "format": STORE_FORMAT,
        "teacher": {"model": model_fingerprint(model_path), "dtype": dtype, "quantization": teacher.quantization},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_rows": rows,
        "top_k": top_k,
        "dtypes": {"tokens": "uint16" if id_dtype(rows) == "uint16" else "uint32", "topk_ids": id_dtype(rows),
                   "topk_logprobs": "float16", "token_ce": "float16", "chunk_ce": "float32"},
        "chunking": {"fingerprint": chunk_info["fingerprint"], "block_size": chunk_info["block_size"],
                     "chunks": chunk_info["chunks"]},
        "corpus": corpus_key,
    }


def teacher_store(teacher: TeacherConfig, identity: dict, root: Path, n_chunks: int,
                  chunks_per_shard: int) -> TeacherStore:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in teacher.label)
    return TeacherStore(root / f"{slug}-{key}", identity, n_chunks, chunks_per_shard)


def extract(teacher: TeacherConfig, model_path: str, tokenizer_path: str, chunks, store: TeacherStore,
            trainer: pl.Trainer, batch_size: int, num_workers: int = 0, shards: list[int] | None = None) -> dict:
    """Compute the store's missing shards with ``trainer.predict``; returns the finalized manifest.

    ``chunks`` is the chunk set (a `datasets.Dataset`); ``trainer`` has a `ShardWriter` on ``store``
    among its callbacks (`fusion.trainer.build_predict_trainer`); ``shards`` limits the work to those
    shards (default: all).
    """
    if not any(isinstance(c, ShardWriter) and c.store is store for c in trainer.callbacks):
        raise ValueError("the trainer needs a ShardWriter(store) callback")
    store.open()
    unusable = store.unusable_shards(list(range(store.n_shards)) if shards is None else shards)
    missing = sorted(unusable)
    corrupt = [s for s, why in unusable.items() if why == "corrupt"]
    if corrupt and trainer.is_global_zero:
        print(f"[fusion] teacher {teacher.label}: shards {corrupt} fail their sha256 check: recomputing them")
    if not missing:
        return store.finalize()
    tokenizer = load_tokenizer(tokenizer_path, teacher.trust_remote_code)
    mine = missing[trainer.global_rank::trainer.world_size]
    batches = [list(shard_chunks[i:i + batch_size]) for shard in mine
               for shard_chunks in [store.shard_chunks(shard)] for i in range(0, len(shard_chunks), batch_size)]
    module = TeacherModule(model_path, store.identity["teacher"]["dtype"], teacher.quantization,
                           store.identity["top_k"], teacher.trust_remote_code, teacher.attn_implementation)
    loader = DataLoader(chunks, batch_sampler=FixedBatches(batches), collate_fn=_Collate(tokenizer),
                        num_workers=num_workers)
    if trainer.is_global_zero:
        print(f"[fusion] teacher {teacher.label}: {len(missing)} of {store.n_shards} shards to compute "
              f"-> {store.folder}")
    trainer.predict(module, dataloaders=loader, return_predictions=False)  # every rank, even with no batches
    trainer.strategy.barrier("representations")
    manifest = store.finalize() if trainer.is_global_zero else store.manifest()
    trainer.strategy.barrier("representations-manifest")
    if trainer.is_global_zero and manifest["bad_chunks"]:
        print(f"[fusion] teacher {teacher.label}: {len(manifest['bad_chunks'])} chunks gave NaN/inf outputs and "
              f"are excluded (ids {manifest['bad_chunks'][:10]}{' ...' if len(manifest['bad_chunks']) > 10 else ''})")
    return manifest


def shard_bytes_per_token(store: TeacherStore) -> float:
    """Bytes on disk per teacher token: the shard files only (sidecars and manifest are tiny)."""
    manifest = store.manifest()
    return manifest["bytes"] / max(manifest["tokens"], 1)

