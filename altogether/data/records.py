"""The record every reader produces (its image field is decoded by :mod:`altogether.data.images`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

ImageRef = Union[str, Path, bytes, Image.Image]

# Where a table row (manifest, annotation record, recaption output) says where its image is: a local file (relative
# to an image root) and the address it was downloaded from. Rows carry both through every step that copies rows.
IMAGE_FIELDS = ("url", "img_path")
# The Altogether-FT annotation fields that hold a record's alt-text and its local image path: the default
# `alt_key` / `image_key` of every reader and command.
ALT_KEY, IMAGE_KEY = "alt", "img_path"


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
    target: str | list[str] | None = None  # a list: several reference captions (evaluation only, e.g. COCO)
    target_without_alt: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    alt_sources: list[str] = field(default_factory=list)

