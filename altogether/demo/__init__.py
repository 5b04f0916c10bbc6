"""The embedded demo: a synthetic world of named coloured shapes, its text-only scorer, and (in
`altogether.demo.clip`, which imports torch/open_clip) the tiny CLIP that serves as its frozen encoder."""

from altogether.demo.score import METRICS, format_table, parse_caption, score_captions
from altogether.demo.world import (
    NAME_SPLITS,
    Scene,
    caption_for,
    make_scenes,
    name_split,
    visual_description,
    wrong_colour_alt,
)

__all__ = [
    "METRICS",
    "NAME_SPLITS",
    "Scene",
    "caption_for",
    "format_table",
    "make_scenes",
    "name_split",
    "parse_caption",
    "score_captions",
    "visual_description",
    "wrong_colour_alt",
]
