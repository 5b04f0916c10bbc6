"""Plug-ins: code outside the library core that the library runs by name, found through Python entry points.

Two groups, declared in a package's ``pyproject.toml`` (this project declares the demo's):

* ``altogether.pipelines``: a :class:`~altogether.config.Pipeline` that runs a recipe naming it
  (``pipeline: NAME`` in the recipe file) instead of a single :func:`~altogether.training.fit`.
* ``altogether.eval_sets``: a function ``(options: dict, *, seed: int, limit: int | None) -> EvalSet``
  (:class:`~altogether.evaluate.EvalSet`) that builds a named evaluation set from its own settings
  (``altogether evaluate MODEL NAME NAME.key=value ...``), with at most ``limit`` records.

Entry points are the standard mechanism (``importlib.metadata``), so another installed package can add its
own pipelines and evaluation sets without the library knowing about them.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

PIPELINES = "altogether.pipelines"
EVAL_SETS = "altogether.eval_sets"


class UnknownPlugin(ValueError):
    """No installed package declares a plug-in of that name in that group."""


def plugin_names(group: str) -> list[str]:
    """Names of the installed plug-ins of ``group``, sorted."""
    return sorted({ep.name for ep in entry_points(group=group)})


def load_plugin(group: str, name: str) -> Any:
    """The object the entry point ``name`` of ``group`` points at.

    Raises :class:`UnknownPlugin` naming the installed ones when there is none of that name.
    """
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        installed = ", ".join(plugin_names(group)) or "none"
        raise UnknownPlugin(f"no {group} plug-in named {name!r} is installed (installed: {installed})")
    return found[0].load()
