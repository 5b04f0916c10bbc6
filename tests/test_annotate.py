"""Tests for altogether.annotate: schema, next-round / merge, vendor swap, stats, prefill, Altogether-FT."""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from PIL import Image

from altogether import annotate
from altogether.annotate import AnnotationError
from altogether.cli import run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "annotations" / "examples.jsonl"
STAMP = "2024-06-01T12:00:00Z"


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _round(number: int, caption: str, vendor: str = "A") -> dict:
    return {"round": number, "caption": caption, "annotator": f"{vendor}-1", "vendor": vendor, "timestamp": STAMP}


def _levenshtein(a: str, b: str) -> int:
    """Textbook dynamic programme, independent of rapidfuzz."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _complete(task: dict, suffix: str = " Edited.", annotator: str = "ann-7") -> dict:
    vendor = task["vendor"] or "V"
    return {**task, "caption": task["caption"] + suffix, "annotator": annotator, "vendor": vendor, "timestamp": STAMP}


# ------------------------------------------------------------------------------------------ schema


def test_schema_is_valid_draft_2020_12_and_examples_validate():
    Draft202012Validator.check_schema(annotate.load_schema())
    records = annotate.read_records(EXAMPLES)
    assert len(records) >= 4
    assert all(annotate.schema_errors(record) == [] for record in records)
    # The examples cover both image references, list alt-texts, a record with no rounds yet and metadata.
    assert any("url" in r and "img_path" not in r for r in records)
    assert any("img_path" in r and "url" not in r for r in records)
    assert any(isinstance(r["alt"], list) for r in records)
    assert any(r["rounds"] == [] for r in records)


GOOD = {"id": "r1", "url": "https://example.org/a.jpg", "alt": "a cat", "rounds": [_round(2, "A photo of a cat.")]}


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r.pop("alt"), "alt: required field is missing"),
        (lambda r: r.pop("url"), "record: needs 'url' or 'img_path'"),
        (lambda r: r.update(colour="red"), "colour: unknown field"),
        (lambda r: r.update(alt=[]), "alt: [] is not a string, or a non-empty list of strings"),
        (lambda r: r.update(alt=7), "alt: 7 is not"),
        (lambda r: r["rounds"][0].pop("vendor"), "rounds[0].vendor: required field is missing"),
        (lambda r: r["rounds"][0].update(caption=""), "rounds[0].caption"),
        (
            lambda r: r["rounds"][0].update(timestamp="2024-13-01T10:00:00Z"),
            "rounds[0].timestamp: '2024-13-01T10:00:00Z' is not an ISO 8601",
        ),
        (lambda r: r["rounds"][0].update(timestamp="2024-06-01T10:00:00"), "rounds[0].timestamp"),  # no UTC offset
        (lambda r: r["rounds"][0].update(timestamp="yesterday"), "rounds[0].timestamp"),
        (lambda r: r["rounds"][0].update(round=1), "rounds[0].round: 1 is less than the minimum of 2"),
        (lambda r: r["rounds"][0].update(round=3), "rounds[0].round: expected 2"),
        (lambda r: r["rounds"].append(_round(2, "again")), "rounds[1].round: expected 3"),
        (lambda r: r["rounds"][0].update(round="2"), "rounds[0].round: '2' is not of type 'integer'"),
    ],
)
def test_bad_record_error_names_the_field(mutate, expected):
    record = copy.deepcopy(GOOD)
    mutate(record)
    problems = annotate.schema_errors(record)
    assert any(expected in p for p in problems), problems
    with pytest.raises(AnnotationError, match=r"record 'r1'"):
        annotate.validate_record(record)


def test_good_record_variants_validate():
    for variant in (
        {**GOOD, "rounds": []},
        {**GOOD, "alt": ["one", "two"]},
        {**GOOD, "img_path": "a.jpg"},
        {**GOOD, "rounds": [_round(2, "x"), {**_round(3, "y"), "timestamp": "2024-06-01T12:00:00.25+05:30"}]},
        {**GOOD, "rounds": [{**_round(2, "x"), "draft_source": "model:m"}]},
    ):
        assert annotate.schema_errors(variant) == []


def test_read_records_names_file_line_id_and_field(tmp_path):
    bad = copy.deepcopy(GOOD)
    bad["rounds"][0]["timestamp"] = "soon"
    path = _write_jsonl(tmp_path / "r.jsonl", [{**GOOD, "id": "ok"}, bad])
    with pytest.raises(AnnotationError, match=r"r\.jsonl:2: record 'r1': rounds\[0\]\.timestamp"):
        annotate.read_records(path)


def test_unreadable_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"id": "x", \n', encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"broken\.jsonl:3: not valid JSON"):
        annotate.read_records(path)
    assert run_cli(annotate.main, ["stats", str(path)]) == 2


def test_duplicate_ids_are_rejected(tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", [GOOD, GOOD])
    with pytest.raises(AnnotationError, match=r"r\.jsonl:2: record 'r1': id: duplicate of line 1"):
        annotate.read_records(path)


# ------------------------------------------------------------------------------------------ next-round / merge


def test_next_round_prefills_previous_caption(tmp_path):
    records = annotate.read_records(EXAMPLES)
    tasks = annotate.make_tasks(records)
    for record, task in zip(records, tasks):
        assert task["id"] == record["id"]
        assert task["round"] == len(record["rounds"]) + 2
        expected = record["rounds"][-1]["caption"] if record["rounds"] else annotate.alt_as_text(record["alt"])
        assert task["caption"] == task["previous_caption"] == expected  # t' <- t
        assert task["annotator"] is None and task["timestamp"] is None and task["vendor"] is None
        assert task["draft_source"] == "previous_round"
        assert annotate.schema_errors(task, kind="task") == []
    list_alt = {"id": "m", "img_path": "m.jpg", "alt": ["first alt", "second alt"], "rounds": []}
    assert annotate.make_tasks([list_alt])[0]["caption"] == "first alt\nsecond alt"


def test_next_round_merge_round_trip_through_cli(tmp_path, capsys):
    records_path = tmp_path / "records.jsonl"
    records_path.write_text(EXAMPLES.read_text(encoding="utf-8"), encoding="utf-8")
    before = annotate.read_records(records_path)
    tasks_path = tmp_path / "tasks.jsonl"
    assert annotate.main(["next-round", str(records_path), str(tasks_path), "vendors=A,B", "swap=true"]) == 0
    tasks = _read_jsonl(tasks_path)
    assert [t["id"] for t in tasks] == [r["id"] for r in before]
    done = [_complete(task, suffix=f" Detail {i}.") for i, task in enumerate(tasks)]
    done[0]["caption"] = done[0]["previous_caption"]  # an annotator may leave a caption as it is
    _write_jsonl(tasks_path, done)
    assert annotate.main(["merge", str(records_path), str(tasks_path), str(records_path)]) == 0  # in place
    assert "merged=5" in capsys.readouterr().out
    after = annotate.read_records(records_path)
    for old, new, task in zip(before, after, done):
        assert new["rounds"][:-1] == old["rounds"]
        assert new["rounds"][-1] == {
            "round": len(old["rounds"]) + 2,
            "caption": task["caption"],
            "annotator": "ann-7",
            "vendor": task["vendor"],
            "timestamp": STAMP,
            "draft_source": "previous_round",
        }
        assert {k: v for k, v in new.items() if k != "rounds"} == {k: v for k, v in old.items() if k != "rounds"}
    _, summary = annotate.merge_tasks(before, [("t", t) for t in done])
    assert (summary.merged, summary.unchanged_captions, summary.records_without_task) == (5, 1, 0)


@pytest.mark.parametrize(
    ("break_task", "expected"),
    [
        (lambda t: t.update(id="nope"), "task 'nope': id: no record with this id"),
        (lambda t: t.update(round=t["round"] + 1), "round: the record has rounds up to"),
        (lambda t: t.update(timestamp="13/05/2024"), "timestamp: '13/05/2024' is not an ISO 8601"),
        (lambda t: t.update(annotator=None), "annotator: not filled in yet"),
        (lambda t: t.update(caption="  "), "caption: empty"),
        (lambda t: t.pop("previous_caption"), "previous_caption: required field is missing"),
    ],
)
def test_merge_error_names_task_and_field_and_leaves_out_untouched(tmp_path, capsys, break_task, expected):
    records_path = _write_jsonl(tmp_path / "records.jsonl", annotate.read_records(EXAMPLES))
    tasks = [_complete(t) for t in annotate.make_tasks(annotate.read_records(records_path))]
    break_task(tasks[2])
    tasks_path = _write_jsonl(tmp_path / "tasks.jsonl", tasks)
    out = tmp_path / "out.jsonl"
    out.write_text("sentinel\n", encoding="utf-8")
    assert run_cli(annotate.main, ["merge", str(records_path), str(tasks_path), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "tasks.jsonl:3" in err and expected in err
    assert out.read_text(encoding="utf-8") == "sentinel\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "records.jsonl", "tasks.jsonl"]  # no temp files


def test_merge_skip_incomplete_and_duplicate_tasks():
    records = annotate.read_records(EXAMPLES)
    tasks = annotate.make_tasks(records)
    done = [_complete(tasks[0]), tasks[1], _complete(tasks[2])]  # tasks[1] untouched by the annotator
    with pytest.raises(AnnotationError, match="annotator: not filled in yet"):
        annotate.merge_tasks(records, [("f:1", t) for t in done])
    merged, summary = annotate.merge_tasks(records, [("f:1", t) for t in done], skip_incomplete=True)
    assert (summary.merged, summary.skipped_incomplete, summary.records_without_task) == (2, 1, 3)
    assert merged[1] == records[1] and len(merged[0]["rounds"]) == len(records[0]["rounds"]) + 1
    with pytest.raises(AnnotationError, match=r"f:2: task 'ex-0001': id: a second task for this record \(first at f:1\)"):
        annotate.merge_tasks(records, [("f:1", done[0]), ("f:2", done[0])])


def test_merge_accepts_several_task_files(tmp_path):
    records_path = _write_jsonl(tmp_path / "records.jsonl", annotate.read_records(EXAMPLES))
    pattern = str(tmp_path / "tasks_{vendor}.jsonl")
    assert annotate.main(["next-round", str(records_path), pattern, "vendors=A,B", "seed=3"]) == 0
    files = sorted(tmp_path.glob("tasks_*.jsonl"))
    assert [f.name for f in files] == ["tasks_A.jsonl", "tasks_B.jsonl"]
    for f in files:
        assert {t["vendor"] for t in _read_jsonl(f)} == {f.stem.split("_")[1]}
        _write_jsonl(f, [_complete(t) for t in _read_jsonl(f)])
    out = tmp_path / "out.jsonl"
    assert annotate.main(["merge", str(records_path), *map(str, files), str(out)]) == 0
    before, after = annotate.read_records(records_path), annotate.read_records(out)
    assert all(len(new["rounds"]) == len(old["rounds"]) + 1 for old, new in zip(before, after))


# ------------------------------------------------------------------------------------------ vendors


def test_vendor_swap_sends_each_record_to_the_other_vendor():
    previous = ["A", "B", "B", None, None, None, "C", "A"]
    assigned = annotate.assign_vendors(previous, ["A", "B"], swap=True, seed=0)
    assert assigned[:3] == ["B", "A", "A"] and assigned[7] == "B"
    fresh = [assigned[i] for i in (3, 4, 5, 6)]  # round-1 records and an unknown vendor: an even split
    assert sorted(fresh) == ["A", "A", "B", "B"]
    assert annotate.assign_vendors(previous, ["A", "B", "C"], swap=True)[:3] == ["B", "C", "C"]
    assert annotate.assign_vendors(["C"], ["A", "B", "C"], swap=True) == ["A"]


def test_vendor_split_is_even_and_seeded():
    previous = [None] * 101
    split = annotate.assign_vendors(previous, ["A", "B"], seed=1)
    assert abs(split.count("A") - split.count("B")) == 1
    assert split == annotate.assign_vendors(previous, ["A", "B"], seed=1)
    assert split != annotate.assign_vendors(previous, ["A", "B"], seed=2)
    # Without --swap, the previous vendor is ignored.
    assert sorted(annotate.assign_vendors(["A"] * 10, ["A", "B"], seed=0)) == ["A"] * 5 + ["B"] * 5


def test_two_rounds_alternate_vendors(tmp_path):
    """Round 2 split between vendors, round 3 swapped: every record is seen by both vendors."""
    records = [{"id": f"r{i}", "url": f"https://x/{i}.jpg", "alt": f"alt {i}", "rounds": []} for i in range(6)]
    for _ in range(2):
        tasks = [_complete(t) for t in annotate.make_tasks(records, vendors=["A", "B"], swap=True, seed=0)]
        records, _ = annotate.merge_tasks(records, [("t", t) for t in tasks])
    assert sorted(r["rounds"][0]["vendor"] for r in records) == ["A"] * 3 + ["B"] * 3
    assert all({r["rounds"][0]["vendor"], r["rounds"][1]["vendor"]} == {"A", "B"} for r in records)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["swap=true"], "swap=true needs vendors="),
        (["vendors=A", "swap=true"], "at least two vendors"),
        (["vendors=A,A"], "distinct"),
    ],
)
def test_next_round_option_errors(tmp_path, capsys, extra, expected):
    out = tmp_path / "t.jsonl"
    assert run_cli(annotate.main, ["next-round", str(EXAMPLES), str(out), *extra]) == 2
    assert expected in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------------------ stats


STATS_RECORDS = [
    {
        "id": "s1",
        "img_path": "s1.png",
        "alt": "red apple",
        "rounds": [_round(2, "A photo of a red apple on a table."), _round(3, "A photo of one red apple on a wooden table.", "B")],
    },
    {"id": "s2", "img_path": "s2.png", "alt": ["tower", "Paris 2019"], "rounds": [_round(2, "A photo of a tall iron tower.")]},
    {"id": "s3", "url": "https://x/3.jpg", "alt": "", "rounds": [_round(2, "A painting of a boat.")]},
]


def test_stats_lengths_and_edit_distances_match_hand_computation():
    stats = {row.round: row for row in annotate.round_stats(STATS_RECORDS)}
    assert sorted(stats) == [1, 2, 3]
    # Round 1: "red apple" (2 words), "tower\nParis 2019" (3), "" (0).
    assert stats[1].n == 3 and stats[1].mean_words == pytest.approx(5 / 3) and stats[1].mean_edit_distance is None
    # Round 2: 9, 7 and 5 words.
    assert stats[2].n == 3 and stats[2].mean_words == pytest.approx(21 / 3)
    expected_r2 = [
        _levenshtein("red apple", "A photo of a red apple on a table."),
        _levenshtein("tower\nParis 2019", "A photo of a tall iron tower."),
        len("A painting of a boat."),
    ]
    assert stats[2].mean_edit_distance == pytest.approx(sum(expected_r2) / 3)
    assert stats[3].n == 1 and stats[3].mean_words == 10
    round2, round3 = (entry["caption"] for entry in STATS_RECORDS[0]["rounds"])
    assert stats[3].mean_edit_distance == _levenshtein(round2, round3)
    assert _levenshtein("kitten", "sitting") == 3  # the reference DP itself


class FakeScorer:
    """Stands in for ClipScorer: score = red channel of the image + number of words of the text."""

    def __init__(self):
        self.calls = 0

    def score(self, images, texts):
        import torch

        from altogether.clip_score import ScoreResult

        self.calls += 1
        values = torch.tensor([float(im.getpixel((0, 0))[0] + len(t.split())) for im, t in zip(images, texts)])
        return ScoreResult(cosine=values / 100, clip_score=values, truncated=torch.zeros(len(values), dtype=torch.bool))


def test_stats_cli_with_clip_scores_markdown_and_json(tmp_path, capsys):
    Image.new("RGB", (8, 8), (10, 0, 0)).save(tmp_path / "s1.png")
    Image.new("RGB", (8, 8), (20, 0, 0)).save(tmp_path / "s2.png")
    records = _write_jsonl(tmp_path / "r.jsonl", STATS_RECORDS)
    scorer = FakeScorer()
    loaded = []
    argv = ["stats", str(records), "clip_model=fake-model", "clip_pretrained=tag"]
    argv += [f"image_root={tmp_path}", f"json={tmp_path / 's.json'}"]
    assert annotate.main(argv, load_scorer=lambda *a: loaded.append(a) or scorer) == 0
    assert loaded == [("fake-model", "tag", "cpu")]
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / "s.json").read_text())
    rounds = {row["round"]: row for row in payload["rounds"]}
    # s3 has no local image: CLIP means cover s1 and s2 only.
    assert rounds[1]["clip_n"] == 2 and rounds[1]["mean_clip_score"] == pytest.approx(((10 + 2) + (20 + 3)) / 2)
    assert rounds[2]["clip_n"] == 2 and rounds[2]["mean_clip_score"] == pytest.approx(((10 + 9) + (20 + 7)) / 2)
    assert rounds[3]["clip_n"] == 1 and rounds[3]["mean_clip_score"] == pytest.approx(10 + 10)
    assert rounds[2]["n"] == 3 and rounds[2]["mean_words"] == pytest.approx(21 / 3)
    assert "characters" in payload["edit_distance_unit"]
    assert "| Round 1 (alt-text) | 3 | 1.7 | - | 17.5 |" in out
    assert "| Round 3 | 1 | 10.0 | " in out and "| 20.0 |" in out


def test_stats_clip_pretrained_without_model_is_an_error(capsys):
    assert run_cli(annotate.main, ["stats", str(EXAMPLES), "clip_pretrained=x"]) == 2
    assert "clip_pretrained needs clip_model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ prefill


class FakeCaptioner:
    """Exposes the Recaptioner.recaption API and records its calls."""

    def __init__(self):
        self.calls = []

    def recaption(self, images, alt_texts):
        self.calls.append((list(images), list(alt_texts)))
        return [f"draft of {Path(image).name} from {alt!r}" for image, alt in zip(images, alt_texts)]


def _image_records(tmp_path: Path, count: int) -> list[dict]:
    records = []
    for i in range(count):
        Image.new("RGB", (4, 4), (i, i, i)).save(tmp_path / f"im{i}.png")
        rounds = [_round(2, f"caption {i}")] if i % 2 else []
        records.append({"id": f"p{i}", "img_path": f"im{i}.png", "alt": f"alt {i}" if i else "", "rounds": rounds})
    return records


def test_prefill_drafts_with_injected_captioner(tmp_path):
    records = _image_records(tmp_path, 5)
    fake = FakeCaptioner()
    tasks = annotate.prefill_tasks(records, fake, model_name="exp/r3", image_root=tmp_path, batch_size=2)
    assert [len(images) for images, _ in fake.calls] == [2, 2, 1]
    assert [alt for _, alts in fake.calls for alt in alts] == [None, "alt 1", "alt 2", "alt 3", "alt 4"]
    for i, task in enumerate(tasks):
        assert task["caption"] == f"draft of im{i}.png from {('alt ' + str(i)) if i else None!r}"
        assert task["previous_caption"] == (f"caption {i}" if i % 2 else (f"alt {i}" if i else ""))
        assert task["draft_source"] == "model:exp/r3" and task["round"] == len(records[i]["rounds"]) + 2
        assert annotate.schema_errors(task, kind="task") == []


def test_prefill_cli_and_errors(tmp_path, capsys):
    records = _image_records(tmp_path, 3)
    path = _write_jsonl(tmp_path / "r.jsonl", records)
    out = tmp_path / "drafts_{vendor}.jsonl"
    fake = FakeCaptioner()
    argv = ["prefill", "some/export", str(path), str(out), f"image_root={tmp_path}", "vendors=A,B", "swap=true"]
    assert annotate.main(argv, load_captioner=lambda model: fake if model == "some/export" else None) == 0
    written = _read_jsonl(tmp_path / "drafts_A.jsonl") + _read_jsonl(tmp_path / "drafts_B.jsonl")
    assert sorted(t["id"] for t in written) == ["p0", "p1", "p2"]
    assert all(t["caption"].startswith("draft of") for t in written)
    assert next(t for t in written if t["id"] == "p1")["vendor"] == "B"  # p1's round 2 was vendor A
    # A record whose image is not on disk: one clear line before the model is loaded, nothing written.
    (tmp_path / "im2.png").unlink()
    failing = partial(annotate.main, load_captioner=pytest.fail)
    assert run_cli(failing, [*argv[:3], str(tmp_path / "x.jsonl"), *argv[4:]]) == 2
    assert "record 'p2': img_path 'im2.png' not found" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_prefill_rejects_a_captioner_that_drops_captions(tmp_path):
    class Short(FakeCaptioner):
        def recaption(self, images, alt_texts):
            return super().recaption(images, alt_texts)[:-1]

    with pytest.raises(AnnotationError, match="returned 1 captions for 2 images"):
        annotate.prefill_tasks(_image_records(tmp_path, 2), Short(), model_name="m", image_root=tmp_path)


# ------------------------------------------------------------------------------------------ Altogether-FT


def test_altogether_ft_conversion_both_ways(tmp_path):
    ft = {
        "data": [
            {"alt": "lizard", "url": "https://x/1.jpg", "round2": "A photo of a lizard.", "round3": "A photo of a green lizard."},
            {"alt": ["a", "b"], "img_path": "2.jpg", "round2": "A photo of two letters.", "source": "WIT"},
        ]
    }
    records = annotate.records_from_ft(ft, timestamp=STAMP, vendor="V")
    assert [r["id"] for r in records] == ["ft-000000", "ft-000001"]
    assert [e["caption"] for e in records[0]["rounds"]] == ["A photo of a lizard.", "A photo of a green lizard."]
    assert records[1]["meta"] == {"source": "WIT"} and records[1]["rounds"][0]["vendor"] == "V"
    back = annotate.records_to_ft(records)
    assert back == {"data": [{"id": r["id"], **item} for r, item in zip(records, ft["data"])]}
    # Records -> FT -> records keeps ids, images, alt-texts, captions and metadata.
    examples = annotate.read_records(EXAMPLES)
    again = annotate.records_from_ft(annotate.records_to_ft(examples), timestamp=STAMP)
    for old, new in zip(examples, again):
        assert {k: v for k, v in old.items() if k != "rounds"} == {k: v for k, v in new.items() if k != "rounds"}
        assert [e["caption"] for e in old["rounds"]] == [e["caption"] for e in new["rounds"]]


def test_altogether_ft_errors(tmp_path, capsys):
    with pytest.raises(AnnotationError, match=r"data\[0\]\.round3: rounds must run round2, round3"):
        annotate.records_from_ft({"data": [{"alt": "x", "url": "u", "round3": "y"}]}, timestamp=STAMP)
    with pytest.raises(AnnotationError, match=r"data\[0\]: record 'ft-000000': record: needs 'url' or 'img_path'"):
        annotate.records_from_ft({"data": [{"alt": "x", "round2": "y"}]}, timestamp=STAMP)
    path = tmp_path / "ft.json"
    path.write_text(json.dumps([1, 2]), encoding="utf-8")
    assert run_cli(annotate.main, ["from-ft", str(path), str(tmp_path / "r.jsonl")]) == 2
    assert 'Altogether-FT layout {"data": [...]}' in capsys.readouterr().err


def test_from_ft_cli_uses_file_time_by_default(tmp_path):
    path = tmp_path / "ft.json"
    path.write_text(json.dumps({"data": [{"alt": "x", "url": "u", "round2": "A photo of x."}]}), encoding="utf-8")
    out = tmp_path / "r.jsonl"
    assert annotate.main(["from-ft", str(path), str(out), "vendor=V1"]) == 0
    (record,) = annotate.read_records(out)
    assert record["rounds"][0]["vendor"] == "V1" and record["rounds"][0]["timestamp"].endswith("+00:00")


def test_stats_with_a_real_tiny_open_clip_model(tiny_dirs, tmp_path, capsys):
    """End to end through the default loader: `--clip-model local-dir:...` and altogether.clip_score.ClipScorer."""
    from altogether.clip_score import ClipScorer

    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "s1.png")
    Image.new("RGB", (40, 30), (20, 20, 200)).save(tmp_path / "s2.png")
    records = _write_jsonl(tmp_path / "r.jsonl", STATS_RECORDS)
    model = f"local-dir:{tiny_dirs[0]}"
    argv = ["stats", str(records), f"clip_model={model}", f"image_root={tmp_path}", f"json={tmp_path / 's.json'}"]
    assert annotate.main(argv) == 0  # the default loader: ClipScorer.from_open_clip
    rounds = {row["round"]: row for row in json.loads((tmp_path / "s.json").read_text())["rounds"]}
    scorer = ClipScorer.from_open_clip(model)
    images = [Image.open(tmp_path / "s1.png").convert("RGB"), Image.open(tmp_path / "s2.png").convert("RGB")]
    round2 = [record["rounds"][0]["caption"] for record in STATS_RECORDS[:2]]
    for number, texts in ((1, ["red apple", "tower\nParis 2019"]), (2, round2)):
        expected = scorer.score(images, texts).clip_score.mean().item()
        assert rounds[number]["clip_n"] == 2 and rounds[number]["mean_clip_score"] == pytest.approx(expected, abs=1e-4)
    assert "CLIPScore (100 * max(cos, 0)) for 2 of 3 record(s)" in capsys.readouterr().out


def test_from_ft_non_utf8_file_is_one_line_naming_it(tmp_path, capsys):
    path = tmp_path / "ft.json"
    path.write_bytes(b'{"data": [\n {"alt": "caf\xe9", "url": "u", "round2": "x"}]}')  # Latin-1, as some exports are
    out = tmp_path / "r.jsonl"
    assert run_cli(annotate.main, ["from-ft", str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}:2: not UTF-8 text (byte 0xe9 at column 14)\n" and not out.exists()


def test_next_round_vendor_files_all_or_nothing(tmp_path, capsys):
    """One vendor's file cannot be written: no vendor's file appears (was: A's file written, then a traceback)."""
    records_path = _write_jsonl(tmp_path / "records.jsonl", annotate.read_records(EXAMPLES))
    (tmp_path / "round2_B.jsonl").mkdir()  # B's target is taken by a folder
    argv = ["next-round", str(records_path), str(tmp_path / "round2_{vendor}.jsonl"), "vendors=A,B"]
    assert run_cli(annotate.main, argv) == 2
    assert "round2_B.jsonl: is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl", "round2_B.jsonl"]  # no A, no temporaries


def test_next_round_write_failure_leaves_no_vendor_file(tmp_path, monkeypatch):
    """The disk fills while the second vendor's file is flushed: neither file is renamed into place."""
    from altogether import io as altogether_io

    records_path = _write_jsonl(tmp_path / "records.jsonl", annotate.read_records(EXAMPLES))
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 1:  # the last file opened is flushed first
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(altogether_io.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        annotate.main(["next-round", str(records_path), str(tmp_path / "r2_{vendor}.jsonl"), "vendors=A,B"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]


def test_flags_are_refused_with_the_key_value_form(tmp_path, capsys):
    argv = ["next-round", str(EXAMPLES), str(tmp_path / "t.jsonl"), "--vendors", "A,B"]
    assert run_cli(annotate.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "settings are key=value, not flags (--vendors: write vendors=...;" in err
    assert run_cli(annotate.main, ["next-round", str(EXAMPLES), str(tmp_path / "t.jsonl"), "vendor=A"]) == 2
    assert "key 'vendor'" in capsys.readouterr().err and not (tmp_path / "t.jsonl").exists()
