"""Is an answer right? One checker per skill of `fusion/data/skills.py`, and a batched form for thousands of samples.

- ``arithmetic``: the number the answer gives, read as math-verify reads plain numbers (its `ExprExtractionConfig`
  with the boxed priority of its `LatexExtractionConfig`): the last ``\\boxed{...}``, else the number after the last
  "answer" (after its last ``=`` when there is one: "answer: 3 + 4 = 7"), else the last number of the text;
  thousands separators (``1,234``, ``1 234``), a trailing ``.0``, leading zeros and markdown around it do not count.
  Unlike math-verify, nothing goes through sympy: no fractions, expressions, LaTeX, percentages or decimal commas
  (``1,5`` is not 1.5), which the skills never ask for.
- ``stdlib``: the whole answer, or its last `code span` ("It is defined in `shutil`."), equals the reference after
  case, whitespace, backticks, bold and a final period are dropped.
- ``code``: the answer's first fenced block (or the whole answer when it has no fence) is run with the reference's
  asserts in a sandboxed interpreter (`run_code`); it passes when that process exits with status 0.

What the code sandbox isolates, and what it does not. Each answer runs in a new process (``python -I -S``: no
``PYTHON*`` variables, user site, script folder or site-packages), never in the caller, with a minimal environment
(``PATH``, ``LANG``, ``HOME``), in an empty temporary folder deleted afterwards, in its own session so that it and
what it starts are killed together (a child that starts its own session escapes, where new processes are allowed).
Limits, set by the child itself before it reads the answer: CPU time, address space (an unbounded allocation fails
with MemoryError), 1 MB per written file, no core dump, no new processes (not enforced for root, which ignores
RLIMIT_NPROC). A wall-clock timeout kills what sleeps or blocks. ``import socket`` fails, which stops casual network
use but not a determined program (``ctypes``, other modules). Not isolated: the file system (the answer can read and
write whatever the user can), the network, and signals to the user's other processes. That suits the answers of our
own small models trained on these templates; untrusted code needs a container or nsjail.

The limits are set by a bootstrap the child runs first, not by ``preexec_fn``: Python documents ``preexec_fn`` as
unsafe in a process with threads (the child can deadlock before ``exec``), and the scorer runs in processes that have
them (PyTorch, the batch's thread pool).
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation

from fusion.errors import FusionError

# --- numbers ------------------------------------------------------------------------------------------------------

# Thousands groups first (math-verify's order), so that "1,234" is one number and not 1 and 234.
_NUMBER = r"(?<![\d.])(-?(?:[1-9]\d{0,2}(?:[ ,]\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)"
_ANSWER = re.compile(rf"answer(?:.{{0,100}}=\s*|.{{0,50}}?){_NUMBER}(?!\s*=)", re.IGNORECASE)


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces matched; None when there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin + 1:i]
    return text[begin + 1:]  # unclosed: a sample cut at its token limit


def extract_number(text: str) -> Decimal | None:
    """The number an answer gives (see the module docstring for which one), or None when it gives none."""
    text = text.replace("\u2212", "-")  # the Unicode minus sign
    boxed = _boxed(text)
    if boxed is not None:
        numbers = re.findall(_NUMBER, boxed)
    else:
        anchored = list(_ANSWER.finditer(text))
        numbers = [anchored[-1].group(1)] if anchored else re.findall(_NUMBER, text)
    if not numbers:
        return None
    try:
        return Decimal(re.sub(r"[ ,]", "", numbers[-1]))
    except InvalidOperation:
        return None


def check_number(response: str, reference: int | float | str) -> bool:
    value = extract_number(response)
    return value is not None and value == Decimal(str(reference))


# --- stdlib -------------------------------------------------------------------------------------------------------

def _normalise(text: str) -> str:
    text = " ".join(text.replace("`", "").replace("**", "").split())
    return text.rstrip(".").strip().casefold()


def check_text(response: str, reference: str) -> bool:
    spans = re.findall(r"`([^`\n]+)`", response)
    candidates = [response] + spans[-1:]
    return any(_normalise(c) == _normalise(reference) for c in candidates)


# --- code ---------------------------------------------------------------------------------------------------------

# The first fenced block; an unclosed fence (a sample cut at its token limit) runs to the end of the text.
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
TIMEOUT_S = 5.0
MEMORY_BYTES = 256 * 2**20  # the interpreter needs ~12 MB of address space; the tasks need a few kB
_FILE_BYTES = 2**20
# Run by the child: limits it cannot raise again (hard limits), `socket` made unimportable, then the answer and its
# test in one namespace. An answer that calls `sys.exit(0)` would otherwise pass without its test ever running.
_BOOTSTRAP = """\
import resource, sys
for limit, value in ((resource.RLIMIT_CPU, {cpu}), (resource.RLIMIT_AS, {memory}), (resource.RLIMIT_FSIZE, {file_size}),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 0)):
    resource.setrlimit(limit, (value, value))
sys.modules["socket"] = sys.modules["_socket"] = None
programs = []
for name in ("answer.py", "test.py"):  # both read first: the answer could rewrite test.py
    with open(name) as f:
        programs.append(compile(f.read(), name, "exec"))
namespace = {{"__name__": "__main__"}}
try:
    for program in programs:
        exec(program, namespace)
except SystemExit:
    sys.exit("the answer exited before its test ran")
"""


def extract_code(response: str) -> str:
    """The code of an answer: its first ```python (or bare ```) block, else the whole answer."""
    match = _FENCE.search(response)
    return match.group(1) if match else response


def run_code(code: str, test: str, timeout_s: float = TIMEOUT_S, memory_bytes: int = MEMORY_BYTES) -> str:
    """Run ``code`` followed by ``test`` in a sandboxed interpreter (see the module docstring).

    Returns ``"passed"`` (exit status 0), ``"failed"`` (an exception, a failed assert, a syntax error, MemoryError),
    ``"killed"`` (ended by a signal: a crash, or the CPU-time limit) or ``"timeout"`` (still running after
    ``timeout_s`` seconds of wall clock; killed with everything it started).
    """
    with tempfile.TemporaryDirectory(prefix="fusion-verify-", ignore_cleanup_errors=True) as folder:
        for name, text in (("answer.py", code), ("test.py", test)):
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
        # A second more CPU time than wall clock: one thread cannot use more CPU than wall time, so a busy loop ends
        # as a "timeout"; the CPU limit stops threads that run outside the GIL (C extensions).
        cpu_s = math.ceil(timeout_s) + 1
        bootstrap = _BOOTSTRAP.format(cpu=cpu_s, memory=memory_bytes, file_size=_FILE_BYTES)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": folder, "TMPDIR": folder}
        process = subprocess.Popen([sys.executable, "-I", "-S", "-c", bootstrap], cwd=folder, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return "timeout"
        _kill_group(process)  # whatever the answer started and left behind
    return "passed" if status == 0 else "killed" if status < 0 else "failed"


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
    process.wait()


def check_code(response: str, reference: str) -> bool:
    return run_code(extract_code(response), reference) == "passed"


# --- all skills ---------------------------------------------------------------------------------------------------

_CHECKERS = {"arithmetic": check_number, "stdlib": check_text, "code": check_code}


def check(skill: str, response: str, reference) -> bool:
    """Whether ``response`` (the text of the last assistant message) answers a conversation whose reference is
    ``reference`` (its ``"reference"`` field) for ``skill``."""
    if skill not in _CHECKERS:
        raise FusionError(f"no verifier for skill {skill!r}; the skills are {', '.join(_CHECKERS)}")
    return _CHECKERS[skill](response, reference)


def check_many(items: Iterable[tuple[str, str, object]], workers: int | None = None) -> list[bool]:
    """`check` of many ``(skill, response, reference)``, in order, with at most ``workers`` sandboxes at once
    (default: the CPU count, at most 8).

    Threads, not a process pool: each code check is a subprocess already, and a thread costs nothing to start,
    where forking a scorer that holds a model (and its threads) is slow and unsafe. A code check is mostly the
    interpreter's start-up: the 3,300 reference answers of the default splits took 53 s with 2 workers on 2 busy
    cores.
    """
    items = list(items)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda item: check(*item), items))
