"""Losses and metrics with the reductions of GON-SPEC 4 and 7. Images are NHWC in [0, 1]."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pixel_sse_loss(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    """GON loss (GON-SPEC 4.1): squared error summed over channels, averaged over batch and pixels.

    L = 1/(B*H*W) sum_{b,h,w} sum_c (x^ - x)^2; PyTorch's `((g - x)**2).sum(1).mean()` in NCHW.
    """
    return jnp.mean(jnp.sum(jnp.square(reconstruction - target), axis=-1))


def _per_image(values: jax.Array) -> jax.Array:
    """`values` (B, ...) summed over every axis but the batch's: one value per image."""
    return jnp.sum(values, axis=tuple(range(1, values.ndim)))


def sse_per_image(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    """SSE/img of Tables 1 and 3 (GON-SPEC 7): sum over H, W, C of (x^ - x)^2, one value per image."""
    return _per_image(jnp.square(reconstruction - target))


def bce_per_image(reconstruction: jax.Array, target: jax.Array, eps: float = 1e-10) -> jax.Array:
    """Binary cross-entropy summed over H, W, C per image, with J's +1e-10 inside the logs (GON-SPEC 4.3, 10).

    -[x log(x^ + eps) + (1 - x) log(1 - x^ + eps)]
    """
    terms = target * jnp.log(reconstruction + eps) + (1 - target) * jnp.log(1 - reconstruction + eps)
    return -_per_image(terms)


def kld_per_image(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image: -0.5 sum_j (1 + logvar - mu^2 - exp(logvar)) (GON-SPEC 4.3)."""
    return -0.5 * jnp.sum(1 + logvar - jnp.square(mu) - jnp.exp(logvar), axis=-1)


def mse_per_image(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    """Per-pixel mean squared error of each image (Table 2's metric, GON-SPEC 7), one value per image."""
    return jnp.mean(jnp.square(reconstruction - target), axis=tuple(range(1, target.ndim)))


def psnr(mse: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB of images in [0, 1]: 10 log10(1 / MSE)."""
    return -10.0 * jnp.log10(mse)


# PyTorch's floor of p (1 - p) in the derivatives of its binary cross-entropy (aten's BCE backward kernels).
TORCH_BCE_EPSILON = 1e-12


@jax.custom_jvp
def clamped_bce(output: jax.Array, target: jax.Array) -> jax.Array:
    """Element-wise binary cross-entropy as PyTorch's `binary_cross_entropy` computes it, derivatives included (P's
    and gon-pytorch's choice; J adds 1e-10 inside the logs instead, `bce_per_image`).

    Value: -[t max(log p, -100) + (1 - t) max(log1p(-p), -100)]. Derivatives (`_bce_slope`): PyTorch's, which
    divide by max(p (1 - p), 1e-12); autodiff of the clamped logs would give 0 * inf = NaN wherever a float32
    sigmoid rounds to exactly 0 or 1, PyTorch gives a finite slope.
    """
    log_p, log_not_p = _clamped_logs(output)
    return -(target * log_p + (1 - target) * log_not_p)


def _clamped_logs(output: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p and log(1 - p), each clamped at -100 as PyTorch's BCE does."""
    return jnp.maximum(jnp.log(output), -100.0), jnp.maximum(jnp.log1p(-output), -100.0)


@clamped_bce.defjvp
def _clamped_bce_jvp(primals, tangents):
    output, target = primals
    d_output, d_target = tangents
    log_p, log_not_p = _clamped_logs(output)
    return clamped_bce(output, target), _bce_slope(output, target) * d_output - (log_p - log_not_p) * d_target


@jax.custom_jvp
def _bce_slope(output: jax.Array, target: jax.Array) -> jax.Array:
    """d clamped_bce / d p as PyTorch's BCE backward computes it: (p - t) / max(p (1 - p), 1e-12)."""
    return (output - target) / jnp.maximum(output * (1 - output), TORCH_BCE_EPSILON)


@_bce_slope.defjvp
def _bce_slope_jvp(primals, tangents):
    """The slope's own derivatives as PyTorch's BCE double backward computes them (what a GON's second-order
    outer gradient goes through): d/dp = (p^2 - 2 p t + t) / ((p + 1e-12)^2 (1 - p + 1e-12)^2) (the exact
    derivative of (p - t) / (p (1 - p)), with PyTorch's epsilons), d/dt = -1 / max(p (1 - p), 1e-12)."""
    output, target = primals
    d_output, d_target = tangents
    eps = TORCH_BCE_EPSILON
    curvature = ((output * output - 2 * output * target + target)
                 / (jnp.square(output + eps) * jnp.square(1 - output + eps)))
    d_slope = curvature * d_output - d_target / jnp.maximum(output * (1 - output), eps)
    return _bce_slope(output, target), d_slope


def clamped_bce_per_image(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    """`clamped_bce` summed over H, W, C per image: P's `binary_cross_entropy(...).sum(1)` (Variational-GON.py)."""
    return _per_image(clamped_bce(reconstruction, target))


def peer_inner_bce(output: jax.Array, target: jax.Array) -> jax.Array:
    """gon-pytorch's inner loss: `clamped_bce` summed over the batch, averaged over every other element.

    It is batch_size times `peer_outer_bce`, so the latent step it gives is batch_size times as long.
    """
    return jnp.sum(clamped_bce(output, target)) / (target.size // target.shape[0])


def peer_outer_bce(output: jax.Array, target: jax.Array) -> jax.Array:
    """gon-pytorch's outer loss: `clamped_bce` averaged over every element."""
    return jnp.mean(clamped_bce(output, target))
