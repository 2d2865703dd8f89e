"""Merge models from a mergekit-style YAML config into an HF folder.

    python -m fusion.merge merge.yaml OUT_FOLDER
    python -m fusion.merge merge.yaml OUT_FOLDER --shard-size 2GB

Peak memory is about one tensor per model: inputs are memory-mapped, the output is written as it is made. Bad
configs and paths exit with code 2 and one line that says what to fix.
"""

from __future__ import annotations

import argparse
import re
import sys

from fusion.errors import FusionError
from fusion.merge.config import load_merge_config
from fusion.merge.stream import SHARD_BYTES, run_merge

_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2GB or 500MiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion.merge", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("config", help="a mergekit-style YAML file")
    parser.add_argument("out", help="the output folder (replaced when it exists)")
    parser.add_argument("--shard-size", type=_bytes, default=SHARD_BYTES, help="bytes per output file (default 5GiB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        record = run_merge(load_merge_config(args.config), args.out, progress=not args.quiet,
                           shard_bytes=args.shard_size)
    except FusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    method = record["config"]["merge_method"]
    print(f"merged {record['tensors']} tensors ({record['bytes'] / 1e6:.1f} MB) with {method} in {record['seconds']} s "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
