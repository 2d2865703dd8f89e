"""`SFTModule`: supervised fine-tuning of a chat model on the assistant's turns only.

The loss is the mean next-token cross-entropy over the tokens the data labels, the assistant's turns and their
end-of-turn markers (`fusion.data.chat.ChatDataModule`); prompts, system messages and padding carry -100 and add
nothing. A batch whose conversations have no labelled token cannot happen: the data module drops such
conversations. The chat fusion methods subclass it (their objectives add terms on the same labelled tokens).
"""

from __future__ import annotations

import torch

from fusion.modules.base import CausalLMModule
from fusion.modules.losses import IGNORE_INDEX, next_token_targets


class SFTModule(CausalLMModule):
    """`CausalLMModule` on chat batches: the loss and the validation perplexity count assistant tokens only."""

    @classmethod
    def objective(cls, **kwargs) -> str:
        if cls is SFTModule:
            return "SFT (next-token cross-entropy on assistant tokens)"
        return super().objective(**kwargs)

    def training_loss(self, batch: dict) -> torch.Tensor:
        parts = self.vocab_loss(batch)
        if self._trainer is not None:  # how much of each batch is trained: the prompts are not
            trained = (next_token_targets(batch["labels"]) != IGNORE_INDEX).sum()
            self.log("train/assistant_tokens", trained.float())
        return parts.loss
