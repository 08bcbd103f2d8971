"""Artistic style transfer by optimization (Gatys, Ecker & Bethge 2015/2016).

Targets (content features, style Gram matrices) are computed once per scale without gradients;
the image is optimized coarse to fine over `scales`, each result upsampled as the next start.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from . import images
from .errors import ImpastoError, refuse_non_finite, warn
from .nets import VGG_LAYER_NAMES, VGGFeatures, load_vgg
from .nets.winograd import FrozenConv3x3
from .optimize import Objective, OptimizerSettings, Outcome, Progress, Stage, run_stages
from .perceptual import (
    autocast_for,
    available_bytes,
    build_loss,
    check_min_size,
    network_objective,
    resolve_device,
)

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

    FLAGS: ClassVar[dict[str, str]] = {}  # options whose command-line flag is not --name-with-dashes

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line flag of the option `name`, for messages and reproduce commands."""
        return cls.FLAGS.get(name, "--" + name.replace("_", "-"))

    def __post_init__(self) -> None:
        """Layers as the command line takes them ("relu1_1,relu2_1") or as any sequence of names."""
        for name in ("content_layers", "style_layers"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [v.strip() for v in value.split(",") if v.strip()])
            elif isinstance(value, (tuple, set)) or hasattr(value, "__next__"):
                setattr(self, name, list(value))
            elif not isinstance(value, list):
                raise ImpastoError(f"{name} must be layer names such as 'relu1_1,relu2_1', got {value!r}")

    def check(self, n_styles: int) -> None:
        """Refuse inconsistent options with one sentence each."""
        def positive(name: str, value: float | None) -> None:
            if value is not None and not value > 0:
                raise ImpastoError(f"--{name.replace('_', '-')} must be positive, got {value}")

        refuse_non_finite(self, self.flag)

        for name in ("size", "width", "iterations", "lbfgs_history"):
            positive(name, getattr(self, name))
        positive("learning_rate", self.learning_rate)
        for name in ("content_weight", "style_weight", "tv_weight", "initial_noiseblend"):
            if getattr(self, name) < 0:
                raise ImpastoError(f"--{name.replace('_', '-')} must not be negative")
        if self.initial_noiseblend > 1:
            raise ImpastoError("--initial-noiseblend must be between 0 and 1")
        _same_length("--style-blend-weights", self.style_blend_weights, n_styles, "style images")
        _same_length(self.flag("style_scales"), self.style_scales, n_styles, "style images")
        _same_length("--content-layer-weights", self.content_layer_weights, len(self.content_layers), "content layers")
        _same_length("--style-layer-weights", self.style_layer_weights, len(self.style_layers), "style layers")
        for name in ("style_scales", "scales", "scale_iterations"):
            values = getattr(self, name) or []
            if any(not v > 0 for v in values):
                raise ImpastoError(f"{self.flag(name)} must all be positive")
        if self.style_blend_weights is not None:
            if any(not v >= 0 for v in self.style_blend_weights):
                raise ImpastoError("--style-blend-weights must not be negative")
            if sum(self.style_blend_weights) <= 0:
                raise ImpastoError("--style-blend-weights must not all be zero")
        if self.scales and any(b <= a for a, b in itertools.pairwise(self.scales)):
            raise ImpastoError(f"--scales must grow from coarse to fine, got {','.join(map(str, self.scales))}")
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


def estimate_bytes(net: VGGFeatures, hw: tuple[int, int], opts: StylizeOptions) -> int:
    """Rough peak memory of one optimization at (H, W): activations kept for backward, their
    gradients, and the optimizer's per-pixel state (L-BFGS keeps 2 vectors per history step)."""
    act = net.feature_elements(*hw)
    pixels = 3 * hw[0] * hw[1]
    history = 2 * opts.lbfgs_history if opts.optimizer == "lbfgs" else 3
    return 4 * (3 * act + (history + 4) * pixels)


def check_memory(net: VGGFeatures, hw: tuple[int, int], opts: StylizeOptions, device: torch.device) -> None:
    """Refuse a run that will not fit; one that fits only without the kept Winograd transforms (CPU)
    makes them at each pass instead, with a warning (1.04-1.11x the time at 512 px). The network
    stays so: a caller's network passed on to later runs keeps making them at each pass."""
    need, have = estimate_bytes(net, hw, opts), available_bytes(device)
    kept = net.kept_transform_bytes(*hw) if device.type == "cpu" else 0
    if need + kept > 0.8 * have and need <= 0.8 * have:
        for m in net.modules():
            if isinstance(m, FrozenConv3x3):
                m.make_transform_per_pass()
        warn(f"a {hw[1]}x{hw[0]} run fits in memory only without keeping the Winograd transforms "
             f"({kept / 2**20:.0f} MiB): making them at each pass, which is slower")
    if need > 0.8 * have:
        raise ImpastoError(
            f"a {hw[1]}x{hw[0]} run needs about {need / 2**30:.1f} GiB but {device.type} has "
            f"{have / 2**30:.1f} GiB; use a smaller --size/--width"
            + (" or a smaller --lbfgs-history / --optimizer adam" if opts.optimizer == "lbfgs" else "")
        )


def style_size(style: torch.Tensor, hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) of a style image scaled to `scale` times the output's width, its aspect kept."""
    return images.size_for_width(style.shape[-2], style.shape[-1], max(1, round(hw[1] * scale)))


def check_style_size(net: VGGFeatures, hw: tuple[int, int], device: torch.device, flag: str, what: str) -> None:
    """Refuse a style image scaled (to hw) below the network's smallest input, or beyond memory: its targets
    take one forward pass without gradients, counted here as all its feature maps at once (an upper bound)."""
    check_min_size(net, hw, what)
    need, have = 4 * (net.feature_elements(*hw) + 6 * hw[0] * hw[1]), available_bytes(device)
    if need > 0.8 * have:
        raise ImpastoError(f"a style image scaled to {hw[1]}x{hw[0]} needs about {need / 2**30:.1f} GiB but "
                           f"{device.type} has {have / 2**30:.1f} GiB; use a smaller {flag}")


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


def with_detail_of(reference: torch.Tensor) -> Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]:
    """How a coarse scale's result starts the next scale: upsampled, plus the detail that `reference` (the
    content) has at the finer size and not at the coarser one. A result equal to the content at the coarse
    scale so becomes the content at the fine one, as a single-scale run starts. Plain upsampling starts the
    fine scale blurred, and L-BFGS then converged more slowly there than a single-scale run from the content
    (measured with random VGG weights: 2.4x the time to the same loss, against 1.3x with the detail)."""
    def start(previous: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        ref = reference.to(previous.device)
        coarse = images.resize(ref, (previous.shape[-2], previous.shape[-1]))
        detail = images.resize(ref, hw) - images.resize(coarse, hw)
        return (images.resize(previous, hw) + detail).clamp(0, 1)
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
    """Stylize a (3, H, W) content image with one or more (3, h, w) style images. A given `net` is moved to
    the run's device (opts.device) in place, and stays there."""
    opts = opts or StylizeOptions()
    if not styles:
        raise ImpastoError("give at least one style image")
    opts.check(len(styles))
    if not opts.style_layers or not opts.style_weight:
        warn("no style layers or a style weight of 0: the result takes nothing from the style images")
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
        for s, k in zip(styles, style_scales, strict=True):
            check_style_size(net, style_size(s, hw, k), device, opts.flag("style_scales"), "a style image")
    autocast = autocast_for(device, opts.amp)
    settings = optimizer_settings(opts)

    def objective_at(hw: tuple[int, int]) -> Callable[[], Objective]:
        def build() -> Objective:
            scaled = [images.resize(s, style_size(s, hw, k)) for s, k in zip(styles, style_scales, strict=True)]
            loss = build_loss(net, images.resize(content, hw).to(device), [s.to(device) for s in scaled], opts,
                              autocast)
            return network_objective(net, loss, autocast)
        return build

    carry = with_detail_of(content) if opts.init == "content" else None
    stages = [Stage(hw, n, objective_at(hw), f"scale {i + 1}/{len(sizes)}" if len(sizes) > 1 else "",
                    start=carry)
              for i, (hw, n) in enumerate(zip(sizes, iterations, strict=True))]
    start = initial_image(content, opts, sizes[0]) if resume is None else content
    outcome = run_stages(start, stages, settings, callbacks, resume, device)
    out = outcome.image.clamp(0, 1)
    if opts.preserve_color == "luminance":
        out = images.transfer_luminance(out, content)
    return Outcome(out, outcome.loss, outcome.iterations, outcome.interrupted, outcome.state)


