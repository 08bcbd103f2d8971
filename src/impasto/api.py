"""The one-call Python API."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from . import images
from .artistic import StylizeOptions, stylize_tensors
from .progress import ProgressBar

ImageLike = str | os.PathLike[str] | Image.Image | torch.Tensor


def as_tensor(image: ImageLike) -> torch.Tensor:
    """A path, PIL image or (3, H, W) tensor in [0, 1] as a (3, H, W) tensor."""
    if isinstance(image, torch.Tensor):
        return image.squeeze(0) if image.dim() == 4 else image
    if isinstance(image, Image.Image):
        return images.pil_to_tensor(image)
    return images.load_image(image)


def stylize(
    content: ImageLike,
    style: ImageLike | Sequence[ImageLike],
    progress: bool = False,
    **options: object,
) -> Image.Image:
    """Repaint `content` in the style of `style` (one image or several); returns a PIL image.

    `options` are the fields of `StylizeOptions`, e.g. `iterations=300, size=512, style_weight=10`.
    """
    styles: list[ImageLike] = list(style) if isinstance(style, (list, tuple)) else [style]  # type: ignore[list-item]
    opts = StylizeOptions(**options)  # type: ignore[arg-type]
    bar = ProgressBar(quiet=not progress)
    try:
        result = stylize_tensors(as_tensor(content), [as_tensor(s) for s in styles], opts, [bar])
    finally:
        bar.close()
    return images.tensor_to_pil(result.image)
