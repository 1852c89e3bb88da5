"""Render from a trained Implicit GON: super-resolution grids, an 8x8 slerp grid and 8x8 samples.

    python -m experiments.render --workdir RUN --resolution 256

Writes a new folder (never an existing one; it appears only when complete): superres.png (test images beside
renders at the native size, 64 and min(resolution, 256)), superres_<resolution>.png (the renders at the full
resolution, pixel for pixel), slerp.png and samples.png.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import numpy as np

from experiments.cli import STOP, OneLineParser, add_data_overrides, report_errors, with_data_overrides
from gonjax import files, plots, render, resources, xla
from gonjax.data import input_pipeline
from gonjax.errors import UsageError
from gonjax.runs import load_run

FIGURE_SIDE = 256  # the largest resolution drawn in the titled superres.png figure


def main(argv=None) -> int:
    prog = "python -m experiments.render"
    parser = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run folder of experiments.implicit_gon")
    parser.add_argument("--resolution", type=int, default=256, help="highest super-resolution side")
    parser.add_argument("--n", type=int, default=16, help="test images in the super-resolution grids")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Gaussian samples")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder to create for the pictures (default: RUN/render_<resolution>_seed<seed>)")
    add_data_overrides(parser)
    args = parser.parse_args(argv)

    def draw():
        run = load_run(args.workdir)
        config, model, state, data_info = with_data_overrides(run.config, args), run.model, run.state, run.data_info
        if model.render is None:
            raise UsageError(f"{config.run_name} is not a function of coordinates; render needs an Implicit GON run")
        if args.resolution < 2 or not 1 <= args.n <= config.batch_size:
            raise UsageError(f"--resolution must be at least 2 and --n between 1 and {config.batch_size}")
        out = args.out or Path(args.workdir) / f"render_{args.resolution}_seed{args.seed}"
        if out.exists():
            raise UsageError(f"{out} exists; choose another --out (results are never overwritten)")
        bank = render.bank_latents(state, model)
        if len(bank) < 2:
            raise UsageError("the run has not trained long enough to fit a Gaussian to its latents; train it on")
        columns = math.ceil(math.sqrt(args.n))
        side = columns * (args.resolution + 1) + 1
        channels = data_info["image_shape"][-1]
        resources.require_memory(args.n * args.resolution**2 * channels * 4 + side**2 * channels,
                                 f"--resolution {args.resolution} for --n {args.n} images",
                                 "lower --resolution or --n")

        data = input_pipeline.load_dataset(config.dataset, model.image_size, config.data_dir, config.manual_dir)
        # Latents as in evaluation, in batches of the run's batch size (the inner loss averages over its batch), as
        # many as the slerp grid's 64 (GON-SPEC 4.6) need: one batch of 64, or several of a smaller batch size.
        count = math.ceil(render.SLERP_LATENTS / config.batch_size) * config.batch_size
        if count > len(data.test):
            raise UsageError(f"the slerp grid needs {count} test images (batches of {config.batch_size}); "
                             f"{config.dataset} has {len(data.test)}")
        encode = xla.jit(model.apply)

        def latents_of(images):
            _, (_, output) = encode(state.params, state.batch_stats, images, jax.random.PRNGKey(0))
            return np.asarray(output.latent)

        latents = np.concatenate([latents_of(images) for images in
                                  input_pipeline.eval_batches(data.test[:count], config.batch_size)])
        batch = data.test[:config.batch_size]
        out.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_output(out, folder=True) as partial:  # the folder appears complete, or not at all
            write_pictures(partial, model, state, batch, latents, bank, args)
        print(f"wrote {out}/superres.png, superres_{args.resolution}.png, slerp.png, samples.png")

    return report_errors(prog, draw)


def write_pictures(folder: Path, model, state, batch, latents, bank, args) -> None:
    def draw(latents, resolution):
        return render.render(model, state.params, latents, resolution, should_stop=STOP.is_set,
                             state=state.batch_stats)

    size = model.image_size
    columns = math.ceil(math.sqrt(args.n))
    full = draw(latents[:args.n], args.resolution)
    plots.save_image(folder / f"superres_{args.resolution}.png", plots.image_grid(full, columns))
    sizes = list(dict.fromkeys([size, 64, min(args.resolution, FIGURE_SIDE)]))
    renders = [full if s == args.resolution else draw(latents[:args.n], s) for s in sizes]
    del full
    plots.save_grids(folder / "superres.png",
                     [plots.image_grid(batch[:args.n], columns)] + [plots.image_grid(r, columns) for r in renders],
                     ["test images"] + [f"{s}x{s}" for s in sizes], scale=1)
    slerped = draw(render.slerp_grid(latents).astype(np.float32), size)
    plots.save_grids(folder / "slerp.png", [plots.image_grid(slerped)],
                     ["slerp z_k -> z_(32+k) (columns), t = row / 7"])
    mean, cov = render.fit_gaussian(bank)
    samples = draw(render.sample_gaussian(mean, cov, 64, args.seed).astype(np.float32), size)
    plots.save_grids(folder / "samples.png", [plots.image_grid(samples)],
                     [f"samples from N(mean, cov) of {len(bank)} training latents"])


if __name__ == "__main__":
    sys.exit(main())
