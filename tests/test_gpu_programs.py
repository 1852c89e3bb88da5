"""GPU programs checked without a GPU: every model's train and eval step, built with the defaults a CUDA run
resolves to, lowered for CUDA with `jax.export` on this CPU-only jaxlib, and read (StableHLO text).

What a GPU user gets by default, by construction: JAX's own convolutions for the transposed convolutions (no
XLA:CPU tap matmuls), XLA's own sine (no CPU polynomial), every matmul and convolution at HIGHEST precision
(float32, not TF32), and nothing that leaves the device inside a step.
"""
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from gonjax import steps
from gonjax.config import Config, backend_kernels, backend_precision
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


def _lowered(case: str, backend: str) -> dict[str, str]:
    """{"train": text, "eval": text}: the case's steps built for `backend` and lowered for it."""
    settings = {"model": "gon", "dataset": "coil20", "nz": 8, **CASES[case]}
    if settings["model"] != "implicit_gon":
        settings["ngf"] = 4
    config = Config(**settings)
    model = build_model(config, 1, backend=backend)
    optimizer = steps.make_optimizer(config)
    size = model.image_size
    images = jax.ShapeDtypeStruct((8, size, size, 1), jnp.float32)
    state = jax.eval_shape(lambda: steps.create_train_state(model, optimizer, jax.random.PRNGKey(0),
                                                            jnp.zeros(images.shape)))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    programs = {"train": steps.make_train_step(model, optimizer), "eval": steps.make_eval_step(model)}
    return {name: export.export(jax.jit(fn), platforms=[backend])(state, images, key).mlir_module()
            for name, fn in programs.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_steps_pin_highest_precision_and_stay_on_the_device(case):
    for name, text in _lowered(case, "cuda").items():
        ops = [m.group(0) for m in CONTRACTION.finditer(text)]
        assert ops, f"{case} {name}: no matmul or convolution found"
        unpinned = [op for op in ops if "HIGHEST" not in op]
        assert not unpinned, f"{case} {name}: {len(unpinned)} of {len(ops)} contractions not at HIGHEST: {unpinned[0]}"
        assert not [sign for sign in HOST_SIGNS if sign in text], f"{case} {name} leaves the device"
        assert "custom_call" not in text, f"{case} {name}: a custom call in a CUDA step"


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
