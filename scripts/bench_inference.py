r"""Inference time and peak memory of one preprocessed volume (sliding window -> diagnosis).

  python scripts/bench_inference.py --config=demo --shape=60,110,120
  python scripts/bench_inference.py --config=demo --shape=300,512,512 --predictor=toy
  python scripts/bench_inference.py --config=demo --shape=60,110,120 --shape=300,512,512

--predictor=model runs the network of --config with random parameters (the cost does not depend
on the values); --predictor=toy replaces the network by a cheap jitted function of the tile, to
measure everything else (tiling, host accumulation, post-processing, LiverMax) and the memory of
a large volume; the network time is then (tiles / tile_batch) x the per-batch time measured
with --predictor=model. Peak memory is the process's maximum resident set size (ru_maxrss),
which includes the input volume and JAX/XLA. Prints one JSON line.
"""

import argparse
import json
import os
import pathlib
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from lidia_jax.inference import diagnose
from lidia_jax.config_file import load_config
from lidia_jax.inference import semantic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def random_variables(model, patch, seed=0):
    """Parameters of the right shapes, fan-in-scaled normals, without compiling model.init."""
    image = np.zeros((1,) + tuple(patch) + (4,), np.float32)
    shapes = jax.eval_shape(lambda r: model.init(r, image, np.ones((1, 4), bool), train=False),
                            jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = str(path[-1])
        if "scale" in name:
            return np.ones(x.shape, x.dtype)
        if "bias" in name:
            return np.zeros(x.shape, x.dtype)
        return (rng.normal(size=x.shape) / np.sqrt(max(1, int(np.prod(x.shape[:-1]))))
                ).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def toy_tile_predictor(variables, tiles, phase_mask):
    """Liver / lesion by thresholds on the venous channel: cheap, deterministic."""
    v = tiles[..., 2]
    code = jnp.where(v < -0.75, 0, jnp.where(v < 1.0, 1, 2))
    return jax.nn.one_hot(code, 10) * 0.9 + 0.01, None


def synthetic_volume(shape, seed=0):
    """[D, H, W, 4] float32: background, a liver ellipsoid and a few brighter lesions."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.ogrid[:d, :h, :w]
    liver = (((z - d / 2) / (0.35 * d)) ** 2 + ((y - h / 2) / (0.3 * h)) ** 2
             + ((x - w / 2) / (0.3 * w)) ** 2) <= 1
    v = np.full(shape, -1.5, np.float32)
    v[liver] = 0.0
    for _ in range(4):
        c = rng.uniform(0.35, 0.65, 3) * np.array(shape)
        r = rng.uniform(0.03, 0.08) * min(shape)
        v[((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) <= r * r] = 2.0
    image = np.zeros(shape + (4,), np.float32)
    image[..., :3] = v[..., None] + rng.normal(0, 0.1, shape + (1,)).astype(np.float32)
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--shape", action="append",
                        help="preprocessed D,H,W; repeat for several volumes (one compile)")
    parser.add_argument("--predictor", choices=("model", "toy"), default="model")
    parser.add_argument("--spacing", default="4,3,3", help="mm, z,y,x of the preprocessed grid")
    args = parser.parse_args()
    config = load_config(args.config)
    shapes = [tuple(int(s) for s in a.split(",")) for a in (args.shape or ["60,110,120"])]
    spacing = tuple(float(s) for s in args.spacing.split(","))

    t0 = time.perf_counter()
    if args.predictor == "model":
        from lidia_jax.model import build_model

        model = build_model(config.model)
        variables = random_variables(model, config.input.patch_size)
        predictor = semantic.model_tile_predictor(model, config)
    else:
        variables, predictor = {}, toy_tile_predictor
    tile_fn = semantic.bind(predictor, variables)
    tiles = np.zeros((config.inference.tile_batch,) + tuple(config.input.patch_size) + (4,),
                     np.float32)
    mask = np.ones((config.inference.tile_batch, 4), bool)
    jax.block_until_ready(tile_fn(tiles, mask))  # compile
    t_compile = time.perf_counter() - t0
    t1 = time.perf_counter()
    jax.block_until_ready(tile_fn(tiles, mask))
    t_batch = time.perf_counter() - t1

    for shape in shapes:
        image = synthetic_volume(shape)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        t2 = time.perf_counter()
        diag = diagnose.diagnose_volume(image, [True, True, True, False], tile_fn, spacing,
                                        config)
        total = time.perf_counter() - t2
        out = {
            "config": args.config, "predictor": args.predictor, "shape": shape,
            "patch": tuple(config.input.patch_size), "tile_batch": config.inference.tile_batch,
            "tiles": diag.seconds["tiles"], "compile_s": round(t_compile, 2),
            "seconds_per_tile_batch": round(t_batch, 4),
            "sliding_window_s": round(diag.seconds["sliding_window"], 2),
            "postprocess_s": round(diag.seconds["postprocess"], 2),
            "patient_score_s": round(diag.seconds["patient_score"], 2),
            "total_s": round(total, 2), "lesions": len(diag.lesions),
            "input_gib": round(image.nbytes / 2**30, 3),
            "probs_gib": round(diag.probs.nbytes / 2**30, 3),
            "peak_rss_before_gib": round(rss_before, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "backend": jax.default_backend(), "load_avg": os.getloadavg(),
        }
        print(json.dumps(out), flush=True)
        del image, diag


if __name__ == "__main__":
    main()
