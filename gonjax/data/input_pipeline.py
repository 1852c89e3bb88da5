"""Input pipeline (GON-SPEC 6): TFDS preparation, and each split as integer codes with their float32 values.

A split of these datasets fits in memory, so each split is read from TFDS once and held as one array of integer
codes as stored (uint8 grey levels; COIL-20's 2x2 sums as uint16), beside `levels`, the float32 value in [0, 1] of
every code: the image is `levels[codes]`. The trainer places the codes on the device once (MNIST at 32x32: 61 MB,
a quarter of its float32 size) and gathers each batch inside its jitted steps (`gonjax.loops`), bit for bit the
floats the host computes here.

Resizing (documented choices):
- MNIST / Fashion-MNIST 28 -> 32 for the conv models: Pillow bilinear on the uint8 image, requantised to uint8,
  which is what torchvision's `Resize(32)` does on the PIL images of P's scripts (upsampling: no anti-aliasing
  question arises). The Implicit GON reads them at their native 28x28.
- COIL-20 128 -> 32: bilinear without anti-aliasing with half-pixel centres: output pixel i sits at input
  coordinate 4i + 1.5, so it is exactly the mean of the central 2x2 pixels of its 4x4 block (held exactly, as
  their sum).
- CIFAR-10 is 32x32 already.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
import shutil
import socket
import urllib.parse
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

from gonjax.catalog import CHANNELS, NATIVE_SIZE  # noqa: F401  (re-exported)
from gonjax.data.batches import epoch_order, eval_batches, num_batches, train_batches  # noqa: F401
from gonjax.data.builders import BUILDERS
from gonjax.errors import DataError, quiet_absl



@dataclasses.dataclass(frozen=True)
class Dataset:
    """Both splits of a dataset as integer codes (NHWC), the float32 value in [0, 1] of each code (`levels`), and
    a description of how they were made. `train` and `test` are the float32 images, `levels[codes]` (made on
    first use)."""

    name: str
    train_codes: np.ndarray
    test_codes: np.ndarray
    levels: np.ndarray
    info: dict

    @functools.cached_property
    def train(self) -> np.ndarray:
        return self.levels[self.train_codes]

    @functools.cached_property
    def test(self) -> np.ndarray:
        return self.levels[self.test_codes]


def find_manual_dir(name: str, manual_dir) -> Path:
    """The folder holding `name`'s official files: `manual_dir` itself or its subfolder named `name`."""
    folder = Path(manual_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"--manual-dir {folder} is not a folder; point it at the official {name} files "
                        f"or at a parent of a folder named {name}")
    builder = BUILDERS[name]
    for candidate in (folder / name, folder):
        if candidate.is_dir() and builder.has_manual_files(candidate):
            return candidate
    raise DataError(f"no official {name} files in {folder} or {folder / name}: expected "
                    f"{', '.join(builder.manual_files())}")


def prepare_builder(name: str, data_dir=None, manual_dir=None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name`, prepared in `data_dir` (downloading, or from `manual_dir` when given); TFDS's
    logged notices held back (`errors.quiet_absl`)."""
    with quiet_absl():
        return _prepared_builder(name, data_dir, manual_dir)


def _prepared_builder(name: str, data_dir, manual_dir) -> tfds.core.DatasetBuilder:
    if name not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(BUILDERS)}")
    tfds.disable_progress_bar()
    if data_dir is not None:
        _check_writable(Path(data_dir).expanduser())
    builder = BUILDERS[name](data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    manual = find_manual_dir(name, manual_dir) if manual_dir is not None else None
    if manual is None:
        _check_reachable(name)
    with _preparation_lock(builder):  # another process preparing the same builder: wait for it, then reuse
        builder = BUILDERS[name](data_dir=data_dir, file_format="array_record")
        if builder.is_prepared():
            return builder
        _remove_unfinished_preparations(builder)
        return _download_and_prepare(name, builder, manual)


def _remove_unfinished_preparations(builder: tfds.core.DatasetBuilder) -> None:
    """Delete what a killed preparation left: TFDS writes into `<builder>/incomplete.XXXXXX_<version>/` and
    renames it into place when done, so under the preparation lock such a folder belongs to no live process."""
    version = Path(builder.data_dir)
    for leftover in version.parent.glob(f"incomplete.??????_{version.name}"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _preparation_lock(builder: tfds.core.DatasetBuilder):
    """An exclusive flock on `<data dir>/<builder>.prepare.lock` while the builder is prepared, so that runs
    started side by side on a fresh data dir prepare it once (TFDS's own rename into place fails for the
    second), released by the OS if the holder dies."""
    root = Path(builder.data_dir).parent.parent  # <data dir>/<builder>/<version>
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{builder.name}.prepare.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_and_prepare(name: str, builder: tfds.core.DatasetBuilder, manual: Path | None):
    """Prepare `builder` from the official files (downloaded, or read from `manual`); each failure one line."""
    config = tfds.download.DownloadConfig(manual_dir=None if manual is None else str(manual))
    try:
        builder.download_and_prepare(download_config=config)
    except NonMatchingChecksumError as error:
        first = str(error).splitlines()[0]
        raise DataError(f"{name}: a file does not match its official checksum ({first}); "
                        "replace it with the official file") from None
    except OSError as error:
        if manual is not None:
            raise DataError(f"could not prepare {name} from {manual} in {builder.data_dir}: "
                            f"{type(error).__name__}: {error}") from None
        raise DataError(f"could not download {name}: {type(error).__name__}: {error}. Offline? Pass --manual-dir "
                        f"DIR with the official files ({', '.join(BUILDERS[name].manual_files())}) in DIR or "
                        f"DIR/{name}") from None
    except ValueError as error:
        raise DataError(f"could not read the {name} files: {error}") from None
    except RuntimeError as error:  # TFDS's writer reports a failed write (a full disk, a size limit) this way
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        free = shutil.disk_usage(Path(builder.data_dir).parent).free
        raise DataError(f"could not write {name} into {Path(builder.data_dir).parent.parent} ({free / 2**20:.0f} "
                        f"MiB free there): {first}; free some space or pass another --data-dir") from None
    return builder


def _check_writable(data_dir: Path) -> None:
    """A --data-dir that cannot hold prepared data fails here, named, rather than deep inside TFDS."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".gonjax-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise DataError(f"--data-dir {data_dir} cannot be written ({error.strerror or error}); choose a writable "
                        "folder") from None


def _check_reachable(name: str, timeout: float = 5.0) -> None:
    """Fail fast when the host of `name`'s official files cannot be reached (offline) and no --manual-dir was
    given, rather than after TFDS's minutes of retries."""
    url = urllib.parse.urlsplit(BUILDERS[name].source_url())
    host = url.hostname
    try:
        socket.create_connection((host, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as error:
        raise DataError(f"{name} is not prepared and {host} cannot be reached to download it ({error}); offline, "
                        f"pass --manual-dir DIR with the official files ({', '.join(BUILDERS[name].manual_files())})"
                        f" in DIR or DIR/{name}") from None


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
    """All images of one split as a uint8 NHWC array, in stored order (no TensorFlow): the official files' order
    for MNIST, Fashion-MNIST and CIFAR-10, the seeded split's for COIL-20 (`builders`)."""
    try:
        source = builder.as_data_source(split=split)
        examples = source.__getitems__(range(len(source)))
        return np.stack([example["image"] for example in examples])
    except (RuntimeError, ValueError, OSError, KeyError) as error:  # a truncated or corrupted record file
        files = sorted(Path(builder.data_dir).glob(f"*-{split}.*"))
        named = ", ".join(f.name for f in files) or f"the {split} files"
        raise DataError(f"the prepared {builder.name} data in {builder.data_dir} is damaged ({named}: "
                        f"{' '.join(str(error).split())[:160]}); remove that folder and rerun to prepare it "
                        "again") from None


def resize_bilinear_pil(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC (one channel) -> uint8 at size x size with Pillow's bilinear filter (torchvision Resize)."""
    from PIL import Image

    resized = [np.asarray(Image.fromarray(image[:, :, 0]).resize((size, size), Image.BILINEAR))
               for image in images]
    return np.stack(resized)[..., None]


def central_sums(images: np.ndarray, factor: int) -> np.ndarray:
    """uint16 sums of the central 2x2 pixels of each `factor` x `factor` block (`factor` even): four times the
    bilinear downsampling without anti-aliasing, half-pixel centres (output pixel i samples input coordinate
    factor*i + (factor-1)/2, the mean of those four pixels)."""
    n, h, w, c = images.shape
    blocks = images.reshape(n, h // factor, factor, w // factor, factor, c).astype(np.uint16)
    mid = factor // 2
    return blocks[:, :, mid - 1:mid + 1, :, mid - 1:mid + 1, :].sum(axis=(2, 4), dtype=np.uint16)


def encode(name: str, images: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images of dataset `name` -> (codes at image_size x image_size, levels): `levels[codes]` is the
    image as float32 in [0, 1] (GON-SPEC 6). Grey level g is g / 255; COIL-20's code s (a sum of four grey levels,
    `central_sums`) is (s / 4) / 255, each division rounded to float32 as dividing the float32 mean would be."""
    native = NATIVE_SIZE[name]
    if image_size != native and (name not in ("mnist", "fashion_mnist") or image_size != 32):
        raise DataError(f"{name} can be read at {native}x{native}"
                        f"{' or 32x32' if native == 28 else ''}, not {image_size}x{image_size}")
    if name == "coil20":
        codes = central_sums(images, images.shape[1] // native)
        return codes, np.arange(4 * 255 + 1, dtype=np.float32) / np.float32(4.0) / np.float32(255.0)
    if image_size != native:
        images = resize_bilinear_pil(images, image_size)
    return np.asarray(images, np.uint8), np.arange(256, dtype=np.float32) / np.float32(255.0)


def load_dataset(name: str, image_size: int, data_dir=None, manual_dir=None) -> Dataset:
    """Prepare `name` through TFDS and return both splits encoded for a model reading image_size^2."""
    builder = prepare_builder(name, data_dir, manual_dir)
    train, levels = encode(name, read_split(builder, "train"), image_size)
    test, _ = encode(name, read_split(builder, "test"), image_size)
    info = {
        "dataset": name,
        "tfds_builder": builder.name,
        "tfds_version": str(builder.version),
        "tfds_data_dir": str(builder.data_dir),
        "image_shape": list(train.shape[1:]),
        "train_images": int(train.shape[0]),
        "test_images": int(test.shape[0]),
    }
    if name == "coil20":
        info["split_seed"] = BUILDERS[name].SPLIT_SEED
    return Dataset(name, train, test, levels, info)
