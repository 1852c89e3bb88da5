"""Loss reductions of GON-SPEC 4.1 and 7 against NumPy written from the spec's formulas."""
import numpy as np

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
