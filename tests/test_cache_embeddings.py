import json

import pytest
import torch

from altogether.cache_embeddings import CachedSource, EmbeddingCache, main, write_cache
from altogether.data.datamodule import open_sources
from altogether.data.images import load_image
from altogether.data.records import BadRecord
from altogether.training import build_model


def test_cache_round_trip_and_same_loss_as_the_image_path(make_recipe, jsonl_data, tmp_path):
    cfg = make_recipe("finetune_round3", {"data.format": "jsonl", "data.train": str(jsonl_data)})
    cache_dir = tmp_path / "cache"
    assert main(["recipe=finetune_round3", f"cache_dir={cache_dir}", "batch_size=5",
                 *[f"{k}={v}" for k, v in _flat(cfg).items()]]) == 0
    meta = json.loads((cache_dir / "cache.json").read_text())
    assert meta["records"] == 24 and meta["skipped"] == 0 and meta["dtype"] == "float16"

    torch.manual_seed(0)
    model, tok, transform = build_model(cfg)
    train, _ = open_sources(cfg)
    cache = EmbeddingCache(cache_dir, expect_encoder={"name": cfg.model.encoder.name, "pretrained": None,
                                                      "resize_mode": "squash"})
    cached = CachedSource(train, cache)
    record = train[3]
    direct = model.embed_images(transform(load_image(record.image))[None])
    torch.testing.assert_close(cached[3].extra["image_embeds"].float(), direct[0], atol=2e-3, rtol=0)

    from altogether.data.datamodule import SampleBuilder, collate_training
    builder = SampleBuilder(tok, transform, task="finetune", layout=cfg.layout, seed=0)
    image_batch = collate_training([builder(train[i], i) for i in range(6)], num_visual_tokens=4, pad_id=tok.pad_token_id)
    cache_batch = collate_training([builder(cached[i], i) for i in range(6)], num_visual_tokens=4, pad_id=tok.pad_token_id)
    assert "pixel_values" not in cache_batch and cache_batch["image_embeds"].shape == (6, 32)
    torch.testing.assert_close(model(cache_batch).loss, model(image_batch).loss, atol=1e-3, rtol=0)

    from altogether.training import fit
    settings = {**_flat(cfg), "data.use_cache": True, "data.cache_dir": str(cache_dir), "data.val_fraction": 0.25,
                "data.micro_batch_size": 3, "data.num_workers": 0, "optim.global_batch_size": 3,
                "optim.max_steps": 2, "optim.warmup_steps": 1, "trainer.sample_every_n_steps": 1,
                "trainer.progress_bar": False, "model.encoder.pretrained": None, "init_from": None}
    export = fit(make_recipe("finetune_round3", settings))
    assert (export / "model.safetensors").is_file() and (export / "encoder" / "open_clip_config.json").is_file()
    # The next stage starts from that export, whose encoder is now its own copy of the one the cache was made with.
    follow = make_recipe("finetune_round3", {**settings, "init_from": str(export), "output_dir": str(tmp_path / "next")})
    assert json.loads((fit(follow) / "altogether.json").read_text())["training"]["steps"] == 2


def test_mismatched_encoder_and_missing_keys_are_errors(tmp_path, tiny_parts):
    model, tok, transform = tiny_parts
    from altogether.data.records import Record
    from tests.conftest import draw

    records = [Record("a", draw("red", "square"), []), Record("b", str(tmp_path / "missing.png"), [])]
    meta = write_cache(tmp_path / "c", records, model.encoder, transform, encoder_spec={"name": "x", "pretrained": None},
                       source="test")
    assert meta["records"] == 1 and meta["skipped"] == 1 and "missing.png" in meta["skipped_reasons"][0]
    with pytest.raises(ValueError, match="made with encoder"):
        EmbeddingCache(tmp_path / "c", expect_encoder={"name": "y", "pretrained": None})
    cached = CachedSource(records, EmbeddingCache(tmp_path / "c"))
    assert cached[0].extra["image_embeds"].shape == (32,)
    with pytest.raises(BadRecord, match="no cached embedding"):
        cached[1]


def test_a_cache_made_with_another_resize_policy_is_refused(tmp_path, tiny_parts, make_recipe, jsonl_data):
    model, _, transform = tiny_parts
    from altogether.data.records import Record
    from altogether.training import fit
    from tests.conftest import draw

    spec = {"name": "x", "pretrained": None}
    write_cache(tmp_path / "crop", [Record("a", draw("red", "square"), [])], model.encoder, transform,
                encoder_spec={**spec, "resize_mode": "crop"}, source="test")
    assert len(EmbeddingCache(tmp_path / "crop", expect_encoder={**spec, "resize_mode": "crop"})) == 1
    with pytest.raises(ValueError, match=r"made with model.encoder.resize_mode=crop, but the recipe has squash"):
        EmbeddingCache(tmp_path / "crop", expect_encoder={**spec, "resize_mode": "squash"})
    # A cache from before the setting (no resize_mode) was made with open_clip's evaluation transform: crop.
    old = json.loads((tmp_path / "crop" / "cache.json").read_text())
    del old["encoder"]["resize_mode"]
    (tmp_path / "crop" / "cache.json").write_text(json.dumps(old))
    assert len(EmbeddingCache(tmp_path / "crop", expect_encoder={**spec, "resize_mode": "crop"})) == 1
    with pytest.raises(ValueError, match="resize_mode=crop, but the recipe has pad"):
        EmbeddingCache(tmp_path / "crop", expect_encoder={**spec, "resize_mode": "pad"})

    # Through training: a cache built by the command with the default policy, a run asking for crop.
    cfg = make_recipe("finetune_round3", {"data.format": "jsonl", "data.train": str(jsonl_data)})
    cache_dir = tmp_path / "cache"
    assert main(["recipe=finetune_round3", f"cache_dir={cache_dir}", *[f"{k}={v}" for k, v in _flat(cfg).items()]]) == 0
    assert json.loads((cache_dir / "cache.json").read_text())["encoder"]["resize_mode"] == "squash"
    run = make_recipe("finetune_round3", {**_flat(cfg), "data.use_cache": True, "data.cache_dir": str(cache_dir),
                                          "model.encoder.pretrained": None, "init_from": None,
                                          "model.encoder.resize_mode": "crop"})
    with pytest.raises(ValueError) as refused:
        fit(run)
    assert str(refused.value) == (f"embedding cache {cache_dir} was made with model.encoder.resize_mode=squash, but "
                                  "the recipe has crop: rebuild the cache, or train with model.encoder.resize_mode=squash")


def _flat(cfg):
    return {"data.format": cfg.data.format, "data.train": cfg.data.train, "model.encoder.name": cfg.model.encoder.name,
            "model.encoder.pretrained": "null", "model.mapper.num_visual_tokens": 4, "init_from": "null",
            "model.decoder.tokenizer": cfg.model.decoder.tokenizer}


def test_metaclip_shards_are_cached_by_the_command_and_pretrain_trains_from_the_cache(hub_world, tmp_path, capsys,
                                                                                      monkeypatch):
    """The pretrain recipe's own format: webdataset shards (MetaCLIP layout) -> the command -> a streamed pretrain
    that reads vectors, never pixels."""
    from altogether import train
    from altogether.cli import run_cli
    from altogether.config import EncoderConfig
    from altogether.data import datamodule
    from altogether.model import ImageEncoder

    w = hub_world
    cache_dir = tmp_path / "cache"
    argv = ["recipe=pretrain", *w.model_overrides(), f"data.train={w.shard_pattern}", f"cache_dir={cache_dir}",
            "batch_size=5"]
    assert run_cli(main, argv) == 0
    meta = json.loads((cache_dir / "cache.json").read_text())
    assert (meta["records"], meta["skipped"], meta["dim"]) == (len(w.pretrain_images), 0, 1024)
    cache = EmbeddingCache(cache_dir)
    assert sorted(cache.index) == sorted(image.uuid for image in w.pretrain_images)  # MetaCLIP's uuids are the keys
    encoder, transform = ImageEncoder.from_config(EncoderConfig(name=f"local-dir:{w.encoder}", pretrained=None))
    first = w.pretrain_images[0]
    with torch.no_grad():
        direct = encoder(transform(load_image(first.image()))[None])[0]
    torch.testing.assert_close(cache[first.uuid].float(), direct, atol=2e-3, rtol=0)

    decoded = []
    real_load = datamodule.load_image
    monkeypatch.setattr(datamodule, "load_image", lambda *a, **k: decoded.append(1) or real_load(*a, **k))
    run = tmp_path / "run"
    assert run_cli(train.main, ["recipe=pretrain", *w.model_overrides(), f"data.train={w.shard_pattern}",
                                "data.use_cache=true", f"data.cache_dir={cache_dir}", "data.shuffle_buffer=8",
                                f"output_dir={run}", "optim.max_steps=2", "optim.warmup_steps=1",
                                "optim.global_batch_size=8", "data.micro_batch_size=4", "data.num_workers=0",
                                "trainer.progress_bar=false"]) == 0, capsys.readouterr().err[-2000:]
    training = json.loads((run / "export" / "altogether.json").read_text())["training"]
    assert training["steps"] == 2 and training["skipped"] == 0
    assert decoded == []  # every training sample came from the cache


def test_the_command_refuses_duplicate_keys_and_an_empty_result_leaving_nothing(tmp_path, tiny_parts):
    from altogether.data.records import Record
    from tests.conftest import draw

    model, _, transform = tiny_parts
    spec = {"name": "x", "pretrained": None}
    twice = [Record("a", draw("red", "square"), []), Record("a", draw("blue", "circle"), [])]
    with pytest.raises(ValueError, match="record key 'a' appears twice in test"):
        write_cache(tmp_path / "c", twice, model.encoder, transform, encoder_spec=spec, source="test")
    with pytest.raises(ValueError, match=r"no image of test could be embedded \(1 skipped, e.g. .*missing.png"):
        write_cache(tmp_path / "c", [Record("b", str(tmp_path / "missing.png"), [])], model.encoder, transform,
                    encoder_spec=spec, source="test")
    assert not (tmp_path / "c").exists()
