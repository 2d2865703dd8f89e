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
from fusion.interrupt import Interrupted, signals_handled
from fusion.pipeline import plan, run
from fusion.recipe import load_recipe


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
        with signals_handled():
            run(recipe)
    except FusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        detail = f": {stop.detail}" if stop.detail else ""
        print(f"interrupted by {stop.signal_name}{detail}; run the same command again to resume", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # before the handlers were installed
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
