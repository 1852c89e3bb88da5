"""The one trainer, generic over `zoo.Model`s: `train_and_evaluate(config, workdir)` trains a run into its folder.

The loop (`_train_group`) reads top to bottom: train an epoch's steps in calls of --steps-per-call steps over the
splits held on the device (`gonjax.loops`), logging the loss about every LOG_EVERY steps; then, each on its own
cadence, evaluate (`--eval-every`), draw pictures (`draws_pictures`) and checkpoint (`--checkpoint-every`). The
steps themselves are `gonjax.steps`; checkpoints `gonjax.checkpoints`; the folder `gonjax.rundir`. The loop, its
periodic actions and the bookkeeping of stacked seeds and of several processes stay in this one module (about 570
lines), in that order, so that everything the loop calls is read right after it. A run folder holds:

  config.json      the run's Config
  data.json        how the dataset was prepared (TFDS builder, version, split sizes, split seed)
  metrics.jsonl    one JSON object per evaluation (before training, after every --eval-every-th epoch, at the
                   end and at --max-steps)
  train_metrics.jsonl  the training loss averaged over windows of steps, with steps/s and images/s: a window ends
                   at the first call boundary at or after each multiple of LOG_EVERY, and at each epoch's end
  recon_<E>.png    first 64 test images beside their reconstructions after epoch E (draws_pictures says which
                   epochs; recon_step<N>.png for a stop mid-epoch)
  samples_<E>.png  64 images decoded from the prior, for models that have one (V-GON, VAE)
  curves.png       train/test metric against epoch
  tensorboard/     the same records and pictures as TensorBoard events (gonjax.events)
  checkpoints/     orbax checkpoints of step, params, BN state and optimizer state
  damaged_checkpoints/  checkpoints found damaged on resume, set aside (the run resumed from an intact one)
  .lock            held (flock) while a process works in the folder
Rerunning on an unfinished workdir resumes from its latest checkpoint with the same data order and keys, so it
reproduces an uninterrupted run; a finished one is left as it is.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from gonjax import checkpoints, parallel, plots, resources, xla
from gonjax.events import EventLog
from gonjax.catalog import SPLIT_SIZES
from gonjax.config import Config, backend_steps_per_call
from gonjax.data import input_pipeline
from gonjax.data.batches import epoch_order, num_batches
from gonjax.errors import DivergedError, UsageError, stop_if_requested
from gonjax.rundir import RunDir
from gonjax.loops import DeviceSplit, Loops, build_loops, call_plan, place_split
from gonjax.steps import TrainState, build_steps, create_train_state, eval_keys, make_optimizer, wait_for
from gonjax.zoo import Model, build_model

LOG_EVERY = 50  # training steps per window of train_metrics.jsonl, progress-bar update and non-finite check


def train_and_evaluate(config: Config, workdir, should_stop: Callable[[], bool] | None = None) -> list[dict]:
    """Train `config.model` on `config.dataset`, evaluating before training, after every `config.eval_every`-th
    epoch and at the end, checkpointing after every `config.checkpoint_cadence`-th epoch and at the end.
    Evaluations read the state and never change it, so their cadence leaves the training bit for bit the same.

    The steps run on `config.devices` devices (default: one; several processes: all of theirs; `gonjax.parallel`),
    the same math as on one. `should_stop`, polled before every call of training steps or evaluation batches
    (`config.steps_per_call` of them; `gonjax.loops`), stops the run
    with KeyboardInterrupt when it returns True (the CLIs pass their Ctrl-C / SIGTERM flag); the latest
    checkpoint is kept. Returns the metric records of the whole run (also in workdir/metrics.jsonl).
    """
    return _train_runs([config], [Path(workdir)], should_stop)[0]


def train_seeds(config: Config, seeds: list[int], workdir,
                should_stop: Callable[[], bool] | None = None) -> list[list[dict]]:
    """`config` once per seed in one program: the train states stacked along a replica axis, the steps vmapped
    over it (on a mesh, replicas split over its `replica` axis as far as the device count allows).

    Seed k trains into `workdir/seed<k>`, an ordinary run folder, as `train_and_evaluate(replace(config,
    seed=k), workdir/seed<k>)` would (the same init, data order and keys); each resumes on its own, and seeds
    found at different steps are first brought level. Returns each seed's records.
    """
    configs = [dataclasses.replace(config, seed=seed) for seed in seeds]
    return _train_runs(configs, [Path(workdir) / f"seed{seed}" for seed in seeds], should_stop)


def _train_runs(configs: list[Config], workdirs: list[Path], should_stop) -> list[list[dict]]:
    """Check everything checkable, claim the run folders (process 0), then `_train`."""
    for config in configs:
        config.validate()
    config = configs[0]
    _check_batch_size(config, *SPLIT_SIZES[config.dataset])  # before the run folder is claimed: no debris
    model = build_model(config, input_pipeline.CHANNELS[config.dataset])
    parallel.make_layout(config.devices, config.batch_size, len(configs))  # a bad --devices: nothing written
    _check_memory(config, model, len(configs))
    runs = [RunDir(workdir, config, parallel.is_primary(), claim=False) for config, workdir in zip(configs, workdirs)]
    parallel.sync("gonjax: run folders checked")  # by every process before process 0 writes in them
    try:
        for run in runs:
            run.claim()
        parallel.sync("gonjax: run folders claimed")
        return _train(runs, model, should_stop)
    finally:
        for run in runs:
            run.release()


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every group of replicas of one `_train` shares."""

    model: Model
    optimizer: optax.GradientTransformation
    data: input_pipeline.Dataset
    steps_per_epoch: int
    total_steps: int
    should_stop: Callable[[], bool] | None

    def epoch_label(self, step: int) -> int | float:
        """The epoch a step ends: an int at an epoch's end, else a fraction (a stop mid-epoch, --max-steps)."""
        epoch = step / self.steps_per_epoch
        return int(epoch) if step % self.steps_per_epoch == 0 else round(epoch, 4)

    def due(self, step: int, every: int) -> bool:
        """Whether a periodic action of cadence `every` epochs runs after `step`: at every `every`-th epoch's
        end and at the run's last step."""
        return step >= self.total_steps or (step % self.steps_per_epoch == 0
                                             and step // self.steps_per_epoch % every == 0)

    def checkpoint_only(self, step: int, config: Config) -> bool:
        """Whether `step` is one the loop checkpoints without evaluating (--checkpoint-every more often than
        --eval-every): a run resumed there has no evaluation to redo. Every other checkpoint follows one."""
        return 0 < step < self.total_steps and self.due(step, config.checkpoint_cadence) and not self.due(
            step, config.eval_every)


@dataclasses.dataclass
class _Replica:
    """One seed's run in `_train`: its folder, checkpoints, records and keys, and its state between groups."""

    run: RunDir
    manager: ocp.CheckpointManager
    state: TrainState
    records: list[dict]
    windows: list[dict]
    train_rng: np.ndarray
    eval_rng: np.ndarray
    sample_rng: np.ndarray
    events: EventLog | None = None  # process 0's TensorBoard events
    train_seconds: float = 0.0
    warned: bool = False  # a flat loss is warned about once per process
    trained: bool = False  # trained in this process (a seed brought level is not one that had already finished)

    @property
    def config(self) -> Config:
        return self.run.config

    @property
    def step(self) -> int:
        return int(self.state.step)

    def has_record(self, step: int) -> bool:
        return bool(self.records) and self.records[-1]["step"] == step


def _train(runs: list[RunDir], model: Model, should_stop: Callable[[], bool] | None) -> list[list[dict]]:
    """train_and_evaluate's / train_seeds' work in their claimed run folders.

    Replicas found at different steps (a run stopped between two seeds' checkpoints, or trained alone further)
    are brought level first: those behind train together up to the next one's step, then all go on together.
    """
    config = runs[0].config
    if not parallel.is_primary():  # process 0 prepares the dataset (one writer in a shared data dir), then the rest
        parallel.sync("gonjax: dataset prepared")
    data = input_pipeline.load_dataset(config.dataset, image_size=model.image_size, data_dir=config.data_dir,
                                       manual_dir=config.manual_dir)
    if parallel.is_primary():
        parallel.sync("gonjax: dataset prepared")
    for run in runs:
        run.write_text("data.json", json.dumps(data.info, indent=2) + "\n")
    stop_if_requested(should_stop)  # a stop during data preparation, before compiling
    _check_batch_size(config, len(data.train_codes), len(data.test_codes))  # the files read (a small CIFAR-10)
    steps_per_epoch = num_batches(len(data.train_codes), config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = make_optimizer(config, steps_per_epoch)
    job = _Job(model, optimizer, data, steps_per_epoch, total_steps, should_stop)
    single = parallel.make_layout(config.devices, config.batch_size)
    sample_batch = jax.ShapeDtypeStruct((config.batch_size, *data.train_codes.shape[1:]), data.levels.dtype)
    init_state = jax.jit(lambda rng: create_train_state(model, optimizer, rng, jnp.zeros(sample_batch.shape,
                                                                                          sample_batch.dtype)),
                         out_shardings=single.state)
    replicas = []
    try:
        for run in runs:
            replicas.append(_open_replica(run, init_state, single, steps_per_epoch))
        while True:
            steps = sorted({replica.step for replica in replicas})
            if len(steps) == 1 or steps[0] >= total_steps or steps[1] > total_steps:
                for step in steps:  # one group left, or the others are past this run's end already
                    _train_group(job, [replica for replica in replicas if replica.step == step], total_steps)
                break
            _train_group(job, [replica for replica in replicas if replica.step == steps[0]], steps[1])
    finally:  # also on errors and Ctrl-C: a checkpoint being written is finished, never left half-written
        for replica in replicas:
            replica.manager.wait_until_finished()
            replica.manager.close()
            if replica.events is not None:
                replica.events.close()
    return [replica.records for replica in replicas]


def _open_replica(run: RunDir, init_state: Callable, layout: parallel.Layout, steps_per_epoch: int) -> _Replica:
    """A run's keys, its checkpoint manager and its latest intact state (damaged checkpoints set aside), or a
    fresh state; its records up to that state's step, and (process 0) its TensorBoard events rebuilt from them."""
    init_rng, train_rng, eval_rng, sample_rng = (
        np.asarray(key) for key in jax.random.split(jax.random.PRNGKey(run.config.seed), 4))
    state = init_state(layout.put(init_rng, layout.replicated))
    manager = checkpoints.open_manager(run.path, keep=run.config.keep_checkpoints)
    if manager.latest_step() is not None:

        def set_aside(step: int, reason: str) -> None:
            if run.primary:
                checkpoints.set_aside(run.path, step, reason)

        restored = checkpoints.restore_intact(manager, state, set_aside)
        parallel.sync("gonjax: checkpoints restored")
        manager.reload()
        if restored is not None:
            state = restored
        elif run.primary:
            print(f"{run.path}: no intact checkpoint is left; training starts again from step 0", file=sys.stderr,
                  flush=True)
    step = int(state.step)
    records = run.read_metrics(up_to_step=step)
    windows = run.read_metrics(up_to_step=step, name="train_metrics.jsonl")
    events = EventLog(run.path, records, windows, steps_per_epoch) if run.primary else None
    return _Replica(run=run, manager=manager, state=state, records=records, windows=windows,
                    train_rng=train_rng, eval_rng=eval_rng, sample_rng=sample_rng, events=events,
                    train_seconds=records[-1]["seconds"] if records else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# The loop

def _train_group(job: _Job, replicas: list[_Replica], target: int) -> None:
    """Train `replicas` (all at one step; stacked into one program when several) to step `target`, with the
    periodic actions after each epoch."""
    config = replicas[0].config
    step = replicas[0].step
    if step >= target and all(r.has_record(step) for r in replicas):
        if step >= job.total_steps:
            for r in (r for r in replicas if not r.trained):
                _say(f"{r.run.path}: this run already finished at step {step} (epoch {r.records[-1]['epoch']}); "
                     "raise --epochs or --max-steps to train on, or choose another --workdir")
        return
    _announce_resume(replicas, step)
    for r in replicas:
        r.trained = True
    group = _Group.build(job, replicas)
    if not all(r.has_record(step) for r in replicas) and not job.checkpoint_only(step, config):
        _evaluate_and_act(job, group, step)  # before training, or a record lost after its checkpoint
    show_progress = sys.stderr.isatty() and parallel.is_primary()
    meter = StepMeter(config.batch_size)
    while step < target:
        epoch, start = divmod(step, job.steps_per_epoch)
        stop = min(job.steps_per_epoch, start + target - step)
        order = group.order(epoch)
        bar = tqdm(total=stop - start, desc=f"epoch {epoch + 1}", disable=not show_progress, leave=False)
        epoch_start = time.perf_counter()
        meter.restart()
        try:
            for first, count in call_plan(start, stop, group.loops.steps_per_call):
                stop_if_requested(job.should_stop)
                group.state, metrics = group.loops.train(group.state, group.train_split, order, first, count,
                                                         group.train_rng)
                meter.add(metrics["loss"], count)
                step += count
                bar.update(count)
                if step // LOG_EVERY > (step - count) // LOG_EVERY:  # a multiple of LOG_EVERY reached in this call
                    window = _log_window(job, group, meter, step)
                    bar.set_postfix(loss=f"{window['loss']:.5f}", images_per_s=f"{window['images_per_s']:.0f}")
        finally:
            # Steps are dispatched asynchronously; a stop must not leave any running when the interpreter exits
            # (XLA then tears down under them: a segfault after "interrupted", seen on MNIST).
            wait_for(group.state)
        if meter.steps:
            _log_window(job, group, meter, step)  # the epoch's last, shorter window; also waits for its last step
        for r in replicas:
            r.train_seconds += time.perf_counter() - epoch_start
        bar.close()
        if step >= target or job.due(step, config.eval_every):
            _evaluate_and_act(job, group, step, group_end=step >= target)
        elif job.due(step, config.checkpoint_cadence):
            _checkpoint(group, step)
    for k, r in enumerate(replicas):  # the group's states, for a later group
        r.state = group.take(group.state, k)


def _announce_resume(replicas: list[_Replica], step: int) -> None:
    if not step:
        return
    for r in replicas:
        _say(f"{r.run.path}: resuming from step {step}")
        if (not r.records or r.records[0]["step"] != 0) and r.run.primary:
            print(f"{r.run.path}: metrics.jsonl has no rows before step "
                  f"{r.records[0]['step'] if r.records else step}; they cannot be recovered (only the "
                  "latest checkpoints are kept), so the table starts there", file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Group:
    """Replicas at one step trained as one program: their layout, jitted loops, (stacked) state and keys, and
    the dataset's splits on the device."""

    replicas: list[_Replica]
    layout: parallel.Layout
    loops: Loops
    sample: Callable | None  # the model's prior sampler, jitted (steps.Steps.sample)
    state: TrainState
    take: Callable  # take(state, k): replica k's state
    splits: dict[str, DeviceSplit]  # "train", "test"
    train_rng: jax.Array = None

    @classmethod
    def build(cls, job: _Job, replicas: list[_Replica]) -> "_Group":
        config = replicas[0].config
        layout = parallel.make_layout(config.devices, config.batch_size, len(replicas))
        if layout.stacked:
            state = xla.jit(lambda *states: jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states),
                            out_shardings=layout.state)(*(r.state for r in replicas))
            take = xla.jit(lambda state, k: jax.tree_util.tree_map(lambda leaf: leaf[k], state), static_argnums=1,
                           out_shardings=layout.replicated)
        else:
            state, take = replicas[0].state, (lambda state, k: state)
        per_call = backend_steps_per_call(config.steps_per_call, jax.default_backend(), config.model)
        loops = build_loops(job.model, job.optimizer, layout, config.batch_size,
                            min(per_call, job.steps_per_epoch))  # a call never crosses an epoch
        splits = {name: place_split(getattr(job.data, f"{name}_codes"), job.data.levels, layout)
                  for name in ("train", "test")}
        group = cls(replicas, layout, loops, build_steps(job.model, job.optimizer, layout).sample, state, take,
                    splits)
        group.train_rng = group.keys([r.train_rng for r in replicas])
        return group

    @property
    def train_split(self) -> DeviceSplit:
        return self.splits["train"]

    def keys(self, keys: list) -> jax.Array:
        """One key per replica, placed (stacked when the replicas are)."""
        return self.layout.put(np.stack(keys) if self.layout.stacked else keys[0], self.layout.replicated)

    def of_replica(self, value, k: int):
        """Replica k's part of an output of the group's steps."""
        return value[k] if self.layout.stacked else value

    def order(self, epoch: int) -> jax.Array:
        """The epoch's training order on the device (`batches.epoch_order`), each replica its own seed's
        (stacked)."""
        size = len(self.splits["train"].codes)
        orders = [epoch_order(size, r.config.seed, epoch).astype(np.int32) for r in self.replicas]
        return self.layout.put(np.stack(orders) if self.layout.stacked else orders[0], self.layout.replicated)

    def prefix(self, r: _Replica) -> str:
        """What a line about replica r starts with: its folder's name when several train together."""
        return f"{r.run.path.name}: " if len(self.replicas) > 1 else ""


# ---------------------------------------------------------------------------------------------------------------
# Periodic actions: the training-loss window, evaluation, pictures, checkpoints

def _log_window(job: _Job, group: _Group, meter: "StepMeter", step: int) -> dict:
    """Append the window's mean training loss to train_metrics.jsonl (each replica), fail fast on a non-finite
    loss, warn once about a loss that does not fall; the window (first replica's loss) for the progress bar."""
    window = meter.read()
    losses = np.atleast_1d(window["loss"])
    for k, r in enumerate(group.replicas):
        loss = float(losses[k])
        if not math.isfinite(loss):
            first = step - window["steps"] + 1
            raise DivergedError(f"{group.prefix(r)}non-finite training loss at steps {first}-{step}; "
                                f"{r.config.divergence_remedy()}, or check the data")
        row = {"step": step, "epoch": round(step / job.steps_per_epoch, 4), "train_loss": loss,
               "steps": window["steps"], "seconds": round(window["seconds"], 4),
               "steps_per_s": window["steps_per_s"], "images_per_s": window["images_per_s"]}
        r.run.append_metrics(row, "train_metrics.jsonl")
        r.windows.append(row)
        if r.events is not None:
            r.events.add_window(row)
        if not r.warned and _loss_is_flat(r.windows):
            r.warned = True
            _say(f"{r.run.path}: warning: the training loss has not improved in {step} steps "
                 f"({r.windows[0]['train_loss']:.4g} over the first {r.windows[0]['steps']}, "
                 f"{row['train_loss']:.4g} now); the learning rate may be too high (--lr)", file=sys.stderr)
    return {**window, "loss": float(losses[0])}


def _evaluate_and_act(job: _Job, group: _Group, step: int, group_end: bool = False) -> None:
    """Evaluate after `step`; record it, draw pictures where due, and checkpoint where due: on the checkpoint
    cadence, before training and at the end of the run or of the group's stretch (`group_end`)."""
    last = step >= job.total_steps
    config = group.replicas[0].config
    records, pictures = _evaluate(job, group, step)
    samples = None
    if group.sample is not None and draws_pictures(records[0]["epoch"], last):  # every process: a collective
        keys = [np.asarray(jax.random.fold_in(jnp.asarray(r.sample_rng), step)) for r in group.replicas]
        samples = np.asarray(group.sample(group.state.params, group.state.batch_stats, group.keys(keys), 64))
    metric = job.model.table_metric
    for k, (r, record) in enumerate(zip(group.replicas, records)):
        if not r.has_record(step):
            r.run.append_metrics(record)
            r.records.append(record)
            if r.events is not None:
                r.events.add_record(record)
        if r.run.primary:
            drawn = _draw(r, record, pictures[0], group.of_replica(pictures[1], k),
                          None if samples is None else group.of_replica(samples, k), last, step, metric)
            for kind, path in drawn:
                r.events.add_picture(kind, path, step)
            r.events.flush()
        _say(f"{group.prefix(r)}epoch {record['epoch']} step {step}: train {metric} {record[f'train_{metric}']:.6g} "
             f"test {metric} {record[f'test_{metric}']:.6g} loss {record['train_loss']:.6g}/"
             f"{record['test_loss']:.6g} ({record['eval_seconds']:.1f}s eval)")
    if group_end or step == 0 or job.due(step, config.checkpoint_cadence):
        _checkpoint(group, step)


def _evaluate(job: _Job, group: _Group, step: int) -> tuple[list[dict], tuple[np.ndarray, np.ndarray]]:
    """One record per replica of the metrics over the train and test splits after `step` (with the epoch's mean
    training loss and speed, and the seconds so far), and the first test batch with its reconstruction.
    Non-finite metrics stop the run (DivergedError)."""
    config, data = group.replicas[0].config, job.data
    eval_start = time.perf_counter()
    records = [{"epoch": job.epoch_label(step), "step": step} for _ in group.replicas]
    partial = False
    for split_index, split in enumerate(("train", "test")):
        batches = num_batches(len(getattr(data, f"{split}_codes")), config.batch_size)
        if config.eval_batches is not None:
            partial |= config.eval_batches < batches
            batches = min(batches, config.eval_batches)
        keys = np.stack([eval_keys(r.eval_rng, step, split_index, batches) for r in group.replicas], axis=1)
        keys = group.layout.put(keys if group.layout.stacked else keys[:, 0], group.layout.replicated)
        try:
            means, reconstruction = group.loops.evaluate(group.state, group.splits[split], keys, batches,
                                                         lambda: stop_if_requested(job.should_stop))
        finally:
            wait_for(group.state)  # also on a stop: no computation outlives the pass
        means = jax.device_get(means)
        for k, record in enumerate(records):
            record.update({f"{split}_{name}": float(group.of_replica(value, k)) for name, value in means.items()})
    pictures = (data.levels[data.test_codes[:config.batch_size]], np.asarray(reconstruction))
    eval_seconds = round(time.perf_counter() - eval_start, 3)
    for r, record in zip(group.replicas, records):
        if partial:
            record["eval_batches"] = config.eval_batches  # partial passes: say so next to the numbers
        epoch_start = (step - 1) // job.steps_per_epoch * job.steps_per_epoch
        since = [w for w in r.windows if epoch_start < w["step"] <= step]
        if since:  # the steps of this epoch so far (J's per-epoch training loss), and their speed
            steps = sum(w["steps"] for w in since)
            record["mean_step_loss"] = sum(w["train_loss"] * w["steps"] for w in since) / steps
            record["steps_per_s"] = steps / sum(w["seconds"] for w in since)
        record["seconds"] = round(r.train_seconds, 3)
        record["eval_seconds"] = eval_seconds
        bad = [name for name, value in record.items() if not math.isfinite(value)]
        if bad:
            raise DivergedError(f"{group.prefix(r)}non-finite evaluation metrics at step {step} ({', '.join(bad)}); "
                                f"{r.config.divergence_remedy()}, or check the data")
    return records, pictures


def _checkpoint(group: _Group, step: int) -> None:
    """Save each replica's state as the checkpoint of `step` (unless one exists: a rerun that lost the row)."""
    for k, r in enumerate(group.replicas):
        if step not in r.manager.all_steps():
            checkpoints.save(r.manager, step, group.take(group.state, k), r.run.path)


def draws_pictures(epoch: int | float, last: bool) -> bool:
    """Whether the evaluation after `epoch` draws reconstructions (and samples): epochs 0-10, every 10th up to
    100, every 50th after that, the run's last evaluation and any stop in the middle of an epoch. (A picture
    every epoch made long COIL-20 runs spend more time drawing than training, and 200 MB of PNGs.)"""
    if last or not float(epoch).is_integer():
        return True
    return epoch <= 10 or (epoch <= 100 and epoch % 10 == 0) or epoch % 50 == 0


def _draw(r: _Replica, record: dict, images: np.ndarray, reconstruction: np.ndarray, samples, last: bool,
          step: int, metric: str) -> list[tuple[str, Path]]:
    """A run's pictures after an evaluation: reconstructions (and samples) where `draws_pictures` says, and the
    curves. Returns the pictures drawn, as (kind, path)."""
    drawn = []
    if draws_pictures(record["epoch"], last):
        suffix = f"{record['epoch']}" if isinstance(record["epoch"], int) else f"step{step}"
        drawn.append(("recon", r.run.path / f"recon_{suffix}.png"))
        plots.save_reconstructions(drawn[-1][1], images, reconstruction, title=f"(epoch {record['epoch']})")
        if samples is not None:
            drawn.append(("samples", r.run.path / f"samples_{suffix}.png"))
            plots.save_grids(drawn[-1][1], [plots.image_grid(samples)],
                             [f"samples from the prior (epoch {record['epoch']})"])
    plots.save_curves(r.run.path / "curves.png", r.records, metric, "SSE / image" if metric == "sse" else "MSE",
                      r.windows)
    return drawn


# ---------------------------------------------------------------------------------------------------------------
# Helpers: the loss meter, checks before anything is written, process-0 printing

class StepMeter:
    """Training loss and speed over a window of steps: the step losses are summed on the device and read once
    per window (which also waits for the window's last step)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.restart()

    def restart(self) -> None:
        self.loss_sum, self.steps, self.started = None, 0, time.perf_counter()

    def add(self, losses: jax.Array, count: int) -> None:
        """Add a call's `count` step losses (rows of a leading axis, zero after the `count`-th: `gonjax.loops`)."""
        total = losses.sum(axis=0)
        self.loss_sum = total if self.loss_sum is None else self.loss_sum + total
        self.steps += count

    def read(self) -> dict:
        """{"loss": mean step loss (one per replica when stacked), "steps": n, "seconds": wall time,
        "steps_per_s", "images_per_s" (of each replica)}; restarts."""
        loss = np.asarray(jax.device_get(self.loss_sum)) / self.steps
        seconds = time.perf_counter() - self.started
        window = {"loss": loss, "steps": self.steps, "seconds": seconds, "steps_per_s": self.steps / seconds,
                  "images_per_s": self.steps * self.batch_size / seconds}
        self.restart()
        return window


def _check_batch_size(config: Config, train_images: int, test_images: int) -> None:
    if config.batch_size > min(train_images, test_images):
        raise UsageError(f"--batch-size {config.batch_size} is larger than a split of {config.dataset} "
                         f"({train_images} train / {test_images} test images)")


def _check_memory(config: Config, model: Model, replicas: int = 1) -> None:
    """Refuse settings whose parameters, gradients and Adam moments (about 5 copies of the parameters, for each
    replica) cannot fit on the device, before anything is allocated (e.g. --nz 100000000)."""
    shape = (config.batch_size, model.image_size, model.image_size, input_pipeline.CHANNELS[config.dataset])
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    leaves = jax.tree_util.tree_leaves(shapes)
    count = sum(leaf.size for leaf in leaves)
    resources.require_memory(5 * replicas * sum(leaf.size * leaf.dtype.itemsize for leaf in leaves),
                             f"{config.run_name} with these settings ({count:,} parameters)",
                             "lower --nz or --ngf", device=True)


FLAT_STEPS = 1000  # a run whose loss is not 10% below its start after FLAT_STEPS steps is warned about


def _loss_is_flat(windows: list[dict]) -> bool:
    """Whether, FLAT_STEPS steps into training, the loss of the last 200 steps is not 10% below the first
    window's: a rate so high that nothing is learnt (GONs drop several-fold within a few hundred steps)."""
    if not windows or windows[0]["step"] != windows[0]["steps"] or windows[-1]["step"] < FLAT_STEPS:
        return False  # not recorded from the first step on (metrics lost), or too early to say
    recent = [w for w in windows if w["step"] > windows[-1]["step"] - 200]
    mean = sum(w["train_loss"] * w["steps"] for w in recent) / sum(w["steps"] for w in recent)
    return mean >= 0.9 * windows[0]["train_loss"]


def _say(*args, **kwargs) -> None:
    """print, on process 0 only (every process runs the same loop)."""
    if parallel.is_primary():
        print(*args, **kwargs, flush=True)
