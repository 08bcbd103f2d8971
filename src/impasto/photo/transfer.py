"""The photorealistic engine: masked Gatys transfer, then the same with the matting-Laplacian
regularizer, then local-affine smoothing and full-resolution output guided by the content photo."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import images
from ..artistic import (
    StylizeOptions,
    check_memory,
    check_style_size,
    initial_image,
    loss_network,
    optimizer_settings,
    output_sizes,
    style_size,
)
from ..errors import ImpastoError
from ..optimize import Objective, Outcome, Progress, Stage, run_stages
from ..perceptual import autocast_for, build_loss, check_min_size, network_objective, resolve_device
from .laplacian import matting_laplacian, matting_loss, to_torch_sparse
from .masks import MaskPair, auto_masks, mask_pairs
from .smoothing import guided_smooth, guided_upsample

PHOTO_CONTENT_LAYERS = ("conv4_2",)
PHOTO_STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")


MAX_AUTO_MASKS = 32  # regions worth a Gram each; k-means over more costs minutes and gives slivers


@dataclass
class PhotoOptions(StylizeOptions):
    """The artistic options (Luan et al.'s layers as defaults) plus masks and the photorealism terms."""

    content_layers: list[str] = field(default_factory=lambda: list(PHOTO_CONTENT_LAYERS))
    style_layers: list[str] = field(default_factory=lambda: list(PHOTO_STYLE_LAYERS))
    style_weight: float = 10.0
    tv_weight: float = 0.0
    affine_weight: float = 1e4  # weight of the matting-Laplacian term (second pass)
    auto_masks: int = 0  # segment both photos into K regions when no masks are given
    two_pass: bool = True  # first pass without the regularizer, second from it with
    smooth: bool = True  # local-affine smoothing post-process
    smooth_radius: int = 2
    smooth_eps: float = 1e-4
    full_resolution: bool = True  # output at the content's size through the local affine model

    FLAGS: ClassVar[dict[str, str]] = {"style_scales": "--style-scale"}  # one style photo, one scale

    def check(self, n_styles: int) -> None:
        super().check(n_styles)
        if n_styles != 1:
            raise ImpastoError("photo takes exactly one style photo")
        if self.scales:
            raise ImpastoError("photo optimizes at one --size; --scales is for stylize")
        if self.preserve_color != "none":
            raise ImpastoError("--preserve-color is for stylize; photo transfers colour by design")
        if self.affine_weight < 0 or self.auto_masks < 0 or self.smooth_radius < 1 or self.smooth_eps <= 0:
            raise ImpastoError("--affine-weight and --auto-masks must not be negative; --smooth-radius and "
                               "--smooth-eps must be positive")
        if self.auto_masks > MAX_AUTO_MASKS:
            raise ImpastoError(f"--auto-masks makes at most {MAX_AUTO_MASKS} regions, got {self.auto_masks}")


def check_masks(content_mask: object, style_mask: object, opts: PhotoOptions) -> None:
    """Both masks or neither; given masks and --auto-masks exclude each other."""
    if (content_mask is None) != (style_mask is None):
        raise ImpastoError("give both --content-mask and --style-mask, or neither")
    if content_mask is not None and opts.auto_masks:
        raise ImpastoError("use either --auto-masks or --content-mask/--style-mask, not both")


def photo_transfer(
    content: torch.Tensor,
    style: torch.Tensor,
    opts: PhotoOptions | None = None,
    content_mask: torch.Tensor | None = None,
    style_mask: torch.Tensor | None = None,
    callbacks: Sequence[Callable[[Progress], None]] = (),
    resume: dict | None = None,
) -> Outcome:
    """Give the (3, H, W) `content` photo the look of the `style` photo; masks are (3, H, W) colour-coded."""
    opts = opts or PhotoOptions()
    opts.check(1)
    check_masks(content_mask, style_mask, opts)
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    net = loss_network(opts, device)
    hw = output_sizes((content.shape[-2], content.shape[-1]), opts)[0]
    check_min_size(net, hw, "the output")
    check_memory(net, hw, opts, device)
    small = images.resize(content, hw)
    style_hw = style_size(style, hw, (opts.style_scales or [1.0])[0])
    check_style_size(net, style_hw, device, opts.flag("style_scales"), "the style photo")
    style_small = images.resize(style, style_hw)
    regions = _regions(content, style, content_mask, style_mask, opts)
    scaled = None if regions is None else [(_fit(r.content, hw), _fit(r.style, style_hw)) for r in regions]
    autocast = autocast_for(device, opts.amp)

    def base() -> Objective:
        loss = build_loss(net, small.to(device), [style_small.to(device)], opts, autocast, scaled)
        return network_objective(net, loss, autocast)

    def regularized() -> Objective:
        laplacian = to_torch_sparse(matting_laplacian(small), device)
        return with_matting(base(), laplacian, opts.affine_weight)

    stages = [Stage(hw, opts.iterations, base, "pass 1/2")] if opts.two_pass else []
    stages.append(Stage(hw, opts.iterations, regularized if opts.affine_weight else base,
                        "pass 2/2 (photorealism)" if opts.two_pass else ""))
    start = initial_image(content, opts, hw) if resume is None else small
    outcome = run_stages(start, stages, optimizer_settings(opts), callbacks, resume, device)
    out = outcome.image.clamp(0, 1)
    if not outcome.interrupted:
        try:
            out = finish(content, out, opts)
        except KeyboardInterrupt:  # the optimization is done: keep its working-size result, resumable
            return Outcome(out, outcome.loss, outcome.iterations, True, outcome.state)
    return Outcome(out, outcome.loss, outcome.iterations, outcome.interrupted, outcome.state)


def with_matting(objective: Objective, laplacian: torch.Tensor, weight: float) -> Objective:
    """`objective` plus weight * the matting-Laplacian loss, reported as the term 'affine'."""
    def regularized(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, terms = objective(x)
        terms["affine"] = weight * matting_loss(x, laplacian)
        return total + terms["affine"], terms

    return regularized


def finish(content: torch.Tensor, result: torch.Tensor, opts: PhotoOptions) -> torch.Tensor:
    """Local-affine smoothing at the working size, then the content's full size through the same model."""
    small = images.resize(content, (result.shape[-2], result.shape[-1]))
    if opts.smooth:
        result = guided_smooth(small, result, opts.smooth_radius, opts.smooth_eps)
    if opts.full_resolution and tuple(content.shape[-2:]) != tuple(result.shape[-2:]):
        result = guided_upsample(content, result, opts.smooth_radius, opts.smooth_eps)
    return result


def _regions(content: torch.Tensor, style: torch.Tensor, content_mask: torch.Tensor | None,
             style_mask: torch.Tensor | None, opts: PhotoOptions) -> list[MaskPair] | None:
    if content_mask is not None and style_mask is not None:
        return mask_pairs(content_mask, style_mask, (content.shape[-2], content.shape[-1]),
                          (style.shape[-2], style.shape[-1]))
    if opts.auto_masks:
        return auto_masks(content, style, opts.auto_masks, opts.seed)
    return None


def _fit(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A full-size float mask at the working size (area-averaged, so edges stay soft)."""
    return torch.nn.functional.interpolate(mask[None, None], size=hw, mode="area")[0, 0]
