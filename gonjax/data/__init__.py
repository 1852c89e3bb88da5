"""Datasets of GON-SPEC 6: TensorFlow-free TFDS builders and the in-memory input pipeline."""
from gonjax.data.builders import BUILDERS
from gonjax.data.input_pipeline import CHANNELS, NATIVE_SIZE, Dataset, load_dataset

__all__ = ["BUILDERS", "CHANNELS", "NATIVE_SIZE", "Dataset", "load_dataset"]
