"""Local affine colour models guided by the content photo (the guided filter of He, Sun & Tang).

Each output channel is modelled, in every (2r+1)^2 window, as an affine function a . I + b of the
guide's colours. Fitting that model to a stylized image and re-applying it removes the distortions
that are not locally affine (Luan et al.'s post-process), and fitting it at low resolution and
applying it to the full-resolution guide brings a result to full size sharply (He & Sun 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..images import resize


def _box(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over (2r+1)^2 windows, shrinking at the borders; x is (..., H, W)."""
    shape = x.shape
    flat = x.reshape(-1, 1, *shape[-2:])
    out = F.avg_pool2d(flat, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)
    return out.reshape(shape)


def affine_coefficients(guide: torch.Tensor, source: torch.Tensor, radius: int = 2,
                        eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel a (3 out, 3 in, H, W) and b (3, H, W) with source ~ a . guide + b in each window,
    averaged over the windows that cover each pixel. Inputs are (3, H, W) in [0, 1]."""
    g, s = guide.double(), source.double()
    mean_g, mean_s = _box(g, radius), _box(s, radius)
    cov_gg = _box(g[:, None] * g[None], radius) - mean_g[:, None] * mean_g[None]  # (3, 3, H, W)
    cov_sg = _box(s[:, None] * g[None], radius) - mean_s[:, None] * mean_g[None]  # (3 out, 3 in, H, W)
    eye = torch.eye(3, dtype=g.dtype)[:, :, None, None]
    sigma = (cov_gg + eps * eye).permute(2, 3, 0, 1)  # (H, W, 3, 3)
    a = torch.linalg.solve(sigma, cov_sg.permute(2, 3, 1, 0)).permute(3, 2, 0, 1)  # (3 out, 3 in, H, W)
    b = mean_s - (a * mean_g[None]).sum(1)
    return _box(a, radius), _box(b, radius)


def apply_affine(guide: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """q = a . guide + b per pixel, clamped to [0, 1]."""
    return ((a * guide.double()[None]).sum(1) + b).clamp(0, 1).to(guide.dtype)


def guided_smooth(guide: torch.Tensor, source: torch.Tensor, radius: int = 2, eps: float = 1e-4) -> torch.Tensor:
    """`source` re-expressed as a locally affine function of `guide`'s colours."""
    a, b = affine_coefficients(guide, source, radius, eps)
    return apply_affine(guide, a, b)


def guided_upsample(guide_full: torch.Tensor, result_low: torch.Tensor, radius: int = 2,
                    eps: float = 1e-4) -> torch.Tensor:
    """Bring a low-resolution result to the size of `guide_full` through the local affine model:
    fit it against the guide at low resolution, upsample the coefficients, apply them at full size.
    The guide is shrunk with `images.resize`, the same filter that made the image the result was optimized
    against, so a result that is exactly locally affine in it keeps that model at full size."""
    h, w = result_low.shape[-2:]
    guide_low = resize(guide_full, (h, w))
    a, b = affine_coefficients(guide_low, result_low, radius, eps)
    size = guide_full.shape[-2:]
    a_full = F.interpolate(a.reshape(1, 9, h, w), size=size, mode="bilinear", align_corners=False).reshape(3, 3, *size)
    b_full = F.interpolate(b[None], size=size, mode="bilinear", align_corners=False)[0]
    return apply_affine(guide_full, a_full, b_full)
