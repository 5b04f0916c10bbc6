"""Peak memory and wall time of ``altogether mix`` and ``altogether annotate`` on many rows.

Writes ``--rows`` recaption-output rows through recaption's own writer (``write_shard_output`` with
``output_schema``: key, url, alt_text, caption, caption_clip_score, as a best-of-N run writes them) in
``--shard-rows`` rows per shard, with paper-like lengths: alt-texts about 13 words (a tenth empty), captions
about 90 words. The annotation side is a records JSONL of the same number of records (alt-text, rounds 2 and 3
of about 90 words each) and one completed round-4 task per record. Each command then runs in its own child
process (its ``main``), timed, its peak RSS read from the kernel (``wait4``'s ``ru_maxrss``):

* ``mix``: ``mix`` to Parquet; ``mix_top``: the same keeping the top half of captions by CLIP score
  (``caption_top=0.5``);
* ``next_round``, ``merge``: ``annotate next-round`` and ``annotate merge``.

Loading the modules (torch among them, through the CLIP scorer) costs most of a child's memory whatever the
rows, so each line also says how much the peak rose after the imports, and the wall time is the command's own.
The commands run from the current folder's ``altogether`` (``python -c``), so ``cd`` into another checkout
to measure its code with the same data.

Prints one line per command, then one JSON object as its last line.

    uv run python benchmarks/bench_mix.py --rows 200000
    uv run python benchmarks/bench_mix.py --rows 50000 --cases mix,mix_top
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from altogether.annotate import make_tasks
from altogether.recaption import RecaptionSettings, output_path, output_schema, write_shard_output

WORDS = ("a the photo of red blue green small large wooden table chair cat dog sofa window light shadow street "
         "building tree sky cloud person woman man child holding standing sitting near behind front background "
         "white black grey bright dark old new shop sale price logo text sign label bottle cup plate").split()
STAMP = "2024-06-01T12:00:00Z"


def words(rng: random.Random, mean: float, spread: float) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.gauss(mean, spread)))))


def write_recaptions(folder: Path, rows: int, shard_rows: int, seed: int = 0) -> list[str]:
    """Recaption outputs of ``rows`` images in shards of ``shard_rows``, written as recaption writes them."""
    rng = random.Random(seed)
    settings = RecaptionSettings(num_candidates=4)
    schema = output_schema(settings)
    paths = []
    for shard, start in enumerate(range(0, rows, shard_rows)):
        batch = [{"key": f"{shard:05d}{i:04d}", "url": f"https://example.com/images/{shard:05d}/{i:04d}.jpg",
                  "alt_text": "" if rng.random() < 0.1 else words(rng, 13, 6), "caption": words(rng, 90, 25),
                  "caption_clip_score": round(rng.uniform(15, 40), 2)}
                 for i in range(min(shard_rows, rows - start))]
        paths.append(str(write_shard_output(output_path(folder, f"{shard:05d}", "parquet"), batch, schema)))
    return paths


def write_annotations(folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """A records JSONL (alt-text, rounds 2 and 3) and the completed round-4 task of every record."""
    rng = random.Random(seed)
    records_path, tasks_path = folder / "records.jsonl", folder / "tasks.jsonl"
    with records_path.open("w", encoding="utf-8") as records, tasks_path.open("w", encoding="utf-8") as tasks:
        for i in range(rows):
            rounds = [{"round": n, "caption": words(rng, 90, 25), "annotator": "ann-1", "vendor": "A",
                       "timestamp": STAMP} for n in (2, 3)]
            record = {"id": f"r{i:08d}", "url": f"https://example.com/{i}.jpg", "alt": words(rng, 13, 6),
                      "rounds": rounds}
            records.write(json.dumps(record) + "\n")
            (task,) = make_tasks([record])
            task.update(caption=task["caption"] + " Edited.", annotator="ann-2", vendor="B", timestamp=STAMP)
            tasks.write(json.dumps(task) + "\n")
    return records_path, tasks_path


# Runs in the child: times the import and the command apart, and notes the peak RSS once the modules are loaded.
CHILD = """
import importlib, json, resource, sys, time
start = time.perf_counter()
module = importlib.import_module(sys.argv[1])
loaded, rss = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = module.main(sys.argv[3:])
json.dump({"code": code, "import_s": loaded - start, "import_rss_kb": rss, "work_s": time.perf_counter() - loaded},
          open(sys.argv[2], "w"))
"""


def measure(name: str, module: str, argv: list[str]) -> dict:
    """Run ``module.main(argv)`` in a child (``python -c``, so the current folder's ``altogether``): the command's
    own wall time, the peak RSS of the whole child (``wait4``), and how much of it came after the imports."""
    with tempfile.TemporaryFile() as stderr, tempfile.NamedTemporaryFile(suffix=".json") as report:
        child = subprocess.Popen([sys.executable, "-c", CHILD, module, report.name, *argv], stdout=subprocess.DEVNULL,
                                 stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status):
            stderr.seek(0)
            raise SystemExit(f"{name}: exit {os.waitstatus_to_exitcode(status)}\n"
                             f"{stderr.read().decode(errors='replace')[-2000:]}")
        timing = json.loads(Path(report.name).read_text())
    result = {"name": name, "wall_s": round(timing["work_s"], 2), "import_s": round(timing["import_s"], 1),
              "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
              "above_import_mb": round((usage.ru_maxrss - timing["import_rss_kb"]) / 1024, 1)}
    print(f"{name:<12} {result['wall_s']:>8.2f} s  peak {result['peak_rss_mb']:>7.1f} MB  "
          f"above the imports {result['above_import_mb']:>7.1f} MB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--cases", default="mix,mix_top,next_round,merge", help="which commands to run")
    args = parser.parse_args()
    cases = args.cases.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "out").mkdir()
        shards = write_recaptions(folder / "out", args.rows, args.shard_rows)
        sizes = {"recaption_mb": round(sum(os.path.getsize(p) for p in shards) / 2**20, 1)}
        records = tasks = folder / "not written"
        if {"next_round", "merge"} & set(cases):
            records, tasks = write_annotations(folder, args.rows)
            sizes["records_mb"] = round(records.stat().st_size / 2**20, 1)
        print(f"{args.rows} rows in {len(shards)} shard(s); {sizes}", flush=True)
        commands = {
            "mix": ("altogether.mix", [*shards, f"out={folder / 'mixed.parquet'}"]),
            "mix_top": ("altogether.mix", [*shards, f"out={folder / 'top.parquet'}", "caption_top=0.5"]),
            "next_round": ("altogether.annotate", ["next-round", str(records), str(folder / "next.jsonl")]),
            "merge": ("altogether.annotate", ["merge", str(records), str(tasks), str(folder / "merged.jsonl")]),
        }
        results = [measure(name, *commands[name]) for name in cases]
    print(json.dumps({"rows": args.rows, "shards": len(shards), **sizes, "results": results}))


if __name__ == "__main__":
    main()
