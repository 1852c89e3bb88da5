"""Loss reductions of GON-SPEC 4.1 and 7 against NumPy written from the spec's formulas."""
import jax
import jax.numpy as jnp
import numpy as np

from gonjax.config import Config
from gonjax.zoo import kl_weight, variational_loss

from gonjax import losses


def test_pixel_sse_loss_sums_channels_and_averages_batch_and_pixels():
    rng = np.random.default_rng(0)
    x_hat, x = rng.uniform(size=(2, 3, 32, 32, 3))  # B=3, 32x32, nc=3
    expected = sum(((x_hat[b, h, w] - x[b, h, w]) ** 2).sum()
                   for b in range(3) for h in range(32) for w in range(32)) / (3 * 32 * 32)
    np.testing.assert_allclose(float(losses.pixel_sse_loss(x_hat, x)), expected, rtol=1e-6)


def test_sse_per_image_is_1024_times_the_pixel_loss_on_grey_32x32():
    rng = np.random.default_rng(1)
    x_hat, x = rng.uniform(size=(2, 5, 32, 32, 1)).astype(np.float32)
    per_image = np.asarray(losses.sse_per_image(x_hat, x))
    np.testing.assert_allclose(per_image, ((x_hat - x) ** 2).reshape(5, -1).sum(1), rtol=1e-5)
    np.testing.assert_allclose(per_image.mean(), 1024 * float(losses.pixel_sse_loss(x_hat, x)), rtol=1e-5)


def _bce_kld_numpy(x_hat, x, mu, logvar):
    """GON-SPEC 4.3 in float64, loop over images."""
    bce = np.mean([-(x[b] * np.log(x_hat[b] + 1e-10) + (1 - x[b]) * np.log(1 - x_hat[b] + 1e-10)).sum()
                   for b in range(len(x))])
    kld = np.mean([-0.5 * np.sum(1 + logvar[b] - mu[b] ** 2 - np.exp(logvar[b])) for b in range(len(x))])
    return bce, kld


def test_bce_and_kld_match_numpy_float64():
    rng = np.random.default_rng(2)
    x_hat = rng.uniform(0.01, 0.99, size=(4, 32, 32, 3))
    x = rng.uniform(size=(4, 32, 32, 3))
    x[0, 0, 0, 0], x_hat[1, 1, 1, 1] = 1.0, 0.0  # exercises the +1e-10 inside the logs
    mu, logvar = rng.normal(size=(2, 4, 16))
    bce, kld = _bce_kld_numpy(x_hat, x, mu, logvar)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(losses.bce_per_image(x_hat, x)).mean(), bce, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(losses.kld_per_image(mu, logvar)).mean(), kld, rtol=1e-12)
        loss, metrics = variational_loss(x_hat, x, mu, logvar, 0.25)
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(float(loss), bce + 0.25 * kld, rtol=1e-12)
        np.testing.assert_allclose(float(metrics["bce_kld"]), bce + kld, rtol=1e-12)
        np.testing.assert_allclose(float(metrics["sse"]), ((x_hat - x) ** 2).sum((1, 2, 3)).mean(), rtol=1e-12)


def test_kl_weight_warms_up_linearly():
    assert float(kl_weight(Config(kl_weight=0.5), 0)) == 0.5
    warm = Config(kl_weight=2.0, kl_warmup_steps=100)
    assert [float(kl_weight(warm, jnp.asarray(s))) for s in (0, 25, 100, 1000)] == [0.0, 0.5, 2.0, 2.0]
