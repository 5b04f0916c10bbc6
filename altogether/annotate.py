"""Multi-round re-alignment annotation: task files, merging rounds back, statistics, model drafts.

A *record* (one JSON object per line, schema in ``annotations/record.schema.json``) holds an image
reference, its alt-text (round 1) and the human rounds 2, 3, ... . A *task* is one record's next round
handed to an annotator: the previous caption is copied into ``caption`` as the starting text (t' <- t)
and the annotator edits it. The Altogether-FT layout (``{"data": [{"alt", "url", "img_path", "round2",
"round3"}]}``) converts to and from records.

Command line (``python -m altogether.annotate`` is the same; ``ACTION --help`` lists each action's settings)::

    altogether annotate next-round RECORDS OUT [vendors=A,B] [swap=true] [seed=N]
    altogether annotate merge RECORDS TASKS ... OUT [skip_incomplete=true]
    altogether annotate stats RECORDS [clip_model=NAME clip_pretrained=TAG] [image_root=DIR] [json=OUT]
    altogether annotate prefill MODEL RECORDS OUT [image_root=DIR] [vendors=A,B] [swap=true]
    altogether annotate from-ft FT_JSON OUT   /   altogether annotate to-ft RECORDS OUT_JSON
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import lru_cache, partial
from itertools import islice, repeat
from pathlib import Path
from typing import Any, Optional, Protocol

from jsonschema import Draft202012Validator, FormatChecker
from rapidfuzz.distance import Levenshtein

from .cli import PROGRESS_HELP, Command, progress, run_action, run_cli, setting
from .clip_score import CLIPSCORE_FORMULA, ClipScorer, score_image_files
from .data.images import image_file
from .data.readers import table_rows
from .data.records import IMAGE_FIELDS
from .io import atomic_open, atomic_write_text

# The schema lives in the repository's annotations/; a wheel carries it as altogether/annotations/.
_PACKAGE = Path(__file__).resolve().parent
_SCHEMA_CANDIDATES = tuple(root / "annotations" / "record.schema.json" for root in (_PACKAGE, _PACKAGE.parent))
SCHEMA_PATH = next((p for p in _SCHEMA_CANDIDATES if p.is_file()), _SCHEMA_CANDIDATES[1])
PREVIOUS_ROUND = "previous_round"
ALT_SEPARATOR = "\n"  # several alt-texts of one image are shown to annotators one per line


class AnnotationError(ValueError):
    """A problem with an annotation input; the message names the file, record id and field."""


# ---------------------------------------------------------------------------------------------- schema


@lru_cache(maxsize=None)
def load_schema() -> dict:
    """The record schema (JSON Schema draft 2020-12) as a dict."""
    try:
        return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    except OSError as err:
        raise AnnotationError(f"record schema not found at {SCHEMA_PATH}: {err.strerror}") from None


def _format_checker() -> FormatChecker:
    checker = FormatChecker(formats=())

    @checker.checks("date-time", raises=ValueError)
    def _is_datetime(value: object) -> bool:
        # The schema's pattern already demands an offset; this rejects impossible dates (month 13).
        if isinstance(value, str):
            datetime.fromisoformat(value)
        return True

    return checker


@lru_cache(maxsize=None)
def _validator(kind: str) -> Draft202012Validator:
    schema = load_schema()
    if kind == "task":
        schema = {"$schema": schema["$schema"], "$ref": "#/$defs/task", "$defs": schema["$defs"]}
    return Draft202012Validator(schema, format_checker=_format_checker())


def _field_path(parts: Iterable[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _join_field(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(error) -> list[str]:
    """Readable ``field: problem`` lines for a jsonschema ValidationError."""
    path = _field_path(error.absolute_path)
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in error.instance]
        return [f"{_join_field(path, name)}: required field is missing" for name in missing]
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return [f"{_join_field(path, name)}: unknown field" for name in extra]
    if error.validator in ("anyOf", "oneOf") and all(set(s) == {"required"} for s in error.validator_value):
        names = " or ".join(repr(s["required"][0]) for s in error.validator_value)
        return [f"{path or 'record'}: needs {names}"]
    if "description" in error.schema and error.validator in ("anyOf", "oneOf", "pattern", "format"):
        return [f"{path}: {error.instance!r} is not {error.schema['description']}"]
    return [f"{path or 'record'}: {error.message}"]


def schema_errors(obj: Any, kind: str = "record") -> list[str]:
    """All problems of ``obj`` as a record (``kind="record"``) or a task (``kind="task"``), one line each."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    errors = sorted(_validator(kind).iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    problems = list(dict.fromkeys(line for e in errors for line in _describe(e)))  # dedupe, keep order
    if kind == "record" and not problems:
        for index, entry in enumerate(obj["rounds"]):
            if entry["round"] != index + 2:
                problems.append(
                    f"rounds[{index}].round: expected {index + 2} (rounds run 2, 3, ... in order), got {entry['round']}"
                )
    return problems


def _record_name(obj: Any) -> str:
    return f"record {obj['id']!r}" if isinstance(obj, dict) and isinstance(obj.get("id"), str) else "record"


def _raise_problems(problems: list[str], what: str) -> None:
    if problems:
        shown = "; ".join(problems[:3])
        more = f"; ... and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise AnnotationError(f"{what}: {shown}{more}")


def validate_record(record: Any, where: str = "") -> None:
    """Raise :class:`AnnotationError` naming the record id and field if ``record`` breaks the schema."""
    _raise_problems(schema_errors(record), f"{where}{_record_name(record)}")


# ---------------------------------------------------------------------------------------------- files


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line_number, object)`` for every non-blank line, streamed; a line that is not a UTF-8 JSON object names
    the file and line."""
    try:
        for number, value, problem in table_rows(path):
            if problem:
                raise AnnotationError(f"{path}:{number}: {problem}")
            yield number, value
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read ({err.strerror})") from None


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """:func:`iter_jsonl` as a list."""
    return list(iter_jsonl(path))


class JsonlFiles:
    """JSONL files written as one, streamed: ``write(path, row)`` appends a line to ``path``'s file, ``open(path)``
    makes sure it exists. Each is written beside its target (:func:`altogether.io.atomic_open`) and renamed into
    place when the ``with`` block ends without error; the renames wait until every file is written, so a failure
    while writing (a full disk, a row that is not JSON, a bad record found late) leaves every target as it was.
    """

    def __enter__(self) -> JsonlFiles:
        self.stack = ExitStack().__enter__()
        self.handles: dict[str, Any] = {}
        return self

    def __exit__(self, *exc: Any) -> bool:
        return self.stack.__exit__(*exc)

    def open(self, path: str | os.PathLike) -> Any:
        handle = self.handles.get(str(path))
        if handle is None:
            if Path(path).is_dir():
                raise AnnotationError(f"{path}: is a folder, not a file to write")
            handle = self.handles[str(path)] = self.stack.enter_context(atomic_open(path))
        return handle

    def write(self, path: str | os.PathLike, row: dict) -> None:
        self.open(path).write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def write_jsonl_files(files: dict[str | os.PathLike, Iterable[dict]]) -> None:
    """Write each ``{path: rows}`` as JSONL (one object per line), all files or none (:class:`JsonlFiles`)."""
    with JsonlFiles() as out:
        for path, rows in files.items():
            out.open(path)
            for row in rows:
                out.write(path, row)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Atomically write one JSON object per line, streamed; returns the number of rows."""
    count = 0
    with JsonlFiles() as out:
        out.open(path)
        for row in rows:
            out.write(path, row)
            count += 1
    return count


def iter_records(path: str | os.PathLike) -> Iterator[dict]:
    """Read and validate a record file, streamed; errors name the file, line, record id and field. Memory keeps
    each id and its line (to name a duplicate), not the records."""
    seen: dict[str, int] = {}
    for number, obj in iter_jsonl(path):
        _raise_problems(schema_errors(obj), f"{path}:{number}: {_record_name(obj)}")
        if obj["id"] in seen:
            raise AnnotationError(f"{path}:{number}: record {obj['id']!r}: id: duplicate of line {seen[obj['id']]}")
        seen[obj["id"]] = number
        yield obj


def read_records(path: str | os.PathLike) -> list[dict]:
    """:func:`iter_records` as a list."""
    return list(iter_records(path))


# ---------------------------------------------------------------------------------------------- texts


def alt_as_text(alt: str | Sequence[str]) -> str:
    """Round 1 as one string: several alt-texts are joined one per line."""
    return alt if isinstance(alt, str) else ALT_SEPARATOR.join(alt)


def round_texts(record: dict) -> dict[int, str]:
    """``{round: text}`` with round 1 the alt-text."""
    texts = {1: alt_as_text(record["alt"])}
    texts.update((entry["round"], entry["caption"]) for entry in record["rounds"])
    return texts


def _image_fields(record: dict) -> dict:
    return {name: record[name] for name in IMAGE_FIELDS if name in record}


# ---------------------------------------------------------------------------------------------- next round


def assign_vendors(
    previous: Sequence[str | None], vendors: Sequence[str], *, swap: bool = False, seed: int = 0
) -> list[str]:
    """Vendor for each record's next round.

    ``previous[i]`` is the vendor of record ``i``'s latest round (``None`` for the alt-text). With
    ``swap``, a record last done by ``vendors[j]`` goes to ``vendors[j + 1]`` (cyclically), so each vendor
    revises the other's work; all other records are split evenly between vendors in a seeded random order.
    """
    if not vendors:
        raise AnnotationError("vendors: give at least one vendor name")
    if len(set(vendors)) != len(vendors) or not all(vendors):
        raise AnnotationError(f"vendors: names must be distinct and non-empty, got {list(vendors)}")
    if swap and len(vendors) < 2:
        raise AnnotationError("swap=true needs at least two vendors")
    assigned: list[str | None] = [None] * len(previous)
    free = []
    for index, vendor in enumerate(previous):
        if swap and vendor in vendors:
            assigned[index] = vendors[(vendors.index(vendor) + 1) % len(vendors)]
        else:
            free.append(index)
    random.Random(seed).shuffle(free)
    for position, index in enumerate(free):
        assigned[index] = vendors[position % len(vendors)]
    return assigned  # type: ignore[return-value]


def previous_vendor(record: dict) -> str | None:
    """The vendor of a record's latest round (``None`` for the alt-text)."""
    return record["rounds"][-1]["vendor"] if record["rounds"] else None


def vendor_plan(
    previous: Sequence[str | None], vendors: Sequence[str] | None, *, swap: bool = False, seed: int = 0
) -> list[str | None]:
    """:func:`assign_vendors`, or no vendor for anyone without ``vendors``."""
    if swap and not vendors:
        raise AnnotationError("swap=true needs vendors=")
    return assign_vendors(previous, vendors, swap=swap, seed=seed) if vendors else [None] * len(previous)


def next_task(record: dict, vendor: str | None) -> dict:
    """A record's next-round task, its previous caption prefilled as the starting text."""
    previous = round_texts(record)
    last = max(previous)
    return {
        "id": record["id"],
        **_image_fields(record),
        "alt": record["alt"],
        "round": last + 1,
        "previous_caption": previous[last],
        "previous_vendor": previous_vendor(record),
        "caption": previous[last],
        "draft_source": PREVIOUS_ROUND,
        "annotator": None,
        "vendor": vendor,
        "timestamp": None,
    }


def make_tasks(
    records: Sequence[dict], *, vendors: Sequence[str] | None = None, swap: bool = False, seed: int = 0
) -> list[dict]:
    """The next-round task of every record (:func:`next_task`), vendors by :func:`vendor_plan`."""
    assigned = vendor_plan([previous_vendor(record) for record in records], vendors, swap=swap, seed=seed)
    return [next_task(record, vendor) for record, vendor in zip(records, assigned)]


def write_tasks(path: str, tasks: Iterable[dict]) -> list[str]:
    """Write tasks to ``path``, streamed; a ``{vendor}`` placeholder in it gives one file per vendor (all or none).
    Returns the paths, in vendor order."""
    split = "{vendor}" in path
    files: dict[str, str] = {}
    with JsonlFiles() as out:
        if not split:
            out.open(path)
        for task in tasks:
            if split and task["vendor"] is None:
                raise AnnotationError(f"{path}: the {{vendor}} placeholder needs vendors=")
            target = path.replace("{vendor}", task["vendor"]) if split else path
            files[task["vendor"] if split else ""] = target
            out.write(target, task)
    return [path] if not split else [files[vendor] for vendor in sorted(files)]


# ---------------------------------------------------------------------------------------------- merge


@dataclass
class MergeSummary:
    """Counts from :func:`merge_tasks`."""

    merged: int = 0
    unchanged_captions: int = 0
    skipped_incomplete: int = 0
    records_without_task: int = 0


def _task_problems(task: Any, rounds: dict[str, int]) -> tuple[list[str], list[str]]:
    """``(problems, unfinished)``: what is wrong with a task, and what the annotator has not filled in yet.
    ``rounds``: record id -> how many human rounds the record has."""
    problems = schema_errors(task, kind="task")
    if problems:
        return problems, []
    unfinished = [f"{name}: not filled in yet" for name in ("annotator", "vendor", "timestamp") if task[name] is None]
    if not task["caption"].strip():
        unfinished.append("caption: empty")
    done = rounds.get(task["id"])
    if done is None:
        problems.append("id: no record with this id in the records file")
    elif task["round"] != done + 2:
        problems.append(
            f"round: the record has rounds up to {done + 1}, so its next round is {done + 2}, got {task['round']}"
        )
    return problems, unfinished


_ROUND_FIELDS = ("round", "caption", "annotator", "vendor", "timestamp", "draft_source")


def collect_rounds(
    tasks: Iterable[tuple[str, Any]], rounds: dict[str, int], summary: MergeSummary, problems: list[str], *,
    skip_incomplete: bool = False,
) -> dict[str, dict]:
    """The new round of each record from completed ``(where, task)`` pairs: record id -> round entry.

    ``rounds``: record id -> how many human rounds it has. Problems are appended to ``problems`` (each naming the
    file and line ``where`` says), counts to ``summary``. This is the part of a merge that is held in memory: one
    round per task, keyed by id, since the records come in their own order.
    """
    new_rounds, seen = {}, {}
    for where, task in tasks:
        has_id = isinstance(task, dict) and isinstance(task.get("id"), str)
        name = f"{where}: task {task['id']!r}" if has_id else f"{where}: task"
        task_problems, unfinished = _task_problems(task, rounds)
        if unfinished and skip_incomplete and not task_problems:
            summary.skipped_incomplete += 1
            continue
        if task_problems or unfinished:
            problems.extend(f"{name}: {p}" for p in task_problems + unfinished)
            continue
        if task["id"] in seen:
            problems.append(f"{name}: id: a second task for this record (first at {seen[task['id']]})")
            continue
        seen[task["id"]] = where
        new_rounds[task["id"]] = {key: task[key] for key in _ROUND_FIELDS}
        summary.unchanged_captions += task["caption"] == task["previous_caption"]
    return new_rounds


def merged_records(
    records: Iterable[dict], new_rounds: dict[str, dict], summary: MergeSummary, problems: list[str]
) -> Iterator[dict]:
    """``records`` with their new rounds (:func:`collect_rounds`) appended, streamed; a merged record that breaks
    the schema is appended to ``problems``."""
    for record in records:
        entry = new_rounds.get(record["id"])
        if entry is None:
            summary.records_without_task += 1
            yield record
            continue
        updated = {**record, "rounds": [*record["rounds"], entry]}
        problems.extend(f"record {record['id']!r} after merge: {p}" for p in schema_errors(updated))
        summary.merged += 1
        yield updated


def _merge_problems(problems: list[str]) -> None:
    _raise_problems(problems, f"{len(problems)} problem(s), nothing written")


def merge_tasks(
    records: Sequence[dict], tasks: Sequence[tuple[str, Any]], *, skip_incomplete: bool = False
) -> tuple[list[dict], MergeSummary]:
    """Fold completed tasks into copies of ``records``.

    ``tasks`` are ``(where, task)`` pairs, ``where`` naming the file and line for error messages. Every
    problem is collected and raised together, so nothing is ever half-merged. Unfinished tasks (no
    annotator, vendor or timestamp yet, or an empty caption) are errors unless ``skip_incomplete``.
    """
    summary, problems = MergeSummary(), []
    rounds = {record["id"]: len(record["rounds"]) for record in records}
    new_rounds = collect_rounds(tasks, rounds, summary, problems, skip_incomplete=skip_incomplete)
    merged = list(merged_records(records, new_rounds, summary, problems))
    _merge_problems(problems)
    return merged, summary


# ---------------------------------------------------------------------------------------------- stats


@dataclass
class RoundStats:
    """One row of the paper's §5.1 table. Edit distance is character-level Levenshtein to the previous round."""

    round: int
    n: int
    mean_words: float
    mean_edit_distance: float | None
    clip_n: int = 0
    mean_clip_score: float | None = None


def word_count(text: str) -> int:
    """Length in words: whitespace-separated tokens."""
    return len(text.split())


def round_stats(records: Iterable[dict], clip_scores: dict[tuple[str, int], float] | None = None) -> list[RoundStats]:
    """Per round: count, mean words, mean edit distance to the same record's previous round, mean CLIP score.

    ``records`` are read once, streamed (running sums per round are all that is kept). ``clip_scores`` maps
    ``(record id, round)`` to an image-text score; records missing from it are left out of that round's CLIP mean
    only (``clip_n`` says how many were scored).
    """
    words: dict[int, list[float]] = {}  # round -> [count, sum]
    edits: dict[int, list[float]] = {}
    clips: dict[int, list[float]] = {}
    for record in records:
        texts = round_texts(record)
        for number, text in texts.items():
            _add(words, number, word_count(text))
            if number > 1:
                _add(edits, number, Levenshtein.distance(texts[number - 1], text))
            if clip_scores and (record["id"], number) in clip_scores:
                _add(clips, number, clip_scores[(record["id"], number)])
    return [
        RoundStats(
            round=number,
            n=words[number][0],
            mean_words=_mean(words[number]),
            mean_edit_distance=_mean(edits[number]) if number in edits else None,
            clip_n=clips[number][0] if number in clips else 0,
            mean_clip_score=_mean(clips[number]) if number in clips else None,
        )
        for number in sorted(words)
    ]


def _add(sums: dict[int, list[float]], number: int, value: float) -> None:
    count_sum = sums.setdefault(number, [0, 0])
    count_sum[0] += 1
    count_sum[1] += value


def _mean(count_sum: list[float]) -> float:
    return count_sum[1] / count_sum[0]


def stats_markdown(stats: Sequence[RoundStats]) -> str:
    """The §5.1 table (Annotation | n | Length | Edit dist. | Alignment) in Markdown."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [
        "| Annotation | n | Length (words) | Edit dist. (chars) | Alignment (CLIP) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in stats:
        name = "Round 1 (alt-text)" if row.round == 1 else f"Round {row.round}"
        cells = [name, str(row.n), cell(row.mean_words), cell(row.mean_edit_distance), cell(row.mean_clip_score)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def resolve_image(record: dict, image_root: str | os.PathLike | None) -> Path | None:
    """The local image of a record (``img_path`` under ``image_root``), or ``None`` if it has none on disk.

    Annotation only reads its images, so ``img_path`` may lead outside ``image_root``.
    """
    if "img_path" not in record:
        return None
    path = image_file(record["img_path"], image_root, key=record["id"], allow_outside_root=True)
    return path if path.is_file() else None


def clip_scores_for_records(
    records: Iterable[dict], scorer: Any, image_root: str | os.PathLike | None, *, batch_records: int = 256
) -> dict[tuple[str, int], float]:
    """``{(record id, round): CLIPScore}`` for every round of every record with a local image; ``records`` are
    streamed, ``batch_records`` at a time (the scores, a float per round, are what is kept)."""
    scores: dict[tuple[str, int], float] = {}
    for batch in _batches(records, batch_records):
        keys, images, texts = [], [], []
        for record in batch:
            image = resolve_image(record, image_root)
            if image is None:
                continue
            for number, text in round_texts(record).items():
                keys.append((record["id"], number))
                images.append(image)
                texts.append(text)
        scores.update(zip(keys, score_image_files(scorer, images, texts)))
    return scores


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


# ---------------------------------------------------------------------------------------------- prefill


class Captioner(Protocol):
    """What prefill needs from a trained captioner (``altogether.Recaptioner`` has this method)."""

    def recaption(self, images: list, alt_texts: list) -> list[str]: ...


def draft_captions(
    captioner: Captioner, images: Sequence[Path], alt_texts: Sequence[str | list[str] | None], batch_size: int = 16
) -> list[str]:
    """The single place the model is called: drafts for ``images`` given their alt-texts, in batches."""
    if batch_size < 1:
        raise AnnotationError(f"batch_size must be >= 1, got {batch_size}")
    drafts: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        batch = captioner.recaption(chunk, list(alt_texts[start : start + batch_size]))
        if len(batch) != len(chunk):
            raise AnnotationError(f"captioner returned {len(batch)} captions for {len(chunk)} images")
        drafts.extend(batch)
    return drafts


def local_images(records: Sequence[dict], image_root: str | os.PathLike | None) -> list[Path]:
    """Each record's image file; a record without one on disk is an error naming it."""
    images = []
    for record in records:
        image = resolve_image(record, image_root)
        if image is None:
            name = f"record {record['id']!r}"
            if "img_path" in record:
                raise AnnotationError(f"{name}: img_path {record['img_path']!r} not found under {image_root or '.'}")
            raise AnnotationError(f"{name}: no img_path (download the image first)")
        images.append(image)
    return images


def prefilled_tasks(
    records: Iterable[dict],
    assigned: Iterable[str | None],
    captioner: Captioner,
    *,
    model_name: str,
    image_root: str | os.PathLike | None = None,
    batch_size: int = 16,
) -> Iterator[dict]:
    """Next-round tasks (:func:`next_task`, vendors ``assigned`` in record order) whose starting text is the
    captioner's draft instead of the previous caption; streamed, ``batch_size`` records at a time."""
    if batch_size < 1:
        raise AnnotationError(f"batch_size must be >= 1, got {batch_size}")
    vendors = iter(assigned)
    for batch in _batches(records, batch_size):
        drafts = draft_captions(captioner, local_images(batch, image_root), [r["alt"] or None for r in batch],
                                batch_size)
        for record, draft in zip(batch, drafts):
            yield {**next_task(record, next(vendors)), "caption": draft, "draft_source": f"model:{model_name}"}


def prefill_tasks(
    records: Sequence[dict],
    captioner: Captioner,
    *,
    model_name: str,
    image_root: str | os.PathLike | None = None,
    vendors: Sequence[str] | None = None,
    swap: bool = False,
    seed: int = 0,
    batch_size: int = 16,
) -> list[dict]:
    """:func:`prefilled_tasks` of records in memory, vendors by :func:`vendor_plan`; every image is checked first."""
    local_images(records, image_root)
    assigned = vendor_plan([previous_vendor(record) for record in records], vendors, swap=swap, seed=seed)
    return list(prefilled_tasks(records, assigned, captioner, model_name=model_name, image_root=image_root,
                                batch_size=batch_size))


# ---------------------------------------------------------------------------------------------- Altogether-FT


def iter_records_from_ft(
    ft: Any, *, timestamp: str, annotator: str = "unknown", vendor: str = "unknown", id_prefix: str = "ft-"
) -> Iterator[dict]:
    """Records from the Altogether-FT layout ``{"data": [{"alt", "url", "img_path", "round2", "round3", ...}]}``,
    one at a time (the layout is one JSON document, so ``ft`` is the whole of it, parsed).

    The layout has no provenance, so every round gets ``annotator``, ``vendor`` and ``timestamp``. Items
    without an ``id`` get ``{id_prefix}{index:06d}``; keys other than the known ones go to ``meta``.
    """
    if not isinstance(ft, dict) or not isinstance(ft.get("data"), list):
        raise AnnotationError('expected the Altogether-FT layout {"data": [...]}')
    for index, item in enumerate(ft["data"]):
        if not isinstance(item, dict):
            raise AnnotationError(f"data[{index}]: expected a JSON object")
        round_keys = sorted((int(k[5:]), k) for k in item if k.startswith("round") and k[5:].isdigit())
        rounds = []
        for position, (number, key) in enumerate(round_keys):
            if number != position + 2:
                raise AnnotationError(f"data[{index}].{key}: rounds must run round2, round3, ... without gaps")
            provenance = {"annotator": annotator, "vendor": vendor, "timestamp": timestamp}
            rounds.append({"round": number, "caption": item[key], **provenance})
        known = {"id", "alt", *IMAGE_FIELDS, *(key for _, key in round_keys)}
        record = {"id": str(item.get("id", f"{id_prefix}{index:06d}"))}
        record.update({k: item[k] for k in IMAGE_FIELDS if k in item})
        record.update({"alt": item.get("alt"), "rounds": rounds})
        extra = {k: v for k, v in item.items() if k not in known}
        if extra:
            record["meta"] = extra
        _raise_problems(schema_errors(record), f"data[{index}]: {_record_name(record)}")
        yield record


def records_from_ft(ft: Any, **options: Any) -> list[dict]:
    """:func:`iter_records_from_ft` as a list."""
    return list(iter_records_from_ft(ft, **options))


def ft_items(records: Iterable[dict]) -> Iterator[dict]:
    """Each record as an Altogether-FT item (``meta`` keys are written back as top-level keys), streamed."""
    for record in records:
        item = {"id": record["id"], "alt": record["alt"], **_image_fields(record)}
        for key in record.get("meta", {}):
            if key in item or (key.startswith("round") and key[5:].isdigit()):
                raise AnnotationError(f"record {record['id']!r}: meta.{key}: clashes with an Altogether-FT field")
        item.update(record.get("meta", {}))
        item.update((f"round{entry['round']}", entry["caption"]) for entry in record["rounds"])
        yield item


def records_to_ft(records: Iterable[dict]) -> dict:
    """The Altogether-FT layout of ``records``: ``{"data": [item, ...]}`` (:func:`ft_items`)."""
    return {"data": list(ft_items(records))}


def write_ft(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write the Altogether-FT JSON of ``records`` atomically, streamed item by item; returns the number of items.

    The text is ``json.dumps(records_to_ft(records), ensure_ascii=False, indent=1)`` and a newline, without the
    whole document in memory.
    """
    count = 0
    with atomic_open(path) as out:
        out.write(b'{\n "data": [')
        for item in ft_items(records):
            text = json.dumps(item, ensure_ascii=False, indent=1).replace("\n", "\n  ")  # nested two levels
            out.write(((",\n  " if count else "\n  ") + text).encode("utf-8"))
            count += 1
        out.write(b"\n ]\n}\n" if count else b"]\n}\n")
    return count


# ---------------------------------------------------------------------------------------------- command line


@dataclass
class ProgressSettings:
    progress: bool = setting(True, PROGRESS_HELP)


@dataclass
class VendorSettings(ProgressSettings):
    """How ``next-round`` and ``prefill`` split the records between annotation vendors."""

    vendors: Optional[str] = setting(None, "comma-separated vendor names to split the records between, e.g. A,B")
    swap: bool = setting(False, "give each record to the vendor after the one that did its previous round")
    seed: int = setting(0, "seed of the vendor split")


@dataclass
class MergeSettings(ProgressSettings):
    skip_incomplete: bool = setting(False, "leave out tasks not yet done instead of failing")


@dataclass
class StatsSettings(ProgressSettings):
    clip_model: Optional[str] = setting(None, "open_clip model name for image-text alignment, e.g. ViT-B-32")
    clip_pretrained: Optional[str] = setting(None, "open_clip pretrained tag or checkpoint file")
    device: str = setting("cpu", "device for the CLIP model")
    image_root: Optional[str] = setting(None, "folder that img_path is relative to (default: the current folder)")
    json: Optional[str] = setting(None, "also write the table as JSON here")


@dataclass
class PrefillSettings(VendorSettings):
    image_root: Optional[str] = setting(None, "folder that img_path is relative to (default: the current folder)")
    batch_size: int = setting(16, "images per captioner call")


@dataclass
class FromFtSettings(ProgressSettings):
    annotator: str = setting("unknown", "annotator recorded for every round")
    vendor: str = setting("unknown", "vendor recorded for every round")
    timestamp: Optional[str] = setting(None, "ISO 8601 time recorded for every round (default: the file's "
                                             "modification time)")


def _load_recaptioner(model: str) -> Captioner:
    from .recaptioner import Recaptioner

    try:
        return Recaptioner.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise AnnotationError(f"MODEL {model}: cannot load ({err})") from None


def _vendor_list(text: str | None) -> list[str] | None:
    return [name.strip() for name in str(text).split(",")] if text is not None else None


def _records_again(records_path: str, s: ProgressSettings, label: str) -> Iterator[dict]:
    """The second pass over a record file a first pass validated: read, not validated again."""
    return (record for _, record in progress(iter_jsonl(records_path), label, enabled=s.progress))


def _tasks_plan(records_path: str, s: VendorSettings, label: str) -> tuple[Iterable[str | None], Iterator[dict]]:
    """Each record's vendor (:func:`vendor_plan`) and the records to make tasks of. With ``vendors``, a first pass
    validates every record and keeps only its previous vendor, and the records are then read again; without, they
    are read once."""
    vendors = _vendor_list(s.vendors)
    vendor_plan([], vendors, swap=s.swap, seed=s.seed)  # the options' errors before any reading
    if not vendors:
        return repeat(None), progress(iter_records(records_path), label, enabled=s.progress)
    previous = [previous_vendor(r) for r in progress(iter_records(records_path), "records", enabled=s.progress)]
    assigned = vendor_plan(previous, vendors, swap=s.swap, seed=s.seed)
    return assigned, _records_again(records_path, s, label)


def _next_round(paths: list[str], s: VendorSettings) -> int:
    """Streamed: one record at a time (:func:`_tasks_plan`)."""
    records_path, out = paths
    assigned, records = _tasks_plan(records_path, s, "tasks")
    rounds: set[int] = set()
    count = 0

    def counted(tasks: Iterable[dict]) -> Iterator[dict]:
        nonlocal count
        for task in tasks:
            rounds.add(task["round"])
            count += 1
            yield task

    written = write_tasks(out, counted(next_task(record, vendor) for record, vendor in zip(records, assigned)))
    print(f"wrote {count} task(s) for round(s) {sorted(rounds)} to {', '.join(written)}")
    return 0


def _merge(paths: list[str], s: MergeSettings) -> int:
    """Records read twice, streamed: a first pass validates them and keeps each id's number of rounds, the tasks'
    new rounds are held by id (:func:`collect_rounds`), the second pass writes the merged records in order."""
    records_path, *task_paths, out = paths
    rounds = {r["id"]: len(r["rounds"]) for r in progress(iter_records(records_path), "records", enabled=s.progress)}
    summary, problems = MergeSummary(), []
    tasks = ((f"{path}:{number}", task) for path in task_paths for number, task in iter_jsonl(path))
    new_rounds = collect_rounds(progress(tasks, "tasks", enabled=s.progress), rounds, summary, problems,
                                skip_incomplete=s.skip_incomplete)
    with JsonlFiles() as files:
        files.open(out)
        for record in merged_records(_records_again(records_path, s, "merge"), new_rounds, summary, problems):
            files.write(out, record)
        _merge_problems(problems)  # inside: nothing is renamed into place
    print(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in asdict(summary).items()))
    return 0


def _stats(paths: list[str], s: StatsSettings, *, load_scorer: Callable[..., Any]) -> int:
    """Streamed: running sums per round (with a CLIP model, a first pass keeps a score per round and record)."""
    (records_path,) = paths
    if s.clip_pretrained and not s.clip_model:
        raise AnnotationError("clip_pretrained needs clip_model")
    scores = None
    if s.clip_model:
        scorer = load_scorer(s.clip_model, s.clip_pretrained, s.device)
        scores = clip_scores_for_records(progress(iter_records(records_path), "CLIP", enabled=s.progress), scorer,
                                         s.image_root)
    stats = round_stats(progress(iter_records(records_path), "stats", enabled=s.progress), scores)
    if not stats:
        raise AnnotationError(f"{records_path}: no records")
    records = stats[0].n  # every record has round 1, its alt-text
    print(stats_markdown(stats), end="")
    if scores is not None:
        scored = len({record_id for record_id, _ in scores})
        print(f"CLIPScore ({CLIPSCORE_FORMULA}) for {scored} of {records} record(s); the others have no local image")
    if s.json:
        payload = {
            "records": records,
            "length_unit": "words (whitespace-separated)",
            "edit_distance_unit": "characters (Levenshtein, unit costs) to the same record's previous round",
            "clip_score": f"CLIPScore = {CLIPSCORE_FORMULA} with the model below" if s.clip_model else None,
            "clip_model": s.clip_model,
            "clip_pretrained": s.clip_pretrained,
            "rounds": [asdict(row) for row in stats],
        }
        atomic_write_text(s.json, json.dumps(payload, indent=2) + "\n")
    return 0


def _prefill(paths: list[str], s: PrefillSettings, *, load_captioner: Callable[[str], Captioner]) -> int:
    """Streamed, ``batch_size`` records at a time; a first pass validates the records, checks every image (before
    the slow model load) and keeps each record's previous vendor."""
    model, records_path, out = paths
    vendors = _vendor_list(s.vendors)
    previous = []
    for record in progress(iter_records(records_path), "records", enabled=s.progress):
        local_images([record], s.image_root)
        previous.append(previous_vendor(record))
    assigned = vendor_plan(previous, vendors, swap=s.swap, seed=s.seed)
    tasks = prefilled_tasks(_records_again(records_path, s, "prefill"), assigned, load_captioner(model), model_name=model, image_root=s.image_root,
                            batch_size=s.batch_size)
    written = write_tasks(out, tasks)
    print(f"wrote {len(assigned)} model-drafted task(s) to {', '.join(written)}")
    return 0


def _from_ft(paths: list[str], s: FromFtSettings) -> int:
    ft_path, out = paths
    try:
        ft = json.loads(Path(ft_path).read_bytes().decode("utf-8"))
        stamp = s.timestamp or datetime.fromtimestamp(Path(ft_path).stat().st_mtime, timezone.utc).isoformat()
    except OSError as err:
        raise AnnotationError(f"{ft_path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:  # worded as JSONL lines are (altogether.io.jsonl_lines)
        line, column = err.object.count(b"\n", 0, err.start) + 1, err.start - err.object.rfind(b"\n", 0, err.start)
        raise AnnotationError(f"{ft_path}:{line}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at column "
                              f"{column})") from None
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{ft_path}:{err.lineno}: not valid JSON ({err.msg})") from None
    records = iter_records_from_ft(ft, timestamp=stamp, annotator=s.annotator, vendor=s.vendor)
    try:
        count = write_jsonl(out, progress(records, "records", enabled=s.progress))
    except AnnotationError as err:
        raise AnnotationError(f"{ft_path}: {err}") from None
    print(f"wrote {count} record(s) to {out}")
    return 0


def _to_ft(paths: list[str], s: ProgressSettings) -> int:
    """Streamed: one record at a time (:func:`write_ft`)."""
    records_path, out = paths
    count = write_ft(out, progress(iter_records(records_path), "records", enabled=s.progress))
    print(f"wrote {count} item(s) to {out}")
    return 0


_RECORDS = {"RECORDS": "records JSONL"}
_TASKS_OUT = {"OUT": "task JSONL to write; a {vendor} placeholder writes one file per vendor"}


def actions(
    load_captioner: Callable[[str], Captioner] = _load_recaptioner,
    load_scorer: Callable[..., Any] = ClipScorer.from_open_clip,
) -> dict[str, Command]:
    """The actions of ``altogether annotate``; the loaders (model name -> captioner, ``(clip_model,
    clip_pretrained, device)`` -> scorer) are injectable for tests."""
    return {
        "next-round": Command("write the next round's task file (previous caption prefilled)",
                              {**_RECORDS, **_TASKS_OUT}, VendorSettings, _next_round),
        "merge": Command("fold completed tasks back into the records",
                         {**_RECORDS, "TASKS...": "completed task JSONL file(s)",
                          "OUT": "records JSONL to write (may be RECORDS itself)"}, MergeSettings, _merge),
        "stats": Command("per-round length, edit distance and CLIP alignment (paper §5.1)", _RECORDS, StatsSettings,
                         partial(_stats, load_scorer=load_scorer)),
        "prefill": Command("draft the next round with a trained captioner",
                           {"MODEL": "Recaptioner export folder or Hub id", **_RECORDS, **_TASKS_OUT},
                           PrefillSettings, partial(_prefill, load_captioner=load_captioner)),
        "from-ft": Command("convert an Altogether-FT JSON file to records JSONL",
                           {"FT_JSON": 'Altogether-FT JSON ({"data": [...]})', "OUT": "records JSONL to write"},
                           FromFtSettings, _from_ft),
        "to-ft": Command("convert records JSONL to the Altogether-FT JSON layout",
                         {**_RECORDS, "OUT": "Altogether-FT JSON to write"}, ProgressSettings, _to_ft),
    }


def main(argv: Sequence[str], **loaders: Any) -> int:
    """``altogether annotate ACTION ...``; ``loaders`` go to :func:`actions`."""
    return run_action("altogether annotate", argv, actions(**loaders))


if __name__ == "__main__":
    sys.exit(run_cli(main))
