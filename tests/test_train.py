"""The trainer: compile once, resume exactly, refuse to touch other runs, stop on divergence."""
import json
import shutil
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gonjax import steps, train, xla, zoo
from gonjax.data import input_pipeline
from gonjax.config import Config
from gonjax.errors import DivergedError, UsageError

TINY = dict(dataset="coil20", ngf=4, nz=8)


def _config(shared_data, tfds_dir, **overrides):
    return Config(**{**TINY, "data_dir": str(tfds_dir), "manual_dir": str(shared_data), **overrides})


def test_train_and_eval_steps_compile_once():
    config = Config(ngf=4, nz=8)
    model = zoo.build_model(config, nc=1)
    optimizer = steps.make_optimizer(config)
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(6, 32, 32, 1)), jnp.float32)
    state = steps.create_train_state(model, optimizer, jax.random.PRNGKey(0), images)
    train_step = jax.jit(chex.assert_max_traces(steps.make_train_step(model, optimizer), n=1), donate_argnums=0)
    eval_step = jax.jit(chex.assert_max_traces(steps.make_eval_step(model), n=1))
    for i in range(4):
        batch = images + 0.01 * i
        state, metrics = train_step(state, batch, jax.random.PRNGKey(1))
        eval_step(state, batch, jax.random.PRNGKey(2))
    assert int(state.step) == 4 and np.isfinite(float(metrics["loss"]))


def test_train_step_is_one_adam_step_on_the_model_gradient():
    config = Config(ngf=4, nz=8)
    model = zoo.build_model(config, nc=1)
    optimizer = steps.make_optimizer(config)
    with jax.enable_x64(True):  # float64: no gradient component is lost in rounding noise
        images = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 32, 32, 1)))
        state = steps.create_train_state(model, optimizer, jax.random.PRNGKey(0), images)
        state = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, state)
        grads = jax.jit(jax.grad(lambda p: model.apply(p, state.batch_stats, images, jax.random.PRNGKey(0))[0]))(
            state.params)
        # The first Adam step from zero moments moves each parameter by lr * g / (|g| + eps) (bias-corrected).
        expected = jax.tree_util.tree_map(lambda p, g: p - config.lr * g / (jnp.abs(g) + 1e-8), state.params, grads)
        new_state, _ = jax.jit(steps.make_train_step(model, optimizer))(state, images, jax.random.PRNGKey(0))
        # atol: biases ahead of a BN have gradient 0 up to 1e-13 noise, which Adam scales to up to lr; a wrong
        # learning rate, sign or optimizer is off by ~lr = 2e-4.
        chex.assert_trees_all_close(new_state.params, expected, rtol=0, atol=1e-6)
        moved = jax.tree_util.tree_map(lambda a, b: jnp.abs(a - b).max(), new_state.params, state.params)
        assert max(jax.tree_util.tree_leaves(moved)) > 1.9e-4
        assert isinstance(new_state.opt_state[0], optax.ScaleByAdamState)
        assert int(new_state.step) == 1


def test_training_reduces_coil20_error_and_writes_every_artefact(shared_data, tfds_dir, tmp_path, monkeypatch):
    make_train_step = steps.make_train_step
    # Traced twice, once: for the shapes of its per-step metrics (gonjax.loops), and for the program; not per call.
    monkeypatch.setattr(steps, "make_train_step", lambda m, o: chex.assert_max_traces(make_train_step(m, o), n=2))
    records = train.train_and_evaluate(_config(shared_data, tfds_dir, epochs=2, lr=2e-3), tmp_path / "run")
    assert [r["step"] for r in records] == [0, 18, 36]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["train_sse"] < records[1]["train_sse"] < 0.8 * records[0]["train_sse"]
    for record in records:  # SSE/img = 1024 x the per-pixel loss on 32x32x1 (GON-SPEC 7)
        np.testing.assert_allclose(record["test_sse"], 1024 * record["test_loss"], rtol=1e-5)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "data.json", "metrics.jsonl", "curves.png", "checkpoints",
            "recon_0.png", "recon_1.png", "recon_2.png"} <= names


def test_resumed_or_sparsely_evaluated_run_reproduces_an_uninterrupted_one(shared_data, tfds_dir, tmp_path):
    short = dict(epochs=3, eval_batches=2)  # evaluations on 2 batches: the comparison is bit for bit all the same
    straight = train.train_and_evaluate(_config(shared_data, tfds_dir, **short, max_steps=30), tmp_path / "a")
    train.train_and_evaluate(_config(shared_data, tfds_dir, **short, max_steps=11), tmp_path / "b")
    resumed = train.train_and_evaluate(_config(shared_data, tfds_dir, **short, max_steps=30), tmp_path / "b")
    timing = ("seconds", "per_s", "mean_step_loss")  # wall times, and a step-loss mean summed in other groups
    strip = lambda rs: [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rs]
    assert [r["step"] for r in resumed] == [0, 11, 18, 30]
    assert [r["step"] for r in straight] == [0, 18, 30]
    assert strip(resumed)[2:] == strip(straight)[1:]  # bit-identical metrics after the interruption
    for a, b in zip(resumed[2:], straight[1:]):  # the epoch's step losses, before and after the interruption
        assert a["mean_step_loss"] == pytest.approx(b["mean_step_loss"], rel=1e-6)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 11, 18, 30]
    # Evaluated after every 2nd epoch only: no row at epoch 1 (step 18), the end still evaluated, and the
    # training bit for bit the same (an evaluation that changed the state would show at step 30).
    sparse = train.train_and_evaluate(_config(shared_data, tfds_dir, **short, max_steps=30, eval_every=2),
                                      tmp_path / "c")
    assert [r["step"] for r in sparse] == [0, 30]
    assert strip(sparse) == strip(straight)[::2]
    assert sorted(int(p.name) for p in (tmp_path / "c" / "checkpoints").iterdir()) == [0, 30]
    # Checkpointed after every epoch but evaluated every 2nd: a checkpoint without a row at step 18; a run
    # resumed there evaluates nothing extra and ends where the uninterrupted runs end, bit for bit.
    every = dict(short, eval_every=2, checkpoint_every=1)
    train.train_and_evaluate(_config(shared_data, tfds_dir, **every, max_steps=20), tmp_path / "d")
    (tmp_path / "d" / "checkpoints" / "20").rename(tmp_path / "d20")  # a kill after the step-18 checkpoint
    (tmp_path / "d" / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()[:1]))
    assert sorted(int(p.name) for p in (tmp_path / "d" / "checkpoints").iterdir()) == [0, 18]
    checkpointed = train.train_and_evaluate(_config(shared_data, tfds_dir, **every, max_steps=30), tmp_path / "d")
    assert [r["step"] for r in checkpointed] == [0, 30]
    assert strip(checkpointed) == strip(sparse)


def test_calls_of_several_steps_train_the_same_run_and_resume_it_bit_for_bit(shared_data, tfds_dir, tmp_path,
                                                                             monkeypatch):
    """--steps-per-call 4 against 1: the same run (training steps in loops of up to 4; evaluations of 6 and 4
    batches in calls of 4 and 2 and of 4, their sums carried from call to call), the windows ending at call
    boundaries; a run stopped at step 11 (inside a call) resumes to the same records bit for bit: one program
    serves every call. (A program with a loop may round differently from the step alone: with gonjax's own
    compiler options the GON's are equal to the bit, benchmarks/README.md "Steps per call"; under this suite's
    fast-compile flags they are not, hence the tolerance between K = 4 and K = 1.)"""
    monkeypatch.setattr(train, "LOG_EVERY", 5)
    common = dict(epochs=2, eval_batches=6)
    one = train.train_and_evaluate(_config(shared_data, tfds_dir, **common, steps_per_call=1), tmp_path / "one")
    four = train.train_and_evaluate(_config(shared_data, tfds_dir, **common, steps_per_call=4), tmp_path / "four")
    assert [r["step"] for r in four] == [0, 18, 36]
    for a, b in zip(four, one):  # a batch or key out of place would be 1e-2 away
        for key in {"train_sse", "test_sse", "train_loss", "mean_step_loss"} & set(b):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    windows = [json.loads(line) for line in (tmp_path / "four" / "train_metrics.jsonl").read_text().splitlines()]
    # Calls from each epoch's start: 0-4, 4-8, 8-12, 12-16, 16-18; 18-22, ..., 30-34, 34-36. A window ends at
    # the first call boundary at or after each multiple of 5, and at each epoch's end.
    assert [w["step"] for w in windows] == [8, 12, 16, 18, 22, 26, 30, 36]
    train.train_and_evaluate(_config(shared_data, tfds_dir, **common, steps_per_call=4, max_steps=11),
                             tmp_path / "resumed")
    resumed = train.train_and_evaluate(_config(shared_data, tfds_dir, **common, steps_per_call=4),
                                       tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [0, 11, 18, 36]
    timing = ("seconds", "per_s", "mean_step_loss")  # wall times, and step losses summed in other groupings
    strip = lambda rs: [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rs]
    assert strip(resumed)[2:] == strip(four)[1:]


def test_finished_run_is_left_alone(shared_data, tfds_dir, tmp_path, capsys):
    config = _config(shared_data, tfds_dir, max_steps=2)
    train.train_and_evaluate(config, tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir() if p.is_file()}
    records = train.train_and_evaluate(config, tmp_path / "run")
    assert "already finished" in capsys.readouterr().out
    assert [r["step"] for r in records] == [0, 2]
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir() if p.is_file()}
    rewritten = ("config.json", "data.json", ".lock")  # the lock is taken again to look
    assert {k: v for k, v in after.items() if k not in rewritten} == \
        {k: v for k, v in before.items() if k not in rewritten}


def test_workdir_of_another_run_or_not_a_run_is_refused(shared_data, tfds_dir, tmp_path):
    train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=1), tmp_path / "run")
    with pytest.raises(UsageError, match=r"holds a different run \(lr: 0.0002 there vs 0.001 now\)"):
        train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=1, lr=1e-3), tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.txt").write_text("precious")
    with pytest.raises(UsageError, match="is not a gonjax run"):
        train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=1), tmp_path / "other")
    assert (tmp_path / "other" / "results.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=r"cannot use --workdir .*/file/run \(Not a directory\)"):
        train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=1), tmp_path / "file" / "run")


def test_non_finite_loss_stops_the_run_before_checkpointing(shared_data, tfds_dir, tmp_path, monkeypatch):
    def exploding(config, nc):
        model = zoo.gon(config, nc)

        def apply(params, state, batch, rng, step=0):
            loss, aux = model.apply(params, state, batch, rng, step)
            return loss * jnp.inf, aux

        return zoo.Model(model.name, model.init, apply)

    monkeypatch.setitem(zoo.MODELS, "gon", exploding)
    with pytest.raises(DivergedError, match="non-finite training loss at steps .*; lower --lr or "
                                            "--latent-step-size, or check the data"):
        train.train_and_evaluate(_config(shared_data, tfds_dir, epochs=4), tmp_path / "run")
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [0]


def test_partial_evaluation_is_recorded(shared_data, tfds_dir, tmp_path):
    records = train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=1, eval_batches=2), tmp_path / "run")
    assert all(r["eval_batches"] == 2 for r in records)
    full = train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=1), tmp_path / "full")
    assert "eval_batches" not in full[0] and full[0]["train_sse"] != records[0]["train_sse"]
    # More batches than a split has (COIL-20's test split is 4 batches of 64) is a full pass: not marked partial.
    whole = train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=1, eval_batches=1000),
                                     tmp_path / "whole")
    assert all("eval_batches" not in r for r in whole)
    assert whole[-1]["test_sse"] == pytest.approx(full[-1]["test_sse"], rel=1e-6)


def test_cpu_compiler_options_keep_ynnpack_to_dots_and_compile(monkeypatch):
    from gonjax import xla
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla.compiler_options("cpu") == xla.CPU_OPTIONS  # this jaxlib knows the option
    assert xla.compiler_options("gpu") is None
    # What the user sets in XLA_FLAGS wins: gonjax's per-program options would otherwise override it.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
    assert xla.compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3 --xla_cpu_experimental_ynn_fusion_type=X")
    assert xla.compiler_options("cpu") is None
    a = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(xla.jit(lambda x: x @ x)(a)), a @ a, rtol=1e-5, atol=1e-5)


def test_training_windows_record_the_step_losses(shared_data, tfds_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "LOG_EVERY", 5)
    config = _config(shared_data, tfds_dir, epochs=2, eval_batches=1, steps_per_call=1)  # windows of single steps
    records = train.train_and_evaluate(config, tmp_path / "run")
    windows = [json.loads(line) for line in (tmp_path / "run" / "train_metrics.jsonl").read_text().splitlines()]
    ends = [5, 10, 15, 18, 20, 25, 30, 35, 36]  # every 5th step, and each epoch's end (18 steps)
    assert [w["step"] for w in windows] == ends
    assert [w["steps"] for w in windows] == [5, 5, 5, 3, 2, 5, 5, 5, 1]
    assert all(w["images_per_s"] == pytest.approx(64 * w["steps_per_s"], rel=1e-3) for w in windows)

    # Replay the run's steps here and average their losses: the record's per-epoch mean and the windows agree.
    data = input_pipeline.load_dataset("coil20", 32, data_dir=config.data_dir)
    model = zoo.build_model(config, nc=1)
    optimizer = steps.make_optimizer(config)
    init_rng, train_rng, _, _ = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    state = steps.create_train_state(model, optimizer, init_rng, jnp.asarray(data.train[:64]))
    step_fn = xla.jit(steps.make_train_step(model, optimizer))  # compiled as the trainer compiles it
    losses = []
    for epoch in range(2):
        for batch in input_pipeline.train_batches(data.train, 64, config.seed, epoch):
            state, metrics = step_fn(state, jnp.asarray(batch), train_rng)
            losses.append(float(metrics["loss"]))
    # rtol: the trainer's program gathers its batches itself; compiled at the suite's LLVM -O0 with the older loop
    # emitters it rounds differently from this plain step (3e-5 apart after 5 steps). A window one step off is
    # 1e-3 away.
    np.testing.assert_allclose([w["train_loss"] for w in windows],
                               [np.mean(losses[a:b]) for a, b in zip([0] + ends[:-1], ends)], rtol=2e-4)
    assert records[1]["mean_step_loss"] == pytest.approx(np.mean(losses[:18]), rel=2e-4)
    assert records[2]["mean_step_loss"] == pytest.approx(np.mean(losses[18:]), rel=2e-4)
    assert "mean_step_loss" not in records[0] and records[2]["steps_per_s"] > 0


def test_a_stop_request_is_honoured_between_steps(shared_data, tfds_dir, tmp_path):
    """The CLIs' Ctrl-C / SIGTERM flag is polled at safe points: asked for once epoch 1 is recorded, the run stops
    at the first poll after (before epoch 2's first step), keeping its last checkpoint (resuming from it is
    test_resumed_run_reproduces_an_uninterrupted_one)."""
    metrics = tmp_path / "run" / "metrics.jsonl"
    polls_after = []

    def should_stop():
        requested = metrics.exists() and len(metrics.read_text().splitlines()) >= 2
        if requested:
            polls_after.append(1)
        return requested

    config = _config(shared_data, tfds_dir, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, tmp_path / "run", should_stop=should_stop)
    assert len(polls_after) == 1
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 18]
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [0, 18]
    windows = [json.loads(line) for line in (tmp_path / "run" / "train_metrics.jsonl").read_text().splitlines()]
    assert windows[-1]["step"] == 18  # no step of epoch 2 was taken


def test_pictures_are_drawn_at_a_sparse_schedule_of_epochs():
    drawn = [e for e in range(0, 501) if train.draws_pictures(e, last=e == 437)]
    assert drawn == [*range(11), 20, 30, 40, 50, 60, 70, 80, 90, 100, 150, 200, 250, 300, 350, 400, 437, 450, 500]
    assert train.draws_pictures(3.5, last=False)  # a stop in the middle of an epoch


@pytest.mark.parametrize("overrides, fragment", [
    ({"batch_size": 300}, "--batch-size 300 is larger than a split of coil20 (1152 train / 288 test images)"),
    ({"latent_sigma": float("nan")}, "--latent-sigma must be a finite number"),
    ({"lr": float("inf")}, "--lr must be a finite number"),
    ({"seed": -1}, "--seed must be an integer from 0"),
    ({"seed": 2**64}, "--seed must be an integer from 0"),
])
def test_bad_settings_fail_before_the_run_folder_is_claimed(overrides, fragment, tmp_path):
    with pytest.raises(UsageError, match=re.escape(fragment)):
        train.train_and_evaluate(Config(**{**TINY, **overrides}), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing left that would block the corrected rerun


def test_torn_or_missing_metrics_rows_are_survived(shared_data, tfds_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=2, eval_batches=1), run)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 0.2, "st')  # a crash in the middle of a write
    records = train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=3, eval_batches=1), run)
    assert [r["step"] for r in records] == [0, 2, 3]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [0, 2, 3]

    metrics.unlink()  # lost altogether: training goes on from the checkpoint and says what cannot be recovered
    capsys.readouterr()
    records = train.train_and_evaluate(_config(shared_data, tfds_dir, max_steps=4, eval_batches=1), run)
    assert [r["step"] for r in records] == [3, 4]
    assert "no rows before step 3" in capsys.readouterr().err


def _events(run):
    """The run's TensorBoard events as TensorBoard itself loads them: ({tag: [(step, value)]}, {tag: [step]})."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    images = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    return scalars, images


def test_tensorboard_events_mirror_the_records_and_a_resume_never_duplicates(shared_data, tfds_dir, tmp_path):
    run = tmp_path / "run"
    records = train.train_and_evaluate(_config(shared_data, tfds_dir, epochs=2, max_steps=20, eval_batches=2), run)
    assert [r["step"] for r in records] == [0, 18, 20]
    # A kill after the evaluation of step 20 was written but before its checkpoint: the rerun resumes from 18.
    shutil.rmtree(run / "checkpoints" / "20")
    records = train.train_and_evaluate(_config(shared_data, tfds_dir, epochs=2, eval_batches=2), run)
    assert [r["step"] for r in records] == [0, 18, 36]
    scalars, images = _events(run)
    for metric in ("sse", "loss"):
        for split in ("train", "test"):
            assert scalars[f"{metric}/{split}"] == [(r["step"], pytest.approx(r[f"{split}_{metric}"], rel=1e-6))
                                                    for r in records]
    windows = [json.loads(line) for line in (run / "train_metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in scalars["loss/window"]] == [w["step"] for w in windows] == [18, 36]
    assert images["pictures/recon"] == [0, 18, 36]  # epochs 0, 1, 2; the stop's step-20 picture is gone with it
