"""The TensorFlow pin: declared once in tf_lora.version, checked at import."""

import pytest
import tensorflow as tf

import tf_lora
from tf_lora import _ensure_tf, version


def test_the_running_tensorflow_is_supported():
    assert version.tf_version_supported(tf.__version__)


@pytest.mark.parametrize(
    "tf_version,supported",
    [
        ("2.21.0", True),
        ("2.21.3", True),
        ("2.21.0rc1", True),
        ("2.20.1", False),
        ("2.22.0", False),
        ("3.0.0", False),
    ],
)
def test_tf_version_supported(tf_version, supported):
    assert version.tf_version_supported(tf_version) is supported


def test_release_tuple_rejects_garbage():
    with pytest.raises(ValueError, match="not a TensorFlow version"):
        version.release_tuple("nightly")


def test_import_check_names_versions_and_fix(monkeypatch):
    monkeypatch.setattr(tf, "__version__", "2.19.0")
    with pytest.raises(ImportError) as info:
        _ensure_tf.ensure_tensorflow()
    message = str(info.value)
    assert "2.19.0" in message and "tensorflow>=2.21,<2.22" in message and "pip install" in message


def test_wheel_metadata_declares_the_same_pin():
    from importlib import metadata

    from packaging.requirements import Requirement

    pin = Requirement(version.TF_REQUIREMENT)
    requires = {r.name: r for r in map(Requirement, metadata.requires("tf_lora"))}
    assert requires["tensorflow"].specifier == pin.specifier
    assert metadata.version("tf_lora") == tf_lora.__version__
