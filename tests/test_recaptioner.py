"""Recaptioner: loading, batched generation equal to one-by-one, input forms and errors, save -> load."""

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from altogether import GenerationConfig, Recaptioner
from altogether.data.records import BadRecord
from altogether.evaluate import evaluate
from altogether.export import ExportError
from altogether.generation import GenerationError
from altogether.layout import build_prompt
from altogether.recaption import recaption_shards
from tests.conftest import COLOURS, SHAPES, draw, save_tiny_export


GREEDY = {"do_sample": False, "max_new_tokens": 8}
ALTS = ["zorbit K-12 for sale", None, ["a blue circle on a white background", "IMG_2231.jpg"], "", "a photo of"]


@pytest.fixture(scope="module")
def export(tiny_parts, tiny_model_cfg, tmp_path_factory):
    return save_tiny_export(tmp_path_factory.mktemp("r") / "export", tiny_parts, tiny_model_cfg, max_new_tokens=6)


@pytest.fixture(scope="module")
def captioner(export):
    return Recaptioner.from_pretrained(export)


@pytest.fixture(scope="module")
def images():
    out = []
    for i, colour in enumerate(["red", "blue", "green", "yellow", "purple"]):
        img = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(img).ellipse((2 + i, 2 + i, 30 - i, 30 - i), fill=colour)
        out.append(img)
    return out


def test_from_pretrained_defaults(captioner, export):
    assert captioner.device == torch.device("cpu") and captioner.dtype == torch.float32  # CPU default: fp32
    assert captioner.generation.temperature == 0.2 and captioner.generation.top_p == 0.7
    assert captioner.generation.top_k == 0 and captioner.directory == export


def test_batched_equals_one_by_one_in_input_order(captioner, images):
    batched = captioner.recaption(images, ALTS, batch_size=3, **GREEDY)
    alone = [captioner.recaption([img], [alt], **GREEDY)[0] for img, alt in zip(images, ALTS)]
    assert batched == alone
    assert len(set(batched)) > 1  # the captions depend on the image and prompt, so order is really checked
    assert captioner.recaption(images, ALTS, batch_size=len(images), **GREEDY) == alone


def test_prompt_follows_the_training_rule(captioner):
    ids = captioner.prompt_ids(["a photo of", " a  photo of ", "zorbit"])
    expected = captioner.tokenizer(build_prompt(["a photo of", "zorbit"], "; "), add_special_tokens=False)["input_ids"]
    assert ids == expected
    assert captioner.prompt_ids(None) == captioner.prompt_ids([]) == []


def test_paths_single_image_and_clean_text(captioner, images, tmp_path):
    path = tmp_path / "img.png"
    images[0].save(path)
    from_path = captioner.recaption([path], [ALTS[0]], **GREEDY)
    assert from_path == captioner.recaption([images[0]], [ALTS[0]], **GREEDY)
    assert captioner.recaption(str(path), ALTS[0], **GREEDY) == from_path  # a lone image with its alt-text
    for caption in captioner.recaption(images, **GREEDY):
        assert caption == caption.strip() and "\n" not in caption and "</s>" not in caption and "<pad>" not in caption
        assert "  " not in caption and all(ch.isprintable() for ch in caption)


def test_sampling_seed_and_num_captions(captioner, images):
    first = captioner.recaption(images[:3], ALTS[:3], num_captions=2, seed=7, temperature=1.0, top_p=1.0)
    again = captioner.recaption(images[:3], ALTS[:3], num_captions=2, seed=7, temperature=1.0, top_p=1.0)
    other = captioner.recaption(images[:3], ALTS[:3], num_captions=2, seed=8, temperature=1.0, top_p=1.0)
    assert first == again != other
    assert [len(c) for c in first] == [2, 2, 2] and all(isinstance(c, str) for row in first for c in row)
    state = torch.random.get_rng_state()
    captioner.recaption(images[:1], seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random state is left alone
    beams = captioner.recaption(images[:2], num_captions=2, num_beams=2, do_sample=False, max_new_tokens=4)
    assert [len(c) for c in beams] == [2, 2]


def test_generation_defaults_come_from_the_export(captioner, images, monkeypatch):
    calls = []
    real = captioner.model.generate

    def spy(embeds, alt_ids, generation, **kwargs):
        calls.append({k: getattr(generation, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_p",
                                                           "top_k", "num_beams", "num_return_sequences")})
        return real(embeds, alt_ids, generation, **kwargs)

    monkeypatch.setattr(captioner.model, "generate", spy)
    captioner.recaption(images[:2], seed=0)
    captioner.recaption(images[:2], seed=0, top_k=5, max_new_tokens=3)
    assert calls[0] == {"max_new_tokens": 6, "do_sample": True, "temperature": 0.2, "top_p": 0.7, "top_k": 0,
                        "num_beams": 1, "num_return_sequences": 1}
    assert calls[1]["top_k"] == 5 and calls[1]["max_new_tokens"] == 3 and calls[1]["temperature"] == 0.2


@pytest.mark.parametrize("call, error, match", [
    (lambda c, im: c.recaption(im[:3], ["a", "b"]), ValueError, "3 images but 2 alt-text"),
    (lambda c, im: c.recaption(im[:2], "one alt for all"), TypeError, "one entry per image"),
    (lambda c, im: c.recaption(im[:1], temprature=0.5), TypeError, "temprature"),
    (lambda c, im: c.recaption(im[:1], num_captions=3, do_sample=False), ValueError, "num_captions=3"),
    (lambda c, im: c.recaption(im[:1], batch_size=0), ValueError, "batch_size"),
    (lambda c, im: c.recaption(im[:1], exponential_decay_length_penalty=(5,)), ValueError, "(start, factor)"),
])
def test_input_errors(captioner, images, call, error, match):
    with pytest.raises(error, match=match):
        call(captioner, images)


def test_notebook_inputs_numpy_arrays_and_torch_tensors_caption_like_the_image(captioner, images):
    """What notebooks pass, as Hugging Face processors accept it: H x W x C uint8 arrays, C x H x W float tensors
    in 0..1, a batch as one N x ... array; each captions exactly as the PIL image does."""
    import numpy as np

    pil = captioner.recaption(images[:2], ALTS[:2], **GREEDY)
    hwc = [np.asarray(im) for im in images[:2]]
    chw = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in hwc]
    assert captioner.recaption(hwc, ALTS[:2], **GREEDY) == pil
    assert captioner.recaption(chw, ALTS[:2], **GREEDY) == pil
    assert captioner.recaption(np.stack(hwc), ALTS[:2], **GREEDY) == pil  # a batch
    assert captioner.recaption(torch.stack(chw), ALTS[:2], **GREEDY) == pil
    assert captioner.recaption(hwc[0], ALTS[0], **GREEDY) == pil[:1]  # one image with its alt-text
    grey = np.asarray(images[0].convert("L"))
    assert captioner.recaption(grey, **GREEDY) == captioner.recaption(images[0].convert("L"), **GREEDY)


@pytest.mark.parametrize("make, match", [
    (lambda: "https://example.com/cat.jpg", r"images\[0\].*is a URL: no local image; download it first"),
    (lambda: torch.randn(3, 8, 8), r"float pixels must lie in 0..1, these span .* \(a normalised tensor\?"),
    (lambda: torch.zeros(2, 8, 8, dtype=torch.uint8), r"shape \(2, 8, 8\) is not an image"),
    (lambda: torch.zeros(8, 8, 3, dtype=torch.int64), r"dtype int64: give uint8"),
])
def test_notebook_inputs_that_are_not_images_are_one_line(captioner, make, match):
    torch.manual_seed(0)
    with pytest.raises(BadRecord, match=match) as err:
        captioner.recaption([make()], **GREEDY)
    assert "\n" not in str(err.value)


def test_alt_texts_missing_as_nan_and_numbers_refused(captioner, images):
    assert captioner.recaption(images[:2], [float("nan"), None], **GREEDY) == captioner.recaption(images[:2], **GREEDY)
    with pytest.raises(TypeError, match=r"alt_texts\[1\]: alt-text must be .* got int: 12345 \(pass str"):
        captioner.recaption(images[:2], ["a cat", 12345], **GREEDY)


def test_unreadable_image_names_the_file(captioner, images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(BadRecord, match="broken.jpg"):
        captioner.recaption([images[0], bad], **GREEDY)
    with pytest.raises(BadRecord, match="missing.png"):
        captioner.recaption([tmp_path / "missing.png"], **GREEDY)


def test_bad_sources_and_missing_gpu_pieces(export, tmp_path):
    with pytest.raises(ExportError, match="neither a local export folder nor a reachable or cached"):
        Recaptioner.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ExportError, match="neither"):
        Recaptioner.from_pretrained("someone/not-cached-model")
    with pytest.raises(ExportError, match="altogether.json is missing"):
        Recaptioner.from_pretrained(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is usable"):
            Recaptioner.from_pretrained(export, device="cuda")
    with pytest.raises(ValueError, match="flash"):
        Recaptioner.from_pretrained(export, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        Recaptioner.from_pretrained(export, dtype="fp8")


def test_save_then_load_gives_identical_greedy_captions(captioner, images, tmp_path):
    saved = captioner.save_pretrained(tmp_path / "saved")
    again = Recaptioner.from_pretrained(saved)
    assert again.recaption(images, ALTS, **GREEDY) == captioner.recaption(images, ALTS, **GREEDY)
    assert (saved / "README.md").read_text().startswith("---\nlibrary_name: altogether\n")
    assert again.meta["encoder_source"] == captioner.meta["encoder_source"]


@pytest.mark.parametrize("settings", [GREEDY, {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "seed": 3,
                                               "max_new_tokens": 8}], ids=["greedy", "seeded sampling"])
def test_the_same_image_gets_the_same_caption_through_every_door(captioner, export, tmp_path, monkeypatch, settings):
    """Recaptioner.recaption, the recaption command and evaluate, each batching differently (and recaption in a
    data-loader worker), caption an image with the same settings and seed identically."""
    (tmp_path / "images").mkdir()
    alts = ["zorbit K-12 for sale", ["a photo of", "IMG_2231.jpg"], "", "a blue circle on a white background",
            "velora shop", None]
    rows = []
    for i, alt in enumerate(alts):
        draw(list(COLOURS)[i % 4], SHAPES[i % 2], seed=i).save(tmp_path / "images" / f"{i}.png")
        rows.append({"key": f"k{i}", "img_path": f"images/{i}.png", "alt": alt, "round3": f"a shape number {i}"})
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    images = [tmp_path / r["img_path"] for r in rows]

    direct = captioner.recaption(images, alts, batch_size=2, **settings)
    summary = recaption_shards(export, str(manifest), tmp_path / "out", batch_size=4, num_workers=1,
                               progress_bar=False, output_format="jsonl", **settings)
    assert summary["samples"]["captioned"] == len(alts)
    command = [json.loads(line)["caption"] for line in (tmp_path / "out" / "data.recaption.jsonl").read_text().splitlines()]
    monkeypatch.setenv("PATH", str(tmp_path))  # no java: METEOR skipped, fast
    seed = settings.get("seed", 0)
    result = evaluate(export, manifest, conditions="w/ alt", seed=seed, batch_size=5, clip_score=False,
                      alt_text_row=False, progress=False, output_dir=tmp_path / "eval",
                      **{k: v for k, v in settings.items() if k != "seed"})
    evaluated = [json.loads(line)["captions"]["w/ alt"]
                 for line in (tmp_path / "eval" / "captions.jsonl").read_text().splitlines()]
    assert direct == command == evaluated
    assert len(set(direct)) > 1
    if settings.get("do_sample"):
        assert direct != captioner.recaption(images, alts, **GREEDY)  # sampling really sampled
        assert result.summary["generation"]["seed"] == 3 and result.summary["generation"]["do_sample"] is True


def test_prepare_pickles_for_data_loader_workers(captioner, images):
    prepare = pickle.loads(pickle.dumps(captioner.prepare))
    here, there = captioner.prepare(images[0], ALTS[2]), prepare(images[0], ALTS[2])
    assert here.prompt == there.prompt and here.stream_key == there.stream_key
    assert torch.equal(here.pixel_values, there.pixel_values) and here.pixel_values.shape == (3, 32, 32)
    assert here.prompt.text == "a blue circle on a white background; IMG_2231.jpg"
    assert here.prompt.ids == captioner.prompt_ids(ALTS[2])
    assert captioner.prepare(images[1], ALTS[2]).stream_key != here.stream_key  # another image, another stream


def test_a_captioner_around_a_model_in_memory(tiny_parts, images):
    model, tokenizer, transform = tiny_parts
    model.train()
    captioner = Recaptioner(model, tokenizer, transform, generation={"max_new_tokens": 6, "do_sample": False})
    assert captioner.generation == GenerationConfig(max_new_tokens=6, do_sample=False)
    assert repr(captioner).startswith("Recaptioner(in memory, device=cpu")
    items = [captioner.prepare(im, alt) for im, alt in zip(images, ALTS)]
    captions = captioner.caption(items, captioner.generation)
    assert model.training  # the caption step ran in eval mode and put the mode back
    assert [c[0] for c in captions] == captioner.recaption(images, ALTS)
    with pytest.raises(ValueError, match="in memory"):
        captioner.save_pretrained("unused")
    model.eval()


def test_max_new_tokens_beyond_the_position_table_is_refused_before_any_work(captioner, images, monkeypatch):
    """The tiny OPT has 512 learned positions; 4 visual + 128 alt-text tokens leave room for 380 new tokens."""
    monkeypatch.setattr(captioner.model, "embed_images", pytest.fail)  # nothing may run before the check
    with pytest.raises(GenerationError, match="max_position_embeddings=512; set max_new_tokens <= 380"):
        captioner.recaption(images[:1], max_new_tokens=381)
    with pytest.raises(GenerationError, match="num_beams=2"):
        captioner.recaption(images[:1], num_beams=2, repetition_penalty=1.3)


NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebook.md"


def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    """Every ``python`` block of docs/notebook.md, in order, in one namespace, as a reader would run them."""
    blocks = re.findall(r"^```python\n(.*?)^```$", NOTEBOOK.read_text(), re.S | re.M)
    assert len(blocks) >= 10
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__notebook__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{NOTEBOOK.name} block {i + 1}", "exec"), namespace)
    assert namespace["alone"] == namespace["greedy"]
    assert (tmp_path / "walkthrough" / "my-captioner" / "README.md").is_file()
    assert (tmp_path / "walkthrough" / "run-lora" / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert len(namespace["merged"].recaption(namespace["images"], max_new_tokens=2)) == 3
