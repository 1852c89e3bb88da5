"""Rendering from a trained Implicit GON (GON-SPEC 2.4, 4.6): super-resolution, slerp, Gaussian sampling."""
from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from gonjax import xla
from gonjax.errors import stop_if_requested


def render(model, params, latents, resolution: int, pixels_per_call: int = 2**18,
           should_stop: Callable[[], bool] | None = None, state=None) -> np.ndarray:
    """Images (n, R, R, C) decoded from latents on the R x R grid over [-1, 1]^2 (the training grid's square;
    `models.coordinate_grid`'s coordinates for R = the native size), in the latents' dtype.

    Each call decodes at most `pixels_per_call` pixels (a group of whole images, or a band of rows of one
    image), so the SIREN's activations take bounded memory at any resolution; only the result grows with R.
    `should_stop` is polled between calls. `state`: the run's model state (TrainState.batch_stats; it holds
    a Fourier position encoding's projection), {} by default.
    """
    state = {} if state is None else state
    n = latents.shape[0]
    axis = np.asarray(jnp.linspace(-1.0, 1.0, resolution, dtype=latents.dtype))
    images_per_call = max(1, min(n, pixels_per_call // resolution**2))
    rows_per_call = resolution if images_per_call > 1 else max(1, min(resolution, pixels_per_call // resolution))
    draw = xla.jit(model.render)
    images = None
    for first in range(0, n, images_per_call):
        group = latents[first:first + images_per_call]
        for top in range(0, resolution, rows_per_call):
            stop_if_requested(should_stop)
            rows, cols = np.meshgrid(axis[top:top + rows_per_call], axis, indexing="ij")
            band = np.asarray(draw(params, state, group, np.stack([rows.ravel(), cols.ravel()], axis=-1)))
            if images is None:
                images = np.empty((n, resolution, resolution, band.shape[-1]), band.dtype)
            images[first:first + len(group), top:top + len(rows)] = band.reshape(len(group), len(rows), resolution, -1)
    return images


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation of P's script (GON-SPEC 4.6), row-wise for (n, d) arrays.

    omega = arccos(<a/|a|, b/|b|>); slerp = sin((1-t) omega)/sin(omega) a + sin(t omega)/sin(omega) b.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = np.sum(a / np.linalg.norm(a, axis=-1, keepdims=True) * b / np.linalg.norm(b, axis=-1, keepdims=True),
                 axis=-1, keepdims=True)
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


SLERP_LATENTS = 64  # the slerp grid interpolates within one evaluation batch of 64 (GON-SPEC 4.6)


def slerp_grid(latents: np.ndarray) -> np.ndarray:
    """The 8x8 grid of GON-SPEC 4.6 from a batch of 64 latents: row r at t = r/7, column k from z_k to z_{32+k}."""
    if latents.shape[0] < 40:
        raise ValueError(f"slerp_grid needs at least 40 latents (z_0..z_7 and z_32..z_39), got {latents.shape[0]}")
    return np.concatenate([slerp(latents[:8], latents[32:40], r / 7) for r in range(8)])


def fit_gaussian(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and full, unbiased covariance (np.cov) of latents (n, d)."""
    latents = np.asarray(latents, np.float64)
    return latents.mean(axis=0), np.cov(latents, rowvar=False)


def sample_gaussian(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)


def bank_latents(state, model) -> np.ndarray:
    """The filled rows of the latent bank: the last min(step, 100) training batches' latents."""
    bank = np.asarray(state.latent_bank)
    batches = min(int(state.step), model.latent_bank_batches)
    return bank[:batches * (bank.shape[0] // model.latent_bank_batches)]


