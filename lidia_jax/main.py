r"""Train, evaluate and predict with LIDIA.

  python -m lidia_jax.main --config=configs/lidia.py:demo --workdir=runs/demo
  python -m lidia_jax.main --config=configs/lidia.py:demo --workdir=runs/demo \
      --mode=evaluate --input=/data/LiverDCE --output=runs/demo/eval
  python -m lidia_jax.main --config=configs/lidia.py:demo --workdir=runs/demo \
      --mode=predict --input=/data/new_cases --output=/data/predictions
  python -m lidia_jax.main --config=configs/lidia.py:demo --workdir=runs/demo \
      --ensemble=runs/demo_seed1 --mode=evaluate --input=/data/LiverDCE --output=runs/ens/eval

With `--config.data.root` unset, training generates the synthetic cohort into the workdir.
Multi-host: set --coordinator_address/--num_processes/--process_id (or the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID environment variables; on Cloud TPU, --distributed) and run the
same command on every host.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lidia_jax import huge_pages

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lidia.py",
                                          "Config file (path[:variant,overrides]).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/lidia", "Checkpoints, logs, reports.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict"], "What to do.")
_INPUT = flags.DEFINE_list(
    "input", [], "evaluate: a labelled dataset folder; predict: a dataset folder, or the phase "
    "files of one case (comma separated, named CASE_0000.nii.gz ... as in the data contract).")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (evaluate / predict).")
_ENSEMBLE = flags.DEFINE_list(
    "ensemble", [], "evaluate / predict: more trained workdirs whose models are averaged with "
    "--workdir's (as nnU-Net ensembles its folds), e.g. other --config.seed runs of the recipe; "
    "each must share --workdir's preprocessing plan and model.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with no arguments "
                                 "(auto-detected clusters: Cloud TPU, SLURM, ...).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _initialize_distributed():
    """Runs jax.distributed.initialize() when the flags or the environment ask for multi-host."""
    import jax

    coordinator = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        num_processes = _NUM_PROCESSES.value or int(os.environ["JAX_NUM_PROCESSES"])
        process_id = (_PROCESS_ID.value if _PROCESS_ID.value is not None
                      else int(os.environ["JAX_PROCESS_ID"]))
        if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _initialize_distributed()
    config = _CONFIG.value
    from lidia_jax.train import trainer  # after distributed init: it touches devices

    if _MODE.value == "train":
        trainer.train_and_evaluate(config, _WORKDIR.value)
        return 0
    if not _INPUT.value or not _OUTPUT.value:
        raise app.UsageError(f"--mode={_MODE.value} needs --input and --output.")
    from lidia_jax.inference import predict
    from lidia_jax.evaluation import evaluate

    if _MODE.value == "predict":
        return predict.predict_from_workdir(config, _WORKDIR.value, _INPUT.value, _OUTPUT.value,
                                            ensemble=_ENSEMBLE.value)
    metrics = evaluate.evaluate_from_workdir(config, _WORKDIR.value, _INPUT.value[0],
                                             _OUTPUT.value, ensemble=_ENSEMBLE.value)
    return 0 if metrics else 1


if __name__ == "__main__":
    # Before jax is imported: restart with glibc's malloc on transparent huge pages (a CPU step
    # ~20% faster; opt out with GLIBC_TUNABLES= in the environment). lidia_jax/huge_pages.py.
    huge_pages.reexec_with_huge_pages()
    # Progress lines as they come when the output goes to a pipe or file (`| tee log`), as on a
    # terminal: Python would otherwise hold them back in 8 KiB blocks.
    sys.stdout.reconfigure(line_buffering=True)
    logging.set_verbosity(logging.WARNING)
    app.run(main)
