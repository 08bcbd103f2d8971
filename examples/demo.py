"""`make demo`: stylize an example photo with an example painting into out/.

Uses ../shared/data when present (this project's development machines), otherwise downloads the
two public example images from jcjohnson/neural-style once into examples/cache/. Extra arguments
are passed to `impasto stylize` (e.g. `--weights random` to check the pipeline offline).
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

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
            urllib.request.urlretrieve(BASE + remote, cached.with_suffix(".part"))
        except OSError as e:
            sys.exit(f"demo: cannot download the example image {BASE + remote} ({e})")
        cached.with_suffix(".part").rename(cached)
    return str(cached)


if __name__ == "__main__":
    Path("out").mkdir(exist_ok=True)
    args = [
        "stylize", example("content"), example("style"), "-o", "out/demo.png",
        "--scales", "256,512", "--scale-iterations", "300,100",
        "--side-by-side", "out/demo_side_by_side.png", *sys.argv[1:],
    ]
    print("impasto " + " ".join(args), file=sys.stderr)
    sys.exit(main(args))
