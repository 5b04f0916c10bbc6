"""LoRA decoders: what a train step touches, merged == unmerged, adapter exports (stored or referenced base)."""

import copy
import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from altogether import Recaptioner
from altogether.config import (
    DecoderConfig, EncoderConfig, LayoutConfig, LoraSettings, MapperConfig, ModelConfig,
)
from altogether.export import ADAPTER_DIR, ADAPTER_WEIGHTS, WEIGHTS_FILE, ExportError, load_export, merge_adapter, save_export
from altogether.generation import GenerationConfig
from altogether.layout import collate, tokenize_sample
from altogether.model import AltogetherModel, WeightsUnavailableError, load_tokenizer
from altogether.tiny import tiny_opt_config
from altogether.training import build_model, fit, parameter_groups, set_decoder_trainable

LORA = LoraSettings(rank=4, alpha=8, dropout=0.0)
HUB_ID = "org/tiny-opt"


def model_cfg(tiny_dirs, **decoder):
    encoder, tokenizer = tiny_dirs
    return ModelConfig(encoder=EncoderConfig(name=f"local-dir:{encoder}", pretrained=None),
                       mapper=MapperConfig(num_visual_tokens=4, num_layers=1, num_heads=2),
                       decoder=DecoderConfig(tokenizer=str(tokenizer), trainable="lora",
                                             **(decoder or {"config": tiny_opt_config()})))


def lora_model(cfg):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.decoder)
    model, _ = AltogetherModel.from_config(cfg, tokenizer)
    return set_decoder_trainable(model, "lora", LORA), tokenizer


def make_batch(tokenizer):
    samples = [tokenize_sample(tokenizer, p, c, max_alt_tokens=16, max_caption_tokens=16)
               for p, c in [("zorbit K-12 for sale", "a red square on a white background"), ("", "a blue circle")]]
    batch = collate(samples, num_visual_tokens=4, pad_id=tokenizer.pad_token_id)
    batch["image_embeds"] = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    return batch


def train_steps(model, batch, steps=2):
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tiny_dirs):
    """A LoRA model after two optimizer steps (its adapter is non-zero), and a batch."""
    model, tokenizer = lora_model(model_cfg(tiny_dirs))
    batch = make_batch(tokenizer)
    return train_steps(model, batch), tokenizer, batch


def test_train_step_changes_only_adapter_and_mapper(tiny_dirs):
    model, tokenizer = lora_model(model_cfg(tiny_dirs))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("mapper.") for n in trainable)
    assert sum(".lora_A" in n for n in trainable) == 2 * len(LORA.target_modules)  # every target, both layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, make_batch(tokenizer))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trainable  # every trainable tensor moved, nothing else did (base decoder, encoder)


def test_merged_and_unmerged_give_equal_logits(trained):
    model, _, batch = trained
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B" in n)
    merged = copy.deepcopy(model)
    merged.decoder = merge_adapter(merged.decoder)
    assert not hasattr(merged.decoder, "peft_config")
    with torch.no_grad():
        unmerged_logits, merged_logits = model.logits(batch), merged.logits(batch)
        with model.decoder.disable_adapter():
            base = model.logits(batch)
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, unmerged_logits, atol=1e-3)  # the adapter matters, so equality means something


def test_adapter_export_with_stored_base(trained, tiny_dirs, tmp_path):
    model, tokenizer, batch = trained
    out = save_export(tmp_path / "export", model, tokenizer, model_cfg=model_cfg(tiny_dirs), layout=LayoutConfig(),
                      generation=GenerationConfig())
    meta = json.loads((out / "altogether.json").read_text())
    # Built from a random config: there is no pretrained base to point at, so its weights are stored.
    assert meta["lora"] == {"adapter": ADAPTER_DIR, "base_decoder": None}
    assert {p.name for p in (out / ADAPTER_DIR).iterdir()} == {"adapter_config.json", ADAPTER_WEIGHTS}
    weights = load_file(str(out / WEIGHTS_FILE))
    assert "decoder.model.decoder.layers.0.self_attn.q_proj.weight" in weights
    assert not any("lora" in k or "base_layer" in k for k in weights)
    adapter = load_file(str(out / ADAPTER_DIR / ADAPTER_WEIGHTS))
    assert adapter and all(".lora_" in k for k in adapter)

    with torch.no_grad():
        expected = model.logits(batch)
        loaded, *_ = load_export(out)
        assert hasattr(loaded.decoder, "peft_config")
        assert torch.equal(loaded.logits(batch), expected)
        merged, *_ = load_export(out, merge_lora=True)
        assert not hasattr(merged.decoder, "peft_config")
        torch.testing.assert_close(merged.logits(batch), expected, rtol=1e-5, atol=1e-5)

    # A Recaptioner merged on load saves a plain (full-weight) export.
    captioner = Recaptioner.from_pretrained(out, merge_lora=True)
    resaved = captioner.save_pretrained(tmp_path / "merged")
    assert json.loads((resaved / "altogether.json").read_text())["lora"] is None
    assert not (resaved / ADAPTER_DIR).exists()
    plain = Recaptioner.from_pretrained(resaved)
    greedy = {"do_sample": False, "max_new_tokens": 6}
    from PIL import Image

    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    assert plain.recaption(images, ["zorbit", None], **greedy) == captioner.recaption(images, ["zorbit", None], **greedy)


def test_adapter_loading_is_strict(trained, tiny_dirs, tmp_path):
    model, tokenizer, _ = trained
    out = save_export(tmp_path / "export", model, tokenizer, model_cfg=model_cfg(tiny_dirs), layout=LayoutConfig(),
                      generation=GenerationConfig())
    path = out / ADAPTER_DIR / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(path))
    with pytest.raises(ExportError, match=dropped.split(".lora_")[0].replace(".", r"\.")):
        load_export(out)
    shutil.rmtree(out / ADAPTER_DIR)
    with pytest.raises(ExportError, match="adapter .* is missing"):
        load_export(out)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_dirs):
    """A local Hugging Face cache holding a tiny OPT under the Hub id ``org/tiny-opt`` (offline stand-in)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(3)
    config = tiny_opt_config()
    config.pop("model_type")
    config["vocab_size"] = len(load_tokenizer(DecoderConfig(tokenizer=str(tiny_dirs[1]))))
    repo = tmp_path / "hub" / "models--org--tiny-opt"
    snapshot = repo / "snapshots" / ("0" * 40)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("opt", **config)).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return snapshot


def test_adapter_export_references_a_pretrained_base(hub_cache, tiny_dirs, tmp_path, monkeypatch):
    cfg = model_cfg(tiny_dirs, name_or_path=HUB_ID)
    model, tokenizer = lora_model(cfg)
    batch = make_batch(tokenizer)
    train_steps(model, batch)
    out = save_export(tmp_path / "export", model, tokenizer, model_cfg=cfg, layout=LayoutConfig(),
                      generation=GenerationConfig())
    assert json.loads((out / "altogether.json").read_text())["lora"]["base_decoder"] == HUB_ID
    assert {k.split(".")[0] for k in load_file(str(out / WEIGHTS_FILE))} == {"mapper"}  # base not copied
    with torch.no_grad():
        expected = model.logits(batch)
        loaded, *_ = load_export(out)
        torch.testing.assert_close(loaded.logits(batch), expected, rtol=0, atol=0)
        local, *_ = load_export(out, base_decoder=str(hub_cache))  # e.g. a local copy when offline
        torch.testing.assert_close(local.logits(batch), expected, rtol=0, atol=0)
    resaved = save_export(tmp_path / "resaved", local, tokenizer, model_cfg=cfg, layout=LayoutConfig(),
                          generation=GenerationConfig())
    assert json.loads((resaved / "altogether.json").read_text())["lora"]["base_decoder"] == HUB_ID
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsUnavailableError, match=HUB_ID):
        load_export(out)


def test_lora_recipe_trains_exports_and_next_stage_merges(make_recipe, jsonl_data, tmp_path):
    cfg = make_recipe("finetune_round3", {
        "model.decoder.trainable": "lora", "model.decoder.lora.rank": 4, "model.decoder.lora.alpha": 8,
        "data.format": "jsonl", "data.train": str(jsonl_data), "data.micro_batch_size": 4, "data.num_workers": 0,
        "optim.global_batch_size": 4, "optim.max_steps": 2, "optim.warmup_steps": 0,
        "trainer.checkpoint_every_n_steps": 100, "trainer.sample_every_n_steps": 100, "trainer.progress_bar": False,
    })
    export = fit(cfg)
    assert (export / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file()
    assert json.loads((export / "adapter" / "adapter_config.json").read_text())["r"] == 4
    captioner = Recaptioner.from_pretrained(export)
    assert hasattr(captioner.model.decoder, "peft_config")
    assert len(captioner.recaption([jsonl_data.parent / "images" / "000.png"], max_new_tokens=4)) == 1
    # A later stage starting from this export trains on the merged weights, with a fresh adapter on top.
    next_cfg = make_recipe("finetune_round3", {"init_from": str(export), "model.decoder.trainable": "lora",
                                               "output_dir": str(tmp_path / "next")})
    model, _, _ = build_model(next_cfg)
    assert hasattr(model.decoder, "peft_config") and len(model.decoder.peft_config) == 1
    assert all(not p.abs().sum() for n, p in model.named_parameters() if ".lora_B" in n)  # fresh adapter
    full, _, _ = build_model(make_recipe("finetune_round3", {"init_from": str(export), "model.decoder.trainable": "full"}))
    assert not hasattr(full.decoder, "peft_config") and all(p.requires_grad for p in full.decoder.parameters())
