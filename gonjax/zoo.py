"""The model registry: each model = Flax module(s) + loss + metrics, in one `Model` record.

The trainer (`gonjax.train`) knows nothing else about a model, so every model trains, evaluates, checkpoints and
draws pictures through the same loop. A model's `apply` is pure and returns

    loss, (new_state, ModelOutput(reconstruction, metrics, latent))

`metrics` are per-batch means of per-image quantities (the trainer averages them over equal-sized batches).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gonjax import losses, origin
from gonjax.config import Config, backend_kernels, backend_precision
from gonjax.catalog import NATIVE_SIZE
from gonjax.models import ConvAutoencoder, ConvDecoder, ConvVAE, Siren, VariationalGONFunction, coordinate_grid


class ModelOutput(NamedTuple):
    reconstruction: jax.Array
    metrics: dict[str, jax.Array]
    latent: jax.Array | None = None  # the latent the reconstruction was decoded from, where there is one


@dataclasses.dataclass(frozen=True)
class Model:
    """A trainable model as the trainer sees it.

    init(rng, batch) -> {"params": ..., "batch_stats": ...}: the initial variables, which depend on the
        shape of one example only (each init runs its modules on one example's worth of input, eagerly, so it
        is cheap for any batch size and gives the same variables for every batch size)
    apply(params, batch_stats, batch, rng, step=0) -> (loss, (batch_stats, ModelOutput))
    encode(params, batch_stats, images, rng) -> latents (n, nz) of a batch of images: the origin step's latent
        (GON, Implicit GON), the mean of q(z | x) (V-GON: of the heads at the origin step's latent; VAE), or the
        encoder's output (AE)
    decode(params, batch_stats, latents) -> images (n, H, W, C) decoded from latents, BN over the n latents
    sample(params, batch_stats, rng, n) -> n images from the prior, or None for models without one
    render(params, batch_stats, latents, coords) -> (n, P, C) pixel values at coordinates (P, 2), for models
        that are functions of coordinates (gonjax.render tiles a grid of any resolution into such calls)

    A GON's latent is a function of the whole batch, not of one image: the decoder's batch norm normalises with
    the batch's statistics in the inner pass too (GON-SPEC 3), so encode the images in the batches (of the
    training batch size) they should be seen in. The Implicit GON has no batch norm, so its latent of an image
    depends on no other image, but on how many there are: its inner loss is a mean over the batch (GON-SPEC 4.1,
    4.4), so each latent carries a factor 1/B, and 6 images encoded alone get latents 64/6 times those they get in
    a batch of 64. Encode in batches of the training batch size, every model.
    """

    name: str
    init: Callable[[jax.Array, jax.Array], dict[str, Any]]
    apply: Callable[..., tuple[jax.Array, tuple[Any, ModelOutput]]]
    encode: Callable[..., jax.Array] | None = None
    decode: Callable[..., jax.Array] | None = None
    sample: Callable[..., jax.Array] | None = None
    render: Callable[..., jax.Array] | None = None
    image_size: int = 32  # side of the square images the model reads and writes
    table_metric: str = "sse"  # the metric the spec's tables report (curves.png, the log line)
    latent_bank_batches: int = 0  # keep the latents of this many recent training batches in the TrainState


def check_images(images, nc: int, size: int, name: str, batch_norm: bool = True) -> None:
    """A ValueError (at trace time: shapes are static) unless `images` is a batch (B, size, size, nc), with
    B >= 2 for a model whose batch norm takes the batch's statistics (one image has no variance)."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1:] != (size, size, nc):
        raise ValueError(f"{name} was built for images of shape (B, {size}, {size}, {nc}), got {shape}")
    if batch_norm and shape[0] < 2:
        raise ValueError(f"{name} normalises over the batch (batch norm, GON-SPEC 3): a batch needs at least 2 "
                         f"images, got {shape[0]}")


def reconstruction_metrics(reconstruction: jax.Array, images: jax.Array) -> dict[str, jax.Array]:
    """Per-batch `loss` (GON-SPEC 4.1 per-pixel loss) and `sse` (SSE/img, GON-SPEC 7)."""
    return {
        "loss": losses.pixel_sse_loss(reconstruction, images),
        "sse": jnp.mean(losses.sse_per_image(reconstruction, images)),
    }


def kl_weight(config: Config, step) -> jax.Array:
    """Weight of the KLD at `step`: config.kl_weight, ramped linearly from 0 over config.kl_warmup_steps."""
    if config.kl_warmup_steps == 0:
        return jnp.asarray(config.kl_weight)
    return config.kl_weight * jnp.minimum(1.0, step / config.kl_warmup_steps)


BCE_PER_IMAGE = {"eps": losses.bce_per_image, "clamp": losses.clamped_bce_per_image}  # by Config.bce


def variational_loss(reconstruction, images, mu, logvar, weight, bce_form: str = "eps"):
    """BCE + weight * KLD, each averaged over the batch (GON-SPEC 4.3), and the per-image metrics; the BCE's logs
    as `bce_form` says (BCE_PER_IMAGE: J's +1e-10 or P's clamp)."""
    bce = jnp.mean(BCE_PER_IMAGE[bce_form](reconstruction, images))
    kld = jnp.mean(losses.kld_per_image(mu, logvar))
    loss = bce + weight * kld
    metrics = {"loss": loss, "bce": bce, "kld": kld, "bce_kld": bce + kld,
               "sse": jnp.mean(losses.sse_per_image(reconstruction, images))}
    return loss, metrics


def _stateful_apply(module, params, batch_stats, *args, **kwargs):
    """module.apply with BN running averages threaded: returns (output, new batch_stats)."""
    out, updates = module.apply({"params": params, "batch_stats": batch_stats}, *args, mutable=["batch_stats"],
                                **kwargs)
    return out, updates["batch_stats"]


ORIGIN_PARAM = "latent_origin"  # params[ORIGIN_PARAM]: the learned z0 (nz,), with config.learn_origin


def module_params(params):
    """The parameters of a model's Flax module(s): `params` without a learned origin."""
    return {k: v for k, v in params.items() if k != ORIGIN_PARAM}


def _with_learned_origin(config: Config, variables, nz: int, dtype) -> dict[str, Any]:
    """Variables from a module's init, plus the learned origin (zeros, the spec's z0) when the config asks."""
    variables = dict(variables)
    if config.learn_origin:
        variables["params"] = {**variables["params"], ORIGIN_PARAM: jnp.zeros((nz,), dtype)}
    return variables


def _origin_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The keys of an origin-step model's z0 draw and of its origin step (split by `origin.pass_keys`)."""
    rng_z0, rng_fit = jax.random.split(rng)
    return rng_z0, rng_fit


def latent_start(config: Config, params, rng: jax.Array, batch_size: int, nz: int, dtype=jnp.float32) -> jax.Array:
    """z0 (batch_size, nz) of an origin-step model's step under key `rng` (GON-SPEC 4.1, 9): the origin, or
    params[ORIGIN_PARAM] for every example (learned origin), plus N(0, sigma^2) noise for the latent-init
    ablation, drawn for every example (config.latent_noise "example", the spec's) or once for the batch
    ("batch"). The model's `apply(params, state, images, rng)` starts from exactly this z0."""
    rows = 1 if config.latent_noise == "batch" else batch_size
    z0 = origin.initial_latent(_origin_keys(rng)[0], (rows, nz), config.latent_sigma, dtype)
    z0 = jnp.broadcast_to(z0, (batch_size, nz))
    return z0 + params[ORIGIN_PARAM].astype(dtype) if ORIGIN_PARAM in params else z0


def _origin_model_step(config: Config, fit: origin.Fit, params, state, batch, rng: jax.Array, nz: int, *,
                       shortcut: origin.OriginShortcut | None = None, inner_fit: origin.Fit | None = None):
    """`origin.origin_step` with the config's variants, for every origin-step model (GON-SPEC 4.1-4.4, 9), from
    `latent_start`'s z0; then config.latent_updates updates of step config.latent_step_size."""
    z0 = latent_start(config, params, rng, batch.shape[0], nz, batch.dtype)
    return origin.origin_step(fit, module_params(params), state, batch, _origin_keys(rng)[1], z0,
                              detach=config.detach, shortcut=shortcut, updates=config.latent_updates,
                              step_size=config.latent_step_size, inner_fit=inner_fit)


def _origin_metrics(result: origin.OriginResult) -> dict[str, jax.Array]:
    """`inner_loss` (at z0) and, after several latent updates, `last_inner_loss` (at z_{N-1})."""
    metrics = {"inner_loss": result.inner_loss}
    if result.inner_losses.shape[0] > 1:
        metrics["last_inner_loss"] = result.inner_losses[-1]
    return metrics


def _module_decoder(module):
    """decode(params, batch_stats, z): `module.decode`, the conv decoder fed the latents straight, BN over them."""

    def decode(params, batch_stats, z):
        return _stateful_apply(module, module_params(params), batch_stats, z, method=module.decode)[0]

    return decode


def _prior_sampler(module):
    """n images decoded from z ~ N(0, I), BN over the n samples (GON-SPEC 4.6)."""
    decode = _module_decoder(module)

    def sample(params, batch_stats, rng, n):
        return decode(params, batch_stats, jax.random.normal(rng, (n, module.nz)))

    return sample


def _latent_of(apply):
    """encode(params, batch_stats, images, rng) of an origin-step model: the latent its `apply` reaches."""

    def encode(params, batch_stats, images, rng):
        return apply(params, batch_stats, images, rng)[1][1].latent

    return encode


def _conv_fields(config: Config, nc: int) -> dict[str, Any]:
    """The conv decoder's (and encoder's) fields from the config: widths, activation, kernels, BN eps."""
    return {"ngf": config.ngf, "nc": nc, "activation": config.activation, "deconv_impl": config.deconv_impl,
            "kernels": config.kernels, "bn_epsilon": config.bn_epsilon}


def gon(config: Config, nc: int) -> Model:
    """GON (GON-SPEC 4.1), detached GON (4.2), the latent-init ablation (9) and the variants of docs/spec.md
    ("Variants"), on the conv decoder."""
    decoder = ConvDecoder(**_conv_fields(config, nc))
    nz = config.nz

    def decode(params, batch_stats, z, batch_size, stats):
        if stats is not None:
            return decoder.apply({"params": params, "bn_stats": stats}, z)
        out, updates = decoder.apply({"params": params, "batch_stats": batch_stats}, z, batch_size,
                                     mutable=["batch_stats", "bn_stats"])
        return out, (updates["bn_stats"], updates["batch_stats"])

    fit, inner_fit, shortcut = _origin_fits(config, decode, losses.pixel_sse_loss)

    def apply(params, batch_stats, images, rng, step=0):
        check_images(images, nc, 32, config.run_name)
        loss, result = _origin_model_step(config, fit, params, batch_stats, images, rng, nz, shortcut=shortcut,
                                          inner_fit=inner_fit)
        metrics = {**reconstruction_metrics(result.output, images), "loss": loss, **_origin_metrics(result)}
        return loss, (result.state, ModelOutput(result.output, metrics, result.latent))

    def init(rng, images):
        variables = decoder.init(rng, jnp.zeros((1, nz), images.dtype))
        return _with_learned_origin(config, variables, nz, images.dtype)

    def decode_latents(params, batch_stats, z):
        return _stateful_apply(decoder, module_params(params), batch_stats, z)[0]

    return Model(name=config.run_name, init=init, apply=apply, encode=_latent_of(apply), decode=decode_latents)


def _origin_fits(config: Config, decode, spec_loss, pointwise: origin.Pointwise | None = None
                 ) -> tuple[origin.Fit, origin.Fit, origin.OriginShortcut | None]:
    """A deterministic model's outer and inner fit from its decoder and the spec's loss (or gon-pytorch's two
    BCEs, config.loss "peer_bce"), and the shortcut that computes its first inner pass from one example
    (origin.origin_gradient; `pointwise` for a coordinate network) where every example starts from the same z0
    and the config allows."""
    outer_loss, inner_loss = spec_loss, spec_loss
    if config.loss == "peer_bce":
        outer_loss, inner_loss = losses.peer_outer_bce, losses.peer_inner_bce
    inner = origin.OriginShortcut(decode, inner_loss, pointwise)
    shared_start = config.latent_sigma == 0.0 or config.latent_noise == "batch"  # every row of z0 equal
    shortcut = inner if config.origin_shortcut and shared_start else None
    return origin.OriginShortcut(decode, outer_loss).fit, inner.fit, shortcut


def _vgon_pass_noise(pass_key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """The reparameterisation eps one V-GON pass draws from its key."""
    return jax.random.normal(pass_key, shape, dtype)


def vgon_noise(rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The eps of the (first) inner and of the outer pass that `vgon(...).apply` draws from `rng` (independent
    draws)."""
    inner, outer = origin.pass_keys(_origin_keys(rng)[1])
    return _vgon_pass_noise(inner, shape, dtype), _vgon_pass_noise(outer, shape, dtype)


def vgon(config: Config, nc: int) -> Model:
    """Variational GON (GON-SPEC 2.3, 4.3): the origin step on BCE + KLD, fresh noise in each pass."""
    function = VariationalGONFunction(nz=config.nz, **_conv_fields(config, nc))
    nz = config.nz

    def apply(params, batch_stats, images, rng, step=0):
        check_images(images, nc, 32, config.run_name)
        weight = kl_weight(config, step)

        def fit(params, batch_stats, z, images, rng):
            noise = _vgon_pass_noise(rng, z.shape, z.dtype)
            (reconstruction, mu, logvar), batch_stats = _stateful_apply(function, params, batch_stats, z, noise)
            loss, metrics = variational_loss(reconstruction, images, mu, logvar, weight, config.bce)
            return loss, (batch_stats, (reconstruction, metrics))

        loss, result = _origin_model_step(config, fit, params, batch_stats, images, rng, nz)
        reconstruction, metrics = result.output
        metrics = {**metrics, **_origin_metrics(result)}
        return loss, (result.state, ModelOutput(reconstruction, metrics, result.latent))

    def init(rng, images):
        z0 = jnp.zeros((1, nz), images.dtype)
        return _with_learned_origin(config, function.init(rng, z0, z0), nz, images.dtype)

    origin_latent = _latent_of(apply)

    def encode(params, batch_stats, images, rng):
        z = origin_latent(params, batch_stats, images, rng)
        (mu, _), _ = _stateful_apply(function, module_params(params), batch_stats, z, method=_heads)
        return mu

    return Model(name=config.run_name, init=init, apply=apply, encode=encode, decode=_module_decoder(function),
                 sample=_prior_sampler(function))


def _heads(module, h):
    """(mu, logvar) of a variational module's Gaussian heads (a `method` for `module.apply`)."""
    return module.heads(h)


def ae(config: Config, nc: int) -> Model:
    """Conv autoencoder baseline (GON-SPEC 2.2, 4.5): the GON loss on Dec(Enc(x))."""
    module = ConvAutoencoder(nz=config.nz, **_conv_fields(config, nc))

    def apply(params, batch_stats, images, rng, step=0):
        check_images(images, nc, 32, config.run_name)
        reconstruction, batch_stats = _stateful_apply(module, params, batch_stats, images)
        metrics = reconstruction_metrics(reconstruction, images)
        return metrics["loss"], (batch_stats, ModelOutput(reconstruction, metrics))

    def encode(params, batch_stats, images, rng):
        check_images(images, nc, 32, config.run_name)
        return _stateful_apply(module, params, batch_stats, images, method=lambda m, x: m.encoder(x))[0]

    return Model(name=config.run_name, init=lambda rng, images: dict(module.init(rng, images[:1])), apply=apply,
                 encode=encode, decode=_module_decoder(module))


def vae_noise(rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """The eps that `vae(...).apply` draws from `rng`."""
    return jax.random.normal(rng, shape, dtype)


def vae(config: Config, nc: int) -> Model:
    """VAE baseline (GON-SPEC 2.2, 4.5): BCE + KLD with the encoder's mu and logvar, eps drawn on every call."""
    module = ConvVAE(nz=config.nz, **_conv_fields(config, nc))
    nz = config.nz

    def apply(params, batch_stats, images, rng, step=0):
        check_images(images, nc, 32, config.run_name)
        noise = vae_noise(rng, (images.shape[0], nz), images.dtype)
        (reconstruction, mu, logvar), batch_stats = _stateful_apply(module, params, batch_stats, images, noise)
        loss, metrics = variational_loss(reconstruction, images, mu, logvar, kl_weight(config, step), config.bce)
        return loss, (batch_stats, ModelOutput(reconstruction, metrics))

    def init(rng, images):
        return dict(module.init(rng, images[:1], jnp.zeros((1, nz), images.dtype)))

    def encode(params, batch_stats, images, rng):
        check_images(images, nc, 32, config.run_name)
        (mu, _), _ = _stateful_apply(module, params, batch_stats, images, method=lambda m, x: _heads(m, m.encoder(x)))
        return mu

    return Model(name=config.run_name, init=init, apply=apply, encode=encode, decode=_module_decoder(module),
                 sample=_prior_sampler(module))


def siren_for(config: Config, nc: int) -> Siren:
    """The Implicit GON's SIREN with the config's variants (position encoding, modulation, sigmoid output for
    gon-pytorch's BCE)."""
    return Siren(nc=nc, encoding=config.position_encoding, fourier_features=config.fourier_features,
                 fourier_sigma=config.fourier_sigma, nerf_frequencies=config.nerf_frequencies,
                 modulation=config.modulation, output_sigmoid=config.loss == "peer_bce", kernels=config.kernels)


def implicit_gon(config: Config, nc: int) -> Model:
    """Implicit GON (GON-SPEC 2.4, 4.4): a SIREN of (coordinate, latent), latents from the origin step.

    Images are read at their native size (28 for MNIST / Fashion-MNIST, 32 otherwise) as (B, S*S, nc) pixel
    lists on the row-major coordinate grid. Loss: per-pixel MSE (J), or with loss_reduction="sum" the squared
    error summed over pixels and averaged over batch and channels (P's `((g - x)**2).sum(1).mean()` on (B, S*S, nc)
    pixel lists), or gon-pytorch's BCEs (loss="peer_bce", sigmoid output).
    No BN: the state holds only a Fourier encoding's fixed projection (the SIREN's `constants`), else {}. The
    latents of the last 100 training batches are kept for sampling (GON-SPEC 4.6).
    """
    size = NATIVE_SIZE[config.dataset]
    siren = siren_for(config, nc)
    nz = config.nz

    def pixel_loss(output, target):
        squared = jnp.square(output - target)
        return jnp.mean(squared) if config.loss_reduction == "mean" else jnp.mean(jnp.sum(squared, axis=1))

    def decode_at(params, state, z, coords):
        return siren.apply({"params": params, "constants": state}, coords, z)

    pointwise = origin.Pointwise(decode_at, lambda dtype: coordinate_grid(size, dtype))

    def decode(params, state, z, batch_size, stats):
        output = decode_at(params, state, z, pointwise.points(z.dtype))
        return output if stats is not None else (output, ({}, state))

    fit, inner_fit, shortcut = _origin_fits(config, decode, pixel_loss, pointwise)

    def apply(params, state, images, rng, step=0):
        check_images(images, nc, size, config.run_name, batch_norm=False)
        pixels = images.reshape(images.shape[0], -1, images.shape[-1])
        loss, result = _origin_model_step(config, fit, params, state, pixels, rng, nz, shortcut=shortcut,
                                          inner_fit=inner_fit)
        reconstruction = result.output.reshape(images.shape)
        mse = losses.mse_per_image(reconstruction, images)
        metrics = {"loss": loss, "mse": jnp.mean(mse), "psnr": jnp.mean(losses.psnr(mse)),
                   "sse": jnp.mean(losses.sse_per_image(reconstruction, images)), **_origin_metrics(result)}
        return loss, (result.state, ModelOutput(reconstruction, metrics, result.latent))

    def render(params, state, latents, coords):
        """Decode latents at any coordinates of [-1, 1]^2, the square the training grid spans: (n, P, nc)."""
        return decode_at(module_params(params), state, latents, coords)

    def init(rng, images):
        variables = siren.init(rng, coordinate_grid(size), jnp.zeros((1, nz), images.dtype))
        variables = {"params": variables["params"], "batch_stats": variables.get("constants", {})}
        return _with_learned_origin(config, variables, nz, images.dtype)

    def decode_latents(params, state, latents):
        pixels = render(params, state, latents, coordinate_grid(size, latents.dtype))
        return pixels.reshape(latents.shape[0], size, size, -1)

    return Model(name=config.run_name, init=init, apply=apply, encode=_latent_of(apply), decode=decode_latents,
                 render=render, image_size=size,
                 table_metric="mse", latent_bank_batches=100)


MODELS: dict[str, Callable[[Config, int], Model]] = {
    "gon": gon, "vgon": vgon, "ae": ae, "vae": vae, "implicit_gon": implicit_gon}


def build_model(config: Config, nc: int, backend: str | None = None) -> Model:
    """The registered model `config.model` for images with `nc` channels, built for `backend` (default: JAX's
    default backend): with the kernels `config.kernels` resolves to there, and every function of the model traced
    under the matmul precision `config.matmul_precision` pins there (`config.backend_kernels`,
    `config.backend_precision`), so whoever jits its functions gets that precision in the program."""
    backend = backend or jax.default_backend()
    config = dataclasses.replace(config, kernels=backend_kernels(config.kernels, backend))
    model = MODELS[config.model](config, nc)
    precision = backend_precision(config.matmul_precision, backend)
    if precision is None:
        return model
    pinned = {name: _traced_at(getattr(model, name), precision)
              for name in ("init", "apply", "encode", "decode", "sample", "render")}
    return dataclasses.replace(model, **pinned)


def _traced_at(fn, precision: str):
    """`fn` traced under `jax.default_matmul_precision(precision)`: every contraction it binds, and the ones its
    derivatives bind (they inherit the primitive's precision), carries that precision."""
    if fn is None:
        return None

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    return traced
