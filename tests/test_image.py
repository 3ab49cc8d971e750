import io

import numpy as np
import pytest
from PIL import Image

from serving import image as image_module
from serving.image import InputError, prepare_image


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def grey16(value: int, size: tuple[int, int]) -> Image.Image:
    """A flat 16-bit greyscale image."""
    return Image.frombytes("I;16", size, np.full(size[::-1], value, dtype="<u2").tobytes())


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "RGB", "1"])
def test_every_mode_becomes_rgb(mode):
    im = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode) if mode != "I;16" else grey16(40000, (40, 30))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    out = prepare_image(encode(im, fmt), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_sixteen_bit_grey_is_scaled_not_clipped():
    im = grey16(32768, (8, 8))
    out = prepare_image(encode(im, "TIFF"), 4)
    assert 120 <= out.mean() <= 135


def test_transparency_goes_over_white():
    out = prepare_image(encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0))), 4)
    assert out.min() == 255


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = prepare_image(encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=95), (20, 40))
    assert out.shape == (40, 20, 3)
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # white half is now on top


def test_resize_is_pillow_bilinear():
    pixels = np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((24, 24), Image.BILINEAR))
    assert np.array_equal(prepare_image(encode(Image.fromarray(pixels)), 24), expected)


@pytest.mark.parametrize("payload, message", [
    (b"", "empty"),
    (b"hello, not an image", "not an image"),
    (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "truncated"),
])
def test_bad_bytes_are_refused_clearly(payload, message):
    with pytest.raises(InputError, match=message):
        prepare_image(payload, 16)


def test_huge_images_are_refused(monkeypatch):
    monkeypatch.setattr(image_module, "MAX_PIXELS", 100 * 100)
    with pytest.raises(InputError, match="pixels"):
        prepare_image(encode(Image.new("RGB", (200, 200))), 16)
    monkeypatch.setattr(image_module, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(InputError, match="bytes"):
        prepare_image(encode(Image.new("RGB", (8, 8))), 16)


def test_large_images_are_reduced_early_and_small_ones_are_untouched():
    import io

    from serving.image import prepare_image as prepare

    gradient = np.linspace(0, 255, 4000, dtype=np.float64)
    big = np.stack([np.add.outer(gradient, gradient) / 2] * 3, axis=-1).astype(np.uint8)  # (4000, 4000, 3)
    exact = np.asarray(Image.fromarray(big).resize((80, 80), Image.BILINEAR), dtype=np.float64)
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.fromarray(big).save(buffer, format=fmt)
        fast = prepare(buffer.getvalue(), 80)
        assert fast.shape == (80, 80, 3)
        assert np.abs(fast - exact).mean() < 2.0, fmt  # a smooth image: reduced decoding is close to exact
    face = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, format="JPEG")
    with Image.open(io.BytesIO(buffer.getvalue())) as im:
        plain = np.asarray(im.convert("RGB").resize((80, 80), Image.BILINEAR))
    assert np.array_equal(prepare(buffer.getvalue(), 80), plain)  # training-size faces: exactly the old pixels
