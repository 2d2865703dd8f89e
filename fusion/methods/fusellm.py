"""`fusellm`: FuseLLM, continual training of the target on the fused, aligned top-k distributions of its teachers.

    representations -> alignment -> baseline -> train -> export -> evaluate
"""

from __future__ import annotations

from pathlib import Path

from fusion.config import Recipe, TeacherConfig
from fusion.data.fused import FusionDataModule, loader_memory
from fusion.data.prepare import align_teachers
from fusion.data.text import load_tokenizer
from fusion.errors import FusionError
from fusion.methods.base import Method
from fusion.methods.clm import text_datamodule
from fusion.modules.fusellm import FuseLLMModule
from fusion.stages.teachers import Alignment, Representations
from fusion.stages.training import ROWS_VERSION, Baseline, Evaluate, Export, Train


def fusion_plan(recipe: Recipe, teachers: list[TeacherConfig]) -> list[str]:
    """The plan's lines on the teachers, their representations and how they are fused."""
    f, rep = recipe.fusion, recipe.representations
    listed = ", ".join(f"{t.label} ({t.path}" + (f", {t.quantization}" if t.quantization != "none" else "") + ")"
                       for t in teachers)
    chunks = "all chunks" if rep.max_chunks is None else f"first {rep.max_chunks} chunks"
    return [f"teachers  {listed}",
            f"reps      top-{rep.top_k}, {rep.chunks_per_shard} chunks per shard, {chunks}, batch {rep.batch_size}",
            f"fusion    {f.function} at {f.level_label}, {f.alignment} alignment, lambda {f.clm_weight:g} "
            f"({f.clm_weight_schedule}), top-k tail {f.tail}, temperature {f.temperature:g}"]


class FuseLLM(Method):
    name = "fusellm"
    summary = "FuseLLM: the target learns from its tokens and the fused top-k distributions of its teachers"
    stages = (Representations(), Alignment(), Baseline(), Train(needs=("alignment",), version=ROWS_VERSION), Export(),
              Evaluate())
    module = FuseLLMModule

    def check(self, recipe: Recipe) -> None:
        if not recipe.teachers:
            raise FusionError("recipe key 'teachers': method 'fusellm' needs at least one teacher, "
                              "e.g. teachers: [{path: zoo:gpt2-code}]")

    def plan(self, recipe: Recipe) -> list[str]:
        return [*fusion_plan(recipe, recipe.teachers), f"loader    {loader_memory(recipe).describe()}"]

    def datamodule(self, ctx) -> FusionDataModule:
        r = ctx.recipe
        reps = ctx.record("representations")
        teachers, rates = ctx.artifacts.get("aligned_teachers") or align_teachers(
            r, r.fusion.alignment, Path(reps["chunks"]), reps["chunk_info"])
        bad = {c for rate in rates.values() for c in rate["bad_chunks"]}
        tokenizer = load_tokenizer(ctx.tokenizer_path, r.model.trust_remote_code)
        return FusionDataModule(Path(reps["chunks"]), teachers, reps["used_chunks"], bad, self.validation_data(ctx),
                                r.trainer.batch_size, r.seed, keep_exact_only=r.fusion.alignment == "exact",
                                pad_id=tokenizer.pad_token_id, num_workers=r.data.num_workers)

    def validation_data(self, ctx):
        """The data module whose held-out sets validation reads: the corpus's text blocks."""
        return text_datamodule(ctx)

    def module_kwargs(self, recipe: Recipe) -> dict:
        return {"fusion": recipe.fusion, "teacher_labels": tuple(t.label for t in recipe.teachers)}
