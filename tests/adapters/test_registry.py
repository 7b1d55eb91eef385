"""tf_lora.adapters.Registry: versions on disk, activate / rollback / deactivate give exact weights."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from test_apply import FIXTURES, _io, _tiny

import tf_lora


def _kernels(model):
    return {layer.name: layer.kernel.numpy().copy() for layer in model.layers if hasattr(layer, "kernel")}


def _assert_kernels_equal(model, expected):
    for name, values in _kernels(model).items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)


@pytest.fixture
def two_versions(tmp_path):
    """v1: the PEFT fixture (copied); v2: the same with every b doubled, written by save_peft."""
    v1 = tmp_path / "v1"
    shutil.copytree(FIXTURES, v1)
    adapters = tf_lora.adapters.load_peft(v1)
    v2 = tmp_path / "v2"
    doubled = {k: dataclasses.replace(a, b=a.b * 2) for k, a in adapters.items()}
    tf_lora.adapters.save_peft(doubled, v2)
    return v1, v2, adapters, doubled


def _merged_numpy(base, adapters):
    """Independent reference: kernel + scale * a @ b in float64."""
    out = {}
    for name, kernel in base.items():
        a = adapters.get(name)
        if a is None:
            out[name] = kernel
            continue
        r = a.a.shape[1]
        scale = a.alpha / (np.sqrt(r) if a.use_rslora else r)
        out[name] = kernel.astype(np.float64) + scale * (a.a.astype(np.float64) @ a.b.astype(np.float64))
    return out


def test_activate_rollback_deactivate(tmp_path, two_versions):
    v1, v2, adapters, doubled = two_versions
    model = _tiny(lora=False)
    base = _kernels(model)
    registry = tf_lora.adapters.Registry(tmp_path / "registry", model)
    assert registry.register("bot", v1) == 1
    assert registry.register("bot", v2) == 2

    registry.activate("bot", 1)
    assert registry.active == ("bot", 1)
    np.testing.assert_allclose(model.predict(_io()["x"], verbose=0), _io()["y"], rtol=1e-5, atol=1e-5)
    v1_kernels = _kernels(model)

    registry.activate("bot")  # latest
    assert registry.active == ("bot", 2)
    for name, values in _merged_numpy(base, doubled).items():
        np.testing.assert_allclose(_kernels(model)[name], values, rtol=1e-5, atol=1e-6, err_msg=name)

    registry.rollback()
    assert registry.active == ("bot", 1)
    _assert_kernels_equal(model, v1_kernels)  # exact, no merge/unmerge drift

    registry.deactivate()
    assert registry.active is None
    _assert_kernels_equal(model, base)

    # The manifest on disk is the registry: a new Registry sees versions and state.
    manifest = json.loads((tmp_path / "registry" / "manifest.json").read_text())
    assert [(e["name"], e["version"]) for e in manifest["adapters"]] == [("bot", 1), ("bot", 2)]
    assert all(len(e["sha256"]) == 64 for e in manifest["adapters"])
    reopened = tf_lora.adapters.Registry(tmp_path / "registry", model)
    assert reopened.active is None and len(reopened.entries) == 2


def test_rollback_after_one_activation_restores_base(tmp_path, two_versions):
    v1, _, _, _ = two_versions
    model = _tiny(lora=False)
    base = _kernels(model)
    registry = tf_lora.adapters.Registry(tmp_path / "registry", model)
    registry.register("bot", v1)
    with pytest.raises(ValueError, match="nothing was activated"):
        registry.rollback()
    for _ in range(5):  # many swaps do not drift
        registry.activate("bot")
        registry.rollback()
    assert registry.active is None
    _assert_kernels_equal(model, base)


def test_tampered_file_changes_nothing(tmp_path, two_versions):
    v1, v2, _, _ = two_versions
    model = _tiny(lora=False)
    registry = tf_lora.adapters.Registry(tmp_path / "registry", model)
    registry.register("bot", v1)
    registry.register("bot", v2)
    registry.activate("bot", 1)
    kernels = _kernels(model)
    manifest = (tmp_path / "registry" / "manifest.json").read_bytes()
    shutil.copy(v1 / "adapter_model.safetensors", v2 / "adapter_model.safetensors")  # swapped behind our back
    with pytest.raises(ValueError, match="(?i)sha"):
        registry.activate("bot", 2)
    _assert_kernels_equal(model, kernels)
    assert registry.active == ("bot", 1)
    assert (tmp_path / "registry" / "manifest.json").read_bytes() == manifest


def test_mismatched_adapter_changes_nothing(tmp_path, two_versions):
    v1, _, adapters, _ = two_versions
    wide = {
        k: dataclasses.replace(a, a=np.ones((a.a.shape[0] + 1, a.a.shape[1]), a.a.dtype))
        for k, a in adapters.items()
    }
    tf_lora.adapters.save_peft(wide, tmp_path / "wide")
    model = _tiny(lora=False)
    registry = tf_lora.adapters.Registry(tmp_path / "registry", model)
    registry.register("bot", v1)
    registry.register("wide", tmp_path / "wide")
    registry.activate("bot")
    kernels = _kernels(model)
    with pytest.raises(ValueError, match="nothing changed"):
        registry.activate("wide")
    _assert_kernels_equal(model, kernels)
    assert registry.active == ("bot", 1)


def test_bad_arguments(tmp_path, two_versions):
    v1, _, _, _ = two_versions
    registry = tf_lora.adapters.Registry(tmp_path / "registry", _tiny(lora=False))
    with pytest.raises(ValueError, match="format must be one of"):
        registry.register("bot", v1, format="onnx")
    with pytest.raises(Exception):  # noqa: B017 - a directory with no adapter is not registered
        registry.register("bot", tmp_path)
    assert registry.entries == []
    registry.register("bot", v1)
    with pytest.raises(ValueError, match="version 1 exists"):
        registry.register("bot", v1, version=1)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        registry.activate("nope")
    with pytest.raises(ValueError, match="has no version 7"):
        registry.activate("bot", 7)
