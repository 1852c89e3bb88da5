"""One source of defaults: the library's Config, the CLIs and the results suite agree (GON-SPEC 5)."""
import pytest

from experiments import cli
from gonjax import results, zoo
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
    for cell in results.plan():
        if cell.row.model == model and not cell.row.settings and cell.row.epochs is None:
            assert cell.config() == Config(model=model, dataset=cell.dataset)
