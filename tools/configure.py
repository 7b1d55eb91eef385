#!/usr/bin/env python3
"""Points the Bazel build at a Python interpreter that has TensorFlow (and at nvcc, when there is one).

Writes .bazelrc.user (read by .bazelrc through try-import) with PYTHON_BIN_PATH, which the
@local_config_tf repository rule uses to ask that interpreter for tf.sysconfig, and, when
tools/cuda_toolchain.py has assembled .cuda/, `--config=cuda` with its nvcc: the op libraries are then
built with their GPU kernels. Checks first that the
interpreter imports a TensorFlow inside the range tf_lora/version.py pins. Rewrites the file only when
its contents change, so repeated runs keep Bazel's cache.

    python3 tools/configure.py [--python .venv/bin/python]
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAZELRC_USER = os.path.join(ROOT, ".bazelrc.user")


def _version_module():
    namespace = {}
    with open(os.path.join(ROOT, "tf_lora", "version.py")) as f:
        exec(f.read(), namespace)  # noqa: S102 - our own constants-only module, read without importing tf_lora.
    return namespace


def _tf_version(python):
    probe = "import tensorflow as tf; print(tf.__version__)"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"configure: {python} cannot import tensorflow:\n{proc.stderr.strip()}")
    return proc.stdout.strip().splitlines()[-1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter with TensorFlow installed")
    args = parser.parse_args(argv)

    # Keep the venv path as given: resolving the symlink would lose the venv (and its site-packages).
    python = os.path.abspath(args.python)
    version = _version_module()
    tf_version = _tf_version(python)
    if not version["tf_version_supported"](tf_version):
        sys.exit(
            f"configure: {python} has TensorFlow {tf_version}; tf_lora needs {version['TF_REQUIREMENT']}."
        )

    lines = ["# Written by tools/configure.py; do not edit."]
    for command in ("build", "query", "fetch", "sync"):
        lines.append(f"{command} --repo_env=PYTHON_BIN_PATH={python}")
    nvcc = os.path.join(ROOT, ".cuda", "bin", "nvcc")
    if os.path.exists(nvcc):  # tools/cuda_toolchain.py: the op libraries get their GPU kernels
        lines += ["build --config=cuda", f"build --action_env=NVCC={nvcc}"]
    content = "\n".join(lines) + "\n"
    old = open(BAZELRC_USER).read() if os.path.exists(BAZELRC_USER) else None
    if old != content:
        with open(BAZELRC_USER, "w") as f:
            f.write(content)
    gpu = "with GPU kernels (nvcc " + nvcc + ")" if os.path.exists(nvcc) else "CPU kernels only (no .cuda/)"
    print(f"configure: Bazel builds against TensorFlow {tf_version} of {python}; {gpu}")


if __name__ == "__main__":
    main()
