"""The fast engine's subcommands: `train`, `apply`, `export`, `import` — thin calls into the API."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from .. import __version__
from ..cli import PROG, _list_of
from ..errors import EXIT_INTERRUPTED, ImpastoError
from .train import TrainOptions

EXIT_SOME_FAILED = 1


# --- train ---------------------------------------------------------------------------------------

_TRAIN_HELP = {
    "style": "the style image (painting)",
    "data": "folder of training photos, searched recursively (e.g. COCO train2014)",
    "style_size": "resize the style image to this long side (default: as is)",
    "content_layers": "VGG layers for the content loss",
    "style_layers": "VGG layers for the style loss",
    "model": "loss network: vgg16 or vgg19",
    "weights": "VGG weights file ('random' for experiments); default: torchvision's, via torch.hub",
    "image_size": "side of the square training crops",
    "crop_scale": "area fraction range of the random crops, MIN,MAX",
    "steps": "train this many steps (overrides --epochs)",
    "width": "channel width multiplier of the network (0.5: 3.6x fewer FLOPs)",
    "checkpoint_every": "save model + optimizer state every N steps",
    "checkpoint_dir": "where checkpoints go (default: MODEL.ckpt/)",
    "log_dir": "write TensorBoard logs (each loss term, sample stylizations) here",
    "workers": "data-loading worker processes",
    "device": "auto, cpu, cuda or mps",
    "content_weight": "weight of the content loss",
    "style_weight": "weight of the style loss",
    "tv_weight": "weight of the total-variation loss",
    "tv_power": "power of the total-variation loss (2: squared differences)",
    "content_layer_weights": "a weight per content layer (default: equal)",
    "style_layer_weights": "a weight per style layer (default: equal)",
    "style_layer_weight_exp": "style layer i gets exp**i before normalization, as in neural_style.py",
    "pooling": "the loss network's pooling: max or avg",
    "weights_format": "auto, torchvision, caffe or matconvnet",
    "batch_size": "photos per step",
    "epochs": "passes over the training photos",
    "learning_rate": "Adam's step size",
    "keep_checkpoints": "checkpoints kept in --checkpoint-dir (older ones are deleted)",
    "log_every": "write the losses to --log-dir every N steps",
    "sample_every": "write sample stylizations to --log-dir every N steps",
    "seed": "seed of the network's initial weights and the data order",
    "quiet": "no progress bar",
}


def add_train(sub: Any) -> None:
    d = TrainOptions()
    p = sub.add_parser("train", help="train a fast style network on a folder of photos (Johnson et al.)",
                       description="Train a feed-forward style network. Options come from --config YAML (keys are "
                                   "the option names below, with _ or -), overridden by flags given here. Runs "
                                   "unchanged under torchrun for several GPUs or machines.",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("-o", "--output", required=True, help="the model file to write (.pt)")
    p.add_argument("--config", help="YAML file with any of the options below")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint file or directory")
    for f in fields(TrainOptions):
        flag, default, kind = "--" + f.name.replace("_", "-"), getattr(d, f.name), str(f.type)
        shown = "" if default in (None, "") or kind == "bool" else f" (default {','.join(map(str, default)) if isinstance(default, list) else default})"
        help_text = _TRAIN_HELP.get(f.name, "") + shown
        if kind == "bool":
            p.add_argument(flag, action="store_true", help=help_text or None)
        elif kind.startswith("list["):
            p.add_argument(flag, type=_list_of(float if "float" in kind else str), help=help_text)
        else:
            p.add_argument(flag, type=int if "int" in kind else float if "float" in kind else str, help=help_text)
    p.set_defaults(run=run_train)


def train_options(args: argparse.Namespace) -> TrainOptions:
    """Defaults, then the --config file, then the flags given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(_read_config(args.config))
    names = {f.name for f in fields(TrainOptions)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainOptions.from_dict(values, args.config if getattr(args, "config", None) else "options")


def _read_config(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ImpastoError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ImpastoError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ImpastoError(f"{path} must hold a mapping of option names to values")
    return data


def run_train(args: argparse.Namespace) -> int:
    from ..files import check_writable, refuse_overwriting_inputs, refuse_writing_inside
    from .train import checkpoint_folder, train

    opts = train_options(args)
    output = Path(args.output)
    if output.is_dir():
        raise ImpastoError(f"-o {output} is a directory; give the model file to write, e.g. {output / 'style.pt'}")
    given = [opts.style, getattr(args, "config", None), getattr(args, "resume", None), opts.weights]
    refuse_overwriting_inputs(output, [p for p in given if p and p != "random"])
    if opts.data:
        refuse_writing_inside(output, opts.data, "the training data folder")
    for path in (output, checkpoint_folder(opts, output) / "checkpoint.pt"):
        check_writable(path)  # now, not after the training
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports (and writes)
        opts.quiet = True
    bar = _StepBar(opts.quiet)
    try:
        result = train(opts, args.output, getattr(args, "resume", None), [bar])
    finally:
        bar.close()
    if result.interrupted:
        where = checkpoint_folder(opts, args.output)
        if not opts.quiet or os.environ.get("RANK", "0") == "0":
            print(f"{PROG}: interrupted at step {result.step}/{result.total}; continue with --resume {where}",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    if not opts.quiet:
        done = f"loss {result.last['loss']:.5g}" if result.last else "nothing left to train"
        print(f"wrote {args.output} ({result.step} steps, {done})", file=sys.stderr)
    return 0


class _StepBar:
    """Steps/s, ETA and the loss terms (of this process's batches)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None

    def __call__(self, step: int, total: int, terms: dict[str, float]) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step - 1, unit="step", file=sys.stderr, dynamic_ncols=True,
                            desc="training")
        shown = {k: f"{v:.4g}" for k, v in terms.items() if k != "skipped" or v}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- apply ---------------------------------------------------------------------------------------


def add_apply(sub: Any) -> None:
    p = sub.add_parser("apply", help="stylize images, folders and videos with a trained or imported network")
    p.add_argument("model", help="an impasto model file (from train or import)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, video files")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="directory for the results")
    p.add_argument("--batch-size", type=int, default=4, help="images or frames per batch (%(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16"], default="auto",
                   help="auto: float32 (TF32 convolutions on CUDA); fp16 on CUDA only")
    p.add_argument("--runtime", choices=["auto", "torch", "onnxruntime"], default="auto",
                   help="auto: ONNX Runtime on the CPU when installed (exported once per model, cached in "
                        "$IMPASTO_CACHE or ~/.cache/impasto), PyTorch elsewhere")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(run=run_apply)


def run_apply(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..files import check_writable_folder
    from ..perceptual import resolve_device
    from .apply import Failure, Job, Stylizer, plan_jobs, stylize_images
    from .models import load_model

    if args.batch_size < 1:
        raise ImpastoError(f"--batch-size must be positive, got {args.batch_size}")
    jobs = plan_jobs(args.inputs, args.output)
    check_writable_folder(args.output)
    device = resolve_device(args.device)
    net, meta = load_model(args.model, device)
    def exporting(path: Path) -> None:
        if not args.quiet:
            print(f"{PROG}: preparing this network for ONNX Runtime (once; cached as {path})", file=sys.stderr)

    stylizer = Stylizer(net, device, args.precision, args.runtime, exporting)
    info = {"impasto": __version__, "command": "apply", "model": str(args.model), "style": meta.get("style")}
    failures: list[Failure] = []
    files = tqdm(total=len(jobs), unit="file", file=sys.stderr, disable=args.quiet, desc="stylizing")

    def done(job: Job, failure: Failure | None) -> None:
        if failure is not None:
            files.write(f"{PROG}: error: {failure.source}: {failure.reason}", file=sys.stderr)
        files.update(1)

    try:
        failures += stylize_images(stylizer, [j for j in jobs if not j.video], args.batch_size, info, done)
        for job in (j for j in jobs if j.video):
            failure = _apply_video(stylizer, job, args, files)
            if failure is not None:
                failures.append(failure)
            done(job, failure)
    finally:
        files.close()
    if failures:
        print(f"{PROG}: {len(failures)} of {len(jobs)} file(s) failed", file=sys.stderr)
        return EXIT_SOME_FAILED
    if not args.quiet:
        print(f"wrote {len(jobs)} file(s) to {args.output}", file=sys.stderr)
    return 0


def _apply_video(stylizer: Any, job: Any, args: argparse.Namespace, files: Any) -> Any:
    from tqdm import tqdm

    from .apply import Failure, stylize_video

    frames = tqdm(unit="frame", file=sys.stderr, disable=args.quiet, desc=job.source.name, leave=False)
    try:
        def start(total: int) -> None:
            frames.reset(total=total or None)

        stylize_video(stylizer, job, args.batch_size, frames.update, start)
        return None
    except ImpastoError as e:
        return Failure(job.source, str(e))
    except Exception as e:  # a broken stream fails this file only; the others go on
        return Failure(job.source, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    finally:
        frames.close()


# --- export and import ---------------------------------------------------------------------------


def add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (dynamic size) or TorchScript")
    p.add_argument("model")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("-o", "--output", help="output file (default: MODEL with .onnx or .torchscript.pt)")
    p.add_argument("--no-check", action="store_true", help="skip comparing onnxruntime's output with PyTorch's")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    import torch

    from ..files import check_writable, refuse_overwriting_inputs
    from .export import SUFFIX, export_model, onnx_difference
    from .models import load_model

    net, _ = load_model(args.model)
    output = Path(args.output or Path(args.model).with_suffix(SUFFIX[args.format]))
    refuse_overwriting_inputs(output, [args.model])
    check_writable(output)
    export_model(net, output, args.format)
    message = f"wrote {output}"
    if args.format == "onnx" and not args.no_check:
        diff = onnx_difference(net, output, torch.rand(1, 3, 61, 83, generator=torch.Generator().manual_seed(0)))
        message += f" (onnxruntime vs PyTorch on a 83x61 image: max difference {diff:.2g})"
        if diff > 1e-3:
            print(f"{PROG}: error: {message}", file=sys.stderr)
            return EXIT_SOME_FAILED
    print(message, file=sys.stderr)
    return 0


def add_import(sub: Any) -> None:
    p = sub.add_parser("import", help="convert a pretrained network from another toolkit into an impasto model")
    p.add_argument("source", help="lengstrom/fast-style-transfer network as a deeplearn.js dump (folder with manifest.json)")
    p.add_argument("-o", "--output", required=True, help="the model file to write (.pt)")
    p.set_defaults(run=run_import)


def run_import(args: argparse.Namespace) -> int:
    from ..files import check_writable, refuse_overwriting_inputs, refuse_writing_inside
    from .importers import import_lengstrom
    from .models import save_model

    refuse_overwriting_inputs(args.output, [args.source])
    refuse_writing_inside(args.output, args.source, "the network's folder")
    check_writable(args.output)
    net, meta = import_lengstrom(args.source)
    save_model(args.output, net, {**meta, "impasto": __version__})
    print(f"wrote {args.output} (style {meta['style']!r}, from {meta['imported_from']})", file=sys.stderr)
    return 0
