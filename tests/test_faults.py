"""Faults a hostile user or a bad day produce: nothing is lost, each ends in one clear line.

Two processes on one run folder, a stop signal inside JAX's compiler, damaged checkpoints and prepared data, a
full disk, outputs too large for memory, hand-edited files, offline downloads, a rate too high to learn.
"""
import collections
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO, run_main
from gonjax import checkpoints, train
from gonjax.config import Config
from gonjax.data import input_pipeline
from gonjax.errors import DataError, UsageError

TINY = dict(dataset="coil20", ngf=4, nz=8)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _config(shared_data, tfds_dir, **overrides):
    return Config(**{**TINY, "data_dir": str(tfds_dir), "manual_dir": str(shared_data), **overrides})


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _one_line(result, *fragments):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_second_process_on_a_run_folder_is_refused_and_a_dead_holder_does_not_block(
        shared_data, tfds_dir, tmp_path):
    config = _config(shared_data, tfds_dir, max_steps=1)
    (tmp_path / "config.json").write_text(config.to_json())
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from gonjax.config import Config
            from gonjax.rundir import RunDir
            run = RunDir({str(tmp_path / 'run')!r}, Config.load({str(tmp_path / 'config.json')!r}))
            print("holding", flush=True)
            time.sleep(600)
        """)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(UsageError, match=f"is in use by process {holder.pid} on"):
            train.train_and_evaluate(config, tmp_path / "run")
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    finally:
        holder.kill()  # a crash: the operating system drops its lock
        holder.wait()
    records = train.train_and_evaluate(config, tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1]


def test_a_stop_signal_during_compilation_exits_cleanly_on_mnist(shared_data, tfds_dir, tmp_path):
    """SIGTERM arriving while XLA compiles, in a real MNIST run. The handler used to raise KeyboardInterrupt at
    once, i.e. inside JAX's compilation code, which left XLA objects that crashed the interpreter at exit (exit
    139 after "interrupted"); now no exception is raised inside JAX and the stop is taken at the next safe
    point."""
    script = textwrap.dedent("""
        import os, signal, sys
        from jax._src import compiler
        compile_and_load, sent = compiler.backend_compile_and_load, []
        def compile_then_signal(*args, **kwargs):
            result = compile_and_load(*args, **kwargs)
            if not sent:
                sent.append(1)
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    for _ in range(1000):  # bytecodes of JAX's compiler: a raising handler raises here
                        pass
                except KeyboardInterrupt:
                    print("KeyboardInterrupt raised inside JAX's compiler", file=sys.stderr)
                    raise
            return result
        compiler.backend_compile_and_load = compile_then_signal
        from experiments import gon
        sys.exit(gon.main(sys.argv[1:]))
    """)
    args = ["--dataset", "mnist", "--manual-dir", shared_data, "--data-dir", tfds_dir, "--max-steps", "2",
            "--eval-batches", "1", "--ngf", "4", "--nz", "8", "--workdir", tmp_path / "run"]
    uncached = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # a cache hit compiles nothing
    process = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=uncached,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 130, process.stderr[-3000:]
    assert "interrupted" in process.stderr and "inside JAX's compiler" not in process.stderr
    assert "Fatal Python error" not in process.stderr and "Traceback" not in process.stderr


def test_stop_handler_defers_the_first_signal_and_raises_on_the_second():
    from experiments import cli

    cli.STOP.clear()
    cli._request_stop(signal.SIGTERM, None)  # no exception at an arbitrary bytecode
    assert cli.STOP.is_set()
    with pytest.raises(KeyboardInterrupt):
        cli._request_stop(signal.SIGINT, None)
    cli.STOP.clear()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def test_a_multi_process_start_says_it_waits_stops_on_a_signal_and_gives_up_in_one_line(tmp_path):
    """Process 0 of 2 whose peer never comes: it says that it waits; SIGTERM ends the wait at once (exit 130), and
    --startup-timeout ends it with one line (exit 1), no traceback, no C++ abort, no run folder; a coordinator
    without a port is refused before any wait."""
    base = [sys.executable, "-m", "experiments.gon", "--dataset", "coil20", "--workdir", str(tmp_path / "run"),
            "--num-processes", "2", "--process-id", "0"]
    bad = subprocess.run(base + ["--coordinator", "foo"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "python -m experiments.gon: error: --coordinator must be HOST:PORT with a port from 1 to 65535 (process 0's "
        "address), got 'foo'"]
    timed = subprocess.run(base + ["--coordinator", f"localhost:{_free_port()}", "--startup-timeout", "3"],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = timed.stderr.strip().splitlines()
    assert timed.returncode == 1 and len(lines) == 2, timed.stderr[-2000:]
    assert "waiting up to 3 s for the run's processes to join" in lines[0]
    assert "did not all join" in lines[1] and "within 3 s" in lines[1]
    waiting = subprocess.Popen(base + ["--coordinator", f"localhost:{_free_port()}"], stderr=subprocess.PIPE,
                               text=True, cwd=REPO)
    assert "waiting up to 300 s" in waiting.stderr.readline()
    started = time.monotonic()
    waiting.send_signal(signal.SIGTERM)
    _, rest = waiting.communicate(timeout=60)
    assert waiting.returncode == 130 and time.monotonic() - started < 10
    assert "interrupted while waiting for the run's other processes" in rest and "Traceback" not in rest
    assert not (tmp_path / "run").exists()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no "Exception ignored in" pages
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_an_intact_one(
        shared_data, tfds_dir, tmp_path, capsys):
    run = tmp_path / "run"
    original = train.train_and_evaluate(_config(shared_data, tfds_dir, epochs=1), run)
    data_files = sorted((run / "checkpoints" / "18").rglob("d/*"), key=lambda p: p.stat().st_size)
    with open(data_files[-1], "r+b") as damaged:  # the largest array file, cut short
        damaged.truncate(100)

    result = run_main("sample", "--workdir", run, "--kind", "reconstructions", "--n", 8, "--out", tmp_path / "r.png")
    assert result.returncode == 0 and (tmp_path / "r.png").exists(), result.stderr
    assert "checkpoint of step 18 is damaged" in result.stderr and "Traceback" not in result.stderr
    damage_lines = [line for line in result.stderr.splitlines() if "is damaged" in line]
    assert len(damage_lines) == 1 and "pybind11" not in result.stderr and "<bound method" not in result.stderr

    capsys.readouterr()
    leftover = run / "checkpoints" / "36.orbax-checkpoint-tmp-1765091234567"  # a save killed half-way
    (leftover / "default").mkdir(parents=True)
    records = train.train_and_evaluate(_config(shared_data, tfds_dir, epochs=2), run)
    assert not leftover.exists()  # cleaned when the run reopens its checkpoints
    err = capsys.readouterr().err
    assert "checkpoint of step 18 is damaged" in err and "Traceback" not in err
    assert (run / "damaged_checkpoints" / "18").is_dir()  # kept for inspection, never silently deleted
    assert [r["step"] for r in records] == [0, 18, 36]
    assert records[1]["test_sse"] == pytest.approx(original[1]["test_sse"], rel=1e-6)  # retrained from step 0

    saved = json.loads((run / "config.json").read_text())  # a hand-edited config.json: the field is named
    (run / "config.json").write_text(json.dumps({**saved, "nz": "8"}))
    _one_line(run_main("sample", "--workdir", run, "--kind", "reconstructions"), "nz is '8'", "int | None")
    for field, value, fragment in (("activation", "foo", "--activation must be one of"),
                                   ("batch_size", 0, "--batch-size must be at least 1, got 0; repair it")):  # values out of range
        (run / "config.json").write_text(json.dumps({**saved, field: value}))
        _one_line(run_main("sample", "--workdir", run), fragment)

    (run / "config.json").unlink()  # deleted files of a run are named, not called "not a gonjax run"
    _one_line(run_main("sample", "--workdir", run), "holds a run's files but no config.json (deleted?)")
    with pytest.raises(UsageError, match="holds a run's files but no config.json"):
        train.train_and_evaluate(_config(shared_data, tfds_dir, epochs=2), run)
    (run / "config.json").write_text(json.dumps(saved))
    (run / "data.json").unlink()
    _one_line(run_main("sample", "--workdir", run), "no data.json (deleted?); rerun the run's training command")
    train.train_and_evaluate(_config(shared_data, tfds_dir, epochs=2), run)  # finished: writes data.json, no step
    assert (run / "data.json").is_file() and _steps(run / "metrics.jsonl") == [0, 18, 36]


def test_a_full_disk_stops_the_run_in_one_line_and_the_rerun_resumes(shared_data, tfds_dir, tmp_path,
                                                                     monkeypatch):
    run = tmp_path / "run"
    args = ["--dataset", "coil20", "--manual-dir", shared_data, "--data-dir", tfds_dir, "--ngf", 4, "--nz", 8,
            "--max-steps", 1, "--eval-batches", 1, "--workdir", run]
    usage = shutil.disk_usage
    Usage = collections.namedtuple("Usage", "total used free")

    def nearly_full(path):  # room for the checkpoint of step 0 only
        return Usage(usage(path).total, 0, 1000 if (run / "checkpoints" / "0").exists() else 10**9)

    monkeypatch.setattr(checkpoints.shutil, "disk_usage", nearly_full)
    _one_line(run_main("gon", *args), "no space left", "step 1 ")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0"]

    def failing_save(*_, **__):  # the write itself runs out of space (tensorstore's error)
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "params": No space left on device [os_error_code=28]')

    monkeypatch.setattr(checkpoints.shutil, "disk_usage", usage)
    monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", failing_save)
    _one_line(run_main("gon", *args), "no space left", "step 1 ")
    monkeypatch.undo()

    def full_png(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "recon_step1.png"))

    monkeypatch.setattr(train.plots, "save_reconstructions", full_png)
    _one_line(run_main("gon", *args), "no space left", "recon_step1.png")
    monkeypatch.undo()

    resumed = run_main("gon", *args)  # space freed: the same command resumes
    assert resumed.returncode == 0, resumed.stderr
    assert _steps(run / "metrics.jsonl") == [0, 1]


def test_settings_that_cannot_fit_in_memory_are_refused_before_the_folder_is_claimed(
        shared_data, tfds_dir, tmp_path):
    result = run_main("gon", "--dataset", "coil20", "--nz", 100_000_000, "--workdir", tmp_path / "run")
    _one_line(result, "parameters", "GB of memory", "--nz")
    assert not (tmp_path / "run").exists()


def test_render_refuses_what_cannot_fit_and_never_leaves_a_partial_folder(shared_data, tfds_dir, tmp_path,
                                                                          monkeypatch):
    from experiments import render as render_cli

    run = tmp_path / "implicit"
    config = Config(model="implicit_gon", dataset="coil20", batch_size=8, max_steps=1, eval_batches=1,
                    data_dir=str(tfds_dir), manual_dir=str(shared_data))
    with pytest.raises(KeyboardInterrupt):  # stopped before its first step: no latents to fit a Gaussian to
        train.train_and_evaluate(config, run, should_stop=(run / "metrics.jsonl").exists)
    _one_line(run_main("render", "--workdir", run, "--resolution", 40, "--n", 8), "not trained long enough")
    assert [p.name for p in run.iterdir() if "render" in p.name] == []  # refused before any picture
    train.train_and_evaluate(config, run)

    _one_line(run_main("render", "--workdir", run, "--resolution", 100_000, "--n", 8), "--resolution 100000", "GB")

    def fails_late(*_, **__):  # e.g. the disk fills while the last picture is written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(render_cli.render, "sample_gaussian", fails_late)
    _one_line(run_main("render", "--workdir", run, "--resolution", 40, "--n", 8), "no space left")
    assert [p.name for p in run.iterdir() if p.name.startswith((".render", "render"))] == []


def test_samples_are_decoded_in_batches_and_the_output_appears_whole(shared_data, tfds_dir, tmp_path):
    from PIL import Image

    run = tmp_path / "vgon"
    train.train_and_evaluate(_config(shared_data, tfds_dir, model="vgon", max_steps=1, eval_batches=1), run)
    out = tmp_path / "many.png"
    result = run_main("sample", "--workdir", run, "--n", 200, "--out", out)  # four batches of 64, the last cut
    assert result.returncode == 0, result.stderr
    with Image.open(out) as picture:
        assert picture.size[0] > 14 * 33  # 14 columns of 32 + padding
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    _one_line(run_main("sample", "--workdir", run, "--n", 10**10, "--out", tmp_path / "huge.png"), "--n", "GB")
    assert not (tmp_path / "huge.png").exists()


def test_a_damaged_prepared_dataset_is_named(shared_data, tfds_dir, tmp_path):
    input_pipeline.prepare_builder("coil20", tfds_dir, shared_data)
    copy = tmp_path / "tfds"
    shutil.copytree(tfds_dir / "gon_coil20", copy / "gon_coil20")
    record = next((copy / "gon_coil20").rglob("*-train.array_record*"))
    with open(record, "r+b") as damaged:
        damaged.truncate(5000)
    with pytest.raises(DataError, match=r"damaged \(gon_coil20-train\.array_record.*remove that folder"):
        input_pipeline.load_dataset("coil20", 32, data_dir=copy)


def _with_file_size_limit(kilobytes: int, argv: list[str]) -> list[str]:
    """`argv` run by a shell that limits its files to `kilobytes`: a write past it fails (EFBIG) as on a full disk;
    SIGXFSZ is ignored, so the write fails rather than the process being killed. (A shell rather than a
    preexec_fn: forking this multithreaded process to run Python in the child can deadlock.)"""
    return ["bash", "-c", f'trap "" XFSZ; ulimit -f {kilobytes}; exec "$@"', "bash", *argv]


def test_a_data_dir_that_fills_during_preparation_is_one_line_and_leftovers_are_cleared(shared_data, tmp_path):
    data = tmp_path / "tfds"
    args = ["--dataset", "coil20", "--manual-dir", shared_data, "--data-dir", data, "--ngf", 4, "--nz", 8,
            "--max-steps", 1, "--workdir", tmp_path / "run"]
    full = subprocess.run(_with_file_size_limit(2000, [sys.executable, "-m", "experiments.gon", *map(str, args)]),
                          cwd=REPO, env=ENV, text=True, capture_output=True, timeout=300)
    _one_line(full, f"could not write coil20 into {data}", "MiB free there", "File too large",
              "free some space or pass another --data-dir")
    assert not list((data / "gon_coil20").glob("incomplete*"))

    # A preparation killed mid-write leaves TFDS's temporary folder; the next one removes it and prepares.
    leftover = data / "gon_coil20" / "incomplete.K1LL3D_1.0.0"
    leftover.mkdir(parents=True)
    (leftover / "gon_coil20-train.array_record-00000-of-00001").write_bytes(b"\0" * 1000)
    builder = input_pipeline.prepare_builder("coil20", data, shared_data)
    assert len(builder.as_data_source(split="test")) == 288
    assert sorted(p.name for p in (data / "gon_coil20").iterdir()) == ["1.0.0"]


def test_a_bad_coil20_png_is_named(shared_data, tmp_path):
    source = shared_data / "coil20" / "coil-20-proc"
    if not source.is_dir():
        source = next(shared_data.rglob("coil-20-proc"))
    folder = tmp_path / "manual" / "coil-20-proc"
    folder.mkdir(parents=True)
    for png in source.glob("obj*__*.png"):
        (folder / png.name).symlink_to(png)
    (folder / "obj3__7.png").unlink()
    (folder / "obj3__7.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"obj3__7\.png is not a readable PNG"):
        input_pipeline.prepare_builder("coil20", tmp_path / "tfds", tmp_path / "manual")


def test_offline_download_and_an_unusable_data_dir_fail_fast_in_one_line(tmp_path, monkeypatch):
    def offline(*_, **__):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(input_pipeline.socket, "create_connection", offline)
    with pytest.raises(DataError, match="www.cs.toronto.edu cannot be reached.*pass --manual-dir"):
        input_pipeline.prepare_builder("cifar10", tmp_path / "tfds")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="--data-dir .* cannot be written") as error:
        input_pipeline.prepare_builder("coil20", blocker / "tfds", tmp_path)
    assert "Offline" not in str(error.value)


def test_a_loss_that_does_not_move_is_warned_about():
    def windows(losses, steps=50):
        return [{"step": steps * (i + 1), "steps": steps, "train_loss": loss} for i, loss in enumerate(losses)]

    flat = [0.19, 0.2, 0.186, 0.193] * 5
    learning = [0.19, 0.1, 0.05] + [0.03] * 17
    assert train._loss_is_flat(windows(flat))
    assert not train._loss_is_flat(windows(learning))
    assert not train._loss_is_flat(windows(flat[:10]))  # 500 steps: too early to say
    assert not train._loss_is_flat(windows(flat)[3:])  # rows from the start lost: cannot say
    noisy_but_learning = [0.19] + list(np.linspace(0.19, 0.15, 19))
    assert not train._loss_is_flat(windows(noisy_but_learning))


def test_a_checkpoint_of_other_settings_is_refused_and_nothing_is_moved(shared_data, tfds_dir, tmp_path):
    """A run folder whose config.json was edited (ngf 4 -> 8), or a gonjax that builds another parameter tree:
    its intact checkpoints are not "damaged". The run is refused in one line naming the first leaf that differs,
    and no checkpoint is moved aside and no metrics row is dropped."""
    run = tmp_path / "run"
    train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=2, eval_batches=1), run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "ngf": 8}))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.suffix == ".jsonl"}
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(UsageError, match=r"step 2 does not fit these settings \(it holds params/bn1/bias as "
                                         r"float32\[16\], these settings build float32\[32\]\)"):
        train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=3, eval_batches=1, ngf=8), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    assert not (run / "damaged_checkpoints").exists()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.suffix == ".jsonl"} == before


def test_a_run_folder_is_self_contained_and_sample_takes_data_overrides(shared_data, tfds_dir, tmp_path, monkeypatch):
    """Data locations typed relative are stored absolute, so `sample` works from any folder and creates nothing
    there; `--data-dir` / `--manual-dir` on `sample` override the run's."""
    where = tmp_path / "where"
    where.mkdir()
    (where / "official").symlink_to(shared_data)
    (where / "tfds").symlink_to(tfds_dir)
    monkeypatch.chdir(where)
    trained = run_main("gon", "--dataset", "coil20", "--manual-dir", "official", "--data-dir", "tfds", "--ngf", 4,
                       "--nz", 8, "--max-steps", 1, "--eval-batches", 1, "--workdir", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["manual_dir"], config["data_dir"]) == (str(where / "official"), str(where / "tfds"))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    drawn = run_main("sample", "--workdir", tmp_path / "run", "--n", 4, "--out", "recon.png")
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["recon.png"]  # nothing else created here

    (where / "tfds").rename(where / "moved")  # the data moved: the run's own locations are gone
    (where / "official").unlink()
    gone = run_main("sample", "--workdir", tmp_path / "run", "--n", 4, "--out", "again.png")
    assert gone.returncode == 1 and len(gone.stderr.strip().splitlines()) == 1, gone.stderr
    moved = run_main("sample", "--workdir", tmp_path / "run", "--n", 4, "--out", "again.png",
                     "--data-dir", where / "moved", "--manual-dir", shared_data)
    assert moved.returncode == 0, moved.stderr[-2000:]


@pytest.mark.parametrize("model, shape, message", [
    ("gon", (4, 32, 32, 3), r"built for images of shape \(B, 32, 32, 1\), got \(4, 32, 32, 3\)"),
    ("vgon", (4, 32, 32, 3), r"built for images of shape \(B, 32, 32, 1\)"),
    ("vae", (4, 28, 28, 1), r"built for images of shape \(B, 32, 32, 1\), got \(4, 28, 28, 1\)"),
    ("ae", (1, 32, 32, 1), "a batch needs at least 2 images, got 1"),
    ("implicit_gon", (4, 32, 32, 1), r"built for images of shape \(B, 28, 28, 1\)"),
])
def test_the_library_refuses_images_its_model_was_not_built_for(model, shape, message):
    import jax
    import jax.numpy as jnp

    from gonjax.zoo import build_model

    built = build_model(Config(model=model, dataset="mnist", nz=8, **({} if model == "implicit_gon" else {"ngf": 4})), 1)
    size = built.image_size
    variables = built.init(jax.random.PRNGKey(0), jnp.zeros((2, size, size, 1)))
    with pytest.raises(ValueError, match=message):
        built.apply(variables["params"], variables.get("batch_stats", {}), jnp.zeros(shape), jax.random.PRNGKey(0))


def test_records_that_are_json_but_not_records_and_a_damaged_status_file_are_one_line(shared_data, tfds_dir,
                                                                                        tmp_path):
    run = tmp_path / "run"
    train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=1, eval_batches=1), run)
    for bad in ('{"epoch": 1}', "[1, 2]"):
        (run / "metrics.jsonl").write_text(f'{bad}\n{{"step": 1, "epoch": 0.06}}\n')
        with pytest.raises(UsageError, match=r"metrics.jsonl line 1 is not a record of a step"):
            train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=2, eval_batches=1), run)
    results = tmp_path / "results"
    results.mkdir()
    (results / "suite_status.json").write_text("{not json")
    report = run_main("tables", "--report", "--results", results)
    assert report.returncode == 1 and len(report.stderr.strip().splitlines()) == 1
    assert "suite_status.json is damaged" in report.stderr


def test_a_too_long_workdir_and_a_rate_float32_cannot_hold_are_one_line(shared_data, tmp_path):
    long = tmp_path / ("x" * 300)
    for module, args in (("gon", ["--dataset", "coil20", "--manual-dir", shared_data, "--workdir", long]),
                         ("sample", ["--workdir", long])):
        result = run_main(module, *args)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "File name too long" in result.stderr
    tiny = run_main("gon", "--dataset", "coil20", "--lr", "1e-320", "--workdir", tmp_path / "tiny")
    assert tiny.returncode == 1 and "is 0 in float32" in tiny.stderr and not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("platforms, fragment", [
    ("cuda", "JAX_PLATFORMS='cuda': no NVIDIA GPU is visible on this machine; unset JAX_PLATFORMS"),
    ("cdua", "JAX_PLATFORMS='cdua': Unable to initialize backend 'cdua'"),
])
def test_a_backend_jax_cannot_start_is_one_line_and_claims_nothing(shared_data, tmp_path, platforms, fragment):
    """JAX_PLATFORMS naming cuda where no NVIDIA GPU is visible (JAX itself fails a bare assert; the GPU is hidden
    from JAX here so that the case is the same on every machine), or a platform JAX does not have."""
    code = ("import sys; import jax._src.hardware_utils as h; h.has_visible_nvidia_gpu = lambda: False; "
            "from experiments import gon; sys.exit(gon.main(sys.argv[1:]))")
    sample = ["-m", "experiments.sample", "--workdir", str(tmp_path / "missing"), "--out", str(tmp_path / "s.png")]
    for argv in (["-c", code, "--dataset", "coil20", "--manual-dir", str(shared_data), "--workdir",
                  str(tmp_path / "run")], *([sample] if platforms == "cuda" else [])):
        result = subprocess.run([sys.executable, *argv], cwd=REPO, env={**ENV, "JAX_PLATFORMS": platforms},
                                capture_output=True, text=True, timeout=300)
        if argv[0] == "-c":
            _one_line(result, fragment)
        else:  # a mistake found before any device is touched is still named as itself
            _one_line(result, "is not a gonjax run folder")
    assert not (tmp_path / "run").exists()
