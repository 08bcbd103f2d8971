"""Photorealistic engine benchmark: matting-Laplacian construction against a per-window loop, and
seconds per iteration with and without the regularizer.

    .venv/bin/python bench/photo.py [--sizes 256,512,1024] [--loop-sizes 256,512,1024] [--iterations 5]

Each Laplacian build runs in a fresh process so its peak memory (ru_maxrss) is its own. The loop
reference is Levin et al.'s formula written the straightforward way: one window at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "photo" / "dpst14"


def photo_image(size: int) -> np.ndarray:
    """A real photo when ../shared is present (content of pair dpst14), else a smooth random image."""
    from PIL import Image

    path = SHARED / "content.png"
    if path.is_file():
        im = Image.open(path).convert("RGB").resize((size, size), Image.LANCZOS)
        return np.asarray(im, dtype=np.float64) / 255.0
    rng = np.random.default_rng(0)
    small = rng.random((size // 8 + 1, size // 8 + 1, 3))
    return np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                      dtype=np.float64) / 255.0


def loop_laplacian(img: np.ndarray, eps: float = 1e-7) -> scipy.sparse.csr_matrix:
    """Levin et al.'s matting Laplacian, one 3x3 window at a time (the reference)."""
    h, w, _ = img.shape
    n_windows = (h - 2) * (w - 2)
    rows = np.empty((n_windows, 81), dtype=np.int64)
    cols = np.empty((n_windows, 81), dtype=np.int64)
    vals = np.empty((n_windows, 81))
    flat = img.reshape(-1, 3)
    k = 0
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            ids = np.array([(y + dy) * w + (x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
            window = flat[ids]
            mu = window.mean(axis=0)
            centered = window - mu
            cov = centered.T @ centered / 9 + eps / 9 * np.eye(3)
            g = (1 + centered @ np.linalg.inv(cov) @ centered.T) / 9
            rows[k] = np.repeat(ids, 9)
            cols[k] = np.tile(ids, 9)
            vals[k] = (np.eye(9) - g).ravel()
            k += 1
    return scipy.sparse.csr_matrix((vals.ravel(), (rows.ravel(), cols.ravel())), shape=(h * w, h * w))


def worker_build(kind: str, size: int, out: str | None) -> None:
    """Build one Laplacian in this (fresh) process; print seconds and peak memory as JSON."""
    from impasto.photo.laplacian import matting_laplacian

    img = photo_image(size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    matrix = matting_laplacian(img) if kind == "impasto" else loop_laplacian(img)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if out:
        scipy.sparse.save_npz(out, matrix.tocsr())
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "delta_mib": (peak - base) / 1024,
                      "nnz": int(matrix.nnz)}))


def run_worker(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def laplacian_table(sizes: list[int], loop_sizes: list[int], tmp: Path) -> list[dict]:
    rows = []
    for size in sizes:
        fast_path, loop_path = tmp / f"fast{size}.npz", tmp / f"loop{size}.npz"
        fast = run_worker("impasto", str(size), str(fast_path))
        row = {"size": size, "impasto": fast}
        if size in loop_sizes:
            row["loop"] = run_worker("loop", str(size), str(loop_path))
            diff = scipy.sparse.load_npz(fast_path) - scipy.sparse.load_npz(loop_path)
            row["max_abs_diff"] = float(abs(diff).max()) if diff.nnz else 0.0
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def iteration_table(sizes: list[int], iterations: int, device: str = "cpu") -> list[dict]:
    """Seconds per evaluation (forward + backward) of pass 1 (masked style) and pass 2 (+ regularizer); on CUDA
    also pass 2 replayed as a CUDA graph, as the optimization loop runs it (bench/gpu.py)."""
    import contextlib

    import torch

    from impasto import cuda_graphs
    from impasto.nets import load_vgg
    from impasto.perceptual import build_loss, network_objective
    from impasto.photo import PhotoOptions
    from impasto.photo.laplacian import matting_laplacian, to_torch_sparse
    from impasto.photo.transfer import with_matting

    warnings.filterwarnings("ignore")
    opts = PhotoOptions(weights="random")
    cuda = torch.device(device).type == "cuda"
    net = load_vgg("vgg19", [*opts.content_layers, *opts.style_layers], "max", "random", device=device)
    rows = []
    for size in sizes:
        content = torch.from_numpy(photo_image(size)).permute(2, 0, 1).float().contiguous()
        half = torch.zeros(size, size)
        half[: size // 2] = 1
        regions = [(half, half), (1 - half, 1 - half)]
        on_device = content.to(device)
        loss = build_loss(net, on_device, [on_device.flip(-1)], opts, contextlib.nullcontext, regions)
        base = network_objective(net, loss, contextlib.nullcontext)
        start = time.perf_counter()
        laplacian = to_torch_sparse(matting_laplacian(content), device)
        build = time.perf_counter() - start
        regularized = with_matting(base, laplacian, opts.affine_weight)
        x = on_device[None].clone().requires_grad_(True)

        def eager(objective: Any, x: torch.Tensor = x) -> Any:
            def evaluate() -> None:
                x.grad = None
                objective(x)[0].backward()
            return evaluate

        runs = {"pass 1": eager(base), "pass 2": eager(regularized)}
        replay = cuda_graphs.graphed(regularized, x) if cuda else None
        if replay is not None:
            runs["pass 2, CUDA graph"] = replay
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(iterations + 1):  # the first round warms up
            for name, run in runs.items():
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
        row = {"size": size, "laplacian_s": build, **{k: statistics.median(v[1:]) for k, v in times.items()}}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,512,1024")
    parser.add_argument("--loop-sizes", default="256,512,1024", help="sizes at which to run the slow loop reference")
    parser.add_argument("--iteration-sizes", default="256,512")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, size, *out = args.worker
        worker_build(kind, int(size), out[0] if out else None)
        return
    import platform
    import tempfile

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load before {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        lap = laplacian_table([int(s) for s in args.sizes.split(",")],
                              [int(s) for s in args.loop_sizes.split(",") if s], Path(tmp))
    print("\nMatting Laplacian construction (fresh process each; peak RSS minus RSS before the build)")
    print(f"{'size':>6} {'impasto s':>10} {'loop s':>10} {'loop/impasto':>13} {'impasto MiB':>12} {'loop MiB':>9} "
          f"{'nnz':>10} {'max |diff|':>11}")
    for r in lap:
        loop = r.get("loop", {})
        ratio = f"{loop['seconds'] / r['impasto']['seconds']:.0f}x" if loop else "-"
        print(f"{r['size']:>6} {r['impasto']['seconds']:>10.2f} {loop.get('seconds', float('nan')):>10.2f} "
              f"{ratio:>13} {r['impasto']['delta_mib']:>12.0f} {loop.get('delta_mib', float('nan')):>9.0f} "
              f"{r['impasto']['nnz']:>10} {r.get('max_abs_diff', float('nan')):>11.1e}")
    its = iteration_table([int(s) for s in args.iteration_sizes.split(",")], args.iterations)
    print("\nSeconds per evaluation (forward + backward), VGG19 conv layers, two mask classes")
    print(f"{'size':>6} {'pass 1 s':>9} {'pass 2 s':>9} {'regularizer cost':>17} {'Laplacian build s':>18}")
    for r in its:
        print(f"{r['size']:>6} {r['pass 1']:>9.3f} {r['pass 2']:>9.3f} {r['pass 2'] / r['pass 1'] - 1:>16.1%} "
              f"{r['laplacian_s']:>18.2f}")
    print(f"\nload after {os.getloadavg()}")


if __name__ == "__main__":
    main()
