"""Kernels tuned for XLA:CPU (benchmarks/README.md measures them): the same functions as JAX's own primitives,
written so that their forward and backward passes run as matmuls where XLA:CPU's reductions, transposed
convolutions and small convolutions are slow, or as arithmetic it vectorises where its sine is slow.

- `channel_sum` / `channel_broadcast`: batch norm's per-channel sums as matmuls with a ones vector, each the
  other's VJP (custom_vjp), so the backward and double-backward reductions are matmuls too;
- `stride2_tap_matmul`: a stride-2, k=4, padding-1 transposed convolution as one matmul giving every input
  pixel's 16 taps, summed into their output pixels (`_sum_taps` / `_gather_taps`, each the other's VJP);
- `stride2_phase_conv`: the same as one 3x3 convolution to the four output phases, then depth-to-space;
- `im2col_conv`: a convolution of a narrow input as patches times one matmul;
- `sine` / `cosine`: float32 sin and cos as a range reduction and polynomials of adds and multiplies, which
  XLA:CPU vectorises (its own sine runs about 3x slower here), within one ulp of the true value (XLA's: 0.56),
  each the other's derivative (custom_jvp).

The custom-VJP pairs have no forward-mode rule: `jax.jvp`, `jax.linearize`, `jax.hessian` cannot pass them
(`sine` and `cosine` are custom-JVP functions, which every transform passes).
Models built with `Config(kernels="autodiff")` use JAX's own primitives instead (`models.BatchStatNorm`,
`models.TorchConvTranspose`), the same function in every transform (tests/test_transforms.py).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def channel_sum(x: jax.Array) -> jax.Array:
    """Sum over every axis but the last, as a matmul with a ones vector (XLA:CPU's column reductions are
    several times slower). Linear; `channel_broadcast` and this are each other's VJP, so batch norm's
    backward and double-backward reductions are matmuls too."""
    flat = x.reshape(-1, x.shape[-1])
    return jnp.ones((flat.shape[0],), x.dtype) @ flat


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def channel_broadcast(v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """v (C,) broadcast to `shape` (..., C); its VJP is `channel_sum`."""
    return jnp.broadcast_to(v, shape)


channel_sum.defvjp(lambda x: (channel_sum(x), x.shape), lambda shape, g: (channel_broadcast(g, shape),))
channel_broadcast.defvjp(lambda v, shape: (channel_broadcast(v, shape), None),
                          lambda shape, _, g: (channel_sum(g),))


# Stride-2, padding-1 transposed convolution by output phase: (phase a, input offset dy - 1, kernel row), where
# output row 2i + a gathers input row i + dy - 1 through row `ky` of the flax kernel (the flipped PyTorch one).
_PHASES = ((0, 0, 0), (0, 1, 2), (1, 1, 1), (1, 2, 3))


def _phase_selector() -> np.ndarray:
    """(3, 2, 4) 0/1 table: [offset dy, phase a, kernel row ky] = 1 where `_PHASES` pairs them."""
    table = np.zeros((3, 2, 4), np.float32)
    for a, dy, ky in _PHASES:
        table[dy, a, ky] = 1.0
    return table


def _subpixel_kernel(kernel: jax.Array) -> jax.Array:
    """(4, 4, Cin, Cout) transposed-conv kernel -> (3, 3, Cin, 4*Cout) stride-1 kernel of its four phases.

    One exact contraction with a constant 0/1 table (a chain of scatters compiles and runs slower)."""
    cin, cout = kernel.shape[2], kernel.shape[3]
    select = jnp.asarray(_phase_selector(), kernel.dtype)
    phased = jnp.einsum("yak,xbl,klco->yxcabo", select, select, kernel, precision=jax.lax.Precision.HIGHEST)
    return phased.reshape(3, 3, cin, 4 * cout)


def _depth_to_space(phases: jax.Array) -> jax.Array:
    """(N, H, W, 2, 2, C) output phases [.., a, b, c] -> (N, 2H, 2W, C) image, pixel (2i + a, 2j + b)."""
    n, h, w, _, _, c = phases.shape
    return phases.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, c)


def stride2_phase_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-2 transposed conv as one 3x3 stride-1 convolution to the four phases, then depth-to-space."""
    n, h, w, _ = x.shape
    y = jax.lax.conv_general_dilated(x, _subpixel_kernel(kernel), (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return _depth_to_space(y.reshape(n, h, w, 2, 2, kernel.shape[-1]))


@jax.custom_vjp
def _sum_taps(taps: jax.Array) -> jax.Array:
    """col2im of a stride-2, k=4, padding-1 transposed conv: taps (N, H, W, 2, 2, 2, 2, C) of every input pixel,
    indexed (my, mx, a, b) for kernel tap (2 my + a, 2 mx + b), -> sums U (N, H+1, W+1, 2, 2, C) with output
    pixel (2i + a, 2j + b) = U[i + a, j + b, a, b].

    By `_PHASES`, kernel row ky = 2m + a of input row p feeds output row 2i + a with p = i + m + a - 1, so
    U[q, a] = the sum over m of tap (m, a) of input row q + m - 1 (zero outside the image), in both axes.
    Linear; `_gather_taps` and this are each other's VJP (autodiff would transpose the shifted slices into
    padded copies summed, several times slower on XLA:CPU)."""
    return sum(jnp.pad(taps[:, :, :, my, mx], ((0, 0), (1 - my, my), (1 - mx, mx), (0, 0), (0, 0), (0, 0)))
               for my in (0, 1) for mx in (0, 1))


@jax.custom_vjp
def _gather_taps(sums: jax.Array) -> jax.Array:
    """Transpose of `_sum_taps`: sums (N, H+1, W+1, 2, 2, C) -> taps (N, H, W, 2, 2, 2, 2, C), tap
    (my, mx, a, b) of pixel (i, j) reading sums[i + 1 - my, j + 1 - mx, a, b]."""
    h, w = sums.shape[1] - 1, sums.shape[2] - 1
    return jnp.stack([jnp.stack([sums[:, 1 - my:1 - my + h, 1 - mx:1 - mx + w] for mx in (0, 1)], axis=3)
                      for my in (0, 1)], axis=3)


_sum_taps.defvjp(lambda taps: (_sum_taps(taps), None), lambda _, g: (_gather_taps(g),))
_gather_taps.defvjp(lambda sums: (_gather_taps(sums), None), lambda _, g: (_sum_taps(g),))


def stride2_tap_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-2 transposed conv as one matmul giving every input pixel's 16 taps, then their sum per output
    pixel (`_sum_taps`) and depth-to-space. The true FLOPs (no zero taps)."""
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    weights = kernel.reshape(2, 2, 2, 2, cin, cout).transpose(4, 0, 2, 1, 3, 5).reshape(cin, 16 * cout)
    sums = _sum_taps((x.reshape(-1, cin) @ weights).reshape(n, h, w, 2, 2, 2, 2, cout))
    phases = jnp.stack([jnp.stack([sums[:, a:a + h, b:b + w, a, b] for b in (0, 1)], axis=3) for a in (0, 1)],
                       axis=3)
    return _depth_to_space(phases)


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Cross-correlation of x (N, H, W, Cin) with kernel (k, k, Cin, Cout) as its unfolded patches (im2col) times
    one matmul: on XLA:CPU the weight gradient of the image layer is 1.5x faster so than as a convolution."""
    n, h, w, cin = x.shape
    k, s, p = kernel.shape[0], stride, padding
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    patches = jnp.concatenate([padded[:, ky:ky + s * (ho - 1) + 1:s, kx:kx + s * (wo - 1) + 1:s, :]
                               for ky in range(k) for kx in range(k)], axis=-1)  # (.., (ky, kx, c))
    return patches @ kernel.reshape(k * k * cin, kernel.shape[-1])


# pi / 2 in five parts (the Cody-Waite reduction): the first four have at most 8 significant bits, so n * part is
# exact for |n| < 2**16 (|x| < 1e5), the fifth is the float32 nearest the rest; together pi / 2 to 1e-19.
_HALF_PI_PARTS = (1.5703125, 4.825592041015625e-4, 1.2665987014770508e-6, 9.89530235528946e-10,
                  2.5633440682570896e-12)
# Taylor coefficients on |r| <= pi / 4: sin r = r + r^3 (S0 + S1 r^2 + ...) up to r^9 (the first term left out,
# r^11 / 11!, is under 3e-9 of sin r: 0.05 float32 ulps); cos r = 1 - r^2 / 2 + r^4 (C0 + C1 r^2 + ...) up to
# r^10 (under 2e-10).
_SIN_COEFFICIENTS = tuple((-1) ** i / math.factorial(2 * i + 1) for i in range(1, 5))
_COS_COEFFICIENTS = tuple((-1) ** i / math.factorial(2 * i) for i in range(2, 6))


def _fast_two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s, e with s = fl(a + b) and s + e = a + b exactly, where |a| >= |b| or the sum is exact (Dekker). In the
    reduction below both hold: a difference smaller than the part subtracted is exact, its operands being on
    grids far finer than itself."""
    s = a + b
    return s, b - (s - a)


def _horner(z: jax.Array, coefficients: tuple[float, ...]) -> jax.Array:
    value = coefficients[-1]
    for coefficient in coefficients[-2::-1]:
        value = value * z + coefficient
    return value


def _quarter_turns_sine(x: jax.Array, shift: int) -> jax.Array:
    """sin(x + shift * pi / 2) in float32, within 1 ulp of the true value (0.5 is correct rounding) for |x| < 1e5
    (benchmarks/sine_accuracy.py measures it, tests/test_models.py bounds it).

    x = n pi / 2 + r with n the nearest integer, |r| <= pi / 4, r carried as r_hi + r_lo (the third and fourth
    parts are subtracted by FastTwoSums, the fifth into r_lo, so r is right to about 1e-19 n even near a zero of the
    result); then sin r or cos r by quadrant, each as its leading term plus a correction that takes r_lo in to
    first order: sin(r_hi + r_lo) = r_hi + (r_lo w + r_hi^3 S(r_hi^2)), cos(r_hi + r_lo) = w + (((1 - w) -
    r_hi^2 / 2) + (r_hi^4 C(r_hi^2) - r_hi r_lo)) with w = 1 - r_hi^2 / 2 (about cos r_hi), whose rounding error the
    bracket puts back.
    """
    n = jnp.round(x * (2 / math.pi))
    r = x - n * _HALF_PI_PARTS[0]  # exact: n * part is, and the difference is small
    r = r - n * _HALF_PI_PARTS[1]  # exact too (see _HALF_PI_PARTS)
    r, low = _fast_two_sum(r, -(n * _HALF_PI_PARTS[2]))
    r_hi, low_2 = _fast_two_sum(r, -(n * _HALF_PI_PARTS[3]))
    r_lo = (low + low_2) - n * _HALF_PI_PARTS[4]  # the last part is below r_hi's rounding unless r is tiny
    z = r_hi * r_hi
    half_z = 0.5 * z
    w = 1 - half_z
    sin_r = r_hi + (r_lo * w + r_hi * z * _horner(z, _SIN_COEFFICIENTS))
    cos_r = w + (((1 - w) - half_z) + (z * z * _horner(z, _COS_COEFFICIENTS) - r_hi * r_lo))
    quadrant = n.astype(jnp.int32) + shift  # |n| < 2**16 where the result means anything
    value = jnp.where((quadrant & 1) == 1, cos_r, sin_r)
    return jnp.where((quadrant & 2) == 2, -value, value)


@jax.custom_jvp
def sine(x: jax.Array) -> jax.Array:
    """sin x: a polynomial after range reduction for float32 (XLA:CPU's own sine took 3x as long in a probe of
    12.8 M values), `jnp.sin` for other dtypes. Derivative `cosine`, so derivatives of every order are sines and
    cosines."""
    return _quarter_turns_sine(x, 0) if x.dtype == jnp.float32 else jnp.sin(x)


@jax.custom_jvp
def cosine(x: jax.Array) -> jax.Array:
    """cos x, computed as `sine` is; derivative -`sine`."""
    return _quarter_turns_sine(x, 1) if x.dtype == jnp.float32 else jnp.cos(x)


@sine.defjvp
def _sine_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return sine(x), cosine(x) * t


@cosine.defjvp
def _cosine_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return cosine(x), -sine(x) * t
