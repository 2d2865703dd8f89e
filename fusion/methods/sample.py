"""`sample`: responses of chat models to prompts, scored by rule verifiers and a reward model.

    sample -> score

The data FuseChat-3.0 builds its SFT and preference pairs from, and a tool of its own: how often does each model
answer each skill right, how often does the best of n, what does a reward model think. Prompts are the embedded chat
tasks' (`data.source: embedded`, `chat.skills`) or a dataset's (`fusion.data.responses.load_prompts`).
"""

from __future__ import annotations

from pathlib import Path

from fusion.config import Recipe
from fusion.errors import FusionError
from fusion.methods.base import Method
from fusion.stages import sampling


def _fail(key: str, problem: str) -> None:
    raise FusionError(f"recipe key {key!r}: {problem}")


def check_sampling(recipe: Recipe) -> None:
    """The `sampling` and `scoring` values of a recipe that samples (`fusion.recipe` checks their paths)."""
    s, c = recipe.sampling, recipe.scoring
    if not s.models:
        _fail("sampling.models", "name at least one model to sample, e.g. [{path: zoo:chat-gpt2-code}]")
    labels = [m.label for m in s.models]
    for i, m in enumerate(s.models):
        key = f"sampling.models[{i}]"
        if labels.count(m.label) > 1:
            _fail(f"{key}.name", f"two models are called {m.label!r}; give them distinct names")
        if m.template and "{{" not in m.template and "{%" not in m.template and not Path(m.template).is_file():
            _fail(f"{key}.template", f"{m.template!r} is neither a Jinja template nor a file holding one")
        for field, value, ok, rule in (("temperature", m.temperature, m.temperature >= 0, "at least 0"),
                                       ("top_p", m.top_p, 0 < m.top_p <= 1, "in (0, 1]"),
                                       ("repetition_penalty", m.repetition_penalty, m.repetition_penalty > 0,
                                        "positive"),
                                       ("max_new_tokens", m.max_new_tokens, m.max_new_tokens >= 1, "at least 1")):
            if not ok:
                _fail(f"{key}.{field}", f"must be {rule}, got {value}")
    for key, value in (("sampling.n", s.n), ("sampling.batch_size", s.batch_size),
                       ("sampling.prompts_per_shard", s.prompts_per_shard), ("sampling.prompts", s.prompts or 1),
                       ("scoring.batch_size", c.batch_size), ("scoring.max_length", c.max_length),
                       ("scoring.workers", c.workers)):
        if value < 1:
            _fail(key, f"must be at least 1, got {value}")


class SampleMethod(Method):
    name = "sample"
    summary = "sample chat models' responses to prompts; score them with verifiers and a reward model"
    stages = (sampling.Sample(), sampling.Score())
    module = None  # nothing is trained

    def check(self, recipe: Recipe) -> None:
        check_sampling(recipe)

    def describe_data(self, recipe: Recipe) -> str:
        s, d = recipe.sampling, recipe.data
        if d.source == "embedded":
            return (f"prompts: the embedded chat tasks [{', '.join(recipe.chat.skills)}], split {s.split!r}, "
                    f"{s.prompts or 100} per skill")
        return f"prompts: {d.source}, split {s.split!r}" + (f", the first {s.prompts}" if s.prompts else "")
