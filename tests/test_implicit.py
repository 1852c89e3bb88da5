"""Implicit GON (GON-SPEC 2.4, 2.5, 4.4, 4.6): SIREN, coordinates, rendering, slerp, sampling, latent bank."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gonjax import render, steps, zoo
from gonjax.config import Config
from gonjax.models import Siren, coordinate_grid, count_params


def _siren_params(seed=0, nc=1):
    return Siren(nc=nc).init(jax.random.PRNGKey(seed), coordinate_grid(4), jnp.zeros((2, 32)))["params"]


def test_siren_parameter_count_matches_spec():
    assert count_params(_siren_params()) == 206_593


def test_siren_init_bounds_and_symmetry():
    params = _siren_params()
    first = np.asarray(params["hidden1"]["kernel"])
    assert first.shape == (34, 256)
    checks = [(first, 1 / 34), (np.asarray(params["hidden1"]["bias"]), 1 / np.sqrt(34))]
    for name in ("hidden2", "hidden3", "hidden4", "out"):
        checks += [(np.asarray(params[name]["kernel"]), np.sqrt(6 / 256) / 30),
                   (np.asarray(params[name]["bias"]), 1 / np.sqrt(256))]
    for values, bound in checks:
        assert np.abs(values).max() <= bound
        if values.size >= 256:
            assert values.min() < -0.9 * bound and values.max() > 0.9 * bound  # symmetric, not [0, k)
            assert abs(values.mean()) < 0.1 * bound
            np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.1)


def test_coordinate_grid_is_row_major_ij():
    expected = [[r, c] for r in (-1.0, 0.0, 1.0) for c in (-1.0, 0.0, 1.0)]  # coordinate 0 = row
    np.testing.assert_allclose(np.asarray(coordinate_grid(3)), expected, atol=1e-7)
    grid = np.asarray(coordinate_grid(28)).reshape(28, 28, 2)
    np.testing.assert_allclose(grid[5, 17], [-1 + 2 * 5 / 27, -1 + 2 * 17 / 27], rtol=1e-6)


def test_siren_equals_the_concatenated_input_network_in_float64():
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), _siren_params(1, nc=3))
        coords = np.asarray(coordinate_grid(5, jnp.float64))
        z = np.random.default_rng(0).normal(size=(3, 32)) * 0.1
        out = np.asarray(Siren(nc=3).apply({"params": params}, jnp.asarray(coords), jnp.asarray(z)))
        h = np.concatenate([np.broadcast_to(coords, (3, 25, 2)), np.broadcast_to(z[:, None], (3, 25, 32))], -1)
        for name in ("hidden1", "hidden2", "hidden3", "hidden4"):
            h = np.sin(30 * (h @ params[name]["kernel"] + params[name]["bias"]))
        np.testing.assert_allclose(out, h @ params["out"]["kernel"] + params["out"]["bias"], rtol=1e-10,
                                   atol=1e-12)


@pytest.fixture(scope="module")
def tiny_implicit():
    config = Config(model="implicit_gon", dataset="mnist", nz=32)
    model = zoo.build_model(config, 1)
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 28, 28, 1)), jnp.float32)
    return config, model, images


def test_native_render_reproduces_the_training_reconstruction_and_superresolution_shapes(tiny_implicit):
    _, model, images = tiny_implicit
    with jax.enable_x64(True):
        x = images.astype(jnp.float64)
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), model.init(jax.random.PRNGKey(0), x)["params"])
        _, (_, output) = model.apply(params, {}, x, jax.random.PRNGKey(1))
        assert output.reconstruction.shape == (4, 28, 28, 1) and output.latent.shape == (4, 32)
        native = render.render(model, params, output.latent, 28)
        np.testing.assert_allclose(native, np.asarray(output.reconstruction), rtol=1e-12, atol=1e-14)
        for size in (64, 256):
            assert render.render(model, params, output.latent, size).shape == (4, size, size, 1)
        # The dense grid spans the same square: its corners are the native grid's corners.
        dense = render.render(model, params, output.latent[:1], 55)  # 55 = 2 * 27 + 1 hits every native point
        np.testing.assert_allclose(dense[0, ::2, ::2], native[0], rtol=1e-9, atol=1e-12)


def test_slerp_endpoints_and_grid_layout():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, 32))
    np.testing.assert_allclose(render.slerp(a, b, 0.0), a, atol=1e-12)
    np.testing.assert_allclose(render.slerp(a, b, 1.0), b, atol=1e-12)
    mid = render.slerp(a, b, 0.5)
    expected_norm = np.linalg.norm(a + b, axis=1) / (2 * np.cos(np.arccos(
        np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)) / 2))
    np.testing.assert_allclose(np.linalg.norm(mid, axis=1), expected_norm, rtol=1e-10)
    latents = rng.normal(size=(64, 32))
    grid = render.slerp_grid(latents)
    assert grid.shape == (64, 32)
    np.testing.assert_allclose(grid[:8], latents[:8], atol=1e-12)  # row 0: t = 0
    np.testing.assert_allclose(grid[56:], latents[32:40], atol=1e-12)  # row 7: t = 1


def test_gaussian_fit_and_samples_have_the_right_moments():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=4)
    factor = rng.normal(size=(4, 4))
    cov = factor @ factor.T + 0.5 * np.eye(4)
    latents = rng.multivariate_normal(mean, cov, size=40_000)
    fitted_mean, fitted_cov = render.fit_gaussian(latents)
    np.testing.assert_allclose(fitted_mean, mean, atol=0.05)
    np.testing.assert_allclose(fitted_cov, cov, atol=0.1 * np.abs(cov).max())
    np.testing.assert_allclose(fitted_cov, np.cov(latents.T, ddof=1), rtol=1e-12)  # unbiased, like np.cov
    drawn = render.sample_gaussian(fitted_mean, fitted_cov, 40_000, seed=3)
    np.testing.assert_allclose(drawn.mean(0), mean, atol=0.05)
    np.testing.assert_allclose(np.cov(drawn.T), cov, atol=0.1 * np.abs(cov).max())


def test_latent_bank_keeps_the_latents_of_recent_batches(tiny_implicit):
    config, model, images = tiny_implicit
    optimizer = steps.make_optimizer(config)
    state = steps.create_train_state(model, optimizer, jax.random.PRNGKey(0), images)
    assert state.latent_bank.shape == (100 * 4, 32)
    step = jax.jit(steps.make_train_step(model, optimizer))
    rng = jax.random.PRNGKey(7)
    expected = []
    for i in range(2):
        batch = images[::-1] if i else images
        _, (_, output) = model.apply(state.params, {}, batch, jax.random.fold_in(rng, i))
        expected.append(np.asarray(output.latent))
        state, _ = step(state, batch, rng)
    np.testing.assert_allclose(np.asarray(state.latent_bank[:8]), np.concatenate(expected), rtol=1e-5, atol=1e-9)
    assert not np.asarray(state.latent_bank[8:]).any()
    np.testing.assert_allclose(render.bank_latents(state, model), np.concatenate(expected), rtol=1e-5, atol=1e-9)


def test_learning_rate_drops_at_the_given_epoch():
    config = Config(model="implicit_gon", lr=1e-4, lr_drop_epoch=2, lr_drop_to=5e-5)
    optimizer = steps.make_optimizer(config, steps_per_epoch=3)
    params = {"w": jnp.zeros(())}
    state = optimizer.init(params)
    moves = []
    for _ in range(9):  # a constant gradient: each Adam step moves by exactly the learning rate
        updates, state = optimizer.update({"w": jnp.ones(())}, state, params)
        moves.append(-float(updates["w"]))
    np.testing.assert_allclose(moves, [1e-4] * 6 + [5e-5] * 3, rtol=1e-6)  # float32 Adam arithmetic


def _peer_parameter_count(config: Config) -> int:
    """Trainable parameters of gon-pytorch's GON built for the same variants (an independent count)."""
    from benchmarks import peer_reference
    return sum(p.numel() for p in peer_reference.peer_gon(peer_reference.implicit_decoder(config, 1),
                                                          config).parameters())


@pytest.mark.parametrize("overrides", [
    {}, {"learn_origin": True}, {"position_encoding": "fourier", "fourier_features": 16},
    {"position_encoding": "nerf", "nerf_frequencies": 6}, {"modulation": True},
    {"modulation": True, "position_encoding": "fourier", "learn_origin": True}])
def test_variant_parameter_counts_match_the_peer_package(overrides):
    config = Config(model="implicit_gon", dataset="mnist", **overrides)
    model = zoo.build_model(config, 1)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1)))
    assert count_params(variables["params"]) == _peer_parameter_count(config)
    if not overrides:
        assert count_params(variables["params"]) == 206_593  # GON-SPEC 2.6
    # the Fourier projection is kept as state, checkpointed, never trained
    fourier = config.position_encoding == "fourier"
    assert count_params(variables["batch_stats"]) == (2 * config.fourier_features if fourier else 0)


def test_fourier_projection_is_seeded_gaussian_state():
    config = Config(model="implicit_gon", dataset="mnist", position_encoding="fourier", fourier_features=512,
                    fourier_sigma=3.0)
    model = zoo.build_model(config, 1)
    images = jnp.zeros((2, 28, 28, 1))
    a, b = (np.asarray(model.init(jax.random.PRNGKey(s), images)["batch_stats"]["fourier"]["projection"])
            for s in (0, 1))
    assert a.shape == (2, 512) and not np.array_equal(a, b)
    np.testing.assert_allclose(a.std(), 3.0, rtol=0.1)
    assert abs(a.mean()) < 0.3


def test_nerf_encoding_against_its_formula():
    from gonjax.models import nerf_encoding
    coords = np.random.default_rng(0).uniform(-1, 1, size=(5, 2))
    with jax.enable_x64(True):
        encoded = np.asarray(nerf_encoding(jnp.asarray(coords), 3))
    for d in range(2):
        block = encoded[:, d * 6:(d + 1) * 6]
        for k in range(3):
            np.testing.assert_allclose(block[:, k], np.sin(np.pi * 2 ** k * coords[:, d]), atol=1e-13)
            np.testing.assert_allclose(block[:, 3 + k], np.cos(np.pi * 2 ** k * coords[:, d]), atol=1e-13)


def test_variant_render_reproduces_the_training_reconstruction():
    """Rendering reads the run's state (the Fourier projection) and strips the learned origin."""
    config = Config(model="implicit_gon", dataset="mnist", position_encoding="fourier", modulation=True,
                    learn_origin=True, latent_updates=2)
    model = zoo.build_model(config, 1)
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 28, 28, 1)), jnp.float32)
    with jax.enable_x64(True):
        variables = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64),
                                           model.init(jax.random.PRNGKey(0), images.astype(jnp.float64)))
        state = variables["batch_stats"]
        _, (_, output) = model.apply(variables["params"], state, images.astype(jnp.float64), jax.random.PRNGKey(1))
        native = render.render(model, variables["params"], output.latent, 28, state=state)
        np.testing.assert_allclose(native, np.asarray(output.reconstruction), rtol=1e-12, atol=1e-14)
        assert float(output.metrics["last_inner_loss"]) < float(output.metrics["inner_loss"])


def test_float32_training_gradient_with_the_tuned_sine_is_as_close_to_float64_as_xla_sine():
    """The training loss and gradient (second order through the origin step) in float32 with `kernels.sine`
    (the default) and with `jnp.sin` (kernels="autodiff"), against the float64 ones: both within float32
    rounding, the polynomial sine no further off than XLA's own."""
    def loss_and_grad(kernels, dtype):
        model = zoo.build_model(Config(model="implicit_gon", dataset="coil20", nz=32, kernels=kernels), 1)
        images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 32, 32, 1)), dtype)
        variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.init(jax.random.PRNGKey(0), images))
        loss = lambda p: model.apply(p, variables["batch_stats"], images, jax.random.PRNGKey(1))[0]  # noqa: E731
        value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
        return np.float64(value), [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(grads)]

    def error(got, want):
        return max([abs(got[0] - want[0]) / abs(want[0])]
                   + [np.abs(g - w).max() / np.abs(w).max() for g, w in zip(got[1], want[1])])

    with jax.enable_x64(True):
        exact = loss_and_grad("autodiff", jnp.float64)
        tuned, xla_sine = loss_and_grad("xla_cpu", jnp.float32), loss_and_grad("autodiff", jnp.float32)
    assert error(tuned, exact) < 2e-5
    assert error(tuned, exact) <= 2 * error(xla_sine, exact)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(tuned[1], xla_sine[1]))  # two sines, not one
