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


ROWS = ["gon", "gon_detached", "vgon", "ae", "implicit_gon", "vae", "gon_n3", "implicit_mod"]


def test_step_time_rows_all_and_lists(capsys):
    """--model all is every row in table order; a comma list picks rows; an unknown row is one usage line."""
    assert step_time._model_names("all") == ROWS
    assert step_time._model_names("vae, gon") == ["vae", "gon"]
    with pytest.raises(SystemExit) as exit_info:
        step_time.main(["--model", "gon,dcgan"])
    assert exit_info.value.code == 2 and "unknown row dcgan; choose from gon, gon_detached" in capsys.readouterr().err


def test_step_time_writes_table_and_json(tmp_path, capsys):
    """Two rows end to end (a spec model and a gon-pytorch one; every row's reference step is compared with
    gonjax's in tests/test_parity.py)."""
    table, report = _run(tmp_path, capsys, "--model", "vgon,implicit_mod")
    assert "implicit_mod" in table and "speedup" in table and "ceiling" not in table
    assert [r["model"] for r in report["results"]] == ["vgon", "implicit_mod"]
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
        assert (row["kernels"], row["matmul_precision"]) == ("xla_cpu", "highest")  # --kernels auto, on a CPU
        assert row["xla_compiler_options"] is None or "xla_cpu_experimental_ynn_fusion_type" in row["xla_compiler_options"]
    env = report["environment"]
    assert {"jax", "torch", "flax"} <= set(env["versions"]) and env["threads"]["torch"] >= 1
    assert 1 <= env["usable_cpus"] <= env["cpu_count"]
    assert set(env["float32_matmul_precision"]) == {"jax", "torch"} and env["processor"]


def test_step_time_floor_reports_the_contraction_ceiling(tmp_path, capsys):
    """Also: --block-warmup K runs K untimed steps per framework (and of the floor) at the start of every block;
    the timed samples stay --steps, and each side's own step counter (TrainState.step, Adam's) counts every step."""
    table, report = _run(tmp_path, capsys, "--model", "gon", "--floor", "--block", "1", "--block-warmup", "2")
    assert "ceiling" in table
    row, = report["results"]
    assert row["jax_ms_spread"]["n"] == row["torch_ms_spread"]["n"] == 2
    # first call + 1 warm-up + 2 timed + 2 untimed in each of the 2 blocks of one step
    assert row["jax_steps_run"] == row["torch_steps_run"] == 1 + 1 + 2 + 2 * 2
    assert (row["block"], row["block_warmup"]) == (1, 2)
    assert row["speedup_ceiling"] == pytest.approx(row["torch_ms"] / row["floor_ms"])
    assert row["eval_speedup_ceiling"] == pytest.approx(row["eval_floor_images_per_s"] / row["torch_eval_images_per_s"])
    assert row["floor_ms_spread"]["n"] == 2 and row["floor_gflop"] > row["eval_floor_gflop_per_batch"] > 0


def test_step_time_never_overwrites_results(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text("earlier results")
    with pytest.raises(SystemExit) as exit_info:
        step_time.main(["--json", str(out)])
    assert exit_info.value.code == 2 and out.read_text() == "earlier results"


def test_epoch_benchmark_sides_process_the_same_images_and_compute_the_same_epoch(shared_data, tfds_dir, tmp_path):
    """The epoch benchmark's honesty: on a small fixed model (COIL-20, ngf 4, nz 8, one epoch) both sides train on
    and evaluate as many images; started from gonjax's initial weights on gonjax's order, the PyTorch epoch
    reaches gonjax's evaluation metrics before and after training within float32 tolerance."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import epoch_time
    from benchmarks import torch_reference as tr
    from gonjax import steps
    from gonjax.data import input_pipeline
    from gonjax.zoo import build_model

    config = epoch_time.make_config("gon", "coil20", epochs=1, ngf=4, nz=8, data_dir=str(tfds_dir),
                                    manual_dir=str(shared_data))
    data, _ = epoch_time.load_timed(config)
    ours = epoch_time.measure_gonjax(config, tmp_path / "run", data, None, None)
    theirs = epoch_time.measure_torch("gon", config, data, None, None)
    assert ours.train_images == theirs.train_images == 18 * 64  # 1152 training images, none dropped
    assert ours.eval_images == theirs.eval_images == (18 + 4) * 64  # 1152 + 288 evaluated, the last 32 dropped
    assert ours.train_s > 0 and ours.eval_s > 0 and theirs.train_s > 0 and theirs.eval_s > 0

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    model = build_model(config, 1)
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed), 4)[0]  # the trainer's init key (gonjax.train)
    state = steps.create_train_state(model, steps.make_optimizer(config, 18), init_rng, jnp.zeros((64, 32, 32, 1)))
    module = tr.load_flax_variables(epoch_time.torch_module("gon", config, 1),
                                    {"params": state.params, "batch_stats": state.batch_stats})
    for split, images in (("train", data.train), ("test", data.test)):
        before, _, _ = epoch_time.torch_evaluate("gon", module, images, config)
        np.testing.assert_allclose(before, records[0][f"{split}_sse"], rtol=1e-4)
    optimizer = tr.make_adam(module, config.lr)
    epoch_time.torch_epoch("gon", module, optimizer, data.train, config,
                           order=input_pipeline.epoch_order(len(data.train), config.seed, 0))
    for split, images in (("train", data.train), ("test", data.test)):
        after, _, _ = epoch_time.torch_evaluate("gon", module, images, config)
        assert after < 0.97 * records[0][f"{split}_sse"]  # it trained (147.6 -> 141.3 measured)
        np.testing.assert_allclose(after, records[1][f"{split}_sse"], rtol=5e-4)  # measured 1.5e-4


@pytest.mark.parametrize("name", ["gon", "vgon", "ae", "vae", "implicit_gon"])
def test_loading_gonjax_weights_into_the_pytorch_reference_inverts_the_port(name):
    """load_flax_variables(m2, flax_variables(m1)) makes m2 equal m1 in every weight and BN statistic."""
    import torch

    from benchmarks import epoch_time
    from benchmarks import torch_reference as tr

    sizes = dict(nz=8) if name == "implicit_gon" else dict(ngf=4, nz=8)  # a SIREN has no ngf
    config = epoch_time.make_config(name, "coil20" if name != "implicit_gon" else "mnist", **sizes)
    torch.manual_seed(0)
    source = epoch_time.torch_module(name, config, 1)
    for buffer in source.buffers():  # BN running statistics off their init, so that they are checked too
        if buffer.dtype.is_floating_point:
            buffer.uniform_(0.5, 1.5)
    target = tr.load_flax_variables(epoch_time.torch_module(name, config, 1), tr.flax_variables(source))
    pairs = list(zip(source.state_dict().items(), target.state_dict().items()))
    assert pairs and all(a == b and torch.equal(x, y) for (a, x), (b, y) in pairs)


def test_compile_time_reports_every_phase_and_one_loss_per_program(tmp_path, capsys):
    """Two numbers of updates, each its own program: every phase timed, and the first step's loss differs (the
    later updates are applied: the Implicit GON, whose decoder has no batch norm; a GON's BN makes its decoder
    nearly blind to the scale of z, and its later updates barely move the loss at initialisation)."""
    from benchmarks import compile_time

    out = tmp_path / "compile.json"
    assert compile_time.main(["--model", "implicit_gon", "--latent-updates", "1", "7", "--nz", "8", "--batch-size", "4",
                              "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["latent_updates"] for row in rows] == [1, 7]
    assert all(row["trace_lower_s"] > 0 and row["compile_s"] > 0 and row["first_step_ms"] > 0 for row in rows)
    assert rows[0]["loss"] != rows[1]["loss"]
    assert "trace+lower s" in capsys.readouterr().out


def _contractions(jaxpr) -> int:
    """dot_general and conv_general_dilated equations of a jaxpr, those nested in calls included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("dot_general", "conv_general_dilated")
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                count += _contractions(inner) if hasattr(inner, "eqns") else 0
    return count


def test_tf32_emulation_rounds_the_operands_of_every_contraction_and_nothing_else(monkeypatch):
    """A product of TF32 operands (10-bit mantissas, by hand: float32 with the low 13 bits cleared) is computed
    as it is; other operands are rounded first; in a GON's training step every contraction of the forward,
    backward and double-backward passes is rewritten, and the curves come out against float64."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import tf32_emulation as tf32
    from gonjax import steps, zoo
    from gonjax.config import Config

    a = np.random.default_rng(0).normal(size=(16, 32)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(32, 8)).astype(np.float32)
    clear = np.uint32(0xFFFFE000)  # keep sign, exponent and the top 10 mantissa bits (truncation, not rounding)
    a10, b10 = ((x.view(np.uint32) & clear).view(np.float32) for x in (a, b))
    plain = jax.jit(lambda x, y: jnp.sin(x @ y))
    emulated = jax.jit(tf32.emulate_tf32(lambda x, y: jnp.sin(x @ y)))
    np.testing.assert_array_equal(np.asarray(emulated(a10, b10)), np.asarray(plain(a10, b10)))
    rounded = np.asarray(emulated(a, b))
    assert 1e-5 < np.abs(rounded - np.asarray(plain(a, b))).max() < 1e-2  # ~2^-11 relative per operand
    assert np.abs(rounded - np.asarray(plain(a10, b10))).max() < 1e-2

    config = Config(model="gon", dataset="fashion_mnist", ngf=4, nz=8, kernels="autodiff")
    model = zoo.build_model(config, 1, backend="cpu")
    optimizer = steps.make_optimizer(config)
    images = jax.random.uniform(jax.random.PRNGKey(3), (8, 32, 32, 1))
    state = steps.create_train_state(model, optimizer, jax.random.PRNGKey(0), images)
    train_step = steps.make_train_step(model, optimizer)
    seen = [0]
    _, metrics = jax.jit(tf32.emulate_tf32(train_step, seen))(state, images, jax.random.PRNGKey(1))
    _, float32 = jax.jit(train_step)(state, images, jax.random.PRNGKey(1))
    assert seen[0] == _contractions(jax.make_jaxpr(train_step)(state, images, jax.random.PRNGKey(1)).jaxpr) > 30
    assert 0 < abs(float(metrics["loss"]) - float(float32["loss"])) < 1e-3 * float(float32["loss"])

    monkeypatch.setitem(tf32.MODELS, "gon", {"model": "gon", "dataset": "fashion_mnist", "ngf": 4, "nz": 8})
    row = tf32.measure("gon", "autodiff", np.random.default_rng(2).uniform(size=(64, 32, 32, 1)), 0, 3, batch=8)
    assert row["steps"] == 3 and len(row["float64_first_last"]) == 2
    assert 0 < row["float32"]["max"] < row["tf32"]["max"] < 1e-2  # TF32 strays further, both stay close


def test_gpu_check_refuses_bad_requests_and_tables_what_its_parts_found(tmp_path, capsys):
    """The prepared GPU check (its parts run there; `--quick` runs them on any machine): flags checked before
    anything starts, and the report's tables and failure detection, on a hand-written report."""
    from benchmarks import gpu_check

    for argv, fragment in ((["--parts", "parity,fast", "--out", str(tmp_path / "new")], "--parts: choose from"),
                           (["--out", str(tmp_path)], "exists; choose a new folder")):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.main(argv)
        assert exit_info.value.code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "new").exists()

    row = {"model": "gon", "kernels": "autodiff", "matmul_precision": "highest", "jax_ms": 2.5, "torch_ms": 5.0,
           "speedup": 2.0, "jax_eval_images_per_s": 90000.0, "torch_eval_images_per_s": 45000.0}
    report = {"device": {"platform": "gpu", "kind": "NVIDIA H100", "count": 1, "jax": "0.10.2"}, "quick": False,
              "parity": {"exit_status": 0, "selection": "tests/test_parity.py -k float64", "summary": "20 passed"},
              "step_time": {"auto_highest": {"exit_status": 0, "rows": [row]}},
              "epoch_time": {name: {"exit_status": 0, "result": {
                                 "epoch_s": {"gonjax": 3.0, "torch": 6.0}, "epoch_ratio": 2.0, "estimated": False,
                                 "steps_per_call": calls, "steadiness": {"median_ms": 2.5, "p90_ms": 3.25},
                                 "gonjax": [{"test_metric": sse}]}}
                             for name, calls, sse in (("gon", None, 1.5), ("gon_calls1", 1, 1.0))},
              "fashion": {"device": {"step": 937, "test_sse": 1.01, "seconds": 20.0, "exit_status": 0},
                          "cpu": {"step": 937, "test_sse": 1.0, "seconds": 60.0, "exit_status": 0},
                          "relative_difference": 0.01}}
    report["epoch_time"]["implicit_gon"] = {"exit_status": 1}
    text = gpu_check.markdown(report)
    assert "on NVIDIA H100 (gpu, 1 device(s))" in text and "`pytest tests/test_parity.py -k float64`: 20 passed" in text
    assert "| gon | autodiff | highest | 2.50 | 5.00 | 2.00 | 90000 / 45000 |" in text
    assert "| gon_calls1 | 1 | 3.00 | 6.00 | 2.00 | no | 2.50 / 3.25 |" in text
    assert "| gon | default | 3.00 |" in text and "1.5 / 1.0 (relative difference 5.00e-01" in text
    assert "| implicit_gon | | failed (exit status 1) |" in text
    assert "| device | 937 | 1.01 | 20.0 |" in text and "Relative difference of the test SSE: 1.00e-02." in text
    assert [gpu_check._failed(report[part]) for part in ("parity", "step_time", "epoch_time", "fashion")] == \
        [False, False, True, False]
    report["step_time"]["auto_highest"]["exit_status"] = 1
    assert gpu_check._failed(report["step_time"])
