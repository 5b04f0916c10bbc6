"""The record every reader produces, and turning its image field into a PIL image."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image, UnidentifiedImageError

ImageRef = Union[str, Path, bytes, Image.Image]


class BadRecord(ValueError):
    """A record that cannot be used (unreadable image, missing field); the message names the record."""


@dataclass
class Record:
    """One image with its alt-texts and, for training, its target caption.

    ``target_without_alt`` is the caption to learn when the prompt is dropped, for data whose captions depend
    on what the alt-text told (the demo world writes the name only when the alt-text has it).
    ``extra`` keeps the source's other fields (annotation rounds, url, ...). ``alt_sources`` names where each
    alt-text came from when the data says so (MetaCLIP's ``texts`` pairs: ``alt``, ``title``, ...): one entry per
    alt-text, or empty when the data names no sources.
    """

    key: str
    image: ImageRef
    alt_texts: list[str]
    target: str | None = None
    target_without_alt: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    alt_sources: list[str] = field(default_factory=list)


def load_image(image: ImageRef, *, key: str = "") -> Image.Image:
    """Decode a path, encoded bytes or PIL image into an RGB PIL image; :class:`BadRecord` if it cannot."""
    where = f"record {key!r}: " if key else ""
    try:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, (bytes, bytearray)):
            with Image.open(io.BytesIO(image)) as img:
                return img.convert("RGB")
        with Image.open(image) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise BadRecord(f"{where}image file not found: {image}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        shown = image if isinstance(image, (str, Path)) else f"<{len(image)} bytes>" if isinstance(image, bytes) else "image"
        raise BadRecord(f"{where}unreadable image {shown}: {err}") from None
