#!/usr/bin/env python3
"""Assembles the CUDA 11.8 compiler that builds the op libraries' GPU kernels, into .cuda/ (docs/building.md,
"CUDA" says why this one).

- nvcc, cicc, cudafe++, ptxas, fatbinary, nvlink, cuobjdump: Debian bookworm's `nvidia-cuda-toolkit`
  package (non-free), downloaded from the Debian mirror and unpacked here, never installed;
- the CUDA runtime headers, nvcc's crt headers and libdevice: PyPI's `nvidia-cuda-runtime-cu11` and
  `nvidia-cuda-nvcc-cu11` wheels.

Every file is pinned by version and sha256. Nothing is linked from it: the kernels run on TensorFlow's own
CUDA runtime. Idempotent: does nothing when .cuda/VERSION is current.

    python3 tools/cuda_toolchain.py [--python .venv/bin/python]
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.path.join(ROOT, ".cuda")
VERSION = "11.8.89 (Debian nvidia-cuda-toolkit 11.8.89~11.8.0-5~deb12u1; PyPI cu11 11.8.89)"

DEB = (
    "http://deb.debian.org/debian/pool/non-free/n/nvidia-cuda-toolkit/"
    "nvidia-cuda-toolkit_11.8.89~11.8.0-5~deb12u1_amd64.deb",
    "d1156026e704fe0368b6295db06224ed00a727966fb13454f34e3f3102db0457",
)
WHEELS = {
    "nvidia-cuda-runtime-cu11==11.8.89": "92d04069a987e1fbc9213f8376d265df0f7bb42617d44f5eda1f496acea7f2d1",
    "nvidia-cuda-nvcc-cu11==11.8.89": "f8e1e995166c884f2f5bf94975d7abb89175363b8712f7f81cd38d0df1b2cd85",
}
BINARIES = ["cudafe++", "ptxas", "fatbinary", "nvlink", "bin2c", "cuobjdump"]

# nvcc finds its pieces relative to itself (the layout of a CUDA installation).
NVCC_PROFILE = """TOP              = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH            += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
"""


def _checked(path, sha256):
    with open(path, "rb") as f:
        got = hashlib.file_digest(f, "sha256").hexdigest()
    if got != sha256:
        sys.exit(f"cuda_toolchain: {os.path.basename(path)} has sha256 {got}, expected {sha256}")
    return path


def _download(url, sha256, directory):
    path = os.path.join(directory, url.rsplit("/", 1)[1])
    for attempt in range(3):
        try:
            with urllib.request.urlopen(url, timeout=120) as response, open(path, "wb") as f:
                shutil.copyfileobj(response, f)
            break
        except OSError as e:
            if attempt == 2:
                sys.exit(f"cuda_toolchain: cannot download {url}: {e}")
    return _checked(path, sha256)


def _wheel(python, requirement, sha256, directory):
    before = set(os.listdir(directory))
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
            directory,
            requirement,
        ],
        check=True,
    )
    new = sorted(set(os.listdir(directory)) - before)
    if len(new) != 1:
        sys.exit(f"cuda_toolchain: pip download {requirement} gave {new}")
    return _checked(os.path.join(directory, new[0]), sha256)


def assemble(python, dest=DEST):
    work = tempfile.mkdtemp(prefix="tf_lora_cuda_")
    staging = dest + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        deb = _download(*DEB, work)
        unpacked = os.path.join(work, "deb")
        subprocess.run(["dpkg-deb", "-x", deb, unpacked], check=True)
        wheels = [_wheel(python, req, sha, work) for req, sha in WHEELS.items()]
        unzipped = os.path.join(work, "wheels")
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(unzipped)

        toolkit = os.path.join(unpacked, "usr", "lib", "nvidia-cuda-toolkit", "bin")
        os.makedirs(os.path.join(staging, "bin"))
        os.makedirs(os.path.join(staging, "nvvm", "bin"))
        shutil.copy2(os.path.join(toolkit, "nvcc"), os.path.join(staging, "bin"))
        shutil.copytree(os.path.join(toolkit, "crt"), os.path.join(staging, "bin", "crt"))
        shutil.copy2(os.path.join(toolkit, "cicc"), os.path.join(staging, "nvvm", "bin"))
        for name in BINARIES:
            shutil.copy2(os.path.join(unpacked, "usr", "bin", name), os.path.join(staging, "bin"))
        with open(os.path.join(staging, "bin", "nvcc.profile"), "w") as f:
            f.write(NVCC_PROFILE)
        nvidia = os.path.join(unzipped, "nvidia")
        for package in ("cuda_runtime", "cuda_nvcc"):
            shutil.copytree(
                os.path.join(nvidia, package, "include"),
                os.path.join(staging, "include"),
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__init__.py", "__pycache__"),
            )
        shutil.copytree(
            os.path.join(nvidia, "cuda_nvcc", "nvvm", "libdevice"), os.path.join(staging, "nvvm", "libdevice")
        )
        with open(os.path.join(staging, "VERSION"), "w") as f:
            f.write(VERSION + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(staging, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="an interpreter with pip, for the wheels")
    args = parser.parse_args(argv)
    version_file = os.path.join(DEST, "VERSION")
    if os.path.exists(version_file) and open(version_file).read().strip() == VERSION:
        return
    print(f"cuda_toolchain: assembling CUDA {VERSION} into {DEST} (about 100 MB, downloaded once)")
    assemble(os.path.abspath(args.python))
    out = subprocess.run([os.path.join(DEST, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    print("cuda_toolchain: " + out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
