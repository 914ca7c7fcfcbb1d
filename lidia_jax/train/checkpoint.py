"""Orbax checkpoints of the train state and the grain iterator.

Layout: WORKDIR/checkpoints/<step>/{state, data}. `state` is the whole `TrainState` pytree
(restored onto whatever shardings the caller asks for, so a checkpoint written on 4 devices
restores on 1); `data` is each process's grain iterator state. The last
`config.train.keep_checkpoints` are kept, plus the best by validation AUC-8.
"""

import logging
import pathlib
import time

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from lidia_jax.train import optimizer as optimizer_lib

BEST_METRIC = "auc8"


def _best_metric(metrics):
    """The value a checkpoint is ranked by ("best"): validation AUC-8, higher is better."""
    return metrics[BEST_METRIC]


def make_manager(workdir, keep, asynchronous=True):
    """A `CheckpointManager` keeping the latest `keep` and the best by validation AUC-8."""
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(keep),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    # best_fn/best_mode make the manager write each step's metrics into its metadata, so that
    # best_step() is right in a later process too (the preservation policy alone ranks in memory
    # and best_step() then returns the latest step). Saves without metrics log an orbax warning.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                           best_fn=_best_metric, best_mode="max",
                                           enable_async_checkpointing=asynchronous)
    return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints",
                                 item_names=("state", "data"), options=options)


def save(manager, step, state, data_iter=None, metrics=None, force=False):
    """Saves asynchronously; `metrics` (e.g. {"auc8": 0.9}) rank the checkpoint for "best"."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


def restore_latest(manager, abstract_state, data_iter=None):
    """Restores the newest readable checkpoint onto `abstract_state`'s shardings.

    A checkpoint that fails to restore (corrupt, truncated) is skipped with a warning and the
    previous one is tried; the unreadable ones are moved to WORKDIR/checkpoints_unreadable/ so
    that the resumed run can write those steps again. Returns (state, step), or (None, None)
    when there is none. `data_iter` is restored in place when given.
    """
    unreadable = []
    restored, step = None, None
    for candidate in sorted(manager.all_steps(), reverse=True):
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = manager.restore(candidate, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 -- any failure means "unreadable"
            logging.warning("Checkpoint at step %d could not be restored (%s: %s); trying the "
                            "previous one.", candidate, type(e).__name__, e)
            unreadable.append(candidate)
            continue
        step = candidate
        break
    if unreadable:
        directory = pathlib.Path(manager.directory)
        aside = directory.parent / "checkpoints_unreadable"
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for bad in unreadable:
                (directory / str(bad)).rename(aside / f"{bad}_{int(time.time())}")
                logging.warning("Moved the unreadable checkpoint %d to %s", bad, aside)
        multihost_utils.sync_global_devices("lidia_jax:unreadable_checkpoints_moved")
        manager.reload()
    if restored is None:
        return None, None
    return restored["state"], step


WHICH = ("best", "latest")  # config.inference.checkpoint


def check_which(which):
    if which not in WHICH:
        raise ValueError(f"config.inference.checkpoint={which!r}: expected one of {WHICH}")


def inference_params(params, opt_state, use_ema=True):
    """The weights inference uses: the EMA of the weights (config.optim.ema_decay > 0) when
    `use_ema` (config.inference.use_ema) and the optimiser state holds one, else `params`."""
    ema = optimizer_lib.find_ema_params(opt_state) if use_ema else None
    if ema is None:
        return params
    logging.info("Inference uses the EMA of the weights (config.inference.use_ema).")
    return ema


def restore_params(workdir, which="best", use_ema=True):
    """Parameters of a trained workdir's best (else latest) checkpoint, as host numpy arrays.

    For inference: the weights `inference_params` picks, replicated on the default device,
    whatever mesh wrote them.
    """
    check_which(which)
    manager = make_manager(workdir, keep=1_000_000, asynchronous=False)
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"No checkpoint under {pathlib.Path(workdir) / 'checkpoints'}: "
                                "train first (--mode=train) or point --workdir at a trained run.")
    step = manager.best_step() if which == "best" else None
    step = manager.latest_step() if step is None else step
    metadata = manager.item_metadata(step)["state"]
    # Restore the whole state without a target, on one device (shardings from the metadata
    # would name the writer's devices).
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            metadata)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    manager.close()
    state = restored["state"]
    return inference_params(state["params"], state.get("opt_state"), use_ema), step
