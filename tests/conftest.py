"""Test setup: JAX on the CPU backend, shared data folders."""
import os

# Before jax is imported anywhere. GONJAX_TEST_PLATFORMS=cuda runs tests on a GPU instead (benchmarks.gpu_check runs
# the float64 parity tests there); the suite as a whole is written for the CPU's devices.
os.environ["JAX_PLATFORMS"] = os.environ.get("GONJAX_TEST_PLATFORMS", "cpu")

# One core per pytest-xdist worker: JAX's CPU client and PyTorch size their thread pools by the cores a process
# may use, so two workers on two cores would otherwise run four busy thread pools that preempt each other.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cpus = sorted(os.sched_getaffinity(0))
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.sched_setaffinity(0, _cpus[int(os.environ["PYTEST_XDIST_WORKER"][2:]) % len(_cpus)::_workers] or _cpus)

# The suite compiles far more than it runs (hundreds of small programs, most run a few times): XLA:CPU's
# fast-compile settings, LLVM at -O0 and the older loop emitters for fusions, about halve its compile time. They
# change how each program becomes machine code, not the program. gonjax's own per-program options leave options
# set in XLA_FLAGS alone (gonjax.xla), so they apply to the trainer's steps too.
# The few tests that run one program hundreds of times compile it with `jit_for_speed` instead.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# XLA's persistent compilation cache in a fresh folder per test session (inherited by the xdist workers and the
# CLI subprocesses): the many small runs of the suite compile the same steps again and again, and a hit takes
# milliseconds instead of seconds. Fresh per session, so CI times are what a first run costs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gonjax-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import contextlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

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
    """One TFDS data dir for the whole session, shared by the pytest-xdist workers (their base folders have one
    parent), so each dataset is prepared once: gonjax's preparation lock lets two processes prepare into one data
    dir at once (test_data.py checks it)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "tfds"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("tfds")


def jit_for_speed(fn, **jit_kwargs):
    """`jax.jit` with XLA's default code generation (LLVM -O2, fusion emitters), which per-program options set
    over FAST_COMPILE: 200 float32 GON steps take 10 s this way, 39 s compiled fast."""
    import jax
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": True},
                   **jit_kwargs)


def run_main(module: str, *args) -> SimpleNamespace:
    """`python -m experiments.<module> ARGS` in this process (the CLI's own `main(argv)`, without paying the
    interpreter's imports again): its exit code, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = importlib.import_module(f"experiments.{module}").main([str(a) for a in args])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())
