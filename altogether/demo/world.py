"""A synthetic world of coloured shapes with made-up names, web-like alt-texts and deductive captions.

Each scene shows one or two shapes on a plain, lightly noisy background. Its name (e.g. "Velora K-27")
is only ever written in the alt-text, never drawn, so a captioner can learn the name only by carrying
it over from the alt-text, while colours, shapes and the relation can only be trusted from the image.
Names are partitioned into train / val / eval pools by a hash of the name's word, so evaluation names
are never seen in training.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
NAME_SPLITS: tuple[str, ...] = ("train", "val", "eval")
# Alt-text kinds: name + noise only; plus a correct visual word; plus a colour the image does not show.
ALT_KINDS: tuple[str, ...] = ("plain", "correct", "wrong_colour")

# A name is a capitalised word, a space, a capital letter, a hyphen and two digits: "Velora K-27".
NAME_PATTERN = re.compile(r"(?<![\w-])[A-Z][a-z]+ [A-Z]-\d{2}(?![\w-])")

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
}
_ALT_KIND_WEIGHTS = (0.4, 0.35, 0.25)
_TWO_OBJECT_PROB = 0.5
_SUPERSAMPLE = 4
_MARGIN = 0.04  # fraction of the image kept free at each border
_GAP = 0.07  # minimum free space between two objects along the relation's axis
_CROSS_JITTER = 0.12  # max offset across the relation's axis; far below the along-axis distance

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("n", "r", "l", "s")
_CODE_LETTERS = "ABCDEFGHJKLMNPRSTVWXZ"
# Words a name must never equal, or a colour/shape/template check could misread it.
_RESERVED_WORDS = frozenset(COLOURS + SHAPES + ("a", "photo", "of", "left", "right", "above", "below"))

_SHOP_WORDS = (
    "free shipping", "buy now", "new arrival", "best seller", "sale", "in stock", "limited edition",
    "gift idea", "wholesale", "hd stock photo", "high quality", "top rated", "clearance", "official store",
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SEPARATORS = (" - ", " | ", ", ", " ", " :: ")


@dataclass(frozen=True)
class Placement:
    """One drawn shape; centre and size are fractions of the image side (y grows downwards)."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    """One sample of the world: the rendered image, its hidden name, facts, alt-text and target caption.

    `objects` are in caption order (the larger shape first); `relation` says where the first object is
    relative to the second. `alt_kind` is one of ALT_KINDS; `wrong_colour` is the colour named by a
    "wrong_colour" alt-text (None otherwise). The image is a pure function of `layout`, `image_size`
    and `noise_seed` (see `render`).
    """

    image: Image.Image
    name: str
    objects: list[tuple[str, str]]
    relation: str | None
    alt_text: str
    caption: str
    alt_kind: str
    wrong_colour: str | None
    layout: tuple[Placement, ...]
    noise_seed: int
    split: str


def name_split(name: str) -> str:
    """The split ("train", "val" or "eval") a name (or its bare word) belongs to, from a hash of its word."""
    word = name.split(" ", 1)[0].lower()
    if not word:
        raise ValueError(f"name_split: empty name {name!r}")
    bucket = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "big") % 100
    if bucket < 80:
        return "train"
    return "val" if bucket < 90 else "eval"


def _check_split(split: str) -> None:
    if split not in NAME_SPLITS:
        raise ValueError(f"split must be one of {NAME_SPLITS}, got {split!r}")


def make_name(rng: random.Random, split: str) -> str:
    """A fresh pronounceable name plus code (e.g. "Velora K-27") from `split`'s name pool."""
    _check_split(split)
    while True:
        syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3))]
        if rng.random() < 0.3:
            syllables.append(rng.choice(_CODAS))
        word = "".join(syllables)
        if word not in _RESERVED_WORDS and name_split(word) == split:
            return f"{word.capitalize()} {rng.choice(_CODE_LETTERS)}-{rng.randint(10, 99)}"


def render(layout: tuple[Placement, ...], image_size: int, noise_seed: int) -> Image.Image:
    """Draw `layout` on a light, mildly noisy background; the only inputs are shapes, size and a seed."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    noise = np.random.default_rng(noise_seed)
    base = int(noise.integers(228, 250))
    side = image_size * _SUPERSAMPLE  # draw large, then shrink: smooth edges even on small shapes
    canvas = Image.new("RGB", (side, side), (base, base, base))
    draw = ImageDraw.Draw(canvas)
    for p in layout:
        jitter = noise.integers(-12, 13, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(PALETTE[p.colour], jitter))
        half = p.size * side / 2
        x0, y0 = p.cx * side - half, p.cy * side - half
        x1, y1 = p.cx * side + half, p.cy * side + half
        if p.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif p.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif p.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {p.shape!r}; expected one of {SHAPES}")
    canvas = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    pixels = np.asarray(canvas, dtype=np.int16) + noise.integers(-5, 6, size=(image_size, image_size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _single_layout(rng: random.Random, colour: str, shape: str) -> tuple[Placement, ...]:
    size = rng.uniform(0.25, 0.55)
    lo, hi = _MARGIN + size / 2, 1 - _MARGIN - size / 2
    return (Placement(colour, shape, rng.uniform(lo, hi), rng.uniform(lo, hi), size),)


def _pair_layout(
    rng: random.Random, first: tuple[str, str], second: tuple[str, str], relation: str
) -> tuple[Placement, ...]:
    """Place a large first and a small second object so that `relation` (first vs second) is clear-cut."""
    big, small = rng.uniform(0.32, 0.42), rng.uniform(0.18, 0.25)
    first_is_low = relation in ("left of", "above")  # lower x (left) or lower y (top)
    s_low, s_high = (big, small) if first_is_low else (small, big)
    a_low = rng.uniform(_MARGIN + s_low / 2, 1 - _MARGIN - s_high - _GAP - s_low / 2)
    a_high = rng.uniform(a_low + s_low / 2 + _GAP + s_high / 2, 1 - _MARGIN - s_high / 2)
    c_low = rng.uniform(_MARGIN + s_low / 2, 1 - _MARGIN - s_low / 2)
    c_high = c_low + rng.uniform(-_CROSS_JITTER, _CROSS_JITTER)
    c_high = min(max(c_high, _MARGIN + s_high / 2), 1 - _MARGIN - s_high / 2)
    a_first, a_second = (a_low, a_high) if first_is_low else (a_high, a_low)
    c_first, c_second = (c_low, c_high) if first_is_low else (c_high, c_low)
    horizontal = relation in ("left of", "right of")

    def place(obj: tuple[str, str], along: float, across: float, size: float) -> Placement:
        cx, cy = (along, across) if horizontal else (across, along)
        return Placement(obj[0], obj[1], cx, cy, size)

    return (place(first, a_first, c_first, big), place(second, a_second, c_second, small))


def article(word: str) -> str:
    """The indefinite article for `word` ("an orange", "a red")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def visual_description(scene: Scene) -> str:
    """The scene's visual facts without its name, e.g. "a purple triangle left of a blue circle"."""
    return describe(scene.objects, scene.relation)


def describe(objects: list[tuple[str, str]], relation: str | None) -> str:
    phrases = [f"{article(colour)} {colour} {shape}" for colour, shape in objects]
    if len(phrases) == 1:
        return phrases[0]
    return f"{phrases[0]} {relation} {phrases[1]}"


def caption_for(scene: Scene, with_name: bool) -> str:
    """The deductive target caption: "A photo of a <name>: <description>." or, without the name,
    "A photo of <description>."."""
    return _caption(scene.name if with_name else None, scene.objects, scene.relation)


def _caption(name: str | None, objects: list[tuple[str, str]], relation: str | None) -> str:
    description = describe(objects, relation)
    return f"A photo of a {name}: {description}." if name else f"A photo of {description}."


def _noise_item(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.randint(1000, 99999)
        return rng.choice((f"IMG_{n}.jpg", f"DSC{n:05d}.JPG", f"photo_{n}.png", f"image-{n}.webp"))
    if kind == 1:
        y, m, d = rng.randint(2005, 2024), rng.randint(1, 12), rng.randint(1, 28)
        return rng.choice((f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}", f"{_MONTHS[m - 1]} {y}"))
    if kind == 2:
        whole, cents = rng.randint(1, 499), rng.randint(0, 99)
        return rng.choice((f"${whole}.{cents:02d}", f"€{whole},{cents:02d}", f"{whole}.99 USD"))
    return rng.choice(_SHOP_WORDS)


def _alt_text(
    rng: random.Random, name: str, objects: list[tuple[str, str]], kind: str
) -> tuple[str, str | None]:
    """Build an alt-text of `kind` around `name`; returns (alt_text, wrong colour or None)."""
    colour, shape = rng.choice(objects)
    wrong = None
    if kind == "plain":
        visual = ""
    elif kind == "correct":
        visual = rng.choice((f"{colour} {shape}", colour, shape))
    elif kind == "wrong_colour":
        wrong = rng.choice([c for c in COLOURS if c not in {o[0] for o in objects}])
        visual = rng.choice((f"{wrong} {shape}", wrong))
    else:
        raise ValueError(f"alt-text kind must be one of {ALT_KINDS}, got {kind!r}")
    core = name
    if visual:
        core = f"{name} {visual}" if rng.random() < 0.6 else f"{visual} {name}"
    pieces = [core] + [_noise_item(rng) for _ in range(rng.randint(1, 3))]
    rng.shuffle(pieces)
    return rng.choice(_SEPARATORS).join(pieces), wrong


def wrong_colour_alt(scene: Scene, rng: random.Random) -> str:
    """An alt-text holding `scene`'s name and a colour that is not in its image."""
    return _alt_text(rng, scene.name, scene.objects, "wrong_colour")[0]


def random_facts(rng: random.Random) -> tuple[list[tuple[str, str]], str | None]:
    """Random (objects, relation): one object, or two different objects and a relation."""
    first = (rng.choice(COLOURS), rng.choice(SHAPES))
    if rng.random() >= _TWO_OBJECT_PROB:
        return [first], None
    second = first
    while second == first:
        second = (rng.choice(COLOURS), rng.choice(SHAPES))
    return [first, second], rng.choice(RELATIONS)


def _check_facts(objects: list[tuple[str, str]], relation: str | None) -> None:
    if len(objects) not in (1, 2):
        raise ValueError(f"a scene has one or two objects, got {len(objects)}: {objects!r}")
    for colour, shape in objects:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"unknown object {(colour, shape)!r}; colours {COLOURS}, shapes {SHAPES}")
    if (relation is None) != (len(objects) == 1) or (relation is not None and relation not in RELATIONS):
        raise ValueError(
            f"relation {relation!r} does not fit {len(objects)} object(s); two objects need one of {RELATIONS}"
        )


def scene_from_facts(
    rng: random.Random,
    objects: list[tuple[str, str]],
    relation: str | None,
    *,
    split: str = "train",
    image_size: int = 64,
) -> Scene:
    """A scene showing exactly `objects` (caption order: the first is drawn larger) and `relation`,
    with a fresh name from `split`'s pool, a random layout and a random alt-text."""
    _check_split(split)
    _check_facts(objects, relation)
    name = make_name(rng, split)
    layout = _single_layout(rng, *objects[0]) if relation is None else _pair_layout(rng, *objects, relation)
    kind = rng.choices(ALT_KINDS, weights=_ALT_KIND_WEIGHTS)[0]
    alt_text, wrong = _alt_text(rng, name, objects, kind)
    noise_seed = rng.getrandbits(32)
    return Scene(
        image=render(layout, image_size, noise_seed),
        name=name,
        objects=list(objects),
        relation=relation,
        alt_text=alt_text,
        caption=_caption(name, objects, relation),
        alt_kind=kind,
        wrong_colour=wrong,
        layout=layout,
        noise_seed=noise_seed,
        split=split,
    )


def make_scenes(n: int, seed: int, split: str = "train", *, image_size: int = 64) -> list[Scene]:
    """`n` scenes, a pure function of (n, seed, split, image_size); a shorter list is a prefix of a longer one.

    Names come only from `split`'s name pool, so names of different splits never coincide.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_split(split)
    rng = random.Random(f"altogether-demo:{seed}:{split}")
    return [scene_from_facts(rng, *random_facts(rng), split=split, image_size=image_size) for _ in range(n)]
