"""Training throughput against device count, and against replica (seed) count in one program.

    python -m benchmarks.scaling [--model gon] [--devices 1,2,4,8] [--replicas 1,2,3] [--steps 20] [--json FILE]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.scaling     # 8 fake CPU devices

Each row times the trainer's own jitted step (`gonjax.train`, placed by `gonjax.parallel` exactly as a run
places it) on random images: the median of `--steps` steps, each timed to completion, after a compiling call.
- devices: one run's batch of `--batch-size` split over N devices; images/s of the run.
- replicas: R seeds stacked in one program (`--seeds`) on `--replica-devices` devices, against the same R seeds
  trained one after another (R single steps); images/s over all replicas, and the ratio of the two.
On a CPU the fake devices share its cores, so the device rows are a check that the partitioned step runs, not a
speed claim; the replica ratio is a real measurement there.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.stats import summary
from gonjax import parallel, steps, zoo
from gonjax.config import MODEL_NAMES, Config


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: counts must be at least 1")
    return counts


def step_seconds(config: Config, devices: int, replicas: int, timed_steps: int) -> dict:
    """Seconds of the trainer's step for `replicas` seeds (1: one unstacked run) on `devices` devices."""
    model = zoo.build_model(config, 1)
    optimizer = steps.make_optimizer(config)
    layout = parallel.make_layout(devices, config.batch_size, replicas)
    shape = (config.batch_size, model.image_size, model.image_size, 1)
    create = lambda rng: steps.create_train_state(model, optimizer, rng, jnp.zeros(shape))  # noqa: E731
    rngs = jax.random.split(jax.random.PRNGKey(0), replicas)
    if layout.stacked:
        state = jax.jit(jax.vmap(create), out_shardings=layout.state)(rngs)
    else:
        state = jax.jit(create, out_shardings=layout.state)(rngs[0])
    train_step, _, _ = steps.build_steps(model, optimizer, layout)
    images = np.random.default_rng(0).uniform(size=((replicas,) if layout.stacked else ()) + shape)
    batch = layout.put(images.astype(np.float32), layout.train_batch)
    rng = layout.put(np.asarray(rngs if layout.stacked else rngs[0]), layout.replicated)
    start = time.perf_counter()
    state, _ = jax.block_until_ready(train_step(state, batch, rng))
    compile_s = time.perf_counter() - start
    samples = []
    for _ in range(timed_steps):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(train_step(state, batch, rng))
        samples.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "ms": summary(samples)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_NAMES, default="gon")
    parser.add_argument("--dataset", default="coil20", help="sets the image size and the model's defaults")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--devices", type=_counts, default=None,
                        help="device counts to time (default: 1, 2, 4, ... up to every visible device)")
    parser.add_argument("--replicas", type=_counts, default=[1, 2, 3], help="seed counts stacked in one program")
    parser.add_argument("--replica-devices", type=int, default=1, help="devices of the replica rows")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (never overwritten)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    if args.json is not None and args.json.exists():
        parser.error(f"--json {args.json} exists; choose a new file (results are never overwritten)")
    available = jax.device_count()
    devices = args.devices or [2**k for k in range(available.bit_length()) if 2**k <= available]
    if max(devices) > available or args.replica_devices > available:
        parser.error(f"only {available} device(s) are visible; on a CPU set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={max(devices + [args.replica_devices])}")
    config = Config(model=args.model, dataset=args.dataset, batch_size=args.batch_size).validate()
    kind = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"

    device_rows = []
    for count in devices:
        timing = step_seconds(config, count, 1, args.steps)
        device_rows.append({"devices": count, "step_ms": timing["ms"]["median"], "step_ms_spread": timing["ms"],
                            "images_per_s": 1000 * args.batch_size / timing["ms"]["median"],
                            "compile_s": timing["compile_s"]})
    single = step_seconds(config, args.replica_devices, 1, args.steps)["ms"]["median"]
    replica_rows = []
    for count in args.replicas:
        timing = step_seconds(config, args.replica_devices, count, args.steps) if count > 1 else None
        stacked = timing["ms"]["median"] if timing else single
        replica_rows.append({"replicas": count, "devices": args.replica_devices, "stacked_step_ms": stacked,
                             "stacked_step_ms_spread": timing["ms"] if timing else None,
                             "one_after_another_ms": count * single,
                             "images_per_s": 1000 * count * args.batch_size / stacked,
                             "one_after_another_images_per_s": 1000 * args.batch_size / single,
                             "ratio": count * single / stacked})

    print(f"{args.model} on {args.dataset}, batch {args.batch_size}, {kind}, {available} visible device(s)")
    print(f"{'devices':>8}{'step ms':>10}{'(p25-p75)':>16}{'images/s':>10}{'compile s':>11}")
    for r in device_rows:
        spread = f"{r['step_ms_spread']['p25']:.1f}-{r['step_ms_spread']['p75']:.1f}"
        print(f"{r['devices']:>8}{r['step_ms']:>10.2f}{spread:>16}{r['images_per_s']:>10.0f}{r['compile_s']:>11.2f}")
    print(f"\n{'replicas':>8}{'stacked ms':>12}{'sequential ms':>15}{'images/s':>10}{'sequential':>12}{'ratio':>7}"
          f"   (on {args.replica_devices} device(s))")
    for r in replica_rows:
        print(f"{r['replicas']:>8}{r['stacked_step_ms']:>12.2f}{r['one_after_another_ms']:>15.2f}"
              f"{r['images_per_s']:>10.0f}{r['one_after_another_images_per_s']:>12.0f}{r['ratio']:>7.2f}")
    if jax.devices()[0].platform == "cpu" and available > 1:
        print("(fake CPU devices share this machine's cores: the device rows check that the step partitions, "
              "they are not a speed claim)")
    if args.json is not None:
        report = {"model": args.model, "dataset": args.dataset, "batch_size": args.batch_size, "device_kind": kind,
                  "visible_devices": available, "jax": jax.__version__, "processor": platform.processor(),
                  "devices": device_rows, "replicas": replica_rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
