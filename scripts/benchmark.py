r"""Benchmarks of lidia_jax (issue 7): training step, U-Net vs nnU-Net, inference, Hungarian.

  python scripts/benchmark.py --out bench/                       # everything, defaults
  python scripts/benchmark.py --only train --configs smoke demo paper --repeats 10
  python scripts/benchmark.py --only inference --shapes 60,90,110 300,512,512
  python scripts/benchmark.py --quick --out /tmp/bench           # smoke config, 1 repeat

Sections (--only picks some):
  train      step time, samples/s and peak memory of the real jitted, donated training step
             (trainer.make_init / make_train_step, the trainer's mesh and shardings) on
             fake batches in the pipeline's layout, per config (smoke, demo; paper when a GPU is
             present).
  unet       the JAX U-Net vs nnU-Net's PyTorch PlainConvUNet (scripts/benchmark_unet.py).
  inference  sliding-window diagnosis (tiles -> Gaussian blending -> post-processing ->
             patient score) of one preprocessed volume per --shapes entry at the demo config
             with random parameters (speed does not depend on their values): seconds per case,
             voxels per second, peak memory. On a CPU, volumes above --cpu-max-voxels are not
             run through the network (hours on 2 cores): everything but the network is
             measured with a cheap stand-in predictor and the network time is estimated as
             (tile batches) x (measured seconds per tile batch); the row says "estimated".
  hungarian  lidia_jax.matching.hungarian (jitted single [50, M], vmapped batch of 2) vs
             scipy.optimize.linear_sum_assignment, microseconds per call.

Every figure is the median of --repeats timed runs after --warmup untimed ones (the first
warm-up run includes compilation, reported separately). Each (section, setting) runs in its
own child process by default so that peak memory belongs to that setting alone: on a GPU the
device's peak_bytes_in_use, on a CPU the process's maximum resident set size (ru_maxrss, which
includes Python, JAX/XLA and the input arrays). Writes OUT/benchmark.json and OUT/benchmark.md.
"""

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
from lidia_jax.config_file import load_config  # noqa: E402
SECTIONS = ("train", "unet", "inference", "hungarian")
DEFAULT_SHAPES = ("60,90,110", "300,512,512")  # preprocessed (D, H, W) voxels
HUNGARIAN_QUERIES = 50
HUNGARIAN_TARGETS = (1, 2, 5, 10, 20)
INFERENCE_SPACING = (4.0, 3.0, 3.0)  # mm, the demo config's target spacing


# --------------------------------------------------------------------------- helpers


def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median_timing(fn, repeats, warmup, block):
    """Runs fn() warmup + repeats times; returns (first-call seconds, [timed seconds])."""
    first = None
    for i in range(max(1, warmup)):
        t0 = time.perf_counter()
        block(fn())
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return first, times


def peak_memory():
    """{"peak_device_bytes": GPU/TPU peak or None, "peak_rss_bytes": process peak}."""
    import jax

    device = jax.devices()[0]
    peak_device = None
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        peak_device = stats.get("peak_bytes_in_use")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return {"peak_device_bytes": peak_device, "peak_rss_bytes": int(rss)}


def cpu_model():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment():
    """Devices, backend and host of this run (what every table is conditional on)."""
    import jax
    import jaxlib

    devices = jax.devices()
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git_commit": commit,
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in devices],
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        # glibc's malloc tunables: huge pages make a CPU step ~20% faster (lidia_jax/huge_pages).
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------- train


def bench_train(config_arg, repeats, warmup):
    """Training step of `config_arg` on the trainer's mesh: seconds, samples/s, memory."""
    import flax.linen as nn
    import jax

    from lidia_jax import model as model_lib
    from lidia_jax.data.fake_batch import fake_batch
    from lidia_jax.train import optimizer as optimizer_lib
    from lidia_jax.train import sharding as sharding_lib
    from lidia_jax.train import trainer

    config = load_config(config_arg)
    mesh = sharding_lib.make_mesh(config.train.mesh_axes)
    num_steps = trainer.num_train_steps(config)
    model = model_lib.build_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optim, num_steps)
    init = trainer.make_init(model, tx, config)
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding_lib.state_shardings(boxed, mesh, config.train.param_sharding,
                                             model_lib.LOGICAL_AXIS_RULES)
    t0 = time.perf_counter()
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(
        jax.random.key(config.seed))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    data_sharding = sharding_lib.batch_sharding(mesh)
    step = trainer.jit_train_step(model, tx, config, mesh, shardings)
    # The global batch must split over the data axis; round up when there are more devices.
    data_size = mesh.shape["data"]
    batch_size = -(-config.input.batch_size // data_size) * data_size
    batch = trainer.global_batch(fake_batch(config, batch_size), data_sharding)

    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

    first, times = _median_timing(run, repeats, warmup, jax.block_until_ready)
    metrics = jax.device_get(run())
    median = statistics.median(times)
    return {
        "config": config_arg, "patch": list(config.input.patch_size), "batch": batch_size,
        "fusion": config.model.fusion, "head": config.model.head, "sam": bool(config.optim.sam),
        "params": model_lib.count_params(holder["state"].params),
        "init_s": init_s, "first_step_s": first, "step_s": median,
        "step_s_min": min(times), "step_s_max": max(times), "repeats": len(times),
        "samples_per_s": batch_size / median, "loss": float(metrics["loss"]),
        **peak_memory(),
    }


# ----------------------------------------------------------------------------- unet


def bench_unet(repeats, warmup, quick):
    """The JAX vs PyTorch U-Net comparison of scripts/benchmark_unet.py, or why it is skipped."""
    path = ROOT / "scripts" / "benchmark_unet.py"
    try:
        import torch  # noqa: F401
    except ImportError:
        return {"skipped": "torch not installed (pip install -e .[bench])"}
    if not path.is_file():
        return {"skipped": f"{path.relative_to(ROOT)} not found"}
    module = _load_module(path, "benchmark_unet")
    fn = getattr(module, "run_benchmark", None)
    if fn is None:
        return {"skipped": f"{path.name} has no run_benchmark(repeats, warmup, quick)"}
    # {"environment", "cases": [{"case", "times": {name: {"median_s", "first_s", ...}},
    #  "ratio_to_torch": {name: JAX / PyTorch median}, ...}]}
    return {**fn(repeats=repeats, warmup=warmup, quick=quick), **peak_memory()}


# ------------------------------------------------------------------------ inference


def bench_inference(shape, config_arg, repeats, warmup, cpu_max_voxels):
    """Seconds per case and voxels/s of diagnose_volume on a [D, H, W] preprocessed volume."""
    import jax

    from lidia_jax.inference import diagnose
    from lidia_jax.inference import semantic
    from lidia_jax.model import build_model

    bench_inf = _load_module(ROOT / "scripts" / "bench_inference.py", "bench_inference")
    config = load_config(config_arg)
    voxels = int(np.prod(shape))
    estimated = jax.default_backend() == "cpu" and voxels > cpu_max_voxels
    model = build_model(config.model)
    variables = bench_inf.random_variables(model, config.input.patch_size)
    model_fn = semantic.bind(semantic.model_tile_predictor(model, config), variables)
    tb = config.inference.tile_batch
    tiles = np.zeros((tb,) + tuple(config.input.patch_size) + (4,), np.float32)
    tile_mask = np.ones((tb, 4), bool)
    compile_s, batch_times = _median_timing(lambda: model_fn(tiles, tile_mask), repeats,
                                            warmup, jax.block_until_ready)
    seconds_per_batch = statistics.median(batch_times)

    image = bench_inf.synthetic_volume(tuple(shape))
    phase_mask = [True, True, True, False]
    tile_fn = model_fn
    if estimated:
        tile_fn = semantic.bind(bench_inf.toy_tile_predictor, {})
        jax.block_until_ready(tile_fn(tiles, tile_mask))
    runs = []
    # The tile function is compiled by now; one volume-level warm-up (page faults, allocator
    # growth) is enough, and --warmup 0 skips it for very large volumes.
    volume_warmup = min(warmup, 1)
    for i in range(volume_warmup + max(1, repeats)):
        t0 = time.perf_counter()
        diag = diagnose.diagnose_volume(image, phase_mask, tile_fn, INFERENCE_SPACING, config)
        total = time.perf_counter() - t0
        if i >= volume_warmup:
            runs.append((total, dict(diag.seconds)))
        del diag
    total = statistics.median(r[0] for r in runs)
    stages = {k: statistics.median(r[1][k] for r in runs)
              for k in ("sliding_window", "postprocess", "patient_score")}
    num_tiles = runs[0][1]["tiles"]
    batches = -(-num_tiles // tb)
    network_s = batches * seconds_per_batch
    if estimated:  # stand-in predictor measured; add the network at its measured rate
        total += network_s - batches * _toy_seconds_per_batch(tile_fn, tiles, tile_mask)
    return {
        "shape": list(shape), "config": config_arg, "patch": list(config.input.patch_size),
        "tile_batch": tb, "tiles": num_tiles, "estimated": estimated,
        "compile_s": compile_s, "seconds_per_tile_batch": seconds_per_batch,
        "network_s": network_s, "case_s": total, "voxels_per_s": voxels / total,
        "stages_s": stages, "repeats": len(runs),
        "input_bytes": image.nbytes, **peak_memory(),
    }


def _toy_seconds_per_batch(tile_fn, tiles, tile_mask):
    import jax

    _, times = _median_timing(lambda: tile_fn(tiles, tile_mask), 5, 1, jax.block_until_ready)
    return statistics.median(times)


# ------------------------------------------------------------------------ hungarian


def bench_hungarian(repeats, warmup, targets=HUNGARIAN_TARGETS, inner=20):
    """Microseconds per assignment: jitted hungarian [50, M], vmapped [2, 50, M], scipy."""
    import jax
    from scipy.optimize import linear_sum_assignment

    from lidia_jax.matching import hungarian

    rng = np.random.default_rng(0)
    single = jax.jit(hungarian)
    batched = jax.jit(jax.vmap(hungarian))
    rows = []
    for m in targets:
        cost = rng.random((2, HUNGARIAN_QUERIES, m)).astype(np.float32)
        dev, dev0 = jax.device_put(cost), jax.device_put(cost[0])  # no slicing op when timed
        costs_t = [np.ascontiguousarray(c.T) for c in cost]  # scipy: rows = targets (M <= N)
        # Same optimum as scipy (exactness is tested in tests/test_matching.py).
        t0 = time.perf_counter()
        ours = np.asarray(single(dev0))  # the first call compiles
        compile_us = (time.perf_counter() - t0) * 1e6
        _, ref = linear_sum_assignment(cost[0].T)
        assert np.isclose(cost[0][ours, np.arange(m)].sum(), cost[0][ref, np.arange(m)].sum())

        def loop(fn):
            def run():
                out = None
                for _ in range(inner):
                    out = fn()
                return out
            return run

        def us(fn, block=jax.block_until_ready):
            first, times = _median_timing(loop(fn), repeats, warmup, block)
            return first * 1e6, statistics.median(times) / inner * 1e6

        _, single_us = us(lambda: single(dev0))
        _, batch_us = us(lambda: batched(dev))
        _, scipy_us = us(lambda: linear_sum_assignment(costs_t[0]), block=lambda x: x)
        _, scipy_batch_us = us(lambda: [linear_sum_assignment(c) for c in costs_t],
                               block=lambda x: x)
        rows.append({"queries": HUNGARIAN_QUERIES, "targets": m, "jax_single_us": single_us,
                     "jax_vmap2_us": batch_us, "scipy_single_us": scipy_us,
                     "scipy_batch2_us": scipy_batch_us, "jax_compile_us": compile_us})
    return {"rows": rows, "inner_calls": inner}


# -------------------------------------------------------------------------- driver


def plan_items(args, backend):
    """[(section, setting)] to run, in order."""
    items = []
    for section in args.only:
        if section == "train":
            configs = args.configs or (["smoke", "demo"] + (["paper"] if backend != "cpu"
                                                            else []))
            items += [("train", c) for c in configs]
        elif section == "inference":
            items += [("inference", s) for s in args.shapes]
        else:
            items.append((section, ""))
    return items


def run_item(section, setting, args):
    if section == "train":
        return bench_train(setting, args.repeats, args.warmup)
    if section == "inference":
        shape = tuple(int(s) for s in setting.split(","))
        return bench_inference(shape, args.inference_config, args.repeats, args.warmup,
                               args.cpu_max_voxels)
    if section == "unet":
        return bench_unet(args.repeats, args.warmup, args.quick)
    if section == "hungarian":
        return bench_hungarian(args.repeats, args.warmup, args.hungarian_targets)
    raise ValueError(f"unknown section {section!r}")


def _child_argv(args, section, setting):
    argv = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", section,
            setting, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--inference-config", args.inference_config,
            "--cpu-max-voxels", str(args.cpu_max_voxels),
            "--hungarian-targets", *map(str, args.hungarian_targets)]
    return argv + (["--quick"] if args.quick else [])


def run_isolated(args, section, setting, log):
    """Runs one item in a child process (its own peak memory); returns its result dict."""
    proc = subprocess.run(_child_argv(args, section, setting), capture_output=True, text=True,
                          cwd=str(ROOT))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        log("\n".join(tail))
        return {"error": f"child exited {proc.returncode}: " + (tail[-1] if tail else "")}
    return json.loads(lines[-1])


def _gib(x):
    return "n/a" if x is None else f"{x / 2**30:.2f}"


def _f(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(results):
    env = results["environment"]
    mem = ("device peak_bytes_in_use" if env["backend"] != "cpu"
           else "process peak RSS (ru_maxrss: Python + JAX/XLA + inputs)")
    lines = ["# lidia_jax benchmarks", "",
             f"- Date (UTC): {env['date_utc']}, commit {env['git_commit'] or 'n/a'}",
             f"- Command: `{env['command']}`",
             f"- Backend: {env['backend']}; devices: {', '.join(env['devices'])}",
             f"- CPU: {env['cpu_model']} ({env['cpu_count']} logical cores, load average "
             f"{env['load_average']}); GLIBC_TUNABLES "
             f"{env.get('glibc_tunables') or 'unset'}",
             f"- jax {env['jax']}, jaxlib {env['jaxlib']}, Python {env['python']}",
             f"- Each figure: median of {results['repeats']} runs after {results['warmup']} "
             f"warm-up run(s); peak memory = {mem}.", ""]
    train = results.get("train")
    if train:
        lines += ["## Training step", "",
                  "| config | patch | batch | params | step (s) | samples/s | first step (s, "
                  "compile) | peak device GiB | peak RSS GiB |", "|---" * 9 + "|"]
        for r in train:
            if "error" in r:
                lines.append(f"| {r['config']} | error: {r['error']} |||||||")
                continue
            lines.append(f"| {r['config']} | {'x'.join(map(str, r['patch']))} | {r['batch']} | "
                         f"{r['params']:,} | {_f(r['step_s'])} | {_f(r['samples_per_s'], 2)} | "
                         f"{_f(r['first_step_s'], 1)} | {_gib(r['peak_device_bytes'])} | "
                         f"{_gib(r['peak_rss_bytes'])} |")
        lines.append("")
    unet = results.get("unet")
    if unet is not None:
        lines += ["## U-Net: JAX vs nnU-Net PlainConvUNet (PyTorch)", ""]
        if "skipped" in unet or "error" in unet:
            lines += [f"{'Skipped' if 'skipped' in unet else 'Error'}: "
                      f"{unet.get('skipped', unet.get('error'))}", ""]
        else:
            for case in unet.get("cases", []):
                where = (f"patch {case['patch']}, batch {case['batch']}, features "
                         f"{case['features']}" if case["case"] == "unet"
                         else f"input {case['input']}, channels {case['channels']}")
                lines += [f"{case['case']} ({where}, {case['dtype']}), training step:", "",
                          "| contender | median s | first call s | ratio to torch |",
                          "|---|---|---|---|"]
                for name, t in case["times"].items():
                    ratio = case["ratio_to_torch"].get(name, 1.0)
                    lines.append(f"| {name} | {_f(t['median_s'])} | {_f(t['first_s'], 1)} | "
                                 f"{_f(ratio, 2)} |")
                lines.append("")
            lines += [f"Peak memory of that process: device {_gib(unet.get('peak_device_bytes'))}"
                      f" GiB, RSS {_gib(unet.get('peak_rss_bytes'))} GiB.", ""]
    inference = results.get("inference")
    if inference:
        lines += ["## Inference (sliding window + post-processing + patient score, one case)",
                  "", "| volume (D,H,W) | tiles | s / case | voxels/s | network s (batches x s/batch) "
                  "| s / tile batch | peak device GiB | peak RSS GiB | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in inference:
            if "error" in r:
                lines.append(f"| {r['shape']} | error: {r['error']} ||||||||")
                continue
            note = ("estimated: network time = tile batches x s/tile batch; the rest measured"
                    if r["estimated"] else "measured")
            lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['tiles']} | "
                         f"{_f(r['case_s'], 2)} | {r['voxels_per_s']:.3g} | "
                         f"{_f(r['network_s'], 2)} | {_f(r['seconds_per_tile_batch'], 4)} | "
                         f"{_gib(r['peak_device_bytes'])} | {_gib(r['peak_rss_bytes'])} | "
                         f"{note} |")
        ok = [r for r in inference if "error" not in r]
        if ok:
            lines += ["", f"Config {ok[0]['config']!r} (patch {ok[0]['patch']}, tile batch "
                      f"{ok[0]['tile_batch']}), random parameters, spacing "
                      f"{INFERENCE_SPACING} mm.", ""]
    hung = results.get("hungarian")
    if hung:
        lines += ["## Hungarian matching (microseconds per call)", ""]
        if "error" in hung:
            lines += [f"Error: {hung['error']}", ""]
        else:
            lines += ["| queries x targets | JAX jit | JAX vmap, batch 2 | scipy | scipy, batch 2"
                      " (loop) |", "|---|---|---|---|---|"]
            for r in hung["rows"]:
                lines.append(f"| {r['queries']} x {r['targets']} | {_f(r['jax_single_us'], 1)} "
                             f"| {_f(r['jax_vmap2_us'], 1)} | {_f(r['scipy_single_us'], 1)} | "
                             f"{_f(r['scipy_batch2_us'], 1)} |")
            lines += ["", f"Each time: {hung['inner_calls']} back-to-back calls / "
                      f"{hung['inner_calls']} (JAX includes dispatch).", ""]
    return "\n".join(lines)


def write_results(results, out):
    """OUT/benchmark.json and OUT/benchmark.md."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "benchmark.md").write_text(markdown(results))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--out", default="benchmarks", help="folder for benchmark.json/.md")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--configs", nargs="+", default=None,
                        help="train configs (smoke, demo, paper, or 'demo,fusion=early' ...); "
                             "default smoke demo (+ paper with a GPU)")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="inference volumes D,H,W (preprocessed voxels)")
    parser.add_argument("--inference-config", default="demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cpu-max-voxels", type=int, default=4_000_000,
                        help="on a CPU, larger volumes get an estimated network time")
    parser.add_argument("--hungarian-targets", nargs="+", type=int,
                        default=list(HUNGARIAN_TARGETS), help="M of the [50, M] cost matrices")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run every item in this process (peak memory then cumulative)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke config, 1 repeat, 1 warm-up, a small volume (tests)")
    parser.add_argument("--child", nargs=2, metavar=("SECTION", "SETTING"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 1
        args.configs = args.configs or ["smoke"]
        args.inference_config = "smoke"
        if args.shapes == list(DEFAULT_SHAPES):
            args.shapes = ["20,40,40"]
    for shape in args.shapes:
        parts = shape.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            parser.error(f"--shapes: {shape!r} is not D,H,W (three positive integers)")
    if not all(1 <= m <= HUNGARIAN_QUERIES for m in args.hungarian_targets):
        parser.error(f"--hungarian-targets must be in 1..{HUNGARIAN_QUERIES} (queries)")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(ROOT))
    if args.child:  # one item, result as the last stdout line
        print(json.dumps(run_item(*args.child, args), default=float))
        return 0
    import jax

    log = lambda s: print(s, file=sys.stderr, flush=True)
    results = {"environment": environment(), "repeats": args.repeats, "warmup": args.warmup}
    out = pathlib.Path(args.out)
    for section, setting in plan_items(args, jax.default_backend()):
        log(f"benchmark: {section} {setting}".rstrip())
        t0 = time.perf_counter()
        if args.isolate:
            result = run_isolated(args, section, setting, log)
        else:
            try:
                result = run_item(section, setting, args)
            except Exception as e:  # one failing figure must not lose the others
                result = {"error": f"{type(e).__name__}: {e}"}
        if section == "train":
            result.setdefault("config", setting)
        if section == "inference":
            result.setdefault("shape", [int(s) for s in setting.split(",")])
        log(f"  {time.perf_counter() - t0:.1f} s: " + json.dumps(result, default=float)[:300])
        if section in ("train", "inference"):
            results.setdefault(section, []).append(result)
        else:
            results[section] = result
        write_results(results, out)  # after every item: an interrupted run keeps what it has
    log(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    failed = [k for k in SECTIONS if isinstance(results.get(k), dict) and "error" in results[k]]
    failed += [k for k in ("train", "inference") for r in results.get(k, []) if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from lidia_jax import huge_pages

    huge_pages.reexec_with_huge_pages()  # measure what `python -m lidia_jax.main` runs with
    sys.exit(main())
