"""The origin-gradient core shared by every GON variant (GON-SPEC 1, 4.1, 4.2, 9).

A *fit function* scores a latent against a batch:

    fit(params, state, z, batch, rng) -> (loss, (new_state, output))

where `state` is whatever mutable model state the fit threads (BN running averages, or `{}`), and `output` is
what the model produced from `z` (a reconstruction). The core takes one gradient step from the origin,

    z = z0 - grad_z fit(z0),   z0 = 0 (or z0 ~ N(0, sigma^2) for the latent-init ablation),

and scores z with the same fit. The outer loss is differentiable through z (reverse-over-reverse, PyTorch's
`create_graph=True`) unless `detach=True`, which makes z a constant (GON-SPEC 4.2). The inner pass gets its own
rng, independent of the outer pass, so stochastic fits (V-GON) draw fresh noise in each.

At z0 = 0 a deterministic decoder produces the same output for every example, batch-statistics BN included, so
an `OriginShortcut` lets the inner pass decode one example instead of the batch (`origin_gradient`): the same
latent, inner loss and state, and the same derivatives, at a fraction of the inner pass's cost.

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


class OriginShortcut(NamedTuple):
    """A deterministic fit split into decoder and loss, so that its inner pass at z0 = 0 can decode one example.

    decode(params, state, z, batch_size, stats) -> outputs, one of two ways:
      - stats=None: z (1, ...) is one latent standing for `batch_size` equal ones (batch_size=None: z is the
        batch itself); returns
        (output (1, ...), (stats, new_state)), `stats` being the normalisation statistics it used ({} if none);
      - stats given: every latent of z is decoded on its own with those statistics held fixed; returns output.
    loss(outputs, batch) -> the fit's loss of a batch of outputs.
    """

    decode: Callable
    loss: Callable

    def fit(self, params, state, z, batch, rng):
        """The fit this split stands for (the `Fit` protocol): decode the batch of latents and score it."""
        del rng  # deterministic
        output, (_, state) = self.decode(params, state, z, None, None)
        return self.loss(output, batch), (state, output)


def origin_gradient(shortcut: OriginShortcut, params, state, batch, latent_shape: tuple[int, ...], dtype):
    """(grad_z L at z = 0, L(0), state, outputs at 0) with one example decoded (GON-SPEC 4.1, z0 = 0).

    With equal latents, the batched decoder's vector-Jacobian product splits along the output cotangents G:
    their batch mean g (every example the same) maps to the VJP of the one-example decoder, statistics included;
    the rest H = G - g sums to zero over the batch, so it puts no cotangent on the batch statistics and maps
    through the decoder with statistics held fixed, example by example. Both VJPs reuse the forward residuals of
    one example; only the second runs over the batch (vmapped). The identity holds for every parameter value,
    so derivatives through the latent are exact too.
    """
    batch_size = batch.shape[0]
    z = jnp.zeros((1, *latent_shape[1:]), dtype)
    output, vjp_shared, (stats, state) = jax.vjp(
        lambda z: shortcut.decode(params, state, z, batch_size, None), z, has_aux=True)
    outputs = jnp.broadcast_to(output, (batch_size, *output.shape[1:]))
    loss, cotangents = jax.value_and_grad(shortcut.loss)(outputs, batch)
    mean = jnp.mean(cotangents, axis=0, keepdims=True)
    if jax.tree_util.tree_leaves(stats):
        _, vjp_fixed = jax.vjp(lambda z: shortcut.decode(params, state, z, batch_size, stats), z)
        grad = vjp_shared(mean)[0] + jax.vmap(lambda h: vjp_fixed(h[None])[0][0])(cotangents - mean)
    else:  # no statistics: both parts are the same per-example VJP
        grad = jax.vmap(lambda g: vjp_shared(g[None])[0][0])(cotangents)
    return grad, loss, state, outputs


def origin_step(fit: Fit, params, state, batch, rng: jax.Array, z0: jax.Array, *,
                detach: bool = False, shortcut: OriginShortcut | None = None) -> tuple[jax.Array, OriginResult]:
    """Outer loss L(z) at the latent z = z0 - grad_z0 L(z0), and what produced it.

    Differentiate the returned loss with respect to `params` to train: the gradient flows through z unless
    `detach`. The state the inner pass returns is threaded into the outer pass, as two PyTorch forward passes
    would update BN running averages twice. `shortcut` (the same fit, split) computes the inner pass with
    `origin_gradient`; pass it only when z0 is the origin.
    """
    rng_inner, rng_outer = pass_keys(rng)

    def inner(z):
        return fit(params, state, z, batch, rng_inner)

    if shortcut is None:
        (inner_loss, (state, _)), grad_z0 = jax.value_and_grad(inner, has_aux=True)(z0)
    else:
        grad_z0, inner_loss, state, _ = origin_gradient(shortcut, params, state, batch, z0.shape, z0.dtype)
    latent = z0 - grad_z0
    if detach:
        latent = jax.lax.stop_gradient(latent)
    loss, (state, output) = fit(params, state, latent, batch, rng_outer)
    return loss, OriginResult(latent, inner_loss, state, output)
