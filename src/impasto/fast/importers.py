"""Pretrained networks from other toolkits, converted to impasto models that compute the same function.

lengstrom/fast-style-transfer (TensorFlow) networks as dumped for deeplearn.js: a folder with
`manifest.json` naming `Variable`, `Variable_1`, ... and one raw little-endian float32 file each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ImpastoError
from .transformer import TransformerNet, TransformerSpec

LENGSTROM_SPEC = TransformerSpec(padding="same", upsample="transposed", norm_eps=1e-3, output_norm=True,
                                 output="tanh")
LENGSTROM_VARIABLES = 48


def read_deeplearnjs(directory: str | os.PathLike[str]) -> list[np.ndarray]:
    """The variables of a deeplearn.js dump, in index order, each in its manifest shape."""
    root = Path(directory)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise ImpastoError(f"{root} has no manifest.json; expected a deeplearn.js dump of a fast-style network")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise ImpastoError(f"cannot read {manifest_path}: {e}") from None
    arrays = []
    for i in range(LENGSTROM_VARIABLES):
        name = "Variable" if i == 0 else f"Variable_{i}"
        entry = manifest.get(name) if isinstance(manifest, dict) else None
        if not isinstance(entry, dict) or "filename" not in entry or "shape" not in entry:
            raise ImpastoError(f"{manifest_path} has no entry for {name}; is this a lengstrom fast-style network?")
        try:
            shape = [int(s) for s in entry["shape"]]
        except (TypeError, ValueError):
            raise ImpastoError(f"{manifest_path}: {name} has shape {entry['shape']!r}, not a list of sizes") from None
        arrays.append(_read_variable(root / str(entry["filename"]), shape, name))
    return arrays


def _read_variable(path: Path, shape: list[int], name: str) -> np.ndarray:
    try:
        raw = np.fromfile(path, dtype="<f4")
    except OSError as e:
        raise ImpastoError(f"cannot read {path}: {e.strerror}") from None
    if raw.size != int(np.prod(shape)):
        raise ImpastoError(f"{path} holds {raw.size} values but {name} has shape {shape}")
    return raw.reshape(shape)


def import_lengstrom(directory: str | os.PathLike[str]) -> tuple[TransformerNet, dict[str, Any]]:
    """A lengstrom/fast-style-transfer network as a TransformerNet, and metadata saying where it came from."""
    variables = read_deeplearnjs(directory)
    net = TransformerNet(LENGSTROM_SPEC)
    layers = [*net.encoder, *(layer for block in net.residuals for layer in block.body), *net.decoder]  # type: ignore[union-attr]
    with torch.no_grad():
        for index, layer in enumerate(layers):
            kernel, shift, scale = variables[3 * index: 3 * index + 3]
            if kernel.ndim != 4:
                raise ImpastoError(f"{directory}: variable {3 * index} has shape {list(kernel.shape)}, "
                                   f"not a convolution kernel for layer {index + 1}")
            conv, norm = layer.conv, layer.norm
            # TF conv kernels are [kh, kw, in, out], transposed ones [kh, kw, out, in]; torch's Conv2d
            # wants (out, in, kh, kw) and ConvTranspose2d (in, out, kh, kw): the same permutation.
            weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            if weight.shape != conv.weight.shape or not scale.size == shift.size == norm.weight.numel():
                raise ImpastoError(f"{directory}: variables {3 * index}..{3 * index + 2} have shapes "
                                   f"{[list(v.shape) for v in (kernel, shift, scale)]}, which do not fit "
                                   f"layer {index + 1} of the network")
            conv.weight.copy_(weight)
            conv.bias.zero_()  # TF's layers have no bias: the instance norm's shift takes its place
            norm.weight.copy_(torch.from_numpy(scale.reshape(-1).copy()))
            norm.bias.copy_(torch.from_numpy(shift.reshape(-1).copy()))
    meta = {"imported_from": "lengstrom/fast-style-transfer (deeplearn.js dump)",
            "source": str(Path(directory).resolve()), "style": Path(directory).resolve().name}
    return net.eval(), meta

