"""Subprocess worker for tests/test_train.py: runs train steps on a fixed global batch.

  python tests/train_worker.py OUT.npz --devices N [--mesh-devices M] [--steps S]
      [--param-sharding replicated|fsdp] [--coordinator HOST:PORT --num-processes P
      --process-id I] [--save-checkpoint DIR]

XLA_FLAGS must be set by the caller (device count) before this starts. Writes the loss per step
and the final parameters (flattened) to OUT.npz from process 0.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mesh-devices", type=int, default=-1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--param-sharding", default="replicated")
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--save-checkpoint", default=None)
    args = parser.parse_args()

    import jax

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    import flax.linen as nn
    import numpy as np

    from conftest import load_config
    from lidia_jax.data.fake_batch import fake_batch
    from lidia_jax import model as model_lib
    from lidia_jax.train import checkpoint as ckpt
    from lidia_jax.train import optimizer as optimizer_lib
    from lidia_jax.train import sharding as sharding_lib
    from lidia_jax.train import trainer

    config = load_config("smoke")
    config.input.batch_size = args.batch
    config.train.param_sharding = args.param_sharding
    # Adam divides by sqrt(v) + eps: with eps 1e-8, parameters whose gradient is ~0 move by
    # +-lr on float noise (reduction order differs across shardings). A larger eps keeps the
    # update linear in tiny gradients, so equal gradients give equal parameters to tolerance.
    config.optim.eps = 1e-3
    # Equal to tolerance is not enough here: the loss makes discrete choices (the most uncertain
    # points, Hungarian matching) that float noise can flip. im2col's dots round alike across
    # these shardings on an AMD EPYC VM and almost alike on an Intel Xeon one (the tolerance of
    # test_train._assert_same_training); "planes"' 2-D convolutions reduce the kernel gradient
    # over the batch in a per-shard order, so they are checked sharded on their own.
    config.model.conv_impl = "matmul"
    devices = jax.devices() if args.mesh_devices < 0 else jax.devices()[:args.mesh_devices]
    mesh = sharding_lib.make_mesh((("data", -1),), devices)
    model = model_lib.build_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optim, 10)
    init = trainer.make_init(model, tx, config)
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding_lib.state_shardings(abstract, mesh, args.param_sharding,
                                             model_lib.LOGICAL_AXIS_RULES)
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(
        jax.random.key(0))
    data_sharding = sharding_lib.batch_sharding(mesh)
    step_fn = jax.jit(trainer.make_train_step(model, tx, config),
                      in_shardings=(shardings, data_sharding),
                      out_shardings=(shardings, None), donate_argnums=0)
    losses, params_after = [], []
    per_process = args.batch // jax.process_count()
    lo = jax.process_index() * per_process
    for i in range(args.steps):
        batch = fake_batch(config, args.batch, seed=i)  # the same global batch everywhere
        local = {k: v[lo:lo + per_process] for k, v in batch.items()}
        state, metrics = step_fn(state, trainer.global_batch(local, data_sharding))
        losses.append(float(metrics["loss"]))
        params_after.append(_flat_params(state.params, mesh))
    if args.save_checkpoint:
        manager = ckpt.make_manager(args.save_checkpoint, keep=2)
        ckpt.save(manager, int(state.step), state, force=True)
        manager.wait_until_finished()
        manager.close()
    if jax.process_index() == 0:
        np.savez(args.out, losses=np.asarray(losses), params=params_after[-1],
                 params_step1=params_after[0], num_devices=jax.device_count())


def _flat_params(params, mesh):
    """All parameters gathered (replicated) and flattened into one host vector."""
    import jax
    import numpy as np

    replicated = jax.jit(lambda p: p, out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))(params)
    return np.concatenate([np.asarray(x.addressable_data(0)).ravel()
                           for x in jax.tree.leaves(replicated)])


if __name__ == "__main__":
    main()
