"""Data (GON-SPEC 6): TFDS builders on the official files in ../shared/data and on synthetic official-format
files, preprocessing against independent references, batching."""
import gzip
import pickle
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gonjax.data import input_pipeline
from gonjax.data.builders import read_idx
from gonjax.errors import DataError


def _raw_idx(path):
    """Independent IDX reader: skip the magic and dims by their documented sizes."""
    raw = gzip.open(path).read()
    ndim = raw[3]
    return np.frombuffer(raw[4 + 4 * ndim:], np.uint8)


def _write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_synthetic(tmp_path, compress):
    array = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    _write_idx(tmp_path / "x.idx", array, compress)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx"), array)


def test_read_idx_rejects_a_non_idx_file(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_official_idx_datasets_through_tfds(name, shared_data, tfds_dir):
    builder = input_pipeline.prepare_builder(name, tfds_dir, shared_data)
    assert "tensorflow" not in sys.modules  # prepared and read without TensorFlow
    for split, prefix, count in (("train", "train", 60_000), ("test", "t10k", 10_000)):
        images = input_pipeline.read_split(builder, split)
        assert images.shape == (count, 28, 28, 1) and images.dtype == np.uint8
        # The official file's images in the file's order (the first test batch: 7, 2, 1, 0, ... on MNIST).
        raw = _raw_idx(shared_data / name / f"{prefix}-images-idx3-ubyte.gz").reshape(count, -1)
        np.testing.assert_array_equal(images.reshape(count, -1), raw)


def test_mnist_resize_to_32_matches_bilinear_reference(shared_data, tfds_dir):
    data = input_pipeline.load_dataset("mnist", 32, tfds_dir, shared_data)
    assert data.train.shape == (60_000, 32, 32, 1) and data.test.shape == (10_000, 32, 32, 1)
    assert data.train.dtype == np.float32 and 0.0 <= data.train.min() and data.train.max() <= 1.0
    native = input_pipeline.read_split(input_pipeline.prepare_builder("mnist", tfds_dir), "test")[:16]
    # Upsampling bilinear with half-pixel centres, in float64 by JAX; Pillow requantises to uint8.
    with jax.enable_x64(True):
        expected = np.asarray(jax.image.resize(jnp.asarray(native, jnp.float64), (16, 32, 32, 1), "bilinear"))
    np.testing.assert_allclose(data.test[:16] * 255, expected, atol=1.0)
    assert np.all(np.mod(data.test[:16] * 255 + 1e-3, 1.0) < 2e-3)  # requantised: whole grey levels


def test_native_resolution_keeps_28(shared_data, tfds_dir):
    data = input_pipeline.load_dataset("fashion_mnist", 28, tfds_dir, shared_data)
    assert data.train.shape == (60_000, 28, 28, 1)
    native = input_pipeline.read_split(input_pipeline.prepare_builder("fashion_mnist", tfds_dir), "train")[:8]
    np.testing.assert_array_equal(data.train[:8], native / np.float32(255))


def test_coil20_split_and_downsampling(shared_data, tfds_dir):
    builder = input_pipeline.prepare_builder("coil20", tfds_dir, shared_data)
    train = builder.as_data_source(split="train")
    test = builder.as_data_source(split="test")
    assert (len(train), len(test)) == (1152, 288)
    keys = lambda src: {(int(e["label"]), int(e["pose"])) for e in src.__getitems__(range(len(src)))}
    train_keys, test_keys = keys(train), keys(test)
    assert not train_keys & test_keys
    assert train_keys | test_keys == {(o, p) for o in range(20) for p in range(72)}
    # Same split on a second preparation (seeded), in a fresh data dir.
    again = input_pipeline.prepare_builder("coil20", tfds_dir / "again", shared_data)
    assert keys(again.as_data_source(split="test")) == test_keys

    data = input_pipeline.load_dataset("coil20", 32, tfds_dir, shared_data)
    assert data.train.shape == (1152, 32, 32, 1) and data.info["split_seed"] == 0
    native = input_pipeline.read_split(builder, "train")[:4]
    # Bilinear without anti-aliasing, half-pixel centres (jax.image.scale_and_translate, antialias=False).
    with jax.enable_x64(True):
        expected = jax.image.scale_and_translate(
            jnp.asarray(native, jnp.float64), (4, 32, 32, 1), (1, 2), jnp.array([0.25, 0.25]),
            jnp.array([0.0, 0.0]), "linear", antialias=False)
    np.testing.assert_allclose(data.train[:4], np.asarray(expected) / 255, atol=1e-6)


def _synthetic_cifar(rng, count):
    images = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count)
    return images, labels


def _cifar_binary_bytes(images, labels):
    """The official binary record layout, written pixel by pixel: label, then R, G, B planes row-major."""
    out = bytearray()
    for image, label in zip(images, labels):
        out.append(int(label))
        for channel in range(3):
            for row in range(32):
                for col in range(32):
                    out.append(int(image[row, col, channel]))
    return bytes(out)


@pytest.mark.parametrize("layout", ["cifar-10-batches-bin", "cifar-10-batches-py"])
def test_cifar10_builder_on_synthetic_official_files(tmp_path, layout):
    rng = np.random.default_rng(0)
    folder = tmp_path / "manual" / "cifar10" / layout
    folder.mkdir(parents=True)
    expected = {}
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images, labels = _synthetic_cifar(rng, 3)
        expected[batch] = images
        if layout.endswith("bin"):
            (folder / f"{batch}.bin").write_bytes(_cifar_binary_bytes(images, labels))
        else:
            data = np.frombuffer(_cifar_binary_bytes(images, labels), np.uint8).reshape(3, 3073)[:, 1:]
            with open(folder / batch, "wb") as f:
                pickle.dump({b"data": data, b"labels": [int(x) for x in labels]}, f)
    dataset = input_pipeline.load_dataset("cifar10", 32, tmp_path / "tfds", tmp_path / "manual")
    assert dataset.train.shape == (15, 32, 32, 3) and dataset.test.shape == (3, 32, 32, 3)
    # The official batches' images in their order: data_batch_1 to 5, then test_batch.
    train_expected = np.concatenate([expected[f"data_batch_{i}"] for i in range(1, 6)])
    np.testing.assert_array_equal((dataset.train * 255).round().astype(np.uint8), train_expected)
    np.testing.assert_array_equal((dataset.test * 255).round().astype(np.uint8), expected["test_batch"])


def test_cifar10_archive_with_wrong_checksum_is_a_clear_error(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / "cifar-10-binary.tar.gz", "w:gz") as tar:
        tar.add(__file__, arcname="cifar-10-batches-bin/readme")
    with pytest.raises(DataError, match="official checksum"):
        input_pipeline.prepare_builder("cifar10", tmp_path / "tfds", manual)


def test_manual_dir_without_the_files_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"no official mnist files .* expected train-images-idx3-ubyte.gz"):
        input_pipeline.prepare_builder("mnist", tmp_path / "tfds", tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        input_pipeline.prepare_builder("mnist", tmp_path / "tfds", tmp_path / "nowhere")


def test_train_batches_shuffle_per_epoch_drop_last_and_resume():
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    epoch0 = [b.ravel() for b in input_pipeline.train_batches(images, 3, seed=1, epoch=0)]
    epoch1 = [b.ravel() for b in input_pipeline.train_batches(images, 3, seed=1, epoch=1)]
    assert len(epoch0) == 3 and all(len(b) == 3 for b in epoch0)  # 10 // 3, last partial dropped
    seen = np.concatenate(epoch0)
    assert len(set(seen)) == 9  # each image at most once per epoch
    assert not np.array_equal(np.concatenate(epoch1), seen)  # reshuffled every epoch
    again = [b.ravel() for b in input_pipeline.train_batches(images, 3, seed=1, epoch=0)]
    np.testing.assert_array_equal(np.concatenate(again), seen)  # seeded
    resumed = [b.ravel() for b in input_pipeline.train_batches(images, 3, seed=1, epoch=0, start=1)]
    np.testing.assert_array_equal(np.concatenate(resumed), seen[3:])
    other_seed = np.concatenate([b.ravel() for b in input_pipeline.train_batches(images, 3, seed=2, epoch=0)])
    assert not np.array_equal(other_seed, seen)


def test_eval_batches_are_in_order():
    images = np.arange(7, dtype=np.float32).reshape(7, 1, 1, 1)
    batches = list(input_pipeline.eval_batches(images, 2))
    assert [b.ravel().tolist() for b in batches] == [[0, 1], [2, 3], [4, 5]]


def test_side_by_side_preparation_of_one_data_dir(shared_data, tmp_path):
    """Two processes preparing COIL-20 into one fresh data dir at once (two queues of the results suite): both
    get the prepared dataset; without the preparation lock the second's rename into place failed."""
    import subprocess

    code = ("import sys; from gonjax.data import input_pipeline as p; "
            "b = p.prepare_builder('coil20', sys.argv[1], sys.argv[2]); "
            "print(len(b.as_data_source(split='train')), len(b.as_data_source(split='test')))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "tfds"), str(shared_data)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
        assert out.splitlines()[-1].split() == ["1152", "288"]
    assert not list((tmp_path / "tfds" / "gon_coil20").glob("incomplete*"))
