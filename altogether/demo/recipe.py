"""The ``demo`` recipe: the whole Altogether pipeline on the synthetic world, on a laptop CPU.

Stages, each in its own folder of the run directory:

1. ``clip/``: a tiny CLIP trained contrastively on the world (open_clip's own loss), then frozen: the encoder.
2. ``tokenizer/``: a byte-level BPE tokenizer trained on the world's texts (any unseen name still tokenizes).
3. ``pretrain/``: the captioner on image + alt-text pairs (target = alt-text).
4. ``finetune/``: the captioner on target captions, alt-text as the prompt, with prompt dropout.
5. ``demo_eval.md`` / ``demo_eval.json``: the evaluation protocol on held-out scenes whose names were never
   seen in training, one row per prompt condition.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from ..config import validate
from ..data.records import Record
from ..io import atomic_write_text
from .world import Scene, caption_for, make_scenes, wrong_colour_alt

log = logging.getLogger(__name__)

CONDITIONS = ("w/ alt", "w/o alt", "w/ random alt", "w/ wrong-colour alt")


def scene_records(scenes: Sequence[Scene], split: str) -> list[Record]:
    """Records of the world: the target names the scene only when the alt-text does; the prompt-dropped target
    never names it (nothing in the image could tell the name)."""
    records = []
    for i, s in enumerate(scenes):
        named = s.name in s.alt_text
        records.append(Record(key=f"{split}-{i:05d}", image=s.image, alt_texts=[s.alt_text],
                              target=caption_for(s, with_name=named),
                              target_without_alt=caption_for(s, with_name=False)))
    return records


def condition_prompts(scenes: Sequence[Scene], seed: int) -> dict[str, list[str]]:
    """The prompt of every held-out scene under each condition (random alt: another scene's alt-text)."""
    from ..conditions import build_conditions

    base = build_conditions([s.alt_text for s in scenes], seed=seed)
    rng = random.Random(seed)
    return {**base, "w/ wrong-colour alt": [wrong_colour_alt(s, rng) for s in scenes]}


def evaluate_demo(export: str | Path, scenes: Sequence[Scene], *, seed: int, batch_size: int = 64
                  ) -> tuple[dict[str, dict[str, float | None]], dict[str, list[str]]]:
    """Greedy captions of held-out scenes under every condition, scored by the world's scorer."""
    from ..recaptioner import Recaptioner
    from .score import score_captions

    captioner = Recaptioner.from_pretrained(export)
    images = [s.image for s in scenes]
    results: dict[str, dict[str, float | None]] = {}
    captions: dict[str, list[str]] = {}
    for condition, prompts in condition_prompts(scenes, seed).items():
        captions[condition] = captioner.recaption(images, prompts, batch_size=batch_size, do_sample=False)
        results[condition] = score_captions(scenes, captions[condition], prompts)
    return results, captions


def run_demo(cfg) -> dict[str, dict[str, float | None]]:
    """Run every stage of the demo recipe and return the evaluation table."""
    from ..tiny import write_tokenizer
    from ..training import fit
    from .clip import demo_clip_config, evaluate_demo_clip, train_demo_clip
    from .score import format_table

    d = cfg.demo
    run = Path(cfg.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    clip_dir = run / "clip"
    train_demo_clip(clip_dir, num_scenes=d.clip_scenes, steps=d.clip_steps, batch_size=d.clip_batch_size, seed=d.seed,
                    config=demo_clip_config(image_size=d.image_size))
    scenes = {split: make_scenes(n, d.seed, split, image_size=d.image_size)
              for split, n in (("train", d.train_scenes), ("val", d.val_scenes), ("eval", d.eval_scenes))}
    probe = evaluate_demo_clip(clip_dir, scenes["val"])
    log.info("stage clip: done in %.0fs; held-out probe %s", time.perf_counter() - started, _short(probe))

    texts = [t for s in scenes["train"] for t in (s.alt_text, s.caption, caption_for(s, with_name=False))]
    tokenizer_dir = write_tokenizer(run / "tokenizer", texts, vocab_size=d.tokenizer_vocab)
    sources = (scene_records(scenes["train"], "train"), scene_records(scenes["val"], "val"))

    model = {"encoder": {"name": f"local-dir:{clip_dir.resolve()}", "pretrained": None},
             "decoder": {"tokenizer": str(tokenizer_dir.resolve())}}
    stages = {
        "pretrain": {"model": model, "output_dir": str(run / "pretrain"), "init_from": None,
                     "data": {"task": "pretrain"},
                     "optim": {"max_steps": d.pretrain_steps, "warmup_steps": d.pretrain_warmup_steps}},
        "finetune": {"model": model, "output_dir": str(run / "finetune"), "init_from": str(run / "pretrain" / "export")},
    }
    export = None
    for name, overrides in stages.items():
        stage_cfg = OmegaConf.merge(cfg, overrides, {"recipe": f"{cfg.recipe}/{name}"})
        validate(stage_cfg)
        t0 = time.perf_counter()
        export = fit(stage_cfg, sources=sources)
        log.info("stage %s: %d steps in %.0fs -> %s", name, stage_cfg.optim.max_steps, time.perf_counter() - t0, export)

    results, captions = evaluate_demo(export, scenes["eval"], seed=d.seed)
    table = format_table(results)
    atomic_write_text(run / "demo_eval.json", json.dumps(results, indent=2))
    atomic_write_text(run / "demo_eval.md", _report(table, cfg, time.perf_counter() - started))
    atomic_write_text(run / "demo_eval_captions.json", json.dumps(_examples(scenes["eval"], captions), indent=2))
    print(table)
    log.info("demo finished in %.0fs; export: %s", time.perf_counter() - started, export)
    return results


def _short(probe: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in probe.items())


def _report(table: str, cfg, seconds: float) -> str:
    d = cfg.demo
    return (f"# Demo evaluation\n\nHeld-out scenes: {d.eval_scenes} (names never seen in training), seed {d.seed}, "
            f"greedy decoding. Whole recipe: {seconds:.0f} s.\n\n{table}\n")


def _examples(scenes: Sequence[Scene], captions: dict[str, list[str]], n: int = 20) -> list[dict[str, Any]]:
    return [{"target": s.caption, "alt_text": s.alt_text, **{c: captions[c][i] for c in captions}}
            for i, s in enumerate(scenes[:n])]
