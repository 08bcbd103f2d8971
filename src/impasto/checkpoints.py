"""Files a run leaves behind while it works: checkpoint images and resumable state.

Both are callbacks on the engines' progress reports; state files are plain tensors and numbers,
written atomically and read back with `weights_only=True`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import images
from .errors import ImpastoError
from .files import atomic_write

STATE_FILE = "state.pt"


def save_state(directory: str | os.PathLike[str], state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write the resumable state and the run's options (to check a resume against) atomically."""
    payload = {"state": state, "meta": meta}
    return atomic_write(Path(directory) / STATE_FILE, lambda tmp: torch.save(payload, tmp))


def load_state(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read what `save_state` wrote: (state, meta)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise ImpastoError(f"no saved state to resume in {directory} (expected {path})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        state, meta = payload["state"], payload["meta"]
        if not (isinstance(meta, dict) and {"stage", "loop"} <= set(state)
                and {"image", "optimizer", "iteration", "best_image", "best_loss"} <= set(state["loop"])):
            raise KeyError("incomplete")
        return state, meta
    except Exception as e:
        raise ImpastoError(f"cannot read saved state {path} ({type(e).__name__}); is it from impasto?") from None


def checkpoint_path(pattern: str, iteration: int) -> str:
    """Fill a checkpoint path pattern: `%s`/`%d` (as in neural_style.py) or `{iteration}`."""
    if "{" in pattern:
        return pattern.format(iteration=iteration, i=iteration)
    if "%" in pattern:
        return pattern % iteration
    root, ext = os.path.splitext(pattern)
    return f"{root}_{iteration:05d}{ext or '.png'}"


def check_pattern(pattern: str) -> None:
    try:
        first, second = checkpoint_path(pattern, 1), checkpoint_path(pattern, 2)
    except (KeyError, IndexError, ValueError, TypeError):
        first = second = ""
    if first == second or any(ord(c) < 32 for c in first):  # '%.0s' drops the number, '%c' makes control codes
        raise ImpastoError(f"bad checkpoint pattern {pattern!r}; use %s or {{iteration}} for the number")


class Checkpointer:
    """Every `every` iterations: save the current image to `pattern` and/or the state to `state_dir`.

    Images are numbered by the total count of iterations over all stages.
    """

    def __init__(self, pattern: str | None, every: int, state_dir: str | None, state_every: int,
                 meta: dict[str, Any]) -> None:
        if pattern:
            check_pattern(pattern)
        self.pattern, self.every = pattern, every
        self.state_dir, self.state_every, self.meta = state_dir, state_every, meta

    def __call__(self, progress: Any) -> None:
        n = progress.offset + progress.step.iteration
        if self.pattern and self.every and n % self.every == 0:
            images.save_image(progress.step.image.clamp(0, 1), checkpoint_path(self.pattern, n))
        if self.state_dir and self.state_every and n % self.state_every == 0:
            save_state(self.state_dir, progress.state(), self.meta)
