"""tf_lora under XLA (`jit_compile=True`): the LoRA ops and layers run as TensorFlow compositions XLA
compiles, with the values and gradients of the kernels; the sparse-table ops refuse with a message that
says what to do."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora.python.ops import xla

RNG = np.random.default_rng(0)


def _f(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_the_xla_test_sees_jit_compile_only():
    seen = {}

    @tf.function(jit_compile=True)
    def compiled():
        seen["compiled"] = xla.in_xla_context()

        @tf.function
        def inner():
            seen["nested"] = xla.in_xla_context()
            return tf.constant(0)

        return inner()

    @tf.function
    def plain():
        seen["plain"] = xla.in_xla_context()
        return tf.constant(0)

    compiled()
    plain()
    assert seen == {"compiled": True, "nested": True, "plain": False}
    assert not xla.in_xla_context()  # eager


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_ops_under_xla_match_the_kernels_values_and_gradients(dtype):
    w, a, b = _f(9, 7), _f(9, 3), _f(3, 7)
    x, y = _f(5, 9), _f(5, 7)
    a_stack, b_stack = _f(4, 9, 3), _f(4, 3, 7)
    ids = np.array([2, -1, 0, 3, 2], np.int32)
    scales = np.array([0.5, 1.5, -1.0, 2.0], np.float32)
    args = [tf.cast(v, dtype) for v in (w, a, b, x, y, a_stack, b_stack, scales)]

    def everything(w, a, b, x, y, a_stack, b_stack, scales):
        with tf.GradientTape() as tape:
            tape.watch([w, a, b, x, y, a_stack, b_stack, scales])
            outs = [
                tf_lora.lora_merge(w, a, b, 0.75),
                tf_lora.lora_apply(y, x, a, b, 0.75),
                tf_lora.lora_matmul(tf.reshape(x, [5, 1, 9]), w, a, b, 0.75, bias=y[0]),
                tf_lora.batched_lora_apply(y, x, a_stack, b_stack, ids, scales),
                tf_lora.batched_lora_matmul(x, w, a_stack, b_stack, ids, scales),
            ]
            loss = tf.add_n([tf.reduce_sum(tf.cast(o, tf.float32) ** 2) for o in outs])
        return outs, tape.gradient(loss, [w, a, b, x, y, a_stack, b_stack, scales])

    want_outs, want_grads = everything(*args)  # eager: the kernels
    got_outs, got_grads = tf.function(everything, jit_compile=True)(*args)
    tol = 1e-4 if dtype == tf.float32 else 5e-2
    for got, want in zip([*got_outs, *got_grads], [*want_outs, *want_grads], strict=True):
        got, want = tf.cast(got, tf.float32).numpy(), tf.cast(want, tf.float32).numpy()
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def test_batched_apply_under_xla_marks_rows_with_bad_ids():
    y, x, a_stack, b_stack = _f(4, 3), _f(4, 2), _f(2, 2, 1), _f(2, 1, 3)
    ids = tf.constant([0, 2, -1, -2])
    out = tf.function(
        lambda: tf_lora.batched_lora_apply(y, x, a_stack, b_stack, ids, [1.0, 1.0]), jit_compile=True
    )()
    out = out.numpy()
    assert np.isnan(out[1]).all() and np.isnan(out[3]).all()  # ids 2 and -2 of 2 adapters: never a value
    np.testing.assert_allclose(out[2], y[2])  # -1: the row as it was
    np.testing.assert_allclose(out[0], y[0] + (x[0] @ a_stack[0]) @ b_stack[0], rtol=1e-5)


def test_merge_into_variable_under_xla():
    w0, a, b = _f(6, 4), _f(6, 2), _f(2, 4)
    var = tf.Variable(w0)
    tf.function(lambda: tf_lora.merge_into_variable(var, a, b, 0.5), jit_compile=True)()
    np.testing.assert_allclose(var.numpy(), w0 + 0.5 * a @ b, rtol=1e-5, atol=1e-5)


def _lora_model(jit_compile):
    keras.utils.set_random_seed(3)
    inp = keras.Input((6,))
    hidden = tf_lora.layers.LoraDense(8, activation="relu", rank=2, alpha=4, name="lora")(inp)
    model = keras.Model(inp, tf_lora.layers.LoraDense(1, rank=1, alpha=1, name="head")(hidden))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=jit_compile)
    model.get_layer("lora").lora_b.assign(np.random.default_rng(4).standard_normal((2, 8)) * 0.1)
    return model


def test_lora_dense_trains_under_keras_jit_compile_as_without_it():
    x, y = _f(64, 6), _f(64, 1)
    compiled, plain = _lora_model(True), _lora_model(False)
    for got, want in zip(compiled.weights, plain.weights, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    compiled.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    plain.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert compiled.jit_compile
    for got, want in zip(compiled.trainable_weights, plain.trainable_weights, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(
        compiled.predict(x, verbose=0), plain.predict(x, verbose=0), rtol=2e-4, atol=1e-5
    )


def test_sparse_tables_refuse_xla_with_a_message():
    table = tf_lora.SparseTable(4)
    with pytest.raises(ValueError, match=r"cannot be compiled by XLA.*jit_compile=False"):
        tf.function(lambda: table.pull(tf.constant([1, 2], tf.int64)), jit_compile=True)()

    emb = tf_lora.layers.SparseEmbedding(4, combiner="sum", name="emb")
    assert emb.supports_jit is False  # Keras' jit_compile="auto" then compiles without XLA
    inp = keras.Input((3,), dtype="int64")
    model = keras.Model(inp, keras.layers.Dense(1)(emb(inp)))
    with pytest.warns(UserWarning, match="jit_compile"):  # Keras itself falls back, and says so
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert model.jit_compile is False
    model.fit(np.ones((8, 3), np.int64), np.ones((8, 1), np.float32), verbose=0)
    assert int(emb.table.size()) == 1
