"""The one image decoder (as a viewer shows it, with a bounded cost) and the one resize policy on the way to the
encoder. Images are built here in the formats and modes the web serves, then read as files or bytes."""

import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from altogether.config import EncoderConfig
from altogether.data.images import MAX_ASPECT_RATIO, load_image
from altogether.data.records import BadRecord
from altogether.model import ImageEncoder

RED, BLUE, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def pixels(img: Image.Image) -> list:
    return [img.getpixel((x, y)) for y in range(img.height) for x in range(img.width)]


def close(got, want, tol=12) -> bool:
    return all(abs(g - w) <= tol for g, w in zip(got, want))


# ------------------------------------------------------------------------------------------ orientation


def test_phone_jpeg_with_orientation_6_decodes_upright():
    """Stored 64x32 (the sensor's landscape), Orientation=6: a viewer rotates it 90 degrees clockwise to 32x64.

    The upright picture has a red band along its top and a blue square in its bottom-left corner; stored, the
    top edge lies along the left side and the bottom-left corner is the stored bottom-right."""
    stored = Image.new("RGB", (64, 32), WHITE)
    stored.paste(RED, (0, 0, 8, 32))  # the upright top
    stored.paste(BLUE, (52, 20, 64, 32))  # the upright bottom-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = load_image(encoded(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert upright.size == (32, 64) and upright.mode == "RGB"
    assert close(upright.getpixel((16, 3)), RED) and close(upright.getpixel((16, 30)), WHITE)  # red above
    assert close(upright.getpixel((5, 58)), BLUE) and close(upright.getpixel((27, 58)), WHITE)  # blue lower left


# EXIF 2.3 Orientation: how the stored picture is shown. Stored images are made with the inverse operation.
STORE_FOR = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,  # shown mirrored left-right
    3: Image.Transpose.ROTATE_180,  # shown turned 180 degrees
    4: Image.Transpose.FLIP_TOP_BOTTOM,  # shown mirrored top-bottom
    5: Image.Transpose.TRANSPOSE,  # shown mirrored along the main diagonal
    6: Image.Transpose.ROTATE_90,  # shown turned 90 degrees clockwise (stored counter-clockwise)
    7: Image.Transpose.TRANSVERSE,  # shown mirrored along the other diagonal
    8: Image.Transpose.ROTATE_270,  # shown turned 90 degrees counter-clockwise (stored clockwise)
}


@pytest.mark.parametrize("orientation", sorted(STORE_FOR))
def test_every_exif_orientation_decodes_upright(orientation):
    upright = Image.new("RGB", (48, 24), WHITE)
    upright.paste(RED, (0, 0, 12, 12))  # top-left quadrant
    upright.paste(BLUE, (36, 12, 48, 24))  # bottom-right quadrant
    op = STORE_FOR[orientation]
    stored = upright.transpose(op) if op is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    got = load_image(encoded(stored, "PNG", exif=exif.tobytes()))
    assert pixels(got) == pixels(upright)


def test_a_pil_image_gets_the_same_rules_and_is_not_modified():
    stored = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    stored.putpixel((0, 0), (0, 0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    opened = Image.open(io.BytesIO(encoded(stored, "PNG", exif=exif.tobytes())))
    got = load_image(opened)
    assert got.size == (2, 4) and got.getpixel((1, 0)) == BLACK and got.getpixel((0, 0)) == WHITE
    assert opened.size == (4, 2) and opened.mode == "RGBA" and opened.getexif()[0x0112] == 6


# ----------------------------------------------------------------------------------------- transparency


def test_rgba_logo_on_a_transparent_background_is_black_on_white():
    """The product cut-out: fully transparent background whose hidden RGB is 0, an opaque black shape."""
    logo = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    logo.paste((0, 0, 0, 255), (8, 8, 24, 24))
    got = load_image(encoded(logo, "PNG"))
    assert got.getpixel((0, 0)) == WHITE and got.getpixel((31, 31)) == WHITE and got.getpixel((16, 16)) == BLACK
    assert sum(p == BLACK for p in pixels(got)) == 16 * 16 and sum(p == WHITE for p in pixels(got)) == 32 * 32 - 256


def img2dataset_matte(colour: int, alpha: int) -> int:
    """img2dataset's resizer: ``alpha / 255 * img + 255 - alpha``, rounded to the nearest integer."""
    return int(np.rint(alpha / 255 * colour + 255 - alpha))


def test_partial_alpha_is_matted_exactly_as_img2dataset_does():
    colours, alphas = [0, 1, 37, 128, 200, 254, 255], [0, 1, 64, 127, 128, 191, 254, 255]
    img = Image.new("RGBA", (len(colours), len(alphas)))
    for y, a in enumerate(alphas):
        for x, c in enumerate(colours):
            img.putpixel((x, y), (c, 255 - c, c // 2, a))
    got = load_image(encoded(img, "PNG"))
    for y, a in enumerate(alphas):
        for x, c in enumerate(colours):
            want = tuple(img2dataset_matte(v, a) for v in (c, 255 - c, c // 2))
            assert got.getpixel((x, y)) == want, (c, a)


def test_la_is_matted_onto_white():
    img = Image.new("LA", (3, 1))
    for x, (grey, alpha) in enumerate([(100, 0), (100, 128), (100, 255)]):
        img.putpixel((x, 0), (grey, alpha))
    assert pixels(load_image(encoded(img, "PNG"))) == [WHITE, (177,) * 3, (100,) * 3]  # 100*128/255 + 127 = 177.2


def palette_image() -> Image.Image:
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)  # 0 black, 1 red, 2 blue
    for x in range(3):
        img.putpixel((x, 0), x)
    return img


def test_palette_png_with_a_transparent_index_and_with_trns_alphas():
    keyed = encoded(palette_image(), "PNG", transparency=0)  # tRNS: index 0 fully transparent
    assert Image.open(io.BytesIO(keyed)).mode == "P"
    assert pixels(load_image(keyed)) == [WHITE, RED, BLUE]
    partial = encoded(palette_image(), "PNG", transparency=bytes([0, 128, 255]))  # one alpha per palette entry
    assert pixels(load_image(partial)) == [WHITE, (255, 127, 127), BLUE]


def test_gif_transparency_and_colour_keys_on_l_and_rgb():
    gif = encoded(palette_image(), "GIF", transparency=0)
    assert pixels(load_image(gif)) == [WHITE, RED, BLUE]
    grey = Image.new("L", (2, 1))
    grey.putpixel((1, 0), 90)
    assert pixels(load_image(encoded(grey, "PNG", transparency=0))) == [WHITE, (90,) * 3]  # tRNS grey key
    rgb = Image.new("RGB", (2, 1), (10, 20, 30))
    rgb.putpixel((1, 0), RED)
    assert pixels(load_image(encoded(rgb, "PNG", transparency=(10, 20, 30)))) == [WHITE, RED]  # tRNS colour key


# --------------------------------------------------------------------------------- modes and bit depth


def test_cmyk_uses_pillows_formula():
    img = Image.new("CMYK", (3, 1))
    for x, value in enumerate([(255, 0, 0, 0), (0, 0, 0, 128), (100, 50, 0, 100)]):
        img.putpixel((x, 0), value)
    got = load_image(encoded(img, "TIFF"))  # lossless: exact values
    # R = (255 - C)(255 - K) / 255, likewise G from M and B from Y
    assert pixels(got) == [(0, 255, 255), (127, 127, 127), (94, 125, 155)]
    assert Image.open(io.BytesIO(encoded(img, "JPEG", quality=100))).mode == "CMYK"
    assert close(load_image(encoded(img, "JPEG", quality=100)).getpixel((0, 0)), (0, 255, 255), tol=30)


def test_greyscale_and_bilevel():
    grey = Image.new("L", (3, 1))
    for x, v in enumerate([0, 77, 255]):
        grey.putpixel((x, 0), v)
    assert pixels(load_image(encoded(grey, "PNG"))) == [(0,) * 3, (77,) * 3, (255,) * 3]
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert pixels(load_image(encoded(bilevel, "PNG"))) == [BLACK, WHITE]


SIXTEEN = [0, 128, 129, 25700, 32896, 65534, 65535]
EIGHT = [0, 0, 1, 100, 128, 255, 255]  # round(v / 257): the 16-bit range onto the 8-bit one


def test_16_bit_greyscale_png_is_scaled_not_clipped_to_white():
    img = Image.fromarray(np.array([SIXTEEN], dtype=np.uint16))
    data = encoded(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert pixels(load_image(data)) == [(v,) * 3 for v in EIGHT]


def test_16_bit_big_endian_tiff_and_pgm():
    tiff = encoded(Image.frombytes("I;16B", (len(SIXTEEN), 1), np.array(SIXTEEN, dtype=">u2").tobytes()), "TIFF")
    assert Image.open(io.BytesIO(tiff)).mode == "I;16B"
    assert pixels(load_image(tiff)) == [(v,) * 3 for v in EIGHT]
    pgm = b"P5 7 1 65535\n" + np.array(SIXTEEN, dtype=">u2").tobytes()  # 16-bit PGM: Pillow's mode "I"
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    assert pixels(load_image(pgm)) == [(v,) * 3 for v in EIGHT]


def test_16_bit_colour_png_keeps_the_high_byte():
    """Pillow reads 16-bit RGB as 8-bit RGB (no mode of its own to scale); written by hand, as Pillow cannot."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + struct.pack(">6H", 25700, 32896, 65535, 128, 129, 300)  # filter byte, then 2 RGB pixels
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b""))
    assert pixels(load_image(png)) == [(100, 128, 255), (0, 0, 1)]


def test_32_bit_integer_and_float_images():
    ints = Image.fromarray(np.array([[-5, 25700, 70000]], dtype=np.int32))
    assert ints.mode == "I"
    assert pixels(load_image(ints)) == [BLACK, (100,) * 3, WHITE]  # the 16-bit range, outside clipped
    floats = Image.fromarray(np.array([[-0.5, 0.0, 0.2, 0.5, 1.0, 3.0]], dtype=np.float32))
    data = encoded(floats, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert pixels(load_image(data)) == [BLACK, BLACK, (51,) * 3, (128,) * 3, WHITE, WHITE]  # 0..1, clipped


# ------------------------------------------------------------------------------------------ colour profiles
# ICC v2 display profiles (ICC.1:2001-04), written here byte by byte: a matrix/TRC RGB profile whose red and blue
# colorants are sRGB's blue and red (so a colour-managed viewer shows stored red as blue), and a grey profile with
# a linear tone curve. Colorants are sRGB's primaries adapted to D50, the profile connection space's white.
SRGB_D50 = {"red": (0.4361, 0.2225, 0.0139), "green": (0.3851, 0.7169, 0.0971), "blue": (0.1431, 0.0606, 0.7141)}
D50 = (0.9642, 1.0, 0.8249)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _icc_profile(colour_space: bytes, tags: dict[bytes, bytes]) -> bytes:
    """A profile of device class ``mntr`` with PCS XYZ: header, tag table, tag data (4-byte aligned)."""
    tags = {b"desc": b"desc" + bytes(4) + struct.pack(">I", 5) + b"test\0" + bytes(8 + 3 + 67), **tags}
    table, data = b"", b""
    start = 128 + 4 + 12 * len(tags)
    for signature, body in tags.items():
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", start + len(data), len(body))
        data += body
    header = (struct.pack(">I", start + len(data)) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntr" + colour_space
              + b"XYZ " + bytes(12) + b"acsp" + bytes(28) + b"".join(map(_s15, D50)) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data


def _xyz(values) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(map(_s15, values))


def _gamma(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256))


SWAPPED_RGB = _icc_profile(b"RGB ", {
    b"wtpt": _xyz(D50), b"rXYZ": _xyz(SRGB_D50["blue"]), b"gXYZ": _xyz(SRGB_D50["green"]),
    b"bXYZ": _xyz(SRGB_D50["red"]), b"rTRC": _gamma(2.2), b"gTRC": _gamma(2.2), b"bTRC": _gamma(2.2),
})
LINEAR_GREY = _icc_profile(b"GRAY", {b"wtpt": _xyz(D50), b"kTRC": _gamma(1.0)})


def _srgb_encoded(linear: float) -> int:
    """IEC 61966-2-1's transfer function, 0..1 linear light to 0..255."""
    value = 12.92 * linear if linear <= 0.0031308 else 1.055 * linear ** (1 / 2.4) - 0.055
    return round(255 * value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_an_embedded_rgb_profile_is_applied(fmt):
    """Stored (200, 30, 60) under a profile that swaps red and blue is shown about (60, 30, 200): the tone curves
    differ a little (gamma 2.2 against sRGB's), hence the tolerance."""
    options = {"quality": 100} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    stored = Image.new("RGB", (8, 8), (200, 30, 60))
    shown = load_image(encoded(stored, fmt, icc_profile=SWAPPED_RGB, **options))
    assert shown.mode == "RGB" and close(shown.getpixel((4, 4)), (60, 30, 200), tol=8)


def test_a_profile_keeps_transparency_and_is_matted_after():
    stored = Image.new("RGBA", (2, 1), (200, 30, 60, 255))
    stored.putpixel((1, 0), (200, 30, 60, 0))
    shown = load_image(encoded(stored, "PNG", icc_profile=SWAPPED_RGB))
    assert close(shown.getpixel((0, 0)), (60, 30, 200), tol=8) and shown.getpixel((1, 0)) == WHITE


def test_a_grey_profile_with_a_linear_curve_is_brightened_to_srgb():
    for mode, value in (("L", 64), ("LA", (64, 255))):
        shown = load_image(encoded(Image.new(mode, (4, 4), value), "PNG", icc_profile=LINEAR_GREY))
        assert close(shown.getpixel((1, 1)), (_srgb_encoded(64 / 255),) * 3, tol=2)  # 137, not 64


def test_srgb_missing_unreadable_and_mismatched_profiles_leave_the_values():
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    stored = Image.new("RGB", (4, 4), (200, 30, 60))
    for profile in (srgb, b"not a profile" * 20, LINEAR_GREY):  # a grey profile does not describe RGB values
        assert close(load_image(encoded(stored, "PNG", icc_profile=profile)).getpixel((1, 1)), (200, 30, 60), tol=1)


def frames(colours):
    return [Image.new("RGB", (8, 8), c) for c in colours]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_give_their_first_frame(fmt):
    first, *rest = frames([RED, BLUE, (0, 255, 0)])
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encoded(first, fmt, save_all=True, append_images=rest, duration=100, loop=0, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert set(pixels(load_image(data))) == {RED}


# ------------------------------------------------------------------------------------ refused and bad


def thin_png(width: int, height: int) -> bytes:
    return encoded(Image.new("L", (width, height), 128), "PNG")


@pytest.mark.parametrize("height", [20_000, 2_000_000])
def test_thin_images_are_refused_before_decoding(height):
    data = thin_png(1, height)  # a few KB
    with pytest.raises(BadRecord, match=rf"record 'thin': image <{len(data)} bytes> refused: 1x{height} pixels: "
                                        rf"aspect ratio {height}:1 is more than 50:1"):
        load_image(data, key="thin")
    with pytest.raises(BadRecord, match="aspect ratio"):
        load_image(Image.new("RGB", (height, 1)))


def test_the_thinnest_image_accepted_decodes():
    assert load_image(thin_png(MAX_ASPECT_RATIO, 1)).size == (50, 1)
    with pytest.raises(BadRecord, match="aspect ratio 51:1"):
        load_image(thin_png(MAX_ASPECT_RATIO + 1, 1))


def test_more_pixels_than_the_decompression_bomb_threshold_are_refused_from_the_header(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (10_000, 9_000)).save(path)  # 90 M pixels in a small file; decoded RGB would be 270 MB
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(
            BadRecord, match=rf"record 'h': image {path} refused: 10000x9000 is 90000000 pixels, more than 89478485"):
        load_image(path, key="h")


def test_non_images_truncated_and_missing_files_are_bad_records(tmp_path):
    full = encoded(Image.new("RGB", (64, 64), RED), "PNG", compress_level=0)
    cases = {"text": b"not an image", "truncated_png": full[: len(full) // 2],
             "truncated_jpeg": encoded(Image.new("RGB", (64, 64), RED), "JPEG")[:300]}
    for key, data in cases.items():
        with pytest.raises(BadRecord, match=rf"record '{key}': unreadable image <{len(data)} bytes>"):
            load_image(data, key=key)
    with pytest.raises(BadRecord, match="image file not found"):
        load_image(tmp_path / "gone.png", key="gone")


# --------------------------------------------------------------------- thin images in a recaption run

def peak_rss_mb() -> float:
    """This process's peak resident memory since the last :func:`reset_peak_rss` (Linux ``VmHWM``)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def reset_peak_rss() -> float:
    """Reset the peak to the current resident memory (``clear_refs`` 5) and return that, in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return peak_rss_mb()


def write_tar(path: Path, samples: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, image in samples.items():
            for name, data in ((f"{key}.png", image), (f"{key}.txt", b"an alt-text")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="peak memory is read from Linux /proc")
def test_thin_images_in_a_recaption_run_are_listed_and_memory_stays_flat(tiny_dirs, tmp_path):
    """The reports' shapes through `recaption` with ViT-H/14's 224-pixel input and the crop policy (where the
    short side is resized first: 1x20,000 would become 224 x 4.5 M pixels, 3 GB)."""
    from altogether.config import DecoderConfig, MapperConfig, ModelConfig
    from altogether.model import AltogetherModel, load_tokenizer
    from altogether.recaption import recaption_shards
    from altogether.tiny import TINY_CLIP, tiny_opt_config, write_tiny_clip
    from tests.conftest import save_tiny_export

    clip = write_tiny_clip(tmp_path / "clip224", model_cfg={
        **TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "image_size": 224, "patch_size": 32}})
    cfg = ModelConfig(encoder=EncoderConfig(name=f"local-dir:{clip}", pretrained=None, resize_mode="crop"),
                      mapper=MapperConfig(num_visual_tokens=4, num_layers=1, num_heads=2),
                      decoder=DecoderConfig(config=tiny_opt_config(), tokenizer=str(tiny_dirs[1])))
    tokenizer = load_tokenizer(cfg.decoder)
    model, _ = AltogetherModel.from_config(cfg, tokenizer)
    export = save_tiny_export(tmp_path / "export", (model, tokenizer, None), cfg, max_new_tokens=3, do_sample=False)
    good = encoded(Image.new("RGB", (300, 200), RED), "PNG")
    for name, samples in {"warm": {"a": good, "b": good, "c": good},
                          "thin": {"a": good, "tall": thin_png(1, 20_000), "taller": thin_png(1, 2_000_000)}}.items():
        (tmp_path / name).mkdir()
        write_tar(tmp_path / name / f"{name}.tar", samples)
    run = {"num_workers": 0, "batch_size": 2, "progress_bar": False}
    recaption_shards(export, str(tmp_path / "warm"), tmp_path / "out-warm", **run)  # imports and first-use caches

    before = reset_peak_rss()
    summary = recaption_shards(export, str(tmp_path / "thin"), tmp_path / "out-thin", **run)
    growth = peak_rss_mb() - before
    assert summary["samples"] == {"captioned": 1, "bad": 2, "failed_downloads": 0, "bad_not_listed": 0}
    reasons = {b["key"]: b["reason"] for b in summary["bad_samples"]}
    assert "1x20000 pixels: aspect ratio 20000:1" in reasons["tall"]
    assert "1x2000000 pixels: aspect ratio 2000000:1" in reasons["taller"]
    assert growth < 100, growth  # the report: +5.6 GB, then MemoryError


# ------------------------------------------------------------------------------ the resize policy


def wide_photo_with_an_object_at_the_edge() -> Image.Image:
    """16:9, grey, with a red square touching the right edge: what a centre crop cuts away."""
    img = Image.new("RGB", (160, 90), (128, 128, 128))
    img.paste(RED, (145, 38, 160, 53))
    return img


def encoder_input(transform, image) -> torch.Tensor:
    """The transform's output mapped back to 0..1 RGB (the tiny CLIP normalises with mean = std = 0.5)."""
    return transform(image) * 0.5 + 0.5


def red_pixels(x: torch.Tensor) -> int:
    return int(((x[0] > 0.7) & (x[1] < 0.3) & (x[2] < 0.3)).sum())


def seen_policy(transform) -> str:
    """Which resize policy a transform applies, told apart from its output on the wide photo."""
    x = encoder_input(transform, wide_photo_with_an_object_at_the_edge())
    if not red_pixels(x):
        return "crop"
    return "pad" if bool((x[:, 0, :] > 0.95).all()) else "squash"  # pad: white rows above the photo


def test_an_object_at_the_edge_reaches_the_encoder_under_the_default_policy(tiny_dirs):
    name = f"local-dir:{tiny_dirs[0]}"
    photo = load_image(encoded(wide_photo_with_an_object_at_the_edge(), "JPEG", quality=95))
    seen = {}
    for mode in (None, "squash", "pad", "crop"):
        cfg = EncoderConfig(name=name, pretrained=None) if mode is None else EncoderConfig(name=name, pretrained=None, resize_mode=mode)
        _, transform = ImageEncoder.from_config(cfg)
        seen[mode] = x = encoder_input(transform, photo)
        assert x.shape == (3, 32, 32)
    assert EncoderConfig().resize_mode == "squash"
    assert torch.equal(seen[None], seen["squash"]) and red_pixels(seen[None]) >= 4
    assert red_pixels(seen[None][:, :, -3:]) >= 4  # still at the right edge, in the last columns
    assert red_pixels(seen["pad"]) >= 2
    assert red_pixels(seen["crop"]) == 0  # the centre crop keeps 90 of 160 columns
    # pad: the photo fills rows 7..24 of 32 (90/160 of the height), white above and below
    rows = seen["pad"].mean(dim=(0, 2))
    assert bool((rows[:6] > 0.95).all()) and bool((rows[26:] > 0.95).all()) and bool((rows[10:22] < 0.6).all())
