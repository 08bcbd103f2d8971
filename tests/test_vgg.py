"""The VGG stack's own layers: ReLUs and max pooling that keep less than PyTorch's for the backward pass."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from impasto.nets import VGGFeatures
from impasto.nets.vgg import LeanReLU, MaxPool2x2


def _saved(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """The dtype and shape of every tensor a forward pass of fn keeps for backward."""
    saved: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return saved


def _saved_dtypes(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> list[torch.dtype]:
    return [dtype for dtype, _ in _saved(fn, x)]


def _against_torch(ours_fn, theirs_fn, x: torch.Tensor):
    """Both functions' outputs on x and the gradients to x of one random output gradient, and that gradient."""
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours_fn(ours), theirs_fn(theirs)
    grad = torch.randn_like(y_ours)
    y_ours.backward(grad)
    y_theirs.backward(grad)
    return y_ours, y_theirs, ours.grad, theirs.grad, grad


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("hw", [(12, 10), (13, 11)])
def test_max_pool_gives_torch_values_and_gradient_bit_for_bit(channels_last, hw):
    torch.manual_seed(0)
    x = torch.randn(2, 8, *hw).relu()  # ReLU zeros: ties inside a window
    x[0, 0, :4, :4] = 1.5  # and ties at a positive maximum: the first one gets the gradient
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y_ours, y_theirs, g_ours, g_theirs, grad = _against_torch(MaxPool2x2(), nn.MaxPool2d(2, 2), x)
    assert torch.equal(y_ours, y_theirs)
    assert torch.equal(g_ours, g_theirs)
    assert g_ours[0, 0, :2, :2].tolist() == [[grad[0, 0, 0, 0].item(), 0.0], [0.0, 0.0]]


def test_max_pool_keeps_its_input_only_not_int64_indices():
    x = torch.randn(1, 4, 8, 8).requires_grad_()
    assert torch.int64 in _saved_dtypes(nn.MaxPool2d(2, 2), x)
    assert _saved_dtypes(MaxPool2x2(), x) == [torch.float32]


def test_max_pool_is_twice_differentiable():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: MaxPool2x2()(t) ** 2, (x,))


def test_vgg_max_pooling_saves_no_indices():
    net = VGGFeatures("vgg16", ["relu3_1"])
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    assert torch.int64 not in _saved_dtypes(net, x)
    assert sum(isinstance(m, MaxPool2x2) for m in net.modules()) == 2


def test_relu_before_a_winograd_conv_keeps_only_its_sign_and_the_gradient_is_unchanged(monkeypatch):
    """relu3_1 and relu3_2 feed conv3_2 and conv3_3, which run as Winograd on the CPU (256 channels, a
    16-px map) and keep nothing, so those ReLUs' backward needs only which values were positive; relu3_3
    is requested, so a loss may read it, and it keeps its float output."""
    torch.manual_seed(0)
    monkeypatch.setenv("IMPASTO_WINOGRAD", "1")  # at every size: at 64 px its transforms would not pay
    net = VGGFeatures("vgg16", ["relu3_3"])
    assert net.uses_winograd(1, 64, 64)
    x = torch.rand(1, 3, 64, 64)
    feature_map = (1, 256, 16, 16)

    saved = _saved(net, x.clone().requires_grad_())
    assert net.layers.conv3_2._cached is not None  # it ran as Winograd
    assert saved.count((torch.bool, feature_map)) == 2
    assert saved.count((torch.float32, feature_map)) == 1  # relu3_3's output only

    grads = []
    for sign_only in (True, False):
        if not sign_only:  # the plain in-place ReLU, which keeps its float output
            monkeypatch.setattr(VGGFeatures, "_relu_keeps", staticmethod(lambda *a: "output"))
            assert _saved(net, x.clone().requires_grad_()).count((torch.float32, feature_map)) == 3
        xi = x.clone().requires_grad_()
        out = net(xi)["relu3_3"]
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])


def test_relu_keeps_its_float_output_where_the_next_conv_keeps_its_input():
    """Where the convolutions' weights are trained they keep their inputs (the ReLUs' float outputs) for
    the weight gradient, so a sign mask would only add memory: none is made."""
    net = VGGFeatures("vgg16", ["relu3_3"]).requires_grad_(True)
    saved = _saved(net, torch.rand(1, 3, 64, 64, requires_grad=True))
    assert torch.bool not in {dtype for dtype, _ in saved}
    assert any(dtype == torch.bool for dtype, _ in _saved(net.requires_grad_(False),
                                                          torch.rand(1, 3, 64, 64, requires_grad=True)))


def test_winograd_off_still_keeps_no_inputs_for_frozen_weights(monkeypatch):
    """IMPASTO_WINOGRAD=0: direct convolutions, which with frozen weights on the CPU keep only their
    weights, so the sign masks still apply."""
    monkeypatch.setenv("IMPASTO_WINOGRAD", "0")
    net = VGGFeatures("vgg16", ["relu3_3"])
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    assert type(net(x)["relu3_3"].grad_fn.next_functions[0][0]).__name__ == "_FrozenConv3x3Backward"
    assert sum(dtype == torch.bool for dtype, _ in _saved(net, x)) == 4  # relu1_1, relu2_1, relu3_1, relu3_2


def test_sign_keeping_relu_is_twice_differentiable():
    from impasto.nets.vgg import _ReLUKeepingSign

    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: _ReLUKeepingSign.apply(t * 1.0)[0] ** 2, (x,))


def test_forward_hooks_on_relus_run_when_they_keep_only_their_sign():
    net = VGGFeatures("vgg16", ["relu3_3"])
    calls: list[str] = []
    net.layers.relu3_2.register_forward_hook(lambda m, i, o: calls.append("relu3_2"))
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    assert sum(dtype == torch.bool for dtype, _ in _saved(net, x)) == 4  # relu1_1, relu2_1, relu3_1, relu3_2
    assert calls == ["relu3_2"]


def test_max_pool_works_under_torch_func():
    x = torch.randn(2, 3, 6, 6)
    ours = torch.func.grad(lambda t: (MaxPool2x2()(t) ** 2).sum())(x)
    theirs = torch.func.grad(lambda t: (nn.MaxPool2d(2, 2)(t) ** 2).sum())(x)
    assert torch.equal(ours, theirs)
    batched = torch.func.vmap(MaxPool2x2())(x.unsqueeze(1))
    assert torch.equal(batched.squeeze(1), nn.MaxPool2d(2, 2)(x))


def test_sign_keeping_relu_works_under_torch_func_grad():
    from impasto.nets.vgg import _ReLUKeepingSign

    x = torch.randn(2, 3, 4, 4)
    ours = torch.func.grad(lambda t: (_ReLUKeepingSign.apply(t * 1.0)[0] ** 2).sum())(x)
    theirs = torch.func.grad(lambda t: (torch.relu(t) ** 2).sum())(x)
    assert torch.equal(ours, theirs)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # jacfwd's, not ours
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_whole_network_works_under_torch_func(pooling):
    """grad, vmap of grad and forward-mode jacobians through a VGG whose ReLUs keep only a sign or nothing
    under plain autograd: under torch.func they run as nn.ReLU (vmap cannot batch a Function that marks its
    input dirty, and they have no jvp), with the same gradient."""
    torch.manual_seed(0)
    net = VGGFeatures("vgg16", ["relu3_3"], pooling=pooling)
    assert torch.bool in {dtype for dtype, _ in _saved(net, torch.rand(1, 3, 32, 32, requires_grad=True))}

    def f(t: torch.Tensor) -> torch.Tensor:
        return net(t)["relu3_3"].square().sum()

    images = torch.rand(3, 1, 3, 32, 32)
    autograd = []
    for image in images:
        leaf = image.clone().requires_grad_()
        f(leaf).backward()
        autograd.append(leaf.grad)
    assert torch.equal(torch.func.grad(f)(images[0]), autograd[0])
    batched = torch.func.vmap(torch.func.grad(f))(images)
    assert torch.allclose(batched, torch.stack(autograd), rtol=1e-5, atol=1e-6 * float(autograd[0].abs().max()))
    small = torch.rand(1, 3, 16, 16)
    forward_mode = torch.func.jacfwd(lambda t: net(t)["relu3_3"].sum())(small)
    assert torch.allclose(forward_mode, torch.func.jacrev(lambda t: net(t)["relu3_3"].sum())(small), atol=1e-5)


def test_sign_keeping_relu_gradient_is_relus_own_nan_included():
    from impasto.nets.vgg import _ReLUKeepingSign

    x = torch.tensor([-1.0, 0.0, 2.0, float("nan")])
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    _ReLUKeepingSign.apply(ours * 1.0)[0].backward(grad)
    torch.relu(theirs).backward(grad)
    assert torch.equal(ours.grad, theirs.grad) and ours.grad.tolist() == [0.0, 0.0, 3.0, 4.0]


def _lean_pair(x: torch.Tensor) -> torch.Tensor:
    """An in-place ReLU that keeps nothing, then the max pooling that does its backward, as VGGFeatures runs
    them where no loss reads the ReLU's output."""
    return MaxPool2x2()(LeanReLU(inplace=True)(x * 1.0, keep="nothing"), after_lean_relu=True)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("hw", [(12, 10), (13, 11), (8, 15)])
def test_relu_then_pool_keeping_nothing_gives_torch_values_and_gradient_bit_for_bit(channels_last, hw):
    torch.manual_seed(0)
    x = torch.randn(2, 8, *hw)
    x[0, 0, :4, :4] = 1.5  # ties at a positive maximum: the first one gets the gradient
    x[0, 1, :4, :4] = -1.0  # a window with nothing positive: no gradient at all
    x[1, 0, 0, 1] = float("nan")  # NaN passes, as through nn.ReLU and nn.MaxPool2d
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y_ours, y_theirs, g_ours, g_theirs, grad = _against_torch(
        _lean_pair, lambda t: nn.MaxPool2d(2, 2)(torch.relu(t)), x)
    assert torch.equal(y_ours.isnan(), y_theirs.isnan()) and y_ours.isnan().sum() == 1
    assert torch.equal(y_ours.nan_to_num(), y_theirs.nan_to_num())
    assert torch.equal(g_ours, g_theirs)
    assert g_ours[0, 0, :2, :2].tolist() == [[grad[0, 0, 0, 0].item(), 0.0], [0.0, 0.0]]
    assert not g_ours[0, 1, :4, :4].any()
    assert g_ours[1, 0, 0, 1] == grad[1, 0, 0, 0]


@pytest.mark.parametrize("hw", [(12, 10), (13, 11)])
def test_relu_then_pool_gives_a_channels_last_gradient_without_copying(hw):
    """The gradient is made in the input's layout, not made channels first and then copied (a 48 MiB copy
    for relu1_2 at 384x512)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(1, 8, *hw).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = _lean_pair(x)
    grad = torch.randn_like(y)
    with Ops() as ops:
        (g,) = torch.autograd.grad(y, x, grad)  # .grad would be made to follow x's layout
    assert g.is_contiguous(memory_format=torch.channels_last)
    copies = [n for n in ops.names if n.startswith(("clone", "copy", "_to_copy", "contiguous"))]
    assert copies == ["copy_.default"] * 4, ops.names  # only the writes of the window's four positions


def test_relu_then_pool_keeps_one_byte_per_pooled_value():
    assert _saved(_lean_pair, torch.randn(1, 4, 8, 8, requires_grad=True)) == [(torch.uint8, (1, 4, 4, 4))]


def test_relu_then_pool_keeping_nothing_is_twice_differentiable_and_works_under_torch_func():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: _lean_pair(t) ** 2, (x,))
    y = torch.randn(2, 3, 6, 6)
    ours = torch.func.grad(lambda t: (_lean_pair(t) ** 2).sum())(y)
    theirs = torch.func.grad(lambda t: (nn.MaxPool2d(2, 2)(torch.relu(t)) ** 2).sum())(y)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_vgg_keeps_no_float_output_of_relus_before_pooling_and_its_gradient_is_unchanged(monkeypatch, pooling):
    """relu1_2 and relu2_2 feed the pooling layers and no loss reads them: before max pooling they keep
    nothing (the pooling keeps a byte per output), before average pooling only their sign. The gradient
    of the whole stack is the one of plain ReLUs bit for bit."""
    torch.manual_seed(0)
    net = VGGFeatures("vgg16", ["relu1_1", "relu3_1"], pooling=pooling)
    x = torch.rand(1, 3, 32, 32)
    saved = _saved(net, x.clone().requires_grad_())
    relu1_2, relu2_2 = (1, 64, 32, 32), (1, 128, 16, 16)
    assert saved.count((torch.float32, relu1_2)) == 1  # relu1_1's output, which a loss reads
    assert saved.count((torch.float32, relu2_2)) == 0  # relu2_1 keeps its sign: conv2_2 keeps nothing
    if pooling == "max":
        codes = [shape for dtype, shape in saved if dtype == torch.uint8]
        assert codes == [(1, 64, 16, 16), (1, 128, 8, 8)]  # a byte per pooled value
        assert saved.count((torch.bool, relu1_2)) == 0
    else:
        assert torch.uint8 not in {dtype for dtype, _ in saved}
        assert saved.count((torch.bool, relu1_2)) == 1 and saved.count((torch.bool, relu2_2)) == 2

    grads = []
    for plain in (False, True):
        if plain:
            monkeypatch.setattr(VGGFeatures, "_relu_keeps", staticmethod(lambda *a: "output"))
        xi = x.clone().requires_grad_()
        out = net(xi)
        (out["relu1_1"].square().sum() + out["relu3_1"].sum()).backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])


def test_a_relu_a_loss_reads_keeps_its_output_before_pooling():
    net = VGGFeatures("vgg16", ["relu1_2", "relu2_1"])
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    saved = _saved(net, x)
    assert (torch.float32, (1, 64, 16, 16)) in saved  # relu1_2's output, read by a loss and kept
    assert torch.uint8 not in {dtype for dtype, _ in saved}


def test_average_pooling_gives_torch_values_and_gradient_and_keeps_nothing():
    from impasto.nets.vgg import AvgPool2x2

    torch.manual_seed(0)
    for hw in ((12, 10), (13, 11)):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 3, *hw).contiguous(memory_format=layout)
            y_ours, y_theirs, g_ours, g_theirs, _ = _against_torch(AvgPool2x2(), nn.AvgPool2d(2, 2), x)
            assert torch.equal(y_ours, y_theirs) and torch.equal(g_ours, g_theirs)
            x.requires_grad_()
            y = AvgPool2x2()(x)
            (g,) = torch.autograd.grad(y, x, torch.ones_like(y))  # .grad would be made to follow x's layout
            assert g.is_contiguous(memory_format=layout)  # the gradient in the input's layout
    x = torch.randn(3, 2, 6, 6, 4).permute(0, 1, 4, 2, 3)  # under vmap, each sample (2, 4, 6, 6) channels last
    per_sample = torch.func.vmap(torch.func.grad(lambda t: (AvgPool2x2()(t) ** 2).sum()))(x)
    theirs = torch.stack([torch.func.grad(lambda t: (nn.AvgPool2d(2, 2)(t) ** 2).sum())(t) for t in x])
    assert torch.equal(per_sample, theirs)
    assert _saved_dtypes(AvgPool2x2(), torch.randn(1, 2, 4, 4, requires_grad=True)) == []
    assert _saved_dtypes(nn.AvgPool2d(2, 2), torch.randn(1, 2, 4, 4, requires_grad=True)) == [torch.float32]
    x64 = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: AvgPool2x2()(t) ** 2, (x64,))
