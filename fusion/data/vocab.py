"""Vocabulary mapping teacher -> target: for each teacher token id, the target token id it stands for.

Fusion compares a teacher's next-token distribution with the target's, but the two tokenizers disagree
about what a token is. FuseLLM's "MinED" answer: map every teacher token to the target token whose text
is the same, or else the one at the minimum edit distance (Levenshtein) from it. The result is one int
array, ``map[teacher_id] -> target_id``, used to move teacher probabilities onto target ids.

Token strings are first brought to one canonical form, the real text they stand for:

- byte-level BPE (GPT-2: ``ByteLevel`` pre-tokenizer/decoder): every char is one byte under GPT-2's
  byte-to-unicode table (``Ġ`` = space, ``Ċ`` = newline), decoded back to those bytes;
- SentencePiece style (``Metaspace``): the replacement char ``▁`` is a space;
- byte fallback (``<0x0A>``, when the model has ``byte_fallback``): that single byte;
- added tokens: their content as is (it is raw text already).

The bytes are then decoded as UTF-8 with ``surrogateescape``: valid UTF-8 becomes ordinary characters, a
byte that is not part of a complete character (half of an ``é``, a lone ``<0xC3>``) becomes the lone
surrogate ``U+DC80 + byte - 0x80``. So ``Ċ`` and ``<0x0A>`` are both ``"\\n"``, ``Ġthe`` and ``▁the`` are
both ``" the"``, and partial bytes stay comparable across tokenizers (``Ã`` in GPT-2 = ``<0xC3>``).

When several target tokens have the teacher token's text (Llama-style vocabs hold both ``"\n"`` and
``<0x0A>``), the one of the same kind (byte-fallback token or text piece) wins, then the lowest id.

Ties at the minimum edit distance (MinED rows only; most have several candidates) are broken, in order:

1. the token the target's own tokenizer emits first for the teacher's text, if it is tied: the text's
   first pre-token (the target's pre-tokenizer, without the ``▁`` that a Metaspace pre-tokenizer
   prepends to a text's start unless the text starts with a space) through the target's model, so
   ``'s`` -> ``'``, `` 1`` -> ``▁``, ``\n    `` -> ``\n``, and a character the target has no piece
   for -> the byte token its byte fallback starts it with (``字`` -> ``<0xE5>``): what the target
   really predicts there;
2. an ordinary piece over a byte-fallback token ``<0xNN>``: the target never emits ``<0xNN>`` for text
   it has a piece for, and a teacher token whose text *is* that byte is an exact match, decided
   above; a byte token is still chosen when no ordinary piece is at the minimum distance;
3. the longest common prefix (in characters) with the teacher's text;
4. the lowest id.

So a character the target has no piece for (CJK in a Latin target: distance 1 from every one-character
token) goes to the byte its byte fallback emits first, not to ``<0x00>`` (nor to a frequent piece).

Special tokens (bos/eos/unk/pad) map to the target's token of the same role (eos first: GPT-2's
``<|endoftext|>`` is bos, eos, unk and pad at once and is mostly used as eos); they never take part in
the edit-distance search, and target special tokens are never a MinED candidate for ordinary tokens.

Embedding rows beyond ``len(teacher_tokenizer)`` (NeoX / Qwen pad ``vocab_size`` to a multiple of 64)
are never produced by the tokenizer; they map to the target's **unk** token (its eos if it has no unk)
and get ``distance = -1``.

Cost: exact matches are a dict look-up; the rest is ``rapidfuzz.process.cdist`` in row chunks (C++,
bit-parallel, all cores): a 50 k x 32 k map is ~1.6 G pairs, seconds on two cores. Ties are broken with
numpy over the tied (row, candidate) pairs only, and the target tokenizer runs once per row that has
tied ordinary pieces. The result is cached in an ``.npz`` keyed by both tokenizers' content and
``VOCAB_MAP_VERSION``, so later calls cost a file read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from fusion.data.cache import atomic_write
from fusion.errors import FusionError

VOCAB_MAP_VERSION = "4"  # bump when the mapping rules change: part of the cache key (2: MinED ties; 3-4: prefix)
SPECIAL_ROLES = ("eos", "bos", "unk", "pad")  # priority order when one token has several roles
_CHUNK = 512  # teacher rows per cdist call: 512 x 50 k uint8 = 25 MB at most
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SURROGATE = re.compile("[\udc80-\udcff]")  # a canonical string's partial UTF-8 bytes
_ID_BITS = 24  # tie-break key: candidate position in the low bits (vocabs < 16 M), then prefix length
_LCP_CAP = (1 << 16) - 1
_FAR = 255  # MinED distances are computed as uint8 up to 254; rows with nothing nearer are redone in int32


@dataclass
class VocabMap:
    """The teacher -> target map and how each entry was found; all arrays have ``teacher_rows`` entries.

    - ``ids``: int64, the target id of each teacher embedding row;
    - ``exact``: bool, the canonical strings are equal (or a special token mapped by role);
    - ``distance``: int32, Levenshtein distance in characters of the canonical forms (0 when exact,
      -1 for rows beyond the tokenizer, which have no string);
    - ``special``: bool, mapped by special-token role;
    - ``n_tokens``: ``len(teacher_tokenizer)``; rows ``n_tokens:`` are padding rows;
    - ``first``: int64, the target token that the target's tokenizer emits first for the teacher token's
      text (in the middle of a text), what the ``prefix`` alignment projects a teacher's candidate onto
      (`fusion.data.alignment`): `` theory`` -> `` the`` when the target spells it `` the|ory``. Text
      the target's tokenizer cannot be run on (partial UTF-8 bytes) takes the longest target token
      that spells a prefix of it, else ``ids``; special and padding rows are as in ``ids``;
    - ``cont_offsets`` (int64, ``teacher_rows + 1``), ``cont_first`` and ``cont_read`` (int64): for the
      ``prefix`` alignment at a target boundary inside a teacher token, where the text already holds
      ``k`` bytes of the teacher's next token (1 <= k < its length). Entry ``cont_offsets[c] + k - 1``
      is for candidate ``c`` with ``k`` bytes read: ``cont_first``, the target token its tokenizer emits
      first for the rest of ``c``'s bytes (as ``first``; -1 if none), and ``cont_read``, a number for
      ``c``'s first ``k`` bytes (equal numbers, equal bytes: a candidate fits the text when its number
      equals that of the teacher's actual token). Special and padding rows have no entries.
    """

    ids: np.ndarray
    exact: np.ndarray
    distance: np.ndarray
    special: np.ndarray
    n_tokens: int
    first: np.ndarray
    cont_offsets: np.ndarray
    cont_first: np.ndarray
    cont_read: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def stats(self) -> dict:
        """Counts of exact / role / MinED / padding entries and the mean distance of the MinED ones."""
        rows = np.arange(len(self.ids))
        mined = ~self.exact & (rows < self.n_tokens)
        return {
            "rows": len(self.ids),
            "exact": int((self.exact & ~self.special).sum()),
            "special": int(self.special.sum()),
            "mined": int(mined.sum()),
            "padding": int(len(self.ids) - self.n_tokens),
            "mean_distance": float(self.distance[mined].mean()) if mined.any() else 0.0,
        }


# ----------------------------------------------------------------------------------------------------
# canonical token strings


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable char -> the byte it stands for (256 entries).

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, 0x7F-0xA0, 0xAD) are
    moved to U+0100 onwards in byte order, so space is ``Ġ`` (U+0120) and newline ``Ċ`` (U+010A).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    moved = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + i): b for i, b in enumerate(moved)})
    return table


_BYTE_DECODER = _byte_decoder()


def _components(node) -> list[dict]:
    """A pre-tokenizer / decoder spec (or None) flattened: Sequence entries in order."""
    if not node:
        return []
    inner = node.get("pretokenizers") or node.get("decoders")
    if node.get("type") == "Sequence" and inner:
        return [c for n in inner for c in _components(n)]
    return [node]


def tokenizer_family(tokenizer) -> tuple[str, str | None, bool]:
    """``(family, space_marker, byte_fallback)`` read from a fast tokenizer's backend spec.

    ``family`` is ``"byte-level"`` (a ByteLevel pre-tokenizer or decoder), ``"metaspace"`` (Metaspace, or a
    decoder that replaces a marker with a space), or ``"plain"``; ``space_marker`` is the metaspace char.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise FusionError(f"{type(tokenizer).__name__} has no backend_tokenizer: vocabulary mapping needs a "
                          "fast (Rust) tokenizer; load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    spec = json.loads(backend.to_str())
    parts = _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    for part in parts:
        if part.get("type") == "ByteLevel":
            return "byte-level", None, byte_fallback
    for part in parts:
        if part.get("type") == "Metaspace":
            return "metaspace", part.get("replacement", "▁"), byte_fallback
        if part.get("type") == "Replace" and part.get("content") == " ":
            pattern = part.get("pattern", {}).get("String")
            if pattern and len(pattern) == 1:
                return "metaspace", pattern, byte_fallback
    return "plain", None, byte_fallback


def canonical_tokens(tokenizer) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The canonical string of every id ``0..len(tokenizer)-1``, a bool mask of the special tokens and
    one of the byte-fallback tokens (``<0xNN>``).

    Canonical = the token's real text as UTF-8 bytes decoded with ``surrogateescape`` (see the module
    docstring). Special tokens keep their content; callers map them by role instead.
    """
    family, marker, byte_fallback = tokenizer_family(tokenizer)
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = tokenizer.added_tokens_decoder  # id -> AddedToken: content is raw text, not byte-level coded
    special = np.zeros(n, dtype=bool)
    byte = np.zeros(n, dtype=bool)
    special_ids = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    out = []
    for i, piece in enumerate(pieces):
        if piece is None:
            raise FusionError(f"tokenizer id {i} has no token although len(tokenizer) = {n}: its ids have holes")
        if i in special_ids and i < n:
            special[i] = True
        if i in added:
            data = added[i].content.encode()
        elif byte_fallback and (m := _BYTE_TOKEN.fullmatch(piece)):
            data = bytes([int(m.group(1), 16)])
            byte[i] = True
        elif family == "byte-level":
            data = b"".join(bytes([_BYTE_DECODER[c]]) if c in _BYTE_DECODER else c.encode() for c in piece)
        elif family == "metaspace":
            data = piece.replace(marker, " ").encode()
        else:
            data = piece.encode()
        out.append(data.decode("utf-8", errors="surrogateescape"))
    return out, special, byte


def _role_ids(tokenizer) -> dict[str, int]:
    """Special-token role -> id, for the roles of SPECIAL_ROLES that the tokenizer has."""
    roles = {}
    for role in SPECIAL_ROLES:
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None and 0 <= token_id < len(tokenizer):
            roles[role] = int(token_id)
    return roles


# ----------------------------------------------------------------------------------------------------
# the map


def compute_vocab_map(teacher_tokenizer, target_tokenizer, teacher_rows: int | None = None) -> VocabMap:
    """Build the map (no cache); ``teacher_rows`` = the teacher model's embedding rows (config vocab_size),
    ``len(teacher_tokenizer)`` when None."""
    n_teacher = len(teacher_tokenizer)
    rows = n_teacher if teacher_rows is None else int(teacher_rows)
    if rows < n_teacher:
        raise FusionError(f"the teacher model has {rows} embedding rows but its tokenizer {n_teacher} tokens: "
                          "tokenizer and model do not belong together")
    teacher, teacher_special, teacher_byte = canonical_tokens(teacher_tokenizer)
    target, target_special, target_byte = canonical_tokens(target_tokenizer)
    target_roles = _role_ids(target_tokenizer)
    if not target_roles:
        raise FusionError("the target tokenizer has none of the bos/eos/unk/pad tokens to map padding rows to")

    ids = np.zeros(rows, dtype=np.int64)
    exact = np.zeros(rows, dtype=bool)
    special = np.zeros(rows, dtype=bool)
    distance = np.zeros(rows, dtype=np.int32)

    # Rows without a token: the target's unk (else its eos, else any role it has).
    padding_id = target_roles.get("unk", target_roles.get("eos", next(iter(target_roles.values()))))
    ids[n_teacher:] = padding_id
    distance[n_teacher:] = -1

    # Special tokens by role, the first role (in SPECIAL_ROLES order) that the target also has.
    teacher_roles = _role_ids(teacher_tokenizer)
    for role in SPECIAL_ROLES:
        tid = teacher_roles.get(role)
        if tid is not None and role in target_roles and not special[tid]:
            ids[tid], exact[tid], special[tid] = target_roles[role], True, True

    # Candidates: the target's ordinary tokens in id order (first-seen exact matches pick the lowest id;
    # MinED ties are broken by _TieBreak).
    candidates = np.flatnonzero(~target_special)
    # Exact matches: a target may spell one text twice, e.g. "\n" as a merged piece and as <0x0A>. The
    # piece of the same kind wins (byte token for byte token, text for text: identical tokenizers give the
    # identity, and a text token maps to the piece the target tokenizer really emits), then the lowest id.
    lookup: dict[tuple[str, bool], int] = {}
    for j in candidates:
        lookup.setdefault((target[j], bool(target_byte[j])), int(j))

    todo = []
    for i in range(n_teacher):
        if special[i]:
            continue
        same = lookup.get((teacher[i], bool(teacher_byte[i])))
        j = same if same is not None else lookup.get((teacher[i], not teacher_byte[i]))
        if not teacher_special[i] and j is not None:
            ids[i], exact[i] = j, True
        else:  # also teacher special tokens without a role the target has: nearest ordinary target token
            todo.append(i)

    choices = [target[j] for j in candidates]
    ties = _TieBreak(teacher, choices, target_byte[candidates], candidates, target_tokenizer) if todo else None
    for start in range(0, len(todo), _CHUNK):
        rows_i = todo[start:start + _CHUNK]
        texts = [teacher[i] for i in rows_i]
        # uint8 distances (a quarter of the memory traffic); beyond the cut-off rapidfuzz writes _FAR
        d = process.cdist(texts, choices, scorer=Levenshtein.distance, dtype=np.uint8, score_cutoff=_FAR - 1,
                          workers=-1)
        best, low = ties(rows_i, d)
        far = np.flatnonzero(low >= _FAR)  # every candidate beyond the cut-off: exact distances, int32
        if far.size:
            d = process.cdist([texts[k] for k in far], choices, scorer=Levenshtein.distance, dtype=np.int32,
                              workers=-1)
            best[far], low[far] = ties([rows_i[k] for k in far], d)
        ids[rows_i] = candidates[best]
        distance[rows_i] = low
    exact[:n_teacher] |= (distance[:n_teacher] == 0) & ~special[:n_teacher]
    first_token = _FirstToken(target_tokenizer)
    first = _first_tokens(teacher, special, ids, lookup, first_token)
    cont_offsets, cont_first, cont_read = _continuations(teacher, special, rows, lookup, first_token)
    return VocabMap(ids=ids, exact=exact, distance=distance, special=special, n_tokens=n_teacher, first=first,
                    cont_offsets=cont_offsets, cont_first=cont_first, cont_read=cont_read)


def _longest_known_prefix(text: str, lookup: dict[tuple[str, bool], int]) -> int:
    """The longest ordinary target token (``lookup``: by string and kind) that ``text`` starts with, or -1."""
    for end in range(len(text), 0, -1):
        token = lookup.get((text[:end], False), lookup.get((text[:end], True), -1))
        if token >= 0:
            return token
    return -1


def _first_tokens(teacher: list[str], special: np.ndarray, ids: np.ndarray, lookup: dict[tuple[str, bool], int],
                  first_token: _FirstToken) -> np.ndarray:
    """`VocabMap.first`: ``first_token`` of each ordinary teacher string, else the longest target string
    (``lookup``: ordinary target tokens by string and kind) it starts with, else the ``ids`` entry."""
    first = ids.copy()
    for i, text in enumerate(teacher):
        if special[i]:
            continue
        token = first_token(text)
        if token < 0:  # partial bytes, say: the longest target token the text starts with
            token = _longest_known_prefix(text, lookup)
        if token >= 0:
            first[i] = token
    return first


def _continuations(teacher: list[str], special: np.ndarray, rows: int, lookup: dict[tuple[str, bool], int],
                   first_token: _FirstToken) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`VocabMap`'s ``cont_offsets``, ``cont_first``, ``cont_read``: one entry per (ordinary token, bytes
    read); the remainders' first target tokens are computed once per distinct remainder."""
    counts = np.zeros(rows, dtype=np.int64)
    firsts: list[int] = []
    reads: list[int] = []
    read_ids: dict[bytes, int] = {}
    rest_first: dict[str, int] = {}
    for i, text in enumerate(teacher):
        spelled = text.encode("utf-8", "surrogateescape")
        if special[i] or len(spelled) < 2:
            continue
        counts[i] = len(spelled) - 1
        for k in range(1, len(spelled)):
            rest = spelled[k:].decode("utf-8", "surrogateescape")
            token = rest_first.get(rest)
            if token is None:
                token = first_token(rest)
                rest_first[rest] = token if token >= 0 else _longest_known_prefix(rest, lookup)
                token = rest_first[rest]
            firsts.append(token)
            reads.append(read_ids.setdefault(spelled[:k], len(read_ids)))
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, np.array(firsts, dtype=np.int64), np.array(reads, dtype=np.int64)


def _code_points(strings: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All strings' code points in one flat uint32 array, with each string's offset and length in it."""
    lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
    offsets = np.zeros(len(strings), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    flat = np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return flat, offsets, lengths


class _FirstToken:
    """The id of the first token the target's tokenizer emits for a text in the middle of a text: the
    text's first pre-token (the target's pre-tokenizer, without the ``▁`` that a Metaspace pre-tokenizer
    prepends to a text's start unless the text starts with a space) through the target's model; -1 for
    an empty text, partial UTF-8 bytes (a canonical string with surrogates: the tokenizers take text)
    or a pre-tokenizer or model this cannot drive."""

    def __init__(self, target_tokenizer):
        backend = target_tokenizer.backend_tokenizer
        self.pre_tokenizer, self.model = backend.pre_tokenizer, backend.model
        family, self.marker, _ = tokenizer_family(target_tokenizer)
        if self.pre_tokenizer is None and family == "metaspace":  # e.g. Llama-2's: the normalizer does it
            self.space = self.marker
        else:
            self.space = None

    def __call__(self, text: str) -> int:
        if not text or _SURROGATE.search(text):
            return -1
        try:
            if self.pre_tokenizer is not None:
                words = self.pre_tokenizer.pre_tokenize_str(text)
                word = words[0][0] if words else ""
                if self.marker and not text.startswith(" ") and word.startswith(self.marker):
                    word = word[1:] or (words[1][0] if len(words) > 1 else "")
            else:
                word = text.replace(" ", self.space) if self.space else text
            tokens = self.model.tokenize(word) if word else []
        except Exception:  # an exotic pre-tokenizer or model: no answer, the caller's fallback decides
            return -1
        return int(tokens[0].id) if tokens else -1


class _TieBreak:
    """Picks, for each row of a chunk of teacher-by-candidate distances, the tied candidate that the
    module docstring's order prefers: (target's first token and ordinary, ordinary, longest common
    prefix, lowest id), as one int64 key per tied (row, candidate) pair, maximised per row."""

    def __init__(self, teacher: list[str], choices: list[str], choice_byte: np.ndarray, candidates: np.ndarray,
                 target_tokenizer):
        if len(candidates) >= 1 << _ID_BITS:
            raise FusionError(f"a target vocabulary of {len(candidates)} tokens is too large for the MinED tie-break")
        self.teacher = teacher
        self.ordinary = ~choice_byte
        self.position = np.full(int(candidates.max()) + 1 if len(candidates) else 0, -1, dtype=np.int64)
        self.position[candidates] = np.arange(len(candidates))
        self.teacher_codes = _code_points(teacher)
        self.choice_codes = _code_points(choices)
        self.first_token = _FirstToken(target_tokenizer)

    def first_piece(self, text: str) -> int:
        """The candidate position of `_FirstToken`'s token for ``text``; -1 when there is none or it is no
        candidate."""
        token = self.first_token(text)
        return int(self.position[token]) if 0 <= token < len(self.position) else -1

    def _common_prefix(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Length of the common prefix of teacher string ``rows[k]`` and candidate ``cols[k]``, capped."""
        t_flat, t_off, t_len = self.teacher_codes
        c_flat, c_off, c_len = self.choice_codes
        lcp = np.zeros(len(rows), dtype=np.int64)
        alive = np.flatnonzero(np.minimum(t_len[rows], c_len[cols]) > 0)
        k = 0
        while alive.size and k < _LCP_CAP:  # pairs drop out at their first difference: a few passes
            r, c = rows[alive], cols[alive]
            alive = alive[t_flat[t_off[r] + k] == c_flat[c_off[c] + k]]
            lcp[alive] += 1
            k += 1
            alive = alive[np.minimum(t_len[rows[alive]], c_len[cols[alive]]) > k]
        return lcp

    def __call__(self, rows_i: list[int], d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(chosen candidate position, minimum distance)`` of each row of ``d``, the distances of teacher
        rows ``rows_i`` to every candidate."""
        low = d.min(axis=1)
        flat = np.flatnonzero(d == low[:, None])  # every tied (row, candidate) pair, row-major: id order
        r, cols = np.divmod(flat, d.shape[1])
        starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])  # one run per row, rows in order
        best = cols[starts]  # the lowest id: right where the minimum is unique
        many = (np.diff(np.r_[starts, len(r)]) > 1)[r]
        if many.any():
            r, cols = r[many], cols[many]
            ordinary = self.ordinary[cols]
            teacher_rows = np.asarray(rows_i, dtype=np.int64)
            # The target's own first token, of any kind: a byte token only if the target emits it here.
            first = np.full(len(d), -1, dtype=np.int64)
            for k in np.unique(r):
                first[k] = self.first_piece(self.teacher[teacher_rows[k]])
            lcp = np.minimum(self._common_prefix(teacher_rows[r], cols), _LCP_CAP)
            key = ((cols == first[r]).astype(np.int64) << (_ID_BITS + 17)
                   | ordinary.astype(np.int64) << (_ID_BITS + 16)
                   | lcp << _ID_BITS
                   | ((1 << _ID_BITS) - 1 - cols))
            starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
            top = np.maximum.reduceat(key, starts)
            best[r[starts]] = (1 << _ID_BITS) - 1 - (top & ((1 << _ID_BITS) - 1))
        return best, low.astype(np.int32)


def vocab_map_key(teacher_tokenizer, target_tokenizer, teacher_rows: int) -> str:
    """A hex digest of everything the map depends on: both tokenizers' specs and special tokens, the rows."""
    digest = hashlib.sha256(f"vocab-map v{VOCAB_MAP_VERSION} rows={teacher_rows}\n".encode())
    for tok in (teacher_tokenizer, target_tokenizer):
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise FusionError(f"{type(tok).__name__} has no backend_tokenizer: vocab mapping needs a fast tokenizer")
        digest.update(backend.to_str().encode())
        digest.update(json.dumps(_role_ids(tok), sort_keys=True).encode())
        digest.update(json.dumps(sorted(tok.all_special_ids)).encode())
    return digest.hexdigest()[:24]


def build_vocab_map(teacher_tokenizer, target_tokenizer, teacher_rows: int | None = None,
                    cache_dir: str | Path | None = None) -> VocabMap:
    """The teacher -> target map, loaded from ``cache_dir/vocab-map-<key>.npz`` when there, else computed
    (and saved there when ``cache_dir`` is given). ``teacher_rows`` defaults to ``len(teacher_tokenizer)``."""
    rows = len(teacher_tokenizer) if teacher_rows is None else int(teacher_rows)
    if cache_dir is None:
        return compute_vocab_map(teacher_tokenizer, target_tokenizer, rows)
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / f"vocab-map-{vocab_map_key(teacher_tokenizer, target_tokenizer, rows)}.npz"
    if path.is_file():
        with np.load(path) as data:
            return VocabMap(ids=data["ids"], exact=data["exact"], distance=data["distance"],
                            special=data["special"], n_tokens=int(data["n_tokens"]), first=data["first"],
                            cont_offsets=data["cont_offsets"], cont_first=data["cont_first"],
                            cont_read=data["cont_read"])
    vmap = compute_vocab_map(teacher_tokenizer, target_tokenizer, rows)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, ids=vmap.ids, exact=vmap.exact, distance=vmap.distance,
                                          special=vmap.special, n_tokens=np.int64(vmap.n_tokens), first=vmap.first,
                                          cont_offsets=vmap.cont_offsets, cont_first=vmap.cont_first,
                                          cont_read=vmap.cont_read))
    return vmap
