"""How long the GON's training step takes to trace, lower and compile, against its number of latent updates.

    python -m benchmarks.compile_time --latent-updates 3 30 100 [--model gon --ngf 16 --nz 256 --batch-size 64]
                                      [--json FILE]

Per N: a fresh `Config(latent_updates=N)` model (COIL-20 shapes, 32x32x1), its jitted train step
(`gonjax.steps.make_train_step`, Adam) traced and lowered, then compiled, then run once on a random batch; the
seconds of each phase and the milliseconds of that first run. Each N is a new program, so nothing is cached
between them. The loss of the first run is printed too: versions of gonjax that lay the updates out differently
must agree on it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import optax

from gonjax.config import ORIGIN_MODELS, Config
from gonjax.steps import create_train_state, make_train_step
from gonjax.zoo import build_model


def measure(model_name: str, updates: int, ngf: int, nz: int, batch_size: int) -> dict:
    """The phases of one program: trace + lower, compile, first step (seconds, seconds, ms), and its loss."""
    overrides = {} if model_name == "implicit_gon" else {"ngf": ngf}
    config = Config(model=model_name, dataset="coil20", nz=nz, latent_updates=updates, **overrides).validate()
    model = build_model(config, 1)
    optimizer = optax.adam(1e-4)
    size = model.image_size
    images = jax.random.uniform(jax.random.PRNGKey(1), (batch_size, size, size, 1))
    state = create_train_state(model, optimizer, jax.random.PRNGKey(0), images)
    step = jax.jit(make_train_step(model, optimizer))
    start = time.perf_counter()
    lowered = step.lower(state, images, jax.random.PRNGKey(2))
    traced = time.perf_counter()
    compiled = lowered.compile()
    built = time.perf_counter()
    _, metrics = jax.block_until_ready(compiled(state, images, jax.random.PRNGKey(2)))
    ran = time.perf_counter()
    return {"model": model_name, "latent_updates": updates, "trace_lower_s": round(traced - start, 2),
            "compile_s": round(built - traced, 2), "first_step_ms": round(1000 * (ran - built), 1),
            "loss": float(metrics["loss"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_time", description=__doc__.splitlines()[0])
    parser.add_argument("--latent-updates", type=int, nargs="+", default=[3, 30, 100])
    parser.add_argument("--model", choices=ORIGIN_MODELS, default="gon")
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--nz", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if min(args.latent_updates) < 1:
        parser.error("--latent-updates must be at least 1")
    rows = []
    print(f"{'N':>5} {'trace+lower s':>14} {'compile s':>10} {'first step ms':>14}  loss")
    for updates in args.latent_updates:
        row = measure(args.model, updates, args.ngf, args.nz, args.batch_size)
        rows.append(row)
        print(f"{updates:>5} {row['trace_lower_s']:>14.2f} {row['compile_s']:>10.2f} {row['first_step_ms']:>14.1f}  "
              f"{row['loss']:.6f}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "jax": jax.__version__}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
