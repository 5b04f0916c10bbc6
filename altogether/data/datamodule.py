"""From records to laid-out training batches: sampling, prompt rule, image transform, tokenization, collation.

Map-style sources are read through :class:`ResumableSampler`, an endless, seeded stream of record indices
(a fresh permutation every pass) that each rank strides through. A sample's prompt dropout is drawn from its
position in that stream, so a resumed run sees exactly the samples and prompts it would have seen.
Unreadable records are skipped inside the worker and counted in the batch (``num_skipped``, with the first
reasons in ``skip_reasons``).

Training batches come one optimizer step at a time: the loader collates a rank's whole accumulation group
(``micro_batch_size * accumulate`` samples) into its micro-batches, and each micro-batch carries the group's
totals (``group_tokens``: caption + EOS tokens, ``group_samples``, ``group_skipped``), known on the host before
the step's first forward, so that the loss can be the mean over every caption token of the step.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from ..layout import (Batch, SampleTokens, collate, collate_packed, count_truncated, sequence_runs, tokenize_sample,
                      training_pair)
from .images import load_image
from .readers import (DamagedShard, Fields, TableSource, detect_format, expand_shards, iter_tar_samples,
                      webdataset_sample_to_record)
from .records import BadRecord, Record

log = logging.getLogger(__name__)


class ResumableSampler(Sampler):
    """Endless stream of ``(sample_number, record_index)`` for one rank, starting at ``start``.

    Pass ``e`` over the data uses permutation ``e`` of a generator seeded with ``(seed, e)``; rank ``r`` of
    ``w`` takes global positions ``r, r + w, r + 2w, ...``.
    """

    def __init__(self, num_records: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if num_records < 1:
            raise ValueError("no training records")
        self.n, self.seed, self.rank, self.world, self.start = num_records, seed, rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        k = self.start
        epoch, order = -1, None
        while True:
            g = k * self.world + self.rank
            e, pos = divmod(g, self.n)
            if e != epoch:
                epoch = e
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            yield g, int(order[pos])
            k += 1


class SampleBuilder:
    """Record -> (pixels, tokens): the one path from a record to model inputs during training."""

    def __init__(self, tokenizer, transform: Callable | None, *, task: str, layout, seed: int):
        self.tokenizer = tokenizer
        self.transform = transform
        self.task = task
        self.layout = layout
        self.seed = seed
        self.dropout = layout.prompt_dropout

    def __call__(self, record: Record, sample_number: int) -> dict[str, Any]:
        rng = random.Random(self.seed * 1_000_003 + sample_number)
        prompt, target = training_pair(
            record.alt_texts,
            record.target,
            task=self.task,
            prompt_dropout=self.dropout,
            rng=rng,
            separator=self.layout.alt_separator,
            target_without_alt=record.target_without_alt,
        )
        tokens = tokenize_sample(
            self.tokenizer,
            prompt,
            target,
            max_alt_tokens=self.layout.max_alt_tokens,
            max_caption_tokens=self.layout.max_caption_tokens,
            prompt_end=self.layout.prompt_end,
        )
        item: dict[str, Any] = {"tokens": tokens, "key": record.key}
        if "image_embeds" in record.extra:
            item["image_embeds"] = torch.as_tensor(record.extra["image_embeds"], dtype=torch.float32)
        else:
            item["pixel_values"] = self.transform(load_image(record.image, key=record.key))
        return item

    def safe(self, record_or_error: Record | Exception, sample_number: int) -> dict[str, Any]:
        """Like ``__call__`` but a bad record becomes ``{"skip_reason": ...}`` (skipped and counted by the collator)."""
        if isinstance(record_or_error, Exception):
            reason = str(record_or_error)
        else:
            try:
                return self(record_or_error, sample_number)
            except (BadRecord, ValueError) as err:
                key = record_or_error.key
                reason = str(err) if repr(key) in str(err) else f"record {key!r}: {err}"
        log.debug("skipping bad record: %s", reason)
        return {"skip_reason": reason}


class MapTrainingDataset(Dataset):
    """Reads ``source[record_index]`` for indices produced by :class:`ResumableSampler`."""

    def __init__(self, source: Sequence[Record], builder: SampleBuilder):
        self.source, self.builder = source, builder

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: tuple[int, int]) -> dict[str, Any]:
        sample_number, record_index = index
        try:
            record: Record | Exception = self.source[record_index]
        except BadRecord as err:
            record = err
        return self.builder.safe(record, sample_number)


class FixedDataset(Dataset):
    """Validation: each record once, with a prompt drawn from its index so the loss is comparable over time."""

    def __init__(self, source: Sequence[Record], builder: SampleBuilder):
        self.source, self.builder = source, builder

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            record: Record | Exception = self.source[index]
        except BadRecord as err:
            record = err
        return self.builder.safe(record, index)


class WebdatasetTrainingStream(IterableDataset):
    """Endless stream from tar shards: shards split over ranks and workers, reshuffled each pass, then a
    shuffle buffer. Resumption restarts the stream (not sample-exact, unlike table sources)."""

    def __init__(self, pattern: str, fields: Fields, builder: SampleBuilder, *, rank: int, world_size: int,
                 seed: int, buffer: int, cache=None):
        self.shards = expand_shards(pattern)
        self.fields, self.builder, self.cache = fields, builder, cache
        self.rank, self.world, self.seed, self.buffer = rank, world_size, seed, buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers
        rng = random.Random(self.seed * 7919 + slot)
        buffer: list[Record | Exception] = []
        count, epoch = 0, 0
        while True:
            shards = self.shards[:]
            random.Random(self.seed + epoch).shuffle(shards)
            mine = shards[slot::slots] or shards[slot % len(shards) :: len(shards)]
            for shard in mine:
                try:
                    for sample in iter_tar_samples(shard):
                        try:
                            record = webdataset_sample_to_record(sample, self.fields)
                            buffer.append(record if self.cache is None else self.cache.attach(record))
                        except BadRecord as err:
                            buffer.append(err)
                        if len(buffer) >= self.buffer:
                            yield self.builder.safe(buffer.pop(rng.randrange(len(buffer))), count * slots + slot)
                            count += 1
                except DamagedShard as err:  # keep what was readable; the sample in progress counts as skipped
                    log.warning("%s", err)
                    buffer.append(err)
            epoch += 1


MAX_SKIP_REASONS = 3  # reasons a batch keeps for the error that stops a run reading nothing


def collate_training(items: Sequence[dict[str, Any]], *, num_visual_tokens: int, pad_id: int,
                     pack_tokens: int | None = None) -> Batch:
    """Drop skipped samples (``{"skip_reason": ...}``), lay out the rest (right padding, or packed rows when
    ``pack_tokens`` is set) and stack images or cached embeddings in the order the layout placed the samples.

    ``num_tokens`` is the number of caption + EOS tokens the loss runs over (0 when every sample was skipped).
    """
    kept = [it for it in items if "tokens" in it]
    tokens: list[SampleTokens] = [it["tokens"] for it in kept]
    batch = Batch()
    if kept and pack_tokens:
        batch = collate_packed(tokens, num_visual_tokens=num_visual_tokens, pad_id=pad_id, max_tokens=pack_tokens)
        kept = [kept[i] for i in batch.pop("order").tolist()]
    elif kept:
        batch = collate(tokens, num_visual_tokens=num_visual_tokens, pad_id=pad_id)
    if kept:
        batch["cu_seq_lens"], batch["max_seq_len"] = sequence_runs(batch.get("segment_ids", batch["attention_mask"]))
    if kept and "pixel_values" in kept[0]:
        batch["pixel_values"] = torch.stack([it["pixel_values"] for it in kept])
    if kept and "image_embeds" in kept[0]:
        batch["image_embeds"] = torch.stack([it["image_embeds"] for it in kept])
    # Plain ints (the counts, max_seq_len) stay on the host when Lightning moves the batch: reading them costs
    # no device sync.
    batch["num_skipped"] = len(items) - len(kept)
    batch["skip_reasons"] = [it["skip_reason"] for it in items if "skip_reason" in it][:MAX_SKIP_REASONS]
    batch["num_truncated"] = count_truncated(tokens)
    batch["num_tokens"] = len(batch["predict_index"]) if kept else 0
    return batch


def collate_group(items: Sequence[dict[str, Any]], *, micro_batch_size: int, **layout) -> list[Batch]:
    """One optimizer step's samples on one rank as its micro-batches (:func:`collate_training`), in order.

    Each micro-batch also carries ``micro_index``, ``group_size`` and the group's totals ``group_tokens``,
    ``group_samples`` and ``group_skipped`` (plain ints: they stay on the host).
    """
    micro = [collate_training(items[i : i + micro_batch_size], **layout)
             for i in range(0, len(items), micro_batch_size)]
    totals = {"group_size": len(micro), "group_tokens": sum(b["num_tokens"] for b in micro),
              "group_samples": len(items), "group_skipped": sum(b["num_skipped"] for b in micro)}
    return [{**batch, **totals, "micro_index": i} for i, batch in enumerate(micro)]


class MicroBatches:
    """The micro-batches of a loader of accumulation groups (:func:`collate_group`), one at a time, which is how
    Lightning's gradient accumulation consumes them."""

    def __init__(self, groups: DataLoader):
        self.groups = groups

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for group in self.groups:
            yield from group


class CaptionDataModule(L.LightningDataModule):
    """Training and validation batches for a recipe.

    ``train_source``/``val_source`` are random-access record sequences (or ``None`` for webdataset training,
    read from ``cfg.data.train``; ``cache``, an :class:`~altogether.cache_embeddings.EmbeddingCache`, then gives
    the streamed records their embeddings). ``start_step`` is set by the training module on resume.
    """

    def __init__(self, cfg, tokenizer, transform: Callable | None, *, accumulate: int,
                 train_source: Sequence[Record] | None = None, val_source: Sequence[Record] | None = None,
                 cache=None):
        super().__init__()
        self.cfg, self.tokenizer, self.transform, self.accumulate = cfg, tokenizer, transform, accumulate
        self.train_source, self.val_source, self.cache = train_source, val_source, cache

    def _builder(self, train: bool) -> SampleBuilder:
        return SampleBuilder(self.tokenizer, self.transform, task=self.cfg.data.task, layout=self.cfg.layout,
                             seed=self.cfg.trainer.seed + (0 if train else 1))

    def _loader(self, dataset, *, group: bool, **kwargs) -> DataLoader:
        """Micro-batches, or (``group``) whole accumulation groups split into their micro-batches."""
        d = self.cfg.data
        collate_fn = _Collator(self.cfg.model.mapper.num_visual_tokens, self.tokenizer.pad_token_id,
                               d.pack_tokens if d.packing else None, d.micro_batch_size if group else None)
        size = d.micro_batch_size * (self.accumulate if group else 1)
        return DataLoader(dataset, batch_size=size, num_workers=d.num_workers, collate_fn=collate_fn,
                          persistent_workers=d.num_workers > 0, **kwargs)

    def train_dataloader(self) -> MicroBatches:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        step = trainer.global_step if trainer else 0
        builder = self._builder(train=True)
        if self.train_source is None:
            fields = data_fields(self.cfg)
            stream = WebdatasetTrainingStream(self.cfg.data.train, fields, builder, rank=rank, world_size=world,
                                              seed=self.cfg.trainer.seed, buffer=self.cfg.data.shuffle_buffer,
                                              cache=self.cache)
            return MicroBatches(self._loader(stream, group=True))
        start = step * self.accumulate * self.cfg.data.micro_batch_size
        sampler = ResumableSampler(len(self.train_source), seed=self.cfg.trainer.seed, rank=rank, world_size=world,
                                   start=start)
        return MicroBatches(self._loader(MapTrainingDataset(self.train_source, builder), group=True, sampler=sampler))

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_source:
            return []
        return self._loader(FixedDataset(self.val_source, self._builder(train=False)), group=False)


class _Collator:
    """Picklable collate function for worker processes: a micro-batch, or a group of them (``micro_batch_size``)."""

    def __init__(self, num_visual_tokens: int, pad_id: int, pack_tokens: int | None, micro_batch_size: int | None):
        self.layout = {"num_visual_tokens": num_visual_tokens, "pad_id": pad_id, "pack_tokens": pack_tokens}
        self.micro_batch_size = micro_batch_size

    def __call__(self, items):
        if self.micro_batch_size is None:
            return collate_training(items, **self.layout)
        return collate_group(items, micro_batch_size=self.micro_batch_size, **self.layout)


def data_fields(cfg) -> Fields:
    d = cfg.data
    return Fields(alt_key=d.alt_key, image_key=d.image_key, image_root=d.image_root,
                  target_key=d.target_key if d.task == "finetune" else None,
                  alt_sources=d.alt_text_sources)


class Subset(Sequence):
    """A view of some indices of a record source."""

    def __init__(self, source: Sequence[Record], indices: Sequence[int]):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Record:
        return self.source[self.indices[i]]


def open_sources(cfg):
    """(train, val) record sources for a recipe; train is ``None`` for streamed webdataset training.

    ``val_fraction`` carves a seeded validation split out of a table source when no ``data.val`` is given.
    """
    d = cfg.data
    if not d.train:
        raise ValueError("data.train is not set: give the training data path, e.g. data.train=annotations.json")
    fields = data_fields(cfg)
    fmt = d.format if d.format != "auto" else detect_format(d.train)
    if fmt == "coco":  # several references per image: a training target is one caption
        raise ValueError(f"data.train={d.train!r} is a COCO captions file (several captions per image): evaluate "
                         "reads it; to train on it, write one JSONL row per (image, caption)")
    if fmt == "webdataset":
        shards = expand_shards(d.train)
        missing = [p for p in shards if not Path(p).is_file()]
        if missing or not shards:
            raise FileNotFoundError(f"data.train={d.train!r}: " + (
                f"{len(missing)} of {len(shards)} shard(s) not found, e.g. {missing[0]}" if missing
                else "no shard matches"))
    train = None if fmt == "webdataset" else TableSource(d.train, fmt, fields)
    val = None
    if d.val:
        vfmt = d.format if d.format != "auto" else detect_format(d.val)
        val = TableSource(d.val, vfmt, fields)
    elif d.val_fraction > 0 and train is not None:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.trainer.seed)).tolist()
        n_val = max(1, int(len(train) * d.val_fraction))
        train, val = Subset(train, order[n_val:]), Subset(train, order[:n_val])
    return train, val
