"""Images in and out: loading with checks, resizing, colour spaces, atomic saving with metadata.

Images are float32 tensors of shape (3, H, W) with values in [0, 1], RGB.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImpastoError
from .files import atomic_write

METADATA_KEY = "impasto"
MIN_SIDE = 2


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"})


def files_below(root: str | os.PathLike[str], suffixes: Iterable[str], skip: Path | None = None) -> list[Path]:
    """Files below `root` whose extension is in `suffixes`, in a stable order, leaving out dot files and
    folders (macOS `._x.jpg` companions, `.git`) and anything under `skip` (an output folder inside it)."""
    base, wanted = Path(root), frozenset(suffixes)
    skipped = skip.resolve() if skip is not None else None
    return sorted(p for p in base.rglob("*") if p.suffix.lower() in wanted and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(base).parts)
                  and not (skipped is not None and p.resolve().is_relative_to(skipped)))


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an image file as an RGB (3, H, W) tensor in [0, 1], honouring EXIF orientation."""
    p = Path(path)
    if not p.exists():
        raise ImpastoError(f"image not found: {p}")
    if p.is_dir():
        raise ImpastoError(f"expected an image file, got a directory: {p}")
    try:
        with Image.open(p) as im:
            rgb = to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError:
        raise ImpastoError(f"image too large to load safely: {p}") from None
    except UnidentifiedImageError:
        raise ImpastoError(f"not an image (or an unsupported format): {p}") from None
    except OSError as e:
        raise ImpastoError(f"cannot read image {p}: {e}") from None
    if min(rgb.size) < MIN_SIDE:
        w, h = rgb.size
        raise ImpastoError(f"image {p} is {w}x{h} pixels; each side must be at least {MIN_SIDE}")
    return pil_to_tensor(rgb)


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)  # 16-bit samples (PNG "I" images hold them too)
        arr = np.clip(arr / 65535.0, 0, 1) * 255.0
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """Convert a (3, H, W) or (1, 3, H, W) tensor in [0, 1] to an 8-bit RGB PIL image."""
    t = image.detach().float().squeeze(0).clamp(0, 1).cpu()
    arr = (t.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def size_for_width(height: int, width: int, new_width: int) -> tuple[int, int]:
    """(H, W) for an image scaled to `new_width`, keeping its aspect ratio."""
    return max(1, round(height * new_width / width)), new_width


def size_for_long_side(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(H, W) for an image whose longer side becomes `long_side`, keeping its aspect ratio."""
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (3, H, W) or (N, 3, H, W) image to (H, W) with antialiased bicubic filtering."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    batched = image if image.dim() == 4 else image.unsqueeze(0)
    shrinking = size[0] < batched.shape[-2] or size[1] < batched.shape[-1]
    out = F.interpolate(batched, size=size, mode="bicubic", align_corners=False, antialias=shrinking)
    out = out.clamp(0, 1)
    return out if image.dim() == 4 else out.squeeze(0)


# --- colour -----------------------------------------------------------------------------------

_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]]
)


def rgb_to_yiq(image: torch.Tensor) -> torch.Tensor:
    m = _RGB_TO_YIQ.to(image)
    return torch.einsum("ij,...jhw->...ihw", m, image)


def yiq_to_rgb(image: torch.Tensor) -> torch.Tensor:
    m = torch.linalg.inv(_RGB_TO_YIQ.double()).to(image)
    return torch.einsum("ij,...jhw->...ihw", m, image)


def transfer_luminance(result: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Luminance (Y) of `result` with the chroma (I, Q) of `content` (Gatys et al. 2016, sec. 2)."""
    y = rgb_to_yiq(result)[..., :1, :, :]
    iq = rgb_to_yiq(resize(content, (result.shape[-2], result.shape[-1])))[..., 1:, :, :]
    return yiq_to_rgb(torch.cat([y, iq], dim=-3)).clamp(0, 1)


def match_color(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Affinely recolour `source` so its colour mean and covariance equal `target`'s.

    Gatys et al. 2016's "colour histogram matching" applied to the style image before transfer,
    with the symmetric (PCA/eigen) square root as in Image Analogies.
    """
    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(3, -1).double()
        mu = flat.mean(1, keepdim=True)
        centered = flat - mu
        cov = centered @ centered.T / flat.shape[1] + eps * torch.eye(3, dtype=flat.dtype)
        return mu, cov

    def sqrtm(c: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh(c)
        vals = vals.clamp_min(eps)
        power = -0.5 if inverse else 0.5
        return vecs @ torch.diag(vals**power) @ vecs.T

    mu_s, cov_s = stats(source)
    mu_t, cov_t = stats(target)
    transform = sqrtm(cov_t) @ sqrtm(cov_s, inverse=True)
    flat = source.reshape(3, -1).double()
    out = transform @ (flat - mu_s) + mu_t
    return out.reshape(source.shape).to(source.dtype).clamp(0, 1)


# --- output -----------------------------------------------------------------------------------


def save_image(
    image: torch.Tensor | Image.Image,
    path: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write an image atomically; PNG files carry `metadata` as JSON in a text chunk."""
    pil = image if isinstance(image, Image.Image) else tensor_to_pil(image)
    fmt = check_output_format(path)

    def write(tmp: Path) -> None:
        kwargs: dict[str, Any] = {}
        text = json.dumps(metadata, sort_keys=True) if metadata is not None else None
        if fmt == "PNG" and text is not None:
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            info.add_text(METADATA_KEY, text)
            kwargs["pnginfo"] = info
        elif fmt == "JPEG":
            kwargs["quality"] = 95
            if text is not None:
                kwargs["comment"] = text.encode()
        pil.save(tmp, format=fmt, **kwargs)

    return atomic_write(path, write)


def check_output_format(path: str | os.PathLike[str]) -> str:
    """The PIL format for an output path, or a clear error before any work is done."""
    ext = Path(path).suffix.lower()
    formats = Image.registered_extensions()
    if ext not in formats:
        raise ImpastoError(f"unknown image format for output {path} (use .png or .jpg)")
    if formats[ext] not in Image.SAVE:  # PIL reads .psd, .xpm, .fits ... but cannot write them
        raise ImpastoError(f"cannot write {formats[ext]} images ({path}); use .png or .jpg")
    return formats[ext]


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run parameters that `save_image` stored in an image, or None if it has none."""
    p = Path(path)
    if not p.exists():
        raise ImpastoError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            text = im.info.get(METADATA_KEY) or im.info.get("comment")
    except (UnidentifiedImageError, OSError):
        raise ImpastoError(f"not an image (or an unsupported format): {p}") from None
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def side_by_side(images: Sequence[torch.Tensor], height: int = 256, gap: int = 4) -> torch.Tensor:
    """One sheet with the images in a row, each scaled to `height`, on a white background."""
    scaled = [resize(im, (height, max(1, round(im.shape[-1] * height / im.shape[-2])))) for im in images]
    width = sum(s.shape[-1] for s in scaled) + gap * (len(scaled) - 1)
    sheet = torch.ones(3, height, width)
    x = 0
    for s in scaled:
        h, w = s.shape[-2:]
        sheet[:, :h, x : x + w] = s
        x += w + gap
    return sheet
