"""Finds and loads tf_lora's op libraries: the one place that does.

Generated `gen_<family>_ops` modules call `load_op_library(name, built_with_tf=...)` before anything else.
The library is looked for beside this module (the installed wheel, or Bazel's runfiles), then in the
source tree's bazel-bin (development). TensorFlow has no ABI stability across minor versions, so a
library built for another minor is refused with both versions named, before it is loaded.
"""

import os

import tensorflow as tf

from tf_lora.version import release_tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE_DIR = os.path.join("tf_lora", "python", "ops")
_loaded = {}


def development_dirs():
    """bazel-bin's copy of this package, when this module runs from a source tree that has one."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))
    bazel_bin = os.path.join(root, "bazel-bin", _PACKAGE_DIR)
    if os.path.isfile(os.path.join(root, "WORKSPACE")) and os.path.isdir(bazel_bin):
        return [bazel_bin]
    return []


def library_path(name):
    """The path of op library `name` (e.g. "_lora_ops.so"); ImportError naming where it looked."""
    candidates = [os.path.join(d, name) for d in [_HERE] + development_dirs()]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ImportError(
        f"tf_lora: op library {name} not found; looked in {candidates}. Install the tf_lora wheel, or "
        "build it in a source tree with `make wheel` (bazel build //...)."
    )


def load_op_library(name, built_with_tf):
    """Loads op library `name`, built against TensorFlow `built_with_tf`, once per process."""
    if name in _loaded:
        return _loaded[name]
    running = tf.__version__
    if release_tuple(running) != release_tuple(built_with_tf):
        raise ImportError(
            f"tf_lora: {name} was built against TensorFlow {built_with_tf}, but this process runs "
            f"TensorFlow {running}. TensorFlow has no binary compatibility across minor versions: install "
            f"the tf_lora wheel built for TensorFlow {running}, or TensorFlow {built_with_tf}."
        )
    path = library_path(name)
    try:
        module = tf.load_op_library(path)
    except (tf.errors.NotFoundError, RuntimeError, OSError) as e:
        raise ImportError(
            f"tf_lora: could not load {path} (built against TensorFlow {built_with_tf}, running "
            f"TensorFlow {running}): {e}"
        ) from e
    _loaded[name] = module
    return module
