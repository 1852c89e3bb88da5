"""The sigma = 0.01 sensitivity study (experiments.sigma_study): its variants against the ablation's cell, its
report from hand-written run folders, its command-line errors."""
import dataclasses
import json

import pytest

from conftest import run_main
from experiments import sigma_study, suite


def test_each_variant_is_the_ablations_run_with_one_setting_changed():
    ablation, = [c for c in suite.plan(["ablations"], ["mnist"], ["sigma_0.01"])]
    reference = dataclasses.replace(ablation.config(), epochs=10, eval_batches=20)
    for variant in sigma_study.VARIANTS:
        config = sigma_study.variant_config(variant, 10, 20)
        changed = {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(reference, f.name)}
        assert changed == set(variant.settings), variant.name
    assert sigma_study.variant_config(sigma_study.VARIANTS[0], 10, 20) == reference


def _write_run(folder, losses):
    folder.mkdir(parents=True)
    records = [{"epoch": epoch, "step": 937 * epoch, "mean_step_loss": loss} for epoch, loss in losses.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.json").write_text("{}\n")


def test_report_gives_each_variant_against_the_spec_run_and_never_shortens_the_archive(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    _write_run(results / "sigma_study/spec", {1: 0.06, 2: 0.04, 6: 0.02})
    _write_run(results / "sigma_study/batch_128", {1: 0.09, 2: 0.05, 6: 0.03})
    (results / "sigma_study/diagnostics.json").write_text(json.dumps(
        {"precision": {"run": "spec", "step": 4685, "loss_float32": 0.0188, "loss_float64": 0.0188,
                       "gradient_float32_vs_float64": 2.6e-5, "gradient_between_two_draws": 0.91},
         "latents": {"batch_128": {"step": 2340, "gradient_norm": 0.05, "start_norm": 0.16},
                     "sigma_0": {"step": 937, "gradient_norm": 0.01, "start_norm": 0.0}}}))
    _write_run(results / "sigma_study/sigma_0", {1: 0.03})
    sigma_study.write_report(results, out)
    table = (out / "SIGMA_STUDY.md").read_text()
    assert ("| batch 128 (half the latent's 1/B factor) | 0.09 (1.50) | 0.05 (1.25) | 0.03 (1.50) | 0.31 (step 2340) |"
            in table)
    assert "| seed 1 | not run | not run | not run | |" in table
    assert "| control: sigma 0 (the origin) | 0.03 (0.50) |  |  | z0 = 0 (step 937) |" in table
    assert "differs between the two by 2.6e-05 of its norm, and between two z0 draws by 0.91" in table
    assert (out / "sigma_study.png").stat().st_size > 10_000
    archived = out / "runs/sigma_study/batch_128/metrics.jsonl"
    assert archived.is_file() and (out / "runs/sigma_study/diagnostics.json").is_file()

    # The run folders are lost (a new machine) and batch_128 restarts: the archive keeps the longer curve.
    (results / "sigma_study/batch_128/metrics.jsonl").write_text(json.dumps(
        {"epoch": 1, "step": 937, "mean_step_loss": 0.09}) + "\n")
    (results / "sigma_study/spec/metrics.jsonl").unlink()
    sigma_study.write_report(results, out)
    assert "| batch 128 (half the latent's 1/B factor) | 0.09 (1.50) | 0.05 (1.25) | 0.03 (1.50) |" in (
        out / "SIGMA_STUDY.md").read_text()
    assert len(archived.read_text().splitlines()) == 3


@pytest.mark.parametrize("args, message", [
    (["--variants", "spec,bogus"], "unknown variant 'bogus'"),
    (["--epochs", "0"], "--epochs and --eval-batches must be at least 1"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    result = run_main("sigma_study", "--results", tmp_path, *args)
    assert result.returncode == 1 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
