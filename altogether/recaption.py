"""Recaptioning at scale: shards in, one caption file per shard out, on one CPU or many GPU nodes.

``python -m altogether.recaption MODEL INPUT OUTPUT [key=value ...]`` (settings: :class:`RecaptionSettings`;
guide: ``docs/recaption.md``). The run is Lightning's predict loop: every rank takes the shards whose index
in the input list is congruent to its global rank (so each shard is processed exactly once, whatever has
been done before), reads a shard whole, caption batches sorted by prompt length, and writes
``OUTPUT/<shard>.recaption.parquet|.jsonl`` atomically once the shard is complete. A shard whose output exists is
skipped, so rerunning the same command resumes. Captions go through :class:`Recaptioner`'s one inference path:
data-loader workers run its prepare step (the training prompt rule, image decoding and the encoder's own
transform, once per image), the rank's main process its caption step. Best-of-N reranks sampled candidates by CLIP
score (LAION-COCO); ``num_captions=K`` keeps K sampled captions per image (LaCLIP-style augmentation).
"""

from __future__ import annotations

import glob
import io
import json
import sys
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

from .cli import run_cli
from .clip_score import ClipScorer, clip_score
from .config import ConfigError, check_alt_text_sources
from .data.inputs import INPUT_FORMATS, Shard, check_manifest_columns, discover_shards, read_shard
from .data.readers import Fields
from .data.images import load_image
from .data.records import BadRecord
from .export import export_model_config, generation_from, read_export_config
from .generation import GenerationConfig, GenerationError, GenerationOverrides, given
from .io import atomic_write_bytes, atomic_write_text
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
    alt_key: str = "alt"  # manifest column (or webdataset JSON key, after `texts` and `caption`); "" = none
    alt_text_sources: Optional[List[str]] = None  # [source, text] pairs (MetaCLIP `texts`) kept; None = all
    image_key: str = "img_path"  # manifest column: image path (relative to the manifest or image_root) or bytes
    image_root: Optional[str] = None
    shard_size: int = 1000  # images per shard when INPUT is a folder of images
    # output
    output_format: str = "parquet"  # parquet | jsonl
    save_candidates: bool = False  # also store every candidate and its CLIP score (best-of-N)
    max_listed_bad: int = 1000  # bad samples listed by name in the summary (all are counted)
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
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        base = OmegaConf.structured(RecaptionSettings)
        if isinstance(overrides, dict):
            base = OmegaConf.merge(base, OmegaConf.create(overrides))
        elif overrides:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(base)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{'key ' + repr(key) + ': ' if key else ''}{str(err).splitlines()[0]}") from None


def check_settings(s: RecaptionSettings, defaults: GenerationConfig) -> GenerationConfig:
    """Cross-checks of the settings; returns the export's generation defaults with the run's overrides."""
    choices = {"output_format": OUTPUT_FORMATS, "input_format": INPUT_FORMATS}
    for key, valid in choices.items():
        if getattr(s, key) not in valid:
            raise ConfigError(f"key {key!r}: {getattr(s, key)!r} is not one of {', '.join(valid)}")
    for key in ("batch_size", "num_captions", "num_candidates", "shard_size", "num_nodes"):
        if getattr(s, key) < 1:
            raise ConfigError(f"key {key!r}: must be >= 1, got {getattr(s, key)}")
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
    items: list[Prepared] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    error: Optional[str] = None


class ShardBatches(IterableDataset):
    """Batches of the given shards, shard after shard; data loader workers split the shards between them.

    Each worker runs :class:`Prepare` on its shards' samples: every prompt is built and tokenized once (the
    batches are sorted by its length), every image decoded and transformed once.
    """

    def __init__(self, shards: Sequence[Shard], fields: Fields, prepare: Prepare, batch_size: int,
                 keep_images: bool = False):
        self.shards, self.fields, self.prepare = list(shards), fields, prepare
        self.batch_size, self.keep_images = batch_size, keep_images

    def __iter__(self) -> Iterator[ShardBatch]:
        worker = get_worker_info()
        shards = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for shard in shards:
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
                batch.items.append(item)
                if self.keep_images:
                    batch.images.append(image)
            yield batch


# ---------------------------------------------------------------------------------------------- shard plan


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


@dataclass
class RankPlan:
    """This rank's shards: all it is responsible for, and those without an output yet."""

    assigned: list[Shard]
    pending: list[Shard]


def plan_rank(shards: Sequence[Shard], rank: int, world_size: int, output: Path, output_format: str) -> RankPlan:
    """Shards ``rank, rank + world_size, ...`` of the full list; leftovers of a killed run's writes are removed.

    Assigning from the full list (not from the unfinished ones) keeps ranks consistent even while other ranks
    are already writing: no listing race can give a shard to two ranks or to none.
    """
    assigned = list(shards[rank::world_size])
    for shard in assigned:
        final = output_path(output, shard.name, output_format)
        for stale in glob.glob(str(output / f".{glob.escape(final.name)}.*.tmp")):
            Path(stale).unlink(missing_ok=True)
    pending = []
    for shard in assigned:
        final = output_path(output, shard.name, output_format)
        if not final.exists():
            pending.append(shard)
        elif problem := recaption_output_problem(final):
            raise ValueError(f"{final} exists but is not a recaption output ({problem}); move it or choose another "
                             "OUTPUT")
    return RankPlan(assigned, pending)


class ShardData(L.LightningDataModule):
    """Plans this rank's shards once the process group exists, and serves their batches."""

    def __init__(self, shards: Sequence[Shard], output: Path, fields: Fields, settings: RecaptionSettings):
        super().__init__()
        self.shards, self.output, self.fields, self.settings = list(shards), output, fields, settings
        self.plan: RankPlan | None = None

    def predict_dataloader(self) -> DataLoader:
        s = self.settings
        self.plan = plan_rank(self.shards, self.trainer.global_rank, self.trainer.world_size, self.output,
                              s.output_format)
        prepare = self.trainer.lightning_module.captioner.prepare
        dataset = ShardBatches(self.plan.pending, self.fields, prepare, s.batch_size, keep_images=s.num_candidates > 1)
        return DataLoader(dataset, batch_size=None, num_workers=min(s.num_workers, len(self.plan.pending)))


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
        row: dict[str, Any] = {"index": batch.index[i], "key": batch.keys[i], "alt_text": batch.items[i].prompt.text,
                               "caption": candidates[keep[0]] if single else [candidates[j] for j in keep]}
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
    columns = [("key", pa.string()), ("alt_text", pa.string()), ("caption", text)]
    if s.num_candidates > 1:
        columns.append(("caption_clip_score", score))
        if s.save_candidates:
            columns += [("candidates", pa.list_(pa.string())), ("candidate_scores", pa.list_(pa.float32()))]
    return pa.schema(columns)


def write_shard_output(path: Path, rows: Sequence[dict[str, Any]], schema) -> Path:
    """Write one shard's rows (in input order) atomically: a temporary file beside ``path``, then a rename."""
    rows = [{name: row[name] for name in schema.names} for row in rows]
    if path.suffix == ".jsonl":
        return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = json.dumps({"version": OUTPUT_VERSION, "shard": path.name.removesuffix(f"{OUTPUT_SUFFIX}.parquet")})
    schema = schema.with_metadata({**(schema.metadata or {}), OUTPUT_MARKER: marker.encode()})
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return atomic_write_bytes(path, buffer.getvalue())


@dataclass
class RankStats:
    """What one rank did in this run."""

    rank: int = 0
    shards_assigned: int = 0
    shards_skipped_existing: int = 0
    shards_written: list[str] = field(default_factory=list)
    images: int = 0
    bad: int = 0
    bad_samples: list[dict[str, str]] = field(default_factory=list)  # the first max_listed_bad
    shard_errors: list[dict[str, str]] = field(default_factory=list)
    images_with_repeated_captions: int = 0
    elapsed_s: float = 0.0


class ShardWriter(Callback):
    """Collects each shard's rows and writes the shard when its last batch is done; writes the run summary."""

    def __init__(self, output: Path, settings: RecaptionSettings, header: dict[str, Any]):
        self.output, self.settings, self.header = output, settings, header
        self.schema = output_schema(settings)
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.bad: dict[str, int] = {}  # bad samples of each shard in progress
        self.stats = RankStats()
        self.summary: dict[str, Any] = {}

    def on_predict_start(self, trainer, pl_module) -> None:
        plan = trainer.datamodule.plan
        self.stats = RankStats(rank=trainer.global_rank, shards_assigned=len(plan.assigned),
                               shards_skipped_existing=len(plan.assigned) - len(plan.pending))
        self.started = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch: ShardBatch, batch_idx, dataloader_idx=0):
        st = self.stats
        self.rows.setdefault(batch.shard, []).extend(outputs)
        self.bad[batch.shard] = self.bad.get(batch.shard, 0) + len(batch.bad)
        st.images += len(outputs)
        st.images_with_repeated_captions += sum(row["repeated"] for row in outputs)
        st.bad += len(batch.bad)
        room = self.settings.max_listed_bad - len(st.bad_samples)
        st.bad_samples += [{"shard": batch.shard, "key": k, "reason": r} for k, r in batch.bad[: max(room, 0)]]
        if batch.error:
            st.shard_errors.append({"shard": batch.shard, "error": batch.error})
        if batch.last:
            rows = sorted(self.rows.pop(batch.shard), key=lambda row: row["index"])
            bad = self.bad.pop(batch.shard)
            if not rows and (bad or batch.error):
                self.fail(batch.shard, bad)
                return
            write_shard_output(output_path(self.output, batch.shard, self.settings.output_format), rows, self.schema)
            st.shards_written.append(batch.shard)

    def fail(self, shard: str, bad: int) -> None:
        """A shard of which nothing could be captioned gets no output (an empty file would mark it done, and a
        rerun would skip it): it is listed in ``shard_errors`` and a rerun tries it again."""
        note = f"nothing could be captioned ({bad} bad sample(s)); no output written, a rerun retries the shard"
        listed = next((e for e in self.stats.shard_errors if e["shard"] == shard), None)
        if listed is None:
            self.stats.shard_errors.append({"shard": shard, "error": note})
        else:
            listed["error"] += f"; {note}"

    def on_predict_end(self, trainer, pl_module) -> None:
        self.stats.elapsed_s = time.perf_counter() - self.started
        ranks = _gather(asdict(self.stats), trainer.world_size)
        self.summary = build_summary(ranks, self.header, self.settings.max_listed_bad)
        if trainer.is_global_zero:
            atomic_write_text(self.output / SUMMARY_FILE, json.dumps(self.summary, indent=2) + "\n")


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def build_summary(ranks: Sequence[dict[str, Any]], header: dict[str, Any], max_listed_bad: int) -> dict[str, Any]:
    """The run summary from every rank's :class:`RankStats` (as dicts)."""
    images = sum(r["images"] for r in ranks)
    elapsed = max(r["elapsed_s"] for r in ranks)
    bad = sum(r["bad"] for r in ranks)
    listed = [b for r in ranks for b in r["bad_samples"]][:max_listed_bad]
    errors = [e for r in ranks for e in r["shard_errors"]]
    return {
        **header,
        "world_size": len(ranks),
        "shards": {"total": sum(r["shards_assigned"] for r in ranks),
                   "written": sum(len(r["shards_written"]) for r in ranks),
                   "skipped_existing": sum(r["shards_skipped_existing"] for r in ranks),
                   "with_read_errors": len(errors)},
        "samples": {"captioned": images, "bad": bad, "bad_not_listed": bad - len(listed)},
        "images_with_repeated_captions": sum(r["images_with_repeated_captions"] for r in ranks),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(images / elapsed, 3) if elapsed > 0 else None,
        "bad_samples": listed,
        "shard_errors": errors,
        "ranks": [{"rank": r["rank"], "shards_written": r["shards_written"], "images": r["images"],
                   "elapsed_s": round(r["elapsed_s"], 3)} for r in ranks],
    }


class ProgressBar(Callback):
    """Rank 0's shards done (fractions within a shard), its images/s and the ETA, on stderr."""

    def on_predict_start(self, trainer, pl_module) -> None:
        self.bar = None
        if not trainer.is_global_zero:
            return
        from tqdm.auto import tqdm

        pending = len(trainer.datamodule.plan.pending)
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
    output.mkdir(parents=True, exist_ok=True)
    header = {"model": model_name, "input": source, "output": str(output), "settings": asdict(s)}
    writer = ShardWriter(output, s, header)
    trainer = L.Trainer(
        accelerator=s.accelerator, devices=s.devices, num_nodes=s.num_nodes, strategy=s.strategy,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[writer, *([ProgressBar()] if s.progress_bar else [])],
    )
    with warnings.catch_warnings():
        # Whole shards per worker are the unit of parallel reading; Lightning's "few workers" hint does not apply.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # The batch stays on the host on purpose (see RecaptionModule.transfer_batch_to_device).
        warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
        trainer.predict(RecaptionModule(model, s, generation), datamodule=ShardData(shards, output, fields, s),
                        return_predictions=False)
    return writer.summary


def unwritten_shards(summary: dict[str, Any]) -> int:
    """Shards of the run left without an output because nothing in them could be captioned."""
    sh = summary["shards"]
    return sh["total"] - sh["written"] - sh["skipped_existing"]


def describe(summary: dict[str, Any]) -> str:
    """One line about a run, from its summary."""
    n, sh = summary["samples"], summary["shards"]
    failed = unwritten_shards(summary)
    return (f"recaptioned {n['captioned']} images ({summary['images_per_s']} img/s) into {sh['written']} shard "
            f"file(s); {sh['skipped_existing']} shard(s) already done; {n['bad']} bad sample(s); "
            f"{sh['with_read_errors']} shard(s) with read errors"
            + (f"; {failed} shard(s) not written: nothing in them could be captioned (see shard_errors)"
               if failed else "")
            + f"; summary: {Path(summary['output']) / SUMMARY_FILE}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("settings (key=value): " + ", ".join(f.name for f in dataclass_fields(RecaptionSettings)))
        return 0 if argv else 2
    if len(argv) < 3 or any("=" not in a for a in argv[3:]):
        raise ConfigError(f"expected MODEL INPUT OUTPUT then key=value settings, got {' '.join(argv)!r}\n{USAGE}")
    model, source, output, *overrides = argv
    summary = recaption_shards(model, source, output, load_settings(overrides))
    if rank_zero_only.rank == 0:
        print(describe(summary))
    return 1 if unwritten_shards(summary) else 0  # the run is not done: a rerun retries those shards


if __name__ == "__main__":
    sys.exit(run_cli(main))
