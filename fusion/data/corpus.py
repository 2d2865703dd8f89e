"""Text sources: the embedded corpus built from Python's standard library, HF datasets, local files.

The embedded corpus needs no download: every machine with Python has the standard library.
It has two domains, so that models can be good at one and bad at the other:

- ``code``: the library's modules with their docstrings removed (``ast.unparse``, so comments
  and formatting are normalised too);
- ``prose``: the docstrings themselves, one document per module, in English.

Each document goes to the ``train``, ``validation`` or ``test`` split by a hash of its module
path, so the split is the same on every machine with the same Python version.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from functools import lru_cache
from pathlib import Path

from fusion.errors import FusionError

DOMAINS = ("code", "prose")
SPLITS = ("train", "validation", "test")

# Folders of generated tables, Python-2 fixtures and bundled third-party code: not natural text.
_SKIPPED_DIRS = {
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
    "ensurepip", "encodings", "pydoc_data", "__pycache__", "config-3.11-x86_64-linux-gnu",
}
# Docstrings shorter than this are mostly "Return x." one-liners with little English in them.
_MIN_DOCSTRING_CHARS = 80


def _split_of(name: str) -> str:
    """90 / 5 / 5 split by a stable hash of the module path."""
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 20
    return "validation" if bucket == 0 else "test" if bucket == 1 else "train"


def _docstring_nodes(tree: ast.Module) -> list[ast.AST]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [n for n in ast.walk(tree) if isinstance(n, kinds)]


def _split_module(source: str) -> tuple[str, str] | None:
    """(code without docstrings, the docstrings joined) of one module, or None if it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    docs = []
    for node in _docstring_nodes(tree):
        doc = ast.get_docstring(node, clean=True)
        if doc is None:
            continue
        if len(doc) >= _MIN_DOCSTRING_CHARS:
            docs.append(doc)
        node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree), "\n\n".join(docs)


def stdlib_sources() -> list[tuple[str, Path]]:
    """``(path relative to the library, path)`` of every standard-library source the corpus reads, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not _SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    return [(path.relative_to(root).as_posix(), path) for path in files]


@lru_cache(maxsize=1)
def embedded_documents() -> tuple[dict, ...]:
    """Every document of the embedded corpus: ``{"id", "domain", "split", "text"}``, in a fixed order.

    About 5 MB of code and 1.5 MB of prose on CPython 3.11; built in about 8 seconds.
    """
    documents = []
    for name, path in stdlib_sources():
        parts = _split_module(path.read_text(encoding="utf-8", errors="replace"))
        if parts is None:
            continue
        split = _split_of(name)
        for domain, text in zip(DOMAINS, parts):
            if text.strip():
                documents.append({"id": f"{domain}:{name}", "domain": domain, "split": split, "text": text})
    if not documents:
        root = sysconfig.get_paths()["stdlib"]
        raise FusionError(f"the embedded corpus is empty: no Python sources found under {root}")
    return tuple(documents)


def embedded_corpus(split: str, domains: tuple[str, ...] = DOMAINS) -> list[dict]:
    """The documents of one split, optionally of some domains only."""
    return [d for d in embedded_documents() if d["split"] == split and d["domain"] in domains]


def corpus_fingerprint(documents: list[dict]) -> str:
    """A short content hash of a list of documents, for cache keys and manifests."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(json.dumps(doc, sort_keys=True).encode())
    return digest.hexdigest()[:16]
