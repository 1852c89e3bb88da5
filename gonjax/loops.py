"""Many training steps per dispatch, over data that lives on the device (README "Install and run", GPU).

Each split is placed on the device once, as stored: integer codes beside the float32 value of every code
(`input_pipeline.Dataset`), so a batch is `levels[codes[rows]]`, bit for bit the floats the host would have built.
One dispatch runs `count` training steps (at most --steps-per-call, K) as one loop on the device: step i trains on
batch `first + i` of the epoch, the rows `order[(first + i) * B : (first + i + 1) * B]` of the epoch's permutation
(`batches.epoch_order`, placed once per epoch). Evaluation runs `count` batches of a split in stored order the
same way, adding their metrics to the sums it is given, batch after batch, as a loop of single batches would.
Inside the loop is the ordinary step (`steps.make_train_step`, its key fold_in(rng, step)).

`count` is an argument of the program, not part of it: one compiled program serves every call of a run (a full
call, an epoch's shorter tail, the first call of a run resumed mid-epoch), so how a stretch of steps is cut into
calls (`call_plan`) cannot change a bit of what they compute.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gonjax import parallel, xla
from gonjax.steps import TrainState, layout_steps
from gonjax.zoo import Model


class DeviceSplit(NamedTuple):
    """A split on the device: `codes` (N, H, W, C) integers and `levels`, the float32 image value of each code."""

    codes: jax.Array
    levels: jax.Array

    def rows(self, rows: jax.Array) -> jax.Array:
        """The float32 images of `rows` (any shape of indices, e.g. (B,), or (R, B) for stacked replicas)."""
        return self.levels[self.codes[rows]]


def place_split(codes: np.ndarray, levels: np.ndarray, layout: parallel.Layout) -> DeviceSplit:
    """A host split on every device of `layout` (whole on each: a batch's rows may come from anywhere)."""
    return DeviceSplit(layout.put(codes, layout.replicated), layout.put(levels, layout.replicated))


def _loop(body: Callable, carry, count: jax.Array, most: int):
    """carry, outputs of body(carry, i) for i = 0, ..., count - 1, each output stacked into a buffer of `most`
    rows (rows from `count` on stay zero). `count` is traced (a `lax.fori_loop` with a dynamic bound, one program
    for every count up to `most`); with `most` 1 the body runs once, no loop (the plain step's program)."""
    if most == 1:
        carry, out = body(carry, jnp.zeros((), jnp.int32))
        return carry, jax.tree_util.tree_map(lambda value: value[None], out)
    shapes = jax.eval_shape(lambda c: body(c, jnp.zeros((), jnp.int32))[1], carry)
    buffers = jax.tree_util.tree_map(lambda shape: jnp.zeros((most, *shape.shape), shape.dtype), shapes)

    def iteration(i, state):
        carry, buffers = state
        carry, out = body(carry, i)
        return carry, jax.tree_util.tree_map(lambda b, o: lax.dynamic_update_index_in_dim(b, o, i, 0), buffers, out)

    return lax.fori_loop(0, count, iteration, (carry, buffers))


def make_train_loop(train_step: Callable, batch_size: int, steps_per_call: int, batch_sharding=None) -> Callable:
    """train_loop(state, split, order, first, count, rng) -> (state, metrics): `count` (at most
    `steps_per_call`) applications of `train_step` (a `steps.make_train_step`, vmapped when replicas are stacked)
    on batches first, ..., first + count - 1 of `order` (N,) (stacked: (R, N), each replica its own order).
    Metrics come per step, in rows of a leading axis of `steps_per_call` (zero from `count` on).
    `batch_sharding` places each gathered batch (split over the mesh's data axis)."""

    def train_loop(state: TrainState, split: DeviceSplit, order: jax.Array, first: jax.Array, count: jax.Array,
                   rng: jax.Array):
        def body(state, i):
            rows = lax.dynamic_slice_in_dim(order, (first + i) * batch_size, batch_size, axis=-1)
            batch = split.rows(rows)
            if batch_sharding is not None:
                batch = lax.with_sharding_constraint(batch, batch_sharding)
            return train_step(state, batch, rng)

        return _loop(body, state, count, steps_per_call)

    return train_loop


def make_eval_loop(eval_step: Callable, batch_size: int, steps_per_call: int, batch_sharding=None) -> Callable:
    """eval_loop(state, split, keys, first, count, sums) -> (sums, reconstruction): `sums` plus the metrics of
    batches first, ..., first + count - 1 (at most `steps_per_call`) of `split` in stored order (batch j evaluated
    with keys[j]), added one batch after another; and the reconstruction of batch `first`."""

    def eval_loop(state: TrainState, split: DeviceSplit, keys: jax.Array, first: jax.Array, count: jax.Array,
                  sums: dict):
        def batch(i):
            codes = lax.dynamic_slice_in_dim(split.codes, (first + i) * batch_size, batch_size)
            images = split.levels[codes]
            if batch_sharding is not None:
                images = lax.with_sharding_constraint(images, batch_sharding)
            return eval_step(state, images, keys[first + i])

        def body(carry, i):
            sums, kept = carry
            metrics, reconstruction = batch(i)
            sums = jax.tree_util.tree_map(jnp.add, sums, metrics)
            return (sums, jnp.where(i == 0, reconstruction, kept)), None

        kept = jnp.zeros_like(jax.eval_shape(batch, 0)[1])
        (sums, kept), _ = _loop(body, (sums, kept), count, steps_per_call)
        return sums, kept

    return eval_loop


def call_plan(start: int, stop: int, steps_per_call: int) -> Iterator[tuple[int, int]]:
    """Cut batches start, ..., stop - 1 of a pass (an epoch, an evaluation) into calls (first, count): each call
    ends at the next multiple of `steps_per_call` (counted from the pass's start) or at `stop`. A pass begun
    between two multiples (a run resumed mid-epoch) makes the calls of an uninterrupted one from the next
    multiple on."""
    index = start
    while index < stop:
        count = min(steps_per_call - index % steps_per_call, stop - index)
        yield index, count
        index += count


@dataclasses.dataclass(frozen=True)
class Loops:
    """A model's train and eval loops jitted for one layout (`build_loops`), each one program for calls of up to
    `steps_per_call` steps or batches. With seeds stacked the state, the orders, the train keys and every output
    carry the replica axis."""

    layout: parallel.Layout
    batch_size: int
    steps_per_call: int
    eval_step: Callable  # the model's eval step for the layout, not jitted: the shapes of its metrics
    train_program: Callable
    eval_program: Callable
    _metric_shapes: dict = dataclasses.field(default_factory=dict)  # the eval step's metrics, traced once

    def train(self, state: TrainState, split: DeviceSplit, order: jax.Array, first: int, count: int,
              rng: jax.Array):
        """`count` training steps from batch `first` of `order` (the state is donated); the metrics of each step
        in rows of a leading axis of `steps_per_call`, zero after the `count`-th."""
        return self.train_program(state, split, order, np.int32(first), np.int32(count), rng)

    def evaluate(self, state: TrainState, split: DeviceSplit, keys: jax.Array, batches: int,
                 should_stop: Callable[[], None] = lambda: None) -> tuple[dict, jax.Array]:
        """The mean of every metric over batches 0, ..., batches - 1 of `split` (device arrays, one value per
        replica when stacked), batch j evaluated with keys[j], and the reconstruction of batch 0.
        `should_stop()` runs before every call (it raises to stop)."""
        if "metrics" not in self._metric_shapes:
            batch = jax.ShapeDtypeStruct((self.batch_size, *split.codes.shape[1:]), split.levels.dtype)
            self._metric_shapes["metrics"] = jax.eval_shape(self.eval_step, state, batch, keys[0])[0]
        sums = jax.tree_util.tree_map(lambda shape: self.layout.put(np.zeros(shape.shape, shape.dtype),
                                                                    self.layout.replicated),
                                      self._metric_shapes["metrics"])
        first_reconstruction = None
        for first, count in call_plan(0, batches, self.steps_per_call):
            should_stop()
            sums, reconstruction = self.eval_program(state, split, keys, np.int32(first), np.int32(count), sums)
            if first_reconstruction is None:
                first_reconstruction = reconstruction
        return jax.tree_util.tree_map(lambda total: total / batches, sums), first_reconstruction


def build_loops(model: Model, optimizer: optax.GradientTransformation, layout: parallel.Layout, batch_size: int,
                steps_per_call: int) -> Loops:
    """`model`'s train and eval loops for `layout` (`steps.layout_steps`), jitted with its shardings: the state
    donated to the train loop, the splits, orders and keys whole on every device, each gathered batch split over
    the data axis when there are several devices."""
    rep = layout.replicated
    train_step, eval_step, _ = layout_steps(model, optimizer, layout)
    several = layout.devices > 1
    train_loop = make_train_loop(train_step, batch_size, steps_per_call, layout.train_batch if several else None)
    eval_loop = make_eval_loop(eval_step, batch_size, steps_per_call, layout.eval_batch if several else None)
    return Loops(layout, batch_size, steps_per_call, eval_step,
                 xla.jit(train_loop, donate_argnums=0, in_shardings=(layout.state, rep, rep, rep, rep, rep),
                         out_shardings=(layout.state, rep)),
                 xla.jit(eval_loop, in_shardings=(layout.state, rep, rep, rep, rep, rep), out_shardings=rep))
