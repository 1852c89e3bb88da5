"""Training-step time and evaluation throughput, gonjax against the PyTorch reference, in one process.

    python -m benchmarks.step_time --model gon [--batch-size 64 --ngf 16 --nz 256 --dataset-shape 32x32x1]
                                   [--steps 30] [--json FILE]

Both frameworks start from the same weights (PyTorch's init ported to Flax) and step on the same batches.
Timed steps alternate in blocks (`--block` JAX steps, as many PyTorch steps, ...) so both see the same machine
load; each step is timed to completion (`block_until_ready` for JAX, `torch.cuda.synchronize` on a GPU). Blocks
rather than single steps: on a CPU both runtimes keep their worker threads spinning for a while after a step, and
a step that follows the other framework's competes with those threads (strict one-one alternation measured the
JAX GON step at 16.7 ms instead of 13 ms on two cores). Each block starts with `--block-warmup` untimed steps per
framework (default 1): the first step after a switch runs cold for both (GON, family-25 EPYC: JAX 27.4 ms against
19-20 ms for the next four, 33.4 against 21-23 ms after a 0.1 s pause; PyTorch 51.4 against 42-45 ms after the
pause), which a training loop, stepping back to back, never sees. JAX runs the jitted train
step with its state donated; PyTorch runs eagerly with as many threads as JAX's CPU backend uses.
The evaluation figure is images per second over passes of `--eval-batches` batches (the full-pass procedure of
the trainer: origin step per batch of 64, BN with batch statistics, SSE per image). `--floor` also times each
step's matmuls and convolutions alone (`benchmarks/floor.py`), in the same blocks, and reports torch time / floor
time: the largest speedup over PyTorch the step's contractions allow.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax
import jax
import jaxlib
import numpy as np
import optax
import torch

from benchmarks import floor
from benchmarks.stats import summary
from benchmarks import peer_reference as pr
from benchmarks import torch_reference as tr
from gonjax import steps, xla, zoo
from gonjax.config import Config
from gonjax.config import DECONV_IMPLS, KERNEL_CHOICES, MATMUL_PRECISIONS, backend_kernels


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A model as both frameworks run it."""

    config: Callable[[argparse.Namespace], Config]
    torch_model: Callable[[Config, int], torch.nn.Module]  # (config, nc) -> module
    torch_train_step: Callable  # (module, optimizer, images, config) -> anything
    torch_reconstruct: Callable  # (module, images, config) -> reconstruction, as in evaluation (no param grads)
    default_shape: tuple[int, int, int] = (32, 32, 1)  # HxWxC when --dataset-shape is not given
    port: Callable[[torch.nn.Module], dict] = tr.flax_variables  # the module's weights in gonjax's layout
    reference: str = "torch_reference"  # what the PyTorch side is


def _conv_torch_model(module_class):
    return lambda config, nc: module_class(nz=config.nz, ngf=config.ngf, nc=nc)


def _gon_benchmark(detach: bool) -> Benchmark:
    def evaluate(decoder, images, config):
        _, _, _, reconstruction = tr.gon_forward(decoder, images, config.nz, train=False)
        return reconstruction

    return Benchmark(
        config=lambda args: Config(model="gon", ngf=args.ngf, nz=args.nz, detach=detach,
                                   deconv_impl=args.deconv_impl, origin_shortcut=args.origin_shortcut),
        torch_model=_conv_torch_model(tr.ConvDecoder),
        torch_train_step=lambda module, opt, images, config: tr.gon_train_step(module, opt, images, config.nz,
                                                                              config.detach),
        torch_reconstruct=evaluate,
    )


def _noise(images, config):
    return torch.randn(images.shape[0], config.nz, dtype=images.dtype, device=images.device)


def _vgon_evaluate(model, images, config):
    return tr.vgon_forward(model, images, _noise(images, config), _noise(images, config), train=False)[3]


def _vae_evaluate(model, images, config):
    with torch.no_grad():
        return model(images, _noise(images, config))[0]


def _ae_evaluate(model, images, config):
    with torch.no_grad():
        return model(images)


def _implicit_evaluate(siren, images_nchw, config):
    return tr.implicit_gon_forward(siren, images_nchw.permute(0, 2, 3, 1), train=False)[3]


def _implicit_dataset(args: argparse.Namespace) -> str:
    """The dataset whose native size and channels match --dataset-shape (28: MNIST; 32: COIL-20 or CIFAR-10)."""
    return {28: "mnist", 32: "coil20" if args.shape[2] == 1 else "cifar10"}[args.shape[0]]


# Rows against gon-pytorch 0.1.1 (benchmarks/peer_reference.py): its GON (N latent updates, its BCE losses) around
# the spec's conv decoder, or around its modulated SIREN decoder; gonjax with the same variants.
def _peer_inputs(gon, images_nchw):
    """The package's (coords, target) for NCHW images: the conv GON reads NCHW targets and no coordinates; the
    SIREN reads (B, H, W, 2) coordinates and NHWC targets."""
    if isinstance(gon.decoder, pr.ConvLatentDecoder):
        return None, images_nchw
    n, _, size, _ = images_nchw.shape
    coords = pr.coordinate_input(n, size, images_nchw.dtype, images_nchw.device)
    return coords, images_nchw.permute(0, 2, 3, 1)


def _peer_train_step(gon, optimizer, images_nchw, config):
    return pr.peer_train_step(gon, optimizer, *_peer_inputs(gon, images_nchw))


def _peer_reconstruct(gon, images_nchw, config):
    """Latents by the package's N updates (it always keeps their graph), then one decode without gradients."""
    coords, target = _peer_inputs(gon, images_nchw)
    latent, _ = gon.infer_latents(coords, target)
    with torch.no_grad():
        output = gon(coords, latent.detach())
    return output if coords is None else output.permute(0, 3, 1, 2)


def _peer_benchmark(model: str, **variants) -> Benchmark:
    def config(args):
        if model == "gon":
            return Config(model="gon", ngf=args.ngf, nz=args.nz, deconv_impl=args.deconv_impl,
                          origin_shortcut=args.origin_shortcut, loss="peer_bce", **variants)
        return Config(model="implicit_gon", nz=32, origin_shortcut=args.origin_shortcut,
                      dataset=_implicit_dataset(args), loss="peer_bce", **variants)

    return Benchmark(config=config, torch_model=pr.peer_model, torch_train_step=_peer_train_step,
                     torch_reconstruct=_peer_reconstruct, default_shape=(32, 32, 1) if model == "gon" else (28, 28, 1),
                     port=pr.flax_variables, reference=f"gon-pytorch {importlib.metadata.version('gon-pytorch')}")


BENCHMARKS = {
    "gon": _gon_benchmark(False),
    "gon_detached": _gon_benchmark(True),
    "vgon": Benchmark(
        config=lambda args: Config(model="vgon", ngf=args.ngf, nz=args.nz, deconv_impl=args.deconv_impl),
        torch_model=_conv_torch_model(tr.VariationalGON),
        torch_train_step=lambda m, opt, x, config: tr.vgon_train_step(m, opt, x, _noise(x, config),
                                                                      _noise(x, config)),
        torch_reconstruct=_vgon_evaluate),
    "ae": Benchmark(
        config=lambda args: Config(model="ae", ngf=args.ngf, nz=args.nz, deconv_impl=args.deconv_impl),
        torch_model=_conv_torch_model(tr.ConvAutoencoder),
        torch_train_step=lambda m, opt, x, config: tr.ae_train_step(m, opt, x),
        torch_reconstruct=_ae_evaluate),
    "implicit_gon": Benchmark(
        config=lambda args: Config(model="implicit_gon", nz=32, origin_shortcut=args.origin_shortcut,
                                   dataset=_implicit_dataset(args)),
        torch_model=lambda config, nc: tr.Siren(nz=config.nz, nc=nc),
        torch_train_step=lambda m, opt, x, config: tr.implicit_gon_train_step(m, opt, x.permute(0, 2, 3, 1)),
        torch_reconstruct=_implicit_evaluate,
        default_shape=(28, 28, 1)),
    "vae": Benchmark(
        config=lambda args: Config(model="vae", ngf=args.ngf, nz=args.nz, deconv_impl=args.deconv_impl),
        torch_model=_conv_torch_model(tr.ConvVAE),
        torch_train_step=lambda m, opt, x, config: tr.vae_train_step(m, opt, x, _noise(x, config)),
        torch_reconstruct=_vae_evaluate),
    "gon_n3": _peer_benchmark("gon", latent_updates=3),
    "implicit_mod": _peer_benchmark("implicit_gon", modulation=True),
}
IMPLICIT_ROWS = ("implicit_gon", "implicit_mod")


def _torch_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(name: str, args: argparse.Namespace) -> dict:
    bench = BENCHMARKS[name]
    args = argparse.Namespace(**{**vars(args), "shape": args.shape or bench.default_shape})
    config = dataclasses.replace(bench.config(args), kernels=args.kernels, matmul_precision=args.matmul_precision)
    h, w, c = args.shape
    if name not in IMPLICIT_ROWS and (h, w) != (32, 32):
        raise SystemExit(f"the conv models read 32x32xC images, not {h}x{w}x{c}")
    if name in IMPLICIT_ROWS and (h, w) not in ((28, 28), (32, 32)):
        raise SystemExit(f"the Implicit GON benchmark reads 28x28 or 32x32 images, not {h}x{w}")
    rng = np.random.default_rng(0)
    batches = rng.uniform(size=(args.distinct_batches, args.batch_size, h, w, c)).astype(np.float32)

    jax_device = jax.devices()[0]
    torch_device = torch.device("cuda" if jax_device.platform == "gpu" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    module = bench.torch_model(config, c).to(torch_device)
    variables = bench.port(module)
    optimizer = tr.make_adam(module, config.lr)
    torch_batches = [tr.nhwc(b).to(torch_device) for b in batches]

    model = zoo.build_model(config, c)
    jax_optimizer = steps.make_optimizer(config)
    jax_batches = [jax.device_put(b) for b in batches]
    state = steps.create_train_state(model, jax_optimizer, jax.random.PRNGKey(0), jax_batches[0], variables)
    options = xla.compiler_options(jax_device.platform) if args.xla_options == "gonjax" else None
    train_fn, eval_fn = steps.make_train_step(model, jax_optimizer), steps.make_eval_step(model)
    train_step = jax.jit(train_fn, donate_argnums=0, compiler_options=options)
    eval_step = jax.jit(eval_fn, compiler_options=options)
    key = jax.random.PRNGKey(0)
    if args.floor:  # the steps' matmuls and convolutions alone (benchmarks/floor.py)
        train_floor, train_flops = floor.contraction_floor(train_fn, state, jax_batches[0], key,
                                                           compiler_options=options)
        eval_floor, eval_flops = floor.contraction_floor(eval_fn, state, jax_batches[0], key,
                                                         compiler_options=options)
        jax.block_until_ready((train_floor(), eval_floor()))

    start = time.perf_counter()
    state, _ = train_step(state, jax_batches[0], key)
    jax.block_until_ready(state)
    jax_first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(eval_step(state, jax_batches[0], key))
    jax_eval_first = time.perf_counter() - start
    start = time.perf_counter()
    bench.torch_train_step(module, optimizer, torch_batches[0], config)
    _torch_sync(torch_device)
    torch_first = time.perf_counter() - start

    for i in range(args.warmup):
        state, _ = train_step(state, jax_batches[i % len(jax_batches)], key)
        bench.torch_train_step(module, optimizer, torch_batches[i % len(torch_batches)], config)
    jax.block_until_ready(state)
    _torch_sync(torch_device)

    jax_times, torch_times, floor_times = [], [], []
    for start_index in range(0, args.steps, args.block):
        indices = [i % len(jax_batches) for i in range(start_index, min(start_index + args.block, args.steps))]
        untimed = indices[:1] * args.block_warmup  # the first step after the other framework's block runs cold
        schedule = [(False, i) for i in untimed] + [(True, i) for i in indices]  # (timed?, batch index)
        for timed, index in schedule:
            start = time.perf_counter()
            state, metrics = train_step(state, jax_batches[index], key)
            jax.block_until_ready((state, metrics))
            if timed:
                jax_times.append(time.perf_counter() - start)
        for timed, index in schedule:
            start = time.perf_counter()
            bench.torch_train_step(module, optimizer, torch_batches[index], config)
            _torch_sync(torch_device)
            if timed:
                torch_times.append(time.perf_counter() - start)
        if args.floor:
            for timed, _ in schedule:
                start = time.perf_counter()
                jax.block_until_ready(train_floor())
                if timed:
                    floor_times.append(time.perf_counter() - start)

    jax_eval, torch_eval, floor_eval = [], [], []
    images = args.eval_batches * args.batch_size
    for _ in range(args.eval_repeats):
        start = time.perf_counter()
        total = None
        for i in range(args.eval_batches):
            metrics, _ = eval_step(state, jax_batches[i % len(jax_batches)], key)
            total = metrics["sse"] if total is None else total + metrics["sse"]
        float(total)
        jax_eval.append(images / (time.perf_counter() - start))
        start = time.perf_counter()
        total = 0.0
        for i in range(args.eval_batches):
            x = torch_batches[i % len(torch_batches)]
            total = total + ((bench.torch_reconstruct(module, x, config) - x) ** 2).sum((1, 2, 3)).mean()
        float(total)
        torch_eval.append(images / (time.perf_counter() - start))
        if args.floor:  # each call waited on: queued calls would all hold every contraction's output at once
            start = time.perf_counter()
            for _ in range(args.eval_batches):
                jax.block_until_ready(eval_floor())
            floor_eval.append(images / (time.perf_counter() - start))

    jax_ms, torch_ms = summary(jax_times), summary(torch_times)
    jax_ips, torch_ips = statistics.median(jax_eval), statistics.median(torch_eval)
    result = {
        "model": name,
        "reference": bench.reference,
        "latent_updates": config.latent_updates, "loss": config.loss, "modulation": config.modulation,
        "device": f"{jax_device.platform}:{jax_device.device_kind}",
        "torch_device": str(torch_device),
        "batch_size": args.batch_size, "ngf": config.ngf, "nz": config.nz, "dataset_shape": list(args.shape),
        "deconv_impl": config.deconv_impl if name not in IMPLICIT_ROWS else None,
        "kernels": backend_kernels(config.kernels, jax_device.platform), "matmul_precision": config.matmul_precision,
        "origin_shortcut": config.origin_shortcut if config.model in ("gon", "implicit_gon") else None,
        "xla_compiler_options": options,
        "jax_ms": jax_ms["median"], "torch_ms": torch_ms["median"],
        "speedup": torch_ms["median"] / jax_ms["median"],
        "jax_ms_spread": jax_ms, "torch_ms_spread": torch_ms,
        "jax_compile_s": jax_first, "jax_eval_compile_s": jax_eval_first, "torch_first_step_s": torch_first,
        "jax_eval_images_per_s": jax_ips, "torch_eval_images_per_s": torch_ips,
        "eval_speedup": jax_ips / torch_ips,
        "block": args.block, "block_warmup": args.block_warmup,
        "jax_steps_run": int(state.step), "torch_steps_run": tr.adam_steps(optimizer),
    }
    if args.floor:
        floor_ms, floor_ips = summary(floor_times), statistics.median(floor_eval)
        result.update({
            "floor_ms": floor_ms["median"], "floor_ms_spread": floor_ms, "floor_gflop": train_flops / 1e9,
            "speedup_ceiling": torch_ms["median"] / floor_ms["median"],
            "eval_floor_images_per_s": floor_ips, "eval_floor_gflop_per_batch": eval_flops / 1e9,
            "eval_speedup_ceiling": floor_ips / torch_ips,
        })
    return result


def _cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux; platform.processor() elsewhere, often just the arch)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def usable_cpus() -> int:
    """The cores this process may run on (its affinity: `taskset` narrows it), which is what JAX's CPU client
    sizes its thread pool by; os.cpu_count() counts the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def environment() -> dict:
    return {
        "python": platform.python_version(), "machine": platform.machine(), "processor": _cpu_model(),
        "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(),
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                     "optax": optax.__version__,
                     "torch": torch.__version__, "numpy": np.__version__},
        "threads": {"jax_cpu": usable_cpus(), "torch": torch.get_num_threads()},
        "float32_matmul_precision": {"jax": str(jax.config.jax_default_matmul_precision or "default"),
                                     "torch": torch.get_float32_matmul_precision()},
    }


def environment_summary(env: dict) -> str:
    """One line of `environment()` for a benchmark's table: processor, cores, versions, threads."""
    return (f"{env['processor']}, {env['usable_cpus']} of {env['cpu_count']} cores; "
            f"jax {env['versions']['jax']} torch {env['versions']['torch']}, threads {env['threads']}")


def _shape(text: str) -> tuple[int, int, int]:
    try:
        h, w, c = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxWxC such as 32x32x1, got {text!r}") from None
    if h != w or c < 1:
        raise argparse.ArgumentTypeError(f"expected square images HxHxC, got {text!r}")
    return h, w, c


def _model_names(text: str) -> list[str]:
    """--model: "all" (every row, in table order) or comma-separated rows."""
    if text == "all":
        return list(BENCHMARKS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown row {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(BENCHMARKS)} or all")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=_model_names, default=["gon"],
                        help=f"a row, comma-separated rows or all ({', '.join(BENCHMARKS)})")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--nz", type=int, default=256)
    parser.add_argument("--dataset-shape", dest="shape", type=_shape, default=None,
                        help="HxWxC (default 32x32x1; 28x28x1 for the Implicit GON)")
    parser.add_argument("--deconv-impl", choices=DECONV_IMPLS, default="taps",
                        help="how gonjax computes the transposed convolutions (the same function either way)")
    parser.add_argument("--no-origin-shortcut", dest="origin_shortcut", action="store_false",
                        help="GON / Implicit GON: decode the whole batch in the inner pass (Config.origin_shortcut)")
    parser.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                        help="Config.kernels: auto (XLA:CPU-tuned on a CPU, JAX's own elsewhere), xla_cpu, autodiff")
    parser.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="highest",
                        help="Config.matmul_precision of every contraction on a GPU or TPU (a CPU computes float32)")
    parser.add_argument("--xla-options", choices=("gonjax", "default"), default="gonjax",
                        help="gonjax's XLA compiler options for this backend (gonjax.xla) or XLA's defaults")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per framework")
    parser.add_argument("--block", type=int, default=10, help="timed steps per framework before switching")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block-warmup", type=int, default=1,
                        help="untimed steps per framework at the start of each block (default 1: the first step "
                             "after the other framework's block is slower for both)")
    parser.add_argument("--distinct-batches", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--eval-repeats", type=int, default=3)
    parser.add_argument("--floor", action="store_true",
                        help="also time each step's matmuls and convolutions alone (benchmarks/floor.py) and "
                             "report the largest speedup over PyTorch they allow")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.batch_size < 2 or args.block < 1 or args.block_warmup < 0:
        parser.error("--steps and --batch-size must be at least 2, --block at least 1, --block-warmup at least 0")
    if args.json is not None and args.json.exists():
        parser.error(f"--json {args.json} exists; choose a new file (results are never overwritten)")
    torch.set_num_threads(usable_cpus())

    rows = [run_benchmark(name, args) for name in args.model]
    env = environment()
    print(f"{'model':<18}{'device':<18}{'jax ms':>10}{'(p25-p75)':>16}{'torch ms':>10}{'(p25-p75)':>16}"
          f"{'speedup':>9}{'compile s':>11}{'eval img/s jax':>16}{'torch':>9}{'ratio':>7}")
    for r in rows:
        j, t = r["jax_ms_spread"], r["torch_ms_spread"]
        j_range, t_range = f"{j['p25']:.1f}-{j['p75']:.1f}", f"{t['p25']:.1f}-{t['p75']:.1f}"
        print(f"{r['model']:<18}{r['device']:<18}{r['jax_ms']:>10.2f}{j_range:>16}"
              f"{r['torch_ms']:>10.2f}{t_range:>16}{r['speedup']:>9.2f}"
              f"{r['jax_compile_s']:>11.2f}{r['jax_eval_images_per_s']:>16.0f}{r['torch_eval_images_per_s']:>9.0f}"
              f"{r['eval_speedup']:>7.2f}")
    if args.floor:
        print(f"\n{'model':<18}{'GFLOP':>8}{'floor ms':>10}{'jax ms':>9}{'torch ms':>10}{'ceiling':>9}"
              f"{'eval GFLOP':>12}{'floor img/s':>13}{'jax img/s':>11}{'torch img/s':>13}{'ceiling':>9}")
        for r in rows:
            print(f"{r['model']:<18}{r['floor_gflop']:>8.3f}{r['floor_ms']:>10.2f}{r['jax_ms']:>9.2f}"
                  f"{r['torch_ms']:>10.2f}{r['speedup_ceiling']:>9.2f}{r['eval_floor_gflop_per_batch']:>12.3f}"
                  f"{r['eval_floor_images_per_s']:>13.0f}{r['jax_eval_images_per_s']:>11.0f}"
                  f"{r['torch_eval_images_per_s']:>13.0f}{r['eval_speedup_ceiling']:>9.2f}")
        print("floor: the step's matmuls and convolutions alone; ceiling: torch time / floor time, the largest "
              "speedup those contractions allow")
    print("gon_n3 (3 latent updates) and implicit_mod (modulated SIREN) run gon-pytorch's GON on the PyTorch "
          "side, with its BCE losses on both")
    print(f"{environment_summary(env)}, float32 matmul precision {env['float32_matmul_precision']}")
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
