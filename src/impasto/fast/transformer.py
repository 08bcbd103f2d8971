"""The feed-forward style network (Johnson et al. 2016) with instance normalization (Ulyanov et al. 2016).

One class covers impasto's own networks and imported ones; a `TransformerSpec` says which
conventions a network follows, and is stored in the model file beside the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ImpastoError

MULTIPLE = 4  # two stride-2 downsamplings: sides are padded to a multiple of 4, the output cropped back


@dataclass(frozen=True)
class TransformerSpec:
    """The architecture of a network: its width and the conventions of the toolkit that trained it.

    impasto's own networks use reflection padding and nearest-neighbour upsampling followed by a
    convolution (no checkerboard artifacts); networks imported from TensorFlow use its zero "same"
    padding and transposed convolutions, so they compute exactly what they computed there.
    """

    width: float = 1.0
    residual_blocks: int = 5
    padding: str = "reflect"  # "reflect" | "same" (TensorFlow's zero padding, extra pixel bottom/right)
    upsample: str = "nearest"  # "nearest" (upsample, then 3x3 conv) | "transposed" (3x3 stride-2 transposed conv)
    norm_eps: float = 1e-5
    output_norm: bool = False  # instance norm (and no ReLU) after the last convolution
    output: str = "linear"  # "linear": y / 255 | "tanh": (150 tanh(y) + 127.5) / 255

    @property
    def channels(self) -> tuple[int, int, int]:
        return tuple(max(1, round(c * self.width)) for c in (32, 64, 128))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ImpastoError(f"unknown network setting {sorted(unknown)[0]!r} in the model file")
        spec = cls(**data)
        spec.check()
        return spec

    def check(self) -> None:
        if not self.width > 0:
            raise ImpastoError(f"--width must be positive, got {self.width}")
        if self.residual_blocks < 0:
            raise ImpastoError(f"the number of residual blocks must be >= 0, got {self.residual_blocks}")
        for name, value, allowed in (("padding", self.padding, ("reflect", "same")),
                                     ("upsample", self.upsample, ("nearest", "transposed")),
                                     ("output", self.output, ("linear", "tanh"))):
            if value not in allowed:
                raise ImpastoError(f"unknown {name} {value!r}; choose {' or '.join(allowed)}")


class ConvLayer(nn.Module):
    """Pad, convolve, then optionally instance-normalize and apply ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, spec: TransformerSpec,
                 norm: bool = True, relu: bool = True) -> None:
        super().__init__()
        self.pad = _padding(kernel, stride, spec.padding)
        self.conv = nn.Conv2d(cin, cout, kernel, stride)
        self.norm = nn.InstanceNorm2d(cout, eps=spec.norm_eps, affine=True) if norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.norm(self.conv(self.pad(x))))


def _padding(kernel: int, stride: int, mode: str) -> nn.Module:
    """Reflection padding of kernel // 2, or TensorFlow's "same" zero padding.

    With "same" and stride 2 on an even side, TensorFlow pads one pixel less at the top/left than at
    the bottom/right; sides here are always even at stride 2 since inputs are padded to a multiple of 4.
    """
    half = kernel // 2
    if mode == "reflect":
        return nn.ReflectionPad2d(half)
    total = kernel - stride
    return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))


class ResidualBlock(nn.Module):
    """Two 3x3 conv + instance-norm layers (ReLU between) added to the block's input."""

    def __init__(self, channels: int, spec: TransformerSpec) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvLayer(channels, channels, 3, 1, spec),
                                  ConvLayer(channels, channels, 3, 1, spec, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UpsampleLayer(nn.Module):
    """Double the resolution: nearest upsampling then a 3x3 conv, or a stride-2 transposed conv."""

    def __init__(self, cin: int, cout: int, spec: TransformerSpec) -> None:
        super().__init__()
        self.transposed = spec.upsample == "transposed"
        if self.transposed:
            # TensorFlow's conv2d_transpose "same" with stride 2 = the full transposed conv (2n + 1)
            # without its last row and column.
            self.conv: nn.Module = nn.ConvTranspose2d(cin, cout, 3, 2)
        else:
            self.conv = nn.Sequential(_padding(3, 1, spec.padding), nn.Conv2d(cin, cout, 3, 1))
        self.norm = nn.InstanceNorm2d(cout, eps=spec.norm_eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            h, w = x.shape[-2], x.shape[-1]
            x = self.conv(x)[..., : 2 * h, : 2 * w]
        else:
            x = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return F.relu(self.norm(x))


class TransformerNet(nn.Module):
    """Image (N, 3, H, W) in [0, 1] to its stylization, same size, values about [0, 1] (not clamped,
    so training gets gradients everywhere; `stylize` clamps).

    Sides of 5 pixels or more work: the input is reflection-padded to a multiple of 4 and the output
    cropped back (`apply.Stylizer` edge-pads smaller images first).
    """

    def __init__(self, spec: TransformerSpec | None = None) -> None:
        super().__init__()
        self.spec = spec = spec or TransformerSpec()
        spec.check()
        c1, c2, c3 = spec.channels
        self.encoder = nn.Sequential(ConvLayer(3, c1, 9, 1, spec), ConvLayer(c1, c2, 3, 2, spec),
                                     ConvLayer(c2, c3, 3, 2, spec))
        self.residuals = nn.Sequential(*[ResidualBlock(c3, spec) for _ in range(spec.residual_blocks)])
        self.decoder = nn.Sequential(UpsampleLayer(c3, c2, spec), UpsampleLayer(c2, c1, spec),
                                     ConvLayer(c1, 3, 9, 1, spec, norm=spec.output_norm, relu=False))
        self.tanh_output = spec.output == "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        x = F.pad(x * 255.0, (0, (-w) % 4, 0, (-h) % 4), mode="reflect")  # 4 = MULTIPLE (TorchScript needs a literal)
        y = self.decoder(self.residuals(self.encoder(x)))[..., :h, :w]
        if self.tanh_output:
            return (torch.tanh(y) * 150.0 + 127.5) / 255.0
        return y / 255.0

    def stylize(self, x: torch.Tensor) -> torch.Tensor:
        """The output as an image: clamped to [0, 1]."""
        return self(x).clamp(0.0, 1.0)
