"""TensorBoard event files of a run, beside its JSON-lines records: `tensorboard --logdir runs/` shows every run
and seed side by side.

The events are a view of the run folder's records, written by tensorboardX (no TensorFlow): each evaluation
record's metrics as `<metric>/train` and `<metric>/test` (`sse/train`, `loss/test`, ...), its speed and times
under `speed/` and `time/`, each training window's loss as `loss/window`, and the picture grids as images, all
at the training step. A run that resumes rewrites its events from the records it kept (those up to its
checkpoint), so a resumed run's events hold every step once, as an uninterrupted run's do.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

FOLDER = "tensorboard"  # RUN/tensorboard/: gonjax's own, rewritten on resume
PICTURE = re.compile(r"^(recon|samples)_(\d+)\.png$")


class EventLog:
    """The run's TensorBoard events: `EventLog(run_path, records, windows, steps_per_epoch)` starts them afresh
    from what the run folder holds; `add_record`, `add_window` and `add_picture` append as the run goes on."""

    def __init__(self, run_path: Path, records: list[dict], windows: list[dict], steps_per_epoch: int):
        from tensorboardX import SummaryWriter

        folder = Path(run_path) / FOLDER
        shutil.rmtree(folder, ignore_errors=True)
        self.writer = SummaryWriter(str(folder), flush_secs=30)
        for record in records:
            self.add_record(record)
        for window in windows:
            self.add_window(window)
        kept = {record["step"] for record in records}
        for path in sorted(Path(run_path).glob("*.png")):  # the pictures of the kept evaluations
            match = PICTURE.match(path.name)
            if match and int(match.group(2)) * steps_per_epoch in kept:
                self.add_picture(match.group(1), path, int(match.group(2)) * steps_per_epoch)
        self.writer.flush()

    def add_record(self, record: dict) -> None:
        """An evaluation record of metrics.jsonl: `train_<m>` / `test_<m>` as `<m>/train` / `<m>/test`."""
        step = int(record["step"])
        for name, value in record.items():
            if name in ("epoch", "step") or not isinstance(value, (int, float)):
                continue
            split, _, metric = name.partition("_")
            if split in ("train", "test") and metric:
                tag = f"{metric}/{split}"
            elif name in ("steps_per_s",):
                tag = f"speed/{name}"
            elif name.endswith("seconds"):
                tag = f"time/{name}"
            else:
                tag = f"eval/{name}"
            self.writer.add_scalar(tag, float(value), step)

    def add_window(self, window: dict) -> None:
        """A window of train_metrics.jsonl: its mean step loss and speed."""
        step = int(window["step"])
        self.writer.add_scalar("loss/window", float(window["train_loss"]), step)
        self.writer.add_scalar("speed/images_per_s", float(window["images_per_s"]), step)

    def add_picture(self, kind: str, png: Path, step: int) -> None:
        """A picture the run drew (`recon` or `samples`) as the image `pictures/<kind>` at `step`."""
        from PIL import Image

        with Image.open(png) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        self.writer.add_image(f"pictures/{kind}", pixels, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
