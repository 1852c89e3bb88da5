"""The library API a user meets first: every model's encode / decode against its Flax modules used directly
(the spec's formulas written out here: GON-SPEC 2.3, 2.4, 4.1, 4.3-4.5), and a trained run loaded by
`gonjax.load_run` to encode, decode, reconstruct and sample."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gonjax
from gonjax import models
from gonjax.config import Config
from gonjax.errors import UsageError
from gonjax.zoo import build_model


def _setup(model_name, shape=(8, 32, 32, 1), **overrides):
    config = Config(model=model_name, dataset="coil20", ngf=4, nz=8, **overrides)
    model = build_model(config, shape[-1])
    images = jax.random.uniform(jax.random.PRNGKey(1), shape)
    variables = model.init(jax.random.PRNGKey(0), images)
    return config, model, images, variables["params"], variables.get("batch_stats", {})


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(b)))))


def test_gon_encode_is_minus_the_gradient_at_the_origin_and_decode_gives_the_training_reconstruction():
    # float64: at z0 = 0 every image decodes alike, so BN divides a zero variance (plus eps) and float32 rounding
    # of the batched reference would be amplified ~1/sqrt(eps) (GON-SPEC 3); float64 leaves ~1e-9 of it.
    with jax.enable_x64(True):
        config, model, images, params, stats = _setup("gon")
        params, images = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), (params, images))
        decoder = models.ConvDecoder(ngf=4, nc=1)

        def inner(z):  # GON-SPEC 4.1: squared error summed over channels, averaged over batch and pixels
            out, _ = decoder.apply({"params": params, "batch_stats": stats}, z, mutable=["batch_stats"])
            return jnp.mean(jnp.sum(jnp.square(out - images), axis=-1))

        expected = -jax.grad(inner)(jnp.zeros((8, 8), jnp.float64))
        latent = jax.jit(model.encode)(params, stats, images, jax.random.PRNGKey(2))
        _close(latent, expected, tol=1e-6)
        assert float(jnp.std(latent)) > 0  # not the origin itself
        _, (_, output) = jax.jit(model.apply)(params, stats, images, jax.random.PRNGKey(2))
        _close(jax.jit(model.decode)(params, stats, latent), output.reconstruction, tol=1e-10)


def test_implicit_gon_encode_and_decode_are_the_sirens_origin_step_and_its_image():
    config, model, images, params, state = _setup("implicit_gon", shape=(4, 32, 32, 1))
    siren = models.Siren(nc=1)
    grid = models.coordinate_grid(32)
    pixels = images.reshape(4, -1, 1)

    def inner(z):  # GON-SPEC 4.4: per-pixel MSE
        return jnp.mean(jnp.square(siren.apply({"params": params}, grid, z) - pixels))

    latent = model.encode(params, state, images, jax.random.PRNGKey(2))
    _close(latent, -jax.grad(inner)(jnp.zeros((4, 8))), tol=1e-4)
    decoded = model.decode(params, state, latent)
    assert decoded.shape == images.shape
    _close(decoded, siren.apply({"params": params}, grid, latent).reshape(images.shape))


def test_vae_encode_is_the_posterior_mean_and_decode_the_decoder():
    config, model, images, params, stats = _setup("vae")
    module = models.ConvVAE(nz=8, ngf=4, nc=1)
    (recon, mu, _), _ = module.apply({"params": params, "batch_stats": stats}, images, jnp.zeros((8, 8)),
                                     mutable=["batch_stats"])  # eps = 0: the decoder sees mu itself
    _close(model.encode(params, stats, images, jax.random.PRNGKey(2)), mu)
    _close(model.decode(params, stats, mu), recon)


def test_vgon_encode_is_the_heads_mean_at_the_origin_latent():
    config, model, images, params, stats = _setup("vgon")
    function = models.VariationalGONFunction(nz=8, ngf=4, nc=1)
    rng = jax.random.PRNGKey(2)
    z = model.apply(params, stats, images, rng)[1][1].latent  # the origin step's latent (tested in test_origin)
    (recon, mu, _), _ = function.apply({"params": params, "batch_stats": stats}, z, jnp.zeros_like(z),
                                       mutable=["batch_stats"])
    _close(model.encode(params, stats, images, rng), mu)
    _close(model.decode(params, stats, mu), recon)


def test_ae_decode_of_encode_is_its_reconstruction():
    config, model, images, params, stats = _setup("ae")
    _, (_, output) = model.apply(params, stats, images, jax.random.PRNGKey(0))
    latent = model.encode(params, stats, images, jax.random.PRNGKey(0))
    assert latent.shape == (8, 8)
    _close(model.decode(params, stats, latent), output.reconstruction)


def test_load_run_encodes_decodes_and_samples_a_trained_run(shared_data, tfds_dir, tmp_path):
    config = Config(model="vgon", dataset="coil20", ngf=4, nz=8, max_steps=2, eval_batches=1,
                    data_dir=str(tfds_dir), manual_dir=str(shared_data))
    gonjax.train_and_evaluate(config, tmp_path / "run")
    run = gonjax.load_run(tmp_path / "run")
    assert run.step == 2 and run.image_shape == (32, 32, 1) and run.config == config
    images = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 1))
    z = run.encode(images)
    _close(z, run.model.encode(run.state.params, run.state.batch_stats, images, jax.random.PRNGKey(0)))
    halfway = run.decode(0.5 * (z[:2] + z[2:]))
    assert halfway.shape == (2, 32, 32, 1) and bool(jnp.all((halfway >= 0) & (halfway <= 1)))
    assert run.sample(3, jax.random.PRNGKey(0)).shape == (3, 32, 32, 1)
    with pytest.raises(UsageError, match=r"built for images of shape \(B, 32, 32, 1\), got \(4, 28, 28, 1\)"):
        run.encode(jnp.zeros((4, 28, 28, 1)))
    with pytest.raises(UsageError, match="a batch needs at least 2 images, got 1"):
        run.encode(images[:1])
    with pytest.raises(UsageError, match="only the Implicit GON renders"):
        run.render(z, 64)
