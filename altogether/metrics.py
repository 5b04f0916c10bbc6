"""Caption metrics against reference captions: pycocoevalcap n-gram metrics and noun-phrase P/R/F1.

All values are on the paper's Table 1 scale (x100): BLEU-1..4, METEOR, ROUGE-L and CIDEr (CIDEr-D as
implemented by pycocoevalcap, so a perfect caption can exceed 100) and NP-P / NP-R / NP-F1.

- BLEU is corpus-level (pycocoevalcap, closest reference length); METEOR is the corpus score of the
  METEOR 1.5 jar; ROUGE-L (beta 1.2) and the NP metrics are means over examples.
- CIDEr's IDF weights come from the references of the evaluated set itself (``log N - log df`` for an
  n-gram found in the references of ``df`` of the ``N`` examples), so CIDEr numbers are comparable only between
  runs scored on the same set. When every reference n-gram is in every example's references (always so for
  one example) every weight is 0 and any caption, perfect or not, would score 0: CIDEr is then None with the
  reason, never a 0.
- Tokenization is Stanford's PTB tokenizer (lower-cases, strips punctuation) as in the COCO caption
  evaluation. It and METEOR run Java. Without ``java`` on PATH, METEOR is skipped (None, with a
  warning) and tokenization falls back to :func:`simple_tokenize` (with a warning); numbers from the
  fallback are close to, but not the same as, PTB-tokenized ones, and ``tokenizer`` says which ran.
- Noun phrases come from spaCy noun chunks when spaCy and an English pipeline are installed (paper
  §5.2); otherwise the NP metrics are None with the reason, never 0. SPICE is not used (it downloads).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

NounPhraseExtractor = Callable[[list[str]], list[set[str]]]

BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
NP_KEYS = ("NP-P", "NP-R", "NP-F1")
METRIC_KEYS = (*BLEU_KEYS, "METEOR", "ROUGE-L", "CIDEr", *NP_KEYS)
DEFAULT_SPACY_PIPELINE = "en_core_web_sm"

# Words with inner apostrophes; everything else (punctuation) is dropped, as the COCO evaluation does.
_SIMPLE_TOKEN = re.compile(r"\w+(?:['’]\w+)*")


@dataclass
class CaptionScores:
    """Metric values (x100; None where a metric could not run), what was skipped and why, and how
    captions were tokenized ("ptb" or "simple"); ``warnings`` repeats every warning emitted."""

    scores: dict[str, float | None]
    skipped: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "ptb"
    warnings: list[str] = field(default_factory=list)


def caption_metrics(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> dict[str, float | None]:
    """Return ``{metric: value or None}``; see :func:`score_captions` for the reasons behind None."""
    return score_captions(predictions, references).scores


def score_captions(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    noun_phrases: NounPhraseExtractor | None = None,
    spacy_pipeline: str = DEFAULT_SPACY_PIPELINE,
) -> CaptionScores:
    """Score ``predictions[i]`` against ``references[i]`` (one string or a list of strings each).

    ``noun_phrases`` maps texts to sets of normalised noun phrases; by default spaCy noun chunks
    from ``spacy_pipeline`` are used when available. Skipped metrics are None, their reason is in
    ``skipped`` and a warning is emitted.
    """
    return score_caption_rows({"": predictions}, references, noun_phrases, spacy_pipeline)[""]


def score_caption_rows(
    rows: Mapping[str, Sequence[str]],
    references: Sequence[str] | Sequence[Sequence[str]],
    noun_phrases: NounPhraseExtractor | None = None,
    spacy_pipeline: str = DEFAULT_SPACY_PIPELINE,
) -> dict[str, CaptionScores]:
    """:func:`score_captions` of every row of predictions (``{row: predictions}``, each as long as ``references``)
    against the same references: ``{row: CaptionScores}``.

    Each row's scores are those :func:`score_captions` gives it alone; the work they share is done once: one PTB
    tokenizer run over every row and the references, one METEOR process (starting its JVM and loading its
    paraphrase table takes about 8 s, the scoring itself a fraction of that) and the references' noun phrases.
    Warnings are emitted once and repeated in every row's ``warnings``.
    """
    if not rows:
        raise ValueError("rows is empty: nothing to score")
    refs = _checked_references(references)
    preds = {}
    for row, predictions in rows.items():
        try:
            preds[row] = _checked_predictions(predictions, len(refs))
        except (TypeError, ValueError) as err:
            raise type(err)(f"row {row!r}: {err}" if row else str(err)) from None
    notes = CaptionScores(scores={})
    java_found = shutil.which("java") is not None
    if not java_found:
        _skip(notes, ("METEOR",), "java is not on PATH (METEOR 1.5 is a Java program); install a JRE to score it")
    tokenized, tokenized_refs = _tokenize(list(preds.values()), refs, notes, java_found)
    gts = dict(enumerate(tokenized_refs))
    results = {}
    for row, row_tokens in zip(preds, tokenized):
        result = CaptionScores(scores=dict.fromkeys(METRIC_KEYS), tokenizer=notes.tokenizer)
        result.scores.update(_ngram_scores(gts, {i: [pred] for i, pred in enumerate(row_tokens)}))
        results[row] = result
    if next(iter(results.values())).scores["CIDEr"] is None:
        _skip(notes, ("CIDEr",), f"the {len(gts)} example(s) are too few: every reference n-gram is in every "
                                 "example's references, so CIDEr-D's IDF weights are all 0 (it needs at least 2 "
                                 "examples whose references differ)")
    if java_found:
        try:
            meteor = _meteor(gts, [{i: [pred] for i, pred in enumerate(row_tokens)} for row_tokens in tokenized])
            for result, value in zip(results.values(), meteor):
                result.scores["METEOR"] = value
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            _skip(notes, ("METEOR",), f"the METEOR jar failed: {exc}")

    extractor, reason = (noun_phrases, None) if noun_phrases is not None else load_spacy_noun_phrases(spacy_pipeline)
    if extractor is None:
        _skip(notes, NP_KEYS, reason)
    else:
        reference_phrases = _reference_phrases(extractor, refs)
        for row, result in results.items():
            result.scores.update(noun_phrase_scores(extractor(preds[row]), reference_phrases))
    for result in results.values():
        result.skipped.update(notes.skipped)
        result.warnings.extend(notes.warnings)
    return results


def noun_phrase_scores(predicted: Sequence[set[str]], reference: Sequence[set[str]]) -> dict[str, float]:
    """Mean per-example noun-phrase precision, recall and F1 (x100), as in the paper's §5.2.

    True positives are the intersection of the two sets of one example. An empty predicted set has
    precision 0, an empty reference set has recall 0, and F1 is 0 when precision + recall is 0.
    """
    if len(predicted) != len(reference):
        raise ValueError(f"noun-phrase sets differ in length: {len(predicted)} predicted, {len(reference)} reference")
    if not predicted:
        raise ValueError("noun_phrase_scores needs at least one example")
    totals = [0.0, 0.0, 0.0]
    for pred, ref in zip(predicted, reference):
        hits = len(pred & ref)
        precision = hits / len(pred) if pred else 0.0
        recall = hits / len(ref) if ref else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        for k, value in enumerate((precision, recall, f1)):
            totals[k] += value
    return {key: 100.0 * total / len(predicted) for key, total in zip(NP_KEYS, totals)}


def load_spacy_noun_phrases(pipeline: str = DEFAULT_SPACY_PIPELINE) -> tuple[NounPhraseExtractor | None, str | None]:
    """Return ``(extractor, None)`` built on spaCy noun chunks, or ``(None, reason)`` if unavailable.

    A noun phrase is a ``doc.noun_chunks`` span, lower-cased, with determiners, pronouns and
    punctuation dropped ("The big dog" -> "big dog"; a chunk that is only "it" is dropped).
    """
    try:
        import spacy
    except ImportError:
        return None, (
            f"spaCy is not installed: install spacy and its English pipeline "
            f"(python -m spacy download {pipeline}) to score noun phrases"
        )
    try:
        nlp = spacy.load(pipeline)
    except OSError as exc:
        return None, f"spaCy pipeline {pipeline!r} is not installed (python -m spacy download {pipeline}): {exc}"
    if not nlp.has_pipe("parser"):
        return None, f"spaCy pipeline {pipeline!r} has no dependency parser, which noun chunks need"

    def extract(texts: list[str]) -> list[set[str]]:
        phrases = []
        for doc in nlp.pipe(texts, batch_size=64):
            found = set()
            for chunk in doc.noun_chunks:
                words = [t.lower_ for t in chunk if t.pos_ not in {"DET", "PRON", "PUNCT"}]
                if words:
                    found.add(" ".join(words))
            phrases.append(found)
        return phrases

    return extract, None


def simple_tokenize(text: str) -> str:
    """Fallback tokenizer: lower-cased runs of word characters (apostrophes kept inside words).

    Punctuation is dropped as the COCO PTB path does; unlike PTB, clitics stay attached
    ("don't" is one token, PTB gives "do n't").
    """
    return " ".join(_SIMPLE_TOKEN.findall(text.lower()))


def _checked_references(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, ref_list in enumerate(refs):
        if not ref_list:
            raise ValueError(f"references[{i}] is an empty list: each prediction needs a reference")
        if not all(isinstance(r, str) for r in ref_list):
            raise TypeError(f"references[{i}] must be a string or a list of strings")
    return [[_one_line(r) for r in ref_list] for ref_list in refs]


def _checked_predictions(predictions: Sequence[str], count: int) -> list[str]:
    preds = list(predictions)
    if len(preds) != count:
        raise ValueError(f"predictions and references differ in length: {len(preds)} vs {count}")
    if not preds:
        raise ValueError("predictions is empty: nothing to score")
    for i, pred in enumerate(preds):
        if not isinstance(pred, str):
            raise TypeError(f"predictions[{i}] must be a string, got {type(pred).__name__}")
    return [_one_line(p) for p in preds]


def _one_line(text: str) -> str:
    # The PTB tokenizer and the METEOR protocol are line-based, and METEOR separates fields with "|||".
    return " ".join(text.replace("|||", " ").split())


def _tokenize(
    preds: list[list[str]], refs: list[list[str]], result: CaptionScores, java_found: bool
) -> tuple[list[list[str]], list[list[str]]]:
    """PTB tokenization of each list of predictions and of the references, or the simple fallback (noted in
    ``result``) when Java is missing or PTB fails."""
    if java_found:
        try:
            return _tokenize_ptb(preds, refs)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            reason = f"the PTB tokenizer failed ({exc})"
    else:
        reason = "java is not on PATH"
    result.tokenizer = "simple"
    _note(
        result,
        f"{reason}: captions are tokenized with altogether.metrics.simple_tokenize instead of the PTB "
        "tokenizer, so BLEU/ROUGE-L/CIDEr are close to but not the same as the COCO evaluation's",
    )
    return _tokenize_simple(preds, refs)


def _tokenize_ptb(preds: list[list[str]], refs: list[list[str]]) -> tuple[list[list[str]], list[list[str]]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One Java run for every list of predictions and the references together.
    captions = {("pred", k, i): [{"caption": p}] for k, row in enumerate(preds) for i, p in enumerate(row)}
    captions.update({("ref", i): [{"caption": r} for r in ref_list] for i, ref_list in enumerate(refs)})
    tokenized = PTBTokenizer().tokenize(captions)
    if len(tokenized) != len(captions):
        raise RuntimeError(f"PTB tokenizer returned {len(tokenized)} caption groups for {len(captions)} inputs")
    return ([[tokenized[("pred", k, i)][0] for i in range(len(row))] for k, row in enumerate(preds)],
            [tokenized[("ref", i)] for i in range(len(refs))])


def _tokenize_simple(preds: list[list[str]], refs: list[list[str]]) -> tuple[list[list[str]], list[list[str]]]:
    return ([[simple_tokenize(p) for p in row] for row in preds],
            [[simple_tokenize(r) for r in ref_list] for ref_list in refs])


def _ngram_scores(gts: dict[int, list[str]], res: dict[int, list[str]]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    scores = {key: 100.0 * float(value) for key, value in zip(BLEU_KEYS, bleu)}
    scores["ROUGE-L"] = 100.0 * float(rouge)
    if _cider_has_weights(gts):
        cider, _ = Cider().compute_score(gts, res)
        scores["CIDEr"] = 100.0 * float(cider)
    return scores


def _cider_has_weights(gts: dict[int, list[str]]) -> bool:
    """Whether some reference n-gram (n = 1..4, pycocoevalcap's CIDEr-D) is missing from some example's
    references, i.e. has a non-zero IDF weight ``log N - log df``; without one, CIDEr is 0 for any caption."""
    seen = [{tuple(words[i : i + n]) for ref in refs for words in [ref.split()] for n in range(1, 5)
             for i in range(len(words) - n + 1)} for refs in gts.values()]
    return bool(set().union(*seen) - set.intersection(*seen))


def _meteor(gts: dict[int, list[str]], rows: list[dict[int, list[str]]]) -> list[float]:
    """The METEOR corpus score of each of ``rows`` against ``gts``, from one METEOR process (each score is
    computed from that row's segments alone, as a process of its own would)."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        scores = [meteor.compute_score(gts, res)[0] for res in rows]
    finally:
        _close_process(meteor.meteor_p)
        # compute_score leaves its lock held when it fails; Meteor.__del__ would then block forever.
        if meteor.lock.locked():
            meteor.lock.release()
    for score in scores:
        if not math.isfinite(score):
            raise RuntimeError(f"METEOR returned a non-finite score: {score}")
    return [100.0 * float(score) for score in scores]


def _close_process(process) -> None:
    """Close a METEOR Java process now instead of whenever the wrapper is garbage-collected."""
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()
    process.kill()
    process.wait()


def _reference_phrases(extractor: NounPhraseExtractor, refs: list[list[str]]) -> list[set[str]]:
    """The union of the noun phrases of each example's references, from one extractor call."""
    flat = extractor([r for ref_list in refs for r in ref_list])
    phrases, start = [], 0
    for ref_list in refs:
        phrases.append(set().union(*flat[start : start + len(ref_list)]))
        start += len(ref_list)
    return phrases


def _skip(result: CaptionScores, metrics: Sequence[str], reason: str) -> None:
    for metric in metrics:
        result.skipped[metric] = reason
    _note(result, f"{'/'.join(metrics)} skipped: {reason}")


def _note(result: CaptionScores, message: str) -> None:
    result.warnings.append(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
