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

from experiments.cli import STOP, OneLineParser, add_data_overrides, report_errors, with_data_overrides
from gonjax import files, plots, resources, xla
from gonjax.data import input_pipeline
from gonjax.errors import UsageError, stop_if_requested
from gonjax.runs import load_run
from gonjax.steps import make_eval_step


def reconstructions(config, model, state, n: int, seed: int, should_stop=None):
    """The first n test images and their reconstructions (uint8), evaluated in batches of the run's batch size
    (BN statistics per batch, as in training). Past the last full batch (evaluation drops a partial one), the
    images left make a batch of their own, BN over them: COIL-20's 288 test images are 4 batches of 64 and one
    of 32."""
    data = input_pipeline.load_dataset(config.dataset, model.image_size, config.data_dir, config.manual_dir)
    if n > len(data.test):
        raise UsageError(f"--n {n}: {config.dataset} has {len(data.test)} test images; choose at most that")
    count = min(math.ceil(n / config.batch_size) * config.batch_size, len(data.test))
    if count % config.batch_size == 1 and model.render is None:  # batch norm cannot take one image
        raise UsageError(f"--n {n} would leave one test image for a batch of its own, and batch norm needs two; "
                         f"choose --n up to {count - 1}")
    batches = [data.test[first:first + config.batch_size] for first in range(0, count, config.batch_size)]
    eval_step = xla.jit(make_eval_step(model))
    recons = []
    for index, batch in enumerate(batches):
        stop_if_requested(should_stop)
        _, reconstruction = eval_step(state, batch, jax.random.fold_in(jax.random.PRNGKey(seed), index))
        recons.append(plots.to_uint8(reconstruction))
    return data.test[:n], np.concatenate(recons)[:n]


def samples(model, state, n: int, batch_size: int, seed: int, should_stop=None) -> np.ndarray:
    """n images (uint8) from the prior, decoded in batches of the run's batch size (BN statistics per batch, as
    in training), so memory stays bounded; batch k uses key fold_in(PRNGKey(seed), k)."""
    draw = xla.jit(model.sample, static_argnums=3)
    chunks = []
    for index, first in enumerate(range(0, n, batch_size)):
        stop_if_requested(should_stop)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
        chunks.append(plots.to_uint8(draw(state.params, state.batch_stats, key, batch_size))[:n - first])
    return np.concatenate(chunks)


def main(argv=None) -> int:
    prog = "python -m experiments.sample"
    parser = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run folder written by one of the experiments")
    parser.add_argument("--kind", choices=["samples", "reconstructions"], default=None,
                        help="default: samples for V-GON / VAE, reconstructions otherwise")
    parser.add_argument("--n", type=int, default=64, help="how many images (decoded in batches of the run's batch size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: in the run folder)")
    add_data_overrides(parser)
    args = parser.parse_args(argv)

    def draw():
        if args.n < 1:
            raise UsageError("--n must be at least 1")
        run = load_run(args.workdir)
        config, model, state, data_info = with_data_overrides(run.config, args), run.model, run.state, run.data_info
        kind = args.kind or ("samples" if model.sample else "reconstructions")
        out = args.out or Path(args.workdir) / f"{kind}_seed{args.seed}_n{args.n}.png"
        if out.exists():
            raise UsageError(f"{out} exists; choose another --out (results are never overwritten)")
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: folder {out.parent} does not exist")
        if kind == "samples" and model.sample is None:
            raise UsageError(f"{config.run_name} has no prior to sample from; use --kind reconstructions")
        pictures = 1 if kind == "samples" else 2  # image grids held at once, uint8, each about n images
        resources.require_memory(3 * pictures * args.n * math.prod(data_info["image_shape"]),
                                 f"--n {args.n}", "lower --n")
        with files.atomic_output(out) as partial:  # the PNG appears complete, or not at all
            if kind == "samples":
                images = samples(model, state, args.n, config.batch_size, args.seed, STOP.is_set)
                plots.save_grids(partial, [plots.image_grid(images, columns=max(8, math.isqrt(args.n)))],
                                 [f"{config.run_name}: {args.n} samples"])
            else:
                plots.save_reconstructions(
                    partial, *reconstructions(config, model, state, args.n, args.seed, STOP.is_set),
                    title=f"({config.run_name}, step {int(state.step)})")
        print(f"wrote {out}")

    return report_errors(prog, draw)


if __name__ == "__main__":
    sys.exit(main())
