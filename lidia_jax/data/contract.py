"""Reading a dataset that follows the data contract (shared/spec/dataset_format.md).

Layout (nnU-Net raw format, one file per phase):
  DATASET/dataset.json
  DATASET/imagesTr/CASE_0000<ending> .. CASE_0003<ending>   NC, A, V, D (D optional)
  DATASET/labelsTr/CASE<ending>     semantic label codes on the venous grid
  DATASET/instancesTr/CASE<ending>  optional lesion instance ids on the venous grid
  DATASET/imagesTs/, labelsTs/, instancesTs/                 held-out cases, same layout

`read_dataset` only lists files and parses dataset.json (DatasetError if that is broken);
per-case problems surface in `load_case` as CaseError(file, message), so that one bad case never
stops a cohort.
"""

import dataclasses
import gzip
import json
import os
import pathlib
import re
import struct
import zlib
from typing import Dict, Iterable, List, Mapping, Optional, Union

import numpy as np
import scipy.ndimage as ndi
import SimpleITK as sitk

from lidia_jax.data import geometry as geo

PHASES = ("NC", "A", "V", "D")
REQUIRED_PHASES = ("NC", "A")  # unless missing phases are allowed; V is always required
REFERENCE_PHASE = "V"
FIRST_LESION_CODE = 2  # 0 background, 1 liver, 2..9 lesions
MAX_LABEL_CODE = 9
KNOWN_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
SPLIT_DIRS = {"Tr": ("imagesTr", "labelsTr", "instancesTr"),
              "Ts": ("imagesTs", "labelsTs", "instancesTs")}

PathLike = Union[str, pathlib.Path]


class DatasetError(Exception):
    """The dataset as a whole is unusable (dataset.json missing or malformed, no cases)."""

    def __init__(self, file: PathLike, message: str):
        self.file = str(file)
        self.message = message
        super().__init__(f"{file}: {message}")


class CaseError(Exception):
    """One case is unusable; `file` is the file at fault, `message` what is wrong with it."""

    def __init__(self, file: PathLike, message: str):
        self.file = str(file)
        self.message = message
        super().__init__(f"{file}: {message}")

    def __reduce__(self):  # picklable across the preprocessing process pool
        return (CaseError, (self.file, self.message))


@dataclasses.dataclass
class CaseFiles:
    """The files of one case. phases: {"NC"|"A"|"V"|"D": path or None}.

    image_dir and file_ending say where an absent phase would have been (for error messages).
    """

    name: str
    phases: Dict[str, Optional[pathlib.Path]]
    label: Optional[pathlib.Path] = None
    instance: Optional[pathlib.Path] = None
    image_dir: Optional[pathlib.Path] = None
    file_ending: str = ".nii.gz"

    def expected_path(self, phase: str, channel: int) -> str:
        folder = self.image_dir if self.image_dir is not None else pathlib.Path(".")
        return str(folder / f"{self.name}_{channel:04d}{self.file_ending}")

    def files(self) -> List[pathlib.Path]:
        """Every file of the case that exists (phases, label, instances)."""
        out = [p for p in self.phases.values() if p is not None]
        return out + [p for p in (self.label, self.instance) if p is not None]


@dataclasses.dataclass
class Dataset:
    """A parsed dataset. cases: {"Tr": [CaseFiles], "Ts": [CaseFiles]} sorted by name.

    labels: {name: code}; channel_names: {channel index: phase key}.
    """

    root: pathlib.Path
    labels: Dict[str, int]
    file_ending: str
    channel_names: Dict[int, str]
    cases: Dict[str, List[CaseFiles]]
    name: str = ""

    @property
    def phase_channels(self) -> Dict[str, int]:
        return {phase: ch for ch, phase in self.channel_names.items()}


@dataclasses.dataclass
class LoadedCase:
    """One case in memory, on the venous grid, in canonical orientation.

    images:      {phase: float32 [D, H, W] in HU, or None when absent (or dropped)}
    label:       uint8 [D, H, W] label codes, or None (unlabelled case)
    instances:   uint16 [D, H, W] lesion ids 0..K, or None (unlabelled case)
    instance_classes: {instance id: label code} (majority lesion code of each instance)
    phase_mask:  bool [4], order NC, A, V, D
    spacing:     canonical voxel spacing (z, y, x) mm
    original:    the venous file's grid record (geometry.grid_of), SimpleITK (x, y, z) order
    canonical:   geometry.canonical_orientation(original): what was done to the arrays
    """

    name: str
    images: Dict[str, Optional[np.ndarray]]
    label: Optional[np.ndarray]
    instances: Optional[np.ndarray]
    instance_classes: Dict[int, int]
    phase_mask: np.ndarray
    spacing: List[float]
    original: dict
    canonical: dict
    files: CaseFiles

    def reference_image(self) -> sitk.Image:
        """An empty image with the venous input's exact geometry."""
        return geo.reference_image(self.original)

    @property
    def phases(self) -> List[str]:
        return [p for p, m in zip(PHASES, self.phase_mask) if m]


# ------------------------------------------------------------------------ dataset.json


def _read_dataset_json(root: pathlib.Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(path, "dataset.json is missing (see shared/spec/dataset_format.md)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise DatasetError(path, "must hold a JSON object")
    for key in ("labels", "channel_names", "file_ending"):
        if key not in meta:
            raise DatasetError(path, f"required key {key!r} is missing")
    return meta


def _parse_labels(path, labels) -> Dict[str, int]:
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(path, '"labels" must be an object {name: code}')
    out = {}
    for name, code in labels.items():
        if isinstance(code, bool) or not isinstance(code, int):
            raise DatasetError(path, f'label {name!r}: code {code!r} is not an integer '
                               '(region-based labels are not supported)')
        if not 0 <= code <= MAX_LABEL_CODE:
            raise DatasetError(path, f"label {name!r}: code {code} outside 0..{MAX_LABEL_CODE} "
                               "of the contract")
        out[str(name)] = code
    if len(set(out.values())) != len(out):
        raise DatasetError(path, f'"labels" codes are not unique: {labels}')
    if out.get("background") != 0:
        raise DatasetError(path, '"labels" must map "background" to 0')
    return out


def _parse_channels(path, channel_names) -> Dict[int, str]:
    if not isinstance(channel_names, dict) or not channel_names:
        raise DatasetError(path, '"channel_names" must be an object {"0": "NC", ...}')
    out = {}
    for key, phase in channel_names.items():
        try:
            ch = int(key)
        except (TypeError, ValueError):
            raise DatasetError(path, f"channel_names key {key!r} is not a channel index") from None
        if phase not in PHASES:
            raise DatasetError(path, f"channel {key}: phase {phase!r} is not one of {PHASES}")
        out[ch] = phase
    if len(set(out.values())) != len(out):
        raise DatasetError(path, f'"channel_names" names a phase twice: {channel_names}')
    if REFERENCE_PHASE not in out.values():
        raise DatasetError(path, 'channel_names lacks the venous phase "V" (the reference grid)')
    return out


def _split_phase_name(filename: str, file_ending: str):
    """'CASE_0002.nii.gz' -> ('CASE', 2), or None when the name does not follow the layout."""
    if not filename.endswith(file_ending):
        return None
    m = re.fullmatch(r"(.+)_(\d{4})", filename[: -len(file_ending)])
    return (m.group(1), int(m.group(2))) if m else None


def read_dataset(root: PathLike) -> Dataset:
    """Parses DATASET/dataset.json and lists the cases of imagesTr and imagesTs.

    Raises DatasetError (naming the file) for a missing or malformed dataset.json, an image file
    whose channel index dataset.json does not declare, or a dataset without any case. Files of
    other endings (e.g. .DS_Store) are ignored.
    """
    root = pathlib.Path(root)
    meta = _read_dataset_json(root)
    json_path = root / "dataset.json"
    labels = _parse_labels(json_path, meta["labels"])
    channels = _parse_channels(json_path, meta["channel_names"])
    ending = meta["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DatasetError(json_path, f'"file_ending" {ending!r} must look like ".nii.gz"')

    cases: Dict[str, List[CaseFiles]] = {}
    for split, (img_dir, lab_dir, inst_dir) in SPLIT_DIRS.items():
        folder = root / img_dir
        found: Dict[str, Dict[str, pathlib.Path]] = {}
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                parsed = _split_phase_name(f.name, ending)
                if parsed is None:
                    continue
                name, ch = parsed
                if ch not in channels:
                    raise DatasetError(f, f"channel {ch:04d} is not declared in dataset.json "
                                       f"channel_names {sorted(channels)}")
                found.setdefault(name, {})[channels[ch]] = f
        split_cases = []
        for name in sorted(found):
            label = root / lab_dir / f"{name}{ending}"
            inst = root / inst_dir / f"{name}{ending}"
            split_cases.append(CaseFiles(
                name=name,
                phases={p: found[name].get(p) for p in PHASES},
                label=label if label.is_file() else None,
                instance=inst if inst.is_file() else None,
                image_dir=folder, file_ending=ending))
        cases[split] = split_cases
    if not cases["Tr"] and not cases["Ts"]:
        raise DatasetError(root, f"no case found: expected imagesTr/CASE_0002{ending} "
                           f"(file_ending {ending!r} from dataset.json)")
    return Dataset(root=root, labels=labels, file_ending=ending, channel_names=channels,
                   cases=cases, name=str(meta.get("name", "")))


def find_case_files(paths: Union[Iterable[PathLike], Mapping[str, PathLike]],
                    channel_names: Optional[Mapping[int, str]] = None) -> CaseFiles:
    """Groups loose phase files of one case for prediction.

    paths: {"NC": path, "A": path, "V": path, ...}, or file paths named CASE_000c<ending>
    (c = channel index, default mapping 0 NC, 1 A, 2 V, 3 D). Raises CaseError for a file that
    does not follow the naming, a phase given twice, or files of different cases.
    """
    channels = dict(channel_names) if channel_names else dict(enumerate(PHASES))
    if isinstance(paths, Mapping):
        phases = {}
        for phase, p in paths.items():
            if phase not in PHASES:
                raise CaseError(p, f"unknown phase {phase!r}; expected one of {PHASES}")
            phases[phase] = pathlib.Path(p)
        v = phases.get(REFERENCE_PHASE) or next(iter(phases.values()), pathlib.Path("case"))
        ending = next((e for e in KNOWN_ENDINGS if v.name.endswith(e)), v.suffix)
        parsed = _split_phase_name(v.name, ending)
        name = parsed[0] if parsed else v.name[: len(v.name) - len(ending)]
        return CaseFiles(name=name, phases={p: phases.get(p) for p in PHASES},
                         image_dir=v.parent, file_ending=ending)

    name, ending, folder, phases = None, None, None, {}
    for p in map(pathlib.Path, paths):
        e = next((e for e in KNOWN_ENDINGS if p.name.endswith(e)), None)
        parsed = _split_phase_name(p.name, e) if e else None
        if parsed is None:
            raise CaseError(p, "expected a file named CASE_000c with c the channel index "
                            f"(0 NC, 1 A, 2 V, 3 D) and one of the endings {KNOWN_ENDINGS}")
        case, ch = parsed
        if ch not in channels:
            raise CaseError(p, f"channel {ch:04d} is not one of {sorted(channels)}")
        if name is not None and case != name:
            raise CaseError(p, f"belongs to case {case!r}, the other files to {name!r}")
        if channels[ch] in phases:
            raise CaseError(p, f"phase {channels[ch]} given twice (also {phases[channels[ch]]})")
        name, ending, folder = case, e, p.parent
        phases[channels[ch]] = p
    if name is None:
        raise CaseError("<no files>", "no phase file given")
    return CaseFiles(name=name, phases={p: phases.get(p) for p in PHASES}, image_dir=folder,
                     file_ending=ending)


# ------------------------------------------------------------------------ one case


def _read(path: pathlib.Path) -> sitk.Image:
    """Reads a 3-D scalar image; CaseError for unreadable, truncated, 2-D, 4-D or vector files."""
    try:
        image = sitk.ReadImage(str(path))
    except Exception as e:  # sitk raises RuntimeError with ITK's multi-line message
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in reversed(lines) if "rror" in line or "ead" in line),
                      lines[-1] if lines else type(e).__name__)
        raise CaseError(path, f"cannot read the file (unreadable or truncated): {detail}") from None
    if image.GetDimension() != 3:
        raise CaseError(path, f"expected a 3-D volume, got a {image.GetDimension()}-D image of "
                        f"size {image.GetSize()}")
    problem = check_nifti_data(path)
    if problem is not None:
        if "NaN" in problem:
            raise CaseError(path, problem)
        raise CaseError(path, f"cannot read the file (unreadable or truncated): {problem}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(path, f"expected one value per voxel, got "
                        f"{image.GetNumberOfComponentsPerPixel()} components")
    return image


_NIFTI_FLOAT_TYPES = {16: np.float32, 64: np.float64}


def _gzip_isize(path: pathlib.Path) -> int:
    """The uncompressed length mod 2^32 that a gzip trailer records (garbage if truncated)."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def check_nifti_data(path: pathlib.Path) -> Optional[str]:
    """Checks the voxel data of a .nii / .nii.gz file that ITK has already parsed.

    ITK's NIfTI reader zero-fills a truncated file and turns NaN / inf into 0 without a word,
    which would pass a corrupt scan off as valid (0 HU is water). Returns what is wrong, or None.
    Integer data (the usual CT storage) only needs the file size (.nii) or the gzip trailer's
    length (.nii.gz); float data is streamed once more to count NaN / inf.
    """
    name = path.name
    if not name.endswith((".nii", ".nii.gz")):
        return None
    gz = name.endswith(".gz")
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            head = f.read(540)
            for order in "<>":
                if len(head) >= 4 and struct.unpack(order + "i", head[:4])[0] in (348, 540):
                    break
            else:
                return None  # not a header we know: leave it to ITK
            if struct.unpack(order + "i", head[:4])[0] == 348:  # NIfTI-1
                dims = struct.unpack(order + "8h", head[40:56])
                datatype, bitpix = struct.unpack(order + "2h", head[70:74])
                offset = int(struct.unpack(order + "f", head[108:112])[0])
            else:  # NIfTI-2
                datatype, bitpix = struct.unpack(order + "2h", head[12:16])
                dims = struct.unpack(order + "8q", head[16:80])
                offset = struct.unpack(order + "q", head[168:176])[0]
            count = int(np.prod(dims[1:1 + max(0, min(int(dims[0]), 7))]))
            needed = count * bitpix // 8
            dtype = (np.dtype(_NIFTI_FLOAT_TYPES[datatype]).newbyteorder(order)
                     if datatype in _NIFTI_FLOAT_TYPES else None)
            if not gz and dtype is None:
                got = max(0, path.stat().st_size - offset)
            elif dtype is None and _gzip_isize(path) == (offset + needed) % 2**32:
                got = needed  # the gzip trailer vouches for the length: no second decompression
            else:
                f.seek(offset)
                got, nonfinite, carry = 0, 0, b""
                while got < needed:
                    chunk = f.read(min(1 << 24, needed - got))
                    if not chunk:
                        break
                    got += len(chunk)
                    if dtype is not None:
                        buf = carry + chunk
                        usable = len(buf) - len(buf) % dtype.itemsize
                        carry = buf[usable:]
                        vals = np.frombuffer(buf[:usable], dtype=dtype)
                        nonfinite += int(vals.size - np.count_nonzero(np.isfinite(vals)))
                if dtype is not None and nonfinite:
                    return f"{nonfinite} voxels are NaN or inf"
    except (EOFError, OSError, zlib.error, struct.error) as e:
        return f"truncated or corrupt file ({e})"
    if got < needed:
        return f"truncated file: {got} bytes of voxel data where the header needs {needed}"
    return None


def _integer_array(image: sitk.Image, path, what: str) -> np.ndarray:
    arr = sitk.GetArrayFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise CaseError(path, f"{what} holds NaN or inf values")
        if not np.array_equal(arr, np.round(arr)):
            raise CaseError(path, f"{what} holds non-integer values")
    return arr


def connected_instances(label: np.ndarray) -> np.ndarray:
    """Lesion instances without an instance file: each 26-connected component of one lesion class.

    label: int [D, H, W] label codes -> uint16 [D, H, W] ids 1..K (class by class, in code order).
    """
    inst = np.zeros(label.shape, np.uint16)
    next_id = 1
    structure = np.ones((3, 3, 3), bool)
    for code in np.unique(label):
        if code < FIRST_LESION_CODE:
            continue
        comp, n = ndi.label(label == code, structure=structure)
        inst[comp > 0] = (comp[comp > 0] + next_id - 1).astype(np.uint16)
        next_id += n
    return inst


def instance_classes(instances: np.ndarray, label: np.ndarray) -> Dict[int, int]:
    """{instance id: majority lesion label code over the instance's voxels}.

    Only lesion codes (>= 2) vote, so an instance drawn a little over the liver boundary keeps its
    lesion class; instances without any lesion voxel are left out. Ties go to the smaller code.
    """
    out = {}
    sel = (instances > 0) & (label >= FIRST_LESION_CODE)
    if not sel.any():
        return out
    ids, codes = instances[sel].astype(np.int64), label[sel].astype(np.int64)
    counts = np.zeros((int(ids.max()) + 1, MAX_LABEL_CODE + 1), np.int64)
    np.add.at(counts, (ids, codes), 1)
    for i in np.nonzero(counts.sum(1))[0]:
        out[int(i)] = int(np.argmax(counts[i]))
    return out


def load_case(case_files: CaseFiles, dataset: Optional[Dataset] = None,
              allow_missing_phases: bool = False, drop_delayed: bool = False) -> LoadedCase:
    """Reads, checks and aligns one case (see LoadedCase for what comes back).

    Phases on another grid are resampled onto the venous grid by physical coordinates; then all
    arrays are put in canonical orientation. dataset gives the allowed label codes (default: the
    contract's 0..9). Raises CaseError(file, message) for: a missing required phase (NC and A
    unless allow_missing_phases; V always), an unreadable or truncated file, a 2-D or 4-D image,
    NaN or inf voxels, a label or instance file whose grid differs from the venous phase, label
    values outside dataset.json. A missing delayed phase is normal; drop_delayed discards it.
    """
    required = (REFERENCE_PHASE,) if allow_missing_phases else REQUIRED_PHASES + (REFERENCE_PHASE,)
    for ch, phase in enumerate(PHASES):
        if phase in required and case_files.phases.get(phase) is None:
            raise CaseError(case_files.expected_path(phase, ch),
                            f"required phase {phase} of case {case_files.name!r} is missing")
    allowed = (sorted(dataset.labels.values()) if dataset is not None
               else list(range(MAX_LABEL_CODE + 1)))

    venous_path = case_files.phases[REFERENCE_PHASE]
    venous = _read(venous_path)
    original = geo.grid_of(venous)
    canonical = geo.canonical_orientation(original)

    images: Dict[str, Optional[np.ndarray]] = {}
    for phase in PHASES:
        path = case_files.phases.get(phase)
        if path is None or (drop_delayed and phase == "D"):
            images[phase] = None
            continue
        image = venous if phase == REFERENCE_PHASE else _read(path)
        arr = sitk.GetArrayViewFromImage(image)
        # Checked before resampling, which would smear them (NIfTI: see check_nifti_data).
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        del arr
        if bad:
            raise CaseError(path, f"{bad} voxels are NaN or inf")
        image = geo.resample_to_reference(sitk.Cast(image, sitk.sitkFloat32), venous)
        images[phase] = geo.to_canonical(sitk.GetArrayFromImage(image).astype(np.float32),
                                         canonical)

    label = instances = None
    classes: Dict[int, int] = {}
    if case_files.label is not None:
        lab_img = _read(case_files.label)
        if not geo.same_grid(geo.grid_of(lab_img), original):
            raise CaseError(case_files.label, "label grid differs from the venous phase "
                            f"{venous_path.name}: {geo.describe_grid(geo.grid_of(lab_img))} vs "
                            f"{geo.describe_grid(original)}")
        lab = _integer_array(lab_img, case_files.label, "the label map")
        bad = np.setdiff1d(np.unique(lab), allowed)
        if bad.size:
            raise CaseError(case_files.label, f"label values {bad.tolist()} are not in "
                            f"dataset.json labels {allowed}")
        label = geo.to_canonical(lab.astype(np.uint8), canonical)
        if case_files.instance is not None:
            inst_img = _read(case_files.instance)
            if not geo.same_grid(geo.grid_of(inst_img), original):
                raise CaseError(case_files.instance, "instance grid differs from the venous "
                                f"phase {venous_path.name}")
            inst = _integer_array(inst_img, case_files.instance, "the instance map")
            if inst.min() < 0 or inst.max() > np.iinfo(np.uint16).max:
                raise CaseError(case_files.instance, "instance ids must lie in 0..65535")
            instances = geo.to_canonical(inst.astype(np.uint16), canonical)
            # Lesion voxels the instance file leaves at 0 would vanish from the lesion targets:
            # they become instances of their own, one per connected component and class.
            loose = (label >= FIRST_LESION_CODE) & (instances == 0)
            if loose.any():
                extra = connected_instances(np.where(loose, label, 0))
                instances[loose] = extra[loose] + int(instances.max())
        else:
            instances = connected_instances(label)
        classes = instance_classes(instances, label)
        # Instances without lesion voxels carry no class: drop them rather than guess one.
        orphan = (instances > 0) & ~np.isin(instances, list(classes))
        if orphan.any():
            instances[orphan] = 0

    phase_mask = np.array([images[p] is not None for p in PHASES], bool)
    return LoadedCase(name=case_files.name, images=images, label=label, instances=instances,
                      instance_classes=classes, phase_mask=phase_mask,
                      spacing=list(canonical["spacing"]), original=original,
                      canonical=canonical, files=case_files)
