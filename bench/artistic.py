"""Benchmark of impasto's artistic engine against a reference written the usual way.

The reference follows the PyTorch neural style tutorial: VGG19 `features` as an nn.Sequential with a
Normalization module first, non-inplace ReLUs, ContentLoss/StyleLoss modules inserted after the chosen
layers (each computes its loss in forward and returns its input), the model cut after the last loss
module, `input_img.requires_grad_(True)`, `model.requires_grad_(False)`, NCHW, default threads and
torch.optim.LBFGS / Adam. It uses the same layers, the same (random) conv weights, the same loss formulas
as impasto's losses.py, the same optimizer settings and the same start, so both compute the same thing.

Measured: seconds per iteration (L-BFGS and Adam) at each size, time to build the targets, peak memory
(each configuration in a fresh subprocess, ru_maxrss), loss agreement, a FLOP lower bound per iteration,
and time to result of a coarse-to-fine (--scales) run against a single-scale one.

    .venv/bin/python bench/artistic.py            # full run (long on a small CPU)
    .venv/bin/python bench/artistic.py --quick    # a few minutes
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn, optim

from impasto import images
from impasto.allocator import keep_freed_memory
from impasto.artistic import (
    DEFAULT_CONTENT_LAYERS,
    DEFAULT_STYLE_LAYERS,
    Progress,
    StylizeOptions,
    stylize_tensors,
)
from impasto.cli import _positive_int
from impasto.errors import ImpastoError
from impasto.losses import PerceptualLoss
from impasto.nets import VGGFeatures, load_vgg, winograd
from impasto.perceptual import build_loss, layer_weights, network_objective

warnings.filterwarnings("ignore", message="using random VGG weights")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
CONTENT_LAYERS = list(DEFAULT_CONTENT_LAYERS)
STYLE_LAYERS = list(DEFAULT_STYLE_LAYERS)
# torchvision's vgg19().features layout: channels per conv, "M" for a max-pooling layer.
VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEVICE = torch.device("cpu")  # bench/gpu.py sets it to run the same measurements on a GPU


def sync() -> None:
    """Wait for the GPU's queued work, so that a timestamp means the work is done."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# --- the reference: the PyTorch neural style tutorial, with impasto's loss formulas -------------------

class Normalization(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return (img - self.mean) / self.std


def ref_gram_matrix(input: torch.Tensor) -> torch.Tensor:
    a, b, c, d = input.size()
    features = input.view(a * b, c * d)
    g = torch.mm(features, features.t())
    return g.div(a * b * c * d)


class ContentLoss(nn.Module):
    """Relative squared error ||F - P||^2 / ||P||^2 (impasto's content_loss)."""

    def __init__(self, target: torch.Tensor, weight: float) -> None:
        super().__init__()
        self.target = target.detach()
        self.energy = self.target.pow(2).sum().clamp_min(1e-8)
        self.weight = weight
        self.loss = torch.zeros(())
        self.active = False  # off while the model is built: the style image may differ in size

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.active:
            self.loss = F.mse_loss(input, self.target, reduction="sum") / self.energy
        return input


class StyleLoss(nn.Module):
    """Relative squared error of Gram matrices (impasto's style_loss), gram = F F^T / (C H W)."""

    def __init__(self, target_feature: torch.Tensor, weight: float) -> None:
        super().__init__()
        self.target = ref_gram_matrix(target_feature).detach()
        self.energy = self.target.pow(2).sum().clamp_min(1e-8)
        self.weight = weight
        self.loss = torch.zeros(())
        self.active = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return input
        g = ref_gram_matrix(input)
        self.loss = F.mse_loss(g, self.target, reduction="sum") / self.energy
        return input


def ref_tv_loss(img: torch.Tensor) -> torch.Tensor:
    """Squared total variation, mean over pixels (impasto's tv_loss with power 2)."""
    dx = img[..., :-1, 1:] - img[..., :-1, :-1]
    dy = img[..., 1:, :-1] - img[..., :-1, :-1]
    return (dx.pow(2) + dy.pow(2)).mean()


def vgg19_features() -> nn.Sequential:
    """A stand-in for `torchvision.models.vgg19().features` (torchvision is not installed here)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = int(v)
    return nn.Sequential(*layers).eval()


def copy_weights(cnn: nn.Sequential, net: VGGFeatures) -> None:
    """Copy impasto's conv weights into the reference's convs (the ones impasto's cut network has)."""
    convs = [m for m in cnn.children() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv, name in zip(convs, net.conv_names, strict=False):
            src = getattr(net.layers, name)
            conv.weight.copy_(src.weight)
            conv.bias.copy_(src.bias)


def get_style_model_and_losses(cnn: nn.Sequential, style_img: torch.Tensor, content_img: torch.Tensor,
                               content_layers: list[str], style_layers: list[str]):
    """The tutorial's model builder: targets are computed while the model grows, layer by layer."""
    content_w = layer_weights(content_layers, None)
    style_w = layer_weights(style_layers, None)
    content_losses, style_losses = [], []
    model = nn.Sequential(Normalization(MEAN, STD).to(content_img.device))
    block, i = 1, 0
    for layer in cnn.children():
        if isinstance(layer, nn.Conv2d):
            i += 1
            name = f"conv{block}_{i}"
        elif isinstance(layer, nn.ReLU):
            name = f"relu{block}_{i}"
            layer = nn.ReLU(inplace=False)  # the tutorial's replacement: in-place ReLUs break the loss modules
        elif isinstance(layer, nn.MaxPool2d):
            name = f"pool{block}"
            block, i = block + 1, 0
        else:
            raise RuntimeError(f"unrecognized layer: {layer.__class__.__name__}")
        model.add_module(name, layer)
        if name in content_layers:
            target = model(content_img).detach()
            content_loss = ContentLoss(target, content_w[name])
            model.add_module(f"content_loss_{name}", content_loss)
            content_losses.append(content_loss)
        if name in style_layers:
            target_feature = model(style_img).detach()
            style_loss = StyleLoss(target_feature, style_w[name])
            model.add_module(f"style_loss_{name}", style_loss)
            style_losses.append(style_loss)
    for i in range(len(model) - 1, -1, -1):
        if isinstance(model[i], (ContentLoss, StyleLoss)):
            break
    model = model[: (i + 1)]
    for loss in (*content_losses, *style_losses):
        loss.active = True
    return model, style_losses, content_losses


def run_reference(model: nn.Module, style_losses: list[StyleLoss], content_losses: list[ContentLoss],
                  input_img: torch.Tensor, optimizer: str, iterations: int, on_step: Callable[[float], None],
                  content_weight: float = 1.0, style_weight: float = 10.0, tv_weight: float = 1.0) -> torch.Tensor:
    """The tutorial's loop, with impasto's optimizer settings (one L-BFGS iteration per step, no clamping
    inside the closure; Adam clamps after each step) so that both runs follow the same trajectory."""
    input_img.requires_grad_(True)
    model.eval()
    model.requires_grad_(False)
    if optimizer == "lbfgs":
        opt: optim.Optimizer = optim.LBFGS([input_img], lr=1.0, max_iter=1, history_size=100,
                                           tolerance_grad=0.0, tolerance_change=0.0)
    else:
        opt = optim.Adam([input_img], lr=0.02, betas=(0.9, 0.999), eps=1e-8)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        model(input_img)
        content_score = sum(cl.weight * cl.loss for cl in content_losses)
        style_score = sum(sl.weight * sl.loss for sl in style_losses)
        loss = content_weight * content_score + style_weight * style_score + tv_weight * ref_tv_loss(input_img)
        loss.backward()
        return loss

    for _ in range(iterations):
        loss = opt.step(closure)  # type: ignore[arg-type]
        if optimizer == "adam":
            with torch.no_grad():
                input_img.clamp_(0, 1)
        on_step(float(loss.detach()))
    return input_img.detach()


def build_reference(net: VGGFeatures) -> nn.Sequential:
    cnn = vgg19_features().to(DEVICE)
    copy_weights(cnn, net)
    return cnn


# --- inputs ------------------------------------------------------------------------------------------

def load_inputs(content_path: str | None, style_path: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Content (4:3) and style images: the shared test images when present, else generated ones."""
    c = Path(content_path) if content_path else DATA / "content" / "tubingen.jpg"
    s = Path(style_path) if style_path else DATA / "style" / "starry_night.jpg"
    if c.is_file() and s.is_file():
        return images.load_image(c), images.load_image(s), f"{c.name} + {s.name}"
    g = torch.Generator().manual_seed(1)
    content = F.interpolate(torch.rand(1, 3, 48, 64, generator=g), size=(384, 512), mode="bilinear")[0]
    style = F.interpolate(torch.rand(1, 3, 64, 64, generator=g), size=(512, 512), mode="bilinear")[0]
    return content.clamp(0, 1), style.clamp(0, 1), "generated random images (384x512 + 512x512)"


def at_size(content: torch.Tensor, style: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The content and style exactly as impasto's engine sizes them (style at the content's width)."""
    hw = images.size_for_long_side(content.shape[-2], content.shape[-1], size)
    c = images.resize(content, hw)
    s = images.resize(style, images.size_for_width(style.shape[-2], style.shape[-1], hw[1]))
    return c.to(DEVICE), s.to(DEVICE)


def make_net(seed: int, weights: str = "random") -> VGGFeatures:
    """VGG19 up to relu5_1: He-initialized from `seed`, or `weights` as `impasto stylize --weights` takes
    them ("torchvision": the official file from IMPASTO_WEIGHTS or torch.hub's cache)."""
    torch.manual_seed(seed)
    source = None if weights == "torchvision" else weights
    return load_vgg("vgg19", [*CONTENT_LAYERS, *STYLE_LAYERS], "max", source, "auto", DEVICE)


def options(size: int, iterations: int, optimizer: str, **kw: Any) -> StylizeOptions:
    return StylizeOptions(size=size, iterations=iterations, optimizer=optimizer, weights="random",
                          device=DEVICE.type, **kw)


# --- measurements ------------------------------------------------------------------------------------

def time_impasto(net: VGGFeatures, content: torch.Tensor, style: torch.Tensor, size: int, optimizer: str,
                 n: int, **kw: Any) -> tuple[list[float], list[float]]:
    """Timestamps after each iteration and the loss of each iteration, through stylize_tensors."""
    stamps: list[float] = []
    losses: list[float] = []

    def cb(p: Progress) -> None:
        stamps.append(time.perf_counter())
        losses.append(p.step.loss)

    out = stylize_tensors(content, [style], options(size, n, optimizer, **kw), callbacks=[cb], net=net)
    LAST_IMAGE["impasto"] = out.image
    return stamps, losses


def time_reference(cnn: nn.Sequential, content: torch.Tensor, style: torch.Tensor, size: int, optimizer: str,
                   n: int) -> tuple[list[float], list[float]]:
    c, s = at_size(content, style, size)
    stamps: list[float] = []
    losses: list[float] = []

    def on_step(loss: float) -> None:
        stamps.append(time.perf_counter())
        losses.append(loss)

    model, style_losses, content_losses = get_style_model_and_losses(cnn, s.unsqueeze(0), c.unsqueeze(0),
                                                                     CONTENT_LAYERS, STYLE_LAYERS)
    input_img = c.unsqueeze(0).clone()
    LAST_IMAGE["reference"] = run_reference(model, style_losses, content_losses, input_img, optimizer, n, on_step)[0]
    return stamps, losses


LAST_IMAGE: dict[str, torch.Tensor] = {}  # each tool's latest result, (3, H, W), for the same-image comparison


def reference_objective(cnn: nn.Sequential, content: torch.Tensor, style: torch.Tensor,
                        size: int) -> Callable[[torch.Tensor], float]:
    """The reference's loss of a given (3, H, W) image, as its closure computes it."""
    c, s = at_size(content, style, size)
    model, sls, cls = get_style_model_and_losses(cnn, s.unsqueeze(0), c.unsqueeze(0), CONTENT_LAYERS, STYLE_LAYERS)

    def objective(x: torch.Tensor) -> float:
        with torch.no_grad():
            model(x.unsqueeze(0))
            total = (sum(cl.weight * cl.loss for cl in cls) + 10 * sum(sl.weight * sl.loss for sl in sls)
                     + ref_tv_loss(x.unsqueeze(0)))
        return float(total)  # type: ignore[arg-type]

    return objective


TOOLS = ("impasto", "reference")


def run_tool(tool: str, net: VGGFeatures, cnn: nn.Sequential, content: torch.Tensor, style: torch.Tensor, size: int,
             optimizer: str, n: int) -> tuple[list[float], list[float]]:
    fn = time_impasto if tool == "impasto" else time_reference
    return fn(net if tool == "impasto" else cnn, content, style, size, optimizer, n)  # type: ignore[arg-type]


def time_targets(net: VGGFeatures, cnn: nn.Sequential, content: torch.Tensor, style: torch.Tensor, size: int,
                 repeats: int) -> tuple[float, float]:
    c, s = at_size(content, style, size)
    opts = options(size, 1, "lbfgs")
    imp, ref = [], []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        build_loss(net, c, [s], opts, contextlib.nullcontext)
        sync()
        imp.append(time.perf_counter() - t)
        t = time.perf_counter()
        get_style_model_and_losses(cnn, s.unsqueeze(0), c.unsqueeze(0), CONTENT_LAYERS, STYLE_LAYERS)
        sync()
        ref.append(time.perf_counter() - t)
    return statistics.median(imp), statistics.median(ref)


def impasto_objective(net: VGGFeatures, content: torch.Tensor, style: torch.Tensor, size: int):
    c, s = at_size(content, style, size)
    loss = build_loss(net, c, [s], options(size, 1, "lbfgs"), contextlib.nullcontext)
    evaluate = network_objective(net, loss, contextlib.nullcontext)  # what the optimization loop calls

    def objective(x: torch.Tensor) -> torch.Tensor:
        return evaluate(x)[0]

    return objective, c


def onednn_flops() -> dict[Any, Any]:
    """The FLOP counter's formula for oneDNN's inner product, an op it does not know (impasto's Winograd layers
    call it): x (M, K) times w (N, K)^T is 2 M N K."""
    if winograd._LINEAR is None:
        return {}

    def inner_product(x_shape: Any, w_shape: Any, *args: Any, **kwargs: Any) -> int:
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * x_shape[-1]

    return {winograd._LINEAR.overloadpacket: inner_product}


def count_flops(net: VGGFeatures, cnn: nn.Sequential, content: torch.Tensor, style: torch.Tensor,
                size: int) -> tuple[int, int]:
    """FLOPs of one objective evaluation (forward + backward to the image), impasto and reference."""
    from torch.utils.flop_counter import FlopCounterMode

    objective, c = impasto_objective(net, content, style, size)
    x = c.unsqueeze(0).clone().requires_grad_(True)
    with FlopCounterMode(display=False, custom_mapping=onednn_flops()) as counter:
        objective(x).backward()
    imp = counter.get_total_flops()
    c, s = at_size(content, style, size)
    model, sls, cls = get_style_model_and_losses(cnn, s.unsqueeze(0), c.unsqueeze(0), CONTENT_LAYERS, STYLE_LAYERS)
    x = c.unsqueeze(0).clone().requires_grad_(True)
    model.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        model(x)
        loss = sum(cl.weight * cl.loss for cl in cls) + 10 * sum(sl.weight * sl.loss for sl in sls) + ref_tv_loss(x)
        loss.backward()  # type: ignore[union-attr]
    return imp, counter.get_total_flops()


CONV_SHAPES = [(64, 64, 256), (128, 128, 128), (256, 256, 128), (512, 512, 64)]  # (in, out, side) VGG uses


def conv_throughput(repeats: int) -> list[tuple[str, float]]:
    """Best forward FLOP/s of 3x3 convolutions at VGG's shapes, NCHW and channels_last."""
    out = []
    torch.manual_seed(0)
    for cin, cout, side in CONV_SHAPES:
        for layout in ("NCHW", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.randn(1, cin, side, side).contiguous(memory_format=fmt)
            w = torch.randn(cout, cin, 3, 3).contiguous(memory_format=fmt)
            flops = 2 * cin * cout * 9 * side * side
            best = float("inf")
            with torch.no_grad():
                F.conv2d(x, w, padding=1)
                for _ in range(repeats):
                    t = time.perf_counter()
                    F.conv2d(x, w, padding=1)
                    best = min(best, time.perf_counter() - t)
            out.append((f"{cin}->{cout} @ {side}x{side} {layout}", flops / best))
    return out


# How the memory workers set glibc's allocator: key suffix -> description.
MEMORY_MODES = {
    "": "glibc's default allocator (what a Python caller sees)",
    "/exact": "every buffer >= 128 KiB its own mmap (RSS follows the live tensors)",
    "/keep": "impasto keeps freed memory, as the impasto command does; the reference has glibc's default",
}


# --- subprocess workers: peak memory and speed experiments ------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    """Peak RSS of this process: VmHWM, which /proc/self/clear_refs resets. ru_maxrss would do, but after a
    fork + exec it starts at the parent's peak (the kernel carries it over), so it is only the fallback."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so ru_maxrss measures from here on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker_memory(spec: dict) -> dict:
    """Peak RSS over the RSS once the network is loaded: of building the targets alone, then of a run
    (targets + iterations). With spec["exact"], glibc serves every buffer of 128 KiB or more with its own
    mmap and unmaps it when freed, so the RSS follows the live tensors instead of the heap's high-water mark.
    With spec["keep"], impasto keeps freed memory, as its command does (the reference keeps glibc's default)."""
    if spec.get("exact"):
        import ctypes

        if not ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024):  # M_MMAP_THRESHOLD, fixed (no dynamic raise)
            raise RuntimeError("mallopt failed")
    if spec.get("keep") and spec["tool"] == "impasto" and not keep_freed_memory():  # as the impasto command does
        raise RuntimeError("keep_freed_memory did not apply")
    content, style, _ = load_inputs(spec["content"], spec["style"])
    net = make_net(spec["seed"])
    cnn = None
    if spec["tool"] == "reference":
        cnn = build_reference(net)
        del net
        net = None  # the reference holds only its own copy of the weights
    gc.collect()
    out: dict[str, Any] = {}
    for phase in ("targets", "run"):
        reset = reset_peak()
        base = rss_bytes()
        if phase == "targets":
            c, s = at_size(content, style, spec["size"])
            if net is not None:
                kept: Any = build_loss(net, c, [s], options(spec["size"], 1, spec["optimizer"]), contextlib.nullcontext)
            else:
                assert cnn is not None
                kept = get_style_model_and_losses(cnn, s.unsqueeze(0), c.unsqueeze(0), CONTENT_LAYERS, STYLE_LAYERS)
            del kept
        elif net is not None:
            stylize_tensors(content, [style], options(spec["size"], spec["iterations"], spec["optimizer"]), net=net)
        else:
            assert cnn is not None
            time_reference(cnn, content, style, spec["size"], spec["optimizer"], spec["iterations"])
        gc.collect()
        peak = maxrss_bytes()
        out[phase] = {"baseline_rss": base, "peak": peak, "delta": peak - base, "peak_reset": reset}
    return out


def full_vgg19_state(seed: int) -> dict[str, torch.Tensor]:
    """A state dict shaped like torchvision's vgg19-dcbb9e9d.pth: all 16 convolutions and the classifier
    (143.7 M values, 548 MiB), random values."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    index, in_ch = 0, 3
    for v in VGG19:
        if v == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(int(v), in_ch, 3, 3, generator=gen) * 0.01
        state[f"features.{index}.bias"] = torch.zeros(int(v))
        index, in_ch = index + 2, int(v)
    for i, (n_in, n_out) in zip((0, 3, 6), ((25088, 4096), (4096, 4096), (4096, 1000)), strict=True):
        state[f"classifier.{i}.weight"] = torch.randn(n_out, n_in, generator=gen) * 0.01
        state[f"classifier.{i}.bias"] = torch.zeros(n_out)
    return state


def vgg19_full() -> nn.Module:
    """A stand-in for `torchvision.models.vgg19()`: features, pooling to 7x7, the classifier."""
    class VGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = vgg19_features()
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(nn.Linear(25088, 4096), nn.ReLU(True), nn.Dropout(),
                                            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000))

    return VGG()


def worker_load(spec: dict) -> dict:
    """Peak RSS of loading a full VGG19 weights file the tool's usual way, over the RSS before: impasto's
    `load_vgg` (cut after relu5_1), and the tutorial's `vgg19(weights=...).features`, which builds the
    whole model and loads the whole file into it, then keeps its features."""
    gc.collect()
    reset = reset_peak()
    base = rss_bytes()
    if spec["tool"] == "impasto":
        kept: Any = load_vgg("vgg19", layers=STYLE_LAYERS + CONTENT_LAYERS, weights=spec["path"])
    else:
        model = vgg19_full()
        model.load_state_dict(torch.load(spec["path"], map_location="cpu", weights_only=True))
        kept = model.features.eval()
        del model
    gc.collect()
    after = rss_bytes()
    del kept
    return {"peak": maxrss_bytes() - base, "kept": after - base, "peak_reset": reset}


def spread_mib(runs: list[dict]) -> str:
    """The range of the whole-run peaks over the repeats, MiB."""
    peaks = [whole_peak(m) / 2**20 for m in runs]
    return f"{min(peaks):.0f}-{max(peaks):.0f}"


def whole_peak(m: dict) -> int:
    """A memory worker's peak over both phases, above the RSS once the network was loaded: what stays
    after the targets (impasto's transformed weights) counts here, where the run column's baseline hides it."""
    return max(m["targets"]["peak"], m["run"]["peak"]) - m["targets"]["baseline_rss"]


class _SymmetricGram(torch.autograd.Function):
    """F F^T whose backward is one matmul, (dG + dG^T) F, instead of two and a strided add. impasto's own
    gram_matrix does this since commit c63c779; the variant is kept to measure versions before it."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat)
        return torch.bmm(flat, flat.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (flat,) = ctx.saved_tensors
        return torch.bmm(grad + grad.transpose(1, 2), flat)


def symmetric_gram(features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """impasto's gram_matrix (without a mask) on _SymmetricGram: a speed experiment."""
    assert mask is None
    n, c, h, w = features.shape
    return _SymmetricGram.apply(features.reshape(n, c, h * w)) / (c * h * w)


def interleaved_objective(net: VGGFeatures, loss: PerceptualLoss) -> Callable[[torch.Tensor], torch.Tensor]:
    """impasto's loss with each layer's term computed as soon as the layer has run, as the tutorial's loss
    modules do. Autograd then reaches each Gram's backward only when the backward pass gets to its layer,
    instead of computing every style layer's gradient first and holding it for the whole backward pass."""
    import impasto.losses as L

    def objective(x: torch.Tensor) -> torch.Tensor:
        h = net.normalize(x)
        content = style = torch.zeros((), device=x.device)
        for name, layer in net.layers.named_children():
            h = layer(h)
            if name in loss.content_layer_weights:
                content = content + loss.content_layer_weights[name] * L.content_loss(h, loss.content_targets[name])
            if name in loss.style_layer_weights:
                gram = L.gram_matrix(h.float())
                for t in loss.styles:
                    style = style + t.weight * loss.style_layer_weights[name] * L.style_loss(gram, t.grams[name])
        total = loss.content_weight * content + loss.style_weight * style
        return total + loss.tv_weight * L.tv_loss(x, loss.tv_power)

    return objective


VARIANTS = ("base", "channels_last", "symgram", "interleaved", "mallopt", "keep_freed", "exact", "threads1",
            "no_mkldnn", "compile")


def worker_eval(spec: dict) -> dict:
    """Seconds of one objective evaluation (forward + backward) of impasto's modules in a variant, its loss,
    and the peak RSS over the RSS before the first evaluation."""
    tokens = set(spec["variant"].split("+"))
    unknown = tokens - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variant {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    import ctypes

    if "mallopt" in tokens:
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_MAX = 0: big buffers come from the heap, not fresh mmaps that page-fault on every iteration;
        # M_TRIM_THRESHOLD: freed memory stays with the process for the next iteration.
        if not (libc.mallopt(-4, 0) and libc.mallopt(-1, 2**31 - 1)):
            raise RuntimeError("mallopt failed")
    if "keep_freed" in tokens and not keep_freed_memory():  # what the impasto command does
        raise RuntimeError("keep_freed_memory did not apply")
    if "exact" in tokens and not ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024):  # see worker_memory
        raise RuntimeError("mallopt failed")
    if "threads1" in tokens:
        torch.set_num_threads(1)
    if "symgram" in tokens:
        import impasto.losses

        impasto.losses.gram_matrix = symmetric_gram  # type: ignore[assignment]
    content, style, _ = load_inputs(spec["content"], spec["style"])
    net = make_net(spec["seed"])
    c, s = at_size(content, style, spec["size"])
    loss = build_loss(net, c, [s], options(spec["size"], 1, "lbfgs"), contextlib.nullcontext)

    def plain(x: torch.Tensor) -> torch.Tensor:
        return loss(x, net(x))[0]

    objective = interleaved_objective(net, loss) if "interleaved" in tokens else plain
    fmt = torch.channels_last if "channels_last" in tokens else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = c.unsqueeze(0).clone().contiguous(memory_format=fmt).requires_grad_(True)
    ctx = torch.backends.mkldnn.flags(enabled=False) if "no_mkldnn" in tokens else contextlib.nullcontext()
    fn = torch.compile(objective) if "compile" in tokens else objective
    times: list[float] = []
    losses: list[float] = []
    gc.collect()
    reset_peak()
    base = rss_bytes()
    with ctx:
        for i in range(spec["warmup"] + spec["repeats"]):
            t = time.perf_counter()
            x.grad = None
            value = fn(x)
            value.backward()
            losses.append(float(value.detach()))
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t)
    return {"median": statistics.median(times), "min": min(times), "times": times, "loss": losses[0],
            "peak_delta": maxrss_bytes() - base}


def in_subprocess(kind: str, spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- time to result with --scales ---------------------------------------------------------------------

def stage_of(p: Any) -> tuple[int, int]:
    """(index, count) of the scale a Progress reports: `stage`/`stages`, or `scale`/`scales` in older versions."""
    if hasattr(p, "stage"):
        return int(p.stage), int(p.stages)
    return int(p.scale), int(p.scales)


class _Reached(KeyboardInterrupt):
    """Raised by a callback to stop a run once it has reached the target loss (optimize() stops cleanly)."""


def time_to_result(net: VGGFeatures, content: torch.Tensor, style: torch.Tensor, size: int, single_iters: int,
                   scales: list[int], scale_iters: list[int]) -> dict:
    """A single-scale run, then a coarse-to-fine one stopped once its last-scale loss reaches the single-scale
    run's final loss. Both record (seconds since their start, loss) per iteration at the output size: the
    last scale's objective is the single-scale run's one (same size, same targets)."""
    single: list[tuple[float, float]] = []
    t0 = time.perf_counter()

    def single_cb(p: Progress) -> None:
        single.append((time.perf_counter() - t0, p.step.loss))

    result = stylize_tensors(content, [style], options(size, single_iters, "lbfgs"), callbacks=[single_cb], net=net)
    t_single = time.perf_counter() - t0
    target = result.loss
    multi: list[tuple[float, float]] = []
    starts: dict[int, float] = {}

    def multi_cb(p: Progress) -> None:
        now = time.perf_counter() - t1
        index, count = stage_of(p)
        starts.setdefault(index, now)
        if index == count - 1:
            multi.append((now, p.step.loss))
            if p.step.loss <= target:
                raise _Reached

    opts = options(size, single_iters, "lbfgs", scales=scales, scale_iterations=scale_iters)
    t1 = time.perf_counter()
    stylize_tensors(content, [style], opts, callbacks=[multi_cb], net=net)
    return {"size": size, "single_iterations": single_iters, "scales": scales, "scale_iterations": scale_iters,
            "target": target, "t_single": t_single, "single": single, "multi": multi, "scale_starts": starts}


def first_reach(curve: list[tuple[float, float]], loss: float) -> tuple[float, int] | None:
    """(seconds, iteration) at which a (seconds, loss) curve first reaches `loss`."""
    for i, (t, value) in enumerate(curve):
        if value <= loss:
            return t, i + 1
    return None


# --- output ------------------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> dict:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
            "capability": torch.backends.cpu.get_cpu_capability()}


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,512", help="longer sides to time, comma-separated")
    p.add_argument("--optimizers", default="lbfgs,adam")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per run (after the warm-up)")
    p.add_argument("--repeats", type=int, default=5, help="runs of each tool, alternating (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up iterations before timing")
    p.add_argument("--target-repeats", type=int, default=3)
    p.add_argument("--mem-iterations", type=int, default=3, help="iterations run when measuring peak memory")
    p.add_argument("--mem-repeats", type=_positive_int, default=3,
                   help="fresh processes per memory configuration, tools alternating (medians are reported: "
                   "a heap's high-water mark varies by tens of MiB from run to run)")
    p.add_argument("--conv-repeats", type=int, default=5)
    p.add_argument("--scale-size", type=int, default=512, help="output size of the time-to-result runs")
    p.add_argument("--single-iterations", type=int, default=300, help="iterations of the single-scale run")
    p.add_argument("--scales", default="128,256,512", help="the multi-scale run's scales")
    p.add_argument("--scale-iterations", default="200,100,300",
                   help="its iterations per scale (the last is a cap: it stops at the single-scale loss)")
    p.add_argument("--experiments",
                   default="base,channels_last,interleaved,mallopt,channels_last+interleaved+mallopt,"
                   "base+exact,interleaved+exact",
                   help="variants of impasto's objective to time in subprocesses, each a '+'-joined set of "
                   f"{', '.join(VARIANTS[1:])}; base is as-is ('' to skip)")
    p.add_argument("--experiment-size", type=int, default=512)
    p.add_argument("--experiment-rounds", type=int, default=3)
    p.add_argument("--agree-iterations", type=int, default=20, help="iterations of the loss-agreement runs")
    p.add_argument("--skip", default="",
                   help="comma-separated parts to skip: speed,agreement,targets,memory,load,flops,scales")
    p.add_argument("--quick", action="store_true", help="small sizes and few iterations: a few minutes")
    p.add_argument("--content", default=None)
    p.add_argument("--style", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="random",
                   help="VGG19 weights of the in-process parts (speed, agreement, targets, scales): random (timings "
                   "do not depend on them), torchvision (the official file), or a .pth/.mat path; real weights are "
                   "what the --scales time to result needs (the subprocess workers always use random ones)")
    p.add_argument("--allocator", choices=("default", "keep"), default="default",
                   help="glibc's allocator for the in-process timings (both tools): its default, or keeping freed "
                   "memory as the impasto command does")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(args.spec)
        workers = {"memory": worker_memory, "eval": worker_eval, "load": worker_load}
        out = workers[args.worker](spec)
        print(json.dumps(out))
        return 0

    if args.quick:
        args.sizes, args.iterations, args.repeats, args.warmup = "128,256", 2, 3, 1
        args.agree_iterations, args.experiment_rounds = 8, 1
        args.target_repeats, args.mem_iterations, args.conv_repeats, args.mem_repeats = 1, 2, 3, 1
        args.scale_size, args.single_iterations, args.scales, args.scale_iterations = 256, 60, "64,128,256", "60,30,60"
        args.experiments = "base,channels_last+interleaved,base+exact,interleaved+exact"
        args.experiment_size = 256
    sizes = [int(s) for s in args.sizes.split(",")]
    optimizers = args.optimizers.split(",")
    skip = set(filter(None, args.skip.split(",")))
    args.warmup = max(1, args.warmup)
    n_iter = args.warmup + args.iterations
    report: dict[str, Any] = {"args": vars(args)}

    if args.allocator == "keep" and not keep_freed_memory():
        raise SystemExit("--allocator keep: keep_freed_memory did not apply (not glibc?)")
    info = machine()
    load_before = os.getloadavg()
    content, style, source = load_inputs(args.content, args.style)
    report.update(machine=info, load_before=load_before, images=source)
    print(f"CPU: {info['cpu']} ({info['cpus']} logical CPUs, {info['capability']}), torch {info['torch']}, "
          f"threads {info['threads']}, mkldnn {info['mkldnn']}, python {info['python']}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')} (huge pages for both tools if 1)")
    print(f"allocator for the in-process timings (both tools): {args.allocator}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}")
    weights = "random He-initialized VGG19" if args.weights == "random" else f"VGG19 from {args.weights}"
    print(f"images: {source}; weights: {weights} (timings do not depend on weight values; the time to result does)")
    print(f"per-iteration timing: runs of {args.warmup} warm-up + {args.iterations} timed iterations, "
          f"{args.repeats} runs of each tool alternating; the median is reported\n")

    try:
        net = make_net(args.seed, args.weights)
    except ImpastoError as e:
        raise SystemExit(f"bench/artistic.py: {e}") from None
    cnn = build_reference(net)
    t_start = time.perf_counter()

    # 1: seconds per iteration, in alternating rounds so that both see the same (shared machine's) load
    speed: dict[str, dict] = {}
    if "speed" not in skip:
        for size in sizes:
            for opt in optimizers:
                samples: dict[str, list[float]] = {"impasto": [], "reference": []}
                for r in range(args.repeats):
                    for tool in TOOLS if r % 2 == 0 else TOOLS[::-1]:
                        stamps, _ = run_tool(tool, net, cnn, content, style, size, opt, n_iter)
                        samples[tool].append((stamps[-1] - stamps[args.warmup - 1]) / args.iterations)
                        gc.collect()
                key = f"{size}/{opt}"
                speed[key] = {t: statistics.median(v) for t, v in samples.items()}
                speed[key].update({f"{t}_min": min(v) for t, v in samples.items()})
                speed[key].update({f"{t}_samples": v for t, v in samples.items()})
                print(f"  {key}: impasto {speed[key]['impasto']:.3f} s/it, reference {speed[key]['reference']:.3f} "
                      f"s/it", flush=True)
        rows = []
        for key, v in speed.items():
            rows.append([key, fmt_s(v["impasto"]), fmt_s(v["reference"]), f"{v['reference'] / v['impasto']:.2f}x",
                         fmt_s(v["impasto_min"]), fmt_s(v["reference_min"]),
                         f"{v['reference_min'] / v['impasto_min']:.2f}x"])
        print(f"\n1. Seconds per iteration (median of {args.repeats} alternating runs; min of them after)")
        print(table(["size/optimizer", "impasto", "reference", "ref/impasto", "impasto min", "ref min",
                     "ref/impasto (min)"], rows))
    report["speed"] = speed

    # 4: loss agreement from the same start
    agreement: dict[str, dict] = {}
    if "agreement" not in skip and args.agree_iterations > 0:
        for size in sizes:
            for opt in optimizers:
                _, li = run_tool("impasto", net, cnn, content, style, size, opt, args.agree_iterations)
                _, lr = run_tool("reference", net, cnn, content, style, size, opt, args.agree_iterations)
                # The same loss of the same image: both objectives on both tools' results.
                imp_obj, _ = impasto_objective(net, content, style, size)
                ref_obj = reference_objective(cnn, content, style, size)
                with torch.no_grad():
                    same = [rel(float(imp_obj(LAST_IMAGE[t].unsqueeze(0))), ref_obj(LAST_IMAGE[t])) for t in TOOLS]
                # The float32 noise floor of a trajectory: the reference again, with oneDNN off (other
                # convolution code, other rounding), against itself.
                with torch.backends.mkldnn.flags(enabled=False):
                    _, lr2 = run_tool("reference", net, cnn, content, style, size, opt, args.agree_iterations)
                agreement[f"{size}/{opt}"] = {"impasto": li, "reference": lr, "reference_no_onednn": lr2,
                                              "same_image_rel": max(same)}
                gc.collect()
        rows = []
        for key, v in agreement.items():
            li, lr, lr2 = v["impasto"], v["reference"], v["reference_no_onednn"]
            v["first_rel"], v["last_rel"] = rel(li[0], lr[0]), rel(li[-1], lr[-1])
            v["worst_rel"] = max(rel(a, b) for a, b in zip(li, lr, strict=True))
            v["floor_worst_rel"] = max(rel(a, b) for a, b in zip(lr2, lr, strict=True))
            rows.append([key, f"{v['same_image_rel']:.1e}", f"{v['first_rel']:.1e}", len(li), f"{li[-1]:.7g}",
                         f"{lr[-1]:.7g}", f"{v['last_rel']:.1e}", f"{v['worst_rel']:.1e}",
                         f"{v['floor_worst_rel']:.1e}"])
        print("\n4. Loss agreement: the same image (both objectives on both results), the first evaluation,")
        print("   and the trajectories after N iterations from the same start; 'floor' is the reference against")
        print("   itself with oneDNN off: float32 rounding alone makes trajectories drift that far")
        print(table(["size/optimizer", "same image", "1st eval", "N", "impasto N", "ref N", "rel diff", "worst",
                     "floor worst"], rows))
    report["agreement"] = agreement

    # 2: building the targets
    targets: dict[int, tuple[float, float]] = {}
    if "targets" not in skip:
        for size in sizes:
            targets[size] = time_targets(net, cnn, content, style, size, args.target_repeats)
        print(f"\n2. Seconds to build the targets (content features + style Grams; median of {args.target_repeats})")
        print(table(["size", "impasto", "reference", "ref/impasto"],
                    [[s, fmt_s(a), fmt_s(b), f"{b / a:.2f}x"] for s, (a, b) in targets.items()]))
    report["targets"] = targets

    # 3: peak memory, each configuration in fresh subprocesses
    memory: dict[str, list[dict]] = {}
    if "memory" not in skip:
        for _ in range(args.mem_repeats):
            for mode in MEMORY_MODES:
                for size in sizes:
                    for opt in optimizers:
                        for tool in TOOLS:
                            spec = {"tool": tool, "size": size, "optimizer": opt, "iterations": args.mem_iterations,
                                    "seed": args.seed, "content": args.content, "style": args.style,
                                    "exact": mode == "/exact", "keep": mode == "/keep"}
                            memory.setdefault(f"{size}/{opt}/{tool}{mode}", []).append(in_subprocess("memory", spec))
        for mode in MEMORY_MODES:
            rows = []
            for size in sizes:
                for opt in optimizers:
                    a, b = memory[f"{size}/{opt}/impasto{mode}"], memory[f"{size}/{opt}/reference{mode}"]
                    phase = {(k, t): statistics.median(m[k]["delta"] for m in runs) / 2**20
                             for k in ("targets", "run") for t, runs in (("a", a), ("b", b))}
                    whole = {t: statistics.median(whole_peak(m) for m in runs) / 2**20
                             for t, runs in (("a", a), ("b", b))}
                    rows.append([f"{size}/{opt}", *(f"{phase[k, t]:.0f}" for k in ("targets", "run") for t in "ab"),
                                 f"{phase['run', 'b'] / phase['run', 'a']:.2f}x",
                                 *(f"{whole[t]:.0f} ({spread_mib(runs)})" for t, runs in (("a", a), ("b", b))),
                                 f"{whole['b'] / whole['a']:.2f}x"])
            print(f"\n3{'abc'[list(MEMORY_MODES).index(mode)]}. Peak memory over the RSS once the network is loaded, "
                  f"MiB, median of {args.mem_repeats} fresh processes each; {MEMORY_MODES[mode]}; "
                  f"run = targets + {args.mem_iterations} iterations")
            print(table(["size/optimizer", "impasto targets", "ref targets", "impasto run", "ref run",
                         "ref/impasto (run)", "impasto whole (range)", "ref whole (range)", "ref/impasto (whole)"],
                        rows))
        print("   targets: building them; run: the optimization after them (the targets' memory is in its baseline);"
              "\n   whole: the process's peak over both, from the RSS once the network is loaded (what a user needs)")
    report["memory"] = memory

    # 3c: loading the weights, each tool and file format in a fresh subprocess
    loading: dict[str, dict] = {}
    if "load" not in skip:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            state = full_vgg19_state(args.seed)
            for fmt in ("legacy", "zip"):
                path = Path(tmp) / f"vgg19-{fmt}.pth"
                torch.save(state, path, _use_new_zipfile_serialization=fmt == "zip")
                for tool in TOOLS:
                    loading[f"{fmt}/{tool}"] = in_subprocess("load", {"tool": tool, "path": str(path)})
            del state
        print("\n3c. Loading a full VGG19 file (548 MiB with the classifier), fresh process each: peak RSS and what "
              "stays, MiB over the RSS before;\n    legacy = torch.save's old format, that of torchvision's "
              "official vgg19-dcbb9e9d.pth; zip = today's format")
        print(table(["file format", "impasto peak", "ref peak", "impasto kept", "ref kept"],
                    [[fmt, *(f"{loading[f'{fmt}/{t}'][k] / 2**20:.0f}" for k in ("peak", "kept") for t in TOOLS)]
                     for fmt in ("legacy", "zip")]))
    report["loading"] = loading

    # 5: FLOP lower bound
    bound: dict[str, Any] = {}
    if "flops" not in skip:
        rates = conv_throughput(args.conv_repeats)
        best = max(r for _, r in rates)
        print("\n5. Convolution throughput (forward, best of "
              f"{args.conv_repeats}), GFLOP/s: " + ", ".join(f"{n} {r / 1e9:.1f}" for n, r in rates))
        rows = []
        for size in sizes:
            fi, fr = count_flops(net, cnn, content, style, size)
            lb = fr / best  # the direct convolutions' FLOPs: impasto's Winograd layers do fewer multiplications
            entry: dict[str, Any] = {"flops_impasto": fi, "flops_reference": fr, "bound_s": lb}
            row = [size, f"{fi / 1e9:.1f}", f"{fr / 1e9:.1f}", f"{lb:.3f}"]
            if f"{size}/lbfgs" in speed:
                v = speed[f"{size}/lbfgs"]
                entry.update(impasto_ratio=v["impasto"] / lb, reference_ratio=v["reference"] / lb,
                             impasto_min_ratio=v["impasto_min"] / lb, reference_min_ratio=v["reference_min"] / lb)
                row += [f"{v['impasto'] / lb:.2f}x", f"{v['reference'] / lb:.2f}x",
                        f"{v['impasto_min'] / lb:.2f}x", f"{v['reference_min'] / lb:.2f}x"]
            else:
                row += ["-"] * 4
            bound[str(size)] = entry
            rows.append(row)
        print(f"   lower bound = FLOPs of one evaluation / best rate ({best / 1e9:.1f} GFLOP/s)")
        print(table(["size", "GFLOP impasto", "GFLOP ref", "bound s/it", "impasto/bound", "ref/bound",
                     "impasto min/bound", "ref min/bound"], rows))
        print("   (ratios use the L-BFGS seconds per iteration of table 1, median and min)")
        bound["rates"] = rates
        bound["best_rate"] = best
    report["bound"] = bound

    # speed experiments on impasto's modules (no source changes), each in a fresh subprocess, in rounds
    experiments: dict[str, dict] = {}
    variants = [v for v in args.experiments.split(",") if v]
    if variants:
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.experiment_rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                spec = {"variant": variant, "size": args.experiment_size, "seed": args.seed, "warmup": 1,
                        "repeats": 3, "content": args.content, "style": args.style}
                runs[variant].append(in_subprocess("eval", spec))
        experiments = {k: {"median": statistics.median(r["median"] for r in v), "min": min(r["min"] for r in v),
                           "loss": v[0]["loss"], "peak_delta": statistics.median(r["peak_delta"] for r in v),
                           "runs": v} for k, v in runs.items()}
        base = experiments.get("base", next(iter(experiments.values())))
        print(f"\nSpeed experiments: one objective evaluation (forward + backward) of impasto's modules at "
              f"{args.experiment_size} px; each run a fresh process (median of 3 evaluations); median and min "
              f"over {args.experiment_rounds} alternating rounds; loss of the first evaluation vs base; peak RSS "
              "over the RSS before the first evaluation (exact: RSS follows the live tensors)")
        print(table(["variant", "s/eval", "min", "base/variant", "loss rel diff", "peak MiB"],
                    [[k, f"{v['median']:.3f}", f"{v['min']:.3f}", f"{base['median'] / v['median']:.2f}x",
                      f"{rel(v['loss'], base['loss']):.1e}", f"{v['peak_delta'] / 2**20:.0f}"]
                     for k, v in experiments.items()]))
    report["experiments"] = experiments

    # 6: time to result with --scales
    if "scales" not in skip:
        r = time_to_result(net, content, style, args.scale_size, args.single_iterations,
                           [int(s) for s in args.scales.split(",")], [int(s) for s in args.scale_iterations.split(",")])
        report["scales"] = r
        print(f"\n6. Time to result at {r['size']} px (L-BFGS): single scale, {r['single_iterations']} iterations, "
              f"vs scales {r['scales']} with iterations {r['scale_iterations']}")
        first_512 = r["multi"][0][1] if r["multi"] else float("nan")
        print(f"   single-scale: start loss {r['single'][0][1]:.6g}, final loss {r['target']:.6g} after "
              f"{r['t_single']:.1f} s; multi-scale: scales start at " + ", ".join(
                  f"{t:.1f} s" for t in r["scale_starts"].values()) + f", first {r['size']}-px loss {first_512:.6g}")
        rows = []
        marks = [k for k in (10, 25, 50, 100, 200) if k < len(r["single"])]
        levels = [(f"single it {k}", r["single"][k - 1][1]) for k in marks] + [("single final", r["target"])]
        for label, level in levels:
            ts = first_reach(r["single"], level)
            t_single = r["t_single"] if label == "single final" or ts is None else ts[0]
            tm = first_reach(r["multi"], level)
            rows.append([label, f"{level:.6g}", f"{t_single:.1f}",
                         f"{tm[0]:.1f} (it {tm[1]})" if tm else "not reached",
                         f"{tm[0] / t_single:.2f}" if tm else "-"])
        r["table"] = rows
        print(table(["loss level", "loss", "single-scale s", f"multi-scale s ({r['size']}-px it)", "multi/single"],
                    rows))
        if not first_reach(r["multi"], r["target"]) and r["multi"]:
            t, loss = r["multi"][-1]
            print(f"   multi-scale did NOT reach the final single-scale loss: {loss:.6g} after {len(r['multi'])} "
                  f"{r['size']}-px iterations, {t:.1f} s")

    load_after = os.getloadavg()
    report["load_after"] = load_after
    report["elapsed_s"] = time.perf_counter() - t_start
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in load_after)}; "
          f"benchmark took {report['elapsed_s'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
