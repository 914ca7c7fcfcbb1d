"""Synthetic multi-phase liver CT cohort: the project's embedded default dataset.

Each case is a contrast-enhanced abdominal CT study with four phases (NC, A, V, D; D absent in a
third of the studies), a deformed liver holding 1 to 8 lesions of the eight classes of the paper,
semantic labels and lesion instances, written in the exact layout of the data contract
(shared/spec/dataset_format.md). Attenuations follow shared/spec/enhancement_patterns.md.

How a case is made (all in a canonical frame: identity direction, LPS physical coordinates, so
array axis x runs toward the patient's left, y toward posterior, z toward superior):
  1. anatomy as implicit shapes evaluated on the voxel grid: a superellipse body with fat and a
     muscle wall, spine, paraspinal muscles, aorta, IVC, bowel, spleen, kidneys, gallbladder and a
     liver on the patient's right deformed by a smooth random displacement field, with portal and
     hepatic vein trees inside it;
  2. lesions placed inside the liver without overlap, each a lobulated, rotated ellipsoid split
     into compartments (rim, centre, capsule, necrosis, nodules, scar, septa, ...) whose per-phase
     HU come from the table, so each class shows its signature in the phase that decides it;
  3. a tissue map -> per-phase HU through lookup tables, plus smooth texture, contrast timing
     (A and V enhancement scaled together by 0.85-1.15);
  4. acquisition: partial-volume blur, residual misregistration of NC/A/D against V (1-2 voxels),
     spatially correlated noise (8-20 HU), int16;
  5. orientation: some studies are stored with flipped or permuted axes (the image content is
     moved with the header, so canonicalising by the direction cosines restores the anatomy), and
     some have one phase on another grid (origin, size, spacing or direction) to exercise the
     reader's resampling. Labels and instances are on the venous grid; label 1 (liver) includes
     the intrahepatic portal and hepatic veins and bile ducts, not the IVC or the gallbladder.

Everything is vectorised numpy/scipy.ndimage on bounding boxes; smooth random fields are drawn on
coarse grids and upsampled. A case is seeded by (seed, index), so the cohort does not depend on
the number of worker processes.
"""

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import pathlib
import time

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

PHASES = ("NC", "A", "V", "D")
LABELS = ("background", "liver", "HCC", "ICC", "meta", "heman", "FNH", "cyst", "calc",
          "others")
LESION_CLASSES = LABELS[2:]
LABEL_CODE = {name: code for code, name in enumerate(LABELS)}

# ---------------------------------------------------------------------------------------------
# Attenuation tables (HU, per phase NC, A, V, D), from shared/spec/enhancement_patterns.md.

# Background anatomy. Tissues the table does not list (bowel wall, kidney medulla, gallbladder,
# bile ducts, bowel gas) get textbook values; only the bile ducts are labelled (as liver).
ANATOMY_HU = {
    "air": (-1000, -1000, -1000, -1000),
    "fat": (-100, -100, -100, -100),
    "muscle": (52, 62, 68, 65),
    "bone": (250, 250, 250, 250),
    "aorta": (40, 280, 165, 120),
    "vein": (40, 110, 180, 125),  # portal, hepatic veins and IVC
    "spleen": (48, 120, 120, 100),
    "kidney_cortex": (33, 180, 180, 150),
    "kidney_medulla": (30, 80, 160, 145),
    "liver": (55, 75, 110, 95),
    "gallbladder": (10, 10, 10, 10),
    "bile_duct": (20, 20, 20, 20),  # dilated ducts upstream of an ICC
    "bowel": (35, 70, 90, 80),
    "bowel_gas": (-900, -900, -900, -900),
}

# Lesion compartments per class (and per subtype for "others"). Values relative to the liver of
# the same case are written as ("liver+", offset) and resolved per case (the HCC capsule).
# Where the spec leaves a phase open, the value is a plausible one that keeps the spec's signs:
# HCC capsule NC/A (not yet enhancing), ICC and meta rim in D, abscess rim/halo NC, AML vessels
# outside A, adenoma and cystadenoma D.
LESION_HU = {
    "HCC": {"tumour": (45, 115, 90, 78), "capsule": (45, 70, ("liver+", 20), ("liver+", 20)),
            "necrosis": (30, 30, 30, 30)},
    "ICC": {"rim": (40, 90, 100, 100), "centre": (40, 55, 78, 105)},
    "meta": {"rim": (40, 85, 100, 90), "centre": (40, 45, 60, 65)},
    "meta/neuroendocrine": {"tumour": (40, 120, 110, 95)},
    "heman": {"nodules": (40, 240, 165, 120), "filling": (40, 40, 165, 120),
              "centre": (40, 40, 50, 120)},
    "heman/flash": {"tumour": (40, 240, 165, 120)},
    "FNH": {"tumour": (52, 145, 112, 96), "scar": (45, 45, 70, 115)},
    "cyst": {"fluid": (8, 8, 8, 8)},
    "calc": {"calcium": (450, 450, 450, 450)},  # value per lesion drawn in 250-800
    "others/abscess": {"centre": (20, 20, 20, 20), "rim": (45, 90, 100, 95),
                       "halo": (45, 60, 85, 85)},
    "others/adenoma": {"tumour": (50, 120, 110, 90), "fat": (-20, -20, -20, -20),
                       "blood": (70, 70, 70, 70)},
    "others/AML": {"fat": (-60, -60, -60, -60), "vessels": (40, 150, 120, 100)},
    "others/lymphoma": {"tumour": (45, 55, 70, 70)},
    "others/cystadenoma": {"fluid": (15, 15, 15, 15), "septa": (40, 70, 100, 95)},
}
OTHERS_SUBTYPES = {"abscess": 0.25, "adenoma": 0.25, "AML": 0.2, "lymphoma": 0.15,
                   "cystadenoma": 0.15}

# Patient-level choice of the main diagnosis, then the number of lesions of that class; cysts,
# hemangiomas and calcifications come as incidental extra findings. Lesion-level prevalence ends
# near: cyst 25%, HCC 20%, meta 20%, heman 12%, ICC/FNH/others 5-6%, calc 6%.
MAIN_CLASS_PROB = {"HCC": 0.28, "cyst": 0.17, "meta": 0.13, "heman": 0.10, "ICC": 0.08,
                   "FNH": 0.07, "calc": 0.05, "others": 0.12}
MAIN_CLASS_COUNT = {"HCC": (1, 3), "ICC": (1, 2), "meta": (2, 8), "heman": (1, 3),
                    "FNH": (1, 2), "cyst": (1, 4), "calc": (1, 2), "others": (1, 1)}
INCIDENTAL_PROB = 0.45
INCIDENTAL_CLASS_PROB = {"cyst": 0.55, "heman": 0.25, "calc": 0.2}
MAX_LESIONS = 8
MIN_DIAMETER_MM = 6.0  # lesions shrunk below this to fit the liver are dropped (calc excepted)
HEMAN_FLASH_MM = 15.0  # hemangiomas smaller than this flash-fill

# Diameter (mm) at realistic ("full") size: lognormal median, log-sd, and clip range.
LESION_DIAMETER = {"HCC": (35, 0.6, 10, 120), "ICC": (50, 0.5, 20, 120),
                   "meta": (20, 0.6, 5, 80), "heman": (20, 0.7, 5, 100),
                   "FNH": (30, 0.5, 10, 80), "cyst": (15, 0.7, 3, 100), "calc": (5, 0.4, 2, 10),
                   "others": (30, 0.5, 10, 80)}

# Grid and lesion-size presets. inplane/slice spacing ranges in mm, sizes in voxels.
SIZES = {
    "smoke": dict(inplane_spacing=(5.5, 6.5), slice_spacing=(5.5, 6.5), inplane_size=(46, 50),
                  num_slices=(23, 25), fov_mm=(270, 310), lesion_mm=(18, 48),
                  calc_mm=(9, 14)),
    # demo: lesions of at least 20 mm (calcifications 8 mm), i.e. >= 4 voxels across on the demo
    # config's 5x4x4 mm grid and >= 2 at its mask resolution; smaller ones are not diagnosable there.
    "demo": dict(inplane_spacing=(2.5, 3.5), slice_spacing=(4.0, 5.0), inplane_size=(100, 128),
                 num_slices=(48, 60), fov_mm=(300, 420), lesion_mm=(20, 60), calc_mm=(8, 14)),
    # full: slice spacing drawn from the usual reconstructions 1, 1.25, 2, 2.5, 3, 5 mm.
    "full": dict(inplane_spacing=(0.6, 0.9), slice_spacing=(1.0, 5.0), inplane_size=(512, 512),
                 num_slices=None, z_extent_mm=(200, 260), fov_mm=None, lesion_mm=(3, 120),
                 calc_mm=(2, 10)),
}

# Non-identity orientations for odd case indices: (axis permutation of the array's (x, y, z)
# index axes, flips after permuting). sitk.PermuteAxes/Flip keep physical positions, so the
# content stays consistent with the header.
ORIENTATIONS = {
    "identity": ((0, 1, 2), (False, False, False)),
    "flip_xy": ((0, 1, 2), (True, True, False)),  # RAS-like storage
    "flip_y": ((0, 1, 2), (False, True, False)),
    "flip_z": ((0, 1, 2), (False, False, True)),
    "swap_xy": ((1, 0, 2), (False, True, False)),
    "sagittal": ((1, 2, 0), (False, True, False)),  # slices along x: z runs along the array's y
}

# Tissue ids of the canonical tissue map; lesion compartments get ids from _LESION_BASE upward.
_ANATOMY_IDS = {name: i for i, name in enumerate(ANATOMY_HU)}
_ANATOMY_IDS.update({"liver_portal": len(ANATOMY_HU), "liver_hepatic": len(ANATOMY_HU) + 1})
_LIVER_IDS = ("liver", "liver_portal", "liver_hepatic", "bile_duct")
_LESION_BASE = 32


@dataclasses.dataclass
class SyntheticCase:
    """One generated study.

    images: phase key -> sitk.Image (int16 HU) as written; labels, instances: sitk.Image on the
    V grid (uint8 label codes, uint16 instance ids). info: the summary.json entry. clean: arrays
    on the canonical grid (identity direction) before acquisition effects, for tests and
    inspection, or None: "hu" float32 [4, D, H, W] (phases NC, A, V, D, timing applied),
    "tissue" uint8 [D, H, W], "label" uint8 [D, H, W], "instances" uint16 [D, H, W], "tissues"
    (list of dicts: id, name, kind, lesion class/subtype, compartment, hu [4]), "spacing"
    (z, y, x), "origin" (x, y, z).
    """

    name: str
    images: dict
    labels: sitk.Image
    instances: sitk.Image
    info: dict
    clean: dict | None = None


# ------------------------------------------------------------------------------ helpers


def _upsampling_matrix(n, c):
    """[n, c] Gaussian-kernel interpolation weights from c coarse nodes to n fine points."""
    t = (np.arange(n, dtype=np.float32) + 0.5) * (c / n) - 0.5  # fine points, coarse units
    w = np.exp(-0.5 * ((t[:, None] - np.arange(c, dtype=np.float32)[None]) / 0.7) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def _smooth_field(rng, shape, cells):
    """Zero-mean, unit-std smooth random field [*shape] from white noise on a coarse grid.

    Upsampled separably (three small matrix products), which is much cheaper on a 512x512 grid
    than spline interpolation and just as smooth.
    """
    cells = tuple(max(2, int(c)) for c in cells)
    field = rng.standard_normal(cells).astype(np.float32)
    m0, m1, m2 = (_upsampling_matrix(n, c) for n, c in zip(shape, cells))
    field = field @ m2.T  # [c0, c1, n2]
    field = m1 @ field  # [c0, n1, n2]
    field = (m0 @ field.reshape(cells[0], -1)).reshape(shape)
    field -= field.mean()
    std = float(field.std())
    return field / (std if std > 0 else 1.0)


def _random_rotation(rng):
    """Uniform random 3x3 rotation matrix (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _unit_vectors(rng, n):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class _Grid:
    """Canonical voxel grid: spacing (z, y, x) mm, origin (x, y, z) mm, shape (D, H, W)."""

    def __init__(self, shape, spacing, origin):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.origin = tuple(float(o) for o in origin)
        # Physical coordinates of each array axis (z, y, x), in mm.
        self.axes = [self.origin[2 - a] + self.spacing[a] * np.arange(self.shape[a],
                                                                      dtype=np.float32)
                     for a in range(3)]

    def box(self, lo_xyz, hi_xyz):
        """Slices of the voxels whose centres lie in [lo, hi] (physical x, y, z), or None."""
        sl = []
        for a in range(3):
            lo = math.ceil((lo_xyz[2 - a] - self.origin[2 - a]) / self.spacing[a])
            hi = math.floor((hi_xyz[2 - a] - self.origin[2 - a]) / self.spacing[a]) + 1
            lo, hi = max(lo, 0), min(hi, self.shape[a])
            if hi <= lo:
                return None
            sl.append(slice(lo, hi))
        return tuple(sl)

    def coords(self, sl):
        """Broadcastable physical coordinates (x [1,1,w], y [1,h,1], z [d,1,1]) of a box."""
        z = self.axes[0][sl[0]][:, None, None]
        y = self.axes[1][sl[1]][None, :, None]
        x = self.axes[2][sl[2]][None, None, :]
        return x, y, z

    def full(self):
        return tuple(slice(0, s) for s in self.shape)


def _paint_ellipsoid(tissue, grid, centre, radii, value, where=None, rot=None):
    """Sets tissue=value inside an ellipsoid (physical centre/radii, optional rotation)."""
    r = float(max(radii))
    sl = grid.box(np.subtract(centre, r), np.add(centre, r))
    if sl is None:
        return
    x, y, z = grid.coords(sl)
    d = [x - centre[0], y - centre[1], z - centre[2]]
    if rot is not None:  # local coordinates: rot^T (p - c)
        d = [rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2] for i in range(3)]
    q = (d[0] / radii[0]) ** 2 + (d[1] / radii[1]) ** 2 + (d[2] / radii[2]) ** 2
    inside = q <= 1.0
    if where is not None:
        inside &= np.isin(tissue[sl], where)
    tissue[sl][inside] = value


def _paint_tube(tissue, grid, p0, p1, r0, r1, value, where=None):
    """Sets tissue=value within a tapered tube from p0 (radius r0) to p1 (radius r1), mm."""
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    r = max(r0, r1)
    sl = grid.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
    if sl is None:
        return
    x, y, z = grid.coords(sl)
    d = p1 - p0
    dd = float(d @ d) or 1.0
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / dd, 0.0, 1.0)
    dist2 = ((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2
             + (z - p0[2] - t * d[2]) ** 2)
    inside = dist2 <= (r0 + (r1 - r0) * t) ** 2
    if where is not None:
        inside &= np.isin(tissue[sl], where)
    tissue[sl][inside] = value


def _superellipse(x, y, a, b, p=2.4):
    """Normalised superellipse radius: < 1 inside."""
    return (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)


# ------------------------------------------------------------------------------ anatomy


def _make_grid(rng, size):
    p = SIZES[size]
    sxy = rng.uniform(*p["inplane_spacing"])
    if size == "full":
        sz = float(rng.choice([1.0, 1.25, 2.0, 2.5, 3.0, 5.0], p=[.1, .1, .2, .2, .25, .15]))
        nz = int(round(rng.uniform(*p["z_extent_mm"]) / sz))
        nxy = (512, 512)
    else:
        sz = rng.uniform(*p["slice_spacing"])
        nz = int(rng.integers(p["num_slices"][0], p["num_slices"][1] + 1))
        lo, hi = p["inplane_size"]
        n = int(np.clip(round(rng.uniform(*p["fov_mm"]) / sxy), lo, hi))
        # Some scanners reconstruct a non-square field of view.
        ny = int(np.clip(n - 2 * rng.integers(0, 4), lo, hi)) if rng.random() < 0.3 else n
        nxy = (ny, n)
    shape = (nz, nxy[0], nxy[1])
    spacing = (sz, sxy, sxy)
    # Body centre near physical (0, 0); table height and couch offset vary.
    off = rng.uniform(-0.04, 0.04, 2) * np.array([nxy[1], nxy[0]]) * sxy
    origin = (-(nxy[1] - 1) * sxy / 2 + off[0], -(nxy[0] - 1) * sxy / 2 + off[1],
              rng.uniform(-600, -300))
    return _Grid(shape, spacing, origin)


def _anatomy(rng, grid):
    """Paints the background anatomy and the liver. Returns (tissue uint8 [D,H,W], geometry)."""
    ids = _ANATOMY_IDS
    nz, ny, nx = grid.shape
    fov_x = nx * grid.spacing[2]
    fov_y = ny * grid.spacing[1]
    width = min(rng.uniform(0.8, 0.93) * fov_x, rng.uniform(290, 380))
    ap = min(width * rng.uniform(0.66, 0.8), 0.92 * fov_y)
    s = width / 330.0  # anatomy scale
    a, b = width / 2, ap / 2
    z_lo = grid.axes[0][0]
    z_hi = grid.axes[0][-1]
    zc = 0.5 * (z_lo + z_hi)
    fat = rng.uniform(8, 30) * s
    wall = rng.uniform(8, 14) * s

    tissue = np.zeros(grid.shape, np.uint8)
    x, y, z = grid.coords(grid.full())
    # The body narrows or widens slowly along z. The superellipse radius is homogeneous in its
    # axes, q(x, y; t a, t b) = q(x, y; a, b) / t, so 2-D radii are compared with the taper t(z).
    taper = 1.0 + rng.uniform(-0.04, 0.04) * (z - zc) / max(z_hi - z_lo, 1.0)
    tissue[_superellipse(x, y, a, b) <= taper] = ids["fat"]
    tissue[_superellipse(x, y, a - fat, b - fat) <= taper] = ids["muscle"]
    cavity = _superellipse(x, y, a - fat - wall, b - fat - wall) <= taper
    tissue[cavity] = ids["fat"]

    # Spine: vertebral body and posterior elements along z, paraspinal muscles behind.
    y_spine = (b - fat - wall) - 48 * s
    x_spine = rng.uniform(-6, 6) * s
    r_vb = rng.uniform(16, 21) * s
    top, bot = (x_spine, y_spine, z_hi + 20), (x_spine, y_spine, z_lo - 20)
    for side in (-1, 1):
        _paint_tube(tissue, grid, (x_spine + side * 36 * s, y_spine + 36 * s, z_hi + 20),
                    (x_spine + side * 36 * s, y_spine + 36 * s, z_lo - 20), 24 * s, 24 * s,
                    ids["muscle"])
    # Psoas: grows from the upper lumbar spine downward.
    for side in (-1, 1):
        _paint_tube(tissue, grid, (x_spine + side * 24 * s, y_spine - 2 * s, zc),
                    (x_spine + side * 42 * s, y_spine - 10 * s, z_lo - 20), 5 * s, 22 * s,
                    ids["muscle"], where=(ids["fat"],))
    _paint_tube(tissue, grid, bot, top, r_vb, r_vb, ids["bone"])
    _paint_tube(tissue, grid, (x_spine, y_spine + 30 * s, z_lo - 20),
                (x_spine, y_spine + 30 * s, z_hi + 20), 9 * s, 9 * s, ids["bone"])
    for side in (-1, 1):  # transverse processes, as thin bars
        _paint_tube(tissue, grid, (x_spine + side * 10 * s, y_spine + 22 * s, z_lo - 20),
                    (x_spine + side * 10 * s, y_spine + 22 * s, z_hi + 20), 6 * s, 6 * s,
                    ids["bone"])

    # Aorta (patient's left-anterior of the spine) and IVC (right-anterior).
    r_ao = rng.uniform(9, 13) * s
    ao = (x_spine + 16 * s, y_spine - r_vb - r_ao - 2 * s)
    _paint_tube(tissue, grid, (*ao, z_lo - 20), (*ao, z_hi + 20), r_ao, r_ao, ids["aorta"])
    ivc = (x_spine - 28 * s, y_spine - r_vb - 14 * s)
    r_ivc = rng.uniform(9, 12) * s

    # Liver: right lobe + left lobe ellipsoids, smooth union, deformed, clipped to the cavity.
    # The dome lies inside the scan (with room for the deformation); short scans get a
    # shorter liver rather than a truncated one.
    dome = z_hi - rng.uniform(18, 35)
    rx, ry, rz = (np.array([rng.uniform(80, 95), rng.uniform(85, 100), rng.uniform(70, 85)])
                  * s)
    rz = min(rz, 0.4 * (z_hi - z_lo))
    cr = np.array([-(a - fat - wall) + rx * rng.uniform(0.85, 0.95),
                   rng.uniform(-20, 5) * s, dome - rz])
    cl = cr + np.array([rng.uniform(85, 105), rng.uniform(-45, -30), rng.uniform(15, 30)]) * s
    rl = np.array([rng.uniform(55, 75), rng.uniform(30, 45), rng.uniform(35, 50)]) * s
    amp = rng.uniform(8, 14) * s
    lo = np.minimum(cr - [rx, ry, rz], cl - rl) - amp - 5
    hi = np.maximum(cr + [rx, ry, rz], cl + rl) + amp + 5
    sl = grid.box(lo, hi)
    liver_centre = cr
    if sl is not None:
        bx, by, bz = grid.coords(sl)
        shape = tuple(s_.stop - s_.start for s_ in sl)
        ext = np.asarray(hi - lo)[::-1]
        cells = np.maximum(2, np.ceil(ext / 45.0)).astype(int) + 1
        dz, dy, dx = (amp * _smooth_field(rng, shape, cells) for _ in range(3))
        px, py, pz = bx + dx, by + dy, bz + dz
        f1 = np.sqrt(((px - cr[0]) / rx) ** 2 + ((py - cr[1]) / ry) ** 2
                     + ((pz - cr[2]) / rz) ** 2)
        f2 = np.sqrt(((px - cl[0]) / rl[0]) ** 2 + ((py - cl[1]) / rl[1]) ** 2
                     + ((pz - cl[2]) / rl[2]) ** 2)
        k = 0.25  # smooth minimum: no crease where the lobes meet
        h = np.clip(0.5 + 0.5 * (f2 - f1) / k, 0, 1)
        f = f2 * (1 - h) + f1 * h - k * h * (1 - h)
        # The inferior right lobe tapers (liver is wedge-shaped in the coronal plane).
        f = f + 0.25 * np.clip((cr[2] - pz) / rz, 0, None) * np.clip((px - cr[0]) / rx, 0, None)
        liver = (f <= 1.0) & cavity[sl] & (tissue[sl] == ids["fat"])
        tissue[sl][liver] = ids["liver"]
        del dx, dy, dz, px, py, pz, f1, f2, f, h

    # Gallbladder in the inferior-anterior fossa of the liver.
    has_gb = rng.random() < 0.65
    if has_gb:
        gb = cr + np.array([rng.uniform(0.2, 0.45) * rx, -0.55 * ry, -0.55 * rz])
        _paint_ellipsoid(tissue, grid, gb, np.array([16, 14, 35]) * s * rng.uniform(0.8, 1.1),
                         ids["gallbladder"], rot=_small_rotation(rng, 0.4))

    # Spleen (left posterior), kidneys (beside the spine, below the dome).
    sp_c = (x_spine + rng.uniform(75, 95) * s, y_spine - rng.uniform(15, 35) * s,
            dome - rng.uniform(45, 70) * s)
    _paint_ellipsoid(tissue, grid, sp_c, np.array([30, 50, 55]) * s * rng.uniform(0.8, 1.15),
                     ids["spleen"], rot=_small_rotation(rng, 0.5),
                     where=(ids["fat"], ids["liver"]))
    for side in (-1, 1):
        kc = (x_spine + side * rng.uniform(58, 70) * s, y_spine - 5 * s,
              dome - rng.uniform(115, 140) * s - (10 * s if side < 0 else 0))
        kr = np.array([26, 24, 52]) * s * rng.uniform(0.9, 1.1)
        rot = _small_rotation(rng, 0.35)
        _paint_ellipsoid(tissue, grid, kc, kr, ids["kidney_cortex"], rot=rot)
        _paint_ellipsoid(tissue, grid, kc, kr * 0.68, ids["kidney_medulla"], rot=rot)
        _paint_ellipsoid(tissue, grid, kc, kr * 0.3, ids["fat"], rot=rot)  # sinus fat

    # Bowel: soft-tissue loops with gas, anterior and below the liver, in visceral fat only.
    for _ in range(int(rng.integers(14, 26))):
        c = (rng.uniform(-0.5, 0.6) * a, rng.uniform(-0.75, 0.1) * b,
             rng.uniform(z_lo, dome - 60 * s))
        r = rng.uniform(12, 22) * s
        _paint_ellipsoid(tissue, grid, c, (r, r * rng.uniform(0.7, 1), r * 1.3), ids["bowel"],
                         where=(ids["fat"],))
        if rng.random() < 0.5:
            _paint_ellipsoid(tissue, grid, c, (0.5 * r, 0.4 * r, 0.6 * r), ids["bowel_gas"],
                             where=(ids["bowel"],))

    # IVC (intrahepatic part is excluded from the liver, as in common annotations).
    _paint_tube(tissue, grid, (*ivc, z_lo - 20), (*ivc, dome + 5), r_ivc, r_ivc, ids["vein"])

    # Portal vein: trunk from the hilum (outside the liver: label 0) and a branching tree inside.
    hilum = cr + np.array([0.55 * rx, -0.1 * ry, -0.1 * rz])
    origin_pv = hilum + np.array([30, 10, -40]) * s
    liver_like = (ids["liver"],)
    _paint_tube(tissue, grid, origin_pv, hilum, 7 * s, 7 * s, ids["vein"],
                where=(ids["fat"], ids["bowel"]))
    _paint_tube(tissue, grid, origin_pv, hilum, 7 * s, 7 * s, ids["liver_portal"],
                where=liver_like)
    for target, r0 in ((cr + [-0.5 * rx, 0.0, 0.05 * rz], 5.5), (cl, 4.5)):
        _branch(rng, tissue, grid, hilum, np.asarray(target, float), r0 * s, 2,
                ids["liver_portal"], liver_like)
    # Hepatic veins: three trunks converging on the IVC just below the dome.
    confluence = np.array([ivc[0], ivc[1], dome - 20 * s])
    for t in (cr + [-0.6 * rx, 0.3 * ry, -0.2 * rz], cr + [-0.1 * rx, -0.6 * ry, 0],
              cl + [0.3 * rl[0], -0.1 * rl[1], 0]):
        _branch(rng, tissue, grid, confluence, np.asarray(t, float), 5.0 * s, 1,
                ids["liver_hepatic"], liver_like)

    geom = dict(scale=s, body=(a, b), spine=(x_spine, y_spine), liver_centre=liver_centre,
                hilum=hilum, dome=dome)
    return tissue, geom


def _small_rotation(rng, max_angle):
    """Rotation by a random angle up to max_angle (rad) around a random axis (Rodrigues)."""
    axis = _unit_vectors(rng, 1)[0]
    ang = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(ang) * k + (1 - math.cos(ang)) * k @ k


def _branch(rng, tissue, grid, p0, p1, r0, depth, value, where):
    """A vessel from p0 to p1 that splits into two thinner branches, `depth` more times."""
    r1 = 0.75 * r0
    _paint_tube(tissue, grid, p0, p1, r0, r1, value, where=where)
    if depth <= 0:
        return
    length = float(np.linalg.norm(p1 - p0))
    d = (p1 - p0) / max(length, 1e-3)
    for _ in range(2):
        nd = d + 0.8 * rng.standard_normal(3)
        nd /= np.linalg.norm(nd)
        _branch(rng, tissue, grid, p1, p1 + nd * length * rng.uniform(0.5, 0.8), r1,
                depth - 1, value, where)


# ------------------------------------------------------------------------------ lesions


def _draw_lesions(rng, size, main_class=None):
    """Classes, subtypes and diameters (mm) of one patient's lesions, largest first.

    main_class: force the main diagnosis (the rest is drawn as usual), or None to draw it.
    """
    p = SIZES[size]
    names = list(MAIN_CLASS_PROB)
    main = names[rng.choice(len(names), p=np.array(list(MAIN_CLASS_PROB.values())))]
    main = main if main_class is None else main_class
    lo, hi = MAIN_CLASS_COUNT[main]
    n = int(rng.integers(lo, hi + 1)) if main != "meta" else int(
        min(hi, lo + rng.geometric(0.35) - 1))
    classes = [main] * n
    if rng.random() < INCIDENTAL_PROB:
        inc = list(INCIDENTAL_CLASS_PROB)
        for _ in range(int(rng.integers(1, 3))):
            classes.append(inc[rng.choice(len(inc),
                                          p=np.array(list(INCIDENTAL_CLASS_PROB.values())))])
    classes = classes[:MAX_LESIONS]
    lesions = []
    for cls in classes:
        med, sd, dmin, dmax = LESION_DIAMETER[cls]
        if cls == "calc":
            dmin, dmax = p["calc_mm"]
            med = 0.5 * (dmin + dmax)
        else:
            dmin, dmax = max(dmin, p["lesion_mm"][0]), min(dmax, p["lesion_mm"][1])
            med = float(np.clip(med, dmin, dmax))
        diam = float(np.clip(med * math.exp(sd * rng.standard_normal()), dmin, dmax))
        sub = None
        if cls == "others":
            subs = list(OTHERS_SUBTYPES)
            sub = subs[rng.choice(len(subs), p=np.array(list(OTHERS_SUBTYPES.values())))]
        elif cls == "meta" and rng.random() < 0.2:
            sub = "neuroendocrine"
        lesions.append(dict(cls=cls, subtype=sub, diameter_mm=diam))
    lesions.sort(key=lambda l: -l["diameter_mm"])
    return lesions


def _place_lesions(rng, lesions, tissue, grid):
    """Picks non-overlapping centres inside the liver; shrinks or drops what does not fit."""
    liver_ids = [_ANATOMY_IDS[k] for k in ("liver", "liver_portal", "liver_hepatic")]
    # Distances on a ~4 mm subsampled grid: cheap at any resolution.
    step = [max(1, int(round(4.0 / sp))) for sp in grid.spacing]
    mask = np.isin(tissue[::step[0], ::step[1], ::step[2]], liver_ids)
    if not mask.any():
        return []
    sampling = [sp * st for sp, st in zip(grid.spacing, step)]
    dist = ndimage.distance_transform_edt(mask, sampling=sampling)
    idx = np.argwhere(mask)
    pts = np.stack([grid.axes[2][idx[:, 2] * step[2]], grid.axes[1][idx[:, 1] * step[1]],
                    grid.axes[0][idx[:, 0] * step[0]]], axis=1)
    depth = dist[mask]
    placed = []
    for les in lesions:
        r = les["diameter_mm"] / 2
        for _ in range(8):
            ok = depth >= max(0.75 * r, 1.5 * max(grid.spacing[1:]))
            for other in placed:
                gap = r + other["diameter_mm"] / 2 + 3.0
                ok &= np.sum((pts - other["centre"]) ** 2, axis=1) >= gap ** 2
            if ok.any():
                choice = rng.choice(np.flatnonzero(ok))
                les = dict(les, centre=pts[choice] + rng.uniform(-1, 1, 3) * 0.5 * np.array(
                    sampling[::-1]))
                placed.append(les)
                break
            r *= 0.85
            les = dict(les, diameter_mm=2 * r)
            if les["cls"] != "calc" and les["diameter_mm"] < MIN_DIAMETER_MM:
                break
    if not placed:  # always at least one lesion: a small one at the deepest point
        les = dict(lesions[0])
        les["diameter_mm"] = float(min(les["diameter_mm"], 1.2 * depth.max()))
        les["centre"] = pts[int(np.argmax(depth))]
        placed.append(les)
    return placed



def _lesion_shape(rng, cls, sub):
    """Shape parameters: axis ratios, rotation, lobulation bumps (unit vectors, amplitudes)."""
    lobulated = cls in ("ICC", "FNH") or (cls == "others" and sub in ("AML", "cystadenoma"))
    round_ = cls in ("cyst", "calc")
    ratios = rng.uniform(0.8 if round_ else 0.7, 1.0, 3)
    ratios /= ratios.max()
    n_bumps = int(rng.integers(3, 7)) if lobulated else (0 if round_ else int(rng.integers(0, 3)))
    bumps = _unit_vectors(rng, n_bumps) if n_bumps else np.zeros((0, 3))
    amps = rng.uniform(0.15, 0.3, n_bumps) if lobulated else rng.uniform(0.05, 0.12, n_bumps)
    return dict(ratios=ratios, rot=_random_rotation(rng), bumps=bumps, amps=amps,
                kappa=rng.uniform(3, 6))


def _lesion_compartments(rng, les, w, rho, vox_mm):
    """Compartment names and per-voxel compartment index of one lesion.

    w: [..., 3] normalised local coordinates (the lesion is the unit ball |w| <= 1); rho = |w|.
    vox_mm: in-plane voxel size, so thin structures (rim, capsule, scar) stay visible.
    Returns (names, comp int8 [...]) with comp = -1 outside the lesion.
    """
    cls, sub = les["cls"], les["subtype"]
    r_mm = les["diameter_mm"] / 2
    inside = rho <= 1.0
    comp = np.where(inside, 0, -1).astype(np.int8)

    def shell(thick_mm, lo=0.15, hi=0.5):
        return inside & (rho > 1.0 - float(np.clip(thick_mm / r_mm, lo, hi)))

    def blobs(n, radius, at=(0.0, 0.7)):
        m = np.zeros(rho.shape, bool)
        for v in _unit_vectors(rng, n):
            c = v * rng.uniform(*at)
            m |= np.sum((w - c) ** 2, axis=-1) <= radius ** 2
        return m & inside

    if cls == "HCC":
        names = ["tumour", "capsule", "necrosis"]
        if les["diameter_mm"] > 35 and rng.random() < 0.8:
            # Mosaic: non-enhancing necrosis in the core, irregular.
            noise = _smooth_field(rng, rho.shape, [4, 4, 4])
            comp[inside & (rho + 0.15 * noise < rng.uniform(0.4, 0.6))] = 2
        if rng.random() < 0.75:
            comp[shell(max(2.0, 0.9 * vox_mm), 0.08, 0.3)] = 1
    elif cls == "ICC":
        names = ["rim", "centre"]
        comp[inside & ~shell(max(0.25 * r_mm, 1.2 * vox_mm), 0.2, 0.45)] = 1
    elif cls == "meta":
        if sub == "neuroendocrine":
            names = ["tumour"]
        else:
            names = ["rim", "centre"]
            comp[inside & ~shell(max(0.3 * r_mm, 1.2 * vox_mm), 0.2, 0.5)] = 1
    elif cls == "heman":
        if sub == "flash":
            names = ["tumour"]
        else:
            # Discontinuous peripheral nodules (A) that grow inward (V); fill-in by D.
            names = ["nodules", "filling", "centre"]
            comp[inside] = 2
            n = int(rng.integers(4, 8))
            dirs = _unit_vectors(rng, n)
            r_nod = max(0.22, 1.1 * vox_mm / r_mm)
            fill = np.zeros(rho.shape, bool)
            nod = np.zeros(rho.shape, bool)
            for v in dirs:
                d2 = np.sum((w - 0.9 * v) ** 2, axis=-1)
                nod |= d2 <= r_nod ** 2
                fill |= np.sum((w - 0.7 * v) ** 2, axis=-1) <= (r_nod + 0.3) ** 2
            comp[inside & fill] = 1
            comp[inside & nod] = 0
    elif cls == "FNH":
        names = ["tumour", "scar"]
        if les["diameter_mm"] >= 20 or rng.random() < 0.5:
            thick = max(0.07, 0.6 * vox_mm / r_mm)
            scar = rho <= max(0.15, thick * 1.5)
            for v in _unit_vectors(rng, int(rng.integers(3, 6))):
                t = np.clip(np.sum(w * v, axis=-1), 0, 0.65)
                scar |= np.sum((w - t[..., None] * v) ** 2, axis=-1) <= thick ** 2
            comp[inside & scar] = 1
    elif cls == "cyst":
        names = ["fluid"]
    elif cls == "calc":
        names = ["calcium"]
    else:  # others
        if sub == "abscess":
            names = ["centre", "rim", "halo"]
            comp[inside] = 0
            comp[shell(max(0.35 * r_mm, 1.8 * vox_mm), 0.25, 0.55)] = 1
            comp[shell(max(0.15 * r_mm, 0.9 * vox_mm), 0.1, 0.3)] = 2
        elif sub == "adenoma":
            names = ["tumour", "fat", "blood"]
            if rng.random() < 0.5:
                comp[blobs(int(rng.integers(1, 3)), 0.3)] = 1 if rng.random() < 0.5 else 2
        elif sub == "AML":
            names = ["fat", "vessels"]
            comp[blobs(int(rng.integers(3, 7)), max(0.15, 0.8 * vox_mm / r_mm), (0, 0.8))] = 1
        elif sub == "lymphoma":
            names = ["tumour"]
        else:  # cystadenoma: fluid with thin enhancing septa
            names = ["fluid", "septa"]
            thick = max(0.05, 0.5 * vox_mm / r_mm)
            for v in _unit_vectors(rng, int(rng.integers(2, 4))):
                off = rng.uniform(-0.4, 0.4)
                comp[inside & (np.abs(np.sum(w * v, axis=-1) - off) <= thick)] = 1
            comp[shell(max(1.0, 0.6 * vox_mm), 0.06, 0.2)] = 1  # enhancing wall
    return names, comp


def _lesion_table_key(les):
    """Key of LESION_HU: the class, or class/subtype where the subtype has its own pattern."""
    return les["cls"] if les["subtype"] is None else f"{les['cls']}/{les['subtype']}"


def _render_lesions(rng, placed, tissue, grid):
    """Paints lesion compartments into `tissue`. Returns per-lesion tissue records."""
    liver_ids = [_ANATOMY_IDS[k] for k in ("liver", "liver_portal", "liver_hepatic")]
    vox = float(grid.spacing[1])
    records = []
    next_id = _LESION_BASE
    kept = []
    for les in placed:
        if les["cls"] == "heman" and les["diameter_mm"] < HEMAN_FLASH_MM:
            les = dict(les, subtype="flash")
        shape = _lesion_shape(rng, les["cls"], les["subtype"])
        r = les["diameter_mm"] / 2
        c = np.asarray(les["centre"], np.float32)
        reach = r * (1.0 + float(shape["amps"].sum()) + 0.05)
        sl = grid.box(c - reach, c + reach)
        if sl is None:
            continue
        x, y, z = grid.coords(sl)
        d = np.stack(np.broadcast_arrays(x - c[0], y - c[1], z - c[2]), axis=-1)
        # Local coordinates, normalised per axis: rot^T (p - c) / (r * ratios).
        u = d @ shape["rot"].astype(np.float32) / (r * shape["ratios"]).astype(np.float32)
        rad = np.linalg.norm(u, axis=-1)
        dirs = u / np.maximum(rad, 1e-6)[..., None]
        bump = np.zeros(rad.shape, np.float32)
        for v, amp in zip(shape["bumps"], shape["amps"]):
            bump += amp * np.exp(shape["kappa"] * (dirs @ v - 1.0))
        rho = rad / (1.0 + bump)
        w = dirs * rho[..., None]
        names, comp = _lesion_compartments(rng, les, w, rho, vox)
        # Lesions stay inside the liver and never overlap an earlier lesion.
        free = np.isin(tissue[sl], liver_ids)
        comp[~free] = -1
        if not (comp >= 0).any():
            continue
        key = _lesion_table_key(les)
        ids = {}
        for ci, name in enumerate(names):
            m = comp == ci
            if m.any():
                ids[name] = next_id
                tissue[sl][m] = next_id
                next_id += 1
        les = dict(les, table=key, compartment_ids=ids, instance=len(kept) + 1)
        kept.append(les)
        records.append(les)
    return records


def _dilated_ducts(rng, lesions, tissue, grid, geom):
    """Dilated bile ducts (20 HU, labelled liver) upstream of ICCs: from the tumour outward."""
    liver = _ANATOMY_IDS["liver"]
    s = geom["scale"]
    for les in lesions:
        if les["cls"] != "ICC" or rng.random() < 0.4:
            continue
        c = np.asarray(les["centre"])
        away = c - np.asarray(geom["hilum"])
        away /= max(np.linalg.norm(away), 1e-3)
        for _ in range(int(rng.integers(1, 3))):
            d = away + 0.5 * rng.standard_normal(3)
            d /= np.linalg.norm(d)
            p0 = c + d * les["diameter_mm"] / 2
            _paint_tube(tissue, grid, p0, p0 + d * rng.uniform(25, 45) * s,
                        max(2.5, 0.6 * grid.spacing[1]), 1.5, _ANATOMY_IDS["bile_duct"],
                        where=(liver,))


# ------------------------------------------------------------------------------ intensities


def _hu_tables(rng, lesions, timing):
    """Per-tissue-id HU per phase [4, 256] and records of every tissue present.

    Contrast timing scales the enhancement (value - NC) of A and V by the same factor.
    """
    lut = np.zeros((4, 256), np.float32)
    liver_hu = np.asarray(ANATOMY_HU["liver"], np.float32) + np.float32(rng.normal(0, 4))
    records = []

    def timed(vals):
        v = np.asarray(vals, np.float32).copy()
        v[1:3] = v[0] + timing * (v[1:3] - v[0])
        return v

    for name, i in _ANATOMY_IDS.items():
        base = {"liver_portal": "vein", "liver_hepatic": "vein"}.get(name, name)
        vals = liver_hu if base == "liver" else np.asarray(ANATOMY_HU[base], np.float32)
        lut[:, i] = timed(vals)
        records.append(dict(id=i, name=name, kind="anatomy", hu=lut[:, i].tolist()))
    for les in lesions:
        table = LESION_HU[les["table"]]
        offset = float(np.clip(rng.normal(0, 4), -10, 10))  # per-lesion, all phases
        calc_hu = float(np.clip(rng.lognormal(math.log(450), 0.3), 250, 800))
        for comp, tid in les["compartment_ids"].items():
            vals = []
            for p, v in enumerate(table[comp]):
                if isinstance(v, tuple):  # ("liver+", offset): relative to this case's liver
                    v = float(liver_hu[p]) + v[1]
                vals.append(v)
            vals = np.asarray(vals, np.float32)
            if les["cls"] == "calc":
                vals[:] = calc_hu
            else:
                vals = vals + offset + np.clip(rng.normal(0, 2.5, 4), -6, 6).astype(np.float32)
            if les["cls"] in ("cyst", "calc") or comp in ("fat", "fluid", "necrosis", "blood"):
                vals[:] = vals[0]  # non-enhancing content: the same value in every phase
            lut[:, tid] = timed(vals)
            records.append(dict(id=tid, name=f"lesion{les['instance']}/{comp}", kind="lesion",
                                cls=les["cls"], subtype=les["subtype"], compartment=comp,
                                instance=les["instance"], hu=lut[:, tid].tolist()))
    return lut, records


def _texture_amplitudes():
    """Per-tissue texture amplitude (HU) per phase [4, 256] and which field it uses."""
    amp = np.zeros((4, 256), np.float32)
    hi_freq = np.zeros(256, bool)
    ids = _ANATOMY_IDS
    amp[:, ids["liver"]] = 4
    amp[:, ids["muscle"]] = 4
    amp[:, ids["fat"]] = 6
    amp[:, ids["bone"]] = 40
    amp[:, ids["bowel"]] = 12
    amp[:, ids["spleen"]] = (3, 30, 4, 3)  # mottled in the arterial phase only
    hi_freq[ids["spleen"]] = True
    amp[:, _LESION_BASE:] = 4
    return amp, hi_freq


# ------------------------------------------------------------------------------ a case


def _render_clean(rng, grid, tissue, lut):
    """Ideal per-phase HU [4, D, H, W] float32: lookup + smooth texture."""
    amp, hi_freq = _texture_amplitudes()
    ext = np.asarray(grid.shape) * np.asarray(grid.spacing)
    tex_lo = _smooth_field(rng, grid.shape, np.ceil(ext / 25.0) + 1)
    tex_hi = _smooth_field(rng, grid.shape, np.ceil(ext / 8.0) + 1)
    use_hi = hi_freq[tissue]
    tex = np.where(use_hi, tex_hi, tex_lo)
    del tex_lo, tex_hi, use_hi
    hu = np.empty((4,) + grid.shape, np.float32)
    for p in range(4):
        hu[p] = lut[p][tissue] + amp[p][tissue] * tex
    return hu


def _acquire(rng, clean, grid, shift_vox, noise_std):
    """Partial-volume blur, misregistration shift (voxels, z y x), correlated noise -> int16."""
    sz, sy, sx = grid.spacing
    # The in-plane point spread (~0.8 mm) and noise grain (~1 mm) of a standard reconstruction
    # kernel are fixed in mm, so fine grids get wider kernels in voxels; never below ~half a
    # voxel, so coarse grids keep some partial volume and correlated noise.
    blur = (0.45, max(0.5, 0.8 / sy), max(0.5, 0.8 / sx))
    img = ndimage.gaussian_filter(clean, sigma=blur, mode="nearest")
    if np.any(shift_vox):
        img = ndimage.shift(img, shift_vox, order=1, mode="nearest")
    noise = rng.standard_normal(grid.shape).astype(np.float32)
    grain = (0.5, max(0.6, 1.0 / sy), max(0.6, 1.0 / sx))
    noise = ndimage.gaussian_filter(noise, sigma=grain, mode="wrap")
    noise *= noise_std / max(float(noise.std()), 1e-6)
    img += noise
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)


def _to_sitk(array, grid):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(grid.spacing[::-1])
    img.SetOrigin(grid.origin)
    return img


def _orient(img, orientation):
    perm, flips = ORIENTATIONS[orientation]
    if tuple(perm) != (0, 1, 2):
        img = sitk.PermuteAxes(img, list(perm))
    if any(flips):
        img = sitk.Flip(img, list(flips), flipAboutOrigin=False)
    return img


def _regrid(rng, img, grid):
    """Resamples a canonical phase image onto another grid (origin/size or spacing)."""
    spacing = list(grid.spacing[::-1])
    size = list(grid.shape[::-1])
    origin = list(grid.origin)
    kind = ["crop_pad", "spacing"][int(rng.integers(0, 2))]
    if kind == "crop_pad":
        for a in range(3):
            lo = int(rng.integers(-3, 4))
            hi = int(rng.integers(-3, 4))
            origin[a] += lo * spacing[a]
            size[a] = max(4, size[a] - lo + hi)
    else:
        new_z = spacing[2] * rng.choice([0.8, 1.25, 1.5])
        size[2] = int(math.ceil((size[2] - 1) * spacing[2] / new_z)) + 1
        origin[2] += rng.uniform(-0.5, 0.5) * new_z
        spacing[2] = float(new_z)
    out = sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), [int(v) for v in size],
                        sitk.Transform(), sitk.sitkLinear, origin, spacing, img.GetDirection(),
                        -1000.0, sitk.sitkFloat32)
    arr = np.clip(np.rint(sitk.GetArrayFromImage(out)), -1024, 3071).astype(np.int16)
    res = sitk.GetImageFromArray(arr)
    res.CopyInformation(out)
    return res, kind


def generate_case(seed, index, size="demo", keep_clean=False, main_class=None):
    """Generates case `index` of the cohort of `seed` (deterministic in (seed, index)).

    Returns a SyntheticCase; keep_clean=True also returns the canonical-grid arrays before
    acquisition effects (see SyntheticCase.clean). main_class (one of LESION_CLASSES) forces the
    patient's main diagnosis, e.g. for class-balanced samples; None draws it from
    MAIN_CLASS_PROB.
    """
    if size not in SIZES:
        raise ValueError(f"Unknown synthetic size {size!r}; expected one of {sorted(SIZES)}")
    if main_class is not None and main_class not in MAIN_CLASS_PROB:
        raise ValueError(f"Unknown main_class {main_class!r}; expected one of "
                         f"{list(LESION_CLASSES)}")
    rng = np.random.default_rng([int(seed), int(index)])
    name = f"syn_{index:04d}"
    grid = _make_grid(rng, size)
    tissue, geom = _anatomy(rng, grid)
    placed = _place_lesions(rng, _draw_lesions(rng, size, main_class), tissue, grid)
    lesions = _render_lesions(rng, placed, tissue, grid)
    if not lesions:  # only a degenerate grid (no liver in the field of view) gets here
        raise RuntimeError(f"synthetic case {name} (seed {seed}, size {size}): no lesion could "
                           f"be placed in the liver")
    _dilated_ducts(rng, lesions, tissue, grid, geom)

    timing = float(rng.uniform(0.85, 1.15))
    lut, tissue_records = _hu_tables(rng, lesions, timing)
    clean = _render_clean(rng, grid, tissue, lut)

    # Ground truth on the canonical V grid.
    code = np.zeros(256, np.uint8)
    inst = np.zeros(256, np.uint16)
    for nm in _LIVER_IDS:
        code[_ANATOMY_IDS[nm]] = 1
    for les in lesions:
        for tid in les["compartment_ids"].values():
            code[tid] = LABEL_CODE[les["cls"]]
            inst[tid] = les["instance"]
    label = code[tissue]
    instances = inst[tissue]

    # Acquisition. D is absent in one study in three, at a fixed stride so that any three
    # consecutive cases include one without it.
    has_d = (index + seed) % 3 != 0
    phases = [p for p in PHASES if p != "D" or has_d]
    noise_std = float(rng.uniform(8, 20))
    orientation = "identity"
    if index % 2 == 1:
        names = [k for k in ORIENTATIONS if k != "identity"]
        orientation = names[int(rng.integers(0, len(names)))]
    shifts = {}
    images = {}
    regrid = None
    regrid_phase = None
    if index % 5 == 2:
        regrid_phase = "D" if has_d else "NC"
    for p, key in enumerate(PHASES):
        if key not in phases:
            continue
        shift = np.zeros(3)
        if key != "V":  # residual misregistration of 1-2 voxels, mostly in-plane
            ang = rng.uniform(0, 2 * math.pi)
            mag = rng.uniform(1.0, 2.0)
            shift = np.array([rng.uniform(-0.5, 0.5), mag * math.sin(ang), mag * math.cos(ang)])
        shifts[key] = [round(float(v), 3) for v in shift]
        std = noise_std * float(rng.uniform(0.9, 1.1))
        arr = _acquire(rng, clean[p], grid, shift, std)
        img = _to_sitk(arr, grid)
        if key == regrid_phase:
            if orientation != "identity" and rng.random() < 0.4:
                regrid = "direction"  # this phase stays in the canonical direction
            else:
                img, regrid = _regrid(rng, img, grid)
                img = _orient(img, orientation)
        else:
            img = _orient(img, orientation)
        images[key] = img
    labels = _orient(_to_sitk(label, grid), orientation)
    instances_img = _orient(_to_sitk(instances, grid), orientation)

    v = images["V"]
    info = dict(
        case=name, index=int(index), phases=phases, size=size,
        spacing=[float(s) for s in v.GetSpacing()[::-1]],  # (z, y, x) of the stored V array
        shape=[int(s) for s in v.GetSize()[::-1]],
        canonical_spacing=list(grid.spacing), canonical_shape=list(grid.shape),
        origin=list(v.GetOrigin()), direction=list(v.GetDirection()), orientation=orientation,
        regridded_phase=regrid_phase if regrid else None, regrid=regrid,
        timing_factor=round(timing, 4), noise_std=round(noise_std, 2),
        misregistration_vox=shifts,
        lesions=[dict(instance=l["instance"], cls=l["cls"], label=LABEL_CODE[l["cls"]],
                      subtype=l["subtype"], diameter_mm=round(l["diameter_mm"], 1),
                      centre_mm=[round(float(c), 1) for c in l["centre"]],
                      voxels=int((instances == l["instance"]).sum()))
                 for l in lesions],
    )
    info["lesion_classes"] = sorted({l["cls"] for l in lesions}, key=LESION_CLASSES.index)
    keep = None
    if keep_clean:
        keep = dict(hu=clean, tissue=tissue, label=label, instances=instances,
                    tissues=tissue_records, spacing=grid.spacing, origin=grid.origin)
    return SyntheticCase(name=name, images=images, labels=labels, instances=instances_img,
                         info=info, clean=keep)


# ------------------------------------------------------------------------------ a cohort


def write_case(case, out_dir, split="Tr", file_ending=".nii.gz"):
    """Writes one case into DATASET/images{split}, labels{split}, instances{split}."""
    out_dir = pathlib.Path(out_dir)
    for sub in ("images", "labels", "instances"):
        (out_dir / f"{sub}{split}").mkdir(parents=True, exist_ok=True)
    for key, img in case.images.items():
        sitk.WriteImage(img, str(out_dir / f"images{split}" / f"{case.name}_{PHASES.index(key):04d}"
                                                             f"{file_ending}"),
                        useCompression=True)
    sitk.WriteImage(case.labels, str(out_dir / f"labels{split}" / f"{case.name}{file_ending}"),
                    useCompression=True)
    sitk.WriteImage(case.instances,
                    str(out_dir / f"instances{split}" / f"{case.name}{file_ending}"),
                    useCompression=True)


def _make_and_write(args):
    out_dir, seed, index, size, split = args
    t0 = time.perf_counter()
    case = generate_case(seed, index, size)
    write_case(case, out_dir, split)
    return dict(case.info, split=split, seconds=round(time.perf_counter() - t0, 3))


def held_out_indices(cases, seed, test_fraction):
    """Indices of the held-out cases: a seeded random subset of round(cases * fraction)."""
    n_test = int(round(cases * test_fraction))
    if not 0 <= n_test < cases or cases < 1:
        raise ValueError(f"test_fraction={test_fraction} leaves no training case out of "
                         f"{cases}")
    perm = np.random.default_rng([int(seed), 2 ** 31 - 1]).permutation(cases)
    return set(int(i) for i in perm[:n_test])


def make_cohort(out_dir, cases, seed, size="demo", test_fraction=0.25, workers=1):
    """Generates a synthetic cohort in the data-contract layout. Returns out_dir as a Path.

    out_dir/dataset.json, imagesTr|Ts/CASE_000{0..3}.nii.gz (no _0003 in a third of the cases),
    labelsTr|Ts/CASE.nii.gz, instancesTr|Ts/CASE.nii.gz, and summary.json (per case: split,
    phases, lesions with classes and sizes, spacing, orientation, acquisition parameters).
    Case i is seeded by (seed, i): the result does not depend on `workers`.
    """
    out_dir = pathlib.Path(out_dir)
    if size not in SIZES:
        raise ValueError(f"Unknown synthetic size {size!r}; expected one of {sorted(SIZES)}")
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Regenerating into the same folder must not leave files of an earlier cohort behind (a
    # stale CASE_0003 would give a case a delayed phase it does not have).
    for sub in ("images", "labels", "instances"):
        for split in ("Tr", "Ts"):
            for f in (out_dir / f"{sub}{split}").glob("syn_*"):
                f.unlink()
    held_out = held_out_indices(cases, seed, test_fraction)
    jobs = [(str(out_dir), seed, i, size, "Ts" if i in held_out else "Tr")
            for i in range(cases)]
    if workers > 1:
        # spawn, not fork: the caller may hold JAX's threads, which fork would copy mid-flight.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            infos = list(pool.map(_make_and_write, jobs, chunksize=1))
    else:
        infos = [_make_and_write(j) for j in jobs]
    dataset = {
        "name": f"synthetic_liver_{size}_seed{seed}",
        "description": "Synthetic multi-phase liver CT (lidia_jax.data.synthetic)",
        "channel_names": {str(i): p for i, p in enumerate(PHASES)},
        "labels": {name: code for code, name in enumerate(LABELS)},
        "file_ending": ".nii.gz",
        "numTraining": sum(1 for j in jobs if j[4] == "Tr"),
        "numTest": sum(1 for j in jobs if j[4] == "Ts"),
    }
    (out_dir / "dataset.json").write_text(json.dumps(dataset, indent=2))
    summary = {"seed": seed, "size": size, "cases": {i["case"]: i for i in infos}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return out_dir
