"""A tiny open_clip CLIP trained on the demo world, to serve as the captioner's frozen image encoder.

A randomly initialised encoder cannot tell colours or shapes apart, so the demo first trains a small
CLIP (open_clip's own model and `ClipLoss`) on the world's images and their visual descriptions, and
saves it in open_clip's `local-dir:` format, which `open_clip.create_model_and_transforms` loads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from altogether.demo.world import (
    COLOURS,
    RELATIONS,
    SHAPES,
    Scene,
    describe,
    random_objects,
    scene_from_objects,
    visual_description,
)
from altogether.io import replacing_dir

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# Mean/std of the world's pixels are close to mid-grey; 0.5 keeps inputs roughly centred.
_PROBE_KEYS = ("single_colour", "single_shape", "pair_colour", "pair_shape", "pair_relation")
_MEAN = (0.5, 0.5, 0.5)
_STD = (0.25, 0.25, 0.25)


def demo_clip_config(
    *,
    tower: str = "resnet",
    image_size: int = 64,
    width: int | None = None,
    depth: int | None = None,
    patch_size: int = 8,
    embed_dim: int = 128,
    text_width: int = 128,
    text_layers: int = 3,
    context_length: int = 12,  # the world's longest description is 10 tokens with its start and end marks
) -> dict:
    """The `open_clip_config.json` content (`model_cfg` + `preprocess_cfg`) of a tiny CLIP.

    `tower` "resnet" (default) is open_clip's ModifiedResNet with `depth` blocks per stage (default 1) and
    base `width` (default 16); "vit" is a ViT with `depth` layers (default 4), `width` (default 128) and
    `patch_size`. On the demo's CPU budget the ResNet learns colours, shapes and relations, the ViT
    only colours (its shape and relation probes stay far lower after the same time).
    """
    if tower == "resnet":
        vision_cfg: dict = {"layers": [depth or 1] * 4, "width": width or 16}
        if image_size % 32:
            raise ValueError(f"image_size ({image_size}) must be a multiple of 32 for the ResNet tower")
    elif tower == "vit":
        vision_cfg = {"layers": depth or 4, "width": width or 128, "patch_size": patch_size, "mlp_ratio": 4.0}
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    else:
        raise ValueError(f"tower must be 'resnet' or 'vit', got {tower!r}")
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "head_width": 32, **vision_cfg},
            "text_cfg": {
                "context_length": context_length,
                "vocab_size": 49408,  # open_clip's default BPE tokenizer
                "width": text_width,
                "heads": max(1, text_width // 32),
                "layers": text_layers,
            },
        },
        "preprocess_cfg": {
            "size": image_size,
            "mode": "RGB",
            "mean": list(_MEAN),
            "std": list(_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            "fill_color": 0,
        },
    }


def _pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) pixels; kept as bytes so a large training pool stays small in memory."""
    bad = [i for i, im in enumerate(images) if im.size != (size, size) or im.mode != "RGB"]
    if bad:
        raise ValueError(f"images {bad[:5]} are not {size}x{size} RGB (the CLIP's input size)")
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def _normalise(pixels: torch.Tensor, config: dict) -> torch.Tensor:
    pre = config["preprocess_cfg"]
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def images_to_tensor(images: Sequence[Image.Image], config: dict) -> torch.Tensor:
    """Normalise already-sized RGB images exactly as the saved model's open_clip preprocess does."""
    return _normalise(_pixels(images, config["preprocess_cfg"]["size"]), config)


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _siblings(rng: random.Random, objects: list[tuple[str, str]], relation: str) -> list[tuple[list, str]]:
    """Hard negatives for a two-object scene: another relation, the roles swapped, one attribute changed.

    Seen in the same batch, they force the image embedding to encode every fact, not just the colours.
    """
    first, second = objects
    other_relation = rng.choice([r for r in RELATIONS if r != relation])
    i = rng.randrange(2)
    changed = list(objects)
    while changed[i] == objects[i] or changed[0] == changed[1]:
        colour, shape = objects[i]
        changed[i] = (rng.choice(COLOURS), shape) if rng.random() < 0.5 else (colour, rng.choice(SHAPES))
    return [(objects, other_relation), ([second, first], relation), (changed, relation)]


def _training_pool(num_scenes: int, seed: int, image_size: int) -> tuple[list[Scene], list[list[int]]]:
    """`num_scenes` train-split scenes grouped into families (a two-object scene and its siblings)."""
    rng = random.Random(f"altogether-demo-clip:{seed}")
    scenes: list[Scene] = []
    families: list[list[int]] = []
    while len(scenes) < num_scenes:
        objects, relation = random_objects(rng)
        members = [(objects, relation)] + ([] if relation is None else _siblings(rng, objects, relation))
        members = members[: num_scenes - len(scenes)]
        families.append(list(range(len(scenes), len(scenes) + len(members))))
        scenes.extend(scene_from_objects(rng, o, r, image_size=image_size) for o, r in members)
    return scenes, families


def _family_batch(
    texts: Sequence[str], families: Sequence[Sequence[int]], batch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of `batch_size` samples with distinct texts (duplicates would be false negatives), taken
    family by family so hard negatives share the batch; `texts` must hold >= `batch_size` distinct ones."""
    chosen: dict[str, int] = {}
    while len(chosen) < batch_size:
        for i in families[rng.integers(len(families))]:
            if len(chosen) < batch_size:
                chosen.setdefault(texts[i], i)
    return np.fromiter(chosen.values(), dtype=np.int64)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def _save_atomically(model: torch.nn.Module, config: dict, out_dir: Path) -> None:
    with replacing_dir(out_dir) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME))


def train_demo_clip(
    out_dir: str | os.PathLike,
    *,
    num_scenes: int = 12000,
    steps: int = 500,
    batch_size: int = 128,
    seed: int = 0,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 20,
    config: dict | None = None,
    num_threads: int | None = None,
    log_every: int = 50,
) -> Path:
    """Train a tiny CLIP on `num_scenes` train-split scenes and save it as an open_clip `local-dir:` folder.

    Batches hold distinct descriptions, drawn family by family (a two-object scene with its hard
    negatives), and the loss is open_clip's `ClipLoss`. `config` defaults to `demo_clip_config()`;
    `num_threads` defaults to the CPUs this process may use. The caller's torch thread count and RNG
    state are left as they were. Returns `out_dir`, written atomically (replacing an older folder).
    """
    counts = {"num_scenes": num_scenes, "steps": steps, "batch_size": batch_size, "log_every": log_every}
    for label, value in counts.items():
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    config = config or demo_clip_config()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads or _available_cpus())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _train(config, num_scenes, steps, batch_size, seed, lr, weight_decay, warmup_steps, log_every)
    finally:
        torch.set_num_threads(previous_threads)
    _save_atomically(model, config, Path(out_dir))
    log.info("demo CLIP saved to %s", out_dir)
    return Path(out_dir)


def _train(
    config: dict,
    num_scenes: int,
    steps: int,
    batch_size: int,
    seed: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    log_every: int,
) -> torch.nn.Module:
    start = time.perf_counter()
    size = config["preprocess_cfg"]["size"]
    scenes, families = _training_pool(num_scenes, seed, size)
    texts = [visual_description(s) for s in scenes]
    if len(set(texts)) < batch_size:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {len(set(texts))} distinct descriptions of {num_scenes} scenes"
        )
    pixels = _pixels([s.image for s in scenes], size)
    tokenizer = open_clip.SimpleTokenizer(context_length=config["model_cfg"]["text_cfg"]["context_length"])
    longest = max(set(texts), key=lambda text: len(tokenizer.encode(text)))
    if len(tokenizer.encode(longest)) + 2 > tokenizer.context_length:  # + start and end marks
        raise ValueError(f"context_length {tokenizer.context_length} cuts descriptions short: {longest!r} needs "
                         f"{len(tokenizer.encode(longest)) + 2} tokens")
    tokens = tokenizer(texts)
    model = open_clip.CLIP(**config["model_cfg"], output_dict=True)
    model.train()
    # The descriptions use a few dozen of the tokenizer's 49408 tokens, so the token embedding (6.3M of the 8.3M
    # weights) stays as initialised, random codes the text transformer learns to read, instead of costing a
    # dense gradient and an AdamW update per step (a fifth of a step, measured: docs/demo.md).
    model.token_embedding.requires_grad_(False)
    # oneDNN's convolutions run faster on channels-last images (the image tower's forward took a third less).
    model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for p in model.parameters() if p.ndim < 2 and p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    loss_fn = open_clip.ClipLoss()
    rng = np.random.default_rng(seed)
    log.info("demo CLIP: %d scenes ready in %.1fs; training %d steps", num_scenes, time.perf_counter() - start, steps)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup_steps)
        idx = torch.from_numpy(_family_batch(texts, families, batch_size, rng))
        out = model(_normalise(pixels[idx], config).contiguous(memory_format=torch.channels_last), tokens[idx])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's trainer does
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            log.info("demo CLIP step %d/%d loss %.4f (%.0fs)", step + 1, steps, loss.item(), elapsed)
    return model.to(memory_format=torch.contiguous_format).eval()


def load_demo_clip(path: str | os.PathLike) -> tuple[torch.nn.Module, object, object]:
    """(model in eval mode, image preprocess, tokenizer) of a CLIP saved by `train_demo_clip`."""
    name = "local-dir:" + str(path)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def attribute_probes(scene: Scene) -> dict[str, tuple[list[str], int]]:
    """For each probed attribute: descriptions varying only that attribute, and the true one's index."""
    objects, relation = scene.objects, scene.relation
    probes: dict[str, tuple[list[str], int]] = {}
    for i, (colour, shape) in enumerate(objects):
        colours = [describe(objects[:i] + [(c, shape)] + objects[i + 1 :], relation) for c in COLOURS]
        shapes = [describe(objects[:i] + [(colour, s)] + objects[i + 1 :], relation) for s in SHAPES]
        probes[f"colour{i}"] = (colours, COLOURS.index(colour))
        probes[f"shape{i}"] = (shapes, SHAPES.index(shape))
    if relation is not None:
        probes["relation"] = ([describe(objects, r) for r in RELATIONS], RELATIONS.index(relation))
    return probes


def _batched(encode, items: Sequence, batch_size: int) -> torch.Tensor:
    """L2-normalised embeddings of `items`, encoded `batch_size` at a time."""
    chunks = [encode(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1) if chunks else torch.empty(0)


@torch.no_grad()
def evaluate_demo_clip(path: str | os.PathLike, scenes: Sequence[Scene], batch_size: int = 256) -> dict:
    """Zero-shot probes of the saved CLIP on `scenes`.

    For each object's colour (shape), the image embedding must score its true description higher than the
    five (two) descriptions that change only that colour (shape); for two-object scenes likewise among the
    four relations. Returns accuracies `single_colour`, `single_shape` (one-object scenes), `pair_colour`,
    `pair_shape` (both objects of two-object scenes), `pair_relation`, plus counts `n_single`, `n_pair`;
    an accuracy with no scenes is None.
    """
    model, preprocess, tokenizer = load_demo_clip(path)
    probes = [attribute_probes(s) for s in scenes]
    texts = sorted({t for p in probes for options, _ in p.values() for t in options})
    row = {t: i for i, t in enumerate(texts)}
    image_emb = _batched(
        lambda chunk: model.encode_image(torch.stack([preprocess(s.image) for s in chunk])), scenes, batch_size
    )
    text_emb = _batched(lambda chunk: model.encode_text(tokenizer(chunk)), texts, batch_size)
    hits: dict[str, list[bool]] = {k: [] for k in _PROBE_KEYS}
    for emb, scene, probe in zip(image_emb, scenes, probes):
        kind = "single" if scene.relation is None else "pair"
        for attribute, (options, truth) in probe.items():
            scores = text_emb[[row[t] for t in options]] @ emb
            hits[f"{kind}_{attribute.rstrip('01')}"].append(int(scores.argmax()) == truth)
    result: dict = {k: (sum(v) / len(v) if v else None) for k, v in hits.items()}
    result["n_single"] = sum(len(s.objects) == 1 for s in scenes)
    result["n_pair"] = len(scenes) - result["n_single"]
    return result
