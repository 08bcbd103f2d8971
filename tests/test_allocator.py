"""keep_freed_memory: a freed large buffer stays with the process for the next iteration (glibc only)."""

import os
import subprocess
import sys

import pytest

from impasto.allocator import _glibc

_PROBE = """
import sys
import torch
from impasto.allocator import keep_freed_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

print(keep_freed_memory())
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, over glibc's largest dynamic mapping threshold (32 MiB)
before = rss()
del x
print((before - rss()) / 2**20)  # MiB given back to the system by the free
"""


def _freed_mib(keep: str) -> tuple[str, float]:
    env = {**os.environ, "IMPASTO_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, given_back = out.stdout.split()
    return applied, float(given_back)


@pytest.mark.skipif(not (_glibc() and sys.platform.startswith("linux")), reason="glibc's allocator only")
def test_freed_memory_stays_in_the_process_unless_turned_off():
    assert _freed_mib("1") == ("True", pytest.approx(0, abs=4))  # kept: the next iteration reuses it
    applied, given_back = _freed_mib("0")  # glibc's default: unmapped at once, faulted in again next time
    assert applied == "False" and given_back > 60
