import inspect
import random
import re

import numpy as np
import pytest

from altogether.demo.world import (
    ALT_KINDS,
    COLOURS,
    NOVEL_FACTS,
    RELATIONS,
    SHAPES,
    SPLITS,
    PALETTE,
    TRAINING_FACTS,
    VOCABULARY,
    NOVEL_PAIRS,
    has_novel_pair,
    caption_for,
    fact_shape,
    fact_split,
    make_facts,
    make_scenes,
    render,
    scene_from_objects,
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
        subject = s.name if s.code is None else f"{s.name}, code {s.code}"
        assert s.facts == ((s.name,) if s.code is None else (s.name, s.code))
        assert s.caption == f"A photo of {subject}: {description}."
        assert caption_for(s, with_facts=True) == s.caption
        assert caption_for(s, with_facts=False) == f"A photo of {description}."
    assert 0.35 < sum(s.code is not None for s in scenes) / len(scenes) < 0.65  # a name, often a code too


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


def test_image_depends_only_on_layout_and_noise_never_on_the_facts(scenes):
    assert set(inspect.signature(render).parameters) == {"layout", "image_size", "noise_seed"}
    for s in scenes[:50]:
        again = render(s.layout, s.image.size[0], s.noise_seed)
        assert np.array_equal(np.asarray(again), np.asarray(s.image))


def test_image_size_option():
    s = make_scenes(3, seed=0, image_size=32)[0]
    assert s.image.size == (32, 32) and s.image.mode == "RGB"


def test_facts_of_splits_are_disjoint():
    facts = {split: {f for s in make_scenes(300, seed=0, split=split) for f in s.facts} for split in SPLITS}
    for split in ("train", "val", "eval"):
        assert all(fact_split(f) == split for f in facts[split])
    for split in SPLITS:
        for other in SPLITS:
            if other != split:
                assert not facts[split] & facts[other]
    assert len(facts["train"]) > 400  # facts are (nearly) unique within a split


def _facts(generator_split, n, seed=0):
    rng = random.Random(seed)
    return [f for _ in range(n) for f in make_facts(rng, generator_split) if f is not None]


def test_facts_are_as_varied_as_the_web():
    for split in ("train", "novel"):
        facts = _facts(split, 3000)
        lengths = [len(f) for f in facts]
        assert min(lengths) <= 4 and max(lengths) >= 22 and 8 <= sum(lengths) / len(lengths) <= 14
        for separator in " -_./":
            assert any(separator in f for f in facts), (split, separator)
        assert any(f.islower() for f in facts) and any(f.isupper() for f in facts)
        assert any(f != f.lower() and f != f.upper() for f in facts)  # mixed case
        assert any(c.isdigit() for f in facts for c in f) and any(f.isalpha() for f in facts)
        assert len({fact_shape(f) for f in facts}) >= 10
        # Every letter, both cases, and every digit are written, so every character is seen copied in training.
        assert set("".join(facts)) >= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def test_novel_facts_are_outside_what_the_training_generator_can_write():
    training, novel = _facts("train", 20000), _facts("novel", 5000)
    # The training generator redraws every fact its `accept` refuses: one holding a letter pair of NOVEL_PAIRS
    # (clusters such as "gn", "tj", vowel pairs such as "ae") can never come out of it; every novel fact has one.
    assert not TRAINING_FACTS.accept("Pyxwen TJ349") and TRAINING_FACTS.accept("Velora K-27")
    assert not any(has_novel_pair(f) for f in training)
    assert all(has_novel_pair(f) for f in novel)
    # The pairs are rare enough that avoiding them says little about a training fact's next letter.
    assert 20 <= len(NOVEL_PAIRS) <= 0.06 * 26 * 26
    # Other shapes too: no novel fact has the shape of a training fact.
    assert not {fact_shape(f) for f in novel} & {fact_shape(f) for f in training}
    assert not set(NOVEL_FACTS.name_shapes + NOVEL_FACTS.code_shapes) & set(
        TRAINING_FACTS.name_shapes + TRAINING_FACTS.code_shapes)
    assert not has_novel_pair("Velora K-27") and has_novel_pair("gnomibgno x8917") and has_novel_pair("MAE")


def test_facts_never_hold_a_word_of_the_world_vocabulary():
    reserved = {w.lower() for w in VOCABULARY}
    for f in _facts("train", 3000) + _facts("novel", 3000):
        assert not {w.lower() for w in re.findall(r"[A-Za-z]+", f)} & reserved, f
        assert not set(f) & set(":,()|"), f  # the caption template and the alt-text separators stay unambiguous


def test_everything_but_the_facts_is_written_in_the_world_vocabulary(scenes):
    for s in scenes:
        for text in (s.alt_text, s.caption, caption_for(s, with_facts=False)):
            for fact in s.facts:
                text = text.replace(fact, " ")
            assert set(re.findall(r"[A-Za-z]+", text)) <= set(VOCABULARY), text


def test_alt_texts_hold_the_facts_and_the_recorded_kind_of_visual_word(scenes):
    for s in scenes:
        assert s.name in s.alt_text
        if s.code is not None:
            assert re.search(rf"(SKU|Item|Ref|Model|Art\. no\.) {re.escape(s.code)}", s.alt_text), s.alt_text
        rest = s.alt_text
        for fact in s.facts:
            rest = rest.replace(fact, " ")
        rest = _words(rest)
        colours = rest & set(COLOURS)
        visual = colours | (rest & set(SHAPES))
        scene_colours = {c for c, _ in s.objects}
        if s.alt_kind == "plain":
            assert not visual and s.wrong_colour is None
        elif s.alt_kind == "correct":
            assert visual and colours <= scene_colours and s.wrong_colour is None
        else:
            assert colours == {s.wrong_colour} and s.wrong_colour not in scene_colours


def test_wrong_colour_alt_holds_the_facts_and_a_colour_not_shown(scenes):
    rng = random.Random(0)
    for s in scenes[:100]:
        alt = wrong_colour_alt(s, rng)
        assert all(fact in alt for fact in s.facts)
        for fact in s.facts:
            alt = alt.replace(fact, " ")
        colours = _words(alt) & set(COLOURS)
        assert len(colours) == 1 and not colours & {c for c, _ in s.objects}


def test_bad_inputs_are_rejected_with_the_input_named():
    with pytest.raises(ValueError, match="split"):
        make_scenes(2, seed=0, split="test")
    with pytest.raises(ValueError, match="relation"):
        scene_from_objects(random.Random(0), [("red", "circle")], "left of")
    with pytest.raises(ValueError, match="unknown object"):
        scene_from_objects(random.Random(0), [("pink", "circle")], None)
    with pytest.raises(ValueError, match="n must be"):
        make_scenes(-1, seed=0)


def test_scene_from_objects_draws_the_given_objects():
    s = scene_from_objects(random.Random(1), [("yellow", "square"), ("blue", "triangle")], "below", split="eval")
    assert s.objects == [("yellow", "square"), ("blue", "triangle")] and s.relation == "below"
    assert all(fact_split(f) == "eval" for f in s.facts)
    assert s.caption.endswith(": a yellow square below a blue triangle.")
    novel = scene_from_objects(random.Random(1), [("red", "circle")], None, split="novel")
    assert novel.split == "novel" and all(has_novel_pair(f) for f in novel.facts)
