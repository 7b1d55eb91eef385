"""Keras's own LoRA (enable_lora, keras-hub's .lora.h5 files) to and from tf_lora adapters, exactly, on
keras-hub GPT-2 (query [hidden, heads, head_dim]), Llama and Gemma (query [heads, hidden, head_dim])."""

import keras
import numpy as np
import pytest
from keras_hub_models import KINDS, tiny_backbone

import tf_lora

keras_hub = pytest.importorskip("keras_hub")


def _backbone(kind):
    return tiny_backbone(kind)


X = {"token_ids": np.arange(16, dtype="int32").reshape(2, 8) % 64, "padding_mask": np.ones((2, 8), "int32")}


def _keras_lora(kind, rank=4):
    backbone = _backbone(kind)
    backbone.enable_lora(rank)
    rng = np.random.default_rng(1)
    for layer in backbone._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            layer.lora_kernel_b.assign(
                0.3 * rng.standard_normal(layer.lora_kernel_b.shape).astype(np.float32)
            )
    return backbone


@pytest.mark.parametrize("kind", KINDS)
def test_lora_h5_from_keras_hub_applies_exactly(kind, tmp_path):
    keras_model = _keras_lora(kind)
    expected = keras_model(X).numpy()
    assert np.abs(expected - _backbone(kind)(X).numpy()).max() > 1e-2  # the adapter matters
    keras_model.save_lora_weights(str(tmp_path / "a.lora.h5"))
    fresh = _backbone(kind)
    adapters = tf_lora.adapters.load_keras_lora(tmp_path / "a.lora.h5", fresh)
    assert len(adapters) == 4 and all("query" in p or "value" in p for p in adapters)
    tf_lora.adapters.apply(fresh, adapters)
    np.testing.assert_allclose(fresh(X).numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_keras_lora_model_converts_and_converts_back(kind, tmp_path):
    model = _keras_lora(kind)
    expected = model(X).numpy()
    _, adapted = tf_lora.inject_lora(model, target=r".*(query|value)", copy=False)  # keeps Keras's adapters
    layers = tf_lora.layers.lora_layers(model)
    assert sorted(layers) == adapted and len(adapted) == 4
    np.testing.assert_allclose(model(X).numpy(), expected, rtol=1e-4, atol=1e-5)
    tf_lora.layers.to_keras_lora(model)  # and back to Keras's own LoRA layers
    assert not tf_lora.layers.lora_layers(model)
    np.testing.assert_allclose(model(X).numpy(), expected, rtol=1e-4, atol=1e-5)
    model.save_lora_weights(str(tmp_path / "b.lora.h5"))  # keras-hub's own writer and reader
    fresh = _backbone(kind)
    fresh.load_lora_weights(str(tmp_path / "b.lora.h5"))
    np.testing.assert_allclose(fresh(X).numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_tf_lora_adapters_save_as_lora_h5_that_keras_hub_loads(kind, tmp_path):
    model, _ = tf_lora.inject_lora(_backbone(kind), rank=3, alpha=5, target=r".*(query|value)", copy=False)
    rng = np.random.default_rng(2)
    for layer in tf_lora.layers.lora_layers(model).values():
        layer.adapter_slot().b.assign(rng.standard_normal(layer.adapter_slot().b.shape).astype(np.float32))
    expected = model(X).numpy()
    tf_lora.adapters.save_keras_lora(model, tmp_path / "c.lora.h5")
    fresh = _backbone(kind)
    fresh.load_lora_weights(str(tmp_path / "c.lora.h5"))  # enable_lora with the file's rank, default layers
    np.testing.assert_allclose(fresh(X).numpy(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="must end in .lora.h5|needs the file name to end in .lora.h5"):
        tf_lora.adapters.save_keras_lora(model, tmp_path / "c.h5")


def test_bad_lora_h5_files(tmp_path):
    (tmp_path / "x.lora.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="is not a Keras .lora.h5 file"):
        tf_lora.adapters.load_keras_lora(tmp_path / "x.lora.h5", _backbone("gpt2"))
    _keras_lora("gpt2").save_lora_weights(str(tmp_path / "g.lora.h5"))
    with pytest.raises(ValueError, match="do not fit a kernel"):  # GPT-2's file on Gemma's layers
        tf_lora.adapters.load_keras_lora(tmp_path / "g.lora.h5", _backbone("gemma"))
    with pytest.raises(ValueError, match="holds none"):
        tf_lora.adapters.load_keras_lora(tmp_path / "g.lora.h5", keras.Sequential([keras.layers.Dense(2)]))
