"""Flags, run folders and error handling shared by every experiment CLI."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import signal
import threading
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gonjax import parallel
from gonjax.config import DATASETS, LOSSES, ORIGIN_MODELS, Config
from gonjax.errors import GonjaxError
from gonjax.models import ACTIVATIONS, POSITION_ENCODINGS


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def seed_list(text: str) -> list[int]:
    """argparse type of --seeds: distinct non-negative integers separated by commas, e.g. "0,1,2"."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be distinct and non-negative")
    return seeds


def build_parser(prog: str, description: str, model: str) -> argparse.ArgumentParser:
    """Flags common to every model, and those of its family (origin-step options, KL options)."""
    defaults = Config(model=model)
    parser = OneLineParser(prog=prog, description=description,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    parser.add_argument("--epochs", type=int, default=None, help="default: the spec's schedule for the model")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the spec's)")
    parser.add_argument("--nz", type=int, default=None, help="latent size (default 256; Implicit GON 32)")
    if model == "implicit_gon":
        parser.add_argument("--lr-drop-epoch", type=int, default=None,
                            help="from this epoch on, train at --lr-drop-to (COIL-20 default: 50)")
        parser.add_argument("--lr-drop-to", type=float, default=None, help="(COIL-20 default: 5e-5)")
        parser.add_argument("--loss-reduction", choices=["mean", "sum"], default=defaults.loss_reduction,
                            help="per-pixel MSE (J) or sum over pixels, mean over batch (P)")
    else:
        parser.add_argument("--ngf", type=int, default=defaults.ngf, help="base width of decoder (and encoder)")
        parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default=defaults.activation)
    if model in ("gon", "implicit_gon"):
        parser.add_argument("--detach", action="store_true", help="detached GON: no gradient through the latent")
        parser.add_argument("--latent-sigma", type=float, default=defaults.latent_sigma,
                            help="start the latent at z0 ~ N(0, sigma^2) instead of the origin (ablation)")
    if model in ORIGIN_MODELS:
        _add_variant_flags(parser, model, defaults)
    if model in ("vgon", "vae"):
        parser.add_argument("--kl-weight", type=float, default=defaults.kl_weight, help="weight of the KLD")
        parser.add_argument("--kl-warmup-steps", type=int, default=defaults.kl_warmup_steps,
                            help="ramp the KL weight linearly from 0 over this many steps (0: no warm-up)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=defaults.seed)
    seeds.add_argument("--seeds", type=seed_list, default=None,
                       help="train one run per seed, all in one program, into WORKDIR/seed<k> (e.g. 0,1,2)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many training steps, then evaluate (smoke runs)")
    parser.add_argument("--workdir", default=None,
                        help="run folder (default runs/<model>-<dataset>-<timestamp>); rerun to resume")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's own)")
    parser.add_argument("--manual-dir", default=None,
                        help="folder of official dataset files (or of folders named after the datasets), "
                             "to prepare offline")
    parser.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="evaluate on the first N batches of each split only (default: full passes, as the "
                             "spec's tables; records then carry eval_batches)")
    add_eval_every_flag(parser)
    add_scale_flags(parser)
    return parser


def add_eval_every_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-every", type=int, default=Config.eval_every, metavar="N",
                        help="evaluate after every N-th epoch and at the end (default 1); the training is the same, "
                             "the curves have fewer points")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="checkpoint after every N-th epoch and at the end (default: as --eval-every); a kill "
                             "loses up to N epochs")


def add_scale_flags(parser: argparse.ArgumentParser) -> None:
    """Devices and processes (README "Scaling"; gonjax.parallel): they change where a run computes, not what."""
    scale = parser.add_argument_group("devices and hosts (the same results on any of them)")
    scale.add_argument("--devices", type=int, default=None,
                       help="split each batch over this many devices (default: all devices of all processes)")
    scale.add_argument("--coordinator", default=None,
                       help="HOST:PORT of process 0, for a run of several processes (hosts)")
    scale.add_argument("--num-processes", type=int, default=None, help="processes of the run")
    scale.add_argument("--process-id", type=int, default=None, help="this process's index, 0 to N-1")


def join_processes(args: argparse.Namespace) -> None:
    """Join the run's other processes where the flags (or a cluster's environment) say there are some."""
    parallel.initialize(args.coordinator, args.num_processes, args.process_id)


def _add_variant_flags(parser: argparse.ArgumentParser, model: str, defaults: Config) -> None:
    """The origin-step variants (docs/spec.md "Variants"): defaults are the spec's GON."""
    variants = parser.add_argument_group("variants (defaults: the spec's)")
    variants.add_argument("--latent-updates", type=int, default=defaults.latent_updates,
                          help="N latent updates z <- z - step * grad L_in(z), each differentiable")
    variants.add_argument("--latent-step-size", type=float, default=defaults.latent_step_size,
                          help="the step of each latent update")
    variants.add_argument("--learn-origin", action="store_true", help="train z0 as a parameter (start: zeros)")
    if model == "vgon":
        return
    variants.add_argument("--loss", choices=LOSSES, default=defaults.loss,
                          help="peer_bce: gon-pytorch's losses (inner BCE summed over the batch, outer BCE mean)")
    if model != "implicit_gon":
        return
    variants.add_argument("--position-encoding", choices=POSITION_ENCODINGS, default=defaults.position_encoding,
                          help="encode the coordinates: Gaussian Fourier features or NeRF's frequencies")
    variants.add_argument("--fourier-features", type=int, default=defaults.fourier_features,
                          help="width of the Fourier projection (2x as many features)")
    variants.add_argument("--fourier-sigma", type=float, default=defaults.fourier_sigma,
                          help="standard deviation of the Fourier projection")
    variants.add_argument("--nerf-frequencies", type=int, default=defaults.nerf_frequencies,
                          help="NeRF frequencies per coordinate")
    variants.add_argument("--modulation", action="store_true",
                          help="a modulated SIREN: the latent scales each hidden layer instead of joining the input")


def config_from_args(args: argparse.Namespace, model: str) -> Config:
    """The flags given, and for those left out the spec's settings for the model and dataset (Config fills them)."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(model=model, **{k: v for k, v in vars(args).items() if k in names})


def default_workdir(config: Config) -> Path:
    """runs/<model>-<dataset>-<timestamp>, never an existing folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{config.run_name}-{config.dataset}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


# Set by the first Ctrl-C or SIGTERM; the work polls it at safe points (before every training step, between
# evaluation and rendering batches), waits for the computations in flight, and stops there with
# KeyboardInterrupt. The handler does not raise itself: an exception raised at an arbitrary bytecode (e.g. inside
# JAX's compilation), or an exit while dispatched steps still ran, crashed the interpreter at exit (a segfault
# after the "interrupted" line, on MNIST). A second signal raises at once.
STOP = threading.Event()


def _request_stop(signum, frame):
    if STOP.is_set():
        raise KeyboardInterrupt
    STOP.set()
    os.write(2, b"stopping at the next safe point (a second Ctrl-C stops at once)\n")


def report_errors(prog: str, action: Callable[[], object]) -> int:
    """Run `action`; a user error becomes one line on stderr and exit code 1, Ctrl-C exit code 130."""
    logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS's informational warnings; errors still show
    STOP.clear()
    signals = (signal.SIGINT, signal.SIGTERM)  # a killed job stops like Ctrl-C; checkpoints stay whole
    previous = {signum: signal.signal(signum, _request_stop) for signum in signals}
    try:
        action()
    except GonjaxError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        parallel.exit_if_several(1)
        return 1
    except (RuntimeError, ValueError) as error:
        if parallel.lost_peer(error):  # another process of a multi-process run died: stop, one line
            parallel.exit_lost_peer(prog, error)
        raise
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"{prog}: error: no space left on the disk writing {error.filename or 'a file'}; free some space "
              "and rerun (a training run resumes from its last checkpoint)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (a training run resumes when rerun with the same --workdir)", file=sys.stderr)
        return 130
    finally:  # as they were (matters when a CLI's main runs inside another program, e.g. the tests)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def run(model: str, description: str, argv: Sequence[str] | None) -> int:
    """Parse flags and train `model` (gonjax.train.train_and_evaluate; with --seeds, train_seeds: every seed in
    one program)."""
    from gonjax.train import train_and_evaluate, train_seeds

    prog = f"python -m experiments.{model}"
    args = build_parser(prog, description, model).parse_args(argv)

    def start():
        join_processes(args)
        config = config_from_args(args, model).validate()
        workdir = Path(args.workdir) if args.workdir else default_workdir(config)
        if args.seeds is None:
            say(f"{prog}: writing to {workdir}")
            train_and_evaluate(config, workdir, should_stop=STOP.is_set)
            return
        say(f"{prog}: seeds {', '.join(map(str, args.seeds))} in one program: writing to "
            f"{', '.join(str(workdir / f'seed{seed}') for seed in args.seeds)}")
        train_seeds(config, args.seeds, workdir, should_stop=STOP.is_set)

    return report_errors(prog, start)


def say(line: str) -> None:
    """A progress line, from process 0 only in a run of several processes."""
    if parallel.is_primary():
        print(line, flush=True)
