"""Generates the synthetic multi-phase liver CT cohort (lidia_jax.data.synthetic).

  python scripts/make_synthetic_cohort.py --out /tmp/syn_demo --cases 100 --seed 0 \
      --size demo --workers 2

Writes the data-contract layout (dataset.json, imagesTr/imagesTs, labelsTr/labelsTs,
instancesTr/instancesTs) and summary.json, then prints timing, voxel sizes and disk use.
"""

import argparse
import collections
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from lidia_jax.data import synthetic  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(synthetic.SIZES), default="demo")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    out = synthetic.make_cohort(args.out, args.cases, args.seed, size=args.size,
                                test_fraction=args.test_fraction, workers=args.workers)
    elapsed = time.perf_counter() - t0

    summary = json.loads((out / "summary.json").read_text())["cases"]
    infos = list(summary.values())
    spacing = np.array([i["canonical_spacing"] for i in infos])
    shape = np.array([i["canonical_shape"] for i in infos])
    lesions = collections.Counter(l["cls"] for i in infos for l in i["lesions"])
    patients = collections.Counter(c for i in infos for c in i["lesion_classes"])
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    per_case = np.array([i["seconds"] for i in infos])
    print(f"wrote {len(infos)} cases to {out} in {elapsed:.1f} s "
          f"({args.workers} worker(s); {per_case.mean():.2f} s per case in a worker, "
          f"max {per_case.max():.2f} s)")
    print(f"  train {sum(i['split'] == 'Tr' for i in infos)}, test "
          f"{sum(i['split'] == 'Ts' for i in infos)}; without D: "
          f"{sum('D' not in i['phases'] for i in infos)}; non-identity direction: "
          f"{sum(i['orientation'] != 'identity' for i in infos)}; a phase on another grid: "
          f"{sum(i['regrid'] is not None for i in infos)}")
    print("  voxel size (z, y, x) mm: min " + str(np.round(spacing.min(0), 2).tolist())
          + " max " + str(np.round(spacing.max(0), 2).tolist()))
    print("  volume (D, H, W) voxels: min " + str(shape.min(0).tolist()) + " max "
          + str(shape.max(0).tolist()))
    print("  lesions per class: " + ", ".join(
        f"{c} {lesions[c]}" for c in synthetic.LESION_CLASSES)
          + f" (total {sum(lesions.values())})")
    print("  patients per class: " + ", ".join(
        f"{c} {patients[c]}" for c in synthetic.LESION_CLASSES))
    print(f"  disk: {disk / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    main()
