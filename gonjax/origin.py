"""The origin-gradient core shared by every GON variant (GON-SPEC 1, 4.1, 4.2, 9).

A *fit function* scores a latent against a batch:

    fit(params, state, z, batch, rng) -> (loss, (new_state, output))

where `state` is whatever mutable model state the fit threads (BN running averages, or `{}`), and `output` is
what the model produced from `z` (a reconstruction). The core takes one gradient step from the origin,

    z = z0 - grad_z fit(z0),   z0 = 0 (or z0 ~ N(0, sigma^2) for the latent-init ablation),

and scores z with the same fit. The outer loss is differentiable through z (reverse-over-reverse, PyTorch's
`create_graph=True`) unless `detach=True`, which makes z a constant (GON-SPEC 4.2). The inner pass gets its own
rng, independent of the outer pass, so stochastic fits (V-GON) draw fresh noise in each.

Everything here is pure; callers jit it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Fit = Callable[[Any, Any, jax.Array, Any, jax.Array], tuple[jax.Array, tuple[Any, Any]]]


class OriginResult(NamedTuple):
    """What one origin step produced besides the outer loss."""

    latent: jax.Array  # z = z0 - grad_z0 L_in
    inner_loss: jax.Array  # L_in(z0)
    state: Any  # model state after the inner and then the outer pass
    output: Any  # fit output at z (the reconstruction)


def initial_latent(rng: jax.Array, shape: tuple[int, ...], sigma: float, dtype=jnp.float32) -> jax.Array:
    """z0: the origin, or N(0, sigma^2) noise for the latent-initialisation ablation (GON-SPEC 9)."""
    if sigma == 0.0:
        return jnp.zeros(shape, dtype)
    return sigma * jax.random.normal(rng, shape, dtype)


def pass_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The independent keys of the inner and the outer pass of `origin_step`."""
    rng_inner, rng_outer = jax.random.split(rng)
    return rng_inner, rng_outer


def origin_step(fit: Fit, params, state, batch, rng: jax.Array, z0: jax.Array, *,
                detach: bool = False) -> tuple[jax.Array, OriginResult]:
    """Outer loss L(z) at the latent z = z0 - grad_z0 L(z0), and what produced it.

    Differentiate the returned loss with respect to `params` to train: the gradient flows through z unless
    `detach`. The state the inner pass returns is threaded into the outer pass, as two PyTorch forward passes
    would update BN running averages twice.
    """
    rng_inner, rng_outer = pass_keys(rng)

    def inner(z):
        return fit(params, state, z, batch, rng_inner)

    (inner_loss, (state, _)), grad_z0 = jax.value_and_grad(inner, has_aux=True)(z0)
    latent = z0 - grad_z0
    if detach:
        latent = jax.lax.stop_gradient(latent)
    loss, (state, output) = fit(params, state, latent, batch, rng_outer)
    return loss, OriginResult(latent, inner_loss, state, output)
