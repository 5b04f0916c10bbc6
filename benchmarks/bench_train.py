"""Training throughput: our packed layout vs the fixed 40 + 128 + 256 layout, in one run.

Samples have paper-like lengths (alt-text ~20 tokens and dropped half of the time, pretraining target ~25,
finetuning target ~110) and random token ids; images enter as cached embeddings so both variants time the
same mapper + decoder work. Prints one line per variant, then one JSON object as its last line.

    uv run python benchmarks/bench_train.py --task pretrain              # tiny model on the CPU
    uv run python benchmarks/bench_train.py --task finetune --full-size  # ViT-H/14 embeddings + OPT-1.3B (GPU)
    uv run python benchmarks/bench_train.py --task finetune --full-size --activation-checkpointing
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time

import torch
import torch.nn.functional as F

from altogether.config import MapperConfig
from altogether.data.datamodule import collate_training
from altogether.layout import SampleTokens, collate
from altogether.model import AltogetherModel, Mapper, build_decoder
from altogether.training import checkpoint_activations
from altogether.tiny import tiny_opt_config

OPT_1_3B = {"model_type": "opt", "hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192,
            "num_attention_heads": 32, "max_position_embeddings": 2048, "word_embed_proj_dim": 2048,
            "vocab_size": 50272}
FIXED = 40 + 128 + 256
TARGET_MEAN = {"pretrain": 25, "finetune": 110}
H100_BF16_FLOPS = 989e12


def make_samples(n: int, task: str, vocab: int, seed: int) -> list[SampleTokens]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        alt = 0 if rng.random() < 0.5 else min(128, max(1, round(rng.gauss(20, 6))))
        cap = min(255, max(3, round(rng.gauss(TARGET_MEAN[task], TARGET_MEAN[task] * 0.3))))
        out.append(SampleTokens([rng.randrange(3, vocab) for _ in range(alt)],
                                [rng.randrange(3, vocab) for _ in range(cap)] + [2]))
    return out


def fixed_layout(samples, num_visual: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The reference-style layout: every sample padded to the full 424 positions."""
    return collate(samples, num_visual_tokens=num_visual, pad_id=pad_id, width=FIXED)


def build(full_size: bool, device: str) -> tuple[AltogetherModel, int]:
    from altogether.config import DecoderConfig

    decoder_cfg = OPT_1_3B if full_size else {**tiny_opt_config(hidden=256, layers=4, heads=4), "vocab_size": 8192}
    decoder = build_decoder(DecoderConfig(config=decoder_cfg), device=device)
    embed_dim = 1024 if full_size else 128
    mapper_cfg = MapperConfig() if full_size else MapperConfig(num_visual_tokens=40, num_layers=2, num_heads=4)
    mapper = Mapper(embed_dim, decoder.get_input_embeddings().embedding_dim, mapper_cfg).to(device)
    return AltogetherModel(None, mapper, decoder, pad_id=1, eos_id=2).train(), embed_dim


def run(variant: str, model, samples, embeds, args) -> dict[str, float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    batches = []
    for i in range(0, len(samples), args.batch):
        chunk, vec = samples[i:i + args.batch], embeds[i:i + args.batch]
        if variant == "fixed":
            batch = {**fixed_layout(chunk, 40, 1), "image_embeds": vec}
        else:  # exactly what training gets: packed rows, embeddings in packed order, flash-attention runs
            items = [{"tokens": t, "image_embeds": e} for t, e in zip(chunk, vec)]
            batch = collate_training(items, num_visual_tokens=40, pad_id=1, pack_tokens=args.pack_tokens)
        batches.append({k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else torch.autocast("cpu", enabled=False)

    def step(batch):
        with autocast:
            loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[: args.warmup]:
        step(batch)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timed = batches[args.warmup:]
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n = sum(b["image_embeds"].shape[0] for b in timed)
    real = sum(int(b["attention_mask"].sum()) for b in timed)
    computed = sum(b["attention_mask"].numel() for b in timed)
    result = {"samples_per_s": n / seconds, "tokens_per_s": real / seconds, "token_utilisation": real / computed}
    if args.device == "cuda":
        params = sum(p.numel() for p in model.parameters())
        result["mfu"] = 6 * params * computed / seconds / H100_BF16_FLOPS
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TARGET_MEAN), default="pretrain")
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pack-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, embed_dim = build(args.full_size, args.device)
    if args.activation_checkpointing:
        checkpoint_activations(model)
    vocab = model.decoder.config.vocab_size
    samples = make_samples(args.batch * (args.steps + args.warmup), args.task, vocab, args.seed)
    embeds = F.normalize(torch.randn(len(samples), embed_dim), dim=-1)
    results = {}
    for variant in ("fixed", "packed"):
        results[variant] = run(variant, model, samples, embeds, args)
        print(f"{variant:>6}: " + ", ".join(f"{k}={v:.3f}" for k, v in results[variant].items()), flush=True)
    summary = {
        "task": args.task, "device": args.device, "full_size": args.full_size, "batch": args.batch,
        "activation_checkpointing": args.activation_checkpointing,
        "ours_samples_per_s": results["packed"]["samples_per_s"],
        "baseline_samples_per_s": results["fixed"]["samples_per_s"],
        "speedup": results["packed"]["samples_per_s"] / results["fixed"]["samples_per_s"],
        "token_utilisation": results["packed"]["token_utilisation"],
        "baseline_token_utilisation": results["fixed"]["token_utilisation"],
        "ours_tokens_per_s": results["packed"]["tokens_per_s"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    for key in ("mfu", "peak_gpu_gib"):
        if key in results["packed"]:
            summary[f"ours_{key}"] = results["packed"][key]
            summary[f"baseline_{key}"] = results["fixed"][key]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
