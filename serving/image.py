"""Decode one uploaded or on-disk image into the uint8 (H, W, 3) RGB array the ONNX graphs take.

Training imports this too, so the model is trained on exactly the pixels the server will feed it.
"""

from __future__ import annotations

import ctypes
import io
import sys
import threading
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # larger uploads are refused before decoding
MAX_PIXELS = 40_000_000  # width x height above this is refused as a possible decompression bomb
LARGE_PIXELS = 4_000_000  # images this large (after JPEG draft scaling) are decoded one at a time
DRAFT_FACTOR = 4  # JPEGs over this many times the target size are decoded at reduced scale (libjpeg DCT)
_large_decode = threading.BoundedSemaphore(1)  # bounds memory: one large decode at a time per process


NOT_AN_IMAGE = "the file is not an image Pillow can read (JPEG, PNG, WebP, BMP, GIF, TIFF ...) or it is truncated"


class InputError(ValueError):
    """Input that cannot be scored; the message says what is wrong and is safe to show a client."""


def check_length(data: bytes) -> None:
    """Refuse empty or oversize encoded images."""
    if len(data) == 0:
        raise InputError("the image file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise InputError(f"the image is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES} bytes")


def check_pixels(width: int, height: int) -> None:
    """Refuse images over MAX_PIXELS, before they are decoded."""
    if width * height > MAX_PIXELS:
        raise InputError(f"the image is {width}x{height} pixels; the limit is {MAX_PIXELS} pixels")


def check_header(data: bytes) -> None:
    """The checks that need no decoding: length, a header Pillow can read, and the pixel count."""
    check_length(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise InputError(NOT_AN_IMAGE) from None
    check_pixels(*size)


def prepare_image(source: bytes | str | Path | Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    """Decode, apply EXIF orientation, convert to RGB and resize bilinear to (height, width, 3) uint8.

    `source` is encoded bytes, a file path, or an opened (not yet loaded) Pillow image.
    `size` is a side in pixels or (width, height), as Pillow takes it. A JPEG over DRAFT_FACTOR times
    the target size is decoded at a reduced DCT scale (still at least that large) to save memory and time.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    return np.asarray(decode_rgb(source, size, lambda im: im.resize(size, Image.BILINEAR)), dtype=np.uint8)


def decode_rgb(source: bytes | str | Path | Image.Image, size: tuple[int, int], finish=None) -> Image.Image:
    """The decoded RGB image, EXIF orientation applied, at least DRAFT_FACTOR x `size` when it was larger
    (JPEG DCT scaling, then box reduction), with `finish` (e.g. a resize) applied inside the large-decode
    bound. Raises InputError saying what is wrong."""
    if isinstance(source, Image.Image):
        stream = source
    elif isinstance(source, (bytes, bytearray)):
        check_length(source)
        stream = io.BytesIO(source)
    else:
        stream = Path(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with (stream if isinstance(stream, Image.Image) else Image.open(stream)) as im:
                check_pixels(*im.size)
                if im.format == "JPEG":
                    im.draft(im.mode, (size[0] * DRAFT_FACTOR, size[1] * DRAFT_FACTOR))
                large = im.size[0] * im.size[1] > LARGE_PIXELS
                with _large_decode if large else nullcontext():
                    im.load()
                    im = reduce_large(im, size)
                    ImageOps.exif_transpose(im, in_place=True)  # no copy of the decoded image
                    rgb = to_rgb(im)
                    result = finish(rgb) if finish else rgb.copy() if rgb is im else rgb
                if large:
                    release_memory()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"the image is too large to decode safely: {exc}") from None
    except UnidentifiedImageError:
        raise InputError(NOT_AN_IMAGE) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"the image could not be decoded ({exc}); is it truncated or corrupt?") from None
    return result


def reduce_large(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An image over DRAFT_FACTOR times the target size, box-reduced to at least that (the one full-size
    copy is the decoded one); smaller images, such as the 200 px training faces, are returned untouched."""
    factor = min(im.size[0] // (size[0] * DRAFT_FACTOR), im.size[1] // (size[1] * DRAFT_FACTOR))
    if factor < 2 or im.mode in ("P", "1"):
        return im
    return im.reduce(factor)


def release_memory() -> None:
    """Hand freed heap pages back to the OS after a large decode (glibc keeps them otherwise)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit and float grey scaled down, transparency over white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(grey.max()), 1.0)
        im = Image.fromarray(np.clip(grey / top * 255.0 + 0.5, 0, 255).astype(np.uint8))  # (H, W) -> mode L
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")  # no copy of an image that is RGB already
