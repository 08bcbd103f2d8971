"""Model files: a network's spec, weights and provenance in one `torch.save` dict of plain data.

Read back with `weights_only=True`, so a model shared by someone else cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ImpastoError
from ..files import atomic_write
from .transformer import TransformerNet, TransformerSpec

FORMAT = "impasto-fast-style"
VERSION = 1


def model_payload(net: TransformerNet, meta: dict[str, Any]) -> dict[str, Any]:
    """What a model file holds; also embedded in training checkpoints."""
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return {"format": FORMAT, "version": VERSION, "spec": net.spec.to_dict(), "state_dict": state, "meta": meta}


def save_model(path: str | os.PathLike[str], net: TransformerNet, meta: dict[str, Any]) -> Path:
    """Write `net` with `meta` (style, training options, origin) atomically."""
    payload = model_payload(net, meta)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_payload(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dict in a model or checkpoint file, loaded as data only."""
    p = Path(path)
    if not p.is_file():
        raise ImpastoError(f"model file not found: {p}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ImpastoError(f"cannot read model file {p} ({type(e).__name__}); is it an impasto model?") from None
    if isinstance(payload, dict) and "model" in payload and isinstance(payload["model"], dict):
        payload = payload["model"]  # a training checkpoint holds the model beside the optimizer state
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ImpastoError(f"{p} is not an impasto fast-style model (use `impasto import` for other toolkits)")
    if payload.get("version", 0) > VERSION:
        raise ImpastoError(f"{p} was written by a newer impasto (model format {payload['version']})")
    return payload


def network_from_payload(payload: dict[str, Any], source: str) -> TransformerNet:
    net = TransformerNet(TransformerSpec.from_dict(payload["spec"]))
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ImpastoError(f"{source}: weights do not fit the network ({first[-1].strip()})") from None
    return net


def load_model(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[TransformerNet, dict]:
    """A model file's network (in eval mode, on `device`) and its metadata."""
    payload = read_payload(path)
    net = network_from_payload(payload, str(path))
    return net.eval().to(device), dict(payload.get("meta") or {})
