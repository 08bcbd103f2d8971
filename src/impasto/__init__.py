"""impasto: neural style transfer on PyTorch.

`stylize()` is the one-call API; the building blocks (VGG features, losses, the optimization
loop) are importable on their own for people who write their own variants.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .allocator import keep_freed_memory
from .api import stylize
from .artistic import StylizeOptions, stylize_tensors
from .errors import ImpastoError
from .losses import content_loss, gram_matrix, style_loss, tv_loss
from .nets import VGGFeatures, load_vgg
from .optimize import OptimizerSettings, optimize

__all__ = [
    "ImpastoError",
    "OptimizerSettings",
    "StylizeOptions",
    "VGGFeatures",
    "content_loss",
    "gram_matrix",
    "keep_freed_memory",
    "load_vgg",
    "optimize",
    "style_loss",
    "stylize",
    "stylize_tensors",
    "tv_loss",
]
