"""The origin-gradient core (GON-SPEC 1, 4.1, 4.2, 9) against float64 finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import reference
from gonjax import origin, zoo
from gonjax.config import Config
from gonjax.models import ConvDecoder
from gonjax.zoo import build_model

B, NZ, NGF = 4, 3, 2


def _setup(seed=0):
    """A tiny float64 GON and a batch of images."""
    model = build_model(Config(ngf=NGF, nz=NZ), nc=1)
    images = jnp.asarray(np.random.default_rng(seed).uniform(size=(B, 32, 32, 1)))
    variables = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64),
                                       model.init(jax.random.PRNGKey(seed), images))
    # Non-trivial BN affine parameters: with beta = 0 the origin sits exactly on ELU's second-derivative kink,
    # where central differences converge only linearly.
    rng = np.random.default_rng(seed + 100)
    for i in (1, 2, 3):
        bn = variables["params"][f"bn{i}"]
        bn["scale"] = rng.uniform(0.5, 1.5, bn["scale"].shape)
        bn["bias"] = rng.uniform(0.2, 1.0, bn["bias"].shape) * rng.choice([-1, 1], bn["bias"].shape)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    return model, variables["params"], variables["batch_stats"], images


def _fit(decoder):
    """GON fit written here from GON-SPEC 4.1, independent of gonjax.zoo."""

    def fit(params, batch_stats, z, images, rng):
        out, updates = decoder.apply({"params": params, "batch_stats": batch_stats}, z, mutable=["batch_stats"])
        return jnp.mean(jnp.sum((out - images) ** 2, -1)), (updates["batch_stats"], out)

    return fit


def _decoder():
    return ConvDecoder(ngf=NGF, nc=1)


def test_origin_latent_matches_float64_finite_differences():
    with jax.enable_x64(True):
        _, params, batch_stats, images = _setup()
        numpy_params = jax.tree_util.tree_map(np.asarray, params)
        z0 = np.zeros((B, NZ))
        expected = -reference.finite_difference_grad(
            lambda z: reference.gon_inner_loss(numpy_params, z, np.asarray(images)), z0, h=1e-6)
        _, result = jax.jit(lambda p, s, x, z: origin.origin_step(_fit(_decoder()), p, s, x, jax.random.PRNGKey(0), z))(
            params, batch_stats, images, jnp.asarray(z0))
        assert result.latent.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(result.latent), expected, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(float(result.inner_loss),
                                   reference.gon_inner_loss(numpy_params, z0, np.asarray(images)), rtol=1e-12)
        assert np.abs(expected).max() > 1e-4  # a latent far from the origin: the test has teeth


def test_gon_model_outer_loss_and_reconstruction_match_reference():
    with jax.enable_x64(True):
        model, params, batch_stats, images = _setup(4)
        numpy_params = jax.tree_util.tree_map(np.asarray, params)
        latent = -reference.finite_difference_grad(
            lambda z: reference.gon_inner_loss(numpy_params, z, np.asarray(images)), np.zeros((B, NZ)), h=1e-6)
        loss, (_, output) = jax.jit(model.apply)(params, batch_stats, images, jax.random.PRNGKey(0))
        expected_recon = reference.decoder(numpy_params, latent)
        np.testing.assert_allclose(np.asarray(output.reconstruction), expected_recon, rtol=1e-7, atol=1e-10)
        expected_loss = reference.gon_inner_loss(numpy_params, latent, np.asarray(images))
        np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-7)
        np.testing.assert_allclose(float(output.metrics["sse"]),
                                   ((expected_recon - np.asarray(images)) ** 2).sum((1, 2, 3)).mean(), rtol=1e-7)


def test_outer_loss_second_order_gradients_match_finite_differences():
    with jax.enable_x64(True):
        model, params, batch_stats, images = _setup(1)

        @jax.jit  # the same function compiled: check_grads' many evaluations then take half the time
        def outer_loss(p):
            return model.apply(p, batch_stats, images, jax.random.PRNGKey(0))[0]

        check_grads(outer_loss, (params,), order=2, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-5)


def test_detached_gon_loses_exactly_the_second_order_term():
    with jax.enable_x64(True):
        _, params, batch_stats, images = _setup(2)
        decoder = _decoder()

        def decode(p, z):
            return decoder.apply({"params": p, "batch_stats": batch_stats}, z, mutable=["batch_stats"])[0]

        def loss_at(p, z):
            return jnp.mean(jnp.sum((decode(p, z) - images) ** 2, -1))

        def latent(p):
            return -jax.grad(loss_at, argnums=1)(p, jnp.zeros((B, NZ)))

        full = build_model(Config(ngf=NGF, nz=NZ), nc=1)
        detached = build_model(Config(ngf=NGF, nz=NZ, detach=True), nc=1)

        def grads(model):
            return jax.jit(jax.grad(lambda p: model.apply(p, batch_stats, images, jax.random.PRNGKey(0))[0]))(params)

        @jax.jit  # compiled, as the trainer runs it (eager float64 dispatch is what made this test slow)
        def terms(params):
            # d/dp' L(p, z(p')) at p' = p: the term that flows through the latent, computed on its own.
            z = latent(params)
            _, pullback = jax.vjp(latent, params)
            through_latent, = pullback(jax.grad(loss_at, argnums=1)(params, z))
            return through_latent, jax.grad(loss_at, argnums=0)(params, jax.lax.stop_gradient(z))

        g_full, g_detached = grads(full), grads(detached)
        through_latent, direct = terms(params)
        for a, b, c, d in zip(*(jax.tree_util.tree_leaves(t) for t in (g_full, g_detached, through_latent, direct))):
            np.testing.assert_allclose(np.asarray(b), np.asarray(d), rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(np.asarray(a), np.asarray(d + c), rtol=1e-10, atol=1e-14)
        # ...and that term is not negligible, so the assertion above has teeth.
        assert max(float(jnp.abs(c).max()) for c in jax.tree_util.tree_leaves(through_latent)) > 1e-6


@pytest.mark.parametrize("sigma", [0.01, 1.0])
def test_latent_init_ablation_adds_z0_back(sigma):
    """z = z0 - grad L(z0) with z0 ~ N(0, sigma^2) (GON-SPEC 9), against finite differences at z0."""
    with jax.enable_x64(True):
        _, params, batch_stats, images = _setup(3)
        numpy_params = jax.tree_util.tree_map(np.asarray, params)
        fit = _fit(_decoder())

        z0 = origin.initial_latent(jax.random.PRNGKey(7), (B, NZ), sigma, jnp.float64)
        assert 0.3 * sigma < float(jnp.std(z0)) < 3 * sigma
        _, result = origin.origin_step(fit, params, batch_stats, images, jax.random.PRNGKey(0), z0)
        grad = reference.finite_difference_grad(
            lambda z: reference.gon_inner_loss(numpy_params, z, np.asarray(images)), np.asarray(z0), h=1e-6)
        np.testing.assert_allclose(np.asarray(result.latent), np.asarray(z0) - grad, rtol=1e-6, atol=1e-10)


def test_a_start_shared_by_the_batch_takes_the_shortcut_and_adds_z0_back():
    """latent_noise "batch": one z0 ~ N(0, sigma^2) for every example. The shortcut (one example's inner pass) is
    then exact, so loss and gradients equal those of the batched inner pass; the latent is z0 - grad L(z0) from
    `zoo.latent_start`'s z0, with grad by finite differences; and the start is not the origin's (BN's statistics
    over the 4x4 positions do not remove a shared shift), nor a per-example draw's."""
    with jax.enable_x64(True):
        _, params, batch_stats, images = _setup(4)
        numpy_params = jax.tree_util.tree_map(np.asarray, params)

        def run(**settings):
            model = build_model(Config(ngf=NGF, nz=NZ, **settings), nc=1)
            (loss, (_, out)), grads = jax.value_and_grad(model.apply, has_aux=True)(
                params, batch_stats, images, jax.random.PRNGKey(5))
            return float(loss), np.asarray(out.latent), grads

        shared = dict(latent_sigma=0.5, latent_noise="batch")
        loss_s, latent_s, grads_s = run(**shared)
        loss_b, latent_b, grads_b = run(**shared, origin_shortcut=False)
        np.testing.assert_allclose(latent_s, latent_b, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(loss_s, loss_b, rtol=1e-9)
        for a, b in zip(jax.tree_util.tree_leaves(grads_s), jax.tree_util.tree_leaves(grads_b)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-7, atol=1e-12)
        # z = z0 - grad L(z0) from zoo.latent_start's z0 (the model's draw under that key): one row for all
        z0 = np.asarray(zoo.latent_start(Config(ngf=NGF, nz=NZ, **shared), params, jax.random.PRNGKey(5), B, NZ,
                                         jnp.float64))
        np.testing.assert_array_equal(z0, np.broadcast_to(z0[:1], z0.shape))
        assert 0.1 < float(np.abs(z0).max()) < 2.5  # a sigma = 0.5 draw
        grad = reference.finite_difference_grad(
            lambda z: reference.gon_inner_loss(numpy_params, z, np.asarray(images)), z0, h=1e-6)
        np.testing.assert_allclose(latent_s, z0 - grad, rtol=1e-6, atol=1e-10)
        loss_0, _, _ = run()
        loss_e, _, _ = run(latent_sigma=0.5, latent_noise="example")
        assert abs(loss_s / loss_0 - 1) > 1e-3 and abs(loss_s / loss_e - 1) > 1e-3


def test_inner_and_outer_passes_get_independent_keys():
    seen = []

    def fit(params, state, z, batch, rng):
        seen.append(rng)
        noise = jax.random.normal(rng, z.shape)
        return jnp.sum((z + noise) * params), (state, noise)

    origin.origin_step(fit, jnp.ones(()), {}, None, jax.random.PRNGKey(0), jnp.zeros((3,)))
    inner, outer = seen
    assert not np.array_equal(jax.random.key_data(inner), jax.random.key_data(outer))


def test_initial_latent_is_the_origin_when_sigma_is_zero():
    z0 = origin.initial_latent(jax.random.PRNGKey(0), (2, 5), 0.0)
    np.testing.assert_array_equal(z0, 0.0)


@pytest.mark.parametrize("model_name,overrides", [
    ("gon", {}), ("gon", {"detach": True}), ("gon", {"learn_origin": True, "latent_updates": 2}),
    ("implicit_gon", {"dataset": "mnist", "loss_reduction": "sum"}),
    ("implicit_gon", {"dataset": "mnist", "learn_origin": True, "loss": "peer_bce", "modulation": True})])
def test_origin_shortcut_matches_the_batched_inner_pass(model_name, overrides):
    """origin_gradient (one decoded example) = differentiating the batched fit: latent, losses, every parameter
    gradient (through the latent) and the BN running averages (the one example counts as the whole batch); also
    from a learned z0 away from zero (its own gradient included) and before further latent updates."""
    with jax.enable_x64(True):
        size = 28 if model_name == "implicit_gon" else 32
        images = jnp.asarray(np.random.default_rng(5).uniform(size=(B, size, size, 1)))
        results = []
        for shortcut in (False, True):
            model = build_model(Config(model=model_name, ngf=NGF, nz=NZ, origin_shortcut=shortcut, **overrides), nc=1)
            variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64),
                                               model.init(jax.random.PRNGKey(3), images))
            if model_name == "gon":  # BN betas off ELU's kink at the origin (see _setup)
                for i in (1, 2, 3):
                    variables["params"][f"bn{i}"]["bias"] = variables["params"][f"bn{i}"]["bias"] + 0.3 * (-1) ** i
            if "latent_origin" in variables["params"]:
                variables["params"]["latent_origin"] = 0.1 * jax.random.normal(jax.random.PRNGKey(4), (NZ,))
            batch_stats = variables.get("batch_stats", {})

            def loss(p, model=model, batch_stats=batch_stats):
                return model.apply(p, batch_stats, images, jax.random.PRNGKey(0))

            (value, (new_stats, output)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
            results.append((value, output.metrics["inner_loss"], output.latent, new_stats, grads))
        (batched, shortcut) = results
        assert float(jnp.abs(batched[2]).max()) > 1e-3  # a latent away from the origin
        for a, b in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(shortcut)):
            # gradients of biases ahead of batch-statistics BN are exactly 0; both sides give ~1e-17 noise there.
            # The SIREN's shortcut sums in another order (per point, then over the batch): its entries near 0 in
            # a gradient whose largest is ~100 differ by rounding of that size (measured 2.5e-12), hence the
            # absolute bound in units of the leaf's largest entry.
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-13 * max(1.0, float(np.abs(a).max())))


@pytest.mark.parametrize("updates", [3, 2 + 2 * origin.UNROLLED_UPDATES])
def test_several_latent_updates_with_a_step_size_match_finite_differences(updates):
    """z_{k+1} = z_k - eta grad L(z_k), eta = 0.5, each gradient from float64 finite differences of the NumPy
    reference; inner losses at every z_k; the second update's keys differ from the first's. N = 3 runs its later
    updates unrolled; N = 10 also loops (two iterations of UNROLLED_UPDATES, and one left over)."""
    with jax.enable_x64(True):
        _, params, batch_stats, images = _setup(6)
        numpy_params = jax.tree_util.tree_map(np.asarray, params)

        def inner(z):
            return reference.gon_inner_loss(numpy_params, z, np.asarray(images))

        _, result = jax.jit(lambda p, s, x: origin.origin_step(
            _fit(_decoder()), p, s, x, jax.random.PRNGKey(0), jnp.zeros((B, NZ)), updates=updates, step_size=0.5))(
            params, batch_stats, images)
        z, expected_losses = np.zeros((B, NZ)), []
        for _ in range(updates):
            expected_losses.append(inner(z))
            z = z - 0.5 * reference.finite_difference_grad(inner, z, h=1e-6)
        np.testing.assert_allclose(np.asarray(result.latent), z, rtol=1e-6, atol=1e-11)
        # at z0 exact; at later z_k the reference latents carry the finite differences' ~1e-9 relative error
        np.testing.assert_allclose(np.asarray(result.inner_losses), expected_losses, rtol=1e-9)
        np.testing.assert_allclose(float(result.inner_loss), expected_losses[0], rtol=1e-12)
        assert expected_losses[-1] < expected_losses[1] < expected_losses[0]  # the updates descend throughout
    assert not np.array_equal(jax.random.key_data(origin.update_key(jax.random.PRNGKey(0), 0)),
                              jax.random.key_data(origin.update_key(jax.random.PRNGKey(0), 1)))


def _equations(jaxpr) -> int:
    """The equations of a jaxpr, those of the jaxprs nested in them (loop bodies, custom rules) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    count += _equations(inner)
    return count


def test_the_program_does_not_grow_with_the_number_of_latent_updates():
    """More updates are more iterations of one loop, not more of the traced program (so --latent-updates 100
    compiles about as fast as 10; the loop's few unrolled updates are XLA's, at lowering)."""
    def size(updates):
        model = build_model(Config(ngf=NGF, nz=NZ, latent_updates=updates), nc=1)
        images = jnp.zeros((B, 32, 32, 1))  # traced for shapes only
        variables = model.init(jax.random.PRNGKey(0), images)
        loss = jax.grad(lambda p: model.apply(p, variables.get("batch_stats", {}), images, jax.random.PRNGKey(0))[0])
        return _equations(jax.make_jaxpr(loss)(variables["params"]).jaxpr)

    looped = size(3)
    assert size(102) == looped
    assert looped > size(1) + 100  # the count sees into the loop's body (one update: no loop)


@pytest.mark.parametrize("overrides", [{"latent_updates": 2, "learn_origin": True},
                                       {"latent_updates": 2 + origin.UNROLLED_UPDATES, "learn_origin": True},
                                       {"latent_updates": 2, "detach": True}])
def test_outer_gradients_through_several_updates_match_finite_differences(overrides):
    """Second order through every update (and into a learned origin): the trained loss's gradient against
    central differences; detached, the gradient stops at z_N."""
    with jax.enable_x64(True):
        _, params, batch_stats, images = _setup(7)
        model = build_model(Config(ngf=NGF, nz=NZ, **overrides), nc=1)
        if overrides.get("learn_origin"):
            params = {**params, "latent_origin": jnp.asarray([0.05, -0.02, 0.03])}

        @jax.jit
        def outer_loss(p):
            return model.apply(p, batch_stats, images, jax.random.PRNGKey(0))[0]

        if not overrides.get("detach"):
            check_grads(outer_loss, (params,), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-5)
            return
        # Detached: the gradient of the outer loss with z_N held fixed (decoded here on its own), which is not
        # the gradient of the full step's loss.
        latent = jax.jit(model.apply)(params, batch_stats, images, jax.random.PRNGKey(0))[1][1].latent
        decoder = _decoder()

        def loss_at_fixed_latent(p):
            out = decoder.apply({"params": p, "batch_stats": batch_stats}, latent, mutable=["batch_stats"])[0]
            return jnp.mean(jnp.sum((out - images) ** 2, -1))

        full = build_model(Config(ngf=NGF, nz=NZ, latent_updates=2), nc=1)
        g_full = jax.jit(jax.grad(lambda p: full.apply(p, batch_stats, images, jax.random.PRNGKey(0))[0]))(params)
        g_detached = jax.jit(jax.grad(outer_loss))(params)
        for a, b, c in zip(*(jax.tree_util.tree_leaves(g) for g in (
                g_detached, jax.jit(jax.grad(loss_at_fixed_latent))(params), g_full))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-14)
        assert max(float(jnp.abs(a - c).max()) for a, c in zip(
            jax.tree_util.tree_leaves(g_detached), jax.tree_util.tree_leaves(g_full))) > 1e-6


def test_vgon_several_updates_from_a_learned_origin_match_finite_differences():
    """The V-GON through the same core: two updates (fresh noise in each pass) from a learned origin; the trained
    loss's gradient, the origin's included, against central differences."""
    with jax.enable_x64(True):
        model = build_model(Config(model="vgon", ngf=NGF, nz=NZ, latent_updates=2, learn_origin=True), nc=1)
        images = jnp.asarray(np.random.default_rng(8).uniform(size=(B, 32, 32, 1)))
        variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64),
                                           model.init(jax.random.PRNGKey(8), images))
        params = {**variables["params"], "latent_origin": jnp.asarray([0.05, -0.02, 0.03])}

        @jax.jit
        def outer_loss(p):
            return model.apply(p, variables["batch_stats"], images, jax.random.PRNGKey(0))[0]

        check_grads(outer_loss, (params,), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-5)
        one = build_model(Config(model="vgon", ngf=NGF, nz=NZ, learn_origin=True), nc=1)
        _, (_, output) = jax.jit(model.apply)(params, variables["batch_stats"], images, jax.random.PRNGKey(0))
        _, (_, single) = jax.jit(one.apply)(params, variables["batch_stats"], images, jax.random.PRNGKey(0))
        assert float(jnp.abs(output.latent - single.latent).max()) > 1e-6  # the second update moves the latent
        assert float(jnp.abs(jax.grad(outer_loss)(params)["latent_origin"]).max()) > 0
