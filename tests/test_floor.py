"""The contraction floor finds every matmul and convolution a step runs, once each, with the right FLOPs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import floor
from gonjax import steps, zoo
from gonjax.config import Config


def _conv(x, k, stride=1):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_counts_forward_backward_and_scan_iterations():
    x, w = jnp.ones((5, 3)), jnp.ones((3, 4))

    def step(x, w):
        def loss(w):
            return jnp.sum(jnp.tanh(x @ w) ** 2)

        def body(w, _):
            return w - 0.1 * jax.grad(loss)(w), None

        return jax.lax.scan(body, w, None, length=3)[0]

    found = floor.contractions(jax.jit(step), x, w)
    # per iteration: the forward x @ w (5x3x4) and the weight gradient x^T g (3x5x4); x gets no gradient
    assert [op.primitive.name for op in found] == ["dot_general"] * 6
    assert sorted(op.flops for op in found) == [2 * 5 * 3 * 4] * 6


def test_convolution_flops_are_window_times_input_features():
    x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
    (op,) = floor.contractions(lambda x, k: _conv(x, k, stride=2), x, k)
    assert op.primitive.name == "conv_general_dilated"
    assert op.flops == 2 * (2 * 4 * 4 * 5) * (3 * 3 * 3)


def test_while_loops_are_refused():
    def loop(x):
        return jax.lax.while_loop(lambda v: v.sum() < 10, lambda v: v @ jnp.eye(2), x)

    with pytest.raises(ValueError, match="while loop"):
        floor.contractions(loop, jnp.ones((2, 2)))


def test_floor_program_runs_the_same_contractions():
    x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
    run, flops = floor.contraction_floor(lambda x, k: _conv(x, k) @ jnp.ones((5, 7)), x, k)
    conv_out, dot_out = run()
    assert conv_out.shape == (2, 8, 8, 5) and dot_out.shape == (2, 8, 8, 7)
    (operands,) = run.args  # the program's own random operands; contract the matmul's again in numpy
    lhs, rhs = operands[1]
    np.testing.assert_allclose(dot_out, np.asarray(lhs, np.float64) @ np.asarray(rhs, np.float64), rtol=1e-5,
                               atol=1e-5)
    assert flops == 2 * (2 * 8 * 8 * 5) * 27 + 2 * (2 * 8 * 8 * 7) * 5


def test_autoencoder_evaluation_floor_is_its_architecture():
    """GON-SPEC 2.2 AE, batch 8, ngf 4, nz 8: the conv layers' multiply-adds from their shapes, plus batch norm's
    two channel sums per layer (mean and variance, computed as matmuls), and nothing else."""
    b, ngf, nz = 8, 4, 8
    config = Config(model="ae", ngf=ngf, nz=nz)
    model = zoo.build_model(config, 1)
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(b, 32, 32, 1)), jnp.float32)
    state = steps.create_train_state(model, steps.make_optimizer(config), jax.random.PRNGKey(0), images)
    # (output pixels per image, Cout, Cin * 16): each 4x4 conv / transposed conv's true work
    encoder = [(16 * 16, ngf, 1 * 16), (8 * 8, 2 * ngf, ngf * 16), (4 * 4, 4 * ngf, 2 * ngf * 16),
               (1, nz, 4 * ngf * 16)]
    decoder = [(4 * 4, 4 * ngf, nz), (8 * 8, 2 * ngf, 4 * ngf * 4), (16 * 16, ngf, 2 * ngf * 4), (32 * 32, 1, ngf * 4)]
    conv_flops = sum(2 * b * pixels * cout * fan_in for pixels, cout, fan_in in encoder + decoder)
    bn = [(16 * 16, ngf), (8 * 8, 2 * ngf), (4 * 4, 4 * ngf)] * 2  # encoder bn1-3, decoder bn3-1
    bn_flops = sum(2 * 2 * b * pixels * c for pixels, c in bn)
    found = floor.contractions(steps.make_eval_step(model), state, images, jax.random.PRNGKey(0))
    assert sum(op.flops for op in found) == conv_flops + bn_flops
