"""A second opinion on each detected lesion's class: a random forest on intensity statistics.

Not in the paper. The mask transformer names few of the lesions it finds on a small cohort: the
demo's seed-0 model names 0.56 of its matched test lesions right, while a random forest on
per-phase intensity statistics under the *same predicted masks* names 0.78, and scores the
patients' classes better too (AUC-8 0.864 against 0.812 on the demo's 25 test cases;
scripts/oracle_baseline.py --predicted, README "A lesion forest"). The network finds and outlines
lesions; the forest, fitted on the training split's true lesions, names them, as radiomics
classifiers name segmented lesions.

Features per lesion and phase p (z-scored image, as the cache; absent phases are 0):
  mean, 10th and 90th percentile, core (eroded) mean and rim mean, each minus the liver's mean
  (label 1 voxels: lesion patterns are defined against the same phase's liver), the standard
  deviation; plus log of the voxel count;        -> [6 * P + 1]
  then the core's and the rim's change from each phase to the next (NC -> A -> V -> D: HCC's
  arterial rise and venous washout, the centripetal fill of ICC and hemangioma) and the rim minus
  the core per phase (rim enhancement, target lesions).   -> [9 * P - 1] in all
A forest splits on one feature at a time, so a difference it would need many splits to
approximate is given explicitly: on the demo's training lesions (4-fold cross-validation, true
masks) it raised the mean one-vs-rest AUC from 0.924 to 0.947, and on the demo's models HCC's
patient AUC in all six comparisons (README "Phase-to-phase changes").

With config.inference.lesion_forest (inference/diagnose.py) each post-processed lesion takes the
forest's class and probabilities, and the patient score of class c becomes
  w * max over lesions of P_forest(c) + (1 - w) * LiverMax(c),  w = lesion_forest_weight
(LiverMax, or the configured inference.patient_score), malignancy likewise with the malignant
classes' summed probability: LiverMax keeps the voxel evidence of lesions too small to survive
post-processing (calcifications of a few voxels).

The forest's training set is stored in the workdir (lesion_forest.npz: features and label codes,
tens of KB) and the forest refitted from it when loaded: deterministic for a seed, and no pickle.
"""

import dataclasses
import pathlib
from typing import Callable, Optional, Tuple

import numpy as np
import scipy.ndimage as ndi

from lidia_jax.data.contract import FIRST_LESION_CODE, PHASES

LIVER_CODE = 1
FILE = "lesion_forest.npz"


def feature_width(num_phases: int) -> int:
    """Features per lesion (module docstring) for images of num_phases channels."""
    return 9 * num_phases - 1


def lesion_features(image: np.ndarray, seg: np.ndarray, instances: np.ndarray
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The features of every lesion instance (see the module docstring).

    Args:
      image: [D, H, W, P] z-scored; seg: [D, H, W] label codes (liver = 1); instances:
        [D, H, W] lesion ids (0 = none).
    Returns:
      ids [L] int, codes [L] int (each lesion's most frequent label code in seg),
      features [L, 9 * P - 1] float64 (feature_width).
    """
    liver = seg == LIVER_CODE
    ref = image[liver].mean(0) if liver.any() else np.zeros(image.shape[-1], np.float64)
    ids, codes, rows = [], [], []
    for i, box in enumerate(ndi.find_objects(instances), start=1):
        if box is None:
            continue
        # One voxel of margin: the erosion sees the lesion's border as in the whole volume.
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        m = instances[box] == i
        img = image[box]
        core = ndi.binary_erosion(m)
        core = core if core.any() else m
        rim = m & ~core
        rim = rim if rim.any() else m
        v = img[m].astype(np.float64)
        core_mean, rim_mean = img[core].mean(0) - ref, img[rim].mean(0) - ref
        rows.append(np.concatenate([
            v.mean(0) - ref, v.std(0), np.percentile(v, 10, axis=0) - ref,
            np.percentile(v, 90, axis=0) - ref, core_mean, rim_mean, [np.log(m.sum())],
            np.diff(core_mean), np.diff(rim_mean), rim_mean - core_mean]))
        ids.append(i)
        codes.append(int(np.bincount(seg[box][m]).argmax()))
    return (np.asarray(ids, int), np.asarray(codes, int),
            np.asarray(rows, np.float64).reshape(-1, feature_width(image.shape[-1])))


def training_set(cache) -> Tuple[np.ndarray, np.ndarray]:
    """(features [N, F], label codes [N]) of the true lesions of the cache's training split (the
    validation split stays held out: validation scores the forest too)."""
    xs, ys = [], []
    for case in cache.case_names("train"):
        data = cache.load(case, mmap=False)
        if data["seg"] is None:
            continue
        _, codes, x = lesion_features(np.asarray(data["image"]), np.asarray(data["seg"]),
                                      np.asarray(data["inst"]))
        xs.append(x)
        ys.append(codes)
    width = feature_width(len(PHASES)) if not xs else xs[0].shape[1]
    return (np.concatenate(xs) if xs else np.zeros((0, width)),
            np.concatenate(ys) if ys else np.zeros((0,), int))


@dataclasses.dataclass
class LesionForest:
    """A random forest over the lesion classes; `probabilities` maps features to [L, K]."""

    forest: object  # sklearn.ensemble.RandomForestClassifier, fitted
    num_classes: int  # K lesion classes (label codes 2 .. K + 1)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """[L, F] -> [L, K] over the lesion classes (classes absent from training get 0)."""
        prob = np.zeros((len(features), self.num_classes))
        if len(features):
            cols = self.forest.classes_.astype(int) - FIRST_LESION_CODE
            prob[:, cols] = self.forest.predict_proba(features)
        return prob


def fit(features: np.ndarray, codes: np.ndarray, num_classes: int, trees: int,
        seed: int) -> LesionForest:
    """Fits the forest on lesions of at least two classes (ValueError otherwise)."""
    from sklearn.ensemble import RandomForestClassifier  # only where the option is on

    if len(np.unique(codes)) < 2:
        raise ValueError(f"lesion forest: the training lesions hold {len(np.unique(codes))} "
                         "class(es); a classifier needs at least two")
    forest = RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1)
    return LesionForest(forest.fit(features, codes), num_classes)


def save(workdir, features: np.ndarray, codes: np.ndarray) -> pathlib.Path:
    path = pathlib.Path(workdir) / FILE
    np.savez(path, features=features, codes=codes)
    return path


def load(config, workdir, log: Callable[[str], None] = print) -> Optional[LesionForest]:
    """The workdir's forest if config.inference.lesion_forest, else None (also, with a log line,
    where the training lesions hold fewer than two classes).

    A workdir trained before the option has no lesion_forest.npz, and one trained before the
    phase-to-phase features holds fewer columns: the file is (re)made from the training split of
    the cache the run trained on, if that cache is still there (FileNotFoundError if not: the
    forest needs the true lesions of the training cases).
    """
    inf = config.inference
    if not inf.get("lesion_forest", False):
        return None
    path = pathlib.Path(workdir) / FILE
    width, problem = feature_width(len(PHASES)), None
    data = np.load(path) if path.is_file() else None
    if data is None:
        problem = "missing"
    elif data["features"].shape[1] != width:
        problem = f"holds features of an earlier version (not {width} per lesion)"
    if problem:
        from lidia_jax.data import preprocessing  # only for workdirs of earlier versions
        from lidia_jax.train import trainer

        cache_dir = trainer.trained_cache_dir(workdir)
        if not cache_dir.is_dir():
            raise FileNotFoundError(f"{path}: {problem}, and the cache {cache_dir} it is made "
                                    "from is gone; rerun preprocessing or turn "
                                    "config.inference.lesion_forest off")
        save(workdir, *training_set(preprocessing.Cache(cache_dir)))
        log(f"lesion forest: {path} {problem}; training set written from {cache_dir}")
        data = np.load(path)
    if len(np.unique(data["codes"])) < 2:  # e.g. a tiny cohort: no forest, say so
        log(f"lesion forest: the training lesions in {path} hold "
            f"{len(np.unique(data['codes']))} class(es); the network names the lesions")
        return None
    num_classes = len(config.data.labels) - FIRST_LESION_CODE
    forest = fit(data["features"], data["codes"], num_classes, inf.lesion_forest_trees,
                 config.seed)
    log(f"lesion forest: {len(data['codes'])} training lesions, {inf.lesion_forest_trees} trees")
    return forest
