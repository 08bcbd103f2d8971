"""An objective's forward and backward pass recorded once as a CUDA graph, then replayed each evaluation.

On a large GPU an evaluation at the sizes most runs use is bound by the CPU launching its few hundred small
kernels, not by the GPU's work: on an H100 at 512 px, 10.7 ms per evaluation held about 4 ms of GPU time
(docs/benchmarks.md). A graph launches them all at once. The optimizers update the image in place, so the
graph reads it where it is and writes its gradient into the same `x.grad` each time.

The objective runs a few times and is then replayed, so it must be a pure function of the image: state it
keeps in Python is frozen at the recording. `IMPASTO_CUDA_GRAPHS=0` turns this off. An objective that cannot
be recorded (an operation that syncs with the CPU, say) runs as before, with a warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .optimize import Objective

Evaluation = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]


# Above this many pixels the GPU is busy enough that launches stop mattering: at 1024x768 graphs measured
# 0.92-1.08x per iteration, while their memory pool raised the run's reserved GPU memory by 45 % (2848 vs
# 1964 MiB for the reference).
MAX_PIXELS = 640 * 1024


def enabled(x: torch.Tensor) -> bool:
    """Record graphs for images on CUDA up to MAX_PIXELS, unless IMPASTO_CUDA_GRAPHS=0."""
    return (x.is_cuda and x.shape[-2] * x.shape[-1] <= MAX_PIXELS
            and os.environ.get("IMPASTO_CUDA_GRAPHS", "1") != "0")


def graphed(objective: Objective, x: torch.Tensor, warmup: int = 2) -> Evaluation | None:
    """A call that fills `x.grad` with the objective's gradient at `x` and returns (loss, terms), replaying a
    CUDA graph; None if the objective cannot be recorded. The returned tensors are overwritten by the next
    call, and `x.grad` must stay (no `zero_grad(set_to_none=True)`): the graph writes there."""
    try:
        with torch.cuda.device(x.device):  # capture on the image's GPU, whichever is current
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # first runs on a side stream, as CUDA graphs ask (lazy init, cuDNN)
                for _ in range(warmup):
                    x.grad = None
                    objective(x)[0].backward()
            torch.cuda.current_stream().wait_stream(side)
            x.grad = None
            graph = torch.cuda.CUDAGraph()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # on the side stream: torch's default capture stream belongs to the GPU of the first capture
                with torch.cuda.graph(graph, stream=side):
                    loss, terms = objective(x)
                    loss.backward()
            empty = [w for w in caught if "empty" in str(w.message)]
            if empty:  # replays would do nothing: the work ran somewhere else
                raise RuntimeError(str(empty[0].message))
            for w in caught:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except Exception as e:  # noqa: BLE001 - any failure to record means: run eagerly
        x.grad = None
        warnings.warn(f"running without CUDA graphs: the objective could not be recorded ({e})", stacklevel=2)
        return None

    def replay() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        graph.replay()
        return loss, terms

    return replay
