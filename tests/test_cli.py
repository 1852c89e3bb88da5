"""The experiment CLI end to end, as a user runs it: artefacts, resume, and one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import REPO


def _run(*args, cwd=REPO):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "experiments.gon", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


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
            "--max-steps", "3", "--ngf", "4", "--nz", "8", "--workdir", str(workdir)]
    result = _run(*args)
    assert result.returncode == 0, result.stderr[-3000:]

    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"] == "fashion_mnist" and config["max_steps"] == 3 and config["ngf"] == 4
    assert config["lr"] == 2e-4 and config["batch_size"] == 64 and config["epochs"] == 500
    data = json.loads((workdir / "data.json").read_text())
    assert (data["train_images"], data["test_images"], data["image_shape"]) == (60000, 10000, [32, 32, 1])

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3]
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

    again = _run(*args)
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
    _assert_one_line_error(result, "cannot write to --workdir")
    assert (tmp_path / "file").read_text() == "not a folder"
