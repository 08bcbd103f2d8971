"""Loss networks and their weights."""

from .vgg import VGG_LAYER_NAMES, Normalization, VGGFeatures
from .weights import load_vgg, load_vgg_weights

__all__ = ["VGG_LAYER_NAMES", "Normalization", "VGGFeatures", "load_vgg", "load_vgg_weights"]
