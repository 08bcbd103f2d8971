"""Adam and L-BFGS for the one tensor that an optimization changes: the image.

torch.optim's optimizers import torch._dynamo when they are made (`torch._compile._disable_dynamo` on
`Optimizer.add_param_group`): about 2 s and 72 MiB before a run's first iteration, for a compiler these runs
never use. These two make the same updates as `torch.optim.Adam` and `torch.optim.LBFGS(max_iter=1)`
without a line search, operation for operation, so their results are equal bit for bit on the CPU (the tests
compare them; on CUDA torch's Adam takes its multi-tensor path, whose division may round the last bit
differently), and their `state_dict` has torch's layout, so a state saved by either resumes in either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import ImpastoError

Closure = Callable[[], torch.Tensor]


class _ImageOptimizer:
    """What the loop needs of an optimizer: `step(closure)` and a state that can be saved and loaded."""

    STATE_KEYS: frozenset[str] = frozenset()  # what a state holds once the optimizer has stepped
    FRESH_KEYS: frozenset[str] = frozenset()  # what it may hold before

    def __init__(self, x: torch.Tensor, group: dict[str, Any]) -> None:
        self.x, self.group = x, group
        self.state: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: the state of parameter 0 and one parameter group. Tensors are not copied."""
        return {"state": {0: self.state} if self.state else {}, "param_groups": [{**self.group, "params": [0]}]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        try:
            group, state = saved["param_groups"][0], saved["state"].get(0, {})
            self.group.update({k: group[k] for k in self.group if k in group})
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ImpastoError("the saved optimizer state does not fit this run") from None
        if set(state) - self.FRESH_KEYS and not set(state) >= self.STATE_KEYS:  # a step would fail on it
            raise ImpastoError("the saved optimizer state does not fit this run (it is incomplete)")
        state = {k: self._to_image(v, k) for k, v in state.items()}
        if any(t.numel() != self.x.numel() for t in _image_sized(state)):
            raise ImpastoError("the saved optimizer state does not fit this run (an image of another size)")
        self.state = state

    def step(self, closure: Closure) -> torch.Tensor:
        raise NotImplementedError

    def _to_image(self, value: Any, key: str) -> Any:
        """Saved tensors (also inside lists) onto the image's device and dtype, as torch.optim does; Adam's
        step count stays where it is."""
        if isinstance(value, torch.Tensor) and key != "step":
            return value.to(self.x.device, self.x.dtype) if value.is_floating_point() else value.to(self.x.device)
        if isinstance(value, list):
            return [self._to_image(v, key) for v in value]
        return value


class Adam(_ImageOptimizer):
    """Adam (Kingma & Ba 2015), as torch.optim.Adam without weight decay, AMSGrad or a tensor learning rate."""

    STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})

    def __init__(self, x: torch.Tensor, lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(x, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0, "amsgrad": False,
                             "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                             "fused": None, "decoupled_weight_decay": False})  # torch's keys, for its loader

    @torch.no_grad()
    def step(self, closure: Closure) -> torch.Tensor:
        with torch.enable_grad():
            loss = closure()
        x, grad = self.x, self.x.grad
        if grad is None:
            return loss
        lr, (beta1, beta2), eps = self.group["lr"], self.group["betas"], self.group["eps"]
        if not self.state:
            zeros = [torch.zeros_like(x, memory_format=torch.preserve_format) for _ in range(2)]
            self.state = {"step": torch.tensor(0.0), "exp_avg": zeros[0], "exp_avg_sq": zeros[1]}
        s = self.state
        s["step"] += 1
        s["exp_avg"].lerp_(grad, 1 - beta1)
        s["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = s["step"].item()
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (s["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(eps)
        x.addcdiv_(s["exp_avg"], denom, value=-(lr / (1 - beta1**step)))
        return loss


class LBFGS(_ImageOptimizer):
    """L-BFGS (Nocedal 1980) one iteration per `step`, with a fixed step (`lr`) and no line search, as
    torch.optim.LBFGS(max_iter=1, tolerance_grad=0, tolerance_change=0): the first step is scaled down to
    at most `lr` over the gradient's L1 norm, and a pair (s, y) enters the history only where y.s > 1e-10."""

    STATE_KEYS = frozenset({"n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad"})
    FRESH_KEYS = frozenset({"n_iter"})  # all a state has before its first step (at a stationary point)

    def __init__(self, x: torch.Tensor, lr: float, history_size: int) -> None:
        super().__init__(x, {"lr": lr, "max_iter": 1, "max_eval": 1, "tolerance_grad": 0.0, "tolerance_change": 0.0,
                             "history_size": history_size, "line_search_fn": None})  # torch's keys

    @torch.no_grad()
    def step(self, closure: Closure) -> torch.Tensor:
        with torch.enable_grad():
            loss = closure()
        grad = self.x.grad
        s = self.state  # torch's keys, less func_evals and prev_loss: one iteration per step never reads them
        s.setdefault("n_iter", 0)
        if grad is None or grad.abs().max() <= 0:  # a stationary point: nothing to do
            return loss
        g = grad.reshape(-1)
        s["n_iter"] += 1
        if s["n_iter"] == 1:
            s.update(d=g.neg(), old_dirs=[], old_stps=[], ro=[], H_diag=1)
        else:
            self._remember(g)
            s["d"] = self._direction(g)
        if s.get("prev_flat_grad") is None:
            s["prev_flat_grad"] = g.clone(memory_format=torch.contiguous_format)
        else:
            s["prev_flat_grad"].copy_(g)
        lr = self.group["lr"]
        s["t"] = min(1.0, 1.0 / g.abs().sum()) * lr if s["n_iter"] == 1 else lr
        if not g.dot(s["d"]) > 0:  # torch's test with tolerance_change 0: no step uphill
            self.x.add_(s["d"].view_as(self.x), alpha=s["t"])
        return loss

    def _remember(self, g: torch.Tensor) -> None:
        """Add the last step s and its gradient change y to the history, where the curvature is positive."""
        st = self.state
        y, step = g.sub(st["prev_flat_grad"]), st["d"].mul(st["t"])
        ys = y.dot(step)
        if ys > 1e-10:
            if len(st["old_dirs"]) == self.group["history_size"]:
                for key in ("old_dirs", "old_stps", "ro"):
                    st[key].pop(0)
            st["old_dirs"].append(y)
            st["old_stps"].append(step)
            st["ro"].append(1.0 / ys)
            st["H_diag"] = ys / y.dot(y)

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        """The two-loop recursion: the inverse-Hessian estimate times -g."""
        st = self.state
        dirs, stps, ro = st["old_dirs"], st["old_stps"], st["ro"]
        al = st.setdefault("al", [None] * self.group["history_size"])
        q = g.neg()
        for i in range(len(dirs) - 1, -1, -1):
            al[i] = stps[i].dot(q) * ro[i]
            q.add_(dirs[i], alpha=-al[i])
        r = torch.mul(q, st["H_diag"])
        for i in range(len(dirs)):
            be_i = dirs[i].dot(r) * ro[i]
            r.add_(stps[i], alpha=al[i] - be_i)
        return r


def _image_sized(state: dict[str, Any]) -> list[torch.Tensor]:
    """The state's tensors of one value per pixel (moments, directions, history), as opposed to scalars."""
    values = [v for value in state.values() for v in (value if isinstance(value, list) else [value])]
    return [v for v in values if isinstance(v, torch.Tensor) and v.dim() > 0]
