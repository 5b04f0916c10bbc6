"""What every command-line entry point shares: logging set-up and turning user mistakes into one line."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from .config import ConfigError
from .export import ExportError
from .model import WeightsUnavailableError

USER_ERRORS = (ConfigError, ExportError, WeightsUnavailableError, FileNotFoundError, ValueError)


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a user mistake prints ``error: ...`` on stderr and returns 2 instead of a traceback.

    ``ALTOGETHER_DEBUG=1`` shows the traceback.
    """
    # Our own progress lines at INFO; other libraries only when they warn (Lightning prints its own lines).
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("altogether", "__main__"):  # a module run with `python -m` logs as __main__
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as err:
        if os.environ.get("ALTOGETHER_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down a distributed run's process group before exit: Lightning leaves it open, and gloo's threads
    still running at interpreter exit can abort the process ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
