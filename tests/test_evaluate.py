"""The evaluation command end to end on a tiny random-weight export (captions are noise: structure and value
ranges are asserted, never quality)."""

import io
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from altogether.cli import run_cli
from altogether.conditions import CONDITIONS
from altogether.config import ConfigError
from altogether.evaluate import CIDER_NOTE, evaluate, format_table, main
from altogether.metrics import METRIC_KEYS

from .conftest import COLOURS, SHAPES, draw, save_tiny_export

CLIP_KEYS = ("CLIPScore", "CLIP text truncated (%)")
SKIPPED_IMAGE, EMPTY_TARGET = 6, 7  # record indices of the fixture's two bad records


@pytest.fixture(scope="module")
def export(tiny_parts, tiny_model_cfg, tmp_path_factory) -> Path:
    """RUN/export of the tiny captioner (sampling by default, 6 new tokens) with RUN/logs of a short run."""
    run = tmp_path_factory.mktemp("run")
    logs = run / "logs" / "version_0"
    logs.mkdir(parents=True)
    rows = "".join(f"{s},{4 - 0.2 * s},{1e-4 * (s + 1)},\n" for s in range(8)) + "7,,,3.5\n"
    (logs / "metrics.csv").write_text("step,train/loss,lr,val/loss\n" + rows)
    return save_tiny_export(run / "export", tiny_parts, tiny_model_cfg, max_new_tokens=6, do_sample=True)


@pytest.fixture(scope="module")
def ft_json(tmp_path_factory) -> Path:
    """Altogether-FT annotation JSON: 6 good records, one with a missing image, one with an empty round3."""
    root = tmp_path_factory.mktemp("ft")
    (root / "images").mkdir()
    data = []
    for i in range(8):
        colour, shape = list(COLOURS)[i % 4], SHAPES[i % 2]
        if i != SKIPPED_IMAGE:
            draw(colour, shape, seed=i).save(root / "images" / f"{i}.png")
        data.append({"alt": f"zorbit K-{i}  for sale",
                     "url": f"https://example.com/{i}.png", "img_path": f"images/{i}.png",
                     "round2": f"a {colour} {shape}",
                     "round3": "" if i == EMPTY_TARGET else f"a photo of zorbit K-{i}: a {colour} {shape} on white"})
    path = root / "ft.json"
    path.write_text(json.dumps({"data": data}))
    return path


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """No java on PATH: METEOR is skipped and captions take the simple tokenizer (fast)."""
    empty = tmp_path / "empty_path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def markdown_rows(text):
    """{row: {column: cell}} of the first Markdown table in ``text``."""
    lines = text[text.index("|"):].split("\n\n")[0].splitlines()  # the first block of table lines
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def check_range(metric, value):
    upper = 1000.0 if metric == "CIDEr" else 100.0  # CIDEr-D x100 can exceed 100
    assert 0.0 <= value <= upper and math.isfinite(value), (metric, value)


def test_end_to_end_on_annotations(export, ft_json, tmp_path, no_java, capsys):
    out = tmp_path / "eval"
    assert run_cli(main, [str(export), str(ft_json), f"output_dir={out}", "progress=false"]) == 0
    stdout = capsys.readouterr().out
    summary = json.loads((out / "metrics.json").read_text())

    assert summary["model"]["id"] == str(export) and summary["data"]["id"] == str(ft_json)
    assert summary["seed"] == 0 and summary["conditions"] == list(CONDITIONS)
    assert summary["versions"]["torch"] == torch.__version__.split("+")[0] and summary["versions"]["java"] is None
    assert {"transformers", "open_clip_torch", "pycocoevalcap", "python"} <= set(summary["versions"])
    data = summary["data"]
    assert (data["read"], data["evaluated"], data["skipped"], data["target_key"]) == (8, 6, 2, "round3")
    reasons = " | ".join(s["reason"] for s in data["skipped_examples"])
    assert "image file not found" in reasons and "round3" in reasons
    # Greedy by default even though the export samples; the export's max_new_tokens is kept.
    assert summary["generation"]["do_sample"] is False and summary["generation"]["max_new_tokens"] == 6

    skipped = summary["skipped"]
    assert "java" in skipped["METEOR"] and summary["tokenizer"] == "simple"
    assert CIDER_NOTE in summary["notes"]
    assert summary["clip_score"]["available"] and summary["clip_score"]["model"].endswith("export/encoder")
    assert summary["clip_score"]["context_length"] == 77
    rows = {**summary["metrics"], **summary["baselines"]}
    assert list(summary["metrics"]) == list(CONDITIONS) and list(summary["baselines"]) == ["alt-text", "reference"]
    for name in [*CONDITIONS, "alt-text"]:
        assert set(rows[name]) == {*METRIC_KEYS, *CLIP_KEYS}
        for metric in METRIC_KEYS:
            assert (rows[name][metric] is None) == (metric in skipped), (name, metric)
    assert set(rows["reference"]) == set(CLIP_KEYS)
    for name, values in rows.items():
        for metric, value in values.items():
            if value is not None:
                check_range(metric, value)
    # The alt-text row scores the alt-texts against the references: they share words, so BLEU-1 is positive.
    assert rows["alt-text"]["BLEU-1"] > 0

    table = markdown_rows(stdout)
    assert list(table) == [*CONDITIONS, "alt-text", "reference"]
    for name, values in rows.items():
        for metric, value in values.items():
            assert table[name][metric] == ("n/a" if value is None else f"{value:.2f}")
    assert "- skipped METEOR" in stdout

    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 6
    assert captions[0]["alt_text"] == "zorbit K-0 for sale"  # the training prompt rule collapses whitespace
    for row in captions:
        assert set(row["captions"]) == set(CONDITIONS)
        assert row["prompts"]["w/ alt"] == row["alt_text"] and row["prompts"]["w/o alt"] == ""
        assert row["prompts"]["w/ random alt"] != row["alt_text"]
        assert set(row["clip_score"]) == {*CONDITIONS, "alt-text", "reference"}

    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('src="data:image/jpeg;base64,') == 6  # one thumbnail per example
    assert html.count('src="data:image/png;base64,') == 1  # the training curves, embedded
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing to fetch: opens offline
    assert "a photo of zorbit K-1: a green circle on white" in html and "w/ random alt" in html
    assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    assert summary["run_dir"] == str(export.parent)


def test_condition_selection_is_deterministic_with_sampling(export, jsonl_data, tmp_path, no_java):
    options = dict(conditions="w/o alt,w/ random alt", seed=3, do_sample=True, temperature=1.0, limit=5,
                   clip_score=False, alt_text_row=False, progress=False)
    first = evaluate(export, jsonl_data, output_dir=tmp_path / "a", **options)
    second = evaluate(export, jsonl_data, output_dir=tmp_path / "b", **options)
    assert list(first.metrics) == ["w/o alt", "w/ random alt"] and first.summary["baselines"] == {
        "reference": {"CLIPScore": None, "CLIP text truncated (%)": None}}
    assert first.summary["data"]["evaluated"] == 5 and first.summary["data"]["format"] == "jsonl"
    assert first.summary["generation"]["do_sample"] is True and first.summary["generation"]["temperature"] == 1.0
    assert "clip_score=false" in first.summary["skipped"]["CLIPScore"]
    assert (tmp_path / "a" / "captions.jsonl").read_text() == (tmp_path / "b" / "captions.jsonl").read_text()
    assert first.metrics == second.metrics


def test_unknown_or_demo_only_condition_is_refused(export, ft_json, tmp_path):
    with pytest.raises(ConfigError, match="w/ wrong-colour alt"):
        evaluate(export, ft_json, conditions=["w/ wrong-colour alt"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="given twice"):
        evaluate(export, ft_json, conditions="w/ alt,w/ alt", output_dir=tmp_path)


@pytest.mark.parametrize("source", ["local-dir without weights", "open_clip tag, offline"])
def test_clip_score_unavailable_is_none_with_reason(export, ft_json, tmp_path, no_java, capsys, monkeypatch, source):
    if source == "local-dir without weights":
        folder = tmp_path / "clip_without_weights"
        folder.mkdir()
        (folder / "open_clip_config.json").write_text((export / "encoder" / "open_clip_config.json").read_text())
        options, named = [f"clip_model=local-dir:{folder}"], str(folder)
    else:  # offline with an empty cache: the weights cannot be downloaded
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
        options, named = ["clip_model=ViT-B-32-quickgelu", "clip_pretrained=metaclip_fullcc"], "metaclip_fullcc"
    out = tmp_path / "eval"
    argv = [str(export), str(ft_json), "conditions=w/o alt", *options, f"output_dir={out}", "progress=false"]
    assert run_cli(main, argv) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["clip_score"]["available"] is False and named in summary["clip_score"]["reason"]
    assert named in summary["skipped"]["CLIPScore"]
    for values in [*summary["metrics"].values(), *summary["baselines"].values()]:
        assert values["CLIPScore"] is None and values["CLIP text truncated (%)"] is None
    assert summary["metrics"]["w/o alt"]["BLEU-1"] is not None  # the other metrics still run
    table = markdown_rows(capsys.readouterr().out)
    assert {row["CLIPScore"] for row in table.values()} == {"n/a"}


def test_webdataset_shards(export, tmp_path, no_java):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            image = io.BytesIO()
            draw("red", "square", seed=i).save(image, format="PNG")
            meta = {"texts": [f"zorbit K-{i}"], "round3": f"a red square number {i}"} if i < 2 else {"texts": ["x"]}
            for name, payload in ((f"{i:04d}.png", image.getvalue()), (f"{i:04d}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    no_logs = tmp_path / "run_without_logs"
    no_logs.mkdir()
    result = evaluate(export, shard, conditions="w/ alt", output_dir=tmp_path / "eval",
                      run_dir=str(no_logs))
    data = result.summary["data"]
    assert (data["format"], data["read"], data["evaluated"], data["skipped"]) == ("webdataset", 3, 2, 1)
    check_range("CLIPScore", result.metrics["w/ alt"]["CLIPScore"])
    # A run directory without logs: no plot, and the reason is recorded.
    assert "no metrics.csv" in result.summary["skipped"]["training curves"]
    assert "training_curves" not in result.files


def test_demo_world(export, tmp_path, no_java, capsys):
    from altogether.demo.score import METRICS
    from altogether.demo.world import make_scenes

    out = tmp_path / "eval"
    assert run_cli(main, [str(export), "demo", "demo.eval_scenes=5", f"output_dir={out}", "progress=false",
                          "alt_text_row=false"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    demo_conditions = [*CONDITIONS, "w/ wrong-colour alt"]
    assert summary["data"]["id"] == "demo" and summary["data"]["evaluated"] == 5
    assert summary["conditions"] == demo_conditions and list(summary["set_scores"]) == demo_conditions
    for scores in summary["set_scores"].values():
        assert set(scores) == set(METRICS)
        assert all(v is None or 0.0 <= v <= 1.0 for v in scores.values())
    # The eval scenes are the held-out ones the world makes for this seed; references are their captions.
    scenes = make_scenes(5, 0, "eval")
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [c["reference"] for c in captions] == [s.caption for s in scenes]
    assert [c["alt_text"] for c in captions] == [" ".join(s.alt_text.split()) for s in scenes]
    assert all(c["prompts"]["w/ wrong-colour alt"] != c["alt_text"] for c in captions)
    stdout = capsys.readouterr().out
    assert list(markdown_rows(stdout)) == [*demo_conditions, "reference"] and "carry-over (held-out facts)" in stdout
    assert "demo fact carry over (%)" in (out / "report.html").read_text(encoding="utf-8")


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="java is not on PATH: no PTB/METEOR here")
def test_with_java_meteor_is_scored(export, ft_json, tmp_path):
    result = evaluate(export, ft_json, conditions="w/ alt", clip_score=False, alt_text_row=False,
                      output_dir=tmp_path, progress=False)
    assert result.summary["tokenizer"] == "ptb" and "METEOR" not in result.summary["skipped"]
    check_range("METEOR", result.metrics["w/ alt"]["METEOR"])
    assert result.summary["versions"]["java"]


@pytest.mark.parametrize("argv_tail, message", [
    (["missing.json"], "missing.json"),
    (["data.txt"], "cannot tell the format"),
    (["{ft}", "colour=red"], "key 'colour'"),
    (["{ft}", "limit=many"], "key 'limit'"),
    (["{ft}", "conditions=w/ nothing"], "w/ nothing"),
    (["{ft}", "run_dir=/no/such/run"], "run_dir"),
    (["{ft}", "top_p=2"], "top_p must be in (0, 1]"),
    (["{ft}", "max_new_tokens=400"], "max_position_embeddings=512; set max_new_tokens <= 380"),
])
def test_bad_arguments_are_one_line_errors(export, ft_json, tmp_path, monkeypatch, capsys, argv_tail, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("x")
    argv = [str(export), *[a.replace("{ft}", str(ft_json)) for a in argv_tail]]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_model_and_data_paths_may_hold_an_equals_sign(export, ft_json, tmp_path, monkeypatch, no_java):
    """Sweep folders (``lr=1e-3/export``), given relative or absolute: an argument naming an existing file or
    folder is MODEL or DATA, never a setting."""
    shutil.copytree(export, tmp_path / "lr=1e-3" / "export")
    shutil.copytree(ft_json.parent, tmp_path / "data=ft")
    monkeypatch.chdir(tmp_path)
    for model, data in [("lr=1e-3/export", str(tmp_path / "data=ft" / "ft.json")),
                        (str(tmp_path / "lr=1e-3" / "export"), "data=ft/ft.json")]:
        out = tmp_path / "out" / str(len(model))
        assert run_cli(main, [model, data, f"output_dir={out}", "progress=false", "clip_score=false", "limit=2"]) == 0
        summary = json.loads((out / "metrics.json").read_text())
        assert (summary["model"]["id"], summary["data"]["id"], summary["data"]["read"]) == (model, data, 2)


def test_bad_model_is_a_one_line_error_from_the_command(ft_json, tmp_path):
    done = subprocess.run([sys.executable, "-m", "altogether.evaluate", str(tmp_path), str(ft_json)],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""}, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "altogether.json" in done.stderr


def test_format_table_orders_columns_and_marks_missing():
    rows = {"w/ alt": {"BLEU-1": 12.345, "CLIPScore": 30.0, "METEOR": None, "extra": 1.0},
            "reference": {"CLIPScore": 28.5}}
    text = format_table(rows, {"METEOR": "no java", "NP-P": "no spaCy", "NP-R": "no spaCy"})
    assert text.splitlines()[0] == "| condition | CLIPScore | BLEU-1 | METEOR | extra |"
    assert markdown_rows(text) == {
        "w/ alt": {"CLIPScore": "30.00", "BLEU-1": "12.35", "METEOR": "n/a", "extra": "1.00"},
        "reference": {"CLIPScore": "28.50", "BLEU-1": "n/a", "METEOR": "n/a", "extra": "n/a"},
    }
    assert "- skipped NP-P, NP-R: no spaCy" in text and "- skipped METEOR: no java" in text


def test_a_one_record_set_reports_cider_unavailable_not_zero(export, ft_json, tmp_path, no_java, capsys):
    out = tmp_path / "eval"
    assert run_cli(main, [str(export), str(ft_json), f"output_dir={out}", "progress=false", "limit=1",
                          "conditions=w/ alt"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["data"]["evaluated"] == 1
    assert summary["metrics"]["w/ alt"]["CIDEr"] is None and "IDF" in summary["skipped"]["CIDEr"]
    assert summary["baselines"]["alt-text"]["CIDEr"] is None
    assert markdown_rows(capsys.readouterr().out)["w/ alt"]["CIDEr"] == "n/a"


def test_an_evaluation_set_built_in_code_brings_its_conditions_and_scorer(export, tmp_path, no_java):
    """The interface the demo uses: records, a condition of the set's own and its scorer, through `evaluate`."""
    from altogether.data.records import Record
    from altogether.evaluate import EvalSet

    records = [Record(key=f"r{i}", image=draw(c, "square", seed=i), alt_texts=[f"zorbit K-{i}"],
                      target=f"a {c} square") for i, c in enumerate(("red", "blue", "green"))]
    shouted = [f"ZORBIT K-{i}" for i in range(3)]
    seen = []

    def score(captions, prompts):
        seen.append(list(prompts))
        return {"prompted": sum(bool(p) for p in prompts) / len(prompts)}

    eval_set = EvalSet(id="mine", kind="code", records=records, read=3, conditions={"w/ shouted alt": shouted},
                       score=score, info={"made_by": "test"})
    result = evaluate(export, eval_set, conditions="w/ alt,w/o alt,w/ shouted alt", output_dir=tmp_path,
                      clip_score=False, progress=False, do_sample=False)
    assert result.summary["set_scores"] == {"w/ alt": {"prompted": 1.0}, "w/o alt": {"prompted": 0.0},
                                            "w/ shouted alt": {"prompted": 1.0}}
    assert seen[2] == shouted and seen[0] == [f"zorbit K-{i}" for i in range(3)]
    assert result.summary["data"]["made_by"] == "test" and result.summary["data"]["evaluated"] == 3
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [r["prompts"]["w/ shouted alt"] for r in rows] == shouted
    assert "mine scores (fractions)" in result.table
    bad = EvalSet(id="bad", kind="code", records=records, read=3, conditions={"w/ short": ["x"]})
    with pytest.raises(ValueError, match="one prompt per record"):
        evaluate(export, bad, output_dir=tmp_path)
    with pytest.raises(ConfigError, match="settings of a named evaluation set"):
        evaluate(export, tmp_path / "x.json", data_options={"eval_scenes": 5}, output_dir=tmp_path)


@pytest.fixture
def coco(tmp_path):
    """COCO's own layout and fields (annotations/captions_val2017.json, images in val2017/): 4 images, 5
    captions each except one image with 2, and one image without any caption."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images, annotations = [], []
    for n, image_id in enumerate((397133, 37777, 252219, 87038)):
        name = f"{image_id:012d}.jpg"
        colour, shape = list(COLOURS)[n], SHAPES[n % 2]
        draw(colour, shape, seed=n).convert("RGB").save(root / "val2017" / name)
        images.append({"license": 4, "file_name": name, "coco_url": f"http://images.cocodataset.org/val2017/{name}",
                       "height": 64, "width": 64, "date_captured": "2013-11-14 17:02:52",
                       "flickr_url": f"http://farm7.staticflickr.com/6116/{image_id}_z.jpg", "id": image_id})
        count = 0 if n == 3 else 2 if n == 2 else 5
        annotations += [{"image_id": image_id, "id": 1000 * n + k,
                         "caption": f"A {colour} {shape} on a white {('table', 'wall', 'page', 'sheet', 'card')[k]}. "}
                        for k in range(count)]
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({
        "info": {"description": "COCO 2017 Dataset", "year": 2017}, "licenses": [{"id": 4, "name": "x"}],
        "images": images, "annotations": annotations}))
    return root


def test_coco_captions_are_read_and_scored_against_all_their_references(export, coco, tmp_path, no_java):
    from altogether.metrics import score_captions

    data = coco / "annotations" / "captions_val2017.json"
    result = evaluate(export, data, image_root=str(coco / "val2017"), output_dir=tmp_path / "eval",
                      conditions="w/o alt", progress=False, clip_score=False)
    summary = result.summary
    assert summary["data"]["format"] == "coco"
    assert (summary["data"]["read"], summary["data"]["evaluated"], summary["data"]["skipped"]) == (4, 3, 1)
    assert "no caption in 'annotations'" in summary["data"]["skipped_examples"][0]["reason"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "captions.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["397133", "37777", "252219"]
    assert [len(r["reference"]) for r in rows] == [5, 5, 2]  # every reference kept, stripped
    assert rows[0]["reference"][0] == f"A {list(COLOURS)[0]} {SHAPES[0]} on a white table."
    captions = [r["captions"]["w/o alt"] for r in rows]
    with pytest.warns(RuntimeWarning):
        together = score_captions(captions, [r["reference"] for r in rows], lambda t: [set() for _ in t]).scores
    for metric in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert summary["metrics"]["w/o alt"][metric] == pytest.approx(together[metric], abs=1e-9), metric


def test_a_coco_file_is_not_training_data(make_recipe, coco):
    from altogether.data.datamodule import open_sources

    cfg = make_recipe("finetune_round3", {"data.format": "auto",
                                          "data.train": str(coco / "annotations" / "captions_val2017.json")})
    with pytest.raises(ValueError, match="is a COCO captions file .* evaluate reads it"):
        open_sources(cfg)
