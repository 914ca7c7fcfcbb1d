"""Shared test helpers: load the project config the way the CLI does."""

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from lidia_jax.config_file import load_config  # noqa: E402  (tests import it from here)

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
