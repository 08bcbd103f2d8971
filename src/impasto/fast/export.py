"""Exporting a style network for other runtimes: ONNX (dynamic batch, height and width) or TorchScript.

The exported graph takes (N, 3, H, W) RGB in [0, 1] and returns the stylized images clamped to [0, 1].
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ImpastoError
from ..files import atomic_write
from .transformer import TransformerNet

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
OPSET = 18


class _Clamped(nn.Module):
    def __init__(self, net: TransformerNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.stylize(x)


def export_model(net: TransformerNet, path: str | os.PathLike[str], fmt: str) -> Path:
    """Write a float32 CPU copy of `net` to `path` in format `fmt`, atomically (`net` is left as it is)."""
    if fmt not in FORMATS:
        raise ImpastoError(f"unknown export format {fmt!r}; choose onnx or torchscript")
    module = _Clamped(copy.deepcopy(net).float().cpu().eval())
    example = torch.rand(1, 3, 64, 96)
    return atomic_write(path, lambda tmp: (_onnx if fmt == "onnx" else _torchscript)(module, example, tmp))


def _onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; a clear message beats its ImportError)
    except ImportError:
        raise ImpastoError("ONNX export needs onnx and onnxscript: pip install 'impasto[export]'") from None
    batch, height, width = (torch.export.Dim.DYNAMIC,) * 3
    quiet_logger = logging.getLogger("torch.onnx")
    level = quiet_logger.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quiet_logger.setLevel(logging.ERROR)  # its notes on optional torchvision ops are noise here
        try:
            program = torch.onnx.export(module, (example,), input_names=["image"], output_names=["stylized"],
                                        dynamic_shapes=({0: batch, 2: height, 3: width},), opset_version=OPSET,
                                        dynamo=True, verbose=False)
        finally:
            quiet_logger.setLevel(level)
    assert program is not None
    program.save(str(path))


def _torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice; the format is still what C++ loads
        scripted = torch.jit.script(module)
    scripted.save(str(path))


def onnx_difference(net: TransformerNet, path: str | os.PathLike[str], image: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's output for `path` and PyTorch's, on `image`."""
    try:
        import onnxruntime
    except ImportError:
        raise ImpastoError("checking an ONNX export needs onnxruntime: pip install 'impasto[export]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    with torch.inference_mode():
        ref = copy.deepcopy(net).float().cpu().eval().stylize(image)
    return float((torch.from_numpy(out) - ref).abs().max())
