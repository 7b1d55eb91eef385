"""safetensors files as the adapter formats use them: reading with clear errors, writing every dtype the
formats hold (bfloat16 and 0-d arrays included), and SHA-256 checks. Shared by the PEFT and kohya readers
and writers and the registry."""

import hashlib
import os

import numpy as np
from safetensors import SafetensorError, TensorSpec, serialize_file
from safetensors.tensorflow import load_file

_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64")


def write_safetensors(arrays: dict, path):
    """Writes numpy arrays (one of _DTYPES, 0-d included: kohya's alphas) as a safetensors file.

    safetensors' numpy and TensorFlow savers take neither bfloat16 nor 0-d arrays, so this goes through its
    serializer directly; the arrays stay referenced for the whole call, as TensorSpec requires.
    """
    arrays = {name: np.asarray(array, order="C") for name, array in arrays.items()}  # keeps 0-d
    specs = {}
    for name, array in arrays.items():
        if array.dtype.name not in _DTYPES:
            raise ValueError(f"{name}: dtype {array.dtype.name} cannot be written (one of {_DTYPES})")
        specs[name] = TensorSpec(
            dtype=array.dtype.name, shape=list(array.shape), data_ptr=array.ctypes.data, data_len=array.nbytes
        )
    serialize_file(specs, os.fspath(path), metadata={"format": "pt"})


def read_safetensors(path):
    """{name: tf.Tensor} of a safetensors file; ValueError naming the file when it is missing or invalid."""
    try:
        return load_file(path)
    except FileNotFoundError:
        raise ValueError(f"no safetensors file at {path}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


def sha256_file(path) -> str:
    """The hex SHA-256 of a file, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path, expected):
    """ValueError unless the file's hex SHA-256 is `expected`."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ValueError(f"{path} has SHA-256 {actual}, expected {expected}")
