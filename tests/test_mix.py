"""Tests for altogether.mix: mixing ratio, determinism, CLIP-score filtering, Parquet and webdataset output."""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from altogether import mix
from altogether.cli import run_cli
from altogether.mix import MixError, ScoreFilter
from altogether.recaption import write_shard_output


def _rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "key": f"{i:06d}",
            "alt_text": f"alt {i}",
            "caption": f"caption {i}",
            "alt_clip_score": round(rng.uniform(10, 40), 3),
            "caption_clip_score": round(rng.uniform(15, 40), 3),
        }
        for i in range(count)
    ]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ mixing


@pytest.mark.parametrize("p", [0.15, 0.5, 0.95])
def test_mixing_ratio_within_binomial_tolerance(p):
    rows = _rows(4000)
    samples, summary = mix.mix_captions(rows, p, seed=7)
    n = len(rows)
    synthetic = sum(s["source"] == "caption" for s in samples)
    assert abs(synthetic - n * p) <= 4 * math.sqrt(n * p * (1 - p))  # 4 sigma: fails ~1 in 16,000 seeds
    assert summary.kept_caption == synthetic and summary.kept_alt == n - synthetic and summary.rows_out == n
    for row, sample in zip(rows, samples):
        assert sample["key"] == row["key"]
        assert sample["text"] == (row["caption"] if sample["source"] == "caption" else row["alt_text"])


def test_extreme_ratios_and_target_defaults():
    rows = _rows(200)
    assert {s["source"] for s in mix.mix_captions(rows, 0.0)[0]} == {"alt"}
    assert {s["source"] for s in mix.mix_captions(rows, 1.0)[0]} == {"caption"}
    assert mix.TARGET_P == {"clip": 0.15, "t2i": 1.0}
    with pytest.raises(MixError, match="p must be in"):
        mix.mix_captions(rows, 1.5)


def test_mixing_is_deterministic_per_key_and_seed():
    rows = _rows(500)
    first, _ = mix.mix_captions(rows, 0.3, seed=1)
    assert first == mix.mix_captions(rows, 0.3, seed=1)[0]
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    by_key = {s["key"]: s for s in mix.mix_captions(shuffled, 0.3, seed=1)[0]}
    assert all(by_key[s["key"]] == s for s in first)  # order and neighbours do not matter
    assert mix.mix_captions(rows[:250], 0.3, seed=1)[0] == first[:250]  # nor sharding
    assert first != mix.mix_captions(rows, 0.3, seed=2)[0]


def test_fallback_and_dropping():
    rows = [
        {"key": "a", "alt_text": "alt a", "caption": None},
        {"key": "b", "alt_text": "  ", "caption": "caption b"},
        {"key": "c", "alt_text": None, "caption": ""},
        {"key": "d", "alt_text": "alt d", "caption": "caption d"},
    ]
    samples, summary = mix.mix_captions(rows, 1.0)
    assert [(s["key"], s["source"]) for s in samples] == [("a", "alt"), ("b", "caption"), ("d", "caption")]
    assert (summary.fell_back_to_alt, summary.fell_back_to_caption, summary.dropped_no_text) == (1, 0, 1)
    samples, summary = mix.mix_captions(rows, 0.0)
    assert [(s["key"], s["source"]) for s in samples] == [("a", "alt"), ("b", "caption"), ("d", "alt")]
    assert (summary.fell_back_to_alt, summary.fell_back_to_caption) == (0, 1)


def test_both_columns_mode():
    rows = _rows(50) + [{"key": "x", "alt_text": None, "caption": "only caption", "img_path": "x.jpg"}]
    samples, summary = mix.mix_captions(rows, 0.15, both_columns=True)
    assert len(samples) == 51 and summary.mode == "both-columns" and summary.p == 0.15
    assert samples[0] == {"key": "000000", "alt_text": "alt 0", "caption": "caption 0", "img_path": None}
    assert samples[-1] == {"key": "x", "alt_text": None, "caption": "only caption", "img_path": "x.jpg"}
    assert (summary.kept_alt, summary.kept_caption) == (50, 51)


def test_caption_lists_pick_one_uniformly_and_filter_per_caption():
    captions = {"caption": ["low", "high A", "high B"], "caption_clip_score": [5.0, 30.0, 31.0]}
    rows = [{"key": f"k{i}", "alt_text": f"alt {i}", **captions} for i in range(600)]
    samples, summary = mix.mix_captions(rows, 1.0, seed=3)
    counts = {text: sum(s["text"] == text for s in samples) for text in ("low", "high A", "high B")}
    assert all(abs(c - 200) <= 4 * math.sqrt(600 * (1 / 3) * (2 / 3)) for c in counts.values()), counts
    samples, summary = mix.mix_captions(rows, 1.0, seed=3, caption_filter=ScoreFilter(threshold=20))
    assert {s["text"] for s in samples} == {"high A", "high B"} and summary.caption_filtered_out == 600
    with pytest.raises(MixError, match=r"row 'k0': caption_clip_score has 2 scores for 3 text\(s\)"):
        mix.mix_captions([{**rows[0], "caption_clip_score": [1.0, 2.0]}], 1.0)


# ------------------------------------------------------------------------------------------ filtering


def test_filter_by_threshold_keeps_exactly_the_scores_at_or_above():
    scores = [random.Random(5).uniform(0, 1) for _ in range(1000)] + [0.3, 0.3, float("nan")]
    keep = mix.filter_by_score(scores, threshold=0.3)
    assert [i for i, k in enumerate(keep) if k] == [i for i, s in enumerate(scores) if s >= 0.3]
    assert keep[-3:] == [True, True, False]


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 1.0])
def test_filter_top_fraction_keeps_exactly_the_best(fraction):
    rng = random.Random(11)
    scores = [rng.uniform(0, 1) for _ in range(997)]
    keep = mix.filter_by_score(scores, top_fraction=fraction)
    kept = [s for s, k in zip(scores, keep) if k]
    dropped = [s for s, k in zip(scores, keep) if not k]
    assert len(kept) == round(fraction * len(scores))
    assert not dropped or min(kept) > max(dropped)
    assert sorted(kept) == sorted(scores, reverse=True)[: len(kept)][::-1]


def test_filter_top_fraction_ties_and_bad_options():
    assert mix.filter_by_score([1.0, 2.0, 2.0, 2.0], top_fraction=0.5) == [False, True, True, False]
    for kwargs in ({}, {"threshold": 1.0, "top_fraction": 0.5}, {"top_fraction": 0.0}, {"top_fraction": 1.5}):
        with pytest.raises(MixError):
            mix.filter_by_score([1.0], **kwargs)


def test_alt_threshold_filter_in_mixing_keeps_exactly_high_alt_rows():
    rows = _rows(1000)
    samples, summary = mix.mix_captions(rows, 0.0, alt_filter=ScoreFilter(threshold=25.0))
    with_alt = {s["key"] for s in samples if s["source"] == "alt"}
    assert with_alt == {r["key"] for r in rows if r["alt_clip_score"] >= 25.0}
    assert summary.alt_filtered_out == 1000 - len(with_alt) == summary.fell_back_to_caption
    # DataComp's "raw top 30% + synthetic for the rest, filtered by a threshold":
    filters = {"alt_filter": ScoreFilter(top_fraction=0.3), "caption_filter": ScoreFilter(threshold=30.0)}
    samples, summary = mix.mix_captions(rows, 0.0, **filters)
    assert summary.kept_alt == 300
    ranked = sorted(rows, key=lambda r: -r["alt_clip_score"])
    assert {s["key"] for s in samples if s["source"] == "alt"} == {r["key"] for r in ranked[:300]}
    expected_captions = {r["key"] for r in ranked[300:] if r["caption_clip_score"] >= 30.0}
    assert {s["key"] for s in samples if s["source"] == "caption"} == expected_captions
    assert summary.dropped_no_text == 700 - len(expected_captions)


def test_filtering_without_scores_names_key_and_column():
    rows = _rows(3)
    del rows[1]["caption_clip_score"]
    with pytest.raises(MixError, match=r"row '000001': no caption_clip_score"):
        mix.mix_captions(rows, 0.5, caption_filter=ScoreFilter(top_fraction=0.5))
    rows[1]["caption_clip_score"] = "high"
    with pytest.raises(MixError, match=r"row '000001': caption_clip_score: expected a number"):
        mix.mix_captions(rows, 0.5)


# ------------------------------------------------------------------------------------------ reading and joining


def test_read_rows_parquet_and_jsonl_and_errors(tmp_path):
    rows = _rows(6)
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "a.parquet")
    _write_jsonl(tmp_path / "b.jsonl", rows[3:])
    assert mix.read_rows([tmp_path / "a.parquet", tmp_path / "b.jsonl"]) == rows
    with pytest.raises(MixError, match=r"b\.jsonl: key '000003' appears again"):
        mix.read_rows([tmp_path / "b.jsonl", tmp_path / "b.jsonl"])
    (tmp_path / "bad.jsonl").write_text('{"key": "1"}\n{"key": 2,\n', encoding="utf-8")
    with pytest.raises(MixError, match=r"bad\.jsonl:2: not valid JSON"):
        mix.read_rows([tmp_path / "bad.jsonl"])
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "nokey.parquet")
    with pytest.raises(MixError, match=r"nokey\.parquet: no 'key' column"):
        mix.read_rows([tmp_path / "nokey.parquet"])


def test_join_originals_takes_alt_text_from_the_original_data():
    recaptions = [
        {"key": "1", "alt_text": "truncated al", "caption": "c1"},
        {"key": "2", "alt_text": None, "caption": "c2"},
        {"key": "3", "caption": "c3"},
    ]
    originals = [
        {"key": "1", "alt_text": "truncated alt-text in full", "url": "u1", "alt_clip_score": 21.0},
        {"key": "2", "alt_text": "alt 2"},
    ]
    joined, missing = mix.join_originals(recaptions, originals)
    assert missing == 1
    assert joined == [
        {"key": "1", "alt_text": "truncated alt-text in full", "caption": "c1", "url": "u1", "alt_clip_score": 21.0},
        {"key": "2", "alt_text": "alt 2", "caption": "c2"},
    ]


# ------------------------------------------------------------------------------------------ output and CLI


def test_cli_parquet_output_reads_back(tmp_path, capsys):
    rows = _rows(300)
    for i, row in enumerate(rows):
        row["img_path"] = f"{i}.jpg"
    source = tmp_path / "recaptions.recaption.parquet"  # as recaption writes it, with score columns added
    write_shard_output(source, rows, pa.Table.from_pylist(rows).schema)
    out = tmp_path / "train.parquet"
    assert mix.main([str(source), f"out={out}", "seed=4", "caption_top=0.5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    table = pq.read_table(out)
    assert table.column_names == ["key", "text", "source", "img_path"]
    expected, summary = mix.mix_captions(rows, 0.15, seed=4, caption_filter=ScoreFilter(top_fraction=0.5))
    assert table.to_pylist() == expected
    saved = json.loads(out.with_suffix(".summary.json").read_text())
    assert saved == printed and saved["kept_caption"] == summary.kept_caption and saved["kept_alt"] == summary.kept_alt
    assert saved["p"] == 0.15 and saved["caption_filter"] == {"threshold": None, "top_fraction": 0.5}


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_cli_webdataset_output_reads_back(tmp_path):
    rows = _rows(25)
    source = _write_jsonl(tmp_path / "recaptions.recaption.jsonl", rows)
    out = tmp_path / "shards"
    assert mix.main([str(source), f"out={out}", "target=t2i", "shard_size=10"]) == 0
    shards = sorted(out.glob("shard-*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    read = {}
    for shard in shards:
        read.update(_read_tar(shard))
    expected, _ = mix.mix_captions(rows, 1.0)
    assert sorted(read) == [s["key"] for s in expected]
    for sample in expected:
        assert read[sample["key"]]["txt"].decode() == sample["text"]
        assert json.loads(read[sample["key"]]["json"]) == sample
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_out"] == 25 and summary["kept_caption"] == 25 and summary["shards"] == [s.name for s in shards]
    # A second run into the same folder is refused and leaves it as it was.
    assert run_cli(mix.main, [str(source), f"out={out}"]) == 2
    assert sorted(p.name for p in out.iterdir()) == [*(s.name for s in shards), "summary.json"]


def test_webdataset_both_columns_with_images_and_webdataset_reader(tmp_path):
    rows = _rows(4)
    for i, row in enumerate(rows):
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        row["img_path"] = f"{i}.png"
    rows[1]["caption"] = None
    source = _write_jsonl(tmp_path / "r.recaption.jsonl", rows)
    out = tmp_path / "wds"
    assert mix.main([str(source), f"out={out}", "both_columns=true", "with_images=true", f"image_root={tmp_path}"]) == 0
    read = _read_tar(out / "shard-000000.tar")
    assert read["000000"]["alt_text.txt"] == b"alt 0" and read["000000"]["caption.txt"] == b"caption 0"
    assert "caption.txt" not in read["000001"]
    assert read["000002"]["png"] == (tmp_path / "2.png").read_bytes()
    import webdataset as wds

    loaded = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in loaded] == ["000000", "000001", "000002", "000003"]
    assert loaded[3]["png"].getpixel((0, 0)) == (120, 0, 0)


class FakeScorer:
    """Stands in for ClipScorer: score = red channel of the image + 10 * number of words."""

    def score(self, images, texts):
        import torch

        from altogether.clip_score import ScoreResult

        values = torch.tensor([float(im.getpixel((0, 0))[0] + 10 * len(t.split())) for im, t in zip(images, texts)])
        return ScoreResult(cosine=values / 100, clip_score=values, truncated=torch.zeros(len(values), dtype=torch.bool))


def test_cli_computes_missing_scores_with_clip_scorer(tmp_path):
    rows = []
    for i in range(4):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / f"{i}.png")
        alt = "short" if i % 2 else "a longer alt text"
        rows.append({"key": str(i), "alt_text": alt, "caption": ["one two", "one two three four"], "img_path": f"{i}.png"})
    rows[3]["alt_clip_score"] = 99.0  # given scores are kept
    source = _write_jsonl(tmp_path / "r.recaption.jsonl", rows)
    out = tmp_path / "o.parquet"
    argv = [str(source), f"out={out}", "p=0", "alt_threshold=30", "caption_threshold=35"]
    argv += ["clip_model=m", f"image_root={tmp_path}"]
    assert mix.main(argv, load_scorer=lambda *args: FakeScorer()) == 0
    by_key = {s["key"]: s for s in pq.read_table(out).to_pylist()}
    # alt scores: 0+40, 1+10, 2+40, 99 -> rows 0, 2, 3 keep their alt; row 1 falls back to the 4-word caption (41).
    assert {k: (s["source"], s["text"]) for k, s in by_key.items()} == {
        "0": ("alt", "a longer alt text"),
        "1": ("caption", "one two three four"),
        "2": ("alt", "a longer alt text"),
        "3": ("alt", "short"),
    }
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["rows_scored_with_clip"] == 4 and summary["caption_filtered_out"] == 4


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["alt_threshold=1", "alt_top=0.5"], "alt_threshold and alt_top are alternatives"),
        (["caption_top=2"], "top fraction must be in (0, 1]"),
        (["caption_top=-1"], "caption_top=-1.0: top fraction must be in (0, 1]"),
        (["alt_top=1.5"], "alt_top=1.5: top fraction must be in (0, 1]"),
        (["clip_model=m"], "clip_model only computes scores for filtering"),
        (["clip_pretrained=t"], "clip_pretrained needs clip_model"),
    ],
)
def test_cli_option_errors_are_one_line(tmp_path, capsys, extra, expected):
    source = _write_jsonl(tmp_path / "r.recaption.jsonl", _rows(3))
    out = tmp_path / "o.parquet"
    assert run_cli(mix.main, [str(source), f"out={out}", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not out.exists()


def test_webdataset_rejects_keys_with_dots_and_leaves_nothing(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "r.recaption.jsonl", [{"key": "a.b", "alt_text": "x", "caption": "y"}])
    assert run_cli(mix.main, [str(source), f"out={tmp_path / 'wds'}"]) == 2
    assert "row 'a.b': webdataset keys cannot contain '.'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.recaption.jsonl"]


def test_cli_output_is_deterministic(tmp_path):
    source = _write_jsonl(tmp_path / "r.recaption.jsonl", _rows(100))
    for name in ("a.parquet", "b.parquet"):
        assert mix.main([str(source), f"out={tmp_path / name}", "seed=9"]) == 0
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))


# ------------------------------------------------------------------------------------------ the joints with real tools


def _recaption_output(path: Path, rows: list[dict]) -> Path:
    """A shard output as `altogether.recaption` writes it (its own writer and schema)."""
    from altogether.recaption import load_settings, output_schema

    return write_shard_output(path, [{"url": None, **row} for row in rows], output_schema(load_settings({})))


def _img2dataset_metadata(path: Path, keys: list[str]) -> Path:
    """img2dataset's per-shard metadata Parquet: key, url, caption (the alt-text), status, ... beside the tar."""
    pq.write_table(pa.table({
        "url": [f"http://127.0.0.1:8000/{k}.jpg" for k in keys], "caption": [f"web alt {k}" for k in keys],
        "key": keys, "status": ["success"] * len(keys), "error_message": [None] * len(keys),
        "width": [64] * len(keys), "height": [64] * len(keys),
    }), path)
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_mix_refuses_files_that_are_not_recaption_outputs(tmp_path, capsys):
    keys = [f"00000000{i}" for i in range(3)]
    metadata = _img2dataset_metadata(tmp_path / "00000.parquet", keys)
    out = tmp_path / "train.parquet"
    assert run_cli(mix.main, [str(metadata), f"out={out}"]) == 2  # was: 3/3 rows "source: caption", the alt-texts
    assert "00000.parquet: not a recaption output (no 'altogether.recaption' schema metadata" in _error_line(capsys)
    manifest = _write_jsonl(tmp_path / "manifest.jsonl", [{"key": k, "caption": "x"} for k in keys])
    assert run_cli(mix.main, [str(manifest), f"out={out}"]) == 2
    assert "manifest.jsonl: not a recaption output (not named *.recaption.jsonl" in _error_line(capsys)
    assert not out.exists()
    # The real output is accepted, under its own name or renamed (the Parquet metadata travels with it).
    source = _recaption_output(tmp_path / "00000.recaption.parquet", [
        {"key": k, "alt_text": f"web alt {k}", "caption": f"synthetic {k}"} for k in keys])
    renamed = tmp_path / "renamed.parquet"
    renamed.write_bytes(source.read_bytes())
    for path in (source, renamed):
        assert mix.main([str(path), f"out={out}", "p=1"]) == 0
        assert [r["text"] for r in pq.read_table(out).to_pylist()] == [f"synthetic {k}" for k in keys]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_an_input_without_rows_is_a_one_line_error_naming_it(tmp_path, capsys, suffix):
    """Recaption writes no output for a shard it captioned nothing of, so an empty one is not its work; a mix of
    it alone wrote an empty training set and exited 0."""
    good = _recaption_output(tmp_path / "00000.recaption.parquet", [{"key": "a", "alt_text": "x", "caption": "y"}])
    empty = tmp_path / f"00001.recaption.{suffix}"
    if suffix == "jsonl":
        empty.write_text("")
    else:
        _recaption_output(empty, [])
    out = tmp_path / "train.parquet"
    for inputs in ([empty], [good, empty]):
        assert run_cli(mix.main, [*map(str, inputs), f"out={out}"]) == 2
        assert f"error: {empty}: holds no rows" in _error_line(capsys)
        assert not out.exists()


@pytest.mark.parametrize("kind", ["img2dataset", "manifest"])
def test_originals_alt_text_column_is_a_setting_and_a_missing_one_is_an_error(tmp_path, capsys, kind):
    keys = [f"00000000{i}" for i in range(4)]
    source = _recaption_output(tmp_path / "00000.recaption.parquet", [
        {"key": k, "alt_text": "prompt", "caption": f"synthetic {k}"} for k in keys])
    if kind == "img2dataset":
        originals, column = _img2dataset_metadata(tmp_path / "00000.parquet", keys[:3]), "caption"
        columns = "url, caption, key, status, error_message, width, height"
    else:
        manifest = [{"key": k, "alt": f"web alt {k}"} for k in keys[:3]]  # the manifest recaption read
        originals, column = _write_jsonl(tmp_path / "m.jsonl", manifest), "alt"
        columns = "key, alt"
    out = tmp_path / "train.parquet"
    # Without the column named: was exit 0, 100 % synthetic; now one line naming the file and its columns.
    assert run_cli(mix.main, [str(source), f"out={out}", f"originals={originals}"]) == 2
    assert f"{originals}: no column 'alt_text' (columns: {columns})" in _error_line(capsys)
    assert not out.exists()
    argv = [str(source), f"out={out}", f"originals={originals}", f"alt_column={column}", "p=0"]
    assert mix.main(argv) == 0
    assert [(r["key"], r["text"], r["source"]) for r in pq.read_table(out).to_pylist()] == [
        (k, f"web alt {k}", "alt") for k in keys[:3]]
    captured = capsys.readouterr()
    assert json.loads(captured.out)["missing_original"] == 1
    assert "warning: 1 recaption row(s) had no row in originals and were dropped" in captured.err
    assert run_cli(mix.main, [str(source), f"out={tmp_path / 'x.parquet'}", "alt_column=alt"]) == 2
    assert "alt_column names the alt-text column of originals" in _error_line(capsys)


def _open_clip_samples(shard: Path) -> list[tuple[str, tuple[int, int], str]]:
    """Read a shard the way open_clip_train's webdataset loader does (src/open_clip_train/data.py): samples
    without `txt` or a jpg/png/jpeg/webp image are skipped, then decode("pilrgb") and rename."""
    import webdataset as wds

    def has_caption_and_image(sample):
        return "txt" in sample and any(ext in sample for ext in ("png", "jpg", "jpeg", "webp"))

    dataset = wds.DataPipeline(
        wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples(), wds.select(has_caption_and_image),
        wds.decode("pilrgb"), wds.rename(key="__key__", image="jpg;png;jpeg;webp", text="txt"),
        wds.to_tuple("key", "image", "text"))
    return [(key, image.getpixel((0, 0)), text) for key, image, text in dataset]


def test_with_images_reads_only_inside_the_image_root(tmp_path, capsys):
    root, outside = tmp_path / "images", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(root / "ok.png")
    secret = outside / "secret.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(secret)
    (root / "link.png").symlink_to(secret)
    for name, img_path in [("absolute", str(secret)), ("dotdot", "../private/secret.png"), ("symlink", "link.png")]:
        source = _write_jsonl(tmp_path / f"{name}.recaption.jsonl", [
            {"key": "good", "alt_text": "a", "caption": "c", "img_path": "ok.png"},
            {"key": "evil", "alt_text": "a", "caption": "c", "img_path": img_path}])
        out = tmp_path / f"wds-{name}"
        argv = [str(source), f"out={out}", "with_images=true", f"image_root={root}"]
        assert run_cli(mix.main, argv) == 2  # was: the outside file copied into the training shard
        assert f"row 'evil': img_path {img_path!r} is outside the image root {root.resolve()}" in _error_line(capsys)
        assert not out.exists()
        assert mix.main([*argv, "allow_outside_root=true"]) == 0  # the user's explicit choice
        assert [s[:2] for s in _open_clip_samples(out / "shard-000000.tar")] == [("good", (10, 20, 30)),
                                                                                ("evil", (1, 2, 3))]


@pytest.mark.parametrize("key", ["/abs/evil", "dir/evil", "a\\b", "", "tab\there"])
def test_keys_never_become_paths_in_the_tar(tmp_path, capsys, key):
    source = _write_jsonl(tmp_path / "r.recaption.jsonl", [{"key": key, "alt_text": "a", "caption": "c"}])
    assert run_cli(mix.main, [str(source), f"out={tmp_path / 'wds'}"]) == 2  # was: member "/abs/evil.txt"
    err = _error_line(capsys)
    assert f"row {key!r}:" in err and ("cannot contain '.'" in err or "must be a non-empty name without '/'" in err)
    assert not (tmp_path / "wds").exists()


def test_bmp_images_are_converted_so_open_clip_reads_them(tmp_path):
    colours = {"p": ((200, 0, 0), "png"), "b": ((0, 200, 0), "bmp"), "t": ((0, 0, 200), "tiff")}
    rows = []
    for key, (colour, ext) in colours.items():
        Image.new("RGB", (4, 4), colour).save(tmp_path / f"{key}.{ext}")
        rows.append({"key": key, "alt_text": f"alt {key}", "caption": f"cap {key}", "img_path": f"{key}.{ext}"})
    source = _write_jsonl(tmp_path / "r.recaption.jsonl", rows)
    out = tmp_path / "wds"
    assert mix.main([str(source), f"out={out}", "with_images=true", f"image_root={tmp_path}", "p=1"]) == 0
    members = _read_tar(out / "shard-000000.tar")
    assert {key: sorted(m) for key, m in members.items()} == {key: ["json", "png", "txt"] for key in colours}
    assert members["p"]["png"] == (tmp_path / "p.png").read_bytes()  # formats open_clip reads are copied as they are
    # was: "bmp"/"tiff" members that open_clip's loader skips, leaving 1 of 3 samples
    assert _open_clip_samples(out / "shard-000000.tar") == [
        (key, colour, f"cap {key}") for key, (colour, _) in colours.items()]


def test_non_utf8_input_and_non_string_paths_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "latin1.recaption.jsonl"
    bad.write_bytes(b'{"key": "1", "alt_text": "a", "caption": "c"}\n'
                    b'{"key": "2", "alt_text": "caf\xe9", "caption": "c"}\n')  # Latin-1
    out = tmp_path / "o.parquet"
    assert run_cli(mix.main, [str(bad), f"out={out}"]) == 2  # was: UnicodeDecodeError traceback naming no file
    assert f"{bad}:2: not UTF-8 text" in _error_line(capsys)
    for column, value, got in [("img_path", 7, "int"), ("url", ["http://x"], "list")]:
        source = _write_jsonl(tmp_path / f"{column}.recaption.jsonl", [
            {"key": "k1", "alt_text": "a", "caption": "c"},
            {"key": "k2", "alt_text": "a", "caption": "c", column: value}])
        assert run_cli(mix.main, [str(source), f"out={out}"]) == 2  # was: a pyarrow traceback
        assert f"{source}: row 'k2': {column} must be a string, got {got}" in _error_line(capsys)
    assert not out.exists()


def test_images_from_the_original_tars_make_shards_open_clip_reads(tmp_path, capsys):
    """img2dataset folder -> recaption into the same folder -> mix images_from= the tars: no img_path needed."""
    import tarfile

    folder = tmp_path / "downloads"
    folder.mkdir()
    colours = {"000000000": ((200, 0, 0), "jpg"), "000000001": ((0, 200, 0), "bmp"), "000000002": ((0, 0, 200), "png")}
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, (colour, ext) in colours.items():
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), colour).save(buffer, {"jpg": "JPEG", "bmp": "BMP", "png": "PNG"}[ext], quality=100)
            for name, data in ((f"{key}.{ext}", buffer.getvalue()), (f"{key}.txt", f"web alt {key}".encode()),
                               (f"{key}.json", json.dumps({"key": key, "caption": f"web alt {key}"}).encode())):
                info = tarfile.TarInfo(f"./{name}")  # as `tar -C dir .` names them
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    _img2dataset_metadata(folder / "00000.parquet", list(colours))
    source = _recaption_output(folder / "00000.recaption.parquet", [
        {"key": key, "alt_text": f"web alt {key}", "caption": f"synthetic {key}"} for key in colours])
    out = tmp_path / "clip_train"
    argv = [str(source), f"out={out}", "p=1", f"images_from={folder}"]
    assert mix.main(argv) == 0
    got = _open_clip_samples(out / "shard-000000.tar")
    assert [(key, text) for key, _, text in got] == [(key, f"synthetic {key}") for key in colours]
    for (key, pixel, _), (colour, ext) in zip(got, colours.values()):
        assert max(abs(a - b) for a, b in zip(pixel, colour)) <= (4 if ext == "jpg" else 0), key
    members = _read_tar(out / "shard-000000.tar")
    assert [sorted(m) for m in members.values()] == [["jpg", "json", "txt"], ["json", "png", "txt"],
                                                     ["json", "png", "txt"]]
    # A key the tar does not hold, or a shard images_from lacks, is one line naming it.
    other = _recaption_output(tmp_path / "00001.recaption.parquet", [{"key": "k", "alt_text": "a", "caption": "c"}])
    assert run_cli(mix.main, [str(other), f"out={tmp_path / 'x'}", f"images_from={folder}"]) == 2
    err = _error_line(capsys)
    assert "row 'k': its recaption output is for shard '00001', which images_from does not have" in err
    assert not (tmp_path / "x").exists()


def test_parquet_and_its_summary_are_written_together(tmp_path, monkeypatch):
    """The disk fills while the summary is flushed: neither file appears (was: the Parquet without its summary)."""
    from altogether import io as altogether_io

    source = _recaption_output(tmp_path / "00000.recaption.parquet", _rows(5))
    out = tmp_path / "train.parquet"

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(altogether_io.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        mix.main([str(source), f"out={out}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.recaption.parquet"]
    monkeypatch.undo()
    assert mix.main([str(source), f"out={out}"]) == 0
    summary = json.loads((tmp_path / "train.summary.json").read_text())
    assert summary["rows_out"] == pq.read_table(out).num_rows == 5


def test_originals_pattern_reads_every_matching_file(tmp_path, capsys):
    """img2dataset writes one metadata Parquet per shard: originals= takes a pattern, as recaption's INPUT does."""
    keys = ["000000000", "000000001", "000010000"]
    (tmp_path / "downloads").mkdir()
    _img2dataset_metadata(tmp_path / "downloads" / "00000.parquet", keys[:2])
    _img2dataset_metadata(tmp_path / "downloads" / "00001.parquet", keys[2:])
    source = _recaption_output(tmp_path / "00000.recaption.parquet", [
        {"key": k, "alt_text": "prompt", "caption": f"synthetic {k}"} for k in keys])
    out = tmp_path / "clip.parquet"
    argv = [str(source), f"out={out}", f"originals={tmp_path / 'downloads' / '*.parquet'}", "alt_column=caption", "p=0"]
    assert mix.main(argv) == 0
    assert pq.read_table(out).column("text").to_pylist() == [f"web alt {k}" for k in keys]
    assert run_cli(mix.main, [*argv[:2], f"originals={tmp_path / 'nothing' / '*.parquet'}", *argv[3:]]) == 2
    assert "matches no file" in _error_line(capsys)
