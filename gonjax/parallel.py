"""Devices, hosts and seeds: where a run's arrays live (README "Scaling").

Every run computes on a `jax.sharding.Mesh` with two axes:

  replica  the seeds trained together in one program (`--seeds`), stacked along a leading axis of the state;
  data     the images of each batch.

The train state is replicated over `data` (split over `replica` when seeds are stacked); each batch is split
along `data`. The jitted steps are written for the *global* batch and XLA partitions them (GSPMD), so batch
norm's statistics are those of the global batch of 64 (GON-SPEC 3) whatever the device count: the same math as
one device, only the order of floating-point sums changes. One device is the mesh of one.

Several processes (hosts) join through `jax.distributed` (`initialize`); the mesh then spans every process's
devices, each process puts only its own shards of a global batch on its devices (`Layout.put`), and process 0
alone writes files (`is_primary`).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gonjax.errors import UsageError

REPLICA, DATA = "replica", "data"
HEARTBEAT_SECONDS = 60  # a process silent this long is declared dead by the coordinator


@dataclasses.dataclass(frozen=True)
class Layout:
    """The mesh of a run and how its arrays are placed on it. `stacked`: the state and each batch carry a
    leading replica (seed) axis."""

    mesh: Mesh
    stacked: bool = False

    @property
    def devices(self) -> int:
        return self.mesh.devices.size

    def _sharding(self, *spec) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    @property
    def replicated(self) -> NamedSharding:
        """The same value on every device (metrics, keys, one replica's state)."""
        return self._sharding()

    @property
    def state(self) -> NamedSharding:
        """The train state: whole on every device, or split by replica when seeds are stacked."""
        return self._sharding(REPLICA) if self.stacked else self._sharding()

    @property
    def train_batch(self) -> NamedSharding:
        """A training batch (B, ...) split along `data`; stacked (R, B, ...), also along `replica`."""
        return self._sharding(REPLICA, DATA) if self.stacked else self._sharding(DATA)

    @property
    def eval_batch(self) -> NamedSharding:
        """An evaluation batch (B, ...), the same for every replica, split along `data`."""
        return self._sharding(DATA)

    def put(self, array, sharding: NamedSharding) -> jax.Array:
        """`array` (a host array, the same on every process) as a global array with `sharding`: each process
        transfers only the shards its own devices hold."""
        array = np.asarray(array)
        if jax.process_count() == 1:
            return jax.device_put(array, sharding)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_layout(devices: int | None, batch_size: int, replicas: int = 1) -> Layout:
    """The mesh for `replicas` seeds (1: one unstacked run) on `devices` devices, batches of `batch_size` split
    along `data`. None: one device for one seed; stacked seeds spread over as many devices as divide their count;
    a run of several processes, every device of every process. (A batch of 64 split over devices costs a
    cross-device reduction in every batch norm of the forward, backward and second-order passes of a model of
    ~300k parameters: data parallelism is for those who ask for it, `--devices N`.)

    Seeds go on the replica axis as far as the device count allows (the largest common divisor of the two whose
    data axis still divides the batch); the remaining devices split each batch. A count the batch cannot be split
    over is a UsageError that lists the counts that work.
    """
    available = jax.device_count()
    if devices is None:
        devices = available if jax.process_count() > 1 else max(d for d in _divisors(replicas) if d <= available)
    if devices < 1:
        raise UsageError(f"--devices must be at least 1, got {devices}")
    if devices > available:
        raise UsageError(f"--devices {devices}: only {available} device(s) ({jax.devices()[0].platform}) are "
                         f"visible; use --devices {available} or fewer")
    if jax.process_count() > 1 and devices != available:
        raise UsageError(f"--devices {devices}: a run of {jax.process_count()} processes uses all {available} "
                         "devices; leave --devices out")
    replica_axis = next((r for r in reversed(_divisors(math.gcd(replicas, devices)))
                         if batch_size % (devices // r) == 0), None)
    if replica_axis is None:
        working = [d for d in _divisors(batch_size) if d <= available]
        raise UsageError(f"--batch-size {batch_size} cannot be split evenly over {devices} devices; use "
                         f"--devices {', '.join(map(str, working))} (the counts that divide the batch)")
    grid = np.asarray(jax.devices()[:devices]).reshape(replica_axis, devices // replica_axis)
    return Layout(Mesh(grid, (REPLICA, DATA)), stacked=replicas > 1)


STARTUP_SECONDS = 300  # how long a process waits for the run's others to join, by default (--startup-timeout)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, startup_timeout: int = STARTUP_SECONDS,
               should_stop: Callable[[], bool] | None = None) -> None:
    """Join a run of several processes (`jax.distributed`), from the flags or, with none given, from a cluster's
    environment that JAX detects (a SLURM job step of several tasks, JAX_COORDINATOR_ADDRESS). Nothing to do for
    a single process. Must run before anything touches a device.

    With the flags, the process says on stderr that it waits for the others, and waits at most `startup_timeout`
    seconds; Ctrl-C or SIGTERM stops the wait (as does `should_stop()` turning true, for callers that handle the
    signals themselves). A wait that ends either way ends the process (exit status 1, or 130
    when stopped) after one line that says why: JAX's join cannot be cancelled, and it would otherwise hang on, or
    abort the interpreter when its own timeout passes."""
    flags = (coordinator, num_processes, process_id)
    if all(flag is None for flag in flags):
        if not _cluster_environment():
            return
        jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_SECONDS)
        return
    if any(flag is None for flag in flags):
        raise UsageError("--coordinator, --num-processes and --process-id go together (or none of them, to let "
                         "JAX read a cluster's environment)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id must be from 0 to --num-processes - 1 ({num_processes - 1}), "
                         f"got {process_id}")
    check_coordinator(coordinator)
    if startup_timeout < 1:
        raise UsageError(f"--startup-timeout must be at least 1 second, got {startup_timeout}")
    if num_processes == 1:
        return
    print(f"process {process_id} of {num_processes}: waiting up to {startup_timeout} s for the run's processes to "
          f"join at {coordinator} (Ctrl-C stops)", file=sys.stderr, flush=True)
    _join_within(lambda: jax.distributed.initialize(
        coordinator, num_processes, process_id, initialization_timeout=startup_timeout + 60,
        heartbeat_timeout_seconds=HEARTBEAT_SECONDS), startup_timeout, should_stop or (lambda: False),
        f"the run's {num_processes} processes did not all join at {coordinator} within {startup_timeout} s: start "
        "every process with the same --coordinator (process 0's HOST:PORT, reachable from each) and "
        "--num-processes, or raise --startup-timeout")


def check_coordinator(address: str) -> None:
    """A UsageError unless `address` is HOST:PORT with a port from 1 to 65535."""
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--coordinator must be HOST:PORT with a port from 1 to 65535 (process 0's address), "
                         f"got {address!r}")


def _join_within(join, seconds: float, should_stop: Callable[[], bool], timeout_message: str) -> None:
    """Run `join` (a blocking call that cannot be cancelled) in a thread, polling so that Ctrl-C and SIGTERM are
    heard; its error is raised here as one line. A stop or `seconds` without an answer ends the process."""
    outcome: list = []

    def target():
        try:
            join()
            outcome.append(None)
        except Exception as error:  # noqa: BLE001 - JAX's runtime raises several types; each becomes one line
            outcome.append(error)

    thread = threading.Thread(target=target, name="gonjax-join", daemon=True)
    thread.start()
    deadline = time.monotonic() + seconds
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.2)
            if should_stop():
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        _leave(130, "interrupted while waiting for the run's other processes")
    if thread.is_alive():
        _leave(1, f"error: {timeout_message}")
    if outcome and outcome[0] is not None:
        first_line = (str(outcome[0]).strip().splitlines() or [type(outcome[0]).__name__])[0]
        raise UsageError(f"could not join the run's processes: {first_line[:300]}")


def _leave(status: int, message: str) -> None:
    """End the process now with one line on stderr (a thread blocked in JAX's runtime cannot be joined)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None else (os.path.basename(sys.argv[0]) or "gonjax")
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    os._exit(status)


def _cluster_environment() -> bool:
    """Whether this process was started as one of several by a launcher JAX knows."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_ID" in os.environ


def backend_problem() -> str | None:
    """Why JAX cannot start the backend JAX_PLATFORMS asks for (one line), or None when it starts. JAX raises a bare
    AssertionError when JAX_PLATFORMS names cuda on a machine with no visible NVIDIA GPU, and a RuntimeError
    "Unable to initialize backend ..." for a platform it does not have."""
    requested = jax.config.jax_platforms
    try:
        jax.devices()
    except AssertionError:
        return (f"JAX_PLATFORMS={requested!r}: no NVIDIA GPU is visible on this machine; unset JAX_PLATFORMS to "
                "run on what it has (the CPU), or run where a GPU and jax[cuda12] are")
    except RuntimeError as error:
        if "Unable to initialize backend" in str(error):
            return f"JAX_PLATFORMS={requested!r}: {str(error).splitlines()[0]}"
    return None


def _started_processes() -> int:
    """jax.process_count() for the error paths: 1 where no backend could start (`backend_problem` says why)."""
    try:
        return jax.process_count()
    except (AssertionError, RuntimeError):
        return 1


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; the only one of a one-process run)."""
    return jax.process_index() == 0


BARRIER_SECONDS = 3600  # the longest one process waits for the others at a barrier (e.g. a dataset's preparation)
_barriers = itertools.count()


def sync(name: str) -> None:
    """Wait until every process of the run arrives here (a no-op for one process). A barrier of the coordination
    service (orbax's), not a collective: XLA's CPU collectives give up after 30 s, shorter than a dataset's
    preparation by process 0 while the others wait."""
    if jax.process_count() > 1:
        barrier = ocp.multihost.get_barrier_sync_fn()
        barrier(key=f"{name} #{next(_barriers)}", timeout_ms=BARRIER_SECONDS * 1000)


LOST_PEER_SIGNS = ("gloo", "connection closed", "connection reset", "heartbeat", "unavailable", "socket closed",
                   "nccl", "coordination service", "deadline exceeded", "barrier")


def lost_peer(error: BaseException) -> bool:
    """Whether `error`, raised in a run of several processes, says that another process is gone."""
    if _started_processes() < 2 or not isinstance(error, (RuntimeError, ValueError)):
        return False
    text = str(error).lower()
    return any(sign in text for sign in LOST_PEER_SIGNS)


def exit_lost_peer(prog: str, error: BaseException) -> None:
    """Stop this process at once with one line: another process of the run died. (`os._exit`: a normal exit
    would wait at JAX's shutdown barrier for the dead process and abort with a stack trace.)"""
    first = " ".join(str(error).split())[:160]
    print(f"{prog}: error: process {jax.process_index()} lost contact with another process of this run "
          f"({first}); every process stops: rerun all of them to resume from the last checkpoint",
          file=sys.stderr, flush=True)
    exit_if_several(1)


def exit_if_several(code: int) -> None:
    """End a process of a multi-process run at once with `code`, after an error it has reported: a normal exit
    would first wait (minutes) at JAX's shutdown barrier for processes that carry on. The others then stop at
    their next collective or when the coordinator misses this process's heartbeat."""
    if _started_processes() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
