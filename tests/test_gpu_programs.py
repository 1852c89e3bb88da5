"""GPU programs checked without a GPU: every model's training and evaluation calls as the trainer builds them
(`gonjax.loops`, with the defaults a CUDA run resolves to), lowered for CUDA with `jax.export` on this CPU-only
jaxlib, and read (StableHLO text).

What a GPU user gets by default, by construction: JAX's own convolutions for the transposed convolutions (no
XLA:CPU tap matmuls), XLA's own sine (no CPU polynomial), every matmul and convolution at HIGHEST precision
(float32, not TF32), 50 steps per call as one loop over batches gathered from the uint8 split inside the program,
and nothing that leaves the device inside a call.
"""
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from gonjax import loops, parallel, steps
from gonjax.config import Config, backend_kernels, backend_precision, backend_steps_per_call
from gonjax.zoo import build_model

CASES = {"gon": {}, "gon_detached": {"detach": True}, "vgon": {"model": "vgon"}, "ae": {"model": "ae"},
         "vae": {"model": "vae"}, "implicit_gon": {"model": "implicit_gon", "dataset": "mnist"}}
CONTRACTION = re.compile(r"stablehlo\.(dot_general|convolution)\b[^\n]*")
HOST_SIGNS = ("callback", "infeed", "outfeed", "stablehlo.send", "stablehlo.recv", "host_compute")


def test_auto_resolves_by_backend_name():
    assert [backend_kernels("auto", b) for b in ("cpu", "cuda", "rocm", "tpu")] == \
        ["xla_cpu", "autodiff", "autodiff", "autodiff"]
    assert backend_kernels("xla_cpu", "cuda") == "xla_cpu" and backend_kernels("autodiff", "cpu") == "autodiff"
    assert [backend_precision("highest", b) for b in ("cpu", "cuda", "rocm", "tpu")] == \
        [None, "highest", "highest", "highest"]
    assert backend_precision("default", "cuda") == "default"
    for model in ("gon", "ae", "implicit_gon"):
        assert [backend_steps_per_call(None, b, model) for b in ("cuda", "rocm", "tpu")] == [50, 50, 50]
        assert backend_steps_per_call(7, "cuda", model) == 7 == backend_steps_per_call(7, "cpu", model)
    assert [backend_steps_per_call(None, "cpu", m) for m in ("gon", "vgon", "ae", "vae", "implicit_gon")] == \
        [1, 1, 1, 1, 50]


def _lowered(case: str, backend: str) -> dict[str, str]:
    """{"train": text, "eval": text}: the case's training and evaluation calls built for `backend` (its steps per
    call, on a split of 200 uint8 images in batches of 8) and lowered for it."""
    settings = {"model": "gon", "dataset": "coil20", "nz": 8, **CASES[case]}
    if settings["model"] != "implicit_gon":
        settings["ngf"] = 4
    config = Config(**settings)
    model = build_model(config, 1, backend=backend)
    optimizer = steps.make_optimizer(config)
    size, batch, count = model.image_size, 8, backend_steps_per_call(None, backend, config.model)
    state = jax.eval_shape(lambda: steps.create_train_state(model, optimizer, jax.random.PRNGKey(0),
                                                            jnp.zeros((batch, size, size, 1))))
    split = loops.DeviceSplit(jax.ShapeDtypeStruct((200, size, size, 1), jnp.uint8),
                              jax.ShapeDtypeStruct((256,), jnp.float32))
    key, index = jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((), jnp.int32)
    train_step, eval_step, _ = steps.layout_steps(model, optimizer, parallel.make_layout(None, batch))
    image_batch = jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32)
    sums = jax.eval_shape(eval_step, state, image_batch, key)[0]
    calls = {"train": (loops.make_train_loop(train_step, batch, count),
                       (state, split, jax.ShapeDtypeStruct((200,), jnp.int32), index, index, key)),
             "eval": (loops.make_eval_loop(eval_step, batch, count),
                      (state, split, jax.ShapeDtypeStruct((200 // batch, 2), jnp.uint32), index, index, sums))}
    return {name: export.export(jax.jit(fn), platforms=[backend])(*args).mlir_module()
            for name, (fn, args) in calls.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_steps_pin_highest_precision_and_stay_on_the_device(case):
    for name, text in _lowered(case, "cuda").items():
        ops = [m.group(0) for m in CONTRACTION.finditer(text)]
        assert ops, f"{case} {name}: no matmul or convolution found"
        unpinned = [op for op in ops if "HIGHEST" not in op]
        assert not unpinned, f"{case} {name}: {len(unpinned)} of {len(ops)} contractions not at HIGHEST: {unpinned[0]}"
        assert not [sign for sign in HOST_SIGNS if sign in text], f"{case} {name} leaves the device"
        assert "custom_call" not in text, f"{case} {name}: a custom call in a CUDA step"
        assert "stablehlo.while" in text, f"{case} {name}: its 50 steps are not one loop"
        assert re.search(r"func\.func public @main\((%arg\d+: tensor<[^>]*>[^%]*)*%arg\d+: tensor<200x\d+x\d+x1xui8>",
                         text), \
            f"{case} {name}: the uint8 split is not an argument"
        assert re.search(r"stablehlo\.(gather|dynamic_slice)[^\n]*tensor<200x\d+x\d+x1xui8>", text), \
            f"{case} {name}: the batch is not gathered inside the program"


@pytest.mark.parametrize("case", ["gon", "vgon", "ae"])
def test_cuda_transposed_convolutions_are_convolutions_not_cpu_tap_matmuls(case):
    """The decoder's three stride-2 transposed convolutions are input-dilated convolutions (cuDNN's) on CUDA;
    the same model built for a CPU has none (its tap matmuls), which shows the switch is the backend's."""
    dilated = re.compile(r"stablehlo\.convolution[^\n]*lhs_dilate\s*=\s*\[2, 2\]|"
                         r"stablehlo\.convolution[^\n]*lhs_dilation = array<i64: 2, 2>")
    assert len(dilated.findall(_lowered(case, "cuda")["eval"])) >= 3
    assert not dilated.findall(_lowered(case, "cpu")["eval"])


def test_cuda_siren_uses_xla_sine_and_the_cpu_one_its_polynomial():
    cuda, cpu = _lowered("implicit_gon", "cuda")["eval"], _lowered("implicit_gon", "cpu")["eval"]
    assert "stablehlo.sine" in cuda
    assert "stablehlo.sine" not in cpu  # kernels.sine: range reduction and a polynomial
    assert "HIGHEST" not in cpu  # nothing pinned on a CPU: its programs stay the ones measured
