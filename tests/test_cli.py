"""The experiment CLI end to end, as a user runs it: artefacts, resume, and one-line errors.

The smoke run and the killed run start real processes; the other cases call the same `main(argv)` in this
process (the same code path after the interpreter starts, without paying the imports again).
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_main


def _spawn(*args, module="gon", cwd=REPO):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _run(*args, module="gon"):
    return run_main(module, *args)


def _assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_smoke_run_writes_every_artefact_and_does_not_rerun(shared_data, tfds_dir, tmp_path):
    workdir = tmp_path / "run"
    args = ["--dataset", "fashion_mnist", "--manual-dir", str(shared_data), "--data-dir", str(tfds_dir),
            "--max-steps", "3", "--eval-batches", "8", "--ngf", "4", "--nz", "8", "--workdir", str(workdir)]
    result = _spawn(*args)  # 8 batches per evaluation: full passes over 70,000 images twice took 80 s of CI
    assert result.returncode == 0, result.stderr[-3000:]

    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"] == "fashion_mnist" and config["max_steps"] == 3 and config["ngf"] == 4
    assert config["lr"] == 2e-4 and config["batch_size"] == 64 and config["epochs"] == 500
    data = json.loads((workdir / "data.json").read_text())
    assert (data["train_images"], data["test_images"], data["image_shape"]) == (60000, 10000, [32, 32, 1])

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3] and all(r["eval_batches"] == 8 for r in records)
    for record in records:
        assert {"epoch", "step", "train_loss", "test_loss", "train_sse", "test_sse", "seconds"} <= set(record)
        assert np.isfinite([record["train_sse"], record["test_sse"]]).all()
    assert records[1]["seconds"] > 0

    for name in ("recon_0.png", "recon_step3.png", "curves.png"):
        with Image.open(workdir / name) as picture:
            assert picture.size[0] > 200 and picture.size[1] > 150
    recon = np.asarray(Image.open(workdir / "recon_0.png").convert("L"), np.float32)
    assert recon.std() > 10  # not a blank picture
    checkpoints = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints == ["0", "3"]

    again = _run(*args)  # the same command again, in this process
    assert again.returncode == 0 and "already finished" in again.stdout
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2


def test_bad_flags_are_one_line_errors(tmp_path):
    _assert_one_line_error(_run("--dataset", "imagenet"), "invalid choice: 'imagenet'")
    _assert_one_line_error(_run("--epochs", "many"), "--epochs", "invalid int value")
    _assert_one_line_error(_run("--epochs", "0", "--workdir", str(tmp_path / "r")), "--epochs must be at least 1")
    assert not (tmp_path / "r").exists()
    _assert_one_line_error(_run("--batch-size", "1", "--workdir", str(tmp_path / "r")), "--batch-size")


def test_missing_data_offline_says_how_to_use_manual_dir(tmp_path):
    result = _run("--dataset", "mnist", "--manual-dir", str(tmp_path), "--data-dir", str(tmp_path / "tfds"),
                  "--workdir", str(tmp_path / "run"))
    _assert_one_line_error(result, "no official mnist files", "train-images-idx3-ubyte.gz")


def test_unwritable_workdir_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = _run("--dataset", "coil20", "--workdir", str(tmp_path / "file" / "run"))
    _assert_one_line_error(result, "cannot use --workdir")
    assert "(Not a directory)" in result.stderr
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize("model", ["vgon", "ae", "vae"])
def test_baseline_and_variational_clis_on_coil20(model, shared_data, tfds_dir, tmp_path):
    workdir = tmp_path / model
    result = _run("--dataset", "coil20", "--manual-dir", str(shared_data), "--data-dir", str(tfds_dir),
                  "--max-steps", "2", "--ngf", "4", "--nz", "8", "--workdir", str(workdir), module=model)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"] == model
    assert config["epochs"] == (500 if model == "ae" else 1000)  # GON-SPEC 5
    assert config["lr"] == (1e-3 if model == "vgon" else 2e-4)  # V-GON on COIL-20: 1e-3
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    expected = {"train_sse", "test_sse", "train_loss", "test_loss"}
    if model != "ae":
        expected |= {"train_bce", "train_kld", "test_bce_kld"}
    assert expected <= set(record)
    assert (workdir / "samples_step2.png").exists() == (model != "ae")

    out = tmp_path / "drawn.png"
    kind = "reconstructions" if model == "ae" else "samples"
    drawn = _run("--workdir", str(workdir), "--n", "16", "--out", str(out), "--kind", kind, module="sample")
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    with Image.open(out) as picture:
        assert picture.size[0] > 100
    again = _run("--workdir", str(workdir), "--out", str(out), module="sample")
    _assert_one_line_error(again, "exists")
    if model == "ae":
        _assert_one_line_error(_run("--workdir", str(workdir), "--kind", "samples", module="sample"),
                               "no prior to sample from")
        # COIL-20's 288 test images: 4 batches of 64 and the 32 left as a batch of their own; 289 do not exist
        every = _run("--workdir", str(workdir), "--n", "288", "--kind", "reconstructions",
                     "--out", str(tmp_path / "all.png"), module="sample")
        assert every.returncode == 0 and (tmp_path / "all.png").exists(), every.stderr[-3000:]
        _assert_one_line_error(_run("--workdir", str(workdir), "--n", "289", "--kind", "reconstructions",
                                    module="sample"), "coil20 has 288 test images")


def test_sample_on_a_folder_that_is_not_a_run(tmp_path):
    _assert_one_line_error(_run("--workdir", str(tmp_path), module="sample"), "not a gonjax run folder")


def test_flags_of_other_models_are_refused():
    _assert_one_line_error(_run("--detach", module="vae"), "unrecognized arguments: --detach")
    _assert_one_line_error(_run("--kl-weight", "2", module="gon"), "unrecognized arguments: --kl-weight")
    _assert_one_line_error(_run("--learn-origin", module="ae"), "unrecognized arguments: --learn-origin")
    _assert_one_line_error(_run("--modulation", module="gon"), "unrecognized arguments: --modulation")
    _assert_one_line_error(_run("--latent-updates", "0", module="gon"), "--latent-updates must be at least 1")


def test_implicit_gon_variants_train_and_resume(shared_data, tfds_dir, tmp_path):
    """The issue's variant run, shortened: two updates from a learned origin, Fourier features, modulation (its
    rendering: tests/test_implicit.py)."""
    workdir = tmp_path / "variants"
    args = ["--dataset", "coil20", "--manual-dir", str(shared_data), "--data-dir", str(tfds_dir),
            "--latent-updates", "2", "--learn-origin", "--position-encoding", "fourier", "--modulation",
            "--batch-size", "8", "--eval-batches", "1", "--workdir", str(workdir)]
    result = _run(*args, "--max-steps", "2", module="implicit_gon")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    assert (config["latent_updates"], config["learn_origin"], config["position_encoding"], config["modulation"]) \
        == (2, True, "fourier", True)
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_inner_loss", "train_last_inner_loss"} <= set(record)
    _assert_one_line_error(_run(*args[:-1], str(workdir), "--max-steps", "2", "--position-encoding", "nerf",
                                module="implicit_gon"), "position_encoding")
    resumed = _run(*args, "--max-steps", "3", module="implicit_gon")
    assert resumed.returncode == 0 and "resuming from step 2" in resumed.stdout + resumed.stderr, resumed.stderr


def test_implicit_gon_cli_and_render_on_coil20(shared_data, tfds_dir, tmp_path):
    workdir = tmp_path / "implicit"
    result = _run("--dataset", "coil20", "--manual-dir", str(shared_data), "--data-dir", str(tfds_dir),
                  "--batch-size", "16", "--max-steps", "2", "--eval-batches", "2", "--workdir", str(workdir),
                  module="implicit_gon")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    # COIL-20 schedule of GON-SPEC 5: 500 epochs, lr 1e-4 then 5e-5 from epoch 50; latent 32.
    assert (config["epochs"], config["lr"], config["lr_drop_epoch"], config["lr_drop_to"], config["nz"]) == \
        (500, 1e-4, 50, 5e-5, 32)
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_mse", "test_mse", "train_psnr", "test_psnr"} <= set(record) and record["eval_batches"] == 2
    assert json.loads((workdir / "data.json").read_text())["image_shape"] == [32, 32, 1]

    rendered = _run("--workdir", str(workdir), "--resolution", "96", module="render")
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    out = workdir / "render_96_seed0"
    for name in ("superres.png", "slerp.png", "samples.png"):
        with Image.open(out / name) as picture:
            assert picture.size[0] > 200
    with Image.open(out / "superres_96.png") as picture:  # 16 renders in 4 columns, pixel for pixel
        assert picture.size == (4 * 97 + 1, 4 * 97 + 1)
    _assert_one_line_error(_run("--workdir", str(workdir), "--resolution", "96", module="render"), "exists")

    # The results report's picture: superres_<epoch>.png in the run folder (step 2 of 72 a epoch: epoch 0),
    # drawn once per checkpointed epoch.
    from experiments.render import draw_run_superres
    drawn = draw_run_superres(workdir)
    assert drawn == workdir / "superres_0.png"
    with Image.open(drawn) as picture:  # a titled figure: four panels as large as the 256x256 one (3x3 renders)
        assert picture.size[0] > 4 * (3 * 257 + 1) and picture.size[1] > 3 * 257 + 1
    stamp = drawn.stat().st_mtime_ns
    assert draw_run_superres(workdir) == drawn and drawn.stat().st_mtime_ns == stamp


def test_killed_run_stops_cleanly_and_resumes(shared_data, tfds_dir, tmp_path):
    workdir = tmp_path / "run"
    args = ["--dataset", "coil20", "--manual-dir", str(shared_data), "--data-dir", str(tfds_dir), "--epochs", "6",
            "--ngf", "4", "--nz", "8", "--eval-batches", "2", "--workdir", str(workdir)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, "-m", "experiments.gon", *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until a few epochs are checkpointed, then kill it mid-run
        if line.startswith("epoch 2 "):
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= len(records) < 7
    resumed = _run(*args)  # the same command resumes from the last whole checkpoint (in this process)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step" in resumed.stdout
    final = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert final == [18 * e for e in range(7)]
