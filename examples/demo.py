"""`make demo`: stylize an example photo with an example painting into out/.

Uses ../shared/data when present (this project's development machines), otherwise downloads the
two public example images from jcjohnson/neural-style once into examples/cache/; offline, it draws two
stand-ins (a landscape and a brush-stroke texture) and says so. Extra arguments are passed to
`impasto stylize` (e.g. `--weights random` to check the pipeline offline).
"""

from __future__ import annotations

import http.client
import shutil
import sys
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from impasto.cli import main

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
BASE = "https://raw.githubusercontent.com/jcjohnson/neural-style/master/examples/inputs/"
IMAGES = {"content": ("content/tubingen.jpg", "tubingen.jpg"), "style": ("style/starry_night.jpg", "starry_night.jpg")}


def example(kind: str) -> str:
    shared, remote = IMAGES[kind]
    if (SHARED / shared).is_file():
        return str(SHARED / shared)
    cached = HERE / "cache" / remote
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {BASE + remote}", file=sys.stderr)
        try:
            with urllib.request.urlopen(BASE + remote, timeout=30) as response, \
                    open(cached.with_suffix(".part"), "wb") as f:
                shutil.copyfileobj(response, f)
        except (OSError, http.client.HTTPException) as e:
            drawn = HERE / "cache" / f"drawn_{kind}.png"
            print(f"demo: cannot download {BASE + remote} ({e}); using a drawn stand-in, {drawn}", file=sys.stderr)
            draw(kind).save(drawn)
            return str(drawn)
        cached.with_suffix(".part").rename(cached)
    return str(cached)


def draw(kind: str, size: tuple[int, int] = (512, 384)) -> Image.Image:
    """Offline stand-ins: a landscape (sky, sun, hills) or a texture of short coloured strokes."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / h
    rng = np.random.default_rng(0)
    if kind == "content":
        img = np.stack([0.45 + 0.3 * y, 0.65 + 0.2 * y, 0.95 - 0.2 * y], -1)  # sky
        img[(x - 1.0) ** 2 + (y - 0.25) ** 2 < 0.01] = (1.0, 0.85, 0.3)  # sun
        for height, colour in ((0.55, (0.25, 0.45, 0.2)), (0.7, (0.15, 0.3, 0.12))):
            img[y > height + 0.08 * np.sin(7 * x + 10 * height)] = colour  # hills
    else:
        img = np.full((h, w, 3), (0.08, 0.12, 0.3))
        for _ in range(900):
            cx, cy, angle = rng.uniform(0, w / h), rng.uniform(0, 1), rng.uniform(0, np.pi)
            along = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
            across = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
            img[(np.abs(along) < 0.05) & (np.abs(across) < 0.008)] = rng.choice(
                [(0.95, 0.8, 0.2), (0.3, 0.5, 0.9), (0.9, 0.95, 1.0), (0.1, 0.3, 0.6)])
    noise = rng.normal(0, 0.02, img.shape)
    return Image.fromarray((np.clip(img + noise, 0, 1) * 255).astype(np.uint8))


if __name__ == "__main__":
    Path("out").mkdir(exist_ok=True)
    args = [
        "stylize", example("content"), example("style"), "-o", "out/demo.png",
        "--scales", "256,512", "--scale-iterations", "300,100",
        "--side-by-side", "out/demo_side_by_side.png", *sys.argv[1:],
    ]
    print("impasto " + " ".join(args), file=sys.stderr)
    sys.exit(main(args))
