"""The alt-text conditions of the paper's Table 1 evaluation protocol.

Each condition turns the records' own alt-texts into the alt-text prompt the captioner sees:

- ``w/ alt``: the record's own alt-text (captioning by re-aligning the alt-text);
- ``w/o alt``: the empty string (captioning from scratch);
- ``w/ random alt``: the alt-text of another record, chosen by a fixed permutation derived from
  the seed. No record is ever given its own alt-text, and no record is given a string identical
  to its own alt-text unless that is unavoidable (more than half of the records share one string).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence

WITH_ALT = "w/ alt"
WITHOUT_ALT = "w/o alt"
RANDOM_ALT = "w/ random alt"
CONDITIONS: tuple[str, ...] = (WITH_ALT, WITHOUT_ALT, RANDOM_ALT)


def random_alt_permutation(alt_texts: Sequence[str], seed: int) -> list[int]:
    """Return ``perm`` such that record ``i`` gets the alt-text of record ``perm[i]``.

    ``perm`` has no fixed point, is fully determined by ``seed`` and the alt-texts, and gives
    record ``i`` a string different from its own wherever any permutation could.

    How: records are laid out in a seeded random order with identical strings kept together
    (the largest group first), then every position takes the record ``m`` places further on
    (cyclically), where ``m`` is the size of the largest group. A group of size ``k <= m``
    cannot reach itself with that shift while ``m <= n/2``; when ``m > n/2`` exactly
    ``2m - n`` collisions remain, which is the least any permutation can do. With all strings
    distinct (``m = 1``) this is a uniformly random single cycle.
    """
    texts = _checked_texts(alt_texts)
    n = len(texts)
    if n == 0:
        return []
    if n == 1:
        raise ValueError(f"condition {RANDOM_ALT!r} needs at least 2 records to borrow an alt-text from; got 1")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, text in enumerate(texts):
        groups[text].append(index)
    ordered_groups = [groups[text] for text in sorted(groups)]  # sorted: independent of input order quirks
    rng.shuffle(ordered_groups)
    for members in ordered_groups:
        rng.shuffle(members)
    # Stable sort keeps the shuffled order among groups of equal size.
    ordered_groups.sort(key=len, reverse=True)
    order = [index for members in ordered_groups for index in members]
    largest = len(ordered_groups[0])
    shift = largest if largest < n else 1  # all strings equal: any derangement is as good as another
    perm = [0] * n
    for position, index in enumerate(order):
        perm[index] = order[(position + shift) % n]
    return perm


def build_conditions(
    alt_texts: Sequence[str], seed: int, names: Iterable[str] = CONDITIONS
) -> dict[str, list[str]]:
    """Return the alt-text prompts for each named condition, in the order of ``names``.

    ``alt_texts[i]`` is record ``i``'s own alt-text. Unknown or repeated names raise ValueError.
    """
    if isinstance(names, str):
        raise TypeError(f"names must be a sequence of condition names, not the single string {names!r}")
    names = list(names)
    unknown = [name for name in names if name not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown condition name(s) {unknown}; known conditions: {list(CONDITIONS)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"condition name(s) given more than once: {repeated}")
    texts = _checked_texts(alt_texts)
    built: dict[str, list[str]] = {}
    for name in names:
        if name == WITH_ALT:
            built[name] = list(texts)
        elif name == WITHOUT_ALT:
            built[name] = [""] * len(texts)
        else:
            built[name] = [texts[j] for j in random_alt_permutation(texts, seed)]
    return built


def _checked_texts(alt_texts: Sequence[str]) -> list[str]:
    texts = list(alt_texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"alt_texts[{index}] must be a string, got {type(text).__name__}")
    return texts
