"""The sigma = 0.01 sensitivity study (GON-SPEC 9): which detail of a noisy latent start moves GON (16, 256)'s
MNIST learning curve at sigma = 0.01, each variant changing one thing against the ablation's own settings.

    python -m experiments.sigma_study --results RESULTS --manual-dir ../shared/data      # train, then report
    python -m experiments.sigma_study --results RESULTS --out docs/results --diagnose    # + latent split, float64
    python -m experiments.sigma_study --results RESULTS --out docs/results --report      # the report only

Each variant trains an ordinary run folder RESULTS/sigma_study/<variant>/ (resumable: rerun to continue) for
--epochs epochs, evaluating on the first --eval-batches batches of each split (the study reads the training
loss averaged over each epoch's steps, `mean_step_loss`, which every step contributes to). The report writes
OUT/SIGMA_STUDY.md (each variant's loss at a few epochs and its ratio to the spec's run at the same epoch),
OUT/sigma_study.png, and copies each run's metrics and config to OUT/runs/sigma_study/<variant>/.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from experiments import cli, suite
from gonjax import files
from gonjax.config import Config
from gonjax.errors import DataError, DivergedError, RunInUseError, UsageError

PROG = "python -m experiments.sigma_study"
STUDY = "sigma_study"  # the folder under --results and under OUT/runs
METRIC = "mean_step_loss"  # per-pixel training loss averaged over the epoch's steps (GON-SPEC 4.1, 9)
SIGMA = 0.01


@dataclasses.dataclass(frozen=True)
class Variant:
    """One run of the study: its folder name, its label in the report, and the one setting it changes."""

    name: str
    label: str
    settings: dict  # Config fields changed from the ablation's GON (16, 256), MNIST, sigma = 0.01, seed 0


VARIANTS: tuple[Variant, ...] = (
    Variant("spec", "the ablation's settings (seed 0)", {}),
    Variant("seed_1", "seed 1", {"seed": 1}),
    Variant("seed_2", "seed 2", {"seed": 2}),
    Variant("shared_z0", "one z0 shared by the batch", {"latent_noise": "batch"}),
    Variant("shared_z0_sigma_0.1", "shared z0, sigma 0.1", {"latent_noise": "batch", "latent_sigma": 0.1}),
    Variant("shared_z0_sigma_1", "shared z0, sigma 1", {"latent_noise": "batch", "latent_sigma": 1.0}),
    Variant("batch_128", "batch 128 (half the latent's 1/B factor)", {"batch_size": 128}),
    Variant("batch_32", "batch 32 (twice the latent's 1/B factor)", {"batch_size": 32}),
    Variant("sigma_0.02", "sigma 0.02", {"latent_sigma": 0.02}),
    Variant("sigma_0.005", "sigma 0.005", {"latent_sigma": 0.005}),
    Variant("eps_1e-3", "BN eps 1e-3", {"bn_epsilon": 1e-3}),
    Variant("eps_1e-7", "BN eps 1e-7", {"bn_epsilon": 1e-7}),
    Variant("sigma_0", "control: sigma 0 (the origin)", {"latent_sigma": 0.0}),
    Variant("sigma_0_batch_128", "control: sigma 0, batch 128", {"latent_sigma": 0.0, "batch_size": 128}),
)
NAMES = tuple(v.name for v in VARIANTS)
REPORT_EPOCHS = (1, 2, 6, 10, 15)


def variant_config(variant: Variant, epochs: int, eval_batches: int, **data_flags) -> Config:
    """The variant's Config: the sigma = 0.01 ablation's (GON (16, 256), MNIST, GON-SPEC 9) with its change."""
    settings = {"latent_sigma": SIGMA, **variant.settings}
    return Config(model="gon", dataset="mnist", epochs=epochs, eval_batches=eval_batches, **settings,
                  **data_flags).validate()


def curve(run: Path) -> dict[int, float]:
    """{epoch: mean training loss of that epoch's steps} of a run folder (or its archived copy)."""
    return {int(r["epoch"]): r[METRIC] for r in suite.epoch_records(suite.read_records(run), float("inf"))
            if METRIC in r}


def train(variants, results: Path, epochs: int, eval_batches: int, data_flags: dict) -> int:
    """Train each variant to `epochs`, one after the other; returns how many failed."""
    from gonjax.train import train_and_evaluate

    failures = 0
    for index, variant in enumerate(variants, 1):
        folder = results / STUDY / variant.name
        print(f"[{index}/{len(variants)}] {folder}: {variant.label}, to epoch {epochs}", flush=True)
        try:
            train_and_evaluate(variant_config(variant, epochs, eval_batches, **data_flags), folder,
                               should_stop=cli.STOP.is_set)
        except RunInUseError as error:
            print(f"{PROG}: {folder}: skipped, in use by {error.holder}", file=sys.stderr, flush=True)
        except (DivergedError, UsageError, DataError) as error:
            print(f"{PROG}: {folder}: {error}", file=sys.stderr, flush=True)
            failures += 1
    return failures


def read_study(results: Path, archive: Path | None) -> dict[str, dict[int, float]]:
    """Each variant's curve from its run folder, or from the archive where that reached a later epoch."""
    curves = {}
    for variant in VARIANTS:
        candidates = [curve(results / STUDY / variant.name)]
        if archive is not None:
            candidates.append(curve(archive / STUDY / variant.name))
        best = max(candidates, key=lambda c: max(c, default=-1))
        if best:
            curves[variant.name] = best
    return curves


def archive_runs(results: Path, archive: Path) -> None:
    """Copy each run's metrics and config to archive/sigma_study/<variant>/ unless the copy there is further."""
    for variant in VARIANTS:
        suite.archive_run_files(results / STUDY / variant.name, archive / STUDY / variant.name)
    if (results / STUDY / DIAGNOSTICS_FILE).is_file():
        files.write_atomic(archive / STUDY / DIAGNOSTICS_FILE, (results / STUDY / DIAGNOSTICS_FILE).read_text())


DIAGNOSTICS_FILE = "diagnostics.json"  # under RESULTS/sigma_study/ (and the archive): `diagnose`'s numbers


def _gradient_vector(run, images, dtype, key):
    """The loss gradient of one batch with respect to every parameter, as one float64 vector, and the loss."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    cast = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)  # noqa: E731
    (loss, _), grads = jax.value_and_grad(run.model.apply, has_aux=True)(
        cast(run.state.params), cast(run.state.batch_stats), jnp.asarray(images, dtype), key)
    return float(loss), np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree_util.tree_leaves(grads)])


def precision_check(run, images) -> dict:
    """One training batch's loss gradient (all parameters) in float32 against float64 from the same z0, beside its
    change between two z0 draws in float32: how large float32 rounding is against the start's noise."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    relative = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    with jax.enable_x64(True):
        key, other = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
        loss32, grad32 = _gradient_vector(run, images, jnp.float32, key)
        loss64, grad64 = _gradient_vector(run, images, jnp.float64, key)
        _, grad_other = _gradient_vector(run, images, jnp.float32, other)
    return {"run": run.path.name, "step": run.step, "loss_float32": loss32, "loss_float64": loss64,
            "gradient_float32_vs_float64": relative(grad32, grad64),
            "gradient_between_two_draws": relative(grad_other, grad32)}


def latent_split(run, images) -> dict:
    """How the latent z = z0 - grad L(z0) of one test batch splits: the median norm of the gradient part against
    the median norm of the start z0 (`zoo.latent_start`, the draw the model makes under the same key)."""
    import jax
    import numpy as np

    from gonjax import zoo

    key = jax.random.PRNGKey(0)
    _, (_, output) = run.model.apply(run.state.params, run.state.batch_stats, images, key)
    start = np.asarray(zoo.latent_start(run.config, run.state.params, key, *np.shape(output.latent)))
    gradient = start - np.asarray(output.latent)
    return {"step": run.step, "gradient_norm": float(np.median(np.linalg.norm(gradient, axis=1))),
            "start_norm": float(np.median(np.linalg.norm(start, axis=1)))}


def diagnose(results: Path, data_dir=None, manual_dir=None) -> dict:
    """At each variant's latest checkpoint, `latent_split` on the first test batch; at the spec run's,
    `precision_check` on the first training batch."""
    from gonjax.data import input_pipeline
    from gonjax.runs import load_run

    numbers = {"latents": {}}
    data = None
    for variant in VARIANTS:
        folder = results / STUDY / variant.name
        if not any(p.name.isdigit() for p in (folder / "checkpoints").glob("*")):
            continue
        run = load_run(folder)
        if data is None:
            data = input_pipeline.load_dataset("mnist", run.model.image_size, data_dir, manual_dir)
        numbers["latents"][variant.name] = latent_split(run, data.test[:run.config.batch_size])
        if variant.name == "spec":
            numbers["precision"] = precision_check(run, data.train[:run.config.batch_size])
    return numbers


def report_markdown(curves: dict[str, dict[int, float]], diagnostics: dict | None = None) -> str:
    spec = curves.get("spec", {})
    latents = (diagnostics or {}).get("latents", {})
    epochs = [e for e in REPORT_EPOCHS if any(e in c for c in curves.values())]
    lines = ["# The sigma = 0.01 sensitivity study", "",
             f"GON (16, 256), MNIST, latent start z0 ~ N(0, {SIGMA}^2) (GON-SPEC 9); each variant changes one "
             "setting of the ablation's run. Training loss per pixel averaged over each epoch's steps; in "
             "brackets its ratio to the spec's run (seed 0) at the same epoch. Written by "
             f"`{PROG} --report`; commentary in README.md.", "",
             "| variant | " + " | ".join(f"epoch {e}" for e in epochs) + " | \\|grad\\| / \\|z0\\| |",
             "|---|" + "---|" * (len(epochs) + 1)]
    for variant in VARIANTS:
        mine = curves.get(variant.name)
        if not mine:
            lines.append(f"| {variant.label} | " + " | ".join("not run" for _ in epochs) + " | |")
            continue
        cells = []
        for e in epochs:
            if e not in mine:
                cells.append("")
            elif variant.name == "spec" or e not in spec:
                cells.append(f"{mine[e]:.4g}")
            else:
                cells.append(f"{mine[e]:.4g} ({mine[e] / spec[e]:.2f})")
        split = latents.get(variant.name)
        if split is None:
            cells.append("")
        elif split["start_norm"] == 0:  # the origin: the latent is all gradient
            cells.append(f"z0 = 0 (step {split['step']})")
        else:
            cells.append(f"{split['gradient_norm'] / split['start_norm']:.2f} (step {split['step']})")
        lines.append(f"| {variant.label} | " + " | ".join(cells) + " |")
    lines += ["", "|grad| / |z0|: the latent z = z0 - grad L(z0) of the first test batch at the run's latest "
              "checkpoint, the median norm of its gradient part against that of its start (`--diagnose`)."]
    precision = (diagnostics or {}).get("precision")
    if precision:
        lines += ["", f"**float32 against float64** (`--diagnose`): at step {precision['step']} of the "
                  f"`{precision['run']}` run, one training batch's loss is {precision['loss_float32']:.6g} in float32 "
                  f"and {precision['loss_float64']:.6g} in float64 from the same z0; the loss gradient (all "
                  f"parameters) differs between the two by {precision['gradient_float32_vs_float64']:.2g} of its "
                  f"norm, and between two z0 draws by {precision['gradient_between_two_draws']:.2g}."]
    return "\n".join(lines) + "\n"


def save_figure(path: Path, curves: dict[str, dict[int, float]]) -> None:
    from matplotlib.figure import Figure

    from experiments.figures import COINCIDE, plain_axis

    fig = Figure(figsize=(8.4, 4.4), dpi=100)
    ax = fig.subplots()
    labels = {v.name: v.label for v in VARIANTS}
    for index, (name, points) in enumerate(curves.items()):
        epochs = sorted(points)
        ax.plot(epochs, [points[e] for e in epochs], lw=2.2 if name == "spec" else 1.2, color=f"C{index % 10}",
                ls=("-", "--", "-.", ":")[index // 10 % 4], label=labels[name])
    plain_axis(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss per pixel (mean over the epoch's steps)")
    notes = [f"{labels[a]} and {labels[b]} coincide (one hides the other)"
             for i, a in enumerate(curves) for b in list(curves)[i + 1:]
             if set(curves[a]) == set(curves[b])
             and all(abs(curves[a][e] / curves[b][e] - 1) < COINCIDE for e in curves[a])]
    ax.set_title("\n".join([f"GON (16, 256), MNIST, sigma = {SIGMA}: one setting changed per curve", *notes]),
                 fontsize=9)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)


def write_report(results: Path, out: Path) -> None:
    archive = out / suite.ARCHIVE if out.resolve() != results.resolve() else None
    if archive is not None:
        archive_runs(results, archive)
    curves = read_study(results, archive)
    diagnostics = next((json.loads(f.read_text()) for f in (results / STUDY / DIAGNOSTICS_FILE,
                        (archive or results) / STUDY / DIAGNOSTICS_FILE) if f.is_file()), None)
    out.mkdir(parents=True, exist_ok=True)
    files.write_atomic(out / "SIGMA_STUDY.md", report_markdown(curves, diagnostics))
    if curves:
        with files.atomic_output(out / "sigma_study.png") as partial:
            save_figure(partial, curves)
    print(f"wrote {out / 'SIGMA_STUDY.md'}", flush=True)


def main(argv=None) -> int:
    parser = cli.OneLineParser(prog=PROG, description=__doc__.strip().splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"), help="folder of the run folders")
    parser.add_argument("--out", type=Path, default=None, help="where the report goes (default: --results)")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(NAMES),
                        help=f"comma-separated variants (default: all; {', '.join(NAMES)})")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every variant")
    parser.add_argument("--eval-batches", type=int, default=20, help="batches of each split per evaluation")
    parser.add_argument("--report", action="store_true", help="rebuild the report only; train nothing")
    parser.add_argument("--diagnose", action="store_true",
                        help="also measure each run's latent split (|grad| / |z0|) and, at the spec run's latest "
                             "checkpoint, float32 against float64 gradients")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's own)")
    parser.add_argument("--manual-dir", default=None, help="folder of official dataset files, to prepare offline")
    args = parser.parse_args(argv)

    failed = []

    def run():
        unknown = [name for name in args.variants if name not in NAMES]
        if unknown:
            raise UsageError(f"unknown variant {unknown[0]!r}; choose from {', '.join(NAMES)}")
        if args.epochs < 1 or args.eval_batches < 1:
            raise UsageError("--epochs and --eval-batches must be at least 1")
        out = args.out or args.results
        failures = 0
        if not args.report:
            data_flags = {"data_dir": args.data_dir, "manual_dir": args.manual_dir}
            chosen = [next(v for v in VARIANTS if v.name == name) for name in dict.fromkeys(args.variants)]
            failures = train(chosen, args.results, args.epochs, args.eval_batches, data_flags)
        if args.diagnose:
            numbers = diagnose(args.results, args.data_dir, args.manual_dir)
            files.write_atomic(args.results / STUDY / DIAGNOSTICS_FILE, json.dumps(numbers, indent=2) + "\n")
        write_report(args.results, out)
        failed.append(failures)

    return cli.report_errors(PROG, run) or (1 if any(failed) else 0)


if __name__ == "__main__":
    sys.exit(main())
