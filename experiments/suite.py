"""The seed's results as a product: the cells of Tables 1-3 and of the ablations (GON-SPEC 8, 9), J's values
beside them, and the report built from the run folders that train them.

A cell is one (row, dataset, seed) of a table; it is trained by an ordinary run folder
`<results>/<table>/<row>/<dataset>/seed<k>/` (`gonjax.train.train_and_evaluate`, resumable). Cells whose runs
would be the same computation share one folder: the ablations' ELU and sigma-0 settings are GON (16, 256) on MNIST,
i.e. the first 50 epochs of Table 1's run, and read that run at epoch 50.

The report (`write_report`) reads every cell's `metrics.jsonl` at the cell's epoch and writes
  TABLES.md      Tables 1-3 in the seed's layout and the ablations: ours, J's, the relative difference, the epoch
                 reached against the spec's schedule and the hours taken
  results.json   the same, one object per cell and seed
  table<N>.png   per table, test metric against epoch for every cell, J's final value marked
  ablation_activation.png, ablation_sigma.png   per-epoch train loss, epochs 1-50 (the seed's ablation figures)
  runs/          when the report goes elsewhere (`--out docs/results`): every run's metrics.jsonl and config.json
                 (no checkpoints), so the committed report can be rebuilt even where the run folders are gone

Nothing measured is dropped by a later report: each cell is read from whichever of the run folder, the archived
copy in `runs/` and the previous `results.json` reached the furthest epoch (a cell known only from an earlier
report is marked so, with that report's date).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from gonjax import files
from gonjax.catalog import DATASETS
from gonjax.config import Config
from gonjax.errors import GonjaxError, UsageError

TABLES = ("table1", "table2", "table3", "ablations")
TABLE_TITLES = {
    "table1": "Table 1: SSE per image, GONs and the conv autoencoder (500 epochs)",
    "table2": "Table 2: Implicit GON, per-pixel MSE (100 epochs; COIL-20 500)",
    "table3": "Table 3: SSE per image, variational models (1000 epochs)",
    "ablations": "Ablations: MNIST, GON (16, 256), train loss (per pixel) after 50 epochs",
}
DATASET_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "coil20": "COIL-20"}
UNITS = {"sse": "SSE per image", "mse": "per-pixel MSE", "loss": "per-pixel loss (GON-SPEC 4.1)"}  # metric -> unit
DIFFERENCE_FLAG = 0.15  # COIL-20 test figures vary about this much with the split (GON-SPEC 8)
STATUS_FILE = "suite_status.json"
ARCHIVE = "runs"  # under the report's folder: each run's metrics.jsonl and config.json, no checkpoints


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a table: a model with its settings, and J's (train, test) value per dataset (the columns;
    None where J has no number)."""

    table: str
    name: str
    label: str
    model: str
    j: dict = dataclasses.field(hash=False)
    settings: dict = dataclasses.field(default_factory=dict, hash=False)  # Config fields beyond model defaults
    epochs: int | None = None  # the schedule when it is not the model's (GON-SPEC 5): the ablations' 50
    metric: str = "sse"  # the metrics.jsonl key the table reports (train_<metric>, test_<metric>)
    group: str = ""  # ablations: which figure the row belongs to ("activation" or "sigma")


J_RESULTS = Path(__file__).with_name("j_results.json")  # J's values with their provenance (GON-SPEC 8)
_J = json.loads(J_RESULTS.read_text())


def _j(table: str, row: str) -> dict:
    """J's (train, test) per dataset of one row (the table's columns; None where J has no value)."""
    return {dataset: None if pair is None else tuple(pair) for dataset, pair in _J["values"][table][row].items()}


def _ablation(name: str, group: str, **settings) -> Row:
    label = {"activation": f"activation {settings.get('activation', 'elu')}",
             "sigma": f"sigma {settings.get('latent_sigma', 0)}"}[group]
    return Row("ablations", name, label, "gon", {"mnist": None}, settings, epochs=50, metric="loss", group=group)


# The rows of GON-SPEC 8 (J's values: j_results.json) and 9 (settings of the ablations).
ROWS: tuple[Row, ...] = (
    Row("table1", "gon", "GON (16, 256)", "gon", _j("table1", "gon")),
    Row("table1", "gon_detached", "GON detached (16, 256)", "gon", _j("table1", "gon_detached"), {"detach": True}),
    Row("table1", "gon_32_256", "GON (32, 256)", "gon", _j("table1", "gon_32_256"), {"ngf": 32}),
    Row("table1", "gon_16_512", "GON (16, 512)", "gon", _j("table1", "gon_16_512"), {"nz": 512}),
    Row("table1", "ae", "Conv AE (16, 256)", "ae", _j("table1", "ae")),
    Row("table1", "ae_32_256", "Conv AE (32, 256)", "ae", _j("table1", "ae_32_256"), {"ngf": 32}),
    Row("table2", "implicit_gon", "Implicit GON", "implicit_gon", _j("table2", "implicit_gon"), metric="mse"),
    Row("table3", "vgon", "V-GON (16, 256)", "vgon", _j("table3", "vgon")),
    Row("table3", "vae_8_256", "VAE (8, 256)", "vae", _j("table3", "vae_8_256"), {"ngf": 8}),
    Row("table3", "vae", "VAE (16, 256)", "vae", _j("table3", "vae")),
    _ablation("elu", "activation"),
    _ablation("relu", "activation", activation="relu"),
    _ablation("selu", "activation", activation="selu"),
    _ablation("sigma_0", "sigma"),
    _ablation("sigma_0.01", "sigma", latent_sigma=0.01),
    _ablation("sigma_0.1", "sigma", latent_sigma=0.1),
    _ablation("sigma_1", "sigma", latent_sigma=1.0),
)
ROW_NAMES = tuple(dict.fromkeys(row.name for row in ROWS))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (row, dataset, seed) of a table."""

    row: Row
    dataset: str
    seed: int

    @property
    def schedule_epochs(self) -> int:
        """The spec's schedule for this cell (GON-SPEC 5, 9)."""
        return self.row.epochs or Config(model=self.row.model, dataset=self.dataset).epochs

    @property
    def folder(self) -> Path:
        """The cell's own place under the results folder: <table>/<row>/<dataset>/seed<k>."""
        return Path(self.row.table, self.row.name, self.dataset, f"seed{self.seed}")

    @property
    def j(self) -> tuple[float, float] | None:
        return self.row.j[self.dataset]

    def target_epochs(self, max_epochs: int | None = None) -> int:
        return self.schedule_epochs if max_epochs is None else min(self.schedule_epochs, max_epochs)

    def config(self, epochs: int | None = None, **data_flags) -> Config:
        """The run's Config: the model's defaults for the dataset (GON-SPEC 5), the row's settings, the seed."""
        return Config(model=self.row.model, dataset=self.dataset, epochs=epochs or self.schedule_epochs,
                      seed=self.seed, **self.row.settings, **data_flags).validate()


def run_key(cell: Cell) -> Config:
    """What makes two cells the same computation: the config less the schedule and where the data lives."""
    return dataclasses.replace(cell.config(), epochs=1)


def _choose(kind: str, given: Iterable[str] | None, choices: Sequence[str]) -> tuple[str, ...]:
    if given is None:
        return tuple(choices)
    given = tuple(given)
    unknown = [g for g in given if g not in choices]
    if unknown:
        raise UsageError(f"unknown {kind} {', '.join(map(repr, unknown))}; choose from {', '.join(choices)}")
    return given


def plan(tables: Iterable[str] | None = None, datasets: Iterable[str] | None = None,
         rows: Iterable[str] | None = None, seeds: Sequence[int] = (0,)) -> list[Cell]:
    """The cells of the chosen tables, datasets and rows (default: all of GON-SPEC 8 and 9), for every seed,
    in table order."""
    tables = _choose("table", tables, TABLES)
    datasets = _choose("dataset", datasets, DATASETS)
    rows = _choose("row", rows, ROW_NAMES)
    cells = [Cell(row, dataset, seed) for row in ROWS if row.table in tables and row.name in rows
             for dataset in row.j if dataset in datasets for seed in seeds]
    if not cells:
        raise UsageError("no cell of the spec's tables matches this choice of --table, --datasets and --rows")
    return cells


def run_folder(cell: Cell) -> Path:
    """The folder that trains `cell`: its own, or that of the first cell in table order that is the same
    computation (the ablations' ELU / sigma-0 runs are Table 1's GON (16, 256) on MNIST)."""
    key = run_key(cell)
    for other in plan(datasets=[cell.dataset], seeds=[cell.seed]):
        if run_key(other) == key:
            return other.folder
    return cell.folder


# ---------------------------------------------------------------------------------------------------- reading runs

def read_records(run: Path) -> list[dict]:
    """The metric records of a run folder in step order ([] when it has none; a torn last line is ignored)."""
    records, _ = files.read_jsonl(Path(run) / "metrics.jsonl")
    return sorted((r for r in records if isinstance(r, dict) and "step" in r), key=lambda r: r["step"])


def epoch_records(records: Sequence[dict], up_to: int) -> list[dict]:
    """Records of whole epochs 0..up_to (mid-epoch records of --max-steps runs left out)."""
    return [r for r in records if float(r["epoch"]).is_integer() and r["epoch"] <= up_to]


def read_status(results: Path) -> dict:
    """Why cells could not run, as the suite recorded it: {"datasets": {name: why}, "runs": {folder: why}}."""
    file = Path(results) / STATUS_FILE
    try:
        status = json.loads(file.read_text()) if file.is_file() else {}
        if not (isinstance(status, dict) and all(isinstance(status.get(k, {}), dict) for k in ("datasets", "runs"))):
            raise ValueError("not a status object")
    except (ValueError, UnicodeDecodeError) as error:
        raise UsageError(f"{file} is damaged ({error}); remove it (it only records why cells could not run) and "
                         "rerun") from None
    return {"datasets": status.get("datasets", {}), "runs": status.get("runs", {})}


def update_status(results: Path, datasets: dict | None = None, runs: dict | None = None) -> dict:
    """Record why datasets / run folders could not run ({name: why}; None clears an entry) and return the whole
    status. Read, changed and written under an exclusive lock, so suites running side by side on one results
    folder (one queue per core) keep each other's entries."""
    results = Path(results)
    with open(results / f".{STATUS_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status = read_status(results)
        for part, changes in (("datasets", datasets), ("runs", runs)):
            for name, why in (changes or {}).items():
                if why is None:
                    status[part].pop(name, None)
                else:
                    status[part][name] = why
        files.write_atomic(results / STATUS_FILE, json.dumps(status, indent=2, sort_keys=True) + "\n")
    return status


@dataclasses.dataclass(frozen=True)
class CellResult:
    """What one seed of one cell reached: its values at the cell's epoch (or the latest before it)."""

    cell: Cell
    run: str  # the run folder, relative to the results folder
    status: str  # finished, capped, partial, not started, no data, failed
    target_epochs: int
    epoch: int | None = None
    train: float | None = None
    test: float | None = None
    hours: float | None = None
    message: str = ""
    curve: tuple = ()  # ((epoch, train, test), ...) up to the cell's epoch
    source: str = ""  # "" (a run folder, or its archived copy) or "report of <date>" (only an earlier report has it)

    def as_json(self) -> dict:
        j = self.cell.j
        return {"table": self.cell.row.table, "row": self.cell.row.name, "label": self.cell.row.label,
                "dataset": self.cell.dataset, "seed": self.cell.seed, "run": self.run, "status": self.status,
                "message": self.message, "metric": self.cell.row.metric, "epoch": self.epoch,
                "target_epochs": self.target_epochs, "schedule_epochs": self.cell.schedule_epochs,
                "train": self.train, "test": self.test, "hours": self.hours,
                "j_train": j[0] if j else None, "j_test": j[1] if j else None, "source": self.source}

    @classmethod
    def from_json(cls, cell: Cell, entry: dict, written: str) -> CellResult:
        """A cell as an earlier report's results.json gave it (its last point only)."""
        epoch, train, test = entry["epoch"], entry["train"], entry["test"]
        return cls(cell, entry["run"], entry["status"], entry["target_epochs"], epoch, train, test, entry["hours"],
                   curve=((epoch, train, test),), source=entry.get("source") or f"report of {written}")


def cell_result(cell: Cell, results: Path, max_epochs: int | None = None, status: dict | None = None,
                archive: Path | None = None, earlier: dict | None = None) -> CellResult:
    """Read `cell` from its run folder under `results`, or from the archived copy under `archive` or the earlier
    report's entry (`earlier`, keyed by `_key`) where one of those reached a later epoch. A cap (`max_epochs`)
    limits what trains, not what is read: a run that went further (another worker's, uncapped) is read as far as
    it went, up to the cell's schedule; one stopped at the cap is "capped"."""
    status = status or read_status(results)
    folder = run_folder(cell)
    target = cell.target_epochs(max_epochs)
    records = max((epoch_records(read_records(Path(source) / folder), cell.schedule_epochs)
                   for source in (results, archive) if source is not None),
                  key=lambda found: found[-1]["epoch"] if found else -1)
    before = (earlier or {}).get(_key(cell))
    if before is not None and before.epoch is not None and before.epoch > (records[-1]["epoch"] if records else -1):
        return before
    if not records:
        if cell.dataset in status["datasets"]:
            return CellResult(cell, str(folder), "no data", target, message=status["datasets"][cell.dataset])
        failed = status["runs"].get(str(folder))
        return CellResult(cell, str(folder), "failed" if failed else "not started", target, message=failed or "")
    metric = cell.row.metric
    last = records[-1]
    seconds = last.get("seconds", 0.0) + sum(r.get("eval_seconds", 0.0) for r in records)
    if last["epoch"] >= cell.schedule_epochs:
        state = "finished"
    elif last["epoch"] == target:
        state = "capped"
    else:
        state = "failed" if str(folder) in status["runs"] else "partial"
    curve = tuple((int(r["epoch"]), r[f"train_{metric}"], r[f"test_{metric}"]) for r in records)
    return CellResult(cell, str(folder), state, target, int(last["epoch"]), last[f"train_{metric}"],
                      last[f"test_{metric}"], seconds / 3600, status["runs"].get(str(folder), ""), curve)


def _key(cell: Cell) -> tuple:
    return cell.row.table, cell.row.name, cell.dataset, cell.seed


def read_earlier(out: Path) -> dict:
    """The cells of the report already in `out` (its results.json), by `_key`: {} when there is none. Whatever
    --max-epochs either report was written with: a cap limits training, never what a report reads, so a capped
    worker's report carries every measurement of the one before it."""
    file = Path(out) / "results.json"
    if not file.is_file():
        return {}
    try:
        document = json.loads(file.read_text())
        rows = {(row.table, row.name): row for row in ROWS}
        earlier = {}
        for entry in document["cells"]:
            row = rows.get((entry.get("table"), entry.get("row")))
            if row is None or entry.get("dataset") not in row.j or entry.get("epoch") is None:
                continue
            cell = Cell(row, entry["dataset"], int(entry["seed"]))
            earlier[_key(cell)] = CellResult.from_json(cell, entry, document.get("written", "an earlier date"))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        # Its cells may be the only copy of some measurements: refuse to write over it rather than drop them.
        raise UsageError(f"{file} is not a readable report ({type(error).__name__}: {error}); restore it (e.g. git "
                         "checkout) or move it aside, then rerun") from None
    return earlier


def seeds_on_disk(results: Path, cell: Cell) -> set[int]:
    """Seeds that have a run folder for this cell's row and dataset."""
    parent = Path(results) / run_folder(cell).parent
    return {int(p.name[4:]) for p in parent.glob("seed*") if p.name[4:].isdigit()} if parent.is_dir() else set()


def collect(cells: Sequence[Cell], results: Path, max_epochs: int | None = None, archive: Path | None = None,
            earlier: dict | None = None) -> list[CellResult]:
    """Every seed known for each planned cell's row and dataset (a run folder under `results` or `archive`, or an
    earlier report's entry), each read where it got furthest; a cell with no seed known at all is listed as itself
    (not started, or its dataset missing). A planned seed that is not known is not a seed of the cell: a suite
    started with --seeds 1 on one row does not add an unstarted seed 1 to every other cell of its report."""
    status = read_status(results)
    earlier = earlier or {}
    wanted, seen = [], set()
    for cell in cells:
        known = seeds_on_disk(results, cell) | (seeds_on_disk(archive, cell) if archive else set())
        known |= {key[3] for key in earlier if key[:3] == _key(cell)[:3]}
        for seed in sorted(known or {cell.seed}):
            other = Cell(cell.row, cell.dataset, seed)
            if _key(other) not in seen:
                seen.add(_key(other))
                wanted.append(other)
    return [cell_result(cell, results, max_epochs, status, archive, earlier) for cell in wanted]


ARCHIVED_FILES = ("metrics.jsonl", "train_metrics.jsonl", "config.json", "data.json")


def archive_runs(read: Sequence[CellResult], results: Path, archive: Path) -> list[Path]:
    """Copy each read run's metrics, config and data description from `results` into `archive/<run>/`, unless
    the copy there already reaches a later epoch (a restarted run never shortens what was archived); for a run
    that has not reached its schedule, also its latest checkpoint (`archive/<run>/checkpoints/<step>/`, a few MB,
    replacing an older one), so a machine that loses the run folders resumes it (`restore_from_archive`). Whether
    a run has reached its schedule is read from its own records, not from the cell's reported value: a rerun of a
    cell the report still shows from an earlier report (†) keeps its checkpoint too."""
    copied = []
    for run, schedule in {r.run: r.cell.schedule_epochs for r in read}.items():
        source, target = Path(results) / run, Path(archive) / run
        fresh = epoch_records(read_records(source), float("inf"))
        written = archive_run_files(source, target, fresh)
        if not written:
            continue
        copied += written
        unfinished = fresh[-1]["epoch"] < schedule
        latest = _latest_checkpoint(source) if unfinished else None
        archived = _latest_checkpoint(target)
        if latest is not None and (archived is None or latest.name != archived.name):
            (target / "checkpoints").mkdir(exist_ok=True)
            with files.atomic_output(target / "checkpoints" / latest.name, folder=True) as partial:
                shutil.copytree(latest, partial, dirs_exist_ok=True)
            copied.append(target / "checkpoints" / latest.name)
        if not unfinished or latest is not None:  # keep only the newest; none once the run is finished
            for old in (target / "checkpoints").glob("*"):
                if latest is None or old.name != latest.name:
                    shutil.rmtree(old)
    return copied


def archive_run_files(source: Path, target: Path, fresh: Sequence[dict] | None = None) -> list[Path]:
    """Copy a run folder's ARCHIVED_FILES into `target`, unless the copy there already reaches a later epoch (a
    restarted run never shortens what was archived). `fresh`: the source's epoch records, when read already.
    Returns the files written ([] when none)."""
    if fresh is None:
        fresh = epoch_records(read_records(source), float("inf"))
    kept = epoch_records(read_records(target), float("inf"))
    if not fresh or (kept and kept[-1]["epoch"] > fresh[-1]["epoch"]):
        return []
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ARCHIVED_FILES:
        if (source / name).is_file():
            files.write_atomic(target / name, (source / name).read_text())
            written.append(target / name)
    return written


def _latest_checkpoint(run: Path) -> Path | None:
    """The newest complete orbax checkpoint folder of a run folder (checkpoints/<step>/), or None."""
    steps = [p for p in (Path(run) / "checkpoints").glob("*") if p.name.isdigit() and p.is_dir()]
    return max(steps, key=lambda p: int(p.name), default=None)


def restore_from_archive(results: Path, folder: Path, archive: Path) -> int | None:
    """Seed the run folder `results/folder` from the archived copy under `archive` when the archive holds a
    checkpoint and the run folder holds none (a new machine): its files and that checkpoint are copied, and the
    trainer resumes from it. Returns the step restored, or None when there was nothing to do."""
    source, target = Path(archive) / folder, Path(results) / folder
    checkpoint = _latest_checkpoint(source)
    if checkpoint is None or _latest_checkpoint(target) is not None:
        return None
    if (target / "config.json").is_file() and (target / "config.json").read_text() != (
            source / "config.json").read_text():
        return None  # another run lives there: the trainer's own check refuses it
    target.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    shutil.copytree(checkpoint, target / "checkpoints" / checkpoint.name)
    return int(checkpoint.name)


# ------------------------------------------------------------------------------------------------------ the report

@dataclasses.dataclass(frozen=True)
class Summary:
    """One table cell over its seeds, read at one epoch: the lowest all of them reached, or, when some finished the
    cell's schedule and others not yet, its end over those that did (`behind` are the others)."""

    row: Row
    dataset: str
    results: tuple[CellResult, ...]
    epoch: int | None
    train: tuple[float, float | None] | None  # (mean, sd over seeds or None for one seed)
    test: tuple[float, float | None] | None
    hours: float | None
    behind: tuple[CellResult, ...] = ()  # seeds still short of the target, left out of the values

    @property
    def seeds(self) -> int:
        """The seeds with a measurement (all of them while none has one)."""
        return sum(r.epoch is not None for r in self.results) or len(self.results)

    @property
    def status(self) -> str:
        states = {r.status for r in self.results}
        for state in ("failed", "no data", "not started", "partial", "capped"):
            if state in states:
                return state
        return "finished"

    def difference(self) -> tuple[float, float] | None:
        """(ours - J) / J for train and test."""
        j = self.row.j[self.dataset]
        if j is None or self.train is None:
            return None
        return (self.train[0] - j[0]) / j[0], (self.test[0] - j[1]) / j[1]


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(results: Sequence[CellResult]) -> list[Summary]:
    """Group seeds of the same cell; values are taken at the lowest epoch every seed reached, or at the end of the
    schedule over the seeds that finished it while the others are still short of it (named, not averaged in). The
    bar is the spec's schedule, never a --max-epochs cap: a seed stopped at a worker's cap has not finished, so a
    capped worker's report reads a cell as an uncapped one does."""
    groups: dict[tuple, list[CellResult]] = {}
    for result in results:
        groups.setdefault((result.cell.row.table, result.cell.row.name, result.cell.dataset), []).append(result)
    summaries = []
    for group in groups.values():
        row, dataset = group[0].cell.row, group[0].cell.dataset
        started = [r for r in group if r.epoch is not None]
        if not started:
            summaries.append(Summary(row, dataset, tuple(group), None, None, None, None))
            continue
        reached = [r for r in started if r.epoch >= r.cell.schedule_epochs]
        chosen = reached if reached else started
        behind = tuple(r for r in started if r not in chosen)
        epoch = min(r.epoch for r in chosen)
        # a seed known only from an earlier report has its last point alone; it counts where it has this epoch
        at = [point for r in chosen for point in r.curve if point[0] == epoch]
        summaries.append(Summary(row, dataset, tuple(group), epoch, _mean_sd([p[1] for p in at]),
                                 _mean_sd([p[2] for p in at]), statistics.fmean(r.hours for r in chosen), behind))
    return summaries


def _number(value: float) -> str:
    return f"{value:.4g}"


def _with_sd(pair: tuple[float, float | None]) -> str:
    mean, sd = pair
    return _number(mean) if sd is None else f"{_number(mean)} ± {sd:.2g}"


def _percent(value: float) -> str:
    return f"{value * 100:+.0f}%"


def _hours(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def format_cell(summary: Summary) -> str:
    """One table cell in markdown: ours, J's, the difference, the epoch against the schedule, hours, seeds."""
    j = summary.row.j[summary.dataset]
    j_text = f"J {j[0]:g} / {j[1]:g}" if j else "J -"
    schedule = summary.results[0].cell.schedule_epochs
    if summary.epoch is None:
        why = {"no data": "no data", "failed": "failed", "not started": "not run"}[summary.status]
        return "<br>".join([f"*{why}*", j_text])
    lines = [f"**{_with_sd(summary.train)} / {_with_sd(summary.test)}**", j_text]
    difference = summary.difference()
    if difference:
        lines.append(" / ".join(map(_percent, difference)))
    seeds = f", {summary.seeds} seeds" if summary.seeds > 1 else ""
    if summary.behind:
        short = ", ".join(f"seed {r.cell.seed} at {r.epoch}/{schedule}" for r in summary.behind)
        seeds = f", {summary.seeds - len(summary.behind)} of {summary.seeds} seeds ({short})"
    carried = " †" if any(r.source for r in summary.results) else ""
    lines.append(f"{summary.epoch}/{schedule} ep, {_hours(summary.hours)}{seeds}"
                 + (" (failed)" if summary.status == "failed" else "") + carried)
    return "<br>".join(lines)


def _table_markdown(table: str, summaries: Sequence[Summary]) -> list[str]:
    mine = [s for s in summaries if s.row.table == table]
    datasets = [d for d in DATASETS if any(s.dataset == d for s in mine)]
    rows = list(dict.fromkeys(s.row for s in mine))
    lines = ["| model | " + " | ".join(DATASET_TITLES[d] for d in datasets) + " |",
             "|---" * (len(datasets) + 1) + "|"]
    for row in rows:
        cells = []
        for dataset in datasets:
            found = [s for s in mine if s.row == row and s.dataset == dataset]
            cells.append(format_cell(found[0]) if found else "")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return lines


def _ablation_markdown(summaries: Sequence[Summary]) -> list[str]:
    lines = []
    for group in ("activation", "sigma"):
        mine = [s for s in summaries if s.row.table == "ablations" and s.row.group == group]
        if not mine:
            continue
        lines += ["", f"**{group}**", "",
                  "| | " + " | ".join(s.row.label for s in mine) + " |", "|---" * (len(mine) + 1) + "|"]
        for name, index in (("train loss", 0), ("test loss", 1)):
            values = [("-" if s.train is None else _with_sd((s.train, s.test)[index])) for s in mine]
            lines.append(f"| {name} | " + " | ".join(values) + " |")
        lines.append("| epochs | " + " | ".join(
            f"{s.epoch if s.epoch is not None else 0}/{s.results[0].cell.schedule_epochs}" for s in mine) + " |")
        runs = ["same run as Table 1" if s.results[0].run.startswith("table1") else "own run" for s in mine]
        lines.append("| run | " + " | ".join(runs) + " |")
    return lines


def report_markdown(summaries: Sequence[Summary], max_epochs: int | None, command: str) -> str:
    """TABLES.md: every table in the seed's layout, the ablations, and the cells far from J."""
    lines = ["# Results: the tables and ablations of GON-SPEC 8 and 9", "",
             f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "Each cell: **ours train / test** (mean ± sd over seeds where there are several), J's value, the "
             "relative difference (ours - J) / J for train / test, the epoch the values are from against the "
             "spec's schedule (a cell below its schedule is unfinished), and the hours its training steps and "
             "evaluations took (compilation, pictures and checkpoints not counted). Seeds are read at the lowest "
             "epoch all of them reached, or, while some have finished and others not, over the finished ones "
             "(the cell names the others and how far they are).", "",
             f"J's values (`experiments/{J_RESULTS.name}`): {_J['source']}"]
    if max_epochs is not None:
        lines += ["", f"**Capped at {max_epochs} epochs (`--max-epochs {max_epochs}`): a quick pass, not the "
                      "spec's schedule.**"]
    for table in TABLES:
        if not any(s.row.table == table for s in summaries):
            continue
        lines += ["", f"## {TABLE_TITLES[table]}", ""]
        if table == "ablations":
            lines += ["J reports these as curves only (GON-SPEC 9): ReLU trails ELU and SELU, and sigma >= 0.1 "
                      "barely learns. Ours: the per-pixel loss of GON-SPEC 4.1 from the evaluation pass over the "
                      "train (and test) set after epoch 50. Figures: `ablation_activation.png`, "
                      "`ablation_sigma.png` (the same loss after every epoch)."]
            lines += _ablation_markdown(summaries)
        else:
            lines += _table_markdown(table, summaries)
            if any(s.row.table == table and s.epoch is not None for s in summaries):
                lines += ["", f"Figure: `{table}.png` (test metric against epoch; J's final value marked). "
                          f"Each started cell's test images beside their reconstructions at the epoch shown (and "
                          f"prior samples for the variational models, super-resolution renders for the Implicit "
                          f"GON): `pictures/{table}_<row>_<dataset>[_samples|_superres].png`."]
    far = [s for s in summaries
           if s.status == "finished" and s.difference() and max(map(abs, s.difference())) > DIFFERENCE_FLAG]
    if far:
        lines += ["", f"## Finished cells more than {DIFFERENCE_FLAG:.0%} from J", ""]
        for s in far:
            train, test = s.difference()
            lines.append(f"- {TABLE_TITLES[s.row.table].split(':')[0]}, {s.row.label}, "
                         f"{DATASET_TITLES[s.dataset]}: train {_percent(train)}, test {_percent(test)} at epoch "
                         f"{s.epoch}/{s.results[0].cell.schedule_epochs}")
    carried = [r for s in summaries for r in s.results if r.source]
    if carried:
        lines += ["", "## † Cells known from an earlier report", "",
                  "Their run folders and archived metrics are no longer there (the machine that trained them was replaced); "
                  "the values are the ones that report read from them, at the epoch shown, and the figures have "
                  "their last point only. Rerunning the suite retrains them, and a rerun that reaches further "
                  "replaces them.", ""]
        lines += list(dict.fromkeys(f"- {r.run}: {r.source}, epoch {r.epoch}/{r.cell.schedule_epochs}"
                                    for r in carried))  # one line per run and epoch (shared runs appear once)
    problems = [r for s in summaries for r in s.results if r.message]
    if problems:
        lines += ["", "## Cells that could not run", ""]
        lines += [f"- {r.run}: {r.status}: {r.message}" for r in problems]
    return "\n".join(lines) + "\n"


def write_report(cells: Sequence[Cell], results: Path, out: Path | None = None, max_epochs: int | None = None,
                 command: str = "python -m experiments.tables") -> list[CellResult]:
    """Read every cell under `results` and write TABLES.md, results.json and the figures into `out`
    (default: `results`). A report rebuilt from its own archive (`--results docs/results/runs --out docs/results`,
    a fresh clone) only reads the archive: nothing is copied or drawn into it. Returns what was read."""
    from experiments import figures  # matplotlib only when a report is drawn

    out = Path(out or results)
    out.mkdir(parents=True, exist_ok=True)
    archive = earlier = None  # a report beside its run folders reads those alone
    if out.resolve() != Path(results).resolve():
        archive, earlier = out / ARCHIVE, read_earlier(out)
    read = collect(cells, results, max_epochs, archive, earlier)  # each cell from where it got furthest
    from_archive = archive is not None and archive.resolve() == Path(results).resolve()
    if archive is not None and not from_archive:
        archive_runs(read, results, archive)
    summaries = summarize(read)
    files.write_atomic(out / "TABLES.md", report_markdown(summaries, max_epochs, command))
    document = {"max_epochs": max_epochs, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "cells": [r.as_json() for r in read]}
    files.write_atomic(out / "results.json", json.dumps(document, indent=1) + "\n")
    for table in ("table1", "table2", "table3"):
        mine = [r for r in read if r.cell.row.table == table and r.curve]
        if mine:
            figures.save_table_curves(out / f"{table}.png", mine, TABLE_TITLES[table], DATASET_TITLES)
    for group in ("activation", "sigma"):
        mine = [r for r in read if r.cell.row.table == "ablations" and r.cell.row.group == group and r.curve]
        if mine:
            figures.save_ablation_curves(out / f"ablation_{group}.png", mine, f"Ablation: {group}")
    if not from_archive:
        draw_superres(summaries, results)
    copy_pictures(summaries, results, out)
    return read


def local_seed(summary: Summary, results: Path) -> CellResult | None:
    """The first seed of a cell whose run folder is under `results` (the pictures' source), or None."""
    return next((r for r in summary.results if (Path(results) / r.run).is_dir()), None)


def draw_superres(summaries: Sequence[Summary], results: Path) -> list[Path]:
    """For each Implicit GON cell whose run folder is here, its super-resolution picture at its latest checkpoint
    (`experiments.render.draw_run_superres`: superres_<epoch>.png, drawn once per checkpointed epoch)."""
    from experiments.render import draw_run_superres

    drawn = []
    for summary in summaries:
        local = local_seed(summary, results)
        if summary.row.model != "implicit_gon" or local is None:
            continue
        run = Path(results) / local.run
        try:
            picture = draw_run_superres(run)
        except GonjaxError as error:  # no data here, a damaged checkpoint: the report goes on without it
            print(f"{run}: no super-resolution picture ({error})", flush=True)
            continue
        if picture is not None:
            drawn.append(picture)
    return drawn


PICTURES = (  # (a run's <kind>_<epoch>.png, the report's suffix, what the title says it shows)
    ("recon", "", "test images | reconstructions"),
    ("samples", "_samples", "samples from the prior"),
    ("superres", "_superres", "test images | renders at their size, 64x64, 256x256"),
)


def copy_pictures(summaries: Sequence[Summary], results: Path, out: Path) -> list[Path]:
    """The run's own pictures at each table cell's epoch, or the latest drawn before it (the first seed whose run
    folder is here): the first test batch beside its reconstructions, prior samples where the model has them and
    super-resolution renders for the Implicit GON (`PICTURES`), redrawn under a title that says the model,
    dataset, seed, epoch against the schedule and the test error at that epoch, into
    out/pictures/<table>_<row>_<dataset>[_<kind>].png."""
    from experiments import figures

    copied = []
    for summary in summaries:
        if summary.epoch is None or summary.row.table == "ablations":
            continue
        first = local_seed(summary, results)
        if first is None:  # known from the archive or an earlier report only: keep the picture it left
            continue
        run = Path(results) / first.run
        tests = {epoch: test for epoch, _, test in first.curve}
        metric = UNITS[summary.row.metric]
        for kind, suffix, what in PICTURES:
            drawn = [int(p.stem.split("_")[1]) for p in run.glob(f"{kind}_*.png") if p.stem.split("_")[1].isdigit()]
            drawn = [epoch for epoch in drawn if epoch <= summary.epoch]  # runs draw at some epochs only
            epoch = max(drawn, default=summary.epoch)
            source = run / f"{kind}_{epoch}.png"
            if source.is_file():
                target = out / "pictures" / f"{summary.row.table}_{summary.row.name}_{summary.dataset}{suffix}.png"
                target.parent.mkdir(exist_ok=True)
                error = f", test {metric} {tests[epoch]:.4g}" if epoch in tests else ""
                schedule = first.cell.schedule_epochs
                state = "" if epoch >= schedule else " (unfinished)"
                title = (f"{summary.row.label}, {DATASET_TITLES[summary.dataset]}, seed {first.cell.seed}: "
                         f"{what}, epoch {epoch}/{schedule}{state}{error}")
                with files.atomic_output(target) as partial:
                    figures.save_titled_picture(source, partial, title)
                copied.append(target)
    return copied
