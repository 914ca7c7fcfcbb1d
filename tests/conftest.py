"""Shared test helpers: load the project config the way the CLI does."""

import importlib.util
import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(arg=None):
    """Returns configs/lidia.py:get_config(arg), as `--config=configs/lidia.py:arg`."""
    spec = importlib.util.spec_from_file_location("lidia_config", ROOT / "configs" / "lidia.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture
def smoke_config():
    return load_config("smoke")
