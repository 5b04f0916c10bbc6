"""The one image decoder: a path, encoded bytes, a PIL image or a pixel array in, the RGB image a viewer shows out.

Every path that looks at an image (training samples, the embedding cache, :class:`~altogether.Recaptioner`,
``recaption``, ``evaluate``, annotation CLIP scores) decodes it with :func:`load_image`, so each rule below is
decided once:

* **Cost, before decoding.** The header's size is checked first. More than :data:`MAX_IMAGE_AREA` pixels
  (Pillow's decompression-bomb threshold) or a long side more than :data:`MAX_ASPECT_RATIO` times the short
  side is refused. The ratio bounds what every resize policy (``model.encoder.resize_mode``) costs for an
  encoder input of S x S pixels: ``crop`` resizes the short side to S, so at most S x 50 S pixels (2.5 M at
  ViT-H/14's 224, 7.5 MB) instead of the 224 x 4.5 M (3 GB) a 1x20,000 image would cost; ``pad`` fits the long
  side, so the short side keeps at least S / 50 pixels (open_clip refuses a side rounded to 0); ``squash`` is
  always S x S. Web banners (728x90 is 8:1, 970x90 is 11:1) are well inside the ratio.
* **Animated images** (GIF, WebP, APNG): the first frame, what a viewer shows before playing (Pillow opens a
  file on it; the other frames are never decoded). A PIL image passed in keeps the frame it is on.
* **Orientation**: the EXIF Orientation tag is applied (:func:`PIL.ImageOps.exif_transpose`), so a phone photo
  stored sideways comes out upright, as annotators saw it.
* **Transparency** (an alpha channel: ``RGBA``, ``LA``, ``PA``; a palette with alpha; a ``tRNS`` colour key on
  ``P``, ``L`` or ``RGB``) is matted onto white, as img2dataset does before it re-encodes
  (``out = round(a / 255 * c + 255 - a)`` per channel, for the alpha ``a`` and colour ``c`` in 0..255).
* **Bit depth.** 16-bit greyscale (``I;16``, ``I;16B``, ...) and ``I`` (Pillow's mode for 16-bit PGM and older
  16-bit PNG) are scaled from 0..65535 to 0..255 (``round(v / 257)``, values outside clipped), not clipped to
  white as Pillow's own ``convert`` does. Floating point (``F``) is read as 0..1 (``round(v * 255)``,
  clipped), the display range of float image formats. 16-bit colour PNGs come from Pillow as 8-bit ``RGB`` or
  ``RGBA`` holding each sample's high byte (``v >> 8``, at most one level below ``round(v / 257)``).
* **Colour profiles.** An embedded ICC profile (``icc_profile``: phone photos in Display P3, Adobe RGB exports,
  print CMYK, grey profiles) is applied as a colour-managed viewer applies it: colours are converted to sRGB
  with LittleCMS (:mod:`PIL.ImageCms`) under the profile's own rendering intent, alpha kept as it was. An
  image without a profile, a profile that cannot be read, or one whose colour space does not match the image
  (a grey profile on an RGB image) is taken as sRGB, as browsers do. 16-bit and float images are not
  converted.
* **Other modes** use Pillow's conversion: ``L`` and ``1`` repeat the grey value, ``P`` looks up its palette,
  ``CMYK`` without a profile is ``R = (255 - C) (255 - K) / 255`` (likewise G from M and B from Y).

* **Pixel arrays** (numpy arrays and torch tensors, as Hugging Face image processors take them): ``H x W``,
  ``H x W x C`` or ``C x H x W`` with ``C`` 1, 3 or 4 (4: RGBA, matted as above). When both ends could be
  channels (a 3 x 4 x 3 array), a torch tensor is read channels-first and a numpy array channels-last, their
  libraries' own conventions. ``uint8`` is taken as it is, ``bool`` as black and white, floats must lie in
  0..1 (scaled by 255 and rounded); normalised tensors (negative values) and other dtypes are refused.
* **URLs** are refused with a hint: images are read from local files; download them first.

Anything that cannot be decoded (not an image, a truncated file, a missing file, a refused size) raises
:class:`~altogether.data.records.BadRecord` naming the record, so callers skip it, count it and list the reason.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .readers import NO_LOCAL_IMAGE, URL_SCHEMES
from .records import BadRecord, ImageRef

MAX_IMAGE_AREA = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS default: about 0.25 GB at 24 bits per pixel
MAX_ASPECT_RATIO = 50  # long side / short side; see the module docstring for what it bounds
WHITE = (255, 255, 255)

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# The ICC colour space an image mode's values are in, for the modes whose profile is applied.
_PROFILE_SPACES = {"RGB": "RGB", "RGBA": "RGB", "P": "RGB", "L": "GRAY", "LA": "GRAY", "CMYK": "CMYK"}
_SRGB = ImageCms.createProfile("sRGB")


class _Refused(ValueError):
    """An image whose size alone makes it too costly to decode or resize."""


def image_file(img_path: str, image_root: str | Path | None, *, key: str = "",
               allow_outside_root: bool = False) -> Path:
    """The file a row's ``img_path`` names, relative to ``image_root`` (default: the current folder); it may not
    exist.

    Raises :class:`BadRecord` naming ``key`` when the path (after ``..`` and symbolic links) leaves ``image_root``,
    unless ``allow_outside_root``: a row must not be able to copy ``/etc/passwd`` into a training set.
    """
    root = Path(image_root or ".").resolve()
    path = (root / img_path).resolve()
    if not allow_outside_root and not path.is_relative_to(root):
        raise BadRecord(f"record {key!r}: img_path {img_path!r} is outside the image root {root} "
                        "(set allow_outside_root=true to allow)")
    return path


def load_image(image: ImageRef, *, key: str = "") -> Image.Image:
    """Decode a path, encoded bytes, PIL image or pixel array into the RGB PIL image a viewer shows (module
    docstring).

    Raises :class:`BadRecord` (message names ``key`` and the image) when the file is missing, unreadable,
    truncated, refused for its size, a URL, or an array of a shape or range that is not an image. A PIL image or
    array passed in is never modified.
    """
    where = f"record {key!r}: " if key else ""
    if isinstance(image, str) and image.lower().startswith(URL_SCHEMES):
        raise BadRecord(f"{where}image {image} is a URL: {NO_LOCAL_IMAGE}")
    try:
        if isinstance(image, Image.Image):
            return _as_viewed(image, opened=False)
        if hasattr(image, "__array__") and not isinstance(image, (bytes, bytearray)):
            return _as_viewed(_from_array(image), opened=False)
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
        with Image.open(source) as img:
            return _as_viewed(img, opened=True)
    except FileNotFoundError:
        raise BadRecord(f"{where}image file not found: {image}") from None
    except _Refused as err:
        raise BadRecord(f"{where}image {_shown(image)} refused: {err}") from None
    except UnidentifiedImageError:  # Pillow's message names the in-memory file object, a different text each run
        raise BadRecord(f"{where}unreadable image {_shown(image)}: not an image format Pillow reads") from None
    except (Image.DecompressionBombError, OSError, ValueError) as err:
        raise BadRecord(f"{where}unreadable image {_shown(image)}: {err}") from None


def _shown(image: ImageRef) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    if hasattr(image, "shape") and hasattr(image, "dtype"):
        return f"<{type(image).__name__} of shape {tuple(image.shape)}, {image.dtype}>"
    return f"<{len(image)} bytes>" if isinstance(image, (bytes, bytearray)) else "image"


def _from_array(array) -> Image.Image:
    """A numpy array or torch tensor as a PIL image (the module docstring's rules); ValueError if it is not one."""
    import numpy as np

    channels_first = hasattr(array, "detach")  # torch's convention when the shape does not tell
    if channels_first:
        array = array.detach().cpu().numpy()
    pixels = np.asarray(array)
    shape = pixels.shape
    if pixels.ndim == 3:
        first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
        if first and (not last or channels_first):
            pixels = pixels.transpose(1, 2, 0)
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or pixels.ndim == 3 and pixels.shape[-1] not in (3, 4) or 0 in pixels.shape:
        raise ValueError(f"an array of shape {shape} is not an image: give H x W, H x W x C or C x H x W with C "
                         "1, 3 or 4")
    if pixels.dtype == np.bool_:
        pixels = pixels.astype(np.uint8) * 255
    elif pixels.dtype.kind == "f":
        low, high = float(np.min(pixels)), float(np.max(pixels))
        if not (0.0 <= low and high <= 1.0):  # also refuses NaN
            raise ValueError(f"float pixels must lie in 0..1, these span {low:g}..{high:g} (a normalised tensor? "
                             "pass the image before normalisation, or uint8 0..255)")
        pixels = np.round(pixels * 255).astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise ValueError(f"pixels of dtype {pixels.dtype}: give uint8 (0..255) or floats in 0..1")
    return Image.fromarray(np.ascontiguousarray(pixels))


def _as_viewed(img: Image.Image, *, opened: bool) -> Image.Image:
    width, height = img.size
    if width * height > MAX_IMAGE_AREA:
        raise _Refused(f"{width}x{height} is {width * height} pixels, more than {MAX_IMAGE_AREA}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        ratio = max(width, height) / max(min(width, height), 1)
        raise _Refused(f"{width}x{height} pixels: aspect ratio {ratio:.0f}:1 is more than {MAX_ASPECT_RATIO}:1")
    img.load()  # decode now: a truncated file fails here, inside the caller's error handling
    if opened:
        ImageOps.exif_transpose(img, in_place=True)
    else:
        img = ImageOps.exif_transpose(img)
    return _to_rgb(_in_srgb(img))


def _in_srgb(img: Image.Image) -> Image.Image:
    """``img`` with its embedded ICC profile applied: ``RGB`` (``RGBA`` if it has transparency) in sRGB; ``img``
    itself when it has no profile, or one that cannot be read or does not fit its mode."""
    icc = img.info.get("icc_profile")
    space = _PROFILE_SPACES.get(img.mode)
    if not icc or space is None:
        return img
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != space:
            return img
        alpha = None
        if img.mode in _ALPHA_MODES or "transparency" in img.info or img.mode == "P":
            with_alpha = img.convert("LA" if space == "GRAY" else "RGBA")
            alpha = with_alpha.getchannel("A")
            img = with_alpha
        colours = img.convert({"GRAY": "L", "RGB": "RGB", "CMYK": "CMYK"}[space])
        out = ImageCms.profileToProfile(colours, profile, _SRGB, renderingIntent=ImageCms.getDefaultIntent(profile),
                                        outputMode="RGB")
    except (OSError, ImageCms.PyCMSError):  # an unreadable profile: a viewer shows the values as sRGB
        return img
    if alpha is not None and alpha.getextrema() != (255, 255):
        out.putalpha(alpha)
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16") or img.mode == "I":
        return _to_8bit(img, 1 / 257).convert("RGB")
    if img.mode == "F":
        return _to_8bit(img, 255).convert("RGB")
    transparent = img.mode in _ALPHA_MODES or "transparency" in img.info
    if img.mode == "P" and img.palette is not None and img.palette.mode.endswith("A"):
        transparent = True
    if not transparent:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    matted = Image.new("RGB", rgba.size, WHITE)
    matted.paste(rgba, mask=rgba.getchannel("A"))  # rounds (c * a + 255 * (255 - a)) / 255, img2dataset's formula
    return matted


def _to_8bit(img: Image.Image, scale: float) -> Image.Image:
    """``round(v * scale)`` clipped to 0..255 as an ``L`` image (Pillow's F -> L clips, then truncates)."""
    return img.convert("F").point(lambda v: v * scale + 0.5).convert("L")
