"""The SIREN's float32 sine, measured: `gonjax.kernels.sine` / `cosine` against XLA's `jnp.sin` / `jnp.cos`.

    python -m benchmarks.sine_accuracy --manual-dir ../shared/data --seeds 5 --steps 50 --json FILE [--torch]
    python -m benchmarks.sine_accuracy --time 60     # the Implicit GON's step with each sine, side by side

1. **Accuracy where the SIREN computes it.** The arguments w0 (W h + b) of every hidden layer of the Implicit GON
   (GON-SPEC 2.4), computed in float64 from the weights on the first batch's origin-step latents, at the PyTorch
   initialisation and after the float64 steps of part 2 (a million drawn at random from each), rounded to float32:
   the error of each float32 sine and cosine of them against float64 sin / cos, in float32 ulps of the true value
   (0.5 = correctly rounded) and absolutely.
2. **Trajectories.** Per seed: the authors' Implicit GON (`Config(semantics="authors")`: lr 1e-4, pixels summed)
   from PyTorch's initialisation with that seed, on the same `--steps` Fashion-MNIST batches of 64, trained in
   float64 and in float32 with each sine (and by PyTorch in float32 with `--torch`); the largest relative distance
   of each float32 loss curve from the float64 one over the steps. Rounding differences grow along a training
   trajectory, so one trajectory proves little: the seeds make it a distribution.
3. **Step time** (`--time N`): the spec's Implicit GON training step (Fashion-MNIST shapes, batch 64, float32)
   with each sine, N steps each in alternating blocks of 5 after a warm-up, medians in ms. `jnp.sin` is XLA's, the
   same in every gonjax version, so the ratio to it compares `kernels.sine` across versions run one after the other.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import torch_reference as tr
from gonjax import kernels, steps, xla, zoo
from gonjax.config import Config
from gonjax.models import coordinate_grid

W0 = 30.0
SINES = {"kernels.sine": "xla_cpu", "jnp.sin": "autodiff"}  # the SIREN's sine per Config.kernels


def _config(**overrides) -> Config:
    """The authors' Implicit GON on Fashion-MNIST (lr 1e-4, pixels summed), where the float32 drift was seen."""
    return Config(model="implicit_gon", dataset="fashion_mnist", semantics="authors", **overrides)


def sine_arguments(params: dict, latents: np.ndarray, size: int = 28, keep: int = 1_000_000,
                   seed: int = 0) -> np.ndarray:
    """`keep` of the hidden layers' arguments w0 (W h + b) for `latents` (B, nz) at the size x size grid, drawn
    uniformly from all of them (51 M for a batch of 64 at 28x28), in float64."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    coords = np.asarray(coordinate_grid(size, jnp.float32), np.float64)
    first = p["hidden1"]
    per_pixel, per_image = coords @ first["kernel"][:2], latents @ first["kernel"][2:] + first["bias"]
    arguments = [W0 * (per_pixel[None] + per_image[:, None])]
    h = np.sin(arguments[-1])
    for name in ("hidden2", "hidden3", "hidden4"):
        arguments.append(W0 * (h @ p[name]["kernel"] + p[name]["bias"]))
        h = np.sin(arguments[-1])
    every = np.concatenate([a.ravel() for a in arguments])
    return every[np.random.default_rng(seed).choice(every.size, size=min(keep, every.size), replace=False)]


def ulp_errors(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the float32 spacing at the true value."""
    return np.abs(got.astype(np.float64) - exact) / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)


def accuracy(arguments: np.ndarray) -> dict:
    """Error statistics of each float32 sine and cosine on float32(arguments), against float64."""
    x = arguments.astype(np.float32)
    x64 = x.astype(np.float64)
    functions = {"kernels.sine": kernels.sine, "jnp.sin": jnp.sin, "kernels.cosine": kernels.cosine,
                 "jnp.cos": jnp.cos}
    out = {"arguments": len(x), "abs_max_argument": float(np.abs(x64).max()),
           "p99_abs_argument": float(np.quantile(np.abs(x64), 0.99))}
    for name, fn in functions.items():
        exact = (np.cos if "cos" in name else np.sin)(x64)
        got = np.asarray(jax.jit(fn)(x))
        ulps = ulp_errors(got, exact)
        out[name] = {"max_ulp": float(ulps.max()), "mean_ulp": float(ulps.mean()),
                     "p99_ulp": float(np.quantile(ulps, 0.99)),
                     "share_correctly_rounded": float(np.mean(got == exact.astype(np.float32))),
                     "share_within_1_ulp": float(np.mean(ulps <= 1.0)),
                     "max_abs_error": float(np.abs(got - exact).max())}
    return out


def _training(config: Config, sample: jax.Array, variables: dict | None = None, jit=xla.jit):
    """The training step of `config`'s model jitted by `jit` (default: as the trainer compiles it, gonjax.xla),
    and its first state: from `variables` (cast to the sample's dtype) or the model's own initialisation."""
    model = zoo.build_model(config, 1, backend="cpu")
    optimizer = steps.make_optimizer(config)
    if variables is not None:
        variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, sample.dtype), variables)
    state = steps.create_train_state(model, optimizer, jax.random.PRNGKey(0), sample, variables)
    return jit(steps.make_train_step(model, optimizer)), state


def _gonjax_curve(variables: dict, batches: np.ndarray, dtype, kernel_choice: str) -> tuple[list[float], dict]:
    """Loss per step of gonjax's Implicit GON trained on `batches` in `dtype`, and the final parameters."""
    # plain jax.jit, as the trajectories in benchmarks/README.md were measured
    train_step, state = _training(_config(kernels=kernel_choice), jnp.asarray(batches[0], dtype), variables,
                                  jit=jax.jit)
    key = jax.random.PRNGKey(0)
    curve = []
    for batch in batches:
        state, metrics = train_step(state, jnp.asarray(batch, dtype), key)
        curve.append(float(metrics["loss"]))
    return curve, state.params


def _torch_curve(variables: dict, batches: np.ndarray) -> list[float]:
    """The PyTorch reference's float32 loss per step, from the same weights."""
    import torch

    config = _config()
    module = tr.Siren(nz=config.nz).float()
    tr.load_flax_variables(module, variables)
    optimizer = tr.make_adam(module, config.lr)
    return [float(tr.implicit_gon_train_step(module, optimizer, torch.from_numpy(b.astype(np.float32)), "sum").loss)
            for b in batches]


def step_times(count: int, block: int = 5) -> dict:
    """Median ms of the spec's Implicit GON training step with each SIREN sine, in alternating blocks."""
    images = jax.random.uniform(jax.random.PRNGKey(0), (64, 28, 28, 1))
    runs = {name: list(_training(Config(model="implicit_gon", dataset="fashion_mnist", kernels=choice), images))
            for name, choice in SINES.items()}
    samples = {name: [] for name in runs}
    for name, run in runs.items():  # compile and warm up
        for _ in range(2):
            run[1], _ = run[0](run[1], images, jax.random.PRNGKey(1))
        jax.block_until_ready(run[1])
    while min(len(v) for v in samples.values()) < count:
        for name, run in runs.items():
            run[1], metrics = run[0](run[1], images, jax.random.PRNGKey(1))  # one untimed: the other's caches
            jax.block_until_ready(metrics)
            for _ in range(block):
                start = time.perf_counter()
                run[1], metrics = run[0](run[1], images, jax.random.PRNGKey(1))
                jax.block_until_ready(metrics)
                samples[name].append(time.perf_counter() - start)
    medians = {name: 1000 * statistics.median(v) for name, v in samples.items()}
    return {"median_ms": medians, "ratio_kernels_to_jnp": medians["kernels.sine"] / medians["jnp.sin"],
            "steps": count}


def _drift(curve: list[float], reference: list[float]) -> float:
    return float(max(abs(a - b) / abs(b) for a, b in zip(curve, reference)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sine_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--manual-dir", default=None, help="folder of the official Fashion-MNIST files")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--torch", action="store_true", help="also PyTorch's own float32 trajectory")
    parser.add_argument("--time", type=int, default=None, metavar="N",
                        help="only time the Implicit GON's step with each sine, N steps each")
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args(argv)
    if args.time is not None:
        print(json.dumps(step_times(args.time), indent=1))
        return 0

    import torch
    from gonjax.data import input_pipeline

    train = input_pipeline.load_dataset("fashion_mnist", 28, args.data_dir, args.manual_dir).train
    config = _config()
    batch = config.batch_size
    results = {"config": {"seeds": args.seeds, "steps": args.steps, "batch_size": batch, "lr": config.lr,
                          "loss_reduction": config.loss_reduction}, "seeds": []}
    arguments = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        variables = tr.flax_variables(tr.Siren(nz=config.nz).double())
        order = np.random.default_rng(seed).permutation(len(train))[: args.steps * batch]
        batches = train[order].reshape(args.steps, batch, 28, 28, 1).astype(np.float64)
        with jax.enable_x64(True):
            reference, trained = _gonjax_curve(variables, batches, jnp.float64, "autodiff")
            model = zoo.build_model(config, 1, backend="cpu")
            for params in (variables["params"], trained):
                latents = model.encode(jax.tree_util.tree_map(jnp.asarray, params), {}, jnp.asarray(batches[0]),
                                       jax.random.PRNGKey(0))
                arguments.append(sine_arguments(params, np.asarray(latents)))
        entry = {"seed": seed, "float64_first_last": [reference[0], reference[-1]]}
        for name, choice in SINES.items():
            curve, _ = _gonjax_curve(variables, batches, jnp.float32, choice)
            entry[name] = _drift(curve, reference)
        if args.torch:
            entry["pytorch float32"] = _drift(_torch_curve(variables, batches), reference)
        results["seeds"].append(entry)
        print(json.dumps(entry), flush=True)
    results["accuracy"] = accuracy(np.concatenate(arguments))
    names = list(SINES) + (["pytorch float32"] if args.torch else [])
    results["drift_median"] = {n: statistics.median(e[n] for e in results["seeds"]) for n in names}
    results["drift_max"] = {n: max(e[n] for e in results["seeds"]) for n in names}
    print(json.dumps({k: results[k] for k in ("accuracy", "drift_median", "drift_max")}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
