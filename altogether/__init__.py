"""Altogether re-alignment captioners: image + alt-text in, dense image-aligned caption out.

``from altogether import Recaptioner, AltogetherModel, GenerationConfig, load_recipe, fit``. Names are imported on first use so
that ``import altogether`` stays light (no torch or transformers until they are needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Recaptioner": "altogether.recaptioner",
    "AltogetherModel": "altogether.model",
    "GenerationConfig": "altogether.generation",
    "load_recipe": "altogether.config",
    "fit": "altogether.training",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import load_recipe
    from .generation import GenerationConfig
    from .model import AltogetherModel
    from .recaptioner import Recaptioner
    from .training import fit


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'altogether' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
