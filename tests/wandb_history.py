"""Read the logged history back from an offline W&B run folder (`run-ID.wandb`).

The file is a LevelDB-style log: after a 7-byte header (`:W&B`, version), 32 KiB blocks of
records, each with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last)
whose payloads are `wandb_internal_pb2.Record` protobufs.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024
_HEADER = 7


def wandb_history(wandb_folder: Path) -> list[dict]:
    """Every `history` record under `wandb_folder`, oldest first: a resumed run adds a run folder per process."""
    paths = sorted(Path(wandb_folder).glob("offline-run-*/run-*.wandb"))
    assert paths, f"no offline W&B run under {wandb_folder}"
    return [row for path in paths for row in _history(path)]


def _history(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.startswith(b":W&B"), f"{path} is not a W&B run file"
    payloads, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        pos += _HEADER
        if kind == 0:
            break
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            payloads.append(pending)
            pending = b""
    rows = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
