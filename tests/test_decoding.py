"""Decoding where finished captions leave the batch: same tokens as Hugging Face generate, less work."""

import copy

import pytest
import torch

from altogether.decoding import COMPACT_FRACTION
from altogether.layout import SampleTokens, collate, tokenize_sample
from altogether.model import causal_lm
from altogether.tiny import favour_token

from .test_model import ITEMS, _batch

PROMPTS = ["zorbit K-1 for sale", "", "IMG_2231.jpg", "a red photo", "shop square", "blue circle on sofa",
           "velora", "price 20 dated"]


@pytest.fixture(scope="module")
def ending(tiny_parts):
    """The tiny captioner with EOS favoured so that greedy captions end at different steps, and its inputs."""
    model, tok, transform = tiny_parts
    model = copy.deepcopy(model)
    favour_token(model.decoder, tok.eos_token_id, 0.3)
    items = [(p, None, ITEMS[i % len(ITEMS)][2]) for i, p in enumerate(PROMPTS)]
    batch = _batch(tok, transform, items, padding_side="left")
    embeds = model.embed_images(batch.pop("pixel_values"))
    alt_ids = [tokenize_sample(tok, p, None, max_alt_tokens=16, max_caption_tokens=32).alt_ids for p in PROMPTS]
    return model, tok, batch, embeds, alt_ids


def _hf_generate(model, tok, batch, embeds, **kwargs) -> list[list[int]]:
    out = causal_lm(model.decoder).generate(
        inputs_embeds=model.input_embeddings(batch, embeds), attention_mask=batch["attention_mask"],
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs)
    return [row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row for row in out.tolist()]


def _rows_per_step(model, monkeypatch) -> list[int]:
    """Record how many rows each decoder call computes."""
    lm = causal_lm(model.decoder)
    rows: list[int] = []
    real = lm.forward

    def counting(*args, **kwargs):
        rows.append(kwargs["inputs_embeds"].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "forward", counting)
    return rows


@pytest.mark.parametrize("settings", [
    {},
    {"min_new_tokens": 3},
    {"no_repeat_ngram_size": 2},
    {"exponential_decay_length_penalty": (2, 1.5)},
])
def test_greedy_tokens_equal_hugging_face_generate(ending, settings):
    model, tok, batch, embeds, alt_ids = ending
    ours = model.generate(embeds, alt_ids, max_new_tokens=24, **settings)
    theirs = _hf_generate(model, tok, batch, embeds, max_new_tokens=24, do_sample=False, **settings)
    assert ours == theirs
    lengths = sorted(len(c) for c in ours)
    assert lengths[0] < 24 and len(set(lengths)) > 1  # captions ended at different steps
    if "min_new_tokens" in settings:
        assert lengths[0] >= 3
    if "exponential_decay_length_penalty" in settings:  # a rising EOS score ends more captions, and sooner
        plain = model.generate(embeds, alt_ids, max_new_tokens=24)
        assert sum(map(len, ours)) < sum(map(len, plain))


def test_repetition_penalty_does_not_depend_on_the_batch(ending):
    """Every generated token is penalised, whatever the row's padding. (Hugging Face ``generate`` with
    ``inputs_embeds`` skips as many generated tokens as the row has padding positions, so it is not compared.)"""
    model, tok, batch, embeds, alt_ids = ending
    settings = dict(max_new_tokens=16, repetition_penalty=1.5)
    together = model.generate(embeds, alt_ids, **settings)
    assert together == [model.generate(embeds[i : i + 1], alt_ids[i : i + 1], **settings)[0]
                        for i in range(len(alt_ids))]
    plain = model.generate(embeds, alt_ids, max_new_tokens=16)
    assert together != plain
    assert max(c.count(t) for c in together for t in c) < max(c.count(t) for c in plain for t in c)


def test_finished_rows_leave_the_batch(ending, monkeypatch):
    model, tok, batch, embeds, alt_ids = ending
    captions = model.generate(embeds, alt_ids, max_new_tokens=24)
    rows = _rows_per_step(model, monkeypatch)
    assert model.generate(embeds, alt_ids, max_new_tokens=24) == captions
    assert rows[0] == len(alt_ids) and len(rows) == 24  # the prompt step, then one call per new token
    for step, computed in enumerate(rows):
        decoding = sum(len(c) >= step for c in captions)  # rows that had not emitted EOS before this step
        # Ended rows are dropped once they are COMPACT_FRACTION of the batch, so few extra rows are computed.
        assert decoding <= computed <= max(decoding + 1, decoding / (1 - COMPACT_FRACTION))
    assert rows[-1] < rows[0]
    assert sum(rows) < len(alt_ids) * 24


def test_a_batch_whose_captions_all_end_stops_early(ending, monkeypatch):
    model, tok, batch, embeds, alt_ids = ending
    favoured = copy.deepcopy(model)
    favour_token(favoured.decoder, tok.eos_token_id, 5.0)
    rows = _rows_per_step(favoured, monkeypatch)
    assert favoured.generate(embeds, alt_ids, max_new_tokens=24) == [[] for _ in alt_ids]
    assert rows == [len(alt_ids)]  # EOS first everywhere: no decoding step after the prompt


def test_sampling_draws_from_the_processed_distribution(ending):
    model, tok, batch, embeds, alt_ids = ending
    draws = 4000
    torch.manual_seed(0)
    first = model.generate(embeds[:1], alt_ids[:1], max_new_tokens=1, do_sample=True, temperature=3.0, top_k=8,
                           num_return_sequences=draws)
    counts = torch.bincount(torch.tensor([c[0] if c else tok.eos_token_id for c in first]), minlength=len(tok))
    alone = collate([SampleTokens(alt_ids[0], [])], num_visual_tokens=model.mapper.num_tokens, pad_id=tok.pad_token_id)
    logits = model.logits({**alone, "image_embeds": embeds[:1]})[0, -1] / 3.0
    top = logits.topk(8)
    probs = torch.zeros_like(logits).index_put_((top.indices,), top.values.softmax(-1))
    assert counts.sum() == draws and counts[probs == 0].sum() == 0  # never outside the top 8
    expected = probs[top.indices] * draws
    assert torch.all((counts[top.indices] - expected).abs() <= 4 * expected.sqrt() + 1)


def test_sampling_is_seeded_and_candidates_of_an_image_are_consecutive(ending):
    model, tok, batch, embeds, alt_ids = ending
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.0, num_return_sequences=3)
    torch.manual_seed(3)
    first = model.generate(embeds, alt_ids, **kwargs)
    torch.manual_seed(3)
    assert model.generate(embeds, alt_ids, **kwargs) == first
    assert len(first) == 3 * len(alt_ids) and len(set(map(tuple, first))) > len(alt_ids)
    greedy = model.generate(embeds, alt_ids, max_new_tokens=12)
    top1 = model.generate(embeds, alt_ids, **{**kwargs, "top_k": 1})  # sampling from one token is greedy
    assert top1 == [c for c in greedy for _ in range(3)]
