"""`fusechat3` and `wrpo`: implicit fusion. The sources are sampled and scored, the target learns from their best
responses by SFT, then from preference pairs; no token alignment at all.

    fusechat3   sample -> score -> pairs -> sft -> reference -> baseline -> accuracy -> train (DPO) -> export
                -> evaluate
    wrpo        sample -> score -> pairs -> sft -> on-policy -> reference -> baseline -> accuracy -> train (WRPO)
                -> export -> evaluate

FuseChat-3.0 (``shared/reference/wrpo_fusechat3.md`` §1-2): `pairs.sft_share` of the prompts (4:6) train SFT on the
best response across the sources, the rest give DPO pairs from one source's best and worst responses within a reward
gap window (`fusion.data.pairs`); DPO (length-normalised for Llama: ``preference.loss_type: sigmoid_norm``) starts
from the SFT model, which is also its reference. WRPO: the SFT model samples the preference prompts itself
(`preference.samples`); the best and worst of its samples are chosen and rejected, and the best source response
enters the chosen reward with a weight α growing to `preference.alpha` (`fusion.modules.wrpo`). The SFT is a sub-run
in ``branches/sft/`` (its settings: the `sft` section); the evaluation puts the target, the SFT model and the final
model side by side.
"""

from __future__ import annotations

from fusion.config import DataConfig, Recipe
from fusion.data.preference import PAIR, TRIPLE, PreferenceDataModule
from fusion.methods.base import Method
from fusion.methods.dpo import PREFERENCE_TRAINING, check_preference, preference_datamodule, preference_kwargs
from fusion.methods.sample import check_sampling
from fusion.methods.sft import SFT, chat_source, check_chat
from fusion.modules.dpo import DPOModule
from fusion.modules.wrpo import WRPOModule
from fusion.stages.chat import Accuracy, PreferenceEvaluate
from fusion.stages.preference import PAIRS_DIR, OnPolicy, Pairs, Reference, SFTPhase
from fusion.stages.sampling import Sample, Score
from fusion.stages.training import EVALUATION, TRAINING, Baseline, Export, Train


class PairsSFT(SFT):
    """SFT on the pairs stage's examples, as the `sft` stage's sub-run."""

    # The examples' file moves with the run folder; what it holds is the parent's business (`SFTPhase`).
    open_keys = ("data.source",)


SFT_PHASE = SFTPhase(method=PairsSFT(), stages=(Train(config=(*TRAINING, "chat")), Export()))


def sft_line(recipe: Recipe) -> str:
    s = recipe.sft
    length = f"max_steps {s.max_steps}" if s.max_steps > 0 else f"{s.max_epochs} epoch(s)"
    return (f"sft       {s.optim.name} lr {s.optim.lr:g} {s.optim.schedule} (warmup {s.optim.warmup_ratio:g}), batch "
            f"{s.batch_size} x {s.accumulate_grad_batches}, {length}: the best source responses")


class FuseChat3(Method):
    name = "fusechat3"
    summary = "FuseChat-3.0: sources sampled and scored, SFT on their best responses, then DPO on same-source pairs"
    module = DPOModule
    outputs = ("recipe.yaml, stages/, samples/, pairs/, pairs.md, branches/sft/ (the SFT run), reference/, "
               "checkpoints/, model/, results.md")
    # Another loss, β, SFT or pair rule on the same samples: the stages that depend on the change run again.
    open_keys = ("pairs", "sft", "preference", "optim", "trainer", "evaluate")
    responses = PAIR
    pairs_file = "preference.jsonl"
    stages = (Sample(), Score(), Pairs(), SFT_PHASE, Reference(needs=("pairs", "sft"), start_from="sft"),
              Baseline(config=(*EVALUATION, "chat")), Accuracy(),
              Train(needs=("reference",), start_from="sft", config=PREFERENCE_TRAINING), Export(),
              PreferenceEvaluate())

    def check(self, recipe: Recipe) -> None:
        check_sampling(recipe)
        check_chat(recipe)
        check_preference(recipe, self.name)

    def module_kwargs(self, recipe: Recipe) -> dict:
        return preference_kwargs(recipe)

    def describe_data(self, recipe: Recipe) -> str:
        s = recipe.sampling
        return (f"{s.n} samples per prompt from each of {', '.join(m.label for m in s.models)}; validation: "
                f"{chat_source(recipe)}")

    def plan(self, recipe: Recipe) -> list[str]:
        p = recipe.preference
        return [sft_line(recipe),
                f"pairs     at most {recipe.chat.max_length} tokens per response with its prompt; prompts cut to their "
                f"last {p.max_prompt_length} tokens when longer"]

    def datamodule(self, ctx) -> PreferenceDataModule:
        d = ctx.recipe.data
        rows = DataConfig(source=str(ctx.dir / PAIRS_DIR / self.pairs_file), validation_split=None,
                          cache_dir=d.cache_dir, num_workers=d.num_workers)
        return preference_datamodule(ctx, rows, self.responses)


class WRPO(FuseChat3):
    name = "wrpo"
    summary = "WRPO: SFT on the sources' best, then preference pairs of the SFT model's own samples, the source's " \
              "best response weighted into the chosen side"
    module = WRPOModule
    responses = TRIPLE
    pairs_file = "wrpo.jsonl"
    stages = (Sample(), Score(), Pairs(), SFT_PHASE, OnPolicy(),
              Reference(needs=("on-policy", "sft"), start_from="sft"), Baseline(config=(*EVALUATION, "chat")),
              Accuracy(), Train(needs=("reference",), start_from="sft", config=PREFERENCE_TRAINING), Export(),
              PreferenceEvaluate())

    def module_kwargs(self, recipe: Recipe) -> dict:
        p = recipe.preference
        return {**super().module_kwargs(recipe), "alpha": p.alpha, "dynamic_alpha": p.dynamic_alpha}
