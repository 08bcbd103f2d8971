"""Artistic style transfer by optimization (Gatys, Ecker & Bethge 2015/2016).

Targets (content features, style Gram matrices) are computed once per scale without gradients;
the image is optimized coarse to fine over `scales`, each result upsampled as the next start.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import images
from .errors import ImpastoError
from .losses import PerceptualLoss, StyleTarget, gram_matrix, normalized
from .nets import VGG_LAYER_NAMES, VGGFeatures, load_vgg
from .optimize import Objective, OptimizerSettings, Outcome, Progress, Stage, run_stages

DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
DEFAULT_CONTENT_LAYERS = ("relu4_2",)
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.02}


@dataclass
class StylizeOptions:
    """Every setting of an artistic run; also what is stored in the output's metadata."""

    iterations: int = 500
    size: int | None = 512  # longer side of the output; None keeps the content's size
    width: int | None = None  # output width (aspect kept); overrides size
    scales: list[int] | None = None  # longer sides, coarse to fine; the last is the output size
    scale_iterations: list[int] | None = None  # iterations per scale (default: `iterations` each)
    style_blend_weights: list[float] | None = None
    style_scales: list[float] | None = None  # per style, its width relative to the content's
    content_weight: float = 1.0
    style_weight: float = 10.0
    tv_weight: float = 1.0
    tv_power: float = 2.0
    optimizer: str = "lbfgs"
    learning_rate: float | None = None  # default: 1.0 for L-BFGS, 0.02 for Adam
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    lbfgs_history: int = 100
    init: str = "content"  # content | noise | path to an image
    initial_noiseblend: float = 0.0
    seed: int = 0
    model: str = "vgg19"
    pooling: str = "max"
    weights: str | None = None
    weights_format: str = "auto"
    content_layers: list[str] = field(default_factory=lambda: list(DEFAULT_CONTENT_LAYERS))
    style_layers: list[str] = field(default_factory=lambda: list(DEFAULT_STYLE_LAYERS))
    content_layer_weights: list[float] | None = None
    style_layer_weights: list[float] | None = None
    style_layer_weight_exp: float = 1.0
    preserve_color: str = "none"  # none | luminance | histogram
    device: str = "auto"
    amp: bool = False

    def check(self, n_styles: int) -> None:
        """Refuse inconsistent options with one sentence each."""
        def positive(name: str, value: float | None) -> None:
            if value is not None and not value > 0:
                raise ImpastoError(f"--{name.replace('_', '-')} must be positive, got {value}")

        for name in ("size", "width", "iterations", "lbfgs_history"):
            positive(name, getattr(self, name))
        positive("learning_rate", self.learning_rate)
        for name in ("content_weight", "style_weight", "tv_weight", "initial_noiseblend"):
            if getattr(self, name) < 0:
                raise ImpastoError(f"--{name.replace('_', '-')} must not be negative")
        if self.initial_noiseblend > 1:
            raise ImpastoError("--initial-noiseblend must be between 0 and 1")
        _same_length("--style-blend-weights", self.style_blend_weights, n_styles, "style images")
        _same_length("--style-scales", self.style_scales, n_styles, "style images")
        _same_length("--content-layer-weights", self.content_layer_weights, len(self.content_layers), "content layers")
        _same_length("--style-layer-weights", self.style_layer_weights, len(self.style_layers), "style layers")
        for name in ("style_scales", "scales", "scale_iterations"):
            values = getattr(self, name) or []
            if any(not v > 0 for v in values):
                raise ImpastoError(f"--{name.replace('_', '-')} must all be positive")
        if self.style_blend_weights is not None:
            if any(not v >= 0 for v in self.style_blend_weights):
                raise ImpastoError("--style-blend-weights must not be negative")
            if sum(self.style_blend_weights) <= 0:
                raise ImpastoError("--style-blend-weights must not all be zero")
        if self.scale_iterations is not None:
            _same_length("--scale-iterations", self.scale_iterations, len(self.scales or []), "scales")
        if self.optimizer not in DEFAULT_LR:
            raise ImpastoError(f"unknown optimizer {self.optimizer!r}; choose lbfgs or adam")
        if self.preserve_color not in ("none", "luminance", "histogram"):
            raise ImpastoError(f"unknown --preserve-color {self.preserve_color!r}; choose none, luminance or histogram")
        if not self.style_layers and not self.content_layers:
            raise ImpastoError("no content or style layers given")
        if self.model not in VGG_LAYER_NAMES:
            raise ImpastoError(f"unknown --model {self.model!r}; choose vgg19 or vgg16")
        for layer in [*self.content_layers, *self.style_layers]:
            if layer not in VGG_LAYER_NAMES[self.model]:
                raise ImpastoError(f"{self.model} has no layer {layer!r}; layers are named like conv4_2, relu5_1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _same_length(flag: str, values: Sequence[Any] | None, n: int, what: str) -> None:
    if values is not None and len(values) != n:
        raise ImpastoError(f"{flag} has {len(values)} values but there are {n} {what}")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ImpastoError("--device cuda requested but no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ImpastoError("--device mps requested but Apple's MPS is not available")
    if name not in ("cpu", "cuda", "mps"):
        raise ImpastoError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def output_sizes(content_hw: tuple[int, int], opts: StylizeOptions) -> list[tuple[int, int]]:
    """(H, W) at each scale, coarse to fine."""
    h, w = content_hw
    if opts.scales:
        if opts.width is not None:
            raise ImpastoError("use either --scales or --width, not both")
        return [images.size_for_long_side(h, w, s) for s in opts.scales]
    if opts.width is not None:
        return [images.size_for_width(h, w, opts.width)]
    if opts.size is not None:
        return [images.size_for_long_side(h, w, opts.size)]
    return [(h, w)]


def layer_weights(layers: Sequence[str], weights: Sequence[float] | None, exp: float = 1.0) -> dict[str, float]:
    """Per-layer weights normalized to sum 1; by default layer i gets exp**i (all equal for exp=1)."""
    raw = list(weights) if weights is not None else [exp**i for i in range(len(layers))]
    if not layers:
        return {}
    return dict(zip(layers, normalized(raw), strict=True))


def estimate_bytes(net: VGGFeatures, hw: tuple[int, int], opts: StylizeOptions) -> int:
    """Rough peak memory of one optimization at (H, W): activations kept for backward, their
    gradients, and the optimizer's per-pixel state (L-BFGS keeps 2 vectors per history step)."""
    h, w = hw
    act = 0
    for name, layer in net.layers.named_children():
        if isinstance(layer, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)):
            h, w = h // 2, w // 2
        elif name.startswith("conv"):
            act += int(layer.out_channels) * h * w  # type: ignore[arg-type]
    pixels = 3 * hw[0] * hw[1]
    history = 2 * opts.lbfgs_history if opts.optimizer == "lbfgs" else 3
    return 4 * (3 * act + (history + 4) * pixels)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_memory(net: VGGFeatures, hw: tuple[int, int], opts: StylizeOptions, device: torch.device) -> None:
    need, have = estimate_bytes(net, hw, opts), available_bytes(device)
    if need > 0.8 * have:
        raise ImpastoError(
            f"a {hw[1]}x{hw[0]} run needs about {need / 2**30:.1f} GiB but {device.type} has "
            f"{have / 2**30:.1f} GiB; use a smaller --size/--width"
            + (" or a smaller --lbfgs-history / --optimizer adam" if opts.optimizer == "lbfgs" else "")
        )


def check_min_size(net: VGGFeatures, hw: tuple[int, int], what: str) -> None:
    if min(hw) < net.downsampling:
        raise ImpastoError(
            f"{what} is {hw[1]}x{hw[0]} pixels at this size; the loss network needs at least "
            f"{net.downsampling} pixels per side"
        )


def build_loss(
    net: VGGFeatures, content: torch.Tensor, styles: Sequence[torch.Tensor], opts: StylizeOptions,
    autocast: Callable[[], Any], regions: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> PerceptualLoss:
    """Content features and style Gram matrices, computed once under inference mode.

    With `regions` — (content mask, style mask) pairs of float (H, W) masks, one pair per semantic
    class, for a single style image — the style term is computed per class, each class weighted by
    its share of the content's area (so one all-covering class equals the unmasked loss).
    """
    blend = normalized(opts.style_blend_weights or [1.0] * len(styles))
    with torch.inference_mode(), autocast():
        feats = net(content.unsqueeze(0))
        content_targets = {k: feats[k].float().clone() for k in opts.content_layers}
        targets = []
        for style, weight in zip(styles, blend, strict=True):
            if weight == 0:
                continue
            sf = net(style.unsqueeze(0))
            if regions is None:
                targets.append(StyleTarget({k: gram_matrix(sf[k].float()) for k in opts.style_layers}, weight))
            else:
                targets += _region_targets(sf, feats, regions, opts.style_layers, weight)
    for t in targets:  # masks multiply the optimized features, so autograd must be able to save them
        t.masks = None if t.masks is None else {k: m.clone() for k, m in t.masks.items()}
    return PerceptualLoss(
        content_targets=content_targets,
        content_layer_weights=layer_weights(opts.content_layers, opts.content_layer_weights),
        styles=targets,
        style_layer_weights=layer_weights(opts.style_layers, opts.style_layer_weights, opts.style_layer_weight_exp),
        content_weight=opts.content_weight,
        style_weight=opts.style_weight,
        tv_weight=opts.tv_weight,
        tv_power=opts.tv_power,
    )


def _region_targets(style_feats: dict[str, torch.Tensor], content_feats: dict[str, torch.Tensor],
                    regions: Sequence[tuple[torch.Tensor, torch.Tensor]], layers: Sequence[str],
                    weight: float) -> list[StyleTarget]:
    """One masked StyleTarget per class, with each mask brought to each layer's resolution."""
    def at(mask: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        hw = (feature.shape[-2], feature.shape[-1])
        mode = "area" if hw[0] <= mask.shape[-2] else "bilinear"
        return torch.nn.functional.interpolate(mask[None, None].float().to(feature.device), size=hw, mode=mode)

    shares = normalized([float(c.float().mean()) for c, _ in regions])
    targets = []
    for (content_mask, style_mask), share in zip(regions, shares, strict=True):
        masks = {k: at(content_mask, content_feats[k]) for k in layers}
        grams = {k: gram_matrix(style_feats[k].float(), at(style_mask, style_feats[k])) for k in layers}
        targets.append(StyleTarget(grams, weight * share, masks))
    return targets


def initial_image(content: torch.Tensor, opts: StylizeOptions, hw: tuple[int, int]) -> torch.Tensor:
    """The starting image: the content, seeded uniform noise, or a given image; optionally blended with noise."""
    generator = torch.Generator().manual_seed(opts.seed)
    noise = torch.rand(3, *hw, generator=generator)
    if opts.init == "content":
        start = images.resize(content, hw)
    elif opts.init == "noise":
        start = noise
    else:
        start = images.resize(images.load_image(opts.init), hw)
    if opts.initial_noiseblend:
        start = (1 - opts.initial_noiseblend) * start + opts.initial_noiseblend * noise
    return start


def loss_network(opts: StylizeOptions, device: torch.device) -> VGGFeatures:
    """The VGG of `opts`, with its weights, cut after the deepest layer the losses use."""
    return load_vgg(opts.model, [*opts.content_layers, *opts.style_layers], opts.pooling, opts.weights,
                    opts.weights_format, device)


def optimizer_settings(opts: StylizeOptions) -> OptimizerSettings:
    return OptimizerSettings(opts.optimizer, opts.learning_rate or DEFAULT_LR[opts.optimizer],
                             (opts.beta1, opts.beta2), opts.epsilon, opts.lbfgs_history)


def stylize_tensors(
    content: torch.Tensor,
    styles: Sequence[torch.Tensor],
    opts: StylizeOptions | None = None,
    callbacks: Sequence[Callable[[Progress], None]] = (),
    resume: dict | None = None,
    net: VGGFeatures | None = None,
) -> Outcome:
    """Stylize a (3, H, W) content image with one or more (3, h, w) style images."""
    opts = opts or StylizeOptions()
    if not styles:
        raise ImpastoError("give at least one style image")
    opts.check(len(styles))
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    net = (net or loss_network(opts, device)).to(device)
    sizes = output_sizes(tuple(content.shape[-2:]), opts)  # type: ignore[arg-type]
    iterations = opts.scale_iterations or [opts.iterations] * len(sizes)
    style_scales = opts.style_scales or [1.0] * len(styles)
    if opts.preserve_color == "histogram":
        styles = [images.match_color(s, content) for s in styles]
    for hw in sizes:
        check_min_size(net, hw, "the output")
        check_memory(net, hw, opts, device)
    autocast = autocast_for(device, opts.amp)
    settings = optimizer_settings(opts)

    def objective_at(hw: tuple[int, int]) -> Callable[[], Objective]:
        def build() -> Objective:
            scaled = [images.resize(s, images.size_for_width(s.shape[-2], s.shape[-1], max(1, round(hw[1] * k))))
                      for s, k in zip(styles, style_scales, strict=True)]
            for s in scaled:
                check_min_size(net, (s.shape[-2], s.shape[-1]), "a style image")
            loss = build_loss(net, images.resize(content, hw).to(device), [s.to(device) for s in scaled], opts,
                              autocast)
            return network_objective(net, loss, autocast)
        return build

    stages = [Stage(hw, n, objective_at(hw), f"scale {i + 1}/{len(sizes)}" if len(sizes) > 1 else "")
              for i, (hw, n) in enumerate(zip(sizes, iterations, strict=True))]
    start = initial_image(content, opts, sizes[0]) if resume is None else content
    outcome = run_stages(start, stages, settings, callbacks, resume, device)
    out = outcome.image.clamp(0, 1)
    if opts.preserve_color == "luminance":
        out = images.transfer_luminance(out, content)
    return Outcome(out, outcome.loss, outcome.iterations, outcome.interrupted, outcome.state)


def network_objective(net: VGGFeatures, loss: PerceptualLoss, autocast: Callable[[], Any]) -> Objective:
    """The image's loss: run the network (under autocast if enabled) and evaluate `loss` on its features."""
    def objective(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast():
            feats = net(x)
        return loss(x, feats)

    return objective


def autocast_for(device: torch.device, amp: bool) -> Callable[[], Any]:
    """float16 autocast for the network on CUDA when asked; a no-op context otherwise."""
    import contextlib

    if amp and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext
