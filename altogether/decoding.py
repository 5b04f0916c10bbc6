"""KV-cached decoding in which finished captions leave the batch.

Hugging Face ``generate`` keeps every row of a batch until the longest caption ends, so a batch of captions of
30 to 250 tokens computes 250 steps for all of them. Here a row whose caption has ended (EOS) is dropped from
the batch, its cache rows included, once enough rows have ended that copying the cache is worth it: compute
follows the captions' real lengths. Greedy decoding gives the tokens ``generate`` gives; sampling draws from
the same distributions (same logits processors, in Hugging Face's order) with the global random generator, so
``torch.manual_seed`` makes it reproducible.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Drop finished rows once they are at least this fraction of the rows still decoding: fewer cache copies,
# at most this fraction of a step's compute spent on rows that have already ended.
COMPACT_FRACTION = 1 / 8


def logits_processors(*, min_new_tokens: int, eos_id: int, do_sample: bool, temperature: float, top_p: float,
                      top_k: int, repetition_penalty: float, no_repeat_ngram_size: int,
                      exponential_decay_length_penalty: tuple[int, float] | None = None):
    """Hugging Face's processors for these settings, in ``generate``'s order (penalties, then sampling warpers).

    The generated ids are the processors' whole input (the prompt enters as embeddings), so lengths count new
    tokens only.
    """
    from transformers import (ExponentialDecayLengthPenalty, LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                              NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    if min_new_tokens > 0:
        processors.append(MinNewTokensLengthLogitsProcessor(0, min_new_tokens, eos_id))
    if exponential_decay_length_penalty is not None:
        processors.append(ExponentialDecayLengthPenalty(exponential_decay_length_penalty, eos_id, 0))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


@torch.no_grad()
def decode(lm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           eos_id: int, pad_id: int, do_sample: bool = False, processors=None) -> torch.Tensor:
    """Caption token ids ``(rows, max_new_tokens)`` continuing left-padded prompt embeddings.

    ``lm`` is a Hugging Face causal LM. Each row holds its tokens up to and including EOS, then ``pad_id``.
    Position ids follow the attention mask (0 at each row's first real position), as in training.
    """
    from transformers import DynamicCache

    rows = inputs_embeds.shape[0]
    device = inputs_embeds.device
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    alive = torch.arange(rows, device=device)  # the output row of each row still decoding
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
        if do_sample:
            next_ids = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
        else:
            next_ids = scores.argmax(-1)
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
            alive, generated, mask, next_ids, ended = alive[keep], generated[keep], mask[keep], next_ids[keep], ended[keep]
        embeds = lm.get_input_embeddings()(next_ids[:, None])
    return tokens
