"""Shared test set-up. Tests run against the installed wheel, the way users get tf_lora."""

import os
import pathlib
import subprocess
import sys

import pytest

import tf_lora

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

if "site-packages" not in pathlib.Path(tf_lora.__file__).parts:
    raise RuntimeError(
        f"tests must import the installed tf_lora wheel, not {tf_lora.__file__}: run `make test` "
        "(or install the wheel and run .venv/bin/pytest from the repository root)."
    )

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Defined in every run_python script: a context manager that lets the process map only `extra_bytes` more
# address space (RLIMIT_AS) while it is open, so that allocations fail as they would out of memory.
_PRELUDE = """
import contextlib, resource

@contextlib.contextmanager
def address_space_headroom(extra_bytes):
    with open("/proc/self/statm") as f:
        in_use = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (in_use + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
"""


@pytest.fixture
def run_python():
    """run_python(script): runs `script` in a fresh interpreter, asserts it exits 0, returns its stdout."""

    def run(script, timeout=300):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run(
            [sys.executable, "-c", _PRELUDE + script],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    return run
