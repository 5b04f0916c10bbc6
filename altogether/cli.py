"""The ``altogether`` command and what every entry point shares: logging set-up, user mistakes as one line.

``altogether SUBCOMMAND ...`` dispatches to the ``main(argv)`` of a library module; ``python -m altogether.X``
runs the same function. Subcommand modules are imported only when chosen, so ``altogether --help`` is fast.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from typing import Callable, NamedTuple, Sequence

from .config import ConfigError
from .export import ExportError
from .model import WeightsUnavailableError

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # 143, the shell's code for "ended by SIGTERM": a job script requeues
USER_ERRORS = (ConfigError, ExportError, WeightsUnavailableError, FileNotFoundError, ValueError)


class Subcommand(NamedTuple):
    module: str  # holds ``main(argv) -> int``
    summary: str  # the one line ``altogether --help`` shows
    preset: tuple[str, ...] = ()  # arguments put before the user's


# Grammars: train, demo, recaption, evaluate and cache-embeddings take key=value settings; annotate, mix, hub
# and plot take argparse flags.
SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand("altogether.train", "train a recipe and write its export: recipe=NAME [key=value ...]"),
    "demo": Subcommand("altogether.train", "train and evaluate the CPU demo recipe: [key=value ...]",
                       ("recipe=demo",)),
    "recaption": Subcommand("altogether.recaption", "caption shards of images: MODEL INPUT OUTPUT [key=value ...]"),
    "evaluate": Subcommand("altogether.evaluate", "Table 1 metrics of a model on a data set: MODEL DATA [key=value ...]"),
    "cache-embeddings": Subcommand("altogether.cache_embeddings",
                                   "cache image embeddings of a recipe's data: recipe=NAME cache_dir=PATH"),
    "annotate": Subcommand("altogether.annotate", "human annotation rounds: prefill, merge, stats, FT conversion"),
    "mix": Subcommand("altogether.mix", "mix alt-texts and synthetic captions into a training set"),
    "hub": Subcommand("altogether.hub", "push a run's export to the Hugging Face Hub"),
    "plot": Subcommand("altogether.plot", "plot a training run's loss curves to a PNG"),
}


def usage() -> str:
    """``altogether --help``: one line per subcommand."""
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    return ("usage: altogether SUBCOMMAND [ARGS ...]   (altogether SUBCOMMAND --help for its arguments)\n\n"
            "subcommands:\n" + "\n".join(lines) + "\n\nALTOGETHER_DEBUG=1 shows tracebacks of user errors.")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``altogether`` console script: run a subcommand; exit 2 with one line for an unknown one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    sub = SUBCOMMANDS.get(name)
    if sub is None:
        print(f"error: unknown subcommand {name!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    return run_cli(importlib.import_module(sub.module).main, [*sub.preset, *rest])


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a user mistake prints ``error: ...`` on stderr and returns 2 instead of a traceback.

    ``ALTOGETHER_DEBUG=1`` shows the traceback.
    """
    _configure_logging()
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as err:
        if os.environ.get("ALTOGETHER_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()


def _drop_advertisements(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip:")  # Lightning's litlogger / litmodels promotions


def _configure_logging() -> None:
    """Our own progress lines at INFO; other libraries only when they warn; Lightning's lines once, no adverts.

    ``import lightning`` gives the ``lightning`` logger its own console handler while its records also propagate
    to the root handler set here, so every Lightning line would print twice: stop them at Lightning's handler.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("altogether", "__main__"):  # a module run with `python -m` logs as __main__
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("lightning").propagate = False
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where Lightning's rank_zero_info logs
    if _drop_advertisements not in rank_zero.filters:
        rank_zero.addFilter(_drop_advertisements)


def _close_process_group() -> None:
    """Tear down a distributed run's process group before exit: Lightning leaves it open, and gloo's threads
    still running at interpreter exit can abort the process ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
