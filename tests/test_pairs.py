"""FuseChat-3.0's data rules (`fusion.data.pairs`), one test per rule, on hand-made scored samples."""

from fusion.config import PairsConfig
from fusion.data.pairs import build, format_counts, in_sft_split, triples


def row(model, prompt, sample, reward, passed=None, skill="chat"):
    return {"model": model, "prompt_id": prompt, "sample": sample, "text": f"{model}/{prompt}/{sample}",
            "reward": reward, "passed": passed, "skill": skill}


ALL_PREFERENCE = PairsConfig(sft_share=0.0)
ALL_SFT = PairsConfig(sft_share=1.0)


def test_the_split_is_by_prompt_seeded_and_near_the_share():
    ids = [f"p{i}" for i in range(2000)]
    sft = [i for i in ids if in_sft_split(i, 0.4, seed=1)]
    assert 0.37 < len(sft) / len(ids) < 0.43
    assert sft == [i for i in ids if in_sft_split(i, 0.4, seed=1)]  # a prompt's side depends on it alone
    assert sft != [i for i in ids if in_sft_split(i, 0.4, seed=2)]
    rows = [row("a", i, s, reward=0.1 * s) for i in ids[:300] for s in range(2)]
    sft_rows, pref_rows, counts = build(rows, PairsConfig(sft_share=0.4, min_margin=None, max_margin=None), seed=1)
    assert {r["prompt_id"] for r in sft_rows} == {i for i in ids[:300] if in_sft_split(i, 0.4, 1)}
    assert not {r["prompt_id"] for r in sft_rows} & {r["prompt_id"] for r in pref_rows}
    assert counts["sft"]["prompts"] + counts["preference"]["prompts"] == 300


def test_sft_takes_the_single_best_response_across_sources():
    rows = [row("a", "p", 0, 0.3), row("a", "p", 1, 0.5), row("b", "p", 0, 0.9), row("b", "p", 1, 0.2)]
    sft, _, counts = build(rows, ALL_SFT, seed=0)
    assert [(r["model"], r["response"], r["reward"]) for r in sft] == [("b", "b/p/0", 0.9)]
    assert counts["sft"] == {"prompts": 1, "kept": 1}


def test_sft_on_a_verifiable_prompt_takes_the_best_correct_response_and_drops_all_failing():
    rows = [row("a", "p", 0, 0.9, passed=False), row("a", "p", 1, 0.4, passed=True),
            row("b", "p", 0, 0.6, passed=True), row("a", "q", 0, 0.9, passed=False), row("b", "q", 0, 0.1, False)]
    sft, _, counts = build(rows, ALL_SFT, seed=0)
    assert [r["response"] for r in sft] == ["b/p/0"]  # the highest reward among the correct ones, not overall
    assert counts["sft"] == {"prompts": 2, "kept": 1, "dropped: every response fails": 1}


def test_a_pair_comes_from_one_source_its_best_against_its_worst():
    # across sources the gap would be 0.9 - 0.1; within a source it is 0.05 (a) and 0.08 (b)
    rows = [row("a", "p", 0, 0.90), row("a", "p", 1, 0.85), row("b", "p", 0, 0.18), row("b", "p", 1, 0.10)]
    _, pairs, _ = build(rows, ALL_PREFERENCE, seed=0)
    assert [(p["model"], p["chosen"], p["rejected"]) for p in pairs] == [("a", "a/p/0", "a/p/1")]
    assert pairs[0]["chosen_reward"] - pairs[0]["rejected_reward"] == 0.90 - 0.85


def test_the_margin_window_drops_pairs_too_close_or_too_far_apart():
    rows = [row("a", "close", 0, 0.500), row("a", "close", 1, 0.495),  # 0.005 < 0.01
            row("a", "far", 0, 0.9), row("a", "far", 1, 0.2),  # 0.7 > 0.1
            row("a", "ok", 0, 0.55), row("a", "ok", 1, 0.50)]
    _, pairs, counts = build(rows, ALL_PREFERENCE, seed=0)
    assert [p["prompt_id"] for p in pairs] == ["ok"]
    assert counts["preference"] == {"prompts": 3, "kept": 1, "dropped: reward margin below 0.01": 1,
                                    "dropped: reward margin above 0.1": 1}
    _, pairs, _ = build(rows, PairsConfig(sft_share=0.0, min_margin=None, max_margin=None), seed=0)
    assert [p["prompt_id"] for p in pairs] == ["close", "far", "ok"]  # the window is a recipe key


def test_of_several_sources_with_a_pair_the_one_with_the_best_chosen_response_supplies_it():
    rows = [row("a", "p", 0, 0.60), row("a", "p", 1, 0.55), row("b", "p", 0, 0.70), row("b", "p", 1, 0.65),
            row("c", "p", 0, 0.95), row("c", "p", 1, 0.20)]  # c's best is best overall, but its gap is out
    _, pairs, _ = build(rows, ALL_PREFERENCE, seed=0)
    assert [(p["model"], p["chosen"]) for p in pairs] == [("b", "b/p/0")]


def test_without_same_source_the_pair_is_the_best_and_worst_across_sources():
    rows = [row("a", "p", 0, 0.60), row("a", "p", 1, 0.58), row("b", "p", 0, 0.62), row("b", "p", 1, 0.55)]
    _, pairs, _ = build(rows, PairsConfig(sft_share=0.0, same_source=False), seed=0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b/p/0", "b/p/1")]
    rows = [row("a", "p", 0, 0.60), row("a", "p", 1, 0.58), row("b", "p", 0, 0.55), row("b", "p", 1, 0.62)]
    _, pairs, _ = build(rows, PairsConfig(sft_share=0.0, same_source=False), seed=0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b/p/1", "b/p/0")]


def test_a_verifiable_pair_is_the_best_correct_against_the_worst_incorrect():
    rows = [row("a", "p", 0, 0.50, passed=True), row("a", "p", 1, 0.56, passed=True),
            row("a", "p", 2, 0.58, passed=False), row("a", "p", 3, 0.52, passed=False)]
    _, pairs, _ = build(rows, ALL_PREFERENCE, seed=0)
    # the highest reward overall is incorrect: it is never chosen; the lowest-reward incorrect one is rejected
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a/p/1", "a/p/3")]


def test_verifiable_prompts_without_a_failing_or_a_passing_response_give_no_pair():
    rows = [row("a", "all-pass", s, 0.5 + 0.01 * s, passed=True) for s in range(3)]
    rows += [row("a", "all-fail", s, 0.5 + 0.01 * s, passed=False) for s in range(3)]
    rows += [row("b", "all-fail", s, 0.5 + 0.01 * s, passed=False) for s in range(3)]
    _, pairs, counts = build(rows, ALL_PREFERENCE, seed=0)
    assert pairs == []
    assert counts["preference"] == {"prompts": 2, "dropped: no failing response to reject": 1,
                                    "dropped: every response fails": 1}


def test_verified_pairs_ignore_the_window_when_asked_and_pairs_without_rewards_are_kept():
    rows = [row("a", "p", 0, 0.9, passed=True), row("a", "p", 1, 0.1, passed=False)]
    assert build(rows, ALL_PREFERENCE, seed=0)[1] == []
    assert len(build(rows, PairsConfig(sft_share=0.0, margin_on_verified=False), seed=0)[1]) == 1
    rows = [row("a", "p", 0, None, passed=True), row("a", "p", 1, None, passed=False)]  # verifiers only
    assert [(p["chosen"], p["rejected"]) for p in build(rows, ALL_PREFERENCE, seed=0)[1]] == [("a/p/0", "a/p/1")]


def test_unrankable_prompts_are_dropped_and_counted():
    rows = [row("a", "p", 0, None), row("a", "p", 1, None), row("a", "q", 0, 0.3), row("a", "q", 1, 0.3)]
    _, pairs, counts = build(rows, ALL_PREFERENCE, seed=0)
    assert pairs == []
    assert counts["preference"] == {"prompts": 2, "dropped: nothing ranks the responses (no verdict, no reward)": 1,
                                    "dropped: all responses score the same": 1}
    summary = format_counts(counts)
    assert "preference: 2 prompts, 0 kept, 2 dropped" in summary and "all responses score the same" in summary


def test_wrpo_triples_pair_the_best_source_response_with_the_targets_best_and_worst():
    sources = [row("a", "p", 0, 0.7), row("b", "p", 0, 0.9), row("a", "q", 0, 0.5)]
    target = [row("sft", "p", s, r) for s, r in enumerate((0.40, 0.45, 0.38))]
    target += [row("sft", "q", s, 0.3) for s in range(3)]  # all equal: nothing to prefer
    out, counts = triples(sources, target, ["p", "q", "r"], PairsConfig())
    assert [(t["source_chosen"], t["chosen"], t["rejected"]) for t in out] == [("b/p/0", "sft/p/1", "sft/p/2")]
    assert counts == {"prompts": 3, "kept": 1, "dropped: target samples: all responses score the same": 1,
                      "dropped: no passing source response": 1}


def test_empty_responses_are_left_out_and_counted():
    rows = [row("a", "p", 0, 0.9), row("a", "p", 1, 0.5), row("a", "p", 2, 0.48)]
    rows[0]["text"] = "  "  # a model that ended its turn at once
    _, pairs, counts = build(rows, ALL_PREFERENCE, seed=0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a/p/1", "a/p/2")]
    assert counts["preference"]["empty responses left out"] == 1
    assert "1 empty responses left out" in format_counts(counts)
