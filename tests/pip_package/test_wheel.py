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


# What the manylinux_2_27 policy (PEP 600; auditwheel's policy file) lets a library need from the system:
# the newest symbol version of each library family.
MANYLINUX_2_27 = {"GLIBC": (2, 27), "GLIBCXX": (3, 4, 24), "CXXABI": (1, 3, 11), "GCC": (7, 0, 0)}


def _needed_versions(data):
    """{family: [version tuples]} of the symbol versions an ELF shared library needs."""
    import io

    from elftools.elf.elffile import ELFFile
    from elftools.elf.gnuversions import GNUVerNeedSection

    found = {}
    elf = ELFFile(io.BytesIO(data))
    for section in elf.iter_sections():
        if isinstance(section, GNUVerNeedSection):
            for _library, auxiliaries in section.iter_versions():
                for aux in auxiliaries:
                    family, _, number = aux.name.partition("_")
                    found.setdefault(family, []).append(tuple(int(p) for p in number.split(".")))
    return found


def test_wheel_is_manylinux_2_27():
    """The wheel carries TensorFlow's own platform tag, and its libraries need nothing newer than that
    policy allows: glibc, libstdc++ and libgcc symbol versions, no grafted libraries, no TensorFlow."""
    import zipfile

    wheel = _wheel()
    assert os.path.basename(wheel).endswith("-manylinux_2_27_x86_64.whl"), wheel
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tags = [
            line.split(":", 1)[1].strip()
            for info in names
            if info.endswith(".dist-info/WHEEL")
            for line in z.read(info).decode().splitlines()
            if line.startswith("Tag:")
        ]
        libraries = {n: z.read(n) for n in names if n.endswith(".so") or ".so." in n}
    assert tags and all(tag.endswith("-manylinux_2_27_x86_64") for tag in tags), tags
    assert sorted(libraries) == ["tf_lora/python/ops/_lora_ops.so", "tf_lora/python/ops/_sparse_table_ops.so"]
    for name, data in libraries.items():
        for family, versions in _needed_versions(data).items():
            if family in MANYLINUX_2_27:
                assert max(versions) <= MANYLINUX_2_27[family], (name, family, max(versions))


def test_version_check_reads_what_a_newer_toolchain_needs():
    """The check above can fail: it reads that the build machine's own libstdc++ (Debian 12, GCC 12) needs a
    glibc newer than the policy allows."""
    libstdcxx = subprocess.run(
        ["g++", "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with open(os.path.realpath(libstdcxx), "rb") as f:
        versions = _needed_versions(f.read())
    assert max(versions["GLIBC"]) > MANYLINUX_2_27["GLIBC"]


def test_wheel_holds_every_module_of_the_source_tree():
    import zipfile

    source = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "tf_lora").rglob("*.py")}
    with zipfile.ZipFile(_wheel()) as z:
        packaged = {n for n in z.namelist() if n.endswith(".py")}
    assert not source - packaged, (
        f"modules missing from the wheel (its BUILD srcs): {sorted(source - packaged)}"
    )
