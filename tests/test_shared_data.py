"""Checks on the real example data in ../shared/data, when it is present (it is not in a fresh clone)."""

import warnings
from pathlib import Path

import pytest

from impasto import images
from impasto.photo.masks import mask_pairs

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "photo"
# Classes the data's README lists for each pair (palette colours present on both sides).
EXPECTED_CLASSES = {"dpst03": 2, "dpst11": 6, "dpst14": 2, "dpst17": 2, "dpst26": 5, "dpst29": 2, "dpst37": 4,
                    "dpst45": 2}

pytestmark = pytest.mark.skipif(not PHOTO.is_dir(), reason="../shared/data is not present")


@pytest.mark.parametrize("pair", sorted(EXPECTED_CLASSES))
def test_hand_drawn_masks_parse_into_their_classes(pair):
    folder = PHOTO / pair
    content, style = images.load_image(folder / "content.png"), images.load_image(folder / "style.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. dpst03's water exists in the style only
        pairs = mask_pairs(images.load_image(folder / "content_seg.png"), images.load_image(folder / "style_seg.png"),
                           tuple(content.shape[-2:]), tuple(style.shape[-2:]))
    assert len(pairs) == EXPECTED_CLASSES[pair]
    covered = sum(p.content for p in pairs)
    assert covered.max() <= 1  # classes do not overlap
    assert covered.mean() > 0.95  # anti-aliased edges (0.5-3 % of pixels) are all that is left out
