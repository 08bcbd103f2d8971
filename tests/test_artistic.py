"""The artistic engine: blend weights, style scales, colour preservation, multi-scale, resume, option checks."""

from __future__ import annotations

import io

import pytest
import torch

from impasto import artistic, images
from impasto.artistic import StylizeOptions, initial_image, output_sizes, stylize_tensors, with_detail_of
from impasto.errors import ImpastoError
from impasto.losses import gram_matrix
from impasto.nets import VGGFeatures

STYLE_LAYERS = ["relu1_1", "relu2_1"]
CONTENT_LAYERS = ["relu2_1"]
RED = (0.8, 0.25, 0.25)
BLUE = (0.25, 0.25, 0.8)


def small_opts(**kw) -> StylizeOptions:
    defaults = dict(size=32, iterations=3, content_layers=CONTENT_LAYERS, style_layers=STYLE_LAYERS,
                    weights="random", pooling="avg", device="cpu")  # bit-exact claims are about CPU runs
    return StylizeOptions(**{**defaults, **kw})


@pytest.fixture
def spy_build_loss(monkeypatch):
    """Record (styles passed in, PerceptualLoss returned) for every call of artistic.build_loss."""
    calls: list[tuple[list[torch.Tensor], object]] = []
    real = artistic.build_loss

    def spy(net, content, styles, opts, autocast):
        loss = real(net, content, styles, opts, autocast)
        calls.append(([s.detach().clone() for s in styles], loss))
        return loss

    monkeypatch.setattr(artistic, "build_loss", spy)
    return calls


def mean_colour(image: torch.Tensor) -> torch.Tensor:
    return image.reshape(3, -1).mean(dim=1)


# --- style blend weights -------------------------------------------------------------------------


def test_style_blend_moves_the_output_colour(net, make_scene, make_texture):
    content = make_scene(32, 32, seed=1, low=0.3, high=0.7)
    red, blue = make_texture(RED, 32, 32, seed=2, amplitude=0.1), make_texture(BLUE, 32, 32, seed=3, amplitude=0.1)
    means = {}
    for weights in [(0.99, 0.01), (0.5, 0.5), (0.01, 0.99)]:
        opts = small_opts(iterations=10, optimizer="adam", learning_rate=0.05, style_weight=100,
                          style_blend_weights=list(weights))
        means[weights] = mean_colour(stylize_tensors(content, [red, blue], opts, net=net).image)
    r, b = 0, 2
    assert means[(0.99, 0.01)][r] > means[(0.5, 0.5)][r] + 0.05 > means[(0.01, 0.99)][r] + 0.1
    assert means[(0.01, 0.99)][b] > means[(0.5, 0.5)][b] + 0.05 > means[(0.99, 0.01)][b] + 0.1
    # the mostly-red blend is red-dominant, the mostly-blue one blue-dominant
    assert means[(0.99, 0.01)][r] > means[(0.99, 0.01)][b] + 0.2
    assert means[(0.01, 0.99)][b] > means[(0.01, 0.99)][r] + 0.2


def test_style_blend_is_normalized(net, make_scene, make_texture, spy_build_loss):
    content = make_scene(32, 32, seed=1)
    red, blue = make_texture(RED, 32, 32, seed=2), make_texture(BLUE, 32, 32, seed=3)
    # content and TV terms are on, so an unnormalized (doubled) style term would change the result
    results = {}
    for weights in [(2.0, 2.0), (1.0, 1.0), None, (1.0, 3.0)]:
        opts = small_opts(iterations=4, optimizer="lbfgs", content_weight=5.0, tv_weight=1.0,
                          style_blend_weights=None if weights is None else list(weights))
        results[weights] = stylize_tensors(content, [red, blue], opts, net=net)
    assert [[t.weight for t in loss.styles] for _, loss in spy_build_loss] == [
        [0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.25, 0.75]]
    assert torch.equal(results[(2.0, 2.0)].image, results[(1.0, 1.0)].image)
    assert results[(2.0, 2.0)].loss == results[(1.0, 1.0)].loss
    assert torch.equal(results[None].image, results[(1.0, 1.0)].image)
    assert not torch.allclose(results[(1.0, 3.0)].image, results[(1.0, 1.0)].image, atol=1e-3)


def test_zero_blend_weight_is_allowed_and_ignores_that_style(net, make_scene, make_texture):
    content = make_scene(32, 32, seed=1)
    red, blue = make_texture(RED, 32, 32, seed=2), make_texture(BLUE, 32, 32, seed=3)
    single = stylize_tensors(content, [red], small_opts(iterations=3, optimizer="adam"), net=net)
    blended = stylize_tensors(content, [red, blue], small_opts(iterations=3, optimizer="adam",
                                                               style_blend_weights=[1.0, 0.0]), net=net)
    torch.testing.assert_close(blended.image, single.image, rtol=0, atol=1e-6)


# --- style scales --------------------------------------------------------------------------------


def test_style_scales_resize_style_relative_to_content_width(net, make_scene, make_texture, spy_build_loss):
    content = make_scene(32, 32, seed=1)  # output 32 x 32
    style_a = make_texture(RED, 40, 60, seed=2)  # 60 wide, 40 high
    style_b = make_texture(BLUE, 30, 30, seed=3)
    opts = small_opts(iterations=1, style_scales=[0.5, 1.5])
    stylize_tensors(content, [style_a, style_b], opts, net=net)
    (styles, loss), = spy_build_loss
    # style a: width 32 * 0.5 = 16, height 40 * 16 / 60 = 10.67 -> 11; style b: 48 x 48
    assert [tuple(s.shape) for s in styles] == [(3, 11, 16), (3, 48, 48)]
    for style, scaled_hw, target in zip([style_a, style_b], [(11, 16), (48, 48)], loss.styles, strict=True):
        explicit = images.resize(style, scaled_hw)
        with torch.no_grad():
            feats = net(explicit.unsqueeze(0))
            unscaled = net(style.unsqueeze(0))
        for k in STYLE_LAYERS:
            torch.testing.assert_close(target.grams[k], gram_matrix(feats[k]), rtol=1e-5, atol=1e-7)
            assert not torch.allclose(target.grams[k], gram_matrix(unscaled[k]), rtol=1e-3, atol=1e-5)


def test_style_scales_follow_each_scale_of_a_multiscale_run(net, make_scene, make_texture, spy_build_loss):
    content = make_scene(24, 32, seed=1)  # scales 16 and 32 (longer side) -> widths 16 and 32
    style = make_texture(RED, 32, 32, seed=2)
    stylize_tensors(content, [style], small_opts(size=None, scales=[16, 32], iterations=1, style_scales=[0.75]),
                    net=net)
    assert [tuple(styles[0].shape) for styles, _ in spy_build_loss] == [(3, 12, 12), (3, 24, 24)]


def test_default_style_scale_is_content_width(net, make_scene, make_texture, spy_build_loss):
    content = make_scene(48, 64, seed=1)  # size 32 -> 24 x 32
    style = make_texture(RED, 50, 100, seed=2)
    stylize_tensors(content, [style], small_opts(iterations=1), net=net)
    assert tuple(spy_build_loss[0][0][0].shape) == (3, 16, 32)


# --- colour preservation -------------------------------------------------------------------------


def test_preserve_color_luminance_keeps_content_chroma(net, make_scene, make_texture):
    content = make_scene(32, 32, seed=1, low=0.3, high=0.7)  # mid-range colours: no clamping at the gamut edges
    style = make_texture(RED, 32, 32, seed=2, amplitude=0.1)
    common = dict(iterations=10, optimizer="adam", learning_rate=0.05, style_weight=100)
    plain = stylize_tensors(content, [style], small_opts(**common), net=net).image
    kept = stylize_tensors(content, [style], small_opts(**common, preserve_color="luminance"), net=net).image
    assert kept.min() > 0 and kept.max() < 1
    yiq_kept, yiq_plain, yiq_content = (images.rgb_to_yiq(t) for t in (kept, plain, content))
    torch.testing.assert_close(yiq_kept[1:], yiq_content[1:], rtol=0, atol=1e-4)
    torch.testing.assert_close(yiq_kept[0], yiq_plain[0], rtol=0, atol=1e-4)  # luminance of the stylized result
    assert (yiq_kept[0] - yiq_content[0]).abs().max() > 0.05  # ... which is not the content's
    assert (yiq_plain[1:] - yiq_content[1:]).abs().max() > 0.05  # without the option the chroma changes


def test_preserve_color_luminance_resizes_content(net, make_scene, make_texture):
    content = make_scene(64, 64, seed=4, low=0.3, high=0.7)
    style = make_texture(BLUE, 32, 32, seed=2, amplitude=0.1)
    kept = stylize_tensors(content, [style], small_opts(size=32, iterations=3, optimizer="adam",
                                                        preserve_color="luminance"), net=net).image
    assert kept.shape == (3, 32, 32)
    expected_iq = images.rgb_to_yiq(images.resize(content, (32, 32)))[1:]
    torch.testing.assert_close(images.rgb_to_yiq(kept)[1:], expected_iq, rtol=0, atol=1e-4)


def test_preserve_color_histogram_recolours_styles_to_content(net, make_scene, make_texture, spy_build_loss):
    content = make_scene(32, 32, seed=1, low=0.3, high=0.7)
    style = make_texture(RED, 32, 32, seed=2)
    stylize_tensors(content, [style], small_opts(iterations=1, preserve_color="histogram"), net=net)
    (used,), _ = spy_build_loss[0]
    torch.testing.assert_close(used, images.match_color(style, content), rtol=0, atol=1e-6)
    assert (mean_colour(used) - mean_colour(content)).abs().max() < 1e-3
    assert (mean_colour(style) - mean_colour(content)).abs().max() > 0.2


# --- sizes and multi-scale -----------------------------------------------------------------------


def test_multiscale_output_size_and_progress(net, make_scene, make_texture):
    content = make_scene(48, 64, seed=1)
    style = make_texture(RED, 32, 32, seed=2)
    seen = []

    def record(p):
        seen.append((p.stage, p.stages, p.offset, p.step.iteration, p.step.total, tuple(p.step.image.shape)))

    opts = small_opts(size=None, scales=[32, 64], scale_iterations=[3, 2])
    result = stylize_tensors(content, [style], opts, [record], net=net)
    assert result.image.shape == (3, 48, 64)
    assert result.iterations == 5 and not result.interrupted
    assert seen == [
        (0, 2, 0, 1, 3, (1, 3, 24, 32)),
        (0, 2, 0, 2, 3, (1, 3, 24, 32)),
        (0, 2, 0, 3, 3, (1, 3, 24, 32)),
        (1, 2, 3, 1, 2, (1, 3, 48, 64)),
        (1, 2, 3, 2, 2, (1, 3, 48, 64)),
    ]
    assert result.state["stage"] == 1


def test_multiscale_default_iterations_per_scale(net, make_scene, make_texture):
    content = make_scene(32, 24, seed=1)  # portrait
    seen = []
    opts = small_opts(size=None, scales=[16, 32], iterations=2)
    result = stylize_tensors(content, [make_texture(RED, 32, 32)], opts, [lambda p: seen.append((p.stage, p.offset))],
                             net=net)
    assert result.image.shape == (3, 32, 24)
    assert seen == [(0, 0), (0, 0), (1, 2), (1, 2)]
    assert result.iterations == 4


def test_output_sizes():
    assert output_sizes((48, 64), StylizeOptions(size=32)) == [(24, 32)]
    assert output_sizes((48, 64), StylizeOptions(width=40)) == [(30, 40)]
    assert output_sizes((48, 64), StylizeOptions(size=None)) == [(48, 64)]
    assert output_sizes((64, 48), StylizeOptions(scales=[32, 64, 128])) == [(32, 24), (64, 48), (128, 96)]
    with pytest.raises(ImpastoError, match="either --scales or --width"):
        output_sizes((48, 64), StylizeOptions(scales=[32], width=32))


def test_size_none_keeps_content_size_and_width_overrides(net, make_scene, make_texture):
    content = make_scene(20, 30, seed=1)
    style = make_texture(RED, 32, 32)
    assert stylize_tensors(content, [style], small_opts(size=None, iterations=1), net=net).image.shape == (3, 20, 30)
    assert stylize_tensors(content, [style], small_opts(width=24, iterations=1), net=net).image.shape == (3, 16, 24)


def test_initial_image_options(make_scene, tmp_path):
    content = make_scene(24, 32, seed=1)
    assert torch.equal(initial_image(content, StylizeOptions(), (24, 32)), content)
    noise = initial_image(content, StylizeOptions(init="noise", seed=7), (24, 32))
    assert torch.equal(noise, initial_image(content, StylizeOptions(init="noise", seed=7), (24, 32)))
    assert not torch.equal(noise, initial_image(content, StylizeOptions(init="noise", seed=8), (24, 32)))
    assert noise.min() >= 0 and noise.max() <= 1 and abs(float(noise.mean()) - 0.5) < 0.05
    blended = initial_image(content, StylizeOptions(init="content", initial_noiseblend=0.25, seed=7), (24, 32))
    torch.testing.assert_close(blended, 0.75 * content + 0.25 * noise)
    path = tmp_path / "init.png"
    images.save_image(make_scene(12, 16, seed=3), path)
    from_file = initial_image(content, StylizeOptions(init=str(path)), (24, 32))
    assert from_file.shape == (3, 24, 32)
    torch.testing.assert_close(from_file, images.resize(images.load_image(path), (24, 32)))


# --- resume ------------------------------------------------------------------------------------------


def _serialize(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _deserialize(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), weights_only=True)


RESUME_CASES = [
    pytest.param(dict(size=32, iterations=6), (0, 3), id="one-scale"),
    pytest.param(dict(size=None, scales=[32, 48], scale_iterations=[4, 3]), (0, 2), id="two-scales"),
]


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
@pytest.mark.parametrize(("sizing", "snapshot_at"), RESUME_CASES)
def test_resume_equals_uninterrupted_run(net, make_scene, make_texture, optimizer, sizing, snapshot_at):
    content = make_scene(24, 32, seed=1)
    style = make_texture(RED, 32, 32, seed=2)
    snapshot: dict[str, bytes] = {}
    full_log: list[tuple[int, int, float]] = []

    def take(p):
        full_log.append((p.stage, p.offset + p.step.iteration, p.step.loss))
        if (p.stage, p.step.iteration) == snapshot_at:
            snapshot["state"] = _serialize(p.state())  # now: the state references live optimizer tensors

    full = stylize_tensors(content, [style], small_opts(optimizer=optimizer, **sizing), [take], net=net)
    resumed_log: list[tuple[int, int, float]] = []
    resumed = stylize_tensors(content, [style], small_opts(optimizer=optimizer, **sizing),
                              [lambda p: resumed_log.append((p.stage, p.offset + p.step.iteration, p.step.loss))],
                              resume=_deserialize(snapshot["state"]), net=net)
    assert torch.equal(full.image, resumed.image)
    assert full.loss == resumed.loss
    assert full.iterations == resumed.iterations == len(full_log)
    k = snapshot_at[1]
    assert resumed_log == full_log[k:]  # the resumed run picks up at the next iteration, same losses


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_resume_after_ctrl_c_equals_uninterrupted_run(net, make_scene, make_texture, optimizer):
    content = make_scene(24, 32, seed=1)
    style = make_texture(BLUE, 32, 32, seed=2)
    sizing = dict(size=None, scales=[32, 48], scale_iterations=[4, 3], optimizer=optimizer)
    full = stylize_tensors(content, [style], small_opts(**sizing), net=net)

    def ctrl_c(p):
        if p.stage == 0 and p.step.iteration == 3:
            raise KeyboardInterrupt

    stopped = stylize_tensors(content, [style], small_opts(**sizing), [ctrl_c], net=net)
    assert stopped.interrupted and stopped.iterations == 3
    assert stopped.image.shape == (3, 24, 32)  # the best image of the interrupted scale
    resumed = stylize_tensors(content, [style], small_opts(**sizing), resume=_deserialize(_serialize(stopped.state)),
                              net=net)
    assert not resumed.interrupted
    assert torch.equal(full.image, resumed.image)
    assert full.iterations == resumed.iterations == 7


# --- option checks -----------------------------------------------------------------------------------


REFUSED = {  # test id: (options, number of style images, expected message)
    "blend-count": (dict(style_blend_weights=[1.0, 2.0]), 3,
                    "--style-blend-weights has 2 values but there are 3 style images"),
    "style-scales-count": (dict(style_scales=[1.0]), 2, "--style-scales has 1 values but there are 2 style images"),
    "blend-negative": (dict(style_blend_weights=[1.0, -1.0]), 2, "--style-blend-weights must not be negative"),
    "blend-all-zero": (dict(style_blend_weights=[0.0, 0.0]), 2, "--style-blend-weights must not all be zero"),
    "style-scales-zero": (dict(style_scales=[0.0]), 1, "--style-scales must all be positive"),
    "content-weight-negative": (dict(content_weight=-1.0), 1, "--content-weight must not be negative"),
    "style-weight-negative": (dict(style_weight=-0.5), 1, "--style-weight must not be negative"),
    "tv-weight-negative": (dict(tv_weight=-1e-3), 1, "--tv-weight must not be negative"),
    "iterations-zero": (dict(iterations=0), 1, "--iterations must be positive"),
    "size-negative": (dict(size=-5), 1, "--size must be positive"),
    "learning-rate-zero": (dict(learning_rate=0.0), 1, "--learning-rate must be positive"),
    "noiseblend-above-1": (dict(initial_noiseblend=1.5), 1, "--initial-noiseblend must be between 0 and 1"),
    "scale-iterations-count": (dict(scales=[32, 64], scale_iterations=[5]), 1,
                               "--scale-iterations has 1 values but there are 2 scales"),
    "scales-negative": (dict(scales=[32, -64]), 1, "--scales must all be positive"),
    "style-layer-w-count": (dict(style_layers=["relu1_1"], style_layer_weights=[1.0, 2.0]), 1,
                            "--style-layer-weights has 2 values but there are 1 style layers"),
    "content-layer-w-count": (dict(content_layer_weights=[1.0, 1.0]), 1,
                              "--content-layer-weights has 2 values but there are 1 content layers"),
    "optimizer-unknown": (dict(optimizer="sgd"), 1, "unknown optimizer 'sgd'"),
    "preserve-color-unknown": (dict(preserve_color="chroma"), 1, "unknown --preserve-color 'chroma'"),
    "no-layers": (dict(style_layers=[], content_layers=[]), 1, "no content or style layers given"),
    "content-layer-unknown": (dict(content_layers=["relu4_5"]), 1, "vgg19 has no layer 'relu4_5'"),
    "vgg16-layer-unknown": (dict(model="vgg16", style_layers=["relu3_4"]), 1, "vgg16 has no layer 'relu3_4'"),
    "model-unknown": (dict(model="resnet50"), 1, "unknown --model 'resnet50'"),
    "scales-fine-to-coarse": (dict(scales=[64, 32]), 1, "--scales must grow from coarse to fine, got 64,32"),
    "scales-repeated": (dict(scales=[64, 64]), 1, "--scales must grow from coarse to fine, got 64,64"),
    "content-weight-nan": (dict(content_weight=float("nan")), 1, "--content-weight must be a finite number, got nan"),
    "noiseblend-nan": (dict(initial_noiseblend=float("nan")), 1, "--initial-noiseblend must be a finite number"),
    "tv-power-inf": (dict(tv_power=float("inf")), 1, "--tv-power must be a finite number, got inf"),
    "style-scales-nan": (dict(style_scales=[1.0, float("nan")]), 2, "--style-scales must be a finite number"),
    "blend-tuple-inf": (dict(style_blend_weights=(float("inf"),)), 1, "--style-blend-weights must be a finite number"),
}


@pytest.mark.parametrize(("options", "n_styles", "message"), list(REFUSED.values()), ids=list(REFUSED))
def test_options_check_refuses(options, n_styles, message):
    with pytest.raises(ImpastoError) as info:
        StylizeOptions(**options).check(n_styles)
    assert message in str(info.value)


def test_options_check_accepts_defaults_and_consistent_lists():
    StylizeOptions().check(1)
    StylizeOptions(style_blend_weights=[1, 2, 3], style_scales=[0.5, 1, 2], scales=[64, 128],
                   scale_iterations=[10, 5]).check(3)


def test_layers_given_as_the_command_line_writes_them():
    opts = StylizeOptions(style_layers="relu1_1, relu2_1", content_layers=("relu2_1",))
    assert opts.style_layers == ["relu1_1", "relu2_1"] and opts.content_layers == ["relu2_1"]
    opts.check(1)
    with pytest.raises(ImpastoError, match=r"^style_layers must be layer names such as 'relu1_1,relu2_1', got None$"):
        StylizeOptions(style_layers=None)


def test_stylize_checks_options_before_work(make_scene, make_texture):
    content, style = make_scene(32, 32), make_texture(RED, 32, 32)
    with pytest.raises(ImpastoError, match="has 2 values but there are 3 style images"):
        stylize_tensors(content, [style] * 3, small_opts(style_blend_weights=[1, 1]))
    with pytest.raises(ImpastoError, match="at least one style"):
        stylize_tensors(content, [], small_opts())


def test_unknown_layer_name_is_refused(make_scene, make_texture):
    with pytest.raises(ImpastoError, match="vgg19 has no layer 'relu9_1'"):
        VGGFeatures("vgg19", ["relu1_1", "relu9_1"])
    with pytest.raises(ImpastoError, match="vgg16 has no layer 'conv3_4'"):
        VGGFeatures("vgg16", ["conv3_4"])
    opts = small_opts(style_layers=["relu1_1", "relu6_1"])
    with pytest.raises(ImpastoError, match="vgg19 has no layer 'relu6_1'"):
        stylize_tensors(make_scene(32, 32), [make_texture(RED, 32, 32)], opts)


def test_images_too_small_for_the_network(net, make_scene, make_texture):
    content, style = make_scene(32, 32), make_texture(RED, 32, 32)
    deep = VGGFeatures("vgg19", ["relu3_1"], pooling="avg")  # downsamples by 4
    with pytest.raises(ImpastoError, match="the output is 3x3 pixels"):
        stylize_tensors(content, [style], small_opts(size=3, content_layers=["relu3_1"], style_layers=["relu3_1"]),
                        net=deep)
    with pytest.raises(ImpastoError, match="a style image is 1x1 pixels"):
        stylize_tensors(content, [style], small_opts(size=32, iterations=1, style_scales=[0.02]), net=net)


def test_a_finer_scale_starts_with_the_content_detail_the_coarser_scale_lacked(make_scene):
    content = make_scene(48, 64, seed=4)
    start = with_detail_of(content)
    coarse = images.resize(content, (12, 16))
    assert torch.allclose(start(coarse, (48, 64)), content, atol=1e-6)  # the content carries over as itself
    stylized = (coarse * 0.5 + 0.25).clamp(0, 1)
    fine = start(stylized, (48, 64))
    plain = images.resize(stylized, (48, 64))
    detail = content - images.resize(coarse, (48, 64))
    assert torch.allclose(fine, (plain + detail).clamp(0, 1), atol=1e-6)
    # the coarse scale's result sets the low frequencies: shrunk back, the start is close to it
    assert (images.resize(fine, (12, 16)) - stylized).abs().mean() < 0.2 * (coarse - stylized).abs().mean()


def test_a_run_that_fits_only_without_kept_winograd_transforms_makes_them_at_each_pass(monkeypatch):
    """The memory guard: enough memory for everything keeps the transforms; enough only without them
    makes them at each pass (with a warning); not even that refuses the run."""
    from impasto.errors import ImpastoWarning
    from impasto.nets.winograd import FrozenConv3x3

    opts = StylizeOptions(style_layers=["relu3_1"], content_layers=["relu3_1"], weights="random", device="cpu")
    hw = (128, 128)  # big enough for Winograd's transforms to pay (at 64 px they do not: none are kept)
    cpu = torch.device("cpu")

    def fresh() -> VGGFeatures:
        return VGGFeatures("vgg19", ["relu3_1"])

    net = fresh()
    need = artistic.estimate_bytes(net, hw, opts)
    kept = 36 * 256 * 128 * 4  # conv3_1's transform, the only Winograd layer up to relu3_1
    conv3_1 = net.layers.conv3_1
    assert isinstance(conv3_1, FrozenConv3x3) and conv3_1.kept_transform_bytes(32) == kept
    assert net.kept_transform_bytes(*hw) == kept and net.kept_transform_bytes(64, 64) == 0

    monkeypatch.setattr(artistic, "available_bytes", lambda device: int((need + kept) / 0.8) + 1)
    artistic.check_memory(net, hw, opts, cpu)
    assert conv3_1.keep_transform

    monkeypatch.setattr(artistic, "available_bytes", lambda device: int((need + kept / 2) / 0.8))
    with pytest.warns(ImpastoWarning, match=r"fits in memory only without keeping the Winograd transforms \(4 MiB\)"):
        artistic.check_memory(net, hw, opts, cpu)
    assert not conv3_1.keep_transform and conv3_1.kept_transform_bytes(32) == 0
    x = torch.rand(1, 3, *hw, requires_grad=True)
    net(x)["relu3_1"].sum().backward()
    assert conv3_1._cached is None and x.grad is not None

    monkeypatch.setattr(artistic, "available_bytes", lambda device: int(need / 0.8) - 1)
    with pytest.raises(ImpastoError, match="needs about"):
        artistic.check_memory(fresh(), hw, opts, cpu)
