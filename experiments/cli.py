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
from gonjax.config import Config, declared_settings, flag_name
from gonjax.errors import GonjaxError


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
    """The flags of `model`: every Config setting declared for it (`gonjax.config.setting`: its help, choices
    and default), then the flags that are not settings (seeds, run folder, devices and hosts)."""
    parser = OneLineParser(prog=prog, description=description)
    seeds = parser.add_mutually_exclusive_group()
    for field in declared_settings():
        if model not in field.metadata["models"]:
            continue
        target = seeds if field.name == "seed" else parser
        target.add_argument(flag_name(field.name), **_argument(field))
    seeds.add_argument("--seeds", type=seed_list, default=None,
                       help="train one run per seed, all in one program, into WORKDIR/seed<k> (e.g. 0,1,2)")
    parser.add_argument("--workdir", default=None,
                        help="run folder (default runs/<model>-<dataset>-<timestamp>); rerun to resume")
    add_scale_flags(parser)
    return parser


def _argument(field: dataclasses.Field) -> dict:
    """argparse keywords of a declared setting: its type from the annotation, its choices, its help with the
    default (the spec's, for one left None)."""
    meta, kinds = field.metadata, field.type.split(" | ")
    default_doc = meta["default_doc"] or {None: "none"}.get(field.default, str(field.default))
    help_text = f"{meta['help']} (default: {default_doc})"
    if kinds == ["bool"]:
        if field.default:
            raise TypeError(f"{field.name}: a flag can only switch a setting on")  # none of ours defaults to True
        return {"action": "store_true", "help": meta["help"]}
    kind = {"int": int, "float": float, "str": str}[kinds[0]]
    return {"type": kind, "default": field.default, "choices": meta["choices"], "help": help_text}


def add_settings(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Flags of the named Config settings, as their declarations say (for CLIs that are not a model's)."""
    fields = {field.name: field for field in declared_settings()}
    for name in names:
        parser.add_argument(flag_name(name), **_argument(fields[name]))


def add_scale_flags(parser: argparse.ArgumentParser) -> None:
    """Processes (docs/scaling.md; gonjax.parallel): they change where a run computes, not what."""
    scale = parser.add_argument_group("hosts (the same results on any number of them; --devices is a setting)")
    scale.add_argument("--coordinator", default=None,
                       help="HOST:PORT of process 0, for a run of several processes (hosts)")
    scale.add_argument("--num-processes", type=int, default=None, help="processes of the run")
    scale.add_argument("--process-id", type=int, default=None, help="this process's index, 0 to N-1")
    scale.add_argument("--startup-timeout", type=int, default=parallel.STARTUP_SECONDS,
                       help=f"seconds to wait for the other processes to join (default {parallel.STARTUP_SECONDS})")


def join_processes(args: argparse.Namespace) -> None:
    """Join the run's other processes where the flags (or a cluster's environment) say there are some."""
    parallel.initialize(args.coordinator, args.num_processes, args.process_id, args.startup_timeout,
                        should_stop=STOP.is_set)


def config_from_args(args: argparse.Namespace, model: str) -> Config:
    """The flags given, and for those left out the spec's settings for the model and dataset (Config fills them).
    Data locations are stored absolute, so the run folder works from any current folder."""
    names = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(data_locations(args))
    return Config(model=model, **values)


def data_locations(args: argparse.Namespace) -> dict:
    """--data-dir and --manual-dir as given, made absolute (None where not given)."""
    return {name: None if getattr(args, name, None) is None else str(Path(getattr(args, name)).expanduser().absolute())
            for name in ("data_dir", "manual_dir")}


def add_data_overrides(parser: argparse.ArgumentParser) -> None:
    """--data-dir / --manual-dir for the tools that read a trained run's dataset (sample, render)."""
    parser.add_argument("--data-dir", default=None, help="TFDS data dir to read the dataset from (default: the run's)")
    parser.add_argument("--manual-dir", default=None,
                        help="folder of official dataset files (default: the run's --manual-dir)")


def with_data_overrides(config: Config, args: argparse.Namespace) -> Config:
    """The run's config with the data locations given on this command line, if any."""
    given = {k: v for k, v in data_locations(args).items() if v is not None}
    return dataclasses.replace(config, **given) if given else config


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
    except (RuntimeError, ValueError, AssertionError) as error:
        if parallel.lost_peer(error):  # another process of a multi-process run died: stop, one line
            parallel.exit_lost_peer(prog, error)
        problem = None if isinstance(error, ValueError) else parallel.backend_problem()
        if problem is None:
            raise
        print(f"{prog}: error: {problem}", file=sys.stderr)  # an unusable JAX_PLATFORMS, met at the first device use
        return 1
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
