"""Straightforward reference implementations: slow and obviously correct.

Tests check the fast code against them (`fusion.data.vocab`, `fusion.data.alignment`), and the
benchmarks time them as the baselines the fast code is compared with (`bench/`). They follow the
original FuseLLM code's approach: plain Python loops, one edit-distance call per pair.
"""

from __future__ import annotations

import multiprocessing
import os

from rapidfuzz.distance import Levenshtein


def levenshtein(a: str, b: str) -> int:
    """Textbook dynamic programme in pure Python, one row at a time."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


_TARGET: list[str] = []  # the MinED workers' copy of the target strings, set once per worker


def _keep_target(target: list[str]) -> None:
    global _TARGET
    _TARGET = target


def _nearest(token: str) -> int:
    """The index of the first target string at the minimum edit distance from ``token``."""
    distances = [Levenshtein.distance(token, y) for y in _TARGET]  # one compiled call per pair
    return distances.index(min(distances))


def mined_vocab_map(teacher: list[str], target: list[str], processes: int | None = None) -> list[int]:
    """FuseLLM's MinED vocabulary map (``vocab_mapping.py``): for each teacher string, the index of the same
    string in ``target`` (a dict look-up), else of the first target string at the minimum Levenshtein
    distance, searched over the whole target list with one compiled distance call per pair (FuseLLM
    called the C ``editdistance``) in a ``multiprocessing.Pool`` of ``processes`` workers (all cores
    when None; FuseLLM hard-coded 64). Ties go to the lowest index.

    The workers are forked, as FuseLLM's were on Linux: they inherit the target list instead of
    unpickling it, and they are this process's children, so their CPU time shows in
    ``resource.getrusage(RUSAGE_CHILDREN)`` once the Pool is closed.
    """
    first: dict[str, int] = {}
    for j, y in enumerate(target):
        first.setdefault(y, j)
    ids = [first.get(x) for x in teacher]
    todo = [i for i, j in enumerate(ids) if j is None]
    fork = multiprocessing.get_context("fork")
    with fork.Pool(processes or os.cpu_count(), initializer=_keep_target, initargs=(target,)) as pool:
        for i, j in zip(todo, pool.map(_nearest, [teacher[i] for i in todo])):
            ids[i] = j
    return ids


def dtw_path(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """FuseLLM-style DTW between two token-string sequences, in order from (0, 0) to the last cell.

    The full ``len(a) x len(b)`` matrix, one Levenshtein call per cell (compiled, as the original's
    ``editdistance``), Python loops; the backtrack prefers diagonal, then up, then left on ties.
    """
    n, m = len(a), len(b)
    inf = float("inf")
    d: list[list[float]] = []
    for i in range(n):
        row = [0.0] * m
        for j in range(m):
            cost = Levenshtein.distance(a[i], b[j])
            if i == 0:
                row[j] = cost if j == 0 else cost + row[j - 1]
            elif j == 0:
                row[j] = cost + d[i - 1][j]
            else:
                row[j] = cost + min(d[i - 1][j - 1], d[i - 1][j], row[j - 1])
        d.append(row)
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        options = (d[i - 1][j - 1] if i and j else inf, d[i - 1][j] if i else inf, d[i][j - 1] if j else inf)
        move = min(range(3), key=options.__getitem__)  # the first minimum: diagonal, up, left
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
        path.append((i, j))
    return path[::-1]


def one_to_one(path: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pairs of a path whose row and column each appear once: the alignments FuseLLM accepts."""
    rows: dict[int, int] = {}
    cols: dict[int, int] = {}
    for i, j in path:
        rows[i] = rows.get(i, 0) + 1
        cols[j] = cols.get(j, 0) + 1
    return [(i, j) for i, j in path if rows[i] == 1 and cols[j] == 1]
