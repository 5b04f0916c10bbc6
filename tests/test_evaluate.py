"""The evaluation command end to end on a tiny export and data the test writes."""

import json

import pytest

from altogether.cli import run_cli
from altogether.evaluate import CIDER_NOTE, main
from tests.conftest import COLOURS, SHAPES, draw, save_tiny_export

QUICK = ["max_new_tokens=6", "batch_size=4", "progress=false", "num_examples=3"]


@pytest.fixture(scope="module")
def export(tiny_parts, tiny_model_cfg, tmp_path_factory):
    return save_tiny_export(tmp_path_factory.mktemp("ev") / "export", tiny_parts, tiny_model_cfg, max_new_tokens=6)


@pytest.fixture(scope="module")
def annotations(tmp_path_factory):
    """An Altogether-FT annotation file of 6 records with round2/round3 captions."""
    root = tmp_path_factory.mktemp("ft")
    data = []
    for i in range(6):
        colour, shape = list(COLOURS)[i % 4], SHAPES[i % 2]
        draw(colour, shape, seed=i).save(root / f"{i}.png")
        data.append({"alt": f"zorbit K-{i} for sale", "url": f"http://x/{i}.png", "img_path": f"{i}.png",
                     "round2": f"a {colour} {shape}", "round3": f"a photo of zorbit K-{i}: a {colour} {shape}"})
    (root / "ft.json").write_text(json.dumps({"data": data}))
    return root / "ft.json"


def test_annotation_file_end_to_end(export, annotations, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_cli(main, [str(export), str(annotations), f"output_dir={out}", "target_key=round3", *QUICK]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["conditions"] == ["w/ alt", "w/o alt", "w/ random alt"]
    for condition in summary["conditions"]:
        row = summary["metrics"][condition]
        for metric in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "CLIPScore"):
            assert row[metric] is not None and row[metric] >= 0, (condition, metric)
    assert summary["metrics"]["w/ alt"]["CLIP text truncated (%)"] == 0.0
    assert summary["seed"] == 0 and summary["model"] and summary["data"] and "torch" in summary["versions"]
    assert CIDER_NOTE in summary["notes"]
    assert summary["skipped"]["NP-F1"]  # spaCy is not installed here: reported with a reason, not a zero
    captions = [json.loads(l) for l in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 6
    html = (out / "report.html").read_text()
    assert html.count("data:image/jpeg;base64,") == 3 and "w/ random alt" in html  # num_examples=3 thumbnails
    printed = capsys.readouterr().out
    assert "| w/ alt |" in printed and "| alt-text |" in printed


def test_condition_selection_and_unavailable_clip_score(export, annotations, tmp_path):
    out = tmp_path / "eval"
    code = run_cli(main, [str(export), str(annotations), f"output_dir={out}", "conditions=w/o alt",
                          "clip_model=ViT-B-32-quickgelu", "clip_pretrained=metaclip_fullcc", "target_key=round2",
                          *QUICK])
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["conditions"] == ["w/o alt"] and list(summary["metrics"]) == ["w/o alt"]
    assert summary["metrics"]["w/o alt"]["CLIPScore"] is None
    assert "metaclip_fullcc" in summary["skipped"]["CLIPScore"]  # offline: says which weights are missing


def test_demo_data_adds_the_world_scores(export, tmp_path):
    out = tmp_path / "eval"
    assert run_cli(main, [str(export), "demo", f"output_dir={out}", "demo.eval_scenes=4", *QUICK]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert "w/ wrong-colour alt" in summary["conditions"]
    scores = summary["demo_scores"]["w/ alt"]
    assert set(scores) >= {"name_carry_over", "colour_acc", "shape_acc", "wrong_colour_copied"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in scores.values())


def test_bad_inputs_are_one_line_errors(export, tmp_path, capsys):
    assert run_cli(main, [str(export), str(tmp_path / "missing.json"), *QUICK]) == 2
    assert run_cli(main, [str(tmp_path / "no-model"), "demo", *QUICK]) == 2
    assert run_cli(main, [str(export), "demo", "conditions=w/ nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
