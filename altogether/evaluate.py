"""``python -m altogether.evaluate MODEL DATA [key=value ...]``: the paper's Table 1 protocol, in one command.

MODEL is an export folder or a Hugging Face Hub id (loaded with :class:`~altogether.recaptioner.Recaptioner`).
DATA is an Altogether-FT annotation JSON, a JSONL / Parquet file or webdataset shards (as training reads them),
or the name of an installed evaluation set (:mod:`altogether.plugins`; ``demo``: held-out scenes of the synthetic
world), whose own settings are given as ``NAME.key=value``. In code, :func:`evaluate` also takes an
:class:`EvalSet` built by the caller. Every record is captioned under each condition (``w/ alt``, ``w/o alt``,
``w/ random alt``, plus any the set offers) with greedy decoding unless told otherwise, and scored against its
reference caption: BLEU-1..4, METEOR, ROUGE-L, CIDEr and noun-phrase P/R/F1 (:mod:`altogether.metrics`),
CLIPScore (:mod:`altogether.clip_score`) and the set's own scores, if it has a scorer.
The alt-texts themselves are scored as the ``alt-text`` row, as in the paper; the references' CLIPScore is the
``reference`` row.

Written to ``output_dir``: ``metrics.json``, ``captions.jsonl`` (every prompt and caption), ``report.html``
(self-contained) and ``training_curves.png`` when the export's training run is known. The metrics table is
printed on stdout as Markdown. See ``docs/evaluation.md``.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .cli import split_args
from .conditions import CONDITIONS, build_conditions
from .config import ConfigError, check_alt_text_sources
from .data.images import load_image
from .data.records import ALT_KEY, IMAGE_KEY, BadRecord, ImageRef, Record
from .generation import GenerationConfig, GenerationError, GenerationOverrides, given
from .io import atomic_write_text

log = logging.getLogger(__name__)

USAGE = "usage: python -m altogether.evaluate MODEL DATA [key=value ...]   (MODEL: export folder or Hub id; " \
        "DATA: annotation JSON, JSONL, Parquet, webdataset shards or an evaluation set's name: {})"
ALT_TEXT_ROW = "alt-text"
REFERENCE_ROW = "reference"
CLIPSCORE_KEY = "CLIPScore"
TRUNCATION_KEY = "CLIP text truncated (%)"
# Column order of the tables: the paper's Table 1 order, then what it does not have.
TABLE_COLUMNS = (CLIPSCORE_KEY, "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
                 "NP-F1", "NP-P", "NP-R", TRUNCATION_KEY)
CIDER_NOTE = ("CIDEr's IDF weights come from the references of the evaluated set itself: CIDEr is comparable "
              "only between runs on the same set of records.")
_IMAGE_CHUNK = 256  # images decoded at a time for CLIPScore, so memory does not grow with the data set
# Evaluation's own override of the export's generation settings: greedy unless asked, so numbers are deterministic.
EVAL_GENERATION = {"do_sample": False}


@dataclass
class EvalConfig(GenerationOverrides):
    """Every ``key=value`` the command accepts (the keyword arguments of :func:`evaluate`)."""

    output_dir: Optional[str] = None  # default: eval/<model>__<data>
    conditions: Any = None  # comma-separated names or a list; default: all the data offers
    seed: int = 0  # random-alt permutation, sampling (the generation seed), a named set's records
    # data
    format: str = "auto"  # auto | annotations | jsonl | parquet | webdataset
    target_key: str = "round3"
    alt_key: str = ALT_KEY
    alt_text_sources: Optional[List[str]] = None  # [source, text] pairs (MetaCLIP `texts`) kept; None = all
    image_key: str = IMAGE_KEY
    image_root: Optional[str] = None
    limit: Optional[int] = None  # evaluate the first N records read
    # model and generation (greedy unless do_sample=true: EVAL_GENERATION; other unset keys keep the export's)
    device: Optional[str] = None
    dtype: Optional[str] = None
    batch_size: int = 16
    # metrics
    clip_score: bool = True
    clip_model: Optional[str] = None  # default: the captioner's own encoder
    clip_pretrained: Optional[str] = None
    clip_batch_size: int = 64
    spacy_pipeline: str = "en_core_web_sm"
    alt_text_row: bool = True
    # report
    num_examples: int = 24
    run_dir: Optional[str] = None  # default: RUN when MODEL is RUN/export and RUN/logs exists
    progress: bool = True
    # A named evaluation set's own settings (DATA=NAME; `NAME.key=value` on the command line), given to its builder.
    data_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSet:
    """The records to evaluate, how many were read, and those skipped (key and reason): what a data file is read
    into, and what an evaluation set built in code (or by an ``altogether.eval_sets`` plug-in) hands to
    :func:`evaluate`.

    ``conditions``: the set's own conditions beyond :data:`~altogether.conditions.CONDITIONS`, each a prompt per
    record. ``score(captions, prompts)``: the set's own scores of one condition's captions (``{name: fraction or
    None}``), reported next to the standard metrics; ``score_table`` formats ``{condition: scores}`` as Markdown
    (default: :func:`format_table`). ``info``: what ``metrics.json`` says about the data besides its counts.
    """

    id: str
    kind: str  # a reader format, or what built the set
    records: list[Record]
    read: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    conditions: dict[str, list[str]] = field(default_factory=dict)
    score: Optional[Callable[[Sequence[str], Sequence[str]], dict[str, Optional[float]]]] = None
    score_table: Optional[Callable[[dict[str, dict[str, Optional[float]]]], str]] = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    """What :func:`evaluate` wrote: the ``metrics.json`` content, the Markdown table and the output paths."""

    summary: dict[str, Any]
    table: str
    output_dir: Path
    files: dict[str, Path]

    @property
    def metrics(self) -> dict[str, dict[str, float | None]]:
        """``{condition: {metric: value or None}}``."""
        return self.summary["metrics"]


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


def eval_config(overrides: Sequence[str] | dict[str, Any] | None = None) -> EvalConfig:
    """An :class:`EvalConfig` from ``key=value`` strings or a dict (``data_options.eval_scenes=5`` /
    ``{"data_options": {...}}``).

    Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key.
    """
    base = OmegaConf.structured(EvalConfig)
    try:
        if overrides:
            bad = [o for o in overrides if "=" not in o] if not isinstance(overrides, dict) else []
            if bad:
                raise ConfigError(f"arguments after MODEL DATA must be key=value, got {' '.join(bad)!r}")
            extra = OmegaConf.create(dict(overrides)) if isinstance(overrides, dict) else \
                OmegaConf.from_dotlist(list(overrides))
            base = OmegaConf.merge(base, extra)
        cfg: EvalConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        known = ", ".join(EvalConfig.__dataclass_fields__)
        raise ConfigError(f"key {key!r}: {str(err).splitlines()[0]} (valid keys: {known}; a named evaluation "
                          "set's own: NAME.key)") from None
    for name in ("batch_size", "clip_batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"key {name!r}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"key 'limit': must be >= 1, got {cfg.limit}")
    if cfg.num_examples < 0:
        raise ConfigError(f"key 'num_examples': must be >= 0, got {cfg.num_examples}")
    check_alt_text_sources(cfg.alt_text_sources, "alt_text_sources")
    try:
        GenerationConfig.check_values(generation_overrides(cfg))
    except GenerationError as err:
        raise ConfigError(f"key {err.key!r}: {err}") from None
    return cfg


def condition_names(requested: str | Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """The conditions to run, in the order asked (``"w/ alt,w/o alt"`` or a list); all available ones if None."""
    if requested is None:
        return list(available)
    names = [n.strip() for n in requested.split(",")] if isinstance(requested, str) else [str(n) for n in requested]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise ConfigError(f"key 'conditions': unknown or no condition(s) {unknown}; this data offers "
                          f"{', '.join(available)} (comma-separated, e.g. conditions='w/ alt,w/o alt')")
    if len(set(names)) != len(names):
        raise ConfigError(f"key 'conditions': a condition is given twice in {names}")
    return names


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def data_format(data: str, cfg: EvalConfig) -> str:
    """The reader format of ``data``, after checking that its file(s) exist."""
    from .data.readers import detect_format, expand_shards

    fmt = cfg.format if cfg.format != "auto" else detect_format(data)
    if fmt not in ("annotations", "coco", "jsonl", "parquet", "webdataset"):
        raise ConfigError(f"key 'format': {fmt!r} is not one of auto, annotations, coco, jsonl, parquet, webdataset")
    paths = expand_shards(data) if fmt == "webdataset" else [data]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"DATA {data!r}: file not found: {missing[0]}"
                                + (f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else ""))
    return fmt


def read_records(data: str, fmt: str, cfg: EvalConfig) -> EvalSet:
    """Records with a reference caption (``target_key``) and a readable image; the others are skipped."""
    from .data.readers import Fields, iter_webdataset, open_table

    fields = Fields(alt_key=cfg.alt_key, image_key=cfg.image_key, target_key=cfg.target_key,
                    image_root=cfg.image_root,
                    alt_sources=cfg.alt_text_sources)
    out = EvalSet(id=data, kind=fmt, records=[], read=0)

    def skip(key: str, reason: str) -> None:
        out.skipped.append({"key": key, "reason": reason})

    if fmt == "webdataset":
        candidates = iter_webdataset(data, fields, on_bad=skip)
    else:
        source = open_table(data, fmt, fields)
        candidates = _table_records(source, skip, len(source) if cfg.limit is None else min(cfg.limit, len(source)))
    for record in candidates:
        if cfg.limit is not None and len(out.records) + len(out.skipped) >= cfg.limit:
            break
        if not _references(record.target):
            skip(record.key, f"no reference caption {cfg.target_key!r}")
            continue
        try:
            load_image(record.image, key=record.key)  # fail here, not in the middle of generation
            out.records.append(record)
        except BadRecord as err:
            skip(record.key, str(err))
    out.read = len(out.records) + len(out.skipped)
    return out


def _references(target: Any) -> list[str]:
    """A record's reference captions: its target string, or every string of a list (COCO's several references);
    empty when there is none to score against."""
    texts = [target] if isinstance(target, str) else target if isinstance(target, list) else []
    return [t for t in texts if isinstance(t, str) and t.strip()] if all(isinstance(t, str) for t in texts) else []


def _table_records(source, skip, count: int):
    for index in range(count):
        try:
            yield source[index]
        except BadRecord as err:
            skip(str(index), str(err))


def named_eval_set(name: str, cfg: EvalConfig) -> EvalSet:
    """The evaluation set the ``altogether.eval_sets`` plug-in ``name`` builds from ``cfg.data_options``,
    ``cfg.seed`` and ``cfg.limit`` (its records, at most ``limit``)."""
    from .plugins import EVAL_SETS, load_plugin

    return load_plugin(EVAL_SETS, name)(dict(cfg.data_options), seed=cfg.seed, limit=cfg.limit)


def eval_set_names() -> list[str]:
    """Names DATA may take besides a file: the installed evaluation sets."""
    from .plugins import EVAL_SETS, plugin_names

    return plugin_names(EVAL_SETS)


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


def generation_overrides(cfg: EvalConfig) -> dict[str, Any]:
    """The export's generation settings to override: :data:`EVAL_GENERATION`, then the command's own keys
    (``seed`` included: seeded sampling draws each caption from its image's own stream)."""
    return {**EVAL_GENERATION, **given(cfg)}


# ---------------------------------------------------------------------------------------------------------
# CLIPScore
# ---------------------------------------------------------------------------------------------------------


def clip_scorer_for(captioner, cfg: EvalConfig):
    """(scorer or None, description). Default: the captioner's own encoder as its export loads it (a stored
    ``local-dir:`` encoder works offline); ``clip_model`` / ``clip_pretrained`` override. When it cannot load,
    the description says why and CLIPScore is reported unavailable."""
    from .clip_score import ClipScorer, ClipWeightsUnavailableError
    from .export import export_model_config

    if not cfg.clip_score:
        return None, {"available": False, "reason": "disabled with clip_score=false"}
    encoder = export_model_config(captioner.directory, captioner.meta).encoder
    if cfg.clip_model is not None:
        name, pretrained, source = cfg.clip_model, cfg.clip_pretrained, "clip_model/clip_pretrained"
    elif cfg.clip_pretrained is not None:
        name, pretrained, source = encoder.name, cfg.clip_pretrained, "the captioner's encoder, clip_pretrained"
    else:
        name, pretrained, source = encoder.name, encoder.pretrained, "the captioner's encoder"
    info: dict[str, Any] = {"model": name, "pretrained": pretrained, "source": source}
    try:
        scorer = ClipScorer.from_open_clip(name, pretrained, device=captioner.device)
    except ClipWeightsUnavailableError as err:
        log.warning("CLIPScore unavailable: %s", err)
        return None, {**info, "available": False, "reason": str(err)}
    scorer.batch_size = cfg.clip_batch_size
    info.update(available=True, context_length=scorer.context_length,
                truncation=f"texts are tokenized by the scorer's own tokenizer and cut to its {scorer.context_length}"
                           "-token context, keeping the start (start/end tokens included)")
    return scorer, info


def embed_images(scorer, images: Sequence[ImageRef]):
    """The scorer's image embeddings of all images, decoding a chunk at a time."""
    import torch

    parts = [scorer.embed_images([load_image(im) for im in images[s : s + _IMAGE_CHUNK]])
             for s in range(0, len(images), _IMAGE_CHUNK)]
    return torch.cat(parts)


def clip_scores(scorer, image_embeddings, texts: Sequence[str | list[str]]) -> tuple[list[float], float]:
    """(CLIPScore of ``texts[i]`` against image ``i``, for each ``i``; the fraction of texts cut to the scorer's
    context). Images are embedded once for every condition; an entry holding several texts (references) scores
    the mean of its texts' CLIPScores."""
    import torch

    from .clip_score import score_embeddings

    groups = [[t] if isinstance(t, str) else list(t) for t in texts]
    owner = torch.tensor([i for i, group in enumerate(groups) for _ in group], dtype=torch.long)
    result = score_embeddings(image_embeddings[owner], *scorer.embed_texts([t for group in groups for t in group]))
    sums = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, owner, result.clip_score.double())
    return (sums / torch.bincount(owner, minlength=len(groups))).tolist(), result.truncation_rate


# ---------------------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------------------


def evaluate(model, data, *, conditions: str | Sequence[str] | None = None, seed: int = 0,
             output_dir: str | Path | None = None, **options: Any) -> EvalResult:
    """Run the evaluation protocol and write its outputs (see the module docstring).

    ``model``: an export folder, a Hub id or a loaded :class:`~altogether.recaptioner.Recaptioner`. ``data``: a
    data file / shard pattern, an installed evaluation set's name (``"demo"``) or an :class:`EvalSet`.
    ``options``: the other :class:`EvalConfig` keys (``target_key="round2"``, ``max_new_tokens=64``,
    ``clip_model=...``, ``data_options={"eval_scenes": 50}`` for a named set).
    """
    if conditions is not None and not isinstance(conditions, str):
        conditions = list(conditions)
    cfg = eval_config({**options, "seed": seed, "conditions": conditions,
                       "output_dir": None if output_dir is None else str(output_dir)})
    return run_evaluation(model, data if isinstance(data, EvalSet) else str(data), cfg)


def run_evaluation(model, data: str | EvalSet, cfg: EvalConfig) -> EvalResult:
    """:func:`evaluate` with a ready :class:`EvalConfig`."""
    started = time.perf_counter()
    if cfg.run_dir is not None and not Path(cfg.run_dir).is_dir():
        raise FileNotFoundError(f"key 'run_dir': not a directory: {cfg.run_dir}")
    eval_set = _eval_set(data, cfg)  # bad data or conditions fail before the model loads
    names = condition_names(cfg.conditions, (*CONDITIONS, *eval_set.conditions))
    captioner, model_id = _load_captioner(model, cfg)
    _check_records(eval_set)

    records = eval_set.records
    images = [r.image for r in records]
    alt_texts = [_alt_prompt(r, captioner.layout.alt_separator) for r in records]
    prompts = _condition_prompts(eval_set, alt_texts, names, cfg.seed)
    overrides = generation_overrides(cfg)
    generation = captioner.settings(overrides)  # checked against the model before any caption
    captions = {c: captioner.recaption(images, prompts[c], batch_size=cfg.batch_size, progress=cfg.progress and c,
                                       **overrides) for c in names}
    texts = {**captions, **({ALT_TEXT_ROW: alt_texts} if cfg.alt_text_row else {})}
    scores = score_rows(texts, [_references(r.target) for r in records], images, captioner, cfg)
    set_scores = None if eval_set.score is None else {c: eval_set.score(captions[c], prompts[c]) for c in names}

    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(model_id, eval_set.id)
    files = {"captions": atomic_write_text(out_dir / "captions.jsonl",
                                           _captions_jsonl(records, alt_texts, prompts, captions, scores.per_example))}
    run_dir, plot_path, plot_skip = _training_curves(captioner.directory, cfg.run_dir, out_dir)
    if plot_path is not None:
        files["training_curves"] = plot_path
    elif plot_skip:
        scores.skipped["training curves"] = plot_skip
    summary = {
        "format": "altogether-eval",
        "version": 1,
        "model": _model_info(model_id, captioner),
        "data": _data_info(eval_set, cfg),
        "seed": cfg.seed,
        "conditions": names,
        "generation": generation.to_dict(),
        "metrics": {c: scores.rows[c] for c in names},
        "baselines": {r: v for r, v in scores.rows.items() if r not in names},
        "set_scores": set_scores,
        "clip_score": scores.clip,
        "tokenizer": scores.tokenizer,
        "skipped": scores.skipped,
        "notes": scores.notes,
        "run_dir": str(run_dir.resolve()) if run_dir else None,
        "versions": library_versions(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    table = format_table(scores.rows, scores.skipped)
    if set_scores is not None:
        table += f"\n{eval_set.id} scores (fractions):\n\n" + (eval_set.score_table or format_table)(set_scores)
    files["report"] = _write_report(out_dir / "report.html", summary, scores, eval_set, alt_texts, prompts, captions,
                                    cfg.num_examples, plot_path)
    files["metrics"] = atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return EvalResult(summary=summary, table=table, output_dir=out_dir, files=files)


@dataclass
class Scores:
    """Metric rows (``{row: {metric: value or None}}``), per-example CLIPScores, and what was skipped and why."""

    rows: dict[str, dict[str, float | None]]
    per_example: dict[str, list[float]]
    skipped: dict[str, str]
    notes: list[str]
    tokenizer: str
    clip: dict[str, Any]


def score_rows(texts: dict[str, list[str]], references: Sequence[str | list[str]], images: Sequence[ImageRef],
               captioner, cfg: EvalConfig) -> Scores:
    """Caption metrics of every row of ``texts`` against ``references`` (each a string, or a list of strings scored
    together, pycocoevalcap's protocol for several references), then CLIPScore of every row and of the
    references themselves (the ``reference`` row: the mean over an image's references); a metric that cannot run
    is None with its reason."""
    from .metrics import score_caption_rows

    scores = Scores(rows={}, per_example={}, skipped={}, notes=[CIDER_NOTE], tokenizer="", clip={})
    log.info("scoring %s", ", ".join(texts))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = score_caption_rows(texts, references, spacy_pipeline=cfg.spacy_pipeline)
    for message in (str(w.message) for w in caught):
        if message not in scores.notes:  # each warning once
            log.warning("%s", message)
            scores.notes.append(message)
    for row, result in results.items():
        scores.rows[row] = dict(result.scores)
        scores.tokenizer = result.tokenizer
        for metric, reason in result.skipped.items():
            scores.skipped.setdefault(metric, reason)

    scorer, scores.clip = clip_scorer_for(captioner, cfg)
    clip_rows = {**texts, REFERENCE_ROW: references}
    if scorer is None:
        for row in clip_rows:
            scores.rows.setdefault(row, {}).update({CLIPSCORE_KEY: None, TRUNCATION_KEY: None})
        scores.skipped[CLIPSCORE_KEY] = scores.skipped[TRUNCATION_KEY] = scores.clip["reason"]
        return scores
    image_embeddings = embed_images(scorer, images)
    for row, row_texts in clip_rows.items():
        per_image, truncation_rate = clip_scores(scorer, image_embeddings, row_texts)
        scores.rows.setdefault(row, {}).update({CLIPSCORE_KEY: sum(per_image) / len(per_image),
                                                TRUNCATION_KEY: 100.0 * truncation_rate})
        scores.per_example[row] = per_image
    return scores


def _load_captioner(model, cfg: EvalConfig):
    from .recaptioner import Recaptioner

    if isinstance(model, Recaptioner):
        captioner, model_id = model, str(model.directory)
    else:
        captioner, model_id = Recaptioner.from_pretrained(model, device=cfg.device, dtype=cfg.dtype), str(model)
    log.info("model %s loaded: %s", model_id, captioner)
    return captioner, model_id


def _eval_set(data: str | EvalSet, cfg: EvalConfig) -> EvalSet:
    """``data`` as an :class:`EvalSet`: as given, built by the named plug-in, or read from its file(s)."""
    if isinstance(data, EvalSet):
        given_set = data
    elif data in eval_set_names():
        given_set = named_eval_set(data, cfg)
    else:
        if cfg.data_options:
            raise ConfigError(f"keys {sorted(cfg.data_options)}: settings of a named evaluation set, but DATA "
                              f"{data!r} is a file (evaluation sets: {', '.join(eval_set_names()) or 'none'})")
        kind = data_format(data, cfg)
        condition_names(cfg.conditions, CONDITIONS)  # a bad condition fails before the records are read
        return read_records(data, kind, cfg)
    for name, texts in given_set.conditions.items():
        if name in CONDITIONS or len(texts) != len(given_set.records):
            raise ValueError(f"evaluation set {given_set.id!r}: condition {name!r} must be new and hold one prompt "
                             f"per record ({len(given_set.records)}), got {len(texts)}")
    return given_set


def _check_records(eval_set: EvalSet) -> None:
    if eval_set.skipped:
        shown = "; ".join(f"{s['key']}: {s['reason']}" for s in eval_set.skipped[:3])
        log.warning("%s: skipped %d of %d records (%s%s)", eval_set.id, len(eval_set.skipped), eval_set.read, shown,
                    "; ..." if len(eval_set.skipped) > 3 else "")
    if not eval_set.records:
        first = eval_set.skipped[0]["reason"] if eval_set.skipped else "it holds no records"
        raise ValueError(f"DATA {eval_set.id!r}: no usable records ({len(eval_set.skipped)} skipped; first: {first})")
    log.info("%s: %d records to evaluate", eval_set.id, len(eval_set.records))


def _alt_prompt(record: Record, separator: str) -> str:
    from .layout import build_prompt

    return build_prompt(record.alt_texts, separator)


def _condition_prompts(eval_set: EvalSet, alt_texts: list[str], names: list[str], seed: int) -> dict[str, list[str]]:
    """Each condition's prompts: the standard ones built from the alt-texts, the set's own as it gives them."""
    built = {**build_conditions(alt_texts, seed, [n for n in names if n in CONDITIONS]), **eval_set.conditions}
    return {name: built[name] for name in names}


def default_output_dir(model_id: str, data: str) -> Path:
    """``eval/<model>__<data>``: the export's run name (or Hub id) and the data file's stem."""
    data_name = Path(data).name.split(".")[0]
    return Path("eval") / f"{_slug(model_name(model_id))}__{_slug(data_name)}"


def model_name(model_id: str) -> str:
    """A short name: RUN for a local ``RUN/export`` folder, the folder name of another, the Hub id as given."""
    path = Path(model_id).resolve()
    if not path.exists():
        return model_id
    return path.parent.name if path.name == "export" else path.name


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text.replace("/", "--")).strip("_") or "x"


def _training_curves(export_dir: Path, run_dir: str | None,
                     out_dir: Path) -> tuple[Path | None, Path | None, str | None]:
    """(run directory, plot path, reason it was not plotted) for the export's training run, if known."""
    from .plot import plot_run

    if run_dir is None:
        parent = Path(export_dir).parent
        if Path(export_dir).name != "export" or not (parent / "logs").is_dir():
            return None, None, None  # not the export of a local run: nothing to plot, nothing skipped
        run = parent
    else:
        run = Path(run_dir)
    try:
        return run, plot_run(run, out_dir / "training_curves.png"), None
    except (FileNotFoundError, ValueError) as err:
        log.warning("training curves not plotted: %s", err)
        return run, None, str(err)


def _model_info(model_id: str, captioner) -> dict[str, Any]:
    meta = captioner.meta
    return {"id": model_id, "path": str(Path(captioner.directory).resolve()),
            "recipe": (meta.get("recipe") or {}).get("recipe"), "encoder": meta["model"]["encoder"],
            "encoder_source": meta.get("encoder_source"), "training": meta.get("training"), "device": str(captioner.device), "dtype": str(captioner.dtype)}


def _data_info(eval_set: EvalSet, cfg: EvalConfig) -> dict[str, Any]:
    info: dict[str, Any] = {"id": eval_set.id, "format": eval_set.kind, "read": eval_set.read,
                            "evaluated": len(eval_set.records), "skipped": len(eval_set.skipped),
                            "skipped_examples": eval_set.skipped[:20], "limit": cfg.limit}
    info.update(eval_set.info or {"target_key": cfg.target_key, "alt_key": cfg.alt_key, "image_key": cfg.image_key})
    return info


def library_versions() -> dict[str, str | None]:
    """Versions of Python, the libraries behind the numbers, and Java (PTB tokenizer and METEOR)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("altogether", "torch", "transformers", "open_clip_torch", "pycocoevalcap", "tokenizers",
                    "peft", "spacy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    import torch

    versions["cuda"] = torch.version.cuda  # the build's CUDA (None on CPU builds): bf16 numbers differ on GPU
    versions["java"] = _java_version()
    return versions


def _java_version() -> str | None:
    java = shutil.which("java")
    if java is None:
        return None
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[0] if lines else None


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------


def format_table(rows: dict[str, dict[str, float | None]], skipped: dict[str, str] | None = None) -> str:
    """A Markdown table, one row per condition / baseline, metrics in the paper's order; ``n/a`` for None,
    followed by one line per skipped metric with its reason."""
    columns = ordered_columns(rows)
    lines = ["| condition | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row, values in rows.items():
        cells = ["n/a" if values.get(c) is None else f"{values[c]:.2f}" for c in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    reasons = skipped_by_reason(skipped or {})
    if reasons:
        lines += [""] + [f"- skipped {names}: {reason}" for names, reason in reasons.items()]
    return "\n".join(lines) + "\n"


def ordered_columns(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The metrics present in ``rows``: the paper's Table 1 order first, then the others in first-seen order."""
    present = list(dict.fromkeys(k for values in rows.values() for k in values))
    return [c for c in TABLE_COLUMNS if c in present] + [c for c in present if c not in TABLE_COLUMNS]


def skipped_by_reason(skipped: dict[str, str]) -> dict[str, str]:
    """``{"NP-P, NP-R, NP-F1": reason}``: skipped things that share a reason, named together."""
    grouped: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        grouped.setdefault(reason, []).append(name)
    return {", ".join(names): reason for reason, names in grouped.items()}


def _captions_jsonl(records, alt_texts, prompts, captions, clip) -> str:
    lines = []
    for i, record in enumerate(records):
        row = {"key": record.key, "alt_text": alt_texts[i], "reference": record.target,
               "prompts": {c: prompts[c][i] for c in captions}, "captions": {c: captions[c][i] for c in captions},
               "clip_score": {r: scores[i] for r, scores in clip.items()}}
        lines.append(json.dumps(row, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def _write_report(path: Path, summary: dict[str, Any], scores: Scores, eval_set: EvalSet, alt_texts, prompts,
                  captions, num_examples: int, plot_path: Path | None) -> Path:
    from .report import Example, write_report

    table = {row: dict(values) for row, values in scores.rows.items()}
    for condition, values in (summary["set_scores"] or {}).items():
        table[condition].update({f"{eval_set.id} {k.replace('_', ' ')} (%)": None if v is None else 100.0 * v
                                 for k, v in values.items()})
    columns = ordered_columns(table)  # the report's columns follow the first row's key order
    table = {row: {c: values.get(c) for c in columns} for row, values in table.items()}
    examples = []
    for i, record in enumerate(eval_set.records[:num_examples]):
        # Prompts other than the record's own alt-text (random / wrong-colour alt) are shown under the image.
        extra = {f"prompt {c}": prompts[c][i] for c in captions if prompts[c][i] not in ("", alt_texts[i])}
        extra.update({f"CLIPScore {row}": f"{values[i]:.1f}" for row, values in scores.per_example.items()})
        first, *others = _references(record.target)
        if others:  # the diff is against the first reference; the others are listed
            extra["other references"] = " | ".join(others)
        examples.append(Example(alt_text=alt_texts[i], reference=first, image=load_image(record.image),
                                captions={c: captions[c][i] for c in captions}, id=record.key, extra=extra))
    clip = summary["clip_score"]
    meta = {"model": summary["model"]["id"], "data": f"{eval_set.id} ({len(eval_set.records)} records evaluated, "
            f"{len(eval_set.skipped)} skipped)", "seed": summary["seed"], "generation": summary["generation"],
            "CLIPScore model": " ".join(str(clip[k]) for k in ("model", "pretrained") if clip.get(k)) or "none",
            "CLIP text truncation": clip.get("truncation") or clip.get("reason"),
            "caption tokenizer": summary["tokenizer"], "training run": summary["run_dir"] or "unknown",
            **{f"skipped {names}": reason for names, reason in skipped_by_reason(summary["skipped"]).items()},
            "note": CIDER_NOTE, "versions": summary["versions"]}
    figures = {f"Training curves of {summary['run_dir']}": plot_path} if plot_path else {}
    title = f"Altogether evaluation: {model_name(summary['model']['id'])} on {Path(eval_set.id).name}"
    return write_report(path, table, examples, title=title, meta=meta, figures=figures)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    usage = USAGE.format(", ".join(eval_set_names()) or "none installed")
    if not argv or argv[0] in ("-h", "--help"):
        keys = ", ".join(f"{k}={v}" for k, v in asdict(EvalConfig()).items() if k != "data_options")
        print(f"{usage}\nkeys (defaults): {keys}; a named evaluation set's own settings: NAME.key=value")
        return 0 if argv else 2
    positional, settings = split_args(argv)
    if len(positional) != 2:
        raise ConfigError(f"expected MODEL and DATA, got {positional}; {usage}")
    own = f"{positional[1]}."  # NAME.key=value: the named set's own settings
    settings = [f"data_options.{a[len(own):]}" if a.startswith(own) else a for a in settings]
    cfg = eval_config(settings)
    result = run_evaluation(positional[0], positional[1], cfg)
    print(result.table, end="")
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    sys.exit(run_cli(main))
