"""keep_freed_memory: a freed buffer under 32 MiB stays with the process for the next iteration, a larger one
goes back to the system (glibc only)."""

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
for mib in (24, 64):  # under and over the 32 MiB above which buffers keep their own mapping
    x = torch.ones(mib * 2**20 // 4)
    before = rss()
    del x
    print((before - rss()) / 2**20)  # MiB given back to the system by the free
"""


def _given_back(keep: str) -> tuple[str, float, float]:
    env = {**os.environ, "IMPASTO_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, small, large = out.stdout.split()
    return applied, float(small), float(large)


@pytest.mark.skipif(not (_glibc() and sys.platform.startswith("linux")), reason="glibc's allocator only")
def test_freed_memory_under_32_mib_stays_in_the_process_unless_turned_off():
    applied, small, large = _given_back("1")
    assert applied == "True"
    assert small == pytest.approx(0, abs=2)  # kept: the next iteration reuses it without page faults
    assert large > 60  # bounded: a buffer over 32 MiB still goes back at once
    applied, small, large = _given_back("0")  # glibc's default: unmapped at once, faulted in again next time
    assert applied == "False" and small > 20 and large > 60
