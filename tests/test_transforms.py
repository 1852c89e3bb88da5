"""Every model's loss under forward-mode autodiff (jvp, linearize, hessian, vmap of jvp), in float64 against
finite differences, with `Config(kernels="autodiff")`; and that switch computes the same function as the default
XLA:CPU-tuned kernels (gonjax.kernels), whose custom VJPs have no forward-mode rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gonjax import zoo
from gonjax.config import Config

MODELS = {
    "gon": dict(model="gon"),
    "gon_detached": dict(model="gon", detach=True),
    "vgon": dict(model="vgon"),
    "ae": dict(model="ae"),
    "vae": dict(model="vae"),
    "implicit_gon": dict(model="implicit_gon"),
}


def _loss_fn(case: str, kernels: str):
    """The float64 loss of a tiny model as a function of its parameters, and the parameters."""
    config = Config(**MODELS[case], dataset="coil20", ngf=4, nz=8, kernels=kernels)
    model = zoo.build_model(config, 1)
    size = model.image_size
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, size, size, 1)))
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                       model.init(jax.random.PRNGKey(0), images))
    batch_stats = variables.get("batch_stats", {})
    # BN's affine parameters off (1, 0): with bias 0 the GON's BN outputs at the origin sit on ELU's kink, where
    # finite differences across it are meaningless (tests/test_parity.py says more).
    rng = np.random.default_rng(1)
    variables["params"] = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape) if "scale" in jax.tree_util.keystr(path)
                                    else rng.uniform(-0.5, 0.5, x.shape)) if "bn" in jax.tree_util.keystr(path) else x,
        variables["params"])

    def loss(params):
        return model.apply(params, batch_stats, images, jax.random.PRNGKey(1))[0]

    return loss, variables["params"]


def _direction(params, seed=2):
    """A random direction of unit norm in parameter space."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    drawn = [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    norm = jnp.sqrt(sum(jnp.sum(d * d) for d in drawn))
    return treedef.unflatten([d / norm for d in drawn])


def _shift(params, direction, h):
    return jax.tree_util.tree_map(lambda p, t: p + h * t, params, direction)


@pytest.mark.parametrize("case", list(MODELS))
def test_forward_mode_autodiff_matches_finite_differences(case):
    with jax.enable_x64(True):
        loss, params = _loss_fn(case, "autodiff")
        tuned_loss, _ = _loss_fn(case, "xla_cpu")
        # The switch is the same function: loss and gradient equal the tuned kernels' to float64 rounding.
        loss = jax.jit(loss)  # compiled: float64 ops dispatched one by one made this test slow
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        tuned_value, tuned_grads = jax.jit(jax.value_and_grad(tuned_loss))(params)
        np.testing.assert_allclose(value, tuned_value, rtol=1e-12)
        for g, tg in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(tuned_grads)):
            np.testing.assert_allclose(g, tg, rtol=1e-9, atol=1e-12 * max(1.0, float(jnp.abs(tg).max())))

        # jvp against a central difference along a random direction.
        t = _direction(params)
        jvp = jax.jit(lambda p, d: jax.jvp(loss, (p,), (d,)))
        primal, tangent = jvp(params, t)
        h = 1e-4  # a five-point stencil: error O(h^4)
        central = (8 * (loss(_shift(params, t, h)) - loss(_shift(params, t, -h)))
                   - (loss(_shift(params, t, 2 * h)) - loss(_shift(params, t, -2 * h)))) / (12 * h)
        np.testing.assert_allclose(primal, value, rtol=1e-12)
        if not MODELS[case].get("detach"):  # the detached GON's gradient leaves out the path through the latent
            np.testing.assert_allclose(tangent, central, rtol=1e-6)  # by design: not its loss's derivative
        # ... and against the reverse-mode gradient: <grad, t>.
        inner = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(t)))
        np.testing.assert_allclose(tangent, inner, rtol=1e-9)

        # linearize: the same tangent, and linear in the direction.
        _, linear = jax.linearize(loss, params)
        np.testing.assert_allclose(linear(t), tangent, rtol=1e-12)
        np.testing.assert_allclose(linear(jax.tree_util.tree_map(lambda d: 2 * d, t)), 2 * tangent, rtol=1e-12)

        # vmap of jvp over two directions equals the two jvps.
        u = _direction(params, seed=3)
        both = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), t, u)
        batched = jax.jit(jax.vmap(lambda d: jax.jvp(loss, (params,), (d,))[1]))(both)
        np.testing.assert_allclose(batched, [tangent, jvp(params, u)[1]], rtol=1e-10)


@pytest.mark.parametrize("case", ["gon", "vae", "implicit_gon"])
def test_hessian_matches_finite_differences_of_the_gradient(case):
    """jax.hessian (forward over reverse) with respect to four entries of the smallest parameter with several."""
    with jax.enable_x64(True):
        loss, params = _loss_fn(case, "autodiff")
        paths = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if leaf.size > 1]
        path, leaf = min(paths, key=lambda item: item[1].size)
        flat = leaf.ravel()

        def partial_loss(entries):  # the loss as a function of flat[:4]
            value = flat.at[:4].set(entries).reshape(leaf.shape)
            return loss(jax.tree_util.tree_map_with_path(lambda p, x: value if p == path else x, params))

        point = flat[:4]
        hessian = np.asarray(jax.jit(jax.hessian(partial_loss))(point))
        grad = jax.jit(jax.grad(partial_loss))
        h = 1e-5  # five-point stencil; small, so that no ELU input crosses its kink in between
        columns = []
        for j in range(4):
            e = jnp.zeros(4, point.dtype).at[j].set(h)
            columns.append(np.asarray((8 * (grad(point + e) - grad(point - e))
                                       - (grad(point + 2 * e) - grad(point - 2 * e))) / (12 * h)))
        finite = np.stack(columns, axis=1)
        np.testing.assert_allclose(hessian, finite, rtol=1e-6, atol=1e-8 * np.abs(finite).max())
        np.testing.assert_allclose(hessian, hessian.T, rtol=1e-8, atol=1e-12 * np.abs(hessian).max())
        assert np.abs(hessian).max() > 0


def test_the_tuned_kernels_have_no_forward_mode_rule():
    """Why the switch exists: the default path's custom VJPs cannot be differentiated forward."""
    with jax.enable_x64(True):  # as every case here (_loss_fn is float64)
        loss, params = _loss_fn("gon", "xla_cpu")
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.jvp(loss, (params,), (_direction(params),))
