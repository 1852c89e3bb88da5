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
        config, model, state = with_data_overrides(run.config, args), run.model, run.state
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
        _require_memory(args.n, args.resolution, run.data_info["image_shape"][-1])
        data = input_pipeline.load_dataset(config.dataset, model.image_size, config.data_dir, config.manual_dir)
        # As many latents as the slerp grid's 64 (GON-SPEC 4.6) need: one batch of 64, or several smaller ones.
        latents = test_latents(config, model, state, data.test, render.SLERP_LATENTS)
        batch = data.test[:config.batch_size]
        out.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_output(out, folder=True) as partial:  # the folder appears complete, or not at all
            write_pictures(partial, model, state, batch, latents, bank, args)
        print(f"wrote {out}/superres.png, superres_{args.resolution}.png, slerp.png, samples.png")

    return report_errors(prog, draw)


def _require_memory(n: int, resolution: int, channels: int) -> None:
    columns = math.ceil(math.sqrt(n))
    side = columns * (resolution + 1) + 1
    resources.require_memory(n * resolution**2 * channels * 4 + side**2 * channels,
                             f"--resolution {resolution} for --n {n} images", "lower --resolution or --n")


def test_latents(config, model, state, test_images: np.ndarray, count: int) -> np.ndarray:
    """The latents of the first `count` test images (at least), reached as in evaluation: in batches of the
    run's batch size from the split's first (the official test file's first images, for MNIST, Fashion-MNIST and
    CIFAR-10; the inner loss averages over its batch)."""
    count = math.ceil(count / config.batch_size) * config.batch_size
    if count > len(test_images):
        raise UsageError(f"{count} test images are needed (batches of {config.batch_size}); {config.dataset} has "
                         f"{len(test_images)}")
    encode = xla.jit(model.apply)

    def latents_of(images):
        _, (_, output) = encode(state.params, state.batch_stats, images, jax.random.PRNGKey(0))
        return np.asarray(output.latent)

    return np.concatenate([latents_of(images) for images in
                           input_pipeline.eval_batches(test_images[:count], config.batch_size)])


def superres_grids(model, state, images: np.ndarray, latents: np.ndarray, resolution: int,
                   should_stop=None) -> tuple[list[np.ndarray], list[str]]:
    """Test images beside their renders at the native size, 64 and min(resolution, 256), as grids with titles."""
    columns = math.ceil(math.sqrt(len(images)))
    sizes = list(dict.fromkeys([model.image_size, 64, min(resolution, FIGURE_SIDE)]))
    renders = [render.render(model, state.params, latents, s, should_stop=should_stop, state=state.batch_stats)
               for s in sizes]
    return ([plots.image_grid(images, columns)] + [plots.image_grid(r, columns) for r in renders],
            ["test images"] + [f"{s}x{s}" for s in sizes])


SUPERRES_N = 9  # test images in a run's superres_<epoch>.png: 3x3, so that the titled figure fits (plots.FIGURE_LIMIT)


def draw_run_superres(workdir) -> Path | None:
    """workdir/superres_<epoch>.png from the run's latest checkpoint: its first SUPERRES_N test images beside
    their renders at the native size, 64x64 and 256x256 (GON-SPEC 4.6). Kept when drawn already; None for a run
    with no checkpoint yet. The results report titles it (experiments.suite.copy_pictures)."""
    workdir = Path(workdir)
    if not any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
        return None
    run = load_run(workdir)
    epoch = int(run.state.step) // max(1, run.data_info["train_images"] // run.config.batch_size)
    target = workdir / f"superres_{epoch}.png"
    if target.is_file():
        return target
    config, model, state = run.config, run.model, run.state
    data = input_pipeline.load_dataset(config.dataset, model.image_size, config.data_dir, config.manual_dir)
    latents = test_latents(config, model, state, data.test, SUPERRES_N)[:SUPERRES_N]
    grids, titles = superres_grids(model, state, data.test[:SUPERRES_N], latents, FIGURE_SIDE)
    with files.atomic_output(target) as partial:
        plots.save_grids(partial, grids, titles, scale=1)
    return target


def write_pictures(folder: Path, model, state, batch, latents, bank, args) -> None:
    def draw(latents, resolution):
        return render.render(model, state.params, latents, resolution, should_stop=STOP.is_set,
                             state=state.batch_stats)

    size = model.image_size
    grids, titles = superres_grids(model, state, batch[:args.n], latents[:args.n], args.resolution, STOP.is_set)
    plots.save_grids(folder / "superres.png", grids, titles, scale=1)
    side = f"{args.resolution}x{args.resolution}"  # the figure's panel at that resolution, where it has one
    full = grids[titles.index(side)] if side in titles else plots.image_grid(
        draw(latents[:args.n], args.resolution), math.ceil(math.sqrt(args.n)))
    plots.save_image(folder / f"superres_{args.resolution}.png", full)
    slerped = draw(render.slerp_grid(latents).astype(np.float32), size)
    plots.save_grids(folder / "slerp.png", [plots.image_grid(slerped)],
                     ["slerp z_k -> z_(32+k) (columns), t = row / 7"])
    mean, cov = render.fit_gaussian(bank)
    samples = draw(render.sample_gaussian(mean, cov, 64, args.seed).astype(np.float32), size)
    plots.save_grids(folder / "samples.png", [plots.image_grid(samples)],
                     [f"samples from N(mean, cov) of {len(bank)} training latents"])


if __name__ == "__main__":
    sys.exit(main())
