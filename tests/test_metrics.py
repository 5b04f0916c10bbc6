"""Caption metrics checked against values computed independently here."""

import math
import shutil
import subprocess
import sys
import types
from collections import Counter

import pytest

from altogether import metrics
from altogether.metrics import (METRIC_KEYS, caption_metrics, noun_phrase_scores, score_caption_rows, score_captions,
                                simple_tokenize)

# Lower-case and punctuation-free, so every tokenizer leaves them as they are.
PREDS = [
    "a dog runs on the green grass",
    "the red car is parked near a tree",
    "two cats sleep",
    "a man rides a bike on the road",
]
REFS = [
    ["a brown dog runs on the grass"],
    ["a red car parked under a big tree", "the red car"],
    ["two small cats sleep on a sofa"],
    ["a man rides a bike"],
]


def ngrams(words, n):
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu_by_counting(preds, refs, max_n):
    """Corpus BLEU: clipped n-gram precisions, geometric mean, closest-reference brevity penalty."""
    matched, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for pred, ref_list in zip(preds, refs):
        words, ref_words = pred.split(), [r.split() for r in ref_list]
        hyp_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = ngrams(words, n)
            best = Counter()
            for r in ref_words:
                best |= ngrams(r, n)
            matched[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            total[n - 1] += max(len(words) - n + 1, 0)
    precision = math.exp(sum(math.log(m / t) for m, t in zip(matched, total)) / max_n)
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * precision * brevity


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def rouge_l_by_lcs(preds, refs, beta=1.2):
    total = 0.0
    for pred, ref_list in zip(preds, refs):
        words = pred.split()
        precision = max(lcs(words, r.split()) / len(words) for r in ref_list)
        recall = max(lcs(words, r.split()) / len(r.split()) for r in ref_list)
        total += (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    return 100 * total / len(preds)


@pytest.fixture(scope="module")
def java_scores():
    """One scoring run with Java (PTB + METEOR), recording every process it starts."""
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH: the PTB/METEOR path cannot run here")
    started = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        started.append(process)
        return process

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", recording_popen)
        with pytest.warns(RuntimeWarning, match="NP-P/NP-R/NP-F1 skipped"):
            patch.setitem(sys.modules, "spacy", None)  # spaCy unavailable, whether installed or not
            result = score_captions(PREDS, REFS)
    return result, started


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """A PATH on which no java can be found."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("java") is None


def test_bleu_matches_counting(java_scores):
    result, _ = java_scores
    assert result.tokenizer == "ptb"
    for n in (1, 2):
        assert result.scores[f"BLEU-{n}"] == pytest.approx(bleu_by_counting(PREDS, REFS, n), rel=1e-6)


def test_bleu_brevity_penalty_applies(no_java):
    # Short hypotheses: BLEU-1 is the clipped precision (1.0) times exp(1 - r/c).
    preds, refs = ["red car", "big dog"], ["a red car on a road", "a big dog"]
    expected = 100 * math.exp(1 - 9 / 4)
    with pytest.warns(RuntimeWarning):
        scores = caption_metrics(preds, refs)
    assert scores["BLEU-1"] == pytest.approx(expected, rel=1e-6)


def test_rouge_l_matches_lcs(java_scores):
    result, _ = java_scores
    assert result.scores["ROUGE-L"] == pytest.approx(rouge_l_by_lcs(PREDS, REFS), rel=1e-9)


def test_meteor_runs_and_java_is_closed(java_scores):
    result, started = java_scores
    assert 0.0 < result.scores["METEOR"] < 100.0
    assert "METEOR" not in result.skipped
    commands = [" ".join(map(str, p.args)) for p in started]
    assert any("meteor" in c for c in commands) and any("PTBTokenizer" in c for c in commands)
    assert all(p.poll() is not None for p in started), "a java subprocess is still running"


def test_rows_scored_together_equal_each_row_alone_from_one_java_run_each(java_scores):
    alone, _ = java_scores
    other = ["a cat runs on the grass", "the blue car is near a tree", "two dogs sleep", "a man walks"]
    started = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", recording_popen)
        with pytest.warns(RuntimeWarning, match="NP-P/NP-R/NP-F1 skipped"):
            patch.setitem(sys.modules, "spacy", None)
            rows = score_caption_rows({"w/ alt": PREDS, "w/o alt": other}, REFS)
            with pytest.warns(RuntimeWarning):
                other_alone = score_captions(other, REFS)
    assert rows["w/ alt"].scores == alone.scores  # the same computation, so the same floats
    assert rows["w/o alt"].scores == other_alone.scores
    assert rows["w/ alt"].scores["METEOR"] != rows["w/o alt"].scores["METEOR"]
    commands = [" ".join(map(str, p.args)) for p in started[:-2]]  # the last two: score_captions alone
    assert sum("meteor" in c for c in commands) == 1 and sum("PTBTokenizer" in c for c in commands) == 1


def test_a_row_of_the_wrong_length_is_named(no_java):
    with pytest.raises(ValueError, match="row 'w/o alt': predictions and references differ in length: 3 vs 4"):
        score_caption_rows({"w/ alt": PREDS, "w/o alt": PREDS[:3]}, REFS)
    with pytest.raises(ValueError, match=r"^references\[1\] is an empty list"):  # the references, not a row
        score_caption_rows({"w/ alt": PREDS}, [REFS[0], [], *REFS[2:]])


def test_spacy_missing_gives_none_with_reason(java_scores):
    result, _ = java_scores
    for key in ("NP-P", "NP-R", "NP-F1"):
        assert result.scores[key] is None
        assert "spaCy is not installed" in result.skipped[key]
    assert set(result.scores) == set(METRIC_KEYS)


def test_without_java_meteor_is_none_with_warning(no_java):
    with pytest.warns(RuntimeWarning) as caught:
        result = score_captions(PREDS, REFS, noun_phrases=lambda texts: [set(t.split()) for t in texts])
    messages = [str(w.message) for w in caught]
    assert any("METEOR skipped" in m and "java" in m for m in messages)
    assert any("simple_tokenize" in m for m in messages)
    assert result.scores["METEOR"] is None and "java" in result.skipped["METEOR"]
    assert result.tokenizer == "simple"
    # The fallback tokenizer leaves these captions alone, so the counted values still hold.
    assert result.scores["BLEU-1"] == pytest.approx(bleu_by_counting(PREDS, REFS, 1), rel=1e-6)
    assert result.scores["ROUGE-L"] == pytest.approx(rouge_l_by_lcs(PREDS, REFS), rel=1e-9)


def test_cider_of_exact_copies_is_its_maximum(no_java):
    # Exact copies, no n-gram shared by every reference: every n-gram cosine is 1 -> CIDEr-D 10 (x100).
    captions = ["a brown dog runs on grass", "the red car under a tree", "two cats sleep on sofa"]
    with pytest.warns(RuntimeWarning):
        scores = caption_metrics(captions, captions)
    assert scores["CIDEr"] == pytest.approx(1000.0, rel=1e-6)
    assert scores["BLEU-4"] == pytest.approx(100.0, rel=1e-6)


@pytest.mark.parametrize("captions", [
    ["a brown dog runs on grass"],  # one example: every IDF weight is log 1 - log 1 = 0
    ["a brown dog runs on grass", "a brown dog runs on grass"],  # two examples, the same references
])
def test_cider_is_unavailable_not_zero_when_the_set_gives_it_no_weights(no_java, captions):
    with pytest.warns(RuntimeWarning, match="CIDEr skipped"):
        result = score_captions(captions, captions, noun_phrases=lambda texts: [set() for _ in texts])
    assert result.scores["CIDEr"] is None and "IDF" in result.skipped["CIDEr"]
    assert result.scores["BLEU-4"] == pytest.approx(100.0, rel=1e-6)  # the other metrics still score


def test_cider_of_two_examples_that_differ_is_a_number(no_java):
    captions = ["a brown dog runs on grass", "a brown dog runs on sand"]
    with pytest.warns(RuntimeWarning):
        result = score_captions(captions, captions, noun_phrases=lambda texts: [set() for _ in texts])
    assert "CIDEr" not in result.skipped and result.scores["CIDEr"] > 100.0


def test_noun_phrase_scores_by_hand():
    predicted = [{"brown dog", "grass"}, {"red car", "tree", "road"}, set()]
    reference = [{"brown dog", "green grass"}, {"red car", "tree"}, {"cat"}]
    scores = noun_phrase_scores(predicted, reference)
    precisions, recalls = [1 / 2, 2 / 3, 0.0], [1 / 2, 1.0, 0.0]
    f1s = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precisions, recalls)]
    assert scores["NP-P"] == pytest.approx(100 * sum(precisions) / 3)
    assert scores["NP-R"] == pytest.approx(100 * sum(recalls) / 3)
    assert scores["NP-F1"] == pytest.approx(100 * sum(f1s) / 3)


def test_injected_noun_phrases_use_union_of_references(no_java):
    def phrases(texts):
        return [set(t.split()) - {"a", "the", "on"} for t in texts]

    with pytest.warns(RuntimeWarning):
        result = score_captions(["a dog on the grass"], [["a dog", "the grass"]], noun_phrases=phrases)
    assert result.scores["NP-P"] == pytest.approx(100.0)
    assert result.scores["NP-R"] == pytest.approx(100.0)
    assert not any(key.startswith("NP") for key in result.skipped)


def _fake_spacy(parses):
    """A stand-in for the documented spaCy API: spacy.load -> nlp with has_pipe, pipe -> docs."""
    token = lambda text, pos: types.SimpleNamespace(lower_=text.lower(), pos_=pos)  # noqa: E731

    class Nlp:
        def has_pipe(self, name):
            return name == "parser"

        def pipe(self, texts, batch_size):
            for text in texts:
                chunks = [[token(*t) for t in chunk] for chunk in parses[text]]
                yield types.SimpleNamespace(noun_chunks=chunks)

    return types.SimpleNamespace(load=lambda name: Nlp())


def test_spacy_noun_chunks_are_normalised(monkeypatch):
    parses = {
        "The big Dog chased it.": [[("The", "DET"), ("big", "ADJ"), ("Dog", "NOUN")], [("it", "PRON")]],
        "A red ball": [[("A", "DET"), ("red", "ADJ"), ("ball", "NOUN")]],
    }
    monkeypatch.setitem(sys.modules, "spacy", _fake_spacy(parses))
    extract, reason = metrics.load_spacy_noun_phrases()
    assert reason is None
    assert extract(list(parses)) == [{"big dog"}, {"red ball"}]


def test_missing_spacy_pipeline_is_reported(monkeypatch):
    def load(name):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    extract, reason = metrics.load_spacy_noun_phrases("en_core_web_sm")
    assert extract is None and "en_core_web_sm" in reason and "not installed" in reason


def test_simple_tokenize():
    assert simple_tokenize("Don't STOP, the dog's ball!  Café.") == "don't stop the dog's ball café"


@pytest.mark.parametrize(
    "preds, refs, error, match",
    [
        (["a"], ["a", "b"], ValueError, "differ in length"),
        ([], [], ValueError, "empty"),
        (["a"], [[]], ValueError, r"references\[0\] is an empty list"),
        ([None], ["a"], TypeError, r"predictions\[0\]"),
        (["a"], [[1]], TypeError, r"references\[0\]"),
    ],
)
def test_bad_inputs_are_named(preds, refs, error, match):
    with pytest.raises(error, match=match):
        score_captions(preds, refs)


def test_meteor_failure_is_skipped_and_cleaned_up(monkeypatch):
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH: the METEOR jar cannot start here")
    from pycocoevalcap.meteor import meteor as meteor_module

    instances = []
    real_init = meteor_module.Meteor.__init__

    def recording_init(self):
        real_init(self)
        instances.append(self)

    def failing_stat(self, hypothesis, references):
        raise ValueError("jar answered nonsense")

    monkeypatch.setattr(meteor_module.Meteor, "__init__", recording_init)
    monkeypatch.setattr(meteor_module.Meteor, "_stat", failing_stat)
    with pytest.warns(RuntimeWarning, match="METEOR skipped: the METEOR jar failed: jar answered nonsense"):
        result = score_captions(PREDS, REFS, noun_phrases=lambda texts: [set() for _ in texts])
    assert result.scores["METEOR"] is None and result.scores["BLEU-1"] is not None
    (instance,) = instances
    assert not instance.lock.locked(), "a held lock would hang Meteor.__del__"
    assert instance.meteor_p.poll() is not None
