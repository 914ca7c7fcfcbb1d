"""The training loop, top to bottom: data, mesh, state, step, checkpoints, evaluation.

`train_and_evaluate(config, workdir)` is what `python -m lidia_jax.main --mode=train` runs. It
resumes from the latest readable checkpoint in `workdir` when there is one.
"""

import json
import logging
import pathlib
import shutil
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from lidia_jax import model as model_lib
from lidia_jax import objective
from lidia_jax.data import pipeline
from lidia_jax.data import preprocessing
from lidia_jax.data import synthetic
from lidia_jax.evaluation import evaluate as evaluate_lib
from lidia_jax.evaluation import targets as targets_lib
from lidia_jax.inference import diagnose as diagnose_lib
from lidia_jax.inference import lesion_forest
from lidia_jax.inference import semantic
from lidia_jax.model import conv as conv_lib
from lidia_jax.train import checkpoint as ckpt
from lidia_jax.train import optimizer as optimizer_lib
from lidia_jax.train import sharding as sharding_lib
from lidia_jax.train.state import TrainState

PLAN_FILE = "plan.json"  # the preprocessing plan, copied into the workdir for inference


def num_train_steps(config):
    if config.train.num_steps > 0:
        return config.train.num_steps
    return config.train.epochs * config.train.steps_per_epoch


def cache_root(data_cfg, workdir) -> pathlib.Path:
    """The folder a run's preprocessed caches live in: config.data.cache_dir, else
    WORKDIR/preprocessed (each cache is a <fingerprint>/ subfolder)."""
    return (pathlib.Path(data_cfg.cache_dir) if data_cfg.cache_dir
            else pathlib.Path(workdir) / "preprocessed")


def trained_cache_dir(workdir) -> pathlib.Path:
    """The preprocessed cache a trained workdir used: its config.json's cache_root and the
    fingerprint of its copied plan.json."""
    workdir = pathlib.Path(workdir)
    run_config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    plan = json.loads((workdir / PLAN_FILE).read_text())
    return cache_root(run_config.data, workdir) / plan["fingerprint"]


def prepare_data(config, workdir, log=print):
    """Returns the preprocessed `Cache` of `config.data.root`, or of the synthetic cohort.

    With `config.data.root` unset, the synthetic cohort (the embedded default dataset) is
    generated into WORKDIR/synthetic once and reused. Process 0 does the work; the others wait.
    """
    workdir = pathlib.Path(workdir)
    root = pathlib.Path(config.data.root) if config.data.root else workdir / "synthetic"
    cache_dir = cache_root(config.data, workdir)
    if jax.process_index() == 0:
        if not config.data.root and not (root / "dataset.json").exists():
            syn = config.data.synthetic
            log(f"No data.root given: generating the synthetic cohort ({syn.cases} cases, "
                f"size {syn.size}) into {root}")
            t0 = time.time()
            synthetic.make_cohort(root, cases=syn.cases, seed=syn.seed, size=syn.size,
                                  test_fraction=syn.test_fraction,
                                  workers=max(1, config.preprocess.num_workers))
            log(f"  generated in {time.time() - t0:.0f} s")
        cache = preprocessing.preprocess_dataset(root, cache_dir, config.preprocess, config.data,
                                                 log=log)
        shutil.copy(pathlib.Path(cache.path) / PLAN_FILE, workdir / PLAN_FILE)
    multihost_utils.sync_global_devices("lidia_jax:data_ready")
    if jax.process_index() != 0:
        cache = preprocessing.preprocess_dataset(root, cache_dir, config.preprocess, config.data,
                                                 log=lambda *_: None)
    return cache


def make_train_step(model, tx, config):
    """The pure train step: (state, batch) -> (state, metrics).

    Loss and gradient of the clean forward pass give the metrics and the new ACL memory bank;
    SAM (when on) asks `grad_fn` for the gradient at the perturbed parameters. A step whose loss,
    gradient or update is not finite is skipped (state unchanged but for the counters).
    """

    # The mask-pooled class head also learns from the true masks (objective/criterion.py).
    pooled_targets = config.model.pooled_intensity and config.loss.pooled_target_weight > 0

    def train_step(state, batch):
        rng, loss_rng = jax.random.split(state.rng)
        targets = ({k: batch[k] for k in ("masks", "classes", "valid")} if pooled_targets
                   else None)

        def loss_fn(params):
            outputs = model.apply({"params": params}, batch["image"], batch["phase_mask"],
                                  train=True, targets=targets)
            return objective.compute_loss(outputs, batch, state.memory, loss_rng, config)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)

        def grad_fn(params, *_):  # the perturbed pass: gradient only
            return jax.grad(lambda p: loss_fn(p)[0])(params)

        updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(
            optax.tree_utils.tree_norm(updates))

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            memory=keep_if_finite(aux["memory"], state.memory),
            rng=rng,
            nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        metrics = dict(aux["metrics"], loss=loss, grad_norm=grad_norm,
                       finite=finite.astype(jnp.float32))
        return new_state, metrics

    return train_step


def make_init(model, tx, config):
    """Returns `init(rng) -> TrainState` with parameters still in their logical boxes."""
    patch = tuple(config.input.patch_size)

    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        image = jnp.zeros((1, *patch, len(config.data.phases)), jnp.float32)
        phase_mask = jnp.ones((1, len(config.data.phases)), bool)
        params = model.init(params_rng, image, phase_mask, train=False)["params"]
        memory = objective.init_memory(config.loss.memory_size, config.model.acl_dim)
        return TrainState.create(params, tx, memory, state_rng)

    return init


def jit_train_step(model, tx, config, mesh, state_shardings):
    """make_train_step jitted over `mesh`: state in `state_shardings` (donated), the batch split
    over the data axis, metrics replicated; with the compiler options of the conv impl."""
    return jax.jit(make_train_step(model, tx, config),
                   in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())),
                   donate_argnums=0,
                   compiler_options=conv_lib.compiler_options(config.model.conv_impl))


def global_batch(local_batch, sharding):
    """Assembles the global batch from each process's local part (leading axis = batch)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


def _summary_writer(workdir):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter  # only process 0 writes events
    return SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))


def _progress(step, num_steps, metrics, steps_per_s):
    eta = (num_steps - step) / max(steps_per_s, 1e-9)
    terms = " ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if k != "loss")
    return (f"step {step}/{num_steps} | loss {metrics['loss']:.4f} | {steps_per_s:.2f} steps/s"
            f" | ETA {int(eta // 60)}m{int(eta % 60):02d}s | {terms}")


def train_and_evaluate(config, workdir, log=print):
    """Trains `config` in `workdir` (resuming if possible); returns the final test metrics."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    log = log if is_main else (lambda *_: None)
    # Inference settings the first validation would reject: before hours of training, not after.
    ckpt.check_which(config.inference.checkpoint)
    diagnose_lib.min_lesion_volumes(config)
    semantic.check_settings(config)
    targets_lib.check_targets(config.eval.get("targets", {}))
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    # --- Data: the user's dataset or the synthetic cohort, preprocessed once.
    cache = prepare_data(config, workdir, log)
    log(f"Data: {len(cache.case_names('train'))} train / {len(cache.case_names('val'))} val / "
        f"{len(cache.case_names('test'))} test cases, cache {cache.path}")
    # The lesion forest's training set: the training split's true lesions (seconds).
    if config.inference.lesion_forest:
        if is_main:
            lesion_forest.save(workdir, *lesion_forest.training_set(cache))
        multihost_utils.sync_global_devices("lidia_jax:lesion_forest")
    forest = lesion_forest.load(config, workdir, log)

    # --- Mesh, model, optimiser, and the state initialised straight into its shardings.
    mesh = sharding_lib.make_mesh(config.train.mesh_axes)
    sharding_lib.check_batch_size(config.input.batch_size, mesh)
    num_steps = num_train_steps(config)
    model = model_lib.build_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optim, num_steps)
    schedule = optimizer_lib.make_schedule(config.optim, num_steps)
    init = make_init(model, tx, config)
    abstract_boxed = jax.eval_shape(init, jax.random.key(0))
    state_shardings = sharding_lib.state_shardings(
        abstract_boxed, mesh, config.train.param_sharding, model_lib.LOGICAL_AXIS_RULES)
    init_sharded = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=state_shardings)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(abstract_boxed), state_shardings)
    log(f"Mesh {dict(mesh.shape)} over {jax.device_count()} devices "
        f"({jax.process_count()} processes), param sharding {config.train.param_sharding}")

    # --- Input pipeline (this process's shard) and checkpoint restore.
    train_iter = pipeline.make_train_iterator(cache.path, config, split="train",
                                              seed=config.seed)
    manager = ckpt.make_manager(workdir, config.train.keep_checkpoints)
    state, restored_step = ckpt.restore_latest(manager, abstract_state, train_iter)
    if state is None:
        state = init_sharded(jax.random.key(config.seed))
        log(f"Initialised {model_lib.count_params(state.params):,} parameters "
            f"(fusion {config.model.fusion}, head {config.model.head})")
    else:
        log(f"Resumed from the checkpoint at step {restored_step}")

    data_sharding = sharding_lib.batch_sharding(mesh)
    train_step = jit_train_step(model, tx, config, mesh, state_shardings)

    add_metrics = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))  # global arrays: jit

    # --- Preemption: SIGTERM asks the loop to checkpoint and stop.
    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM,
                                     lambda *_: stop.__setitem__("requested", True))

    writer = _summary_writer(workdir)
    step = int(state.step)
    first_step, t_start, t_last, last_logged = step, time.time(), time.time(), step
    eval_metrics = {}
    interval_sums = None  # per-step metrics summed on the device since the last log line
    log(f"Training {num_steps} steps from step {step} (batch {config.input.batch_size})")
    try:
        while step < num_steps:
            batch = global_batch(next(train_iter), data_sharding)
            state, metrics = train_step(state, batch)
            step += 1
            interval_sums = metrics if interval_sums is None else add_metrics(interval_sums,
                                                                              metrics)
            nonfinite = int(state.nonfinite_in_a_row)
            if nonfinite:
                logging.warning("Step %d: non-finite loss or gradient, update skipped (%d in a "
                                "row, %d in all).", step, nonfinite, int(state.nonfinite_total))
                if nonfinite >= config.train.max_nonfinite_in_a_row:
                    raise FloatingPointError(
                        f"{nonfinite} steps in a row had a non-finite loss or gradient (last at "
                        f"step {step}). Lower config.optim.lr, check the input data, or set "
                        "config.model.dtype=float32; the last good state is in the checkpoint.")

            if step % config.train.log_every == 0 or step == num_steps:
                # Means over the steps since the last line: one batch of 2 is too noisy to read.
                metrics = {k: float(v) / (step - last_logged)
                           for k, v in jax.device_get(interval_sums).items()}
                interval_sums = None
                now = time.time()
                steps_per_s = (step - last_logged) / max(now - t_last, 1e-9)
                t_last, last_logged = now, step
                metrics["learning_rate"] = float(schedule(step))
                metrics["steps_per_second"] = steps_per_s
                metrics["samples_per_second"] = steps_per_s * config.input.batch_size
                log(_progress(step, num_steps, metrics, steps_per_s))
                if writer is not None:
                    for k, v in metrics.items():
                        writer.add_scalar(f"train/{k}", float(v), step)

            evaluate_now = (config.train.eval_every > 0 and step % config.train.eval_every == 0)
            if evaluate_now:
                eval_metrics = evaluate_lib.evaluate_cache(
                    model, jax.device_get(ckpt.inference_params(
                        state.params, state.opt_state, config.inference.use_ema)),
                    cache, cache.case_names("val"), config,
                    max_cases=config.train.eval_max_cases, forest=forest)
                log(f"step {step} validation: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in eval_metrics.items() if np.isscalar(v)))
                if targets_lib.missed(eval_metrics.get("targets", {})):
                    log(f"step {step} validation misses config.eval.targets ("
                        f"{targets_lib.describe(eval_metrics['targets'])}): the test report "
                        "will tell; a run with another --config.seed may do better")
                if writer is not None:
                    for k, v in eval_metrics.items():
                        if np.isscalar(v) and np.isfinite(v):
                            writer.add_scalar(f"val/{k}", float(v), step)

            if (step % config.train.checkpoint_every == 0 or evaluate_now or step == num_steps
                    or stop["requested"]):
                auc8 = float(np.nan_to_num(eval_metrics.get("auc8", np.nan), nan=-1.0))
                ckpt.save(manager, step, state, train_iter,
                          metrics={ckpt.BEST_METRIC: auc8} if evaluate_now else None,
                          force=True)
            if stop["requested"]:
                log(f"SIGTERM: checkpointed step {step}; exiting.")
                break
    finally:
        manager.wait_until_finished()
        signal.signal(signal.SIGTERM, previous_handler)

    elapsed = time.time() - t_start
    log(f"Trained steps {first_step}..{step} in {elapsed / 60:.1f} min")
    if stop["requested"] or step < num_steps:
        manager.close()
        return {}

    # --- Final evaluation on the test split with the checkpoint inference uses
    # (config.inference.checkpoint): the final parameters, or the best validation checkpoint's.
    test_cases = cache.case_names("test") or cache.case_names("val")
    params = ckpt.inference_params(state.params, state.opt_state, config.inference.use_ema)
    params, test_step = jax.device_get(params), step
    if config.inference.checkpoint == "best" and manager.best_step() not in (None, step):
        params, test_step = ckpt.restore_params(workdir, "best", config.inference.use_ema)
    manager.close()
    log(f"Testing the {config.inference.checkpoint} checkpoint (step {test_step})")
    test_metrics = {}
    if test_cases:
        out_dir = workdir / "test_report"
        test_metrics = evaluate_lib.evaluate_cache(model, params, cache, test_cases, config,
                                                   report_dir=out_dir if is_main else None,
                                                   forest=forest)
        log("Test: " + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()
                                 if np.isscalar(v)))
        if "targets" in test_metrics:
            log("Test " + targets_lib.describe(test_metrics["targets"]))
        if is_main:
            log(f"Report written to {out_dir}")
        if writer is not None:
            for k, v in test_metrics.items():
                if np.isscalar(v) and np.isfinite(v):
                    writer.add_scalar(f"test/{k}", float(v), step)
    if writer is not None:
        writer.close()
    if is_main:
        (workdir / "test_metrics.json").write_text(json.dumps(
            {k: v for k, v in test_metrics.items() if np.isscalar(v)}, indent=2, default=float))
    return test_metrics
