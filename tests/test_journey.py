"""The path a user takes, on a world shaped like what they download (:func:`altogether.tiny.write_hub_world`):
an OPT-1.3B-shaped decoder folder (float16 weights, dropout 0.1, 512 embedding rows for a 505-token tokenizer),
an open_clip Hub repo, MetaCLIP-layout shards and Altogether-FT JSON files. Only sizes are shrunk; every step
is a command or call a user makes, with the shipped recipes and overrides that only shrink steps and batches.

pretrain on the shards -> export -> finetune_round3 from it on the FT JSON -> Recaptioner.from_pretrained ->
recaption command on the shards -> evaluate command on the FT eval JSON -> hub push (network intercepted) ->
load from the Hub id. Each export loads strictly and captions.
"""

import csv
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from altogether import Recaptioner, evaluate, hub, recaption, train
from altogether.cli import run_cli
from altogether.config import EncoderConfig
from altogether.data.images import load_image
from altogether.model import ImageEncoder
from altogether.tiny import OPT_1_3B_CONFIG, TINY_OPT_SHAPE, TINY_OPT_TOKENIZER_SIZE

from .conftest import files, serve_from_hub_cache

REPO = "someone/altogether-opt-tiny"
STEPS = 3
# Shrink the run, nothing else: the recipes' model, layout, optimizer and generation settings stay as shipped.
SMALL_RUN = [f"optim.max_steps={STEPS}", "optim.warmup_steps=1", "optim.global_batch_size=8",
             "data.micro_batch_size=4", "data.num_workers=0", "trainer.progress_bar=false",
             "trainer.log_every_n_steps=1"]
GREEDY = {"do_sample": False, "max_new_tokens": 12}


def cli(main, *argv, capsys) -> str:
    """Run a command as its console script does; a non-zero exit fails with the command's own error line."""
    args = [str(a) for a in argv]
    code = run_cli(main, args)
    out, err = capsys.readouterr()
    assert code == 0, f"{main.__module__} {' '.join(args)} exited {code}:\n{err[-3000:]}"
    return out


def train_losses(run: Path) -> list[float]:
    with (run / "logs" / "version_0" / "metrics.csv").open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def tensor_dtypes(path: Path) -> dict[str, str]:
    """``{name: safetensors dtype}`` of a weights file, read from its header."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def check_trained_export(run: Path, world) -> Recaptioner:
    """A run trained every step on readable samples, kept fp32 master weights, and its export loads strictly
    with the decoder folder's own vocabulary and captions."""
    export = run / "export"
    meta = json.loads((export / "altogether.json").read_text())
    assert meta["training"]["steps"] == STEPS, meta["training"]
    assert meta["training"]["skipped"] == 0, f"samples skipped as unreadable: {meta['training']}"
    losses = train_losses(run)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    # The checkpoint is float16; what trained (and what the export stores) are the fp32 master weights.
    assert set(tensor_dtypes(export / "model.safetensors").values()) == {"F32"}

    captioner = Recaptioner.from_pretrained(export)  # strict: every tensor must match the rebuilt model
    decoder = captioner.model.decoder
    assert decoder.get_input_embeddings().weight.shape[0] == TINY_OPT_SHAPE["vocab_size"]  # 512, as the folder
    assert len(captioner.tokenizer) == TINY_OPT_TOKENIZER_SIZE  # 505 < 512, as 50265 < 50272
    assert captioner.dtype == (torch.float32 if captioner.device.type == "cpu" else torch.bfloat16)
    images = world.ft_eval_images[:3]
    captions = captioner.recaption([w.image() for w in images], [w.alt for w in images], **GREEDY)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    return captioner


def test_hub_world_loads_like_the_real_files(hub_world):
    from transformers import AutoConfig, AutoTokenizer

    config = json.loads((hub_world.decoder / "config.json").read_text())
    assert {k: v for k, v in config.items() if k not in TINY_OPT_SHAPE} == {
        k: v for k, v in OPT_1_3B_CONFIG.items() if k not in TINY_OPT_SHAPE}
    assert AutoConfig.from_pretrained(hub_world.decoder).dtype == torch.float16
    assert set(tensor_dtypes(hub_world.decoder / "model.safetensors").values()) == {"F16"}
    tokenizer = AutoTokenizer.from_pretrained(hub_world.decoder)  # from vocab.json + merges.txt, as OPT's
    assert type(tokenizer).__name__ == "GPT2Tokenizer" and len(tokenizer) == TINY_OPT_TOKENIZER_SIZE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2, 2)
    assert tokenizer.unk_token == "</s>" and tokenizer.convert_tokens_to_ids("<unk>") == 3
    assert tokenizer("a photo")["input_ids"][0] == 2  # OPT prepends </s>; the layout tokenizes without it
    assert sorted(p.name for p in hub_world.encoder.iterdir()) == [
        "open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


def test_encoder_from_a_checkpoint_file_equals_its_hub_folder(hub_world):
    """The two ways users give an open_clip encoder offline load the same weights and transform."""
    folder, folder_transform = ImageEncoder.from_config(EncoderConfig(name=f"local-dir:{hub_world.encoder}",
                                                                      pretrained=None))
    checkpoint, checkpoint_transform = ImageEncoder.from_config(
        EncoderConfig(name=hub_world.encoder_arch, pretrained=str(hub_world.encoder_checkpoint)))
    image = load_image(hub_world.ft_eval_images[0].image())
    pixels = folder_transform(image)[None]
    assert pixels.shape == (1, 3, 224, 224)
    assert torch.equal(checkpoint_transform(image)[None], pixels)
    embeds = folder(pixels)
    assert embeds.shape == (1, 1024) and torch.allclose(embeds.norm(dim=-1), torch.ones(1))
    assert torch.equal(checkpoint(pixels), embeds)


def test_journey_pretrain_finetune_recaption_evaluate_push(hub_world, tmp_path, capsys, monkeypatch, uploads):
    w = hub_world
    monkeypatch.setenv("PATH", str(tmp_path / "no-java"))  # METEOR (Java) is skipped: it is slow, not the point

    # 1. Pretrain on MetaCLIP shards, the decoder and encoder given as the folders a download leaves.
    pretrain = tmp_path / "runs" / "pretrain"
    cli(train.main, "recipe=pretrain", *w.model_overrides(), f"data.train={w.shard_pattern}",
        "data.shuffle_buffer=8", f"output_dir={pretrain}", *SMALL_RUN, capsys=capsys)
    check_trained_export(pretrain, w)

    # 2. Fine-tune round 3 from that export on the Altogether-FT JSON (the model comes with init_from).
    finetune = tmp_path / "runs" / "finetune_round3"
    cli(train.main, "recipe=finetune_round3", f"init_from={pretrain / 'export'}", f"data.train={w.ft_train}",
        f"data.image_root={w.ft_images}", f"output_dir={finetune}", *SMALL_RUN, capsys=capsys)
    captioner = check_trained_export(finetune, w)
    assert captioner.meta["recipe"]["init_from"] == str(pretrain / "export")

    # 3. Recaption the shards with the command; each caption is the notebook API's for that image.
    out = tmp_path / "recaptions"
    cli(recaption.main, finetune / "export", w.shard_pattern, out, "output_format=jsonl", "num_workers=0",
        "progress_bar=false", "do_sample=false", f"max_new_tokens={GREEDY['max_new_tokens']}", capsys=capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == {"captioned": len(w.pretrain_images), "bad": 0, "failed_downloads": 0, "bad_not_listed": 0}
    rows = {}
    for shard in w.shards:
        lines = (out / f"{shard.stem}.recaption.jsonl").read_text().splitlines()
        rows.update((r["key"], r) for r in map(json.loads, lines))
    by_uuid = {image.uuid: image for image in w.pretrain_images}
    assert set(rows) == set(by_uuid)
    # Every source of the MetaCLIP texts is an alt-text by default, in the JSON's order.
    first = w.pretrain_images[1]  # has an alt and a title
    assert rows[first.uuid]["alt_text"] == f"{first.alt}; {first.title}"
    sample = w.pretrain_images[:4]
    expected = captioner.recaption([i.image() for i in sample], [[t for _, t in i.texts] for i in sample], **GREEDY)
    assert [rows[i.uuid]["caption"] for i in sample] == expected

    # 4. Evaluate on the held-out FT file, into the run directory (the model card shows it).
    cli(evaluate.main, finetune / "export", w.ft_eval, f"image_root={w.ft_images}", f"output_dir={finetune}",
        "progress=false", f"max_new_tokens={GREEDY['max_new_tokens']}", "num_examples=2", capsys=capsys)
    metrics = json.loads((finetune / "metrics.json").read_text())
    assert metrics["data"]["read"] == len(w.ft_eval_images) and metrics["data"]["skipped"] == 0
    assert {"w/ alt", "w/o alt"} <= set(metrics["metrics"])
    with_alt = metrics["metrics"]["w/ alt"]
    assert math.isfinite(with_alt["CIDEr"]) and math.isfinite(with_alt["BLEU-1"])

    # 5. Push the run to the Hub (intercepted), then load it by its Hub id from the cache a download leaves.
    cli(hub.main, "push", finetune, REPO, capsys=capsys)
    upload = uploads[-1]
    assert {"altogether.json", "model.safetensors", "README.md", "metrics.json"} <= set(upload["files"])
    assert any(f.startswith("encoder/") for f in upload["files"])  # a local encoder folder travels with it
    assert upload["contents"]["metrics.json"] == (finetune / "metrics.json").read_bytes()
    card = upload["contents"]["README.md"].decode()
    # The card shows evaluate's own table: its header, and each condition's row with the values printed.
    assert f"From `metrics.json`: `{w.ft_eval}`, {len(w.ft_eval_images)} records, greedy captions." in card
    table = [[c.strip() for c in line.strip("|").split("|")] for line in card.splitlines()
             if line.startswith(("| condition |", "| w/ alt |", "| alt-text |"))]
    header, row = table[0], dict(zip(table[0], table[1]))
    assert header[:3] == ["condition", "CLIPScore", "BLEU-1"] and table[2][0] == "alt-text"  # baselines kept
    assert row["condition"] == "w/ alt" and row["BLEU-1"] == f"{with_alt['BLEU-1']:.2f}"
    assert row["CIDEr"] == f"{with_alt['CIDEr']:.2f}" and "seconds" not in card  # run bookkeeping left out
    serve_from_hub_cache(upload, tmp_path / "hf-cache", monkeypatch)
    downloaded = Recaptioner.from_pretrained(REPO)
    images = [i.image() for i in w.ft_eval_images]
    alts = [i.alt for i in w.ft_eval_images]
    assert downloaded.recaption(images, alts, **GREEDY) == captioner.recaption(images, alts, **GREEDY)
    assert files(tmp_path / "hf-cache") and downloaded.meta["training"]["steps"] == STEPS
