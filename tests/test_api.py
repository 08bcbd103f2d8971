"""The one-call API: what it accepts, what it refuses (by name, before any work), and what it returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import impasto
from impasto.api import as_tensor
from impasto.errors import ImpastoError, ImpastoWarning

FAST = dict(iterations=3, size=32, weights="random", pooling="avg", style_layers="relu1_1,relu2_1",
            content_layers="relu2_1", device="cpu")


def test_stylize_takes_tensors_pil_images_and_any_iterable_of_styles(make_scene, make_texture):
    content = make_scene(40, 48)
    styles = [make_texture((0.9, 0.1, 0.1), 24, 24), make_texture((0.1, 0.1, 0.9), 24, 24)]
    given = [styles[0], impasto.images.tensor_to_pil(styles[1])]
    with pytest.warns(ImpastoWarning, match="random VGG weights"):
        from_list = impasto.stylize(content, given, **FAST)
    with pytest.warns(ImpastoWarning, match="random VGG weights"):
        from_generator = impasto.stylize(content[None], (s for s in given), **FAST)  # and a (1, 3, H, W) content
    with pytest.warns(ImpastoWarning, match="random VGG weights"):
        one_style = impasto.stylize(content, styles[0], **FAST)
    assert isinstance(from_list, Image.Image) and from_list.size == (32, 27)
    assert np.array_equal(np.asarray(from_list), np.asarray(from_generator))
    assert not np.array_equal(np.asarray(one_style), np.asarray(from_list))  # the second style counted
    start = impasto.images.tensor_to_pil(impasto.images.resize(content, (27, 32)))
    assert not np.array_equal(np.asarray(from_list), np.asarray(start))


@pytest.mark.parametrize(("image", "message"), [
    (torch.rand(32, 40, 3), r"expected a \(3, H, W\) image tensor, got shape \(32, 40, 3\); this looks channels-last"),
    (torch.rand(1, 32, 40), r"expected a \(3, H, W\) image tensor, got shape \(1, 32, 40\)$"),
    (torch.rand(2, 3, 8, 8), r"got shape \(2, 3, 8, 8\)"),
    (torch.rand(3, 8, 8) * 255, r"expected values in \[0, 1\], got .* \(divide 0-255 images by 255\)"),
    (torch.ones(3, 8, 8, dtype=torch.int64), "expected a float or uint8 image tensor, got torch.int64"),
    (42, "expected an image path, a PIL image or a tensor, got int"),
])
def test_images_of_another_layout_are_refused_not_misread(image, message):
    with pytest.raises(ImpastoError, match=message):
        as_tensor(image)


def test_a_resampling_overshoot_is_clamped_with_a_warning():
    t = torch.tensor([-0.1, 0.5, 1.12]).view(3, 1, 1).expand(3, 2, 2)
    with pytest.warns(ImpastoWarning, match=r"^image values run from -0.1 to 1.12; clamped to \[0, 1\]$"):
        assert torch.equal(as_tensor(t), t.clamp(0, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_float_tensors_of_any_precision_are_read_as_float32(make_scene, make_texture, dtype):
    """float64 met the float32 weights and float16 could not be resized: both were PyTorch errors."""
    content, style = make_scene(40, 48), make_texture((0.9, 0.1, 0.1), 24, 24)
    assert as_tensor(content.to(dtype)).dtype == torch.float32
    with pytest.warns(ImpastoWarning, match="random VGG weights"):
        got = impasto.stylize(content.to(dtype), style.to(dtype), **FAST)
    with pytest.warns(ImpastoWarning, match="random VGG weights"):
        want = impasto.stylize(content.to(dtype).float(), style.to(dtype).float(), **FAST)
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_uint8_tensors_are_read_as_0_to_255():
    t = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)
    assert torch.equal(as_tensor(t), t.float() / 255)


def test_an_unknown_option_is_refused_by_name_before_any_work(make_scene, make_texture):
    with pytest.raises(ImpastoError, match=r"^unknown option 'iteration'; did you mean 'iterations'\? \(options: "):
        impasto.stylize(make_scene(8, 8), make_texture((0.5, 0.5, 0.5), 8, 8), iteration=3, weights="/nonexistent")


def test_ctrl_c_returns_the_best_image_so_far_and_says_so(make_scene, make_texture, monkeypatch):
    import os
    import signal

    from impasto.progress import ProgressBar

    original = ProgressBar.__call__

    def interrupted_at_2(self, progress):
        original(self, progress)
        if progress.step.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ProgressBar, "__call__", interrupted_at_2)
    content, style = make_scene(40, 48), make_texture((0.9, 0.1, 0.1), 24, 24)
    with pytest.warns(ImpastoWarning) as record:
        image = impasto.stylize(content, style, **FAST)
    assert "interrupted after 2 iterations; returning the best image so far" in [str(w.message) for w in record]
    assert isinstance(image, Image.Image) and image.size == (32, 27)
