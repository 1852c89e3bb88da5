"""The results suite: train the cells of Tables 1-3 and the ablations (GON-SPEC 8, 9) and write their report.

    python -m experiments.tables --manual-dir ../shared/data                   # everything, seed 0
    python -m experiments.tables --table 1 --datasets coil20 --rows gon --seeds 0,1,2
    python -m experiments.tables --dry-run                                     # the plan and its hours
    python -m experiments.tables --report                                      # the report only

Each cell (and seed) trains an ordinary run folder RESULTS/<table>/<row>/<dataset>/seed<k>/ through the trainer,
so rerunning the command continues where it stopped (Ctrl-C, kill) and never trains a finished cell again.
A dataset that cannot be prepared marks its cells "no data" and the suite goes on. After every cell the report
is rewritten: RESULTS/TABLES.md, RESULTS/results.json and the figures (experiments.suite). The report covers every
cell of the spec whatever the choice of tables, datasets and rows (which only picks what trains), so two queues
training different cells into one --out each write the whole report, never a part of it over the whole.
"""
from __future__ import annotations

import shlex
import statistics
import sys
from pathlib import Path

from experiments import cli
from experiments import suite
from gonjax.catalog import CHANNELS, DATASETS, SPLIT_SIZES
from gonjax.config import Config
from gonjax.errors import DataError, DivergedError, GonjaxError, RunInUseError, UsageError

PROG = "python -m experiments.tables"


def build_parser():
    parser = cli.OneLineParser(prog=PROG, description=__doc__.strip().splitlines()[0])
    parser.add_argument("--table", action="append", choices=["1", "2", "3", "ablations"],
                        help="a table to run (repeatable; default: all four)")
    parser.add_argument("--datasets", type=_names, default=None,
                        help=f"comma-separated datasets (default: every column; {', '.join(DATASETS)})")
    parser.add_argument("--rows", type=_names, default=None,
                        help=f"comma-separated rows (default: all; {', '.join(suite.ROW_NAMES)})")
    parser.add_argument("--seeds", type=cli.seed_list, default=[0], help="seeds of every cell, e.g. 0,1,2")
    parser.add_argument("--results", default="results", help="folder of the run folders and the report")
    parser.add_argument("--out", default=None,
                        help="where the report goes (default: the --results folder), e.g. docs/results; its runs/ "
                             "keeps every run's metrics and each unfinished run's latest checkpoint, and a run "
                             "folder missing from --results resumes from there")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="cap every schedule at this many epochs (a quick pass; the report says so, and reads "
                             "cells other workers trained further as far as they went)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="list the cells, their epochs and the hours each would take here; train nothing")
    mode.add_argument("--report", action="store_true", help="rebuild the report from what exists; train nothing")
    cli.add_settings(parser, ["eval_every", "checkpoint_every"])
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's own)")
    parser.add_argument("--manual-dir", default=None, help="folder of official dataset files, to prepare offline")
    return parser


PATH_FLAGS = {"--results": "RESULTS", "--out": "OUT", "--manual-dir": "DATA", "--data-dir": "TFDS"}


def _placeholders(argv: list[str]) -> list[str]:
    """argv with the machine's own paths (after --results, --out, --manual-dir, --data-dir) written as names,
    for the report's "written by" line: the committed report names no folder of the machine that wrote it."""
    shown = list(argv)
    for index, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag in PATH_FLAGS and value:
            shown[index] = f"{flag}={PATH_FLAGS[flag]}"
        elif arg in PATH_FLAGS and index + 1 < len(argv):
            shown[index + 1] = PATH_FLAGS[arg]
    return shown


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _epochs_done(results_dir: Path, cell: suite.Cell, target: int) -> int:
    records = suite.epoch_records(suite.read_records(results_dir / suite.run_folder(cell)), target)
    return int(records[-1]["epoch"]) if records else 0


def _jobs(cells, max_epochs):
    """(cell, run folder, target epochs) in plan order, one per run folder, trained to the largest target of
    the cells it holds (Table 1's GON on MNIST to 500 epochs also gives the ablations' epoch 50)."""
    jobs: dict = {}
    for cell in cells:
        folder, target = suite.run_folder(cell), cell.target_epochs(max_epochs)
        if folder not in jobs or target > jobs[folder][2]:
            jobs[folder] = (jobs.get(folder, (cell,))[0], folder, target)
    return list(jobs.values())


def run_cells(cells, results_dir: Path, max_epochs, data_flags: dict, write_report, eval_every: int = 1,
              checkpoint_every: int | None = None, archive: Path | None = None) -> int:
    """Train every cell to its (capped) schedule, cell after cell, evaluating after every `eval_every`-th epoch
    and checkpointing after every `checkpoint_every`-th (default: as evaluating); a run folder missing here but
    archived with a checkpoint under `archive` (a report's runs/, from another machine) resumes from there;
    the seeds of a cell that still need training train together in one program (gonjax.train.train_seeds).
    Returns how many runs failed."""
    from gonjax.data import input_pipeline  # TFDS only when something trains
    from gonjax.train import train_and_evaluate, train_seeds

    status = suite.read_status(results_dir)  # read once for "already reported"; written through update_status
    prepared, failures = set(), 0
    jobs = _jobs(cells, max_epochs)
    groups: dict = {}  # (cell's folder without the seed, target) -> [(cell, folder, where, done)], in plan order
    for index, (cell, folder, target) in enumerate(jobs, 1):
        where = f"[{index}/{len(jobs)}] {folder}"
        restored = suite.restore_from_archive(results_dir, folder, archive) if archive is not None else None
        if restored is not None:
            print(f"{where}: restored from {archive / folder} at step {restored}", flush=True)
        done = _epochs_done(results_dir, cell, target)
        if done >= target:
            print(f"{where}: done ({done}/{cell.schedule_epochs} epochs)", flush=True)
            continue
        groups.setdefault((folder.parent, target), []).append((cell, folder, where, done))
    for (parent, target), group in groups.items():
        cell = group[0][0]
        if cell.dataset not in prepared:
            try:
                input_pipeline.prepare_builder(cell.dataset, **data_flags)
            except DataError as error:
                if cell.dataset not in status["datasets"]:
                    print(f"{PROG}: {cell.dataset}: no data ({error}); its cells are marked so", file=sys.stderr)
                status = suite.update_status(results_dir, datasets={cell.dataset: str(error)})
                continue
            prepared.add(cell.dataset)
            status = suite.update_status(results_dir, datasets={cell.dataset: None})
        for _, _, where, done in group:
            print(f"{where}: training to epoch {target}/{cell.schedule_epochs} (at {done})", flush=True)
        folders = [str(folder) for _, folder, _, _ in group]
        try:
            config = cell.config(epochs=target, eval_every=eval_every, checkpoint_every=checkpoint_every,
                                 **data_flags)
            if len(group) == 1:
                train_and_evaluate(config, results_dir / group[0][1], should_stop=cli.STOP.is_set)
            else:  # the seeds of one cell, stacked in one program
                train_seeds(config, [c.seed for c, _, _, _ in group], results_dir / parent, should_stop=cli.STOP.is_set)
            status = suite.update_status(results_dir, runs=dict.fromkeys(folders))
        except RunInUseError as error:  # another queue trains this cell now: skip it, it has not failed
            print(f"{PROG}: {', '.join(folders)}: skipped, {error.path} is in use by {error.holder}", file=sys.stderr,
                  flush=True)
            status = suite.update_status(results_dir, runs=dict.fromkeys(folders))
        except (DivergedError, UsageError, DataError) as error:
            print(f"{PROG}: {', '.join(folders)}: {error}", file=sys.stderr, flush=True)
            status = suite.update_status(results_dir, runs=dict.fromkeys(folders, str(error)))
            failures += len(folders)
        write_report()
    return failures


def dry_run(cells, results_dir: Path, max_epochs, eval_every: int = 1) -> None:
    """Print the plan: every job with its epochs, how far it is, and the hours left at this machine's speed
    (the median of the run's last ten epochs once it has some, else a short measurement of its steps)."""
    from gonjax.steps import time_steps

    timings: dict = {}
    total = 0.0
    print(f"{'run folder':<44} {'epochs':>9} {'done':>5} {'s/epoch':>8} {'hours left':>10}")
    for cell, folder, target in _jobs(cells, max_epochs):
        records = suite.epoch_records(suite.read_records(results_dir / folder), target)
        done = int(records[-1]["epoch"]) if records else 0
        if done >= 1:  # the median epoch (training and evaluation) of the run's last ten
            recent = [(b["seconds"] - a["seconds"] + b["eval_seconds"]) / (b["epoch"] - a["epoch"])
                      for a, b in zip(records[-11:], records[-10:])]
            per_epoch, how = statistics.median(recent), "measured in the run"
        else:
            config = cell.config()
            key = (suite.run_key(cell), cell.dataset)
            if key not in timings:
                size = _image_size(config)
                timings[key] = time_steps(config, (size, size, CHANNELS[cell.dataset]))
            train_s, eval_s = timings[key]
            train_images, test_images = SPLIT_SIZES[cell.dataset]
            steps, evals = train_images // config.batch_size, (train_images + test_images) // config.batch_size
            per_epoch, how = steps * train_s + evals * eval_s / eval_every, "from a timed step"
        hours = (target - done) * per_epoch / 3600
        total += hours
        print(f"{str(folder):<44} {f'{target}/{cell.schedule_epochs}':>9} {done:>5} {per_epoch:>8.1f} "
              f"{hours:>10.2f}  {how}", flush=True)
    print(f"{len(cells)} cells, {len(_jobs(cells, max_epochs))} runs, about {total:.1f} hours left on this machine "
          "(training steps and evaluations; pictures and checkpoints add a little)")


def _image_size(config) -> int:
    from gonjax.zoo import build_model

    return build_model(config, 1).image_size


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)

    def action():
        if args.max_epochs is not None and args.max_epochs < 1:
            raise UsageError(f"--max-epochs must be at least 1, got {args.max_epochs}")
        Config(eval_every=args.eval_every, checkpoint_every=args.checkpoint_every).validate()  # once, not per cell
        tables = None if args.table is None else [t if t == "ablations" else f"table{t}" for t in args.table]
        cells = suite.plan(tables, args.datasets, args.rows, args.seeds)
        results_dir = Path(args.results)
        if args.dry_run:
            dry_run(cells, results_dir, args.max_epochs, args.eval_every)
            return
        if args.report and not results_dir.is_dir():
            raise UsageError(f"--results {results_dir} is not a folder: nothing to report; train first")
        for flag, folder in (("--results", results_dir), ("--out", args.out)):
            try:
                if folder is not None:
                    Path(folder).mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UsageError(f"cannot create {flag} {folder} ({error.strerror or error})") from None
        command = " ".join([PROG, *map(shlex.quote, _placeholders(argv))])

        every_cell = suite.plan(seeds=args.seeds)

        def write_report():
            return suite.write_report(every_cell, results_dir, args.out, max_epochs=args.max_epochs, command=command)

        failures = 0
        if args.report:
            read = write_report()
        else:
            data_flags = cli.data_locations(args)
            try:
                archive = Path(args.out) / suite.ARCHIVE if args.out else None
                failures = run_cells(cells, results_dir, args.max_epochs, data_flags, write_report, args.eval_every,
                                     args.checkpoint_every, archive)
            finally:  # also on Ctrl-C: the report shows how far every cell got
                read = write_report()
        counts = {}
        for result in read:
            counts[result.status] = counts.get(result.status, 0) + 1
        print(f"{PROG}: report in {Path(args.out or results_dir) / 'TABLES.md'}: "
              + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())), flush=True)
        if failures:
            raise GonjaxError(f"{failures} run(s) failed; see {results_dir / 'TABLES.md'} and rerun after fixing")

    return cli.report_errors(PROG, action)


if __name__ == "__main__":
    sys.exit(main())
