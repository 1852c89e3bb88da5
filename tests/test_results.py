"""The results suite's plan and report (experiments.suite), against hand-written expectations of GON-SPEC 8 and 9
and a fixture results folder of hand-written metrics.jsonl files."""
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from conftest import REPO
from experiments import suite
from gonjax.errors import UsageError

# GON-SPEC 8 and 9, written out by hand: (table, row) -> (datasets, epochs per dataset, Config fields).
ALL4 = ("mnist", "fashion_mnist", "cifar10", "coil20")
EXPECTED_ROWS = {
    ("table1", "gon"): (ALL4, 500, {"model": "gon", "ngf": 16, "nz": 256, "detach": False}),
    ("table1", "gon_detached"): (ALL4, 500, {"model": "gon", "ngf": 16, "nz": 256, "detach": True}),
    ("table1", "gon_32_256"): (ALL4, 500, {"model": "gon", "ngf": 32, "nz": 256}),
    ("table1", "gon_16_512"): (ALL4, 500, {"model": "gon", "ngf": 16, "nz": 512}),
    ("table1", "ae"): (ALL4, 500, {"model": "ae", "ngf": 16, "nz": 256}),
    ("table1", "ae_32_256"): (ALL4, 500, {"model": "ae", "ngf": 32, "nz": 256}),
    ("table2", "implicit_gon"): (("mnist", "fashion_mnist", "coil20"), None, {"model": "implicit_gon", "nz": 32}),
    ("table3", "vgon"): (ALL4, 1000, {"model": "vgon", "ngf": 16, "nz": 256}),
    ("table3", "vae_8_256"): (ALL4, 1000, {"model": "vae", "ngf": 8, "nz": 256}),
    ("table3", "vae"): (ALL4, 1000, {"model": "vae", "ngf": 16, "nz": 256}),
    ("ablations", "elu"): (("mnist",), 50, {"model": "gon", "activation": "elu", "latent_sigma": 0.0}),
    ("ablations", "relu"): (("mnist",), 50, {"model": "gon", "activation": "relu", "latent_sigma": 0.0}),
    ("ablations", "selu"): (("mnist",), 50, {"model": "gon", "activation": "selu", "latent_sigma": 0.0}),
    ("ablations", "sigma_0"): (("mnist",), 50, {"model": "gon", "activation": "elu", "latent_sigma": 0.0}),
    ("ablations", "sigma_0.01"): (("mnist",), 50, {"model": "gon", "activation": "elu", "latent_sigma": 0.01}),
    ("ablations", "sigma_0.1"): (("mnist",), 50, {"model": "gon", "activation": "elu", "latent_sigma": 0.1}),
    ("ablations", "sigma_1"): (("mnist",), 50, {"model": "gon", "activation": "elu", "latent_sigma": 1.0}),
}


def test_plan_lists_exactly_the_spec_cells():
    cells = suite.plan(seeds=[0, 1])
    assert Counter(c.row.table for c in cells) == {"table1": 48, "table2": 6, "table3": 24, "ablations": 14}
    assert len({(c.row.table, c.row.name, c.dataset, c.seed) for c in cells}) == len(cells) == 92
    by_row = {}
    for cell in cells:
        by_row.setdefault((cell.row.table, cell.row.name), set()).add((cell.dataset, cell.seed))
    assert set(by_row) == set(EXPECTED_ROWS)
    for key, (datasets, epochs, fields) in EXPECTED_ROWS.items():
        assert by_row[key] == {(d, s) for d in datasets for s in (0, 1)}, key
        for cell in (c for c in cells if (c.row.table, c.row.name) == key):
            config = cell.config()
            for name, value in fields.items():
                assert getattr(config, name) == value, (key, name)
            assert config.seed == cell.seed and config.batch_size == 64
            if epochs is not None:
                assert cell.schedule_epochs == config.epochs == epochs, key


def test_plan_schedules_and_rates_of_gon_spec_5():
    def config(table, row, dataset):
        return next(c for c in suite.plan([table], [dataset], [row])).config()

    assert config("table2", "implicit_gon", "mnist").epochs == 100
    assert config("table2", "implicit_gon", "fashion_mnist").epochs == 100
    coil = config("table2", "implicit_gon", "coil20")
    assert (coil.epochs, coil.lr, coil.lr_drop_epoch, coil.lr_drop_to) == (500, 1e-4, 50, 5e-5)
    assert config("table3", "vgon", "coil20").lr == 1e-3
    assert config("table3", "vgon", "mnist").lr == 2e-4
    assert config("table1", "gon", "cifar10").lr == 2e-4
    assert [c.j for c in suite.plan(["table1"], ["coil20"], ["gon", "gon_16_512"])] == [(1.378, 2.597), None]
    assert next(iter(suite.plan(["table3"], ["cifar10"], ["vae"]))).j == (35.18, 35.62)


def test_plan_filters_and_refuses_unknown_names():
    cells = suite.plan(["table1"], ["coil20"], ["gon"], seeds=[0, 1, 2])
    assert [(c.row.name, c.dataset, c.seed) for c in cells] == [("gon", "coil20", s) for s in (0, 1, 2)]
    with pytest.raises(UsageError, match="unknown row 'gonn'"):
        suite.plan(rows=["gonn"])
    with pytest.raises(UsageError, match="unknown dataset"):
        suite.plan(datasets=["svhn"])
    with pytest.raises(UsageError, match="no cell"):
        suite.plan(["table2"], ["cifar10"])


def test_identical_computations_share_one_run_folder():
    cells = suite.plan(seeds=[1])
    folders = {(c.row.table, c.row.name, c.dataset): str(suite.run_folder(c)) for c in cells}
    assert folders["ablations", "elu", "mnist"] == folders["ablations", "sigma_0", "mnist"] == "table1/gon/mnist/seed1"
    assert folders["ablations", "relu", "mnist"] == "ablations/relu/mnist/seed1"
    assert folders["table1", "gon_detached", "coil20"] == "table1/gon_detached/coil20/seed1"
    assert len(set(folders.values())) == len(cells) - 2 == 44


def _write_run(root, folder, rows, torn=False):
    path = root / folder
    path.mkdir(parents=True)
    lines = [json.dumps(dict(zip(("epoch", "step", "train_sse", "test_sse", "train_loss", "test_loss", "seconds",
                                  "eval_seconds"), row))) for row in rows]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + ('{"epoch": 3, "st' if torn else ""))


@pytest.fixture
def fixture_results(tmp_path):
    """Hand-written run folders: three finished seeds of GON on COIL-20, a partial AE, Table 1's GON on MNIST at
    epoch 60 (which holds the ablations' ELU), a finished ReLU ablation, and CIFAR-10 marked as missing."""
    for seed, (train, test) in enumerate([(1.3, 2.5), (1.4, 2.7), (1.5, 2.6)]):
        _write_run(tmp_path, f"table1/gon/coil20/seed{seed}",
                   [(0, 0, 60.0, 61.0, 0.06, 0.06, 0.0, 10.0), (250, 4500, 3.0, 4.0, 0.003, 0.004, 1000.0, 10.0),
                    (500, 9000, train, test, 0.001, 0.002, 3580.0, 10.0)], torn=seed == 1)
    _write_run(tmp_path, "table1/ae/coil20/seed0",
               [(0, 0, 60.0, 61.0, 0.06, 0.06, 0.0, 1.0), (212, 3816, 2.0, 5.0, 0.002, 0.005, 700.0, 1.0),
                (212.5, 3825, 1.0, 1.0, 0.001, 0.001, 701.0, 1.0)])
    _write_run(tmp_path, "table1/gon/mnist/seed0",
               [(e, 937 * e, 10.0 / (e + 1), 11.0 / (e + 1), 0.01 / (e + 1), 0.011 / (e + 1), 10.0 * e, 3.0)
                for e in range(61)])
    _write_run(tmp_path, "ablations/relu/mnist/seed0",
               [(e, 937 * e, 20.0 / (e + 1), 21.0 / (e + 1), 0.02 / (e + 1), 0.021 / (e + 1), 10.0 * e, 3.0)
                for e in range(51)])
    (tmp_path / suite.STATUS_FILE).write_text(json.dumps({"datasets": {"cifar10": "no official cifar10 files"}}))
    return tmp_path


def _by_cell(read):
    return {(r.cell.row.name, r.cell.dataset, r.cell.seed): r for r in read}


def test_report_reads_cells_seeds_partial_epochs_and_missing_data(fixture_results):
    cells = suite.plan(["table1", "ablations"], ["coil20", "cifar10", "mnist"], ["gon", "ae", "elu", "relu"])
    read = _by_cell(suite.collect(cells, fixture_results))
    # Seeds 1 and 2 exist on disk only: the report finds them.
    for seed, (train, test) in enumerate([(1.3, 2.5), (1.4, 2.7), (1.5, 2.6)]):
        gon = read["gon", "coil20", seed]
        assert (gon.status, gon.epoch, gon.train, gon.test) == ("finished", 500, train, test)
        assert gon.hours == pytest.approx((3580 + 30) / 3600)
    ae = read["ae", "coil20", 0]
    assert (ae.status, ae.epoch, ae.train, ae.test) == ("partial", 212, 2.0, 5.0)  # mid-epoch record left out
    assert read["gon", "cifar10", 0].status == read["ae", "cifar10", 0].status == "no data"
    assert read["gon", "mnist", 0].status == "partial" and read["gon", "mnist", 0].epoch == 60
    assert read["ae", "mnist", 0].status == "not started"
    elu = read["elu", "mnist", 0]  # Table 1's MNIST run, read at epoch 50
    assert (elu.status, elu.epoch, elu.run) == ("finished", 50, "table1/gon/mnist/seed0")
    assert elu.train == pytest.approx(0.01 / 51) and elu.test == pytest.approx(0.011 / 51)
    assert read["relu", "mnist", 0].train == pytest.approx(0.02 / 51)

    summaries = {(s.row.name, s.dataset): s for s in suite.summarize(list(read.values()))}
    gon = summaries["gon", "coil20"]
    assert gon.seeds == 3 and gon.epoch == 500
    assert gon.train[0] == pytest.approx(1.4) and gon.train[1] == pytest.approx(statistics.stdev([1.3, 1.4, 1.5]))
    assert gon.test[0] == pytest.approx(2.6) and gon.test[1] == pytest.approx(0.1)
    assert gon.difference() == pytest.approx(((1.4 - 1.378) / 1.378, (2.6 - 2.597) / 2.597))
    text = suite.format_cell(gon)
    assert "**1.4 ± 0.1 / 2.6 ± 0.1**" in text and "J 1.378 / 2.597" in text and "+2% / +0%" in text
    assert "500/500 ep, 1.0 h, 3 seeds" in text
    assert "212/500 ep" in suite.format_cell(summaries["ae", "coil20"])
    assert "no data" in suite.format_cell(summaries["gon", "cifar10"])
    assert "not run" in suite.format_cell(summaries["ae", "mnist"])


def test_a_capped_pass_reads_cells_that_went_further_in_full(fixture_results):
    """A worker capped at 100 epochs shares the results folder with uncapped ones: its report reads their cells as
    far as they went (GON COIL-20 finished at 500, the AE partial at 212), and only the cell stopped at the cap
    is capped."""
    capped = fixture_results / "table1/gon_detached/coil20/seed0"
    _write_run(fixture_results, "table1/gon_detached/coil20/seed0", [(0, 0, 9.0, 9.0, 0.1, 0.1, 0.0, 1.0),
                                                                      (100, 1800, 5.0, 6.0, 0.1, 0.1, 90.0, 1.0)])
    assert capped.is_dir()
    read = _by_cell(suite.collect(suite.plan(["table1"], ["coil20"], ["gon", "gon_detached", "ae"]),
                                  fixture_results, max_epochs=100))
    assert (read["gon", "coil20", 0].status, read["gon", "coil20", 0].epoch) == ("finished", 500)
    assert (read["gon_detached", "coil20", 0].status, read["gon_detached", "coil20", 0].epoch) == ("capped", 100)
    assert (read["ae", "coil20", 0].status, read["ae", "coil20", 0].epoch) == ("partial", 212)  # not the cap's


def test_a_capped_pass_reads_a_cell_of_finished_and_capped_seeds_as_an_uncapped_one_does(fixture_results):
    """GON COIL-20 has seeds 0-2 finished at 500; a worker capped at 20 epochs trains a seed 3 to its cap. The
    capped worker's report keeps the finished seeds' values at 500 and names seed 3 as behind; it does not read
    all four at epoch 20 (a capped pictures worker once did that to a finished cell)."""
    _write_run(fixture_results, "table1/gon/coil20/seed3", [(0, 0, 9.0, 9.0, 0.1, 0.1, 0.0, 1.0),
                                                            (20, 360, 3.0, 4.0, 0.1, 0.1, 30.0, 1.0)])
    plan = suite.plan(["table1"], ["coil20"], ["gon"], seeds=[0, 1, 2, 3])
    reports = []
    for max_epochs in (20, None):
        read = suite.collect(plan, fixture_results, max_epochs=max_epochs)
        assert {r.cell.seed: r.status for r in read} == {0: "finished", 1: "finished", 2: "finished",
                                                          3: "capped" if max_epochs else "partial"}
        summary, = suite.summarize(read)
        reports.append((summary.epoch, summary.train, summary.test, [r.cell.seed for r in summary.behind]))
    assert reports[0] == reports[1]
    assert reports[0][0] == 500 and reports[0][3] == [3]


def test_the_archive_keeps_the_checkpoint_of_a_rerun_the_report_still_reads_from_an_earlier_report(tmp_path):
    """A † cell (its finished run lost, its value kept by the earlier report) being retrained: the report reads the
    cell at 500 from the earlier report, but the rerun at epoch 2 is short of its schedule, so the archive keeps
    its latest checkpoint (a machine lost now resumes the rerun, not restarts it)."""
    results, archive = tmp_path / "results", tmp_path / "out" / "runs"
    cell = next(c for c in suite.plan(["table1"], ["coil20"], ["ae_32_256"]))
    folder = str(suite.run_folder(cell))
    _write_run(results, folder, [(0, 0, 9.0, 9.0, 0.1, 0.1, 0.0, 1.0), (2, 36, 5.0, 6.0, 0.1, 0.1, 9.0, 1.0)])
    for step in (18, 36):
        (results / folder / "checkpoints" / str(step)).mkdir(parents=True)
        (results / folder / "checkpoints" / str(step) / "state").write_text(str(step))
    earlier = suite.CellResult(cell, folder, "finished", 500, 500, 0.38, 4.11, 0.45, source="report of 2026-11-26")
    suite.archive_runs([earlier], results, archive)
    assert sorted(p.name for p in (archive / folder / "checkpoints").iterdir()) == ["36"]
    assert (archive / folder / "checkpoints" / "36" / "state").read_text() == "36"


def test_a_report_planned_for_another_seed_lists_only_the_seeds_that_exist(fixture_results):
    """A queue started with --seeds 1 writes the report of every cell with seed 1 planned: cells whose runs exist
    keep exactly their seeds (no unstarted seed 1 counted), a cell with none is listed as its planned seed."""
    read = _by_cell(suite.collect(suite.plan(["table1"], ["mnist", "coil20"], ["gon", "ae"], seeds=[1]),
                                  fixture_results))
    assert sorted(read) == [("ae", "coil20", 0), ("ae", "mnist", 1), ("gon", "coil20", 0), ("gon", "coil20", 1),
                            ("gon", "coil20", 2), ("gon", "mnist", 0)]
    summaries = {(s.row.name, s.dataset): s for s in suite.summarize(list(read.values()))}
    assert [summaries[key].seeds for key in (("gon", "mnist"), ("ae", "coil20"), ("gon", "coil20"))] == [1, 1, 3]
    assert "seeds" not in suite.format_cell(summaries["gon", "mnist"])
    assert "not run" in suite.format_cell(summaries["ae", "mnist"])
    # A seed whose folder exists but has no measurement yet is not counted beside one that has.
    waiting = suite.CellResult(suite.Cell(summaries["gon", "mnist"].row, "mnist", 1), "run1", "not started", 500)
    summary, = suite.summarize([read["gon", "mnist", 0], waiting])
    assert summary.seeds == 1 and summary.epoch == 60 and "seeds" not in suite.format_cell(summary)


def _grey_png(path, epoch: int) -> None:
    """A 40x40 picture whose grey level says which epoch it is from."""
    import matplotlib.pyplot as plt

    plt.imsave(path, np.full((40, 40), epoch / 1000), cmap="gray", vmin=0, vmax=1)


def _centre_grey(path) -> float:
    """The grey level at the centre of a picture the report redrew under a title (the title band is on top)."""
    import matplotlib.pyplot as plt

    image = plt.imread(path)
    return float(image[int(image.shape[0] * 0.6), image.shape[1] // 2, 0])


def test_write_report_files(fixture_results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    for epoch in (250, 500):  # the report redraws the run's picture at the cell's epoch
        _grey_png(fixture_results / f"table1/gon/coil20/seed0/recon_{epoch}.png", epoch)
    for epoch in (150, 200, 250):  # ... or the latest drawn before it (the AE cell is at epoch 212)
        _grey_png(fixture_results / f"table1/ae/coil20/seed0/recon_{epoch}.png", epoch)
    cells = suite.plan(["table1", "ablations"], ["coil20", "cifar10", "mnist"], ["gon", "ae", "elu", "relu"])
    suite.write_report(cells, fixture_results, out)
    assert sorted(p.name for p in (out / "pictures").iterdir()) == ["table1_ae_coil20.png", "table1_gon_coil20.png"]
    assert _centre_grey(out / "pictures/table1_gon_coil20.png") == pytest.approx(0.5, abs=0.01)
    assert _centre_grey(out / "pictures/table1_ae_coil20.png") == pytest.approx(0.2, abs=0.01)
    document = json.loads((out / "results.json").read_text())
    entries = {(c["row"], c["dataset"], c["seed"]): c for c in document["cells"]}
    assert len(entries) == len(document["cells"]) == 10  # 8 planned cells, and seeds 1 and 2 found on disk
    assert (entries["gon", "coil20", 2]["test"], entries["gon", "coil20", 2]["j_test"]) == (2.6, 2.597)
    assert {k: entries["ae", "coil20", 0][k] for k in ("epoch", "schedule_epochs", "status", "j_train", "j_test")} \
        == {"epoch": 212, "schedule_epochs": 500, "status": "partial", "j_train": 0.942, "j_test": 4.537}
    assert entries["elu", "mnist", 0]["run"] == "table1/gon/mnist/seed0"
    table = (out / "TABLES.md").read_text()
    assert "| GON (16, 256) |" in table and "| Conv AE (16, 256) |" in table
    assert "activation elu" in table and "same run as Table 1" in table
    assert "more than 15% from J" not in table  # only finished cells are compared, and GON is within 15%
    for name in ("table1.png", "ablation_activation.png"):
        assert (out / name).stat().st_size > 10_000
    assert not (out / "table3.png").exists()


def test_the_report_titles_the_implicit_gons_super_resolution_picture(tmp_path):
    """An Implicit GON cell's superres_<epoch>.png (drawn from its checkpoints, experiments.render) goes into the
    report beside its reconstructions, at the latest epoch drawn; a run without checkpoints draws none."""
    run = tmp_path / "results/table2/implicit_gon/coil20/seed0"
    run.mkdir(parents=True)
    records = [{"epoch": e, "step": 18 * e, "train_mse": 0.1 / (e + 1), "test_mse": 0.2 / (e + 1),
                "seconds": 10.0 * e, "eval_seconds": 1.0} for e in (0, 20, 40)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for epoch in (20, 40):
        _grey_png(run / f"recon_{epoch}.png", epoch)
        _grey_png(run / f"superres_{epoch}.png", 10 * epoch)
    out = tmp_path / "report"
    suite.write_report(suite.plan(["table2"], ["coil20"]), tmp_path / "results", out)
    assert sorted(p.name for p in (out / "pictures").iterdir()) == [
        "table2_implicit_gon_coil20.png", "table2_implicit_gon_coil20_superres.png"]
    assert _centre_grey(out / "pictures/table2_implicit_gon_coil20_superres.png") == pytest.approx(0.4, abs=0.01)
    assert sorted(p.name for p in run.glob("superres_*.png")) == ["superres_20.png", "superres_40.png"]


def test_a_report_rebuilt_from_its_archive_writes_nothing_into_the_archive(tmp_path, monkeypatch):
    """`--report --results docs/results/runs --out docs/results` (a fresh clone) reads the archive and rewrites the
    report only: an archived unfinished Implicit GON run (metrics and checkpoint) gets no superres_<epoch>.png
    drawn into its folder, and no archived file is rewritten; a report from the run folders does draw."""
    from experiments import render
    drawn = []

    def draw(workdir):  # what render.draw_run_superres does: a picture into the run's folder
        drawn.append(workdir)
        _grey_png(workdir / "superres_40.png", 400)
        return workdir / "superres_40.png"

    monkeypatch.setattr(render, "draw_run_superres", draw)
    results, out = tmp_path / "results", tmp_path / "report"
    run = results / "table2/implicit_gon/coil20/seed0"
    run.mkdir(parents=True)
    records = [{"epoch": e, "step": 18 * e, "train_mse": 0.1 / (e + 1), "test_mse": 0.2 / (e + 1),
                "seconds": 10.0 * e, "eval_seconds": 1.0} for e in (0, 20, 40)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "checkpoints/720").mkdir(parents=True)
    (run / "checkpoints/720/state").write_bytes(b"weights")
    cells = suite.plan(["table2"], ["coil20"])
    suite.write_report(cells, results, out)
    archive = out / suite.ARCHIVE
    assert drawn == [run] and (archive / "table2/implicit_gon/coil20/seed0/checkpoints/720/state").is_file()
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in archive.rglob("*") if p.is_file()}
    table = (out / "TABLES.md").read_text()
    suite.write_report(cells, archive, out)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in archive.rglob("*") if p.is_file()} == before
    assert len(drawn) == 1 and (out / "TABLES.md").read_text() == table
    assert (out / "pictures/table2_implicit_gon_coil20_superres.png").is_file()  # the picture it left is kept


def test_a_cells_picture_comes_from_a_seed_that_trains_here_when_seed_0_is_archived_only(tmp_path):
    """Seed 0 finished on a machine since replaced (its metrics archived, its folder gone): the picture comes from
    seed 1, which trains here, at its own latest drawn epoch; the values stay seed 0's, the finished one."""
    out, results = tmp_path / "report", tmp_path / "results"
    _write_run(out / suite.ARCHIVE, "table1/gon/mnist/seed0",
               [(e, 937 * e, 1.0 / (e + 1), 1.1 / (e + 1), 0.1, 0.1, 10.0 * e, 3.0) for e in (0, 250, 500)])
    _write_run(results, "table1/gon/mnist/seed1",
               [(e, 937 * e, 2.0 / (e + 1), 2.2 / (e + 1), 0.1, 0.1, 10.0 * e, 3.0) for e in (0, 10, 20)])
    _grey_png(results / "table1/gon/mnist/seed1/recon_20.png", 300)
    read = suite.write_report(suite.plan(["table1"], ["mnist"], ["gon"], seeds=[0, 1]), results, out)
    assert sorted(p.name for p in (out / "pictures").iterdir()) == ["table1_gon_mnist.png"]
    assert _centre_grey(out / "pictures/table1_gon_mnist.png") == pytest.approx(0.3, abs=0.01)
    summary, = suite.summarize([r for r in read if r.cell.row.name == "gon" and r.cell.dataset == "mnist"])
    assert (summary.epoch, summary.test[0]) == (500, pytest.approx(1.1 / 501))


def test_plans_models_and_inference_import_no_tfds_matplotlib_or_tqdm():
    code = ("import sys, gonjax, gonjax.zoo, gonjax.runs, gonjax.steps, gonjax.catalog, experiments.suite; "
            "gonjax.load_run, gonjax.Config, gonjax.build_steps; "
            "heavy = [m for m in ('tensorflow_datasets', 'matplotlib', 'tqdm') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_trainer_and_the_report_leave_pyplots_backend_to_the_user():
    """gonjax draws its pictures into files without pyplot: importing the trainer, the report's figures and the
    plots keeps the backend a notebook (here: MPLBACKEND=svg) chose, so its own figures still show."""
    code = ("import gonjax.train, gonjax.plots, experiments.figures, matplotlib, matplotlib.pyplot; "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "MPLBACKEND": "svg"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_report_elsewhere_archives_runs_and_never_drops_a_measurement(fixture_results, tmp_path_factory):
    """A report written to another folder (docs/results) archives every run's metrics; when the run folders are
    gone (a replaced machine) the next report reads the archive, then the earlier results.json, marked so."""
    out = tmp_path_factory.mktemp("committed")
    (fixture_results / "table1/gon/coil20/seed0/config.json").write_text('{"model": "gon"}\n')
    cells = suite.plan(["table1"], ["coil20"], ["gon", "ae"])
    suite.write_report(cells, fixture_results, out)
    archived = out / suite.ARCHIVE / "table1/gon/coil20/seed0"
    assert (archived / "config.json").read_text() == '{"model": "gon"}\n'
    assert (archived / "metrics.jsonl").read_text() == (fixture_results / "table1/gon/coil20/seed0/metrics.jsonl"
                                                       ).read_text()
    assert not list((out / suite.ARCHIVE).rglob("checkpoints"))

    # The machine is replaced: no run folders; seed 2's archive is lost too; the AE cell restarts at epoch 5.
    shutil.rmtree(out / suite.ARCHIVE / "table1/gon/coil20/seed2")
    fresh = tmp_path_factory.mktemp("fresh")
    _write_run(fresh, "table1/ae/coil20/seed0", [(0, 0, 60.0, 61.0, 0.06, 0.06, 0.0, 1.0),
                                                (5, 90, 9.0, 9.5, 0.009, 0.009, 20.0, 1.0)])
    written = json.loads((out / "results.json").read_text())["written"]
    for _ in range(2):  # a second report still carries seed 2 with the date of the report that measured it
        read = _by_cell(suite.write_report(cells, fresh, out))
        assert [(read["gon", "coil20", s].train, read["gon", "coil20", s].source) for s in range(3)] == \
            [(1.3, ""), (1.4, ""), (1.5, f"report of {written}")]
        assert len(read["gon", "coil20", 0].curve) == 3 and read["gon", "coil20", 2].curve == ((500, 1.5, 2.6),)
        ae = read["ae", "coil20", 0]
        assert (ae.epoch, ae.train, ae.source) == (212, 2.0, "")  # the archive reaches further than the restart
        assert json.loads((out / suite.ARCHIVE / "table1/ae/coil20/seed0/metrics.jsonl").read_text()
                          .splitlines()[1])["epoch"] == 212  # and is not shortened by it
    table = (out / "TABLES.md").read_text()
    assert "**1.4 ± 0.1 / 2.6 ± 0.1**" in table and "500/500 ep, 1.0 h, 3 seeds †" in table
    assert f"- table1/gon/coil20/seed2: report of {written}, epoch 500/500" in table

    # A capped worker's report (--max-epochs) in between carries seed 2 too, and so the next full report.
    suite.write_report(cells, fresh, out, max_epochs=10)
    read = _by_cell(suite.write_report(cells, fresh, out))
    assert (read["gon", "coil20", 2].train, read["gon", "coil20", 2].source) == (1.5, f"report of {written}")

    # A retrained seed 2 that reaches the same epoch replaces the carried value and is archived.
    _write_run(fresh, "table1/gon/coil20/seed2", [(0, 0, 60.0, 61.0, 0.06, 0.06, 0.0, 10.0),
                                                 (500, 9000, 1.6, 2.9, 0.001, 0.002, 3000.0, 10.0)])
    read = _by_cell(suite.write_report(cells, fresh, out))
    assert (read["gon", "coil20", 2].train, read["gon", "coil20", 2].source) == (1.6, "")
    assert (out / suite.ARCHIVE / "table1/gon/coil20/seed2/metrics.jsonl").is_file()
    assert "†" not in (out / "TABLES.md").read_text()


@pytest.mark.parametrize("damage", ["truncated", "not a report"])
def test_an_unreadable_earlier_report_is_refused_not_written_over(fixture_results, tmp_path_factory, damage):
    """The committed results.json may hold the only copy of some cells: a truncated or foreign one stops the
    report with one line naming it, and nothing in the report folder is rewritten."""
    out = tmp_path_factory.mktemp("committed")
    cells = suite.plan(["table1"], ["coil20"], ["gon"])
    suite.write_report(cells, fixture_results, out)
    text = (out / "results.json").read_text()
    broken = text[:len(text) // 2] if damage == "truncated" else '{"cells": [{"table": "table1", "row": "gon", ' \
        '"dataset": "coil20", "epoch": 5}]}'
    (out / "results.json").write_text(broken)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(UsageError, match="results.json is not a readable report .*; restore it"):
        suite.write_report(cells, fixture_results, out)
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_status_updates_merge_what_other_suites_wrote(tmp_path):
    """Two queues of the suite on one results folder: each update changes only its own entries."""
    suite.update_status(tmp_path, datasets={"cifar10": "no official cifar10 files"})
    suite.update_status(tmp_path, runs={"table1/gon/mnist/seed0": "diverged"})
    assert suite.read_status(tmp_path) == {"datasets": {"cifar10": "no official cifar10 files"},
                                             "runs": {"table1/gon/mnist/seed0": "diverged"}}
    suite.update_status(tmp_path, datasets={"cifar10": None})
    assert suite.read_status(tmp_path) == {"datasets": {}, "runs": {"table1/gon/mnist/seed0": "diverged"}}


def test_a_cell_whose_seeds_have_not_all_finished_reports_the_finished_ones_and_names_the_others():
    cell = next(c for c in suite.plan(["table1"], ["coil20"], ["ae"]))
    seeds = [suite.Cell(cell.row, "coil20", seed) for seed in (0, 1, 2)]
    done = [suite.CellResult(c, f"run{c.seed}", "finished", 500, 500, train, test, 1.0,
                             curve=((250, 2 * train, 2 * test), (500, train, test)))
            for c, train, test in ((seeds[0], 1.0, 4.0), (seeds[1], 0.8, 4.2))]
    short = suite.CellResult(seeds[2], "run2", "partial", 500, 250, 1.5, 4.5, 0.5, curve=((250, 1.5, 4.5),))
    summary, = suite.summarize([*done, short])
    assert summary.epoch == 500 and summary.train[0] == pytest.approx(0.9) and summary.test[0] == pytest.approx(4.1)
    assert "500/500 ep, 1.0 h, 2 of 3 seeds (seed 2 at 250/500)" in suite.format_cell(summary)
    everyone, = suite.summarize([done[0], suite.CellResult(seeds[2], "run2", "partial", 500, 250, 1.5, 4.5, 0.5,
                                                            curve=((250, 1.5, 4.5),))])
    assert everyone.epoch == 500  # one finished seed is reported over the unfinished one, which is named
    alone, = suite.summarize([short])
    assert alone.epoch == 250 and not alone.behind  # no seed finished: the lowest epoch all reached
