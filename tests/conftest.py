"""Shared test set-up. Tests run against the installed wheel, the way users get tf_lora."""

import os
import pathlib

import tf_lora

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

if "site-packages" not in pathlib.Path(tf_lora.__file__).parts:
    raise RuntimeError(
        f"tests must import the installed tf_lora wheel, not {tf_lora.__file__}: run `make test` "
        "(or install the wheel and run .venv/bin/pytest from the repository root)."
    )

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
