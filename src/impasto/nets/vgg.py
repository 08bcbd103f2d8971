"""VGG16/19 feature stacks with named layers (conv1_1 ... relu5_4), cut after the deepest layer used."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ImpastoError
from .winograd import FrozenConv3x3

# Channels per conv layer, "M" for a pooling layer: the layouts of torchvision's `features`.
_CONFIGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def _layer_names(config: list[int | str]) -> list[str]:
    """Names in torchvision `features` order: conv/relu per conv layer, pool per "M"."""
    names, block, index = [], 1, 1
    for item in config:
        if item == "M":
            names.append(f"pool{block}")
            block, index = block + 1, 1
        else:
            names += [f"conv{block}_{index}", f"relu{block}_{index}"]
            index += 1
    return names


VGG_LAYER_NAMES: dict[str, list[str]] = {arch: _layer_names(cfg) for arch, cfg in _CONFIGS.items()}


class _MaxPool2x2(torch.autograd.Function):
    """2x2 max pooling that keeps only its input for backward and finds the maxima again there.

    PyTorch's max pooling keeps its input and an int64 index per output value. In VGG its input is
    a ReLU's output, which the ReLU's own backward keeps anyway, so the indices are the only extra:
    45 MiB at 512 px, 36 MiB of them alive at the backward pass's peak. Finding them again costs one
    pooling pass, and the gradient is the same bit for bit (same input, same first-maximum rule).
    """

    generate_vmap_rule = True  # torch.func transforms work, as they do through nn.MaxPool2d

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2, 2)

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # differentiable ops: Hessians work
        (x,) = ctx.saved_tensors
        _, indices = F.max_pool2d(x.detach(), 2, 2, return_indices=True)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)


class _MaxPool2x2AfterReLU(torch.autograd.Function):
    """2x2 max pooling of a ReLU's output that also does that ReLU's backward, keeping one byte per
    output value: which of its window's four inputs was the maximum, or none where the maximum was not
    positive (the ReLU cut it). With `_ReLUKeepingNothing` before it, the ReLU's float output, the
    largest tensor a VGG keeps for backward (relu1_2: 64 MiB at 512 px), is not kept at all.

    The gradient is the one of nn.ReLU then nn.MaxPool2d bit for bit: the same window maximum (PyTorch's
    own indices, first maximum in scan order), passed where the output is not <= 0, NaN included.
    """

    generate_vmap_rule = True  # torch.func transforms work, as they do through nn.MaxPool2d

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
        # indices are row * width + column in each plane; a window's first input is at `first`. Comparisons
        # (1-byte results) instead of integer arithmetic on them: 6 ms instead of 36 for relu1_2 at 512 px.
        width = x.shape[-1]
        rows, cols = pooled.shape[-2:]
        first = torch.arange(0, 2 * width * rows, 2 * width, device=x.device).view(-1, 1)
        first = first + torch.arange(0, 2 * cols, 2, device=x.device)
        code = (indices >= first + width).to(torch.uint8).mul_(2)
        code += (indices == first + 1) | (indices == first + (width + 1))
        return pooled, code.masked_fill_(pooled <= 0, len(_WINDOW))

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        x = inputs[0]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.shape = x.shape
        ctx.memory_format = _memory_format(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor) -> torch.Tensor:  # differentiable ops: Hessians work
        (code,) = ctx.saved_tensors
        h, w = grad.shape[-2:]
        shape = ctx.shape
        out = _input_gradient_buffer(grad, shape, ctx.memory_format)
        for k, (r, c) in enumerate(_WINDOW):
            out[..., r:2 * h:2, c:2 * w:2] = torch.where(code == k, grad, 0.0)
        return out


_WINDOW = ((0, 0), (0, 1), (1, 0), (1, 1))  # a 2x2 window's inputs in max pooling's scan order


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor with its channels innermost, else contiguous_format. Read from the
    strides: vmap's batched tensors answer no is_contiguous(memory_format=channels_last)."""
    cl = x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _input_gradient_buffer(grad: torch.Tensor, shape: torch.Size, memory_format: torch.memory_format) -> torch.Tensor:
    """The buffer a 2x2 pooling's backward writes its input's gradient into, in the input's layout (made
    channels first and converted, it cost a 48 MiB copy for relu1_2 at 384x512); zeroed only where an odd
    side leaves a row or column that no window covers."""
    new = grad.new_zeros if shape[-2] % 2 or shape[-1] % 2 else grad.new_empty
    if memory_format == torch.channels_last:
        n, c, h, w = shape
        return new((n, h, w, c)).permute(0, 3, 1, 2)
    return new(shape)


class _ReLUKeepingNothing(torch.autograd.Function):
    """An in-place ReLU that keeps nothing and passes its gradient through: right only before
    `_MaxPool2x2AfterReLU`, whose backward gives no gradient where this ReLU's output is not positive."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.relu_()

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.mark_dirty(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _ReLUKeepingSign(torch.autograd.Function):
    """An in-place ReLU whose backward keeps which values were cut (1 byte each), not its float output.

    Worth it only where nothing else keeps that output: a layer the losses do not read, before a
    convolution that keeps nothing of its input for backward (on the CPU with frozen weights, Winograd
    or direct) or before average pooling. VGG19 has three such layers with the default losses (relu3_2,
    relu3_3, relu4_3): 22 MiB less at 512 px. The gradient is ReLU's own, NaN included (it passes where
    the output is not <= 0).
    """

    generate_vmap_rule = True  # torch.func.grad works through it (LeanReLU runs nn.ReLU under torch.func)

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x.relu_()
        return x, x <= 0

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        ctx.mark_dirty(inputs[0])
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor) -> torch.Tensor:  # differentiable ops: Hessians work
        (cut,) = ctx.saved_tensors
        return torch.where(cut, 0.0, grad)


Keep = Literal["output", "sign", "nothing"]


def _in_torch_func() -> bool:
    """Whether a torch.func transform is running: vmap cannot batch an autograd.Function that marks its input
    dirty, and forward-mode transforms need a jvp the lean ReLUs do not have, so there nn.ReLU runs."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


class LeanReLU(nn.ReLU):
    """nn.ReLU that keeps for backward only what its backward needs: its output (as nn.ReLU), only its
    sign ("sign"), or nothing ("nothing": the max pooling after it does its backward)."""

    def forward(self, x: torch.Tensor, keep: Keep = "output") -> torch.Tensor:
        if keep != "output" and self.inplace and x.requires_grad and torch.is_grad_enabled() and not _in_torch_func():
            return _ReLUKeepingSign.apply(x)[0] if keep == "sign" else _ReLUKeepingNothing.apply(x)
        return super().forward(x)


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2, 2) that keeps no int64 indices for the backward pass: its input (`_MaxPool2x2`),
    or, after a ReLU that kept nothing (`after_lean_relu`), one byte per output (`_MaxPool2x2AfterReLU`)."""

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor, after_lean_relu: bool = False) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return F.max_pool2d(x, 2, 2)
        if after_lean_relu:
            return _MaxPool2x2AfterReLU.apply(x)[0]
        return _MaxPool2x2.apply(x)


class _AvgPool2x2(torch.autograd.Function):
    """2x2 average pooling that keeps nothing for backward: PyTorch's keeps its input, for its shape."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2, 2)

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.shape = inputs[0].shape
        ctx.memory_format = _memory_format(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # differentiable ops: Hessians work
        h, w = grad.shape[-2:]
        out = _input_gradient_buffer(grad, ctx.shape, ctx.memory_format)
        windows = out[..., : 2 * h, : 2 * w].unflatten(-1, (w, 2)).unflatten(-3, (h, 2))  # (..., h, 2, w, 2)
        windows.copy_((grad / 4)[..., None, :, None])  # each input gets a quarter, written in out's layout
        return out


class AvgPool2x2(nn.AvgPool2d):
    """nn.AvgPool2d(2, 2) that keeps nothing for the backward pass, so a ReLU before it can keep only its sign."""

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad or x.dim() != 4:
            return F.avg_pool2d(x, 2, 2)
        return _AvgPool2x2.apply(x)


@dataclass(frozen=True)
class Normalization:
    """How an RGB image in [0, 1] becomes the network's input: channel order, scale, mean, std."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1.0
    bgr: bool = False


# torchvision/ImageNet: RGB in [0, 1], per-channel mean and std.
TORCHVISION_NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# Caffe-converted .pth files: BGR in [0, 255] minus the mean pixel (given here in BGR order).
CAFFE_NORMALIZATION = Normalization(mean=(103.939, 116.779, 123.68), scale=255.0, bgr=True)
# MatConvNet's VGG files: RGB in [0, 255] minus the mean pixel (when the file gives none).
MATCONVNET_NORMALIZATION = Normalization(mean=(123.68, 116.779, 103.939), scale=255.0)


class VGGFeatures(nn.Module):
    """A VGG feature stack that returns the activations of the requested layers by name.

    Only layers up to the deepest requested one are built, and ReLUs run in place except where
    a requested conv output would be overwritten, so a forward pass does no work it does not need.
    """

    def __init__(
        self,
        arch: str,
        layers: Iterable[str],
        pooling: str = "max",
        normalization: Normalization = TORCHVISION_NORMALIZATION,
    ) -> None:
        super().__init__()
        if arch not in _CONFIGS:
            raise ImpastoError(f"unknown network {arch!r}; choose one of {', '.join(_CONFIGS)}")
        if pooling not in ("max", "avg"):
            raise ImpastoError(f"unknown pooling {pooling!r}; choose max or avg")
        names = VGG_LAYER_NAMES[arch]
        wanted = list(dict.fromkeys(layers))
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ImpastoError(f"{arch} has no layer {unknown[0]!r}; layers are named like conv4_2, relu5_1")
        if not wanted:
            raise ImpastoError("no layers requested from the loss network")
        self.arch, self.pooling, self.normalization = arch, pooling, normalization
        self.outputs = frozenset(wanted)
        depth = max(names.index(n) for n in wanted) + 1
        self.layers = nn.Sequential(OrderedDict(self._build(arch, names[:depth], pooling)))
        self.register_buffer("mean", torch.tensor(normalization.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(normalization.std).view(1, 3, 1, 1), persistent=False)
        # IMPASTO_WINOGRAD=1: Winograd at every image size, not only where its transforms pay (uses_winograd)
        self.winograd_at_every_size = os.environ.get("IMPASTO_WINOGRAD") == "1"
        self.requires_grad_(False)
        self.eval()

    def _build(self, arch: str, names: list[str], pooling: str) -> list[tuple[str, nn.Module]]:
        modules: list[tuple[str, nn.Module]] = []
        channels = iter(c for c in _CONFIGS[arch] if c != "M")
        in_ch = 3
        for name in names:
            if name.startswith("conv"):
                out_ch = int(next(channels))
                modules.append((name, FrozenConv3x3(in_ch, out_ch)))
                in_ch = out_ch
            elif name.startswith("relu"):
                conv_captured = name.replace("relu", "conv") in self.outputs
                modules.append((name, LeanReLU(inplace=not conv_captured)))
            else:
                pool = MaxPool2x2() if pooling == "max" else AvgPool2x2()
                modules.append((name, pool))
        return modules

    @property
    def conv_names(self) -> list[str]:
        return [n for n in self.layers._modules if n.startswith("conv")]

    @property
    def downsampling(self) -> int:
        """How many times smaller the deepest layer's feature map is than the input."""
        return 2 ** sum(n.startswith("pool") for n in self.layers._modules)

    def _conv_maps(self, height: int, width: int) -> list[tuple[FrozenConv3x3, int, int]]:
        """Each convolution with its feature map's size for a height x width image."""
        maps = []
        for layer in self.layers.children():
            if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
                height, width = height // 2, width // 2
            elif isinstance(layer, FrozenConv3x3):
                maps.append((layer, height, width))
        return maps

    def feature_elements(self, height: int, width: int) -> int:
        """Values in the convolutions' outputs of one pass over one height x width image."""
        return sum(int(conv.out_channels) * h * w for conv, h, w in self._conv_maps(height, width))

    def uses_winograd(self, batch: int, height: int, width: int) -> bool:
        """Whether the Winograd layers run Winograd on a batch of height x width images.

        Their transformed weights take a fixed memory (4x those layers' weights: 158-194 MiB for VGG19 up to
        relu5_1) and save time in proportion to the pixels. On a small image they cost more memory than the
        whole optimization and save little (at 256x192 px: 1.11-1.14x faster evaluations, for a run that then
        took 1.35x the reference's memory), so they run where they take no more memory than the pass's own
        feature maps: from about 175,000 pixels (485x365) for VGG19 up to relu5_1. IMPASTO_WINOGRAD=1: at every size."""
        if self.winograd_at_every_size:
            return True
        maps = self._conv_maps(height, width)
        transforms = sum(conv.transform_bytes(min(h, w)) for conv, h, w in maps)
        return transforms <= 4 * batch * sum(int(conv.out_channels) * h * w for conv, h, w in maps)

    def kept_transform_bytes(self, height: int, width: int) -> int:
        """The memory the Winograd transforms kept for one height x width image take (0 where none run)."""
        if not self.uses_winograd(1, height, width):
            return 0
        return sum(conv.kept_transform_bytes(min(h, w)) for conv, h, w in self._conv_maps(height, width))

    @staticmethod
    def _relu_keeps(relu: LeanReLU, following: nn.Module | None, x: torch.Tensor) -> Keep:
        """What a ReLU whose output no loss reads keeps for backward: nothing before max pooling, which then
        does the ReLU's backward; its sign where what follows keeps nothing of its output (average pooling,
        or a convolution with frozen weights on the CPU); else its output."""
        if isinstance(following, MaxPool2x2) and relu.inplace:
            return "nothing"
        if isinstance(following, FrozenConv3x3) and following.keeps_no_input(x):
            return "sign"
        if isinstance(following, AvgPool2x2):
            return "sign"
        return "output"

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """Map an RGB batch in [0, 1] to the input convention of the loaded weights."""
        if self.normalization.bgr:
            image = image.flip(1)
        if self.normalization.scale != 1.0:
            image = image * self.normalization.scale
        return (image - self.get_buffer("mean")) / self.get_buffer("std")

    def forward(self, image: torch.Tensor, layers: Iterable[str] | None = None,
                on_feature: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
        """Activations of the requested layers; with `layers`, only those, and the pass stops at the
        deepest of them (training needs only relu2_2 of the content batch, not relu4_3).

        With `on_feature`, each activation is handed to it as soon as it is computed (and not returned),
        so a loss can be evaluated layer by layer during the pass.
        """
        wanted = self.outputs if layers is None else frozenset(layers) & self.outputs
        x = self.normalize(image)
        feats: dict[str, torch.Tensor] = {}
        seen = 0
        children = list(self.layers.named_children())
        kept: Keep = "output"
        winograd = self.uses_winograd(x.shape[0], x.shape[-2], x.shape[-1])
        for i, (name, layer) in enumerate(children):
            if isinstance(layer, LeanReLU):
                following = children[i + 1][1] if i + 1 < len(children) else None
                kept = "output" if name in wanted else self._relu_keeps(layer, following, x)
                x = layer(x, keep=kept)
            elif isinstance(layer, MaxPool2x2):
                x = layer(x, after_lean_relu=kept == "nothing")
            elif isinstance(layer, FrozenConv3x3):
                x = layer(x, winograd=winograd)
            else:
                x = layer(x)
            if name in wanted:
                seen += 1
                if on_feature is None:
                    feats[name] = x
                else:
                    on_feature(name, x)
                if seen == len(wanted):
                    break
        return feats
