"""Shared fixtures: small generated test images (no files, no downloads)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from impasto import images

# The tests run tiny images through small networks: with more than one intra-op thread, OpenMP
# synchronisation dominates, and on a busy 2-core machine it made the suite about 6x slower.
torch.set_num_threads(1)


def scene(height: int = 48, width: int = 64, seed: int = 0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """A (3, H, W) image in [low, high]: smooth colour gradients with a disc, a bar and a little seeded noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
    x = torch.linspace(0, 1, width).view(1, width).expand(height, width)
    phase = torch.rand(3, generator=g) * 2 * math.pi
    img = torch.stack([
        0.5 + 0.35 * torch.sin(3 * x + 2 * y + phase[0]),
        0.5 + 0.35 * torch.cos(2 * x - 3 * y + phase[1]),
        0.5 + 0.35 * torch.sin(4 * x * y + phase[2]),
    ])
    cy, cx = 0.3 + 0.4 * torch.rand(2, generator=g)
    disc = ((y - cy) ** 2 + (x - cx) ** 2) < 0.05
    img = torch.where(disc, 1.0 - img, img)
    bar = (x > 0.15) & (x < 0.3)
    img = torch.where(bar, img * 0.5, img)
    img = img + 0.05 * torch.randn(3, height, width, generator=g)
    img = img.clamp(0, 1)
    return (low + (high - low) * img).contiguous()


def texture(color: tuple[float, float, float], height: int = 48, width: int = 48, seed: int = 0,
            amplitude: float = 0.15) -> torch.Tensor:
    """A (3, H, W) texture around a mean colour: diagonal stripes plus seeded noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(height, dtype=torch.float32).view(height, 1)
    x = torch.arange(width, dtype=torch.float32).view(1, width)
    stripes = torch.sin((x + y) * 0.8).expand(height, width)
    base = torch.tensor(color, dtype=torch.float32).view(3, 1, 1)
    img = base + amplitude * stripes + amplitude * (torch.rand(3, height, width, generator=g) - 0.5)
    return img.clamp(0, 1).contiguous()


@pytest.fixture
def make_scene() -> Callable[..., torch.Tensor]:
    """Factory for smooth test scenes: make_scene(height, width, seed=..., low=..., high=...)."""
    return scene


@pytest.fixture
def make_texture() -> Callable[..., torch.Tensor]:
    """Factory for coloured textures: make_texture((r, g, b), height, width, seed=...)."""
    return texture


@pytest.fixture(scope="module")
def net():
    """A random-weight VGG19 cut after relu2_1 (the small network the engine tests share)."""
    from impasto.errors import ImpastoWarning
    from impasto.nets import load_vgg

    torch.manual_seed(0)
    with pytest.warns(ImpastoWarning, match="random"):
        return load_vgg("vgg19", ["relu1_1", "relu2_1"], "avg", "random")


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory) -> Path:
    """One ONNX cache for the whole run: a network exported once is reused, as on a user's machine."""
    return tmp_path_factory.mktemp("impasto-cache")


@pytest.fixture(autouse=True)
def _private_cache(onnx_cache, monkeypatch) -> None:
    """Tests never write into the user's ~/.cache."""
    monkeypatch.setenv("IMPASTO_CACHE", str(onnx_cache))

@pytest.fixture
def photos(tmp_path, make_scene) -> Path:
    """Ten small photos of different sizes (JPEG and PNG), some in a nested folder: training data."""
    root = tmp_path / "photos"
    for i in range(10):
        folder = root / ("nested" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        images.save_image(make_scene(40 + 3 * i, 48, seed=i), folder / f"p{i}.{'jpg' if i % 2 else 'png'}")
    return root


@pytest.fixture
def style_path(tmp_path, make_texture) -> Path:
    path = tmp_path / "style.png"
    images.save_image(make_texture((0.8, 0.3, 0.2), 48, 48), path)
    return path
