"""Recaptioning throughput: ``Recaptioner.recaption`` vs one plain ``generate`` call per batch, in one run.

Ours sorts images by prompt length so a batch shares similar lengths, pads each batch only to its longest
prompt, and decodes with the KV cache, finished captions leaving the batch. The baseline is the reference-style
loop: input order, every prompt padded to the full 128 alt-text tokens, one Hugging Face ``generate`` call per
batch. Both decode greedily with the same settings, so they write the same captions (the script counts them).

Caption lengths: ``--lengths fixed`` decodes exactly ``--new-tokens`` per image (``min_new_tokens`` =
``max_new_tokens``). ``--lengths varied`` lets captions end on their own within a 256-token budget, as trained
models do: the random decoder's EOS is favoured slightly and ``exponential_decay_length_penalty`` raises it after
30 tokens, which ends greedy captions after about 100 tokens, differently per image (the script prints the
lengths). Prints one line per variant, then one JSON object as its last line.

    uv run python benchmarks/bench_recaption.py                              # tiny model on the CPU
    uv run python benchmarks/bench_recaption.py --lengths fixed --new-tokens 32
    uv run python benchmarks/bench_recaption.py --full-size --lengths fixed --new-tokens 110   # GPU
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import altogether.generation as decode_loop
from altogether import Recaptioner
from altogether.config import DecoderConfig, EncoderConfig, LayoutConfig, MapperConfig, ModelConfig
from altogether.export import save_export
from altogether.layout import SampleTokens, collate
from altogether.model import AltogetherModel
from altogether.tiny import TINY_CLIP, favour_token, tiny_opt_config, write_tiny_clip, write_tokenizer

OPT_1_3B = {"model_type": "opt", "hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192,
            "num_attention_heads": 32, "max_position_embeddings": 2048, "word_embed_proj_dim": 2048}
CAPTION_BUDGET = 256
LENGTH_DECAY = (30, 1.02)  # --lengths varied: exponential_decay_length_penalty
WORDS = "zorbit velora photo product shop sale red blue square circle cat on sofa price dated file jpg".split()


def make_export(directory: Path, full_size: bool) -> Path:
    """An export with random weights: tiny (CPU) or the full-size architecture (GPU)."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(500)]
    tokenizer_dir = write_tokenizer(directory / "tok", texts, vocab_size=2000)
    if full_size:
        encoder = EncoderConfig(name="ViT-H-14-quickgelu", pretrained=None)
        mapper, decoder = MapperConfig(), DecoderConfig(config=OPT_1_3B, tokenizer=str(tokenizer_dir))
    else:
        clip = write_tiny_clip(directory / "clip", model_cfg={**TINY_CLIP, "embed_dim": 64})
        encoder = EncoderConfig(name=f"local-dir:{clip}", pretrained=None)
        mapper = MapperConfig(num_visual_tokens=40, num_layers=2, num_heads=4)
        decoder = DecoderConfig(config=tiny_opt_config(hidden=256, layers=4, heads=4), tokenizer=str(tokenizer_dir))
    cfg = ModelConfig(encoder=encoder, mapper=mapper, decoder=decoder)
    from altogether.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.decoder)
    model, _ = AltogetherModel.from_config(cfg, tokenizer)
    return save_export(directory / "export", model, tokenizer, model_cfg=cfg, layout=LayoutConfig(),
                       generation=decode_loop.GenerationConfig())


def alt_texts(n: int, seed: int) -> list[str]:
    """Paper-like alt-texts: about 13 words, some empty."""
    rng = random.Random(seed)
    return ["" if rng.random() < 0.1 else " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.gauss(13, 6)))))
            for _ in range(n)]


@torch.no_grad()
def baseline(captioner: Recaptioner, images, alts, batch: int, generation: dict) -> list[str]:
    model, pad = captioner.model, captioner.tokenizer.pad_token_id
    width = captioner.layout.max_alt_tokens
    captions = []
    for start in range(0, len(images), batch):
        chunk = range(start, min(start + batch, len(images)))
        pixels = torch.stack([captioner.transform(images[i]) for i in chunk]).to(captioner.device, captioner.dtype)
        embeds = model.embed_images(pixels)
        # Fixed layout: every prompt left-padded to the full alt-text budget.
        samples = [SampleTokens([pad] * (width - len(ids)) + ids, []) for ids in (captioner.prompt_ids(alts[i]) for i in chunk)]
        layout = collate(samples, num_visual_tokens=model.mapper.num_tokens, pad_id=pad, padding_side="left")
        mask = layout["attention_mask"].clone()
        for row, s in enumerate(samples):
            mask[row, model.mapper.num_tokens : model.mapper.num_tokens + s.alt_ids.count(pad)] = 0
        layout = {k: v.to(captioner.device) for k, v in layout.items()}
        out = model.decoder.generate(inputs_embeds=model.input_embeddings(layout, embeds),
                                     attention_mask=mask.to(captioner.device), do_sample=False, pad_token_id=pad,
                                     eos_token_id=model.eos_id, **generation)
        captions += [captioner.decode(row[: row.index(model.eos_id)] if model.eos_id in row else row)
                     for row in out.tolist()]
    return captions


def ours(captioner: Recaptioner, images, alts, batch: int, generation: dict) -> list[str]:
    return captioner.recaption(images, alts, batch_size=batch, do_sample=False, **generation)


def ours_keeping_finished(captioner: Recaptioner, images, alts, batch: int, generation: dict) -> list[str]:
    """Ours with finished captions kept in the batch to its end: what leaving early alone is worth."""
    compact = decode_loop.COMPACT_FRACTION
    decode_loop.COMPACT_FRACTION = 2.0  # more than every row: never drop one
    try:
        return ours(captioner, images, alts, batch, generation)
    finally:
        decode_loop.COMPACT_FRACTION = compact


@torch.no_grad()
def caption_lengths(captioner: Recaptioner, images, alts, generation: dict) -> list[int]:
    """Generated tokens per image (EOS not counted), decoded one image at a time, untimed."""
    model = captioner.model
    lengths = []
    for image, alt in zip(images, alts):
        pixels = captioner.transform(image)[None].to(captioner.device, captioner.dtype)
        lengths += [len(ids) for ids in model.generate(model.embed_images(pixels), [captioner.prompt_ids(alt)],
                                                       captioner.settings(do_sample=False, **generation))]
    return lengths


def timed(fn):
    """Seconds ``fn`` took, and what it returned."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--lengths", choices=("varied", "fixed"), default="varied")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per caption with --lengths fixed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export = make_export(Path(tmp), args.full_size)
        captioner = Recaptioner.from_pretrained(export)
        if args.lengths == "varied":
            favour_token(captioner.model.decoder, captioner.tokenizer.eos_token_id, 0.05)
            generation = {"max_new_tokens": CAPTION_BUDGET, "exponential_decay_length_penalty": LENGTH_DECAY}
        else:
            generation = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
        rng = random.Random(1)
        images = [Image.new("RGB", (224, 224), tuple(rng.randrange(256) for _ in range(3))) for _ in range(args.images)]
        alts = alt_texts(args.images, seed=2)
        ours(captioner, images[: args.batch], alts[: args.batch], args.batch, generation)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        results = {}
        for name, fn in (("ours", ours), ("ours_keeping_finished", ours_keeping_finished), ("baseline", baseline)):
            seconds, captions = timed(lambda: fn(captioner, images, alts, args.batch, generation))
            results[name] = (args.images / seconds, captions)
            print(f"  {name}: images_per_s={results[name][0]:.2f}", flush=True)
        same = sum(a == b for a, b in zip(results["ours"][1], results["baseline"][1]))
        lengths = caption_lengths(captioner, images, alts, generation)
        print(f"  caption tokens: mean {statistics.mean(lengths):.1f}, min {min(lengths)}, max {max(lengths)}; "
              f"identical captions {same}/{args.images}")
        summary = {"device": str(captioner.device), "dtype": str(captioner.dtype), "full_size": args.full_size,
                   "lengths": args.lengths, "batch": args.batch, "images": args.images, **generation,
                   "mean_caption_tokens": statistics.mean(lengths), "min_caption_tokens": min(lengths),
                   "max_caption_tokens": max(lengths), "identical_captions": same,
                   "ours_images_per_s": results["ours"][0], "baseline_images_per_s": results["baseline"][0],
                   "speedup": results["ours"][0] / results["baseline"][0],
                   "ours_keeping_finished_images_per_s": results["ours_keeping_finished"][0],
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "torch": torch.__version__, "threads": torch.get_num_threads()}
        if torch.cuda.is_available():
            summary["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
