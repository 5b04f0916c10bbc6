"""Training throughput: our packed layout vs the fixed 40 + 128 + 256 layout, in one run; and, at full size,
the memory each GPU needs.

Samples have paper-like lengths (alt-text ~20 tokens and dropped half of the time, pretraining target ~25,
finetuning target ~110) and random token ids; images enter as cached embeddings so both variants time the
same mapper + decoder work. Prints one line per variant, then one JSON object as its last line.

``--full-size`` first prints the per-GPU memory of full-size training at micro-batch ``--batch`` (32) in
bf16-mixed with fp32 master weights, with and without activation checkpointing, under DDP and FSDP over 8 and
16 GPUs: computed, not measured on a GPU (see :func:`memory_table` for every term and its source). Without a
GPU that is all it does; on a GPU it then times the full-size model.

    uv run python benchmarks/bench_train.py --task pretrain              # tiny model on the CPU
    uv run python benchmarks/bench_train.py --full-size                  # the memory table (any machine)
    uv run python benchmarks/bench_train.py --task finetune --full-size  # + ViT-H/14 embeddings + OPT-1.3B (GPU)
    uv run python benchmarks/bench_train.py --task finetune --full-size --activation-checkpointing
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from altogether.config import DecoderConfig, MapperConfig
from altogether.data.datamodule import collate_training
from altogether.layout import SampleTokens, collate
from altogether.model import AltogetherModel, Mapper, build_decoder
from altogether.training import checkpoint_activations
from altogether.tiny import OPT_1_3B_CONFIG, architecture, tiny_opt_config

OPT_1_3B = architecture(OPT_1_3B_CONFIG)
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


# ---------------------------------------------------------------------------------------------------------
# Full size on paper: what each GPU holds
# ---------------------------------------------------------------------------------------------------------

GIB = 2**30
GPU_GIB = 79.2  # what torch reports as the total memory of an 80 GB H100 / A100
HEADROOM_GIB = 2.0  # CUDA context, cuBLAS / attention workspaces, allocator fragmentation: not computed here
CAPTION_TOKENS = 256  # layout budget: 255 caption tokens + EOS at most
# The loss's backward starts with every activation still held and, per caption token and vocabulary entry, the
# fp32 gradients of the log-softmax and of the logits (4 + 4 bytes) on top of the kept fp32 log-softmax.
LOGITS_BACKWARD_BYTES = 8


@dataclass
class ActivationBytes:
    """Bytes one training forward keeps for the backward pass, split by what each part grows with.

    Measured by :func:`measure_activations`; ``layer_input_bytes`` is the element size of a decoder layer's
    input (the residual stream), which is all activation checkpointing keeps of a layer.
    """

    layer_per_position: float  # one decoder layer, per laid-out position (padding included)
    other_per_position: float  # token embeddings, final norm, gathers outside the layers
    mapper_per_image: float
    logits_per_token: float  # LM head + cross-entropy, per predicted caption token (caption + EOS)
    mask_per_square_position: float  # the block attention mask, per row and width squared
    scores_per_square_position: float  # per-head attention scores per layer (0 with fused attention kernels)
    layer_input_bytes: int
    weight_copies: float  # bf16 copies of the trainable weights that autocast keeps for the backward, full model


def full_size_parameters() -> dict[str, int]:
    """Parameter counts of the full-size parts, built on the meta device (shapes only, no memory, no weights):
    the ViT-H-14-quickgelu image tower (open_clip), the mapper as :class:`Mapper` builds it for 1024-d embeddings
    and OPT-1.3B's width, and OPT-1.3B from its Hub ``config.json`` (tied LM head counted once)."""
    import open_clip

    clip = open_clip.create_model("ViT-H-14-quickgelu", pretrained=None, device="meta")
    with torch.device("meta"):
        decoder = build_decoder(DecoderConfig(config=OPT_1_3B), device="meta")
        mapper = Mapper(clip.visual.output_dim, decoder.get_input_embeddings().embedding_dim, MapperConfig())
    return {name: sum(p.numel() for p in part.parameters())
            for name, part in (("encoder", clip.visual), ("mapper", mapper), ("decoder", decoder))}


def measure_activations(batch: int = 2) -> ActivationBytes:
    """Bytes saved for the backward pass by a real training forward on the CPU, in bf16 autocast as Lightning's
    ``bf16-mixed`` runs it, of the full-size mapper and OPT-1.3B cut to one decoder layer (every layer is the
    same), on ``batch`` samples filling all 424 positions (128 alt-text tokens, 255 caption tokens + EOS).

    Saved tensors are recorded with ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters
    left out, and attributed to the mapper, the decoder layer or the rest by forward hooks, and by shape to the
    attention mask, per-head attention scores, vocabulary-wide logits and bf16 weight copies. The weights are
    constants (built on the meta device, then filled): the bytes do not depend on their values.
    """
    config = {**OPT_1_3B, "num_hidden_layers": 1}
    with torch.device("meta"):
        decoder = build_decoder(DecoderConfig(config=config, attn_implementation="sdpa"), device="meta")
        mapper = Mapper(1024, OPT_1_3B["hidden_size"], MapperConfig())
    model = AltogetherModel(None, mapper, decoder, pad_id=1, eos_id=2).to_empty(device="cpu").train()
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(0.01)
    mapper_cfg = MapperConfig()
    samples = [SampleTokens(list(range(3, 131)), list(range(3, 258)) + [2]) for _ in range(batch)]
    inputs = {**collate(samples, num_visual_tokens=mapper_cfg.num_visual_tokens, pad_id=1),
              "image_embeds": torch.randn(batch, 1024)}
    width, vocab, heads = inputs["input_ids"].shape[1], OPT_1_3B["vocab_size"], OPT_1_3B["num_attention_heads"]

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {s for p in model.parameters() if p.ndim == 2 for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    where, input_bytes, saved = ["other"], [], {}
    layer = decoder.model.decoder.layers[0]
    for name, module in (("mapper", model.mapper), ("layer", layer)):
        module.register_forward_pre_hook(lambda m, args, name=name: where.append(name) and None)
        module.register_forward_hook(lambda m, args, out: where.pop() and None)
    layer.register_forward_pre_hook(lambda m, args: input_bytes.append(args[0].element_size()) and None)

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in saved:
            square = t.ndim == 4 and tuple(t.shape[-2:]) == (width, width)
            if t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes:
                kind = f"weights:{where[-1]}"
            elif square:
                kind = "scores" if t.shape[1] == heads else "mask"
            elif t.ndim and t.shape[-1] == vocab:
                kind = "logits"
            else:
                kind = where[-1]
            saved[ptr] = (kind, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(inputs)
    assert loss.num_tokens == batch * CAPTION_TOKENS
    total: Counter = Counter()
    for kind, size in saved.values():
        total[kind] += size
    positions, squares = batch * width, batch * width * width
    return ActivationBytes(
        layer_per_position=total["layer"] / positions, other_per_position=total["other"] / positions,
        mapper_per_image=total["mapper"] / batch, logits_per_token=total["logits"] / loss.num_tokens,
        mask_per_square_position=total["mask"] / squares, scores_per_square_position=total["scores"] / squares,
        layer_input_bytes=input_bytes[0],
        weight_copies=total["weights:mapper"] + total["weights:other"]
        + OPT_1_3B["num_hidden_layers"] * total["weights:layer"],
    )


@dataclass
class Layout:
    """One micro-batch as training lays it out: rows x width positions, ``images`` samples, ``tokens`` predicted."""

    name: str
    rows: int
    width: int
    images: int
    tokens: int


def layouts(micro_batch: int, pack_tokens: int, seed: int) -> list[Layout]:
    """The worst case of the fixed layout (every sample 424 positions with a 256-token caption), and a packed
    micro-batch of finetuning-like samples (:func:`make_samples`) as ``collate_training`` packs it."""
    samples = make_samples(micro_batch, "finetune", OPT_1_3B["vocab_size"], seed)
    packed = collate_training([{"tokens": t} for t in samples], num_visual_tokens=MapperConfig().num_visual_tokens,
                              pad_id=1, pack_tokens=pack_tokens)
    rows, width = packed["attention_mask"].shape
    return [Layout("424 positions, 256-token captions (worst case)", micro_batch, FIXED, micro_batch,
                   micro_batch * CAPTION_TOKENS),
            Layout(f"packed, finetuning lengths ({rows} rows of {width})", rows, width, micro_batch,
                   int(packed["predict_index"].numel()))]


def activation_bytes(act: ActivationBytes, layout: Layout, *, checkpointing: bool) -> float:
    """Activations kept for the backward pass of one micro-batch.

    Decoder layers keep ``layer_per_position`` per position each; with activation checkpointing they keep only
    their input (``layer_input_bytes`` x width of the residual stream) and one layer's activations exist again
    while it is recomputed in the backward. The mapper (not checkpointed), the logits (with the transient
    gradients of :data:`LOGITS_BACKWARD_BYTES`) and the mask add theirs.
    """
    positions = layout.rows * layout.width
    layers = OPT_1_3B["num_hidden_layers"]
    per_layer = act.layer_per_position * positions + act.scores_per_square_position * layout.rows * layout.width**2
    decoder = (layers * act.layer_input_bytes * OPT_1_3B["hidden_size"] * positions + per_layer if checkpointing
               else layers * per_layer)
    logits = (act.logits_per_token + LOGITS_BACKWARD_BYTES * OPT_1_3B["vocab_size"]) * layout.tokens
    return (decoder + act.other_per_position * positions + act.mapper_per_image * layout.images + logits
            + act.mask_per_square_position * layout.rows * layout.width**2)


def state_bytes(counts: dict[str, int], act: ActivationBytes, strategy: str, gpus: int) -> dict[str, float]:
    """Weights, gradients, AdamW state and strategy buffers per GPU, for bf16-mixed with fp32 master weights.

    DDP (Lightning's ``DDPStrategy`` defaults): every GPU holds the fp32 weights (the frozen encoder too), fp32
    gradients of the trainable ones, AdamW's two fp32 moments, DDP's gradient buckets (a second fp32 copy of
    the gradients: ``gradient_as_bucket_view`` is off) and the bf16 weight copies autocast keeps for the backward.
    FSDP as ``trainer.strategy=fsdp`` builds it (``FSDPStrategy(use_orig_params=True)``: no auto-wrap policy, so
    the whole model is one FSDP unit, and ``MixedPrecision(param_dtype=bfloat16)`` for bf16-mixed): fp32 weights,
    gradients and AdamW state sharded over the GPUs, gradients for the frozen encoder too (it shares the unit's
    flat parameter), plus the unit's unsharded bf16 weights, which the root unit keeps for the whole step, and
    its unsharded bf16 gradient before the reduce-scatter.
    """
    every = sum(counts.values())
    trainable = counts["mapper"] + counts["decoder"]
    if strategy == "ddp":
        return {"weights": 4 * every, "gradients": 4 * trainable, "adamw": 8 * trainable,
                "buffers": 4 * trainable + act.weight_copies}
    return {"weights": 4 * every / gpus, "gradients": 4 * every / gpus, "adamw": 8 * trainable / gpus,
            "buffers": 2 * every + 2 * every}


def memory_table(counts: dict[str, int], act: ActivationBytes, micro_batch: int, pack_tokens: int,
                 seed: int) -> list[dict]:
    """Per-GPU GiB of every (strategy, activation checkpointing, layout): the sum of :func:`state_bytes` and
    :func:`activation_bytes`, an upper bound of the peak (gradient accumulation keeps the gradients while the next
    micro-batch's activations are stored), and whether it fits an 80 GB GPU with :data:`HEADROOM_GIB` to spare."""
    rows = []
    for strategy, gpus in (("ddp", 1), ("fsdp", 8), ("fsdp", 16)):
        state = state_bytes(counts, act, strategy, gpus)
        for checkpointing in (False, True):
            for layout in layouts(micro_batch, pack_tokens, seed):
                activations = activation_bytes(act, layout, checkpointing=checkpointing)
                total = sum(state.values()) + activations
                rows.append({"strategy": "DDP" if strategy == "ddp" else f"FSDP over {gpus}",
                             "activation_checkpointing": checkpointing, "layout": layout.name,
                             **{k: v / GIB for k, v in state.items()}, "activations": activations / GIB,
                             "total": total / GIB, "fits_80gb": total / GIB + HEADROOM_GIB <= GPU_GIB})
    return rows


def print_memory(counts: dict[str, int], act: ActivationBytes, rows: list[dict]) -> None:
    h = OPT_1_3B["hidden_size"]
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
          + f"; trainable {counts['mapper'] + counts['decoder']:,}")
    print(f"activations per decoder layer: {act.layer_per_position / h:.1f} x hidden bytes per position "
          f"(Korthikanti et al. 2022 with fused attention: 34); mapper {act.mapper_per_image / 2**20:.1f} MiB per "
          f"image; logits {act.logits_per_token / OPT_1_3B['vocab_size']:.1f} x vocabulary bytes per caption token; "
          f"per-head attention scores kept: {act.scores_per_square_position:.0f} bytes; layer input "
          f"{act.layer_input_bytes} bytes per element; bf16 weight copies {act.weight_copies / GIB:.2f} GiB")
    print("| strategy | act. ckpt | layout | weights | grads | AdamW | buffers | activations | total GiB "
          "| fits 80 GB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['strategy']} | {'yes' if r['activation_checkpointing'] else 'no'} | {r['layout']} | "
              f"{r['weights']:.1f} | {r['gradients']:.1f} | {r['adamw']:.1f} | {r['buffers']:.1f} | "
              f"{r['activations']:.1f} | {r['total']:.1f} | {'yes' if r['fits_80gb'] else 'no'} |", flush=True)


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
    memory = None
    if args.full_size:
        counts, act = full_size_parameters(), measure_activations()
        rows = memory_table(counts, act, args.batch, args.pack_tokens, args.seed)
        print_memory(counts, act, rows)
        memory = {"parameters": counts, "activation_bytes": asdict(act), "per_gpu_gib": rows}
        if args.device != "cuda":  # a full-size training step is a GPU's job
            print(json.dumps({"full_size": True, "batch": args.batch, "memory": memory, "torch": torch.__version__}))
            return
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
    if memory is not None:
        summary["memory"] = memory
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
