"""The corpus pipeline with the real tools at both ends: img2dataset downloads photos from a local HTTP server,
`recaption` captions its shards in place, `mix` builds CLIP training shards with the images from the original
tars, and open_clip's own trainer (`python -m open_clip_train.main`, as its README runs it) trains on them.
Counts are checked at every joint; the captioner is a tiny random-weight export (captions are noise)."""

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from altogether import mix
from altogether.cli import run_cli
from altogether.recaption import main as recaption_main
from altogether.tiny import write_tiny_clip

from .conftest import save_tiny_export

PHOTOS, MISSING = 8, 5  # URLs served; the index whose file is missing (a failed download)
PER_SHARD = 4
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def photo_server(tmp_path):
    """A local web server of photos (JPEG, one PNG with transparency); yields the URL of each, one missing."""
    site = tmp_path / "site"
    site.mkdir()
    urls = []
    for i in range(PHOTOS):
        name = f"photo{i}.png" if i == 2 else f"photo{i}.jpg"
        if i != MISSING:
            image = Image.new("RGBA" if i == 2 else "RGB", (48 + 8 * i, 40), (30 * i, 120, 200 - 20 * i, 255))
            image.save(site / name)
        urls.append(name)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield [f"http://127.0.0.1:{server.server_address[1]}/{name}" for name in urls]
    server.shutdown()
    server.server_close()


def test_img2dataset_to_recaption_to_mix_to_open_clip(photo_server, tiny_parts, tiny_model_cfg, tmp_path):
    # 1. img2dataset, as its README runs it: a Parquet URL list with captions, webdataset output.
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": photo_server, "caption": [f"product ZX-{i:03d} on sale" for i in range(PHOTOS)]}),
                   url_list)
    downloads = tmp_path / "downloads"
    command = ["img2dataset", "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url",
               "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(downloads),
               "--processes_count", "1", "--thread_count", "4", "--image_size", "64",
               "--number_sample_per_shard", str(PER_SHARD), "--enable_wandb", "False"]
    done = subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = [json.loads(p.read_text()) for p in sorted(downloads.glob("*_stats.json"))]
    assert [s["successes"] for s in stats] == [4, 3] and sum(s["failed_to_download"] for s in stats) == 1

    # 2. recaption into the download folder itself: one output per tar, beside img2dataset's own Parquet.
    export = save_tiny_export(tmp_path / "export", tiny_parts, tiny_model_cfg, max_new_tokens=6, do_sample=False)
    assert run_cli(recaption_main, [str(export), str(downloads), str(downloads), "num_workers=0", "batch_size=4",
                                    "progress_bar=false"]) == 0
    summary = json.loads((downloads / "summary.json").read_text())
    assert summary["shards"]["written"] == 2 and summary["samples"]["captioned"] == 7
    outputs = sorted(downloads.glob("*.recaption.parquet"))
    assert [p.name for p in outputs] == ["00000.recaption.parquet", "00001.recaption.parquet"]
    rows = [row for p in outputs for row in pq.read_table(p).to_pylist()]
    served = {url: f"product ZX-{i:03d} on sale" for i, url in enumerate(photo_server) if i != MISSING}
    assert sorted((r["url"], r["alt_text"]) for r in rows) == sorted(served.items())  # each row names its image

    # 3. mix: every sample synthetic-or-alt, the images taken from the original tars by shard and key.
    shards = tmp_path / "clip_train"
    argv = [*map(str, outputs), f"originals={downloads}/?????.parquet", "alt_column=caption",
            f"images_from={downloads}", "p=0.5", f"out={shards}"]
    assert mix.main(argv) == 0
    with tarfile.open(shards / "shard-000000.tar") as tar:
        members = tar.getnames()
    assert sum(name.endswith(".jpg") for name in members) == 7 and sum(name.endswith(".txt") for name in members) == 7

    # 4. open_clip's trainer on the mixed shards: one step over all 7 samples.
    clip = write_tiny_clip(tmp_path / "clip")
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "webdataset",
               "--train-data", str(shards / "shard-000000.tar"), "--train-num-samples", "7", "--batch-size", "7",
               "--epochs", "1", "--workers", "0", "--model", f"local-dir:{clip}", "--precision", "fp32",
               "--lr", "1e-3", "--warmup", "1", "--save-frequency", "0", "--report-to", "", "--logs", str(logs),
               "--name", "run", "--log-every-n-steps", "1"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = re.findall(r"Train Epoch: 0 \[(\d+)/7 .*? Loss: ([0-9.]+)", (logs / "run" / "out.log").read_text())
    assert [seen for seen, _ in steps] == ["7"]  # every sample read, none dropped by open_clip's filter
    assert 0.0 < float(steps[0][1]) < 10.0
