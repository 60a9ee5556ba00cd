"""Reading images: header probing (size, mode, EXIF orientation) without decoding, and a full-decode check.

Pillow's own decompression-bomb limit is switched off here because `probe` applies the configured
`max_pixels` itself, from the header, before anything is decoded.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = None  # replaced by probe()'s own max_pixels guard, applied before decoding

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                              ".avif"})
EXIF_ORIENTATION = 0x0112
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, IndexError, TypeError,
                  Image.DecompressionBombError)


class Rejected(Exception):
    """An image that cannot be used, with a contract reason code and a human detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Probe:
    width: int           # upright, after EXIF orientation
    height: int
    stored_width: int    # as stored in the file
    stored_height: int
    orientation: int     # EXIF orientation 1..8 (1 = upright)
    mode: str            # Pillow mode: RGB, RGBA, P, L, CMYK, I;16, ...
    format: str          # JPEG, PNG, WEBP, ...
    frames: int


def probe(data: bytes, *, max_pixels: int, min_side: int, verify: bool) -> Probe:
    """Size, mode and orientation from the header; with `verify`, also decode fully. Raises Rejected."""
    if not data:
        raise Rejected("unreadable", "empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            info = _header(im)
    except UnidentifiedImageError:
        raise Rejected("not_image", "not a recognised image format") from None
    except _DECODE_ERRORS as e:
        raise _decode_rejection(e) from None
    pixels = info.stored_width * info.stored_height
    if pixels > max_pixels:
        raise Rejected("too_large", f"{info.stored_width}x{info.stored_height} = {pixels} pixels > "
                                    f"max_pixels {max_pixels}")
    if min(info.width, info.height) < min_side:
        raise Rejected("too_small", f"{info.width}x{info.height}: shorter side < min_side {min_side}")
    if verify:
        decode_check(data)
    return info


def _header(im: Image.Image) -> Probe:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise SyntaxError(f"invalid size {w}x{h}")
    try:
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is not a broken image; keep it upright
        orientation = 1
    if orientation not in range(1, 9):
        orientation = 1
    uw, uh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return Probe(uw, uh, w, h, orientation, im.mode, im.format or "?", int(getattr(im, "n_frames", 1)))


def decode_check(data: bytes) -> None:
    """Decode every pixel (first frame) and, for PNG, check chunk CRCs. Raises Rejected."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "PNG":
                im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except _DECODE_ERRORS as e:
        raise _decode_rejection(e) from None


def _decode_rejection(error: Exception) -> Rejected:
    text = str(error) or type(error).__name__
    if "truncat" in text.lower() or isinstance(error, EOFError):
        return Rejected("truncated", text)
    return Rejected("unreadable", f"{type(error).__name__}: {text}")


def open_upright(path: Any) -> Image.Image:
    """The first frame of an image, EXIF-rotated upright, fully loaded."""
    from PIL import ImageOps

    with Image.open(path) as im:
        im.load()
        return ImageOps.exif_transpose(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode as 8-bit RGB: 16/32-bit grey scaled (not clipped), transparency composited on white,
    CMYK and palette converted."""
    import numpy as np

    grey_scale = {"I;16": 1 / 257, "I;16B": 1 / 257, "I;16L": 1 / 257, "I": 1 / 257, "F": 255.0}.get(im.mode)
    if grey_scale is not None:  # 16-bit ints span 0..65535, floats 0..1
        grey = np.rint(np.asarray(im, dtype=np.float64) * grey_scale)
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_planned(path: Any, resize: tuple[int, int], crop: tuple[int, int], bucket: tuple[int, int]):
    """An image as the bucket plan says: upright RGB, resized (Lanczos) to `resize`, cropped at `crop` to
    `bucket`. Returns uint8 HxWx3."""
    import numpy as np

    im = to_rgb(open_upright(path))
    if im.size != tuple(resize):
        im = im.resize(tuple(resize), Image.LANCZOS)
    left, top = crop
    return np.asarray(im.crop((left, top, left + bucket[0], top + bucket[1])))
