"""Semantic masks for photorealistic transfer: colour-coded segmentations, or automatic ones.

A class is a colour present in both the content's and the style's mask; the style loss is then
computed per class, so the sky takes the look of the reference's sky, not of its buildings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ImpastoError, warn

# The palette of Luan et al.'s code; a pixel belongs to a colour if every channel is within 0.1 of it.
PALETTE: dict[str, tuple[float, float, float]] = {
    "blue": (0.0, 0.0, 1.0), "green": (0.0, 1.0, 0.0), "black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0),
    "red": (1.0, 0.0, 0.0), "yellow": (1.0, 1.0, 0.0), "grey": (0.5, 0.5, 0.5), "lightblue": (0.0, 1.0, 1.0),
    "purple": (1.0, 0.0, 1.0),
}
TOLERANCE = 0.1
MIN_CLASS_FRACTION = 0.002  # a colour covering less of both masks is not a class
MAX_UNMATCHED_FRACTION = 0.05  # anti-aliased edges are ignored; more unmatched pixels is an error


@dataclass
class MaskPair:
    """One class: where it is in the content (H, W) and in the style (h, w), as float masks."""

    name: str
    content: torch.Tensor
    style: torch.Tensor


def match_colour(mask: torch.Tensor, colour: tuple[float, float, float], tolerance: float = TOLERANCE) -> torch.Tensor:
    """(H, W) bool: pixels of a (3, H, W) mask within `tolerance` of `colour` in every channel."""
    target = torch.tensor(colour, dtype=mask.dtype).view(3, 1, 1)
    return ((mask - target).abs() <= tolerance + 1e-6).all(dim=0)


def _is_region(hit: torch.Tensor) -> bool:
    """A class, not the anti-aliased edge between two others (grey between black and white):
    it covers enough pixels, and most of them survive a 3x3 erosion."""
    if hit.float().mean() < MIN_CLASS_FRACTION:
        return False
    eroded = -F.max_pool2d(-hit[None, None].float(), 3, stride=1, padding=1)
    return bool(eroded.sum() >= 0.3 * hit.sum())


def _frequent_colours(mask: torch.Tensor, where: torch.Tensor, min_fraction: float) -> list[tuple[float, ...]]:
    pixels = (mask.permute(1, 2, 0)[where] * 255).round().to(torch.int64)
    if len(pixels) == 0:
        return []
    colours, counts = torch.unique(pixels, dim=0, return_counts=True)
    keep = counts >= min_fraction * where.numel()
    return [tuple(c / 255.0 for c in colour.tolist()) for colour in colours[keep]]


def mask_classes(content_mask: torch.Tensor, style_mask: torch.Tensor) -> list[tuple[str, tuple[float, float, float]]]:
    """The classes of two masks: palette colours, plus any other frequent colour (custom palettes)."""
    classes: list[tuple[str, tuple[float, float, float]]] = []
    unmatched = []
    for mask in (content_mask, style_mask):
        hit = torch.zeros(mask.shape[-2:], dtype=torch.bool)
        for colour in PALETTE.values():
            hit |= match_colour(mask, colour)
        unmatched.append(~hit)
    for name, colour in PALETTE.items():
        if any(_is_region(match_colour(m, colour)) for m in (content_mask, style_mask)):
            classes.append((name, colour))
    for mask, where in zip((content_mask, style_mask), unmatched, strict=True):
        for found in _frequent_colours(mask, where, 0.01):
            rgb = (found[0], found[1], found[2])
            distinct = all(max(abs(a - b) for a, b in zip(rgb, c, strict=True)) > TOLERANCE for _, c in classes)
            if distinct and _is_region(match_colour(mask, rgb)):
                classes.append((f"rgb({round(rgb[0] * 255)},{round(rgb[1] * 255)},{round(rgb[2] * 255)})", rgb))
    return classes


def mask_pairs(content_mask: torch.Tensor, style_mask: torch.Tensor, content_hw: tuple[int, int],
               style_hw: tuple[int, int], names: tuple[str, str] = ("content mask", "style mask")) -> list[MaskPair]:
    """Classes present in both masks, each as a pair of float masks at the photos' sizes.

    Masks of another size than their photo are resized nearest-neighbour; a class on one side only
    is skipped with a warning; too many pixels matching no class is an error.
    """
    for label, mask, hw in zip(names, (content_mask, style_mask), (content_hw, style_hw), strict=True):
        h, w = mask.shape[-2:]
        if abs(w * hw[0] - h * hw[1]) > 0.01 * w * hw[0]:  # aspect ratios differ by more than 1 %
            warn(f"the {label} is {w}x{h} but its photo is {hw[1]}x{hw[0]}: stretched to fit")
    content_mask = _resize_nearest(content_mask, content_hw)
    style_mask = _resize_nearest(style_mask, style_hw)
    classes = mask_classes(content_mask, style_mask)
    pairs: list[MaskPair] = []
    covered = [torch.zeros(content_hw, dtype=torch.bool), torch.zeros(style_hw, dtype=torch.bool)]
    for name, colour in classes:
        c, s = match_colour(content_mask, colour), match_colour(style_mask, colour)
        covered[0] |= c
        covered[1] |= s
        if c.float().mean() < MIN_CLASS_FRACTION or s.float().mean() < MIN_CLASS_FRACTION:
            side = names[1] if c.any() else names[0]
            warn(f"mask colour {name} is missing from the {side}; that region gets no style loss")
            continue
        pairs.append(MaskPair(name, c.float(), s.float()))
    for label, mask, hit in zip(names, (content_mask, style_mask), covered, strict=True):
        fraction = 1 - hit.float().mean().item()
        if fraction > MAX_UNMATCHED_FRACTION:
            example = _frequent_colours(mask, ~hit, 0.0)
            rgb = tuple(round(v * 255) for v in example[0]) if example else ()
            raise ImpastoError(f"{fraction:.0%} of the {label}'s pixels match no mask colour (e.g. rgb{rgb}); "
                               f"use the colours of the other mask or the standard palette")
    if not pairs:
        raise ImpastoError("the content and style masks share no colour; nothing to match")
    return pairs


def _resize_nearest(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(mask.shape[-2:]) == tuple(hw):
        return mask
    return F.interpolate(mask[None], size=hw, mode="nearest-exact")[0]


# --- automatic masks --------------------------------------------------------------------------


def rgb_to_lab(image: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65) of a (3, H, W) sRGB image in [0, 1]."""
    linear = torch.where(image > 0.04045, ((image + 0.055) / 1.055) ** 2.4, image / 12.92)
    m = torch.tensor([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
                     dtype=image.dtype)
    xyz = torch.einsum("ij,jhw->ihw", m, linear) / torch.tensor([0.95047, 1.0, 1.08883]).view(3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _pixel_features(image: torch.Tensor, position_weight: float) -> torch.Tensor:
    """(H*W, 5): Lab colour and position (in Lab units), for k-means."""
    h, w = image.shape[-2:]
    lab = rgb_to_lab(image)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    pos = torch.stack([ys, xs]) * position_weight
    return torch.cat([lab, pos]).reshape(5, -1).T.double()


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 30) -> torch.Tensor:
    """Cluster centres of (N, D) points: k-means++ seeding, then Lloyd's iterations."""
    generator = torch.Generator().manual_seed(seed)
    centres = points[torch.randint(len(points), (1,), generator=generator)]
    for _ in range(1, k):
        d = torch.cdist(points, centres).min(dim=1).values ** 2
        probs = d / d.sum() if d.sum() > 0 else torch.full_like(d, 1 / len(d))
        centres = torch.cat([centres, points[torch.multinomial(probs, 1, generator=generator)]])
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(dim=1)
        for j in range(k):
            members = points[labels == j]
            if len(members):
                centres[j] = members.mean(dim=0)
    return centres


def auto_masks(content: torch.Tensor, style: torch.Tensor, k: int, seed: int = 0,
               position_weight: float = 40.0, work_size: int = 96) -> list[MaskPair]:
    """Segment both photos into `k` regions (k-means on Lab colour and position) and pair the regions
    of the two photos by their colour and position statistics (Hungarian matching), so that masked
    transfer works with two photos and nothing else."""
    from scipy.optimize import linear_sum_assignment

    if k < 1:
        raise ImpastoError("--auto-masks needs at least 1 region")
    labels, stats = [], []
    for image in (content, style):
        small = _resize_long_side(image, work_size)
        centres = kmeans(_pixel_features(small, position_weight), k, seed)
        full = _pixel_features(image, position_weight)
        lab = torch.cdist(full, centres).argmin(dim=1).reshape(image.shape[-2:])
        labels.append(lab)
        stats.append(_standardized(centres))
    cost = torch.cdist(stats[0], stats[1]).numpy()
    rows, cols = linear_sum_assignment(cost)
    pairs: list[MaskPair] = []
    for r, c in zip(rows, cols, strict=True):
        cm, sm = (labels[0] == r).float(), (labels[1] == c).float()
        if cm.mean() >= MIN_CLASS_FRACTION and sm.mean() >= MIN_CLASS_FRACTION:
            pairs.append(MaskPair(f"region {len(pairs) + 1}", cm, sm))
    return pairs


def _standardized(centres: torch.Tensor) -> torch.Tensor:
    """Centres with each photo's colour standardized, so a dusk photo's sky still pairs with a noon sky."""
    colour, pos = centres[:, :3], centres[:, 3:]
    colour = (colour - colour.mean(0)) / colour.std(0).clamp_min(1e-6) if len(centres) > 1 else colour * 0
    return torch.cat([colour, pos / pos.std().clamp_min(1e-6) if len(centres) > 1 else pos], dim=1)


def _resize_long_side(image: torch.Tensor, size: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    scale = min(1.0, size / max(h, w))
    hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(image[None], size=hw, mode="area")[0] if scale < 1 else image


__all__ = ["PALETTE", "MaskPair", "auto_masks", "mask_pairs", "match_colour", "rgb_to_lab"]
