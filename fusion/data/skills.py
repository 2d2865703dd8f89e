"""Chat tasks with automatically checkable answers, built from nothing but Python and its standard library.

The chat counterpart of `fusion/data/corpus.py`: no download, the same conversations on every machine with the
same Python version, and skills small enough that a ~1M-parameter model learns part of each in a few thousand steps:

- ``arithmetic``: "What is 37 + 5?" -> "The answer is 42." (a number below 100 and a one-digit one for + and -;
  for ×, the number times 0, 1, 2 or 10). The zoo's tokenizers write numbers digit by digit, so an answer follows
  from digit rules (the last digit's sum, a carry) that every train question exercises: a held-out question asks
  new numbers, not new rules;
- ``stdlib``: four questions per public API of the standard library: "Which module defines `copyfile`?" -> "It is
  defined in `shutil`.", "What does `shutil.copyfile` do?" -> the first sentence of its docstring, "How do I import
  `copyfile` from `shutil`?" -> "`from shutil import copyfile`", and "Which module must I import to call
  `shutil.copyfile`?" -> "Import `shutil`.". The first two need knowledge a ~1M-parameter model barely has
  (pretraining on the embedded corpus supplies some: a quarter of the APIs are called by module in its train code,
  42 % of the sentences are in its train prose); the last two need only the question's names, put in the right
  places, which such a model learns in a few thousand steps;
- ``code``: "Write a Python function `scale(xs)` that returns ..." -> a fenced one-line function, checked by running
  its asserts (`fusion/data/verify.py`).

A conversation is ``{"id", "skill", "split", "messages", "reference"}``; ``messages`` are ``{"role", "content"}``
dicts (roles ``system``, ``user``, ``assistant``) and ``reference`` is what `fusion.data.verify.check` compares the
*last* assistant message with: the number, the module name or sentence, or the test source. A few conversations
(about 4 % each) carry a system message or an earlier exchange of the same skill, so that chat templates and loss
masks meet them; the rest are one question and one answer.

Train and test never share a task: a task (an operand pair, an API, a function to write) is asked in several
wordings, and the tenth of each template's tasks with the lowest hashes go to ``test`` with all their wordings, so a
test question is never seen in training, in any wording, and every template has test questions.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import random
import re
from functools import lru_cache

from fusion.data.corpus import stdlib_sources
from fusion.errors import FusionError

SKILLS = ("arithmetic", "stdlib", "code")
SPLITS = ("train", "test")
# A few thousand conversations teach a tiny model the format and part of each skill; a few hundred test questions
# give an accuracy with a standard error of at most 3 points.
DEFAULT_SIZES = {"train": 3000, "test": 300}

_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are an expert Python programmer.",
)
_SYSTEM_SHARE = _MULTI_TURN_SHARE = 0.04

# A task is one item of a pool: (key that decides its split, user prompt, assistant answer, reference).
Task = tuple[str, str, str, object]


def _test_keys(pool: list[Task]) -> set[str]:
    """The tenth of a pool's tasks (at least one) with the lowest hashes: its test tasks, in every wording.

    By rank, not by a hash threshold, so that a template with only 20 tasks still gets test questions; pools that
    hold the same tasks (``stdlib``'s two question forms) split them the same way.
    """
    ranked = sorted({task[0] for task in pool}, key=lambda key: hashlib.sha1(key.encode()).hexdigest())
    return set(ranked[:max(1, len(ranked) // 10)])


# --- arithmetic ---------------------------------------------------------------------------------------------------

_ARITHMETIC_PROMPTS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Calculate {a} {op} {b}.")
# A number below 100 and a small one: the zoo's tokenizers write numbers digit by digit, so the answer follows
# from rules on digits (the last digit's sum, a carry) that every train question exercises, and a held-out
# question asks new numbers, not new rules.
_OPERATIONS = {"+": (range(100), range(10), int.__add__), "-": (range(100), range(10), int.__sub__),
               "×": (range(100), (0, 1, 2, 10), int.__mul__)}


def _arithmetic_tasks() -> list[list[Task]]:
    """One pool per operation, so that each gets a third of the conversations whatever the pools' sizes."""
    pools = []
    for op, (firsts, seconds, fn) in _OPERATIONS.items():
        pool = []
        for a in firsts:
            for b in seconds:
                if op == "-" and b > a:
                    continue  # no negative answers: a tiny model learns one format more easily
                key = f"arithmetic:{op}:{a}:{b}"
                answer = fn(a, b)
                pool += [(key, p.format(a=a, op=op, b=b), f"The answer is {answer}.", answer)
                         for p in _ARITHMETIC_PROMPTS]
        pools.append(pool)
    return pools


# --- stdlib -------------------------------------------------------------------------------------------------------

_MODULE_PROMPTS = ("Which module defines `{name}`?", "In which standard library module is `{name}` defined?")
_DOC_PROMPTS = ("What does `{module}.{name}` do?", "Describe `{module}.{name}` in one sentence.")
# First sentences longer than this are too long for a tiny model to reproduce word for word.
_MAX_SENTENCE_CHARS = 90


def _module_name(relative_path: str) -> str | None:
    """``json/decoder.py`` -> ``json.decoder``; None for private modules (``_pydecimal``, ``__main__``)."""
    parts = relative_path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return None if any(p.startswith("_") for p in parts) else ".".join(parts)


def _first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring's first paragraph on one line, or None when it is not plain English."""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    match = re.match(r"(.+?\.)(?:\s|$)", paragraph)
    if match is None:
        return None
    sentence = match.group(1)
    plain = sentence.isascii() and "`" not in sentence and ">>>" not in sentence
    return sentence if plain and 15 <= len(sentence) <= _MAX_SENTENCE_CHARS else None


@lru_cache(maxsize=1)
def stdlib_apis() -> tuple[tuple[str, str, str], ...]:
    """``(module, name, first sentence of its docstring)`` of the public top-level functions and classes defined in
    exactly one public standard-library module (so "which module defines it" has one answer), sorted.

    About 1,200 on CPython 3.11, read in about 1.5 seconds with `ast` (nothing is imported).
    """
    found, modules_of = [], {}
    for relative_path, path in stdlib_sources():
        module = _module_name(relative_path)
        if module is None:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:  # top level only: definitions under `if sys.platform ...` vary by machine
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                modules_of.setdefault(node.name, set()).add(module)
                doc = ast.get_docstring(node)
                sentence = doc and _first_sentence(doc)
                # A docstring that starts with the signature ("basename(p) -> str") is not a description.
                if sentence and not sentence.startswith(node.name):
                    found.append((module, node.name, sentence))
    unique = [api for api in found if len(modules_of[api[1]]) == 1 and not hasattr(builtins, api[1])]
    return tuple(sorted(unique))


_IMPORT_PROMPTS = ("How do I import `{name}` from `{module}`?", "Write the import statement for `{module}.{name}`.")
_PACKAGE_PROMPTS = ("Which module must I import to call `{module}.{name}`?",
                    "To use `{module}.{name}`, what do I import?")


def _stdlib_tasks() -> list[list[Task]]:
    """Four pools, one per question form, each with every API; an API's questions share a split."""
    where, what, imports, packages = [], [], [], []
    for module, name, sentence in stdlib_apis():
        key = f"stdlib:{module}.{name}"
        where += [(key, p.format(name=name), f"It is defined in `{module}`.", module) for p in _MODULE_PROMPTS]
        what += [(key, p.format(module=module, name=name), sentence, sentence) for p in _DOC_PROMPTS]
        statement = f"from {module} import {name}"
        imports += [(key, p.format(module=module, name=name), f"`{statement}`", statement) for p in _IMPORT_PROMPTS]
        packages += [(key, p.format(module=module, name=name), f"Import `{module}`.", module) for p in _PACKAGE_PROMPTS]
    return [where, what, imports, packages]


# --- code ---------------------------------------------------------------------------------------------------------

# Parameter names and test inputs per signature. Inputs are chosen so that the templates' functions differ on them
# (a function returning 0, or its argument, fails every template).
_SIGNATURES = {
    "int": ((("x",), ("n",), ("value",), ("num",)), ((0,), (3,), (-4,), (17,), (100,))),
    "pair": ((("a", "b"), ("x", "y"), ("m", "n"), ("p", "q")), ((2, 3), (-5, 4), (10, 10), (0, -7), (123, 45))),
    "list": ((("xs",), ("nums",), ("values",), ("items",)),
             (([3, 1, 2],), ([-5, 0, 5, 10],), ([7],), ([4, 4, 1, 4],), ([12, -3, 8, 0],))),
    "str": ((("s",), ("text",), ("word",), ("line",)), (("hello",), ("abcabc",), ("Python",), ("",), ("banana",))),
}
_CODE_PROMPTS = ("Write a Python function `{name}({params})` that {description}.",
                 "Implement `{name}({params})` in Python: it {description}.")
# (signature, function names, description, returned expression, constants). `{0}`, `{1}` are the parameters, `{k}`
# the constant; `v` is the loop variable, which no parameter is named.
_CODE_TEMPLATES = (
    ("int", ("add_k", "plus", "increase", "shift", "offset"), "returns {0} plus {k}", "{0} + {k}", range(1, 51)),
    ("int", ("minus", "decrease", "subtract_k", "lower", "drop"), "returns {0} minus {k}", "{0} - {k}", range(1, 51)),
    ("int", ("times", "scale", "multiply_by", "mul_k", "grow"), "returns {0} times {k}", "{0} * {k}", range(2, 31)),
    ("int", ("remainder", "mod_k", "modulo", "rest", "wrap"), "returns the remainder of {0} divided by {k}",
     "{0} % {k}", range(2, 31)),
    ("int", ("divisible", "is_multiple", "divides", "check_div", "is_div"),
     "returns True if {0} is divisible by {k}, else False", "{0} % {k} == 0", range(2, 31)),
    ("int", ("above", "is_greater", "exceeds", "gt_k", "over"), "returns True if {0} is greater than {k}, else False",
     "{0} > {k}", range(-20, 51)),
    ("int", ("square", "sq", "squared", "power_two", "self_product"), "returns the square of {0}", "{0} * {0}", None),
    ("pair", ("add", "total", "sum_two", "plus_two", "combine"), "returns the sum of {0} and {1}", "{0} + {1}", None),
    ("pair", ("sub", "difference", "minus_two", "subtract", "take_away"), "returns {0} minus {1}", "{0} - {1}", None),
    ("pair", ("mul", "product", "times_two", "multiply", "mult"), "returns the product of {0} and {1}", "{0} * {1}",
     None),
    ("pair", ("larger", "maximum", "max_two", "bigger", "pick_max"), "returns the larger of {0} and {1}",
     "max({0}, {1})", None),
    ("pair", ("smaller", "minimum", "min_two", "lesser", "pick_min"), "returns the smaller of {0} and {1}",
     "min({0}, {1})", None),
    ("pair", ("distance", "abs_diff", "gap", "spread", "separation"),
     "returns the absolute difference between {0} and {1}", "abs({0} - {1})", None),
    ("list", ("list_sum", "total_of", "add_all", "sum_list", "accumulate"), "returns the sum of the list {0}",
     "sum({0})", None),
    ("list", ("largest", "list_max", "max_of", "top", "highest"), "returns the largest element of the list {0}",
     "max({0})", None),
    ("list", ("smallest", "list_min", "min_of", "bottom", "lowest"), "returns the smallest element of the list {0}",
     "min({0})", None),
    ("list", ("count", "size", "length", "list_len", "how_many"), "returns the number of elements in the list {0}",
     "len({0})", None),
    ("list", ("scale_all", "multiply_all", "stretch", "times_each", "scaled"),
     "returns a new list with every element of {0} multiplied by {k}", "[v * {k} for v in {0}]", range(2, 31)),
    ("list", ("keep_above", "filter_greater", "above_k", "select", "big_ones"),
     "returns a list of the elements of {0} that are greater than {k}", "[v for v in {0} if v > {k}]", range(-10, 21)),
    ("str", ("reverse", "backwards", "flip", "mirror", "reversed_text"), "returns the string {0} reversed",
     "{0}[::-1]", None),
    ("str", ("shout", "to_upper", "upper", "caps", "loud"), "returns {0} in upper case", "{0}.upper()", None),
    ("str", ("prefix", "head", "first_chars", "take", "start"), "returns the first {k} characters of {0}",
     "{0}[:{k}]", range(1, 10)),
    ("str", ("repeat", "echo", "times_text", "copies", "duplicate"), "returns {0} repeated {k} times", "{0} * {k}",
     range(2, 10)),
    ("str", ("count_char", "occurrences", "tally", "char_count", "frequency"),
     "returns how many times the character {k} occurs in {0}", "{0}.count({k})",
     tuple(repr(c) for c in "abcehlnopty")),  # letters of the test strings, so that most counts are not 0
)


def _code_task(signature: str, name: str, params: tuple[str, ...], description: str, body: str, k) -> list[Task]:
    """The prompts, answer and test of one function to write (the test's expected values come from the answer's
    own expression, evaluated here: it is our template, not a model's output)."""
    expression = body.format(*params, k=k)
    function = eval(f"lambda {', '.join(params)}: {expression}")
    test = "\n".join(f"assert {name}({', '.join(map(repr, args))}) == {function(*args)!r}"
                     for args in _SIGNATURES[signature][1])
    answer = f"```python\ndef {name}({', '.join(params)}):\n    return {expression}\n```"
    key = f"code:{name}({', '.join(params)}):{expression}"
    text = description.format(*(f"`{p}`" for p in params), k=k)
    return [(key, p.format(name=name, params=", ".join(params), description=text), answer, test)
            for p in _CODE_PROMPTS]


def _code_tasks() -> list[list[Task]]:
    """One pool per template: a template with a constant has a hundred times more variants than one without."""
    pools = []
    for signature, names, description, body, constants in _CODE_TEMPLATES:
        pool = []
        for name in names:
            for params in _SIGNATURES[signature][0]:
                for k in constants or (None,):
                    pool += _code_task(signature, name, params, description, body, k)
        pools.append(pool)
    return pools


# --- conversations ------------------------------------------------------------------------------------------------

_TASKS = {"arithmetic": _arithmetic_tasks, "stdlib": _stdlib_tasks, "code": _code_tasks}


def _in_split(pool: list[Task], split: str) -> list[Task]:
    test_keys = _test_keys(pool)
    return [task for task in pool if (task[0] in test_keys) == (split == "test")]


def _draw(pools: list[list[Task]], split: str, size: int, rng: random.Random, skill: str) -> list[Task]:
    """``size`` distinct tasks of ``split``, taken from the shuffled pools in turn (a pool that runs out drops out)."""
    pools = [_in_split(pool, split) for pool in pools]
    for pool in pools:
        rng.shuffle(pool)
    available = sum(map(len, pools))
    if size > available:
        raise FusionError(f"skill {skill!r} has {available} {split} questions; ask for at most that many, not {size}")
    drawn = []
    while len(drawn) < size:
        drawn += [pool.pop() for pool in pools if pool][:size - len(drawn)]
    return drawn


@lru_cache(maxsize=16)
def _conversations(skill: str, split: str, size: int, seed: int) -> tuple[dict, ...]:
    rng = random.Random(f"{skill}:{split}:{seed}")  # a string seed hashes the same on every machine
    tasks = _draw(_TASKS[skill](), split, size, rng, skill)
    conversations = []
    for i, (_, prompt, answer, reference) in enumerate(tasks):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if rng.random() < _MULTI_TURN_SHARE:
            _, earlier_prompt, earlier_answer, _ = tasks[(i + 1) % len(tasks)]
            messages = [{"role": "user", "content": earlier_prompt},
                        {"role": "assistant", "content": earlier_answer}] + messages
        if rng.random() < _SYSTEM_SHARE:
            messages = [{"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)}] + messages
        conversations.append({"id": f"{skill}-{split}-{i:05d}", "skill": skill, "split": split,
                              "messages": messages, "reference": reference})
    return tuple(conversations)


def skill_conversations(split: str, skills: tuple[str, ...] = SKILLS, size: int | None = None,
                        seed: int = 0) -> list[dict]:
    """The conversations of one split: ``size`` per skill (`DEFAULT_SIZES` when None), skill after skill.

    The same arguments give the same conversations on every machine with the same Python version (``stdlib``'s
    APIs come from its sources); ``seed`` draws another sample of the same split's tasks. The dicts are cached and
    shared between calls: copy one before changing it. Built in about 3 s (the code pool, then the stdlib's sources).
    """
    if split not in SPLITS:
        raise FusionError(f"unknown skills split {split!r}; use one of {', '.join(SPLITS)}")
    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
        raise FusionError(f"unknown skill {unknown[0]!r}; the skills are {', '.join(SKILLS)}")
    size = DEFAULT_SIZES[split] if size is None else size
    return [c for skill in skills for c in _conversations(skill, split, size, seed)]
