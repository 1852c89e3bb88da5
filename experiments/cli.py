"""Flags, run folders and error handling shared by every experiment CLI."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gonjax.config import DATASETS, Config
from gonjax.errors import GonjaxError
from gonjax.models import ACTIVATIONS


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str, description: str, defaults: Config) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    parser.add_argument("--nz", type=int, default=defaults.nz, help="latent size")
    parser.add_argument("--ngf", type=int, default=defaults.ngf, help="decoder base width")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default=defaults.activation)
    parser.add_argument("--detach", action="store_true", help="detached GON: no gradient through the latent")
    parser.add_argument("--latent-sigma", type=float, default=defaults.latent_sigma,
                        help="start the latent at z0 ~ N(0, sigma^2) instead of the origin (ablation)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many training steps, then evaluate (smoke runs)")
    parser.add_argument("--workdir", default=None,
                        help="run folder (default runs/<model>-<dataset>-<timestamp>); rerun to resume")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's own)")
    parser.add_argument("--manual-dir", default=None,
                        help="folder of official dataset files (or of folders named after the datasets), "
                             "to prepare offline")
    parser.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    return parser


def config_from_args(args: argparse.Namespace, model: str) -> Config:
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


def run(model: str, description: str, argv: Sequence[str] | None,
        train: Callable[[Config, Path], object]) -> int:
    """Parse flags, run `train(config, workdir)`, turn user errors into one line on stderr and exit 1."""
    prog = f"python -m experiments.{model}"
    logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS's informational warnings; errors still show
    args = build_parser(prog, description, Config(model=model)).parse_args(argv)
    try:
        config = config_from_args(args, model).validate()
        workdir = Path(args.workdir) if args.workdir else default_workdir(config)
        print(f"{prog}: writing to {workdir}", flush=True)
        train(config, workdir)
    except GonjaxError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command with --workdir to resume", file=sys.stderr)
        return 130
    return 0
