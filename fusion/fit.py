"""Run a recipe end to end.

    python -m fusion.fit --recipe clm.yaml                       # the embedded default, on a laptop
    python -m fusion.fit --recipe clm.yaml trainer.max_steps=20  # dotted.key=value overrides
    python -m fusion.fit --recipe clm-llama2-7b.yaml --dry-run   # check and print the plan, load nothing

A recipe name is looked up in the shipped `recipes/` folder unless it is a path. Re-running the
same command resumes: finished stages are skipped and training continues from its checkpoint.
Mistakes in the recipe, paths or data exit with code 2 and one line that says what to fix.
"""

from __future__ import annotations

import argparse
import sys

from fusion.errors import FusionError
from fusion.recipe import Recipe, load_recipe, module_class


def plan(recipe: Recipe) -> str:
    """What a run of this recipe will do, without loading anything heavy."""
    from fusion.loggers import wandb_mode
    from fusion.pipeline import STAGES, model_dtype

    t, d, o = recipe.trainer, recipe.data, recipe.optim
    devices = f"{t.devices} device(s) x {t.num_nodes} node(s)"
    per_step = f"{t.batch_size} x {t.accumulate_grad_batches} accumulation per device"
    strategy = t.strategy
    if t.strategy == "fsdp":
        f = recipe.fsdp
        strategy += (f" ({f.sharding_strategy}, wrap {', '.join(f.wrap) or 'model default'}, "
                     f"activation checkpointing {f.activation_checkpointing}, {f.state_dict_type} state dict)")
    elif t.strategy == "deepspeed":
        strategy += f" (ZeRO stage {recipe.deepspeed.stage}, offload optimizer {recipe.deepspeed.offload_optimizer})"
    source = f"{d.source}" + (f" [{', '.join(d.domains)}]" if d.source == "embedded" else "")
    lines = [
        f"recipe    {recipe.name} ({recipe.source_file})",
        f"method    {recipe.method}: stages {' -> '.join(STAGES[recipe.method])}",
        f"output    {recipe.run_dir}/ (recipe.yaml, metrics.jsonl, checkpoints/, model/, results.md)",
        f"model     {recipe.model.path} (dtype {model_dtype(recipe)}, gradient checkpointing "
        f"{recipe.model.gradient_checkpointing}, module {module_class(recipe).__name__})",
        f"data      {source}, block {d.block_size} tokens, validation: split {d.validation_split!r} "
        f"or {d.validation_fraction:.0%} held out",
        f"optim     {o.name} lr {o.lr:g}, weight decay {o.weight_decay:g}, betas {tuple(o.betas)}, "
        f"{o.schedule} schedule, warmup {o.warmup_ratio:g}",
        f"trainer   {devices}, strategy {strategy}, precision {t.precision}, batch {per_step}, "
        f"{'max_steps ' + str(t.max_steps) if t.max_steps > 0 else str(t.max_epochs) + ' epoch(s)'}, "
        f"clip {t.gradient_clip_val}, checkpoint every {t.checkpoint_every_n_steps} steps",
        f"logging   W&B {wandb_mode(recipe.wandb)} (project {recipe.wandb.project}), metrics.jsonl",
    ]
    if recipe.method == "fusellm":
        f, rep = recipe.fusion, recipe.representations
        teachers = ", ".join(f"{t.label} ({t.path}" + (f", {t.quantization}" if t.quantization != "none" else "") + ")"
                             for t in recipe.teachers)
        lines += [
            f"teachers  {teachers}",
            f"reps      top-{rep.top_k}, {rep.chunks_per_shard} chunks per shard, "
            f"{'all chunks' if rep.max_chunks is None else f'first {rep.max_chunks} chunks'}, batch {rep.batch_size}",
            f"fusion    {f.function} at {f.level} level, {f.alignment} alignment, loss {f.clm_weight:g} x CLM + "
            f"{1 - f.clm_weight:g} x {f.loss.upper()} ({f.clm_weight_schedule}), temperature {f.temperature:g}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion.fit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--recipe", required=True, help="a shipped recipe name (e.g. clm.yaml) or a path")
    parser.add_argument("--dry-run", action="store_true", help="check the recipe and print the plan, load nothing")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="recipe values to override")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        print(plan(recipe))
        if args.dry_run:
            return 0
        from fusion.pipeline import run

        run(recipe)
    except FusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
