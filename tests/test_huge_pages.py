"""lidia_jax.huge_pages: the restart with glibc's huge-page tunable, and its effect."""

import os
import pathlib
import subprocess
import sys

import pytest

from lidia_jax import huge_pages

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Prints a line before the restart (twice when the process restarts), then what the restarted
# process sees, then how much of a fresh 64 MiB malloc'd and written buffer is on huge pages.
_SCRIPT = r"""
import ctypes, os, sys
print("before", flush=True)
from lidia_jax import huge_pages
huge_pages.reexec_with_huge_pages()
print("tunables", repr(os.environ.get("GLIBC_TUNABLES")), "argv", sys.argv[1:],
      "utf8", sys.flags.utf8_mode)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
ctypes.memset(libc.malloc(n), 1, n)
rollup = open("/proc/self/smaps_rollup").read().splitlines()
print("huge_kib", [int(l.split()[1]) for l in rollup if l.startswith("AnonHugePages:")][0])
"""


def _run(tmp_path, env):
    script = tmp_path / "child.py"
    script.write_text(_SCRIPT)
    out = subprocess.run([sys.executable, "-X", "utf8", str(script), "a", "--b=1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def _thp_mode():
    try:
        text = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


needs_glibc = pytest.mark.skipif(not huge_pages.on_glibc_linux(),
                                 reason="glibc's malloc tunables are Linux/glibc only")


@needs_glibc
def test_restarts_once_with_the_tunable_and_the_same_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    lines = _run(tmp_path, env)
    assert lines[:2] == ["before", "before"], lines  # the script ran again, after the restart
    assert lines[2] == (f"tunables {huge_pages.TUNABLES!r} argv ['a', '--b=1'] utf8 1"), lines
    if _thp_mode() == "madvise":  # only the tunable asks for huge pages then (never: none at all)
        assert int(lines[3].split()[1]) > 0, lines


@needs_glibc
def test_a_tunables_setting_of_the_user_is_kept_and_nothing_restarts(tmp_path):
    lines = _run(tmp_path, dict(os.environ, GLIBC_TUNABLES=""))
    assert lines[:2] == ["before", "tunables '' argv ['a', '--b=1'] utf8 1"], lines
    if _thp_mode() == "madvise":  # the opt-out: the 64 MiB stay on 4 KiB pages
        assert int(lines[2].split()[1]) == 0, lines
