"""Rendering from a trained Implicit GON (GON-SPEC 2.4, 4.6): super-resolution, slerp, Gaussian sampling."""
from __future__ import annotations

import jax
import numpy as np

from gonjax import xla


def render(model, params, latents: jax.Array, resolution: int, images_per_call: int = 4) -> np.ndarray:
    """Images at resolution x resolution from latents, a few images per call to bound memory."""
    draw = xla.jit(model.render, static_argnums=2)
    chunks = [np.asarray(draw(params, latents[i:i + images_per_call], resolution))
              for i in range(0, latents.shape[0], images_per_call)]
    return np.concatenate(chunks)


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation of P's script (GON-SPEC 4.6), row-wise for (n, d) arrays.

    omega = arccos(<a/|a|, b/|b|>); slerp = sin((1-t) omega)/sin(omega) a + sin(t omega)/sin(omega) b.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = np.sum(a / np.linalg.norm(a, axis=-1, keepdims=True) * b / np.linalg.norm(b, axis=-1, keepdims=True),
                 axis=-1, keepdims=True)
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


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


def clamp01(images) -> np.ndarray:
    return np.clip(np.asarray(images), 0.0, 1.0)


