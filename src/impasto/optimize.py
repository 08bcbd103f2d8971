"""The optimization loop: Adam or L-BFGS on an image's pixels, keeping the best iterate.

The loop knows nothing of files or terminals: it reports each iteration to a callback, and its
whole state (image, optimizer, best iterate) is a plain dict of tensors that can be saved and resumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import ImpastoError

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


def make_optimizer(params: list[torch.Tensor], settings: OptimizerSettings) -> torch.optim.Optimizer:
    if settings.name == "adam":
        return torch.optim.Adam(params, lr=settings.lr, betas=settings.betas, eps=settings.eps)
    if settings.name == "lbfgs":
        # One iteration per step() call, so progress, checkpoints and interrupts happen between them.
        return torch.optim.LBFGS(params, lr=settings.lr, max_iter=1, history_size=settings.history,
                                 tolerance_grad=0.0, tolerance_change=0.0)
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
    Ctrl-C stops the loop between iterations' updates and returns the best iterate so far.
    """
    x = image.detach().clone().requires_grad_(True)
    opt = make_optimizer([x], settings)
    done, best_loss = 0, math.inf
    best = x.detach().clone()
    if resume is not None:
        with torch.no_grad():
            x.copy_(resume["image"])
        opt.load_state_dict(resume["optimizer"])
        done, best_loss = int(resume["iteration"]), float(resume["best_loss"])
        best = resume["best_image"].to(x).clone()
    last: dict[str, float] = {}

    def evaluate() -> torch.Tensor:
        nonlocal best, best_loss
        opt.zero_grad(set_to_none=True)
        loss, terms = objective(x)
        loss.backward()
        value = float(loss.detach())
        last.clear()
        last.update({k: float(v.detach()) for k, v in terms.items()}, total=value)
        if value < best_loss:  # the loss belongs to x before this iteration's update
            best_loss = value
            best = x.detach().clone()
        return loss.detach()

    def state() -> dict:
        return {"image": x.detach().clone(), "optimizer": opt.state_dict(), "iteration": done,
                "best_image": best, "best_loss": best_loss}

    interrupted = False
    try:
        while done < iterations:
            opt.step(evaluate)  # type: ignore[arg-type]
            if not math.isfinite(last.get("total", math.inf)):
                raise ImpastoError("the loss became NaN or infinite; lower the learning rate or weights")
            if clamp and settings.name == "adam":
                with torch.no_grad():
                    x.clamp_(0, 1)
            done += 1
            if callback is not None:
                terms = {k: v for k, v in last.items() if k != "total"}
                callback(Step(done, iterations, last["total"], terms, best_loss, x.detach()), state)
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
