"""Recaptioning at scale: shards in, one caption file per shard out, on one CPU or many GPU nodes.

``python -m altogether.recaption MODEL INPUT OUTPUT [key=value ...]`` (settings: :class:`RecaptionSettings`;
guide: ``docs/recaption.md``). The run is Lightning's predict loop: every rank (and every independent run on
the same OUTPUT) claims the shards it works on (:mod:`altogether.claims`), so each shard is processed once
and a dead worker's shard is taken over; it reads a shard whole, captions batches sorted by prompt length,
and writes ``OUTPUT/<shard>.recaption.stats.json`` then ``OUTPUT/<shard>.recaption.parquet|.jsonl``
atomically once the shard is complete. A shard whose output exists is skipped, so rerunning the same command
resumes; ``summary.json`` is computed from every shard's stats. SIGTERM stops at a batch boundary (exit 143). Captions go through :class:`Recaptioner`'s one inference path:
data-loader workers run its prepare step (the training prompt rule, image decoding and the encoder's own
transform, once per image), the rank's main process its caption step. Best-of-N reranks sampled candidates by CLIP
score (LAION-COCO); ``num_captions=K`` keeps K sampled captions per image (LaCLIP-style augmentation).
"""

from __future__ import annotations

import glob
import io
import json
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields as dataclass_fields
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .claims import ShardClaims
from .cli import SIGTERM_EXIT_CODE, run_cli
from .cli import load_settings as cli_settings  # recaption's own name is this command's loader
from .clip_score import ClipScorer, clip_score
from .config import ConfigError, check_alt_text_sources
from .data.inputs import INPUT_FORMATS, Shard, check_manifest_columns, discover_shards, read_shard
from .data.readers import Fields, is_failed_download
from .data.images import load_image
from .data.records import ALT_KEY, IMAGE_KEY, BadRecord
from .export import export_model_config, generation_from, read_export_config
from .generation import GenerationConfig, GenerationError, GenerationOverrides, given
from .io import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from .recaptioner import (Prepare, Prepared, Recaptioner, check_export_generation, length_sorted_batches,
                          resolve_source)


OUTPUT_FORMATS = ("parquet", "jsonl")
SUMMARY_FILE = "summary.json"
USAGE = "usage: python -m altogether.recaption MODEL INPUT OUTPUT [key=value ...]   (see docs/recaption.md)"


# ---------------------------------------------------------------------------------------------- settings


@dataclass
class RecaptionSettings(GenerationOverrides):
    """``key=value`` settings of a run. Generation keys left at ``None`` take the export's values."""

    # input
    input_format: str = "auto"  # auto | webdataset | parquet | jsonl | folder
    alt_key: str = ALT_KEY  # manifest column (or webdataset JSON key, after `texts` and `caption`); "" = none
    alt_text_sources: Optional[List[str]] = None  # [source, text] pairs (MetaCLIP `texts`) kept; None = all
    image_key: str = IMAGE_KEY  # manifest column: image path (relative to the manifest or image_root) or bytes
    image_root: Optional[str] = None
    shard_size: int = 1000  # images per shard when INPUT is a folder of images
    # output
    output_format: str = "parquet"  # parquet | jsonl
    save_candidates: bool = False  # also store every candidate and its CLIP score (best-of-N)
    max_listed_bad: int = 1000  # bad samples listed by name in the summary (all are counted)
    claim_expiry_s: float = 300.0  # a shard claim whose worker has not renewed it for this long is taken over
    # captions
    num_captions: int = 1  # K > 1: keep K sampled captions per image, as a list
    num_candidates: int = 1  # N > 1: sample N, keep the best by CLIP score (the best K with num_captions)
    clip_model: Optional[str] = None  # best-of-N scorer; default: the captioner's own encoder (both towers)
    clip_pretrained: Optional[str] = None
    seed: int = 0  # sampling seed; each image draws from its own stream, derived from (seed, image, prompt)
    # hardware
    batch_size: int = 16
    num_workers: int = 2  # data loader processes per rank (reading and decoding images)
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    dtype: Optional[str] = None  # default: bfloat16 on GPU, float32 on CPU
    attn_implementation: str = "auto"
    progress_bar: bool = True


def load_settings(overrides: Sequence[str] | dict[str, Any] | None = None) -> RecaptionSettings:
    """Settings from ``key=value`` strings or a dict, type-checked; an unknown key is a :class:`ConfigError`."""
    return cli_settings(RecaptionSettings, overrides)


def check_settings(s: RecaptionSettings, defaults: GenerationConfig) -> GenerationConfig:
    """Cross-checks of the settings; returns the export's generation defaults with the run's overrides."""
    choices = {"output_format": OUTPUT_FORMATS, "input_format": INPUT_FORMATS}
    for key, valid in choices.items():
        if getattr(s, key) not in valid:
            raise ConfigError(f"key {key!r}: {getattr(s, key)!r} is not one of {', '.join(valid)}")
    for key in ("batch_size", "num_captions", "num_candidates", "shard_size", "num_nodes"):
        if getattr(s, key) < 1:
            raise ConfigError(f"key {key!r}: must be >= 1, got {getattr(s, key)}")
    if not s.claim_expiry_s > 0:
        raise ConfigError(f"key 'claim_expiry_s': must be > 0 seconds, got {s.claim_expiry_s}")
    if s.num_workers < 0 or s.max_listed_bad < 0:
        raise ConfigError("keys 'num_workers' and 'max_listed_bad' must be >= 0")
    if s.num_candidates > 1 and s.num_candidates < s.num_captions:
        raise ConfigError(f"num_candidates={s.num_candidates} < num_captions={s.num_captions}: best-of-N keeps "
                          "the best num_captions of num_candidates")
    if s.save_candidates and s.num_candidates == 1:
        raise ConfigError("save_candidates=true needs num_candidates > 1 (there are no other candidates)")
    check_alt_text_sources(s.alt_text_sources, "alt_text_sources")
    if s.clip_pretrained and not s.clip_model:
        raise ConfigError("clip_pretrained needs clip_model (the scorer defaults to the captioner's own encoder)")
    count_key = "num_candidates" if s.num_candidates > 1 else "num_captions"
    try:
        return defaults.merge(given(s), num_return_sequences=max(s.num_candidates, s.num_captions),
                              count_key=count_key)
    except GenerationError as err:
        raise ConfigError(f"key {err.key!r}: {err}") from None


# ---------------------------------------------------------------------------------------------- batches


@dataclass
class ShardBatch:
    """One batch of one shard, prepared in a data-loader worker. The first batch of a shard carries the shard's
    read problems; ``last`` marks the batch after which the shard is complete. ``progress`` is the batch's
    fraction of its shard. ``images`` holds the decoded images only for best-of-N scoring."""

    shard: str
    progress: float
    last: bool
    index: list[int] = field(default_factory=list)  # positions in the shard's input order
    keys: list[str] = field(default_factory=list)
    urls: list[Optional[str]] = field(default_factory=list)  # the image's URL, when the input names one
    items: list[Prepared] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    error: Optional[str] = None


class ShardBatches(IterableDataset):
    """Batches of the shards this process claims, shard after shard; each data loader worker claims its own.

    Each worker runs :class:`Prepare` on its shards' samples: every prompt is built and tokenized once (the
    batches are sorted by its length), every image decoded and transformed once.
    """

    def __init__(self, queue: ShardQueue, fields: Fields, prepare: Prepare, batch_size: int,
                 keep_images: bool = False):
        self.queue, self.fields, self.prepare = queue, fields, prepare
        self.batch_size, self.keep_images = batch_size, keep_images

    def __iter__(self) -> Iterator[ShardBatch]:
        worker = get_worker_info()
        first, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        for shard in self.queue.claim_shards(first, step):
            yield from self.shard_batches(shard)

    def shard_batches(self, shard: Shard) -> Iterator[ShardBatch]:
        content = read_shard(shard, self.fields)
        samples = content.samples
        prompts = [self.prepare.prompt(s.alt_texts) for s in samples]
        batches = length_sorted_batches([len(p.ids) for p in prompts], self.batch_size)
        for n, rows in enumerate(batches):
            batch = ShardBatch(shard.name, progress=len(rows) / len(samples) if samples else 1.0,
                               last=n == len(batches) - 1)
            if n == 0:
                batch.bad, batch.error = list(content.bad), content.error
            for i in rows:
                try:
                    image = load_image(samples[i].image, key=samples[i].key)
                    item = self.prepare.image(image, prompts[i], key=samples[i].key)
                except BadRecord as err:
                    batch.bad.append((samples[i].key, str(err)))
                    continue
                batch.index.append(i)
                batch.keys.append(samples[i].key)
                url = samples[i].extra.get("url")
                batch.urls.append(url if isinstance(url, str) and url else None)
                batch.items.append(item)
                if self.keep_images:
                    batch.images.append(image)
            yield batch


# ---------------------------------------------------------------------------------------------- shard plan


# An output row's text columns: the prompt the alt-texts made, and the caption written from it.
ALT_TEXT_COLUMN, CAPTION_COLUMN = "alt_text", "caption"
OUTPUT_SUFFIX = ".recaption"  # `<shard>.recaption.parquet`: a name no downloader or dataset tool writes
OUTPUT_MARKER = b"altogether.recaption"  # Parquet schema metadata key; its value is JSON {"version", "shard"}
OUTPUT_VERSION = 1


def output_path(output: Path, shard: str, output_format: str) -> Path:
    """``OUTPUT/<shard>.recaption.<format>``: the suffix keeps outputs apart from inputs that share a folder or a
    shard name (img2dataset writes ``00000.parquet`` beside ``00000.tar``)."""
    return output / f"{shard}{OUTPUT_SUFFIX}.{output_format}"


def recaption_output_problem(path: Path) -> str | None:
    """Why ``path`` is not a recaption output, or ``None`` if it is one.

    An output is named ``*.recaption.parquet`` / ``*.recaption.jsonl``; a Parquet output also carries the
    ``altogether.recaption`` schema metadata (written by :func:`write_shard_output`), which a Parquet file of
    any name is accepted by.
    """
    path = Path(path)
    named = path.name.endswith((f"{OUTPUT_SUFFIX}.parquet", f"{OUTPUT_SUFFIX}.jsonl"))
    if path.suffix != ".parquet":
        return None if named else f"not named *{OUTPUT_SUFFIX}.jsonl or *{OUTPUT_SUFFIX}.parquet"
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        return f"cannot read its Parquet schema ({err})"
    if OUTPUT_MARKER not in metadata:
        return f"no '{OUTPUT_MARKER.decode()}' schema metadata (is it a downloader's metadata file?)"
    try:
        version = json.loads(metadata[OUTPUT_MARKER])["version"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable '{OUTPUT_MARKER.decode()}' schema metadata"
    if not isinstance(version, int) or version > OUTPUT_VERSION:
        return f"written by a newer altogether (output version {version!r}, this one reads <= {OUTPUT_VERSION})"
    return None


def stats_path(output: Path, shard: str) -> Path:
    """``OUTPUT/<shard>.recaption.stats.json``: what the shard's output holds and what was left out of it."""
    return output / f"{shard}{OUTPUT_SUFFIX}.stats.json"


def check_existing_outputs(shards: Sequence[Shard], output: Path, output_format: str) -> None:
    """Refuse a file under an output's name that is not a recaption output (never taken as done nor overwritten)."""
    for shard in shards:
        final = output_path(output, shard.name, output_format)
        if final.exists() and (problem := recaption_output_problem(final)):
            raise ValueError(f"{final} exists but is not a recaption output ({problem}); move it or choose another "
                             "OUTPUT")


class ShardQueue:
    """The shards of one OUTPUT, shared by every process recaptioning into it (ranks, runs, machines).

    A shard is *finished* when its output exists, or when it was found to hold nothing captionable after this
    process started (a later run retries it). A process takes an unfinished shard only by claiming it
    (:class:`altogether.claims.ShardClaims`), so two processes never work on one shard at the same time and
    a shard whose worker died is taken over. Sent to data-loader workers, which claim for the process.
    """

    def __init__(self, shards: Sequence[Shard], output: Path, output_format: str, claims: ShardClaims,
                 started: float, rank: int = 0, world_size: int = 1):
        self.shards, self.output, self.output_format, self.claims = list(shards), output, output_format, claims
        self.started, self.rank, self.world_size = started, rank, world_size

    def finished(self, shard: Shard) -> bool:
        if output_path(self.output, shard.name, self.output_format).exists():
            return True
        stats = stats_path(self.output, shard.name)
        try:
            return stats.stat().st_mtime >= self.started and not json.loads(stats.read_bytes())["written"]
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def unfinished(self) -> list[Shard]:
        return [shard for shard in self.shards if not self.finished(shard)]

    def claim_shards(self, first: int = 0, step: int = 1) -> Iterator[Shard]:
        """Claim and yield unfinished shards one at a time, until none is left unclaimed.

        Data-loader worker ``first`` of ``step`` (over all ranks) tries shards ``first, first + step, ...``
        before the others, so workers of one run start apart; independent runs meet at the claims. A claimed
        shard's leftovers of an interrupted write are removed: only its claim holder writes it.
        """
        slot, slots = self.rank * step + first, self.world_size * step
        order = self.shards[slot::slots] + [s for i, s in enumerate(self.shards) if i % slots != slot]
        holders, now = self.claims.holders(), self.claims.now()
        for shard in order:
            if self.finished(shard) or not self.claims.claim(shard.name, holders, now):
                continue
            if self.finished(shard):  # written by another worker after our check: not ours to redo
                self.claims.release(shard.name)
                continue
            for path in (output_path(self.output, shard.name, self.output_format), stats_path(self.output, shard.name)):
                remove_stale_temporaries(self.output, glob.escape(path.name))
            yield shard
            holders, now = self.claims.holders(), self.claims.now()


class ShardData(L.LightningDataModule):
    """Serves batches of the shards this process claims from the shared :class:`ShardQueue`."""

    def __init__(self, queue: ShardQueue, fields: Fields, settings: RecaptionSettings):
        super().__init__()
        self.queue, self.fields, self.settings = queue, fields, settings

    def predict_dataloader(self) -> DataLoader:
        s = self.settings
        self.queue.rank, self.queue.world_size = self.trainer.global_rank, self.trainer.world_size
        prepare = self.trainer.lightning_module.captioner.prepare
        dataset = ShardBatches(self.queue, self.fields, prepare, s.batch_size, keep_images=s.num_candidates > 1)
        workers = min(s.num_workers, len(self.queue.unfinished()))
        return DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=_ignore_sigterm)


def _ignore_sigterm(worker_id: int) -> None:
    """Data-loader workers leave SIGTERM (sent to the whole job by schedulers) to their process, which stops
    at a batch boundary and releases its claims; a worker killed by it would fail the run instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------- captioning


def choose_captions(candidates: Sequence[str], scores: Sequence[float] | None, k: int) -> list[int]:
    """Indices of the ``k`` candidates to keep: highest score first when scored (ties in sampling order), else
    sampling order; distinct texts before repeats, which only top the list up when too few texts differ."""
    order = list(range(len(candidates)))
    if scores is not None:
        order.sort(key=lambda i: -scores[i])
    seen: set[str] = set()
    distinct = [i for i in order if not (candidates[i] in seen or seen.add(candidates[i]))]
    return (distinct + [i for i in order if i not in distinct])[:k]


class RecaptionModule(L.LightningModule):
    """Captions :class:`ShardBatch` es: the captioner (and the best-of-N scorer) are built on the rank's device."""

    def __init__(self, model: str | Path | Recaptioner, settings: RecaptionSettings, generation: GenerationConfig):
        super().__init__()
        self.source = model
        self.settings = settings
        self.generation = generation
        self.captioner: Recaptioner | None = model if isinstance(model, Recaptioner) else None
        self.scorer = None

    def configure_model(self) -> None:
        s = self.settings
        device = self.trainer.strategy.root_device
        if self.captioner is None:
            self.captioner = Recaptioner.from_pretrained(self.source, device=device, dtype=s.dtype,
                                                         attn_implementation=s.attn_implementation)
        self.model = self.captioner.model  # registered, so Lightning moves it to this rank's device
        if s.num_candidates > 1 and self.scorer is None:
            name, pretrained = self.scorer_spec()
            self.scorer = ClipScorer.from_open_clip(name, pretrained, device=device)

    def scorer_spec(self) -> tuple[str, str | None]:
        """The scorer's open_clip (name, pretrained): ``clip_model`` or the captioner's own encoder."""
        if self.settings.clip_model:
            return self.settings.clip_model, self.settings.clip_pretrained
        encoder = export_model_config(self.captioner.directory, self.captioner.meta).encoder
        return encoder.name, encoder.pretrained

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # the Recaptioner's caption step moves pixels to the device itself

    def predict_step(self, batch: ShardBatch, batch_idx: int = 0) -> list[dict[str, Any]]:
        if not batch.keys:
            return []
        candidates = self.captioner.caption(batch.items, self.generation)
        cosines = self.cosines(batch.images, candidates) if self.scorer is not None else None
        return [self.row(batch, i, candidates[i], None if cosines is None else cosines[i].tolist())
                for i in range(len(candidates))]

    def row(self, batch: ShardBatch, i: int, candidates: list[str], cosines: list[float] | None) -> dict[str, Any]:
        k = self.settings.num_captions
        keep = choose_captions(candidates, cosines, k)
        single = k == 1
        row: dict[str, Any] = {"index": batch.index[i], "key": batch.keys[i], "url": batch.urls[i],
                               ALT_TEXT_COLUMN: batch.items[i].prompt.text,
                               CAPTION_COLUMN: candidates[keep[0]] if single else [candidates[j] for j in keep]}
        if cosines is not None:
            scores = clip_score(torch.tensor(cosines, dtype=torch.float64)).tolist()  # ranking used the cosines
            row["caption_clip_score"] = scores[keep[0]] if single else [scores[j] for j in keep]
            if self.settings.save_candidates:
                row["candidates"], row["candidate_scores"] = candidates, scores
        row["repeated"] = len({candidates[j] for j in keep}) < k
        return row

    @torch.no_grad()
    def cosines(self, images: list[Image.Image], candidates: list[list[str]]) -> torch.Tensor:
        """(images, candidates) cosine similarities; each image is embedded once for all its candidates."""
        image_embeds = self.scorer.embed_images(images)
        text_embeds, _ = self.scorer.embed_texts([c for cands in candidates for c in cands])
        return torch.einsum("nd,nkd->nk", image_embeds, text_embeds.view(len(images), len(candidates[0]), -1))


# ---------------------------------------------------------------------------------------------- output


def output_schema(s: RecaptionSettings):
    """The Parquet schema of an output shard (JSONL rows hold the same keys)."""
    import pyarrow as pa

    text = pa.string() if s.num_captions == 1 else pa.list_(pa.string())
    score = pa.float32() if s.num_captions == 1 else pa.list_(pa.float32())
    columns = [("key", pa.string()), ("url", pa.string()), (ALT_TEXT_COLUMN, pa.string()), (CAPTION_COLUMN, text)]
    if s.num_candidates > 1:
        columns.append(("caption_clip_score", score))
        if s.save_candidates:
            columns += [("candidates", pa.list_(pa.string())), ("candidate_scores", pa.list_(pa.float32()))]
    return pa.schema(columns)


def write_shard_output(path: Path, rows: Sequence[dict[str, Any]], schema, stats: ShardStats | None = None) -> Path:
    """Write one shard's rows (in input order) atomically: a temporary file beside ``path``, then a rename. JSON
    lines for ``.jsonl``, else Parquet with the ``altogether.recaption`` schema metadata.

    ``stats`` (with ``output_bytes`` set here) are written first, beside it: the output's appearance commits them.
    """
    rows = [{name: row[name] for name in schema.names} for row in rows]
    if path.suffix == ".jsonl":
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        marker = json.dumps({"version": OUTPUT_VERSION, "shard": path.name.removesuffix(f"{OUTPUT_SUFFIX}.parquet")})
        schema = schema.with_metadata({**(schema.metadata or {}), OUTPUT_MARKER: marker.encode()})
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
        data = buffer.getvalue()
    if stats is not None:
        stats.output_bytes = len(data)
        atomic_write_text(stats_path(path.parent, stats.shard), stats.to_json())
    return atomic_write_bytes(path, data)


@dataclass
class ShardStats:
    """What one shard's output holds and what was left out of it: ``OUTPUT/<shard>.recaption.stats.json``.

    Written atomically just before the output is renamed into place: the output's appearance commits both, and
    ``output_bytes`` (the output's size) tells a summary that the two belong together. A shard with nothing
    captioned gets only this file (``written`` false). The content depends on the shard alone, not on the
    worker or the time, so every way of producing an output gives the same bytes.
    """

    shard: str
    written: bool
    output_bytes: int = 0
    captioned: int = 0
    images_with_repeated_captions: int = 0
    bad: int = 0
    failed_downloads: int = 0  # of the bad samples, rows the downloader marked as failed
    bad_samples: list[dict[str, str]] = field(default_factory=list)  # the first max_listed_bad: key, reason
    error: Optional[str] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n"


def read_shard_stats(output: Path, shard: str) -> ShardStats | None:
    try:
        return ShardStats(**json.loads(stats_path(output, shard).read_bytes()))
    except (OSError, ValueError, TypeError):  # absent, half-written by a foreign tool, or not ours
        return None


@dataclass
class RankStats:
    """What this process did in this run (all rounds)."""

    rank: int = 0
    shards_written: list[str] = field(default_factory=list)
    images: int = 0
    bad: int = 0
    elapsed_s: float = 0.0


@dataclass
class ShardInProgress:
    rows: list[dict[str, Any]] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    error: Optional[str] = None


class RecaptionInterrupted(RuntimeError):
    """SIGTERM stopped recaptioning at a batch boundary: shards in progress were abandoned (their claims
    released, nothing written) and ``summary`` (also ``summary.json``) written. The command exits with
    :data:`SIGTERM_EXIT_CODE` (143); rerunning it finishes the output."""

    summary: dict[str, Any] = {}


class ShardWriter(Callback):
    """Collects each shard's rows and writes the shard (stats, then output) when its last batch is done, then
    releases its claim. On SIGTERM, stops at the next batch boundary with :class:`RecaptionInterrupted`."""

    def __init__(self, output: Path, settings: RecaptionSettings, claims: ShardClaims, stop: threading.Event):
        self.output, self.settings, self.claims, self.stop = output, settings, claims, stop
        self.schema = output_schema(settings)
        self.rows: dict[str, ShardInProgress] = {}
        self.stats = RankStats()

    def on_predict_start(self, trainer, pl_module) -> None:
        self.stats.rank = trainer.global_rank
        # Lightning installed its own SIGTERM handler when the run started; ours stops at a batch boundary.
        signal.signal(signal.SIGTERM, lambda signum, frame: self.stop.set())

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch: ShardBatch, batch_idx, dataloader_idx=0):
        shard = self.rows.setdefault(batch.shard, ShardInProgress())
        shard.rows.extend(outputs)
        shard.bad.extend(batch.bad)
        shard.error = shard.error or batch.error
        self.stats.images += len(outputs)
        self.stats.bad += len(batch.bad)
        if batch.last:
            self.finish(self.rows.pop(batch.shard), batch.shard)
        if self.stop.is_set():
            self.rows.clear()  # abandoned; the claims are released by the caller
            raise RecaptionInterrupted("SIGTERM")  # recaption_shards writes the summary and raises its own

    def finish(self, shard: ShardInProgress, name: str) -> None:
        """A shard of which nothing could be captioned gets no output (an empty file would mark it done, and a
        rerun would skip it), only its stats: it is listed in ``shard_errors`` and a later run tries it again."""
        rows = sorted(shard.rows, key=lambda row: row["index"])
        listed = [{"key": k, "reason": r} for k, r in shard.bad[: self.settings.max_listed_bad]]
        stats = ShardStats(name, written=True, captioned=len(rows), bad=len(shard.bad), bad_samples=listed,
                           failed_downloads=sum(is_failed_download(reason) for _, reason in shard.bad),
                           error=shard.error, images_with_repeated_captions=sum(row["repeated"] for row in rows))
        if not rows and (shard.bad or shard.error):
            note = (f"nothing could be captioned ({len(shard.bad)} bad sample(s)); no output written, a rerun "
                    "retries the shard")
            stats.written, stats.error = False, f"{shard.error}; {note}" if shard.error else note
            atomic_write_text(stats_path(self.output, name), stats.to_json())
        else:
            write_shard_output(output_path(self.output, name, self.settings.output_format), rows, self.schema, stats)
            self.stats.shards_written.append(name)
        self.claims.release(name)


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def _output_rows(path: Path) -> int:
    """Rows of an output file without stats (written by an older version): Parquet's footer, or JSON lines."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def summarize_output(shards: Sequence[Shard], output: Path, output_format: str, max_listed_bad: int,
                     header: dict[str, Any], ranks: Sequence[dict[str, Any]], interrupted: bool = False
                     ) -> dict[str, Any]:
    """The summary of everything in ``output`` for these input shards, from each shard's stats, whichever
    runs, resumes and workers wrote them; ``run`` describes this run (every rank's :class:`RankStats`, as
    dicts). An output without matching stats (an older version's) counts its rows and is listed under
    ``shards_without_stats``, since its bad samples are unknown."""
    counts = {"total": len(shards), "written": 0, "not_written": 0, "pending": 0, "with_read_errors": 0}
    samples = {"captioned": 0, "bad": 0, "failed_downloads": 0, "bad_not_listed": 0}
    repeated, listed, errors, without_stats = 0, [], [], []
    for shard in shards:
        path = output_path(output, shard.name, output_format)
        stats = read_shard_stats(output, shard.name)
        size = path.stat().st_size if path.exists() else None
        if size is not None and (stats is None or not stats.written or stats.output_bytes != size):
            counts["written"] += 1
            samples["captioned"] += _output_rows(path)
            without_stats.append(shard.name)
            continue
        if stats is None or (size is None and stats.written):
            counts["pending"] += 1  # not yet done, or its output was deleted to redo it
            continue
        counts["written" if stats.written else "not_written"] += 1
        samples["captioned"] += stats.captioned
        samples["bad"] += stats.bad
        samples["failed_downloads"] += stats.failed_downloads
        repeated += stats.images_with_repeated_captions
        listed += [{"shard": shard.name, **b} for b in stats.bad_samples]
        if stats.error:
            errors.append({"shard": shard.name, "error": stats.error})
    counts["with_read_errors"] = len(errors)
    listed = listed[:max_listed_bad]
    samples["bad_not_listed"] = samples["bad"] - len(listed)
    images = sum(r["images"] for r in ranks)
    elapsed = max(r["elapsed_s"] for r in ranks)
    return {
        **header,
        "shards": counts,
        "samples": samples,
        "images_with_repeated_captions": repeated,
        "bad_samples": listed,
        "shard_errors": errors,
        "shards_without_stats": without_stats,
        "run": {"world_size": len(ranks), "interrupted": interrupted,
                "shards_written": sum(len(r["shards_written"]) for r in ranks), "images": images,
                "elapsed_s": round(elapsed, 3), "images_per_s": round(images / elapsed, 3) if elapsed > 0 else None,
                "ranks": [{"rank": r["rank"], "shards_written": r["shards_written"], "images": r["images"],
                           "elapsed_s": round(r["elapsed_s"], 3)} for r in ranks]},
    }


class ProgressBar(Callback):
    """Rank 0's shards done (fractions within a shard), its images/s and the ETA, on stderr. The total is the
    run's share of the shards left: other runs on the same OUTPUT make it finish early."""

    def on_predict_start(self, trainer, pl_module) -> None:
        self.bar = None
        if not trainer.is_global_zero:
            return
        from tqdm.auto import tqdm

        pending = -(-len(trainer.datamodule.queue.unfinished()) // trainer.world_size)
        ranks = f" (rank 0 of {trainer.world_size})" if trainer.world_size > 1 else ""
        self.bar = tqdm(total=pending, desc=f"recaption{ranks}", dynamic_ncols=True, file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} shards "
                                   "[{elapsed}<{remaining}{postfix}]")
        self.images, self.started = 0, time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch: ShardBatch, batch_idx, dataloader_idx=0):
        if self.bar is None:
            return
        self.images += len(outputs)
        self.bar.set_postfix_str(f"{self.images / (time.perf_counter() - self.started):.1f} img/s", refresh=False)
        self.bar.update(batch.progress)

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- running


def recaption_shards(
    model: str | Path | Recaptioner,
    source: str,
    output: str | Path,
    settings: RecaptionSettings | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Recaption every shard of ``source`` into ``output``; returns the run summary (also ``summary.json``).

    ``model``: an export folder or a Hub id (each rank loads it on its own device, with ``dtype`` and
    ``attn_implementation``), or a loaded :class:`Recaptioner`, used as it is (Lightning moves it to the device).
    ``overrides`` are :class:`RecaptionSettings` fields. Under DDP every rank returns the same summary.
    """
    s = settings or load_settings(overrides)
    if settings is not None and overrides:
        s = load_settings({**asdict(settings), **overrides})
    if isinstance(model, Recaptioner):
        model_name, defaults, meta = str(model.directory), model.generation, None
    else:
        model_name = str(model)
        model = resolve_source(model)
        meta = read_export_config(model)
        defaults = generation_from(meta)
    generation = check_settings(s, defaults)
    try:  # against the decoder's position table: before a model loads on any rank
        if meta is None:
            model.check(generation)
        else:
            check_export_generation(meta, generation)
    except GenerationError as err:
        raise ConfigError(f"key {err.key!r}: {err}") from None
    shards = discover_shards(source, input_format=s.input_format, shard_size=s.shard_size)
    fields = Fields(alt_key=s.alt_key, image_key=s.image_key, target_key=None, image_root=s.image_root,
                    alt_sources=s.alt_text_sources)
    check_manifest_columns(shards[0], fields)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"OUTPUT {str(output)!r} is a file; give a folder for the per-shard outputs")
    output.mkdir(parents=True, exist_ok=True)
    check_existing_outputs(shards, output, s.output_format)
    header = {"model": model_name, "input": source, "output": str(output), "settings": asdict(s)}
    claims = ShardClaims(output, s.claim_expiry_s)
    stop = threading.Event()
    writer = ShardWriter(output, s, claims, stop)
    trainer = L.Trainer(
        accelerator=s.accelerator, devices=s.devices, num_nodes=s.num_nodes, strategy=s.strategy,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[writer, *([ProgressBar()] if s.progress_bar else [])],
    )
    module = RecaptionModule(model, s, generation)
    started = time.perf_counter()
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        queue = ShardQueue(shards, output, s.output_format, claims, started=claims.start())
        _remove_stale_writes(output, claims)
        interrupted = not _run_rounds(trainer, module, ShardData(queue, fields, s), queue, stop, s.claim_expiry_s)
    except RecaptionInterrupted:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        claims.stop()
    writer.stats.elapsed_s = time.perf_counter() - started
    ranks = [asdict(writer.stats)] if interrupted else _gather(asdict(writer.stats), trainer.world_size)
    summary = summarize_output(shards, output, s.output_format, s.max_listed_bad, header, ranks, interrupted)
    if trainer.is_global_zero or interrupted:
        atomic_write_text(output / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    if interrupted:
        stopped = RecaptionInterrupted("stopped by SIGTERM: shards in progress were abandoned, their claims "
                                       "released; rerun the same command to finish")
        stopped.summary = summary
        raise stopped
    return summary


def _run_rounds(trainer: L.Trainer, module: RecaptionModule, data: ShardData, queue: ShardQueue,
                stop: threading.Event, expiry_s: float) -> bool:
    """Predict rounds until every shard is finished: each round claims what it can; between rounds, wait for
    the shards other workers hold (taking over any whose worker dies). ``False`` when SIGTERM stopped it."""
    with warnings.catch_warnings():
        # Whole shards per worker are the unit of parallel reading; Lightning's "few workers" hint does not apply.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # The batch stays on the host on purpose (see RecaptionModule.transfer_batch_to_device).
        warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
        while True:
            trainer.predict(module, datamodule=data, return_predictions=False)
            if stop.is_set():
                return False
            if not any(_gather(bool(queue.unfinished()), trainer.world_size)):  # every rank decides alike
                return True
            if stop.wait(min(expiry_s / 10, 5.0)):
                return False


def _remove_stale_writes(output: Path, claims: ShardClaims) -> None:
    """Leftovers of interrupted writes (summaries, shards whose claim no one took since): every one when no other
    worker is alive (a rerun after a kill), else those older than the claim expiry (any worker still writing
    them would have renewed its lease since)."""
    now = claims.now()
    before = now - claims.expiry_s if claims.others_alive(now) else now
    for pattern in (SUMMARY_FILE, f"*{OUTPUT_SUFFIX}.*"):
        remove_stale_temporaries(output, pattern, older_than=before)


def describe(summary: dict[str, Any]) -> str:
    """One line about the output and this run, from a summary."""
    n, sh, run = summary["samples"], summary["shards"], summary["run"]
    return (f"this run recaptioned {run['images']} images ({run['images_per_s']} img/s) into "
            f"{run['shards_written']} shard file(s); OUTPUT now holds {sh['written']} of {sh['total']} shards "
            f"({n['captioned']} images, {n['bad']} bad sample(s), {sh['with_read_errors']} shard(s) with read errors)"
            + (f"; {sh['not_written']} shard(s) not written: nothing in them could be captioned (see shard_errors)"
               if sh["not_written"] else "")
            + (f"; {sh['pending']} shard(s) not done yet" if sh["pending"] else "")
            + f"; summary: {Path(summary['output']) / SUMMARY_FILE}")


def main(argv: list[str]) -> int:
    """The command: exit 0 when every shard is written, 1 when some held nothing captionable (a rerun
    retries them) or OUTPUT holds no caption at all (INPUT had no samples), :data:`SIGTERM_EXIT_CODE` (143) when
    SIGTERM stopped it (rerun to finish)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("settings (key=value): " + ", ".join(f.name for f in dataclass_fields(RecaptionSettings)))
        return 0 if argv else 2
    if len(argv) < 3 or any("=" not in a for a in argv[3:]):
        raise ConfigError(f"expected MODEL INPUT OUTPUT then key=value settings, got {' '.join(argv)!r}\n{USAGE}")
    model, source, output, *overrides = argv
    try:
        summary = recaption_shards(model, source, output, load_settings(overrides))
    except RecaptionInterrupted as stopped:
        print(f"{stopped}\n{describe(stopped.summary)}", file=sys.stderr)
        return SIGTERM_EXIT_CODE
    # Every shard done and not one caption in OUTPUT (an empty manifest, shards of nothing): nothing useful.
    empty = not summary["samples"]["captioned"] and not summary["shards"]["pending"]
    if rank_zero_only.rank == 0:
        print(describe(summary))
        if empty:
            print(f"recaption: nothing captioned: {source} holds no samples", file=sys.stderr)
    return 1 if summary["shards"]["not_written"] or empty else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
