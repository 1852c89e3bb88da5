"""Scale-out (gonjax.parallel, README "Scaling"): the same numbers on 1, 2, 4 and 8 devices, for stacked seeds
and for two processes; a dead process stops the other with one line.

Several devices are XLA's fake CPU devices (--xla_force_host_platform_device_count), fixed when JAX starts, so
those checks run in subprocesses; tests/scaling_checks.py holds the float64 step comparisons.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from gonjax import parallel, train
from gonjax.config import Config
from gonjax.errors import UsageError

from conftest import FAST_COMPILE, REPO, run_main
from scaling_checks import DEVICE_COUNTS

TOLERANCE = 1e-10  # float64, relative (normwise per quantity: tests/scaling_checks.py says why)
FLOAT32 = dict(rtol=2e-4, atol=1e-6)  # two float32 runs of 36 steps whose sums run in different orders


def _env(devices: int | None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env["XLA_FLAGS"] = FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
    return env


def _checks(kind: str, model: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, str(REPO / "tests" / "scaling_checks.py"), kind, model], cwd=REPO,
                          env=_env(8), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["gon", "vgon", "ae", "vae", "implicit_gon"])
def test_one_float64_step_on_2_and_8_devices_equals_the_one_device_step(model):
    errors = _checks("devices", model)
    expected = {"gradients", "loss", "reconstruction", "params after Adam", "Adam state", "eval reconstruction",
                "train loss", "eval loss"}
    if model != "implicit_gon":
        expected |= {"bn state of the pass", "BN state after the step", "bias-before-BN gradient / largest gradient"}
    if model in ("gon", "vgon", "implicit_gon"):
        expected |= {"latent", "train inner_loss"}
    if model == "implicit_gon":
        expected.add("latent bank")
    for devices in DEVICE_COUNTS:
        missing = {name for name in expected if f"{devices} devices: {name}" not in errors}
        assert not missing, f"{devices} devices: not compared: {missing}"
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, (worst, errors[worst])


@pytest.mark.parametrize("model", ["gon"])
def test_stacked_seeds_in_one_float64_step_equal_each_seeds_own_step(model):
    errors = _checks("seeds", model)
    for label in ("1 devices, seed 0", "1 devices, seed 2", "4 devices, seed 1"):
        for name in ("params after Adam", "Adam state", "train loss", "eval reconstruction"):
            assert f"{label}: {name}" in errors
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, (worst, errors[worst])


def _records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(a: list[dict], b: list[dict], keys=("train_sse", "test_sse", "train_loss", "test_loss")):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for left, right in zip(a, b):
        for key in keys:
            np.testing.assert_allclose(left[key], right[key], **FLOAT32, err_msg=f"{key} at step {left['step']}")


def test_float32_runs_on_4_and_1_devices_agree_and_resume_across_device_counts(shared_data, tfds_dir, tmp_path):
    """The CLI on 4 fake devices against 1 device (2 epochs of COIL-20), a run resumed on 2 devices after its
    first epoch on 1, and a batch the devices cannot split: one line, nothing written."""
    common = ["--dataset", "coil20", "--manual-dir", shared_data, "--data-dir", tfds_dir, "--ngf", "4", "--nz", "8",
              "--eval-batches", "2"]
    script = "\n".join([
        "import sys",
        "from experiments import gon",
        f"common = {[str(c) for c in common]!r}",
        "runs = [('four', ['--devices', '4', '--epochs', '2']), ('one', ['--devices', '1', '--epochs', '1']),",
        "        ('one', ['--devices', '2', '--epochs', '2']), ('bad', ['--devices', '3', '--epochs', '1'])]",
        "for name, flags in runs:",
        f"    code = gon.main(common + flags + ['--workdir', {str(tmp_path)!r} + '/' + name])",
        "    print('exit', name, code, flush=True)",
    ])
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(4), capture_output=True, text=True,
                          timeout=600)
    assert done.stdout.count("exit") == 4, done.stderr[-3000:]
    assert "exit four 0" in done.stdout and "exit one 0" in done.stdout
    assert "resuming from step 18" in done.stdout
    _assert_same_metrics(_records(tmp_path / "four"), _records(tmp_path / "one"))
    assert json.loads((tmp_path / "one" / "config.json").read_text())["devices"] == 2
    assert "exit bad 1" in done.stdout
    assert ("error: --batch-size 64 cannot be split evenly over 3 devices; use --devices 1, 2, 4 "
            "(the counts that divide the batch)") in done.stderr
    assert not (tmp_path / "bad").exists()


def test_a_device_count_this_machine_lacks_is_a_clear_error():
    with pytest.raises(UsageError, match=r"--devices 2: only 1 device\(s\) \(cpu\) are visible; use --devices 1"):
        parallel.make_layout(2, 64)
    with pytest.raises(UsageError, match="--devices must be at least 1"):
        parallel.make_layout(0, 64)
    layout = parallel.make_layout(None, 64, replicas=3)
    assert layout.stacked and dict(layout.mesh.shape) == {"replica": 1, "data": 1}


def test_seeds_in_one_program_equal_single_seed_runs_and_are_brought_level_on_resume(shared_data, tfds_dir,
                                                                                        tmp_path, capsys):
    """train_seeds (the CLI's --seeds) against seeds 1 and 2 trained alone, float32; then seed 0 trained alone a
    little further, and the stacked run resumed: seed 1 catches up to seed 0 first, then both go on."""
    config = Config(dataset="coil20", ngf=4, nz=8, epochs=1, max_steps=8, eval_batches=2, data_dir=str(tfds_dir),
                    manual_dir=str(shared_data))
    together = train.train_seeds(config, [0, 1, 2], tmp_path / "together")
    assert [r["step"] for r in together[2]] == [0, 8]
    for seed in (1, 2):  # replicas 1 and 2 would show any mix-up of seeds, keys or data orders between replicas
        alone = train.train_and_evaluate(dataclasses.replace(config, seed=seed), tmp_path / f"alone{seed}")
        _assert_same_metrics(together[seed], alone)
    assert all((tmp_path / "together" / f"seed{seed}" / "recon_step8.png").is_file() for seed in (0, 1, 2))
    assert together[0][-1]["test_sse"] != together[1][-1]["test_sse"]  # different seeds, different runs

    longer = dataclasses.replace(config, max_steps=14)
    train.train_and_evaluate(longer, tmp_path / "together" / "seed0")  # seed 0 alone to step 14
    capsys.readouterr()
    level = train.train_seeds(longer, [0, 1], tmp_path / "together")
    assert [r["step"] for r in level[1]] == [0, 8, 14] == [r["step"] for r in level[0]]
    said = capsys.readouterr().out
    assert "seed0: this run already finished at step 14" in said  # it was, when opened
    assert "seed1: this run already finished" not in said  # it was brought level now
    alone = train.train_and_evaluate(dataclasses.replace(longer, seed=1), tmp_path / "alone1")
    _assert_same_metrics(level[1], alone)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _processes(tmp_path, shared_data, tfds_dir, workdir, epochs, port):
    flags = ["--dataset", "coil20", "--manual-dir", shared_data, "--data-dir", tfds_dir, "--ngf", "4", "--nz", "8",
             "--eval-batches", "2", "--epochs", epochs, "--workdir", workdir, "--coordinator", f"localhost:{port}",
             "--num-processes", "2"]
    return [subprocess.Popen([sys.executable, "-m", "experiments.gon", *map(str, flags), "--process-id", str(i)],
                             cwd=REPO, env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def test_two_processes_on_localhost_equal_one_process(shared_data, tfds_dir, tmp_path):
    """Two processes (one CPU device each, jax.distributed over localhost) train one run, stop after an epoch and
    resume from their multi-host checkpoint; only process 0 writes; the metrics equal a one-process run's."""
    for epochs in (1, 2):
        procs = _processes(tmp_path, shared_data, tfds_dir, tmp_path / "two", epochs, _free_port())
        outputs = [p.communicate(timeout=400) for p in procs]
        for p, (out, err) in zip(procs, outputs):
            assert p.returncode == 0, err[-3000:]
        assert f"epoch {epochs} step {18 * epochs}" in outputs[0][0] and "epoch" not in outputs[1][0]  # process 0
    assert "resuming from step 18" in outputs[0][0]
    one = run_main("gon", "--dataset", "coil20", "--manual-dir", shared_data, "--data-dir", tfds_dir, "--ngf", "4",
                   "--nz", "8", "--eval-batches", "2", "--epochs", "2",
                   "--workdir", tmp_path / "one")  # in this process: one CPU device
    assert one.returncode == 0, one.stderr[-3000:]
    _assert_same_metrics(_records(tmp_path / "two"), _records(tmp_path / "one"))
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["0", "18", "36"]


def test_a_killed_process_stops_the_other_with_one_line(shared_data, tfds_dir, tmp_path):
    procs = _processes(tmp_path, shared_data, tfds_dir, tmp_path / "run", 200, _free_port())
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "train_metrics.jsonl").exists():  # training is under way
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()[-3000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        assert time.monotonic() - killed < 120
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "lost contact with another process of this run" in lines[0], err[-3000:]
    assert "Traceback" not in err


def test_a_run_uses_one_device_by_default_and_stacked_seeds_spread_over_devices_first():
    code = ("import json; from gonjax.parallel import make_layout; "
            "print(json.dumps([dict(make_layout(None, 64, r).mesh.shape) for r in (1, 2, 3, 16)]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(8), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [
        {"replica": 1, "data": 1}, {"replica": 2, "data": 1}, {"replica": 3, "data": 1}, {"replica": 8, "data": 1}]
