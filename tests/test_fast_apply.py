"""Applying a fast-style network: the Stylizer, output planning, folders of images, video, export."""

from __future__ import annotations

import copy
import importlib.util
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from impasto import images
from impasto.errors import ImpastoError
from impasto.fast.apply import Failure, Stylizer, network_digest, plan_jobs, stylize_images, stylize_video
from impasto.fast.export import export_model, onnx_difference
from impasto.fast.transformer import TransformerNet, TransformerSpec

CPU = torch.device("cpu")


def contrasty_net(seed: int = 0) -> TransformerNet:
    """A random width-0.25 network whose raw output spills well outside [0, 1], so clamping matters."""
    torch.manual_seed(seed)
    net = TransformerNet(TransformerSpec(width=0.25)).eval()
    with torch.no_grad():
        last = net.decoder[2].conv
        last.weight.mul_(150.0)
        last.bias.fill_(127.5)
    return net


def reference(net: TransformerNet, x: torch.Tensor) -> torch.Tensor:
    """The plain float32 forward pass, clamped; tiny images edge-replicated to 8 px, then cropped back."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (0, max(0, 8 - w), 0, max(0, 8 - h)), mode="replicate")
    with torch.no_grad():
        return net(padded)[..., :h, :w].clamp(0, 1)


def save_png(image: torch.Tensor, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images.tensor_to_pil(image).save(path)


# ----------------------------------------------------------------------------- Stylizer


@pytest.mark.parametrize("size", [(3, 5), (7, 9), (2, 11), (9, 13), (31, 17)])
def test_stylizer_keeps_the_size_and_clamps(size, make_scene):
    net = contrasty_net()
    raw_check = copy.deepcopy(net)
    x = make_scene(*size, seed=1)[None] if min(size) >= 4 else torch.rand(1, 3, *size)
    out = Stylizer(net, CPU, runtime="torch")(x)
    assert out.shape == (1, 3, *size)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert out.min() >= 0 and out.max() <= 1
    expected = reference(raw_check, x)
    assert torch.allclose(out, expected, atol=1e-5)


def test_stylizer_output_is_clamped_where_the_network_overshoots(make_scene):
    net = contrasty_net()
    x = make_scene(24, 32, seed=2)[None]
    with torch.no_grad():
        raw = net(x)
    assert (raw < 0).any() and (raw > 1).any()  # the premise: clamping has work to do
    out = Stylizer(net, CPU, runtime="torch")(x)
    assert torch.equal(out == 0, raw <= 0) and torch.equal(out == 1, raw >= 1)


def test_stylizing_a_batch_equals_stylizing_each_image(make_scene):
    stylizer = Stylizer(contrasty_net(seed=3), CPU, runtime="torch")
    batch = torch.stack([make_scene(20, 28, seed=s) for s in range(3)])
    batch[2] *= 0.3  # a darker image: per-image instance norm must not let it affect the others
    together = stylizer(batch)
    for i in range(3):
        alone = stylizer(batch[i: i + 1])
        assert torch.allclose(together[i: i + 1], alone, atol=1e-5)
    assert (together[0] - together[1]).abs().mean() > 0.01  # different images, different outputs


def test_stylizer_precision_errors():
    with pytest.raises(ImpastoError, match="--precision fp16 needs a CUDA device; on the CPU use fp32"):
        Stylizer(contrasty_net(), CPU, precision="fp16")
    with pytest.raises(ImpastoError, match="unknown precision 'half'; choose auto, fp32 or fp16"):
        Stylizer(contrasty_net(), CPU, precision="half")


# ----------------------------------------------------------------------------- plan_jobs


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_plan_files_keep_their_names_with_writable_suffixes(tmp_path):
    names = ["a.jpg", "b.gif", "c.ppm", "d.PNG", "e.webp", "v.avi", "w.mov", "x.webm", "y.MKV"]
    inputs = [touch(tmp_path / "in" / n) for n in names]
    out = tmp_path / "out"
    jobs = plan_jobs(inputs, out)
    assert [j.source for j in jobs] == inputs
    assert [j.output for j in jobs] == [out / n for n in ("a.jpg", "b.png", "c.png", "d.PNG", "e.webp", "v.mp4",
                                                          "w.mov", "x.mp4", "y.MKV")]
    assert [j.video for j in jobs] == [False] * 5 + [True] * 4


def test_plan_folder_keeps_relative_paths_under_its_name(tmp_path, monkeypatch):
    shots = tmp_path / "shots"
    for rel in ("x.png", "sub/y.gif", "sub/deeper/z.mkv", "sub/deeper/clip.avi", "notes.txt", "sub/.hidden.json"):
        touch(shots / rel)
    out = tmp_path / "out"
    jobs = plan_jobs([shots], out)
    got = {j.source.relative_to(shots).as_posix(): j.output.relative_to(out).as_posix() for j in jobs}
    assert got == {"x.png": "shots/x.png", "sub/y.gif": "shots/sub/y.png", "sub/deeper/z.mkv": "shots/sub/deeper/z.mkv",
                   "sub/deeper/clip.avi": "shots/sub/deeper/clip.mp4"}
    # "." names the folder by its real name
    monkeypatch.chdir(shots)
    jobs = plan_jobs(["."], out)
    assert sorted(j.output.relative_to(out).as_posix() for j in jobs) == sorted(got.values())


def test_plan_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ImpastoError, match=r"input not found: .*nothing.png"):
        plan_jobs([tmp_path / "nothing.png"], out)
    touch(tmp_path / "empty" / "readme.txt")
    with pytest.raises(ImpastoError, match=r"no images or videos found in .*empty"):
        plan_jobs([tmp_path / "empty"], out)
    with pytest.raises(ImpastoError, match=r"readme.txt is not an image or video file this tool reads"):
        plan_jobs([tmp_path / "empty" / "readme.txt"], out)
    a, b = touch(tmp_path / "a" / "x.png"), touch(tmp_path / "b" / "x.png")
    with pytest.raises(ImpastoError, match=r"a/x.png and .*b/x.png would both be written to .*out/x.png"):
        plan_jobs([a, b], out)
    g = touch(tmp_path / "a" / "x.gif")  # becomes x.png too
    with pytest.raises(ImpastoError, match=r"would both be written to"):
        plan_jobs([a, g], out)
    with pytest.raises(ImpastoError, match=r"output .*x.png is also an input; choose another -o directory"):
        plan_jobs([a], tmp_path / "a")


# ----------------------------------------------------------------------------- stylize_images


def test_folder_with_a_corrupt_image(tmp_path, make_scene):
    folder = tmp_path / "photos"
    scenes = {"a.png": make_scene(20, 28, seed=1), "b.png": make_scene(20, 28, seed=2),
              "c.ppm": make_scene(33, 17, seed=3)}
    for name, image in scenes.items():
        save_png(image, folder / name)  # PIL picks the format from the suffix
    bad = folder / "bad.png"
    bad.write_bytes(np.random.default_rng(0).bytes(500))
    out = tmp_path / "out"
    jobs = plan_jobs([folder], out)
    net = contrasty_net(seed=4)
    ref_net = copy.deepcopy(net)
    done = []
    failures = stylize_images(Stylizer(net, CPU, runtime="torch"), jobs, batch_size=4, metadata={"style": "s.png"},
                              on_done=lambda job, failure: done.append((job.source.name, failure)))
    assert len(failures) == 1 and isinstance(failures[0], Failure)
    assert failures[0].source == bad
    assert failures[0].reason == f"not an image (or an unsupported format): {bad}"
    assert sorted(name for name, _ in done) == ["a.png", "b.png", "bad.png", "c.ppm"]  # each job reported once
    assert [f for name, f in done if name == "bad.png"] == failures
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["photos/a.png", "photos/b.png", "photos/c.png"]  # nothing else: no .part files
    for name, outname in (("a.png", "a.png"), ("b.png", "b.png"), ("c.ppm", "c.png")):
        result = images.load_image(out / "photos" / outname)
        source = images.load_image(folder / name)
        assert result.shape == source.shape
        expected = reference(ref_net, source[None])[0]
        assert (result - expected).abs().max() <= 0.5 / 255 + 1e-4
        assert images.read_metadata(out / "photos" / outname) == {"style": "s.png"}


# ----------------------------------------------------------------------------- video


def make_video(path, codec="libx264", width=67, height=45, frames=12, fps=12, audio=True, options=None):
    """A small test video: moving colour gradients, and a mono AAC sine if `audio`."""
    import av

    out = av.open(str(path), "w")
    v = out.add_stream(codec, rate=fps)
    v.width, v.height = width, height
    v.pix_fmt = "yuv444p" if codec == "libx264" and (width % 2 or height % 2) else "yuv420p"
    v.options = options or {}
    a = None
    if audio:
        a = out.add_stream("aac", rate=22050)
        a.layout = "mono"
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(frames):
        img = np.stack([(xx / width) * 200 + i * 4, (yy / height) * 180 + 40, 120 + 60 * np.sin((xx + yy + 3 * i) / 9)],
                       axis=-1)
        for p in v.encode(av.VideoFrame.from_ndarray(img.clip(0, 255).astype(np.uint8), format="rgb24")):
            out.mux(p)
    if a is not None:
        t = np.arange(int(22050 * frames / fps)) / 22050
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 22050
        for p in a.encode(frame):
            out.mux(p)
        for p in a.encode(None):
            out.mux(p)
    for p in v.encode(None):
        out.mux(p)
    out.close()


def video_facts(path):
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        facts = {"width": v.codec_context.width, "height": v.codec_context.height, "rate": v.average_rate,
                 "video_codec": v.codec_context.name}
        times = [float(f.pts * f.time_base) for f in c.decode(video=0)]
        facts["frames"] = len(times)
        facts["times"] = sorted(times)
    with av.open(str(path)) as c:
        facts["audio"] = [(a.codec_context.name, a.sample_rate, a.duration * a.time_base) for a in c.streams.audio]
    return facts


def first_frame(path) -> torch.Tensor:
    import av

    with av.open(str(path)) as c:
        frame = next(iter(c.decode(video=0)))
        return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float() / 255


def test_video_is_stylized_with_its_timing_size_and_audio(tmp_path):
    pytest.importorskip("av")
    source = tmp_path / "clip.mp4"
    make_video(source)
    jobs = plan_jobs([source], tmp_path / "out")
    net = contrasty_net(seed=5)
    ref_net = copy.deepcopy(net)
    started, progress = [], []
    written = stylize_video(Stylizer(net, CPU, runtime="torch"), jobs[0], batch_size=5, on_frames=progress.append,
                            on_start=started.append)
    assert written == 12 and started == [12]
    assert progress == [5, 5, 2]  # batches of at most 5, even when the decoder's buffer is flushed at the end
    out = tmp_path / "out" / "clip.mp4"
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip.mp4"]  # no .part file left
    before, after = video_facts(source), video_facts(out)
    assert after["frames"] == before["frames"] == 12
    assert after["rate"] == before["rate"] == Fraction(12)
    assert (after["width"], after["height"]) == (67, 45)
    assert after["video_codec"] == "h264"
    assert after["times"] == pytest.approx(before["times"])
    assert len(after["audio"]) == 1 and after["audio"] == before["audio"]
    assert after["audio"][0][0] == "aac" and after["audio"][0][2] == pytest.approx(1.0, abs=0.1)

    expected = reference(ref_net, first_frame(source)[None])[0]
    got = first_frame(out)
    assert got.shape == expected.shape == (3, 45, 67)
    assert (got - expected).abs().mean() < 0.05
    assert (first_frame(source) - expected).abs().mean() > 0.1  # a stylized frame, not a copy of the input


def test_avi_without_b_frames_becomes_mp4(tmp_path):
    pytest.importorskip("av")
    source = tmp_path / "old.avi"
    make_video(source, codec="mpeg4", width=64, height=48, frames=6, audio=False)
    (job,) = plan_jobs([source], tmp_path / "out")
    assert job.output == tmp_path / "out" / "old.mp4"
    assert stylize_video(Stylizer(contrasty_net(), CPU, runtime="torch"), job, batch_size=4) == 6
    facts = video_facts(job.output)
    assert (facts["frames"], facts["width"], facts["height"], facts["video_codec"]) == (6, 64, 48, "h264")


def test_avi_with_h264_b_frames(tmp_path):
    pytest.importorskip("av")
    source = tmp_path / "cam.avi"
    make_video(source, width=64, height=48, frames=12, audio=False)
    (job,) = plan_jobs([source], tmp_path / "out")
    assert stylize_video(Stylizer(contrasty_net(), CPU, runtime="torch"), job, batch_size=4) == 12
    facts = video_facts(job.output)
    assert facts["frames"] == 12 and facts["rate"] == 12
    assert facts["times"] == pytest.approx([i / 12 for i in range(12)])  # evenly spaced, in order


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    for module in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    net = contrasty_net(seed=6)
    reference_net = copy.deepcopy(net)
    path = export_model(net, tmp_path_factory.mktemp("onnx") / "style.onnx", "onnx")
    return reference_net, path


@pytest.mark.parametrize("shape", [(1, 3, 45, 67), (2, 3, 64, 40)])
def test_onnx_export_has_dynamic_batch_height_and_width(onnx_export, shape):
    import onnxruntime

    net, path = onnx_export
    assert path.is_file() and not list(path.parent.glob("*.part"))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["stylized"]
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(shape[2]))
    (out,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        raw = net(x)
    assert (raw < 0).any() and (raw > 1).any()
    assert out.shape == shape
    assert np.abs(out - raw.clamp(0, 1).numpy()).max() < 1e-3
    assert onnx_difference(net, path, x) < 1e-3
    assert onnx_difference(contrasty_net(seed=7), path, x) > 0.05  # another network's output differs


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export(tmp_path):
    net = contrasty_net(seed=8)
    reference_net = copy.deepcopy(net)
    path = export_model(net, tmp_path / "style.pt", "torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.pt"]
    module = torch.jit.load(str(path))
    x = torch.rand(1, 3, 29, 37)
    with torch.no_grad():
        expected = reference_net(x).clamp(0, 1)
        got = module(x)
    assert got.shape == (1, 3, 29, 37)
    assert (got - expected).abs().max() < 1e-5
    assert got.min() == 0 and got.max() == 1


def test_unknown_export_format(tmp_path):
    with pytest.raises(ImpastoError, match="unknown export format 'tflite'; choose onnx or torchscript"):
        export_model(contrasty_net(), tmp_path / "x.tflite", "tflite")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- ONNX Runtime path


def test_onnxruntime_runtime_matches_torch_and_exports_once(onnx_cache):
    for module in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    net = contrasty_net(seed=11)
    exports: list = []
    fast = Stylizer(net, CPU, runtime="auto", on_export=exports.append)
    assert fast.runtime == "onnxruntime" and len(exports) == 1
    assert exports[0].parent == onnx_cache / "onnx" and exports[0].is_file()
    x = torch.rand(3, 3, 37, 53, generator=torch.Generator().manual_seed(0))  # a batch at an odd size
    torch_out = Stylizer(net, CPU, runtime="torch")(x)
    assert (fast(x) - torch_out).abs().max() < 1e-3
    tiny = torch.rand(1, 3, 3, 5)
    assert fast(tiny).shape == (1, 3, 3, 5)
    assert (fast(tiny) - Stylizer(net, CPU, runtime="torch")(tiny)).abs().max() < 1e-3
    # the same weights find the cached file; a damaged one is exported again
    again = Stylizer(copy.deepcopy(net), CPU, runtime="onnxruntime", on_export=exports.append)
    assert len(exports) == 1 and again.runtime == "onnxruntime"
    exports[0].write_bytes(b"damaged")
    Stylizer(net, CPU, runtime="onnxruntime", on_export=exports.append)
    assert len(exports) == 2
    # different weights (or architecture), different file
    assert network_digest(contrasty_net(seed=12)) != network_digest(net) == exports[0].stem
    digests = []
    for padding in ("same", "reflect", "reflect"):
        torch.manual_seed(0)  # equal weights: only the architecture differs
        digests.append(network_digest(TransformerNet(TransformerSpec(width=0.25, padding=padding))))
    assert digests[0] != digests[1] == digests[2]


def test_runtime_errors():
    with pytest.raises(ImpastoError, match="unknown runtime 'tensorrt'; choose auto, torch or onnxruntime"):
        Stylizer(contrasty_net(), CPU, runtime="tensorrt")
    with pytest.raises(ImpastoError, match="--runtime onnxruntime runs on the CPU here"):
        Stylizer(contrasty_net(), torch.device("cuda"), runtime="onnxruntime")


def test_audio_the_container_cannot_hold_is_reencoded_as_aac(tmp_path):
    av = pytest.importorskip("av")
    source = tmp_path / "camera.avi"  # an old camera's AVI: MPEG-4 video, ADPCM audio (MP4 cannot hold ADPCM)
    with av.open(str(source), "w") as out:
        v = out.add_stream("mpeg4", rate=10)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = out.add_stream("adpcm_ima_wav", rate=22050)
        a.layout = "mono"
        for i in range(10):
            for p in v.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")):
                out.mux(p)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050) * 32767).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="s16", layout="mono")
        frame.sample_rate = 22050
        for f in av.AudioResampler(format=a.codec_context.format.name, layout="mono", rate=22050).resample(frame):
            for p in a.encode(f):
                out.mux(p)
        for p in [*a.encode(None), *v.encode(None)]:
            out.mux(p)
    (job,) = plan_jobs([source], tmp_path / "out")
    assert stylize_video(Stylizer(contrasty_net(), CPU, runtime="torch"), job, batch_size=4) == 10
    facts = video_facts(job.output)
    assert facts["frames"] == 10 and len(facts["audio"]) == 1
    codec, rate, duration = facts["audio"][0]
    assert codec == "aac" and rate == 22050 and duration == pytest.approx(1.0, abs=0.1)


def test_variable_frame_rate_keeps_every_timestamp(tmp_path):
    av = pytest.importorskip("av")
    from fractions import Fraction as Q

    source = tmp_path / "vfr.mkv"
    times_ms = [0, 10, 20, 30, 200, 210, 500, 800, 810, 1000]
    with av.open(str(source), "w") as out:
        v = out.add_stream("libx264", rate=30)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        v.codec_context.time_base = Q(1, 1000)
        for i, ms in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms, Q(1, 1000)
            for p in v.encode(frame):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
    before = video_facts(source)["times"]
    assert before == pytest.approx([t / 1000 for t in times_ms])  # the input really is VFR
    (job,) = plan_jobs([source], tmp_path / "out")
    assert job.output.suffix == ".mkv"
    stylize_video(Stylizer(contrasty_net(), CPU, runtime="torch"), job, batch_size=3)
    assert video_facts(job.output)["times"] == pytest.approx(before, abs=1e-3)


def test_folders_skip_dot_files_and_the_output_folder(tmp_path):
    shots = tmp_path / "shots"
    (shots / ".thumbs").mkdir(parents=True)
    for name in ("a.png", "._a.png", ".thumbs/b.png"):
        (shots / name).write_bytes(b"")
    (shots / "styled").mkdir()
    (shots / "styled" / "old.png").write_bytes(b"")  # an earlier run's output inside the input folder
    jobs = plan_jobs([shots], shots / "styled")
    assert [j.source.name for j in jobs] == ["a.png"]


def test_plan_a_folder_into_one_of_its_ancestors(tmp_path):
    """-o above the input folder: its files are inputs, not earlier results (they were all left out, and the
    error said the folder had no images); where that puts an output on its input, that is the error."""
    holiday = tmp_path / "photos" / "holiday"
    touch(holiday / "a.png")
    jobs = plan_jobs([holiday], tmp_path)
    assert [(j.source, j.output) for j in jobs] == [(holiday / "a.png", tmp_path / "holiday" / "a.png")]
    with pytest.raises(ImpastoError, match=r"output .*holiday/a.png is also an input; choose another -o directory"):
        plan_jobs([holiday], tmp_path / "photos")
    touch(holiday / "out" / "a.png")  # an earlier run's results inside the input folder stay out
    assert [j.source for j in plan_jobs([holiday], holiday / "out")] == [holiday / "a.png"]
