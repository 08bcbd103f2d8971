"""GPU figures of the three engines, each beside the references of bench/artistic.py and bench/fast.py in the same run.

Artistic: seconds per iteration (L-BFGS, Adam) of impasto in float32 and with --amp against the PyTorch tutorial's
way, the targets' build time, peak GPU memory of a run (the allocator's peak over what was allocated before), the
same-image loss agreement, and a lower bound: the reference's FLOPs per evaluation over the best 3x3-convolution
rate measured here. Fast: images per second of `impasto apply`'s Stylizer (float32, its default, and float16),
against pytorch/examples' way (float32 NCHW, `.cpu()` of the output), with the largest output difference; a
training step. Photo: seconds per evaluation of both passes, and the Laplacian's build. Weights are random (no
internet); timings do not depend on their values. Every GPU timing waits for the GPU (synchronize) before reading
the clock.

    python bench/gpu.py --json out/gpu.json          # on a CUDA machine: a few minutes on one H100
    python bench/gpu.py --device cpu --quick          # a check of the script anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import artistic as A  # noqa: E402  (the artistic reference and its helpers)
import fast as B  # noqa: E402  (the fast-style reference and its helpers)

from impasto.fast.apply import Stylizer  # noqa: E402
from impasto.perceptual import autocast_for, build_loss, network_objective  # noqa: E402

warnings.filterwarnings("ignore")


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` calls, the GPU drained before each clock reading."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        A.sync()
        t = time.perf_counter()
        fn()
        A.sync()
        out.append(time.perf_counter() - t)
    return out


@contextlib.contextmanager
def graphs(on: bool) -> Iterator[None]:
    """impasto with or without CUDA graphs (IMPASTO_CUDA_GRAPHS)."""
    saved = os.environ.get("IMPASTO_CUDA_GRAPHS")
    os.environ["IMPASTO_CUDA_GRAPHS"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["IMPASTO_CUDA_GRAPHS"]
        else:
            os.environ["IMPASTO_CUDA_GRAPHS"] = saved


def peak_bytes(fn: Callable[[], object]) -> tuple[int, int] | None:
    """The GPU allocator's peaks during `fn` over what was there before it: allocated (live tensors) and reserved
    (what the process holds from the GPU, CUDA graph pools included). None off CUDA."""
    if A.DEVICE.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base, held = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, torch.cuda.max_memory_reserved() - held


def conv_rates(repeats: int) -> dict[str, float]:
    """Best FLOP/s of VGG's 3x3 convolutions in float32 (TF32 as the defaults allow) and float16."""
    best = {"float32": 0.0, "float16": 0.0}
    for cin, cout, side in A.CONV_SHAPES:
        for dtype in (torch.float32, torch.float16):
            if dtype == torch.float16 and A.DEVICE.type != "cuda":
                continue
            x = torch.randn(1, cin, side * 2, side * 2, device=A.DEVICE, dtype=dtype)
            w = torch.randn(cout, cin, 3, 3, device=A.DEVICE, dtype=dtype)
            flops = 2 * cin * cout * 9 * (side * 2) ** 2
            with torch.no_grad():
                seconds = min(timed(lambda x=x, w=w: F.conv2d(x, w, padding=1), 3, repeats))
            key = str(dtype).removeprefix("torch.")
            best[key] = max(best[key], flops / seconds)
    return best


def artistic(args: argparse.Namespace, report: dict) -> None:
    content, style, source = A.load_inputs(None, None)
    print(f"images: {source}")
    flops = {}
    for size in args.sizes:  # the reference's FLOPs per evaluation, counted on the CPU (device-independent)
        device, A.DEVICE = A.DEVICE, torch.device("cpu")
        net_cpu = A.make_net(args.seed)
        flops[size] = A.count_flops(net_cpu, A.build_reference(net_cpu), content, style, size)[1]
        A.DEVICE = device
    rates = conv_rates(args.repeats)
    net = A.make_net(args.seed)
    cnn = A.build_reference(net)
    rows, results = [], {}
    for size in args.sizes:
        for opt in ("lbfgs", "adam"):
            n = args.warmup + args.iterations
            per_it: dict[str, list[float]] = {"impasto": [], "impasto --amp": [], "impasto, no graphs": [],
                                              "reference": []}
            for _ in range(args.rounds):
                for tool in per_it:
                    if tool == "reference":
                        stamps, _ = A.time_reference(cnn, content, style, size, opt, n)
                    else:
                        with graphs(tool != "impasto, no graphs"):
                            stamps, _ = A.time_impasto(net, content, style, size, opt, n, amp=tool.endswith("amp"))
                    per_it[tool].append((stamps[-1] - stamps[args.warmup - 1]) / args.iterations)
            med = {t: statistics.median(v) for t, v in per_it.items()}
            bound = flops[size] / rates["float32"]
            results[f"{size}/{opt}"] = {"seconds": med, "samples": per_it, "bound_float32": bound}
            rows.append([f"{size}/{opt}", *(f"{med[t] * 1e3:.1f}" for t in per_it),
                         f"{med['reference'] / med['impasto']:.2f}x", f"{med['reference'] / med['impasto --amp']:.2f}x",
                         f"{med['impasto'] / bound:.2f}x", f"{med['reference'] / bound:.2f}x"])
            print(f"  {rows[-1]}", flush=True)
    print(f"\n1. Milliseconds per iteration (median of {args.rounds} rounds of {args.iterations} iterations after "
          f"{args.warmup}); bound = reference FLOPs / best float32 conv rate ({rates['float32'] / 1e12:.1f} TFLOP/s;"
          f" float16 {rates['float16'] / 1e12:.1f})")
    print(A.table(["size/opt", "impasto", "impasto --amp", "no graphs", "reference", "ref/imp", "ref/amp",
                   "imp/bound", "ref/bound"], rows))

    rows = []
    for size in args.sizes:
        imp, ref = A.time_targets(net, cnn, content, style, size, args.repeats)
        amp_opts = A.options(size, 1, "lbfgs", amp=True)
        c, s = A.at_size(content, style, size)
        amp = statistics.median(timed(lambda c=c, s=s, o=amp_opts: build_loss(
            net, c, [s], o, autocast_for(A.DEVICE, True)), 1, args.repeats))
        results[f"targets/{size}"] = {"impasto": imp, "impasto --amp": amp, "reference": ref}
        rows.append([size, f"{imp * 1e3:.1f}", f"{amp * 1e3:.1f}", f"{ref * 1e3:.1f}", f"{ref / imp:.2f}x"])
    print("\n2. Milliseconds to build the targets (content features + style Grams; median)")
    print(A.table(["size", "impasto", "impasto --amp", "reference", "ref/imp"], rows))

    rows = []
    for size in args.sizes:
        for opt in ("lbfgs", "adam"):
            n = args.warmup
            mem = {"impasto": peak_bytes(lambda s=size, o=opt, n=n: A.time_impasto(net, content, style, s, o, n)),
                   "impasto --amp": peak_bytes(lambda s=size, o=opt, n=n: A.time_impasto(
                       net, content, style, s, o, n, amp=True)),
                   "impasto, no graphs": peak_bytes(lambda s=size, o=opt, n=n: graphs(False)(A.time_impasto)(
                       net, content, style, s, o, n)),
                   "reference": peak_bytes(lambda s=size, o=opt, n=n: A.time_reference(
                       cnn, content, style, s, o, n))}
            results[f"memory/{size}/{opt}"] = mem
            rows.append([f"{size}/{opt}", *("-" if v is None else f"{v[0] / 2**20:.0f} / {v[1] / 2**20:.0f}"
                                            for v in mem.values())])
    print("\n3. Peak GPU memory of a run, MiB over the weights already there (targets + iterations): allocated /"
          " reserved")
    print(A.table(["size/opt", "impasto", "impasto --amp", "no graphs", "reference"], rows))

    rows = []
    for size in args.sizes:
        A.time_impasto(net, content, style, size, "lbfgs", args.agree_iterations)
        A.time_reference(cnn, content, style, size, "lbfgs", args.agree_iterations)
        c, s = A.at_size(content, style, size)
        amp_obj = network_objective(net, build_loss(net, c, [s], A.options(size, 1, "lbfgs"),
                                                    autocast_for(A.DEVICE, True)), autocast_for(A.DEVICE, True))
        last = {t: A.LAST_IMAGE[t].to(A.DEVICE) for t in A.TOOLS}
        image = last["impasto"].unsqueeze(0)
        same = {}
        for tf32 in (True, False):  # PyTorch's default for convolutions, then plain float32 (targets too)
            saved = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32
            imp_obj, _ = A.impasto_objective(net, content, style, size)
            ref_obj = A.reference_objective(cnn, content, style, size)
            with torch.no_grad():
                same[tf32] = max(A.rel(float(imp_obj(last[t].unsqueeze(0))), ref_obj(last[t])) for t in A.TOOLS)
                if tf32:
                    amp_rel = A.rel(float(amp_obj(image)[0]), float(imp_obj(image)))
            torch.backends.cudnn.allow_tf32 = saved
        results[f"agreement/{size}"] = {"same_image_rel_tf32": same[True], "same_image_rel_fp32": same[False],
                                        "amp_rel": amp_rel}
        rows.append([size, f"{same[True]:.1e}", f"{same[False]:.1e}", f"{amp_rel:.1e}"])
    print(f"\n4. Loss of the same image (after {args.agree_iterations} L-BFGS iterations), relative difference: impasto"
          " vs reference objective with TF32 convolutions (the default) and without; impasto --amp vs float32")
    print(A.table(["size", "imp vs ref, TF32", "imp vs ref, float32", "--amp vs float32"], rows))
    report["artistic"] = {"flops": flops, "conv_rates": rates, **results}


def fast(args: argparse.Namespace, report: dict) -> None:
    net = B.impasto_net(1.0)
    ref = B.reference_from(net).to(A.DEVICE).eval()
    rows, results = [], {}
    for size, batch in args.apply_cases:
        x = torch.cat([B.image(size, i) for i in range(batch)])
        half = Stylizer(net, A.DEVICE, "fp16" if A.DEVICE.type == "cuda" else "fp32", "torch")
        full = Stylizer(net, A.DEVICE, "fp32", "torch")

        @torch.no_grad()
        def reference(x: torch.Tensor = x) -> torch.Tensor:  # pytorch/examples: input to the device, output .cpu()
            return ref(x.to(A.DEVICE) * 255.0).clamp(0, 255).cpu() / 255.0

        cases = {"reference": reference, "impasto fp16": lambda x=x, f=half: f(x),
                 "impasto fp32": lambda x=x, f=full: f(x)}
        secs = {k: statistics.median(timed(fn, 3, args.repeats * 3)) for k, fn in cases.items()}
        expected = reference()
        diff = {k: float((fn() - expected).abs().max()) for k, fn in cases.items() if k != "reference"}
        results[f"apply/{size}/{batch}"] = {"seconds": secs, "max_diff": diff}
        rows.append([f"{size} x{batch}", *(f"{batch / v:.1f}" for v in secs.values()),
                     f"{secs['reference'] / secs['impasto fp16']:.2f}x", f"{diff['impasto fp16']:.4f}",
                     f"{diff['impasto fp32']:.1e}"])
    print("\n5. Fast networks: images per second (median; input from and output to the CPU, as `impasto apply`)")
    print(A.table(["size x batch", "reference", "impasto fp16", "impasto fp32", "fp16/ref", "fp16 max diff",
                   "fp32 max diff"], rows))

    n, size = args.train_batch, args.train_size
    spec = {"batch": n, "size": size, "device": str(A.DEVICE), "threads": torch.get_num_threads(),
            "default_threads": torch.get_num_threads()}
    steps = {name: B.train_case({**spec, "variant": name})[0] for name in ("reference", "impasto")}
    secs = {k: statistics.median(timed(fn, 2, args.repeats * 2)) for k, fn in steps.items()}
    results[f"train/{size}/{n}"] = secs
    print(f"\n6. A training step, batch {n} at {size} px (VGG16 loss network): ms per step")
    print(A.table(["reference", "impasto", "ref/impasto"],
                  [[f"{secs['reference'] * 1e3:.1f}", f"{secs['impasto'] * 1e3:.1f}",
                    f"{secs['reference'] / secs['impasto']:.2f}x"]]))
    report["fast"] = results


def photo(args: argparse.Namespace, report: dict) -> None:
    import photo as P

    rows = P.iteration_table(args.sizes, args.repeats * 2, str(A.DEVICE))
    for r in rows:
        r.setdefault("pass 2, CUDA graph", float("nan"))
    print("\n7. Photorealistic engine: Laplacian build (s, CPU) and ms per evaluation (forward + backward)")
    print(A.table(["size", "Laplacian s", "pass 1 ms", "pass 2 ms", "regularizer", "pass 2, CUDA graph"],
                  [[r["size"], f"{r['laplacian_s']:.2f}", f"{r['pass 1'] * 1e3:.1f}", f"{r['pass 2'] * 1e3:.1f}",
                    f"{r['pass 2'] / r['pass 1'] - 1:+.0%}", f"{r['pass 2, CUDA graph'] * 1e3:.1f}"] for r in rows]))
    report["photo"] = rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--agree-iterations", type=int, default=20)
    p.add_argument("--skip", default="", help="comma-separated: artistic,fast,photo")
    p.add_argument("--quick", action="store_true", help="tiny sizes and counts: a check of the script")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.apply_cases, args.train_size, args.train_batch = [(512, 1), (1024, 1), (512, 8)], 256, 4
    if args.quick:
        args.sizes, args.iterations, args.warmup, args.rounds, args.repeats = "64,96", 2, 1, 1, 1
        args.agree_iterations = 3
        args.apply_cases, args.train_size, args.train_batch = [(64, 1), (64, 2)], 64, 2
    args.sizes = [int(s) for s in args.sizes.split(",")]
    A.DEVICE = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    name = torch.cuda.get_device_name() if A.DEVICE.type == "cuda" else A.machine()["cpu"]
    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()}, TF32 convolutions {torch.backends.cudnn.allow_tf32}, TF32 matmul "
          f"{torch.backends.cuda.matmul.allow_tf32}; weights random")
    report: dict[str, Any] = {"device": name, "torch": torch.__version__,
                              "args": {k: str(v) for k, v in vars(args).items()}}
    for section, fn in (("artistic", artistic), ("fast", fast), ("photo", photo)):
        if section not in skip:
            fn(args, report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
