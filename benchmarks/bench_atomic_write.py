"""What an atomic write costs in a crowded folder: :func:`altogether.io.atomic_write_text` in a folder of
``--files`` files, against the same writes in an empty folder.

A recaption OUTPUT of 10,000 shards holds 20,000 files (each shard's ``NNNNN.recaption.parquet`` and its
``.stats.json``), and every shard finished writes two more there. Each write removes the temporaries that
writers now dead left for its target (``.NAME.<host>-<pid>.XXXX.tmp``), which needs to know which exist: this
measures that cost per write, the whole write (temporary file, fsync, rename) and the sweep alone, in the
temporary folder's filesystem (``--dir`` for another, a network filesystem say).

Prints one line per folder, then one JSON object as its last line.

    uv run python benchmarks/bench_atomic_write.py --files 20000 --writes 500
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from altogether import io as aio

STATS = json.dumps({"shard": "00000", "samples": {"captioned": 1000, "unreadable image": 3}}, indent=2)


def crowd(folder: Path, files: int) -> None:
    """``files`` files named as recaption's outputs and stats are, in pairs."""
    for i in range(files // 2):
        (folder / f"{i:05d}.recaption.parquet").write_bytes(b"PAR1")
        (folder / f"{i:05d}.recaption.stats.json").write_text("{}")


def per_write(folder: Path, writes: int) -> dict[str, float]:
    """Milliseconds of this process's first write into ``folder``, then medians over ``writes`` more new targets of
    a whole write and of the sweep alone (what :func:`aio.atomic_open` does before it creates its temporary file,
    timed again right after the write)."""
    started = time.perf_counter()
    aio.atomic_write_text(folder / "first.recaption.stats.json", STATS)
    first = time.perf_counter() - started
    whole, sweep = [], []
    for i in range(writes):
        target = folder / f"new-{i:05d}.recaption.stats.json"
        started = time.perf_counter()
        aio.atomic_write_text(target, STATS)
        whole.append(time.perf_counter() - started)
        started = time.perf_counter()
        aio.sweep_dead_temporaries(target)
        sweep.append(time.perf_counter() - started)
    return {"first_write_ms": 1e3 * first, "write_ms": 1e3 * statistics.median(whole),
            "sweep_ms": 1e3 * statistics.median(sweep)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20000, help="files already in the crowded folder")
    parser.add_argument("--writes", type=int, default=500, help="writes timed in each folder")
    parser.add_argument("--dir", type=Path, default=None, help="where to make the folders (default: TMPDIR)")
    args = parser.parse_args()
    result = {"files": args.files, "writes": args.writes}
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        for label, files in (("empty", 0), ("crowded", args.files)):
            folder = Path(root) / label
            folder.mkdir()
            crowd(folder, files)
            result[label] = {k: round(v, 4) for k, v in per_write(folder, args.writes).items()}
            r = result[label]
            print(f"{label:8s} ({files} files): first write {r['first_write_ms']:.3f} ms; then {r['write_ms']:.3f} "
                  f"ms a write, the sweep alone {r['sweep_ms']:.3f} ms (medians of {args.writes})", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
