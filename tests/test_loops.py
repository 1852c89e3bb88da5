"""gonjax.loops: batches gathered on the device are the host's batches, calls of several steps are the steps one
by one, and a pass is cut into the same calls however it was begun."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gonjax import loops, parallel
from gonjax.data import batches, input_pipeline


def _split(count=70, size=3, seed=0):
    """Random uint8 codes and the grey-level table, on the host and on the device."""
    codes = np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 1), dtype=np.uint8)
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    layout = parallel.make_layout(None, 8)
    return codes, levels, loops.place_split(codes, levels, layout)


@pytest.mark.parametrize("start, stop, k, expected", [
    (0, 10, 4, [(0, 4), (4, 4), (8, 2)]),  # the pass's tail, shorter
    (5, 14, 4, [(5, 3), (8, 4), (12, 2)]),  # begun between multiples (a resume): up to the next one first
    (0, 8, 4, [(0, 4), (4, 4)]),
    (3, 6, 1, [(3, 1), (4, 1), (5, 1)]),
    (2, 2, 4, []),
])
def test_call_plan(start, stop, k, expected):
    assert list(loops.call_plan(start, stop, k)) == expected


def test_a_pass_resumed_anywhere_makes_the_uninterrupted_calls_from_the_next_multiple_on():
    whole = list(loops.call_plan(0, 937, 50))
    for stop_at in (1, 49, 50, 51, 333, 936):
        resumed = list(loops.call_plan(stop_at, 937, 50))
        next_multiple = -(-stop_at // 50) * 50
        assert [call for call in resumed if call[0] >= next_multiple] == \
            [call for call in whole if call[0] >= next_multiple]
        assert sum(count for _, count in resumed) == 937 - stop_at and all(c <= 50 for _, c in resumed)


def test_dataset_levels_of_codes_are_the_float_images():
    """`Dataset.train` is levels[codes]; the grey levels are g / 255 in float32, COIL-20's codes (sums of four)
    (s / 4) / 255, the float32 mean of the four divided by 255 as the host computes it."""
    images = np.random.default_rng(1).integers(0, 256, size=(3, 128, 128, 1), dtype=np.uint8)
    codes, levels = input_pipeline.encode("coil20", images, 32)
    assert codes.dtype == np.uint16 and codes.shape == (3, 32, 32, 1)
    centre = images.reshape(3, 32, 4, 32, 4, 1)[:, :, 1:3, :, 1:3].astype(np.float64)
    np.testing.assert_array_equal(codes, centre.sum(axis=(2, 4)))
    mean = centre.astype(np.float32).mean(axis=(2, 4), dtype=np.float32)
    np.testing.assert_array_equal(levels[codes], mean / np.float32(255))
    grey, grey_levels = input_pipeline.encode("cifar10", images[:, :32, :32], 32)
    assert grey.dtype == np.uint8
    np.testing.assert_array_equal(grey_levels[grey], images[:, :32, :32].astype(np.float32) / np.float32(255))


def test_training_batches_gathered_on_the_device_are_the_hosts():
    codes, levels, split = _split()
    images = levels[codes]
    for epoch in (0, 3):
        order = batches.epoch_order(len(codes), seed=5, epoch=epoch).astype(np.int32)
        step = lambda state, batch, rng: (state, {"batch": batch})
        _, out = jax.jit(loops.make_train_loop(step, 8, 4))(0, split, jnp.asarray(order), 2, 4, None)
        host = list(batches.train_batches(images, 8, seed=5, epoch=epoch, start=2))[:4]
        assert out["batch"].shape == (4, 8, 3, 3, 1)
        for device_batch, host_batch in zip(np.asarray(out["batch"]), host):
            np.testing.assert_array_equal(device_batch, host_batch)  # bit for bit the same floats


def test_stacked_replicas_gather_their_own_orders():
    codes, levels, split = _split()
    orders = np.stack([batches.epoch_order(len(codes), seed, 0) for seed in (0, 1)]).astype(np.int32)
    step = jax.vmap(lambda state, batch, rng: (state, {"batch": batch}))
    _, out = jax.jit(loops.make_train_loop(step, 8, 3))(jnp.zeros(2), split, jnp.asarray(orders), 1, 3,
                                                         jnp.zeros((2, 2)))
    assert out["batch"].shape == (3, 2, 8, 3, 3, 1)  # (steps, replicas, batch, ...)
    for replica, seed in enumerate((0, 1)):
        host = list(batches.train_batches(levels[codes], 8, seed=seed, epoch=0, start=1))[:3]
        for i in range(3):
            np.testing.assert_array_equal(np.asarray(out["batch"][i, replica]), host[i])


def test_a_call_threads_the_state_through_its_steps_in_order_and_stops_at_its_count():
    """A toy step whose state is a running float32 recurrence over the batches and a step count: one program of
    up to 5 steps called for 5 and for 3 against the same recurrence in NumPy; the rows after the count are
    zero."""
    codes, levels, split = _split()
    order = batches.epoch_order(len(codes), seed=2, epoch=0).astype(np.int32)

    def step(state, batch, rng):
        total, count = state
        return (total * np.float32(0.5) + batch.mean(), count + 1), {"loss": batch.sum()}

    program = jax.jit(chex.assert_max_traces(loops.make_train_loop(step, 8, 5), n=1))
    host = list(batches.train_batches(levels[codes], 8, seed=2, epoch=0, start=1))
    for count in (5, 3):
        state = (jnp.float32(0.25), jnp.int32(0))
        (total, steps), metrics = program(state, split, jnp.asarray(order), 1, count, None)
        expected = np.float32(0.25)
        for batch in host[:count]:
            expected = expected * np.float32(0.5) + batch.mean(dtype=np.float32)
        assert int(steps) == count
        np.testing.assert_allclose(float(total), expected, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(metrics["loss"])[:count], [b.sum() for b in host[:count]], rtol=1e-5)
        assert not np.asarray(metrics["loss"])[count:].any()


def test_evaluation_in_calls_adds_batch_after_batch_and_keeps_the_first_reconstruction():
    codes, levels, split = _split(count=45)
    images = levels[codes]
    keys = jnp.asarray(np.arange(5 * 2, dtype=np.uint32).reshape(5, 2))

    def eval_step(state, batch, key):
        return {"mean": batch.mean() + key[0].astype(jnp.float32)}, batch * 2

    layout = parallel.make_layout(None, 8)
    program = jax.jit(chex.assert_max_traces(loops.make_eval_loop(eval_step, 8, 3), n=1))
    fake = loops.Loops(layout, 8, 3, eval_step, None, program)
    means, reconstruction = fake.evaluate(None, split, keys, 5)  # calls (0, 3), (3, 2), one program
    total = np.float32(0)
    for i, batch in enumerate(batches.eval_batches(images, 8)):  # 45 // 8 = 5 batches, in stored order
        total = total + (batch.mean(dtype=np.float32) + np.float32(2 * i))
    np.testing.assert_allclose(float(means["mean"]), total / 5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(reconstruction), images[:8] * 2)
    stops = []
    with pytest.raises(KeyboardInterrupt):
        fake.evaluate(None, split, keys, 5, should_stop=lambda: stops.append(1) or len(stops) > 1 and _stop())
    assert len(stops) == 2  # polled before every call


def _stop():
    raise KeyboardInterrupt
