"""Run configuration: one frozen dataclass, written to `config.json` next to every run."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from gonjax.catalog import DATASETS
from gonjax.errors import UsageError
from gonjax.models import ACTIVATIONS, DECONV_IMPLS, KERNELS, POSITION_ENCODINGS


MODEL_NAMES = ("gon", "vgon", "ae", "vae", "implicit_gon")
ORIGIN_MODELS = ("gon", "vgon", "implicit_gon")  # the models whose latent comes from the origin step
LOSSES = ("spec", "peer_bce")  # the spec's losses, or gon-pytorch's inner / outer BCE (gonjax.losses)


def model_defaults(model: str, dataset: str) -> dict:
    """J's schedule for a model on a dataset (GON-SPEC 5, 8): epochs, lr (and its drop), latent size.

    GON and AE 500 epochs, V-GON and VAE 1000, all at lr 2e-4, except V-GON on COIL-20 at 1e-3; the Implicit GON
    (latent 32) 100 epochs at 2e-4, on COIL-20 500 epochs at 1e-4 dropping to 5e-5 from epoch 50.
    """
    defaults = {"epochs": {"gon": 500, "ae": 500, "vgon": 1000, "vae": 1000, "implicit_gon": 100}[model],
                "lr": 2e-4, "nz": 256, "lr_drop_epoch": None, "lr_drop_to": None}
    if model == "vgon" and dataset == "coil20":
        defaults["lr"] = 1e-3
    if model == "implicit_gon":
        defaults["nz"] = 32
        if dataset == "coil20":
            defaults.update(epochs=500, lr=1e-4, lr_drop_epoch=50, lr_drop_to=5e-5)
    return defaults


def _has_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a field annotated e.g. "int | None" (an int fits float; a bool fits only bool)."""
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}
    return any(isinstance(value, kinds[kind]) and (kind == "bool" or not isinstance(value, bool))
               for kind in annotation.split(" | "))


# Fields that may change when a run is resumed; every other field must match the saved config.json.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "data_dir", "manual_dir", "keep_checkpoints", "devices",
                               "eval_every", "checkpoint_every",  # when the run looks at itself, not what it trains
                               "deconv_impl", "kernels", "origin_shortcut"})  # the same function computed another way


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that determines a run. Defaults are GON (16, 256) with J's settings (GON-SPEC 5, 8); the
    schedule, rate and latent size default to the spec's for the model and dataset chosen."""

    model: str = "gon"
    dataset: str = "fashion_mnist"
    epochs: int | None = None  # None: the spec's schedule for the model and dataset (model_defaults)
    batch_size: int = 64
    lr: float | None = None  # None: the spec's rate (and drop) for the model and dataset
    nz: int | None = None  # None: 256, the Implicit GON's 32
    ngf: int = 16
    activation: str = "elu"
    detach: bool = False  # GON-SPEC 4.2
    latent_sigma: float = 0.0  # z0 ~ N(0, sigma^2), GON-SPEC 9
    kl_weight: float = 1.0  # weight of the KLD in V-GON / VAE losses (GON-SPEC 4.3)
    kl_warmup_steps: int = 0  # linear warm-up of the KL weight from 0 over this many steps
    lr_drop_epoch: int | None = None  # from this epoch on, train with lr_drop_to
    lr_drop_to: float | None = None
    loss_reduction: str = "mean"  # Implicit GON: "mean" per-pixel MSE (J), "sum" over pixels (P), GON-SPEC 4.4
    seed: int = 0
    max_steps: int | None = None  # stop after this many training steps (then evaluate)
    data_dir: str | None = None  # TFDS data dir; None = TFDS's default
    manual_dir: str | None = None  # folder of official files, for offline preparation
    keep_checkpoints: int = 3
    deconv_impl: str = "taps"  # computation of the transposed convolutions: "taps", "subpixel" or "dilated"
    kernels: str = "xla_cpu"  # "autodiff": JAX's own primitives only, for jvp / linearize / hessian (gonjax.kernels)
    origin_shortcut: bool = True  # inner pass at z0 = 0 from one decoded example (gonjax.origin.origin_gradient)
    eval_batches: int | None = None  # evaluate on the first N batches of each split only (default: full passes)
    eval_every: int = 1  # evaluate after every N-th epoch and at the run's end; training unchanged
    checkpoint_every: int | None = None  # checkpoint after every N-th epoch and at the end; None: as eval_every
    devices: int | None = None  # devices the batch is split over (gonjax.parallel); None: every device
    # Variants of the origin step (docs/spec.md "Variants"; gon, vgon, implicit_gon). Defaults are the spec's.
    latent_updates: int = 1  # N updates z <- z - latent_step_size * grad L_in(z), each differentiable
    latent_step_size: float = 1.0
    learn_origin: bool = False  # z0 a trained parameter (params["latent_origin"]), the same for every example
    loss: str = "spec"  # "peer_bce": gon-pytorch's losses (gon, implicit_gon), see LOSSES
    # Implicit GON variants: position encoding of the coordinates, modulated SIREN.
    position_encoding: str = "none"  # POSITION_ENCODINGS
    fourier_features: int = 32  # "fourier": the projection's width (2x as many features)
    fourier_sigma: float = 1.0  # "fourier": standard deviation of the projection
    nerf_frequencies: int = 10  # "nerf": frequencies per coordinate (2x as many features each)
    modulation: bool = False

    def __post_init__(self):
        """Fill the settings left None from the spec's schedule for this model and dataset (`model_defaults`),
        so `Config(model="implicit_gon", dataset="coil20")` is J's Implicit GON run on COIL-20. A rate given
        without a drop trains at that constant rate."""
        if self.model not in MODEL_NAMES or self.dataset not in DATASETS:
            return  # validate() says what is wrong
        defaults = model_defaults(self.model, self.dataset)
        constant_rate = self.lr is not None and self.lr_drop_epoch is None and self.lr_drop_to is None
        for name in ("epochs", "lr", "nz") + (() if constant_rate else ("lr_drop_epoch", "lr_drop_to")):
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])

    @property
    def checkpoint_cadence(self) -> int:
        """Epochs between checkpoints: checkpoint_every, or eval_every when that is None."""
        return self.eval_every if self.checkpoint_every is None else self.checkpoint_every

    @property
    def run_name(self) -> str:
        """Model name as used in run folders and tables, e.g. `gon_detached`."""
        return f"{self.model}_detached" if self.detach else self.model

    def validate(self) -> "Config":
        """Raise UsageError (one line) for a value no run can use."""
        if self.model not in MODEL_NAMES:
            raise UsageError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        if self.dataset not in DATASETS:
            raise UsageError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "nz": self.nz, "ngf": self.ngf,
                    "keep_checkpoints": self.keep_checkpoints, "eval_every": self.eval_every}
        for name in ("max_steps", "eval_batches", "devices", "checkpoint_every"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.batch_size < 2:
            raise UsageError("--batch-size must be at least 2: batch norm needs two images per batch")
        for name in ("lr", "latent_sigma", "kl_weight", "lr_drop_to"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be an integer from 0 to 2**63 - 1, got {self.seed}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.latent_sigma < 0:
            raise UsageError(f"--latent-sigma must be non-negative, got {self.latent_sigma}")
        if (self.lr_drop_epoch is None) != (self.lr_drop_to is None):
            raise UsageError("--lr-drop-epoch and --lr-drop-to go together")
        if self.lr_drop_epoch is not None and (self.lr_drop_epoch < 0 or not self.lr_drop_to > 0):
            raise UsageError("--lr-drop-epoch must be non-negative and --lr-drop-to positive")
        if self.deconv_impl not in DECONV_IMPLS:
            raise UsageError(f"deconv_impl must be one of {', '.join(DECONV_IMPLS)}, got {self.deconv_impl!r}")
        if self.kernels not in KERNELS:
            raise UsageError(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.loss_reduction not in ("mean", "sum"):
            raise UsageError(f"--loss-reduction must be mean or sum, got {self.loss_reduction!r}")
        if self.kl_weight < 0 or self.kl_warmup_steps < 0:
            raise UsageError("--kl-weight and --kl-warmup-steps must be non-negative")
        self._validate_variants()
        return self

    def _validate_variants(self) -> None:
        """The origin-step and SIREN variants: valid values, and only on the models that have them."""
        if self.latent_updates < 1:
            raise UsageError(f"--latent-updates must be at least 1, got {self.latent_updates}")
        if not (math.isfinite(self.latent_step_size) and self.latent_step_size > 0):
            raise UsageError(f"--latent-step-size must be a positive number, got {self.latent_step_size}")
        origin_variants = {"latent_updates": self.latent_updates != 1, "latent_step_size": self.latent_step_size != 1,
                           "learn_origin": self.learn_origin}
        for name, used in origin_variants.items():
            if used and self.model not in ORIGIN_MODELS:
                raise UsageError(f"--{name.replace('_', '-')} applies to the origin-step models "
                                 f"({', '.join(ORIGIN_MODELS)}), not {self.model}")
        if self.loss not in LOSSES:
            raise UsageError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.loss != "spec" and self.model not in ("gon", "implicit_gon"):
            raise UsageError(f"--loss {self.loss} applies to gon and implicit_gon; {self.model} keeps its own loss")
        if self.loss != "spec" and self.loss_reduction != "mean":
            raise UsageError("--loss-reduction sum is the spec's MSE; it does not combine with --loss peer_bce")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise UsageError(f"--position-encoding must be one of {', '.join(POSITION_ENCODINGS)}, "
                             f"got {self.position_encoding!r}")
        if (self.position_encoding != "none" or self.modulation) and self.model != "implicit_gon":
            raise UsageError("--position-encoding and --modulation apply to implicit_gon only")
        if self.fourier_features < 1 or self.nerf_frequencies < 1:
            raise UsageError("--fourier-features and --nerf-frequencies must be at least 1")
        if not (math.isfinite(self.fourier_sigma) and self.fourier_sigma > 0):
            raise UsageError(f"--fourier-sigma must be a positive number, got {self.fourier_sigma}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> "Config":
        """The Config saved in `path`, its types checked (a hand-edited `"nz": "256"` is a UsageError)."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"{path} is not readable JSON ({error}); repair it or choose another run") from None
        if not isinstance(values, dict):
            raise UsageError(f"{path} does not hold a JSON object; repair it or choose another run")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in values.items():
            if name in fields and not _has_type(value, fields[name].type):
                raise UsageError(f"{path}: {name} is {value!r}, which is not {fields[name].type}; "
                                 "repair config.json or choose another run")
        return cls(**{k: v for k, v in values.items() if k in fields})

    def differences(self, other: "Config") -> dict[str, tuple]:
        """Fields that differ and may not change on resume: {name: (self's value, other's value)}."""
        diff = {}
        for field in dataclasses.fields(self):
            a, b = getattr(self, field.name), getattr(other, field.name)
            if a != b and field.name not in RESUMABLE_CHANGES:
                diff[field.name] = (a, b)
        return diff
