"""altogether.mix streams: batches of rows in, row groups out, two passes for a top-fraction filter, progress bars."""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from altogether import annotate, mix
from altogether.cli import run_cli
from altogether.mix import ScoreFilter
from altogether.recaption import load_settings, output_schema, write_shard_output

CAPTION_SCORES = (20.0, 25.5, 25.5, 25.5, 30.25)  # few values: many ties at any cut (exact in float32)


def _recaption_shards(folder: Path, sizes: list[int], seed: int = 0, gaps: bool = True) -> list[Path]:
    """Shard outputs as a best-of-N recaption run writes them (its writer and schema), the last one as JSONL;
    with ``gaps`` some alt-texts are empty and some captions missing (failed images)."""
    rng = random.Random(seed)
    schema = output_schema(load_settings({"num_candidates": 4}))
    paths = []
    for shard, size in enumerate(sizes):
        rows = [{"key": f"{shard:05d}{i:04d}", "url": f"http://127.0.0.1:8000/{shard}/{i}.jpg",
                 "alt_text": rng.choice(["", "truncated al", "a red chair"] if gaps else ["a red chair"]),
                 "caption": rng.choice([None, f"a photo of item {shard}-{i} on a wooden table"][not gaps:]),
                 "caption_clip_score": rng.choice(CAPTION_SCORES)} for i in range(size)]
        suffix = "jsonl" if shard == len(sizes) - 1 else "parquet"
        paths.append(write_shard_output(folder / f"{shard:05d}.recaption.{suffix}", rows, schema))
    return paths


def _img2dataset_metadata(path: Path, keys: list[str]) -> Path:
    """img2dataset's per-shard metadata Parquet: key, url, caption (the alt-text), status, ..."""
    pq.write_table(pa.table({
        "url": [f"http://127.0.0.1:8000/{k}.jpg" for k in keys], "caption": [f"web alt {k}" for k in keys],
        "key": keys, "status": ["success"] * len(keys), "error_message": [None] * len(keys),
    }), path)
    return path


def _full_ranking(scores: list[float], fraction: float) -> list[bool]:
    """The top ``round(fraction * n)`` by a full sort: highest first, NaN last, ties to the earlier position."""
    ranked = sorted(range(len(scores)), key=lambda i: (-(-math.inf if math.isnan(scores[i]) else scores[i]), i))
    kept = set(ranked[: round(fraction * len(scores))])
    return [i in kept for i in range(len(scores))]


@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.37, 0.5, 0.999, 1.0])
def test_two_pass_top_fraction_keeps_exactly_what_a_full_ranking_keeps(fraction):
    rng = random.Random(3)
    scores = [rng.choice([1.0, 2.0, 2.0, 2.0, 3.5, float("nan"), math.inf, -math.inf]) for _ in range(2001)]
    expected = _full_ranking(scores, fraction)
    assert sum(expected) == round(fraction * len(scores))
    cut, ties = mix.top_fraction_cut(scores, fraction)
    assert list(ScoreFilter(top_fraction=fraction).keeps(scores)) == expected
    assert mix.filter_by_score(scores, top_fraction=fraction) == expected
    kept_at_cut = [i for i, keep in enumerate(expected) if keep and (math.isnan(scores[i]) and cut == -math.inf
                                                                      or scores[i] == cut)]
    assert ties == len(kept_at_cut) > 0  # the boundary falls inside a run of equal scores


def test_streamed_mix_over_shards_and_batches_equals_the_in_memory_mix(tmp_path):
    """Three shards (Parquet and JSONL), a join with img2dataset's metadata, a top-fraction filter with ties across
    batch and shard boundaries: the streamed output is the in-memory mix of all rows, row for row."""
    shards = _recaption_shards(tmp_path, [11, 9, 7])
    rows = mix.read_recaptions(shards)
    metadata = _img2dataset_metadata(tmp_path / "meta.parquet", [r["key"] for r in rows if r["key"][-1] != "3"])
    out = tmp_path / "t2i.parquet"
    argv = [*map(str, shards), f"out={out}", "target=t2i", "caption_top=0.4", f"originals={metadata}",
            "alt_column=caption", "batch_rows=4"]
    assert mix.main(argv) == 0
    joined, missing = mix.join_originals(rows, mix.read_rows([metadata]), "caption")
    expected, summary = mix.mix_captions(joined, 1.0, caption_filter=ScoreFilter(top_fraction=0.4))
    table = pq.read_table(out)
    assert table.to_pylist() == expected
    assert table.column_names == ["key", "text", "source", "url"]
    parquet = pq.ParquetFile(out)
    assert [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)] == [4] * 6
    saved = json.loads(mix.summary_path(out).read_text())
    assert {name: saved[name] for name in asdict(summary)} == {**asdict(summary), "missing_original": missing}
    assert (missing, saved["rows_in"], saved["rows_out"]) == (3, 24, 24)
    # p=1: a sample's source is the caption exactly when its caption survived the filter, which ranked every
    # caption of every shard together (ties to the earlier row).
    candidates = [(r["key"], r["caption_clip_score"]) for r in joined if r["caption"]]
    keep = _full_ranking([score for _, score in candidates], 0.4)
    assert {s["key"] for s in expected if s["source"] == "caption"} == {k for (k, _), kept in zip(candidates, keep)
                                                                        if kept}
    assert saved["kept_caption"] == round(0.4 * len(candidates)) and saved["caption_filtered_out"] > 0


def test_mix_over_more_rows_than_a_batch_keeps_every_row_in_order(tmp_path):
    shards = _recaption_shards(tmp_path, [10, 13], gaps=False)
    keys = [row["key"] for row in mix.read_recaptions(shards)]
    out = tmp_path / "clip.parquet"
    assert mix.main([*map(str, shards), f"out={out}", "p=0.5", "batch_rows=3"]) == 0
    parquet = pq.ParquetFile(out)
    assert [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)] == [3] * 7 + [2]
    assert parquet.read().column("key").to_pylist() == keys
    folder = tmp_path / "shards"
    summary = mix.mix_files(list(map(str, shards)), mix.MixSettings(out=str(folder), shard_size=5, batch_rows=3))
    assert summary["shards"] == [f"shard-{i:06d}.tar" for i in range(5)] and summary["rows_out"] == 23
    import tarfile

    written = []
    for name in summary["shards"]:
        with tarfile.open(folder / name) as tar:
            written += list(dict.fromkeys(member.name.split(".")[0] for member in tar.getmembers()))
    assert written == keys


@pytest.mark.parametrize("out_name", ["train.parquet", "shards"])
def test_a_bad_row_in_the_last_shard_leaves_nothing(tmp_path, capsys, out_name):
    shards = _recaption_shards(tmp_path, [8, 8])
    bad = tmp_path / "00002.recaption.jsonl"
    bad.write_text(json.dumps({"key": "000010003", "alt_text": "again", "caption": "c"}) + "\n", encoding="utf-8")
    out = tmp_path / out_name
    assert run_cli(mix.main, [*map(str, shards), str(bad), f"out={out}", "batch_rows=2", "progress=false"]) == 2
    assert "key '000010003' appears again (first in" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.recaption.parquet", "00001.recaption.jsonl",
                                                           "00002.recaption.jsonl"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_on_a_terminal_unless_progress_false(tmp_path, monkeypatch):
    shards = _recaption_shards(tmp_path, [5, 4])
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"id": "r1", "url": "http://x/1.jpg", "alt": "a", "rounds": []}) + "\n")
    commands = {  # one shard is JSONL, so the bars count rows without a total
        "mix pass 2/2": (mix.main, [*map(str, shards), f"out={tmp_path / 'o.parquet'}"]),
        "tasks": (annotate.main, ["next-round", str(records), str(tmp_path / "t.jsonl")]),
    }
    for label, (main, argv) in commands.items():
        for extra, shown in (([], True), (["progress=false"], False)):
            terminal = _Terminal()
            monkeypatch.setattr("sys.stderr", terminal)
            assert main([*argv, *extra]) == 0
            assert (f"{label}: " in terminal.getvalue()) is shown, terminal.getvalue()
    # Not a terminal (a log file, a test's captured output): no bar, whatever the setting.
    piped = io.StringIO()
    monkeypatch.setattr("sys.stderr", piped)
    assert mix.main([*map(str, shards), f"out={tmp_path / 'p.parquet'}"]) == 0
    assert piped.getvalue() == ""
