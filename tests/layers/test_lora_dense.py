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
    assert {w.name for w in layer.trainable_weights} == {"lora_a", "lora_b"}  # the bias frozen, as PEFT's


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


def _named_layer():
    """A built LoraDense with adapters default (rank 2), sql (rank 3, rsLoRA) and chat (rank 1), each with
    random B, and the numpy output of each on x."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 6)).astype(np.float32)
    layer = tf_lora.layers.LoraDense(4, rank=2, alpha=4, name="lora")
    layer(x)
    layer.add_adapter("sql", rank=3, alpha=6, use_rslora=True)
    layer.add_adapter("chat", rank=1)
    base = x @ layer.kernel.numpy() + layer.bias.numpy()
    expected = {}
    for name, scale in (("default", 2.0), ("sql", 6 / np.sqrt(3)), ("chat", 4.0)):
        slot = layer._slots[name]
        slot.b.assign(rng.standard_normal(slot.b.shape).astype(np.float32))
        expected[name] = base + scale * (x @ slot.a.numpy()) @ slot.b.numpy()
    return layer, x, base, expected


def test_named_adapters_switch_inside_traced_functions():
    layer, x, base, expected = _named_layer()
    assert layer.adapter_names == ["default", "sql", "chat"]
    assert layer.active_adapter == "default"
    traced = tf.function(lambda v: layer(v))
    np.testing.assert_allclose(traced(x), expected["default"], rtol=1e-5, atol=1e-5)
    for name in ("sql", "chat", None):
        layer.set_active_adapter(name)
        assert layer.active_adapter == name
        np.testing.assert_allclose(traced(x), expected[name] if name else base, rtol=1e-5, atol=1e-5)
    layer.set_active_adapter("sql")
    assert {w.name for w in layer.trainable_weights} == {"lora_a_sql", "lora_b_sql"}


def test_per_example_adapter_ids_match_numpy_per_row():
    layer, x, base, expected = _named_layer()
    names = [None, "default", "sql", "chat"]
    ids = np.array([2, 0, -1, 1, 2, 2, -1])
    out = layer(x, adapter_ids=ids).numpy()
    for row, i in enumerate(ids):
        want = expected[names[i + 1]] if i >= 0 else base
        np.testing.assert_allclose(out[row], want[row], rtol=1e-5, atol=1e-5)
    # Leading batch dimensions: ids [2, 3] for x [2, 3, in].
    out3 = layer(x[:6].reshape(2, 3, 6), adapter_ids=ids[:6].reshape(2, 3)).numpy()
    np.testing.assert_allclose(out3.reshape(6, 4), out[:6], rtol=1e-6, atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="adapter"):
        layer(x, adapter_ids=[0, 1, 2, 3, 0, 0, 0])  # 3 adapters: id 3 is out of range


def test_merge_of_a_named_adapter_and_what_a_merged_layer_refuses():
    layer, x, base, expected = _named_layer()
    kernel = layer.kernel.numpy()
    layer.set_active_adapter("sql")
    layer.merge()
    np.testing.assert_allclose(layer(x), expected["sql"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'sql' is merged; unmerge"):
        layer.set_active_adapter("chat")
    with pytest.raises(ValueError, match="'sql' is merged; unmerge"):
        layer.delete_adapter("sql")
    with pytest.raises(tf.errors.InvalidArgumentError, match="unmerge\\(\\) before serving per-example"):
        layer(x, adapter_ids=[0] * 7)
    layer.unmerge()
    np.testing.assert_allclose(layer.kernel.numpy(), kernel, atol=1e-6)
    layer.set_active_adapter("chat")
    np.testing.assert_allclose(layer(x), expected["chat"], rtol=1e-5, atol=1e-5)


def test_delete_adapter_shifts_ids_and_keeps_the_active_one():
    layer, x, base, expected = _named_layer()
    layer.set_active_adapter("chat")
    layer.delete_adapter("sql")
    assert layer.adapter_names == ["default", "chat"]
    assert layer.active_adapter == "chat"
    assert "lora_a_sql" not in {w.name for w in layer.weights}
    np.testing.assert_allclose(layer(x), expected["chat"], rtol=1e-5, atol=1e-5)
    layer.delete_adapter("chat")
    assert layer.active_adapter is None
    np.testing.assert_allclose(layer(x), base, rtol=1e-5, atol=1e-5)


def test_named_adapters_bad_names():
    layer, *_ = _named_layer()
    with pytest.raises(ValueError, match="'sql' exists already"):
        layer.add_adapter("sql")
    with pytest.raises(ValueError, match="letters, digits or _"):
        layer.add_adapter("a/b")
    with pytest.raises(ValueError, match=r"no adapter 'nope' \(adapters: \['default', 'sql', 'chat'\]\)"):
        layer.set_active_adapter("nope")
    with pytest.raises(ValueError, match="default adapter cannot be deleted"):
        layer.delete_adapter("default")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        layer.add_adapter("zero", rank=0)


def _multi_adapter_model():
    """A functional model whose LoraDense takes per-example adapter ids as a second input."""
    keras.utils.set_random_seed(3)
    x_in, ids_in = keras.Input((6,)), keras.Input((), dtype="int32")
    lora = tf_lora.layers.LoraDense(
        5, rank=2, alpha=4, name="lora", adapters=[{"name": "b", "rank": 3, "alpha": 3}]
    )
    hidden = lora(x_in, adapter_ids=ids_in)
    return keras.Model([x_in, ids_in], keras.layers.Dense(1, name="head")(hidden)), lora


def test_fit_trains_the_active_adapter_only_and_keras_round_trip(tmp_path):
    model, layer = _multi_adapter_model()
    layer.set_active_adapter("b")
    model.get_layer("head").trainable = False
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    x, y = _data()
    ids = np.ones(len(x), np.int32)  # every example through adapter b
    before = {w.name: w.numpy() for w in layer.weights}
    start = model.evaluate([x, ids], y, verbose=0)
    model.fit([x, ids], y, epochs=10, batch_size=64, verbose=0)
    assert model.evaluate([x, ids], y, verbose=0) < 0.8 * start
    for w in layer.weights:
        changed = not np.array_equal(w.numpy(), before[w.name])
        assert changed == (w.name in {"lora_a_b", "lora_b_b"}), w.name

    mixed = np.random.default_rng(0).integers(-1, 2, len(x)).astype(np.int32)
    expected = model.predict([x, mixed], verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    restored = loaded.get_layer("lora")
    assert restored.adapter_names == ["default", "b"]
    assert restored.active_adapter == "b"
    assert {w.name for w in restored.trainable_weights} == {"lora_a_b", "lora_b_b"}
    np.testing.assert_array_equal(loaded.predict([x, mixed], verbose=0), expected)


def test_multi_adapter_model_exports_per_example_serving(tmp_path):
    model, layer = _multi_adapter_model()
    for slot in layer._slots.values():
        slot.b.assign(np.random.default_rng(1).standard_normal(slot.b.shape).astype(np.float32))
    x, _ = _data(16)
    ids = np.array([-1, 0, 1, 1] * 4, np.int32)
    expected = model.predict([x, ids], verbose=0)
    base_only = model.predict([x, np.full_like(ids, -1)], verbose=0)
    np.testing.assert_array_equal(expected[ids == -1], base_only[ids == -1])
    assert np.all(np.abs(expected[ids >= 0] - base_only[ids >= 0]) > 1e-4)  # the adapters act
    model.export(tmp_path / "exported", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(
        served.serve([tf.constant(x), tf.constant(ids)]).numpy(), expected, rtol=1e-5, atol=1e-5
    )


def test_bias_is_frozen_unless_asked_and_stays_so_across_keras_round_trips(tmp_path):
    # A LoraDense built directly (or reloaded from .keras) used to train its bias: a resumed fit then had
    # another trainable set, and Keras skipped the saved optimizer state.
    for train_bias, trainable in ((False, {"lora_a", "lora_b"}), (True, {"bias", "lora_a", "lora_b"})):
        model, layer = _model(train_bias=train_bias)
        bias = layer.bias.numpy()
        x, y = _data()
        model.fit(x, y, epochs=2, batch_size=64, verbose=0)
        assert {w.name for w in layer.trainable_weights} == trainable
        assert np.array_equal(layer.bias.numpy(), bias) == (not train_bias)
        model.save(tmp_path / "m.keras")
        loaded = keras.models.load_model(tmp_path / "m.keras")
        assert [w.path for w in loaded.trainable_weights] == [w.path for w in model.trainable_weights]


def test_resumed_fit_restores_the_optimizer_state(tmp_path):
    model, _ = _model()
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    saved = [v.numpy() for v in model.optimizer.variables]
    restored = [v.numpy() for v in loaded.optimizer.variables]
    assert len(restored) == len(saved) and int(loaded.optimizer.iterations) == int(model.optimizer.iterations)
    for a, b in zip(restored, saved, strict=True):
        np.testing.assert_array_equal(a, b)
    # The next steps continue the same run: the same weights as the model that was never saved.
    model.fit(x, y, epochs=1, batch_size=64, shuffle=False, verbose=0)
    loaded.fit(x, y, epochs=1, batch_size=64, shuffle=False, verbose=0)
    for a, b in zip(loaded.trainable_weights, model.trainable_weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_an_adapter_added_after_tracing_is_never_silently_skipped():
    # model.predict once, then add_adapter + set_active_adapter: the second predict ran the old trace and
    # applied "default" (differing by 42.8 from the eager call). Now the old trace refuses, and a new one
    # (compile resets Keras's functions) applies the new adapter.
    model, layer = _model()
    x, _ = _data(16)
    layer.lora_b.assign(np.full((2, 5), 0.3, np.float32))
    model.predict(x, verbose=0)
    layer.add_adapter("b")
    layer.set_adapter(
        np.full((6, 2), 0.5, np.float32), np.full((2, 5), -0.4, np.float32), alpha=4, adapter_name="b"
    )
    layer.set_active_adapter("b")
    eager = model(x).numpy()
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="adapters changed after this function was traced"
    ):
        model.predict(x, verbose=0)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    np.testing.assert_allclose(model.predict(x, verbose=0), eager, rtol=1e-5, atol=1e-5)
    # A switch among the adapters a trace knows reaches it without a new trace.
    layer.set_active_adapter("default")
    np.testing.assert_allclose(model.predict(x, verbose=0), model(x).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(model(x).numpy(), eager)
    # Deleting one is refused the same way, and so is a delete then an add (the same number of adapters,
    # another one: the old trace still held the deleted adapter's weights).
    layer.delete_adapter("b")
    with pytest.raises(tf.errors.InvalidArgumentError, match="adapters changed"):
        model.predict(x, verbose=0)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    layer.add_adapter("x")
    layer.set_active_adapter("x")
    model.predict(x, verbose=0)
    layer.delete_adapter("x")
    layer.add_adapter("y")
    layer.set_adapter(
        np.full((6, 2), 0.5, np.float32), np.full((2, 5), 0.4, np.float32), alpha=4, adapter_name="y"
    )
    layer.set_active_adapter("y")
    with pytest.raises(tf.errors.InvalidArgumentError, match="adapters changed"):
        model.predict(x, verbose=0)


def test_keras_lora_argument_names():
    # LoraDense(8, rank=4, lora_rank=2) failed at build with "ValueError: None".
    layer = tf_lora.layers.LoraDense(8, lora_rank=2)
    layer.build((None, 5))
    assert (layer.rank, layer.alpha, layer.scale) == (2, 2.0, 1.0)  # Keras's alpha defaults to the rank
    assert not layer.lora_enabled  # Keras's own LoRA path stays off: one adapter, tf_lora's
    layer = tf_lora.layers.LoraDense(8, lora_rank=4, lora_alpha=8)
    assert (layer.rank, layer.alpha) == (4, 8.0)
    assert tf_lora.layers.LoraDense(8, rank=4, lora_rank=4).rank == 4
    with pytest.raises(ValueError, match="rank=4 and Keras's lora_rank=2 disagree"):
        tf_lora.layers.LoraDense(8, rank=4, lora_rank=2)
    with pytest.raises(ValueError, match="alpha=3 and Keras's lora_alpha=2 disagree"):
        tf_lora.layers.LoraDense(8, alpha=3, lora_alpha=2)


def test_a_model_with_keras_lora_converts_keeping_its_adapter():
    keras.utils.set_random_seed(3)
    inp = keras.Input((6,))
    out = keras.layers.Dense(4, name="proj")(inp)
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(out))
    model.get_layer("proj").enable_lora(3, lora_alpha=6)
    proj = model.get_layer("proj")
    proj.lora_kernel_b.assign(np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32))
    x = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)
    converted, adapted = tf_lora.inject_lora(model, rank=8, alpha=16, target="proj")
    layer = converted.get_layer("proj")
    assert adapted == ["proj"] and (layer.rank, layer.alpha) == (3, 6.0)
    np.testing.assert_array_equal(layer.kernel.numpy(), proj._kernel.numpy())
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-5, atol=1e-5)
    # The reference: Keras's Dense without LoRA, on the merged kernel it reports.
    merged = proj.kernel.numpy()
    np.testing.assert_allclose(layer(x), x @ merged + proj.bias.numpy(), rtol=1e-5, atol=1e-5)


def test_a_merged_adapter_is_frozen_so_unmerge_takes_out_what_was_merged():
    # The adapter stayed trainable while merged: weight decay (or momentum) moved A and B, which no longer
    # changed the output, and unmerge() then took another update out of the kernel (0.06 off).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    model, _ = tf_lora.inject_lora(keras.Model(inputs, keras.layers.Dense(3, name="d")(inputs)), rank=2)
    layer = model.get_layer("d")
    kernel = layer.kernel.numpy()
    x = np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32)
    y = np.random.default_rng(1).standard_normal((32, 3)).astype(np.float32)
    model.compile(optimizer=keras.optimizers.AdamW(0.05, weight_decay=0.5), loss="mse")
    model.fit(x, y, epochs=3, verbose=0)
    slot = layer.adapter_slot()
    assert np.abs(slot.b.numpy()).max() > 0
    layer.merge()
    assert not {id(slot.a), id(slot.b)} & {id(v) for v in model.trainable_weights}
    model.compile(optimizer=keras.optimizers.AdamW(0.05, weight_decay=0.5), loss="mse")
    a, b = slot.a.numpy(), slot.b.numpy()
    model.fit(x, y, epochs=3, verbose=0)  # trains nothing of the adapter (only what else is trainable)
    np.testing.assert_array_equal(slot.a.numpy(), a)
    np.testing.assert_array_equal(slot.b.numpy(), b)
    layer.unmerge()
    np.testing.assert_allclose(layer.kernel.numpy(), kernel, atol=1e-6)
    assert {id(slot.a), id(slot.b)} <= {id(v) for v in model.trainable_weights}


@pytest.mark.parametrize("built", ["converted", "constructed"])
@pytest.mark.parametrize("type_check", [True, False])
def test_keras_quantization_of_a_lora_layer_is_refused_and_works_after_merge_and_unload(type_check, built):
    # model.quantize("int8") only warned (type_check) or quantized the kernel and ran the layer as a plain
    # int8 Dense (type_check=False): the adapter was dropped without a word.
    keras.utils.set_random_seed(0)
    if built == "converted":
        model, _ = tf_lora.inject_lora(
            keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="d")]), rank=2
        )
    else:
        model = keras.Sequential([keras.Input((16,)), tf_lora.layers.LoraDense(8, rank=2, name="d")])
    slot = model.get_layer("d").adapter_slot()
    slot.b.assign(np.random.default_rng(1).standard_normal(slot.b.shape).astype(np.float32))
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    expected = model(x).numpy()
    with pytest.raises(ValueError, match="quantizing \\(int8\\) a LoRA layer would drop its adapters"):
        model.quantize("int8", type_check=type_check)
    np.testing.assert_array_equal(model(x).numpy(), expected)  # nothing changed
    plain = tf_lora.merge_and_unload(model)
    plain.quantize("int8", type_check=type_check)
    assert plain.get_layer("d").quantization_mode == "int8"
    np.testing.assert_allclose(plain(x).numpy(), expected, atol=0.05 * np.abs(expected).max())


def test_unmerge_gives_back_what_was_trainable_before_the_merge():
    # merge() freezes the adapter; unmerge() made both A and B trainable again, so a hand-frozen A (LoRA-FA
    # trains B alone) started training after a merge and unmerge.
    inputs = keras.Input((6,))
    model, _ = tf_lora.inject_lora(keras.Model(inputs, keras.layers.Dense(3, name="d")(inputs)), rank=2)
    layer = model.get_layer("d")
    slot = layer.adapter_slot()
    slot.a.trainable = False  # LoRA-FA
    layer.merge()
    assert not slot.a.trainable and not slot.b.trainable
    layer.unmerge()
    assert not slot.a.trainable and slot.b.trainable
    assert [v.name for v in layer.trainable_weights] == ["lora_b"]
