"""sa.keep_freed_memory: validation, and its effect on glibc (checked in fresh processes, since the
setting is process-wide and cannot be undone)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import sparse_attention as sa

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates, frees and re-allocates a 64 MB tensor (over glibc's 32 MB mmap ceiling) and prints the
# MiB of minor page faults taken while filling the second one.
PROBE = """
import resource, sys, torch
import sparse_attention as sa
if sys.argv[1] == "on":
    assert sa.keep_freed_memory() is True
x = torch.empty(16 << 20); x.fill_(1.0); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.empty(16 << 20); y.fill_(1.0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4 / 1024)
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

    assert faulted("off") >= 48, "by default glibc maps a 64 MB tensor afresh (the control case)"
    assert faulted("on") <= 8, "with keep_freed_memory the freed 64 MB are reused without page faults"


@pytest.mark.skipif(GLIBC, reason="checks the non-glibc answer")
def test_keep_freed_memory_is_a_no_op_elsewhere():
    assert sa.keep_freed_memory() is False
