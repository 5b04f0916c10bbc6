import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from altogether.demo.clip import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    attribute_probes,
    demo_clip_config,
    evaluate_demo_clip,
    images_to_tensor,
    load_demo_clip,
    train_demo_clip,
)
from altogether.demo.world import COLOURS, RELATIONS, SHAPES, make_scenes, visual_description

# A CLIP small enough to train for a few steps in about a second.
TINY = dict(tower="vit", width=32, depth=1, patch_size=16, embed_dim=16, text_width=32, text_layers=1)
TINY_RESNET = dict(tower="resnet", width=8, embed_dim=16, text_width=32, text_layers=1)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "demo_clip"
    return train_demo_clip(
        out, num_scenes=96, steps=3, batch_size=16, seed=0, config=demo_clip_config(**TINY), num_threads=1
    )


def test_saved_folder_is_open_clip_local_dir_format(tiny_clip):
    assert sorted(p.name for p in tiny_clip.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    config = json.loads((tiny_clip / CONFIG_NAME).read_text())
    assert config == json.loads(json.dumps(demo_clip_config(**TINY)))
    assert not [p for p in tiny_clip.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_reload_uses_the_saved_weights_and_is_reproducible(tiny_clip):
    saved = load_file(str(tiny_clip / WEIGHTS_NAME))
    model, preprocess, _ = load_demo_clip(tiny_clip)
    state = model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    # A freshly initialised CLIP of the same shape differs: the weights really were trained and loaded.
    fresh = open_clip.CLIP(**demo_clip_config(**TINY)["model_cfg"])
    assert not torch.equal(fresh.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])

    images = [s.image for s in make_scenes(4, seed=9, split="eval")]
    again, _, _ = load_demo_clip(tiny_clip)
    with torch.no_grad():
        batch = torch.stack([preprocess(im) for im in images])
        assert torch.equal(model.encode_image(batch), again.encode_image(batch))


def test_training_leaves_the_token_embedding_as_initialised_and_trains_the_rest(tmp_path):
    out = train_demo_clip(tmp_path / "resnet", num_scenes=96, steps=2, batch_size=16, seed=3,
                          config=demo_clip_config(**TINY_RESNET), num_threads=1)
    trained = load_file(str(out / WEIGHTS_NAME))
    torch.manual_seed(3)  # the seed training initialises its model with
    initial = open_clip.CLIP(**demo_clip_config(**TINY_RESNET)["model_cfg"]).state_dict()
    assert torch.equal(trained["token_embedding.weight"], initial["token_embedding.weight"])
    # Both towers train (the image tower ran on channels-last images), and are saved in the usual layout.
    for key in ("visual.conv1.weight", "transformer.resblocks.0.mlp.c_fc.weight"):
        assert not torch.equal(trained[key], initial[key]) and trained[key].is_contiguous()


def test_training_inputs_match_the_loaded_preprocess_and_tokenizer(tiny_clip):
    config = json.loads((tiny_clip / CONFIG_NAME).read_text())
    scenes = make_scenes(3, seed=1)
    _, preprocess, tokenizer = load_demo_clip(tiny_clip)
    expected = torch.stack([preprocess(s.image) for s in scenes])
    assert torch.allclose(images_to_tensor([s.image for s in scenes], config), expected, atol=1e-5)
    texts = [visual_description(s) for s in scenes]
    context = config["model_cfg"]["text_cfg"]["context_length"]
    assert torch.equal(tokenizer(texts), open_clip.SimpleTokenizer(context_length=context)(texts))


def test_evaluate_reports_probe_accuracies(tiny_clip):
    scenes = make_scenes(40, seed=2, split="eval")
    result = evaluate_demo_clip(tiny_clip, scenes)
    assert result["n_single"] + result["n_pair"] == 40 and result["n_single"] > 0 and result["n_pair"] > 0
    for key in ("single_colour", "single_shape", "pair_colour", "pair_shape", "pair_relation"):
        assert 0.0 <= result[key] <= 1.0
    only_single = [s for s in scenes if s.relation is None]
    assert evaluate_demo_clip(tiny_clip, only_single)["pair_relation"] is None


def test_attribute_probes_vary_one_fact_each():
    scene = next(s for s in make_scenes(20, seed=0) if s.relation is not None)
    probes = attribute_probes(scene)
    assert set(probes) == {"colour0", "shape0", "colour1", "shape1", "relation"}
    truth = visual_description(scene)
    for options, index in probes.values():
        assert options[index] == truth and len(set(options)) == len(options)
    assert len(probes["colour1"][0]) == len(COLOURS) and len(probes["shape0"][0]) == len(SHAPES)
    assert len(probes["relation"][0]) == len(RELATIONS)


def test_retraining_replaces_the_folder_and_bad_settings_are_rejected(tiny_clip, tmp_path):
    out = tmp_path / "clip"
    config = demo_clip_config(**TINY_RESNET)
    first = train_demo_clip(out, num_scenes=64, steps=1, batch_size=8, seed=0, config=config, num_threads=1)
    before = load_file(str(first / WEIGHTS_NAME))
    train_demo_clip(out, num_scenes=64, steps=2, batch_size=8, seed=1, config=config, num_threads=1)
    after = load_file(str(out / WEIGHTS_NAME))
    assert not torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["clip"]
    with pytest.raises(ValueError, match="batch_size"):
        train_demo_clip(tmp_path / "x", num_scenes=4, steps=1, batch_size=16, config=config)
    with pytest.raises(ValueError, match="steps"):
        train_demo_clip(tmp_path / "x", steps=0, config=config)
    with pytest.raises(ValueError, match="patch_size"):
        demo_clip_config(tower="vit", image_size=64, patch_size=7)
    with pytest.raises(ValueError, match="tower"):
        demo_clip_config(tower="mlp")
    # The default context holds the world's longest description; a shorter one would cut descriptions short.
    train_demo_clip(tmp_path / "fits", num_scenes=64, steps=1, batch_size=8, config=config, num_threads=1)
    with pytest.raises(ValueError, match=r"context_length 9 cuts descriptions short: '.+' needs 1\d tokens"):
        train_demo_clip(tmp_path / "x", num_scenes=64, steps=1, batch_size=8,
                        config=demo_clip_config(**TINY_RESNET, context_length=9), num_threads=1)


def test_locked_encoder_ignores_train_mode(tmp_path):
    # The ResNet tower has batch norm: a captioner must freeze it with open_clip's lock (or keep it in
    # eval mode), else a train-mode forward would use batch statistics and update them.
    config = demo_clip_config(**TINY_RESNET)
    path = train_demo_clip(tmp_path / "clip", num_scenes=64, steps=2, batch_size=8, config=config, num_threads=1)
    model, preprocess, _ = load_demo_clip(path)
    batch = torch.stack([preprocess(s.image) for s in make_scenes(6, seed=4)])
    with torch.no_grad():
        reference = model.encode_image(batch)
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
        model.train()
        assert torch.allclose(model.encode_image(batch), reference, atol=1e-5)
        assert torch.allclose(model.encode_image(batch[:2]), reference[:2], atol=1e-5)
