"""Transparent huge pages for the host memory XLA:CPU allocates, by glibc's malloc tunable.

A training step on the CPU allocates and frees its buffers anew every step; glibc hands the large
ones back to the kernel and takes them again as 4 KiB pages, each a page fault (222 million in
a 31.5 min demo run, a fifth of its CPU time in the kernel). With `glibc.malloc.hugetlb=1`,
malloc asks the kernel for 2 MiB transparent huge pages instead (madvise): the demo's step went
from 0.363-0.367 s to 0.296-0.306 s on the 2-core AMD EPYC VM and that demo run to 24.7 min
(2026-12-06, `scripts/benchmark.py --only train --configs demo`, README "Huge pages").

glibc reads its tunables once, when the process starts, so the setting needs a fresh process:
`reexec_with_huge_pages` restarts the current command line with GLIBC_TUNABLES set, before
anything heavy is imported. A GLIBC_TUNABLES already in the environment (even empty) is left as
it is, which is how to opt out: `GLIBC_TUNABLES= python -m lidia_jax.main ...`. Elsewhere than
glibc on Linux nothing happens; where the kernel has transparent huge pages off, the tunable
does nothing.
"""

import os
import platform
import sys

TUNABLES = "glibc.malloc.hugetlb=1"


def on_glibc_linux() -> bool:
    """True when this process runs on glibc under Linux, where the tunable exists."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def wanted() -> bool:
    """True on glibc under Linux when the process has no GLIBC_TUNABLES of its own."""
    return "GLIBC_TUNABLES" not in os.environ and on_glibc_linux()


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command line (`sys.orig_argv`: interpreter options,
    `-m module` or script, arguments) with GLIBC_TUNABLES=TUNABLES, when `wanted()`; else returns.
    The process keeps its PID, so launchers and multi-host coordinators see no difference."""
    if not wanted():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=TUNABLES))
