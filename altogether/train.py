"""``python -m altogether.train recipe=NAME key=value ...``: train a recipe and write its export."""

from __future__ import annotations

import sys

from .cli import SIGTERM_EXIT_CODE, run_cli
from .config import ConfigError, available_recipes, load_recipe, recipe_pipeline, to_yaml

USAGE = "usage: python -m altogether.train recipe=NAME [key=value ...]   (recipes: {})"


def main(argv: list[str]) -> int:
    if not argv or "-h" in argv or "--help" in argv:  # anywhere: `altogether demo --help` puts recipe= first
        print(USAGE.format(", ".join(available_recipes())))
        return 0 if argv else 2
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"arguments must be key=value, got {' '.join(bad)!r}")
    recipe = [a.split("=", 1)[1] for a in argv if a.startswith("recipe=")]
    if not recipe:
        raise ConfigError("no recipe given: add recipe=NAME; recipes: " + ", ".join(available_recipes()))
    overrides = [a for a in argv if not a.startswith("recipe=")]
    cfg = load_recipe(recipe[-1], overrides)
    if cfg.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    if cfg.pipeline is not None:  # a recipe run by a plug-in (several stages, say)
        return recipe_pipeline(cfg.pipeline).run(cfg)
    from .training import TrainingInterrupted, fit

    try:
        print(f"export: {fit(cfg)}")
    except TrainingInterrupted as stop:
        print(f"error: {stop}", file=sys.stderr)
        return SIGTERM_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
