"""The optimization loop: both optimizers lower the loss, the best iterate is kept, Ctrl-C, NaN, resume."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from impasto.artistic import StylizeOptions, stylize_tensors
from impasto.errors import ImpastoError, ImpastoWarning
from impasto.nets import load_vgg
from impasto.optimize import OptimizerSettings, Stage, optimize, run_stages

STYLE_LAYERS = ["relu1_1", "relu2_1"]
CONTENT_LAYERS = ["relu2_1"]


class Recorder:
    """An objective that records every point it is evaluated at, and its loss."""

    def __init__(self, fn, interrupt_at: int | None = None):
        self.fn, self.interrupt_at = fn, interrupt_at
        self.points: list[torch.Tensor] = []
        self.losses: list[float] = []

    def __call__(self, x: torch.Tensor):
        if self.interrupt_at is not None and len(self.losses) + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        loss = self.fn(x)
        self.points.append(x.detach().clone())
        self.losses.append(float(loss.detach()))
        return loss, {"value": loss.detach()}


def squared_distance(target: float):
    return lambda x: (x - target).pow(2).sum()


def quartic_bowl():
    """A smooth, strictly convex function of a (1, 3, 2, 2) image with its minimum off-centre."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = a @ a.T / 12 + torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        v = x.reshape(-1)
        return 0.5 * v @ a @ v - b @ v + 0.1 * v.pow(4).sum()

    return f


@pytest.mark.parametrize("name", ["lbfgs", "adam"])
def test_optimizers_minimize_a_toy_objective(name):
    start = torch.full((1, 3, 4, 4), 0.9)
    objective = Recorder(squared_distance(0.3))
    settings = OptimizerSettings(name, lr=1.0 if name == "lbfgs" else 0.05)
    result = optimize(start, objective, 40, settings)
    assert result.iterations == 40 and not result.interrupted
    assert objective.losses[0] == pytest.approx(48 * 0.36, rel=1e-5)
    assert result.loss < 1e-3 * objective.losses[0]
    assert torch.allclose(result.image, torch.full_like(start, 0.3), atol=0.02)
    assert torch.equal(start, torch.full((1, 3, 4, 4), 0.9))  # the input is not modified


def test_lbfgs_one_iteration_per_step_is_torch_lbfgs():
    """Stepping L-BFGS one iteration at a time gives exactly torch's N-iteration L-BFGS."""
    f = quartic_bowl()
    start = torch.rand(1, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    n = 8
    objective = Recorder(f)
    result = optimize(start, objective, n, OptimizerSettings("lbfgs", lr=1.0, history=5))
    assert len(objective.losses) == n + 1  # one evaluation per iteration, plus the final one

    ref = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([ref], lr=1.0, max_iter=n, max_eval=10 * n, history_size=5,
                            tolerance_grad=0.0, tolerance_change=0.0)

    def closure():
        opt.zero_grad()
        loss = f(ref)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(result.state["image"], ref.detach(), rtol=0, atol=1e-12)
    assert result.loss == pytest.approx(float(f(ref.detach())), rel=1e-12)


def test_adam_matches_torch_adam_with_clamping():
    f = quartic_bowl()
    start = torch.rand(1, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    settings = OptimizerSettings("adam", lr=0.1, betas=(0.8, 0.99), eps=1e-6)
    result = optimize(start, Recorder(f), 15, settings)
    ref = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=0.1, betas=(0.8, 0.99), eps=1e-6)
    for _ in range(15):
        opt.zero_grad()
        f(ref).backward()
        opt.step()
        with torch.no_grad():
            ref.clamp_(0, 1)
    torch.testing.assert_close(result.state["image"], ref.detach(), rtol=0, atol=1e-12)
    assert result.state["image"].min() >= 0 and result.state["image"].max() <= 1


def test_adam_clamps_to_unit_range_unless_told_not_to():
    start = torch.full((1, 3, 2, 2), 0.5)
    clamped = optimize(start, Recorder(squared_distance(1.7)), 30, OptimizerSettings("adam", lr=0.1))
    assert clamped.state["image"].max() <= 1.0
    assert torch.allclose(clamped.state["image"], torch.ones_like(start))
    free = optimize(start, Recorder(squared_distance(1.7)), 30, OptimizerSettings("adam", lr=0.1), clamp=False)
    assert free.state["image"].min() > 1.2


def test_best_iterate_is_kept_not_the_last():
    """Adam with a huge step oscillates; the result is the lowest-loss point ever evaluated."""
    objective = Recorder(squared_distance(0.5))
    steps = []
    start = torch.zeros(1, 3, 4, 4)
    n = 10
    result = optimize(start, objective, n, OptimizerSettings("adam", lr=0.4),
                      callback=lambda step, state: steps.append((step.loss, step.best_loss, step.image.clone())))
    losses = objective.losses
    assert len(losses) == n + 1 and len(steps) == n
    best = min(range(len(losses)), key=losses.__getitem__)
    assert 0 < best < len(losses) - 1  # the minimum is neither the start nor the end: the test bites
    assert losses[-1] > 2 * losses[best]

    reported = [s[0] for s in steps]
    assert reported == losses[:n]  # step i reports the loss of the point it evaluated
    assert result.loss == min(reported) == losses[best]
    # The point evaluated at step i is the image after step i-1 (the start for step 1).
    evaluated = [start, *[s[2] for s in steps[:-1]]]
    for point, recorded in zip(evaluated, objective.points[:n], strict=True):
        assert torch.equal(point, recorded)
    assert torch.equal(result.image, objective.points[best])
    assert not torch.equal(result.image, result.state["image"])  # not merely the last iterate
    # best_loss reported to callbacks is the running minimum
    assert [s[1] for s in steps] == [min(reported[: i + 1]) for i in range(n)]
    assert result.state["best_loss"] == result.loss and torch.equal(result.state["best_image"], result.image)


def test_final_iterate_counts_when_it_is_best():
    """The last update is evaluated after the loop, so a monotone run returns its final point."""
    objective = Recorder(squared_distance(0.25))
    start = torch.full((1, 3, 2, 2), 0.75)
    result = optimize(start, objective, 5, OptimizerSettings("adam", lr=0.01))
    assert len(objective.losses) == 6
    assert objective.losses == sorted(objective.losses, reverse=True)
    assert result.loss == objective.losses[-1]
    assert torch.equal(result.image, objective.points[-1])


@pytest.mark.parametrize("name", ["adam", "lbfgs"])
def test_keyboard_interrupt_returns_best_so_far(name):
    objective = Recorder(squared_distance(0.5), interrupt_at=5)
    calls = []
    settings = OptimizerSettings(name, lr=0.4 if name == "adam" else 1.0)
    result = optimize(torch.zeros(1, 3, 4, 4), objective, 20, settings,
                      callback=lambda step, state: calls.append(step.iteration))
    assert result.interrupted
    assert result.iterations == 4
    assert calls == [1, 2, 3, 4]
    assert len(objective.losses) == 4
    best = min(range(4), key=objective.losses.__getitem__)
    assert result.loss == objective.losses[best]
    assert torch.equal(result.image, objective.points[best])
    assert result.state["iteration"] == 4


def test_nan_loss_raises_impasto_error():
    def objective(x):
        loss = x.sum() * float("nan")
        return loss, {}

    with pytest.raises(ImpastoError, match="NaN"):
        optimize(torch.rand(1, 3, 2, 2), objective, 3, OptimizerSettings("adam", lr=0.1))


def test_unknown_optimizer():
    with pytest.raises(ImpastoError, match="unknown optimizer"):
        optimize(torch.rand(1, 3, 2, 2), Recorder(squared_distance(0.0)), 3, OptimizerSettings("sgd"))


@pytest.mark.parametrize("name", ["lbfgs", "adam"])
def test_optimize_resume_equals_uninterrupted(name):
    f = quartic_bowl()
    start = torch.rand(1, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    settings = OptimizerSettings(name, lr=1.0 if name == "lbfgs" else 0.05, history=4)
    snapshots = {}

    def callback(step, state):
        if step.iteration == 4:
            snapshots["state"] = _roundtrip(state())

    full = optimize(start, Recorder(f), 10, settings, callback)
    resumed = optimize(torch.zeros_like(start), Recorder(f), 10, settings, resume=snapshots["state"])
    assert resumed.iterations == 10
    assert torch.equal(full.state["image"], resumed.state["image"])
    assert torch.equal(full.image, resumed.image) and full.loss == resumed.loss


@pytest.mark.parametrize("name", ["lbfgs", "adam"])
def test_ctrl_c_in_objective_then_resume_equals_uninterrupted(name):
    f = quartic_bowl()
    start = torch.rand(1, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    settings = OptimizerSettings(name, lr=1.0 if name == "lbfgs" else 0.05, history=4)
    full = optimize(start, Recorder(f), 9, settings)
    stopped = optimize(start, Recorder(f, interrupt_at=6), 9, settings)
    assert stopped.interrupted and stopped.iterations == 5
    resumed = optimize(start, Recorder(f), 9, settings, resume=_roundtrip(stopped.state))
    assert not resumed.interrupted and resumed.iterations == 9
    assert torch.equal(full.state["image"], resumed.state["image"])
    assert torch.equal(full.image, resumed.image) and full.loss == resumed.loss


class SignalAt(Recorder):
    """An objective during whose n-th evaluation the process gets a real SIGINT (a Ctrl-C)."""

    def __init__(self, fn, n: int):
        super().__init__(fn)
        self.n = n

    def __call__(self, x: torch.Tensor):
        if len(self.losses) + 1 == self.n:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__call__(x)


@pytest.mark.parametrize("name", ["lbfgs", "adam"])
def test_a_ctrl_c_during_a_step_is_held_until_the_step_is_done(name):
    """The interrupt lands between iterations, never inside one: the 6th evaluation's step completes and
    counts (before, it was cut short, with L-BFGS's history possibly half updated), and the resume is exact."""
    f = quartic_bowl()
    start = torch.rand(1, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    settings = OptimizerSettings(name, lr=1.0 if name == "lbfgs" else 0.05, history=4)
    full = optimize(start, Recorder(f), 9, settings)
    seen: list[int] = []
    stopped = optimize(start, SignalAt(f, 6), 9, settings, callback=lambda step, state: seen.append(step.iteration))
    assert stopped.interrupted and stopped.iterations == 6 and seen == [1, 2, 3, 4, 5, 6]
    resumed = optimize(start, Recorder(f), 9, settings, resume=_roundtrip(stopped.state))
    assert torch.equal(full.state["image"], resumed.state["image"]) and full.loss == resumed.loss


def test_ctrl_c_between_stages_keeps_the_finished_stage_and_resumes_exactly():
    """Building a stage's targets (seconds at large sizes) was outside the loop's Ctrl-C handling: an
    interrupt there lost every finished stage."""
    f = quartic_bowl()
    settings = OptimizerSettings("lbfgs", lr=1.0, history=4)
    start = torch.rand(3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def stages(interrupt: bool) -> list[Stage]:
        def second() -> Recorder:
            if interrupt:
                raise KeyboardInterrupt
            return Recorder(lambda x: f(x * 0.5))
        return [Stage((2, 2), 4, lambda: Recorder(f), "one"), Stage((2, 2), 5, second, "two")]

    full = run_stages(start, stages(False), settings)
    stopped = run_stages(start, stages(True), settings)
    first_only = run_stages(start, stages(False)[:1], settings)
    assert stopped.interrupted and stopped.iterations == 4 and stopped.state["stage"] == 0
    assert torch.equal(stopped.image, first_only.image)
    resumed = run_stages(start, stages(False), settings, resume=_roundtrip(stopped.state))
    assert not resumed.interrupted and resumed.iterations == full.iterations == 9
    assert torch.equal(resumed.image, full.image) and resumed.loss == full.loss


def _roundtrip(state: dict) -> dict:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- a real (small, random-weight) network -----------------------------------------------------------


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    with pytest.warns(ImpastoWarning, match="random"):
        return load_vgg("vgg19", STYLE_LAYERS + CONTENT_LAYERS, "avg", "random")


@pytest.mark.parametrize(("name", "iterations"), [("lbfgs", 15), ("adam", 15)])
def test_stylize_64px_lowers_loss_substantially(net, make_scene, make_texture, name, iterations):
    content = make_scene(48, 64, seed=0)
    style = make_texture((0.8, 0.2, 0.3), 48, 48, seed=0)
    opts = StylizeOptions(iterations=iterations, size=64, optimizer=name, content_layers=CONTENT_LAYERS,
                          style_layers=STYLE_LAYERS, weights="random", pooling="avg", device="cpu")
    losses = []
    result = stylize_tensors(content, [style], opts, [lambda p: losses.append(p.step.loss)], net=net)
    assert len(losses) == iterations and all(math.isfinite(v) for v in losses)
    assert result.image.shape == (3, 48, 64)
    assert result.iterations == iterations and not result.interrupted
    assert result.loss < 0.5 * losses[0]
    assert result.loss <= min(losses)
    assert (result.image - content).abs().mean() > 0.01  # the image really changed
    assert result.image.min() >= 0 and result.image.max() <= 1


def test_a_stage_starts_from_its_start_function_of_the_previous_result():
    first, second = Recorder(squared_distance(0.25)), Recorder(squared_distance(0.75))
    seen = []

    def start(previous: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        seen.append((previous.clone(), hw))
        return torch.full((3, *hw), 0.5)

    stages = [Stage((2, 2), 3, lambda: first, "a", start), Stage((4, 4), 2, lambda: second, "b", start)]
    out = run_stages(torch.zeros(3, 2, 2), stages, OptimizerSettings("adam", lr=0.1))
    assert len(seen) == 1  # not for the first stage, whose start is given
    assert torch.equal(seen[0][0], first.points[int(torch.tensor(first.losses).argmin())][0]) and seen[0][1] == (4, 4)
    assert torch.equal(second.points[0][0], torch.full((3, 4, 4), 0.5))
    resumed = Recorder(squared_distance(0.75))
    stages[1] = Stage((4, 4), 2, lambda: resumed, "b", start)
    run_stages(torch.zeros(3, 2, 2), stages, OptimizerSettings("adam", lr=0.1), resume=out.state)
    assert len(seen) == 1  # a resumed stage goes on from its saved image


def test_held_interrupts_leave_a_callers_own_signal_handling_alone():
    """A Python caller who ignores Ctrl-C gets no interrupt from the hold, and SIGTERM keeps its default
    (the `impasto` command alone turns it into an interrupt)."""
    from impasto import interrupts

    f = quartic_bowl()
    start = torch.rand(1, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = optimize(start, SignalAt(f, 3), 6, OptimizerSettings("adam", lr=0.05))
        with interrupts.held():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not result.interrupted and result.iterations == 6


def test_nested_holds_raise_once_at_the_outer_end():
    from impasto import interrupts

    reached = []
    with pytest.raises(KeyboardInterrupt), interrupts.held():
        with interrupts.held():
            os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the inner block")
    assert reached == ["after the inner block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
