"""Wheel recipe for tf_lora. Run by build_pip_package.sh on a tree assembled from Bazel's outputs."""

import os

from setuptools import Distribution, find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _version_module():
    namespace = {}
    with open(os.path.join(_HERE, "tf_lora", "version.py")) as f:
        exec(f.read(), namespace)  # noqa: S102 - our own constants-only module.
    return namespace


class BinaryDistribution(Distribution):
    """The wheel carries compiled op libraries: tag it for this Python and platform."""

    def has_ext_modules(self):
        return True


_VERSION = _version_module()

with open(os.path.join(_HERE, "README.md")) as f:
    _README = f.read()

setup(
    name="tf_lora",
    version=_VERSION["__version__"],
    description="LoRA adapters and huge sparse embedding tables for TensorFlow, as custom ops",
    long_description=_README,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tf_lora", "tf_lora.*"]),
    package_data={"tf_lora.python.ops": ["*.so"]},
    install_requires=[_VERSION["TF_REQUIREMENT"], "numpy", "safetensors>=0.4", "rich"],
    entry_points={"console_scripts": ["tf-lora = tf_lora.rewrite.cli:main"]},
    distclass=BinaryDistribution,
    zip_safe=False,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
