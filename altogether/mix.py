"""Training sets from recaption outputs: mix alt-texts with synthetic captions, optionally CLIP-filtered.

CLIP training (paper §5.3, Appendix D) keeps each image's alt-text and swaps in the synthetic caption
with probability p = 0.15; text-to-image training (§5.4) uses p close to 1.0. Either kind of text can
first be filtered by CLIP score, by threshold or by keeping a top fraction (DataComp's filtering).

Inputs are recaption outputs (``<shard>.recaption.parquet|.jsonl``, see :mod:`altogether.recaption`; any other
file is refused, so a downloader's metadata Parquet is never taken for captions). Rows have ``key``,
``alt_text`` and ``caption`` (a string, or a list of strings when several captions were kept), optionally
``alt_clip_score`` / ``caption_clip_score`` (a number, or a list matching a caption list), ``img_path`` and
``url`` (strings). ``originals=`` takes the alt-texts from the original data instead (img2dataset's
metadata Parquet, a manifest), from the column ``alt_column=`` names.

Every random choice is drawn from a hash of ``(seed, key)``, so a row's outcome depends only on the seed
and its key: not on row order, sharding or the other rows.

Command line (``python -m altogether.mix`` is the same; ``--help`` lists every setting of :class:`MixSettings`)::

    altogether mix RECAPTIONS ... out=train.parquet|OUT_DIR [target=clip|t2i] [p=P] [both_columns=true]
        [originals=FILE_OR_PATTERN [alt_column=NAME]] [alt_threshold=T | alt_top=F]
        [caption_threshold=T | caption_top=F] [clip_model=NAME clip_pretrained=TAG]
        [image_root=DIR [allow_outside_root=true]] [with_images=true | images_from=SHARDS] [shard_size=N] [seed=N]
        [batch_rows=N] [progress=false]

Rows are streamed ``batch_rows`` at a time, so memory does not grow with the number of rows (:func:`mix_files`
says what is kept per row).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Optional

from .cli import PROGRESS_HELP, Command, progress, run_cli, setting
from .clip_score import ClipScorer, score_image_files
from .data.images import image_file, load_image
from .data.inputs import discover_shards
from .data.readers import IMAGE_EXTENSIONS, DamagedShard, expand_shards, iter_tar_samples, table_rows
from .data.records import IMAGE_FIELDS, BadRecord
from .io import atomic_open, replacing_dir
from .recaption import ALT_TEXT_COLUMN, CAPTION_COLUMN, recaption_output_problem

TARGET_P = {"clip": 0.15, "t2i": 1.0}
ALT, CAPTION = "alt", "caption"
TEXT_COLUMN = {ALT: ALT_TEXT_COLUMN, CAPTION: CAPTION_COLUMN}
SCORE_COLUMN = {ALT: "alt_clip_score", CAPTION: "caption_clip_score"}
PASSTHROUGH = IMAGE_FIELDS  # carried from the recaption rows (or the originals) into every sample
DEFAULT_ALT_COLUMN = ALT_TEXT_COLUMN
# open_clip's webdataset loader reads images under these extensions only (open_clip_train/data.py); others
# are re-encoded as PNG rather than silently lost.
OPEN_CLIP_IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")
# Rows handled together: a Parquet row group written, a batch of CLIP scoring. Memory holds one batch of rows and
# samples, whatever the number of rows.
DEFAULT_BATCH_ROWS = 10_000


class MixError(ValueError):
    """A problem with mixing inputs or options; the message names the file, row key or column."""


# ---------------------------------------------------------------------------------------------- reading


def _file_rows(path: Path) -> Iterator[dict]:
    """The rows of one input file; a line that is not a JSON object, a row without a key, or a file of no rows
    (recaption writes no output for a shard it captioned nothing of) raises :class:`MixError` naming the file."""
    rows = 0
    try:
        for number, row, problem in table_rows(path):
            if problem:
                raise MixError(f"{path}:{number}: {problem}")
            if row.get("key") is None:
                raise MixError(f"{path}: no 'key' column in row {number} (columns: {', '.join(map(str, row))})")
            rows += 1
            yield row
    except OSError as err:
        raise MixError(f"{path}: cannot read ({err.strerror})") from None
    if not rows:
        raise MixError(f"{path}: holds no rows (recaption writes no output for a shard it captioned nothing of)")


def iter_rows(
    paths: Sequence[str | os.PathLike], *, require: str | None = None, origins: dict[str, Path] | None = None
) -> Iterator[dict]:
    """Rows of one or more Parquet (``.parquet``) or JSONL files, streamed in order, keys as strings.

    ``origins`` (a new dict if not given) gets each key's file as its row goes by: it is how a repeated key is
    found, the one thing kept per row (a key and a shared path, about 100 bytes). Raises :class:`MixError` naming
    the file (and row) for a duplicate key, a non-string ``url`` or ``img_path``, or a file without the
    ``require`` column (in no row of a JSONL file; raised once the file is read, before its rows are used, by a
    caller that reads them all first, such as :func:`index_originals`).
    """
    origin = {} if origins is None else origins
    for path in map(Path, paths):
        columns: dict[str, None] = {}
        for row in _file_rows(path):
            key = str(row["key"])
            if key in origin:
                raise MixError(f"{path}: key {key!r} appears again (first in {origin[key]})")
            for name in PASSTHROUGH:
                if row.get(name) is not None and not isinstance(row[name], str):
                    raise MixError(f"{path}: row {key!r}: {name} must be a string, got {type(row[name]).__name__}")
            origin[key] = path
            if require is not None:
                columns.update(dict.fromkeys(row))
            yield {**row, "key": key}
        if require is not None and require not in columns:
            raise MixError(f"{path}: no column {require!r} (columns: {', '.join(map(str, columns)) or 'none'})")


def read_rows(
    paths: Sequence[str | os.PathLike], *, require: str | None = None, origins: dict[str, Path] | None = None
) -> list[dict]:
    """:func:`iter_rows` as a list (every row in memory: for small inputs and tests)."""
    return list(iter_rows(paths, require=require, origins=origins))


def check_recaption_outputs(paths: Sequence[str | os.PathLike]) -> None:
    """Raise :class:`MixError` for a file that is not a recaption output, saying why."""
    for path in map(Path, paths):
        if path.exists() and (problem := recaption_output_problem(path)):
            raise MixError(f"{path}: not a recaption output ({problem}); mix reads what altogether.recaption writes, "
                           "and takes original alt-texts with originals=")


def read_recaptions(paths: Sequence[str | os.PathLike], origins: dict[str, Path] | None = None) -> list[dict]:
    """:func:`read_rows` of recaption outputs (:func:`check_recaption_outputs` first)."""
    check_recaption_outputs(paths)
    return read_rows(paths, origins=origins)


def count_rows(paths: Sequence[str | os.PathLike]) -> int | None:
    """How many rows the files hold, from the Parquet footers (no data read); ``None`` if one is JSONL (a
    progress bar then counts without a total)."""
    import pyarrow.parquet as pq

    if not all(str(path).lower().endswith(".parquet") for path in paths):
        return None
    try:
        return sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
    except (OSError, ValueError):  # named by the read itself
        return None


def output_shard(path: Path) -> str:
    """The input shard a recaption output is for: ``00000`` for ``00000.recaption.parquet``."""
    for suffix in (".recaption.parquet", ".recaption.jsonl"):
        if path.name.endswith(suffix):
            return path.name.removesuffix(suffix)
    return path.stem


# What the join takes from an original row besides its alt-text (when the row has it).
CARRIED = (*PASSTHROUGH, SCORE_COLUMN[ALT])


def index_originals(originals: Iterable[dict], alt_column: str = DEFAULT_ALT_COLUMN) -> dict[str, tuple]:
    """``key -> (alt-text, url, img_path, alt_clip_score)`` of the original rows: the only part of them a join
    uses, so the originals are read once, streamed, and only these few short fields stay in memory."""
    return {row["key"]: (row.get(alt_column), *(row.get(name) for name in CARRIED)) for row in originals}


def join_rows(rows: Iterable[dict], index: dict[str, tuple], summary: MixSummary) -> Iterator[dict]:
    """Each recaption row with ``alt_text`` (and url, img_path, alt_clip_score where given) from
    :func:`index_originals`, streamed; a row without an original is dropped and counted in
    ``summary.missing_original``."""
    for row in rows:
        original = index.get(row["key"])
        if original is None:
            summary.missing_original += 1
            continue
        alt, *values = original
        carried = {name: value for name, value in zip(CARRIED, values) if value is not None}
        yield {**row, **carried, ALT_TEXT_COLUMN: alt}


def join_originals(
    rows: Sequence[dict], originals: Sequence[dict], alt_column: str = DEFAULT_ALT_COLUMN
) -> tuple[list[dict], int]:
    """Take ``alt_text`` from the originals' ``alt_column`` (and url, img_path, alt_clip_score where given), by key.

    ``alt_column``: ``alt_text`` (recaption's own), ``caption`` (img2dataset's metadata), ``alt`` (a manifest).
    Returns the joined rows and how many recaption rows had no original (they are dropped).
    """
    summary = MixSummary(mode="", p=0.0, seed=0)
    joined = list(join_rows(rows, index_originals(originals, alt_column), summary))
    return joined, summary.missing_original


# ---------------------------------------------------------------------------------------------- filtering


@dataclass(frozen=True)
class ScoreFilter:
    """Keep texts whose CLIP score is at least ``threshold``, or the ``top_fraction`` best (exactly one)."""

    threshold: float | None = None
    top_fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.top_fraction is None):
            raise MixError("a score filter takes exactly one of threshold or top_fraction")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise MixError(f"top fraction must be in (0, 1], got {self.top_fraction}")

    def keeps(self, scores: Sequence[float]) -> Iterator[bool]:
        """Keep-decision for each of ``scores`` in order: ``score >= threshold``, or the ``round(top_fraction * n)``
        highest (:func:`top_fraction_cut`); NaN is never kept by a threshold and ranks last."""
        if self.threshold is not None:
            return (score >= self.threshold for score in scores)
        return _top_fraction_keeps(scores, *top_fraction_cut(scores, self.top_fraction))


def top_fraction_cut(scores: Sequence[float], top_fraction: float) -> tuple[float, int]:
    """``(cut, ties)`` such that keeping, in order, every score above ``cut`` and the first ``ties`` scores equal to
    it keeps the ``round(top_fraction * n)`` highest, ties at the boundary going to the earlier position (NaN ranks
    last, as ``-inf``).

    The cut is the k-th highest score (``numpy.partition``, no full sort), so a stream can be filtered in a second
    pass while only the scores (8 bytes each) are held.
    """
    import numpy as np

    keep_count = round(top_fraction * len(scores))
    if keep_count == 0:
        return math.inf, 0
    ranked = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    cut = float(np.partition(ranked, len(ranked) - keep_count)[len(ranked) - keep_count])
    return cut, keep_count - int(np.count_nonzero(ranked > cut))


def _top_fraction_keeps(scores: Iterable[float], cut: float, ties: int) -> Iterator[bool]:
    for score in scores:
        rank = _rankable(score)
        if rank == cut and ties > 0:
            ties -= 1
            yield True
        else:
            yield rank > cut


def filter_by_score(
    scores: Sequence[float], *, threshold: float | None = None, top_fraction: float | None = None
) -> list[bool]:
    """Keep-mask over ``scores`` (:meth:`ScoreFilter.keeps`): ``score >= threshold``, or the
    ``round(top_fraction * n)`` highest.

    Ties at the top-fraction boundary go to the earlier position; NaN scores are never kept by a
    threshold and rank last.
    """
    return list(ScoreFilter(threshold, top_fraction).keeps(scores))


def _rankable(score: float) -> float:
    return -math.inf if math.isnan(score) else score


def _candidates(row: dict, kind: str) -> list[tuple[str, float | None]]:
    """``(text, score)`` for each non-empty text of one kind in a row; a single score covers a whole list."""
    value, score = row.get(TEXT_COLUMN[kind]), row.get(SCORE_COLUMN[kind])
    texts = value if isinstance(value, list) else [value]
    scores = score if isinstance(score, list) else [score] * len(texts)
    if len(scores) != len(texts):
        raise MixError(f"row {row['key']!r}: {SCORE_COLUMN[kind]} has {len(scores)} scores for {len(texts)} text(s)")
    for text, number in zip(texts, scores):
        if text is not None and not isinstance(text, str):
            got = type(text).__name__
            raise MixError(f"row {row['key']!r}: {TEXT_COLUMN[kind]}: expected a string or list of strings, got {got}")
        if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))):
            raise MixError(f"row {row['key']!r}: {SCORE_COLUMN[kind]}: expected a number, got {number!r}")
    return [(text, number) for text, number in zip(texts, scores) if text and text.strip()]


@dataclass
class Survey:
    """What a first pass over the rows learns for the second: which passthrough columns any row fills (the
    Parquet schema), every candidate text's score of each filtered kind in stream order (``array('d')``, 8 bytes
    a text: what a top-fraction filter ranks), and how many rows got CLIP scores computed."""

    passthrough: list[str]
    scores: dict[str, array]
    rows_scored: int = 0


def survey_rows(
    rows: Iterable[dict],
    kinds: Iterable[str],
    *,
    score_batch: Callable[[list[dict]], int] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Survey:
    """The first pass (:class:`Survey`), streamed in batches of ``batch_rows``; ``score_batch`` (if given) fills
    missing scores of a batch in place first and returns how many rows it scored (:func:`add_clip_scores`).

    Raises :class:`MixError` naming the row for a text of a filtered kind without a score.
    """
    survey = Survey(passthrough=[], scores={kind: array("d") for kind in kinds})
    filled = dict.fromkeys(PASSTHROUGH, False)
    for batch in _batches(rows, batch_rows):
        if score_batch is not None:
            survey.rows_scored += score_batch(batch)
        for row in batch:
            for name in PASSTHROUGH:
                filled[name] = filled[name] or row.get(name) is not None
            for kind, scores in survey.scores.items():
                for _, score in _candidates(row, kind):
                    if score is None:
                        raise MixError(
                            f"row {row['key']!r}: no {SCORE_COLUMN[kind]}; filtering needs a score for every {kind} "
                            "text (add the column, or set clip_model= with image_root= to compute it)"
                        )
                    scores.append(float(score))
    survey.passthrough = [name for name in PASSTHROUGH if filled[name]]
    return survey


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


# ---------------------------------------------------------------------------------------------- mixing


@dataclass
class MixSummary:
    """How many rows came in, went out, and which kind of text each sample kept."""

    mode: str
    p: float
    seed: int
    rows_in: int = 0
    rows_out: int = 0
    kept_alt: int = 0  # samples whose text is the alt-text (both-columns: rows with an alt-text)
    kept_caption: int = 0  # samples whose text is a synthetic caption (both-columns: rows with a caption)
    fell_back_to_alt: int = 0  # drew the caption, but the row had none left (missing or filtered)
    fell_back_to_caption: int = 0  # drew the alt-text, but the row had none left
    dropped_no_text: int = 0
    alt_filtered_out: int = 0
    caption_filtered_out: int = 0
    missing_original: int = 0


def _draws(seed: int, key: str) -> tuple[float, float, float]:
    """Three uniforms in [0, 1) that depend only on ``seed`` and ``key``."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=24).digest()
    return tuple(int.from_bytes(digest[i : i + 8], "big") / 2.0**64 for i in (0, 8, 16))  # type: ignore[return-value]


def _pick(pairs: list[tuple[str, float | None]], u: float) -> str | None:
    return pairs[int(u * len(pairs))][0] if pairs else None


class Mixer:
    """Turns recaption rows into training samples one at a time, counting into ``summary`` (:class:`MixSummary`).

    Default: one ``text`` per sample, the synthetic caption with probability ``p`` and the alt-text
    otherwise (``source`` says which). A row whose drawn kind is missing or filtered out falls back to
    the other kind; a row with neither is dropped (``None``). With ``both_columns``, samples carry ``alt_text`` and
    ``caption`` for loaders that draw per epoch. Several captions (or alt-texts) in a row: one is chosen
    uniformly. The ``passthrough`` columns (url, img_path) are kept.

    ``filters``: kind (``alt``, ``caption``) -> :class:`ScoreFilter`, applied to ``survey.scores[kind]`` (the
    first pass, :func:`survey_rows`): rows must come in the order they were surveyed.
    """

    def __init__(self, p: float, seed: int = 0, *, both_columns: bool = False, passthrough: Sequence[str] = (),
                 filters: dict[str, ScoreFilter] | None = None, survey: Survey | None = None):
        if not 0.0 <= p <= 1.0:
            raise MixError(f"p must be in [0, 1], got {p}")
        filters = filters or {}
        if filters and survey is None:
            raise ValueError("filters need the survey's scores")
        self.p, self.seed, self.both_columns, self.passthrough = p, seed, both_columns, list(passthrough)
        self.keeps = {kind: score_filter.keeps(survey.scores[kind]) for kind, score_filter in filters.items()}
        self.summary = MixSummary(mode="both-columns" if both_columns else "mixed", p=p, seed=seed)

    def _kept(self, row: dict, kind: str) -> list[tuple[str, float | None]]:
        pairs = _candidates(row, kind)
        if kind not in self.keeps:
            return pairs
        kept = [pair for pair in pairs if next(self.keeps[kind])]
        removed = len(pairs) - len(kept)
        if kind == ALT:
            self.summary.alt_filtered_out += removed
        else:
            self.summary.caption_filtered_out += removed
        return kept

    def __call__(self, row: dict) -> dict | None:
        summary = self.summary
        summary.rows_in += 1
        alt_pairs, caption_pairs = self._kept(row, ALT), self._kept(row, CAPTION)
        if not alt_pairs and not caption_pairs:
            summary.dropped_no_text += 1
            return None
        u_mix, u_alt, u_caption = _draws(self.seed, row["key"])
        alt, caption = _pick(alt_pairs, u_alt), _pick(caption_pairs, u_caption)
        sample: dict[str, Any] = {"key": row["key"]}
        if self.both_columns:
            sample.update(alt_text=alt, caption=caption)
            summary.kept_alt += alt is not None
            summary.kept_caption += caption is not None
        else:
            wants_caption = u_mix < self.p
            use_caption = caption is not None if wants_caption else alt is None
            summary.fell_back_to_alt += wants_caption and not use_caption
            summary.fell_back_to_caption += not wants_caption and use_caption
            summary.kept_caption += use_caption
            summary.kept_alt += not use_caption
            sample.update(text=caption if use_caption else alt, source=CAPTION if use_caption else ALT)
        sample.update((name, row.get(name)) for name in self.passthrough)
        summary.rows_out += 1
        return sample

    def samples(self, rows: Iterable[dict]) -> Iterator[dict]:
        """The samples of ``rows``, streamed."""
        return (sample for row in rows if (sample := self(row)) is not None)


def _filters(alt_filter: ScoreFilter | None, caption_filter: ScoreFilter | None) -> dict[str, ScoreFilter]:
    return {kind: f for kind, f in ((ALT, alt_filter), (CAPTION, caption_filter)) if f is not None}


def mix_captions(
    rows: Sequence[dict],
    p: float,
    seed: int = 0,
    *,
    both_columns: bool = False,
    alt_filter: ScoreFilter | None = None,
    caption_filter: ScoreFilter | None = None,
) -> tuple[list[dict], MixSummary]:
    """:class:`Mixer` over rows in memory (both passes over the same list): the samples and the summary."""
    filters = _filters(alt_filter, caption_filter)
    survey = survey_rows(rows, filters)
    mixer = Mixer(p, seed, both_columns=both_columns, passthrough=survey.passthrough, filters=filters, survey=survey)
    return list(mixer.samples(rows)), mixer.summary


# ---------------------------------------------------------------------------------------------- scores


def _image_file(row: dict, image_root: str | os.PathLike | None, allow_outside_root: bool) -> Path:
    try:
        return image_file(row["img_path"], image_root, key=row["key"], allow_outside_root=allow_outside_root)
    except BadRecord as err:
        raise MixError(str(err).replace("record ", "row ", 1)) from None


def add_clip_scores(
    rows: Sequence[dict],
    scorer: Any,
    image_root: str | os.PathLike | None,
    kinds: Sequence[str],
    *,
    allow_outside_root: bool = False,
) -> int:
    """Fill missing ``alt_clip_score`` / ``caption_clip_score`` (CLIPScore, 0-100) from local images, in place.

    Only rows with an ``img_path`` that exists under ``image_root`` are scored (one outside it is an error,
    see :func:`altogether.data.images.image_file`); a text list gets a list of scores. Returns how many rows got new
    scores.
    """
    jobs, images, texts = [], [], []
    for index, row in enumerate(rows):
        path = _image_file(row, image_root, allow_outside_root) if row.get("img_path") else None
        if path is None or not path.is_file():
            continue
        for kind in kinds:
            if row.get(SCORE_COLUMN[kind]) is not None:
                continue
            value = row.get(TEXT_COLUMN[kind])
            values = value if isinstance(value, list) else [value]
            row[SCORE_COLUMN[kind]] = [None] * len(values) if isinstance(value, list) else None
            for position, text in enumerate(values):
                if isinstance(text, str) and text.strip():
                    jobs.append((index, kind, position if isinstance(value, list) else None))
                    images.append(path)
                    texts.append(text)
    scores = score_image_files(scorer, images, texts)
    for (index, kind, position), score in zip(jobs, scores):
        if position is None:
            rows[index][SCORE_COLUMN[kind]] = score
        else:
            rows[index][SCORE_COLUMN[kind]][position] = score
    return len({index for index, _, _ in jobs})


# ---------------------------------------------------------------------------------------------- writing


def _parquet_schema(samples: Sequence[dict], both_columns: bool):
    import pyarrow as pa

    columns = ["key", ALT_TEXT_COLUMN, CAPTION_COLUMN] if both_columns else ["key", "text", "source"]
    columns += [name for name in PASSTHROUGH if samples and name in samples[0]]
    return pa.schema([(name, pa.string()) for name in columns])


def summary_path(parquet: str | os.PathLike) -> Path:
    """Where :func:`write_parquet` puts a Parquet output's summary: ``train.summary.json`` for ``train.parquet``."""
    return Path(parquet).with_suffix(".summary.json")


def write_parquet(samples: Iterable[dict], path: str | os.PathLike, *, both_columns: bool = False,
                  summary: Callable[[], dict] | None = None, batch_rows: int = DEFAULT_BATCH_ROWS) -> int:
    """Write samples as one Parquet file (all columns strings: key, text and source, or key, alt_text and caption
    with ``both_columns``, then the url / img_path columns the first sample has: a :class:`Mixer` gives every
    sample the same ones) and, given ``summary`` (called once every sample is written), :func:`summary_path`
    beside it; returns the number of samples.

    Streamed: ``batch_rows`` samples per row group, one group in memory. Both files or neither, each written
    beside its target and renamed into place once both are written (:func:`altogether.io.atomic_open`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    written, writer = 0, None
    with ExitStack() as stack:
        handle = stack.enter_context(atomic_open(path))
        for batch in _batches(samples, batch_rows):
            if writer is None:  # the first batch gives the columns
                schema = _parquet_schema(batch, both_columns)
                writer = stack.enter_context(pq.ParquetWriter(handle, schema))
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            written += len(batch)
        if writer is None:
            pq.write_table(pa.Table.from_pylist([], schema=_parquet_schema([], both_columns)), handle)
        else:
            writer.close()  # the footer, before the file is flushed and renamed
        if summary is not None:
            text = json.dumps(summary(), indent=2) + "\n"
            stack.enter_context(atomic_open(summary_path(path))).write(text.encode("utf-8"))
    return written


def _check_key(key: str) -> None:
    """A webdataset key becomes the stem of tar member names, so it must be one plain name component."""
    if "." in key:
        raise MixError(f"row {key!r}: webdataset keys cannot contain '.' (it separates key and extension)")
    if not key or "/" in key or "\\" in key or not key.isprintable():
        raise MixError(f"row {key!r}: a webdataset key names tar members, so it must be a non-empty name without "
                       "'/', '\\' or control characters")


ImageSource = Callable[[dict], tuple[str, bytes]]  # sample -> (tar member extension, image bytes)


def _open_clip_image(data: bytes, extension: str, key: str) -> tuple[str, bytes]:
    """``(extension, bytes)`` as open_clip's loader reads them: its formats as they are, others re-encoded as PNG."""
    if extension in OPEN_CLIP_IMAGE_EXTENSIONS:
        return extension, data
    try:
        image = load_image(data, key=key)
    except BadRecord as err:
        raise MixError(str(err)) from None
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "png", buffer.getvalue()


def image_files(image_root: str | os.PathLike | None, *, allow_outside_root: bool = False) -> ImageSource:
    """Images from the files rows name in ``img_path``, inside ``image_root`` (:func:`image_file`)."""

    def image(sample: dict) -> tuple[str, bytes]:
        key = sample["key"]
        if not sample.get("img_path"):
            raise MixError(f"row {key!r}: with_images=true needs an img_path")
        path = _image_file(sample, image_root, allow_outside_root)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise MixError(f"row {key!r}: cannot read image {path} ({err.strerror})") from None
        return _open_clip_image(data, path.suffix.lstrip(".").lower(), key)

    return image


class TarImages:
    """Images from the original webdataset shards, by the recaption output's shard and the row's key.

    ``shards``: shard name -> tar path; ``origins``: row key -> its recaption output (:func:`output_shard` names
    the shard; :func:`iter_rows` fills it as rows are read, before their samples come here). Samples arrive shard
    after shard (in input order), so one shard's images are held at a time.
    """

    def __init__(self, shards: dict[str, str], origins: Mapping[str, Path]):
        self.shards, self.origins = shards, origins
        self.current: str | None = None
        self.members: dict[str, dict[str, bytes]] = {}

    def __call__(self, sample: dict) -> tuple[str, bytes]:
        key = sample["key"]
        shard = output_shard(self.origins[key])
        if shard != self.current:
            if shard not in self.shards:
                raise MixError(f"row {key!r}: its recaption output is for shard {shard!r}, which images_from "
                               f"does not have (it has {len(self.shards)} shard(s))")
            try:
                self.members = {s["__key__"]: {e: s[e] for e in IMAGE_EXTENSIONS if e in s}
                                for s in iter_tar_samples(self.shards[shard])}
            except DamagedShard as err:
                raise MixError(str(err)) from None
            self.current = shard
        members = self.members.get(key)
        if not members:
            raise MixError(f"row {key!r}: no image ({', '.join(IMAGE_EXTENSIONS)}) under that key in "
                           f"{self.shards[shard]}")
        extension = next(iter(members))
        return _open_clip_image(members[extension], extension, key)


def _tar_sample(sample: dict, images: ImageSource | None) -> dict:
    key = sample["key"]
    _check_key(key)
    meta = {name: value for name, value in sample.items() if value is not None}
    out: dict[str, Any] = {"__key__": key, "json": meta}
    if "text" in sample:
        out["txt"] = sample["text"]
    for name in (ALT_TEXT_COLUMN, CAPTION_COLUMN):
        if sample.get(name) is not None:
            out[f"{name}.txt"] = sample[name]
    if images is not None:
        extension, data = images(sample)
        out[extension] = data
    return out


def _check_out_dir(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise MixError(f"{target}: already exists and is not an empty folder; remove it or choose another out=")


def write_webdataset(
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    summary: Callable[[], dict],
    *,
    shard_size: int = 10000,
    images: ImageSource | None = None,
) -> list[str]:
    """Write ``shard-000000.tar, ...`` and ``summary.json`` (``summary()``, called once every sample is written, with
    ``shards`` added) into ``out_dir``, all or nothing; returns the shard names. Streamed: one sample in memory.

    Each sample has ``txt`` (mixed) or ``alt_text.txt`` / ``caption.txt`` (both columns), ``json`` with
    its columns, and with ``images`` (:func:`image_files`, :class:`TarImages`) the image under its extension
    (``jpg``, ``png``, ``jpeg``, ``webp``: what open_clip's loader reads; other formats are re-encoded as
    ``png``). Keys are checked to be plain names, never paths.
    ``out_dir`` must not exist or be empty; everything is written to a temporary folder beside it first.
    """
    from webdataset import ShardWriter

    target = Path(out_dir)
    _check_out_dir(target)
    if shard_size < 1:
        raise MixError(f"shard_size must be >= 1, got {shard_size}")
    with replacing_dir(target) as staging:
        with ShardWriter(str(staging / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as writer:
            for sample in samples:
                writer.write(_tar_sample(sample, images))
        shards = sorted(path.name for path in staging.glob("shard-*.tar"))
        summary_text = json.dumps({**summary(), "shards": shards}, indent=2) + "\n"
        (staging / "summary.json").write_text(summary_text, encoding="utf-8")
    return shards


# ---------------------------------------------------------------------------------------------- command line


@dataclass
class MixSettings:
    """The ``key=value`` settings of ``altogether mix`` (the keyword arguments of :func:`mix_files`)."""

    out: str = setting(help="OUT.parquet: one Parquet file (and OUT.summary.json); else a new webdataset folder")
    target: str = setting("clip", "clip (p=0.15) or t2i (p=1.0)")
    p: Optional[float] = setting(None, "probability of using the synthetic caption (default: by target)")
    seed: int = setting(0, "seed of every random choice (drawn per row from a hash of seed and key)")
    both_columns: bool = setting(False, "emit alt_text and caption, not one drawn text")
    originals: Optional[str] = setting(None, "original data for the alt-texts: a .parquet / JSONL file with key, "
                                             "or a pattern of them ('downloads/*.parquet')")
    alt_column: str = setting(DEFAULT_ALT_COLUMN, "alt-text column of originals (img2dataset: caption; manifests: alt)")
    alt_threshold: Optional[float] = setting(None, f"keep alt-texts with {SCORE_COLUMN[ALT]} >= this")
    alt_top: Optional[float] = setting(None, f"keep this fraction of alt-texts, highest {SCORE_COLUMN[ALT]} first")
    caption_threshold: Optional[float] = setting(None, f"keep captions with {SCORE_COLUMN[CAPTION]} >= this")
    caption_top: Optional[float] = setting(None, f"keep this fraction of captions, highest {SCORE_COLUMN[CAPTION]} "
                                                 "first")
    clip_model: Optional[str] = setting(None, "open_clip model to compute missing scores from local images")
    clip_pretrained: Optional[str] = setting(None, "open_clip pretrained tag or checkpoint file")
    device: str = setting("cpu", "device for the CLIP model")
    image_root: Optional[str] = setting(None, "folder that img_path is relative to (default: the current folder)")
    allow_outside_root: bool = setting(False, "let img_path name files outside image_root (absolute paths, '..')")
    with_images: bool = setting(False, "copy each image file into the webdataset shards")
    images_from: Optional[str] = setting(None, "the recaptioned tar shards (as given to recaption): copy each image "
                                               "from its shard, found by the output's shard name and the key")
    shard_size: int = setting(10000, "samples per webdataset shard")
    batch_rows: int = setting(DEFAULT_BATCH_ROWS, "rows read, scored and written together (a Parquet row group): "
                                                  "what memory holds, whatever the number of rows")
    progress: bool = setting(True, PROGRESS_HELP)


def _score_filter(threshold: float | None, top: float | None, kind: str) -> ScoreFilter | None:
    if threshold is not None and top is not None:
        raise MixError(f"{kind}_threshold and {kind}_top are alternatives; give one")
    if threshold is None and top is None:
        return None
    try:
        return ScoreFilter(threshold, top)
    except MixError as err:  # a top fraction out of range: name the setting
        raise MixError(f"{kind}_top={top}: {err}") from None


def _check_settings(s: MixSettings) -> None:
    if s.target not in TARGET_P:
        raise MixError(f"target={s.target!r} is not one of {', '.join(sorted(TARGET_P))}")
    if s.clip_pretrained and not s.clip_model:
        raise MixError("clip_pretrained needs clip_model")
    if s.clip_model and not any(v is not None for v in (s.alt_threshold, s.alt_top, s.caption_threshold,
                                                         s.caption_top)):
        raise MixError("clip_model only computes scores for filtering; "
                       "add alt_threshold/alt_top or caption_threshold/caption_top")
    if s.alt_column != DEFAULT_ALT_COLUMN and not s.originals:
        raise MixError("alt_column names the alt-text column of originals; add originals=")
    if s.images_from and (s.with_images or str(s.out).endswith(".parquet")):
        raise MixError("images_from writes images into webdataset shards: give a folder as out=, "
                       "without with_images")


def mix_files(
    inputs: Sequence[str | os.PathLike], settings: MixSettings, load_scorer: Callable[..., Any] = ClipScorer.from_open_clip
) -> dict:
    """Read recaption outputs, mix (and filter) their texts, write ``settings.out``; returns the summary written.

    Streamed, ``batch_rows`` rows at a time. Beyond one batch, memory holds per row only its key and file
    (:func:`iter_rows`: to refuse a repeated key, and to find a row's shard for ``images_from``); with
    ``originals`` each original's alt-text, url, img_path and alt_clip_score (:func:`index_originals`); with a
    filter each candidate text's score (8 bytes). A filter or a Parquet output (whose columns depend on every row)
    reads the inputs twice: the first pass (:func:`survey_rows`) computes CLIP scores if asked and collects what
    the second, which mixes and writes, needs.

    ``load_scorer(clip_model, clip_pretrained, device)`` gives the CLIP scorer when ``clip_model`` is set.
    Raises :class:`MixError` (a ``ValueError``) naming the file, row or setting for bad input; nothing is written
    then.
    """
    s = settings
    _check_settings(s)
    p = TARGET_P[s.target] if s.p is None else s.p
    alt_filter = _score_filter(s.alt_threshold, s.alt_top, ALT)
    caption_filter = _score_filter(s.caption_threshold, s.caption_top, CAPTION)
    filters = _filters(alt_filter, caption_filter)
    parquet = str(s.out).endswith(".parquet")
    if not parquet:
        _check_out_dir(Path(s.out))  # before a long first pass
    check_recaption_outputs(inputs)
    index = None
    if s.originals:
        originals = expand_shards(s.originals)
        if not originals:
            raise MixError(f"originals={s.originals}: matches no file")
        read = progress(iter_rows(originals, require=s.alt_column), "mix: originals", enabled=s.progress,
                        total=count_rows(originals))
        index = index_originals(read, s.alt_column)
    passes = 2 if filters or parquet else 1
    total = count_rows(inputs)

    def rows(number: int, origins: dict[str, Path], summary: MixSummary) -> Iterator[dict]:
        label = "mix" if passes == 1 else f"mix pass {number}/{passes}"
        read = progress(iter_rows(inputs, origins=origins), label, enabled=s.progress, total=total)
        return read if index is None else join_rows(read, index, summary)

    survey = Survey(passthrough=list(PASSTHROUGH), scores={})  # webdataset drops a passthrough value that is None
    if passes == 2:
        score_batch = None
        if s.clip_model:
            score_batch = partial(add_clip_scores, scorer=load_scorer(s.clip_model, s.clip_pretrained, s.device),
                                  image_root=s.image_root, kinds=list(filters), allow_outside_root=s.allow_outside_root)
        first = MixSummary(mode="", p=p, seed=s.seed)  # the second pass counts
        survey = survey_rows(rows(1, {}, first), filters, score_batch=score_batch, batch_rows=s.batch_rows)
    mixer = Mixer(p, s.seed, both_columns=s.both_columns, passthrough=survey.passthrough, filters=filters,
                  survey=survey)
    origins: dict[str, Path] = {}
    samples = mixer.samples(rows(passes, origins, mixer.summary))

    def summary() -> dict:
        return {
            "target": s.target,
            **asdict(mixer.summary),
            "alt_filter": asdict(alt_filter) if alt_filter else None,
            "caption_filter": asdict(caption_filter) if caption_filter else None,
            "rows_scored_with_clip": survey.rows_scored,
            "inputs": [str(path) for path in inputs],
            "out": str(s.out),
        }

    if parquet:
        write_parquet(samples, s.out, both_columns=s.both_columns, summary=summary, batch_rows=s.batch_rows)
        return summary()
    images = None
    if s.with_images:
        images = image_files(s.image_root, allow_outside_root=s.allow_outside_root)
    elif s.images_from:
        try:
            shards = {shard.name: shard.path for shard in discover_shards(s.images_from, input_format="webdataset")}
        except (OSError, ValueError) as err:
            raise MixError(f"images_from={s.images_from}: {err}") from None
        images = TarImages(shards, origins)
    shards = write_webdataset(samples, s.out, summary, shard_size=s.shard_size, images=images)
    return {**summary(), "shards": shards}


def _run(inputs: list[str], settings: MixSettings, *, load_scorer: Callable[..., Any]) -> int:
    summary = mix_files(inputs, settings, load_scorer)
    print(json.dumps(summary, indent=2))
    if summary["missing_original"]:
        print(f"warning: {summary['missing_original']} recaption row(s) had no row in originals and were dropped",
              file=sys.stderr)
    return 0


def main(argv: Sequence[str], *, load_scorer: Callable[..., Any] = ClipScorer.from_open_clip) -> int:
    """``altogether mix RECAPTIONS ... out=PATH [key=value ...]``; ``load_scorer`` is injectable for tests."""
    command = Command("mix alt-texts and synthetic captions into a training set (docs/annotation.md)",
                      {"RECAPTIONS...": "recaption outputs: <shard>.recaption.parquet or .jsonl"}, MixSettings,
                      partial(_run, load_scorer=load_scorer))
    return command("altogether mix", argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
