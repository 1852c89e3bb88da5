"""Memory and disk checks that turn "this cannot fit" into one line before any work is done."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from gonjax.errors import UsageError


def available_memory() -> int:
    """Bytes of memory this process can still allocate without swapping (Linux MemAvailable; elsewhere the
    physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_device_memory() -> int:
    """Bytes free on this process's first device: its allocator's limit less what is in use (GPUs), or available_memory()
    where the device does not report one (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return available_memory()


def gigabytes(count: int | float) -> str:
    """A byte count for messages: "3.2 MB", "20.5 GB", "1,907 GB"."""
    size = count / 2**30
    if size < 1:
        return f"{count / 2**20:.3g} MB"
    return f"{size:,.0f} GB" if size >= 100 else f"{size:.3g} GB"


def require_memory(needed: int, what: str, fix: str, fraction: float = 0.8, device: bool = False) -> None:
    """UsageError unless `needed` bytes fit in `fraction` of the available memory (of the default device when
    `device`)."""
    available = available_device_memory() if device else available_memory()
    if needed > fraction * available:
        raise UsageError(f"{what} needs about {gigabytes(needed)} of memory and {gigabytes(available)} is "
                         f"available; {fix}")


def free_disk(path: Path) -> str:
    """The free space of the file system holding `path` (or its nearest existing parent), for messages."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return gigabytes(shutil.disk_usage(path).free)
    except OSError:
        return "unknown"
