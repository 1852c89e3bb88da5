"""Trained runs for inference: `load_run(workdir)` restores a run folder's latest intact checkpoint as a `Run`
that encodes, decodes, reconstructs, samples and renders.

    run = gonjax.load_run("runs/gon-coil20")
    z = run.encode(images)                      # (64, 256): the origin step's latents of one batch
    halfway = run.decode(0.5 * (z[:32] + z[32:]))

Inference needs no dataset preparation, plotting or progress bars: this module imports none of TFDS,
matplotlib or tqdm. Images are float arrays in [0, 1] of the run's image shape (`run.image_shape`).
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gonjax import checkpoints, files, render as rendering, rundir, xla
from gonjax.config import Config
from gonjax.errors import UsageError
from gonjax.steps import TrainState, create_train_state, make_optimizer
from gonjax.zoo import Model, build_model, check_images


class Run:
    """A trained run: its folder, Config, Model, restored TrainState and data description (data.json)."""

    def __init__(self, path: Path, config: Config, model: Model, state: TrainState, data_info: dict):
        self.path, self.config, self.model, self.state, self.data_info = Path(path), config, model, state, data_info

    @property
    def step(self) -> int:
        """The training step of the restored checkpoint."""
        return int(self.state.step)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images the model reads and writes."""
        return tuple(self.data_info["image_shape"])

    @functools.cached_property
    def _encode(self):
        return xla.jit(self.model.encode)

    @functools.cached_property
    def _decode(self):
        return xla.jit(self.model.decode)

    def _images(self, images) -> jax.Array:
        """`images` as float32, checked against the model's build (`zoo.check_images`) as a UsageError."""
        images = jnp.asarray(images, jnp.float32)
        height, _, channels = self.image_shape
        try:
            check_images(images, channels, height, self.config.run_name, batch_norm=self.model.render is None)
        except ValueError as error:
            raise UsageError(str(error)) from None
        return images

    def images(self, split: str = "test", n: int = 64) -> np.ndarray:
        """The first `n` images of the run's dataset split ("train" or "test"), preprocessed as in training
        (float32 in [0, 1]), read from the run's --data-dir / --manual-dir (TFDS is imported here only)."""
        from gonjax.data import input_pipeline

        if split not in ("train", "test"):
            raise UsageError(f"split must be 'train' or 'test', got {split!r}")
        data = input_pipeline.load_dataset(self.config.dataset, self.model.image_size, self.config.data_dir,
                                           self.config.manual_dir)
        images = getattr(data, split)
        if not 1 <= n <= len(images):
            raise UsageError(f"n must be from 1 to {len(images)} ({self.config.dataset} {split}), got {n}")
        return images[:n]

    def encode(self, images, rng: jax.Array | None = None) -> jax.Array:
        """Latents of `images` (n, H, W, C) in [0, 1], as one batch (`zoo.Model`: a GON's latent depends on the
        other images of its batch, an Implicit GON's on their number, so pass batches of the run's batch size,
        `run.config.batch_size`). `rng` draws the noise of models that have some (V-GON passes, the latent-init
        ablation); default key 0."""
        rng = jax.random.PRNGKey(0) if rng is None else rng
        return self._encode(self.state.params, self.state.batch_stats, self._images(images), rng)

    def decode(self, latents) -> jax.Array:
        """Images (n, H, W, C) decoded from latents (n, nz), batch norm over the n latents."""
        latents = jnp.asarray(latents, jnp.float32)
        return self._decode(self.state.params, self.state.batch_stats, latents)

    def reconstruct(self, images, rng: jax.Array | None = None) -> jax.Array:
        """decode(encode(images)): for a GON, what the origin step gives back."""
        return self.decode(self.encode(images, rng))

    def sample(self, n: int, rng: jax.Array) -> jax.Array:
        """n images from the model's prior (V-GON, VAE: z ~ N(0, I); Implicit GON: the Gaussian fitted to the
        latents of its last training batches, GON-SPEC 4.6), decoded as one batch."""
        if self.model.sample is not None:
            return xla.jit(self.model.sample, static_argnums=3)(self.state.params, self.state.batch_stats, rng, n)
        if self.model.latent_bank_batches:
            mean, cov = rendering.fit_gaussian(rendering.bank_latents(self.state, self.model))
            seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
            latents = rendering.sample_gaussian(mean, cov, n, seed).astype(np.float32)
            return jnp.clip(self.decode(latents), 0.0, 1.0)
        raise UsageError(f"{self.config.run_name} has no prior to sample from")

    def render(self, latents, resolution: int) -> np.ndarray:
        """Images (n, R, R, C) of a coordinate model (Implicit GON) at any resolution R over the training square."""
        if self.model.render is None:
            raise UsageError(f"{self.config.run_name} is not a function of coordinates; only the Implicit GON "
                             "renders at other resolutions")
        return rendering.render(self.model, self.state.params, jnp.asarray(latents, jnp.float32), resolution,
                                state=self.state.batch_stats)


def load_run(workdir) -> Run:
    """The run in `workdir` at its latest intact checkpoint (a damaged newer one is named on stderr and skipped).
    A folder that is not a gonjax run, or holds no checkpoint, is a UsageError."""
    path = files.check_path(workdir, "--workdir")
    missing = [name for name in ("config.json", "data.json") if not (path / name).is_file()]
    if "config.json" in missing and rundir.looks_like_a_run(path):
        raise UsageError(f"{path} holds a run's files but no config.json (deleted?); put it back (it records the "
                         "run's settings)")
    if missing == ["data.json"] and rundir.looks_like_a_run(path):
        raise UsageError(f"{path} has no data.json (deleted?); rerun the run's training command, which writes it "
                         "again (a finished run trains nothing more)")
    if missing:
        raise UsageError(f"{path} is not a gonjax run folder (no config.json / data.json)")
    config = Config.load(path / "config.json")
    try:
        data_info = json.loads((path / "data.json").read_text())
        image_shape = [int(n) for n in data_info["image_shape"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{path / 'data.json'} is unreadable ({error}); rerun the run's training command") from None
    try:
        config.validate()
    except UsageError as error:
        raise UsageError(f"{path / 'config.json'}: {error}; repair it or choose another run") from None
    model = build_model(config, image_shape[-1])
    sample_batch = jnp.zeros((config.batch_size, *image_shape), jnp.float32)
    state = create_train_state(model, make_optimizer(config), jax.random.PRNGKey(0), sample_batch)
    if not (path / checkpoints.FOLDER).is_dir():
        raise UsageError(f"{path} has no checkpoints yet; train it first")

    def on_damaged(step, reason):
        print(f"{path}: the checkpoint of step {step} is damaged ({reason}); using an older one",
              file=sys.stderr, flush=True)

    manager = checkpoints.open_manager(path, read_only=True)
    if manager.latest_step() is None:
        raise UsageError(f"{path} has no checkpoints yet; train it first")
    restored = checkpoints.restore_intact(manager, state, on_damaged)
    manager.close()
    if restored is None:
        raise UsageError(f"{path}: no intact checkpoint (see above); rerun its training command to train it again")
    return Run(path, config, model, restored, data_info)
