import dataclasses
import random

import pytest

from altogether.demo.score import METRICS, contains_name, format_table, parse_caption, score_captions
from altogether.demo.world import caption_for, make_scenes, scene_from_facts


def _scene(objects, relation, name, seed):
    scene = scene_from_facts(random.Random(seed), objects, relation)
    return dataclasses.replace(scene, name=name)


@pytest.fixture
def scenes():
    return [
        _scene([("purple", "triangle"), ("blue", "circle")], "left of", "Velora K-27", 0),
        _scene([("red", "square")], None, "Tamiru B-10", 1),
        _scene([("green", "circle"), ("yellow", "square")], "above", "Kobale Z-99", 2),
        _scene([("orange", "triangle")], None, "Dusafi P-42", 3),
    ]


def test_scores_with_alt_text_prompts(scenes):
    prompts = [
        "IMG_2231.jpg | Velora K-27",
        "Tamiru B-10 blue square $3.99",  # blue is not in the image
        "Kobale Z-99, 2019-03-14",
        "sale Dusafi P-42 orange",  # orange is in the image
    ]
    captions = [
        "A photo of a Velora K-27: a purple triangle left of a blue circle.",  # all right
        "A photo of a Tamiru B-10: a blue square.",  # wrong colour copied
        "A photo of a green circle below a yellow square.",  # name dropped, relation wrong
        "A photo of a Dusafi P-42-1: an orange triangle.",  # name altered
    ]
    scores = score_captions(scenes, captions, prompts)
    assert scores == {
        "name_carry_over": 2 / 4,
        "colour_acc": 5 / 6,  # 2 + 0 + 2 + 1 of 6 objects
        "shape_acc": 6 / 6,
        "relation_acc": 1 / 2,
        "wrong_colour_copied": 1 / 1,
        "invented_name": None,  # every prompt holds a name
    }


def test_scores_without_alt_text(scenes):
    captions = [
        "A photo of a blue circle right of a purple triangle.",  # same facts, other order
        "A photo of a Velora K-27: a red square.",  # name slot filled: invented
        "A photo of a green circle.",  # one object of two: no credit
        "a photo of an orange triangle",  # off-template: no credit
    ]
    scores = score_captions(scenes, captions, ["", None, "", ""])
    assert scores == {
        "name_carry_over": None,
        "colour_acc": 3 / 6,
        "shape_acc": 3 / 6,
        "relation_acc": 1 / 2,
        "wrong_colour_copied": None,
        "invented_name": 1 / 4,
    }


def test_name_like_token_anywhere_counts_as_invented(scenes):
    captions = ["A photo of a purple triangle left of a blue circle. Drokugi W-57", "A photo of a red square."]
    scores = score_captions(scenes[:2], captions, ["", ""])
    assert scores["invented_name"] == 1 / 2
    assert scores["colour_acc"] == 1 / 3  # the first caption no longer parses


def test_random_alt_prompt_with_other_names_is_not_eligible_for_name_metrics(scenes):
    prompts = ["Tamiru B-10 red square", "Velora K-27 blue circle"]
    captions = ["A photo of a Tamiru B-10: a purple triangle left of a blue circle.", "A photo of a red square."]
    scores = score_captions(scenes[:2], prompts=prompts, captions=captions)
    assert scores["name_carry_over"] is None and scores["invented_name"] is None
    # "red" is wrong for the first scene (not copied), "blue" for the second (not copied).
    assert scores["wrong_colour_copied"] == 0.0


def test_world_targets_score_perfectly():
    scenes = make_scenes(200, seed=3, split="eval")
    with_alt = score_captions(scenes, [s.caption for s in scenes], [s.alt_text for s in scenes])
    assert with_alt == {m: 1.0 for m in METRICS} | {"wrong_colour_copied": 0.0, "invented_name": None}
    blind = score_captions(scenes, [caption_for(s, with_name=False) for s in scenes], [""] * len(scenes))
    assert blind["invented_name"] == 0.0 and blind["name_carry_over"] is None
    assert blind["colour_acc"] == blind["shape_acc"] == blind["relation_acc"] == 1.0


def test_parse_caption():
    parsed = parse_caption("  A photo of a Velora K-27: an orange square above a red circle. ")
    assert parsed.name == "Velora K-27"
    assert parsed.objects == [("orange", "square"), ("red", "circle")] and parsed.relation == "above"
    assert parse_caption("A photo of a red circle.").name is None
    for bad in ("A photo of a red circle", "A photo of a pink circle.", "A photo of a red circle near a blue square."):
        assert parse_caption(bad) is None


def test_contains_name_needs_the_exact_token():
    assert contains_name("IMG_1.jpg Velora K-27, sale", "Velora K-27")
    assert not contains_name("Velora K-271", "Velora K-27")
    assert not contains_name("velora K-27", "Velora K-27")
    assert not contains_name(None, "Velora K-27")


def test_length_mismatch_is_rejected(scenes):
    with pytest.raises(ValueError, match="equal lengths"):
        score_captions(scenes, ["A photo of a red square."], ["", "", "", ""])


def test_format_table():
    table = format_table(
        {
            "w/ alt": {"name_carry_over": 0.96, "colour_acc": 1.0, "invented_name": None},
            "w/o alt": {"name_carry_over": None, "colour_acc": 0.9126, "invented_name": 0.0},
        }
    )
    assert table == (
        "| condition | name carry-over | colour acc | invented name |\n"
        "|---|---:|---:|---:|\n"
        "| w/ alt | 0.960 | 1.000 | n/a |\n"
        "| w/o alt | n/a | 0.913 | 0.000 |\n"
    )
    with pytest.raises(ValueError, match="w/ alt"):
        format_table({"w/ alt": {"colour_acc": "high"}})
