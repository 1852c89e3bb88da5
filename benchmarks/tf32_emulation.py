"""What TF32 contractions would do to gonjax's float32 training, measured on a CPU by emulating them.

    python -m benchmarks.tf32_emulation --manual-dir ../shared/data --steps 300 --implicit-steps 150 --seeds 2
                                        [--json FILE]

On Ampere and Hopper GPUs, JAX's default float32 matmul and convolution precision is TF32: each operand is rounded
to a 10-bit mantissa before an exact float32 accumulation. gonjax pins float32 ("highest",
`Config.matmul_precision`) on every backend; this benchmark is the measurement that choice rests on.

`emulate_tf32(f)` rewrites the program of `f` (its jaxpr, after autodiff, so the backward and double-backward
contractions are included) so that every float32 operand of every `dot_general` and `conv_general_dilated` is
first rounded to TF32 (`lax.reduce_precision(x, 8, 10)`); everything else is computed as before. For the GON
(16, 256) on Fashion-MNIST at 32x32 and the Implicit GON on Fashion-MNIST at 28x28 (the spec's settings, batch 64),
with each kernel choice (`Config.kernels`: the XLA:CPU-tuned kernels, or JAX's own primitives as on a GPU), per
seed: the model's own initialisation with that seed, trained on the same batches in float64, in float32, and in
float32 with TF32 contractions; the largest and the last relative distance of each float32 loss curve from the
float64 one.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from gonjax import steps, zoo
from gonjax.config import Config

CONTRACTIONS = ("dot_general", "conv_general_dilated")
# Calls whose body is evaluated inline (a differentiated program keeps its custom-rule calls as calls of the
# primal body; their derivatives are already spelled out around them).
INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "checkpoint": "jaxpr",
           "remat": "jaxpr"}
KERNELS = ("xla_cpu", "autodiff")
MODELS = {"gon": dict(model="gon", dataset="fashion_mnist"),
          "implicit_gon": dict(model="implicit_gon", dataset="fashion_mnist")}


def to_tf32(x: jax.Array) -> jax.Array:
    """A float32 array rounded to TF32 (8 exponent bits, 10 mantissa bits, round to nearest even); others as
    they are."""
    return lax.reduce_precision(x, exponent_bits=8, mantissa_bits=10) if x.dtype == jnp.float32 else x


def _sub_jaxprs(eqn) -> list:
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                found.append(inner)
    return found


def _has_contraction(jaxpr) -> bool:
    return any(eqn.primitive.name in CONTRACTIONS or any(_has_contraction(j) for j in _sub_jaxprs(eqn))
               for eqn in jaxpr.eqns)


def _evaluate(jaxpr, consts, args, counter: list[int]) -> list:
    """Evaluate `jaxpr` with TF32 operands in every contraction (`counter[0]` counts those rewritten)."""
    env = {}

    def read(var):
        return var.val if isinstance(var, jcore.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        values = [read(var) for var in eqn.invars]
        name = eqn.primitive.name
        if name in INLINED:
            inner = eqn.params[INLINED[name]]
            body, inner_consts = getattr(inner, "jaxpr", inner), getattr(inner, "consts", [])
            if name.startswith("custom"):  # the primal body takes the operands after the rule's own consts
                values = values[len(values) - len(body.invars):]
            outputs = _evaluate(body, inner_consts, values, counter)
        else:
            if name in CONTRACTIONS:
                values = [to_tf32(v) for v in values]
                counter[0] += 1
            elif any(_has_contraction(j) for j in _sub_jaxprs(eqn)):
                raise NotImplementedError(f"TF32 emulation does not reach into {name}'s contractions")
            outputs = eqn.primitive.bind(*values, **eqn.params)
            if not eqn.primitive.multiple_results:
                outputs = [outputs]
        env.update(zip(eqn.outvars, outputs))
    return [read(var) for var in jaxpr.outvars]


def emulate_tf32(fun: Callable, counter: list[int] | None = None) -> Callable:
    """`fun` with every float32 contraction of its program computed from TF32-rounded operands (jit the result).
    `counter`, if given, receives the number of contractions rewritten (in counter[0]) at each trace."""
    def emulated(*args):
        closed, shapes = jax.make_jaxpr(fun, return_shape=True)(*args)
        seen = [0]
        flat = _evaluate(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args), seen)
        if counter is not None:
            counter[0] = seen[0]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), flat)

    return emulated


def _curve(config: Config, batches: np.ndarray, seed: int, dtype, tf32: bool = False) -> list[float]:
    """The loss per step of `config`'s model from its initialisation with `seed`, trained on `batches` in `dtype`
    (with TF32 contractions if `tf32`)."""
    model = zoo.build_model(config, 1, backend="cpu")
    optimizer = steps.make_optimizer(config)
    sample = jnp.asarray(batches[0], dtype)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.init(jax.random.PRNGKey(seed), sample))
    state = steps.create_train_state(model, optimizer, jax.random.PRNGKey(seed), sample, variables)
    train_step = steps.make_train_step(model, optimizer)
    train_step = jax.jit(emulate_tf32(train_step) if tf32 else train_step)
    key = jax.random.PRNGKey(seed)
    curve = []
    for batch in batches:
        state, metrics = train_step(state, jnp.asarray(batch, dtype), key)
        curve.append(float(metrics["loss"]))
    return curve


def _distances(curve: list[float], reference: list[float]) -> dict:
    """Relative distances of a loss curve from the float64 one: at the first step (the forward pass at the same
    weights), the largest over the first 10 steps (before trajectories part), the median, largest and last."""
    relative = [abs(a - b) / abs(b) for a, b in zip(curve, reference)]
    return {"first": float(relative[0]), "max_first_10": float(max(relative[:10])),
            "max": float(max(relative)), "last": float(relative[-1]), "median": float(statistics.median(relative))}


def measure(name: str, kernels: str, images: np.ndarray, seed: int, steps_count: int, batch: int = 64) -> dict:
    """One model, kernel choice and seed: float32 and TF32 curves against float64, on `images` (N, H, W, 1) at
    the model's size."""
    config = Config(**MODELS[name], kernels=kernels)
    order = np.random.default_rng(seed).permutation(len(images))[: steps_count * batch]
    batches = images[order].reshape(steps_count, batch, *images.shape[1:]).astype(np.float64)
    with jax.enable_x64(True):
        reference = _curve(config, batches, seed, jnp.float64)
    return {"model": name, "kernels": kernels, "seed": seed, "steps": steps_count,
            "float64_first_last": [reference[0], reference[-1]],
            "float32": _distances(_curve(config, batches, seed, jnp.float32), reference),
            "tf32": _distances(_curve(config, batches, seed, jnp.float32, tf32=True), reference)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tf32_emulation", description=__doc__.splitlines()[0])
    parser.add_argument("--manual-dir", default=None, help="folder of the official Fashion-MNIST files")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the GON")
    parser.add_argument("--implicit-steps", type=int, default=150, help="training steps of the Implicit GON")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--models", default="gon,implicit_gon")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    from gonjax.data import input_pipeline

    rows = []
    for name in args.models.split(","):
        count = args.steps if name == "gon" else args.implicit_steps
        size = zoo.build_model(Config(**MODELS[name]), 1, backend="cpu").image_size  # GON 32 (resized), SIREN 28
        images = np.asarray(input_pipeline.load_dataset("fashion_mnist", size, args.data_dir, args.manual_dir).train)
        for kernels in KERNELS:
            for seed in range(args.seeds):
                row = measure(name, kernels, images, seed, count)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json is not None:
                    args.json.write_text(json.dumps({"rows": rows, "jax": jax.__version__}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
