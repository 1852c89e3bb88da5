"""The model registry: each model = Flax module(s) + loss + metrics, in one `Model` record.

The trainer (`gonjax.train`) knows nothing else about a model, so every model trains, evaluates, checkpoints and
draws pictures through the same loop. A model's `apply` is pure and returns

    loss, (new_state, ModelOutput(reconstruction, metrics))

`metrics` are per-batch means of per-image quantities (the trainer averages them over equal-sized batches).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gonjax import losses, origin
from gonjax.config import Config
from gonjax.models import ConvDecoder


class ModelOutput(NamedTuple):
    reconstruction: jax.Array
    metrics: dict[str, jax.Array]
    latent: jax.Array | None = None  # the latent the reconstruction was decoded from, where there is one


@dataclasses.dataclass(frozen=True)
class Model:
    """A trainable model as the trainer sees it.

    init(rng, batch) -> {"params": ..., "batch_stats": ...}  (batch_stats may be {})
    apply(params, state, batch, rng) -> (loss, (state, ModelOutput))
    """

    name: str
    init: Callable[[jax.Array, jax.Array], dict[str, Any]]
    apply: Callable[..., tuple[jax.Array, tuple[Any, ModelOutput]]]
    image_size: int = 32  # side of the square images the model reads and writes


def reconstruction_metrics(reconstruction: jax.Array, images: jax.Array) -> dict[str, jax.Array]:
    """Per-batch `loss` (GON-SPEC 4.1 per-pixel loss) and `sse` (SSE/img, GON-SPEC 7)."""
    return {
        "loss": losses.pixel_sse_loss(reconstruction, images),
        "sse": jnp.mean(losses.sse_per_image(reconstruction, images)),
    }


def gon(config: Config, nc: int) -> Model:
    """GON (GON-SPEC 4.1), detached GON (4.2) and the latent-init ablation (9), on the conv decoder."""
    decoder = ConvDecoder(ngf=config.ngf, nc=nc, activation=config.activation)
    nz, sigma, detach = config.nz, config.latent_sigma, config.detach

    def fit(params, batch_stats, z, images, rng):
        del rng  # the GON decoder is deterministic
        reconstruction, updates = decoder.apply(
            {"params": params, "batch_stats": batch_stats}, z, mutable=["batch_stats"])
        return losses.pixel_sse_loss(reconstruction, images), (updates["batch_stats"], reconstruction)

    def apply(params, batch_stats, images, rng):
        rng_z0, rng_fit = jax.random.split(rng)
        z0 = origin.initial_latent(rng_z0, (images.shape[0], nz), sigma, images.dtype)
        loss, result = origin.origin_step(fit, params, batch_stats, images, rng_fit, z0, detach=detach)
        metrics = reconstruction_metrics(result.output, images)
        metrics["inner_loss"] = result.inner_loss
        return loss, (result.state, ModelOutput(result.output, metrics, result.latent))

    def init(rng, images):
        return dict(decoder.init(rng, jnp.zeros((images.shape[0], nz), images.dtype)))

    return Model(name=config.run_name, init=init, apply=apply)


MODELS: dict[str, Callable[[Config, int], Model]] = {"gon": gon}


def build_model(config: Config, nc: int) -> Model:
    """The registered model `config.model` for images with `nc` channels."""
    return MODELS[config.model](config, nc)
