"""Losses and metrics with the reductions of GON-SPEC 4 and 7. Images are NHWC in [0, 1]."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pixel_sse_loss(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    """GON loss (GON-SPEC 4.1): squared error summed over channels, averaged over batch and pixels.

    L = 1/(B*H*W) sum_{b,h,w} sum_c (x^ - x)^2; PyTorch's `((g - x)**2).sum(1).mean()` in NCHW.
    """
    return jnp.mean(jnp.sum(jnp.square(reconstruction - target), axis=-1))


def sse_per_image(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    """SSE/img of Tables 1 and 3 (GON-SPEC 7): sum over H, W, C of (x^ - x)^2, one value per image."""
    return jnp.sum(jnp.square(reconstruction - target), axis=tuple(range(1, target.ndim)))
