"""Flax modules of GON-SPEC section 2, with PyTorch's default initialisation (section 2.5).

Every module works in NHWC. Parameter layouts are flax's own; `benchmarks/` ports PyTorch weights into them
(GON-SPEC 2.1 gives the kernel mapping). All of section 2 lives here, as in flax's examples' models.py (about 460
lines): the conv layers with PyTorch's semantics, the batch-statistics BN, the decoder and encoder, the three
latent-image models built from them, and the SIREN with its encodings.
"""
from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gonjax import kernels as tuned
from gonjax.config import ACTIVATION_NAMES

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "elu": nn.elu,
    "relu": nn.relu,
    "selu": nn.selu,
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES  # the names Config accepts


def symmetric_uniform(bound: float) -> Callable:
    """Initialiser drawing from U(-bound, bound), PyTorch's default (GON-SPEC 2.5).

    `jax.nn.initializers.uniform(s)` draws from [0, s), which is not the same thing.
    """

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


class BatchStatNorm(nn.Module):
    """Batch norm that always normalises with the statistics of the batch it sees (GON-SPEC 3).

    y = (x - mean) / sqrt(var + eps) * scale + bias, with mean and the biased two-pass variance taken over every
    axis but the last. P and J run BN in training mode everywhere, so no running average is ever used to
    normalise. Running averages are still kept in `batch_stats` as PyTorch keeps them (momentum 0.1, unbiased
    variance), for bookkeeping and parity with the PyTorch reference; initialisation leaves them untouched.

    Two modes serve the origin step's shortcut (`gonjax.origin.OriginShortcut`):
    - `batch_size`: x holds one example that stands for `batch_size` equal ones. Mean and variance are the same;
      the unbiased running variance counts the whole batch.
    - `bn_stats` collection: if it holds this layer's `mean` and `var`, they normalise x instead of x's own, and
      running averages are left alone; each example then goes through independently (the statistics held
      fixed). If the collection is mutable (outside init), the statistics of the batch are written to it.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    kernels: str = "xla_cpu"  # "autodiff": jnp sums and broadcasts, for forward-mode autodiff (KERNELS)

    @nn.compact
    def __call__(self, x: jax.Array, batch_size: int | None = None) -> jax.Array:
        if self.kernels == "xla_cpu":
            channel_sum, channel_broadcast = tuned.channel_sum, tuned.channel_broadcast
        else:
            channel_sum = lambda v: jnp.sum(v.reshape(-1, v.shape[-1]), axis=0)  # noqa: E731
            channel_broadcast = jnp.broadcast_to
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        frozen = self.has_variable("bn_stats", "mean")
        if frozen:
            mean, var = self.get_variable("bn_stats", "mean"), self.get_variable("bn_stats", "var")
        else:
            count = x.size // features
            mean = channel_sum(x) / count
        centred = x - channel_broadcast(mean, x.shape)
        if not frozen:
            var = channel_sum(jnp.square(centred)) / count
            self._record(mean, var, count * (batch_size or x.shape[0]) // x.shape[0])
        return centred * channel_broadcast(jax.lax.rsqrt(var + self.epsilon) * scale, x.shape) + bias

    def _record(self, mean: jax.Array, var: jax.Array, count: int) -> None:
        """Write the batch statistics to `bn_stats` if it is mutable, and update the running averages (PyTorch's:
        momentum, unbiased variance over `count` values per channel). Initialisation does neither."""
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, mean.shape)
        running_var = self.variable("batch_stats", "var", jnp.ones, var.shape)
        if self.is_initializing():
            return
        if self.is_mutable_collection("bn_stats"):
            self.put_variable("bn_stats", "mean", mean)
            self.put_variable("bn_stats", "var", var)
        unbiased = jax.lax.stop_gradient(var) * (count / max(count - 1, 1))
        m = self.momentum
        running_mean.value = ((1 - m) * running_mean.value
                              + m * jax.lax.stop_gradient(mean)).astype(running_mean.value.dtype)
        running_var.value = ((1 - m) * running_var.value + m * unbiased).astype(running_var.value.dtype)


class TorchConvTranspose(nn.Module):
    """PyTorch `ConvTranspose2d(k=4, stride, padding)` with PyTorch's init (GON-SPEC 2.1, 2.5).

    Parameters are flax ConvTranspose's (`kernel` (4, 4, Cin, Cout) with transpose_kernel=False, `bias`; init
    bound 1/sqrt(16 * Cout), as PyTorch reads fan-in from dim 1 of its (Cin, Cout, kh, kw) weight). The
    computation is selectable, all formulations being the same function (benchmarks/README.md measures them):
    - "taps" (default): the 1x1 -> 4x4 first layer as one matmul; each stride-2 layer as one matmul giving the 16
      taps of every input pixel, summed into their output pixels (`kernels.stride2_tap_matmul`);
    - "subpixel": the same first layer; each stride-2 layer as one stride-1 3x3 convolution producing the four
      output phases (4*Cout channels, 2.25x the FLOPs: zero taps) followed by depth-to-space;
    - "dilated": `lax.conv_transpose` (an lhs-dilated convolution; its backward is slow on XLA:CPU, jax#23783).
    """

    features: int
    stride: int
    padding: int
    impl: str = "taps"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bound = 1.0 / (16 * self.features) ** 0.5
        kernel = self.param("kernel", symmetric_uniform(bound), (4, 4, x.shape[-1], self.features))
        bias = self.param("bias", symmetric_uniform(bound), (self.features,))
        dtype = jnp.promote_types(x.dtype, kernel.dtype)
        x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
        n, h, w, _ = x.shape
        if self.impl != "dilated" and (self.stride, self.padding, h, w) == (1, 0, 1, 1):
            return jnp.einsum("nc,yxco->nyxo", x[:, 0, 0, :], kernel[::-1, ::-1]) + bias
        if self.impl == "taps" and (self.stride, self.padding) == (2, 1):
            return tuned.stride2_tap_matmul(x, kernel) + bias
        if self.impl == "subpixel" and (self.stride, self.padding) == (2, 1):
            return tuned.stride2_phase_conv(x, kernel) + bias
        pad = 4 - 1 - self.padding
        y = jax.lax.conv_transpose(x, kernel, (self.stride, self.stride), ((pad, pad), (pad, pad)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


class ConvDecoder(nn.Module):
    """The DCGAN-style decoder of GON-SPEC 2.1: latent (B, nz) -> image (B, 32, 32, nc) in (0, 1).

    ConvT(nz->4ngf, 1->4) BN act | ConvT(->2ngf, 4->8) BN act | ConvT(->ngf, 8->16) BN act | ConvT(->nc, 16->32)
    sigmoid. BN is `BatchStatNorm` (batch statistics in every pass).
    """

    ngf: int = 16
    nc: int = 1
    activation: str = "elu"
    deconv_impl: str = "taps"  # how the transposed convolutions are computed (TorchConvTranspose)
    kernels: str = "xla_cpu"  # "autodiff": JAX's own primitives only (KERNELS), deconv_impl then "dilated"
    bn_epsilon: float = 1e-5  # BatchStatNorm's eps

    @nn.compact
    def __call__(self, z: jax.Array, batch_size: int | None = None) -> jax.Array:
        """`batch_size`: z holds one latent standing for that many equal ones (see BatchStatNorm)."""
        act = ACTIVATIONS[self.activation]
        impl = self.deconv_impl if self.kernels == "xla_cpu" else "dilated"
        x = z[:, None, None, :]
        widths = (4 * self.ngf, 2 * self.ngf, self.ngf)
        for i, width in enumerate(widths):
            first = i == 0
            x = TorchConvTranspose(width, stride=1 if first else 2, padding=0 if first else 1,
                                   impl=impl, name=f"deconv{i + 1}")(x)
            norm = BatchStatNorm(epsilon=self.bn_epsilon, kernels=self.kernels, name=f"bn{i + 1}")
            x = act(norm(x, batch_size))
        x = TorchConvTranspose(self.nc, stride=2, padding=1, impl=impl, name="deconv4")(x)
        return nn.sigmoid(x)


# Convolutions with at most this many input channels (the image layer) run as im2col + one matmul: on XLA:CPU
# their weight gradient is 1.5x faster that way than as a convolution (benchmarks/README.md).
IM2COL_MAX_IN_FEATURES = 4


class TorchConv(nn.Module):
    """PyTorch `Conv2d(k=4, stride, padding)` with PyTorch's init bound 1/sqrt(16 * Cin) (GON-SPEC 2.2, 2.5).

    Parameters are flax `nn.Conv`'s (`kernel` (4, 4, Cin, Cout), `bias`). A kernel that covers its whole
    unpadded input (4x4 -> 1x1) is one matmul; a narrow input is unfolded into patches (im2col) and multiplied;
    anything else is `lax.conv_general_dilated`. All three are the same cross-correlation.
    """

    features: int
    stride: int
    padding: int
    kernels: str = "xla_cpu"  # KERNELS: "autodiff" computes a narrow input as a convolution, not im2col

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, cin = x.shape
        bound = 1.0 / (16 * cin) ** 0.5
        kernel = self.param("kernel", symmetric_uniform(bound), (4, 4, cin, self.features))
        bias = self.param("bias", symmetric_uniform(bound), (self.features,))
        dtype = jnp.promote_types(x.dtype, kernel.dtype)
        x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
        s, p = self.stride, self.padding
        if (h, w, p) == (4, 4, 0):
            return (x.reshape(n, -1) @ kernel.reshape(-1, self.features)).reshape(n, 1, 1, -1) + bias
        if cin <= IM2COL_MAX_IN_FEATURES and self.kernels == "xla_cpu":
            return tuned.im2col_conv(x, kernel, s, p) + bias
        y = jax.lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


def torch_dense(features: int, in_features: int, name: str) -> nn.Dense:
    """PyTorch `Linear(in, out)`: weight and bias from U(-1/sqrt(in), 1/sqrt(in)) (GON-SPEC 2.5)."""
    bound = 1.0 / in_features ** 0.5
    return nn.Dense(features, kernel_init=symmetric_uniform(bound), bias_init=symmetric_uniform(bound), name=name)


class ConvEncoder(nn.Module):
    """The mirrored encoder of GON-SPEC 2.2: image (B, 32, 32, nc) -> (B, nz).

    Conv(nc->ngf, 32->16) BN act | Conv(->2ngf, 16->8) BN act | Conv(->4ngf, 8->4) BN act | Conv(->nz, 4->1) act.
    """

    nz: int = 256
    ngf: int = 16
    activation: str = "elu"
    kernels: str = "xla_cpu"  # KERNELS
    bn_epsilon: float = 1e-5  # BatchStatNorm's eps

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        widths = (self.ngf, 2 * self.ngf, 4 * self.ngf)
        for i, width in enumerate(widths):
            x = TorchConv(width, stride=2, padding=1, kernels=self.kernels, name=f"conv{i + 1}")(x)
            x = act(BatchStatNorm(epsilon=self.bn_epsilon, kernels=self.kernels, name=f"bn{i + 1}")(x))
        x = act(TorchConv(self.nz, stride=1, padding=0, kernels=self.kernels, name="conv4")(x))
        return x.reshape(x.shape[0], -1)


def reparameterise(mu: jax.Array, logvar: jax.Array, noise: jax.Array) -> jax.Array:
    """z = mu + eps * exp(logvar / 2) with eps ~ N(0, I) given (GON-SPEC 2.2, 2.3)."""
    return mu + noise * jnp.exp(0.5 * logvar)


class GaussianHeads(nn.Module):
    """Two Linear(nz, nz) heads: mu and logvar of a diagonal Gaussian (GON-SPEC 2.2, 2.3)."""

    nz: int = 256

    @nn.compact
    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        return torch_dense(self.nz, h.shape[-1], "mu")(h), torch_dense(self.nz, h.shape[-1], "logvar")(h)


class _LatentImageModel(nn.Module):
    """Shared fields of the models built from the conv decoder; `decode` maps latents straight to images."""

    nz: int = 256
    ngf: int = 16
    nc: int = 1
    activation: str = "elu"
    deconv_impl: str = "taps"
    kernels: str = "xla_cpu"
    bn_epsilon: float = 1e-5

    def _decoder(self) -> ConvDecoder:
        return ConvDecoder(ngf=self.ngf, nc=self.nc, activation=self.activation, deconv_impl=self.deconv_impl,
                           kernels=self.kernels, bn_epsilon=self.bn_epsilon)

    def _encoder(self) -> ConvEncoder:
        return ConvEncoder(nz=self.nz, ngf=self.ngf, activation=self.activation, kernels=self.kernels,
                           bn_epsilon=self.bn_epsilon)

    def decode(self, z: jax.Array) -> jax.Array:
        return self.decoder(z)


class VariationalGONFunction(_LatentImageModel):
    """F of the Variational GON (GON-SPEC 2.3): z0 -> (Dec(mu + eps exp(logvar/2)), mu, logvar).

    `decode` feeds a latent straight into the decoder, bypassing the heads (sampling, GON-SPEC 4.6).
    """

    def setup(self):
        self.heads = GaussianHeads(self.nz)
        self.decoder = self._decoder()

    def __call__(self, z0: jax.Array, noise: jax.Array):
        mu, logvar = self.heads(z0)
        return self.decoder(reparameterise(mu, logvar, noise)), mu, logvar


class ConvAutoencoder(_LatentImageModel):
    """Conv AE baseline (GON-SPEC 2.2, 4.5): Dec(Enc(x))."""

    def setup(self):
        self.encoder = self._encoder()
        self.decoder = self._decoder()

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decoder(self.encoder(x))


class ConvVAE(_LatentImageModel):
    """VAE baseline (GON-SPEC 2.2, 4.5): x -> (Dec(mu + eps exp(logvar/2)), mu, logvar), heads on Enc(x)."""

    def setup(self):
        self.encoder = self._encoder()
        self.heads = GaussianHeads(self.nz)
        self.decoder = self._decoder()

    def __call__(self, x: jax.Array, noise: jax.Array):
        mu, logvar = self.heads(self.encoder(x))
        return self.decoder(reparameterise(mu, logvar, noise)), mu, logvar


def count_params(params) -> int:
    """Number of trainable scalars in a parameter pytree."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def coordinate_grid(size: int, dtype=jnp.float32) -> jax.Array:
    """(size*size, 2) pixel coordinates in [-1, 1]^2, row-major, coordinate 0 = row, 1 = column (GON-SPEC 2.4).

    linspace(-1, 1, size) per axis with meshgrid(indexing='ij'); jnp's default 'xy' would swap the axes.
    """
    axis = jnp.linspace(-1.0, 1.0, size, dtype=dtype)
    rows, cols = jnp.meshgrid(axis, axis, indexing="ij")
    return jnp.stack([rows.ravel(), cols.ravel()], axis=-1)


def _siren_first_kernel_init(key, shape, dtype=jnp.float32):
    """First SIREN layer: U(-1/in, 1/in) (GON-SPEC 2.5)."""
    return symmetric_uniform(1.0 / shape[0])(key, shape, dtype)


def _siren_kernel_init(w0: float):
    """Later SIREN layers: U(-sqrt(6/in)/w0, sqrt(6/in)/w0) (GON-SPEC 2.5)."""

    def init(key, shape, dtype=jnp.float32):
        return symmetric_uniform((6.0 / shape[0]) ** 0.5 / w0)(key, shape, dtype)

    return init


class FourierFeatures(nn.Module):
    """Gaussian Fourier features of coordinates: [sin(2 pi c B), cos(2 pi c B)], B ~ N(0, sigma^2) (in, features).

    B is drawn once at initialisation from the init key and kept, untrained, in the `constants` collection, so it
    is checkpointed with the run. Output width 2 * features (sines first).
    """

    features: int = 32
    sigma: float = 1.0

    @nn.compact
    def __call__(self, coords: jax.Array) -> jax.Array:
        projection = self.variable(
            "constants", "projection",
            lambda: self.sigma * jax.random.normal(self.make_rng("params"), (coords.shape[-1], self.features)))
        x = 2 * jnp.pi * (coords @ projection.value.astype(coords.dtype))
        return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


def nerf_encoding(coords: jax.Array, frequencies: int = 10) -> jax.Array:
    """NeRF's position encoding: for each coordinate c, [sin(pi 2^k c) for k < n] then [cos(pi 2^k c) for k < n].

    (..., d) -> (..., d * 2n), grouped by coordinate (all of coordinate 0's features first).
    """
    x = jnp.pi * coords[..., None] * (2.0 ** jnp.arange(frequencies, dtype=coords.dtype))
    x = jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)
    return x.reshape(*coords.shape[:-1], -1)


class ModulationNetwork(nn.Module):
    """Per-layer SIREN modulations from a latent: m_1 = relu(W_1 z + b_1), m_i = relu(W_i [m_{i-1}, z] + b_i).

    Returns `layers` arrays (B, hidden); each scales the output of one hidden SIREN layer (a modulated SIREN, as
    gon-pytorch offers, instead of concatenating the latent to the coordinates). PyTorch Linear init.
    """

    hidden: int = 256
    layers: int = 4

    @nn.compact
    def __call__(self, z: jax.Array) -> list[jax.Array]:
        modulations, x = [], z
        for i in range(self.layers):
            m = nn.relu(torch_dense(self.hidden, x.shape[-1], f"layer{i + 1}")(x))
            modulations.append(m)
            x = jnp.concatenate([m, z], axis=-1)
        return modulations


def siren_sine(kernels: str) -> Callable:
    """The SIREN's sine for a `kernels` choice (KERNELS): the vectorised float32 `kernels.sine` or `jnp.sin`."""
    return tuned.sine if kernels == "xla_cpu" else jnp.sin


class SirenInputLayer(nn.Module):
    """First SIREN layer on concat(coordinate, latent): sin(w0 (W_c c + W_z z + b)) -> (B, P, hidden).

    The kernel is stored whole, (coordinate features + latent, hidden), but the latent term W_z z + b is computed
    once per image and broadcast over its pixels, never materialising the (B, P, 2 + latent) input
    (GON-SPEC 2.4). With z None (a modulated SIREN) the layer sees the coordinates only: (P, hidden).
    """

    hidden: int = 256
    w0: float = 30.0
    kernels: str = "xla_cpu"  # KERNELS: "xla_cpu" takes `kernels.sine`, "autodiff" `jnp.sin`

    @nn.compact
    def __call__(self, coords: jax.Array, z: jax.Array | None) -> jax.Array:
        sin = siren_sine(self.kernels)
        d = coords.shape[-1]
        fan_in = d + (0 if z is None else z.shape[-1])
        kernel = self.param("kernel", _siren_first_kernel_init, (fan_in, self.hidden))
        bias = self.param("bias", symmetric_uniform(1.0 / fan_in ** 0.5), (self.hidden,))
        if z is None:
            return sin(self.w0 * (coords @ kernel + bias))
        per_image = z @ kernel[d:] + bias  # (B, hidden)
        per_pixel = coords @ kernel[:d]  # (P, hidden)
        return sin(self.w0 * (per_pixel[None, :, :] + per_image[:, None, :]))


class Siren(nn.Module):
    """The Implicit GON's SIREN (GON-SPEC 2.4): per pixel, concat(coordinate, latent) -> hidden sines -> nc.

    h = sin(w0 (W h + b)) with w0 = 30 in every hidden layer, output layer linear. Init per GON-SPEC 2.5.
    Variants (docs/spec.md, "Variants"), all off by default: the coordinates through a position encoding
    (`encoding` "fourier": `FourierFeatures`, "nerf": `nerf_encoding`); `modulation`: the latent no longer joins
    the input but scales each hidden layer's sines by a `ModulationNetwork` output; `output_sigmoid`: a sigmoid
    on the output (for BCE losses).
    """

    hidden: int = 256
    depth: int = 4  # hidden layers, each followed by a sine
    nc: int = 1
    w0: float = 30.0
    encoding: str = "none"  # POSITION_ENCODINGS
    fourier_features: int = 32
    fourier_sigma: float = 1.0
    nerf_frequencies: int = 10
    modulation: bool = False
    output_sigmoid: bool = False
    kernels: str = "xla_cpu"  # KERNELS: the sines as `kernels.sine` or as `jnp.sin`

    @nn.compact
    def __call__(self, coords: jax.Array, z: jax.Array) -> jax.Array:
        """coords (P, 2) shared by the batch, z (B, latent) -> (B, P, nc)."""
        if self.encoding == "fourier":
            coords = FourierFeatures(self.fourier_features, self.fourier_sigma, name="fourier")(coords)
        elif self.encoding == "nerf":
            coords = nerf_encoding(coords, self.nerf_frequencies)
        modulations = ModulationNetwork(self.hidden, self.depth, name="modulation")(z) if self.modulation else None
        h = SirenInputLayer(self.hidden, self.w0, self.kernels, name="hidden1")(coords, None if self.modulation else z)
        sin = siren_sine(self.kernels)
        bias_init = symmetric_uniform(1.0 / self.hidden ** 0.5)
        for i in range(self.depth):
            if i:
                layer = nn.Dense(self.hidden, kernel_init=_siren_kernel_init(self.w0), bias_init=bias_init,
                                 name=f"hidden{i + 1}")
                h = sin(self.w0 * pixelwise(layer, h))
            if modulations is not None:
                h = h * modulations[i][:, None, :]  # the first layer's (P, hidden) becomes (B, P, hidden)
        out = pixelwise(nn.Dense(self.nc, kernel_init=_siren_kernel_init(self.w0), bias_init=bias_init, name="out"), h)
        return nn.sigmoid(out) if self.output_sigmoid else out


def pixelwise(layer: Callable, h: jax.Array) -> jax.Array:
    """`layer` applied to the last axis of h (..., features) through a (pixels, features) matrix: its kernel
    gradient is then one matmul over all pixels of the batch (over (B, P, features) XLA:CPU first copies the
    cotangent to a transposed layout, 1.7x the time of a SIREN layer's forward and backward)."""
    return layer(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], -1)
