"""VGG weights: torchvision files (downloaded through torch.hub), local files, MatConvNet .mat.

Every format is read as data (`torch.load(weights_only=True)`, `scipy.io.loadmat`), never as code.
Each format brings its own input convention, returned as a `Normalization`.
"""

from __future__ import annotations

import math
import os
import urllib.error
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import ImpastoError, warn
from .vgg import (
    _CONFIGS,
    CAFFE_NORMALIZATION,
    MATCONVNET_NORMALIZATION,
    TORCHVISION_NORMALIZATION,
    VGG_LAYER_NAMES,
    Normalization,
    VGGFeatures,
)

TORCHVISION_URLS = {
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
}
FORMATS = ("auto", "torchvision", "caffe", "matconvnet")
WEIGHTS_ENV = "IMPASTO_WEIGHTS"
URL_ENV = "IMPASTO_WEIGHTS_URL"  # a mirror of the torchvision file, e.g. on a local network

StateDict = dict[str, torch.Tensor]


def load_vgg(
    arch: str = "vgg19",
    layers: Iterable[str] = ("relu5_1",),
    pooling: str = "max",
    weights: str | os.PathLike[str] | None = None,
    weights_format: str = "auto",
    device: torch.device | str = "cpu",
) -> VGGFeatures:
    """Build a VGG feature stack cut after the deepest of `layers` and load its weights.

    `weights`: None for the official torchvision file (from `IMPASTO_WEIGHTS`, torch.hub's cache,
    or downloaded), a path to a .pth/.pt/.mat file, or "random" for He-initialized weights.
    """
    state, normalization = _load_weights(arch, weights, weights_format)
    net = VGGFeatures(arch, layers, pooling, normalization)
    _assign(net, state)  # copies: the file's memory map goes with `state`
    return net.to(device)


def load_vgg_weights(
    arch: str, weights: str | os.PathLike[str] | None = None, weights_format: str = "auto"
) -> tuple[StateDict, Normalization]:
    """The convolution weights, keyed `conv1_1.weight` ..., and the input normalization they expect.
    The tensors are the caller's own, not views of a memory-mapped file that may change under them."""
    state, normalization = _load_weights(arch, weights, weights_format)
    return {k: v.clone() for k, v in state.items()}, normalization


def _load_weights(
    arch: str, weights: str | os.PathLike[str] | None, weights_format: str
) -> tuple[StateDict, Normalization]:
    """`load_vgg_weights` without the copy: tensors of a zip-format file still read from the file."""
    if arch not in _CONFIGS:
        raise ImpastoError(f"unknown network {arch!r}; choose one of {', '.join(_CONFIGS)}")
    if weights_format not in FORMATS:
        raise ImpastoError(f"unknown weights format {weights_format!r}; choose one of {', '.join(FORMATS)}")
    source = weights if weights is not None else os.environ.get(WEIGHTS_ENV) or None
    if source is not None and str(source) == "random":
        warn("using random VGG weights: results will not look like real style transfer")
        return random_vgg_weights(arch), TORCHVISION_NORMALIZATION
    path = Path(source) if source is not None else _torchvision_file(arch)
    if not path.is_file():
        hint = f" (from {WEIGHTS_ENV})" if weights is None and source is not None else ""
        if path.is_dir():
            raise ImpastoError(f"weights path {path}{hint} is a directory; give the weights file in it")
        raise ImpastoError(f"weights file not found: {path}{hint}")
    fmt = weights_format
    if fmt == "auto":
        fmt = "matconvnet" if path.suffix.lower() == ".mat" else "torchvision"
    if fmt == "matconvnet":
        return _read_matconvnet(path, arch)
    state = _read_state_dict(path, arch)
    return state, CAFFE_NORMALIZATION if fmt == "caffe" else TORCHVISION_NORMALIZATION


def hub_checkpoint_path(arch: str) -> Path:
    """Where torch.hub keeps (or will keep) the official torchvision file for `arch`."""
    url = os.environ.get(URL_ENV) or TORCHVISION_URLS[arch]
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _torchvision_file(arch: str) -> Path:
    """The official file from torch.hub's cache, downloading it (with progress and hash check) if absent."""
    url = os.environ.get(URL_ENV) or TORCHVISION_URLS[arch]
    path = hub_checkpoint_path(arch)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=_hash_prefix(url), progress=True)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise ImpastoError(
            f"cannot download {arch} weights ({reason}); download {url} and put it at {path}, "
            f"or pass --weights PATH (or set {WEIGHTS_ENV})"
        ) from None
    except RuntimeError as e:  # torch.hub's hash mismatch
        raise ImpastoError(f"downloaded {arch} weights are corrupt ({e}); try again") from None
    return path


def _hash_prefix(url: str) -> str | None:
    """torch.hub's convention: the file name ends in -<first hex digits of its SHA-256>."""
    stem = os.path.basename(url).split(".")[0]
    tail = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    return tail if len(tail) >= 6 and all(c in "0123456789abcdef" for c in tail) else None


def _torch_load(path: Path) -> object:
    """torch.load as data, memory-mapped where the file allows it (torch.save's zip format): then only
    the convolutions the network copies are read, not the classifier's 470 MB in a full VGG19 file.
    The official torchvision files predate that format, so they are read whole."""
    mmap = zipfile.is_zipfile(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _read_state_dict(path: Path, arch: str) -> StateDict:
    try:
        raw = _torch_load(path)
    except Exception as e:  # pickle, zip and unpickler errors all mean "not a weights file"
        raise ImpastoError(f"cannot read weights file {path}: not a PyTorch state dict ({type(e).__name__})") from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ImpastoError(f"weights file {path} does not hold a state dict of tensors")
    return _rename_torchvision(raw, arch, path)


def _rename_torchvision(raw: dict[str, torch.Tensor], arch: str, path: Path) -> StateDict:
    """Accept torchvision keys (`features.0.weight`) or impasto's own (`conv1_1.weight`)."""
    names = VGG_LAYER_NAMES[arch]
    state: StateDict = {}
    for key, value in raw.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit():
            index = int(parts[1])
            if index >= len(names):
                raise ImpastoError(f"weights file {path} has more layers than {arch}; is it another network?")
            state[f"{names[index]}.{parts[2]}"] = value
        elif len(parts) == 2 and parts[0] in names:
            state[key] = value
    if not state:
        raise ImpastoError(f"weights file {path} has no VGG convolution weights (features.N.weight)")
    return state


def _read_matconvnet(path: Path, arch: str) -> tuple[StateDict, Normalization]:
    """MatConvNet's imagenet-vgg-verydeep-*.mat: kernels stored (H, W, in, out); RGB 0-255 input.

    MatConvNet's importer reorders Caffe's blobs to (H, W, in, out) and flips the first layer to RGB
    (utils/import-caffe.py, --caffe-variant=caffe), so the input is RGB * 255 minus `averageImage`.
    """
    import scipy.io

    try:
        data = scipy.io.loadmat(str(path), struct_as_record=True)
    except Exception as e:
        raise ImpastoError(f"cannot read MatConvNet file {path} ({type(e).__name__})") from None
    if "layers" not in data:
        raise ImpastoError(f"{path} is not a MatConvNet network (no 'layers')")
    try:
        return _matconvnet_layers(data), _matconvnet_normalization(data)
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise ImpastoError(f"MatConvNet file {path} is malformed ({e})") from None


def _matconvnet_layers(data: dict) -> StateDict:
    import numpy as np

    state: StateDict = {}
    for cell in data["layers"].ravel():
        layer = cell.ravel()[0]
        name = str(np.asarray(layer["name"]).ravel()[0])
        kind = str(np.asarray(layer["type"]).ravel()[0])
        if kind != "conv" or not name.startswith("conv"):
            continue
        kernel, bias = (np.asarray(w) for w in np.asarray(layer["weights"]).ravel()[:2])
        state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).float()
        state[f"{name}.bias"] = torch.from_numpy(bias.ravel().copy()).float()
    return state


def _matconvnet_normalization(data: dict) -> Normalization:
    import numpy as np

    for holder in (data.get("normalization"), _field(data.get("meta"), "normalization")):
        average = _field(holder, "averageImage")
        values = None if average is None else np.asarray(average, dtype=np.float64)
        if values is not None and values.size and values.size % 3 == 0:
            rgb = values.reshape(-1, 3).mean(axis=0)
            return Normalization(mean=(float(rgb[0]), float(rgb[1]), float(rgb[2])), scale=255.0)
    return MATCONVNET_NORMALIZATION


def _field(struct: object, name: str) -> object | None:
    import numpy as np

    if struct is None:
        return None
    arr = np.asarray(struct)
    if arr.dtype.names is None or name not in arr.dtype.names:
        return None
    return arr.ravel()[0][name]


def random_vgg_weights(arch: str, generator: torch.Generator | None = None) -> StateDict:
    """He-initialized (fan-in) weights and zero biases: enough to eyeball a pipeline, not to use."""
    state: StateDict = {}
    in_ch = 3
    convs = [n for n in VGG_LAYER_NAMES[arch] if n.startswith("conv")]
    for name, out_ch in zip(convs, (c for c in _CONFIGS[arch] if c != "M"), strict=True):
        std = math.sqrt(2.0 / (in_ch * 9))
        state[f"{name}.weight"] = torch.randn(int(out_ch), in_ch, 3, 3, generator=generator) * std
        state[f"{name}.bias"] = torch.zeros(int(out_ch))
        in_ch = int(out_ch)
    return state


def _assign(net: VGGFeatures, state: StateDict) -> None:
    """Copy weights into the (possibly cut) network, checking that every needed tensor fits."""
    for name in net.conv_names:
        conv = getattr(net.layers, name)
        for kind in ("weight", "bias"):
            key = f"{name}.{kind}"
            if key not in state:
                raise ImpastoError(f"weights have no {key}; is this a {net.arch} file?")
            target = getattr(conv, kind)
            value = state[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ImpastoError(
                    f"weights for {key} have shape {tuple(value.shape)}, {net.arch} needs "
                    f"{tuple(target.shape)}; is this a {net.arch} file?"
                )
            with torch.no_grad():
                target.copy_(value)
