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


def _torch_bce_derivatives(logits: np.ndarray, targets: np.ndarray, dtype) -> np.ndarray:
    """PyTorch's own binary_cross_entropy of sigmoid(logits): value, d/dlogit and d2/dlogit2 (its double
    backward), element by element."""
    import torch

    x = torch.tensor(logits, dtype=dtype, requires_grad=True)
    loss = torch.nn.functional.binary_cross_entropy(torch.sigmoid(x), torch.tensor(targets, dtype=dtype),
                                                     reduction="none")
    first, = torch.autograd.grad(loss.sum(), x, create_graph=True)
    second, = torch.autograd.grad(first.sum(), x)
    return np.stack([loss.detach().numpy(), first.detach().numpy(), second.numpy()])


def test_clamped_bce_is_pytorchs_with_its_derivatives_where_float32_saturates():
    """P's BCE (`losses.clamped_bce`, the authors' V-GON) against PyTorch's: the value, and the first and second
    derivatives a GON step takes through it, in float32 and float64, on logits where a float32 sigmoid rounds to
    exactly 1 (20, 40) or underflows (-120), where the clamp at -100 decides the value (a target of 0 at p = 1:
    100, not J's ~23), and ordinary ones. Autodiff of the clamped logs would give NaN at the saturated ones."""
    logits = np.array([20.0, 20.0, 20.0, 40.0, -120.0, -120.0, -20.0, 3.0, -0.5, 0.0])
    targets = np.array([1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 1.0, 0.3, 0.9, 0.25])

    def ours(x, t):
        value = lambda x: losses.clamped_bce(jax.nn.sigmoid(x), t)  # noqa: E731
        first = jax.grad(value)
        return jnp.stack([value(x), first(x), jax.grad(first)(x)])

    import torch

    for dtype, torch_dtype, rtol in ((np.float32, torch.float32, 1e-5), (np.float64, torch.float64, 1e-12)):
        with jax.enable_x64(dtype == np.float64):
            mine = np.stack([np.asarray(ours(jnp.asarray(x, dtype), jnp.asarray(t, dtype)))
                             for x, t in zip(logits, targets)], axis=1)
        reference = _torch_bce_derivatives(logits.astype(dtype), targets.astype(dtype), torch_dtype)
        assert np.all(np.isfinite(mine)), mine
        np.testing.assert_allclose(mine, reference, rtol=rtol, atol=1e-6 if dtype == np.float32 else 1e-14)
    assert float(losses.clamped_bce(jnp.float32(1.0), jnp.float32(0.0))) == 100.0  # J's eps: -log(1e-10) ~ 23
    assert abs(float(losses.bce_per_image(jnp.ones((1, 1)), jnp.zeros((1, 1)))[0]) - 23.03) < 0.01


def test_implicit_gon_sum_reduction_is_the_authors_pixel_sum_channel_mean():
    """P's `((g - x)**2).sum(1).mean()` on (B, pixels, channels): pixels summed, batch and channels averaged,
    written out as a loop over images and channels; on three channels it is a third of the all-sum."""
    from gonjax import zoo

    model = zoo.build_model(Config(model="implicit_gon", dataset="cifar10", loss_reduction="sum"), 3)
    images = np.random.default_rng(3).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(images))
    _, (_, output) = model.apply(variables["params"], variables["batch_stats"], jnp.asarray(images),
                                 jax.random.PRNGKey(1))
    recon = np.asarray(output.reconstruction, np.float64).reshape(2, -1, 3)
    pixels = images.astype(np.float64).reshape(2, -1, 3)
    expected = np.mean([((recon[b, :, c] - pixels[b, :, c]) ** 2).sum() for b in range(2) for c in range(3)])
    np.testing.assert_allclose(float(output.metrics["loss"]), expected, rtol=1e-5)
