"""Run configuration: one frozen dataclass, written to `config.json` next to every run.

Each field is declared once, with everything about it: its default (or None for the spec's per-model and
per-dataset value, `model_defaults`), the models it applies to, its choices and its help. The experiment CLIs
build their flags from these declarations (`experiments.cli`), `Config.validate` checks types, choices and
applicability from them, and the flag table of docs/cli.md is generated from them (`settings_table`, checked by
a test). This module imports no model code.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from gonjax.catalog import DATASETS, SPLIT_SIZES
from gonjax.errors import UsageError

MODEL_NAMES = ("gon", "vgon", "ae", "vae", "implicit_gon")
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: a rate below it trains nothing
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: a setting above it is infinite where training computes
CONV_MODELS = ("gon", "vgon", "ae", "vae")  # the models built from the conv decoder (GON-SPEC 2.1)
ORIGIN_MODELS = ("gon", "vgon", "implicit_gon")  # the models whose latent comes from the origin step
LOSSES = ("spec", "peer_bce")  # the spec's losses, or gon-pytorch's inner / outer BCE (gonjax.losses)
ACTIVATION_NAMES = ("elu", "relu", "selu")  # gonjax.models.ACTIVATIONS
DECONV_IMPLS = ("taps", "subpixel", "dilated")  # gonjax.models.TorchConvTranspose
KERNELS = ("xla_cpu", "autodiff")  # gonjax.kernels' tuned custom-VJP kernels, or JAX's own primitives
KERNEL_CHOICES = ("auto",) + KERNELS  # auto: by backend (backend_kernels)
MATMUL_PRECISIONS = ("highest", "high", "default")  # jax.default_matmul_precision of every step (backend_precision)
POSITION_ENCODINGS = ("none", "fourier", "nerf")  # gonjax.models.Siren


def setting(default, help: str, models: tuple[str, ...] = MODEL_NAMES, choices: tuple | None = None,
            flag: bool = True, default_doc: str | None = None):
    """A Config field with its declaration: `models` it applies to (a different value on another model is an
    error), `choices`, `help`; `flag=False` for fields the CLIs set themselves; `default_doc` describes a None
    default filled from the spec."""
    return dataclasses.field(default=default, metadata={
        "help": help, "models": models, "choices": choices, "flag": flag, "default_doc": default_doc})


SEMANTICS = ("spec", "authors")  # J's settings and losses (the spec's), or the authors' scripts' (docs/semantics.md)
BCE_FORMS = ("eps", "clamp")  # J's +1e-10 inside the logs, or PyTorch's logs clamped at -100 (gonjax.losses)

# What the authors' scripts (P: GON.py, Variational-GON.py, Implicit-GON.py; GON-SPEC 5, 10) set where the spec
# (J) differs; a run's length in steps ("steps") when the script counts steps, not epochs.
AUTHORS_SETTINGS = {
    "gon": {"lr": 1e-4, "nz": 32, "ngf": 16, "steps": 1001},
    "vgon": {"lr": 1e-4, "nz": 48, "ngf": 32, "epochs": 300, "bce": "clamp"},
    "implicit_gon": {"lr": 1e-4, "nz": 32, "steps": 501, "loss_reduction": "sum"},
}


def model_defaults(model: str, dataset: str, semantics: str = "spec", batch_size: int = 64) -> dict:
    """The value of every setting left None, for a model on a dataset: J's schedule (GON-SPEC 5, 8), or with
    semantics "authors" what the authors' scripts use (AUTHORS_SETTINGS, docs/semantics.md).

    J: GON and AE 500 epochs, V-GON and VAE 1000, all at lr 2e-4, except V-GON on COIL-20 at 1e-3; the Implicit
    GON (latent 32) 100 epochs at 2e-4, on COIL-20 500 epochs at 1e-4 dropping to 5e-5 from epoch 50; latent 256,
    ngf 16, the Implicit GON's per-pixel MSE, BCE with +1e-10 in the logs. The authors count the GON's and the
    Implicit GON's training in steps: `max_steps`, and as many epochs of `batch_size` as those steps need.
    """
    defaults = {"epochs": {"gon": 500, "ae": 500, "vgon": 1000, "vae": 1000, "implicit_gon": 100}[model],
                "lr": 2e-4, "nz": 256, "ngf": 16, "lr_drop_epoch": None, "lr_drop_to": None, "max_steps": None,
                "loss_reduction": "mean", "bce": "eps"}
    if model == "vgon" and dataset == "coil20":
        defaults["lr"] = 1e-3
    if model == "implicit_gon":
        defaults["nz"] = 32
        if dataset == "coil20":
            defaults.update(epochs=500, lr=1e-4, lr_drop_epoch=50, lr_drop_to=5e-5)
    if semantics == "authors" and model in AUTHORS_SETTINGS:
        authors = dict(AUTHORS_SETTINGS[model])
        defaults.update(lr_drop_epoch=None, lr_drop_to=None)
        if "steps" in authors:
            defaults["max_steps"] = authors.pop("steps")
            steps_per_epoch = max(1, SPLIT_SIZES[dataset][0] // max(1, batch_size))
            defaults["epochs"] = -(-defaults["max_steps"] // steps_per_epoch)
        defaults.update(authors)
    return defaults


def _has_type(value, annotation: str) -> bool:
    """Whether a value fits a field annotated e.g. "int | None" (an int fits float; a bool fits only bool)."""
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}
    return any(isinstance(value, kinds[kind]) and (kind == "bool" or not isinstance(value, bool))
               for kind in annotation.split(" | "))


# Fields that may change when a run is resumed; every other field must match the saved config.json.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "data_dir", "manual_dir", "keep_checkpoints", "devices",
                               "eval_every", "checkpoint_every",  # when the run looks at itself, not what it trains
                               "deconv_impl", "kernels", "origin_shortcut",  # the same function computed another way
                               "matmul_precision",  # ... at another rounding of its contractions (not on CPU)
                               "steps_per_call"})  # ... in other dispatches


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that determines a run. Defaults are GON (16, 256) with J's settings (GON-SPEC 5, 8); the
    schedule, rate and latent size default to the spec's for the model and dataset chosen."""

    model: str = setting("gon", "the model", choices=MODEL_NAMES, flag=False)
    dataset: str = setting("fashion_mnist", "the dataset (GON-SPEC 6)", choices=DATASETS)
    semantics: str = setting("spec", "`authors`: what the authors' scripts compute and use, for every setting left "
                             "unset (losses, rate, sizes, length; docs/semantics.md)", models=ORIGIN_MODELS,
                             choices=SEMANTICS)
    epochs: int | None = setting(None, "epochs (J's schedule, GON-SPEC 5)",
                                 default_doc="500 (GON, AE), 1000 (V-GON, VAE), 100 (Implicit GON; 500 on COIL-20); "
                                             "authors: V-GON 300")
    batch_size: int = setting(64, "batch size; batch norm takes the statistics of each batch (GON-SPEC 3)")
    lr: float | None = setting(None, "Adam learning rate (betas 0.9 / 0.999, eps 1e-8)",
                               default_doc="2e-4 (V-GON on COIL-20: 1e-3; Implicit GON on COIL-20: 1e-4)")
    nz: int | None = setting(None, "latent size", default_doc="256 (Implicit GON: 32)")
    ngf: int | None = setting(None, "base width of the decoder (and encoder)", models=CONV_MODELS,
                              default_doc="16 (authors' V-GON: 32)")
    activation: str = setting("elu", "activation of the hidden layers (ablation, GON-SPEC 9)", models=CONV_MODELS,
                              choices=ACTIVATION_NAMES)
    detach: bool = setting(False, "detached GON: the latent is a constant in the outer gradient (GON-SPEC 4.2)",
                           models=("gon", "implicit_gon"))
    latent_sigma: float = setting(0.0, "start from z0 ~ N(0, sigma^2) and use z = z0 - grad (ablation, GON-SPEC 9)",
                                  models=("gon", "implicit_gon"))
    latent_noise: str = setting("example", "with --latent-sigma: `example` draws z0 for every example (GON-SPEC 9), "
                                "`batch` one z0 that every example of the batch shares", models=("gon", "implicit_gon"),
                                choices=("example", "batch"))
    bn_epsilon: float = setting(1e-5, "batch norm's eps in (x - mean) / sqrt(var + eps) (PyTorch's, GON-SPEC 3)",
                                models=CONV_MODELS)
    kl_weight: float = setting(1.0, "weight of the KLD in BCE + weight * KLD (GON-SPEC 4.3)", models=("vgon", "vae"))
    kl_warmup_steps: int = setting(0, "ramp the KL weight linearly from 0 over this many steps",
                                   models=("vgon", "vae"))
    lr_drop_epoch: int | None = setting(None, "from this epoch on, train at --lr-drop-to", models=("implicit_gon",),
                                        default_doc="COIL-20: 50")
    lr_drop_to: float | None = setting(None, "the learning rate after --lr-drop-epoch", models=("implicit_gon",),
                                       default_doc="COIL-20: 5e-5")
    loss_reduction: str | None = setting(None, "`mean`: per-pixel MSE (J); `sum`: squared error summed over "
                                         "pixels, averaged over batch and channels (P's `.sum(1).mean()`), "
                                         "GON-SPEC 4.4", models=("implicit_gon",), choices=("mean", "sum"),
                                         default_doc="mean (authors: sum)")
    bce: str | None = setting(None, "the BCE's logs: `eps` adds 1e-10 inside them (J), `clamp` clamps them at -100 "
                              "with PyTorch's derivatives (P), GON-SPEC 4.3", models=("vgon", "vae"),
                              choices=BCE_FORMS, default_doc="eps (authors' V-GON: clamp)")
    seed: int = setting(0, "parameter init, data order and every key of the run")
    max_steps: int | None = setting(None, "stop after N training steps, then evaluate (smoke runs; the authors' "
                                    "length of a GON or Implicit GON run)",
                                    default_doc="none (authors: GON 1001, Implicit GON 501)")
    data_dir: str | None = setting(None, "where TFDS keeps prepared datasets", default_doc="TFDS's own")
    manual_dir: str | None = setting(None, "folder of official dataset files (or of folders named after the "
                                           "datasets), to prepare offline")
    keep_checkpoints: int = setting(3, "how many of the latest checkpoints to keep")
    deconv_impl: str = setting("taps", "how the transposed convolutions are computed (the same function)",
                               models=CONV_MODELS, choices=DECONV_IMPLS)
    kernels: str = setting("auto", "`xla_cpu`: gonjax.kernels' XLA:CPU-tuned custom-VJP kernels; `autodiff`: JAX's "
                                   "own primitives (forward-mode transforms work); `auto`: xla_cpu on a CPU, "
                                   "autodiff on any other backend", choices=KERNEL_CHOICES)
    matmul_precision: str = setting("highest", "precision of every matmul and convolution on a GPU or TPU "
                                               "(`highest`: float32; `default` lets a GPU round operands to TF32); "
                                               "a CPU computes float32 whatever it says", choices=MATMUL_PRECISIONS)
    origin_shortcut: bool = setting(True, "inner pass at z0 from one decoded example (gonjax.origin)",
                                    models=("gon", "implicit_gon"), flag=False)
    eval_batches: int | None = setting(None, "evaluate on the first N batches of each split only (records then "
                                             "say `eval_batches`)", default_doc="all")
    eval_every: int = setting(1, "evaluate after every N-th epoch and at the end; the training is bit for bit the "
                                 "same, the curves have fewer points")
    checkpoint_every: int | None = setting(None, "checkpoint after every N-th epoch and at the end; a kill loses "
                                                 "up to N epochs", default_doc="as --eval-every")
    devices: int | None = setting(None, "split each batch over this many devices (docs/scaling.md)",
                                  default_doc="1 (--seeds: as many as divide the seeds; several processes: all)")
    steps_per_call: int | None = setting(None, "training steps (and evaluation batches) per dispatch, at most an "
                                               "epoch's: one loop on the device over batches gathered there "
                                               "(gonjax.loops); a stop waits for the call in flight",
                                         default_doc="50 on a GPU or TPU; on a CPU 50 for the Implicit GON, 1 for "
                                                     "the conv models (benchmarks/README.md, \"Steps per call\")")
    # Variants of the origin step (docs/spec.md "Variants"). Defaults are the spec's.
    latent_updates: int = setting(1, "N updates z <- z - step * grad L_in(z), each differentiable (second order "
                                     "through all N)", models=ORIGIN_MODELS)
    latent_step_size: float = setting(1.0, "the step of each latent update", models=ORIGIN_MODELS)
    learn_origin: bool = setting(False, "z0 a trained parameter (zeros at init, nz more parameters)",
                                 models=ORIGIN_MODELS)
    loss: str = setting("spec", "`peer_bce`: gon-pytorch's losses (inner BCE summed over the batch, outer BCE "
                                "averaged)", models=("gon", "implicit_gon"), choices=LOSSES)
    position_encoding: str = setting("none", "encode the coordinates: Gaussian Fourier features or NeRF's",
                                     models=("implicit_gon",), choices=POSITION_ENCODINGS)
    fourier_features: int = setting(32, "`fourier`: width of the projection (2x as many features)",
                                    models=("implicit_gon",))
    fourier_sigma: float = setting(1.0, "`fourier`: standard deviation of the projection", models=("implicit_gon",))
    nerf_frequencies: int = setting(10, "`nerf`: frequencies per coordinate (2x as many features each)",
                                    models=("implicit_gon",))
    modulation: bool = setting(False, "a modulated SIREN: a ReLU network of the latent scales each hidden layer",
                               models=("implicit_gon",))

    def __post_init__(self):
        """Fill the settings left None (`model_defaults`): `Config(model="implicit_gon", dataset="coil20")` is J's
        Implicit GON run on COIL-20, with `semantics="authors"` the authors' script's. A rate given without a drop
        trains at that constant rate."""
        if self.model not in MODEL_NAMES or self.dataset not in DATASETS:
            return  # validate() says what is wrong
        constant_rate = self.lr is not None and self.lr_drop_epoch is None and self.lr_drop_to is None
        for name, value in self.unset_values().items():
            if getattr(self, name) is None and not (constant_rate and name in ("lr_drop_epoch", "lr_drop_to")):
                object.__setattr__(self, name, value)

    def unset_values(self) -> dict:
        """What each setting that `model_defaults` fills takes when left None, for this model, dataset and
        semantics (a setting that does not apply to the model still takes one, so every config.json has it)."""
        semantics = self.semantics if self.semantics in SEMANTICS else "spec"
        batch_size = self.batch_size if isinstance(self.batch_size, int) else 64
        return model_defaults(self.model, self.dataset, semantics, batch_size)

    @property
    def checkpoint_cadence(self) -> int:
        """Epochs between checkpoints: checkpoint_every, or eval_every when that is None."""
        return self.eval_every if self.checkpoint_every is None else self.checkpoint_every

    @property
    def run_name(self) -> str:
        """Model name as used in run folders and tables, e.g. `gon_detached`."""
        return f"{self.model}_detached" if self.detach else self.model

    def validate(self) -> "Config":
        """Raise UsageError (one line) for a value no run can use: a wrong type or choice, a setting on a model it
        does not apply to (from the fields' declarations), or a value out of range."""
        if self.model not in MODEL_NAMES:
            raise UsageError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        unset = self.unset_values() if self.dataset in DATASETS else {}
        for field in dataclasses.fields(self):
            value, meta = getattr(self, field.name), field.metadata
            if not _has_type(value, field.type):
                raise UsageError(f"{flag_name(field.name)} must be {_type_words(field.type)}, got {value!r}")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise UsageError(f"{flag_name(field.name)} must be one of {', '.join(map(str, meta['choices']))}, "
                                 f"got {value!r}")
            if self.model not in meta["models"] and value != unset.get(field.name, field.default):
                raise UsageError(f"{flag_name(field.name)} applies to {', '.join(meta['models'])}, not {self.model}")
        self._validate_ranges()
        return self

    def _validate_ranges(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "nz": self.nz, "ngf": self.ngf,
                    "keep_checkpoints": self.keep_checkpoints, "eval_every": self.eval_every,
                    "latent_updates": self.latent_updates, "fourier_features": self.fourier_features,
                    "nerf_frequencies": self.nerf_frequencies}
        for name in ("max_steps", "eval_batches", "devices", "checkpoint_every", "steps_per_call"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"{flag_name(name)} must be at least 1, got {value}")
        if self.batch_size < 2:
            raise UsageError("--batch-size must be at least 2: batch norm needs two images per batch")
        for name in ("lr", "latent_sigma", "kl_weight", "lr_drop_to"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UsageError(f"{flag_name(name)} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be an integer from 0 to 2**63 - 1, got {self.seed}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        for name in ("lr", "lr_drop_to"):
            value = getattr(self, name)
            if value is not None and 0 < value < FLOAT32_TINY:
                raise UsageError(f"{flag_name(name)} {value} is 0 in float32, where training computes; "
                                 f"use at least {FLOAT32_TINY:.3g}")
        if self.latent_sigma < 0:
            raise UsageError(f"--latent-sigma must be non-negative, got {self.latent_sigma}")
        if self.latent_noise == "batch" and self.latent_sigma == 0:
            raise UsageError("--latent-noise batch draws a start only with --latent-sigma above 0; give both")
        if (self.lr_drop_epoch is None) != (self.lr_drop_to is None):
            raise UsageError("--lr-drop-epoch and --lr-drop-to go together")
        if self.lr_drop_epoch is not None and (self.lr_drop_epoch < 0 or not self.lr_drop_to > 0):
            raise UsageError("--lr-drop-epoch must be non-negative and --lr-drop-to positive")
        if self.kl_weight < 0 or self.kl_warmup_steps < 0:
            raise UsageError("--kl-weight and --kl-warmup-steps must be non-negative")
        for name in ("latent_step_size", "fourier_sigma", "bn_epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"{flag_name(name)} must be a positive number, got {value}")
        for name in ("lr", "lr_drop_to", "latent_sigma", "kl_weight", "latent_step_size", "fourier_sigma",
                     "bn_epsilon"):
            value = getattr(self, name)
            if value is not None and value > FLOAT32_MAX:
                raise UsageError(f"{flag_name(name)} {value:g} is infinite in float32, where training computes; "
                                 f"use at most {FLOAT32_MAX:.3g}")
        if self.loss != "spec" and self.semantics != "spec":
            raise UsageError(f"--loss {self.loss} replaces the losses --semantics {self.semantics} selects; "
                             "choose one of the two")
        if self.loss != "spec" and self.loss_reduction != "mean":
            raise UsageError("--loss-reduction sum is the spec's MSE; it does not combine with --loss peer_bce")

    def divergence_remedy(self) -> str:
        """What to lower when training diverges: the rate, and the latent step where the model takes one."""
        return "lower --lr" + (" or --latent-step-size" if self.model in ORIGIN_MODELS else "")

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


def backend_kernels(kernels: str, backend: str) -> str:
    """The kernels a model is built with on `backend` ("cpu", "cuda", "rocm", "tpu", ...): `auto` is the
    XLA:CPU-tuned kernels on a CPU, where they were measured faster (benchmarks/README.md), and JAX's own
    primitives everywhere else (cuDNN / cuBLAS convolutions and matmuls); an explicit choice is kept."""
    if kernels != "auto":
        return kernels
    return "xla_cpu" if backend == "cpu" else "autodiff"


def backend_precision(precision: str, backend: str) -> str | None:
    """The `jax.default_matmul_precision` a model's computations are traced under on `backend`, or None for none.
    On a GPU JAX's default float32 contraction is TF32 (a 10-bit mantissa), about 100 times float32's error in a
    GON step (its origin step amplifies rounding, GON-SPEC 3), so the default pins `highest`. XLA:CPU computes
    float32 contractions in float32 whatever the attribute: nothing is pinned there, so CPU programs stay the ones
    measured."""
    return None if backend == "cpu" else precision


def backend_steps_per_call(steps_per_call: int | None, backend: str, model: str) -> int:
    """Training steps per dispatch for `model` on `backend` when --steps-per-call is unset (a given count is kept).
    Off the CPU, 50: a GPU step takes milliseconds, which Python's dispatch and bookkeeping per step would eat
    into. On XLA:CPU a loop of steps is not always faster (benchmarks/README.md, "Steps per call"): the Implicit
    GON's step took 0.76x its time alone and the GON's 0.97x, but the Conv AE's 9.3x (not examined; its strided
    encoder convolutions, which the GON lacks, are the likely place); so 50 for the Implicit GON, 1 (the step
    alone) for the conv models."""
    if steps_per_call is not None:
        return steps_per_call
    return 50 if backend != "cpu" or model == "implicit_gon" else 1


def flag_name(field_name: str) -> str:
    """The CLI flag of a Config field: `latent_sigma` -> `--latent-sigma`."""
    return "--" + field_name.replace("_", "-")


def _type_words(annotation: str) -> str:
    words = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string", "None": "None"}
    return " or ".join(words[kind] for kind in annotation.split(" | "))


def declared_settings() -> list[dataclasses.Field]:
    """The Config fields that are CLI flags, in declaration order."""
    return [field for field in dataclasses.fields(Config) if field.metadata["flag"]]


def settings_table() -> str:
    """The markdown table of every setting's flag, default, models and meaning (docs/cli.md holds it)."""
    lines = ["| flag | default | models | meaning |", "|---|---|---|---|"]
    for field in declared_settings():
        meta = field.metadata
        default = meta["default_doc"] or {False: "off", None: "none"}.get(field.default, str(field.default))
        models = "all" if meta["models"] == MODEL_NAMES else ", ".join(meta["models"])
        meaning = meta["help"] + (f" ({', '.join(map(str, meta['choices']))})" if meta["choices"] else "")
        lines.append(f"| `{flag_name(field.name)}` | {default} | {models} | {meaning} |")
    return "\n".join(lines) + "\n"
