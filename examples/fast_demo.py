"""`make demo-fast`: import real pretrained fast-style networks and apply them to an example photo.

The networks are lengstrom/fast-style-transfer's, as dumped for deeplearn.js by
reiinakano/fast-style-transfer-deeplearnjs (MIT). They come from ../shared/data/pretrained/fast-style
when present (this project's development machines), else are downloaded once into examples/cache/.
Writes out/fast/<style>.pt (impasto models), out/fast/<style>/<photo> and the sheet out/fast_demo.jpg
(photo | one result per style) — the picture in the README.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import torch

from impasto import images
from impasto.cli import main

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
CKPTS = "https://raw.githubusercontent.com/reiinakano/fast-style-transfer-deeplearnjs/master/src/ckpts/"
PHOTO = "https://raw.githubusercontent.com/scikit-image/scikit-image/main/skimage/data/astronaut.png"
STYLES = ("wave", "the_scream", "wreck")  # public-domain paintings (Hokusai, Munch, Turner)
FOLDER = {"the_scream": "scream"}


def fetch(url: str, path: Path) -> None:
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url}", file=sys.stderr)
    try:
        urllib.request.urlretrieve(url, path.with_suffix(".part"))
    except OSError as e:
        sys.exit(f"demo-fast: cannot download {url} ({e})")
    path.with_suffix(".part").rename(path)


def network_folder(style: str) -> Path:
    name = FOLDER.get(style, style)
    shared = SHARED / "pretrained" / "fast-style" / name
    if (shared / "manifest.json").is_file():
        return shared
    cached = HERE / "cache" / "fast-style" / name
    fetch(CKPTS + name + "/manifest.json", cached / "manifest.json")
    for entry in json.loads((cached / "manifest.json").read_text()).values():
        fetch(CKPTS + name + "/" + entry["filename"], cached / entry["filename"])
    return cached


def photo() -> Path:
    shared = SHARED / "content" / "astronaut.png"
    if shared.is_file():
        return shared
    cached = HERE / "cache" / "astronaut.png"
    fetch(PHOTO, cached)
    return cached


if __name__ == "__main__":
    out = Path("out/fast")
    content = photo()
    results = [images.load_image(content)]
    for style in STYLES:
        model = out / f"{style}.pt"
        for args in (["import", str(network_folder(style)), "-o", str(model)],
                     ["apply", str(model), str(content), "-o", str(out / style), "--quiet", *sys.argv[1:]]):
            print("impasto " + " ".join(args), file=sys.stderr)
            if main(args) != 0:
                sys.exit(1)
        results.append(images.load_image(out / style / content.name))
    sheet = images.side_by_side([torch.as_tensor(r) for r in results], height=256)
    images.save_image(sheet, "out/fast_demo.jpg")
    print("wrote out/fast_demo.jpg (photo | wave | the scream | wreck)", file=sys.stderr)
