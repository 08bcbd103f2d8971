"""Winograd F(4x4, 3x3): equal to a direct convolution, forward and backward, and used only where it may be."""

import pytest
import torch
import torch.nn.functional as F

from impasto.nets import VGGFeatures, winograd
from impasto.nets.winograd import FrozenConv3x3, WinogradWeights, winograd_conv3x3


def _weights(cin: int, cout: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64) * (2 / (9 * cin)) ** 0.5).to(dtype)
    b = (torch.randn(cout, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    return w, b


@pytest.mark.parametrize("shape", [(1, 5, 8, 8), (3, 4, 13, 9), (2, 6, 12, 20), (1, 3, 1, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_equals_a_direct_convolution(shape, with_bias):
    n, cin, h, w = shape
    weight, bias = _weights(cin, 7)
    bias = bias if with_bias else None
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    y = winograd_conv3x3(x, WinogradWeights(weight, bias))
    exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    assert y.shape == (n, 7, h, w) and y.is_contiguous(memory_format=torch.channels_last)
    assert (y.double() - exact).abs().max() <= 2e-5 * exact.abs().max()


def test_transformed_weights_are_contiguous():
    # A strided view here still gives right numbers but made every layer 2-3x slower (a regression once).
    weight, bias = _weights(8, 16)
    w = WinogradWeights(weight, bias)
    assert w.mixing.shape == (36, 16, 8) and w.mixing.is_contiguous()


def test_backward_is_the_exact_adjoint_in_float64_and_itself_differentiable():
    weight, bias = _weights(3, 4, torch.float64)
    x = torch.randn(2, 3, 7, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: winograd_conv3x3(t, WinogradWeights(weight, bias)), (x,))
    assert torch.autograd.gradgradcheck(lambda t: winograd_conv3x3(t, WinogradWeights(weight, bias)).pow(2), (x,))


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_gradient_matches_a_direct_convolution(channels_last):
    weight, bias = _weights(16, 8)
    x = torch.randn(2, 16, 18, 11, generator=torch.Generator().manual_seed(2))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 8, 18, 11, generator=torch.Generator().manual_seed(3))
    xw = x.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(winograd_conv3x3(xw, WinogradWeights(weight, bias)), xw, g)
    xd = x.double().requires_grad_(True)
    (gd,) = torch.autograd.grad(F.conv2d(xd, weight.double(), bias.double(), padding=1), xd, g.double())
    assert (gw.double() - gd).abs().max() <= 2e-5 * gd.abs().max()


def _forward_and_gradient(x: torch.Tensor, weights: WinogradWeights, g: torch.Tensor):
    xg = x.clone().requires_grad_(True)
    y = winograd_conv3x3(xg, weights)
    (grad,) = torch.autograd.grad(y, xg, g)
    return y, grad


def test_bands_of_tiles_give_the_whole_image_result(monkeypatch):
    """Tiles are processed in bands of rows (small temporaries); several bands, the last one partial,
    give what one band gives, and a direct convolution's result."""
    weight, bias = _weights(5, 6)
    weights = WinogradWeights(weight, bias)
    x = torch.randn(1, 5, 37, 22, generator=torch.Generator().manual_seed(4))  # 10 x 6 tiles
    g = torch.randn(1, 6, 37, 22, generator=torch.Generator().manual_seed(5))
    whole = _forward_and_gradient(x, weights, g)
    monkeypatch.setattr(winograd, "BAND_TILES", 18)  # bands of 3 tile rows: 3, 3, 3, 1
    assert winograd._bands(10, 6) == [(0, 3), (3, 3), (6, 3), (9, 1)]
    banded = _forward_and_gradient(x, weights, g)
    for a, b in zip(whole, banded, strict=True):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()
    xd = x.double().requires_grad_(True)
    yd = F.conv2d(xd, weight.double(), bias.double(), padding=1)
    (gd,) = torch.autograd.grad(yd, xd, g.double())
    assert (banded[0].double() - yd).abs().max() <= 2e-5 * yd.abs().max()
    assert (banded[1].double() - gd).abs().max() <= 2e-5 * gd.abs().max()


@pytest.mark.skipif(winograd._LINEAR is None or not torch.backends.mkldnn.is_available(),
                    reason="this PyTorch build has no oneDNN inner product")
def test_onednn_products_give_matmul_results(monkeypatch):
    """The channel mixing and tile transforms run on oneDNN's inner product where it is there (2x MKL's
    sgemm on AMD CPUs); it must give what matmul gives, to rounding."""
    weight, bias = _weights(24, 32)
    weights = WinogradWeights(weight, bias)
    x = torch.randn(2, 24, 21, 17, generator=torch.Generator().manual_seed(6))
    g = torch.randn(2, 32, 21, 17, generator=torch.Generator().manual_seed(7))
    calls: list[int] = []
    real = winograd._LINEAR
    monkeypatch.setattr(winograd, "_LINEAR", lambda *a: calls.append(1) or real(*a))
    onednn = _forward_and_gradient(x, weights, g)
    assert calls  # it was used
    monkeypatch.setattr(winograd, "_LINEAR", None)
    plain = _forward_and_gradient(x, weights, g)
    for a, b in zip(onednn, plain, strict=True):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_float32_double_backward_takes_a_differentiable_path():
    """oneDNN's inner product has no derivative: a pass that builds a graph (create_graph) must not use it,
    or the second derivative silently comes out as zeros."""
    weight, bias = _weights(6, 5)
    x = torch.randn(1, 6, 9, 10, generator=torch.Generator().manual_seed(8))
    results = []
    for conv in (lambda t: winograd_conv3x3(t, WinogradWeights(weight, bias)),
                 lambda t: F.conv2d(t, weight, bias, padding=1)):
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(conv(xi).pow(2).sum(), xi, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), xi)
        results.append(gg)
    assert results[1].abs().max() > 0
    assert (results[0] - results[1]).abs().max() <= 1e-4 * results[1].abs().max()


def test_reduced_precision_products_turn_winograd_off():
    """A user who lets oneDNN compute float32 products in bf16 gets the direct convolution, not Winograd,
    whose transforms would amplify that rounding."""
    conv = FrozenConv3x3(256, 256).requires_grad_(False)
    x = torch.randn(1, 256, 16, 16)
    assert _backward_name(conv, x) == "_WinogradConv3x3Backward"
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "bf16"
        assert _backward_name(conv, x) == "_FrozenConv3x3Backward"
    finally:
        matmul.fp32_precision = before


def _backward_name(conv: FrozenConv3x3, x: torch.Tensor) -> str:
    return type(conv(x.requires_grad_(True)).grad_fn).__name__


def test_frozen_conv_uses_winograd_only_where_it_may():
    conv = FrozenConv3x3(256, 256).requires_grad_(False)
    x = torch.randn(1, 256, 16, 16)
    assert _backward_name(conv, x.clone()).startswith("_WinogradConv3x3")
    # too small a map, too few channels: direct, keeping only the weights for backward
    assert _backward_name(conv, torch.randn(1, 256, 15, 32)) == "_FrozenConv3x3Backward"
    narrow = FrozenConv3x3(256, 128).requires_grad_(False)
    assert _backward_name(narrow, torch.randn(1, 256, 16, 16)) == "_FrozenConv3x3Backward"
    assert _backward_name(conv.double(), x.clone().double()) == "ConvolutionBackward0"
    conv.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the convolution's precision itself
        assert _backward_name(conv, x.clone()) == "ConvolutionBackward0"
    assert conv(torch.randn(256, 16, 16)).shape == (256, 16, 16)  # unbatched, as nn.Conv2d takes it
    empty = torch.randn(0, 256, 16, 16, requires_grad=True)
    conv(empty).sum().backward()  # an empty batch: no error, and an empty gradient
    assert empty.grad is not None and empty.grad.shape == empty.shape
    conv.bias.requires_grad_(True)  # a trained bias: the direct convolution, which gives its gradient
    conv(x).sum().backward()
    assert conv.bias.grad is not None and conv.weight.grad is None
    conv.requires_grad_(True)  # trained weights
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_frozen_conv_follows_its_weights_when_they_change():
    conv = FrozenConv3x3(4, 256).requires_grad_(False)
    x = torch.randn(1, 4, 16, 16)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(2)
        conv.bias.zero_()
    after = conv(x)
    direct = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert not torch.allclose(before, after)
    assert (after - direct).abs().max() <= 2e-5 * direct.abs().max()
    conv.weight.data.mul_(-0.5)  # through .data: the version counter does not see it
    direct = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert (conv(x) - direct).abs().max() <= 2e-5 * direct.abs().max()
    conv.double().float()  # moved and back: rebuilt, not reused
    assert conv._cached is None and (conv(x) - direct).abs().max() <= 2e-5 * direct.abs().max()
    kept = conv._cached
    conv.to("cpu")  # where it already is: the engines do this on every run, and the transform stays
    assert conv._cached is kept


def test_copies_do_not_carry_the_transformed_weights():
    import copy
    import io
    import pickle

    conv = FrozenConv3x3(4, 256).requires_grad_(False)
    x = torch.randn(1, 4, 16, 16)
    conv(x)
    assert conv._cached is not None
    buffer = io.BytesIO()
    pickle.dump(conv, buffer)
    clone = copy.deepcopy(conv)
    assert clone._cached is None and torch.equal(clone(x), conv(x))
    assert len(buffer.getvalue()) < 2 * 4 * conv.weight.numel()  # the weights, not 4x more


def test_a_network_built_under_inference_mode_runs():
    with torch.inference_mode():
        conv = FrozenConv3x3(4, 256).requires_grad_(False)
        x = torch.randn(1, 4, 16, 16)
        assert (conv(x) - F.conv2d(x, conv.weight, conv.bias, padding=1)).abs().max() < 1e-4


def test_weights_made_under_inference_mode_serve_a_later_backward():
    conv = FrozenConv3x3(4, 256).requires_grad_(False)
    x = torch.randn(1, 4, 16, 16)
    with torch.inference_mode():
        conv(x)  # the loss targets are built this way, before the optimization
    xg = x.clone().requires_grad_(True)
    conv(xg).pow(2).sum().backward()
    xd = x.clone().requires_grad_(True)
    F.conv2d(xd, conv.weight, conv.bias, padding=1).pow(2).sum().backward()
    assert (xg.grad - xd.grad).abs().max() <= 1e-4 * xd.grad.abs().max()


def test_vgg_keeps_torchvision_parameter_names_and_uses_winograd_in_deep_layers():
    net = VGGFeatures("vgg19", ["relu4_1"])
    assert "layers.conv3_2.weight" in net.state_dict()
    convs = {n: m for n, m in net.layers.named_children() if n.startswith("conv")}
    assert [n for n, m in convs.items() if m.winograd] == ["conv3_1", "conv3_2", "conv3_3", "conv3_4", "conv4_1"]


def test_impasto_winograd_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("IMPASTO_WINOGRAD", "0")
    conv = FrozenConv3x3(256, 256).requires_grad_(False)
    assert _backward_name(conv, torch.randn(1, 256, 16, 16)) == "_FrozenConv3x3Backward"  # direct, not Winograd


@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_direct_conv_keeps_only_its_weights_and_gives_conv2d_gradient(channels_last):
    """nn.Conv2d keeps its input for a weight gradient that frozen weights never need; the frozen direct
    path keeps only the weights and gives the input gradient conv2d's own backward gives, bit for bit."""
    torch.manual_seed(3)
    conv = FrozenConv3x3(16, 32).requires_grad_(False)
    x = torch.randn(2, 16, 12, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    saved: list[tuple[int, ...]] = []
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        ya = conv(xa)
    assert saved == [tuple(conv.weight.shape)]
    yb = F.conv2d(xb, conv.weight, conv.bias, padding=1)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)



def test_frozen_direct_conv_is_twice_differentiable():
    from impasto.nets.winograd import _FrozenConv3x3

    torch.manual_seed(4)
    w, b = torch.randn(3, 2, 3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: _FrozenConv3x3.apply(t, w, b) ** 2, (x,))


def test_impasto_winograd_cache_0_makes_the_transform_at_each_pass_with_the_same_results(monkeypatch):
    """IMPASTO_WINOGRAD_CACHE=0 trades speed for memory: nothing is kept between passes, not even in the
    autograd graph between forward and backward, and the results are those of the kept transform."""
    torch.manual_seed(5)
    kept = FrozenConv3x3(32, 256).requires_grad_(False)
    monkeypatch.setenv("IMPASTO_WINOGRAD_CACHE", "0")
    lean = FrozenConv3x3(32, 256).requires_grad_(False)
    lean.load_state_dict(kept.state_dict())
    x = torch.randn(2, 32, 16, 20)
    grads, outs = [], []
    for conv in (kept, lean):
        xi = x.clone().requires_grad_()
        y = conv(xi)
        if conv is lean:
            assert conv._cached is None
            assert not isinstance(y.grad_fn.weights, WinogradWeights)  # the graph keeps a maker, not 203 MiB
        else:
            assert y.grad_fn.weights is conv._cached[1]
        y.backward(torch.ones_like(y))
        outs.append(y.detach())
        grads.append(xi.grad)
    assert lean._cached is None and kept._cached is not None
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


def test_vgg_runs_winograd_only_where_its_transforms_take_no_more_memory_than_the_feature_maps(monkeypatch):
    """conv3_1's transform (36 values per kernel) is 4.7 MB; one pass's conv outputs up to relu3_1 take
    4 bytes x (64 + 64) channels at full size, 128 + 128 at half, 256 at quarter: 4.3 MB at 72 px, so a
    72-px image runs direct, two of them or one of 80 px run Winograd (and keep the transform)."""
    def maps(side: int) -> int:
        return 128 * side**2 + 256 * (side // 2) ** 2 + 256 * (side // 4) ** 2

    transform = 36 * 256 * 128 * 4
    assert 4 * maps(72) < transform <= 4 * maps(80)

    def ran_winograd(net: VGGFeatures, batch: int, side: int) -> bool:
        net.layers.conv3_1._cached = None
        x = torch.rand(batch, 3, side, side, requires_grad=True)
        net(x)["relu3_1"].sum().backward()
        return net.layers.conv3_1._cached is not None

    net = VGGFeatures("vgg19", ["relu3_1"])
    assert net.feature_elements(72, 72) == maps(72) and net.feature_elements(80, 80) == maps(80)
    assert [ran_winograd(net, b, s) for b, s in [(1, 72), (2, 72), (1, 80)]] == [False, True, True]
    assert [net.kept_transform_bytes(s, s) for s in (72, 80)] == [0, transform]
    monkeypatch.setenv("IMPASTO_WINOGRAD", "1")  # at every size
    assert ran_winograd(VGGFeatures("vgg19", ["relu3_1"]), 1, 72)


@pytest.mark.parametrize("hw", [(18, 16), (16, 18), (18, 18)])
def test_an_output_cut_from_whole_tiles_can_be_modified_in_place(hw):
    """Sizes that are not whole tiles cut the output from a bigger one. Cutting only rows of one image left
    a contiguous view, and the in-place ReLU after it failed in autograd (a 512x341 image crashed)."""
    weight, bias = _weights(4, 8)
    x = torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(6))
    xw, xd = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    torch.relu_(winograd_conv3x3(xw, WinogradWeights(weight, bias))).sum().backward()
    torch.relu_(F.conv2d(xd, weight.double(), bias.double(), padding=1)).sum().backward()
    assert (xw.grad.double() - xd.grad).abs().max() <= 2e-5 * xd.grad.abs().max()


def test_vgg_runs_a_3_to_2_image_through_winograd(monkeypatch):
    """68x64 px: conv3's maps are 17x16, rows not a whole number of tiles (as a 512x341 photo's are)."""
    grads = []
    for every_size in ("1", "0"):
        monkeypatch.setenv("IMPASTO_WINOGRAD", every_size)
        torch.manual_seed(0)
        net = VGGFeatures("vgg16", ["relu3_3"])
        x = torch.rand(1, 3, 68, 64, generator=torch.Generator().manual_seed(7), requires_grad=True)
        net(x)["relu3_3"].square().sum().backward()
        assert (net.layers.conv3_2._cached is not None) == (every_size == "1")
        grads.append(x.grad)
    assert (grads[0] - grads[1]).abs().max() <= 1e-4 * grads[1].abs().max()


def test_a_transform_kept_from_a_bigger_pass_goes_when_the_run_is_too_small_for_it():
    """A style image bigger than the output runs its target pass as Winograd; the optimization at the
    output's size runs direct and must not keep those transforms alive (the memory they were left out for).
    A smaller style's target pass, direct, keeps the output's (they were made again at each stage)."""
    net = VGGFeatures("vgg19", ["relu3_1"])
    conv = net.layers.conv3_1
    with torch.no_grad():
        net(torch.rand(1, 3, 80, 80))  # a target pass big enough: made
        kept = conv._cached
        net(torch.rand(1, 3, 72, 72))  # a smaller target pass: direct, and kept
    assert kept is not None and conv._cached is kept
    net(torch.rand(1, 3, 72, 72, requires_grad=True))["relu3_1"].sum().backward()  # the optimization: dropped
    assert conv._cached is None
