"""Training at scale on the CPU: sharded == single-device, multi-host == one process, exact
resume, cross-mesh restore, non-finite steps skipped, and the `main` entry point end to end."""

import json
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, host_devices_env as _env, load_config
from lidia_jax.data.fake_batch import fake_batch

WORKER = pathlib.Path(__file__).with_name("train_worker.py")


def _run_worker(out, devices, *args, timeout=600):
    subprocess.run([sys.executable, str(WORKER), str(out), *map(str, args)], env=_env(devices),
                   check=True, timeout=timeout)
    return np.load(out)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sharded_step_equals_single_device(tmp_path):
    single = _run_worker(tmp_path / "one.npz", 4, "--mesh-devices", 1, "--steps", 2)
    sharded = _run_worker(tmp_path / "four.npz", 4, "--mesh-devices", 4, "--steps", 2)
    fsdp = _run_worker(tmp_path / "fsdp.npz", 4, "--mesh-devices", 4, "--steps", 2,
                       "--param-sharding", "fsdp")
    assert int(sharded["num_devices"]) == 4
    assert np.all(np.isfinite(single["losses"]))
    for other in (sharded, fsdp):
        _assert_same_training(other, single)
    # The parameters moved: the comparison is not between two untouched initialisations.
    assert single["losses"][0] != single["losses"][1]


def _assert_same_training(a, b):
    """Two train_worker runs of the same steps on other device layouts agree.

    The losses agree to float tolerance at every step. After one step the parameters agree too,
    except for a handful whose gradient nearly cancels over the batch: the devices sum their
    gradients in another order than one device does, and Adam's normalisation g / (|g| + eps)
    turns that rounding into a visible fraction of one learning-rate step. How many depends on
    the CPU: on an Intel Xeon VM 25 of 53,382 differed by up to 4e-5, on an AMD EPYC VM none
    beyond the tolerance. Later steps are compared by their loss only: the point sampling's
    top-k by uncertainty may pick other points on such tiny differences.
    """
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=2e-5, atol=1e-6)
    off = ~np.isclose(a["params_step1"], b["params_step1"], rtol=1e-4, atol=1e-5)
    assert off.mean() < 1e-3, off.mean()
    assert np.abs(a["params_step1"] - b["params_step1"]).max() < 0.1 * load_config(
        "smoke").optim.lr


def _run_snippet(code, *args, cwd=None):
    """Runs `code` with 4 host devices in a fresh process (the device count is fixed when jax
    starts); it must succeed and print "ok" last."""
    out = subprocess.run([sys.executable, "-c", code, *args], env=_env(4), cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


_SHARDED_CONV = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from lidia_jax.model.conv import conv
from lidia_jax.train.sharding import make_mesh
impl, axis_type = sys.argv[1:]
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((4, 6, 40, 36, 6)), jnp.float32)
w = jnp.asarray(rng.standard_normal((3, 3, 3, 6, 7)), jnp.float32)
g = jnp.asarray(rng.standard_normal((4, 6, 40, 36, 7)), jnp.float32)
f = jax.jit(jax.value_and_grad(lambda x, w, g: jnp.sum(conv(x, w, impl=impl) * g), (0, 1)))
v1, (dx1, dw1) = f(x, w, g)
if axis_type == "auto":
    mesh = make_mesh((("data", 4),))  # the trainer's mesh
else:  # sharding in types (jax.make_mesh's default axis type in newer jax)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
xs, gs = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, g))
with jax.set_mesh(mesh):
    v4, (dx4, dw4) = f(xs, w, gs)
assert len(xs.sharding.device_set) == 4 and len(dx4.sharding.device_set) == 4
for a, b in ((v4, v1), (dx4, dx1), (dw4, dw1)):
    b = np.asarray(b)  # sums over ~35,000 terms: tolerance relative to the largest entry
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
print("ok")
"""


@pytest.mark.parametrize("impl,axis_type", [("planes", "auto"), ("planes", "explicit"),
                                            ("xla", "explicit")])
def test_conv_sharded_equals_single_device(impl, axis_type):
    """A convolution batch-sharded over 4 devices gives the single-device value and gradients.
    "planes" (the CPU default; 40x36 planes, 3 * 6 channels: one 2-D convolution per depth tap,
    24 planes of 1,440 voxels: kernel gradient in chunks of 22 and 2 planes, across the shards)
    on the trainer's Auto mesh; on an Explicit mesh, where jax has no sharding rule for the
    kernel gradient, both implementations (conv runs them under auto_axes)."""
    _run_snippet(_SHARDED_CONV, impl, axis_type)


_EXPLICIT_STEP = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from conftest import load_config
from lidia_jax import model as model_lib, objective
from lidia_jax.data.fake_batch import fake_batch
config = load_config("smoke")
model = model_lib.build_model(config.model)
batch = fake_batch(config, 4, seed=0)
params = jax.jit(lambda r: model.init(r, batch["image"], batch["phase_mask"], train=False))(
    jax.random.key(0))["params"]
memory = objective.init_memory(config.loss.memory_size, config.model.acl_dim)
forward = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, train=False))

def loss_fn(p, b):
    outputs = model.apply({"params": p}, b["image"], b["phase_mask"], train=True)
    return objective.compute_loss(outputs, b, memory, jax.random.key(1), config)

step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
one = forward(params, batch["image"], batch["phase_mask"])
(loss1, aux1), grads1 = step(params, batch)
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
split = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in batch.items()}
with jax.set_mesh(mesh):
    four = forward(params, split["image"], split["phase_mask"])
    (loss4, aux4), grads4 = step(params, split)
assert four["logits"].sharding.spec[1] == "data"  # [L+1, B, Q, K+1]: split over the batch
for k in ("logits", "masks", "embed"):
    np.testing.assert_allclose(np.asarray(four[k]), np.asarray(one[k]), rtol=1e-4, atol=1e-4)
np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-5)
np.testing.assert_allclose(np.asarray(aux4["memory"]["embed"]), np.asarray(aux1["memory"]["embed"]),
                           rtol=1e-4, atol=1e-5)
# Gradients against the largest one: a bias before an instance norm has a gradient of ~1e-7
# in float32 noise only.
scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads1))
for a, b in zip(jax.tree.leaves(grads4), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
print("ok")
"""


@pytest.mark.slow
def test_forward_and_loss_on_explicit_mesh_equal_single_device():
    """The model's forward pass, the loss, the memory bank and the parameter gradients with the
    batch split over an Explicit mesh axis (sharding in types) equal the single-device ones, the
    outputs split over the batch (the trainer's own meshes are Auto)."""
    _run_snippet(_EXPLICIT_STEP, cwd=ROOT / "tests")


def test_batch_that_does_not_split_over_the_mesh_is_an_actionable_error():
    from lidia_jax.train import sharding as sharding_lib
    mesh = jax.sharding.AbstractMesh((4,), ("data",))
    sharding_lib.check_batch_size(8, mesh)
    with pytest.raises(ValueError, match="batch_size=2 does not split .* 4 devices"):
        sharding_lib.check_batch_size(2, mesh)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path / f"multi{i}.npz"), "--steps", "2",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=_env(2)) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0
    multi = np.load(tmp_path / "multi0.npz")
    assert int(multi["num_devices"]) == 4
    single = _run_worker(tmp_path / "single.npz", 4, "--steps", 2)
    _assert_same_training(multi, single)  # gloo sums across the processes in its own order


@pytest.mark.slow
def test_checkpoint_from_four_devices_restores_on_one(tmp_path):
    import flax.linen as nn

    from lidia_jax import model as model_lib
    from lidia_jax.train import checkpoint as ckpt
    from lidia_jax.train import optimizer as optimizer_lib
    from lidia_jax.train import sharding as sharding_lib
    from lidia_jax.train import trainer

    saved = _run_worker(tmp_path / "saved.npz", 4, "--mesh-devices", 4, "--steps", 1,
                        "--param-sharding", "fsdp", "--save-checkpoint", tmp_path / "w")
    config = load_config("smoke")
    mesh = sharding_lib.make_mesh((("data", -1),), jax.devices()[:1])
    model = model_lib.build_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optim, 10)
    abstract = jax.eval_shape(trainer.make_init(model, tx, config), jax.random.key(0))
    shardings = sharding_lib.state_shardings(abstract, mesh, "replicated")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(abstract), shardings)
    manager = ckpt.make_manager(tmp_path / "w", keep=2)
    state, step = ckpt.restore_latest(manager, target)
    manager.close()
    assert step == 1 and int(state.step) == 1
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.params)])
    np.testing.assert_array_equal(flat, saved["params"])


def test_best_checkpoint_survives_a_new_process(tmp_path):
    """Latest `keep` plus the best validation AUC-8 are kept, and restore_params("best") finds
    the best one from the files alone (a fresh manager, as a later evaluate/predict run)."""
    from lidia_jax.train import checkpoint as ckpt

    manager = ckpt.make_manager(tmp_path, keep=2, asynchronous=False)
    for step, auc8 in [(1, 0.5), (2, 0.9), (3, 0.1), (4, None), (5, None)]:
        ckpt.save(manager, step, {"params": {"w": np.full(3, float(step), np.float32)}},
                  metrics=None if auc8 is None else {ckpt.BEST_METRIC: auc8}, force=True)
    manager.close()
    assert sorted(ckpt.make_manager(tmp_path, keep=2).all_steps()) == [2, 4, 5]
    params, step = ckpt.restore_params(tmp_path, "best")
    assert step == 2
    np.testing.assert_array_equal(np.asarray(params["w"]), [2.0, 2.0, 2.0])
    assert ckpt.restore_params(tmp_path, "latest")[1] == 5
    with pytest.raises(ValueError, match="config.inference.checkpoint"):
        ckpt.restore_params(tmp_path, "final")


def test_restore_params_picks_the_ema_of_the_weights(tmp_path):
    """A checkpoint whose optimiser state holds the weights' EMA gives it to inference unless
    config.inference.use_ema is False; one without gives the parameters either way."""
    from lidia_jax.train import checkpoint as ckpt
    from lidia_jax.train import optimizer as optimizer_lib

    params = {"w": np.full(3, 1.0, np.float32)}
    ema = optimizer_lib.EmaParamsState(np.zeros((), np.int32), {"w": np.full(3, 2.0, np.float32)})
    for name, opt_state in (("with", ((), ema)), ("without", ((), ()))):
        manager = ckpt.make_manager(tmp_path / name, keep=1, asynchronous=False)
        ckpt.save(manager, 7, {"params": params, "opt_state": opt_state}, force=True)
        manager.close()
    np.testing.assert_array_equal(ckpt.restore_params(tmp_path / "with", "latest")[0]["w"], 2.0)
    np.testing.assert_array_equal(
        ckpt.restore_params(tmp_path / "with", "latest", use_ema=False)[0]["w"], 1.0)
    np.testing.assert_array_equal(ckpt.restore_params(tmp_path / "without", "latest")[0]["w"], 1.0)


@pytest.mark.slow
def test_nonfinite_batch_is_skipped_and_counted():
    import flax.linen as nn

    from lidia_jax import model as model_lib
    from lidia_jax.train import optimizer as optimizer_lib
    from lidia_jax.train import trainer

    config = load_config("smoke")
    # With the mask-pooled head taught under the true masks: the batch's targets reach the model;
    # and with the auxiliary semantic map, whose loss reads the batch's label codes.
    config.model.pooled_intensity = True
    config.loss.pooled_target_weight = 1.0
    config.model.aux_semantic = True
    model = model_lib.build_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optim, 10)
    state = jax.jit(lambda r: nn.meta.unbox(trainer.make_init(model, tx, config)(r)))(
        jax.random.key(0))
    step = jax.jit(trainer.make_train_step(model, tx, config))
    batch = fake_batch(config, 2, seed=0)
    batch["image"][0, 1, 2, 3, 0] = np.nan
    before = jax.device_get(state.params)
    state, metrics = step(state, batch)
    assert float(metrics["finite"]) == 0.0
    assert int(state.nonfinite_in_a_row) == 1 and int(state.nonfinite_total) == 1
    assert int(state.step) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, fake_batch(config, 2, seed=1))
    assert float(metrics["finite"]) == 1.0
    assert float(metrics["loss_pooled_target"]) > 0
    assert float(metrics["loss_aux_semantic_ce"]) > 0
    assert int(state.nonfinite_in_a_row) == 0 and int(state.nonfinite_total) == 1
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                        jax.tree.leaves(state.params))]
    assert any(changed)


@pytest.fixture(scope="module")
def smoke_dataset(tmp_path_factory):
    from lidia_jax.data import synthetic

    root = tmp_path_factory.mktemp("cohort")
    config = load_config("smoke")
    syn = config.data.synthetic
    synthetic.make_cohort(root, cases=syn.cases, seed=syn.seed, size=syn.size,
                          test_fraction=syn.test_fraction)
    return root


def _main_cmd(workdir, dataset, cache, *extra):
    return [sys.executable, "-m", "lidia_jax.main", "--config=configs/lidia.py:smoke",
            f"--workdir={workdir}", f"--config.data.root={dataset}",
            f"--config.data.cache_dir={cache}", *extra]


def _main(workdir, dataset, cache, *extra):
    cmd = _main_cmd(workdir, dataset, cache, *extra)
    out = subprocess.run(cmd, cwd=ROOT, env=_env(1), timeout=900, capture_output=True,
                         text=True)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr[-5000:]}"
    return out


@pytest.mark.slow
def test_main_sigterm_checkpoints_and_resume_is_exact(tmp_path, smoke_dataset):
    """A run preempted by SIGTERM checkpoints and exits; rerun, it resumes and ends with the
    same parameters, and the same EMA of them (config.optim.ema_decay), as an uninterrupted
    run."""
    cache = tmp_path / "cache"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    steps = ("--config.train.num_steps=6", "--config.optim.ema_decay=0.9")
    # The lesion forest (inference only; training is the same): stored and fitted at the start.
    first = _main(straight, smoke_dataset, cache, *steps, "--config.inference.lesion_forest=True",
                  "--config.inference.lesion_forest_trees=5")
    assert "lesion forest: " in first.stdout and (straight / "lesion_forest.npz").is_file()

    proc = subprocess.Popen(_main_cmd(resumed, smoke_dataset, cache, *steps), cwd=ROOT,
                            env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 1/6"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 0, "".join(lines)
    output = "".join(lines)
    assert "SIGTERM: checkpointed step" in output, output
    assert not (resumed / "test_metrics.json").exists()

    second = _main(resumed, smoke_dataset, cache, *steps)
    assert "Resumed from the checkpoint at step" in second.stdout, second.stdout
    assert "Testing the latest checkpoint (step 6)" in second.stdout, second.stdout
    # The smoke config's target (lesion Dice >= 0.7), missed by 6 steps, in the log and report.
    assert "validation misses config.eval.targets (missed: lesion_dice" in second.stdout
    assert "Test missed: lesion_dice" in second.stdout, second.stdout
    # Written: checkpoints, TensorBoard events, the resolved config, the test report.
    assert json.loads((resumed / "config.json").read_text())["model"]["fusion"] == "ifm"
    assert list((resumed / "tensorboard").glob("events.out.tfevents.*"))
    assert (resumed / "checkpoints" / "6").is_dir()
    assert (resumed / "test_metrics.json").exists()
    assert "**0 of 1 met**; missed: lesion_dice." in (
        resumed / "test_report" / "report.md").read_text()

    from lidia_jax.train import checkpoint as ckpt

    for use_ema in (True, False):
        a, _ = ckpt.restore_params(straight, "latest", use_ema)
        b, _ = ckpt.restore_params(resumed, "latest", use_ema)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    ema, raw = (ckpt.restore_params(straight, "latest", use_ema)[0] for use_ema in (True, False))
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))


@pytest.mark.slow
def test_corrupt_latest_checkpoints_fall_back(tmp_path, smoke_dataset):
    """The two latest checkpoints unreadable: the rerun sets both aside and resumes from the one
    before. (Both runs train to the same step: the same program, compiled once.)"""
    workdir = tmp_path / "w"
    steps = ("--config.train.num_steps=5", "--config.train.checkpoint_every=2")
    _main(workdir, smoke_dataset, tmp_path / "cache", *steps)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 5]
    for step in (4, 5):
        for f in (workdir / "checkpoints" / str(step) / "state").rglob("*"):
            if f.is_file() and f.stat().st_size > 0:
                f.write_bytes(b"garbage")
    out = _main(workdir, smoke_dataset, tmp_path / "cache", *steps)
    assert "Resumed from the checkpoint at step 2" in out.stdout, out.stdout + out.stderr
    assert out.stderr.count("could not be restored") == 2, out.stderr
    assert len(list((workdir / "checkpoints_unreadable").iterdir())) == 2
    assert (workdir / "checkpoints" / "4").is_dir()  # written again by the resumed run


def test_fake_batch_layout(smoke_config):
    """The pipeline's batch contract: slot 0 the liver (all labelled voxels), each valid lesion
    slot exactly the voxels of its label code (class index + 1), empty slots invalid and empty,
    the delayed phase absent (and zero) in every other sample."""
    b = fake_batch(smoke_config, 3)
    d, h, w = smoke_config.input.patch_size
    t = smoke_config.data.max_instances
    assert b["image"].shape == (3, d, h, w, 4) and b["masks"].shape == (3, t, d, h, w)
    for k in range(3):
        sem = b["semantic"][k]
        np.testing.assert_array_equal(b["masks"][k, 0], sem >= 1)
        lesions = np.zeros_like(sem, bool)
        for j in range(1, t):
            if b["valid"][k, j]:
                assert (sem[b["masks"][k, j]] == b["classes"][k, j] + 1).all()
                lesions |= b["masks"][k, j]
            else:
                assert not b["masks"][k, j].any()
        np.testing.assert_array_equal(lesions, sem >= 2)
        assert b["valid"][k, 0] and b["valid"][k, 1]
    assert not b["image"][1, ..., 3].any()
    assert b["phase_mask"][:, 3].tolist() == [True, False, True]
