"""Recaptioning at scale: shards -> one output per shard, resume after SIGKILL, 2-process DDP, best-of-N,
several captions, bad input, manifests and folders. A tiny random-weight export; greedy unless sampling is
the point."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from altogether import Recaptioner
from altogether.cli import run_cli
from altogether.clip_score import ClipScorer
from altogether.config import ConfigError
from altogether.data.inputs import discover_shards
from altogether.layout import build_prompt
from altogether.model import causal_lm
from altogether.recaption import choose_captions, length_sorted_batches, main, recaption_shards
from altogether.tiny import web_images, write_metaclip_shards
from tests.conftest import COLOURS, SHAPES, draw, save_tiny_export

ROOT = Path(__file__).resolve().parent.parent
RUN = {"num_workers": 0, "batch_size": 2, "progress_bar": False}  # 5 samples a shard -> 3 batches
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    draw(list(COLOURS)[i % 4], SHAPES[(i // 4) % 2], seed=i).save(buffer, "PNG")
    return buffer.getvalue()


def alt_members(i: int) -> tuple[dict[str, bytes], list[str]]:
    """The four ways a webdataset sample carries its alt-text (or none), and the alt-texts meant."""
    kind = i % 4
    if kind == 0:  # MetaCLIP: several alt-texts
        alts = [f"zorbit K-{i} for sale", "IMG_2231.jpg"]
        return {"json": json.dumps({"texts": alts}).encode()}, alts
    if kind == 1:  # img2dataset
        return {"json": json.dumps({"caption": f"photo of the product zorbit K-{i}", "url": "x"}).encode()}, [
            f"photo of the product zorbit K-{i}"]
    if kind == 2:
        return {"txt": f"a photo of {i}".encode()}, [f"a photo of {i}"]
    return {}, []


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def export(tiny_parts, tiny_model_cfg, tmp_path_factory):
    return save_tiny_export(tmp_path_factory.mktemp("rc") / "export", tiny_parts, tiny_model_cfg, max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 tar shards of 5 samples; returns (brace pattern, {key: (image bytes, alt-texts)}, keys per shard)."""
    folder = tmp_path_factory.mktemp("shards")
    truth, order = {}, {}
    for s in range(3):
        samples = []
        for j in range(5):
            i = 5 * s + j
            members, alts = alt_members(i)
            key = f"s{s}-{j:03d}"
            samples.append((key, {"png": png(i), **members}))
            truth[key] = (png(i), alts)
        write_tar(folder / f"{s:05d}.tar", samples)
        order[f"{s:05d}"] = [k for k, _ in samples]
    return str(folder / "{00000..00002}.tar"), truth, order


@pytest.fixture(scope="module")
def reference(export, shards, tmp_path_factory):
    """An uninterrupted single-process run: (output folder, summary)."""
    out = tmp_path_factory.mktemp("reference")
    return out, recaption_shards(export, shards[0], out, **RUN)


def rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return pq.read_table(path).to_pylist()


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "summary.json"}


def test_end_to_end_one_output_per_shard_equal_to_the_recaptioner(export, shards, reference):
    pattern, truth, order = shards
    out, summary = reference
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"0000{i}.recaption.{kind}" for i in range(3) for kind in ("parquet", "stats.json")] + ["summary.json"])
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["shards"] == {"total": 3, "written": 3, "not_written": 0, "pending": 0, "with_read_errors": 0}
    assert summary["samples"] == {"captioned": 15, "bad": 0, "failed_downloads": 0, "bad_not_listed": 0}
    assert summary["bad_samples"] == [] and summary["shards_without_stats"] == []
    assert summary["run"]["images_per_s"] > 0 and summary["run"]["world_size"] == 1
    assert summary["run"]["shards_written"] == 3 and summary["run"]["images"] == 15
    captioner = Recaptioner.from_pretrained(export, device="cpu")
    for shard, keys in order.items():
        got = rows(out / f"{shard}.recaption.parquet")
        assert [r["key"] for r in got] == keys  # input order, although batches were sorted by prompt length
        assert list(got[0]) == ["key", "url", "alt_text", "caption"]
        assert [r["alt_text"] for r in got] == [build_prompt(truth[k][1]) for k in keys]
        images = [Image.open(io.BytesIO(truth[k][0])) for k in keys]
        expected = captioner.recaption(images, [truth[k][1] for k in keys], batch_size=2)
        assert [r["caption"] for r in got] == expected
    assert "zorbit K-0 for sale; IMG_2231.jpg" in {r["alt_text"] for r in rows(out / "00000.recaption.parquet")}
    assert len({r["caption"] for s in order for r in rows(out / f"{s}.recaption.parquet")}) > 1


def test_resume_after_sigkill_mid_shard_matches_an_uninterrupted_run(export, shards, reference, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "paused"
    args = [str(export), shards[0], str(out), *(f"{k}={v}" for k, v in RUN.items())]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "recaption_pause.py"), str(marker), *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never reached the middle of its second shard"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert "in memory: ['00001']" in marker.read_text()
    # the half-done shard left nothing but its claim, which the resumed run takes over (its worker is dead)
    assert sorted(p.name for p in out.iterdir()) == [".claims", "00000.recaption.parquet",
                                                     "00000.recaption.stats.json"]
    (out / ".00001.recaption.parquet.abc123.tmp").write_bytes(b"half")  # as if killed while renaming

    summary = recaption_shards(export, shards[0], out, **RUN)
    assert summary["run"]["shards_written"] == 2 and summary["run"]["images"] == 10
    assert summary["shards"]["written"] == 3 and summary["samples"]["captioned"] == 15  # the whole output
    assert outputs(out) == outputs(reference[0])  # byte-identical files
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_summary_half_written_by_a_killed_run_is_removed_by_the_next_run(export, shards, reference, tmp_path):
    """A kill while the summary was written leaves ``.summary.json.XXXX.tmp`` and the killed worker's lease. The
    rerun removes the temporary at once when that worker's process is gone from this machine, and leaves it
    while another worker that may be writing it is alive (its lease renewed, its process running)."""
    from dataclasses import asdict

    from altogether.claims import Worker, machine_id
    from altogether.io import process_start

    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    leases = out / ".claims" / "workers"
    leases.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = Worker(f"node-{gone.stdout.strip()}-dead", machine_id(), int(gone.stdout), "1")
    (leases / killed.lease).write_text(json.dumps(asdict(killed)))
    half = out / ".summary.json.k1ll3d.tmp"

    alive = Worker(f"node-{os.getpid()}-live", machine_id(), os.getpid(), process_start(os.getpid()))
    (leases / alive.lease).write_text(json.dumps(asdict(alive)))
    half.write_text('{"samples": {"capt')
    recaption_shards(export, shards[0], out, **RUN)
    assert half.exists()  # the live worker's, perhaps

    (leases / alive.lease).unlink()
    summary = recaption_shards(export, shards[0], out, **RUN)
    assert not half.exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert summary["shards"]["written"] == 3 and summary["samples"]["captioned"] == 15
    assert json.loads((out / "summary.json").read_text()) == summary


def test_two_cpu_processes_cover_every_shard_exactly_once(export, shards, reference, tmp_path):
    out = tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-m", "altogether.recaption", str(export), shards[0], str(out),
                           "accelerator=cpu", "devices=2", "strategy=ddp",
                           *(f"{k}={v}" for k, v in RUN.items())],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("recaptioned 15 images") == 1  # one line, from rank 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["world_size"] == 2
    written = [r["shards_written"] for r in summary["run"]["ranks"]]
    assert sorted(written[0] + written[1]) == ["00000", "00001", "00002"]  # each once, none twice
    assert written[0] and written[1]
    assert summary["samples"]["captioned"] == 15
    assert outputs(out) == outputs(reference[0])


def test_best_of_n_keeps_the_highest_clip_score(export, shards, tmp_path):
    pattern, truth, order = shards
    out = tmp_path / "best"
    summary = recaption_shards(export, pattern.replace("{00000..00002}", "00001"), out, **RUN, num_candidates=3,
                               do_sample=True, temperature=1.5, save_candidates=True, output_format="jsonl")
    assert summary["samples"]["captioned"] == 5
    scorer = ClipScorer.from_open_clip(f"local-dir:{export / 'encoder'}")  # the captioner's own encoder
    got = rows(out / "00001.recaption.jsonl")
    assert [r["key"] for r in got] == order["00001"]
    for r in got:
        assert len(r["candidates"]) == 3
        image = Image.open(io.BytesIO(truth[r["key"]][0])).convert("RGB")
        scores = scorer.score([image] * 3, r["candidates"])
        best = int(torch.argmax(scores.cosine))
        assert r["caption"] == r["candidates"][best]
        assert r["candidate_scores"] == pytest.approx(scores.clip_score.tolist(), abs=1e-3)
        assert r["caption_clip_score"] == pytest.approx(float(scores.clip_score[best]), abs=1e-3)
    assert any(len(set(r["candidates"])) > 1 for r in got)  # there was a real choice to make


def test_several_captions_per_image_are_a_list_reproducible_by_seed(export, shards, tmp_path):
    pattern = shards[0].replace("{00000..00002}", "00000")
    settings = {**RUN, "num_captions": 2, "do_sample": True, "temperature": 1.5, "output_format": "jsonl"}
    recaption_shards(export, pattern, tmp_path / "a", **settings)
    recaption_shards(export, pattern, tmp_path / "b", **settings)
    got = rows(tmp_path / "a" / "00000.recaption.jsonl")
    assert all(isinstance(r["caption"], list) and len(r["caption"]) == 2 for r in got)
    assert any(r["caption"][0] != r["caption"][1] for r in got)
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")


def test_bad_samples_and_truncated_tars_are_counted_and_listed(export, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = {"png": png(0), "json": b'{"texts": ["a red square"]}'}
    write_tar(src / "mixed.tar", [("ok", good), ("badjson", {"png": png(1), "json": b'{"texts": [oops'}),
                                  ("badimage", {"jpg": b"not an image", "txt": b"x"}),
                                  ("noimage", {"json": b'{"caption": "lost"}'}), ("ok2", good)])
    full = write_tar(tmp_path / "full.tar", [(f"k{i}", {"png": png(i), "txt": b"alt"}) for i in range(4)])
    data = full.read_bytes()
    offsets = {m.name: m.offset for m in tarfile.open(full).getmembers()}  # header offset of each member
    (src / "cut_in_data.tar").write_bytes(data[: offsets["k2.png"] + 512 + 10])  # inside k2's image bytes
    (src / "cut_at_header.tar").write_bytes(data[: offsets["k2.png"]])  # exactly before k2's header

    out = tmp_path / "out"
    summary = recaption_shards(export, str(src), out, **RUN)
    assert summary["shards"]["written"] == 3 and summary["shards"]["with_read_errors"] == 2
    reasons = {(b["shard"], b["key"]): b["reason"] for b in summary["bad_samples"]}
    assert set(reasons) == {("mixed", "badjson"), ("mixed", "badimage"), ("mixed", "noimage"),
                            ("cut_at_header", "k1"), ("cut_in_data", "k2")}
    assert "broken JSON" in reasons["mixed", "badjson"] and "unreadable image" in reasons["mixed", "badimage"]
    assert "no image member" in reasons["mixed", "noimage"] and "incomplete" in reasons["cut_at_header", "k1"]
    assert "incomplete" in reasons["cut_in_data", "k2"]  # the sample being read when the data ended
    assert summary["samples"] == {"captioned": 5, "bad": 5, "failed_downloads": 0, "bad_not_listed": 0}
    errors = {e["shard"]: e["error"] for e in summary["shard_errors"]}
    assert "'k2.png'" in errors["cut_in_data"] and "unexpected end of data" in errors["cut_in_data"]
    assert "end-of-archive" in errors["cut_at_header"]
    assert [r["key"] for r in rows(out / "mixed.recaption.parquet")] == ["ok", "ok2"]
    assert [r["key"] for r in rows(out / "cut_in_data.recaption.parquet")] == ["k0", "k1"]  # readable part kept
    assert [r["key"] for r in rows(out / "cut_at_header.recaption.parquet")] == ["k0"]

    listed = recaption_shards(export, str(src), tmp_path / "capped", **RUN, max_listed_bad=1)
    assert len(listed["bad_samples"]) == 1 and listed["samples"]["bad_not_listed"] == 4


def test_metaclip_shards_are_recaptioned_with_their_alt_texts(export, tmp_path):
    """MetaCLIP's layout: <shard % 100>/<shard>.tar with <uuid>.json + <uuid>.jpeg, texts as [source, text]."""
    images = web_images(6)
    write_metaclip_shards(tmp_path / "metaclip", images, shards=2)
    pattern = str(tmp_path / "metaclip" / "*" / "*.tar")
    in_order = images[0::2] + images[1::2]  # shard 0, then shard 1
    summary = recaption_shards(export, pattern, tmp_path / "all", **RUN)
    assert summary["samples"] == {"captioned": 6, "bad": 0, "failed_downloads": 0, "bad_not_listed": 0}
    got = rows(tmp_path / "all" / "0.recaption.parquet") + rows(tmp_path / "all" / "1.recaption.parquet")
    assert [r["key"] for r in got] == [image.uuid for image in in_order]
    assert [r["alt_text"] for r in got] == [build_prompt([text for _, text in image.texts]) for image in in_order]
    assert any(image.title and image.title in r["alt_text"] for image, r in zip(in_order, got))

    recaption_shards(export, pattern, tmp_path / "alt", **RUN, alt_text_sources=["alt"])
    got = rows(tmp_path / "alt" / "0.recaption.parquet") + rows(tmp_path / "alt" / "1.recaption.parquet")
    assert [r["alt_text"] for r in got] == [image.alt for image in in_order]


def test_a_shard_with_nothing_captioned_gets_no_output_and_is_retried(export, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "good.tar", [(f"g{i}", {"png": png(i), "txt": b"alt"}) for i in range(2)])
    write_tar(src / "allbad.tar", [(f"b{i}", {"jpg": b"not an image", "txt": b"alt"}) for i in range(3)])
    out = tmp_path / "out"
    args = [str(export), str(src), str(out), *(f"{k}={v}" for k, v in RUN.items())]
    for run in range(2):
        assert run_cli(main, args) == 1  # not done: a shard is left to retry
        assert "1 shard(s) not written: nothing in them could be captioned" in capsys.readouterr().out
        assert sorted(p.name for p in out.iterdir()) == ["allbad.recaption.stats.json", "good.recaption.parquet",
                                                         "good.recaption.stats.json", "summary.json"]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["shards"] == {"total": 2, "written": 1, "not_written": 1, "pending": 0, "with_read_errors": 1}
        assert summary["run"]["shards_written"] == 1 - run
        assert summary["samples"]["bad"] == 3  # the rerun read the failed shard again
        assert summary["shard_errors"] == [{"shard": "allbad", "error": "nothing could be captioned (3 bad "
                                            "sample(s)); no output written, a rerun retries the shard"}]


def test_manifests_and_image_folders(export, tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "sub/c.png"]):
        draw(list(COLOURS)[i], "square", seed=i).save(images / name)
    (images / "a.txt").write_text("zorbit K-12 for sale\n")
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    lines = [json.dumps({"key": "m0", "img_path": "images/a.png", "alt": ["zorbit K-12 for sale", "IMG_2231.jpg"]}),
             "{broken", json.dumps({"key": "m1", "img_path": "images/missing.png", "alt": "x"}),
             json.dumps({"key": "m2", "img_path": "images/sub/c.png", "alt": None})]
    (tmp_path / "part0.jsonl").write_text("\n".join(lines) + "\n")

    manifest = recaption_shards(export, str(tmp_path / "part0.jsonl"), tmp_path / "from_jsonl", **RUN)
    got = rows(tmp_path / "from_jsonl" / "part0.recaption.parquet")
    assert [(r["key"], r["alt_text"]) for r in got] == [("m0", "zorbit K-12 for sale; IMG_2231.jpg"), ("m2", "")]
    assert {b["key"] for b in manifest["bad_samples"]} == {"line 2", "m1"}
    assert "image file not found" in next(b["reason"] for b in manifest["bad_samples"] if b["key"] == "m1")

    folder = recaption_shards(export, str(images), tmp_path / "from_folder", **RUN, shard_size=2)
    assert sorted(p.name for p in (tmp_path / "from_folder").glob("*.parquet")) == [
        "images-00000.recaption.parquet", "images-00001.recaption.parquet"]
    got = rows(tmp_path / "from_folder" / "images-00000.recaption.parquet")
    assert [(r["key"], r["alt_text"]) for r in got] == [("a", "zorbit K-12 for sale"), ("b", "")]
    assert [b["key"] for b in folder["bad_samples"]] == ["broken"]
    with pytest.raises(ValueError, match="no column 'alt_texts'"):
        recaption_shards(export, str(tmp_path / "part0.jsonl"), tmp_path / "x", **RUN, alt_key="alt_texts")


def test_decoding_uses_the_kv_cache_on_length_sorted_batches(export, shards, tmp_path):
    captioner = Recaptioner.from_pretrained(export, device="cpu")
    lengths: list[int] = []

    def record(module, args, kwargs):
        given = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        lengths.append(given.shape[1])

    hook = causal_lm(captioner.model.decoder).register_forward_pre_hook(record, with_kwargs=True)
    try:
        recaption_shards(captioner, shards[0].replace("{00000..00002}", "00000"), tmp_path, **RUN)
    finally:
        hook.remove()
    firsts = [n for n in lengths if n > 1]
    assert len(firsts) == 3  # one full-prompt pass per batch; every later step feeds a single new token
    assert firsts == sorted(firsts, reverse=True)  # longest prompts first
    assert lengths.count(1) == len(lengths) - 3 > 0


def test_length_sorted_batches_and_caption_choice():
    assert length_sorted_batches([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    assert length_sorted_batches([], 4) == [[]]
    assert choose_captions(["a", "b", "c"], [0.1, 0.5, 0.3], 1) == [1]
    assert choose_captions(["a", "a", "b"], [0.9, 0.8, 0.1], 2) == [0, 2]  # distinct texts before repeats
    assert choose_captions(["a", "a"], [0.2, 0.9], 2) == [1, 0]  # too few distinct: topped up with repeats
    assert choose_captions(["x", "y"], None, 2) == [0, 1]


def test_input_discovery_errors(tmp_path):
    write_tar(tmp_path / "00000.tar", [("k", {"png": png(0)})])
    with pytest.raises(FileNotFoundError, match="1 of 2 input file"):
        discover_shards(str(tmp_path / "{00000..00001}.tar"))
    (tmp_path / "b").mkdir()
    write_tar(tmp_path / "b" / "00000.tar", [("k", {"png": png(0)})])
    with pytest.raises(ValueError, match="share the name '00000'"):
        discover_shards(str(tmp_path / "{.,b}/00000.tar"))
    assert [s.name for s in discover_shards(str(tmp_path))] == ["00000"]  # a folder of tars


@pytest.mark.parametrize("args, message", [
    (["colour=red"], "colour"),
    (["num_captions=2"], "need sampling"),
    (["num_candidates=2", "num_captions=3", "do_sample=true"], "num_candidates=2 < num_captions=3"),
    (["save_candidates=true"], "needs num_candidates > 1"),
    (["num_candidates=3"], "num_candidates=3: 3 captions per image need sampling"),
    (["temperature=0", "do_sample=true"], "temperature must be > 0"),
    (["num_beams=2", "repetition_penalty=1.2"], "with num_beams=2"),
    (["max_new_tokens=400"], "max_position_embeddings=512; set max_new_tokens <= 380"),  # from the export's config
])
def test_cli_settings_errors_are_one_line(export, shards, tmp_path, capsys, args, message):
    assert run_cli(main, [str(export), shards[0], str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError):
        main([str(export), shards[0]])


def test_every_image_keeps_its_identity(export, tmp_path):
    """A folder with cat.jpg, cat.png and cat.txt; a tar holding a member twice (after `tar rf`); a manifest
    repeating a key: keys are unique in every output and no image gets another's alt-text without a listed reason."""
    folder = tmp_path / "photos"
    folder.mkdir()
    draw("red", "square").save(folder / "cat.jpg")
    draw("blue", "square").save(folder / "cat.png")
    (folder / "cat.txt").write_text("zorbit K-1 for sale")
    draw("green", "square").save(folder / "dog.jpg")
    draw("green", "square").save(folder / "dog.png")
    (folder / "dog.png.txt").write_text("the png's own alt")
    draw("red", "square").save(folder / "emu.png")
    (folder / "emu.txt").write_text("emu alt")
    summary = recaption_shards(export, str(folder), tmp_path / "f", **RUN)
    got = rows(tmp_path / "f" / "photos-00000.recaption.parquet")
    assert [(r["key"], r["alt_text"]) for r in got] == [("dog.jpg", ""), ("dog.png", "the png's own alt"),
                                                        ("emu", "emu alt")]
    assert {b["key"]: b["reason"] for b in summary["bad_samples"]} == {
        key: "alt-text file cat.txt could belong to several images named cat.*; rename it " + key + ".txt"
        for key in ("cat.jpg", "cat.png")}

    src = tmp_path / "tars"
    src.mkdir()
    write_tar(src / "00000.tar", [("k0", {"png": png(0), "txt": b"first"}), ("k1", {"png": png(1), "txt": b"b"})])
    with tarfile.open(src / "00000.tar", "a") as tar:  # what `tar rf` does
        for ext, data in (("png", png(2)), ("txt", b"second")):
            info = tarfile.TarInfo(f"k0.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    summary = recaption_shards(export, str(src), tmp_path / "t", **RUN)
    assert [(r["key"], r["alt_text"]) for r in rows(tmp_path / "t" / "00000.recaption.parquet")] == [("k0", "first"),
                                                                                          ("k1", "b")]
    assert summary["samples"]["bad"] == 1 and "appears again" in summary["bad_samples"][0]["reason"]

    lines = [{"key": "m0", "img_path": "photos/emu.png", "alt": "one"}, {"key": "m0", "img_path": "photos/cat.png"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = recaption_shards(export, str(tmp_path / "m.jsonl"), tmp_path / "m", **RUN)
    assert [(r["key"], r["alt_text"]) for r in rows(tmp_path / "m" / "m.recaption.parquet")] == [("m0", "one")]
    assert summary["bad_samples"][0]["reason"].startswith("row 2 repeats the key of row 1")


def test_a_samples_fault_is_that_samples(export, tmp_path):
    """An integer img_path, a non-UTF-8 byte, an Altogether-FT row with only a url: each skipped and listed."""
    draw("red", "square").save(tmp_path / "a.png")
    lines = [json.dumps({"key": "ok", "img_path": "a.png", "alt": "zorbit"}).encode(),
             json.dumps({"key": "int", "img_path": 12345, "alt": "x"}).encode(),
             b'{"key": "latin1", "img_path": "a.png", "alt": "caf\xe9"}',
             json.dumps({"key": "url", "url": "https://shop.example.com/b.jpg", "alt": "y"}).encode(),
             json.dumps({"key": "url2", "img_path": "https://shop.example.com/c.jpg", "alt": "z"}).encode()]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    summary = recaption_shards(export, str(tmp_path / "m.jsonl"), tmp_path / "out", **RUN)
    assert [r["key"] for r in rows(tmp_path / "out" / "m.recaption.parquet")] == ["ok"]
    reasons = {b["key"]: b["reason"] for b in summary["bad_samples"]}
    assert set(reasons) == {"int", "line 3", "url", "url2"} and summary["shard_errors"] == []
    assert "holds a int (12345)" in reasons["int"] and "not UTF-8 text (byte 0xe9" in reasons["line 3"]
    assert all("no local image; download it first" in reasons[k] for k in ("url", "url2"))


def test_img2dataset_outputs_and_nested_or_manifest_folders_are_found(export, tmp_path):
    """img2dataset's webdataset output (00000.tar with 000000000.jpg/.txt/.json, 00000.parquet metadata,
    00000_stats.json) and its parquet output (a jpg column, failed downloads kept with their status)."""
    import pyarrow as pa

    wds = tmp_path / "i2d_wds"
    wds.mkdir()
    meta = [{"url": f"http://127.0.0.1:8000/{i}.jpg", "caption": f"photo {i}", "key": f"00000000{i}",
             "status": "success" if i < 2 else "failed_to_download", "error_message": None if i < 2 else "timeout",
             "width": 32, "height": 32} for i in range(3)]
    write_tar(wds / "00000.tar", [(m["key"], {"jpg": png(i), "txt": m["caption"].encode(),
                                              "json": json.dumps(m).encode()}) for i, m in enumerate(meta[:2])])
    pq.write_table(pa.Table.from_pylist(meta), wds / "00000.parquet")
    (wds / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 2}))
    assert [(s.name, s.kind) for s in discover_shards(str(wds))] == [("00000", "webdataset")]
    summary = recaption_shards(export, str(wds), tmp_path / "o1", **RUN)
    out = rows(tmp_path / "o1" / "00000.recaption.parquet")
    assert [r["alt_text"] for r in out] == ["photo 0", "photo 1"]
    assert [r["url"] for r in out] == [meta[0]["url"], meta[1]["url"]]  # what a join back to the downloads needs

    pqs = tmp_path / "i2d_parquet"
    pqs.mkdir()
    table = [{**m, "jpg": png(i) if m["status"] == "success" else None, "txt": m["caption"]}
             for i, m in enumerate(meta)]
    pq.write_table(pa.Table.from_pylist(table), pqs / "00000.parquet")
    (pqs / "00000_stats.json").write_text("{}")
    assert [(s.name, s.kind) for s in discover_shards(str(pqs))] == [("00000", "parquet")]
    summary = recaption_shards(export, str(pqs), tmp_path / "o2", **RUN, image_key="jpg", alt_key="caption")
    assert [(r["key"], r["url"]) for r in rows(tmp_path / "o2" / "00000.recaption.parquet")] == [
        ("000000000", meta[0]["url"]), ("000000001", meta[1]["url"])]
    assert summary["samples"]["bad"] == summary["samples"]["failed_downloads"] == 1  # counted as such
    assert summary["bad_samples"] == [{"shard": "00000", "key": "000000002", "reason": summary["bad_samples"][0][
        "reason"]}] and "failed download (status 'failed_to_download': timeout)" in summary["bad_samples"][0]["reason"]

    metaclip = tmp_path / "metaclip"
    write_metaclip_shards(metaclip, web_images(4), shards=2)
    assert [s.name for s in discover_shards(str(metaclip))] == ["0", "1"]  # root/{id % 100}/{id}.tar
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x").mkdir()
    (flat / "x" / "4b1c.jpg").write_bytes(png(0))
    subprocess.run(["tar", "cf", str(flat / "00000.tar.gz"), "-z", "-C", str(flat / "x"), "."], check=True)
    (flat / "x" / "4b1c.jpg").unlink()
    (flat / "x").rmdir()
    assert [(s.name, s.kind) for s in discover_shards(str(flat))] == [("00000", "webdataset")]
    summary = recaption_shards(export, str(flat), tmp_path / "o3", **RUN)
    assert [r["key"] for r in rows(tmp_path / "o3" / "00000.recaption.parquet")] == ["4b1c"] and summary["shard_errors"] == []

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "deep" / "er").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="give a pattern such as 'root/\\*/\\*/\\*.tar'"):
        discover_shards(str(tmp_path / "empty"))
    (pqs / "img.png").write_bytes(png(0))
    with pytest.raises(ValueError, match="holds parquet and image files; say which to read: input_format=parquet "
                                         "or folder"):
        discover_shards(str(pqs))


def test_output_into_an_img2dataset_folder_captions_and_keeps_the_metadata(export, tmp_path, capsys):
    """img2dataset writes `00000.parquet` (its metadata) beside `00000.tar`; that file is not a finished output."""
    import pyarrow as pa

    folder = tmp_path / "img2dataset"
    folder.mkdir()
    members = [(f"00000000{j}", {"jpg": png(j), "txt": f"alt {j}".encode(),
                                 "json": json.dumps({"key": f"00000000{j}", "caption": f"alt {j}"}).encode()})
               for j in range(3)]
    write_tar(folder / "00000.tar", members)
    metadata = pa.table({"key": [k for k, _ in members], "url": [f"http://127.0.0.1/{j}.jpg" for j in range(3)],
                         "caption": [f"alt {j}" for j in range(3)], "status": ["success"] * 3})
    pq.write_table(metadata, folder / "00000.parquet")
    before = (folder / "00000.parquet").read_bytes()
    summary = recaption_shards(export, str(folder), folder, **RUN)
    assert summary["samples"]["captioned"] == 3 and summary["shards"]["written"] == 1
    assert (folder / "00000.parquet").read_bytes() == before  # the downloader's file is untouched
    out = folder / "00000.recaption.parquet"
    assert [r["key"] for r in rows(out)] == [k for k, _ in members]
    marker = json.loads(pq.read_schema(out).metadata[b"altogether.recaption"])
    assert marker == {"version": 1, "shard": "00000"}
    # A file under an output's name that is not one is never taken as done (nor overwritten).
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(metadata, other / "00000.recaption.parquet")
    assert run_cli(main, [str(export), str(folder / "00000.tar"), str(other), "num_workers=0",
                          "progress_bar=false"]) == 2
    err = capsys.readouterr().err
    assert "00000.recaption.parquet exists but is not a recaption output" in err and "Traceback" not in err
    assert pq.read_table(other / "00000.recaption.parquet").equals(metadata)


# ---------------------------------------------------------------------------------------------- shared OUTPUT

BAD_PER_SHARD = (6, 3, 3, 2)  # 14 bad samples; the first shard alone holds 6 (a resume that forgot it said 8)


@pytest.fixture(scope="module")
def faulty_shards(tmp_path_factory):
    """4 tar shards, each 3 good samples and BAD_PER_SHARD undecodable ones; returns the brace pattern."""
    folder = tmp_path_factory.mktemp("faulty")
    for s, bad in enumerate(BAD_PER_SHARD):
        samples = [(f"f{s}-good{j}", {"png": png(3 * s + j), "txt": f"alt {s} {j}".encode()}) for j in range(3)]
        samples += [(f"f{s}-bad{j}", {"jpg": b"not an image", "txt": b"alt"}) for j in range(bad)]
        write_tar(folder / f"{s:05d}.tar", samples)
    return str(folder / "{00000..00003}.tar")


@pytest.fixture(scope="module")
def faulty_reference(export, faulty_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("faulty_reference")
    return out, recaption_shards(export, faulty_shards, out, **RUN)


def whole_output(summary: dict) -> dict:
    """What a summary says about the output, without what it says about the run that wrote it."""
    return {k: summary[k] for k in ("shards", "samples", "images_with_repeated_captions", "bad_samples",
                                    "shard_errors", "shards_without_stats")}


def paused_worker(marker: Path, export, pattern: str, out: Path, written_first: int, *settings: str):
    """The recaption command, stopped in the middle of a shard (after `written_first` shards) once `marker` exists."""
    args = [str(export), pattern, str(out), *(f"{k}={v}" for k, v in RUN.items()), *settings]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "recaption_pause.py"), str(marker), *args],
                            env={**ENV, "PAUSE_AFTER_SHARDS": str(written_first)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the worker never paused mid-shard: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    return proc


def test_resume_after_a_kill_summarizes_the_whole_output(export, faulty_shards, faulty_reference, tmp_path):
    ref, ref_summary = faulty_reference
    assert ref_summary["samples"] == {"captioned": 12, "bad": 14, "failed_downloads": 0, "bad_not_listed": 0}
    out = tmp_path / "out"
    proc = paused_worker(tmp_path / "paused", export, faulty_shards, out, 1)
    proc.kill()
    proc.communicate()
    summary = recaption_shards(export, faulty_shards, out, **RUN)
    assert summary["run"]["shards_written"] == 3 and summary["run"]["images"] == 9
    assert whole_output(summary) == whole_output(ref_summary)  # 14 bad samples, not the resumed run's 8
    assert summary["samples"]["bad"] == 14 and len(summary["bad_samples"]) == 14
    assert outputs(out) == outputs(ref)


def test_three_workers_share_one_output_and_survive_a_kill(export, faulty_shards, faulty_reference, tmp_path):
    """Three independent commands on one OUTPUT; one is SIGKILLed in the middle of its shard while it holds the
    claim. The other two do every other shard, wait for the claimed one, take it over once its worker is dead
    (the claim expiry is 10 minutes: the takeover comes from seeing the process gone), and finish."""
    ref, ref_summary = faulty_reference
    out = tmp_path / "shared"
    victim = paused_worker(tmp_path / "paused", export, faulty_shards, out, 0, "claim_expiry_s=600")
    held = sorted(p.name for p in (out / ".claims").iterdir() if p.name != "workers")
    assert held == ["00000.0"] and not list(out.glob("*.parquet"))
    command = [sys.executable, "-m", "altogether.recaption", str(export), faulty_shards, str(out),
               *(f"{k}={v}" for k, v in RUN.items()), "claim_expiry_s=600"]
    workers = [subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 300
        while len(list(out.glob("*.recaption.parquet"))) < 3:  # all but the victim's shard
            assert all(w.poll() is None for w in workers), [w.communicate()[1][-2000:] for w in workers]
            assert time.monotonic() < deadline, "the two workers did not finish the free shards"
            time.sleep(0.2)
        time.sleep(1.0)
        assert all(w.poll() is None for w in workers)  # waiting for the shard the victim holds
        assert not (out / "00000.recaption.parquet").exists()
    finally:
        victim.kill()
        victim.communicate()
    results = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in results]
    written = [int(re.search(r"into (\d+) shard file", stdout).group(1)) for stdout, _ in results]
    assert sum(written) == 4  # every shard written once: none twice, none lost
    assert outputs(out) == outputs(ref)  # outputs and their stats byte-identical to one clean run
    summary = json.loads((out / "summary.json").read_text())
    assert whole_output(summary) == whole_output(ref_summary)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no claims nor temporaries


def test_sigterm_abandons_the_shard_in_progress_writes_the_summary_and_exits_143(export, shards, reference,
                                                                                  tmp_path):
    out = tmp_path / "out"
    proc = paused_worker(tmp_path / "paused", export, shards[0], out, 1, "num_workers=1")
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: the command and its data-loader worker
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000.recaption.parquet", "00000.recaption.stats.json",
                                                     "summary.json"]  # claims released, nothing half-written
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["interrupted"] is True and summary["run"]["shards_written"] == 1
    assert summary["shards"] == {"total": 3, "written": 1, "not_written": 0, "pending": 2, "with_read_errors": 0}
    assert run_cli(main, [str(export), shards[0], str(out), *(f"{k}={v}" for k, v in RUN.items())]) == 0
    assert outputs(out) == outputs(reference[0])


def test_outputs_without_stats_are_counted_by_their_rows_and_named(export, shards, reference, tmp_path):
    """An output written by an older version has no stats beside it: the summary counts its rows as captioned
    and names it, since its bad samples are unknown."""
    out = tmp_path / "old"
    shutil.copytree(reference[0], out)
    (out / "00001.recaption.stats.json").unlink()
    summary = recaption_shards(export, shards[0], out, **RUN)
    assert summary["run"]["shards_written"] == 0 and summary["shards_without_stats"] == ["00001"]
    assert summary["shards"]["written"] == 3 and summary["samples"]["captioned"] == 15


def test_an_input_without_samples_captions_nothing_and_does_not_exit_0(export, tmp_path, capsys):
    # A tar of no samples is a valid shard that holds nothing (an empty JSONL manifest is a named error: below)
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    assert main([str(export), str(tmp_path / "empty.tar"), str(tmp_path / "out"), "batch_size=2",
                 "num_workers=0", "progress_bar=false"]) == 1
    assert "nothing captioned" in capsys.readouterr().err


@pytest.mark.parametrize("text, problem", [
    (b"", "empty"), (b"\n\n", "empty"),
    (b"[1, 2]\n[3, 4]\n", "no line is a JSON object (line 1: not a JSON object: [1, 2])"),
    (b"key,img_path\nm0,images/000.png\n", "no line is a JSON object (line 1: not valid JSON"),
])
def test_a_jsonl_manifest_without_one_object_is_one_line_before_any_work(text, problem, export, tmp_path, capsys):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(text)
    out = tmp_path / "out"
    assert run_cli(main, [str(export), str(manifest), str(out), "batch_size=2", "num_workers=0",
                          "progress_bar=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith(f"error: {manifest}: {problem}")
    assert not out.exists()  # refused before any work: not even OUTPUT made


def test_a_manifest_of_objects_that_are_all_bad_rows_is_skipped_and_counted(export, tmp_path, capsys):
    """Rows that are JSON objects are samples: each bad one is that sample's fault, listed with its reason."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"key": "a", "img_path": 7, "alt": "x"}\n[1, 2]\n{"key": "b", "img_path": "no.png"}\n')
    out = tmp_path / "out"
    assert run_cli(main, [str(export), str(manifest), str(out), "batch_size=2", "num_workers=0",
                          "progress_bar=false"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"]["captioned"] == 0 and [b["key"] for b in summary["bad_samples"]] == ["a", "line 2", "b"]
