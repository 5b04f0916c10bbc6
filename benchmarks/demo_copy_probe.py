"""How fast a from-scratch decoder learns to copy the demo world's facts: a text-only probe of the demo's decoder.

The demo (docs/demo.md) must carry facts it never trained on into captions letter for letter. This probe isolates
the decoder's side of that: a tiny OPT (3 layers x 128) or the demo's same-size Llama (``--arch llama``, rotary
positions) on the demo world's texts, trained by a plain PyTorch loop with no image encoder. The visual tokens are replaced by the
scene's visual description written as text, so colours and shapes are given and only copying is measured.

Each sample is ``prefix [SEP] alt-text [SEP?] target``: the loss runs over the target and EOS. ``--no-separator``
drops the second ``[SEP]`` (the library's layout: the caption follows the prompt directly). Stages:

* ``--copy-steps`` steps of copy samples: the target is the whole alt-text (``--copy-target full``) or only its
  facts joined by `` | `` (``facts``); alt-texts are drawn afresh per sample (``--fresh-alt-texts``) or are the
  training scenes' own; their facts are the scene's, fresh ones of the training generator
  (``--fresh-facts generator``) or fresh ids of no fixed shape (``any-shape``: ``world.any_shape_id``);
* then ``--caption-steps`` steps of caption samples (prompt dropout 0.5), ``--copy-share`` of them copy samples
  and ``--caption-any-shape`` of them with fresh ids of no fixed shape as the scene's facts.

One AdamW cosine schedule (warm-up 50 steps, floor 0.1) spans both stages. Every ``--eval-every`` steps it prints
exact carry-over (the world's scorer, greedy decoding) on 100 held-out and 100 novel-generator scenes; in a run
without caption steps, the fraction of copy targets written exactly. The last line is a JSON object.

    uv run python benchmarks/demo_copy_probe.py --caption-steps 1500                       # captions only
    uv run python benchmarks/demo_copy_probe.py --copy-steps 1000 --caption-steps 1500     # copy first
    uv run python benchmarks/demo_copy_probe.py --copy-steps 1000 --no-separator          # copy, library layout
    uv run python benchmarks/demo_copy_probe.py --arch llama --fresh-facts any-shape --caption-any-shape 0.5 \
        --copy-steps 1000 --caption-steps 1500                                          # the demo's choices
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time

import torch

from altogether.demo.score import caption_facts
from altogether.demo.world import VOCABULARY, another_alt_text, any_shape_id, caption_for, make_facts, make_scenes
from altogether.tokenizer import train_tokenizer


def build_decoder(arch: str, vocab: int, pad: int, eos: int) -> torch.nn.Module:
    if arch == "opt":
        from transformers import OPTConfig, OPTForCausalLM

        return OPTForCausalLM(OPTConfig(
            vocab_size=vocab, hidden_size=128, num_hidden_layers=3, ffn_dim=512, num_attention_heads=4,
            max_position_embeddings=256, word_embed_proj_dim=128, do_layer_norm_before=True, dropout=0.0,
            attention_dropout=0.0, pad_token_id=pad, eos_token_id=eos, bos_token_id=eos))
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=3, intermediate_size=512, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, pad_token_id=pad, eos_token_id=eos, bos_token_id=eos,
        tie_word_embeddings=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("opt", "llama"), default="opt")
    parser.add_argument("--copy-steps", type=int, default=0)
    parser.add_argument("--copy-target", choices=("full", "facts"), default="full")
    parser.add_argument("--fresh-alt-texts", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fresh-facts", choices=("no", "generator", "any-shape"), default="no")
    parser.add_argument("--caption-steps", type=int, default=0)
    parser.add_argument("--copy-share", type=float, default=0.0)
    parser.add_argument("--caption-any-shape", type=float, default=0.0)
    parser.add_argument("--separator", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--train-scenes", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(1)

    train = make_scenes(args.train_scenes, 0, "train", image_size=16)
    held_out, novel = make_scenes(100, 0, "eval", image_size=16), make_scenes(100, 0, "novel", image_size=16)
    texts = [t for s in train for t in (s.alt_text, s.caption, caption_for(s, with_facts=False))]
    tokenizer = train_tokenizer(texts, vocab_size=1000, words=VOCABULARY)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = build_decoder(args.arch, len(tokenizer), pad, eos)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(scene, alt: str) -> list[int]:
        # The visual description stands in for the visual tokens.
        return ids(caption_for(scene, with_facts=False)) + [eos] + (ids(alt) if alt else []) + ([eos] * args.separator)

    def copy_text(scene, alt: str) -> str:
        return alt if args.copy_target == "full" else " | ".join(scene.facts)

    def copy_sample():
        scene = rng.choice(train)
        if args.fresh_facts == "generator":
            scene = dataclasses.replace(scene, **dict(zip(("name", "code"), make_facts(rng, "train"))))
        elif args.fresh_facts == "any-shape":
            scene = dataclasses.replace(scene, name=any_shape_id(rng), code=any_shape_id(rng) if rng.random() < 0.5 else None)
        alt = another_alt_text(scene, rng) if args.fresh_alt_texts else scene.alt_text
        return prompt(scene, alt), ids(copy_text(scene, alt)) + [eos]

    def caption_sample():
        scene = rng.choice(train)
        alt = scene.alt_text
        if rng.random() < args.caption_any_shape:
            scene = dataclasses.replace(scene, name=any_shape_id(rng), code=any_shape_id(rng) if rng.random() < 0.5 else None)
            alt = another_alt_text(scene, rng)
        alt = alt if rng.random() >= 0.5 else ""
        return prompt(scene, alt), ids(caption_for(scene, with_facts=bool(alt))) + [eos]

    @torch.no_grad()
    def greedy(prefix: list[int], limit: int) -> str:
        tokens, past, out = torch.tensor([prefix]), None, []
        for _ in range(limit):
            step = model(input_ids=tokens if past is None else tokens[:, -1:], past_key_values=past, use_cache=True)
            past, nxt = step.past_key_values, int(step.logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            tokens = torch.cat([tokens, torch.tensor([[nxt]])], 1)
        return tokenizer.decode(out)

    def exact(scenes) -> tuple[float, list]:
        model.eval()
        right, shown = 0, []
        for scene in scenes:
            written = greedy(prompt(scene, scene.alt_text), 80)
            right += (written == copy_text(scene, scene.alt_text) if args.caption_steps == 0
                      else caption_facts(written) == scene.facts)
            shown.append((scene.facts, written))
        model.train()
        return right / len(scenes), shown[:2]

    total = args.copy_steps + args.caption_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1, (i + 1) / 50) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(i, total) / total))))
    started, result = time.perf_counter(), {}
    for step in range(1, total + 1):
        pairs = [copy_sample() if step <= args.copy_steps or rng.random() < args.copy_share else caption_sample()
                 for _ in range(args.batch_size)]
        width = max(len(p) + len(t) for p, t in pairs)
        input_ids = torch.full((len(pairs), width), pad)
        labels = torch.full((len(pairs), width), -100)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (p, t) in enumerate(pairs):
            input_ids[i, : len(p) + len(t)] = torch.tensor(p + t)
            labels[i, len(p) : len(p) + len(t)] = torch.tensor(t)  # the model shifts labels itself
            mask[i, : len(p) + len(t)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)", flush=True)
        if step % args.eval_every == 0 or step == total:
            (a, shown_a), (b, shown_b) = exact(held_out), exact(novel)
            result = {"step": step, "loss": round(loss.item(), 4), "held_out": a, "novel": b,
                      "seconds": round(time.perf_counter() - started)}
            print(f"step {step}: exact held-out {a:.2f}, novel {b:.2f}; e.g. {shown_a + shown_b}", flush=True)
    print(json.dumps({"settings": vars(args), **result}))


if __name__ == "__main__":
    main()
