"""One source of defaults: the library's Config, the CLIs and the results suite agree (GON-SPEC 5)."""
import ast
import dataclasses
import json
import re

import pytest

from conftest import REPO
from experiments import cli
from experiments import sigma_study, suite
from gonjax import models, zoo
from gonjax.catalog import DATASETS
from gonjax.config import ACTIVATION_NAMES, MODEL_NAMES, Config, flag_name, settings_table
from gonjax.errors import UsageError


def _settings(config):
    return config.epochs, config.lr, config.nz, config.lr_drop_epoch, config.lr_drop_to


def test_config_fills_the_spec_schedule_of_its_model_and_dataset():
    # GON-SPEC 5, written out by hand.
    assert _settings(Config()) == (500, 2e-4, 256, None, None)
    assert _settings(Config(model="ae", dataset="mnist")) == (500, 2e-4, 256, None, None)
    assert _settings(Config(model="vgon", dataset="mnist")) == (1000, 2e-4, 256, None, None)
    assert _settings(Config(model="vgon", dataset="coil20")) == (1000, 1e-3, 256, None, None)
    assert _settings(Config(model="vae", dataset="cifar10")) == (1000, 2e-4, 256, None, None)
    assert _settings(Config(model="implicit_gon")) == (100, 2e-4, 32, None, None)
    assert _settings(Config(model="implicit_gon", dataset="coil20")) == (500, 1e-4, 32, 50, 5e-5)
    # What is given wins; a rate given alone is a constant rate.
    assert _settings(Config(model="implicit_gon", dataset="coil20", lr=3e-4)) == (500, 3e-4, 32, None, None)
    assert _settings(Config(model="implicit_gon", dataset="coil20", nz=8, epochs=2)) == (2, 1e-4, 8, 50, 5e-5)


def test_unknown_model_is_a_usage_error():
    assert set(zoo.MODELS) == set(MODEL_NAMES)
    with pytest.raises(UsageError, match="unknown model 'gan'"):
        Config(model="gan").validate()


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_cli_and_suite_build_the_library_config(model):
    parser = cli.build_parser("test", "test", model)
    for dataset in DATASETS:
        assert cli.config_from_args(parser.parse_args(["--dataset", dataset]), model) == \
            Config(model=model, dataset=dataset)
    for cell in suite.plan():
        if cell.row.model == model and not cell.row.settings and cell.row.epochs is None:
            assert cell.config() == Config(model=model, dataset=cell.dataset)


@pytest.mark.parametrize("overrides, message", [
    (dict(model="ae", latent_updates=2), "--latent-updates applies to gon, vgon, implicit_gon, not ae"),
    (dict(model="vae", learn_origin=True), "--learn-origin applies to gon, vgon, implicit_gon, not vae"),
    (dict(model="gon", latent_updates=0), "--latent-updates must be at least 1"),
    (dict(model="gon", latent_step_size=float("nan")), "--latent-step-size must be a positive number"),
    # Finite in float64, infinite where training computes: named, not blamed on --lr when the run diverges.
    (dict(model="gon", latent_step_size=1e300), "--latent-step-size 1e+300 is infinite in float32"),
    (dict(model="implicit_gon", fourier_sigma=1e39, position_encoding="fourier"), "--fourier-sigma 1e+39 is inf"),
    (dict(model="vae", kl_weight=4e38), "--kl-weight 4e+38 is infinite in float32"),
    (dict(lr=1e39), "--lr 1e+39 is infinite in float32, where training computes; use at most 3.4e+38"),
    (dict(model="vgon", loss="peer_bce"), "--loss applies to gon, implicit_gon, not vgon"),
    (dict(model="gon", loss="hinge"), "--loss must be one of spec, peer_bce"),
    (dict(model="implicit_gon", loss="peer_bce", loss_reduction="sum"), "does not combine"),
    (dict(model="ae", semantics="authors"), "--semantics applies to gon, vgon, implicit_gon, not ae"),
    (dict(model="gon", semantics="paper"), "--semantics must be one of spec, authors"),
    (dict(model="gon", bce="clamp"), "--bce applies to vgon, vae, not gon"),
    (dict(model="implicit_gon", semantics="authors", loss="peer_bce"), "choose one of the two"),
    (dict(model="gon", modulation=True), "--modulation applies to implicit_gon, not gon"),
    (dict(model="implicit_gon", position_encoding="spherical"), "--position-encoding must be one of"),
    (dict(model="implicit_gon", position_encoding="fourier", fourier_sigma=0.0), "--fourier-sigma"),
    (dict(model="gon", latent_noise="batch"), "--latent-noise batch draws a start only with --latent-sigma above 0"),
    (dict(model="gon", latent_noise="layer"), "--latent-noise must be one of example, batch"),
    (dict(model="gon", bn_epsilon=0.0), "--bn-epsilon must be a positive number"),
    (dict(model="implicit_gon", bn_epsilon=1e-3), "--bn-epsilon applies to gon, vgon, ae, vae, not implicit_gon"),
    # Settings a model would silently ignore are refused in the library as on the CLI.
    (dict(model="ae", detach=True), "--detach applies to gon, implicit_gon, not ae"),
    (dict(model="vae", latent_sigma=0.1), "--latent-sigma applies to gon, implicit_gon, not vae"),
    (dict(model="gon", kl_weight=0.5), "--kl-weight applies to vgon, vae, not gon"),
    (dict(model="implicit_gon", ngf=32), "--ngf applies to gon, vgon, ae, vae, not implicit_gon"),
    (dict(model="vgon", origin_shortcut=False), "--origin-shortcut applies to gon, implicit_gon, not vgon"),
    # Types and choices, whatever the caller passes.
    (dict(detach="no"), "--detach must be True or False, got 'no'"),
    (dict(batch_size=64.5), "--batch-size must be an integer, got 64.5"),
    (dict(nz="256"), "--nz must be an integer or None, got '256'"),
    (dict(activation="tanh"), "--activation must be one of elu, relu, selu"),
    (dict(kernels="cuda"), "--kernels must be one of auto, xla_cpu, autodiff"),
])
def test_settings_are_checked_from_their_declarations(overrides, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        Config(**overrides).validate()


def test_every_setting_declares_models_and_help_and_the_docs_table_is_generated_from_them():
    for field in dataclasses.fields(Config):
        assert field.metadata["help"] and set(field.metadata["models"]) <= set(MODEL_NAMES), field.name
        assert field.name == "model" or field.default is None or field.name not in ("epochs", "lr", "nz")
    docs = (REPO / "docs" / "cli.md").read_text()
    generated = docs.split("<!-- settings table: generated by gonjax.config.settings_table() -->\n", 1)[1]
    assert generated.split("<!-- end of settings table -->", 1)[0] == settings_table(), \
        "docs/cli.md's settings table is stale: regenerate it from gonjax.config.settings_table()"


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_each_cli_has_exactly_the_flags_of_the_settings_that_apply_to_its_model(model):
    parser = cli.build_parser("test", "test", model)
    flags = {option for action in parser._actions for option in action.option_strings}
    for field in dataclasses.fields(Config):
        if field.metadata["flag"]:
            assert (flag_name(field.name) in flags) == (model in field.metadata["models"]), field.name
    assert {"--seeds", "--workdir", "--coordinator"} <= flags
    assert "--model" not in flags and "--origin-shortcut" not in flags


def test_variant_defaults_are_the_spec_and_old_configs_load(tmp_path):
    """A config.json written before the variants existed loads with the spec's behaviour."""
    config = Config(model="gon", dataset="coil20")
    assert (config.latent_updates, config.latent_step_size, config.learn_origin, config.loss) == (1, 1.0, False, "spec")
    old = json.loads(config.to_json())
    for name in ("latent_updates", "latent_step_size", "learn_origin", "loss", "position_encoding",
                 "fourier_features", "fourier_sigma", "nerf_frequencies", "modulation", "eval_every",
                 "latent_noise", "bn_epsilon"):
        del old[name]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert Config.load(tmp_path / "config.json") == config


@pytest.mark.parametrize("model, dataset, expected", [
    # GON.py: lr 1e-4, latent 32, ngf 16, 1001 steps (MNIST: 937 a epoch, so 2 epochs cut at step 1001).
    ("gon", "mnist", dict(lr=1e-4, nz=32, ngf=16, max_steps=1001, epochs=2, loss_reduction="mean", bce="eps")),
    # Variational-GON.py: lr 1e-4, latent 48, ngf 32, 300 epochs, PyTorch's clamped BCE.
    ("vgon", "fashion_mnist", dict(lr=1e-4, nz=48, ngf=32, max_steps=None, epochs=300, bce="clamp")),
    # Implicit-GON.py: lr 1e-4 constant (J's COIL-20 drop is J's), latent 32, 501 steps (COIL-20: 18 a epoch),
    # pixels summed.
    ("implicit_gon", "coil20", dict(lr=1e-4, lr_drop_epoch=None, lr_drop_to=None, nz=32, max_steps=501,
                                    epochs=28, loss_reduction="sum")),
])
def test_authors_semantics_fill_what_the_authors_scripts_use(model, dataset, expected):
    config = Config(model=model, dataset=dataset, semantics="authors").validate()
    assert {name: getattr(config, name) for name in expected} == expected
    spec = Config(model=model, dataset=dataset)
    assert (spec.semantics, spec.max_steps, spec.bce, spec.loss_reduction) == ("spec", None, "eps", "mean")
    mine = Config(model=model, dataset=dataset, semantics="authors", lr=3e-4, nz=64).validate()
    assert (mine.lr, mine.nz, mine.max_steps) == (3e-4, 64, expected["max_steps"])  # a setting given wins


def test_a_config_json_from_before_the_semantics_resumes_as_the_same_run():
    """Every config.json the committed results archive holds (written before `semantics`, `bce` and the
    unset `ngf` / `loss_reduction` existed) loads, validates, and equals the config the suite builds for its
    cell now: no difference that would refuse to resume it."""
    archive = REPO / "docs/results/runs"
    archived = sorted(p for p in archive.glob("**/config.json") if p.relative_to(archive).parts[0] in suite.TABLES)
    assert len(archived) >= 10
    cells = {str(cell.folder): cell for cell in suite.plan(seeds=[0, 1, 2])}
    for path in archived:
        saved = Config.load(path).validate()
        folder = str(path.parent.relative_to(archive))
        now = cells[folder].config(epochs=saved.epochs, eval_every=saved.eval_every,
                                   checkpoint_every=saved.checkpoint_every)
        assert saved.differences(now) == {}, (folder, saved.differences(now))
    # ... and each run of the sigma study is its variant's config (experiments.sigma_study)
    variants = {variant.name: variant for variant in sigma_study.VARIANTS}
    for path in sorted((archive / sigma_study.STUDY).glob("*/config.json")):
        saved = Config.load(path).validate()
        now = sigma_study.variant_config(variants[path.parent.name], saved.epochs, saved.eval_batches)
        assert saved.differences(now) == {}, (path.parent.name, saved.differences(now))


def test_config_imports_no_model_code_and_its_names_are_the_models():
    tree = ast.parse((REPO / "gonjax" / "config.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "dataclasses", "json", "math", "pathlib", "gonjax.catalog", "gonjax.errors"}
    assert tuple(models.ACTIVATIONS) == ACTIVATION_NAMES
