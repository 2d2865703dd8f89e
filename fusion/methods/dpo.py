"""`dpo`: preference optimisation of a chat model on prompt/chosen/rejected rows (DPO, LN-DPO, IPO, cDPO).

    reference -> baseline -> accuracy -> train -> export -> evaluate

What a TRL user runs with `DPOTrainer`: `data.source` holds the pairs (each field a string or messages; UltraFeedback-
binarized's form works as it is), `preference` the loss. The reference is the model training starts from, its
log-probabilities computed once by the `reference` stage (or online: `preference.reference`). Validation is the
perplexity of held-out chosen conversations (`data.validation_split`, or `data.validation_fraction` of the rows).
"""

from __future__ import annotations

from fusion.config import DataConfig, Recipe
from fusion.data.chat import chat_datamodule
from fusion.data.preference import PAIR, PreferenceDataModule
from fusion.errors import FusionError
from fusion.methods.base import Method
from fusion.methods.sft import check_chat
from fusion.modules.dpo import DPOModule
from fusion.stages.chat import ACCURACY, Accuracy, ChatEvaluate
from fusion.stages.preference import Reference
from fusion.stages.training import EVALUATION, TRAINING, Baseline, Export, Train

PREFERENCE_TRAINING = (*TRAINING, "chat", "preference")


def check_preference(recipe: Recipe, method: str) -> None:
    """The `preference` keys (and the `pairs` and `sft` ones the methods that build pairs read)."""
    p, c = recipe.preference, recipe.chat

    def fail(key: str, problem: str) -> None:
        raise FusionError(f"recipe key {key!r}: {problem}")

    if p.beta <= 0:
        fail("preference.beta", f"must be positive, got {p.beta}")
    if not 0 <= p.label_smoothing < 0.5:
        fail("preference.label_smoothing", f"must be in [0, 0.5), got {p.label_smoothing}")
    if p.label_smoothing and p.loss_type == "ipo":
        fail("preference.label_smoothing", "applies to the sigmoid losses, not to ipo; set it to 0")
    if not 1 <= p.max_prompt_length < c.max_length:
        fail("preference.max_prompt_length", f"must be at least 1 and below chat.max_length={c.max_length} (the "
                                             f"responses need room), got {p.max_prompt_length}")
    if p.reference == "online" and recipe.trainer.strategy in ("fsdp", "deepspeed"):
        fail("preference.reference", f"online runs an unsharded copy of the model beside the policy, which "
                                     f"{recipe.trainer.strategy} shards; use precomputed")
    if method in ("fusechat3", "wrpo"):
        s, pairs = recipe.sft, recipe.pairs
        if not 0 < pairs.sft_share < 1:
            fail("pairs.sft_share", f"must be in (0, 1): {method} needs prompts for SFT and for preference pairs, got "
                                    f"{pairs.sft_share}")
        if None not in (pairs.min_margin, pairs.max_margin) and pairs.min_margin > pairs.max_margin:
            fail("pairs.min_margin", f"{pairs.min_margin} is above pairs.max_margin={pairs.max_margin}")
        for key, value in (("sft.batch_size", s.batch_size), ("sft.accumulate_grad_batches", s.accumulate_grad_batches),
                           ("sft.max_epochs", s.max_epochs)):
            if value < 1:
                fail(key, f"must be at least 1, got {value}")
    if method == "wrpo":
        if not 0 <= p.alpha <= 1:
            fail("preference.alpha", f"must be in [0, 1], got {p.alpha}")
        if p.samples < 2:
            fail("preference.samples", f"the SFT model's best and worst need at least 2 samples, got {p.samples}")


def preference_kwargs(recipe: Recipe) -> dict:
    """`DPOModule`'s arguments from the recipe's `preference` section."""
    p = recipe.preference
    return {"loss_type": p.loss_type, "beta": p.beta, "label_smoothing": p.label_smoothing, "reference": p.reference}


def preference_datamodule(ctx, data: DataConfig, responses: tuple[str, ...]) -> PreferenceDataModule:
    """Preference rows from ``data``, validated on the recipe's held-out conversations; the reference log-probs are
    the ``reference`` stage's file once it has run."""
    r = ctx.recipe

    def reference():
        record = ctx.records.get("reference")
        path = record and record["result"].get("path")
        return ctx.dir / path if path else None

    return PreferenceDataModule(data, r.chat, ctx.tokenizer_path, r.trainer.batch_size, r.seed,
                                r.preference.max_prompt_length, responses, chat_datamodule(r, ctx.tokenizer_path),
                                reference, r.model.trust_remote_code)


class DPO(Method):
    name = "dpo"
    summary = "preference optimisation (DPO, length-normalised DPO, IPO) on prompt/chosen/rejected rows"
    module = DPOModule
    stages = (Reference(), Baseline(config=(*EVALUATION, "chat")), Accuracy(),
              Train(needs=("reference",), config=PREFERENCE_TRAINING), Export(),
              ChatEvaluate(config=(*EVALUATION, *ACCURACY)))

    def check(self, recipe: Recipe) -> None:
        if recipe.data.source == "embedded":
            raise FusionError("recipe key 'data.source': dpo trains on preference rows (prompt, chosen, rejected); "
                              "name a dataset or JSONL file of them, or run fusechat3 on the embedded chat tasks")
        check_chat(recipe)
        check_preference(recipe, self.name)

    def module_kwargs(self, recipe: Recipe) -> dict:
        return preference_kwargs(recipe)

    def describe_data(self, recipe: Recipe) -> str:
        d, c = recipe.data, recipe.chat
        return (f"{d.source}: prompt/chosen/rejected rows, at most {c.max_length} tokens each (prompts cut to their "
                f"last {recipe.preference.max_prompt_length}); held out: split {d.validation_split!r} or "
                f"{d.validation_fraction:.0%} of the chosen conversations")

    def datamodule(self, ctx) -> PreferenceDataModule:
        return preference_datamodule(ctx, ctx.recipe.data, PAIR)
