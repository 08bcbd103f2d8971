"""impasto's Adam and L-BFGS make torch.optim's updates bit for bit, share its state layout, and import no
compiler."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch

from impasto.errors import ImpastoError
from impasto.optimizers import LBFGS, Adam

SHAPE = (1, 3, 5, 4)


def bumpy(dtype: torch.dtype):
    """A smooth non-quadratic function of a (1, 3, 5, 4) image, with a nonconvex term so that some L-BFGS
    pairs have y.s <= 1e-10 only by accident, never by construction."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(60, 60, generator=g, dtype=torch.float64)
    a = (a @ a.T / 60 + torch.eye(60, dtype=torch.float64)).to(dtype)
    b = torch.randn(60, generator=g, dtype=torch.float64).to(dtype)

    def f(x: torch.Tensor) -> torch.Tensor:
        v = x.reshape(-1)
        return 0.5 * v @ a @ v - b @ v + 0.05 * v.pow(4).sum() + 0.3 * torch.sin(3 * v).sum()

    return f


def start(dtype: torch.dtype) -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(4), dtype=dtype).requires_grad_(True)


def make(kind: str, x: torch.Tensor, ours: bool):
    if kind == "adam":
        return Adam(x, 0.05, (0.8, 0.99), 1e-6) if ours else torch.optim.Adam([x], 0.05, (0.8, 0.99), 1e-6)
    if ours:
        return LBFGS(x, 0.5, history_size=3)
    return torch.optim.LBFGS([x], 0.5, max_iter=1, history_size=3, tolerance_grad=0.0, tolerance_change=0.0)


def run(opt, x: torch.Tensor, f, steps: int) -> list[float]:
    losses = []

    def closure() -> torch.Tensor:
        x.grad = None
        loss = f(x)
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(float(opt.step(closure).detach()))
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["lbfgs", "adam"])
def test_same_iterates_as_torch_optim(kind, dtype):
    f = bumpy(dtype)
    ours, theirs = start(dtype), start(dtype)
    ours_losses = run(make(kind, ours, True), ours, f, 12)  # 12 > history_size: the history is trimmed
    theirs_losses = run(make(kind, theirs, False), theirs, f, 12)
    assert ours_losses == theirs_losses
    assert torch.equal(ours.detach(), theirs.detach())
    assert ours_losses[-1] < 0.9 * ours_losses[0]


def test_lbfgs_edge_branches_as_torch():
    """A nonconvex function on which L-BFGS skips pairs with y.s <= 1e-10 and meets ascent directions: the
    branches the smooth bowl above never takes, compared with torch for each learning rate."""
    def f(x: torch.Tensor) -> torch.Tensor:
        v = x.reshape(-1)
        return -(v * v).sum() + 0.5 * v.pow(4).sum() + torch.sin(5 * v).sum()

    skipped = 0
    for lr in (0.1, 0.5, 1.0, 2.0):
        ours, theirs = start(torch.float64), start(torch.float64)
        a = LBFGS(ours, lr, history_size=3)
        losses = []
        for _ in range(15):
            pairs = len(a.state.get("old_dirs", []))
            losses += run(a, ours, f, 1)
            skipped += a.state["n_iter"] > 1 and len(a.state["old_dirs"]) == pairs < 3
        b = torch.optim.LBFGS([theirs], lr, max_iter=1, history_size=3, tolerance_grad=0.0, tolerance_change=0.0)
        assert losses == run(b, theirs, f, 15)
        assert torch.equal(ours.detach(), theirs.detach())
    assert skipped > 0  # the test reached the branch it is about


@pytest.mark.parametrize("kind", ["lbfgs", "adam"])
@pytest.mark.parametrize("first", ["ours", "torch"])
def test_a_saved_state_continues_in_the_other(kind, first):
    """A state saved by one (as `--state` saves it, through torch.save) continues in the other exactly as an
    uninterrupted run: states written by torch.optim, before impasto had its own, still resume."""
    f = bumpy(torch.float32)
    straight = start(torch.float32)
    expected = run(make(kind, straight, True), straight, f, 9)

    x = start(torch.float32)
    a = make(kind, x, first == "ours")
    losses = run(a, x, f, 5)
    saved = a.state_dict()
    if kind == "lbfgs":
        assert len(saved["state"][0]["old_dirs"]) == 3
    torch.save(saved, buffer := io.BytesIO())
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    y = x.detach().clone().requires_grad_(True)
    b = make(kind, y, first != "ours")
    b.load_state_dict(loaded)
    losses += run(b, y, f, 4)
    assert losses == expected
    assert torch.equal(y.detach(), straight.detach())


def test_lbfgs_stops_at_a_stationary_point():
    x = torch.zeros(SHAPE, requires_grad=True)
    opt = LBFGS(x, 1.0, 5)

    def flat() -> torch.Tensor:
        loss = (x * 0).sum()
        loss.backward()
        return loss

    loss = opt.step(flat)
    assert float(loss.detach()) == 0.0 and torch.equal(x.detach(), torch.zeros(SHAPE))
    assert opt.state == {"n_iter": 0}


def test_a_state_of_another_layout_or_image_size_is_refused():
    opt = Adam(torch.zeros(SHAPE, requires_grad=True), 0.1, (0.9, 0.999), 1e-8)
    with pytest.raises(ImpastoError, match="^the saved optimizer state does not fit this run$"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    with pytest.raises(ImpastoError, match="^the saved optimizer state does not fit this run$"):
        opt.load_state_dict({"param_groups": [{"lr": 0.1}]})
    for kind in ("adam", "lbfgs"):
        small = start(torch.float32)[:, :, :2].detach().requires_grad_(True)
        a = make(kind, small, True)
        run(a, small, lambda x: (x * x).sum(), 3)
        b = make(kind, start(torch.float32), True)
        with pytest.raises(ImpastoError, match=r"does not fit this run \(an image of another size\)$"):
            b.load_state_dict(a.state_dict())


def test_a_run_imports_no_compiler():
    """torch.optim's constructors import torch._dynamo (2 s, 72 MiB); a whole optimization does not."""
    code = ("import sys, torch\n"
            "from impasto.optimize import OptimizerSettings, optimize\n"
            "for name in ('lbfgs', 'adam'):\n"
            "    r = optimize(torch.full((1, 3, 4, 4), 0.9), lambda x: (((x - 0.3) ** 2).sum(), {}), 3,\n"
            "                 OptimizerSettings(name, lr=0.1))\n"
            "    assert r.loss < 0.9 * 48 * 0.36, r.loss\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", ["adam", "lbfgs"])
def test_an_incomplete_state_is_refused_when_loaded_not_at_the_next_step(kind):
    """A state missing one of its keys failed with a KeyError (a traceback) inside the next step."""
    x = start(torch.float32).detach().requires_grad_(True)
    a = make(kind, x, True)
    run(a, x, lambda t: (t * t).sum(), 3)
    for key in sorted(type(a).STATE_KEYS):  # L-BFGS also keeps "al", a scratch list it remakes
        saved = copy.deepcopy(a.state_dict())  # state_dict shares the optimizer's own dict
        del saved["state"][0][key]
        b = make(kind, start(torch.float32).detach().requires_grad_(True), True)
        with pytest.raises(ImpastoError, match=r"does not fit this run \(it is incomplete\)$"):
            b.load_state_dict(saved)
    fresh = make(kind, start(torch.float32).detach().requires_grad_(True), True)
    fresh.load_state_dict({"state": {}, "param_groups": a.state_dict()["param_groups"]})  # before any step: fine
