"""Checkpoints of a `TrainState` (orbax): save with a disk check, restore the newest intact one.

A run keeps its checkpoints in RUN/checkpoints/<step>/; one that cannot be restored (a truncated or corrupted
file, non-finite numbers) is skipped in favour of an older one, and the trainer sets it aside in
RUN/damaged_checkpoints/.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gonjax import resources
from gonjax.errors import UsageError
from gonjax.steps import TrainState

FOLDER, DAMAGED_FOLDER = "checkpoints", "damaged_checkpoints"


def open_manager(run_path: Path, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    """The checkpoint manager of the run folder `run_path`, keeping the `keep` newest checkpoints. Saves are
    synchronous: a failed save (a full disk) stops the run at that step, not an epoch later."""
    options = (ocp.CheckpointManagerOptions(read_only=True) if read_only else
               ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False))
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


def restore_intact(manager: ocp.CheckpointManager, state: TrainState,
                   on_damaged: Callable[[int, str], None]) -> TrainState | None:
    """The state of the newest checkpoint that restores and holds only finite numbers, or None when there is none.
    `on_damaged(step, reason)` is told of every newer one that does not (a truncated or corrupted file)."""
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_dict(state))
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as error:  # noqa: BLE001 - tensorstore and orbax raise many types for a damaged file
            on_damaged(step, " ".join(str(error).split())[:200] or type(error).__name__)
            continue
        if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(restored)
                   if jnp.issubdtype(leaf.dtype, jnp.inexact)):
            on_damaged(step, "it holds non-finite numbers")
            continue
        return state.replace(**restored)
    return None


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
