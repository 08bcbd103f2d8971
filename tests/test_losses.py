"""Loss functions: Gram matrices (plain and masked), content, style and total variation.

Expected values are computed here from the formulas with loops / einsum, not with the package's code.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from impasto.artistic import StylizeOptions
from impasto.losses import content_loss, gram_matrix, style_loss, tv_loss
from impasto.perceptual import build_loss, network_objective, to_network_layout

STYLE_LAYERS = ["relu1_1", "relu2_1"]
CONTENT_LAYERS = ["relu2_1"]


def small_opts(**kw) -> StylizeOptions:
    return StylizeOptions(content_layers=CONTENT_LAYERS, style_layers=STYLE_LAYERS, weights="random",
                          pooling="avg", device="cpu", **kw)


# --- Gram matrices -------------------------------------------------------------------------------


def test_gram_matrix_matches_formula_with_loops():
    torch.manual_seed(1)
    n, c, h, w = 2, 4, 3, 5
    f = torch.randn(n, c, h, w, dtype=torch.float64)
    values = f.tolist()
    expected = torch.zeros(n, c, c, dtype=torch.float64)
    for b in range(n):
        for i in range(c):
            for j in range(c):
                total = 0.0
                for y in range(h):
                    for x in range(w):
                        total += values[b][i][y][x] * values[b][j][y][x]
                expected[b, i, j] = total / (c * h * w)
    g = gram_matrix(f)
    assert g.shape == (n, c, c)
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


def test_gram_matrix_matches_einsum_float32():
    torch.manual_seed(2)
    f = torch.randn(1, 16, 8, 6)
    expected = torch.einsum("nchw,ndhw->ncd", f.double(), f.double()) / (16 * 8 * 6)
    torch.testing.assert_close(gram_matrix(f).double(), expected, rtol=1e-5, atol=1e-6)


def test_masked_gram_with_all_ones_mask_equals_unmasked():
    torch.manual_seed(3)
    f = torch.randn(2, 5, 7, 9)
    mask = torch.ones(2, 1, 7, 9)
    torch.testing.assert_close(gram_matrix(f, mask), gram_matrix(f), rtol=1e-6, atol=1e-7)


def test_masked_gram_matches_formula_for_binary_mask():
    torch.manual_seed(4)
    c, h, w = 3, 6, 6
    f = torch.randn(1, c, h, w, dtype=torch.float64)
    mask = (torch.rand(1, 1, h, w) > 0.5).double()
    expected = torch.zeros(c, c, dtype=torch.float64)
    area = 0
    for y in range(h):
        for x in range(w):
            if mask[0, 0, y, x] > 0:
                area += 1
                v = f[0, :, y, x]
                expected += torch.outer(v, v)
    expected /= c * area
    torch.testing.assert_close(gram_matrix(f, mask)[0], expected, rtol=1e-10, atol=1e-12)


def test_masked_gram_normalizes_by_mask_area():
    """A region of constant features has the same Gram whether it covers A or 2A pixels."""
    torch.manual_seed(5)
    c, h, w = 4, 8, 8
    v = torch.tensor([0.5, -1.0, 2.0, 0.25])
    grams = []
    for rows in (2, 4):  # area 16 and 32
        f = torch.randn(1, c, h, w) * 3  # outside the region: anything, it must be masked out
        f[0, :, :rows, :] = v.view(c, 1, 1)
        mask = torch.zeros(1, 1, h, w)
        mask[0, 0, :rows, :] = 1
        grams.append(gram_matrix(f, mask)[0])
    expected = torch.outer(v, v) / c
    torch.testing.assert_close(grams[0], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grams[1], expected, rtol=1e-6, atol=1e-7)
    # Without a mask the same image's Gram does depend on the region's size and the rest.
    assert not torch.allclose(gram_matrix(f)[0], expected, atol=1e-3)


def test_masked_gram_per_batch_item_areas():
    """Each batch item is normalized by its own mask's area."""
    c, h, w = 2, 4, 4
    v = torch.tensor([1.0, 3.0])
    f = v.view(1, c, 1, 1).expand(2, c, h, w).clone()
    mask = torch.zeros(2, 1, h, w)
    mask[0, 0, :1, :1] = 1  # 1 pixel
    mask[1, 0, :, :] = 1  # 16 pixels
    g = gram_matrix(f, mask)
    torch.testing.assert_close(g[0], torch.outer(v, v) / c)
    torch.testing.assert_close(g[1], torch.outer(v, v) / c)


# --- content and style ---------------------------------------------------------------------------


def test_content_loss_formula():
    torch.manual_seed(6)
    x, t = torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)
    expected = ((x.double() - t.double()) ** 2).sum() / (t.double() ** 2).sum()
    assert float(content_loss(x, t)) == pytest.approx(float(expected), rel=1e-5)


def test_style_loss_formula_and_zero_at_target():
    torch.manual_seed(7)
    g, t = torch.randn(1, 3, 3), torch.randn(1, 3, 3)
    expected = ((g.double() - t.double()) ** 2).sum() / (t.double() ** 2).sum()
    assert float(style_loss(g, t)) == pytest.approx(float(expected), rel=1e-5)
    assert float(style_loss(t, t)) == 0.0


def test_content_loss_zero_at_content_image_positive_elsewhere(net, make_scene):
    content = make_scene(32, 32, seed=1)
    other = make_scene(32, 32, seed=2)
    style = make_scene(32, 32, seed=3)
    loss = build_loss(net, content, [style], small_opts(), contextlib.nullcontext)
    with torch.no_grad():  # in the layout the engines feed the network (as build_loss does)
        feats = net(to_network_layout(content.unsqueeze(0)))
        for k in CONTENT_LAYERS:
            assert float(content_loss(feats[k], loss.content_targets[k])) == 0.0
        _, terms = loss(content.unsqueeze(0), feats)
        assert float(terms["content"]) == 0.0
        _, terms = network_objective(net, loss, contextlib.nullcontext)(content.unsqueeze(0))
        assert float(terms["content"]) == 0.0
        _, terms_other = loss(other.unsqueeze(0), net(other.unsqueeze(0)))
    assert float(terms_other["content"]) > 1e-3


def test_style_loss_zero_at_style_image_positive_elsewhere(net, make_scene, make_texture):
    content = make_scene(32, 32, seed=1)
    style = make_texture((0.7, 0.3, 0.2), 32, 32, seed=4)
    loss = build_loss(net, content, [style], small_opts(), contextlib.nullcontext)
    with torch.no_grad():
        _, at_style = loss(style.unsqueeze(0), net(style.unsqueeze(0)))
        _, at_content = loss(content.unsqueeze(0), net(content.unsqueeze(0)))
    assert float(at_style["style"]) < 1e-10
    assert float(at_content["style"]) > 1e-2


def test_targets_run_only_the_layers_they_need_and_keep_no_feature_maps(net, make_scene, make_texture,
                                                                        monkeypatch):
    """Keeping every layer's features of both images made building the targets peak near the
    optimization's own live memory at 1024 px: the content pass stops at the deepest content layer, and
    each style layer's Gram is taken as soon as the pass reaches that layer."""
    import impasto.perceptual as perceptual

    opts = StylizeOptions(content_layers=["relu1_1"], style_layers=STYLE_LAYERS, weights="random",
                          pooling="avg", device="cpu")
    passes: list[list[str]] = []
    gram_taken_after: list[int] = []  # layers run in the current pass when each Gram was taken
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: passes[-1].append(name))
             for name, m in net.layers.named_children()]
    hooks.append(net.layers[0].register_forward_pre_hook(lambda m, i: passes.append([])))
    real_gram = perceptual.gram_matrix
    monkeypatch.setattr(perceptual, "gram_matrix",
                        lambda f, mask=None: gram_taken_after.append(len(passes[-1])) or real_gram(f, mask))
    try:
        loss = build_loss(net, make_scene(32, 32, seed=1), [make_texture((0.7, 0.3, 0.2), 32, 32, seed=4)],
                          opts, contextlib.nullcontext)
    finally:
        for h in hooks:
            h.remove()
    full = ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1", "conv2_1", "relu2_1"]
    assert passes == [full[:2], full]
    assert gram_taken_after == [2, 7]
    assert list(loss.content_targets) == ["relu1_1"]
    assert list(loss.styles[0].grams) == STYLE_LAYERS


def test_targets_under_autocast_take_grams_in_float32(net, make_scene, make_texture):
    """Only the network runs in float16 under --amp: a Gram sums a whole layer, which overflows or rounds
    away in float16 (on CUDA every style target became inf and the run stopped on NaN). CPU autocast takes
    the same path, so the float16 run is checked here against the Grams of its own float16 features."""
    content = make_scene(32, 32, seed=1)
    style = make_texture((0.7, 0.3, 0.2), 96, 96, seed=4)
    half = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    loss = build_loss(net, content, [style], small_opts(), half)
    with torch.no_grad(), half():
        feats = net(to_network_layout(style.unsqueeze(0)))
    for name in STYLE_LAYERS:
        assert feats[name].dtype == torch.float16
        exact = gram_matrix(feats[name].double())
        assert loss.styles[0].grams[name].dtype == torch.float32
        torch.testing.assert_close(loss.styles[0].grams[name].double(), exact, rtol=1e-6, atol=0)


def test_perceptual_loss_total_is_weighted_sum(net, make_scene, make_texture):
    content = make_scene(32, 32, seed=1)
    style = make_texture((0.2, 0.3, 0.7), 32, 32, seed=5)
    x = make_scene(32, 32, seed=9).unsqueeze(0)
    opts = small_opts(content_weight=2.0, style_weight=3.0, tv_weight=5.0, tv_power=2.0)
    loss = build_loss(net, content, [style], opts, contextlib.nullcontext)
    with torch.no_grad():
        feats = net(x)
        total, terms = loss(x, feats)
        c = content_loss(feats["relu2_1"], loss.content_targets["relu2_1"])
        s = sum(0.5 * style_loss(gram_matrix(feats[k]), loss.styles[0].grams[k]) for k in STYLE_LAYERS)
    assert float(terms["content"]) == pytest.approx(2.0 * float(c), rel=1e-5)
    assert float(terms["style"]) == pytest.approx(3.0 * float(s), rel=1e-5)
    assert float(terms["tv"]) == pytest.approx(5.0 * float(tv_loss(x, 2.0)), rel=1e-5)
    assert float(total) == pytest.approx(sum(float(v) for v in terms.values()), rel=1e-6)


# --- total variation -----------------------------------------------------------------------------


def tv_by_loops(image: torch.Tensor, power: float) -> float:
    """Mean over channels and the (H-1) x (W-1) pixels that have a right and a lower neighbour."""
    c, h, w = image.shape
    px = image.tolist()
    values = []
    for ch in range(c):
        for y in range(h - 1):
            for x in range(w - 1):
                dx = px[ch][y][x + 1] - px[ch][y][x]
                dy = px[ch][y + 1][x] - px[ch][y][x]
                values.append((dx * dx + dy * dy) ** (power / 2))
    return sum(values) / len(values)


@pytest.mark.parametrize("power", [2.0, 1.25])
def test_tv_loss_matches_formula(power):
    torch.manual_seed(8)
    image = torch.rand(3, 7, 9, dtype=torch.float64)
    expected = tv_by_loops(image, power)
    got = float(tv_loss(image.unsqueeze(0), power))
    assert got == pytest.approx(expected, rel=1e-4)
    # batched and unbatched agree
    assert float(tv_loss(image, power)) == pytest.approx(got, rel=1e-12)


def test_tv_loss_power_changes_value():
    torch.manual_seed(9)
    image = torch.rand(1, 3, 8, 8)
    assert float(tv_loss(image, 2.0)) != pytest.approx(float(tv_loss(image, 1.25)), rel=1e-3)


@pytest.mark.parametrize("power", [2.0, 1.25, 1.0])
def test_tv_loss_zero_for_constant_image(power):
    image = torch.full((1, 3, 10, 12), 0.37, requires_grad=True)
    value = tv_loss(image, power)
    # Power 2 is exactly 0; other powers add a tiny epsilon inside the root to keep the gradient finite.
    assert float(value.detach()) == (0.0 if power == 2.0 else pytest.approx(0.0, abs=2e-4))
    value.backward()
    assert torch.isfinite(image.grad).all()


def test_tv_loss_positive_for_edge_and_grows_with_contrast():
    image = torch.zeros(1, 3, 8, 8)
    image[..., 4:] = 0.5
    stronger = image * 2
    assert float(tv_loss(image)) > 0
    # the squared form is quadratic in contrast
    assert float(tv_loss(stronger)) == pytest.approx(4 * float(tv_loss(image)), rel=1e-6)


def test_gram_gradient_matches_finite_differences():
    features = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: gram_matrix(f), (features,))
    assert torch.autograd.gradcheck(lambda f: gram_matrix(f, mask), (features,))


def test_channels_last_features_give_the_same_gram_and_a_gradient_in_their_layout():
    """The network runs channels last; a Gram of such features keeps them, not a copy, for backward and
    returns a gradient in their layout (a channels-first one would make the layers below convert it)."""
    torch.manual_seed(8)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    g = torch.randn(2, 6, 6, dtype=torch.float64)
    grads = []
    for features in (x.clone(), x.contiguous(memory_format=torch.channels_last)):
        features.requires_grad_(True)
        saved: list[int] = []
        keep = saved.append
        with torch.autograd.graph.saved_tensors_hooks(lambda t, keep=keep: keep(t.data_ptr()) or t, lambda t: t):
            gram = gram_matrix(features)
        assert saved == [features.data_ptr()]
        (grad,) = torch.autograd.grad(gram, features, g)
        assert grad.is_contiguous(memory_format=torch.channels_last) == (not features.is_contiguous())
        grads.append((gram, grad))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-12, atol=0)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-12, atol=0)
