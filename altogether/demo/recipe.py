"""The ``demo`` recipe: the whole Altogether pipeline on the synthetic world, on a laptop CPU.

A plug-in (``pyproject.toml`` declares it; :mod:`altogether.plugins`): :data:`PIPELINE` runs ``recipes/demo.yaml``
(``pipeline: demo``), whose ``demo:`` block is :class:`DemoSettings`; :func:`named_eval_set` is the evaluation
set ``altogether evaluate MODEL demo`` reads. The library itself never refers to the demo.

Stages, each in its own folder of the run directory:

1. ``clip/``: a tiny CLIP trained contrastively on the world (open_clip's own loss), then frozen: the encoder.
2. ``tokenizer/``: a byte-level BPE tokenizer whose merges stay inside the world's own words, so any fact splits
   into single characters, the same in every context.
   ``embeddings/``: the frozen CLIP's embedding of every training and validation image, which both decoder
   stages train on.
3. ``pretrain/``: the captioner reproduces fresh alt-texts after the recipe's ``layout.prompt_end``
   (:func:`copy_records`), which teaches the decoder to copy any string, as the language pretraining of the
   full-size OPT-1.3B decoder did.
4. ``finetune/``: the captioner on target captions, alt-text as the prompt, with prompt dropout; half of the
   samples with fresh ids as facts (:func:`fresh_id_records`).
5. Evaluation with :func:`altogether.evaluate.evaluate` (its outputs in ``finetune/`` and ``novel_eval/``) on
   held-out scenes whose facts were never seen in training, one row per prompt condition, next to fact
   carry-over on scenes whose facts come from the novel generator (strings the training generator cannot
   write); the world's table in ``demo_eval.md`` / ``demo_eval.json``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import ConfigError, Pipeline, RecipeConfig, load_recipe, validate
from ..data.records import Record
from ..evaluate import EvalSet
from ..io import atomic_write_text
from .world import (SPLITS, VOCABULARY, Scene, caption_for, copy_alt_text, make_scenes, with_fresh_ids,
                    wrong_colour_alt)

log = logging.getLogger(__name__)

WRONG_COLOUR = "w/ wrong-colour alt"
CONDITIONS = ("w/ alt", "w/o alt", "w/ random alt", WRONG_COLOUR)
# The conditions whose prompt holds the scene's own facts: the only ones novel-generator scenes are captioned under.
FACT_CONDITIONS = ("w/ alt", WRONG_COLOUR)


@dataclass
class DemoSettings:
    """The synthetic world and the stages around the captioner's finetune (the ``demo:`` block of the recipe).

    Scene counts per split (``novel_scenes``: facts from the novel generator); the tiny CLIP's pool, steps and
    batch; the tokenizer's size; the pretrain (copy) stage's steps and warm-up (:func:`copy_records`). The finetune
    stage uses the recipe's own settings.
    """

    seed: int = 0
    image_size: int = 64
    train_scenes: int = 4000
    val_scenes: int = 64
    eval_scenes: int = 400
    novel_scenes: int = 400
    clip_scenes: int = 12000
    clip_steps: int = 500
    clip_batch_size: int = 128
    tokenizer_vocab: int = 1000
    pretrain_steps: int = 1000
    pretrain_warmup_steps: int = 50


@dataclass
class DemoRecipeConfig(RecipeConfig):
    """The demo recipe's schema: any recipe's keys plus its ``demo:`` block."""

    demo: DemoSettings = field(default_factory=DemoSettings)


@dataclass
class DemoEvalOptions:
    """Settings of the ``demo`` evaluation set (``demo.KEY=value``); unset ones come from ``recipes/demo.yaml``
    (the seed: the evaluation's own). ``split``: ``eval`` (held-out facts of the training generator) or ``novel``."""

    eval_scenes: Optional[int] = None
    seed: Optional[int] = None
    image_size: Optional[int] = None
    split: str = "eval"


def scene_records(scenes: Sequence[Scene], split: str) -> list[Record]:
    """Records of the world: the target states the scene's facts only when the alt-text holds them; the
    prompt-dropped target never does (nothing in the image could tell them)."""
    records = []
    for i, s in enumerate(scenes):
        told = all(fact in s.alt_text for fact in s.facts)
        records.append(Record(key=f"{split}-{i:05d}", image=s.image, alt_texts=[s.alt_text],
                              target=caption_for(s, with_facts=told),
                              target_without_alt=caption_for(s, with_facts=False)))
    return records


def fresh_id_records(scenes: Sequence[Scene], split: str, seed: int) -> list[Record]:
    """:func:`scene_records` of ``scenes`` with fresh ids of no fixed shape as their facts
    (:func:`~altogether.demo.world.with_fresh_ids`): the same images under the same keys, other alt-texts.

    Half of the finetune's samples are these: on the scenes' own facts alone, the captioner relearns their
    shapes and writes, say, two digits after a hyphen where a novel fact has three (docs/demo.md)."""
    rng = random.Random(f"{seed}:fresh:{split}")
    return scene_records([with_fresh_ids(s, rng) for s in scenes], split)


def copy_records(scenes: Sequence[Scene], split: str, count: int, seed: int) -> list[Record]:
    """``count`` copy samples: a scene's image (the scenes in turn) with a fresh alt-text (:func:`copy_alt_text`)
    as both prompt and target.

    A decoder trained from random weights has no mechanism to copy a string it has never seen; the full-size
    OPT-1.3B decoder brings one from its language pretraining. Reproducing the alt-text is the densest copy
    signal (every target token is a copy), so the demo's pretrain stage trains on these. The recipe's
    ``layout.prompt_end`` marks where the prompt ends and the copy begins (measured: without a mark, copying had not
    emerged after 1000 steps; with the caption's opening words as the mark it emerged later than with a mark of
    its own; docs/demo.md). Every sample's ids are new and of no fixed shape, so nothing but the prompt predicts
    them, and no alt-text names a colour its image lacks, so no target states what the image contradicts (with
    such targets the demo copied wrong colours in 5 to 9% of captions; docs/demo.md). Keys are the scene's own
    (:func:`scene_records`): the same image under the same key, so one embedding cache serves both stages.
    """
    rng = random.Random(f"{seed}:copy:{split}")
    records = []
    for i in range(count):
        index = i % len(scenes)
        alt_text = copy_alt_text(scenes[index], rng)
        records.append(Record(key=f"{split}-{index:05d}", image=scenes[index].image, alt_texts=[alt_text],
                              target=alt_text))
    return records


def demo_eval_set(scenes: Sequence[Scene], seed: int, *, name: str = "demo", info: dict[str, Any] | None = None
                  ) -> EvalSet:
    """Scenes as an evaluation set for :func:`altogether.evaluate.evaluate`: their records, the wrong-colour
    condition (the scene's facts with a colour its image does not show) and the world's own scorer."""
    from .score import format_table, score_captions

    split = scenes[0].split if scenes else "eval"
    records = scene_records(scenes, split)
    rng = random.Random(seed)
    return EvalSet(id=name, kind="demo world", records=records, read=len(records),
                   conditions={WRONG_COLOUR: [wrong_colour_alt(s, rng) for s in scenes]},
                   score=lambda captions, prompts: score_captions(scenes, captions, prompts),
                   score_table=format_table, info=info or {})


def named_eval_set(options: dict[str, Any], *, seed: int, limit: int | None = None) -> EvalSet:
    """The ``demo`` evaluation set plug-in: :class:`DemoEvalOptions` from ``options``, at most ``limit`` scenes."""
    try:
        opts: DemoEvalOptions = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DemoEvalOptions), options))
    except OmegaConfBaseException as err:
        raise ConfigError(f"key 'demo.{getattr(err, 'full_key', '')}': {str(err).splitlines()[0]} (demo keys: "
                          f"{', '.join(DemoEvalOptions.__dataclass_fields__)})") from None
    if opts.split not in SPLITS[2:]:
        raise ConfigError(f"key 'demo.split': {opts.split!r} is not one of {', '.join(SPLITS[2:])}")
    recipe = load_recipe("demo").demo
    n = recipe.eval_scenes if opts.eval_scenes is None else opts.eval_scenes
    n = n if limit is None else min(n, limit)
    size = opts.image_size or recipe.image_size
    scene_seed = seed if opts.seed is None else opts.seed
    scenes = make_scenes(n, scene_seed, opts.split, image_size=size)
    return demo_eval_set(scenes, seed, info={"split": opts.split, "scenes": n, "scene_seed": scene_seed,
                                             "image_size": size})


def run_demo(cfg: DemoRecipeConfig) -> dict[str, dict[str, float | None]]:
    """Run every stage of the demo recipe and return the world's table ``{condition: {metric: fraction}}``."""
    from ..evaluate import evaluate
    from ..tiny import write_tokenizer
    from ..training import fit
    from .clip import demo_clip_config, evaluate_demo_clip, train_demo_clip
    from .score import NOVEL_CARRY_OVER, format_table

    d = cfg.demo
    run = Path(cfg.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    clip_dir = run / "clip"
    train_demo_clip(clip_dir, num_scenes=d.clip_scenes, steps=d.clip_steps, batch_size=d.clip_batch_size, seed=d.seed,
                    config=demo_clip_config(image_size=d.image_size))
    scenes = {split: make_scenes(n, d.seed, split, image_size=d.image_size)
              for split, n in (("train", d.train_scenes), ("val", d.val_scenes), ("eval", d.eval_scenes),
                               ("novel", d.novel_scenes))}
    probe = evaluate_demo_clip(clip_dir, scenes["val"])
    log.info("stage clip: done in %.0fs; held-out probe %s", time.perf_counter() - started, _short(probe))

    texts = [t for s in scenes["train"] for t in (s.alt_text, s.caption, caption_for(s, with_facts=False))]
    tokenizer_dir = write_tokenizer(run / "tokenizer", texts, vocab_size=d.tokenizer_vocab, words=VOCABULARY)
    val = scene_records(scenes["val"], "val")
    # Every copy sample of the pretrain stage is seen once.
    copies = d.pretrain_steps * cfg.optim.global_batch_size
    train = scene_records(scenes["train"], "train")
    sources = {"pretrain": (copy_records(scenes["train"], "train", copies, d.seed),
                            copy_records(scenes["val"], "val", len(scenes["val"]), d.seed)),
               "finetune": (train + fresh_id_records(scenes["train"], "train", d.seed), val)}

    model = {"encoder": {"name": f"local-dir:{clip_dir.resolve()}", "pretrained": None},
             "decoder": {"tokenizer": str(tokenizer_dir.resolve())}}
    # Both decoder stages train on cached image embeddings: the encoder is frozen, so its output for an image
    # never changes, and computing it once replaces one encoder pass per sample and step.
    data = {"use_cache": True, "cache_dir": str(run / "embeddings")}
    stages = {
        "pretrain": {"model": model, "output_dir": str(run / "pretrain"), "init_from": None, "data": data,
                     "layout": {"prompt_dropout": 0.0},  # a copy sample without its prompt has nothing to copy
                     "optim": {"max_steps": d.pretrain_steps, "warmup_steps": d.pretrain_warmup_steps}},
        "finetune": {"model": model, "output_dir": str(run / "finetune"), "data": data,
                     "init_from": str(run / "pretrain" / "export")},
    }
    # Each stage is a plain recipe (what its export records): this one's keys without the demo's own.
    plain = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("demo", "pipeline")}
    _cache_embeddings(OmegaConf.merge(OmegaConf.structured(RecipeConfig), plain, {"model": model}).model.encoder,
                      [*train, *val], run / "embeddings")
    export = None
    for name, overrides in stages.items():
        stage_cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), plain, overrides,
                                    {"recipe": f"{cfg.recipe}/{name}"})
        validate(stage_cfg)
        t0 = time.perf_counter()
        export = fit(stage_cfg, sources=sources[name])
        log.info("stage %s: %d steps in %.0fs -> %s", name, stage_cfg.optim.max_steps, time.perf_counter() - t0, export)

    options = {"seed": d.seed, "progress": False, "batch_size": 64}
    held_out = evaluate(export, demo_eval_set(scenes["eval"], d.seed), output_dir=run / "finetune", **options)
    novel = evaluate(export, demo_eval_set(scenes["novel"], d.seed, name="demo-novel"), conditions=FACT_CONDITIONS,
                     output_dir=run / "novel_eval", **options)
    results = held_out.summary["set_scores"]
    for condition, row in results.items():
        row[NOVEL_CARRY_OVER] = novel.summary["set_scores"][condition]["fact_carry_over"] \
            if condition in FACT_CONDITIONS else None
    table = format_table(results)
    atomic_write_text(run / "demo_eval.json", json.dumps(results, indent=2))
    atomic_write_text(run / "demo_eval.md", _report(table, cfg, time.perf_counter() - started))
    print(table)
    log.info("demo finished in %.0fs; export: %s", time.perf_counter() - started, export)
    return results


def run(cfg: DemoRecipeConfig) -> int:
    """The pipeline's entry: run the demo; exit code 0."""
    run_demo(cfg)
    return 0


PIPELINE = Pipeline(schema=DemoRecipeConfig, run=run)


def _cache_embeddings(encoder_cfg, records: list[Record], directory: Path) -> None:
    """The frozen encoder's embedding of every record's image, written as the training cache at ``directory``."""
    from ..cache_embeddings import write_cache
    from ..config import to_container
    from ..model import ImageEncoder

    started = time.perf_counter()
    encoder, transform = ImageEncoder.from_config(encoder_cfg)
    meta = write_cache(directory, records, encoder, transform, encoder_spec=to_container(encoder_cfg),
                       source="demo world", batch_size=256)
    log.info("stage embeddings: %d images in %.0fs", meta["records"], time.perf_counter() - started)


def _short(probe: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in probe.items())


def _report(table: str, cfg, seconds: float) -> str:
    d = cfg.demo
    return (f"# Demo evaluation\n\nHeld-out scenes: {d.eval_scenes} (facts never seen in training) and "
            f"{d.novel_scenes} with facts from the novel generator (carry-over column), seed {d.seed}, greedy "
            f"decoding. Whole recipe: {seconds:.0f} s. Every caption, the standard metrics and a report with "
            f"images: finetune/ (held-out) and novel_eval/ (novel generator).\n\n{table}\n")
