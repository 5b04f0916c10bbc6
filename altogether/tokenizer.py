"""Small byte-level BPE tokenizers trained on the fly, for decoders built from a config (demo, tests)."""

from __future__ import annotations

import itertools
import re
from typing import Iterable, Sequence

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000, special_tokens: Sequence[str] = (PAD, EOS, UNK),
                    words: Sequence[str] = ()):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a Hugging Face fast tokenizer.

    Byte-level so that any string (names, codes, prices never seen in training) still tokenizes.
    ``special_tokens`` take the first ids, in order (they must include ``<pad>``, ``</s>`` and ``<unk>``).

    ``words``: when given, merges are learned and applied only inside these words (matched whole, letters and
    digits on neither side, with the space before them if there is one), and every other character is a token
    of its own. Any string outside the vocabulary, such as a made-up name or an id, then splits into
    single-character tokens, the same in every context, which a decoder trained to copy any string has seen
    (a merged piece that only unseen strings contain would be a token it never learned to copy). Each word
    becomes one token when ``vocab_size`` leaves room for its merges (256 bytes + special tokens + merges).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not words)
    if words:
        alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
        pattern = Regex(rf" ?(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])|[\s\S]")
        core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(pattern, "isolated"), byte_level])
        # Every word in both forms, so that each is merged whole even if the texts never wrote it that way.
        texts = itertools.chain(texts, words, [f" {w}" for w in words])
    else:
        core.pre_tokenizer = byte_level
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK)
