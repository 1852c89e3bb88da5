"""Float64 checks of one train step and one eval step on several (fake CPU) devices and of stacked seeds, run as
a script by tests/test_scaling.py in a process of its own (the device count is fixed when JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scaling_checks.py devices gon
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scaling_checks.py seeds vgon
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scaling_checks.py both ae

prints one JSON object {check: largest relative error}. The reference is always the plain step: jitted on one
device, unsharded, one seed at a time.
"""
from __future__ import annotations

import json
import re
import sys

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from gonjax import parallel, steps, zoo
from gonjax.config import Config

TINY = dict(dataset="coil20", ngf=4, batch_size=8, epochs=1)
NZ = {"implicit_gon": 8}
# The batch of 8 split in two (4 examples per device) and over every device (1 each, so each device's batch-norm
# statistics are those of one example unless the step reduces them across devices, as it must).
DEVICE_COUNTS = (2, 8)



def _jit(fn, **kwargs):
    """jax.jit compiling fast (LLVM at -O0, XLA:CPU's older loop emitters for fusions: half the compile time
    of a float64 step here): each of these programs runs once or twice, and both options change only how the
    partitioned program, the thing compared, becomes machine code."""
    options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    return jax.jit(fn, compiler_options=options, **kwargs)


def _config(name: str) -> Config:
    model, _, variant = name.partition("_detached")
    return Config(model=model if name != "implicit_gon" else name, detach=bool(_), nz=NZ.get(name, 8), **TINY)


def _float64_state(model, optimizer, seed: int, images):
    """A float64 train state from the model's init with every batch norm's scale and bias moved by N(0, 0.1^2):
    with beta = 0 the GON's BN outputs at the origin lie on ELU's kink, where rounding noise (which the device
    count changes) would choose the second derivative (tests/test_parity.py explains)."""

    @_jit
    def create(rng, images):
        variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), model.init(rng, images))
        paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]

        def moved(path, x):
            name = jax.tree_util.keystr(path)
            if "['bn" not in name:
                return x
            return x + 0.1 * jax.random.normal(jax.random.fold_in(rng, 1 + paths.index(name)), x.shape, x.dtype)

        variables = {**variables, "params": jax.tree_util.tree_map_with_path(moved, variables["params"])}
        return steps.create_train_state(model, optimizer, rng, images, variables)

    return create(jax.random.PRNGKey(seed), images)


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| over every leaf of a pytree together (the relative error of a
    gradient, a parameter set, an optimizer state as one vector). Per-entry errors would measure rounding noise
    instead: a bias feeding batch norm has gradient 0 in exact arithmetic, and a sum with cancellation (the
    output bias's gradient) has a relative error of eps times its condition number."""
    pairs = [(np.asarray(a, np.float64), np.asarray(e, np.float64))
             for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected))]
    assert len(pairs) == len(jax.tree_util.tree_leaves(expected))
    difference = np.sqrt(sum(float(np.sum((a - e) ** 2)) for a, e in pairs))
    norm = np.sqrt(sum(float(np.sum(e ** 2)) for _, e in pairs))
    return float(difference / norm) if norm else float(difference)


BIAS_BEFORE_BN = re.compile(r"\['(de)?conv[123]'\]\['bias'\]$")  # gradient 0 in exact arithmetic


def without_bias_before_bn(params):
    """`params` with the biases that feed a batch norm set to 0. Their gradient is 0 in exact arithmetic, so
    Adam's first update g / (|g| + eps) of them is rounding noise divided by eps (up to lr itself), different on
    every device count; `bias_noise` checks that their gradients are noise."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if BIAS_BEFORE_BN.search(jax.tree_util.keystr(path)) else x, params)


def bias_noise(grads) -> float:
    """The largest gradient of a bias feeding batch norm over the largest gradient (0 in exact arithmetic)."""
    flat = [(path, np.asarray(g)) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]]
    largest = max(float(np.abs(g).max()) for _, g in flat)
    return max((float(np.abs(g).max()) / largest for path, g in flat
                if BIAS_BEFORE_BN.search(jax.tree_util.keystr(path))), default=0.0)


def quantities(gradient_part, step_part, eval_part) -> dict:
    """The quantities compared, by name: gradients, loss, latent, reconstruction and BN state of the step,
    the parameters, Adam state, BN state and latent bank after the update, every metric of the train and eval
    steps, the eval reconstruction."""
    named = {}
    if gradient_part is not None:
        grads, loss, stats, output = gradient_part
        named.update({"gradients": grads, "loss": loss, "bn state of the pass": stats,
                      "reconstruction": output.reconstruction})
        if output.latent is not None:
            named["latent"] = output.latent
    state, metrics = step_part
    named.update({"params after Adam": without_bias_before_bn(state.params), "Adam state": state.opt_state,
                  "BN state after the step": state.batch_stats, "latent bank": state.latent_bank,
                  **{f"train {k}": v for k, v in metrics.items()}})
    eval_metrics, eval_reconstruction = eval_part
    named.update({f"eval {k}": v for k, v in eval_metrics.items()})
    named["eval reconstruction"] = eval_reconstruction
    return named


def compare(actual: dict, expected: dict, prefix: str) -> dict[str, float]:
    assert actual.keys() == expected.keys()
    return {f"{prefix}{name}": relative_error(actual[name], expected[name]) for name in expected
            if jax.tree_util.tree_leaves(expected[name]) and np.size(jax.tree_util.tree_leaves(expected[name])[0])}


def _one_step(model, optimizer):
    """step(state, batch, rng) -> ((grads, loss, BN state, output) of the loss, the trainer's train step, its eval
    step): one function, so one compilation per device count."""
    train_step, eval_step = steps.make_train_step(model, optimizer), steps.make_eval_step(model)

    def step(state, batch, rng):
        step_rng = jax.random.fold_in(rng, state.step)
        (loss, (stats, output)), grads = jax.value_and_grad(model.apply, has_aux=True)(
            state.params, state.batch_stats, batch, step_rng, state.step)
        return (grads, loss, stats, output), train_step(state, batch, rng), eval_step(state, batch, rng)

    return step


def traced_once(fn, *args):
    """`fn` replayed from one trace (its jaxpr at the avals of `args`): jitting the replay under several
    shardings compiles the very program jitting `fn` would, without tracing its Python (autodiff through the
    origin step) again for every device count."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    program = jax.extend.core.jaxpr_as_fun(closed)
    out_tree = jax.tree_util.tree_structure(out_shape)
    return lambda *inputs: jax.tree_util.tree_unflatten(out_tree, program(*jax.tree_util.tree_leaves(inputs)))


def _setup(name: str):
    config = _config(name)
    model = zoo.build_model(config, 1)
    return config, model, steps.make_optimizer(config), model.image_size


def devices_check(name: str) -> dict[str, float]:
    """One float64 train step (gradients, loss, latent, reconstruction, BN state, params and Adam state after the
    update) and one eval step on 2 and 8 devices (DEVICE_COUNTS) against the one-device step; and no retrace
    across steps on a mesh."""
    config, model, optimizer, size = _setup(name)
    images = jax.random.uniform(jax.random.PRNGKey(7), (config.batch_size, size, size, 1), jnp.float64)
    rng = jax.random.PRNGKey(3)
    state = _float64_state(model, optimizer, 0, images)
    step = traced_once(_one_step(model, optimizer), state, images, rng)
    reference = _jit(step)(state, images, rng)
    errors = {}
    for devices in DEVICE_COUNTS:
        layout = parallel.make_layout(devices, config.batch_size)
        rep, batch = layout.replicated, layout.train_batch
        placed = jax.device_put(state, layout.state), layout.put(images, batch), layout.put(rng, rep)
        assert tuple(placed[1].sharding.spec) == ("data",) and len(placed[1].addressable_shards) == devices
        sharded = _jit(step, in_shardings=(layout.state, batch, rep), out_shardings=rep)(*placed)
        errors.update(compare(quantities(*sharded), quantities(*reference), f"{devices} devices: "))
        errors[f"{devices} devices: bias-before-BN gradient / largest gradient"] = bias_noise(sharded[0][0])
    # No recompilation across steps on a mesh (the trainer's step, placed as the trainer places it).
    layout = parallel.make_layout(4, config.batch_size)
    counted = _jit(chex.assert_max_traces(steps.make_train_step(model, optimizer), n=1), donate_argnums=0,
                      in_shardings=(layout.state, layout.train_batch, layout.replicated),
                      out_shardings=(layout.state, layout.replicated))
    placed = jax.device_put(state, layout.state)
    for k in range(3):
        placed, _ = counted(placed, layout.put(np.asarray(images) * (k + 1) / 3, layout.train_batch),
                            layout.put(rng, layout.replicated))
    return errors


def seeds_check(name: str) -> dict[str, float]:
    """Seeds 0, 1, 2 stacked and vmapped in one float64 train step and eval step (the trainer's `_compile` on a
    1-device mesh, and seeds 0, 1 on 4 devices: 2 on the replica axis x 2 on data) against each seed's own step."""
    config, model, optimizer, size = _setup(name)
    step = _jit(_one_step(model, optimizer))
    errors = {}
    for seeds, devices in (((0, 1, 2), 1), ((0, 1), 4)):
        batches = [jax.random.uniform(jax.random.PRNGKey(10 + s), (config.batch_size, size, size, 1), jnp.float64)
                   for s in seeds]
        rngs = [jax.random.PRNGKey(100 + s) for s in seeds]
        states = [_float64_state(model, optimizer, s, batches[0]) for s in seeds]
        expected = [quantities(None, step(st, b, r)[1], step(st, batches[0], r)[2])
                    for st, b, r in zip(states, batches, rngs)]
        layout = parallel.make_layout(devices, config.batch_size, replicas=len(seeds))
        assert layout.stacked and layout.mesh.shape["replica"] == (1 if devices == 1 else 2)
        stacked_train, stacked_eval, _ = steps.build_steps(model, optimizer, layout)
        stack = lambda trees: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)  # noqa: E731
        state = jax.device_put(stack(states), layout.state)
        rng = layout.put(np.stack(rngs), layout.replicated)
        evaluated = stacked_eval(state, layout.put(batches[0], layout.eval_batch), rng)
        stepped = stacked_train(state, layout.put(np.stack(batches), layout.train_batch), rng)
        for k, seed in enumerate(seeds):
            actual = quantities(None, *jax.tree_util.tree_map(lambda x: x[k], (stepped, evaluated)))
            errors.update(compare(actual, expected[k], f"{devices} devices, seed {seed}: "))
    return errors


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    check, name = sys.argv[1:3]
    checks = {"devices": [devices_check], "seeds": [seeds_check], "both": [devices_check, seeds_check]}[check]
    print(json.dumps({key: value for run in checks for key, value in run(name).items()}))
