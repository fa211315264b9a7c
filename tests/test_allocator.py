"""sa.keep_freed_memory: validation, and its effect on glibc (checked in fresh processes, since the
setting is process-wide and cannot be undone)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import sparse_attention as sa

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates, fills and frees a 64 MB tensor (over glibc's 32 MB mmap ceiling) five times and prints the
# MiB of minor page faults taken by the last two fills. (With the setting, one of the first re-allocations
# may still extend the heap, when a small allocation has taken the start of the freed block; after that
# the block is reused.)
PROBE = """
import resource, sys, torch
import sparse_attention as sa
if sys.argv[1] == "on":
    assert sa.keep_freed_memory() is True
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20); x.fill_(1.0); del x
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4 / 1024)
print(sum(faults[-2:]))
"""


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-5, ValueError), (2**31, ValueError), ("1", TypeError),
                                      (True, TypeError), (1.5, TypeError)])
def test_keep_freed_memory_validates_limit(bad, err):
    with pytest.raises(err, match="limit"):
        sa.keep_freed_memory(bad)


@pytest.mark.skipif(not GLIBC, reason="the setting exists on glibc only")
def test_keep_freed_memory_reuses_freed_memory():
    def faulted(state):
        out = subprocess.run([sys.executable, "-c", PROBE, state], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    assert faulted("off") >= 2 * 48, "by default glibc maps a 64 MB tensor afresh each time (the control case)"
    assert faulted("on") <= 8, "with keep_freed_memory the freed 64 MB are reused without page faults"


@pytest.mark.skipif(GLIBC, reason="checks the non-glibc answer")
def test_keep_freed_memory_is_a_no_op_elsewhere():
    assert sa.keep_freed_memory() is False
