"""tf_lora.layers.SparseEmbedding: combiners against numpy, training inside model.fit, .keras round trip."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora


def _click_data(seed=0, n=20_000, ids=2_000, slots=3):
    """Clicks whose log-odds are the sum of hidden per-id weights: learnable only through the embedding."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal(ids) * 2
    x = rng.integers(0, ids, (n, slots)).astype(np.int64)
    y = (rng.random(n) < 1 / (1 + np.exp(-weights[x].sum(1)))).astype(np.float32)
    return x, y


def _click_model():
    keras.utils.set_random_seed(0)  # the dense layers' initial weights
    inp = keras.Input((3,), dtype="int64")
    emb = tf_lora.layers.SparseEmbedding(8, combiner="sum", optimizer=tf_lora.sparse_optimizers.Adagrad(0.1))
    hidden = keras.layers.Dense(16, activation="relu")(emb(inp))
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(hidden))
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
    )
    return model, emb


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_model_fit_trains_the_table(run_eagerly):
    x, y = _click_data()
    model, emb = _click_model()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
        run_eagerly=run_eagerly,
    )
    history = model.fit(x[:16_000], y[:16_000], batch_size=256, epochs=5, verbose=0)
    assert int(emb.table.export()["step"]) == 5 * 63  # every batch pushed once
    assert not np.any(emb.pulled_rows.numpy())  # the view of the rows stays zero: the table holds them
    _, auc = model.evaluate(x[16_000:], y[16_000:], verbose=0)
    print("held-out AUC", auc, history.history["auc"])
    # A constant model scores 0.5; the hidden per-id weights allow about 0.9.
    assert auc > 0.8, (auc, history.history)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_ragged_combiners_match_numpy(combiner):
    layer = tf_lora.layers.SparseEmbedding(4, combiner=combiner)
    rows = [[1, 2, 3], [4], [], [2, 2]]
    layer.table.pull(np.arange(5), training=True)
    table = layer.table.pull(np.arange(5)).numpy().astype(np.float64)
    out = layer(tf.ragged.constant(rows, dtype=tf.int64)).numpy()
    for got, ids in zip(out, rows, strict=True):
        total = table[ids].sum(0) if ids else np.zeros(4)
        n = len(ids)
        expected = {"sum": total, "mean": total / max(n, 1), "sqrtn": total / max(np.sqrt(n), 1)}[combiner]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_dense_ids_and_inference_inserts_nothing():
    layer = tf_lora.layers.SparseEmbedding(3)
    assert layer(tf.constant([[1, 2], [3, 4]], tf.int64)).shape == (2, 2, 3)
    assert int(layer.table.size()) == 0  # inference: unknown ids read zeros, nothing inserted
    layer(tf.constant([[1, 2]], tf.int64), training=True)
    assert int(layer.table.size()) == 2


def test_keras_save_and_load_round_trip(tmp_path):
    x, y = _click_data(n=2_000)
    model, emb = _click_model()
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x[:500], verbose=0), model.predict(x[:500], verbose=0))
    layer = next(layer for layer in loaded.layers if isinstance(layer, tf_lora.layers.SparseEmbedding))
    assert int(layer.table.size()) == int(emb.table.size())
    assert isinstance(layer.table.optimizer, tf_lora.sparse_optimizers.Adagrad)


def test_bad_input():
    with pytest.raises(ValueError, match="combiner must be one of"):
        tf_lora.layers.SparseEmbedding(3, combiner="max")
    with pytest.raises(ValueError, match="ragged and sparse ids need a combiner"):
        tf_lora.layers.SparseEmbedding(3)(tf.ragged.constant([[1], [2, 3]], dtype=tf.int64))
    with pytest.raises(TypeError, match="ids must be integers, got float32"):
        tf_lora.layers.SparseEmbedding(3)(tf.constant([[1.0]]))


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_dense_ids_of_any_rank_combine_over_their_last_axis(combiner):
    # One-dimensional ids (a user-id input) were combined over the batch: every example got the same row.
    layer = tf_lora.layers.SparseEmbedding(3, combiner=combiner)
    rows = layer.table.pull(np.arange(30), training=True).numpy()
    one = np.array([4, 9, 4, 17])
    np.testing.assert_array_equal(layer(tf.constant(one)).numpy(), rows[one])
    assert layer.compute_output_shape((None,)) == (None, 3)
    three = np.arange(24).reshape(2, 3, 4)
    norm = {"sum": 1.0, "mean": 4.0, "sqrtn": 2.0}[combiner]
    got = layer(tf.constant(three)).numpy()
    np.testing.assert_allclose(got, rows[three].sum(axis=2) / norm, rtol=1e-6)
    assert got.shape == layer.compute_output_shape((2, 3, 4)) == (2, 3, 3)
    inputs = keras.Input((), dtype="int64")  # in a functional model: one row per example
    model = keras.Model(inputs, layer(inputs))
    assert model.output.shape == (None, 3)
    np.testing.assert_array_equal(model.predict(one, verbose=0), rows[one])


def test_ids_and_weights_of_other_structures_are_refused():
    layer = tf_lora.layers.SparseEmbedding(3, combiner="mean")
    ids = tf.ragged.constant([[1, 2], [3]], dtype=tf.int64)
    with pytest.raises(ValueError, match=r"ragged ids must be \[batch, None\] \(ragged_rank 1\)"):
        layer(tf.ragged.constant([[[1], [2, 3]], [[4]]], dtype=tf.int64))
    with pytest.raises(ValueError, match=r"sparse ids must be \[batch, k\] \(rank 2\)"):
        layer(tf.sparse.from_dense(tf.constant([[[1, 2]], [[3, 0]]], tf.int64)))
    with pytest.raises(ValueError, match="weights must be ragged like the ids"):
        layer(ids, weights=tf.constant([[1.0, 2.0], [3.0, 4.0]]))
    # Same number of values, other rows: used without a word before.
    with pytest.raises(tf.errors.InvalidArgumentError, match="weights must have the ids' structure"):
        layer(ids, weights=tf.ragged.constant([[1.0], [2.0, 3.0]]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="weights must have the ids' structure"):
        layer(ids, weights=tf.ragged.constant([[1.0, 2.0], [3.0, 4.0]]))
    sparse = tf.sparse.from_dense(tf.constant([[1, 2], [3, 0]], tf.int64))
    other = tf.sparse.from_dense(tf.constant([[1.0, 0.0], [3.0, 4.0]]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="weights must have the ids' structure"):
        layer(sparse, weights=other)
    weights = tf.ragged.constant([[1.0, 3.0], [2.0]])
    rows = layer.table.pull([1, 2, 3]).numpy()
    np.testing.assert_allclose(
        layer(ids, weights=weights).numpy(), [(rows[0] + 3 * rows[1]) / 4, rows[2]], rtol=1e-6
    )
    with pytest.raises(TypeError, match="dim must be an integer, got 2.5"):
        tf_lora.layers.SparseEmbedding(2.5)


def test_every_layer_starts_its_ids_with_rows_of_its_own():
    # All layers had seed 0 by default: a user and an item tower started every id with the same row.
    keras.utils.set_random_seed(3)
    first, second = tf_lora.layers.SparseEmbedding(4), tf_lora.layers.SparseEmbedding(4)
    ids = [1, 2, 3]

    def rows(layer):  # as a training call inserts them
        return layer.table.pull(ids, training=True).numpy()

    assert np.abs(rows(first)).max() > 0.01 and not np.allclose(rows(first), rows(second))
    keras.utils.set_random_seed(3)  # and reproducibly so
    np.testing.assert_array_equal(rows(tf_lora.layers.SparseEmbedding(4)), rows(first))
    restored = tf_lora.layers.SparseEmbedding.from_config(first.get_config())
    np.testing.assert_array_equal(rows(restored), rows(first))
