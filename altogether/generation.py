"""One generation schema (:class:`GenerationConfig`) and the decoding loop every caption goes through.

:class:`GenerationConfig` holds every decoding setting under its Hugging Face ``generate`` name, plus ``seed``.
Its defaults are the one default set: the paper's Table 10 decoding (sampling, temperature 0.2, top-p 0.7;
top-k off, since the paper names no top-k and Hugging Face's own default of 50 would add a cut it does not
have), a caption budget of 256 new tokens (the paper's caption length) and Hugging Face's neutral values for
the rest. A recipe's ``generation`` block starts from these, the export stores the recipe's values, and every
caller (``Recaptioner``, ``recaption``, ``evaluate``, training's sample captions) merges its overrides onto
the export's settings with :meth:`GenerationConfig.merge`, which validates the result.

:func:`decode` is KV-cached decoding in which finished captions leave the batch. Hugging Face ``generate``
keeps every row of a batch until the longest caption ends, so a batch of captions of 30 to 250 tokens computes
250 steps for all of them. Here a row whose caption has ended (EOS) is dropped from the batch, its cache rows
included, once enough rows have ended that copying the cache is worth it: compute follows the captions' real
lengths. Greedy decoding gives the tokens ``generate`` gives; sampling draws from the same distributions (same
logits processors, in Hugging Face's order).

Seeded sampling draws each caption from a random stream of its own (:func:`stream_seed`), so a caption does not
depend on which other images share its batch, on the batch size, on the order of the data or on the process
that captions it. torch and transformers are imported inside the functions that decode, so that loading a
recipe (``config.py``) stays light.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence, get_type_hints

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import torch
    from torch import nn

# Drop finished rows once they are at least this fraction of the rows still decoding: fewer cache copies,
# at most this fraction of a step's compute spent on rows that have already ended.
COMPACT_FRACTION = 1 / 8


class GenerationError(ValueError):
    """A generation setting is invalid; ``key`` names it (or the first of the settings that conflict)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass
class GenerationConfig:
    """Decoding settings, named as in Hugging Face ``generate``; the defaults are the one default set.

    Lengths count new tokens only (the prompt enters as embeddings). ``top_k=0`` and ``top_p=1`` are off.
    ``num_return_sequences``: captions per image (``Recaptioner.recaption``'s ``num_captions``); more than one
    needs sampling or at least as many beams. ``length_penalty`` applies to beam search.
    ``exponential_decay_length_penalty=[start, factor]``: after ``start`` new tokens EOS's score grows by
    ``factor`` per token (shorter captions without a hard cut). ``seed``: ``None`` samples from torch's global
    generator; an int gives every caption its own stream (:func:`stream_seed`), so sampling is reproducible
    and independent of batching.

    Raises :class:`GenerationError` (a ``ValueError``) from :meth:`validate` and :meth:`merge`.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = True
    temperature: float = 0.2
    top_p: float = 0.7
    top_k: int = 0
    num_beams: int = 1
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    exponential_decay_length_penalty: Optional[List[float]] = None
    seed: Optional[int] = None

    # -- building ------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "GenerationConfig":
        """A validated config from a mapping (an export's ``generation`` block, a recipe's, a DictConfig).

        Keys left out take the defaults above. Exports written before this schema stored only
        ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k`` and ``num_beams``: the rest
        were Hugging Face's neutral values then, as they are here.
        """
        return cls().merge(_plain(values), keep_unset=False)

    def merge(self, overrides: Mapping[str, Any] | None = None, *, keep_unset: bool = True,
              count_key: str = "num_return_sequences", **kwargs: Any) -> "GenerationConfig":
        """A validated copy with ``overrides`` and ``kwargs`` applied; a value of ``None`` keeps this one's.

        ``keep_unset=False`` applies ``None`` too (``seed=None``, ``exponential_decay_length_penalty=None``).
        An unknown name is a ``TypeError`` listing the valid ones; ``count_key``: see :meth:`validate`.
        """
        given = {**_plain(overrides), **kwargs}
        unknown = sorted(set(given) - set(FIELDS))
        if unknown:
            raise TypeError(f"unknown generation setting(s) {', '.join(unknown)}; valid: {', '.join(FIELDS)}")
        changes = {k: v for k, v in given.items() if v is not None or not keep_unset}
        decay = changes.get("exponential_decay_length_penalty")
        if isinstance(decay, tuple):
            changes["exponential_decay_length_penalty"] = list(decay)
        return dataclasses.replace(self, **changes).validate(count_key=count_key)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what an export stores)."""
        return dataclasses.asdict(self)

    # -- checking ------------------------------------------------------------------------------------

    def validate(self, *, count_key: str = "num_return_sequences") -> "GenerationConfig":
        """Check every value and the rules between them; returns ``self``.

        ``count_key`` is the name the caller gave ``num_return_sequences`` (``num_captions``, ``num_candidates``)
        so that the error names what the user typed. Raises :class:`GenerationError`.
        """
        self.check_values(self.to_dict())
        if self.min_new_tokens > self.max_new_tokens:
            raise GenerationError("min_new_tokens", f"min_new_tokens={self.min_new_tokens} is more than "
                                  f"max_new_tokens={self.max_new_tokens}")
        n = self.num_return_sequences
        if n > 1 and not self.do_sample and self.num_beams < n:
            raise GenerationError(count_key, f"{count_key}={n}: {n} captions per image need sampling "
                                  f"(do_sample=true) or num_beams >= {n}; greedy decoding gives one caption per image")
        if self.num_beams > 1 and self.repetition_penalty != 1.0:
            # Hugging Face generate given embeddings skips as many generated tokens as a row has padding when it
            # penalises repeats, so beam captions would change with the batch's padding (and degenerate).
            raise GenerationError("repetition_penalty", f"repetition_penalty={self.repetition_penalty} with "
                                  f"num_beams={self.num_beams}: beam search runs Hugging Face generate, whose "
                                  "penalty depends on the batch's padding; use num_beams=1 or repetition_penalty=1")
        return self

    @staticmethod
    def check_values(values: Mapping[str, Any]) -> None:
        """The rules of each setting alone, for the settings in ``values`` (``None`` allowed: keep). Commands
        check their overrides with this when they enter, before the export's settings are known; the rules
        between settings wait for :meth:`validate`. Raises ``TypeError`` (unknown name) or :class:`GenerationError`.
        """
        for key, value in values.items():
            if key not in TYPES:
                raise TypeError(f"unknown generation setting {key}; valid: {', '.join(FIELDS)}")
            if value is None:
                if key not in OPTIONAL:
                    raise GenerationError(key, f"{key} must be set (None only keeps a value when merging)")
                continue
            _check_type(key, value, TYPES[key])
            if key in RULES and not RULES[key][0](value):
                raise GenerationError(key, f"{key} {RULES[key][1]}, got {value!r}")

    def check_positions(self, *, max_prompt_tokens: int, max_position_embeddings: int | None) -> None:
        """Refuse a ``max_new_tokens`` that the decoder's position table cannot hold after the longest prompt.

        ``max_prompt_tokens``: visual tokens + the layout's ``max_alt_tokens`` + its ``prompt_end``'s.
        ``max_position_embeddings``: the decoder config's (``None``: no fixed table, nothing to check). A decoder
        with learned positions (OPT) fails with an ``IndexError`` deep inside generation otherwise. Raises
        :class:`GenerationError`.
        """
        if max_position_embeddings is None:
            return
        if max_prompt_tokens + self.max_new_tokens > max_position_embeddings:
            room = max_position_embeddings - max_prompt_tokens
            raise GenerationError("max_new_tokens", (
                f"max_new_tokens={self.max_new_tokens} does not fit the decoder: the longest prompt "
                f"({max_prompt_tokens} tokens: visual + max_alt_tokens + prompt_end) plus the new tokens would "
                f"need {max_prompt_tokens + self.max_new_tokens} positions, but max_position_embeddings="
                f"{max_position_embeddings}; set max_new_tokens <= {room}"))

    def logits_processors(self, eos_id: int):
        """Hugging Face's processors for these settings, in ``generate``'s order (penalties, then sampling
        warpers). The generated ids are the processors' whole input (the prompt enters as embeddings), so
        lengths count new tokens only."""
        from transformers import (ExponentialDecayLengthPenalty, LogitsProcessorList,
                                  MinNewTokensLengthLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                  RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                                  TopPLogitsWarper)

        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.no_repeat_ngram_size > 0:
            processors.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        if self.min_new_tokens > 0:
            processors.append(MinNewTokensLengthLogitsProcessor(0, self.min_new_tokens, eos_id))
        if self.exponential_decay_length_penalty is not None:
            processors.append(ExponentialDecayLengthPenalty(self.length_decay, eos_id, 0))
        if self.do_sample:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors

    @property
    def length_decay(self) -> tuple[int, float] | None:
        """``exponential_decay_length_penalty`` as Hugging Face takes it: ``(start, factor)``."""
        decay = self.exponential_decay_length_penalty
        return None if decay is None else (int(decay[0]), float(decay[1]))


FIELDS = tuple(f.name for f in fields(GenerationConfig))
OPTIONAL = ("exponential_decay_length_penalty", "seed")
TYPES = {"max_new_tokens": int, "min_new_tokens": int, "do_sample": bool, "temperature": float, "top_p": float,
         "top_k": int, "num_beams": int, "num_return_sequences": int, "repetition_penalty": float,
         "no_repeat_ngram_size": int, "length_penalty": float, "exponential_decay_length_penalty": list,
         "seed": int}
RULES = {
    "max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
    "min_new_tokens": (lambda v: v >= 0, "must be >= 0"),
    "temperature": (lambda v: v > 0, "must be > 0"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 is off)"),
    "num_beams": (lambda v: v >= 1, "must be >= 1"),
    "num_return_sequences": (lambda v: v >= 1, "must be >= 1"),
    "repetition_penalty": (lambda v: v > 0, "must be > 0 (1 is off)"),
    "no_repeat_ngram_size": (lambda v: v >= 0, "must be >= 0 (0 is off)"),
    "exponential_decay_length_penalty": (
        lambda v: len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        and int(v[0]) == v[0] and v[0] >= 0 and v[1] >= 1,
        "must be (start, factor) with a whole start >= 0 and a factor >= 1"),
    "seed": (lambda v: v >= 0, "must be >= 0"),
}


# Captions per image are a command's own settings (num_captions, num_candidates), not a generation key there.
_COMMAND_KEYS = tuple(k for k in FIELDS if k != "num_return_sequences")


def _overrides_schema() -> type:
    hints = get_type_hints(GenerationConfig)
    schema = dataclasses.make_dataclass(
        "GenerationOverrides", [(k, Optional[hints[k]], field(default=None)) for k in _COMMAND_KEYS])
    schema.__module__ = __name__  # picklable, like a class written here
    schema.__doc__ = ("The ``key=value`` generation settings of a command, every :class:`GenerationConfig` "
                      "field but ``num_return_sequences``, ``None`` by default (keep the export's value).")
    return schema


def given(settings: Any) -> dict[str, Any]:
    """The generation settings of a command's settings object that were set (not ``None``)."""
    return {k: getattr(settings, k) for k in _COMMAND_KEYS if getattr(settings, k, None) is not None}


# Derived from GenerationConfig, so a new setting reaches every command by being added there alone.
GenerationOverrides = _overrides_schema()


def max_positions(decoder_config: Any) -> int | None:
    """The length of a Hugging Face decoder config's position table (``None``: it has none)."""
    return getattr(decoder_config, "max_position_embeddings", None)


def stream_seed(seed: int, key: int, candidate: int = 0) -> int:
    """The seed of one caption's random stream: a hash of the run's ``seed``, the image's ``key`` (what
    ``Recaptioner``'s prepare step computes from the image and prompt) and the candidate's number."""
    digest = hashlib.blake2b(f"{seed}:{key}:{candidate}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch generator takes it


def _plain(values: Any) -> dict[str, Any]:
    if values is None:
        return {}
    if isinstance(values, DictConfig):
        return OmegaConf.to_container(values, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(values):
        return dataclasses.asdict(values)
    if isinstance(values, Mapping):
        return dict(values)
    raise TypeError(f"generation settings must be a mapping, got {type(values).__name__}")


def _check_type(key: str, value: Any, kind: type) -> None:
    numbers = (int, float) if kind is float else (kind,)
    if kind is list:
        numbers = (list, tuple)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, numbers):
        raise GenerationError(key, f"{key}: expected {'a list' if kind is list else kind.__name__}, "
                                   f"got {type(value).__name__} {value!r}")


# ---------------------------------------------------------------------------------------------------------
# The decoding loop
# ---------------------------------------------------------------------------------------------------------


def decode(lm: "nn.Module", inputs_embeds: "torch.Tensor", attention_mask: "torch.Tensor", *, max_new_tokens: int,
           eos_id: int, pad_id: int, do_sample: bool = False, processors=None,
           generators: Sequence["torch.Generator"] | None = None) -> "torch.Tensor":
    """Caption token ids ``(rows, max_new_tokens)`` continuing left-padded prompt embeddings ``(rows, L, d)``.

    ``lm`` is a Hugging Face causal LM. Each row holds its tokens up to and including EOS, then ``pad_id``.
    Position ids follow the attention mask (0 at each row's first real position), as in training. Sampling
    draws from torch's global generator, or with ``generators`` (one per row) from each row's own: the
    exponential race, ``argmax(p / E)`` with ``E ~ Exp(1)`` per token, picks token ``i`` with probability
    ``p_i`` and needs noise from the row's generator only.
    """
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        rows = inputs_embeds.shape[0]
        device = inputs_embeds.device
        tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        alive = torch.arange(rows, device=device)  # the output row of each row still decoding
        alive_rows = list(range(rows))  # the same on the host, to pick the rows' generators
        generated = torch.empty((rows, 0), dtype=torch.long, device=device)  # what the processors see
        ended = torch.zeros(rows, dtype=torch.bool, device=device)
        mask = attention_mask.long()
        cache = DynamicCache(config=lm.config)
        embeds = inputs_embeds
        for step in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1]:]
            out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=True, logits_to_keep=1)
            scores = out.logits[:, -1].float()
            if processors:
                scores = processors(generated, scores)
            if not do_sample:
                next_ids = scores.argmax(-1)
            elif generators is None:
                next_ids = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
            else:
                noise = torch.stack([torch.empty(scores.shape[1], device=device).exponential_(generator=generators[r])
                                     for r in alive_rows])
                next_ids = (scores.softmax(-1) / noise).argmax(-1)
            next_ids = torch.where(ended, pad_id, next_ids)
            tokens[alive, step] = next_ids
            ended |= next_ids == eos_id
            finished = int(ended.sum())  # the one host read per step, as in any decoding loop's stopping test
            if finished == len(alive) or step + 1 == max_new_tokens:
                break
            generated = torch.cat([generated, next_ids[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            if finished >= max(1, math.ceil(len(alive) * COMPACT_FRACTION)):
                keep = (~ended).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                alive_rows = [alive_rows[i] for i in keep.tolist()]
                alive, generated, mask, next_ids, ended = alive[keep], generated[keep], mask[keep], next_ids[keep], ended[keep]
            embeds = lm.get_input_embeddings()(next_ids[:, None])
    return tokens
