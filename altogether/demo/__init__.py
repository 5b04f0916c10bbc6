"""The embedded demo: a synthetic world of coloured shapes with made-up facts, its text-only scorer, and (in
`altogether.demo.clip`, which imports torch/open_clip) the tiny CLIP that serves as its frozen encoder."""

from altogether.demo.score import METRICS, caption_facts, format_table, parse_caption, score_captions
from altogether.demo.world import (
    SPLITS,
    Scene,
    has_novel_pair,
    caption_for,
    fact_split,
    make_scenes,
    visual_description,
    wrong_colour_alt,
)

__all__ = [
    "METRICS",
    "SPLITS",
    "Scene",
    "has_novel_pair",
    "caption_facts",
    "caption_for",
    "fact_split",
    "format_table",
    "make_scenes",
    "parse_caption",
    "score_captions",
    "visual_description",
    "wrong_colour_alt",
]
