"""The ``altogether`` command and what every entry point shares: one argument grammar, logging set-up, user
mistakes as one line.

``altogether SUBCOMMAND ...`` dispatches to the ``main(argv)`` of a library module; ``python -m altogether.X``
runs the same function. Subcommand modules are imported only when chosen, so ``altogether --help`` is fast.

The grammar: ``POSITIONAL ... [key=value ...]``. An argument that starts with a setting's name and ``=``
(``seed=3``, ``demo.seed=3``) is a setting, anything else (paths, Hub ids) is positional: a file named
``x=1.txt`` is given as ``./x=1.txt``, one named ``-x`` as ``./-x``. A command declares its
settings once, as a dataclass (:class:`Command`); values are parsed and type-checked by OmegaConf, as recipe
overrides are (``swap=true``, ``p=0.5``, ``alt_text_sources=[alt,title]``).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import signal
import sys
from typing import Any, Callable, Iterable, NamedTuple, Sequence, TypeVar

from .config import ConfigError
from .export import ExportError
from .model import WeightsUnavailableError

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # 143, the shell's code for "ended by SIGTERM": a job script requeues
USER_ERRORS = (ConfigError, ExportError, WeightsUnavailableError, FileNotFoundError, ValueError)


class Subcommand(NamedTuple):
    module: str  # holds ``main(argv) -> int``
    summary: str  # the one line ``altogether --help`` shows
    preset: tuple[str, ...] = ()  # arguments put before the user's


SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand("altogether.train", "train a recipe and write its export: recipe=NAME [key=value ...]"),
    "demo": Subcommand("altogether.train", "train and evaluate the CPU demo recipe: [key=value ...]",
                       ("recipe=demo",)),
    "recaption": Subcommand("altogether.recaption", "caption shards of images: MODEL INPUT OUTPUT [key=value ...]"),
    "evaluate": Subcommand("altogether.evaluate", "Table 1 metrics of a model on a data set: MODEL DATA [key=value ...]"),
    "cache-embeddings": Subcommand("altogether.cache_embeddings",
                                   "cache image embeddings of a recipe's data: recipe=NAME cache_dir=PATH"),
    "annotate": Subcommand("altogether.annotate", "human annotation rounds: next-round, merge, stats, prefill, "
                                                  "from-ft, to-ft: ACTION FILES ... [key=value ...]"),
    "mix": Subcommand("altogether.mix", "mix alt-texts and synthetic captions into a training set: "
                                        "RECAPTIONS ... out=PATH [key=value ...]"),
    "hub": Subcommand("altogether.hub", "push a run's export to the Hugging Face Hub: push RUN_DIR REPO_ID "
                                        "[key=value ...]"),
    "plot": Subcommand("altogether.plot", "plot a training run's loss curves to a PNG: RUN_DIR [out=PNG]"),
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


# ---------------------------------------------------------------------------------------------- the grammar

Settings = TypeVar("Settings")
T = TypeVar("T")
_SETTING = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*=")  # `key=` or `group.key=`; a path such as a/b=c.txt is positional


def setting(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A settings dataclass field with the line ``--help`` shows for it; no default: the key is required."""
    return dataclasses.field(default=default, metadata={"help": help})


PROGRESS_HELP = "progress bars on stderr when it is a terminal (false: never)"


def progress(items: Iterable[T], desc: str, *, enabled: bool = True, total: int | None = None,
             unit: str = "row") -> Iterable[T]:
    """``items`` counted by a tqdm bar on stderr, drawn only when stderr is a terminal (so logs and captured test
    output get none) and ``enabled`` (a command's ``progress=`` setting, help :data:`PROGRESS_HELP`)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=None if enabled else True)


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(positional, key=value settings)``, each in the order given. An argument naming an existing file or
    folder is positional whatever it holds (a sweep's ``lr=1e-3/export``)."""
    settings = [arg for arg in argv if _SETTING.match(arg) and not os.path.exists(arg)]
    return [arg for arg in argv if arg not in settings], settings


def load_settings(cls: type[Settings], overrides: Sequence[str] | dict[str, Any] | None = None) -> Settings:
    """An instance of the dataclass ``cls`` from ``key=value`` strings or a dict, type-checked by OmegaConf.

    Raises :class:`ConfigError` naming the key: unknown, a value of the wrong type, or a required key missing.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        base = OmegaConf.structured(cls)
        if isinstance(overrides, dict):
            base = OmegaConf.merge(base, OmegaConf.create(overrides))
        elif overrides:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(base)  # type: ignore[return-value]
    except MissingMandatoryValue as err:
        raise ConfigError(f"key {err.full_key!r} is required: add {err.full_key}=...") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{'key ' + repr(key) + ': ' if key else ''}{str(err).splitlines()[0]}") from None


@dataclasses.dataclass(frozen=True)
class Command:
    """One command line: positional arguments, then the ``key=value`` fields of ``settings``.

    ``positional``: name -> help; a name ending in ``...`` takes one or more arguments (at most one such name).
    ``run(positional, settings)`` does the work and returns the exit status.
    """

    summary: str
    positional: dict[str, str]
    settings: type
    run: Callable[[list[str], Any], int]

    def usage(self, prog: str) -> str:
        """The ``--help`` text: the line to type, the positional arguments, every setting with its default."""
        return command_usage(prog, self.summary, self.positional, self.settings)

    def __call__(self, prog: str, argv: Sequence[str]) -> int:
        """Parse ``argv`` and run; ``-h`` / ``--help`` anywhere prints :meth:`usage`. A wrong argument count or
        setting is a :class:`ConfigError` (one line, exit 2 under :func:`run_cli`)."""
        if "-h" in argv or "--help" in argv:
            print(self.usage(prog))
            return 0
        positional, overrides = split_args(argv)
        flags = [arg for arg in positional if arg.startswith("-")]
        if flags:  # the old argparse spelling, most likely; a file named -x can be given as ./-x
            key = flags[0].lstrip("-").replace("-", "_")
            raise ConfigError(f"{prog}: settings are key=value, not flags ({flags[0]}: write {key}=...; "
                              f"see {prog} --help)")
        names = list(self.positional)
        variadic = any(name.endswith("...") for name in names)
        if len(positional) < len(names) or (not variadic and len(positional) > len(names)):
            raise ConfigError(f"{prog}: expected {' '.join(names)} then key=value settings, got "
                              f"{len(positional)} positional argument(s) (see {prog} --help)")
        return self.run(positional, load_settings(self.settings, overrides))


def command_usage(prog: str, summary: str, positional: dict[str, str], settings: type) -> str:
    """``--help`` of a command: the line to type, its positional arguments, every setting with its default."""
    lines = [f"usage: {' '.join([prog, *positional])} [key=value ...]", "", summary, ""]
    lines += [f"  {name:<22} {text}" for name, text in positional.items()] + [""] * bool(positional)
    lines += ["settings (key=value):"]
    for spec in dataclasses.fields(settings):
        given = spec.default is not dataclasses.MISSING
        shown = f"{spec.name}={_as_typed(spec.default)}" if given else f"{spec.name}=... (required)"
        lines.append(f"  {shown:<22} {spec.metadata.get('help', '')}".rstrip())
    return "\n".join(lines)


def _as_typed(value: Any) -> str:
    """A default as it is typed on the command line (``true``, ``null``), not as Python prints it."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def run_action(prog: str, argv: Sequence[str], actions: dict[str, Command]) -> int:
    """A command with actions (``altogether annotate merge ...``): run the action ``argv[0]`` names."""
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, actions))
        listing = "\n".join(f"  {name:<{width}}  {action.summary}" for name, action in actions.items())
        print(f"usage: {prog} ACTION ... [key=value ...]   ({prog} ACTION --help for its arguments)\n\n"
              f"actions:\n{listing}", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    action = actions.get(argv[0])
    if action is None:
        raise ConfigError(f"{prog}: unknown action {argv[0]!r}; choose one of: {', '.join(actions)}")
    return action(f"{prog} {argv[0]}", argv[1:])


# ---------------------------------------------------------------------------------------------- logging


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
