"""One source of defaults: the library's Config, the CLIs and the results suite agree (GON-SPEC 5)."""
import json

import pytest

from experiments import cli
from experiments import suite
from gonjax import zoo
from gonjax.catalog import DATASETS
from gonjax.config import MODEL_NAMES, Config
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
    (dict(model="ae", latent_updates=2), "--latent-updates applies to the origin-step models"),
    (dict(model="vae", learn_origin=True), "--learn-origin applies to the origin-step models"),
    (dict(model="gon", latent_updates=0), "--latent-updates must be at least 1"),
    (dict(model="gon", latent_step_size=float("nan")), "--latent-step-size must be a positive number"),
    (dict(model="vgon", loss="peer_bce"), "keeps its own loss"),
    (dict(model="gon", loss="hinge"), "--loss must be one of spec, peer_bce"),
    (dict(model="implicit_gon", loss="peer_bce", loss_reduction="sum"), "does not combine"),
    (dict(model="gon", modulation=True), "implicit_gon only"),
    (dict(model="implicit_gon", position_encoding="spherical"), "--position-encoding must be one of"),
    (dict(model="implicit_gon", position_encoding="fourier", fourier_sigma=0.0), "--fourier-sigma"),
])
def test_variant_settings_are_checked(overrides, message):
    with pytest.raises(UsageError, match=message):
        Config(**overrides).validate()


def test_variant_defaults_are_the_spec_and_old_configs_load(tmp_path):
    """A config.json written before the variants existed loads with the spec's behaviour."""
    config = Config(model="gon", dataset="coil20")
    assert (config.latent_updates, config.latent_step_size, config.learn_origin, config.loss) == (1, 1.0, False, "spec")
    old = json.loads(config.to_json())
    for name in ("latent_updates", "latent_step_size", "learn_origin", "loss", "position_encoding",
                 "fourier_features", "fourier_sigma", "nerf_frequencies", "modulation", "eval_every"):
        del old[name]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert Config.load(tmp_path / "config.json") == config
