"""Winograd F(4x4, 3x3) convolution for the frozen loss network on the CPU.

A 3x3 convolution computed tile by tile (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016): each 6x6 input tile and each kernel are transformed so that a 4x4 output tile costs
36 multiplications per channel pair instead of 144. oneDNN's direct convolution already runs near the
machine's peak, so doing fewer multiplications is the way left to make VGG's deep layers (256-512
channels, where the tile transforms are cheap next to the channel mixing) faster. A tile product is three
matrix products: a fixed 36x36 matrix on the gathered 6x6 tiles (input transform), one product over
channels per transformed position (the mixing), and a fixed 16x36 matrix that turns 36 values back into a
4x4 output tile. Feature maps are channels last, so a tile's channels are contiguous for all three, and
tiles go in bands of rows, so that every temporary stays small. The gradient to the input is the same
three steps, each one's adjoint, so backward costs what forward does and keeps nothing alive between them:
the weights are frozen, and a frozen convolution's input gradient needs only the weights.

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
        self.output = _OUTPUT.to(weight.device, weight.dtype)
        self.input_t, self.output_t = self.input.t().contiguous(), self.output.t().contiguous()  # for backward


BAND_TILES = 128  # tiles per band: a temporary (36 x tiles x channels) is at most 9 MiB for maps up to 512 px wide


def _inner_product() -> Callable[..., torch.Tensor] | None:
    """oneDNN's inner product (PyTorch's fused-linear op), where this build has it."""
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _inner_product()


def _onednn_for(t: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """oneDNN's inner product where it may take a product with t: float32 on the CPU, and no graph being
    built (its op has no derivative, so a double backward takes matmul)."""
    usable = (not torch.is_grad_enabled() and t.dtype == torch.float32 and t.device.type == "cpu"
              and torch.backends.mkldnn.is_available() and bool(torch.backends.mkldnn.enabled))
    return _LINEAR if usable else None


def _float32_products_in_float32() -> bool:
    """False where the user lets oneDNN compute float32 products in bf16 or tf32
    (torch.backends.mkldnn.matmul.fp32_precision): Winograd's transforms would amplify that rounding, so
    the direct convolution runs instead."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(matmul, "fp32_precision", "none") in ("none", "ieee")


def _mix(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The channel mixing of each transformed position p: v[p] (tiles, K) @ u[p]^T (K, N) -> (36, tiles, N).
    matmul would call MKL's sgemm, which ran these shapes at 130-190 GFLOP/s on an AVX-512 AMD CPU where
    oneDNN's inner product ran them at 330-386."""
    linear = _onednn_for(v)
    if linear is None:
        return torch.matmul(v, u.transpose(1, 2))
    return torch.stack([linear(v[p], u[p], None, "none", [], "") for p in range(len(v))])


def _transform_by(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """matrix (r, k) @ x (k, N) for a fixed tile transform: memory-bound, and oneDNN's is 1.4-2.6x MKL's there."""
    linear = _onednn_for(x)
    return matrix @ x if linear is None else linear(matrix, x.t(), None, "none", [], "")


def _bands(tile_rows: int, tile_cols: int) -> list[tuple[int, int]]:
    """(first tile row, tile rows) of each band: bands keep each step's temporaries small, in cache and
    out of fresh memory mappings (a temporary over 32 MiB page-faulted at every pass: 2x the time)."""
    step = max(1, BAND_TILES // tile_cols)
    return [(i, min(step, tile_rows - i)) for i in range(0, tile_rows, step)]


def _forward(xp: torch.Tensor, w: WinogradWeights, y: torch.Tensor) -> None:
    """One image, channels last and zero-padded, (4 th + 2, 4 tw + 2, C): its convolution plus bias into
    y, (4 th, 4 tw, out), band by band."""
    c, out = xp.shape[2], w.mixing.shape[1]
    th, tw = y.shape[0] // TILE, y.shape[1] // TILE
    rows, cols = xp.stride(0), xp.stride(1)
    for i, n in _bands(th, tw):
        # every 6x6 tile of the band, gathered as (36, tiles x C), then transformed
        tiles = xp.as_strided((SPAN, SPAN, n, tw, c), (rows, cols, TILE * rows, TILE * cols, 1),
                              xp.storage_offset() + TILE * i * rows)
        v = _transform_by(w.input, tiles.reshape(SPAN * SPAN, -1)).view(SPAN * SPAN, n * tw, c)
        m = _mix(v, w.mixing)  # (36, tiles, out)
        del v  # each temporary is 2.25x the band's feature map: free it as soon as it is used
        t = _transform_by(w.output, m.view(SPAN * SPAN, -1)).view(TILE, TILE, n, tw, out).permute(2, 0, 3, 1, 4)
        del m
        band = y[TILE * i:TILE * (i + n)].view(n, TILE, tw, TILE, out)
        if w.bias is None:
            band.copy_(t)
        else:
            torch.add(t, w.bias, out=band)


def _backward(gp: torch.Tensor, w: WinogradWeights) -> torch.Tensor:
    """The adjoint of `_forward` without bias: (4 th, 4 tw, out) -> (4 th + 4, 4 tw + 4, C), of which the
    first 4 th + 2 rows and columns are the padded input's gradient."""
    out, c = gp.shape[2], w.mixing.shape[2]
    th, tw = gp.shape[0] // TILE, gp.shape[1] // TILE
    # Overlap-add: a tile's last two rows/columns land on the first two of the next tile.
    acc = gp.new_zeros(th + 1, TILE, tw + 1, TILE, c)
    for i, n in _bands(th, tw):
        tiles = gp[TILE * i:TILE * (i + n)].view(n, TILE, tw, TILE, out).permute(1, 3, 0, 2, 4)
        m = _transform_by(w.output_t, tiles.reshape(TILE * TILE, -1)).view(SPAN * SPAN, n * tw, out)
        del tiles
        v = _mix(m, w.mixing.transpose(1, 2))  # (36, tiles, C)
        del m
        t = _transform_by(w.input_t, v.view(SPAN * SPAN, -1)).view(SPAN, SPAN, n, tw, c)  # each tile's 6x6 gradient
        del v
        acc[i:i + n, :, :tw] += t[:TILE, :TILE].permute(2, 0, 3, 1, 4)
        acc[i + 1:i + n + 1, :2, :tw] += t[TILE:, :TILE].permute(2, 0, 3, 1, 4)
        acc[i:i + n, :, 1:, :2] += t[:TILE, TILE:].permute(2, 0, 3, 1, 4)
        acc[i + 1:i + n + 1, :2, 1:, :2] += t[TILE:, TILE:].permute(2, 0, 3, 1, 4)
    return acc.view((th + 1) * TILE, (tw + 1) * TILE, c)


def _padded_hwc(x: torch.Tensor, height: int, width: int, top: int) -> torch.Tensor:
    """One image (C, H, W) in any layout as (height, width, C), channels last, zero-padded with `top`
    rows/columns before it (a view where no padding is needed and x is channels last already)."""
    hwc = x.permute(1, 2, 0)
    h, w = hwc.shape[:2]
    if (h, w) == (height, width) and hwc.is_contiguous():
        return hwc
    out = x.new_empty(height, width, x.shape[0])
    out[:top].zero_()
    out[top + h:].zero_()
    out[top:top + h, :top].zero_()
    out[top:top + h, top + w:].zero_()
    out[top:top + h, top:top + w] = hwc
    return out


Weights = WinogradWeights | Callable[[], WinogradWeights]  # made once, or made again at each use


def _resolve(weights: Weights) -> WinogradWeights:
    return weights if isinstance(weights, WinogradWeights) else weights()


class _WinogradConv3x3(torch.autograd.Function):
    """Channels last throughout: a tile's values for all channels are contiguous, which the channel
    mixing (an inner product over channels) and every gather and scatter of tiles read and write."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, made: Weights) -> torch.Tensor:
        h, w = x.shape[-2:]
        th, tw = -(-h // TILE), -(-w // TILE)
        ctx.weights, ctx.size = made, (h, w)  # a maker, not its product: nothing kept until backward
        weights = _resolve(made)
        y = torch.empty(x.shape[0], weights.mixing.shape[1], th * TILE, tw * TILE, dtype=x.dtype,
                        device=x.device, memory_format=torch.channels_last)
        for image, out in zip(x, y, strict=True):
            _forward(_padded_hwc(image, th * TILE + 2, tw * TILE + 2, 1), weights, out.permute(1, 2, 0))
        if (h, w) == (th * TILE, tw * TILE):
            return y
        # a copy, never a view of y: cutting only rows of one image leaves it contiguous, and the ReLU after
        # runs in place, which autograd forbids on a custom Function's view
        return y[:, :, :h, :w].clone(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # differentiable ops: Hessians work
        weights, (h, w) = _resolve(ctx.weights), ctx.size
        th, tw = -(-h // TILE), -(-w // TILE)
        gx = [_backward(_padded_hwc(g, th * TILE, tw * TILE, 0), weights)[1:h + 1, 1:w + 1].permute(2, 0, 1)
              for g in grad]
        return (torch.stack(gx) if len(gx) > 1 else gx[0][None]), None


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
    at least `MIN_SIDE` pixels per side. Elsewhere (CUDA, MPS, training the weights, autocast, float32 products
    that oneDNN may round to bf16/tf32) it is `nn.Conv2d`.
    The transformed weights (4x the layer's weights: 200 MB for VGG19 up to relu5_1) are made on first
    use and remade when the weights change in place or move; IMPASTO_WINOGRAD_CACHE=0 makes them at each pass
    instead (in forward and again in backward). IMPASTO_WINOGRAD=0 turns Winograd off; a caller may turn it
    off for one pass (`forward(x, winograd=False)`: `VGGFeatures` does for small images)."""

    # Measured on a 2-core CPU, forward + backward: 1.2-2.2x from 128->256 to 512->512 channels at 24x32
    # pixels or more; 0.6x at 128->128 (the transforms cost more than they save); 0.9x at 12x16, 0.4x at 8x8.
    MIN_CHANNELS = 256
    MIN_SIDE = 16

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1)
        self.winograd = out_channels >= self.MIN_CHANNELS and os.environ.get("IMPASTO_WINOGRAD", "1") != "0"
        # IMPASTO_WINOGRAD_CACHE=0: make the transformed weights at each pass instead of keeping them (203 MiB
        # less for VGG19 up to relu5_1; measured 1.04-1.11x the time per evaluation at 512 px)
        self.keep_transform = os.environ.get("IMPASTO_WINOGRAD_CACHE", "1") != "0"
        self._cached: tuple[tuple[object, ...], WinogradWeights] | None = None

    def forward(self, x: torch.Tensor, winograd: bool = True) -> torch.Tensor:
        if winograd and self._use_winograd(x):
            return winograd_conv3x3(x, self._winograd_weights() if self.keep_transform else self._transform)
        if not winograd and x.requires_grad and torch.is_grad_enabled():
            # an optimization too small for the transforms: ones kept from a bigger target pass (a style
            # image's) go; target passes themselves keep them (a smaller style must not drop the output's)
            self._cached = None
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
        return (self.winograd and min(x.shape[-2:]) >= self.MIN_SIDE and self._frozen_on_cpu(x)
                and _float32_products_in_float32())

    def transform_bytes(self, side: int) -> int:
        """The memory the transformed weights take (36 values per kernel) where a map whose shorter side is
        `side` pixels would run Winograd, kept or made for the pass; else 0."""
        runs = self.winograd and side >= self.MIN_SIDE
        return SPAN * SPAN * self.out_channels * self.in_channels * 4 if runs else 0

    def kept_transform_bytes(self, side: int) -> int:
        """`transform_bytes`, where the transform is kept between passes; else 0."""
        return self.transform_bytes(side) if self.keep_transform else 0

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
