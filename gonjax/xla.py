"""XLA compiler options for gonjax's jitted steps, chosen per backend (measurements in benchmarks/README.md).

On CPU, XLA hands convolutions, reductions and dot products to YNNPACK by default. For GON's small NHWC
convolutions and its batch-norm reductions, XLA's own (Eigen) kernels are faster: a GON (16, 256) training step
takes 0.7x the time with YNNPACK kept to dot products. LLVM optimisation level 1 instead of 2 compiles the GON
step in 3.9 s instead of 4.7-5.1 s, and the steps run as fast (within 3%). A step dominated by elementwise maps
over large activations (the Implicit GON's training step: sines, cosines and their products over 64 x 784 x 256
values per layer) also gives YNNPACK its elementwise fusions (`elementwise=True`): 1.23x faster there, but 1.3-1.9x
slower for the conv models and 1.4x slower for the Implicit GON's evaluation, so it is chosen per step. Other
backends keep XLA's defaults.
An option the user sets in the XLA_FLAGS environment variable wins over gonjax's choice (per-program options
would otherwise override it silently).
"""
from __future__ import annotations

import functools
import os
import re

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
               "xla_backend_optimization_level": 1}
CPU_ELEMENTWISE_OPTIONS = {**CPU_OPTIONS, "xla_cpu_experimental_ynn_fusion_type":
                           "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}


def user_flags() -> set[str]:
    """The option names set in XLA_FLAGS: its `--name=value` and `--name` items."""
    return set(re.findall(r"(?:^|\s)--?([A-Za-z0-9_]+)", os.environ.get("XLA_FLAGS", "")))


def compiler_options(backend: str, elementwise: bool = False) -> dict[str, str | int] | None:
    """gonjax's options for `backend` (for an elementwise-bound step if `elementwise`) less those the user set in
    XLA_FLAGS, or None for XLA's defaults (also where this XLA lacks an option)."""
    return _compiler_options(backend, elementwise, frozenset(user_flags()))


@functools.cache
def _compiler_options(backend: str, elementwise: bool, user_set: frozenset[str]) -> dict[str, str | int] | None:
    if backend != "cpu":
        return None
    options = CPU_ELEMENTWISE_OPTIONS if elementwise else CPU_OPTIONS
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - an XLA build without the option: keep its defaults
        return None
    return {name: value for name, value in options.items() if name not in user_set} or None


def jit(fn, elementwise: bool = False, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` with gonjax's compiler options for the default backend (`elementwise`: for a
    step dominated by elementwise maps, such as `Model.elementwise_training` marks)."""
    return jax.jit(fn, compiler_options=compiler_options(jax.default_backend(), elementwise), **jit_kwargs)
