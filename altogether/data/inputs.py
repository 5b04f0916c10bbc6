"""Recaptioning inputs as shards: webdataset tars, Parquet/JSONL manifests, or a folder of images.

A *shard* is the unit of work and of output: one tar, one manifest file, or a fixed-size chunk of a folder's
images (sorted by path, so the chunks are the same on every rank and every run). :func:`read_shard` reads
one shard whole, keeping what it can: bad samples are listed with a reason, and a shard that cannot be read
to its end (a truncated tar) keeps the samples before the damage and says what went wrong.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .readers import (
    IMAGE_EXTENSIONS,
    TAR_SUFFIXES,
    DamagedShard,
    Fields,
    detect_format,
    expand_shards,
    iter_tar_samples,
    row_to_record,
    table_rows,
    webdataset_sample_to_record,
)
from .records import BadRecord, Record

INPUT_FORMATS = ("auto", "webdataset", "parquet", "jsonl", "folder")


@dataclass(frozen=True)
class Shard:
    """One unit of work. ``members`` lists a folder shard's images (relative to ``path``), ``keys`` their keys."""

    name: str
    kind: str  # webdataset | parquet | jsonl | folder
    path: str
    members: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # a folder shard's sample keys, one per member


@dataclass
class ShardContent:
    """What a shard held: readable records in order, bad ones as ``(key, reason)``, and a read error if any."""

    samples: list[Record] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None


# ---------------------------------------------------------------------------------------------- discovery


def discover_shards(source: str, *, input_format: str = "auto", shard_size: int = 1000) -> list[Shard]:
    """The shards of an input, in a stable order.

    ``source``: a tar or manifest path, a brace pattern (``data/{00000..00099}.tar``) or glob of them, a folder
    of tars, or a folder of images (split into shards of ``shard_size`` images named ``<folder>-00000``, ...).
    Missing files and two shards with the same name (their outputs would collide) are errors.
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format={input_format!r} is not one of {', '.join(INPUT_FORMATS)}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = Path(source)
    if folder.is_dir():
        shards = _folder_input(folder, input_format, shard_size)
    else:
        if input_format == "folder":
            raise ValueError(f"input_format=folder but {source!r} is not a folder")
        paths = expand_shards(source)
        kind = input_format if input_format != "auto" else detect_format(paths[0] if paths else source)
        if kind == "annotations":
            raise ValueError(f"{source!r}: annotation JSON is not a recaptioning input; convert it to JSONL "
                             "(one object per line with the image path and alt-text) or give tar shards")
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise FileNotFoundError(f"{len(missing)} of {len(paths)} input file(s) matched by {source!r} do not "
                                    f"exist: {shown}")
        shards = [_file_shard(p, kind) for p in paths]
    if not shards:
        raise FileNotFoundError(f"no input shards found at {source!r}: a folder is read as tar shards (*.tar, "
                                "*.tar.gz, or */*.tar as MetaCLIP nests them), Parquet or JSONL manifests, or image "
                                "files; for another layout give a pattern such as 'root/*/*/*.tar'")
    _check_unique_names(shards, source)
    return shards


_MANIFEST_SUFFIXES = {"parquet": ".parquet", "jsonl": ".jsonl"}


def _folder_input(folder: Path, input_format: str, shard_size: int) -> list[Shard]:
    """A folder's shards: its tars (or, as MetaCLIP nests them, those one level down), else its manifests, else
    its images. Manifests beside images are ambiguous in ``auto`` mode (img2dataset's ``files`` output keeps its
    metadata Parquet there), so that is an error asking for ``input_format``."""
    if input_format in ("auto", "webdataset"):
        tars = _files(folder, TAR_SUFFIXES) or sorted(p for d in _subfolders(folder) for p in _files(d, TAR_SUFFIXES))
        if tars or input_format == "webdataset":
            return [_file_shard(str(p), "webdataset") for p in tars]
    if input_format in _MANIFEST_SUFFIXES:
        return [_file_shard(str(p), input_format) for p in _files(folder, (_MANIFEST_SUFFIXES[input_format],))]
    images = _folder_shards(folder, shard_size)
    if input_format == "folder":
        return images
    manifests = {kind: _files(folder, (suffix,)) for kind, suffix in _MANIFEST_SUFFIXES.items()}
    found = [kind for kind, paths in manifests.items() if paths]
    if len(found) + bool(images) > 1:
        raise ValueError(f"input {str(folder)!r} holds {' and '.join(found + ['image files'] * bool(images))}; "
                         f"say which to read: input_format={' or '.join(found + ['folder'] * bool(images))}")
    if found:
        return [_file_shard(str(p), found[0]) for p in manifests[found[0]]]
    return images


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.lower().endswith(suffixes) and p.is_file()
                  and not p.name.startswith("."))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _file_shard(path: str, kind: str) -> Shard:
    name = Path(path).name
    for suffix in (*TAR_SUFFIXES, *_MANIFEST_SUFFIXES.values()):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return Shard(name=name, kind=kind, path=path)


def _folder_shards(folder: Path, shard_size: int) -> list[Shard]:
    """The folder's images in chunks of ``shard_size``, keyed by path without the extension, or with it where two
    images share a stem (``cat.jpg`` and ``cat.png``), so that every key is unique and names one file."""
    images = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*")
        if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    keys = [m.rsplit(".", 1)[0] for m in images]
    while True:  # a stem shared (or equal to another's full name, cat.jpg.png): full names for those
        counts = Counter(keys)
        clashing = [i for i, k in enumerate(keys) if counts[k] > 1 and k != images[i]]
        if not clashing:
            break
        for i in clashing:
            keys[i] = images[i]
    base = folder.resolve().name or "images"
    return [Shard(name=f"{base}-{i // shard_size:05d}", kind="folder", path=str(folder),
                  members=tuple(images[i : i + shard_size]), keys=tuple(keys[i : i + shard_size]))
            for i in range(0, len(images), shard_size)]


def _check_unique_names(shards: list[Shard], source: str) -> None:
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.name in seen:
            raise ValueError(f"input {source!r}: two shards share the name {shard.name!r} ({seen[shard.name]} and "
                             f"{shard.path}), so their outputs would collide; recaption them separately")
        seen[shard.name] = shard.path


def check_manifest_columns(shard: Shard, fields: Fields) -> None:
    """Fail early when a manifest lacks the image column or the alt-text column (``alt_key=""``: none used).

    A JSONL manifest's columns are those of its first line that is a JSON object (lines before it are bad samples,
    listed when the shard is read); one without any such line (empty, or JSON arrays, or CSV) has no columns.
    """
    if shard.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            columns = pq.read_schema(shard.path).names
        except (OSError, ValueError) as err:
            raise ValueError(f"{shard.path}: cannot read the Parquet schema: {err}") from None
    elif shard.kind == "jsonl":
        first, problem = None, None
        for number, row, trouble in table_rows(shard.path):
            if row is not None:
                first = row
                break
            problem = problem or f"line {number}: {trouble}"
        if first is None:
            raise ValueError(f"{shard.path}: " + (f"no line is a JSON object ({problem})" if problem else "empty")
                             + "; a JSONL manifest holds one JSON object per line, with the image path in "
                             f"{fields.image_key!r}")
        columns = list(first)
    else:
        return
    wanted = [k for k in (fields.image_key, fields.alt_key) if k]
    missing = [k for k in wanted if k not in columns]
    if missing:
        raise ValueError(f"{shard.path}: no column {', '.join(map(repr, missing))}; columns are "
                         f"{', '.join(columns)}. Set image_key= / alt_key= (alt_key= empty: no alt-texts)")


# ---------------------------------------------------------------------------------------------- reading


def read_shard(shard: Shard, fields: Fields) -> ShardContent:
    """Read a whole shard; see the module docstring for what happens to bad input."""
    reader = {"webdataset": _read_tar, "parquet": _read_manifest, "jsonl": _read_manifest, "folder": _read_folder}
    return reader[shard.kind](shard, fields)


def _read_tar(shard: Shard, fields: Fields) -> ShardContent:
    """Every readable sample of a tar; on damage the sample being read is listed as bad and the shard's error set."""
    content = ShardContent()
    try:
        for sample in iter_tar_samples(shard.path):
            _add_tar_sample(content, sample, fields)
    except DamagedShard as err:
        if err.partial_key is not None:
            content.bad.append((err.partial_key, "may be incomplete: the tar is damaged at or right after it"))
        content.error = str(err).removeprefix(f"{shard.path}: ")
    return content


def _add_tar_sample(content: ShardContent, sample: dict[str, Any], fields: Fields) -> None:
    try:
        content.samples.append(webdataset_sample_to_record(sample, fields))
    except BadRecord as err:
        content.bad.append((sample["__key__"], str(err)))


def _read_manifest(shard: Shard, fields: Fields) -> ShardContent:
    content = ShardContent()
    root = Path(fields.image_root) if fields.image_root else Path(shard.path).resolve().parent
    first_row: dict[str, int] = {}  # key -> index of the row that has it: keys are unique in the output
    try:
        for number, row, problem in table_rows(shard.path):
            index = number - 1
            if problem:  # a line that is not a JSON object: the reason
                content.bad.append((f"line {number}", problem))
                continue
            try:
                record = row_to_record(row, index, fields, root, shard.path)
            except BadRecord as err:
                content.bad.append((str(row.get("key") or row.get("id") or index), str(err)))
                continue
            if record.key in first_row:
                content.bad.append((record.key, f"row {index + 1} repeats the key of row {first_row[record.key] + 1}"
                                                 "; the first row keeps it, this one is skipped"))
                continue
            first_row[record.key] = index
            content.samples.append(record)
    except (OSError, ValueError) as err:  # unreadable file (pyarrow's errors are ValueErrors)
        content.error = f"unreadable after {len(content.samples) + len(content.bad)} rows: {err}"
    return content


def _read_folder(shard: Shard, fields: Fields) -> ShardContent:
    """Each image with the alt-text of the ``.txt`` beside it. Where images share a stem (their keys keep the
    extension), ``cat.txt`` could be either's, so only ``cat.jpg.txt`` counts and a lone ``cat.txt`` is a reason to
    skip them rather than give one image another's alt-text."""
    content = ShardContent()
    folder = Path(shard.path)
    for member, key in zip(shard.members, shard.keys):
        image = folder / member
        sidecar = image.with_suffix(".txt")
        if key == member:
            own = folder / f"{member}.txt"
            if not own.is_file() and sidecar.is_file():
                content.bad.append((key, f"alt-text file {sidecar.name} could belong to several images named "
                                         f"{image.stem}.*; rename it {own.name}"))
                continue
            sidecar = own
        try:
            alt = [sidecar.read_text(encoding="utf-8", errors="replace")] if sidecar.is_file() else []
        except OSError as err:
            content.bad.append((key, f"unreadable alt-text file {sidecar}: {err}"))
            continue
        content.samples.append(Record(key, str(image), alt))
    return content
