"""`clm`: continual causal-LM training of the target, the baseline every fusion method is compared with.

    baseline -> train -> export -> evaluate
"""

from __future__ import annotations

from fusion.data.text import TextDataModule
from fusion.methods.base import Method
from fusion.modules.base import CausalLMModule
from fusion.stages.training import Baseline, Evaluate, Export, Train


def text_datamodule(ctx) -> TextDataModule:
    """Packed blocks of the recipe's corpus, tokenized by the target's tokenizer."""
    r = ctx.recipe
    return TextDataModule(r.data, ctx.tokenizer_path, r.trainer.batch_size, seed=r.seed,
                          trust_remote_code=r.model.trust_remote_code)


class CLM(Method):
    name = "clm"
    summary = "continual causal-LM training of the target on its own tokens"
    stages = (Baseline(), Train(), Export(), Evaluate())
    module = CausalLMModule

    def datamodule(self, ctx) -> TextDataModule:
        return text_datamodule(ctx)
