"""Photorealistic style transfer (Luan, Paris, Shechtman & Bala, "Deep Photo Style Transfer", 2017)."""

from .laplacian import matting_laplacian, matting_loss
from .masks import auto_masks, mask_pairs
from .smoothing import guided_smooth, guided_upsample
from .transfer import PhotoOptions, photo_transfer

__all__ = ["PhotoOptions", "auto_masks", "guided_smooth", "guided_upsample", "mask_pairs", "matting_laplacian",
           "matting_loss", "photo_transfer"]
