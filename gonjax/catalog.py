"""The datasets gonjax knows (GON-SPEC 6), as plain facts: no TFDS import, so models and plans can use them.

The input pipeline (`gonjax.data`) prepares and reads the images; this module only says what they are.
"""
from __future__ import annotations

DATASETS = ("mnist", "fashion_mnist", "cifar10", "coil20")

# Side of the images each dataset gives the models when not resized (COIL-20 is always downsampled to 32).
NATIVE_SIZE = {"mnist": 28, "fashion_mnist": 28, "cifar10": 32, "coil20": 32}
CHANNELS = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3, "coil20": 1}
# (train, test) images: the official splits, and COIL-20's seeded 80/20 split of its 1,440 images.
SPLIT_SIZES = {"mnist": (60000, 10000), "fashion_mnist": (60000, 10000), "cifar10": (50000, 10000),
               "coil20": (1152, 288)}
