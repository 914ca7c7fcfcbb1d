"""Geometry: resampling onto the venous grid, canonical orientation, resize, the way back."""

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from lidia_jax.data import geometry as geo


def _image(array, spacing, origin, direction=None):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction if direction is not None else np.eye(3).reshape(-1).tolist())
    return img


def _reoriented(base, perm, flips):
    """The same voxels as `base` (identity direction) indexed differently.

    Index axis a of the new image runs along base index axis perm[a], reversed if flips[a].
    """
    arr = sitk.GetArrayFromImage(base)
    size, spacing = np.array(base.GetSize()), np.array(base.GetSpacing())
    new_arr = np.transpose(arr, [2 - perm[2], 2 - perm[1], 2 - perm[0]])
    new_arr = np.flip(new_arr, tuple(2 - a for a in range(3) if flips[a]))
    direction = np.zeros((3, 3))
    first = [0, 0, 0]
    for a in range(3):
        direction[perm[a], a] = -1.0 if flips[a] else 1.0
        if flips[a]:
            first[perm[a]] = int(size[perm[a]] - 1)
    origin = base.TransformIndexToPhysicalPoint(first)
    return _image(np.ascontiguousarray(new_arr), spacing[list(perm)].tolist(), origin,
                  direction.reshape(-1).tolist())


def test_reoriented_helper_keeps_physical_positions():
    # Independent check of the test construction with SimpleITK's own index -> point maps.
    base = _image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), (0.7, 0.9, 2.5),
                  (10.0, -5.0, 3.0))
    arr = sitk.GetArrayFromImage(base)
    img = _reoriented(base, (1, 0, 2), (False, True, True))
    new = sitk.GetArrayFromImage(img)
    for idx in itertools.product(range(img.GetSize()[0]), range(img.GetSize()[1]),
                                 range(img.GetSize()[2])):
        z, y, x = np.argwhere(arr == new[idx[::-1]])[0]
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(idx),
                                   base.TransformIndexToPhysicalPoint((int(x), int(y), int(z))),
                                   atol=1e-9)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_canonical_orientation_undoes_any_axis_permutation_and_flip(perm):
    base = _image(np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32),
                  (0.7, 0.9, 2.5), (10.0, -5.0, 3.0))
    for flips in itertools.product((False, True), repeat=3):
        img = _reoriented(base, perm, flips)
        canonical = geo.canonical_orientation(geo.grid_of(img))
        out = geo.to_canonical(sitk.GetArrayFromImage(img), canonical)
        np.testing.assert_array_equal(out, sitk.GetArrayFromImage(base))
        assert canonical["shape"] == list(out.shape)
        assert canonical["spacing"] == [2.5, 0.9, 0.7]
        assert geo.same_grid(canonical["grid"], geo.grid_of(base)), (perm, flips)
        # Exact inverse.
        np.testing.assert_array_equal(geo.from_canonical(out, canonical),
                                      sitk.GetArrayFromImage(img))


def test_canonical_orientation_of_an_oblique_image_keeps_voxel_positions():
    angle = np.deg2rad(20.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                    [0, 0, 1]])
    direction = rot @ np.diag([-1.0, 1.0, -1.0])  # oblique and flipped in x and z
    direction = direction[:, [1, 0, 2]]  # and x / y index axes swapped
    arr = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)
    img = _image(arr, (0.8, 1.1, 3.0), (1.0, 2.0, 3.0), direction.reshape(-1).tolist())
    canonical = geo.canonical_orientation(geo.grid_of(img))
    d = np.array(canonical["grid"]["direction"]).reshape(3, 3)
    assert np.all(np.diag(d) > 0.9)  # as close to identity as an axis permutation gets
    out = geo.to_canonical(arr, canonical)
    can_img = geo.image_from_array(out, canonical["grid"])
    rng = np.random.default_rng(2)
    for _ in range(20):
        idx = tuple(int(rng.integers(n)) for n in can_img.GetSize())
        point = can_img.TransformIndexToPhysicalPoint(idx)
        orig_idx = img.TransformPhysicalPointToIndex(point)
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(orig_idx), point, atol=1e-6)
        assert out[idx[::-1]] == arr[orig_idx[::-1]]


def test_resample_to_reference_uses_physical_coordinates():
    ref = _image(np.zeros((8, 12, 10), np.float32), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    # Moving phase: finer spacing, shifted origin, its own size; values linear in (x, y, z).
    m_spacing, m_origin, m_size = (0.5, 0.75, 1.0), (-2.3, 1.1, 0.7), (18, 14, 12)
    xs = m_origin[0] + m_spacing[0] * np.arange(m_size[0])
    ys = m_origin[1] + m_spacing[1] * np.arange(m_size[1])
    zs = m_origin[2] + m_spacing[2] * np.arange(m_size[2])
    f = lambda x, y, z: 3.0 * x - 2.0 * y + 0.5 * z + 10.0
    values = f(xs[None, None, :], ys[None, :, None], zs[:, None, None]).astype(np.float32)
    moving = _image(values, m_spacing, m_origin)
    out = sitk.GetArrayFromImage(geo.resample_to_reference(moving, ref))
    assert out.shape == (8, 12, 10)
    rx = np.arange(10) * 1.0
    ry = np.arange(12) * 1.0
    rz = np.arange(8) * 2.0
    expected = f(rx[None, None, :], ry[None, :, None], rz[:, None, None])
    inside = ((rx[None, None, :] >= xs[0]) & (rx[None, None, :] <= xs[-1])
              & (ry[None, :, None] >= ys[0]) & (ry[None, :, None] <= ys[-1])
              & (rz[:, None, None] >= zs[0]) & (rz[:, None, None] <= zs[-1]))
    inside = np.broadcast_to(inside, out.shape)
    assert inside.sum() > 100 and (~inside).sum() > 10
    # Linear interpolation of a linear function is exact.
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-3)
    # Outside the moving field of view: air.
    far = np.broadcast_to((rx[None, None, :] > xs[-1] + 1) | (ry[None, :, None] < ys[0] - 1),
                          out.shape)
    assert np.all(out[far] == geo.CT_AIR_HU)


def test_resample_label_nearest_matches_numpy_lookup():
    rng = np.random.default_rng(3)
    ref = _image(np.zeros((6, 7, 8), np.uint8), (1.3, 0.9, 2.1), (0.4, -0.2, 1.0))
    lab = rng.integers(0, 5, size=(9, 10, 11)).astype(np.uint8)
    m_spacing, m_origin = (1.1, 0.8, 1.7), (0.1, -0.5, 0.3)
    moving = _image(lab, m_spacing, m_origin)
    out = sitk.GetArrayFromImage(geo.resample_to_reference(moving, ref, is_label=True))
    assert out.dtype == np.uint8
    for z, y, x in itertools.product(range(6), range(7), range(8)):
        p = np.array([0.4 + 1.3 * x, -0.2 + 0.9 * y, 1.0 + 2.1 * z])
        cont = (p - np.array(m_origin)) / np.array(m_spacing)
        i = np.floor(cont + 0.5).astype(int)  # nearest voxel centre
        if np.any(np.abs(cont - np.round(cont)) > 0.4999):
            continue  # exactly between two voxels: either is right
        if np.all(i >= 0) and np.all(i < [11, 10, 9]):
            assert out[z, y, x] == lab[i[2], i[1], i[0]]
        else:
            assert out[z, y, x] == 0


def test_resample_same_grid_is_a_no_op():
    img = _image(np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32),
                 (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    assert geo.resample_to_reference(img, img) is img


def test_resize_linear_matches_separable_numpy_interp():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(5, 6, 7))
    new = (8, 4, 10)
    out = geo.resize(a, new, order=1)

    def interp_axis(x, axis, n_out):
        n_in = x.shape[axis]
        coords = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        return np.apply_along_axis(lambda v: np.interp(coords, np.arange(n_in), v), axis, x)

    ref = a
    for axis, n in enumerate(new):
        ref = interp_axis(ref, axis, n)
    np.testing.assert_allclose(out, ref, atol=1e-10)


def test_resize_separate_axis_uses_nearest_across_slices():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, 6, 6)).astype(np.float32)
    out = geo.resize(a, (8, 9, 9), order=3, separate_axis=0)
    in_plane = geo.resize(a, (4, 9, 9), order=3)
    # Doubling z with order 0: every output slice is an in-plane resampled input slice.
    for z in range(8):
        np.testing.assert_allclose(out[z], in_plane[z // 2], atol=1e-6)


def test_separate_z_rule():
    assert geo.separate_z_axis((5.0, 0.8, 0.8), (3.0, 0.8, 0.8)) == 0
    assert geo.separate_z_axis((1.0, 1.0, 1.0), (3.0, 0.8, 0.8)) == 0
    assert geo.separate_z_axis((1.0, 1.0, 1.0), (4.0, 3.0, 3.0)) is None
