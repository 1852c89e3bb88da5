"""Render from a trained Implicit GON: super-resolution grids, an 8x8 slerp grid and 8x8 samples.

    python -m experiments.render --workdir RUN --resolution 256
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

from experiments.cli import OneLineParser, report_errors
from gonjax import plots, render, xla
from gonjax.data import input_pipeline
from gonjax.errors import UsageError
from gonjax.train import load_run


def main(argv=None) -> int:
    prog = "python -m experiments.render"
    parser = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run folder of experiments.implicit_gon")
    parser.add_argument("--resolution", type=int, default=256, help="highest super-resolution side")
    parser.add_argument("--n", type=int, default=16, help="test images in the super-resolution grids")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Gaussian samples")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder to create for the pictures (default: RUN/render_<resolution>_seed<seed>)")
    args = parser.parse_args(argv)

    def draw():
        config, model, state, _ = load_run(args.workdir)
        if model.render is None:
            raise UsageError(f"{config.run_name} is not a function of coordinates; render needs an Implicit GON run")
        if args.resolution < 2 or not 1 <= args.n <= config.batch_size:
            raise UsageError(f"--resolution must be at least 2 and --n between 1 and {config.batch_size}")
        out = args.out or Path(args.workdir) / f"render_{args.resolution}_seed{args.seed}"
        if out.exists():
            raise UsageError(f"{out} exists; choose another --out (results are never overwritten)")
        data = input_pipeline.load_dataset(config.dataset, model.image_size, config.data_dir, config.manual_dir)
        if len(data.test) < config.batch_size:
            raise UsageError(f"{config.dataset} has fewer test images than one batch")
        batch = data.test[:config.batch_size]  # latents as in evaluation: one batch of the run's batch size
        _, (_, output) = xla.jit(model.apply)(state.params, state.batch_stats, batch, jax.random.PRNGKey(0))
        latents = np.asarray(output.latent)
        out.mkdir(parents=True)

        size = model.image_size
        sizes = [size, 64, args.resolution]
        renders = [render.render(model, state.params, latents[:args.n], s) for s in sizes]
        columns = int(np.ceil(np.sqrt(args.n)))
        plots.save_grids(out / "superres.png",
                         [plots.image_grid(batch[:args.n], columns)]
                         + [plots.image_grid(render.clamp01(r), columns) for r in renders],
                         ["test images"] + [f"{s}x{s}" for s in sizes], scale=1)
        slerped = render.render(model, state.params, render.slerp_grid(latents).astype(np.float32), size)
        plots.save_grids(out / "slerp.png", [plots.image_grid(render.clamp01(slerped))],
                         ["slerp z_k -> z_(32+k) (columns), t = row / 7"])
        bank = render.bank_latents(state, model)
        if len(bank) < 2:
            raise UsageError("the run has not trained long enough to fit a Gaussian to its latents")
        mean, cov = render.fit_gaussian(bank)
        drawn = render.sample_gaussian(mean, cov, 64, args.seed).astype(np.float32)
        samples = render.render(model, state.params, drawn, size)
        plots.save_grids(out / "samples.png", [plots.image_grid(render.clamp01(samples))],
                         [f"samples from N(mean, cov) of {len(bank)} training latents"])
        print(f"wrote {out}/superres.png, slerp.png, samples.png")

    return report_errors(prog, draw)


if __name__ == "__main__":
    sys.exit(main())
