"""The op-library loader and the generated wrapper module, as installed from the wheel."""

import os

import pytest
import tensorflow as tf

from tf_lora.python.ops import _loader, gen_lora_ops


def test_generated_module_is_shipped_beside_its_library():
    ops_dir = os.path.dirname(gen_lora_ops.__file__)
    assert "site-packages" in ops_dir.split(os.sep)
    assert os.path.isfile(os.path.join(ops_dir, "_lora_ops.so"))
    assert _loader.library_path("_lora_ops.so") == os.path.join(ops_dir, "_lora_ops.so")
    with open(gen_lora_ops.__file__) as f:
        source = f.read()
    # Written by TensorFlow's generator at build time, behind our loader call.
    assert "Generated at build time" in source
    assert "_tf_lora_loader.load_op_library('_lora_ops.so'" in source
    assert "def tf_lora_lora_merge(" in source
    assert callable(gen_lora_ops.tf_lora_lora_merge)


def test_ops_are_namespaced():
    from tensorflow.python.framework import op_def_registry

    assert op_def_registry.get("TfLora>LoraMerge") is not None
    assert op_def_registry.get("LoraMerge") is None


def test_refuses_library_built_for_another_tensorflow():
    with pytest.raises(ImportError) as info:
        _loader.load_op_library("_lora_ops_for_other_tf.so", built_with_tf="2.20.0")
    message = str(info.value)
    assert "2.20.0" in message and tf.__version__ in message
    assert "no binary compatibility" in message


def test_missing_library_names_where_it_looked():
    with pytest.raises(ImportError, match=r"_absent_ops\.so not found; looked in \["):
        _loader.load_op_library("_absent_ops.so", built_with_tf=tf.__version__)


def test_unloadable_library_names_both_versions(tmp_path, monkeypatch):
    broken = tmp_path / "_broken_ops.so"
    broken.write_bytes(b"not an ELF file")
    monkeypatch.setattr(_loader, "_HERE", str(tmp_path))
    with pytest.raises(ImportError) as info:
        _loader.load_op_library("_broken_ops.so", built_with_tf=tf.__version__)
    assert "could not load" in str(info.value) and tf.__version__ in str(info.value)


def test_loads_each_library_once():
    first = _loader.load_op_library("_lora_ops.so", built_with_tf=tf.__version__)
    assert _loader.load_op_library("_lora_ops.so", built_with_tf=tf.__version__) is first


def test_source_tree_falls_back_to_bazel_bin(tmp_path, monkeypatch):
    """In a source tree (a WORKSPACE at the root) libraries and generated modules come from bazel-bin."""
    package_dir = tmp_path / "tf_lora" / "python" / "ops"
    package_dir.mkdir(parents=True)
    built_dir = tmp_path / "bazel-bin" / "tf_lora" / "python" / "ops"
    built_dir.mkdir(parents=True)
    (built_dir / "_dev_ops.so").write_bytes(b"")
    monkeypatch.setattr(_loader, "_HERE", str(package_dir))
    assert _loader.development_dirs() == []  # no WORKSPACE: not a source tree
    (tmp_path / "WORKSPACE").write_text("")
    assert _loader.development_dirs() == [str(built_dir)]
    assert _loader.library_path("_dev_ops.so") == str(built_dir / "_dev_ops.so")
