"""Tests for altogether.mix: mixing ratio, determinism, CLIP-score filtering, Parquet and webdataset output."""

from __future__ import annotations

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
from altogether.mix import MixError, ScoreFilter


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
    source = tmp_path / "recaptions.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)
    out = tmp_path / "train.parquet"
    assert mix.main([str(source), "--out", str(out), "--seed", "4", "--caption-top", "0.5"]) == 0
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
    source = _write_jsonl(tmp_path / "recaptions.jsonl", rows)
    out = tmp_path / "shards"
    assert mix.main([str(source), "--out", str(out), "--target", "t2i", "--shard-size", "10"]) == 0
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
    assert mix.main([str(source), "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == [*(s.name for s in shards), "summary.json"]


def test_webdataset_both_columns_with_images_and_webdataset_reader(tmp_path):
    rows = _rows(4)
    for i, row in enumerate(rows):
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        row["img_path"] = f"{i}.png"
    rows[1]["caption"] = None
    source = _write_jsonl(tmp_path / "r.jsonl", rows)
    out = tmp_path / "wds"
    assert mix.main([str(source), "--out", str(out), "--both-columns", "--with-images", "--image-root", str(tmp_path)]) == 0
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
    source = _write_jsonl(tmp_path / "r.jsonl", rows)
    out = tmp_path / "o.parquet"
    argv = [str(source), "--out", str(out), "--p", "0", "--alt-threshold", "30", "--caption-threshold", "35"]
    argv += ["--clip-model", "m", "--image-root", str(tmp_path)]
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
        (["--alt-threshold", "1", "--alt-top", "0.5"], "--alt-threshold and --alt-top are alternatives"),
        (["--caption-top", "2"], "top fraction must be in (0, 1]"),
        (["--clip-model", "m"], "--clip-model only computes scores for filtering"),
        (["--clip-pretrained", "t"], "--clip-pretrained needs --clip-model"),
    ],
)
def test_cli_option_errors_are_one_line(tmp_path, capsys, extra, expected):
    source = _write_jsonl(tmp_path / "r.jsonl", _rows(3))
    out = tmp_path / "o.parquet"
    assert mix.main([str(source), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not out.exists()


def test_webdataset_rejects_keys_with_dots_and_leaves_nothing(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "r.jsonl", [{"key": "a.b", "alt_text": "x", "caption": "y"}])
    assert mix.main([str(source), "--out", str(tmp_path / "wds")]) == 2
    assert "row 'a.b': webdataset keys cannot contain '.'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


def test_cli_output_is_deterministic(tmp_path):
    source = _write_jsonl(tmp_path / "r.jsonl", _rows(100))
    for name in ("a.parquet", "b.parquet"):
        assert mix.main([str(source), "--out", str(tmp_path / name), "--seed", "9"]) == 0
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
