"""altogether.annotate streams: the Altogether-FT text written item by item, all-or-nothing writes found late."""

from __future__ import annotations

import json
from pathlib import Path

from altogether import annotate
from altogether.cli import run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "annotations" / "examples.jsonl"
STAMP = "2024-06-01T12:00:00Z"


def test_to_ft_streamed_text_is_the_json_document(tmp_path):
    records = annotate.read_records(EXAMPLES)
    records.append({"id": "café-1", "url": "http://x/東京.jpg", "alt": ["Café\nau lait", "東京"], "rounds": [],
                    "meta": {"nested": {"a": [1, 2]}}})
    for name, chosen in (("all", records), ("none", [])):
        out = tmp_path / f"{name}.json"
        assert annotate.write_ft(out, iter(chosen)) == len(chosen)
        expected = json.dumps(annotate.records_to_ft(chosen), ensure_ascii=False, indent=1) + "\n"
        assert out.read_text(encoding="utf-8") == expected
    back = annotate.records_from_ft(json.loads((tmp_path / "all.json").read_text()), timestamp=STAMP)
    assert [record["id"] for record in back] == [record["id"] for record in records]


def test_merge_into_the_records_file_with_a_problem_in_the_last_task_leaves_it_as_it_was(tmp_path, capsys):
    records_path = tmp_path / "records.jsonl"
    records_path.write_text(EXAMPLES.read_text(encoding="utf-8"), encoding="utf-8")
    before = records_path.read_bytes()
    tasks = [{**task, "caption": task["caption"] + " Edited.", "annotator": "ann-7", "vendor": task["vendor"] or "V",
              "timestamp": STAMP} for task in annotate.make_tasks(annotate.read_records(records_path))]
    tasks[-1]["timestamp"] = "13/05/2024"
    tasks_path = tmp_path / "tasks.jsonl"
    tasks_path.write_text("".join(json.dumps(task) + "\n" for task in tasks), encoding="utf-8")
    argv = ["merge", str(records_path), str(tasks_path), str(records_path), "progress=false"]
    assert run_cli(annotate.main, argv) == 2
    assert f"tasks.jsonl:{len(tasks)}: task {tasks[-1]['id']!r}: timestamp" in capsys.readouterr().err
    assert records_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl", "tasks.jsonl"]  # no temporary left
    tasks[-1]["timestamp"] = STAMP
    tasks_path.write_text("".join(json.dumps(task) + "\n" for task in tasks), encoding="utf-8")
    assert annotate.main(argv) == 0
    merged = annotate.read_records(records_path)
    assert [len(r["rounds"]) for r in merged] == [len(r["rounds"]) + 1 for r in annotate.read_records(EXAMPLES)]


def test_a_task_without_a_vendor_late_in_the_stream_writes_no_vendor_file(tmp_path):
    tasks = [{"id": str(i), "vendor": vendor} for i, vendor in enumerate(["A", "B", "A", None])]
    pattern = str(tmp_path / "round2_{vendor}.jsonl")
    try:
        annotate.write_tasks(pattern, iter(tasks))
    except annotate.AnnotationError as err:
        assert "placeholder needs vendors=" in str(err)
    else:
        raise AssertionError("no error")
    assert list(tmp_path.iterdir()) == []
    assert annotate.write_tasks(pattern, iter(tasks[:3])) == [pattern.format(vendor=v) for v in "AB"]
    assert [json.loads(line)["id"] for line in Path(pattern.format(vendor="A")).read_text().splitlines()] == ["0", "2"]
