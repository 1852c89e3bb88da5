"""Batching (GON-SPEC 6): the epoch order, training and evaluation batches, and device prefetch.

Pure NumPy and JAX, no TFDS: the trainer, inference and benchmarks batch arrays through here, whatever prepared
them (`gonjax.data.input_pipeline` for the spec's datasets).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np


def num_batches(num_images: int, batch_size: int) -> int:
    """Batches per pass with the last partial batch dropped (GON-SPEC 6)."""
    return num_images // batch_size


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of `epoch`: a permutation drawn from (seed, epoch) alone, so a resumed run sees the
    same order as an uninterrupted one."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def train_batches(images: np.ndarray, batch_size: int, seed: int, epoch: int, start: int = 0) -> Iterator[np.ndarray]:
    """Shuffled training batches of `epoch`, from batch index `start` on (drop last)."""
    order = epoch_order(len(images), seed, epoch)
    for i in range(start, num_batches(len(images), batch_size)):
        yield images[order[i * batch_size:(i + 1) * batch_size]]


def eval_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Batches in the stored order (drop last), as evaluation sees them."""
    for i in range(num_batches(len(images), batch_size)):
        yield images[i * batch_size:(i + 1) * batch_size]


def prefetch_to_device(batches: Iterator[np.ndarray], depth: int = 2, put=jax.device_put) -> Iterator[jax.Array]:
    """Iterate `batches` as device arrays (`put(batch)`: e.g. split over a mesh, `parallel.Layout.put`), a
    background thread staying `depth` batches ahead."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for batch in batches:
                if stop.is_set():
                    return
                buffer.put(put(batch))
        except BaseException as error:  # re-raised in the consumer
            buffer.put(error)
            return
        buffer.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)
