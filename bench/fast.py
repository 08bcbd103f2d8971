"""Benchmark of impasto's fast engine (Johnson et al. 2016 feed-forward network) against a reference written the
way pytorch/examples' fast_neural_style does it.

The reference: ConvLayer = ReflectionPad2d(k // 2) + Conv2d, InstanceNorm2d(affine=True), non-inplace ReLU,
residual blocks, UpsampleConvLayer = nearest interpolate x2 + reflection pad + conv; input 0..255, output clamped
to 0..255; torch.no_grad(), NCHW, default threads. It gets impasto's weights (state-dict keys mapped), so both
compute the same function: every variant prints its max |difference| to the reference's output, in [0, 1] units.
Its training step: VGG16 forward of y and of x separately, Gram per layer with bmm, MSE losses, Adam.

Times are medians of rounds in which every variant runs once in turn, after warm-up calls. Peak memory is each
row's own, in a fresh process (after the timing, two at a time): VmHWM minus the RSS before its first call, over
two calls. VGG weights are random (no internet here); timing does not depend on them.

    .venv/bin/python bench/fast.py            # apply at 512 and 1024 px, training at 256 px (~15 min on 2 cores)
    .venv/bin/python bench/fast.py --quick    # a check of the script (about a minute on a quiet machine)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from impasto import images
from impasto.fast import TransformerNet, TransformerSpec
from impasto.fast.apply import Stylizer
from impasto.fast.export import export_model
from impasto.losses import PerceptualLoss, StyleTarget, gram_matrix
from impasto.nets import VGGFeatures, load_vgg

warnings.filterwarnings("ignore", message="using random VGG weights")
T = TypeVar("T")
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "content"
STYLE_LAYERS, CONTENT_LAYER = ["relu1_2", "relu2_2", "relu3_3", "relu4_3"], "relu2_2"
VGG16: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512]  # torchvision, to relu4_3
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INFER = {"reference": "reference (eager NCHW, no_grad)", "stylizer": "impasto apply default (CPU: ONNX Runtime)",
         "nchw": "impasto apply --runtime torch (NCHW)", "compile": "impasto, torch.compile + freezing, ch-last",
         "ort": "impasto ONNX, ORT default session", "ort_tuned": "impasto ONNX, ORT ALL + intra_op=threads",
         "ort_nospin": "impasto ONNX, ORT ALL + intra_op, no spin"}
TRAIN = {"reference": "reference (pytorch/examples step)", "impasto": "impasto", "impasto_cl": "impasto, channels-last"}


# --- the reference: pytorch/examples fast_neural_style ---------------------------------------------------

class ConvLayer(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.reflection_pad, self.conv2d = nn.ReflectionPad2d(kernel // 2), nn.Conv2d(cin, cout, kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d(self.reflection_pad(x))


class UpsampleConvLayer(ConvLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.interpolate(x, mode="nearest", scale_factor=2))


class ResidualBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.in1 = ConvLayer(c, c, 3, 1), nn.InstanceNorm2d(c, affine=True)
        self.conv2, self.in2 = ConvLayer(c, c, 3, 1), nn.InstanceNorm2d(c, affine=True)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.in2(self.conv2(self.relu(self.in1(self.conv1(x))))) + x


class RefTransformerNet(nn.Module):
    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = TransformerSpec(width=width).channels
        self.conv1, self.in1 = ConvLayer(3, c1, 9, 1), nn.InstanceNorm2d(c1, affine=True)
        self.conv2, self.in2 = ConvLayer(c1, c2, 3, 2), nn.InstanceNorm2d(c2, affine=True)
        self.conv3, self.in3 = ConvLayer(c2, c3, 3, 2), nn.InstanceNorm2d(c3, affine=True)
        self.res = nn.Sequential(*[ResidualBlock(c3) for _ in range(5)])
        self.deconv1, self.in4 = UpsampleConvLayer(c3, c2, 3, 1), nn.InstanceNorm2d(c2, affine=True)
        self.deconv2, self.in5 = UpsampleConvLayer(c2, c1, 3, 1), nn.InstanceNorm2d(c1, affine=True)
        self.deconv3, self.relu = ConvLayer(c1, 3, 9, 1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.in3(self.conv3(self.relu(self.in2(self.conv2(self.relu(self.in1(self.conv1(x)))))))))
        y = self.relu(self.in5(self.deconv2(self.relu(self.in4(self.deconv1(self.res(y)))))))
        return self.deconv3(y)


def reference_from(net: TransformerNet) -> RefTransformerNet:
    """The reference with `net`'s weights. Convs and norms are registered in the same order in both networks,
    which maps impasto's state-dict keys to the reference's; strict loading checks every key and shape."""
    ref, kinds = RefTransformerNet(net.spec.width), (nn.Conv2d, nn.InstanceNorm2d)
    names = dict(zip([n for n, m in net.named_modules() if isinstance(m, kinds)],
                     [n for n, m in ref.named_modules() if isinstance(m, kinds)], strict=True))
    ref.load_state_dict({f"{names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in net.state_dict().items()})
    return ref


class RefVgg16(nn.Module):
    """pytorch/examples' Vgg16: torchvision's vgg16().features (in-place ReLUs) in four slices."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in VGG16:
            layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(True)]
            cin = cin if v == "M" else int(v)
        self.slices = nn.ModuleList([nn.Sequential(*layers[a:b]) for a, b in ((0, 4), (4, 9), (9, 16), (16, 23))])
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for s in self.slices:
            outs.append(x := s(x))
        return outs  # relu1_2, relu2_2, relu3_3, relu4_3


def ref_gram_matrix(y: torch.Tensor) -> torch.Tensor:
    b, ch, h, w = y.size()
    features = y.view(b, ch, w * h)
    return features.bmm(features.transpose(1, 2)) / (ch * h * w)


def ref_normalize_batch(batch: torch.Tensor) -> torch.Tensor:
    return (batch.div_(255.0) - batch.new_tensor(MEAN).view(-1, 1, 1)) / batch.new_tensor(STD).view(-1, 1, 1)


# --- inputs, networks and the cases: each builds a zero-argument callable doing one unit of work ----------

def image(size: int, index: int = 0) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: a photo from ../shared when present, else a smooth random image."""
    files = sorted(DATA.glob("*.*")) if DATA.is_dir() else []
    x = (images.load_image(files[index % len(files)])[None] if files
         else torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(index)))
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1).contiguous()


def impasto_net(width: float) -> TransformerNet:
    """Seeded, with norms that are not the identity and an output spanning 0..1 (2 % clamped), so that the output
    comparison means something; timing does not depend on the values."""
    torch.manual_seed(0)
    net = TransformerNet(TransformerSpec(width=width)).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.InstanceNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
        net.decoder[-1].conv.weight.mul_(150.0)
        net.decoder[-1].conv.bias.fill_(127.5)
    return net


def with_threads(n: int, fn: Callable[[], T]) -> Callable[[], T]:
    def run() -> T:
        torch.set_num_threads(n)
        return fn()
    return run


def inference_case(spec: dict) -> tuple[Callable[[], torch.Tensor], float]:
    """(one call -> its output, the output's scale: 255 for the reference, else 1)."""
    variant, threads, x, net = spec["variant"], spec["threads"], image(spec["size"]), impasto_net(spec["width"])
    if variant == "reference":
        ref, x255 = reference_from(net), x * 255.0
        return with_threads(spec["default_threads"], torch.no_grad()(lambda: ref(x255).clamp(0, 255))), 255.0
    if variant.startswith("ort"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if variant != "ort":
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = threads
        if variant == "ort_nospin":
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(spec["onnx"], opts, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        return lambda: torch.from_numpy(session.run(None, feed)[0]), 1.0
    if variant in ("stylizer", "nchw"):  # the product's own path: Stylizer, as `impasto apply` uses it
        stylizer = Stylizer(net, torch.device("cpu"), "fp32", "auto" if variant == "stylizer" else "torch")
        return with_threads(threads, lambda: stylizer(x)), 1.0
    net, xc = net.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)  # "compile"
    torch._inductor.config.freezing = True  # weights become constants: inductor prepacks them for oneDNN
    module = torch.compile(net, dynamic=False)
    return with_threads(threads, torch.no_grad()(lambda: module(xc).clamp(0, 1).contiguous())), 1.0


def train_case(spec: dict) -> tuple[Callable[[], object], str]:
    """(one training step, how it was built). Same transformer and VGG16 weights for every variant; on
    spec["device"] when given (bench/gpu.py), else the CPU."""
    n, size, device = spec["batch"], spec["size"], torch.device(spec.get("device", "cpu"))
    x, style = torch.cat([image(size, i) for i in range(n)]).to(device), image(size, n).to(device)
    net = impasto_net(1.0).train().to(device)
    vgg = load_vgg("vgg16", STYLE_LAYERS, "max", "random", device=device)
    if spec["variant"] == "reference":
        ref, rvgg = reference_from(net).train().to(device), RefVgg16().to(device)
        rvgg.load_state_dict(dict(zip(rvgg.state_dict(), vgg.state_dict().values(), strict=True)))  # same order
        opt = torch.optim.Adam(ref.parameters(), 1e-3)
        with torch.no_grad():
            gram_style = [ref_gram_matrix(f) for f in rvgg(ref_normalize_batch(style * 255.0))]
        x255 = x * 255.0

        def reference_step() -> torch.Tensor:
            opt.zero_grad()
            y = ref_normalize_batch(ref(x255))
            features_y, features_x = rvgg(y), rvgg(ref_normalize_batch(x255.clone()))
            total = 1e5 * F.mse_loss(features_y[1], features_x[1])
            for fy, gm in zip(features_y, gram_style, strict=True):
                total = total + 1e10 * F.mse_loss(ref_gram_matrix(fy), gm.expand(n, -1, -1))
            total.backward()
            opt.step()
            return total.detach()
        return with_threads(spec["default_threads"], reference_step), "reference"
    if spec["variant"] == "impasto_cl":
        net, vgg = net.to(memory_format=torch.channels_last), vgg.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    step, how = impasto_step(net, vgg, torch.optim.Adam(net.parameters(), 1e-3), x, style)
    return with_threads(spec["threads"], step), how


def impasto_step(net: TransformerNet, vgg: VGGFeatures, opt: torch.optim.Optimizer, x: torch.Tensor,
                 style: torch.Tensor) -> tuple[Callable[[], object], str]:
    """impasto.fast.train.train_step with TrainOptions()'s loss when it exists (and takes these arguments), else
    the same step from impasto's pieces: load_vgg, gram_matrix, PerceptualLoss."""
    try:
        from impasto.fast import train

        loss = train.style_loss_template(vgg, style[0], train.TrainOptions())
        inspect.signature(train.train_step).bind(net, vgg, loss, x, opt)  # TypeError if it takes other arguments
        return (lambda: train.train_step(net, vgg, loss, x, opt)), "impasto.fast.train.train_step"
    except (ImportError, AttributeError, TypeError) as e:
        how = f"built from impasto's pieces, no usable impasto.fast.train.train_step ({type(e).__name__}: {e})"
    with torch.inference_mode():
        grams = {k: gram_matrix(f).clone() for k, f in vgg(style).items()}
    loss = PerceptualLoss({}, {CONTENT_LAYER: 1.0}, [StyleTarget(grams)], dict.fromkeys(STYLE_LAYERS, 0.25),
                          content_weight=1.0, style_weight=10.0)

    def step() -> torch.Tensor:
        with torch.no_grad():
            loss.content_targets = {CONTENT_LAYER: vgg(x)[CONTENT_LAYER]}
        y = net(x)
        total, _ = loss(y, vgg(y))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return total.detach()
    return step, how


# --- timing and memory --------------------------------------------------------------------------------

def median_seconds(runs: Mapping[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each callable, over `repeats` rounds in which each runs once in turn."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def rss_bytes(field: str = "VmRSS:") -> int:
    """The current RSS, or with "VmHWM:" its peak since the last reset (ru_maxrss where /proc lacks it)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(spec: dict) -> dict:
    run = inference_case(spec)[0] if spec["kind"] == "infer" else train_case(spec)[0]
    if spec.get("variant") == "compile":
        run()  # compiling is not part of the peak
    gc.collect()
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    base = rss_bytes()
    for _ in range(2):
        run()
    return {"peak_mib": (rss_bytes("VmHWM:") - base) / 2**20}


def peaks(specs: dict[str, dict], measure: bool) -> dict[str, str]:
    """Peak MiB of each spec, each in its own process, two at a time (after the timing: memory is not time)."""
    def peak(spec: dict) -> str:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
        mib = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
        return f"{mib:.0f}*" if spec["variant"] == "compile" else f"{mib:.0f}"
    if not measure:
        return dict.fromkeys(specs, "-")
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(specs, pool.map(peak, specs.values()), strict=True))


# --- the tables ---------------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [headers, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def machine() -> str:
    import onnxruntime

    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    return (f"{model}, {os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()}), python "
            f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads, mkldnn "
            f"{torch.backends.mkldnn.is_available()}), onnxruntime {onnxruntime.__version__}")


def apply_table(width: float, size: int, names: list[str], base: dict, args: argparse.Namespace,
                full_ref: dict[int, float], memory: bool) -> None:
    specs = {v: {**base, "kind": "infer", "variant": v, "size": size, "width": width} for v in names}
    runs, outs, slow = {}, {}, []
    for v, spec in specs.items():
        start = time.perf_counter()
        runs[v], scale = inference_case(spec)
        outs[v] = runs[v]().float() / scale
        if time.perf_counter() - start > 5:
            slow.append(f"{v} {time.perf_counter() - start:.0f} s")
    secs = median_seconds(runs, args.warmup, args.repeats)
    full_ref.setdefault(size, secs["reference"])
    mem = peaks(specs, memory)
    rows = [[INFER[v], f"{1 / secs[v]:.2f}", f"{secs[v]:.3f}", f"{secs['reference'] / secs[v]:.2f}x",
             f"{full_ref[size] / secs[v]:.2f}x", mem[v], f"{(outs[v] - outs['reference']).abs().max().item():.1e}"]
            for v in names]
    note = "" if width == 1.0 else " (a different, smaller network: compare its speed only)"
    print(f"\napply, width {width}, {size}x{size}, batch 1{note}")
    print(table(["variant", "images/s", "s/image", "ref/this", "ref w1/this", "peak MiB", "max|diff| to ref"], rows))
    if memory and "compile" in names:
        print("* from after the first (compiling) call, so without that call's allocations: not comparable")
    if slow:
        print(f"set-up and first call: {', '.join(slow)}")


def train_table(base: dict, args: argparse.Namespace) -> None:
    specs = {v: {**base, "kind": "train", "variant": v, "size": args.train_size, "batch": args.batch} for v in TRAIN}
    steps: dict[str, Callable[[], object]] = {}
    how = ""
    for v, spec in specs.items():
        steps[v], built = train_case(spec)
        how = built if v == "impasto" else how
    secs = median_seconds(steps, args.warmup, args.repeats)
    print(f"\ntraining step, batch {args.batch}, {args.train_size}x{args.train_size}: transformer forward, VGG16 "
          f"loss (content {CONTENT_LAYER}, style {' '.join(STYLE_LAYERS)}), backward, Adam; impasto's step: {how}")
    mem = peaks(specs, not args.no_memory)
    rows = [[TRAIN[v], f"{secs[v]:.3f}", f"{args.batch / secs[v]:.2f}", f"{secs['reference'] / secs[v]:.2f}x", mem[v]]
            for v in TRAIN]
    print(table(["variant", "s/step", "images/s", "ref/this", "peak MiB"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a check, not a benchmark: 128,256 px, 2 rounds, training "
                   "at 64 px, memory at the first size only, no width-0.5 ONNX")
    p.add_argument("--sizes", help="apply sizes, comma-separated, multiples of 4 (default 512,1024)")
    p.add_argument("--train-size", type=int, help="training crop size (default 256)")
    p.add_argument("--batch", type=int, default=4, help="training batch size")
    p.add_argument("--repeats", type=int, help="timed rounds, each variant once per round (median; default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant first")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of impasto's variants and "
                   "intra-op threads of ORT's tuned sessions (the reference keeps torch's default)")
    p.add_argument("--variants", help=f"apply variants besides the reference, of {','.join(INFER)} (default "
                   "stylizer,nchw,compile,ort; --quick leaves out compile, which takes 20-60 s a size)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sizes = [int(s) for s in (args.sizes or ("128,256" if args.quick else "512,1024")).split(",")]
    if any(s % 4 for s in sizes):
        p.error("sizes must be multiples of 4 (impasto pads to a multiple of 4: the comparison would not be exact)")
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.train_size = args.train_size or (64 if args.quick else 256)
    chosen = args.variants or ("stylizer,nchw,ort" if args.quick else "stylizer,nchw,compile,ort")
    # the Stylizer's ONNX file is exported once into a private cache that the memory workers share
    os.environ.setdefault("IMPASTO_CACHE", tempfile.mkdtemp(prefix="impasto-bench-cache-"))
    variants = ["reference", *(v for v in chosen.split(",") if v != "reference")]
    print(f"machine: {machine()}\nload average (1 min) before: {os.getloadavg()[0]:.2f}")
    print(f"median of {args.repeats} rounds after {args.warmup} warm-up call(s); impasto threads {args.threads}")
    base = {"threads": args.threads, "default_threads": torch.get_num_threads()}
    full_ref: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for width in (1.0, 0.5):
            names = [v for v in variants if width == 1.0 or v in ("reference", "stylizer", "nchw", "compile", "ort")]
            names = [v for v in names if not (args.quick and width != 1.0 and v.startswith("ort"))]
            if any(v.startswith("ort") for v in names):
                base["onnx"] = str(Path(tmp) / f"w{width}.onnx")
                start = time.perf_counter()
                export_model(impasto_net(width), base["onnx"], "onnx")
                print(f"\nexported width {width} with export_model in {time.perf_counter() - start:.1f} s")
            for size in sizes:
                apply_table(width, size, names, base, args, full_ref,
                            memory=not args.no_memory and (size == sizes[0] or not args.quick))
    train_table(base, args)
    print(f"\nload average (1 min) after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
