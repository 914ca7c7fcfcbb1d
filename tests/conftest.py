"""Shared test helpers: load the project config the way the CLI does."""

import os
import pathlib
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound: LLVM's optimisation of XLA's CPU kernels is most of the time, the
# smoke train step compiling in 80 s and running in 3 s. At level 0 it compiles in 47 s and runs
# in 7 s, and the model's init compiles in 9 s instead of 34 s (threefry's kernels unrolled).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from lidia_jax.config_file import load_config  # noqa: E402  (tests import it from here)

ROOT = pathlib.Path(__file__).resolve().parents[1]


_JIT_CACHE = "LIDIA_JAX_TEST_JIT_CACHE"
_OWN_JIT_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
    """One jax compilation cache for the session's subprocesses, made by the process that starts
    the session (xdist's workers inherit its environment). Several tests start the same program
    (the train step on four devices, `main` at the smoke config), each compiling it for a minute
    or more; later ones load it. A read that meets an entry half written only warns and
    compiles."""
    if _JIT_CACHE not in os.environ:
        os.environ[_JIT_CACHE] = config.stash[_OWN_JIT_CACHE] = tempfile.mkdtemp(
            prefix="lidia_jax_test_jit_cache_")


def pytest_unconfigure(config):
    if _OWN_JIT_CACHE in config.stash:
        shutil.rmtree(config.stash[_OWN_JIT_CACHE], ignore_errors=True)
        del os.environ[_JIT_CACHE]


def pytest_collection_modifyitems(items):
    """The slow tests first, the order otherwise kept: under xdist the short ones then fill in
    beside them, where a slow one handed out last would run alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def host_devices_env(devices):
    """The environment for a subprocess that runs jax on `devices` CPU devices (the count is
    fixed when jax starts) and imports the repository's `lidia_jax` and `configs`, with the
    session's compilation cache."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=os.environ[_JIT_CACHE])
    env["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def write_image(path, array, spacing, origin=(0.0, 0.0, 0.0), direction=None):
    """Writes `array` ([D, H, W], numpy order) as an image file; spacing/origin/direction in
    SimpleITK's (x, y, z) order, applied to 3-D images only (2-D ones test the validation)."""
    import numpy as np
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    if img.GetDimension() == 3:
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        if direction is not None:
            img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture
def smoke_config():
    return load_config("smoke")
