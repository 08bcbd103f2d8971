"""The `impasto` command: thin subcommands over the Python API.

A user's mistake prints one line on stderr and exits 2; Ctrl-C keeps the best image and the state.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, images, interrupts
from .allocator import keep_freed_memory
from .errors import EXIT_INTERRUPTED, EXIT_USAGE, ImpastoError, warn

PROG = "impasto"
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe


class _Formatter(argparse.HelpFormatter):
    """Defaults in help as the options take them: a list as "relu1_1,relu2_1", not a Python list."""

    def _expand_help(self, action: argparse.Action) -> str:
        if isinstance(action.default, list):
            action = copy.copy(action)
            action.default = ",".join(map(str, action.default))
        return super()._expand_help(action)


class Parser(argparse.ArgumentParser):
    """argparse with errors on one line, exit code 2, list defaults written as the options take them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _list_of(kind: type, empty: bool = False):
    """Parse '1,2,3' (and, with nargs='+', '1 2 3') into a list of `kind`; an empty one only where `empty`
    (layers: --style-layers '' reconstructs the content alone)."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values and not (empty and not text.strip()):
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")
        return values
    parse.__name__ = f"list of {kind.__name__}"
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _flatten(values: list[list] | None) -> list | None:
    return None if values is None else [v for group in values for v in group]


def add_stylize(sub: Any) -> None:
    from .artistic import StylizeOptions

    d = StylizeOptions()
    p = sub.add_parser("stylize", help="artistic style transfer by optimization (Gatys et al.)",
                       description="Optimize an image to match CONTENT's features and the STYLE images' Gram statistics.")
    p.add_argument("content", help="content image")
    p.add_argument("styles", nargs="+", metavar="style", help="one or more style images")
    p.add_argument("-o", "--output", required=True, help="output image (.png keeps the run's parameters)")
    g = _size_group(p, d, "scale")
    g.add_argument("--scales", type=_list_of(int), help="coarse-to-fine longer sides, e.g. 256,512,1024; the last is the output size; each scale starts from the previous result, upsampled (with --init content: plus the content's finer detail)")
    g.add_argument("--scale-iterations", type=_list_of(int), help="iterations at each scale, e.g. 300,150,50")
    g = p.add_argument_group("styles")
    g.add_argument("--style-blend-weights", type=_list_of(float), nargs="+", help="weight of each style (normalized to sum 1)")
    g.add_argument("--style-scales", type=_list_of(float), nargs="+", help="each style's width relative to the content's (1.0)")
    g = _loss_group(p, d)
    colors = g.add_mutually_exclusive_group()  # both at once would silently keep the last one
    colors.add_argument("--preserve-color", choices=["none", "luminance", "histogram"], default=d.preserve_color,
                        help="keep the content's colours (Gatys et al. 2016) (%(default)s)")
    colors.add_argument("--preserve-colors", dest="preserve_color", action="store_const", const="luminance",
                        help="same as --preserve-color luminance (neural_style.py)")
    _common_groups(p, d)
    p.set_defaults(run=run_stylize)


def add_photo(sub: Any) -> None:
    from .photo import PhotoOptions

    d = PhotoOptions()
    p = sub.add_parser("photo", help="photorealistic style transfer (Luan et al., Deep Photo Style Transfer)",
                       description="Give CONTENT the look of the STYLE photo (colour, tone, light) while keeping it a photograph.")
    p.add_argument("content", help="photo whose look is to be changed")
    p.add_argument("style", help="reference photo whose look is wanted")
    p.add_argument("-o", "--output", required=True, help="output image (.png keeps the run's parameters)")
    g = _size_group(p, d, "pass")
    g.add_argument("--style-scale", dest="style_scales", type=_list_of(float), help="the style photo's width relative to the content's (1.0)")
    g.add_argument("--no-full-resolution", dest="full_resolution", action="store_false",
                   help="write the result at --size instead of the content's full size")
    g = p.add_argument_group("semantic masks")
    g.add_argument("--content-mask", help="colour-coded segmentation of the content (palette of Luan et al. or any shared colours)")
    g.add_argument("--style-mask", help="colour-coded segmentation of the style photo, same colours as --content-mask")
    g.add_argument("--auto-masks", type=int, default=d.auto_masks, metavar="K",
                   help="with no masks: segment both photos into K regions and pair them by colour and position")
    g = _loss_group(p, d)
    g.add_argument("--affine-weight", type=float, default=d.affine_weight,
                   help="weight of the matting-Laplacian photorealism term (%(default)s)")
    g.add_argument("--no-two-pass", dest="two_pass", action="store_false",
                   help="one pass with the regularizer instead of a first pass without it")
    g.add_argument("--no-smooth", dest="smooth", action="store_false", help="skip the local-affine smoothing post-process")
    g.add_argument("--smooth-radius", type=_positive_int, default=d.smooth_radius, help="window radius of the smoothing (%(default)s)")
    g.add_argument("--smooth-eps", type=float, default=d.smooth_eps, help="regularization of the smoothing (%(default)s)")
    _common_groups(p, d)
    p.set_defaults(run=run_photo)


def _size_group(p: argparse.ArgumentParser, d: Any, unit: str) -> Any:
    g = p.add_argument_group("size and iterations")
    g.add_argument("--iterations", type=_positive_int, default=d.iterations, help=f"iterations per {unit} (%(default)s)")
    g.add_argument("--size", type=_positive_int, default=d.size, help="longer side of the optimized image in pixels (%(default)s; --width and --scales override it)")
    g.add_argument("--width", type=_positive_int, help="width of the optimized image in pixels, aspect kept (overrides --size)")
    return g


def _loss_group(p: argparse.ArgumentParser, d: Any) -> Any:
    g = p.add_argument_group("loss")
    g.add_argument("--content-weight", type=float, default=d.content_weight, help="(%(default)s)")
    g.add_argument("--style-weight", type=float, default=d.style_weight, help="(%(default)s)")
    g.add_argument("--tv-weight", type=float, default=d.tv_weight, help="total variation weight (%(default)s)")
    g.add_argument("--tv-power", type=float, default=d.tv_power, help="TV exponent: 2 squared, 1.25 Keras-style, 1 edge-preserving (%(default)s)")
    g.add_argument("--model", choices=["vgg19", "vgg16"], default=d.model)
    g.add_argument("--pooling", choices=["max", "avg"], default=d.pooling)
    g.add_argument("--content-layers", type=_list_of(str, empty=True), default=d.content_layers,
                   help="layers whose features the result keeps from the content, comma-separated (%(default)s)")
    g.add_argument("--style-layers", type=_list_of(str, empty=True), default=d.style_layers,
                   help="layers whose Gram matrices the result takes from the styles (%(default)s)")
    g.add_argument("--content-layer-weights", type=_list_of(float), help="weight per content layer")
    g.add_argument("--style-layer-weights", type=_list_of(float), help="weight per style layer (equal by default)")
    g.add_argument("--style-layer-weight-exp", type=float, default=d.style_layer_weight_exp,
                   help="layer i gets exp**i before normalization, as in neural_style.py (%(default)s)")
    return g


def _common_groups(p: argparse.ArgumentParser, d: Any) -> None:
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=["lbfgs", "adam"], default=d.optimizer)
    g.add_argument("--learning-rate", "--lr", type=float, help="step size (1.0 for L-BFGS, 0.02 for Adam)")
    g.add_argument("--beta1", type=float, default=d.beta1)
    g.add_argument("--beta2", type=float, default=d.beta2)
    g.add_argument("--epsilon", type=float, default=d.epsilon)
    g.add_argument("--lbfgs-history", type=_positive_int, default=d.lbfgs_history, help="L-BFGS memory (%(default)s)")
    g.add_argument("--init", default=d.init, help="content, noise, or an image path (%(default)s)")
    g.add_argument("--initial", dest="init", help="start from this image (same as --init PATH)")
    g.add_argument("--initial-noiseblend", type=float, default=d.initial_noiseblend, help="blend of noise into the start (0-1)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the noise start and of everything random: the same seed, the same image on CPU (%(default)s)")
    g = p.add_argument_group("network weights and device")
    g.add_argument("--weights", "--network", dest="weights",
                   help="VGG weights: .pth (torchvision or impasto) or MatConvNet .mat; 'random' for experiments. "
                        "Default: $IMPASTO_WEIGHTS, else torchvision's file via torch.hub (downloaded once)")
    g.add_argument("--weights-format", choices=["auto", "torchvision", "caffe", "matconvnet"], default=d.weights_format,
                   help="input convention of the weights (auto: by extension)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=d.device)
    g.add_argument("--amp", action="store_true", help="float16 mixed precision for the network on CUDA")
    g = p.add_argument_group("output, progress and state")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar (--print-iterations lines still print)")
    g.add_argument("--print-iterations", type=int, default=0, help="print the losses every N iterations")
    g.add_argument("--checkpoint-output", help="path pattern for checkpoint images, e.g. out/ckpt_%%s.png")
    g.add_argument("--checkpoint-iterations", type=int, default=0, help="write a checkpoint image every N iterations")
    g.add_argument("--side-by-side", metavar="PATH", help="also write content | style(s) | result on one sheet")
    g.add_argument("--state", metavar="DIR", help="save resumable state in DIR every --state-every iterations")
    g.add_argument("--state-every", type=_positive_int, default=50, help="iterations between state saves (%(default)s)")
    g.add_argument("--resume", metavar="DIR", help="continue the run whose state is in DIR")


def options_from_args(args: argparse.Namespace, kind: type | None = None) -> Any:
    """The engine's options dataclass filled from the parsed arguments."""
    from .artistic import StylizeOptions

    kind = kind or StylizeOptions
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(kind) if hasattr(args, f.name)}
    for name in ("style_blend_weights", "style_scales"):
        value = values.get(name)
        if value and isinstance(value[0], list):
            values[name] = _flatten(value)
    return kind(**values)


# Options that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"iterations", "scale_iterations", "device"}


def run_stylize(args: argparse.Namespace) -> int:
    from .artistic import stylize_tensors

    opts = options_from_args(args)
    opts.check(len(args.styles))

    def engine(callbacks: list[Any], resume: dict | None) -> Any:
        content = images.load_image(args.content)
        styles = [images.load_image(s) for s in args.styles]
        return [content, *styles], stylize_tensors(content, styles, opts, callbacks, resume)

    return _run(args, "stylize", opts, [args.content, *args.styles], engine)


def run_photo(args: argparse.Namespace) -> int:
    from .photo import PhotoOptions, photo_transfer
    from .photo.transfer import check_masks

    opts = options_from_args(args, PhotoOptions)
    opts.check(1)
    check_masks(args.content_mask, args.style_mask, opts)  # before loading anything
    masks = [m for m in (args.content_mask, args.style_mask) if m]

    def engine(callbacks: list[Any], resume: dict | None) -> Any:
        content, style = images.load_image(args.content), images.load_image(args.style)
        content_mask, style_mask = (images.load_image(m) for m in masks) if masks else (None, None)
        return [content, style], photo_transfer(content, style, opts, content_mask, style_mask, callbacks, resume)

    extra = {"content_mask": args.content_mask, "style_mask": args.style_mask} if masks else {}
    return _run(args, "photo", opts, [args.content, args.style, *masks], engine, extra)


def _run(args: argparse.Namespace, command: str, opts: Any, inputs: list[str], engine: Any,
         extra: dict[str, Any] | None = None) -> int:
    """What every optimization command shares: checks before any work, progress, checkpoints, state,
    resume, atomic output with metadata, the side-by-side sheet, and Ctrl-C."""
    from .checkpoints import Checkpointer, load_state, save_state
    from .progress import ProgressBar

    state_dir = args.state or args.resume
    _check_paths(args, inputs + ([opts.init] if opts.init not in ("content", "noise") else []), state_dir)
    given = {"content": args.content, "styles": list(args.styles) if command == "stylize" else [args.style],
             **(extra or {})}
    meta = {"impasto": __version__, "command": command, **given, "options": opts.to_dict()}
    state_meta = {**meta, "cwd": os.getcwd()}  # what relative paths were relative to, for a resume elsewhere
    resume = None
    if args.resume:
        resume, saved = load_state(args.resume)
        if saved.get("command", command) != command:
            raise ImpastoError(f"the run saved in {args.resume} is an `impasto {saved['command']}` run; resume it "
                               "with that command")
        _check_resume(saved, given, opts.to_dict(), args.resume)
    bar = ProgressBar(args.quiet, args.print_iterations)
    checkpoints = Checkpointer(args.checkpoint_output, args.checkpoint_iterations, state_dir, args.state_every,
                               state_meta)
    try:
        shown, result = engine([bar, checkpoints], resume)
    finally:
        bar.close()
    outcome = {"loss": result.loss if math.isfinite(result.loss) else None, "iterations": result.iterations}
    meta.update(outcome)
    state_meta.update(outcome)
    target = state_dir or (f"{args.output}.state" if result.interrupted else None)
    with interrupts.held():  # a second Ctrl-C must not cost what the first one asked to save
        if target:  # the state first: if the image cannot be written after all, the run can still be resumed
            try:
                save_state(target, result.state, state_meta)
            except ImpastoError as e:  # a full disk (a state can be 600 MB) must not cost the image as well
                warn(f"the resumable state was not saved: {e}")
                target = None
        images.save_image(result.image, args.output, meta)
        if args.side_by_side:
            images.save_image(images.side_by_side([*shown, result.image]), args.side_by_side)
    if result.interrupted:
        resume_hint = f"; continue with --resume {target}" if target else ""
        print(f"{PROG}: interrupted after {result.iterations} iterations; best image saved to {args.output}"
              + resume_hint, file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.quiet:
        print(f"wrote {args.output} (loss {result.loss:.5g}, {result.iterations} iterations)", file=sys.stderr)
    return 0


def _check_paths(args: argparse.Namespace, inputs: list[str], state_dir: str | None) -> None:
    """Before any work: the inputs exist, no output overwrites one, and every output can be written."""
    from .checkpoints import STATE_FILE, check_pattern, checkpoint_path
    from .files import check_writable, refuse_overwriting_inputs, same_file

    for path in inputs:
        if not Path(path).exists():
            raise ImpastoError(f"image not found: {path}")
    for written in (args.output, args.side_by_side):
        if written:
            refuse_overwriting_inputs(written, inputs)
            images.check_output_format(written)
    if args.side_by_side:
        refuse_overwriting_inputs(args.side_by_side, [args.output])
    first_checkpoint = None
    if args.checkpoint_output:
        check_pattern(args.checkpoint_output)
        images.check_output_format(checkpoint_path(args.checkpoint_output, 1))
    if bool(args.checkpoint_iterations) != bool(args.checkpoint_output):
        warn("checkpoint images need both --checkpoint-output and --checkpoint-iterations; none will be written")
    elif args.checkpoint_output:
        first_checkpoint = checkpoint_path(args.checkpoint_output, 1)
        _refuse_checkpoints_overwriting_inputs(args.checkpoint_output, args.checkpoint_iterations, inputs)
    if state_dir:
        for written in filter(None, [args.output, args.side_by_side]):
            if same_file(Path(written), Path(state_dir)):
                raise ImpastoError(f"the state folder {state_dir} is also the output {written}; give another")
    state_file = state_dir and str(Path(state_dir) / STATE_FILE)
    for path in filter(None, [args.output, args.side_by_side, state_file, first_checkpoint]):
        check_writable(path)  # now: a run whose result cannot be written at its end is lost


def _refuse_checkpoints_overwriting_inputs(pattern: str, every: int, inputs: list[str]) -> None:
    """No checkpoint image may be an input: tried for the numbers an input's name holds (start_00300.png
    is checkpoint 300 of start.png) and for the first two checkpoints (a pattern that ignores the number)."""
    from .checkpoints import checkpoint_path
    from .files import refuse_overwriting_inputs

    for path in inputs:
        numbers = {int(n) for n in re.findall(r"\d+", Path(path).name)} | {every, 2 * every}
        for n in sorted(n for n in numbers if n > 0 and n % every == 0):
            refuse_overwriting_inputs(checkpoint_path(pattern, n), [path])


PATH_KEYS = ("content", "styles", "content_mask", "style_mask")


def _check_resume(meta: dict[str, Any], given: dict[str, Any], options: dict[str, Any], directory: str) -> None:
    """A resumed run must read the same files (by path, wherever it is started from) with the same options."""
    from .files import same_inputs

    for key in PATH_KEYS:
        value, now = meta.get(key), given.get(key)
        if value is None and now is not None:
            raise ImpastoError(f"the run saved in {directory} used no {key.replace('_', '-')}; resume it without one")
        if value is not None and (now is None or not same_inputs(value, now, meta.get("cwd"))):
            _mismatch(key, now, value, directory)
    for key, value in meta.get("options", {}).items():
        now = options.get(key, _MISSING)
        if key in RESUMABLE_CHANGES or now == value:
            continue
        if key in PATH_OPTIONS and same_inputs(value, now, meta.get("cwd")):
            continue
        _mismatch(key, now, value, directory)


PATH_OPTIONS = ("init", "weights")  # options that may name a file


_MISSING = object()


def _mismatch(key: str, now: Any, saved: Any, directory: str) -> NoReturn:
    flag = key if key in ("content", "styles") else "--" + key.replace("_", "-")
    if now is None or now is _MISSING:
        raise ImpastoError(f"the run saved in {directory} used {flag} {saved!r}; give it again to resume")
    raise ImpastoError(f"{flag} is {now!r} but the run saved in {directory} used {saved!r}")


def add_info(sub: Any) -> None:
    p = sub.add_parser("info", help="print the parameters stored in an output image or a fast-style model")
    p.add_argument("image", help="a PNG/JPEG written by impasto, or a model file (.pt)")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(run=run_info)


def run_info(args: argparse.Namespace) -> int:
    if Path(args.image).suffix.lower() in (".pt", ".pth"):
        return _model_info(args)
    meta = images.read_metadata(args.image)
    if meta is None or "impasto" not in meta:  # every run's metadata names its version; a JPEG comment may be JSON
        raise ImpastoError(f"{args.image} has no impasto parameters (was it written by impasto?)")
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True))
        return 0
    for key, value in meta.items():
        if key != "options":
            print(f"{key}: {value}")
    options = meta.get("options")
    for key, value in sorted(options.items() if isinstance(options, dict) else []):
        print(f"  {key}: {value}")
    if meta.get("command") in ("stylize", "photo") and isinstance(meta.get("content"), str) \
            and isinstance(meta.get("styles"), list):
        print("reproduce: " + reproduce_command(meta))
    return 0


def _model_info(args: argparse.Namespace) -> int:
    """What a fast-style model file says about itself: architecture, style, training or origin."""
    from .fast.models import read_payload

    payload = read_payload(args.image)
    info = {"network": payload["spec"], **(payload.get("meta") or {})}
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in sorted(value.items()):
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0


def reproduce_command(meta: dict[str, Any]) -> str:
    """A command line that reruns a run from its stored parameters (non-default options only)."""
    import shlex

    from .artistic import StylizeOptions
    from .photo import PhotoOptions

    command = meta.get("command", "stylize")
    kind = PhotoOptions if command == "photo" else StylizeOptions
    defaults = kind().to_dict()
    def path(p: str) -> str:  # a file named -c.png is not an option
        return f"./{p}" if p.startswith("-") else p

    words = ["impasto", command, path(meta["content"]), *map(path, meta["styles"]), "-o", "OUT.png"]
    for key in ("content_mask", "style_mask"):
        if meta.get(key):
            words += ["--" + key.replace("_", "-"), path(meta[key])]
    options = meta.get("options")
    for key, value in (options.items() if isinstance(options, dict) else []):
        if value == defaults.get(key) or value is None:
            continue
        flag = kind.flag(key)
        if isinstance(value, bool):
            words += [flag] if value else [f"--no-{key.replace('_', '-')}"]
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            words += [f"{flag}={text}"] if text.startswith("-") else [flag, text]  # a value, not an option
    return " ".join(shlex.quote(w) for w in words)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="impasto: neural style transfer")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    from .fast.commands import add_apply, add_export, add_import, add_train

    add_stylize(sub)
    add_photo(sub)
    add_train(sub)
    add_apply(sub)
    add_export(sub)
    add_import(sub)
    add_info(sub)
    return parser


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    sigint = None  # the Ctrl-C handler to restore, where an interrupt made this ignore them while it unwinds
    try:
        with interrupts.terminate_as_interrupt():  # `kill` keeps the best image and the state, as Ctrl-C does
            args = build_parser().parse_args(argv)  # imports torch: a second or two, Ctrl-C included
            keep_freed_memory()  # no page faults on every iteration's buffers (allocator.py)
            return int(args.run(args))
    except ImpastoError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # what the run held (progress bars ...) is collected as this returns: a second Ctrl-C then would
        # land in some __del__ and print "Exception ignored"
        if threading.current_thread() is threading.main_thread():
            sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `impasto info OUT.png | head -1`: the reader is gone, as with any Unix tool
        from .progress import silence_stdout

        silence_stdout()  # no second error when Python flushes at exit
        return EXIT_BROKEN_PIPE
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        command = (argv or sys.argv[1:] or [""])[0]
        hint = {"stylize": "a smaller --size", "photo": "a smaller --size", "train": "a smaller --batch-size or "
                "--image-size", "apply": "smaller images, or fewer at once"}.get(command, "smaller inputs")
        print(f"{PROG}: error: out of memory; use {hint}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = previous
        if sigint is not None:
            gc.collect()  # what a reference cycle holds too, still with Ctrl-C ignored
            signal.signal(signal.SIGINT, sigint)


def _out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, or PyTorch's allocators failing (a RuntimeError on the CPU, OutOfMemoryError on
    CUDA): what a guess of the memory a run needs can still miss."""
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(e))


def entry() -> NoReturn:
    """The `impasto` command: `main`, then exit with Ctrl-C ignored, so that one pressed again while Python
    shuts down (after a run has saved its result and said so) prints no traceback."""
    code = main()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
