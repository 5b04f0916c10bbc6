import dataclasses
import random

import pytest

from altogether.demo.score import (
    METRICS,
    NOVEL_CARRY_OVER,
    caption_facts,
    format_table,
    parse_caption,
    score_captions,
)
from altogether.demo.world import caption_for, make_scenes, scene_from_objects


def _scene(objects, relation, name, code, seed):
    scene = scene_from_objects(random.Random(seed), objects, relation)
    return dataclasses.replace(scene, name=name, code=code)


@pytest.fixture
def scenes():
    return [
        _scene([("purple", "triangle"), ("blue", "circle")], "left of", "Velora K-27", None, 0),
        _scene([("red", "square")], None, "tami_ru", "NPTYR005", 1),
        _scene([("green", "circle"), ("yellow", "square")], "above", "Pyxwen TJ349", None, 2),
        _scene([("orange", "triangle")], None, "gnomibgno x8917", "27-KOBA", 3),
    ]


def test_scores_with_alt_text_prompts(scenes):
    prompts = [
        "IMG_2231.jpg | Velora K-27",
        "tami_ru blue square $3.99 SKU NPTYR005",  # blue is not in the image
        "Pyxwen TJ349, 2019-03-14",
        "sale gnomibgno x8917 orange Ref 27-KOBA",  # orange is in the image
    ]
    captions = [
        "A photo of Velora K-27: a purple triangle left of a blue circle.",  # all right
        "A photo of tami_ru, code NPTYR005: a blue square.",  # facts right, wrong colour copied
        "A photo of a green circle below a yellow square.",  # facts dropped, relation wrong
        "A photo of gnomibgno x8917, code 27-KOBB: an orange triangle.",  # code altered
    ]
    scores = score_captions(scenes, captions, prompts)
    assert scores == {
        "fact_carry_over": 2 / 4,
        "colour_acc": 5 / 6,  # 2 + 0 + 2 + 1 of 6 objects
        "shape_acc": 6 / 6,
        "relation_acc": 1 / 2,
        "wrong_colour_copied": 1 / 1,
        "invented_fact": None,  # every prompt holds facts
    }


@pytest.mark.parametrize(
    "caption",
    [
        "A photo of gnomibgno x8918, code 27-KOBA: an orange triangle.",  # a digit changed
        "A photo of Gnomibgno x8917, code 27-KOBA: an orange triangle.",  # letter case changed
        "A photo of gnomibgno-x8917, code 27-KOBA: an orange triangle.",  # separator changed
        "A photo of gnomibgno x891, code 27-KOBA: an orange triangle.",  # cut short
        "A photo of gnomibgno x89177, code 27-KOBA: an orange triangle.",  # run on
        "A photo of gnomibno x8917, code 27-KOBA: an orange triangle.",  # a letter dropped
        "A photo of gnomibgno  x8917, code 27-KOBA: an orange triangle.",  # a space doubled
        "A photo of gnomibgno x8917, code 27KOBA: an orange triangle.",  # a hyphen dropped
        "A photo of gnomibgno x8917: an orange triangle.",  # the code dropped
        "A photo of 27-KOBA, code gnomibgno x8917: an orange triangle.",  # name and code swapped
        "A photo of gnomibgno x8917, code 27-KOBA, code 27-KOBA: an orange triangle.",  # a code added
        "A photo of a gnomibgno x8917, code 27-KOBA: an orange triangle.",  # a word added
        "gnomibgno x8917 27-KOBA",  # both facts, but not stated in the caption's fact slot
    ],
)
def test_a_near_miss_is_not_carried_over(scenes, caption):
    prompt = "sale gnomibgno x8917 orange Ref 27-KOBA"
    assert score_captions(scenes[3:], [caption], [prompt])["fact_carry_over"] == 0.0
    exact = "A photo of gnomibgno x8917, code 27-KOBA: an orange triangle."
    assert score_captions(scenes[3:], [exact], [prompt])["fact_carry_over"] == 1.0


def test_facts_are_read_whatever_follows_them(scenes):
    assert caption_facts("A photo of tami_ru, code NPTYR005: a purple blob") == ("tami_ru", "NPTYR005")
    assert caption_facts(" A photo of Velora K-27: ") == ("Velora K-27",)
    assert caption_facts("A photo of a red square.") == ()
    prompts = ["Velora K-27 | sale"]
    scores = score_captions(scenes[:1], ["A photo of Velora K-27: a purple blob."], prompts)
    assert scores["fact_carry_over"] == 1.0 and scores["colour_acc"] == 0.0


def test_scores_without_alt_text(scenes):
    captions = [
        "A photo of a blue circle right of a purple triangle.",  # same objects, other order
        "A photo of Velora K-27: a red square.",  # fact slot filled: invented
        "A photo of a green circle.",  # one object of two: no credit
        "a photo of an orange triangle",  # off-template: no credit
    ]
    scores = score_captions(scenes, captions, ["", None, "", ""])
    assert scores == {
        "fact_carry_over": None,
        "colour_acc": 3 / 6,
        "shape_acc": 3 / 6,
        "relation_acc": 1 / 2,
        "wrong_colour_copied": None,
        "invented_fact": 1 / 4,
    }


def test_another_scenes_alt_text_is_not_eligible_for_fact_metrics(scenes):
    prompts = ["tami_ru red square SKU NPTYR005", "Velora K-27 blue circle"]
    captions = ["A photo of tami_ru, code NPTYR005: a purple triangle left of a blue circle.", "A photo of a red square."]
    scores = score_captions(scenes[:2], prompts=prompts, captions=captions)
    assert scores["fact_carry_over"] is None and scores["invented_fact"] is None
    # "red" is wrong for the first scene (not copied), "blue" for the second (not copied).
    assert scores["wrong_colour_copied"] == 0.0


def test_a_prompt_missing_one_of_the_facts_is_not_eligible(scenes):
    # The code is not in the prompt: nothing could tell it, so carry-over is not measured on this sample.
    scores = score_captions(scenes[1:2], ["A photo of tami_ru: a red square."], ["tami_ru | sale"])
    assert scores["fact_carry_over"] is None


@pytest.mark.parametrize("split", ["eval", "novel"])
def test_world_targets_score_perfectly(split):
    scenes = make_scenes(200, seed=3, split=split)
    with_alt = score_captions(scenes, [s.caption for s in scenes], [s.alt_text for s in scenes])
    assert with_alt == {m: 1.0 for m in METRICS} | {"wrong_colour_copied": 0.0, "invented_fact": None}
    blind = score_captions(scenes, [caption_for(s, with_facts=False) for s in scenes], [""] * len(scenes))
    assert blind["invented_fact"] == 0.0 and blind["fact_carry_over"] is None
    assert blind["colour_acc"] == blind["shape_acc"] == blind["relation_acc"] == 1.0
    assert all(parse_caption(s.caption).facts == s.facts for s in scenes)


def test_parse_caption():
    parsed = parse_caption("  A photo of Velora K-27, code 9L9L9: an orange square above a red circle. ")
    assert parsed.facts == ("Velora K-27", "9L9L9")
    assert parsed.objects == [("orange", "square"), ("red", "circle")] and parsed.relation == "above"
    assert parse_caption("A photo of tami_ru: a red circle.").facts == ("tami_ru",)
    assert parse_caption("A photo of a red circle.").facts == ()
    for bad in ("A photo of a red circle", "A photo of a pink circle.", "A photo of a red circle near a blue square."):
        assert parse_caption(bad) is None


def test_length_mismatch_is_rejected(scenes):
    with pytest.raises(ValueError, match="equal lengths"):
        score_captions(scenes, ["A photo of a red square."], ["", "", "", ""])


def test_format_table():
    table = format_table(
        {
            "w/ alt": {"colour_acc": 1.0, NOVEL_CARRY_OVER: 0.955, "fact_carry_over": 0.96, "invented_fact": None},
            "w/o alt": {"fact_carry_over": None, NOVEL_CARRY_OVER: None, "colour_acc": 0.9126, "invented_fact": 0.0},
        }
    )
    assert table == (
        "| condition | carry-over (held-out facts) | carry-over (novel generator) | colour acc | invented fact |\n"
        "|---|---:|---:|---:|---:|\n"
        "| w/ alt | 0.960 | 0.955 | 1.000 | n/a |\n"
        "| w/o alt | n/a | n/a | 0.913 | 0.000 |\n"
    )
    with pytest.raises(ValueError, match="w/ alt"):
        format_table({"w/ alt": {"colour_acc": "high"}})
