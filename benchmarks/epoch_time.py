"""Time to result: one whole epoch of gonjax's trainer against the same epoch in PyTorch, written the authors' way.

    python -m benchmarks.epoch_time --model gon --dataset mnist --manual-dir ../shared/data [--json FILE]
    python -m benchmarks.epoch_time --model implicit_gon --dataset mnist --manual-dir ../shared/data \\
        --steps 40 --eval-batches 10          # an estimate from a fixed number of steps, said so
    python -m benchmarks.epoch_time --model gon --gonjax-only ...      # the trainer alone (two versions of it)

gonjax: `gonjax.train.train_and_evaluate`, the code a user runs (the splits on the device, jitted calls of
`--steps-per-call` steps, both evaluation passes, metrics.jsonl, pictures and checkpoints), for `--epochs` epochs
(default 2) in a temporary run
folder; the figures are its last epoch's, as its metrics.jsonl records them (the first epoch also pays for
compilation, reported apart). PyTorch: a `DataLoader` over the same preprocessed arrays (batch 64, shuffled, last
partial batch dropped), the reference models and steps of `benchmarks.torch_reference` with the loss read back
every step (`loss.item()`, as the authors accumulate it), and the same evaluation (origin step per batch of 64, BN
with batch statistics, the table's metric per image) over the train and test splits in batches of 64, for as many
epochs. (Each side starts from its own init: the weights do not change the time; `tests/test_benchmarks.py`
starts both from gonjax's and checks that they compute the same epoch.)

Parts: "train" is an epoch's training steps, "eval" both evaluation passes, "data" reading and preprocessing
the splits (TFDS for gonjax, done once per run; the DataLoader's batching is inside PyTorch's train and eval
parts, as gonjax's gather on the device is inside its own; it reads gonjax's arrays). The trainer's 50-step
windows after the first give its steadiness: the median and 90th percentile of their milliseconds per step and
the share of windows slower than 1.3 times the median (the machine's slow mode, benchmarks/README.md "Noise").
`--steps N` / `--eval-batches B` time N training steps (median of the trainer's 50-step windows after the first;
PyTorch's median step) and B batches of each pass, and scale them to a whole epoch; "first epoch's train" is
then those N steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

from benchmarks import step_time
from benchmarks import torch_reference as tr
from gonjax import train
from gonjax.zoo import build_model
from gonjax.config import Config
from gonjax.data import input_pipeline

MODELS = {"gon": dict(model="gon"), "gon_detached": dict(model="gon", detach=True), "vgon": dict(model="vgon"),
          "ae": dict(model="ae"), "vae": dict(model="vae"), "implicit_gon": dict(model="implicit_gon")}


@dataclasses.dataclass
class Side:
    """One framework's measurement of an epoch: seconds per part and images processed."""

    train_s: float
    eval_s: float
    first_epoch_s: float  # the first epoch's training, compilation (gonjax) or warm-up (PyTorch) included
    train_images: int
    eval_images: int
    train_metric: float
    test_metric: float
    estimated: bool
    window_ms: list[float] = dataclasses.field(default_factory=list)  # gonjax: ms a step of each window after the 1st

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def make_config(model: str, dataset: str, epochs: int = 2, **overrides) -> Config:
    """The trainer's config of `model` on `dataset` (GON-SPEC 5 defaults)."""
    return Config(dataset=dataset, epochs=epochs, **MODELS[model], **overrides).validate()


def epoch_batches(data, batch_size: int) -> tuple[int, int]:
    """(training steps, evaluation batches over both splits) of one epoch, last partial batches dropped."""
    return (input_pipeline.num_batches(len(data.train), batch_size),
            sum(input_pipeline.num_batches(len(split), batch_size) for split in (data.train, data.test)))


def torch_module(name: str, config: Config, nc: int) -> torch.nn.Module:
    return step_time.BENCHMARKS[name].torch_model(config, nc)


def _loader(images: np.ndarray, batch_size: int, shuffle: bool, order=None, generator=None):
    """A DataLoader over NCHW tensors of `images`, dropping the last partial batch; `order` fixes the sampling
    order (the honesty test gives gonjax's), else it shuffles as the authors' loaders do."""
    dataset = torch.utils.data.TensorDataset(tr.nhwc(images))
    sampler = list(order) if order is not None else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, drop_last=True, generator=generator)


def torch_evaluate(name: str, module, images: np.ndarray, config: Config, max_batches: int | None = None):
    """The trainer's evaluation in PyTorch: per batch of 64 (stored order), reconstruct and take the table's
    metric per image; the mean over batches, the seconds taken and the images seen."""
    bench = step_time.BENCHMARKS[name]
    per_pixel = table_metric(config) == "mse"
    start, values, seen = time.perf_counter(), [], 0
    for i, (x,) in enumerate(_loader(images, config.batch_size, shuffle=False)):
        if max_batches is not None and i >= max_batches:
            break
        error = (bench.torch_reconstruct(module, x, config) - x) ** 2
        values.append(float(error.mean() if per_pixel else error.sum((1, 2, 3)).mean()))
        seen += x.shape[0]
    return statistics.fmean(values), time.perf_counter() - start, seen


def torch_epoch(name: str, module, optimizer, images: np.ndarray, config: Config, max_steps: int | None = None,
                order=None, generator=None):
    """One training epoch the authors' way: DataLoader batches, a step each, the loss read back every step.
    Returns (seconds per step of each step, images seen, mean loss)."""
    bench = step_time.BENCHMARKS[name]
    times, seen, losses = [], 0, []
    start = time.perf_counter()
    for i, (x,) in enumerate(_loader(images, config.batch_size, True, order, generator)):
        if max_steps is not None and i >= max_steps:
            break
        step = bench.torch_train_step(module, optimizer, x, config)
        losses.append(step.loss.item())
        seen += x.shape[0]
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times, seen, statistics.fmean(losses)


def measure_torch(name: str, config: Config, data, steps: int | None, eval_batches: int | None,
                  variables: dict | None = None) -> Side:
    """PyTorch's epochs on `data` (gonjax's preprocessed arrays), from `variables` when given (gonjax layout)."""
    torch.manual_seed(config.seed)
    module = torch_module(name, config, data.train.shape[-1])
    if variables is not None:
        tr.load_flax_variables(module, variables)
    optimizer = tr.make_adam(module, config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch, eval_total = epoch_batches(data, config.batch_size)
    first = None
    for _ in range(1 if steps is not None else config.epochs):
        times, train_seen, _ = torch_epoch(name, module, optimizer, data.train, config, steps, generator=generator)
        train_metric, train_eval_s, train_eval_seen = torch_evaluate(name, module, data.train, config, eval_batches)
        test_metric, test_eval_s, test_eval_seen = torch_evaluate(name, module, data.test, config, eval_batches)
        first = sum(times) if first is None else first
    eval_seen = train_eval_seen + test_eval_seen
    estimated = steps is not None or eval_batches is not None
    train_s = statistics.median(times) * steps_per_epoch if steps is not None else sum(times)
    eval_s = (train_eval_s + test_eval_s) * (eval_total * config.batch_size / eval_seen)
    return Side(train_s, eval_s, first, train_seen, eval_seen, train_metric, test_metric, estimated)


def table_metric(config: Config) -> str:
    """The metric the spec's table reports for this model: "sse" per image, or "mse" per pixel."""
    return build_model(config, 1).table_metric


def load_timed(config: Config):
    """The preprocessed splits the trainer reads, and the seconds reading and preprocessing them take (the
    dataset is prepared first, untimed)."""
    input_pipeline.prepare_builder(config.dataset, config.data_dir, config.manual_dir)
    start = time.perf_counter()
    data = input_pipeline.load_dataset(config.dataset, build_model(config, 1).image_size,
                                       config.data_dir, config.manual_dir)
    return data, time.perf_counter() - start


def measure_gonjax(config: Config, workdir: Path, data, steps: int | None, eval_batches: int | None) -> Side:
    """gonjax's trainer for config.epochs epochs (or `steps` steps) in `workdir`, read from its own records
    (`data`: the same splits, for the epoch's batch counts)."""
    run = dataclasses.replace(config, epochs=1 if steps is not None else config.epochs, max_steps=steps,
                              eval_batches=eval_batches)
    records = train.train_and_evaluate(run, workdir)
    last, before = records[-1], records[-2]
    first = records[1]["seconds"]
    steps_per_epoch, eval_total = epoch_batches(data, config.batch_size)
    # The trainer's 50-step windows after the first (which holds the compilation); of the last epoch when there
    # are several.
    windows = [json.loads(line) for line in (workdir / "train_metrics.jsonl").read_text().splitlines()]
    later = [w for w in windows if w["step"] > steps_per_epoch * (run.epochs - 1)] if steps is None else []
    steady = [w["seconds"] / w["steps"] for w in (later or windows[1:] or windows)]
    if steps is not None:
        train_s, train_seen = statistics.median(steady) * steps_per_epoch, int(last["step"]) * config.batch_size
    else:
        train_s, train_seen = last["seconds"] - before["seconds"], steps_per_epoch * config.batch_size
    batches = eval_total if eval_batches is None else sum(
        min(eval_batches, input_pipeline.num_batches(len(s), config.batch_size)) for s in (data.train, data.test))
    eval_s = last["eval_seconds"] * eval_total / batches
    metric = table_metric(config)
    return Side(train_s, eval_s, first, train_seen, batches * config.batch_size, last[f"train_{metric}"],
                last[f"test_{metric}"], steps is not None or eval_batches is not None,
                [round(1000 * s, 3) for s in steady])


def steadiness(window_ms: list[float]) -> dict:
    """Median and 90th percentile of the windows' ms per step, and the share of windows over 1.3x the median."""
    median = statistics.median(window_ms)
    return {"median_ms": median, "p90_ms": float(np.percentile(window_ms, 90)), "windows": len(window_ms),
            "slow_share": sum(ms > 1.3 * median for ms in window_ms) / len(window_ms)}


def run(name: str, config: Config, steps: int | None, eval_batches: int | None, repeats: int = 1,
        with_torch: bool = True) -> dict:
    """Both sides (gonjax's alone without `with_torch`) `repeats` times, alternating; medians and each repeat's
    figures (PyTorch's None when not run)."""
    data, data_s = load_timed(config)
    ours, theirs = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="gonjax-epoch-") as folder:
            ours.append(measure_gonjax(config, Path(folder) / "run", data, steps, eval_batches))
        if with_torch:
            theirs.append(measure_torch(name, config, data, steps, eval_batches))
    median = lambda sides, part: statistics.median(getattr(s, part) for s in sides) if sides else None
    parts = {}
    for part in ("train_s", "eval_s", "first_epoch_s"):
        a, b = median(ours, part), median(theirs, part)
        parts[part] = {"gonjax": a, "torch": b, "ratio": b / a if theirs else None,
                       "gonjax_runs": [getattr(s, part) for s in ours],
                       "torch_runs": [getattr(s, part) for s in theirs]}
    epoch = {"gonjax": parts["train_s"]["gonjax"] + parts["eval_s"]["gonjax"],
             "torch": parts["train_s"]["torch"] + parts["eval_s"]["torch"] if theirs else None}
    steps_per_epoch, eval_batches_per_epoch = epoch_batches(data, config.batch_size)
    eval_images = eval_batches_per_epoch * config.batch_size
    windows = [ms for side in ours for ms in side.window_ms]
    return {"model": name, "dataset": config.dataset, "device": f"{jax.devices()[0].platform}",
            "steps_per_call": getattr(config, "steps_per_call", None), "steadiness": steadiness(windows),
            "epochs_run": config.epochs if steps is None else 1, "steps": steps, "eval_batches": eval_batches,
            "estimated": ours[0].estimated, "train_images_per_epoch": steps_per_epoch * config.batch_size,
            "eval_images_per_epoch": eval_images, "parts": parts, "data_s": data_s,
            "epoch_s": epoch, "epoch_ratio": epoch["torch"] / epoch["gonjax"] if theirs else None,
            "gonjax": [s.as_json() for s in ours], "torch": [s.as_json() for s in theirs]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.epoch_time", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="gon")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist", "cifar10", "coil20"])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per side; the last is reported (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="estimate from this many training steps")
    parser.add_argument("--eval-batches", type=int, default=None, help="estimate from this many batches per pass")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of both sides (medians)")
    parser.add_argument("--ngf", type=int, default=None)
    parser.add_argument("--nz", type=int, default=None)
    parser.add_argument("--manual-dir", default=None, help="folder of official dataset files, to prepare offline")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's own)")
    parser.add_argument("--steps-per-call", type=int, default=None,
                        help="the trainer's --steps-per-call (default: its default)")
    parser.add_argument("--gonjax-only", action="store_true",
                        help="time gonjax's trainer alone (e.g. two versions of it, side by side)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (never overwritten)")
    args = parser.parse_args(argv)
    if args.json is not None and args.json.exists():
        parser.error(f"--json {args.json} exists; choose a new file (results are never overwritten)")
    if args.epochs < 2 and args.steps is None:
        parser.error("--epochs must be at least 2: the first epoch pays for compilation")
    if args.steps is not None and args.steps < 100:
        parser.error("--steps must be at least 100: the trainer times steps in windows of 50, the first compiles")
    torch.set_num_threads(step_time.usable_cpus())
    sizes = {k: v for k, v in (("ngf", args.ngf), ("nz", args.nz), ("steps_per_call", args.steps_per_call))
             if v is not None}
    config = make_config(args.model, args.dataset, args.epochs, manual_dir=args.manual_dir, data_dir=args.data_dir,
                         **sizes)
    result = run(args.model, config, args.steps, args.eval_batches, args.repeats, with_torch=not args.gonjax_only)
    number = lambda value, width, digits=2: f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
    env = step_time.environment()
    how = f" (estimated from {args.steps} steps / {args.eval_batches} batches per pass)" if result["estimated"] else ""
    print(f"{args.model} on {args.dataset}: one epoch = {result['train_images_per_epoch']} training images + "
          f"{result['eval_images_per_epoch']} evaluated{how}")
    print(f"{'part':<22}{'gonjax s':>10}{'torch s':>10}{'gonjax img/s':>14}{'torch img/s':>13}{'ratio':>8}")
    images = {"train_s": result["train_images_per_epoch"], "eval_s": result["eval_images_per_epoch"]}
    for part, label in (("train_s", "train (epoch)"), ("eval_s", "eval (both passes)"),
                        ("first_epoch_s", "first epoch's train")):
        p = result["parts"][part]
        ips = (f"{images[part] / p['gonjax']:>14.0f}"
               f"{number(p['torch'] and images[part] / p['torch'], 13, 0)}" if part in images else f"{'':>14}{'':>13}")
        print(f"{label:<22}{p['gonjax']:>10.2f}{number(p['torch'], 10)}{ips}{number(p['ratio'], 8)}")
    print(f"{'data (per run)':<22}{result['data_s']:>10.2f}{'(same arrays)':>14}")
    e = result["epoch_s"]
    print(f"{'epoch (train + eval)':<22}{e['gonjax']:>10.2f}{number(e['torch'], 10)}{'':>27}"
          f"{number(result['epoch_ratio'], 8)}")
    if args.repeats > 1 and not args.gonjax_only:
        print("runs (train s, gonjax / torch): " + ", ".join(
            f"{a:.1f}/{b:.1f}" for a, b in zip(result["parts"]["train_s"]["gonjax_runs"],
                                               result["parts"]["train_s"]["torch_runs"])))
    steady = result["steadiness"]
    print(f"gonjax's training windows after the first: median {steady['median_ms']:.2f} ms a step, p90 "
          f"{steady['p90_ms']:.2f}, {100 * steady['slow_share']:.0f}% of {steady['windows']} over 1.3x the median")
    print(step_time.environment_summary(env))
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": env, "result": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
