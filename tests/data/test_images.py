"""sskd/data/images.py: every common image mode -> H x W x 3 uint8 RGB, and clear errors."""

import numpy as np
import pytest
from PIL import Image

from sskd.data.errors import DataError
from sskd.data.images import (image_size, is_image_file, load_image, load_image_tensor,
                              load_label_image)

H, W = 6, 9


def _rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".webp"])
def test_lossless_rgb_round_trip(tmp_path, suffix):
    a = _rgb()
    p = tmp_path / f"x{suffix}"
    Image.fromarray(a).save(p, **({"lossless": True} if suffix == ".webp" else {}))
    out = load_image(p)
    assert out.dtype == np.uint8 and out.shape == (H, W, 3) and out.flags.writeable
    np.testing.assert_array_equal(out, a)
    assert image_size(p) == (H, W)


def test_jpeg_close_to_source(tmp_path):
    a = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    Image.fromarray(a).save(tmp_path / "x.JPG", quality=95)
    out = load_image(tmp_path / "x.JPG")
    assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - a).max() <= 3


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = _rgb()[..., 0]
    Image.fromarray(g).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (H, W, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_sixteen_bit_grayscale_scaled_not_clipped(tmp_path):
    g16 = np.array([[0, 257, 1000, 32768, 65535]], np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_image(tmp_path / "g16.png")
    # 65535 -> 255, 32768 -> 128, 1000 -> 4; clipping would give 255 for all but 0
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 4, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_sixteen_bit_rgb_png(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rgb16 = np.zeros((2, 3, 3), np.uint16)
    rgb16[..., 0] = 65535
    rgb16[..., 1] = 32896  # 128 * 257
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])  # OpenCV writes BGR
    out = load_image(tmp_path / "c16.png")
    np.testing.assert_array_equal(out[0, 0], [255, 128, 0])


def test_rgba_alpha_composited_over_background(tmp_path):
    a = np.zeros((2, 2, 4), np.uint8)
    a[..., :3] = (200, 100, 50)
    a[..., 3] = [[255, 0], [128, 255]]
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])   # opaque: unchanged
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])        # transparent: background
    assert np.abs(out[1, 0].astype(int) - [100, 50, 25]).max() <= 1  # half: blended
    white = load_image(tmp_path / "a.png", background=(255, 255, 255))
    np.testing.assert_array_equal(white[0, 1], [255, 255, 255])


def test_palette_la_cmyk_and_bilevel(tmp_path):
    a = _rgb()
    Image.fromarray(a).quantize(8).save(tmp_path / "p.png")
    pal = load_image(tmp_path / "p.png")
    np.testing.assert_array_equal(pal, np.asarray(Image.open(tmp_path / "p.png").convert("RGB")))
    assert len(np.unique(pal.reshape(-1, 3), axis=0)) <= 8

    la = np.stack([np.full((H, W), 90, np.uint8), np.full((H, W), 255, np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png"), np.full((H, W, 3), 90))

    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "c.tif")[0, 0], [255, 0, 0])

    Image.new("1", (W, H), 1).save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_image(tmp_path / "b.png"), np.full((H, W, 3), 255))


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 250, 240, 230] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "pt.png", transparency=0)
    out = load_image(tmp_path / "pt.png")
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [250, 240, 230]])


def test_float_image(tmp_path):
    f = np.array([[0.0, 0.5, 1.0]], np.float32)
    Image.fromarray(f, "F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif")[0, :, 1], [0, 128, 255])
    Image.fromarray(f * 10, "F").save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"big\.tif.*\[0, 1\]"):
        load_image(tmp_path / "big.tif")


def test_exif_orientation_applied_and_reported(tmp_path):
    a = np.zeros((4, 10, 3), np.uint8)
    a[0, 0] = 255  # a white corner pixel to follow
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.png", exif=exif.tobytes())
    assert image_size(tmp_path / "r.png") == (10, 4)
    out = load_image(tmp_path / "r.png")
    assert out.shape == (10, 4, 3)
    assert tuple(np.argwhere(out[..., 0] == 255)[0]) == (0, 3)  # top-left -> top-right
    assert load_image(tmp_path / "r.png", exif=False).shape == (4, 10, 3)


def test_load_image_tensor_shape_range_and_resize(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "x.png")
    t = load_image_tensor(tmp_path / "x.png")
    assert tuple(t.shape) == (3, H, W) and str(t.dtype) == "torch.float32"
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy() * 255, a, atol=1e-4)
    assert tuple(load_image_tensor(tmp_path / "x.png", size=8).shape) == (3, 8, 8)
    r = load_image_tensor(tmp_path / "x.png", size=(4, 5))
    assert tuple(r.shape) == (3, 4, 5) and 0.0 <= float(r.min()) and float(r.max()) <= 1.0


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: image file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match=r"nope\.png"):
        image_size(tmp_path / "nope.png")
    (tmp_path / "junk.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match=r"junk\.jpg: not a readable image"):
        load_image(tmp_path / "junk.jpg")
    with pytest.raises(DataError, match="not a file"):
        load_image(tmp_path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_is_an_error_not_partial_pixels(tmp_path, suffix):
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"f{suffix}")
    data = (tmp_path / f"f{suffix}").read_bytes()
    (tmp_path / f"t{suffix}").write_bytes(data[: len(data) // 2])
    assert image_size(tmp_path / f"t{suffix}") == (64, 64)  # the header is still fine
    with pytest.raises(DataError, match=rf"t\{suffix}: corrupt or truncated"):
        load_image(tmp_path / f"t{suffix}")


def test_label_image_keeps_sixteen_bit_values(tmp_path):
    ids = np.array([[0, 7, 26001], [26002, 24000, 33005]], np.uint16)
    Image.fromarray(ids).save(tmp_path / "ids.png")
    out = load_label_image(tmp_path / "ids.png")
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, ids)
    Image.fromarray(_rgb()).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="single-channel"):
        load_label_image(tmp_path / "rgb.png")


def test_is_image_file_case_insensitive():
    assert is_image_file("a/B.JPEG") and is_image_file("x.TiF") and is_image_file("y.webp")
    assert not is_image_file("notes.txt") and not is_image_file("archive.png.zip")
