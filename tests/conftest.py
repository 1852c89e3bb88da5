"""Test setup: JAX on the CPU backend, shared data folders."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported anywhere

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The official raw files (../shared/data). Their absence is a failure, not a skip: CI must run every test."""
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA} is missing: the tests read the official files in place"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> Path:
    """One TFDS data dir for the whole session, so each dataset is prepared once."""
    return tmp_path_factory.mktemp("tfds")
