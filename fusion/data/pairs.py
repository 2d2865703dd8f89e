"""FuseChat-3.0's training data from scored samples: SFT examples, DPO pairs and WRPO triples.

The input is every response of every source model to every prompt, each with the verifier's verdict (``passed``:
True / False, or None for a prompt without a checker) and a reward model's score (``reward``, or None without one):
the rows of `fusion.data.rewards.read_scores`. The rules (FuseChat-3.0, ``shared/reference/wrpo_fusechat3.md`` §1.3;
each a key of `fusion.config.PairsConfig`):

- **split.** Prompts go to SFT or to preference training, ``sft_share`` of them to SFT (4:6 in FuseChat-3.0, 1:2 in
  WRPO), by a seeded hash of the prompt id, so a prompt's side never depends on the others.
- **SFT.** The single best response across the sources: the highest reward among those that pass, where the prompt
  is verifiable; the highest reward otherwise.
- **DPO pairs.** Per prompt, from one source model (``same_source``): its best response chosen, its worst rejected.
  For a verifiable prompt, chosen = a passing response with the highest reward, rejected = a failing one with the
  lowest. The pair is kept only if ``min_margin <= reward(chosen) - reward(rejected) <= max_margin`` (for verified
  pairs too unless ``margin_on_verified: false``; a pair without rewards is kept). Of the sources with a pair, the
  one whose chosen response scores highest supplies it (FuseChat-3.0 does not say; one pair per prompt, as its
  counts imply). With ``same_source: false``, the best and worst responses across all sources.
- **Drops.** A prompt all of whose responses fail is dropped (SFT and preference); so is one with nothing to rank
  (no verdicts and no rewards), and one whose pair falls outside the margin window. Every drop is counted by reason.
- **WRPO triples.** ``source_chosen`` = the best source response (the SFT rule), ``chosen`` / ``rejected`` = the
  best / worst of the SFT model's own samples for that prompt (the DPO rule, on the target's samples).

Ties go to the earlier response in (model order, sample) order, so the result depends on nothing but the rows.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable

from fusion.config import PairsConfig

Row = dict  # a scored response: model, prompt_id, sample, text, passed, reward, skill, ...


def in_sft_split(prompt_id: str, share: float, seed: int) -> bool:
    """Whether the prompt goes to SFT: a seeded hash of its id, uniform in [0, 1), below ``share``."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


def _score(row: Row) -> float:  # for the best: a response without a reward ranks last
    return float("-inf") if row["reward"] is None else row["reward"]


def _low(row: Row) -> float:  # for the worst: a response without a reward ranks last too
    return float("inf") if row["reward"] is None else row["reward"]


def best(rows: list[Row]) -> Row | None:
    """The best response: the highest reward among the passing ones if any was checked, else the highest reward.
    None when all that were checked fail, or when nothing ranks them (no verdict, no reward, and more than one)."""
    if any(r["passed"] is not None for r in rows):
        rows = [r for r in rows if r["passed"]]
        if not rows:
            return None
    elif len(rows) > 1 and all(r["reward"] is None for r in rows):
        return None
    return max(rows, key=_score, default=None)  # max keeps the first of equals


def best_and_worst(rows: list[Row], config: PairsConfig) -> tuple[tuple[Row, Row] | None, str]:
    """``((chosen, rejected), "")`` from ``rows`` by the DPO rule, or ``(None, reason)``."""
    verified = any(r["passed"] is not None for r in rows)
    if verified:
        passing = [r for r in rows if r["passed"]]
        failing = [r for r in rows if r["passed"] is False]
        if not passing:
            return None, "every response fails"
        if not failing:
            return None, "no failing response to reject"
        chosen = max(passing, key=_score)
        rejected = min(failing, key=_low)
    else:
        if all(r["reward"] is None for r in rows):
            return None, "nothing ranks the responses (no verdict, no reward)"
        if len(rows) < 2:
            return None, "one response only"
        chosen = max(rows, key=_score)
        rejected = min(rows, key=_low)
        if chosen is rejected or chosen["reward"] == rejected["reward"]:
            return None, "all responses score the same"
    if chosen["reward"] is not None and rejected["reward"] is not None and (config.margin_on_verified or not verified):
        margin = chosen["reward"] - rejected["reward"]
        if config.min_margin is not None and margin < config.min_margin:
            return None, f"reward margin below {config.min_margin}"
        if config.max_margin is not None and margin > config.max_margin:
            return None, f"reward margin above {config.max_margin}"
    return (chosen, rejected), ""


def usable(rows: list[Row]) -> tuple[list[Row], int]:
    """The responses with text, and how many were empty (a model that ends its turn at once): an empty answer is
    neither taught nor a conversation the chat data accepts."""
    kept = [r for r in rows if r["text"].strip()]
    return kept, len(rows) - len(kept)


def group(rows: Iterable[Row]) -> dict[str, list[Row]]:
    """Rows by prompt id, in the order the prompts first appear."""
    grouped: dict[str, list[Row]] = {}
    for row in rows:
        grouped.setdefault(row["prompt_id"], []).append(row)
    return grouped


def preference_pair(rows: list[Row], models: list[str], config: PairsConfig) -> tuple[tuple[Row, Row] | None, str]:
    """One prompt's DPO pair from its source responses, or the reason there is none."""
    if not config.same_source:
        return best_and_worst(rows, config)
    candidates, reasons = [], []
    for model in models:
        own = [r for r in rows if r["model"] == model]
        if not own:
            continue
        pair, reason = best_and_worst(own, config)
        (candidates if pair else reasons).append(pair or reason)
    if candidates:
        return max(candidates, key=lambda pair: _score(pair[0])), ""
    if rows and all(r["passed"] is False for r in rows):
        return None, "every response fails"
    # the most telling reason: a margin outside the window is more informative than "one response only"
    return None, max(reasons, key=lambda reason: ("margin" in reason, reason)) if reasons else "no responses"


def build(rows: list[Row], config: PairsConfig, seed: int) -> tuple[list[dict], list[dict], dict]:
    """``(sft, preference, counts)`` from the scored source responses (see the module docstring).

    ``sft`` rows are ``{prompt_id, skill, model, response, reward}``; ``preference`` rows ``{prompt_id, skill, model,
    chosen, rejected, chosen_reward, rejected_reward}``; ``counts`` ``{"sft": {...}, "preference": {...}}``, each with
    ``prompts``, ``kept`` and ``dropped: REASON`` entries.
    """
    models = list(dict.fromkeys(r["model"] for r in rows))
    sft, preference = [], []
    counts = {"sft": Counter(), "preference": Counter()}
    for prompt_id, responses in group(rows).items():
        side = "sft" if in_sft_split(prompt_id, config.sft_share, seed) else "preference"
        counts[side]["prompts"] += 1
        responses, empty = usable(responses)
        if empty:
            counts[side]["empty responses left out"] += empty
        skill = responses[0].get("skill")
        if side == "sft":
            chosen = best(responses)
            if chosen is None:
                reason = "every response fails" if any(r["passed"] is not None for r in responses) else \
                    "nothing ranks the responses (no verdict, no reward)"
                counts["sft"][f"dropped: {reason}"] += 1
                continue
            sft.append({"prompt_id": prompt_id, "skill": skill, "model": chosen["model"], "response": chosen["text"],
                        "reward": chosen["reward"]})
        else:
            pair, reason = preference_pair(responses, models, config)
            if pair is None:
                counts["preference"][f"dropped: {reason}"] += 1
                continue
            chosen, rejected = pair
            preference.append({"prompt_id": prompt_id, "skill": skill, "model": chosen["model"],
                               "chosen": chosen["text"], "rejected": rejected["text"],
                               "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"]})
        counts[side]["kept"] += 1
    return sft, preference, {side: dict(c) for side, c in counts.items()}


def triples(source_rows: list[Row], target_rows: list[Row], prompt_ids: list[str], config: PairsConfig
            ) -> tuple[list[dict], dict]:
    """WRPO's ``(source_chosen, chosen, rejected)`` per prompt: the best source response, and the best and worst of
    the target's own samples; ``(rows, counts)``."""
    sources, targets = group(source_rows), group(target_rows)
    out, counts = [], Counter()
    for prompt_id in prompt_ids:
        counts["prompts"] += 1
        (candidates, empty), (own, own_empty) = usable(sources.get(prompt_id, [])), usable(targets.get(prompt_id, []))
        if empty + own_empty:
            counts["empty responses left out"] += empty + own_empty
        source = best(candidates)
        if source is None:
            counts["dropped: no passing source response"] += 1
            continue
        pair, reason = best_and_worst(own, config)
        if pair is None:
            counts[f"dropped: target samples: {reason}"] += 1
            continue
        chosen, rejected = pair
        out.append({"prompt_id": prompt_id, "skill": source.get("skill"), "model": source["model"],
                    "source_chosen": source["text"], "chosen": chosen["text"], "rejected": rejected["text"],
                    "source_reward": source["reward"], "chosen_reward": chosen["reward"],
                    "rejected_reward": rejected["reward"]})
        counts["kept"] += 1
    return out, dict(counts)


def format_counts(counts: dict[str, dict]) -> str:
    """The counts of `build` / `triples` as one line per side: prompts, kept, and each reason for a drop."""
    lines = []
    for side, c in counts.items():
        drops = {k.removeprefix("dropped: "): v for k, v in c.items() if k.startswith("dropped: ")}
        detail = "; ".join(f"{v} {k}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1]))
        empty = f"; {c['empty responses left out']} empty responses left out" if c.get("empty responses left out") \
            else ""
        lines.append(f"{side}: {c.get('prompts', 0)} prompts, {c.get('kept', 0)} kept, {sum(drops.values())} dropped"
                     + (f" ({detail})" if detail else "") + empty)
    return "\n".join(lines)
