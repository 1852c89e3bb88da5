"""Checkpoints of a `TrainState` (orbax): save with a disk check, restore the newest intact one.

A run keeps its checkpoints in RUN/checkpoints/<step>/; one that cannot be restored (a truncated or corrupted
file, non-finite numbers) is skipped in favour of an older one, and the trainer sets it aside in
RUN/damaged_checkpoints/.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gonjax import resources
from gonjax.errors import CheckpointMismatchError, UsageError, quiet_absl
from gonjax.steps import TrainState

FOLDER, DAMAGED_FOLDER = "checkpoints", "damaged_checkpoints"


def open_manager(run_path: Path, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    """The checkpoint manager of the run folder `run_path`, keeping the `keep` newest checkpoints. Saves are
    synchronous: a failed save (a full disk) stops the run at that step, not an epoch later."""
    with quiet_absl():  # orbax says at once that a read-only manager will not save (errors.quiet_absl)
        options = (ocp.CheckpointManagerOptions(read_only=True) if read_only else
                   ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                                cleanup_tmp_directories=True))
        return ocp.CheckpointManager((Path(run_path) / FOLDER).absolute(), options=options)


def state_dict(state: TrainState) -> dict:
    """What a checkpoint holds (orbax cannot save the empty latent bank of models that keep none)."""
    saved = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
             "opt_state": state.opt_state}
    if state.latent_bank.size:
        saved["latent_bank"] = state.latent_bank
    return saved


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, run_path: Path) -> None:
    """Save `state` as the checkpoint of `step`; a full disk (checked first, and caught) is a UsageError, so the
    run stops at once with its last checkpoint intact."""
    saved = state_dict(state)
    needed = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(saved)) + 2**20

    def no_space():
        return UsageError(f"no space left on the disk of {run_path} for the checkpoint of step {step} (about "
                          f"{resources.gigabytes(needed)} needed, {resources.free_disk(run_path)} free); free "
                          "some space and rerun to resume from the last checkpoint")

    if shutil.disk_usage(run_path).free < needed:
        raise no_space()
    try:
        manager.save(step, args=ocp.args.StandardSave(saved), force=True)
    except Exception as error:  # noqa: BLE001 - tensorstore reports ENOSPC as a ValueError
        if "No space left" in str(error) or getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            raise no_space() from None
        raise


def mismatch(checkpoint: Path, target: dict) -> str | None:
    """How the checkpoint folder `checkpoint` (checkpoints/<step>) differs in structure from `target` (a state
    dict of ShapeDtypeStructs): the first leaf missing on either side or of another shape or dtype, in words; None
    when they match, or when the checkpoint's own description cannot be read (a damaged one: restoring says so)."""
    try:
        saved = _leaves(ocp.StandardCheckpointer().metadata(Path(checkpoint) / "default").item_metadata)
    except Exception:  # noqa: BLE001 - an unreadable description: the restore below reports the damage
        return None
    wanted = _leaves(target)
    order = ("params/", "batch_stats/", "latent_bank", "opt_state/", "step")  # params first
    for name in sorted(set(saved) | set(wanted), key=lambda n: (next((i for i, top in enumerate(order)
                                                                         if n.startswith(top)), len(order)), n)):
        if name not in saved:
            return f"it has no {name}, which these settings build"
        if name not in wanted:
            return f"it holds {name}, which these settings do not build"
        have, want = saved[name], wanted[name]
        if tuple(have.shape) != tuple(want.shape) or str(have.dtype) != str(want.dtype):
            return (f"it holds {name} as {str(have.dtype)}{list(have.shape)}, these settings build "
                    f"{str(want.dtype)}{list(want.shape)}")
    return None


def _leaves(tree) -> dict:
    """{"params/bn1/bias": leaf, ...}: a tree's leaves by a path that reads the same for a saved tree (whose
    named tuples come back as dicts or lists) and a live one."""
    def name(key) -> str:
        for field in ("key", "idx", "name"):
            if hasattr(key, field):
                return str(getattr(key, field))
        return str(key)

    return {"/".join(name(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_intact(manager: ocp.CheckpointManager, state: TrainState,
                   on_damaged: Callable[[int, str], None]) -> TrainState | None:
    """The state of the newest checkpoint that restores and holds only finite numbers, or None when there is none.
    `on_damaged(step, reason)` is told of every newer one that does not (a truncated or corrupted file). A
    checkpoint of another structure (other settings, or a gonjax that builds another parameter tree) is not
    damaged: it is a CheckpointMismatchError, and nothing is moved or truncated."""
    with quiet_absl():  # orbax's notices while it reads (a checkpoint without a metadata file)
        return _restore_newest_intact(manager, state, on_damaged)


def _drop_orbax_leftovers() -> None:
    """After a damaged read, keep Python from reporting orbax's leftovers (installed once per process).

    Reading a damaged checkpoint, orbax abandons its other array reads and closes its event loop; as those reads
    finish in TensorStore's threads, and as their coroutines are collected, Python prints each as "Exception
    ignored in ..." with a traceback, pages of them after the one line that names the damage, at any later
    moment. The hook drops exactly those (a coroutine of orbax's code; asyncio's "Event loop is closed") and
    passes every other report to the hook that was there before."""
    global _HOOK_INSTALLED
    if _HOOK_INSTALLED:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        if isinstance(error, RuntimeError) and str(error.__cause__) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _HOOK_INSTALLED = True


_HOOK_INSTALLED = False


def _restore_newest_intact(manager: ocp.CheckpointManager, state: TrainState,
                           on_damaged: Callable[[int, str], None]) -> TrainState | None:
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_dict(state))
    for step in sorted(manager.all_steps(), reverse=True):
        different = mismatch(Path(manager.directory) / str(step), target)
        if different is not None:
            raise CheckpointMismatchError(
                f"{Path(manager.directory)} / step {step} does not fit these settings ({different}); rerun with "
                "the settings in its config.json, or choose another --workdir")
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as error:  # noqa: BLE001 - tensorstore and orbax raise many types for a damaged file
            _drop_orbax_leftovers()
            on_damaged(step, damage_reason(error))
            continue
        if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(restored)
                   if jnp.issubdtype(leaf.dtype, jnp.inexact)):
            on_damaged(step, "it holds non-finite numbers")
            continue
        return state.replace(**restored)
    return None


def damage_reason(error: BaseException) -> str:
    """What went wrong reading a checkpoint, in one short line: the error's first sentence, without TensorStore's
    pointer to its details (a raw Python repr) or anything after it."""
    text = " ".join(str(error).split())
    text = re.split(r"\s*See full TensorStore details", text)[0]
    return text[:200] or type(error).__name__


def set_aside(run_path: Path, step: int, reason: str) -> None:
    """Move the damaged checkpoint of `step` out of the manager's way into RUN/damaged_checkpoints/ (kept for
    inspection, never deleted) and say so on stderr."""
    damaged_dir = Path(run_path) / DAMAGED_FOLDER
    damaged_dir.mkdir(exist_ok=True)
    target = damaged_dir / str(step)
    while target.exists():
        target = target.with_name(target.name + "+")
    os.rename(Path(run_path) / FOLDER / str(step), target)
    print(f"{run_path}: the checkpoint of step {step} is damaged ({reason}); moved it to {target}",
          file=sys.stderr, flush=True)
