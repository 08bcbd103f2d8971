"""The photorealistic engine (Luan et al. 2017): matting Laplacian, masked style loss, masks, smoothing, resume.

Everything runs on small generated images with random VGG weights, average pooling and a network cut
after conv2_1, so the file stays fast on a small CPU (conftest.py sets one torch thread).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import warnings

import numpy as np
import pytest
import scipy.sparse
import torch

from impasto import images
from impasto.errors import ImpastoError, ImpastoWarning
from impasto.losses import gram_matrix
from impasto.nets import load_vgg
from impasto.perceptual import build_loss
from impasto.photo import (
    PhotoOptions,
    auto_masks,
    guided_smooth,
    guided_upsample,
    mask_pairs,
    matting_laplacian,
    matting_loss,
    photo_transfer,
)
from impasto.photo.laplacian import to_torch_sparse
from impasto.photo.transfer import finish

pytestmark = [
    pytest.mark.filterwarnings("ignore:using random VGG weights"),
    pytest.mark.filterwarnings("ignore:Sparse"),
]

STYLE_LAYERS = ["conv1_1", "conv2_1"]
CONTENT_LAYERS = ["conv2_1"]
WHITE, BLACK = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
RED, BLUE = (0.85, 0.2, 0.2), (0.2, 0.2, 0.85)


def photo_opts(**kw) -> PhotoOptions:
    """Fast options: one pass, no regularizer, no post-processing, unless a test asks for them."""
    defaults = dict(size=32, iterations=20, content_layers=CONTENT_LAYERS, style_layers=STYLE_LAYERS,
                    weights="random", pooling="avg", two_pass=False, affine_weight=0.0, smooth=False,
                    full_resolution=False, device="cpu")  # bit-exact claims are about CPU runs
    return PhotoOptions(**{**defaults, **kw})


def affine_of(guide: torch.Tensor) -> torch.Tensor:
    """A fixed global affine colour transform of a (3, H, W) image (stays inside [0, 1] for inputs in [0, 1])."""
    a = torch.tensor([[0.5, 0.2, -0.1], [0.1, 0.4, 0.2], [-0.2, 0.1, 0.6]], dtype=guide.dtype)
    b = torch.tensor([0.2, 0.15, 0.3], dtype=guide.dtype).view(3, 1, 1)
    return torch.einsum("ij,jhw->ihw", a, guide) + b


def flat_mask(height: int, width: int, *parts: tuple[tuple[float, float, float], slice, slice]) -> torch.Tensor:
    """A (3, H, W) colour-coded mask: black, then each (colour, rows, cols) painted in order."""
    mask = torch.zeros(3, height, width)
    for colour, rows, cols in parts:
        mask[:, rows, cols] = torch.tensor(colour).view(3, 1, 1)
    return mask


ALL = slice(None)


def halves(height: int, width: int, first, second, vertical: bool) -> torch.Tensor:
    """`first` colour in the left (vertical) or top half, `second` in the other half."""
    if vertical:
        return flat_mask(height, width, (first, ALL, slice(0, width // 2)), (second, ALL, slice(width // 2, None)))
    return flat_mask(height, width, (first, slice(0, height // 2), ALL), (second, slice(height // 2, None), ALL))


# --- the matting Laplacian ---------------------------------------------------------------------------


def levin_laplacian(img: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Levin et al.'s formula, one 3x3 window at a time, as a dense matrix (the reference)."""
    h, w, _ = img.shape
    lap = np.zeros((h * w, h * w))
    for top in range(h - 2):
        for left in range(w - 2):
            idx = [(top + i) * w + (left + j) for i in range(3) for j in range(3)]
            x = img[top:top + 3, left:left + 3].reshape(9, 3)
            centred = x - x.mean(axis=0)
            cov = centred.T @ centred / 9 + eps / 9 * np.eye(3)
            block = np.eye(9) - (1 + centred @ np.linalg.inv(cov) @ centred.T) / 9
            lap[np.ix_(idx, idx)] += block
    return lap


def expected_pattern(h: int, w: int) -> set[tuple[int, int]]:
    """(i, j) pairs of pixels that share at least one 3x3 window lying fully inside the image."""
    def share(p: int, q: int, n: int) -> bool:  # some window start s in [0, n-3] covers both p and q
        return max(0, max(p, q) - 2) <= min(min(p, q), n - 3)

    pixels = [(r, c) for r in range(h) for c in range(w)]
    return {(r1 * w + c1, r2 * w + c2) for (r1, c1), (r2, c2) in itertools.product(pixels, pixels)
            if share(r1, r2, h) and share(c1, c2, w)}


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_matting_laplacian_is_symmetric_psd_with_zero_row_sums(rng):
    img = rng.random((10, 12, 3))
    lap = matting_laplacian(img)
    assert lap.shape == (120, 120)
    dense = lap.toarray()
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)
    assert np.linalg.eigvalsh(dense).min() >= -1e-9
    np.testing.assert_allclose(dense.sum(axis=1), 0.0, atol=1e-10)
    assert np.abs(dense).max() > 1  # not trivially zero


def test_matting_laplacian_annihilates_affine_functions_of_the_colours(rng):
    img = rng.random((10, 12, 3))
    lap = matting_laplacian(img)
    colours = img.reshape(-1, 3)
    a, b = rng.normal(size=(3, 3)), rng.normal(size=3)
    affine = colours @ a.T + b
    random = rng.normal(size=(120, 3))
    assert np.abs(lap @ affine).max() < 1e-4 * np.abs(lap @ random).max()


@pytest.mark.parametrize(("h", "w"), [(7, 11), (11, 7), (6, 6)])
@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_matting_laplacian_equals_levins_formula(rng, h, w, eps):
    img = rng.random((h, w, 3))
    np.testing.assert_allclose(matting_laplacian(img, eps=eps).toarray(), levin_laplacian(img, eps), rtol=0, atol=1e-10)


def test_matting_laplacian_small_chunks_change_nothing(rng):
    img = rng.random((8, 9, 3))
    np.testing.assert_allclose(matting_laplacian(img, chunk=5).toarray(), levin_laplacian(img), atol=1e-10)


def test_matting_laplacian_accepts_chw_tensors_and_hwc_arrays(rng):
    hwc = rng.random((7, 11, 3))
    chw = torch.from_numpy(hwc.transpose(2, 0, 1).copy())
    from_array, from_tensor = matting_laplacian(hwc), matting_laplacian(chw)
    assert from_tensor.shape == (77, 77)
    np.testing.assert_array_equal(from_array.toarray(), from_tensor.toarray())
    np.testing.assert_allclose(matting_laplacian(chw.float()).toarray(), from_array.toarray(), atol=1e-3)


def test_matting_laplacian_rejects_other_shapes():
    with pytest.raises(ValueError, match="expected an"):
        matting_laplacian(np.zeros((5, 6)))
    with pytest.raises(ValueError, match="expected an"):
        matting_laplacian(np.zeros((4, 5, 6)))


@pytest.mark.parametrize(("h", "w"), [(5, 5), (7, 9), (6, 11)])
def test_matting_laplacian_has_the_5x5_neighbourhood_structure(rng, h, w):
    lap = matting_laplacian(rng.random((h, w, 3))).tocoo()
    pattern = expected_pattern(h, w)
    assert lap.nnz == len(pattern)
    assert set(zip(lap.row.tolist(), lap.col.tolist(), strict=True)) == pattern
    per_row = np.diff(lap.tocsr().indptr).reshape(h, w)
    assert (per_row[2:h - 2, 2:w - 2] == 25).all()  # interior pixels: every pixel within 2 in both directions


def test_matting_loss_value_and_gradient_match_scipy(rng):
    h, w = 9, 13
    lap = matting_laplacian(rng.random((h, w, 3)))
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = matting_loss(x, to_torch_sparse(lap))
    loss.backward()
    v = x.detach().double().numpy()[0].reshape(3, -1).T  # (H*W, 3), pixel index = row * W + col
    mv = lap @ v
    assert loss.item() == pytest.approx(float((v * mv).sum()) / (h * w), rel=1e-5)
    expected_grad = (2 * mv / (h * w)).T.reshape(1, 3, h, w)
    np.testing.assert_allclose(x.grad.double().numpy(), expected_grad, rtol=1e-4, atol=1e-7)


def test_matting_loss_of_chw_image_equals_batched():
    g = torch.Generator().manual_seed(2)
    content, x = torch.rand(3, 6, 8, generator=g), torch.rand(3, 6, 8, generator=g)
    lap = to_torch_sparse(matting_laplacian(content))
    assert matting_loss(x, lap).item() == pytest.approx(matting_loss(x[None], lap).item(), rel=1e-6)
    assert matting_loss(content, lap).item() < 1e-3 * matting_loss(x, lap).item()  # content is affine of itself


# --- the masked style loss ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImpastoWarning)
        return load_vgg("vgg19", STYLE_LAYERS + CONTENT_LAYERS, "avg", "random")


def test_one_all_covering_class_equals_the_unmasked_loss(net, make_scene, make_texture):
    content, style = make_scene(24, 32, seed=1), make_texture(RED, 20, 28, seed=2)
    x = make_scene(24, 32, seed=5)[None]
    opts = photo_opts()
    plain = build_loss(net, content, [style], opts, contextlib.nullcontext)
    masked = build_loss(net, content, [style], opts, contextlib.nullcontext,
                        regions=[(torch.ones(24, 32), torch.ones(20, 28))])
    assert masked.styles[0].masks is not None
    feats = net(x)
    total_plain, terms_plain = plain(x, feats)
    total_masked, terms_masked = masked(x, feats)
    assert terms_masked["style"].item() == pytest.approx(terms_plain["style"].item(), rel=1e-5)
    assert total_masked.item() == pytest.approx(total_plain.item(), rel=1e-5)
    assert terms_plain["style"].item() > 0


def test_each_class_is_weighted_by_its_share_of_the_content(net, make_scene, make_texture):
    content, style = make_scene(24, 32, seed=1), make_texture(RED, 20, 28, seed=2)
    x = make_scene(24, 32, seed=5)[None]
    opts = photo_opts(style_layers=["conv1_1"])  # first layer: masks at full resolution
    left, top = torch.zeros(24, 32), torch.zeros(20, 28)
    left[:, :10] = 1
    top[:8] = 1
    split = build_loss(net, content, [style], opts, contextlib.nullcontext, regions=[(left, top), (1 - left, 1 - top)])
    assert [t.weight for t in split.styles] == pytest.approx([10 / 32, 22 / 32])
    feats, style_feats = net(x), net(style[None])
    expected = sum(share * ((gram_matrix(feats["conv1_1"], cm[None, None]) - gram_matrix(style_feats["conv1_1"],
                                                                                           sm[None, None])) ** 2).sum()
                   / (gram_matrix(style_feats["conv1_1"], sm[None, None]) ** 2).sum()
                   for share, cm, sm in [(10 / 32, left, top), (22 / 32, 1 - left, 1 - top)])
    got = split(x, feats)[1]["style"]
    assert got.item() == pytest.approx(opts.style_weight * expected.item(), rel=1e-5)


def test_masked_gram_is_normalized_by_the_masks_area():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(1, 4, 6, 10, generator=g)
    mask = torch.zeros(1, 1, 6, 10)
    mask[..., :4] = 1
    torch.testing.assert_close(gram_matrix(features, mask), gram_matrix(features[..., :4]))
    tiled = torch.cat([features[..., :4]] * 3, dim=-1)  # the same statistics over three times the area
    torch.testing.assert_close(gram_matrix(tiled, torch.ones(1, 1, 6, 12)), gram_matrix(features[..., :4]))
    torch.testing.assert_close(gram_matrix(features, torch.ones(1, 1, 6, 10)), gram_matrix(features))


# --- masked transfer on a synthetic two-region pair --------------------------------------------------


@pytest.fixture
def two_region_pair(make_texture):
    texture = make_texture
    h = w = 32
    content = torch.cat([texture((0.5,) * 3, h, w // 2, seed=1), texture((0.5,) * 3, h, w // 2, seed=4)], dim=2)
    style = torch.cat([texture(RED, h // 2, w, seed=2, amplitude=0.1), texture(BLUE, h // 2, w, seed=3,
                                                                                amplitude=0.1)], dim=1)
    content_mask = halves(h, w, WHITE, BLACK, vertical=True)  # left white, right black
    style_mask = halves(h, w, WHITE, BLACK, vertical=False)  # top (red) white, bottom (blue) black
    return content, style, content_mask, style_mask


def separation(image: torch.Tensor) -> float:
    """Mean red-minus-blue of the left half minus that of the right half."""
    redness = image[0] - image[2]
    w = image.shape[-1]
    return (redness[:, : w // 2].mean() - redness[:, w // 2:].mean()).item()


def test_masks_send_each_region_to_its_style_region(two_region_pair):
    content, style, content_mask, style_mask = two_region_pair
    opts = photo_opts(optimizer="adam", learning_rate=0.05, iterations=25)
    masked = photo_transfer(content, style, opts, content_mask, style_mask).image
    unmasked = photo_transfer(content, style, opts).image
    swapped = photo_transfer(content, style, opts, 1 - content_mask, style_mask).image
    assert masked.shape == swapped.shape == (3, 32, 32)
    s_masked, s_unmasked, s_swapped = separation(masked), separation(unmasked), separation(swapped)
    assert s_masked > 0.1
    assert s_masked > 5 * abs(s_unmasked) + 0.05
    assert s_swapped < -0.1  # left now takes the blue region, right the red one
    assert -s_swapped > 5 * abs(s_unmasked) + 0.05
    for image, red_side, blue_side in [(masked, slice(0, 16), slice(16, None)),
                                       (swapped, slice(16, None), slice(0, 16))]:
        assert (image[0, :, red_side] - image[2, :, red_side]).mean() > 0.1  # red-ish
        assert (image[2, :, blue_side] - image[0, :, blue_side]).mean() > 0.1  # blue-ish


def test_auto_masks_run_from_photo_transfer(two_region_pair):
    content, style, _, _ = two_region_pair
    out = photo_transfer(content, style, photo_opts(iterations=3, auto_masks=2))
    assert out.image.shape == (3, 32, 32) and torch.isfinite(out.image).all()


# --- the photorealism regularizer --------------------------------------------------------------------


def test_the_regularizer_keeps_the_output_locally_affine_in_the_content(make_scene, make_texture):
    content, style = make_scene(24, 32, seed=1), make_texture((0.8, 0.3, 0.2), 32, 32, seed=2)
    lap = to_torch_sparse(matting_laplacian(content))

    def residuals(image: torch.Tensor) -> tuple[float, float]:
        smoothed = guided_smooth(content, image, radius=1, eps=1e-6)
        return matting_loss(image, lap).item(), (image - smoothed).abs().mean().item()

    free = photo_transfer(content, style, photo_opts(affine_weight=0.0)).image
    regular = photo_transfer(content, style, photo_opts(affine_weight=1000.0)).image
    (m_free, r_free), (m_reg, r_reg) = residuals(free), residuals(regular)
    assert m_reg < 0.1 * m_free
    assert r_reg < 0.2 * r_free
    assert (regular - content).abs().mean() > 0.03  # it was still stylized, not left as the content


def test_second_pass_reports_the_affine_term(make_scene, make_texture):
    content, style = make_scene(24, 32, seed=1), make_texture(RED, 32, 32, seed=2)
    seen: dict[int, set[str]] = {}
    stage_names: dict[int, str] = {}

    def record(p):
        seen.setdefault(p.stage, set()).update(p.step.terms)
        stage_names[p.stage] = p.name

    out = photo_transfer(content, style, photo_opts(iterations=2, two_pass=True, affine_weight=10.0),
                         callbacks=[record])
    assert out.iterations == 4
    assert "affine" not in seen[0] and "affine" in seen[1]
    assert stage_names == {0: "pass 1/2", 1: "pass 2/2 (photorealism)"}


# --- local affine smoothing and upsampling ----------------------------------------------------------


@pytest.fixture
def guide(make_scene) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 0.6 * make_scene(40, 48, seed=3) + 0.4 * torch.rand(3, 40, 48, generator=g)


def test_guided_smooth_reproduces_an_affine_function_of_the_guide(guide):
    source = affine_of(guide)
    torch.testing.assert_close(guided_smooth(guide, source, radius=2, eps=1e-6), source, atol=1e-4, rtol=0)
    assert (guided_smooth(guide, source) - source).abs().mean() < 1e-3  # default eps: a small bias only


def test_guided_smooth_removes_noise_that_is_not_affine_in_the_guide(guide):
    clean = affine_of(guide)
    noisy = clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    smoothed = guided_smooth(guide, noisy)
    assert smoothed.shape == noisy.shape
    assert (smoothed - clean).abs().mean() < 0.5 * (noisy - clean).abs().mean()


def test_guided_upsample_brings_an_affine_result_to_full_size(make_scene):
    full = make_scene(48, 64, seed=3)
    target = affine_of(full)
    low = images.resize(target, (24, 32))
    up = guided_upsample(full, low)
    assert up.shape == full.shape
    err = (up - target).abs().mean()
    naive = (images.resize(low, (48, 64)) - target).abs().mean()
    assert err < 0.01
    assert err < 0.5 * naive  # sharper than plain interpolation: the guide supplies the detail


def test_full_resolution_output_is_the_working_results_affine_model(make_texture):
    content = make_texture((0.5, 0.5, 0.5), 64, 96, seed=1, amplitude=0.3)
    small = images.resize(content, (32, 48))  # what photo_transfer optimizes against
    out = finish(content, affine_of(small), PhotoOptions(smooth=False, smooth_eps=1e-6))
    assert out.shape == content.shape
    assert (out - affine_of(content)).abs().mean() < 1e-3


# --- semantic masks ----------------------------------------------------------------------------------


def names(pairs) -> list[str]:
    return sorted(p.name for p in pairs)


def test_mask_pairs_finds_the_palette_classes():
    cm = flat_mask(32, 32, (WHITE, ALL, slice(0, 12)), ((1.0, 0.0, 0.0), ALL, slice(12, 20)))  # white, red, black
    sm = flat_mask(30, 30, (WHITE, slice(0, 10), ALL), ((1.0, 0.0, 0.0), slice(10, 25), ALL))
    pairs = mask_pairs(cm, sm, (32, 32), (30, 30))
    assert names(pairs) == ["black", "red", "white"]
    by_name = {p.name: p for p in pairs}
    assert by_name["white"].content[:, :12].eq(1).all() and by_name["white"].content.sum() == 32 * 12
    assert by_name["red"].style[10:25].eq(1).all() and by_name["red"].style.sum() == 15 * 30
    assert by_name["black"].style.sum() == 5 * 30
    total = sum(p.content for p in pairs)
    assert total.eq(1).all()  # the classes partition the content


@pytest.mark.parametrize(("colour", "matches"), [
    ((0.92, 0.92, 0.92), True),
    ((1.0, 0.92, 0.92), True),
    ((0.85, 0.85, 0.85), False),
    ((1.0, 0.85, 1.0), False),
])
def test_mask_colour_tolerance(colour, matches):
    cm = halves(32, 32, colour, BLACK, vertical=True)
    sm = halves(32, 32, WHITE, BLACK, vertical=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = mask_pairs(cm, sm, (32, 32), (32, 32))
    assert ("white" in names(pairs)) == matches
    if matches:
        white = next(p for p in pairs if p.name == "white")
        assert white.content[:, :16].eq(1).all() and white.content.sum() == 32 * 16
        assert not [w for w in caught if issubclass(w.category, ImpastoWarning)]
    else:
        assert names(pairs) == ["black"]
        assert any(issubclass(w.category, ImpastoWarning) and "missing" in str(w.message) for w in caught)


@pytest.mark.parametrize("grey", [
    pytest.param((0.5, 0.5, 0.5), id="palette-grey"),
    pytest.param((0.7, 0.7, 0.7), id="light-grey"),
    pytest.param((0.3, 0.3, 0.3), id="dark-grey"),
])
@pytest.mark.parametrize("both", [False, True], ids=["edge-in-content", "edge-in-both"])
def test_anti_aliased_edges_are_not_a_class(grey, both):
    def with_edge() -> torch.Tensor:
        mask = halves(32, 32, WHITE, BLACK, vertical=True)
        mask[:, :, 16] = torch.tensor(grey).view(3, 1)  # a 1-px line between the two regions
        return mask

    cm = with_edge()
    sm = with_edge() if both else halves(32, 32, WHITE, BLACK, vertical=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImpastoWarning)  # no "missing class" warning either
        pairs = mask_pairs(cm, sm, (32, 32), (32, 32))
    assert names(pairs) == ["black", "white"]


@pytest.mark.parametrize("side", ["content", "style"])
def test_a_class_on_one_side_only_warns_and_is_skipped(side):
    plain = halves(32, 32, WHITE, BLACK, vertical=True)
    extra = plain.clone()
    extra[:, 20:28, :] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # a red band
    cm, sm = (extra, plain) if side == "content" else (plain, extra)
    other = "style" if side == "content" else "content"
    with pytest.warns(ImpastoWarning, match=f"red is missing from the {other} mask"):
        pairs = mask_pairs(cm, sm, (32, 32), (32, 32))
    assert names(pairs) == ["black", "white"]


def test_masks_of_another_size_are_resized_nearest_neighbour():
    cm = halves(16, 16, WHITE, BLACK, vertical=True)
    sm = halves(10, 10, WHITE, BLACK, vertical=False)
    with pytest.warns(ImpastoWarning) as caught:
        pairs = mask_pairs(cm, sm, (24, 32), (20, 28))
    assert [str(w.message) for w in caught] == ["the content mask is 16x16 but its photo is 32x24: stretched to fit",
                                                "the style mask is 10x10 but its photo is 28x20: stretched to fit"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same aspect at another size: resized without a word
        mask_pairs(halves(12, 16, WHITE, BLACK, vertical=True), sm, (24, 32), (20, 20))
    assert names(pairs) == ["black", "white"]
    for p in pairs:
        assert p.content.shape == (24, 32) and p.style.shape == (20, 28)
        assert set(p.content.unique().tolist()) == {0.0, 1.0} and set(p.style.unique().tolist()) == {0.0, 1.0}
    white = next(p for p in pairs if p.name == "white")
    assert white.content[:, :16].eq(1).all() and white.content.sum() == 24 * 16
    assert white.style[:10].eq(1).all() and white.style.sum() == 10 * 28


def test_many_unmatched_pixels_are_an_error():
    cm = halves(32, 32, WHITE, BLACK, vertical=True)
    cm[:, :, :10] = torch.rand(3, 32, 10, generator=torch.Generator().manual_seed(0))  # a photo-like region: 31%
    sm = halves(32, 32, WHITE, BLACK, vertical=False)
    with pytest.raises(ImpastoError, match=r"31% of the content mask's pixels match no mask colour"):
        mask_pairs(cm, sm, (32, 32), (32, 32))
    with pytest.raises(ImpastoError, match=r"of the style mask's pixels match no mask colour"):
        mask_pairs(sm, cm, (32, 32), (32, 32))


def test_a_few_unmatched_pixels_are_tolerated():
    cm = halves(32, 32, WHITE, BLACK, vertical=True)
    cm[:, :, 5] = torch.rand(3, 32, generator=torch.Generator().manual_seed(0))  # 3% of stray colours
    pairs = mask_pairs(cm, halves(32, 32, WHITE, BLACK, vertical=False), (32, 32), (32, 32))
    assert names(pairs) == ["black", "white"]


def test_custom_palettes_work():
    green, mauve = (0.2, 0.6, 0.3), (0.7, 0.3, 0.5)
    cm = halves(32, 32, green, mauve, vertical=True)
    sm = halves(30, 36, green, mauve, vertical=False)
    sm[:, :3] += 0.03  # a slightly different shade (a re-encoded mask) still matches
    pairs = mask_pairs(cm, sm, (32, 32), (30, 36))
    assert len(pairs) == 2
    first = next(p for p in pairs if p.content[0, 0] == 1)
    assert first.content[:, :16].eq(1).all() and first.content.sum() == 32 * 16
    assert first.style[:15].eq(1).all() and first.style.sum() == 15 * 36
    assert all(p.name.startswith("rgb(") for p in pairs)


def test_masks_sharing_no_colour_are_an_error():
    cm = halves(32, 32, WHITE, BLACK, vertical=True)
    sm = halves(32, 32, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), vertical=False)
    with pytest.warns(ImpastoWarning), pytest.raises(ImpastoError, match="share no colour"):
        mask_pairs(cm, sm, (32, 32), (32, 32))


def test_photo_transfer_needs_both_masks_or_neither(make_scene):
    content = make_scene(32, 32)
    with pytest.raises(ImpastoError, match="give both"):
        photo_transfer(content, content, photo_opts(iterations=1), content_mask=torch.ones(3, 32, 32))


def test_auto_masks_pair_regions_by_layout(make_texture):
    def split(top, bottom, h, w, seed):
        return torch.cat([make_texture(top, h // 2, w, seed=seed, amplitude=0.05),
                          make_texture(bottom, h - h // 2, w, seed=seed + 1, amplitude=0.05)], dim=1)

    content = split((0.5, 0.75, 0.95), (0.2, 0.6, 0.2), 32, 40, seed=1)  # sky blue over green
    style = split((0.95, 0.6, 0.2), (0.1, 0.3, 0.1), 36, 30, seed=3)  # orange over dark green
    pairs = auto_masks(content, style, k=2)
    assert len(pairs) == 2
    for p in pairs:
        assert p.content.shape == (32, 40) and p.style.shape == (36, 30)
        content_top, style_top = p.content[:16].mean().item(), p.style[:18].mean().item()
        content_bottom, style_bottom = p.content[16:].mean().item(), p.style[18:].mean().item()
        if content_top > 0.5:
            assert content_top > 0.95 and content_bottom < 0.05 and style_top > 0.95 and style_bottom < 0.05
        else:
            assert content_bottom > 0.95 and content_top < 0.05 and style_bottom > 0.95 and style_top < 0.05


# --- resume ------------------------------------------------------------------------------------------


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


@pytest.fixture
def resume_case(make_scene, make_texture):
    content, style = make_scene(36, 48, seed=1), make_texture(RED, 32, 32, seed=2)
    return content, style, halves(36, 48, WHITE, BLACK, vertical=True), halves(32, 32, WHITE, BLACK, vertical=False)


def resume_opts(optimizer: str) -> PhotoOptions:
    return photo_opts(iterations=4, two_pass=True, affine_weight=100.0, smooth=True, full_resolution=True,
                      optimizer=optimizer)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_resume_from_pass_one_equals_an_uninterrupted_run(resume_case, optimizer):
    content, style, cm, sm = resume_case
    snapshot: dict[str, bytes] = {}
    full_log: list[tuple[int, int, float]] = []

    def take(p):
        full_log.append((p.stage, p.offset + p.step.iteration, p.step.loss))
        if (p.stage, p.step.iteration) == (0, 2):
            buf = io.BytesIO()
            torch.save(p.state(), buf)  # immediately: the state refers to live tensors
            snapshot["state"] = buf.getvalue()

    full = photo_transfer(content, style, resume_opts(optimizer), cm, sm, [take])
    resumed_log: list[tuple[int, int, float]] = []
    resumed = photo_transfer(content, style, resume_opts(optimizer), cm, sm,
                             [lambda p: resumed_log.append((p.stage, p.offset + p.step.iteration, p.step.loss))],
                             resume=torch.load(io.BytesIO(snapshot["state"]), weights_only=True))
    assert full.image.shape == (3, 36, 48)
    assert torch.equal(full.image, resumed.image)
    assert full.loss == resumed.loss
    assert full.iterations == resumed.iterations == 8
    assert resumed_log == full_log[2:]


def test_resume_after_ctrl_c_in_pass_one_equals_an_uninterrupted_run(resume_case):
    content, style, cm, sm = resume_case
    full = photo_transfer(content, style, resume_opts("lbfgs"), cm, sm)

    def ctrl_c(p):
        if p.stage == 0 and p.step.iteration == 3:
            raise KeyboardInterrupt

    stopped = photo_transfer(content, style, resume_opts("lbfgs"), cm, sm, [ctrl_c])
    assert stopped.interrupted and stopped.iterations == 3
    assert stopped.image.shape == (3, 24, 32)  # the raw best image at the working size: no post-processing yet
    resumed = photo_transfer(content, style, resume_opts("lbfgs"), cm, sm, resume=_roundtrip(stopped.state))
    assert not resumed.interrupted
    assert torch.equal(full.image, resumed.image)


# --- option checks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "message"), [
    (dict(scales=[16, 32]), "--scales is for stylize"),
    (dict(preserve_color="luminance"), "--preserve-color is for stylize"),
    (dict(affine_weight=-1.0), "must not be negative"),
    (dict(smooth_radius=0), "must be positive"),
])
def test_photo_options_refused(kw, message, make_scene):
    content = make_scene(32, 32)
    with pytest.raises(ImpastoError, match=message):
        photo_transfer(content, content, photo_opts(**kw))


def test_scipy_sparse_roundtrip_to_torch():
    lap = scipy.sparse.random(20, 20, density=0.2, random_state=0, format="csr")
    dense = to_torch_sparse(lap, dtype=torch.float64).to_dense().numpy()
    np.testing.assert_array_equal(dense, lap.toarray())


def test_the_api_refuses_masks_with_auto_masks_and_one_mask_alone():
    photo, mask = torch.rand(3, 16, 16), halves(16, 16, WHITE, BLACK, vertical=True)
    with pytest.raises(ImpastoError, match=r"^use either --auto-masks or --content-mask/--style-mask, not both$"):
        photo_transfer(photo, photo, PhotoOptions(auto_masks=2, weights="/nonexistent"), mask, mask)
    with pytest.raises(ImpastoError, match=r"^give both --content-mask and --style-mask, or neither$"):
        photo_transfer(photo, photo, PhotoOptions(weights="/nonexistent"), mask, None)


def test_ctrl_c_during_the_finishing_keeps_the_optimized_result(make_scene, make_texture, monkeypatch):
    """Smoothing and the full-resolution upsample run after the optimization: an interrupt there lost the
    finished run. Now it returns the working-size result as interrupted, with a state that needs no more
    iterations, so a resume only finishes it."""
    import impasto.photo.transfer as transfer

    content, style = make_scene(48, 64, seed=1), make_texture((0.8, 0.3, 0.2), 32, 32, seed=2)
    opts = photo_opts(iterations=3, full_resolution=True)
    whole = photo_transfer(content, style, opts)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(transfer, "finish", interrupted)
        stopped = photo_transfer(content, style, opts)
    assert stopped.interrupted and stopped.iterations == 3 and stopped.image.shape == (3, 24, 32)
    assert whole.image.shape == (3, 48, 64)
    resumed = photo_transfer(content, style, opts, resume=stopped.state)
    assert not resumed.interrupted and torch.equal(resumed.image, whole.image)
