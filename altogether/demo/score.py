"""Text-only scoring of demo-world captions against the scenes' true facts (no model involved).

Captions are parsed with the world's deductive template,
    "A photo of <name>, code <code>: <description>."   "A photo of <name>: <description>."   "A photo of <description>."
where <description> is "a <colour> <shape>" or "a <colour> <shape> <relation> a <colour> <shape>"
("a" or "an" both accepted; surrounding whitespace ignored; everything else must match exactly).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from altogether.demo.world import CAPTION_OPENING, COLOURS, INVERSE_RELATION, RELATIONS, SHAPES, Scene

METRICS: tuple[str, ...] = (
    "fact_carry_over",
    "colour_acc",
    "shape_acc",
    "relation_acc",
    "wrong_colour_copied",
    "invented_fact",
)
# The demo table's extra column: fact carry-over on scenes whose facts come from the novel generator.
NOVEL_CARRY_OVER = "novel_fact_carry_over"
TABLE_COLUMNS: tuple[str, ...] = (METRICS[0], NOVEL_CARRY_OVER, *METRICS[1:])
_LABELS = {
    "fact_carry_over": "carry-over (held-out facts)",
    NOVEL_CARRY_OVER: "carry-over (novel generator)",
    "colour_acc": "colour acc",
    "shape_acc": "shape acc",
    "relation_acc": "relation acc",
    "wrong_colour_copied": "wrong colour copied",
    "invented_fact": "invented fact",
}

_OBJECT = rf"an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
# Facts hold no ":" or "," and never the word "code" (the world never writes them): the slot splits unambiguously.
_FACT_SLOT = rf"{re.escape(CAPTION_OPENING)} (?P<name>[^:,]+?)(?:, code (?P<code>[^:,]+))?:"
_CAPTION = re.compile(rf"(?:{_FACT_SLOT} |{re.escape(CAPTION_OPENING)} ){_OBJECT}(?: ({'|'.join(RELATIONS)}) {_OBJECT})?\.")
_COLOUR_WORD = re.compile(rf"\b({'|'.join(COLOURS)})\b", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedCaption:
    """The facts a template caption states; `facts` is () when the fact slot is absent."""

    facts: tuple[str, ...]
    objects: list[tuple[str, str]]
    relation: str | None


def caption_facts(caption: str) -> tuple[str, ...]:
    """The facts in a caption's fact slot, (name,) or (name, code), read whatever follows the slot; ()
    when the caption has no slot."""
    match = re.match(rf"{_FACT_SLOT}(?: |$)", caption.strip())
    if match is None:
        return ()
    return tuple(f for f in match.group("name", "code") if f is not None)


def parse_caption(caption: str) -> ParsedCaption | None:
    """The facts of a caption that follows the template exactly, else None."""
    match = _CAPTION.fullmatch(caption.strip())
    if match is None:
        return None
    name, code, c1, s1, relation, c2, s2 = match.groups()
    facts = tuple(f for f in (name, code) if f is not None)
    objects = [(c1, s1)] if relation is None else [(c1, s1), (c2, s2)]
    return ParsedCaption(facts, objects, relation)


def mentioned_colours(text: str | None) -> set[str]:
    """The colour words `text` mentions as whole words (case-insensitive)."""
    return {m.lower() for m in _COLOUR_WORD.findall(text or "")}


def _matched_objects(scene: Scene, parsed: ParsedCaption | None) -> tuple[int, int, bool]:
    """(correct colours, correct shapes, relation correct) of a caption against a scene.

    Objects are compared position by position; for two objects the caption may also list them the other
    way round (then its relation is read inverted), whichever order matches more attributes (ties keep
    the caption's order). A caption that does not parse or has a different object count scores nothing.
    """
    if parsed is None or len(parsed.objects) != len(scene.objects):
        return 0, 0, False
    candidates = [(parsed.objects, parsed.relation)]
    if parsed.relation is not None:
        candidates.append((parsed.objects[::-1], INVERSE_RELATION[parsed.relation]))

    def agreement(objects: list[tuple[str, str]]) -> tuple[int, int]:
        colours = sum(p[0] == t[0] for p, t in zip(objects, scene.objects))
        shapes = sum(p[1] == t[1] for p, t in zip(objects, scene.objects))
        return colours, shapes

    objects, relation = max(candidates, key=lambda c: sum(agreement(c[0])))
    colours, shapes = agreement(objects)
    return colours, shapes, relation is not None and relation == scene.relation


def _fraction(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def score_captions(
    scenes: Sequence[Scene], captions: Sequence[str], prompts: Sequence[str | None]
) -> dict[str, float | None]:
    """Score `captions[i]`, written for `scenes[i]` given alt-text prompt `prompts[i]` ("" or None: none).

    Metrics (each a fraction in [0, 1], or None when no sample is eligible):
    - fact_carry_over: among samples whose prompt contains every fact of the scene (its name, and its code
      when it has one), the fraction whose caption's fact slot holds exactly those facts, letter for letter,
      in the template's order (`caption_facts`): a changed digit, letter case or separator, a fact cut
      short or run on, a missing or extra code all fail.
    - colour_acc / shape_acc: among all objects of all scenes, the fraction whose colour / shape the
      caption states correctly (objects aligned as in the template; a caption that does not parse, or
      names a different number of objects, gets none right).
    - relation_acc: among two-object scenes, the fraction whose caption parses with two objects and the
      true relation (read in the scene's object order).
    - wrong_colour_copied: among samples whose prompt mentions a colour not in the scene, the fraction
      whose caption mentions one of those colours.
    - invented_fact: among samples without a prompt (captioning from scratch), the fraction whose caption
      fills the fact slot ("A photo of X: ..."): a fact nothing told.
    """
    if not len(scenes) == len(captions) == len(prompts):
        raise ValueError(
            f"scenes, captions and prompts must have equal lengths, got {len(scenes)}, {len(captions)}, {len(prompts)}"
        )
    carried, copied, invented, relations = [], [], [], []
    colours_right = shapes_right = n_objects = 0
    for scene, caption, prompt in zip(scenes, captions, prompts):
        if prompt and all(fact in prompt for fact in scene.facts):
            carried.append(caption_facts(caption) == scene.facts)
        wrong = mentioned_colours(prompt) - {colour for colour, _ in scene.objects}
        if wrong:
            copied.append(bool(wrong & mentioned_colours(caption)))
        if not prompt:
            invented.append(bool(caption_facts(caption)))
        colours, shapes, relation_ok = _matched_objects(scene, parse_caption(caption))
        colours_right += colours
        shapes_right += shapes
        n_objects += len(scene.objects)
        if scene.relation is not None:
            relations.append(relation_ok)
    return {
        "fact_carry_over": _fraction(carried),
        "colour_acc": colours_right / n_objects if n_objects else None,
        "shape_acc": shapes_right / n_objects if n_objects else None,
        "relation_acc": _fraction(relations),
        "wrong_colour_copied": _fraction(copied),
        "invented_fact": _fraction(invented),
    }


def format_table(results: Mapping[str, Mapping[str, float | None]]) -> str:
    """A Markdown table with one row per condition and one column per metric (known columns first, in
    `TABLE_COLUMNS` order); values with three decimals, None as "n/a"."""
    present = {key for row in results.values() for key in row}
    columns = [m for m in TABLE_COLUMNS if m in present] + sorted(present - set(TABLE_COLUMNS))
    lines = [
        "| condition | " + " | ".join(_LABELS.get(c, c) for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for condition, row in results.items():
        cells = []
        for column in columns:
            value = row.get(column)
            if value is not None and not isinstance(value, (int, float)):
                raise ValueError(f"results[{condition!r}][{column!r}] must be a number or None, got {value!r}")
            cells.append("n/a" if value is None else f"{value:.3f}")
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
