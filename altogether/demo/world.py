"""A synthetic world of coloured shapes with made-up facts, web-like alt-texts and deductive captions.

Each scene shows one or two shapes on a plain, lightly noisy background. Its facts, a name (e.g.
"Velora K-27", "tami_ru", "Pyxwen TJ349") and sometimes a code after a key ("SKU 27-KOBA"), are only
ever written in the alt-text, never drawn, so a captioner can learn them only by carrying them over from
the alt-text, while colours, shapes and the relation can only be trusted from the image.

Facts come from two generators:

* the training generator (splits "train", "val", "eval"): words of random letters (two vowels in five),
  in the shapes of `TRAINING_NAME_SHAPES` / `TRAINING_CODE_SHAPES`. Its facts are partitioned into the
  three splits by a hash, so "eval" facts are never seen in training;
* the novel generator (split "novel"): words of other syllables, built around consonant clusters and vowel
  pairs ("Pyxwen", "gnomib", "NPTYR"), in other shapes (`NOVEL_NAME_SHAPES` / `NOVEL_CODE_SHAPES`). Every
  novel fact holds one of the letter pairs in `NOVEL_PAIRS`, which the training generator never writes,
  so none of them can ever come out of it: carrying them over shows copying, not recall of the generator.

`NOVEL_PAIRS` is a small share of all letter pairs (about 1 in 20), so knowing that training facts avoid
them tells a captioner almost nothing about the next letter of a training fact: only copying predicts it.
"""

from __future__ import annotations

import hashlib
import random
import re
import dataclasses
from dataclasses import dataclass
from typing import Callable

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
# "train", "val", "eval": the training generator, split by a hash of each fact; "novel": the novel generator.
SPLITS: tuple[str, ...] = ("train", "val", "eval", "novel")
# Alt-text kinds: facts + noise only; plus a correct visual word; plus a colour the image does not show.
ALT_KINDS: tuple[str, ...] = ("plain", "correct", "wrong_colour")

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
_CODE_PROB = 0.5  # share of scenes with a code besides their name
_SUPERSAMPLE = 4
_MARGIN = 0.04  # fraction of the image kept free at each border
_GAP = 0.07  # minimum free space between two objects along the relation's axis
_CROSS_JITTER = 0.12  # max offset across the relation's axis; far below the along-axis distance

# Fact shapes, one character per part: W a capitalised word, w a lower-case word, U an upper-case word,
# C two capitalised words run together ("VeloRamu"), L / l one upper / lower-case letter, 9 one digit;
# any other character stands for itself. A fact is 3 to 26 characters long.
TRAINING_NAME_SHAPES: tuple[str, ...] = (
    "W L-99", "W W", "w", "U", "w_w", "W-W", "L. W", "w99", "W 999", "U/99", "W w", "C", "W W W",
)
TRAINING_CODE_SHAPES: tuple[str, ...] = ("L9-L99", "99-9999", "L-9999", "99-U", "9L9L9", "w.99", "U-99-U")
NOVEL_NAME_SHAPES: tuple[str, ...] = ("W", "W W L-99", "w l9999", "W U999", "w.w", "W/W", "U_U", "99-W", "w w w")
NOVEL_CODE_SHAPES: tuple[str, ...] = ("U999", "U-U-9", "w-999", "99.U", "l9-w")
_FACT_LENGTH = (3, 26)
_ID_SEPARATORS = (" ", "-", "_", ".", "/", "")  # between the parts of an `any_shape_id`
_USUAL_SEPARATOR_PROB = 0.75  # each gap of an id takes the id's usual separator, else any
CAPTION_OPENING = "A photo of"  # every target caption's first words

VOWELS = "aeiou"
CONSONANTS = "bcdfghjklmnpqrstvwxyz"
_VOWEL_PROB = 0.4
# The novel generator's syllables, built around clusters and vowel pairs; the letter pairs inside them
# (NOVEL_PAIRS) are the ones the training generator never writes.
_NOVEL_ONSETS = ("pyx", "gn", "wr", "xh", "zw", "kn", "ps", "thr", "vl", "bj", "sch", "phl", "cz", "dw", "tj",
                 "np", "qu", "m", "l", "t", "b")
_NOVEL_NUCLEI = ("ae", "ou", "ei", "ia", "oo", "a", "e", "i", "o", "u", "y")
_NOVEL_CODAS = ("x", "ck", "ng", "rst", "lm", "ft", "q", "", "", "")
NOVEL_PAIRS: frozenset[str] = frozenset(
    part[i : i + 2]
    for part in (*_NOVEL_ONSETS, *_NOVEL_NUCLEI, *_NOVEL_CODAS)
    for i in range(len(part) - 1)
    if part != "qu"  # "qu" is common English: novel words use it, but training words may write it too
)

_CODE_KEYS = ("SKU", "Item", "Ref", "Model", "Art. no.")
_SHOP_WORDS = (
    "free shipping", "buy now", "new arrival", "best seller", "sale", "in stock", "limited edition",
    "gift idea", "wholesale", "hd stock photo", "high quality", "top rated", "clearance", "official store",
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SEPARATORS = (" - ", " | ", ", ", " ", " :: ")
_FILE_WORDS = ("IMG", "jpg", "DSC", "JPG", "photo", "png", "image", "webp", "USD")  # as `_noise_item` writes them
# Every word the world writes besides facts: captions' template, visual words, keys and the alt-texts' noise.
VOCABULARY: tuple[str, ...] = tuple(sorted({
    w
    for text in (*COLOURS, *SHAPES, *RELATIONS, *_SHOP_WORDS, *_MONTHS, *_CODE_KEYS, *_FILE_WORDS, "A a an of code")
    for w in re.findall(r"[A-Za-z]+", text)
}))
# A fact never holds one of these words in any letter case: it could be misread as noise, key or visual word.
_RESERVED_WORDS = frozenset(w.lower() for w in VOCABULARY)


def has_novel_pair(text: str) -> bool:
    """Whether two adjacent letters of `text` (case ignored) form one of `NOVEL_PAIRS`.

    False for every fact the training generator writes, true for every fact the novel generator writes.
    """
    lower = text.lower()
    return any(lower[i : i + 2] in NOVEL_PAIRS for i in range(len(lower) - 1))


def fact_shape(fact: str) -> str:
    """The shape of a fact: upper-case letters as "A", lower-case as "a", digits as "9", runs collapsed
    ("Velora K-27" -> "Aa A-9")."""
    classes = re.sub(r"[A-Z]", "A", re.sub(r"[a-z]", "a", re.sub(r"[0-9]", "9", fact)))
    return re.sub(r"(.)\1+", r"\1", classes)


def fact_split(fact: str) -> str:
    """The split ("train", "val" or "eval") a training-generator fact belongs to, from a hash of the fact."""
    if not fact:
        raise ValueError("fact_split: empty fact")
    bucket = int.from_bytes(hashlib.sha256(fact.lower().encode()).digest()[:8], "big") % 100
    if bucket < 80:
        return "train"
    return "val" if bucket < 90 else "eval"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _training_word(rng: random.Random, length: int) -> str:
    """`length` random letters, each a vowel with probability 0.4, uniform in its class."""
    return "".join(rng.choice(VOWELS if rng.random() < _VOWEL_PROB else CONSONANTS) for _ in range(length))


def _novel_word(rng: random.Random, length: int) -> str:
    """Syllables of the novel alphabet, at least `length` letters."""
    word = ""
    while len(word) < length:
        word += rng.choice(_NOVEL_ONSETS) + rng.choice(_NOVEL_NUCLEI) + rng.choice(_NOVEL_CODAS)
    return word


def _fill(shape: str, rng: random.Random, word: Callable[[random.Random, int], str], longest: int) -> str:
    parts = []
    for part in shape:
        if part in "WwU":
            text = word(rng, rng.randint(2, longest))
            parts.append(text.capitalize() if part == "W" else text.upper() if part == "U" else text)
        elif part == "C":
            text = word(rng, rng.randint(5, 2 * longest))
            cut = rng.randint(2, len(text) - 2)
            parts.append(text[:cut].capitalize() + text[cut:].capitalize())
        elif part in "Ll":
            letter = rng.choice(CONSONANTS + VOWELS)
            parts.append(letter.upper() if part == "L" else letter)
        elif part == "9":
            parts.append(str(rng.randrange(10)))
        else:
            parts.append(part)
    return "".join(parts)


@dataclass(frozen=True)
class FactGenerator:
    """Draws facts: a shape from `name_shapes` / `code_shapes`, its words from `word(rng, length)` with
    lengths up to `longest_word` letters. `accept(fact)` holds for every fact written (else it is redrawn).
    """

    name_shapes: tuple[str, ...]
    code_shapes: tuple[str, ...]
    word: Callable[[random.Random, int], str]
    longest_word: int
    accept: Callable[[str], bool]

    def draw(self, rng: random.Random, shapes: tuple[str, ...], keep: Callable[[str], bool]) -> str:
        while True:
            fact = _fill(rng.choice(shapes), rng, self.word, self.longest_word)
            words = {w.lower() for w in re.findall(r"[A-Za-z]+", fact)}
            if (_FACT_LENGTH[0] <= len(fact) <= _FACT_LENGTH[1] and not words & _RESERVED_WORDS
                    and self.accept(fact) and keep(fact)):
                return fact


# Word lengths chosen so that both generators write facts of 3 to 26 characters, about 10 on average.
TRAINING_FACTS = FactGenerator(TRAINING_NAME_SHAPES, TRAINING_CODE_SHAPES, _training_word, 10,
                               lambda fact: not has_novel_pair(fact))
NOVEL_FACTS = FactGenerator(NOVEL_NAME_SHAPES, NOVEL_CODE_SHAPES, _novel_word, 6, has_novel_pair)


def make_facts(rng: random.Random, split: str) -> tuple[str, str | None]:
    """(name, code or None) of one scene, from the generator and hash partition of `split`."""
    _check_split(split)
    if split == "novel":
        generator, keep = NOVEL_FACTS, lambda fact: True
    else:
        generator, keep = TRAINING_FACTS, lambda fact: fact_split(fact) == split
    name = generator.draw(rng, generator.name_shapes, keep)
    code = generator.draw(rng, generator.code_shapes, keep) if rng.random() < _CODE_PROB else None
    return name, code


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
    """One sample of the world: the rendered image, its hidden facts, visual facts, alt-text and target caption.

    `name` and `code` (None for scenes without one) appear only in the alt-text. `objects` are in caption
    order (the larger shape first); `relation` says where the first object is relative to the second.
    `alt_kind` is one of ALT_KINDS; `wrong_colour` is the colour named by a "wrong_colour" alt-text (None
    otherwise). The image is a pure function of `layout`, `image_size` and `noise_seed` (see `render`).
    """

    image: Image.Image
    name: str
    code: str | None
    objects: list[tuple[str, str]]
    relation: str | None
    alt_text: str
    caption: str
    alt_kind: str
    wrong_colour: str | None
    layout: tuple[Placement, ...]
    noise_seed: int
    split: str

    @property
    def facts(self) -> tuple[str, ...]:
        """The facts only the alt-text tells: (name,) or (name, code)."""
        return (self.name,) if self.code is None else (self.name, self.code)


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


def caption_for(scene: Scene, with_facts: bool) -> str:
    """The deductive target caption: "A photo of <name>, code <code>: <description>." (without a code:
    "A photo of <name>: <description>.") or, without the facts, "A photo of <description>."."""
    return _caption(scene.facts if with_facts else (), scene.objects, scene.relation)


def _caption(facts: tuple[str, ...], objects: list[tuple[str, str]], relation: str | None) -> str:
    description = describe(objects, relation)
    if not facts:
        return f"{CAPTION_OPENING} {description}."
    # The code follows a space, as in the alt-text ("SKU 27-KOBA"): the same bytes in the same context.
    subject = facts[0] if len(facts) == 1 else f"{facts[0]}, code {facts[1]}"
    return f"{CAPTION_OPENING} {subject}: {description}."


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
    rng: random.Random, facts: tuple[str, ...], objects: list[tuple[str, str]], kind: str
) -> tuple[str, str | None]:
    """Build an alt-text of `kind` around `facts` (the code, if any, after a key such as "SKU");
    returns (alt_text, wrong colour or None)."""
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
    core = facts[0]
    if visual:
        core = f"{core} {visual}" if rng.random() < 0.6 else f"{visual} {core}"
    pieces = [core] + [f"{rng.choice(_CODE_KEYS)} {code}" for code in facts[1:]]
    pieces += [_noise_item(rng) for _ in range(rng.randint(1, 3))]
    rng.shuffle(pieces)
    return rng.choice(_SEPARATORS).join(pieces), wrong


def any_shape_id(rng: random.Random) -> str:
    """An id of no particular shape, for the copy stage: 1 to 4 parts, each 1 to 9 letters of the training
    generator's words (lower, upper or capitalised) or 1 to 6 digits, joined by separators from ` -_./` or
    nothing; 3 to 26 characters ("0487.Pjmal.24115/Ij", "cldg8", "D42375.599246", "Imnka 95 00 92").

    Most gaps of one id use one separator, as a web name's words are all joined by spaces or a code's parts by
    hyphens: the captioner then sees names of three or four words, where it stopped early or repeated a word
    (measured: docs/demo.md). Copying these, a decoder cannot lean on a fact's shape (how many digits follow a
    hyphen, where a name ends), only on the string in its prompt. Like every training text, an id holds none of
    `NOVEL_PAIRS` and none of the world's own words.
    """
    while True:
        parts = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.6:
                word = _training_word(rng, rng.randint(1, 9))
                parts.append(rng.choice((word, word.upper(), word.capitalize())))
            else:
                parts.append("".join(str(rng.randrange(10)) for _ in range(rng.randint(1, 6))))
        usual = rng.choice(_ID_SEPARATORS)
        text = parts[0] + "".join((usual if rng.random() < _USUAL_SEPARATOR_PROB else rng.choice(_ID_SEPARATORS))
                                  + part for part in parts[1:])
        words = {w.lower() for w in re.findall(r"[A-Za-z]+", text)}
        if _FACT_LENGTH[0] <= len(text) <= _FACT_LENGTH[1] and not has_novel_pair(text) and not words & _RESERVED_WORDS:
            return text


def with_fresh_ids(scene: Scene, rng: random.Random, kind: str | None = None) -> Scene:
    """`scene` with fresh `any_shape_id` ids as its facts (a name, and a code half of the time), a new alt-text of
    `kind` (default: the scene's own) around them, and its caption to match; the same image and objects."""
    name = any_shape_id(rng)
    code = any_shape_id(rng) if rng.random() < _CODE_PROB else None
    facts = (name,) if code is None else (name, code)
    kind = kind or scene.alt_kind
    alt_text, wrong = _alt_text(rng, facts, scene.objects, kind)
    return dataclasses.replace(scene, name=name, code=code, alt_text=alt_text, alt_kind=kind, wrong_colour=wrong,
                               caption=_caption(facts, scene.objects, scene.relation))


def copy_alt_text(scene: Scene, rng: random.Random) -> str:
    """An alt-text for `scene`'s image with fresh ids in place of its facts (`with_fresh_ids`), noise as usual,
    and never a colour the image lacks: what the copy stage copies."""
    return with_fresh_ids(scene, rng, rng.choices(ALT_KINDS[:2], weights=_ALT_KIND_WEIGHTS[:2])[0]).alt_text


def another_alt_text(scene: Scene, rng: random.Random) -> str:
    """Another alt-text of `scene`'s image, as another web page would write it: the same facts, fresh noise
    and visual words."""
    kind = rng.choices(ALT_KINDS, weights=_ALT_KIND_WEIGHTS)[0]
    return _alt_text(rng, scene.facts, scene.objects, kind)[0]


def wrong_colour_alt(scene: Scene, rng: random.Random) -> str:
    """An alt-text holding `scene`'s facts and a colour that is not in its image."""
    return _alt_text(rng, scene.facts, scene.objects, "wrong_colour")[0]


def random_objects(rng: random.Random) -> tuple[list[tuple[str, str]], str | None]:
    """Random (objects, relation): one object, or two different objects and a relation."""
    first = (rng.choice(COLOURS), rng.choice(SHAPES))
    if rng.random() >= _TWO_OBJECT_PROB:
        return [first], None
    second = first
    while second == first:
        second = (rng.choice(COLOURS), rng.choice(SHAPES))
    return [first, second], rng.choice(RELATIONS)


def _check_objects(objects: list[tuple[str, str]], relation: str | None) -> None:
    if len(objects) not in (1, 2):
        raise ValueError(f"a scene has one or two objects, got {len(objects)}: {objects!r}")
    for colour, shape in objects:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"unknown object {(colour, shape)!r}; colours {COLOURS}, shapes {SHAPES}")
    if (relation is None) != (len(objects) == 1) or (relation is not None and relation not in RELATIONS):
        raise ValueError(
            f"relation {relation!r} does not fit {len(objects)} object(s); two objects need one of {RELATIONS}"
        )


def scene_from_objects(
    rng: random.Random,
    objects: list[tuple[str, str]],
    relation: str | None,
    *,
    split: str = "train",
    image_size: int = 64,
) -> Scene:
    """A scene showing exactly `objects` (caption order: the first is drawn larger) and `relation`,
    with fresh facts from `split`'s generator, a random layout and a random alt-text."""
    _check_split(split)
    _check_objects(objects, relation)
    name, code = make_facts(rng, split)
    facts = (name,) if code is None else (name, code)
    layout = _single_layout(rng, *objects[0]) if relation is None else _pair_layout(rng, *objects, relation)
    kind = rng.choices(ALT_KINDS, weights=_ALT_KIND_WEIGHTS)[0]
    alt_text, wrong = _alt_text(rng, facts, objects, kind)
    noise_seed = rng.getrandbits(32)
    return Scene(
        image=render(layout, image_size, noise_seed),
        name=name,
        code=code,
        objects=list(objects),
        relation=relation,
        alt_text=alt_text,
        caption=_caption(facts, objects, relation),
        alt_kind=kind,
        wrong_colour=wrong,
        layout=layout,
        noise_seed=noise_seed,
        split=split,
    )


def make_scenes(n: int, seed: int, split: str = "train", *, image_size: int = 64) -> list[Scene]:
    """`n` scenes, a pure function of (n, seed, split, image_size); a shorter list is a prefix of a longer one.

    Facts come only from `split`'s generator and hash partition: facts of different splits never coincide,
    and "novel" facts are of a kind the training generator cannot write.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_split(split)
    rng = random.Random(f"altogether-demo:{seed}:{split}")
    return [scene_from_objects(rng, *random_objects(rng), split=split, image_size=image_size) for _ in range(n)]
