"""The optimization loop: Adam or L-BFGS on an image's pixels, keeping the best iterate.

The loop knows nothing of files or terminals: it reports each iteration to a callback, and its
whole state (image, optimizer, best iterate) is a plain dict of tensors that can be saved and resumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from . import cuda_graphs, interrupts
from .errors import ImpastoError
from .images import resize
from .optimizers import LBFGS, Adam

Objective = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class OptimizerSettings:
    """Which optimizer and its hyper-parameters (learning rate, Adam's betas, L-BFGS history)."""

    name: str = "lbfgs"
    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    history: int = 100


@dataclass
class Step:
    """What the loop reports after each iteration."""

    iteration: int  # iterations done, 1-based
    total: int  # iterations planned
    loss: float
    terms: dict[str, float]
    best_loss: float
    image: torch.Tensor  # the current iterate (no grad); do not modify


@dataclass
class Result:
    image: torch.Tensor  # the best iterate
    loss: float
    iterations: int
    interrupted: bool = False
    state: dict = field(default_factory=dict)  # resumable state at the end


def make_optimizer(x: torch.Tensor, settings: OptimizerSettings) -> Adam | LBFGS:
    if settings.name == "adam":
        return Adam(x, settings.lr, settings.betas, settings.eps)
    if settings.name == "lbfgs":  # one iteration per step(), so progress, checkpoints and interrupts come between
        return LBFGS(x, settings.lr, settings.history)
    raise ImpastoError(f"unknown optimizer {settings.name!r}; choose lbfgs or adam")


def optimize(
    image: torch.Tensor,
    objective: Objective,
    iterations: int,
    settings: OptimizerSettings,
    callback: Callable[[Step, Callable[[], dict]], None] | None = None,
    resume: dict | None = None,
    clamp: bool = True,
) -> Result:
    """Minimize `objective` over the pixels of `image` (N, 3, H, W) for `iterations` iterations.

    `callback(step, state_fn)` runs after each iteration; `state_fn()` returns the resumable state.
    Ctrl-C stops the loop between iterations' updates and returns the best iterate so far. On CUDA the
    objective is recorded once as a CUDA graph and replayed (`cuda_graphs`): it must be a pure function of
    the image, returning a scalar loss and scalar terms.
    """
    x = image.detach().clone().requires_grad_(True)
    opt = make_optimizer(x, settings)
    done, best_loss = 0, math.inf
    best = x.detach().clone()
    if resume is not None:
        if tuple(resume["image"].shape) != tuple(x.shape):
            raise ImpastoError(f"the saved run's image is {resume['image'].shape[-1]}x{resume['image'].shape[-2]} but "
                               f"this run's is {x.shape[-1]}x{x.shape[-2]}: an input has changed; start afresh")
        with torch.no_grad():
            x.copy_(resume["image"])
        opt.load_state_dict(resume["optimizer"])
        done, best_loss = int(resume["iteration"]), float(resume["best_loss"])
        best = resume["best_image"].to(x).clone()
    last: dict[str, float] = {}
    run: cuda_graphs.Evaluation | None = None  # how an evaluation runs, chosen at the first one

    def eager() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x.grad = None
        loss, terms = objective(x)
        loss.backward()
        return loss, terms

    def evaluate() -> torch.Tensor:
        nonlocal best, best_loss, run
        if run is None:
            run = (cuda_graphs.enabled(x) and cuda_graphs.graphed(objective, x)) or eager
        loss, terms = run()
        values = torch.stack([t.detach().reshape(()) for t in (loss, *terms.values())]).tolist()  # one sync
        last.clear()
        last.update(zip(terms, values[1:], strict=True), total=values[0])
        if values[0] < best_loss:  # the loss belongs to x before this iteration's update
            best_loss = values[0]
            best = x.detach().clone()
        return loss.detach().clone()  # a replayed graph overwrites its own

    def state() -> dict:
        return {"image": x.detach().clone(), "optimizer": opt.state_dict(), "iteration": done,
                "best_image": best, "best_loss": best_loss}

    interrupted = False
    try:
        while done < iterations:
            with interrupts.held():  # a step, its count and its saved state go together or not at all
                opt.step(evaluate)
                if not math.isfinite(last.get("total", math.inf)):
                    raise ImpastoError("the loss became NaN or infinite; lower the learning rate or weights")
                if clamp and settings.name == "adam":
                    with torch.no_grad():
                        x.clamp_(0, 1)
                done += 1
                if callback is not None:
                    terms = {k: v for k, v in last.items() if k != "total"}
                    callback(Step(done, iterations, last["total"], terms, best_loss, x.detach()), state)
        if run is not None and run is not eager:  # the recorded graph: no second set of activations
            last["total"] = float(run()[0].detach())
        else:
            _final_evaluation(x, objective, last)
        if last["total"] < best_loss:
            best_loss, best = last["total"], x.detach().clone()
    except KeyboardInterrupt:
        interrupted = True
    return Result(best, best_loss, done, interrupted, state())


def _final_evaluation(x: torch.Tensor, objective: Objective, last: dict[str, float]) -> None:
    """The last update is not evaluated by the loop; evaluate it so the best iterate can be it."""
    with torch.no_grad():
        loss, _ = objective(x)
    last["total"] = float(loss)


@dataclass
class Stage:
    """One optimization at one size. Artistic scales and photorealistic passes are stages; each
    stage starts from the previous stage's best image, resized to `size` (or made by `start`)."""

    size: tuple[int, int]
    iterations: int
    objective: Callable[[], Objective]  # builds the stage's targets when the stage starts
    name: str = ""
    start: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None = None  # (previous result, size) -> start


@dataclass
class Progress:
    """One iteration of one stage, as reported to callbacks (progress bar, checkpoints, tests)."""

    step: Step
    stage: int  # index of the current stage
    stages: int
    offset: int  # iterations done in earlier stages
    name: str
    state: Callable[[], dict]  # the resumable state after this iteration


@dataclass
class Outcome:
    image: torch.Tensor  # (3, H, W), the best iterate of the last stage run
    loss: float
    iterations: int  # over all stages
    interrupted: bool
    state: dict  # resumable: {"stage": index, "loop": the loop's state}


def run_stages(
    start: torch.Tensor,
    stages: Sequence[Stage],
    settings: OptimizerSettings,
    callbacks: Sequence[Callable[[Progress], None]] = (),
    resume: dict | None = None,
    device: torch.device | str = "cpu",
    clamp: bool = True,
) -> Outcome:
    """Optimize through `stages` in order from the (3, H, W) image `start`, or from a saved state."""
    first = 0 if resume is None else int(resume["stage"])
    x = start if resume is None else resume["loop"]["image"][0].cpu()
    done_before = sum(s.iterations for s in stages[:first])
    outcome: Outcome | None = None
    for index in range(first, len(stages)):
        stage = stages[index]
        loop_resume = resume["loop"] if resume is not None and index == first else None
        if loop_resume is not None and int(loop_resume["iteration"]) > stage.iterations:
            where = f" at {stage.name}" if stage.name else ""
            raise ImpastoError(f"the saved run has done {int(loop_resume['iteration'])} iterations{where}, more than "
                               f"the {stage.iterations} asked for; ask for at least that many")
        try:
            if index > first and stage.start is not None:  # coming from the previous stage, not from a resume
                x = stage.start(x, stage.size)
            if tuple(x.shape[-2:]) != tuple(stage.size):
                x = resize(x, stage.size)
            objective = stage.objective()  # the targets (and photo's matting Laplacian): seconds at large sizes
        except KeyboardInterrupt:
            if outcome is None:
                raise
            return replace(outcome, interrupted=True)  # the finished stages' result, resumable where it ended
        report = _reporter(callbacks, index, stages, done_before)
        result = optimize(x[None].to(device), objective, stage.iterations, settings, report, loop_resume, clamp)
        x = result.image[0].detach().cpu()
        done_before += result.iterations if result.interrupted else stage.iterations
        outcome = Outcome(x, result.loss, done_before, result.interrupted, {"stage": index, "loop": result.state})
        if result.interrupted:
            break
    if outcome is None:
        raise ImpastoError("nothing to optimize: no stages")
    return outcome


def _reporter(callbacks: Sequence[Callable[[Progress], None]], index: int, stages: Sequence[Stage], offset: int):
    def report(step: Step, loop_state: Callable[[], dict]) -> None:
        progress = Progress(step, index, len(stages), offset, stages[index].name,
                            lambda: {"stage": index, "loop": loop_state()})
        for callback in callbacks:
            callback(progress)

    return report
