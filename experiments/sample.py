"""Draw samples from the prior, or reconstructions of test images, from a trained run's latest checkpoint.

    python -m experiments.sample --workdir RUN --n 64 --out samples.png
    python -m experiments.sample --workdir RUN --kind reconstructions --n 64 --out recon.png
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import numpy as np

from experiments.cli import OneLineParser, report_errors
from gonjax import plots, xla
from gonjax.data import input_pipeline
from gonjax.errors import UsageError
from gonjax.train import load_run, make_eval_step


def reconstructions(config, model, state, n: int, seed: int):
    """The first n test images and their reconstructions, evaluated in batches of the run's batch size (BN
    statistics per batch, as in training)."""
    data = input_pipeline.load_dataset(config.dataset, model.image_size, config.data_dir, config.manual_dir)
    count = math.ceil(n / config.batch_size) * config.batch_size
    if count > len(data.test):
        raise UsageError(f"--n {n} needs {count} test images; {config.dataset} has {len(data.test)}")
    eval_step = xla.jit(make_eval_step(model))
    images, recons = [], []
    for index, batch in enumerate(input_pipeline.eval_batches(data.test[:count], config.batch_size)):
        _, reconstruction = eval_step(state, batch, jax.random.fold_in(jax.random.PRNGKey(seed), index))
        images.append(batch)
        recons.append(np.asarray(reconstruction))
    return np.concatenate(images)[:n], np.concatenate(recons)[:n]


def main(argv=None) -> int:
    prog = "python -m experiments.sample"
    parser = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run folder written by one of the experiments")
    parser.add_argument("--kind", choices=["samples", "reconstructions"], default=None,
                        help="default: samples for V-GON / VAE, reconstructions otherwise")
    parser.add_argument("--n", type=int, default=64, help="how many images (samples share one BN batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: in the run folder)")
    args = parser.parse_args(argv)

    def draw():
        if args.n < 2:
            raise UsageError("--n must be at least 2 (batch norm needs two images)")
        config, model, state, _ = load_run(args.workdir)
        kind = args.kind or ("samples" if model.sample else "reconstructions")
        out = args.out or Path(args.workdir) / f"{kind}_seed{args.seed}_n{args.n}.png"
        if out.exists():
            raise UsageError(f"{out} exists; choose another --out (results are never overwritten)")
        if kind == "samples":
            if model.sample is None:
                raise UsageError(f"{config.run_name} has no prior to sample from; use --kind reconstructions")
            images = np.asarray(model.sample(state.params, state.batch_stats, jax.random.PRNGKey(args.seed), args.n))
            plots.save_grids(out, [plots.image_grid(images)], [f"{config.run_name}: {args.n} samples"])
        else:
            plots.save_reconstructions(out, *reconstructions(config, model, state, args.n, args.seed),
                                       title=f"({config.run_name}, step {int(state.step)})")
        print(f"wrote {out}")

    return report_errors(prog, draw)


if __name__ == "__main__":
    sys.exit(main())
