"""Importing impasto before torch puts PyTorch's large buffers on transparent huge pages (Linux)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_PROBE = """
import impasto, torch
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written
with open("/proc/self/smaps_rollup") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages")) // 1024)
"""


def _mode() -> str:
    try:
        text = _MODE.read_text()
    except OSError:
        return ""
    return text[text.index("[") + 1:text.index("]")] if "[" in text else ""


def _huge_mib(**env: str) -> int:
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    out = subprocess.run([sys.executable, "-c", _PROBE], env=environ, capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(_mode() not in ("madvise", "always"), reason="no transparent huge pages on this system")
def test_large_buffers_get_huge_pages_unless_turned_off():
    assert _huge_mib() >= 32
    if _mode() == "madvise":  # with "always" the kernel gives them to every process anyway
        assert _huge_mib(THP_MEM_ALLOC_ENABLE="0") == 0
