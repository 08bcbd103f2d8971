"""The `impasto` command line: usage errors, checkpoints, metadata, side-by-side sheets, resume and Ctrl-C.

Runs call `impasto.cli.main` in-process (argparse's usage errors arrive as SystemExit); only the Ctrl-C
test starts a subprocess. Every run uses random weights, average pooling, 48 px, few iterations and a
network cut after relu2_1, so the whole file stays fast on a small CPU.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from impasto.cli import main
from impasto.errors import ImpastoError
from impasto.images import read_metadata

FAST = ["--weights", "random", "--pooling", "avg", "--size", "48", "--quiet", "--device", "cpu",
        "--style-layers", "relu1_1,relu2_1", "--content-layers", "relu2_1"]
RANDOM_WARNING = "impasto: warning: using random VGG weights"
CONTENT_RGB = (0.8, 0.3, 0.2)  # reddish
STYLE_RGB = (0.2, 0.3, 0.8)  # bluish


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a small, busy CPU this is much faster than two threads fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_png(path: Path, width: int, height: int, rgb: tuple[float, float, float], seed: int = 0) -> Path:
    """A plain PNG (no metadata): a mean colour with a diagonal wave and seeded noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    wave = 0.12 * np.sin((xx + 2 * yy) * 0.5)[..., None]
    arr = np.asarray(rgb).reshape(1, 1, 3) + wave + 0.1 * (rng.random((height, width, 3)) - 0.5)
    Image.fromarray((arr.clip(0, 1) * 255).round().astype(np.uint8), "RGB").save(path)
    return path


@pytest.fixture
def pics(tmp_path: Path) -> SimpleNamespace:
    """A 64x48 content, three 40x40 styles, and an empty output directory, all under tmp_path."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return SimpleNamespace(
        dir=tmp_path,
        content=write_png(tmp_path / "content.png", 64, 48, CONTENT_RGB, seed=1),
        style=write_png(tmp_path / "style.png", 40, 40, STYLE_RGB, seed=2),
        style2=write_png(tmp_path / "style2.png", 40, 40, (0.3, 0.8, 0.3), seed=3),
        style3=write_png(tmp_path / "style3.png", 40, 40, (0.9, 0.9, 0.2), seed=4),
        out_dir=out_dir,
        out=out_dir / "result.png",
    )


def run(*argv: object) -> int:
    """`impasto ARGV` in-process; argparse's usage errors exit through SystemExit."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code or 0)


def stylize(pics: SimpleNamespace, *extra: object, output: object = None, styles: list | None = None) -> int:
    """A fast 6-iteration run; `extra` comes last so it can override any of the fast options."""
    return run("stylize", pics.content, *(styles or [pics.style]), "-o", output or pics.out,
               *FAST, "--iterations", "6", *extra)


def the_error(err: str, prefix: str = "impasto: error:") -> str:
    """The one error line on stderr; only the warning that --weights random itself asks for may precede it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith(RANDOM_WARNING)]
    assert len(lines) == 1, f"expected exactly one line on stderr, got:\n{err}"
    assert lines[0].startswith(prefix + " "), lines[0]
    return lines[0]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def no_part_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.part"))


# --- bad input: exit 2, one line, no output ---------------------------------------------------


def _thin_style(p):
    thin = write_png(p.dir / "thin.png", 1, 40, STYLE_RGB)
    return [p.content, thin], [], ["thin.png", "1x40"]


def _text_style(p):
    fake = p.dir / "notes.png"
    fake.write_text("this is not an image\n")
    return [p.content, fake], [], ["not an image", "notes.png"]


def _dir_style(p):
    folder = p.dir / "folder.png"
    folder.mkdir()
    return [p.content, folder], [], ["directory", "folder.png"]


def _wrong_shapes(p):
    weights = p.dir / "small.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3), "features.0.bias": torch.zeros(8)}, weights)
    return [p.content, p.style], ["--weights", weights], ["shape", "(8, 3, 3, 3)", "(64, 3, 3, 3)"]


def _text_weights(p):
    weights = p.dir / "readme.pth"
    weights.write_text("not weights\n")
    return [p.content, p.style], ["--weights", weights], ["readme.pth", "state dict"]


BAD_INPUT = {
    "missing content": lambda p: ([p.dir / "nope.png", p.style], [], ["not found", "nope.png"]),
    "text file named .png": _text_style,
    "1x40 image": _thin_style,
    "directory as image": _dir_style,
    "3 styles, 2 blend weights": lambda p: (
        [p.content, p.style, p.style2, p.style3], ["--style-blend-weights", "1,2"],
        ["--style-blend-weights has 2 values but there are 3 style images"]),
    "unknown content layer": lambda p: ([p.content, p.style], ["--content-layers", "relu9_9"], ["relu9_9"]),
    "unknown output extension": lambda p: (  # refused before the run: no checkpoint gets written
        [p.content, p.style],
        ["-o", p.out_dir / "result.xyz", "--checkpoint-iterations", "1", "--checkpoint-output", p.out_dir / "c%s.png"],
        ["unknown image format", "result.xyz"]),
    "weights of the wrong shapes": _wrong_shapes,
    "weights file that is text": _text_weights,
    "missing weights file": lambda p: (
        [p.content, p.style], ["--weights", p.dir / "gone.pth"], ["weights file not found", "gone.pth"]),
    "weights path is a folder": lambda p: (
        [p.content, p.style], ["--weights", p.out_dir], ["is a directory; give the weights file in it"]),
    "resume from an empty dir": lambda p: (
        [p.content, p.style], ["--resume", p.dir], ["no saved state", "state.pt"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(pics, capsys, case):
    inputs, extra, expected = BAD_INPUT[case](pics)
    code = run("stylize", *inputs, "-o", pics.out, *FAST, "--iterations", "6", *extra)
    err = capsys.readouterr().err
    assert code == 2
    line = the_error(err)
    for text in expected:
        assert text in line
    assert list(pics.out_dir.iterdir()) == []
    assert no_part_files(pics.dir) == []


@pytest.mark.parametrize(("value", "expected"), [("0", "must be positive, got 0"), ("abc", "'abc'")])
def test_bad_size_is_an_argparse_usage_error(pics, capsys, value, expected):
    assert stylize(pics, "--size", value) == 2
    line = the_error(capsys.readouterr().err, prefix="impasto stylize: error:")
    assert "--size" in line and expected in line
    assert "usage:" not in line
    assert list(pics.out_dir.iterdir()) == []


def test_preserve_color_and_its_neural_style_spelling_together_are_a_usage_error(pics, capsys):
    """--preserve-colors is neural_style.py's --preserve-color luminance; given with --preserve-color histogram,
    one of them would be silently ignored."""
    assert stylize(pics, "--preserve-color", "histogram", "--preserve-colors") == 2
    line = the_error(capsys.readouterr().err, prefix="impasto stylize: error:")
    assert "argument --preserve-colors: not allowed with argument --preserve-color" in line
    assert list(pics.out_dir.iterdir()) == []


def test_output_equal_to_an_input_is_refused_and_the_input_is_untouched(pics, capsys):
    before = pics.style.read_bytes()
    assert stylize(pics, output=pics.style) == 2
    line = the_error(capsys.readouterr().err)
    assert "also an input" in line and "style.png" in line
    assert pics.style.read_bytes() == before
    assert no_part_files(pics.dir) == []


def test_absurd_size_is_refused_by_the_memory_guard_without_allocating(pics, capsys):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, a high-water mark
    start = time.monotonic()
    assert stylize(pics, "--size", "200000") == 2
    elapsed = time.monotonic() - start
    line = the_error(capsys.readouterr().err)
    assert "GiB" in line and "--size" in line
    assert elapsed < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 1 << 20  # grew by less than 1 GiB
    assert list(pics.out_dir.iterdir()) == []


def test_a_style_scaled_beyond_memory_is_refused_before_resizing_it(pics, capsys):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert stylize(pics, "--style-scales", "100000") == 2  # once a traceback: a 2 TB resize
    line = the_error(capsys.readouterr().err)
    assert "a style image scaled to 4800000x4800000 needs about" in line  # 100000 x the 48-px output
    assert line.endswith("use a smaller --style-scales")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 1 << 20
    assert list(pics.out_dir.iterdir()) == []


def test_an_empty_list_option_is_a_usage_error(pics, capsys):
    assert stylize(pics, "--scales", ",") == 2  # it was taken as no --scales at all
    assert "--scales: expected comma-separated int values, got ','" in capsys.readouterr().err


@pytest.mark.parametrize(("error", "rc"), [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory"), 1),
    (MemoryError(), 1),
])
def test_running_out_of_memory_anyway_is_one_line(pics, capsys, monkeypatch, error, rc):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("impasto.artistic.stylize_tensors", fail)
    assert stylize(pics) == rc
    assert the_error(capsys.readouterr().err) == "impasto: error: out of memory; use a smaller --size"


def test_other_runtime_errors_are_not_called_out_of_memory(pics, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr("impasto.artistic.stylize_tensors", fail)
    with pytest.raises(RuntimeError, match="something else"):
        stylize(pics)


def test_offline_default_weights_say_what_to_download_and_where(pics, capsys, monkeypatch, tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/vgg19-dcbb9e9d.pth"
    torch_home = tmp_path / "torch_home"
    monkeypatch.delenv("IMPASTO_WEIGHTS", raising=False)
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("IMPASTO_WEIGHTS_URL", url)
    fast_without_weights = FAST[2:]
    assert FAST[:2] == ["--weights", "random"]
    code = run("stylize", pics.content, pics.style, "-o", pics.out, *fast_without_weights, "--iterations", "6")
    line = the_error(capsys.readouterr().err)
    assert code == 2
    assert url in line
    assert str(torch_home / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth") in line
    assert "--weights" in line
    assert list(pics.out_dir.iterdir()) == []
    assert no_part_files(tmp_path) == []


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoints_are_written_every_n_iterations(pics):
    ck = pics.dir / "ck"
    assert stylize(pics, "--checkpoint-iterations", "2", "--checkpoint-output", ck / "ck_%s.png") == 0
    assert sorted(p.name for p in ck.iterdir()) == ["ck_2.png", "ck_4.png", "ck_6.png"]
    assert all(size_of(ck / name) == (48, 36) for name in ("ck_2.png", "ck_4.png", "ck_6.png"))
    assert size_of(pics.out) == (48, 36)


def test_checkpoint_numbers_continue_across_scales(pics):
    ck = pics.dir / "ck"
    code = stylize(pics, "--scales", "32,48", "--scale-iterations", "2,2", "--checkpoint-iterations", "1",
                   "--checkpoint-output", ck / "ck_%s.png")
    assert code == 0
    assert sorted(p.name for p in ck.iterdir()) == ["ck_1.png", "ck_2.png", "ck_3.png", "ck_4.png"]
    assert [size_of(ck / f"ck_{i}.png") for i in (1, 2, 3, 4)] == [(32, 24), (32, 24), (48, 36), (48, 36)]
    assert size_of(pics.out) == (48, 36)
    assert read_metadata(pics.out)["iterations"] == 4


# --- metadata, info, reproduce --------------------------------------------------------------------


def test_output_metadata_info_and_reproduce(pics, capsys):
    assert stylize(pics, "--style-weight", "7.5") == 0
    meta = read_metadata(pics.out)
    assert meta["command"] == "stylize"
    assert meta["content"] == str(pics.content) and meta["styles"] == [str(pics.style)]
    assert meta["options"]["style_weight"] == 7.5 and meta["options"]["iterations"] == 6
    assert meta["iterations"] == 6
    capsys.readouterr()

    assert run("info", pics.out) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert "style_weight: 7.5" in lines
    assert "tv_weight: 1.0" in lines
    assert "pooling: avg" in lines
    [reproduce] = [line for line in lines if line.startswith("reproduce: ")]
    words = shlex.split(reproduce.removeprefix("reproduce: "))
    assert words[:2] == ["impasto", "stylize"]
    command = " ".join(words)
    for option in ("--style-weight 7.5", "--iterations 6", "--size 48", "--weights random", "--pooling avg",
                   "--style-layers relu1_1,relu2_1", "--content-layers relu2_1", "-o OUT.png"):
        assert option in command
    assert "--tv-weight" not in command and "--content-weight" not in command  # defaults are left out

    assert run("info", "--json", pics.out) == 0
    assert json.loads(capsys.readouterr().out) == meta

    again = pics.dir / "again.png"
    rerun = [str(again) if w == "OUT.png" else w for w in words[1:]]
    assert run(*rerun, "--quiet") == 0
    assert np.array_equal(pixels(again), pixels(pics.out))


def test_reproduce_guards_a_leading_dash_and_odd_options():
    from impasto.cli import reproduce_command

    meta = {"command": "stylize", "content": "-c.png", "styles": ["s.png", "-t.png"], "options": "str"}
    assert reproduce_command(meta) == "impasto stylize ./-c.png s.png ./-t.png -o OUT.png"  # was an AttributeError
    meta["options"] = {"init": "-x.png", "seed": -3}
    assert reproduce_command(meta).endswith(" -o OUT.png --init=-x.png --seed=-3")


def test_info_on_a_png_without_metadata(pics, capsys):
    assert run("info", pics.content) == 2
    line = the_error(capsys.readouterr().err)
    assert "content.png" in line and "no impasto parameters" in line


def test_info_ignores_another_programs_json_comment(pics, capsys):
    """A JPEG comment that happens to be JSON is not impasto's parameters (it once crashed `info`)."""
    foreign, partial = pics.dir / "foreign.jpg", pics.dir / "partial.jpg"
    Image.new("RGB", (8, 8)).save(foreign, comment=json.dumps({"command": "stylize", "x": 1}).encode())
    Image.new("RGB", (8, 8)).save(partial, comment=json.dumps({"impasto": "0.1", "command": "stylize"}).encode())
    assert run("info", foreign) == 2
    assert the_error(capsys.readouterr().err) == (f"impasto: error: {foreign} has no impasto parameters "
                                                 f"(was it written by impasto?)")
    assert run("info", partial) == 0  # ours but without the inputs: shown, with no command to rerun it
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["impasto: 0.1", "command: stylize"] and captured.err == ""


def test_info_into_a_closed_pipe_exits_quietly(pics):
    """`impasto info OUT.png | head -1`: no traceback when the reader has gone."""
    assert stylize(pics) == 0
    proc = subprocess.Popen([sys.executable, "-m", "impasto", "info", str(pics.out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_quiet_with_print_iterations_prints_only_the_lines_asked_for(pics, capsys):
    assert stylize(pics, "--print-iterations", "2") == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["iteration 2/6", "iteration 4/6", "iteration 6/6"]
    assert all(" loss=" in line and " style=" in line for line in lines)
    assert [line for line in captured.err.splitlines() if not line.startswith(RANDOM_WARNING)] == []


def test_preserve_colors_alias_sets_luminance(pics, capsys):
    assert stylize(pics, "--preserve-colors") == 0
    assert read_metadata(pics.out)["options"]["preserve_color"] == "luminance"
    capsys.readouterr()
    assert run("info", pics.out) == 0
    out = capsys.readouterr().out
    assert "preserve_color: luminance" in [line.strip() for line in out.splitlines()]
    assert "--preserve-color luminance" in out


# --- side by side ------------------------------------------------------------------------------


def test_side_by_side_sheet(pics):
    sheet = pics.dir / "sheet.png"
    assert stylize(pics, "--side-by-side", sheet) == 0
    width, height = size_of(sheet)
    assert height == 256
    # content 64x48, style 40x40 and result 48x36, each scaled to 256 high
    scaled = [round(64 * 256 / 48), 256, round(48 * 256 / 36)]
    assert sum(scaled) <= width <= sum(scaled) + 40
    arr = pixels(sheet).astype(np.float64) / 255
    content_panel = arr[:, : scaled[0] - 2].reshape(-1, 3).mean(0)
    style_panel = arr[:, width // 2 - 100 : width // 2 + 100].reshape(-1, 3).mean(0)
    assert np.allclose(content_panel, CONTENT_RGB, atol=0.08), content_panel
    assert np.allclose(style_panel, STYLE_RGB, atol=0.08), style_panel
    assert size_of(pics.out) == (48, 36)


# --- state, resume -----------------------------------------------------------------------------


def test_resume_continues_exactly_where_the_state_was_saved(pics, capsys):
    a, b, c = pics.dir / "a.png", pics.dir / "b.png", pics.dir / "c.png"
    state = pics.dir / "state"
    assert stylize(pics, "--iterations", "8", output=a) == 0
    assert stylize(pics, "--iterations", "4", "--state", state, "--state-every", "4", output=b) == 0
    assert (state / "state.pt").is_file()
    assert not np.array_equal(pixels(a), pixels(b))  # 4 iterations are not 8

    ck = pics.dir / "ck"
    code = stylize(pics, "--iterations", "8", "--resume", state, "--checkpoint-iterations", "1",
                   "--checkpoint-output", ck / "ck_%s.png", output=c)
    assert code == 0
    # it went on from iteration 4 (a fresh 8-iteration run would also write ck_1 .. ck_4)
    assert sorted(p.name for p in ck.iterdir()) == ["ck_5.png", "ck_6.png", "ck_7.png", "ck_8.png"]
    assert read_metadata(c)["iterations"] == 8
    assert np.array_equal(pixels(c), pixels(a))

    capsys.readouterr()
    d = pics.dir / "d.png"
    assert stylize(pics, "--iterations", "8", "--resume", state, "--style-weight", "20", output=d) == 2
    line = the_error(capsys.readouterr().err)
    assert "--style-weight" in line and "20.0" in line and "10.0" in line
    assert not d.exists()


# --- Ctrl-C ------------------------------------------------------------------------------------


def test_sigterm_keeps_the_best_image_and_the_state_as_ctrl_c_does(pics, capsys, monkeypatch):
    from impasto.progress import ProgressBar

    original = ProgressBar.__call__

    def terminated_at_2(self, progress):
        original(self, progress)
        if progress.step.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # `kill PID`: it used to end the process, losing everything

    monkeypatch.setattr(ProgressBar, "__call__", terminated_at_2)
    assert stylize(pics, "--state", pics.dir / "st") == 130
    assert "interrupted after 2 iterations; best image saved to" in capsys.readouterr().err
    assert read_metadata(pics.out)["iterations"] == 2 and (pics.dir / "st" / "state.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the command's only while it runs


def test_a_second_ctrl_c_while_saving_does_not_lose_the_image_or_the_state(pics, capsys, monkeypatch):
    import impasto.images

    original = impasto.images.save_image

    def interrupted_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while saving: it waits until both files are written
        return original(*args, **kwargs)

    monkeypatch.setattr(impasto.images, "save_image", interrupted_save)
    assert stylize(pics, "--state", pics.dir / "st") == 130
    assert capsys.readouterr().err.splitlines()[-1] == "impasto: interrupted"
    assert read_metadata(pics.out)["iterations"] == 6 and (pics.dir / "st" / "state.pt").is_file()
    assert no_part_files(pics.dir) == []


def test_ctrl_c_keeps_the_best_image_and_the_state(pics):
    ck = pics.dir / "ck"
    args = [sys.executable, "-m", "impasto.cli", "stylize", pics.content, pics.style, "-o", pics.out, *FAST,
            "--size", "64", "--iterations", "100000", "--checkpoint-iterations", "1",
            "--checkpoint-output", ck / "ck_%s.png"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(a) for a in args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not (ck.is_dir() and any(ck.glob("ck_*.png"))):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "--resume" in err
    state = Path(f"{pics.out}.state") / "state.pt"
    assert state.is_file()
    assert str(state.parent) in err
    with Image.open(pics.out) as im:
        im.verify()
    assert size_of(pics.out) == (64, 48)
    meta = read_metadata(pics.out)
    done = meta["iterations"]
    assert meta["options"]["iterations"] == 100000 and 1 <= done < 100000
    assert no_part_files(pics.dir) == []

    # the state it left is usable: two more iterations from where it stopped
    more = pics.dir / "more.png"
    code = stylize(pics, "--size", "64", "--iterations", str(done + 2), "--resume", state.parent, output=more)
    assert code == 0
    assert read_metadata(more)["iterations"] == done + 2


# --- stray warnings ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("default")
def test_a_quiet_run_prints_nothing_but_the_random_weights_warning(pics, capsys):
    before = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns once per process; make it independent of earlier tests
    try:
        assert stylize(pics, "--iterations", "2") == 0
    finally:
        torch.set_warn_always(before)
    err = capsys.readouterr().err
    # e.g. torch's "Converting a tensor with requires_grad=True to a scalar" from float(loss) in the loop
    assert [line for line in err.splitlines() if not line.startswith(RANDOM_WARNING)] == []


# --- checked before any work ----------------------------------------------------------------------------------


def test_checkpoint_pattern_with_unknown_extension_is_refused_before_the_run(pics, capsys):
    state = pics.dir / "state"
    code = stylize(pics, "--checkpoint-iterations", "3", "--checkpoint-output", pics.out_dir / "ck_%s.xyz",
                   "--state", state, "--state-every", "1")
    line = the_error(capsys.readouterr().err)
    assert code == 2
    assert "unknown image format" in line and "xyz" in line
    assert not state.exists()  # nothing ran: no state saved after iterations 1 and 2


@pytest.mark.parametrize("pattern", ["ck_{x}.png", "ck_%d_%d.png", "ck%.0s.png", "ck_{iteration:.0}.png", "ck_%c.png"])
def test_checkpoint_patterns_that_name_no_number_are_refused(pics, capsys, pattern):
    assert stylize(pics, "--checkpoint-iterations", "3", "--checkpoint-output", pics.out_dir / pattern) == 2
    assert f"bad checkpoint pattern '{pics.out_dir / pattern}'" in the_error(capsys.readouterr().err)
    assert list(pics.out_dir.iterdir()) == []


def test_side_by_side_equal_to_output_is_refused(pics, capsys):
    code = stylize(pics, "--side-by-side", pics.out)
    err = capsys.readouterr().err
    assert code == 2
    the_error(err)
    assert list(pics.out_dir.iterdir()) == []


def _unwritable(pics: SimpleNamespace, case: str) -> tuple[list[object], str]:
    """Options whose output cannot be written, and the error line they must give."""
    if case == "output-is-a-directory":
        (pics.dir / "d.png").mkdir()
        return ["-o", pics.dir / "d.png"], f"cannot write {pics.dir / 'd.png'}: it is a directory"
    file = pics.dir / "f"
    file.write_text("x")
    if case == "output-under-a-file":
        return ["-o", file / "o.png"], f"cannot write {file / 'o.png'}: {file} is not a directory"
    return ["--state", file], f"cannot write {file / 'state.pt'}: {file} is not a directory"  # state-is-a-file


@pytest.mark.parametrize("case", ["output-is-a-directory", "output-under-a-file", "state-is-a-file"])
def test_an_output_that_cannot_be_written_is_refused_before_the_run(pics, capsys, case):
    """Found only at the end, such a run was lost; now it stops before any iteration (no checkpoint yet)."""
    extra, expected = _unwritable(pics, case)
    ck = pics.dir / "ck"
    code = stylize(pics, "--checkpoint-iterations", "1", "--checkpoint-output", ck / "%s.png", *extra)
    assert code == 2
    assert the_error(capsys.readouterr().err) == f"impasto: error: {expected}"
    assert not ck.exists() and no_part_files(pics.dir) == []
    assert [p.name for p in pics.dir.glob(".*probe")] == []


def test_resume_knows_the_same_files_by_other_paths(pics, capsys, monkeypatch):
    """A run saved with relative paths resumes with absolute ones, from another folder; other files are refused."""
    monkeypatch.chdir(pics.dir)
    state, whole = pics.dir / "state", pics.dir / "whole.png"
    assert stylize(pics, "--iterations", "6", output=whole) == 0
    assert run("stylize", "content.png", "style.png", "-o", "out/half.png", *FAST, "--iterations", "3",
               "--state", "state") == 0
    monkeypatch.chdir(pics.out_dir)
    resumed = pics.dir / "resumed.png"
    assert run("stylize", pics.content, f"../{pics.style.name}", "-o", resumed, *FAST, "--iterations", "6",
               "--resume", state) == 0
    assert np.array_equal(pixels(resumed), pixels(whole))
    capsys.readouterr()
    assert run("stylize", pics.content, pics.style2, "-o", pics.dir / "x.png", *FAST, "--iterations", "6",
               "--resume", state) == 2
    line = the_error(capsys.readouterr().err)  # the state was saved again by the resumed run, as it named them
    assert line == (f"impasto: error: styles is [{str(pics.style2)!r}] but the run saved in {state} "
                    f"used ['../style.png']")


def test_a_project_moved_as_a_whole_resumes_with_its_relative_paths(pics, tmp_path, monkeypatch):
    """Relative paths (inputs and --init) from inside a project folder that was moved since: the same files."""
    project = tmp_path / "proj"
    project.mkdir()
    for name in ("content.png", "style.png"):
        (project / name).write_bytes((pics.dir / name).read_bytes())
    monkeypatch.chdir(project)
    common = ["stylize", "content.png", "style.png", *FAST, "--init", "content.png"]
    assert run(*common, "-o", "whole.png", "--iterations", "6") == 0
    assert run(*common, "-o", "half.png", "--iterations", "3", "--state", "state") == 0
    moved = project.rename(tmp_path / "moved")
    monkeypatch.chdir(moved)
    assert run(*common, "-o", "resumed.png", "--iterations", "6", "--resume", "state") == 0
    assert np.array_equal(pixels(moved / "resumed.png"), pixels(moved / "whole.png"))
    (moved / "sub").mkdir()
    monkeypatch.chdir(moved / "sub")  # and --init by another relative path, from a folder below
    again = ["stylize", "../content.png", "../style.png", *FAST, "--init", "../content.png"]
    assert run(*again, "-o", "again.png", "--iterations", "6", "--resume", "../state") == 0


def test_a_state_that_cannot_be_saved_does_not_cost_the_image(pics, capsys, monkeypatch):
    from impasto import checkpoints

    def full_disk(*args, **kwargs):
        raise ImpastoError("cannot write state/state.pt: No space left on device")

    monkeypatch.setattr(checkpoints, "save_state", full_disk)
    assert stylize(pics, "--state", pics.dir / "state", "--state-every", "100") == 0
    assert ("impasto: warning: the resumable state was not saved: cannot write state/state.pt: No space left on "
            "device") in capsys.readouterr().err.splitlines()
    assert pics.out.is_file()


def test_a_closed_stdout_drops_the_log_lines_not_the_run(pics):
    """`impasto stylize ... --print-iterations 1 | head -2`: the reader goes, the run still writes its image."""
    argv = ["stylize", pics.content, pics.style, "-o", pics.out, *FAST, "--iterations", "6", "--print-iterations", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "impasto", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and pics.out.is_file()


def test_resume_asking_fewer_iterations_than_done_is_refused(pics, capsys):
    state = pics.dir / "state"
    assert stylize(pics, "--iterations", "4", "--state", state) == 0
    capsys.readouterr()
    fewer = pics.dir / "fewer.png"
    assert stylize(pics, "--iterations", "3", "--resume", state, output=fewer) == 2
    assert the_error(capsys.readouterr().err) == ("impasto: error: the saved run has done 4 iterations, more than "
                                                 "the 3 asked for; ask for at least that many")
    assert not fewer.exists()


@pytest.mark.parametrize(("output", "message"), [
    ("result.psd", "cannot write PSD images"),  # PIL reads it but cannot write it: it failed after the run
    ("b" * 240 + ".png", "File name too long"),  # fine itself, too long for its temporary file's name
])
def test_outputs_that_cannot_be_written_are_refused_before_the_run(pics, capsys, monkeypatch, output, message):
    monkeypatch.setattr("impasto.artistic.stylize_tensors", lambda *a, **k: pytest.fail("the run started"))
    assert stylize(pics, output=pics.out_dir / output) == 2
    assert message in the_error(capsys.readouterr().err)
    assert list(pics.out_dir.iterdir()) == []


def test_a_state_folder_that_is_the_output_is_refused(pics, capsys):
    assert stylize(pics, "--state", pics.out) == 2
    assert the_error(capsys.readouterr().err).endswith(f"the state folder {pics.out} is also the output {pics.out}; "
                                                       "give another")
    assert list(pics.out_dir.iterdir()) == []


def test_checkpoint_images_may_not_overwrite_an_input(pics, capsys):
    start = pics.dir / "start_00003.png"  # what --checkpoint-output start.png names checkpoint 3
    start.write_bytes(pics.content.read_bytes())
    before = start.read_bytes()
    args = ["--init", start, "--checkpoint-iterations", "3"]
    assert stylize(pics, *args, "--checkpoint-output", pics.dir / "start.png") == 2
    assert the_error(capsys.readouterr().err).endswith(f"{start} is also an input; refusing to overwrite it")
    assert stylize(pics, *args, "--checkpoint-output", str(pics.content).replace(".png", "%.0s.png")) == 2
    assert "bad checkpoint pattern" in the_error(capsys.readouterr().err)  # it drops the number: one name for all
    assert start.read_bytes() == before and not pics.out.exists()


def test_a_state_is_resumed_only_by_its_own_command_and_inputs(pics, capsys):
    state = pics.dir / "state"
    assert stylize(pics, "--iterations", "3", "--state", state) == 0
    capsys.readouterr()
    assert run("photo", pics.content, pics.style, "-o", pics.dir / "p.png", *FAST, "--resume", state) == 2
    assert the_error(capsys.readouterr().err).endswith(f"the run saved in {state} is an `impasto stylize` run; "
                                                       "resume it with that command")
    write_png(pics.content, 48, 48, CONTENT_RGB, seed=9)  # the same path, another picture of another shape
    assert stylize(pics, "--iterations", "5", "--resume", state, output=pics.dir / "r.png") == 2
    assert the_error(capsys.readouterr().err).endswith("the saved run's image is 48x36 but this run's is 48x48: "
                                                       "an input has changed; start afresh")
    payload = torch.load(state / "state.pt", weights_only=True)
    del payload["state"]["loop"]["iteration"]
    torch.save(payload, state / "state.pt")
    assert stylize(pics, "--iterations", "5", "--resume", state, output=pics.dir / "r.png") == 2
    assert "cannot read saved state" in the_error(capsys.readouterr().err)


@pytest.mark.parametrize("extra", [["--checkpoint-iterations", "2"], ["--checkpoint-output", "ck_%s.png"]])
def test_half_a_checkpoint_request_warns_that_nothing_will_be_written(pics, capsys, extra, monkeypatch):
    monkeypatch.chdir(pics.dir)
    assert stylize(pics, *extra) == 0
    err = capsys.readouterr().err
    assert ("impasto: warning: checkpoint images need both --checkpoint-output and --checkpoint-iterations; "
            "none will be written") in err.splitlines()
    assert sorted(p.name for p in pics.dir.glob("ck_*")) == []


def test_amp_on_the_cpu_says_it_does_nothing_there(pics, capsys):
    assert stylize(pics, "--amp") == 0
    lines = capsys.readouterr().err.splitlines()
    assert "impasto: warning: --amp applies on CUDA only; running in float32 on cpu" in lines


@pytest.mark.parametrize("extra", [["--style-layers", ""], ["--style-weight", "0"]])
def test_a_run_without_style_says_so(pics, capsys, extra):
    assert stylize(pics, *extra) == 0
    assert ("impasto: warning: no style layers or a style weight of 0: the result takes nothing from the style "
            "images") in capsys.readouterr().err.splitlines()


def test_the_command_exits_with_ctrl_c_ignored_after_main(monkeypatch):
    """After a run has saved and said so, a Ctrl-C during Python's shutdown printed a traceback."""
    import impasto.cli

    monkeypatch.setattr(impasto.cli, "main", lambda: 130)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as info:
            impasto.cli.entry()
        assert info.value.code == 130 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_while_an_interrupted_run_unwinds_prints_nothing_more(monkeypatch, capsys):
    """What an interrupted run held is collected as `main` returns; a second Ctrl-C landing in a __del__
    there printed "Exception ignored ... KeyboardInterrupt" (tqdm's bars in `impasto apply`)."""
    import impasto.cli

    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    class PressesCtrlCWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    def interrupted_run(args):
        held = PressesCtrlCWhenCollected()  # noqa: F841 - alive until the traceback goes
        raise KeyboardInterrupt

    monkeypatch.setattr(impasto.cli, "run_info", interrupted_run)
    assert impasto.cli.main(["info", "x.png"]) == 130
    assert capsys.readouterr().err == "impasto: interrupted\n" and unraisable == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
