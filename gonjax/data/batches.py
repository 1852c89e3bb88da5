"""Batching (GON-SPEC 6): the epoch order, and training and evaluation batches on the host.

Pure NumPy, no TFDS. The trainer places the epoch's order on the device and gathers its batches there
(`gonjax.loops`); these host batches are the same arrays, for inference, benchmarks and tests.
"""
from __future__ import annotations

from collections.abc import Iterator

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
