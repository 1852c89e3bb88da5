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
  damaged_checkpoints/  checkpoints found damaged on resume, set aside (the run resumed from an intact one)
  .lock            held (flock) while a process works in the folder
Rerunning on an unfinished workdir resumes from its latest checkpoint with the same data order and keys, so it
reproduces an uninterrupted run; a finished one is left as it is.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
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

from gonjax import files, plots, resources, xla
from gonjax.catalog import SPLIT_SIZES
from gonjax.config import Config
from gonjax.data import input_pipeline
from gonjax.errors import DivergedError, UsageError, stop_if_requested
from gonjax.zoo import Model, build_model

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

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


def evaluate(eval_step, state: TrainState, images: np.ndarray, batch_size: int, rng: jax.Array,
             should_stop: Callable[[], bool] | None = None):
    """Mean of every metric over a full pass in batches of `batch_size` (drop last), and the first batch with
    its reconstruction. Metrics are summed on the device and read once. `should_stop` is polled per batch."""
    sums, first = None, None
    count = 0
    batches = input_pipeline.prefetch_to_device(input_pipeline.eval_batches(images, batch_size))
    try:
        for index, batch in enumerate(batches):
            stop_if_requested(should_stop)
            metrics, reconstruction = eval_step(state, batch, jax.random.fold_in(rng, index))
            sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
            if first is None:
                first = (batch, reconstruction)
            count += 1
    finally:
        batches.close()
        _wait_for((sums, first))  # also on a stop: no computation outlives the pass (see _train)
    means = {name: float(value) / count for name, value in jax.device_get(sums).items()}
    return means, (np.asarray(first[0]), np.asarray(first[1]))


def _wait_for(arrays) -> None:
    """Wait until the computations producing `arrays` have finished (JAX dispatches asynchronously). Arrays a
    failed step had already donated are gone: there is nothing to wait for then."""
    try:
        jax.block_until_ready(arrays)
    except RuntimeError:
        pass


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
    """A run's folder: refuses to touch anything that is not this run, holds an exclusive lock on it while the
    run is open (a second process on the same folder gets a UsageError naming the holder; the operating system
    drops the lock of a process that dies), writes files atomically."""

    LOCK = ".lock"

    def __init__(self, path: Path, config: Config):
        self.path = Path(path)
        self._lock = None
        self._check(config)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._acquire_lock()
            self._check(config)  # again under the lock: another process may have claimed it meanwhile
            self.write_text("config.json", config.to_json() + "\n")
        except OSError as error:
            self.release()
            raise UsageError(f"cannot write to --workdir {self.path} ({error.strerror or error}); "
                             "choose a writable folder") from None
        except BaseException:
            self.release()
            raise

    def _check(self, config: Config) -> None:
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
        elif self.path.exists() and (not self.path.is_dir()
                                     or any(p.name != self.LOCK for p in self.path.iterdir())):
            raise UsageError(f"--workdir {self.path} exists and is not a gonjax run; choose another --workdir")

    def _acquire_lock(self) -> None:
        if fcntl is None:  # no advisory locks on this platform (Windows): unguarded, as before
            return
        handle = open(self.path / self.LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UsageError(f"--workdir {self.path} is in use by {holder}; wait for it to finish (or stop it) "
                             "and rerun, or choose another --workdir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        """Give up the folder's lock (also done by the operating system when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

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


def _save_checkpoint(manager: ocp.CheckpointManager, step: int, state: TrainState, workdir: Path) -> None:
    """Save `state` as the checkpoint of `step`; a full disk (checked first, and caught) is a UsageError, so the
    run stops at once with its last checkpoint intact."""
    saved = _state_dict(state)
    needed = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(saved)) + 2**20

    def no_space():
        return UsageError(f"no space left on the disk of {workdir} for the checkpoint of step {step} (about "
                          f"{resources.gigabytes(needed)} needed, {resources.free_disk(workdir)} free); free "
                          "some space and rerun to resume from the last checkpoint")

    if shutil.disk_usage(workdir).free < needed:
        raise no_space()
    try:
        manager.save(step, args=ocp.args.StandardSave(saved), force=True)
    except Exception as error:  # noqa: BLE001 - tensorstore reports ENOSPC as a ValueError
        if "No space left" in str(error) or getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            raise no_space() from None
        raise


def _restore_intact(manager: ocp.CheckpointManager, state: TrainState,
                    on_damaged: Callable[[int, str], None]) -> TrainState | None:
    """The state of the newest checkpoint that restores and holds only finite numbers, or None when there is none.
    `on_damaged(step, reason)` is told of every newer one that does not (a truncated or corrupted file)."""
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _state_dict(state))
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as error:  # noqa: BLE001 - tensorstore and orbax raise many types for a damaged file
            on_damaged(step, " ".join(str(error).split())[:200] or type(error).__name__)
            continue
        if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(restored)
                   if jnp.issubdtype(leaf.dtype, jnp.inexact)):
            on_damaged(step, "it holds non-finite numbers")
            continue
        return state.replace(**restored)
    return None


def load_run(workdir) -> tuple[Config, Model, TrainState, dict]:
    """The config, model, latest intact checkpointed state and data description of a run folder (a damaged
    newer checkpoint is named on stderr and skipped)."""
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

    def on_damaged(step, reason):
        print(f"{path}: the checkpoint of step {step} is damaged ({reason}); using an older one",
              file=sys.stderr, flush=True)

    restored = _restore_intact(manager, state, on_damaged)
    manager.close()
    if restored is None:
        raise UsageError(f"{path}: no intact checkpoint (see above); rerun its training command to train it again")
    return config, model, restored, data_info


def _check_batch_size(config: Config, train_images: int, test_images: int) -> None:
    if config.batch_size > min(train_images, test_images):
        raise UsageError(f"--batch-size {config.batch_size} is larger than a split of {config.dataset} "
                         f"({train_images} train / {test_images} test images)")


def _check_memory(config: Config, model: Model) -> None:
    """Refuse settings whose parameters, gradients and Adam moments (about 5 copies of the parameters) cannot fit
    on the device, before anything is allocated (e.g. --nz 100000000)."""
    shape = (config.batch_size, model.image_size, model.image_size, input_pipeline.CHANNELS[config.dataset])
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    leaves = jax.tree_util.tree_leaves(shapes)
    count = sum(leaf.size for leaf in leaves)
    resources.require_memory(5 * sum(leaf.size * leaf.dtype.itemsize for leaf in leaves),
                             f"{config.run_name} with these settings ({count:,} parameters)",
                             "lower --nz or --ngf", device=True)


def draws_pictures(epoch: int | float, last: bool) -> bool:
    """Whether the evaluation after `epoch` draws reconstructions (and samples): epochs 0-10, every 10th up to
    100, every 50th after that, the run's last evaluation and any stop in the middle of an epoch. (A picture
    every epoch made long COIL-20 runs spend more time drawing than training, and 200 MB of PNGs.)"""
    if last or not float(epoch).is_integer():
        return True
    return epoch <= 10 or (epoch <= 100 and epoch % 10 == 0) or epoch % 50 == 0


FLAT_STEPS = 1000  # a run whose loss is not 10% below its start after FLAT_STEPS steps is warned about


def _loss_is_flat(windows: list[dict]) -> bool:
    """Whether, FLAT_STEPS steps into training, the loss of the last 200 steps is not 10% below the first
    window's: a rate so high that nothing is learnt (GONs drop several-fold within a few hundred steps)."""
    if not windows or windows[0]["step"] != windows[0]["steps"] or windows[-1]["step"] < FLAT_STEPS:
        return False  # not recorded from the first step on (metrics lost), or too early to say
    recent = [w for w in windows if w["step"] > windows[-1]["step"] - 200]
    mean = sum(w["train_loss"] * w["steps"] for w in recent) / sum(w["steps"] for w in recent)
    return mean >= 0.9 * windows[0]["train_loss"]


def _epoch_label(step: int, steps_per_epoch: int) -> int | float:
    epoch = step / steps_per_epoch
    return int(epoch) if step % steps_per_epoch == 0 else round(epoch, 4)


def train_and_evaluate(config: Config, workdir, should_stop: Callable[[], bool] | None = None) -> list[dict]:
    """Train `config.model` on `config.dataset`, evaluating before training and after every epoch.

    `should_stop`, polled before every training step and evaluation batch, stops the run with KeyboardInterrupt
    when it returns True (the CLIs pass their Ctrl-C / SIGTERM flag); the latest checkpoint is kept. Returns the
    metric records of the whole run (also in workdir/metrics.jsonl).
    """
    config.validate()
    _check_batch_size(config, *SPLIT_SIZES[config.dataset])  # before the run folder is claimed: no debris
    model = build_model(config, input_pipeline.CHANNELS[config.dataset])
    _check_memory(config, model)
    run = RunDir(Path(workdir), config)
    try:
        return _train(run, config, model, should_stop)
    finally:
        run.release()


def _train(run: RunDir, config: Config, model: Model, should_stop: Callable[[], bool] | None) -> list[dict]:
    """train_and_evaluate's work in its claimed (and locked) run folder."""
    data = input_pipeline.load_dataset(config.dataset, image_size=model.image_size, data_dir=config.data_dir,
                                       manual_dir=config.manual_dir)
    run.write_text("data.json", json.dumps(data.info, indent=2) + "\n")
    stop_if_requested(should_stop)  # a stop during data preparation, before compiling
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
        # Saved synchronously: a failed save (a full disk) stops the run at that step, not an epoch later.
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                             enable_async_checkpointing=False))
    if manager.latest_step() is not None:
        damaged_dir = run.path / "damaged_checkpoints"

        def set_aside(step: int, reason: str) -> None:  # kept for inspection, out of the manager's way
            damaged_dir.mkdir(exist_ok=True)
            target = damaged_dir / str(step)
            while target.exists():
                target = target.with_name(target.name + "+")
            os.rename(run.path / "checkpoints" / str(step), target)
            print(f"{run.path}: the checkpoint of step {step} is damaged ({reason}); moved it to {target}",
                  file=sys.stderr, flush=True)

        restored = _restore_intact(manager, state, set_aside)
        manager.reload()
        if restored is not None:
            state = restored
        else:
            print(f"{run.path}: no intact checkpoint is left; training starts again from step 0", file=sys.stderr,
                  flush=True)
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
        partial = False
        for split, images, rng in (("train", data.train, split_rngs[0]), ("test", data.test, split_rngs[1])):
            if config.eval_batches is not None:
                partial |= config.eval_batches < input_pipeline.num_batches(len(images), config.batch_size)
                images = images[:config.eval_batches * config.batch_size]
            means, pictures = evaluate(eval_step, state, images, config.batch_size, rng, should_stop)
            record.update({f"{split}_{name}": value for name, value in means.items()})
        if partial:
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
            _save_checkpoint(manager, step, state, run.path)
        print(f"epoch {record['epoch']} step {step}: train {metric} {record[f'train_{metric}']:.6g} "
              f"test {metric} {record[f'test_{metric}']:.6g} loss {record['train_loss']:.6g}/"
              f"{record['test_loss']:.6g} ({record['eval_seconds']:.1f}s eval)", flush=True)

    meter = StepMeter(config.batch_size)
    warned = False  # a flat loss is warned about once per process

    def record_window() -> dict:
        nonlocal warned
        window = meter.read()
        if not math.isfinite(window["loss"]):
            first = step - window["steps"] + 1
            raise DivergedError(f"non-finite training loss at steps {first}-{step}; lower --lr or check the data")
        row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "train_loss": window["loss"],
               "steps": window["steps"], "seconds": round(window["seconds"], 4),
               "steps_per_s": window["steps_per_s"], "images_per_s": window["images_per_s"]}
        run.append_metrics(row, "train_metrics.jsonl")
        windows.append(row)
        if not warned and _loss_is_flat(windows):
            warned = True
            print(f"{run.path}: warning: the training loss has not improved in {step} steps "
                  f"({windows[0]['train_loss']:.4g} over the first {windows[0]['steps']}, {row['train_loss']:.4g} "
                  "now); the learning rate may be too high (--lr)", file=sys.stderr, flush=True)
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
            try:
                for batch in islice(batches, count):
                    stop_if_requested(should_stop)
                    state, metrics = train_step(state, batch, train_rng)
                    meter.add(metrics["loss"])
                    step += 1
                    bar.update()
                    if step % LOG_EVERY == 0:
                        row = record_window()
                        bar.set_postfix(loss=f"{row['train_loss']:.5f}", images_per_s=f"{row['images_per_s']:.0f}")
            finally:
                batches.close()  # stops the prefetch thread (an epoch cut short by --max-steps, a stop, an error)
                # Steps are dispatched asynchronously; a stop must not leave any running when the interpreter
                # exits (XLA then tears down under them: a segfault after "interrupted", seen on MNIST).
                _wait_for(state)
            if meter.steps:
                record_window()  # the epoch's last, shorter window; also waits for its last step
            train_seconds += time.perf_counter() - epoch_start
            bar.close()
            evaluate_and_record()
    finally:  # also on errors and Ctrl-C: a checkpoint being written is finished, never left half-written
        manager.wait_until_finished()
        manager.close()
    return records
