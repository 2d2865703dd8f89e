"""The chat skills: the same conversations everywhere, train and test sharing no task, references that pass their own
verifier and wrong answers that do not, math-verify's number reading, and a code sandbox that contains its answer."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from decimal import Decimal

import pytest

from fusion.data.skills import DEFAULT_SIZES, SKILLS, SPLITS, skill_conversations
from fusion.data.verify import check, check_many, extract_code, extract_number, run_code
from fusion.errors import FusionError

FINGERPRINT = ("import hashlib, json; from fusion.data.skills import skill_conversations; "
               "print(hashlib.sha256(json.dumps([skill_conversations(s) for s in ('train', 'test')]).encode())"
               ".hexdigest())")


def last_answer(conversation: dict) -> str:
    return conversation["messages"][-1]["content"]


def task_of(conversation: dict) -> str:
    """What a conversation asks, whatever its wording: operands, API or function."""
    prompt, answer = conversation["messages"][-2]["content"], last_answer(conversation)
    skill = conversation["skill"]
    if skill == "arithmetic":
        return " ".join(re.search(r"(\d+) (\S) (\d+)", prompt).groups())
    if skill == "stdlib":  # the API, `module.name`, in each of the four question forms
        names = re.findall(r"`([\w.]+)`", prompt)
        if answer.startswith("It is defined in"):
            return f"{conversation['reference']}.{names[0]}"
        return f"{names[1]}.{names[0]}" if len(names) == 2 else names[0]  # "import `name` from `module`"
    return answer  # a code answer is its task: name, parameters and expression


def test_the_same_conversations_in_another_process_with_another_hash_seed():
    here = hashlib.sha256(json.dumps([skill_conversations(s) for s in SPLITS]).encode()).hexdigest()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run([sys.executable, "-c", FINGERPRINT], env=env, capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here
    assert skill_conversations("test", seed=1) != skill_conversations("test")  # the seed draws another sample


def test_default_sizes_and_the_shape_of_a_conversation():
    for split in SPLITS:
        conversations = skill_conversations(split)
        assert len({c["id"] for c in conversations}) == len(conversations) == DEFAULT_SIZES[split] * len(SKILLS)
        for c in conversations:
            assert c["split"] == split and c["skill"] in SKILLS
            roles = [m["role"] for m in c["messages"]]
            assert roles[-2:] == ["user", "assistant"] and roles.count("system") <= 1
            assert roles[roles.count("system"):] in (["user", "assistant"], ["user", "assistant"] * 2)
    train = skill_conversations("train")
    assert sum(c["messages"][0]["role"] == "system" for c in train) > 50
    assert sum(len(c["messages"]) >= 4 for c in train) > 50  # a few multi-turn conversations, the bulk single-turn
    assert len(skill_conversations("test", ("code",), size=10)) == 10


def test_train_and_test_share_no_task_and_no_prompt():
    for skill in SKILLS:
        train, test = (skill_conversations(s, (skill,)) for s in SPLITS)
        assert {task_of(c) for c in train}.isdisjoint({task_of(c) for c in test}), skill
        train_prompts, test_prompts = ({m["content"] for c in convs for m in c["messages"] if m["role"] == "user"}
                                       for convs in (train, test))
        assert train_prompts.isdisjoint(test_prompts), skill


def test_every_reference_answer_passes_its_verifier():
    conversations = [c for s in SPLITS for c in skill_conversations(s, ("arithmetic", "stdlib"))]
    assert all(check(c["skill"], last_answer(c), c["reference"]) for c in conversations)
    # Code: the first 48 of each split (tasks are drawn from the templates in turn, so every template is there),
    # about 3 s; all 3,300 take about a minute.
    code = [c for s in SPLITS for c in skill_conversations(s, ("code",))[:48]]
    assert all(check_many([(c["skill"], last_answer(c), c["reference"]) for c in code], workers=2))


def test_wrong_answers_fail():
    test = {skill: skill_conversations("test", (skill,))[:30] for skill in SKILLS}
    for c in test["arithmetic"]:
        assert not check("arithmetic", f"The answer is {c['reference'] + 1}.", c["reference"])
    for c, other in zip(test["stdlib"], test["stdlib"][1:]):
        if other["reference"] != c["reference"]:
            assert not check("stdlib", last_answer(other), c["reference"])
    code = test["code"][:12]  # another task's function (another name or expression) fails this task's test
    items = [("code", last_answer(other), c["reference"]) for c, other in zip(code, code[1:])]
    assert not any(check_many(items + [("code", "", code[0]["reference"])], workers=2))


@pytest.mark.parametrize("text, value", [
    ("The answer is 82.", "82"),
    ("37 + 45 = 82", "82"),
    ("82", "82"),
    ("The answer is **82**.", "82"),
    ("The answer is $82$.", "82"),
    ("The answer is 1,234.", "1234"),
    ("The answer is 1 234 apples.", "1234"),
    ("The answer is 82.0", "82"),
    ("It is 007.", "7"),
    ("The answer is -5.", "-5"),
    ("The answer is \u22125.", "-5"),
    ("5-3 gives 2", "2"),
    ("First 3, then \\boxed{82}, and 100 more.", "82"),
    ("\\boxed{\\frac{1}{2}} hmm \\boxed{1,234}", "1234"),
    ("The answer is 82. I am 100% sure.", "82"),  # anchored on "answer", not on the last number
    ("Answer: 3 + 4 = 7", "7"),
    ("We get 12 and then 13.5", "13.5"),
    ("no number here", None),
])
def test_numbers_are_read_as_math_verify_reads_them(text, value):
    assert extract_number(text) == (None if value is None else Decimal(value))


def test_number_and_text_checks():
    assert check("arithmetic", "so \\boxed{82.00}", 82) and not check("arithmetic", "The answer is 83.", 82)
    assert not check("arithmetic", "I do not know.", 82)
    for answer in ("It is defined in `shutil`.", "`shutil`", "shutil", "SHUTIL.", "It is in **`shutil`**."):
        assert check("stdlib", answer, "shutil"), answer
    for answer in ("It is defined in `os`.", "shutil.copyfile", "`shutil` or `os`", ""):
        assert not check("stdlib", answer, "shutil"), answer
    assert check("stdlib", "Copy data from  src to dst.", "Copy data from src to dst.")
    with pytest.raises(FusionError, match="no verifier"):
        check("poetry", "a", "b")


def test_code_is_taken_from_the_first_fence_or_the_whole_answer():
    two_blocks = "Here:\n```python\ndef f():\n    return 1\n```\nthen\n```\nf()\n```"
    assert extract_code(two_blocks) == "def f():\n    return 1\n"
    assert extract_code("```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\nx = 1") == "x = 1"  # cut at the token limit
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"


def test_the_sandbox_runs_a_correct_answer_and_fails_one_that_raises_or_exits():
    test = "assert add(2, 3) == 5"
    assert run_code("def add(a, b):\n    return a + b", test) == "passed"
    assert check("code", "```python\ndef add(a, b):\n    return a + b\n```", test)
    assert run_code("def add(a, b):\n    return a - b", test) == "failed"
    assert run_code("def add(a, b):\n    raise ValueError(a)", test) == "failed"
    assert run_code("def add(a, b):\n    return a +", test) == "failed"
    assert run_code("import sys\nsys.exit(0)", test) == "failed"  # exiting early does not skip the test
    assert run_code("import socket", "") == "failed"


@pytest.mark.parametrize("code, outcome", [
    ("while True:\n    pass", "timeout"),
    ("import time\ntime.sleep(60)", "timeout"),
    ("x = [0] * 10**10", "failed"),  # MemoryError at once under the address-space limit
    ("x = []\nwhile True:\n    x.append(' ' * 10**6)", "failed"),
])
def test_the_sandbox_stops_loops_and_unbounded_allocations(code, outcome):
    start = time.monotonic()
    assert run_code(code, "", timeout_s=1.0) == outcome
    assert time.monotonic() - start < 3.0  # scored within the timeout, not after the loop's own end


def test_check_many_keeps_the_order_of_its_items():
    items = [("code", "def f():\n    return 1", "assert f() == 1"), ("arithmetic", "41", 42),
             ("code", "def f():\n    return 2", "assert f() == 1"), ("stdlib", "`re`", "re")]
    assert check_many(items, workers=2) == [True, False, False, True]


def test_unknown_skills_splits_and_sizes_are_refused():
    with pytest.raises(FusionError, match="unknown skill 'poetry'"):
        skill_conversations("train", ("poetry",))
    with pytest.raises(FusionError, match="unknown skills split"):
        skill_conversations("validation")
    with pytest.raises(FusionError, match="at most"):
        skill_conversations("test", ("code",), size=10**6)
