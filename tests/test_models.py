"""Conv decoder (GON-SPEC 2.1, 2.5, 2.6, 3) against the spec's counts and an independent float64 reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from gonjax.config import Config
from gonjax import kernels, models
from gonjax.config import DECONV_IMPLS
from gonjax.models import BatchStatNorm, ConvDecoder, ConvEncoder, count_params, symmetric_uniform
from gonjax.zoo import build_model, siren_for


@pytest.mark.parametrize("ngf, nz, nc, expected", [
    (16, 256, 1, 303_697), (16, 256, 3, 304_211),
    (32, 256, 1, 689_313), (32, 256, 3, 690_339),
    (16, 512, 1, 565_841), (16, 512, 3, 566_355),
    (8, 256, 1, 141_609), (8, 256, 3, 141_867),
    (16, 32, 1, 74_321),  # P's own GON default
])
def test_decoder_parameter_counts_match_spec(ngf, nz, nc, expected):
    variables = jax.eval_shape(ConvDecoder(ngf=ngf, nc=nc).init, jax.random.PRNGKey(0), jnp.zeros((2, nz)))
    assert count_params(variables["params"]) == expected


SPEC_COUNTS = {  # GON-SPEC 2.6, nc = 1: (ngf, nz) -> V-GON, Conv AE, VAE
    (16, 256): (435_281, 607_649, 739_233),
    (32, 256): (820_897, 1_378_881, 1_510_465),
    (16, 512): (1_091_153, 1_132_193, 1_657_505),
    (8, 256): (273_193, 283_473, 415_057),
}


@pytest.mark.parametrize("model", ["vgon", "ae", "vae"])
@pytest.mark.parametrize("ngf, nz", list(SPEC_COUNTS))
def test_model_parameter_counts_match_spec(model, ngf, nz):
    expected = SPEC_COUNTS[(ngf, nz)][["vgon", "ae", "vae"].index(model)]
    built = build_model(Config(model=model, ngf=ngf, nz=nz), nc=1)
    variables = jax.eval_shape(built.init, jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 1)))
    assert count_params(variables["params"]) == expected


def test_p_default_vgon_parameter_count():
    built = build_model(Config(model="vgon", ngf=32, nz=48), nc=1)
    variables = jax.eval_shape(built.init, jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 1)))
    assert count_params(variables["params"]) == 268_033


FULL_BATCH_INIT = {  # (config, images, zero latents) -> the Flax modules' variables, initialised on all of them
    "gon": lambda c, x, z: ConvDecoder(ngf=c.ngf, nc=1).init(jax.random.PRNGKey(0), z),
    "vgon": lambda c, x, z: models.VariationalGONFunction(nz=c.nz, ngf=c.ngf, nc=1).init(jax.random.PRNGKey(0), z, z),
    "ae": lambda c, x, z: models.ConvAutoencoder(nz=c.nz, ngf=c.ngf, nc=1).init(jax.random.PRNGKey(0), x),
    "vae": lambda c, x, z: models.ConvVAE(nz=c.nz, ngf=c.ngf, nc=1).init(jax.random.PRNGKey(0), x, z),
    "implicit_gon": lambda c, x, z: siren_for(c, 1).init(jax.random.PRNGKey(0), models.coordinate_grid(32), z),
}


@pytest.mark.parametrize("model", list(FULL_BATCH_INIT))
def test_init_gives_the_modules_full_batch_init_from_one_example(model):
    """A model's init runs its modules on the batch's first example only (a full batch of an Implicit GON took
    15 s eagerly): the variables equal, bit for bit, those of the Flax modules initialised on the whole batch."""
    config = Config(model=model, dataset="coil20", ngf=8, nz=16)
    images = jax.random.uniform(jax.random.PRNGKey(1), (64, 32, 32, 1))
    full = FULL_BATCH_INIT[model](config, images, jnp.zeros((64, config.nz)))
    full = {"params": full["params"], "batch_stats": full.get("batch_stats", full.get("constants", {}))}
    built = build_model(config, nc=1).init(jax.random.PRNGKey(0), images)
    leaves = jax.tree_util.tree_leaves_with_path
    assert [path for path, _ in leaves(built)] == [path for path, _ in leaves(full)]
    for (path, a), (_, b) in zip(leaves(built), leaves(full)):
        assert a.dtype == b.dtype and np.array_equal(a, b), path


def test_encoder_init_bounds_are_pytorch_defaults():
    ngf, nz, nc = 8, 32, 3
    params = ConvEncoder(nz=nz, ngf=ngf).init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, nc)))["params"]
    for name, cin in [("conv1", nc), ("conv2", ngf), ("conv3", 2 * ngf), ("conv4", 4 * ngf)]:
        bound = 1 / np.sqrt(16 * cin)
        kernel = np.asarray(params[name]["kernel"])
        assert kernel.shape[2] == cin and np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound


@pytest.mark.parametrize("model", ["vgon", "vae"])
@pytest.mark.parametrize("nc", [1, 3])
def test_prior_samples_bypass_the_heads(model, nc):
    """GON-SPEC 4.6: z ~ N(0, I) straight into the decoder, BN over the samples; images in (0, 1)."""
    built = build_model(Config(model=model, ngf=4, nz=8), nc=nc)
    variables = built.init(jax.random.PRNGKey(0), jnp.zeros((4, 32, 32, nc)))
    samples = built.sample(variables["params"], variables["batch_stats"], jax.random.PRNGKey(5), 10)
    assert samples.shape == (10, 32, 32, nc)
    assert float(samples.min()) > 0.0 and float(samples.max()) < 1.0
    z = jax.random.normal(jax.random.PRNGKey(5), (10, 8))
    decoder_vars = {"params": variables["params"]["decoder"], "batch_stats": variables["batch_stats"]["decoder"]}
    expected, _ = ConvDecoder(ngf=4, nc=nc).apply(decoder_vars, z, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(samples), np.asarray(expected), rtol=1e-6)
    other = built.sample(variables["params"], variables["batch_stats"], jax.random.PRNGKey(6), 10)
    assert not np.allclose(np.asarray(samples), np.asarray(other))


@pytest.mark.parametrize("nc", [1, 3])
def test_decoder_output_shape_and_range(nc):
    decoder = ConvDecoder(ngf=4, nc=nc)
    z = jax.random.normal(jax.random.PRNGKey(1), (5, 8))
    variables = decoder.init(jax.random.PRNGKey(0), z)
    out, _ = decoder.apply(variables, z, mutable=["batch_stats"])
    assert out.shape == (5, 32, 32, nc)
    assert float(out.min()) > 0.0 and float(out.max()) < 1.0


def test_symmetric_uniform_is_symmetric_and_bounded():
    draws = np.asarray(symmetric_uniform(0.25)(jax.random.PRNGKey(0), (200_000,)))
    assert draws.min() >= -0.25 and draws.max() <= 0.25
    assert draws.min() < -0.249 and draws.max() > 0.249  # fills (-k, k), not [0, k)
    assert abs(draws.mean()) < 2e-3
    assert abs(draws.std() - 0.25 / np.sqrt(3)) < 2e-3


def test_decoder_init_bounds_are_pytorch_defaults():
    ngf, nz, nc = 16, 256, 1
    params = ConvDecoder(ngf=ngf, nc=nc).init(jax.random.PRNGKey(0), jnp.zeros((2, nz)))["params"]
    for name, cout in [("deconv1", 4 * ngf), ("deconv2", 2 * ngf), ("deconv3", ngf), ("deconv4", nc)]:
        bound = 1 / np.sqrt(16 * cout)  # fan-in from dim 1 of PyTorch's (Cin, Cout, kh, kw) weight
        kernel = np.asarray(params[name]["kernel"])
        assert np.abs(kernel).max() <= bound
        assert np.abs(kernel).max() > 0.95 * bound
        assert np.abs(np.asarray(params[name]["bias"])).max() <= bound
    for i in (1, 2, 3):
        np.testing.assert_array_equal(params[f"bn{i}"]["scale"], 1.0)
        np.testing.assert_array_equal(params[f"bn{i}"]["bias"], 0.0)


def _f64(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


@pytest.mark.parametrize("impl,eps", [(impl, 1e-5) for impl in DECONV_IMPLS] + [("taps", 1e-2)])
def test_decoder_matches_numpy_float64_reference(impl, eps):
    with jax.enable_x64(True):
        decoder = ConvDecoder(ngf=3, nc=2, deconv_impl=impl, bn_epsilon=eps)
        z = np.random.default_rng(0).normal(size=(4, 5))
        variables = _f64(decoder.init(jax.random.PRNGKey(3), jnp.zeros((4, 5))))
        rng = np.random.default_rng(1)  # non-trivial BN affine parameters
        for i in (1, 2, 3):
            bn = variables["params"][f"bn{i}"]
            bn["scale"] = rng.uniform(0.5, 1.5, bn["scale"].shape)
            bn["bias"] = rng.normal(size=bn["bias"].shape)
        out, _ = decoder.apply(variables, jnp.asarray(z), mutable=["batch_stats"])
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out), reference.decoder(variables["params"], z, eps), rtol=1e-12,
                                   atol=1e-13)


def test_batch_stat_norm_normalises_with_batch_statistics_and_tracks_pytorch_running_averages():
    with jax.enable_x64(True):
        x = np.random.default_rng(0).normal(2.0, 3.0, size=(6, 3, 3, 4))
        norm = BatchStatNorm()
        variables = _f64(norm.init(jax.random.PRNGKey(0), jnp.asarray(x)))
        np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)  # init does not update
        np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)
        y, updates = norm.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        mean = x.mean(axis=(0, 1, 2))
        biased = x.var(axis=(0, 1, 2))
        np.testing.assert_allclose(np.asarray(y), (x - mean) / np.sqrt(biased + 1e-5), rtol=1e-12)
        n = 6 * 3 * 3
        np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * mean, rtol=1e-12)
        np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * biased * n / (n - 1), rtol=1e-12)


def _second_order(f, x, kernel):
    """Gradients with respect to x and kernel of |grad_x sum(sin f(x))|^2: what a GON step differentiates."""

    def inner_norm(x, kernel):
        gx = jax.grad(lambda x: jnp.sum(jnp.sin(f(x, kernel))))(x)
        return jnp.sum(jnp.square(gx))

    return jax.grad(inner_norm, (0, 1))(x, kernel)


@pytest.mark.parametrize("cin,cout", [(6, 3), (16, 1)])
def test_stride2_transposed_conv_formulations_agree_to_second_order(cin, cout):
    with jax.enable_x64(True):
        rng = np.random.default_rng(cin)
        x, kernel = rng.normal(size=(3, 5, 5, cin)), rng.normal(size=(4, 4, cin, cout))

        def reference_conv(x, kernel):  # PyTorch's ConvTranspose2d(k=4, s=2, p=1) as lax.conv_transpose
            return jax.lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

        expected = reference_conv(x, kernel)
        expected_second = _second_order(reference_conv, x, kernel)
        for formulation in (kernels.stride2_tap_matmul, kernels.stride2_phase_conv):
            np.testing.assert_allclose(formulation(x, kernel), expected, rtol=1e-12, atol=1e-12)
            for got, want in zip(_second_order(formulation, x, kernel), expected_second):
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_tap_sum_and_gather_are_adjoint():
    """<sum_taps(t), u> = <t, gather_taps(u)>: each is the other's VJP, so the pair must be exact transposes."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        taps, sums = rng.normal(size=(2, 4, 3, 2, 2, 2, 2, 5)), rng.normal(size=(2, 5, 4, 2, 2, 5))
        lhs = float(jnp.vdot(kernels._sum_taps(taps), sums))
        rhs = float(jnp.vdot(taps, kernels._gather_taps(sums)))
        assert abs(lhs) > 1.0
        np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


@pytest.mark.parametrize("shape,cout,stride,padding", [((3, 8, 8, 1), 4, 2, 1),   # im2col (narrow input)
                                                       ((3, 8, 8, 6), 5, 2, 1),   # lax convolution
                                                       ((3, 4, 4, 6), 7, 1, 0)])  # one matmul (4x4 -> 1x1)
def test_torch_conv_paths_equal_the_cross_correlation(shape, cout, stride, padding):
    with jax.enable_x64(True):
        x = np.random.default_rng(1).normal(size=shape)
        conv = models.TorchConv(cout, stride=stride, padding=padding)
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), conv.init(jax.random.PRNGKey(0), x))

        def reference_conv(x, p):
            y = jax.lax.conv_general_dilated(x, p["params"]["kernel"], (stride, stride), ((padding, padding),) * 2,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y + p["params"]["bias"]

        np.testing.assert_allclose(conv.apply(params, x), reference_conv(x, params), rtol=1e-12, atol=1e-12)
        grads = jax.grad(lambda x, p: jnp.sum(jnp.sin(conv.apply(p, x))), (0, 1))(x, params)
        expected = jax.grad(lambda x, p: jnp.sum(jnp.sin(reference_conv(x, p))), (0, 1))(x, params)
        for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def _sine_test_points() -> np.ndarray:
    """Float32 inputs over the range a SIREN's w0 = 30 pre-activations take and well beyond: Gaussian ones of
    scale 30 (as w0 = 30 makes them), a wide uniform sweep, multiples of pi / 2 (where one of sin, cos is near 0 and
    the range reduction matters most), and tiny values."""
    rng = np.random.default_rng(7)
    quarter_turns = (np.arange(-4000, 4001) * (np.pi / 2)).astype(np.float32)
    return np.concatenate([
        (30 * rng.normal(size=200_000)).astype(np.float32),
        rng.uniform(-1e5, 1e5, size=200_000).astype(np.float32),
        quarter_turns, np.nextafter(quarter_turns, np.float32(np.inf)),
        np.float32([0.0, -0.0, 1e-30, -1e-30, 1e-7, 3e-4]),
    ])


def test_sine_and_cosine_are_faithfully_rounded():
    """`kernels.sine` / `cosine` (range reduction + polynomial) against numpy's float64 sin / cos of the same
    float32 inputs: within one float32 ulp of the true value for normal |x| < 1e4 (0.5 would be correct rounding;
    the SIREN's arguments stay far inside, benchmarks/sine_accuracy.py), within 2^-24 absolutely up to 1e5, exact
    for tiny x; NaN for infinities and NaN."""
    x = _sine_test_points()
    x64 = x.astype(np.float64)
    inside = (np.abs(x64) < 1e4) & (np.abs(x64) >= np.finfo(np.float32).tiny)  # XLA:CPU flushes subnormals to 0
    for fast, exact in ((kernels.sine, np.sin), (kernels.cosine, np.cos)):
        got = np.asarray(jax.jit(fast)(x))
        assert got.dtype == np.float32
        want = exact(x64)
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        errors = np.abs(got.astype(np.float64) - want)
        assert (errors[inside] / ulp[inside]).max() < 1.0
        np.testing.assert_allclose(got, want, rtol=0, atol=2.0 ** -24)
    tiny = np.float32([1e-30, -1e-30, 1e-7])
    np.testing.assert_array_equal(np.asarray(jax.jit(kernels.sine)(tiny)), tiny)
    assert np.isnan(np.asarray(jax.jit(kernels.sine)(np.float32([np.inf, -np.inf, np.nan])))).all()


def test_sine_derivatives_are_cosine_and_minus_sine_in_every_mode():
    """First and second derivatives, reverse and forward mode, against float64 cos and -sin; float64 inputs take
    jnp.sin itself (what the float64 parity tests compare)."""
    x = _sine_test_points()[::50]
    x64 = x.astype(np.float64)
    first = jax.jit(jax.vmap(jax.grad(kernels.sine)))(x)
    second = jax.jit(jax.vmap(jax.grad(jax.grad(kernels.sine))))(x)
    np.testing.assert_allclose(first, np.cos(x64), rtol=0, atol=2e-7)
    np.testing.assert_allclose(second, -np.sin(x64), rtol=0, atol=2e-7)
    tangent = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    primal, jvp = jax.jit(lambda a, t: jax.jvp(kernels.cosine, (a,), (t,)))(x, tangent)
    np.testing.assert_allclose(primal, np.cos(x64), rtol=0, atol=2e-7)
    np.testing.assert_allclose(jvp, -np.sin(x64) * tangent, rtol=1e-6, atol=1e-6)
    with jax.enable_x64(True):
        np.testing.assert_array_equal(jax.jit(kernels.sine)(x64), jnp.sin(x64))
        np.testing.assert_array_equal(jax.jit(jax.vmap(jax.grad(kernels.sine)))(x64), jnp.cos(x64))
