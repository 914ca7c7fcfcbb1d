"""grain input pipeline: preprocessed cases -> sharded, deterministic, resumable training batches.

Reads the cache of lidia_jax/data/preprocessing.py directly by its layout (INTERFACES.md):
  <cache>/plan.json, <cache>/<CASE>/{image.npy, seg.npy, inst.npy, meta.json}
with memory maps, so a worker reads only the blocks its patches touch.

Pipeline (grain.MapDataset, every step a pure function of the element index):
  source(cases) -> seed -> shuffle (per epoch) -> repeat
  -> random_map(sample + augment (+ lesion paste, data/paste.py; synthetic calcifications,
     data/synthetic_calc.py) + targets)
  -> shard [p::P] -> batch(local) -> to_iter_dataset -> mp_prefetch(num_workers)
(with config.input.fg_balance "cohort" the source's epoch is class_balanced_order's, not the
cases once each).
The random patch of global element i is drawn from a generator seeded by (seed, i), and the global
batch of step k is elements [k B, (k + 1) B) whatever the process count; process p holds the
elements p, p + P, ... of it. Batches are formed before the worker split, so the stream is the same
for any number of workers, and the iterator state is just the step (TrainIterator), which restores
exactly, even with another number of workers or processes.
"""

import dataclasses
import json
import logging
import pathlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import grain
import numpy as np

from lidia_jax.data import augment, paste, patches, synthetic_calc

PathLike = Union[str, pathlib.Path]

PHASES = ("NC", "A", "V", "D")


def resolve_cache_dir(cache_dir: PathLike) -> pathlib.Path:
    """Returns the directory holding plan.json: `cache_dir` itself or its <fingerprint> subfolder.

    When several fingerprints exist (the preprocessing settings or dataset changed), the most
    recently written plan.json wins, with a warning naming the others.
    """
    root = pathlib.Path(cache_dir)
    if (root / "plan.json").is_file():
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"Preprocessed cache {root} does not exist; run the preprocessing "
                                f"first (lidia_jax/data/preprocessing.py).")
    plans = sorted(root.glob("*/plan.json"), key=lambda p: p.stat().st_mtime)
    if not plans:
        raise FileNotFoundError(f"No plan.json in {root} or its subfolders: not a preprocessed "
                                f"cache (expected <cache_dir>/<fingerprint>/plan.json).")
    if len(plans) > 1:
        logging.warning("Cache %s holds %d fingerprints; using the newest, %s (others: %s).",
                        root, len(plans), plans[-1].parent.name,
                        ", ".join(p.parent.name for p in plans[:-1]))
    return plans[-1].parent


def load_plan(cache_dir: PathLike) -> dict:
    """plan.json of the cache (see resolve_cache_dir)."""
    path = resolve_cache_dir(cache_dir) / "plan.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run the preprocessing.") from e


def split_cases(cache_dir: PathLike, split: str) -> List[str]:
    """Case names of `split` ("train", "val", "test") in plan.json order."""
    plan = load_plan(cache_dir)
    splits = plan.get("splits", {})
    if split not in splits:
        raise KeyError(f"{resolve_cache_dir(cache_dir) / 'plan.json'} has no split {split!r}; "
                       f"splits: {sorted(splits)}")
    return list(splits[split])


@dataclasses.dataclass
class Case:
    """One preprocessed case; arrays are read-only memory maps.

    image: float32 [D, H, W, 4]; seg: uint8 [D, H, W] or None (unlabelled); inst: uint16
    [D, H, W] or None; phase_mask: bool [4]; fg_locations: {"lesion", "liver"} -> int32 [N, 3]
    (and, for labelled cases, "lesion_instance", "lesion_class" -> int32 [N]: instance id and
    label code of each lesion location);
    code_table: int32 [K + 1] instance id -> label code; meta: meta.json as a dict, without
    "fg_locations" (held as arrays in fg_locations).
    """
    name: str
    image: np.ndarray
    seg: Optional[np.ndarray]
    inst: Optional[np.ndarray]
    phase_mask: np.ndarray
    fg_locations: Dict[str, np.ndarray]
    code_table: np.ndarray
    meta: Dict[str, Any]
    focus: Optional[int] = None  # lesion class the case was drawn for ("cohort" balance)

    @property
    def shape(self):
        return tuple(self.image.shape[:3])


def load_case(cache_dir: PathLike, name: str, require_labels: bool = False) -> Case:
    """Opens one case of the cache (memory maps) and checks its arrays against meta.json."""
    folder = resolve_cache_dir(cache_dir) / name
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: case {name!r} is listed in plan.json but "
                                f"was not preprocessed completely; re-run the preprocessing.")
    meta = json.loads(meta_path.read_text())
    image = np.load(folder / "image.npy", mmap_mode="r")
    if image.ndim != 4 or image.shape[-1] != 4 or image.dtype != np.float32:
        raise ValueError(f"{folder / 'image.npy'}: expected float32 [D, H, W, 4], got "
                         f"{image.dtype} {image.shape}")
    arrays = {}
    for key, dtype in (("seg", np.uint8), ("inst", np.uint16)):
        path = folder / f"{key}.npy"
        if not path.is_file():
            if require_labels:
                raise FileNotFoundError(f"{path} is missing: training needs labels for case "
                                        f"{name!r}.")
            arrays[key] = None
            continue
        arr = np.load(path, mmap_mode="r")
        if arr.shape != image.shape[:3] or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: expected integer {image.shape[:3]} like image.npy, got "
                             f"{arr.dtype} {arr.shape}")
        arrays[key] = arr
    if arrays["seg"] is not None and arrays["inst"] is None:
        raise FileNotFoundError(f"{folder / 'inst.npy'} is missing although seg.npy exists.")
    phase_mask = np.asarray(meta.get("phase_mask", [True] * 4), bool)
    if phase_mask.shape != (4,):
        raise ValueError(f"{meta_path}: phase_mask must hold 4 booleans (NC, A, V, D), got "
                         f"{meta.get('phase_mask')}")
    instance_classes = meta.get("instance_classes", {}) or {}
    max_id = max([int(k) for k in instance_classes] + [0])
    fg_locations = patches.fg_locations_from_meta(meta, str(meta_path))
    if arrays["inst"] is not None:  # per lesion location: instance id and label code
        where = tuple(fg_locations[patches.LESION].T)
        fg_locations["lesion_instance"] = np.asarray(arrays["inst"][where], np.int32)
        fg_locations["lesion_class"] = np.asarray(arrays["seg"][where], np.int32)
    # Keep the locations only as compact arrays: as JSON lists they cost ~2 MB of Python objects
    # per case, in every worker that caches the case.
    meta = {k: v for k, v in meta.items() if k != "fg_locations"}
    return Case(name=name, image=image, seg=arrays["seg"], inst=arrays["inst"],
                phase_mask=phase_mask, fg_locations=fg_locations,
                code_table=patches.instance_code_table(instance_classes, max_id), meta=meta)


def class_balanced_order(case_classes: Sequence[Sequence[int]]) -> List[Tuple[int, Optional[int]]]:
    """One epoch of (case index, focus class) in which every lesion class is drawn equally often.

    Cases are grouped by the lesion classes they hold (a case with several classes is in several
    groups; cases without lesions form one more group, focus None). Every group fills M slots, M
    the largest group's size, cycling through its cases, so each case appears at least once and a
    class held by 3 cases is drawn as often as one held by 28 (long-tail resampling, as LVIS's
    repeat-factor sampling, taken to equal class frequencies).

    Args:
      case_classes: per case, the label codes of its lesions.
    """
    groups: Dict[Optional[int], List[int]] = {}
    for index, classes in enumerate(case_classes):
        for code in sorted(set(int(c) for c in classes)) or [None]:
            groups.setdefault(code, []).append(index)
    slots = max(len(cases) for cases in groups.values())
    keys = sorted(groups, key=lambda k: (k is None, k if k is not None else 0))
    return [(groups[k][j % len(groups[k])], k) for k in keys for j in range(slots)]


def case_lesion_classes(cache_dir: PathLike, names: Sequence[str]) -> List[List[int]]:
    """Label codes of each case's lesions, from meta.json "instance_classes"."""
    cache = resolve_cache_dir(cache_dir)
    out = []
    for name in names:
        meta = json.loads((cache / name / "meta.json").read_text())
        out.append(sorted({int(c) for c in (meta.get("instance_classes") or {}).values()}))
    return out


class CaseSource:
    """grain random-access source over the cases of one split.

    Items are `Case`s with lazily opened memory maps, cached per process. The cache is dropped on
    pickling, so the source travels to grain worker processes as just a path and a list of names.
    With `order` (class_balanced_order) the items are that epoch's cases, each with its focus class.
    """

    def __init__(self, cache_dir: PathLike, split: str = "train", require_labels: bool = True,
                 order: Optional[Sequence[Tuple[int, Optional[int]]]] = None):
        self._cache = resolve_cache_dir(cache_dir)
        self._names = split_cases(self._cache, split)
        if not self._names:
            raise ValueError(f"Split {split!r} of {self._cache / 'plan.json'} is empty.")
        self._split = split
        self._require_labels = require_labels
        self._order = None if order is None else [(int(i), c) for i, c in order]
        self._opened: Dict[int, Case] = {}

    def __len__(self) -> int:
        return len(self._names) if self._order is None else len(self._order)

    def __getitem__(self, index: int) -> Case:
        focus = None
        if self._order is not None:
            index, focus = self._order[int(index) % len(self._order)]
        index = int(index) % len(self._names)
        case = self._opened.get(index)
        if case is None:
            case = load_case(self._cache, self._names[index], self._require_labels)
            self._opened[index] = case
        return case if focus is None else dataclasses.replace(case, focus=focus)

    @property
    def names(self) -> List[str]:
        return list(self._names)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_opened"] = {}
        return state

    def __repr__(self) -> str:
        return f"CaseSource({str(self._cache)!r}, {self._split!r}, {len(self)} cases)"


class SamplePatch(grain.transforms.RandomMap):
    """Case -> one training example (INTERFACES.md "Batch" without the batch axis).

    Draws a patch (patches.sample_patch_start), reads it through the spatial augmentation, applies
    intensity augmentation and phase dropping, and builds the Mask2Former targets.
    """

    def __init__(self, config, donors: Sequence[Sequence[paste.Donor]] = (),
                 intensity: Optional[Mapping] = None):
        """donors: for lesion copy-paste, the donor lesions grouped by class (lesion_donors);
        intensity: the cache's normalisation (plan.json "intensity"), for synthetic
        calcifications (config.input.synth_calc_prob)."""
        self.patch_size = tuple(int(p) for p in config.input.patch_size)
        self.donors = [list(group) for group in donors if len(group)]
        self.paste_prob = float(config.input.get("paste_prob", 0.0))
        self.calc_prob = synthetic_calc.check(config, intensity)
        if self.calc_prob:
            self.intensity = {k: list(intensity[k]) for k in ("mean", "std", "lo", "hi")}
            self.calc_code = list(config.data.labels).index("calc")
            self.calc_args = (tuple(config.preprocess.target_spacing),
                              tuple(config.input.synth_calc_mm), tuple(config.input.synth_calc_hu))
        self.fg_prob = float(config.input.fg_prob)
        self.jitter = float(config.input.get("fg_jitter", 0.25))
        self.balance = patches.check_balance(str(config.input.get("fg_balance", "voxel")))
        self.max_instances = int(config.data.max_instances)
        aug = config.input.aug
        self.aug = _Attr(aug.to_dict() if hasattr(aug, "to_dict") else aug)
        self.augment = bool(self.aug.get("enabled", True))

    def random_map(self, case: Case, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        start, _ = patches.sample_patch_start(case.shape, self.patch_size, case.fg_locations,
                                              self.fg_prob, self.jitter, rng, self.balance,
                                              case.focus)
        phase_mask = case.phase_mask.copy()
        matrix = shifts = None
        if self.augment:
            matrix = augment.sample_spatial(rng, self.aug)
            shifts = augment.sample_channel_shifts(rng, phase_mask, self.aug)
        image, seg, inst = augment.extract(case.image, case.seg, case.inst, start,
                                           self.patch_size, phase_mask, matrix, shifts)
        code_table = case.code_table
        if self.donors and rng.random() < self.paste_prob:  # a class, then one of its lesions
            group = self.donors[rng.integers(len(self.donors))]
            image, seg, inst, code_table = paste.paste(
                image, seg, inst, phase_mask, code_table, group[rng.integers(len(group))], rng)
        if self.calc_prob and rng.random() < self.calc_prob:  # no draw when off: same stream
            frac, mask, hu = synthetic_calc.draw(rng, *self.calc_args)
            image, seg, inst, code_table = synthetic_calc.insert(
                image, seg, inst, phase_mask, code_table, frac, mask, hu, self.intensity,
                self.calc_code, rng)
        if self.augment:
            image = augment.augment_intensity(image, phase_mask, rng, self.aug)
            image, phase_mask = augment.drop_phases(image, phase_mask, rng,
                                                    float(self.aug.get("phase_drop_prob", 0.0)))
        masks, classes, valid = patches.build_targets(seg, inst, code_table, self.max_instances)
        return {
            "image": image.astype(np.float32, copy=False),
            "phase_mask": phase_mask,
            "semantic": seg.astype(np.int32),
            "masks": masks,
            "classes": classes,
            "valid": valid,
        }


def lesion_donors(cache_dir: PathLike, split: str, config) -> List[List[paste.Donor]]:
    """Donor lesions of config.input.paste_classes (label names) in a split, grouped by class;
    empty when config.input.paste_prob is 0."""
    if float(config.input.get("paste_prob", 0.0)) <= 0.0:
        return []
    labels = list(config.data.labels)
    names = list(config.input.get("paste_classes", ()))
    unknown = [n for n in names if n not in labels[2:]]
    if unknown or not names:
        raise ValueError(f"config.input.paste_classes={tuple(names)}: expected lesion class "
                         f"names among {tuple(labels[2:])}")
    codes = [labels.index(n) for n in names]
    sigma = float(config.input.get("paste_sigma", 0.7))
    groups = {c: [] for c in codes}
    for name in split_cases(cache_dir, split):
        case = load_case(cache_dir, name, require_labels=True)
        for donor in paste.donors_from_case(case.image, case.seg, case.inst, case.phase_mask,
                                            case.code_table, codes, sigma):
            groups[donor.code].append(donor)
    return [groups[c] for c in codes]


class _Attr(dict):
    """dict with attribute access, so augment.py reads a plain dict like a ConfigDict."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _process_index_and_count(process_index, process_count):
    if process_index is None or process_count is None:
        import jax  # lazy: worker processes never need it
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, {process_count}).")
    return int(process_index), int(process_count)


def _ensure_absl_flags_parsed():
    """grain 0.2.18's mp_prefetch reads an absl flag without a fallback, which raises
    UnparsedFlagAccessError outside an absl.app main (tests, notebooks): accept the defaults."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_dataset(cache_dir: PathLike, config, split: str = "train",
                       process_index: Optional[int] = None, process_count: Optional[int] = None,
                       seed: Optional[int] = None) -> grain.MapDataset:
    """Infinite MapDataset of this process's local batches (see the module docstring).

    Each element is a dict (INTERFACES.md "Batch") with leading axis
    B_local = config.input.batch_size // process_count.
    """
    process_index, process_count = _process_index_and_count(process_index, process_count)
    global_batch = int(config.input.batch_size)
    if global_batch % process_count:
        raise ValueError(f"config.input.batch_size={global_batch} is not divisible by the "
                         f"{process_count} processes.")
    seed = int(config.seed if seed is None else seed)
    order = None
    if patches.check_balance(str(config.input.get("fg_balance", "voxel"))) == "cohort":
        order = class_balanced_order(case_lesion_classes(cache_dir, split_cases(cache_dir, split)))
    ds = (grain.MapDataset.source(CaseSource(cache_dir, split, require_labels=True, order=order))
          .seed(seed)
          .shuffle()
          .repeat()
          .random_map(SamplePatch(config, lesion_donors(cache_dir, split, config),
                                  load_plan(cache_dir).get("intensity"))))
    # Shard after random_map: element i's random draws depend on its global index only.
    ds = ds[process_index::process_count]
    return ds.batch(global_batch // process_count, drop_remainder=True)


class TrainIterator(grain.DatasetIterator):
    """Iterator over the local batches of make_train_dataset, resumable at any step.

    The state is just the global step, {"step": k}: batch k is a pure function of k (see the module
    docstring), so a state restores exactly under any number of workers or processes (grain's own
    mp_prefetch state is tied to the worker count). Orbax saves it through
    grain.checkpoint.CheckpointSave / CheckpointRestore like any grain DatasetIterator.
    """

    def __init__(self, dataset: grain.MapDataset, read_options: grain.ReadOptions,
                 num_workers: int = 0, worker_buffer_size: int = 1):
        super().__init__()
        self._dataset = dataset
        self._read_options = read_options
        self._num_workers = int(num_workers)
        self._worker_buffer_size = int(worker_buffer_size)
        self._step = 0
        self._inner = None

    def _open(self):
        it_ds = self._dataset[self._step:].to_iter_dataset(self._read_options)
        if self._num_workers > 0:
            _ensure_absl_flags_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._num_workers, per_worker_buffer_size=self._worker_buffer_size))
        self._inner = iter(it_ds)

    def __next__(self) -> Dict[str, np.ndarray]:
        if self._inner is None:
            self._open()
        batch = next(self._inner)
        self._step += 1
        return batch

    def get_state(self) -> Dict[str, int]:
        return {"step": self._step}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if "step" not in state:
            raise ValueError(f"Not a lidia_jax input-pipeline state (expected {{'step': k}}): "
                             f"{state}")
        self.close()
        self._step = int(state["step"])

    def start_prefetch(self) -> None:
        if self._inner is None:
            self._open()
        self._inner.start_prefetch()

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None


def make_train_iterator(cache_dir: PathLike, config, split: str = "train",
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None,
                        seed: Optional[int] = None) -> TrainIterator:
    """Iterator of local training batches; `get_state()` / `set_state()` resume it exactly.

    Workers: config.input.num_workers processes (0: in-process, read by
    config.input.read_threads threads); config.input.prefetch batches are buffered (per worker).
    The state also saves with orbax: `ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(
    it))`, restored with `grain.checkpoint.CheckpointRestore(it)` into a fresh iterator.
    Close it (`it.close()`) when done if num_workers > 0.
    """
    ds = make_train_dataset(cache_dir, config, split, process_index, process_count, seed)
    prefetch = max(int(config.input.get("prefetch", 2)), 1)
    read = grain.ReadOptions(num_threads=max(int(config.input.get("read_threads", 1)), 1),
                             prefetch_buffer_size=prefetch)
    return TrainIterator(ds, read, int(config.input.num_workers), prefetch)


def make_eval_cases(cache_dir: PathLike, split: str = "val",
                    max_cases: int = -1) -> List[Case]:
    """The cases of `split` as memory-mapped `Case`s (labels None where the case has none).

    max_cases > 0 keeps the first max_cases of plan.json's order (config.train.eval_max_cases).
    """
    names = split_cases(cache_dir, split)
    if max_cases is not None and max_cases > 0:
        names = names[:max_cases]
    return [load_case(cache_dir, n, require_labels=False) for n in names]
