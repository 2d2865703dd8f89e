"""The representation store: one folder per teacher, holding its top-k next-token distributions.

Layout of a teacher folder::

    manifest.json          what was computed, from what (checked on every read), and the shard list
    shard-00000.npz        chunks [0, S), S = chunks_per_shard
    shard-00000.json       that shard's checksum and counts, written right after the shard
    ...

A shard is an uncompressed ``.npz`` of flat arrays over its chunks, in the teacher's own token space:

    chunk_ids       int64   [c]        the chunk ids (`fusion.data.chunks`)
    token_offsets   int64   [c + 1]    chunk i's tokens are tokens[token_offsets[i]:token_offsets[i + 1]]
    tokens          uint16 / uint32    the teacher's sequence: [start] + text tokens + [eos]
    topk_ids        uint16 [P, k] or uint8 [P, k, 3] (24-bit little-endian, vocabularies over 65,536)
    topk_logprobs   float16 [P, k]     log-softmax over the whole vocabulary, at temperature 1
    token_ce        float16 [P]        -log p(actual next token): the teacher's CE on its own tokens
    chunk_ce        float32 [c]        mean of token_ce over the chunk, computed in float32 (NaN if bad)
    bad             bool    [c]        the teacher produced NaN/inf on this chunk: never read

Chunk i has ``len - 1`` prediction rows (position t predicts token t+1), at rows
``token_offsets[i] - i`` onwards. At k = 10 and a vocabulary up to 65,536 that is 2 + 20 + 20 + 2 = 44
bytes per token (56 above 65,536, tokens then taking 4 bytes; `bytes_per_token`), against ~110 for
FuseLLM's int64 ids and Python-list Arrow rows.

Shards are read memory-mapped (`map_npz`): the arrays stay in the file, in their stored dtypes,
and only the rows of the chunks a batch needs are copied out, ids widened to int64 then
(`Shard.chunk`). A process checks a shard's sha256 the first time it reads that file version
(path, size, mtime), not on every read.

Writes are atomic (written aside, flushed to disk, then renamed), so a shard file is either complete
or absent; its ``.json`` sidecar is written after it, so a shard counts as done only when both exist
and the checksum matches.
"""

from __future__ import annotations

import json
import mmap
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion.data.cache import atomic_write, read_json, remove_dead_staging, sha256_file
from fusion.errors import FusionError

STORE_FORMAT = 1
# The manifest keys that must equal what a reader expects; named in the error when they do not.
IDENTITY_KEYS = ("format", "teacher", "tokenizer", "vocab_rows", "top_k", "dtypes", "chunking", "corpus")
_SHARD_ARRAYS = ("chunk_ids", "token_offsets", "tokens", "topk_ids", "topk_logprobs", "token_ce", "chunk_ce", "bad")


def id_dtype(vocab_rows: int) -> str:
    """Smallest storage for token ids below ``vocab_rows``: uint16, or 3 packed bytes."""
    return "uint16" if vocab_rows <= 1 << 16 else "uint24"


def bytes_per_token(top_k: int, ids: str = "uint16") -> int:
    """A shard's bytes per teacher token: token, top-k ids and log-probs, CE (the chunk arrays are per chunk)."""
    token_bytes, id_bytes = (2, 2) if ids == "uint16" else (4, 3)
    return token_bytes + top_k * (id_bytes + 2) + 2


def pack_ids(ids: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint16":
        return ids.astype(np.uint16)
    ids = ids.astype(np.uint32)
    return np.stack([(ids >> s) & 0xFF for s in (0, 8, 16)], axis=-1).astype(np.uint8)


def unpack_ids(packed: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint16":
        return packed.astype(np.int64)
    p = packed.astype(np.int64)
    return p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def map_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed ``.npz`` (``np.savez``) as read-only views of one memory map of the file.

    ``np.load`` cannot map the members of a zip, but ``np.savez`` stores them uncompressed, so each
    member's ``.npy`` bytes lie whole in the file: after its zip local header (30 bytes, the name and
    an extra field) and the ``.npy`` header. Nothing is read until used, and what is read is page
    cache, shared by every process that maps the file. Raises ValueError (or a zip/OS error) on a
    file that is not such an ``.npz``.
    """
    arrays = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays open while an array uses it
        for member in archive.infolist():
            if member.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"member {member.filename} is compressed")
            f.seek(member.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"member {member.filename} has no local header")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            f.seek(member.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(f)
            if version not in _NPY_HEADERS:
                raise ValueError(f"member {member.filename} has .npy version {version}")
            shape, fortran_order, dtype = _NPY_HEADERS[version](f)
            count, start = int(np.prod(shape)), f.tell()
            if dtype.hasobject or start + count * dtype.itemsize > len(mapped):
                raise ValueError(f"member {member.filename} is truncated or holds Python objects")
            array = np.frombuffer(mapped, dtype=dtype, count=count, offset=start)
            arrays[member.filename.removesuffix(".npy")] = array.reshape(shape, order="F" if fortran_order else "C")
    return arrays


# The advice for a damaged store: a re-run checks every shard it uses and recomputes the bad ones.
_RERUN = "run the same command again: the representations stage checks every shard and recomputes only the bad ones"
_MANIFEST_FIX = "delete it and run the same command again: the shards are checked and kept"

# Shard file versions whose sha256 this process checked (or wrote): each is hashed once, not on every
# read. DataLoader workers forked after a check inherit it.
_verified: set[tuple[str, int, int]] = set()


def _file_version(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


@dataclass
class ChunkPredictions:
    """One chunk's teacher outputs, as `fusion.data.representations` produces them."""

    chunk_id: int
    tokens: np.ndarray  # int64 [n]
    topk_ids: np.ndarray  # int64 [n - 1, k]
    topk_logprobs: np.ndarray  # float32 [n - 1, k]
    token_ce: np.ndarray  # float32 [n - 1]

    @property
    def bad(self) -> bool:
        return not (np.isfinite(self.topk_logprobs).all() and np.isfinite(self.token_ce).all())


@dataclass
class Shard:
    """A shard read back: memory-mapped arrays in their stored dtypes (see the module docstring).

    `chunk(i)` copies chunk i's rows out (i = position in the shard), ids widened to int64.
    """

    chunk_ids: np.ndarray
    token_offsets: np.ndarray
    tokens: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_ce: np.ndarray
    chunk_ce: np.ndarray
    bad: np.ndarray
    id_dtype: str

    def chunk(self, i: int) -> dict:
        """``tokens`` int64 [n], ``topk_ids`` int64 [n - 1, k], ``topk_logprobs`` float16 [n - 1, k],
        ``token_ce`` float16 [n - 1], ``chunk_ce`` and ``bad``: in-memory copies (~225 KB at n = 2048, k = 10)."""
        a, b = int(self.token_offsets[i]), int(self.token_offsets[i + 1])
        return {"tokens": self.tokens[a:b].astype(np.int64),
                "topk_ids": unpack_ids(self.topk_ids[a - i:b - i - 1], self.id_dtype),
                "topk_logprobs": np.array(self.topk_logprobs[a - i:b - i - 1]),
                "token_ce": np.array(self.token_ce[a - i:b - i - 1]),
                "chunk_ce": float(self.chunk_ce[i]), "bad": bool(self.bad[i])}


class TeacherStore:
    """A teacher's folder of shards; see the module docstring for the format."""

    def __init__(self, folder: Path, identity: dict, n_chunks: int, chunks_per_shard: int) -> None:
        self.folder, self.identity = Path(folder), identity
        self.n_chunks, self.chunks_per_shard = n_chunks, chunks_per_shard
        self.id_dtype = identity["dtypes"]["topk_ids"]
        self._manifest: dict | None = None  # read (and checked) on the first read_shard

    # -- layout --------------------------------------------------------------------------------
    @property
    def n_shards(self) -> int:
        return -(-self.n_chunks // self.chunks_per_shard)

    def shard_chunks(self, shard: int) -> range:
        return range(shard * self.chunks_per_shard, min((shard + 1) * self.chunks_per_shard, self.n_chunks))

    def shard_file(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.npz"

    def _sidecar(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.json"

    # -- manifest ------------------------------------------------------------------------------
    def open(self) -> None:
        """Create the folder and manifest, or check that an existing manifest describes the same work."""
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            self.check_identity(read_json(manifest, _MANIFEST_FIX))
            remove_dead_staging(self.folder)  # shards whose writer was killed midway
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        body = {**self.identity, "chunks": self.n_chunks, "chunks_per_shard": self.chunks_per_shard,
                "complete": False, "shards": {}}
        atomic_write(manifest, lambda f: f.write(json.dumps(body, indent=2).encode()))

    def check_identity(self, manifest: dict) -> None:
        for key in IDENTITY_KEYS:
            if manifest.get(key) != self.identity.get(key):
                raise FusionError(
                    f"{self.folder / 'manifest.json'}: these representations were computed with {key} = "
                    f"{json.dumps(manifest.get(key))}, but this run needs {json.dumps(self.identity.get(key))}; "
                    "point representations.dir elsewhere or delete that folder to recompute")
        layout = (manifest.get("chunks"), manifest.get("chunks_per_shard"))
        if layout != (self.n_chunks, self.chunks_per_shard):
            raise FusionError(f"{self.folder / 'manifest.json'}: {layout[0]} chunks in shards of {layout[1]}, but this "
                              f"run has {self.n_chunks} in shards of {self.chunks_per_shard}; delete the folder to "
                              "recompute")

    def manifest(self) -> dict:
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise FusionError(f"{path} is missing: the representations of this teacher were never computed here")
        manifest = read_json(path, _MANIFEST_FIX)
        self.check_identity(manifest)
        return manifest

    def finished_shards(self) -> dict[int, dict]:
        """Shards whose file and sidecar both exist (checksums are verified when read)."""
        done = {}
        for shard in range(self.n_shards):
            sidecar = self._sidecar(shard)
            if sidecar.is_file() and self.shard_file(shard).is_file():
                done[shard] = read_json(sidecar, f"delete it and {self.shard_file(shard).name}, and re-run: only "
                                                 "that shard is recomputed")
        return done

    def unusable_shards(self, shards: list[int]) -> dict[int, str]:
        """Of ``shards``, those that must be computed: ``{shard: "missing" | "corrupt"}``.

        Every finished one is checked against its sha256 (once per process and file version), so a
        damaged shard is found here, before training, and recomputed like a missing one.
        """
        done, unusable = self.finished_shards(), {}
        for shard in shards:
            if shard not in done:
                unusable[shard] = "missing"
            elif not self._intact(shard, done[shard]):
                unusable[shard] = "corrupt"
        return unusable

    def _intact(self, shard: int, info: dict) -> bool:
        path = self.shard_file(shard)
        version = _file_version(path)
        if version not in _verified:
            if sha256_file(path) != info.get("sha256"):
                return False
            _verified.add(version)
        return True

    def finalize(self) -> dict:
        """Record every shard's sidecar in the manifest; ``complete`` when none is missing."""
        manifest = self.manifest()
        done = self.finished_shards()
        manifest["shards"] = {f"{s:05d}": info for s, info in sorted(done.items())}
        manifest["complete"] = len(done) == self.n_shards
        manifest["tokens"] = sum(info["tokens"] for info in done.values())
        manifest["bad_chunks"] = sorted(c for info in done.values() for c in info["bad_chunk_ids"])
        manifest["bytes"] = sum(self.shard_file(s).stat().st_size for s in done)
        atomic_write(self.folder / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        return manifest

    # -- shards --------------------------------------------------------------------------------
    def write_shard(self, shard: int, chunks: list[ChunkPredictions]) -> dict:
        """Write one shard atomically, then its sidecar. ``chunks`` must be the shard's chunks, in order."""
        expected = list(self.shard_chunks(shard))
        if [c.chunk_id for c in chunks] != expected:
            raise ValueError(f"shard {shard} needs chunks {expected[0]}..{expected[-1]} in order")
        bad = np.array([c.bad for c in chunks], dtype=bool)
        lengths = np.array([len(c.tokens) for c in chunks], dtype=np.int64)
        ce = np.array([np.float32(c.token_ce.astype(np.float64).mean()) if not b else np.nan
                       for c, b in zip(chunks, bad)], dtype=np.float32)
        token_dtype = np.uint16 if self.id_dtype == "uint16" else np.uint32
        arrays = {
            "chunk_ids": np.array(expected, dtype=np.int64),
            "token_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "tokens": np.concatenate([c.tokens for c in chunks]).astype(token_dtype),
            "topk_ids": pack_ids(np.concatenate([c.topk_ids for c in chunks]), self.id_dtype),
            "topk_logprobs": np.concatenate([c.topk_logprobs for c in chunks]).astype(np.float16),
            "token_ce": np.concatenate([c.token_ce for c in chunks]).astype(np.float16),
            "chunk_ce": ce,
            "bad": bad,
        }
        path = self.shard_file(shard)
        atomic_write(path, lambda f: np.savez(f, **arrays))
        info = {"file": path.name, "sha256": sha256_file(path), "chunks": len(chunks), "tokens": int(lengths.sum()),
                "bad_chunk_ids": [int(c.chunk_id) for c, b in zip(chunks, bad) if b]}
        _verified.add(_file_version(path))  # hashed just now: the alignment stage need not hash it again
        atomic_write(self._sidecar(shard), lambda f: f.write(json.dumps(info).encode()))
        return info

    def verify_shard(self, shard: int) -> None:
        """Check the shard's sha256 against its sidecar (written with it), once per process and file version:
        hashing reads the whole file (~90 MB per shard of the 7B recipe)."""
        path, sidecar = self.shard_file(shard), self._sidecar(shard)
        if not (path.is_file() and sidecar.is_file()):
            raise FusionError(f"{path} is missing or unfinished; {_RERUN}")
        if self._manifest is None:
            self._manifest = self.manifest()
        if not self._intact(shard, read_json(sidecar, _RERUN)):
            raise FusionError(f"{path} is corrupted (its sha256 differs from {sidecar.name}'s); {_RERUN}")

    def read_shard(self, shard: int, verify: bool = True) -> Shard:
        """Shard ``shard``, memory-mapped; its checksum verified first (`verify_shard`) unless ``verify`` is False."""
        path = self.shard_file(shard)
        if verify:
            self.verify_shard(shard)
        try:
            arrays = map_npz(path)
            return Shard(**{name: arrays[name] for name in _SHARD_ARRAYS}, id_dtype=self.id_dtype)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise FusionError(f"{path} cannot be read ({err}); {_RERUN}") from None
