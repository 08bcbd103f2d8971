"""The one-call Python API."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterable

import torch
from PIL import Image

from . import images
from .artistic import StylizeOptions, stylize_tensors
from .errors import ImpastoError, warn
from .progress import ProgressBar

ImageLike = str | os.PathLike[str] | Image.Image | torch.Tensor


def as_tensor(image: ImageLike) -> torch.Tensor:
    """A path, PIL image or (3, H, W) tensor (or (1, 3, H, W); float in [0, 1] or uint8) as a (3, H, W) float
    tensor. A tensor of another layout is refused with what to do, not misread."""
    if isinstance(image, torch.Tensor):
        return _checked_tensor(image)
    if isinstance(image, Image.Image):
        return images.pil_to_tensor(image)
    if isinstance(image, (str, os.PathLike)):
        return images.load_image(image)
    raise ImpastoError(f"expected an image path, a PIL image or a tensor, got {type(image).__name__}")


def _checked_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t[0] if t.dim() == 4 and t.shape[0] == 1 else t
    if t.dim() != 3 or t.shape[0] != 3:
        hint = "; this looks channels-last: use t.permute(2, 0, 1)" if t.dim() == 3 and t.shape[-1] == 3 else ""
        raise ImpastoError(f"expected a (3, H, W) image tensor, got shape {tuple(t.shape)}{hint}")
    if t.dtype == torch.uint8:
        return t.float() / 255
    if not t.is_floating_point():
        raise ImpastoError(f"expected a float or uint8 image tensor, got {t.dtype}")
    t = t.float()  # the engines compute in float32 (float64 met float32 weights; float16 could not be resized)
    low, high = (float(t.min()), float(t.max())) if t.numel() else (0.0, 1.0)
    if high > 2 or low < -1:  # not [0, 1] with a resampling overshoot: another scale (0-255, or normalized)
        raise ImpastoError(f"expected values in [0, 1], got {low:.4g} to {high:.4g} (divide 0-255 images by 255)")
    if low < 0 or high > 1:
        warn(f"image values run from {low:.3g} to {high:.3g}; clamped to [0, 1]")
        return t.clamp(0, 1)
    return t


def _options(kind: type[StylizeOptions], options: dict[str, object]) -> StylizeOptions:
    """The options dataclass, with an unknown name refused by name (and the nearest known one)."""
    known = [f.name for f in dataclasses.fields(kind)]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise ImpastoError(f"unknown option {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                               + f" (options: {', '.join(known)})")
    return kind(**options)  # type: ignore[arg-type]


def stylize(
    content: ImageLike,
    style: ImageLike | Iterable[ImageLike],
    progress: bool = False,
    **options: object,
) -> Image.Image:
    """Repaint `content` in the style of `style` (one image, or several in a list); returns a PIL image.

    Images are paths, PIL images or (3, H, W) tensors in [0, 1]. `options` are the fields of `StylizeOptions`,
    e.g. `iterations=300, size=512, style_weight=10, style_layers="relu1_1,relu2_1"`. The VGG19 weights are
    torchvision's, downloaded on first use (`weights=PATH` or $IMPASTO_WEIGHTS for a local file).
    """
    single = isinstance(style, (str, os.PathLike, Image.Image, torch.Tensor))
    styles: list[ImageLike] = [style] if single else list(style)  # type: ignore[list-item, arg-type]
    opts = _options(StylizeOptions, options)
    bar = ProgressBar(quiet=not progress)
    try:
        result = stylize_tensors(as_tensor(content), [as_tensor(s) for s in styles], opts, [bar])
    finally:
        bar.close()
    if result.interrupted:  # Ctrl-C (a notebook's "interrupt"): the best so far, said so, not passed off as done
        warn(f"interrupted after {result.iterations} iterations; returning the best image so far")
    return images.tensor_to_pil(result.image)
