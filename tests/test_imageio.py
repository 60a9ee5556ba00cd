import numpy as np
import pytest
from PIL import Image

from shared.images import load_planned, to_rgb
from tests.conftest import noise_image, save


def quadrants(w, h):
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2:] = (0, 255, 0)
    arr[h // 2:, : w // 2] = (0, 0, 255)
    arr[h // 2:, w // 2:] = (255, 255, 0)
    return Image.fromarray(arr)


def test_load_planned_geometry(tmp_path):
    path = save(quadrants(400, 200), tmp_path / "q.png")
    out = load_planned(str(path), (256, 128), (64, 0), (128, 128))   # centre 128x128 of a 256x128 resize
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    assert tuple(out[10, 10]) == (255, 0, 0) and tuple(out[10, 117]) == (0, 255, 0)
    assert tuple(out[117, 10]) == (0, 0, 255) and tuple(out[117, 117]) == (255, 255, 0)


def test_exif_rotation_is_applied(tmp_path):
    upright = quadrants(200, 300)
    stored = upright.transpose(Image.Transpose.ROTATE_90)   # what a camera writes before tagging it
    exif = Image.Exif()
    exif[0x0112] = 6                                         # "rotate 90 CW to view"
    path = save(stored, tmp_path / "r.png", exif=exif.tobytes())
    out = load_planned(str(path), (200, 300), (0, 0), (192, 256))
    assert tuple(out[5, 5]) == (255, 0, 0) and tuple(out[250, 180]) == (255, 255, 0)


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.new("I;16", (8, 8), 40000), (156, 156, 156)),
    (lambda: Image.new("RGBA", (8, 8), (10, 20, 30, 0)), (255, 255, 255)),
    (lambda: Image.new("LA", (8, 8), (0, 255)), (0, 0, 0)),
    (lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
])
def test_modes_become_rgb(make, expected):
    rgb = to_rgb(make())
    assert rgb.mode == "RGB" and rgb.getpixel((3, 3)) == expected


def test_palette_with_transparency_on_white(tmp_path):
    img = noise_image(8, 8).convert("P")
    img.info["transparency"] = img.getpixel((0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)
