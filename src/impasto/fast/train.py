"""Training a style network on a folder of photos with a VGG perceptual loss (Johnson et al. 2016).

Runs alone or under `torchrun` (DistributedDataParallel: each rank takes its shard of every epoch's
permutation, gradients are averaged, only rank 0 writes). The data order and every random crop are
functions of (seed, epoch, index), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from .. import images, interrupts
from ..errors import ImpastoError, refuse_non_finite, warn
from ..files import atomic_write, same_inputs
from ..losses import PerceptualLoss, StyleTarget, gram_matrix
from ..nets import VGGFeatures, load_vgg
from ..perceptual import available_bytes, check_min_size, perceptual_loss, resolve_device
from .models import FORMAT, model_payload, save_model
from .transformer import TransformerNet, TransformerSpec

CHECKPOINT_GLOB = "checkpoint_*.pt"
# Options that do not change what is learned: they may differ between a run and its resumption.
RESUMABLE_CHANGES = frozenset({"epochs", "steps", "checkpoint_every", "keep_checkpoints", "checkpoint_dir",
                               "log_dir", "log_every", "sample_every", "workers", "device", "quiet"})


@dataclass
class TrainOptions:
    """Every setting of a training run; the keys of a `--config` YAML file."""

    style: str = ""
    data: str = ""
    style_size: int | None = None  # long side of the style image; None keeps its size
    content_weight: float = 1.0
    style_weight: float = 10.0
    tv_weight: float = 0.0
    tv_power: float = 2.0
    content_layers: list[str] = field(default_factory=lambda: ["relu2_2"])
    style_layers: list[str] = field(default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3", "relu4_3"])
    content_layer_weights: list[float] | None = None
    style_layer_weights: list[float] | None = None
    style_layer_weight_exp: float = 1.0
    model: str = "vgg16"
    pooling: str = "max"
    weights: str | None = None
    weights_format: str = "auto"
    image_size: int = 256
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # area fraction of each random crop
    batch_size: int = 4
    epochs: int = 2
    steps: int | None = None  # overrides epochs
    learning_rate: float = 1e-3
    width: float = 1.0
    checkpoint_every: int = 1000
    checkpoint_dir: str | None = None  # default: MODEL.ckpt/ beside the model
    keep_checkpoints: int = 3
    log_dir: str | None = None  # TensorBoard event files
    log_every: int = 50
    sample_every: int = 500
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "options") -> TrainOptions:
        names = {f.name for f in fields(cls)}
        clean = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise ImpastoError(f"unknown option {unknown[0]!r} in {source}")
        kinds = {f.name: str(f.type) for f in fields(cls)}
        return cls(**{k: _coerce(k, v, kinds[k], source) for k, v in clean.items()})

    def check(self) -> None:
        refuse_non_finite(self, lambda name: name.replace("_", "-"))
        for name in ("image_size", "batch_size", "epochs", "checkpoint_every", "log_every", "sample_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ImpastoError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        if self.steps is not None and self.steps < 1:
            raise ImpastoError(f"steps must be a positive integer, got {self.steps}")
        if self.workers < 0 or self.keep_checkpoints < 1:
            raise ImpastoError("workers must be >= 0 and keep-checkpoints >= 1")
        if not (self.learning_rate > 0 and self.width > 0):
            raise ImpastoError("learning-rate and width must be positive")
        lo, hi = (list(self.crop_scale) + [None, None])[:2]
        if len(self.crop_scale) != 2 or not (lo is not None and hi is not None and 0 < lo <= hi <= 1):
            raise ImpastoError(f"crop-scale takes two numbers 0 < MIN <= MAX <= 1, got {self.crop_scale}")
        if not self.style or not Path(self.style).is_file():
            raise ImpastoError(f"style image not found: {self.style or '(none given; use --style)'}")
        if not self.data or not Path(self.data).is_dir():
            raise ImpastoError(f"training data folder not found: {self.data or '(none given; use --data)'}")


def _coerce(name: str, value: Any, kind: str, source: str) -> Any:
    """A config value as its option's type: YAML reads `1e-3` as a string and `3.0` as a float, and a
    list option may be given as one value or a comma-separated string."""
    optional, base = kind.endswith("| None"), kind.replace(" | None", "")
    flag = name.replace("_", "-")

    def bad(what: str) -> ImpastoError:
        return ImpastoError(f"{source}: {flag} must be {what}, got {value!r}")

    if value is None:
        if optional:
            return None
        raise bad("given a value")
    if base == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if base.startswith("list["):
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        item_kind = "float" if "float" in base else "str"
        return [_coerce(name, v.strip() if isinstance(v, str) else v, item_kind, source) for v in items]
    if base in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad("a number")
        try:
            number = float(value)
        except ValueError:
            raise bad("a number") from None
        if base == "float":
            return number
        if not number.is_integer():
            raise bad("a whole number")
        return int(number)
    if isinstance(value, (list, dict, bool)):
        raise bad("a single value")
    return str(value)


# --- data ----------------------------------------------------------------------------------------


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """Every image file below `root` (by extension, skipping dot files and folders), in a stable order."""
    return images.files_below(root, images.IMAGE_SUFFIXES)


class PhotoFolder(torch.utils.data.Dataset):
    """Random-resized square crops of the photos in a folder, keyed by (epoch, index).

    The crop of a key is the same in every process and every run; an unreadable file gives None.
    """

    def __init__(self, files: Sequence[Path], size: int, crop_scale: Sequence[float], seed: int) -> None:
        self.files, self.size, self.crop_scale, self.seed = list(files), size, tuple(crop_scale), seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, str]:
        epoch, index = key
        path = self.files[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            with Image.open(path) as f:
                f.draft("RGB", (2 * self.size, 2 * self.size))  # JPEG: decode big photos at a reduced scale
                im = images.to_rgb(ImageOps.exif_transpose(f))  # 16-bit and alpha as load_image does
                box = random_crop_box(im.width, im.height, rng, self.crop_scale)
                crop = im.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            return None, str(path)
        return images.pil_to_tensor(crop), str(path)


def random_crop_box(width: int, height: int, rng: np.random.Generator,
                    scale: Sequence[float]) -> tuple[float, float, float, float]:
    """A crop covering a random fraction `scale` of the area with aspect ratio in [3/4, 4/3];
    the largest centred square if no such crop fits in 10 tries."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w <= width and h <= height:
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return (x, y, x + w, y + h)
    side = min(width, height)
    x, y = (width - side) / 2, (height - side) / 2
    return (x, y, x + side, y + side)


def collate(items: list[tuple[torch.Tensor | None, str]]) -> tuple[torch.Tensor | None, list[str]]:
    """Stack the readable crops; return the paths of the unreadable ones beside them."""
    good = [t for t, _ in items if t is not None]
    return (torch.stack(good) if good else None), [p for t, p in items if t is None]


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (epoch, index) keys from step `start` to `total`: each epoch a seeded permutation,
    split into equal contiguous shards, one per rank (the last partial batch is dropped)."""

    def __init__(self, n: int, batch: int, seed: int, rank: int, world: int, start: int, epochs: int,
                 steps: int | None = None) -> None:
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.per_epoch = (n // world) // batch
        if self.per_epoch == 0:
            raise ImpastoError(f"the data has {n} images; a batch of {batch} on {world} process(es) needs "
                               f"at least {batch * world}")
        self.start, self.total = start, steps or epochs * self.per_epoch

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = -1
        shard: list[int] = []
        for step in range(self.start, self.total):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.n, generator=g).tolist()
                size = self.n // self.world
                shard = perm[self.rank * size:(self.rank + 1) * size]
            i = (step % self.per_epoch) * self.batch
            yield [(epoch, k) for k in shard[i:i + self.batch]]


# --- the step ------------------------------------------------------------------------------------


def style_loss_template(vgg: VGGFeatures, style: torch.Tensor, opts: TrainOptions) -> PerceptualLoss:
    """The loss with the style's Gram targets filled in; content targets come per batch."""
    with torch.inference_mode():
        feats = vgg(style.unsqueeze(0), opts.style_layers)
        grams = {k: gram_matrix(feats[k].float()).clone() for k in opts.style_layers}
    return perceptual_loss(opts, {}, [StyleTarget(grams)])


def batch_loss(net: nn.Module, vgg: VGGFeatures, loss: PerceptualLoss,
               batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of the styled batch: its features against the content features of the batch itself, and
    its Grams against the style's."""
    with torch.no_grad():
        content = vgg(batch, loss.content_layer_weights)
    out = net(batch)
    return replace(loss, content_targets=content)(out, vgg(out))


def train_step(net: nn.Module, vgg: VGGFeatures, loss: PerceptualLoss, batch: torch.Tensor,
               optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One optimizer step on a batch in [0, 1]. Returns the loss and its terms."""
    total, terms = batch_loss(net, vgg, loss, batch)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    values = {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
    optimizer.step()
    return values


def checkpoint_folder(opts: TrainOptions, output: str | os.PathLike[str]) -> Path:
    """Where a run's checkpoints go: --checkpoint-dir, else MODEL.ckpt/ beside the model."""
    return Path(opts.checkpoint_dir or f"{output}.ckpt")


def step_bytes(net: nn.Module, vgg: VGGFeatures, loss: PerceptualLoss, batch: int, size: int,
               device: torch.device) -> int:
    """Rough peak memory of a training step on `batch` crops of size x size: what a small step keeps for
    backward, measured, scaled by the pixels (activations grow with them), a quarter more for the gradients
    that backward holds at once, plus the weights with their gradients and Adam's two moments. Measured on a
    CPU: 1.2x a step's real peak at 256 px (batch 4), 1.7x at 128 px (batch 2): above it, as a guard should be."""
    probe = max(2 * vgg.downsampling, 32)
    params = {p.data_ptr() for m in (net, vgg) for p in m.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            kept[t.data_ptr()] = max(kept.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batch_loss(net, vgg, loss, torch.rand(1, 3, probe, probe, device=device))
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    return int(1.25 * sum(kept.values()) * batch * (size / probe) ** 2) + 4 * weights


def check_training_memory(net: nn.Module, vgg: VGGFeatures, loss: PerceptualLoss, opts: TrainOptions,
                          device: torch.device) -> None:
    """Refuse, before any step, a batch and crop size that will not fit (80 % of the device's memory)."""
    need, have = step_bytes(net, vgg, loss, opts.batch_size, opts.image_size, device), available_bytes(device)
    if need > 0.8 * have:
        raise ImpastoError(f"a training step on {opts.batch_size} crops of {opts.image_size}x{opts.image_size} needs "
                           f"about {need / 2**30:.1f} GiB but {device.type} has {have / 2**30:.1f} GiB; "
                           "use a smaller --image-size or --batch-size")


# --- the run -------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    net: TransformerNet
    step: int
    total: int
    interrupted: bool = False
    skipped: set[str] = field(default_factory=set)  # unreadable files (each counted once)
    last: dict[str, float] = field(default_factory=dict)


@dataclass
class _Ranks:
    rank: int = 0
    world: int = 1
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _join_process_group(device: torch.device) -> _Ranks:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Ranks()
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return _Ranks(dist.get_rank(), dist.get_world_size(), created)


def _all_ranks_have(ok: bool, ranks: _Ranks, device: torch.device) -> bool:
    """Whether every rank has a batch this step (under DDP all must step together, or none)."""
    if ranks.world == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _device(opts: TrainOptions) -> torch.device:
    device = resolve_device(opts.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def train(opts: TrainOptions, output: str | os.PathLike[str], resume: str | os.PathLike[str] | None = None,
          callbacks: Sequence[Callable[[int, int, dict[str, float]], None]] = ()) -> TrainResult:
    """Train a network for `opts` and write it to `output` (rank 0 only). Ctrl-C saves a checkpoint."""
    opts.check()
    device = _device(opts)
    ranks = _join_process_group(device)
    try:
        return _train(opts, Path(output), resume, callbacks, device, ranks)
    finally:
        if ranks.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(opts: TrainOptions, output: Path, resume: str | os.PathLike[str] | None,
           callbacks: Sequence[Callable[[int, int, dict[str, float]], None]], device: torch.device,
           ranks: _Ranks) -> TrainResult:
    files = find_images(opts.data)
    if not files:
        suffixes = ", ".join(sorted(images.IMAGE_SUFFIXES))
        raise ImpastoError(f"no images found in {opts.data} (searched recursively for {suffixes})")
    torch.manual_seed(opts.seed)
    net = TransformerNet(TransformerSpec(width=opts.width)).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=opts.learning_rate)
    ckpt_dir = checkpoint_folder(opts, output)
    if resume is None and any(ckpt_dir.glob(CHECKPOINT_GLOB)):
        raise ImpastoError(f"{ckpt_dir} holds checkpoints of an earlier run; continue it with --resume {ckpt_dir}, "
                           "or remove them (or choose --checkpoint-dir) to start afresh")
    step = _resume(resume, opts, net, optimizer, device) if resume is not None else 0
    vgg = load_vgg(opts.model, [*opts.content_layers, *opts.style_layers], opts.pooling, opts.weights,
                   opts.weights_format, device)
    check_min_size(vgg, (opts.image_size, opts.image_size), "the training size")
    style = images.load_image(opts.style)
    if opts.style_size:
        style = images.resize(style, images.size_for_long_side(style.shape[-2], style.shape[-1], opts.style_size))
    check_min_size(vgg, tuple(style.shape[-2:]), "the style image")  # type: ignore[arg-type]
    loss = style_loss_template(vgg, style.to(device), opts)
    check_training_memory(net, vgg, loss, opts, device)
    sampler = EpochBatches(len(files), opts.batch_size, opts.seed, ranks.rank, ranks.world, step, opts.epochs,
                           opts.steps)
    loader = torch.utils.data.DataLoader(
        PhotoFolder(files, opts.image_size, opts.crop_scale, opts.seed), batch_sampler=sampler,
        num_workers=opts.workers, collate_fn=collate, pin_memory=device.type == "cuda")
    model: nn.Module = net
    if ranks.world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    writer = _Writer(opts, step) if ranks.main else None
    result = TrainResult(net, step, sampler.total)
    meta = {"style": Path(opts.style).name, "options": opts.to_dict()}
    trained = 0
    try:
        for batch, skipped in loader:
            # a step and its count (and a checkpoint) go together or not at all; with several ranks a held
            # Ctrl-C could leave one rank in an all-reduce that the others have left, so those stop at once
            with interrupts.held() if ranks.world == 1 else contextlib.nullcontext():
                result.skipped.update(skipped)
                terms = None
                if _all_ranks_have(batch is not None, ranks, device):  # a rank that skipped alone would hang DDP
                    assert batch is not None
                    batch = batch.to(device, non_blocking=True)
                    model.train()
                    terms = train_step(model, vgg, loss, batch, optimizer)
                step = result.step = step + 1  # committed: the weights are now those after this step
                if terms is not None:
                    result.last, trained = terms, trained + 1
                    if writer is not None:
                        writer.log(step, terms, batch, net)
                for callback in callbacks:
                    callback(step, sampler.total, {**result.last, "skipped": float(len(result.skipped))})
                if ranks.main and step % opts.checkpoint_every == 0 and step < sampler.total:
                    save_checkpoint(ckpt_dir, net, optimizer, step, opts, meta)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        if writer is not None:
            writer.close()
    if trained == 0 and not result.interrupted and result.skipped:
        raise ImpastoError(f"none of the images read in {opts.data} could be used, e.g. {min(result.skipped)}; "
                           "nothing was trained")
    if ranks.main:
        with interrupts.held():  # a second Ctrl-C must not cost the checkpoint the first one asked for
            save_checkpoint(ckpt_dir, net, optimizer, step, opts, meta)
            if not result.interrupted:
                save_model(output, net.eval(), {**meta, "steps": step})
    if result.skipped:
        warn(f"skipped {len(result.skipped)} unreadable image(s), e.g. {min(result.skipped)}")
    return result


# --- checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(directory: Path, net: TransformerNet, optimizer: torch.optim.Optimizer, step: int,
                    opts: TrainOptions, meta: dict[str, Any]) -> Path:
    """Model, optimizer state and step, atomically; only the newest `keep_checkpoints` are kept."""
    payload = {"model": model_payload(net, {**meta, "steps": step}), "optimizer": optimizer.state_dict(),
               "step": step, "options": opts.to_dict()}
    path = atomic_write(directory / f"checkpoint_{step:08d}.pt", lambda tmp: torch.save(payload, tmp))
    for old in sorted(directory.glob(CHECKPOINT_GLOB))[:-opts.keep_checkpoints]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or the newest one in a checkpoint directory."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob(CHECKPOINT_GLOB))
        if not found:
            raise ImpastoError(f"no checkpoint to resume in {p} (expected {CHECKPOINT_GLOB})")
        return found[-1]
    if not p.is_file():
        raise ImpastoError(f"checkpoint not found: {p}")
    return p


PATH_OPTIONS = frozenset({"style", "data", "weights"})  # the same file or folder by another path resumes


def _resume(path: str | os.PathLike[str], opts: TrainOptions, net: TransformerNet,
            optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Load a checkpoint's weights and optimizer state into `net` and `optimizer`; its step."""
    file = latest_checkpoint(path)
    try:
        payload = torch.load(file, map_location=device, weights_only=True)
        if isinstance(payload, dict) and payload.get("format") == FORMAT:
            raise ImpastoError(f"{file} is a finished model, not a training checkpoint; resume from its checkpoint "
                               f"directory (by default {file}.ckpt)")
        saved, step = payload["options"], int(payload["step"])
        state, optim_state = payload["model"]["state_dict"], payload["optimizer"]
    except ImpastoError:
        raise
    except Exception as e:
        raise ImpastoError(f"cannot read checkpoint {file} ({type(e).__name__}); is it from impasto train?") from None
    now = opts.to_dict()
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key in RESUMABLE_CHANGES or a == b or (key in PATH_OPTIONS and same_inputs(a, b)):
            continue
        raise ImpastoError(f"cannot resume {file}: {key} was {a!r}, now {b!r}")
    net.load_state_dict(state)
    optimizer.load_state_dict(optim_state)
    return step


# --- logs ----------------------------------------------------------------------------------------


class _Writer:
    """TensorBoard scalars (each loss term) and sample stylizations, when a log directory is set."""

    def __init__(self, opts: TrainOptions, step: int) -> None:
        self.opts = opts
        self.samples: torch.Tensor | None = None
        self.writer = None
        if opts.log_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImpastoError("--log-dir needs TensorBoard: pip install 'impasto[train]'") from None
            self.writer = SummaryWriter(opts.log_dir, purge_step=step or None)

    def log(self, step: int, terms: dict[str, float], batch: torch.Tensor, net: TransformerNet) -> None:
        if self.writer is None:
            return
        if step % self.opts.log_every == 0 or step == 1:
            for name, value in terms.items():
                self.writer.add_scalar(f"loss/{name}", value, step)
        if self.samples is None:
            self.samples = batch[:4].detach().clone()
            self.writer.add_images("photos", self.samples.cpu(), step)
        if step % self.opts.sample_every == 0 or step == 1:
            assert self.samples is not None
            with torch.no_grad():
                net.eval()
                self.writer.add_images("stylized", net(self.samples).clamp(0, 1).cpu(), step)
                net.train()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
