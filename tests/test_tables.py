"""The results suite's CLI (experiments.tables) as a user runs it, and --seeds on the training CLIs."""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, run_main
from experiments import suite


def _tables(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "experiments.tables", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_suite_runs_survives_missing_data_and_resumes_after_a_kill(shared_data, tfds_dir, tmp_path):
    out = tmp_path / "results"
    args = ["--table", "1", "--datasets", "coil20,cifar10", "--rows", "gon,gon_detached", "--max-epochs", "1",
            "--results", out, "--manual-dir", shared_data, "--data-dir", tfds_dir]
    first = _tables(*args)
    for line in first.stdout:  # stop the suite once the first cell is finished and the second one starts
        if line.startswith("[4/4]"):
            first.send_signal(signal.SIGTERM)
            break
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 130, stderr[-3000:]
    assert "cifar10: no data" in stderr
    gon_run, detached_run = out / "table1/gon/coil20/seed0", out / "table1/gon_detached/coil20/seed0"
    assert [r["epoch"] for r in _records(gon_run)] == [0, 1]
    finished = (gon_run / "metrics.jsonl").read_bytes()
    checkpoints = sorted(p.name for p in (gon_run / "checkpoints").iterdir())
    report = json.loads((out / "results.json").read_text())  # written on the way out of the interrupted pass
    status = {(c["row"], c["dataset"]): c["status"] for c in report["cells"] if c["table"] == "table1"}
    assert status["gon", "coil20"] == "capped" and status["gon", "cifar10"] == "no data"

    again = run_main("tables", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[2/4] table1/gon/coil20/seed0: done" in again.stdout
    assert (gon_run / "metrics.jsonl").read_bytes() == finished  # a finished cell is not trained again
    assert sorted(p.name for p in (gon_run / "checkpoints").iterdir()) == checkpoints
    assert [r["epoch"] for r in _records(detached_run)] == [0, 1]

    report = json.loads((out / "results.json").read_text())
    assert len(report["cells"]) == len(suite.plan())  # the whole report: the choice picks what trains, not that
    cells = {(c["row"], c["dataset"]): c for c in report["cells"] if c["table"] == "table1"
             and c["row"] in ("gon", "gon_detached") and c["dataset"] in ("coil20", "cifar10")}
    assert report["max_epochs"] == 1 and len(cells) == 4
    assert {c["status"] for c in report["cells"] if c["dataset"] == "cifar10"} == {"no data"}
    assert {c["status"] for c in report["cells"] if c["dataset"] in ("mnist", "fashion_mnist")} == {"not started"}
    assert {k: cells["gon", "coil20"][k] for k in ("status", "epoch", "target_epochs", "schedule_epochs")} == \
        {"status": "capped", "epoch": 1, "target_epochs": 1, "schedule_epochs": 500}
    assert cells["gon", "coil20"]["test"] == _records(gon_run)[1]["test_sse"]
    assert (cells["gon_detached", "coil20"]["j_train"], cells["gon_detached", "coil20"]["j_test"]) == (4.428, 5.410)
    assert cells["gon_detached", "cifar10"]["status"] == "no data"
    text = (out / "TABLES.md").read_text()
    assert "Capped at 1 epochs" in text and "1/500 ep" in text and "*no data*" in text
    assert (out / "table1.png").stat().st_size > 10_000

    (out / "TABLES.md").unlink()
    rebuilt = run_main("tables", "--report", *args)
    assert rebuilt.returncode == 0 and "2 capped, 9 no data" in rebuilt.stdout, rebuilt.stderr
    assert (out / "TABLES.md").read_text().split("\n", 3)[3] == text.split("\n", 3)[3]  # same but for the date


def test_a_cell_another_queue_is_training_is_skipped_not_failed(shared_data, tfds_dir, tmp_path):
    """Two queues side by side that both list a cell: the one that finds its folder locked skips it (exit 0, one
    line), and the report does not call the cell failed."""
    import fcntl

    out = tmp_path / "results"
    folder = out / "table1/gon/coil20/seed0"
    folder.mkdir(parents=True)
    with open(folder / ".lock", "a+") as held:  # the other queue's trainer holds the run folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("process 12345 on elsewhere\n")
        held.flush()
        result = run_main("tables", "--table", "1", "--datasets", "coil20", "--rows", "gon", "--max-epochs", "1",
                          "--results", out, "--manual-dir", shared_data, "--data-dir", tfds_dir)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "seed0" in line]
    assert len(lines) == 1 and "skipped, " in lines[0] and "in use by process 12345 on elsewhere" in lines[0]
    assert not (folder / "metrics.jsonl").exists()
    cell, = [c for c in json.loads((out / "results.json").read_text())["cells"]
             if c["run"] == "table1/gon/coil20/seed0"]
    assert cell["status"] != "failed" and "failed" not in (out / "TABLES.md").read_text()


def test_dry_run_lists_cells_with_hours_and_trains_nothing(tmp_path):
    out = tmp_path / "results"
    started = out / "table3/vae_8_256/coil20/seed0"  # a started run: its speed comes from its own records
    started.mkdir(parents=True)
    (started / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "step": 18 * e, "seconds": 2.0 * e, "eval_seconds": 0.5}) + "\n" for e in range(13)))
    run = run_main("tables", "--dry-run", "--table", "1", "--table", "3", "--datasets", "coil20", "--rows",
                   "gon,vae_8_256", "--results", out)
    assert run.returncode == 0, run.stderr[-3000:]
    stdout = run.stdout
    lines = {line.split()[0]: line.split() for line in stdout.splitlines()[1:-1]}
    assert set(lines) == {"table1/gon/coil20/seed0", "table3/vae_8_256/coil20/seed0"}
    assert lines["table1/gon/coil20/seed0"][1:3] == ["500/500", "0"]
    assert float(lines["table1/gon/coil20/seed0"][4]) > 0 and lines["table1/gon/coil20/seed0"][5] == "from"
    # 12 of 1000 epochs done at 2.5 s each: 988 * 2.5 s left.
    assert lines["table3/vae_8_256/coil20/seed0"][1:5] == ["1000/1000", "12", "2.5", f"{988 * 2.5 / 3600:.2f}"]
    assert "2 cells, 2 runs" in stdout.splitlines()[-1]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["metrics.jsonl"]  # nothing written


@pytest.mark.parametrize("args, fragment", [
    (["--rows", "gonn"], "unknown row 'gonn'"),
    (["--datasets", "svhn"], "unknown dataset 'svhn'"),
    (["--table", "2", "--datasets", "cifar10"], "no cell"),
    (["--max-epochs", "0"], "--max-epochs must be at least 1"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--seeds", "1,1"], "seeds must be distinct"),
    (["--dry-run", "--report"], "not allowed with"),
])
def test_bad_flags_are_one_line_errors(args, fragment, tmp_path):
    result = run_main("tables", *args, "--results", tmp_path / "r")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "r").exists()


def test_training_cli_seeds_train_one_run_folder_each(shared_data, tfds_dir, tmp_path):
    workdir = tmp_path / "w"
    args = ["--dataset", "coil20", "--manual-dir", shared_data, "--data-dir", tfds_dir, "--ngf", "4", "--nz", "8",
            "--max-steps", "1", "--workdir", workdir]
    assert run_main("gon", *args, "--seeds", "3,1").returncode == 0
    configs = {p.name: json.loads((p / "config.json").read_text()) for p in workdir.iterdir()}
    assert {name: c["seed"] for name, c in configs.items()} == {"seed3": 3, "seed1": 1}
    losses = {name: _records(workdir / name)[0]["train_loss"] for name in configs}
    assert losses["seed3"] != losses["seed1"]  # different inits
    both = run_main("gon", *args, "--seed", "1", "--seeds", "0,1")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_a_report_archive_carries_an_unfinished_run_to_a_new_machine(shared_data, tfds_dir, tmp_path):
    """`--out` keeps each unfinished run's latest checkpoint in its runs/; a suite whose --results folder was lost
    (a replaced machine) resumes the run from there and ends where an uninterrupted run ends, bit for bit."""
    common = ["--table", "1", "--datasets", "coil20", "--rows", "ae", "--manual-dir", shared_data,
              "--data-dir", tfds_dir, "--out", tmp_path / "report"]
    first = run_main("tables", *common, "--max-epochs", 1, "--results", tmp_path / "lost")
    assert first.returncode == 0, first.stderr[-3000:]
    archived = tmp_path / "report/runs/table1/ae/coil20/seed0"
    assert sorted(p.name for p in (archived / "checkpoints").iterdir()) == ["18"]  # 1 epoch of 18 steps
    assert {"metrics.jsonl", "train_metrics.jsonl", "config.json", "data.json"} <= {p.name for p in archived.iterdir()}

    resumed = run_main("tables", *common, "--max-epochs", 2, "--results", tmp_path / "new")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "restored from" in resumed.stdout and "at step 18" in resumed.stdout
    straight = run_main("tables", "--table", "1", "--datasets", "coil20", "--rows", "ae", "--manual-dir",
                        shared_data, "--data-dir", tfds_dir, "--max-epochs", 2, "--results", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    timing = ("seconds", "per_s", "mean_step_loss")
    strip = lambda rs: [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rs]  # noqa: E731
    run = "table1/ae/coil20/seed0"
    assert strip(_records(tmp_path / "new" / run)) == strip(_records(tmp_path / "straight" / run))
    assert [r["epoch"] for r in _records(tmp_path / "new" / run)] == [0, 1, 2]
    assert sorted(p.name for p in (archived / "checkpoints").iterdir()) == ["36"]  # still short of 500: kept, newer


def test_two_workers_on_one_results_folder_take_disjoint_cells_and_write_one_report(shared_data, tfds_dir, tmp_path):
    """The documented way to scale the suite (docs/cli.md): N workers started with the same command share the
    cells through the run folders' locks; no cell is trained twice, nothing is lost, one report holds them all."""
    out = tmp_path / "results"
    args = ["--table", "1", "--datasets", "coil20", "--rows", "gon,ae,ae_32_256", "--max-epochs", "1",
            "--results", out, "--manual-dir", shared_data, "--data-dir", tfds_dir]
    workers = [_tables(*args) for _ in range(2)]
    outputs = [worker.communicate(timeout=900) for worker in workers]
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    folders = [f"table1/{row}/coil20/seed0" for row in ("gon", "ae", "ae_32_256")]

    def trained(stdout, stderr):  # folders this worker trained: started, and not skipped or found finished
        return {f for f in folders if f"{f}: training to epoch" in stdout and f"{f}: skipped" not in stderr
                and f"{f}: this run already finished" not in stdout}

    mine = [trained(*output) for output in outputs]
    assert not mine[0] & mine[1], mine
    assert mine[0] | mine[1] == set(folders), mine
    for folder in folders:  # each trained once: one evaluation per epoch, one checkpoint per evaluation
        assert [r["epoch"] for r in _records(out / folder)] == [0, 1]
    report = run_main("tables", *args, "--report")
    assert report.returncode == 0, report.stderr[-3000:]
    cells = [c for c in json.loads((out / "results.json").read_text())["cells"] if c["status"] != "not started"]
    assert sorted(c["run"] for c in cells) == sorted(folders) and {c["status"] for c in cells} == {"capped"}
