"""Training sets from recaption outputs: mix alt-texts with synthetic captions, optionally CLIP-filtered.

CLIP training (paper §5.3, Appendix D) keeps each image's alt-text and swaps in the synthetic caption
with probability p = 0.15; text-to-image training (§5.4) uses p close to 1.0. Either kind of text can
first be filtered by CLIP score, by threshold or by keeping a top fraction (DataComp's filtering).

Inputs are recaption outputs (``<shard>.recaption.parquet|.jsonl``, see :mod:`altogether.recaption`; any other
file is refused, so a downloader's metadata Parquet is never taken for captions). Rows have ``key``,
``alt_text`` and ``caption`` (a string, or a list of strings when several captions were kept), optionally
``alt_clip_score`` / ``caption_clip_score`` (a number, or a list matching a caption list), ``img_path`` and
``url`` (strings). ``--originals`` takes the alt-texts from the original data instead (img2dataset's
metadata Parquet, a manifest), from the column ``--alt-column`` names.

Every random choice is drawn from a hash of ``(seed, key)``, so a row's outcome depends only on the seed
and its key: not on row order, sharding or the other rows.

CLI::

    python -m altogether.mix RECAPTIONS [...] --out train.parquet|OUT_DIR [--target clip|t2i] [--p P]
        [--both-columns] [--originals FILE ... [--alt-column NAME]] [--alt-threshold T | --alt-top F]
        [--caption-threshold T | --caption-top F] [--clip-model NAME --clip-pretrained TAG]
        [--image-root DIR [--allow-outside-root]] [--with-images | --images-from SHARDS] [--shard-size N] [--seed N]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from altogether.annotate import AnnotationError, atomic_write_text, clip_score_files, load_clip_scorer
from altogether.data.images import load_image
from altogether.data.inputs import discover_shards
from altogether.data.readers import IMAGE_EXTENSIONS, DamagedShard, iter_tar_samples
from altogether.data.records import BadRecord
from altogether.io import jsonl_lines
from altogether.recaption import recaption_output_problem

TARGET_P = {"clip": 0.15, "t2i": 1.0}
ALT, CAPTION = "alt", "caption"
TEXT_COLUMN = {ALT: "alt_text", CAPTION: "caption"}
SCORE_COLUMN = {ALT: "alt_clip_score", CAPTION: "caption_clip_score"}
PASSTHROUGH = ("url", "img_path")
DEFAULT_ALT_COLUMN = "alt_text"
# open_clip's webdataset loader reads images under these extensions only (open_clip_train/data.py); others
# are re-encoded as PNG rather than silently lost.
OPEN_CLIP_IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")


class MixError(ValueError):
    """A problem with mixing inputs or options; the message names the file, row key or column."""


# ---------------------------------------------------------------------------------------------- reading


def _read_one(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise MixError(f"{path}: cannot read Parquet ({err})") from None
        if "key" not in table.column_names:
            raise MixError(f"{path}: no 'key' column (columns: {', '.join(table.column_names)})")
        return table.to_pylist()
    rows = []
    try:
        for number, row, problem in jsonl_lines(path):
            if problem:
                raise MixError(f"{path}:{number}: {problem}")
            if not isinstance(row, dict) or row.get("key") is None:
                raise MixError(f"{path}:{number}: expected a JSON object with a 'key'")
            rows.append(row)
    except OSError as err:
        raise MixError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise MixError(f"{path}:{_first_non_utf8_line(path)}") from None
    return rows


def _first_non_utf8_line(path: Path) -> str:
    """``"<line>: not UTF-8 text (...)"`` for the first line that does not decode (text reads decode in chunks,
    so the error itself does not know its line)."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"{number}: not UTF-8 text ({err.reason} at byte {err.start} of the line)"
    return "1: not UTF-8 text"


def read_rows(
    paths: Sequence[str | os.PathLike], *, require: str | None = None, origins: dict[str, Path] | None = None
) -> list[dict]:
    """Rows of one or more Parquet (``.parquet``) or JSONL files, keys as strings; ``origins`` (if given) gets
    each key's file.

    Raises :class:`MixError` naming the file (and row) for a duplicate key, a non-string ``url`` or
    ``img_path``, or a file without the ``require`` column (in no row of a JSONL file).
    """
    rows, origin = [], {}
    for path in map(Path, paths):
        file_rows = _read_one(path)
        columns = dict.fromkeys(name for row in file_rows for name in row)
        if require is not None and require not in columns:
            raise MixError(f"{path}: no column {require!r} (columns: {', '.join(map(str, columns)) or 'none'})")
        for row in file_rows:
            key = str(row["key"])
            if key in origin:
                raise MixError(f"{path}: key {key!r} appears again (first in {origin[key]})")
            for name in PASSTHROUGH:
                if row.get(name) is not None and not isinstance(row[name], str):
                    raise MixError(f"{path}: row {key!r}: {name} must be a string, got {type(row[name]).__name__}")
            origin[key] = path
            rows.append({**row, "key": key})
    if origins is not None:
        origins.update(origin)
    return rows


def read_recaptions(paths: Sequence[str | os.PathLike], origins: dict[str, Path] | None = None) -> list[dict]:
    """:func:`read_rows` of recaption outputs; a file that is not one is a :class:`MixError` saying why."""
    for path in map(Path, paths):
        if path.exists() and (problem := recaption_output_problem(path)):
            raise MixError(f"{path}: not a recaption output ({problem}); mix reads what altogether.recaption writes, "
                           "and takes original alt-texts with --originals")
    return read_rows(paths, origins=origins)


def output_shard(path: Path) -> str:
    """The input shard a recaption output is for: ``00000`` for ``00000.recaption.parquet``."""
    for suffix in (".recaption.parquet", ".recaption.jsonl"):
        if path.name.endswith(suffix):
            return path.name.removesuffix(suffix)
    return path.stem


def join_originals(
    rows: Sequence[dict], originals: Sequence[dict], alt_column: str = DEFAULT_ALT_COLUMN
) -> tuple[list[dict], int]:
    """Take ``alt_text`` from the originals' ``alt_column`` (and url, img_path, alt_clip_score where given), by key.

    ``alt_column``: ``alt_text`` (recaption's own), ``caption`` (img2dataset's metadata), ``alt`` (a manifest).
    Returns the joined rows and how many recaption rows had no original (they are dropped).
    """
    by_key = {row["key"]: row for row in originals}
    joined, missing = [], 0
    for row in rows:
        original = by_key.get(row["key"])
        if original is None:
            missing += 1
            continue
        carried = {name: original[name] for name in (*PASSTHROUGH, SCORE_COLUMN[ALT]) if original.get(name) is not None}
        joined.append({**row, **carried, "alt_text": original.get(alt_column)})
    return joined, missing


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


def filter_by_score(
    scores: Sequence[float], *, threshold: float | None = None, top_fraction: float | None = None
) -> list[bool]:
    """Keep-mask over ``scores``: ``score >= threshold``, or the ``round(top_fraction * n)`` highest.

    Ties at the top-fraction boundary go to the earlier position; NaN scores are never kept by a
    threshold and rank last.
    """
    ScoreFilter(threshold, top_fraction)
    if threshold is not None:
        return [score >= threshold for score in scores]
    keep_count = round(top_fraction * len(scores))
    ranked = sorted(range(len(scores)), key=lambda i: (-_rankable(scores[i]), i))
    kept = set(ranked[:keep_count])
    return [i in kept for i in range(len(scores))]


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


def _filter_candidates(
    rows: Sequence[dict], candidates: list[list[tuple[str, float | None]]], kind: str, score_filter: ScoreFilter
) -> int:
    """Apply ``score_filter`` to one kind of text pooled over all rows, in place; returns how many were removed."""
    scores = []
    for row, pairs in zip(rows, candidates):
        for _, score in pairs:
            if score is None:
                raise MixError(
                    f"row {row['key']!r}: no {SCORE_COLUMN[kind]}; filtering needs a score for every {kind} text "
                    "(add the column, or pass --clip-model with --image-root to compute it)"
                )
            scores.append(float(score))
    keep = iter(filter_by_score(scores, threshold=score_filter.threshold, top_fraction=score_filter.top_fraction))
    removed = 0
    for index, pairs in enumerate(candidates):
        candidates[index] = [pair for pair in pairs if next(keep)]
        removed += len(pairs) - len(candidates[index])
    return removed


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


def mix_captions(
    rows: Sequence[dict],
    p: float,
    seed: int = 0,
    *,
    both_columns: bool = False,
    alt_filter: ScoreFilter | None = None,
    caption_filter: ScoreFilter | None = None,
) -> tuple[list[dict], MixSummary]:
    """Turn recaption rows into training samples.

    Default: one ``text`` per sample, the synthetic caption with probability ``p`` and the alt-text
    otherwise (``source`` says which). A row whose drawn kind is missing or filtered out falls back to
    the other kind; a row with neither is dropped. With ``both_columns``, samples carry ``alt_text`` and
    ``caption`` for loaders that draw per epoch. Several captions (or alt-texts) in a row: one is chosen
    uniformly. Passthrough columns (url, img_path) are kept.
    """
    if not 0.0 <= p <= 1.0:
        raise MixError(f"p must be in [0, 1], got {p}")
    summary = MixSummary(mode="both-columns" if both_columns else "mixed", p=p, seed=seed, rows_in=len(rows))
    alts = [_candidates(row, ALT) for row in rows]
    captions = [_candidates(row, CAPTION) for row in rows]
    if alt_filter:
        summary.alt_filtered_out = _filter_candidates(rows, alts, ALT, alt_filter)
    if caption_filter:
        summary.caption_filtered_out = _filter_candidates(rows, captions, CAPTION, caption_filter)
    passthrough = [name for name in PASSTHROUGH if any(row.get(name) is not None for row in rows)]
    samples = []
    for row, alt_pairs, caption_pairs in zip(rows, alts, captions):
        if not alt_pairs and not caption_pairs:
            summary.dropped_no_text += 1
            continue
        u_mix, u_alt, u_caption = _draws(seed, row["key"])
        alt, caption = _pick(alt_pairs, u_alt), _pick(caption_pairs, u_caption)
        sample: dict[str, Any] = {"key": row["key"]}
        if both_columns:
            sample.update(alt_text=alt, caption=caption)
            summary.kept_alt += alt is not None
            summary.kept_caption += caption is not None
        else:
            wants_caption = u_mix < p
            use_caption = caption is not None if wants_caption else alt is None
            summary.fell_back_to_alt += wants_caption and not use_caption
            summary.fell_back_to_caption += not wants_caption and use_caption
            summary.kept_caption += use_caption
            summary.kept_alt += not use_caption
            sample.update(text=caption if use_caption else alt, source=CAPTION if use_caption else ALT)
        sample.update((name, row.get(name)) for name in passthrough)
        samples.append(sample)
    summary.rows_out = len(samples)
    return samples, summary


# ---------------------------------------------------------------------------------------------- scores


def image_file(row: dict, image_root: str | os.PathLike | None, *, allow_outside_root: bool = False) -> Path:
    """The file a row's ``img_path`` names, relative to ``image_root`` (default: the current folder).

    Raises :class:`MixError` when the path (after ``..`` and symbolic links) leaves ``image_root``, unless
    ``allow_outside_root``: a row must not be able to copy ``/etc/passwd`` into a training set.
    """
    root = Path(image_root or ".").resolve()
    path = (root / row["img_path"]).resolve()
    if not allow_outside_root and not path.is_relative_to(root):
        raise MixError(f"row {row['key']!r}: img_path {row['img_path']!r} is outside the image root {root} "
                       "(pass --allow-outside-root to allow)")
    return path


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
    see :func:`image_file`); a text list gets a list of scores. Returns how many rows got new scores.
    """
    jobs, images, texts = [], [], []
    for index, row in enumerate(rows):
        path = image_file(row, image_root, allow_outside_root=allow_outside_root) if row.get("img_path") else None
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
    scores = clip_score_files(scorer, images, texts)
    for (index, kind, position), score in zip(jobs, scores):
        if position is None:
            rows[index][SCORE_COLUMN[kind]] = score
        else:
            rows[index][SCORE_COLUMN[kind]][position] = score
    return len({index for index, _, _ in jobs})


# ---------------------------------------------------------------------------------------------- writing


def _parquet_schema(samples: Sequence[dict], both_columns: bool):
    import pyarrow as pa

    columns = ["key", "alt_text", "caption"] if both_columns else ["key", "text", "source"]
    columns += [name for name in PASSTHROUGH if samples and name in samples[0]]
    return pa.schema([(name, pa.string()) for name in columns])


def write_parquet(samples: Sequence[dict], path: str | os.PathLike, *, both_columns: bool = False) -> None:
    """Atomically write samples as one Parquet file (all columns strings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise MixError(f"{path}: folder {folder} does not exist")
    table = pa.Table.from_pylist(list(samples), schema=_parquet_schema(samples, both_columns))
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
            raise MixError(f"row {key!r}: --with-images needs an img_path")
        path = image_file(sample, image_root, allow_outside_root=allow_outside_root)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise MixError(f"row {key!r}: cannot read image {path} ({err.strerror})") from None
        return _open_clip_image(data, path.suffix.lstrip(".").lower(), key)

    return image


class TarImages:
    """Images from the original webdataset shards, by the recaption output's shard and the row's key.

    ``shards``: shard name -> tar path; ``key_shard``: row key -> shard name. Samples arrive shard after shard
    (in input order), so one shard's images are held at a time.
    """

    def __init__(self, shards: dict[str, str], key_shard: dict[str, str]):
        self.shards, self.key_shard = shards, key_shard
        self.current: str | None = None
        self.members: dict[str, dict[str, bytes]] = {}

    def __call__(self, sample: dict) -> tuple[str, bytes]:
        key, shard = sample["key"], self.key_shard[sample["key"]]
        if shard != self.current:
            if shard not in self.shards:
                raise MixError(f"row {key!r}: its recaption output is for shard {shard!r}, which --images-from "
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
    for name in ("alt_text", "caption"):
        if sample.get(name) is not None:
            out[f"{name}.txt"] = sample[name]
    if images is not None:
        extension, data = images(sample)
        out[extension] = data
    return out


def write_webdataset(
    samples: Sequence[dict],
    out_dir: str | os.PathLike,
    summary: dict,
    *,
    shard_size: int = 10000,
    images: ImageSource | None = None,
) -> list[str]:
    """Write ``shard-000000.tar, ...`` and ``summary.json`` into ``out_dir``, all or nothing; returns the shard names.

    Each sample has ``txt`` (mixed) or ``alt_text.txt`` / ``caption.txt`` (both columns), ``json`` with
    its columns, and with ``images`` (:func:`image_files`, :class:`TarImages`) the image under its extension
    (``jpg``, ``png``, ``jpeg``, ``webp``: what open_clip's loader reads; other formats are re-encoded as
    ``png``). Keys are checked to be plain names, never paths.
    ``out_dir`` must not exist or be empty; everything is written to a temporary folder beside it first.
    """
    from webdataset import ShardWriter

    target = Path(out_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise MixError(f"{target}: already exists and is not an empty folder; remove it or choose another --out")
    if not target.resolve().parent.is_dir():
        raise MixError(f"{target}: folder {target.resolve().parent} does not exist")
    if shard_size < 1:
        raise MixError(f"--shard-size must be >= 1, got {shard_size}")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.resolve().parent))
    try:
        with ShardWriter(str(staging / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as writer:
            for sample in samples:
                writer.write(_tar_sample(sample, images))
        shards = sorted(path.name for path in staging.glob("shard-*.tar"))
        summary_text = json.dumps({**summary, "shards": shards}, indent=2) + "\n"
        (staging / "summary.json").write_text(summary_text, encoding="utf-8")
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return shards


# ---------------------------------------------------------------------------------------------- CLI


def _score_filter(threshold: float | None, top: float | None, kind: str) -> ScoreFilter | None:
    if threshold is not None and top is not None:
        raise MixError(f"--{kind}-threshold and --{kind}-top are alternatives; give one")
    return None if threshold is None and top is None else ScoreFilter(threshold, top)


def run(args: argparse.Namespace, load_scorer: Callable[..., Any] = load_clip_scorer) -> dict:
    """Do what the command line asks; returns the summary that was printed and written."""
    p = TARGET_P[args.target] if args.p is None else args.p
    alt_filter = _score_filter(args.alt_threshold, args.alt_top, "alt")
    caption_filter = _score_filter(args.caption_threshold, args.caption_top, "caption")
    if args.clip_pretrained and not args.clip_model:
        raise MixError("--clip-pretrained needs --clip-model")
    if args.clip_model and not (alt_filter or caption_filter):
        raise MixError(
            "--clip-model only computes scores for filtering; "
            "add --alt-threshold/--alt-top or --caption-threshold/--caption-top"
        )
    if args.alt_column != DEFAULT_ALT_COLUMN and not args.originals:
        raise MixError("--alt-column names the alt-text column of --originals; add --originals")
    if args.images_from and (args.with_images or str(args.out).endswith(".parquet")):
        raise MixError("--images-from writes images into webdataset shards: give a folder as --out, "
                       "without --with-images")
    origins: dict[str, Path] = {}
    rows = read_recaptions(args.inputs, origins)
    missing = 0
    if args.originals:
        originals = read_rows(args.originals, require=args.alt_column)
        rows, missing = join_originals(rows, originals, args.alt_column)
    scored = 0
    if args.clip_model:
        kinds = [kind for kind, score_filter in ((ALT, alt_filter), (CAPTION, caption_filter)) if score_filter]
        scorer = load_scorer(args.clip_model, args.clip_pretrained, args.device)
        scored = add_clip_scores(rows, scorer, args.image_root, kinds, allow_outside_root=args.allow_outside_root)
    samples, mix_summary = mix_captions(
        rows, p, args.seed, both_columns=args.both_columns, alt_filter=alt_filter, caption_filter=caption_filter
    )
    mix_summary.missing_original = missing
    summary = {
        "target": args.target,
        **asdict(mix_summary),
        "alt_filter": asdict(alt_filter) if alt_filter else None,
        "caption_filter": asdict(caption_filter) if caption_filter else None,
        "rows_scored_with_clip": scored,
        "inputs": [str(path) for path in args.inputs],
        "out": str(args.out),
    }
    if str(args.out).endswith(".parquet"):
        write_parquet(samples, args.out, both_columns=args.both_columns)
        atomic_write_text(Path(args.out).with_suffix(".summary.json"), json.dumps(summary, indent=2) + "\n")
    else:
        images = None
        if args.with_images:
            images = image_files(args.image_root, allow_outside_root=args.allow_outside_root)
        elif args.images_from:
            try:
                found = discover_shards(args.images_from, input_format="webdataset")
                shards = {shard.name: shard.path for shard in found}
            except (OSError, ValueError) as err:
                raise MixError(f"--images-from {args.images_from}: {err}") from None
            images = TarImages(shards, {key: output_shard(path) for key, path in origins.items()})
        summary["shards"] = write_webdataset(samples, args.out, summary, shard_size=args.shard_size, images=images)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m altogether.mix`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m altogether.mix", description="Mix alt-texts and synthetic captions into a training set."
    )
    parser.add_argument("inputs", nargs="+", help="recaption outputs: <shard>.recaption.parquet or .jsonl")
    parser.add_argument("--out", required=True, help="OUT.parquet: one Parquet file; else a new webdataset folder")
    parser.add_argument("--target", choices=sorted(TARGET_P), default="clip", help="clip (p=0.15) or t2i (p=1.0)")
    parser.add_argument("--p", type=float, help="probability of using the synthetic caption (default: by --target)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--both-columns", action="store_true", help="emit alt_text and caption, not one drawn text")
    parser.add_argument("--originals", nargs="+", help="original data (.parquet / JSONL with key) for alt-texts")
    parser.add_argument("--alt-column", default=DEFAULT_ALT_COLUMN,
                        help="alt-text column of --originals (img2dataset: caption; manifests: alt; default alt_text)")
    for kind in (ALT, CAPTION):
        column = SCORE_COLUMN[kind]
        parser.add_argument(f"--{kind}-threshold", type=float, help=f"keep {kind} texts with {column} >= this")
        parser.add_argument(f"--{kind}-top", type=float, help=f"keep this fraction of {kind} texts, highest {column} first")
    parser.add_argument("--clip-model", help="open_clip model to compute missing scores from local images")
    parser.add_argument("--clip-pretrained", help="open_clip pretrained tag or checkpoint file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-root", help="folder that img_path is relative to (default: current folder)")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="let img_path name files outside --image-root (absolute paths, '..')")
    parser.add_argument("--with-images", action="store_true", help="copy each image file into the webdataset shards")
    parser.add_argument("--images-from", help="the recaptioned tar shards (as given to recaption): copy each image "
                        "from its shard, found by the output's shard name and the key")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per webdataset shard (default 10000)")
    return parser


def main(argv: Sequence[str] | None = None, *, load_scorer: Callable[..., Any] = load_clip_scorer) -> int:
    """Run the CLI; user mistakes print one ``error:`` line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        summary = run(args, load_scorer)
    except (MixError, AnnotationError) as err:  # AnnotationError: unreadable images, CLIP model failing to load
        if os.environ.get("ALTOGETHER_DEBUG"):  # same switch as altogether.cli: show the traceback
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if summary["missing_original"]:
        print(f"warning: {summary['missing_original']} recaption row(s) had no row in --originals and were dropped",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
