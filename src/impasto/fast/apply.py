"""Applying a style network to images, folders (in batches of equal-size images) and videos.

Every output has exactly its input's size; each file succeeds or fails on its own, so one bad
file in a folder is reported and the others are still written.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import images
from ..errors import ImpastoError, warn
from ..files import atomic_path, same_file
from .transformer import TransformerNet

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"})
WRITABLE_IMAGE = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
H264_CONTAINERS = frozenset({".mp4", ".mov", ".mkv", ".m4v"})
MIN_NETWORK_SIDE = 8  # reflection padding in the residual blocks needs 2 pixels at 1/4 scale


RUNTIMES = ("auto", "torch", "onnxruntime")


class Stylizer:
    """A network ready to stylize batches: on CUDA in PyTorch, NCHW, float32 by default (TF32 convolutions;
    on an H100 faster than float16 at batch 1 and within 12 % in batches, and channels-last was up to 1.5x
    slower in both); on the CPU in ONNX Runtime when it is installed (1.70x faster than the pytorch/examples
    way at 512 px, 2.40x at 1024 px), else in PyTorch. Figures: docs/benchmarks.md.

    The ONNX file is exported once per network and kept in a cache (see `onnx_cache_dir`).
    """

    def __init__(self, net: TransformerNet, device: torch.device, precision: str = "auto",
                 runtime: str = "auto", on_export: Callable[[Path], None] | None = None) -> None:
        if precision not in ("auto", "fp32", "fp16"):
            raise ImpastoError(f"unknown precision {precision!r}; choose auto, fp32 or fp16")
        if precision == "fp16" and device.type != "cuda":
            raise ImpastoError("--precision fp16 needs a CUDA device; on the CPU use fp32")
        if runtime not in RUNTIMES:
            raise ImpastoError(f"unknown runtime {runtime!r}; choose auto, torch or onnxruntime")
        if runtime == "onnxruntime" and device.type != "cpu":
            raise ImpastoError("--runtime onnxruntime runs on the CPU here; use --device cpu or --runtime torch")
        self.device = device
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.session: Any = None
        if device.type == "cpu" and runtime == "onnxruntime":
            self.session = _onnx_session(net, on_export)
        elif device.type == "cpu" and runtime == "auto" and _onnx_available():
            try:
                self.session = _onnx_session(net, on_export)
            except (ImpastoError, OSError) as e:  # e.g. an unwritable cache: PyTorch still works
                warn(f"ONNX Runtime unavailable ({e}); using PyTorch")
        self.net: TransformerNet | None = None
        if self.session is None:  # a copy, so the caller's network keeps its own device and precision
            self.net = copy.deepcopy(net).eval().to(device=device, dtype=self.dtype)

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self.session is not None else "torch"

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] on any device -> the stylized batch on the CPU, clamped to [0, 1]."""
        h, w = batch.shape[-2:]
        x = batch.to(self.device).to(self.dtype)  # converted on the device
        if min(h, w) < MIN_NETWORK_SIDE:  # tiny images: edge-replicate to the smallest size the net takes
            x = F.pad(x, (0, max(0, MIN_NETWORK_SIDE - w), 0, max(0, MIN_NETWORK_SIDE - h)), mode="replicate")
        if self.net is None:
            (out,) = self.session.run(None, {"image": x.float().contiguous().numpy()})
            return torch.from_numpy(out)[..., :h, :w].contiguous()
        y = self.net(x)[..., :h, :w]
        return y.float().clamp_(0.0, 1.0).cpu().contiguous()


def _onnx_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript", "onnx"))


def onnx_cache_dir() -> Path:
    """Where exported ONNX files are kept: $IMPASTO_CACHE, else $XDG_CACHE_HOME/impasto, else ~/.cache/impasto."""
    root = os.environ.get("IMPASTO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "impasto")
    return Path(root) / "onnx"


def network_digest(net: TransformerNet) -> str:
    """A hash of a network's architecture and weights: the name of its cached ONNX file."""
    import hashlib
    import json

    from .export import OPSET

    digest = hashlib.sha256(json.dumps({"spec": net.spec.to_dict(), "opset": OPSET}, sort_keys=True).encode())
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _onnx_session(net: TransformerNet, on_export: Callable[[Path], None] | None) -> Any:
    """An onnxruntime session for `net`, exporting it into the cache first if needed (or if the cached
    file is damaged)."""
    if not _onnx_available():
        raise ImpastoError("--runtime onnxruntime needs onnx, onnxscript and onnxruntime: "
                           "pip install 'impasto[export]'")
    import onnxruntime

    from .export import export_model

    path = onnx_cache_dir() / f"{network_digest(net)}.onnx"
    for attempt in range(2):
        if not path.is_file():
            if on_export is not None:
                on_export(path)
            export_model(net, path, "onnx")
        try:
            return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:
            path.unlink(missing_ok=True)
            if attempt:
                raise ImpastoError(f"onnxruntime cannot load {path} ({type(e).__name__}); "
                                   "use --runtime torch") from None
    raise AssertionError("unreachable")


@dataclass
class Job:
    """One input file and where its stylization goes."""

    source: Path
    output: Path
    video: bool


def plan_jobs(inputs: Sequence[str | os.PathLike[str]], outdir: str | os.PathLike[str]) -> list[Job]:
    """Outputs for files and folders: a file keeps its name, a folder's images keep their paths below it.

    Images keep their format where it can be written (else PNG); videos become H.264 in MP4 unless
    their container holds H.264 already. Fails before any work on a missing input or a name clash.
    """
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise ImpastoError(f"-o {out} is a file; give a directory for the results")
    jobs: list[Job] = []
    for given in inputs:
        src = Path(given)
        if src.is_dir():
            inside = out.resolve().is_relative_to(src.resolve())  # earlier results in the folder are not inputs
            found = images.files_below(src, images.IMAGE_SUFFIXES | VIDEO_SUFFIXES, skip=out if inside else None)
            if not found:
                if same_file(out, src):
                    raise ImpastoError(f"-o {out} is the input folder {src}; give another folder for the results")
                raise ImpastoError(f"no images or videos found in {src}")
            jobs += [_job(p, out / src.resolve().name / p.relative_to(src)) for p in found]
        elif src.is_file():
            if _kind(src) is None:
                raise ImpastoError(f"{src} is not an image or video file this tool reads (by its extension)")
            jobs.append(_job(src, out / src.name))
        else:
            raise ImpastoError(f"input not found: {src}")
    seen: dict[Path, Path] = {}
    for job in jobs:
        key = job.output.resolve()
        if key in seen:
            raise ImpastoError(f"{seen[key]} and {job.source} would both be written to {job.output}")
        if key == job.source.resolve():
            raise ImpastoError(f"output {job.output} is also an input; choose another -o directory")
        seen[key] = job.source
    return jobs


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in images.IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def _job(src: Path, dst: Path) -> Job:
    suffix = src.suffix.lower()
    if _kind(src) == "video":
        return Job(src, dst if suffix in H264_CONTAINERS else dst.with_suffix(".mp4"), True)
    return Job(src, dst if suffix in WRITABLE_IMAGE else dst.with_suffix(".png"), False)


@dataclass
class Failure:
    source: Path
    reason: str


def stylize_images(stylizer: Stylizer, jobs: Sequence[Job], batch_size: int, metadata: dict[str, Any],
                   on_done: Callable[[Job, Failure | None], None]) -> list[Failure]:
    """Stylize image jobs, batching consecutive images of equal size; report each job once."""
    failures: list[Failure] = []

    def finish(job: Job, failure: Failure | None) -> None:
        if failure is not None:
            failures.append(failure)
        on_done(job, failure)

    for batch in _batches(jobs, batch_size, finish):
        try:
            outputs = stylizer(torch.stack([image for _, image in batch]))
        except (RuntimeError, ImpastoError) as e:
            for job, _ in batch:
                finish(job, Failure(job.source, _reason(e)))
            continue
        for (job, _), out in zip(batch, outputs, strict=True):
            try:
                images.save_image(out, job.output, metadata)
                finish(job, None)
            except ImpastoError as e:
                finish(job, Failure(job.source, str(e)))
    return failures


def _batches(jobs: Sequence[Job], size: int, finish: Callable[[Job, Failure | None], None]
             ) -> Iterator[list[tuple[Job, torch.Tensor]]]:
    """Load images in order, yielding runs of equal-size images up to `size` long."""
    batch: list[tuple[Job, torch.Tensor]] = []
    for job in jobs:
        try:
            image = images.load_image(job.source)
        except ImpastoError as e:
            finish(job, Failure(job.source, str(e)))
            continue
        if batch and (len(batch) == size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((job, image))
    if batch:
        yield batch


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# --- video ---------------------------------------------------------------------------------------


def stylize_video(stylizer: Stylizer, job: Job, batch_size: int, on_frames: Callable[[int], None] | None = None,
                  on_start: Callable[[int], None] | None = None) -> int:
    """Stylize every frame of a video into H.264, keeping its frame timing and copying its audio.

    Returns the number of frames written. The output appears only when the whole video is done.
    """
    av = _import_av()
    try:
        source = av.open(str(job.source))
    except (av.FFmpegError, OSError) as e:
        raise ImpastoError(f"cannot open video {job.source}: {_reason(e)}") from None
    with contextlib.closing(source), atomic_path(job.output) as tmp:
        if not source.streams.video:
            raise ImpastoError(f"{job.source} has no video stream")
        vin = source.streams.video[0]
        vin.thread_type = "AUTO"
        fmt = "mp4" if job.output.suffix.lower() in (".mp4", ".m4v") else job.output.suffix.lower().lstrip(".")
        fmt = {"mkv": "matroska"}.get(fmt, fmt)
        with contextlib.closing(av.open(str(tmp), "w", format=fmt)) as sink:
            vout = _video_stream(sink, vin)
            audio = [_AudioRoute(sink, a, av) for a in source.streams.audio[:1]]
            if on_start is not None:
                on_start(vin.frames or 0)
            pending: list[Any] = []
            clock = _FrameClock(vin, "avi" in source.format.name)
            written = 0

            def flush(limit: int) -> None:
                nonlocal written
                while len(pending) >= limit and pending:
                    batch = pending[:batch_size]
                    del pending[:batch_size]
                    written += _encode_batch(stylizer, batch, [clock.pts(f) for f in batch], vout, sink)
                    if on_frames is not None:
                        on_frames(len(batch))

            for packet in source.demux(vin, *(a.source for a in audio)):
                if packet.stream.type == "video":
                    pending += packet.decode()
                    flush(batch_size)
                else:
                    audio[0].mux(packet)
            flush(1)
            sink.mux(vout.encode(None))
            for route in audio:
                route.close()
    return written


class _AudioRoute:
    """The input's audio into the output: packets copied as they are, or — when the output container
    cannot hold the codec (e.g. ADPCM from an old camera's AVI into MP4) — decoded and encoded as AAC."""

    def __init__(self, sink: Any, source: Any, av: Any) -> None:
        self.source, self.sink = source, sink
        self.resampler: Any = None
        try:
            self.stream = sink.add_stream_from_template(source)
        except (ValueError, av.FFmpegError):
            rate = source.codec_context.sample_rate or 48000
            layout = "mono" if source.codec_context.channels == 1 else "stereo"
            self.stream = sink.add_stream("aac", rate=rate)
            self.stream.layout = layout
            self.resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)

    def mux(self, packet: Any) -> None:
        if self.resampler is None:
            if packet.dts is not None:
                packet.stream = self.stream
                self.sink.mux(packet)
            return
        for frame in packet.decode():
            self._encode(self.resampler.resample(frame))

    def _encode(self, frames: list[Any]) -> None:
        for frame in frames:
            frame.pts = None  # the encoder numbers samples itself
            self.sink.mux(self.stream.encode(frame))

    def close(self) -> None:
        if self.resampler is not None:
            self._encode(self.resampler.resample(None))
            self.sink.mux(self.stream.encode(None))


class _FrameClock:
    """Output timestamps: each decoded frame's own, in the input's time base, so variable frame rates
    survive — except where the container has none to give (AVI stores no presentation times; its
    B-frame H.264 decodes with scrambled ones), or they fail to increase: then one frame period on."""

    def __init__(self, vin: Any, no_pts: bool) -> None:
        self.period = max(1, round(1 / (_frame_rate(vin) * vin.time_base))) if vin.time_base else 1
        self.renumber = no_pts
        self.last: int | None = None

    def pts(self, frame: Any) -> int:
        if self.renumber or frame.pts is None or (self.last is not None and frame.pts <= self.last):
            pts = 0 if self.last is None else self.last + self.period
        else:
            pts = int(frame.pts)
        self.last = pts
        return pts


def _frame_rate(vin: Any) -> Any:
    """The input's average frame rate, else the demuxer's guess, else 25."""
    return vin.average_rate or vin.guessed_rate or 25


def _video_stream(sink: Any, vin: Any) -> Any:
    stream = sink.add_stream("libx264", rate=_frame_rate(vin))
    stream.width, stream.height = vin.codec_context.width, vin.codec_context.height
    # 4:2:0 chroma needs even sides; odd-size videos keep full chroma so the size is exact
    stream.pix_fmt = "yuv420p" if stream.width % 2 == 0 and stream.height % 2 == 0 else "yuv444p"
    stream.time_base = vin.time_base
    stream.codec_context.time_base = vin.time_base  # else the encoder rounds each pts to 1/rate (VFR video)
    stream.options = {"crf": "18", "preset": "medium"}
    return stream


def _encode_batch(stylizer: Stylizer, frames: list[Any], stamps: list[int], vout: Any, sink: Any) -> int:
    import av

    batch = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1) for f in frames])
    out = stylizer(batch.float().div_(255.0))
    pixels = out.mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    for frame, pts, rgb in zip(frames, stamps, pixels, strict=True):
        new = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        new.pts, new.time_base = pts, frame.time_base
        sink.mux(vout.encode(new))
    return len(frames)


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise ImpastoError("video needs PyAV: pip install 'impasto[video]' (or pip install av)") from None
    return av
