"""The pure training and evaluation steps, and their jitted builds on a device layout.

A step is a pure function of the `TrainState`, a batch and a key; `build_steps` jits the steps of one model for a
`parallel.Layout` (one device, a mesh that splits each batch, or seeds stacked along a replica axis), which is
what the trainer, the benchmarks and the scaling tests all run. Nothing here reads files or prepares data.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gonjax import parallel, xla
from gonjax.config import Config
from gonjax.zoo import Model, build_model


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step reads and writes; checkpointed as a whole.

    `latent_bank` holds the latents of the model's last `latent_bank_batches` training batches (batch i of the
    ring at rows i*B:(i+1)*B), which the Implicit GON samples from (GON-SPEC 4.6); empty for other models.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    latent_bank: jax.Array


def make_optimizer(config: Config, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """Adam of GON-SPEC 5: betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping; the learning rate drops
    to config.lr_drop_to at epoch config.lr_drop_epoch when one is set (Implicit GON on COIL-20)."""
    lr = config.lr
    if config.lr_drop_epoch is not None:
        lr = optax.piecewise_constant_schedule(
            config.lr, {config.lr_drop_epoch * steps_per_epoch: config.lr_drop_to / config.lr})
    return optax.chain(scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), optax.scale_by_learning_rate(lr))


def scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """`optax.scale_by_adam`'s update and state (so `optax.adam`'s checkpoints restore), with Adam's bias
    corrections 1 - b^t computed as -expm1(t log b).

    optax computes b^t in the moments' precision: in float32, b2 = 0.999 is 1.3e-8 off, so 1 - b2^t is 1.3e-5
    off at t = 1 and ~1e-5 for hundreds of steps, which scales every early Adam step by a few parts in 1e6. In an
    Implicit GON that alone moved float32 loss curves 6e-4 from the float64 one within 50 steps, against 1.2e-5
    with -expm1(t log b), accurate to float32 rounding (benchmarks/README.md, "The SIREN's sine"). PyTorch computes
    the corrections in float64.
    """
    log_b1, log_b2 = math.log(b1), math.log(b2)
    init = optax.scale_by_adam(b1=b1, b2=b2, eps=eps).init

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * jnp.square(g) + b2 * v, updates, state.nu)
        count = optax.safe_increment(state.count)
        steps_taken = count.astype(jnp.result_type(float))
        correction_1, correction_2 = -jnp.expm1(steps_taken * log_b1), -jnp.expm1(steps_taken * log_b2)
        scaled = jax.tree.map(lambda m, v: (m / correction_1.astype(m.dtype))
                              / (jnp.sqrt(v / correction_2.astype(v.dtype)) + eps), mu, nu)
        return scaled, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def create_train_state(model: Model, optimizer: optax.GradientTransformation, rng: jax.Array,
                       sample_batch: jax.Array, variables: dict | None = None) -> TrainState:
    """Step 0 with fresh Adam moments, from `model.init` or from given `variables` (e.g. ported weights)."""
    if variables is None:
        variables = model.init(rng, sample_batch)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    params = variables["params"]
    _, (_, output) = jax.eval_shape(model.apply, params, variables.get("batch_stats", {}), sample_batch, rng)
    bank_rows = model.latent_bank_batches * sample_batch.shape[0]
    bank_shape = (bank_rows, *output.latent.shape[1:]) if bank_rows else (0,)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=optimizer.init(params),
                      latent_bank=jnp.zeros(bank_shape, sample_batch.dtype))


def make_train_step(model: Model, optimizer: optax.GradientTransformation):
    """train_step(state, batch, rng) -> (state, metrics): one Adam step on the model's loss.

    The key of a step is fold_in(rng, step), so no key is threaded through Python. Jit it with
    `donate_argnums=0`.
    """

    def train_step(state: TrainState, batch: jax.Array, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        grad_fn = jax.value_and_grad(model.apply, has_aux=True)
        (_, (batch_stats, output)), grads = grad_fn(state.params, state.batch_stats, batch, step_rng, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        bank = state.latent_bank
        if model.latent_bank_batches:
            slot = (state.step % model.latent_bank_batches) * batch.shape[0]
            bank = jax.lax.dynamic_update_slice_in_dim(bank, output.latent.astype(bank.dtype), slot, axis=0)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                                  latent_bank=bank)
        return new_state, output.metrics

    return train_step


def make_eval_step(model: Model):
    """eval_step(state, batch, rng) -> (metrics, reconstruction). BN uses the batch's statistics, as in training
    (GON-SPEC 3); running averages are left as they are."""

    def eval_step(state: TrainState, batch: jax.Array, rng: jax.Array):
        _, (_, output) = model.apply(state.params, state.batch_stats, batch, rng, state.step)
        return output.metrics, output.reconstruction

    return eval_step


class Steps(NamedTuple):
    """A model's steps jitted for one layout (`build_steps`).

    train(state, batch, rng) -> (state, metrics), the state donated;
    eval(state, batch, rng) -> (metrics, reconstruction);
    sample(params, batch_stats, rng, n) -> images from the prior (n static), or None for models without one.
    With seeds stacked (`layout.stacked`) the state, the training batch, the train keys and every output carry a
    leading replica axis; an evaluation batch is shared by the replicas, its keys are not.
    """

    train: Callable
    eval: Callable
    sample: Callable | None


def build_steps(model: Model, optimizer: optax.GradientTransformation, layout: parallel.Layout) -> Steps:
    """The model's train step, eval step and prior sampler, jitted with the layout's shardings (vmapped over
    stacked replicas)."""
    rep = layout.replicated
    train, evaluate_batch, sample = layout_steps(model, optimizer, layout)
    return Steps(
        train=xla.jit(train, donate_argnums=0, in_shardings=(layout.state, layout.train_batch, rep),
                      out_shardings=(layout.state, rep)),
        eval=xla.jit(evaluate_batch, in_shardings=(layout.state, layout.eval_batch, rep), out_shardings=rep),
        sample=xla.jit(sample, static_argnums=3, out_shardings=rep) if sample is not None else None)


def layout_steps(model: Model, optimizer: optax.GradientTransformation, layout: parallel.Layout) -> Steps:
    """The model's steps, not yet jitted, for `layout`: vmapped over the replica axis when seeds are stacked (an
    evaluation batch shared by the replicas, its keys not)."""
    train, evaluate_batch, sample = make_train_step(model, optimizer), make_eval_step(model), model.sample
    if layout.stacked:
        train = jax.vmap(train)
        evaluate_batch = jax.vmap(evaluate_batch, in_axes=(0, None, 0))
        if sample is not None:
            one_sample = sample

            def sample(params, batch_stats, rngs, n):
                return jax.vmap(lambda p, s, r: one_sample(p, s, r, n))(params, batch_stats, rngs)

    return Steps(train, evaluate_batch, sample)


def eval_keys(eval_rng: np.ndarray, step: int, split: int, batches: int) -> np.ndarray:
    """(batches, 2) keys of one evaluation pass: batch i of split s (0 train, 1 test) after `step` gets
    fold_in(split(fold_in(eval_rng, step))[s], i)."""
    rng = jax.random.split(jax.random.fold_in(jnp.asarray(eval_rng), step))[split]
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batches)))


def wait_for(arrays) -> None:
    """Wait until the computations producing `arrays` have finished (JAX dispatches asynchronously; a stop must
    not leave any running when the interpreter exits). Arrays a failed step had already donated are gone: there
    is nothing to wait for then."""
    try:
        jax.block_until_ready(arrays)
    except RuntimeError:
        pass


def time_steps(config: Config, image_shape: tuple[int, int, int], repeats: int = 3) -> tuple[float, float]:
    """Median seconds of one training step and of one evaluation batch of `config` on this machine, measured on
    random images of `image_shape` after a first (compiling) call. For planning, not benchmarking."""
    model = build_model(config, image_shape[-1])
    rng = jax.random.PRNGKey(0)
    images = jax.random.uniform(rng, (config.batch_size, *image_shape))
    optimizer = make_optimizer(config)
    state = create_train_state(model, optimizer, rng, images)
    train_step = xla.jit(make_train_step(model, optimizer), donate_argnums=0)
    eval_step = xla.jit(make_eval_step(model))
    train_times, eval_times = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(train_step(state, images, rng))
        train_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        jax.block_until_ready(eval_step(state, images, rng))
        eval_times.append(time.perf_counter() - start)
    return float(np.median(train_times[1:])), float(np.median(eval_times[1:]))
