"""Straightforward reference implementations: slow and obviously correct.

Tests check the fast code against them (`fusion.data.vocab`, `fusion.data.alignment`), and the
benchmarks time them as the baselines the fast code is compared with (`bench/`). They follow the
original FuseLLM code's approach: plain Python loops, one edit-distance call per pair.
"""

from __future__ import annotations

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
