"""VGG16/19 feature stacks with named layers (conv1_1 ... relu5_4), cut after the deepest layer used."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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


class _ReLUKeepingSign(torch.autograd.Function):
    """An in-place ReLU whose backward keeps which values were cut (1 byte each), not its float output.

    Worth it only where nothing else keeps that output: a layer the losses do not read, before a
    convolution that keeps nothing of its input for backward (on the CPU with frozen weights, Winograd
    or direct). VGG19 has three such layers with the default losses (relu3_2, relu3_3, relu4_3): 22 MiB
    less at 512 px. The gradient is ReLU's own, NaN included (it passes where the output is not <= 0).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(x)
        x.relu_()
        ctx.save_for_backward(x <= 0)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # differentiable ops: Hessians work
        (cut,) = ctx.saved_tensors
        return torch.where(cut, 0.0, grad)


class LeanReLU(nn.ReLU):
    """nn.ReLU that, when told its output's sign is all its backward needs, keeps only that sign."""

    def forward(self, x: torch.Tensor, sign_only: bool = False) -> torch.Tensor:
        if sign_only and self.inplace and x.requires_grad and torch.is_grad_enabled():
            return _ReLUKeepingSign.apply(x)
        return super().forward(x)


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2, 2) that keeps no indices for the backward pass (see `_MaxPool2x2`)."""

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return F.max_pool2d(x, 2, 2)
        return _MaxPool2x2.apply(x)


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
                pool = MaxPool2x2() if pooling == "max" else nn.AvgPool2d(2, 2)
                modules.append((name, pool))
        return modules

    @property
    def conv_names(self) -> list[str]:
        return [n for n in self.layers._modules if n.startswith("conv")]

    @property
    def downsampling(self) -> int:
        """How many times smaller the deepest layer's feature map is than the input."""
        return 2 ** sum(n.startswith("pool") for n in self.layers._modules)

    @staticmethod
    def _sign_is_enough(following: nn.Module | None, x: torch.Tensor) -> bool:
        """Whether a ReLU's backward needs only the sign of its output: the output will not be handed to a
        loss (checked by the caller), and the convolution after the ReLU keeps nothing of it for backward."""
        return isinstance(following, FrozenConv3x3) and following.keeps_no_input(x)

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
        for i, (name, layer) in enumerate(children):
            following = children[i + 1][1] if i + 1 < len(children) else None
            if isinstance(layer, LeanReLU):
                x = layer(x, sign_only=name not in wanted and self._sign_is_enough(following, x))
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
