import random

import pytest
import torch

from altogether.layout import IGNORE_INDEX, SampleTokens, build_prompt, collate, tokenize_sample, training_pair


class CharTokenizer:
    """One token per character (id = ord), EOS 1: budgets and positions can be checked by counting."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


def test_prompt_rule_joins_clean_unique_alt_texts_in_order():
    assert build_prompt(["  b  x", "", "a", "b x", "a "]) == "b x; a"
    assert build_prompt("one") == "one"
    assert build_prompt(None) == "" and build_prompt([]) == ""
    with pytest.raises(TypeError, match="alt-text must be a string"):
        build_prompt(["ok", 3])


def test_pretrain_target_is_longest_alt_text_and_prompt_the_others():
    rng = random.Random(0)
    prompt, target = training_pair(["short", "the longest one", "mid one"], None, task="pretrain",
                                   prompt_dropout=0.0, rng=rng)
    assert (prompt, target) == ("short; mid one", "the longest one")
    assert training_pair("only", None, task="pretrain", prompt_dropout=0.0, rng=rng) == ("", "only")


def test_prompt_dropout_rate_and_target_without_alt():
    rng = random.Random(1)
    pairs = [training_pair("alt", "cap", task="finetune", prompt_dropout=0.5, rng=rng, target_without_alt="plain")
             for _ in range(4000)]
    dropped = sum(p == ("", "plain") for p in pairs)
    assert all(p in (("", "plain"), ("alt", "cap")) for p in pairs)
    assert abs(dropped / 4000 - 0.5) < 0.03  # 4 sigma of a fair coin over 4000 draws
    with pytest.raises(ValueError, match="non-empty target"):
        training_pair("alt", " ", task="finetune", prompt_dropout=0.0, rng=rng)


def test_budgets_alt_kept_first_tokens_caption_truncated_without_eos():
    tok = CharTokenizer()
    s = tokenize_sample(tok, "abcdef", "xyz", max_alt_tokens=4, max_caption_tokens=8)
    assert s.alt_ids == [ord(c) for c in "abcd"] and s.caption_ids == [ord(c) for c in "xyz"] + [1]
    assert not s.caption_truncated
    fits = tokenize_sample(tok, "", "x" * 7, max_alt_tokens=4, max_caption_tokens=8)
    assert fits.caption_ids[-1] == 1 and len(fits.caption_ids) == 8 and not fits.caption_truncated
    long = tokenize_sample(tok, "", "x" * 20, max_alt_tokens=4, max_caption_tokens=8)
    assert long.caption_truncated and long.caption_ids == [ord("x")] * 8  # trained on, no EOS


def test_prompt_end_follows_the_kept_prompt_is_never_cut_and_never_trained_on():
    tok = CharTokenizer()
    end = [ord(" "), ord("#")]
    s = tokenize_sample(tok, "abcdef", "xyz", max_alt_tokens=4, max_caption_tokens=8, prompt_end=" #")
    assert s.alt_ids == [ord(c) for c in "abcd"] + end and s.caption_ids == [ord(c) for c in "xyz"] + [1]
    dropped = tokenize_sample(tok, "", "xyz", max_alt_tokens=4, max_caption_tokens=8, prompt_end=" #")
    assert dropped.alt_ids == end  # a dropped prompt still marks where the caption begins
    assert tokenize_sample(tok, "ab", None, max_alt_tokens=4, max_caption_tokens=8, prompt_end=" #").alt_ids == \
        [ord("a"), ord("b")] + end  # the generation prompt ends the same way
    batch = collate([s], num_visual_tokens=2, pad_id=0)
    assert batch["labels"][0, :8].tolist() == [IGNORE_INDEX] * 8  # visual, prompt and its end: no loss
    assert batch["labels"][0, 8:].tolist() == s.caption_ids


def test_collate_right_padding_masks_labels_positions():
    a = SampleTokens([10, 11], [20, 21, 1])
    b = SampleTokens([], [30, 1])
    batch = collate([a, b], num_visual_tokens=3, pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 0, 10, 11, 20, 21, 1], [0, 0, 0, 30, 1, 0, 0, 0]]
    assert batch["visual_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 5 + [0] * 3]
    assert batch["position_ids"].tolist() == [list(range(8)), [0, 1, 2, 3, 4, 0, 0, 0]]
    i = IGNORE_INDEX
    assert batch["labels"].tolist() == [[i, i, i, i, i, 20, 21, 1], [i, i, i, 30, 1, i, i, i]]
    # Flat gather indices (row * 8 + column): visual positions, and positions whose next label is trained.
    assert batch["visual_index"].tolist() == [0, 1, 2, 8, 9, 10]
    assert batch["predict_index"].tolist() == [4, 5, 6, 10, 11]
    wide = collate([a, b], num_visual_tokens=3, pad_id=0, width=12)
    assert wide["input_ids"].shape == (2, 12) and wide["predict_index"].tolist() == [4, 5, 6, 14, 15]
    assert wide["attention_mask"][:, 8:].sum() == 0


def test_sequence_runs_are_flash_attention_varlen_arguments():
    from altogether.layout import sequence_runs

    # Row 0: two packed samples then padding; row 1: one sample filling the row.
    cu, longest = sequence_runs(torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 12] and longest == 6


def test_collate_left_padding_puts_prompt_ends_in_last_column():
    batch = collate([SampleTokens([5, 6, 7], []), SampleTokens([8], [])], num_visual_tokens=2, pad_id=0,
                    padding_side="left")
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6, 7], [0, 0, 0, 0, 8]]
    assert batch["visual_mask"].tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert (batch["labels"] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="padding_side"):
        collate([], num_visual_tokens=1, pad_id=0, padding_side="middle")


def test_pack_rows_uses_few_balanced_rows_and_keeps_every_sample():
    from altogether.layout import pack_rows

    rng = random.Random(0)
    lengths = [rng.randint(40, 130) for _ in range(32)]
    rows = pack_rows(lengths, 1024)
    assert sorted(i for row in rows for i in row) == list(range(32))
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert max(fills) <= 1024 and len(rows) == -(-sum(lengths) // 1024)
    assert sum(lengths) / (len(rows) * max(fills)) > 0.95  # balanced: little padding to the longest row
    assert pack_rows([2000, 10], 1024) == [[0], [1]]  # an over-long sample gets a row of its own


def test_every_key_the_layout_writes_is_in_the_batch_contract():
    """collate, collate_packed and collate_training/collate_group write only keys :class:`Batch` documents."""
    from altogether.data.datamodule import collate_group
    from altogether.layout import Batch, collate_packed

    samples = [SampleTokens([5, 6], [7, 2]), SampleTokens([5], [8, 9, 2]), SampleTokens([], [2])]
    items = [{"tokens": s, "image_embeds": torch.randn(8)} for s in samples] + [{"skip_reason": "bad jpeg"}]
    batches = [collate(samples, num_visual_tokens=2, pad_id=1),
               collate_packed(samples, num_visual_tokens=2, pad_id=1, max_tokens=16),
               *collate_group(items, micro_batch_size=2, num_visual_tokens=2, pad_id=1, pack_tokens=16)]
    documented = set(Batch.__annotations__)
    for batch in batches:
        assert set(batch) <= documented, set(batch) - documented
    assert {"segment_ids", "cu_seq_lens", "image_embeds", "num_tokens", "micro_index"} <= set(batches[-1])
