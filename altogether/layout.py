"""The prompt rule and the token layout, shared by training, generation, recaptioning and evaluation.

A sample is laid out as ``[visual tokens][alt-text tokens][prompt-end tokens][caption tokens, EOS]``:

* the visual positions are filled by the mapper's output inside the model (``visual_mask`` marks them);
* the alt-text keeps its first ``max_alt_tokens`` tokens, then come the tokens of ``prompt_end`` (none by default),
  which mark where the caption begins;
* the caption and its EOS share a budget of ``max_caption_tokens`` positions (40 + 128 + 256 = 424 positions
  in the paper). A caption longer than the budget keeps its first ``max_caption_tokens`` tokens and is still
  trained on, without an EOS since it did not end there.

Labels are ``-100`` everywhere except caption and EOS positions, unshifted (Hugging Face convention: the
position holding a caption token is labelled with that token; the loss shifts by one). Position ids restart
at 0 at each sample's first real position, so padding never changes what a sample computes.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, TypedDict

import torch

IGNORE_INDEX = -100


class Batch(TypedDict, total=False):
    """The batch contract between the layout (:func:`collate`, :func:`collate_packed`,
    :func:`altogether.data.datamodule.collate_training`) and :class:`altogether.model.AltogetherModel`.

    ``rows`` is the batch's row count (one sample per row, or several when packed), ``width`` its positions per
    row, ``images`` the number of samples (= rows unless packed), ``V`` the mapper's ``num_visual_tokens``.
    Flat indices count row-major over ``(rows, width)``.
    """

    # from collate / collate_packed
    input_ids: torch.Tensor  # (rows, width) long; alt-text + caption + EOS ids, pad_id at visual and padding positions
    visual_mask: torch.Tensor  # (rows, width) bool; True where the mapper's visual tokens go
    attention_mask: torch.Tensor  # (rows, width) long; 1 at a sample's positions, 0 at padding
    position_ids: torch.Tensor  # (rows, width) long; 0, 1, ... from each sample's first position, 0 at padding
    labels: torch.Tensor  # (rows, width) long; caption + EOS ids at their own positions (unshifted), else IGNORE_INDEX
    visual_index: torch.Tensor  # (images * V,) long; flat positions of the visual tokens, in sample order
    predict_index: torch.Tensor  # (num_tokens,) long; flat positions whose next label is a caption token or EOS
    segment_ids: torch.Tensor  # (rows, width) long, packed only; 1, 2, ... per sample within its row, 0 at padding
    order: torch.Tensor  # (images,) long, packed only; sample index of each packed sample (collate_training pops it)
    # added by collate_training
    cu_seq_lens: torch.Tensor  # (runs + 1,) int32; cumulative lengths of flattened runs (flash-attention varlen)
    max_seq_len: int  # longest run
    pixel_values: torch.Tensor  # (images, 3, H, W) float; the encoder transform's output, in layout order
    image_embeds: torch.Tensor  # (images, embed_dim) float; cached L2-normalised encoder output, instead of pixels
    num_tokens: int  # caption + EOS tokens the loss averages over (= len(predict_index))
    num_skipped: int  # samples of the micro-batch dropped as unreadable
    skip_reasons: list[str]  # the first few reasons
    num_truncated: int  # captions cut to the caption budget
    # added by collate_group: the optimizer step this micro-batch belongs to
    group_size: int  # micro-batches in the step
    group_tokens: int  # caption + EOS tokens over the whole step (the loss is normalised by this)
    group_samples: int
    group_skipped: int
    micro_index: int


def clean_alt_texts(alt_texts: str | Sequence[str] | None) -> list[str]:
    """Alt-texts as a list: whitespace collapsed, empty ones dropped, duplicates removed keeping the first.

    ``None`` and NaN (pandas' mark of a missing value) are no alt-text. Anything else that is not a string or a
    list of strings raises TypeError: a number is not taken as text silently.
    """
    if _missing(alt_texts):
        return []
    if isinstance(alt_texts, str):
        alt_texts = [alt_texts]
    elif not isinstance(alt_texts, (list, tuple)):
        raise TypeError(f"alt-text must be a string, a list of strings or None, got {type(alt_texts).__name__}: "
                        f"{alt_texts!r}" + (" (pass str(...) if the number is the alt-text)"
                                            if isinstance(alt_texts, (int, float)) else ""))
    seen: dict[str, None] = {}
    for text in alt_texts:
        if _missing(text):
            continue
        if not isinstance(text, str):
            raise TypeError(f"alt-text must be a string, got {type(text).__name__}: {text!r}")
        text = " ".join(text.split())
        if text:
            seen.setdefault(text, None)
    return list(seen)


def _missing(value: Any) -> bool:
    return value is None or isinstance(value, float) and value != value


def build_prompt(alt_texts: str | Sequence[str] | None, separator: str = "; ") -> str:
    """The one rule that turns a sample's alt-texts into the prompt, in training and at inference.

    Several alt-texts are joined with ``separator`` in their given order after :func:`clean_alt_texts`
    (order is kept so the same record always gives the same prompt); ``None`` or no text gives ``""``.
    """
    return separator.join(clean_alt_texts(alt_texts))


def training_pair(
    alt_texts: str | Sequence[str] | None,
    target: str | None,
    *,
    task: str,
    prompt_dropout: float,
    rng: random.Random,
    separator: str = "; ",
    target_without_alt: str | None = None,
) -> tuple[str, str]:
    """(prompt, target) of one training sample.

    ``pretrain``: the target is the longest alt-text and the prompt is built from the others ("" when there is
    only one). ``finetune``: the target is the annotated caption and the prompt is built from all alt-texts.
    With probability ``prompt_dropout`` the prompt becomes "" (captioning from scratch); the target then becomes
    ``target_without_alt`` when the record has one.
    """
    texts = clean_alt_texts(alt_texts)
    if task == "pretrain":
        if not texts:
            raise ValueError("a pretraining record needs at least one non-empty alt-text")
        longest = max(range(len(texts)), key=lambda i: (len(texts[i]), -i))
        target = texts[longest]
        prompt = separator.join(texts[:longest] + texts[longest + 1 :])
    elif task == "finetune":
        if not target or not target.strip():
            raise ValueError("a finetuning record needs a non-empty target caption")
        prompt = separator.join(texts)
    else:
        raise ValueError(f"unknown task {task!r}; expected 'pretrain' or 'finetune'")
    if prompt_dropout > 0 and rng.random() < prompt_dropout:
        return "", target_without_alt or target
    return prompt, target


@dataclass(frozen=True)
class SampleTokens:
    """Token ids of one sample before collation; ``caption_ids`` is empty at inference."""

    alt_ids: list[int]
    caption_ids: list[int]
    caption_truncated: bool = False


def tokenize_sample(
    tokenizer,
    prompt: str,
    caption: str | None,
    *,
    max_alt_tokens: int,
    max_caption_tokens: int,
    prompt_end: str = "",
) -> SampleTokens:
    """Tokenize prompt, ``prompt_end`` and caption separately, without special tokens, and apply the budgets.

    ``alt_ids`` holds the prompt's first ``max_alt_tokens`` tokens followed by all of ``prompt_end``'s, so the
    mark of where the caption begins survives truncation."""
    alt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][:max_alt_tokens] if prompt else []
    if prompt_end:
        alt_ids += tokenizer(prompt_end, add_special_tokens=False)["input_ids"]
    if caption is None:
        return SampleTokens(alt_ids, [])
    caption_ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
    if len(caption_ids) + 1 <= max_caption_tokens:
        return SampleTokens(alt_ids, caption_ids + [tokenizer.eos_token_id])
    return SampleTokens(alt_ids, caption_ids[:max_caption_tokens], caption_truncated=True)


def collate(
    samples: Sequence[SampleTokens],
    *,
    num_visual_tokens: int,
    pad_id: int,
    padding_side: str = "right",
    width: int | None = None,
) -> Batch:
    """Pad samples into one batch, as wide as its longest sample or ``width`` if that is more.

    Training pads on the right; generation pads on the left so every prompt ends at the last column.
    Returns ``input_ids`` (visual positions hold ``pad_id``), ``visual_mask``, ``attention_mask``,
    ``position_ids`` and ``labels``, all of shape ``(batch, length)``, and the gather indices of
    :func:`gather_indices`.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [num_visual_tokens + len(s.alt_ids) + len(s.caption_ids) for s in samples]
    width = max(lengths + [width or 0])
    shape = (len(samples), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    visual_mask = torch.zeros(shape, dtype=torch.bool)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for row, (s, n) in enumerate(zip(samples, lengths)):
        start = width - n if padding_side == "left" else 0
        text_start = start + num_visual_tokens
        caption_start = text_start + len(s.alt_ids)
        visual_mask[row, start:text_start] = True
        attention_mask[row, start : start + n] = 1
        input_ids[row, text_start : start + n] = torch.tensor(s.alt_ids + s.caption_ids, dtype=torch.long)
        labels[row, caption_start : start + n] = torch.tensor(s.caption_ids, dtype=torch.long)
    return gather_indices(Batch(
        input_ids=input_ids,
        visual_mask=visual_mask,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        labels=labels,
    ))


def gather_indices(batch: Batch) -> Batch:
    """Add the flat positions the model gathers from, computed here on the host.

    ``visual_index``: where the visual tokens go, row-major; ``predict_index``: positions whose next label is
    a caption token or EOS (where the LM head runs). Deriving them from the masks on a GPU (boolean indexing,
    ``nonzero``) would make the host wait for the device in every training step.
    """
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    batch["visual_index"] = batch["visual_mask"].flatten().nonzero().squeeze(1)
    batch["predict_index"] = predicts.flatten().nonzero().squeeze(1)
    return batch


def sequence_runs(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative lengths of the runs of one sample (or of padding) in the flattened batch, and the longest.

    These are flash-attention's variable-length arguments (``cu_seqlens``, ``max_seqlen``); given to it, it
    does not infer them from the position ids on the device. A padding run is one sequence of its own.
    """
    counts = [n for row in segment_ids for n in torch.unique_consecutive(row, return_counts=True)[1].tolist()]
    return torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32), max(counts)


def pack_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group samples into as few rows of at most ``max_tokens`` positions as first-fit allows, balanced.

    The row count comes from first-fit decreasing; samples are then dealt longest first to the emptiest row
    that still has room, so rows end up nearly equal and the batch (padded to its longest row) wastes little.
    A sample longer than ``max_tokens`` gets a row of its own. Returns sample indices per row.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    fill: list[int] = []
    for i in order:  # first-fit decreasing: how many rows are needed
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= max_tokens), None)
        if row is None:
            fill.append(lengths[i])
        else:
            fill[row] += lengths[i]
    rows: list[list[int]] = [[] for _ in fill]
    used = [0] * len(fill)
    for i in order:
        fits = [r for r in range(len(rows)) if used[r] + lengths[i] <= max_tokens or used[r] == 0]
        if not fits:
            rows.append([])
            used.append(0)
            fits = [len(rows) - 1]
        row = min(fits, key=lambda r: used[r])
        rows[row].append(i)
        used[row] += lengths[i]
    return rows


def collate_packed(
    samples: Sequence[SampleTokens],
    *,
    num_visual_tokens: int,
    pad_id: int,
    max_tokens: int,
) -> Batch:
    """Pack several samples per row so that computed positions are mostly real tokens.

    Each sample keeps exactly its unpacked layout: its own position ids from 0, its own labels, and attention
    only inside itself (``segment_ids`` numbers the samples of a row from 1; 0 is padding; the model turns them
    into a block-diagonal causal mask). Every sample starts with visual positions labelled ``-100``, so no
    sample is trained to predict the next one. ``order`` gives the sample index of each packed sample in
    row-major order: images and embeddings must be stacked in that order.
    """
    lengths = [num_visual_tokens + len(s.alt_ids) + len(s.caption_ids) for s in samples]
    rows = pack_rows(lengths, max_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    visual_mask = torch.zeros(shape, dtype=torch.bool)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    order: list[int] = []
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row, start=1):
            s, n = samples[i], lengths[i]
            text_start = start + num_visual_tokens
            visual_mask[r, start:text_start] = True
            input_ids[r, text_start : start + n] = torch.tensor(s.alt_ids + s.caption_ids, dtype=torch.long)
            labels[r, text_start + len(s.alt_ids) : start + n] = torch.tensor(s.caption_ids, dtype=torch.long)
            segment_ids[r, start : start + n] = segment
            position_ids[r, start : start + n] = torch.arange(n)
            order.append(i)
            start += n
    return gather_indices(Batch(
        input_ids=input_ids,
        visual_mask=visual_mask,
        attention_mask=(segment_ids > 0).long(),
        segment_ids=segment_ids,
        position_ids=position_ids,
        labels=labels,
        order=torch.tensor(order, dtype=torch.long),
    ))


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, L, L) boolean mask: a position attends to earlier positions of its own sample only.

    Padding rows attend to themselves so that no softmax runs over an empty set.
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    real = (segment_ids > 0).unsqueeze(1)
    mask = same & causal & real
    mask |= torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    return mask.unsqueeze(1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... from each row's first attended position; padding gets 0 (never attended)."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


def count_truncated(samples: Iterable[SampleTokens]) -> int:
    """How many samples had their caption cut to the budget."""
    return sum(s.caption_truncated for s in samples)
