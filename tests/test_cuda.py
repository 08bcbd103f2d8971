"""The CUDA paths of the three engines. Skipped without a CUDA GPU (CI has none); run them on a GPU
machine with `pytest tests/test_cuda.py`.

CPU/CUDA agreement is checked with TF32 off (cuDNN and cuBLAS then compute in float32 like the CPU);
bit-equality is not expected (CUDA kernels sum in other orders), so the tolerances are float32 ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from impasto import cuda_graphs, images
from impasto.artistic import StylizeOptions, stylize_tensors
from impasto.cli import main
from impasto.fast.apply import Stylizer
from impasto.fast.models import load_model
from impasto.fast.train import TrainOptions, train
from impasto.fast.transformer import TransformerNet, TransformerSpec
from impasto.nets import load_vgg
from impasto.nets.winograd import FrozenConv3x3
from impasto.perceptual import autocast_for, build_loss, network_objective
from impasto.photo import PhotoOptions, photo_transfer

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore:using random VGG weights"),
    pytest.mark.filterwarnings("error:running without CUDA graphs"),  # every engine's objective must record
]
CUDA = torch.device("cuda")
LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"]


@pytest.fixture
def no_tf32():
    """float32 matrix products and convolutions on CUDA, so that CPU and CUDA results are comparable."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def opts(device: str, **kw) -> StylizeOptions:
    base = dict(size=64, iterations=10, weights="random", pooling="avg", device=device, seed=1)
    return StylizeOptions(**{**base, **kw})


def losses_of(content, style, o: StylizeOptions) -> tuple[list[float], torch.Tensor]:
    seen: list[float] = []
    torch.manual_seed(0)
    net = load_vgg("vgg19", LAYERS, o.pooling, "random")
    out = stylize_tensors(content, [style], o, [lambda p: seen.append(p.step.loss)], net=net)
    return seen, out.image.cpu()


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_artistic_on_cuda_follows_the_cpu_run(no_tf32, make_scene, make_texture, optimizer):
    content, style = make_scene(48, 64, seed=0), make_texture((0.8, 0.3, 0.2), 64, 64, seed=1)
    cpu, cpu_image = losses_of(content, style, opts("cpu", optimizer=optimizer))
    gpu, gpu_image = losses_of(content, style, opts("cuda", optimizer=optimizer))
    assert gpu[-1] < 0.5 * gpu[0] and cpu[-1] < 0.5 * cpu[0], (cpu, gpu)
    assert abs(gpu[0] - cpu[0]) <= 1e-5 * cpu[0]  # the same objective at the same start
    # then float32 rounding (other kernels, other summation orders) grows along the trajectory, as it does
    # between two CPU convolution back ends: L-BFGS measured 5e-4 after 3 steps and 4 % after 10
    for a, b in zip(cpu[:4], gpu[:4], strict=True):
        assert abs(a - b) <= 1e-3 * a, (cpu, gpu)


def objective_and_gradient(amp: bool, size: int = 256) -> tuple[float, dict[str, float], torch.Tensor]:
    torch.manual_seed(0)
    net = load_vgg("vgg19", LAYERS, "max", "random", device=CUDA)
    g = torch.Generator().manual_seed(2)
    content = F.interpolate(torch.rand(1, 3, 12, 16, generator=g), size=(size * 3 // 4, size), mode="bilinear")[0]
    style = F.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=(size, size), mode="bilinear")[0]
    autocast = autocast_for(CUDA, amp)
    loss = build_loss(net, content.to(CUDA), [style.to(CUDA)], StylizeOptions(weights="random", device="cuda"),
                      autocast)
    x = (content.to(CUDA) * 0.9 + 0.05).unsqueeze(0).requires_grad_(True)  # not the content: content term > 0
    total, terms = network_objective(net, loss, autocast)(x)
    total.backward()
    return float(total.detach()), {k: float(v.detach()) for k, v in terms.items()}, x.grad.detach()


def test_amp_objective_is_finite_and_close_to_float32(no_tf32):
    """--amp once made every style Gram overflow float16 (sums over a whole layer) and the run stop on NaN."""
    full, full_terms, full_grad = objective_and_gradient(amp=False)
    half, half_terms, half_grad = objective_and_gradient(amp=True)
    assert torch.isfinite(half_grad).all()
    for k in full_terms:
        assert abs(half_terms[k] - full_terms[k]) <= 2e-2 * full_terms[k], (k, full_terms, half_terms)
    assert F.cosine_similarity(half_grad.flatten(), full_grad.flatten(), dim=0) > 0.99


def test_amp_run_lowers_the_loss(make_scene, make_texture):
    content, style = make_scene(96, 128, seed=0), make_texture((0.8, 0.3, 0.2), 96, 96, seed=1)
    seen, _ = losses_of(content, style, opts("cuda", size=128, iterations=20, amp=True, pooling="max"))
    assert all(map(torch.isfinite, torch.tensor(seen)))
    assert seen[-1] < 0.5 * seen[0], seen


def test_scales_with_content_detail_on_cuda_follow_the_eager_run(no_tf32, make_scene, make_texture, monkeypatch):
    """A graph per scale: each stage records its own objective, at its own size, from the previous result."""
    content, style = make_scene(96, 128, seed=0), make_texture((0.8, 0.3, 0.2), 64, 64, seed=1)
    o = opts("cuda", scales=[64, 128], scale_iterations=[6, 6], init="content", optimizer="adam")
    graphs, image = losses_of(content, style, o)
    monkeypatch.setenv("IMPASTO_CUDA_GRAPHS", "0")
    plain, _ = losses_of(content, style, o)
    assert image.shape == (3, 96, 128) and len(graphs) == 12
    for stage in (graphs[:6], graphs[6:]):
        assert stage[-1] < 0.8 * stage[0], graphs
    for a, b in zip(plain, graphs, strict=True):  # same trajectory through both scales, to float32 rounding
        assert abs(a - b) <= 1e-3 * a, (plain, graphs)  # (L-BFGS's occasional huge trial steps amplify it)


def test_graphs_only_where_they_pay():
    small, large = torch.zeros(1, 3, 384, 512, device=CUDA), torch.zeros(1, 3, 768, 1024, device=CUDA)
    assert cuda_graphs.enabled(small) and not cuda_graphs.enabled(large) and not cuda_graphs.enabled(small.cpu())


def test_resume_on_cuda_continues_the_run(no_tf32, make_scene, make_texture):
    content, style = make_scene(48, 64, seed=0), make_texture((0.8, 0.3, 0.2), 64, 64, seed=1)
    full, _ = losses_of(content, style, opts("cuda", optimizer="adam"))

    def stop(p) -> None:
        if p.step.iteration == 4:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    net = load_vgg("vgg19", LAYERS, "avg", "random")
    stopped = stylize_tensors(content, [style], opts("cuda", optimizer="adam"), [stop], net=net)
    assert stopped.interrupted and stopped.iterations == 4
    rest: list[float] = []
    resumed = stylize_tensors(content, [style], opts("cuda", optimizer="adam"),
                              [lambda p: rest.append(p.step.loss)], resume=stopped.state, net=net)
    assert not resumed.interrupted and len(rest) == 6
    for a, b in zip(full[4:], rest, strict=True):
        assert abs(a - b) <= 1e-4 * a, (full, rest)


def test_an_objective_that_cannot_be_recorded_runs_eagerly(monkeypatch):
    """A CPU sync inside the objective (here .item()) cannot be recorded: the loop warns and runs it as before."""
    from impasto.optimize import OptimizerSettings, optimize

    target = torch.linspace(0, 1, 48, device=CUDA).view(1, 3, 4, 4)

    def objective(x: torch.Tensor):
        d = (x - target).pow(2).sum()
        scale = 1.0 + 0.0 * (x.sum().item())  # a host sync: not allowed while a graph records
        return d * scale, {"d": d}

    start = torch.zeros(1, 3, 4, 4, device=CUDA)
    with pytest.warns(UserWarning, match="running without CUDA graphs"):
        result = optimize(start, objective, 5, OptimizerSettings("adam", lr=0.1))
    monkeypatch.setenv("IMPASTO_CUDA_GRAPHS", "0")
    expected = optimize(start, objective, 5, OptimizerSettings("adam", lr=0.1))
    assert result.loss < 0.5 * float((start - target).pow(2).sum())
    assert result.loss == expected.loss and torch.equal(result.image, expected.image)


def test_photo_on_cuda_follows_the_cpu_run(no_tf32, make_scene):
    content, style = make_scene(36, 48, seed=0), make_scene(32, 32, seed=5)

    def run(device: str):
        o = PhotoOptions(size=32, iterations=4, content_layers=["conv2_1"], style_layers=["conv1_1", "conv2_1"],
                         weights="random", pooling="avg", two_pass=True, affine_weight=100.0, smooth=True,
                         full_resolution=True, device=device, optimizer="adam")
        seen: list[float] = []
        torch.manual_seed(0)
        out = photo_transfer(content, style, o, callbacks=[lambda p: seen.append(p.step.loss)])
        return seen, out.image.cpu()

    cpu, cpu_image = run("cpu")
    gpu, gpu_image = run("cuda")
    assert len(gpu) == len(cpu) == 8  # two passes of 4
    for a, b in zip(cpu, gpu, strict=True):
        assert abs(a - b) <= 1e-3 * abs(a), (cpu, gpu)
    assert gpu_image.shape == (3, 36, 48) and (gpu_image - cpu_image).abs().max() < 1e-3


def test_graph_replay_equals_eager_evaluation_and_follows_the_image(no_tf32, make_scene, make_texture):
    torch.manual_seed(0)
    net = load_vgg("vgg19", LAYERS, "avg", "random", device=CUDA)
    content, style = make_scene(48, 64, seed=0).to(CUDA), make_texture((0.8, 0.3, 0.2), 64, 64, seed=1).to(CUDA)
    objective = network_objective(net, build_loss(net, content, [style], opts("cuda"), autocast_for(CUDA, False)),
                                  autocast_for(CUDA, False))

    def eager(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        x = x.detach().clone().requires_grad_(True)
        total, _ = objective(x)
        total.backward()
        return float(total.detach()), x.grad

    x = (content * 0.8 + 0.1).unsqueeze(0).requires_grad_(True)
    replay = cuda_graphs.graphed(objective, x)
    assert replay is not None
    for _ in range(3):
        loss, terms = replay()
        expected, grad = eager(x)
        assert abs(float(loss) - expected) <= 1e-6 * expected
        assert set(terms) == {"content", "style", "tv"}
        torch.testing.assert_close(x.grad, grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()))
        with torch.no_grad():
            x.sub_(0.05 * x.grad.sign()).clamp_(0, 1)  # the optimizer's in-place update: the graph must see it


def test_runs_with_and_without_graphs_agree(no_tf32, make_scene, make_texture, monkeypatch):
    content, style = make_scene(48, 64, seed=0), make_texture((0.8, 0.3, 0.2), 64, 64, seed=1)
    graphs, _ = losses_of(content, style, opts("cuda"))
    monkeypatch.setenv("IMPASTO_CUDA_GRAPHS", "0")
    plain, _ = losses_of(content, style, opts("cuda"))
    assert abs(plain[0] - graphs[0]) <= 1e-6 * plain[0]  # the same objective; then rounding grows as on CPU/CUDA
    for a, b in zip(plain[:4], graphs[:4], strict=True):
        assert abs(a - b) <= 1e-3 * a, (plain, graphs)


def test_frozen_convolutions_are_plain_convolutions_on_cuda(no_tf32):
    conv = FrozenConv3x3(256, 256).requires_grad_(False).to(CUDA)
    x = torch.randn(1, 256, 32, 32, device=CUDA)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=0, atol=0)
    assert conv._cached is None  # no Winograd weights were made for CUDA


def test_stylizer_float16_matches_float32(make_scene):
    torch.manual_seed(0)
    net = TransformerNet(TransformerSpec(width=0.5)).eval()
    batch = torch.stack([make_scene(67, 93, seed=i) for i in range(2)])  # odd sizes: padded, then cropped
    half = Stylizer(net, CUDA, "fp16")
    full = Stylizer(net, torch.device("cpu"), "fp32", "torch")
    assert half.dtype == torch.float16 and Stylizer(net, CUDA).dtype == torch.float32
    a, b = half(batch), full(batch)
    assert a.shape == b.shape == batch.shape and a.device.type == "cpu"
    assert (a - b).abs().max() < 2e-2 and (a - b).abs().mean() < 2e-3


def test_training_on_cuda_lowers_the_loss(tmp_path, photos, style_path):
    o = TrainOptions(style=str(style_path), data=str(photos), weights="random", image_size=32, batch_size=2,
                     width=0.25, workers=0, steps=30, learning_rate=3e-3, quiet=True, seed=3, device="cuda")
    totals: list[float] = []
    result = train(o, tmp_path / "m.pt", callbacks=[lambda step, total, terms: totals.append(terms["loss"])])
    assert result.step == 30 and load_model(tmp_path / "m.pt")[0] is not None
    assert sum(totals[-5:]) < 0.7 * sum(totals[:5]), totals


def test_torchrun_trains_on_cuda(tmp_path, photos, style_path):
    """One process under torchrun: the process group (NCCL on CUDA), DistributedDataParallel, rank 0 writes.
    With one rank no collective runs, so this shows the path works, not NCCL's gradient averaging."""
    out = tmp_path / "m.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m",
                           "impasto.cli", "train", "--style", str(style_path), "--data", str(photos), "-o", str(out),
                           "--weights", "random", "--image-size", "32", "--batch-size", "2", "--width", "0.25",
                           "--steps", "4", "--workers", "0", "--device", "cuda", "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    net, meta = load_model(out)
    assert meta["steps"] == 4


def test_cli_runs_on_cuda_with_amp(tmp_path, make_scene, make_texture, capsys):
    images.save_image(make_scene(48, 64), tmp_path / "c.png")
    images.save_image(make_texture((0.2, 0.3, 0.8), 48, 48), tmp_path / "s.png")
    code = main(["stylize", str(tmp_path / "c.png"), str(tmp_path / "s.png"), "-o", str(tmp_path / "o.png"),
                 "--weights", "random", "--size", "64", "--iterations", "5", "--device", "cuda", "--amp", "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = images.read_metadata(tmp_path / "o.png")
    assert meta["options"]["amp"] is True and meta["options"]["device"] == "cuda"
