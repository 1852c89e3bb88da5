"""The one trainer, generic over `zoo.Model`s: jitted steps, evaluation, metrics, pictures, checkpoints, resume.

`train_and_evaluate(config, workdir)` runs a whole experiment into `workdir`:
  config.json      the run's Config
  data.json        how the dataset was prepared (TFDS builder, version, split sizes, split seed)
  metrics.jsonl    one JSON object per evaluation (before training, after every epoch, at --max-steps)
  train_metrics.jsonl  the training loss averaged over windows of LOG_EVERY steps, with steps/s and images/s
  recon_<E>.png    first 64 test images beside their reconstructions after epoch E (draws_pictures says which
                   epochs; recon_step<N>.png for a stop mid-epoch)
  samples_<E>.png  64 images decoded from the prior, for models that have one (V-GON, VAE)
  curves.png       train/test SSE per image against epoch
  checkpoints/     orbax checkpoints of step, params, BN state and optimizer state, after every evaluation
Rerunning on an unfinished workdir resumes from its latest checkpoint with the same data order and keys, so it
reproduces an uninterrupted run; a finished one is left as it is.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from gonjax import files, plots, xla
from gonjax.catalog import SPLIT_SIZES
from gonjax.config import Config
from gonjax.data import input_pipeline
from gonjax.errors import DivergedError, UsageError
from gonjax.zoo import Model, build_model

LOG_EVERY = 50  # training steps per window of train_metrics.jsonl, progress-bar update and non-finite check


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step reads and writes; checkpointed as a whole.

    `latent_bank` holds the latents of the model's last `latent_bank_batches` training batches (batch i of the
    ring at rows i*B:(i+1)*B), which the Implicit GON samples from (GON-SPEC 4.6); empty for other models.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    latent_bank: jax.Array


def make_optimizer(config: Config, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """Adam of GON-SPEC 5: betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping; the learning rate drops
    to config.lr_drop_to at epoch config.lr_drop_epoch when one is set (Implicit GON on COIL-20)."""
    lr = config.lr
    if config.lr_drop_epoch is not None:
        lr = optax.piecewise_constant_schedule(
            config.lr, {config.lr_drop_epoch * steps_per_epoch: config.lr_drop_to / config.lr})
    return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)


def create_train_state(model: Model, optimizer: optax.GradientTransformation, rng: jax.Array,
                       sample_batch: jax.Array, variables: dict | None = None) -> TrainState:
    """Step 0 with fresh Adam moments, from `model.init` or from given `variables` (e.g. ported weights)."""
    if variables is None:
        variables = model.init(rng, sample_batch)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    params = variables["params"]
    _, (_, output) = jax.eval_shape(model.apply, params, variables.get("batch_stats", {}), sample_batch, rng)
    bank_rows = model.latent_bank_batches * sample_batch.shape[0]
    bank_shape = (bank_rows, *output.latent.shape[1:]) if bank_rows else (0,)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=optimizer.init(params),
                      latent_bank=jnp.zeros(bank_shape, sample_batch.dtype))


def make_train_step(model: Model, optimizer: optax.GradientTransformation):
    """train_step(state, batch, rng) -> (state, metrics): one Adam step on the model's loss.

    The key of a step is fold_in(rng, step), so no key is threaded through Python. Jit it with
    `donate_argnums=0`.
    """

    def train_step(state: TrainState, batch: jax.Array, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        grad_fn = jax.value_and_grad(model.apply, has_aux=True)
        (_, (batch_stats, output)), grads = grad_fn(state.params, state.batch_stats, batch, step_rng, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        bank = state.latent_bank
        if model.latent_bank_batches:
            slot = (state.step % model.latent_bank_batches) * batch.shape[0]
            bank = jax.lax.dynamic_update_slice_in_dim(bank, output.latent.astype(bank.dtype), slot, axis=0)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                                  latent_bank=bank)
        return new_state, output.metrics

    return train_step


def make_eval_step(model: Model):
    """eval_step(state, batch, rng) -> (metrics, reconstruction). BN uses the batch's statistics, as in training
    (GON-SPEC 3); running averages are left as they are."""

    def eval_step(state: TrainState, batch: jax.Array, rng: jax.Array):
        _, (_, output) = model.apply(state.params, state.batch_stats, batch, rng, state.step)
        return output.metrics, output.reconstruction

    return eval_step


def evaluate(eval_step, state: TrainState, images: np.ndarray, batch_size: int, rng: jax.Array):
    """Mean of every metric over a full pass in batches of `batch_size` (drop last), and the first batch with
    its reconstruction. Metrics are summed on the device and read once."""
    sums, first = None, None
    count = 0
    for index, batch in enumerate(input_pipeline.prefetch_to_device(
            input_pipeline.eval_batches(images, batch_size))):
        metrics, reconstruction = eval_step(state, batch, jax.random.fold_in(rng, index))
        sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
        if first is None:
            first = (batch, reconstruction)
        count += 1
    means = {name: float(value) / count for name, value in jax.device_get(sums).items()}
    return means, (np.asarray(first[0]), np.asarray(first[1]))


def time_steps(config: Config, image_shape: tuple[int, int, int], repeats: int = 3) -> tuple[float, float]:
    """Median seconds of one training step and of one evaluation batch of `config` on this machine, measured on
    random images of `image_shape` after a first (compiling) call. For planning, not benchmarking."""
    model = build_model(config, image_shape[-1])
    rng = jax.random.PRNGKey(0)
    images = jax.random.uniform(rng, (config.batch_size, *image_shape))
    optimizer = make_optimizer(config)
    state = create_train_state(model, optimizer, rng, images)
    train_step = xla.jit(make_train_step(model, optimizer), donate_argnums=0)
    eval_step = xla.jit(make_eval_step(model))
    train_times, eval_times = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(train_step(state, images, rng))
        train_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        jax.block_until_ready(eval_step(state, images, rng))
        eval_times.append(time.perf_counter() - start)
    return float(np.median(train_times[1:])), float(np.median(eval_times[1:]))


class RunDir:
    """A run's folder: refuses to touch anything that is not this run, writes files atomically."""

    def __init__(self, path: Path, config: Config):
        self.path = Path(path)
        self._claim(config)

    def _claim(self, config: Config) -> None:
        config_file = self.path / "config.json"
        if config_file.exists():
            try:
                saved = Config.load(config_file)
            except (ValueError, TypeError) as error:
                raise UsageError(f"{config_file} is unreadable ({error}); choose another --workdir") from None
            diff = saved.differences(config)
            if diff:
                listed = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
                raise UsageError(f"--workdir {self.path} holds a different run ({listed}); "
                                 "choose another --workdir or rerun with its settings")
        elif self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise UsageError(f"--workdir {self.path} exists and is not a gonjax run; choose another --workdir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.write_text("config.json", config.to_json() + "\n")
        except OSError as error:
            raise UsageError(f"cannot write to --workdir {self.path} ({error.strerror or error}); "
                             "choose a writable folder") from None

    def write_text(self, name: str, text: str) -> None:
        files.write_atomic(self.path / name, text)

    def read_metrics(self, up_to_step: int, name: str = "metrics.jsonl") -> list[dict]:
        """Records of a JSON-lines file up to `up_to_step`; later ones (written after the last checkpoint of an
        interrupted run) are dropped from the file."""
        records, torn = files.read_jsonl(self.path / name)
        kept = [r for r in records if r["step"] <= up_to_step]
        if torn or len(kept) != len(records):  # rows past the checkpoint or a torn last line: rewrite
            self.write_text(name, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append_metrics(self, record: dict, name: str = "metrics.jsonl") -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record) + "\n")


class StepMeter:
    """Training loss and speed over a window of steps: the step losses are summed on the device and read once
    per window (which also waits for the window's last step)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.restart()

    def restart(self) -> None:
        self.loss_sum, self.steps, self.started = None, 0, time.perf_counter()

    def add(self, loss: jax.Array) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.steps += 1

    def read(self) -> dict:
        """{"loss": mean step loss, "steps": n, "seconds": wall time, "steps_per_s", "images_per_s"}; restarts."""
        loss = float(self.loss_sum) / self.steps
        seconds = time.perf_counter() - self.started
        window = {"loss": loss, "steps": self.steps, "seconds": seconds, "steps_per_s": self.steps / seconds,
                  "images_per_s": self.steps * self.batch_size / seconds}
        self.restart()
        return window


def _state_dict(state: TrainState) -> dict:
    """What a checkpoint holds (orbax cannot save the empty latent bank of models that keep none)."""
    saved = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
             "opt_state": state.opt_state}
    if state.latent_bank.size:
        saved["latent_bank"] = state.latent_bank
    return saved


def _restore(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _state_dict(state))
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
    return state.replace(**restored)


def load_run(workdir) -> tuple[Config, Model, TrainState, dict]:
    """The config, model, latest checkpointed state and data description of a run folder."""
    path = Path(workdir)
    if not (path / "config.json").is_file() or not (path / "data.json").is_file():
        raise UsageError(f"{path} is not a gonjax run folder (no config.json / data.json)")
    config = Config.load(path / "config.json")
    data_info = json.loads((path / "data.json").read_text())
    model = build_model(config, data_info["image_shape"][-1])
    sample_batch = jnp.zeros((config.batch_size, *data_info["image_shape"]), jnp.float32)
    state = create_train_state(model, make_optimizer(config), jax.random.PRNGKey(0), sample_batch)
    checkpoints = (path / "checkpoints").absolute()
    if not checkpoints.is_dir():
        raise UsageError(f"{path} has no checkpoints yet; train it first")
    manager = ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(read_only=True))
    if manager.latest_step() is None:
        raise UsageError(f"{path} has no checkpoints yet; train it first")
    state = _restore(manager, state)
    manager.close()
    return config, model, state, data_info


def _check_batch_size(config: Config, train_images: int, test_images: int) -> None:
    if config.batch_size > min(train_images, test_images):
        raise UsageError(f"--batch-size {config.batch_size} is larger than a split of {config.dataset} "
                         f"({train_images} train / {test_images} test images)")


def draws_pictures(epoch: int | float, last: bool) -> bool:
    """Whether the evaluation after `epoch` draws reconstructions (and samples): epochs 0-10, every 10th up to
    100, every 50th after that, the run's last evaluation and any stop in the middle of an epoch. (A picture
    every epoch made long COIL-20 runs spend more time drawing than training, and 200 MB of PNGs.)"""
    if last or not float(epoch).is_integer():
        return True
    return epoch <= 10 or (epoch <= 100 and epoch % 10 == 0) or epoch % 50 == 0


def _epoch_label(step: int, steps_per_epoch: int) -> int | float:
    epoch = step / steps_per_epoch
    return int(epoch) if step % steps_per_epoch == 0 else round(epoch, 4)


def train_and_evaluate(config: Config, workdir, should_stop: Callable[[], bool] | None = None) -> list[dict]:
    """Train `config.model` on `config.dataset`, evaluating before training and after every epoch.

    `should_stop`, polled before every training step, stops the run with KeyboardInterrupt when it returns True
    (the CLIs pass their Ctrl-C / SIGTERM flag). Returns the metric records of the whole run (also in
    workdir/metrics.jsonl).
    """
    config.validate()
    _check_batch_size(config, *SPLIT_SIZES[config.dataset])  # before the run folder is claimed: no debris
    run = RunDir(Path(workdir), config)

    model = build_model(config, input_pipeline.CHANNELS[config.dataset])
    data = input_pipeline.load_dataset(config.dataset, image_size=model.image_size, data_dir=config.data_dir,
                                       manual_dir=config.manual_dir)
    run.write_text("data.json", json.dumps(data.info, indent=2) + "\n")
    _check_batch_size(config, len(data.train), len(data.test))  # the files read (e.g. a small CIFAR-10 folder)
    steps_per_epoch = input_pipeline.num_batches(len(data.train), config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    optimizer = make_optimizer(config, steps_per_epoch)
    init_rng, train_rng, eval_rng, sample_rng = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    state = create_train_state(model, optimizer, init_rng, jnp.asarray(data.train[:config.batch_size]))
    train_step = xla.jit(make_train_step(model, optimizer), donate_argnums=0)
    eval_step = xla.jit(make_eval_step(model))
    sample = xla.jit(model.sample, static_argnums=3) if model.sample else None

    manager = ocp.CheckpointManager(
        (run.path / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
    if manager.latest_step() is not None:
        state = _restore(manager, state)
    step = int(state.step)
    records = run.read_metrics(up_to_step=step)
    windows = run.read_metrics(up_to_step=step, name="train_metrics.jsonl")
    if step >= total_steps and records and records[-1]["step"] == step:
        print(f"{run.path}: this run already finished at step {step} (epoch {records[-1]['epoch']}); "
              "raise --epochs or --max-steps to train on, or choose another --workdir", flush=True)
        manager.close()
        return records
    if step:
        print(f"{run.path}: resuming from step {step}", flush=True)
        if not records or records[0]["step"] != 0:
            print(f"{run.path}: metrics.jsonl has no rows before step {records[0]['step'] if records else step}; "
                  "they cannot be recovered (only the latest checkpoints are kept), so the table starts there",
                  file=sys.stderr, flush=True)

    train_seconds = records[-1]["seconds"] if records else 0.0

    def evaluate_and_record():
        eval_start = time.perf_counter()
        record = {"epoch": _epoch_label(step, steps_per_epoch), "step": step}
        split_rngs = jax.random.split(jax.random.fold_in(eval_rng, step))
        for split, images, rng in (("train", data.train, split_rngs[0]), ("test", data.test, split_rngs[1])):
            if config.eval_batches is not None:
                images = images[:config.eval_batches * config.batch_size]
            means, pictures = evaluate(eval_step, state, images, config.batch_size, rng)
            record.update({f"{split}_{name}": value for name, value in means.items()})
        if config.eval_batches is not None:
            record["eval_batches"] = config.eval_batches  # partial passes: say so next to the numbers
        epoch_start = (step - 1) // steps_per_epoch * steps_per_epoch
        since = [w for w in windows if epoch_start < w["step"] <= step]
        if since:  # the steps of this epoch so far (J's per-epoch training loss), and their speed
            steps = sum(w["steps"] for w in since)
            record["mean_step_loss"] = sum(w["train_loss"] * w["steps"] for w in since) / steps
            record["steps_per_s"] = steps / sum(w["seconds"] for w in since)
        record["seconds"] = round(train_seconds, 3)
        record["eval_seconds"] = round(time.perf_counter() - eval_start, 3)
        bad = [k for k, v in record.items() if not math.isfinite(v)]
        if bad:
            raise DivergedError(f"non-finite evaluation metrics at step {step} ({', '.join(bad)}); "
                                "lower --lr or check the data")
        run.append_metrics(record)
        records.append(record)
        if draws_pictures(record["epoch"], last=step >= total_steps):
            suffix = f"{record['epoch']}" if isinstance(record["epoch"], int) else f"step{step}"
            plots.save_reconstructions(run.path / f"recon_{suffix}.png", *pictures,
                                       title=f"(epoch {record['epoch']})")
            if sample is not None:
                samples = sample(state.params, state.batch_stats, jax.random.fold_in(sample_rng, step), 64)
                plots.save_grids(run.path / f"samples_{suffix}.png", [plots.image_grid(np.asarray(samples))],
                                 [f"samples from the prior (epoch {record['epoch']})"])
        metric = model.table_metric
        plots.save_curves(run.path / "curves.png", records, metric, "SSE / image" if metric == "sse" else "MSE",
                          windows)
        if step not in manager.all_steps():  # already saved when metrics.jsonl lost this row
            manager.save(step, args=ocp.args.StandardSave(_state_dict(state)), force=True)
        print(f"epoch {record['epoch']} step {step}: train {metric} {record[f'train_{metric}']:.6g} "
              f"test {metric} {record[f'test_{metric}']:.6g} loss {record['train_loss']:.6g}/"
              f"{record['test_loss']:.6g} ({record['eval_seconds']:.1f}s eval)", flush=True)

    meter = StepMeter(config.batch_size)

    def record_window() -> dict:
        window = meter.read()
        if not math.isfinite(window["loss"]):
            first = step - window["steps"] + 1
            raise DivergedError(f"non-finite training loss at steps {first}-{step}; lower --lr or check the data")
        row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "train_loss": window["loss"],
               "steps": window["steps"], "seconds": round(window["seconds"], 4),
               "steps_per_s": window["steps_per_s"], "images_per_s": window["images_per_s"]}
        run.append_metrics(row, "train_metrics.jsonl")
        windows.append(row)
        return row

    show_progress = sys.stderr.isatty()
    try:
        if not records or records[-1]["step"] != step:
            evaluate_and_record()
        while step < total_steps:
            epoch, start = divmod(step, steps_per_epoch)
            count = min(steps_per_epoch - start, total_steps - step)
            batches = input_pipeline.prefetch_to_device(
                input_pipeline.train_batches(data.train, config.batch_size, config.seed, epoch, start))
            bar = tqdm(total=count, desc=f"epoch {epoch + 1}", disable=not show_progress, leave=False)
            epoch_start = time.perf_counter()
            meter.restart()
            for batch in islice(batches, count):
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt
                state, metrics = train_step(state, batch, train_rng)
                meter.add(metrics["loss"])
                step += 1
                bar.update()
                if step % LOG_EVERY == 0:
                    row = record_window()
                    bar.set_postfix(loss=f"{row['train_loss']:.5f}", images_per_s=f"{row['images_per_s']:.0f}")
            batches.close()  # stops the prefetch thread when the epoch ends early (--max-steps)
            if meter.steps:
                record_window()  # the epoch's last, shorter window; also waits for its last step
            train_seconds += time.perf_counter() - epoch_start
            bar.close()
            evaluate_and_record()
    finally:  # also on errors and Ctrl-C: a checkpoint being written is finished, never left half-written
        manager.wait_until_finished()
        manager.close()
    return records
