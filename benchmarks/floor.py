"""The contraction floor of a step: its matmuls and convolutions alone, everything else left out.

`contraction_floor(fn, *args)` traces `fn`, collects every `dot_general` and `conv_general_dilated` it runs (nested
jits, custom VJPs and `scan` bodies included, the latter once per iteration), and returns a jitted program that runs
exactly those contractions, with the same shapes and parameters, on fixed random operands of the same shapes. Its
time is what the step would take if batch norm, activations, losses, layout changes and the optimizer were free:
no formulation that keeps the step's contractions can beat it. The contractions are independent in that program,
so XLA may run them side by side, which only lowers the floor. `benchmarks.step_time --floor` times it next to
the step and reports torch_ms / floor_ms: the largest speedup over PyTorch those contractions allow.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
from jax.extend import core

CONTRACTIONS = ("dot_general", "conv_general_dilated")


@dataclasses.dataclass(frozen=True)
class Contraction:
    """One matmul or convolution of a traced step: its primitive, operand shapes and parameters."""

    primitive: core.Primitive
    operands: tuple[jax.ShapeDtypeStruct, ...]
    params: dict

    @property
    def flops(self) -> float:
        """2 x multiply-adds: output size times the contracted size (dot) or the window volume times input
        features per group (convolution; an input-dilated one counts its inserted zeros, as it runs)."""
        out = jax.eval_shape(lambda *xs: self.primitive.bind(*xs, **self.params), *self.operands)
        lhs, rhs = self.operands
        if self.primitive.name == "dot_general":
            (contract, _), _ = self.params["dimension_numbers"]
            return 2.0 * np.prod(out.shape) * np.prod([lhs.shape[d] for d in contract])
        spec = self.params["dimension_numbers"]
        kernel_in, kernel_spatial = spec.rhs_spec[1], spec.rhs_spec[2:]
        return (2.0 * np.prod(out.shape) * rhs.shape[kernel_in]
                * np.prod([rhs.shape[d] for d in kernel_spatial]))


def contractions(fn: Callable, *args) -> list[Contraction]:
    """Every matmul and convolution `fn(*args)` executes, in trace order."""
    found: list[Contraction] = []

    def visit(jaxpr, repeats: int) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in CONTRACTIONS:
                operands = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
                found.extend([Contraction(eqn.primitive, operands, dict(eqn.params))] * repeats)
            if eqn.primitive.name == "while":
                raise ValueError("a while loop's trip count is unknown to the trace; floor undefined")
            inner = repeats * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
            for sub in core.jaxprs_in_params(eqn.params):
                visit(sub, inner)

    visit(jax.make_jaxpr(fn)(*args).jaxpr, 1)
    return found


def contraction_floor(fn: Callable, *args, compiler_options: dict | None = None):
    """(run, flops): `run()` dispatches `fn(*args)`'s contractions once and returns their (pending) outputs; flops
    of one run. Wait on each run: unlike the step, the program keeps every contraction's output."""
    ops = contractions(fn, *args)
    rng = np.random.default_rng(0)
    operands = [tuple(jax.device_put(rng.uniform(-1, 1, o.shape).astype(o.dtype)) for o in op.operands)
                for op in ops]

    def contract_all(operands):
        return [op.primitive.bind(*xs, **op.params) for op, xs in zip(ops, operands)]

    program = jax.jit(contract_all, compiler_options=compiler_options)
    return functools.partial(program, operands), sum(op.flops for op in ops)
