"""Winograd F(4x4, 3x3) convolution for the frozen loss network on the CPU.

A 3x3 convolution computed tile by tile (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016): each 6x6 input tile and each kernel are transformed so that a 4x4 output tile costs
36 multiplications per channel pair instead of 144. On a 2-core CPU oneDNN's direct convolution
already runs near the machine's peak, so doing fewer multiplications is the way left to make VGG's deep
layers (256-512 channels, where the tile transforms are cheap next to the channel mixing) faster:
measured 1.2-2.2x there, forward and backward. A tile product is three ordinary operations: a
per-channel stride-4 convolution with 36 fixed 6x6 kernels (input transform), one matrix product over
channels per transformed position, and a fixed 16x36 matrix that turns 36 values back into a 4x4
output tile. The gradient to the input is the same three steps, each one's adjoint, so backward costs
what forward does and keeps nothing alive between them: the weights are frozen, and a frozen
convolution's input gradient needs only the weights.

Results differ from a direct convolution by rounding, about 1e-5 of the output's largest value in
float32 (oneDNN's own channels-last and NCHW paths differ from each other as much in the loss gradient).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

TILE = 4  # output pixels per tile side
SPAN = TILE + 2  # input pixels per tile side (a 3x3 kernel needs one more on each side)

_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


def _transform(matrix: Sequence[Sequence[float]]) -> torch.Tensor:
    """The 2-D tile transform X -> M X M^T as one matrix on flattened tiles: (r*r, k*k)."""
    m = torch.tensor(matrix, dtype=torch.float64)
    return torch.einsum("ik,jl->ijkl", m, m).reshape(m.shape[0] ** 2, m.shape[1] ** 2)


_INPUT = _transform(_BT)  # (36, 36): a 6x6 input tile -> its 36 transformed values
_OUTPUT = _transform(_AT)  # (16, 36): 36 transformed values -> a 4x4 output tile


class WinogradWeights:
    """A frozen 3x3 convolution's weights in the transformed domain, with the fixed tile transforms."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        g = torch.tensor(_G, dtype=weight.dtype, device=weight.device)
        cout, cin = weight.shape[:2]
        # G w G^T for every kernel at once, as one matrix product that writes the (36, out, in) layout
        flat = weight.detach().reshape(cout * cin, 3 * 3)
        self.mixing = torch.matmul(torch.kron(g, g), flat.t()).view(SPAN * SPAN, cout, cin)
        self.bias = None if bias is None else bias.detach().clone()
        self.input = _INPUT.to(weight.device, weight.dtype)
        self.input_kernels = self.input.reshape(SPAN * SPAN, 1, SPAN, SPAN)
        self.output = _OUTPUT.to(weight.device, weight.dtype)


def _forward(image: torch.Tensor, w: WinogradWeights, out: torch.Tensor) -> None:
    """One image (C, H', W'), zero-padded so that H' = 4 th + 2: its convolution plus bias into `out`,
    (out channels, 4 th, 4 tw)."""
    c = image.shape[0]
    v = F.conv2d(image.unsqueeze(1), w.input_kernels, stride=TILE)  # (C, 36, th, tw): every tile transformed
    th, tw = v.shape[-2:]
    m = torch.matmul(w.mixing, v.view(c, SPAN * SPAN, th * tw).transpose(0, 1))  # (36, out, th*tw)
    del v  # each temporary is 2.25x a feature map: free it as soon as it is used (peak memory)
    y = (w.output @ m.view(SPAN * SPAN, -1)).view(TILE, TILE, -1, th, tw).permute(2, 3, 0, 4, 1)
    del m
    tiles = out.view(-1, th, TILE, tw, TILE)
    if w.bias is None:
        tiles.copy_(y)
    else:
        torch.add(y, w.bias.view(-1, 1, 1, 1, 1), out=tiles)


def _backward(grad: torch.Tensor, w: WinogradWeights) -> torch.Tensor:
    """The adjoint of `_forward` without bias: (out, 4 th, 4 tw) -> (C, 4 th + 2, 4 tw + 2)."""
    cout, height, width = grad.shape
    th, tw = height // TILE, width // TILE
    tiles = grad.view(cout, th, TILE, tw, TILE).permute(2, 4, 0, 1, 3).reshape(TILE * TILE, -1)
    m = (w.output.t() @ tiles).view(SPAN * SPAN, cout, th * tw)
    del tiles
    v = torch.matmul(w.mixing.transpose(1, 2), m)  # (36, C, th*tw)
    del m
    c = v.shape[1]
    t = (w.input.t() @ v.view(SPAN * SPAN, -1)).view(SPAN, SPAN, c, th, tw)  # each tile's 6x6 gradient
    del v
    # Overlap-add: a tile's last two rows/columns land on the first two of the next tile.
    out = t.new_empty(c, th + 1, TILE, tw + 1, TILE)
    out[:, th].zero_()
    out[:, :th, :, tw].zero_()
    out[:, :th, :, :tw, :] = t[:TILE, :TILE].permute(2, 3, 0, 4, 1)
    out[:, 1:, :2, :tw, :] += t[TILE:, :TILE].permute(2, 3, 0, 4, 1)
    out[:, :th, :, 1:, :2] += t[:TILE, TILE:].permute(2, 3, 0, 4, 1)
    out[:, 1:, :2, 1:, :2] += t[TILE:, TILE:].permute(2, 3, 0, 4, 1)
    return out.view(c, (th + 1) * TILE, (tw + 1) * TILE)[:, : th * TILE + 2, : tw * TILE + 2]


def _padded(x: torch.Tensor, height: int, width: int, top: int) -> torch.Tensor:
    """x in NCHW memory, zero-padded to height x width with `top` rows/columns before it."""
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x.contiguous()
    out = x.new_zeros(x.shape[0], x.shape[1], height, width)
    out[:, :, top:top + h, top:top + w] = x
    return out


Weights = WinogradWeights | Callable[[], WinogradWeights]  # made once, or made again at each use


def _resolve(weights: Weights) -> WinogradWeights:
    return weights if isinstance(weights, WinogradWeights) else weights()


class _WinogradConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, made: Weights) -> torch.Tensor:
        h, w = x.shape[-2:]
        th, tw = -(-h // TILE), -(-w // TILE)
        ctx.weights, ctx.size = made, (h, w)  # a maker, not its product: nothing kept until backward
        weights = _resolve(made)
        xp = _padded(x, th * TILE + 2, tw * TILE + 2, 1)
        y = x.new_empty(x.shape[0], weights.mixing.shape[1], th * TILE, tw * TILE)
        for image, out in zip(xp, y, strict=True):
            _forward(image, weights, out)
        return y if (h, w) == (th * TILE, tw * TILE) else y[:, :, :h, :w].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # differentiable ops: Hessians work
        weights, (h, w) = _resolve(ctx.weights), ctx.size
        th, tw = -(-h // TILE), -(-w // TILE)
        gp = _padded(grad, th * TILE, tw * TILE, 0)
        gx = torch.stack([_backward(g, weights) for g in gp]) if len(gp) > 1 else _backward(gp[0], weights)[None]
        return gx[:, :, 1:h + 1, 1:w + 1], None


class _FrozenConv3x3(torch.autograd.Function):
    """A direct 3x3 convolution with frozen weights that keeps only the weights for backward (nn.Conv2d
    keeps its input too, for a weight gradient nobody asks for): the input's gradient is the transposed
    convolution of the output's, what conv2d's own backward computes (measured equal bit for bit)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, padding=1)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # differentiable: Hessians work
        (weight,) = ctx.saved_tensors
        return F.conv_transpose2d(grad, weight, padding=1), None, None


def winograd_conv3x3(x: torch.Tensor, weights: Weights) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) of the frozen weights `weights` was made from; x (N, C, H, W).
    `weights` may be a function that makes them, called in forward and again in backward."""
    return _WinogradConv3x3.apply(x, weights)


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


def _fingerprint(t: torch.Tensor) -> tuple[object, ...]:
    """What changes when a tensor's values do: its storage and version, and its sum, for writes through
    `.data` (which the version counter does not see). Inference tensors have no version counter."""
    version = None if t.is_inference() else t._version
    return t.data_ptr(), version, float(t.detach().sum())


class FrozenConv3x3(nn.Conv2d):
    """A 3x3, padding-1 convolution that runs as Winograd F(4x4, 3x3) where that is faster: on the CPU,
    in float32, with frozen weights, at least `MIN_CHANNELS` output channels and feature maps of
    at least `MIN_SIDE` pixels per side. Elsewhere (CUDA, MPS, training the weights, autocast) it is `nn.Conv2d`.
    The transformed weights (4x the layer's weights: 200 MB for VGG19 up to relu5_1) are made on first
    use and remade when the weights change in place or move; IMPASTO_WINOGRAD_CACHE=0 makes them at each pass
    instead (in forward and again in backward). IMPASTO_WINOGRAD=0 turns Winograd off."""

    # Measured on a 2-core CPU, forward + backward: 1.2-2.2x from 128->256 to 512->512 channels at 24x32
    # pixels or more; 0.6x at 128->128 (the transforms cost more than they save); 0.9x at 12x16, 0.4x at 8x8.
    MIN_CHANNELS = 256
    MIN_SIDE = 16

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1)
        self.winograd = out_channels >= self.MIN_CHANNELS and os.environ.get("IMPASTO_WINOGRAD", "1") != "0"
        # IMPASTO_WINOGRAD_CACHE=0: make the transformed weights at each pass instead of keeping them (203 MiB
        # less for VGG19 up to relu5_1; measured 1.04-1.11x the time per evaluation at 512 px, 1.5x at 256 px)
        self.keep_transform = os.environ.get("IMPASTO_WINOGRAD_CACHE", "1") != "0"
        self._cached: tuple[tuple[object, ...], WinogradWeights] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_winograd(x):
            return winograd_conv3x3(x, self._winograd_weights() if self.keep_transform else self._transform)
        if self._frozen_on_cpu(x) and x.requires_grad and torch.is_grad_enabled():
            return _FrozenConv3x3.apply(x, self.weight, self.bias)
        return super().forward(x)

    def keeps_no_input(self, x: torch.Tensor) -> bool:
        """Whether a forward pass on x keeps nothing of x for backward: with frozen weights on the CPU the
        input's gradient needs only the weights (Winograd or `_FrozenConv3x3`); nn.Conv2d keeps its input."""
        return self._frozen_on_cpu(x)

    def _frozen_on_cpu(self, x: torch.Tensor) -> bool:
        trained = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.shape[0] > 0
                and self.weight.dtype == torch.float32 and not trained and not _cpu_autocast())

    def _use_winograd(self, x: torch.Tensor) -> bool:
        return self.winograd and min(x.shape[-2:]) >= self.MIN_SIDE and self._frozen_on_cpu(x)

    def kept_transform_bytes(self) -> int:
        """The memory a kept transform takes once made (36 values per kernel), 0 where none is kept."""
        return SPAN * SPAN * self.out_channels * self.in_channels * 4 if self.winograd and self.keep_transform else 0

    def make_transform_per_pass(self) -> None:
        """From now on, make the transformed weights at each pass instead of keeping them."""
        self.keep_transform, self._cached = False, None

    def _transform(self) -> WinogradWeights:
        with torch.inference_mode(False), torch.no_grad():
            return WinogradWeights(self.weight, self.bias)

    def _winograd_weights(self) -> WinogradWeights:
        key = (_fingerprint(self.weight), None if self.bias is None else _fingerprint(self.bias))
        if self._cached is None or self._cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                self._cached = (key, WinogradWeights(self.weight, self.bias))
        return self._cached[1]

    def _apply(self, fn, recurse=True):
        """.to(), .float(), .cuda(): where the weights move or change, their transform goes (its memory
        with it); a no-op move such as the engines' `net.to(device)` on every run keeps it."""
        before = self.weight.data_ptr(), self.weight.dtype
        out = super()._apply(fn, recurse)
        if (self.weight.data_ptr(), self.weight.dtype) != before:
            self._cached = None
        return out

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_cached": None}  # copies and pickles do not carry the cache
