"""XLA compiler options for gonjax's jitted steps, chosen per backend (measurements in benchmarks/README.md).

On CPU, XLA hands convolutions, reductions and dot products to YNNPACK by default. For GON's small NHWC
convolutions and its batch-norm reductions, XLA's own (Eigen) kernels are faster: a GON (16, 256) training step
takes 0.7x the time with YNNPACK kept to dot products. LLVM optimisation level 1 instead of 2 compiles the GON
step in 3.9 s instead of 4.7-5.1 s, and the steps run as fast (within 3%). Other backends keep XLA's defaults.
"""
from __future__ import annotations

import functools

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
               "xla_backend_optimization_level": 1}


@functools.cache
def compiler_options(backend: str) -> dict[str, str | int] | None:
    """gonjax's options for `backend`, or None for XLA's defaults (also where this XLA lacks an option)."""
    if backend != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - an XLA build without the option: keep its defaults
        return None
    return dict(CPU_OPTIONS)


def jit(fn, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` with gonjax's compiler options for the default backend."""
    return jax.jit(fn, compiler_options=compiler_options(jax.default_backend()), **jit_kwargs)
