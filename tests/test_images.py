"""Images in and out: loading checks, EXIF orientation, alpha, colour spaces, resizing, atomic saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from impasto import images
from impasto.errors import ImpastoError


def write_png(path, array: np.ndarray, mode: str):
    im = Image.fromarray(array)  # the mode follows from the array's shape
    assert im.mode == mode
    im.save(path)
    return path


# --- loading -------------------------------------------------------------------------------------


def test_load_image_roundtrip_values_and_layout(tmp_path):
    arr = np.zeros((5, 7, 3), dtype=np.uint8)
    arr[1, 2] = (255, 0, 0)
    arr[3, 6] = (0, 128, 255)
    t = images.load_image(write_png(tmp_path / "a.png", arr, "RGB"))
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32
    assert t[:, 1, 2].tolist() == [1.0, 0.0, 0.0]
    assert t[:, 3, 6].tolist() == pytest.approx([0.0, 128 / 255, 1.0])
    assert float(t.sum()) == pytest.approx(1.0 + (128 + 255) / 255)


@pytest.mark.parametrize("shape", [(10, 1), (1, 10), (1, 1)])
def test_load_image_refuses_one_pixel_side(tmp_path, shape):
    path = write_png(tmp_path / "thin.png", np.full((*shape, 3), 200, dtype=np.uint8), "RGB")
    with pytest.raises(ImpastoError, match="at least 2"):
        images.load_image(path)


def test_load_image_accepts_two_pixel_side(tmp_path):
    path = write_png(tmp_path / "two.png", np.full((2, 9, 3), 10, dtype=np.uint8), "RGB")
    assert images.load_image(path).shape == (3, 2, 9)


def test_load_image_missing_directory_and_garbage(tmp_path):
    with pytest.raises(ImpastoError, match="not found"):
        images.load_image(tmp_path / "nope.png")
    with pytest.raises(ImpastoError, match="directory"):
        images.load_image(tmp_path)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(ImpastoError):
        images.load_image(garbage)


def test_exif_orientation_is_honoured(tmp_path):
    # Stored 40 wide x 20 high, with a red block in the stored top-left corner.
    arr = np.full((20, 40, 3), 255, dtype=np.uint8)
    arr[:8, :8] = (255, 0, 0)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    im.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as check:  # the file really has the tag and the stored size
        assert check.getexif().get(0x0112) == 6 and check.size == (40, 20)

    t = images.load_image(path)
    assert t.shape == (3, 40, 20)  # H and W transposed
    # Rotating 90 degrees clockwise moves the stored top-left corner to the top-right.
    top_right = t[:, :8, -8:].mean(dim=(1, 2))
    top_left = t[:, :8, :8].mean(dim=(1, 2))
    assert top_right[0] > 0.9 and top_right[1] < 0.2 and top_right[2] < 0.2
    assert top_left.min() > 0.9  # white


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    arr[0, 1] = (0, 0, 255, 255)  # opaque blue
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    arr[1:, :] = (0, 255, 0, 0)  # transparent green -> white
    t = images.load_image(write_png(tmp_path / "alpha.png", arr, "RGBA"))
    assert t.shape == (3, 4, 4)
    assert t[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert t[:, 0, 1].tolist() == [0.0, 0.0, 1.0]
    grey = 1 - 128 / 255
    assert t[:, 0, 2].tolist() == pytest.approx([grey] * 3, abs=1.5 / 255)
    assert torch.equal(t[:, 1:, :], torch.ones(3, 3, 4))


def test_la_and_palette_transparency_composited_on_white(tmp_path):
    la = np.zeros((3, 3, 2), dtype=np.uint8)
    la[..., 0] = 0
    la[..., 1] = 0  # transparent black
    t = images.load_image(write_png(tmp_path / "la.png", la, "LA"))
    assert torch.equal(t, torch.ones(3, 3, 3))

    p = Image.new("P", (3, 3), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    path = tmp_path / "p.png"
    p.save(path, transparency=0)
    t = images.load_image(path)
    assert t[:, 1, 1].tolist() == [1.0, 0.0, 0.0]
    assert t[:, 0, 0].tolist() == [1.0, 1.0, 1.0]


def test_grayscale_becomes_three_equal_channels(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    t = images.load_image(write_png(tmp_path / "g.png", arr, "L"))
    assert t.shape == (3, 3, 4)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    np.testing.assert_allclose(t[0].numpy(), arr / 255, atol=1e-6)


def test_sixteen_bit_image_keeps_its_brightness(tmp_path):
    arr = np.linspace(0, 32767, 64).reshape(8, 8).astype(np.uint16)  # black to 50% grey
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    t = images.load_image(path)
    np.testing.assert_allclose(t[0].numpy(), arr / 65535, atol=1 / 255)


# --- saving and metadata -------------------------------------------------------------------------


def test_save_image_png_metadata_roundtrip(tmp_path):
    meta = {"iterations": 12, "style_weight": 10.0, "styles": ["a.jpg", "b.png"], "nested": {"x": None}}
    image = torch.rand(3, 6, 5)
    out = images.save_image(image, tmp_path / "out.png", meta)
    assert out == tmp_path / "out.png"
    assert images.read_metadata(out) == meta
    loaded = images.load_image(out)
    assert loaded.shape == (3, 6, 5)
    assert (loaded - image).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only


def test_save_image_jpeg_metadata_and_no_metadata(tmp_path):
    meta = {"seed": 3}
    images.save_image(torch.rand(3, 8, 8), tmp_path / "out.jpg", meta)
    assert images.read_metadata(tmp_path / "out.jpg") == meta
    images.save_image(torch.rand(3, 8, 8), tmp_path / "plain.png")
    assert images.read_metadata(tmp_path / "plain.png") is None


def test_save_image_unknown_extension(tmp_path):
    with pytest.raises(ImpastoError, match="unknown image format"):
        images.save_image(torch.rand(3, 4, 4), tmp_path / "out.xyz")
    assert list(tmp_path.iterdir()) == []


def _failing_save(exc: BaseException):
    real_save = Image.Image.save

    def save(self, fp, format=None, **params):
        real_save(self, fp, format=format, **params)  # a (complete) file is on disk at the temp path...
        with open(fp, "r+b") as f:  # ... truncated, as if the disk filled up mid-way
            f.truncate(10)
        raise exc

    return save


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_save_image_is_atomic(tmp_path, monkeypatch, exc):
    monkeypatch.setattr(Image.Image, "save", _failing_save(exc))
    expected = ImpastoError if isinstance(exc, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        images.save_image(torch.rand(3, 8, 8), tmp_path / "out.png", {"a": 1})
    assert not (tmp_path / "out.png").exists()
    assert list(tmp_path.glob(".*.part")) == []
    assert list(tmp_path.iterdir()) == []


def test_save_image_failure_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    images.save_image(torch.zeros(3, 4, 4), target, {"version": 1})
    before = target.read_bytes()
    monkeypatch.setattr(Image.Image, "save", _failing_save(OSError(5, "I/O error")))
    with pytest.raises(ImpastoError, match="cannot write"):
        images.save_image(torch.ones(3, 4, 4), target, {"version": 2})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_save_image_creates_parent_directories(tmp_path):
    out = images.save_image(torch.rand(3, 4, 4), tmp_path / "a" / "b" / "c.png")
    assert out.is_file()
    assert list(out.parent.glob(".*.part")) == []


def test_read_metadata_missing_file(tmp_path):
    with pytest.raises(ImpastoError, match="not found"):
        images.read_metadata(tmp_path / "missing.png")


def test_tensor_to_pil_clamps_and_rounds():
    t = torch.tensor([[[-0.5, 0.5 / 255 + 1e-4]], [[1.5, 1.0]], [[0.5, 0.0]]])  # (3, 1, 2)
    arr = np.asarray(images.tensor_to_pil(t))
    assert arr.shape == (1, 2, 3)
    assert arr[0, 0].tolist() == [0, 255, 128]
    assert arr[0, 1].tolist() == [1, 255, 0]
    assert np.array_equal(np.asarray(images.tensor_to_pil(t.unsqueeze(0))), arr)


def test_side_by_side_layout():
    a = torch.zeros(3, 10, 20)  # scaled to 5 x 10
    b = torch.full((3, 20, 10), 0.5)  # scaled to height 5: width 2.5, rounded
    sheet = images.side_by_side([a, b], height=5, gap=3)
    width_b = max(1, round(10 * 5 / 20))
    assert sheet.shape == (3, 5, 10 + 3 + width_b)
    assert torch.equal(sheet[:, :, :10], torch.zeros(3, 5, 10))
    assert torch.equal(sheet[:, :, 10:13], torch.ones(3, 5, 3))  # white gap
    assert torch.allclose(sheet[:, :, 13:], torch.full((3, 5, width_b), 0.5), atol=1e-6)


# --- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w", "new_w", "expected"), [
    (300, 400, 200, (150, 200)),
    (400, 300, 150, (200, 150)),
    (100, 100, 37, (37, 37)),
    (3, 1000, 10, (1, 10)),  # never zero
])
def test_size_for_width(h, w, new_w, expected):
    assert images.size_for_width(h, w, new_w) == expected


@pytest.mark.parametrize(("h", "w", "side", "expected"), [
    (300, 400, 100, (75, 100)),
    (400, 300, 100, (100, 75)),
    (480, 640, 64, (48, 64)),
    (50, 50, 512, (512, 512)),
    (2, 1000, 100, (1, 100)),
])
def test_size_for_long_side(h, w, side, expected):
    assert images.size_for_long_side(h, w, side) == expected


@pytest.mark.parametrize(("h", "w"), [(333, 517), (517, 333), (123, 456), (1080, 1920)])
@pytest.mark.parametrize("target", [64, 97, 256])
def test_size_helpers_keep_aspect(h, w, target):
    nh, nw = images.size_for_long_side(h, w, target)
    assert max(nh, nw) == target
    assert abs(nh / nw - h / w) <= 1 / min(nh, nw)  # within rounding of one pixel
    nh, nw = images.size_for_width(h, w, target)
    assert nw == target
    assert abs(nh - h * target / w) <= 0.5


def test_resize_shape_range_and_noop():
    torch.manual_seed(0)
    image = torch.rand(3, 20, 30)
    assert images.resize(image, (20, 30)) is image
    small = images.resize(image, (10, 15))
    assert small.shape == (3, 10, 15) and small.min() >= 0 and small.max() <= 1
    big = images.resize(image.unsqueeze(0), (40, 60))
    assert big.shape == (1, 3, 40, 60) and big.min() >= 0 and big.max() <= 1
    flat = torch.full((3, 20, 30), 0.25)
    assert torch.allclose(images.resize(flat, (7, 11)), torch.full((3, 7, 11), 0.25), atol=1e-6)
    # antialiased shrinking averages a fine checkerboard to grey
    checker = ((torch.arange(32).view(32, 1) + torch.arange(32).view(1, 32)) % 2).float().expand(3, 32, 32)
    assert torch.allclose(images.resize(checker, (4, 4)), torch.full((3, 4, 4), 0.5), atol=0.02)


# --- colour --------------------------------------------------------------------------------------


def test_rgb_to_yiq_known_values_and_inverse():
    white, black = torch.ones(3, 1, 1), torch.zeros(3, 1, 1)
    grey = torch.full((3, 1, 1), 0.4)
    assert rgb_yiq_close(images.rgb_to_yiq(white), [1.0, 0.0, 0.0])
    assert rgb_yiq_close(images.rgb_to_yiq(black), [0.0, 0.0, 0.0])
    assert rgb_yiq_close(images.rgb_to_yiq(grey), [0.4, 0.0, 0.0])
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert rgb_yiq_close(images.rgb_to_yiq(red), [0.299, 0.595716, 0.211456])
    torch.manual_seed(1)
    x = torch.rand(2, 3, 5, 6)
    torch.testing.assert_close(images.yiq_to_rgb(images.rgb_to_yiq(x)), x, atol=1e-5, rtol=1e-5)


def rgb_yiq_close(yiq: torch.Tensor, expected: list[float]) -> bool:
    return torch.allclose(yiq.flatten(), torch.tensor(expected), atol=1e-5)


def test_transfer_luminance_keeps_y_of_result_and_iq_of_content(make_scene):
    content = make_scene(24, 32, seed=1, low=0.3, high=0.7)
    result = make_scene(12, 16, seed=2, low=0.3, high=0.7)
    out = images.transfer_luminance(result, content)
    assert out.shape == result.shape
    yiq_out = images.rgb_to_yiq(out)
    yiq_content = images.rgb_to_yiq(images.resize(content, (12, 16)))
    torch.testing.assert_close(yiq_out[0], images.rgb_to_yiq(result)[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(yiq_out[1:], yiq_content[1:], atol=1e-4, rtol=0)


def test_match_color_mean_and_covariance_equal_target(make_scene):
    rng = np.random.default_rng(0)
    # source: a bluish image with correlated channels; target: a mid-range reddish scene
    base = rng.uniform(0.0, 0.3, size=(1, 20, 20))
    noise = rng.uniform(0.0, 0.2, size=(3, 20, 20))
    source = torch.tensor(base + noise + np.array([0.1, 0.2, 0.4]).reshape(3, 1, 1), dtype=torch.float32)
    target = make_scene(24, 24, seed=5, low=0.35, high=0.65)
    target = target * torch.tensor([1.1, 0.8, 0.7]).view(3, 1, 1)
    out = images.match_color(source, target)
    assert out.shape == source.shape
    assert out.min() > 0 and out.max() < 1  # no clamping happened, so the statistics are exact

    def stats(t: torch.Tensor):
        flat = t.reshape(3, -1).double().numpy()
        return flat.mean(axis=1), np.cov(flat, bias=True)

    mu_o, cov_o = stats(out)
    mu_t, cov_t = stats(target)
    mu_s, cov_s = stats(source)
    np.testing.assert_allclose(mu_o, mu_t, atol=1e-5)
    np.testing.assert_allclose(cov_o, cov_t, atol=1e-5)
    assert np.abs(mu_s - mu_t).max() > 0.05 and np.abs(cov_s - cov_t).max() > 1e-3  # the test is not trivial
