"""The fast engine: feed-forward style networks (Johnson et al. 2016) — train, apply, export, import."""

from .models import load_model, save_model
from .transformer import TransformerNet, TransformerSpec

__all__ = ["TransformerNet", "TransformerSpec", "load_model", "save_model"]
