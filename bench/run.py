"""The project's benchmarks: ``python bench/run.py [NAME ...]`` (all when no name is given).

Each benchmark prints one JSON object per figure: ``{"bench", "metric", "value", "unit"}``, plus
``"baseline"`` and ``"ratio"`` (= baseline / value) where a baseline is measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/run.py` from anywhere: import fusion and bench.*

BENCHMARKS = {  # name -> module with run() -> list[dict]
    "vocab_map": "bench.vocab_map",
    "alignment": "bench.alignment",
    "storage": "bench.storage",
    "fusion_step": "bench.fusion_step",
    "extraction": "bench.extraction",
    "merge": "bench.merge",
    "dpo_step": "bench.dpo_step",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    for name in args.names or list(BENCHMARKS):
        for figure in importlib.import_module(BENCHMARKS[name]).run():
            print(json.dumps(figure), flush=True)


if __name__ == "__main__":
    main()
