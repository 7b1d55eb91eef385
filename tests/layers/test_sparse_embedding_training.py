"""SparseEmbedding under real Keras training: its table must move exactly as a dense keras.layers.Embedding
moves under the same optimizer (the reference), and only when the optimizer applies a step."""

import pathlib
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora

IDS, DIM, SLOTS = 40, 4, 3


def _data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, IDS, (n, SLOTS)).astype(np.int64)
    y = (x % 3 == 0).sum(1, keepdims=True).astype(np.float32)
    return x, y


def _models(optimizer, table_optimizer=None, max_ids_per_step=65536, **compile_args):
    """The same model twice: over a SparseEmbedding (table SGD(0.1) unless given) and over a dense Embedding
    (the model optimizer's rule); zero initial rows, the same head."""
    inp = keras.Input((SLOTS,), dtype="int64")
    emb = tf_lora.layers.SparseEmbedding(
        DIM,
        combiner="sum",
        initializer=tf_lora.sparse_initializers.Zeros(),
        optimizer=table_optimizer or tf_lora.sparse_optimizers.SGD(0.1),
        max_ids_per_step=max_ids_per_step,
    )
    head = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(0.5), bias_initializer="ones")
    sparse = keras.Model(inp, head(emb(inp)))
    inp2 = keras.Input((SLOTS,), dtype="int64")
    dense_emb = keras.layers.Embedding(IDS, DIM, embeddings_initializer="zeros")
    head2 = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.Constant(0.5), bias_initializer="ones"
    )
    dense = keras.Model(inp2, head2(keras.ops.sum(dense_emb(inp2), axis=1)))
    sparse.compile(optimizer=optimizer(), loss="mse", **compile_args)
    dense.compile(optimizer=optimizer(), loss="mse", **compile_args)
    return sparse, emb, dense, dense_emb


def _rows(emb):
    return emb.table.pull(np.arange(IDS)).numpy()


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _fit_both(optimizer, rtol=1e-5, **compile_args):
    sparse, emb, dense, dense_emb = _models(optimizer, **compile_args)
    x, y = _data()
    sparse.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    dense.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    want = dense_emb.embeddings.numpy()
    assert np.abs(want).max() > 0.01  # the reference did train
    np.testing.assert_allclose(_rows(emb), want, rtol=rtol, atol=rtol * np.abs(want).max())
    return emb


def test_the_table_moves_as_a_dense_embedding_does():
    _fit_both(lambda: keras.optimizers.SGD(0.1))


def test_mixed_precision_pushes_the_unscaled_gradient(mixed_precision):
    # The loss-scaled gradient used to reach the table: max |row| 0.18 in float32, 193-243 in mixed_float16.
    emb = _fit_both(lambda: keras.optimizers.SGD(0.1), rtol=2e-2)
    assert np.abs(_rows(emb)).max() < 10


@pytest.mark.parametrize("clip", [{"clipnorm": 0.05}, {"global_clipnorm": 0.05}, {"clipvalue": 0.01}])
def test_clipping_reaches_the_table(clip):
    clipped = _rows(_fit_both(lambda: keras.optimizers.SGD(0.1, **clip)))
    unclipped = _rows(_fit_both(lambda: keras.optimizers.SGD(0.1)))
    assert np.abs(clipped - unclipped).max() > 0.01  # the clipping was active


def test_steps_per_execution_pushes_once_per_step():
    emb = _fit_both(lambda: keras.optimizers.SGD(0.1), steps_per_execution=4)
    assert int(emb.table.export()["step"]) == 2 * 256 // 32


def _custom_step_model():
    sparse, emb, _, _ = _models(lambda: keras.optimizers.SGD(0.1))
    return sparse, emb


def test_computing_a_gradient_changes_nothing():
    # The push ran inside the gradient: a saliency map (a gradient w.r.t. the input embedding only), or two
    # tape.gradient calls on a persistent tape, changed the table.
    model, emb = _custom_step_model()
    x, y = _data(32)
    emb.table.pull(np.arange(IDS), training=True)
    before = _rows(emb)
    with tf.GradientTape(persistent=True) as tape:
        loss = keras.ops.mean((model(x, training=True) - y) ** 2)
    tape.gradient(loss, model.trainable_weights)
    tape.gradient(loss, model.trainable_weights)
    np.testing.assert_array_equal(_rows(emb), before)
    # Applying is what moves it, once.
    grads = tape.gradient(loss, model.trainable_weights)
    model.optimizer.apply(grads, model.trainable_weights)
    after = _rows(emb)
    assert not np.array_equal(after, before)
    np.testing.assert_array_equal(_rows(emb), after)
    assert int(emb.table.export()["step"]) == 1


@pytest.mark.parametrize("compiled", [False, True])
def test_a_skipped_non_finite_step_leaves_the_table_alone(compiled, mixed_precision):
    model, emb = _custom_step_model()  # LossScaleOptimizer under mixed_float16
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = _data(32)
    emb.table.pull(np.arange(IDS), training=True)
    before = _rows(emb)

    def step(scale):
        with tf.GradientTape() as tape:
            loss = keras.ops.mean((model(x, training=True) - y) ** 2) * scale
            scaled = model.optimizer.scale_loss(loss)
        model.optimizer.apply(tape.gradient(scaled, model.trainable_weights), model.trainable_weights)

    step = tf.function(step) if compiled else step
    step(tf.constant(np.inf, "float16"))
    np.testing.assert_array_equal(_rows(emb), before)
    step(tf.constant(1.0, "float16"))
    assert not np.array_equal(_rows(emb), before)


def test_keras_optimizers_and_initializers_as_the_table_s():
    # A Keras optimizer used to fail with "'Adagrad' object has no attribute 'attrs'".
    x, y = _data()
    results = []
    for table_optimizer in (
        tf_lora.sparse_optimizers.Adagrad(0.1, epsilon=1e-6),
        keras.optimizers.Adagrad(0.1, epsilon=1e-6),
    ):
        sparse, emb, _, _ = _models(lambda: keras.optimizers.SGD(0.1), table_optimizer=table_optimizer)
        sparse.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        results.append(_rows(emb))
    np.testing.assert_array_equal(results[0], results[1])
    layer = tf_lora.layers.SparseEmbedding(
        DIM,
        initializer=keras.initializers.RandomUniform(-0.1, 0.2, seed=4),
        optimizer=keras.optimizers.Adam(0.01),
    )
    assert layer.initializer == tf_lora.sparse_initializers.RandomUniform(-0.1, 0.2, seed=4)
    assert isinstance(layer.table_optimizer, tf_lora.sparse_optimizers.Adam)
    assert layer.table_optimizer.learning_rate == pytest.approx(0.01)  # Keras keeps it in float32
    with pytest.raises(ValueError, match="has no momentum"):
        tf_lora.layers.SparseEmbedding(DIM, optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    with pytest.raises(TypeError, match="tf_lora.sparse_optimizers object .* got RMSprop"):
        tf_lora.layers.SparseEmbedding(DIM, optimizer=keras.optimizers.RMSprop())
    with pytest.raises(TypeError, match="tf_lora.sparse_initializers object .* got GlorotUniform"):
        tf_lora.layers.SparseEmbedding(DIM, initializer=keras.initializers.GlorotUniform())


def test_a_learning_rate_schedule_is_followed_at_the_model_s_step():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([3], [0.1, 0.0])
    sparse, emb, _, _ = _models(
        lambda: keras.optimizers.SGD(0.1), table_optimizer=keras.optimizers.SGD(schedule)
    )
    x, y = _data(32 * 6)
    sparse.fit(x[: 32 * 4], y[: 32 * 4], batch_size=32, epochs=1, shuffle=False, verbose=0)  # steps 0-3
    after_four = _rows(emb)
    sparse.fit(x[32 * 4 :], y[32 * 4 :], batch_size=32, epochs=1, shuffle=False, verbose=0)  # rate 0 now
    np.testing.assert_array_equal(_rows(emb), after_four)
    assert np.abs(after_four).max() > 0


@pytest.mark.parametrize("bad", ["0.1", -1.0, float("nan"), None])
def test_bad_learning_rates_are_refused(bad):
    error = TypeError if isinstance(bad, str | type(None)) else ValueError
    with pytest.raises(error, match="learning_rate must be"):
        tf_lora.sparse_optimizers.SGD(bad)
    if bad is not None and not isinstance(bad, str):
        with pytest.raises(ValueError, match="learning_rate must be finite and in"):
            tf_lora.layers.SparseEmbedding(DIM, optimizer=keras.optimizers.Adagrad(learning_rate=bad))


def test_a_non_finite_gradient_is_refused_and_the_table_left_whole():
    table = tf_lora.SparseTable(2, optimizer=tf_lora.sparse_optimizers.Adagrad(0.1))
    table.push([1, 2], [[1.0, 1.0], [1.0, 1.0]])
    before = table.export()
    with pytest.raises(tf.errors.InvalidArgumentError, match="grads must be finite; the gradient of id 2"):
        table.push([1, 2], [[1.0, 1.0], [np.nan, 1.0]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="learning_rate must be finite and >= 0"):
        table.push([1], [[1.0, 1.0]], learning_rate=-0.5)
    after = table.export()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_gradient_accumulation_reaches_the_table():
    # Between applied steps the view's rows are not reused: each micro-batch's ids get rows of their own,
    # Keras accumulates the view's gradient like any variable's, and the applied step pushes the average.
    emb = _fit_both(lambda: keras.optimizers.SGD(0.1, gradient_accumulation_steps=4))
    assert int(emb.table.export()["step"]) == 2 * 256 // 32 // 4


def test_a_schedule_under_gradient_accumulation_is_taken_where_keras_takes_it():
    # Keras takes a schedule at its count of apply calls, which accumulation counts per micro-batch; the
    # table took it at `iterations` (applied steps), so its rate decayed twice as late as the dense rows'.
    def schedule():
        return keras.optimizers.schedules.PiecewiseConstantDecay([6], [0.1, 0.02])

    sparse, emb, dense, dense_emb = _models(
        lambda: keras.optimizers.SGD(schedule(), gradient_accumulation_steps=2),
        table_optimizer=keras.optimizers.SGD(schedule()),
    )
    x, y = _data()
    sparse.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    dense.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    want = dense_emb.embeddings.numpy()
    np.testing.assert_allclose(_rows(emb), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_tensor_ids_match_safe_embedding_lookup_sparse(combiner, weighted):
    layer = tf_lora.layers.SparseEmbedding(DIM, combiner=combiner)
    layer.table.pull(np.arange(10), training=True)
    table = tf.constant(layer.table.pull(np.arange(10)))
    ids = tf.sparse.from_dense(tf.constant([[1, 2, 0], [4, 0, 0], [0, 0, 0], [2, 2, 7]], tf.int64))
    # Positive weights: tf.nn.safe_embedding_lookup_sparse drops the others.
    weights = tf.SparseTensor(ids.indices, tf.constant([0.5, 2.0, 1.0, 1.5, 0.25, 3.0]), ids.dense_shape)
    got = layer(ids, weights=weights if weighted else None)
    want = tf.nn.safe_embedding_lookup_sparse(table, ids, weights if weighted else None, combiner=combiner)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)
    ragged = tf.RaggedTensor.from_sparse(ids)
    ragged_weights = tf.RaggedTensor.from_sparse(weights) if weighted else None
    np.testing.assert_allclose(
        layer(ragged, weights=ragged_weights).numpy(), want.numpy(), rtol=1e-6, atol=1e-6
    )


# A fresh process with two logical CPUs and this module as `t`, for MirroredStrategy over two replicas.
_TWO_REPLICAS = f"""
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
import test_sparse_embedding_training as t
"""


def test_mirrored_strategy_counts_every_replica_s_gradient_once(run_python, tmp_path):
    # Two replicas (two logical CPUs, in a fresh process): the table must move as a dense Embedding does
    # under the same strategy, whose replicas' gradients Keras sums once.
    out = run_python(
        _TWO_REPLICAS
        + f"""
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    sparse, emb, dense, dense_emb = t._models(lambda: keras.optimizers.SGD(0.1, global_clipnorm=0.5))
x, y = t._data()
sparse.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
dense.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
want = dense_emb.embeddings.numpy()
print(np.abs(want).max() > 0.01, np.abs(t._rows(emb) - want).max() <= 1e-5 * np.abs(want).max() + 1e-7)
print(int(emb.table.export()["step"]))
# Checkpoints and SavedModels of a model trained under the strategy (the step's bookkeeping is not state).
tf.train.Checkpoint(model=sparse).save({str(tmp_path / "ckpt")!r})
tf.saved_model.save(sparse, {str(tmp_path / "sm")!r})
""",
        timeout=300,
    )
    assert out.split() == ["True", "True", str(2 * 256 // 32)], out


def test_mirrored_strategy_with_a_loss_scaler_trains_and_skips_as_a_dense_embedding(run_python):
    # Mixed precision on several devices: the loss scaler's skipping branch runs in cross-replica context,
    # where starting the list over (an assignment to a variable of no aggregation) failed the trace.
    out = run_python(
        _TWO_REPLICAS
        + """
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    sparse, emb, dense, dense_emb = t._models(
        lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    )
x, y = t._data()
y[3] = np.nan  # the batch holding it is skipped, by both models
for model in (sparse, dense):
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
want = dense_emb.embeddings.numpy()
print(np.abs(want).max() > 0.01, np.abs(t._rows(emb) - want).max() <= 1e-5 * np.abs(want).max() + 1e-7)
print(int(emb.table.export()["step"]))
""",
        timeout=300,
    )
    assert out.split() == ["True", "True", str(2 * (256 // 32 - 1))], out


def test_skipped_steps_do_not_fill_the_list_of_ids(mixed_precision):
    # Each step's ids were kept until an applied step: with room for one step's ids, a step the loss
    # scaler skipped left the list full and every later training call failed.
    x, y = _data(32)
    sparse, emb, _, _ = _models(lambda: keras.optimizers.SGD(0.1))
    emb_small = tf_lora.layers.SparseEmbedding(DIM, combiner="sum", max_ids_per_step=32 * SLOTS)
    inp = keras.Input((SLOTS,), dtype="int64")
    model = keras.Model(inp, keras.layers.Dense(1)(emb_small(inp)))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    opt = model.optimizer

    @tf.function
    def step(scale):
        with tf.GradientTape() as tape:
            loss = keras.ops.mean((model(x, training=True) - y) ** 2) * scale
            scaled = opt.scale_loss(loss)
        opt.apply(tape.gradient(scaled, model.trainable_weights), model.trainable_weights)

    for _ in range(3):
        step(tf.constant(np.inf, "float16"))  # skipped
    before = emb_small.table.pull(np.arange(IDS)).numpy()
    step(tf.constant(1.0, "float16"))
    assert not np.array_equal(emb_small.table.pull(np.arange(IDS)).numpy(), before)
    assert int(emb_small.table.export()["step"]) == 1


def test_a_frozen_layer_trains_nothing_and_fits():
    # A frozen layer still counted its ids (no step ever applied them) and failed once the list was full.
    x, y = _data()
    sparse, emb, _, _ = _models(lambda: keras.optimizers.SGD(0.1))
    emb.trainable = False
    sparse.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    emb.table.pull(np.arange(IDS), training=True)
    before = emb.table.export()
    sparse.fit(x, y, batch_size=32, epochs=3, verbose=0)
    after = emb.table.export()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_a_gradient_applied_twice_moves_the_table_twice_as_a_dense_embedding():
    # Applying g1 and then g2 (both computed before either was applied) failed with an out-of-range
    # segment id: the first apply had cleared the ids the second needed.
    sparse, emb, dense, dense_emb = _models(lambda: keras.optimizers.SGD(0.1))
    x, y = _data(32)
    for model in (sparse, dense):
        grads = []
        for _ in range(2):
            with tf.GradientTape() as tape:
                loss = keras.ops.mean((model(x, training=True) - y) ** 2)
            grads.append(tape.gradient(loss, model.trainable_weights))
        for g in grads:
            model.optimizer.apply(g, model.trainable_weights)
    want = dense_emb.embeddings.numpy()
    np.testing.assert_allclose(_rows(emb), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_two_tables_and_a_layer_called_twice_move_as_dense_embeddings():
    inp = keras.Input((SLOTS,), dtype="int64")
    inp2 = keras.Input((SLOTS,), dtype="int64")
    zeros = tf_lora.sparse_initializers.Zeros()
    # SGD: Keras's Adagrad squares each repeat of an id separately on a dense Embedding (its IndexedSlices
    # are not summed first) where the table sums them first; SGD is linear, so both agree exactly.
    sgd = keras.optimizers.SGD(0.3)
    shared = tf_lora.layers.SparseEmbedding(DIM, combiner="sum", initializer=zeros, optimizer=sgd)
    other = tf_lora.layers.SparseEmbedding(DIM, combiner="mean", initializer=zeros, optimizer=sgd)
    ones = keras.initializers.Constant(0.5)
    head = keras.layers.Dense(1, kernel_initializer=ones, bias_initializer="ones")
    sparse = keras.Model(
        [inp, inp2], head(keras.ops.concatenate([shared(inp), shared(inp2), other(inp)], axis=1))
    )
    d_shared = keras.layers.Embedding(IDS, DIM, embeddings_initializer="zeros")
    d_other = keras.layers.Embedding(IDS, DIM, embeddings_initializer="zeros")
    head2 = keras.layers.Dense(1, kernel_initializer=ones, bias_initializer="ones")
    features = [
        keras.ops.sum(d_shared(inp), axis=1),
        keras.ops.sum(d_shared(inp2), axis=1),
        keras.ops.mean(d_other(inp), axis=1),
    ]
    dense = keras.Model([inp, inp2], head2(keras.ops.concatenate(features, axis=1)))
    for model in (sparse, dense):
        model.compile(optimizer=keras.optimizers.SGD(0.3), loss="mse")
        x, y = _data()
        x2, _ = _data(seed=1)
        model.fit([x, x2], y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    for table, reference in ((shared, d_shared), (other, d_other)):
        want = reference.embeddings.numpy()
        assert np.abs(want).max() > 0.01
        np.testing.assert_allclose(_rows(table), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_unseeded_keras_initializers_give_each_table_its_own_rows():
    a = tf_lora.layers.SparseEmbedding(DIM, initializer=keras.initializers.RandomNormal())
    b = tf_lora.layers.SparseEmbedding(DIM, initializer=keras.initializers.RandomNormal())
    assert not np.array_equal(
        a.table.pull([1, 2], training=True).numpy(), b.table.pull([1, 2], training=True).numpy()
    )
    assert tf_lora.sparse_optimizers.SGD(np.float32(0.1)).learning_rate == np.float32(
        0.1
    )  # numpy scalars too


def test_epochs_of_unknown_length_keep_the_step_s_ids_in_order():
    # Keras ends an epoch of unknown length (a filtered tf.data pipeline) on an exhausted iterator: the
    # training call fails on its ids, yet its `fresh = 0` ran (it did not depend on them), so the next epoch
    # stacked its ids on the applied step's and overran max_ids_per_step (found by a user trial).
    x, y = _data(n=64)
    # Room for one batch of ids: none for a step's leftovers.
    sparse, emb, dense, dense_emb = _models(lambda: keras.optimizers.SGD(0.1), max_ids_per_step=32 * SLOTS)
    filtered = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(32)
    sparse.fit(filtered, epochs=3, verbose=0)
    dense.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=3, verbose=0)
    want = dense_emb.embeddings.numpy()
    np.testing.assert_allclose(_rows(emb), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("cut", ["no_loss_output", "stop_gradient"])
def test_a_layer_whose_rows_get_no_gradient_fits_and_trains_nothing(cut):
    # Keras leaves a variable without a gradient out of the update step: the layer never heard of the
    # applied steps, kept every step's ids and failed once max_ids_per_step of them had been read.
    x, y = _data()
    emb = tf_lora.layers.SparseEmbedding(DIM, combiner="sum", max_ids_per_step=32 * SLOTS)
    inp, side = keras.Input((SLOTS,), dtype="int64"), keras.Input((2,))
    main = keras.layers.Dense(1, name="main")(side)
    if cut == "stop_gradient":
        outputs = main + keras.layers.Dense(1)(keras.ops.stop_gradient(emb(inp)))
        targets = y
    else:  # an output that is only predicted: no loss reaches the table
        outputs = {"main": main, "aux": keras.layers.Dense(1, name="aux")(emb(inp))}
        targets = {"main": y}
    model = keras.Model([inp, side], outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss={"main": "mse"} if cut != "stop_gradient" else "mse"
    )
    emb.table.pull(np.arange(IDS), training=True)
    before = emb.table.export()
    side_x = np.random.default_rng(1).standard_normal((len(x), 2)).astype(np.float32)
    model.fit([x, side_x], targets, batch_size=32, epochs=2, verbose=0)  # 16 steps of 32 * SLOTS ids
    after = emb.table.export()
    for key in ("keys", "values"):
        np.testing.assert_array_equal(after[key], before[key])


def test_weight_decay_and_ema_of_the_model_optimizer_warn_that_the_table_is_left_out():
    # The model optimizer's decoupled weight decay (and use_ema) never reached the table, silently: a dense
    # Embedding's rows shrink at every step, the table's did not.
    x, y = _data(64)
    sparse, emb, _, _ = _models(lambda: keras.optimizers.SGD(0.1, weight_decay=0.5))
    with pytest.warns(UserWarning, match=r"weight_decay=0.5 does not reach the table's rows"):
        sparse.fit(x, y, batch_size=32, epochs=1, verbose=0)
    sparse, emb, _, _ = _models(lambda: keras.optimizers.AdamW(0.01, use_ema=True))
    with pytest.warns(UserWarning, match=r"weight_decay=.* and use_ema=True"):
        sparse.fit(x, y, batch_size=32, epochs=1, verbose=0)
    optimizer = keras.optimizers.SGD(0.1, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_names=["pulled_rows"])
    sparse, emb, _, _ = _models(lambda: optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert not [w for w in caught if "does not reach" in str(w.message)]


def _adam_model(max_ids_per_step, seed=3):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((SLOTS,), dtype="int64")
    emb = tf_lora.layers.SparseEmbedding(
        DIM,
        combiner="sum",
        initializer=tf_lora.sparse_initializers.RandomNormal(stddev=0.1, seed=1),
        optimizer=tf_lora.sparse_optimizers.Adam(0.01),
        max_ids_per_step=max_ids_per_step,
    )
    model = keras.Model(inp, keras.layers.Dense(1)(emb(inp)))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model, emb


def test_the_model_optimizer_keeps_no_slots_for_the_rows_and_checkpoints_fit_any_max_ids(tmp_path):
    # Adam kept two [max_ids_per_step, dim] slots of zeros for pulled_rows (never used: the push takes its
    # gradient), saved in every .keras file and checkpoint, and a checkpoint restored only into a layer of
    # the same max_ids_per_step (the error's own advice, raise it, broke resuming, half-restored).
    x, y = _data(64)
    model, emb = _adam_model(8192)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    slots = [v for v in model.optimizer.variables if "pulled_rows" in v.path]
    assert slots and all(v.shape == (0,) for v in slots)
    model.save(tmp_path / "m.keras")
    assert (tmp_path / "m.keras").stat().st_size < 200_000  # the two slots alone were 2 * 8192 * 4 * 4 bytes
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp_path / "ckpt"))

    for restore in ("load_weights", "checkpoint"):
        resumed, resumed_emb = _adam_model(16384, seed=4)  # another max_ids_per_step, other initial weights
        resumed.optimizer.build(resumed.trainable_variables)
        if restore == "load_weights":
            resumed.load_weights(tmp_path / "m.keras")
        else:
            tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).read(checkpoint).assert_consumed()
        for key in ("keys", "values", "slots"):
            np.testing.assert_array_equal(resumed_emb.table.export()[key], emb.table.export()[key])
        resumed.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
        if restore == "load_weights":
            reference = keras.models.load_model(tmp_path / "m.keras")
            reference.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
            np.testing.assert_allclose(
                resumed.predict(x, verbose=0), reference.predict(x, verbose=0), rtol=1e-5
            )


def test_a_step_with_a_non_finite_gradient_changes_neither_the_table_nor_the_dense_weights():
    # The table refused the step (its push checks gradients), but Keras had already applied it to the other
    # variables, in a graph not ordered after the push: the Dense kernel went NaN behind the error.
    keras.utils.set_random_seed(0)
    ids = keras.Input((2,), dtype="int64")
    model = keras.Model(
        ids, keras.layers.Dense(1, name="d")(tf_lora.layers.SparseEmbedding(4, combiner="sum", name="z")(ids))
    )
    model.compile(optimizer="sgd", loss="mse")
    x = np.arange(4).reshape(2, 2)
    model.fit(x, np.ones((2, 1)), verbose=0)
    kernel, table = model.get_layer("d").kernel.numpy(), model.get_layer("z").table.export()
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match="SparseEmbedding .{1,3}z.{1,3}: the model optimizer.{1,3}s gradient of the rows",
    ):
        model.fit(x, np.array([[np.nan], [1.0]]), verbose=0)
    np.testing.assert_array_equal(model.get_layer("d").kernel.numpy(), kernel)
    for name, value in model.get_layer("z").table.export().items():
        np.testing.assert_array_equal(value, table[name], err_msg=name)


def test_an_export_serves_in_the_session_loader(tmp_path):
    # Leaving pulled_rows out of checkpoints (by their save context) also left it out of SavedModels'
    # variables, written after that context ends: the session loader TF Serving uses failed on its key.
    x, y = _data(32)
    model, _ = _adam_model(256)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.export(str(tmp_path / "export"), verbose=False)
    shapes = dict(tf.train.list_variables(str(tmp_path / "export" / "variables" / "variables")))
    assert [256, DIM] in shapes.values()
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta = tf.compat.v1.saved_model.load(session, ["serve"], str(tmp_path / "export"))
        signature = meta.signature_def["serving_default"]
        (inp,), (out,) = signature.inputs.values(), signature.outputs.values()
        served = session.run(out.name, {inp.name: x})
    np.testing.assert_allclose(served, model.predict(x, verbose=0), rtol=1e-6)


def test_a_keras_file_with_full_size_slots_still_loads():
    # Files written before the slots were emptied hold them as [max_ids_per_step, dim] zeros.
    x, y = _data(32)
    model, _ = _adam_model(256)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    store = {}
    model.optimizer.save_own_variables(store)
    old = {
        key: (np.zeros((256, DIM), np.float32) if "pulled_rows" in variable.path else store[key])
        for key, variable in zip(sorted(store, key=int), model.optimizer.variables, strict=True)
    }
    model.optimizer.load_own_variables(old)
    assert all(v.shape == (0,) for v in model.optimizer.variables if "pulled_rows" in v.path)
    assert int(model.optimizer.iterations) == 1


@pytest.mark.parametrize("save", ["checkpoint", "keras_file"])
def test_a_checkpoint_between_accumulated_micro_batches_resumes_exactly(tmp_path, save):
    # The list of ids read since the last applied step was not saved: a checkpoint taken between the
    # micro-batches of an accumulated step resumed with their summed gradient (kept by the model optimizer,
    # by position) pushed into the next micro-batch's ids (0.26 off on 14 rows).
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 50, (8,)), rng.standard_normal((8, 1)).astype(np.float32)) for _ in range(4)]

    def build():
        keras.utils.set_random_seed(0)
        ids = keras.Input((), dtype="int64")
        emb = tf_lora.layers.SparseEmbedding(
            4,
            initializer=tf_lora.sparse_initializers.RandomNormal(stddev=0.5, seed=1),
            optimizer=tf_lora.sparse_optimizers.SGD(0.5),
            name="emb",
        )
        model = keras.Model(ids, keras.layers.Dense(1, kernel_initializer="ones")(emb(ids)))
        model.compile(optimizer=keras.optimizers.SGD(0.5, gradient_accumulation_steps=2), loss="mse")
        return model, emb

    model, emb = build()
    for x, y in batches:
        model.train_on_batch(x, y)
    expected = emb.table.pull(np.arange(50)).numpy()

    model, emb = build()
    for x, y in batches[:3]:  # the second step has one micro-batch of two
        model.train_on_batch(x, y)
    if save == "checkpoint":
        path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp_path / "ckpt"))
        resumed, resumed_emb = build()
        resumed.optimizer.build(resumed.trainable_variables)
        tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).read(path).assert_consumed()
    else:
        model.save(tmp_path / "m.keras")
        resumed = keras.models.load_model(tmp_path / "m.keras")
        resumed_emb = resumed.get_layer("emb")
    resumed.train_on_batch(*batches[3])
    np.testing.assert_allclose(resumed_emb.table.pull(np.arange(50)).numpy(), expected, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_holding_more_step_ids_than_max_ids_per_step_is_refused_before_anything_restores(
    tmp_path,
):
    # Between the micro-batches of an accumulated step a checkpoint holds the 8 ids read so far; a layer
    # built with max_ids_per_step=4 cannot take them: the restore is refused, naming both, and leaves the
    # table and the dense weights as they were.
    rng = np.random.default_rng(0)

    def build(max_ids_per_step):
        keras.utils.set_random_seed(0)
        ids = keras.Input((), dtype="int64")
        emb = tf_lora.layers.SparseEmbedding(4, max_ids_per_step=max_ids_per_step, name="emb")
        model = keras.Model(ids, keras.layers.Dense(1, kernel_initializer="ones")(emb(ids)))
        model.compile(optimizer=keras.optimizers.SGD(0.5, gradient_accumulation_steps=2), loss="mse")
        return model, emb

    model, _ = build(64)
    model.train_on_batch(rng.integers(0, 50, (8,)), rng.standard_normal((8, 1)).astype(np.float32))
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp_path / "ckpt"))

    resumed, emb = build(4)
    resumed.optimizer.build(resumed.trainable_variables)
    emb.table.pull([1, 2, 3], training=True)
    before = {k: v.numpy() for k, v in emb.table.export().items()}
    resumed.layers[-1].kernel.assign(np.full((4, 1), 2.0, np.float32))  # the checkpoint's is all ones
    kernel = resumed.layers[-1].kernel.numpy()
    with pytest.raises(
        ValueError, match="the saved step holds 8 ids read for training, more than max_ids_per_step=4"
    ):
        tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).read(path)
    for name, value in emb.table.export().items():
        np.testing.assert_array_equal(value.numpy(), before[name])
    np.testing.assert_array_equal(resumed.layers[-1].kernel.numpy(), kernel)
    assert int(emb._step.count.numpy()) == 0  # noqa: SLF001 - the list itself was not touched
