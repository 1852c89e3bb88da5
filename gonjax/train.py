"""The one trainer, generic over `zoo.Model`s: jitted steps, evaluation, metrics, pictures, checkpoints, resume.

`train_and_evaluate(config, workdir)` runs a whole experiment into `workdir`:
  config.json      the run's Config
  data.json        how the dataset was prepared (TFDS builder, version, split sizes, split seed)
  metrics.jsonl    one JSON object per evaluation (before training, after every epoch or every --eval-every
                   epochs, at the end and at --max-steps)
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

import dataclasses
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

from gonjax import files, parallel, plots, resources, xla
from gonjax.catalog import SPLIT_SIZES
from gonjax.config import Config
from gonjax.data import input_pipeline
from gonjax.errors import DivergedError, RunInUseError, UsageError, stop_if_requested
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


def evaluate(eval_step, state: TrainState, images: np.ndarray, batch_size: int, batch_key: Callable[[int], Any],
             should_stop: Callable[[], bool] | None = None, put=jax.device_put):
    """Mean of every metric over a full pass in batches of `batch_size` (drop last), and the first batch with
    its reconstruction. `batch_key(i)` is the key of batch i, `put` places a batch (`parallel.Layout.put`).
    Metrics are summed on the device and read once: NumPy values, one per replica when the state is stacked.
    `should_stop` is polled per batch."""
    sums, first = None, None
    count = 0
    batches = input_pipeline.prefetch_to_device(input_pipeline.eval_batches(images, batch_size), put=put)
    try:
        for index, batch in enumerate(batches):
            stop_if_requested(should_stop)
            metrics, reconstruction = eval_step(state, batch, batch_key(index))
            sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
            if first is None:
                first = reconstruction
            count += 1
    finally:
        batches.close()
        _wait_for((sums, first))  # also on a stop: no computation outlives the pass (see _train)
    means = {name: np.asarray(value) / count for name, value in jax.device_get(sums).items()}
    return means, (np.asarray(images[:batch_size]), np.asarray(first))


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
    drops the lock of a process that dies), writes files atomically.

    In a run of several processes only process 0 holds the folder (`claim`) and writes; the others only check it
    and read (`primary=False`). `claim=False` checks now and leaves the claim for later."""

    LOCK = ".lock"

    def __init__(self, path: Path, config: Config, primary: bool = True, claim: bool = True):
        self.path = Path(path)
        self.config = config
        self.primary = primary
        self._lock = None
        self._check(config)
        if claim:
            self.claim()

    def claim(self) -> None:
        """Create the folder, lock it and write config.json (the primary process)."""
        if not self.primary:
            return
        config = self.config
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
            raise RunInUseError(self.path, holder) from None
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
        if self.primary:
            files.write_atomic(self.path / name, text)

    def read_metrics(self, up_to_step: int, name: str = "metrics.jsonl") -> list[dict]:
        """Records of a JSON-lines file up to `up_to_step`; later ones (written after the last checkpoint of an
        interrupted run) are dropped from the file."""
        records, torn = files.read_jsonl(self.path / name)
        kept = [r for r in records if r["step"] <= up_to_step]
        if self.primary and (torn or len(kept) != len(records)):  # rows past the checkpoint, a torn line: rewrite
            self.write_text(name, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append_metrics(self, record: dict, name: str = "metrics.jsonl") -> None:
        if not self.primary:
            return
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
        """{"loss": mean step loss (one per replica when stacked), "steps": n, "seconds": wall time,
        "steps_per_s", "images_per_s" (of each replica)}; restarts."""
        loss = np.asarray(jax.device_get(self.loss_sum)) / self.steps
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
    """Train `config.model` on `config.dataset`, evaluating (and checkpointing) before training, after every
    `config.eval_every`-th epoch and at the end. Evaluations read the state and never change it, so their
    cadence leaves the training bit for bit the same.

    The steps run on `config.devices` devices (default: every device of every process; `gonjax.parallel`), the
    same math as on one. `should_stop`, polled before every training step and evaluation batch, stops the run
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
    train_seconds: float = 0.0
    warned: bool = False  # a flat loss is warned about once per process

    @property
    def config(self) -> Config:
        return self.run.config

    @property
    def step(self) -> int:
        return int(self.state.step)


def _say(*args, **kwargs) -> None:
    """print, on process 0 only (every process runs the same loop)."""
    if parallel.is_primary():
        print(*args, **kwargs, flush=True)


def _open_replica(run: RunDir, init_state: Callable, layout: parallel.Layout) -> _Replica:
    """A run's keys, its checkpoint manager and its latest intact state (damaged checkpoints set aside), or a
    fresh state; its records up to that state's step."""
    init_rng, train_rng, eval_rng, sample_rng = (
        np.asarray(key) for key in jax.random.split(jax.random.PRNGKey(run.config.seed), 4))
    state = init_state(layout.put(init_rng, layout.replicated))
    manager = ocp.CheckpointManager(
        (run.path / "checkpoints").absolute(),
        # Saved synchronously: a failed save (a full disk) stops the run at that step, not an epoch later.
        options=ocp.CheckpointManagerOptions(max_to_keep=run.config.keep_checkpoints, create=True,
                                             enable_async_checkpointing=False))
    if manager.latest_step() is not None:
        damaged_dir = run.path / "damaged_checkpoints"

        def set_aside(step: int, reason: str) -> None:  # kept for inspection, out of the manager's way
            if not run.primary:
                return
            damaged_dir.mkdir(exist_ok=True)
            target = damaged_dir / str(step)
            while target.exists():
                target = target.with_name(target.name + "+")
            os.rename(run.path / "checkpoints" / str(step), target)
            print(f"{run.path}: the checkpoint of step {step} is damaged ({reason}); moved it to {target}",
                  file=sys.stderr, flush=True)

        restored = _restore_intact(manager, state, set_aside)
        parallel.sync("gonjax: checkpoints restored")
        manager.reload()
        if restored is not None:
            state = restored
        elif run.primary:
            print(f"{run.path}: no intact checkpoint is left; training starts again from step 0", file=sys.stderr,
                  flush=True)
    step = int(state.step)
    records = run.read_metrics(up_to_step=step)
    return _Replica(run=run, manager=manager, state=state, records=records,
                    windows=run.read_metrics(up_to_step=step, name="train_metrics.jsonl"),
                    train_rng=train_rng, eval_rng=eval_rng, sample_rng=sample_rng,
                    train_seconds=records[-1]["seconds"] if records else 0.0)


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
    _check_batch_size(config, len(data.train), len(data.test))  # the files read (e.g. a small CIFAR-10 folder)
    steps_per_epoch = input_pipeline.num_batches(len(data.train), config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = make_optimizer(config, steps_per_epoch)
    single = parallel.make_layout(config.devices, config.batch_size)
    sample_batch = jax.ShapeDtypeStruct((config.batch_size, *data.train.shape[1:]), data.train.dtype)
    init_state = jax.jit(lambda rng: create_train_state(model, optimizer, rng, jnp.zeros(sample_batch.shape,
                                                                                          sample_batch.dtype)),
                         out_shardings=single.state)
    replicas = []
    try:
        for run in runs:
            replicas.append(_open_replica(run, init_state, single))
        loop = _TrainLoop(model, optimizer, data, steps_per_epoch, total_steps, should_stop)
        while True:
            steps = sorted({replica.step for replica in replicas})
            if len(steps) == 1 or steps[0] >= total_steps or steps[1] > total_steps:
                for step in steps:  # one group left, or the others are past this run's end already
                    loop.run([replica for replica in replicas if replica.step == step], total_steps)
                break
            loop.run([replica for replica in replicas if replica.step == steps[0]], steps[1])
    finally:  # also on errors and Ctrl-C: a checkpoint being written is finished, never left half-written
        for replica in replicas:
            replica.manager.wait_until_finished()
            replica.manager.close()
    return [replica.records for replica in replicas]


def _eval_keys(eval_rng: np.ndarray, step: int, split: int, batches: int) -> np.ndarray:
    """(batches, 2) keys of one evaluation pass: batch i of split s (0 train, 1 test) after `step` gets
    fold_in(split(fold_in(eval_rng, step))[s], i)."""
    rng = jax.random.split(jax.random.fold_in(jnp.asarray(eval_rng), step))[split]
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batches)))


class _TrainLoop:
    """The epoch loop of `_train`, run for a group of replicas at the same step (stacked when several)."""

    def __init__(self, model: Model, optimizer, data, steps_per_epoch: int, total_steps: int, should_stop):
        self.model, self.optimizer, self.data = model, optimizer, data
        self.steps_per_epoch, self.total_steps, self.should_stop = steps_per_epoch, total_steps, should_stop

    def _compile(self, layout: parallel.Layout):
        """The jitted train step, eval step and prior sampler on `layout` (vmapped over stacked replicas)."""
        model, rep = self.model, layout.replicated
        train, evaluate_batch, sample = make_train_step(model, self.optimizer), make_eval_step(model), model.sample
        if layout.stacked:
            train = jax.vmap(train)
            evaluate_batch = jax.vmap(evaluate_batch, in_axes=(0, None, 0))
            if sample is not None:
                one_sample = sample

                def sample(params, batch_stats, rngs, n):
                    return jax.vmap(lambda p, s, r: one_sample(p, s, r, n))(params, batch_stats, rngs)

        train_step = xla.jit(train, donate_argnums=0, in_shardings=(layout.state, layout.train_batch, rep),
                             out_shardings=(layout.state, rep))
        eval_step = xla.jit(evaluate_batch, in_shardings=(layout.state, layout.eval_batch, rep), out_shardings=rep)
        sample = xla.jit(sample, static_argnums=3, out_shardings=rep) if sample is not None else None
        return train_step, eval_step, sample

    def run(self, group: list[_Replica], target: int) -> None:
        """Train `group` (replicas at one step) to step `target`, evaluating after every `config.eval_every`-th
        epoch and at `target`."""
        config, data, model = group[0].config, self.data, self.model
        steps_per_epoch, total_steps, should_stop = self.steps_per_epoch, self.total_steps, self.should_stop
        step = group[0].step
        if step >= target and all(r.records and r.records[-1]["step"] == step for r in group):
            if step >= total_steps:
                for r in group:
                    _say(f"{r.run.path}: this run already finished at step {step} (epoch {r.records[-1]['epoch']}); "
                         "raise --epochs or --max-steps to train on, or choose another --workdir")
            return
        for r in group:
            if step:
                _say(f"{r.run.path}: resuming from step {step}")
                if (not r.records or r.records[0]["step"] != 0) and r.run.primary:
                    print(f"{r.run.path}: metrics.jsonl has no rows before step "
                          f"{r.records[0]['step'] if r.records else step}; they cannot be recovered (only the "
                          "latest checkpoints are kept), so the table starts there", file=sys.stderr, flush=True)
        layout = parallel.make_layout(config.devices, config.batch_size, len(group))
        stacked, rep = layout.stacked, layout.replicated
        train_step, eval_step, sample = self._compile(layout)

        def placed_keys(name: str) -> jax.Array:
            keys = [getattr(r, name) for r in group]
            return layout.put(np.stack(keys) if stacked else keys[0], rep)

        def of_replica(value, k: int):
            return value[k] if stacked else value

        if stacked:
            state = xla.jit(lambda *states: jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states),
                            out_shardings=layout.state)(*(r.state for r in group))
            take = xla.jit(lambda state, k: jax.tree_util.tree_map(lambda leaf: leaf[k], state), static_argnums=1,
                           out_shardings=rep)
        else:
            state, take = group[0].state, (lambda state, k: state)
        train_rng = placed_keys("train_rng")
        prefix = (lambda r: f"{r.run.path.name}: ") if len(group) > 1 else (lambda r: "")

        def evaluate_and_record():
            eval_start = time.perf_counter()
            missing = [not r.records or r.records[-1]["step"] != step for r in group]
            records = [{"epoch": _epoch_label(step, steps_per_epoch), "step": step} for _ in group]
            partial = False
            for split_index, (split, images) in enumerate((("train", data.train), ("test", data.test))):
                if config.eval_batches is not None:
                    partial |= config.eval_batches < input_pipeline.num_batches(len(images), config.batch_size)
                    images = images[:config.eval_batches * config.batch_size]
                batches = input_pipeline.num_batches(len(images), config.batch_size)
                keys = np.stack([_eval_keys(r.eval_rng, step, split_index, batches) for r in group], axis=1)
                means, pictures = evaluate(eval_step, state, images, config.batch_size,
                                           lambda i: layout.put(keys[i] if stacked else keys[i, 0], rep),
                                           should_stop, put=lambda batch: layout.put(batch, layout.eval_batch))
                for k, record in enumerate(records):
                    record.update({f"{split}_{name}": float(of_replica(value, k)) for name, value in means.items()})
            eval_seconds = round(time.perf_counter() - eval_start, 3)
            last = step >= total_steps
            samples = None
            if sample is not None and draws_pictures(records[0]["epoch"], last):  # every process: a collective
                samples = np.asarray(sample(state.params, state.batch_stats, placed_keys_at("sample_rng", step), 64))
            for k, (r, record) in enumerate(zip(group, records)):
                if partial:
                    record["eval_batches"] = config.eval_batches  # partial passes: say so next to the numbers
                epoch_start = (step - 1) // steps_per_epoch * steps_per_epoch
                since = [w for w in r.windows if epoch_start < w["step"] <= step]
                if since:  # the steps of this epoch so far (J's per-epoch training loss), and their speed
                    steps = sum(w["steps"] for w in since)
                    record["mean_step_loss"] = sum(w["train_loss"] * w["steps"] for w in since) / steps
                    record["steps_per_s"] = steps / sum(w["seconds"] for w in since)
                record["seconds"] = round(r.train_seconds, 3)
                record["eval_seconds"] = eval_seconds
                bad = [name for name, value in record.items() if not math.isfinite(value)]
                if bad:
                    raise DivergedError(f"{prefix(r)}non-finite evaluation metrics at step {step} ({', '.join(bad)}); "
                                        "lower --lr or check the data")
                if missing[k]:
                    r.run.append_metrics(record)
                    r.records.append(record)
                if r.run.primary:
                    _draw(r, record, pictures[0], of_replica(pictures[1], k),
                          None if samples is None else of_replica(samples, k), last, step, model.table_metric)
                if step not in r.manager.all_steps():  # already saved when metrics.jsonl lost this row
                    _save_checkpoint(r.manager, step, take(state, k), r.run.path)
                metric = model.table_metric
                _say(f"{prefix(r)}epoch {record['epoch']} step {step}: train {metric} {record[f'train_{metric}']:.6g} "
                     f"test {metric} {record[f'test_{metric}']:.6g} loss {record['train_loss']:.6g}/"
                     f"{record['test_loss']:.6g} ({record['eval_seconds']:.1f}s eval)")

        def placed_keys_at(name: str, at: int) -> jax.Array:
            keys = [np.asarray(jax.random.fold_in(jnp.asarray(getattr(r, name)), at)) for r in group]
            return layout.put(np.stack(keys) if stacked else keys[0], rep)

        meter = StepMeter(config.batch_size)

        def record_window() -> dict:
            window = meter.read()
            losses = np.atleast_1d(window["loss"])
            for k, r in enumerate(group):
                loss = float(losses[k])
                if not math.isfinite(loss):
                    first = step - window["steps"] + 1
                    raise DivergedError(f"{prefix(r)}non-finite training loss at steps {first}-{step}; lower --lr or "
                                        "check the data")
                row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "train_loss": loss,
                       "steps": window["steps"], "seconds": round(window["seconds"], 4),
                       "steps_per_s": window["steps_per_s"], "images_per_s": window["images_per_s"]}
                r.run.append_metrics(row, "train_metrics.jsonl")
                r.windows.append(row)
                if not r.warned and _loss_is_flat(r.windows):
                    r.warned = True
                    _say(f"{r.run.path}: warning: the training loss has not improved in {step} steps "
                         f"({r.windows[0]['train_loss']:.4g} over the first {r.windows[0]['steps']}, "
                         f"{row['train_loss']:.4g} now); the learning rate may be too high (--lr)", file=sys.stderr)
            return {**window, "loss": float(losses[0])}

        def train_batches(epoch: int, start: int):
            streams = [input_pipeline.train_batches(data.train, config.batch_size, r.config.seed, epoch, start)
                       for r in group]
            return map(np.stack, zip(*streams)) if stacked else streams[0]

        show_progress = sys.stderr.isatty() and parallel.is_primary()
        if any(not r.records or r.records[-1]["step"] != step for r in group):
            evaluate_and_record()
        while step < target:
            epoch, start = divmod(step, steps_per_epoch)
            count = min(steps_per_epoch - start, target - step)
            batches = input_pipeline.prefetch_to_device(
                train_batches(epoch, start), put=lambda batch: layout.put(batch, layout.train_batch))
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
                        window = record_window()
                        bar.set_postfix(loss=f"{window['loss']:.5f}",
                                        images_per_s=f"{window['images_per_s']:.0f}")
            finally:
                batches.close()  # stops the prefetch thread (an epoch cut short, a stop, an error)
                # Steps are dispatched asynchronously; a stop must not leave any running when the interpreter
                # exits (XLA then tears down under them: a segfault after "interrupted", seen on MNIST).
                _wait_for(state)
            if meter.steps:
                record_window()  # the epoch's last, shorter window; also waits for its last step
            for r in group:
                r.train_seconds += time.perf_counter() - epoch_start
            bar.close()
            if step >= target or (step % steps_per_epoch == 0 and step // steps_per_epoch % config.eval_every == 0):
                evaluate_and_record()
        for k, r in enumerate(group):  # the group's states, for a later group
            r.state = take(state, k)


def _draw(r: _Replica, record: dict, images: np.ndarray, reconstruction: np.ndarray, samples, last: bool,
          step: int, metric: str) -> None:
    """A run's pictures after an evaluation: reconstructions (and samples) where `draws_pictures` says, and the
    curves."""
    if draws_pictures(record["epoch"], last):
        suffix = f"{record['epoch']}" if isinstance(record["epoch"], int) else f"step{step}"
        plots.save_reconstructions(r.run.path / f"recon_{suffix}.png", images, reconstruction,
                                   title=f"(epoch {record['epoch']})")
        if samples is not None:
            plots.save_grids(r.run.path / f"samples_{suffix}.png", [plots.image_grid(samples)],
                             [f"samples from the prior (epoch {record['epoch']})"])
    plots.save_curves(r.run.path / "curves.png", r.records, metric, "SSE / image" if metric == "sse" else "MSE",
                      r.windows)
