"""TFDS builders for the GON datasets (GON-SPEC 6), preparing without TensorFlow.

TFDS's own mnist/fashion_mnist/cifar10 builders need TensorFlow (~1.3 GB) to prepare. These builders read the
same official files (same URLs, same sha256 in `checksums.tsv` beside this file), store images as raw uint8
`tfds.features.Tensor`s in array_record files, and are read back with `tfds.data_source`: no TensorFlow is ever
imported. COIL-20 is not in the TFDS catalog at all; `gon_coil20` builds `coil-20-proc` with a seeded 80/20 split.

Offline, TFDS finds each official file by name in the `manual_dir` of the `DownloadConfig` and checks its size
and sha256 before use (CIFAR-10 also accepts an already extracted `cifar-10-batches-bin/` or
`cifar-10-batches-py/` folder, and COIL-20 the extracted `coil-20-proc/` folder).

Images are stored at their native resolution; resizing for the conv models happens in `input_pipeline`. MNIST,
Fashion-MNIST and CIFAR-10 are stored in the official files' order (version 1.1.0), COIL-20 in TFDS's order of its
split.
"""
from __future__ import annotations

import gzip
import io
import pickle
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

_VERSION = tfds.core.Version("1.0.0")
# MNIST, Fashion-MNIST and CIFAR-10 keep the official files' order (TFDS would otherwise store examples in an order
# hashed from their keys): the test split's first batch is then the first 64 images of the official test file
# (7, 2, 1, 0, 4, ... on MNIST), as a fixed-order torchvision test loader reads them. 1.0.0 stored them hashed.
_OFFICIAL_ORDER_VERSION = tfds.core.Version("1.1.0")
_OFFICIAL_ORDER_NOTES = {"1.1.0": "Examples in the official files' order (disable_shuffling).",
                         "1.0.0": "Examples in TFDS's hashed order."}


def _manual_dir(dl_manager) -> epath.Path | None:
    """The manual dir given in the DownloadConfig, or None.

    `dl_manager.manual_dir` asserts that manual instructions exist and the folder is non-empty; our builders
    only look in it for already extracted folders, so they read the path it was given.
    """
    manual = getattr(dl_manager, "_manual_dir", None)
    return None if manual is None else epath.Path(manual)


def read_idx(path) -> np.ndarray:
    """An IDX file (MNIST's format, gzipped or not) as a uint8 array of its declared shape."""
    raw = epath.Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:3] != b"\x00\x00\x08" or len(raw) < 4:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} declares shape {dims} but holds {data.size} values")
    return data.reshape(dims)


class _IdxImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MNIST-format dataset: 28x28 grey images and labels in four official IDX files, in the files' order."""

    VERSION = _OFFICIAL_ORDER_VERSION
    RELEASE_NOTES = _OFFICIAL_ORDER_NOTES
    URL_BASE = ""
    HOMEPAGE = ""
    FILES = {
        "train_images": "train-images-idx3-ubyte.gz",
        "train_labels": "train-labels-idx1-ubyte.gz",
        "test_images": "t10k-images-idx3-ubyte.gz",
        "test_labels": "t10k-labels-idx1-ubyte.gz",
    }

    @classmethod
    def source_url(cls) -> str:
        """Where the official files are downloaded from."""
        return cls.URL_BASE

    @classmethod
    def manual_files(cls) -> list[str]:
        return list(cls.FILES.values())

    @classmethod
    def has_manual_files(cls, folder: Path) -> bool:
        return all((folder / name).is_file() for name in cls.FILES.values())

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.name}: 28x28x1 uint8 images from the official IDX files, stored as raw tensors.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                "label": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
            disable_shuffling=True,  # stored in key order: the index in the official file
        )

    def _split_generators(self, dl_manager):
        paths = dl_manager.download({key: self.URL_BASE + name for key, name in self.FILES.items()})
        return {
            "train": self._generate_examples(paths["train_images"], paths["train_labels"]),
            "test": self._generate_examples(paths["test_images"], paths["test_labels"]),
        }

    def _generate_examples(self, images_path, labels_path):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if len(images) != len(labels):
            raise ValueError(f"{images_path}: {len(images)} images but {len(labels)} labels")
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image[:, :, None], "label": int(label)}


class GonMnist(_IdxImageBuilder):
    """MNIST (60k/10k), official files, TensorFlow-free."""

    name = "gon_mnist"
    URL_BASE = "https://storage.googleapis.com/cvdf-datasets/mnist/"
    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"


class GonFashionMnist(_IdxImageBuilder):
    """Fashion-MNIST (60k/10k), official files, TensorFlow-free."""

    name = "gon_fashion_mnist"
    URL_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"


_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = ["test_batch"]


def read_cifar10_folder(folder, batches: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels from an extracted official CIFAR-10 folder.

    `cifar-10-batches-bin`: records of 1 label byte + 3072 bytes (R, G, B planes of 32x32, row-major).
    `cifar-10-batches-py`: pickled dicts with `data` (N, 3072) in the same plane order and `labels`.
    """
    folder = epath.Path(folder)
    images, labels = [], []
    for batch in batches:
        binary = folder / f"{batch}.bin"
        if binary.exists():
            records = np.frombuffer(binary.read_bytes(), np.uint8)
            if records.size % 3073:
                raise ValueError(f"{binary}: size {records.size} is not a whole number of 3073-byte records")
            records = records.reshape(-1, 3073)
            labels.append(records[:, 0].astype(np.int64))
            planes = records[:, 1:]
        else:
            with (folder / batch).open("rb") as f:
                entry = pickle.load(f, encoding="bytes")
            labels.append(np.asarray(entry[b"labels"], np.int64))
            planes = np.asarray(entry[b"data"], np.uint8)
        images.append(planes.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(images), np.concatenate(labels)


class GonCifar10(tfds.core.GeneratorBasedBuilder):
    """CIFAR-10 (50k/10k) from the official binary archive, TensorFlow-free, in the files' order."""

    name = "gon_cifar10"
    VERSION = _OFFICIAL_ORDER_VERSION
    RELEASE_NOTES = _OFFICIAL_ORDER_NOTES
    URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    FOLDERS = ("cifar-10-batches-bin", "cifar-10-batches-py")

    @classmethod
    def source_url(cls) -> str:
        return cls.URL

    @classmethod
    def manual_files(cls) -> list[str]:
        return ["cifar-10-binary.tar.gz", *(f"{name}/" for name in cls.FOLDERS)]

    @classmethod
    def has_manual_files(cls, folder: Path) -> bool:
        return (folder / "cifar-10-binary.tar.gz").is_file() or any((folder / f).is_dir() for f in cls.FOLDERS)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="CIFAR-10: 32x32x3 uint8 images from the official files, stored as raw tensors.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
                "label": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            disable_shuffling=True,  # stored in key order: the index over the official batches
        )

    def _split_generators(self, dl_manager):
        folder = self._extracted_manual_folder(dl_manager)
        if folder is None:
            folder = dl_manager.download_and_extract(self.URL) / self.FOLDERS[0]
        return {
            "train": self._generate_examples(folder, _CIFAR_TRAIN),
            "test": self._generate_examples(folder, _CIFAR_TEST),
        }

    def _extracted_manual_folder(self, dl_manager):
        manual = _manual_dir(dl_manager)
        for name in self.FOLDERS:
            if manual is not None and (manual / name).is_dir():
                return manual / name
        return None

    def _generate_examples(self, folder, batches):
        images, labels = read_cifar10_folder(folder, batches)
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image, "label": int(label)}


_COIL_NAME = re.compile(r"obj(\d+)__(\d+)\.png$")


class GonCoil20(tfds.core.GeneratorBasedBuilder):
    """COIL-20 processed (`coil-20-proc`): 1440 grey 128x128 PNGs, 20 objects x 72 poses (GON-SPEC 6).

    Split 80/20 by image with a seeded permutation of the sorted file names: 1152 train / 288 test.
    """

    name = "gon_coil20"
    VERSION = _VERSION
    URL = "https://www.cs.columbia.edu/CAVE/databases/SLAM_coil-20_coil-100/coil-20/coil-20-proc.zip"
    SPLIT_SEED = 0
    NUM_IMAGES = 1440
    NUM_TRAIN = 1152

    @classmethod
    def source_url(cls) -> str:
        return cls.URL

    @classmethod
    def manual_files(cls) -> list[str]:
        return ["coil-20-proc/obj*__*.png"]

    @classmethod
    def has_manual_files(cls, folder: Path) -> bool:
        return any((folder / "coil-20-proc").glob("obj*__*.png"))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=("COIL-20 processed: 128x128x1 uint8 images; seeded 80/20 split "
                         f"(seed {self.SPLIT_SEED}, {self.NUM_TRAIN} train)."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(128, 128, 1), dtype=np.uint8),
                "label": tfds.features.Tensor(shape=(), dtype=np.int64),
                "pose": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            homepage="https://www.cs.columbia.edu/CAVE/software/softlib/coil-20.php",
        )

    def _split_generators(self, dl_manager):
        manual = _manual_dir(dl_manager)
        if manual is not None and self.has_manual_files(Path(manual)):
            root = manual / "coil-20-proc"
        else:
            extracted = dl_manager.download_and_extract(self.URL)
            root = extracted / "coil-20-proc" if (extracted / "coil-20-proc").is_dir() else extracted
        files = sorted((p for p in root.glob("obj*__*.png") if _COIL_NAME.search(p.name)), key=lambda p: p.name)
        if len(files) != self.NUM_IMAGES:
            raise ValueError(f"expected {self.NUM_IMAGES} COIL-20 images objN__M.png under {root}, "
                             f"found {len(files)}")
        order = np.random.default_rng(self.SPLIT_SEED).permutation(len(files))
        train = [files[i] for i in order[:self.NUM_TRAIN]]
        test = [files[i] for i in order[self.NUM_TRAIN:]]
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, files):
        from PIL import Image

        for path in files:
            try:
                image = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("L"), np.uint8)
            except OSError as error:  # PIL's UnidentifiedImageError, a truncated PNG
                raise ValueError(f"{path} is not a readable PNG ({error}); replace it with the official file") from None
            if image.shape != (128, 128):
                raise ValueError(f"{path}: expected a 128x128 image, got {image.shape}")
            obj, pose = map(int, _COIL_NAME.search(path.name).groups())
            yield path.name, {"image": image[:, :, None], "label": obj - 1, "pose": pose}


BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "mnist": GonMnist,
    "fashion_mnist": GonFashionMnist,
    "cifar10": GonCifar10,
    "coil20": GonCoil20,
}
