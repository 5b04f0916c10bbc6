"""Readers that turn annotation files, tables and tar shards into :class:`Record` objects.

Table-like sources (Altogether-FT annotation JSON, JSONL, Parquet) go through Hugging Face ``datasets`` and give
random access (:class:`TableSource`), which training needs for exact resumption; every other read of a JSONL or
Parquet table (recaption manifests, annotation records, mix inputs) streams its rows with :func:`table_rows`.
Webdataset tar shards are streamed (:func:`iter_tar_samples`, :func:`iter_webdataset`).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence

from ..io import jsonl_lines
from .records import ALT_KEY, IMAGE_KEY, BadRecord, Record

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what a tar shard's name ends with; compression is read from the bytes
URL_SCHEMES = ("http://", "https://", "ftp://", "s3://", "gs://", "hf://")
# words in the reasons a sample is skipped for, so a summary can tell these from unreadable images
FAILED_DOWNLOAD = "failed download"
NO_LOCAL_IMAGE = "no local image; download it first (img2dataset)"


def is_failed_download(reason: str) -> bool:
    """Whether a skip reason is a row the downloader marked as failed (img2dataset's ``status``), as
    :func:`row_to_record` words it."""
    return f": {FAILED_DOWNLOAD} (status " in reason


@dataclass(frozen=True)
class Fields:
    """Which columns hold what. ``target_key=None`` reads records without a target (inference).

    ``alt_sources``: which ``[source, text]`` pairs count as alt-texts (MetaCLIP's ``alt``, ``title``, ...);
    ``None`` keeps every pair. Alt-texts given as plain strings name no source and are always kept.
    """

    alt_key: str = ALT_KEY
    image_key: str = IMAGE_KEY
    target_key: str | None = None
    image_root: str | None = None
    alt_sources: Sequence[str] | None = None

    def __post_init__(self):
        if self.alt_sources is not None:  # a plain tuple: hashable, picklable, fast to search
            object.__setattr__(self, "alt_sources", tuple(self.alt_sources))


# The top-level keys of a COCO captions file (captions_val2017.json): {"info", "licenses", "images", "annotations"}.
COCO_KEYS = ("info", "licenses", "images", "annotations")


def _first_json_key(path: str) -> str | None:
    """The first key of the JSON object in ``path`` (read from its first bytes), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return None
    found = re.match(r'\s*\{\s*"([^"\\]*)"\s*:', head)
    return found.group(1) if found else None


def detect_format(source: str) -> str:
    """``annotations`` (Altogether-FT JSON), ``coco`` (a JSON file whose first key is one of COCO's), ``jsonl``,
    ``parquet`` or ``webdataset`` from a path or shard pattern."""
    name = source.lower()
    if name.endswith(TAR_SUFFIXES) or name.rstrip("}").endswith(TAR_SUFFIXES) or "{" in name and ".tar" in name:
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".json"):
        return "coco" if _first_json_key(source) in COCO_KEYS else "annotations"
    raise ValueError(
        f"cannot tell the format of {source!r} from its name; set data.format to one of annotations, coco, jsonl, "
        "parquet, webdataset"
    )


def alt_text_list(value: Any, sources: Collection[str] | None = None) -> tuple[list[str], list[str]]:
    """An alt-text field as ``(texts, their sources)``.

    The field is missing (``None``), a string, a list of strings, or MetaCLIP's list of ``[source, text]`` pairs
    (``"texts": [["alt", "..."], ["title", "..."]]``). Pairs keep their source, and only pairs whose source is in
    ``sources`` are kept (``None``: all); plain strings name no source (the returned sources list is then empty).
    Anything else raises :class:`BadRecord`.
    """
    if value is None:
        return [], []
    if isinstance(value, str):
        return [value], []
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return list(value), []
        if all(isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in value):
            kept = [(source, text) for source, text in value if sources is None or source in sources]
            return [text for _, text in kept], [source for source, _ in kept]
    shown = repr(value)
    raise BadRecord("alt-text field is neither a string, a list of strings nor a list of [source, text] pairs: "
                    + (shown if len(shown) <= 200 else shown[:200] + "..."))


class TableSource:
    """Random access to the records of an annotation JSON, JSONL or Parquet file."""

    def __init__(self, path: str, fmt: str, fields: Fields):
        import datasets

        if not Path(path).is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        self.path = path
        self.fields = fields
        self.image_root = Path(fields.image_root) if fields.image_root else Path(path).resolve().parent
        builder = "parquet" if fmt == "parquet" else "json"
        kwargs = {"field": "data"} if fmt == "annotations" else {}
        datasets.disable_progress_bars()
        try:
            self.table = datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
            # pyarrow's JSON reader lets some invalid UTF-8 into string columns, which then fails on the row's read
            self.table.data.validate(full=True)
        except Exception as err:  # datasets raises many types for malformed files
            if fmt == "jsonl":  # pyarrow's message names neither the file nor the line: find the line
                number, problem = next(((n, p) for n, _, p in table_rows(path) if p), (None, None))
                if problem:
                    raise ValueError(f"{path} line {number}: {problem}") from None
            raise ValueError(f"could not read {fmt} file {path}: {' '.join(str(err).split())}") from err
        missing = [k for k in (fields.image_key, fields.target_key) if k and k not in self.table.column_names]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; columns are {', '.join(self.table.column_names)}"
            )

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Record:
        return row_to_record(self.table[index], index, self.fields, self.image_root, self.path)


class CocoCaptions:
    """Random access to the images of a COCO captions file (``annotations/captions_val2017.json``: ``images``
    with ``id`` and ``file_name``, ``annotations`` with ``image_id`` and ``caption``), one record per image: key
    the image id, image ``image_root / file_name`` (default: the JSON file's folder; COCO keeps images in
    ``val2017/`` beside ``annotations/``), no alt-text, and every caption of the image as its target, a list of
    references scored together (pycocoevalcap's protocol). Images in order of the file's ``images``.
    """

    def __init__(self, path: str, fields: Fields):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"could not read COCO captions file {path}: {err}") from None
        if not (isinstance(data, dict) and isinstance(data.get("images"), list)
                and isinstance(data.get("annotations"), list)):
            raise ValueError(f"{path}: not a COCO captions file (it needs lists 'images' and 'annotations')")
        self.path, self.images = path, data["images"]
        self.image_root = Path(fields.image_root) if fields.image_root else Path(path).resolve().parent
        self.captions: dict[Any, list[str]] = {}
        for ann in data["annotations"]:
            if isinstance(ann, dict) and isinstance(ann.get("caption"), str) and ann["caption"].strip():
                self.captions.setdefault(ann.get("image_id"), []).append(ann["caption"].strip())

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Record:
        image = self.images[index]
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or "id" not in image:
            raise BadRecord(f"image {index} in {self.path}: needs 'id' and 'file_name', got {str(image)[:120]}")
        key = str(image["id"])
        references = self.captions.get(image["id"], [])
        if not references:
            raise BadRecord(f"record {key!r} in {self.path}: no caption in 'annotations'")
        extra = {k: v for k, v in image.items() if k not in ("id", "file_name")}
        return Record(key=key, image=str(self.image_root / image["file_name"]), alt_texts=[], target=references,
                      extra=extra)


def open_table(path: str, fmt: str, fields: Fields) -> TableSource | CocoCaptions:
    """The random-access source of a table file of format ``fmt`` (``coco`` or a :class:`TableSource` format)."""
    return CocoCaptions(path, fields) if fmt == "coco" else TableSource(path, fmt, fields)


def row_to_record(row: dict[str, Any], index: int, fields: Fields, image_root: Path, source: str) -> Record:
    """One table row (annotation JSON, JSONL or Parquet) as a record; relative image paths join ``image_root``."""
    f = fields
    key = str(row.get("key") or row.get("id") or index)
    status = row.get("status")
    if status is not None and status != "success":  # img2dataset keeps its failed downloads' rows
        raise BadRecord(f"record {key!r} in {source}: {FAILED_DOWNLOAD} (status {status!r}"
                        + (f": {row['error_message']}" if row.get("error_message") else "") + ")")
    image = row.get(f.image_key)
    if isinstance(image, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if not image:
        url = row.get("url")
        hint = f"; it has only a url ({url}): {NO_LOCAL_IMAGE}" if isinstance(url, str) and url else ""
        raise BadRecord(f"record {key!r} in {source}: no image in column {f.image_key!r}{hint}")
    if not isinstance(image, (str, bytes)):
        raise BadRecord(f"record {key!r} in {source}: column {f.image_key!r} holds a {type(image).__name__} "
                        f"({str(image)[:80]}), not an image path or image bytes")
    if isinstance(image, str) and image.lower().startswith(URL_SCHEMES):
        raise BadRecord(f"record {key!r} in {source}: column {f.image_key!r} holds a URL ({image}): "
                        f"{NO_LOCAL_IMAGE}")
    if isinstance(image, str) and not os.path.isabs(image):
        image = str(image_root / image)
    target = row.get(f.target_key) if f.target_key else None
    if f.target_key and (not isinstance(target, str) or not target.strip()):
        raise BadRecord(f"record {key!r} in {source}: empty or missing target {f.target_key!r}")
    try:
        alt, alt_sources = alt_text_list(row.get(f.alt_key), f.alt_sources)
    except BadRecord as err:
        raise BadRecord(f"record {key!r} in {source}: {err}") from None
    extra = {k: v for k, v in row.items() if k not in (f.image_key, f.alt_key, f.target_key)}
    return Record(key=key, image=image, alt_texts=alt, target=target, extra=extra, alt_sources=alt_sources)


def table_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """``(row number from 1, row, problem)`` for each row of a Parquet (``.parquet``) or JSONL file, streamed.

    A JSONL line that is not UTF-8, not JSON or not a JSON object gives ``row=None`` and the ``problem``; the
    caller decides whether that stops the read or skips the row (JSONL line numbers count blank lines, which give
    no row). A Parquet file that cannot be read raises ``ValueError`` naming it; opening a missing file raises
    ``FileNotFoundError``.
    """
    if str(path).lower().endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    for number, value, problem in jsonl_lines(path):
        if problem is None and not isinstance(value, dict):
            problem = f"not a JSON object: {json.dumps(value)[:80]}"
        yield number, value if problem is None else None, problem


def _parquet_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any], None]]:
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row, None
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None


def expand_shards(pattern: str) -> list[str]:
    """Shard paths of a pattern: braces first (webdataset's ``data/{00000..00009}.tar``), then globs, each sorted
    (MetaCLIP's ``<root>/<shard % 100>/<shard>.tar`` folders: ``root/*/*.tar``). A path without glob characters
    is kept as given, whether it exists or not: callers name the missing ones."""
    import glob

    import braceexpand

    paths: list[str] = []
    for path in braceexpand.braceexpand(pattern):
        paths.extend(sorted(glob.glob(path)) if glob.has_magic(path) else [path])
    return paths


def webdataset_sample_to_record(sample: dict[str, Any], fields: Fields) -> Record:
    """A webdataset sample dict (``__key__`` plus extensions) to a record.

    The JSON's ``texts`` (MetaCLIP: ``[source, text]`` pairs, see :func:`alt_text_list`) or ``caption``
    (img2dataset) give the alt-texts, a ``.txt`` member is the fallback; a ``target_key`` in the JSON gives the
    target.
    """
    key = sample.get("__key__", "?")
    if "__error__" in sample:  # set by the tar iterator (a repeated key)
        raise BadRecord(f"sample {key!r}: {sample['__error__']}")
    image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if image is None:
        raise BadRecord(f"sample {key!r}: no image member ({', '.join(IMAGE_EXTENSIONS)})")
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRecord(f"sample {key!r}: broken JSON: {err}") from None
        if not isinstance(meta, dict):
            raise BadRecord(f"sample {key!r}: JSON is not an object")
    field = next((name for name in ("texts", "caption") if name in meta), None)
    try:
        if field is None and "txt" in sample:
            alt, alt_sources = [sample["txt"].decode("utf-8", errors="replace")], []
        else:
            alt, alt_sources = alt_text_list(meta.get(field or fields.alt_key), fields.alt_sources)
    except BadRecord as err:
        raise BadRecord(f"sample {key!r}: {err}") from None
    target = meta.get(fields.target_key) if fields.target_key else None
    return Record(key=key, image=image, alt_texts=alt, target=target, extra={"url": meta.get("url")},
                  alt_sources=alt_sources)


class DamagedShard(ValueError):
    """A tar shard that ends early or cannot be read on; ``partial_key`` is the sample being read then."""

    def __init__(self, message: str, partial_key: str | None):
        super().__init__(message)
        self.partial_key = partial_key


_TAR_BLOCK = 512
_TAR_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as webdataset does


def iter_tar_samples(path: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard (plain, gzip, bzip2 or xz): members grouped by webdataset's naming rule
    (``dir/key.ext``, contiguous members share a key), as ``{"__key__", "__url__", ext: bytes, ...}``.

    A sample is yielded once the next key's header is read, so on damage every sample before it comes out;
    then :class:`DamagedShard` is raised naming the sample in progress (webdataset's own grouping silently
    loses it, and tarfile takes a cut at a block boundary for a normal end: the end-of-archive marker is checked
    on the decompressed bytes). A key seen before in the shard (a member stored twice, as ``tar rf`` appends)
    starts a new sample carrying ``__error__``: the first sample keeps the key, the repeat is reported, never
    merged into it (webdataset refuses such a shard whole).
    """
    import tarfile

    from webdataset.tariterators import base_plus_ext

    group: dict[str, Any] | None = None
    seen: set[str] = set()
    member, count = "", 0
    stream = _TarBytes(path)
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                key, ext = base_plus_ext(info.name) if info.isreg() else (None, None)
                if key is None or _TAR_META.match(info.name):
                    continue
                key, ext = key.removeprefix("./"), ext.lower()  # `tar -C dir .` names members ./<uuid>.jpeg
                if group is not None and (group["__key__"] != key or ext in group):
                    yield group
                    count += 1
                    group = None
                member = info.name
                if group is None:
                    group = {"__key__": key, "__url__": path}
                    if key in seen:
                        group["__error__"] = (f"key {key!r} appears again at member {info.name!r} (a member stored "
                                              "twice, as `tar rf` appends): the first sample keeps the key, this "
                                              "repeat is skipped")
                    seen.add(key)
                group[ext] = tar.extractfile(info).read()
            problem = stream.end_problem()
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as err:
        problem = f"unreadable at member {member!r} after {count} samples: {err}"
    if problem:
        raise DamagedShard(f"{path}: {problem}", group["__key__"] if group else None)
    if group is not None:
        yield group


class _TarBytes(io.RawIOBase):
    """A tar file's bytes, decompressed by what its first bytes say, counting them and keeping the last two blocks
    so that the end-of-archive marker can be checked after tarfile has read the members."""

    _MAGIC = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))

    def __init__(self, path: str):
        with open(path, "rb") as f:
            head = f.read(6)
        opener = next((o for magic, o in self._MAGIC if head.startswith(magic)), open)
        self.raw = opener(path, "rb")
        self.size, self.tail = 0, b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read1(n)  # what is there: a whole read() of a cut gzip raises and drops what it had
        self.size += len(data)
        self.tail = data[-2 * _TAR_BLOCK :] if len(data) >= 2 * _TAR_BLOCK else (self.tail + data)[-2 * _TAR_BLOCK :]
        return data

    def close(self) -> None:
        self.raw.close()
        super().close()

    def end_problem(self) -> str | None:
        """Why a tar that read without error is still truncated (no end-of-archive marker), or ``None``."""
        while self.read(1 << 16):  # tarfile stops at the marker; what follows is the record's zero padding
            pass
        if self.size % _TAR_BLOCK:
            return f"truncated: {self.size} bytes is not a whole number of {_TAR_BLOCK}-byte tar blocks"
        if self.size < 2 * _TAR_BLOCK or any(self.tail):
            return "truncated: the tar does not end with its end-of-archive marker"
        return None


def iter_webdataset(pattern: str, fields: Fields, on_bad=None) -> Iterator[Record]:
    """Records from tar shards in order; bad samples and damaged shards go to ``on_bad(key, reason)`` and are
    skipped (without ``on_bad`` they raise)."""
    for shard in expand_shards(pattern):
        try:
            for sample in iter_tar_samples(shard):
                try:
                    yield webdataset_sample_to_record(sample, fields)
                except BadRecord as err:
                    if on_bad is None:
                        raise
                    on_bad(sample.get("__key__", "?"), str(err))
        except DamagedShard as err:
            if on_bad is None:
                raise
            on_bad(err.partial_key or shard, str(err))
