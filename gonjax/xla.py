"""XLA compiler options for gonjax's jitted steps, chosen per backend (measurements in benchmarks/README.md).

On CPU, XLA hands convolutions, reductions and dot products to YNNPACK by default. For GON's small NHWC
convolutions and its batch-norm reductions, XLA's own (Eigen) kernels are faster: a GON (16, 256) training step
takes 0.7x the time with YNNPACK kept to dot products. LLVM optimisation level 1 instead of 2 compiles the GON
step in 3.9 s instead of 4.7-5.1 s, and the steps run as fast (within 3%). YNNPACK's elementwise fusions are left
off for every step: they had made the Implicit GON's training step 1.23x faster while its sines were XLA's own, but
with `kernels.sine` and the SIREN's layers as 2-D matmuls (`models.pixelwise`) they make it 2.3x slower. Other
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


def user_flags() -> set[str]:
    """The option names set in XLA_FLAGS: its `--name=value` and `--name` items."""
    return set(re.findall(r"(?:^|\s)--?([A-Za-z0-9_]+)", os.environ.get("XLA_FLAGS", "")))


def compiler_options(backend: str) -> dict[str, str | int] | None:
    """gonjax's options for `backend` less those the user set in XLA_FLAGS, or None for XLA's defaults (also where
    this XLA lacks an option)."""
    return _compiler_options(backend, frozenset(user_flags()))


@functools.cache
def _compiler_options(backend: str, user_set: frozenset[str]) -> dict[str, str | int] | None:
    if backend != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - an XLA build without the option: keep its defaults
        return None
    return {name: value for name, value in CPU_OPTIONS.items() if name not in user_set} or None


def jit(fn, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` with gonjax's compiler options for the default backend."""
    return jax.jit(fn, compiler_options=compiler_options(jax.default_backend()), **jit_kwargs)
