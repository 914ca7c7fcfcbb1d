"""nnU-Net-style CT preprocessing of a contract dataset into an on-disk cache.

Per case (`preprocess_case`): canonical orientation on the venous grid (contract.load_case) ->
crop to the body (largest component of V > body_threshold_hu, grown to keep every labelled
voxel) -> resample to target_spacing (images order 1 or 3, nnU-Net's separate-z rule for
anisotropic data; labels and instances nearest neighbour, so that seg and inst stay voxel-wise
consistent and instance ids are never blended) -> per phase clip to the dataset's foreground
0.5 / 99.5 percentiles and z-score with the foreground mean / std (nnU-Net CTNormalization).
Absent phases are zero.

Dataset (`preprocess_dataset`): foreground intensity statistics are computed once from the
*training* cases (validation cases excluded, so nothing leaks), from label > 0 voxels on the
venous grid: per case all of them, or a uniform sample of FG_VOXELS_TOTAL / n_train when it
has more. One deviation from nnU-Net's order: images are resampled
before they are clipped (the statistics are not known when a case is first read, and reading
every file twice would double the cost). The two orders differ only next to voxels beyond the
clip range (bone, contrast-filled vessels outside the liver); with cubic interpolation clipping
last also removes the spline overshoot.

Cache layout (notes/INTERFACES.md): <cache_dir>/<fingerprint>/plan.json and
<cache_dir>/<fingerprint>/<CASE>/{image.npy, seg.npy, inst.npy, meta.json}. The fingerprint
hashes the settings and every input file's name, size and mtime; a cache is built in a temporary
folder and renamed when complete, so a half-written cache is never reused.
"""

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import time
import uuid
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import scipy.ndimage as ndi

from lidia_jax.data import contract
from lidia_jax.data import geometry as geo

PREPROCESS_VERSION = 2  # bump when the preprocessing itself changes: invalidates caches
# Foreground voxels kept for the intensity statistics, all training cases together. nnU-Net
# draws 1e8 with replacement; 2e6 without replacement already pins the 0.5 / 99.5 percentiles
# (10^4 samples in each tail) at a fiftieth of the memory.
FG_VOXELS_TOTAL = 2_000_000
MAX_FG_LOCATIONS = 10_000  # per kind (liver, lesion) in meta.json, for the patch sampler
PHASES = contract.PHASES


# ------------------------------------------------------------------------------ settings


def settings_from_config(preprocess_cfg, data_cfg) -> dict:
    """The settings that determine the cache content (all of them go into the fingerprint)."""
    return {
        "version": PREPROCESS_VERSION,
        "target_spacing": [float(s) for s in preprocess_cfg.target_spacing],
        "image_order": int(preprocess_cfg.image_order),
        "clip_percentiles": [float(p) for p in preprocess_cfg.clip_percentiles],
        "crop_to_body": bool(preprocess_cfg.crop_to_body),
        "body_threshold_hu": float(preprocess_cfg.body_threshold_hu),
        "val_fraction": float(data_cfg.val_fraction),
        "allow_missing_phases": bool(data_cfg.allow_missing_phases),
        "drop_delayed": bool(data_cfg.drop_delayed),
    }


def _input_files(root: pathlib.Path) -> List[list]:
    """[relative path, size, mtime_ns] of dataset.json and every file of the six case folders."""
    out = []
    candidates = [root / "dataset.json"]
    for dirs in contract.SPLIT_DIRS.values():
        for d in dirs:
            if (root / d).is_dir():
                candidates += sorted((root / d).iterdir())
    for f in candidates:
        if f.is_file():
            st = f.stat()
            out.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns])
    return out


def fingerprint(root, settings: dict) -> str:
    """Hash of the settings and of the input files' names, sizes and mtimes (no file is read)."""
    payload = json.dumps({"settings": settings, "files": _input_files(pathlib.Path(root))},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def split_train_val(names: Sequence[str], val_fraction: float) -> Tuple[List[str], List[str]]:
    """Deterministic train / val split of imagesTr case names.

    Cases are ordered by a hash of their name and the first round(n * val_fraction) (at least one
    when val_fraction > 0 and n >= 2) go to validation: independent of listing order and of the
    machine, and adding a case moves at most one other case across the boundary.
    """
    names = sorted(names)
    n_val = int(round(len(names) * val_fraction))
    if val_fraction > 0 and len(names) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(names) - 1) if names else 0
    val = set(sorted(names, key=lambda n: (_name_hash(n), n))[:n_val])
    return [n for n in names if n not in val], [n for n in names if n in val]


# ------------------------------------------------------------------------------ per case


def body_bbox(venous: np.ndarray, threshold_hu: float,
              keep: Optional[np.ndarray] = None) -> List[List[int]]:
    """Bounding box [[z0, z1], [y0, y1], [x0, x1]] (half-open) of the body.

    venous: float [D, H, W] in HU. The body is the largest 6-connected component above
    `threshold_hu` (drops the table, blankets, air); `keep` (bool [D, H, W]) voxels are added to
    the box so that no labelled voxel is ever cropped away. The whole volume when nothing is
    above the threshold.
    """
    comp, n = ndi.label(venous > threshold_hu)
    boxes = []
    if n > 0:
        largest = int(np.argmax(np.bincount(comp.reshape(-1))[1:])) + 1
        sl = ndi.find_objects((comp == largest).astype(np.int8))[0]
        boxes.append([[s.start, s.stop] for s in sl])
    if keep is not None and keep.any():
        sl = ndi.find_objects(keep.astype(np.int8))[0]
        boxes.append([[s.start, s.stop] for s in sl])
    if not boxes:
        return [[0, int(n)] for n in venous.shape]
    return [[int(min(b[k][0] for b in boxes)), int(max(b[k][1] for b in boxes))]
            for k in range(3)]


def _fg_locations(seg: np.ndarray, inst: np.ndarray, seed: int) -> dict:
    """{"liver": [[z, y, x], ...] of label >= 1, "lesion": ... of label >= 2}, <= 10000 each.

    Liver voxels are a uniform subsample. Lesion voxels are subsampled per instance (every
    instance keeps min(its size, an equal share) voxels, the share growing while small instances
    leave room), so that the smallest lesion of a case stays drawable by the patch sampler.
    """
    rng = np.random.default_rng(seed)
    loc = np.argwhere(seg >= 1)
    if len(loc) > MAX_FG_LOCATIONS:
        loc = loc[np.sort(rng.choice(len(loc), MAX_FG_LOCATIONS, replace=False))]
    out = {"liver": loc.astype(int).tolist()}
    lesion = np.argwhere(seg >= contract.FIRST_LESION_CODE)
    if len(lesion) > MAX_FG_LOCATIONS:
        ids = inst[tuple(lesion.T)]
        uniq, sizes = np.unique(ids, return_counts=True)
        # Water-filling: the largest per-instance share q with sum(min(size, q)) <= MAX.
        order = np.sort(sizes)
        share, left = 0, MAX_FG_LOCATIONS
        for k, size in enumerate(order):
            fair = left // (len(order) - k)
            if size > fair:
                share = fair
                break
            left -= int(size)
        else:
            share = int(order[-1])
        keep = []
        for u in uniq:
            idx = np.flatnonzero(ids == u)
            if len(idx) > share:
                idx = rng.choice(idx, share, replace=False)
            keep.append(idx)
        lesion = lesion[np.sort(np.concatenate(keep))]
    out["lesion"] = lesion.astype(int).tolist()
    return out


def _geometric(loaded: contract.LoadedCase, settings: dict):
    """Crop + spacing resampling, no intensity normalisation.

    Returns (image float32 [D, H, W, 4] in HU (absent phases 0), seg uint8 [D, H, W] or None,
    inst uint16 [D, H, W] or None, meta dict).
    """
    venous = loaded.images[contract.REFERENCE_PHASE]
    if settings["crop_to_body"]:
        keep = loaded.label > 0 if loaded.label is not None else None
        bbox = body_bbox(venous, settings["body_threshold_hu"], keep)
    else:
        bbox = [[0, int(n)] for n in venous.shape]
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    target = settings["target_spacing"]
    spacing = loaded.spacing
    crop_shape = [hi - lo for lo, hi in bbox]
    new_shape = geo.resampled_shape(crop_shape, spacing, target)
    sep = geo.separate_z_axis(spacing, target) if settings["image_order"] > 1 else None

    phase_mask = np.asarray(loaded.phase_mask, bool).copy()
    if settings["drop_delayed"]:  # also for a new case at inference: the model never saw D
        phase_mask[PHASES.index("D")] = False
    image = np.zeros(new_shape + [len(PHASES)], np.float32)
    for c, phase in enumerate(PHASES):
        if phase_mask[c]:
            image[..., c] = geo.resize(loaded.images[phase][crop], new_shape,
                                       settings["image_order"], sep)
    seg = inst = None
    classes = {}
    if loaded.label is not None:
        seg = geo.resize(loaded.label[crop], new_shape, 0).astype(np.uint8)
        inst = geo.resize(loaded.instances[crop], new_shape, 0).astype(np.uint16)
        # Recomputed on the new grid so that meta agrees with inst.npy (a lesion smaller than a
        # voxel of the target spacing can vanish; `lost_instances` says so).
        classes = contract.instance_classes(inst, seg)
        inst[(inst > 0) & ~np.isin(inst, list(classes))] = 0
    lost = sorted(set(loaded.instance_classes) - set(classes))
    canonical = {k: loaded.canonical[k] for k in ("axes", "flip_axes", "shape", "spacing")}
    meta = {
        "case": loaded.name,
        "phase_mask": [bool(m) for m in phase_mask],
        "phases": [p for p, m in zip(PHASES, phase_mask) if m],
        "instance_classes": {str(k): int(v) for k, v in sorted(classes.items())},
        "lost_instances": [int(i) for i in lost],
        # Patient-level truth (contract): lesion codes present in the original label map.
        "patient_classes": sorted({int(v) for v in loaded.instance_classes.values()}),
        "spacing": [float(t) for t in target],
        "shape": [int(n) for n in new_shape],
        "labelled": seg is not None,
        "geometry": {
            "original": loaded.original,
            "canonical": canonical,
            "crop_bbox": bbox,
            "resampled_shape": [int(n) for n in new_shape],
            "target_spacing": [float(t) for t in target],
            "separate_z_axis": sep,
        },
        "fg_locations": (_fg_locations(seg, inst, _name_hash(loaded.name) % 2**32)
                         if seg is not None
                         else {"liver": [], "lesion": []}),
    }
    return image, seg, inst, meta


def normalise(image: np.ndarray, phase_mask: Sequence[bool], intensity: dict) -> np.ndarray:
    """CT normalisation per phase channel: clip to [lo, hi], (x - mean) / std; absent phases 0.

    image: float32 [D, H, W, 4] in HU; intensity: plan["intensity"] ({"mean", "std", "lo",
    "hi"}, one value per phase). Returns a new float32 array.
    """
    out = np.zeros_like(image, dtype=np.float32)
    for c, present in enumerate(phase_mask):
        if present:
            x = np.clip(image[..., c], intensity["lo"][c], intensity["hi"][c])
            out[..., c] = (x - intensity["mean"][c]) / max(intensity["std"][c], 1e-8)
    return out


def preprocess_case(loaded_case: contract.LoadedCase, plan: dict, preprocess_cfg=None):
    """Preprocesses one loaded case with a cache's stored settings and intensity statistics.

    For inference on a new case: `load_case` it, then call this with `cache.plan`. The geometry
    settings come from plan["settings"] (those the network was trained with); preprocess_cfg, if
    given, must agree on them (ValueError otherwise).
    Returns (image float32 [D, H, W, 4], seg uint8 [D, H, W] or None, inst uint16 or None, meta).
    """
    settings = plan["settings"]
    if preprocess_cfg is not None:
        for key in ("target_spacing", "image_order", "crop_to_body", "body_threshold_hu"):
            given = getattr(preprocess_cfg, key)
            given = [float(g) for g in given] if key == "target_spacing" else given
            if given != settings[key]:
                raise ValueError(f"preprocess.{key}={given!r} differs from the cache plan's "
                                 f"{settings[key]!r} (the model was trained on the latter)")
    image, seg, inst, meta = _geometric(loaded_case, settings)
    return normalise(image, meta["phase_mask"], plan["intensity"]), seg, inst, meta


# ------------------------------------------------------------------------------ dataset


def _foreground_samples(loaded: contract.LoadedCase, budget: int, seed: int) -> list:
    """Per phase: float32 HU values of label > 0 voxels (all, or `budget` sampled), or None."""
    fg = loaded.label > 0
    n = int(fg.sum())
    pick = None
    if n > budget:
        pick = np.sort(np.random.default_rng(seed).choice(n, budget, replace=False))
    out = []
    for phase in PHASES:
        img = loaded.images[phase]
        if img is None or n == 0:
            out.append(None)
            continue
        values = img[fg]
        out.append(values if pick is None else values[pick])
    return out


def _process_case(case: contract.CaseFiles, dataset: contract.Dataset, settings: dict,
                  out_dir: str, split: str, budget: int) -> dict:
    """Worker: load + check + crop + resample one case and write its raw (unnormalised) arrays."""
    try:
        if split in ("train", "val") and case.label is None:
            raise contract.CaseError(
                dataset.root / contract.SPLIT_DIRS["Tr"][1] / f"{case.name}{dataset.file_ending}",
                "label file is missing (training cases need one)")
        loaded = contract.load_case(case, dataset, settings["allow_missing_phases"],
                                    settings["drop_delayed"])
        image, seg, inst, meta = _geometric(loaded, settings)
    except contract.CaseError as e:
        return {"case": case.name, "error": str(e)}
    except Exception as e:  # keep the cohort going; the report names the case and the problem
        return {"case": case.name, "error": f"{case.name}: unexpected {type(e).__name__}: {e}"}
    folder = pathlib.Path(out_dir) / case.name
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "image_raw.npy", image)
    if seg is not None:
        np.save(folder / "seg.npy", seg)
        np.save(folder / "inst.npy", inst)
    meta["split"] = split
    (folder / "meta.json").write_text(json.dumps(meta))
    samples = (_foreground_samples(loaded, budget, _name_hash(case.name) % 2**32)
               if split == "train" else None)
    return {"case": case.name, "samples": samples}


def _normalise_case(folder: str, intensity: dict) -> None:
    """Worker: image_raw.npy -> image.npy with the dataset statistics."""
    folder = pathlib.Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    raw = np.load(folder / "image_raw.npy")
    np.save(folder / "image.npy", normalise(raw, meta["phase_mask"], intensity))
    (folder / "image_raw.npy").unlink()


def intensity_statistics(samples: Sequence[list], percentiles: Sequence[float]) -> dict:
    """Per phase mean, std, lo, hi (percentiles) over the concatenated foreground samples.

    samples: one list per case of 4 arrays (or None). Phases never present: mean 0, std 1,
    lo = hi = 0 (count 0); their channel is zero anyway. As nnU-Net, mean and std are of the
    unclipped values.
    """
    stats = {"mean": [], "std": [], "lo": [], "hi": [], "count": []}
    for c in range(len(PHASES)):
        parts = [s[c] for s in samples if s is not None and s[c] is not None and len(s[c])]
        if not parts:
            for k, v in (("mean", 0.0), ("std", 1.0), ("lo", 0.0), ("hi", 0.0), ("count", 0)):
                stats[k].append(v)
            continue
        v = np.concatenate(parts).astype(np.float64)
        lo, hi = np.percentile(v, percentiles)
        stats["mean"].append(float(v.mean()))
        stats["std"].append(float(v.std()))
        stats["lo"].append(float(lo))
        stats["hi"].append(float(hi))
        stats["count"].append(int(v.size))
    return stats


class Cache:
    """A finished preprocessing cache: <cache_dir>/<fingerprint>/ (see module docstring)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        plan_file = self.path / "plan.json"
        if not plan_file.is_file():
            raise FileNotFoundError(f"{plan_file}: not a preprocessing cache (no plan.json)")
        self.plan = json.loads(plan_file.read_text())

    @property
    def fingerprint(self) -> str:
        return self.plan["fingerprint"]

    @property
    def intensity(self) -> dict:
        return self.plan["intensity"]

    def case_names(self, split: str) -> List[str]:
        """Case names of split "train", "val" or "test", sorted."""
        if split not in self.plan["splits"]:
            raise KeyError(f"unknown split {split!r}; known: {sorted(self.plan['splits'])}")
        return list(self.plan["splits"][split])

    def load(self, case: str, mmap: bool = True) -> dict:
        """{"image": f32 [D,H,W,4], "seg": u8 [D,H,W] or None, "inst": u16 or None, "meta"}."""
        folder = self.path / case
        if not (folder / "meta.json").is_file():
            raise KeyError(f"case {case!r} is not in the cache {self.path}")
        mode = "r" if mmap else None
        out = {"image": np.load(folder / "image.npy", mmap_mode=mode), "seg": None, "inst": None,
               "meta": json.loads((folder / "meta.json").read_text())}
        if (folder / "seg.npy").is_file():
            out["seg"] = np.load(folder / "seg.npy", mmap_mode=mode)
            out["inst"] = np.load(folder / "inst.npy", mmap_mode=mode)
        return out


def _run(fn, jobs: List[tuple], num_workers: int):
    """Applies fn(*job) to every job, in a spawn process pool when num_workers > 0."""
    if num_workers <= 0 or len(jobs) <= 1:
        for job in jobs:
            yield fn(*job)
        return
    # spawn, not fork: the parent may hold JAX / thread pools that do not survive a fork.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(num_workers, len(jobs)),
                                                mp_context=ctx) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for f in futures:
            yield f.result()


def preprocess_dataset(root, cache_dir, preprocess_cfg, data_cfg,
                       log: Callable[[str], None] = print) -> Cache:
    """Preprocesses the dataset at `root` into <cache_dir>/<fingerprint>/, or reuses it.

    A cache whose fingerprint (settings + input file names/sizes/mtimes) matches is returned
    without reading any image. Otherwise: imagesTr -> train / val (split_train_val), imagesTs ->
    test; every case is checked and preprocessed in a process pool
    (preprocess_cfg.num_workers, 0 = in-process); a bad case is reported (file and problem) and
    recorded in plan.json["skipped"]; the others go on. Raises contract.DatasetError if
    dataset.json is broken or no training case is usable.
    """
    root = pathlib.Path(root)
    cache_dir = pathlib.Path(cache_dir)
    settings = settings_from_config(preprocess_cfg, data_cfg)
    fp = fingerprint(root, settings)
    final = cache_dir / fp
    if (final / "plan.json").is_file():
        log(f"preprocessing: reusing cache {final}")
        return Cache(final)

    t0 = time.time()
    dataset = contract.read_dataset(root)
    tr_names = [c.name for c in dataset.cases["Tr"]]
    train, val = split_train_val(tr_names, settings["val_fraction"])
    split_of = {**{n: "train" for n in train}, **{n: "val" for n in val},
                **{c.name: "test" for c in dataset.cases["Ts"]}}
    overlap = set(tr_names) & {c.name for c in dataset.cases["Ts"]}
    if overlap:
        raise contract.DatasetError(root, f"case names in both imagesTr and imagesTs: "
                                    f"{sorted(overlap)}")
    cases = dataset.cases["Tr"] + dataset.cases["Ts"]
    budget = max(1, FG_VOXELS_TOTAL // max(1, len(train)))
    tmp = cache_dir / f".{fp}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    num_workers = int(preprocess_cfg.num_workers)
    log(f"preprocessing {len(cases)} cases of {root} into {final} "
        f"({num_workers or 'no'} worker processes)")
    try:
        jobs = [(c, dataset, settings, str(tmp), split_of[c.name], budget) for c in cases]
        skipped, samples, done = {}, [], []
        step = max(1, len(cases) // 10)
        for i, res in enumerate(_run(_process_case, jobs, num_workers)):
            if (i + 1) % step == 0 or i + 1 == len(cases):
                log(f"  [{i + 1}/{len(cases)}] {time.time() - t0:.0f} s")
            if "error" in res:
                skipped[res["case"]] = res["error"]
                log(f"  [{i + 1}/{len(cases)}] SKIPPED {res['error']}")
                continue
            done.append(res["case"])
            if res["samples"] is not None:
                samples.append(res["samples"])
        if not samples:
            raise contract.DatasetError(root, "no usable training case (imagesTr with labels); "
                                        f"skipped: {skipped}")
        intensity = intensity_statistics(samples, settings["clip_percentiles"])
        list(_run(_normalise_case, [(str(tmp / n), intensity) for n in done], num_workers))
        ok = set(done)
        plan = {
            "fingerprint": fp,
            "settings": settings,
            "intensity": intensity,
            "splits": {"train": [n for n in train if n in ok], "val": [n for n in val if n in ok],
                       "test": [c.name for c in dataset.cases["Ts"] if c.name in ok]},
            "labels": dataset.labels,
            "skipped": skipped,
            "dataset": {"root": str(root.resolve()), "name": dataset.name,
                        "file_ending": dataset.file_ending,
                        "channel_names": {str(k): v for k, v in dataset.channel_names.items()}},
        }
        (tmp / "plan.json").write_text(json.dumps(plan, indent=1))
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same cache first: use theirs
            if not (final / "plan.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"preprocessing: {len(done)} cases done, {len(skipped)} skipped, "
        f"{time.time() - t0:.1f} s -> {final}")
    return Cache(final)
