"""The generation schema, and decoding where finished captions leave the batch: same tokens as Hugging Face
generate, less work."""

import copy
import json

import pytest
import torch

from altogether.generation import COMPACT_FRACTION, GenerationConfig, GenerationError
from altogether.layout import SampleTokens, collate, tokenize_sample
from altogether.model import causal_lm
from altogether.tiny import favour_token

from .test_model import ITEMS, _batch

# What AltogetherModel.generate defaulted to before it took a GenerationConfig: greedy, warpers neutral.
PLAIN = GenerationConfig(do_sample=False, temperature=1.0, top_p=1.0)
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
    ours = model.generate(embeds, alt_ids, PLAIN.merge(max_new_tokens=24, **settings))
    theirs = _hf_generate(model, tok, batch, embeds, max_new_tokens=24, do_sample=False, **settings)
    assert ours == theirs
    lengths = sorted(len(c) for c in ours)
    assert lengths[0] < 24 and len(set(lengths)) > 1  # captions ended at different steps
    if "min_new_tokens" in settings:
        assert lengths[0] >= 3
    if "exponential_decay_length_penalty" in settings:  # a rising EOS score ends more captions, and sooner
        plain = model.generate(embeds, alt_ids, PLAIN.merge(max_new_tokens=24))
        assert sum(map(len, ours)) < sum(map(len, plain))


def test_repetition_penalty_does_not_depend_on_the_batch(ending):
    """Every generated token is penalised, whatever the row's padding. (Hugging Face ``generate`` with
    ``inputs_embeds`` skips as many generated tokens as the row has padding positions, so it is not compared.)"""
    model, tok, batch, embeds, alt_ids = ending
    settings = dict(max_new_tokens=16, repetition_penalty=1.5)
    together = model.generate(embeds, alt_ids, PLAIN.merge(**settings))
    assert together == [model.generate(embeds[i : i + 1], alt_ids[i : i + 1], PLAIN.merge(**settings))[0]
                        for i in range(len(alt_ids))]
    plain = model.generate(embeds, alt_ids, PLAIN.merge(max_new_tokens=16))
    assert together != plain
    assert max(c.count(t) for c in together for t in c) < max(c.count(t) for c in plain for t in c)


def test_finished_rows_leave_the_batch(ending, monkeypatch):
    model, tok, batch, embeds, alt_ids = ending
    captions = model.generate(embeds, alt_ids, PLAIN.merge(max_new_tokens=24))
    rows = _rows_per_step(model, monkeypatch)
    assert model.generate(embeds, alt_ids, PLAIN.merge(max_new_tokens=24)) == captions
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
    assert favoured.generate(embeds, alt_ids, PLAIN.merge(max_new_tokens=24)) == [[] for _ in alt_ids]
    assert rows == [len(alt_ids)]  # EOS first everywhere: no decoding step after the prompt


@pytest.mark.parametrize("seed", [None, 0], ids=["global generator", "a stream per caption"])
def test_sampling_draws_from_the_processed_distribution(ending, seed):
    model, tok, batch, embeds, alt_ids = ending
    draws = 4000
    torch.manual_seed(0)
    first = model.generate(embeds[:1], alt_ids[:1], PLAIN.merge(max_new_tokens=1, do_sample=True, temperature=3.0,
                                                                top_k=8, num_return_sequences=draws, seed=seed))
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
    first = model.generate(embeds, alt_ids, PLAIN.merge(**kwargs))
    torch.manual_seed(3)
    assert model.generate(embeds, alt_ids, PLAIN.merge(**kwargs)) == first
    assert len(first) == 3 * len(alt_ids) and len(set(map(tuple, first))) > len(alt_ids)
    greedy = model.generate(embeds, alt_ids, PLAIN.merge(max_new_tokens=12))
    top1 = model.generate(embeds, alt_ids, PLAIN.merge(**{**kwargs, "top_k": 1}))  # sampling from one token is greedy
    assert top1 == [c for c in greedy for _ in range(3)]


# -- the schema ------------------------------------------------------------------------------------------


def test_one_default_set_is_the_papers_decoding():
    g = GenerationConfig()
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.max_new_tokens) == (True, 0.2, 0.7, 0, 256)  # Table 10
    assert (g.num_beams, g.num_return_sequences, g.repetition_penalty, g.min_new_tokens) == (1, 1, 1.0, 0)
    assert g.seed is None and g.exponential_decay_length_penalty is None


def test_merge_keeps_what_is_none_and_validates():
    base = GenerationConfig(max_new_tokens=40, seed=3)
    merged = base.merge({"temperature": 1.0, "top_p": None}, exponential_decay_length_penalty=(5, 1.5), seed=None)
    assert (merged.temperature, merged.top_p, merged.max_new_tokens, merged.seed) == (1.0, 0.7, 40, 3)
    assert merged.exponential_decay_length_penalty == [5, 1.5] and merged.length_decay == (5, 1.5)
    assert base.temperature == 0.2  # a copy: the defaults stay
    with pytest.raises(TypeError, match="temprature.*valid: max_new_tokens"):
        base.merge(temprature=0.5)
    with pytest.raises(GenerationError, match="temperature must be > 0"):
        base.merge(temperature=0.0)


def test_an_export_of_the_previous_version_reads_with_neutral_new_settings():
    old = json.loads('{"max_new_tokens": 256, "do_sample": true, "temperature": 0.2, "top_p": 0.7, "top_k": 0, '
                     '"num_beams": 1}')
    g = GenerationConfig.from_dict(old)
    assert g == GenerationConfig()
    assert GenerationConfig.from_dict({**old, "do_sample": False, "max_new_tokens": 40}).to_dict() == {
        **GenerationConfig().to_dict(), "do_sample": False, "max_new_tokens": 40}
    with pytest.raises(TypeError, match="beam_width"):
        GenerationConfig.from_dict({**old, "beam_width": 4})


@pytest.mark.parametrize("settings, key, message", [
    ({"max_new_tokens": 0}, "max_new_tokens", "max_new_tokens must be >= 1"),
    ({"min_new_tokens": 300}, "min_new_tokens", "more than max_new_tokens=256"),
    ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1]"),
    ({"top_k": -1}, "top_k", "top_k must be >= 0"),
    ({"top_k": 2.5}, "top_k", "top_k: expected int"),
    ({"do_sample": "yes"}, "do_sample", "do_sample: expected bool"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "repetition_penalty must be > 0"),
    ({"exponential_decay_length_penalty": [5]}, "exponential_decay_length_penalty", "(start, factor)"),
    ({"exponential_decay_length_penalty": [5, 0.5]}, "exponential_decay_length_penalty", "factor >= 1"),
    ({"seed": -1}, "seed", "seed must be >= 0"),
    ({"num_return_sequences": 3, "do_sample": False}, "num_return_sequences", "3 captions per image need sampling"),
    ({"num_beams": 2, "repetition_penalty": 1.3}, "repetition_penalty", "with num_beams=2"),
])
def test_every_rule_names_its_setting_in_one_line(settings, key, message):
    with pytest.raises(GenerationError) as err:
        GenerationConfig().merge(settings)
    assert err.value.key == key and message in str(err.value) and "\n" not in str(err.value)


def test_cross_rules_allow_what_they_should():
    GenerationConfig().merge(num_return_sequences=3)  # sampling
    GenerationConfig().merge(num_return_sequences=3, do_sample=False, num_beams=3)  # beams
    GenerationConfig().merge(num_beams=4, repetition_penalty=1.0, length_penalty=0.5)
    with pytest.raises(GenerationError, match="num_captions=2: 2 captions"):
        GenerationConfig(num_return_sequences=2, do_sample=False).validate(count_key="num_captions")


def test_position_table_is_checked_before_generation(ending):
    """max_new_tokens after the longest prompt must fit the decoder's learned positions (OPT: an IndexError
    deep inside generation otherwise)."""
    model, tok, batch, embeds, alt_ids = ending
    table = causal_lm(model.decoder).config.max_position_embeddings  # 512 in the tiny OPT
    longest = model.mapper.num_tokens + 128  # visual tokens + the layout's max_alt_tokens
    GenerationConfig(max_new_tokens=table - longest).check_positions(max_prompt_tokens=longest,
                                                                     max_position_embeddings=table)
    too_long = GenerationConfig(max_new_tokens=table - longest + 1)
    with pytest.raises(GenerationError, match=f"max_position_embeddings={table}; set max_new_tokens <= "
                                              f"{table - longest}"):
        too_long.check_positions(max_prompt_tokens=longest, max_position_embeddings=table)
    too_long.check_positions(max_prompt_tokens=longest, max_position_embeddings=None)  # no table: no limit


# -- seeded sampling: one stream per caption -------------------------------------------------------------


def test_seeded_sampling_does_not_depend_on_the_batch(ending):
    model, tok, batch, embeds, alt_ids = ending
    g = PLAIN.merge(max_new_tokens=10, do_sample=True, num_return_sequences=2, seed=5)
    keys = [101 + i for i in range(len(alt_ids))]
    together = model.generate(embeds, alt_ids, g, stream_keys=keys)
    reversed_batch = model.generate(embeds.flip(0), alt_ids[::-1], g, stream_keys=keys[::-1])
    assert together == [c for i in reversed(range(len(alt_ids))) for c in reversed_batch[2 * i : 2 * i + 2]]
    alone = [c for i in range(len(alt_ids))
             for c in model.generate(embeds[i : i + 1], alt_ids[i : i + 1], g, stream_keys=keys[i : i + 1])]
    assert together == alone
    assert len(set(map(tuple, together))) > len(alt_ids)  # the two candidates of an image differ
    assert model.generate(embeds, alt_ids, g.merge(seed=6), stream_keys=keys) != together
    state = torch.random.get_rng_state()
    model.generate(embeds, alt_ids, g, stream_keys=keys)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is not used
    beams = PLAIN.merge(max_new_tokens=6, do_sample=True, num_beams=2, seed=5)  # beam sampling: image by image
    assert model.generate(embeds[:3], alt_ids[:3], beams, stream_keys=keys[:3]) == [
        model.generate(embeds[i : i + 1], alt_ids[i : i + 1], beams, stream_keys=keys[i : i + 1])[0] for i in range(3)]
