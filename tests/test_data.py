import io
import itertools
import json
import random
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from altogether.config import DecoderConfig, LayoutConfig
from altogether.data.datamodule import (ResumableSampler, SampleBuilder, collate_training, data_fields,
                                        open_sources)
from altogether.data.images import load_image
from altogether.data.readers import Fields, TableSource, alt_text_list, detect_format, iter_webdataset
from altogether.data.records import BadRecord, Record
from altogether.layout import training_pair
from altogether.model import load_tokenizer
from altogether.tiny import web_images, write_metaclip_shards

from .conftest import draw


def _png(colour="red"):
    buf = io.BytesIO()
    draw(colour, "square").save(buf, format="PNG")
    return buf.getvalue()


def test_annotation_json_reader_picks_the_target_key(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    data = {"data": [{"alt": "zorbit K-1", "url": "http://x/a.png", "img_path": "a.png",
                      "round2": "r2 caption", "round3": "r3 caption"}]}
    path = tmp_path / "ft.json"
    path.write_text(json.dumps(data))
    assert detect_format(str(path)) == "annotations"
    source = TableSource(str(path), "annotations", Fields(target_key="round2"))
    record = source[0]
    assert record.target == "r2 caption" and record.alt_texts == ["zorbit K-1"]
    assert record.image == str(tmp_path / "a.png") and record.extra["url"] == "http://x/a.png"
    assert load_image(record.image).size == (32, 32)
    with pytest.raises(ValueError, match="missing column.*round4"):
        TableSource(str(path), "annotations", Fields(target_key="round4"))


def test_parquet_reader_with_image_bytes_and_alt_lists(tmp_path):
    table = pa.table({"key": ["k0", "k1"], "image": [_png(), _png("blue")], "alt": [["a", "b"], ["c"]],
                      "caption": ["x", ""]})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    source = TableSource(str(path), "parquet", Fields(image_key="image", target_key="caption"))
    assert source[0].alt_texts == ["a", "b"] and isinstance(source[0].image, bytes)
    with pytest.raises(BadRecord, match="record 'k1'.*empty or missing target 'caption'"):
        source[1]


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_reader_understands_metaclip_img2dataset_and_txt(tmp_path):
    _tar(tmp_path / "000.tar", [
        ("s0.jpg", _png()), ("s0.json", json.dumps({"texts": ["first alt", "second alt"]}).encode()),
        ("s1.png", _png()), ("s1.json", json.dumps({"caption": "img2dataset alt"}).encode()),
    ])
    _tar(tmp_path / "001.tar", [
        ("s2.png", _png()), ("s2.txt", b"plain txt alt"),
        ("s3.png", _png()), ("s3.json", b"{broken"),
    ])
    bad = []
    records = list(iter_webdataset(str(tmp_path / "{000..001}.tar"), Fields(), on_bad=lambda k, r: bad.append((k, r))))
    assert [r.alt_texts for r in records] == [["first alt", "second alt"], ["img2dataset alt"], ["plain txt alt"]]
    assert [k for k, _ in bad] == ["s3"] and "broken JSON" in bad[0][1]


def test_metaclip_shards_give_alt_texts_with_their_sources(tmp_path):
    """MetaCLIP's layout: <shard % 100>/<shard>.tar with <uuid>.json + <uuid>.jpeg, texts as [source, text]."""
    images = web_images(6)
    write_metaclip_shards(tmp_path / "metaclip", images, shards=2)
    pattern = str(tmp_path / "metaclip" / "*" / "*.tar")
    assert detect_format(pattern) == "webdataset"
    in_order = images[0::2] + images[1::2]  # shard 0, then shard 1
    bad = []
    records = list(iter_webdataset(pattern, Fields(), on_bad=lambda k, r: bad.append((k, r))))
    assert bad == [] and [r.key for r in records] == [image.uuid for image in in_order]
    assert [[list(p) for p in zip(r.alt_sources, r.alt_texts)] for r in records] == [i.texts for i in in_order]
    titled = next(r for r, image in zip(records, in_order) if image.title)
    assert titled.alt_sources == ["alt", "title"] and load_image(titled.image).size == (64, 64)
    prompt, target = training_pair(titled.alt_texts, None, task="pretrain", prompt_dropout=0.0, rng=random.Random(0))
    longest = max(titled.alt_texts, key=len)
    assert target == longest and prompt == next(t for t in titled.alt_texts if t != longest)

    only_alt = list(iter_webdataset(pattern, Fields(alt_sources=["alt"])))
    assert [r.alt_texts for r in only_alt] == [[image.alt] for image in in_order]
    assert all(r.alt_sources == ["alt"] for r in only_alt)

    # tar run as `tar -C dir .` names members ./<uuid>.jpeg, as MetaCLIP's own readers expect: the key is the uuid
    _tar(tmp_path / "dot.tar", [("./0a1b.json", json.dumps({"texts": [["alt", "x"]]}).encode()),
                                ("./0a1b.jpeg", _png())])
    assert [r.key for r in iter_webdataset(str(tmp_path / "dot.tar"), Fields())] == ["0a1b"]


def test_alt_text_fields_strings_lists_pairs_and_what_is_refused(make_recipe, tmp_path):
    assert alt_text_list([["alt", "a"], ["title", "b"]], ("title",)) == (["b"], ["title"])
    assert alt_text_list(["a", "b"], ("title",)) == (["a", "b"], [])  # plain strings name no source: all kept
    for value in ([["alt"]], [["alt", "a"], "b"], [["alt", 3]], 7):
        with pytest.raises(BadRecord, match="neither a string, a list of strings nor a list of \\[source, text\\]"):
            alt_text_list(value)
    (tmp_path / "a.png").write_bytes(_png())
    path = tmp_path / "pairs.jsonl"  # a table column of pairs reads as the tar's JSON does
    path.write_text(json.dumps({"key": "k", "img_path": "a.png", "alt": [["alt", "x"], ["title", "y"]],
                                "round3": "c"}) + "\n")
    cfg = make_recipe("finetune_round3", {"data.format": "jsonl", "data.train": str(path),
                                          "data.alt_text_sources": ["title"], "data.val_fraction": 0.0})
    assert data_fields(cfg).alt_sources == ("title",)
    record = open_sources(cfg)[0][0]
    assert (record.alt_texts, record.alt_sources, record.target) == (["y"], ["title"], "c")


def test_unreadable_images_are_skipped_and_counted(tiny_dirs, tmp_path):
    tok = load_tokenizer(DecoderConfig(tokenizer=str(tiny_dirs[1])))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    builder = SampleBuilder(tok, lambda img: __import__("torch").zeros(3, 8, 8), task="finetune",
                            layout=LayoutConfig(prompt_dropout=0.0), seed=0)
    records = [Record("good", _png(), ["alt"], "a red square"), Record("bad", str(tmp_path / "bad.png"), [], "x"),
               Record("gone", str(tmp_path / "missing.png"), [], "x")]
    items = [builder.safe(r, i) for i, r in enumerate(records)]
    batch = collate_training(items, num_visual_tokens=2, pad_id=tok.pad_token_id)
    assert int(batch["num_skipped"]) == 2 and batch["pixel_values"].shape[0] == 1
    assert batch["skip_reasons"][0].startswith("record 'bad': unreadable image")
    assert batch["skip_reasons"][1].startswith("record 'gone': image file not found")
    assert batch["num_tokens"] == len(tok("a red square", add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(BadRecord, match="record 'gone': image file not found"):
        builder(records[2], 2)


def test_sampler_shuffles_each_pass_splits_ranks_and_resumes_exactly():
    full = list(itertools.islice(ResumableSampler(10, seed=3), 30))
    passes = [[i for _, i in full[k:k + 10]] for k in (0, 10, 20)]
    assert all(sorted(p) == list(range(10)) for p in passes) and passes[0] != passes[1]
    assert [g for g, _ in full] == list(range(30))
    resumed = list(itertools.islice(ResumableSampler(10, seed=3, start=17), 13))
    assert resumed == full[17:]
    r0 = list(itertools.islice(ResumableSampler(10, seed=3, rank=0, world_size=2), 10))
    r1 = list(itertools.islice(ResumableSampler(10, seed=3, rank=1, world_size=2), 10))
    assert sorted(r0 + r1) == sorted(full[:20])


def test_val_fraction_split_is_disjoint_and_seeded(make_recipe, jsonl_data):
    cfg = make_recipe("finetune_round3", {"data.format": "jsonl", "data.train": str(jsonl_data),
                                          "data.val_fraction": 0.25})
    train, val = open_sources(cfg)
    keys = lambda s: {s[i].key for i in range(len(s))}
    assert len(val) == 6 and len(train) == 18 and not keys(train) & keys(val)
    assert keys(open_sources(cfg)[1]) == keys(val)
    with pytest.raises(ValueError, match="data.train is not set"):
        open_sources(make_recipe("finetune_round3"))


def test_truncated_tar_yields_complete_samples_then_names_the_damaged_one(tmp_path):
    from altogether.data.readers import DamagedShard, iter_tar_samples

    _tar(tmp_path / "t.tar", [(f"s{i}.png", _png()) for i in range(3)] + [("s2.txt", b"alt")])
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: 512 * 5])  # cut at a block boundary inside the third sample
    keys = []
    with pytest.raises(DamagedShard) as err:
        for sample in iter_tar_samples(str(tmp_path / "cut.tar")):
            keys.append(sample["__key__"])
    assert keys == ["s0", "s1"] and err.value.partial_key == "s2"
    assert [s["__key__"] for s in iter_tar_samples(str(tmp_path / "t.tar"))] == ["s0", "s1", "s2"]


def test_a_member_stored_twice_is_reported_never_merged(tmp_path):
    """`tar rf` appends a second s0.png + s0.json; a writer that repeats s2.png inside one sample: every sample
    keeps its own image and alt-text, the repeats are skipped with a reason (webdataset refuses the shard)."""
    import shutil
    import subprocess

    _tar(tmp_path / "t.tar", [("s0.png", _png("red")), ("s0.json", json.dumps({"caption": "red one"}).encode()),
                              ("s1.png", _png()), ("s1.txt", b"s1 alt"),
                              ("s2.png", _png("green")), ("s2.txt", b"s2 alt"), ("s2.png", _png("blue"))])
    appended = tmp_path / "again"
    appended.mkdir()
    (appended / "s0.png").write_bytes(_png("blue"))
    (appended / "s0.json").write_text(json.dumps({"caption": "blue impostor"}))
    assert shutil.which("tar")
    subprocess.run(["tar", "rf", str(tmp_path / "t.tar"), "-C", str(appended), "s0.png", "s0.json"], check=True)
    assert [m.name for m in tarfile.open(tmp_path / "t.tar")].count("s0.png") == 2

    bad = []
    records = list(iter_webdataset(str(tmp_path / "t.tar"), Fields(), on_bad=lambda k, r: bad.append((k, r))))
    assert [(r.key, r.alt_texts) for r in records] == [("s0", ["red one"]), ("s1", ["s1 alt"]), ("s2", ["s2 alt"])]
    assert load_image(records[0].image).getpixel((0, 0)) == load_image(_png("red")).getpixel((0, 0))
    assert load_image(records[2].image).getpixel((16, 16)) == load_image(_png("green")).getpixel((16, 16))
    assert [k for k, _ in bad] == ["s2", "s0"] and all("appears again" in r for _, r in bad)
    assert "'s0.png'" in bad[1][1]


def test_compressed_tar_shards_keep_their_last_sample(tmp_path):
    members = [(f"s{i}.png", _png()) for i in range(3)] + [("s2.txt", b"last alt")]
    for mode, name in (("w:gz", "d.tar.gz"), ("w:gz", "e.tgz"), ("w:xz", "f.tar")):  # xz: named plainly
        with tarfile.open(tmp_path / name, mode) as tar:
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert detect_format(str(tmp_path / "d.tar.gz")) == detect_format(str(tmp_path / "e.tgz")) == "webdataset"
    for name in ("d.tar.gz", "e.tgz", "f.tar"):
        records = list(iter_webdataset(str(tmp_path / name), Fields()))
        assert [r.key for r in records] == ["s0", "s1", "s2"] and records[2].alt_texts == ["last alt"]

    from altogether.data.readers import DamagedShard

    data = (tmp_path / "d.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) - 40])  # a download cut short
    keys = []
    with pytest.raises(DamagedShard, match="cut.tar.gz"):
        for record in iter_webdataset(str(tmp_path / "cut.tar.gz"), Fields()):
            keys.append(record.key)
    assert keys == ["s0", "s1"]


def test_table_rows_without_a_usable_local_image_say_why(tmp_path):
    """Altogether-FT rows with only a url, a number as img_path, an img2dataset row whose download failed."""
    (tmp_path / "a.jpg").write_bytes(_png())
    rows = [{"alt": "ok", "url": "http://x/a.jpg", "img_path": "a.jpg", "round2": "r"},
            {"alt": "no file", "url": "https://shop.example.com/b.jpg", "img_path": None, "round2": "r"},
            {"alt": "url as path", "url": "https://shop.example.com/c.jpg",
             "img_path": "https://shop.example.com/c.jpg", "round2": "r"}]
    path = tmp_path / "ft.json"
    path.write_text(json.dumps({"data": rows}))
    source = TableSource(str(path), "annotations", Fields(target_key="round2", image_root=str(tmp_path)))
    assert source[0].image == str(tmp_path / "a.jpg")
    for i in (1, 2):
        with pytest.raises(BadRecord, match=r"shop.example.com/[bc].jpg.*no local image; download it first"):
            source[i]

    from altogether.data.readers import row_to_record

    with pytest.raises(BadRecord, match="record 'k' in m.jsonl: column 'img_path' holds a int \\(7\\)"):
        row_to_record({"key": "k", "img_path": 7}, 0, Fields(), tmp_path, "m.jsonl")
    failed = {"key": "000000001", "jpg": None, "txt": None, "url": "http://127.0.0.1:1/x.jpg", "caption": "a cat",
              "status": "failed_to_download", "error_message": "HTTP Error 404: Not Found"}
    with pytest.raises(BadRecord, match="failed download \\(status 'failed_to_download': HTTP Error 404"):
        row_to_record(failed, 1, Fields(image_key="jpg", alt_key="caption"), tmp_path, "00000.parquet")
