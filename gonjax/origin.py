"""The origin-gradient core shared by every GON variant (GON-SPEC 1, 4.1, 4.2, 9).

A *fit function* scores a latent against a batch:

    fit(params, state, z, batch, rng) -> (loss, (new_state, output))

where `state` is whatever mutable model state the fit threads (BN running averages, or `{}`), and `output` is
what the model produced from `z` (a reconstruction). The core takes one gradient step from the origin,

    z = z0 - grad_z fit(z0),   z0 = 0 (or z0 ~ N(0, sigma^2) for the latent-init ablation),

and scores z with the same fit. The outer loss is differentiable through z (reverse-over-reverse, PyTorch's
`create_graph=True`) unless `detach=True`, which makes z a constant (GON-SPEC 4.2). The inner pass gets its own
rng, independent of the outer pass, so stochastic fits (V-GON) draw fresh noise in each.

Variants (docs/spec.md, "Variants"): N latent updates z_{k+1} = z_k - eta grad_z L_in(z_k), each differentiable
(second order through all N), an inner loss other than the outer one, and a z0 that is a trained parameter (the
same for every example, so the shortcut below still applies to the first update).

When every example starts from the same z0 (the origin, or a learned one), a deterministic decoder produces the
same output for every example, batch-statistics BN included, so an `OriginShortcut` lets the first inner pass
decode one example instead of the batch (`origin_gradient`): the same latent, inner loss and state, and the same
derivatives, at a fraction of the inner pass's cost. Later updates start from per-example latents and run the
batched fit.

Everything here is pure; callers jit it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp


class Fit(Protocol):
    """A fit function: scores latents `z` (B, nz) against `batch` and returns the loss (a scalar to minimise),
    the model state after the pass and what the model produced from `z` (e.g. the reconstruction)."""

    def __call__(self, params: Any, state: Any, z: jax.Array, batch: Any,
                 rng: jax.Array) -> tuple[jax.Array, tuple[Any, Any]]: ...


class OriginResult(NamedTuple):
    """What the origin step produced besides the outer loss."""

    latent: jax.Array  # z_N, after the last latent update
    inner_losses: jax.Array  # (N,): L_in(z_k) of every update k = 0 .. N-1
    state: Any  # model state after the inner passes and then the outer pass
    output: Any  # fit output at z_N (the reconstruction)

    @property
    def inner_loss(self) -> jax.Array:
        """L_in(z0), the inner loss at the start."""
        return self.inner_losses[0]


def initial_latent(rng: jax.Array, shape: tuple[int, ...], sigma: float, dtype=jnp.float32) -> jax.Array:
    """z0: the origin, or N(0, sigma^2) noise for the latent-initialisation ablation (GON-SPEC 9). The noise is
    drawn in float32 whatever `dtype`, so a float64 computation starts from the float32 one's z0."""
    if sigma == 0.0:
        return jnp.zeros(shape, dtype)
    return (sigma * jax.random.normal(rng, shape, jnp.float32)).astype(dtype)


def pass_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The independent keys of the inner and the outer pass of `origin_step`."""
    rng_inner, rng_outer = jax.random.split(rng)
    return rng_inner, rng_outer


class Pointwise(NamedTuple):
    """A decoder that is a function of a point and the latent, each output its own point's (a coordinate network,
    GON-SPEC 2.4), with no statistics over the batch.

    decode_at(params, state, z, points) -> outputs (len(z), len(points), ...) of latents z at the points;
    points(dtype) -> the points (P, ...) at which `OriginShortcut.decode` decodes.
    """

    decode_at: Callable
    points: Callable


class OriginShortcut(NamedTuple):
    """A deterministic fit split into decoder and loss, so that its inner pass at z0 = 0 can decode one example.

    decode(params, state, z, batch_size, stats) -> outputs, one of two ways:
      - stats=None: z (1, ...) is one latent standing for `batch_size` equal ones (batch_size=None: z is the
        batch itself); returns
        (output (1, ...), (stats, new_state)), `stats` being the normalisation statistics it used ({} if none);
      - stats given: every latent of z is decoded on its own with those statistics held fixed; returns output.
    loss(outputs, batch) -> the fit's loss of a batch of outputs.
    pointwise: the same decoder point by point, where it is a coordinate network (`pointwise_origin_gradient`).
    """

    decode: Callable
    loss: Callable
    pointwise: Pointwise | None = None

    def fit(self, params, state, z, batch, rng):
        """The fit this split stands for (the `Fit` protocol): decode the batch of latents and score it."""
        del rng  # deterministic
        output, (_, state) = self.decode(params, state, z, None, None)
        return self.loss(output, batch), (state, output)


def origin_gradient(shortcut: OriginShortcut, params, state, batch, origin: jax.Array):
    """(grad_z L at z = z0, L(z0), state, outputs at z0) with one example decoded, where every example starts from
    the same latent z0 (GON-SPEC 4.1: z0 = 0). `origin`: that latent, shape (1, ...).

    With equal latents, the batched decoder's vector-Jacobian product splits along the output cotangents G:
    their batch mean g (every example the same) maps to the VJP of the one-example decoder, statistics included;
    the rest H = G - g sums to zero over the batch, so it puts no cotangent on the batch statistics and maps
    through the decoder with statistics held fixed, example by example. Both VJPs reuse the forward residuals of
    one example; only the second runs over the batch (vmapped). The identity holds for every parameter value and
    every shared z0, so derivatives through the latent (and through a learned z0) are exact too.
    """
    if shortcut.pointwise is not None:
        return pointwise_origin_gradient(shortcut, params, state, batch, origin)
    batch_size = batch.shape[0]
    output, vjp_shared, (stats, state) = jax.vjp(
        lambda z: shortcut.decode(params, state, z, batch_size, None), origin, has_aux=True)
    outputs = jnp.broadcast_to(output, (batch_size, *output.shape[1:]))
    loss, cotangents = jax.value_and_grad(shortcut.loss)(outputs, batch)
    mean = jnp.mean(cotangents, axis=0, keepdims=True)
    if jax.tree_util.tree_leaves(stats):
        _, vjp_fixed = jax.vjp(lambda z: shortcut.decode(params, state, z, batch_size, stats), origin)
        grad = vjp_shared(mean)[0] + jax.vmap(lambda h: vjp_fixed(h[None])[0][0])(cotangents - mean)
    else:  # no statistics: both parts are the same per-example VJP
        grad = jax.vmap(lambda g: vjp_shared(g[None])[0][0])(cotangents)
    return grad, loss, state, outputs


def pointwise_origin_gradient(shortcut: OriginShortcut, params, state, batch, origin: jax.Array):
    """`origin_gradient` for a decoder whose outputs each depend on the latent and their own point only (a SIREN).

    At a shared latent z0 every example's outputs are the same function of z, so the Jacobian J of one example's
    outputs with respect to z serves the whole batch, and example i's inner gradient is its output cotangents
    contracted with J: grad_i = sum_(p, c) G[i, p, c] J[p, c, :]. Pointwise, J is one small Jacobian per point
    (as many reverse passes as the point has outputs), computed for all points at once by `vmap`: the cost of
    decoding one example, where the batched VJP of `origin_gradient` runs the decoder's backward pass over the
    whole batch. The same sums in another order, and derivatives through J (second order, a learned z0) are
    exact.
    """
    decode_at, points = shortcut.pointwise

    def at_point(point):
        def value(z):
            out = decode_at(params, state, z[None], point[None])[0, 0]
            return out, out

        return jax.jacrev(value, has_aux=True)(origin[0])

    jacobian, output = jax.vmap(at_point)(points(origin.dtype))  # (P, *out, *z), (P, *out)
    outputs = jnp.broadcast_to(output, (batch.shape[0], *output.shape))
    loss, cotangents = jax.value_and_grad(shortcut.loss)(outputs, batch)
    grad = jnp.tensordot(cotangents, jacobian, axes=cotangents.ndim - 1)
    return grad, loss, state, outputs


# Later latent updates per iteration of the scan: a few unrolled keep the speed of a fully unrolled program (with
# one update per iteration, the GON step with 3 updates took 1.2-2x as long), while the program, and its compile
# time, stop growing with N beyond them (benchmarks/README.md, "Many latent updates").
UNROLLED_UPDATES = 4


def update_key(rng_inner: jax.Array, k) -> jax.Array:
    """The key of the inner pass of latent update k: the inner pass's key itself for the first update (so one
    update draws what it always drew), fold_in(key, k) for later ones (k may be traced there)."""
    return rng_inner if isinstance(k, int) and k == 0 else jax.random.fold_in(rng_inner, k)


def origin_step(fit: Fit, params, state, batch, rng: jax.Array, z0: jax.Array, *,
                detach: bool = False, shortcut: OriginShortcut | None = None, updates: int = 1,
                step_size: float = 1.0, inner_fit: Fit | None = None) -> tuple[jax.Array, OriginResult]:
    """Outer loss L(z_N) after N = `updates` latent updates z_{k+1} = z_k - step_size * grad_z L_in(z_k) from z0,
    and what produced it (GON-SPEC 4.1 is N = 1, step size 1, L_in = L).

    Differentiate the returned loss with respect to `params` to train: the gradient flows through every update
    (second order, PyTorch's `create_graph=True` at each) unless `detach`, which makes z_N a constant. `inner_fit`
    (default `fit`) scores the latent in the updates. The state each pass returns is threaded into the next, as
    successive PyTorch forward passes update BN running averages. `shortcut` (the inner fit, split) computes the
    first update with `origin_gradient`; pass it only when all rows of z0 are equal (z0[:1] is used). Python
    int `updates` is static; the updates after the first run as one `lax.scan` (`UNROLLED_UPDATES` to an
    iteration), so the program, and its compile time, do not grow with N.
    """
    if updates < 1:
        raise ValueError(f"updates must be at least 1, got {updates}")
    inner_fit = fit if inner_fit is None else inner_fit
    rng_inner, rng_outer = pass_keys(rng)

    def update(latent, state, k):
        """z_k -> z_{k+1}, the state after the inner pass, L_in(z_k)."""
        def inner(z):
            return inner_fit(params, state, z, batch, update_key(rng_inner, k))

        (loss_k, (state, _)), grad = jax.value_and_grad(inner, has_aux=True)(latent)
        return latent - step_size * grad, state, loss_k  # 1.0 * g is g exactly: the spec's step unchanged

    if shortcut is not None:
        grad, first_loss, state, _ = origin_gradient(shortcut, params, state, batch, z0[:1])
        latent = z0 - step_size * grad
    else:
        latent, state, first_loss = update(z0, state, 0)
    inner_losses = first_loss[None]
    if updates > 1:
        def later(carry, k):
            latent, state, loss_k = update(*carry, k)
            return (latent, state), loss_k

        (latent, state), later_losses = jax.lax.scan(later, (latent, state), jnp.arange(1, updates),
                                                     unroll=min(updates - 1, UNROLLED_UPDATES))
        inner_losses = jnp.concatenate([inner_losses, later_losses])
    if detach:
        latent = jax.lax.stop_gradient(latent)
    loss, (state, output) = fit(params, state, latent, batch, rng_outer)
    return loss, OriginResult(latent, inner_losses, state, output)
