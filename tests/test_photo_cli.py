"""`impasto photo`: masks, full-resolution output, metadata, `info`'s reproduce line, and one-line errors.

Runs call `impasto.cli.main` in-process (argparse's usage errors arrive as SystemExit) with random weights,
average pooling, 32 px and a network cut after conv2_1; one test starts a subprocess to see a fresh
process's stderr.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from impasto import images
from impasto.cli import build_parser, main, options_from_args
from impasto.photo import PhotoOptions

FAST = ["--weights", "random", "--pooling", "avg", "--size", "32", "--iterations", "3", "--quiet", "--device", "cpu",
        "--style-layers", "conv1_1,conv2_1", "--content-layers", "conv2_1"]
RANDOM_WARNING = "impasto: warning: using random VGG weights"


def run(*argv: object) -> int:
    """`impasto ARGV` in-process; argparse's usage errors exit through SystemExit."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code or 0)


def two_colour_mask(height: int, width: int, first, second, vertical: bool) -> torch.Tensor:
    mask = torch.empty(3, height, width)
    mask[:] = torch.tensor(second, dtype=torch.float32).view(3, 1, 1)
    region = (slice(None), slice(None), slice(0, width // 2)) if vertical else (slice(None), slice(0, height // 2))
    mask[region] = torch.tensor(first, dtype=torch.float32).view(3, 1, 1)
    return mask


@pytest.fixture
def pics(tmp_path: Path, make_scene, make_texture) -> SimpleNamespace:
    """A 64x48 content, a 40x40 style, matching white/black masks, and an output path, under tmp_path."""
    def save(name: str, image: torch.Tensor) -> Path:
        path = tmp_path / name
        images.save_image(image, path)
        return path

    white, black = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    return SimpleNamespace(
        dir=tmp_path,
        content=save("content.png", make_scene(48, 64, seed=1)),
        style=save("style.png", make_texture((0.8, 0.3, 0.2), 40, 40, seed=2)),
        content_mask=save("cm.png", two_colour_mask(48, 64, white, black, vertical=True)),
        style_mask=save("sm.png", two_colour_mask(40, 40, white, black, vertical=False)),
        save=save,
        out=tmp_path / "out.png",
    )


def photo(pics: SimpleNamespace, *extra: object) -> int:
    return run("photo", pics.content, pics.style, "-o", pics.out, *FAST, *extra)


def error_lines(err: str) -> list[str]:
    """stderr's lines other than warnings: for a user's mistake, exactly one 'impasto: error: ...' line."""
    return [line for line in err.splitlines() if not line.startswith("impasto: warning:")]


def test_photo_with_masks_writes_the_full_size_output_with_metadata(pics, capsys):
    rc = photo(pics, "--content-mask", pics.content_mask, "--style-mask", pics.style_mask)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert error_lines(captured.err) == []
    out = images.load_image(pics.out)
    assert out.shape == (3, 48, 64)  # the content's full size, though the optimization ran at 32 px
    meta = images.read_metadata(pics.out)
    assert meta is not None
    assert meta["command"] == "photo"
    assert meta["content"] == str(pics.content) and meta["styles"] == [str(pics.style)]
    assert meta["content_mask"] == str(pics.content_mask) and meta["style_mask"] == str(pics.style_mask)
    assert meta["iterations"] == 6  # two passes of 3
    assert meta["options"]["size"] == 32 and meta["options"]["weights"] == "random"
    assert meta["options"]["style_layers"] == ["conv1_1", "conv2_1"]

    assert run("info", pics.out) == 0
    info = capsys.readouterr().out
    reproduce = [line for line in info.splitlines() if line.startswith("reproduce:")]
    assert len(reproduce) == 1
    command = reproduce[0].removeprefix("reproduce: ")
    assert command.startswith("impasto photo ")
    assert f"--content-mask {shlex.quote(str(pics.content_mask))} --style-mask {shlex.quote(str(pics.style_mask))}" \
        in command
    # the reproduce line parses back to the same run
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.content_mask == str(pics.content_mask) and args.style_mask == str(pics.style_mask)
    assert options_from_args(args, PhotoOptions).to_dict() == meta["options"]


def test_photo_without_full_resolution_writes_the_working_size(pics, capsys):
    assert photo(pics, "--no-full-resolution", "--no-two-pass", "--no-smooth") == 0
    assert images.load_image(pics.out).shape == (3, 24, 32)
    meta = images.read_metadata(pics.out)
    assert meta["iterations"] == 3 and "content_mask" not in meta
    assert run("info", pics.out) == 0
    reproduce = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("reproduce:"))
    assert "--no-full-resolution" in reproduce and "--no-two-pass" in reproduce and "--no-smooth" in reproduce
    assert "--content-mask" not in reproduce


def test_photo_masks_of_another_size_than_the_photos_work(pics, capsys):
    small_content_mask = pics.save("cm_small.png", two_colour_mask(12, 16, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), True))
    assert photo(pics, "--content-mask", small_content_mask, "--style-mask", pics.style_mask) == 0
    assert images.load_image(pics.out).shape == (3, 48, 64)


def assert_one_line_error(capsys, pics, rc: int, message: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("impasto: error: ") or lines[0].startswith("impasto photo: error: "), err
    assert message in lines[0]
    assert not pics.out.exists()


@pytest.mark.parametrize("which", ["content", "style"])
def test_one_mask_alone_is_refused(pics, capsys, which):
    flag, path = ("--content-mask", pics.content_mask) if which == "content" else ("--style-mask", pics.style_mask)
    assert_one_line_error(capsys, pics, photo(pics, flag, path), "give both --content-mask and --style-mask")


def test_a_mask_whose_colours_match_nothing_is_refused(pics, capsys):
    photo_like = pics.save("photo_mask.png", torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0)))
    rc = photo(pics, "--content-mask", photo_like, "--style-mask", pics.style_mask)
    assert_one_line_error(capsys, pics, rc, "of the content mask's pixels match no mask colour")


def test_a_missing_mask_file_is_refused(pics, capsys):
    missing = pics.dir / "nowhere.png"
    rc = photo(pics, "--content-mask", pics.content_mask, "--style-mask", missing)
    assert_one_line_error(capsys, pics, rc, f"image not found: {missing}")


def test_masks_sharing_no_colour_are_refused(pics, capsys):
    red_green = pics.save("sm_rg.png", two_colour_mask(40, 40, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), False))
    rc = photo(pics, "--content-mask", pics.content_mask, "--style-mask", red_green)
    assert_one_line_error(capsys, pics, rc, "share no colour")


def test_scales_are_refused_for_photo(pics, capsys):
    assert_one_line_error(capsys, pics, photo(pics, "--scales", "16,32"), "--scales")


@pytest.mark.parametrize(("extra", "message"), [
    (["--affine-weight", "-1"], "must not be negative"),
    (["--auto-masks", "-2"], "must not be negative"),
    (["--smooth-eps", "0"], "must be positive"),
    (["--auto-masks", "33"], "--auto-masks makes at most 32 regions, got 33"),
    (["--style-scale", "-1"], "--style-scale must all be positive"),
    (["--style-scale", "100000"], "use a smaller --style-scale"),  # it was killed for memory, silently
    (["--affine-weight", "nan"], "--affine-weight must be a finite number, got nan"),
])
def test_bad_photo_options_are_refused(pics, capsys, extra, message):
    assert_one_line_error(capsys, pics, photo(pics, *extra), message)


def test_auto_masks_and_given_masks_are_refused_together(pics, capsys):
    rc = photo(pics, "--auto-masks", "3", "--content-mask", pics.content_mask, "--style-mask", pics.style_mask)
    assert_one_line_error(capsys, pics, rc, "use either --auto-masks or --content-mask/--style-mask, not both")


def test_a_mask_of_another_shape_than_its_photo_is_stretched_with_a_warning(pics, capsys):
    wide = pics.save("wide_mask.png", two_colour_mask(40, 80, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), True))
    assert photo(pics, "--iterations", "1", "--no-two-pass", "--content-mask", wide, "--style-mask",
                 pics.style_mask) == 0
    err = capsys.readouterr().err
    assert "impasto: warning: the content mask is 80x40 but its photo is " in err and "stretched to fit" in err


def test_a_photo_run_prints_only_impastos_own_warnings(pics):
    argv = [sys.executable, "-m", "impasto.cli", "photo", pics.content, pics.style, "-o", pics.out, *FAST,
            "--iterations", "1", "--no-two-pass", "--content-mask", pics.content_mask, "--style-mask", pics.style_mask]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a fresh process: torch warns about sparse tensors only once
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [line for line in proc.stderr.splitlines() if line.startswith(RANDOM_WARNING)]
