"""The VGG stack's own layers: max pooling that keeps no indices for the backward pass."""

import pytest
import torch
from torch import nn

from impasto.nets import VGGFeatures
from impasto.nets.vgg import MaxPool2x2


def _saved_dtypes(fn, x: torch.Tensor) -> list[torch.dtype]:
    dtypes: list[torch.dtype] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        dtypes.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return dtypes


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("hw", [(12, 10), (13, 11)])
def test_max_pool_gives_torch_values_and_gradient_bit_for_bit(channels_last, hw):
    torch.manual_seed(0)
    x = torch.randn(2, 8, *hw).relu()  # ReLU zeros: ties inside a window
    x[0, 0, :4, :4] = 1.5  # and ties at a positive maximum: the first one gets the gradient
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = MaxPool2x2()(ours), nn.MaxPool2d(2, 2)(theirs)
    assert torch.equal(y_ours, y_theirs)
    grad = torch.randn_like(y_ours)
    y_ours.backward(grad)
    y_theirs.backward(grad)
    assert torch.equal(ours.grad, theirs.grad)
    assert ours.grad[0, 0, :2, :2].tolist() == [[grad[0, 0, 0, 0].item(), 0.0], [0.0, 0.0]]


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


def _saved(net: VGGFeatures, x: torch.Tensor) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    saved: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return saved


def test_relu_before_a_winograd_conv_keeps_only_its_sign_and_the_gradient_is_unchanged(monkeypatch):
    """relu3_1 and relu3_2 feed conv3_2 and conv3_3, which run as Winograd on the CPU (256 channels, a
    16-px map) and keep nothing, so those ReLUs' backward needs only which values were positive; relu3_3
    is requested, so a loss may read it, and it keeps its float output."""
    torch.manual_seed(0)
    net = VGGFeatures("vgg16", ["relu3_3"])
    x = torch.rand(1, 3, 64, 64)
    feature_map = (1, 256, 16, 16)

    saved = _saved(net, x.clone().requires_grad_())
    assert saved.count((torch.bool, feature_map)) == 2
    assert saved.count((torch.float32, feature_map)) == 1  # relu3_3's output only

    grads = []
    for sign_only in (True, False):
        if not sign_only:  # the plain in-place ReLU, which keeps its float output
            monkeypatch.setattr(VGGFeatures, "_sign_is_enough", staticmethod(lambda *a: False))
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
    assert torch.autograd.gradgradcheck(lambda t: _ReLUKeepingSign.apply(t * 1.0) ** 2, (x,))


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


def test_sign_keeping_relu_gradient_is_relus_own_nan_included():
    from impasto.nets.vgg import _ReLUKeepingSign

    x = torch.tensor([-1.0, 0.0, 2.0, float("nan")])
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    _ReLUKeepingSign.apply(ours * 1.0).backward(grad)
    torch.relu(theirs).backward(grad)
    assert torch.equal(ours.grad, theirs.grad) and ours.grad.tolist() == [0.0, 0.0, 3.0, 4.0]
