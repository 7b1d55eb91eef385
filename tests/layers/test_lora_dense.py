"""tf_lora.layers.LoraDense: a Dense with a LoRA adapter on a frozen kernel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora


def _model(**lora):
    keras.utils.set_random_seed(1)
    inp = keras.Input((6,))
    hidden = tf_lora.layers.LoraDense(5, activation="relu", rank=2, alpha=4, name="lora", **lora)(inp)
    model = keras.Model(inp, keras.layers.Dense(1)(hidden))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model, model.get_layer("lora")


def _data(n=256):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    return x, np.sin(x.sum(1, keepdims=True)).astype(np.float32)


def test_starts_as_the_dense_it_replaces_and_matches_numpy():
    layer = tf_lora.layers.LoraDense(4, rank=2, alpha=6, use_bias=True)
    x = np.random.default_rng(2).standard_normal((3, 7)).astype(np.float32)
    layer.build(x.shape)
    k, b = layer.kernel.numpy(), layer.bias.numpy()
    np.testing.assert_allclose(layer(x), x @ k + b, rtol=1e-6, atol=1e-6)  # lora_b starts at zero
    lora_b = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    layer.lora_b.assign(lora_b)
    expected = x @ k + b + 3.0 * (x @ layer.lora_a.numpy()) @ lora_b  # scale = 6 / 2
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer(np.ones((2, 3, 7), np.float32)).shape == (2, 3, 4)  # leading batch dims


def test_fit_trains_the_adapter_only():
    model, layer = _model()
    kernel = layer.kernel.numpy()
    x, y = _data()
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=20, batch_size=64, verbose=0)
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)  # frozen
    assert np.any(layer.lora_b.numpy() != 0)
    assert model.evaluate(x, y, verbose=0) < 0.8 * before
    assert {w.name for w in layer.trainable_weights} == {"bias", "lora_a", "lora_b"}


def test_merge_and_unmerge_in_place():
    model, layer = _model()
    x, y = _data()
    model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    kernel = layer.kernel.numpy()
    before = model.predict(x, verbose=0)
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(model.predict(x, verbose=0), before, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        layer.kernel.numpy(), kernel + layer.scale * layer.lora_a.numpy() @ layer.lora_b.numpy(), atol=1e-6
    )
    layer.unmerge()
    np.testing.assert_allclose(layer.kernel.numpy(), kernel, atol=1e-6)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, rtol=1e-5, atol=1e-5)


def test_dropout_only_while_training():
    layer = tf_lora.layers.LoraDense(4, rank=2, lora_dropout=0.5)
    x = np.ones((8, 5), np.float32)
    layer.build(x.shape)
    layer.lora_b.assign(np.ones((2, 4), np.float32))
    np.testing.assert_array_equal(layer(x, training=False), layer(x, training=False))
    assert not np.allclose(layer(x, training=True), layer(x, training=False))


def test_keras_save_load_round_trip(tmp_path):
    model, layer = _model(use_rslora=True)
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    restored = loaded.get_layer("lora")
    assert (restored.rank, restored.alpha, restored.use_rslora) == (2, 4.0, True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        tf_lora.layers.LoraDense(3, rank=0)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        tf_lora.layers.LoraDense(3, lora_dropout=1.0)


@pytest.mark.parametrize("merged", [False, True])
def test_saved_model_export_and_load(tmp_path, merged):
    model, layer = _model()
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    if merged:
        layer.merge()
    expected = model.predict(x, verbose=0)
    model.export(tmp_path / "exported", verbose=False)  # Keras's serving export
    served = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), expected, rtol=1e-5, atol=1e-5)

    module = tf.Module()
    module.model = model
    module.f = tf.function(lambda v: model(v), input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(loaded.f(tf.constant(x)).numpy(), expected, rtol=1e-5, atol=1e-5)
