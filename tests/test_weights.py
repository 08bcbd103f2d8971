"""Loading VGG weights: torchvision files, torch.hub downloads, MatConvNet .mat files, bad input.

The layer index tables and the MatConvNet layout below are written out independently of
`impasto.nets` so that a wrong mapping in the package cannot make its own tests agree with it.
MatConvNet facts (from MatConvNet's own `utils/import-caffe.py`, `utils/import-ref-models.sh` and
`utils/simplenn_caffe_deploy.m`): conv filters are stored H x W x in x out, the verydeep models
were imported with the first layer's filters flipped from Caffe's BGR to RGB, and
`normalization.averageImage` is the RGB mean (123.68, 116.779, 103.939); the input is an RGB image
in 0..255 minus that average image.
"""

from __future__ import annotations

import gc
import hashlib
import io
import math
import os
import pathlib
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F

from impasto.errors import ImpastoError, ImpastoWarning
from impasto.nets.vgg import CAFFE_NORMALIZATION, TORCHVISION_NORMALIZATION
from impasto.nets.weights import hub_checkpoint_path, load_vgg, load_vgg_weights

# torchvision's `features` indices of the conv layers, and their output channels.
CONV_NAMES = {
    "vgg16": ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
              "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"],
    "vgg19": ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
              "conv3_4", "conv4_1", "conv4_2", "conv4_3", "conv4_4", "conv5_1", "conv5_2",
              "conv5_3", "conv5_4"],
}
CONV_INDICES = {
    "vgg16": [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
    "vgg19": [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34],
}
CONV_CHANNELS = {
    "vgg16": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
    "vgg19": [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512],
}
OFFICIAL_NAMES = {"vgg16": "vgg16-397923af.pth", "vgg19": "vgg19-dcbb9e9d.pth"}
TV_MEAN = np.array([0.485, 0.456, 0.406])
TV_STD = np.array([0.229, 0.224, 0.225])


# ----------------------------------------------------------------------------- helpers


def torchvision_state(arch: str, n_convs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random torchvision-keyed state dict for the first `n_convs` conv layers of `arch`."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    in_ch = 3
    for index, out_ch in list(zip(CONV_INDICES[arch], CONV_CHANNELS[arch], strict=True))[:n_convs]:
        std = math.sqrt(2.0 / (9 * in_ch))
        state[f"features.{index}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=gen) * std
        state[f"features.{index}.bias"] = torch.randn(out_ch, generator=gen) * 0.1
        in_ch = out_ch
    return state


def save(obj: object, path: pathlib.Path) -> pathlib.Path:
    torch.save(obj, path)
    return path


def assert_weights_match(net, state: dict[str, torch.Tensor], arch: str, n_convs: int) -> None:
    """Every conv of `net` holds exactly the file's `features.{i}` tensors, by name."""
    pairs = list(zip(CONV_NAMES[arch], CONV_INDICES[arch], strict=True))[:n_convs]
    assert net.conv_names == [name for name, _ in pairs]
    for name, index in pairs:
        conv = getattr(net.layers, name)
        assert torch.equal(conv.weight, state[f"features.{index}.weight"]), name
        assert torch.equal(conv.bias, state[f"features.{index}.bias"]), name


def mcn_conv(name: str, kernel: np.ndarray, bias: np.ndarray) -> dict:
    weights = np.empty((1, 2), dtype=object)
    weights[0, 0] = np.asarray(kernel, dtype=np.float32)
    weights[0, 1] = np.asarray(bias, dtype=np.float32).reshape(-1, 1)
    return {"name": name, "type": "conv", "weights": weights,
            "stride": np.array([[1.0, 1.0]]), "pad": np.array([[1.0, 1.0, 1.0, 1.0]])}


def mcn_relu(name: str) -> dict:
    return {"name": name, "type": "relu"}


def mcn_pool(name: str) -> dict:
    return {"name": name, "type": "pool", "method": "max", "pool": np.array([[2.0, 2.0]]),
            "stride": np.array([[2.0, 2.0]]), "pad": np.array([[0.0, 0.0, 0.0, 0.0]])}


def write_mat(path: pathlib.Path, layers: list[dict], average_image: np.ndarray | None,
              where: str = "top") -> pathlib.Path:
    """A file laid out like imagenet-vgg-verydeep-*.mat (`where="meta"`: the newer layout)."""
    cells = np.empty((1, len(layers)), dtype=object)
    for i, layer in enumerate(layers):
        cells[0, i] = layer
    content: dict[str, object] = {"layers": cells}
    if average_image is not None:
        normalization = {"averageImage": average_image, "imageSize": np.array([[224.0, 224, 3]])}
        if where == "top":
            content["normalization"] = normalization
        else:
            content["meta"] = {"normalization": normalization}
    scipy.io.savemat(str(path), content)
    return path


def matconvnet_from_torchvision(state: dict[str, torch.Tensor]) -> list[dict]:
    """MatConvNet layers computing the same function as torchvision-keyed VGG16 up to relu2_1.

    torchvision: RGB x in [0, 1], (x - mean) / std.  MatConvNet: RGB X = 255 x, X - 255 mean.
    So conv1_1's filters are divided by 255 std per input channel; biases are unchanged.
    """
    layers: list[dict] = []
    plan = [("conv1_1", 0), ("relu1_1", None), ("conv1_2", 2), ("relu1_2", None),
            ("pool1", None), ("conv2_1", 5), ("relu2_1", None)]
    for name, index in plan:
        if name.startswith("conv"):
            weight = state[f"features.{index}.weight"].double().numpy()
            if name == "conv1_1":
                weight = weight / (255.0 * TV_STD)[None, :, None, None]
            kernel = weight.transpose(2, 3, 1, 0)  # (out, in, H, W) -> (H, W, in, out)
            layers.append(mcn_conv(name, kernel, state[f"features.{index}.bias"].numpy()))
        elif name.startswith("relu"):
            layers.append(mcn_relu(name))
        else:
            layers.append(mcn_pool(name))
    return layers


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """No test sees the user's weights settings, torch.hub cache, proxies or the internet."""
    for var in ("IMPASTO_WEIGHTS", "IMPASTO_WEIGHTS_URL", "http_proxy", "HTTP_PROXY",
                "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    torch_home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case anything called torch.hub.set_dir
    return torch_home / "hub" / "checkpoints"


@pytest.fixture
def hub_dir(isolated_env: pathlib.Path) -> pathlib.Path:
    return isolated_env


@pytest.fixture
def http_server() -> Iterator[SimpleNamespace]:
    """A local HTTP server: put bytes in `.files[name]`, read `.requests`, fetch `.url + name`."""
    files: dict[str, bytes] = {}
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(files=files, requests=requests,
                              url=f"http://127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ----------------------------------------------------------------------------- torchvision files


def test_torchvision_file_full_vgg16_maps_every_index_and_ignores_classifier(tmp_path):
    state = torchvision_state("vgg16", n_convs=13, seed=1)
    extra = {"classifier.0.weight": torch.randn(8, 4), "classifier.0.bias": torch.randn(8),
             "classifier.6.weight": torch.randn(3, 8), "classifier.6.bias": torch.randn(3)}
    path = save({**state, **extra}, tmp_path / "vgg16.pth")

    net = load_vgg("vgg16", layers=["relu5_3"], weights=path)

    assert_weights_match(net, state, "vgg16", n_convs=13)
    assert net.normalization == TORCHVISION_NORMALIZATION
    loaded, normalization = load_vgg_weights("vgg16", path)
    assert set(loaded) == {f"{n}.{k}" for n in CONV_NAMES["vgg16"] for k in ("weight", "bias")}
    assert normalization == TORCHVISION_NORMALIZATION


def test_legacy_format_file_loads(tmp_path):
    """The official torchvision VGG files (2017) are in torch.save's legacy format, which cannot be
    memory-mapped: the loader falls back to reading them whole."""
    state = torchvision_state("vgg16", n_convs=4, seed=2)
    path = tmp_path / "vgg16-legacy.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:2] == b"\x80\x02"  # a pickle, not a zip archive
    net = load_vgg("vgg16", layers=["relu2_2"], weights=path)
    assert_weights_match(net, state, "vgg16", n_convs=4)


def _peak_rss_during(fn) -> int:
    """Peak resident memory added while fn runs (Linux: VmHWM after resetting it)."""
    def hwm() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    gc.collect()
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    fn()
    return hwm() - before


def test_zip_format_file_reads_only_the_convolutions_it_needs(tmp_path):
    state = torchvision_state("vgg16", n_convs=2, seed=3)
    classifier = {"classifier.0.weight": torch.ones(64, 2**20)}  # 256 MiB that the network never needs
    path = save({**state, **classifier}, tmp_path / "vgg16.pth")
    del classifier
    gc.collect()
    loaded: list = []
    peak = _peak_rss_during(lambda: loaded.append(load_vgg_weights("vgg16", path)))
    assert torch.equal(loaded[0][0]["conv1_2.weight"], state["features.2.weight"])
    assert peak < 64 * 2**20, f"loading took {peak / 2**20:.0f} MiB: the classifier was read"


def test_loaded_weights_outlive_their_file(tmp_path):
    """load_vgg_weights hands out its own tensors: with views of the memory-mapped file, rewriting the file
    while they are alive crashed the process (SIGBUS), so this runs in a subprocess."""
    state = torchvision_state("vgg16", n_convs=2, seed=4)
    path = save(state, tmp_path / "vgg16.pth")
    code = (
        "import sys, torch\n"
        "from impasto.nets import load_vgg_weights\n"
        "loaded, _ = load_vgg_weights('vgg16', sys.argv[1])\n"
        "open(sys.argv[1], 'wb').close()\n"
        "print(float(loaded['conv1_2.weight'].double().sum()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) == pytest.approx(float(state["features.2.weight"].double().sum()), rel=1e-12)


def test_zip_files_are_memory_mapped_and_legacy_files_read_whole(tmp_path, monkeypatch):
    """Where the peak-RSS test above cannot reset the kernel's mark: how torch.load is asked to read."""
    state = torchvision_state("vgg16", n_convs=2, seed=5)
    zip_path = save(state, tmp_path / "zip.pth")
    legacy_path = tmp_path / "legacy.pth"
    torch.save(state, legacy_path, _use_new_zipfile_serialization=False)
    calls: list[bool] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("mmap", False)) or real_load(*a, **kw))
    for path in (zip_path, legacy_path):
        loaded, _ = load_vgg_weights("vgg16", path)
        assert torch.equal(loaded["conv1_2.weight"], state["features.2.weight"])
    assert calls == [True, False]


def test_torchvision_file_vgg19_indices_differ_from_vgg16(tmp_path):
    # up to conv4_1: covers features.16 (conv3_4 in VGG19, pool3 in VGG16) and features.19
    state = torchvision_state("vgg19", n_convs=9, seed=2)
    path = save(state, tmp_path / "vgg19-part.pth")

    net = load_vgg("vgg19", layers=["relu4_1"], weights=path)

    assert_weights_match(net, state, "vgg19", n_convs=9)
    assert torch.equal(net.layers.conv3_4.weight, state["features.16.weight"])
    assert torch.equal(net.layers.conv4_1.weight, state["features.19.weight"])


def test_torchvision_weights_compute_conv_on_imagenet_normalized_rgb(tmp_path):
    state = torchvision_state("vgg16", n_convs=1, seed=3)
    net = load_vgg("vgg16", layers=["conv1_1"], weights=save(state, tmp_path / "w.pth"))
    image = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(0))

    got = net(image)["conv1_1"]

    mean = torch.tensor(TV_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(TV_STD, dtype=torch.float32).view(1, 3, 1, 1)
    want = F.conv2d((image - mean) / std, state["features.0.weight"], state["features.0.bias"],
                    padding=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_impasto_named_keys_load(tmp_path):
    tv = torchvision_state("vgg16", n_convs=3, seed=4)
    names = dict(zip(CONV_INDICES["vgg16"], CONV_NAMES["vgg16"], strict=True))
    own = {}
    for key, value in tv.items():
        _, index, kind = key.split(".")
        own[f"{names[int(index)]}.{kind}"] = value
    path = save(own, tmp_path / "impasto.pt")

    net = load_vgg("vgg16", layers=["relu2_1"], weights=path)

    assert_weights_match(net, tv, "vgg16", n_convs=3)


def test_state_dict_wrapped_in_checkpoint_loads(tmp_path):
    state = torchvision_state("vgg16", n_convs=2, seed=5)
    path = save({"state_dict": state, "epoch": 7}, tmp_path / "checkpoint.pth")

    net = load_vgg("vgg16", layers=["relu1_2"], weights=path)

    assert_weights_match(net, state, "vgg16", n_convs=2)


def test_weights_format_caffe_and_forced_torchvision(tmp_path):
    state = torchvision_state("vgg16", n_convs=2, seed=6)
    path = save(state, tmp_path / "w.pth")
    net = load_vgg("vgg16", layers=["relu1_2"], weights=path, weights_format="caffe")
    assert net.normalization == CAFFE_NORMALIZATION
    assert_weights_match(net, state, "vgg16", n_convs=2)

    # a .mat suffix would mean MatConvNet under "auto"; an explicit format wins
    odd = save(state, tmp_path / "really-a-torch-file.mat")
    net = load_vgg("vgg16", layers=["relu1_2"], weights=odd, weights_format="torchvision")
    assert net.normalization == TORCHVISION_NORMALIZATION
    assert_weights_match(net, state, "vgg16", n_convs=2)


# ----------------------------------------------------------------------------- IMPASTO_WEIGHTS


def test_impasto_weights_env_is_used_when_weights_is_none(tmp_path, monkeypatch):
    state = torchvision_state("vgg16", n_convs=2, seed=7)
    path = save(state, tmp_path / "from-env.pth")
    monkeypatch.setenv("IMPASTO_WEIGHTS", str(path))

    net = load_vgg("vgg16", layers=["relu1_2"])

    assert_weights_match(net, state, "vgg16", n_convs=2)


def test_explicit_weights_beat_the_env(tmp_path, monkeypatch):
    state = torchvision_state("vgg16", n_convs=2, seed=8)
    path = save(state, tmp_path / "explicit.pth")
    monkeypatch.setenv("IMPASTO_WEIGHTS", str(tmp_path / "does-not-exist.pth"))

    net = load_vgg("vgg16", layers=["relu1_2"], weights=path)

    assert_weights_match(net, state, "vgg16", n_convs=2)


def test_impasto_weights_env_missing_file_is_reported(tmp_path, monkeypatch):
    missing = tmp_path / "gone.pth"
    monkeypatch.setenv("IMPASTO_WEIGHTS", str(missing))
    with pytest.raises(ImpastoError, match="weights file not found") as info:
        load_vgg("vgg16", layers=["relu1_1"])
    assert str(missing) in str(info.value)


def test_impasto_weights_env_random(monkeypatch):
    monkeypatch.setenv("IMPASTO_WEIGHTS", "random")
    with pytest.warns(ImpastoWarning, match="random"):
        net = load_vgg("vgg16", layers=["relu1_1"])
    assert torch.count_nonzero(net.layers.conv1_1.weight) > 0


# ----------------------------------------------------------------------------- random weights


def test_random_weights_warn_and_are_he_initialized():
    with pytest.warns(ImpastoWarning, match="random"):
        net = load_vgg("vgg19", layers=["relu4_1"], weights="random")

    assert net.normalization == TORCHVISION_NORMALIZATION
    # in != out for these layers, so fan-in (9 * in) and fan-out (9 * out) give different stds
    for name, fan_in, tolerance in (("conv2_1", 9 * 64, 0.02), ("conv4_1", 9 * 256, 0.01)):
        weight = getattr(net.layers, name).weight
        assert weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=tolerance), name
        assert abs(weight.mean().item()) < 0.05 * math.sqrt(2.0 / fan_in), name
    for name in net.conv_names:
        assert torch.count_nonzero(getattr(net.layers, name).bias) == 0, name


# ----------------------------------------------------------------------------- torch.hub download


def served_file(state: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    return data, f"vgg16-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def test_download_goes_into_hub_cache_and_is_reused(http_server, hub_dir, monkeypatch):
    state = torchvision_state("vgg16", n_convs=2, seed=9)
    data, name = served_file(state)
    http_server.files[name] = data
    monkeypatch.setenv("IMPASTO_WEIGHTS_URL", http_server.url + name)
    cached = hub_dir / name
    assert hub_checkpoint_path("vgg16") == cached

    net = load_vgg("vgg16", layers=["relu1_2"])

    assert_weights_match(net, state, "vgg16", n_convs=2)
    assert cached.read_bytes() == data
    assert http_server.requests == [f"/{name}"]
    assert sorted(os.listdir(hub_dir)) == [name]  # no partial download left behind

    again = load_vgg("vgg16", layers=["relu1_2"])

    assert_weights_match(again, state, "vgg16", n_convs=2)
    assert len(http_server.requests) == 1


def test_download_with_wrong_hash_is_corrupt_and_not_cached(http_server, hub_dir, monkeypatch):
    data, _ = served_file(torchvision_state("vgg16", n_convs=2, seed=10))
    assert not hashlib.sha256(data).hexdigest().startswith("00000000")
    name = "vgg16-00000000.pth"
    http_server.files[name] = data
    monkeypatch.setenv("IMPASTO_WEIGHTS_URL", http_server.url + name)

    with pytest.raises(ImpastoError, match="corrupt"):
        load_vgg("vgg16", layers=["relu1_2"])

    assert http_server.requests == [f"/{name}"]
    assert not (hub_dir / name).exists()
    assert not hub_dir.exists() or os.listdir(hub_dir) == []


def test_download_http_error_is_an_impasto_error(http_server, hub_dir, monkeypatch):
    url = http_server.url + "vgg16-397923af.pth"  # the server has no such file: 404
    monkeypatch.setenv("IMPASTO_WEIGHTS_URL", url)

    with pytest.raises(ImpastoError) as info:
        load_vgg("vgg16", layers=["relu1_1"])

    assert url in str(info.value)
    assert not (hub_dir / "vgg16-397923af.pth").exists()


def test_offline_message_says_what_to_download_and_where(hub_dir, monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/vgg16-397923af.pth"
        monkeypatch.setenv("IMPASTO_WEIGHTS_URL", url)
        with pytest.raises(ImpastoError) as info:
            load_vgg("vgg16", layers=["relu1_1"])

    message = str(info.value)
    cached = hub_dir / "vgg16-397923af.pth"
    assert url in message
    assert str(cached) in message
    assert "download" in message
    assert "IMPASTO_WEIGHTS" in message
    assert not cached.exists()


def test_official_file_in_hub_cache_is_used_without_network(hub_dir, monkeypatch):
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download although the file is cached")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    state = torchvision_state("vgg19", n_convs=1, seed=11)
    cached = hub_dir / OFFICIAL_NAMES["vgg19"]
    assert hub_checkpoint_path("vgg19") == cached
    assert hub_checkpoint_path("vgg16") == hub_dir / OFFICIAL_NAMES["vgg16"]
    cached.parent.mkdir(parents=True)
    save(state, cached)

    net = load_vgg("vgg19", layers=["relu1_1"])

    assert_weights_match(net, state, "vgg19", n_convs=1)
    assert net.normalization == TORCHVISION_NORMALIZATION


# ----------------------------------------------------------------------------- bad files


def test_text_file_named_pth(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_text("<html>404 Not Found</html>\n")
    with pytest.raises(ImpastoError, match="not a PyTorch state dict") as info:
        load_vgg("vgg16", layers=["relu1_1"], weights=path)
    assert str(path) in str(info.value)


def test_wrong_shapes_name_the_key_and_both_shapes(tmp_path):
    state = {"features.0.weight": torch.randn(32, 3, 3, 3), "features.0.bias": torch.randn(32),
             "features.2.weight": torch.randn(64, 32, 3, 3), "features.2.bias": torch.randn(64)}
    path = save(state, tmp_path / "narrow.pth")
    with pytest.raises(ImpastoError) as info:
        load_vgg("vgg16", layers=["relu1_2"], weights=path)
    message = str(info.value)
    assert "conv1_1.weight" in message
    assert "(32, 3, 3, 3)" in message
    assert "(64, 3, 3, 3)" in message


def test_vgg16_file_for_vgg19_reports_missing_layer(tmp_path):
    path = save(torchvision_state("vgg16", n_convs=7, seed=12), tmp_path / "vgg16.pth")
    with pytest.raises(ImpastoError, match=r"conv3_4\.weight.*vgg19"):
        load_vgg("vgg19", layers=["relu3_4"], weights=path)


def test_file_with_more_layers_than_the_network(tmp_path):
    state = {"features.0.weight": torch.randn(64, 3, 3, 3), "features.40.weight": torch.randn(1)}
    path = save(state, tmp_path / "big.pth")
    with pytest.raises(ImpastoError, match="more layers than vgg16"):
        load_vgg("vgg16", layers=["relu1_1"], weights=path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"features.0.weight": "not a tensor"}, "state dict of tensors"),
        ([torch.zeros(3)], "state dict of tensors"),
        ({"encoder.0.weight": torch.zeros(3)}, "no VGG convolution weights"),
    ],
    ids=["non-tensor-value", "list", "no-vgg-keys"],
)
def test_files_that_are_not_vgg_state_dicts(tmp_path, content, message):
    path = save(content, tmp_path / "other.pth")
    with pytest.raises(ImpastoError, match=message):
        load_vgg("vgg16", layers=["relu1_1"], weights=path)


def test_missing_path(tmp_path):
    path = tmp_path / "nowhere" / "vgg19.pth"
    with pytest.raises(ImpastoError, match="weights file not found") as info:
        load_vgg("vgg19", weights=path)
    assert str(path) in str(info.value)


def test_mat_without_layers(tmp_path):
    path = tmp_path / "not-a-net.mat"
    scipy.io.savemat(str(path), {"something": np.zeros((2, 2))})
    with pytest.raises(ImpastoError, match="no 'layers'"):
        load_vgg("vgg19", layers=["relu1_1"], weights=path)


def test_garbage_mat(tmp_path):
    path = tmp_path / "garbage.mat"
    path.write_bytes(b"\x00\x01 this is not MATLAB " * 20)
    with pytest.raises(ImpastoError, match="cannot read MatConvNet file"):
        load_vgg("vgg19", layers=["relu1_1"], weights=path)


def test_unknown_arch():
    with pytest.raises(ImpastoError, match="unknown network 'vgg11'.*vgg19"):
        load_vgg("vgg11", weights="random")
    with pytest.raises(ImpastoError, match="unknown network"):
        load_vgg_weights("resnet50")


def test_unknown_weights_format(tmp_path):
    path = save(torchvision_state("vgg16", n_convs=1), tmp_path / "w.pth")
    with pytest.raises(ImpastoError, match="unknown weights format 'onnx'.*matconvnet"):
        load_vgg("vgg16", layers=["relu1_1"], weights=path, weights_format="onnx")


# ----------------------------------------------------------------------------- malicious pickles


class TouchOnLoad:
    """Unpickling this without weights_only creates `marker`: a harmless stand-in for an exploit."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (self.marker,))


def _write_torch_save(obj: object, path: pathlib.Path) -> None:
    torch.save(obj, path)


def _write_plain_pickle(obj: object, path: pathlib.Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _unsafe_torch_load(path: pathlib.Path) -> None:
    torch.load(path, weights_only=False)


def _unsafe_pickle_load(path: pathlib.Path) -> None:
    pickle.loads(path.read_bytes())


@pytest.mark.parametrize(
    ("write", "unsafe_load"),
    [(_write_torch_save, _unsafe_torch_load), (_write_plain_pickle, _unsafe_pickle_load)],
    ids=["torch.save", "plain-pickle"],
)
def test_code_in_a_pickle_is_never_run(tmp_path, write, unsafe_load):
    marker = tmp_path / "pwned"
    payload = {"features.0.weight": TouchOnLoad(marker), "features.0.bias": torch.zeros(64)}
    path = tmp_path / "evil.pth"
    write(payload, path)

    with pytest.raises(ImpastoError, match="not a PyTorch state dict"):
        load_vgg("vgg16", layers=["relu1_1"], weights=path)
    assert not marker.exists()

    unsafe_load(path)  # control: the payload is live, so the check above means something
    assert marker.exists()


# ----------------------------------------------------------------------------- MatConvNet


MEAN_PIXEL = np.array([123.68, 116.779, 103.939])  # RGB, as in imagenet-vgg-verydeep-*.mat


@pytest.mark.parametrize("where", ["top", "meta"])
def test_matconvnet_reads_conv_layers_biases_and_mean_pixel(tmp_path, where):
    rng = np.random.default_rng(0)
    k11, b11 = rng.normal(0, 0.01, (3, 3, 3, 64)), rng.normal(0, 1, 64)
    k12, b12 = rng.normal(0, 0.05, (3, 3, 64, 64)), rng.normal(0, 1, 64)
    layers = [mcn_conv("conv1_1", k11, b11), mcn_relu("relu1_1"),
              mcn_conv("conv1_2", k12, b12), mcn_relu("relu1_2"), mcn_pool("pool1"),
              mcn_conv("fc6", rng.normal(size=(2, 2, 64, 5)), np.zeros(5)),  # fc: type conv
              {"name": "prob", "type": "softmax"}]
    # a full average image (as in the real file) whose per-channel means are MEAN_PIXEL
    wiggle = rng.normal(0, 5, (4, 5, 1)) * np.array([1.0, -1.0, 0.5])
    average = MEAN_PIXEL + wiggle - wiggle.mean(axis=(0, 1))
    path = write_mat(tmp_path / "imagenet-vgg-verydeep-16.mat", layers, average, where)

    state, normalization = load_vgg_weights("vgg16", path)

    assert set(state) == {"conv1_1.weight", "conv1_1.bias", "conv1_2.weight", "conv1_2.bias"}
    np.testing.assert_array_equal(state["conv1_1.bias"].numpy(), b11.astype(np.float32))
    np.testing.assert_array_equal(state["conv1_2.bias"].numpy(), b12.astype(np.float32))
    assert state["conv1_2.weight"].dtype == torch.float32
    # out/in channels land in the right place, whichever way each 3x3 filter is oriented
    expected = torch.from_numpy(k12.astype(np.float32)).permute(3, 2, 0, 1)
    got = state["conv1_2.weight"]
    assert torch.equal(got, expected) or torch.equal(got, expected.transpose(2, 3))
    assert normalization.scale == 255.0

    net = load_vgg("vgg16", layers=["relu1_2"], weights=path)
    # the mean pixel maps to 0 and one grey level above it to 1, in every channel
    pixel = torch.tensor(MEAN_PIXEL / 255.0, dtype=torch.float32).view(1, 3, 1, 1)
    torch.testing.assert_close(net.normalize(pixel.expand(1, 3, 2, 3)),
                               torch.zeros(1, 3, 2, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(net.normalize(pixel + 1 / 255), torch.ones(1, 3, 1, 1),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(net.layers.conv1_1.bias, torch.from_numpy(b11).float())
    assert net(torch.rand(1, 3, 16, 16))["relu1_2"].shape == (1, 64, 16, 16)


# The tests below pin the real MatConvNet convention (see the module docstring):
# filters are (H, W, in, out) and the input is RGB * 255 minus the RGB averageImage.


def test_matconvnet_file_is_the_same_function_as_its_torchvision_source(tmp_path):
    tv = torchvision_state("vgg16", n_convs=3, seed=13)
    tv_path = save(tv, tmp_path / "vgg16.pth")
    mat_path = write_mat(tmp_path / "vgg16.mat", matconvnet_from_torchvision(tv),
                         (255.0 * TV_MEAN).reshape(1, 1, 3))
    layers = ["relu1_2", "relu2_1"]
    image = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(1))  # not square

    want = load_vgg("vgg16", layers=layers, weights=tv_path)(image)
    got = load_vgg("vgg16", layers=layers, weights=mat_path)(image)

    for name in layers:
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4 * scale)


def test_matconvnet_filters_are_height_width_in_out(tmp_path):
    rng = np.random.default_rng(1)
    kernels = {"conv1_1": rng.normal(size=(3, 3, 3, 64)),
               "conv1_2": rng.normal(size=(3, 3, 64, 64))}
    layers = [mcn_conv("conv1_1", kernels["conv1_1"], np.zeros(64)), mcn_relu("relu1_1"),
              mcn_conv("conv1_2", kernels["conv1_2"], np.zeros(64)), mcn_relu("relu1_2")]
    path = write_mat(tmp_path / "net.mat", layers, MEAN_PIXEL.reshape(1, 1, 3))

    state, _ = load_vgg_weights("vgg16", path)

    # conv1_2 is free of any colour-order question: weight[o, i, h, w] == kernel[h, w, i, o]
    want = torch.from_numpy(kernels["conv1_2"].astype(np.float32)).permute(3, 2, 0, 1)
    assert torch.equal(state["conv1_2.weight"], want)


def test_matconvnet_input_is_rgb_0_255_minus_average_image(tmp_path):
    rng = np.random.default_rng(2)
    kernel = rng.normal(0, 0.01, (3, 3, 3, 8))
    kernel = (kernel + kernel.transpose(1, 0, 2, 3)) / 2  # symmetric in H/W: layout-independent
    bias = rng.normal(0, 1, 8)
    conv = mcn_conv("conv1_1", np.pad(kernel, ((0, 0), (0, 0), (0, 0), (0, 56))),
                    np.pad(bias, (0, 56)))
    path = write_mat(tmp_path / "net.mat", [conv, mcn_relu("relu1_1")],
                     MEAN_PIXEL.reshape(1, 1, 3))
    image = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(2))

    got = load_vgg("vgg16", layers=["conv1_1"], weights=path)(image)["conv1_1"][0, :8]

    # vl_nnconv by definition: y[o, r, c] = b[o] + sum_{h, w, i} K[h, w, i, o] X[r + h, c + w, i]
    x = image[0].double().permute(1, 2, 0) * 255 - torch.from_numpy(MEAN_PIXEL)  # H, W, RGB
    padded = F.pad(x.permute(2, 0, 1), (1, 1, 1, 1)).permute(1, 2, 0)
    k = torch.from_numpy(kernel)
    want = torch.from_numpy(bias).view(8, 1, 1).expand(8, 12, 10).clone()
    for h in range(3):
        for w in range(3):
            want += torch.einsum("rci,io->orc", padded[h:h + 12, w:w + 10], k[h, w])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
