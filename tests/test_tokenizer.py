"""The small byte-level tokenizers the demo and tests train, through the folder a decoder config names."""

import pytest

from altogether.config import DecoderConfig
from altogether.model import load_tokenizer
from altogether.tiny import write_tokenizer

WORDS = ("A", "photo", "of", "a", "red", "square", "code", "SKU", "IMG", "jpg", "sale")
TEXTS = ["A photo of Velora K-27: a red square.", "SKU 27-KOBA | IMG_2231.jpg | sale", "A photo of a red square."]


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    folder = write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", TEXTS * 20, vocab_size=600, words=WORDS)
    return load_tokenizer(DecoderConfig(tokenizer=str(folder)))


def _pieces(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_words_are_single_tokens_with_or_without_their_space(word_tokenizer):
    assert _pieces(word_tokenizer, "A photo of a red square") == ["A", "Ġphoto", "Ġof", "Ġa", "Ġred", "Ġsquare"]
    assert _pieces(word_tokenizer, "sale | IMG_1.jpg") == ["sale", "Ġ", "|", "ĠIMG", "_", "1", ".", "jpg"]


@pytest.mark.parametrize("fact", ["Pyxwen TJ349", "gnomibgno x8917", "NPTYR005", "x-redo", "Redo", "saleA"])
def test_any_other_string_splits_into_its_characters_the_same_in_every_context(word_tokenizer, fact):
    # The alt-text holds a fact at its start, after a key, or after a separator; the caption after "of" or
    # "code": the fact's own tokens must be the same everywhere for a decoder to copy them.
    spellings = {
        tuple(_pieces(word_tokenizer, context.format(fact))[-len(fact):])
        for context in ("{}", "SKU {}", "sale | {}", "A photo of {}", "A photo of Velora, code {}")
    }
    assert spellings == {tuple(fact.replace(" ", "Ġ"))}
    for context in ("{}", "SKU {} | sale", "A photo of {}: a red square."):
        text = context.format(fact)
        assert word_tokenizer.decode(word_tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_without_words_merges_run_across_any_string(tmp_path):
    folder = write_tokenizer(tmp_path / "tokenizer", TEXTS * 20, vocab_size=400)
    tokenizer = load_tokenizer(DecoderConfig(tokenizer=str(folder)))
    # Merged pieces learned from the texts also cut up an unseen string, differently with a space before it.
    assert len(_pieces(tokenizer, "Velora")) < len("Velora")
    assert _pieces(tokenizer, "Velora")[0] != _pieces(tokenizer, " Velora")[0]
