"""Export folders: file layout, strict loading, encoder reference vs copy, copying an export."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from altogether.config import LayoutConfig
from altogether.generation import GenerationConfig
from altogether.export import (
    CONFIG_FILE, WEIGHTS_FILE, ExportError, copy_export, encoder_is_portable, load_export, read_export_config,
    save_export,
)
from altogether.layout import collate, tokenize_sample

from .conftest import hub_rows

BASE_FILES = ["altogether.json", "model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
ENCODER_FILES = ["encoder/open_clip_config.json", "encoder/open_clip_model.safetensors"]


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def model_cfg(tiny_model_cfg):
    """The config the conftest ``tiny_parts`` model was built from."""
    return tiny_model_cfg


@pytest.fixture(scope="module")
def export(tiny_parts, model_cfg, tmp_path_factory):
    model, tokenizer, _ = tiny_parts
    return save_export(tmp_path_factory.mktemp("e") / "export", model, tokenizer, model_cfg=model_cfg,
                       layout=LayoutConfig(), generation=GenerationConfig(), extra={"training": {"steps": 3}})


def batch_for(tokenizer, prompts=("zorbit K-12 for sale", "")):
    samples = [tokenize_sample(tokenizer, p, "a red square", max_alt_tokens=16, max_caption_tokens=16) for p in prompts]
    batch = collate(samples, num_visual_tokens=4, pad_id=tokenizer.pad_token_id)
    batch["image_embeds"] = torch.nn.functional.normalize(torch.randn(len(prompts), 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    return batch


def test_export_layout_and_config(export, tiny_dirs):
    # A local-dir encoder has no portable reference, so it is copied; the source is still recorded.
    assert files(export) == sorted(BASE_FILES + ENCODER_FILES)
    meta = read_export_config(export)
    assert meta["model"]["encoder"] == {"name": "local-dir:encoder", "pretrained": None, "resize_mode": "squash"}
    assert meta["encoder_source"]["name"] == f"local-dir:{tiny_dirs[0]}"
    assert meta["lora"] is None and meta["training"] == {"steps": 3}
    assert meta["generation"]["temperature"] == 0.2 and meta["generation"]["top_p"] == 0.7
    keys = set(load_file(str(export / WEIGHTS_FILE)))
    assert {k.split(".")[0] for k in keys} == {"mapper", "decoder"}
    # The tied LM head / input embedding is written once.
    assert ("decoder.lm_head.weight" in keys) != ("decoder.model.decoder.embed_tokens.weight" in keys)


def test_load_export_reproduces_logits(export, tiny_parts):
    model, tokenizer, _ = tiny_parts
    loaded, tok, transform, meta = load_export(export)
    batch = batch_for(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded.logits(batch), model.logits(batch))
    assert transform is not None and len(tok) == len(tokenizer)
    assert not any(p.requires_grad for p in loaded.encoder.parameters())


@pytest.mark.parametrize("change, named", [
    ("drop", "decoder.model.decoder.final_layer_norm.bias"),
    ("add", "mapper.surplus"),
])
def test_strict_loading_names_the_tensor(export, tmp_path, change, named):
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    tensors = load_file(str(broken / WEIGHTS_FILE))
    if change == "drop":
        del tensors[named]
    else:
        tensors[named] = torch.zeros(2)
    save_file(tensors, str(broken / WEIGHTS_FILE))
    with pytest.raises(ExportError, match=named.replace(".", r"\.")) as err:
        load_export(broken)
    assert ("Missing" if change == "drop" else "Unexpected") in str(err.value)


def test_not_an_export_and_wrong_version(tmp_path, export):
    with pytest.raises(ExportError, match="altogether.json is missing"):
        load_export(tmp_path)
    broken = tmp_path / "v9"
    shutil.copytree(export, broken)
    meta = json.loads((broken / CONFIG_FILE).read_text())
    meta["version"] = 9
    (broken / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="unsupported export format"):
        load_export(broken)


def test_encoder_reference_is_portable_only_for_known_sources(tmp_path):
    assert encoder_is_portable({"name": "ViT-H-14-quickgelu", "pretrained": "metaclip_fullcc"})
    assert encoder_is_portable({"name": "hf-hub:timm/some-clip", "pretrained": None})
    assert not encoder_is_portable({"name": "ViT-H-14-quickgelu", "pretrained": None})  # random weights
    assert not encoder_is_portable({"name": "ViT-H-14-quickgelu", "pretrained": str(tmp_path / "w.bin")})
    assert not encoder_is_portable({"name": f"local-dir:{tmp_path}", "pretrained": None})


def test_referenced_encoder_is_not_copied(tiny_parts, model_cfg, tmp_path):
    """A loaded export whose encoder came from a known tag saves only the reference by default."""
    model, tokenizer, _ = tiny_parts
    source = {"name": "ViT-H-14-quickgelu", "pretrained": "metaclip_fullcc"}
    out = save_export(tmp_path / "ref", model, tokenizer, model_cfg=model_cfg, layout=LayoutConfig(),
                      generation=GenerationConfig(), encoder_source=source)
    assert files(out) == BASE_FILES
    meta = read_export_config(out)
    assert meta["model"]["encoder"] == {**source, "resize_mode": "squash"} and meta["encoder_source"] == source
    # include_encoder copies it from where it loads now, keeping the reference as its source.
    full = save_export(tmp_path / "full", model, tokenizer, model_cfg=model_cfg, layout=LayoutConfig(),
                       generation=GenerationConfig(), encoder_source=source, include_encoder=True)
    assert files(full) == sorted(BASE_FILES + ENCODER_FILES)
    assert read_export_config(full)["encoder_source"] == source


def test_copy_export_is_exact_and_replaces_atomically(export, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    copy_export(export, target)
    assert files(target) == files(export)
    assert (target / WEIGHTS_FILE).read_bytes() == (export / WEIGHTS_FILE).read_bytes()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left behind


def test_decoder_keeps_its_own_vocabulary_through_an_export(opt_folder, tiny_model_cfg, tmp_path):
    """A decoder with more embedding rows than its tokenizer has tokens (facebook/opt-1.3b: 50272 and 50265),
    loaded with from_pretrained from its folder, exports and loads back strictly to the same logits."""
    import dataclasses

    from altogether.config import DecoderConfig
    from altogether.model import AltogetherModel, load_tokenizer

    cfg = dataclasses.replace(tiny_model_cfg, decoder=DecoderConfig(name_or_path=str(opt_folder)))
    tokenizer = load_tokenizer(cfg.decoder)
    model, _ = AltogetherModel.from_config(cfg, tokenizer)
    assert model.decoder.get_input_embeddings().num_embeddings == hub_rows(opt_folder) > len(tokenizer)
    out = save_export(tmp_path / "export", model, tokenizer, model_cfg=cfg, layout=LayoutConfig(),
                      generation=GenerationConfig())
    assert read_export_config(out)["decoder_hf_config"]["vocab_size"] == hub_rows(opt_folder)
    loaded, *_ = load_export(out)
    batch = batch_for(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded.logits(batch), model.eval().logits(batch))


def test_a_tokenizer_larger_than_the_decoder_grows_the_embeddings_and_says_so(tiny_model_cfg, tmp_path, caplog):
    import dataclasses

    from altogether.config import DecoderConfig
    from altogether.model import AltogetherModel, load_tokenizer
    from altogether.tiny import tiny_opt_config

    decoder = DecoderConfig(config={**tiny_opt_config(), "vocab_size": 300}, tokenizer=tiny_model_cfg.decoder.tokenizer)
    cfg = dataclasses.replace(tiny_model_cfg, decoder=decoder)
    tokenizer = load_tokenizer(cfg.decoder)
    tokens = len(tokenizer)
    assert tokens > 300
    model, _ = AltogetherModel.from_config(cfg, tokenizer)
    assert model.decoder.get_input_embeddings().num_embeddings == model.decoder.lm_head.out_features == tokens
    assert f"300 embedding rows but its tokenizer {tokens} tokens" in caplog.text
    out = save_export(tmp_path / "export", model, tokenizer, model_cfg=cfg, layout=LayoutConfig(),
                      generation=GenerationConfig())
    assert load_export(out)[0].decoder.get_input_embeddings().num_embeddings == tokens


def test_the_resize_policy_is_stored_and_old_exports_load_with_crop(tiny_parts, model_cfg, make_recipe, tmp_path):
    """An export keeps its policy through load, save_pretrained and copy_export; one written before the setting
    existed (no ``resize_mode``) was trained with open_clip's evaluation transform and loads with ``crop``."""
    from omegaconf import OmegaConf

    from altogether import Recaptioner
    from tests.test_images import seen_policy

    model, tokenizer, _ = tiny_parts
    padded = OmegaConf.merge(OmegaConf.structured(model_cfg), {"encoder": {"resize_mode": "pad"}})
    export = save_export(tmp_path / "pad", model, tokenizer, model_cfg=padded, layout=LayoutConfig(),
                         generation=GenerationConfig())
    assert read_export_config(export)["model"]["encoder"]["resize_mode"] == "pad"
    assert seen_policy(load_export(export)[2]) == "pad"
    resaved = Recaptioner.from_pretrained(export).save_pretrained(tmp_path / "resaved")
    assert seen_policy(Recaptioner.from_pretrained(resaved).transform) == "pad"
    # Training that starts from it uses the recipe's policy, the one its own export will record.
    from altogether.training import build_model

    assert seen_policy(build_model(make_recipe("finetune_round3", {"init_from": str(export)}))[2]) == "squash"

    old = tmp_path / "old"
    shutil.copytree(export, old)
    meta = read_export_config(old)
    del meta["model"]["encoder"]["resize_mode"]
    (old / CONFIG_FILE).write_text(json.dumps(meta))
    assert seen_policy(load_export(old)[2]) == "crop"
    assert seen_policy(load_export(old, resize_mode="squash")[2]) == "squash"  # a recipe starting from it
    resaved = Recaptioner.from_pretrained(old).save_pretrained(tmp_path / "old-resaved")
    assert read_export_config(resaved)["model"]["encoder"]["resize_mode"] == "crop"
    assert "resize_mode" not in read_export_config(copy_export(old, tmp_path / "old-copy"))["model"]["encoder"]


def test_prompt_end_travels_with_the_export_and_older_exports_have_none(export, tiny_parts, model_cfg, tmp_path,
                                                                          make_recipe, caplog):
    from altogether import Recaptioner

    model, tokenizer, _ = tiny_parts
    marked = save_export(tmp_path / "marked", model, tokenizer, model_cfg=model_cfg,
                         layout=LayoutConfig(prompt_end=" ::"), generation=GenerationConfig())
    end = tokenizer(" ::", add_special_tokens=False)["input_ids"]
    alt = tokenizer("zorbit K-12", add_special_tokens=False)["input_ids"]
    captioner = Recaptioner.from_pretrained(marked, device="cpu")
    assert captioner.layout.prompt_end == " ::"
    assert captioner.prompt_ids("zorbit K-12") == alt + end and captioner.prompt_ids(None) == end
    # A next stage started from it with another mark trains without the one the decoder relies on: said once.
    from altogether.training import model_of_init

    with caplog.at_level(logging.WARNING, logger="altogether.training"):
        model_of_init(make_recipe("finetune_round3", {"init_from": str(marked)}))
        model_of_init(make_recipe("finetune_round3", {"init_from": str(marked), "layout.prompt_end": " ::"}))
    assert [r.getMessage() for r in caplog.records] == [
        f"init_from {marked} was trained with layout.prompt_end ' ::'; this recipe sets ''"]
    # The longest prompt counts the mark too (at most a token per byte and a word-start piece) before any load.
    from altogether.generation import GenerationError
    from altogether.recaptioner import check_export_generation

    meta = read_export_config(marked)
    room = (meta["decoder_hf_config"]["max_position_embeddings"] - meta["model"]["mapper"]["num_visual_tokens"]
            - LayoutConfig().max_alt_tokens)
    check_export_generation(meta, GenerationConfig(max_new_tokens=room - 4))
    with pytest.raises(GenerationError, match=r"visual \+ max_alt_tokens \+ prompt_end"):
        check_export_generation(meta, GenerationConfig(max_new_tokens=room))
    older = tmp_path / "older"  # written before prompt_end existed
    shutil.copytree(export, older)
    meta = read_export_config(older)
    del meta["layout"]["prompt_end"]
    (older / CONFIG_FILE).write_text(json.dumps(meta))
    assert Recaptioner.from_pretrained(older, device="cpu").prompt_ids("zorbit K-12") == alt


def one_image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "a.png")
    return folder


def damaged_copy(export, tmp_path, name: str):
    """A copy of the export whose file `name` lost its second half (a download or a copy cut short)."""
    target = tmp_path / "damaged"
    shutil.copytree(export, target)
    data = (target / name).read_bytes()
    (target / name).write_bytes(data[: len(data) // 2])
    return target


@pytest.mark.parametrize("name", [WEIGHTS_FILE, "encoder/open_clip_model.safetensors"])
def test_a_truncated_export_file_is_one_line_naming_it(export, tmp_path, capsys, name):
    damaged = damaged_copy(export, tmp_path, name)
    with pytest.raises(ExportError, match="damaged or truncated") as err:
        load_export(damaged)
    assert str(damaged / name) in str(err.value) and "\n" not in str(err.value)
    from altogether.cli import main as cli_main

    args = [str(one_image_folder(tmp_path)), str(tmp_path / "out"), "accelerator=cpu", "progress_bar=false"]
    assert cli_main(["recaption", str(damaged), *args]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and str(damaged / name) in line and "\n" not in line


def test_a_top_level_entry_from_a_newer_version_is_refused_by_name(export, tiny_parts, model_cfg, tmp_path):
    """Top-level entries are refused as model.* and layout.* ones are: an older loader cannot tell metadata from a
    setting that changes what the model computes. The ones this version writes still load and save."""
    from altogether import Recaptioner

    newer = tmp_path / "newer"
    shutil.copytree(export, newer)
    meta = json.loads((newer / CONFIG_FILE).read_text())
    (newer / CONFIG_FILE).write_text(json.dumps({**meta, "vision_tiling": {"tiles": 4}, "training": {"steps": 3}}))
    with pytest.raises(ExportError) as err:
        Recaptioner.from_pretrained(newer, device="cpu")
    message = str(err.value)
    assert message.startswith(f"{newer / CONFIG_FILE}: settings this altogether does not know: vision_tiling (")
    assert "newer" in message and "training" not in message and "\n" not in message
    again = Recaptioner.from_pretrained(export, device="cpu").save_pretrained(tmp_path / "again")
    assert read_export_config(again)["training"] == {"steps": 3}
    model, tokenizer, _ = tiny_parts
    with pytest.raises(ValueError, match="vision_tiling"):  # nor is one written that this version cannot read
        save_export(tmp_path / "never", model, tokenizer, model_cfg=model_cfg, layout=LayoutConfig(),
                    generation=GenerationConfig(), extra={"vision_tiling": 1})
    assert not (tmp_path / "never").exists()


def test_an_export_from_a_newer_version_names_the_keys_it_adds(export, tmp_path, capsys):
    newer = tmp_path / "newer"
    shutil.copytree(export, newer)
    meta = json.loads((newer / "altogether.json").read_text())
    meta["model"]["decoder"]["rope_scaling_v9"] = {"factor": 2}
    meta["layout"]["image_grid"] = 4
    (newer / "altogether.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError) as err:
        load_export(newer)
    message = str(err.value)
    assert "model.decoder.rope_scaling_v9, layout.image_grid" in message and "newer" in message
    assert "\n" not in message
    from altogether.cli import main as cli_main

    args = [str(one_image_folder(tmp_path)), str(tmp_path / "out"), "accelerator=cpu", "progress_bar=false"]
    assert cli_main(["recaption", str(newer), *args]) == 2
    assert "model.decoder.rope_scaling_v9" in capsys.readouterr().err
