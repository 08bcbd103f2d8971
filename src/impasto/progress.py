"""Progress display for the engines: a tqdm bar with each loss term, s/it and ETA, or log lines."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm


class ProgressBar:
    """A callback that shows the iterations of each stage as a bar; `print_every` adds a log line."""

    def __init__(self, quiet: bool = False, print_every: int = 0) -> None:
        self.quiet, self.print_every = quiet, print_every
        self._bar: tqdm | None = None
        self._stage = -1

    def __call__(self, progress: Any) -> None:
        step = progress.step
        line = None
        if self.print_every and step.iteration % self.print_every == 0:
            parts = " ".join(f"{k}={v:.5g}" for k, v in step.terms.items())
            line = f"iteration {step.iteration}/{step.total}: loss={step.loss:.5g} {parts}"
        if self.quiet:  # no bar; the log lines asked for still come (for logs and CI)
            if line:
                _log(line, print)
            return
        if progress.stage != self._stage or self._bar is None:
            self.close()
            self._stage = progress.stage
            label = f"{progress.name} " if progress.name else ""
            h, w = step.image.shape[-2:]
            self._bar = tqdm(total=step.total, initial=step.iteration - 1, unit="it", file=sys.stderr,
                             desc=f"{label}{w}x{h}", dynamic_ncols=True, smoothing=0.1)
        terms = {k: f"{v:.4g}" for k, v in step.terms.items()}
        self._bar.set_postfix(loss=f"{step.loss:.4g}", **terms, refresh=False)
        self._bar.update(1)
        if line:
            _log(line, self._bar.write)  # on stdout, as neural_style.py's; the bar is on stderr
        if step.iteration >= step.total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _log(line: str, write: Any) -> None:
    """Write a log line to stdout; if its reader has gone (`... | head`), drop the lines, not the run."""
    try:
        write(line)
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()


def silence_stdout() -> None:
    """Point stdout at the null device, so that later writes and Python's flush at exit raise nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
