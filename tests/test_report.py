"""The HTML report: escaping, diff markup, and a real render by headless Chromium."""

import base64
import re
import shutil
import subprocess

import pytest
from PIL import Image

from altogether.report import Example, highlight_diff, render_report, write_report

METRICS = {
    "w/ alt": {"CLIPScore": 33.3, "BLEU-1": 49.6, "METEOR": 21.9, "NP-F1": None},
    "w/o alt": {"CLIPScore": 32.4, "BLEU-1": 45.7, "METEOR": None, "NP-F1": None},
}
HOSTILE = "<script>alert('x')</script> & \"quoted\""


def make_examples(n=4):
    colours = [(220, 30, 30), (30, 30, 220), (30, 180, 30), (240, 200, 20)]
    return [
        Example(
            id=f"record-{i}",
            image=Image.new("RGB", (320, 200), colours[i % 4]),
            alt_text=f"Photo {i} of a brown dog" + (f" {HOSTILE}" if i == 0 else ""),
            reference="A brown dog runs on green grass next to a wooden fence.",
            captions={
                "w/ alt": "A brown dog runs on the grass next to a fence.",
                "w/o alt": "A black dog sits on green grass." + (f" {HOSTILE}" if i == 0 else ""),
            },
            extra={"CLIPScore": "31.2"},
        )
        for i in range(n)
    ]


def test_diff_marks_insertions_and_deletions():
    marked = highlight_diff("a brown dog on grass", "A black dog on grass!")
    assert marked == "A <del>brown</del> <ins>black</ins> dog on grass!"
    assert highlight_diff("same words here", "Same words, here.") == "Same words, here."
    assert highlight_diff("a dog", "a dog <b>") == "a dog <ins>&lt;b&gt;</ins>"


def test_all_text_is_escaped(tmp_path):
    examples = make_examples(1)
    path = write_report(
        tmp_path / "r.html", METRICS, examples, title=f"Run {HOSTILE}", meta={"model": HOSTILE, "seed": 0}
    )
    text = path.read_text(encoding="utf-8")
    assert "<script>" not in text and "alert('x')" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in text
    # Diff markup survives around escaped text; missing metrics say n/a instead of a number.
    assert "<del>brown</del> <ins>black</ins>" in text
    assert text.count('class="na"') == 3


def test_write_is_atomic_and_self_contained(tmp_path):
    path = write_report(tmp_path / "sub" / "report.html", METRICS, make_examples(2), title="t", meta={})
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left behind
    text = path.read_text(encoding="utf-8")
    assert len(re.findall(r'src="data:image/jpeg;base64,', text)) == 2
    assert not re.search(r'(src|href)="(?!data:)', text), "no external assets"


def test_figures_are_embedded(tmp_path):
    png = tmp_path / "curve.png"
    Image.new("RGB", (10, 10), "white").save(png)
    text = render_report(METRICS, [], title="t", meta={}, figures={"training curves": png})
    encoded = base64.b64encode(png.read_bytes()).decode("ascii")
    assert f"data:image/png;base64,{encoded}" in text and "training curves" in text


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (Debian package `chromium`)")
def test_chromium_renders_report(tmp_path):
    path = write_report(tmp_path / "report.html", METRICS, make_examples(), title="Render test", meta={"seed": 0})
    shot = tmp_path / "shot.png"
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
        "--window-size=1280,1400", "--hide-scrollbars", path.as_uri(),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert shot.exists(), f"no screenshot (exit {run.returncode}): {run.stderr[-2000:]}"
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1280, 1400)
        pixels = list(image.convert("RGB").getdata())
    non_blank = sum(1 for p in pixels if p != (255, 255, 255))
    assert non_blank > 0.05 * len(pixels), f"only {non_blank} non-white pixels"
    # The embedded thumbnails were drawn: plenty of strongly red and strongly blue pixels.
    red = sum(1 for r, g, b in pixels if r > 180 and g < 80 and b < 80)
    blue = sum(1 for r, g, b in pixels if b > 180 and r < 80 and g < 80)
    assert red > 5000 and blue > 5000
