#!/usr/bin/env python3
"""Writes gen_<family>_ops.py for a built op library with TensorFlow's own Python op wrapper generator.

`tf.load_op_library` does this in memory: it loads the library, reads its OpList and runs
`_pywrap_python_op_gen.GetPythonWrappers` on it. This script runs the same two steps at build time and
writes the source out, with a header that loads the library through tf_lora's loader first (the
wrappers only refer to ops by name, so the library must be registered before they run).

    gen_op_wrapper.py --library=_lora_ops.so --tf_version_file=tf_version.txt --output=gen_lora_ops.py

The modules used are private to TensorFlow; if a TensorFlow release changes them this fails loudly.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

try:
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.python.client import pywrap_tf_session
    from tensorflow.python.framework import _pywrap_python_op_gen
except ImportError as e:  # pragma: no cover - only on a TensorFlow that moved its private modules.
    sys.exit(
        f"gen_op_wrapper: TensorFlow {tf.__version__} lacks the private modules this generator uses "
        "(tensorflow.python.client.pywrap_tf_session, "
        f"tensorflow.python.framework._pywrap_python_op_gen): {e}"
    )

OP_PREFIX = "TfLora>"

HEADER = '''\
"""Python wrappers for the ops of {library}. Generated at build time; do not edit.

Written by tools/gen_op_wrapper.py with TensorFlow {tf_version}'s own Python op wrapper generator (what
tf.load_op_library runs in memory). The library is loaded first, through tf_lora's loader, which finds it
beside this module and checks it was built for the running TensorFlow.
"""

from tf_lora.python.ops import _loader as _tf_lora_loader

_tf_lora_loader.load_op_library({library!r}, built_with_tf={tf_version!r})

# ---- TensorFlow's generated wrappers follow. ----
'''


def _op_list(library_path):
    handle = pywrap_tf_session.TF_LoadLibrary(library_path)
    try:
        return pywrap_tf_session.TF_GetOpList(handle)
    finally:
        pywrap_tf_session.TF_DeleteLibraryHandle(handle)


def generate(library_path, tf_version):
    """Returns the source of the wrapper module for the op library at `library_path`."""
    if tf.__version__ != tf_version:
        raise SystemExit(
            f"gen_op_wrapper: the library was compiled against TensorFlow {tf_version} headers but this "
            f"interpreter runs TensorFlow {tf.__version__}; re-run tools/configure.py."
        )
    serialized = _op_list(os.path.abspath(library_path))
    ops = op_def_pb2.OpList.FromString(serialized).op
    if not ops:
        raise SystemExit(f"gen_op_wrapper: {library_path} registers no ops")
    bare = [op.name for op in ops if not op.name.startswith(OP_PREFIX)]
    if bare:
        raise SystemExit(f"gen_op_wrapper: ops must be namespaced {OP_PREFIX!r}; got {bare}")
    wrappers = _pywrap_python_op_gen.GetPythonWrappers(serialized)
    if isinstance(wrappers, bytes):
        wrappers = wrappers.decode("utf-8")
    header = HEADER.format(library=os.path.basename(library_path), tf_version=tf_version)
    return header + wrappers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", required=True, help="the built op library (.so)")
    parser.add_argument("--tf_version_file", required=True, help="TF version the library was built with")
    parser.add_argument("--output", required=True, help="the gen_<family>_ops.py to write")
    args = parser.parse_args(argv)
    with open(args.tf_version_file) as f:
        tf_version = f.read().strip()
    source = generate(args.library, tf_version)
    with open(args.output, "w") as f:
        f.write(source)


if __name__ == "__main__":
    main()
