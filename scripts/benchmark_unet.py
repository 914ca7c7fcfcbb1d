r"""lidia_jax's U-Net vs nnU-Net's own PyTorch network (PlainConvUNet), same machine, one run.

  python scripts/benchmark_unet.py                     # U-Net training step, demo-like setting
  python scripts/benchmark_unet.py --micro             # issue 7's two conv blocks, fwd + bwd
  python scripts/benchmark_unet.py --micro --unet --impls xla planes matmul --repeats 5 \
      --out bench/unet                                 # both; writes bench/unet.{json,md}
  XLA_FLAGS=... python scripts/benchmark_unet.py       # XLA flags apply to the JAX side
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python scripts/benchmark_unet.py  # both on huge pages
  python scripts/benchmark_unet.py --config paper --impls xla   # the paper's plan and patch
      [--dtype bfloat16 --no-full-model]               # JAX bf16 vs torch bf16 autocast

PyTorch runs on CUDA (cuDNN autotuning on, as nnU-Net sets it) when it sees a GPU, else on the
CPU; JAX on its default backend. Needs the optional `bench` extra (pip install -e .[bench]:
torch==2.13.0, the CPU build, and dynamic-network-architectures); the tests run only its markdown,
which needs no torch. Unlike `lidia_jax.main` and `benchmark.py` it does not restart itself with
malloc on huge pages (lidia_jax/huge_pages.py): set GLIBC_TUNABLES as above to time both sides on
them; the markdown names the setting.

U-Net case (--unet): the U-Net alone, identical on both sides: 4 input channels, stages
--features (default 16 32 64 128, the demo config's), 3x3x3 kernels, strides 1,2,2,2 (or the
patch, features, kernels and strides of --config's variant), two conv -> instance norm (eps
1e-5, affine) -> LeakyReLU(0.01) blocks per encoder stage and per decoder level,
transposed-conv upsampling, 1x1x1 head with 10 outputs at every decoder level
(deep supervision), Dice + CE at every level (nnU-Net's batch Dice without background, weights
1/2^i normalised, labels downsampled by nearest-exact), and one SGD step (Nesterov momentum
0.99, lr 1e-2, global grad-norm clip 12, nnU-Net's defaults). JAX: lidia_jax.model's Encoder +
UNetDecoder and lidia_jax.objective.per_voxel's loss, one row per conv impl, each jitted with the
compiler options the trainer uses for it (`conv.compiler_options`); also the project's
full per-voxel model (build_model, head=per_voxel, fusion=early: an 8-channel stem block in
front of the same U-Net) as "lidia_per_voxel_early". PyTorch: PlainConvUNet with the same
arguments and the same loss written in torch.

Micro case (--micro): two conv3x3x3 -> instance norm -> LeakyReLU blocks, 4 -> 32 -> 64
channels, input [2, 64, 64, 64, 4], loss mean(y^2), forward + backward (the issue's case).

The machine is shared (2 cores, teammates' tests): every contender runs interleaved in the same
process, round after round, after --warmup untimed calls (the first includes compilation), and
each figure is the median of --repeats rounds; ratios are JAX / PyTorch medians, so a load that
slows both cancels to first order.
"""

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NUM_OUTPUTS = 10  # label codes 0..9
DEFAULT_IMPLS = ("xla", "planes", "matmul")  # config.model.conv_impl values timed by default
DS_DECAY = 0.5


# --------------------------------------------------------------------------- timing


def interleaved(fns, repeats, warmup):
    """{name: zero-arg callable that blocks until done} -> {name: {median_s, runs_s, first_s}}."""
    first = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t
        print(f"  {name}: first call (incl. compile) {first[name]:.2f} s", flush=True)
    for _ in range(max(warmup - 1, 0)):
        for fn in fns.values():
            fn()
    runs = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t)
        print(f"  round {r + 1}/{repeats}: " + ", ".join(
            f"{n} {v[-1]:.2f}s" for n, v in runs.items()), flush=True)
    return {name: {"median_s": statistics.median(v), "runs_s": v, "first_s": first[name]}
            for name, v in runs.items()}


# ----------------------------------------------------------------------------- JAX side


def jax_micro_step(impl, shape, channels, dtype_name="float32"):
    """Two ConvNormAct blocks of lidia_jax.model.layers, jitted value_and_grad wrt params."""
    import jax
    import jax.numpy as jnp

    from lidia_jax.model.conv import compiler_options
    from lidia_jax.model.layers import ConvNormAct

    import flax.linen as nn

    dtype = getattr(jnp, dtype_name)

    class Blocks(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i, c in enumerate(channels[1:]):
                x = ConvNormAct(c, (3, 3, 3), impl=impl, dtype=dtype, name=f"block{i}")(x)
            return x

    model = Blocks()
    x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
    params = model.init(jax.random.PRNGKey(1), x)
    # x is an argument, not a closure constant (XLA would constant-fold it at compile time).
    loss = lambda p, x: jnp.mean(jnp.square(model.apply(p, x).astype(jnp.float32)))
    step = jax.jit(jax.value_and_grad(loss), compiler_options=compiler_options(impl))
    return lambda: jax.block_until_ready(step(params, x))


def _sgd():
    import optax
    return optax.chain(optax.clip_by_global_norm(12.0),
                       optax.sgd(1e-2, momentum=0.99, nesterov=True))


def jax_unet_step(impl, patch, batch, features, kernels, strides, full_model=False,
                  dtype_name="float32"):
    """One jitted, donated SGD step of the U-Net (or the full per-voxel LIDIA model)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import ml_collections
    import optax

    from lidia_jax.model.conv import compiler_options
    from lidia_jax.model.encoder import Encoder
    from lidia_jax.model.unet_decoder import UNetDecoder
    from lidia_jax.objective.per_voxel import per_voxel_loss

    dtype = getattr(jnp, dtype_name)
    if full_model:
        from lidia_jax.config_file import load_config
        from lidia_jax.model import build_model
        mcfg = load_config("demo,head=per_voxel,fusion=early").model
        mcfg.base_features, mcfg.max_features = features[0], max(features)
        mcfg.kernel_sizes, mcfg.strides = kernels, strides
        mcfg.conv_impl, mcfg.dtype = impl, dtype_name
        net = build_model(mcfg)
        apply = lambda p, x, m: net.apply(p, x, m, train=True)
    else:
        class UNet(nn.Module):
            @nn.compact
            def __call__(self, x, phase_mask):
                del phase_mask
                skips = Encoder(features, kernels, strides, impl=impl, dtype=dtype,
                                name="encoder")(x)
                return UNetDecoder(features, kernels, strides, NUM_OUTPUTS, impl=impl,
                                   dtype=dtype, name="unet_decoder")(skips)
        net = UNet()
        apply = net.apply
    cfg = ml_collections.ConfigDict({"loss": {"deep_supervision": True,
                                              "ds_weights_decay": DS_DECAY}})
    image, labels = _inputs(patch, batch)
    image, labels = jnp.asarray(image), jnp.asarray(labels)
    mask = jnp.ones((batch, 4), bool)
    params = net.init(jax.random.PRNGKey(0), image, mask)
    tx = _sgd()
    state = [params, tx.init(params)]

    def loss_fn(p, image, labels):
        return per_voxel_loss(apply(p, image, mask), {"semantic": labels}, cfg)[0]

    @functools.partial(jax.jit, donate_argnums=(0, 1), compiler_options=compiler_options(impl))
    def step(p, opt, image, labels):
        loss, g = jax.value_and_grad(loss_fn)(p, image, labels)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    def run():
        state[0], state[1], loss = step(state[0], state[1], image, labels)
        jax.block_until_ready(loss)
    return run


def _inputs(patch, batch, seed=0):
    """Image [B, D, H, W, 4] float32 and blocky label codes [B, D, H, W] in 0..9."""
    import numpy as np
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((batch, *patch, 4)).astype(np.float32)
    coarse = rng.integers(0, NUM_OUTPUTS, (batch, *[max(p // 8, 1) for p in patch]))
    labels = coarse
    for axis, p in enumerate(patch, start=1):
        labels = np.repeat(labels, -(-p // coarse.shape[axis]), axis=axis)
    labels = labels[:, :patch[0], :patch[1], :patch[2]].astype(np.int32)
    return image, labels


# ------------------------------------------------------------------------- PyTorch side


def torch_device():
    """CUDA when PyTorch sees a GPU (cuDNN autotuning on, as nnU-Net sets it), else the CPU."""
    import torch
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    return torch.device("cpu")


def torch_micro_step(shape, channels):
    import torch
    from torch import nn
    torch.manual_seed(0)
    dev = torch_device()
    layers = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv3d(c_in, c_out, 3, padding=1), nn.InstanceNorm3d(c_out, eps=1e-5,
                                                                          affine=True),
                   nn.LeakyReLU(0.01, inplace=True)]
    net = nn.Sequential(*layers).to(dev)
    b, d, h, w, c = shape
    x = torch.randn(b, c, d, h, w, device=dev)

    def run():
        net.zero_grad(set_to_none=True)
        loss = net(x).square().mean()
        loss.backward()
        return loss.item()
    return run


def torch_dice_ce(logits, labels, smooth=1e-5):
    """nnU-Net Dice + CE of one level (the torch twin of lidia_jax.objective.per_voxel.dice_ce):
    CE mean over voxels; batch Dice over foreground classes. logits [B, C, d, h, w]."""
    import torch
    logp = torch.log_softmax(logits, 1)
    onehot = torch.nn.functional.one_hot(labels.long(), logits.shape[1]).movedim(-1, 1)
    onehot = onehot.to(logits.dtype)
    ce = -(onehot * logp).sum(1).mean()
    prob = logp.exp()
    axes = (0, 2, 3, 4)
    tp = (prob * onehot).sum(axes)[1:]
    fp = (prob * (1 - onehot)).sum(axes)[1:]
    fn = ((1 - prob) * onehot).sum(axes)[1:]
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)
    return ce + 1 - dice.mean()


def torch_unet_step(patch, batch, features, kernels, strides, amp=False):
    """nnU-Net's network and loss; amp: bfloat16 autocast (nnU-Net trains under autocast on
    CUDA), the counterpart of the JAX side's --dtype bfloat16."""
    import contextlib
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    torch.manual_seed(0)
    dev = torch_device()
    n = len(features)
    net = PlainConvUNet(
        input_channels=4, n_stages=n, features_per_stage=list(features),
        conv_op=torch.nn.Conv3d, kernel_sizes=[list(k) for k in kernels],
        strides=[list(s) for s in strides], n_conv_per_stage=[2] * n,
        num_classes=NUM_OUTPUTS, n_conv_per_stage_decoder=[2] * (n - 1), conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=True).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    image, labels = _inputs(patch, batch)
    x = torch.from_numpy(image).permute(0, 4, 1, 2, 3).contiguous().to(dev)
    y = torch.from_numpy(labels).to(dev)
    weights = [DS_DECAY ** i for i in range(n - 1)]
    weights = [v / sum(weights) for v in weights]
    targets, size = [], list(patch)
    for level in range(n - 1):
        targets.append(torch.nn.functional.interpolate(
            y[:, None].float(), size=size, mode="nearest-exact")[:, 0].long())
        size = [a // b for a, b in zip(size, strides[level + 1])]
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if amp else \
        contextlib.nullcontext

    def run():
        opt.zero_grad(set_to_none=True)
        with autocast():
            outs = net(x)
            loss = sum(w * torch_dice_ce(o.float(), t)
                       for w, o, t in zip(weights, outs, targets))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
        return loss.item()
    return run


# ----------------------------------------------------------------------------- driver


def _ratios(times, torch_key, stat="median_s"):
    base = times[torch_key][stat]
    return {k: round(v[stat] / base, 3) for k, v in times.items() if k != torch_key}


def _best_ratios(times, torch_key):
    """Fastest run / fastest run: PyTorch's OpenMP threads suffer more from a shared machine
    than XLA's pool (its runs are bimodal under load), so the medians can flatter JAX."""
    best = {k: {"min_s": min(v["runs_s"])} for k, v in times.items()}
    return _ratios(best, torch_key, "min_s")


def run_micro(impls, repeats, warmup, shape=(2, 64, 64, 64, 4), channels=(4, 32, 64),
              dtype="float32"):
    print(f"micro: two conv-IN-LeakyReLU blocks {channels}, input {list(shape)}, fwd+bwd",
          flush=True)
    fns = {f"jax_{impl}": jax_micro_step(impl, shape, channels, dtype) for impl in impls}
    fns["torch"] = torch_micro_step(shape, channels)
    times = interleaved(fns, repeats, warmup)
    return {"case": "micro", "input": list(shape), "channels": list(channels), "dtype": dtype,
            "times": times, "ratio_to_torch": _ratios(times, "torch"),
            "best_ratio_to_torch": _best_ratios(times, "torch")}


def default_plan(features):
    """3x3x3 kernels everywhere, stride 1 then 2 per stage (the demo config's plan)."""
    n = len(features)
    return ((3, 3, 3),) * n, ((1, 1, 1),) + ((2, 2, 2),) * (n - 1)


def config_plan(name):
    """(patch, features, kernels, strides) of configs/lidia.py's variant `name`."""
    from lidia_jax.config_file import load_config
    from lidia_jax.model.encoder import stage_features
    c = load_config(name)
    m = c.model
    features = stage_features(len(m.strides), m.base_features, m.max_features)
    return (tuple(c.input.patch_size), features, tuple(map(tuple, m.kernel_sizes)),
            tuple(map(tuple, m.strides)))


def run_unet(impls, repeats, warmup, patch=(32, 64, 64), batch=2, features=(16, 32, 64, 128),
             full_model=True, dtype="float32", plan=None):
    """plan: (kernels, strides) per stage; default_plan(features) when None."""
    kernels, strides = plan or default_plan(features)
    print(f"unet: features {features}, kernels {kernels}, strides {strides}, patch {patch}, "
          f"batch {batch}, training step", flush=True)
    fns = {f"jax_unet_{impl}": jax_unet_step(impl, patch, batch, features, kernels, strides,
                                             dtype_name=dtype)
           for impl in impls}
    if full_model:
        fns["jax_lidia_per_voxel_early_auto"] = jax_unet_step(
            "auto", patch, batch, features, kernels, strides, True, dtype)
    fns["torch_plainconvunet"] = torch_unet_step(patch, batch, features, kernels, strides,
                                                 amp=dtype == "bfloat16")
    times = interleaved(fns, repeats, warmup)
    return {"case": "unet", "patch": list(patch), "batch": batch, "features": list(features),
            "kernels": [list(k) for k in kernels], "strides": [list(s) for s in strides],
            "dtype": dtype, "times": times,
            "ratio_to_torch": _ratios(times, "torch_plainconvunet"),
            "best_ratio_to_torch": _best_ratios(times, "torch_plainconvunet")}


def environment():
    import jax
    import torch
    from lidia_jax.model.conv import resolve_impl
    return {"jax": jax.__version__, "torch": torch.__version__,
            "jax_devices": [d.device_kind for d in jax.devices()],
            "torch_device": str(torch_device()) + (
                f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
            "backend": jax.default_backend(), "auto_impl": resolve_impl("auto"),
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"), "machine": platform.processor()
            or platform.machine(), "load_avg": os.getloadavg()}


def run_benchmark(repeats=3, warmup=1, quick=False, impls=DEFAULT_IMPLS, micro=False,
                  unet=True):
    """Entry point of scripts/benchmark.py's "unet" section. quick: 16x32x32 patch, 1 repeat."""
    out = {"environment": environment(), "cases": []}
    if micro:
        shape = (1, 16, 32, 32, 4) if quick else (2, 64, 64, 64, 4)
        out["cases"].append(run_micro(impls, 1 if quick else repeats, warmup, shape))
    if unet:
        patch = (16, 32, 32) if quick else (32, 64, 64)
        out["cases"].append(run_unet(impls, 1 if quick else repeats, warmup, patch))
    return out


def markdown(result):
    env = result["environment"]
    lines = ["# U-Net: lidia_jax vs nnU-Net PlainConvUNet (PyTorch)", "",
             f"jax {env['jax']} ({env['backend']}: {', '.join(env.get('jax_devices', []))}; "
             f"conv_impl auto -> {env['auto_impl']}), torch {env['torch']} "
             f"({env.get('torch_device', 'cpu')}, {env['torch_threads']} threads), "
             f"{env['cpus']} CPUs, "
             f"load average at start {tuple(round(v, 1) for v in env['load_avg'])}, "
             f"XLA_FLAGS={env['XLA_FLAGS']!r}, "
             f"GLIBC_TUNABLES {env.get('GLIBC_TUNABLES') or 'unset'}", ""]
    for case in result["cases"]:
        if case["case"] == "micro":
            lines.append(f"## Micro: two conv-IN-LeakyReLU blocks {case['channels']}, "
                         f"input {case['input']}, forward + backward ({case['dtype']})")
        else:
            plan = (f", kernels {case['kernels']}, strides {case['strides']}"
                    if "kernels" in case else "")
            torch_dtype = " (PyTorch: bfloat16 autocast)" if case["dtype"] == "bfloat16" else ""
            lines.append(f"## U-Net training step: features {case['features']}{plan}, patch "
                         f"{case['patch']}, batch {case['batch']} ({case['dtype']}"
                         f"{torch_dtype})")
        lines += ["", "| contender | median s | runs s | first call s | ratio to torch "
                  "(medians) | ratio to torch (fastest runs) |", "|---|---|---|---|---|---|"]
        for name, t in case["times"].items():
            ratio = case["ratio_to_torch"].get(name, 1.0)
            best = case["best_ratio_to_torch"].get(name, 1.0)
            lines.append(f"| {name} | {t['median_s']:.3f} | "
                         f"{', '.join(f'{v:.2f}' for v in t['runs_s'])} | {t['first_s']:.1f} | "
                         f"{ratio:.2f} | {best:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro", action="store_true", help="issue 7's two-block micro-benchmark")
    p.add_argument("--unet", action="store_true", help="U-Net training step (default when "
                   "--micro is not given)")
    p.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS),
                   help="lidia_jax conv impls to time (config.model.conv_impl values)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--patch", type=int, nargs=3, default=[32, 64, 64])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--config", default="", help="take patch, features, kernels and strides "
                   "from this configs/lidia.py variant (e.g. paper), overriding the three above")
    p.add_argument("--micro-shape", type=int, nargs=5, default=[2, 64, 64, 64, 4])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="JAX compute dtype (PyTorch stays float32)")
    p.add_argument("--no-full-model", action="store_true",
                   help="skip the build_model(per_voxel, early) row")
    p.add_argument("--out", default="", help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    try:
        import dynamic_network_architectures  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        sys.exit(f"benchmark_unet.py needs the bench extra: pip install -e '.[bench]' ({e})")
    result = {"environment": environment(), "cases": []}
    if args.micro:
        result["cases"].append(run_micro(args.impls, args.repeats, args.warmup,
                                         tuple(args.micro_shape), dtype=args.dtype))
    if args.unet or not args.micro:
        patch, features, plan = tuple(args.patch), tuple(args.features), None
        if args.config:
            patch, features, *plan = config_plan(args.config)
        result["cases"].append(run_unet(args.impls, args.repeats, args.warmup, patch,
                                        args.batch, features, not args.no_full_model,
                                        args.dtype, plan))
    md = markdown(result)
    print(md)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(md + "\n")
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
