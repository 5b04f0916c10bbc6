"""Shared fixtures: tiny models built from configs (random weights) and data the tests generate, and the
Hub-shaped world (:func:`altogether.tiny.write_hub_world`) every loading path and the journey run on."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network: loaders fail at once offline
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch

from altogether.config import load_recipe
from altogether.model import AltogetherModel, load_tokenizer
from altogether.tiny import (COLOURS, SHAPES, HubWorld, tiny_model_overrides, write_hub_world, write_tiny_clip,
                             write_tokenizer)
from altogether.tiny import draw_shape as draw  # tests import it from here

WORDS = [f"a {c} {s} on a white background" for c in COLOURS for s in SHAPES] + [
    "photo of the product zorbit K-12 for sale", "IMG_2231.jpg shop price 12.99 cheap", "a photo of",
]


@pytest.fixture(scope="session")
def hub_world(tmp_path_factory) -> HubWorld:
    """Hub-shaped folders and corpora, made once per session: an OPT-1.3B-shaped decoder folder, an open_clip Hub
    repo of a shrunk ViT-H-14-quickgelu, MetaCLIP-layout shards and Altogether-FT train/eval JSON files."""
    return write_hub_world(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(open_clip local-dir encoder, tokenizer folder), made once per session."""
    root = tmp_path_factory.mktemp("tiny")
    encoder = write_tiny_clip(root / "encoder", seed=0)
    tokenizer = write_tokenizer(root / "tokenizer", WORDS * 5, vocab_size=400)
    return encoder, tokenizer


@pytest.fixture
def make_recipe(tiny_dirs, tmp_path):
    """``make_recipe(name, overrides=None)``: a shipped recipe with the tiny model and a tmp output_dir."""

    def make(name: str = "finetune_round3", overrides: dict | None = None):
        base = tiny_model_overrides(*tiny_dirs)
        base.update({"output_dir": str(tmp_path / "run"), "init_from": None})
        from omegaconf import OmegaConf

        merged = OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(_nest(overrides or {})))
        return load_recipe(name, OmegaConf.to_container(merged))

    return make


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


@pytest.fixture(scope="session")
def tiny_model_cfg(tiny_dirs):
    """The tiny captioner's ModelConfig: 4 visual tokens, a 1-layer mapper, a 2-layer OPT."""
    from altogether.config import DecoderConfig, EncoderConfig, MapperConfig, ModelConfig
    from altogether.tiny import tiny_opt_config

    encoder, tok = tiny_dirs
    return ModelConfig(
        encoder=EncoderConfig(name=f"local-dir:{encoder}", pretrained=None),
        mapper=MapperConfig(num_visual_tokens=4, num_layers=1, num_heads=2),
        decoder=DecoderConfig(config=tiny_opt_config(), tokenizer=str(tok)),
    )


@pytest.fixture(scope="session")
def tiny_parts(tiny_model_cfg):
    """(model, tokenizer, transform) of the tiny captioner, seeded."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_cfg.decoder)
    model, transform = AltogetherModel.from_config(tiny_model_cfg, tokenizer)
    return model.eval(), tokenizer, transform


def save_tiny_export(directory: Path, parts, model_cfg, **generation) -> Path:
    """Export the tiny captioner (untrained weights) with the given generation defaults."""
    from altogether.config import LayoutConfig
    from altogether.generation import GenerationConfig
    from altogether.export import save_export

    model, tokenizer, _ = parts
    return save_export(directory, model, tokenizer, model_cfg=model_cfg, layout=LayoutConfig(),
                       generation=GenerationConfig(**generation))


def write_drawn_jsonl(path: Path, images: str, count: int, fields) -> Path:
    """A JSONL training file at ``path`` of ``count`` drawn images saved in ``path.parent / images``; row ``i``
    holds ``key`` ``r000``..., its relative ``img_path`` and ``fields(i, colour, shape)``."""
    (path.parent / images).mkdir()
    rows = []
    for i in range(count):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        draw(colour, shape, seed=i).save(path.parent / images / f"{i:03d}.png")
        rows.append({"key": f"r{i:03d}", "img_path": f"{images}/{i:03d}.png", **fields(i, colour, shape)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def jsonl_data(tmp_path) -> Path:
    """A JSONL training file of 24 drawn images with alt-texts and round3 captions (paths relative)."""
    return write_drawn_jsonl(tmp_path / "train.jsonl", "images", 24, lambda i, colour, shape: {
        "alt": [f"zorbit K-{i} for sale", "IMG_2231.jpg"] if i % 3 == 0 else f"zorbit K-{i} for sale",
        "round3": f"a photo of zorbit K-{i}: a {colour} {shape} on a white background"})


@pytest.fixture(scope="session")
def opt_folder(hub_world) -> Path:
    """A decoder folder shaped like ``facebook/opt-1.3b`` (fp16, dropout 0.1, 50272 rows > the tokenizer)."""
    return hub_world.decoder


def files(folder: Path) -> list[str]:
    """Every file under ``folder``, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def uploads(monkeypatch):
    """Intercept HfApi: each upload is recorded with its arguments, file list and file contents."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append({"call": "create_repo", "repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        root = Path(folder_path)
        calls.append({"call": "upload_folder", "repo_id": repo_id, "files": files(root), **kwargs,
                      "contents": {f: (root / f).read_bytes() for f in files(root)}})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def serve_from_hub_cache(upload: dict, cache: Path, monkeypatch) -> None:
    """Lay an intercepted upload out in a Hugging Face cache at ``cache``, as a download would leave it, and
    point the Hub client there: ``from_pretrained(repo_id)`` then reads it offline."""
    repo = cache / ("models--" + upload["repo_id"].replace("/", "--"))
    snapshot = repo / "snapshots" / ("1" * 40)
    for name, data in upload["contents"].items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("1" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def hub_rows(decoder_folder: Path) -> int:
    """Embedding rows a Hub decoder folder declares (``vocab_size`` of its ``config.json``)."""
    return json.loads((Path(decoder_folder) / "config.json").read_text())["vocab_size"]
