"""The wheel installs into a fresh virtual environment and works there, with no Bazel and no source tree."""

import glob
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import tf_lora

    assert tf_lora.__file__.startswith(sys.prefix), (tf_lora.__file__, sys.prefix)
    rng = np.random.default_rng(0)
    w, a, b = (rng.standard_normal(s).astype(np.float32) for s in [(64, 48), (64, 4), (4, 48)])
    merged = tf_lora.lora_merge(w, a, b, 0.5).numpy()
    err = float(np.max(np.abs(merged - (w + 0.5 * a @ b))))
    assert err < 1e-5, err
    print("WHEEL_OK", tf_lora.__file__, os.getcwd(), err)
    """
)


def _wheel():
    wheel_dir = os.environ.get("TF_LORA_WHEEL_DIR", str(REPO_ROOT / "dist"))
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "tf_lora-*.whl")))
    assert wheels, f"no tf_lora wheel in {wheel_dir}: run `make wheel` (make test does)"
    return wheels[-1]


@pytest.mark.slow
def test_wheel_in_fresh_venv(tmp_path):
    wheel = _wheel()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # Resolves tensorflow and numpy from the package index, as a user's `pip install` does.
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel],
        check=True,
        timeout=900,
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run(
        [python, "-c", SCRIPT], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    module_file, cwd, _ = proc.stdout.split("WHEEL_OK")[1].split()
    # Imported from the fresh venv's site-packages, run from a directory outside the repository.
    assert module_file.startswith(str(venv)) and "site-packages" in module_file
    assert cwd == str(workdir) and not cwd.startswith(str(REPO_ROOT))
    # The console script the wheel declares.
    cli = subprocess.run(
        [str(venv / "bin" / "tf-lora"), "fold", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0 and "usage: tf-lora fold" in cli.stdout, cli.stderr[-4000:]
