"""The step-time benchmark runs end to end and reports what it promises (speed itself is not asserted)."""
import json

import pytest

from benchmarks import step_time


SMALL = ["--ngf", "4", "--nz", "8", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--eval-batches", "1",
         "--eval-repeats", "1"]


def _run(tmp_path, capsys, *flags) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    assert step_time.main([*SMALL, *flags, "--json", str(out)]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_step_time_writes_table_and_json(tmp_path, capsys):
    table, report = _run(tmp_path, capsys, "--model", "all")
    assert "gon_detached" in table and "speedup" in table and "ceiling" not in table
    assert [r["model"] for r in report["results"]] == ["gon", "gon_detached", "vgon", "ae", "implicit_gon", "vae",
                                                       "gon_n3", "implicit_mod"]
    for row in report["results"]:
        assert row["speedup"] == pytest.approx(row["torch_ms"] / row["jax_ms"])
        assert row["jax_ms_spread"]["n"] == row["torch_ms_spread"]["n"] == 2
        assert row["jax_compile_s"] > 0 and row["jax_eval_images_per_s"] > 0 and row["torch_eval_images_per_s"] > 0
        assert row["origin_shortcut"] is (None if row["model"] in ("vgon", "ae", "vae") else True)
        peer = row["model"] in ("gon_n3", "implicit_mod")
        assert row["reference"] == ("gon-pytorch 0.1.1" if peer else "torch_reference")
        assert (row["latent_updates"], row["modulation"]) == {"gon_n3": (3, False), "implicit_mod": (1, True)}.get(
            row["model"], (1, False))
        assert "floor_ms" not in row
        assert row["xla_compiler_options"] is None or "xla_cpu_experimental_ynn_fusion_type" in row["xla_compiler_options"]
    env = report["environment"]
    assert {"jax", "torch", "flax"} <= set(env["versions"]) and env["threads"]["torch"] >= 1
    assert set(env["float32_matmul_precision"]) == {"jax", "torch"} and env["processor"]


def test_step_time_floor_reports_the_contraction_ceiling(tmp_path, capsys):
    table, report = _run(tmp_path, capsys, "--model", "gon", "--floor")
    assert "ceiling" in table
    row, = report["results"]
    assert row["speedup_ceiling"] == pytest.approx(row["torch_ms"] / row["floor_ms"])
    assert row["eval_speedup_ceiling"] == pytest.approx(row["eval_floor_images_per_s"] / row["torch_eval_images_per_s"])
    assert row["floor_ms_spread"]["n"] == 2 and row["floor_gflop"] > row["eval_floor_gflop_per_batch"] > 0


def test_step_time_never_overwrites_results(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text("earlier results")
    with pytest.raises(SystemExit) as exit_info:
        step_time.main(["--json", str(out)])
    assert exit_info.value.code == 2 and out.read_text() == "earlier results"
