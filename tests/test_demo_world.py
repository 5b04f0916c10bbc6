import inspect
import random

import numpy as np
import pytest

from altogether.demo.world import (
    ALT_KINDS,
    COLOURS,
    NAME_PATTERN,
    NAME_SPLITS,
    RELATIONS,
    SHAPES,
    PALETTE,
    caption_for,
    make_scenes,
    name_split,
    render,
    scene_from_facts,
    visual_description,
    wrong_colour_alt,
)


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(300, seed=0)


def _words(text):
    return set(text.lower().replace(",", " ").split())


def test_make_scenes_is_deterministic_and_prefix_stable():
    a, b = make_scenes(30, seed=5), make_scenes(30, seed=5)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [s.alt_text for s in a] == [s.alt_text for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.caption for s in make_scenes(10, seed=5)] == [s.caption for s in a[:10]]
    assert [s.caption for s in make_scenes(30, seed=6)] != [s.caption for s in a]


def test_world_covers_every_colour_shape_relation_and_alt_kind(scenes):
    objects = [o for s in scenes for o in s.objects]
    assert {c for c, _ in objects} == set(COLOURS)
    assert {sh for _, sh in objects} == set(SHAPES)
    assert {s.relation for s in scenes} == set(RELATIONS) | {None}
    assert {s.alt_kind for s in scenes} == set(ALT_KINDS)


def test_captions_state_the_scene_facts(scenes):
    for s in scenes:
        phrases = [f"{'an' if c == 'orange' else 'a'} {c} {sh}" for c, sh in s.objects]
        description = phrases[0] if s.relation is None else f"{phrases[0]} {s.relation} {phrases[1]}"
        assert visual_description(s) == description
        assert s.caption == f"A photo of a {s.name}: {description}."
        assert caption_for(s, with_name=True) == s.caption
        assert caption_for(s, with_name=False) == f"A photo of {description}."


def test_layout_matches_objects_and_relation_is_unambiguous(scenes):
    for s in scenes:
        assert [(p.colour, p.shape) for p in s.layout] == s.objects
        for p in s.layout:  # fully inside the image
            assert 0 <= p.cx - p.size / 2 and p.cx + p.size / 2 <= 1
            assert 0 <= p.cy - p.size / 2 and p.cy + p.size / 2 <= 1
        if s.relation is None:
            continue
        first, second = s.layout
        assert first.size > 1.2 * second.size  # caption order: the larger shape first
        horizontal = s.relation in ("left of", "right of")
        along = (second.cx - first.cx) if horizontal else (second.cy - first.cy)
        across = (second.cy - first.cy) if horizontal else (second.cx - first.cx)
        if s.relation in ("right of", "below"):
            along = -along
        # First is before second on the relation's axis, with free space between them, and that axis dominates.
        assert along > (first.size + second.size) / 2
        assert abs(along) > 2 * abs(across)


def test_drawn_pixels_show_the_objects_colours(scenes):
    palette = np.array([PALETTE[c] for c in COLOURS], dtype=float)
    for s in scenes[:100]:
        pixels = np.asarray(s.image, dtype=float)
        size = s.image.size[0]
        for p in s.layout:
            # The bounding-box centre lies inside every shape (for a triangle: half-way up).
            rgb = pixels[int(p.cy * size), int(p.cx * size)]
            assert COLOURS[int(np.argmin(((palette - rgb) ** 2).sum(1)))] == p.colour


def test_image_depends_only_on_layout_and_noise_never_on_the_name(scenes):
    assert set(inspect.signature(render).parameters) == {"layout", "image_size", "noise_seed"}
    for s in scenes[:50]:
        again = render(s.layout, s.image.size[0], s.noise_seed)
        assert np.array_equal(np.asarray(again), np.asarray(s.image))


def test_image_size_option():
    s = make_scenes(3, seed=0, image_size=32)[0]
    assert s.image.size == (32, 32) and s.image.mode == "RGB"


def test_name_pools_of_splits_are_disjoint():
    names = {split: {s.name for s in make_scenes(200, seed=0, split=split)} for split in NAME_SPLITS}
    words = {split: {n.split()[0] for n in ns} for split, ns in names.items()}
    for split in NAME_SPLITS:
        assert all(name_split(n) == split for n in names[split])
        for other in NAME_SPLITS:
            if other != split:
                assert not words[split] & words[other]
    assert len(names["train"]) > 150  # names are (nearly) unique within a split


def test_alt_texts_hold_the_name_and_the_recorded_kind_of_visual_word(scenes):
    for s in scenes:
        assert NAME_PATTERN.fullmatch(s.name)
        assert NAME_PATTERN.findall(s.alt_text) == [s.name]  # the noise never looks like a name
        rest = _words(s.alt_text.replace(s.name, " "))
        colours = rest & set(COLOURS)
        visual = colours | (rest & set(SHAPES))
        scene_colours = {c for c, _ in s.objects}
        if s.alt_kind == "plain":
            assert not visual and s.wrong_colour is None
        elif s.alt_kind == "correct":
            assert visual and colours <= scene_colours and s.wrong_colour is None
        else:
            assert colours == {s.wrong_colour} and s.wrong_colour not in scene_colours


def test_wrong_colour_alt_names_the_scene_and_a_colour_not_shown(scenes):
    rng = random.Random(0)
    for s in scenes[:100]:
        alt = wrong_colour_alt(s, rng)
        assert s.name in alt
        colours = _words(alt.replace(s.name, " ")) & set(COLOURS)
        assert len(colours) == 1 and not colours & {c for c, _ in s.objects}


def test_bad_inputs_are_rejected_with_the_input_named():
    with pytest.raises(ValueError, match="split"):
        make_scenes(2, seed=0, split="test")
    with pytest.raises(ValueError, match="relation"):
        scene_from_facts(random.Random(0), [("red", "circle")], "left of")
    with pytest.raises(ValueError, match="unknown object"):
        scene_from_facts(random.Random(0), [("pink", "circle")], None)
    with pytest.raises(ValueError, match="n must be"):
        make_scenes(-1, seed=0)


def test_scene_from_facts_draws_the_given_facts():
    s = scene_from_facts(random.Random(1), [("yellow", "square"), ("blue", "triangle")], "below", split="eval")
    assert s.objects == [("yellow", "square"), ("blue", "triangle")] and s.relation == "below"
    assert name_split(s.name) == "eval"
    assert s.caption.endswith(": a yellow square below a blue triangle.")
