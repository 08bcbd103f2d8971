"""The fast engine's network, its model files, and the lengstrom/fast-style-transfer importer.

The importer is checked against a reference forward pass written here straight from the
TensorFlow network's definition (the table in ../shared/data/pretrained/fast-style/README.md):
TF "same" padding from TF's own formula, conv2d_transpose by scattering (no ConvTranspose2d),
instance norm with the shift variable first, in float64 on the raw dumped variables.
"""

from __future__ import annotations

import json
import math
import pathlib
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from impasto.errors import ImpastoError
from impasto.fast.importers import LENGSTROM_SPEC, import_lengstrom
from impasto.fast.models import FORMAT, load_model, model_payload, read_payload, save_model
from impasto.fast.transformer import TransformerNet, TransformerSpec

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
FAST_STYLE = SHARED / "pretrained" / "fast-style"
needs_shared = pytest.mark.skipif(not (FAST_STYLE / "wave" / "manifest.json").is_file(),
                                  reason="../shared/data (pretrained fast-style networks) is not present")

NATIVE_SMALL = TransformerSpec(width=0.25)
LENGSTROM_SMALL = TransformerSpec(width=0.25, padding="same", upsample="transposed", norm_eps=1e-3,
                                  output_norm=True, output="tanh")


def small_net(spec: TransformerSpec = NATIVE_SMALL, seed: int = 0) -> TransformerNet:
    torch.manual_seed(seed)
    return TransformerNet(spec).eval()


# ----------------------------------------------------------------------------- the network


@pytest.mark.parametrize("spec", [NATIVE_SMALL, LENGSTROM_SMALL], ids=["native", "lengstrom"])
@pytest.mark.parametrize("size", [(9, 13), (31, 17), (64, 48), (5, 6)])
def test_output_keeps_the_input_size(spec, size):
    net = small_net(spec)
    with torch.no_grad():
        out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


def test_lengstrom_spec_is_the_tensorflow_network():
    expected = TransformerSpec(width=1.0, residual_blocks=5, padding="same", upsample="transposed", norm_eps=1e-3,
                               output_norm=True, output="tanh")
    assert expected == LENGSTROM_SPEC


def expected_parameter_count(width: float, blocks: int, output_norm: bool) -> int:
    """Johnson et al.'s network by hand: conv weights + biases, instance-norm scale + shift."""
    c1, c2, c3 = (max(1, round(c * width)) for c in (32, 64, 128))

    def conv(cin, cout, k, norm=True):
        return cin * cout * k * k + cout + (2 * cout if norm else 0)

    return (conv(3, c1, 9) + conv(c1, c2, 3) + conv(c2, c3, 3) + blocks * 2 * conv(c3, c3, 3)
            + conv(c3, c2, 3) + conv(c2, c1, 3) + conv(c1, 3, 9, norm=output_norm))


@pytest.mark.parametrize(("width", "channels"), [(0.25, (8, 16, 32)), (0.3, (10, 19, 38)), (0.5, (16, 32, 64)),
                                                 (1.0, (32, 64, 128))])
def test_width_sets_the_channels_and_parameter_count(width, channels):
    for spec in (TransformerSpec(width=width, residual_blocks=2),
                 TransformerSpec(width=width, residual_blocks=2, padding="same", upsample="transposed",
                                 output_norm=True)):
        net = TransformerNet(spec)
        assert spec.channels == channels
        c1, c2, c3 = channels
        assert net.encoder[0].conv.weight.shape == (c1, 3, 9, 9)
        assert net.encoder[2].conv.weight.shape == (c3, c2, 3, 3)
        assert net.residuals[1].body[1].conv.weight.shape == (c3, c3, 3, 3)
        assert net.decoder[2].conv.weight.shape == (3, c1, 9, 9)
        count = sum(p.numel() for p in net.parameters())
        assert count == expected_parameter_count(width, 2, spec.output_norm)


def test_full_width_network_has_johnsons_parameter_count():
    # 1,679,235 parameters: the figure commonly quoted for the Johnson et al. network with instance norm
    assert sum(p.numel() for p in TransformerNet().parameters()) == 1_679_235


@pytest.mark.parametrize("spec", [NATIVE_SMALL, LENGSTROM_SMALL], ids=["native", "lengstrom"])
def test_gradients_reach_every_parameter_in_training(spec):
    net = small_net(spec).train()
    x = torch.rand(2, 3, 20, 28)
    target = torch.rand(2, 3, 20, 28)
    F.mse_loss(net(x), target).backward()
    # Parameters that cannot affect the output, so their gradient is zero up to rounding:
    # - a conv bias right before an instance norm (the norm subtracts the per-channel mean);
    # - with reflection padding, the shift of each residual block's last norm: a per-channel constant
    #   on the residual path stays constant through reflect-padded convs and is removed by the next norm.
    upsample_bias = "conv.bias" if spec.upsample == "transposed" else "conv.1.bias"
    dead = {f"encoder.{i}.conv.bias" for i in range(3)}
    dead |= {f"residuals.{b}.body.{j}.conv.bias" for b in range(5) for j in range(2)}
    dead |= {f"decoder.{i}.{upsample_bias}" for i in range(2)}
    if spec.output_norm:
        dead.add("decoder.2.conv.bias")
    if spec.padding == "reflect":
        dead |= {f"residuals.{b}.body.1.norm.bias" for b in range(5)}
    grads = dict(net.named_parameters())
    assert dead <= set(grads)
    for name, p in grads.items():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all(), name
    largest = {name: p.grad.abs().max().item() for name, p in grads.items()}
    scale = max(largest.values())
    assert sorted(n for n, g in largest.items() if g < 1e-5 * scale) == sorted(dead)
    assert min(g for n, g in largest.items() if n not in dead) > 1e-4 * scale


def test_spec_rejects_bad_settings():
    with pytest.raises(ImpastoError, match="--width must be positive, got 0"):
        TransformerNet(TransformerSpec(width=0))
    with pytest.raises(ImpastoError, match="unknown padding 'zeros'; choose reflect or same"):
        TransformerNet(TransformerSpec(padding="zeros"))
    with pytest.raises(ImpastoError, match="unknown network setting 'depth'"):
        TransformerSpec.from_dict({"width": 0.5, "depth": 3})


# ----------------------------------------------------------------------------- model files


def test_model_file_round_trips_spec_weights_and_meta(tmp_path):
    net = small_net(LENGSTROM_SMALL, seed=3)
    with torch.no_grad():
        for p in net.parameters():  # non-default norm parameters, so they are checked too
            p.add_(0.1 * torch.randn_like(p))
    meta = {"style": "stripes.png", "epochs": 2, "lr": 1e-3, "layers": ["relu1_2", "relu2_2"], "nested": {"a": None}}
    path = save_model(tmp_path / "sub" / "m.pt", net, meta)
    assert path == tmp_path / "sub" / "m.pt" and path.is_file()
    loaded, loaded_meta = load_model(path)
    assert loaded.spec == LENGSTROM_SMALL
    assert loaded_meta == meta
    assert not loaded.training
    for (k1, v1), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.rand(1, 3, 23, 30)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left beside it


def test_training_checkpoint_holds_a_loadable_model(tmp_path):
    net = small_net(seed=1)
    torch.save({"model": model_payload(net, {"style": "s"}), "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    loaded, meta = load_model(tmp_path / "ckpt.pt")
    assert meta == {"style": "s"}
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))


def test_missing_model_file(tmp_path):
    with pytest.raises(ImpastoError, match="model file not found: .*nope.pt"):
        load_model(tmp_path / "nope.pt")


def test_torch_file_that_is_not_an_impasto_model(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ImpastoError, match=r"other.pth is not an impasto fast-style model \(use `impasto import`"):
        load_model(tmp_path / "other.pth")


def test_random_bytes_are_not_a_model(tmp_path):
    (tmp_path / "junk.pt").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ImpastoError, match=r"cannot read model file .*junk.pt \(\w+\); is it an impasto model\?"):
        load_model(tmp_path / "junk.pt")


def test_newer_model_format_is_refused(tmp_path):
    payload = model_payload(small_net(), {})
    payload["version"] = 99
    torch.save(payload, tmp_path / "new.pt")
    with pytest.raises(ImpastoError, match=r"new.pt was written by a newer impasto \(model format 99\)"):
        load_model(tmp_path / "new.pt")


def test_weights_that_do_not_fit_the_spec(tmp_path):
    payload = model_payload(small_net(), {})
    payload["spec"] = TransformerSpec(width=0.5).to_dict()  # weights are width 0.25
    torch.save(payload, tmp_path / "misfit.pt")
    with pytest.raises(ImpastoError, match=r"misfit.pt: weights do not fit the network \(size mismatch for "):
        load_model(tmp_path / "misfit.pt")


def test_missing_weights_are_reported(tmp_path):
    payload = model_payload(small_net(), {})
    del payload["state_dict"]["decoder.2.conv.bias"]
    torch.save(payload, tmp_path / "partial.pt")
    with pytest.raises(ImpastoError, match=r"partial.pt: weights do not fit the network"):
        load_model(tmp_path / "partial.pt")


class _Touch:
    """Unpickling this object creates a file: it stands for any code a malicious model could run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_model_files_are_loaded_as_data_only(tmp_path):
    marker = tmp_path / "code-ran"
    payload = model_payload(small_net(), {"style": _Touch(marker)})
    torch.save(payload, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(ImpastoError, match=r"cannot read model file .*evil.pt .*is it an impasto model\?"):
        read_payload(tmp_path / "evil.pt")
    assert not marker.exists()
    # the file really does run code when unpickled without weights_only (so the check above means something)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_plain_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"format": FORMAT, "x": _Touch(marker)}, protocol=2))
    with pytest.raises(ImpastoError, match="cannot read model file"):
        load_model(tmp_path / "evil.pkl")
    assert not marker.exists()


# ----------------------------------------------------------------------------- lengstrom importer: reference


def tf_same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's "same" padding along one axis: (before, after)."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def ref_conv(x: torch.Tensor, kernel: np.ndarray, stride: int) -> torch.Tensor:
    """tf.nn.conv2d(padding="SAME") on (C, H, W); `kernel` in TF layout [kh, kw, in, out]."""
    k = kernel.shape[0]
    top, bottom = tf_same_pads(x.shape[1], k, stride)
    left, right = tf_same_pads(x.shape[2], k, stride)
    xp = F.pad(x[None], (left, right, top, bottom))
    w = torch.from_numpy(kernel).double().permute(3, 2, 0, 1)
    return F.conv2d(xp, w, stride=stride)[0]


def ref_conv_transpose(y: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """tf.nn.conv2d_transpose(stride 2, padding="SAME", output 2n x 2m) on (C, n, m); kernel [kh, kw, out, in].

    It is the gradient of a SAME stride-2 conv on a 2n x 2m input, which pads 0 before and 1 after:
    input pixel (2i + ky, 2j + kx) of that conv meets output (i, j) through tap (ky, kx). Scattering
    every y[c, i, j] * W[ky, kx, o, c] there and keeping the first 2n x 2m drops only the padding.
    """
    _, n, m = y.shape
    kh, kw, cout, _ = kernel.shape
    assert tf_same_pads(2 * n, kh, 2)[0] == 0 and tf_same_pads(2 * m, kw, 2)[0] == 0
    w = torch.from_numpy(kernel).double()
    out = torch.zeros(cout, 2 * n + kh - 2, 2 * m + kw - 2, dtype=torch.float64)
    for ky in range(kh):
        for kx in range(kw):
            contribution = torch.einsum("cij,oc->oij", y, w[ky, kx])
            out[:, ky: ky + 2 * n: 2, kx: kx + 2 * m: 2] += contribution
    return out[:, : 2 * n, : 2 * m]


def ref_instance_norm(x: torch.Tensor, shift: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    mean = x.mean(dim=(1, 2), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(1, 2), keepdim=True)
    normalized = (x - mean) / torch.sqrt(var + 1e-3)
    return (torch.from_numpy(scale).double().view(-1, 1, 1) * normalized
            + torch.from_numpy(shift).double().view(-1, 1, 1))


def reference_lengstrom(variables: list[np.ndarray], image: torch.Tensor) -> torch.Tensor:
    """The TensorFlow network on one (3, H, W) image in 0..255; output tanh * 150 + 127.5 (not clipped)."""
    v = variables

    def layer(x, i, stride, relu=True, transpose=False):
        x = ref_conv_transpose(x, v[i]) if transpose else ref_conv(x, v[i], stride)
        x = ref_instance_norm(x, v[i + 1], v[i + 2])
        return torch.relu(x) if relu else x

    x = image.double()
    x = layer(x, 0, 1)
    x = layer(x, 3, 2)
    x = layer(x, 6, 2)
    for b in range(5):
        start = 9 + 6 * b
        x = x + layer(layer(x, start, 1), start + 3, 1, relu=False)
    x = layer(x, 39, 2, transpose=True)
    x = layer(x, 42, 2, transpose=True)
    x = layer(x, 45, 1, relu=False)
    return torch.tanh(x) * 150 + 127.5


def lengstrom_shapes() -> list[list[int]]:
    shapes = []

    def add(kernel):
        shapes.append(kernel)
        channels = kernel[2] if len(shapes) in (40, 43) else kernel[3]  # transposed kernels are [kh, kw, out, in]
        shapes.extend([[channels], [channels]])

    add([9, 9, 3, 32])
    add([3, 3, 32, 64])
    add([3, 3, 64, 128])
    for _ in range(10):
        add([3, 3, 128, 128])
    add([3, 3, 64, 128])  # transposed 128 -> 64
    add([3, 3, 32, 64])  # transposed 64 -> 32
    add([9, 9, 32, 3])
    assert len(shapes) == 48
    return shapes


def write_dump(root: pathlib.Path, seed: int = 0) -> list[np.ndarray]:
    """A synthetic deeplearn.js dump with random values; returns the variables written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    manifest, variables = {}, []
    for i, shape in enumerate(lengstrom_shapes()):
        name = "Variable" if i == 0 else f"Variable_{i}"
        if len(shape) == 4:
            value = rng.normal(0, 1 / math.sqrt(shape[0] * shape[1] * shape[2]), shape)
        elif i % 3 == 1:  # shift
            value = rng.normal(0, 0.5, shape)
        else:  # scale
            value = rng.uniform(0.5, 1.5, shape)
        value = value.astype("<f4")
        value.tofile(root / f"file_{i}")  # file names come from the manifest, not the variable names
        manifest[name] = {"filename": f"file_{i}", "shape": shape}
        variables.append(value)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return variables


def read_dump_independently(root: pathlib.Path) -> list[np.ndarray]:
    manifest = json.loads((root / "manifest.json").read_text())
    out = []
    for i in range(48):
        entry = manifest["Variable" if i == 0 else f"Variable_{i}"]
        data = np.frombuffer((root / entry["filename"]).read_bytes(), dtype="<f4")
        out.append(data.reshape(entry["shape"]).copy())
    return out


@pytest.fixture(scope="module")
def synthetic_dump(tmp_path_factory):
    root = tmp_path_factory.mktemp("dump") / "mystyle"
    return root, write_dump(root)


def test_reference_transpose_matches_tf_definition_as_gradient_of_same_conv():
    # The reference conv2d_transpose is the adjoint of the reference SAME stride-2 conv:
    # <conv(x), y> == <x, conv_transpose(y)>, with the kernel read as [kh, kw, out, in] for the transpose.
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(3, 3, 4, 5, generator=g, dtype=torch.float64).numpy()  # conv: 4 -> 5
    x = torch.randn(4, 10, 14, generator=g, dtype=torch.float64)
    y = torch.randn(5, 5, 7, generator=g, dtype=torch.float64)
    lhs = (ref_conv(x, kernel, 2) * y).sum()
    rhs = (x * ref_conv_transpose(y, kernel)).sum()
    assert ref_conv(x, kernel, 2).shape == (5, 5, 7)
    assert torch.isclose(lhs, rhs, rtol=1e-12)


def test_import_matches_the_reference_network(synthetic_dump):
    root, written = synthetic_dump
    net, meta = import_lengstrom(root)
    assert net.spec == LENGSTROM_SPEC and not net.training
    assert meta["style"] == "mystyle" and meta["source"] == str(root.resolve())
    variables = read_dump_independently(root)
    for a, b in zip(written, variables, strict=True):
        assert np.array_equal(a, b)
    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(1))
    expected = reference_lengstrom(variables, image * 255) / 255
    with torch.no_grad():
        got = net(image[None])[0].double()
    assert got.shape == expected.shape == (3, 32, 48)
    assert expected.std() > 0.05  # a varied output, not a saturated one
    assert (got - expected).abs().max() < 2e-5


def test_import_error_paths(tmp_path, synthetic_dump):
    with pytest.raises(ImpastoError, match=r"has no manifest.json; expected a deeplearn.js dump"):
        import_lengstrom(tmp_path)

    root, _ = synthetic_dump
    manifest = json.loads((root / "manifest.json").read_text())

    def variant(name, change):
        folder = tmp_path / name
        folder.mkdir()
        entries = json.loads(json.dumps(manifest))
        for entry in entries.values():
            entry["filename"] = str(root / entry["filename"])  # absolute paths: share the data files
        change(entries)
        (folder / "manifest.json").write_text(json.dumps(entries))
        return folder

    folder = variant("no-entry", lambda m: m.pop("Variable_17"))
    with pytest.raises(ImpastoError, match=r"manifest.json has no entry for Variable_17; is this a lengstrom"):
        import_lengstrom(folder)

    folder = variant("no-file", lambda m: m["Variable_5"].update(filename="gone"))
    with pytest.raises(ImpastoError, match=r"cannot read .*gone: No such file or directory"):
        import_lengstrom(folder)

    folder = variant("wrong-size", lambda m: m["Variable_3"].update(shape=[3, 3, 32, 63]))
    with pytest.raises(ImpastoError, match=r"file_3 holds 18432 values but Variable_3 has shape \[3, 3, 32, 63\]"):
        import_lengstrom(folder)

    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "manifest.json").write_text("{not json")
    with pytest.raises(ImpastoError, match=r"cannot read .*manifest.json"):
        import_lengstrom(tmp_path / "bad-json")


def test_import_rejects_variables_of_the_wrong_layer_shape(tmp_path):
    root = tmp_path / "swapped"
    write_dump(root)
    manifest = json.loads((root / "manifest.json").read_text())
    # a consistent file (64 * 9 values) but a kernel shape the second layer cannot take
    np.zeros(3 * 3 * 32 * 32, "<f4").tofile(root / "file_3")
    manifest["Variable_3"]["shape"] = [3, 3, 32, 32]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImpastoError, match=r"variables 3..5 have shapes .* which do not fit layer 2 of the network"):
        import_lengstrom(root)


@pytest.mark.parametrize("size", [16, 1])
def test_import_rejects_a_norm_scale_of_the_wrong_size(tmp_path, size):
    root = tmp_path / "short-scale"
    write_dump(root)
    manifest = json.loads((root / "manifest.json").read_text())
    np.full(size, 2.0, "<f4").tofile(root / "file_2")  # Variable_2: the first layer's scale, 32 values expected
    manifest["Variable_2"]["shape"] = [size]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImpastoError, match=r"variables 0..2 have shapes .* which do not fit layer 1 of the network"):
        import_lengstrom(root)


@needs_shared
def test_real_wave_network_matches_the_reference():
    content = next((SHARED / "content" / n for n in ("chelsea.png", "astronaut.png")
                    if (SHARED / "content" / n).is_file()), None)
    if content is None:
        pytest.skip("no content photo in ../shared/data/content")
    with Image.open(content) as im:
        photo = im.convert("RGB").resize((128, 96), Image.BILINEAR)
    image = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()
    root = FAST_STYLE / "wave"
    net, meta = import_lengstrom(root)
    assert meta["style"] == "wave"
    expected = reference_lengstrom(read_dump_independently(root), image * 255) / 255
    with torch.no_grad():
        got = net(image[None])[0].double()
    assert got.shape == (3, 96, 128)
    assert expected.std() > 0.1
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("target", ["file_3", "manifest.json", "new.pt", "sub/new.pt"])
def test_import_never_writes_into_the_network_it_reads(tmp_path, capsys, target):
    """`impasto import DIR -o DIR/...` once replaced a weight file of the dump with the converted model."""
    from impasto.cli import main

    root = tmp_path / "wave"
    write_dump(root)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    assert main(["import", str(root), "-o", str(root / target)]) == 2
    err = capsys.readouterr().err
    assert err == f"impasto: error: -o {root / target} is inside the network's folder {root}; write it elsewhere\n"
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    assert main(["import", str(root), "-o", str(tmp_path / "wave.pt")]) == 0  # beside it is fine
    assert (tmp_path / "wave.pt").is_file()
