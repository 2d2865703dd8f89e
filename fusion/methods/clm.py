"""`clm`: continual causal-LM training of the target, the baseline every fusion method is compared with.

    baseline -> train -> export -> evaluate

It trains on the chunk set's rows (`fusion.data.chunks`: packed like blocks of ``data.block_size`` target
tokens) in the order every method shares (`fusion.data.rows`), so that on the same seed it sees the batches a
fusion run sees, and the comparison measures the teachers, not two draws of data.
"""

from __future__ import annotations

from fusion.data.prepare import prepare_chunks
from fusion.data.rows import RowBatches, RowDataModule, all_rows
from fusion.data.text import TextDataModule, load_tokenizer
from fusion.methods.base import Method
from fusion.modules.base import CausalLMModule
from fusion.stages.training import ROWS_VERSION, TRAINING, Baseline, Evaluate, Export, Train

# What clm's training depends on: not the teachers, the fusion settings or how many chunks they read; the rows'
# order after the first epoch follows representations.chunks_per_shard (`row_datamodule`).
CLM_TRAINING = (*(k for k in TRAINING if k not in ("teachers", "representations", "fusion")),
                "representations.chunks_per_shard")


def text_datamodule(ctx) -> TextDataModule:
    """Packed blocks of the recipe's held-out text, tokenized by the target's tokenizer: what validation reads."""
    r = ctx.recipe
    return TextDataModule(r.data, ctx.tokenizer_path, r.trainer.batch_size, seed=r.seed,
                          trust_remote_code=r.model.trust_remote_code)


def row_datamodule(ctx) -> RowDataModule:
    """Every row of the recipe's chunk set, in the shared order (`fusion.data.rows`), and the held-out blocks."""
    r = ctx.recipe
    tokenizer = load_tokenizer(ctx.tokenizer_path, r.model.trust_remote_code)
    folder, _, _ = prepare_chunks(r, tokenizer)
    rows = all_rows(folder)

    def batches(rank: int, world_size: int) -> RowBatches:
        # epochs after the first: shuffled within windows of representations.chunks_per_shard, as a fusion run's
        return RowBatches(folder, rows, r.trainer.batch_size, r.seed, rank, world_size, tokenizer.pad_token_id,
                          r.representations.chunks_per_shard)

    return RowDataModule(folder, rows, text_datamodule(ctx), r.trainer.batch_size, batches,
                         "add training text or lower trainer.batch_size", r.data.num_workers)


class CLM(Method):
    name = "clm"
    summary = "continual causal-LM training of the target on its own tokens"
    stages = (Baseline(), Train(config=CLM_TRAINING, version=ROWS_VERSION), Export(), Evaluate())
    module = CausalLMModule

    def datamodule(self, ctx) -> RowDataModule:
        return row_datamodule(ctx)
